"""The plot of an attack_worstcase.py report: team return per condition (mean and 95% interval) and, where the attack
run recorded them (rendezvous, quads), the top-down trajectories of one episode under the worst-case adversary.

    python attack_worstcase.py --checkpoint <ckpt> --plot              # report.png next to the report, trajectories too
    python benchmark/attack_plot.py runs/<attack run>/report.json      # the bars of any report, to report.png beside it
"""

import argparse
import json
import os

import numpy as np


def make_plot(path: str, conditions: dict, traj, adv_idx, title: str) -> None:
    """Write a PNG to ``path``: a bar per condition of the report; ``traj`` (a list of [N, 2] agent positions, or
    None) adds a panel of those trajectories, the adversary agents ``adv_idx`` in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if traj else 1, figsize=(12 if traj else 7, 5), squeeze=False)
    ax = axes[0, 0]
    names = list(conditions)
    ax.bar(range(len(names)), [conditions[n]["return_mean"] for n in names],
           yerr=[conditions[n]["return_ci95"] for n in names], capsize=4,
           color=["tab:red" if n == "worstcase" else "tab:gray" if n == "random" else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("team return (mean, 95% CI)")
    ax.set_title(title, fontsize=9)
    if traj:
        ax = axes[0, 1]
        xy = np.stack(traj)  # [T, N, 2]
        labelled = set()
        for i in range(xy.shape[1]):
            adv = i in adv_idx
            kind = "adversary" if adv else "defender"
            ax.plot(xy[:, i, 0], xy[:, i, 1], color="tab:red" if adv else "tab:blue", alpha=0.8,
                    label=None if kind in labelled else kind)
            labelled.add(kind)
            ax.scatter(xy[0, i, 0], xy[0, i, 1], color="k", s=8)
            ax.scatter(xy[-1, i, 0], xy[-1, i, 1], color="tab:red" if adv else "tab:blue", marker="x")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title("worst-case adversary, evaluation episode 0 (dot: start, x: end)", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="a report.json written by attack_worstcase.py")
    parser.add_argument("--out", default=None, help="the PNG to write (default: the report's path with .png)")
    args = parser.parse_args()
    with open(args.report) as f:
        report = json.load(f)
    out = args.out or os.path.splitext(args.report)[0] + ".png"
    make_plot(out, report["conditions"], None, report["adversaries"],
              f"{report['script']} on {report['env_id']}, adversaries {report['adversaries']}")
    print(f"plot written to {out}")
