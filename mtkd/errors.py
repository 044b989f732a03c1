"""The library's error hierarchy, and the exit code of each kind.

* :class:`UserError`: the user asked for something that cannot be done (a bad config value, a
  missing or corrupt checkpoint or dataset file, a teacher pool that does not fit the data). The
  command line prints one line and exits 2.
* :class:`NumericError`: the run's numbers went wrong (a NaN or infinite loss, a failed agent
  update). The command line prints one line and exits 3; the last good checkpoint is kept.
* Anything else is a bug: the command line lets the traceback through.

Concrete errors also derive from the builtin that code catches today (``ConfigError`` is a
``ValueError`` too). This module imports nothing from the library, so any module may import it.
"""
from __future__ import annotations

USER_EXIT = 2
NUMERIC_EXIT = 3


class MtkdError(Exception):
    """Base of every error the library raises on purpose (not a bug)."""


class UserError(MtkdError):
    """Bad input: config, checkpoint, dataset files, pool/class mismatch. The CLI exits 2."""


class NumericError(MtkdError):
    """A loss or an update became NaN or infinite. The CLI exits 3."""


class RunExistsError(UserError, FileExistsError):
    """A fresh run (or search) into a folder that already holds one, without ``--overwrite``."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
"""What to catch as a user error (exit 2)."""
NUMERIC_ERRORS: tuple[type[BaseException], ...] = (NumericError,)
"""What to catch as a numeric error (exit 3)."""
RUN_ERRORS: tuple[type[BaseException], ...] = (*NUMERIC_ERRORS, *USER_ERRORS)
"""Every expected error: what a worker hands back to its driver instead of crashing."""


def exit_code(error: BaseException) -> int | None:
    """The CLI exit code of ``error``: 3 (numeric), 2 (user), None (a bug: show the traceback)."""
    if isinstance(error, NUMERIC_ERRORS):
        return NUMERIC_EXIT
    if isinstance(error, USER_ERRORS):
        return USER_EXIT
    return None


def error_class(name: str) -> type[MtkdError] | None:
    """The :class:`MtkdError` subclass called ``name`` (to re-raise an error sent by name from
    another process), or None when no imported subclass has that name."""
    pending: list[type[MtkdError]] = [MtkdError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return None
