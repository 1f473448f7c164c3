"""Batched multi-agent environment base class and a counter-based random number generator.

Every environment in this package steps ``num_envs`` copies at once on torch tensors and
follows one contract (see ``BatchedEnv``). Our own tasks draw their randomness from
``CounterRNG``: each number is a hash of (seed, env index, episode index, step, stream,
element), so a trajectory depends only on the seed and the env's index in the batch. That is
what makes env 0 of a batch of 4 identical to a batch of 1 without any Python loop over envs.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch

_MASK32 = 0xFFFFFFFF

# Constructors refuse settings whose estimated tensor memory exceeds this (see ``check_memory``).
MAX_ENV_BYTES = 8 * 2**30


def require_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int, or a one-line ValueError if it is not an integer (bools are not) or below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, "
                         f"got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_float(name: str, value, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``), else a
    one-line ValueError."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = f" in {'(' if low_open else '['}{low}, {high}]" if high is not None else \
            (f" {'>' if low_open else '>='} {low}" if low is not None else "")
        raise ValueError(f"{name} must be a finite number{rng}, got {value!r}")
    return float(value)


def check_memory(what: str, nbytes: float) -> None:
    """Refuse an env whose tensors would take more than ``MAX_ENV_BYTES`` (a rough estimate).

    One clear line instead of an allocation failure deep inside torch (or a machine that swaps).
    """
    if nbytes > MAX_ENV_BYTES:
        raise ValueError(f"{what} would need about {nbytes / 2**30:.3g} GiB of memory for its tensors "
                         f"(limit {MAX_ENV_BYTES / 2**30:.3g} GiB); use fewer envs or agents")


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class CounterRNG:
    """Stateless, batch-independent random numbers for ``num_envs`` environments.

    A draw is keyed by ``(seed, env index, episode counter, step counter, stream id)``; the
    caller passes the per-env episode and step counters. Two draws with the same key give the
    same numbers, so every call site uses its own ``stream`` id.
    """

    def __init__(self, seed: int, num_envs: int, device: torch.device):
        self.device = device
        self.env_index = torch.arange(num_envs, device=device, dtype=torch.int64)
        self.seed_key = _hash32(torch.tensor(int(seed) & _MASK32, device=device, dtype=torch.int64))

    def _keys(self, episode: torch.Tensor, step: torch.Tensor, stream: int) -> torch.Tensor:
        k = _hash32(self.seed_key ^ self.env_index)
        k = _hash32(k ^ (episode.to(torch.int64) & _MASK32))
        k = _hash32(k ^ (step.to(torch.int64) & _MASK32))
        return _hash32(k ^ (stream & _MASK32))

    def uniform(self, shape: tuple, episode, step, stream: int) -> torch.Tensor:
        """U[0, 1) float32 of shape ``[E, *shape]``."""
        keys = self._keys(episode, step, stream)
        n = math.prod(shape)
        elem = torch.arange(n, device=self.device, dtype=torch.int64) * 0x9E3779B9 & _MASK32
        bits = _hash32(keys[:, None] ^ elem[None, :])
        u = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
        return u.view(-1, *shape)

    def normal(self, shape: tuple, episode, step, stream: int) -> torch.Tensor:
        """Standard normal float32 of shape ``[E, *shape]`` (Box-Muller)."""
        n = math.prod(shape)
        u = self.uniform((2, n), episode, step, stream)
        r = torch.sqrt(-2.0 * torch.log1p(-u[:, 0]))  # 1-u in (0, 1]
        return (r * torch.cos(2.0 * math.pi * u[:, 1])).view(-1, *shape)


class BatchedEnv:
    """Base class of all environments: ``num_envs`` copies of an ``n_agents`` cooperative task.

    Subclasses set ``n_agents``, ``obs_dim``, ``state_dim``, ``episode_limit``,
    ``action_space`` (per agent) in ``__init__`` and implement ``_reset_envs(mask)`` and
    ``_step(actions)`` plus ``_observe()``. This class owns action validation, episode
    statistics and auto-reset:

    ``step`` returns ``obs, state, avail, reward, terminated, truncated, info``. Finished envs
    are reset inside ``step``; the returned obs/state/avail already begin the next episode and
    ``info["final_obs"]`` / ``info["final_state"]`` / ``info["final_avail"]`` hold the last
    observation of every env before any reset (for envs that did not finish they equal the returned obs/state), so a
    learner can always bootstrap from them. ``info["success"]``, ``info["episode_return"]`` and
    ``info["episode_length"]`` are ``[E]`` tensors, meaningful where ``terminated | truncated``.
    ``step`` before the first ``reset`` raises a RuntimeError.
    """

    n_agents: int
    obs_dim: int
    state_dim: int
    episode_limit: int
    action_space: gym.spaces.Space

    def __init__(self, num_envs: int, seed: int, device, bytes_per_env: float = 0.0, what: str = "env"):
        """Validate ``num_envs`` and ``seed``; refuse (``check_memory``) if ``num_envs`` envs of
        ``bytes_per_env`` bytes each (the subclass's estimate; 32 bytes of counters are added)
        would be too large. Subclasses validate their own options before calling this."""
        self.num_envs = require_int("num_envs", num_envs, 1)
        self.seed = require_int("seed", seed)
        check_memory(f"{what} with num_envs={self.num_envs}", self.num_envs * (32.0 + bytes_per_env))
        self.device = torch.device(device)
        self._needs_reset = True  # step() before the first reset() is an error
        self.episode_count = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self.t = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self._return = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
        self.rng = CounterRNG(self.seed, self.num_envs, self.device)

    # --- subclass interface -------------------------------------------------------------------
    def _reset_envs(self, mask: torch.Tensor) -> None:
        """Start a new episode where ``mask`` [E] is True (counters already advanced).

        Draw randomness for all envs with ``_uniform``/``_normal`` and keep it with
        ``torch.where(mask, new, old)``: no data-dependent shapes, no sync.
        """
        raise NotImplementedError

    def _step(self, actions: torch.Tensor):
        """Advance all envs; return ``reward [E], terminated [E], success [E], extra_info dict``.

        ``extra_info`` may hold a ``"truncated"`` [E] bool for episodes cut short for reasons other
        than the time limit (e.g. a crashed game); it is folded into ``truncated``.
        """
        raise NotImplementedError

    def _observe(self):
        """Return ``obs [E,N,obs_dim], state [E,state_dim], avail [E,N,A]`` of the current state."""
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return isinstance(self.action_space, gym.spaces.Discrete)

    @property
    def n_actions(self) -> int:
        """Number of discrete actions, or the action dimension for Box spaces."""
        return int(self.action_space.n) if self.is_discrete else int(self.action_space.shape[0])

    def reset(self):
        """Reset every env to a fresh episode; returns ``obs, state, avail``."""
        self.episode_count += 1
        self.t.zero_()
        self._return.zero_()
        self._reset_envs(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self._needs_reset = False
        return self._observe()

    def step(self, actions: torch.Tensor):
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        actions = self._check_actions(actions)
        reward, terminated, success, extra = self._step(actions)
        self.t += 1
        self._return += reward
        truncated = ((self.t >= self.episode_limit) | extra.pop("truncated", False)) & ~terminated
        obs, state, avail = self._observe()
        info = {"final_obs": obs, "final_state": state, "final_avail": avail,
                "success": success & (terminated | truncated),
                "episode_return": self._return.clone(), "episode_length": self.t.clone(), **extra}
        done = terminated | truncated
        if bool(done.any()):
            self.episode_count += done
            self.t.masked_fill_(done, 0)
            self._return.masked_fill_(done, 0.0)
            self._reset_envs(done)
            new_obs, new_state, new_avail = self._observe()
            d = done.view(-1, 1)
            obs = torch.where(d.unsqueeze(-1), new_obs, obs)
            state = torch.where(d, new_state, state)
            avail = torch.where(d.unsqueeze(-1), new_avail, avail)
        return obs, state, avail, reward, terminated, truncated, info

    def null_action(self, avail: torch.Tensor | None = None) -> torch.Tensor:
        """The 'do nothing' action of a disabled agent, for each of the ``n_agents`` agents.

        ``avail`` (bool ``[E, N, A]``, this step's available actions) matters only where doing nothing
        depends on the state (SMAC: ``[E, N]`` then); the other envs ignore it. Discrete envs: int64
        ``[N]``, action 0 (rendezvous-discrete stop, quads vel13 the zero
        velocity set-point, LBF NONE). Continuous envs: float32 ``[N, d]``, zeros
        (rendezvous: both wheels stopped); envs where zero is not "nothing" override this
        (quads motors: the nominal hover command).
        """
        if self.is_discrete:
            return torch.zeros(self.n_agents, dtype=torch.int64, device=self.device)
        return torch.zeros(self.n_agents, self.n_actions, dtype=torch.float32, device=self.device)

    def obs_bounds(self):
        """``(low, high)``, float32 ``[obs_dim]`` each, that every observation lies in, or None if unknown.

        ``±inf`` marks a feature without a bound. The bounds cover the states that ``reset`` and
        ``step`` reach (up to float rounding); envs override this when they know them.
        """
        return None

    def close(self) -> None:
        """Release resources (no-op for pure torch envs)."""

    # --- helpers ------------------------------------------------------------------------------
    def _check_actions(self, actions) -> torch.Tensor:
        if not isinstance(actions, torch.Tensor):
            raise TypeError(f"actions must be a torch.Tensor, got {type(actions).__name__}")
        E, N = self.num_envs, self.n_agents
        if self.is_discrete:
            if actions.shape != (E, N) or actions.dtype != torch.int64:
                raise ValueError(f"discrete actions must be int64 of shape ({E}, {N}), "
                                 f"got {actions.dtype} of shape {tuple(actions.shape)}")
            actions = actions.to(self.device)
            if bool(((actions < 0) | (actions >= self.n_actions)).any()):
                raise ValueError(f"discrete actions must lie in [0, {self.n_actions}), "
                                 f"got min {int(actions.min())} max {int(actions.max())}")
            return actions
        d = self.n_actions
        if actions.shape != (E, N, d) or not actions.is_floating_point():
            raise ValueError(f"continuous actions must be float of shape ({E}, {N}, {d}), "
                             f"got {actions.dtype} of shape {tuple(actions.shape)}")
        actions = actions.to(self.device, torch.float32)
        if not bool(torch.isfinite(actions).all()):
            raise ValueError("actions contain NaN or inf")
        if not hasattr(self, "_action_bounds"):  # built once: no host-to-device copy per step
            self._action_bounds = (torch.as_tensor(self.action_space.low, device=self.device),
                                   torch.as_tensor(self.action_space.high, device=self.device))
        return torch.clamp(actions, *self._action_bounds)

    def _uniform(self, shape, stream: int) -> torch.Tensor:
        """U[0,1) of shape ``[E, *shape]`` keyed by each env's episode and step counters."""
        return self.rng.uniform(tuple(shape), self.episode_count, self.t, stream)

    def _normal(self, shape, stream: int) -> torch.Tensor:
        """N(0,1) of shape ``[E, *shape]`` keyed by each env's episode and step counters."""
        return self.rng.normal(tuple(shape), self.episode_count, self.t, stream)
