"""attack_worstcase.py refuses what would give meaningless numbers, and stops cleanly on signals:
broken checkpoints, bad flags and unwritable outputs are one line and exit code 2 at start-up;
SIGTERM / SIGUSR1 save the adversary during training and write a partial report during evaluation."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import attack_worstcase as aw
from helpers import ROOT, only, run_in_process
from helpers import run_script as run


@pytest.fixture(scope="module")
def defender(tmp_path_factory):
    """A tiny (seconds) mir3_maddpg checkpoint on a 3-robot, 20-step rendezvous."""
    cwd = tmp_path_factory.mktemp("defender")
    run("mir3_maddpg", cwd, "--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "20",
        "--total-timesteps", "320", "--learning-starts", "160", "--num-envs", "4", "--batch-size", "4",
        "--eval-interval", "0", "--hidden-dim", "16", "--club-hidden-dim", "16", "--buffer-size", "2000")
    return only(cwd / "runs" / "*" / "mir3_maddpg.pt")


@pytest.fixture
def workdir(tmp_path, defender):
    """Broken checkpoints, and a plain file where a directory is expected, in the test's directory."""
    good = torch.load(defender, weights_only=True)
    nan = torch.load(defender, weights_only=True)
    name = next(iter(nan["models"]["actor"]))
    nan["models"]["actor"][name][0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(dict(good, env_kwargs=[1, 2]), tmp_path / "kwargs-list.pt")
    torch.save(dict(good, env_kwargs={"n_agents": 3, "no_such_option": 1}), tmp_path / "kwargs-unknown.pt")
    (tmp_path / "afile").write_text("not a directory")
    return tmp_path, name


REFUSED = [
    (["--checkpoint", "nan.pt"], "has non-finite values (NaN or inf) in models.actor."),
    (["--checkpoint", "empty.pt"], "checkpoint empty.pt is empty"),
    (["--checkpoint", "kwargs-list.pt"], "has a malformed env_id / env_kwargs"),
    (["--checkpoint", "kwargs-unknown.pt"], "bad option for env 'rendezvous'"),
    (["--env-kwargs", '{"no_such_option": 1}'], "bad option for env 'rendezvous'"),
    (["--env-kwargs", "[1, 2]"], "--env-kwargs must be a JSON object"),
    (["--env-kwargs", "{episode_limit: 5}"], "--env-kwargs must be a JSON object"),
    (["--env-kwargs", '{"episode_limit": -5}'],
     "cannot build env 'rendezvous' from the checkpoint's env_kwargs and --env-kwargs"),
    (["--env-shift", '{"no_such_option": 1}'], "--env-shift {\"no_such_option\": 1} on 'rendezvous'"),
    (["--env-shift", "0.7"], "--env-shift must be a JSON object"),
    (["--env-shift", '{"n_agents": 4}'], "--env-shift {\"n_agents\": 4} changes n_agents"),
    (["--report", "afile/report.json"], "the directory of --report"),
    (["--report", "."], "is a directory"),
    (["--eval-episodes", "1"], "--eval-episodes must be >= 2"),
    (["--exp-name", "a/b"], "--exp-name must be 1-100 characters"),
    (["--exp-name", ".."], "--exp-name must be 1-100 characters"),
    (["--exp-name", ""], "--exp-name must be 1-100 characters"),
    (["--exp-name", "x" * 101], "--exp-name must be 1-100 characters"),
    (["--learning-rate", "nan"], "--learning-rate must be finite and > 0"),
    (["--learning-rate", "0"], "--learning-rate must be finite and > 0"),
    (["--gamma", "1.5"], "--gamma must be finite and in [0, 1]"),
    (["--gae-lambda", "inf"], "--gae-lambda must be finite and in [0, 1]"),
    (["--clip-coef", "-0.2"], "--clip-coef must be finite and > 0"),
    (["--ent-coef", "nan"], "--ent-coef must be finite and >= 0"),
    (["--vf-coef", "-inf"], "--vf-coef must be finite and >= 0"),
    (["--max-grad-norm", "inf"], "--max-grad-norm must be finite and > 0"),
    (["--obs-noise", "0.1", "nan"], "--obs-noise must be finite and >= 0"),
    (["--action-repeat", "nan"], "--action-repeat must lie in [0, 1]"),
    (["--action-repeat", "inf"], "--action-repeat must lie in [0, 1]"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[" ".join(a)[:40] for a, _ in REFUSED])
def test_refused_at_startup_with_one_line(workdir, defender, args, message):
    cwd, _ = workdir
    checkpoint = [] if "--checkpoint" in args else ["--checkpoint", defender]
    # in this process (seconds saved per case); the two tests below refuse in a real subprocess
    proc = run_in_process("attack_worstcase", cwd, *checkpoint, *args, "--total-timesteps", "0", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "report written" not in proc.stdout and "SPS=" not in proc.stdout


def test_non_finite_message_names_the_tensor(workdir):
    cwd, name = workdir
    proc = run("attack_worstcase", cwd, "--checkpoint", "nan.pt", check=False)
    assert proc.returncode == 2 and f"models.actor.{name}" in proc.stderr, proc.stderr


def test_unwritable_runs_directory_is_refused(tmp_path, defender):
    (tmp_path / "runs").write_text("a file where the run directory should be")
    proc = run("attack_worstcase", tmp_path, "--checkpoint", defender, "--total-timesteps", "0",
               "--report", tmp_path / "out" / "r.json", check=False)
    assert proc.returncode == 2 and "the run directory 'runs' is not writable" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "SPS=" not in proc.stdout


def test_a_signal_during_a_save_waits_for_it():
    """The first stop signal raises KeyboardInterrupt carrying its number (the exit code is 128 + it); from then on
    Ctrl-C, SIGTERM and SIGUSR1 are ignored, so that a second one never cuts the save short."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        aw.stop_on_signals()
        with pytest.raises(KeyboardInterrupt) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)  # outside a save: stops the run like Ctrl-C
            for _ in range(1000):  # the handler runs between two bytecodes
                pass
        assert stopped.value.args == (signal.SIGTERM,)
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in saved)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while saving: ignored, not raised
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def start(cwd, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "attack_worstcase.py"), *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_after(proc, marker, signum, timeout=300):
    """Read stdout until a line contains ``marker``, send ``signum``, wait; returns (stdout, stderr)."""
    lines, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(signum)
                break
            assert time.time() < deadline, "".join(lines)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines) + out, err


def test_sigterm_saves_the_adversary_and_sigusr1_writes_a_partial_report(tmp_path, defender):
    # during training: SIGTERM (a scheduler's preemption notice) saves the adversary and exits 143
    proc = start(tmp_path, "--checkpoint", defender, "--total-timesteps", "100000000", "--num-envs", "4",
                 "--num-steps", "16", "--eval-interval", "0", "--hidden-dim", "16")
    out, err = signal_after(proc, "global_step=", signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in err and "adversary saved to" in out, out + err
    path = only(tmp_path / "runs" / "*" / "attack_worstcase.pt")
    assert f"adversary saved to {os.path.relpath(path, tmp_path)}" in out
    adv = torch.load(path, weights_only=True)
    assert adv["script"] == "attack_worstcase" and adv["global_step"] > 0 and set(adv["models"]) == {"actor", "value"}

    # during the final evaluation: SIGUSR1 writes the conditions finished so far, marked partial; the
    # env_shift condition (a million-step episode) is the one still running when the signal comes
    report = tmp_path / "partial.json"
    proc = start(tmp_path, "--adversary-checkpoint", path, "--eval-episodes", "2", "--report", report,
                 "--env-shift", '{"episode_limit": 1000000}')
    out, err = signal_after(proc, "evaluated worstcase", signal.SIGUSR1)
    assert proc.returncode == 128 + signal.SIGUSR1, out + err
    assert "Traceback" not in err and "partial report (3 of 4 conditions)" in out and path in out, out + err
    partial = json.load(open(report))
    assert partial["partial"] is True and list(partial["conditions"]) == ["natural", "random", "worstcase"]
