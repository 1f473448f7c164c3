"""Quadrotor swarm (Crazyflie) in a 10 m room, batched on torch.

A vectorised re-implementation of the multi-drone environment of quad-swarm-rl (QuadSwarm,
Huang et al.), with its Crazyflie constants, observation, reward and two scenarios. Every
env of the batch holds ``n_agents`` drones; observations, rewards and the exposed state are
``[E, N, ...]`` tensors, and one ``step`` advances every drone of every env with batched tensor
ops (no Python loop over envs or agents, only over the physics sub-steps). CPU or CUDA.

Physics, per 5 ms sub-step (``SIM_DT``), in the order of quad-swarm-rl:

1. Motors: a first-order lag on ``sqrt(cmd)`` (``rot += 4·dt/0.15·(sqrt(cmd) − rot)``, i.e.
   0.15 s to settle), normalised thrust ``rot²`` (plus optional thrust noise), thrust per motor
   ``T_k = thrust_max·rot_k²`` with ``thrust_max = g·m·1.9/4 = 0.1305 N``; body torque
   ``Σ_k r_k × (0, 0, T_k) + ẑ·0.006·thrust_max·ccw_k·rot_k²``.
2. Attitude: exact Rodrigues step of the rotation matrix (body → world) with the body rate
   ω, ``R ← R·exp(dt·[ω]×)``; Gram–Schmidt re-orthonormalisation every 100 sub-steps (0.5 s).
3. Body rates: ``ω̇ = I⁻¹(τ − ω × Iω)`` (diagonal inertia, gyroscopic term included),
   ``ω += dt·ω̇``, each component clipped to ±40 rad/s.
4. Position with the old velocity, clipped to the room ``[-5, 5]² × [0, 10]``; on a new
   wall/ceiling contact the normal velocity is reflected and scaled by U(0.2, 0.8) and the body
   rate gets a random kick of magnitude U(10π, 20π) (clipped to ±40); while in contact the
   velocity into the wall is zeroed.
5. Floor (height ≤ arm = 0.046 m): on first contact the drone stops (v = ω = 0, motor filter
   reset) and is laid flat keeping its yaw; while on the floor it stays flat, cannot sink or
   slide, and takes off again as soon as its thrust exceeds its weight.
6. ``acc = R·(0, 0, ΣT)/m − g·ẑ``, ``v += dt·acc``.

Constants (quad-swarm-rl ``crazyflie_params`` / ``QuadLink``): mass 0.028 kg, diagonal inertia
``[1.367e-5, 1.436e-5, 2.656e-5]`` kg·m², motors at ``(±0.0325, ±0.0325)`` m in X
configuration (front-right, back-right, back-left, front-left; spin ``[-1, 1, -1, 1]``), arm
0.046 m, thrust-to-weight 1.9, torque-to-thrust 0.006, g = 9.81, no drag.

Drone–drone collisions are checked once per control step: a pair collides when its distance is
≤ 2·arm = 0.092 m. For every drone that enters a *new* colliding pair, its velocity component
along the contact normal is exchanged with the partner's (nearest new partner if several), the
result is scaled by U(0.2, 0.8), a separating kick of |N(0, 0.8)| m/s along the normal is added,
and its body rate gets a random kick of magnitude U(10π, 20π) clipped to ±40 rad/s: a collision
knocks both drones into a tumble.

Action modes:

- ``"motors"`` (faithful): ``Box(-1, 1, (4,))`` raw motor commands, ``cmd = (a + 1)/2``; hover
  is ``a ≈ 2/1.9 − 1 ≈ 0.053``. 100 Hz control (2 sub-steps), 15 s = 1500 steps per episode.
- ``"vel13"``: ``Discrete(13)`` velocity set-points ``VEL13_SETPOINTS`` (0, then ±x, ±y, ±z at
  0.25 m/s, then at 1.0 m/s) tracked by an inner loop run every sub-step (``VelocityYawControl``
  / Mellinger, as in quad-swarm-rl): ``acc_des = clip(5·(v_des − v), ±6) + g·ẑ``; desired
  attitude from ``acc_des`` with the fixed heading ``x_c = x̂``; ``e_R = ½·vee(R_dᵀR − RᵀR_d)``
  with its yaw component × 0.2; ``ω̇_des = −200·e_R − 50·ω``;
  ``cmd = clip(J⁻¹·[acc_des·R ẑ, ω̇_des], 0, 1)`` with the nominal thrust/torque Jacobian
  ``J``. 20 Hz control (10 sub-steps), 10 s = 200 steps per episode.

Observation of agent i (``obs_dim = 18 + 6·K``, no agent id): ``[p_i − g_i, v_i, R_i (row-major,
body → world), ω_i (body)]`` then, for its K nearest neighbours by the metric
``d_ij + p̂_ij·(v_j − v_i)`` (closest first; when ``K = N − 1`` all others in index order, as in
quad-swarm-rl), ``[p_j − p_i, v_j − v_i]`` clipped to ±10 m (never active inside the room) and
±6 m/s. With ``sensor_noise``
the own position, velocity and body rate get Gaussian noise of std 0.005 m, 0.01 m/s and
1.75e-4 rad/s. ``obs_feature_groups`` names these slices. State (``21·N``, noise-free):
concatenation over agents of ``[p, p − g, v, R, ω]``.

Reward of agent i per control step (quad-swarm-rl ``compute_reward_weighted`` weights):

    r_i = −c·(‖p_i − g_i‖ + 0.05·‖a_i‖ + crash_i + orient_i + 0.1·‖ω_i‖)
          − 5·new_collision_i − Σ_j 10·max(0, 1 − d_ij/(4·arm))·control_dt

with ``c = 0.005`` (sim dt, motors mode) or ``c = 0.5·control_dt = 0.025`` (vel13, so that the
return per second is the same), ``crash = 1`` on the floor, ``orient = −R_zz`` in the air and 1
on the floor, ``‖a‖`` the raw action norm (vel13: the equivalent raw motor command ``2·cmd − 1``
averaged over sub-steps). The team reward is the mean of ``r_i`` over agents.

Scenarios:

- ``"same-goal"`` (quad-swarm-rl ``static_same_goal``): every drone has the goal (0, 0, 2).
- ``"swarm-vs-swarm"``: agents ``[0, N//2)`` are team 0, the rest team 1. Centre 1 is
  ``(U(−2,2), U(−2,2), 2 + U(−1,1))``; centre 2 is centre 1 plus ``d·(sinθcosφ, sinθsinφ, cosθ)``
  with ``d ~ U(0.5, 2)`` (pushed out so the two formations cannot overlap), φ ~ U(−π, π),
  θ ~ U(−π/2, π/2). Each team's goals form a formation around its centre, drawn from 8 types
  (``FORMATIONS``: circle and grid in the horizontal, xz and yz planes, sphere, cube) with
  spacing U(0.25, 0.5) m, agents shuffled within their team. Every ``switch_steps`` control
  steps (U(4, 6) s, drawn per episode) the teams swap centres, a new formation is drawn and
  the goals are reshuffled, so the two half-swarms must fly through each other.

Spawn: goal + U(−2, 2)³ (z ≥ 0.75, kept inside the room), at rest, level, yaw facing the
origin ± 60°, motors idle (the motor filter starts at 0, as in quad-swarm-rl).

Episodes end by time limit only (``terminated`` is always False; the base class truncates at
``episode_limit``).

Success (``info["success"]`` at the end of an episode): every agent is within 0.5 m of its goal
at the last step, and no drone–drone collision started after the 1.5 s grace period.

Simplifications versus quad-swarm-rl (as allowed by the project's reference notes):

- no numba, rendering, obstacles, downwash, rotor drag (zero for the Crazyflie anyway), dynamics
  randomisation, collision-state replay buffer or collision-penalty annealing (the penalties
  are plain attributes, ``collision_penalty`` / ``proximity_penalty``, that a trainer may
  change);
- OU thrust noise → iid ``N(0, 0.01)·cmd`` per motor and control step; gyro bias/random walk →
  plain Gaussian noise; rotation matrix observed without noise;
- floor friction → no sliding on the floor (the drone is laid flat, so its thrust is vertical);
  body rates are zeroed while on the floor; an upside-down landing keeps its (projected) yaw
  instead of drawing a random one;
- wall/ceiling response → reflect the normal velocity × U(0.2, 0.8) plus the ω kick, instead of
  re-drawing the whole velocity;
- drone–drone response → normal-velocity exchange with the nearest new partner, × U(0.2, 0.8),
  separating kick |N(0, 0.8)| and independent random ω kicks (not equal and opposite);
  a "new collision" is a colliding *pair* that did not collide at the previous step;
- SVD re-orthonormalisation every 0.5 s → Gram–Schmidt every 100 sub-steps;
- spawn yaw drawn uniformly within ±60° of facing the origin (quad-swarm-rl rejection-samples
  the same set); the spawn box is clipped to the room;
- swarm-vs-swarm formations are our own parametrisation of the 8 types, per team of N/2;
- success uses the distance at the last step (quad-swarm-rl averages the last 5 steps);
- Gaussian noise is drawn by Box–Muller from 12-bit uniforms (each 24-bit counter-RNG uniform is
  split in two, halving the hashing cost), so it is truncated at ±4.2σ.

Implementation notes: all randomness comes from the base class's counter-based RNG (one stream
id per call site), so env 0 of a batch equals a batch of one, bit for bit (``atan2`` is avoided
because its vectorised and scalar CPU kernels differ in the last bit). The state is stored
component-first (``[3, E, N]`` vectors, ``[3, 3, E, N]`` rotations), which keeps every tensor op
contiguous over the batch; ``pos``, ``vel``, ``R``, ... are ``[E, N, ...]`` views of it.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch

from .core import BatchedEnv, require_float

# --- Crazyflie constants (quad-swarm-rl crazyflie_params / QuadLink) ----------------------------
GRAV = 9.81
MASS = 0.028
INERTIA = (1.367e-5, 1.436e-5, 2.656e-5)
MOTOR_XY = 0.065 / 2
# front-right, back-right, back-left, front-left (QuadLink x_sign/y_sign)
MOTOR_POS = ((MOTOR_XY, -MOTOR_XY), (-MOTOR_XY, -MOTOR_XY), (-MOTOR_XY, MOTOR_XY), (MOTOR_XY, MOTOR_XY))
PROP_CCW = (-1.0, 1.0, -1.0, 1.0)
ARM = math.hypot(MOTOR_XY, MOTOR_XY)  # 0.0460 m
THRUST_TO_WEIGHT = 1.9
TORQUE_TO_THRUST = 0.006
THRUST_MAX = GRAV * MASS * THRUST_TO_WEIGHT / 4.0  # per motor, 0.1305 N
TORQUE_MAX = TORQUE_TO_THRUST * THRUST_MAX
MOTOR_DAMP_TIME = 0.15  # s, up and down
OMEGA_MAX = 40.0
THRUST_NOISE_STD = 0.01
SENSOR_NOISE_STD = (0.005, 0.01, 1.75e-4)  # position, velocity, gyro
HOVER_CMD = 1.0 / THRUST_TO_WEIGHT
HOVER_ACTION = 2.0 * HOVER_CMD - 1.0

# --- simulation / task ---------------------------------------------------------------------------
SIM_DT = 0.005
ROOM_LO = (-5.0, -5.0, 0.0)
ROOM_HI = (5.0, 5.0, 10.0)
FLOOR_Z = ARM
HITBOX = 2.0 * ARM
PROX_FALLOFF = 4.0 * ARM
OBS_VEL_CLIP = 6.0
SAME_GOAL = (0.0, 0.0, 2.0)
SPAWN_BOX = 2.0
SPAWN_MIN_Z = 0.75
ORTHO_EVERY = 100  # sub-steps between Gram-Schmidt re-orthonormalisations
SUCCESS_RADIUS = 0.5
GRACE_SECONDS = 1.5

# reward weights (compute_reward_weighted)
W_POS, W_EFFORT, W_CRASH, W_ORIENT, W_SPIN = 1.0, 0.05, 1.0, 1.0, 0.1

# vel13 inner loop (VelocityYawControl / NonlinearPositionController gains)
KP_V, ACC_CLIP, KP_A, KD_A, YAW_GAIN = 5.0, 6.0, 200.0, 50.0, 0.2
VEL13_SETPOINTS = (
    (0.0, 0.0, 0.0),
    (0.25, 0.0, 0.0), (-0.25, 0.0, 0.0), (0.0, 0.25, 0.0), (0.0, -0.25, 0.0), (0.0, 0.0, 0.25), (0.0, 0.0, -0.25),
    (1.0, 0.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, -1.0),
)

FORMATIONS = ("circle_horizontal", "circle_vertical_xz", "circle_vertical_yz", "grid_horizontal",
              "grid_vertical_xz", "grid_vertical_yz", "sphere", "cube")
FORMATION_SPACING = (0.25, 0.5)
SWITCH_SECONDS = (4.0, 6.0)

SCENARIOS = ("same-goal", "swarm-vs-swarm")
ACTION_MODES = ("motors", "vel13")

# random stream ids, one per call site
_S_STEP, _S_OBS, _S_SPAWN, _S_SVS_RESET, _S_SVS_PERM, _S_SVS_SWAP = 1, 2, 10, 20, 21, 30


def _formation_unit_offsets(m: int) -> np.ndarray:
    """Goal offsets for a team of ``m`` drones at unit spacing, one ``[m, 3]`` array per type."""
    k = np.arange(m, dtype=np.float64)
    r = 0.0 if m < 2 else 1.0 / (2.0 * math.sin(math.pi / m))  # circle with neighbour spacing 1
    ang = 2.0 * math.pi * k / max(m, 1)
    circ = np.stack([r * np.cos(ang), r * np.sin(ang)], -1)
    cols = math.ceil(math.sqrt(m))
    rows = math.ceil(m / cols)
    grid = np.stack([k % cols - (cols - 1) / 2.0, k // cols - (rows - 1) / 2.0], -1)

    def plane(xy, axes):
        out = np.zeros((m, 3))
        out[:, axes[0]], out[:, axes[1]] = xy[:, 0], xy[:, 1]
        return out

    z = 1.0 - (2.0 * k + 1.0) / max(m, 1)  # Fibonacci sphere
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, 1.0))
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    sphere = r * np.stack([rho * np.cos(phi), rho * np.sin(phi), z], -1)
    side = 1
    while side ** 3 < m:
        side += 1
    lattice = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:m]
    cube = lattice - lattice.mean(0)
    return np.stack([plane(circ, (0, 1)), plane(circ, (0, 2)), plane(circ, (1, 2)),
                     plane(grid, (0, 1)), plane(grid, (0, 2)), plane(grid, (1, 2)), sphere, cube])


class QuadSwarm(BatchedEnv):
    """Batched Crazyflie swarm; the module docstring defines physics, observation and reward.

    Args:
        scenario: ``"same-goal"`` or ``"swarm-vs-swarm"`` (needs ``n_agents >= 2``).
        action_mode: ``"motors"`` (``Box(-1, 1, (4,))`` motor commands, 100 Hz) or ``"vel13"``
            (``Discrete(13)`` velocity set-points through the attitude controller, 20 Hz).
        num_envs, seed, device: batch size, seed, torch device (CPU or CUDA).
        n_agents: drones per env (default 8).
        n_neighbors: neighbours in each observation (default 6, clipped to ``n_agents − 1``;
            ``None`` or ``-1`` means all others).
        episode_limit: control steps per episode; default 15 s (1500 steps) for motors and
            10 s (200 steps) for vel13.
        sensor_noise: Gaussian noise on the observed own position, velocity and body rate.
        thrust_noise: multiplicative motor thrust noise (std 1% of the command).
        substeps: 5 ms physics sub-steps per control step; default 2 (motors) or 10 (vel13).
        collision_penalty: one-off penalty for entering a drone–drone collision (5.0).
        proximity_penalty: maximum proximity penalty rate per neighbour closer than 4·arm,
            multiplied by the control dt (10.0).
        thrust_scale: scales every motor's maximum thrust (weaker motors, for robustness tests;
            ``envs.env_shift_kwargs`` uses 0.8, which leaves a thrust-to-weight ratio of
            1.9·0.8 = 1.52, so a drone can still hover, at 66% instead of 53% of full thrust).
            The vel13 controller and ``null_action`` keep assuming the nominal thrust.

    Attributes besides the ``BatchedEnv`` ones: ``scenario``, ``action_mode``, ``control_dt``,
    ``sim_dt``, ``substeps``, ``n_neighbors``, ``grace_steps``, ``reward_factor``,
    ``collision_penalty``, ``proximity_penalty``, ``obs_feature_groups`` (name → slice of the
    observation: ``self.pos``, ``self.vel``, ``self.R``, ``self.omega``, ``nbr_k.pos``,
    ``nbr_k.vel``). Physical state, as read-only ``[E, N, ...]`` views of the internal
    component-first storage (change it with ``set_state``): ``pos``, ``vel``, ``omega`` (body
    rates), ``goal`` ``[E,N,3]``, ``R`` ``[E,N,3,3]`` (body → world), ``on_floor`` ``[E,N]``.
    Swarm-vs-swarm only: ``team`` ``[N]`` (0/1), ``centers`` ``[E,2,3]`` (team 0 flies to
    ``centers[:, side]``, team 1 to the other), ``side`` ``[E]`` bool, ``switch_steps`` ``[E]``
    (the teams swap every that many control steps), ``formation`` ``[E]`` (index into
    ``FORMATIONS``).

    ``step`` info keys besides the base ones (all about the step just taken, before any
    auto-reset): ``agent_rewards`` ``[E,N]`` (the team reward is their mean), ``dist``
    ``[E,N]`` distance to the goal, ``n_collisions`` ``[E]`` int64 number of new colliding
    pairs, ``new_collision`` ``[E,N]`` bool (agent entered a new collision, penalised),
    ``proximity_penalty`` ``[E,N]`` (≥ 0, already subtracted from the reward), ``on_floor``
    ``[E,N]`` bool.

    Success criterion (``info["success"]``): all agents within 0.5 m of their goals at the last
    step and no drone–drone collision after the 1.5 s grace period.
    """

    def __init__(self, scenario: str = "same-goal", action_mode: str = "motors", num_envs: int = 1,
                 seed: int = 0, device="cpu", n_agents: int = 8, n_neighbors: int | None = 6,
                 episode_limit: int | None = None, sensor_noise: bool = True, thrust_noise: bool = True,
                 substeps: int | None = None, collision_penalty: float = 5.0,
                 proximity_penalty: float = 10.0, thrust_scale: float = 1.0):
        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if scenario not in SCENARIOS:
            raise ValueError(f"unknown quads scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown quads action_mode {action_mode!r}; choose one of {', '.join(ACTION_MODES)}")
        if not is_int(n_agents) or n_agents < 1:
            raise ValueError(f"n_agents must be an integer >= 1, got {n_agents!r}")
        if scenario == "swarm-vs-swarm" and n_agents < 2:
            raise ValueError(f"scenario 'swarm-vs-swarm' needs n_agents >= 2 (two teams), got {n_agents}")
        if n_neighbors is None or (is_int(n_neighbors) and n_neighbors == -1):
            n_neighbors = n_agents - 1
        if not is_int(n_neighbors) or n_neighbors < 0:
            raise ValueError(f"n_neighbors must be an integer >= 0 (or -1/None for all), got {n_neighbors!r}")
        if substeps is None:
            substeps = 2 if action_mode == "motors" else 10
        if not is_int(substeps) or substeps < 1:
            raise ValueError(f"substeps must be an integer >= 1, got {substeps!r}")
        if episode_limit is None:
            episode_limit = round((15.0 if action_mode == "motors" else 10.0) / (SIM_DT * substeps))
        if not is_int(episode_limit) or episode_limit < 1:
            raise ValueError(f"episode_limit must be an integer >= 1, got {episode_limit!r}")
        require_float("thrust_scale", thrust_scale, 0.0, low_open=True)
        require_float("collision_penalty", collision_penalty, 0.0)
        require_float("proximity_penalty", proximity_penalty, 0.0)
        K = min(int(n_neighbors), n_agents - 1)
        obs_dim = 18 + 6 * K
        # peak per step, measured: ~96 bytes per agent pair (pairwise distances, collision masks,
        # neighbour sorting) and ~20 bytes per observation feature (obs, gathers, noise) + state
        super().__init__(num_envs, seed, device,
                         bytes_per_env=96.0 * n_agents ** 2 + 4.0 * n_agents * (5 * obs_dim + 60),
                         what=f"quads with n_agents={n_agents}, n_neighbors={K}")

        self.scenario, self.action_mode = scenario, action_mode
        self.n_agents = N = int(n_agents)
        self.n_neighbors = K = min(int(n_neighbors), N - 1)
        self.substeps = int(substeps)
        self.sim_dt = SIM_DT
        self.control_dt = SIM_DT * self.substeps
        self.episode_limit = int(episode_limit)
        self.sensor_noise, self.thrust_noise = bool(sensor_noise), bool(thrust_noise)
        self.collision_penalty = float(collision_penalty)
        self.proximity_penalty = float(proximity_penalty)
        self.thrust_scale = float(thrust_scale)
        self.grace_steps = round(GRACE_SECONDS / self.control_dt)
        # cost factor per control step: quad-swarm-rl multiplies by the sim dt at 100 Hz, which
        # is 0.5 per second; vel13 keeps that rate
        self.reward_factor = 0.005 if action_mode == "motors" else 0.5 * self.control_dt

        self.obs_dim = 18 + 6 * K
        self.state_dim = 21 * N
        if action_mode == "motors":
            self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        else:
            self.action_space = gym.spaces.Discrete(len(VEL13_SETPOINTS))
        groups = {"self.pos": slice(0, 3), "self.vel": slice(3, 6), "self.R": slice(6, 15), "self.omega": slice(15, 18)}
        for k in range(K):
            groups[f"nbr_{k}.pos"] = slice(18 + 6 * k, 21 + 6 * k)
            groups[f"nbr_{k}.vel"] = slice(21 + 6 * k, 24 + 6 * k)
        self.obs_feature_groups = groups

        self._build_constants()
        # state, component-first: vectors [3, E, N], rotation [3, 3, E, N], motors [4, E, N]
        E, dev = self.num_envs, self.device
        z3 = torch.zeros(3, E, N, device=dev)
        self._p, self._v, self._w, self._g = z3.clone(), z3.clone(), z3.clone(), z3.clone()
        self._R = self._eye33.expand(3, 3, E, N).clone()
        self._m = torch.zeros(4, E, N, device=dev)
        self.on_floor = torch.zeros(E, N, device=dev, dtype=torch.bool)
        self._wall_contact = torch.zeros(E, N, device=dev, dtype=torch.bool)
        self._prev_col = torch.zeros(E, N, N, device=dev, dtype=torch.bool)
        self._collided = torch.zeros(E, device=dev, dtype=torch.bool)
        if scenario == "swarm-vs-swarm":
            self.team = (torch.arange(N, device=dev) >= N // 2).long()
            self.centers = torch.zeros(E, 2, 3, device=dev)
            self.side = torch.zeros(E, device=dev, dtype=torch.bool)
            self.switch_steps = torch.ones(E, device=dev, dtype=torch.int64)
            self.formation = torch.zeros(E, device=dev, dtype=torch.int64)
        self._substep_count = 0
        self._pair_cache = None
        self._reset_envs(torch.ones(E, dtype=torch.bool, device=dev))

    # --- public views of the state -------------------------------------------------------------
    @property
    def pos(self) -> torch.Tensor:
        return self._p.permute(1, 2, 0)

    @property
    def vel(self) -> torch.Tensor:
        return self._v.permute(1, 2, 0)

    @property
    def omega(self) -> torch.Tensor:
        return self._w.permute(1, 2, 0)

    @property
    def goal(self) -> torch.Tensor:
        return self._g.permute(1, 2, 0)

    @property
    def R(self) -> torch.Tensor:
        return self._R.permute(2, 3, 0, 1)

    # --- constants ---------------------------------------------------------------------------
    def _build_constants(self):
        dev, f32 = self.device, torch.float32
        E, N, K = self.num_envs, self.n_agents, self.n_neighbors
        f64 = torch.float64
        I = torch.tensor(INERTIA, dtype=f64)  # noqa: E741 (the inertia tensor's usual name)
        rxy = torch.tensor(MOTOR_POS, dtype=f64)
        ccw = torch.tensor(PROP_CCW, dtype=f64)
        # actuation per unit motor command: torque of motor k from its thrust is
        # r_k x (0, 0, T_k) = T_k (y_k, -x_k, 0); yaw torque from the prop drag; total thrust
        act = torch.stack([THRUST_MAX * rxy[:, 1], -THRUST_MAX * rxy[:, 0], TORQUE_MAX * ccw,
                           torch.full((4,), THRUST_MAX, dtype=f64)])  # [4 outputs, 4 motors]
        # dynamics: (angular acc [3], thrust acc [1]) = mix @ cmd
        mix = act * self.thrust_scale / torch.cat([I, torch.tensor([MASS], dtype=f64)])[:, None]
        self._mix = mix.to(dev, f32).view(4, 4, 1, 1)
        # vel13: quad-swarm-rl quadrotor_jacobian, rows (thrust acc, angular acc xyz), nominal thrust
        jac = torch.stack([act[3] / MASS, act[0] / I[0], act[1] / I[1], act[2] / I[2]])
        self._jinv = torch.linalg.inv(jac).to(dev, f32).view(4, 4, 1, 1)  # cmd = jinv @ des
        self._gyro = torch.tensor([(I[2] - I[1]) / I[0], (I[0] - I[2]) / I[1], (I[1] - I[0]) / I[2]],
                                  dtype=f64).to(dev, f32).view(3, 1, 1)
        self._motor_tau = min(1.0, 4.0 * SIM_DT / MOTOR_DAMP_TIME)
        self._eye33 = torch.eye(3, device=dev, dtype=f32).view(3, 3, 1, 1)
        self._roll1 = torch.tensor([1, 2, 0], device=dev)
        self._roll2 = torch.tensor([2, 0, 1], device=dev)
        self._setpoints = torch.tensor(VEL13_SETPOINTS, device=dev, dtype=f32).T.contiguous()  # [3, 13]
        self._sensor_std = torch.tensor(SENSOR_NOISE_STD, device=dev, dtype=f32).repeat_interleave(3).view(9, 1, 1)
        self._diag_inf = torch.zeros(N, N, device=dev, dtype=f32).fill_diagonal_(float("inf"))
        # flat row offsets for the neighbour gather from [E*N, 6] rows
        self._row_base = (torch.arange(E, device=dev) * N).view(E, 1, 1)
        if K > 0:
            self._own_rows = torch.arange(E * N, device=dev).repeat_interleave(K)
            if K == N - 1:  # all neighbours, in index order (no sorting)
                idx = torch.arange(N, device=dev).expand(N, N)[~torch.eye(N, dtype=torch.bool, device=dev)]
                self._all_rows = (idx.view(1, N, N - 1) + self._row_base).reshape(-1)
        if self.scenario == "swarm-vs-swarm":
            n0 = N // 2
            table = np.zeros((len(FORMATIONS), N, 3))
            table[:, :n0] = _formation_unit_offsets(n0)
            table[:, n0:] = _formation_unit_offsets(N - n0)
            self._form_table = torch.tensor(table, device=dev, dtype=f32)
            radius = float(np.linalg.norm(table, axis=-1).max())
            self._form_zext = float(np.abs(table[..., 2]).max() * FORMATION_SPACING[1])
            # centre distance such that two formations of the largest spacing cannot overlap
            self._min_center_dist = 2.0 * radius * FORMATION_SPACING[1] + 2.0 * HITBOX
            self._center_lo = torch.tensor([-4.5, -4.5, 0.25 + self._form_zext], device=dev)
            self._center_hi = torch.tensor([4.5, 4.5, 9.0], device=dev)
        self._spawn_lo = torch.tensor([ROOM_LO[0] + 0.5, ROOM_LO[1] + 0.5, SPAWN_MIN_Z], device=dev).view(3, 1, 1)
        self._spawn_hi = torch.tensor([ROOM_HI[0] - 0.5, ROOM_HI[1] - 0.5, ROOM_HI[2] - 0.5], device=dev).view(3, 1, 1)
        self._same_goal = torch.tensor(SAME_GOAL, device=dev, dtype=f32).view(3, 1, 1)

    # --- helpers -----------------------------------------------------------------------------
    def _uniform_cf(self, k: int, stream: int) -> torch.Tensor:
        """``k`` uniforms per agent, component-first ``[k, E, N]``."""
        return self._uniform((k, self.n_agents), stream).transpose(0, 1).contiguous()

    def _uniform12_cf(self, k: int, stream: int) -> torch.Tensor:
        """``2k`` uniforms in (0, 1) per agent, ``[2k, E, N]``, at 12-bit resolution.

        Each 24-bit uniform of the counter RNG is split exactly into its high and low 12 bits:
        half the hashing cost, plenty for noise and collision kicks.
        """
        u = self._uniform_cf(k, stream).mul_(4096.0)  # exact: u has 24 significant bits
        hi = torch.floor(u)
        return torch.cat([hi, (u - hi).mul_(4096.0)], 0).add_(0.5).mul_(1.0 / 4096.0)

    @staticmethod
    def _box_muller(r_u: torch.Tensor, a_u: torch.Tensor) -> torch.Tensor:
        """Uniforms ``[k, ...]`` (radius) and ``[k, ...]`` (angle) -> ``2k`` standard normals."""
        r = torch.sqrt(-2.0 * torch.log(r_u))
        a = (2.0 * math.pi) * a_u
        return torch.cat([r * torch.cos(a), r * torch.sin(a)], 0)

    @staticmethod
    def _yaw_matrix(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Rotation about z, ``[3, 3, *c.shape]``."""
        z, o = torch.zeros_like(c), torch.ones_like(c)
        return torch.stack([c, -s, z, s, c, z, z, z, o]).view(3, 3, *c.shape)

    @staticmethod
    def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cross product of component-first vectors ``[3, ...]``."""
        return torch.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])

    @staticmethod
    def _orthonormalise(R: torch.Tensor) -> torch.Tensor:
        """Gram-Schmidt on the columns of ``R`` ``[3, 3, E, N]``."""
        x, y = R[:, 0], R[:, 1]
        x = x * torch.rsqrt(x.square().sum(0))
        y = y - (x * y).sum(0) * x
        y = y * torch.rsqrt(y.square().sum(0))
        return torch.stack([x, y, QuadSwarm._cross(x, y)], 1)

    # --- scenario ----------------------------------------------------------------------------
    def _formation_goals(self, u: torch.Tensor, side: torch.Tensor):
        """Goals ``[3, E, N]`` of a new formation from uniforms ``u`` ``[E, 2 + N]``."""
        E, N = self.num_envs, self.n_agents
        ftype = (u[:, 0] * len(FORMATIONS)).long().clamp_(max=len(FORMATIONS) - 1)
        spacing = FORMATION_SPACING[0] + (FORMATION_SPACING[1] - FORMATION_SPACING[0]) * u[:, 1]
        # a random permutation within each team: sort uniforms offset by the team index
        slot = torch.argsort(u[:, 2:] + 2.0 * self.team.to(u.dtype), dim=1)  # [E, N]
        offs = self._form_table[ftype].gather(1, slot.unsqueeze(-1).expand(E, N, 3))
        centre_idx = self.team.view(1, N) ^ side.long().view(E, 1)  # [E, N]: 0 -> centers[:, 0]
        centre = self.centers.gather(1, centre_idx.unsqueeze(-1).expand(E, N, 3))
        goal = centre + offs * spacing.view(E, 1, 1)
        return goal.permute(2, 0, 1).contiguous(), ftype

    def _reset_envs(self, mask: torch.Tensor) -> None:
        E, N = self.num_envs, self.n_agents
        self._pair_cache = None
        if self.scenario == "same-goal":
            goal = self._same_goal.expand(3, E, N)
        else:
            u = self._uniform((7,), _S_SVS_RESET)
            c1 = torch.stack([4.0 * u[:, 0] - 2.0, 4.0 * u[:, 1] - 2.0, 1.0 + 2.0 * u[:, 2]], -1)
            d = (0.5 + 1.5 * u[:, 3]).clamp(min=self._min_center_dist)
            phi = math.pi * (2.0 * u[:, 4] - 1.0)
            th = math.pi * (u[:, 5] - 0.5)
            c2 = c1 + d.unsqueeze(-1) * torch.stack([th.sin() * phi.cos(), th.sin() * phi.sin(), th.cos()], -1)
            centers = torch.stack([c1, c2], 1).clamp(self._center_lo, self._center_hi)
            self.centers = torch.where(mask.view(E, 1, 1), centers, self.centers)
            period = SWITCH_SECONDS[0] + (SWITCH_SECONDS[1] - SWITCH_SECONDS[0]) * u[:, 6]
            switch = torch.round(period / self.control_dt).long().clamp_(min=1)
            self.switch_steps = torch.where(mask, switch, self.switch_steps)
            self.side = self.side & ~mask
            goal, ftype = self._formation_goals(self._uniform((2 + N,), _S_SVS_PERM), self.side)
            self.formation = torch.where(mask, ftype, self.formation)
        m = mask.view(E, 1)
        self._g = torch.where(m, goal, self._g)

        u = self._uniform_cf(4, _S_SPAWN)
        pos = (self._g + SPAWN_BOX * (2.0 * u[:3] - 1.0)).clamp(self._spawn_lo, self._spawn_hi)
        # heading towards the origin (no atan2: its vectorised and scalar paths differ, which
        # would break batch independence), rotated by U(-60°, 60°)
        hx, hy = -pos[0], -pos[1]
        hn = torch.sqrt(hx * hx + hy * hy)
        ok = hn > 1e-6
        hx = torch.where(ok, hx / hn.clamp(min=1e-6), 1.0)
        hy = torch.where(ok, hy / hn.clamp(min=1e-6), 0.0)
        delta = (math.pi / 3.0) * (2.0 * u[3] - 1.0)
        cd, sd = torch.cos(delta), torch.sin(delta)
        R = self._yaw_matrix(hx * cd - hy * sd, hy * cd + hx * sd)
        self._p = torch.where(m, pos, self._p)
        self._R = torch.where(m, R, self._R)
        self._v = self._v.masked_fill(m, 0.0)
        self._w = self._w.masked_fill(m, 0.0)
        self._m = self._m.masked_fill(m, 0.0)
        self.on_floor = self.on_floor & ~m
        self._wall_contact = self._wall_contact & ~m
        self._prev_col = self._prev_col & ~mask.view(E, 1, 1)
        self._collided = self._collided & ~mask

    def set_state(self, pos=None, vel=None, R=None, omega=None, goal=None, motor=None):
        """Overwrite the physical state of every env (tests, demos, scripted scenarios).

        Each argument is optional and broadcast to its full shape: ``pos``, ``vel``, ``omega``
        (body rates), ``goal`` to ``[E, N, 3]``, ``R`` (body → world) to ``[E, N, 3, 3]``,
        ``motor`` (the normalised thrust in [0, 1] the motors currently produce) to
        ``[E, N, 4]``. Contact and collision memories are cleared (a pair placed in contact
        counts as a new collision at the next step); step and episode counters are unchanged.
        Returns ``obs, state, avail`` of the new state.
        """
        E, N = self.num_envs, self.n_agents

        def cf(x, tail):
            x = torch.as_tensor(x, dtype=torch.float32, device=self.device).expand(E, N, *tail)
            return x.permute(*range(2, 2 + len(tail)), 0, 1).contiguous()

        if pos is not None:
            self._p = cf(pos, (3,))
        if vel is not None:
            self._v = cf(vel, (3,))
        if omega is not None:
            self._w = cf(omega, (3,))
        if goal is not None:
            self._g = cf(goal, (3,))
        if R is not None:
            self._R = cf(R, (3, 3))
        if motor is not None:
            self._m = cf(motor, (4,)).clamp_(0.0, 1.0).sqrt_()
        self.on_floor = torch.zeros_like(self.on_floor)
        self._wall_contact = torch.zeros_like(self._wall_contact)
        self._prev_col = torch.zeros_like(self._prev_col)
        self._pair_cache = None
        return self._observe()

    def null_action(self, avail: torch.Tensor | None = None) -> torch.Tensor:
        """Motors: the nominal hover command ``HOVER_ACTION`` for every agent, ``[N, 4]`` float32
        (what a disabled drone's firmware outputs; with ``thrust_scale < 1`` it sinks). vel13:
        set-point 0 (zero velocity), int64 ``[N]``."""
        if self.is_discrete:
            return super().null_action()
        return torch.full((self.n_agents, 4), HOVER_ACTION, dtype=torch.float32, device=self.device)

    def obs_bounds(self):
        """Bounds of the observation for the states ``reset`` and ``step`` reach (``set_state`` can
        leave them): position relative to the goal from the room and the goals' range, rotation
        matrix ±1, body rates ±40 rad/s, neighbours ±10 m and ±6 m/s, plus the largest sensor noise
        (the Box–Muller normals are truncated at ±4.25σ). The own velocity has no bound (±inf)."""
        if self.scenario == "same-goal":
            g_lo = g_hi = torch.tensor(SAME_GOAL, dtype=torch.float64)
        else:  # formation centres are clamped to a box; offsets scale with the spacing
            offs = self._form_table.double().reshape(-1, 3).cpu()
            o_lo = torch.minimum(offs.min(0).values * FORMATION_SPACING[0], offs.min(0).values * FORMATION_SPACING[1])
            o_hi = torch.maximum(offs.max(0).values * FORMATION_SPACING[0], offs.max(0).values * FORMATION_SPACING[1])
            g_lo = self._center_lo.double().cpu() + o_lo
            g_hi = self._center_hi.double().cpu() + o_hi
        room_lo = torch.tensor([ROOM_LO[0], ROOM_LO[1], FLOOR_Z], dtype=torch.float64)
        room_hi = torch.tensor(ROOM_HI, dtype=torch.float64)
        noise = 4.25 * torch.tensor(SENSOR_NOISE_STD, dtype=torch.float64) * float(self.sensor_noise)
        inf = torch.full((3,), math.inf, dtype=torch.float64)
        extent = room_hi - room_lo
        own_hi = torch.cat([room_hi - g_lo + noise[0], inf, torch.ones(9, dtype=torch.float64),
                            torch.full((3,), OMEGA_MAX + noise[2].item(), dtype=torch.float64)])
        own_lo = torch.cat([room_lo - g_hi - noise[0], -inf, -torch.ones(9, dtype=torch.float64),
                            torch.full((3,), -OMEGA_MAX - noise[2].item(), dtype=torch.float64)])
        nbr = torch.cat([extent, torch.full((3,), OBS_VEL_CLIP, dtype=torch.float64)]).repeat(self.n_neighbors)
        low, high = torch.cat([own_lo, -nbr]), torch.cat([own_hi, nbr])
        return low.to(self.device, torch.float32), high.to(self.device, torch.float32)

    # --- dynamics ----------------------------------------------------------------------------
    def _vel_controller(self, v_des: torch.Tensor) -> torch.Tensor:
        """vel13 inner loop, one sub-step: velocity set-points ``[3,E,N]`` -> motor cmds ``[4,E,N]``."""
        R, w = self._R, self._w
        acc = (KP_V * (v_des - self._v)).clamp_(-ACC_CLIP, ACC_CLIP)
        acc[2] += GRAV
        zb = acc * torch.rsqrt(acc.square().sum(0))
        zx, zy, zz = zb.unbind(0)
        # yb = normalize(zb x x_c) with the fixed heading x_c = (1, 0, 0): (0, zb_z, -zb_y)
        inv = torch.rsqrt((zy * zy + zz * zz).clamp(min=1e-12))
        yy, yz = zz * inv, -zy * inv
        # rows of R_des^T: xb = yb x zb, yb, zb
        B = torch.stack([yy * zz - yz * zy, yz * zx, -yy * zx,
                         torch.zeros_like(yy), yy, yz, zx, zy, zz]).view(3, 3, *zx.shape)
        A = B[:, 0:1] * R[0:1]  # A = R_des^T R, [3, 3, E, N]
        A.addcmul_(B[:, 1:2], R[1:2]).addcmul_(B[:, 2:3], R[2:3])
        e_r = torch.stack([A[2, 1] - A[1, 2], A[0, 2] - A[2, 0], YAW_GAIN * (A[1, 0] - A[0, 1])])
        des = torch.cat([(acc * R[:, 2]).sum(0, keepdim=True), (-0.5 * KP_A) * e_r - KD_A * w], 0)
        return (self._jinv * des.unsqueeze(0)).sum(1).clamp_(0.0, 1.0)

    def _substep(self, sq_cmd, noise, wall_u, kick):
        dt = self.sim_dt
        # 1. motors: first-order lag on sqrt(cmd), normalised thrust rot^2 (+ noise)
        m = self._m
        m.lerp_(sq_cmd, self._motor_tau)
        cd = m.square()
        if noise is not None:
            cd.add_(noise).clamp_(0.0, 1.0)
        out = (self._mix * cd.unsqueeze(0)).sum(1)  # [4,E,N]: angular acc (3), thrust acc (1)
        # 2. attitude: R <- R exp(dt [w]x), Rodrigues with the body-frame rate
        w = self._w
        wn = w.square().sum(0).sqrt_()
        u = w / wn.clamp(min=1e-12)
        th = wn * dt
        c = torch.cos(th)
        su = torch.sin(th) * u
        D = (u.unsqueeze(1) * u.unsqueeze(0)).mul_(1.0 - c).addcmul_(self._eye33, c)
        D[0, 1] -= su[2]
        D[0, 2] += su[1]
        D[1, 0] += su[2]
        D[1, 2] -= su[0]
        D[2, 0] -= su[1]
        D[2, 1] += su[0]
        Rold = self._R
        R = Rold[:, 0:1] * D[0:1]
        R.addcmul_(Rold[:, 1:2], D[1:2]).addcmul_(Rold[:, 2:3], D[2:3])
        self._substep_count += 1
        if self._substep_count % ORTHO_EVERY == 0:
            R = self._orthonormalise(R)
        # 3. body rates, gyroscopic term included
        gyro = w[self._roll1] * w[self._roll2] * self._gyro
        w = torch.add(w, out[:3] - gyro, alpha=dt).clamp_(-OMEGA_MAX, OMEGA_MAX)
        # 4. position with the old velocity; walls and ceiling
        v = self._v
        p = torch.add(self._p, v, alpha=dt)
        hit = torch.cat([p[:2].abs() > ROOM_HI[0], p[2:] > ROOM_HI[2]], 0)  # room is symmetric in x, y
        p[:2].clamp_(ROOM_LO[0], ROOM_HI[0])
        p[2].clamp_(max=ROOM_HI[2])
        hit_any = hit.any(0)
        new_hit = hit_any & ~self._wall_contact
        self._wall_contact = hit_any
        v = torch.where(hit, torch.where(new_hit, v * wall_u, 0.0), v)  # wall_u < 0: reflect
        w.addcmul_(kick, new_hit).clamp_(-OMEGA_MAX, OMEGA_MAX)
        # 5. floor: stop on first contact, stay flat, no sinking, take off when thrust > weight
        z = p[2]
        below = z <= FLOOR_Z
        new_floor = below & ~self.on_floor
        self.on_floor = below
        z.clamp_(min=FLOOR_Z)
        w.masked_fill_(below, 0.0)
        m.masked_fill_(new_floor, 0.0)
        cx, cy = R[0, 0], R[1, 0]
        n2 = cx * cx + cy * cy
        deg = n2 < 1e-12
        inv = torch.rsqrt(n2.clamp(min=1e-12))
        flat = self._yaw_matrix(torch.where(deg, 1.0, cx * inv), torch.where(deg, 0.0, cy * inv))
        R = torch.where(below, flat, R)
        # 6. acceleration (from the new attitude) and velocity
        acc = R[:, 2] * out[3]
        az = acc[2].sub_(GRAV)
        torch.where(below, az.clamp(min=0.0), az, out=az)
        v[:2].masked_fill_(below, 0.0)
        vz = v[2]
        torch.where(below, torch.where(new_floor, 0.0, vz.clamp(min=0.0)), vz, out=vz)
        self._v = v.add_(acc, alpha=dt)
        self._p, self._R, self._w = p, R, w

    def _pairs(self):
        """``rel [3,E,N,N]`` (``p_j − p_i`` at ``[:, e, i, j]``) and distances ``[E,N,N]`` (inf on the diagonal)."""
        rel = self._p.unsqueeze(2) - self._p.unsqueeze(3)
        return rel, rel.square().sum(0).sqrt_().add_(self._diag_inf)

    def _step(self, actions: torch.Tensor):
        E, N = self.num_envs, self.n_agents
        actions = actions.detach()
        # one random block per step: wall factor, collision factor, kick magnitude, then 4
        # normals (kick direction, separation speed) and 4 thrust-noise normals
        pairs = 4 if self.thrust_noise else 2
        U = self._uniform12_cf(pairs + 2, _S_STEP)
        normals = self._box_muller(U[3:3 + pairs], U[3 + pairs:3 + 2 * pairs])
        wall_u = -(0.2 + 0.6 * U[0])
        kick = normals[0:3]
        kick = kick * ((10.0 * math.pi) * (1.0 + U[2]) * torch.rsqrt(kick.square().sum(0).clamp(min=1e-12)))
        noise_z = normals[4:8] * THRUST_NOISE_STD if self.thrust_noise else None

        if self.action_mode == "motors":
            a = actions.permute(2, 0, 1).contiguous()
            effort = a.square().sum(0).sqrt_()
            cmd = (a + 1.0).mul_(0.5)
            sq = cmd.sqrt()
            noise = cmd * noise_z if noise_z is not None else None
            for _ in range(self.substeps):
                self._substep(sq, noise, wall_u, kick)
        else:
            v_des = self._setpoints[:, actions]  # [3, E, N]
            effort = torch.zeros(E, N, device=self.device)
            for _ in range(self.substeps):
                cmd = self._vel_controller(v_des)
                effort += (2.0 * cmd - 1.0).square_().sum(0).sqrt_()
                noise = cmd * noise_z if noise_z is not None else None
                self._substep(cmd.sqrt(), noise, wall_u, kick)
            effort /= self.substeps

        # drone-drone collisions, once per control step
        rel, d = self._pairs()
        col = d <= HITBOX
        new_pair = col & ~self._prev_col
        self._prev_col = col
        new_agent = new_pair.any(-1)  # [E, N]
        n_new = new_pair.sum((1, 2)) // 2
        j = torch.where(new_pair, d, float("inf")).argmin(-1)  # nearest new partner
        dj = d.gather(2, j.unsqueeze(-1)).squeeze(-1).clamp(min=1e-6)
        normal = rel.gather(3, j.view(1, E, N, 1).expand(3, E, N, 1)).squeeze(-1) / dj  # i -> j
        v = self._v
        vn = ((v.gather(2, j.unsqueeze(0).expand(3, E, N)) - v) * normal).sum(0)
        sep = 0.8 * normals[3].abs()
        v_new = (v + vn * normal).mul_(0.2 + 0.6 * U[1]).sub_(sep * normal)
        self._v = torch.where(new_agent, v_new, v)
        self._w = torch.where(new_agent, (self._w + kick).clamp_(-OMEGA_MAX, OMEGA_MAX), self._w)
        self._pair_cache = (rel, d)

        # reward, with the goals of this step (before a possible swap)
        dist = (self._p - self._g).square().sum(0).sqrt_()
        orient = torch.where(self.on_floor, 1.0, -self._R[2, 2])
        spin = self._w.square().sum(0).sqrt_()
        cost = W_POS * dist + W_EFFORT * effort + W_CRASH * self.on_floor.float() + W_ORIENT * orient + W_SPIN * spin
        prox = (1.0 - d / PROX_FALLOFF).clamp_(min=0.0).sum(-1).mul_(self.proximity_penalty * self.control_dt)
        agent_r = (-self.reward_factor) * cost - self.collision_penalty * new_agent.float() - prox
        reward = agent_r.mean(-1)

        self._collided |= (n_new > 0) & (self.t + 1 > self.grace_steps)
        success = (dist < SUCCESS_RADIUS).all(-1) & ~self._collided

        if self.scenario == "swarm-vs-swarm":
            swap = torch.remainder(self.t + 1, self.switch_steps) == 0
            self.side = self.side ^ swap
            goal, ftype = self._formation_goals(self._uniform((2 + N,), _S_SVS_SWAP), self.side)
            self._g = torch.where(swap.view(E, 1), goal, self._g)
            self.formation = torch.where(swap, ftype, self.formation)

        terminated = torch.zeros(E, dtype=torch.bool, device=self.device)
        info = {"agent_rewards": agent_r, "dist": dist, "n_collisions": n_new, "new_collision": new_agent,
                "proximity_penalty": prox, "on_floor": self.on_floor.clone()}
        return reward, terminated, success, info

    # --- observation -------------------------------------------------------------------------
    def _observe(self):
        E, N, K = self.num_envs, self.n_agents, self.n_neighbors
        rel_goal = self._p - self._g
        R9 = self._R.reshape(9, E, N)
        own = torch.cat([rel_goal, self._v, R9, self._w], 0)  # [18, E, N]
        if self.sensor_noise:
            u = self._uniform12_cf(5, _S_OBS)
            z = self._box_muller(u[:5], u[5:])[:9] * self._sensor_std
            own[0:6] += z[0:6]
            own[15:18] += z[6:9]
        parts = [own.view(18, E * N).t().contiguous()]
        if K > 0:
            pv = torch.cat([self._p, self._v], 0).view(6, E * N).t().contiguous()  # [E*N, 6] rows
            if K == N - 1:
                rows = self._all_rows
            else:
                rel, d = self._pair_cache if self._pair_cache is not None else self._pairs()
                rel_v = self._v.unsqueeze(2) - self._v.unsqueeze(3)
                metric = d + (rel * rel_v).sum(0) / d.clamp(min=1e-6)  # d + p̂_ij·v_ij
                idx = torch.sort(metric, dim=-1).indices[..., :K]  # [E, N, K] (sort beats topk here)
                rows = (idx + self._row_base).view(-1)
            nb = pv.index_select(0, rows).sub_(pv.index_select(0, self._own_rows))  # [E*N*K, 6]
            # relative positions are within ±10 m by construction (room 10 m); clip velocities
            nb[:, 3:].clamp_(-OBS_VEL_CLIP, OBS_VEL_CLIP)
            parts.append(nb.view(E * N, 6 * K))
        self._pair_cache = None
        obs = (torch.cat(parts, -1) if K > 0 else parts[0]).view(E, N, self.obs_dim)
        state = torch.cat([self._p, rel_goal, self._v, R9, self._w], 0).view(21, E * N).t().reshape(E, N * 21)
        avail = torch.ones(E, N, self.n_actions, dtype=torch.bool, device=self.device)
        return obs, state, avail
