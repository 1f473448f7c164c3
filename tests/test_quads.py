"""Quadrotor swarm (envs/quads.py): API contract, determinism, physics and scenario checks.

Physics tests switch the noise off and place drones with ``QuadSwarm.set_state``.
"""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from envs.quads import (
    ARM,
    GRAV,
    HITBOX,
    HOVER_ACTION,
    HOVER_CMD,
    PROX_FALLOFF,
    SIM_DT,
    THRUST_TO_WEIGHT,
    VEL13_SETPOINTS,
    QuadSwarm,
)

IDS = ["quads-same-goal", "quads-swarm-vs-swarm", "quads-same-goal-discrete", "quads-swarm-vs-swarm-discrete"]
QUIET = dict(sensor_noise=False, thrust_noise=False)


def random_actions(env, gen):
    E, N = env.num_envs, env.n_agents
    if env.is_discrete:
        return torch.randint(0, env.n_actions, (E, N), generator=gen)
    return torch.rand(E, N, env.n_actions, generator=gen) * 2.0 - 1.0


def hover(env):
    return torch.full((env.num_envs, env.n_agents, 4), HOVER_ACTION)


# --- API contract ----------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id", IDS)
def test_conformance(env_id):
    E, limit = 3, 6
    env = envs.make(env_id, num_envs=E, seed=1, n_agents=4, n_neighbors=2, episode_limit=limit)
    assert isinstance(env, QuadSwarm)
    N, A = env.n_agents, env.n_actions
    assert env.obs_dim == 18 + 6 * 2 and env.state_dim == 21 * N and env.episode_limit == limit
    if env_id.endswith("discrete"):
        assert env.action_space == gym.spaces.Discrete(13) and A == 13
    else:
        assert isinstance(env.action_space, gym.spaces.Box) and env.action_space.shape == (4,)
        assert env.action_space.dtype == np.float32
        assert (env.action_space.low == -1).all() and (env.action_space.high == 1).all() and A == 4
    obs, state, avail = env.reset()
    assert obs.shape == (E, N, env.obs_dim) and obs.dtype == torch.float32
    assert state.shape == (E, env.state_dim) and state.dtype == torch.float32
    assert avail.shape == (E, N, A) and avail.dtype == torch.bool and avail.all()
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 2 * limit + 1):
        obs, state, avail, reward, terminated, truncated, info = env.step(random_actions(env, gen))
        assert obs.shape == (E, N, env.obs_dim) and obs.dtype == torch.float32
        assert state.shape == (E, env.state_dim) and state.dtype == torch.float32
        assert avail.shape == (E, N, A) and avail.dtype == torch.bool and avail.all()
        assert reward.shape == (E,) and reward.dtype == torch.float32
        assert terminated.shape == (E,) and terminated.dtype == torch.bool and not terminated.any()
        assert truncated.shape == (E,) and truncated.dtype == torch.bool
        assert bool(truncated.all()) == (t % limit == 0)  # time limit only, all envs in lockstep
        for x in (obs, state, reward, info["final_obs"], info["final_state"], info["agent_rewards"]):
            assert torch.isfinite(x).all()
        assert info["agent_rewards"].shape == (E, N) and info["dist"].shape == (E, N)
        assert info["n_collisions"].shape == (E,) and info["new_collision"].shape == (E, N)
        assert info["proximity_penalty"].shape == (E, N) and info["on_floor"].shape == (E, N)
        torch.testing.assert_close(reward, info["agent_rewards"].mean(-1))
        assert info["success"].shape == (E,) and not (info["success"] & ~truncated).any()
        if truncated.all():
            assert (info["episode_length"] == limit).all()
            # auto-reset: new episode returned, last one in final_obs / final_state
            assert not torch.equal(info["final_obs"], obs) and not torch.equal(info["final_state"], state)
            final_rel = info["final_state"].view(E, N, 21)[..., 3:6]  # pos - goal of the last step
            torch.testing.assert_close(final_rel.norm(dim=-1), info["dist"])
            assert (env.t == 0).all()
        else:
            assert torch.equal(info["final_obs"], obs) and torch.equal(info["final_state"], state)


def test_feature_groups_and_layouts():
    E, N, K = 2, 5, 3
    env = envs.make("quads-same-goal", num_envs=E, seed=4, n_agents=N, n_neighbors=K, **QUIET)
    g = env.obs_feature_groups
    covered = sorted(i for sl in g.values() for i in range(sl.start, sl.stop))
    assert covered == list(range(env.obs_dim))
    assert set(g) == {"self.pos", "self.vel", "self.R", "self.omega"} | {
        f"nbr_{k}.{x}" for k in range(K) for x in ("pos", "vel")}
    gen = torch.Generator().manual_seed(1)
    env.reset()
    for _ in range(5):
        obs, state, *_ = env.step(random_actions(env, gen))
    pos, vel, R, om, goal = env.pos, env.vel, env.R, env.omega, env.goal
    torch.testing.assert_close(obs[..., g["self.pos"]], pos - goal)
    torch.testing.assert_close(obs[..., g["self.vel"]], vel)
    torch.testing.assert_close(obs[..., g["self.R"]], R.reshape(E, N, 9))
    torch.testing.assert_close(obs[..., g["self.omega"]], om)
    st = state.view(E, N, 21)
    for sl, x in ((slice(0, 3), pos), (slice(3, 6), pos - goal), (slice(6, 9), vel),
                  (slice(9, 18), R.reshape(E, N, 9)), (slice(18, 21), om)):
        torch.testing.assert_close(st[..., sl], x)
    # neighbours: the K best by d_ij + p̂_ij·v_ij, best first, relative position and velocity
    rel = pos.unsqueeze(1) - pos.unsqueeze(2)  # [e, i, j] = p_j - p_i
    relv = vel.unsqueeze(1) - vel.unsqueeze(2)
    d = rel.norm(dim=-1) + torch.diag(torch.full((N,), float("inf")))
    metric = d + (rel * relv).sum(-1) / d
    order = metric.argsort(-1)[..., :K]
    for k in range(K):
        j = order[..., k]
        jj = j[..., None, None].expand(E, N, 1, 3)
        torch.testing.assert_close(obs[..., g[f"nbr_{k}.pos"]], rel.gather(2, jj)[:, :, 0])
        exp_v = relv.gather(2, jj)[:, :, 0].clamp(-6, 6)
        torch.testing.assert_close(obs[..., g[f"nbr_{k}.vel"]], exp_v)


def test_all_neighbours_in_index_order_and_single_agent():
    env = envs.make("quads-same-goal", num_envs=2, seed=0, n_agents=3, n_neighbors=-1, **QUIET)
    obs, _, _ = env.reset()
    assert env.n_neighbors == 2 and env.obs_dim == 30
    p = env.pos
    torch.testing.assert_close(obs[:, 0, 18:21], p[:, 1] - p[:, 0])
    torch.testing.assert_close(obs[:, 0, 24:27], p[:, 2] - p[:, 0])
    torch.testing.assert_close(obs[:, 2, 24:27], p[:, 1] - p[:, 2])
    solo = envs.make("quads-same-goal", n_agents=1)
    assert solo.n_neighbors == 0 and solo.obs_dim == 18
    solo.reset()
    obs, *_ = solo.step(hover(solo))
    assert obs.shape == (1, 1, 18)


def test_defaults_and_reset_distribution():
    env = envs.make("quads-same-goal", num_envs=64, seed=2, **QUIET)
    assert env.n_agents == 8 and env.n_neighbors == 6 and env.obs_dim == 54 and env.state_dim == 168
    assert env.episode_limit == 1500 and env.control_dt == pytest.approx(0.01)
    disc = envs.make("quads-same-goal-discrete")
    assert disc.episode_limit == 200 and disc.control_dt == pytest.approx(0.05)
    assert envs.make("quads-same-goal", n_neighbors=20, n_agents=4).n_neighbors == 3
    env.reset()
    goal = torch.tensor([0.0, 0.0, 2.0])
    assert torch.equal(env.goal, goal.expand(64, 8, 3))
    off = env.pos - goal
    assert (off.abs() <= 2.0 + 1e-6).all() and (env.pos[..., 2] >= 0.75).all()
    assert off.std() > 0.8  # spread over the ±2 m box
    assert (env.vel == 0).all() and (env.omega == 0).all() and not env.on_floor.any()
    R = env.R
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(64, 8, 3, 3), atol=1e-6, rtol=0)
    assert torch.allclose(R[..., 2, 2], torch.ones(64, 8))  # level, random yaw
    heading = R[..., :2, 0]
    to_origin = -env.pos[..., :2] / env.pos[..., :2].norm(dim=-1, keepdim=True)
    assert ((heading * to_origin).sum(-1) >= 0.5 - 1e-5).all()  # faces the origin within ±60°


# --- determinism ---------------------------------------------------------------------------------

def _rollout(env_id, E, steps, seed, kw, act_seed=5):
    env = envs.make(env_id, num_envs=E, seed=seed, **kw)
    out = [env.reset()]
    gen = torch.Generator().manual_seed(act_seed)
    N = env.n_agents
    for _ in range(steps):  # the same actions for every env
        if env.is_discrete:
            a = torch.randint(0, env.n_actions, (1, N), generator=gen)
        else:
            a = torch.rand(1, N, 4, generator=gen) * 2.0 - 1.0
        out.append(env.step(a.expand(E, *a.shape[1:]).contiguous())[:5])
    return out


@pytest.mark.parametrize("env_id,kw", [
    ("quads-same-goal", dict(n_agents=8, n_neighbors=6, episode_limit=25)),
    ("quads-swarm-vs-swarm", dict(n_agents=5, n_neighbors=3, episode_limit=25)),
    ("quads-swarm-vs-swarm-discrete", dict(n_agents=4, episode_limit=12)),
])
def test_determinism_and_batch_independence(env_id, kw):
    a = _rollout(env_id, 1, 30, 7, kw)
    b = _rollout(env_id, 1, 30, 7, kw)
    c = _rollout(env_id, 4, 30, 7, kw)
    for xa, xb, xc in zip(a, b, c):
        for ta, tb, tc in zip(xa, xb, xc):
            assert torch.equal(ta, tb)
            assert torch.equal(ta[0], tc[0])  # env 0 of a batch of 4 equals a batch of 1
    assert not torch.equal(c[0][0][0], c[0][0][1])  # envs of a batch differ
    other = _rollout(env_id, 1, 0, 8, kw)
    assert not torch.equal(other[0][1], a[0][1])


# --- physics -------------------------------------------------------------------------------------

def test_hover_holds_altitude():
    env = envs.make("quads-same-goal", num_envs=2, n_agents=2, seed=0, **QUIET)
    env.reset()
    yaw = torch.tensor([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    env.set_state(pos=torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 3.0]]), vel=0.0, omega=0.0, R=yaw, motor=HOVER_CMD)
    start = env.pos.clone()
    for _ in range(100):  # 1 s
        env.step(hover(env))
    assert (env.pos - start).norm(dim=-1).max() < 0.05
    assert env.vel.norm(dim=-1).max() < 0.05 and env.omega.norm(dim=-1).max() < 0.05
    assert abs(HOVER_ACTION - (2.0 / 1.9 - 1.0)) < 1e-12


def test_free_fall_then_floor_crash_and_take_off():
    env = envs.make("quads-same-goal", n_agents=1, seed=0, **QUIET)
    env.reset()
    z0 = 3.0
    env.set_state(pos=(0.0, 0.0, z0), vel=0.0, omega=0.0, R=torch.eye(3), motor=0.0)
    off = -torch.ones(1, 1, 4)
    k = 0
    while True:
        _, _, _, _, _, _, info = env.step(off)
        k += 1
        if env.on_floor.any():
            break
        t = 2 * k * SIM_DT
        z = env.pos[0, 0, 2].item()
        # explicit Euler with position first: z0 - g dt^2 s(s-1)/2 after s sub-steps
        assert z == pytest.approx(z0 - GRAV * SIM_DT ** 2 * (2 * k) * (2 * k - 1) / 2, abs=1e-4)
        assert abs(z - (z0 - 0.5 * GRAV * t * t)) <= 0.5 * GRAV * t * SIM_DT + 1e-4
        assert info["agent_rewards"][0, 0] > -0.02
    assert abs(k * 0.01 - math.sqrt(2 * (z0 - ARM) / GRAV)) < 0.02  # landed on time
    assert env.pos[0, 0, 2].item() == pytest.approx(ARM, abs=1e-6)
    assert (env.vel == 0).all() and (env.omega == 0).all()
    assert env.R[0, 0, 2, 2] == 1.0
    # on the floor: crash 1 and orient 1; dist to (0,0,2); effort 0.05·‖(-1,-1,-1,-1)‖ = 0.1
    for _ in range(3):
        _, _, _, reward, _, _, info = env.step(off)
        assert info["on_floor"].all()
        expected = -0.005 * ((2.0 - ARM) + 0.05 * 2.0 + 1.0 + 1.0 + 0.0)
        assert info["agent_rewards"][0, 0].item() == pytest.approx(expected, rel=1e-5)
    # full thrust lifts it off again
    for _ in range(50):
        env.step(torch.ones(1, 1, 4))
    assert not env.on_floor.any() and env.pos[0, 0, 2] > 0.3


def test_thrust_scale_degrades_actuation():
    env = envs.make("quads-same-goal", n_agents=1, thrust_scale=0.85, **QUIET)
    env.reset()
    env.set_state(pos=(0.0, 0.0, 2.0), vel=0.0, omega=0.0, R=torch.eye(3), motor=HOVER_CMD)
    for _ in range(50):  # nominal hover command, 15% less thrust: sinks at ~0.15 g
        env.step(hover(env))
    assert env.vel[0, 0, 2].item() == pytest.approx(-0.15 * GRAV * 0.5, rel=0.05)


def test_walls_clip_and_bounce():
    env = envs.make("quads-same-goal", n_agents=1, seed=0, **QUIET)
    env.reset()
    env.set_state(pos=(4.99, 0.0, 2.0), vel=(3.0, 0.0, 0.0), omega=0.0, R=torch.eye(3), motor=HOVER_CMD)
    env.step(hover(env))
    assert env.pos[0, 0, 0] <= 5.0
    assert env.vel[0, 0, 0] < 0  # reflected
    assert -0.8 * 3.0 - 1e-4 <= env.vel[0, 0, 0] <= -0.2 * 3.0 + 0.1
    assert env.omega.abs().max() > 1.0  # kicked into a tumble
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        env.step(torch.rand(1, 1, 4, generator=gen) * 2 - 1)
        p = env.pos[0, 0]
        assert (p[:2].abs() <= 5.0).all() and ARM - 1e-6 <= p[2] <= 10.0


def test_drone_collision_penalty_once_and_proximity():
    env = envs.make("quads-same-goal", num_envs=2, n_agents=3, seed=3, **QUIET)
    env.reset()
    pos = torch.tensor([[0.0, 0.0, 2.0], [0.05, 0.0, 2.0], [2.0, 2.0, 2.0]])
    env.set_state(pos=pos, vel=0.0, omega=0.0, R=torch.eye(3), motor=HOVER_CMD, goal=(0.0, 0.0, 2.0))
    _, _, _, reward, _, _, info = env.step(hover(env))
    assert info["new_collision"][:, :2].all() and not info["new_collision"][:, 2].any()
    assert (info["n_collisions"] == 1).all()
    r = info["agent_rewards"]
    assert (r[:, :2] < -5.0).all() and (r[:, :2] > -5.5).all() and (r[:, 2] > -1.0).all()
    prox = info["proximity_penalty"]
    expected_prox = 10.0 * (1.0 - 0.05 / PROX_FALLOFF) * 0.01
    torch.testing.assert_close(prox[:, :2], torch.full((2, 2), expected_prox))
    assert (prox[:, 2] == 0).all()
    # the collision is harmful: the pair is knocked into a tumble
    assert (env.omega[:, :2].norm(dim=-1) > 10.0).all()
    # still overlapping at the next steps: no new penalty, proximity penalty continues
    for _ in range(2):
        d = (env.pos[:, 0] - env.pos[:, 1]).norm(dim=-1)
        assert (d <= HITBOX).all()
        _, _, _, reward, _, _, info = env.step(hover(env))
        assert not info["new_collision"].any() and (info["n_collisions"] == 0).all()
        assert (info["proximity_penalty"][:, :2] > 0).all()
        assert (info["agent_rewards"] > -1.0).all()


def test_velocity_mode_oracle_reaches_goal():
    env = envs.make("quads-same-goal-discrete", num_envs=8, n_agents=1, seed=1)
    setpoints = torch.tensor(VEL13_SETPOINTS)
    obs, _, _ = env.reset()
    assert (obs[..., 0:3].norm(dim=-1) > 0.5).any()
    for _ in range(env.episode_limit - 1):
        v_star = -2.0 * obs[..., 0:3]  # P-controller on the observed (noisy) goal offset
        act = ((setpoints.view(1, 1, 13, 3) - v_star.unsqueeze(-2)) ** 2).sum(-1).argmin(-1)
        obs, _, _, _, _, truncated, info = env.step(act)
    assert not truncated.any()
    assert info["dist"].max() < 0.15
    assert not env.on_floor.any() and (env.R[..., 2, 2] > 0.9).all()
    _, _, _, _, _, truncated, info = env.step(act)
    assert truncated.all() and info["success"].all()


def test_velocity_mode_tracks_setpoints():
    env = envs.make("quads-same-goal-discrete", num_envs=1, n_agents=2, seed=0, **QUIET)
    env.reset()
    env.set_state(pos=torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 2.0]]), vel=0.0, omega=0.0, R=torch.eye(3),
                  motor=HOVER_CMD)
    act = torch.tensor([[11, 7]])  # +z at 1 m/s, +x at 1 m/s
    for _ in range(40):  # 2 s (the horizontal response overshoots by ~20% before settling)
        env.step(act)
    torch.testing.assert_close(env.vel[0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(env.vel[0, 1], torch.tensor([1.0, 0.0, 0.0]), atol=0.05, rtol=0)
    for _ in range(40):  # 0 = hold
        env.step(torch.zeros(1, 2, dtype=torch.int64))
    assert env.vel.norm(dim=-1).max() < 0.05


def test_success_requires_goal_and_no_late_collision():
    kw = dict(num_envs=2, n_agents=2, seed=0, episode_limit=160, **QUIET)
    env = envs.make("quads-same-goal", **kw)
    env.reset()
    goals = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 2.0]])
    start = goals.clone()
    start[0, 0] += 0.3  # within 0.5 m
    env.set_state(pos=start, goal=goals, vel=0.0, omega=0.0, R=torch.eye(3), motor=HOVER_CMD)
    for t in range(160):
        if t == 155:  # env 1: a collision after the 1.5 s grace period (150 steps)
            pos = env.pos.clone()
            pos[1, 1] = pos[1, 0] + torch.tensor([0.05, 0.0, 0.0])
            env.set_state(pos=pos)
        _, _, _, _, _, truncated, info = env.step(hover(env))
    assert truncated.all()
    assert info["success"].tolist() == [True, False]
    # far from the goal: no success
    env = envs.make("quads-same-goal", **dict(kw, episode_limit=3))
    env.reset()
    env.set_state(pos=goals + torch.tensor([0.0, 0.0, 0.8]), goal=goals, vel=0.0, omega=0.0, R=torch.eye(3),
                  motor=HOVER_CMD)
    for _ in range(3):
        *_, info = env.step(hover(env))
    assert not info["success"].any()


def test_vel13_reward_scale_matches_motors_per_second():
    m = envs.make("quads-same-goal", n_agents=1, **QUIET)
    v = envs.make("quads-same-goal-discrete", n_agents=1, **QUIET)
    assert m.reward_factor / m.control_dt == pytest.approx(v.reward_factor / v.control_dt)
    assert v.reward_factor == pytest.approx(0.025)


# --- scenarios -----------------------------------------------------------------------------------

def test_swarm_vs_swarm_goals_swap_on_schedule():
    E, N = 3, 6
    env = envs.make("quads-swarm-vs-swarm-discrete", num_envs=E, n_agents=N, seed=5, episode_limit=400)
    env.reset()
    team = env.team
    assert team.tolist() == [0, 0, 0, 1, 1, 1]
    S = env.switch_steps.clone()
    assert ((S >= round(4 / 0.05)) & (S <= round(6 / 0.05))).all()
    centers = env.centers.clone()
    assert ((centers[:, 0] - centers[:, 1]).norm(dim=-1) >= 0.5).all()
    radius = 0.5  # largest formation radius for 3 drones: 0.75 (unit spacing) x 0.5 m = 0.375
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 2 * int(S.max()) + 3):
        *_, truncated, _ = env.step(random_actions(env, gen))
        assert not truncated.any()
        side = (torch.div(t, S, rounding_mode="floor") % 2).bool()
        assert torch.equal(env.side, side)
        c0 = centers[torch.arange(E), side.long()]
        c1 = centers[torch.arange(E), (~side).long()]
        g = env.goal
        assert ((g[:, team == 0] - c0[:, None]).norm(dim=-1) <= radius).all()
        assert ((g[:, team == 1] - c1[:, None]).norm(dim=-1) <= radius).all()
        # goals within a team are distinct (a formation, not a point)
        for tm in (0, 1):
            gg = g[:, team == tm]
            dd = (gg.unsqueeze(1) - gg.unsqueeze(2)).norm(dim=-1) + torch.eye(3) * 10
            assert (dd > 0.2).all()
    assert torch.equal(env.centers, centers)  # centres fixed within the episode


def test_swarm_vs_swarm_odd_team_sizes_and_formations():
    env = envs.make("quads-swarm-vs-swarm", num_envs=64, n_agents=7, seed=0)
    env.reset()
    assert env.team.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert len(set(env.formation.tolist())) >= 5  # several formation types drawn
    g = env.goal
    assert (g[..., 2] >= 0.25).all() and (g[..., :2].abs() <= 5).all()


# --- bad input -----------------------------------------------------------------------------------

def test_bad_actions():
    env = envs.make("quads-same-goal", num_envs=2, n_agents=3)
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError):
        env.step(torch.zeros(2, 3, 4, dtype=torch.int64))
    bad = torch.zeros(2, 3, 4)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        env.step(bad)
    with pytest.raises(TypeError):
        env.step([[0.0] * 4] * 3)
    disc = envs.make("quads-same-goal-discrete", num_envs=2, n_agents=3)
    disc.reset()
    with pytest.raises(ValueError, match="int64"):
        disc.step(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        disc.step(torch.full((2, 3), 13, dtype=torch.int64))
    # out-of-range continuous actions are clipped, not rejected
    obs, *_ = env.step(torch.full((2, 3, 4), 7.0))
    assert torch.isfinite(obs).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(scenario="nope"), "unknown quads scenario"),
    (dict(action_mode="rpm"), "unknown quads action_mode"),
    (dict(n_agents=0), "n_agents"),
    (dict(scenario="swarm-vs-swarm", n_agents=1), "n_agents >= 2"),
    (dict(n_neighbors=-3), "n_neighbors"),
    (dict(episode_limit=0), "episode_limit"),
    (dict(substeps=0), "substeps"),
    (dict(thrust_scale=0.0), "thrust_scale"),
    (dict(collision_penalty=-1.0), "collision_penalty"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuadSwarm(**kwargs)


def test_bad_option_through_make():
    with pytest.raises(ValueError, match="quads-same-goal"):
        envs.make("quads-same-goal", not_an_option=1)
    with pytest.raises(ValueError, match="known ids"):
        envs.make("quads-nope")


def test_default_env_shift_still_lets_a_drone_hover():
    """thrust_scale 0.8 (envs.env_shift_kwargs): thrust-to-weight 1.52 > 1, so the scaled hover
    command holds altitude and full thrust climbs; the nominal hover command sinks."""
    scale = envs.env_shift_kwargs("quads-same-goal")["thrust_scale"]
    assert THRUST_TO_WEIGHT * scale > 1.4
    env = envs.make("quads-same-goal", n_agents=1, thrust_scale=scale, **QUIET)
    env.reset()
    cmd = 1.0 / (THRUST_TO_WEIGHT * scale)
    env.set_state(pos=(0.0, 0.0, 2.0), vel=0.0, omega=0.0, R=torch.eye(3), motor=cmd)
    for _ in range(100):
        env.step(torch.full((1, 1, 4), 2.0 * cmd - 1.0))
    assert abs(env.pos[0, 0, 2].item() - 2.0) < 1e-3 and env.vel.abs().max() < 1e-3
    for _ in range(50):
        env.step(torch.ones(1, 1, 4))
    assert env.vel[0, 0, 2] > 2.0  # climbs
    env.set_state(pos=(0.0, 0.0, 2.0), vel=0.0, omega=0.0, R=torch.eye(3), motor=HOVER_CMD)
    for _ in range(50):
        env.step(hover(env))
    assert env.vel[0, 0, 2].item() == pytest.approx(-0.2 * GRAV * 0.5, rel=0.05)
    # vel13: the controller assumes nominal thrust, so holding sinks at a steady ~0.5 m/s and
    # the +1 m/s set-point climbs at ~0.5 m/s
    disc = envs.make("quads-same-goal-discrete", n_agents=1, thrust_scale=scale, **QUIET)
    disc.reset()
    disc.set_state(pos=(0.0, 0.0, 5.0), vel=0.0, omega=0.0, R=torch.eye(3), motor=HOVER_CMD)
    for action, vz in ((0, -0.49), (11, 0.51)):
        for _ in range(40):
            disc.step(torch.tensor([[action]]))
        assert disc.vel[0, 0, 2].item() == pytest.approx(vz, abs=0.02)
