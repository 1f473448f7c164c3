"""Stop with one clear line, instead of an import error per test file, when the requirements are missing.
Under pytest-xdist (pytest.ini runs two workers, one per core, whole files each) every worker uses one
thread, so that the workers do not slow each other down."""

import importlib.util
import os
import sys

import pytest

REQUIRED = ("torch", "numpy", "gymnasium", "tyro", "lbforaging", "tensorboard", "xdist")


def pytest_configure(config):
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(
            f"{sys.executable} lacks {', '.join(missing)}: run the tests in an environment "
            f"with `pip install -r requirements.txt` (as README's quick start), or run `bash .ci/run`")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
