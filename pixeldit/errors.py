"""The one error policy of every console script.

Library code raises specific exceptions (``UserError`` and its subclasses for mistakes a user can fix, or the
standard ``ValueError`` / ``FileNotFoundError`` with a message naming the file, row or key at fault). A console
script wraps its body in ``cli_main``: a user error becomes ONE line on stderr, ``{prog}: error: {message}``,
and exit code 2; anything else is a bug and keeps its traceback. ``--traceback`` (anywhere on the command line)
or ``PIXELDIT_TRACEBACK=1`` shows the traceback of user errors too.

    def main(argv=None) -> int:
        return cli_main("pixeldit-foo", _main, argv)

``CliParser`` is an ``argparse.ArgumentParser`` whose usage errors follow the same rule (one line, exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "PIXELDIT_TRACEBACK"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix: a bad flag, a missing or damaged file, an invalid config value.

    The message names the culprit (file, row, key), says what is wrong and what to do.
    """


class ConfigError(UserError, ValueError):
    """An invalid run / launch / release configuration value (also a ValueError for library callers)."""


class DataError(UserError, ValueError):
    """Damaged or inconsistent input data (a shard, a manifest, a parquet row)."""


class CheckpointError(UserError, RuntimeError):
    """A missing, damaged or incompatible checkpoint or release folder."""


class StorageError(UserError):
    """Remote storage (S3) could not be reached or kept failing after the configured retries; the message names
    the object, the endpoint and the setting to change (``pixeldit.s3.S3Settings``). Deliberately not an
    ``OSError``: code that skips a damaged sample on ``OSError`` must not skip an unreachable bucket."""


# what a console script reports in one line; OSError subclasses that a user causes by naming a wrong path
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError, FileExistsError)


def show_tracebacks(argv: Sequence[str] | None = None) -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or TRACEBACK_FLAG in (argv or ())


def one_line(err: BaseException) -> str:
    """The message of an exception on one line (KeyError's quotes removed)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    return text


def cli_main(prog: str, fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)`` under the error policy; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = show_tracebacks(args)
    args = [a for a in args if a != TRACEBACK_FLAG]
    try:
        return int(fn(args) or 0)
    except USER_ERRORS as err:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors raise ``UserError`` (one line via ``cli_main``, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")
