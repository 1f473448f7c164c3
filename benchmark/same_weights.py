"""Does a refactoring change what the scripts compute? Tiny seeded runs of this tree against a git revision.

    python benchmark/same_weights.py --against HEAD            # every script, every case
    python benchmark/same_weights.py --against 41c7e1c --cases mir3_qmix ibal_qmix

Each case trains one script for a few hundred env steps (learning, evaluation and a mid-run resume
included), once with this tree and once with REV (``git archive`` into a temporary folder), then the
attack script runs on the MADDPG and QMIX checkpoints. Every tensor and number in the checkpoints (weights,
optimiser and RNG states, counters) and in the attack reports must be equal; strings such as paths are
ignored, and so are the saved flags, which a refactoring may rename. Prints one line per case and exits 1
if any differs. Same machine, same library build: that is what makes the comparison bit-exact.
"""

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-envs", "4", "--eval-interval", "240", "--eval-episodes", "3", "--hidden-dim", "16"]
OFF_POLICY = [*TINY, "--learning-starts", "160", "--batch-size", "2", "--buffer-size", "2000"]
REND = ["--n-agents", "3", "--episode-limit", "20"]
# name: (script, flags, resumed to this many steps from a first run of 480 (None: no resume))
CASES = {
    "mir3_maddpg": ("mir3_maddpg", ["--env-id", "rendezvous", *REND, *OFF_POLICY, "--club-hidden-dim", "16",
                                    "--mi-coef", "0.05", "--env-kwargs", '{"world_size": 2.0}'], 960),
    "mir3_maddpg_rnn": ("mir3_maddpg", ["--env-id", "lbf:Foraging-5x5-2p-1f-coop-v3", "--rnn", *OFF_POLICY,
                                        "--club-hidden-dim", "16", "--mi-coef", "0.05"], None),
    "mir3_qmix": ("mir3_qmix", ["--env-id", "rendezvous-discrete", *REND, *OFF_POLICY, "--club-hidden-dim", "16",
                                "--mi-coef", "0.05", "--target-update-interval", "17"], 800),
    "mir3_mappo": ("mir3_mappo", ["--env-id", "rendezvous", *REND[:2], "--episode-limit", "16", "--num-steps", "16",
                                  "--num-minibatches", "2", "--update-epochs", "2", *TINY, "--club-hidden-dim", "16",
                                  "--club-batch-size", "32", "--club-steps", "2", "--mi-coef", "0.05"], 960),
    "mir3_mappo_discrete": ("mir3_mappo", ["--env-id", "lbf:Foraging-5x5-2p-1f-coop-v3", "--num-steps", "16", "--rnn",
                                           "--num-minibatches", "2", "--update-epochs", "2", *TINY,
                                           "--club-hidden-dim", "16", "--mi-coef", "0.05"], None),
    "ibal_qmix": ("ibal_qmix", ["--env-id", "rendezvous-discrete", "--n-agents", "4", "--episode-limit", "20",
                                *OFF_POLICY, "--obs-model-hidden-dim", "16", "--act-model-hidden-dim", "16",
                                "--estimator-batch-size", "32", "--warmup-fraction", "0.6"], 960),
}
ATTACK = ["--adversaries", "0", "--total-timesteps", "512", "--num-envs", "4", "--num-steps", "16",
          "--eval-episodes", "4", "--scripted", "stop", "flee", "--obs-noise", "0.3", "--action-repeat", "0.3",
          "--disable", "1", "--env-shift", "default"]
ATTACKED = ("mir3_maddpg", "mir3_qmix")


def run(root, cwd, script, *flags):
    proc = subprocess.run([sys.executable, os.path.join(root, f"{script}.py"), *flags], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"error: {script} {' '.join(flags)} failed in {root}:\n{proc.stderr[-2000:]}")


def outputs(root, cwd, name):
    """Train case ``name`` with the scripts in ``root`` (resumed once where the case says so), attack it where
    ATTACKED says so; return the checkpoint and the attack report (or None)."""
    script, flags, resume_to = CASES[name]
    run(root, cwd, script, *flags, "--total-timesteps", "480", "--seed", "3", "--exp-name", name)
    (path,) = glob.glob(os.path.join(cwd, "runs", "*", f"{name}.pt"))
    if resume_to is not None:
        run(root, cwd, script, "--resume", path, "--total-timesteps", str(resume_to))
    report = None
    if name in ATTACKED:
        out = os.path.join(cwd, "report.json")
        run(root, cwd, "attack_worstcase", "--checkpoint", path, "--seed", "3", *ATTACK, "--report", out,
            "--exp-name", "attack")
        with open(out) as f:
            report = json.load(f)
    return torch.load(path, map_location="cpu", weights_only=True), report


def differences(a, b, where=""):
    """Where the tensors and numbers of two nested checkpoints / reports differ (strings are ignored)."""
    if where == "ckpt/args":  # the flags, which may be renamed; the cases pass the same values to both trees
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where or '/'}: keys {sorted(a.keys() ^ b.keys())} in only one"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a != a) & (b != b)).all())
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [] if a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) else [f"{where}: {a} != {b}"]
    return [] if type(a) is type(b) else [f"{where}: {type(a).__name__} != {type(b).__name__}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, metavar="REV", help="git revision to compare this tree with")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_root = os.path.join(tmp, "rev")
        os.makedirs(old_root)
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.against], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"error: git archive {args.against}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", old_root], input=archive.stdout, check=True)
        failed = False
        for name in args.cases:
            results = []
            for label, root in (("new", ROOT), ("old", old_root)):
                cwd = os.path.join(tmp, f"{name}-{label}")
                os.makedirs(cwd)
                results.append(outputs(root, cwd, name))
            diff = differences(results[0][0], results[1][0], "ckpt") + differences(results[0][1], results[1][1], "report")
            failed |= bool(diff)
            print(f"{name}: {'identical' if not diff else 'DIFFERENT: ' + '; '.join(diff[:5])}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
