"""The roles and checks behind the three components of :mod:`torchx_diloco_components.diloco`: the lighthouse's
and a group's ``specs.Role``, the per-group resources, the trainer's command line (its flags checked with the
trainer's own parser), and TorchX's flag parser made strict for our components.

Apart from the components' file because TorchX lints every function it finds in a component module on each
``torchx run`` (~25 ms each, the file parsed anew every time): here they cost nothing. Imports only torchx, the
standard library and torch-free parts of torchx_diloco, as the components do.
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

from torchx_diloco.config import FLAG_DEFAULTS, RUN_ID_ENV, STRAGGLER_GRACE_S, CheckpointConfig, parse_flags
from torchx_diloco.errors import UserError
from torchx_diloco.gpus import check_devices_exist
from torchx_diloco.lease import Lease
from torchx_diloco.local import NODES_METADATA  # the local_cwd scheduler refuses groups of several nodes

LIGHTHOUSE_ROLE = "lighthouse"
TRAIN_MODULE = "torchx_diloco.train"
LIGHTHOUSE_MODULE = "torchx_diloco.lighthouse"
MIN_REPLICAS = FLAG_DEFAULTS["min_replicas"]  # the trainer's default, also the lighthouse's
MIN_REPLICAS_ENV = "TORCHX_DILOCO_MIN_REPLICAS"  # torchx_diloco.cluster.MIN_REPLICAS_ENV (that module needs torch)


class ComponentError(ValueError, ComponentValidationException):
    """Bad input to a component: ``torchx run`` prints the message (no traceback) and exits 1."""


def optional_script_args(help_string: "type[file_linter.TorchXArgumentHelpFormatter]") -> None:
    """TorchX's help formatter marks ``*script_args`` "(required)"; it is not (argparse.REMAINDER, may be empty).
    Registered in ``torchx_diloco.upstream``: a TorchX upgrade that drops the formatter fails a test there."""
    original = help_string._get_help_string

    def get_help(self: argparse.HelpFormatter, action: argparse.Action) -> str:
        if action.nargs == argparse.REMAINDER:
            return action.help or ""
        return original(self, action)

    help_string._get_help_string = get_help


optional_script_args(file_linter.TorchXArgumentHelpFormatter)

STRICT_ARGS = "_torchx_diloco_strict_args"  # marks a component whose flags TorchX must parse strictly


def strict_args(component: Callable[..., specs.AppDef]) -> Callable[..., specs.AppDef]:
    """Marks a component of this file for :func:`strict_component_parsers`."""
    setattr(component, STRICT_ARGS, True)  # noqa: B010 - a function attribute the patched parser reads
    return component


def strict_component_parsers(builders: Any) -> None:
    """TorchX's parser of a component's flags takes any unambiguous prefix (``--outer_step 3`` ran as
    ``--outer_steps 3``) and answers a bad flag or value with its whole usage. For our components: no
    prefixes (``allow_abbrev=False``), and an error is one line naming the fix (a ComponentError: ``torchx run``
    prints it and exits 1). Wraps ``builders._create_args_parser``, registered in ``torchx_diloco.upstream``:
    a TorchX upgrade that renames it fails a test there."""
    original = builders._create_args_parser
    if getattr(original, STRICT_ARGS, False):
        return  # already wrapped (this module imported twice: once by path, once as a package module)

    def create(cmpnt_fn: Callable[..., specs.AppDef], *args: Any, **kwargs: Any) -> argparse.ArgumentParser:
        parser = original(cmpnt_fn, *args, **kwargs)
        if getattr(cmpnt_fn, STRICT_ARGS, False):
            parser.allow_abbrev = False
            parser.error = functools.partial(one_line_error, cmpnt_fn)
        return parser

    setattr(create, STRICT_ARGS, True)  # noqa: B010
    builders._create_args_parser = create


def one_line_error(component: Callable[..., specs.AppDef], message: str) -> NoReturn:
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


strict_component_parsers(builders)


def check_common(replica_groups: int, min_replicas: int, max_restarts: int) -> None:
    """Bad numbers fail here, before anything starts, with the fix in the message."""
    if replica_groups < 1:
        raise ComponentError(f"--replica_groups {replica_groups}: DiLoCo needs at least 1 group; pass 1 or more")
    if not 1 <= min_replicas <= replica_groups:
        raise ComponentError(f"--min_replicas {min_replicas} must be within 1..{replica_groups} (the number of groups)")
    if max_restarts < 0:
        raise ComponentError(f"--max_restarts {max_restarts} must be >= 0")


def per_group(name: str, text: Any, groups: int, minimum: int, what: str) -> List[int]:
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


def check_port(port: int) -> int:
    if not 0 < port < 65536:
        raise ComponentError(f"lighthouse port {port} must be within 1..65535")
    return port


def pick_port() -> int:
    """A port free on this machine now: each run its own (on Slurm, the run id still guards against a clash)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def group_resources(
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
    cpus = per_group("cpu", cpu, groups, 1, "cores per group")
    mems = per_group("memMB", memMB, groups, 1, "MB per group")
    counts = per_group(gpu_flag, gpus, groups, 0, "GPUs per group, 0 = CPU")
    names = [n.strip() for n in h.split(",")] if h else [""]
    if len(names) not in (1, groups):
        raise ComponentError(
            f"-h {h} gives {len(names)} named resources for {groups} groups: one for all or one per group"
        )
    names = names * groups if len(names) == 1 else names
    devices = parse_gpu_assignment(assignment, groups, counts)
    if devices is not None:
        counts = [len(d) for d in devices]
    resources = [group_resource(cpus[g], counts[g], mems[g], names[g]) for g in range(groups)]
    if devices is not None:
        try:
            check_devices_exist(devices)
        except ValueError as e:
            raise ComponentError(str(e)) from None
    return resources, devices


def group_resource(cpu: int, gpus: int, memMB: int, h: Optional[str]) -> specs.Resource:
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


def parse_gpu_assignment(spec: Optional[str], groups: int, gpus: List[int]) -> Optional[List[List[int]]]:
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


def trainer_params(checkpoint_dir: str, outer_steps: int, sync_every: int, model: str) -> Dict[str, str]:
    """The component's trainer parameters whose value differs from the trainer's own default (``FLAG_DEFAULTS``,
    whence the components' defaults): one equal to its default is the same as unset."""
    given = {"checkpoint_dir": checkpoint_dir, "outer_steps": outer_steps, "sync_every": sync_every, "model": model}
    return {name: str(value) for name, value in given.items() if value != FLAG_DEFAULTS[name]}


def program(
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
        return ["-m", TRAIN_MODULE, *checked_train_args(groups, min_replicas, trainer, script_args, run)]
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


def checked_train_args(
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
    check_folder_free(cfg.checkpoint, run)
    return args


def check_folder_free(cfg: CheckpointConfig, run: Optional[str]) -> None:
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


def check_equal_ranks(ranks: List[int]) -> None:
    """Every group must run as many ranks: rank r of a group exchanges pseudo-gradients with rank r of the others
    only (torchft: one Manager per rank, one process group per rank index), so a rank without peers would hang."""
    if len(set(ranks)) > 1:
        raise ComponentError(
            f"the groups would run {','.join(map(str, ranks))} ranks (nodes x GPUs per node): rank r of a group syncs "
            "with rank r of the others, so every group needs as many ranks; make nodes_per_group x gpus_per_group "
            "equal (e.g. --nodes_per_group 2,1 --gpus_per_group 4,8)"
        )


def check_grace(grace_s: float, train_args: Optional[List[str]], groups: int) -> None:
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


def lighthouse_role(
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
class Groups:
    """What every group role of an app shares."""

    groups: int  # NUM_REPLICA_GROUPS
    lighthouse_url: str  # shell text: bash expands the rank0 host variable in it
    max_restarts: int
    env: Optional[Dict[str, str]]
    program: List[str]  # what follows torchrun's own flags (see program)
    run_id: Optional[str] = None
    min_replicas: int = MIN_REPLICAS


def group_role(
    group: int,
    spec: Groups,
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
        rdzv_host += f"port={rdzv_port_shell(first_het_group)}; "
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


def rdzv_port_shell(first_het_group: int) -> str:
    """Bash arithmetic (TorchX-escaped ``$$``) for the rendezvous port of the group whose first het component is
    ``first_het_group``: from that component's own Slurm job id (see RDZV_PORT)."""
    return f"$$(( {RDZV_PORT} + $${{SLURM_JOB_ID_HET_GROUP_{first_het_group}:?}} % {RDZV_PORTS} ))"
