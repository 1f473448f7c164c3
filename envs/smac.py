"""StarCraft II micromanagement (oxwhirl SMAC) as a batched env: ``smac:<map>``.

    env = envs.make("smac:3m", num_envs=2, seed=1)

SMAC is optional and imported only when such an env is made; see ``SMAC_INSTALL_HINT`` for how
to install it (the PyPI package called ``smac`` is SMAC3, an unrelated project). ``num_envs``
``StarCraft2Env`` instances (one StarCraft II process each, launched at the first reset) are
stepped in a Python loop.

- obs ``[E,N,obs_dim]`` from ``get_obs()`` (no agent id; scripts append it), state
  ``[E,state_dim]`` from ``get_state()``, avail ``[E,N,n_actions]`` from ``get_avail_actions()``.
  Actions are Discrete(6 + n_enemies): 0 no-op (dead agents only), 1 stop, 2-5 move N/S/E/W,
  6+ attack (or heal) that target. Choosing an unavailable action raises a ValueError.
- reward ``[E]``: SMAC's team reward (shaped and scaled by default; constructor keyword
  arguments such as ``reward_only_positive=False`` go to ``StarCraft2Env``).
- ``terminated``: the battle ended (won or lost); ``info["success"]`` = battle won. SMAC
  reports its time limit as terminated too; here it is ``truncated`` (at ``t == episode_limit``
  with no winner), and so is SMAC's restart after a lost game connection.
- extra info ``[E]``: ``battle_won``, ``dead_allies``, ``dead_enemies``.
- Seeding: env ``i`` passes ``seed + i`` to StarCraft II's game seed (SC2 itself is not
  guaranteed to be bit-for-bit deterministic).
- The MIR3 paper's N+1-vs-N marine maps (``EXTRA_MAPS``: 4m_vs_3m, 5m_vs_3m, 9m_vs_8m, 10m_vs_8m)
  are added to SMAC's map registry if missing; their ``.SC2Map`` files come from the MIR3
  repository (``envs/sc2/SMAC_Maps/``) and go next to the SMAC maps.
"""

from __future__ import annotations

import os
import sys

import gymnasium as gym
import numpy as np
import torch

from .core import BatchedEnv

SMAC_INSTALL_HINT = (
    "smac:<map> envs need SMAC (the StarCraft Multi-Agent Challenge) and StarCraft II:\n"
    "  1. pip install git+https://github.com/oxwhirl/smac.git\n"
    "     (NOT `pip install smac`: that PyPI package is SMAC3, an unrelated hyperparameter "
    "optimiser; `pip uninstall smac` first if you installed it)\n"
    "  2. the StarCraft II Linux binary from Blizzard's s2client-proto "
    "(https://github.com/Blizzard/s2client-proto#downloads, e.g. SC2.4.10.zip, unzip password "
    "'iagreetotheeula'), unpacked to ~/StarCraftII (the default) or anywhere with SC2PATH set "
    "to that directory\n"
    "  3. the SMAC maps: unzip SMAC_Maps.zip "
    "(https://github.com/oxwhirl/smac/releases/download/v0.1-beta1/SMAC_Maps.zip) into "
    "$SC2PATH/Maps/, so that $SC2PATH/Maps/SMAC_Maps/3m.SC2Map exists\n"
    "  check the install with: python -m smac.examples.random_agents"
)

# MIR3's "traitor" maps: N+1 allied marines vs N enemy marines, (allies, enemies, episode limit)
EXTRA_MAPS = {
    "4m_vs_3m": (4, 3, 60),
    "5m_vs_3m": (5, 3, 60),
    "9m_vs_8m": (9, 8, 120),
    "10m_vs_8m": (10, 8, 120),
}
_EXTRA_MAP_CLASSES: dict = {}  # pysc2 finds maps through Map.__subclasses__ (weak refs): keep them alive


class SMACNotInstalledError(ImportError):
    """SMAC, one of its dependencies, StarCraft II or a map file is missing."""


def sc2_path() -> str:
    """Where StarCraft II is looked for on Linux: ``$SC2PATH`` or ``~/StarCraftII``."""
    return os.path.expanduser(os.environ.get("SC2PATH") or "~/StarCraftII")


def _import_starcraft2env():
    try:
        from smac.env import StarCraft2Env
    except ImportError as e:
        missing = (getattr(e, "name", None) or "").split(".")[0]
        if missing and missing != "smac":
            why = (f"SMAC is installed but its dependency {e.name!r} is missing ({e}); reinstall "
                   f"SMAC from git so that pysc2, s2clientprotocol and protobuf<3.21 come with it.")
        else:
            try:
                import smac  # noqa: F401
                why = ("the installed `smac` package has no smac.env: it is not the StarCraft "
                       "Multi-Agent Challenge (probably SMAC3 from `pip install smac`); run "
                       "`pip uninstall smac`.")
            except ImportError:
                why = "SMAC is not installed."
        raise SMACNotInstalledError(f"{why}\n{SMAC_INSTALL_HINT}") from e
    except TypeError as e:  # pysc2's generated protobuf modules with protobuf >= 4
        raise SMACNotInstalledError(
            f"importing SMAC failed ({e}); SMAC's pysc2 needs protobuf<3.21: "
            f"pip install 'protobuf<3.21'\n{SMAC_INSTALL_HINT}") from e
    return StarCraft2Env


def _smac_map_registry():
    """SMAC's map registry (after adding ``EXTRA_MAPS``), or None if it cannot be imported."""
    try:
        from smac.env.starcraft2.maps import smac_maps
    except ImportError:
        return None
    registry = smac_maps.get_smac_map_registry()
    for name, (n_agents, n_enemies, limit) in EXTRA_MAPS.items():
        if name not in registry:
            registry[name] = {"n_agents": n_agents, "n_enemies": n_enemies, "limit": limit,
                              "a_race": "T", "b_race": "T", "unit_type_bits": 0, "map_type": "marines"}
            _EXTRA_MAP_CLASSES[name] = type(name, (smac_maps.SMACMap,), {"filename": name})
    return registry


def _check_game_files(map_name: str) -> None:
    """On Linux, fail early and clearly if the StarCraft II binary or the map file is missing.

    (pysc2 finds the game by itself on macOS and Windows; there we leave it to pysc2.)
    """
    if not sys.platform.startswith("linux"):
        return
    base = sc2_path()
    versions = os.path.join(base, "Versions")
    where = f"SC2PATH={os.environ['SC2PATH']!r}" if os.environ.get("SC2PATH") else "SC2PATH is not set"
    if not os.path.isdir(versions) or not os.listdir(versions):
        raise SMACNotInstalledError(f"StarCraft II not found: no game binary under {versions} "
                                    f"({where}).\n{SMAC_INSTALL_HINT}")
    map_file = os.path.join(base, "Maps", "SMAC_Maps", f"{map_name}.SC2Map")
    if not os.path.isfile(map_file):
        extra = (f" {map_name} is one of MIR3's maps: copy it from the MIR3 repository's "
                 f"envs/sc2/SMAC_Maps/." if map_name in EXTRA_MAPS else "")
        raise SMACNotInstalledError(f"SMAC map file not found: {map_file}.{extra}\n{SMAC_INSTALL_HINT}")


def smac_available(map_name: str = "3m") -> bool:
    """True if SMAC imports and (on Linux) StarCraft II and the map file are in place."""
    try:
        _import_starcraft2env()
        _check_game_files(map_name)
    except SMACNotInstalledError:
        return False
    return True


class SMACEnv(BatchedEnv):
    """``num_envs`` SMAC ``StarCraft2Env`` instances of one map, on torch tensors.

    Keyword arguments go to ``StarCraft2Env`` (e.g. ``difficulty="7"``,
    ``reward_only_positive=False``, ``reward_defeat=-200``). ``self.smac_envs`` holds them.
    ``obs_bounds()`` is None: SMAC normalises its features but does not state their range.
    """

    def __init__(self, map_name: str, num_envs: int = 1, seed: int = 0, device="cpu", **smac_kwargs):
        super().__init__(num_envs, seed, device)
        StarCraft2Env = _import_starcraft2env()
        registry = _smac_map_registry()
        if registry is not None and map_name not in registry:
            raise ValueError(f"unknown SMAC map {map_name!r}; known maps: {', '.join(sorted(registry))}")
        self.map_name = map_name
        self.smac_envs = []  # constructing StarCraft2Env does not launch the game; reset() does
        try:
            for i in range(self.num_envs):
                self.smac_envs.append(StarCraft2Env(map_name=map_name, seed=(self.seed + i) & 0xFFFFFFFF,
                                                    **smac_kwargs))
        except KeyError as e:  # SMAC's get_map_params on an unregistered map
            raise ValueError(f"unknown SMAC map {map_name!r} ({e!r})") from None
        _check_game_files(map_name)

        env_info = self.smac_envs[0].get_env_info()
        self.n_agents = int(env_info["n_agents"])
        self.obs_dim = int(env_info["obs_shape"])
        self.state_dim = int(env_info["state_shape"])
        self.episode_limit = int(env_info["episode_limit"])
        self.n_enemies = int(getattr(self.smac_envs[0], "n_enemies", int(env_info["n_actions"]) - 6))
        self.action_space = gym.spaces.Discrete(int(env_info["n_actions"]))

        E, N, A = self.num_envs, self.n_agents, int(env_info["n_actions"])
        self._obs = np.zeros((E, N, self.obs_dim), dtype=np.float32)
        self._state = np.zeros((E, self.state_dim), dtype=np.float32)
        self._avail = np.zeros((E, N, A), dtype=bool)

    def _read(self, i: int) -> None:
        env = self.smac_envs[i]
        self._obs[i] = np.asarray(env.get_obs(), dtype=np.float32).reshape(self.n_agents, self.obs_dim)
        self._state[i] = np.asarray(env.get_state(), dtype=np.float32).reshape(self.state_dim)
        self._avail[i] = np.asarray(env.get_avail_actions()).reshape(self.n_agents, -1) > 0

    # --- BatchedEnv interface -----------------------------------------------------------------
    def _reset_envs(self, mask: torch.Tensor) -> None:
        for i in np.flatnonzero(mask.cpu().numpy()):
            self.smac_envs[i].reset()
            self._read(int(i))

    def _step(self, actions: torch.Tensor):
        acts = actions.cpu().numpy()
        ok = np.take_along_axis(self._avail, acts[..., None], axis=-1)[..., 0]
        if not ok.all():
            e, n = (int(v) for v in np.argwhere(~ok)[0])
            raise ValueError(f"unavailable SMAC action: env {e} agent {n} chose {int(acts[e, n])}, "
                             f"available {np.flatnonzero(self._avail[e, n]).tolist()} "
                             f"({int((~ok).sum())} unavailable in total; mask with avail)")
        E = self.num_envs
        reward = np.zeros(E, dtype=np.float32)
        terminated = np.zeros(E, dtype=bool)
        won = np.zeros(E, dtype=bool)
        crashed = np.zeros(E, dtype=bool)
        dead = np.zeros((2, E), dtype=np.int64)
        t_next = self.t.cpu().numpy() + 1
        for i, env in enumerate(self.smac_envs):
            timeouts = getattr(env, "timeouts", None)
            r, term, info = env.step(acts[i].tolist())
            reward[i] = float(r)
            won[i] = bool(info.get("battle_won", False))
            crashed[i] = term and not info  # SMAC's (0, True, {}) after a lost game connection
            if crashed[i]:
                term = False
            elif term and not won[i]:
                # SMAC ends a battle at its time limit with terminated=True (and counts a timeout);
                # that is a truncation, which the base class reports since t == episode_limit.
                timed_out = (env.timeouts > timeouts) if timeouts is not None else True
                term = not (timed_out and t_next[i] >= self.episode_limit)
            terminated[i] = bool(term)
            for k, (key, units) in enumerate((("dead_allies", "agents"), ("dead_enemies", "enemies"))):
                v = info.get(key)
                if v is None:
                    v = sum(1 for u in getattr(env, units, {}).values() if u.health == 0)
                dead[k, i] = int(v)
            self._read(i)
        dev = self.device
        extra = {"truncated": torch.as_tensor(crashed, device=dev),
                 "battle_won": torch.as_tensor(won, device=dev),
                 "dead_allies": torch.as_tensor(dead[0], device=dev),
                 "dead_enemies": torch.as_tensor(dead[1], device=dev)}
        return (torch.as_tensor(reward, device=dev), torch.as_tensor(terminated, device=dev),
                torch.as_tensor(won, device=dev), extra)

    def null_action(self, avail: torch.Tensor | None = None) -> torch.Tensor:
        """Action 0 (no-op) for every agent, int64 ``[N]``. SMAC makes no-op available to dead units
        only: given this step's ``avail`` ``[E, N, A]``, a disabled *live* unit stops instead (action 1,
        available to every live unit), int64 ``[E, N]``."""
        return super().null_action() if avail is None else avail[..., 1].long()

    def _observe(self):
        dev = self.device
        return (torch.tensor(self._obs, device=dev), torch.tensor(self._state, device=dev),
                torch.tensor(self._avail, device=dev))

    def close(self) -> None:
        for env in self.smac_envs:
            env.close()
