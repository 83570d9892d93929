"""What every command line of the project shares (``python -m nbflash``, ``python -m
experiments``, ``python -m experiments.tuning``): arguments checked up front, and a user's error
told in one line.

- :class:`ArgumentParser` reports a bad argument as one line on stderr, ``<prog>: error:
  <message>``, and exits with status 2 (no usage block; ``--help`` shows it). Its subparsers
  are of the same class (argparse's add_subparsers makes them so).
- The ``type=`` functions below refuse a bad value when the arguments are parsed:
  positive_int, nonnegative_int, positive_float, probability ([0, 1): dropout), density ((0, 1]:
  block-sparse), output_file and output_dir (a path that can be written: its folder exists or
  can be made, and a file can be created there — tried with a temporary file, removed at once),
  input_file (a file that exists). A value is never replaced by a default behind the user's
  back: a default is None and the verb fills it in with ``if x is None``.
- :func:`run_main` runs a command's body: a user error (:data:`USER_ERRORS`: UsageError, which a
  verb raises for what it finds wrong with its arguments, nbflash.InputError, the data
  store's StaleData and CorruptData) becomes one line ``<prog>: error: <message>`` on stderr and exit status 2;
  Ctrl-C one line and 130; anything else is a bug and shows its traceback.
"""

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path


class UsageError(Exception):
    """What a verb finds wrong with its arguments (beyond what argparse checks): one line on
    stderr, exit status 2."""


def one_line(message):
    """`message` with its line breaks and runs of spaces made single spaces."""
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an error is one line, ``<prog>: error: <message>``, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def user_errors():
    """The exceptions that are a user's error, not a bug, reported in one line (run_main):
    UsageError, nbflash.InputError, and the data store's StaleData (data from another GPU) and
    CorruptData (a data file that cannot be read)."""
    from .bench import store  # noqa: PLC0415  (the store imports nbflash)
    from .errors import InputError  # noqa: PLC0415
    return UsageError, InputError, store.StaleData, store.CorruptData


def report(prog, exc):
    """Print a user error as one line on stderr."""
    print(f"{prog}: error: {one_line(exc) or type(exc).__name__}", file=sys.stderr)


def run_main(prog, body, argv=None):
    """body(argv) -> exit status, with a user error (user_errors()) as one line on stderr and
    status 2, Ctrl-C as "interrupted" and 130, output into a closed pipe quietly 1; any other
    exception propagates (a bug: its traceback). argparse's own errors exit 2 from
    ArgumentParser.error (SystemExit)."""
    try:
        return body(argv)
    except BrokenPipeError:    # the output piped into a reader that stopped (| head)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())    # so that Python's exit flush stays quiet
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as exc:
        report(prog, exc)
        return 2


# --- argparse type= functions: a bad value is refused while parsing ----------------------------

def _int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text):
    """An integer >= 1 (sizes, counts, repeats, block sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text):
    """An integer >= 0 (warmup calls)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text):
    """A finite number > 0 (time limits)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def probability(text):
    """A probability in [0, 1) (dropout: 1 would drop everything)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {text!r}")
    return value


def density(text):
    """A fraction in (0, 1] (the blocks of a block mask that are on)."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a density in (0, 1], got {text!r}")
    return value


def _nearest_existing(path):
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_folder(folder, what):
    """`folder` exists and takes files, or it can be made (its nearest existing parent folder
    takes files). Tried with a temporary file, removed at once: nothing is left behind."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {what}: {base} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".nbflash-write-test-")
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        why = f"no file can be created in {base} ({exc.strerror or exc})"
        if base != folder:
            why = f"{folder} does not exist and cannot be made: " + why
        raise argparse.ArgumentTypeError(f"cannot write {what}: {why}") from None


def output_file(text):
    """A file path that can be written: not a directory, writable if it exists, and its folder
    exists or can be made and takes files. Returns the path as given; the verb that writes it
    makes the missing folders (make_parent)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: the file is read-only")
    _writable_folder(path.parent, text)
    return text


def output_dir(text):
    """A folder path that can be written: an existing folder that takes files, or one that can
    be made. Returns the path as given."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    _writable_folder(path, text)
    return text


def input_file(text):
    """The path of a file that exists and can be read. Returns the path as given."""
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot read it (permission denied)")
    return text


def check_output_file(text, option):
    """output_file for a path a verb decides (a default), as a UsageError naming `option`."""
    try:
        return output_file(str(text))
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{option} {text}: {exc}") from None


def make_parent(path):
    """Make the folders above a file about to be written (output_file allowed them)."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)


__all__ = ["UsageError", "ArgumentParser", "user_errors", "report", "run_main", "one_line",
           "positive_int", "nonnegative_int", "positive_float", "probability", "density",
           "output_file", "output_dir", "input_file", "check_output_file", "make_parent"]
