"""TorchX's ``local_cwd`` scheduler, refusing before anything starts what this machine cannot run: more GPUs than
it has, and groups that span several nodes (``--nodes_per_group`` > 1, a Slurm-only shape).

Registered as the TorchX scheduler plugin ``local_cwd`` (entry point group ``torchx.schedulers``); everything
else is TorchX's own. The checks live here, not in the component, because only the scheduler knows that all
groups share one machine (on Slurm each group has its own node: see ``torchx_diloco.slurm``).
"""

from __future__ import annotations

from typing import Any

from torchx.schedulers.local_scheduler import CWDImageProvider, LocalScheduler
from torchx.specs import AppDef, AppDryRunInfo
from torchx.specs.api import InvalidRunConfigException

from torchx_diloco.gpus import check_machine_fits

# Role.metadata key: the nodes a group role spans (set by the components; > 1 only runs on Slurm)
NODES_METADATA = "torchx_diloco/nodes_per_group"


class RunRefused(InvalidRunConfigException):
    """A request the scheduler cannot meet; ``torchx run`` prints it as one error line and exits 1."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.cfg_key = ""


class LocalCwdScheduler(LocalScheduler):
    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo:
        try:
            check_machine_fits(role.resource.gpu * role.num_replicas for role in app.roles)
        except ValueError as e:
            raise RunRefused(str(e)) from None
        for role in app.roles:
            nodes = role.metadata.get(NODES_METADATA, 1)
            if nodes > 1:
                raise RunRefused(
                    f"--nodes_per_group {nodes} needs Slurm (each group's nodes are het-job components there), but "
                    "local_cwd runs every group on this one machine: drop --nodes_per_group (more ranks per group "
                    "here: --gpus_per_group), or submit with -s slurm"
                )
        return super()._submit_dryrun(app, cfg)


def create_scheduler(session_name: str, cache_size: int = 100, **kwargs: Any) -> LocalCwdScheduler:
    """The entry point TorchX calls for ``-s local_cwd``: TorchX's own, with the GPU check."""
    return LocalCwdScheduler(
        session_name=session_name,
        image_provider_class=CWDImageProvider,
        cache_size=cache_size,
        extra_paths=kwargs.get("extra_paths"),
    )
