"""
A stop (Ctrl-C, SIGTERM) says where it stopped, in one line and exit status 130 or 143, and
leaves nothing half-written: training names its step and its checkpoint's (the lock released), an
evaluation writes all of its outputs or none.
"""

import json
import signal

import pytest

import analyze
import eval_passkey
import eval_ppl
import sample
import train
from conftest import is_png, snapshot, stop_of, tiny_run_args
from fope_gpt import GPT
from lib import runs


def stop_with(signum):
    def stop(*args, **kwargs):
        signal.raise_signal(signum)  # as the user's Ctrl-C or a kill would, while the work runs
        raise AssertionError("the signal did not stop the work")
    return stop


STOPPED_WORK = {  # script -> (its main, the work a signal interrupts, arguments besides --ckpt, the signal)
    "eval_ppl": (eval_ppl.main, (eval_ppl, "chunked_ppl"), ["--lengths", "16", "--out", "{out}/r.json"],
                 signal.SIGTERM),
    "eval_passkey": (eval_passkey.main, (eval_passkey, "answer_prompts"),
                     ["--lengths", "1024", "--trials", "2", "--out", "{out}/r.json"], signal.SIGINT),
    "analyze": (analyze.main, (analyze.spectra, "analyze"), ["--out_dir", "{out}"], signal.SIGINT),
    "sample": (sample.main, (GPT, "generate"), [], signal.SIGINT),
}


@pytest.mark.parametrize("script", STOPPED_WORK)
def test_a_stopped_evaluation_says_so_in_one_line_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys,
                                                                     script):
    main, (owner, work), argv, signum = STOPPED_WORK[script]
    monkeypatch.setattr(owner, work, stop_with(signum))
    out = tmp_path / "results"
    out.mkdir()
    (out / "r.json").write_text("earlier results")
    before = snapshot(tmp_path)
    data = ["--data_dir", str(trained_run[0] / "data")] if script in ("eval_ppl", "analyze") else []
    code, err = stop_of(main, ["--ckpt", str(trained_run[1] / "ckpt.pt"),
                               *[arg.format(out=out) for arg in argv], *data], capsys)
    name = signal.Signals(signum).name
    assert code == 128 + signum and err == f"{script}.py: stopped ({name}); nothing was written"
    assert snapshot(tmp_path) == before


def test_a_stop_while_the_results_are_written_waits_for_all_of_them(trained_run, tmp_path, monkeypatch, capsys):
    written = []

    def write_then_stop(path, content):  # Ctrl-C as the first file is written
        if not written:
            signal.raise_signal(signal.SIGINT)
        written.append(path)
        eval_ppl_write(path, content)

    eval_ppl_write = eval_ppl.write_atomically
    monkeypatch.setattr(eval_ppl, "write_atomically", write_then_stop)
    out = tmp_path / "ppl.json"
    code, err = stop_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--lengths", "16,32",
                                        "--data_dir", str(trained_run[0] / "data"), "--out", str(out)], capsys)
    assert code == 130 and err == "eval_ppl.py: stopped (SIGINT) after writing its results"
    assert list(json.loads(out.read_text())["checkpoints"][0]["ppl"]) == ["16", "32"] and is_png(tmp_path / "ppl.png")


def test_training_stopped_before_it_began_says_so_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "prepare", stop_with(signal.SIGTERM))  # while the token cache is read or built
    code, err = stop_of(train.main, tiny_run_args(tmp_path), capsys)
    assert code == 143 and err == ("train.py: stopped before training began (SIGTERM); no checkpoint was written, "
                                   "so the run starts over when run again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out"]
    assert not list((tmp_path / "out").iterdir())  # the run folder made for the lock is gone with it
