"""
reproduce.py: run a grid of grids.py end to end. Train every run, measure perplexity and
passkey accuracy as the context grows past the training length, then write the report
(report.py).

    python reproduce.py                         # the default grid (--dry_run prints its time estimate)
    python reproduce.py --quick                 # tiny models, about a minute: checks the pipeline
    python reproduce.py --only rope-s0 fope-s0  # some runs only
    python reproduce.py --evals passkey         # passkey accuracy first, the rest later
    python reproduce.py --dry_run               # list the steps and which are done
    python report.py                            # figures, tables and the README block from saved JSON

Every step runs one of the project's scripts (train.py, eval_ppl.py, eval_passkey.py) as a
subprocess. An evaluation runs when its JSON is missing or was made with other settings; a run
is trained when an evaluation still needs its checkpoint, and continues with --resume when it
was interrupted, so after a stop the same command carries on where it was.

    out/<grid>/<run>/ckpt.pt              checkpoints (git-ignored)
    results/<grid>/ppl/<entry>.json       one evaluation per file (with eval_ppl.py's own figure)
    results/<grid>/passkey/<entry>.json   (with eval_passkey.py's figures)
    results/<grid>/sotu/<entry>.json      perplexity on the sotu text (main runs)
    results/<grid>/analysis/              analyze.py on the analysed runs, side by side
    results/<grid>/*.png, results.md      the report; the headline grid's table also goes into README.md
    results/<grid>/steps.jsonl            every finished step: name, command, seconds, date, CPU; for a
                                          training, the training seconds of the processes before it
                                          and every machine it ran on (train.py's checkpoint "trained")
    results/<grid>/environment.json       versions and CPU of the machine that last ran steps
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
from lib import hardware
from lib import runs
from lib import settings
from lib.checkpoint import CheckpointError, load_checkpoint
from lib.files import UserError

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


class GridError(Exception):
    """A grid that cannot go on as it is; the message is one line for the user."""


def project_path(path):
    """`path` relative to the project folder, where the scripts run, if it lies inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, HERE) if os.path.commonpath([path, HERE]) == HERE else path


def select_runs(grid, names):
    """The runs named (all when None) and the runs they start from, in grid order."""
    if names is None:
        return grid.runs
    known = [run.name for run in grid.runs]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise GridError(f"--only: no run {unknown[0]!r} in this grid (its runs: {', '.join(known)})")
    wanted = set(names)
    for run in reversed(grid.runs):  # a run starts from an earlier one, so one backward pass suffices
        if run.name in wanted and run.init_from:
            wanted.add(run.init_from)
    return [run for run in grid.runs if run.name in wanted]


def trained_steps(grid, run, checkpoint):
    """The steps of a run's checkpoint (0 without one); raises GridError for a checkpoint that is
    not this grid's run: other settings, or another number of steps to train."""
    if not os.path.exists(checkpoint):
        return 0
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as error:
        raise GridError(f"{error}: delete it to train {run.name} again") from None
    values, given = grids.run_settings(grid, run)
    saved = state.get("train_config", {})
    for key, value in given.items():
        if key not in grids.NOT_COMPARED and key in saved and saved[key] != value:
            raise GridError(f"{checkpoint} was trained with {key}={saved[key]!r}, the grid now has {value!r}: "
                            f"delete it to train {run.name} again")
    # max_steps may change on --resume, but a run's learning-rate schedule is fixed when it starts:
    # a checkpoint of another schedule, finished or not, is not an interrupted run of this grid's
    schedule, grid_schedule = settings.schedule_steps(saved) or state["step"], settings.schedule_steps(values)
    if schedule != grid_schedule or state["step"] > values["max_steps"]:
        raise GridError(f"{checkpoint} was trained on a {schedule}-step schedule ({state['step']} steps done), "
                        f"the grid now has {grid_schedule}: delete it to train {run.name} again")
    return state["step"]


def plan(grid, selected, out_grid, results_grid, evals=grids.EVALUATIONS):
    """(title, command or None when done, why it is done) of every step of the selected runs:
    their evaluations of the kinds in `evals`, and the trainings those need."""
    planned = []
    for kind, run, entry, extension_args in grids.steps(grid, selected):
        checkpoint = runs.checkpoint_path(out_grid, run.name)
        title = grids.step_title(kind, run, entry)
        if kind == "train":
            planned.append((title, *train_command(grid, run, selected, out_grid, results_grid, evals)))
            continue
        if kind not in evals:
            continue
        output = grids.result_path(results_grid, kind, entry)
        if kind == "analysis":
            checkpoints = [project_path(runs.checkpoint_path(out_grid, name)) for name in grid.analysed]
            command = [sys.executable, "analyze.py", "--ckpt", *checkpoints,
                       "--out_dir", project_path(os.path.dirname(output)), *grid.analysis_args]
        else:
            script, options = {"ppl": ("eval_ppl.py", grid.ppl_args), "sotu": ("eval_ppl.py", grid.sotu_args),
                               "passkey": ("eval_passkey.py", grid.passkey_args)}[kind]
            command = [sys.executable, script, "--ckpt", project_path(checkpoint), "--lengths",
                       ",".join(map(str, grid.lengths)), "--out", project_path(output), *options, *extension_args]
        current = grids.step_is_current(grid, kind, run, entry, results_grid)
        planned.append((title, None if current else command, "done"))
    return planned


def train_command(grid, run, selected, out_grid, results_grid, evals):
    """(the train.py command, or None when nothing needs training, and why not) of a run."""
    if not grids.needs_checkpoint(grid, run, selected, results_grid, evals):
        return None, "evaluated before"
    checkpoint = runs.checkpoint_path(out_grid, run.name)
    done = trained_steps(grid, run, checkpoint)
    if done == grids.run_settings(grid, run)[0]["max_steps"]:
        return None, f"done ({done} steps)"
    command = [sys.executable, "train.py", *grids.train_arguments(grid, run, project_path(out_grid))]
    return command + (["--resume"] if os.path.exists(checkpoint) else []), None


def command_line(grid, command):
    """A step's command as one shell line, its environment variables first."""
    return " ".join([f"OMP_NUM_THREADS={grid.threads}"] * bool(grid.threads) + [shlex.join(command)])


def run_steps(grid, steps, out_grid, results_grid, dry_run, argv):
    """Run the steps not done, in order, printing progress; log each finished one to steps.jsonl."""
    start, ran = time.time(), 0
    environment = {**os.environ, **({"OMP_NUM_THREADS": str(grid.threads)} if grid.threads else {})}
    for number, (title, command, done) in enumerate(steps, 1):
        prefix = f"[{number}/{len(steps)}] {title}"
        if command is None:
            print(f"{prefix}: {done}, skipped", flush=True)
            continue
        print(f"{prefix}\n    {command_line(grid, command)}", flush=True)
        if dry_run:
            continue
        if not ran:
            os.makedirs(results_grid, exist_ok=True)
            write_environment(os.path.join(results_grid, "environment.json"), argv)
        ran += 1
        # a training resumed from an earlier process's checkpoint continues what that one spent
        checkpoint = runs.checkpoint_path(out_grid, title.split(maxsplit=1)[1]) if title.startswith("train ") else None
        earlier_seconds = trained_so_far(checkpoint)["seconds"] if checkpoint else None
        step_start = time.time()
        if subprocess.run(command, cwd=HERE, env=environment).returncode != 0:
            raise GridError(f"{title} failed (its output is above); run the same command again to carry on from there")
        seconds = time.time() - step_start
        print(f"{prefix}: finished in {runs.clock(seconds)}", flush=True)
        record = {"step": title, "command": command_line(grid, command), "seconds": round(seconds, 1),
                  "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "cpu": hardware.machine_name("cpu"), "cores": os.cpu_count()}
        if checkpoint:
            record.update(earlier_seconds=earlier_seconds, machines=trained_so_far(checkpoint)["machines"])
        with open(os.path.join(results_grid, "steps.jsonl"), "a") as log:
            log.write(json.dumps(record) + "\n")
    if not dry_run:
        print(f"all {len(steps)} steps done ({ran} run now) in {runs.clock(time.time() - start)}")


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
    parser.add_argument("--dry_run", action="store_true", help="print the steps without running them")
    parser.add_argument("--out_dir", default="out", help="checkpoints go to OUT_DIR/<grid>/ (default out)")
    parser.add_argument("--results_dir", default="results", help="results go to RESULTS_DIR/<grid>/ (default results)")
    args = parser.parse_args(argv)
    if args.quick and args.grid not in (None, "quick"):
        raise GridError(f"--quick is --grid quick, but --grid {args.grid} was given")
    args.grid = "quick" if args.quick else args.grid or "default"
    return args


def main(argv=None):
    """Run the grid's steps that are not done, then write its report with report.py. A failed
    step, a checkpoint that is not the grid's and I/O errors end in one line and a non-zero exit."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_grid(argv)
    except (GridError, UserError, OSError) as error:
        sys.exit(f"reproduce.py: error: {files.error_line(error)}")


def run_grid(argv):
    args = parse_args(argv)
    grid = grids.GRIDS[args.grid]
    out_grid = os.path.abspath(os.path.join(args.out_dir, args.grid))
    results_grid = os.path.abspath(os.path.join(args.results_dir, args.grid))
    steps = plan(grid, select_runs(grid, args.only), out_grid, results_grid, args.evals)
    print(f"grid {args.grid}: {grid.about}", flush=True)
    run_steps(grid, steps, out_grid, results_grid, args.dry_run, argv)
    if not args.dry_run:
        report = [sys.executable, "-m", "experiments.report", "--grid", args.grid, "--results_dir", project_path(args.results_dir)]
        if subprocess.run(report, cwd=HERE).returncode != 0:
            raise GridError("the report failed (its output is above); run python report.py to try again")


if __name__ == "__main__":
    main()
