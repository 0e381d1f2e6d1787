"""
cli.py: what the scripts' command lines share.

    run(script, work)          call work(); a UserError or an OSError ends the script with one line,
                               "<script>: error: <what went wrong>", on stderr and exit status 1; Ctrl-C
                               (SIGINT) or SIGTERM with one line saying where it stopped, exit 130 or 143
    uninterrupted()            a block that a stop does not cut short: outputs written as a whole
    parse_int                  argparse type: an integer, also in exponent notation ("1e12")
    HelpFormatter              --help prints the script's docstring as written and every option's default
    add_device_option          --device, for every script that runs a model
    add_dtype_option           --dtype, for the scripts that may autocast
    add_lengths_option         --lengths in tokens, for every evaluation; evaluation_lengths(train_len)
                               is its default and the grids' lengths
    add_extension_options      --rope_scaling, --rope_scale, --rope_original_len: context extension
                               without training, applied to every checkpoint an evaluation loads
"""

import argparse
import contextlib
import signal
import sys
import threading

from fope_gpt import ROPE_SCALINGS, GPTConfig
from lib import hardware
from lib.files import UserError, error_line


class Stopped(BaseException):
    """A stop asked for by a signal: SIGTERM where the script is, or a signal held by uninterrupted()
    until its block was done (`note` then says what the block finished)."""

    def __init__(self, signum, note=None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = signum, note


def stopped_by_sigterm(signum, frame):
    raise Stopped(signum)


def nothing_written(signal_name):
    return f"stopped ({signal_name}); nothing was written"


def run(script, work, stopped=nothing_written):
    """work(), with the errors a user can fix (UserError, and OSError: a full disk, a folder
    that cannot be written) ending the script in one line on stderr, exit status 1; and a stop
    (Ctrl-C, SIGTERM) in one line, `stopped(signal name)`, exit status 128 + the signal's number.
    Every file a script writes goes through files.write_atomically, so a stop leaves none half-written."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped_by_sigterm) if main_thread else None
    try:
        return work()
    except (UserError, OSError) as error:
        sys.exit(f"{script}: error: {error_line(error)}")
    except (KeyboardInterrupt, Stopped) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"{script}: {stop.note if getattr(stop, 'note', None) else stopped(name)}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        if main_thread and previous is not None:  # None: a handler not installed from Python, left as it is
            signal.signal(signal.SIGTERM, previous)


WRITTEN = "stopped ({}) after writing its results"


@contextlib.contextmanager
def uninterrupted(done=None):
    """Run the block to its end whatever signal comes: SIGINT and SIGTERM are held meanwhile and
    raised after it as Stopped, with the note `done` (e.g. WRITTEN; "{}": the signal's name), so
    that a stop never leaves a script's outputs half-old, half-new, nor a checkpoint without its
    bookkeeping. Without a note, run()'s own `stopped` says where the script stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {signum: signal.signal(signum, lambda number, frame: held.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if held:
        raise Stopped(held[0], done and done.format(signal.Signals(held[0]).name))


def parse_int(text):
    """argparse type: an integer, also one written in exponent notation ("1e12", "2.5e3")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help prints the script's docstring as it is written, and after the help of every option
    that is not required its default, unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.option_strings and not action.required and action.default is not argparse.SUPPRESS
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


# -----------------------------------------------------------------------------
# where and in which precision a model runs (hardware.py decides what "auto" means)

DEVICE_HELP = "auto: cuda if PyTorch sees a GPU, else cpu; or cpu, cuda, cuda:N"
DTYPE_HELP = "bf16 autocast or fp32; auto: bf16 where the hardware has it natively"


def add_device_option(parser):
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")


def add_dtype_option(parser):
    parser.add_argument("--dtype", choices=hardware.DTYPES, default="auto", help=f"{DTYPE_HELP} (default: auto)")


# -----------------------------------------------------------------------------
# evaluation lengths


def evaluation_lengths(train_len, longest=16):
    """The lengths an evaluation measures unless told otherwise: half of train_len, train_len, and
    its doublings up to `longest` x train_len, e.g. 128, 256, ..., 4096 for train_len 256."""
    return sorted({max(2, train_len // 2), *(train_len * 2**k for k in range(longest.bit_length()))})


def parse_lengths(text):
    """argparse type: '128,256,512' -> [128, 256, 512] (sorted, without repeats, each >= 2)."""
    try:
        lengths = sorted({parse_int(part) for part in text.split(",") if part.strip()})
    except argparse.ArgumentTypeError:
        lengths = []
    if not lengths or lengths[0] < 2:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 2, got {text!r}")
    return lengths


def add_lengths_option(parser, what, of_train_len="the longest train_len given"):
    """--lengths: `what` (e.g. "prompt lengths"), in tokens; by default evaluation_lengths() of
    `of_train_len` (said in words)."""
    parser.add_argument("--lengths", type=parse_lengths, metavar="N,N,...",
                        help=f"comma-separated {what} in tokens (default: half, once, and 2, 4, 8 and 16 times "
                             f"{of_train_len})")


# -----------------------------------------------------------------------------
# context extension without training

# GPTConfig fields an evaluation may override on a trained checkpoint, with what they mean
# (train.py --help gives the same words for the same fields)
EXTENSION_OPTIONS = {
    "rope_scaling": "context extension of rope/fope frequencies",
    "rope_scale": "s, the factor by which the context is meant to grow",
    "rope_original_len": "YaRN's L0, the length the frequencies were trained at (0: train_len)",
}


def add_extension_options(parser):
    """The EXTENSION_OPTIONS as flags; a flag not given keeps the checkpoint's own value."""
    parser.add_argument("--rope_scaling", choices=ROPE_SCALINGS,
                        help=f"{EXTENSION_OPTIONS['rope_scaling']} (default: the checkpoint's own)")
    parser.add_argument("--rope_scale", type=float, help=f"{EXTENSION_OPTIONS['rope_scale']} (default: the checkpoint's own)")
    parser.add_argument("--rope_original_len", type=int,
                        help=f"{EXTENSION_OPTIONS['rope_original_len']} (default: the checkpoint's own)")


def extension_overrides(args):
    """The extension options given, as GPTConfig overrides; a value GPTConfig refuses raises
    UserError here, before any checkpoint is loaded (so it is not taken for a corrupt one)."""
    overrides = {key: getattr(args, key) for key in EXTENSION_OPTIONS if getattr(args, key) is not None}
    try:
        GPTConfig(**overrides)
    except ValueError as error:
        raise UserError(str(error)) from None
    return overrides
