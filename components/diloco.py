"""TorchX components that launch DiLoCo: a torchft lighthouse plus N replica groups.

``diloco`` is the whole run as one app (one machine with ``local_cwd``, or one heterogeneous job on Slurm).
``lighthouse`` and ``replica_group`` are its two halves, for submitting the groups as separate jobs
against one long-lived lighthouse. All three build their roles with the helpers below, so they stay alike.

The lighthouse is the first role: the groups find it through TorchX's ``rank0_env`` macro, which names
the variable holding the first role's host (``TORCHX_RANK0_HOST=localhost`` on ``local_cwd``,
``SLURM_JOB_NODELIST_HET_GROUP_0`` on Slurm), so one AppDef runs unchanged on both. Each run gets its own
lighthouse port and run id (TorchX's ``app_id``): two runs on one machine never share a quorum.

Every training flag, the ones after ``--`` included, is checked with the training module's own parser
(``torchx_diloco.config``, torch-free) before anything starts. The trainer's parameters (``outer_steps``,
``sync_every``, ``model``, ``checkpoint_dir``) take their defaults from its ``TrainConfig`` (``FLAG_DEFAULTS``),
so ``--help`` shows real numbers; only the ones that differ reach the trainer's command line. ``--script``/``--m``
run a user's own loop in the groups instead (same torchrun, same environment); its arguments are its own. Imports
only torchx, the standard library and torch-free parts of torchx_diloco (TorchX imports this file to list and lint
components).
"""

import argparse
import difflib
import functools
import inspect
import os
import re
import shlex
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

import torchx.specs as specs
from torchx.specs import builders, file_linter, macros
from torchx.specs.finder import ComponentValidationException

from torchx_diloco.config import (
    FLAG_DEFAULTS,
    LIGHTHOUSE_IDLE_EXIT_S,
    LIGHTHOUSE_PORT,
    RUN_ID_ENV,
    STRAGGLER_GRACE_S,
    CheckpointConfig,
    parse_flags,
)
from torchx_diloco.errors import UserError
from torchx_diloco.gpus import GPUS_ENV, check_devices_exist
from torchx_diloco.lease import Lease, run_identity
from torchx_diloco.local import NODES_METADATA  # the local_cwd scheduler refuses groups of several nodes

__all__ = ["diloco", "lighthouse", "replica_group", "GPUS_ENV"]

LIGHTHOUSE_ROLE = "lighthouse"
TRAIN_MODULE = "torchx_diloco.train"
LIGHTHOUSE_MODULE = "torchx_diloco.lighthouse"
MIN_REPLICAS = FLAG_DEFAULTS["min_replicas"]  # the trainer's default, also the lighthouse's
MIN_REPLICAS_ENV = "TORCHX_DILOCO_MIN_REPLICAS"  # torchx_diloco.cluster.MIN_REPLICAS_ENV (that module needs torch)


class ComponentError(ValueError, ComponentValidationException):
    """Bad input to a component: ``torchx run`` prints the message (no traceback) and exits 1."""


def _optional_script_args(help_string: "type[file_linter.TorchXArgumentHelpFormatter]") -> None:
    """TorchX's help formatter marks ``*script_args`` "(required)"; it is not (argparse.REMAINDER, may be empty).
    Registered in ``torchx_diloco.upstream``: a TorchX upgrade that drops the formatter fails a test there."""
    original = help_string._get_help_string

    def get_help(self: argparse.HelpFormatter, action: argparse.Action) -> str:
        if action.nargs == argparse.REMAINDER:
            return action.help or ""
        return original(self, action)

    help_string._get_help_string = get_help


_optional_script_args(file_linter.TorchXArgumentHelpFormatter)

STRICT_ARGS = "_torchx_diloco_strict_args"  # marks a component whose flags TorchX must parse strictly


def _strict_args(component: Callable[..., specs.AppDef]) -> Callable[..., specs.AppDef]:
    """Marks a component of this file for :func:`_strict_component_parsers`."""
    setattr(component, STRICT_ARGS, True)  # noqa: B010 - a function attribute the patched parser reads
    return component


def _strict_component_parsers(builders: Any) -> None:
    """TorchX's parser of a component's flags takes any unambiguous prefix (``--outer_step 3`` ran as
    ``--outer_steps 3``) and answers a bad flag or value with its whole usage. For our components: no
    prefixes (``allow_abbrev=False``), and an error is one line naming the fix (a ComponentError: ``torchx run``
    prints it and exits 1). Wraps ``builders._create_args_parser``, registered in ``torchx_diloco.upstream``:
    a TorchX upgrade that renames it fails a test there."""
    original = builders._create_args_parser
    if getattr(original, STRICT_ARGS, False):
        return  # this file imported a second time (by path: `torchx run components/diloco.py:diloco`)

    def create(cmpnt_fn: Callable[..., specs.AppDef], *args: Any, **kwargs: Any) -> argparse.ArgumentParser:
        parser = original(cmpnt_fn, *args, **kwargs)
        if getattr(cmpnt_fn, STRICT_ARGS, False):
            parser.allow_abbrev = False
            parser.error = functools.partial(_one_line_error, cmpnt_fn)
        return parser

    setattr(create, STRICT_ARGS, True)  # noqa: B010
    builders._create_args_parser = create


def _one_line_error(component: Callable[..., specs.AppDef], message: str) -> NoReturn:
    """argparse's error, as one line; an unknown flag close to one of ours names it (a prefix is never taken)."""
    flags = [f"--{p.name}" for p in inspect.signature(component).parameters.values() if p.kind != p.VAR_POSITIONAL]
    if message.startswith("unrecognized arguments: "):
        unknown = [a.split("=", 1)[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")]
        close = [
            m
            for a in unknown
            for m in ([f for f in flags if f.startswith(a)] or difflib.get_close_matches(a, flags, 1))
        ]
        if close:
            message += f": did you mean {', '.join(close)}? Flags are never abbreviated"
    raise ComponentError(f"{message} (see torchx run diloco.{component.__name__} --help)")


_strict_component_parsers(builders)


@_strict_args
def diloco(
    *script_args: str,
    replica_groups: int = 2,
    gpus_per_group: str = "0",
    gpu_assignment: Optional[str] = None,
    cpu: str = "1",
    memMB: str = "4096",
    h: Optional[str] = None,
    max_restarts: int = 3,
    nodes_per_group: str = "1",
    lighthouse_port: int = 0,
    min_replicas: int = MIN_REPLICAS,
    checkpoint_dir: str = FLAG_DEFAULTS["checkpoint_dir"],
    outer_steps: int = FLAG_DEFAULTS["outer_steps"],
    sync_every: int = FLAG_DEFAULTS["sync_every"],
    model: str = FLAG_DEFAULTS["model"],
    env: Optional[Dict[str, str]] = None,
    lighthouse_idle_exit: float = LIGHTHOUSE_IDLE_EXIT_S,
    straggler_grace_s: float = STRAGGLER_GRACE_S,
    script: Optional[str] = None,
    m: Optional[str] = None,
    name: str = "diloco",
) -> specs.AppDef:
    """DiLoCo training: a torchft lighthouse plus ``replica_groups`` groups, each under ``torchrun``.

    Usage: ``torchx run -s local_cwd diloco.diloco --replica_groups 2 -- --batch-size 8``
    (arguments after ``--`` go to ``python -m torchx_diloco.train``; see its ``--help``), or your own loop:
    ``torchx run diloco.diloco --script my_train.py -- --my-flag 1`` (``--m my_pkg.train`` for a module).
    Fewer bytes on a slow link: ``-- --fragments 4 --overlap-steps 1 --codec int8`` (Streaming DiLoCo: the
    model syncs a quarter at a time, each sync overlapped with an inner step, pseudo-gradients sent as int8;
    ``--codec int4`` halves that again, ``--mix-alpha`` keeps part of the local weights after a sync).
    Groups that differ: each resource takes one value for all groups or one per group (``--cpu 64,64,32``),
    and so do the trainer flags groups may differ in (``-- --batch-size 16,16,8 --sync-every 50,50,25``); the
    average weighs each group by the tokens it trained on (docs/unlike-groups.md).

    Args:
        script_args: optional flags for ``python -m torchx_diloco.train`` (after ``--``); they win over the ones
            this component sets. With ``--script``/``--m``: your program's arguments, passed as they are
        replica_groups: number of replica groups (DiLoCo workers) that average pseudo-gradients every H steps
        gpus_per_group: GPUs (= torchrun processes) per node of a group, one for all or one per group (4,8 with
            nodes_per_group 2,1: every group must run as many ranks); 0 trains on CPU with one process per node
        gpu_assignment: local_cwd only: explicit CUDA devices per group, groups separated by ';' (e.g. "0,1;2,3"),
            each list as long as the group's gpus_per_group (which defaults to the lists' lengths);
            leave the scheduler option auto_set_cuda_visible_devices off when you use it (it would overwrite
            these). Without it, turn auto_set_cuda_visible_devices on to give groups distinct GPUs
        cpu: CPU cores per group (one for all or one per group); on CPU also the group's OMP_NUM_THREADS, so
            groups do not fight over cores
        memMB: memory per group in MB (Slurm --mem), one for all or one per group
        h: a registered TorchX named resource for each group, or one per group (wins over cpu, gpus_per_group and
            memMB)
        max_restarts: times torchrun restarts a group's crashed workers; a restarted group heals from a peer
        nodes_per_group: nodes per group, one for all or one per group (Slurm only): each group runs ``torchrun
            --nnodes N`` as N replicas of its role, with a c10d rendezvous on the group's first node
        lighthouse_port: port of the torchft lighthouse on the first role's host; 0 picks one free when the app
            is built, so runs on one machine never share a lighthouse
        min_replicas: groups needed to commit an outer step (the others may be down or restarting)
        checkpoint_dir: fsspec URL of the durable checkpoints (relative paths are under the job's working
            directory); a re-run with the same directory resumes from its newest complete checkpoint (use e.g.
            checkpoints/${app_id} for a fresh start)
        outer_steps: outer steps (syncs) to train for
        sync_every: H, inner steps between syncs
        model: GPT preset nano, tiny, small or medium, or package.module:factory returning an nn.Module
            (its keyword arguments: --model-args JSON after `--`)
        env: environment variables for every role (e.g. LOGLEVEL=INFO,TORCHX_DILOCO_LOGLEVEL=DEBUG)
        lighthouse_idle_exit: seconds every group must stay silent before the lighthouse exits 0 and the app
            ends; keep it above a group's restart time
        straggler_grace_s: how long a sync waits for a group that was in the last one (the lighthouse's join
            timeout); then the others commit without it and it heals at the next sync. Needs 3 or more groups:
            torchft never forms a quorum of half of the live groups or fewer, so two groups wait for each other.
            Below the trainer's --quorum-timeout
        script: your training script (a path relative to the working directory) to run in each group instead
            of the trainer, under torchrun with the same environment; build its Manager with
            ``torchx_diloco.group_manager``. The trainer's parameters (outer_steps, sync_every, model,
            checkpoint_dir) are refused with it unless left at their defaults; min_replicas reaches it as
            TORCHX_DILOCO_MIN_REPLICAS
        m: like ``--script``, a Python module to run instead (``python -m``)
        name: the app's name
    """
    _check_common(replica_groups, min_replicas, max_restarts)
    nodes = _per_group("nodes_per_group", nodes_per_group, replica_groups, 1, "nodes per group")
    port = _pick_port() if lighthouse_port == 0 else _check_port(lighthouse_port)
    resources, devices = _group_resources(replica_groups, cpu, gpus_per_group, memMB, h, gpu_assignment)
    _check_equal_ranks([n * max(1, r.gpu) for n, r in zip(nodes, resources, strict=True)])
    trainer = _trainer_params(checkpoint_dir, outer_steps, sync_every, model)
    train_args = _program(script, m, replica_groups, min_replicas, trainer, list(script_args))
    _check_grace(straggler_grace_s, train_args[2:] if script is None and m is None else None, replica_groups)
    # $$ escapes the macro's `$`: the replica's bash expands ${<rank0 host variable>:-localhost}
    url = f"http://$${{{macros.rank0_env}:-localhost}}:{port}"
    roles = [_lighthouse_role(port, min_replicas, lighthouse_idle_exit, env, macros.app_id, straggler_grace_s)]
    spec = _Groups(replica_groups, url, max_restarts, env, train_args, run_id=macros.app_id, min_replicas=min_replicas)
    # het group 0 is the lighthouse; each group's nodes follow, in group order
    roles += [
        _group_role(g, spec, resources[g], nodes[g], devices[g] if devices else None, 1 + sum(nodes[:g]))
        for g in range(replica_groups)
    ]
    return specs.AppDef(name=name, roles=roles)


@_strict_args
def lighthouse(
    port: int = LIGHTHOUSE_PORT,
    min_replicas: int = MIN_REPLICAS,
    idle_exit: float = LIGHTHOUSE_IDLE_EXIT_S,
    run_id: Optional[str] = None,
    straggler_grace_s: float = STRAGGLER_GRACE_S,
    env: Optional[Dict[str, str]] = None,
    name: str = "diloco-lighthouse",
) -> specs.AppDef:
    """The torchft lighthouse alone, for replica groups submitted as separate jobs (``diloco.replica_group``).

    Under Slurm it listens on the address other nodes reach it by; on a laptop on 127.0.0.1. It exits 0 once
    every group that joined has been silent for ``idle_exit`` seconds, 1 if none joined within 10 minutes or
    a group reported an error no restart can fix.

    Args:
        port: port to listen on; give the groups --lighthouse_url http://THIS_HOST:PORT
        min_replicas: groups needed to commit an outer step
        idle_exit: seconds every group must stay silent before the lighthouse exits (0 = serve forever)
        run_id: a name for the run; groups given the same --run_id refuse any other lighthouse, and this one
            refuses groups of other runs (None: no check)
        straggler_grace_s: how long a sync waits for a group that was in the last one, as in ``diloco.diloco``
            (keep it below the groups' --quorum-timeout)
        env: environment variables for the lighthouse
        name: the app's name
    """
    _check_grace(straggler_grace_s, None, 1)
    if min_replicas < 1:
        raise ComponentError(f"--min_replicas {min_replicas} must be >= 1")
    _check_port(port)
    role = _lighthouse_role(port, min_replicas, idle_exit, env, run_id, straggler_grace_s)
    return specs.AppDef(name=name, roles=[role])


@_strict_args
def replica_group(
    *script_args: str,
    lighthouse_url: str,
    group: int = 0,
    replica_groups: int = 2,
    gpus: int = 0,
    cuda_visible_devices: Optional[str] = None,
    cpu: int = 1,
    memMB: int = 4096,
    h: Optional[str] = None,
    max_restarts: int = 3,
    nodes_per_group: int = 1,
    min_replicas: int = MIN_REPLICAS,
    checkpoint_dir: str = FLAG_DEFAULTS["checkpoint_dir"],
    outer_steps: int = FLAG_DEFAULTS["outer_steps"],
    sync_every: int = FLAG_DEFAULTS["sync_every"],
    model: str = FLAG_DEFAULTS["model"],
    run_id: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    script: Optional[str] = None,
    m: Optional[str] = None,
    name: str = "diloco-group",
) -> specs.AppDef:
    """One DiLoCo replica group under ``torchrun``, joining a lighthouse that runs elsewhere.

    Usage: ``torchx run diloco.replica_group --lighthouse_url http://HOST:29510 --group 1 --replica_groups 2``

    Args:
        script_args: optional flags for ``python -m torchx_diloco.train`` (after ``--``); with
            ``--script``/``--m``: your program's arguments, passed as they are
        lighthouse_url: the lighthouse, http://HOST:PORT (from ``diloco.lighthouse``)
        group: this group's id, 0 .. replica_groups-1 (REPLICA_GROUP_ID)
        replica_groups: how many groups the run has in all (NUM_REPLICA_GROUPS)
        gpus: GPUs (= torchrun processes) for this group; 0 trains on CPU
        cuda_visible_devices: local_cwd only: the CUDA devices to use, e.g. "2,3" (None: the scheduler's)
        cpu: CPU cores for this group; on CPU also its OMP_NUM_THREADS
        memMB: memory in MB (Slurm --mem)
        h: a registered TorchX named resource (wins over cpu, gpus and memMB)
        max_restarts: times torchrun restarts the group's crashed workers
        nodes_per_group: nodes for this group (Slurm only), as in ``diloco.diloco``
        min_replicas: groups needed to commit an outer step
        checkpoint_dir: fsspec URL of the durable checkpoints; every group of a run must use the same one
        outer_steps: outer steps (syncs) to train for
        sync_every: H, inner steps between syncs
        model: GPT preset nano, tiny, small or medium, or package.module:factory returning an nn.Module
            (its keyword arguments: --model-args JSON after `--`)
        run_id: the lighthouse's --run_id: the group refuses a lighthouse that serves another run (None: no
            check)
        env: environment variables for the group
        script: your training script (relative to the working directory) to run instead of the trainer, as in
            ``diloco.diloco``; the trainer's parameters are refused with it unless left at their defaults
        m: like ``--script``, a Python module to run instead (``python -m``)
        name: the app's name
    """
    _check_common(replica_groups, min_replicas, max_restarts)
    if not 0 <= group < replica_groups:
        raise ComponentError(f"--group {group} is outside 0..{replica_groups - 1}: pick a group below --replica_groups")
    if not re.fullmatch(r"https?://[^\s/:]+(:\d+)", lighthouse_url.rstrip("/")):
        raise ComponentError(f"--lighthouse_url {lighthouse_url!r} is not http://HOST:PORT: pass the lighthouse's URL")
    (nodes,) = _per_group("nodes_per_group", str(nodes_per_group), 1, 1, "nodes per group")
    resources, devices = _group_resources(1, str(cpu), str(gpus), str(memMB), h, cuda_visible_devices, "gpus")
    trainer = _trainer_params(checkpoint_dir, outer_steps, sync_every, model)
    run = run_identity(run_id, lighthouse_url.rstrip("/"))  # as the trainer names its run
    train_args = _program(script, m, replica_groups, min_replicas, trainer, list(script_args), run)
    url = shlex.quote(lighthouse_url.rstrip("/"))
    spec = _Groups(replica_groups, url, max_restarts, env, train_args, run_id, min_replicas)
    role = _group_role(group, spec, resources[0], nodes, devices[0] if devices else None)
    return specs.AppDef(name=name, roles=[role])


# ---------------------------------------------------------------------------------------------------------
# helpers shared by the three components (private: TorchX lists only valid components)


def _check_common(replica_groups: int, min_replicas: int, max_restarts: int) -> None:
    """Bad numbers fail here, before anything starts, with the fix in the message."""
    if replica_groups < 1:
        raise ComponentError(f"--replica_groups {replica_groups}: DiLoCo needs at least 1 group; pass 1 or more")
    if not 1 <= min_replicas <= replica_groups:
        raise ComponentError(f"--min_replicas {min_replicas} must be within 1..{replica_groups} (the number of groups)")
    if max_restarts < 0:
        raise ComponentError(f"--max_restarts {max_restarts} must be >= 0")


def _per_group(name: str, text: Any, groups: int, minimum: int, what: str) -> List[int]:
    """``8`` -> that value for every group; ``8,8,4`` -> one per group (as many as there are groups)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, groups):
        raise ComponentError(
            f"--{name} {text} gives {len(parts)} values for {groups} groups: give one for all or one per group"
        )
    values = []
    for part in parts:
        if not re.fullmatch(r"-?\d+", part):
            raise ComponentError(f"--{name} {text}: {part!r} is not a whole number ({what})")
        if int(part) < minimum:
            raise ComponentError(f"--{name} {text}: {part} must be >= {minimum} ({what})")
        values.append(int(part))
    return values * groups if len(values) == 1 else values


# A multi-node group's c10d rendezvous port: RDZV_PORT + (the job id of the group's first het component) modulo
# RDZV_PORTS, worked out by the group's shell at run time. Slurm gives every het component a job id of its own, so
# two groups, of one job or of two, get different ports unless their ids are RDZV_PORTS apart; the range stays
# below Linux's ephemeral ports (32768 and up), which the OS hands out for bind(0) and outgoing connections.
RDZV_PORT = 20000
RDZV_PORTS = 12000


def _check_port(port: int) -> int:
    if not 0 < port < 65536:
        raise ComponentError(f"lighthouse port {port} must be within 1..65535")
    return port


def _pick_port() -> int:
    """A port free on this machine now: each run its own (on Slurm, the run id still guards against a clash)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _group_resources(
    groups: int,
    cpu: str,
    gpus: str,
    memMB: str,
    h: Optional[str],
    assignment: Optional[str],
    gpu_flag: str = "gpus_per_group",
) -> Tuple[List[specs.Resource], Optional[List[List[int]]]]:
    """Each group's resource (each setting one for all or one per group) and, if assigned, its devices (which must
    exist on this machine). How many GPUs fit is the scheduler's to check: all groups on this machine (local_cwd),
    one group per node (Slurm)."""
    cpus = _per_group("cpu", cpu, groups, 1, "cores per group")
    mems = _per_group("memMB", memMB, groups, 1, "MB per group")
    counts = _per_group(gpu_flag, gpus, groups, 0, "GPUs per group, 0 = CPU")
    names = [n.strip() for n in h.split(",")] if h else [""]
    if len(names) not in (1, groups):
        raise ComponentError(
            f"-h {h} gives {len(names)} named resources for {groups} groups: one for all or one per group"
        )
    names = names * groups if len(names) == 1 else names
    devices = _parse_gpu_assignment(assignment, groups, counts)
    if devices is not None:
        counts = [len(d) for d in devices]
    resources = [_group_resource(cpus[g], counts[g], mems[g], names[g]) for g in range(groups)]
    if devices is not None:
        try:
            check_devices_exist(devices)
        except ValueError as e:
            raise ComponentError(str(e)) from None
    return resources, devices


def _group_resource(cpu: int, gpus: int, memMB: int, h: Optional[str]) -> specs.Resource:
    if not h:
        return specs.Resource(cpu=cpu, gpu=gpus, memMB=memMB)
    try:
        named = specs.resource(h=h)
    except (KeyError, ValueError):
        raise ComponentError(
            f"-h {h!r} is not a registered named resource: pick one TorchX knows, or pass "
            "--cpu/--memMB and the GPU count instead"
        ) from None
    if gpus and gpus != named.gpu:
        raise ComponentError(
            f"-h {h} has {named.gpu} GPUs but {gpus} GPUs per group were asked for: drop one of the two"
        )
    return named


def _parse_gpu_assignment(spec: Optional[str], groups: int, gpus: List[int]) -> Optional[List[List[int]]]:
    """'0,1;2,3' -> [[0, 1], [2, 3]]: one entry per group, each as long as the group's GPU count (any length where
    no count was given), no device twice."""
    if spec is None or not spec.strip():
        return None
    entries = [e.strip() for e in spec.split(";")]
    if len(entries) != groups:
        raise ComponentError(
            f"gpu_assignment {spec!r} has {len(entries)} entries for {groups} groups: "
            "give one comma-separated device list per group, groups separated by ';'"
        )
    devices: List[List[int]] = []
    for entry in entries:
        if not re.fullmatch(r"\d+(\s*,\s*\d+)*", entry):
            raise ComponentError(f"gpu_assignment entry {entry!r} is not a list of device numbers like '0,1'")
        devices.append([int(d) for d in entry.split(",")])
    for g, (group_devices, want) in enumerate(zip(devices, gpus, strict=True)):
        if any(gpus) and len(group_devices) != want:
            raise ComponentError(
                f"gpu_assignment {spec!r} gives group {g} {len(group_devices)} GPUs but it has exactly {want} GPUs "
                "(its gpus_per_group): fix the lists or the GPU count"
            )
    flat = [d for group in devices for d in group]
    if len(set(flat)) != len(flat):
        raise ComponentError(f"gpu_assignment {spec!r} names a device twice: give each group its own GPUs")
    return devices


def _trainer_params(checkpoint_dir: str, outer_steps: int, sync_every: int, model: str) -> Dict[str, str]:
    """The component's trainer parameters whose value differs from the trainer's own default (``FLAG_DEFAULTS``,
    whence the components' defaults): one equal to its default is the same as unset."""
    given = {"checkpoint_dir": checkpoint_dir, "outer_steps": outer_steps, "sync_every": sync_every, "model": model}
    return {name: str(value) for name, value in given.items() if value != FLAG_DEFAULTS[name]}


def _program(
    script: Optional[str],
    module: Optional[str],
    groups: int,
    min_replicas: int,
    trainer: Dict[str, str],
    script_args: List[str],
    run: Optional[str] = None,
) -> List[str]:
    """What torchrun runs in each group: ``-m torchx_diloco.train <checked flags>``, or the user's script or
    module with the user's arguments (not ours to check)."""
    if script is None and module is None:
        return ["-m", TRAIN_MODULE, *_train_args(groups, min_replicas, trainer, script_args, run)]
    if script is not None and module is not None:
        raise ComponentError("--script and --m both given: pass one of them (a script path or a module name)")
    if trainer:
        ours = ", ".join(f"--{name}" for name in trainer)
        raise ComponentError(f"{ours} configure our trainer, not your --script/--m: pass your own flags after `--`")
    if module is not None:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module):
            raise ComponentError(f"--m {module!r} is not a Python module name like my_pkg.train")
        return ["-m", module, *script_args]
    assert script is not None
    if not os.path.isfile(script):
        raise ComponentError(
            f"--script {script!r} does not exist in {os.getcwd()}: pass a path relative to this directory"
        )
    return [script, *script_args]


def _train_args(
    groups: int, min_replicas: int, trainer: Dict[str, str], script_args: List[str], run: Optional[str]
) -> List[str]:
    """The training module's flags, checked now with its own parser (a typo fails before anything starts), and
    the checkpoint folder they name, which another live run may hold (``run``: this app's run, where known)."""
    args = ["--min-replicas", str(min_replicas)]
    for name, value in trainer.items():
        args += [f"--{name.replace('_', '-')}", value]
    args += script_args  # argparse: the last occurrence wins, so the user's flags override ours
    try:
        cfg = parse_flags(args, num_replica_groups=groups)
    except UserError as e:
        raise ComponentError(str(e)) from None
    _check_folder_free(cfg.checkpoint, run)
    return args


def _check_folder_free(cfg: CheckpointConfig, run: Optional[str]) -> None:
    """Refuse, before launch, a checkpoint folder that another live run holds (what the trainer would refuse at
    start, seconds later). ``run`` None (a new app: TorchX names it later): any live holder is another run. A
    folder this machine cannot read (a bucket without credentials here) is left to the trainer to check."""
    if cfg.take_over:
        return
    try:
        lease = Lease(cfg.dir, run or "", cfg.lease_s)
        holder = lease.holder()
    except Exception:  # noqa: BLE001 - not readable from here: the trainer checks it where it runs
        return
    if holder is not None and holder.run != run and holder.fresh():
        raise ComponentError(lease.refusal(holder))


def _check_equal_ranks(ranks: List[int]) -> None:
    """Every group must run as many ranks: rank r of a group exchanges pseudo-gradients with rank r of the others
    only (torchft: one Manager per rank, one process group per rank index), so a rank without peers would hang."""
    if len(set(ranks)) > 1:
        raise ComponentError(
            f"the groups would run {','.join(map(str, ranks))} ranks (nodes x GPUs per node): rank r of a group syncs "
            "with rank r of the others, so every group needs as many ranks; make nodes_per_group x gpus_per_group "
            "equal (e.g. --nodes_per_group 2,1 --gpus_per_group 4,8)"
        )


def _check_grace(grace_s: float, train_args: Optional[List[str]], groups: int) -> None:
    """The straggler grace must be positive and, where the trainer's flags are known here, below its quorum
    timeout (a quorum that waits longer than the groups do fails them instead of leaving a straggler out)."""
    if not grace_s > 0:
        raise ComponentError(f"--straggler_grace_s {grace_s:g} must be > 0 seconds")
    if train_args is not None:
        quorum_timeout = parse_flags(train_args, num_replica_groups=groups).cluster.quorum_timeout
        if grace_s >= quorum_timeout:
            raise ComponentError(
                f"--straggler_grace_s {grace_s:g} must be below the trainer's --quorum-timeout {quorum_timeout:g}: "
                "lower the grace or raise --quorum-timeout after --"
            )


def _lighthouse_role(
    port: int,
    min_replicas: int,
    idle_exit: float,
    env: Optional[Dict[str, str]],
    run_id: Optional[str] = None,
    grace_s: float = STRAGGLER_GRACE_S,
) -> specs.Role:
    if idle_exit < 0:
        raise ComponentError(f"lighthouse idle exit {idle_exit} must be >= 0 seconds (0 = never)")
    role_env = dict(env or {})
    role_env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")  # the lighthouse never takes a GPU
    return specs.Role(
        name=LIGHTHOUSE_ROLE,
        image=os.getcwd(),
        entrypoint="python",
        args=[
            "-m",
            LIGHTHOUSE_MODULE,
            "--port",
            str(port),
            "--min-replicas",
            str(min_replicas),
            "--idle-exit",
            f"{idle_exit:g}",
            "--join-timeout-ms",
            str(round(grace_s * 1000)),
            *(["--run-id", run_id] if run_id else []),
        ],
        env=role_env,
        resource=specs.Resource(cpu=1, gpu=0, memMB=1024),
        port_map={"lighthouse": port},
    )


@dataclass(frozen=True)
class _Groups:
    """What every group role of an app shares."""

    groups: int  # NUM_REPLICA_GROUPS
    lighthouse_url: str  # shell text: bash expands the rank0 host variable in it
    max_restarts: int
    env: Optional[Dict[str, str]]
    program: List[str]  # what follows torchrun's own flags (see _program)
    run_id: Optional[str] = None
    min_replicas: int = MIN_REPLICAS


def _group_role(
    group: int,
    spec: _Groups,
    resource: specs.Resource,
    nodes: int,
    devices: Optional[List[int]],
    first_het_group: int = 0,
) -> specs.Role:
    """``bash -c 'export TORCHFT_LIGHTHOUSE=<url>; exec torchrun ... -m torchx_diloco.train ...'``: group ``group``
    on ``nodes`` nodes of ``resource``.

    torchrun's standalone rendezvous picks a free port per group, so groups on one machine never share a master
    port; a group of several nodes meets on its first het component (``first_het_group``, Slurm).
    """
    program, run_id = spec.program, spec.run_id
    nproc = max(1, resource.gpu)
    role_env = dict(spec.env or {})
    role_env.update(REPLICA_GROUP_ID=str(group), NUM_REPLICA_GROUPS=str(spec.groups), PYTHONUNBUFFERED="1")
    if program[:2] != ["-m", TRAIN_MODULE]:  # the trainer has its flag; torchx_diloco.group_manager reads this
        role_env[MIN_REPLICAS_ENV] = str(spec.min_replicas)
    role_env.setdefault("OMP_NUM_THREADS", str(max(1, resource.cpu // nproc)))
    if devices is not None:
        role_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    elif resource.gpu == 0:
        role_env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU group stays on CPU even on a GPU machine
    if nodes > 1:  # the group's own first het component hosts the rendezvous (rank0_env names the lighthouse's)
        var = f"SLURM_JOB_NODELIST_HET_GROUP_{first_het_group}"
        need = f"--nodes_per_group {nodes} needs Slurm (one het component per node; {var} is unset): use -s slurm"
        rdzv_host = f'[ -n "$${{{var}:-}}" ] || {{ echo {shlex.quote(need)} >&2; exit 2; }}; '
        rdzv_host += f'host=$$(scontrol show hostnames "$${var}" | head -n1); '
        rdzv_host += f"port={_rdzv_port_shell(first_het_group)}; "
        endpoint = "$$host:$$port"
        # torchrun's agents share one store across restarts, and a restart bumps TORCHELASTIC_RESTART_COUNT only on
        # the node whose worker failed, so the trainer's per-life keys (cluster.torchrun_store) would differ between
        # the group's nodes and a restarted group hang or fail to connect (seen on the test Slurm). Without the
        # shared store each rendezvous round gets a fresh MASTER_PORT that the group's rank 0 hosts.
        role_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", f"diloco-group-{group}"]
    else:
        rdzv_host, rendezvous = "", ["--standalone"]
    torchrun = [
        "torchrun",
        *rendezvous,
        "--nnodes",
        str(nodes),
        "--nproc_per_node",
        str(nproc),
        "--max_restarts",
        str(spec.max_restarts),
        *program,
    ]
    # a TORCHFT_MANAGER_PORT inherited from the shell would make groups on one machine collide
    unset = "" if "TORCHFT_MANAGER_PORT" in role_env else "unset TORCHFT_MANAGER_PORT; "
    # the run id is a macro TorchX expands in args (on Slurm into "$SLURM_JOB_ID"), so it is set in the command
    run = f"export {RUN_ID_ENV}={run_id if run_id == macros.app_id else shlex.quote(run_id)}; " if run_id else ""
    line = " ".join(a if a.startswith("$$host") else shlex.quote(a) for a in torchrun)  # bash expands $host:$port
    cmd = f"{unset}{run}export TORCHFT_LIGHTHOUSE={spec.lighthouse_url}; {rdzv_host}exec {line}"
    return specs.Role(
        name=f"replica_group_{group}",
        image=os.getcwd(),
        entrypoint="bash",
        args=["-c", cmd],
        env=role_env,
        resource=resource,
        num_replicas=nodes,
        metadata={NODES_METADATA: nodes},
    )


def _rdzv_port_shell(first_het_group: int) -> str:
    """Bash arithmetic (TorchX-escaped ``$$``) for the rendezvous port of the group whose first het component is
    ``first_het_group``: from that component's own Slurm job id (see RDZV_PORT)."""
    return f"$$(( {RDZV_PORT} + $${{SLURM_JOB_ID_HET_GROUP_{first_het_group}:?}} % {RDZV_PORTS} ))"
