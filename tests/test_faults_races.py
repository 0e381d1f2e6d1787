"""
The two races of a run folder, and a full disk: a run that another process finished (or saved)
between this one's look at its checkpoint and its lock is neither overwritten nor continued from an
older state; a checkpoint write that finds the disk full keeps the previous checkpoint whole.
"""

import errno
import os
import shutil

import torch

import train
from conftest import error_of, logged_losses, tiny_run_args
from lib import checkpoint


def finished_meanwhile(trained_run, run_dir, monkeypatch, then=None):
    """train.run_lock, with the shared run's checkpoint arriving in run_dir just before the lock is
    taken: another process finished (or saved) the run in between."""
    take = train.run_lock

    def lock_after_another_run_finished(folder):
        shutil.copytree(trained_run[1], run_dir, dirs_exist_ok=True)
        if then:
            then()
        return take(folder)

    monkeypatch.setattr(train, "run_lock", lock_after_another_run_finished)


def test_a_run_finished_between_the_check_and_the_lock_is_not_overwritten(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "tiny"
    finished_meanwhile(trained_run, run_dir, monkeypatch)
    message = error_of(train.main, tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "out")))
    assert message == (f"train.py: error: {run_dir / 'ckpt.pt'} exists: another process wrote it while this one "
                       f"started; pass --resume to continue it, or --run_name to start another run")
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(trained_run[1]))  # the finished run, as it finished
    assert all((run_dir / name).read_bytes() == (trained_run[1] / name).read_bytes() for name in os.listdir(run_dir))


def test_a_resume_whose_checkpoint_was_rewritten_before_the_lock_starts_again(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "tiny"
    shutil.copytree(trained_run[1], run_dir)
    finished_meanwhile(trained_run, run_dir, monkeypatch, then=lambda: os.utime(run_dir / "ckpt.pt", ns=(1, 1)))
    message = error_of(train.main, tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "out"), "--resume",
                                                 "--max_steps", "40"))
    assert message == f"train.py: error: {run_dir / 'ckpt.pt'} was rewritten by another process while this one " \
                      f"started: run the command again"
    assert checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))["step"] == 30


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(trained_run, tmp_path, monkeypatch):
    save, saves = torch.save, []

    def disk_full_at_the_second(state, f):
        saves.append(state["step"])
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(state, f)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_the_second)
    run_dir = tmp_path / "out" / "tiny"
    message = error_of(train.main, tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "out"),
                                                 "--max_steps", "20"))
    assert message == (f"train.py: error: could not write checkpoint {run_dir / 'ckpt.pt'}: No space left on device; "
                       f"the previous checkpoint is kept")
    assert saves == [10, 20]
    assert sorted(os.listdir(run_dir)) == ["ckpt.pt", "config.json", "log.jsonl"]  # no .tmp, no lock
    kept = checkpoint.load_checkpoint(str(run_dir / "ckpt.pt"))
    assert kept["step"] == 10 and kept["val_loss"] == [val for step, _, val in logged_losses(run_dir) if val][0]


def test_a_resume_refused_after_its_checks_keeps_config_json_and_the_checkpoint(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "tiny"
    shutil.copytree(trained_run[1], run_dir)
    monkeypatch.setattr(train, "learning_rate", lambda step, settings: float("nan"))  # the first update diverges
    before = {name: (run_dir / name).stat().st_mtime_ns for name in ("config.json", "ckpt.pt")}
    message = error_of(train.main, tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "out"), "--resume",
                                                 "--max_steps", "40"))
    assert message.startswith("train.py: error: loss became nan at step 32; the last good checkpoint")
    assert {name: (run_dir / name).stat().st_mtime_ns for name in before} == before  # written by a checkpoint only
