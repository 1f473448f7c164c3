"""--resume of mir3_maddpg.py, mir3_mappo.py, mir3_qmix.py and ibal_qmix.py: a run continues from its checkpoint
(the one saved at the end, every --save-interval steps or on SIGTERM) to a raised --total-timesteps, and refuses
checkpoints it cannot continue.
"""

import glob
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import envs
import helpers
import ibal_qmix
import mir3_maddpg
import mir3_mappo
import mir3_qmix

MADDPG = ["--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "20", "--num-envs", "4",
          "--learning-starts", "160", "--batch-size", "2", "--eval-interval", "240", "--eval-episodes", "3",
          "--hidden-dim", "16", "--club-hidden-dim", "16", "--buffer-size", "2000", "--mi-coef", "0.05"]
# episodes of 16 steps = one rollout: every env starts a new episode at each rollout boundary
MAPPO = ["--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "16", "--num-envs", "4", "--num-steps", "16",
         "--num-minibatches", "2", "--update-epochs", "2", "--eval-interval", "64", "--eval-episodes", "3",
         "--hidden-dim", "16", "--club-hidden-dim", "16", "--club-batch-size", "32", "--club-steps", "2",
         "--mi-coef", "0.05"]
# episodes of 20 steps end together in all 4 envs: every 80 steps 4 episodes end, and with --updates-per-episode 1
# each boundary from --learning-starts on trains 4 updates
QMIX = ["--env-id", "rendezvous-discrete", "--n-agents", "3", "--episode-limit", "20", "--num-envs", "4",
        "--learning-starts", "160", "--batch-size", "2", "--eval-interval", "240", "--eval-episodes", "3",
        "--hidden-dim", "16", "--club-hidden-dim", "16", "--buffer-size", "2000", "--mi-coef", "0.05",
        "--target-update-interval", "17"]
IBAL = ["--env-id", "rendezvous-discrete", "--n-agents", "4", "--episode-limit", "20", "--num-envs", "4",
        "--learning-starts", "160", "--batch-size", "2", "--eval-interval", "240", "--eval-episodes", "3",
        "--hidden-dim", "16", "--buffer-size", "2000", "--obs-model-hidden-dim", "16", "--act-model-hidden-dim", "16",
        "--estimator-batch-size", "32", "--warmup-fraction", "0.6"]
FLAGS = {"mir3_maddpg": MADDPG, "mir3_mappo": MAPPO, "mir3_qmix": QMIX, "ibal_qmix": IBAL}
MODULES = {"mir3_maddpg": mir3_maddpg, "mir3_mappo": mir3_mappo, "mir3_qmix": mir3_qmix, "ibal_qmix": ibal_qmix}


def checkpoint_path(cwd, script) -> str:
    return helpers.only(os.path.join(cwd, "runs", "*", f"{script}.pt"))


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def eval_lines(stdout) -> list:
    return re.findall(r"^global_step=\d+ eval_return=.*$", stdout, re.M)


def test_maddpg_resume_refills_the_buffer_then_continues(tmp_path):
    """480 steps, then --resume to 960 in the same directory: the log starts at 480, evaluates next at 720 (the
    eval bookkeeping continues) and last at 960; flags not given (λ) come from the checkpoint and a model flag
    given with the checkpoint's value is accepted. The resumed run learns only after --learning-starts fresh
    steps: its steps 640-960 train as many updates as the first run's 160-480 (without the refill, steps 484-960
    would give about 1.5 times as many), and its optimiser states continue (Adam's step count of the critic
    equals the updates of both runs)."""
    helpers.run_script("mir3_maddpg", tmp_path, *MADDPG, "--total-timesteps", "480")
    path = checkpoint_path(tmp_path, "mir3_maddpg")
    saved = load(path)
    proc = helpers.run_script("mir3_maddpg", tmp_path, "--resume", path, "--total-timesteps", "960",
                              "--hidden-dim", "16")
    assert f"resuming {path} at global_step=480:" in proc.stdout, proc.stdout
    assert eval_lines(proc.stdout)[0].startswith("global_step=720 ")
    assert eval_lines(proc.stdout)[-1].startswith("global_step=960 ")
    assert checkpoint_path(tmp_path, "mir3_maddpg") == path  # the same run directory, the checkpoint replaced
    assert len(glob.glob(os.path.join(os.path.dirname(path), "events.out.tfevents.*"))) == 2
    final = load(path)
    assert final["global_step"] == 960 and final["args"]["mi_coef"] == 0.05
    updates = final["continuation"]["counters"]["updates"]
    assert saved["continuation"]["counters"]["updates"] == 1296 and updates == 2 * 1296
    assert final["continuation"]["optimizers"]["critic"]["state"][0]["step"].item() == updates
    mir3_maddpg.load_policy(final)


def test_mappo_resume_at_a_rollout_boundary_is_bit_identical(tmp_path):
    """128 steps (2 rollouts), then --resume to 256, equals one run of 256 steps bit for bit: weights (with the
    RunningNorm statistics), optimiser states and the evaluations. It holds because the RNG states, counters
    and the envs' episode counters are restored and every episode ends at the rollout boundary (an env in
    mid-episode restarts with a new one). --no-anneal-lr: an annealed run's schedule depends on the total."""
    args = [*MAPPO, "--no-anneal-lr"]
    helpers.run_script("mir3_mappo", tmp_path / "a", *args, "--total-timesteps", "128")
    path = checkpoint_path(tmp_path / "a", "mir3_mappo")
    resumed = helpers.run_script("mir3_mappo", tmp_path / "a", "--resume", path, "--total-timesteps", "256")
    whole = helpers.run_script("mir3_mappo", tmp_path / "b", *args, "--total-timesteps", "256")
    assert f"resuming {path} at global_step=128, iteration 3 of 4" in resumed.stdout, resumed.stdout
    assert eval_lines(resumed.stdout) == eval_lines(whole.stdout)[2:]  # the evaluations at 192 and 256
    a, b = load(path), load(checkpoint_path(tmp_path / "b", "mir3_mappo"))
    assert a["global_step"] == b["global_step"] == 256 and a["args"]["mi_coef"] == 0.05
    for net in ("actor", "critic", "club"):
        for k in b["models"][net]:
            assert torch.equal(a["models"][net][k], b["models"][net][k]), (net, k)
    for name, opt in b["continuation"]["optimizers"].items():
        for i, state in opt["state"].items():
            for k, v in state.items():
                assert torch.equal(a["continuation"]["optimizers"][name]["state"][i][k], v), (name, i, k)
    mir3_mappo.load_policy(a)


def adam_steps(ckpt) -> dict:
    """{optimiser name: Adam's step count of its first parameter}."""
    return {name: opt["state"][0]["step"].item() for name, opt in ckpt["continuation"]["optimizers"].items()}


def test_qmix_resume_refills_the_buffer_then_continues(tmp_path):
    """480 steps, then --resume to 800: the log starts at 480 and evaluates at 720 and 800; λ comes from the
    checkpoint. Learning waits for --learning-starts fresh steps: steps 640-800 train 12 updates (3 boundaries of
    4 episodes; without the refill 16). The optimiser states (QMIX and CLUB), the target networks (copied at update
    17 only: the resumed run's updates 21-32 copy nothing) and the reward statistics (one count per env step)
    continue."""
    helpers.run_script("mir3_qmix", tmp_path, *QMIX, "--total-timesteps", "480")
    path = checkpoint_path(tmp_path, "mir3_qmix")
    saved = load(path)
    proc = helpers.run_script("mir3_qmix", tmp_path, "--resume", path, "--total-timesteps", "800",
                              "--hidden-dim", "16")
    assert f"resuming {path} at global_step=480:" in proc.stdout, proc.stdout
    assert [line.split()[0] for line in eval_lines(proc.stdout)] == ["global_step=720", "global_step=800"]
    assert checkpoint_path(tmp_path, "mir3_qmix") == path
    assert len(glob.glob(os.path.join(os.path.dirname(path), "events.out.tfevents.*"))) == 2
    final = load(path)
    assert final["global_step"] == 800 and final["args"]["mi_coef"] == 0.05
    assert saved["continuation"]["counters"]["updates"] == 20 and final["continuation"]["counters"]["updates"] == 32
    assert adam_steps(saved) == {"qmix": 20, "club": 20} and adam_steps(final) == {"qmix": 32, "club": 32}
    for net in ("agent", "mixer"):
        saved_target, target = saved["continuation"]["targets"][net], final["continuation"]["targets"][net]
        assert all(torch.equal(saved_target[k], target[k]) for k in target), net
        assert any(not torch.equal(final["models"][net][k], target[k]) for k in target), net
    assert final["continuation"]["norms"]["reward_count"] == pytest.approx(800, abs=0.01)
    mir3_qmix.load_policy(final)


def test_ibal_resume_continues_the_attack_curriculum(tmp_path):
    """480 steps (warm-up 0.6 · 480 = 288), then --resume to 960: the warm-up still ends at 288 (not 0.6 · 960),
    so the resumed run's episodes are all attacked and the curriculum's window of attacked episodes grows from 8
    (those ending at 400 and 480) by 24 (six boundaries of 4 episodes). Evaluations, clean and attacked, run at
    720 and 960; updates, the optimisers of QMIX and of both estimators, and the running statistics continue."""
    helpers.run_script("ibal_qmix", tmp_path, *IBAL, "--total-timesteps", "480")
    path = checkpoint_path(tmp_path, "ibal_qmix")
    saved = load(path)
    proc = helpers.run_script("ibal_qmix", tmp_path, "--resume", path, "--total-timesteps", "960")
    assert f"resuming {path} at global_step=480:" in proc.stdout and "attacks both after 288 steps" in proc.stdout
    lines = eval_lines(proc.stdout)
    assert [line.split()[0] for line in lines] == ["global_step=720", "global_step=960"], proc.stdout
    assert all(" attacked_return=" in line for line in lines)
    assert checkpoint_path(tmp_path, "ibal_qmix") == path
    final = load(path)
    assert final["global_step"] == 960 and set(final["models"]) == {"agent", "mixer", "attacker"}
    assert len(saved["continuation"]["curriculum"]["recent"]) == 8
    assert len(final["continuation"]["curriculum"]["recent"]) == 32
    assert saved["continuation"]["counters"]["updates"] == 20 and final["continuation"]["counters"]["updates"] == 40
    assert adam_steps(final) == {"qmix": 40, "obs_model": 40, "action_model": 40}
    norms = final["continuation"]["norms"]
    assert norms["reward_count"] == pytest.approx(960, abs=0.01)
    assert norms["next_obs_count"] == pytest.approx(960 * 4, abs=0.01)  # one row per agent and env step
    ibal_qmix.load_policy(final)


def start(cwd, script, *args):
    """Start a long training run; returns the process once it printed its first progress line."""
    os.makedirs(cwd, exist_ok=True)
    proc = subprocess.Popen([sys.executable, os.path.join(helpers.ROOT, f"{script}.py"), *args], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=helpers.ROOT, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("global_step="):
            return proc
    raise AssertionError(f"no progress line: {proc.stderr.read()}")


@pytest.mark.parametrize("script", ["mir3_maddpg", "mir3_mappo", "mir3_qmix", "ibal_qmix"])
def test_sigterm_checkpoint_resumes(tmp_path, script):
    """A run stopped by SIGTERM after its first progress line saves a checkpoint that --resume continues from
    its step S to 2S (evaluating there, with --eval-interval changed on resume); mir3_mappo's is the state after
    its last completed update, a rollout boundary, the others' may be in mid-episode."""
    extra = ["--learning-starts", "0"] if script == "mir3_maddpg" else []
    proc = start(tmp_path, script, *FLAGS[script], *extra, "--total-timesteps", "100000000", "--eval-interval", "0")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "checkpoint saved to " in out, (out, err)
    path = checkpoint_path(tmp_path, script)
    saved = load(path)
    step = saved["global_step"]
    if script == "mir3_mappo":
        assert step > 0 and step == 64 * saved["continuation"]["counters"]["iteration"]
    resumed = helpers.run_script(script, tmp_path, "--resume", path, "--total-timesteps", 2 * step,
                                 "--eval-interval", 10**6)
    assert f"resuming {path} at global_step={step}" in resumed.stdout, resumed.stdout
    assert eval_lines(resumed.stdout) and eval_lines(resumed.stdout)[-1].startswith(f"global_step={2 * step} ")
    final = load(path)
    assert final["global_step"] == 2 * step and final["args"]["eval_interval"] == 10**6
    MODULES[script].load_policy(final)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """finished(script): the path of the checkpoint of a finished run of 64 steps (made on first use)."""
    paths = {}

    def path(script):
        if script not in paths:
            cwd = tmp_path_factory.mktemp(script)
            extra = ["--learning-starts", "0"] if script == "mir3_maddpg" else []
            helpers.run_script(script, cwd, *FLAGS[script], *extra, "--total-timesteps", "64", "--eval-interval", "0")
            paths[script] = checkpoint_path(cwd, script)
        return paths[script]

    return path


OTHER = {"mir3_maddpg": "mir3_mappo", "mir3_mappo": "mir3_maddpg", "mir3_qmix": "ibal_qmix", "ibal_qmix": "mir3_qmix"}
OTHER_ENV = {"rendezvous": "rendezvous-discrete", "rendezvous-discrete": "rendezvous"}
REFUSALS = {  # case: (change of the checkpoint, given the script, or None; flags; the message)
    "wrong-script": (lambda ckpt, script: ckpt.update(script=OTHER[script]), [],
                     "{path} is not a {script} checkpoint (script: '{other}')"),
    "old": (lambda ckpt, script: ckpt.pop("continuation"), [], "{path} holds no continuation state"),
    "done": (None, ["--total-timesteps", "64"], "{path} is already at global_step=64 >= --total-timesteps 64"),
    "model-flag": (None, ["--hidden-dim", "32"], "--hidden-dim 32 differs from the checkpoint's 16"),
    "env-flag": (None, ["--env-id", "{other_env}"], "--env-id {other_env} differs from the checkpoint's {env}"),
    "spaces": (lambda ckpt, script: ckpt.update(obs_dim=99), [], "{path}: {env} now has obs_dim {obs_dim}, the checkpoint 99"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("script", ["mir3_maddpg", "mir3_mappo", "mir3_qmix", "ibal_qmix"])
def test_resume_refuses_with_one_line(tmp_path, finished, script, case):
    """Another script's checkpoint, one without the continuation state (an old checkpoint: load_policy still takes
    it), one already at --total-timesteps, a model or env flag other than the checkpoint's, a checkpoint whose
    env no longer matches: one line on stderr, exit 2, nothing written."""
    change, flags, message = REFUSALS[case]
    path = finished(script)
    env = FLAGS[script][FLAGS[script].index("--env-id") + 1]
    names = {"script": script, "other": OTHER[script], "env": env, "other_env": OTHER_ENV[env],
             "obs_dim": load(path)["obs_dim"]}
    flags = [flag.format(**names) for flag in flags]
    if change is not None:  # an edited copy
        ckpt = load(path)
        change(ckpt, script)
        path = str(tmp_path / "edited.pt")
        torch.save(ckpt, path)
        if case == "old":
            MODULES[script].load_policy(ckpt)
    before = sorted(os.listdir(os.path.dirname(path)))
    # in this process (seconds saved per case), but for one case in a real subprocess
    run = helpers.run_script if (script, case) == ("mir3_maddpg", "done") else helpers.run_in_process
    proc = run(script, tmp_path, "--resume", path, "--total-timesteps", "1000", *flags, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message.format(path=path, **names) in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --resume ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(os.listdir(os.path.dirname(path))) == before


@pytest.mark.parametrize("module", list(MODULES.values()), ids=list(MODULES))
def test_rng_state_round_trip(tmp_path, module):
    """rng_state survives torch.save / torch.load(weights_only=True) and set_rng_state replays the same draws
    of torch and numpy."""
    cpu = torch.device("cpu")
    torch.save(module.rng_state(cpu), tmp_path / "rng.pt")
    draws = torch.rand(5), np.random.rand(5), np.random.randn(3)
    module.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), cpu)
    again = torch.rand(5), np.random.rand(5), np.random.randn(3)
    assert torch.equal(draws[0], again[0])
    assert np.array_equal(draws[1], again[1]) and np.array_equal(draws[2], again[2])


def test_episodes_started_counts_played_episodes():
    """Only episodes with a played step count: a just auto-reset env (t = 0) has not started its new one."""
    env = envs.make("rendezvous", num_envs=2, seed=0, n_agents=2, episode_limit=3)
    env.reset()
    assert mir3_maddpg.episodes_started(env).tolist() == [0, 0]
    for steps in range(1, 7):
        env.step(torch.zeros(2, 2, 2))
        assert mir3_maddpg.episodes_started(env).tolist() == [(steps + 2) // 3] * 2
