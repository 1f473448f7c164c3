"""envs API additions: environment shift, constructor validation, step before reset, null actions,
observation bounds."""

import math

import pytest
import torch

import envs
from envs.quads import FLOOR_Z, HOVER_ACTION

COOP = "lbf:Foraging-8x8-2p-2f-coop-v3"
SMALL = {
    "rendezvous": dict(n_agents=3, episode_limit=9),
    "rendezvous-discrete": dict(n_agents=3, episode_limit=9),
    "quads-same-goal": dict(n_agents=3, n_neighbors=2, episode_limit=9),
    "quads-swarm-vs-swarm": dict(n_agents=4, n_neighbors=2, episode_limit=9),
    "quads-same-goal-discrete": dict(n_agents=3, n_neighbors=2, episode_limit=9),
    "quads-swarm-vs-swarm-discrete": dict(n_agents=4, n_neighbors=2, episode_limit=9),
    COOP: dict(max_episode_steps=9),
}


def random_actions(env, gen):
    E, N = env.num_envs, env.n_agents
    if env.is_discrete:
        return torch.randint(0, env.n_actions, (E, N), generator=gen)
    return torch.rand(E, N, env.n_actions, generator=gen) * 2.0 - 1.0


def rollout(env_id, steps, num_envs=2, seed=5, **kw):
    """obs, state and reward of every step (spanning auto-resets) under fixed random actions."""
    env = envs.make(env_id, num_envs=num_envs, seed=seed, **kw)
    obs, state, _ = env.reset()
    out = [(obs, state)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        obs, state, _, reward, *_ = env.step(random_actions(env, gen))
        out.append((obs, state, reward))
    return out


def same(a, b):
    return all(torch.equal(x, y) for xa, xb in zip(a, b) for x, y in zip(xa, xb))


# --- environment shift -----------------------------------------------------------------------------

def test_env_shift_defaults():
    for env_id in ("quads-same-goal", "quads-swarm-vs-swarm", "quads-same-goal-discrete",
                   "quads-swarm-vs-swarm-discrete"):
        assert envs.env_shift_kwargs(env_id) == {"thrust_scale": 0.8}
    assert envs.env_shift_kwargs("rendezvous") == envs.env_shift_kwargs("rendezvous-discrete") == {"speed_scale": 0.7}
    assert envs.env_shift_kwargs(COOP) == {"slip_prob": 0.2}
    assert envs.env_shift_kwargs("smac:3m") == {"difficulty": "9"}
    for bad in ("nope", "lbf:", "smac:", "quads-nope", "", None):
        with pytest.raises(ValueError, match="no default environment shift") as e:
            envs.env_shift_kwargs(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("env_id", list(SMALL))
def test_env_shift_changes_the_trajectory(env_id):
    base = rollout(env_id, 9, **SMALL[env_id])
    shifted = rollout(env_id, 9, **SMALL[env_id], **envs.env_shift_kwargs(env_id))
    assert same(base[:1], shifted[:1])  # same start, different dynamics
    assert not same(base, shifted)


@pytest.mark.parametrize("env_id,neutral", [("rendezvous", dict(speed_scale=1.0)),
                                            ("rendezvous-discrete", dict(speed_scale=1.0)),
                                            ("quads-same-goal", dict(thrust_scale=1.0)),
                                            (COOP, dict(slip_prob=0.0))])
def test_neutral_shift_option_is_bit_identical(env_id, neutral):
    # 20 steps span two episodes (episode_limit 9)
    assert same(rollout(env_id, 20, **SMALL[env_id]), rollout(env_id, 20, **SMALL[env_id], **neutral))


# --- constructor validation ------------------------------------------------------------------------

BAD_OPTIONS = [
    ("rendezvous", dict(world_size=math.nan), "world_size"),
    ("rendezvous", dict(comm_radius=math.inf), "comm_radius"),
    ("rendezvous", dict(comm_radius=-1.0), "comm_radius"),
    ("rendezvous", dict(success_radius=0.0), "success_radius"),
    ("rendezvous", dict(speed_scale=0.0), "speed_scale"),
    ("rendezvous-discrete", dict(speed_scale=math.nan), "speed_scale"),
    ("rendezvous", dict(n_agents=2.7), "n_agents"),
    ("rendezvous", dict(n_agents=1), "n_agents"),
    ("rendezvous", dict(episode_limit=0), "episode_limit"),
    ("quads-same-goal", dict(thrust_scale=math.nan), "thrust_scale"),
    ("quads-same-goal", dict(proximity_penalty=math.inf), "proximity_penalty"),
    ("quads-same-goal-discrete", dict(thrust_scale=-0.5), "thrust_scale"),
    (COOP, dict(penalty=math.nan), "penalty"),
    (COOP, dict(slip_prob=1.5), "slip_prob"),
    (COOP, dict(slip_prob=math.nan), "slip_prob"),
    ("smac:3m", dict(reward_scale_rate=math.inf), "reward_scale_rate"),  # checked before SMAC is imported
]


@pytest.mark.parametrize("env_id,kwargs,match", BAD_OPTIONS)
def test_bad_option_values(env_id, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        envs.make(env_id, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("env_id", ["rendezvous", "quads-same-goal-discrete", COOP])
@pytest.mark.parametrize("kwargs,match", [(dict(seed=None), "seed must be an integer"),
                                          (dict(seed=2.5), "seed must be an integer"),
                                          (dict(seed=True), "seed must be an integer"),
                                          (dict(num_envs=2.7), "num_envs must be an integer"),
                                          (dict(num_envs=True), "num_envs must be an integer"),
                                          (dict(num_envs=0), "num_envs must be an integer >= 1")])
def test_bad_num_envs_and_seed(env_id, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        envs.make(env_id, **kwargs)
    assert "\n" not in str(e.value)


def test_numpy_integers_are_fine():
    np = pytest.importorskip("numpy")
    env = envs.make("rendezvous", num_envs=np.int64(2), seed=np.int32(3), n_agents=np.int64(3))
    assert env.num_envs == 2 and env.seed == 3 and env.n_agents == 3


@pytest.mark.parametrize("env_id,kwargs", [("rendezvous", dict(n_agents=100_000)),
                                           ("rendezvous", dict(num_envs=10**9)),
                                           ("quads-same-goal", dict(n_agents=100_000)),
                                           ("quads-swarm-vs-swarm-discrete", dict(n_agents=20_000, n_neighbors=-1)),
                                           (COOP, dict(num_envs=10**7))])
def test_too_large_for_memory_is_refused_with_the_estimate(env_id, kwargs):
    with pytest.raises(ValueError, match=r"would need about [0-9.e+]+ GiB of memory .*limit 8 GiB") as e:
        envs.make(env_id, **kwargs)
    assert "\n" not in str(e.value)


def test_memory_estimate_grows_with_n_squared(monkeypatch):
    # 100 agents: about 1 MB of pairwise tensors per env; a 0.5 MB limit refuses it, 50 agents pass
    monkeypatch.setattr(envs.core, "MAX_ENV_BYTES", 2**19)
    envs.make("rendezvous", n_agents=50)
    envs.make("quads-same-goal", n_agents=50)
    for env_id in ("rendezvous", "quads-same-goal"):
        with pytest.raises(ValueError, match="GiB of memory"):
            envs.make(env_id, n_agents=100)


@pytest.mark.parametrize("family,example", [("lbf:", "lbf:Foraging-8x8-2p-2f-coop-v3"), ("smac:", "smac:3m")])
def test_family_without_name(family, example):
    with pytest.raises(ValueError, match="needs a name after the colon") as e:
        envs.make(family)
    assert repr(example) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("env_id", list(SMALL))
def test_step_before_reset(env_id):
    env = envs.make(env_id, num_envs=2, **SMALL[env_id])
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match=r"call reset\(\) before step\(\)"):
        env.step(random_actions(env, gen))
    env.reset()
    env.step(random_actions(env, gen))


# --- null actions --------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id", list(SMALL))
def test_null_action_values(env_id):
    env = envs.make(env_id, num_envs=2, **SMALL[env_id])
    null = env.null_action()
    N = env.n_agents
    if env.is_discrete:
        assert null.dtype == torch.int64 and torch.equal(null, torch.zeros(N, dtype=torch.int64))
    elif env_id.startswith("quads"):
        assert null.dtype == torch.float32 and torch.equal(null, torch.full((N, 4), HOVER_ACTION))
    else:
        assert null.dtype == torch.float32 and torch.equal(null, torch.zeros(N, 2))
    env.reset()  # usable as a whole team's action
    env.step(null.expand(2, *null.shape).clone())


def test_quads_hover_null_action_holds_a_drone():
    env = envs.make("quads-same-goal", n_agents=2, sensor_noise=False, thrust_noise=False)
    env.reset()
    env.set_state(pos=torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 2.0]]), vel=0.0, omega=0.0, R=torch.eye(3),
                  motor=(HOVER_ACTION + 1) / 2)
    for _ in range(100):
        env.step(env.null_action().unsqueeze(0))
    assert env.vel.abs().max() < 1e-3 and (env.pos[..., 2] - 2.0).abs().max() < 1e-3


# --- observation bounds --------------------------------------------------------------------------

def assert_within(obs, bounds, tol=1e-4):
    low, high = bounds
    assert bool((obs >= low - tol * (1 + low.abs())).all()), (obs - low).min()
    assert bool((obs <= high + tol * (1 + high.abs())).all()), (high - obs).min()


@pytest.mark.parametrize("env_id", list(SMALL))
def test_obs_bounds_hold_on_random_rollouts(env_id):
    env = envs.make(env_id, num_envs=16, seed=2, **SMALL[env_id])
    bounds = env.obs_bounds()
    assert bounds is not None
    for b in bounds:
        assert b.shape == (env.obs_dim,) and b.dtype == torch.float32
    assert bool((bounds[0] <= bounds[1]).all())
    obs, *_ = env.reset()
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        assert_within(obs, bounds)
        obs, _, _, _, _, _, info = env.step(random_actions(env, gen))
        assert_within(info["final_obs"], bounds)


def test_rendezvous_obs_bounds_are_reached_in_the_corners():
    env = envs.make("rendezvous", n_agents=3)
    low, high = env.obs_bounds()
    assert high[0] == pytest.approx(math.sqrt(2) * 200 / 282) and low[0] == 0.0
    env.reset()
    env.pos[0] = torch.tensor([[0.0, 0.0], [200.0, 200.0], [0.0, 200.0]])
    obs, *_ = env.step(torch.zeros(1, 3, 2))
    assert_within(obs, (low, high), tol=1e-6)
    assert obs[0, 0, 0] == pytest.approx(high[0].item(), rel=1e-6)  # the diagonal is the largest distance
    assert obs[0, 0, 10] == 0.0  # in a corner: wall distance 0


def test_quads_obs_bounds_hold_in_a_tumbling_swarm():
    env = envs.make("quads-swarm-vs-swarm", num_envs=8, n_agents=6, n_neighbors=5, seed=4)
    low, high = env.obs_bounds()
    assert torch.isinf(low[3:6]).all() and torch.isinf(high[3:6]).all()  # own velocity: no bound
    assert torch.isfinite(low[:3]).all() and torch.isfinite(low[6:]).all()
    env.reset()
    gen = torch.Generator().manual_seed(0)
    # drones flung at the walls, ceiling and floor, spinning
    env.set_state(vel=(torch.rand(8, 6, 3, generator=gen) * 2 - 1) * 30.0,
                  omega=(torch.rand(8, 6, 3, generator=gen) * 2 - 1) * 40.0)
    for _ in range(300):
        obs, *_ = env.step(random_actions(env, gen))
        assert_within(obs, (low, high))
    # same goal: the position relative to (0, 0, 2) is bounded by the room
    lo, hi = envs.make("quads-same-goal", sensor_noise=False).obs_bounds()
    torch.testing.assert_close(lo[:3], torch.tensor([-5.0, -5.0, FLOOR_Z - 2.0]))
    torch.testing.assert_close(hi[:3], torch.tensor([5.0, 5.0, 8.0]))


def test_lbf_obs_bounds_are_the_gym_space():
    env = envs.make(COOP)
    low, high = env.obs_bounds()
    assert torch.equal(low, env.obs_low) and torch.equal(high, env.obs_high)
