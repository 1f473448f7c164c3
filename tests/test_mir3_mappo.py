"""mir3_mappo.py: smoke runs, checkpoint round trip, determinism, bad input, signals, divergence, learning.

The MIR3 penalty itself (exact rollout rewards, and its effect on what is learned) is checked in
test_mi_penalty.py.
"""

import functools
import glob
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import envs
import helpers
from envs.rendezvous import scripted_actions
from mir3_mappo import DEFAULT_ENV_KWARGS, RunningNorm, load_policy, stop_on_signals
from test_mi_penalty import run_on_context

TINY = ["--total-timesteps", "128", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "2", "--eval-interval", "64", "--eval-episodes", "3", "--hidden-dim", "16",
        "--club-hidden-dim", "16", "--club-batch-size", "32", "--club-steps", "2"]


run_script = functools.partial(helpers.run_script, "mir3_mappo")
run_in_process = functools.partial(helpers.run_in_process, "mir3_mappo")
checkpoint_of = functools.partial(helpers.checkpoint_of, exp_name="mir3_mappo")


SMALL = ["--n-agents", "2", "--episode-limit", "12"]
SMOKE = [
    ("rendezvous", ["--n-agents", "3", "--episode-limit", "12"]),
    ("rendezvous-discrete", ["--n-agents", "3", "--episode-limit", "12", "--rnn", "--mi-estimator", "vub"]),
    ("quads-same-goal", [*SMALL, "--mi-estimator", "l1out"]),
    ("quads-swarm-vs-swarm", [*SMALL, "--rnn", "--mi-estimator", "club-sample"]),
    ("quads-same-goal-discrete", SMALL),
    ("quads-swarm-vs-swarm-discrete", SMALL),
    ("lbf:Foraging-5x5-2p-1f-v3", []),
]


@pytest.mark.parametrize("env_id,extra", SMOKE, ids=[f"{e}{'-rnn' if '--rnn' in x else ''}" for e, x in SMOKE])
def test_smoke_and_checkpoint_round_trip(tmp_path, env_id, extra):
    proc = run_script(tmp_path, "--env-id", env_id, *TINY, *extra)
    assert re.search(r"global_step=\d+ eval_return=-?[\d.]+ eval_success=[\d.]+", proc.stdout)
    ckpt = checkpoint_of(tmp_path)
    assert ckpt["script"] == "mir3_mappo" and ckpt["env_id"] == env_id and ckpt["global_step"] >= 128
    assert set(ckpt["models"]) >= {"actor", "critic", "club"}
    assert glob.glob(os.path.join(tmp_path, "runs", "*", "events.out.tfevents.*"))
    env = envs.make(env_id, num_envs=2, seed=7, **ckpt["env_kwargs"])
    policy = load_policy(ckpt, "cpu")
    assert not any(p.requires_grad for p in policy.actor.parameters())
    obs, _, avail = env.reset()
    hidden = policy.init_hidden(2)
    assert (hidden is None) == ("--rnn" not in extra)
    for _ in range(3):
        actions, new_hidden = policy.act(obs, avail, hidden)
        out, _ = policy.actor(obs, hidden)  # deterministic action = mode of the policy distribution
        if env.is_discrete:
            assert actions.dtype == torch.int64 and avail.gather(-1, actions[..., None]).all()
            assert torch.equal(actions, out.masked_fill(~avail, -float("inf")).argmax(-1))
        else:
            assert actions.shape == (2, env.n_agents, env.n_actions) and (actions.abs() <= 1).all()
            torch.testing.assert_close(actions, out.clamp(-1, 1))  # the Gaussian mean, bounds [-1, 1]
        obs, _, avail, *_ = env.step(actions)
        hidden = new_hidden


def test_determinism(tmp_path):
    args = ["--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "12", *TINY, "--mi-coef", "0.05"]
    run_script(tmp_path / "a", *args, "--seed", "3")
    run_script(tmp_path / "b", *args, "--seed", "3")
    run_script(tmp_path / "c", *args, "--seed", "4")
    a, b, c = (checkpoint_of(tmp_path / x)["models"] for x in "abc")
    for net in ("actor", "critic", "club"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    assert any(not torch.equal(a["actor"][k], c["actor"][k]) for k in a["actor"])


@pytest.mark.parametrize("args,message", [
    (["--mi-coef", "-0.1"], "--mi-coef must be >= 0, got -0.1"),
    (["--mi-coef", "nan"], "--mi-coef must be a finite number, got nan"),  # nan > 0 is False: λ silently off
    (["--mi-coef", "inf"], "--mi-coef must be a finite number, got inf"),
    (["--gamma", "nan"], "--gamma must be a finite number, got nan"),
    (["--gae-lambda", "1.5"], "--gae-lambda must lie in [0, 1], got 1.5"),
    (["--learning-rate", "0"], "--learning-rate must be > 0, got 0.0"),
    (["--club-lr", "inf"], "--club-lr must be a finite number, got inf"),
    (["--clip-coef", "nan"], "--clip-coef must be a finite number, got nan"),
    (["--ent-coef", "-0.01"], "--ent-coef must be >= 0, got -0.01"),
    (["--vf-coef", "inf"], "--vf-coef must be a finite number, got inf"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),
    (["--init-log-std", "-inf"], "--init-log-std must be a finite number, got -inf"),
    (["--env-id", "no-such-env"], "unknown env id 'no-such-env'"),
    (["--mi-estimator", "mine"], "--mi-estimator must be one of"),
    (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--club-steps", "0"], "--club-steps must be >= 1"),
    (["--env-kwargs", '"thrust_noise"'], "--env-kwargs must be a JSON object such as"),
    (["--env-kwargs", "{'a': 1}"], "--env-kwargs must be a JSON object such as"),
    (["--env-kwargs", '{"thrust_nois": 0.1}'], "bad option for env 'quads-same-goal'"),
    (["--env-kwargs", '{"episode_limit": 100}', "--episode-limit", "50"],
     "--env-kwargs sets 'episode_limit', which --episode-limit also sets"),
    (["--env-kwargs", '{"seed": 3}'], "--env-kwargs sets 'seed', which --seed also sets"),
])
def test_bad_input_exits_with_one_clear_line(tmp_path, args, message):
    # in this process (seconds saved per case); the rollout storage test below refuses in a real subprocess
    proc = run_in_process(tmp_path, *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_rollout_storage_beyond_memory_exits_with_the_estimate(tmp_path):
    """A rollout storage no machine can hold (about 1.2e3 TiB here; the env itself is small)
    is refused at start-up with one line naming the flag and giving the estimate, before anything is allocated."""
    proc = run_script(tmp_path, "--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "12", "--num-envs", "4",
                      "--num-steps", str(10**12), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.match(r"error: --num-steps 1000000000000 x --num-envs 4 with 3 agents .* would need about [\d.e+]+ TiB "
                    r"for the rollout storage \(limit ", lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()


def test_env_kwargs_reach_the_env_and_the_checkpoint(tmp_path):
    """--env-kwargs options go to envs.make (on top of the script's quads defaults: n_agents shows in the model)
    and into the checkpoint's env_kwargs, so that attack_worstcase rebuilds the same env."""
    run_script(tmp_path, "--env-id", "quads-same-goal", "--env-kwargs", '{"n_agents": 3, "thrust_noise": 0.0}',
               "--episode-limit", "12", *TINY)
    ckpt = checkpoint_of(tmp_path)
    assert ckpt["n_agents"] == 3
    assert ckpt["env_kwargs"] == {"n_agents": 3, "thrust_noise": 0.0, "episode_limit": 12}


def test_load_policy_refuses_unusable_checkpoints(tmp_path):
    run_script(tmp_path, "--env-id", "quads-same-goal", *SMALL, *TINY)
    ckpt = checkpoint_of(tmp_path)
    with pytest.raises(ValueError, match="not a mir3_mappo checkpoint.*mir3_maddpg"):
        load_policy(dict(ckpt, script="mir3_maddpg"))
    with pytest.raises(ValueError, match="not a mir3_mappo checkpoint"):
        load_policy([1, 2, 3])
    broken = dict(ckpt, models={"actor": {"fc1.weight": torch.zeros(2, 2)}})
    with pytest.raises(ValueError, match="unusable mir3_mappo checkpoint"):
        load_policy(broken)
    with pytest.raises(ValueError, match="unusable mir3_mappo checkpoint"):
        load_policy({k: v for k, v in ckpt.items() if k != "args"})


def test_running_norm_off_passes_inputs_unchanged():
    """--no-norm-obs: raw inputs reach the networks, even beyond the ±10 clip of the normalised ones."""
    x = torch.tensor([[-250.0, 0.5, 37.0]])
    torch.testing.assert_close(RunningNorm(3)(x), torch.tensor([[-10.0, 0.5, 10.0]]))  # on: clipped
    assert torch.equal(RunningNorm(3, active=False)(x), x)


def test_no_norm_obs_policy_sees_raw_observations(tmp_path):
    """A --no-norm-obs checkpoint rebuilds an actor without normalisation: observations 20 and 40 (both beyond
    the clip) give different actions, and the critic's state input is raw as well."""
    run_script(tmp_path, "--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "12", *TINY, "--no-norm-obs")
    ckpt = checkpoint_of(tmp_path)
    policy = load_policy(ckpt)
    obs = torch.ones(1, 3, ckpt["obs_dim"])
    assert not torch.equal(policy.actor(20 * obs)[0], policy.actor(40 * obs)[0])
    assert ckpt["models"]["actor"]["obs_norm.mean"].abs().sum() == 0  # statistics never updated
    clipped = load_policy(dict(ckpt, args=dict(ckpt["args"], norm_obs=True)))  # what the clip did before
    assert torch.equal(clipped.actor(20 * obs)[0], clipped.actor(40 * obs)[0])


def start(tmp_path, *args):
    """Start a long training run in the background; returns the process once it printed its first progress line."""
    os.makedirs(tmp_path, exist_ok=True)
    proc = subprocess.Popen([sys.executable, os.path.join(helpers.ROOT, "mir3_mappo.py"), *args], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=helpers.ROOT, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("global_step="):
            return proc
    raise AssertionError(f"no progress line: {proc.stderr.read()}")


def test_sigterm_saves_the_checkpoint(tmp_path):
    """A scheduler's SIGTERM saves the checkpoint as Ctrl-C does; a second Ctrl-C / SIGTERM during the save is
    ignored."""
    proc = start(tmp_path, "--env-id", "rendezvous", "--n-agents", "3", "--episode-limit", "12",
                 "--total-timesteps", "100000000", "--num-envs", "4", "--num-steps", "16", "--hidden-dim", "16",
                 "--club-hidden-dim", "16", "--club-batch-size", "32", "--eval-interval", "0")
    proc.send_signal(signal.SIGTERM)
    rest = []
    for line in proc.stdout:
        rest.append(line)
        if "saving, please wait" in line:
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert proc.returncode == 143, (proc.returncode, rest, stderr)
    assert "Traceback" not in stderr
    assert any(line.startswith("interrupted by SIGTERM: saving, please wait") for line in rest), rest
    assert any(line.startswith("checkpoint saved to ") for line in rest), rest
    load_policy(checkpoint_of(tmp_path))


def test_first_stop_signal_disarms_the_next():
    """The handler raises KeyboardInterrupt once and ignores Ctrl-C / SIGTERM / SIGUSR1 from then on."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(1000):  # the handler runs between two bytecodes
                pass
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in saved)
        os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    """Rewards turn inf after 40 env steps of the batch (320 env steps, the third rollout): the run stops with one
    line naming the step and the loss, exit 1, and the checkpoint of --save-interval stays the last finite one."""
    proc = run_on_context("mir3_mappo", tmp_path, "--env-id", "context", "--env-kwargs", '{"inf_after": 40}',
                          "--num-envs", "8", "--num-steps", "16", "--total-timesteps", "2048", "--hidden-dim", "16",
                          "--club-hidden-dim", "16", "--club-batch-size", "32", "--eval-interval", "0",
                          "--save-interval", "128", check=False)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged at global_step=384: "), proc.stderr
    assert "losses/value_loss = nan" in lines[0]
    ckpt = checkpoint_of(tmp_path)
    assert ckpt["global_step"] == 256
    for net in ckpt["models"].values():
        assert all(torch.isfinite(v).all() for v in net.values())
    load_policy(ckpt)


def test_running_norm_matches_full_batch_statistics():
    torch.manual_seed(0)
    x = torch.randn(1000, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    norm = RunningNorm(3)
    for chunk in x.chunk(7):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean, x.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norm.var, x.var(0, unbiased=False), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(norm.denormalize(norm(x)), x, atol=1e-4, rtol=1e-4)


def test_learns_rendezvous(tmp_path):
    """Small rendezvous (4 agents, 50 steps): the greedy policy covers at least half of the gap between
    a random policy and the scripted steer-to-centroid controller on the evaluation episodes (seeds 1-5
    score 0.90, 0.81, 0.73, 0.77, 0.75)."""
    proc = run_script(tmp_path, "--env-id", "rendezvous", "--n-agents", "4", "--episode-limit", "50",
                      "--num-envs", "32", "--num-steps", "50", "--total-timesteps", "64000", "--eval-interval", "32000",
                      "--eval-episodes", "16", "--init-log-std", "-0.5", "--mi-coef", "0.01", "--seed", "1",
                      "--no-save-model")
    evals = [float(x) for x in re.findall(r"eval_return=(-?[\d.]+)", proc.stdout)]
    reference = {}
    for name in ("random", "scripted"):
        env = envs.make("rendezvous", num_envs=16, seed=1 + 100_000, n_agents=4, episode_limit=50)
        env.reset()
        gen = torch.Generator().manual_seed(0)
        total = torch.zeros(16)
        for _ in range(50):
            actions = scripted_actions(env) if name == "scripted" else torch.rand(16, 4, 2, generator=gen) * 2 - 1
            total += env.step(actions)[3]
        reference[name] = total.mean().item()
    score = (evals[-1] - reference["random"]) / (reference["scripted"] - reference["random"])
    assert len(evals) == 2 and score > 0.5, (evals, reference)


def test_default_swarm_episode_holds_one_swap():
    """The default quads-swarm-vs-swarm episode lasts past the teams' swap of centres (every 4-6 s), with time left to
    reach the new formation; at the former 4 s the episode ended before any swap and the teams never crossed."""
    kwargs = DEFAULT_ENV_KWARGS["quads-swarm-vs-swarm"]
    env = envs.make("quads-swarm-vs-swarm", num_envs=64, seed=0, **kwargs)
    env.reset()
    for _ in range(env.episode_limit - 1):  # the last step would start the next episode
        *_, truncated, _ = env.step(torch.zeros(64, env.n_agents, 4))
    assert not truncated.any() and env.side.all()  # every env has swapped once ...
    assert (kwargs["episode_limit"] - env.switch_steps >= 200).all()  # ... at least 2 s (200 steps) before the end
    assert (2 * env.switch_steps >= kwargs["episode_limit"]).all()  # and no second swap before the last step


def test_quads_eval_report(tmp_path):
    """benchmark/quads_eval.py: distances of the first step agree with the env's positions, one line per policy."""
    import importlib.util

    run_script(tmp_path, "--env-id", "quads-same-goal", *TINY, *SMALL)
    path = helpers.only(os.path.join(tmp_path, "runs", "*", "mir3_mappo.pt"))
    proc = helpers.run_script(os.path.join(helpers.ROOT, "benchmark", "quads_eval.py"), tmp_path, path, "--random",
                              "--episodes", "4")
    rows = [line.split() for line in proc.stdout.splitlines()[1:3]]
    assert rows[1][:2] == ["random", "actions"]
    for row in rows:
        values = [float(v) for v in row[-7:]]
        assert all(0 < v < 20 for v in values[:3]) and all(0 <= v <= 1 for v in values[3:])

    spec = importlib.util.spec_from_file_location("quads_eval", os.path.join(helpers.ROOT, "benchmark", "quads_eval.py"))
    quads_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quads_eval)
    ckpt = checkpoint_of(tmp_path)
    policy = load_policy(ckpt)
    env = envs.make("quads-same-goal", num_envs=4, seed=3, **ckpt["env_kwargs"])
    report = quads_eval.play(env, lambda o, a: policy.act(o, a, None)[0])
    twin = envs.make("quads-same-goal", num_envs=4, seed=3, **ckpt["env_kwargs"])
    obs, _, avail = twin.reset()
    twin.step(policy.act(obs, avail, None)[0])
    assert report["dist step 1"] == pytest.approx((twin.pos - twin.goal).norm(dim=-1).mean().item(), rel=1e-5)

    rendezvous = tmp_path / "rdv"
    run_script(rendezvous, "--env-id", "rendezvous", *TINY, "--n-agents", "3", "--episode-limit", "12")
    bad = helpers.run_script(os.path.join(helpers.ROOT, "benchmark", "quads_eval.py"), rendezvous,
                             helpers.only(os.path.join(rendezvous, "runs", "*", "mir3_mappo.pt")), check=False)
    assert bad.returncode != 0 and "not a quads-* env" in bad.stderr
