"""Shared by the script tests: run a script in a subprocess (or, for refusals at start-up, in this process),
find what it wrote, random-play baselines."""

import contextlib
import glob
import io
import logging
import os
import random
import runpy
import signal
import subprocess
import sys
import warnings

import numpy as np
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


def run_in_process(script, cwd, *args, check=True, timeout=120):
    """Run ``script``'s ``__main__`` in this process as ``run_script`` runs it in a subprocess, and return the same
    ``returncode``, ``stdout`` and ``stderr``: for the refusals at start-up, which take a fraction of a second here
    against 2-4 s of interpreter start and imports there.

    The exit code is that of ``SystemExit``; any other exception propagates, failing the test (where a subprocess
    would exit 1 with a traceback). A run that gets past start-up is stopped after ``timeout`` seconds (SIGALRM).
    What the scripts change of the process is restored: cwd, argv, sys.path, environment, stop-signal handlers,
    torch threads, RNG states, cudnn.deterministic, warning filters and root log handlers. Modules they import
    (envs loaded lazily, the script attack_worstcase loads) stay imported, as after an import in a test.
    """
    os.makedirs(cwd, exist_ok=True)
    path = str(script) if os.path.isabs(str(script)) else os.path.join(ROOT, f"{script}.py")
    argv = [path, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM)}
    saved_argv, saved_path, saved_cwd, saved_env = sys.argv[:], sys.path[:], os.getcwd(), dict(os.environ)
    threads, deterministic = torch.get_num_threads(), torch.backends.cudnn.deterministic
    log_handlers = logging.root.handlers[:]
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()

    def timed_out(signum, frame):
        raise TimeoutError(f"{' '.join(argv)} still runs after {timeout} s: it got past start-up")

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # what a fresh interpreter prints on stderr: warnings under Python's default filters (pytest would
            # record them instead), log records of WARNING and above through logging's last resort (no handlers)
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category, append=True)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            logging.root.handlers = []
            os.environ.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
            torch.set_num_threads(1)
            sys.argv = argv
            sys.path.insert(0, os.path.dirname(path))  # as `python path` does
            os.chdir(cwd)
            signal.signal(signal.SIGALRM, timed_out)
            signal.alarm(timeout)
            try:
                runpy.run_path(path, run_name="__main__")
                returncode = 0
            except SystemExit as e:  # as the interpreter exits: None is 0, a message is printed and exits 1
                returncode = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if returncode == 1 and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException as e:
                e.add_note(f"in-process run of {' '.join(argv)}\nstdout: {out.getvalue()}\nstderr: {err.getvalue()}")
                raise
            finally:
                signal.alarm(0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic = deterministic
        logging.root.handlers = log_handlers
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    if check and returncode != 0:
        raise AssertionError(f"{script} exit {returncode}\n{out.getvalue()}\n{err.getvalue()}")
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


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
        actions = torch.randint(0, env.n_actions, (episodes, env.n_agents), generator=gen)
        *_, reward, terminated, truncated, _ = env.step(actions)
        ret += reward * running
        running &= ~(terminated | truncated)
    return ret.mean().item()
