"""
What the test files share: a tiny corpus and a tiny training run, a script run as the user
runs it, and the checks that a failure is one line and leaves every existing file as it was.
"""

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from lib import tokenizer

HERE = Path(__file__).resolve().parent.parent  # the repository root, where the scripts are


@pytest.fixture(autouse=True)
def close_figures():
    """Free the figures a test draws to read them: the scripts free those they write."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def byte_encoding():
    """A byte-level tokenizer with the project's pre-tokenizer (digits are single tokens)."""
    return tokenizer.build_encoding("bytes", {bytes([i]): i for i in range(256)})


def run_script(script, *args, cwd=HERE, timeout=300):
    """Run one of the project's scripts in a subprocess, as a user would: a top-level script by
    its file ("train.py"), one of experiments/ as a module ("experiments.reproduce"); returns the
    CompletedProcess with its exit status and text output."""
    command = [str(HERE / script)] if script.endswith(".py") else ["-m", script]
    environment = {**os.environ, "PYTHONPATH": str(HERE)}  # a module runs from any folder
    return subprocess.run([sys.executable, *command, *map(str, args)],
                          cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def is_png(path):
    """Whether a file is a PNG image, by its signature."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def plotted_lines(ax):
    """{label: (xs, ys)} of the labelled curves of a matplotlib Axes: what a figure shows."""
    return {line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def dead_pid():
    """The id of a process that has ended, as a run killed with kill -9 leaves in its lock file."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def corpus_file(tmp_path):
    """A small local dataset: a few hundred lines of varied text."""
    lines = [f"Line {i}: the {['king', 'queen', 'fool', 'ghost'][i % 4]} speaks {i * 7 % 13} times, then exits.\n"
             for i in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path


def tiny_run_args(tmp_path, *extra):
    return ["--dataset", str(corpus_file(tmp_path)), "--vocab_size", "300", "--data_dir", str(tmp_path / "data"),
            "--out_dir", str(tmp_path / "out"), "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--train_len", "32", "--batch_size", "4", "--max_steps", "30", "--warmup_steps", "5",
            "--log_interval", "1", "--eval_interval", "10", "--eval_batches", "2", "--run_name", "tiny", *extra]


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, f)]


def snapshot(folder):
    """Every file below a folder with its bytes and modification time, to show that nothing
    changed (not even a rewrite with the same bytes)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[path] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def error_of(main, argv):
    """The message of a script's main that stops with sys.exit(message): exit status 1 and the
    message on stderr, one line (any other exception would fail the test with its traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message.strip(), message
    return message


def stop_of(main, argv, capsys):
    """(exit status, its line) of a script's main that a stop (Ctrl-C, SIGTERM) ends: one line on
    stderr, after at most the token cache's progress line, and no traceback (any other exception
    would fail the test with its own)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("using cached ") for line in lines[:-1]), lines
    return exit_info.value.code, lines[-1]


@contextlib.contextmanager
def address_space_limit(extra=2 * 2**30):
    """While the block runs, this process may map only `extra` bytes more than it maps now
    (RLIMIT_AS, as ulimit -v): a request that a memory check should refuse but does not fails at
    the limit instead of filling a shared machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny training run, shared by the tests that only read its results."""
    tmp_path = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *tiny_run_args(tmp_path, "--pe", "fope"))  # as a user runs it
    assert result.returncode == 0, result.stderr
    return tmp_path, tmp_path / "out" / "tiny"


def table_rows(markdown, header):
    """{row label: [cells]} of the Markdown table whose header line starts with `header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows
