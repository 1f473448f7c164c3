# MIR3 on a QMIX backbone, discrete actions.
# Li et al., "Robust Multi-Agent Reinforcement Learning by Mutual Information Regularization",
# IEEE TNNLS 2025. Train with no adversary, but shape the team reward to r - λ·Î(s; a), where Î is a
# CLUB upper bound of the mutual information between the global state and the joint action.
# With --mi-coef 0 this is plain QMIX (Rashid et al. 2018) as pymarl implements it: shared GRU agent
# on obs ⊕ last action ⊕ agent id, monotonic hypernetwork mixer on the state, double Q, hard target
# updates, ε-greedy, replay of whole episodes, masked TD loss, truncated episodes bootstrap.
# Three choices for LBF (README, "mir3_qmix.py"): observations and state are scaled to [-1, 1] with the
# env's bounds, rewards are standardised with running statistics in the TD target as epymarl does (after
# the MIR3 penalty, so λ is in reward units as in the other two scripts), and targets are TD(λ) with
# λ = 0.6 as in pymarl2's fine-tuned QMIX.
import os
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro

from runtime import (
    action_space_dict,
    check_fits,
    check_flags,
    check_same_env,
    env_kwargs_of,
    episodes_started,
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

# λ per env id, or per family ("lbf:"), else the fallback; in reward units. How they were chosen: README, "mir3_qmix.py".
DEFAULT_MI_COEF = {"lbf:": 1e-4}
FALLBACK_MI_COEF = 0.01


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
    env_id: str = "lbf:Foraging-8x8-2p-2f-coop-v3"
    """the id of the environment (see `envs.registered_ids()`); discrete actions only"""
    n_agents: Optional[int] = None
    """number of agents of our own tasks (None: the env default)"""
    episode_limit: Optional[int] = None
    """episode length of our own tasks (None: the env default)"""
    env_kwargs: Optional[str] = None
    """extra env constructor options as a JSON object, e.g. '{"max_episode_steps": 25}' (saved in the checkpoint)"""
    num_envs: int = 8
    """number of parallel environments"""

    # Algorithm
    total_timesteps: int = 800_000
    """total env steps (one step of one env, all agents)"""
    buffer_size: int = 250_000
    """replay capacity in env steps, stored as whole episodes (5000 LBF episodes)"""
    batch_size: int = 32
    """whole episodes per gradient step"""
    learning_starts: int = 0
    """env steps before learning starts (learning also waits for --batch-size episodes)"""
    updates_per_episode: float = 1.0
    """gradient steps per finished episode (pymarl: 1)"""
    gamma: float = 0.99
    """the discount factor"""
    td_lambda: float = 0.6
    """λ of TD(λ) targets over the sampled episodes (0: pymarl's one-step target)"""
    learning_rate: Annotated[float, tyro.conf.arg(aliases=("--lr",))] = 5e-4
    """Adam learning rate of agent and mixer (alias --lr)"""
    hidden_dim: int = 64
    """GRU width of the agent"""
    mixer_embed_dim: int = 32
    """width of the mixing network"""
    hypernet_dim: int = 64
    """hidden width of the hypernetworks"""
    target_update_interval: int = 200
    """gradient steps between hard target copies (= episodes with --updates-per-episode 1, as pymarl)"""
    epsilon_start: float = 1.0
    """initial ε of ε-greedy exploration"""
    epsilon_finish: float = 0.05
    """final ε"""
    epsilon_anneal_steps: int = 200_000
    """env steps over which ε decays linearly (epymarl's LBF setting)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip"""
    standardise_rewards: bool = True
    """standardise the (shaped) rewards with the running mean and std of r in the TD target (epymarl on LBF)"""

    # MIR3
    mi_coef: Optional[float] = None
    """λ, weight of the MI penalty r - λ·Î in reward units (0: plain QMIX; None: the per-env default)"""
    club_lr: float = 5e-4
    """learning rate of the variational q(a|s)"""
    club_hidden_dim: int = 128
    """hidden width of q(a|s)"""
    club_batch_size: int = 512
    """(state, joint action) pairs per q(a|s) step"""
    club_window: int = 4096
    """q(a|s) trains on the most recent this many env steps"""

    # Evaluation
    eval_interval: int = 20_000
    """env steps between greedy evaluations (0: never)"""
    eval_episodes: int = 32
    """episodes per evaluation (run in parallel)"""


class RNNAgent(nn.Module):
    """Shared agent: fc(in, H) -> ReLU -> GRUCell(H) -> fc(H, A), Q-value per action."""

    def __init__(self, in_dim: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.rnn = nn.GRUCell(hidden_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, n_actions)

    def forward(self, x, h):
        """x [..., in], h [..., H] -> q [..., A], h [..., H]."""
        z = F.relu(self.fc1(x))
        h = self.rnn(z.reshape(-1, self.hidden_dim), h.reshape(-1, self.hidden_dim)).view(h.shape)
        return self.fc2(h), h

    def unroll(self, x):
        """Q-values [B, T, N, A] of sequences x [B, T, N, in]; the GRU starts from zeros at t = 0."""
        h = torch.zeros(*x.shape[:1], *x.shape[2:-1], self.hidden_dim, device=x.device)
        qs = []
        for t in range(x.shape[1]):
            q, h = self(x[:, t], h)
            qs.append(q)
        return torch.stack(qs, 1)


class QMixer(nn.Module):
    """Monotonic mixer: Q_tot = |W2(s)|ᵀ ELU(|W1(s)|ᵀ q + b1(s)) + V(s), weights from hypernetworks."""

    def __init__(self, state_dim: int, n_agents: int, embed_dim: int, hypernet_dim: int):
        super().__init__()
        self.n_agents, self.embed_dim = n_agents, embed_dim
        self.hyper_w1 = nn.Sequential(nn.Linear(state_dim, hypernet_dim), nn.ReLU(),
                                      nn.Linear(hypernet_dim, n_agents * embed_dim))
        self.hyper_b1 = nn.Linear(state_dim, embed_dim)
        self.hyper_w2 = nn.Sequential(nn.Linear(state_dim, hypernet_dim), nn.ReLU(), nn.Linear(hypernet_dim, embed_dim))
        self.value = nn.Sequential(nn.Linear(state_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))

    def forward(self, q, state):
        """q [..., N] agent Q-values, state [..., S] -> Q_tot [...]."""
        w1 = self.hyper_w1(state).abs().view(*q.shape, self.embed_dim)
        hidden = F.elu((q.unsqueeze(-2) @ w1).squeeze(-2) + self.hyper_b1(state))
        return (hidden * self.hyper_w2(state).abs()).sum(-1) + self.value(state).squeeze(-1)


class CLUB(nn.Module):
    """Variational q(a | s) of the joint action, factorised over agents: log q(a|s) = Σ_i log softmax(f(s))[i, a_i]
    with one-hot actions a [B, N, A]; ``mi`` is the CLUB upper bound of I(s; a) built on it (Cheng et al. 2020).
    The ablation bounds (club-sample, l1out, vub) live in mir3_maddpg.py."""

    def __init__(self, state_dim: int, n_agents: int, n_actions: int, hidden_dim: int):
        super().__init__()
        self.n_agents, self.n_actions = n_agents, n_actions
        width = n_agents * n_actions
        self.net = nn.Sequential(nn.Linear(state_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, width))
        # a learned marginal r(a) (mir3_maddpg's vub bound): unused by mi() here, still trained, so that
        # checkpoints and optimiser states keep the tensors they always had
        self.marginal = nn.Parameter(torch.zeros(width))

    def log_probs(self, s):
        """log q(a_i = k | s) [B, N, A]."""
        return F.log_softmax(self.net(s).view(-1, self.n_agents, self.n_actions), -1)

    def log_q(self, s, a):
        return (self.log_probs(s) * a).sum((-1, -2))

    def learning_loss(self, s, a):
        """Negative log-likelihood of q(a|s) and of the marginal r(a)."""
        log_r = (F.log_softmax(self.marginal.view(self.n_agents, self.n_actions), -1) * a).sum((-1, -2))
        return -(self.log_q(s, a) + log_r).mean()

    def mi(self, s, a):
        """Pointwise CLUB estimate [B]: log q(a_b|s_b) - 1/B Σ_b' log q(a_b'|s_b), the negatives being the other rows
        of the batch; the mean over b' of the one-hots makes it one dot product per row (O(B), not O(B²))."""
        logp = self.log_probs(s)
        return (logp * a).sum((-1, -2)) - (logp * a.mean(0)).sum((-1, -2))


class EpisodeBuffer:
    """Replay of whole episodes, written step by step by ``num_envs`` parallel envs.

    Every env writes into its own slot of a ring of ``capacity`` preallocated episodes of
    ``episode_limit + 1`` steps; a slot becomes sampleable when its episode ends, and the env
    moves on to the next slot of the ring. Step t holds obs/state/avail before action t and
    index length holds the last observation (what a truncated episode bootstraps from).
    Actions are stored as indices [C, T, N].
    """

    @staticmethod
    def nbytes(capacity, episode_limit, n_agents, obs_dim, state_dim, n_actions) -> int:
        """Bytes of the tensors ``__init__`` allocates (float32: 4, bool: 1, int64: 8), known before allocating them."""
        C, T, N = capacity, episode_limit, n_agents
        return C * (4 * (T + 1) * (N * obs_dim + state_dim) + (T + 1) * N * n_actions + 8 * T * N + 8 * T + 8)

    def __init__(self, capacity, episode_limit, num_envs, n_agents, obs_dim, state_dim, n_actions, device):
        if capacity < 2 * num_envs:
            raise ValueError(f"replay buffer of {capacity} episodes is too small for {num_envs} envs")
        C, T, N = capacity, episode_limit, n_agents
        self.capacity, self.device = C, device
        self.obs = torch.zeros(C, T + 1, N, obs_dim, device=device)
        self.state = torch.zeros(C, T + 1, state_dim, device=device)
        self.avail = torch.ones(C, T + 1, N, n_actions, dtype=torch.bool, device=device)
        self.actions = torch.zeros(C, T, N, dtype=torch.int64, device=device)
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

    def sample(self, batch_size: int):
        """Random complete episodes cut to the longest: [B, L+1, ...] for obs/state/avail, [B, L, ...]
        for the rest, and ``mask`` [B, L] of the steps that belong to the episode."""
        valid = (self.length > 0).nonzero(as_tuple=True)[0]
        ep = valid[torch.randint(len(valid), (batch_size,), device=self.device)]
        L = int(self.length[ep].max())
        return {"obs": self.obs[ep, :L + 1], "state": self.state[ep, :L + 1], "avail": self.avail[ep, :L + 1],
                "actions": self.actions[ep, :L], "reward": self.reward[ep, :L], "terminated": self.terminated[ep, :L],
                "mask": (torch.arange(L, device=self.device)[None, :] < self.length[ep][:, None]).float()}


def lambda_returns(reward, terminated, q_next, mask, gamma: float, lam: float):
    """TD(λ) targets [B, L] of whole episodes: G_t = r_t + γ(1 - term_t)((1 - λ) Q_next_t + λ G_{t+1}),
    bootstrapping fully from ``q_next`` (Q_tot of the next state) at each episode's last step.
    λ = 0 gives the one-step target of pymarl's QMIX."""
    if lam == 0:
        return reward + gamma * (1 - terminated) * q_next
    next_valid = torch.cat((mask[:, 1:], torch.zeros_like(mask[:, :1])), 1).bool()
    targets, g = torch.zeros_like(reward), torch.zeros_like(reward[:, 0])
    for t in reversed(range(reward.shape[1])):
        boot = torch.where(next_valid[:, t], (1 - lam) * q_next[:, t] + lam * g, q_next[:, t])
        g = reward[:, t] + gamma * (1 - terminated[:, t]) * boot
        targets[:, t] = g
    return targets


def agent_inputs(obs, last_onehot, ids):
    """obs ⊕ one-hot last action ⊕ one-hot agent id, on [..., N, ·]."""
    return torch.cat((obs, last_onehot, ids.expand(*obs.shape[:-1], ids.shape[0])), -1)


def unit_box(low, high, device):
    """(center, half-width) mapping [low, high] onto [-1, 1]; identity without bounds."""
    if low is None:
        return torch.zeros((), device=device), torch.ones((), device=device)
    low, high = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (low, high))
    return (high + low) / 2, ((high - low) / 2).clamp(min=1e-6)


class Policy:
    """Greedy (ε-greedy in training) QMIX policy on observations mapped onto [-1, 1] with the env's bounds, if any.

    ``hidden`` [E, N, H + A] is the GRU state ⊕ the one-hot last action; all zeros starts an episode (pymarl also
    feeds a zero last action at t = 0), so callers zero the rows of envs that finish: ``hidden * (~done).view(-1, 1, 1)``.
    """

    def __init__(self, agent: RNNAgent, n_agents: int, n_actions: int, obs_low=None, obs_high=None):
        self.agent, self.n_agents, self.n_actions = agent, n_agents, n_actions
        self.device = next(agent.parameters()).device
        self.ids = torch.eye(n_agents, device=self.device)
        self.obs_center, self.obs_half = unit_box(obs_low, obs_high, self.device)

    def scale_obs(self, obs):
        return (obs - self.obs_center) / self.obs_half

    def init_hidden(self, num_envs: int):
        return torch.zeros(num_envs, self.n_agents, self.agent.hidden_dim + self.n_actions, device=self.device)

    @torch.no_grad()
    def act(self, obs, avail, hidden, epsilon: float = 0.0):
        if hidden is None:
            hidden = self.init_hidden(obs.shape[0])
        h, last = hidden.split([self.agent.hidden_dim, self.n_actions], -1)
        q, h = self.agent(agent_inputs(self.scale_obs(obs), last, self.ids), h)
        actions = q.masked_fill(~avail, -float("inf")).argmax(-1)
        if epsilon > 0:  # uniform over available actions with probability ε
            random = torch.multinomial(avail.flatten(0, -2).float(), 1).view(actions.shape)
            actions = torch.where(torch.rand(actions.shape, device=q.device) < epsilon, random, actions)
        return actions, torch.cat((h, F.one_hot(actions, self.n_actions).float()), -1)


def executed_as_last_action(hidden, actions, n_actions: int):
    """Put the executed actions [E, N] into the last-action slot of a QMIX ``hidden`` [E, N, H + A].

    For callers that execute other actions than the policy chose (an attacker rewriting them, as in ibal_qmix
    and attack_worstcase), so that the agents' next input is what was executed; this script never needs it.
    """
    return torch.cat((hidden[..., :-n_actions], F.one_hot(actions, n_actions).float()), -1)


def load_policy(checkpoint: dict, device="cpu") -> Policy:
    """Rebuild the frozen greedy policy of a ``mir3_qmix`` checkpoint (a dict from torch.load)."""
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != "mir3_qmix":
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not a mir3_qmix checkpoint (script: {found!r})")
    try:
        args, space, n_agents = checkpoint["args"], checkpoint["action_space"], checkpoint["n_agents"]
        if space["type"] != "discrete":
            raise KeyError("action_space is not discrete")
        agent = RNNAgent(checkpoint["obs_dim"] + space["n"] + n_agents, space["n"], args["hidden_dim"]).to(device)
        agent.load_state_dict(checkpoint["models"]["agent"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"unusable mir3_qmix checkpoint: {type(e).__name__}: {e}") from None
    return Policy(agent.eval().requires_grad_(False), n_agents, space["n"], checkpoint.get("obs_low"),
                  checkpoint.get("obs_high"))


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


def input_bounds(env, device):
    """The env's observation bounds (lists, or None) and the state's (center, half-width) box.

    LBF's observations are raw grid coordinates and levels: fed as they are, a fresh mixer starts at Q_tot far
    above the returns (≤ 1), a bias that bootstrapped time limits barely shrink. Envs that declare their
    observation space as ``obs_low``/``obs_high`` (LBF, SMAX) get obs and state (the agents' observations
    concatenated) mapped onto [-1, 1]. Not ``env.obs_bounds()``: the other envs' bounds (±inf on quads) were
    never applied, and applying them now would change every result trained on them.
    """
    obs_low, obs_high = getattr(env, "obs_low", None), getattr(env, "obs_high", None)
    if obs_low is not None:
        obs_low, obs_high = obs_low.tolist(), obs_high.tolist()
    state_bounds = obs_low is not None and env.state_dim == env.n_agents * env.obs_dim
    return obs_low, obs_high, unit_box(obs_low * env.n_agents if state_bounds else None,
                                       obs_high * env.n_agents if state_bounds else None, device)


# the range of every numeric flag (runtime.check_flags): a value outside it would run, but silently wrong
FLAG_RULES = {
    **dict.fromkeys(("num_envs", "total_timesteps", "batch_size", "buffer_size", "hidden_dim", "mixer_embed_dim",
                     "hypernet_dim", "eval_episodes", "target_update_interval", "club_hidden_dim", "club_window",
                     "club_batch_size"), "be >= 1"),
    **dict.fromkeys(("learning_starts", "epsilon_anneal_steps", "eval_interval", "save_interval", "mi_coef"), "be >= 0"),
    **dict.fromkeys(("gamma", "td_lambda", "epsilon_start", "epsilon_finish"), "lie in [0, 1]"),
    **dict.fromkeys(("learning_rate", "club_lr", "max_grad_norm", "updates_per_episode"), "be > 0"),
}


# --resume: besides the weights, a checkpoint's "continuation" holds what a run needs to go on: optimiser and
# target-network states, RNG states, counters, the envs' episode counters and the reward statistics. Not the
# replay buffer: a resumed run refills it with --learning-starts fresh env steps (and at least --batch-size
# episodes) before it learns again.
MODEL_FLAGS = ("env_id", "n_agents", "episode_limit", "env_kwargs", "hidden_dim", "mixer_embed_dim", "hypernet_dim",
               "club_hidden_dim")
CONTINUATION_KEYS = ("optimizers", "targets", "rng", "counters", "episode_counts", "norms")


if __name__ == "__main__":
    args, resumed, run_name, run_dir = parse_run(Args, "mir3_qmix", CONTINUATION_KEYS, MODEL_FLAGS,
                                                 renamed={"lr": "learning_rate"})  # saved before --lr was renamed
    if args.mi_coef is None:
        args.mi_coef = DEFAULT_MI_COEF.get(args.env_id, DEFAULT_MI_COEF.get(args.env_id.split(":")[0] + ":", FALLBACK_MI_COEF))
    check_flags(args, FLAG_RULES)
    env_kwargs = env_kwargs_of(args, example='{"max_episode_steps": 25}') if resumed is None else resumed["env_kwargs"]

    # TRY NOT TO MODIFY: seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env, eval_env = make_envs(args, env_kwargs, device, box_error=(
        f"mir3_qmix needs discrete actions, but {args.env_id!r} has Box actions; use a discrete "
        f"variant (e.g. rendezvous-discrete, quads-same-goal-discrete) or mir3_maddpg.py"))
    N, T, A = env.n_agents, env.episode_limit, env.n_actions
    space = action_space_dict(env.action_space)
    check_same_env(args, resumed, env)
    capacity = max(args.buffer_size // T, 2 * args.num_envs)  # whole episodes
    check_fits(EpisodeBuffer.nbytes(capacity, T, N, env.obs_dim, env.state_dim, A)
               + args.club_window * (4 * env.state_dim + 8 * N),
               f"--buffer-size {args.buffer_size} with {N} agents (obs {env.obs_dim}, {T}-step episodes)",
               "the replay buffer and the CLUB window", "lower --buffer-size (or --club-window, --n-agents)", device)
    writer = open_run_dir(args, run_dir)

    # ALGO LOGIC: initialize agent here
    agent = RNNAgent(env.obs_dim + A + N, A, args.hidden_dim).to(device)
    target_agent = RNNAgent(env.obs_dim + A + N, A, args.hidden_dim).to(device)
    mixer = QMixer(env.state_dim, N, args.mixer_embed_dim, args.hypernet_dim).to(device)
    target_mixer = QMixer(env.state_dim, N, args.mixer_embed_dim, args.hypernet_dim).to(device)
    target_agent.load_state_dict(agent.state_dict())
    target_mixer.load_state_dict(mixer.state_dict())
    params = list(agent.parameters()) + list(mixer.parameters())
    optimizer = optim.Adam(params, lr=args.learning_rate)
    # no CLUB at λ = 0: building it draws random numbers, which would change every λ = 0 result (and plain QMIX
    # would no longer train the very weights of ibal_qmix --attack-k 0)
    if args.mi_coef > 0:
        club = CLUB(env.state_dim, N, A, args.club_hidden_dim).to(device)
        club_opt = optim.Adam(club.parameters(), lr=args.club_lr)
    rb = EpisodeBuffer(capacity, T, args.num_envs, N, env.obs_dim, env.state_dim, A, device)
    # q(a|s) learns the current policy: it trains on the most recent (state, joint action) pairs only
    club_states = torch.zeros(args.club_window, env.state_dim, device=device)
    club_actions = torch.zeros(args.club_window, N, dtype=torch.int64, device=device)
    club_ptr, club_count = 0, 0
    reward_mean, reward_var, reward_count = torch.zeros((), device=device), torch.ones((), device=device), 1e-4
    obs_low, obs_high, (state_center, state_half) = input_bounds(env, device)  # LBF: raw grid coordinates to [-1, 1]
    policy = Policy(agent, N, A, obs_low, obs_high)

    optimizers = {"qmix": optimizer, **({"club": club_opt} if args.mi_coef > 0 else {})}
    targets = {"agent": target_agent, "mixer": target_mixer}
    models = {"agent": agent, "mixer": mixer, **({"club": club} if args.mi_coef > 0 else {})}
    watched = {f"{k} weights": net for k, net in models.items()}  # checked for NaN/inf

    def save() -> str:
        stop_if_not_finite(global_step, metrics, watched)  # a diverged run never overwrites a good checkpoint
        return save_checkpoint(f"{run_dir}/{args.exp_name}.pt", {
            "script": "mir3_qmix", "args": asdict(args), "env_id": args.env_id, "env_kwargs": env_kwargs,
            "n_agents": N, "obs_dim": env.obs_dim, "state_dim": env.state_dim, "obs_low": obs_low, "obs_high": obs_high,
            "action_space": space, "global_step": global_step,
            "models": {k: net.state_dict() for k, net in models.items()},
            "continuation": {  # what --resume needs (the CLUB window refills with the replay buffer)
                "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
                "targets": {k: net.state_dict() for k, net in targets.items()},
                "rng": rng_state(device),
                "counters": {"updates": updates, "last_save": last_save, "last_eval": last_eval, "last_log": last_log,
                             "credit": credit},
                "episode_counts": {"env": episodes_started(env), "eval_env": eval_env.episode_count.cpu()},
                "norms": {"reward_mean": reward_mean, "reward_var": reward_var, "reward_count": reward_count},
                "recent_returns": recent_returns}})

    # TRY NOT TO MODIFY: start the game
    print(f"{run_name}: {args.env_id} with {N} agents, obs {env.obs_dim}, state {env.state_dim}, "
          f"Discrete({A}), λ = {args.mi_coef}, device {device}")
    global_step, updates, last_save, last_eval, last_log, last_print = 0, 0, 0, 0, 0, 0.0
    credit = 0.0  # gradient steps owed to finished episodes (--updates-per-episode)
    recent_returns, metrics = [], {}
    if resumed is not None:
        def restore_norms(continuation: dict) -> dict:  # the running reward statistics of the standardisation
            norms = continuation["norms"]
            return {"reward_mean": norms["reward_mean"].to(device), "reward_var": norms["reward_var"].to(device),
                    "reward_count": float(norms["reward_count"])}

        # the CLUB estimator where both runs have one (λ > 0); a run that turns λ on starts a fresh one
        saved = restore(args, resumed, models, targets, optimizers, ("updates", "credit", "last_save", "last_eval",
                        "last_log"), optional={"club": ("club",)}, extra=restore_norms, env=env, eval_env=eval_env)
        global_step, updates, credit = saved["global_step"], saved["updates"], saved["credit"]
        last_save, last_eval, last_log = saved["last_save"], saved["last_eval"], saved["last_log"]
        recent_returns = saved["recent_returns"]
        reward_mean, reward_var, reward_count = saved["reward_mean"], saved["reward_var"], saved["reward_count"]
        print(f"resuming {args.resume} at global_step={global_step}: new episodes, and no learning during the "
              f"first {args.learning_starts} steps, which refill the replay buffer (and until it holds "
              f"{args.batch_size} episodes)", flush=True)
    start_step = global_step
    learning_from = start_step + args.learning_starts  # a resumed run refills its (empty) buffer first
    obs, state, avail = env.reset()
    hidden = policy.init_hidden(args.num_envs)
    if resumed is not None:
        set_rng_state(resumed["continuation"]["rng"], device)  # last: building the nets drew from it
    start_time = time.time()
    stop_on_signals()
    try:
        while global_step < args.total_timesteps:
            # ALGO LOGIC: put action logic here
            frac = min(global_step / max(args.epsilon_anneal_steps, 1), 1.0)
            epsilon = args.epsilon_start + frac * (args.epsilon_finish - args.epsilon_start)
            actions, hidden = policy.act(obs, avail, hidden, epsilon)
            next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
            done = terminated | truncated
            # running reward statistics (parallel-variance update, as epymarl's RunningMeanStd)
            delta, n = reward.mean() - reward_mean, reward_count + args.num_envs
            reward_var = (reward_var * reward_count + reward.var(unbiased=False) * args.num_envs
                          + delta**2 * reward_count * args.num_envs / n) / n
            reward_mean, reward_count = reward_mean + delta * args.num_envs / n, n
            # TRY NOT TO MODIFY: save data to replay buffer; handle `final_observation`
            rb.add(obs, state, avail, actions, reward, terminated, done,
                   info["final_obs"], info["final_state"], info["final_avail"])
            if args.mi_coef > 0:
                rows = (club_ptr + torch.arange(args.num_envs, device=device)) % args.club_window
                club_states[rows], club_actions[rows] = (state - state_center) / state_half, actions
                club_ptr, club_count = (club_ptr + args.num_envs) % args.club_window, club_count + args.num_envs
            # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
            obs, state, avail = next_obs, next_state, next_avail
            global_step += args.num_envs

            if bool(done.any()):
                hidden = hidden * (~done).view(-1, 1, 1)  # new episodes: zero GRU state and last action
                recent_returns = (recent_returns + info["episode_return"][done].tolist())[-100:]
                writer.add_scalar("charts/episodic_return", float(info["episode_return"][done].mean()), global_step)
                writer.add_scalar("charts/episodic_length", float(info["episode_length"][done].float().mean()), global_step)
                writer.add_scalar("charts/success_rate", float(info["success"][done].float().mean()), global_step)

            # ALGO LOGIC: training, --updates-per-episode gradient steps per finished episode
            if bool(done.any()) and global_step >= learning_from and rb.num_episodes() >= args.batch_size:
                credit += int(done.sum()) * args.updates_per_episode
                while credit >= 1:
                    credit -= 1
                    if args.mi_coef > 0:  # one maximum-likelihood step of q(a|s) on the recent pairs
                        idx = torch.randint(min(club_count, args.club_window), (args.club_batch_size,), device=device)
                        club_loss = club.learning_loss(club_states[idx], F.one_hot(club_actions[idx], A).float())
                        club_opt.zero_grad()
                        club_loss.backward()
                        club_opt.step()
                        metrics["losses/club_loss"] = club_loss.item()
                    batch = rb.sample(args.batch_size)  # whole episodes [B, L(+1), ...]
                    mask = batch["mask"]
                    valid = mask.bool()
                    b_state = (batch["state"] - state_center) / state_half
                    onehot = F.one_hot(batch["actions"], A).float()
                    last = torch.cat((torch.zeros_like(onehot[:, :1]), onehot), 1)  # the last action before step t
                    x = agent_inputs(policy.scale_obs(batch["obs"]), last, policy.ids)  # [B, L+1, N, in]
                    q_all = agent.unroll(x)
                    chosen = q_all[:, :-1].gather(-1, batch["actions"][..., None]).squeeze(-1)
                    with torch.no_grad():
                        # double Q: the online net picks the next action, the target net evaluates it
                        best = q_all[:, 1:].masked_fill(~batch["avail"][:, 1:], -float("inf")).argmax(-1, keepdim=True)
                        q_next = target_agent.unroll(x)[:, 1:].gather(-1, best).squeeze(-1)
                        q_tot_next = target_mixer(q_next, b_state[:, 1:])
                        mi = torch.zeros_like(mask)
                        if args.mi_coef > 0:
                            mi[valid] = club.mi(b_state[:, :-1][valid], onehot[valid])
                        # MIR3: r - λ·Î, in reward units, then standardised with the running statistics of r
                        shaped = batch["reward"] - args.mi_coef * mi
                        if args.standardise_rewards:
                            shaped = (shaped - reward_mean) / (reward_var.sqrt() + 1e-8)
                        target = lambda_returns(shaped, batch["terminated"], q_tot_next, mask, args.gamma, args.td_lambda)
                    q_tot = mixer(chosen, b_state[:, :-1])
                    loss = (((q_tot - target) * mask) ** 2).sum() / mask.sum()
                    optimizer.zero_grad()
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    updates += 1
                    if updates % args.target_update_interval == 0:  # update the target networks
                        target_agent.load_state_dict(agent.state_dict())
                        target_mixer.load_state_dict(mixer.state_dict())
                    metrics["losses/td_loss"] = loss.item()
                    metrics["losses/grad_norm"] = grad_norm.item()
                    metrics["losses/q_values"] = (q_tot * mask).sum().item() / mask.sum().item()
                    metrics["losses/target_mean"] = (target * mask).sum().item() / mask.sum().item()
                    if args.mi_coef > 0:
                        metrics["mi/upper_bound"] = mi[valid].mean().item()
                        metrics["mi/penalty"] = args.mi_coef * metrics["mi/upper_bound"]  # mean λ·Î per step
                stop_if_not_finite(global_step, metrics)

            if global_step - last_log >= 1000 and metrics:
                last_log = global_step
                stop_if_not_finite(global_step, metrics, watched)
                for k, v in metrics.items():
                    writer.add_scalar(k, v, global_step)
                writer.add_scalar("charts/epsilon", epsilon, global_step)
                writer.add_scalar("charts/reward_std", reward_var.sqrt().item(), global_step)  # σ_r of the standardisation
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)
            if args.eval_interval and (global_step - last_eval >= args.eval_interval or global_step >= args.total_timesteps):
                last_eval = global_step
                returns, success = evaluate(policy, eval_env)
                writer.add_scalar("eval/episodic_return", returns.mean().item(), global_step)
                writer.add_scalar("eval/success_rate", success.float().mean().item(), global_step)
                print(f"global_step={global_step} eval_return={returns.mean().item():.2f} "
                      f"eval_success={success.float().mean().item():.2f}", flush=True)
            if time.time() - last_print > 10:
                last_print = time.time()
                ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"global_step={global_step} SPS={int((global_step - start_step) / (time.time() - start_time))} "
                      f"updates={updates} epsilon={epsilon:.2f} return={ret:.2f} reward_std={reward_var.sqrt().item():.4f}",
                      flush=True)
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
