"""benchmark/tb_scalars.py: values at chosen steps from a TensorBoard log written here with known scalars."""

import os
import sys

from torch.utils.tensorboard import SummaryWriter

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import tb_scalars  # noqa: E402


def test_values_at_steps_are_the_last_logged_before(tmp_path, capsys):
    run = tmp_path / "runs" / "a_run"
    writer = SummaryWriter(str(run))
    for step, value in [(100, 1.5), (200, -2.0), (300, -4.25)]:
        writer.add_scalar("losses/entropy", value, step)
    writer.add_scalar("mi/upper_bound", 7.0, 250)
    writer.close()
    assert tb_scalars.main([str(run), "--tags", "losses/entropy", "mi/upper_bound", "no/such_tag",
                            "--at", "50", "100", "299", "1e6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | tag | 50 | 100 | 299 | 1,000,000 |"
    assert out[2:] == ["| a_run | losses/entropy | - | 1.5 | -2 | -4.25 |",
                       "| a_run | mi/upper_bound | - | - | 7 | 7 |",
                       "| a_run | no/such_tag | - | - | - | - |"]


def test_a_resumed_run_replaces_the_steps_it_redid(tmp_path):
    """--resume appends a second event file starting at the checkpoint's step: from there its values count, the cut
    off part's are dropped (here the first part ran on to step 300, the continuation restarted at 200)."""
    run = tmp_path / "a_run"
    first = SummaryWriter(str(run))
    for step, value in [(100, 1.0), (200, 2.0), (300, 3.0)]:
        first.add_scalar("losses/entropy", value, step)
    first.close()
    second = SummaryWriter(str(run))
    for step, value in [(200, -2.0), (300, -3.0), (400, -4.0)]:
        second.add_scalar("losses/entropy", value, step)
    second.close()
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    points = tb_scalars.scalars(str(run), ["losses/entropy"])["losses/entropy"]
    assert points == [(100, 1.0), (200, -2.0), (300, -3.0), (400, -4.0)]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert tb_scalars.main([str(tmp_path), "--at", "10"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no TensorBoard event file\n"
    assert tb_scalars.main([str(tmp_path), "--at", "nan"]) == 2
    assert capsys.readouterr().err == "error: --at takes finite env steps >= 0\n"
