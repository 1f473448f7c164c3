"""Multi-robot rendezvous: the robot-swarm task of the MIR3 paper, batched on torch.

Reproduces the authors' environment (MIR3 code, ``envs/robots``, config ``robot.yaml``):

- ``n_agents`` unicycle robots (10 by default) in a walled ``world_size``² square (200), no torus.
- Reset: positions ``world_size·(0.9·U + 0.05)``, heading ``2π·U``, zero velocity.
- Action: left/right wheel commands ``u ∈ [-1, 1]²``. Forward speed ``v = 7.5344·(u0 + u1)``,
  turn rate ``ω = 2.65062·(u1 − u0)``; 10 Euler sub-steps of 0.01 s per env step (position
  first with the old heading, then heading mod 2π, then clip to the walls). Full forward moves
  1.507 units per step; a pure spin turns 0.530 rad.
- Observation ("fix" mode), per agent i: for every other agent j in index order
  ``[D_ij/R, cos Φ_ij, sin Φ_ij, cos Φ_ji, sin Φ_ji]`` with ``R = comm_radius`` (282) and
  ``Φ_ij = wrap(θ_i − bearing(i→j))``, then 5 wall features: ``[1, 0, 0, 0, 0]`` unless the agent
  is within 1 unit of a wall, else ``[d_wall, cos(α_w − θ), sin(α_w − θ), 0, 0]``. No agent id:
  ``obs_dim = 5·(N−1) + 5`` (50 for N = 10).
- State: upper triangle of D (row-major, i < j) divided by R, then Φ flattened (diagonal
  included) divided by π: ``N(N−1)/2 + N²`` (145 for N = 10).
- Team reward, D measured after the move:
  ``r = −mean_{i<j} min(D_ij, R)/R − 0.001·mean(u²)``.
- Terminated when every pairwise distance is < 1 and the mean squared velocity is < 0.01;
  truncated after ``episode_limit`` steps (200).

Success (our definition, the authors' code has none): at the end of the episode every agent is
within ``success_radius`` (default 5% of the world size, 10 units) of the swarm centroid.

``discrete=True`` (id ``rendezvous-discrete``) replaces the Box action by ``Discrete(7)`` wheel
commands, see ``WHEEL_COMMANDS``.

``speed_scale`` (default 1.0, the authors' robots) models weaker wheel motors: a command drives the
wheels ``speed_scale`` times as fast, so both the forward speed and the turn rate scale by it
(``v = speed_scale·7.5344·(u0 + u1)``, ``ω = speed_scale·2.65062·(u1 − u0)``). The control cost in
the reward stays a function of the command ``u``.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch

from .core import BatchedEnv, require_float, require_int

SPEED_GAIN = 7.5344  # units/s per unit of (u0 + u1)
TURN_GAIN = 2.65062  # rad/s per unit of (u1 - u0)
SUB_DT = 0.01
SUB_STEPS = 10

# (left, right) wheel commands of rendezvous-discrete
WHEEL_COMMANDS = (
    (0.0, 0.0),    # 0 stop
    (1.0, 1.0),    # 1 full forward
    (0.3, 0.3),    # 2 slow forward
    (0.25, 1.0),   # 3 arc left
    (1.0, 0.25),   # 4 arc right
    (-0.5, 0.5),   # 5 spin left (0.265 rad per step)
    (0.5, -0.5),   # 6 spin right
)

_STREAM_RESET = 1


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


class Rendezvous(BatchedEnv):
    """Batched rendezvous task; see the module docstring for the full definition.

    Args:
        num_envs, seed, device: batch size, seed and torch device.
        n_agents: number of robots (>= 2).
        episode_limit: steps per episode before truncation.
        world_size: side of the square world.
        comm_radius: distance normaliser of observations, state and reward.
        discrete: use the ``Discrete(7)`` wheel commands instead of ``Box(2)``.
        success_radius: radius around the centroid that defines success (default 0.05·world_size).
        speed_scale: wheel speed per unit command relative to the authors' robots (> 0; 1.0 is
            their dynamics bit for bit, 0.7 = weaker wheels: 70% of the speed and turn rate).
    """

    def __init__(self, num_envs: int = 1, seed: int = 0, device="cpu", n_agents: int = 10,
                 episode_limit: int = 200, world_size: float = 200.0, comm_radius: float = 282.0,
                 discrete: bool = False, success_radius: float | None = None, speed_scale: float = 1.0):
        N = self.n_agents = require_int("rendezvous n_agents", n_agents, 2)
        self.episode_limit = require_int("episode_limit", episode_limit, 1)
        self.world_size = require_float("world_size", world_size, 0.0, low_open=True)
        self.comm_radius = require_float("comm_radius", comm_radius, 0.0, low_open=True)
        self.success_radius = 0.05 * self.world_size if success_radius is None else \
            require_float("success_radius", success_radius, 0.0, low_open=True)
        self.speed_scale = require_float("speed_scale", speed_scale, 0.0, low_open=True)
        # (× 1.0 is exact: the default keeps the authors' dynamics bit for bit)
        self._speed_gain, self._turn_gain = SPEED_GAIN * self.speed_scale, TURN_GAIN * self.speed_scale
        self.obs_dim = 5 * (N - 1) + 5
        self.state_dim = N * (N - 1) // 2 + N * N
        # peak per step: about 25 float32 [E, N, N] tensors (pairwise features) plus obs and state
        super().__init__(num_envs, seed, device, bytes_per_env=100.0 * N * N + 8.0 * N * self.obs_dim,
                         what=f"rendezvous with n_agents={N}")
        if discrete:
            self.action_space = gym.spaces.Discrete(len(WHEEL_COMMANDS))
            self._commands = torch.tensor(WHEEL_COMMANDS, dtype=torch.float32, device=self.device)
        else:
            self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        # index of the N-1 other agents of each agent, in increasing order
        others = torch.arange(N - 1, device=self.device)
        self._others = others[None, :] + (others[None, :] >= torch.arange(N, device=self.device)[:, None])
        self._triu = torch.triu_indices(N, N, 1, device=self.device)
        E = self.num_envs
        self.pos = torch.zeros(E, N, 2, device=self.device)
        self.theta = torch.zeros(E, N, device=self.device)
        self.vel = torch.zeros(E, N, 2, device=self.device)

    def _reset_envs(self, mask):
        u = self._uniform((self.n_agents, 3), _STREAM_RESET)
        m = mask.view(-1, 1, 1)
        self.pos = torch.where(m, self.world_size * (0.9 * u[..., :2] + 0.05), self.pos)
        self.theta = torch.where(mask.view(-1, 1), 2 * math.pi * u[..., 2], self.theta)
        self.vel = torch.where(m, 0.0, self.vel)

    def _step(self, actions):
        u = self._commands[actions] if self.is_discrete else actions
        v = self._speed_gain * (u[..., 0] + u[..., 1])
        w_dt = self._turn_gain * (u[..., 1] - u[..., 0]) * SUB_DT
        pos, theta = self.pos, self.theta
        for _ in range(SUB_STEPS):
            heading = torch.stack((torch.cos(theta), torch.sin(theta)), -1)
            pos = torch.clamp(pos + (v * SUB_DT).unsqueeze(-1) * heading, 0.0, self.world_size)
            theta = torch.remainder(theta + w_dt, 2 * math.pi)
        self.pos, self.theta = pos, theta
        self.vel = v.unsqueeze(-1) * heading

        dist = self.pairwise_distance()
        d_pairs = dist[:, self._triu[0], self._triu[1]]
        reward = -(d_pairs.clamp(max=self.comm_radius) / self.comm_radius).mean(1) \
            - 0.001 * u.square().mean((1, 2))
        terminated = (d_pairs.amax(1) < 1.0) & (self.vel.square().mean((1, 2)) < 0.01)
        centroid = self.pos.mean(1, keepdim=True)
        success = ((self.pos - centroid).norm(dim=-1) <= self.success_radius).all(1)
        return reward, terminated, success, {}

    def obs_bounds(self):
        """Distances ``D/R`` in ``[0, √2·world_size/R]``, cosines and sines in ``[-1, 1]``, wall
        distance in ``[0, 1]`` and the two padding features 0."""
        d_max = math.hypot(self.world_size, self.world_size) / self.comm_radius  # the world's diagonal
        low = [0.0, -1.0, -1.0, -1.0, -1.0] * (self.n_agents - 1) + [0.0, -1.0, -1.0, 0.0, 0.0]
        high = [d_max, 1.0, 1.0, 1.0, 1.0] * (self.n_agents - 1) + [1.0, 1.0, 1.0, 0.0, 0.0]
        return (torch.tensor(low, dtype=torch.float32, device=self.device),
                torch.tensor(high, dtype=torch.float32, device=self.device))

    def pairwise_distance(self) -> torch.Tensor:
        """``[E,N,N]`` distances between agents (diagonal 0)."""
        return torch.cdist(self.pos, self.pos)

    def _observe(self):
        E, N = self.num_envs, self.n_agents
        diff = self.pos[:, None, :, :] - self.pos[:, :, None, :]  # [E,i,j,2] = p_j - p_i
        dist = diff.norm(dim=-1)
        phi = _wrap(self.theta[:, :, None] - torch.atan2(diff[..., 1], diff[..., 0]))
        phi_t = phi.transpose(1, 2)
        feat = torch.stack((dist / self.comm_radius, phi.cos(), phi.sin(), phi_t.cos(), phi_t.sin()), -1)
        idx = self._others[None, :, :, None].expand(E, N, N - 1, 5)
        others = feat.gather(2, idx).reshape(E, N, 5 * (N - 1))

        walls = torch.cat((self.world_size - self.pos, self.pos), -1)  # x=W, y=W, x=0, y=0
        d_wall, which = walls.min(-1)
        rel = which * (math.pi / 2) - self.theta
        near = (d_wall < 1.0).unsqueeze(-1)
        zero = torch.zeros_like(d_wall)
        local = torch.where(near, torch.stack((d_wall, rel.cos(), rel.sin(), zero, zero), -1),
                            torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], device=self.device))
        obs = torch.cat((others, local), -1)
        state = torch.cat((dist[:, self._triu[0], self._triu[1]] / self.comm_radius,
                           phi.reshape(E, N * N) / math.pi), -1)
        avail = torch.ones(E, N, self.n_actions, dtype=torch.bool, device=self.device)
        return obs, state, avail


def scripted_actions(env: Rendezvous, flee: bool = False) -> torch.Tensor:
    """Privileged steer-towards-the-centroid controller, the reference for learning scores.

    Each robot turns towards the swarm centroid and drives forward in proportion to the distance
    and to how well it faces the centroid. With ``flee`` it does the opposite, a simple scripted
    adversary: it turns away from the centroid and drives at full speed whenever it faces away
    (into a wall or corner, where it stays). Returns Box actions ``[E,N,2]`` for ``rendezvous``,
    or the nearest wheel command ``[E,N]`` for ``rendezvous-discrete``.
    """
    to_c = env.pos.mean(1, keepdim=True) - env.pos
    dist = to_c.norm(dim=-1)
    err = _wrap(torch.atan2(to_c[..., 1], to_c[..., 0]) + (math.pi if flee else 0.0) - env.theta)
    turn = torch.clamp(2.0 * err, -1.0, 1.0)
    speed = torch.ones_like(dist) if flee else torch.clamp(dist / 5.0, 0.0, 1.0)
    fwd = speed * torch.cos(err).clamp(min=0.0)
    u = torch.stack((fwd - turn, fwd + turn), -1).clamp(-1.0, 1.0)
    if not env.is_discrete:
        return u
    return torch.cdist(u.reshape(-1, 2), env._commands).argmin(-1).view(u.shape[:2])
