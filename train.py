"""Train a VAE with a chosen gradient estimator: ``python train.py estimator=dreg_iwae``.

Expected errors (bad config, data, checkpoint, resume mismatch, non-finite values, a used or
unwritable run folder, preemption, a mistyped override) end with one line, ``error: ...``, and
the exit code of :mod:`dreg.errors`; a multirun with failed jobs ends with one line naming
them. ``DREG_TRACEBACK=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) shows the full traceback.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

# dreg.errors' codes, repeated: importing dreg loads torch, and a mistyped override should
# come back at once (tests/test_errors_journeys.py checks they agree).
EXIT_CONFIG, EXIT_STORAGE, EXIT_SWEEP_FAILED = 2, 8, 9

# Hydra's errors before any job starts: the command line or the composed config is wrong.
COMPOSITION_ERRORS = (HydraException, OmegaConfBaseException)

jobs_started = 0  # jobs that began in this process (composition is over once one has)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    global jobs_started
    jobs_started += 1
    # Imported here so that `--help` and config errors come back fast.
    from dreg.errors import PreemptedError, RunError
    from dreg.run import main as run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except RunError as err:
        if multirun and isinstance(err, PreemptedError):
            # Stop the whole sweep (the machine is going away); resume=true continues it.
            from dreg.sweep import sweep_dir_of, write_summary

            write_summary(sweep_dir_of(HydraConfig.get()))
            raise SystemExit(err.exit_code) from None
        if multirun or os.environ.get("DREG_TRACEBACK"):
            raise  # multirun: recorded as this job's failure; the sweep goes on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def cli() -> None:
    """:func:`main` with Hydra's own failures given dreg's one line and exit code.

    Hydra prints its errors (an unknown key, group or option, bad override syntax) and exits
    1, the code of a bug, and a multirun with a failed job ends in that job's traceback. With
    ``HYDRA_FULL_ERROR=1`` Hydra raises them instead, and they are sorted here.
    """
    if os.environ.get("DREG_TRACEBACK") or os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        exit_if_a_sweep_failed(err)
        if jobs_started == 0 and isinstance(err, COMPOSITION_ERRORS):
            fail(one_line(str(err)), EXIT_CONFIG)
        if jobs_started == 0 and isinstance(err, OSError):
            # Hydra writes .hydra/ and the job's log into the run folder before the job starts
            # (dreg.errors.StorageError is for what the job itself writes).
            fail(f"cannot write the run folder: {err}; choose a writable hydra.run.dir "
                 "(hydra.sweep.dir with -m) or fix its permissions", EXIT_STORAGE)  # fmt: skip
        raise
    exit_if_a_sweep_failed(None)


def exit_if_a_sweep_failed(err: BaseException | None) -> None:
    """A multirun whose jobs failed: one line naming them, and ``EXIT_SWEEP_FAILED``.

    Every job has run (Hydra's sweepers run the whole batch; Optuna's carries on past a
    failed trial, and returns normally). A failure that is a bug gets its traceback first.
    """
    sweep = sys.modules.get("dreg.sweep")  # loaded by Hydra's callbacks, once a sweep starts
    report = sweep.failure_report() if sweep is not None else None
    if report is None:
        return
    from dreg.errors import RunError  # loaded already, with the sweep

    if err is not None and not isinstance(err, RunError):
        import traceback

        traceback.print_exception(err)
    fail(report, EXIT_SWEEP_FAILED)


def one_line(text: str) -> str:
    """Hydra's multi-line message as one line: the search path dropped, a list after a colon
    (e.g. the available options) joined with commas."""
    text = text.split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out, listing = "", False
    for line in lines:
        if not out:
            out = line
        elif out.endswith(":"):
            out, listing = f"{out} {line}", True
        else:
            out += (", " if listing else " " if out.endswith((".", ";", ",")) else "; ") + line
    return out


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    cli()
