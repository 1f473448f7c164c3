"""Scalars of training runs at chosen env steps, read from their TensorBoard logs.

    python benchmark/tb_scalars.py runs/<run> [more runs ...] --tags losses/entropy mi/upper_bound --at 3e6 6e6 12e6 24e6

Every script logs its losses and diagnostics (``losses/entropy``, ``mi/upper_bound``, ``eval/episodic_return``, ...)
against the env step. For each run and tag this prints the last value logged at or before each ``--at`` step
("-" where nothing was logged yet), so runs can be compared at the same points without opening TensorBoard.
"""

import argparse
import glob
import math
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: str, tags: list) -> dict:
    """``tag -> [(step, value), ...]`` of one run folder. A run continued with ``--resume`` has a second event file
    that starts at its checkpoint's step: from there on its points replace those of the part that was cut off."""
    files = glob.glob(os.path.join(run, "events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"{run}: no TensorBoard event file")
    parts = []
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        have = acc.Tags()["scalars"]
        parts.append((acc.FirstEventTimestamp(), {t: sorted(((e.step, e.value) for e in acc.Scalars(t)),
                                                            key=lambda p: p[0]) if t in have else [] for t in tags}))
    merged = {t: [] for t in tags}
    for _, part in sorted(parts, key=lambda p: p[0]):  # in the order they were written
        for t, points in part.items():
            if points:
                merged[t] = [p for p in merged[t] if p[0] < points[0][0]] + points
    return merged


def value_at(points: list, step: float):
    """The last value logged at or before ``step``, or None."""
    before = [v for s, v in points if s <= step]
    return before[-1] if before else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (runs/<run name>)")
    parser.add_argument("--tags", nargs="+", default=["losses/entropy", "eval/episodic_return"], help="scalar tags")
    parser.add_argument("--at", nargs="+", type=float, default=[1e6], help="env steps to read them at")
    args = parser.parse_args(argv)
    if not all(math.isfinite(s) and s >= 0 for s in args.at):
        print("error: --at takes finite env steps >= 0", file=sys.stderr)
        return 2
    print("| run | tag | " + " | ".join(f"{s:,.0f}" for s in args.at) + " |")
    print("|---|---|" + "---|" * len(args.at))
    for run in args.runs:
        try:
            logged = scalars(run, args.tags)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for tag, points in logged.items():
            cells = [value_at(points, s) for s in args.at]
            shown = " | ".join("-" if v is None else f"{v:.4g}" for v in cells)
            print(f"| {os.path.basename(os.path.normpath(run))} | {tag} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
