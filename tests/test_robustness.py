"""benchmark/robustness.py: statistics against hand-computed values, plan / run / resume / aggregate on a
tiny experiment, the Slurm script, bad experiment files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import robustness  # noqa: E402

RUNNER = os.path.join(ROOT, "benchmark", "robustness.py")

TINY = """
name = "tiny"
seeds = [1, 2]
baseline = "plain"

[methods.plain]
script = "mir3_maddpg"
flags = ["--mi-coef", "0", "--n-agents", "3", "--episode-limit", "20", "--num-envs", "4", "--total-timesteps", "800",
         "--learning-starts", "400", "--batch-size", "32", "--replay-ratio", "1", "--eval-interval", "400",
         "--eval-episodes", "2", "--hidden-dim", "16"]

[methods.mir3]
script = "mir3_maddpg"
flags = ["--mi-coef", "1e-4", "--n-agents", "3", "--episode-limit", "20", "--num-envs", "4", "--total-timesteps", "800",
         "--learning-starts", "400", "--batch-size", "32", "--replay-ratio", "1", "--eval-interval", "400",
         "--eval-episodes", "2", "--hidden-dim", "16"]

[attack]
flags = ["--total-timesteps", "128", "--num-envs", "2", "--num-steps", "32", "--eval-episodes", "3", "--eval-interval", "0",
         "--update-epochs", "1", "--hidden-dim", "8"]
adversaries = [[0], [1], [0, 2]]
disturbances = ["--disable", "1"]
"""


def runner(cwd, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, RUNNER, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


# --- statistics ------------------------------------------------------------------------------
def test_iqm_hand_computed():
    assert robustness.iqm([4, 1, 3, 2]) == pytest.approx(2.5)  # mean of the middle two
    assert robustness.iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    # n = 5: the middle 50% is 2.5 runs: 0.75 of the 2nd, the 3rd, 0.75 of the 4th
    assert robustness.iqm([5, 1, 4, 2, 3]) == pytest.approx((0.75 * 2 + 3 + 0.75 * 4) / 2.5)
    assert robustness.iqm([1, 2, 3, 100]) == pytest.approx(2.5)  # robust to one outlier
    assert robustness.iqm([7.0]) == pytest.approx(7.0)


def test_probability_of_improvement_hand_computed():
    # pairs (x, y): (1, 1.5) no, (1, 0.5) yes, (2, 1.5) yes, (2, 0.5) yes
    assert robustness.prob_improvement([1, 2], [1.5, 0.5]) == pytest.approx(0.75)
    assert robustness.prob_improvement([1, 1], [1, 1]) == pytest.approx(0.5)  # ties count 1/2
    assert robustness.prob_improvement([0, 0], [1, 2]) == pytest.approx(0.0)
    x, y = np.random.default_rng(0).normal(size=7), np.random.default_rng(1).normal(size=5)
    assert robustness.prob_improvement(x, y) + robustness.prob_improvement(y, x) == pytest.approx(1.0)


def test_bootstrap_hand_computed():
    # the mean of two draws from {0, 1}: 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4 -> 2.5% / 97.5% quantiles 0 and 1
    assert robustness.bootstrap_ci(robustness.mean, [[0.0, 1.0]]) == [0.0, 1.0]
    assert robustness.bootstrap_ci(robustness.mean, [[3.0, 3.0, 3.0]]) == [3.0, 3.0]
    # with 4 distinct runs the interval of the mean is inside [min, max] and contains the mean
    lo, hi = robustness.bootstrap_ci(robustness.mean, [[1.0, 2.0, 3.0, 10.0]])
    assert 1.0 <= lo < 4.0 < hi <= 10.0
    # P(X > Y) with X always above Y: every resample gives 1
    assert robustness.bootstrap_ci(robustness.prob_improvement, [[5, 6], [1, 2, 3]]) == [1.0, 1.0]
    # the bootstrap distribution of the mean of [0, 1] x 20 runs: interval about mean ± 1.96·0.5/√20
    lo, hi = robustness.bootstrap_ci(robustness.mean, [[0.0, 1.0] * 10])
    half = 1.96 * 0.5 / np.sqrt(20)
    assert lo == pytest.approx(0.5 - half, abs=0.03) and hi == pytest.approx(0.5 + half, abs=0.03)


def fake_result(spec, method, seed, natural, worst):
    def report(adv, worstcase):
        conds = {"natural": {"return_mean": natural}, "random": {"return_mean": natural - 1},
                 "worstcase": {"return_mean": worstcase},  # flee: weaker than the trained adversary on [0] only
                 "scripted_flee": {"return_mean": worstcase + (1 if adv == [0] else -2)}}
        if adv == [0]:
            conds["dis_1"] = {"return_mean": natural - 2}
        return {"conditions": conds}
    def attack(i, adv, worstcase):  # with the key of the spec's command, as the runner writes it
        cmd = robustness.attack_command(spec, "", seed, adv, i == 0, "")
        return {"adversaries": adv, "key": robustness.key(cmd), "wall_s": 1.0, "report": report(adv, worstcase)}

    attacks = [attack(0, [0], worst[0]), attack(1, [1], worst[1]), attack(2, [0, 2], worst[2]),
               attack(3, [5], -1000.0)]  # not in the spec: ignored
    train = {"wall_s": 10.0, "key": robustness.key(robustness.train_command(spec, method, seed)),
             # evaluations at 100 and 200 steps; seed 2 also at 150 (not every run has it: left out of the curve)
             "evals": [[100, natural - 5, 0.0], *([[150, natural - 3, 0.2]] if seed == 2 else []),
                       [200, natural, 0.5 * seed]]}
    return {"method": method, "seed": seed, "train": train, "attacks": attacks}


def test_aggregate_scores_and_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec_path = tmp_path / "tiny.toml"
    spec_path.write_text(TINY)
    spec = robustness.load_spec(str(spec_path))
    os.makedirs("results/tiny")
    runs = {("plain", 1): (-10.0, [-20.0, -22.0, -30.0]), ("plain", 2): (-12.0, [-24.0, -26.0, -40.0]),
            ("mir3", 1): (-8.0, [-10.0, -12.0, -20.0]), ("mir3", 2): (-9.0, [-11.0, -13.0, -21.0])}
    for (m, s), (nat, worst) in runs.items():
        with open(f"results/tiny/{m}__{s}.json", "w") as f:
            json.dump(fake_result(spec, m, s, nat, worst), f)
    # a result made with other commands (here: another attack budget) is no part of the experiment
    other = robustness.load_spec(str(spec_path))
    other["attack"]["flags"] = [f if f != "128" else "64" for f in other["attack"]["flags"]]
    with open("results/tiny/plain__3.json", "w") as f:  # seed 3, in the spec for this check only
        json.dump(fake_result(other, "plain", 3, 0.0, [0.0] * 3), f)
    spec["seeds"].append(3)
    summary = robustness.aggregate(spec)
    assert summary["stale_skipped"] == ["results/tiny/plain__3.json"]
    spec["seeds"].remove(3)
    summary = robustness.aggregate(spec)
    assert summary["conditions"] == ["natural", "strongest_k1", "strongest_k2", "worstcase_k1", "worstcase_k2",
                                     "scripted_flee_k1", "scripted_flee_k2", "random_k1", "random_k2", "dis_1"]
    plain, mir3 = summary["methods"]["plain"], summary["methods"]["mir3"]
    assert plain["worstcase_k1"]["runs"] == [-21.0, -25.0]  # mean over adversaries [0] and [1]; [5] ignored
    assert plain["worstcase_k2"]["runs"] == [-30.0, -40.0]
    assert plain["scripted_flee_k1"]["runs"] == [-21.5, -25.5]
    # the stronger of trained and scripted per adversary set, then the mean: seed 1 (-20, -24), seed 2 (-24, -28)
    assert plain["strongest_k1"]["runs"] == [-22.0, -26.0] and plain["strongest_k2"]["runs"] == [-32.0, -42.0]
    assert plain["natural"]["mean"] == pytest.approx(-11.0)
    assert plain["worstcase_k1"]["drop"]["mean"] == pytest.approx((11.0 + 13.0) / 2)
    assert mir3["worstcase_k1"]["p_improvement"] == pytest.approx(1.0)
    assert mir3["natural"]["p_improvement"] == pytest.approx(1.0)
    assert "p_improvement" not in plain["natural"]
    # drops: plain 11, 13; mir3 3, 3.5 -> every mir3 drop is smaller
    assert mir3["worstcase_k1"]["drop"]["p_smaller"] == pytest.approx(1.0)
    assert summary["cost_s"] == {"train_s": 40, "attack_s": 16}
    # training curves: plain's naturals are -10 (seed 1) and -12 (seed 2), success 0.5 and 1.0 at the end
    assert summary["curves"]["plain"] == {"steps": [100, 200], "return_mean": [-16.0, -11.0], "return_min": [-17.0, -12.0],
                                          "return_max": [-15.0, -10.0], "success_mean": [0.0, 0.75],
                                          "success_min": [0.0, 0.5], "success_max": [0.0, 1.0]}
    assert robustness.cmd_aggregate(spec, make_plot=True) == 0
    md = open("results/tiny/summary.md").read()
    assert "| worstcase_k1 | -23.00" in md and "P(mir3 > plain)" in md
    assert os.path.getsize("results/tiny/summary.png") > 1000 and os.path.getsize("results/tiny/curves.png") > 1000
    assert "| 200 | -11.00 [-12.00, -10.00], success 0.75 | -8.50 [-9.00, -8.00], success 0.75 |" in md
    assert json.load(open("results/tiny/summary.json"))["methods"]["mir3"]["dis_1"]["runs"] == [-10.0, -11.0]


@pytest.fixture
def four_results(tmp_path, monkeypatch):
    """The tiny experiment in tmp_path with all four runs finished (natural returns plain -10, -12; mir3 -8, -9)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = robustness.load_spec("tiny.toml")
    os.makedirs("results/tiny")
    for m, s, nat in [("plain", 1, -10.0), ("plain", 2, -12.0), ("mir3", 1, -8.0), ("mir3", 2, -9.0)]:
        with open(f"results/tiny/{m}__{s}.json", "w") as f:
            json.dump(fake_result(spec, m, s, nat, [-20.0, -22.0, -30.0]), f)


def test_aggregate_of_some_seeds_prints_and_writes_nothing(four_results, capsys):
    """`aggregate --seeds` (how a selection rule on some seeds is recomputed) uses only those runs and leaves the
    experiment's summary alone."""
    assert robustness.main(["aggregate", "tiny.toml", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| natural | -12.00 (IQM -12.00 [-12.00, -12.00]) | -9.00" in out and "plain (n=1)" in out
    assert "runs plain:2, mir3:2 only: nothing written\n" in out
    assert not any(f.startswith("summary") for f in os.listdir("results/tiny"))
    assert robustness.main(["aggregate", "tiny.toml", "--seeds", "2", "7"]) == 2
    assert "unknown seeds [7]" in capsys.readouterr().err
    assert robustness.main(["aggregate", "tiny.toml", "--no-plot"]) == 0  # all seeds: the summary is written
    assert "plain (n=2)" in open("results/tiny/summary.md").read()


def test_aggregate_of_some_runs_prints_and_writes_nothing(four_results, capsys):
    """`aggregate --runs METHOD:SEED ...` (a selection rule that keeps different seeds per method) uses exactly those
    runs, writes nothing, and refuses a run the experiment does not have."""
    assert robustness.main(["aggregate", "tiny.toml", "--runs", "plain:2", "mir3:1", "mir3:2"]) == 0
    out = capsys.readouterr().out
    assert "| natural | -12.00 (IQM -12.00 [-12.00, -12.00]) | -8.50" in out
    assert "plain (n=1)" in out and "mir3 (n=2)" in out and "runs plain:2, mir3:1, mir3:2 only: nothing written\n" in out
    assert not os.path.exists("results/tiny/summary.json")
    os.remove("results/tiny/mir3__2.json")  # a named run that has not finished is left out, and said so
    assert robustness.main(["aggregate", "tiny.toml", "--runs", "mir3:2", "mir3:1", "plain:2"]) == 0
    out = capsys.readouterr().out
    assert "mir3 (n=1)" in out and "only: nothing written; not finished, so left out: mir3:2\n" in out
    for bad in (["plain:3"], ["ppo:1"], ["plain"], ["plain:x"], ["plain:\u00b2"]):
        assert robustness.main(["aggregate", "tiny.toml", "--runs", *bad]) == 2
        assert f"error: --runs {bad[0]}: not METHOD:SEED of this experiment" in capsys.readouterr().err
    assert robustness.main(["aggregate", "tiny.toml", "--runs", "plain:1", "--seeds", "1"]) == 2


def test_strongest_follows_the_adversarys_objective():
    """With --adversary-objective defenders the strongest adversary per set is the one that hurts the defenders most,
    even where another lowers the team return more (by hurting itself); with the team objective, the team return."""
    def report(objective):
        conds = {"natural": {"return_mean": -1.0, "task": {"defender_return": -1.0}},
                 "worstcase": {"return_mean": -3.0, "task": {"defender_return": -4.0}},  # hurts the defenders
                 "scripted_stop": {"return_mean": -5.0, "task": {"defender_return": -1.5}}}  # mostly hurts itself
        return {"adversaries": [0], "report": {"conditions": conds, **({"adversary_objective": objective}
                                                                        if objective else {})}}
    for objective, chosen in [(None, "scripted_stop"), ("team", "scripted_stop"), ("defenders", "worstcase")]:
        found = robustness.run_conditions({"attacks": [report(objective)]}, [[0]])
        assert found["strongest_k1"] == [report(objective)["report"]["conditions"][chosen]], objective


def test_task_measures_are_chosen_and_averaged_like_the_scores(tmp_path, monkeypatch):
    """Quadrotor reports carry the defenders' task measures per condition: the aggregate picks, per adversary set,
    the same entry as the score (the strongest adversary by return) and averages over sets, then over runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = robustness.load_spec("tiny.toml")
    os.makedirs("results/tiny")
    for m, s, nat, worst in [("plain", 1, -10.0, [-20.0, -22.0, -30.0]), ("plain", 2, -12.0, [-24.0, -26.0, -40.0]),
                             ("mir3", 1, -8.0, [-10.0, -12.0, -20.0])]:
        result = fake_result(spec, m, s, nat, worst)
        for a in result["attacks"]:
            for name, c in a["report"]["conditions"].items():
                if name != "dis_1":  # a condition without measures (IBAL's attack on LBF has none) stays out
                    c["task"] = {"defender_return": c["return_mean"] / 2, "final_dist": -c["return_mean"] / 10,
                                 "within_radius": 0.5, "on_floor": 0.25, "collisions": 1.0}
        with open(f"results/tiny/{m}__{s}.json", "w") as f:
            json.dump(result, f)
    summary = robustness.aggregate(spec)
    task = summary["task_measures"]
    # plain strongest_k1: seed 1 (-20 [0], -24 [1]: scripted on [1]) -> dists 2.0, 2.4; seed 2: 2.4, 2.8
    assert task["plain"]["strongest_k1"]["final_dist"] == pytest.approx((2.2 + 2.6) / 2)
    assert task["plain"]["natural"]["defender_return"] == pytest.approx(-5.5)
    assert "dis_1" not in task["plain"] and task["mir3"]["worstcase_k2"]["final_dist"] == pytest.approx(2.0)
    # the defenders' own return gets the statistics of the scores
    defenders = summary["defenders"]
    assert defenders["plain"]["strongest_k1"]["runs"] == pytest.approx([-11.0, -13.0])
    assert defenders["mir3"]["natural"]["p_improvement"] == 1.0 and "dis_1" not in defenders["mir3"]
    assert robustness.cmd_aggregate(spec, make_plot=False) == 0
    md = open("results/tiny/summary.md").read()
    assert "The defenders' own return" in md and "| strongest_k1 | -12.00 (IQM -12.00 [-13.00, -11.00])" in md
    assert "| natural | -5.50 / 1.10 m / 50% / 25%; 1.00 | -4.00 / 0.80 m / 50% / 25%; 1.00 |" in md
    assert "| dis_1 | – | – |" in md


# --- plan, run, resume, Slurm on real (tiny) runs ----------------------------------------------
def test_plan_run_resume(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    plan = runner(tmp_path, "plan", "tiny.toml")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert [x for x in lines if x.startswith("# unit")] == ["# unit 0: plain, seed 1", "# unit 1: mir3, seed 1",
                                                             "# unit 2: plain, seed 2", "# unit 3: mir3, seed 2"]
    assert sum("attack_worstcase.py" in x for x in lines) == 4 * 3
    assert sum("--disable 1" in x for x in lines) == 4  # disturbances on the first attack of each unit only

    # unit 1 only, as a Slurm array task would
    proc = runner(tmp_path, "run", "tiny.toml", "--index", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(tmp_path / "results" / "tiny")) == ["mir3__1.json"]
    result = json.load(open(tmp_path / "results" / "tiny" / "mir3__1.json"))
    assert result["method"] == "mir3" and result["seed"] == 1 and result["train"]["final_step"] == 800
    assert [a["adversaries"] for a in result["attacks"]] == [[0], [1], [0, 2]]
    assert "dis_1" in result["attacks"][0]["report"]["conditions"]
    assert "dis_1" not in result["attacks"][1]["report"]["conditions"]

    # again: nothing to do
    proc = runner(tmp_path, "run", "tiny.toml", "--index", "1")
    assert "done already" in proc.stdout and "train:" not in proc.stdout

    # resume inside a unit: the result and one attack report are gone, the rest is reused
    os.remove(tmp_path / "results" / "tiny" / "mir3__1.json")
    os.remove(tmp_path / "runs" / "robustness" / "tiny" / "mir3__1" / "attack_adv1.json")
    proc = runner(tmp_path, "run", "tiny.toml", "--methods", "mir3", "--seeds", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training reused" in proc.stdout and "attack [0] reused" in proc.stdout
    assert "attack [1]: python" in proc.stdout and "attack [0, 2] reused" in proc.stdout
    assert json.load(open(tmp_path / "results" / "tiny" / "mir3__1.json"))["attacks"][1]["adversaries"] == [1]

    agg = runner(tmp_path, "aggregate", "tiny.toml", "--no-plot")
    assert agg.returncode == 0 and "worstcase_k1" in agg.stdout

    # another experiment that needs exactly this training and the attack on agent 0 borrows them
    other = TINY.replace('name = "tiny"', 'name = "sweep"').replace("seeds = [1, 2]", "seeds = [1]")
    other = other.replace("[methods.mir3]", "[methods.lam1e-4]")
    other = other.replace("adversaries = [[0], [1], [0, 2]]", "adversaries = [[0]]")
    (tmp_path / "sweep.toml").write_text(other)
    proc = runner(tmp_path, "run", "sweep.toml", "--methods", "lam1e-4")
    assert proc.returncode == 0 and "the same runs are in results/tiny/mir3__1.json" in proc.stdout, proc.stdout
    borrowed = json.load(open(tmp_path / "results" / "sweep" / "lam1e-4__1.json"))
    assert borrowed["method"] == "lam1e-4" and [a["adversaries"] for a in borrowed["attacks"]] == [[0]]
    assert borrowed["attacks"][0]["report"] == result["attacks"][0]["report"]
    # a different attack budget is a different computation: only the training can be borrowed
    (tmp_path / "sweep.toml").write_text(other.replace('"--total-timesteps", "128"', '"--total-timesteps", "64"'))
    spec = robustness.load_spec(str(tmp_path / "sweep.toml"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        source, _, attacks = robustness.borrow(spec, "lam1e-4", 1)
        assert source == "results/tiny/mir3__1.json"
        assert robustness.key(robustness.attack_command(spec, "", 1, [0], True, "")) not in attacks
        spec["methods"]["lam1e-4"]["flags"][1] = "2e-4"  # another training: nothing
        assert robustness.borrow(spec, "lam1e-4", 1) is None
        # never from itself: from sweep's copy of its training and attack [0]
        assert robustness.borrow(robustness.load_spec("tiny.toml"), "mir3", 1)[0] == "results/sweep/lam1e-4__1.json"
    finally:
        os.chdir(cwd)
    # the same training with one of those attacks and a new one (e.g. another adversary objective): the training
    # and that attack are borrowed (from the first result that has them: sweep's copy), the new one runs against the
    # borrowed checkpoint
    (tmp_path / "more.toml").write_text(other.replace('name = "sweep"', 'name = "more"')
                                        .replace("adversaries = [[0]]", "adversaries = [[0], [2]]"))
    proc = runner(tmp_path, "run", "more.toml", "--methods", "lam1e-4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training borrowed from results/sweep/lam1e-4__1.json" in proc.stdout and "train:" not in proc.stdout
    assert "attack [0] borrowed from results/sweep/lam1e-4__1.json" in proc.stdout
    assert "attack [2]: python" in proc.stdout and "attack [0]: python" not in proc.stdout
    more = json.load(open(tmp_path / "results" / "more" / "lam1e-4__1.json"))
    assert more["train_borrowed_from"] == "results/sweep/lam1e-4__1.json"
    assert more["train"]["checkpoint"] == result["train"]["checkpoint"] == more["attacks"][1]["report"]["checkpoint"]
    assert more["attacks"][0]["report"] == result["attacks"][0]["report"]
    assert runner(tmp_path, "plan", "more.toml").stdout.count("(done)") == 1

    # the experiment's attack changed after the unit ran: the training is reused, every attack is redone
    (tmp_path / "tiny.toml").write_text(TINY.replace('"--eval-episodes", "3"', '"--eval-episodes", "4"'))
    assert "# unit 1: mir3, seed 1 (stale: made with other commands)" in runner(tmp_path, "plan", "tiny.toml").stdout
    proc = runner(tmp_path, "run", "tiny.toml", "--index", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "made with other commands" in proc.stdout and "training reused" in proc.stdout and "reused\n" not in proc.stdout
    redone = json.load(open(tmp_path / "results" / "tiny" / "mir3__1.json"))
    assert all(len(c["returns"]) == 4 for a in redone["attacks"] for c in a["report"]["conditions"].values())


def test_parse_training_log_of_a_continued_run():
    """A continuation redoes the steps after its checkpoint: the first part's later evaluations are dropped; a run
    stopped by a signal saved a checkpoint but did not finish."""
    first = ("$ python mir3_qmix.py --seed 1\nrun: lbf with 4 agents\nglobal_step=100 eval_return=0.10 eval_success=0.00\n"
             "global_step=200 eval_return=0.20 eval_success=0.00\nglobal_step=300 eval_return=0.3")  # killed mid-line
    assert robustness.parse_training_log(first) == {"evals": [(100, 0.1, 0.0), (200, 0.2, 0.0)], "checkpoint": None,
                                                    "resumed_at": []}
    both = (first + "\n$ python mir3_qmix.py --seed 1 --resume runs/run/x.pt\nresuming runs/run/x.pt at global_step=150: "
            "new episodes\nglobal_step=200 eval_return=0.25 eval_success=0.50\ncheckpoint saved to runs/run/x.pt\n")
    assert robustness.parse_training_log(both) == {"evals": [(100, 0.1, 0.0), (200, 0.25, 0.5)],
                                                   "checkpoint": "runs/run/x.pt", "resumed_at": [150]}
    stopped = first + "\ninterrupted by SIGTERM: saving, please wait\ncheckpoint saved to runs/run/x.pt\n"
    assert robustness.parse_training_log(stopped)["checkpoint"] is None


def test_how_often_a_run_saves_is_not_part_of_what_it_computes(tmp_path):
    """Adding --save-interval to an experiment (or resuming) keeps its finished logs and borrowed results valid; any
    other flag does not."""
    cmd = [sys.executable, "mir3_qmix.py", "--seed", "1", "--exp-name", "a"]
    saving = cmd[:2] + ["--save-interval", "50000"] + cmd[2:] + ["--resume", "runs/r/a.pt"]
    assert robustness.key(saving) == robustness.key(cmd) == "mir3_qmix.py --seed 1"
    assert robustness.key(cmd[:3] + ["2"]) != robustness.key(cmd)
    log = tmp_path / "train.log"
    log.write_text(f"$ {robustness.quote(cmd[:2] + ['--save-interval', '50000'] + cmd[2:])}\nrun: x\n")
    assert robustness.ran(str(log), cmd)
    assert not robustness.ran(str(log), cmd[:3] + ["2"] + cmd[4:])


def test_killed_training_is_continued_from_its_last_checkpoint(tmp_path):
    """The runner died with its training (a session's end, a node failure): the next run continues that training
    with --resume from the checkpoint it saved last, instead of starting it again."""
    (tmp_path / "tiny.toml").write_text(TINY)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        spec = robustness.load_spec("tiny.toml")
        cmd = robustness.train_command(spec, "plain", 1)
        # the state a kill at step ~600 leaves: a checkpoint at step 400 and a log that goes on past it
        half = list(cmd)
        half[half.index("--total-timesteps") + 1] = "400"
        out = subprocess.run(half, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        work = robustness.unit_dir(spec, "plain", 1)
        os.makedirs(work)
        killed = "".join(x for x in out.stdout.splitlines(True) if not x.startswith("checkpoint saved"))
        with open(os.path.join(work, "train.log.tmp"), "w") as f:
            f.write(f"$ {robustness.quote(cmd)}\n{killed}global_step=600 eval_return=99.00 eval_success=0.00\nglobal_st")
        with open(os.path.join(work, "train.log.start"), "w") as f:
            f.write(f"{os.path.getmtime(os.path.join(work, 'train.log.tmp')) - 30:.1f}")
    finally:
        os.chdir(cwd)
    proc = runner(tmp_path, "run", "tiny.toml", "--methods", "plain", "--seeds", "1", "--train-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training continued from runs/" in proc.stdout and "train: python" not in proc.stdout
    log = (tmp_path / work / "train.log").read_text()
    assert log.count("\n$ ") == 1 and "--resume runs/" in log and "resuming runs/" in log
    train = json.load(open(tmp_path / work / "train.json"))
    steps = [e[0] for e in train["evals"]]
    assert steps == sorted(set(steps)) and steps[-1] == 800 and 99.0 not in [e[1] for e in train["evals"]]
    assert train["wall_s"] >= 30  # the killed part's time counts
    # the finished training is reused by the attacks
    proc = runner(tmp_path, "run", "tiny.toml", "--methods", "plain", "--seeds", "1")
    assert proc.returncode == 0 and "training reused" in proc.stdout, proc.stdout + proc.stderr
    result = json.load(open(tmp_path / "results" / "tiny" / "plain__1.json"))
    assert result["train"]["final_step"] == 800 and result["train"]["resumed_at"] == [400]


def test_slurm_script(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    proc = runner(tmp_path, "slurm", "tiny.toml", "--cpus", "4", "--hours", "1.5")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-3\n" in proc.stdout  # 2 methods x 2 seeds
    assert "#SBATCH --cpus-per-task=4\n" in proc.stdout and "#SBATCH --time=1:30:00\n" in proc.stdout
    assert "--index $SLURM_ARRAY_TASK_ID" in proc.stdout
    spec = robustness.load_spec(str(tmp_path / "tiny.toml"))
    assert robustness.units(spec)[2] == ("plain", 2)  # what task 2 runs


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('baseline = "plain"', 'baseline = "nope"'), "baseline must name one of the methods"),
    (lambda t: t.replace("seeds = [1, 2]", "seeds = []"), "seeds must be a non-empty list"),
    (lambda t: t.replace('script = "mir3_maddpg"', 'script = "rm -rf"', 1), "script must be one of"),
    (lambda t: t.replace("adversaries = [[0], [1], [0, 2]]", "adversaries = [[0, 0]]"), "distinct agent indices"),
    (lambda t: t.replace('flags = ["--mi-coef", "0",', 'flags = ["--seed", "3", "--mi-coef", "0",'), "set by the runner"),
    (lambda t: t + "\n[[[", "is not valid TOML"),
])
def test_bad_experiment_files(tmp_path, edit, message):
    (tmp_path / "bad.toml").write_text(edit(TINY))
    proc = runner(tmp_path, "plan", "bad.toml")
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_refuses_bad_index(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    proc = runner(tmp_path, "run", "tiny.toml", "--index", "4")
    assert proc.returncode == 2 and "--index must be in [0, 3]" in proc.stderr


def test_run_refuses_unknown_methods_and_seeds(tmp_path, monkeypatch, capsys):
    """A method or seed the experiment lacks would select no unit and end 'successfully' having run nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY)
    assert robustness.main(["run", "tiny.toml", "--seeds", "1", "9"]) == 2
    assert capsys.readouterr().err == "error: unknown seeds [9]; the experiment has 1, 2\n"
    assert robustness.main(["run", "tiny.toml", "--methods", "plain", "nope"]) == 2
    assert "unknown methods ['nope']" in capsys.readouterr().err
    assert not os.path.exists("runs") and not os.path.exists("results")
