"""
Memory checked before work: every script estimates the peak memory of what it is asked (memory.py)
and refuses, in one line with the estimate and what the machine has, a request that cannot fit,
before it allocates or writes anything and within seconds. The estimates are held against peaks
measured on a CPU, within a factor of 1.5.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import analyze
import eval_passkey
import eval_ppl
import sample
import train
from conftest import HERE, address_space_limit, error_of, snapshot, tiny_run_args
from fope_gpt import GPTConfig
from lib import memory


def requests(trained_run, tmp_path):
    """script -> (its main, arguments, what the refusal names): sizes no machine has."""
    ckpt, data = str(trained_run[1] / "ckpt.pt"), ["--data_dir", str(trained_run[0] / "data")]
    out, cpu = str(tmp_path / "out"), ["--device", "cpu"]  # a GPU would map its own memory under the limit
    return {
        "train-batch_size": (train.main, tiny_run_args(tmp_path, "--batch_size", "1e12", *cpu),
                             "a training step of --batch_size 1000000000000 x --train_len 32"),
        "train-train_len": (train.main, tiny_run_args(tmp_path, "--train_len", "1e9", *cpu), "--train_len 1000000000"),
        "train-n_embd": (train.main, tiny_run_args(tmp_path, "--n_embd", "1048576", *cpu), "n_embd 1048576"),
        "eval_passkey": (eval_passkey.main, ["--ckpt", ckpt, "--lengths", "10000000", "--out", f"{out}/p.json", *cpu],
                         f"answering {ckpt}'s 100 prompts at length 10000000 (1 sequence a forward)"),
        "analyze": (analyze.main, ["--ckpt", ckpt, "--max_distance", "1e9", "--out_dir", out, *data, *cpu],
                    f"analysing {ckpt}"),
        "sample": (sample.main, ["--ckpt", ckpt, "--max_new_tokens", "1e9", *cpu], "a sample of 1 prompt tokens and "
                                                                             "1,000,000,000 new ones"),
    }


@pytest.mark.parametrize("request_name", ["train-batch_size", "train-train_len", "train-n_embd", "eval_passkey",
                                          "analyze", "sample"])
def test_a_request_no_machine_can_hold_is_refused_at_once_with_the_estimate(trained_run, tmp_path, request_name):
    main, argv, named = requests(trained_run, tmp_path)[request_name]
    before = snapshot(tmp_path)
    start = time.time()
    with address_space_limit():  # should the check not refuse, the allocation fails here, not the machine
        message = error_of(main, argv)
    assert time.time() - start < 5
    assert ": error: " in message and named in message and " of memory (estimate), more than the " in message
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()  # no run folder, no cache, no results


def test_an_evaluation_that_cannot_fit_is_refused_before_the_first_length(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: (10**6, "available (as this test pretends)"))
    message = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--lengths", "16,512",
                                       "--data_dir", str(trained_run[0] / "data"), "--out", str(tmp_path / "p.json")])
    assert message.startswith(f"eval_ppl.py: error: evaluating {trained_run[1] / 'ckpt.pt'} at length 512 (")
    assert message.endswith("more than the 1 MB available (as this test pretends); give shorter --lengths or fewer "
                            "--batch_tokens")
    assert not list(tmp_path.iterdir())
    # the length: longer than this validation split, refused for that in one line
    message = error_of(eval_ppl.main, ["--ckpt", str(trained_run[1] / "ckpt.pt"), "--lengths", "200000",
                                       "--data_dir", str(trained_run[0] / "data"), "--out", str(tmp_path / "p.json")])
    assert "length 200000 is larger than the validation split" in message


def test_a_resume_that_cannot_fit_changes_nothing(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "out" / "tiny"
    shutil.copytree(trained_run[1], run_dir)
    monkeypatch.setattr(memory, "available", lambda device: (10**6, "available (as this test pretends)"))
    before = snapshot(run_dir)
    message = error_of(train.main, tiny_run_args(trained_run[0], "--out_dir", str(tmp_path / "out"), "--resume",
                                                 "--max_steps", "40"))
    assert "a training step of --batch_size 4 x --train_len 32" in message
    assert snapshot(run_dir) == before  # config.json and the log as they were


def measured_peaks(**config):
    """The peaks of a training step of 16 sequences and of generating after 4 prompts of 1024 tokens,
    each beyond what was resident before it, measured by tests/peak_memory.py in a fresh process whose
    allocator hands every freed block of 64 kB or more back at once, so that the resident set follows
    what is live rather than what this process did before."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HERE / "tests" / "peak_memory.py"), json.dumps(config)],
                          env=environment, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peaks with Linux's clear_refs")
@pytest.mark.parametrize("pe", ["fope", "alibi"])
def test_the_estimates_are_within_a_factor_of_one_and_a_half_of_the_measured_peaks(pe):
    settings = dict(n_layer=2, vocab_size=300, pe=pe, train_len=128)
    config, peaks = GPTConfig(**settings), measured_peaks(**settings)
    estimates = {"training": memory.training_bytes(config, 16), "generation": memory.generation_bytes(config, 4, 1024)}
    for what, peak in peaks.items():
        assert 1 / 1.5 < estimates[what] / peak < 1.5, (what, peak, estimates[what])
