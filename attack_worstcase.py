# Worst-case adversary against a frozen cooperative team, plus non-adversarial disturbances.
# The MIR3 paper's robustness protocol (Li et al., IEEE TNNLS 2025, sections II-A3 and IV-A3):
# load a checkpoint of mir3_maddpg / mir3_qmix / mir3_mappo / ibal_qmix, freeze its policy, hand
# k chosen agents to an adversary that sees what they see, acts in their action space and
# maximises the negated team reward, train it with PPO (shared actor over the adversary agents,
# centralised value on the global state), then report greedy-evaluation returns for: no attack,
# a random-action adversary, the trained worst-case adversary, and on request the paper's Table I
# disturbances (observation noise, action repeat) and IBAL's disabled teammates (Dis-k).
#
#   python attack_worstcase.py --checkpoint runs/<run>/mir3_maddpg.pt --adversaries 0 \
#       --total-timesteps 200000 --eval-episodes 32 [--report out.json] [--plot]
#   python attack_worstcase.py --adversary-checkpoint runs/<attack run>/attack_worstcase.pt  # re-evaluate
import ctypes
import importlib
import json
import math
import os
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
    """Table I: Gaussian observation noise σ on every defender observation (one condition per σ)"""
    action_repeat: Tuple[float, ...] = ()
    """Table I: each agent repeats its previous action with probability p (one condition per p)"""
    disable: Tuple[int, ...] = ()
    """IBAL's Dis-k: k random agents do nothing for the whole episode (one condition per k)"""
    interaction_breaking: bool = False
    """add IBAL's interaction-breaking attack when the checkpoint's module provides it"""
    report: Optional[str] = None
    """where to write the JSON report (default `runs/{run_name}/report.json`)"""
    plot: bool = False
    """write a PNG next to the report: return per condition (+ trajectories for rendezvous / quads)"""


def keep_freed_memory() -> None:
    """Stop glibc from handing the memory of freed tensors back to the OS after every update.

    Each update allocates and frees the same few-MiB tensors. By default glibc serves them with mmap
    or trims them off the heap when they are freed, so the next update page-faults them in again,
    which took a third of the training time of mir3_maddpg on CPU. A no-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks below 64 MiB come from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: give heap back to the OS only above 256 MiB free
    except (OSError, AttributeError):
        pass


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def action_space_dict(space) -> dict:
    if space.__class__.__name__ == "Discrete":
        return {"type": "discrete", "n": int(space.n)}
    return {"type": "box", "shape": list(space.shape), "low": space.low.tolist(), "high": space.high.tolist()}


def read_checkpoint(path: str, what: str) -> dict:
    """torch.load(weights_only=True) of a dict, or one clear error line."""
    if not path or not os.path.isfile(path):
        fail(f"{what} not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights-only errors: all mean "not a checkpoint we can read"
        fail(f"{what} {path} is not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict):
        fail(f"{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


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


def null_actions(env, env_id: str) -> torch.Tensor:
    """The 'do nothing' action [N] or [N, d] of a disabled agent (Dis-k) when all actions are available."""
    N = env.n_agents
    if env.is_discrete:  # rendezvous-discrete stop, quads vel13 hold, LBF NONE, SMAC no-op (stop: see below)
        return torch.zeros(N, dtype=torch.int64, device=env.device)
    hover = getattr(sys.modules.get(type(env).__module__), "HOVER_ACTION", None)  # quads motors: hover
    value = 0.0 if hover is None else float(hover)
    return torch.full((N, env.n_actions), value, device=env.device)


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
def run_episodes(env, defender, env_id: str, adversary=None, adv_idx=(), obs_noise=0.0, repeat_p=0.0,
                 disable_k=0, seed=0, record=False):
    """One greedy episode in each of ``env.num_envs`` envs under one condition.

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
    disabled = None
    if disable_k:  # k distinct random agents per env, fixed for the episode
        disabled = torch.zeros(E, N, dtype=torch.bool)
        disabled.scatter_(1, torch.rand(E, N, generator=g).argsort(1)[:, :disable_k], True)
        disabled = disabled.to(dev)
        null = null_actions(env, env_id)
    prev, traj = None, []
    while bool(running.any()):
        if record and hasattr(env, "pos") and bool(running[0]):
            traj.append(env.pos[0, :, :2].cpu().numpy().copy())
        d_obs = obs + obs_noise * torch.randn(obs.shape, generator=g).to(dev) if obs_noise else obs
        actions, hidden = defender.act(d_obs, avail, hidden)
        actions = actions.clone()
        if adversary is not None:
            actions[:, adv_idx] = adversary.act(obs, avail, state).to(actions.dtype)
        if disabled is not None:
            nothing = null.expand_as(actions)
            if env_id.startswith("smac:"):  # prefer 'stop' (1) when available, else no-op (0)
                nothing = avail[..., 1].long()
            mask = disabled if env.is_discrete else disabled.unsqueeze(-1)
            actions = torch.where(mask, nothing, actions)
        if repeat_p and prev is not None:
            repeat = (torch.rand(E, N, generator=g) < repeat_p).to(dev)
            if env.is_discrete:  # never repeat an action that is no longer available
                repeat &= avail.gather(-1, prev.unsqueeze(-1)).squeeze(-1)
            else:
                repeat = repeat.unsqueeze(-1)
            actions = torch.where(repeat, prev, actions)
        prev = actions
        obs, state, avail, reward, terminated, truncated, info = env.step(actions)
        returns += reward * running
        done = (terminated | truncated) & running
        success |= info["success"] & done
        running &= ~done
    return returns, success, traj


def summarise(returns: torch.Tensor, success: torch.Tensor) -> dict:
    r = returns.double().cpu()
    n = r.numel()
    std = float(r.std(unbiased=True)) if n > 1 else 0.0
    return {"return_mean": float(r.mean()), "return_ci95": 1.96 * std / math.sqrt(n),
            "success_rate": float(success.float().mean()), "episodes": int(n)}


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
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_dim", "eval_episodes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.total_timesteps < 0 or args.eval_interval < 0:
        fail("--total-timesteps and --eval-interval must be >= 0")
    if any(s < 0 or not math.isfinite(s) for s in args.obs_noise):
        fail(f"--obs-noise must be finite and >= 0, got {list(args.obs_noise)}")
    if any(not 0.0 <= p <= 1.0 for p in args.action_repeat):
        fail(f"--action-repeat must lie in [0, 1], got {list(args.action_repeat)}")
    if args.adversaries is not None and args.num_adversaries is not None:
        fail("give either --adversaries or --num-adversaries, not both")

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
        fail(f"cannot load the {script} policy from {args.checkpoint}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not isinstance(meta["env_kwargs"], dict) or not isinstance(meta["env_id"], str):
        fail(f"checkpoint {args.checkpoint} has a malformed env_id / env_kwargs")
    env_id = args.env_id or meta["env_id"]
    env_kwargs = dict(meta["env_kwargs"])
    run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    try:
        env = envs.make(env_id, num_envs=args.num_envs, seed=args.seed, device=device, **env_kwargs)
    except (ValueError, ImportError) as e:
        fail(str(e).splitlines()[0])
    found = {"n_agents": env.n_agents, "obs_dim": env.obs_dim, "state_dim": env.state_dim,
             "action_space": action_space_dict(env.action_space)}
    for key, value in found.items():
        if meta[key] != value:
            fail(f"env {env_id!r} does not match the checkpoint (trained on {meta['env_id']!r}): "
                 f"{key} is {value} here but {meta[key]} in the checkpoint")

    def make_eval_env():  # a fresh copy per condition: every condition starts from the same states
        return envs.make(env_id, num_envs=args.eval_episodes, seed=args.seed + 100_000, device=device, **env_kwargs)

    N, discrete, space = env.n_agents, env.is_discrete, found["action_space"]
    if adv_ckpt is not None:
        adv_idx = list(adv_ckpt.get("adversaries", []))
        if args.adversaries is not None and sorted(args.adversaries) != sorted(adv_idx):
            fail(f"--adversaries {args.adversaries} differs from the adversary checkpoint's {adv_idx}")
        for key, value in found.items():
            if adv_ckpt.get(key) != value:
                fail(f"the adversary checkpoint was trained on another setting: {key} is {adv_ckpt.get(key)} there, {value} here")
    elif args.num_adversaries is not None:
        if not 1 <= args.num_adversaries < N:
            fail(f"--num-adversaries must be in [1, {N - 1}] for {N} agents, got {args.num_adversaries}")
        adv_idx = sorted(torch.randperm(N, generator=torch.Generator().manual_seed(args.seed))[: args.num_adversaries].tolist())
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
    hidden_dim = adv_ckpt["args"]["hidden_dim"] if adv_ckpt is not None else args.hidden_dim
    actor = AdversaryActor(env.obs_dim + k_adv, env.n_actions, hidden_dim, discrete).to(device)
    value = Value(env.state_dim, hidden_dim).to(device)
    if adv_ckpt is not None:
        try:
            actor.load_state_dict(adv_ckpt["models"]["actor"])
            value.load_state_dict(adv_ckpt["models"]["value"])
        except (KeyError, TypeError, RuntimeError) as e:
            fail(f"unusable adversary checkpoint {args.adversary_checkpoint}: {type(e).__name__}: {str(e).splitlines()[0]}")
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

    def evaluate_worstcase(record=False):
        actor.eval()
        out = run_episodes(make_eval_env(), defender, env_id, adversary, adv_idx, seed=args.seed, record=record)
        actor.train()
        return out

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
                    writer.add_scalar("charts/episodic_length", float(info["episode_length"][done].float().mean()), global_step)
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
                    nn.utils.clip_grad_norm_(value.parameters(), args.max_grad_norm)  # large value errors never mute the policy
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
    except KeyboardInterrupt:
        if args.save_model and adv_ckpt is None:
            print(f"interrupted: adversary saved to {save()}", flush=True)
        sys.exit(130)
    if args.save_model and adv_ckpt is None:
        print(f"adversary saved to {save()}", flush=True)
    env.close()

    # Evaluate every condition on fresh, identically seeded evaluation envs
    conditions, eval_env = {}, make_eval_env
    conditions["natural"] = summarise(*run_episodes(eval_env(), defender, env_id, seed=args.seed)[:2])
    rand_adv = RandomAdversary(adv_idx, env, torch.Generator().manual_seed(args.seed + 1))
    conditions["random"] = summarise(*run_episodes(eval_env(), defender, env_id, rand_adv, adv_idx, seed=args.seed)[:2])
    returns, success, traj = evaluate_worstcase(record=args.plot)
    conditions["worstcase"] = summarise(returns, success)
    for sigma in args.obs_noise:
        conditions[f"obs_noise_{sigma:g}"] = summarise(
            *run_episodes(eval_env(), defender, env_id, obs_noise=sigma, seed=args.seed + 2)[:2])
    for p in args.action_repeat:
        conditions[f"action_repeat_{p:g}"] = summarise(
            *run_episodes(eval_env(), defender, env_id, repeat_p=p, seed=args.seed + 3)[:2])
    for k in args.disable:
        conditions[f"dis_{k}"] = summarise(*run_episodes(eval_env(), defender, env_id, disable_k=k, seed=args.seed + 4)[:2])
    if args.interaction_breaking:
        providers = [module] + ([import_script("ibal_qmix")] if script in QMIX_SCRIPTS and script != "ibal_qmix"
                                and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ibal_qmix.py")) else [])
        hook = next((getattr(m, IBAL_HOOK) for m in providers if callable(getattr(m, IBAL_HOOK, None))), None)
        if hook is None:
            print(f"note: interaction_breaking is unavailable for {script} checkpoints "
                  f"(no {IBAL_HOOK}() in {' or '.join(m.__name__ + '.py' for m in providers)})", file=sys.stderr)
        else:
            conditions["interaction_breaking"] = summarise(*hook(ckpt, defender, eval_env(), args.seed)[:2])

    # Report: table, TensorBoard, JSON, plot
    print(f"\n{'condition':<22}{'return':>10}{'± 95% CI':>11}{'success':>10}{'episodes':>10}")
    for name, c in conditions.items():
        print(f"{name:<22}{c['return_mean']:>10.3f}{c['return_ci95']:>11.3f}{c['success_rate']:>10.3f}{c['episodes']:>10}")
        writer.add_scalar(f"report/{name}/return_mean", c["return_mean"], global_step)
        writer.add_scalar(f"report/{name}/return_ci95", c["return_ci95"], global_step)
        writer.add_scalar(f"report/{name}/success_rate", c["success_rate"], global_step)
    report = {"checkpoint": args.checkpoint, "script": script, "env_id": env_id, "adversaries": adv_idx,
              "conditions": conditions}
    report_path = args.report or f"runs/{run_name}/report.json"
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(report_path + ".tmp", report_path)
    print(f"report written to {report_path}")
    if args.plot:
        png = os.path.splitext(report_path)[0] + ".png"
        show_traj = traj if env_id.startswith(("rendezvous", "quads")) and traj else None
        make_plot(png, conditions, show_traj, adv_idx, f"{script} on {env_id}, adversaries {adv_idx}")
        print(f"plot written to {png}")
    writer.close()
