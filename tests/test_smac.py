"""SMAC adapter (envs/smac.py).

- The install error is checked everywhere (SMAC hidden with monkeypatch).
- The adapter's own logic (time limit -> truncation, win -> success, avail checks, seeding,
  close) runs against a small stand-in for ``smac.env.StarCraft2Env`` with SMAC's interface.
- The real-StarCraft tests run where SMAC, StarCraft II and the maps are installed and skip
  with ``SMAC_INSTALL_HINT`` elsewhere.
"""

import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from envs.smac import SMAC_INSTALL_HINT, SMACNotInstalledError, smac_available


def _hide_smac(monkeypatch):
    for name in [m for m in sys.modules if m == "smac" or m.startswith("smac.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "smac", None)


def _assert_install_message(msg):
    assert "pip install git+https://github.com/oxwhirl/smac.git" in msg
    assert "pip install smac" in msg and "SMAC3" in msg  # the wrong package is named
    assert "SC2PATH" in msg and "~/StarCraftII" in msg and "s2client-proto" in msg
    assert "$SC2PATH/Maps/" in msg


# --- install errors -----------------------------------------------------------------------------
def test_install_hint_says_how_to_install():
    _assert_install_message(SMAC_INSTALL_HINT)


def test_make_without_smac_raises_install_error(monkeypatch):
    _hide_smac(monkeypatch)
    with pytest.raises(ImportError) as e:
        envs.make("smac:3m", num_envs=1, seed=0)
    assert isinstance(e.value, SMACNotInstalledError)
    assert "SMAC is not installed" in str(e.value)
    _assert_install_message(str(e.value))
    assert not smac_available()


def test_make_with_smac3_installed_names_the_wrong_package(monkeypatch):
    _hide_smac(monkeypatch)
    smac3 = types.ModuleType("smac")  # SMAC3 (hyperparameter optimisation) has no smac.env
    smac3.__version__ = "2.3.0"
    monkeypatch.setitem(sys.modules, "smac", smac3)
    with pytest.raises(SMACNotInstalledError) as e:
        envs.make("smac:3m")
    assert "pip uninstall smac" in str(e.value)
    _assert_install_message(str(e.value))


def test_missing_dependency_is_named(monkeypatch, tmp_path):
    _hide_smac(monkeypatch)
    monkeypatch.delitem(sys.modules, "smac")
    (tmp_path / "smac" / "env").mkdir(parents=True)  # a SMAC install whose pysc2 is missing
    (tmp_path / "smac" / "__init__.py").write_text("")
    (tmp_path / "smac" / "env" / "__init__.py").write_text("import pysc2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "pysc2", None)
    with pytest.raises(SMACNotInstalledError, match="dependency 'pysc2' is missing") as e:
        envs.make("smac:3m")
    _assert_install_message(str(e.value))


def test_make_smac_here_raises_install_error_unless_installed():
    if smac_available("3m"):
        pytest.skip("SMAC, StarCraft II and the 3m map are installed here")
    with pytest.raises(SMACNotInstalledError) as e:
        envs.make("smac:3m")
    _assert_install_message(str(e.value))


# --- a stand-in with SMAC's StarCraft2Env interface ---------------------------------------------
class _Unit:
    def __init__(self, health):
        self.health = health


class FakeStarCraft2Env:
    """3 allies vs 3 enemies with 2 hit points each. Attacking enemy j (action 6 + j) removes one
    hit point; an ally that chooses "stop" (action 1) dies. Battle won when all enemies are dead,
    lost when all allies are dead, time limit like SMAC's (terminated=True, timeouts += 1)."""

    registry = {"3m": {"n_agents": 3, "n_enemies": 3, "limit": 6, "a_race": "T", "b_race": "T",
                       "unit_type_bits": 0, "map_type": "marines"}}  # SMAC's 3m has limit 60
    instances = []

    def __init__(self, map_name="8m", seed=None, difficulty="7", protocol_error_at=None):
        params = self.registry[map_name]  # KeyError for unknown maps, like SMAC
        self.n_agents, self.n_enemies, self.episode_limit = (params[k] for k in ("n_agents", "n_enemies", "limit"))
        self.n_actions = 6 + self.n_enemies
        self.seed_arg, self.difficulty, self.closed = seed, difficulty, False
        self.protocol_error_at = protocol_error_at
        self.timeouts = 0
        self.resets = 0
        self.agents, self.enemies = {}, {}
        FakeStarCraft2Env.instances.append(self)

    def get_env_info(self):
        return {"state_shape": self.n_enemies + self.n_agents + 1, "obs_shape": 2 + self.n_enemies,
                "n_actions": self.n_actions, "n_agents": self.n_agents, "episode_limit": self.episode_limit}

    def reset(self):
        self.resets += 1
        self._episode_steps = 0
        self.agents = {i: _Unit(1) for i in range(self.n_agents)}
        self.enemies = {j: _Unit(2) for j in range(self.n_enemies)}
        return self.get_obs(), self.get_state()

    def get_avail_agent_actions(self, i):
        if self.agents[i].health == 0:
            return [1] + [0] * (self.n_actions - 1)
        return [0, 1, 1, 1, 1, 1] + [int(u.health > 0) for u in self.enemies.values()]

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(i) for i in range(self.n_agents)]

    def get_obs(self):
        hp = [u.health / 2 for u in self.enemies.values()]
        return [np.array([float(self.agents[i].health > 0), self._episode_steps / 10, *hp], np.float32)
                * (self.agents[i].health > 0) for i in range(self.n_agents)]

    def get_state(self):
        return np.array([u.health for u in self.enemies.values()] + [u.health for u in self.agents.values()]
                        + [self._episode_steps], dtype=np.float32)

    def step(self, actions):
        actions = [int(a) for a in actions]
        for i, a in enumerate(actions):
            assert self.get_avail_agent_actions(i)[a] == 1, f"Agent {i} cannot perform action {a}"
        self._episode_steps += 1
        if self.protocol_error_at == self._episode_steps:
            return 0, True, {}
        reward = 0.0
        for i, a in enumerate(actions):
            if a == 1:
                self.agents[i].health = 0
            elif a >= 6 and self.enemies[a - 6].health > 0:
                self.enemies[a - 6].health -= 1
                reward += 1.0
        info = {"battle_won": False,
                "dead_allies": sum(u.health == 0 for u in self.agents.values()),
                "dead_enemies": sum(u.health == 0 for u in self.enemies.values())}
        if all(u.health == 0 for u in self.enemies.values()):
            info["battle_won"] = True
            return reward + 10.0, True, info
        if all(u.health == 0 for u in self.agents.values()):
            return reward, True, info
        if self._episode_steps >= self.episode_limit:
            self.timeouts += 1
            return reward, True, info
        return reward, False, info

    def close(self):
        self.closed = True


@pytest.fixture
def fake_smac(monkeypatch, tmp_path):
    _hide_smac(monkeypatch)
    smac_pkg = types.ModuleType("smac")
    smac_pkg.__path__ = []
    smac_env = types.ModuleType("smac.env")
    smac_env.StarCraft2Env = FakeStarCraft2Env
    smac_env.__path__ = []
    sc2 = types.ModuleType("smac.env.starcraft2")
    sc2.__path__ = []
    maps = types.ModuleType("smac.env.starcraft2.maps")
    maps.__path__ = []
    smac_maps = types.ModuleType("smac.env.starcraft2.maps.smac_maps")
    smac_maps.SMACMap = type("SMACMap", (), {"directory": "SMAC_Maps"})
    FakeStarCraft2Env.registry = {k: v for k, v in FakeStarCraft2Env.registry.items() if k == "3m"}
    smac_maps.map_param_registry = FakeStarCraft2Env.registry
    smac_maps.get_smac_map_registry = lambda: smac_maps.map_param_registry
    maps.smac_maps = smac_maps
    for name, mod in [("smac", smac_pkg), ("smac.env", smac_env), ("smac.env.starcraft2", sc2),
                      ("smac.env.starcraft2.maps", maps), ("smac.env.starcraft2.maps.smac_maps", smac_maps)]:
        monkeypatch.setitem(sys.modules, name, mod)
    (tmp_path / "Versions" / "Base75689").mkdir(parents=True)
    (tmp_path / "Maps" / "SMAC_Maps").mkdir(parents=True)
    (tmp_path / "Maps" / "SMAC_Maps" / "3m.SC2Map").write_bytes(b"")
    monkeypatch.setenv("SC2PATH", str(tmp_path))
    FakeStarCraft2Env.instances = []
    return tmp_path


STOP, ATTACK = 1, 6


def _acts(env, fill):
    return torch.full((env.num_envs, env.n_agents), fill, dtype=torch.int64)


def test_fake_conformance_and_seeding(fake_smac):
    env = envs.make("smac:3m", num_envs=3, seed=10, difficulty="5")
    assert [e.seed_arg for e in FakeStarCraft2Env.instances] == [10, 11, 12]
    assert all(e.difficulty == "5" for e in FakeStarCraft2Env.instances)
    assert (env.n_agents, env.obs_dim, env.state_dim, env.episode_limit) == (3, 5, 7, 6)
    assert isinstance(env.action_space, gym.spaces.Discrete) and env.n_actions == 9
    obs, state, avail = env.reset()
    assert obs.shape == (3, 3, 5) and obs.dtype == torch.float32
    assert state.shape == (3, 7) and state.dtype == torch.float32
    assert avail.shape == (3, 3, 9) and avail.dtype == torch.bool
    assert avail[0, 0].tolist() == [False] + [True] * 8
    # env 0 attacks enemy 0, env 1 moves, env 2: agent 0 stops (dies)
    acts = torch.tensor([[6, 6, 6], [2, 3, 4], [1, 2, 2]])
    obs, state, avail, reward, term, trunc, info = env.step(acts)
    assert reward.tolist() == [2.0, 0.0, 0.0] and reward.dtype == torch.float32
    assert avail[0, 0, 6].item() is False  # enemy 0 dead in env 0
    assert avail[2, 0].tolist() == [True] + [False] * 8  # dead agent: only no-op
    assert obs[2, 0].abs().sum() == 0
    assert info["dead_allies"].tolist() == [0, 0, 1] and info["dead_enemies"].tolist() == [1, 0, 0]
    assert not bool((term | trunc).any())
    env.close()
    assert all(e.closed for e in FakeStarCraft2Env.instances)


def test_fake_win_is_terminated_with_success(fake_smac):
    env = envs.make("smac:3m", num_envs=2, seed=0)
    env.reset()
    # each agent attacks its own enemy: all enemies have 2 hit points, so won after 2 steps
    spread = torch.tensor([[6, 7, 8], [2, 2, 2]])
    env.step(spread)
    obs, state, avail, reward, term, trunc, info = env.step(spread)
    assert term.tolist() == [True, False] and trunc.tolist() == [False, False]
    assert info["success"].tolist() == [True, False] and info["battle_won"].tolist() == [True, False]
    assert info["episode_return"][0].item() == pytest.approx(16.0)
    assert info["episode_length"][0].item() == 2
    assert info["final_state"][0, :3].tolist() == [0, 0, 0]  # last state: all enemies dead
    assert state[0, :3].tolist() == [2, 2, 2]  # reset: next episode
    assert FakeStarCraft2Env.instances[0].resets == 2 and FakeStarCraft2Env.instances[1].resets == 1


def test_fake_time_limit_is_truncation(fake_smac):
    env = envs.make("smac:3m", num_envs=2, seed=0)
    env.reset()
    for t in range(1, 7):
        obs, state, avail, reward, term, trunc, info = env.step(_acts(env, 2))
        assert not bool(term.any())
        assert bool(trunc.all()) == (t == 6)
    assert not bool(info["success"].any())
    assert info["episode_length"].tolist() == [6, 6]
    assert info["final_state"][:, -1].tolist() == [6, 6] and state[:, -1].tolist() == [0, 0]
    assert env.t.tolist() == [0, 0]


def test_fake_loss_is_termination_even_at_the_limit(fake_smac):
    env = envs.make("smac:3m", num_envs=2, seed=0)
    env.reset()
    for _ in range(5):
        env.step(_acts(env, 2))
    # step 6 = episode_limit: env 0 loses (all allies stop and die), env 1 times out
    acts = torch.tensor([[1, 1, 1], [2, 2, 2]])
    *_, term, trunc, info = env.step(acts)
    assert term.tolist() == [True, False] and trunc.tolist() == [False, True]
    assert not bool(info["success"].any()) and info["dead_allies"].tolist() == [3, 0]
    # an early loss
    *_, term, trunc, info = env.step(acts)
    assert term.tolist() == [True, False] and info["episode_length"][0].item() == 1


def test_fake_protocol_error_truncates_episode(fake_smac):
    env = envs.make("smac:3m", num_envs=1, seed=0, protocol_error_at=2)
    env.reset()
    env.step(_acts(env, 2))
    *_, term, trunc, info = env.step(_acts(env, 2))
    # a crashed game is no terminal state of the task: bootstrap through it
    assert term.tolist() == [False] and trunc.tolist() == [True] and not info["success"].item()


def test_fake_bad_input(fake_smac):
    env = envs.make("smac:3m", num_envs=2, seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_acts(env, 2))
    env.reset()
    with pytest.raises(ValueError, match="unavailable SMAC action: env 0 agent 0 chose 0"):
        env.step(_acts(env, 0))  # no-op is for dead agents only
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        env.step(_acts(env, 9))
    with pytest.raises(ValueError, match="int64"):
        env.step(_acts(env, 2).int())
    assert env.t.tolist() == [0, 0]
    with pytest.raises(ValueError, match="unknown SMAC map 'nope'; known maps: .*3m.*4m_vs_3m"):
        envs.make("smac:nope")
    with pytest.raises(ValueError, match="unexpected keyword"):
        envs.make("smac:3m", not_a_smac_option=1)  # StarCraft2Env rejects it


def test_fake_mir3_traitor_maps_are_registered(fake_smac):
    from envs.smac import _EXTRA_MAP_CLASSES, EXTRA_MAPS

    (fake_smac / "Maps" / "SMAC_Maps" / "4m_vs_3m.SC2Map").write_bytes(b"")
    env = envs.make("smac:4m_vs_3m", num_envs=1, seed=0)
    assert (env.n_agents, env.n_actions, env.episode_limit) == (4, 9, 60)
    assert set(EXTRA_MAPS) <= set(FakeStarCraft2Env.registry)
    assert _EXTRA_MAP_CLASSES["4m_vs_3m"].filename == "4m_vs_3m"
    with pytest.raises(SMACNotInstalledError, match="9m_vs_8m.SC2Map.*MIR3"):
        envs.make("smac:9m_vs_8m")


def test_fake_missing_game_files(fake_smac, monkeypatch, tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("the early game-file check is Linux-only")
    (fake_smac / "Maps" / "SMAC_Maps" / "3m.SC2Map").unlink()
    with pytest.raises(SMACNotInstalledError, match="3m.SC2Map"):
        envs.make("smac:3m")
    empty = tmp_path / "nothing_here"
    monkeypatch.setenv("SC2PATH", str(empty))
    with pytest.raises(SMACNotInstalledError) as e:
        envs.make("smac:3m")
    assert "StarCraft II not found" in str(e.value) and str(empty) in str(e.value)
    _assert_install_message(str(e.value))


# --- real SMAC + StarCraft II -------------------------------------------------------------------
@pytest.fixture
def real_smac():
    if not smac_available("3m"):
        pytest.skip(SMAC_INSTALL_HINT)


def test_real_smac_3m_conformance(real_smac):
    env = envs.make("smac:3m", num_envs=2, seed=1)
    try:
        assert (env.n_agents, env.n_actions, env.episode_limit) == (3, 9, 60)
        assert (env.obs_dim, env.state_dim) == (30, 48)
        obs, state, avail = env.reset()
        assert obs.shape == (2, 3, 30) and obs.dtype == torch.float32
        assert state.shape == (2, 48) and state.dtype == torch.float32
        assert avail.shape == (2, 3, 9) and avail.dtype == torch.bool
        gen = torch.Generator().manual_seed(0)
        finished = torch.zeros(2, dtype=torch.int64)
        for _ in range(2 * 60 + 1):
            assert bool(avail.any(-1).all())
            acts = torch.multinomial(avail.reshape(-1, 9).float(), 1, generator=gen).reshape(2, 3)
            obs, state, avail, reward, term, trunc, info = env.step(acts)
            assert reward.shape == (2,) and reward.dtype == torch.float32 and bool(torch.isfinite(reward).all())
            assert not bool((term & trunc).any())
            assert bool((info["success"] <= term).all())  # a won battle is a termination
            assert bool((info["episode_length"][trunc] == 60).all())
            assert info["final_obs"].shape == obs.shape and info["final_state"].shape == state.shape
            finished += (term | trunc).long()
            if bool((finished >= 1).all()):
                break
        assert bool((finished >= 1).all())
    finally:
        env.close()


def test_real_smac_unavailable_action_is_rejected(real_smac):
    env = envs.make("smac:3m", num_envs=1, seed=1)
    try:
        env.reset()
        with pytest.raises(ValueError, match="unavailable SMAC action"):
            env.step(torch.zeros(1, 3, dtype=torch.int64))  # no-op: alive agents cannot choose it
    finally:
        env.close()
