"""What every ``python -m sasa_jax.*`` command does with a mistake its user can make.

A ``ValueError`` or ``FileNotFoundError`` (a bad flag value, a missing workdir or dataset) is
the user's to fix, and its message says how: the command prints it as one line,
``PROG: error: MESSAGE``, on stderr and exits with status 2, the status absl and argparse give
a usage error. Any other exception is a bug and keeps its traceback.

    with cli.user_errors("sasa_jax.evaluate"):
        out = evaluate_run(...)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

EXIT_USER_ERROR = 2
USER_ERRORS = (ValueError, FileNotFoundError)


def fail(prog: str, message: str) -> NoReturn:
    """Prints ``PROG: error: MESSAGE`` on stderr and exits with status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(prog: str, *, traceback: bool = False) -> Iterator[None]:
    """Turns a ValueError or FileNotFoundError raised inside into ``fail(prog, message)``;
    with ``traceback=True`` (a command's ``--traceback``) it propagates instead."""
    try:
        yield
    except USER_ERRORS as error:
        if traceback:
            raise
        fail(prog, str(error))


def no_positional_arguments(argv: Sequence[str]) -> None:
    """absl's ``argv`` holds the program, then what no flag took: refuse anything there."""
    from absl import app  # absl only where absl parsed the flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
