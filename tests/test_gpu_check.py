"""
The GPU check (experiments/gpu_check.py) run end to end on the CPU with tiny steps, as CI can:
its summary, its results in the grid's format, a failed run reported while the others go on,
the time budget, and the run list as data. (Without a GPU it stops in one line:
test_hardware.py.)
"""

import json
import tarfile

import pytest

from conftest import run_script
from experiments import gpu_check, grids
from lib import token_cache

# Everything shortened: 1 training step of 1 sequence, 1 passkey trial, 1024 tokens of perplexity,
# lengths train_len and 2x only, bench.py's smallest table.
TINY = ["--device", "cpu", "--max_steps", "1", "--trials", "1", "--lengths", "384,768", "--ppl_max_tokens", "1024",
        "--evals", "ppl", "passkey", "--train_args", "--batch_size 1 --eval_batches 1", "--jobs", "2",
        "--poll_s", "0.1"]


def folders(tmp_path):
    return ["--out", str(tmp_path / "summary.json"), "--results_dir", str(tmp_path / "results"),
            "--work_dir", str(tmp_path / "work"), "--data_dir", str(tmp_path / "data")]


def test_the_check_runs_end_to_end_on_the_cpu_and_writes_its_summary(tmp_path):
    result = run_script("experiments.gpu_check", *TINY, *folders(tmp_path), "--pack", tmp_path / "pack",
                        "--bench_args", "--steps 1 --no_compile --lengths 1 --pe rope", "--bench_s", "60",
                        "--budget_s", "240", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["torch"] and summary["gemm_peak_tflops"]["fp32"] > 0
    assert {"prepare", "train", "eval", "bench", "ladder", "total"} <= set(summary["wall_s"])
    assert set(summary["runs"]) == {"rope-s0", "fope-s0", "alibi-s0"} and summary["failures"] == []

    for pe in gpu_check.METHODS:
        run = summary["runs"][f"{pe}-s0"]
        assert run["status"] == "done" and run["group"] == "check" and run["steps"] == 1 and run["tok_per_s"] > 0
        assert 0 < run["mfu_vs_bf16_peak"] and 0 < run["mfu_vs_fp32_peak"] and run["peak_memory"]["peak_rss_mb"] > 0
        assert {kind: e["status"] for kind, e in run["evaluations"].items()} == {"ppl": "done", "passkey": "done"}
        # the grid's format, in the results folder
        ppl = json.loads((tmp_path / "results" / "ppl" / f"{pe}-s0.json").read_text())["checkpoints"][0]
        assert ppl["pe"] == pe and ppl["step"] == 1 and ppl["train_config"]["seed"] == int(grids.SEEDS[0][1])
        assert (tmp_path / "results" / "passkey" / f"{pe}-s0.json").exists()
        # the headline beside the committed CPU seeds: at train_len the ratio is 1 by definition
        ratio, keys = run["headline"]["ppl_ratio"], run["headline"]["passkey_accuracy"]
        assert ratio["1x"] == {"length": 384, "gpu": 1.0, "cpu_seeds": [1.0, 1.0], "cpu_seed_count": 3,
                               "in_cpu_range": True}
        assert ratio["2x"]["length"] == 768 and ratio["2x"]["cpu_seeds"][0] <= ratio["2x"]["cpu_seeds"][1]
        assert ratio["16x"]["gpu"] is None and keys["1x"]["gpu"] in (0.0, 1.0) and keys["1x"]["cpu_seeds"] == [1.0, 1.0]

    assert summary["bench"]["status"] == "done" and summary["bench"]["train_tok_per_s"]["rope"]["eager"] > 0
    assert summary["bench"]["ran_beside"] == []  # it waits for the card to empty
    peaks = summary["gemm_peak_tflops"]  # MFU against the better of the two measurements
    assert peaks["fp32"] == max(peaks["measured_here"]["fp32"], peaks["bench"]["fp32"])
    assert summary["throughput"]["check"]["runs"] == 3 and summary["throughput"]["check"]["tok_per_s"] > 0

    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == ["bench.md", "gpu_check_files.tar.gz", "summary.json"]
    with tarfile.open(tmp_path / "pack" / "gpu_check_files.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("ppl/rope-s0.json") for n in names) and any(n.endswith("train_alibi-s0.log") for n in names)
    assert any(n.endswith("rope-s0/log.jsonl") for n in names) and not any(n.endswith(".pt") for n in names)


def test_a_failed_run_is_one_line_with_its_log_and_the_rest_goes_on(tmp_path):
    result = run_script("experiments.gpu_check", *TINY, *folders(tmp_path), "--no_bench", "--evals", "passkey",
                        "--extra", "broken=--pe rope --init_from no/such/ckpt.pt", "--only", "broken", "rope-s0",
                        timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    broken, rope = summary["runs"]["broken"], summary["runs"]["rope-s0"]
    assert broken["status"] == "failed" and broken["group"] == "extra"
    assert broken["evaluations"]["passkey"]["status"] == "skipped"
    failed = [line for line in result.stdout.splitlines() if "FAILED train broken" in line]
    assert len(failed) == 1 and broken["log"] in failed[0] and "no/such/ckpt.pt" in (tmp_path / "work" / "logs" /
                                                                                   "train_broken.log").read_text()
    assert summary["failures"] == [f"train broken: failed (exit status 1); log {broken['log']}",
                                   "passkey broken: skipped (train broken failed); log -"]
    assert rope["status"] == "done" and rope["evaluations"]["passkey"]["status"] == "done"


def test_at_the_budget_the_running_steps_stop_and_the_summary_names_what_did_not_finish(tmp_path):
    token_cache.prepare_data("shakespeare", "bpe", 257, str(tmp_path / "data"))  # so that the budget goes to the trainings
    result = run_script("experiments.gpu_check", *TINY, *folders(tmp_path), "--max_steps", "100000", "--train_s", "0",
                        "--eval_s", "0", "--no_bench", "--budget_s", "8", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {step["title"]: step["status"] for step in summary["steps"]}
    assert statuses["train rope-s0"] == statuses["train fope-s0"] == "stopped"  # two at a time (--jobs 2)
    assert statuses["train alibi-s0"] == "not started" and statuses["ppl rope-s0"] == "not started"
    assert "stopped train rope-s0 (the budget of 8 s ran out)" in result.stdout
    assert summary["wall_s"]["total"] < 30 and len(summary["failures"]) == 9


def test_the_run_list_is_data_that_the_ladder_and_extra_runs_extend():
    assert gpu_check.CHECK_RUNS == [("rope-s0", ["--pe", "rope", *grids.SEEDS[0]]),
                                    ("fope-s0", ["--pe", "fope", *grids.SEEDS[0]]),
                                    ("alibi-s0", ["--pe", "alibi", *grids.SEEDS[0]])]
    args, run_list = gpu_check.parse_args(["--ladder", "--extra", "fope-w384-s0=--pe fope --n_embd 384 --n_head 6"])
    names = [name for name, _, _ in run_list]
    assert names[:3] == ["rope-s0", "fope-s0", "alibi-s0"] and names[-1] == "fope-w384-s0"
    assert names[3:6] == ["rope-w512-s0", "fope-w512-s0", "alibi-w512-s0"] and len(names) == 3 + 18 + 1
    assert dict((n, a) for n, a, _ in run_list)["alibi-w128-s2"] == ["--pe", "alibi", "--n_embd", "128", "--n_head", "2",
                                                                      *grids.SEEDS[2]]
    # a training as the grid's: its shared arguments, the run's, then the device and folders
    values = gpu_check.settings.parse_args(gpu_check.train_arguments(args, run_list[1][1], "out", "fope-s0"))[1]
    assert (values["pe"], values["max_steps"], values["dtype"], values["train_len"]) == ("fope", 3200, "fp32", 384)
    assert args.passkey_args == ["--trials", "100"] and args.lengths == grids.DEFAULT.lengths


@pytest.mark.parametrize("argv, words", [
    (["--extra", "bad=--n_embd 100 --n_head 3"], "run bad: --n_embd"),
    (["--extra", "x=--no_such_flag 1"], "run x: train.py refuses its arguments"),
    (["--extra", "rope-s0=--pe rope"], "'rope-s0' is given twice"),
    (["--ladder_widths", "100"], "multiples of 64"),
    (["--work_dir", "."], "must be a folder of its own"),
    (["--out", "x.txt"], "must end in .json"),
    (["--only", "nope-s0"], "--only: no run 'nope-s0'"),
])
def test_bad_input_is_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("usage:") is False and words in error, error


def test_on_a_gpu_a_process_starts_only_when_its_memory_cap_is_free_and_runs_under_that_cap(tmp_path, monkeypatch):
    card = 100 * 2**30
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(gpu_check.torch.cuda, "mem_get_info", lambda: (free["bytes"], card))
    args, run_list = gpu_check.parse_args(["--ladder", "--ladder_widths", "512", "--ladder_seeds", "0",
                                           "--work_dir", str(tmp_path / "work")])
    paths = {"work": str(tmp_path / "work"), "results": str(tmp_path / "results"), "runs": str(tmp_path / "runs"),
             "logs": str(tmp_path / "logs")}
    steps = gpu_check.build_steps(args, run_list, paths)
    scheduler = gpu_check.Scheduler(args, steps, paths, t0=0)
    train, wide = steps[0], next(s for s in steps if s.title == "train fope-w512-s0")
    assert (scheduler.cap_gib(train), scheduler.cap_gib(wide)) == (4, 8)  # GiB, with the width
    assert scheduler.memory_allows(train)
    free["bytes"] = 3 * 2**30  # less than a training's cap is free: it waits
    assert not scheduler.memory_allows(train)
    free["bytes"] = 80 * 2**30
    launched = {}

    class Started:  # stands in for a process: records what it was started with
        def __init__(self, command, env, **kwargs):
            launched.update(command=command, env=env, kwargs=kwargs)
            self.pid = 0

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Started)
    scheduler.launch(train, now=0)
    assert float(launched["env"]["GPU_CHECK_MEMORY_FRACTION"]) == pytest.approx(0.04, abs=1e-4)
    assert launched["env"]["OMP_NUM_THREADS"] == str(max(1, (gpu_check.os.cpu_count() or 1) // args.jobs))
    assert launched["command"][3:5] == ["train.py", "--preset"] and "--device" in launched["command"]
    # the caps of the processes running at once stay within 90% of the card
    for step in steps[1:20]:
        step.status = "running"
    assert sum(scheduler.cap_gib(s) for s in scheduler.running()) + scheduler.cap_gib(wide) > 90
    assert not scheduler.memory_allows(wide)
