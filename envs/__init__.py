"""Batched cooperative multi-agent environments on torch tensors.

    import envs
    env = envs.make("rendezvous", num_envs=64, seed=1, device="cpu", n_agents=10)
    obs, state, avail = env.reset()
    obs, state, avail, reward, terminated, truncated, info = env.step(actions)

``envs.make`` is the only entry point; ``envs.register`` adds an id. Ids that end with ``:``
(``lbf:``, ``smac:``) are families: ``lbf:Foraging-8x8-2p-2f-coop-v3`` passes the part after
the colon to the family's constructor as its first argument.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .core import BatchedEnv, CounterRNG

__all__ = ["BatchedEnv", "CounterRNG", "make", "register", "registered_ids"]

_REGISTRY: dict[str, Callable[..., BatchedEnv]] = {}


def register(env_id: str, constructor: Callable[..., BatchedEnv]) -> None:
    """Register ``constructor(num_envs=, seed=, device=, **kwargs) -> BatchedEnv`` under ``env_id``.

    An id ending in ``:`` registers a family; its constructor also receives the name after the
    colon as its first positional argument. Re-registering an id replaces it.
    """
    if not isinstance(env_id, str) or not env_id:
        raise ValueError("env_id must be a non-empty string")
    if not callable(constructor):
        raise TypeError(f"constructor for {env_id!r} is not callable")
    _REGISTRY[env_id] = constructor


def registered_ids() -> list[str]:
    """All registered ids (families shown as ``prefix:<name>``)."""
    return sorted(k + "<name>" if k.endswith(":") else k for k in _REGISTRY)


def make(env_id: str, num_envs: int = 1, seed: int = 0, device="cpu", **kwargs) -> BatchedEnv:
    """Build ``num_envs`` batched copies of ``env_id``; extra keyword arguments go to the env."""
    if env_id in _REGISTRY:
        ctor, args = _REGISTRY[env_id], ()
    else:
        prefix, sep, name = env_id.partition(":") if isinstance(env_id, str) else ("", "", "")
        if not sep or prefix + ":" not in _REGISTRY or not name:
            raise ValueError(f"unknown env id {env_id!r}; known ids: {', '.join(registered_ids())}")
        ctor, args = _REGISTRY[prefix + ":"], (name,)
    try:
        return ctor(*args, num_envs=num_envs, seed=seed, device=device, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e) or "multiple values" in str(e):
            raise ValueError(f"bad option for env {env_id!r}: {e}") from None
        raise


def _lazy(module: str, cls: str, **fixed) -> Callable[..., BatchedEnv]:
    """Constructor that imports ``envs.<module>`` only when the env is made."""

    def ctor(*args, **kwargs):
        mod = importlib.import_module(f"{__name__}.{module}")
        return getattr(mod, cls)(*args, **fixed, **kwargs)

    return ctor


register("rendezvous", _lazy("rendezvous", "Rendezvous"))
register("rendezvous-discrete", _lazy("rendezvous", "Rendezvous", discrete=True))
for _scenario in ("same-goal", "swarm-vs-swarm"):
    register(f"quads-{_scenario}", _lazy("quads", "QuadSwarm", scenario=_scenario))
    register(f"quads-{_scenario}-discrete", _lazy("quads", "QuadSwarm", scenario=_scenario, action_mode="vel13"))
register("lbf:", _lazy("lbf", "LBFEnv"))
register("smac:", _lazy("smac", "SMACEnv"))
