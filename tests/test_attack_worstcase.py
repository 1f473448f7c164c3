"""attack_worstcase.py: the trained adversary beats a random one, every script's checkpoints,
report schema, re-evaluation from the adversary checkpoint, plots, bad input."""

import glob
import json
import os
import shutil

import pytest
import torch

from helpers import ROOT, only
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
    assert set(report) == {"checkpoint", "script", "env_id", "adversaries", "conditions"}
    assert report["checkpoint"] == defender and report["script"] == "mir3_maddpg"
    assert report["env_id"] == "rendezvous" and report["adversaries"] == [0]
    assert list(report["conditions"]) == ["natural", "random", "worstcase", *DISTURBANCES]
    for name, c in report["conditions"].items():
        assert set(c) == {"return_mean", "return_ci95", "success_rate", "episodes"}
        assert isinstance(c["return_mean"], float) and isinstance(c["return_ci95"], float)
        assert isinstance(c["success_rate"], float) and type(c["episodes"]) is int
        assert c["episodes"] == 128 and c["return_ci95"] > 0 and 0.0 <= c["success_rate"] <= 1.0
        assert name in stdout  # the printed table
    run_dir = os.path.dirname(only(cwd / "runs" / "*attack_worstcase*" / "report.json"))
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    adv = torch.load(os.path.join(run_dir, "attack_worstcase.pt"), weights_only=True)
    assert adv["script"] == "attack_worstcase" and adv["adversaries"] == [0]
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
        assert again["conditions"][name] == pytest.approx(report["conditions"][name], abs=1e-9)


@pytest.mark.parametrize("script", SCRIPTS)
def test_attack_runs_on_every_script(tmp_path, script):
    run(script, tmp_path, *TINY_ENV, *TINY_TRAIN[script])
    ckpt = only(tmp_path / "runs" / "*" / f"{script}.pt")
    out = tmp_path / "report.json"
    run("attack_worstcase", tmp_path, "--checkpoint", ckpt, "--num-adversaries", "2", *TINY_ATTACK,
        "--obs-noise", "0.3", "--action-repeat", "0.3", "--disable", "1", "2", "--interaction-breaking",
        "--report", out, "--plot")
    report = json.load(open(out))
    assert report["script"] == script and len(report["adversaries"]) == 2
    assert set(report["conditions"]) >= {"natural", "random", "worstcase", "obs_noise_0.3", "action_repeat_0.3",
                                         "dis_1", "dis_2"}
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
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(4096))
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
], ids=["missing", "corrupt", "not-a-dict", "unknown-script", "script-os", "env-mismatch", "adversary-index",
        "num-adversaries"])
def test_bad_input_exits_with_one_clear_line(bad_files, small_defender, args, message):
    proc = run("attack_worstcase", bad_files, *[small_defender if a == "GOOD" else a for a in args],
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
