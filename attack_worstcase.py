# Worst-case adversary against a frozen cooperative team (k agents handed to a PPO adversary that maximises the negated
# team reward), plus non-adversarial disturbances: the robustness protocol of MIR3 (Li et al., TNNLS 2025; README).
# With --adversary-objective defenders it maximises the negated reward of the other agents only (envs with per-agent
# rewards): the team reward also counts the adversaries' own, which an adversary can lower by hurting only itself.
#   python attack_worstcase.py --checkpoint runs/<run>/mir3_maddpg.pt --adversaries 0 --total-timesteps 200000
#   python attack_worstcase.py --checkpoint <ckpt> --obs-noise 0.1 --action-repeat 0.3 --disable 1 --env-shift default
#   python attack_worstcase.py --adversary-checkpoint runs/<attack run>/attack_worstcase.pt   # re-evaluate
import importlib
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter

import envs
from envs.quads import SUCCESS_RADIUS
from envs.rendezvous import scripted_actions
from runtime import (
    action_space_dict,
    check_writable,
    fail,
    first_line,
    ignore_stop_signals,
    keep_freed_memory,
    load_checkpoint,
    save_checkpoint,
    stop_on_signals,
)

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN_SCRIPTS = ("mir3_maddpg", "mir3_qmix", "mir3_mappo", "ibal_qmix")
OBJECTIVES = ("team", "defenders")
QMIX_SCRIPTS = ("mir3_qmix", "ibal_qmix")  # IBAL's interaction-breaking attack (ibal_qmix.py) needs a QMIX defender
OBS_NOISE_RULE = ("sigma x per-dimension std of the defender's observations over the natural episodes "
                  "(all agents, steps, episodes); dims with a std below 1e-6 of the largest get no noise")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (adversary init, random choices, evaluation envs)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    save_model: bool = True
    """whether to save the adversary to `runs/{run_name}/{exp_name}.pt`"""

    # What to attack
    checkpoint: Optional[str] = None
    """the defender: a .pt of one of the four training scripts (default: the one named in --adversary-checkpoint)"""
    env_id: Optional[str] = None
    """override the checkpoint's env id (its agents, observations, state and actions must match)"""
    adversaries: Optional[List[int]] = None
    """indices of the agents the adversary controls (default: agent 0)"""
    num_adversaries: Optional[int] = None
    """pick this many adversary agents at random (seeded) instead of --adversaries"""
    adversary_checkpoint: Optional[str] = None
    """skip training and evaluate this saved adversary (a .pt written by this script)"""
    adversary_objective: Optional[str] = None
    """what the adversary minimises: team (the team reward) or defenders (the other agents' mean reward; envs with
    per-agent rewards). Default: team, or what the adversary checkpoint was trained for"""

    # PPO adversary
    total_timesteps: int = 200_000
    """env steps to train the adversary for"""
    num_envs: int = 16
    """number of parallel training environments"""
    num_steps: int = 64
    """steps per env per rollout"""
    learning_rate: float = 5e-4
    """Adam learning rate of actor and value"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """λ of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """PPO epochs per rollout"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden_dim: int = 64
    """hidden width of the adversary's actor and value"""

    # Evaluation and disturbances
    eval_interval: int = 50_000
    """env steps between greedy evaluations of the adversary during training (0: never)"""
    eval_episodes: int = 32
    """greedy episodes per condition (one per evaluation env)"""
    obs_noise: Tuple[float, ...] = ()
    """Table I: Gaussian noise on the defender's observations, σ × each dim's std in the natural episodes (one per σ)"""
    action_repeat: Tuple[float, ...] = ()
    """Table I: each agent repeats its previous action with probability p (one condition per p)"""
    disable: Tuple[int, ...] = ()
    """IBAL's Dis-k: k random agents do nothing for the whole episode (one condition per k)"""
    env_shift: Optional[str] = None
    """Table I: the team in an env built with these options on top (a JSON object, or 'default': the env's own shift)"""
    env_kwargs: Optional[str] = None
    """env options on top of the checkpoint's for training and every condition, a JSON object: '{"episode_limit": 100}'"""
    scripted: Tuple[str, ...] = ()
    """scripted adversaries on the same agents, one condition each: stop (any env), flee (rendezvous)"""
    interaction_breaking: bool = False
    """add IBAL's interaction-breaking attack (QMIX checkpoints)"""
    report: Optional[str] = None
    """where to write the JSON report (default `runs/{run_name}/report.json`)"""
    plot: bool = False
    """write a PNG next to the report: return per condition (+ trajectories for rendezvous / quads)"""


class AdversaryActor(nn.Module):
    """One actor shared by the adversary agents ``idx``, on an agent's observation + one-hot adversary slot: a masked
    categorical, or a Gaussian with a learnable log-std in [-1, 1] units that ``to_env`` maps onto the Box (env clips)."""

    def __init__(self, obs_dim: int, n_out: int, hidden_dim: int, idx: List[int], space: dict, device):
        super().__init__()
        self.discrete = space["type"] == "discrete"
        self.idx, self.ids = torch.as_tensor(idx, device=device), torch.eye(len(idx), device=device)
        if not self.discrete:
            low, high = torch.as_tensor(space["low"], device=device), torch.as_tensor(space["high"], device=device)
            self.scale, self.bias = (high - low) / 2, (high + low) / 2
        self.net = nn.Sequential(nn.Linear(obs_dim + len(idx), hidden_dim), nn.Tanh(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, n_out))
        nn.init.orthogonal_(self.net[-1].weight, 0.01)
        nn.init.zeros_(self.net[-1].bias)
        self.log_std = nn.Parameter(torch.zeros(n_out))

    def inputs(self, obs, avail):
        o = obs[:, self.idx]
        return torch.cat((o, self.ids.expand(o.shape[0], -1, -1)), -1), avail[:, self.idx]

    def dist(self, x, avail):
        out = self.net(x)
        if self.discrete:
            return torch.distributions.Categorical(logits=out.masked_fill(~avail, -1e9))
        return torch.distributions.Normal(out, self.log_std.clamp(-5.0, 2.0).exp().expand_as(out))

    def to_env(self, a):
        return a if self.discrete else a * self.scale + self.bias

    @torch.no_grad()
    def act(self, obs, avail, env=None):  # greedy, as every adversary of the evaluation: see RandomAdversary
        x, avail = self.inputs(obs, avail)
        out = self.net(x)
        return out.masked_fill(~avail, -float("inf")).argmax(-1) if self.discrete else self.to_env(out)


class Value(nn.Module):
    """Centralised value V(s) of the adversary's return (the negated team or defenders' return)."""

    def __init__(self, state_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, state):
        return self.net(state).squeeze(-1)


class RandomAdversary:
    """Uniform random actions (over the available ones). Every adversary of the evaluation has act(obs, avail, env) ->
    the adversary agents' actions [E, k] or [E, k, d] in ``env``."""

    def __init__(self, idx: List[int], env, generator: torch.Generator):
        self.idx, self.discrete, self.g = torch.as_tensor(idx, device=env.device), env.is_discrete, generator
        if not self.discrete:
            self.low = torch.as_tensor(env.action_space.low, device=env.device)
            self.high = torch.as_tensor(env.action_space.high, device=env.device)

    def act(self, obs, avail, env=None):
        E, k = obs.shape[0], len(self.idx)
        if self.discrete:
            u = torch.rand(E, k, avail.shape[-1], generator=self.g).to(avail.device)
            return u.masked_fill(~avail[:, self.idx], -1.0).argmax(-1)
        u = torch.rand(E, k, self.low.shape[0], generator=self.g).to(self.low.device)
        return self.low + u * (self.high - self.low)


class ScriptedAdversary:
    """A yardstick the trained adversary should beat: "stop" (the env's do-nothing action) or "flee" (rendezvous: drive
    away from the swarm at full speed)."""

    KINDS = ("stop", "flee")

    def __init__(self, kind: str, idx: List[int]):
        self.kind, self.idx = kind, list(idx)

    def act(self, obs, avail, env):
        if self.kind == "flee":
            return scripted_actions(env, flee=True)[:, self.idx]
        return nothing_actions(env, avail, obs.shape[0])[:, self.idx]


def nothing_actions(env, avail: torch.Tensor, num_envs: int) -> torch.Tensor:
    """Every agent's 'do nothing' [E, N] or [E, N, d]: the env's ``null_action``, given this step's available actions
    (on SMAC a live unit stops, a dead one takes the no-op)."""
    null = env.null_action(avail)
    return null.expand(num_envs, *null.shape[-(1 if env.is_discrete else 2):])


def executed_last_action_fn(script: str, module):
    """QMIX agents keep their last action's one-hot in the hidden state; where the executed action differs (an adversary's,
    a repeat, a disabled agent's), the script's ``executed_as_last_action`` puts that one there, as in training."""
    return module.executed_as_last_action if script in QMIX_SCRIPTS else None


class ObsSpread:
    """Per-dim std of observations [..., D] over batches, summed in float64 around the first one (a constant dim gets
    exactly 0); dims below 1e-6 of the largest std count as constant (scale 0: no noise on them)."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, 0.0, 0.0

    def update(self, obs: torch.Tensor) -> None:
        x = obs.detach().double().reshape(-1, obs.shape[-1])
        if x.shape[0] == 0:
            return
        self.shift = x[0].clone() if self.shift is None else self.shift
        d = x - self.shift
        self.n, self.s1, self.s2 = self.n + d.shape[0], self.s1 + d.sum(0), self.s2 + (d * d).sum(0)

    def scale(self) -> torch.Tensor:
        std = ((self.s2 - self.s1**2 / self.n) / self.n).clamp(min=0.0).sqrt()
        return torch.where(std > 1e-6 * std.max(), std, torch.zeros_like(std)).float()


@torch.no_grad()
def run_episodes(env, defender, adversary=None, adv_idx=(), obs_noise=0.0, noise_unit=None,
                 repeat_p=0.0, disable_k=0, seed=0, record=False, last_action=None, obs_spread=None):
    """One greedy episode per env under one condition -> (returns [E], success [E], env 0's agent positions per step if
    ``record``, task measures). Observation noise: σ ``obs_noise`` × ``noise_unit.scale()``; ``obs_spread`` sees every
    observation. Task measures (quadrotors, whose step info has each drone's distance to its goal; {} elsewhere), over
    the defenders (the drones the team's policy flies: not adversaries, not disabled): their own return, final distance
    to the goal, share within the success radius and on the floor at the end; and drone-drone collisions per episode."""
    E, N, dev = env.num_envs, env.n_agents, env.device
    g = torch.Generator().manual_seed(seed)
    obs, _, avail = env.reset()
    hidden = defender.init_hidden(E)
    returns = torch.zeros(E, device=dev)
    success = torch.zeros(E, dtype=torch.bool, device=dev)
    running = torch.ones(E, dtype=torch.bool, device=dev)
    noise_std = obs_noise * noise_unit.scale().to(dev) if obs_noise else None
    defending = torch.ones(E, N, dtype=torch.bool, device=dev)
    defending[:, list(adv_idx)] = False
    if disable_k:  # k distinct random agents per env (those whose random rank is below k), fixed for the episode
        disabled = (torch.rand(E, N, generator=g).argsort(1).argsort(1) < disable_k).to(dev)
        defending &= ~disabled
    own_return, final_dist = torch.zeros(E, N, device=dev), torch.zeros(E, N, device=dev)
    on_floor, collisions, measured = torch.zeros(E, N, dtype=torch.bool, device=dev), torch.zeros(E, device=dev), False
    prev, traj = None, []
    while bool(running.any()):
        if record and hasattr(env, "pos") and bool(running[0]):
            traj.append(env.pos[0, :, :2].cpu().numpy().copy())
        if obs_spread is not None:
            obs_spread.update(obs[running])
        d_obs = obs + noise_std * torch.randn(obs.shape, generator=g).to(dev) if noise_std is not None else obs
        actions, hidden = defender.act(d_obs, avail, hidden)
        actions = actions.clone()
        if adversary is not None:
            actions[:, adv_idx] = adversary.act(obs, avail, env).to(actions.dtype)
        if disable_k:
            mask = disabled if env.is_discrete else disabled.unsqueeze(-1)
            actions = torch.where(mask, nothing_actions(env, avail, E), actions)
        if repeat_p and prev is not None:
            repeat = (torch.rand(E, N, generator=g) < repeat_p).to(dev)
            if env.is_discrete:  # never repeat an action that is no longer available
                repeat &= avail.gather(-1, prev.unsqueeze(-1)).squeeze(-1)
            else:
                repeat = repeat.unsqueeze(-1)
            actions = torch.where(repeat, prev, actions)
        prev = actions
        if last_action is not None:  # QMIX: the agents' last-action input is what was executed
            hidden = last_action(hidden, actions, env.n_actions)
        obs, _, avail, reward, terminated, truncated, info = env.step(actions)
        returns += reward * running
        done = (terminated | truncated) & running
        success |= info["success"] & done
        if "dist" in info:  # values of this step, before the auto-reset of finished envs
            own_return += info["agent_rewards"] * running.unsqueeze(-1)
            collisions += info["n_collisions"] * running
            final_dist = torch.where(done.unsqueeze(-1), info["dist"], final_dist)
            on_floor = torch.where(done.unsqueeze(-1), info["on_floor"], on_floor)
            measured = True
        running &= ~done
    task = {}
    if measured:
        task = {"defender_return": own_return[defending].mean().item(), "final_dist": final_dist[defending].mean().item(),
                "within_radius": (final_dist < SUCCESS_RADIUS)[defending].float().mean().item(),
                "on_floor": on_floor[defending].float().mean().item(), "collisions": collisions.mean().item()}
    return returns, success, traj, task


def student_t_quantile(p: float, df: int) -> float:
    """Student's t quantile, integer ``df`` >= 1, without scipy: bisection on the exact CDF (Abramowitz & Stegun 26.7.3/4)
    for df <= 30, above that the Cornish-Fisher expansion (A&S 26.7.5, error < 1e-6 at p = 0.975)."""
    if not 0.0 < p < 1.0 or int(df) != df or df < 1:
        raise ValueError(f"need 0 < p < 1 and an integer df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    if df > 30:
        x, v = statistics.NormalDist().inv_cdf(p), float(df)
        return (x + (x**3 + x) / (4 * v) + (5 * x**5 + 16 * x**3 + 3 * x) / (96 * v**2)
                + (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / (384 * v**3)
                + (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / (92160 * v**4))
    odd = df % 2 == 1  # A = 2 P(T <= t) - 1 = 2/π (θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...)) for an odd df,
    # sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...) for an even one, θ = atan(t / √df)

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0
        theta = math.atan(t / math.sqrt(df))
        c2, term, total = math.cos(theta) ** 2, 1.0, 0.0 if df == 1 else 1.0
        for k in range(1, (df - 1) // 2 if odd else df // 2):
            term *= (2 * k / (2 * k + 1) if odd else (2 * k - 1) / (2 * k)) * c2
            total += term
        a = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total) if odd else math.sin(theta) * total
        return 0.5 + a / 2

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> List[float]:
    """The Wilson score interval [low, high] of a success rate (stays inside [0, 1], sensible at 0 and n)."""
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [0.0 if successes == 0 else center - half, 1.0 if successes == n else center + half]


def summarise(returns: torch.Tensor, success: torch.Tensor) -> dict:
    """Mean return ± t(0.975, n-1)·s/√n, success rate and its Wilson interval, per-episode values."""
    r = returns.double().cpu()
    n, wins = r.numel(), int(success.sum())
    return {"return_mean": float(r.mean()),
            "return_ci95": student_t_quantile(0.975, n - 1) * float(r.std(unbiased=True)) / math.sqrt(n),
            "success_rate": wins / n, "episodes": int(n), "success_ci95": wilson_interval(wins, n),
            "returns": r.tolist(), "successes": success.int().cpu().tolist()}


# Start-up: refuse, with one line and exit code 2, anything that would give meaningless numbers
def check_args(args: Args) -> None:
    """Refuse out-of-range flags at start-up; NaN and ±inf never pass."""
    if not 1 <= len(args.exp_name) <= 100 or "/" in args.exp_name or ".." in args.exp_name:
        fail(f"--exp-name must be 1-100 characters without '/' or '..' (it names files under runs/), got {args.exp_name!r}")
    if args.adversaries is not None and args.num_adversaries is not None:
        fail("give either --adversaries or --num-adversaries, not both")
    if args.adversary_objective not in (None, *OBJECTIVES):
        fail(f"--adversary-objective must be one of {', '.join(OBJECTIVES)}, got {args.adversary_objective!r}")
    minimum = {**dict.fromkeys(("num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_dim"), 1),
               "eval_episodes": 2, "total_timesteps": 0, "eval_interval": 0}  # a confidence interval needs 2 episodes
    for name, low in minimum.items():
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    positive, nonneg = (lambda v: v > 0, "be finite and > 0"), (lambda v: v >= 0, "be finite and >= 0")
    unit = (lambda v: 0 <= v <= 1, "be finite and in [0, 1]")
    rules = {"learning_rate": positive, "gamma": unit, "gae_lambda": unit, "clip_coef": positive, "ent_coef": nonneg,
             "vf_coef": nonneg, "max_grad_norm": positive, "obs_noise": nonneg,
             "action_repeat": (lambda v: 0 <= v <= 1, "lie in [0, 1]")}
    for name, (ok, rule) in rules.items():
        values = getattr(args, name)
        for value in values if isinstance(values, tuple) else (values,):
            if not (math.isfinite(value) and ok(value)):
                fail(f"--{name.replace('_', '-')} must {rule}, got {value}")


def json_object(text: str, flag: str) -> dict:
    """The JSON object of env options given to ``flag``, or one clear error line."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        fail(f"{flag} must be a JSON object such as '{{\"episode_limit\": 100}}', got {text!r}")
    return value


def read_checkpoint(path: str, what: str) -> dict:
    """torch.load(weights_only=True) of a dict with finite weights (a diverged run's numbers mean nothing), or one line."""
    if not path or not os.path.isfile(path):
        fail(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        fail(f"{what} {path} is empty (0 bytes)")
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # pickle, zip or weights-only errors: all mean "not a checkpoint we can read"
        fail(f"{what} {path} is not a readable torch checkpoint ({type(e).__name__}: {first_line(e)[:120]})")
    if not isinstance(ckpt, dict):
        fail(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    for name, state_dict in (ckpt["models"] if isinstance(ckpt.get("models"), dict) else {}).items():
        for key, t in state_dict.items() if isinstance(state_dict, dict) else ():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                fail(f"{what} {path} has non-finite values (NaN or inf) in models.{name}.{key}")
    return ckpt


def load_checkpoints(args: Args, device):
    """The adversary checkpoint of --adversary-checkpoint (or None), the defender's checkpoint (by default the one
    that adversary was trained against), the module of the script that wrote it, and its frozen greedy policy."""
    adv_ckpt = None
    if args.adversary_checkpoint is not None:
        adv_ckpt = read_checkpoint(args.adversary_checkpoint, "adversary checkpoint")
        if adv_ckpt.get("script") != "attack_worstcase":
            fail(f"{args.adversary_checkpoint} is not an attack_worstcase adversary (script: {adv_ckpt.get('script')!r})")
        args.checkpoint = adv_ckpt.get("checkpoint") if args.checkpoint is None else args.checkpoint
    if args.checkpoint is None:
        fail("give --checkpoint (a defender .pt) or --adversary-checkpoint")
    ckpt = read_checkpoint(args.checkpoint, "checkpoint")
    script = ckpt.get("script")
    if script not in KNOWN_SCRIPTS:
        fail(f"checkpoint {args.checkpoint} has script {script!r}; expected one of {', '.join(KNOWN_SCRIPTS)}")
    module = import_script(script)
    missing = [k for k in ("env_id", "env_kwargs", "n_agents", "obs_dim", "state_dim", "action_space") if k not in ckpt]
    if missing:
        fail(f"checkpoint {args.checkpoint} is incomplete: missing {missing[0]!r}")
    try:
        defender = module.load_policy(ckpt, device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        fail(f"cannot load the {script} policy from {args.checkpoint}: {first_line(e)}")
    if not isinstance(ckpt["env_kwargs"], dict) or not all(isinstance(k, str) for k in ckpt["env_kwargs"]) \
            or not isinstance(ckpt["env_id"], str):
        fail(f"checkpoint {args.checkpoint} has a malformed env_id / env_kwargs")
    return adv_ckpt, ckpt, module, defender


def import_script(name: str):
    """Import a training script from beside this file (a copy of this file elsewhere must not find another one)."""
    if not os.path.isfile(os.path.join(HERE, f"{name}.py")):
        fail(f"the checkpoint comes from {name}.py, which is not present next to attack_worstcase.py")
    return importlib.import_module(name)


def signature(env) -> dict:
    """What the team's networks depend on, as checkpoints record it: agents, observation and state sizes, actions."""
    return {"n_agents": env.n_agents, "obs_dim": env.obs_dim, "state_dim": env.state_dim,
            "action_space": action_space_dict(env.action_space)}


def check_setting(args: Args, ckpt: dict, env_id: str, found: dict, adv_ckpt: Optional[dict], make_eval_env):
    """Before any work, check against the env (``found``: its signature) the checkpoint, --scripted kinds, --env-shift
    (whose env options it returns, None without it: the shifted env must give the team the same agents, inputs and
    actions), writable outputs, and the adversary agents, which it returns sorted: the adversary checkpoint's,
    --num-adversaries random ones (seeded), --adversaries, or agent 0. At least one agent stays a defender. Also returns
    the adversary's objective (the adversary checkpoint's, or --adversary-objective, or team); "defenders" needs the
    env's per-agent rewards (``info["agent_rewards"]``), which one step of an evaluation env shows."""
    for key, value in found.items():
        if ckpt[key] != value:
            fail(f"env {env_id!r} does not match the checkpoint (trained on {ckpt['env_id']!r}): "
                 f"{key} is {value} here but {ckpt[key]} in the checkpoint")
    for kind in args.scripted:
        if kind not in ScriptedAdversary.KINDS or (kind == "flee" and not env_id.startswith("rendezvous")):
            fail(f"--scripted {kind!r}: choose from stop (any env) and flee (rendezvous only)")
    shift = None
    if args.env_shift is not None:
        try:
            shift = (envs.env_shift_kwargs(env_id) if args.env_shift == "default"
                     else json_object(args.env_shift, "--env-shift"))
            shifted_env = make_eval_env(shift)
        except (ValueError, TypeError, ImportError) as e:
            fail(f"--env-shift {args.env_shift} on {env_id!r}: {first_line(e)}")
        shifted = signature(shifted_env)
        shifted_env.close()
        for key, value in found.items():
            if shifted[key] != value:
                fail(f"--env-shift {json.dumps(shift)} changes {key} ({value} -> {shifted[key]}); the team cannot act there")
    if args.report is not None:
        if os.path.isdir(args.report):
            fail(f"--report {args.report!r} is a directory; give a file name")
        check_writable(os.path.dirname(os.path.abspath(args.report)), "the directory of --report")
    check_writable("runs", "the run directory")
    N = found["n_agents"]
    if adv_ckpt is not None:
        adv_idx = list(adv_ckpt.get("adversaries", []))
        if args.adversaries is not None and sorted(args.adversaries) != sorted(adv_idx):
            fail(f"--adversaries {args.adversaries} differs from the adversary checkpoint's {adv_idx}")
        for key, value in found.items():
            if adv_ckpt.get(key) != value:
                fail(f"the adversary checkpoint was trained on another setting: {key} is {adv_ckpt.get(key)} there, "
                     f"{value} here")
    elif args.num_adversaries is not None:
        if not 1 <= args.num_adversaries < N:
            fail(f"--num-adversaries must be in [1, {N - 1}] for {N} agents, got {args.num_adversaries}")
        adv_idx = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed))[: args.num_adversaries].tolist()
    else:
        adv_idx = list(args.adversaries) if args.adversaries is not None else [0]
    if not adv_idx or any(not 0 <= i < N for i in adv_idx) or len(set(adv_idx)) != len(adv_idx):
        fail(f"adversary indices must be distinct agents in [0, {N - 1}], got {adv_idx}")
    if len(adv_idx) >= N:
        fail(f"at least one agent must remain a defender: {len(adv_idx)} adversaries for {N} agents")
    if any(not 1 <= k < N for k in args.disable):
        fail(f"--disable k must be in [1, {N - 1}] for {N} agents, got {list(args.disable)}")
    objective = args.adversary_objective or "team"
    if adv_ckpt is not None:
        trained_for = adv_ckpt.get("adversary_objective", "team")  # adversaries saved before the option: team
        if args.adversary_objective not in (None, trained_for):
            fail(f"--adversary-objective {args.adversary_objective} differs from the adversary checkpoint's {trained_for}")
        objective = trained_for
    if objective == "defenders":
        probe = make_eval_env()
        _, _, avail = probe.reset()
        info = probe.step(nothing_actions(probe, avail, probe.num_envs))[-1]
        probe.close()
        if "agent_rewards" not in info:
            fail(f"--adversary-objective defenders needs per-agent rewards, which {env_id!r} does not report")
    return shift, sorted(adv_idx), objective


if __name__ == "__main__":
    args = tyro.cli(Args)
    keep_freed_memory()
    check_args(args)
    extra_env_kwargs = json_object(args.env_kwargs, "--env-kwargs") if args.env_kwargs is not None else {}

    # TRY NOT TO MODIFY: seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # The frozen defender (and with --adversary-checkpoint the saved adversary), and the env it was trained in
    adv_ckpt, ckpt, module, defender = load_checkpoints(args, device)
    script, env_id, env_kwargs = ckpt["script"], args.env_id or ckpt["env_id"], {**ckpt["env_kwargs"], **extra_env_kwargs}
    last_action = executed_last_action_fn(script, module)
    run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    try:
        env = envs.make(env_id, num_envs=args.num_envs, seed=args.seed, device=device, **env_kwargs)
    except (ValueError, TypeError, ImportError) as e:  # unknown ids and options, bad values
        origin = "the checkpoint's env_kwargs" + (" and --env-kwargs" if extra_env_kwargs else "")
        fail(f"cannot build env {env_id!r} from {origin} {env_kwargs}: {first_line(e)}")

    def make_eval_env(options=None):  # a fresh copy per condition: every condition starts from the same states
        return envs.make(env_id, num_envs=args.eval_episodes, seed=args.seed + 100_000, device=device,
                         **{**env_kwargs, **(options or {})})

    found = signature(env)
    shift, adv_idx, objective = check_setting(args, ckpt, env_id, found, adv_ckpt, make_eval_env)
    N, discrete, k_adv = env.n_agents, env.is_discrete, len(adv_idx)
    defenders = torch.as_tensor([i for i in range(N) if i not in adv_idx], device=device)

    # ALGO LOGIC: initialize agent here (with --adversary-checkpoint: its width and weights)
    try:
        hidden_dim = int(adv_ckpt["args"]["hidden_dim"]) if adv_ckpt is not None else args.hidden_dim
        actor = AdversaryActor(env.obs_dim, env.n_actions, hidden_dim, adv_idx, found["action_space"], device).to(device)
        value = Value(env.state_dim, hidden_dim).to(device)
        if adv_ckpt is not None:
            actor.load_state_dict(adv_ckpt["models"]["actor"])
            value.load_state_dict(adv_ckpt["models"]["value"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        fail(f"unusable adversary checkpoint {args.adversary_checkpoint}: {type(e).__name__}: {first_line(e)}")
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"{run_name}: attacking {script} on {env_id} ({N} agents, "
          f"{'Discrete' if discrete else 'Box'}({env.n_actions})), adversaries {adv_idx} "
          f"(objective: {objective}), device {device}", flush=True)

    def save() -> str:
        return save_checkpoint(f"runs/{run_name}/{args.exp_name}.pt", {
            "script": "attack_worstcase", "checkpoint": os.path.abspath(args.checkpoint), "defender_script": script,
            "env_id": env_id, "env_kwargs": env_kwargs, **found, "adversaries": adv_idx, "adversary_objective": objective,
            "args": asdict(args), "global_step": global_step,
            "models": {"actor": actor.state_dict(), "value": value.state_dict()}})

    def whereabouts() -> str:
        if adv_ckpt is not None:
            return f"the adversary is {args.adversary_checkpoint}"
        return f"adversary saved to {saved}" if saved else "the adversary was not saved (--no-save-model)"

    # Train the adversary with PPO (skipped with --adversary-checkpoint; at least one update for any steps)
    E, T, idx = args.num_envs, args.num_steps, torch.as_tensor(adv_idx, device=device)
    batch_size = E * T
    num_updates = 0 if adv_ckpt is not None else max(args.total_timesteps // batch_size, min(args.total_timesteps, 1))
    optimizer = optim.Adam(list(actor.parameters()) + list(value.parameters()), lr=args.learning_rate, eps=1e-5)
    b_x = torch.zeros(T, E, k_adv, env.obs_dim + k_adv, device=device)
    b_avail = torch.ones(T, E, k_adv, env.n_actions if discrete else 1, dtype=torch.bool, device=device)
    b_a = torch.zeros(T, E, *((k_adv,) if discrete else (k_adv, env.n_actions)), device=device)
    b_logp = torch.zeros(T, E, k_adv, device=device)
    b_state = torch.zeros(T, E, env.state_dim, device=device)
    b_v, b_r, b_done = (torch.zeros(T, E, device=device) for _ in range(3))
    global_step, recent_returns, last_eval, last_print, start_time, saved = 0, [], 0, 0.0, time.time(), None
    obs, state, avail = env.reset()
    hidden = defender.init_hidden(E)
    stop_on_signals()  # Ctrl-C, SIGTERM, SIGUSR1: KeyboardInterrupt, once (the next ones are ignored)
    try:
        for update in range(1, num_updates + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / num_updates) * args.learning_rate
            for t in range(T):
                with torch.no_grad():
                    actions, hidden = defender.act(obs, avail, hidden)
                    x, av = actor.inputs(obs, avail)
                    dist = actor.dist(x, av)
                    a = dist.sample()
                    logp = dist.log_prob(a) if discrete else dist.log_prob(a).sum(-1)
                    b_x[t], b_a[t], b_logp[t], b_state[t], b_v[t] = x, a, logp, state, value(state)
                    if discrete:
                        b_avail[t] = av
                    actions = actions.clone()
                    actions[:, idx] = actor.to_env(a).to(actions.dtype)
                    if last_action is not None:  # the defenders see the adversary's executed actions
                        hidden = last_action(hidden, actions, env.n_actions)
                    obs, state, avail, reward, terminated, truncated, info = env.step(actions)
                    done = terminated | truncated
                    # the adversary maximises the negated team reward, or the negated mean reward of the defenders
                    r = -info["agent_rewards"][:, defenders].mean(-1) if objective == "defenders" else -reward
                    if bool(truncated.any()):  # time limit: bootstrap from the final state
                        r = r + args.gamma * value(info["final_state"]) * truncated
                    b_r[t], b_done[t] = r, done.float()
                global_step += E
                if bool(done.any()):
                    if hidden is not None:  # the defender's recurrent state [E, N, H]: zero it for finished envs
                        hidden = hidden * (~done).view(-1, 1, 1)
                    recent_returns = (recent_returns + info["episode_return"][done].tolist())[-100:]
                    writer.add_scalar("charts/episodic_return", float(info["episode_return"][done].mean()), global_step)
                    writer.add_scalar("charts/episodic_length", float(info["episode_length"][done].float().mean()),
                                      global_step)
                    writer.add_scalar("charts/success_rate", float(info["success"][done].float().mean()), global_step)

            # GAE on the adversary's reward; done marks the end of an episode (truncation bootstrapped above)
            with torch.no_grad():
                next_v, adv, last = value(state), torch.zeros(T, E, device=device), torch.zeros(E, device=device)
                for t in reversed(range(T)):
                    nv = next_v if t == T - 1 else b_v[t + 1]
                    nonterminal = 1.0 - b_done[t]
                    delta = b_r[t] + args.gamma * nv * nonterminal - b_v[t]
                    last = delta + args.gamma * args.gae_lambda * nonterminal * last
                    adv[t] = last
                ret = adv + b_v

            # PPO: one clipped surrogate per adversary agent, all sharing the team advantage
            f_x, f_avail, f_a = b_x.flatten(0, 1), b_avail.flatten(0, 1), (b_a.long() if discrete else b_a).flatten(0, 1)
            f_logp, f_state, f_adv, f_ret, f_v = (z.flatten(0, 1) for z in (b_logp, b_state, adv, ret, b_v))
            mb_size = max(1, batch_size // args.num_minibatches)
            clipfracs = []
            for epoch in range(args.update_epochs):
                perm = torch.randperm(batch_size, device=device)
                for start in range(0, batch_size, mb_size):
                    mb = perm[start : start + mb_size]
                    dist = actor.dist(f_x[mb], f_avail[mb])
                    new_logp = dist.log_prob(f_a[mb]) if discrete else dist.log_prob(f_a[mb]).sum(-1)
                    entropy = dist.entropy() if discrete else dist.entropy().sum(-1)
                    log_ratio = new_logp - f_logp[mb]
                    ratio = log_ratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - log_ratio).mean()
                        clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                    mb_adv = f_adv[mb]
                    mb_adv = ((mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)).unsqueeze(-1)
                    pg_loss = torch.max(-mb_adv * ratio,
                                        -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                    v_loss = 0.5 * ((value(f_state[mb]) - f_ret[mb]) ** 2).mean()
                    loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                    optimizer.zero_grad()
                    loss.backward()
                    # actor and value clipped separately, so that large value errors never mute the policy
                    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                    nn.utils.clip_grad_norm_(value.parameters(), args.max_grad_norm)
                    optimizer.step()

            sps = int(global_step / (time.time() - start_time))
            for k, v in {"losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                         "losses/entropy": entropy.mean().item(), "losses/approx_kl": approx_kl.item(),
                         "losses/clipfrac": float(np.mean(clipfracs)), "charts/SPS": sps,
                         "charts/learning_rate": optimizer.param_groups[0]["lr"]}.items():
                writer.add_scalar(k, v, global_step)
            if args.eval_interval and (global_step - last_eval >= args.eval_interval or update == num_updates):
                last_eval = global_step
                returns, success, *_ = run_episodes(make_eval_env(), defender, actor, adv_idx,
                                                    seed=args.seed, last_action=last_action)
                writer.add_scalar("eval/episodic_return", returns.mean().item(), global_step)
                writer.add_scalar("eval/success_rate", success.float().mean().item(), global_step)
                print(f"global_step={global_step} eval_team_return={returns.mean().item():.2f} "
                      f"eval_success={success.float().mean().item():.2f}", flush=True)
            if time.time() - last_print > 10 or update == num_updates:
                last_print = time.time()
                ret_str = f"{np.mean(recent_returns):.2f}" if recent_returns else "nan"
                print(f"global_step={global_step} SPS={sps} team_return={ret_str}", flush=True)
        if args.save_model and adv_ckpt is None:
            saved = save()  # a signal during the save stops it: the handler below saves again, uninterrupted
            print(f"adversary saved to {saved}", flush=True)
    except KeyboardInterrupt as e:
        if saved is None and args.save_model and adv_ckpt is None:
            print("interrupted: saving the adversary, please wait", flush=True)
            saved = save()
        print(f"interrupted: {whereabouts()}", flush=True)
        sys.exit(128 + int(e.args[0] if e.args else signal.SIGINT))  # the shell's code for death by that signal
    env.close()

    # Evaluate every condition on fresh, identically seeded evaluation envs: (name, run_episodes options, what the
    # report adds; an env_shift there is the evaluation env's). The natural episodes measure the observations'
    # spread, the unit of the observation noise.
    spread = ObsSpread() if args.obs_noise else None
    hook = None  # IBAL's interaction-breaking attack fits its attacker to the victim inside the evaluation env
    if args.interaction_breaking and script in QMIX_SCRIPTS and os.path.isfile(os.path.join(HERE, "ibal_qmix.py")):
        hook = import_script("ibal_qmix").interaction_breaking_attack
    elif args.interaction_breaking:
        print(f"note: interaction_breaking is unavailable for {script} checkpoints (it needs a QMIX defender and "
              f"ibal_qmix.py)", file=sys.stderr)
    plan = [("natural", {"obs_spread": spread}, {}),
            ("random", {"adversary": RandomAdversary(adv_idx, env, torch.Generator().manual_seed(args.seed + 1))}, {}),
            ("worstcase", {"adversary": actor, "record": args.plot}, {})]
    plan += [(f"scripted_{kind}", {"adversary": ScriptedAdversary(kind, adv_idx)}, {}) for kind in args.scripted]
    plan += [(f"obs_noise_{s:g}", {"obs_noise": s, "noise_unit": spread, "seed": args.seed + 2},
              {"obs_noise": s, "obs_noise_rule": OBS_NOISE_RULE}) for s in args.obs_noise]
    plan += [(f"action_repeat_{p:g}", {"repeat_p": p, "seed": args.seed + 3}, {}) for p in args.action_repeat]
    plan += [(f"dis_{k}", {"disable_k": k, "seed": args.seed + 4}, {}) for k in args.disable]
    plan += [("env_shift", {}, {"env_shift": shift})] if shift is not None else []
    plan += [("interaction_breaking", None, {})] if hook is not None else []
    conditions, traj, stopped = {}, [], None
    try:
        for i, (name, options, about) in enumerate(plan, 1):
            eval_env = make_eval_env(about.get("env_shift"))
            task = {}
            if name == "interaction_breaking":
                returns, success = hook(ckpt, defender, eval_env, args.seed)[:2]
            else:
                returns, success, episode_traj, task = run_episodes(eval_env, defender, adv_idx=adv_idx,
                                                                    last_action=last_action,
                                                                    **{"seed": args.seed, **options})
                traj = episode_traj if name == "worstcase" else traj
            eval_env.close()
            conditions[name] = {**summarise(returns, success), **about, **({"task": task} if task else {})}
            print(f"evaluated {name} ({i}/{len(plan)})", flush=True)
    except KeyboardInterrupt as e:
        stopped = int(e.args[0] if e.args else signal.SIGINT)

    # Report: table, TensorBoard, JSON, plot (a signal from now on is ignored: the files get written)
    ignore_stop_signals()
    print(f"\n{'condition':<22}{'return':>10}{'± 95% CI':>11}{'success':>10}{'episodes':>10}")
    for name, c in conditions.items():
        print(f"{name:<22}{c['return_mean']:>10.3f}{c['return_ci95']:>11.3f}{c['success_rate']:>10.3f}{c['episodes']:>10}")
        for key in ("return_mean", "return_ci95", "success_rate"):
            writer.add_scalar(f"report/{name}/{key}", c[key], global_step)
    measured = {name: c["task"] for name, c in conditions.items() if "task" in c}
    if measured:  # what the attack does to the drones the team still flies
        print(f"\n{'defenders':<22}{'own return':>11}{'final dist':>11}{'< radius':>10}{'on floor':>10}{'collisions':>11}")
        for name, t in measured.items():
            print(f"{name:<22}{t['defender_return']:>11.3f}{t['final_dist']:>11.3f}{t['within_radius']:>10.3f}"
                  f"{t['on_floor']:>10.3f}{t['collisions']:>11.2f}")
            for key, value in t.items():
                writer.add_scalar(f"report/{name}/task/{key}", value, global_step)
    report = {"checkpoint": args.checkpoint, "script": script, "env_id": env_id, "env_kwargs": env_kwargs,
              "adversaries": adv_idx, "adversary_objective": objective, "partial": stopped is not None,
              "obs_noise_scale": spread.scale().tolist() if spread is not None and spread.n else None,
              "conditions": conditions}
    report_path = args.report or f"runs/{run_name}/report.json"
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(report_path + ".tmp", report_path)  # atomic: never a half-written report
    writer.close()
    if stopped is not None:
        print(f"interrupted: partial report ({len(conditions)} of {len(plan)} conditions) written to "
              f"{report_path}; {whereabouts()}", flush=True)
        sys.exit(128 + stopped)
    print(f"report written to {report_path}")
    if args.plot:
        from benchmark.attack_plot import make_plot

        png = os.path.splitext(report_path)[0] + ".png"
        show_traj = traj if env_id.startswith(("rendezvous", "quads")) and traj else None
        make_plot(png, conditions, show_traj, adv_idx, f"{script} on {env_id}, adversaries {adv_idx}")
        print(f"plot written to {png}")
