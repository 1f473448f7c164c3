"""The batched env contract (envs.BatchedEnv), checked on every env id of the package (SMAC only where installed)."""

import gymnasium as gym
import pytest
import torch

import envs

# small, fast variants of each id
ENV_CASES = {
    "rendezvous": dict(n_agents=3, episode_limit=7),
    "rendezvous-discrete": dict(n_agents=3, episode_limit=7),
    "quads-same-goal": dict(n_agents=3, n_neighbors=2, episode_limit=7),
    "quads-swarm-vs-swarm": dict(n_agents=4, n_neighbors=2, episode_limit=7),
    "quads-same-goal-discrete": dict(n_agents=3, n_neighbors=2, episode_limit=7),
    "quads-swarm-vs-swarm-discrete": dict(n_agents=4, n_neighbors=2, episode_limit=7),
    "lbf:Foraging-8x8-2p-2f-coop-v3": dict(),
}


def random_actions(env, gen):
    E, N = env.num_envs, env.n_agents
    if env.is_discrete:
        return torch.randint(0, env.n_actions, (E, N), generator=gen)
    low = torch.as_tensor(env.action_space.low)
    high = torch.as_tensor(env.action_space.high)
    return low + (high - low) * torch.rand(E, N, env.n_actions, generator=gen)


def rollout(env, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = [env.reset()]
    for _ in range(steps):
        out.append(env.step(random_actions(env, gen)))
    return out


@pytest.mark.parametrize("env_id", list(ENV_CASES))
def test_conformance(env_id):
    E = 3
    env = envs.make(env_id, num_envs=E, seed=3, **ENV_CASES[env_id])
    N, A = env.n_agents, env.n_actions
    assert isinstance(env.action_space, (gym.spaces.Discrete, gym.spaces.Box))
    obs, state, avail = env.reset()
    assert obs.shape == (E, N, env.obs_dim) and obs.dtype == torch.float32
    assert state.shape == (E, env.state_dim) and state.dtype == torch.float32
    assert avail.shape == (E, N, A) and avail.dtype == torch.bool
    assert avail.any(-1).all()
    gen = torch.Generator().manual_seed(0)
    finished = 0
    for _ in range(2 * env.episode_limit + 2):
        obs, state, avail, reward, terminated, truncated, info = env.step(random_actions(env, gen))
        assert obs.shape == (E, N, env.obs_dim) and obs.dtype == torch.float32
        assert state.shape == (E, env.state_dim) and avail.shape == (E, N, A)
        assert reward.shape == (E,) and reward.dtype == torch.float32
        assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
        assert not (terminated & truncated).any()
        for x in (obs, state, reward, info["final_obs"], info["final_state"]):
            assert torch.isfinite(x).all()
        done = terminated | truncated
        assert info["final_obs"].shape == obs.shape and info["final_state"].shape == state.shape
        assert info["success"].shape == (E,) and info["success"].dtype == torch.bool
        assert not (info["success"] & ~done).any()
        # envs that did not finish: final_obs is the returned obs
        assert torch.equal(info["final_obs"][~done], obs[~done])
        # truncation happens exactly at the time limit
        assert (info["episode_length"][truncated] == env.episode_limit).all()
        assert (info["episode_length"] <= env.episode_limit).all()
        finished += int(done.sum())
    assert finished >= E
    env.close()


@pytest.mark.parametrize("env_id", list(ENV_CASES))
def test_determinism_and_batch_independence(env_id):
    kw = ENV_CASES[env_id]
    a = rollout(envs.make(env_id, num_envs=1, seed=11, **kw), 12)
    b = rollout(envs.make(env_id, num_envs=1, seed=11, **kw), 12)
    for xa, xb in zip(a, b):
        for ta, tb in zip(xa[:5], xb[:5]):
            assert torch.equal(ta, tb)
    # env 0 of a batch of 4 equals a batch of 1 when it gets the same actions
    single = envs.make(env_id, num_envs=1, seed=11, **kw)
    batch = envs.make(env_id, num_envs=4, seed=11, **kw)
    o1, s1, _ = single.reset()
    o4, s4, _ = batch.reset()
    assert torch.equal(o1[0], o4[0]) and torch.equal(s1[0], s4[0])
    gen = torch.Generator().manual_seed(5)
    for _ in range(2 * single.episode_limit + 1):
        act4 = random_actions(batch, gen)
        r1 = single.step(act4[:1].clone())
        r4 = batch.step(act4)
        for x1, x4 in zip(r1[:5], r4[:5]):
            assert torch.equal(x1[0], x4[0])
    # a different seed gives a different start
    other = envs.make(env_id, num_envs=1, seed=12, **kw).reset()[1]
    assert not torch.equal(other, s1)


def test_unknown_env_id_lists_known_ids():
    with pytest.raises(ValueError, match="unknown env id 'nope'.*rendezvous"):
        envs.make("nope")
    with pytest.raises(ValueError, match="unknown env id"):
        envs.make("nofamily:x")


def test_bad_env_option():
    with pytest.raises(ValueError, match="bad option"):
        envs.make("rendezvous", n_robots=3)
    with pytest.raises(ValueError, match="num_envs"):
        envs.make("rendezvous", num_envs=0)


@pytest.mark.parametrize("env_id", ["rendezvous", "rendezvous-discrete"])
def test_bad_actions(env_id):
    env = envs.make(env_id, num_envs=2, n_agents=3)
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(torch.zeros(2, 4, 2) if not env.is_discrete else torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError):
        env.step([[0, 0, 0], [0, 0, 0]])
    if env.is_discrete:
        with pytest.raises(ValueError, match="int64"):
            env.step(torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"\[0, 7\)"):
            env.step(torch.full((2, 3), 7, dtype=torch.int64))
    else:
        with pytest.raises(ValueError, match="NaN"):
            env.step(torch.full((2, 3, 2), float("nan")))
        with pytest.raises(ValueError, match="float"):
            env.step(torch.zeros(2, 3, 2, dtype=torch.int64))


def test_register_custom_env():
    from envs.rendezvous import Rendezvous

    envs.register("test-tiny", lambda **kw: Rendezvous(n_agents=2, **kw))
    env = envs.make("test-tiny", num_envs=2, seed=0)
    assert env.n_agents == 2 and env.reset()[0].shape == (2, 2, 10)
    assert "test-tiny" in envs.registered_ids()
    with pytest.raises(TypeError):
        envs.register("bad", 3)
