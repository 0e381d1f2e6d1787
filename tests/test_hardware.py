"""
Where and how the project runs: the precision chosen by the hardware, the device chosen by
what PyTorch sees, several processes under torchrun, the GPU check and the benchmark.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fope_gpt
from fope_gpt import FOPE_DEPLOYED, POSITION_EMBEDDINGS

import analyze
from experiments import bench
from lib import checkpoint
import eval_passkey
import eval_ppl
from lib import hardware
import train
from conftest import error_of, logged_losses, tiny_run_args

HERE = Path(__file__).resolve().parent.parent  # the repository root, where the scripts are

# -----------------------------------------------------------------------------
# precision: bf16 autocast only where the hardware multiplies bf16 natively


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                        (False, True, "bf16")])
def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert hardware.resolve_dtype("auto", "cpu") == expected
    assert hardware.resolve_dtype("fp32", "cpu") == "fp32" and hardware.resolve_dtype("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("native", [False, True])
def test_a_run_says_its_precision_first_and_keeps_it_in_the_checkpoint(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: native)
    train.main(tiny_run_args(tmp_path, "--pe", "fope", "--max_steps", "2", "--eval_interval", "2"))
    first_line = capsys.readouterr().out.splitlines()[0]
    expected = "bf16" if native else "fp32"
    assert first_line.startswith("run ") and f"precision {expected} (" + ("native" if native else "no native") in first_line
    state = checkpoint.load_checkpoint(str(tmp_path / "out" / "tiny" / "ckpt.pt"))
    assert state["train_config"]["dtype"] == expected


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    train.main(tiny_run_args(tmp_path, "--pe", "rope", "--max_steps", "4", "--eval_interval", "2"))
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)  # e.g. moved to a bf16 machine
    train.main(tiny_run_args(tmp_path, "--pe", "rope", "--max_steps", "6", "--eval_interval", "2", "--resume"))
    assert "precision fp32 (as asked)" in capsys.readouterr().out
    state = checkpoint.load_checkpoint(str(tmp_path / "out" / "tiny" / "ckpt.pt"))
    assert state["train_config"]["dtype"] == "fp32"


def test_eval_ppl_records_the_precision_it_used(tmp_path, monkeypatch):
    train.main(tiny_run_args(tmp_path, "--pe", "rope", "--max_steps", "2", "--eval_interval", "2", "--dtype", "fp32"))
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    out = tmp_path / "ppl.json"
    eval_ppl.main(["--ckpt", str(tmp_path / "out" / "tiny" / "ckpt.pt"), "--lengths", "32", "--data_dir",
                   str(tmp_path / "data"), "--out", str(out)])
    assert json.loads(out.read_text())["dtype"] == "bf16"


# -----------------------------------------------------------------------------
# device: cuda where PyTorch sees a GPU, a one-line error where it is asked for and absent


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", ["train", "eval_ppl", "eval_passkey", "analyze"])
def test_asking_for_cuda_without_a_gpu_is_one_clear_line(tmp_path, script):
    if script == "train":
        argv = tiny_run_args(tmp_path, "--device", "cuda")
    else:
        argv = ["--ckpt", str(tmp_path / "missing.pt"), "--device", "cuda", "--out", str(tmp_path / "x.json")]
    main = {"train": train.main, "eval_ppl": eval_ppl.main, "eval_passkey": eval_passkey.main,
            "analyze": analyze.main}[script]
    if script == "analyze":
        argv = ["--ckpt", str(tmp_path / "missing.pt"), "--device", "cuda", "--out_dir", str(tmp_path / "a")]
    assert "sees no CUDA GPU" in error_of(main, argv)
    assert hardware.resolve_device("auto") == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", [dict(pe=pe) for pe in POSITION_EMBEDDINGS] + [dict(pe="fope", **FOPE_DEPLOYED)],
                         ids=lambda v: "-".join(map(str, v.values())))
def test_the_model_computes_the_same_on_the_gpu_as_on_the_cpu(variant, monkeypatch):
    from test_fope import tiny_config, spread_weights
    monkeypatch.setattr(fope_gpt, "BIAS_ELEMENTS", 2 * 64 * 9)  # a bias goes in blocks of queries, as at 16x train_len
    torch.manual_seed(0)
    model = spread_weights(fope_gpt.GPT(tiny_config(**variant))).eval()
    idx = torch.randint(0, 61, (2, 64))
    on_cpu, greedy_cpu = model(idx)[0], model.generate(idx[:, :20], 8)
    model.to("cuda")
    assert torch.allclose(on_cpu, model(idx.to("cuda"))[0].cpu(), atol=1e-3, rtol=1e-3)
    assert torch.equal(greedy_cpu, model.generate(idx[:, :20].to("cuda"), 8).cpu())  # the KV cache on the GPU


# -----------------------------------------------------------------------------
# torchrun: N processes train the model one process would, on the same global batch


def test_two_processes_under_torchrun_train_what_one_would_and_resume_in_one(tmp_path):
    # passkey rows put their loss on a few answer tokens, so the two halves of a batch hold
    # different numbers of targets: the per-process weighting is what makes the losses agree
    common = ["--train_len", "256", "--passkey_frac", "0.5", "--min_lr_ratio", "1", "--warmup_steps", "0",
              "--eval_interval", "3", "--dtype", "fp32", "--device", "cpu"]
    train.main(tiny_run_args(tmp_path, *common, "--max_steps", "6", "--run_name", "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "train.py"), *tiny_run_args(tmp_path, *common, "--max_steps", "3", "--run_name", "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "x 2 processes" in two.stdout
    # a constant learning rate: continuing to 6 steps follows the schedule of the 6-step run
    train.main(tiny_run_args(tmp_path, *common, "--max_steps", "6", "--run_name", "two", "--resume"))
    one, two = logged_losses(tmp_path / "out" / "one"), logged_losses(tmp_path / "out" / "two")
    assert [step for step, _, _ in one] == [step for step, _, _ in two]
    for (_, loss_one, val_one), (_, loss_two, val_two) in zip(one, two):
        assert (loss_one is None) == (loss_two is None) and (val_one is None) == (val_two is None)
        assert loss_one is None or loss_one == pytest.approx(loss_two, rel=1e-5)
        assert val_one is None or val_one == pytest.approx(val_two, rel=1e-5)


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "start_processes", lambda device: (0, 3, "cpu"))
    assert "must be divisible by the 3 processes" in error_of(train.main, tiny_run_args(tmp_path))


# -----------------------------------------------------------------------------
# the GPU check and the benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run python -m experiments.gpu_check itself")
def test_the_gpu_check_stops_with_one_line_where_there_is_no_gpu_having_written_nothing():
    watched = [HERE / "results", HERE / "results" / "gpu_check.json", HERE / "results" / "gpu", HERE / "out",
               HERE / "out" / "gpu_check"]
    before = {path: path.stat().st_mtime_ns for path in watched if path.exists()}
    result = subprocess.run([sys.executable, "-m", "experiments.gpu_check"], cwd=HERE, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "gpu_check.py: error: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); nothing was run "
        "(--device cpu runs the same steps on the CPU)"]
    assert {path: path.stat().st_mtime_ns for path in watched if path.exists()} == before


def test_bench_shows_a_model_made_slower_on_purpose_in_its_ratio_and_estimates_the_grid(tmp_path, monkeypatch):
    import time
    built = bench.build

    def build(name, config, device):  # FoPE made slower on purpose: 0.5 s more every forward
        model = built(name, config, device)
        if name == "fope":
            forward = model.forward
            model.forward = lambda *args, **kwargs: (time.sleep(0.5), forward(*args, **kwargs))[1]
        return model

    monkeypatch.setattr(bench, "build", build)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a machine busy with other work, two would wait for each other
    out = tmp_path / "b.json"
    try:
        bench.main(["--quick", "--steps", "2", "--pe", "rope", "fope", "--lengths", "384,768", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    rows, ratios = report["results"], report["ratios"]
    assert list(rows) == ["rope", "fope", bench.BASELINE] and report["dtype"] == hardware.resolve_dtype("auto", "cpu")
    for mode in report["modes"]:
        slower = rows["fope"][mode]["step_s"] - rows["rope"][mode]["step_s"]
        assert 0.3 < slower < 1.5 and ratios[f"fope / rope, training step time ({mode})"] > 1.2, (mode, slower)
        assert ratios[f"rope / reference, training tok/s ({mode})"] > ratios[f"fope / reference, training tok/s ({mode})"]
    # the evaluations run in a process of their own, where FoPE is as fast as it is
    assert set(rows["fope"]["eval"]) == {"384", "768"} and "fope / rope, evaluation time @768" in ratios
    # several processes side by side, and the grid's time from them
    assert [(m["jobs"], m["threads"]) for m in report["jobs"]][0] == (1, os.cpu_count())
    assert all(m["tok_per_s"] > 0 for m in report["jobs"])
    estimate = report["grid_estimate"]
    assert {row["all"]["steps"] for row in estimate} == {len(list(bench.grids.steps(bench.GRID, bench.GRID.runs)))}
    assert all(0 < row["left"]["hours"] < row["all"]["hours"] for row in estimate)
    table = (tmp_path / "b.md").read_text()
    assert "### The default grid on this machine: " + hardware.machine_name("cpu") in table
    assert bench.BASELINE + " |" in table and "the whole grid" in table


def test_bench_reads_lengths_as_tokens_and_refuses_bad_input_in_one_line(tmp_path):
    assert bench.parse_args([]).lengths == [192, 384, 768, 1536, 3072, 6144]
    assert bench.parse_args(["--lengths", "384,6144"]).lengths == [384, 6144]
    assert "--out must end in .json" in error_of(bench.main, ["--out", str(tmp_path / "b.txt")])
    assert "--report needs the JSON" in error_of(bench.main, ["--report", "--out", str(tmp_path / "none.json")])


def test_the_reference_gpt_has_the_default_models_trained_parameter_count():
    config = bench.GPTConfig()
    reference, model = bench.ReferenceGPT(config), bench.GPT(config)
    assert sum(p.numel() for p in reference.parameters()) == model.num_params()
