"""The library's error hierarchy, and the exit code of each kind.

* :class:`UserError`: the user asked for something that cannot be done (a bad config value, a
  missing or corrupt checkpoint or dataset file, a teacher pool that does not fit the data). The
  command line prints one line and exits 2.
* :class:`NumericError`: the run's numbers went wrong (a NaN or infinite loss, a failed agent
  update). The command line prints one line and exits 3; the last good checkpoint is kept.
* :class:`LostError`: a node or process the run depended on was lost and Ray could not restart
  it (a dead node, raylet or GCS; a learner past its restarts). The command line prints one line
  naming what was lost and how to continue the run, and exits 4.
* Anything else is a bug: the command line lets the traceback through.

Concrete errors also derive from the builtin that code catches today (``ConfigError`` is a
``ValueError`` too). This module imports nothing from the library, so any module may import it.
"""
from __future__ import annotations

import errno

USER_EXIT = 2
NUMERIC_EXIT = 3
LOST_EXIT = 4
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
"""``OSError.errno`` values of a run folder or storage that cannot be written (:class:`UnwritableError`)."""


class MtkdError(Exception):
    """Base of every error the library raises on purpose (not a bug)."""


class UserError(MtkdError):
    """Bad input: config, checkpoint, dataset files, pool/class mismatch. The CLI exits 2."""


class NumericError(MtkdError):
    """A loss or an update became NaN or infinite. The CLI exits 3."""


class LostError(MtkdError):
    """A node or process the run depended on is gone (its message says which). The CLI exits 4;
    ``line``, when set, is the whole line to print (what was lost and how to continue)."""

    line: str | None = None


class UnwritableError(UserError, OSError):
    """The run folder or the checkpoint storage cannot be written (permissions, a read-only or full
    disk). The CLI exits 2; ``line``, when set, is the whole line (what, and how to continue)."""

    line: str | None = None


class RunExistsError(UserError, FileExistsError):
    """A fresh run (or search) into a folder that already holds one, without ``--overwrite``."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
"""What to catch as a user error (exit 2)."""
NUMERIC_ERRORS: tuple[type[BaseException], ...] = (NumericError,)
"""What to catch as a numeric error (exit 3)."""
LOST_ERRORS: tuple[type[BaseException], ...] = (LostError,)
"""What to catch as a lost node or process (exit 4)."""
RUN_ERRORS: tuple[type[BaseException], ...] = (*NUMERIC_ERRORS, *USER_ERRORS)
"""Every expected error: what a worker hands back to its driver instead of crashing."""


def exit_code(error: BaseException) -> int | None:
    """The CLI exit code of ``error``: 4 (lost), 3 (numeric), 2 (user), None (a bug: show the traceback)."""
    if isinstance(error, LOST_ERRORS):
        return LOST_EXIT
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
