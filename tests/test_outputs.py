"""Every training script checks where it will write before it trains: a bad --exp-name and a run
directory that cannot be created are refused at start-up with one line (exit 2)."""

import pytest

from helpers import run_in_process
from helpers import run_script as run

SCRIPTS = ["mir3_maddpg", "mir3_qmix", "mir3_mappo", "ibal_qmix"]


@pytest.mark.parametrize("script, name", [(script, "a/../b") for script in SCRIPTS]
                         + [("mir3_maddpg", ""), ("mir3_maddpg", "x" * 101)])
def test_bad_exp_name_is_refused(tmp_path, script, name):
    # in this process (seconds saved per case); the test below refuses in a real subprocess
    proc = run_in_process(script, tmp_path, "--exp-name", name, "--total-timesteps", "1000", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: --exp-name must be 1-100 characters")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_unwritable_run_directory_is_refused_before_training(tmp_path, script):
    (tmp_path / "runs").write_text("a file where the run directories should go")
    proc = run(script, tmp_path, "--total-timesteps", "1000", "--num-envs", "2", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: the run directory ") and "is not writable" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "global_step" not in proc.stdout
