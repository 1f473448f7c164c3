"""Shared by the script tests: run a script in a subprocess, find what it wrote, random-play baselines."""

import glob
import os
import subprocess
import sys

import torch

import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, cwd, *args, check=True):
    """Run ``script`` (a repo script name such as "mir3_maddpg", or a file path) with ``args`` in ``cwd``.

    One thread per process, so that the numbers do not depend on the machine's core count.
    """
    os.makedirs(cwd, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    path = str(script) if os.path.isabs(str(script)) else os.path.join(ROOT, f"{script}.py")
    proc = subprocess.run([sys.executable, path, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def only(pattern) -> str:
    """The one path matching ``pattern``."""
    paths = glob.glob(str(pattern))
    assert len(paths) == 1, paths
    return paths[0]


def checkpoint_of(cwd, exp_name):
    """The checkpoint dict of the one run of ``exp_name`` under ``cwd/runs``."""
    return torch.load(only(os.path.join(cwd, "runs", "*", f"{exp_name}.pt")), weights_only=True)


@torch.no_grad()
def random_return(env_id, episodes=64):
    """Mean return of uniform random actions on the evaluation episodes (seed 100001) of a discrete env."""
    env = envs.make(env_id, num_envs=episodes, seed=100_001)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    ret, running = torch.zeros(episodes), torch.ones(episodes, dtype=torch.bool)
    while running.any():
        *_, reward, terminated, truncated, _ = env.step(torch.randint(0, env.n_actions, (episodes, env.n_agents), generator=gen))
        ret += reward * running
        running &= ~(terminated | truncated)
    return ret.mean().item()
