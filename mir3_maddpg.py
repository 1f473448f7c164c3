# MIR3 on a MADDPG backbone, continuous and discrete actions.
# Li et al., "Robust Multi-Agent Reinforcement Learning by Mutual Information Regularization",
# IEEE TNNLS 2025. Train with no adversary, but shape the team reward to r - λ·Î(s; a), where Î is a
# CLUB upper bound of the mutual information between the global state and the joint action.
# With --mi-coef 0 this is plain MADDPG (shared actor with agent ids, centralised critic).
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

# λ per env id (README, "λ sweep"); other ids fall back by action type: a Gaussian CLUB grows like Σ_d var(a_d)/σ_d²,
# a factorised categorical one stays below N·log A
DEFAULT_MI_COEF = {"rendezvous": 1e-4, "rendezvous-discrete": 1e-3}
FALLBACK_MI_COEF = {False: 1e-4, True: 1e-3}  # by is_discrete
MI_ESTIMATORS = ("club", "club-sample", "l1out", "vub")


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
    env_id: str = "rendezvous"
    """the id of the environment (see `envs.registered_ids()`)"""
    n_agents: Optional[int] = None
    """number of agents of our own tasks (None: the env default)"""
    episode_limit: Optional[int] = None
    """episode length of our own tasks (None: the env default)"""
    env_kwargs: Optional[str] = None
    """extra env constructor options as a JSON object, e.g. '{"world_size": 100}' (saved in the checkpoint)"""
    num_envs: int = 32
    """number of parallel environments"""

    # Algorithm
    total_timesteps: int = 1_000_000
    """total env steps (one step of one env, all agents)"""
    buffer_size: int = 200_000
    """replay capacity in env steps, stored as whole episodes"""
    batch_size: Optional[int] = None
    """samples per gradient step: transitions for the MLP actor, whole episodes with --rnn (None: 512 / 8)"""
    replay_ratio: float = 8.0
    """trained transitions per env step (the authors' code: 8 episodes of 200 steps per 200-step episode)"""
    learning_starts: int = 10_000
    """env steps before learning starts"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.01
    """soft target update rate"""
    learning_rate: float = 1e-3
    """the learning rate of the actor and critic optimizers"""
    hidden_dim: int = 128
    """hidden width of actor and critic"""
    rnn: bool = False
    """use a GRU actor unrolled over whole episodes instead of the MLP"""
    policy_frequency: int = 2
    """actor and target updates happen every this many critic updates (TD3's delayed policy update)"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise (continuous actions)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip"""

    # MIR3
    mi_coef: Optional[float] = None
    """λ, weight of the MI penalty in the TD target (0: plain MADDPG; None: the per-env default)"""
    mi_estimator: str = "club"
    """MI upper bound: club, club-sample, l1out or vub"""
    club_lr: float = 5e-4
    """learning rate of the variational q(a|s)"""
    club_hidden_dim: int = 64
    """hidden width of q(a|s)"""
    club_batch_size: int = 256
    """(state, joint action) pairs per q(a|s) step"""
    club_window: int = 4096
    """q(a|s) trains on the most recent this many env steps"""

    # Evaluation
    eval_interval: int = 50_000
    """env steps between greedy evaluations (0: never)"""
    eval_episodes: int = 32
    """episodes per evaluation (run in parallel)"""


def with_ids(obs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Append the one-hot agent id to observations [..., N, D]."""
    return torch.cat((obs, ids.expand(*obs.shape[:-1], ids.shape[0])), -1)


class Actor(nn.Module):
    """Shared actor: MLP (obs+id -> H -> H -> out) or GRU (obs+id -> H -> GRUCell -> out)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, rnn: bool):
        super().__init__()
        self.hidden_dim, self.is_rnn = hidden_dim, rnn
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.core = nn.GRUCell(hidden_dim, hidden_dim) if rnn else nn.Linear(hidden_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, out_dim)

    def init_hidden(self, num_envs: int, n_agents: int, device):
        return torch.zeros(num_envs, n_agents, self.hidden_dim, device=device) if self.is_rnn else None

    def forward(self, x, h=None):
        z = F.relu(self.fc1(x))
        if self.is_rnn:
            h = self.core(z.reshape(-1, self.hidden_dim), h.reshape(-1, self.hidden_dim)).view(h.shape)
            return self.out(h), h
        return self.out(F.relu(self.core(z))), None

    def unroll(self, x, steps: slice):
        """Outputs at ``steps`` of sequences x [B, T, N, in]; the GRU runs from t = 0 with zero state."""
        if not self.is_rnn:
            return self(x[:, steps])[0]
        h = self.init_hidden(x.shape[0], x.shape[2], x.device)
        outs = []
        for t in range(x.shape[1]):
            o, h = self(x[:, t], h)
            outs.append(o)
        return torch.stack(outs, 1)[:, steps]


class Critic(nn.Module):
    """Centralised team Q(state, joint action)."""

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.state_dim, self.n_agents, self.n_actions = state_dim, n_agents, n_actions
        self.fc1 = nn.Linear(state_dim + n_agents * n_actions, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, 1)

    def _head(self, h):
        return self.out(F.relu(self.fc2(F.relu(h)))).squeeze(-1)

    def forward(self, state, actions):
        """Q for state [..., S] and actions [..., N, A]."""
        return self._head(self.fc1(torch.cat((state, actions.flatten(-2)), -1)))

    def each_agent_replaced(self, state, actions, replacement):
        """[M, N]: Q(s, a) with only agent i's action replaced by replacement_i, for every i.

        Only agent i's slot of the first layer's input changes, so that layer is computed once
        and corrected per agent: exact, and much cheaper than N full critic passes.
        """
        base = self.fc1(torch.cat((state, actions.flatten(-2)), -1))
        w_actions = self.fc1.weight[:, self.state_dim:].view(-1, self.n_agents, self.n_actions)
        return self._head(base[:, None] + torch.einsum("mna,hna->mnh", replacement - actions, w_actions))


class CLUB(nn.Module):
    """Variational q(a | s) over the joint action and the CLUB upper bound of I(s; a) built on it (Cheng et al., 2020).

    Discrete: q factorises over agents, log q(a|s) = Σ_i log softmax(f(s))[i, a_i], with one-hot
    actions a [B, N, A]. Continuous: a diagonal Gaussian over the N·d joint action, a [B, N, d].
    """

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, discrete: bool, hidden_dim: int):
        super().__init__()
        self.n_agents, self.n_actions, self.discrete = n_agents, n_actions, discrete
        width = n_agents * n_actions * (1 if discrete else 2)
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, width))
        self.marginal = nn.Parameter(torch.zeros(width))  # r(a) of the vub ablation

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
        """Pointwise [B]: Î_b = log q(a_b|s_b) - 1/B Σ_b' log q(a_b'|s_b), the mean over b' in closed form (O(B))."""
        params = self._params(s)
        positive = self._log_density(params, a)
        if estimator != "club":
            return positive - self._ablation_negative(params, a, estimator)
        if self.discrete:  # mean over b' of one-hots, then one dot product per row
            negative = (params[0] * a.mean(0)).sum((-1, -2))
        else:  # the mean over b' of Gaussian log-densities needs only the batch's mean and variance of a
            mu, logvar = params
            af = a.flatten(-2)
            second = (mu - af.mean(0)) ** 2 + af.var(0, unbiased=False)
            negative = -0.5 * (second * torch.exp(-logvar) + logvar + np.log(2 * np.pi)).sum(-1)
        return positive - negative

    # Ablations (--mi-estimator): other negative terms, also drawn from the batch
    #   club-sample  log q(a_π(b)|s_b)                one shuffled negative
    #   l1out        log 1/K Σ_{k≠b} q(a_b|s_k)       K ≤ 512 random rows
    #   vub          log r(a_b)                       the learned marginal r
    def _ablation_negative(self, params, a, estimator: str):
        if estimator == "club-sample":
            return self._log_density(params, a[torch.randperm(a.shape[0], device=a.device)])
        if estimator == "vub":
            return self.log_marginal(a)
        if estimator != "l1out":
            raise ValueError(f"unknown MI estimator {estimator!r}; choose from {MI_ESTIMATORS}")
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
        return torch.logsumexp(mat, 1) - torch.log((~own).sum(1).clamp(min=1).float())


class EpisodeBuffer:
    """Replay of whole episodes, written step by step by ``num_envs`` parallel envs.

    Every env writes into its own slot of a ring of ``capacity`` preallocated episodes of
    ``episode_limit + 1`` steps; a slot becomes sampleable when its episode ends, and the env
    moves on to the next slot of the ring. Step t holds obs/state/avail before action t and
    index length holds the last observation (what a truncated episode bootstraps from).
    """

    @staticmethod
    def nbytes(capacity, episode_limit, n_agents, obs_dim, state_dim, action_dim, n_avail) -> int:
        """Bytes of the tensors ``__init__`` allocates (float32: 4, bool: 1, int64: 8), known before allocating them."""
        C, T, N = capacity, episode_limit, n_agents
        return C * (4 * (T + 1) * (N * obs_dim + state_dim) + (T + 1) * N * n_avail + 4 * T * (N * action_dim + 2) + 8)

    def __init__(self, capacity, episode_limit, num_envs, n_agents, obs_dim, state_dim, action_dim, n_avail, device):
        if capacity < 2 * num_envs:
            raise ValueError(f"replay buffer of {capacity} episodes is too small for {num_envs} envs")
        C, T, N = capacity, episode_limit, n_agents
        self.capacity, self.device = C, device
        self.obs = torch.zeros(C, T + 1, N, obs_dim, device=device)
        self.state = torch.zeros(C, T + 1, state_dim, device=device)
        self.avail = torch.ones(C, T + 1, N, n_avail, dtype=torch.bool, device=device) if n_avail else None
        self.actions = torch.zeros(C, T, N, action_dim, device=device)
        self.reward = torch.zeros(C, T, device=device)
        self.terminated = torch.zeros(C, T, device=device)
        self.length = torch.zeros(C, dtype=torch.int64, device=device)  # 0 while being written
        self.slot = torch.arange(num_envs, device=device)
        self.t = torch.zeros(num_envs, dtype=torch.int64, device=device)
        self.next_slot = num_envs

    def add(self, obs, state, avail, action, reward, terminated, done, next_obs, next_state, next_avail):
        s, t = self.slot, self.t
        self.obs[s, t], self.obs[s, t + 1] = obs, next_obs
        self.state[s, t], self.state[s, t + 1] = state, next_state
        if self.avail is not None:
            self.avail[s, t], self.avail[s, t + 1] = avail, next_avail
        self.actions[s, t], self.reward[s, t], self.terminated[s, t] = action, reward, terminated.float()
        self.t += 1
        if bool(done.any()):
            self.length[s[done]] = self.t[done]
            new = (self.next_slot + torch.arange(int(done.sum()), device=self.device)) % self.capacity
            if bool(torch.isin(new, s[~done]).any()):
                raise RuntimeError("replay buffer too small: raise --buffer-size or lower --num-envs")
            self.length[new] = 0
            self.slot[done], self.t[done] = new, 0
            self.next_slot += len(new)

    def num_episodes(self) -> int:
        return int((self.length > 0).sum())

    def sample(self, batch_size: int, whole_episodes: bool):
        """Random complete episodes cut to the longest (``whole_episodes``) or single transitions.

        Returns tensors [B, L+1, ...] for obs/state/avail and [B, L, ...] for the rest (L = 1 for
        transitions), plus ``mask`` [B, L] of the steps that belong to the episode.
        """
        valid = (self.length > 0).nonzero(as_tuple=True)[0]
        if whole_episodes:
            ep = valid[torch.randint(len(valid), (batch_size,), device=self.device)]
            L = int(self.length[ep].max())
            t = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        else:  # every stored transition equally likely
            ep = valid[torch.multinomial(self.length[valid].float(), batch_size, replacement=True)]
            L = 1
            t = (torch.rand(batch_size, device=self.device) * self.length[ep]).long()
        steps = t[:, None] + torch.arange(L + 1, device=self.device)[None, :]
        e, now = ep[:, None], steps[:, :-1]
        return {
            "obs": self.obs[e, steps], "state": self.state[e, steps],
            "avail": None if self.avail is None else self.avail[e, steps],
            "actions": self.actions[e, now], "reward": self.reward[e, now], "terminated": self.terminated[e, now],
            "mask": (now < self.length[ep][:, None]).float(),
        }


class Policy:
    """Frozen greedy policy (what ``load_policy`` returns): argmax of masked logits or tanh mean."""

    def __init__(self, actor: Actor, n_agents: int, discrete: bool, low=None, high=None):
        self.actor, self.n_agents, self.discrete = actor, n_agents, discrete
        self.device = next(actor.parameters()).device
        self.ids = torch.eye(n_agents, device=self.device)  # one-hot agent ids
        if not discrete:
            low, high = torch.as_tensor(low, device=self.device), torch.as_tensor(high, device=self.device)
            self.scale, self.bias = (high - low) / 2, (high + low) / 2

    def init_hidden(self, num_envs: int):
        """None for the MLP actor, else zeros [E, N, H]; zero the rows of envs that finish."""
        return self.actor.init_hidden(num_envs, self.n_agents, self.device)

    @torch.no_grad()
    def act(self, obs, avail, hidden):
        out, hidden = self.actor(with_ids(obs, self.ids), hidden)
        if self.discrete:
            return out.masked_fill(~avail, -float("inf")).argmax(-1), hidden
        return torch.tanh(out) * self.scale + self.bias, hidden


def load_policy(checkpoint: dict, device="cpu") -> Policy:
    """Rebuild the frozen greedy policy of a ``mir3_maddpg`` checkpoint (a dict from torch.load)."""
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != "mir3_maddpg":
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not a mir3_maddpg checkpoint (script: {found!r})")
    try:
        args, space, n_agents = checkpoint["args"], checkpoint["action_space"], checkpoint["n_agents"]
        discrete = space["type"] == "discrete"
        n_out = space["n"] if discrete else space["shape"][0]
        actor = Actor(checkpoint["obs_dim"] + n_agents, n_out, args["hidden_dim"], args["rnn"]).to(device)
        actor.load_state_dict(checkpoint["models"]["actor"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"unusable mir3_maddpg checkpoint: {type(e).__name__}: {e}") from None
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
    return returns, success


# what each numeric flag must do (runtime.check_flags)
FLAG_RULES = {
    **dict.fromkeys(("num_envs", "total_timesteps", "batch_size", "buffer_size", "hidden_dim", "eval_episodes",
                     "policy_frequency", "club_hidden_dim", "club_batch_size", "club_window"), "be >= 1"),
    **dict.fromkeys(("learning_starts", "eval_interval", "save_interval", "mi_coef", "exploration_noise"), "be >= 0"),
    **dict.fromkeys(("learning_rate", "club_lr", "replay_ratio", "max_grad_norm"), "be > 0"),
    "gamma": "lie in [0, 1]",
    "tau": "lie in (0, 1]",
}


def check_args(args: Args) -> None:
    """Refuse out-of-range flags at start-up, one line and exit 2; NaN and ±inf never pass."""
    check_flags(args, FLAG_RULES)  # --mi-coef None: the per-env default, resolved once the env is built
    if args.mi_estimator not in MI_ESTIMATORS:
        fail(f"--mi-estimator must be one of {', '.join(MI_ESTIMATORS)}, got {args.mi_estimator!r}")


# --resume: besides the weights, a checkpoint's "continuation" holds what a run needs to go on: optimiser and
# target-network states, RNG states, counters and the envs' episode counters. Not the replay buffer (hundreds
# of MB): a resumed run refills it with --learning-starts fresh env steps before it learns again.
MODEL_FLAGS = ("env_id", "n_agents", "episode_limit", "env_kwargs", "hidden_dim", "rnn", "club_hidden_dim")
CONTINUATION_KEYS = ("optimizers", "targets", "rng", "counters", "episode_counts")


if __name__ == "__main__":
    args, resumed, run_name, run_dir = parse_run(Args, "mir3_maddpg", CONTINUATION_KEYS, MODEL_FLAGS)
    if args.batch_size is None:
        args.batch_size = 8 if args.rnn else 512
    check_args(args)
    env_kwargs = env_kwargs_of(args) if resumed is None else resumed["env_kwargs"]

    # TRY NOT TO MODIFY: seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup
    env, eval_env = make_envs(args, env_kwargs, device)
    N, T, A, discrete = env.n_agents, env.episode_limit, env.n_actions, env.is_discrete  # A: actions, or action dims
    space = action_space_dict(env.action_space)
    if args.mi_coef is None:
        args.mi_coef = DEFAULT_MI_COEF.get(args.env_id, FALLBACK_MI_COEF[discrete])
    check_same_env(args, resumed, env)
    # refuse a replay buffer and CLUB window (allocated below) that cannot fit, before building anything
    capacity = max(args.buffer_size // T, 2 * args.num_envs)  # whole episodes
    check_fits(EpisodeBuffer.nbytes(capacity, T, N, env.obs_dim, env.state_dim, A, A if discrete else 0)
               + 4 * args.club_window * (env.state_dim + N * A),
               f"--buffer-size {args.buffer_size} with {N} agents (obs {env.obs_dim}, {T}-step episodes)",
               "the replay buffer and the CLUB window", "lower --buffer-size (or --club-window, --n-agents)", device)
    writer = open_run_dir(args, run_dir)

    # ALGO LOGIC: initialize agent here
    ids = torch.eye(N, device=device)  # one-hot agent ids
    actor = Actor(env.obs_dim + N, A, args.hidden_dim, args.rnn).to(device)
    critic = Critic(env.state_dim, N, A, args.hidden_dim).to(device)
    actor_target = Actor(env.obs_dim + N, A, args.hidden_dim, args.rnn).to(device)
    critic_target = Critic(env.state_dim, N, A, args.hidden_dim).to(device)
    actor_target.load_state_dict(actor.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    # built at λ = 0 too: its initialisation draws from the RNG, and every λ = 0 run so far was made with it
    club = CLUB(env.state_dim, N, A, discrete, args.club_hidden_dim).to(device)
    # fused: one kernel per step instead of several per parameter (the nets are small)
    actor_optimizer = optim.Adam(actor.parameters(), lr=args.learning_rate, fused=True)
    critic_optimizer = optim.Adam(critic.parameters(), lr=args.learning_rate, fused=True)
    club_optimizer = optim.Adam(club.parameters(), lr=args.club_lr, fused=True)
    # the greedy policy that is evaluated; its scale and bias also map exploration's [-1, 1] to the env's bounds
    greedy = Policy(actor, N, discrete, space.get("low"), space.get("high"))

    rb = EpisodeBuffer(capacity, T, args.num_envs, N, env.obs_dim, env.state_dim, A, A if discrete else 0, device)
    # the most recent (state, joint action) pairs: CLUB learns the current policy's q(a|s)
    club_states = torch.zeros(args.club_window, env.state_dim, device=device)
    club_actions = torch.zeros(args.club_window, N, A, device=device)
    club_ptr, club_count = 0, 0

    models = {"actor": actor, "critic": critic, "club": club}
    targets = {"actor": actor_target, "critic": critic_target}
    optimizers = {"actor": actor_optimizer, "critic": critic_optimizer, "club": club_optimizer}
    watched = {f"{k} weights": net for k, net in models.items()}  # checked for NaN/inf
    global_step, updates, last_save, last_eval, last_log, last_print = 0, 0, 0, 0, 0, 0.0
    credit = 0.0  # transitions still to be trained on, to keep --replay-ratio
    recent_returns, metrics = [], {}

    def save() -> str:
        stop_if_not_finite(global_step, metrics, watched)  # a diverged run never overwrites a good checkpoint
        return save_checkpoint(f"{run_dir}/{args.exp_name}.pt", {
            "script": "mir3_maddpg", "args": asdict(args), "env_id": args.env_id, "env_kwargs": env_kwargs,
            "n_agents": N, "obs_dim": env.obs_dim, "state_dim": env.state_dim, "action_space": space,
            "global_step": global_step, "models": {k: net.state_dict() for k, net in models.items()},
            "continuation": {  # what --resume needs (the CLUB window refills with the replay buffer)
                "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
                "targets": {k: net.state_dict() for k, net in targets.items()},
                "rng": rng_state(device),
                "counters": {"updates": updates, "last_save": last_save, "last_eval": last_eval, "last_log": last_log,
                             "credit": credit},
                "episode_counts": {"env": episodes_started(env), "eval_env": eval_env.episode_count.cpu()},
                "recent_returns": recent_returns}})

    print(f"{run_name}: {args.env_id} with {N} agents, obs {env.obs_dim}, state {env.state_dim}, "
          f"{'Discrete' if discrete else 'Box'}({A}), λ = {args.mi_coef}, device {device}")
    if resumed is not None:
        saved = restore(args, resumed, models, targets, optimizers,  # the command line's learning rates win
                        ("updates", "credit", "last_save", "last_eval", "last_log"), env=env, eval_env=eval_env)
        global_step, updates, credit = saved["global_step"], saved["updates"], saved["credit"]
        last_save, last_eval, last_log = saved["last_save"], saved["last_eval"], saved["last_log"]
        recent_returns = saved["recent_returns"]
        print(f"resuming {args.resume} at global_step={global_step}: new episodes, and no learning during the "
              f"first {args.learning_starts} steps, which refill the replay buffer", flush=True)

    # TRY NOT TO MODIFY: start the game
    start_step = global_step
    learning_from = start_step + args.learning_starts  # a resumed run refills its (empty) buffer first
    obs, state, avail = env.reset()
    hidden = actor.init_hidden(args.num_envs, N, device)
    if resumed is not None:
        set_rng_state(resumed["continuation"]["rng"], device)  # last: building the nets drew from it
    start_time = time.time()
    stop_on_signals()
    try:
        while global_step < args.total_timesteps:
            # ALGO LOGIC: put action logic here
            with torch.no_grad():
                out, hidden = actor(with_ids(obs, ids), hidden)
                if global_step < args.learning_starts:
                    out = torch.randn_like(out) * (3.0 if discrete else 1.0)  # random warm-up
                if discrete:  # a sample of the masked softmax (what hard Gumbel-softmax draws)
                    env_actions = torch.distributions.Categorical(logits=out.masked_fill(~avail, -float("inf"))).sample()
                    actions = F.one_hot(env_actions, A).float()
                else:  # the critic sees actions in [-1, 1]
                    actions = (torch.tanh(out) + args.exploration_noise * torch.randn_like(out)).clamp(-1.0, 1.0)
                    env_actions = actions * greedy.scale + greedy.bias

            # TRY NOT TO MODIFY: execute the game and log data
            next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(env_actions)
            done = terminated | truncated
            rb.add(obs, state, avail, actions, reward, terminated, done,
                   info["final_obs"], info["final_state"], info["final_avail"])
            if args.mi_coef > 0:
                rows = (club_ptr + torch.arange(args.num_envs, device=device)) % args.club_window
                club_states[rows], club_actions[rows] = state, actions
                club_ptr, club_count = (club_ptr + args.num_envs) % args.club_window, club_count + args.num_envs
            obs, state, avail = next_obs, next_state, next_avail
            global_step += args.num_envs
            if bool(done.any()):
                if hidden is not None:
                    hidden = hidden * (~done).view(-1, 1, 1)
                recent_returns = (recent_returns + info["episode_return"][done].tolist())[-100:]
                writer.add_scalar("charts/episodic_return", float(info["episode_return"][done].mean()), global_step)
                writer.add_scalar("charts/episodic_length", float(info["episode_length"][done].float().mean()), global_step)
                writer.add_scalar("charts/success_rate", float(info["success"][done].float().mean()), global_step)

            # ALGO LOGIC: training
            if global_step >= learning_from and rb.num_episodes() >= (args.batch_size if args.rnn else 1):
                credit += args.num_envs * args.replay_ratio
                while credit > 0:
                    actor_turn = updates % args.policy_frequency == 0  # TD3's delayed actor update
                    if args.mi_coef > 0 and actor_turn:  # q(a|s) models the policy, which changes only when the actor does
                        idx = torch.randint(min(club_count, args.club_window), (args.club_batch_size,), device=device)
                        club_loss = club.learning_loss(club_states[idx], club_actions[idx])
                        club_optimizer.zero_grad()
                        club_loss.backward()
                        club_optimizer.step()
                        metrics["losses/club_loss"] = club_loss.item()

                    data = rb.sample(args.batch_size, whole_episodes=args.rnn)
                    mask = data["mask"]
                    valid = mask.bool()
                    n_valid = mask.sum()
                    b_obs = with_ids(data["obs"], ids)
                    b_states, b_actions = data["state"], data["actions"]
                    with torch.no_grad():
                        next_out = actor_target.unroll(b_obs, slice(1, None))
                        if discrete:  # the greedy target action, one-hot
                            next_out = next_out.masked_fill(~data["avail"][:, 1:], -float("inf"))
                            next_a = F.one_hot(next_out.argmax(-1), A).float()
                        else:
                            next_a = torch.tanh(next_out)
                        q_next = critic_target(b_states[:, 1:], next_a)
                        mi = torch.zeros_like(mask)
                        if args.mi_coef > 0:
                            mi[valid] = club.mi(b_states[:, :-1][valid], b_actions[valid], args.mi_estimator)
                        # MIR3: the team reward shaped to r - λ·Î(s; a)
                        target = data["reward"] - args.mi_coef * mi + args.gamma * (1 - data["terminated"]) * q_next
                    q = critic(b_states[:, :-1], b_actions)
                    critic_loss = (((q - target) ** 2) * mask).sum() / n_valid
                    critic_optimizer.zero_grad()
                    critic_loss.backward()
                    nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    critic_optimizer.step()
                    metrics["losses/critic_loss"] = critic_loss.item()
                    metrics["losses/q_values"] = (q * mask).sum().item() / n_valid.item()
                    if args.mi_coef > 0:
                        metrics["mi/upper_bound"] = mi[valid].mean().item()

                    if actor_turn:
                        # for each agent i, the buffer joint action with agent i's slot set to π_i (MADDPG)
                        pi_out = actor.unroll(b_obs, slice(None, -1))[valid]  # [M, N, A]
                        if discrete:
                            pi = F.gumbel_softmax(pi_out.masked_fill(~data["avail"][:, :-1][valid], -1e10), hard=True)
                        else:
                            pi = torch.tanh(pi_out)
                        critic.requires_grad_(False)  # the actor loss needs no gradients of the critic's weights
                        actor_loss = -critic.each_agent_replaced(b_states[:, :-1][valid], b_actions[valid], pi).mean()
                        actor_optimizer.zero_grad()
                        actor_loss.backward()
                        critic.requires_grad_(True)
                        nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                        actor_optimizer.step()
                        metrics["losses/actor_loss"] = actor_loss.item()

                        # update the target networks
                        with torch.no_grad():
                            for net, tgt in ((actor, actor_target), (critic, critic_target)):
                                for p, tp in zip(net.parameters(), tgt.parameters()):
                                    tp.lerp_(p, args.tau)
                    credit -= float(mask.sum())
                    updates += 1
                stop_if_not_finite(global_step, metrics)

            if global_step - last_log >= 1000 and metrics:
                last_log = global_step
                stop_if_not_finite(global_step, metrics, watched)
                for k, v in metrics.items():
                    writer.add_scalar(k, v, global_step)
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)
            if args.eval_interval and (global_step - last_eval >= args.eval_interval or global_step >= args.total_timesteps):
                last_eval = global_step
                returns, success = evaluate(greedy, eval_env)
                writer.add_scalar("eval/episodic_return", returns.mean().item(), global_step)
                writer.add_scalar("eval/success_rate", success.float().mean().item(), global_step)
                print(f"global_step={global_step} eval_return={returns.mean().item():.2f} "
                      f"eval_success={success.float().mean().item():.2f}", flush=True)
            if time.time() - last_print > 10:
                last_print = time.time()
                ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"global_step={global_step} SPS={int((global_step - start_step) / (time.time() - start_time))} "
                      f"updates={updates} return={ret:.2f}", flush=True)
            if args.save_model and args.save_interval and global_step - last_save >= args.save_interval:
                last_save = global_step
                save()
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGUSR1: save, exit 128 + the signal's number
        stopped(e, save if args.save_model else None)

    ignore_stop_signals()
    if args.save_model:
        print(f"checkpoint saved to {save()}", flush=True)
    env.close()
    eval_env.close()
    writer.close()
