"""smax:<map> (envs/smax.py): JaxMARL's SMAX, StarCraft-like micromanagement without StarCraft II.

- The install error is checked everywhere (JaxMARL hidden with monkeypatch).
- Everything else needs ``pip install -r requirements-smax.txt`` and skips without it, with that
  command as the reason. JAX runs on the CPU with one thread. Every test uses batches of at most 4
  envs, which share one compiled step per map: two compilations in all (15-30 s each), made
  once by the module fixture ``compiled``, in parallel.
"""

import os

# Before JAX is first imported (pytest imports every test module before running any test): the CPU,
# one thread, and less LLVM optimisation, which halves the compile time (about 25 s -> 12 s a map)
# for steps that take about twice as long (microseconds here).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()

import sys  # noqa: E402
import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import envs  # noqa: E402
import test_env_api as api  # noqa: E402  (the conformance checks every env id passes)
from envs.smax import EXTRA_MAPS, SMAX_INSTALL_HINT, STOP, SMAXNotInstalledError, smax_available  # noqa: E402

INSTALL = "pip install -r requirements-smax.txt"


@pytest.fixture(scope="module")
def compiled():
    """Compile the step of both maps once per module, in two threads (XLA compiles without the GIL):
    every later env of these maps with at most 4 envs reuses it."""
    first = [envs.make(env_id, num_envs=4, seed=0) for env_id in ("smax:3m", "smax:4m_vs_3m")]
    threads = [threading.Thread(target=env.reset) for env in first]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return first


def needs_smax(test):
    """Skip with the install command where JaxMARL is missing; otherwise compile first."""
    return pytest.mark.skipif(not smax_available(), reason=SMAX_INSTALL_HINT)(pytest.mark.usefixtures("compiled")(test))
UNIT = 10  # state features per unit: health, x, y, cooldown, 6 unit-type bits


# --- install error ------------------------------------------------------------------------------
def test_install_hint_gives_the_command():
    assert INSTALL in SMAX_INSTALL_HINT


@pytest.mark.parametrize("hidden", ["jaxmarl", "jax"])
def test_make_without_jaxmarl_raises_install_error(monkeypatch, hidden):
    for name in [m for m in sys.modules if m == hidden or m.startswith(hidden + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(ImportError) as e:
        envs.make("smax:3m", num_envs=1, seed=0)
    assert isinstance(e.value, SMAXNotInstalledError)
    assert INSTALL in str(e.value) and "\n" not in str(e.value)
    assert not smax_available()


# --- a scripted team --------------------------------------------------------------------------
def focus_fire(env, obs, avail):
    """Every ally attacks the weakest enemy it can hit; otherwise it walks towards the enemies it sees
    (east, towards the enemy's side, when it sees none). Dead units stop."""
    N, M = env.n_agents, env.n_enemies
    enemies = obs[..., (N - 1) * 13:(N - 1 + M) * 13].reshape(*obs.shape[:2], M, 13)
    health, offset = enemies[..., 0], enemies[..., 1:3]  # zeros when out of sight or dead
    can_attack = avail[..., 5:5 + M]
    target = torch.where(can_attack, health, torch.inf).argmin(-1)
    seen = health > 0
    toward = torch.where(seen.any(-1, keepdim=True), (offset * seen[..., None]).sum(-2), torch.tensor([1.0, 0.0]))
    dx, dy = toward.unbind(-1)
    move = torch.where(dx.abs() >= dy.abs(), torch.where(dx >= 0, 1, 3), torch.where(dy >= 0, 0, 2))
    act = torch.where(can_attack.any(-1), 5 + target, move)
    return torch.where(avail.gather(-1, act.unsqueeze(-1)).squeeze(-1), act, STOP)


def random_policy(gen):
    def act(env, obs, avail):
        return torch.multinomial(avail.reshape(-1, env.n_actions).float(), 1, generator=gen).view(avail.shape[:2])
    return act


def play(env, policy, episodes_per_env):
    """Run ``policy`` until every env has finished ``episodes_per_env`` episodes; returns the finished
    episodes' (terminated, truncated, success, final_state, reward, dead_enemies, length), stacked."""
    obs, _, avail = env.reset()
    count = torch.zeros(env.num_envs, dtype=torch.int64)
    ends = []
    while bool((count < episodes_per_env).any()):
        obs, _, avail, reward, term, trunc, info = env.step(policy(env, obs, avail))
        take = (term | trunc) & (count < episodes_per_env)
        count += take.long()
        ends.append((term[take].clone(), trunc[take].clone(), info["success"][take].clone(),
                     info["final_state"][take].clone(), reward[take].clone(), info["dead_enemies"][take].clone(),
                     info["episode_length"][take].clone()))
    return [torch.cat(x) for x in zip(*ends)]


@pytest.fixture(scope="module")
def env4v3(compiled):
    """4 envs of 4m_vs_3m, seed 0."""
    return compiled[1]


# --- the env contract -----------------------------------------------------------------------------
@needs_smax
@pytest.mark.parametrize("env_id", ["smax:3m", "smax:4m_vs_3m"])
def test_shared_conformance(monkeypatch, env_id):
    monkeypatch.setitem(api.ENV_CASES, env_id, {})
    api.test_conformance(env_id)
    api.test_determinism_and_batch_independence(env_id)


@needs_smax
def test_sizes_bounds_and_maps(env4v3):
    from envs.smax import smax_maps

    env = envs.make("smax:3m", num_envs=1, seed=0)
    assert (env.n_agents, env.n_enemies, env.obs_dim, env.state_dim, env.n_actions, env.episode_limit) == \
        (3, 3, 75, 72, 8, 100)
    assert (env4v3.n_agents, env4v3.n_enemies, env4v3.obs_dim, env4v3.state_dim, env4v3.n_actions) == (4, 3, 88, 84, 8)
    low, high = env4v3.obs_bounds()
    assert low.shape == (88,) and bool((low == -1).all()) and bool((high == 1).all())
    obs, state, avail = env4v3.reset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        assert -1 <= obs.min() and obs.max() <= 1 and 0 <= state.min() and state.max() <= 1
        assert bool(avail[..., STOP].all())  # stop is always available, so it is the null action
        obs, state, avail, *_ = env4v3.step(random_policy(gen)(env4v3, obs, avail))
    assert env4v3.null_action().tolist() == [STOP] * 4
    maps = smax_maps()
    assert {"3m", "8m", "2s3z", "3s5z", "5m_vs_6m", "27m_vs_30m", "6h_vs_8z", "smacv2_5_units"} <= set(maps)
    assert set(EXTRA_MAPS) <= set(maps)
    with pytest.raises(ValueError, match="unknown SMAX map 'nope'; known maps: .*4m_vs_3m"):
        envs.make("smax:nope")


@needs_smax
def test_outputs_share_memory_with_jax(env4v3):
    obs, state, avail = env4v3.reset()
    assert obs.data_ptr() == env4v3._out[0].unsafe_buffer_pointer()  # DLPack, no copy
    assert state.data_ptr() == env4v3._out[1].unsafe_buffer_pointer()


# --- battles --------------------------------------------------------------------------------------
@needs_smax
def test_focus_fire_beats_random_on_4m_vs_3m(env4v3):
    rates = {}
    for name, policy in (("focus", focus_fire), ("random", random_policy(torch.Generator().manual_seed(0)))):
        env = envs.make("smax:4m_vs_3m", num_envs=4, seed=1)
        term, trunc, success, *_ = play(env, policy, 6)  # 24 episodes
        rates[name] = success.float().mean().item()
    # measured: focus fire 1.00, random 0.00 (seeds 0-4: every one the same)
    assert rates["focus"] >= 0.8 and rates["random"] <= 0.2, rates


@needs_smax
def test_success_means_a_won_battle(env4v3):
    N, M = env4v3.n_agents, env4v3.n_enemies
    for policy in (focus_fire, random_policy(torch.Generator().manual_seed(1))):
        term, trunc, success, final_state, reward, dead_enemies, _ = play(env4v3, policy, 4)
        # both kinds of ending occur: focus fire wins, random play loses
        assert bool(success.any()) if policy is focus_fire else bool((term & ~success).any())
        health = final_state[:, :(N + M) * UNIT:UNIT]
        won = (health[:, N:] == 0).all(-1) & (health[:, :N] > 0).any(-1)
        assert torch.equal(success, won & term)  # read from the units, on the final state
        assert not bool((success & trunc).any())
        assert bool((dead_enemies[success] == M).all())
        assert bool((reward[success] >= 1.0).all())  # the win bonus arrives with the last reward


@needs_smax
def test_truncation_at_the_limit():
    env = envs.make("smax:3m", num_envs=4, seed=2, episode_limit=3)  # units start 16 apart: no shot yet
    assert env._c is envs.make("smax:3m", num_envs=1)._c  # the limit is an input of the compiled step
    _, state0, _ = env.reset()
    stop = torch.full((4, 3), STOP, dtype=torch.int64)
    for t in (1, 2, 3):
        obs, state, avail, reward, term, trunc, info = env.step(stop)
        assert term.tolist() == [False] * 4 and trunc.tolist() == [t == 3] * 4
    assert not bool(info["success"].any()) and info["episode_length"].tolist() == [3] * 4
    assert env.t.tolist() == [0] * 4 and not torch.equal(info["final_state"], state)
    assert not torch.equal(state, state0)  # the next episode starts somewhere else


@needs_smax
def test_unavailable_action_is_stop_and_slip_prob():
    a = envs.make("smax:3m", num_envs=4, seed=3)
    b = envs.make("smax:3m", num_envs=4, seed=3)
    a.reset(), b.reset()
    attack = torch.full((4, 3), 5, dtype=torch.int64)  # enemy 0 is out of range at the start
    stop = torch.full((4, 3), STOP, dtype=torch.int64)
    for _ in range(2):
        ra, rb = a.step(attack), b.step(stop)
        assert all(torch.equal(x, y) for x, y in zip(ra[:6], rb[:6]))
    # the environment shift: every order ignored (slip 1) is every unit stopping
    assert envs.env_shift_kwargs("smax:3m") == {"slip_prob": 0.2}
    gen = torch.Generator().manual_seed(0)
    slip = envs.make("smax:3m", num_envs=4, seed=4, slip_prob=1.0)
    still = envs.make("smax:3m", num_envs=4, seed=4)
    some = envs.make("smax:3m", num_envs=4, seed=4, **envs.env_shift_kwargs("smax:3m"))
    plain = envs.make("smax:3m", num_envs=4, seed=4)
    starts = [e.reset() for e in (slip, still, some, plain)]
    assert all(torch.equal(s[1], starts[0][1]) for s in starts)
    differ = False
    for _ in range(8):
        acts = torch.randint(0, 8, (4, 3), generator=gen)
        assert torch.equal(slip.step(acts)[1], still.step(stop)[1])
        differ |= not torch.equal(some.step(acts)[1], plain.step(acts)[1])
    assert differ


@needs_smax
def test_bad_input():
    with pytest.raises(ValueError, match="episode_limit"):
        envs.make("smax:3m", episode_limit=0)
    with pytest.raises(ValueError, match="slip_prob"):
        envs.make("smax:3m", slip_prob=1.5)
    with pytest.raises(ValueError, match="attack_mode"):
        envs.make("smax:3m", attack_mode="nearest")
    with pytest.raises(ValueError, match="'max_steps' is set by the adapter"):
        envs.make("smax:3m", max_steps=5)
    with pytest.raises(ValueError, match="bad option"):
        envs.make("smax:3m", not_a_smax_option=1)
    with pytest.raises(ValueError, match="memory"):
        envs.make("smax:27m_vs_30m", num_envs=10**7)
    with pytest.raises(ValueError, match="needs a name"):
        envs.make("smax:")
    env = envs.make("smax:3m", num_envs=2, seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(torch.zeros(2, 3, dtype=torch.int64))
    env.reset()
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        env.step(torch.full((2, 3), 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        env.step(torch.zeros(2, 3, dtype=torch.int32))
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(ValueError, match="CUDA build of jaxlib"):
            envs.make("smax:3m", device="cuda")
