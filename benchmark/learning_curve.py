"""Learning curve of a training script, with reference policies on the same evaluation episodes.

    python benchmark/learning_curve.py                                    # mir3_maddpg default run
    python benchmark/learning_curve.py --script mir3_maddpg -- --mi-coef 0 --total-timesteps 300000

Runs the script (flags after ``--`` go to it), reads its greedy evaluations
(``global_step=... eval_return=... eval_success=...``) and prints them as a table. The scripts
evaluate on ``eval_episodes`` envs seeded with ``seed + 100000``, one episode each; this script
plays a uniform random policy and, on rendezvous, the scripted steer-to-centroid controller on
exactly those episodes, and reports the normalised score
``(R - R_random) / (R_scripted - R_random)`` (0 = random, 1 = scripted). ``--plot`` writes a PNG.
"""

import argparse
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import envs  # noqa: E402
from envs.rendezvous import scripted_actions  # noqa: E402

EVAL_LINE = re.compile(r"global_step=(\d+) eval_return=(-?[\d.]+) eval_success=([\d.]+)")


@torch.no_grad()
def reference_returns(env_id, seed, episodes, env_kwargs):
    """Mean return of a random policy and (rendezvous only) the scripted controller."""
    out = {}
    for name in ("random", "scripted"):
        if name == "scripted" and not env_id.startswith("rendezvous"):
            continue
        env = envs.make(env_id, num_envs=episodes, seed=seed + 100_000, **env_kwargs)
        env.reset()
        gen = torch.Generator().manual_seed(0)
        ret = torch.zeros(episodes)
        running = torch.ones(episodes, dtype=torch.bool)
        while running.any():
            if name == "scripted":
                actions = scripted_actions(env)
            elif env.is_discrete:
                actions = torch.randint(0, env.n_actions, (episodes, env.n_agents), generator=gen)
            else:
                actions = torch.rand(episodes, env.n_agents, env.n_actions, generator=gen) * 2 - 1
            *_, reward, terminated, truncated, _ = env.step(actions)
            ret += reward * running
            running &= ~(terminated | truncated)
        out[name] = ret.mean().item()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="mir3_maddpg")
    parser.add_argument("--plot", default=None, help="write the curve to this PNG")
    parser.add_argument("script_args", nargs="*", help="flags for the script (after --)")
    args = parser.parse_args()

    cmd = [sys.executable, os.path.join(ROOT, f"{args.script}.py"), *args.script_args]
    print("running:", " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    curve = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = EVAL_LINE.search(line)
        if m:
            curve.append((int(m[1]), float(m[2]), float(m[3])))
    if proc.wait() != 0:
        sys.exit(f"{args.script} failed with exit code {proc.returncode}")

    import tyro

    run_args = tyro.cli(__import__(args.script).Args, args=args.script_args)
    env_kwargs = {k: getattr(run_args, k) for k in ("n_agents", "episode_limit") if getattr(run_args, k, None) is not None}
    ref = reference_returns(run_args.env_id, run_args.seed, run_args.eval_episodes, env_kwargs)
    print(f"\n{run_args.env_id}, seed {run_args.seed}, {run_args.eval_episodes} greedy evaluation episodes")
    print("reference returns: " + ", ".join(f"{k} {v:.2f}" for k, v in ref.items()))
    scored = "scripted" in ref
    print(f"{'env steps':>10s} {'return':>9s} {'success':>8s}" + (f" {'normalised':>11s}" if scored else ""))
    for step, ret, succ in curve:
        norm = f" {(ret - ref['random']) / (ref['scripted'] - ref['random']):11.2f}" if scored else ""
        print(f"{step:10d} {ret:9.2f} {succ:8.2f}{norm}")
    if args.plot and curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", label=args.script)
        for name, value in ref.items():
            ax.axhline(value, ls="--", color="gray" if name == "random" else "green", label=name)
        ax.set_xlabel("env steps")
        ax.set_ylabel("greedy evaluation return")
        ax.set_title(f"{args.script} on {run_args.env_id}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
