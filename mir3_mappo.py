# MIR3 on a MAPPO backbone, continuous and discrete actions.
# Li et al., "Robust Multi-Agent Reinforcement Learning by Mutual Information Regularization",
# IEEE TNNLS 2025. Train with no adversary, but shape the team reward to r - λ·Î(s; a), where Î is a
# CLUB upper bound of the mutual information between the global state and the joint action.
# MAPPO (Yu et al. 2022): shared actor with agent ids, centralised V(state) with value
# normalisation, GAE, clipped surrogate and clipped value loss, entropy bonus, several epochs per
# rollout. MIR3 fits CLUB on each fresh rollout and subtracts λ·Î from its rewards before GAE.
# With --mi-coef 0 this is plain MAPPO.
import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from runtime import (
    action_space_dict,
    check_fits,
    check_flags,
    check_same_env,
    env_kwargs_of,
    episodes_started,
    fail,
    ignore_stop_signals,
    make_envs,
    open_run_dir,
    parse_run,
    restore,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stop_if_not_finite,
    stop_on_signals,
    stopped,
)

# λ per env id, chosen against its reward scale (README, `mir3_mappo.py` section, "Default λ"); any other env
# (the discrete variants included) takes the paper's SMAC value
DEFAULT_MI_COEF = {"quads-same-goal": 1e-4, "quads-swarm-vs-swarm": 1e-4, "rendezvous": 0.01}
FALLBACK_MI_COEF = 5e-4
MI_ESTIMATORS = ("club", "club-sample", "l1out", "vub")
# env options when --n-agents / --episode-limit are not given: a small swarm and short episodes for the motor-control
# quads (README, `mir3_mappo.py` section); 8 s on swarm-vs-swarm holds the teams' one swap of centres (at 4-6 s)
DEFAULT_ENV_KWARGS = {"quads-same-goal": {"n_agents": 2, "episode_limit": 400},
                      "quads-swarm-vs-swarm": {"n_agents": 4, "episode_limit": 800}}


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    save_model: bool = True
    """whether to save the checkpoint to `runs/{run_name}/{exp_name}.pt`"""
    save_interval: int = 0
    """also save every this many env steps (0: only at the end and on Ctrl-C)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint up to --total-timesteps, in its directory (README, "Runs that survive a cluster")"""

    # Environment
    env_id: str = "quads-same-goal"
    """the id of the environment (see `envs.registered_ids()`)"""
    n_agents: Optional[int] = None
    """number of agents of our own tasks (None: DEFAULT_ENV_KWARGS, else the env default)"""
    episode_limit: Optional[int] = None
    """episode length of our own tasks (None: DEFAULT_ENV_KWARGS, else the env default)"""
    env_kwargs: Optional[str] = None
    """extra env constructor options as a JSON object, e.g. '{"world_size": 100}' (saved in the checkpoint)"""
    num_envs: int = 64
    """number of parallel environments"""

    # Algorithm
    total_timesteps: int = 12_000_000
    """total env steps (one step of one env, all agents)"""
    num_steps: int = 128
    """steps per env in each rollout"""
    learning_rate: float = 5e-4
    """Adam learning rate of actor and critic"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """λ of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch (env-steps for the MLP, whole env sequences with --rnn)"""
    update_epochs: int = 5
    """epochs over each rollout"""
    clip_coef: float = 0.2
    """surrogate and value clipping coefficient"""
    ent_coef: Optional[float] = None
    """entropy bonus (None: 0.01 for discrete, 0 for continuous actions)"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip"""
    hidden_dim: int = 64
    """hidden width of actor and critic"""
    rnn: bool = False
    """use a GRU actor (recurrent minibatches of whole env sequences) instead of the MLP"""
    init_log_std: float = -1.0
    """initial state-independent log-std of the Gaussian policy (continuous actions)"""
    norm_obs: bool = True
    """normalise observations and states with running mean/std, clipped to ±10 (off: the raw inputs)"""

    # MIR3
    mi_coef: Optional[float] = None
    """λ, weight of the MI penalty subtracted from the rollout rewards (0: plain MAPPO; None: per-env default)"""
    mi_estimator: str = "club"
    """MI upper bound: club, club-sample, l1out or vub"""
    club_lr: float = 5e-4
    """learning rate of the variational q(a|s)"""
    club_hidden_dim: int = 128
    """hidden width of q(a|s)"""
    club_batch_size: int = 512
    """(state, joint action) pairs per q(a|s) step"""
    club_steps: int = 8
    """q(a|s) gradient steps on each fresh rollout, before Î is computed"""

    # Evaluation
    eval_interval: int = 250_000
    """env steps between greedy evaluations (0: never)"""
    eval_episodes: int = 32
    """episodes per evaluation (run in parallel)"""


def with_ids(obs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Append the one-hot agent id to observations [..., N, D]."""
    return torch.cat((obs, ids.expand(*obs.shape[:-1], ids.shape[0])), -1)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class RunningNorm(nn.Module):
    """Running mean/variance (parallel Welford) in buffers, so they travel in the state_dict. ``active=False``
    (--no-norm-obs) passes inputs through unchanged, without the ±clip that would cut raw body rates or coordinates."""

    def __init__(self, dim: int, clip: float = 10.0, active: bool = True):
        super().__init__()
        self.clip, self.active = clip, active
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))

    @torch.no_grad()
    def update(self, x):
        x = x.reshape(-1, self.mean.shape[0])
        n, mean, var = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + var * n + delta**2 * self.count * n / total) / total)
        self.count.copy_(total)

    def forward(self, x):
        if not self.active:
            return x
        return ((x - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-self.clip, self.clip)

    def denormalize(self, y):
        return y * torch.sqrt(self.var + 1e-8) + self.mean


class Actor(nn.Module):
    """Shared actor on normalised obs + agent id: MLP (2 tanh layers) or GRU; logits or Gaussian mean."""

    def __init__(self, obs_dim: int, n_agents: int, out_dim: int, hidden_dim: int, rnn: bool, discrete: bool,
                 init_log_std: float = 0.0, norm_obs: bool = True):
        super().__init__()
        self.hidden_dim, self.is_rnn = hidden_dim, rnn
        self.obs_norm = RunningNorm(obs_dim, active=norm_obs)
        self.register_buffer("ids", torch.eye(n_agents))
        self.fc1 = layer_init(nn.Linear(obs_dim + n_agents, hidden_dim))
        self.core = nn.GRUCell(hidden_dim, hidden_dim) if rnn else layer_init(nn.Linear(hidden_dim, hidden_dim))
        self.out = layer_init(nn.Linear(hidden_dim, out_dim), std=0.01)
        self.log_std = None if discrete else nn.Parameter(torch.full((out_dim,), float(init_log_std)))

    def init_hidden(self, num_envs: int, n_agents: int, device):
        return torch.zeros(num_envs, n_agents, self.hidden_dim, device=device) if self.is_rnn else None

    def forward(self, obs, h=None):
        z = torch.tanh(self.fc1(with_ids(self.obs_norm(obs), self.ids)))
        if self.is_rnn:
            h = self.core(z.reshape(-1, self.hidden_dim), h.reshape(-1, self.hidden_dim)).view(h.shape)
            return self.out(h), h
        return self.out(torch.tanh(self.core(z))), None

    def unroll(self, obs, h0, first):
        """GRU outputs for sequences obs [T, B, N, D] from hidden h0 [B, N, H]; rows with first [T, B] restart at 0."""
        h, outs = h0, []
        for t in range(obs.shape[0]):
            o, h = self(obs[t], h * (~first[t]).view(-1, 1, 1))
            outs.append(o)
        return torch.stack(outs)

    def get_action(self, out, avail, action=None):
        """Sample an action from the outputs ``out`` (or score the given one): action, log-prob and entropy per agent."""
        if self.log_std is None:  # categorical over the available actions
            dist = torch.distributions.Categorical(logits=out.masked_fill(~avail, -1e10))
        else:
            dist = torch.distributions.Normal(out, self.log_std.exp().expand_as(out))
        if action is None:
            action = dist.sample()
        if self.log_std is None:
            return action, dist.log_prob(action.long()), dist.entropy()
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1)


class Critic(nn.Module):
    """Centralised V(state) in normalised units; ``value_norm`` holds the running return statistics."""

    def __init__(self, state_dim: int, hidden_dim: int, norm_state: bool = True):
        super().__init__()
        self.state_norm = RunningNorm(state_dim, active=norm_state)
        self.value_norm = RunningNorm(1, clip=float("inf"))
        self.net = nn.Sequential(layer_init(nn.Linear(state_dim, hidden_dim)), nn.Tanh(),
                                 layer_init(nn.Linear(hidden_dim, hidden_dim)), nn.Tanh(),
                                 layer_init(nn.Linear(hidden_dim, 1), std=1.0))

    def forward(self, state):
        return self.net(self.state_norm(state)).squeeze(-1)


class CLUB(nn.Module):
    """Variational q(a | s) over the joint action and the MI upper bounds built on it.

    Discrete: q factorises over agents, log q(a|s) = Σ_i log softmax(f(s))[i, a_i], with one-hot
    actions a [B, N, A]. Continuous: a diagonal Gaussian over the N·d joint action, a [B, N, d].
    ``mi(s, a, estimator)`` returns a pointwise estimate [B] whose negatives come from the batch:
      club        log q(a_b|s_b) - 1/B Σ_b' log q(a_b'|s_b)       (closed form, O(B))
      club-sample log q(a_b|s_b) - log q(a_π(b)|s_b)              (one shuffled negative)
      l1out       log q(a_b|s_b) - log 1/K Σ_{k≠b} q(a_b|s_k)      (K ≤ 512 random rows)
      vub         log q(a_b|s_b) - log r(a_b)                      (learned marginal r)
    """

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, discrete: bool, hidden_dim: int):
        super().__init__()
        self.n_agents, self.n_actions, self.discrete = n_agents, n_actions, discrete
        width = n_agents * n_actions * (1 if discrete else 2)
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, width))
        self.marginal = nn.Parameter(torch.zeros(width))  # r(a) of the VUB bound

    def _params(self, s):
        out = self.net(s)
        if self.discrete:
            return F.log_softmax(out.view(-1, self.n_agents, self.n_actions), -1), None
        mu, logvar = out.chunk(2, -1)
        return mu, logvar.clamp(-10.0, 4.0)  # wide enough for near-deterministic policies

    def _log_density(self, params, a):
        if self.discrete:
            return (params[0] * a).sum((-1, -2))
        mu, logvar = params
        a = a.flatten(-2)
        return -0.5 * (((a - mu) ** 2) * torch.exp(-logvar) + logvar + np.log(2 * np.pi)).sum(-1)

    def log_q(self, s, a):
        return self._log_density(self._params(s), a)

    def log_marginal(self, a):
        if self.discrete:
            return self._log_density((F.log_softmax(self.marginal.view(self.n_agents, self.n_actions), -1), None), a)
        mu, logvar = self.marginal.chunk(2, -1)
        return self._log_density((mu, logvar.clamp(-10.0, 4.0)), a)

    def learning_loss(self, s, a):
        """Negative log-likelihood of q(a|s) (and of the marginal r(a), used only by vub)."""
        return -(self.log_q(s, a) + self.log_marginal(a)).mean()

    def mi(self, s, a, estimator: str = "club"):
        params = self._params(s)
        positive = self._log_density(params, a)
        if estimator == "club":
            if self.discrete:  # mean over b' of one-hots, then one dot product per row
                negative = (params[0] * a.mean(0)).sum((-1, -2))
            else:
                mu, logvar = params
                af = a.flatten(-2)
                second = (mu - af.mean(0)) ** 2 + af.var(0, unbiased=False)
                negative = -0.5 * (second * torch.exp(-logvar) + logvar + np.log(2 * np.pi)).sum(-1)
        elif estimator == "club-sample":
            negative = self._log_density(params, a[torch.randperm(a.shape[0], device=a.device)])
        elif estimator == "l1out":
            k = torch.randperm(a.shape[0], device=a.device)[:512]
            if self.discrete:
                mat = torch.einsum("kia,bia->bk", params[0][k], a)
            else:
                mu, logvar = params[0][k], params[1][k]
                inv = torch.exp(-logvar)
                af = a.flatten(-2)
                quad = (af**2) @ inv.T - 2 * af @ (mu * inv).T + (mu**2 * inv).sum(-1)
                mat = -0.5 * (quad + (logvar + np.log(2 * np.pi)).sum(-1))
            own = k[None, :] == torch.arange(a.shape[0], device=a.device)[:, None]
            mat = mat.masked_fill(own, -float("inf"))
            negative = torch.logsumexp(mat, 1) - torch.log((~own).sum(1).clamp(min=1).float())
        elif estimator == "vub":
            negative = self.log_marginal(a)
        else:
            raise ValueError(f"unknown MI estimator {estimator!r}; choose from {MI_ESTIMATORS}")
        return positive - negative


class Policy:
    """Frozen deterministic policy (what ``load_policy`` returns): argmax of masked logits or the
    Gaussian mean clipped to [-1, 1] and mapped to the action bounds."""

    def __init__(self, actor: Actor, n_agents: int, discrete: bool, low=None, high=None):
        self.actor, self.n_agents, self.discrete = actor, n_agents, discrete
        self.device = next(actor.parameters()).device
        if not discrete:
            low, high = torch.as_tensor(low, device=self.device), torch.as_tensor(high, device=self.device)
            self.scale, self.bias = (high - low) / 2, (high + low) / 2

    def init_hidden(self, num_envs: int):
        """None for the MLP actor, else zeros [E, N, H]; zero the rows of envs that finish."""
        return self.actor.init_hidden(num_envs, self.n_agents, self.device)

    @torch.no_grad()
    def act(self, obs, avail, hidden):
        out, hidden = self.actor(obs, hidden)
        if self.discrete:
            return out.masked_fill(~avail, -float("inf")).argmax(-1), hidden
        return out.clamp(-1.0, 1.0) * self.scale + self.bias, hidden


def load_policy(checkpoint: dict, device="cpu") -> Policy:
    """Rebuild the frozen deterministic policy of a ``mir3_mappo`` checkpoint (a dict from torch.load)."""
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != "mir3_mappo":
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not a mir3_mappo checkpoint (script: {found!r})")
    try:
        args, space, n_agents = checkpoint["args"], checkpoint["action_space"], checkpoint["n_agents"]
        discrete = space["type"] == "discrete"
        n_out = space["n"] if discrete else space["shape"][0]
        actor = Actor(checkpoint["obs_dim"], n_agents, n_out, args["hidden_dim"], args["rnn"], discrete,
                      norm_obs=args.get("norm_obs", True)).to(device)
        actor.load_state_dict(checkpoint["models"]["actor"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"unusable mir3_mappo checkpoint: {type(e).__name__}: {e}") from None
    return Policy(actor.eval().requires_grad_(False), n_agents, discrete, space.get("low"), space.get("high"))


@torch.no_grad()
def evaluate(policy: Policy, env) -> tuple:
    """Run one greedy episode in each of ``env.num_envs`` envs; returns (returns, successes) [E]."""
    obs, _, avail = env.reset()
    hidden = policy.init_hidden(env.num_envs)
    returns = torch.zeros(env.num_envs, device=env.device)
    success = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    running = torch.ones(env.num_envs, dtype=torch.bool, device=env.device)
    while bool(running.any()):
        actions, hidden = policy.act(obs, avail, hidden)
        obs, _, avail, reward, terminated, truncated, info = env.step(actions)
        returns += reward * running
        done = (terminated | truncated) & running
        success |= info["success"] & done
        running &= ~done
        if hidden is not None:
            hidden = hidden * (~done).view(-1, 1, 1)
    return returns, success


# what each numeric flag must do (runtime.check_flags); --num-minibatches is checked between counts and rates
COUNT_RULES = {**dict.fromkeys(("num_envs", "num_steps", "total_timesteps", "num_minibatches", "update_epochs",
                                "hidden_dim", "club_hidden_dim", "club_batch_size", "club_steps", "eval_episodes"),
                               "be >= 1"), "eval_interval": "be >= 0", "save_interval": "be >= 0"}
RATE_RULES = {"mi_coef": "be >= 0", "gamma": "lie in [0, 1]", "gae_lambda": "lie in [0, 1]", "learning_rate": "be > 0",
              "club_lr": "be > 0", "clip_coef": "be > 0", "ent_coef": "be >= 0", "vf_coef": "be >= 0",
              "max_grad_norm": "be > 0", "init_log_std": None}


def check_args(args: Args) -> None:
    """Refuse at start-up, in one line, flags that would fail late or make a silently wrong run."""
    check_flags(args, COUNT_RULES)
    if args.num_minibatches > args.num_envs * (1 if args.rnn else args.num_steps):
        fail(f"--num-minibatches ({args.num_minibatches}) must be <= --num-envs{'' if args.rnn else ' x --num-steps'}")
    check_flags(args, RATE_RULES)  # --mi-coef, --ent-coef None: the default of the env or action type
    if args.mi_estimator not in MI_ESTIMATORS:
        fail(f"--mi-estimator must be one of {', '.join(MI_ESTIMATORS)}, got {args.mi_estimator!r}")


# --resume: besides the weights (with the running statistics of RunningNorm), a checkpoint's "continuation" holds
# what a run needs to go on: optimiser states, RNG states, counters and the envs' episode counters, all as they
# were after the last completed update (a rollout boundary: on-policy, there is no buffer to keep).
MODEL_FLAGS = ("env_id", "n_agents", "episode_limit", "env_kwargs", "hidden_dim", "rnn", "norm_obs", "init_log_std",
               "club_hidden_dim")
CONTINUATION_KEYS = ("optimizers", "targets", "rng", "counters", "episode_counts")


if __name__ == "__main__":
    args, resumed, run_name, run_dir = parse_run(Args, "mir3_mappo", CONTINUATION_KEYS, MODEL_FLAGS)
    check_args(args)
    env_kwargs = env_kwargs_of(args, DEFAULT_ENV_KWARGS.get(args.env_id)) if resumed is None else resumed["env_kwargs"]

    # TRY NOT TO MODIFY: seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env, eval_env = make_envs(args, env_kwargs, device)
    check_same_env(args, resumed, env)
    N, discrete, A = env.n_agents, env.is_discrete, env.n_actions  # A: number of discrete actions, or action dim
    space = action_space_dict(env.action_space)
    args.mi_coef = DEFAULT_MI_COEF.get(args.env_id, FALLBACK_MI_COEF) if args.mi_coef is None else args.mi_coef
    ent_coef = args.ent_coef if args.ent_coef is not None else (0.01 if discrete else 0.0)
    E, T = args.num_envs, args.num_steps
    # iterations already done + those that fit in the steps still to go (a fresh run: total // (E * T))
    done_iterations = resumed["continuation"]["counters"]["iteration"] if resumed is not None else 0
    start_step = resumed["global_step"] if resumed is not None else 0
    num_iterations = done_iterations + max(1, (args.total_timesteps - start_step) // (E * T))
    # refuse a rollout storage (below) that cannot fit: obs, states, avail, actions, log-probs, reward, term, done
    check_fits(T * E * (4 * N * env.obs_dim + 8 * env.state_dim + N * A + 4 * N * (1 if discrete else A) + 4 * N + 9),
               f"--num-steps {T} x --num-envs {E} with {N} agents (obs {env.obs_dim})", "the rollout storage",
               "lower --num-steps or --num-envs", device)
    writer = open_run_dir(args, run_dir)

    # ALGO LOGIC: initialize agent here
    actor = Actor(env.obs_dim, N, A, args.hidden_dim, args.rnn, discrete, args.init_log_std, args.norm_obs).to(device)
    critic = Critic(env.state_dim, args.hidden_dim, args.norm_obs).to(device)
    # built at λ = 0 too: its initialisation draws from the RNG, and every committed λ = 0 result was made with that draw
    club = CLUB(env.state_dim, N, A, discrete, args.club_hidden_dim).to(device)
    models = {"actor": actor, "critic": critic, "club": club}
    params = list(actor.parameters()) + list(critic.parameters())
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    club_opt = optim.Adam(club.parameters(), lr=args.club_lr)
    optimizers = {"actor_critic": optimizer, "club": club_opt}
    greedy = Policy(actor, N, discrete, space.get("low"), space.get("high"))

    # ALGO Logic: Storage setup (its size is checked above)
    obs_buf = torch.zeros(T, E, N, env.obs_dim, device=device)
    state_buf = torch.zeros(T, E, env.state_dim, device=device)
    final_state_buf = torch.zeros(T, E, env.state_dim, device=device)  # s_{t+1}, before any auto-reset
    avail_buf = torch.ones(T, E, N, A, dtype=torch.bool, device=device)
    actions_buf = torch.zeros((T, E, N) if discrete else (T, E, N, A), device=device)
    logp_buf = torch.zeros(T, E, N, device=device)
    reward_buf = torch.zeros(T, E, device=device)
    term_buf = torch.zeros(T, E, device=device)
    done_buf = torch.zeros(T, E, dtype=torch.bool, device=device)

    def checkpoint() -> dict:
        """A copy of the run's state now (the nets and optimisers change in place), taken after each update."""
        return copy.deepcopy({
            "script": "mir3_mappo", "args": asdict(args), "env_id": args.env_id, "env_kwargs": env_kwargs,
            "n_agents": N, "obs_dim": env.obs_dim, "state_dim": env.state_dim, "action_space": space,
            "global_step": global_step, "models": {name: net.state_dict() for name, net in models.items()},
            "continuation": {  # what --resume needs; RunningNorm's statistics are in the models
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "targets": {},  # (no target networks)
                "rng": rng_state(device),
                "counters": {"iteration": iteration, "last_save": last_save, "last_eval": last_eval},
                "episode_counts": {"env": episodes_started(env), "eval_env": eval_env.episode_count.cpu()},
                "recent_returns": recent_returns}})

    watched = {f"{name} weights": net for name, net in models.items()}  # checked for NaN/inf

    def save() -> str:
        """Write ``boundary``, the state after the last completed update: a stop during a rollout or an update loses
        that iteration, and --resume continues exactly at that rollout boundary. Never a diverged run's state."""
        stop_if_not_finite(global_step, losses, watched)
        return save_checkpoint(f"{run_dir}/{args.exp_name}.pt", boundary)

    # TRY NOT TO MODIFY: start the game
    print(f"{run_name}: {args.env_id} with {N} agents, obs {env.obs_dim}, state {env.state_dim}, "
          f"{'Discrete' if discrete else 'Box'}({A}), λ = {args.mi_coef}, {num_iterations} iterations of "
          f"{E}x{T} steps, device {device}")
    global_step, iteration, last_save, last_eval, last_print = start_step, done_iterations, 0, 0, 0.0
    recent_returns, losses = [], {}
    if resumed is not None:
        # the command line's learning rates win (--anneal-lr: its start); RunningNorm's statistics are in the models
        saved = restore(args, resumed, models, {}, optimizers, ("last_save", "last_eval"), env=env, eval_env=eval_env)
        last_save, last_eval, recent_returns = saved["last_save"], saved["last_eval"], saved["recent_returns"]
        print(f"resuming {args.resume} at global_step={global_step}, iteration {iteration + 1} of {num_iterations}: "
              f"new episodes", flush=True)
    obs, state, avail = env.reset()
    hidden = actor.init_hidden(E, N, device)
    if resumed is not None:
        set_rng_state(resumed["continuation"]["rng"], device)  # last: building the nets drew from it
    boundary = checkpoint() if args.save_model else None  # what a save writes (see save())
    start_time = time.time()
    stop_on_signals()
    try:
        for iteration in range(done_iterations + 1, num_iterations + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
            h0 = hidden.clone() if hidden is not None else None
            for t in range(T):
                obs_buf[t], state_buf[t], avail_buf[t] = obs, state, avail
                # ALGO LOGIC: put action logic here
                with torch.no_grad():
                    out, hidden = actor(obs, hidden)
                    action, logp, _ = actor.get_action(out, avail)
                logp_buf[t] = logp
                actions_buf[t] = action
                env_action = action if discrete else action.clamp(-1.0, 1.0) * greedy.scale + greedy.bias

                # TRY NOT TO MODIFY: execute the game and log data.
                obs, state, avail, reward, terminated, truncated, info = env.step(env_action)
                done = terminated | truncated
                reward_buf[t], term_buf[t], done_buf[t] = reward, terminated.float(), done
                final_state_buf[t] = info["final_state"]  # bootstraps truncated episodes
                global_step += E
                if bool(done.any()):
                    if hidden is not None:
                        hidden = hidden * (~done).view(-1, 1, 1)
                    recent_returns = (recent_returns + info["episode_return"][done].tolist())[-100:]
                    writer.add_scalar("charts/episodic_return", float(info["episode_return"][done].mean()), global_step)
                    writer.add_scalar("charts/episodic_length", float(info["episode_length"][done].float().mean()),
                                      global_step)
                    writer.add_scalar("charts/success_rate", float(info["success"][done].float().mean()), global_step)

            # ALGO LOGIC: training. MIR3 first: fit q(a|s) on the fresh rollout, then r - λ·Î(s; a) enters GAE
            b_states = state_buf.view(T * E, -1)
            b_actions = actions_buf.view(T * E, *actions_buf.shape[2:])
            rewards = reward_buf
            if args.mi_coef > 0:
                # the joint action as CLUB sees it: one-hots [B, N, A] or the executed (clipped) Gaussian sample
                b_club_actions = F.one_hot(b_actions.long(), A).float() if discrete else b_actions.clamp(-1.0, 1.0)
                for _ in range(args.club_steps):
                    idx = torch.randint(T * E, (args.club_batch_size,), device=device)
                    club_loss = club.learning_loss(b_states[idx], b_club_actions[idx])
                    club_opt.zero_grad()
                    club_loss.backward()
                    club_opt.step()
                with torch.no_grad():
                    mi = club.mi(b_states, b_club_actions, args.mi_estimator)  # pointwise Î [T * E]
                rewards = reward_buf - args.mi_coef * mi.view(T, E)
                losses["losses/club_loss"] = club_loss.item()
                losses["mi/upper_bound"] = mi.mean().item()
            with torch.no_grad():
                old_values = critic(state_buf)  # normalised units
                values = critic.value_norm.denormalize(old_values[..., None])[..., 0]
                next_values = critic.value_norm.denormalize(critic(final_state_buf)[..., None])[..., 0]
                # bootstrap value if not done; truncation bootstraps from V(final state), termination not
                advantages = torch.zeros(T, E, device=device)
                lastgaelam = torch.zeros(E, device=device)
                for t in reversed(range(T)):
                    delta = rewards[t] + args.gamma * (1.0 - term_buf[t]) * next_values[t] - values[t]
                    lastgaelam = delta + args.gamma * args.gae_lambda * (~done_buf[t]).float() * lastgaelam
                    advantages[t] = lastgaelam
                returns = advantages + values
                critic.value_norm.update(returns)
                target = critic.value_norm(returns[..., None])[..., 0]
            first = torch.cat((torch.zeros(1, E, dtype=torch.bool, device=device), done_buf[:-1]))

            # Optimizing the policy and value network
            clipfracs, approx_kls = [], []
            for epoch in range(args.update_epochs):
                if args.rnn:  # minibatches of whole env sequences [T, B]
                    perm = torch.randperm(E, device=device)
                    batches = [(slice(None), idx) for idx in perm.chunk(args.num_minibatches)]
                else:  # minibatches of env steps (t, e), all agents of a step together
                    perm = torch.randperm(T * E, device=device)
                    batches = [(idx // E, idx % E) for idx in perm.chunk(args.num_minibatches)]
                for ti, ei in batches:
                    if args.rnn:
                        out = actor.unroll(obs_buf[:, ei], h0[ei], first[:, ei])
                    else:
                        out = actor(obs_buf[ti, ei])[0]
                    _, logp, entropy = actor.get_action(out, avail_buf[ti, ei], actions_buf[ti, ei])
                    logratio = logp - logp_buf[ti, ei]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        # calculate approx_kl http://joschu.net/blog/kl-approx.html
                        approx_kls.append(((ratio - 1) - logratio).mean())
                        clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
                    adv = advantages[ti, ei]
                    adv = ((adv - adv.mean()) / (adv.std() + 1e-8)).unsqueeze(-1)  # one team advantage per agent

                    # Policy loss
                    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()

                    # Value loss
                    new_value = critic(state_buf[ti, ei])
                    v_old, v_target = old_values[ti, ei], target[ti, ei]
                    v_clipped = v_old + (new_value - v_old).clamp(-args.clip_coef, args.clip_coef)
                    v_loss = 0.5 * torch.max((new_value - v_target) ** 2, (v_clipped - v_target) ** 2).mean()

                    loss = pg_loss - ent_coef * entropy.mean() + args.vf_coef * v_loss
                    if not math.isfinite(loss.item()):  # stop before a non-finite step reaches the weights
                        stop_if_not_finite(global_step, {"losses/policy_loss": pg_loss.item(),
                                                         "losses/value_loss": v_loss.item(),
                                                         "losses/entropy": entropy.mean().item()}, watched)
                    # optimize the model
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
            if args.norm_obs:  # new statistics from this rollout, used from the next rollout on
                actor.obs_norm.update(obs_buf)
                critic.state_norm.update(state_buf)

            losses.update({"losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                           "losses/entropy": entropy.mean().item(),
                           "losses/approx_kl": torch.stack(approx_kls).mean().item(),
                           "losses/clipfrac": torch.stack(clipfracs).mean().item()})
            stop_if_not_finite(global_step, losses, watched)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for k, v in losses.items():
                writer.add_scalar(k, v, global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)

            if args.eval_interval and (global_step - last_eval >= args.eval_interval or iteration == num_iterations):
                last_eval = global_step
                eval_returns, success = evaluate(greedy, eval_env)
                writer.add_scalar("eval/episodic_return", eval_returns.mean().item(), global_step)
                writer.add_scalar("eval/success_rate", success.float().mean().item(), global_step)
                print(f"global_step={global_step} eval_return={eval_returns.mean().item():.2f} "
                      f"eval_success={success.float().mean().item():.2f}", flush=True)
            if args.save_model:
                due = args.save_interval and global_step - last_save >= args.save_interval
                if due:
                    last_save = global_step
                boundary = checkpoint()  # the new rollout boundary: what a save writes until the next update ends
                if due:
                    save()
            if time.time() - last_print > 10:
                last_print = time.time()
                ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"global_step={global_step} SPS={sps} updates={iteration} return={ret:.2f}", flush=True)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGUSR1: save, exit 128 + the signal's number
        stopped(e, save if args.save_model else None)

    ignore_stop_signals()
    if args.save_model:
        print(f"checkpoint saved to {save()}", flush=True)
    env.close()
    eval_env.close()
    writer.close()
