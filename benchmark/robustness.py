"""Robustness experiments across seeds: train each method, attack every checkpoint, aggregate.

    python benchmark/robustness.py plan      benchmark/experiments/rendezvous_maddpg.toml
    python benchmark/robustness.py run       benchmark/experiments/rendezvous_maddpg.toml --workers 2
    python benchmark/robustness.py run       benchmark/experiments/rendezvous_maddpg.toml --index 3
    python benchmark/robustness.py slurm     benchmark/experiments/rendezvous_maddpg.toml > sweep.sbatch
    python benchmark/robustness.py aggregate benchmark/experiments/rendezvous_maddpg.toml

An experiment is a TOML file (see ``benchmark/experiments/``): methods (a training script and its
flags), seeds, and the attack protocol (``attack_worstcase.py`` flags and the adversary sets). One
unit of work is one (method, seed): train, then one worst-case attack per adversary set (the first
also evaluates the disturbances). Units are numbered seed-major, so a partial sweep holds every
method at the seeds it has reached.

``run`` skips what is done: a unit whose ``results/<name>/<method>__<seed>.json`` exists is skipped,
and inside a unit a finished training log or attack report under ``runs/robustness/<name>/`` is
reused, so an interrupted sweep continues where it stopped (on the same machine; checkpoints live
under ``runs/``, which is not committed). A training that was stopped or killed before it finished is
continued with ``--resume`` from the last checkpoint it saved (give the method ``--save-interval`` so that
a kill costs at most that many steps); its log keeps both parts and the evaluations of the steps it redid
are those of the continuation. Each of the W workers runs its commands with
``OMP_NUM_THREADS`` = cores / W. ``slurm`` prints a job-array script whose task i runs
``run --index i``: the same sweep on a cluster.

``aggregate`` reads the per-unit JSONs. A run's score under a condition is its mean return over the
evaluation episodes; ``worstcase_k1`` and ``random_k1`` average over the single-agent adversary sets
(the paper attacks each agent in turn and averages), ``worstcase_k2`` over the two-agent ones. Across
runs it reports, per method and condition, the mean and the interquartile mean (IQM: the mean of the
middle 50% of runs) with 95% percentile-bootstrap intervals over runs, and for each method against
the baseline the probability of improvement P(X > Y) (the Mann-Whitney statistic, ties count 1/2)
with a bootstrap interval that resamples both methods' runs independently; the same for the drop
from the natural return. These are rliable's definitions (Agarwal et al., NeurIPS 2021) for one task.
It writes ``summary.json``, ``summary.md`` (the tables README shows), ``summary.png`` and ``curves.png``
(the training runs' evaluations). ``aggregate --seeds 1 2`` or ``--runs mir3:1 mappo:2`` prints the
tables of some runs only (those a selection rule keeps) and writes nothing.
"""

import argparse
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("mir3_maddpg", "mir3_qmix", "mir3_mappo", "ibal_qmix")
EVAL_LINE = re.compile(r"global_step=(\d+) eval_return=(-?[\d.]+|nan) eval_success=([\d.]+)")
SAVED_LINE = re.compile(r"^checkpoint saved to (\S+)$", re.M)
RUN_LINE = re.compile(r"^(\S+): \S+ with \d+ agents", re.M)  # a training script's first line names its run
PART_TIME = "(runner) the part above ran"  # written into a log before its continuation
RESUMED_LINE = re.compile(r"^resuming \S+ at global_step=(\d+)", re.M)
BOOTSTRAP_REPS = 20_000


# ---------------------------------------------------------------------------------------------
# The experiment: a TOML file, checked once, turned into units of commands
# ---------------------------------------------------------------------------------------------
class SpecError(ValueError):
    pass


def load_spec(path: str) -> dict:
    """Read and check an experiment file; every problem is one SpecError line."""
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path} is not valid TOML: {e}") from None
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", spec["name"]):
        raise SpecError(f"experiment name {spec['name']!r} must be 1-80 letters, digits, '_', '.' or '-'")
    seeds = spec.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SpecError("seeds must be a non-empty list of non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"seeds repeat: {seeds}")
    methods = spec.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise SpecError("give at least one [methods.<name>] table")
    for name, m in methods.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
            raise SpecError(f"method name {name!r} must be 1-40 letters, digits, '_', '.' or '-'")
        if m.get("script") not in SCRIPTS:
            raise SpecError(f"method {name}: script must be one of {', '.join(SCRIPTS)}, got {m.get('script')!r}")
        flags = m.setdefault("flags", [])
        if not isinstance(flags, list) or not all(isinstance(x, str) for x in flags):
            raise SpecError(f"method {name}: flags must be a list of strings")
        if any(f.startswith(("--seed", "--exp-name")) for f in flags):
            raise SpecError(f"method {name}: --seed and --exp-name are set by the runner")
    if spec.get("baseline") not in methods:
        raise SpecError(f"baseline must name one of the methods ({', '.join(methods)}), got {spec.get('baseline')!r}")
    attack = spec.setdefault("attack", {})
    for key in ("flags", "disturbances"):
        value = attack.setdefault(key, [])
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise SpecError(f"attack.{key} must be a list of strings")
    adv = attack.setdefault("adversaries", [[0]])
    if not isinstance(adv, list) or not adv or not all(
            isinstance(a, list) and a and all(isinstance(i, int) and i >= 0 for i in a) and len(set(a)) == len(a)
            for a in adv):
        raise SpecError("attack.adversaries must be a non-empty list of non-empty lists of distinct agent indices")
    return spec


def units(spec: dict) -> list:
    """Every (method, seed) in run order: seed-major."""
    return [(method, seed) for seed in spec["seeds"] for method in spec["methods"]]


def unit_dir(spec: dict, method: str, seed: int) -> str:
    """Logs and attack reports of one unit (relative to the working directory, like the scripts' runs/)."""
    return os.path.join("runs", "robustness", spec["name"], f"{method}__{seed}")


def result_path(spec: dict, method: str, seed: int) -> str:
    return os.path.join("results", spec["name"], f"{method}__{seed}.json")


def script(name: str) -> str:
    """Path of a repo script as seen from the working directory (plain ``name.py`` in the repo root)."""
    return os.path.relpath(os.path.join(ROOT, f"{name}.py"))


def adv_tag(adversaries: list) -> str:
    return "adv" + "-".join(map(str, adversaries))


def train_command(spec: dict, method: str, seed: int) -> list:
    m = spec["methods"][method]
    return [sys.executable, script(m["script"]), *m["flags"], "--seed", str(seed),
            "--exp-name", f"{spec['name']}-{method}"]


def attack_command(spec: dict, checkpoint: str, seed: int, adversaries: list, first: bool, report: str) -> list:
    a = spec["attack"]
    return [sys.executable, script("attack_worstcase"), "--checkpoint", checkpoint, "--seed", str(seed),
            "--adversaries", *map(str, adversaries), *a["flags"], *(a["disturbances"] if first else []),
            "--exp-name", f"{spec['name']}-attack", "--report", report]


def attack_keys(spec: dict, seed: int) -> list:
    """The keys of the experiment's attacks on one seed's checkpoint, in the order of its adversary sets."""
    return [key(attack_command(spec, "", seed, a, i == 0, "")) for i, a in enumerate(spec["attack"]["adversaries"])]


def key(cmd: list) -> str:
    """What a command computes: the command without the names and paths of its outputs and input checkpoint, and
    without how often it saves (saving draws no random numbers)."""
    words = without(cmd[1:], ("--exp-name", "--checkpoint", "--report", "--save-interval", "--resume"))
    return " ".join(os.path.basename(c) if c.endswith(".py") else c for c in words)


def without(words: list, flags: tuple) -> list:
    """``words`` less each of ``flags`` and the value that follows it."""
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in flags:
            skip = True
        else:
            out.append(w)
    return out


def borrow(spec: dict, method: str, seed: int):
    """A finished unit of another experiment that ran exactly this training: (its result's path, its training with
    the checkpoint, its attacks by key), or None. One that also ran every attack of this experiment comes first;
    otherwise its checkpoint must still be on disk, for the attacks it lacks."""
    want_train = key(train_command(spec, method, seed))
    want_attacks = attack_keys(spec, seed)
    partial = None
    for path in sorted(glob.glob(os.path.join("results", "*", "*__*.json"))):
        if os.path.dirname(path) == os.path.dirname(result_path(spec, method, seed)):
            continue
        try:
            with open(path) as f:
                other = json.load(f)
            if other["train"].get("key") != want_train:
                continue
            by_key = {a.get("key"): a for a in other["attacks"]}
            # results written before the training's checkpoint was recorded have it in their attack reports
            checkpoint = other["train"].get("checkpoint") or other["attacks"][0]["report"]["checkpoint"]
            found = path, {**other["train"], "checkpoint": checkpoint}, by_key
            if all(k in by_key for k in want_attacks):
                return found
            if partial is None and os.path.isfile(checkpoint):
                partial = found
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
    return partial


def quote(cmd: list) -> str:
    """A command as one shell line, as typed in the repo root (``python mir3_maddpg.py ...``)."""

    def shown(c: str) -> str:
        if c == sys.executable:
            return "python"
        if c.endswith(".py") and os.path.abspath(c).startswith(ROOT + os.sep):
            return os.path.relpath(os.path.abspath(c), ROOT)
        return shlex.quote(c)

    return " ".join(map(shown, cmd))


# ---------------------------------------------------------------------------------------------
# Running: one unit = train, then attack; everything finished is reused
# ---------------------------------------------------------------------------------------------
def parse_training_log(text: str) -> dict:
    """Evaluations, the final checkpoint (None if it did not finish) and the steps it was continued at from a
    training log. A log that was continued with --resume holds both parts: the continuation redid the steps after
    its checkpoint, so the first part's evaluations of those steps are dropped."""
    parts = re.split(r"^\$ ", text, flags=re.M)[1:] or [text]  # one part per command the runner ran
    evals, resumed_at = [], []
    for part in parts:
        resumed = RESUMED_LINE.search(part)
        if resumed:
            resumed_at.append(int(resumed.group(1)))
            evals = [e for e in evals if e[0] <= resumed_at[-1]]
        evals += [(int(s), float(r), float(sr)) for s, r, sr in EVAL_LINE.findall(part)]
    saved = SAVED_LINE.findall(parts[-1])
    finished = bool(saved) and not re.search(r"^interrupted by \S+: saving", parts[-1], re.M)
    return {"evals": evals, "checkpoint": saved[-1] if finished else None, "resumed_at": resumed_at}


def last_checkpoint(text: str, exp_name: str):
    """The checkpoint an unfinished training log's run saved last (periodically or on a stop signal), or None.
    Every part of a run writes to the directory its first line names."""
    run = RUN_LINE.search(text)
    path = os.path.join("runs", run.group(1), f"{exp_name}.pt") if run else None
    return path if path and os.path.isfile(path) else None


def write_json(path: str, data) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)  # atomic: an interrupted sweep never leaves half a result


CHILDREN = set()  # running commands, stopped with SIGTERM (they save a checkpoint) when we are interrupted
STOP = threading.Event()  # set once interrupted: start no new command


def ran(log: str, cmd: list) -> bool:
    """Whether ``log`` is the output of ``cmd`` (its first line), not of an older version of the experiment; how
    often the command saved does not matter."""
    try:
        with open(log) as f:
            first = f.readline().rstrip("\n")
    except OSError:
        return False
    return first.startswith("$ ") and (without(shlex.split(first[2:]), ("--save-interval",))
                                       == without(shlex.split(quote(cmd)), ("--save-interval",)))


def run_logged(cmd: list, log: str, threads: int, before: str = "") -> tuple:
    """Run cmd in the repo root with its output in ``log`` (after ``before``, the text of a part run earlier);
    returns (exit code, seconds). Until cmd ends the log is ``log``.tmp, whose mtime says when it last wrote."""
    if STOP.is_set():
        return 130, 0.0
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.time()
    with open(log + ".tmp", "w") as f:
        f.write(f"{before}$ {quote(cmd)}\n")
        f.flush()
        with open(log + ".start", "w") as t:  # how long a part ran, should the runner die with it
            t.write(f"{start:.1f}")
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        CHILDREN.add(proc)
        code = proc.wait()
        CHILDREN.discard(proc)
    os.replace(log + ".tmp", log)
    return code, time.time() - start


def unfinished_training(log: str, cmd: list) -> tuple:
    """(text, seconds it ran) of a training of exactly ``cmd`` that was stopped (``log``) or killed with the runner
    (``log``.tmp) before it finished, or ("", 0.0)."""
    for path in (log + ".tmp", log):
        if ran(path, cmd):
            with open(path) as f:
                text = f.read()
            if parse_training_log(text)["checkpoint"] is None:
                try:
                    seconds = os.path.getmtime(path) - float(open(log + ".start").read())
                except (OSError, ValueError):
                    seconds = 0.0
                return text, max(0.0, seconds)
    return "", 0.0


def result_state(spec: dict, method: str, seed: int) -> str:
    """"done" if the unit's result JSON holds the experiment's training and every one of its attacks (it may
    hold more), "stale" if it was made by other commands (the spec changed since), "missing" if there is none."""
    path = result_path(spec, method, seed)
    if not os.path.isfile(path):
        return "missing"
    with open(path) as f:
        result = json.load(f)
    attacks = attack_keys(spec, seed)
    current = result["train"].get("key") == key(train_command(spec, method, seed)) \
        and set(attacks) <= {a.get("key") for a in result["attacks"]}
    return "done" if current else "stale"


def run_unit(spec: dict, method: str, seed: int, threads: int, say=print, train_only=False) -> bool:
    """Train and attack one (method, seed); write its result JSON. False if a command failed."""
    out = result_path(spec, method, seed)
    state = result_state(spec, method, seed)
    if state == "done":
        say(f"[{method} seed {seed}] done already: {out}")
        return True
    if state == "stale":
        say(f"[{method} seed {seed}] {out} was made with other commands than the experiment's now: redoing what changed")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    source, borrowed_train, borrowed_attacks = borrow(spec, method, seed) or (None, None, {})
    want = attack_keys(spec, seed)
    if source and all(k in borrowed_attacks for k in want):  # e.g. a λ sweep's λ = 0 runs are the main baseline's
        write_json(out, {"experiment": spec["name"], "method": method, "seed": seed, "borrowed_from": source,
                         "script": spec["methods"][method]["script"], "flags": spec["methods"][method]["flags"],
                         "train": borrowed_train, "attacks": [borrowed_attacks[k] for k in want]})
        say(f"[{method} seed {seed}] the same runs are in {source}: copied to {out}")
        return True
    work = unit_dir(spec, method, seed)
    os.makedirs(work, exist_ok=True)

    train_cmd = train_command(spec, method, seed)
    log = os.path.join(work, "train.log")
    done = parse_training_log(open(log).read()) if ran(log, train_cmd) else {"checkpoint": None}
    meta_path, train_source = os.path.join(work, "train.json"), None
    if done["checkpoint"] and os.path.isfile(done["checkpoint"]) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            train = json.load(f)
        say(f"[{method} seed {seed}] training reused: {done['checkpoint']}")
    elif source:  # another experiment trained exactly this (e.g. the same teams under another attack)
        train_source, train = source, borrowed_train
        say(f"[{method} seed {seed}] training borrowed from {train_source}: {train['checkpoint']}")
    else:
        before, earlier_s = unfinished_training(log, train_cmd)
        resume_from = last_checkpoint(before, f"{spec['name']}-{method}") if before else None
        if resume_from:
            say(f"[{method} seed {seed}] training continued from {resume_from}")
            before += ("" if before.endswith("\n") else "\n") + f"{PART_TIME} {earlier_s:.1f} s\n"  # killed mid-line
            code, seconds = run_logged([*train_cmd, "--resume", resume_from], log, threads, before)
            seconds += sum(map(float, re.findall(rf"^{re.escape(PART_TIME)} ([\d.]+) s$", before, re.M)))
        else:
            say(f"[{method} seed {seed}] train: {quote(train_cmd)}")
            code, seconds = run_logged(train_cmd, log, threads)
        done = parse_training_log(open(log).read())
        if code != 0 or not done["checkpoint"]:
            say(f"[{method} seed {seed}] training {'stopped' if STOP.is_set() else 'failed'} (exit {code}); see {log}")
            return False
        train = {"command": quote(train_cmd), "checkpoint": done["checkpoint"], "wall_s": round(seconds, 1),
                 "evals": done["evals"], "resumed_at": done["resumed_at"]}
        with open(meta_path, "w") as f:
            json.dump(train, f)

    if train_only:
        return True
    attacks = []
    for i, adversaries in enumerate(spec["attack"]["adversaries"]):
        report = os.path.join(work, f"attack_{adv_tag(adversaries)}.json")
        cmd = attack_command(spec, train["checkpoint"], seed, adversaries, i == 0, report)
        if key(cmd) in borrowed_attacks:
            say(f"[{method} seed {seed}] attack {adversaries} borrowed from {source}")
            attacks.append(borrowed_attacks[key(cmd)])
            continue
        if os.path.isfile(report) and os.path.isfile(report + ".wall") and ran(os.path.splitext(report)[0] + ".log", cmd):
            say(f"[{method} seed {seed}] attack {adversaries} reused")
            seconds = float(open(report + ".wall").read())
        else:
            say(f"[{method} seed {seed}] attack {adversaries}: {quote(cmd)}")
            code, seconds = run_logged(cmd, os.path.splitext(report)[0] + ".log", threads)
            if code != 0 or not os.path.isfile(report):
                say(f"[{method} seed {seed}] attack {adversaries} {'stopped' if STOP.is_set() else 'failed'} (exit {code})")
                return False
            with open(report + ".wall", "w") as f:
                f.write(f"{seconds:.1f}")
        with open(report) as f:
            attacks.append({"adversaries": adversaries, "command": quote(cmd), "key": key(cmd),
                            "wall_s": round(seconds, 1), "report": json.load(f)})

    evals = train["evals"]
    result = {"experiment": spec["name"], "method": method, "seed": seed,
              **({"train_borrowed_from": train_source} if train_source else {}),
              "script": spec["methods"][method]["script"], "flags": spec["methods"][method]["flags"],
              "train": {"command": train["command"], "key": key(train_cmd), "checkpoint": train["checkpoint"],
                        "wall_s": train["wall_s"],
                        "final_step": evals[-1][0] if evals else None,
                        "final_eval_return": evals[-1][1] if evals else None,
                        "final_eval_success": evals[-1][2] if evals else None, "evals": evals,
                        "resumed_at": train.get("resumed_at", [])},
              "attacks": attacks}
    write_json(out, result)
    say(f"[{method} seed {seed}] result written: {out}")
    return True


def cmd_run(spec: dict, workers: int, index, only_methods, only_seeds, train_only=False) -> int:
    todo = units(spec)
    if index is not None:
        if not 0 <= index < len(todo):
            raise SpecError(f"--index must be in [0, {len(todo) - 1}], got {index}")
        todo = [todo[index]]
    todo = [(m, s) for m, s in todo if (not only_methods or m in only_methods) and (not only_seeds or s in only_seeds)]
    # the cores we may use (Slurm's allocation) shared among the workers, unless OMP_NUM_THREADS says otherwise
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // workers))
    lock = threading.Lock()

    def say(line):
        with lock:
            print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    say(f"{len(todo)} units, {workers} worker(s), OMP_NUM_THREADS={threads}")
    start = time.time()
    pool = ThreadPoolExecutor(workers)
    try:
        ok = list(pool.map(lambda u: run_unit(spec, *u, threads, say, train_only), todo))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: let every running command save, then stop
        say("interrupted: stopping the running commands (they save their checkpoints)")
        STOP.set()
        for proc in list(CHILDREN):
            proc.send_signal(signal.SIGTERM)
        pool.shutdown(wait=True, cancel_futures=True)
        return 130
    pool.shutdown()
    say(f"finished {sum(ok)}/{len(ok)} units in {time.time() - start:.0f} s")
    return 0 if all(ok) else 1


# ---------------------------------------------------------------------------------------------
# Statistics across runs (rliable's definitions, one task)
# ---------------------------------------------------------------------------------------------
def mean(x):
    """Mean over the last axis (over runs)."""
    return np.mean(x, axis=-1)


def iqm(x):
    """Interquartile mean over the last axis: the mean of the middle 50% of the sorted scores.

    For n not divisible by 4 the boundary scores count with fractional weight, so that IQM is
    continuous in n (rliable trims whole scores with scipy's trim_mean; both agree when 4 | n).
    """
    x = np.sort(np.asarray(x, dtype=float), axis=-1)
    n = x.shape[-1]
    ranks = np.arange(n)
    w = np.clip(np.minimum(ranks + 1, 0.75 * n) - np.maximum(ranks, 0.25 * n), 0.0, 1.0)
    return (x * w).sum(-1) / w.sum()


def prob_improvement(x, y):
    """P(X > Y) for a random run of each, over the last axis: the Mann-Whitney U statistic / (n·m),
    ties counting 1/2."""
    x, y = np.asarray(x, dtype=float)[..., :, None], np.asarray(y, dtype=float)[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean((-2, -1))


def bootstrap_ci(stat, samples: list, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> list:
    """95% percentile-bootstrap interval of ``stat(*samples)``: each sample (the runs of one method)
    is resampled with replacement on its own, ``reps`` times."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(s, dtype=float) for s in samples]
    draws = stat(*(a[rng.integers(0, a.size, (reps, a.size))] for a in arrays))
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def run_conditions(result: dict, adversary_sets: list) -> dict:
    """One run's evaluated conditions by score name: each name maps to the report entries it averages (one per
    adversary set of that size for the adversary-dependent conditions, renamed ``<name>_k<k>``; for ``strongest_k<k>``
    the most damaging adversary per set, trained or scripted, judged by the trained adversary's objective: the team
    return, or with ``--adversary-objective defenders`` the defenders' own). Attack sets outside the spec are ignored."""
    wanted = [sorted(a) for a in adversary_sets]
    attacks = [a for a in result["attacks"] if sorted(a["adversaries"]) in wanted]
    if not attacks:
        return {}

    def per_adversary(name):  # conditions that depend on who the adversaries are
        return name in ("random", "worstcase") or name.startswith("scripted_")

    def strongest(report):  # by what the trained adversary minimised: the team return, or the defenders' own
        by_defenders = report.get("adversary_objective", "team") == "defenders"
        c = report["conditions"]
        return min((c[n] for n in c if n == "worstcase" or n.startswith("scripted_")),
                   key=lambda e: e["task"]["defender_return"] if by_defenders else e["return_mean"])

    found = {name: [c] for name, c in attacks[0]["report"]["conditions"].items() if not per_adversary(name)}
    for k in sorted({len(a["adversaries"]) for a in attacks}):
        reports = [a["report"] for a in attacks if len(a["adversaries"]) == k]
        for name in [n for n in reports[0]["conditions"] if per_adversary(n)]:
            found[f"{name}_k{k}"] = [r["conditions"][name] for r in reports if name in r["conditions"]]
        if any(n.startswith("scripted_") for n in reports[0]["conditions"]):
            found[f"strongest_k{k}"] = [strongest(r) for r in reports]
    return found


def run_scores(result: dict, adversary_sets: list) -> dict:
    """One run's score (mean evaluation return) per condition."""
    return {name: float(np.mean([c["return_mean"] for c in entries]))
            for name, entries in run_conditions(result, adversary_sets).items()}


def run_task_measures(result: dict, adversary_sets: list) -> dict:
    """One run's task measures (quadrotors: the defenders' own return, distance to the goal, ...) per condition that
    has them, averaged like the scores."""
    return {name: {m: float(np.mean([c["task"][m] for c in entries])) for m in entries[0]["task"]}
            for name, entries in run_conditions(result, adversary_sets).items() if all("task" in c for c in entries)}


def aggregate(spec: dict, only=None) -> dict:
    """Scores of every finished run (or of the ``only`` (method, seed) pairs) and the statistics across them."""
    folder = os.path.join("results", spec["name"])
    scores, task, seeds, evals, cost, stale = {}, {}, {}, {}, {"train_s": 0.0, "attack_s": 0.0}, []
    order = list(spec["methods"])
    for method, seed in sorted(units(spec), key=lambda u: order.index(u[0])):  # tables list methods as the spec does
        if only is not None and (method, seed) not in only:
            continue
        path = result_path(spec, method, seed)
        state = result_state(spec, method, seed)
        if state == "stale":  # made by other commands than the spec's: not part of this experiment
            stale.append(path)
        if state != "done":
            continue
        with open(path) as f:
            result = json.load(f)
        s = run_scores(result, spec["attack"]["adversaries"])
        for cond, value in s.items():
            scores.setdefault(method, {}).setdefault(cond, []).append(value)
        for cond, values in run_task_measures(result, spec["attack"]["adversaries"]).items():
            for m, value in values.items():
                task.setdefault(method, {}).setdefault(cond, {}).setdefault(m, []).append(value)
        seeds.setdefault(method, []).append(seed)
        evals.setdefault(method, []).append(result["train"].get("evals") or [])
        cost["train_s"] += result["train"]["wall_s"]
        cost["attack_s"] += sum(a["wall_s"] for a in result["attacks"])
    base = spec["baseline"]
    found = list(scores.get(base, next(iter(scores.values()), {})))
    first = ["natural"] + [c for prefix in ("strongest_k", "worstcase_k", "scripted_", "random_k") for c in sorted(found)
                           if c.startswith(prefix)]
    conditions = [c for c in first if c in found] + [c for c in found if c not in first]
    task_means = {m: {c: {k: float(mean(v)) for k, v in t.items()} for c, t in per.items()} for m, per in task.items()}
    # the defenders' own return where the env measures it (quads): the team return also counts the adversaries' own
    # reward, so an adversary that crashes itself lowers it without touching the team
    defended = {m: {c: t["defender_return"] for c, t in per.items() if "defender_return" in t} for m, per in task.items()}
    return {"experiment": spec["name"], "baseline": base, "seeds": seeds, "conditions": conditions,
            "cost_s": {k: round(v) for k, v in cost.items()}, "bootstrap_reps": BOOTSTRAP_REPS, "stale_skipped": stale,
            "methods": statistics(scores, conditions, base), "curves": {m: learning_curve(runs) for m, runs in evals.items()},
            "folder": folder, "task_measures": task_means,
            **({"defenders": statistics(defended, conditions, base)} if any(defended.values()) else {})}


def statistics(scores: dict, conditions: list, base: str) -> dict:
    """Per method and condition: the runs' scores, mean and IQM with bootstrap intervals, the drop from the natural
    score, and P(method > base) (and P(smaller drop)) with intervals."""
    table = {}
    for method, per_cond in scores.items():
        table[method] = {}
        for cond in conditions:
            x = per_cond.get(cond, [])
            if not x:
                continue
            entry = {"runs": x, "mean": float(mean(x)), "iqm": float(iqm(x)),
                     "mean_ci95": bootstrap_ci(mean, [x]), "iqm_ci95": bootstrap_ci(iqm, [x])}
            if cond != "natural" and "natural" in per_cond:
                drop = list(np.subtract(per_cond["natural"], x))
                entry["drop"] = {"mean": float(mean(drop)), "mean_ci95": bootstrap_ci(mean, [drop])}
            y = scores.get(base, {}).get(cond, [])
            if method != base and len(y) and len(x):
                entry["p_improvement"] = float(prob_improvement(x, y))
                entry["p_improvement_ci95"] = bootstrap_ci(prob_improvement, [x, y])
                if "drop" in entry and "natural" in scores[base]:
                    y_drop = list(np.subtract(scores[base]["natural"], y))
                    # a smaller drop is better: P(drop_X < drop_Y)
                    entry["drop"]["p_smaller"] = float(prob_improvement(-np.asarray(drop), -np.asarray(y_drop)))
            table[method][cond] = entry
    return table


def learning_curve(runs: list) -> dict:
    """The greedy evaluations of a method's training runs ([(step, return, success), ...] each) at the steps that
    every run evaluated: mean, min and max of the return and the success rate across runs."""
    steps = sorted(set.intersection(*[{e[0] for e in run} for run in runs]))
    curve = {"steps": steps}
    for i, name in ((1, "return"), (2, "success")):
        at = np.array([[dict((e[0], e[i]) for e in run)[s] for s in steps] for run in runs], dtype=float)
        curve.update({f"{name}_mean": at.mean(0).tolist(), f"{name}_min": at.min(0).tolist(),
                      f"{name}_max": at.max(0).tolist()} if steps else {})
    return curve


def score_table(table: dict, summary: dict) -> list:
    """Markdown rows: per condition each method's mean (IQM [interval]) and P(method > baseline) [interval]."""
    base, methods = summary["baseline"], list(table)
    others = [m for m in methods if m != base]
    head = "| condition | " + " | ".join(f"{m} (n={len(summary['seeds'][m])})" for m in methods)
    lines = [head + "".join(f" | P({m} > {base})" for m in others) + " |", "|" + "---|" * (1 + len(methods) + len(others))]

    def cell(e):
        lo, hi = e["iqm_ci95"]
        return f"{e['mean']:.2f} (IQM {e['iqm']:.2f} [{lo:.2f}, {hi:.2f}])"

    for cond in summary["conditions"]:
        row = [cond] + [cell(table[m][cond]) if cond in table[m] else "–" for m in methods]
        for m in others:
            e = table[m].get(cond)
            row.append(f"{e['p_improvement']:.2f} [{e['p_improvement_ci95'][0]:.2f}, {e['p_improvement_ci95'][1]:.2f}]"
                       if e and "p_improvement" in e else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(summary: dict) -> str:
    base, methods = summary["baseline"], list(summary["methods"])
    others = [m for m in methods if m != base]
    lines = score_table(summary["methods"], summary)
    lines += ["", "Drop from the natural return (mean over runs, 95% bootstrap interval; smaller is more robust):", "",
              "| condition | " + " | ".join(methods) + "".join(f" | P(drop {m} < drop {base})" for m in others) + " |",
              "|" + "---|" * (1 + len(methods) + len(others))]
    for cond in summary["conditions"]:
        if cond == "natural":
            continue
        row = [cond]
        for m in methods:
            d = summary["methods"][m].get(cond, {}).get("drop")
            row.append(f"{d['mean']:.2f} [{d['mean_ci95'][0]:.2f}, {d['mean_ci95'][1]:.2f}]" if d else "–")
        for m in others:
            d = summary["methods"][m].get(cond, {}).get("drop")
            row.append(f"{d['p_smaller']:.2f}" if d and "p_smaller" in d else "–")
        lines.append("| " + " | ".join(row) + " |")
    if "defenders" in summary:
        lines += ["", "The defenders' own return (the mean over the agents the team's policy controls: not adversaries, "
                  "not disabled), mean over runs:", ""] + score_table(summary["defenders"], summary)
    task = summary.get("task_measures", {})
    if task:
        lines += ["", "The defenders (the agents the team's policy controls: not adversaries, not disabled), mean over runs: "
                  "their own return / mean distance to the goal at the end / share within the success radius / share "
                  "on the floor; collisions per episode (all agents):", "",
                  "| condition | " + " | ".join(task) + " |", "|" + "---|" * (1 + len(task))]
        for cond in summary["conditions"]:
            row = [cond]
            for t in task.values():
                e = t.get(cond)
                row.append(f"{e['defender_return']:.2f} / {e['final_dist']:.2f} m / {e['within_radius']:.0%} / "
                           f"{e['on_floor']:.0%}; {e['collisions']:.2f}" if e else "–")
            lines.append("| " + " | ".join(row) + " |")
    curves = {m: c for m, c in summary.get("curves", {}).items() if c["steps"]}
    if curves:
        lines += ["", "Training: greedy evaluation return and success rate during training (mean over runs, [min, max]):",
                  "", "| env steps | " + " | ".join(curves) + " |", "|" + "---|" * (1 + len(curves))]
        steps = sorted(set.union(*[set(c["steps"]) for c in curves.values()]))
        shown = sorted({steps[round(i * (len(steps) - 1) / 9)] for i in range(10)}) if len(steps) > 10 else steps
        for step in shown:
            row = [f"{step:,}"]
            for c in curves.values():
                i = c["steps"].index(step) if step in c["steps"] else None
                row.append("–" if i is None else f"{c['return_mean'][i]:.2f} [{c['return_min'][i]:.2f}, "
                           f"{c['return_max'][i]:.2f}], success {c['success_mean'][i]:.2f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, folder: str) -> None:
    """``summary.png``: the scores per condition and method; ``curves.png``: the training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, conds = list(summary["methods"]), summary["conditions"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(conds) * len(methods) ** 0.5 + 2), 4.5))
    for j, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(conds):
            e = summary["methods"][m].get(c)
            if e:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(e["iqm"])
                lo.append(e["iqm"] - e["iqm_ci95"][0])
                hi.append(e["iqm_ci95"][1] - e["iqm"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{m} (n={len(summary['seeds'][m])})")
    ax.set_xticks(range(len(conds)), conds, rotation=30, ha="right")
    ax.set_ylabel("team return, IQM over runs (95% bootstrap CI)")
    ax.set_title(summary["experiment"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "summary.png"), dpi=100)
    plt.close(fig)
    curves = {m: c for m, c in summary.get("curves", {}).items() if c["steps"]}
    if not curves:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, c in curves.items():
        for ax, name in zip(axes, ("return", "success")):
            line, = ax.plot(c["steps"], c[f"{name}_mean"], label=f"{m} (n={len(summary['seeds'][m])})")
            ax.fill_between(c["steps"], c[f"{name}_min"], c[f"{name}_max"], color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("greedy evaluation return", "success rate")):
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"{label} (mean, min-max over runs)")
    axes[0].set_title(f"{summary['experiment']}: training")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "curves.png"), dpi=100)
    plt.close(fig)


def cmd_aggregate(spec: dict, make_plot: bool = True, only=None) -> int:
    """Aggregate the finished runs, print the tables and save them as the experiment's summary; of only some
    (``only``, (method, seed) pairs), print the tables and write nothing."""
    summary = aggregate(spec, only)
    if not summary["methods"]:
        raise SpecError(f"no finished runs under results/{spec['name']}/ yet")
    text = markdown(summary)
    print(text)
    if only is not None:  # a subset of the runs (e.g. those a selection rule keeps) is not the experiment's summary
        named = sorted(only, key=lambda u: (list(spec["methods"]).index(u[0]), u[1]))
        unfinished = [f"{m}:{s}" for m, s in named if s not in summary["seeds"].get(m, [])]
        print(f"runs {', '.join(f'{m}:{s}' for m, s in named)} only: nothing written"
              + (f"; not finished, so left out: {', '.join(unfinished)}" if unfinished else ""))
        return 0
    folder = summary["folder"]
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text)
    if make_plot:
        plot(summary, folder)
    for path in summary["stale_skipped"]:
        print(f"skipped {path}: made with other commands than the experiment's now (run the experiment to redo it)")
    print(f"cost: {summary['cost_s']['train_s'] / 60:.1f} min training, {summary['cost_s']['attack_s'] / 60:.1f} min "
          f"attacks (sum over units); written to {summary['folder']}/summary.{{json,md{',png' if make_plot else ''}}}"
          f"{' and curves.png' if make_plot and any(c['steps'] for c in summary['curves'].values()) else ''}")
    return 0


# ---------------------------------------------------------------------------------------------
# Plan and Slurm
# ---------------------------------------------------------------------------------------------
def cmd_plan(spec: dict) -> int:
    for i, (method, seed) in enumerate(units(spec)):
        work = unit_dir(spec, method, seed)
        state = result_state(spec, method, seed)
        done = {"done": " (done)", "stale": " (stale: made with other commands)", "missing": ""}[state]
        print(f"# unit {i}: {method}, seed {seed}{done}")
        print(quote(train_command(spec, method, seed)))
        for j, adversaries in enumerate(spec["attack"]["adversaries"]):
            report = os.path.join(work, f"attack_{adv_tag(adversaries)}.json")
            print(quote(attack_command(spec, "<checkpoint of the line above>", seed, adversaries, j == 0, report)))
    return 0


def slurm_script(spec: dict, spec_path: str, cpus: int, hours: float) -> str:
    n = len(units(spec))
    rel = os.path.relpath(os.path.abspath(spec_path), ROOT)
    return (f"#!/bin/bash\n"
            f"#SBATCH --job-name={spec['name']}\n"
            f"#SBATCH --array=0-{n - 1}\n"
            f"#SBATCH --cpus-per-task={cpus}\n"
            f"#SBATCH --mem=4G\n"
            f"#SBATCH --time={int(hours)}:{int(round(hours % 1 * 60)):02d}:00\n"
            f"#SBATCH --output=runs/slurm-%A_%a.out\n"
            f"# {n} units (method, seed): train, then attack; task i runs unit i, skipping what is done\n"
            f"cd {shlex.quote(ROOT)}\n"
            f"export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK\n"
            f"python benchmark/robustness.py run {shlex.quote(rel)} --index $SLURM_ARRAY_TASK_ID --workers 1\n")


def check_seeds(spec: dict, seeds) -> None:
    """Refuse seeds the experiment does not have (they would select nothing, silently)."""
    unknown = sorted(set(seeds or []) - set(spec["seeds"]))
    if unknown:
        raise SpecError(f"unknown seeds {unknown}; the experiment has {', '.join(map(str, spec['seeds']))}")


def parse_runs(spec: dict, words: list) -> set:
    """``METHOD:SEED`` words as (method, seed) pairs, each one the experiment has."""
    pairs = set()
    for word in words:
        method, _, seed = word.rpartition(":")
        if method not in spec["methods"] or not seed.isdecimal() or int(seed) not in spec["seeds"]:
            raise SpecError(f"--runs {word}: not METHOD:SEED of this experiment (methods {', '.join(spec['methods'])}; "
                            f"seeds {', '.join(map(str, spec['seeds']))})")
        pairs.add((method, int(seed)))
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("plan", "run", "slurm", "aggregate"):
        p = sub.add_parser(name)
        p.add_argument("experiment", help="the experiment's TOML file")
        if name == "run":
            p.add_argument("--workers", type=int, default=1, help="units run in parallel")
            p.add_argument("--index", type=int, default=None, help="run only this unit (0-based, as `plan` numbers them)")
            p.add_argument("--methods", nargs="*", default=None, help="run only these methods")
            p.add_argument("--seeds", nargs="*", type=int, default=None, help="run only these seeds")
            p.add_argument("--train-only", action="store_true", help="train, attack later (e.g. after a fix to the attack)")
        if name == "slurm":
            p.add_argument("--cpus", type=int, default=2, help="CPUs per array task")
            p.add_argument("--hours", type=float, default=2.0, help="time limit per array task")
        if name == "aggregate":
            p.add_argument("--no-plot", action="store_true")
            p.add_argument("--seeds", nargs="+", type=int, default=None,
                           help="only these seeds: print the tables, write nothing")
            p.add_argument("--runs", nargs="+", default=None, metavar="METHOD:SEED",
                           help="only these runs (e.g. the teams a selection rule keeps): print the tables, write nothing")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.experiment)
        if args.command == "plan":
            return cmd_plan(spec)
        if args.command == "run":
            if args.workers < 1:
                raise SpecError(f"--workers must be >= 1, got {args.workers}")
            unknown = set(args.methods or []) - set(spec["methods"])
            if unknown:
                raise SpecError(f"unknown methods {sorted(unknown)}; the experiment has {', '.join(spec['methods'])}")
            check_seeds(spec, args.seeds)
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM acts like Ctrl-C
            return cmd_run(spec, args.workers, args.index, args.methods, args.seeds, args.train_only)
        if args.command == "slurm":
            if args.cpus < 1 or not 0 < args.hours < 1000 or not math.isfinite(args.hours):
                raise SpecError("--cpus must be >= 1 and --hours in (0, 1000)")
            print(slurm_script(spec, args.experiment, args.cpus, args.hours), end="")
            return 0
        if args.runs is not None:
            if args.seeds is not None:
                raise SpecError("--runs and --seeds do not go together: name the runs")
            return cmd_aggregate(spec, make_plot=False, only=parse_runs(spec, args.runs))
        if args.seeds is not None:
            check_seeds(spec, args.seeds)
            return cmd_aggregate(spec, make_plot=False, only={(m, s) for m in spec["methods"] for s in args.seeds})
        return cmd_aggregate(spec, not args.no_plot)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
