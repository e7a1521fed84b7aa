"""The errors a user can cause or meet, each with its own exit code.

``train.py`` prints an expected error as one line, ``error: <what is wrong>; <what to do>``,
records it in the run folder's ``status.json`` and exits with the error's code; set
``DREG_TRACEBACK=1`` to get the full traceback instead. Anything else is a bug: Python's
traceback and exit code 1.

| code | meaning |
|---|---|
| 0 | completed (or nothing left to do) |
| 1 | unexpected error (a bug): full traceback |
| 2 | :class:`ConfigError`: a config value that cannot work |
| 3 | :class:`DataError`: a data file missing, damaged or not what the reader expects |
| 4 | :class:`CheckpointError`: a checkpoint missing, not a checkpoint, damaged or unsafe |
| 5 | :class:`ResumeMismatchError`: the checkpoint belongs to a different experiment |
| 6 | :class:`NonFiniteError`: a non-finite loss or gradient (``model.nonfinite=raise``) |
| 7 | :class:`RunFolderError`: the run folder is used by another run, or live |
| 75 | preempted (SIGTERM/SIGINT): ``last.ckpt`` saved; run again with ``resume=true`` |

75 is ``EX_TEMPFAIL`` from ``sysexits.h``: "try again later", which is what a preempted run
asks for, and never 0, so ``python train.py ... && next-step`` does not carry on.
"""

from __future__ import annotations

EXIT_PREEMPTED = 75


class RunError(Exception):
    """An expected error: its message is one line naming the problem and the fix."""

    exit_code = 1


class ConfigError(RunError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""

    exit_code = 2


class DataError(RunError, RuntimeError):
    """A data file is missing, corrupt, or not what the reader expects."""

    exit_code = 3


class CheckpointError(RunError, RuntimeError):
    """A checkpoint file is missing, not a checkpoint, damaged or unsafe to load."""

    exit_code = 4


class ResumeMismatchError(RunError):
    """Resuming would continue a run under a different experiment definition."""

    exit_code = 5


class NonFiniteError(RunError, FloatingPointError):
    """A non-finite loss or gradient under ``model.nonfinite=raise``."""

    exit_code = 6


class RunFolderError(RunError):
    """The run folder holds another run's records, or a live run holds its lock."""

    exit_code = 7


class PreemptedError(RunError):
    """Raised in a multirun job that was preempted, so Hydra counts it as unfinished."""

    exit_code = EXIT_PREEMPTED
