"""Training throughput and peak memory of the training scripts, plain backbone vs MIR3 / IBAL.

    python benchmark/train_throughput.py                 # every script that exists
    python benchmark/train_throughput.py --scripts mir3_maddpg --steps 60000
    python benchmark/train_throughput.py --scripts mir3_qmix ibal_qmix --repeats 3
    python benchmark/train_throughput.py --against 6fd5336 --no-memory --repeats 3   # this tree vs a commit

For each script and setting, the script runs twice, with ``learning_starts + short`` and
``learning_starts + short + steps`` total env steps; the difference of the two wall times is the
time of ``steps`` training env steps, so start-up, warm-up and the final evaluation cancel out.
Both settings run in this one process, one after the other, so their ratio is measured under the
same machine load; with ``--repeats n`` every run is timed n times, the settings interleaved, and the
fastest time counts (on a shared machine the speed drifts by tens of percent over minutes). Peak
memory (max RSS of the child) is read from a run of the default configuration that is long enough to
fill the replay buffer. ``--clock cpu`` times each run by its CPU seconds instead of wall time (for a machine
busy with other work; run with ``OMP_NUM_THREADS=1``, or CPU time counts every thread). ``--against REV``
also times the scripts (and envs) of git revision REV, interleaved
with this tree's, and prints the speed ratio per setting: did a change slow training?

Reference (authors' MIR3 code on a 2-core CPU, rendezvous with 10 agents, replay ratio 8):
MADDPG 116 env steps/s, MIR3 94 env steps/s (1.24x), 14-16 GiB peak memory.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHORS_SPS = {"mir3_maddpg": (116.0, 94.0)}  # MADDPG / MIR3 on rendezvous (the only ones measured)
# per script: (env args, learning_starts or None for on-policy, extra args shared by both settings,
# flags of the plain backbone, flags of the robust method ([]: the script's defaults), memory-run
# steps: enough to fill any replay buffer)
CONFIGS = {
    "mir3_maddpg": (["--env-id", "rendezvous"], 10_000, ["--replay-ratio", "8"], ["--mi-coef", "0"], [], 220_000),
    "mir3_qmix": (["--env-id", "lbf:Foraging-8x8-2p-2f-coop-v3"], 2_000, [], ["--mi-coef", "0"], [], 60_000),
    "mir3_mappo": (["--env-id", "quads-same-goal"], None, [], ["--mi-coef", "0"], [], 100_000),
    # IBAL attacks from the start here (no warm-up), so the timed steps include the attacker's cost
    "ibal_qmix": (["--env-id", "lbf:Foraging-8x8-2p-2f-coop-v3"], 2_000, [], ["--attack-k", "0"],
                  ["--warmup-fraction", "0"], 60_000),
}


def run(script, args, cwd, root=ROOT):
    """Wall time, peak RSS (bytes) and CPU time (user + system seconds) of one run of ``script`` (as found in
    ``root``) with ``args``."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(root, f"{script}.py"), *args], cwd=cwd,
                                env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
        elapsed = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{err.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: kilobytes on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=[s for s in CONFIGS if os.path.exists(os.path.join(ROOT, f"{s}.py"))])
    parser.add_argument("--steps", type=int, default=60_000, help="training env steps timed per setting")
    parser.add_argument("--short", type=int, default=10_000, help="training env steps of the short run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every run this many times, the settings interleaved, and keep the fastest")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory run")
    parser.add_argument("--against", metavar="REV", help="also time the scripts of this git revision and compare")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time runs by wall clock, or by CPU seconds (user + system): on a machine busy with other "
                             "work, CPU time of single-threaded runs (OMP_NUM_THREADS=1) is far less disturbed")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (last option)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    cwd = tempfile.mkdtemp(prefix="train_throughput_")
    roots = {"tree": ROOT}
    if args.against:  # REV's files in a folder of their own, run exactly like this tree's
        roots[args.against] = tempfile.mkdtemp(prefix="train_throughput_rev_")
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.against], capture_output=True)
        if archive.returncode != 0:
            parser.error(f"--against {args.against}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", roots[args.against]], input=archive.stdout, check=True)
    rows, versus = [], []
    for script in args.scripts:
        env_args, starts, extra, plain_flags, robust_flags, memory_steps = CONFIGS[script]
        common = [*env_args, *extra, *args.extra, "--eval-interval", "0", "--no-save-model"]
        if starts is not None:
            common += ["--learning-starts", str(starts)]
        starts = starts or 0
        robust = "IBAL" if script.startswith("ibal") else "MIR3"
        settings = (("plain", plain_flags), (robust, robust_flags))
        sps = {"plain": float("nan"), robust: float("nan")}
        # the machine's speed drifts by tens of percent over minutes: the fastest of several
        # interleaved repeats is the least disturbed measurement of each run
        best = {}
        for _ in range(0 if args.memory_only else args.repeats):
            for name, flags in settings:
                for version, root in roots.items():
                    for total in (starts + args.short, starts + args.short + args.steps):
                        elapsed, _, cpu = run(script, [*common, *flags, "--total-timesteps", str(total)], cwd, root)
                        took = cpu if args.clock == "cpu" else elapsed
                        best[version, name, total] = min(took, best.get((version, name, total), float("inf")))

        def rate(version, name):
            short, long = best[version, name, starts + args.short], best[version, name, starts + args.short + args.steps]
            return args.steps / (long - short)

        for name, _ in () if args.memory_only else settings:
            sps[name] = rate("tree", name)
            print(f"{script} {name}: {sps[name]:,.0f} training env steps per {args.clock} second", flush=True)
            if args.against:
                versus.append((script, name, sps[name], rate(args.against, name)))
        peak = None
        if not args.no_memory:
            _, peak, _ = run(script, [*env_args, *args.extra, "--no-save-model", "--total-timesteps", str(memory_steps)], cwd)
        rows.append((script, sps["plain"], sps[robust], peak))

    print(f"\n{'script':14s} {'plain SPS':>10s} {'robust SPS':>10s} {'cost':>10s} "
          f"{'x authors (plain/MIR3)':>23s} {'peak memory':>12s}")
    for script, plain, mir3, peak in rows:
        ref = AUTHORS_SPS.get(script)
        measured = plain == plain  # NaN with --memory-only
        speedup = f"{plain / ref[0]:.0f}x / {mir3 / ref[1]:.0f}x" if ref and measured else "-"
        mem = f"{peak / 2**30:.2f} GiB" if peak else "-"
        rates = f"{plain:10,.0f} {mir3:10,.0f} {plain / mir3:9.2f}x" if measured else f"{'-':>10s} {'-':>10s} {'-':>10s}"
        print(f"{script:14s} {rates} {speedup:>23s} {mem:>12s}")
    print(f"SPS = training env steps per {args.clock}-clock second (one step of one env, all agents); robust = MIR3, "
          "or IBAL for ibal_qmix; cost = plain SPS / robust SPS; peak memory = max RSS of a default run that fills the "
          "replay buffer")
    if versus:
        print(f"\n{'script':14s} {'setting':8s} {'tree SPS':>10s} {args.against + ' SPS':>14s} {'tree / rev':>10s}")
        for script, name, here, there in versus:
            print(f"{script:14s} {name:8s} {here:10,.0f} {there:14,.0f} {here / there:9.2f}x")


if __name__ == "__main__":
    main()
