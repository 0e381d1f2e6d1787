"""
jobs.py: run steps (a command each) as subprocesses, several at once, each after the steps it needs.

    steps = [Step("train rope-s0", [python, "train.py", ...], kind="train"),
             Step("ppl rope-s0", [python, "eval_ppl.py", ...], kind="ppl", needs=["train rope-s0"])]
    run(steps, jobs=2)   # prints "[1/2] start train rope-s0 (1 thread)", "[1/2] done train rope-s0 in 0:52:11"

The rules, used by reproduce.py (a grid) and gpu_check.py (the GPU check):
  - order: a step starts once every step it `needs` has succeeded and every step it comes `after`
    has ended, in the order of the list, while fewer than `jobs` run. A step marked `alone` starts
    only when nothing runs, and nothing starts while it runs or, once it is ready, while it waits.
  - threads: each process is told OMP_NUM_THREADS = cores // jobs (at least 1). On a GPU too: they
    are the host's threads that prepare and launch each process's kernels.
  - failure: a failed step gets one line (its exit status and its log) that also names what will
    not run because it needs it; everything else goes on.
  - GPU memory (device "cuda"): a step with a cap (memory_gib) starts only while
    torch.cuda.mem_get_info() shows that much free and the caps of the running steps and its own fit
    in MEMORY_SHARE of the card; it runs under that cap: its command runs inside `wrapper()`, which
    applies JOBS_MEMORY_FRACTION with torch.cuda.set_per_process_memory_fraction, so a process that
    needs more fails alone, with an out-of-memory error in its log, instead of starving the others.
    The wrapper also writes the process's peak memory (GPU, or resident memory on a CPU) into
    JOBS_PEAK_FILE where a step names a peak_file.
  - budget (a deadline): a step starts only if its estimate, and the longest estimate of the steps
    that need it, fit in the time left, less the estimates of pending steps marked `reserve` that
    come before it; an estimate becomes the slowest measured time of steps of the same `size` once
    one has finished (until then at least the slowest of the same kind). At the deadline what runs
    is stopped (SIGTERM, then SIGKILL after 10 s).
"""

import os
import runpy
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from lib.runs import clock

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
MEMORY_SHARE = 0.9  # the caps of the processes running at once stay within this share of the card


@dataclass
class Step:
    """A command to run. `name` is unique ("train rope-s0"); `log` gets its output (None: this
    process's); `memory_gib` its GPU cap (None: an equal share of MEMORY_SHARE of the card; 0: none);
    `estimate_s` its seconds until a step of its `size` (default: its kind) has run; `number` its
    place in the output, "[number/total]" (default: its place in the list). Then what happened:
    status (pending, running, done, failed, skipped, stopped, not started) and why, start and end
    times, exit status, CPU seconds (its process and the children it waited for), the steps
    running beside it when it started."""
    name: str
    command: list
    kind: str = ""
    needs: list = field(default_factory=list)
    after: list = field(default_factory=list)
    log: str = None
    memory_gib: float = None
    estimate_s: float = 0.0
    size: object = None
    alone: bool = False
    reserve: bool = False
    peak_file: str = None
    number: int = 0
    status: str = "pending"
    why: str = ""
    start: float = None
    end: float = None
    rc: int = None
    cpu_s: float = None
    beside: list = field(default_factory=list)
    process: object = None

    @property
    def wall(self):
        return None if self.start is None or self.end is None else self.end - self.start


def threads_per_job(jobs):
    return max(1, (os.cpu_count() or 1) // jobs)


def default_jobs(device):
    """What a machine does best. On a CPU one process a core, each with one thread (measured on 2
    cores: two one-thread trainings side by side give 1.4x the tokens/s of one two-thread training;
    results/bench.md). On a GPU one process a host core, less two for this process and the system:
    the small models of the grids leave the card idle between kernels, which other runs fill."""
    cores = os.cpu_count() or 1
    return cores if device == "cpu" else max(1, cores - 2)


def wrapped(command):
    """A `python script.py ...` or `python -m module ...` command, run inside wrapper()."""
    return [command[0], "-c", "from experiments.jobs import wrapper; wrapper()", *command[1:]]


def wrapper():
    """Run sys.argv[1:] (a script and its arguments, or -m and a module) under the GPU memory cap
    JOBS_MEMORY_FRACTION (0 or unset: none), writing the peak memory to JOBS_PEAK_FILE at exit."""
    import atexit
    fraction = float(os.environ.get("JOBS_MEMORY_FRACTION") or 0)
    if fraction > 0:
        import torch
        torch.cuda.set_per_process_memory_fraction(fraction)
    if os.environ.get("JOBS_PEAK_FILE"):
        atexit.register(write_peak, os.environ["JOBS_PEAK_FILE"], "cuda" if fraction > 0 else "cpu")
    module = sys.argv[1] == "-m"
    sys.argv = sys.argv[1 + module:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True) if module else runpy.run_path(
        sys.argv[0], run_name="__main__")


def peak_memory_mb(device):
    """Peak memory of this process: CUDA allocations on a GPU, resident memory (Linux) on a CPU."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def write_peak(path, device):
    with open(path, "w") as f:
        f.write(f'{{"device": "{device}", "peak_mb": {peak_memory_mb(device) or 0:.1f}}}\n')


def shown(path):
    """A path as the output names it: relative to the project folder where it lies inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, HERE) if os.path.commonpath([path, HERE]) == HERE else path


class Runner:
    """The steps' run: run() starts and collects them by the rules above. Options: `threads` per
    process (default cores // jobs), a `deadline` (time.time()), `total` for the output's "[n/total]",
    `on_start(step)` just before a process starts and `on_end(step)` once it has ended, `say(line)`."""

    def __init__(self, steps, jobs, device="cpu", threads=None, deadline=None, total=None, on_start=None,
                 on_end=None, say=None, poll_s=0.2):
        self.steps, self.jobs, self.deadline, self.poll_s = steps, jobs, deadline, poll_s
        self.cuda = device.startswith("cuda")
        self.threads, self.total = threads or threads_per_job(jobs), total or len(steps)
        self.by_name = {step.name: step for step in steps}
        self.on_start, self.on_end = on_start or (lambda step: None), on_end or (lambda step: None)
        self.say = say or (lambda line: print(line, flush=True))
        self.card_gib = self.free_gib(total=True) if self.cuda else 0.0
        for number, step in enumerate(steps, 1):
            step.number = step.number or number
            if self.cuda and step.memory_gib is None:
                step.memory_gib = MEMORY_SHARE * self.card_gib / jobs
            unknown = [name for name in step.needs + step.after if name not in self.by_name]
            if unknown:
                raise ValueError(f"{step.name} waits for {unknown[0]!r}, which is not among the steps")

    def free_gib(self, total=False):
        import torch
        return torch.cuda.mem_get_info()[bool(total)] / 2**30

    def line(self, step, text):
        self.say(f"[{step.number}/{self.total}] {text}")

    def running(self):
        return [step for step in self.steps if step.status == "running"]

    def estimate(self, step):
        """The slowest measured step of its size; else its estimate, or the slowest of its kind if longer."""
        done = [s for s in self.steps if s.status == "done" and s.kind == step.kind]
        same = [s.wall for s in done if (s.size or s.kind) == (step.size or step.kind)]
        return max(same) if same else max([step.estimate_s] + [s.wall for s in done])

    def fits(self, step, now):
        """Whether the step and the longest of the steps that need it fit in the budget left, less
        what pending `reserve` steps before it keep."""
        if self.deadline is None:
            return True
        kept = sum(self.estimate(s) for s in self.steps[:self.steps.index(step)] if s.reserve and s.status == "pending")
        after = max((self.estimate(s) for s in self.steps if step.name in s.needs), default=0.0)
        return self.estimate(step) + after <= self.deadline - now - kept

    def memory_allows(self, step):
        held = sum(s.memory_gib or 0 for s in self.running())
        return not (self.cuda and step.memory_gib) or (held + step.memory_gib <= MEMORY_SHARE * self.card_gib
                                                         and self.free_gib() >= step.memory_gib)

    def unmet(self, step):
        """The steps it waits for that have not succeeded (needs) or not ended (after)."""
        return ([self.by_name[n] for n in step.needs if self.by_name[n].status != "done"]
                + [self.by_name[n] for n in step.after if self.by_name[n].status in ("pending", "running")])

    def may_start(self, step, now):
        return not self.unmet(step) and self.fits(step, now) and self.memory_allows(step)

    def launch(self, step):
        environment = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1",
                       "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
        command = step.command
        if (self.cuda and step.memory_gib) or step.peak_file:
            command = wrapped(command)
            environment["JOBS_MEMORY_FRACTION"] = f"{step.memory_gib / self.card_gib:.4f}" if self.cuda else "0"
            environment["JOBS_PEAK_FILE"] = step.peak_file or ""
        step.beside = [s.name for s in self.running()]
        self.on_start(step)
        if step.log:
            os.makedirs(os.path.dirname(os.path.abspath(step.log)), exist_ok=True)
            with open(step.log, "w") as log:
                log.write(f"# OMP_NUM_THREADS={self.threads} {shlex.join(map(str, step.command))}\n")
        output = open(step.log, "a") if step.log else None
        try:  # its own process group, so that a stop reaches its children too (bench.py's)
            step.process = subprocess.Popen(command, cwd=HERE, env=environment, stdout=output,
                                            stderr=subprocess.STDOUT if output else None, process_group=0)
        finally:
            if output:
                output.close()
        step.status, step.start = "running", time.time()
        cap = f", cap {step.memory_gib:.0f} GiB" if self.cuda and step.memory_gib else ""
        where = f", log {shown(step.log)}" if step.log else ""
        self.line(step, f"start {step.name} ({self.threads} thread{'s' * (self.threads > 1)}{cap}{where})")
        if not step.log:  # its output follows here
            self.say(f"    {shlex.join(map(str, step.command))}")

    @staticmethod
    def reap(step, block=False):
        """The exit status of a step's process once it has ended (else None), with its CPU seconds."""
        pid, status, usage = os.wait4(step.process.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        step.process.returncode = os.waitstatus_to_exitcode(status)
        step.cpu_s = usage.ru_utime + usage.ru_stime
        return step.process.returncode

    def finish(self, step, rc):
        """A step's end: done, or failed in one line with the steps that need it, now skipped."""
        step.rc, step.end, step.status = rc, time.time(), "done" if rc == 0 else "failed"
        if rc == 0:
            self.line(step, f"done {step.name} in {clock(step.wall)}")
        else:
            step.why, skipped = f"exit status {rc}", {step.name}
            for other in self.steps:  # in order: what needs a skipped step comes after it
                if other.status == "pending" and skipped & set(other.needs):
                    other.status, other.why = "skipped", f"{step.name} failed"
                    skipped.add(other.name)
            where = f"its log: {shown(step.log)}" if step.log else "its output is above"
            not_run = [name for name in self.by_name if name in skipped - {step.name}]
            self.line(step, f"FAILED {step.name} (exit status {rc}); {where}"
                      + (f"; not run: {', '.join(not_run)}" if not_run else ""))
        self.on_end(step)

    def stop_all(self, why):
        """SIGTERM to every running step's process group (SIGINT may be ignored in a process started in
        the background); SIGKILL to those still there after 10 s."""
        running, give_up = self.running(), time.time() + 10
        for signal_number in (signal.SIGTERM, signal.SIGKILL):
            for step in (step for step in running if step.process.returncode is None):
                try:
                    os.killpg(step.process.pid, signal_number)
                except ProcessLookupError:
                    pass
            while time.time() < give_up and any(s.process.returncode is None and self.reap(s) is None for s in running):
                time.sleep(0.1)
            give_up = float("inf")  # after SIGKILL: wait for them
        for step in running:
            step.status, step.why, step.end, step.rc = "stopped", why, time.time(), step.process.returncode
            self.line(step, f"stopped {step.name} ({why})" + (f"; its log: {shown(step.log)}" if step.log else ""))

    def loop(self):
        while True:
            for step in self.running():
                rc = self.reap(step)
                if rc is not None:
                    self.finish(step, rc)
            now = time.time()
            if self.deadline is not None and now >= self.deadline:
                return self.stop_all("the budget ran out")
            pending = [s for s in self.steps if s.status == "pending"]
            for step in pending:  # a reserve step that can no longer fit frees the time it kept
                if step.reserve and not self.unmet(step) and not self.fits(step, now):
                    step.status, step.why = "not started", self.why_not(step, now)
                    self.line(step, f"not started: {step.name} ({step.why})")
            if not any(s.alone for s in self.running()):
                alone = next((s for s in pending if s.alone and s.status == "pending" and not self.unmet(s)), None)
                for step in [alone] if alone else pending:
                    if len(self.running()) >= self.jobs:
                        break
                    if step.status == "pending" and not (step.alone and self.running()) and self.may_start(step, now):
                        self.launch(step)
            if not self.running() and not any(self.may_start(s, now) for s in self.steps if s.status == "pending"):
                return
            time.sleep(self.poll_s)

    def why_not(self, step, now):
        """Why a step never started, in a few words."""
        unmet = self.unmet(step)
        if unmet:
            return f"{unmet[0].name}: {unmet[0].status}"
        if not self.fits(step, now):
            return (f"its estimate ({self.estimate(step):.0f} s, with what needs it) did not fit in the budget left "
                    f"({max(0.0, self.deadline - now):.0f} s)")
        if self.cuda and step.memory_gib > MEMORY_SHARE * self.card_gib:
            return f"its memory cap ({step.memory_gib:.0f} GiB) does not fit on the card"
        return "the budget ran out before its turn"

    def run(self):
        """Run the steps, then name every step that never started and why. Ctrl-C (or SIGTERM)
        stops what runs and re-raises KeyboardInterrupt."""
        def on_term(signum, frame):
            raise KeyboardInterrupt
        previous, interrupted = signal.signal(signal.SIGTERM, on_term), False
        try:
            self.loop()
        except KeyboardInterrupt:
            interrupted = True
            self.stop_all("interrupted")
        finally:
            signal.signal(signal.SIGTERM, previous)
        for step in (s for s in self.steps if s.status == "pending"):
            step.status, step.why = "not started", "interrupted" if interrupted else self.why_not(step, time.time())
            if not interrupted:
                self.line(step, f"not started: {step.name} ({step.why})")
        if interrupted:
            raise KeyboardInterrupt
        return self.steps


def run(steps, jobs, **options):
    """Run `steps` (Step) with up to `jobs` at once; see Runner for the options. Returns the steps."""
    return Runner(steps, jobs, **options).run()


def simulate(steps, jobs, seconds):
    """The wall time of running `steps` by the same rules, each taking seconds[name] (what bench.py
    estimates a grid's time with); a step waiting for one not among them does not wait."""
    names, finish, running, now, pending = {step.name for step in steps}, {}, {}, 0.0, list(steps)
    while pending or running:
        for step in [s for s in pending if all(finish.get(n, now + 1) <= now for n in s.needs + s.after if n in names)]:
            if len(running) < jobs:
                running[step.name] = now + seconds[step.name]
                pending.remove(step)
        if not running:
            raise ValueError(f"{pending[0].name} waits for a step that is not before it")
        name = min(running, key=running.get)
        now = finish[name] = running.pop(name)
    return now
