# IBAL on a QMIX backbone: interaction-breaking adversarial learning, discrete actions.
# Lee et al., "Interaction-Breaking Adversarial Learning Framework for Robust MARL", ICML 2026.
# Every episode a random group G1 of k ~ U{0..K} agents (K ≤ n/2) is cut off from the rest, G2: an observation
# attack masks what each side's observations tell about the other side's actions, an action attack rewrites G1's
# actions to minimise their MI with G2's, and a curriculum raises the attack probability while the team succeeds
# (the equations are in the code, where they act). Both MI estimators train online. The QMIX loss is unchanged and
# trains on the perturbed transitions: attacker and env together form an induced Dec-POMDP (the paper's Thm 4.2).
# Where the paper leaves a choice open, the code marks it [C] and says what we chose and why.
# The QMIX core is copied from mir3_qmix.py (pymarl QMIX with inputs scaled to [-1, 1] and standardised rewards);
# with --attack-k 0 this script trains exactly what `mir3_qmix.py --mi-coef 0` trains (tests/test_ibal_qmix.py).
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
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

LOG_PROB_FLOOR = math.log(1e-4)  # pointwise-MI argmin: ignore differences among near-impossible actions


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
    total_timesteps: int = 600_000
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
    """Adam learning rate of agent and mixer"""
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
    """divide rewards by their running std and subtract the mean in the TD target (epymarl on LBF)"""

    # IBAL
    attack_k: Optional[int] = None
    """K: the attacked group has k ~ U{0..K} agents (None: max(1, n // 2); 0: no attacks, plain QMIX)"""
    mask_dims: Optional[int] = None
    """L: observation dims zeroed per masked agent (None: ceil(0.1 * obs_dim))"""
    mask_direction: str = "both"
    """both: G1 loses its dims about G2 and G2 its dims about G1 (the paper); g1: only G1's view is masked"""
    attack_types: str = "both"
    """which attacks run: obs, act or both (the paper's ablations)"""
    p_max_init: float = 0.5
    """initial upper bound P_max of the per-episode action-attack probability"""
    p_min: Optional[float] = None
    """lower bound of P_act ~ U(P_min, P_max) (None: min(1/K, P_max), the paper's 1/K kept below P_max)"""
    alpha: float = 1.2
    """curriculum factor: P_max <- min(1, α·P_max) when the success rate exceeds η"""
    eta: float = 0.8
    """success-rate threshold of the curriculum"""
    success_window: int = 200
    """episodes (played after the warm-up) over which the success rate is measured"""
    warmup_fraction: float = 0.4
    """fraction of --total-timesteps trained without attacks (the estimators learn throughout)"""
    mask_value: float = 0.0
    """value written into masked observation dims, in env units"""
    estimator_lr: float = 3e-4
    """Adam learning rate of both MI estimators"""
    obs_model_hidden_dim: int = 256
    """hidden width of q_φ(o^i_{t+1} | s, o^i, a^i, a^j)"""
    act_model_hidden_dim: int = 128
    """hidden width of q_ψ(a^i | s, o^i, shown teammate actions)"""
    estimator_batch_size: int = 512
    """(transition, agent pair) rows per estimator step"""
    estimator_window: int = 20_000
    """the estimators train on the most recent this many env steps"""
    score_ema: float = 0.99
    """EMA factor of the per-(i, j, dim) MI score table M"""
    attack_p_act: float = 0.5
    """P_act of the attacked evaluation and of the attack on a checkpoint (with k = K)"""
    attack_fit_steps: int = 50_000
    """attack on a checkpoint: env steps of the victim's clean play the estimators are fitted on"""
    attack_fit_updates: int = 2_000
    """attack on a checkpoint: estimator steps on those rollouts"""

    # Evaluation
    eval_interval: int = 20_000
    """env steps between greedy evaluations, clean and attacked (0: never)"""
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


def running_stats(mean, var, count, x):
    """Parallel-variance update of running (mean, var, count) with the rows of ``x`` (as epymarl's
    RunningMeanStd); used for the rewards and for the obs model's targets."""
    n = x.shape[0]
    delta, total = x.mean(0) - mean, count + n
    var = (var * count + x.var(0, unbiased=False) * n + delta**2 * count * n / total) / total
    return mean + delta * n / total, var, total


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
    [C] The last-action input is what was executed, not what was intended: the update unrolls the GRU on the
    executed actions of the replay buffer, so acting must match."""
    return torch.cat((hidden[..., :-n_actions], F.one_hot(actions, n_actions).float()), -1)


class ObsModel(nn.Module):
    """q_φ(o^i_{t+1} | z, a^j, j), z = (s_t, o^i_t, a^i_t, i): a diagonal Gaussian over agent i's standardised next
    observation; one network serves every ordered pair (i, j). [C] (s_t, o^i_t) stands in for the history τ_t:
    the estimator stays independent of the agent network, and stationary while the agent learns."""

    def __init__(self, state_dim: int, obs_dim: int, n_agents: int, n_actions: int, hidden_dim: int):
        super().__init__()
        in_dim = state_dim + obs_dim + 2 * (n_actions + n_agents)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.ReLU(), nn.Linear(hidden_dim, 2 * obs_dim))

    def log_prob(self, x, target):
        """Per-dim log-density [..., D] of ``target``; the -log σ term stays: σ depends on the conditioning action."""
        mu, logvar = self.net(x).chunk(2, -1)
        logvar = logvar.clamp(-6.0, 2.0)
        return -0.5 * ((target - mu) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))


class ActionModel(nn.Module):
    """q_ψ(a^i | s_t, o^i_t, i, m ⊙ a^{-i}_t, m), agent i's action given the teammates it is shown: trained with
    random visibility masks m, one network is both the marginal q(a^i | τ) (m = 0) and q(a^i | â^{G2}, τ) (m = G2)."""

    def __init__(self, state_dim: int, obs_dim: int, n_agents: int, n_actions: int, hidden_dim: int):
        super().__init__()
        in_dim = state_dim + obs_dim + n_agents + n_agents * n_actions + n_agents
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.ReLU(), nn.Linear(hidden_dim, n_actions))

    def log_prob(self, x, avail):
        """Log-probabilities [..., A] over the available actions (unavailable ones get ≈ -1e9)."""
        return F.log_softmax(self.net(x).masked_fill(~avail, -1e9), -1)


class AttackSchedule:
    """IBAL's curriculum: no attacks during the first ``warmup_steps``, then P_act ~ U(P_min, P_max) per episode;
    once ``window`` attacked episodes are recorded, P_max <- min(1, α·P_max) if their success rate exceeds η.
    [C] The window restarts after each raise (a cooldown): the next raise is earned against the harder attack."""

    def __init__(self, p_max: float, alpha: float, eta: float, window: int, p_min: float = 0.0, warmup_steps: int = 0):
        self.p_max, self.alpha, self.eta, self.window = p_max, alpha, eta, window
        self.p_min, self.warmup_steps, self.recent = p_min, warmup_steps, []

    def p_range(self) -> tuple:
        """[C] The paper's P_act ~ U(1/K, P_max), with the lower end kept ≤ P_max so that it never inverts."""
        return min(self.p_min, self.p_max), self.p_max

    def record(self, successes) -> bool:
        """Add episode outcomes (bools); returns True when P_max was raised."""
        self.recent = (self.recent + [bool(s) for s in successes])[-self.window:]
        if len(self.recent) >= self.window and np.mean(self.recent) > self.eta:
            self.p_max, self.recent = min(1.0, self.alpha * self.p_max), []
            return True
        return False

    def success_rate(self) -> float:  # of the episodes in the current window (nan when empty)
        return float(np.mean(self.recent)) if self.recent else float("nan")

    def state_dict(self) -> dict:
        return {"p_max": self.p_max, "recent": self.recent, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:  # --resume: the warm-up ends where the checkpoint's run ended it
        self.p_max, self.recent = float(state["p_max"]), [bool(s) for s in state["recent"]]
        self.warmup_steps = state.get("warmup_steps", self.warmup_steps)  # absent from older checkpoints


class InteractionBreaker:
    """The attacker: both estimators, trained on the last ``window`` env steps (``observe``, ``train_step``), the MI
    score table M, and the two attacks (``plan`` them per episode, ``mask_obs``, ``attack_actions``). All its
    randomness comes from its own generator, so it never shifts the learner's stream. ``scale_obs`` and
    ``state_box`` (center, half-width): the defender's maps of observations and state onto [-1, 1]."""

    @staticmethod
    def nbytes(n_agents, obs_dim, state_dim, n_actions, window) -> int:
        """Bytes of the score table and the window ``__init__`` allocates (float32: 4, bool: 1, int64: 8)."""
        N, D, S, A, W = n_agents, obs_dim, state_dim, n_actions, window
        return 4 * N * N * D + W * (4 * S + 8 * N * D + 16 * N + N * A)

    def __init__(self, n_agents, obs_dim, state_dim, n_actions, args: Args, scale_obs, state_box, device, seed: int):
        N, D, S, A, W = n_agents, obs_dim, state_dim, n_actions, args.estimator_window
        self.N, self.D, self.A, self.window, self.device, self.args = N, D, A, W, device, args
        self.scale_obs, (self.state_center, self.state_half) = scale_obs, state_box
        self.mask_dims = math.ceil(0.1 * D) if args.mask_dims is None else args.mask_dims
        self.use_obs, self.use_act = args.attack_types in ("obs", "both"), args.attack_types in ("act", "both")
        self.gen = torch.Generator(device=device).manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # initialise without touching the global stream
            torch.manual_seed(seed)
            self.obs_model = ObsModel(S, D, N, A, args.obs_model_hidden_dim).to(device)
            self.act_model = ActionModel(S, D, N, A, args.act_model_hidden_dim).to(device)
        self.obs_opt = optim.Adam(self.obs_model.parameters(), lr=args.estimator_lr)
        self.act_opt = optim.Adam(self.act_model.parameters(), lr=args.estimator_lr)
        self.scores = torch.zeros(N, N, D, device=device)  # M[i, j, d], EMA of pointwise scores
        # the window: scaled state and obs, the raw next obs, intended and executed actions, available actions
        self.ptr, self.count = 0, 0
        self.w_state, self.w_obs, self.w_next = (torch.zeros(W, *shape, device=device) for shape in ((S,), (N, D), (N, D)))
        self.w_intended, self.w_executed = (torch.zeros(W, N, dtype=torch.int64, device=device) for _ in range(2))
        self.w_avail = torch.ones(W, N, A, dtype=torch.bool, device=device)
        # running statistics of o_{t+1}: the Gaussian fits a standardised target
        self.next_mean, self.next_var, self.next_count = torch.zeros(D, device=device), torch.ones(D, device=device), 1e-4
        self.ids, self.eye_a = torch.eye(N, device=device), torch.eye(A, device=device)

    @torch.no_grad()
    def observe(self, state, obs, next_obs, intended, executed, avail):
        """Store one env step of every env: unmasked obs, the last obs of that step, both actions."""
        E = state.shape[0]
        rows = (self.ptr + torch.arange(E, device=self.device)) % self.window
        self.w_state[rows], self.w_obs[rows] = (state - self.state_center) / self.state_half, self.scale_obs(obs)
        self.w_next[rows], self.w_intended[rows], self.w_executed[rows] = next_obs, intended, executed
        self.w_avail[rows] = avail
        self.ptr, self.count = (self.ptr + E) % self.window, self.count + E
        self.next_mean, self.next_var, self.next_count = running_stats(
            self.next_mean, self.next_var, self.next_count, next_obs.reshape(-1, self.D))

    def ready(self) -> bool:
        return self.count >= self.args.estimator_batch_size and self.N > 1

    def _act_inputs(self, state, obs, agent, shown_actions, shown):
        """q_ψ inputs [B, in] for agent indices ``agent`` [B], showing ``shown_actions`` [B, N] where ``shown`` [B, N]."""
        visible = F.one_hot(shown_actions, self.A).float() * shown.unsqueeze(-1)
        return torch.cat((state, obs, self.ids[agent], visible.flatten(1), shown.float()), -1)

    def train_step(self) -> dict:
        """One step of each estimator on a batch of (env step, pair i ≠ j) rows, then the EMA refresh of the score
        table from that batch: M[i, j, d] ≈ I(o^i_{d,t+1}; a^j_t | a^i_t, τ_t)."""
        B, N, A, kw = self.args.estimator_batch_size, self.N, self.A, {"generator": self.gen, "device": self.device}
        idx = torch.randint(min(self.count, self.window), (B,), **kw)
        i = torch.randint(N, (B,), **kw)
        j = (i + 1 + torch.randint(N - 1, (B,), **kw)) % N  # uniform over j ≠ i
        state, obs_i, executed = self.w_state[idx], self.w_obs[idx, i], self.w_executed[idx]
        a_i, a_j = executed.gather(1, i[:, None]).squeeze(1), executed.gather(1, j[:, None]).squeeze(1)
        target = (self.w_next[idx, i] - self.next_mean) / self.next_var.sqrt().clamp(min=1e-3)
        z = torch.cat((state, obs_i, self.eye_a[a_i], self.ids[i]), -1)
        # q_φ: maximum likelihood on the executed actions (the dynamics are real even in attacked episodes)
        obs_loss = -self.obs_model.log_prob(torch.cat((z, self.eye_a[a_j], self.ids[j]), -1), target).sum(-1).mean()
        self.obs_opt.zero_grad()
        obs_loss.backward()
        self.obs_opt.step()
        with torch.no_grad():
            # pointwise score per dim: log q(o'_d | z, a^j) - mean over available ã of log q(o'_d | z, ã)
            # [C] a uniform proposal over avail^j instead of p(a^j | τ): the greedy policy makes the
            # latter almost deterministic, which would hide what a^j could change
            xa = torch.cat((z[:, None].expand(-1, A, -1), self.eye_a.expand(B, A, A),
                            self.ids[j][:, None].expand(-1, A, -1)), -1)
            lp = self.obs_model.log_prob(xa, target[:, None])  # [B, A, D]
            avail_j = self.w_avail[idx, j].float()
            negative = (lp * avail_j[..., None]).sum(1) / avail_j.sum(1, keepdim=True)
            c = lp.gather(1, a_j[:, None, None].expand(-1, 1, self.D)).squeeze(1) - negative
            pair = i * N + j
            sums = torch.zeros(N * N, self.D, device=self.device).index_add_(0, pair, c)
            counts = torch.bincount(pair, minlength=N * N).float()
            seen, flat, beta = counts > 0, self.scores.view(N * N, self.D), self.args.score_ema
            flat[seen] = beta * flat[seen] + (1 - beta) * sums[seen] / counts[seen, None]
        # q_ψ: cross-entropy on the intended actions (the team's coordination, not the attack's), each
        # teammate shown with probability 1/2 and none shown a quarter of the time
        shown = (torch.rand((B, N), **kw) < 0.5) & (torch.rand((B, 1), **kw) >= 0.25)
        shown[torch.arange(B, device=self.device), i] = False
        intended = self.w_intended[idx]
        logp = self.act_model.log_prob(self._act_inputs(state, obs_i, i, intended, shown), self.w_avail[idx, i])
        act_loss = -logp.gather(1, intended.gather(1, i[:, None])).mean()
        self.act_opt.zero_grad()
        act_loss.backward()
        self.act_opt.step()
        return {"ibal/obs_model_loss": obs_loss.item(), "ibal/action_model_loss": act_loss.item(),
                "ibal/obs_mi_score_max": self.scores.max().item()}

    @torch.no_grad()
    def plan(self, num_envs: int, k_range, p_range, old: Optional[dict] = None, done=None, gen=None) -> dict:
        """Each env's attack for a new episode: k ~ U{k_range}, G1 a random k-subset, P_act ~ U(p_range) and the
        dims to mask. With ``old`` and ``done`` [E], only the envs that finished get a new draw. ``gen``: a
        generator to draw from instead of the training stream (evaluation)."""
        E, N, kw = num_envs, self.N, {"generator": gen or self.gen, "device": self.device}
        k = k_range[0] + torch.randint(k_range[1] - k_range[0] + 1, (E,), **kw)
        g1 = torch.rand((E, N), **kw).argsort(1).argsort(1) < k[:, None]
        p_act = p_range[0] + (p_range[1] - p_range[0]) * torch.rand((E,), **kw)
        obs_mask = torch.zeros(E, N, self.D, dtype=torch.bool, device=self.device)
        if self.use_obs and self.mask_dims > 0:
            # each G1 agent i loses the L dims with the largest Σ_{j∈G2} max(M[i, j, d], 0), what o^i tells about
            # G2's actions; with --mask-direction both each G2 agent also loses its top-L dims about G1's, as the
            # paper does to avoid a training bias (masking one side only trains G2 on inputs never masked).
            # [C] the mask is fixed for the episode: the score is an expectation, not a per-step quantity
            other = g1[:, :, None] != g1[:, None, :]  # [e, i, j]: j is in the other group than i
            per_dim = torch.einsum("ijd,eij->eid", self.scores.clamp(min=0), other.float())
            obs_mask.scatter_(-1, per_dim.topk(self.mask_dims, -1).indices, True)
            obs_mask &= (g1 | g1.any(1, keepdim=True) if self.args.mask_direction == "both" else g1)[..., None]
        if old is None:
            return {"g1": g1, "p_act": p_act, "obs_mask": obs_mask}
        d = done.view(-1, 1)
        return {"g1": torch.where(d, g1, old["g1"]), "p_act": torch.where(done, p_act, old["p_act"]),
                "obs_mask": torch.where(d[..., None], obs_mask, old["obs_mask"])}

    def mask_obs(self, obs, plan: dict):
        """What the agents see: the planned dims set to --mask-value."""
        return obs.masked_fill(plan["obs_mask"], self.args.mask_value)

    @torch.no_grad()
    def attack_actions(self, obs, state, intended, avail, plan: dict, gen=None):
        """With probability P_act (one draw per env step, shared by G1) each G1 agent plays the action of least
        pointwise MI with G2's intended actions, argmin_a log q(a | â^{G2}, τ) - log q(a | τ), instead of its own.
        [C] G1 is assumed to factorise given (â^{G2}, τ), so the joint argmin splits per agent.
        Returns (executed actions [E, N], mean KL(q(·|â^{G2}, τ) ‖ q(·|τ)) over G1 agents or nan)."""
        g1 = plan["g1"]
        if not self.use_act or not bool(g1.any()):
            return intended, float("nan")
        E, N = g1.shape
        fire = torch.rand((E,), generator=gen or self.gen, device=self.device) < plan["p_act"]
        agent, av = torch.arange(N, device=self.device).repeat(E), avail.reshape(E * N, -1)
        state_r = ((state - self.state_center) / self.state_half).repeat_interleave(N, 0)
        obs_r, shown_actions = self.scale_obs(obs).reshape(E * N, -1), intended.repeat_interleave(N, 0)
        g2 = (~g1).repeat_interleave(N, 0)  # every agent i is shown G2 (G1 agents are never in G2)
        log_cond = self.act_model.log_prob(self._act_inputs(state_r, obs_r, agent, shown_actions, g2), av)
        log_marg = self.act_model.log_prob(self._act_inputs(state_r, obs_r, agent, shown_actions, torch.zeros_like(g2)), av)
        pmi = log_cond.clamp(min=LOG_PROB_FLOOR) - log_marg.clamp(min=LOG_PROB_FLOOR)
        best = pmi.masked_fill(~av, float("inf")).argmin(-1).view(E, N)
        kl = (log_cond.exp() * (log_cond - log_marg)).sum(-1).view(E, N)
        return torch.where(g1 & fire[:, None], best, intended), kl[g1].mean().item()

    def state_dict(self) -> dict:
        return {"obs_model": self.obs_model.state_dict(), "action_model": self.act_model.state_dict(),
                "scores": self.scores.clone()}

    def load_state_dict(self, state: dict) -> None:  # --resume
        self.obs_model.load_state_dict(state["obs_model"])
        self.act_model.load_state_dict(state["action_model"])
        self.scores.copy_(state["scores"])


def attack_cap(args: Args, n_agents: int, obs_dim: int) -> int:
    """K, the largest attacked group: --attack-k, or max(1, n // 2) (|G1| ≤ n/2 keeps G2 the majority). One line
    and exit 2 for a K or an L (--mask-dims) that this env cannot take."""
    K = max(1, n_agents // 2) if args.attack_k is None else args.attack_k
    if args.attack_k is None and K > n_agents // 2:
        fail(f"{args.env_id!r} has {n_agents} agent, too few for IBAL (the attacked group G1 has at most n // 2 agents "
             f"and G2 the rest); pass --attack-k 0 to train plain QMIX")
    if not 0 <= K <= n_agents // 2:
        fail(f"--attack-k must lie in [0, {n_agents // 2}] for {n_agents} agents (|G1| ≤ n/2), got {K}")
    if args.mask_dims is not None and not 0 <= args.mask_dims <= obs_dim:
        fail(f"--mask-dims must lie in [0, {obs_dim}] (the observation size), got {args.mask_dims}")
    return K


def load_policy(checkpoint: dict, device="cpu") -> Policy:
    """Rebuild the frozen greedy defender of an ``ibal_qmix`` checkpoint (a dict from torch.load)."""
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != "ibal_qmix":
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not an ibal_qmix checkpoint (script: {found!r})")
    try:
        args, space, n_agents = checkpoint["args"], checkpoint["action_space"], checkpoint["n_agents"]
        if space["type"] != "discrete":
            raise KeyError("action_space is not discrete")
        agent = RNNAgent(checkpoint["obs_dim"] + space["n"] + n_agents, space["n"], args["hidden_dim"]).to(device)
        agent.load_state_dict(checkpoint["models"]["agent"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"unusable ibal_qmix checkpoint: {type(e).__name__}: {e}") from None
    return Policy(agent.eval().requires_grad_(False), n_agents, space["n"], checkpoint.get("obs_low"),
                  checkpoint.get("obs_high"))


def act_under_attack(policy, breaker: Optional[InteractionBreaker], obs, state, avail, hidden, plan: Optional[dict],
                     epsilon: float = 0.0, gen=None) -> tuple:
    """One step of the defender under the attack ``plan`` (plain acting without a breaker): it acts on what it sees,
    then the attacker rewrites G1's actions. Returns (seen obs, intended, executed, hidden, KL or nan)."""
    if breaker is None:
        actions, hidden = policy.act(obs, avail, hidden, epsilon)
        return obs, actions, actions, hidden, float("nan")
    seen = breaker.mask_obs(obs, plan)
    intended, hidden = policy.act(seen, avail, hidden, epsilon)
    executed, kl = breaker.attack_actions(obs, state, intended, avail, plan, gen)
    return seen, intended, executed, executed_as_last_action(hidden, executed, policy.n_actions), kl


@torch.no_grad()
def evaluate(policy, env, breaker: Optional[InteractionBreaker] = None, k: int = 0, p_act: float = 0.0,
             seed: int = 0) -> tuple:
    """Run one greedy episode in each of ``env.num_envs`` envs; returns (returns, successes) [E]. With ``breaker``,
    every episode is attacked with |G1| = k and P_act = ``p_act``, drawn from a generator seeded with ``seed``."""
    gen = torch.Generator(device=env.device).manual_seed(seed)
    obs, state, avail = env.reset()
    hidden = policy.init_hidden(env.num_envs)
    plan = breaker.plan(env.num_envs, (k, k), (p_act, p_act), gen=gen) if breaker is not None else None
    returns = torch.zeros(env.num_envs, device=env.device)
    success = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    running = torch.ones(env.num_envs, dtype=torch.bool, device=env.device)
    while bool(running.any()):
        _, _, actions, hidden, _ = act_under_attack(policy, breaker, obs, state, avail, hidden, plan, gen=gen)
        obs, state, avail, reward, terminated, truncated, info = env.step(actions)
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


def interaction_breaking_attack(checkpoint: dict, policy, env, seed: int) -> tuple:
    """IBAL's attack on a frozen QMIX defender (``attack_worstcase.py --interaction-breaking``, for mir3_qmix and
    ibal_qmix checkpoints); returns (returns, success) [E]. Fresh estimators are fitted on ``env``, the env being
    evaluated: --attack-fit-steps env steps of the victim's play (ε = --epsilon-finish, so that q_φ also sees
    off-policy actions), then --attack-fit-updates estimator steps; then one greedy episode per env with |G1| = K
    and P_act = --attack-p-act. The knobs: an ibal_qmix checkpoint's args, else this script's defaults."""
    saved = checkpoint.get("args", {}) if checkpoint.get("script") == "ibal_qmix" else {}
    args = Args(**{k: v for k, v in saved.items() if k in {f.name for f in fields(Args)}})
    args = replace(args, estimator_window=args.attack_fit_steps)  # the estimators see every fitting step
    device = env.device
    K = args.attack_k or max(1, env.n_agents // 2)  # a K = 0 run is attacked with the default K
    breaker = InteractionBreaker(env.n_agents, env.obs_dim, env.state_dim, env.n_actions, args, policy.scale_obs,
                                 input_bounds(env, device)[2], device, seed)
    # the victim's ε-greedy draws come from the global stream: fork it, so that the same seed gives the same
    # attack whatever the caller did before, and the caller's stream is left as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        obs, state, avail = env.reset()
        hidden = policy.init_hidden(env.num_envs)
        for _ in range(math.ceil(args.attack_fit_steps / env.num_envs)):
            actions, hidden = policy.act(obs, avail, hidden, args.epsilon_finish)
            next_obs, next_state, next_avail, _, terminated, truncated, info = env.step(actions)
            breaker.observe(state, obs, info["final_obs"], actions, actions, avail)
            hidden = hidden * (~(terminated | truncated)).view(-1, 1, 1)
            obs, state, avail = next_obs, next_state, next_avail
    for _ in range(args.attack_fit_updates):
        breaker.train_step()
    return evaluate(policy, env, breaker, K, args.attack_p_act, seed)


# the range of every numeric flag (runtime.check_flags): a value outside it would run, but silently wrong
FLAG_RULES = {
    **dict.fromkeys(("num_envs", "total_timesteps", "batch_size", "buffer_size", "hidden_dim", "mixer_embed_dim",
                     "hypernet_dim", "eval_episodes", "target_update_interval", "estimator_batch_size", "estimator_window",
                     "success_window", "obs_model_hidden_dim", "act_model_hidden_dim", "attack_fit_steps"), "be >= 1"),
    **dict.fromkeys(("learning_starts", "epsilon_anneal_steps", "eval_interval", "save_interval", "attack_fit_updates"),
                    "be >= 0"),
    **dict.fromkeys(("gamma", "td_lambda", "epsilon_start", "epsilon_finish", "p_max_init", "p_min", "eta",
                     "warmup_fraction", "attack_p_act"), "lie in [0, 1]"),
    **dict.fromkeys(("learning_rate", "estimator_lr", "max_grad_norm", "updates_per_episode"), "be > 0"),
    "alpha": "be >= 1 (P_max only grows)",
    "score_ema": "lie in [0, 1)",
    "mask_value": None,  # any finite number
}
CHOICES = {"attack_types": ("obs", "act", "both"), "mask_direction": ("both", "g1")}

# --resume: besides the weights, a checkpoint's "continuation" holds what a run needs to go on (CONTINUATION_KEYS; the
# RNG states include the attacker's generator, the norms the obs model's targets). Not the replay buffer nor the
# estimators' window: a resumed run refills them with --learning-starts fresh env steps before it learns again.
MODEL_FLAGS = ("env_id", "n_agents", "episode_limit", "env_kwargs", "hidden_dim", "mixer_embed_dim", "hypernet_dim",
               "obs_model_hidden_dim", "act_model_hidden_dim")
CONTINUATION_KEYS = ("optimizers", "targets", "rng", "counters", "episode_counts", "norms", "curriculum")


if __name__ == "__main__":
    args, resumed, run_name, run_dir = parse_run(Args, "ibal_qmix", CONTINUATION_KEYS, MODEL_FLAGS,
                                                 renamed={"lr": "learning_rate"})  # saved before --lr was renamed
    check_flags(args, FLAG_RULES)  # --p-min None: the default
    for name, options in CHOICES.items():
        if getattr(args, name) not in options:
            fail(f"--{name.replace('_', '-')} must be one of {', '.join(options)}, got {getattr(args, name)!r}")
    env_kwargs = env_kwargs_of(args, example='{"max_episode_steps": 25}') if resumed is None else resumed["env_kwargs"]

    # TRY NOT TO MODIFY: seeding
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env, eval_env = make_envs(args, env_kwargs, device, box_error=(
        f"ibal_qmix needs discrete actions, but {args.env_id!r} has Box actions; use a discrete "
        f"variant (e.g. rendezvous-discrete, quads-same-goal-discrete)"))
    N, T, A = env.n_agents, env.episode_limit, env.n_actions
    space = action_space_dict(env.action_space)
    K = attack_cap(args, N, env.obs_dim)
    check_same_env(args, resumed, env)
    capacity = max(args.buffer_size // T, 2 * args.num_envs)  # whole episodes
    check_fits(EpisodeBuffer.nbytes(capacity, T, N, env.obs_dim, env.state_dim, A)
               + (InteractionBreaker.nbytes(N, env.obs_dim, env.state_dim, A, args.estimator_window) if K > 0 else 0),
               f"--buffer-size {args.buffer_size} with {N} agents (obs {env.obs_dim}, {T}-step episodes)",
               "the replay buffer, the attacker's window and its score table",
               "lower --buffer-size (or --estimator-window, --n-agents)", device)
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
    rb = EpisodeBuffer(capacity, T, args.num_envs, N, env.obs_dim, env.state_dim, A, device)
    reward_mean, reward_var, reward_count = torch.zeros((), device=device), torch.ones((), device=device), 1e-4
    obs_low, obs_high, (state_center, state_half) = input_bounds(env, device)  # LBF: raw grid coordinates to [-1, 1]
    policy = Policy(agent, N, A, obs_low, obs_high)
    # the attacker, with its own generator; none with K = 0, so that nothing differs from plain QMIX
    breaker = InteractionBreaker(N, env.obs_dim, env.state_dim, A, args, policy.scale_obs, (state_center, state_half),
                                 device, args.seed + 1) if K > 0 else None
    schedule = AttackSchedule(args.p_max_init, args.alpha, args.eta, args.success_window,
                              1.0 / max(K, 1) if args.p_min is None else args.p_min,  # the paper's P_min = 1/K
                              int(args.warmup_fraction * args.total_timesteps))

    optimizers = {"qmix": optimizer, **({"obs_model": breaker.obs_opt, "action_model": breaker.act_opt} if breaker else {})}
    targets = {"agent": target_agent, "mixer": target_mixer}
    models = {"agent": agent, "mixer": mixer, **({"attacker": breaker} if breaker else {})}
    watched = {"agent weights": agent, "mixer weights": mixer, **({  # checked for NaN/inf; the score table is saved too
        "obs_model weights": breaker.obs_model, "action_model weights": breaker.act_model,
        "attacker scores": breaker.scores} if breaker else {})}

    def save() -> str:
        stop_if_not_finite(global_step, metrics, watched)  # a diverged run never overwrites a good checkpoint
        rng, norms = rng_state(device), {"reward_mean": reward_mean, "reward_var": reward_var, "reward_count": reward_count}
        if breaker is not None:
            rng["attacker"] = breaker.gen.get_state()
            norms.update(next_obs_mean=breaker.next_mean, next_obs_var=breaker.next_var, next_obs_count=breaker.next_count)
        return save_checkpoint(f"{run_dir}/{args.exp_name}.pt", {
            "script": "ibal_qmix", "args": asdict(args), "env_id": args.env_id, "env_kwargs": env_kwargs,
            "n_agents": N, "obs_dim": env.obs_dim, "state_dim": env.state_dim, "obs_low": obs_low, "obs_high": obs_high,
            "action_space": space, "global_step": global_step, "p_max": schedule.p_max,
            "models": {k: model.state_dict() for k, model in models.items()},
            "continuation": {  # what --resume needs (the estimators' window refills with the replay buffer)
                "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
                "targets": {k: net.state_dict() for k, net in targets.items()},
                "rng": rng,
                "counters": {"updates": updates, "last_save": last_save, "last_eval": last_eval, "last_log": last_log,
                             "credit": credit},
                "episode_counts": {"env": episodes_started(env), "eval_env": eval_env.episode_count.cpu()},
                "norms": norms,
                "curriculum": schedule.state_dict(),
                "recent_returns": recent_returns}})

    # TRY NOT TO MODIFY: start the game
    global_step, updates, last_save, last_eval, last_log, last_print = 0, 0, 0, 0, 0, 0.0
    credit = 0.0  # gradient steps owed to finished episodes (--updates-per-episode)
    recent_returns, metrics = [], {}
    if resumed is not None:
        def restore_ibal(continuation: dict) -> dict:
            """The attack curriculum, the running statistics (rewards, the obs model's targets), the attacker's RNG."""
            schedule.load_state_dict(continuation["curriculum"])
            norms = continuation["norms"]
            if breaker is not None and "attacker" in resumed["models"]:  # else a fresh attacker (see ``optional``)
                breaker.next_mean, breaker.next_var = norms["next_obs_mean"].to(device), norms["next_obs_var"].to(device)
                breaker.next_count = float(norms["next_obs_count"])
                breaker.gen.set_state(continuation["rng"]["attacker"])
            return {"reward_mean": norms["reward_mean"].to(device), "reward_var": norms["reward_var"].to(device),
                    "reward_count": float(norms["reward_count"])}

        # the attacker where both runs have one (K > 0); a run that turns attacks on starts a fresh one
        saved = restore(args, resumed, models, targets, optimizers, ("updates", "credit", "last_save", "last_eval",
                        "last_log"), optional={"attacker": ("obs_model", "action_model")}, extra=restore_ibal,
                        env=env, eval_env=eval_env)  # the command line's learning rates win
        global_step, updates, credit = saved["global_step"], saved["updates"], saved["credit"]
        last_save, last_eval, last_log = saved["last_save"], saved["last_eval"], saved["last_log"]
        recent_returns = saved["recent_returns"]
        reward_mean, reward_var, reward_count = saved["reward_mean"], saved["reward_var"], saved["reward_count"]
        print(f"resuming {args.resume} at global_step={global_step}: new episodes, and no learning during the "
              f"first {args.learning_starts} steps, which refill the replay buffer (and until it holds "
              f"{args.batch_size} episodes)", flush=True)
    print(f"{run_name}: {args.env_id} with {N} agents, obs {env.obs_dim}, state {env.state_dim}, Discrete({A}), "
          f"K = {K}, L = {breaker.mask_dims if breaker else 0}, attacks {args.attack_types if K else 'off'} "
          f"after {schedule.warmup_steps} steps, device {device}")
    start_step = global_step
    learning_from = start_step + args.learning_starts  # a resumed run refills its (empty) buffer first
    obs, state, avail = env.reset()
    hidden = policy.init_hidden(args.num_envs)
    if resumed is not None:
        set_rng_state(resumed["continuation"]["rng"], device)  # last: building the nets drew from it
    plan = None  # each env's attack in its current episode (none with K = 0)
    if breaker is not None:
        # the first episodes of a new run fall in the warm-up; a resumed run's are attacked once it is over
        attacking = resumed is not None and global_step >= schedule.warmup_steps
        plan = breaker.plan(args.num_envs, (0, K if attacking else 0), schedule.p_range() if attacking else (0.0, 0.0))
        attacked_episode = torch.full((args.num_envs,), attacking, dtype=torch.bool, device=device)
    start_time = time.time()
    stop_on_signals()
    try:
        while global_step < args.total_timesteps:
            # ALGO LOGIC: put action logic here
            frac = min(global_step / max(args.epsilon_anneal_steps, 1), 1.0)
            epsilon = args.epsilon_start + frac * (args.epsilon_finish - args.epsilon_start)
            seen, intended, actions, hidden, kl = act_under_attack(policy, breaker, obs, state, avail, hidden, plan, epsilon)
            if not math.isnan(kl):
                metrics["ibal/action_kl"] = kl
            next_obs, next_state, next_avail, reward, terminated, truncated, info = env.step(actions)
            done = terminated | truncated
            reward_mean, reward_var, reward_count = running_stats(reward_mean, reward_var, reward_count, reward)
            # TRY NOT TO MODIFY: save data to replay buffer; handle `final_observation`
            final_seen = breaker.mask_obs(info["final_obs"], plan) if breaker is not None else info["final_obs"]
            rb.add(seen, state, avail, actions, reward, terminated, done,
                   final_seen, info["final_state"], info["final_avail"])
            if breaker is not None:  # the estimators learn from what really happened: unmasked obs, both actions
                breaker.observe(state, obs, info["final_obs"], intended, actions, avail)
            # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
            obs, state, avail = next_obs, next_state, next_avail
            global_step += args.num_envs

            if bool(done.any()):
                hidden = hidden * (~done).view(-1, 1, 1)  # new episodes: zero GRU state and last action
                recent_returns = (recent_returns + info["episode_return"][done].tolist())[-100:]
                writer.add_scalar("charts/episodic_return", float(info["episode_return"][done].mean()), global_step)
                writer.add_scalar("charts/episodic_length", float(info["episode_length"][done].float().mean()), global_step)
                writer.add_scalar("charts/success_rate", float(info["success"][done].float().mean()), global_step)
                if breaker is not None:
                    # the curriculum counts the episodes played under the attack schedule (after the warm-up)
                    schedule.record(info["success"][done & attacked_episode].tolist())
                    attacking = global_step >= schedule.warmup_steps
                    plan = breaker.plan(args.num_envs, (0, K if attacking else 0), schedule.p_range(), plan, done)
                    attacked_episode = torch.where(done, attacking, attacked_episode)

            # ALGO LOGIC: training, --updates-per-episode gradient steps per finished episode
            if bool(done.any()) and global_step >= learning_from and rb.num_episodes() >= args.batch_size:
                credit += int(done.sum()) * args.updates_per_episode
                while credit >= 1:
                    credit -= 1
                    # the QMIX loss, unchanged: the batch holds masked observations and executed actions, and
                    # the mixer sees the true state [C: the attacker perturbs what agents see, not the critic]
                    batch = rb.sample(args.batch_size)  # whole episodes [B, L(+1), ...]
                    mask = batch["mask"]
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
                        b_reward = batch["reward"]
                        if args.standardise_rewards:
                            b_reward = (b_reward - reward_mean) / (reward_var.sqrt() + 1e-8)
                        target = lambda_returns(b_reward, batch["terminated"], q_tot_next, mask, args.gamma, args.td_lambda)
                    q_tot = mixer(chosen, b_state[:, :-1])
                    loss = (((q_tot - target) * mask) ** 2).sum() / mask.sum()
                    optimizer.zero_grad()
                    loss.backward()
                    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    metrics["losses/td_loss"] = loss.item()
                    metrics["losses/grad_norm"] = grad_norm.item()
                    metrics["losses/q_values"] = (q_tot * mask).sum().item() / mask.sum().item()
                    metrics["losses/target_mean"] = (target * mask).sum().item() / mask.sum().item()
                    if breaker is not None and breaker.ready():  # one step of each estimator, then M is refreshed
                        metrics.update(breaker.train_step())
                    updates += 1
                    if updates % args.target_update_interval == 0:  # update the target networks
                        target_agent.load_state_dict(agent.state_dict())
                        target_mixer.load_state_dict(mixer.state_dict())
                stop_if_not_finite(global_step, metrics)

            if global_step - last_log >= 1000 and metrics:
                last_log = global_step
                stop_if_not_finite(global_step, metrics, watched)
                for k, v in metrics.items():
                    writer.add_scalar(k, v, global_step)
                writer.add_scalar("charts/epsilon", epsilon, global_step)
                writer.add_scalar("charts/SPS", int((global_step - start_step) / (time.time() - start_time)), global_step)
                if breaker is not None:
                    writer.add_scalar("ibal/p_max", schedule.p_max, global_step)
                    writer.add_scalar("ibal/window_success_rate", schedule.success_rate(), global_step)
                    writer.add_scalar("ibal/attacked_group_size", plan["g1"].sum(1).float().mean().item(), global_step)

            if args.eval_interval and (global_step - last_eval >= args.eval_interval or global_step >= args.total_timesteps):
                last_eval = global_step
                returns, success = evaluate(policy, eval_env)
                writer.add_scalar("eval/episodic_return", returns.mean().item(), global_step)
                writer.add_scalar("eval/success_rate", success.float().mean().item(), global_step)
                line = f"global_step={global_step} eval_return={returns.mean().item():.2f} " \
                       f"eval_success={success.float().mean().item():.2f}"
                if breaker is not None and breaker.ready():
                    returns, success = evaluate(policy, eval_env, breaker, K, args.attack_p_act, args.seed + 100_000)
                    writer.add_scalar("eval/attacked_return", returns.mean().item(), global_step)
                    writer.add_scalar("eval/attacked_success_rate", success.float().mean().item(), global_step)
                    line += f" attacked_return={returns.mean().item():.2f} " \
                            f"attacked_success={success.float().mean().item():.2f}"
                print(line, flush=True)
            if time.time() - last_print > 10:
                last_print = time.time()
                ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"global_step={global_step} SPS={int((global_step - start_step) / (time.time() - start_time))} "
                      f"updates={updates} epsilon={epsilon:.2f} return={ret:.2f} p_max={schedule.p_max:.2f}", flush=True)
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
