"""Batched cooperative multi-agent environments on torch tensors.

    import envs
    env = envs.make("rendezvous", num_envs=64, seed=1, device="cpu", n_agents=10)
    obs, state, avail = env.reset()
    obs, state, avail, reward, terminated, truncated, info = env.step(actions)

``envs.make`` is the only entry point; ``envs.register`` adds an id. Ids that end with ``:``
(``lbf:``, ``smac:``) are families: ``lbf:Foraging-8x8-2p-2f-coop-v3`` passes the part after
the colon to the family's constructor as its first argument.

``envs.env_shift_kwargs(env_id)`` gives the constructor options of the default environment shift
(a frozen team evaluated in a changed environment), e.g. weaker motors for the quadrotors.
"""

from __future__ import annotations

import importlib
import math
from numbers import Real
from typing import Callable

from .core import BatchedEnv, CounterRNG

__all__ = ["BatchedEnv", "CounterRNG", "env_shift_kwargs", "make", "register", "registered_ids"]

_REGISTRY: dict[str, Callable[..., BatchedEnv]] = {}
_FAMILY_EXAMPLES = {"lbf:": "lbf:Foraging-8x8-2p-2f-coop-v3", "smac:": "smac:3m", "smax:": "smax:3m"}


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
    """Build ``num_envs`` batched copies of ``env_id``; extra keyword arguments go to the env.

    Bad settings raise one ValueError line: an unknown id or option, a family id without a name,
    a non-integer ``num_envs`` / ``seed``, a NaN or infinite option, values out of range, or an
    env too large for memory.
    """
    if isinstance(env_id, str) and env_id.endswith(":") and env_id in _REGISTRY:
        example = _FAMILY_EXAMPLES.get(env_id, f"{env_id}<name>")
        raise ValueError(f"env id {env_id!r} needs a name after the colon, e.g. {example!r}")
    for key, value in kwargs.items():  # covers options the constructors pass on (LBF, SMAC)
        if isinstance(value, Real) and not isinstance(value, bool) and not math.isfinite(value):
            raise ValueError(f"env option {key}={value!r} for {env_id!r} must be finite")
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


def env_shift_kwargs(env_id: str) -> dict:
    """Constructor options of the default environment shift for ``env_id``.

    The shift evaluates a frozen team in a changed environment (environment uncertainty):
    ``envs.make(env_id, **kwargs, **env_shift_kwargs(env_id))``. Every option is neutral by
    default, so the unshifted env is unchanged bit for bit. The defaults:

    - ``quads-*``: ``{"thrust_scale": 0.8}``, weaker motors. Thrust-to-weight drops from 1.9 to
      1.52: hovering needs 66% of full thrust instead of 53%, the climb and manoeuvring margin
      shrinks from 0.9 g to 0.52 g, and a policy that outputs the nominal hover command sinks
      (vel13: the nominal-thrust controller settles about 0.5 m/s below each set-point). Still
      possible: full thrust lifts the drone at 0.52 g.
    - ``rendezvous``, ``rendezvous-discrete``: ``{"speed_scale": 0.7}``, weaker wheels: 70% of
      the forward speed and turn rate per command (1.05 instead of 1.51 units per step at full
      forward), so gathering takes longer within the same 200 steps but remains possible.
    - ``lbf:<name>``: ``{"slip_prob": 0.2}``: each agent's action becomes NONE with probability
      0.2 (moves fail, loads fail; a cooperative load of two agents succeeds with probability
      0.64 per try). Dynamics only, the reward is unchanged.
    - ``smac:<map>``: ``{"difficulty": "9"}``, the hardest built-in AI (SMAC's default is "7"),
      the setting of the MIR3 paper.
    - ``smax:<map>``: ``{"slip_prob": 0.2}``: each live ally's order becomes stop with probability
      0.2 per step (the unit ignores it: no move, no shot). Dynamics only, the reward is unchanged.

    Any other id raises a ValueError.
    """
    if isinstance(env_id, str):
        prefix, sep, name = env_id.partition(":")
        if env_id in _REGISTRY and env_id.startswith("quads-"):
            return {"thrust_scale": 0.8}
        if env_id in ("rendezvous", "rendezvous-discrete"):
            return {"speed_scale": 0.7}
        if sep and name and prefix == "lbf":
            return {"slip_prob": 0.2}
        if sep and name and prefix == "smac":
            return {"difficulty": "9"}
        if sep and name and prefix == "smax":
            return {"slip_prob": 0.2}
    raise ValueError(f"no default environment shift for env id {env_id!r}; it is defined for "
                     f"rendezvous, rendezvous-discrete, quads-*, lbf:<name>, smac:<map> and smax:<map>")


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
register("smax:", _lazy("smax", "SMAXEnv"))
