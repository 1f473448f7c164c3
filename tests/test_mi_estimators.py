"""MI upper bounds of the MIR3 scripts against distributions whose mutual information is known.

With the exact conditional q(a|s) = p(a|s), the estimators converge to known values:
- l1out -> I(S; A) (leave-one-out marginal);
- club  -> I + E_s KL(p(a) || p(a|s)), an upper bound with a closed form for Gaussians
  (d·ρ²/(1−ρ²) for d dims of correlation ρ) and a finite sum for discrete tables;
- vub   -> I + KL(p(a) || r(a)) with r the learned marginal (factorised over agents);
- club-sample -> club in expectation.
q(a|s) is learned here by maximum likelihood, as in training, then evaluated on fresh samples.
"""

import importlib
import itertools
import math

import pytest
import torch

# every script's own copy of CLUB; QMIX's handles discrete actions only and has the CLUB bound only (the
# ablation bounds live in mir3_maddpg and mir3_mappo)
CONTINUOUS = ["mir3_maddpg", "mir3_mappo"]
DISCRETE = ["mir3_maddpg", "mir3_qmix", "mir3_mappo"]
ESTIMATORS = ("club", "club-sample", "l1out", "vub")


def make_club(script, state_dim, n_agents, n_actions, discrete, hidden_dim):
    CLUB = importlib.import_module(script).CLUB
    if script == "mir3_qmix":
        assert discrete
        return CLUB(state_dim, n_agents, n_actions, hidden_dim=hidden_dim)
    return CLUB(state_dim, n_agents, n_actions, discrete=discrete, hidden_dim=hidden_dim)


def club_only(club) -> bool:
    return type(club) is importlib.import_module("mir3_qmix").CLUB


def mi(club, s, a, est):
    return club.mi(s, a) if club_only(club) else club.mi(s, a, est)


def fit(club, sample, steps=1500, lr=3e-3, batch=512):
    opt = torch.optim.Adam(club.parameters(), lr=lr)
    for _ in range(steps):
        s, a = sample(batch)
        loss = club.learning_loss(s, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return club


def estimates(club, sample, n=4096, repeats=4):
    out = {}
    with torch.no_grad():
        for est in ESTIMATORS[:1] if club_only(club) else ESTIMATORS:
            out[est] = sum(mi(club, *sample(n), est).mean().item() for _ in range(repeats)) / repeats
    return out


@pytest.mark.parametrize("script", CONTINUOUS)
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8])
def test_correlated_gaussians(script, rho):
    torch.manual_seed(0)
    n_agents, d_each = 2, 2
    d = n_agents * d_each

    def sample(b):
        s = torch.randn(b, d)
        a = rho * s + math.sqrt(1 - rho**2) * torch.randn(b, d)
        return s, a.view(b, n_agents, d_each)

    club = fit(make_club(script, d, n_agents, d_each, discrete=False, hidden_dim=64), sample)
    est = estimates(club, sample)
    true_mi = -0.5 * d * math.log(1 - rho**2)
    club_value = d * rho**2 / (1 - rho**2)
    tol = 0.05 + 0.1 * club_value
    assert est["club"] == pytest.approx(club_value, abs=tol)
    assert est["club-sample"] == pytest.approx(club_value, abs=tol + 0.05)
    assert est["l1out"] == pytest.approx(true_mi, abs=0.05 + 0.1 * true_mi)
    assert est["vub"] == pytest.approx(true_mi, abs=0.05 + 0.1 * true_mi)
    assert est["club"] >= true_mi - 0.05  # an upper bound


def discrete_problem(strength):
    """4 states; 2 agents with 3 actions each, independent given the state."""
    torch.manual_seed(1)
    p_s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = strength * torch.randn(4, 2, 3)
    p_a_s = logits.softmax(-1)  # [S, N, A]
    joints = list(itertools.product(range(3), repeat=2))
    p_joint_s = torch.stack([p_a_s[:, 0, i] * p_a_s[:, 1, j] for i, j in joints], 1)  # [S, 9]
    p_joint = (p_s[:, None] * p_joint_s).sum(0)
    true_mi = (p_s[:, None] * p_joint_s * (p_joint_s / p_joint).log()).sum().item()
    club_value = true_mi + (p_s * (p_joint[None] * (p_joint[None] / p_joint_s).log()).sum(1)).sum().item()
    marg = (p_s[:, None, None] * p_a_s).sum(0)  # per-agent marginals [N, A]
    r = torch.stack([marg[0, i] * marg[1, j] for i, j in joints])
    vub_value = true_mi + (p_joint * (p_joint / r).log()).sum().item()

    def sample(b):
        s = torch.multinomial(p_s, b, replacement=True)
        a = torch.multinomial(p_a_s[s].reshape(-1, 3), 1).view(b, 2)
        return torch.nn.functional.one_hot(s, 4).float(), torch.nn.functional.one_hot(a, 3).float()

    return sample, true_mi, club_value, vub_value


@pytest.mark.parametrize("script", DISCRETE)
@pytest.mark.parametrize("strength", [0.0, 2.0])
def test_categorical_joint_distribution(script, strength):
    sample, true_mi, club_value, vub_value = discrete_problem(strength)
    torch.manual_seed(2)
    club = fit(make_club(script, 4, 2, 3, discrete=True, hidden_dim=64), sample, steps=800)
    est = estimates(club, sample)
    if strength == 0.0:
        assert true_mi == pytest.approx(0.0, abs=1e-6)
        for v in est.values():
            assert abs(v) < 0.03
        return
    assert true_mi > 0.3
    assert est["club"] == pytest.approx(club_value, abs=0.03 + 0.05 * club_value)
    assert club_value >= true_mi
    if script == "mir3_qmix":  # CLUB only
        return
    assert est["club-sample"] == pytest.approx(club_value, abs=0.06 + 0.05 * club_value)
    assert est["l1out"] == pytest.approx(true_mi, abs=0.03 + 0.05 * true_mi)
    assert est["vub"] == pytest.approx(vub_value, abs=0.03 + 0.05 * vub_value)


@pytest.mark.parametrize("script,discrete", [(s, True) for s in DISCRETE] + [(s, False) for s in CONTINUOUS])
def test_club_closed_form_equals_all_pairs(script, discrete):
    """The O(B) negative term equals the explicit B×B average of the CLUB paper."""
    torch.manual_seed(3)
    club = make_club(script, 5, 3, 4, discrete=discrete, hidden_dim=16)
    s = torch.randn(64, 5)
    a = torch.nn.functional.one_hot(torch.randint(4, (64, 3)), 4).float() if discrete else torch.randn(64, 3, 4)
    with torch.no_grad():
        pairs = torch.stack([club.log_q(s, a[j].expand_as(a)) for j in range(64)], 1)  # [b, b']
        explicit = club.log_q(s, a) - pairs.mean(1)
        torch.testing.assert_close(mi(club, s, a, "club"), explicit, atol=1e-4, rtol=1e-4)
