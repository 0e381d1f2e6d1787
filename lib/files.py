"""
files.py: writing the files that matter, and the errors a script reports in one line.

    write_atomically(path, content)   a file is either complete or absent, never half-written
    write_figure(path, fig)           a matplotlib figure as a PNG, the same way, then freed
    check_writable_folder(folder)     an output folder that cannot be used is found before the work
    pyplot()                          matplotlib for files only, loaded when a script first draws
    UserError                         a problem the user can fix; the project's error classes are ones
    error_line(error)                 the one line a script prints for an error, without a traceback (cli.run)
"""

import errno
import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad input, a damaged or foreign file, a diverged run): the
    script stops with its message, one line, and no traceback (cli.run)."""


def error_line(error):
    """One line for an error that a script reports without a traceback: an OSError as its
    reason and file ("No space left on device: out/run/ckpt.pt.tmp"), anything else as the
    first line of its message."""
    if isinstance(error, OSError) and error.strerror:
        files = [str(name) for name in (error.filename, error.filename2) if name is not None]
        return f"{error.strerror}: {' -> '.join(files)}" if files else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_writable_folder(folder):
    """Create `folder` if needed and write (then remove) a file in it, so that a script finds
    an output folder it cannot use before its work, not after it. Raises OSError."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def write_atomically(path, content):
    """Write `content` (bytes, or a function that writes into a binary file) to path via a
    temporary file beside it, so that path is either complete or absent (or keeps its old
    content): os.replace is atomic within a file system. A failed write (a full disk) removes
    the temporary file and raises; the project's one way of writing a file that matters."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:  # through a Python file, a failed write is an OSError with its reason
            if callable(content):
                content(f)
            else:
                f.write(content)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # a failed flush names no file
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def pyplot():
    """matplotlib's pyplot drawing to files only (no display), imported when a script first draws,
    so that one asked for no figures never loads matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_figure(path, fig, **savefig_options):
    """Write a matplotlib figure as a PNG (atomically: never half a PNG) and free it."""
    write_atomically(path, lambda f: fig.savefig(f, format="png", **savefig_options))
    pyplot().close(fig)
