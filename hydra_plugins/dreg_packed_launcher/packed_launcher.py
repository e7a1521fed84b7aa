"""``hydra/launcher=packed``: the jobs of a multirun trained as replicas of shared models.

Hydra finds launchers in the ``hydra_plugins`` namespace and imports every module there at
start-up, so this shim imports nothing heavy; the work is :func:`dreg.packed_launcher.launch`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class PackedLauncher(Launcher):
    """Options (``conf/hydra/launcher/packed.yaml``).

    :param max_pack_size: most jobs in one pack (memory grows with it); see :mod:`dreg.pack`.
    :param replicas_per_pass: how many alike jobs share one stacked model (1: each steps
        alone, in place), or ``auto``; see :func:`dreg.cohort.replicas_per_pass`.
    """

    def __init__(self, max_pack_size: int = 48, replicas_per_pass: int | str = "auto") -> None:
        self.max_pack_size = max_pack_size
        self.replicas_per_pass = replicas_per_pass
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from dreg.packed_launcher import launch  # torch and Lightning only when a sweep runs

        return launch(self, job_overrides, initial_job_idx)
