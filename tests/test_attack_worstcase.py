"""attack_worstcase.py: the trained adversary beats a random one, every script's checkpoints,
report schema and intervals, re-evaluation from the adversary checkpoint, plots, env shift and
--env-kwargs, relative observation noise, QMIX's executed last action, the adversary's objective, bad input."""

import glob
import json
import math
import os
import shutil

import gymnasium as gym
import pytest
import torch
import torch.nn.functional as F

import attack_worstcase as aw
import envs
from helpers import ROOT, only, run_in_process
from helpers import run_script as run

# training scripts whose checkpoints are attacked; add a name here and a line in TINY_TRAIN
SCRIPTS = ["mir3_maddpg", "mir3_qmix", "mir3_mappo"]
# flags of a tiny (seconds) training run per script, used for the "runs on every script" test
TINY_TRAIN = {
    "mir3_maddpg": ["--total-timesteps", "320", "--learning-starts", "160", "--num-envs", "4", "--batch-size", "4",
                    "--eval-interval", "0", "--hidden-dim", "16", "--club-hidden-dim", "16", "--buffer-size", "2000"],
    "mir3_qmix": ["--total-timesteps", "320", "--num-envs", "4", "--batch-size", "4", "--eval-interval", "0",
                  "--hidden-dim", "16", "--club-hidden-dim", "16", "--buffer-size", "2000"],
    "mir3_mappo": ["--total-timesteps", "256", "--num-envs", "4", "--num-steps", "32", "--eval-interval", "0",
                   "--hidden-dim", "16", "--club-hidden-dim", "16"],
}
# the env of the tiny runs: a discrete task every script supports (continuous actions are test 1)
TINY_ENV = ["--env-id", "rendezvous-discrete", "--n-agents", "3", "--episode-limit", "20"]
TINY_ATTACK = ["--total-timesteps", "256", "--num-envs", "4", "--num-steps", "16", "--eval-episodes", "4",
               "--hidden-dim", "16", "--eval-interval", "128"]

# test 1: a 4-robot rendezvous defender that learns to gather a little (seeded, ~30 s) ...
DEFENDER = ["--env-id", "rendezvous", "--n-agents", "4", "--episode-limit", "50", "--total-timesteps", "40000",
            "--learning-starts", "2000", "--hidden-dim", "64", "--club-hidden-dim", "32", "--num-envs", "8",
            "--eval-interval", "0", "--buffer-size", "40000", "--mi-coef", "0", "--seed", "1"]
# ... and the adversary of agent 0 trained against it (~15 s), with every disturbance and a plot
ATTACK = ["--adversaries", "0", "--total-timesteps", "60000", "--num-envs", "64", "--num-steps", "16",
          "--learning-rate", "1e-3", "--update-epochs", "10", "--eval-interval", "0", "--eval-episodes", "128",
          "--obs-noise", "0.1", "--action-repeat", "0.2", "--disable", "1", "--plot"]
DISTURBANCES = ["obs_noise_0.1", "action_repeat_0.2", "dis_1"]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """A trained defender, and one attack run against it: (workdir, defender path, report, stdout)."""
    cwd = tmp_path_factory.mktemp("attack")
    run("mir3_maddpg", cwd, *DEFENDER)
    defender = only(cwd / "runs" / "*" / "mir3_maddpg.pt")
    proc = run("attack_worstcase", cwd, "--checkpoint", defender, *ATTACK)
    report = json.load(open(only(cwd / "runs" / "*attack_worstcase*" / "report.json")))
    return cwd, defender, report, proc.stdout


def test_trained_adversary_hurts_more_than_random(attacked):
    c = attacked[2]["conditions"]
    nat, rnd, worst = c["natural"], c["random"], c["worstcase"]
    print({k: (round(v["return_mean"], 3), round(v["return_ci95"], 3)) for k, v in c.items()})
    # beyond the confidence intervals: the worst-case team return is clearly below the random-adversary one
    assert worst["return_mean"] + worst["return_ci95"] < rnd["return_mean"] - rnd["return_ci95"]
    assert worst["return_mean"] + worst["return_ci95"] < nat["return_mean"] - nat["return_ci95"]


def test_report_schema_and_outputs(attacked):
    cwd, defender, report, stdout = attacked
    assert set(report) == {"checkpoint", "script", "env_id", "env_kwargs", "adversaries", "adversary_objective",
                           "partial", "obs_noise_scale", "conditions"}
    assert report["checkpoint"] == defender and report["script"] == "mir3_maddpg"
    assert report["adversary_objective"] == "team"  # the paper's protocol, by default
    assert report["env_id"] == "rendezvous" and report["adversaries"] == [0] and report["partial"] is False
    assert report["env_kwargs"] == {"n_agents": 4, "episode_limit": 50}
    assert list(report["conditions"]) == ["natural", "random", "worstcase", *DISTURBANCES]
    t127 = 1.978819  # t(0.975, 127), not the normal 1.96
    for name, c in report["conditions"].items():
        extra = {"obs_noise", "obs_noise_rule"} if name.startswith("obs_noise") else set()
        assert set(c) == {"return_mean", "return_ci95", "success_rate", "episodes", "success_ci95", "returns",
                          "successes"} | extra
        assert isinstance(c["return_mean"], float) and isinstance(c["return_ci95"], float)
        assert isinstance(c["success_rate"], float) and type(c["episodes"]) is int
        assert c["episodes"] == 128 and c["return_ci95"] > 0 and 0.0 <= c["success_rate"] <= 1.0
        assert name in stdout  # the printed table
        # the per-episode values are what the summary numbers summarise
        r = torch.tensor(c["returns"], dtype=torch.float64)
        assert len(c["returns"]) == 128 and c["return_mean"] == pytest.approx(float(r.mean()), abs=1e-9)
        assert c["return_ci95"] == pytest.approx(t127 * float(r.std()) / math.sqrt(128), rel=1e-5)
        assert set(c["successes"]) <= {0, 1} and c["success_rate"] == sum(c["successes"]) / 128
        low, high = c["success_ci95"]
        assert 0.0 <= low <= c["success_rate"] <= high <= 1.0 and high - low > 0.01
    assert report["conditions"]["obs_noise_0.1"]["obs_noise"] == 0.1
    assert "std" in report["conditions"]["obs_noise_0.1"]["obs_noise_rule"]
    scale = report["obs_noise_scale"]  # rendezvous: 5 numbers per other robot + 5 own
    assert len(scale) == 5 * 3 + 5 and all(x >= 0 for x in scale) and max(scale) > 0
    run_dir = os.path.dirname(only(cwd / "runs" / "*attack_worstcase*" / "report.json"))
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    adv = torch.load(os.path.join(run_dir, "attack_worstcase.pt"), weights_only=True)
    assert adv["script"] == "attack_worstcase" and adv["adversaries"] == [0] and adv["adversary_objective"] == "team"
    assert adv["checkpoint"] == os.path.abspath(defender) and set(adv["models"]) == {"actor", "value"}


def test_plot_is_a_png(attacked):
    png = only(attacked[0] / "runs" / "*attack_worstcase*" / "report.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000  # bars and the trajectory panel


def test_adversary_checkpoint_reevaluates_without_training(attacked, tmp_path):
    cwd, _, report, _ = attacked
    adv = only(cwd / "runs" / "*attack_worstcase*" / "attack_worstcase.pt")
    out = tmp_path / "again.json"
    proc = run("attack_worstcase", tmp_path, "--adversary-checkpoint", adv, "--eval-episodes", "128",
               "--report", out)
    assert "SPS=" not in proc.stdout and "adversary saved" not in proc.stdout  # no training
    again = json.load(open(out))
    assert again["adversaries"] == [0] and set(again["conditions"]) == {"natural", "random", "worstcase"}
    for name in ("natural", "random", "worstcase"):
        old, new = report["conditions"][name], again["conditions"][name]
        assert set(new) == set(old) and new["successes"] == old["successes"]
        for key in ("return_mean", "return_ci95", "success_rate", "returns", "success_ci95"):
            assert new[key] == pytest.approx(old[key], abs=1e-9)


def test_scripted_adversaries_and_the_trained_one(attacked, tmp_path):
    """Re-evaluating a saved adversary with --scripted adds scripted_stop / scripted_flee on the same agent.
    (Whether the trained adversary beats them is an empirical check, not an invariant: on this small
    defender the 60k-step adversary and the fleeing robot do about the same damage.)"""
    cwd, _, report, _ = attacked
    adv = only(cwd / "runs" / "*attack_worstcase*" / "attack_worstcase.pt")
    out = tmp_path / "scripted.json"
    run("attack_worstcase", tmp_path, "--adversary-checkpoint", adv, "--eval-episodes", "128", "--scripted", "stop",
        "flee", "--report", out)
    c = json.load(open(out))["conditions"]
    assert list(c) == ["natural", "random", "worstcase", "scripted_stop", "scripted_flee"]
    assert c["worstcase"]["returns"] == report["conditions"]["worstcase"]["returns"]
    print({k: round(v["return_mean"], 3) for k, v in c.items()})
    for kind in ("stop", "flee"):  # scripted adversaries differ from the natural team and from each other
        assert c[f"scripted_{kind}"]["returns"] != c["natural"]["returns"]
    assert c["scripted_stop"]["returns"] != c["scripted_flee"]["returns"]
    assert c["scripted_flee"]["return_mean"] < c["natural"]["return_mean"]  # a robot driving away costs the team


def test_scripted_flee_drives_away_and_stop_does_nothing():
    env = envs.make("rendezvous", num_envs=8, seed=3, n_agents=4)
    env.reset()
    flee = aw.ScriptedAdversary("flee", [1])
    stop = aw.ScriptedAdversary("stop", [0, 2])
    obs = torch.zeros(8, 4, env.obs_dim)
    assert torch.equal(stop.act(obs, None, env), torch.zeros(8, 2, 2))
    start = (env.pos[:, 1] - env.pos.mean(1)).norm(dim=-1)
    for _ in range(40):  # the others stay; robot 1 turns away from the centroid and drives off at full speed
        actions = torch.zeros(8, 4, 2)
        actions[:, [1]] = flee.act(obs, None, env)
        env.step(actions)
    far = (env.pos[:, 1] - env.pos.mean(1)).norm(dim=-1)
    assert bool((far > start + 10).all()), (start, far)
    discrete = envs.make("rendezvous-discrete", num_envs=2, seed=3, n_agents=3)
    discrete.reset()
    a = aw.ScriptedAdversary("flee", [0]).act(torch.zeros(2, 3, discrete.obs_dim), None, discrete)
    assert a.shape == (2, 1) and a.dtype == torch.int64


def test_a_disabled_smac_unit_stops_while_alive_and_takes_the_no_op_when_dead():
    """SMAC's no-op is for dead units only; what a disabled unit does comes from the env, given this step's avail."""
    from envs.smac import SMACEnv

    class Stub(SMACEnv):  # no StarCraft II needed: null_action reads only avail (and n_agents, device without it)
        def __init__(self):
            self.n_agents, self.device, self.action_space = 3, torch.device("cpu"), gym.spaces.Discrete(6)

    avail = torch.zeros(2, 3, 6, dtype=torch.bool)
    avail[:, :, 1:] = True  # alive: stop (1) and moves, no no-op
    avail[1, 2] = torch.tensor([True, False, False, False, False, False])  # env 1's unit 2 is dead
    assert aw.nothing_actions(Stub(), avail, 2).tolist() == [[1, 1, 1], [1, 1, 0]]
    lbf = envs.make("lbf:Foraging-8x8-2p-2f-coop-v3", num_envs=2, seed=0)
    assert aw.nothing_actions(lbf, lbf.reset()[2], 2).tolist() == [[0, 0], [0, 0]]  # NONE, whatever avail says


@pytest.mark.parametrize("script", SCRIPTS)
def test_attack_runs_on_every_script(tmp_path, script):
    run(script, tmp_path, *TINY_ENV, *TINY_TRAIN[script])
    ckpt = only(tmp_path / "runs" / "*" / f"{script}.pt")
    out = tmp_path / "report.json"
    # IBAL's attack fits on 50k env steps of the victim's play in the evaluation envs: 64 of them
    # take 16 times fewer Python steps than TINY_ATTACK's 4 (the episodes of this env are short)
    wide = ["--eval-episodes", "64"] if script == "mir3_qmix" else []
    run("attack_worstcase", tmp_path, "--checkpoint", ckpt, "--num-adversaries", "2", *TINY_ATTACK, *wide,
        "--obs-noise", "0.3", "--action-repeat", "0.3", "--disable", "1", "2", "--interaction-breaking",
        "--report", out, "--plot")
    report = json.load(open(out))
    assert report["script"] == script and len(report["adversaries"]) == 2
    assert set(report["conditions"]) >= {"natural", "random", "worstcase", "obs_noise_0.3", "action_repeat_0.3",
                                         "dis_1", "dis_2"}
    if script == "mir3_qmix":  # IBAL's attack (ibal_qmix.py) works on any QMIX checkpoint
        assert "interaction_breaking" in report["conditions"]
    assert os.path.exists(tmp_path / "report.png")


@pytest.fixture(scope="module")
def small_defender(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("small")
    run("mir3_maddpg", cwd, "--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "20",
        *TINY_TRAIN["mir3_maddpg"])
    return only(cwd / "runs" / "*" / "mir3_maddpg.pt")


@pytest.fixture
def bad_files(tmp_path, small_defender):
    """Checkpoints that must be refused, written into the test's working directory."""
    good = torch.load(small_defender, weights_only=True)
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x40" + os.urandom(4094))  # a pickle of unknown protocol 64: torch warns
    torch.save({"script": "my_algo", "models": {}}, tmp_path / "unknown.pt")
    torch.save(dict(good, script="os"), tmp_path / "os.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere.pt"], "checkpoint not found: nowhere.pt"),
    (["--checkpoint", "corrupt.pt"], "is not a readable torch checkpoint"),
    (["--checkpoint", "list.pt"], "holds a list, not a checkpoint dict"),
    (["--checkpoint", "unknown.pt"], "has script 'my_algo'; expected one of mir3_maddpg"),
    (["--checkpoint", "os.pt"], "has script 'os'"),
    (["--checkpoint", "GOOD", "--env-id", "rendezvous-discrete"], "does not match the checkpoint"),
    (["--checkpoint", "GOOD", "--adversaries", "3"], "adversary indices must be distinct agents in [0, 2]"),
    (["--checkpoint", "GOOD", "--num-adversaries", "3"], "--num-adversaries must be in [1, 2]"),
    (["--checkpoint", "GOOD", "--scripted", "dance"], "--scripted 'dance': choose from stop"),
    (["--checkpoint", "GOOD", "--adversary-objective", "self"], "--adversary-objective must be one of team, defenders"),
    (["--checkpoint", "GOOD", "--adversary-objective", "defenders"], "needs per-agent rewards, which 'rendezvous' does"),
], ids=["missing", "corrupt", "not-a-dict", "unknown-script", "script-os", "env-mismatch", "adversary-index",
        "num-adversaries", "scripted-kind", "objective-name", "objective-without-agent-rewards"])
def test_bad_input_exits_with_one_clear_line(bad_files, small_defender, args, message):
    # in this process (seconds saved per case); test_known_script_that_is_not_present refuses in a real subprocess
    proc = run_in_process("attack_worstcase", bad_files, *[small_defender if a == "GOOD" else a for a in args],
                          "--total-timesteps", "0", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_known_script_that_is_not_present(tmp_path, small_defender):
    """A copy of attack_worstcase.py without the training scripts beside it refuses clearly."""
    shutil.copy(os.path.join(ROOT, "attack_worstcase.py"), tmp_path / "attack_worstcase.py")
    proc = run(str(tmp_path / "attack_worstcase.py"), tmp_path, "--checkpoint", small_defender, check=False)
    assert proc.returncode == 2 and "mir3_maddpg.py, which is not present" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --- confidence intervals -------------------------------------------------------------------------

@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (29, 2.0452),
                                         (30, 2.0423), (31, 2.0395), (100, 1.9840), (1000, 1.9623)])
def test_student_t_quantile_matches_tables(df, expected):
    assert aw.student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert aw.student_t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_student_t_quantile_other_levels_and_limit():
    assert aw.student_t_quantile(0.995, 7) == pytest.approx(3.4995, abs=1e-4)
    assert aw.student_t_quantile(0.95, 3) == pytest.approx(2.3534, abs=1e-4)
    assert aw.student_t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-6)  # the normal limit


def test_summarise_uses_student_t_and_wilson():
    c = aw.summarise(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, False]))
    assert c["return_mean"] == 2.0 and c["return_ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert c["returns"] == [1.0, 2.0, 3.0] and c["successes"] == [1, 0, 0] and c["episodes"] == 3
    low, high = c["success_ci95"]  # Wilson, 1 of 3
    assert low == pytest.approx(0.061490, abs=1e-5) and high == pytest.approx(0.792345, abs=1e-5)
    assert aw.wilson_interval(0, 10) == [0.0, pytest.approx(0.277533, abs=1e-5)]
    assert aw.wilson_interval(10, 10) == [pytest.approx(0.722467, abs=1e-5), 1.0]


# --- observation noise relative to each dim's spread ----------------------------------------------

class FakeEnv:
    """2 agents, 3 observation dims: a constant (3.7), a slow ramp (the step), a fast wide one; 40 steps."""

    num_envs, n_agents, n_actions, is_discrete, device, obs_dim = 16, 2, 2, True, torch.device("cpu"), 3

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.table = torch.stack([torch.full((41,), 3.7), torch.arange(41.0), 50.0 * torch.randn(41, generator=g)], -1)

    def observe(self):
        obs = self.table[self.t].expand(self.num_envs, self.n_agents, 3).clone()
        return obs, torch.zeros(self.num_envs, 1), torch.ones(self.num_envs, self.n_agents, 2, dtype=torch.bool)

    def reset(self):
        self.t = 0
        return self.observe()

    def step(self, actions):
        self.t += 1
        E = self.num_envs
        done = torch.full((E,), self.t == 40)
        return (*self.observe(), torch.zeros(E), done, torch.zeros(E, dtype=torch.bool),
                {"success": torch.zeros(E, dtype=torch.bool)})


class Recorder:
    """A defender that plays action 0 and keeps every observation it is shown."""

    def __init__(self):
        self.seen = []

    def init_hidden(self, num_envs):
        return None

    def act(self, obs, avail, hidden):
        self.seen.append(obs.clone())
        return torch.zeros(obs.shape[:2], dtype=torch.int64), hidden


def test_obs_noise_is_sigma_times_each_dims_spread():
    env, spread = FakeEnv(), aw.ObsSpread()
    aw.run_episodes(env, Recorder(), obs_spread=spread)
    scale = spread.scale()
    assert scale[0] == 0.0  # a constant dim: exactly no spread, so no noise
    assert scale[1:].tolist() == pytest.approx(env.table[:40, 1:].double().std(0, unbiased=False).tolist(), rel=1e-5)
    defender = Recorder()
    aw.run_episodes(env, defender, obs_noise=0.5, noise_unit=spread, seed=3)
    noise = torch.stack(defender.seen) - env.table[:40, None, None, :]  # [T, E, N, 3]
    assert bool((noise[..., 0] == 0).all())  # the constant dim stays exactly as observed
    std = noise.flatten(0, 2).std(0)
    assert std[1] / (0.5 * scale[1]) == pytest.approx(1.0, abs=0.06)  # σ is relative, per dim:
    assert std[2] / (0.5 * scale[2]) == pytest.approx(1.0, abs=0.06)  # the two dims differ 4x in spread
    assert scale[2] > 3 * scale[1]


# --- QMIX agents see the actions that were executed -----------------------------------------------

@pytest.fixture(scope="module")
def qmix_checkpoint(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("qmix")
    run("mir3_qmix", cwd, *TINY_ENV, *TINY_TRAIN["mir3_qmix"])
    return torch.load(only(cwd / "runs" / "*" / "mir3_qmix.pt"), weights_only=True)


class StepSpy:
    """Wraps an env: keeps the actions handed to step()."""

    def __init__(self, env):
        self.env, self.executed = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, actions):
        self.executed.append(actions.clone())
        return self.env.step(actions)


class HiddenSpy:
    """Wraps a QMIX policy: keeps the hidden state it is given and the actions it chooses."""

    def __init__(self, policy):
        self.policy, self.hidden_in, self.chosen = policy, [], []

    def init_hidden(self, num_envs):
        return self.policy.init_hidden(num_envs)

    def act(self, obs, avail, hidden):
        self.hidden_in.append(hidden.clone())
        actions, hidden = self.policy.act(obs, avail, hidden)
        self.chosen.append(actions.clone())
        return actions, hidden


@pytest.mark.parametrize("condition", [{"disable_k": 1}, {"repeat_p": 1.0}], ids=["dis-1", "action-repeat-1"])
def test_qmix_last_action_input_is_the_executed_action(qmix_checkpoint, condition):
    import mir3_qmix

    last_action = aw.executed_last_action_fn("mir3_qmix", mir3_qmix)
    assert last_action is mir3_qmix.executed_as_last_action
    assert aw.executed_last_action_fn("mir3_maddpg", None) is None  # no last-action input there
    env = StepSpy(envs.make("rendezvous-discrete", num_envs=8, seed=5, n_agents=3, episode_limit=20))
    defender = HiddenSpy(mir3_qmix.load_policy(qmix_checkpoint))
    aw.run_episodes(env, defender, seed=7, last_action=last_action, **condition)
    A = env.n_actions
    chosen, executed = torch.stack(defender.chosen[:-1]), torch.stack(env.executed[:-1])
    assert bool((chosen != executed).any())  # the condition did override some choices
    seen_last = torch.stack(defender.hidden_in[1:])[..., -A:]  # the last-action input at t + 1
    assert torch.equal(seen_last, F.one_hot(executed, A).float())


# --- environment shift and --env-kwargs ------------------------------------------------------------

@pytest.fixture(scope="module")
def quads_defender(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quads")
    run("mir3_maddpg", cwd, "--env-id", "quads-same-goal", "--n-agents", "2", "--episode-limit", "30",
        *TINY_TRAIN["mir3_maddpg"])
    return only(cwd / "runs" / "*" / "mir3_maddpg.pt")


QUADS_EVAL = ["--total-timesteps", "0", "--eval-episodes", "4", "--hidden-dim", "16"]


def test_env_shift_evaluates_the_team_in_the_shifted_env(tmp_path, quads_defender):
    run("attack_worstcase", tmp_path, "--checkpoint", quads_defender, *QUADS_EVAL,
        "--env-shift", '{"thrust_scale": 0.7}', "--report", tmp_path / "shift.json")
    shifted = json.load(open(tmp_path / "shift.json"))
    c = shifted["conditions"]
    assert list(c) == ["natural", "random", "worstcase", "env_shift"]
    assert c["env_shift"]["env_shift"] == {"thrust_scale": 0.7} and "env_shift" not in c["natural"]
    assert c["env_shift"]["returns"] != c["natural"]["returns"]  # weaker motors change every episode
    # --env-kwargs sets the same option for every condition: its natural episodes are the shifted ones
    run("attack_worstcase", tmp_path / "kw", "--checkpoint", quads_defender, *QUADS_EVAL,
        "--env-kwargs", '{"thrust_scale": 0.7}', "--report", tmp_path / "kwargs.json")
    weak = json.load(open(tmp_path / "kwargs.json"))
    assert weak["env_kwargs"] == {"n_agents": 2, "episode_limit": 30, "thrust_scale": 0.7}
    assert weak["conditions"]["natural"]["returns"] == pytest.approx(c["env_shift"]["returns"], abs=1e-6)
    adv = torch.load(only(tmp_path / "kw" / "runs" / "*" / "attack_worstcase.pt"), weights_only=True)
    assert adv["env_kwargs"]["thrust_scale"] == 0.7  # the adversary's env too


def test_env_shift_default_is_the_envs_own(tmp_path, quads_defender):
    if not callable(getattr(envs, "env_shift_kwargs", None)):
        pytest.skip("this envs package has no env_shift_kwargs()")
    run("attack_worstcase", tmp_path, "--checkpoint", quads_defender, *QUADS_EVAL, "--env-shift", "default",
        "--report", tmp_path / "r.json")
    c = json.load(open(tmp_path / "r.json"))["conditions"]
    assert c["env_shift"]["env_shift"] == envs.env_shift_kwargs("quads-same-goal")


# --- quadrotor task measures --------------------------------------------------------------------

class InfoSpy(StepSpy):
    """Wraps an env: keeps the info of every step."""

    def __init__(self, env):
        super().__init__(env)
        self.infos = []

    def step(self, actions):
        out = self.env.step(actions)
        self.infos.append(out[-1])
        return out


class MotorsOff:
    """A quadrotor defender whose drones cut their motors (they fall to the floor)."""

    def init_hidden(self, num_envs):
        return None

    def act(self, obs, avail, hidden):
        return torch.full((*obs.shape[:2], 4), -1.0), hidden


def test_quads_task_measures_are_the_defenders_own():
    """The measures count the drones the team's policy flies: here they fall to the floor, while the hovering
    adversary (drone 0) mostly stays in the air (open-loop hover drifts); under Dis-1 the disabled drones are left out."""
    env = InfoSpy(envs.make("quads-same-goal", num_envs=4, seed=3, n_agents=3, episode_limit=200))
    returns, _, _, task = aw.run_episodes(env, MotorsOff(), aw.ScriptedAdversary("stop", [0]), [0], seed=1)
    last = env.infos[-1]
    assert task["on_floor"] == 1.0 and last["on_floor"][:, 0].float().mean() < 0.5  # drone 0 hovers (mostly)
    assert task["final_dist"] == pytest.approx(last["dist"][:, 1:].mean().item(), rel=1e-6)
    assert task["within_radius"] == pytest.approx((last["dist"][:, 1:] < 0.5).float().mean().item())
    own = torch.stack([i["agent_rewards"] for i in env.infos]).sum(0)  # [E, N]
    assert task["defender_return"] == pytest.approx(own[:, 1:].mean().item(), rel=1e-5)
    assert returns.mean().item() == pytest.approx(own.mean().item(), rel=1e-5)  # the team's: all drones
    assert task["collisions"] == pytest.approx(torch.stack([i["n_collisions"] for i in env.infos]).sum(0).float().mean()
                                               .item())
    env.infos.clear()
    _, _, _, dis = aw.run_episodes(env, MotorsOff(), disable_k=1, seed=1)  # the disabled drone gets the hover command
    disabled = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)).argsort(1).argsort(1) < 1  # run_episodes' draw
    final = torch.stack([i["dist"] for i in env.infos])[-1]
    assert dis["final_dist"] == pytest.approx(final[~disabled].mean().item(), rel=1e-6)
    assert dis["final_dist"] != pytest.approx(final.mean().item(), rel=1e-3)
    assert aw.run_episodes(FakeEnv(), Recorder())[3] == {}  # envs without these infos: no measures


# --- the adversary's objective ----------------------------------------------------------------------

PAYOFF = os.path.join(ROOT, "tests", "payoff_game.py")  # runs a script with the env "payoff" registered
PAYOFF_ATTACK = [os.path.join(ROOT, "attack_worstcase.py"), "--total-timesteps", "2048", "--num-envs", "16",
                 "--num-steps", "16", "--eval-interval", "0", "--eval-episodes", "4", "--hidden-dim", "16"]


def test_defenders_objective_spares_the_adversarys_own_reward(tmp_path):
    """The known answers of tests/payoff_game.py: minimising the team reward, the adversary on agent 0 takes the action
    that costs itself 2 and gives agent 1 0.5 (team return -7.5); minimising agent 1's reward, the one that costs agent
    1 0.5 (team return -2.5). A re-evaluation keeps the objective the adversary was trained for and refuses another."""
    run(PAYOFF, tmp_path, os.path.join(ROOT, "mir3_mappo.py"), "--env-id", "payoff", *TINY_TRAIN["mir3_mappo"])
    defender = only(tmp_path / "runs" / "*" / "mir3_mappo.pt")
    for objective, expected in [("team", -7.5), ("defenders", -2.5)]:
        run(PAYOFF, tmp_path / objective, *PAYOFF_ATTACK, "--checkpoint", defender, "--adversary-objective", objective,
            "--report", tmp_path / f"{objective}.json")
        report = json.load(open(tmp_path / f"{objective}.json"))
        assert report["adversary_objective"] == objective
        assert report["conditions"]["worstcase"]["return_mean"] == pytest.approx(expected, abs=1e-5), objective
    adversary = only(tmp_path / "defenders" / "runs" / "*" / "attack_worstcase.pt")
    run(PAYOFF, tmp_path, *PAYOFF_ATTACK, "--adversary-checkpoint", adversary, "--report", tmp_path / "again.json")
    again = json.load(open(tmp_path / "again.json"))
    assert again["adversary_objective"] == "defenders" and again["conditions"]["worstcase"]["return_mean"] == -2.5
    proc = run(PAYOFF, tmp_path, *PAYOFF_ATTACK, "--adversary-checkpoint", adversary, "--adversary-objective", "team",
               check=False)
    assert proc.returncode == 2 and "differs from the adversary checkpoint's defenders" in proc.stderr, proc.stderr
