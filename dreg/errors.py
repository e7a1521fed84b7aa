"""The errors a user can cause or meet, each with its own exit code.

``train.py`` prints an expected error as one line, ``error: <what is wrong>; <what to do>``,
records it in the run folder's ``status.json`` and exits with the error's code; set
``DREG_TRACEBACK=1`` to get the full traceback instead. Anything else is a bug: Python's
traceback and exit code 1. Hydra's own refusals (an unknown key, group or option, a
mistyped override) are config errors: one line, code 2. In a multirun each job records its
own code in its ``status.json`` (and ``summary.csv``); the command ends with one line naming
the failed jobs and code 9.

| code | meaning |
|---|---|
| 0 | completed (or nothing left to do) |
| 1 | unexpected error (a bug): full traceback |
| 2 | :class:`ConfigError`: a config value that cannot work, or an override Hydra refuses |
| 3 | :class:`DataError`: a data file missing, damaged or not what the reader expects |
| 4 | :class:`CheckpointError`: a checkpoint missing, not a checkpoint, damaged or unsafe |
| 5 | :class:`ResumeMismatchError`: the checkpoint belongs to a different experiment |
| 6 | :class:`NonFiniteError`: a non-finite loss or gradient (``model.nonfinite=raise``) |
| 7 | :class:`RunFolderError`: the run folder is used by another run, or live |
| 8 | :class:`StorageError`: a file could not be written (disk full, quota, read-only, I/O) |
| 9 | a multirun finished with failed jobs (each job's own code: its ``status.json``) |
| 75 | preempted (SIGTERM/SIGINT): ``last.ckpt`` saved; run again with ``resume=true`` |

75 is ``EX_TEMPFAIL`` from ``sysexits.h``: "try again later", which is what a preempted run
asks for, and never 0, so ``python train.py ... && next-step`` does not carry on.
"""

from __future__ import annotations

EXIT_PREEMPTED = 75
EXIT_SWEEP_FAILED = 9  # a multirun whose jobs ran but some failed (train.py)


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


class StorageError(RunError):
    """Writing a run's files failed in the filesystem (disk full, quota, read-only, I/O
    error); the files written before are intact."""

    exit_code = 8


class PreemptedError(RunError):
    """Raised in a multirun job that was preempted, so Hydra counts it as unfinished."""

    exit_code = EXIT_PREEMPTED
