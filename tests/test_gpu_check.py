"""
The GPU check (experiments/gpu_check.py) run end to end on the CPU with tiny steps, as CI can:
its summary, its results in the grid's format, a failed run reported while the others go on, and
the run list as data. (Without a GPU it stops in one line: test_hardware.py. The scheduling rules,
the budget and the memory caps: test_jobs.py.)
"""

import json
import tarfile

import pytest

from conftest import run_script
from experiments import gpu_check, grids

# Everything shortened: 1 training step of 1 sequence, 1 passkey trial, 1024 tokens of perplexity,
# lengths train_len and 2x only, bench.py's quick table without its processes side by side (test_hardware.py).
TINY = ["--device", "cpu", "--max_steps", "1", "--trials", "1", "--lengths", "384,768", "--ppl_max_tokens", "1024",
        "--evals", "ppl", "passkey", "--train_args", "--batch_size 1 --eval_batches 1", "--jobs", "2"]


def folders(tmp_path):
    return ["--out", str(tmp_path / "summary.json"), "--results_dir", str(tmp_path / "results"),
            "--work_dir", str(tmp_path / "work"), "--data_dir", str(tmp_path / "data")]


def test_the_check_runs_end_to_end_on_the_cpu_a_failed_run_is_one_line_and_the_rest_goes_on(tmp_path):
    # two of the check's three runs (the third is trained and evaluated alike) and one that fails
    result = run_script("experiments.gpu_check", *TINY, *folders(tmp_path), "--pack", tmp_path / "pack",
                        "--extra", "broken=--pe rope --init_from no/such/ckpt.pt", "--only", "rope-s0", "alibi-s0", "broken",
                        "--bench_args", "--quick --no_jobs --pe rope",
                        "--bench_s", "60", "--budget_s", "240", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["torch"] and summary["gemm_peak_tflops"]["fp32"] > 0
    assert {"prepare", "train", "eval", "bench", "more", "total"} <= set(summary["wall_s"])
    assert list(summary["runs"]) == ["rope-s0", "alibi-s0", "broken"]

    for pe in ("rope", "alibi"):
        run = summary["runs"][f"{pe}-s0"]
        assert run["status"] == "done" and run["group"] == "check" and run["steps"] == 1
        assert run["mfu_vs_bf16_peak"] is None or run["mfu_vs_bf16_peak"] > 0  # one step: no interval after the first
        assert run["peak_memory"]["peak_mb"] > 0
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

    broken = summary["runs"]["broken"]
    assert broken["status"] == "failed" and broken["group"] == "extra"
    assert {e["status"] for e in broken["evaluations"].values()} == {"skipped"}
    failed = [line for line in result.stdout.splitlines() if "FAILED train broken" in line]
    assert len(failed) == 1 and broken["log"] in failed[0] and failed[0].endswith("not run: ppl broken, passkey broken")
    assert "no/such/ckpt.pt" in (tmp_path / "work" / "logs" / "train_broken.log").read_text()
    assert summary["failures"] == [f"train broken: failed (exit status 1); log {broken['log']}",
                                   "ppl broken: skipped (train broken failed); log -",
                                   "passkey broken: skipped (train broken failed); log -"]

    assert summary["bench"]["status"] == "done" and summary["bench"]["ran_beside"] == []  # alone
    assert summary["bench"]["ratios"]["rope / reference, training tok/s (eager fp32)"] > 0
    assert summary["throughput"]["check"]["runs"] == 2 and summary["throughput"]["check"]["tok_per_s"] > 0

    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == ["bench.md", "gpu_check_files.tar.gz", "summary.json"]
    with tarfile.open(tmp_path / "pack" / "gpu_check_files.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("ppl/rope-s0.json") for n in names) and any(n.endswith("train_alibi-s0.log") for n in names)
    assert any(n.endswith("rope-s0/log.jsonl") for n in names) and not any(n.endswith(".pt") for n in names)


def test_the_runs_are_the_grids_and_more_go_after_the_check(tmp_path):
    args, run_list = gpu_check.parse_args(["--ladder", "--rivals", "--extra",
                                           "fope-w384-s0=--pe fope --n_embd 384 --n_head 6"])
    names = [name for name, _, _ in run_list]
    assert names[:3] == ["rope-s0", "fope-s0", "alibi-s0"] and names[-1] == "fope-w384-s0"
    ladder = [run.name for run in grids.DEFAULT.runs if run.section == "ladder"]
    rivals = [run.name for run in grids.DEFAULT.runs if run.section == "rival"]
    assert sorted(names[3:-1]) == sorted(ladder + rivals)
    assert names[3:12] == ["rope-w512-s0", "fope-w512-s0", "alibi-w512-s0", "fope-deployed-s0", "cope-s0",
                           "rope-qknorm-s0", "rope-w128-s0", "fope-w128-s0", "alibi-w128-s0"]  # seed 0 of every row first
    assert [name[-1] for name in names[3:-1]] == sorted(name[-1] for name in names[3:-1])
    # --only picks any of them, whether its section was asked for or not
    assert [n for n, _, _ in gpu_check.parse_args(["--only", "cope-s1", "fope-s0"])[1]] == ["fope-s0", "cope-s1"]
    # a training as the grid's: its shared arguments, the run's, then the device and folders
    values = gpu_check.settings.parse_args(gpu_check.train_arguments(args, run_list[1][1], "out", "fope-s0"))[1]
    assert (values["pe"], values["max_steps"], values["dtype"], values["train_len"]) == ("fope", 3200, "fp32", 384)
    assert args.passkey_args == ["--trials", "100"] and args.lengths == grids.DEFAULT.lengths

    paths = {"work": str(tmp_path), "results": str(tmp_path / "r"), "runs": str(tmp_path / "runs"), "logs": str(tmp_path)}
    steps, about = gpu_check.build_steps(args, run_list[:4], paths)
    order = [s.name for s in steps]
    assert order[:3] == ["train rope-s0", "train fope-s0", "train alibi-s0"] and order[12] == "bench"
    assert order[13:16] == ["ppl rope-w512-s0", "passkey rope-w512-s0", "sotu rope-w512-s0"]
    assert order[-1] == "train rope-w512-s0"  # the other runs' evaluations before their trainings
    bench = steps[12]
    assert bench.alone and bench.reserve and sorted(bench.after) == sorted(order[:12]) and bench.memory_gib == 0
    caps = {s.name: s.memory_gib for s in steps}
    assert (caps["train rope-s0"], caps["train rope-w512-s0"], caps["passkey alibi-s0"]) == (4, 8, 16)


@pytest.mark.parametrize("argv, words", [
    (["--extra", "bad=--n_embd 100 --n_head 3"], "run bad: --n_embd"),
    (["--extra", "x=--no_such_flag 1"], "run x: train.py refuses its arguments"),
    (["--extra", "rope-s0=--pe rope"], "'rope-s0' is given twice"),
    (["--work_dir", "."], "must be a folder of its own"),
    (["--out", "x.txt"], "must end in .json"),
    (["--only", "nope-s0"], "--only: no run 'nope-s0'"),
    (["--jobs", "0"], "--jobs must be positive"),
])
def test_bad_input_is_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert words in error, error
