"""TorchX components that launch DiLoCo: a torchft lighthouse plus N replica groups.

``diloco`` is the whole run as one app (one machine with ``local_cwd``, or one heterogeneous job on Slurm).
``lighthouse`` and ``replica_group`` are its two halves, for submitting the groups as separate jobs
against one long-lived lighthouse. All three build their roles with the same helpers (``_roles``), so they stay
alike.

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

import re
import shlex
from typing import Dict, Optional

import torchx.specs as specs
from torchx.specs import macros

from torchx_diloco import lease
from torchx_diloco.config import FLAG_DEFAULTS, LIGHTHOUSE_IDLE_EXIT_S, LIGHTHOUSE_PORT, STRAGGLER_GRACE_S
from torchx_diloco.gpus import GPUS_ENV

from . import _roles as roles
from ._roles import MIN_REPLICAS, MIN_REPLICAS_ENV, RDZV_PORT, RDZV_PORTS, ComponentError

__all__ = ["diloco", "lighthouse", "replica_group", "ComponentError", "GPUS_ENV"]
# (the names tests and users read here: MIN_REPLICAS_ENV for a --script, RDZV_PORT(S) for a multi-node group's port)
__all__ += ["MIN_REPLICAS_ENV", "RDZV_PORT", "RDZV_PORTS"]


@roles.strict_args
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
    roles.check_common(replica_groups, min_replicas, max_restarts)
    nodes = roles.per_group("nodes_per_group", nodes_per_group, replica_groups, 1, "nodes per group")
    port = roles.pick_port() if lighthouse_port == 0 else roles.check_port(lighthouse_port)
    resources, devices = roles.group_resources(replica_groups, cpu, gpus_per_group, memMB, h, gpu_assignment)
    roles.check_equal_ranks([n * max(1, r.gpu) for n, r in zip(nodes, resources, strict=True)])
    trainer = roles.trainer_params(checkpoint_dir, outer_steps, sync_every, model)
    train_args = roles.program(script, m, replica_groups, min_replicas, trainer, list(script_args))
    roles.check_grace(straggler_grace_s, train_args[2:] if script is None and m is None else None, replica_groups)
    # $$ escapes the macro's `$`: the replica's bash expands ${<rank0 host variable>:-localhost}
    url = f"http://$${{{macros.rank0_env}:-localhost}}:{port}"
    app_roles = [roles.lighthouse_role(port, min_replicas, lighthouse_idle_exit, env, macros.app_id, straggler_grace_s)]
    spec = roles.Groups(
        replica_groups, url, max_restarts, env, train_args, run_id=macros.app_id, min_replicas=min_replicas
    )
    # het group 0 is the lighthouse; each group's nodes follow, in group order
    app_roles += [
        roles.group_role(g, spec, resources[g], nodes[g], devices[g] if devices else None, 1 + sum(nodes[:g]))
        for g in range(replica_groups)
    ]
    return specs.AppDef(name=name, roles=app_roles)


@roles.strict_args
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
    roles.check_grace(straggler_grace_s, None, 1)
    if min_replicas < 1:
        raise ComponentError(f"--min_replicas {min_replicas} must be >= 1")
    roles.check_port(port)
    role = roles.lighthouse_role(port, min_replicas, idle_exit, env, run_id, straggler_grace_s)
    return specs.AppDef(name=name, roles=[role])


@roles.strict_args
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
    roles.check_common(replica_groups, min_replicas, max_restarts)
    if not 0 <= group < replica_groups:
        raise ComponentError(f"--group {group} is outside 0..{replica_groups - 1}: pick a group below --replica_groups")
    if not re.fullmatch(r"https?://[^\s/:]+(:\d+)", lighthouse_url.rstrip("/")):
        raise ComponentError(f"--lighthouse_url {lighthouse_url!r} is not http://HOST:PORT: pass the lighthouse's URL")
    (nodes,) = roles.per_group("nodes_per_group", str(nodes_per_group), 1, 1, "nodes per group")
    resources, devices = roles.group_resources(1, str(cpu), str(gpus), str(memMB), h, cuda_visible_devices, "gpus")
    trainer = roles.trainer_params(checkpoint_dir, outer_steps, sync_every, model)
    run = lease.run_identity(run_id, lighthouse_url.rstrip("/"))  # as the trainer names its run
    train_args = roles.program(script, m, replica_groups, min_replicas, trainer, list(script_args), run)
    url = shlex.quote(lighthouse_url.rstrip("/"))
    spec = roles.Groups(replica_groups, url, max_restarts, env, train_args, run_id, min_replicas)
    role = roles.group_role(group, spec, resources[0], nodes, devices[0] if devices else None)
    return specs.AppDef(name=name, roles=[role])
