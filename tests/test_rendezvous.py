"""Rendezvous physics, observation, reward and reference numbers of the authors' env."""

import math

import pytest
import torch

import envs
from envs.rendezvous import WHEEL_COMMANDS, scripted_actions


def place(env, pos, theta):
    """Put env 0's robots at given positions and headings."""
    env.pos[0] = torch.tensor(pos, dtype=torch.float32)
    env.theta[0] = torch.tensor(theta, dtype=torch.float32)


def test_dims_match_the_paper_setting():
    env = envs.make("rendezvous")
    assert (env.n_agents, env.obs_dim, env.state_dim, env.episode_limit) == (10, 50, 145, 200)
    assert env.action_space.shape == (2,)
    assert envs.make("rendezvous-discrete").action_space.n == len(WHEEL_COMMANDS)


def test_full_forward_and_pure_spin_closed_form():
    env = envs.make("rendezvous", n_agents=2)
    env.reset()
    place(env, [[50.0, 60.0], [120.0, 100.0]], [0.3, 2.0])
    env.step(torch.ones(1, 2, 2))
    # v = 2·7.5344 for 10 × 0.01 s, straight line
    step = 2 * 7.5344 * 0.1
    assert step == pytest.approx(1.507, abs=1e-3)
    expect = torch.tensor([[50 + step * math.cos(0.3), 60 + step * math.sin(0.3)],
                           [120 + step * math.cos(2.0), 100 + step * math.sin(2.0)]])
    torch.testing.assert_close(env.pos[0], expect, atol=1e-4, rtol=0)
    before_pos, before_theta = env.pos.clone(), env.theta.clone()
    env.step(torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]]))
    turn = 2 * 2.65062 * 0.1
    assert turn == pytest.approx(0.530, abs=1e-3)
    torch.testing.assert_close(env.pos, before_pos)
    torch.testing.assert_close(env.theta[0], torch.remainder(before_theta[0] + torch.tensor([turn, -turn]),
                                                             2 * math.pi), atol=1e-5, rtol=0)


def test_euler_arc_and_walls():
    env = envs.make("rendezvous", n_agents=2)
    env.reset()
    place(env, [[100.0, 100.0], [199.5, 50.0]], [0.0, 0.0])
    u = torch.tensor([[[0.2, 0.6], [1.0, 1.0]]])
    env.step(u)
    # agent 0: 10 explicit Euler sub-steps with the heading before each sub-step
    v, w = 7.5344 * 0.8, 2.65062 * 0.4
    x, y, th = 100.0, 100.0, 0.0
    for _ in range(10):
        x, y, th = x + v * math.cos(th) * 0.01, y + v * math.sin(th) * 0.01, th + w * 0.01
    torch.testing.assert_close(env.pos[0, 0], torch.tensor([x, y]), atol=1e-4, rtol=0)
    # agent 1 drives into the wall x = 200 and stops there
    assert env.pos[0, 1, 0] == 200.0


def test_reward_formula():
    env = envs.make("rendezvous", n_agents=3)
    env.reset()
    place(env, [[0.0, 0.0], [30.0, 40.0], [200.0, 200.0]], [0.0, 0.0, 0.0])
    u = torch.zeros(1, 3, 2)
    u[0, 0] = torch.tensor([0.5, -0.5])  # spin in place: no movement, some control cost
    _, _, _, reward, *_ = env.step(u)
    d = [50.0, 282.0, math.dist((30, 40), (200, 200))]  # the long pair is capped at R
    expect = -sum(min(x, 282.0) / 282.0 for x in d) / 3 - 0.001 * (0.25 + 0.25) / 6
    assert reward.item() == pytest.approx(expect, rel=1e-5)


def test_observation_layout():
    env = envs.make("rendezvous", n_agents=3)
    env.reset()
    place(env, [[100.0, 100.0], [110.0, 100.0], [100.0, 0.5]], [0.0, math.pi / 2, 0.0])
    obs, state, _ = env._observe()
    o = obs[0]
    # agent 0 sees agent 1 at distance 10 straight ahead (Φ_01 = 0); Φ_10 = π/2 − π = −π/2
    torch.testing.assert_close(o[0, :5], torch.tensor([10 / 282, 1.0, 0.0, 0.0, -1.0]), atol=1e-5, rtol=0)
    # agent 0, second block: agent 2 lies below, bearing -π/2, so Φ = π/2
    assert o[0, 5] == pytest.approx(99.5 / 282, rel=1e-5)
    assert o[0, 6] == pytest.approx(0.0, abs=1e-5) and o[0, 7] == pytest.approx(1.0, abs=1e-5)
    # wall features: agents 0, 1 far from walls; agent 2 is 0.5 from y = 0 (α = 3π/2, θ = 0)
    torch.testing.assert_close(o[0, 10:], torch.tensor([1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(o[2, 10:], torch.tensor([0.5, 0.0, -1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    # state: 3 pair distances (01, 02, 12), then Φ/π row-major
    torch.testing.assert_close(state[0, :3] * 282, torch.tensor([10.0, 99.5, math.hypot(10, 99.5)]),
                               atol=1e-3, rtol=0)
    assert state.shape[1] == 3 + 9 and state[0, 3 + 1] == pytest.approx(0.0, abs=1e-6)


def test_random_policy_return_matches_authors_env():
    torch.manual_seed(0)
    E = 64
    env = envs.make("rendezvous", num_envs=E, seed=2)
    env.reset()
    for _ in range(200):
        *_, terminated, truncated, info = env.step(torch.rand(E, 10, 2) * 2 - 1)
    assert truncated.all() and not terminated.any()
    mean_return = info["episode_return"].mean().item()
    # the authors' env gives about -67 with a uniform random policy
    assert -72 < mean_return < -62
    assert not info["success"].any()


@pytest.mark.parametrize("env_id", ["rendezvous", "rendezvous-discrete"])
def test_scripted_controller_gathers_the_swarm(env_id):
    E = 16
    env = envs.make(env_id, num_envs=E, seed=4)
    env.reset()
    returns, success = torch.zeros(E), torch.zeros(E, dtype=torch.bool)
    seen = torch.zeros(E, dtype=torch.bool)
    for _ in range(200):
        *_, terminated, truncated, info = env.step(scripted_actions(env))
        new = (terminated | truncated) & ~seen
        returns[new], success[new] = info["episode_return"][new], info["success"][new]
        seen |= new
    assert seen.all() and success.all()
    assert returns.mean() > -15  # far above the random policy's -67


def test_termination_when_gathered_and_still():
    env = envs.make("rendezvous", n_agents=3, num_envs=2)
    obs0, _, _ = env.reset()
    env.pos[0] = torch.tensor([[50.0, 50.0], [50.4, 50.0], [50.0, 50.4]])
    obs, state, _, _, terminated, truncated, info = env.step(torch.zeros(2, 3, 2))
    assert terminated.tolist() == [True, False] and not truncated.any()
    assert info["success"].tolist() == [True, False]
    assert info["episode_length"][0] == 1
    # env 0 was reset inside step: its returned obs begins a new episode, final_obs holds the end
    assert not torch.equal(obs[0], info["final_obs"][0])
    assert info["final_state"][0, :3].max() * 282 < 1.0
    assert env.t.tolist() == [0, 1]


@pytest.mark.parametrize("scale", [0.7, 1.3])
def test_speed_scale_scales_forward_speed_and_turn_rate(scale):
    env = envs.make("rendezvous", n_agents=2, speed_scale=scale)
    env.reset()
    place(env, [[50.0, 60.0], [120.0, 100.0]], [0.3, 2.0])
    env.step(torch.ones(1, 2, 2))
    step = scale * 2 * 7.5344 * 0.1  # weaker (or stronger) wheels: the same command goes less far
    expect = torch.tensor([[50 + step * math.cos(0.3), 60 + step * math.sin(0.3)],
                           [120 + step * math.cos(2.0), 100 + step * math.sin(2.0)]])
    torch.testing.assert_close(env.pos[0], expect, atol=1e-4, rtol=0)
    before = env.theta.clone()
    _, _, _, reward, *_ = env.step(torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]]))
    turn = scale * 2 * 2.65062 * 0.1
    torch.testing.assert_close(env.theta[0], torch.remainder(before[0] + torch.tensor([turn, -turn]), 2 * math.pi),
                               atol=1e-5, rtol=0)
    # the control cost is a function of the command, not of the wheel speed
    d = env.pairwise_distance()[0, 0, 1].item()
    assert reward.item() == pytest.approx(-d / 282 - 0.001, rel=1e-5)


def test_weaker_wheels_still_gather_the_swarm():
    """speed_scale 0.7 (the default env shift): the scripted controller still succeeds, at a lower return."""
    def run(**kw):
        E = 16
        env = envs.make("rendezvous", num_envs=E, seed=4, **kw)
        env.reset()
        returns, success = torch.zeros(E), torch.zeros(E, dtype=torch.bool)
        seen = torch.zeros(E, dtype=torch.bool)
        for _ in range(200):  # the first episode of every env
            *_, terminated, truncated, info = env.step(scripted_actions(env))
            new = (terminated | truncated) & ~seen
            returns[new], success[new] = info["episode_return"][new], info["success"][new]
            seen |= new
        assert seen.all()
        return returns.mean().item(), success.float().mean().item()

    (r_base, s_base), (r_weak, s_weak) = run(), run(**envs.env_shift_kwargs("rendezvous"))
    assert s_base == 1.0 and s_weak == 1.0
    assert r_weak < r_base - 1.0
