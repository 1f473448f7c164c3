"""Level-Based Foraging adapter (envs/lbf.py): conformance, time limits, determinism, errors."""

import sys
from collections import deque

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs

pytest.importorskip("lbforaging", reason="pip install lbforaging")

COOP = "lbf:Foraging-8x8-2p-2f-coop-v3"
OTHER = "lbf:Foraging-2s-10x10-3p-3f-v3"  # partial observability (sight 2), 3 agents, 3 food

# LBF actions
NONE, NORTH, SOUTH, WEST, EAST, LOAD = range(6)
_MOVES = {NORTH: (-1, 0), SOUTH: (1, 0), WEST: (0, -1), EAST: (0, 1)}


def random_actions(gen, env):
    return torch.randint(0, env.n_actions, (env.num_envs, env.n_agents), generator=gen)


def greedy_actions(env):
    """Scripted policy that reads the underlying LBF state: every agent walks (BFS) to its own
    free side of the first remaining food and LOADs once there, so cooperative food gets loaded
    when all agents stand around it. Deterministic given the env state."""
    acts = torch.zeros(env.num_envs, env.n_agents, dtype=torch.int64)
    for e, g in enumerate(env.gym_envs):
        raw = g.unwrapped
        field = raw.field
        rows, cols = field.shape
        foods = list(zip(*np.nonzero(field)))
        if not foods:
            continue
        fr, fc = foods[0]
        pos = [tuple(int(v) for v in p.position) for p in raw.players]
        sides = [(fr + dr, fc + dc) for dr, dc in _MOVES.values()
                 if 0 <= fr + dr < rows and 0 <= fc + dc < cols and field[fr + dr, fc + dc] == 0]
        taken = set()
        for i, p in enumerate(pos):
            if abs(p[0] - fr) + abs(p[1] - fc) == 1:
                acts[e, i] = LOAD
                taken.add(p)
        for i, p in enumerate(pos):
            if acts[e, i] == LOAD:
                continue
            blocked = {q for j, q in enumerate(pos) if j != i}
            goals = [s for s in sides if s not in taken and s not in blocked]
            if not goals:
                continue
            # BFS from p avoiding food and other agents; first move towards the nearest free side
            first = {p: None}
            queue = deque([p])
            reached = None
            while queue:
                cur = queue.popleft()
                if cur in goals:
                    reached = cur
                    break
                for a, (dr, dc) in _MOVES.items():
                    nxt = (cur[0] + dr, cur[1] + dc)
                    if (0 <= nxt[0] < rows and 0 <= nxt[1] < cols and nxt not in first
                            and field[nxt] == 0 and nxt not in blocked):
                        first[nxt] = a if cur == p else first[cur]
                        queue.append(nxt)
            if reached is not None:
                taken.add(reached)
                acts[e, i] = first[reached]
    return acts


# --- conformance --------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id,n_agents,obs_dim", [(COOP, 2, 12), (OTHER, 3, 18)])
def test_spaces_shapes_dtypes_bounds(env_id, n_agents, obs_dim):
    env = envs.make(env_id, num_envs=3, seed=0)
    assert env.n_agents == n_agents and env.obs_dim == obs_dim
    assert env.state_dim == n_agents * obs_dim
    assert env.episode_limit == 50
    assert isinstance(env.action_space, gym.spaces.Discrete) and env.action_space.n == 6
    assert env.is_discrete and env.n_actions == 6
    obs, state, avail = env.reset()
    assert obs.shape == (3, n_agents, obs_dim) and obs.dtype == torch.float32
    assert state.shape == (3, n_agents * obs_dim) and state.dtype == torch.float32
    assert avail.shape == (3, n_agents, 6) and avail.dtype == torch.bool and bool(avail.all())
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        assert bool(((obs >= env.obs_low) & (obs <= env.obs_high)).all())
        assert torch.equal(state, obs.reshape(3, -1))
        obs, state, avail, reward, term, trunc, info = env.step(random_actions(gen, env))
        assert reward.shape == (3,) and reward.dtype == torch.float32
        assert bool((reward >= 0).all()) and bool((reward <= 1 + 1e-6).all())
        for k in ("final_obs", "final_state"):
            assert info[k].dtype == torch.float32
        assert info["final_obs"].shape == obs.shape and info["final_state"].shape == state.shape
        for x in (term, trunc, info["success"]):
            assert x.shape == (3,) and x.dtype == torch.bool
        assert not bool((term & trunc).any())
        assert bool(avail.all())
    env.close()


def test_obs_layout_self_first():
    env = envs.make(COOP, num_envs=2, seed=3)
    obs, _, _ = env.reset()
    for e, g in enumerate(env.gym_envs):
        raw = g.unwrapped
        for i, p in enumerate(raw.players):
            # food block is 3 * n_food = 6 entries, then (y, x, level) with the observer first
            assert obs[e, i, 6:9].tolist() == [p.position[0], p.position[1], p.level]
        foods = sorted((int(r), int(c), int(raw.field[r, c])) for r, c in zip(*np.nonzero(raw.field)))
        assert sorted(tuple(int(v) for v in obs[e, 0, 3 * k:3 * k + 3]) for k in range(2)) == foods


def test_random_policy_timeout_is_truncation_and_autoreset():
    env = envs.make(COOP, num_envs=4, seed=11)
    obs, state, _ = env.reset()
    gen = torch.Generator().manual_seed(1)
    finished = 0
    for t in range(1, 101):
        obs, state, avail, reward, term, trunc, info = env.step(random_actions(gen, env))
        done = term | trunc
        for e in range(env.num_envs):
            if not done[e]:
                assert torch.equal(info["final_obs"][e], obs[e])
                assert torch.equal(info["final_state"][e], state[e])
                continue
            finished += 1
            if trunc[e]:
                assert int(info["episode_length"][e]) == 50
                assert not bool(term[e]) and not bool(info["success"][e])
            # the returned obs start the next episode, final_obs hold the last one
            assert torch.equal(info["final_state"][e], info["final_obs"][e].reshape(-1))
            assert not torch.equal(info["final_obs"][e], obs[e])
            new_raw_obs = np.stack(env.gym_envs[e].unwrapped._make_gym_obs())
            assert np.array_equal(obs[e].numpy(), new_raw_obs)
    # random play on the coop task essentially never clears both foods: (nearly) all truncated
    assert finished == 8
    assert int(env.t.max()) == 0 and bool((env.episode_count == 3).all())


def test_all_food_collected_is_termination_with_success():
    env = envs.make(COOP, num_envs=4, seed=5)
    env.reset()
    cleared = 0
    for _ in range(100):
        acts = greedy_actions(env)
        obs, state, avail, reward, term, trunc, info = env.step(acts)
        for e in torch.nonzero(term).flatten().tolist():
            cleared += 1
            assert not bool(trunc[e]) and bool(info["success"][e])
            assert int(info["episode_length"][e]) < 50
            assert float(info["episode_return"][e]) == pytest.approx(1.0, abs=1e-5)
            food = info["final_obs"][e, :, :6].reshape(env.n_agents, 2, 3)  # (y, x, level) per food
            assert bool((food[..., 2] == 0).all())  # no food left in the last observation
        assert bool((info["success"] == term).all())
    assert cleared >= 4


def test_random_policy_team_return_is_small():
    env = envs.make(COOP, num_envs=64, seed=2)
    env.reset()
    gen = torch.Generator().manual_seed(2)
    returns, success = [], []
    for _ in range(50 * 8):
        _, _, _, _, term, trunc, info = env.step(random_actions(gen, env))
        done = term | trunc
        returns += info["episode_return"][done].tolist()
        success += info["success"][done].tolist()
    assert len(returns) == 64 * 8
    mean = float(np.mean(returns))
    assert 0.0 <= mean < 0.03, mean  # measured about 0.004 per episode
    assert np.mean(success) < 0.02


def test_max_episode_steps_override():
    for limit in (10, 70):
        env = envs.make(COOP, num_envs=2, seed=0, max_episode_steps=limit)
        assert env.episode_limit == limit
        env.reset()
        for t in range(1, limit + 1):
            _, _, _, _, term, trunc, info = env.step(torch.zeros(2, 2, dtype=torch.int64))  # NONE
            assert not bool(term.any())
            assert bool(trunc.all()) == (t == limit)
        assert info["episode_length"].tolist() == [limit, limit]


# --- determinism --------------------------------------------------------------------------------
def _rollout(env_id, num_envs, seed, actions, **kw):
    env = envs.make(env_id, num_envs=num_envs, seed=seed, **kw)
    out = [env.reset()]
    for a in actions:
        obs, state, avail, reward, term, trunc, info = env.step(a[:num_envs])
        out.append((obs, state, reward, term, trunc, info["final_obs"], info["success"]))
    return out


@pytest.mark.parametrize("env_id", [COOP, OTHER])
def test_same_seed_same_trajectory_and_batch_independence(env_id):
    n = 3 if env_id == OTHER else 2
    gen = torch.Generator().manual_seed(7)
    actions = [torch.randint(0, 6, (4, n), generator=gen) for _ in range(120)]  # spans 2 resets
    a = _rollout(env_id, 4, 123, actions)
    b = _rollout(env_id, 4, 123, actions)
    one = _rollout(env_id, 1, 123, actions)
    for x, y, z in zip(a, b, one):
        for u, v, w in zip(x, y, z):
            assert torch.equal(u, v)
            assert torch.equal(u[:1], w)
    c = _rollout(env_id, 4, 124, actions[:1])
    assert not torch.equal(a[0][0], c[0][0])
    # env i of a batch seeded s equals env 0 of a batch seeded s + i
    shifted = _rollout(env_id, 1, 124, [x[1:] for x in actions])
    for x, w in zip(a, shifted):
        for u, v in zip(x, w):
            assert torch.equal(u[1:2], v)


def test_greedy_run_is_deterministic():
    def run():
        env = envs.make(COOP, num_envs=2, seed=9)
        env.reset()
        rets = []
        for _ in range(120):
            *_, term, trunc, info = env.step(greedy_actions(env))
            rets += info["episode_return"][term | trunc].tolist()
        return rets
    assert run() == run()


# --- bad input ----------------------------------------------------------------------------------
def test_unknown_id():
    with pytest.raises(ValueError) as e:
        envs.make("lbf:Foraging-8x8-2p-2f-coop-v9")
    msg = str(e.value)
    assert "Foraging-8x8-2p-2f-coop-v9" in msg and "lbf:Foraging-8x8-2p-2f-coop-v3" in msg
    with pytest.raises(ValueError, match="not a Level-Based Foraging env"):
        envs.make("lbf:CartPole-v1")
    with pytest.raises(ValueError, match="grid"):
        envs.make("lbf:Foraging-grid-8x8-2p-2f-v3")
    with pytest.raises(ValueError, match="unexpected keyword"):
        envs.make(COOP, not_an_option=1)
    with pytest.raises(ValueError, match="max_episode_steps"):
        envs.make(COOP, max_episode_steps=0)
    with pytest.raises(ValueError, match="num_envs"):
        envs.make(COOP, num_envs=0)


def test_bad_actions():
    env = envs.make(COOP, num_envs=2, seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, 2, dtype=torch.int64))
    env.reset()
    with pytest.raises(TypeError, match="torch.Tensor"):
        env.step(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="int64"):
        env.step(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int64"):
        env.step(torch.zeros(2, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        env.step(torch.full((2, 2), 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        env.step(torch.full((2, 2), -1, dtype=torch.int64))
    # rejected actions did not advance the env
    assert env.t.tolist() == [0, 0]


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lbforaging", None)
    with pytest.raises(ImportError, match="pip install lbforaging"):
        envs.make(COOP)


# --- slip (environment shift) -------------------------------------------------------------------
def _player_positions(env):
    return [[tuple(int(v) for v in p.position) for p in g.unwrapped.players] for g in env.gym_envs]


def test_slip_prob_one_freezes_every_agent():
    env = envs.make(COOP, num_envs=3, seed=4, slip_prob=1.0)
    obs0, _, _ = env.reset()
    start = _player_positions(env)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        obs, *_ = env.step(random_actions(gen, env))
    assert _player_positions(env) == start and torch.equal(obs, obs0)


def test_slip_prob_replaces_that_share_of_moves_by_none():
    def moved_share(p):
        env = envs.make(COOP, num_envs=8, seed=1, slip_prob=p, max_episode_steps=1000)
        env.reset()
        moved = tries = 0
        for t in range(80):
            before = _player_positions(env)
            # alternate EAST and WEST: always possible on an empty row unless a wall, food or agent blocks
            env.step(torch.full((8, 2), EAST if t % 2 == 0 else WEST, dtype=torch.int64))
            after = _player_positions(env)
            moved += sum(a != b for pe, qe in zip(before, after) for a, b in zip(pe, qe))
            tries += 16
        return moved / tries
    plain, slipping = moved_share(0.0), moved_share(0.5)
    assert 0.35 * plain < slipping < 0.65 * plain, (plain, slipping)


def test_slip_is_deterministic_and_batch_independent():
    gen = torch.Generator().manual_seed(7)
    actions = [torch.randint(0, 6, (4, 2), generator=gen) for _ in range(60)]
    a = _rollout(COOP, 4, 3, actions, slip_prob=0.3)
    b = _rollout(COOP, 4, 3, actions, slip_prob=0.3)
    one = _rollout(COOP, 1, 3, actions, slip_prob=0.3)
    plain = _rollout(COOP, 4, 3, actions)
    for x, y, z in zip(a, b, one):
        for u, v, w in zip(x, y, z):
            assert torch.equal(u, v) and torch.equal(u[:1], w)
    assert any(not torch.equal(x[0], p[0]) for x, p in zip(a, plain))
