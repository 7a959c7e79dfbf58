"""TorchX's ``local_cwd`` scheduler, refusing before anything starts what this machine cannot run, keeping the
logs, and ending ``torchx run`` with the one line that matters.

Registered as the TorchX scheduler plugin ``local_cwd`` (entry point group ``torchx.schedulers``); everything
else is TorchX's own. What it adds:

- Refusals: more GPUs than the machine has, and groups that span several nodes (``--nodes_per_group`` > 1, a
  Slurm-only shape). They live here, not in the component, because only the scheduler knows that all groups
  share one machine (on Slurm each group has its own node: see ``torchx_diloco.slurm``).
- Logs kept: without a ``log_dir`` TorchX writes them to a temporary folder it deletes on exit, so a failure's
  log was gone by the time one read the failure. Here the default is ``torchx_logs`` in the launch directory
  (what the repository's ``.torchxconfig`` sets).
- The failure in one line: a failed run's reply file (torchelastic's error file, which our entry points write
  with their one-line error) becomes the app's ``msg``, and, after TorchX's status dump, the last line
  ``torchx run`` prints, with the log folder on the line before it.
- Ctrl-C (or SIGTERM) stops the run and ends with one line saying how to resume, instead of TorchX's
  traceback and the stopping groups' last words.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import threading
from types import FrameType
from typing import Any, Dict, Iterable, List, Optional, Tuple

from torchx.schedulers.api import DescribeAppResponse
from torchx.schedulers.local_scheduler import CWDImageProvider, LocalScheduler, Opts, PopenRequest
from torchx.specs import AppDef, AppDryRunInfo, AppState
from torchx.specs.api import InvalidRunConfigException

from torchx_diloco.errors import ERROR_FILE_ENV, UserError, read_error_file
from torchx_diloco.gpus import check_machine_fits

# Role.metadata key: the nodes a group role spans (set by the components; > 1 only runs on Slurm)
NODES_METADATA = "torchx_diloco/nodes_per_group"
DEFAULT_LOG_DIR = "torchx_logs"  # in the launch directory, when -cfg log_dir / .torchxconfig sets none
TRAIN_MODULE = "torchx_diloco.train"
PREFIX = "torchx_diloco"


class RunRefused(InvalidRunConfigException):
    """A request the scheduler cannot meet; ``torchx run`` prints it as one error line and exits 1."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.cfg_key = ""


class RunStopped(SystemExit):
    """Ctrl-C or SIGTERM: leaves ``torchx run`` through TorchX's own clean-up (which stops the app) and exits
    128 + the signal, quietly (the interpreter prints no traceback for a SystemExit)."""


class LocalCwdScheduler(LocalScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._requests: Dict[str, PopenRequest] = {}
        self._states: Dict[str, AppState] = {}
        self._stopped_by: Optional[int] = None
        self._states_at_stop: Dict[str, AppState] = {}
        if threading.current_thread() is threading.main_thread():  # where TorchX registered its own handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._stop)

    def _stop(self, signum: int, _frame: Optional[FrameType]) -> None:
        if self._stopped_by is None:
            self._stopped_by = signum
            self._states_at_stop = dict(self._states)  # what stopping does to the apps (agents end FAILED) is ours
            raise RunStopped(128 + signum)

    def _submit_dryrun(self, app: AppDef, cfg: Opts) -> AppDryRunInfo[PopenRequest, Opts]:
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
        cfg = dataclasses.replace(cfg, log_dir=os.path.abspath(cfg.log_dir or DEFAULT_LOG_DIR))
        return super()._submit_dryrun(app, cfg)

    def schedule(self, dryrun_info: AppDryRunInfo[PopenRequest, Opts]) -> str:
        app_id = super().schedule(dryrun_info)
        self._requests[app_id] = dryrun_info.request
        return app_id

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        resp = super().describe(app_id)
        request = self._requests.get(app_id)  # gone after close(), when TorchX's log threads still ask
        if resp is not None and request is not None:
            self._states[app_id] = resp.state
            failure = first_failure(request) if resp.state == AppState.FAILED else None
            if failure is not None:
                resp.msg = f"{failure[0]}: {failure[1]}"
        return resp

    def log_iter(self, *args: Any, **kwargs: Any) -> Iterable[str]:
        """TorchX's log lines, none once the run is being stopped: what a stopping group prints is in its log."""
        return (line for line in super().log_iter(*args, **kwargs) if self._stopped_by is None)

    def close(self) -> None:
        """Stop what runs (TorchX's own clean-up), then say once per app how it ended, if not well."""
        if self._stopped_by is not None and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
                signal.signal(sig, signal.SIG_IGN)
        super().close()
        requests, self._requests = self._requests, {}
        for app_id, request in requests.items():
            state = self._states_at_stop.get(app_id) if self._stopped_by is not None else self._states.get(app_id)
            if self._stopped_by is not None and state not in (AppState.SUCCEEDED, AppState.FAILED):
                say(stopped_line(request, self._stopped_by))
            elif state == AppState.FAILED:
                for line in failure_lines(request):
                    say(line)


def say(line: str) -> None:
    print(f"{PREFIX}: {line}", file=sys.stderr, flush=True)


def first_failure(request: PopenRequest) -> Optional[Tuple[str, str]]:
    """(role, its one-line error) of the replica whose reply file was written first: the failure the others
    followed (TorchX reports the same one as ``structured_error_msg``)."""
    written: List[Tuple[float, str, str]] = []
    for role, replicas in request.role_params.items():
        for replica in replicas:
            path = replica.env.get(ERROR_FILE_ENV, "")
            try:
                written.append((os.path.getmtime(path), role, path))
            except OSError:
                continue
    for _, role, path in sorted(written):
        message = read_error_file(path)
        if message:
            return role, message
    return None


def failure_lines(request: PopenRequest) -> List[str]:
    """The log folder, then the error: the last line ``torchx run`` prints."""
    failure = first_failure(request)
    if failure is None:
        return [f"run {request.app_id} failed; its logs are in {request.log_dir}"]
    role, message = failure
    log = os.path.join(request.role_log_dirs[role][0], "stderr.log")
    return [f"{role}'s log: {log}", f"error: {role}: {message}"]


def stopped_line(request: PopenRequest, signum: int) -> str:
    how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    folder = checkpoint_dir(request)
    where = f" from its checkpoints in {folder}" if folder else " from its newest checkpoint"
    return f"run {request.app_id} stopped ({how}); run the same command again to resume it{where}"


def checkpoint_dir(request: PopenRequest) -> Optional[str]:
    """Where the groups of a trainer run checkpoint (``--checkpoint-dir`` or the trainer's default), read from
    the command the component gave torchrun; None for the run of your own script."""
    for replicas in request.role_params.values():
        for replica in replicas:
            try:
                words = [w for arg in replica.args for w in shlex.split(arg)]
            except ValueError:
                continue
            for i in range(len(words) - 1):
                if words[i] == "-m" and words[i + 1] == TRAIN_MODULE:
                    return _trainer_flag(words[i + 2 :], "checkpoint_dir")
    return None


def _trainer_flag(argv: List[str], name: str) -> Optional[str]:
    from torchx_diloco.config import build_parser

    try:
        known, _ = build_parser().parse_known_args(argv)
    except (UserError, SystemExit):
        return None
    value = getattr(known, name, None)
    return str(value) if value is not None else None


def create_scheduler(session_name: str, cache_size: int = 100, **kwargs: Any) -> LocalCwdScheduler:
    """The entry point TorchX calls for ``-s local_cwd``: TorchX's own, with the checks, the logs kept, and the
    one-line endings."""
    return LocalCwdScheduler(
        session_name=session_name,
        image_provider_class=CWDImageProvider,
        cache_size=cache_size,
        extra_paths=kwargs.get("extra_paths"),
    )
