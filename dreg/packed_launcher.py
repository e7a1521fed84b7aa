"""What ``hydra/launcher=packed`` does: sort a sweep's jobs into packs and run each pack.

Jobs that can share one batched model (same dataset, network, K, sampling, device and
precision: :func:`pack_key`) go to one pack of at most ``max_pack_size`` jobs; the others
train alone.
Packs run one after another; inside a pack every job is Hydra's ordinary job
(``hydra.core.utils.run_job``: its folder, ``.hydra`` configs, callbacks, return value)
running the ordinary task, in a thread of :class:`dreg.pack.Pack`. Each job writes its own
``train.log``.

Optimizer settings may differ inside a pack: replicas with different settings form separate
cohorts (each one stacked model with one optimizer), so a learning-rate sweep packs too.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from dreg.errors import ConfigError
from dreg.pack import Pack

log = logging.getLogger(__name__)

JOB_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log


def pack_key(cfg: DictConfig) -> str | None:
    """What a job must share with the others of its pack, or ``None`` when it trains alone
    (another mode than train, or several devices)."""
    trainer = cfg.trainer
    alone = (
        cfg.mode.run.get("_target_") != "dreg.run.train"
        or str(trainer.get("devices", 1)) not in ("1", "[0]", "auto")
        or "ddp" in str(trainer.get("strategy") or "")
    )
    if alone:
        return None
    shared = {
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),
        "num_samples": cfg.model.num_samples,
        "antithetic": cfg.model.get("antithetic", False),
        "train_model": cfg.model.get("train_model", True),
        "accelerator": trainer.get("accelerator"),
        "precision": str(trainer.get("precision", "32-true")),
    }
    return json.dumps(shared, sort_keys=True, default=str)


def plan_packs(keys: Sequence[str | None], max_pack_size: int) -> list[list[int]]:
    """Job indices per pack, in sweep order: equal keys together, at most ``max_pack_size``."""
    groups: dict[str, list[int]] = {}
    packs: list[list[int]] = []
    for index, key in enumerate(keys):
        if key is None:
            packs.append([index])
            continue
        group = groups.setdefault(key, [])
        if not group:
            packs.append(group)
        group.append(index)
        if len(group) == max_pack_size:
            del groups[key]  # the next job with this key opens a new pack
    return packs


def check_options(max_pack_size: Any, replicas_per_pass: Any = "auto") -> None:
    if not _positive_int(max_pack_size):
        raise ConfigError(
            f"hydra.launcher.max_pack_size={max_pack_size!r}: must be an integer >= 1"
        )
    if replicas_per_pass != "auto" and not _positive_int(replicas_per_pass):
        raise ConfigError(
            f"hydra.launcher.replicas_per_pass={replicas_per_pass!r}: must be auto or an "
            "integer >= 1"
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """The launcher's ``launch``: returns one ``JobReturn`` per job, in sweep order."""
    try:
        check_options(launcher.max_pack_size, launcher.replicas_per_pass)
    except ConfigError as err:  # before any job: one line and the config error's exit code
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    configs, names = [], []
    for offset, overrides in enumerate(job_overrides):
        index = initial_job_idx + offset
        job_config = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job_config):
            job_config.hydra.job.id = job_config.hydra.job.num = index
        configs.append(job_config)
        names.append(f"#{index} " + " ".join(filter_overrides(overrides)))
    packs = plan_packs([pack_key(c) for c in configs], launcher.max_pack_size)
    log.info("Packing %d jobs into %d packs (max %d jobs each)", len(configs), len(packs),
             launcher.max_pack_size)  # fmt: skip
    for number, pack in enumerate(packs, 1):
        log.info("  pack %d (%d jobs): %s", number, len(pack), "; ".join(names[i] for i in pack))

    returns: list[JobReturn | None] = [None] * len(configs)
    for number, members in enumerate(packs, 1):
        log.info("Pack %d: training %d jobs together", number, len(members))
        pack = Pack(launcher.replicas_per_pass)
        jobs = [
            (
                names[i],
                functools.partial(
                    run_job,
                    hydra_context=context,
                    task_function=with_job_log(launcher.task_function),
                    config=configs[i],
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                    configure_logging=False,  # one process: each job gets a file handler
                ),
            )
            for i in members
        ]
        results = pack.run(jobs)
        log.info("Pack %d: done, %d joint steps", number, pack.steps)
        stop = None
        for i, result in zip(members, results, strict=True):
            if isinstance(result, JobReturn):
                returns[i] = result
            elif stop is None:
                stop = result  # a preempted job stops the sweep (SystemExit), as alone
        if stop is not None:
            raise stop
    return returns


def with_job_log(task_function: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """The task, logging what its thread logs to the job's ``<job name>.log``."""

    @functools.wraps(task_function)
    def task(cfg: DictConfig) -> Any:
        hydra_cfg = HydraConfig.get()
        path = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(JOB_LOG_FORMAT))
        ident = threading.get_ident()
        handler.addFilter(lambda record: record.thread == ident)
        logging.getLogger().addHandler(handler)
        try:
            return task_function(cfg)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    return task
