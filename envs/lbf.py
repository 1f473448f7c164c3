"""Level-Based Foraging (the ``lbforaging`` package) as a batched env: ``lbf:<gymnasium id>``.

    env = envs.make("lbf:Foraging-8x8-2p-2f-coop-v3", num_envs=8, seed=1)

``num_envs`` gymnasium ``ForagingEnv`` instances are stepped in a Python loop and their outputs
stacked into torch tensors (LBF itself is pure Python, so this loop is not the bottleneck).

- obs ``[E,N,obs_dim]``: LBF's per-agent vector observation, ``(y, x, level)`` per food, then
  ``(y, x, level)`` per player with the observing agent first; unseen or absent entities are
  ``(-1, -1, 0)``. No agent id (scripts append it).
- state ``[E, N*obs_dim]``: the agents' observations concatenated (LBF has no global state).
- avail ``[E,N,6]``: all True (LBF turns an invalid action into NONE; it exposes no mask).
- actions: Discrete(6) per agent: NONE 0, NORTH 1, SOUTH 2, WEST 3, EAST 4, LOAD 5.
- reward ``[E]``: the sum of the agents' rewards. LBF normalises them so that collecting every
  food sums to 1.0 over an episode.
- LBF reports its own time limit as ``done`` (terminated). Here ``terminated`` means all food
  was collected (also ``info["success"]``) and the time limit is ``truncated``.
- ``episode_limit``: the env's own ``max_episode_steps`` (50 for every registered id), or the
  ``max_episode_steps`` constructor argument.
- Seeding: env ``i`` is reset with ``seed + i`` on its first reset only; later resets are
  unseeded and continue that env's own random stream. (Re-seeding an LBF instance does not
  reproduce its first episode: player spawning avoids the previous episode's positions.) So
  env 0 of a batch of 4 equals a batch of 1 and the same seed gives the same trajectories.
- ``slip_prob`` (default 0, off): each agent's action is replaced by NONE with this probability,
  independently per agent and step (its legs slip: it stays where it is, or its LOAD does not
  happen). It changes the dynamics, not the reward; at 0 nothing is drawn and the trajectories
  are those of plain LBF. The slips come from the package's counter-based RNG (seed, env index,
  episode, step), so they are batch-independent too, but env ``i`` of a batch seeded ``s`` no
  longer equals env 0 of a batch seeded ``s + i``.
"""

from __future__ import annotations

import dataclasses
import difflib

import gymnasium as gym
import numpy as np
import torch

from .core import BatchedEnv, require_float

EXAMPLE_ID = "Foraging-8x8-2p-2f-coop-v3"
_ID_PATTERN = "Foraging[-2s]-{s}x{s}-{p}p-{f}f[-coop]-v3 with s in 5..19, p in 2..9, f in 1..4"
_N_ACTIONS = 6
_BYTES_PER_ENV = 16 * 2**10  # one gymnasium ForagingEnv (measured about 7 KiB) and its buffers
_STREAM_SLIP = 1


def _import_lbforaging():
    try:
        import lbforaging  # noqa: F401  (importing registers the Foraging-* gymnasium ids)
        from lbforaging.foraging import ForagingEnv
    except ImportError as e:
        raise ImportError(
            "the lbf:<id> environments need the Level-Based Foraging package: "
            "pip install lbforaging  (version 2.0.0, gymnasium-based)"
        ) from e
    return ForagingEnv


def _lbf_spec(gym_id: str, foraging_cls) -> gym.envs.registration.EnvSpec:
    """The gymnasium spec of an LBF id, or a ValueError that says what a valid id looks like."""
    if not isinstance(gym_id, str) or not gym_id:
        raise ValueError(f"LBF env id must be a non-empty string, got {gym_id!r}; "
                         f"e.g. 'lbf:{EXAMPLE_ID}'")
    if gym_id.startswith("lbforaging:"):
        gym_id = gym_id[len("lbforaging:"):]
    if gym_id.startswith("Foraging-grid"):
        raise ValueError(f"grid-observation LBF ids such as {gym_id!r} are not supported (their "
                         f"observation space is broken in lbforaging 2.0.0); use a vector-observation "
                         f"id, e.g. 'lbf:{EXAMPLE_ID}'")
    spec = gym.registry.get(gym_id)
    if spec is None:
        known = [k for k in gym.registry if k.startswith("Foraging")]
        close = difflib.get_close_matches(gym_id, known, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown LBF gymnasium id {gym_id!r}{hint} Valid ids look like "
                         f"'lbf:{EXAMPLE_ID}' ({_ID_PATTERN}).")
    entry = spec.entry_point
    is_lbf = (isinstance(entry, str) and entry.startswith("lbforaging")) or (
        isinstance(entry, type) and issubclass(entry, foraging_cls))
    if not is_lbf:
        raise ValueError(f"gymnasium id {gym_id!r} is not a Level-Based Foraging env "
                         f"(entry point {entry!r}); e.g. 'lbf:{EXAMPLE_ID}'")
    return spec


class LBFEnv(BatchedEnv):
    """``num_envs`` Level-Based Foraging envs of one gymnasium id, on torch tensors.

    ``max_episode_steps`` overrides the env's time limit (LBF's own default is 50 steps).
    ``slip_prob`` in [0, 1] is the probability that an agent's action is replaced by NONE (see
    the module docstring). Other keyword arguments go to ``lbforaging.foraging.ForagingEnv``
    (e.g. ``penalty=0.1``). The gymnasium envs are in ``self.gym_envs``.
    """

    def __init__(self, gym_id: str, num_envs: int = 1, seed: int = 0, device="cpu",
                 max_episode_steps: int | None = None, slip_prob: float = 0.0, **env_kwargs):
        self.slip_prob = require_float("slip_prob", slip_prob, 0.0, 1.0)
        super().__init__(num_envs, seed, device, bytes_per_env=_BYTES_PER_ENV, what="lbf")
        foraging_cls = _import_lbforaging()
        spec = _lbf_spec(gym_id, foraging_cls)
        self.gym_id = spec.id

        kwargs = {**spec.kwargs, **env_kwargs}
        if kwargs.get("grid_observation"):
            raise ValueError("grid_observation=True is not supported by lbf:<id> envs "
                             "(broken in lbforaging 2.0.0)")
        if max_episode_steps is not None:
            if isinstance(max_episode_steps, bool) or int(max_episode_steps) != max_episode_steps \
                    or max_episode_steps < 1:
                raise ValueError(f"max_episode_steps must be a positive integer, got {max_episode_steps!r}")
            # LBF enforces its limit inside the env (constructor argument max_episode_steps), so
            # both shorter and longer limits are set there rather than with a TimeLimit wrapper.
            kwargs["max_episode_steps"] = int(max_episode_steps)
        spec = dataclasses.replace(spec, kwargs=kwargs)
        self.gym_envs = [gym.make(spec, disable_env_checker=True) for _ in range(self.num_envs)]
        self._raw = [e.unwrapped for e in self.gym_envs]
        raw = self._raw[0]
        if not isinstance(raw, foraging_cls):
            raise ValueError(f"{gym_id!r} did not build an lbforaging ForagingEnv (got {type(raw).__name__})")

        space = raw.observation_space[0]
        self.n_agents = int(raw.n_agents)
        self.obs_dim = int(np.prod(space.shape))
        self.state_dim = self.n_agents * self.obs_dim
        self.episode_limit = int(raw._max_episode_steps)
        self.action_space = gym.spaces.Discrete(_N_ACTIONS)
        self.obs_low = torch.as_tensor(space.low, dtype=torch.float32, device=self.device)
        self.obs_high = torch.as_tensor(space.high, dtype=torch.float32, device=self.device)

        self._obs = np.zeros((self.num_envs, self.n_agents, self.obs_dim), dtype=np.float32)
        self._seeded = [False] * self.num_envs

    # --- BatchedEnv interface -----------------------------------------------------------------
    def _reset_envs(self, mask: torch.Tensor) -> None:
        for i in np.flatnonzero(mask.cpu().numpy()):
            seed = None
            if not self._seeded[i]:
                seed = (self.seed + int(i)) % 2**64
                self._seeded[i] = True
            obs, _ = self.gym_envs[i].reset(seed=seed)
            self._obs[i] = np.asarray(obs, dtype=np.float32).reshape(self.n_agents, self.obs_dim)

    def _step(self, actions: torch.Tensor):
        E = self.num_envs
        if self.slip_prob > 0.0:
            slip = self._uniform((self.n_agents,), _STREAM_SLIP) < self.slip_prob
            actions = actions.masked_fill(slip, 0)  # NONE
        acts = actions.cpu().numpy().tolist()
        reward = np.zeros(E, dtype=np.float32)
        cleared = np.zeros(E, dtype=bool)
        for i in range(E):
            obs, rewards, done, truncated, _ = self.gym_envs[i].step(acts[i])
            self._obs[i] = np.asarray(obs, dtype=np.float32).reshape(self.n_agents, self.obs_dim)
            reward[i] = float(np.sum(np.asarray(rewards, dtype=np.float64)))
            # all food collected; LBF's `done` also fires at its time limit, which is a truncation
            cleared[i] = not self._raw[i].field.any()
            if (done or truncated) and not cleared[i] and int(self.t[i]) + 1 < self.episode_limit:
                raise RuntimeError(f"LBF env {i} ended at step {int(self.t[i]) + 1} with food left, "
                                   f"before episode_limit={self.episode_limit}; the time limits disagree")
        terminated = torch.as_tensor(cleared, device=self.device)
        return torch.as_tensor(reward, device=self.device), terminated, terminated.clone(), {}

    def _observe(self):
        obs = torch.tensor(self._obs, device=self.device)
        state = obs.reshape(self.num_envs, self.state_dim).clone()
        avail = torch.ones(self.num_envs, self.n_agents, _N_ACTIONS, dtype=torch.bool, device=self.device)
        return obs, state, avail

    def obs_bounds(self):
        """LBF's own observation space bounds (also ``self.obs_low`` / ``self.obs_high``)."""
        return self.obs_low, self.obs_high

    def close(self) -> None:
        for e in self.gym_envs:
            e.close()
