"""StarCraft micromanagement without StarCraft II: JaxMARL's SMAX as a batched env, ``smax:<map>``.

    env = envs.make("smax:3m", num_envs=64, seed=1)

SMAX (JaxMARL 0.2.0) re-implements SMAC's unit micromanagement in JAX: the allies are the agents,
the enemies follow JaxMARL's heuristic (attack the closest unit in range, else walk towards a
visible enemy or across the map). It runs on the CPU, no game binary needed. JAX is optional and
imported only when such an env is made; see ``SMAX_INSTALL_HINT``.

- Maps: every JaxMARL SMAX scenario (3m, 8m, 25m, 2s3z, 3s5z, 5m_vs_6m, 10m_vs_11m, 27m_vs_30m,
  3s5z_vs_3s6z, 3s_vs_5z, 6h_vs_8z, smacv2_5_units, smacv2_10_units, smacv2_20_units) and the MIR3
  paper's N+1-vs-N marine maps ``EXTRA_MAPS`` (4m_vs_3m, 5m_vs_3m, 9m_vs_8m, 10m_vs_8m; the extra
  ally is the one an adversary may take over).
- obs ``[E,N,obs_dim]``: SMAX's unit-list observation, every entry in [-1, 1] (``obs_bounds()``):
  13 features per other ally, then per enemy (health, relative x/y over sight range, last move,
  last target, weapon cooldown, 6 unit-type bits; zeros when out of sight or dead), then 10 own
  features. 3m: 75, 4m_vs_3m: 88. No agent id (scripts append it).
- state ``[E,state_dim]``: the layout of SMAX's ``world_state`` (per unit health, x, y, weapon
  cooldown, 6 type bits, zeros when dead; then the units' teams and types), 12 per unit
  (3m: 72, 4m_vs_3m: 84), normalised so that every entry lies in [0, 1]: positions over the map
  size, the cooldown over the unit's weapon cooldown and clipped (as in the obs; SMAX's raw
  cooldown keeps falling by 1/16 per world step while a unit does not fire), type over 5.
- actions: Discrete(5 + n_enemies): 0 north, 1 east, 2 south, 3 west, 4 stop, 5 + j attack
  enemy j. There is no no-op: a dead unit has only stop available. An unavailable action (a move
  of a dead unit, an attack on an enemy out of range or dead) is executed as stop.
- reward ``[E]``: SMAX's team reward: the enemies' summed health loss over their starting health
  per enemy (so at most 1 per episode), plus 1 on a won battle. No penalty for own losses.
- ``terminated``: the battle is decided (all allies or all enemies dead); ``info["success"]`` =
  won (every enemy dead, at least one ally alive; both teams dead at once is a lost draw), read from
  the units, not from the reward. ``truncated``: ``episode_limit`` steps (default 100, SMAX's own
  ``max_steps``, for every map) without a decision. Extra info ``[E]``: ``battle_won``,
  ``dead_allies``, ``dead_enemies``.
- One env step is 8 SMAX world steps of 1/16 s (half a game second), as in JaxMARL.
- Randomness: env ``i`` draws from JAX keys derived from (seed, i, episode counter, step), so env 0
  of a batch of 4 equals a batch of 1 and a seed gives the same trajectories. SMAX's reset and step
  are ``jit(vmap(...))``-compiled together with the auto-reset (``jnp.where`` on done): one compiled
  call per ``step``. Compiled code is shared by every env of the same map and options; batch sizes
  are rounded up (to a power of two up to 64, then to a multiple of 64) and the extra envs are
  run and dropped, so e.g. 1, 3 and 4 envs share one compilation (15-30 s on one CPU core).
- Outputs come from JAX without a copy (DLPack; on CPU, or on CUDA when JAX has a GPU): treat them
  as read-only. ``device="cuda"`` needs a CUDA build of jaxlib.
- ``slip_prob`` (default 0): each live ally's order becomes stop with this probability per step (the
  unit ignores its order), drawn from the same keys; the default environment shift uses 0.2.
- Threads: if this module is the first to import JAX and ``OMP_NUM_THREADS=1``, it adds
  ``--xla_cpu_multi_thread_eigen=false`` to ``XLA_FLAGS`` (no Eigen threads). JAX still sizes its
  CPU thread pool by the cores the process may use (no flag sets it): ``taskset -c 0`` gives one.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import sys
import types

import gymnasium as gym
import numpy as np
import torch

from .core import BatchedEnv, require_float, require_int

SMAX_INSTALL_HINT = (
    "smax:<map> envs need JaxMARL's SMAX (JAX on the CPU, no StarCraft II): "
    "pip install -r requirements-smax.txt  (jaxmarl==0.2.0 with pinned jax/jaxlib, about 740 MB)"
)

# MIR3's N+1-vs-N marine maps: (allies, enemies)
EXTRA_MAPS = {"4m_vs_3m": (4, 3), "5m_vs_3m": (5, 3), "9m_vs_8m": (9, 8), "10m_vs_8m": (10, 8)}
STOP = 4  # SMAX's stop action, available to every unit, dead or alive
DEFAULT_EPISODE_LIMIT = 100  # SMAX's max_steps
# options that the adapter sets itself (the map fixes the teams; the limit is ``episode_limit``)
_RESERVED = ("scenario", "num_allies", "num_enemies", "max_steps", "action_type")
_COMPILED: dict = {}  # (map, options, JAX device) -> _Compiled; shared by all envs of that config


class SMAXNotInstalledError(ImportError):
    """JAX or JaxMARL is missing (or broken)."""


def _import_smax():
    """JaxMARL's ``jaxmarl.environments.smax`` module, or SMAXNotInstalledError with the install command.

    ``import jaxmarl`` imports every JaxMARL env (about 15 s, most of it module-level JAX work in
    envs we never use). When jaxmarl is not imported yet, the SMAX subpackage is loaded under empty
    stand-ins for its two parent packages (about 4 s), which are removed again afterwards, so a
    later ``import jaxmarl`` still runs the real package and reuses the loaded SMAX modules.
    """
    if "jax" not in sys.modules and os.environ.get("OMP_NUM_THREADS") == "1" \
            and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    try:
        import jax  # noqa: F401
        if "jaxmarl" in sys.modules or "jaxmarl.environments.smax" in sys.modules:
            return importlib.import_module("jaxmarl.environments.smax")
        spec = importlib.util.find_spec("jaxmarl")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("No module named 'jaxmarl'", name="jaxmarl")
        root = list(spec.submodule_search_locations)[0]
        stubs = {}
        for name, path in (("jaxmarl", root), ("jaxmarl.environments", os.path.join(root, "environments"))):
            stubs[name] = types.ModuleType(name)
            stubs[name].__path__ = [path]
            sys.modules[name] = stubs[name]
        try:
            return importlib.import_module("jaxmarl.environments.smax")
        except Exception:
            for name in [m for m in sys.modules if m.startswith("jaxmarl")]:
                del sys.modules[name]
            with contextlib.redirect_stdout(io.StringIO()):  # jaxmarl prints about submodules
                return importlib.import_module("jaxmarl.environments.smax")
        finally:
            for name, stub in stubs.items():
                if sys.modules.get(name) is stub:
                    del sys.modules[name]
    except ImportError as e:
        raise SMAXNotInstalledError(f"{e.__class__.__name__}: {e}. {SMAX_INSTALL_HINT}") from e
    except Exception as e:  # a JAX / JaxMARL version mismatch fails in other ways
        raise SMAXNotInstalledError(f"importing JaxMARL's SMAX failed ({e.__class__.__name__}: {e}). "
                                    f"{SMAX_INSTALL_HINT}") from e


def smax_available() -> bool:
    """True if JAX and JaxMARL's SMAX import."""
    try:
        _import_smax()
    except SMAXNotInstalledError:
        return False
    return True


def smax_maps() -> list[str]:
    """Every map name ``smax:<map>`` accepts (imports JaxMARL)."""
    smax = _import_smax()
    _register_extra_maps(smax)
    return sorted(smax.smax_env.MAP_NAME_TO_SCENARIO)


def _register_extra_maps(smax) -> None:
    import jax.numpy as jnp

    registry = smax.smax_env.MAP_NAME_TO_SCENARIO
    for name, (n_allies, n_enemies) in EXTRA_MAPS.items():
        if name not in registry:  # marines (unit type 0) on both sides
            smax.register_scenario(name, smax.Scenario(jnp.zeros((n_allies + n_enemies,), dtype=jnp.uint8),
                                                       n_allies, n_enemies, False, False))


def _bucket(num_envs: int) -> int:
    """Batch size the compiled step runs: a power of two (at least 4) up to 64, then a multiple of 64."""
    if num_envs <= 64:
        return max(4, 1 << (num_envs - 1).bit_length())
    return -(-num_envs // 64) * 64


def _jax_device(device: torch.device):
    import jax

    if device.type == "cpu":
        return jax.devices("cpu")[0]
    if device.type == "cuda":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        index = device.index or 0
        if index >= len(gpus):
            raise ValueError(f"device {str(device)!r}: JAX sees {len(gpus)} GPU(s) (backend "
                             f"{jax.default_backend()!r}); smax:<map> on CUDA needs a CUDA build of jaxlib "
                             f"(pip install 'jax[cuda12]' at the pinned version), or use device='cpu'")
        return gpus[index]
    raise ValueError(f"smax:<map> envs run on 'cpu' or 'cuda', got device {str(device)!r}")


class _Compiled:
    """One SMAX config: the JaxMARL env and the jitted, batched step (with reset and auto-reset)."""

    def __init__(self, smax, map_name: str, smax_kwargs: dict, jax_device):
        import jax
        import jax.numpy as jnp

        self.device = jax_device
        # episodes end here (episode_limit is an input of the compiled step), never by SMAX's max_steps
        self.env = env = smax.HeuristicEnemySMAX(scenario=smax.map_name_to_scenario(map_name),
                                                 max_steps=2**31 - 1, **smax_kwargs)
        sm = env._env  # the two-team SMAX underneath
        N, M = env.num_allies, env.num_enemies
        self.n_allies, self.n_enemies = N, M
        self.n_actions = int(sm.num_ally_actions)
        self.obs_dim = int(sm.obs_size)
        self.state_dim = int(sm.state_size)
        agents = env.agents
        n_types = len(sm.unit_type_names)
        f32 = jnp.float32

        def allies(d):
            return jnp.stack([d[a] for a in agents])

        def avail_of(st):
            return allies(env.get_avail_actions(st)).astype(bool)

        def state_of(st):
            s = st.state
            types_ = s.unit_types.astype(jnp.int32)
            health = s.unit_health / sm.unit_type_health[types_]
            pos = s.unit_positions / jnp.array([sm.map_width, sm.map_height], f32)
            cool = jnp.clip(s.unit_weapon_cooldowns / sm.unit_type_weapon_cooldowns[types_], 0.0, 1.0)
            feats = jnp.concatenate([health[:, None], pos, cool[:, None], jax.nn.one_hot(types_, n_types)], -1)
            feats = feats * s.unit_alive[:, None]
            return jnp.concatenate([feats.reshape(-1), s.unit_teams.astype(f32),
                                    types_.astype(f32) / (n_types - 1)]).astype(f32)

        def no_weak(x):  # the carry must keep exact avals, or every call would recompile
            return jax.lax.convert_element_type(x, x.dtype)

        def core(carry, action, force, env_key, limit, slip_prob):
            st, t, ep, ret = carry
            key = jax.random.fold_in(jax.random.fold_in(env_key, ep), t + 1)
            ok = jnp.take_along_axis(avail_of(st), action[:, None], 1)[:, 0]
            action = jnp.where(ok, action, STOP)
            slip = jax.random.uniform(jax.random.fold_in(key, 1), (N,)) < slip_prob
            action = jnp.where(slip, STOP, action)
            obs_s, st_s, rew, _, _ = env.step_env(jax.random.fold_in(key, 0), st,
                                                   {a: action[i] for i, a in enumerate(agents)})
            alive = st_s.state.unit_alive
            allies_dead, enemies_dead = ~alive[:N].any(), ~alive[N:].any()
            won = enemies_dead & ~allies_dead
            t1 = t + 1
            terminated = (allies_dead | enemies_dead) & ~force
            truncated = (t1 >= limit) & ~terminated & ~force
            done = terminated | truncated | force
            reward = rew[agents[0]].astype(f32)  # the team reward, the same for every ally
            ret1 = ret + reward
            ep1 = ep + done.astype(ep.dtype)
            obs_r, st_r = env.reset(jax.random.fold_in(jax.random.fold_in(env_key, ep1), 0))
            st_n = jax.tree.map(lambda r, s: no_weak(jnp.where(done, r, s)), st_r, st_s)
            final_obs, final_state, final_avail = allies(obs_s).astype(f32), state_of(st_s), avail_of(st_s)
            obs = jnp.where(done, allies(obs_r).astype(f32), final_obs)
            state = jnp.where(done, state_of(st_r), final_state)
            avail = jnp.where(done, avail_of(st_r), final_avail)
            t_next = no_weak(jnp.where(done, 0, t1))
            out = (jnp.stack([obs, final_obs]), jnp.stack([state, final_state]), jnp.stack([avail, final_avail]),
                   jnp.stack([reward, ret1]), jnp.stack([terminated, truncated, won & terminated]),
                   jnp.stack([(~alive[:N]).sum(), (~alive[N:]).sum(), t1, t_next, ep1]).astype(jnp.int32))
            return (st_n, t_next, ep1, no_weak(jnp.where(done, 0.0, ret1))), out

        batched = jax.vmap(core, in_axes=(0, 0, 0, 0, None, None))

        def step(carry, action, force, env_keys, limit, slip_prob):
            carry, out = batched(carry, action, force, env_keys, limit, slip_prob)
            # env axis second: out[k][:E] is a contiguous block, one DLPack hand-over per group
            return carry, tuple(jnp.moveaxis(x, 0, 1) for x in out)

        self.step = jax.jit(step)
        _, st_shape = jax.eval_shape(env.reset, jax.random.key(0))
        self._st_shape = st_shape

    def dummy_carry(self, batch: int):
        """Zeros in the shape of a batch of states; only ever replaced by a forced reset."""
        import jax
        import jax.numpy as jnp

        with jax.default_device(self.device):
            st = jax.tree.map(lambda x: jnp.zeros((batch,) + x.shape, x.dtype), self._st_shape)
            zi = jnp.zeros((batch,), jnp.int32)
            return jax.device_put((st, zi, zi, jnp.zeros((batch,), jnp.float32)), self.device)


class SMAXEnv(BatchedEnv):
    """``num_envs`` SMAX battles of one map against the heuristic enemy, on torch tensors.

    ``episode_limit`` (default 100) and ``slip_prob`` (default 0) are ours; other keyword arguments
    go to JaxMARL's ``HeuristicEnemySMAX`` / ``SMAX`` (e.g. ``attack_mode="random"`` for enemies that
    pick a random target in range, ``won_battle_bonus=1.0``, ``see_enemy_actions=True``,
    ``walls_cause_death=True``). ``self.smax_env`` is that JaxMARL env.
    """

    def __init__(self, map_name: str, num_envs: int = 1, seed: int = 0, device="cpu",
                 episode_limit: int = DEFAULT_EPISODE_LIMIT, slip_prob: float = 0.0, **smax_kwargs):
        self.episode_limit = require_int("episode_limit", episode_limit, 1)
        self.slip_prob = require_float("slip_prob", slip_prob, 0.0, 1.0)
        reserved = [k for k in smax_kwargs if k in _RESERVED]
        if reserved:
            raise ValueError(f"smax option {reserved[0]!r} is set by the adapter (the map fixes the teams, "
                             f"episode_limit the step limit, actions are discrete)")
        if "attack_mode" in smax_kwargs and smax_kwargs["attack_mode"] not in ("closest", "random"):
            raise ValueError(f"attack_mode must be 'closest' or 'random', got {smax_kwargs['attack_mode']!r}")
        smax = _import_smax()
        _register_extra_maps(smax)
        registry = smax.smax_env.MAP_NAME_TO_SCENARIO
        if not isinstance(map_name, str) or map_name not in registry:
            raise ValueError(f"unknown SMAX map {map_name!r}; known maps: {', '.join(sorted(registry))}")
        scenario = registry[map_name]
        n_units = scenario.num_allies + scenario.num_enemies
        obs_all = n_units * (13 * (n_units - 1) + 10)  # every unit's observation, computed each step
        jax_device = _jax_device(torch.device(device))  # before any torch tensor is made there
        super().__init__(num_envs, seed, device, what=f"smax:{map_name}",
                         bytes_per_env=8 * 4 * (obs_all + 40 * n_units))  # ~8 live copies inside the step
        self.map_name = map_name
        key = (map_name, repr(sorted(smax_kwargs.items())), jax_device)
        if key not in _COMPILED:
            _COMPILED[key] = _Compiled(smax, map_name, smax_kwargs, jax_device)
        self._c = c = _COMPILED[key]
        self.smax_env = c.env
        self.n_agents, self.n_enemies = c.n_allies, c.n_enemies
        self.obs_dim, self.state_dim = c.obs_dim, c.state_dim
        self.action_space = gym.spaces.Discrete(c.n_actions)
        self.obs_low = torch.full((self.obs_dim,), -1.0, device=self.device)
        self.obs_high = torch.full((self.obs_dim,), 1.0, device=self.device)

        import jax
        import jax.numpy as jnp

        self._batch = _bucket(self.num_envs)
        s = self.seed & (2**64 - 1)
        root = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s & 0xFFFFFFFF), s >> 32)
        with jax.default_device(jax_device):
            keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(self._batch, dtype=jnp.uint32))
            self._keys = jax.device_put(keys, jax_device)
            self._limit = jax.device_put(jnp.int32(self.episode_limit), jax_device)
            self._slip = jax.device_put(jnp.float32(self.slip_prob), jax_device)
            self._no_force = jax.device_put(jnp.zeros((self._batch,), bool), jax_device)
            self._all_force = jax.device_put(jnp.ones((self._batch,), bool), jax_device)
        self._carry = None  # JAX state of every env; None until the first reset
        self._out = None  # the last step's JAX outputs (torch shares their memory)

    # --- JAX <-> torch --------------------------------------------------------------------------
    def _run(self, actions: np.ndarray, force):
        """One compiled call; the outputs as torch tensors that share JAX's memory."""
        self._carry, self._out = self._c.step(self._carry, actions, force, self._keys, self._limit, self._slip)
        E = self.num_envs
        obs, state, avail, fvec, bvec, ivec = (torch.from_dlpack(x) for x in self._out)
        ivec = ivec.long()  # int64 like every other env's counters (a copy of 5 x E numbers)
        self.t, self.episode_count = ivec[3, :E], ivec[4, :E]
        return dict(obs=obs[0, :E], final_obs=obs[1, :E], state=state[0, :E], final_state=state[1, :E],
                    avail=avail[0, :E], final_avail=avail[1, :E], reward=fvec[0, :E], episode_return=fvec[1, :E],
                    terminated=bvec[0, :E], truncated=bvec[1, :E], success=bvec[2, :E], battle_won=bvec[2, :E],
                    dead_allies=ivec[0, :E], dead_enemies=ivec[1, :E], episode_length=ivec[2, :E])

    # --- BatchedEnv API ---------------------------------------------------------------------------
    def reset(self):
        """Start a new episode in every env; returns ``obs, state, avail``."""
        if self._carry is None:
            self._carry = self._c.dummy_carry(self._batch)
        out = self._run(np.full((self._batch, self.n_agents), STOP, np.int32), self._all_force)
        self._needs_reset = False
        return out["obs"], out["state"], out["avail"]

    def step(self, actions: torch.Tensor):
        """One compiled call: SMAX steps every env and resets the finished ones (see ``BatchedEnv``)."""
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        actions = self._check_actions(actions)
        # numpy in: a jit argument from numpy costs ~20 us, a separate device_put ~200 us (and mixing
        # the two would compile the step twice)
        acts = np.full((self._batch, self.n_agents), STOP, np.int32)
        acts[:self.num_envs] = actions.cpu().numpy()
        out = self._run(acts, self._no_force)
        info = {k: out[k] for k in ("final_obs", "final_state", "final_avail", "success", "episode_return",
                                    "episode_length", "battle_won", "dead_allies", "dead_enemies")}
        return (out["obs"], out["state"], out["avail"], out["reward"], out["terminated"],
                out["truncated"], info)

    def null_action(self, avail: torch.Tensor | None = None) -> torch.Tensor:
        """Stop (action 4) for every agent, int64 ``[N]``: SMAX has no no-op; stop is available to every
        unit (for a dead unit it is the only available action), so a disabled unit holds its ground and
        does not fire."""
        return torch.full((self.n_agents,), STOP, dtype=torch.int64, device=self.device)

    def obs_bounds(self):
        """``(-1, 1)`` for every observation feature (also ``self.obs_low`` / ``self.obs_high``)."""
        return self.obs_low, self.obs_high

    def close(self) -> None:
        """Drop the JAX state (the compiled step stays cached for other envs of the map)."""
        self._carry = self._out = None
        self._needs_reset = True

