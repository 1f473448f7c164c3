# Worst-case adversary against a frozen cooperative team, plus non-adversarial disturbances.
# The MIR3 paper's robustness protocol (Li et al., IEEE TNNLS 2025, sections II-A3 and IV-A3):
# load a checkpoint of mir3_maddpg / mir3_qmix / mir3_mappo / ibal_qmix, freeze its policy, hand
# k chosen agents to an adversary that sees what they see, acts in their action space and
# maximises the negated team reward, train it with PPO (shared actor over the adversary agents,
# centralised value on the global state), then report greedy-evaluation returns for: no attack,
# a random-action adversary, the trained worst-case adversary, and on request the paper's Table I
# disturbances (observation noise relative to each observation dim's spread, action repeat, a
# shifted environment) and IBAL's disabled teammates (Dis-k) and interaction-breaking attack.
# Every condition reports the mean return with a Student-t 95% interval, the success rate with a
# Wilson 95% interval, and the per-episode returns and successes.
#
#   python attack_worstcase.py --checkpoint runs/<run>/mir3_maddpg.pt --adversaries 0 \
#       --total-timesteps 200000 --eval-episodes 32 [--report out.json] [--plot]
#   python attack_worstcase.py --checkpoint <ckpt> --obs-noise 0.1 --action-repeat 0.3 --disable 1 \
#       --env-shift default                       # or --env-shift '{"thrust_scale": 0.7}'
#   python attack_worstcase.py --adversary-checkpoint runs/<attack run>/attack_worstcase.pt  # re-evaluate
#
# SIGINT, SIGTERM and SIGUSR1 (a scheduler's notice before preemption) stop the run cleanly: during
# training the adversary is saved, during the final evaluation a report of the conditions finished
# so far is written with "partial": true; the exit code is 128 + the signal number.
import contextlib
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

import envs
from runtime import STOP_SIGNALS, action_space_dict, check_writable, fail, first_line, keep_freed_memory

KNOWN_SCRIPTS = ("mir3_maddpg", "mir3_qmix", "mir3_mappo", "ibal_qmix")
QMIX_SCRIPTS = ("mir3_qmix", "ibal_qmix")
# IBAL hook: a training module may define
#     interaction_breaking_attack(checkpoint: dict, policy, env, seed: int) -> (returns [E], success [E])
# that runs exactly one greedy episode in each of the ``env.num_envs`` envs of ``env`` (a fresh
# evaluation env, like every other condition) with the victim ``policy`` under IBAL's
# interaction-breaking attacker fitted to that victim. ``--interaction-breaking`` then adds the
# condition "interaction_breaking". It is looked up in the checkpoint's own module, then (for
# QMIX-based checkpoints) in ibal_qmix.py; when absent the condition is reported as unavailable.
IBAL_HOOK = "interaction_breaking_attack"
# --obs-noise σ is relative: the noise on dim d has std σ·spread_d, where spread_d is the std of dim d over
# the defender's observations in the natural episodes (all agents, steps and episodes), measured once.
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
    """the defender checkpoint (a .pt of one of the four training scripts; default: the one named in --adversary-checkpoint)"""
    env_id: Optional[str] = None
    """override the checkpoint's env id (its agents, observations, state and actions must match)"""
    adversaries: Optional[List[int]] = None
    """indices of the agents the adversary controls (default: agent 0)"""
    num_adversaries: Optional[int] = None
    """pick this many adversary agents at random (seeded) instead of --adversaries"""
    adversary_checkpoint: Optional[str] = None
    """skip training and evaluate this saved adversary (a .pt written by this script)"""

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
    """Table I: Gaussian noise on every defender observation, σ × each dim's std in the natural episodes (a condition per σ)"""
    action_repeat: Tuple[float, ...] = ()
    """Table I: each agent repeats its previous action with probability p (one condition per p)"""
    disable: Tuple[int, ...] = ()
    """IBAL's Dis-k: k random agents do nothing for the whole episode (one condition per k)"""
    env_shift: Optional[str] = None
    """Table I: add the condition env_shift, the team in an env with these extra options (JSON, or 'default')"""
    env_kwargs: Optional[str] = None
    """extra env constructor options (JSON object, e.g. '{"episode_limit": 100}') on top of the checkpoint's, everywhere"""
    scripted: Tuple[str, ...] = ()
    """scripted adversaries on the same agents, one condition each (scripted_<kind>): stop (any env), flee (rendezvous)"""
    interaction_breaking: bool = False
    """add IBAL's interaction-breaking attack when the checkpoint's module provides it"""
    report: Optional[str] = None
    """where to write the JSON report (default `runs/{run_name}/report.json`)"""
    plot: bool = False
    """write a PNG next to the report: return per condition (+ trajectories for rendezvous / quads)"""


def read_checkpoint(path: str, what: str) -> dict:
    """torch.load(weights_only=True) of a dict, or one clear error line."""
    if not path or not os.path.isfile(path):
        fail(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        fail(f"{what} {path} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights-only errors: all mean "not a checkpoint we can read"
        fail(f"{what} {path} is not a readable torch checkpoint ({type(e).__name__}: {first_line(e)[:120]})")
    if not isinstance(ckpt, dict):
        fail(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    bad = non_finite_tensor(ckpt.get("models"), "models")
    if bad is not None:  # a diverged run: its numbers would mean nothing
        fail(f"{what} {path} has non-finite values (NaN or inf) in {bad}")
    return ckpt


def non_finite_tensor(tree, name: str) -> Optional[str]:
    """The dotted name of the first floating tensor with a NaN or inf in nested dicts / lists, or None."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{name}.{key}")
        if found is not None:
            return found
    return None


def parse_json_object(text: str, flag: str) -> dict:
    """A flag's JSON object of env options, or one clear error line."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        fail(f"{flag} must be a JSON object such as '{{\"episode_limit\": 100}}', got {text!r}")
    return value


def import_script(name: str):
    """Import one of the four known training scripts (never anything else)."""
    if name not in KNOWN_SCRIPTS:
        fail(f"checkpoint script {name!r} is not one of {', '.join(KNOWN_SCRIPTS)}")
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(here, f"{name}.py")):
        fail(f"the checkpoint comes from {name}.py, which is not present next to attack_worstcase.py")
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def reset_hidden(hidden, done: torch.Tensor):
    """Zero the rows (first dim = env) of finished envs in a hidden state: None, tensor or tuple."""
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(reset_hidden(h, done) for h in hidden)
    return hidden * (~done).view(-1, *([1] * (hidden.dim() - 1))).to(hidden.dtype)


def executed_last_action_fn(script: str, module):
    """QMIX agents keep the one-hot of their last action in their hidden state, and ``act`` records
    the action they chose. When the executed action differs (an adversary, a repeat, a disabled
    agent), the script's ``executed_as_last_action(hidden, actions, n_actions)`` puts the executed
    one there instead, as in their training. None for the scripts without a last-action input."""
    if script not in QMIX_SCRIPTS:
        return None
    fn = getattr(module, "executed_as_last_action", None)
    if not callable(fn):
        fail(f"{script}.py has no executed_as_last_action(); it is needed to attack QMIX agents")
    return fn


class Interrupts:
    """SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (what cluster schedulers send before preempting a job)
    all raise KeyboardInterrupt, so one ``except`` saves what there is. Inside ``held()`` (while a
    file is written) a signal is only noted, so that a second Ctrl-C never cuts a save short."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signum, self.holding, self.pending = None, False, False

    def install(self) -> "Interrupts":
        for sig in self.SIGNALS:
            signal.signal(sig, self)
        return self

    def __call__(self, signum, frame):
        self.signum = signum
        if self.holding:
            self.pending = True
            print("saving, please wait", flush=True)
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)  # the shell's convention: 130, 143, 138


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` >= 1 (an integer) degrees of freedom, without scipy.

    df <= 30: bisection on the exact CDF of integer df (Abramowitz & Stegun 26.7.3 / 26.7.4).
    df > 30: the Cornish-Fisher expansion around the normal quantile (A&S 26.7.5), whose error
    there is below 1e-6 at p = 0.975.
    """
    if not 0.0 < p < 1.0 or int(df) != df or df < 1:
        raise ValueError(f"need 0 < p < 1 and an integer df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    if df > 30:
        x, v = statistics.NormalDist().inv_cdf(p), float(df)
        return (x + (x**3 + x) / (4 * v) + (5 * x**5 + 16 * x**3 + 3 * x) / (96 * v**2)
                + (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / (384 * v**3)
                + (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / (92160 * v**4))

    def cdf(t: float) -> float:  # P(T <= t) for t >= 0
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:  # odd: A = 2/π (θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...))
            term, total = 1.0, 1.0 if df > 1 else 0.0
            for k in range(1, (df - 1) // 2):
                term *= 2 * k / (2 * k + 1) * c2
                total += term
            a = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
        else:  # even: A = sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
            term = total = 1.0
            for k in range(1, df // 2):
                term *= (2 * k - 1) / (2 * k) * c2
                total += term
            a = math.sin(theta) * total
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


class ObsSpread:
    """Per-dimension std of observations [..., D], accumulated over batches.

    Sums are taken around the first observation in float64, so a dimension that never changes gets
    exactly 0; dims below 1e-6 of the largest std count as constant (scale 0: no noise on them).
    """

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, 0.0, 0.0

    def update(self, obs: torch.Tensor) -> None:
        x = obs.detach().double().reshape(-1, obs.shape[-1])
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x[0].clone()
        d = x - self.shift
        self.n, self.s1, self.s2 = self.n + d.shape[0], self.s1 + d.sum(0), self.s2 + (d * d).sum(0)

    def scale(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no observations were measured")
        std = ((self.s2 - self.s1**2 / self.n) / self.n).clamp(min=0.0).sqrt()
        return torch.where(std > 1e-6 * std.max(), std, torch.zeros_like(std)).float()


class AdversaryActor(nn.Module):
    """Shared actor over the adversary agents: own observation + one-hot adversary slot.

    Discrete: masked categorical over logits. Continuous: Gaussian with a state-independent,
    learnable log-std in normalised units [-1, 1], rescaled to the Box (the env clips).
    """

    def __init__(self, in_dim: int, n_out: int, hidden_dim: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.Tanh(), nn.Linear(hidden_dim, n_out))
        nn.init.orthogonal_(self.net[-1].weight, 0.01)
        nn.init.zeros_(self.net[-1].bias)
        self.log_std = nn.Parameter(torch.zeros(n_out))

    def dist(self, x, avail):
        out = self.net(x)
        if self.discrete:
            return torch.distributions.Categorical(logits=out.masked_fill(~avail, -1e9))
        return torch.distributions.Normal(out, self.log_std.clamp(-5.0, 2.0).exp().expand_as(out))

    def greedy(self, x, avail):
        out = self.net(x)
        return out.masked_fill(~avail, -float("inf")).argmax(-1) if self.discrete else out


class Value(nn.Module):
    """Centralised value V(s) of the adversary's return (the negated team return)."""

    def __init__(self, state_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, state):
        return self.net(state).squeeze(-1)


class Adversary:
    """The adversary's side of an episode: inputs of its agents and env-ready actions."""

    def __init__(self, actor: AdversaryActor, idx: List[int], discrete: bool, low=None, high=None):
        self.actor, self.discrete = actor, discrete
        self.device = next(actor.parameters()).device
        self.idx = torch.as_tensor(idx, device=self.device)
        self.ids = torch.eye(len(idx), device=self.device)
        if not discrete:
            low, high = torch.as_tensor(low, device=self.device), torch.as_tensor(high, device=self.device)
            self.scale, self.bias = (high - low) / 2, (high + low) / 2

    def inputs(self, obs, avail):
        o = obs[:, self.idx]
        return torch.cat((o, self.ids.expand(o.shape[0], -1, -1)), -1), avail[:, self.idx]

    def to_env(self, a):
        return a if self.discrete else a * self.scale + self.bias

    @torch.no_grad()
    def act(self, obs, avail, state=None):
        return self.to_env(self.actor.greedy(*self.inputs(obs, avail)))


def nothing_actions(null: torch.Tensor, env_id: str, avail: torch.Tensor, num_envs: int) -> torch.Tensor:
    """Every agent's 'do nothing' [E, N] or [E, N, d]: the env's ``null_action()`` (``null``), except on SMAC,
    where the no-op is for dead units only and a live one stops (action 1) when it can."""
    if env_id.startswith("smac:"):
        return avail[..., 1].long()
    return null.expand(num_envs, *null.shape)


class ScriptedAdversary:
    """A fixed behaviour of the adversary agents, to check that the trained adversary is at least as
    damaging: "stop" (the env's do-nothing action; SMAC: stop) or "flee" (rendezvous: drive away
    from the swarm at full speed). Bound to the env it acts in, whose internals "flee" reads."""

    KINDS = ("stop", "flee")

    def __init__(self, kind: str, idx: List[int], env, env_id: str):
        self.kind, self.idx, self.env, self.env_id = kind, torch.as_tensor(idx, device=env.device), env, env_id
        self.null = env.null_action()
        if kind == "flee":
            from envs.rendezvous import scripted_actions

            self.flee = scripted_actions

    def act(self, obs, avail, state=None):
        if self.kind == "flee":
            return self.flee(self.env, flee=True)[:, self.idx]
        return nothing_actions(self.null, self.env_id, avail, obs.shape[0])[:, self.idx]


class RandomAdversary:
    """Uniform random actions (over the available ones) for the adversary agents."""

    def __init__(self, idx: List[int], env, generator: torch.Generator):
        self.idx, self.discrete, self.g = torch.as_tensor(idx, device=env.device), env.is_discrete, generator
        if not self.discrete:
            self.low = torch.as_tensor(env.action_space.low, device=env.device)
            self.high = torch.as_tensor(env.action_space.high, device=env.device)

    def act(self, obs, avail, state=None):
        E, k = obs.shape[0], len(self.idx)
        if self.discrete:
            u = torch.rand(E, k, avail.shape[-1], generator=self.g).to(avail.device)
            return u.masked_fill(~avail[:, self.idx], -1.0).argmax(-1)
        u = torch.rand(E, k, self.low.shape[0], generator=self.g).to(self.low.device)
        return self.low + u * (self.high - self.low)


@torch.no_grad()
def run_episodes(env, defender, env_id: str, adversary=None, adv_idx=(), obs_noise=0.0, obs_scale=None,
                 repeat_p=0.0, disable_k=0, seed=0, record=False, last_action=None, obs_spread=None):
    """One greedy episode in each of ``env.num_envs`` envs under one condition.

    ``obs_noise`` σ adds Gaussian noise σ·``obs_scale`` [obs_dim] to the defender's observations.
    ``last_action``: a QMIX script's ``executed_as_last_action``, so the agents' last-action input
    is what was executed. ``obs_spread``: an ObsSpread fed with every observation of the episodes.
    Returns (returns [E], success [E], trajectory) where trajectory is a list of env 0's agent
    positions [N, 2] (only with ``record`` and an env that exposes ``pos``).
    """
    E, N, dev = env.num_envs, env.n_agents, env.device
    g = torch.Generator().manual_seed(seed)
    obs, state, avail = env.reset()
    hidden = defender.init_hidden(E)
    returns = torch.zeros(E, device=dev)
    success = torch.zeros(E, dtype=torch.bool, device=dev)
    running = torch.ones(E, dtype=torch.bool, device=dev)
    noise_std = obs_noise * obs_scale.to(dev) if obs_noise else None
    disabled = None
    if disable_k:  # k distinct random agents per env, fixed for the episode
        disabled = torch.zeros(E, N, dtype=torch.bool)
        disabled.scatter_(1, torch.rand(E, N, generator=g).argsort(1)[:, :disable_k], True)
        disabled = disabled.to(dev)
        null = env.null_action()
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
            actions[:, adv_idx] = adversary.act(obs, avail, state).to(actions.dtype)
        if disabled is not None:
            mask = disabled if env.is_discrete else disabled.unsqueeze(-1)
            actions = torch.where(mask, nothing_actions(null, env_id, avail, E), actions)
        if repeat_p and prev is not None:
            repeat = (torch.rand(E, N, generator=g) < repeat_p).to(dev)
            if env.is_discrete:  # never repeat an action that is no longer available
                repeat &= avail.gather(-1, prev.unsqueeze(-1)).squeeze(-1)
            else:
                repeat = repeat.unsqueeze(-1)
            actions = torch.where(repeat, prev, actions)
        prev = actions
        if last_action is not None:
            hidden = last_action(hidden, actions, env.n_actions)
        obs, state, avail, reward, terminated, truncated, info = env.step(actions)
        returns += reward * running
        done = (terminated | truncated) & running
        success |= info["success"] & done
        running &= ~done
    return returns, success, traj


def summarise(returns: torch.Tensor, success: torch.Tensor) -> dict:
    """Mean return ± t(0.975, n-1)·s/√n, success rate and its Wilson interval, per-episode values."""
    r = returns.double().cpu()
    n, wins = r.numel(), int(success.sum())
    return {"return_mean": float(r.mean()),
            "return_ci95": student_t_quantile(0.975, n - 1) * float(r.std(unbiased=True)) / math.sqrt(n),
            "success_rate": wins / n, "episodes": int(n), "success_ci95": wilson_interval(wins, n),
            "returns": r.tolist(), "successes": success.int().cpu().tolist()}


def make_plot(path: str, conditions: dict, traj, adv_idx, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if traj else 1, figsize=(12 if traj else 7, 5), squeeze=False)
    ax = axes[0, 0]
    names = list(conditions)
    ax.bar(range(len(names)), [conditions[n]["return_mean"] for n in names],
           yerr=[conditions[n]["return_ci95"] for n in names], capsize=4,
           color=["tab:red" if n == "worstcase" else "tab:gray" if n == "random" else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("team return (mean, 95% CI)")
    ax.set_title(title, fontsize=9)
    if traj:
        ax = axes[0, 1]
        xy = np.stack(traj)  # [T, N, 2]
        labelled = set()
        for i in range(xy.shape[1]):
            adv = i in adv_idx
            kind = "adversary" if adv else "defender"
            ax.plot(xy[:, i, 0], xy[:, i, 1], color="tab:red" if adv else "tab:blue", alpha=0.8,
                    label=None if kind in labelled else kind)
            labelled.add(kind)
            ax.scatter(xy[0, i, 0], xy[0, i, 1], color="k", s=8)
            ax.scatter(xy[-1, i, 0], xy[-1, i, 1], color="tab:red" if adv else "tab:blue", marker="x")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title("worst-case adversary, evaluation episode 0 (dot: start, x: end)", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    keep_freed_memory()
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_dim"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_episodes < 2:
        fail(f"--eval-episodes must be >= 2 (a confidence interval needs two episodes), got {args.eval_episodes}")
    if args.total_timesteps < 0 or args.eval_interval < 0:
        fail("--total-timesteps and --eval-interval must be >= 0")
    for name, ok, rule in (("learning_rate", lambda v: v > 0, "> 0"), ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
                           ("gae_lambda", lambda v: 0 <= v <= 1, "in [0, 1]"), ("clip_coef", lambda v: v > 0, "> 0"),
                           ("ent_coef", lambda v: v >= 0, ">= 0"), ("vf_coef", lambda v: v >= 0, ">= 0"),
                           ("max_grad_norm", lambda v: v > 0, "> 0")):
        if not (math.isfinite(getattr(args, name)) and ok(getattr(args, name))):  # NaN fails every comparison
            fail(f"--{name.replace('_', '-')} must be finite and {rule}, got {getattr(args, name)}")
    if not all(math.isfinite(s) and s >= 0 for s in args.obs_noise):
        fail(f"--obs-noise must be finite and >= 0, got {list(args.obs_noise)}")
    if not all(0.0 <= p <= 1.0 for p in args.action_repeat):
        fail(f"--action-repeat must lie in [0, 1], got {list(args.action_repeat)}")
    if args.adversaries is not None and args.num_adversaries is not None:
        fail("give either --adversaries or --num-adversaries, not both")
    if not 1 <= len(args.exp_name) <= 100 or "/" in args.exp_name or ".." in args.exp_name:
        fail(f"--exp-name must be 1-100 characters without '/' or '..' (it names files under runs/), got {args.exp_name!r}")
    extra_env_kwargs = parse_json_object(args.env_kwargs, "--env-kwargs") if args.env_kwargs is not None else {}
    shift = None  # env options of the env_shift condition
    if args.env_shift is not None and args.env_shift != "default":
        shift = parse_json_object(args.env_shift, "--env-shift")

    # TRY NOT TO MODIFY: seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Load the adversary (optional) and the defender; refuse anything that does not fit
    adv_ckpt = None
    if args.adversary_checkpoint is not None:
        adv_ckpt = read_checkpoint(args.adversary_checkpoint, "adversary checkpoint")
        if adv_ckpt.get("script") != "attack_worstcase":
            fail(f"{args.adversary_checkpoint} is not an attack_worstcase adversary (script: {adv_ckpt.get('script')!r})")
        if args.checkpoint is None:
            args.checkpoint = adv_ckpt.get("checkpoint")
    if args.checkpoint is None:
        fail("give --checkpoint (a defender .pt) or --adversary-checkpoint")
    ckpt = read_checkpoint(args.checkpoint, "checkpoint")
    script = ckpt.get("script")
    if not isinstance(script, str) or script not in KNOWN_SCRIPTS:
        fail(f"checkpoint {args.checkpoint} has script {script!r}; expected one of {', '.join(KNOWN_SCRIPTS)}")
    module = import_script(script)
    try:
        meta = {k: ckpt[k] for k in ("env_id", "env_kwargs", "n_agents", "obs_dim", "state_dim", "action_space")}
        defender = module.load_policy(ckpt, device)
    except KeyError as e:
        fail(f"checkpoint {args.checkpoint} is incomplete: missing {e}")
    except (ValueError, TypeError, RuntimeError) as e:
        fail(f"cannot load the {script} policy from {args.checkpoint}: {first_line(e)}")
    if not isinstance(meta["env_kwargs"], dict) or not all(isinstance(k, str) for k in meta["env_kwargs"]) \
            or not isinstance(meta["env_id"], str):
        fail(f"checkpoint {args.checkpoint} has a malformed env_id / env_kwargs")
    last_action = executed_last_action_fn(script, module)
    env_id = args.env_id or meta["env_id"]
    env_kwargs = {**meta["env_kwargs"], **extra_env_kwargs}
    run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    origin = "the checkpoint's env_kwargs" + (" and --env-kwargs" if extra_env_kwargs else "")
    try:
        env = envs.make(env_id, num_envs=args.num_envs, seed=args.seed, device=device, **env_kwargs)
    except (ValueError, TypeError, ImportError) as e:  # unknown ids and options, bad values
        fail(f"cannot build env {env_id!r} from {origin} {env_kwargs}: {first_line(e)}")
    found = {"n_agents": env.n_agents, "obs_dim": env.obs_dim, "state_dim": env.state_dim,
             "action_space": action_space_dict(env.action_space)}
    for key, value in found.items():
        if meta[key] != value:
            fail(f"env {env_id!r} does not match the checkpoint (trained on {meta['env_id']!r}): "
                 f"{key} is {value} here but {meta[key]} in the checkpoint")

    def make_eval_env(options=None):  # a fresh copy per condition: every condition starts from the same states
        return envs.make(env_id, num_envs=args.eval_episodes, seed=args.seed + 100_000, device=device,
                         **{**env_kwargs, **(options or {})})

    for kind in args.scripted:
        if kind not in ScriptedAdversary.KINDS or (kind == "flee" and not env_id.startswith("rendezvous")):
            fail(f"--scripted {kind!r}: choose from stop (any env) and flee (rendezvous only)")
    if args.env_shift == "default":
        if not callable(getattr(envs, "env_shift_kwargs", None)):
            fail("--env-shift default needs envs.env_shift_kwargs(), which this envs package lacks; give a JSON object")
        try:
            shift = envs.env_shift_kwargs(env_id)
        except ValueError as e:
            fail(f"--env-shift default: {first_line(e)}")
    if shift is not None:  # build the shifted env once now, so that a bad option never costs a training run
        try:
            shifted = make_eval_env(shift)
        except (ValueError, TypeError, ImportError) as e:
            fail(f"--env-shift {json.dumps(shift)} on {env_id!r}: {first_line(e)}")
        for key, value in found.items():
            shifted_value = action_space_dict(shifted.action_space) if key == "action_space" else getattr(shifted, key)
            if shifted_value != value:
                fail(f"--env-shift {json.dumps(shift)} changes {key} ({value} -> {shifted_value}); the team cannot act there")
        shifted.close()
    if args.report is not None and os.path.isdir(args.report):
        fail(f"--report {args.report!r} is a directory; give a file name")
    if args.report is not None:
        check_writable(os.path.dirname(os.path.abspath(args.report)), "the directory of --report")
    check_writable("runs", "the run directory")

    N, discrete, space = env.n_agents, env.is_discrete, found["action_space"]
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
        drawn = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed))
        adv_idx = sorted(drawn[: args.num_adversaries].tolist())
    else:
        adv_idx = list(args.adversaries) if args.adversaries is not None else [0]
    if not adv_idx or any(not 0 <= i < N for i in adv_idx) or len(set(adv_idx)) != len(adv_idx):
        fail(f"adversary indices must be distinct agents in [0, {N - 1}], got {adv_idx}")
    if len(adv_idx) >= N:
        fail(f"at least one agent must remain a defender: {len(adv_idx)} adversaries for {N} agents")
    if any(not 1 <= k < N for k in args.disable):
        fail(f"--disable k must be in [1, {N - 1}] for {N} agents, got {list(args.disable)}")
    adv_idx = sorted(adv_idx)
    k_adv = len(adv_idx)

    # ALGO LOGIC: initialize agent here
    try:
        hidden_dim = int(adv_ckpt["args"]["hidden_dim"]) if adv_ckpt is not None else args.hidden_dim
    except (KeyError, TypeError, ValueError) as e:
        fail(f"unusable adversary checkpoint {args.adversary_checkpoint}: no args.hidden_dim ({type(e).__name__})")
    actor = AdversaryActor(env.obs_dim + k_adv, env.n_actions, hidden_dim, discrete).to(device)
    value = Value(env.state_dim, hidden_dim).to(device)
    if adv_ckpt is not None:
        try:
            actor.load_state_dict(adv_ckpt["models"]["actor"])
            value.load_state_dict(adv_ckpt["models"]["value"])
        except (KeyError, TypeError, RuntimeError) as e:
            fail(f"unusable adversary checkpoint {args.adversary_checkpoint}: {type(e).__name__}: {first_line(e)}")
    adversary = Adversary(actor, adv_idx, discrete, space.get("low"), space.get("high"))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"{run_name}: attacking {script} on {env_id} ({N} agents, "
          f"{'Discrete' if discrete else 'Box'}({env.n_actions})), adversaries {adv_idx}, device {device}", flush=True)

    global_step = 0

    def save() -> str:
        path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save({"script": "attack_worstcase", "checkpoint": os.path.abspath(args.checkpoint),
                    "defender_script": script, "env_id": env_id, "env_kwargs": env_kwargs, **found,
                    "adversaries": adv_idx, "args": asdict(args), "global_step": global_step,
                    "models": {"actor": actor.state_dict(), "value": value.state_dict()}}, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves a half-written checkpoint
        return path

    def evaluate_worstcase():
        actor.eval()
        out = run_episodes(make_eval_env(), defender, env_id, adversary, adv_idx, seed=args.seed, last_action=last_action)
        actor.train()
        return out

    def adversary_whereabouts() -> str:
        if adv_ckpt is not None:
            return f"the adversary is {args.adversary_checkpoint}"
        return f"adversary saved to {saved}" if saved else "the adversary was not saved (--no-save-model)"

    # Train the adversary with PPO (skipped with --adversary-checkpoint)
    batch_size = args.num_envs * args.num_steps
    num_updates = 0 if adv_ckpt is not None else args.total_timesteps // batch_size
    if adv_ckpt is None and num_updates == 0 and args.total_timesteps > 0:
        num_updates = 1
    E, T, idx = args.num_envs, args.num_steps, torch.as_tensor(adv_idx, device=device)
    params = list(actor.parameters()) + list(value.parameters())
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    in_dim, a_shape = env.obs_dim + k_adv, (k_adv,) if discrete else (k_adv, env.n_actions)
    b_x = torch.zeros(T, E, k_adv, in_dim, device=device)
    b_avail = torch.ones(T, E, k_adv, env.n_actions if discrete else 1, dtype=torch.bool, device=device)
    b_a = torch.zeros(T, E, *a_shape, device=device)
    b_logp = torch.zeros(T, E, k_adv, device=device)
    b_state = torch.zeros(T, E, env.state_dim, device=device)
    b_v, b_r, b_done = (torch.zeros(T, E, device=device) for _ in range(3))
    recent_returns, last_eval, last_print, start_time = [], 0, 0.0, time.time()
    obs, state, avail = env.reset()
    hidden = defender.init_hidden(E)
    saved, interrupts = None, Interrupts().install()  # from here on, a signal saves what there is
    try:
        for update in range(1, num_updates + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / num_updates) * args.learning_rate
            for t in range(T):
                with torch.no_grad():
                    actions, hidden = defender.act(obs, avail, hidden)
                    x, av = adversary.inputs(obs, avail)
                    dist = actor.dist(x, av)
                    a = dist.sample()
                    logp = dist.log_prob(a) if discrete else dist.log_prob(a).sum(-1)
                    b_x[t], b_a[t], b_logp[t], b_state[t], b_v[t] = x, a, logp, state, value(state)
                    if discrete:
                        b_avail[t] = av
                    actions = actions.clone()
                    actions[:, idx] = adversary.to_env(a).to(actions.dtype)
                    if last_action is not None:  # the defenders see the adversary's executed actions
                        hidden = last_action(hidden, actions, env.n_actions)
                    obs, state, avail, reward, terminated, truncated, info = env.step(actions)
                    done = terminated | truncated
                    r = -reward  # the adversary maximises the negated team reward
                    if bool(truncated.any()):  # time limit: bootstrap from the final state
                        r = r + args.gamma * value(info["final_state"]) * truncated
                    b_r[t], b_done[t] = r, done.float()
                global_step += E
                if bool(done.any()):
                    hidden = reset_hidden(hidden, done)
                    recent_returns = (recent_returns + info["episode_return"][done].tolist())[-100:]
                    writer.add_scalar("charts/episodic_return", float(info["episode_return"][done].mean()), global_step)
                    length = float(info["episode_length"][done].float().mean())
                    writer.add_scalar("charts/episodic_length", length, global_step)
                    writer.add_scalar("charts/success_rate", float(info["success"][done].float().mean()), global_step)

            # GAE on the adversary's reward; done marks the end of an episode (truncation bootstrapped above)
            with torch.no_grad():
                next_v = value(state)
                adv = torch.zeros(T, E, device=device)
                last = torch.zeros(E, device=device)
                for t in reversed(range(T)):
                    nv = next_v if t == T - 1 else b_v[t + 1]
                    nonterminal = 1.0 - b_done[t]
                    delta = b_r[t] + args.gamma * nv * nonterminal - b_v[t]
                    last = delta + args.gamma * args.gae_lambda * nonterminal * last
                    adv[t] = last
                ret = adv + b_v

            # PPO: one clipped surrogate per adversary agent, all sharing the team advantage
            f_x, f_avail, f_a = b_x.flatten(0, 1), b_avail.flatten(0, 1), b_a.flatten(0, 1)
            f_a = f_a.long() if discrete else f_a
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
                    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)  # separately, so that
                    # clipped on its own: large value errors never mute the policy
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
                returns, success, _ = evaluate_worstcase()
                writer.add_scalar("eval/episodic_return", returns.mean().item(), global_step)
                writer.add_scalar("eval/success_rate", success.float().mean().item(), global_step)
                print(f"global_step={global_step} eval_team_return={returns.mean().item():.2f} "
                      f"eval_success={success.float().mean().item():.2f}", flush=True)
            if time.time() - last_print > 10 or update == num_updates:
                last_print = time.time()
                ret_str = f"{np.mean(recent_returns):.2f}" if recent_returns else "nan"
                print(f"global_step={global_step} SPS={sps} team_return={ret_str}", flush=True)
        if args.save_model and adv_ckpt is None:
            with interrupts.held():
                saved = save()
            print(f"adversary saved to {saved}", flush=True)
            if interrupts.pending:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if saved is None and args.save_model and adv_ckpt is None:
            print("interrupted: saving the adversary, please wait", flush=True)
            with interrupts.held():
                saved = save()
        print(f"interrupted: {adversary_whereabouts()}", flush=True)
        sys.exit(interrupts.exit_code)
    env.close()

    # Evaluate every condition on fresh, identically seeded evaluation envs: (name, run_episodes
    # options, what the report says about it). The natural episodes also measure the observations'
    # spread, the unit of the observation noise.
    hook = None
    if args.interaction_breaking:
        ibal_here = os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ibal_qmix.py"))
        providers = [module] + ([import_script("ibal_qmix")] if script in QMIX_SCRIPTS and script != "ibal_qmix"
                                and ibal_here else [])
        hook = next((getattr(m, IBAL_HOOK) for m in providers if callable(getattr(m, IBAL_HOOK, None))), None)
        if hook is None:
            print(f"note: interaction_breaking is unavailable for {script} checkpoints "
                  f"(no {IBAL_HOOK}() in {' or '.join(m.__name__ + '.py' for m in providers)})", file=sys.stderr)
    spread = ObsSpread() if args.obs_noise else None
    rand_adv = RandomAdversary(adv_idx, env, torch.Generator().manual_seed(args.seed + 1))
    plan = [("natural", {"obs_spread": spread}, {}), ("random", {"adversary": rand_adv}, {}),
            ("worstcase", {"adversary": adversary, "record": args.plot}, {})]
    plan += [(f"scripted_{kind}", {"scripted": kind}, {}) for kind in args.scripted]
    plan += [(f"obs_noise_{s:g}", {"obs_noise": s, "seed": args.seed + 2}, {"obs_noise": s, "obs_noise_rule": OBS_NOISE_RULE})
             for s in args.obs_noise]
    plan += [(f"action_repeat_{p:g}", {"repeat_p": p, "seed": args.seed + 3}, {}) for p in args.action_repeat]
    plan += [(f"dis_{k}", {"disable_k": k, "seed": args.seed + 4}, {}) for k in args.disable]
    if shift is not None:
        plan.append(("env_shift", {"shift": shift}, {"env_shift": shift}))
    if hook is not None:
        plan.append(("interaction_breaking", {"hook": hook}, {}))
    conditions, traj, partial = {}, [], False
    try:
        for i, (name, options, about) in enumerate(plan, 1):
            options = dict(options)
            eval_env = make_eval_env(options.pop("shift", None))
            if "scripted" in options:
                options["adversary"] = ScriptedAdversary(options.pop("scripted"), adv_idx, eval_env, env_id)
            if "hook" in options:
                returns, success = options["hook"](ckpt, defender, eval_env, args.seed)[:2]
            else:
                if "obs_noise" in options:
                    options["obs_scale"] = spread.scale()
                returns, success, episode_traj = run_episodes(eval_env, defender, env_id, adv_idx=adv_idx,
                                                              last_action=last_action, **{"seed": args.seed, **options})
                traj = episode_traj if name == "worstcase" else traj
            eval_env.close()
            conditions[name] = {**summarise(returns, success), **about}
            print(f"evaluated {name} ({i}/{len(plan)})", flush=True)
    except KeyboardInterrupt:
        partial = True

    # Report: table, TensorBoard, JSON, plot (a signal now is noted but lets the files be written)
    with interrupts.held():
        print(f"\n{'condition':<22}{'return':>10}{'± 95% CI':>11}{'success':>10}{'episodes':>10}")
        for name, c in conditions.items():
            print(f"{name:<22}{c['return_mean']:>10.3f}{c['return_ci95']:>11.3f}{c['success_rate']:>10.3f}{c['episodes']:>10}")
            writer.add_scalar(f"report/{name}/return_mean", c["return_mean"], global_step)
            writer.add_scalar(f"report/{name}/return_ci95", c["return_ci95"], global_step)
            writer.add_scalar(f"report/{name}/success_rate", c["success_rate"], global_step)
        report = {"checkpoint": args.checkpoint, "script": script, "env_id": env_id, "env_kwargs": env_kwargs,
                  "adversaries": adv_idx, "partial": partial,
                  "obs_noise_scale": spread.scale().tolist() if spread is not None and spread.n else None,
                  "conditions": conditions}
        report_path = args.report or f"runs/{run_name}/report.json"
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        with open(report_path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(report_path + ".tmp", report_path)
        writer.close()
        if partial:
            print(f"interrupted: partial report ({len(conditions)} of {len(plan)} conditions) written to "
                  f"{report_path}; {adversary_whereabouts()}", flush=True)
            sys.exit(interrupts.exit_code)
        print(f"report written to {report_path}")
        if args.plot:
            png = os.path.splitext(report_path)[0] + ".png"
            show_traj = traj if env_id.startswith(("rendezvous", "quads")) and traj else None
            make_plot(png, conditions, show_traj, adv_idx, f"{script} on {env_id}, adversaries {adv_idx}")
            print(f"plot written to {png}")
