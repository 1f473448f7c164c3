"""Stop with one clear line, instead of an import error per test file, when the requirements are missing."""

import importlib.util
import sys

import pytest

REQUIRED = ("torch", "numpy", "gymnasium", "tyro", "lbforaging", "tensorboard")


def pytest_configure(config):
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(
            f"{sys.executable} lacks {', '.join(missing)}: run the tests in an environment "
            f"with `pip install -r requirements.txt` (as README's quick start), or run `bash .ci/run`")
