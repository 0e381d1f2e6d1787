"""
What goes wrong, and what the scripts do about it: every bad setting, damaged file, changed
dataset, second writer and full disk ends in one line naming the problem and a non-zero exit,
before anything that exists is changed; a run folder never ends up in a mixed state, and no
work is lost that a check could have saved. Tiny models, a few steps each.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import analyze
from experiments import bench
import eval_passkey
import eval_ppl
from experiments import grids
from experiments import grid_steps
from lib import settings as run_settings
import train
from conftest import HERE, error_of, logged_losses, snapshot, tiny_run_args

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fill a disk")


def copy_run(trained_run, tmp_path):
    """A copy of the shared tiny run in tmp_path/out/tiny, for a test that damages it."""
    shutil.copytree(trained_run[1], tmp_path / "out" / "tiny")
    return tmp_path / "out" / "tiny"


def resume_args(trained_run, tmp_path, *extra):
    """Resume the copied run on the shared run's dataset and token cache."""
    return tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "out"), "--resume", *extra)


def rewrite_checkpoint(path, change):
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


# =============================================================================
# train.py: every setting is checked before anything is read or written


@pytest.mark.parametrize("argv, named", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--beta1", "1.5"], "--beta1"), (["--beta2", "1"], "--beta2"), (["--weight_decay", "-1"], "--weight_decay"),
    (["--grad_clip", "-1"], "--grad_clip"), (["--grad_clip", "0"], "--grad_clip"),
    (["--min_lr_ratio", "-3"], "--min_lr_ratio"), (["--min_lr_ratio", "1.5"], "--min_lr_ratio"),
    (["--max_steps", "0"], "--max_steps"), (["--max_steps", "-5"], "--max_steps"),
    (["--warmup_steps", "-1"], "--warmup_steps"), (["--decay_steps", "-1"], "--decay_steps"),
    (["--eval_interval", "0"], "--eval_interval"), (["--log_interval", "0"], "--log_interval"),
    (["--batch_size", "0"], "--batch_size"), (["--eval_batches", "0"], "--eval_batches"),
    (["--passkey_frac", "1.5"], "--passkey_frac"), (["--seed", "-1"], "--seed"),
    (["--fope_grow", "ones"], "--fope_grow"), (["--tokenizer", "words"], "--tokenizer"),
    (["--vocab_size", "100"], "--vocab_size"), (["--n_embd", "30"], "--n_embd"),
    (["--fope_sin_pad", "nan"], "--fope_sin_pad"), (["--rope_theta", "0.5"], "--rope_theta"),
    (["--pe", "fope", "--train_len", "6"], "--train_len 6"),          # K = 0 kept frequencies
    (["--pe", "fope", "--n_embd", "4"], "n_embd / n_head"),           # head_dim 2: no pair to mix into
    (["--run_name", "../elsewhere"], "--run_name"),
])
def test_a_bad_setting_is_refused_in_one_line_before_anything_is_written(tmp_path, argv, named):
    message = error_of(train.main, tiny_run_args(tmp_path, *argv))
    assert message.startswith("train.py: error:") and named in message
    assert os.listdir(tmp_path) == ["corpus.txt"]  # the input alone: no run folder, no token cache


@pytest.mark.parametrize("content, reason", [(b"PK\x03\x04\x00\x00binary" * 500, "NUL bytes"),
                                             ("Ça, déjà vu.\n".encode("latin-1") * 500, "not UTF-8")])
def test_a_binary_dataset_is_refused(tmp_path, content, reason):
    dataset = tmp_path / "corpus.bin"
    dataset.write_bytes(content)
    message = error_of(train.main, tiny_run_args(tmp_path, "--dataset", str(dataset)))
    assert str(dataset) in message and reason in message
    assert not (tmp_path / "out" / "tiny").exists() and not (tmp_path / "data").exists()


# =============================================================================
# resume: the same data, a fitting checkpoint, a readable log, the schedule kept


def drop_last_merge(state):
    state["tokenizer"]["ranks"] = "".join(state["tokenizer"]["ranks"].splitlines(keepends=True)[:-1])


@pytest.mark.parametrize("change", ["text", "tokenizer"])
def test_resume_refuses_other_data_or_another_tokenizer_naming_both(tmp_path, change):
    args = tiny_run_args(tmp_path, "--max_steps", "2", "--eval_interval", "2")
    train.main(args)
    run_dir = tmp_path / "out" / "tiny"
    saved_hash = torch.load(run_dir / "ckpt.pt", weights_only=False)["data"]["hash"]
    if change == "text":  # the dataset's text changed between stop and resume
        (tmp_path / "corpus.txt").write_text("Other words entirely, line after line.\n" * 400)
    else:  # the checkpoint's tokenizer is not the one the cache holds
        rewrite_checkpoint(run_dir / "ckpt.pt", drop_last_merge)
    before = snapshot(run_dir)
    message = error_of(train.main, args + ["--resume", "--max_steps", "4"])
    assert message.startswith(f"train.py: error: cannot resume: {run_dir / 'ckpt.pt'}")
    if change == "text":
        hashes = re.findall(r"hash ([0-9a-f]{12})", message)
        assert len(hashes) == 2 and hashes[0] == saved_hash[:12] and hashes[1] != hashes[0]
    else:
        sizes = [int(n) for n in re.findall(r"bpe-300 \((\d+) tokens", message)]
        assert len(sizes) == 2 and sizes[0] == sizes[1] - 1  # the checkpoint's lost its last merge
    assert snapshot(run_dir) == before


def test_init_from_a_checkpoint_of_other_data_names_both(trained_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Other words entirely, line after line.\n" * 400)
    message = error_of(train.main, tiny_run_args(tmp_path, "--dataset", str(other), "--max_steps", "1",
                                                 "--init_from", str(trained_run[1] / "ckpt.pt")))
    assert "--init_from" in message and str(trained_run[0] / "corpus.txt") in message and str(other) in message
    assert not (tmp_path / "out" / "tiny").exists()


def test_a_copied_run_resumes_elsewhere_and_more_steps_keep_the_schedule(trained_run, tmp_path):
    before = snapshot(trained_run[1])
    lr, min_lr_ratio = run_settings.DEFAULTS["lr"], run_settings.DEFAULTS["min_lr_ratio"]
    for name, extra in (("kept", []), ("stretched", ["--decay_steps", "60"])):
        shutil.copytree(trained_run[1], tmp_path / "moved" / name)  # another out_dir, run name and cache
        train.main(tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "moved"), "--run_name", name,
                                 "--data_dir", str(tmp_path / "data"), "--max_steps", "34", "--resume", *extra))
        log = [json.loads(line) for line in (tmp_path / "moved" / name / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "loss" in r][-5:] == [30, 31, 32, 33, 34]
        new_lrs = [r["lr"] for r in log if "lr" in r and r["step"] > 30]
        if name == "kept":  # the schedule ended at step 30: the extra steps stay at its final rate
            assert new_lrs == pytest.approx([lr * min_lr_ratio] * 4)
        else:  # asked for: the cosine now runs to step 60
            assert new_lrs[0] > 2 * lr * min_lr_ratio and new_lrs == sorted(new_lrs, reverse=True)
    assert snapshot(trained_run[1]) == before


def break_shape(state):
    state["model"]["tok_emb.weight"] = torch.zeros(7, 5)


@pytest.mark.parametrize("damage, named", [
    (break_shape, "tok_emb.weight has shape (7, 5)"),
    (lambda state: state["model"].update({"bogus.weight": torch.zeros(1)}), "unexpected bogus.weight"),
    (lambda state: state.pop("optimizer"), "has no optimizer"),
    (lambda state: state.pop("train_config"), "has no train_config"),
    (lambda state: state["optimizer"].update(param_groups=[]), "damaged"),
    (lambda state: state.update(model_config="nonsense", model={}), "lacks"),
    (lambda state: state["train_config"].pop("decay_steps"), "does not hold this train.py's settings"),
    (lambda state: state.pop("trained"), "has no trained"),
    (lambda state: state.update(step="10"), "its step is '10', not a count of steps"),
    (lambda state: state.update(val_loss=None), "its val_loss is 'None', not a number"),
    (lambda state: state.update(trained={"seconds": "long"}), "its trained is"),
], ids=["wrong-shape", "extra-key", "no-optimizer", "no-train_config", "bad-optimizer", "no-weights",
        "settings-of-another-train.py", "no-training-time", "step-not-a-count", "no-val_loss", "bad-training-time"])
def test_resume_from_a_damaged_checkpoint_is_one_line_and_changes_nothing(trained_run, tmp_path, damage, named):
    run_dir = copy_run(trained_run, tmp_path)
    rewrite_checkpoint(run_dir / "ckpt.pt", damage)
    before = snapshot(run_dir)
    message = error_of(train.main, resume_args(trained_run, tmp_path, "--max_steps", "40"))
    assert message.startswith("train.py: error: cannot resume:") and named in message
    assert snapshot(run_dir) == before


def test_a_damaged_line_inside_the_log_is_named_and_nothing_changes(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path)
    lines = (run_dir / "log.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "log.jsonl").write_text("".join(lines[:2] + ["not json\n"] + lines[2:]))
    before = snapshot(run_dir)
    message = error_of(train.main, resume_args(trained_run, tmp_path, "--max_steps", "40"))
    assert "log.jsonl line 3 is not a log record" in message
    assert snapshot(run_dir) == before


def test_resume_without_a_checkpoint_says_to_start_the_run(tmp_path):
    message = error_of(train.main, tiny_run_args(tmp_path, "--resume"))
    assert "does not exist; start the run without --resume" in message
    assert not (tmp_path / "out" / "tiny").exists()


# =============================================================================
# one writer per run folder


def test_a_second_train_py_on_the_same_run_is_refused_before_touching_anything(tmp_path):
    args = tiny_run_args(tmp_path, "--max_steps", "100000", "--eval_interval", "100000", "--log_interval", "100000")
    lock = tmp_path / "out" / "tiny" / "train.lock"
    first = subprocess.Popen([sys.executable, str(HERE / "train.py"), *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert lock.read_text() == f"{first.pid}\n"
        second = subprocess.run([sys.executable, str(HERE / "train.py"), *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.count("\n") == 1 and f"being written by process {first.pid}" in second.stderr
        assert first.poll() is None and lock.read_text() == f"{first.pid}\n"  # the first run goes on
        first.send_signal(signal.SIGTERM)  # as a scheduler ends a run: one line, where it stopped, the lock released
        assert first.wait(timeout=60) == 143
        assert re.fullmatch(r"train\.py: stopped (at step \d+|before training began) \(SIGTERM\); no checkpoint "
                            r"was written, so the run starts over when run again\n", first.stderr.read())
        assert not lock.exists()
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("owner, named", [("live", "being written by process"), ("empty", "holds no process id")])
def test_a_run_folder_locked_by_a_live_process_is_refused(trained_run, tmp_path, owner, named):
    run_dir = copy_run(trained_run, tmp_path)
    (run_dir / "train.lock").write_text(f"{os.getpid()}\n" if owner == "live" else "")
    before = snapshot(run_dir)
    message = error_of(train.main, resume_args(trained_run, tmp_path, "--max_steps", "40"))
    assert named in message and str(run_dir / "train.lock") in message
    assert snapshot(run_dir) == before


# =============================================================================
# folders that cannot be written, a full disk


@pytest.mark.parametrize("flag", ["--out_dir", "--data_dir"])
def test_a_folder_that_cannot_be_made_is_named_in_one_line(tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    message = error_of(train.main, tiny_run_args(tmp_path, flag, str(blocker / "sub")))
    assert message.startswith("train.py: error: Not a directory:") and str(blocker) in message
    assert blocker.read_text() == "not a folder"


@needs_dev_full
def test_a_full_disk_stops_training_in_one_line_and_leaves_no_tmp(tmp_path):
    run_dir = tmp_path / "out" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "ckpt.pt.tmp").symlink_to("/dev/full")  # the checkpoint's write finds the disk full
    message = error_of(train.main, tiny_run_args(tmp_path, "--max_steps", "2", "--eval_interval", "2"))
    assert message == (f"train.py: error: could not write checkpoint {run_dir / 'ckpt.pt'}: No space left on device; "
                       f"there is no earlier checkpoint")
    assert sorted(os.listdir(run_dir)) == ["config.json", "log.jsonl"]  # no .tmp, no lock
    assert [step for step, _, _ in logged_losses(run_dir)] == [1, 2, 2]


# =============================================================================
# evaluation: every check before the first evaluation, nothing written that is not JSON


def evaluation_argv(script, trained_run, out):
    """Arguments besides --ckpt that make each script write into the folder `out`."""
    data_dir = ["--data_dir", str(trained_run[0] / "data")]
    return {"eval_ppl": ["--lengths", "16,32", "--out", str(out / "r.json"), *data_dir],
            "eval_passkey": ["--lengths", "1024", "--trials", "2", "--out", str(out / "r.json")],
            "analyze": ["--out_dir", str(out), *data_dir]}[script]


MAINS = {"eval_ppl": eval_ppl.main, "eval_passkey": eval_passkey.main, "analyze": analyze.main}


def make_nan(state):
    state["model"]["tok_emb.weight"][0, 0] = float("nan")


DAMAGES = {
    "nan-weights": (make_nan, "not finite"),
    "invalid-model_config": (lambda state: state["model_config"].update(n_head=3), "model_config is invalid"),
    "foreign-model_config": (lambda state: state["model_config"].update(xpos_scale=512), "differ in xpos_scale"),
    "other-data": (lambda state: state["data"].update(hash="0" * 64),
                   "differs from the one the checkpoint was trained on"),
    "step-not-a-count": (lambda state: state.update(step=torch.tensor(30)), "not a count of steps"),
}


@pytest.mark.parametrize("script, damage", [(script, damage) for script in MAINS for damage in DAMAGES
                                            if (script, damage) != ("eval_passkey", "other-data")])  # it reads no data
def test_every_checkpoint_is_checked_before_the_first_evaluation(trained_run, tmp_path, capsys, script, damage):
    damage, named = DAMAGES[damage]
    bad = tmp_path / "bad.pt"
    shutil.copy(trained_run[1] / "ckpt.pt", bad)
    rewrite_checkpoint(bad, damage)
    out = tmp_path / "results"
    out.mkdir()
    (out / "r.json").write_text("earlier results")
    before = snapshot(out)
    message = error_of(MAINS[script], ["--ckpt", str(trained_run[1] / "ckpt.pt"), str(bad),
                                       *evaluation_argv(script, trained_run, out)])
    assert message.startswith(f"{script}.py: error:") and str(bad) in message and named in message
    assert capsys.readouterr().out == ""  # the good first checkpoint was not evaluated either
    assert snapshot(out) == before


@pytest.mark.parametrize("script", [*MAINS, "bench"])
def test_an_output_folder_that_cannot_be_written_fails_before_the_work(trained_run, tmp_path, capsys, script):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    if script == "bench":
        message = error_of(bench.main, ["--pe", "rope", "--steps", "1", "--no_compile", "--out",
                                        str(blocker / "b.json")])
    else:
        message = error_of(MAINS[script], ["--ckpt", str(trained_run[1] / "ckpt.pt"),
                                           *evaluation_argv(script, trained_run, blocker / "sub")])
    assert message.startswith(f"{script}.py: error:") and "Not a directory" in message and str(blocker) in message
    assert capsys.readouterr().out == ""  # nothing was measured


def test_eval_ppl_refuses_a_non_finite_result_instead_of_writing_invalid_json(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_ppl, "chunked_ppl", lambda *args: (float("nan"), 10))
    out = tmp_path / "ppl.json"
    message = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--lengths", "16,32",
                                       "--data_dir", str(trained_run[0] / "data"), "--out", str(out)])
    assert "the loss at length 16 is nan" in message
    assert os.listdir(tmp_path) == []


@needs_dev_full
def test_a_full_disk_keeps_the_earlier_results_and_leaves_no_tmp(trained_run, tmp_path):
    out = tmp_path / "ppl.json"
    out.write_text("earlier results")
    (tmp_path / "ppl.json.tmp").symlink_to("/dev/full")
    message = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--lengths", "16",
                                       "--data_dir", str(trained_run[0] / "data"), "--out", str(out)])
    assert message == f"eval_ppl.py: error: No space left on device: {out}"
    assert os.listdir(tmp_path) == ["ppl.json"] and out.read_text() == "earlier results"


# =============================================================================
# the quick start writes no committed file


def test_default_outputs_are_untracked_and_the_grids_name_theirs(tmp_path):
    ignored = (HERE / ".gitignore").read_text().split()
    defaults = [eval_ppl.parse_args(["--ckpt", "x.pt"]).out, eval_passkey.parse_args(["--ckpt", "x.pt"]).out,
                analyze.parse_args(["--ckpt", "x.pt"]).out_dir]
    assert all(f"{Path(path).parts[0]}/" in ignored for path in defaults)  # each lands in a folder git ignores
    for grid in grids.GRIDS.values():  # the grids write results/ themselves
        for title, command, _ in grid_steps.plan(grid, grid.runs, str(tmp_path / "out"), str(tmp_path / "results")):
            kind, entry = title.split(maxsplit=1)
            if kind == "analysis":
                out = os.path.join(command[command.index("--out_dir") + 1], "analysis.json")
                assert os.path.abspath(out) == grids.result_path(str(tmp_path / "results"), kind, entry)
            elif kind != "train":
                out = command[command.index("--out") + 1]
                assert os.path.abspath(out) == grids.result_path(str(tmp_path / "results"), kind, entry)


# =============================================================================
# a request clamped to what the data has is recorded and printed as used


def test_a_request_larger_than_the_data_is_recorded_and_printed_as_used(trained_run, tmp_path, monkeypatch, capsys):
    val_tokens = json.loads((trained_run[0] / "data" / "corpus-txt-bpe-300" / "meta.json").read_text())["val_tokens"]
    ckpt, data = str(trained_run[1] / "ckpt.pt"), ["--data_dir", str(trained_run[0] / "data")]
    eval_ppl.main(["--ckpt", ckpt, "--lengths", "16", "--max_tokens", "1000000000", "--out", str(tmp_path / "p.json"),
                   *data])
    assert json.loads((tmp_path / "p.json").read_text())["checkpoints"][0]["text_tokens"] == val_tokens
    assert f"evaluating all {val_tokens:,} tokens of the text (--max_tokens 1,000,000,000)" in capsys.readouterr().out
    analysed = {}  # what the q/k statistics were computed on, and what analysis.json would record
    monkeypatch.setattr(analyze.spectra, "analyze", lambda *args: analysed.update(text_tokens=args[5]) or {})
    monkeypatch.setattr(analyze, "write_outputs", lambda results, out_dir: analysed.update(record=results[0]))
    analyze.main(["--ckpt", ckpt, "--text_tokens", "100000000", "--passkey_trials", "0", "--out_dir", str(tmp_path),
                  *data])
    used = val_tokens // 32 * 32  # whole windows of train_len
    assert analysed["text_tokens"] == analysed["record"]["text_tokens"] == used
    assert f"q/k statistics on {used:,} validation tokens, not 100,000,000" in capsys.readouterr().out
