"""TorchX's Slurm scheduler, fixed for Slurm 22.05 (Debian 12, Ubuntu 22.04/24.04) and clusters without sacct.

Registered as the TorchX scheduler plugin ``slurm`` (entry point group ``torchx.schedulers`` in pyproject.toml),
so ``torchx run -s slurm`` uses it instead of the built-in one; ``local_cwd`` is registered first to stay the
default scheduler (TorchX lists plugins first and takes the first one as default).

What it changes, and why:

- ``squeue --json`` on 22.05 ignores ``-j`` (it returns every job it remembers, rc 0 for unknown ids): the jobs
  are filtered to the asked app here, otherwise ``torchx status`` mixes apps.
- 22.05 has no ``job_resources`` for pending jobs (``torchx run`` crashed with ``KeyError`` right after submit)
  and its ``het_job_id`` is a plain int (``torchx list`` crashed).
- A het job's state is its leader's (the batch script's), not whichever component squeue printed last.
- Without accounting (no slurmdbd) ``sacct`` fails: ``describe`` answers "unknown" instead of raising, ``list``
  falls back to ``squeue``.
- A group asking for more GPUs than one node has is refused before submission (when the count is known:
  ``TORCHX_DILOCO_GPUS`` or sinfo's gres), as one line.
- sbatch's refusal (unknown partition, more GPUs than any node has) is raised as one line naming sbatch's error,
  instead of a ``CalledProcessError`` traceback.
- ``torchx log`` reads stdout (where the training prints its progress) unless ``--streams`` says otherwise, and
  finds the logs from any directory (the job's working directory from squeue) while Slurm knows the job.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from datetime import datetime
from typing import Any, Dict, Iterable, List, Mapping, Optional

from torchx.schedulers import slurm_scheduler as upstream
from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Stream, filter_regex, split_lines_iterator
from torchx.schedulers.local_scheduler import LogIterator
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus
from torchx.specs.api import InvalidRunConfigException

from torchx_diloco.gpus import check_node_fits

log = logging.getLogger(__name__)

# states squeue shows that TorchX's table lacks (they would read as UNKNOWN)
_EXTRA_STATES: Dict[str, AppState] = {
    "COMPLETING": AppState.RUNNING,
    "CONFIGURING": AppState.PENDING,
    "REQUEUE_HOLD": AppState.PENDING,
    "REQUEUE_FED": AppState.PENDING,
    "STOPPED": AppState.PENDING,
    "SIGNALING": AppState.RUNNING,
    "STAGE_OUT": AppState.RUNNING,
}


class SbatchError(InvalidRunConfigException):
    """sbatch refused the job; the message is sbatch's own error line.

    A subclass of TorchX's run-config error so that ``torchx run`` prints it as an error and exits 1,
    rather than a traceback.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.cfg_key = ""


def het_job_id(job: Mapping[str, Any]) -> int:
    """The het job (leader) id of a squeue job entry, 0 for a plain job: an int on 22.05, a dict from 23.02."""
    h = job.get("het_job_id")
    if isinstance(h, dict):
        return int(h.get("number") or 0) if h.get("set") else 0
    return int(h or 0)


def job_state(job: Mapping[str, Any]) -> AppState:
    """A squeue job entry's state (a string up to 23.02, a list of strings from 23.11)."""
    raw = job.get("job_state")
    name = str(raw[0]) if isinstance(raw, list) and raw else str(raw)
    return _EXTRA_STATES.get(name) or upstream.appstate_from_slurm_state(name)


def jobs_of_app(jobs: Iterable[Mapping[str, Any]], app_id: str) -> List[Mapping[str, Any]]:
    """The squeue entries of one app: the job itself, or every component of the het job it leads."""
    return [j for j in jobs if str(j.get("job_id")) == app_id or str(het_job_id(j) or "") == app_id]


def sbatch_error_line(stderr: str, returncode: int) -> str:
    """sbatch's error as one line (its last ``error:`` line, which names the reason)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    reason = (errors or lines or [f"exit status {returncode}"])[-1]
    for prefix in ("sbatch: error: ", "Batch job submission failed: "):
        reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
    hint = ""
    if "partition" in reason.lower():
        hint = " (`sinfo -s` lists the partitions; pick one with -cfg partition=NAME)"
    elif any(w in reason.lower() for w in ("gres", "node configuration", "memory", "cpu")):
        hint = " (no node has what one role asks for: compare its GPUs/CPUs/memory with `sinfo -o '%P %c %m %G'`)"
    return f"sbatch refused the job: {reason}{hint}"


class SlurmScheduler(upstream.SlurmScheduler):
    """TorchX's ``SlurmScheduler`` with the fixes listed in the module docstring."""

    def _submit_dryrun(
        self, app: AppDef, cfg: upstream.SlurmOpts
    ) -> AppDryRunInfo[upstream.SlurmBatchRequest, upstream.SlurmOpts]:
        """Each group runs on its own node: refuse one that asks for more GPUs than a node has (when known)."""
        try:
            check_node_fits((role.resource.gpu for role in app.roles), cfg.get("partition"))
        except ValueError as e:
            raise SbatchError(str(e)) from None
        return super()._submit_dryrun(app, cfg)

    def schedule(self, dryrun_info: AppDryRunInfo[upstream.SlurmBatchRequest, upstream.SlurmOpts]) -> str:
        req = dryrun_info.request
        if req.images_to_push is not None:
            self.push_images(req.images_to_push)
        job_dir = req.job_dir
        if job_dir is not None:
            os.makedirs(job_dir, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmpdir:
            path = os.path.join(job_dir or tmpdir, "torchx-sbatch.sh")
            cmd = list(req.cmd) + ([f"--chdir={job_dir}"] if job_dir is not None else []) + [path]
            with open(path, "w") as f:
                f.write(req.materialize())
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
            except FileNotFoundError:
                raise SbatchError(
                    "sbatch not found: run torchx on a Slurm login node (or start scripts/slurm-cluster.sh)"
                ) from None
            if p.returncode != 0:
                raise SbatchError(sbatch_error_line(p.stderr, p.returncode))
            if p.stderr.strip():
                log.warning("sbatch: %s", p.stderr.strip())
            job_id = p.stdout.strip().split(";")[0]  # `--parsable` prints `id[;cluster]`
            if job_dir is not None:
                upstream._save_job_dir(job_id, job_dir)
            return job_id

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        try:
            desc = self._describe_squeue(app_id)
        except (subprocess.CalledProcessError, FileNotFoundError, ValueError) as e:
            log.info("squeue could not describe %s (%s), trying sacct", app_id, e)
            desc = None
        if desc is not None:
            return desc
        try:
            return self._describe_sacct(app_id)
        except FileNotFoundError:
            return None

    def _describe_squeue(self, app_id: str) -> Optional[DescribeAppResponse]:
        out = subprocess.run(
            ["squeue", "--json", "-j", app_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            encoding="utf-8",
            check=True,
        ).stdout
        return describe_from_squeue_json(json.loads(out), app_id)

    def _describe_sacct(self, app_id: str) -> Optional[DescribeAppResponse]:
        desc = super()._describe_sacct(app_id)
        if desc is None:
            log.info("%s is not in squeue any more and sacct has no record of it (is accounting enabled?)", app_id)
        return desc

    def list(self, cfg: Optional[Mapping[str, Any]] = None) -> List[ListAppResponse]:
        try:
            return self._list_sacct()
        except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
            return self._list_squeue()  # no accounting: only the jobs slurmctld still remembers

    def _list_sacct(self) -> List[ListAppResponse]:
        # upstream lets sacct's "accounting storage is disabled" reach the terminal; keep it quiet
        p = subprocess.run(
            ["sacct", "--json", "-S1970-01-01-00:00:01"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=True,
            encoding="utf-8",
        )
        out = []
        for job in json.loads(p.stdout)["jobs"]:
            current = job["state"]["current"]
            state = str(current[0]) if isinstance(current, list) and current else str(current)
            out.append(ListAppResponse(app_id=str(job["job_id"]), state=upstream.appstate_from_slurm_state(state)))
        return out

    def _list_squeue(self) -> List[ListAppResponse]:
        out = subprocess.run(["squeue", "--json"], stdout=subprocess.PIPE, check=True, encoding="utf-8").stdout
        return list_from_squeue_json(json.loads(out))

    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: Optional[str] = None,
        since: Optional[datetime] = None,
        until: Optional[datetime] = None,
        should_tail: bool = False,
        streams: Optional[Stream] = None,
    ) -> Iterable[str]:
        if streams == Stream.COMBINED:
            raise ValueError("Slurm keeps stdout and stderr apart: use --streams stdout or --streams stderr")
        if since or until:
            log.warning("since/until are ignored on Slurm: all log lines are returned")
        ext = "err" if streams == Stream.STDERR else "out"  # default stdout: the training's progress
        log_file = os.path.join(self._log_dir(app_id), f"slurm-{app_id}-{role_name}-{k}.{ext}")
        lines: Iterable[str] = split_lines_iterator(LogIterator(app_id, log_file, self, should_tail=should_tail))
        return filter_regex(regex, lines) if regex else lines

    def _log_dir(self, app_id: str) -> str:
        """Where the job writes its logs: its job_dir as noted at submission in this directory, else the job's
        working directory as squeue reports it (so `torchx log` works from anywhere while squeue knows the
        job), else this directory."""
        noted = upstream._get_job_dirs().get(app_id)
        if noted:
            return noted
        try:
            out = subprocess.run(
                ["squeue", "--json", "-j", app_id],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                encoding="utf-8",
                check=True,
            ).stdout
            for job in jobs_of_app(json.loads(out).get("jobs", []), app_id):
                if str(job.get("job_id")) == app_id and job.get("current_working_directory"):
                    return str(job["current_working_directory"])
        except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
            pass
        return ""


def describe_from_squeue_json(output: Mapping[str, Any], app_id: str) -> Optional[DescribeAppResponse]:
    """Roles, replicas and state of one app from ``squeue --json`` output (22.05 up to 24.11 shapes)."""
    jobs = jobs_of_app(output.get("jobs", []), app_id)
    if not jobs:
        return None
    roles: Dict[str, Role] = {}
    statuses: Dict[str, RoleStatus] = {}
    state = AppState.UNKNOWN
    for job in sorted(jobs, key=lambda j: int(j.get("het_job_offset") or 0)):
        job_app_state = job_state(job)
        if str(job.get("job_id")) == app_id:  # the leader (runs the batch script): its state is the app's
            state = job_app_state
        role_name, _, replica_id = str(job.get("name", "")).rpartition("-")
        if not role_name or not replica_id.isdigit():
            continue  # not launched by TorchX
        role = roles.setdefault(
            role_name,
            Role(
                name=role_name,
                image=job.get("current_working_directory", ""),
                entrypoint=job.get("command", ""),
                num_replicas=0,
            ),
        )
        status = statuses.setdefault(role_name, RoleStatus(role_name, replicas=[]))
        resources = job.get("job_resources")  # absent while pending on 22.05, None on 24.11.5+
        if job_app_state == AppState.PENDING or not resources:
            hosts = [(upstream.SlurmScheduler._squeue_pending_hostname(job, resources), None)]
        else:
            hosts = upstream.SlurmScheduler._squeue_allocated_nodes(resources)
        for hostname, resource in hosts:
            if resource is not None:
                role.resource = resource
            role.num_replicas += 1
            status.replicas.append(
                ReplicaStatus(id=int(replica_id), role=role_name, state=job_app_state, hostname=hostname or "")
            )
    reason = str(next((j.get("state_reason") for j in jobs if str(j.get("job_id")) == app_id), "") or "")
    return DescribeAppResponse(
        app_id=app_id,
        roles=list(roles.values()),
        roles_statuses=list(statuses.values()),
        state=state,
        msg="" if reason == "None" else reason,
    )


def list_from_squeue_json(output: Mapping[str, Any]) -> List[ListAppResponse]:
    """One entry per app (het job components other than the leader are skipped)."""
    out = []
    for job in output.get("jobs", []):
        het = het_job_id(job)
        if het and het != int(job["job_id"]):
            continue
        out.append(ListAppResponse(app_id=str(job["job_id"]), state=job_state(job), name=job.get("name", "")))
    return out


def create_scheduler(session_name: str, **kwargs: Any) -> SlurmScheduler:
    """The entry point TorchX calls for ``-s slurm``."""
    return SlurmScheduler(session_name=session_name, docker_client=kwargs.get("docker_client"))
