"""
grid_steps.py: a grid's steps as commands, measuring and running nothing: which trainings and
evaluations the selected runs need, which are done (a checkpoint of this grid's settings, an
evaluation JSON that is current), the command of each that is not, and what each waits for.
reproduce.py runs them; bench_report.py times them for its estimate of the grid.
"""

import os
import shlex
import sys

from experiments import grids
from experiments import jobs
from lib import runs
from lib import settings
from lib.checkpoint import CheckpointError, load_checkpoint

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
                       ",".join(map(str, grid.lengths)), "--out", project_path(output), "--no_figures", *options,
                       *extension_args]
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


def command_line(threads, command):
    """A step's command as one shell line, its thread count first."""
    return f"OMP_NUM_THREADS={threads} {shlex.join(command)}"


def step_needs(grid, title, run):
    """The trainings a step waits for: an evaluation its run's, a fine-tune its parent's, the
    analysis those of the runs it compares."""
    kind = title.split()[0]
    if kind == "train":
        return [f"train {run.init_from}"] if run.init_from else []
    return [f"train {name}" for name in grid.analysed] if kind == "analysis" else [f"train {run.name}"]


def job_steps(grid, selected, planned, out_grid, at_once):
    """The planned steps not done as jobs.Step, numbered by their place in the plan, each waiting for
    the trainings it needs that are among them; with several at once each has a log file."""
    by_title = {grids.step_title(kind, run, entry): run for kind, run, entry, _ in grids.steps(grid, selected)}
    to_run = [jobs.Step(title, command, title.split()[0], step_needs(grid, title, by_title[title]), number=number,
                        log=os.path.join(out_grid, "logs", title.replace(" ", "_") + ".log") if at_once > 1 else None)
              for number, (title, command, _) in enumerate(planned, 1) if command is not None]
    names = {step.name for step in to_run}
    for step in to_run:  # a training done before is no step to wait for
        step.needs = [name for name in step.needs if name in names]
    return to_run, by_title
