"""Every training flag, declared once, grouped by the part that consumes it; the parser, the trainer and the
components use these declarations.

Imports no torch: the TorchX components parse their ``script_args`` with :func:`parse_flags` before anything
starts, so a typo fails ``torchx run`` in a second with the same one line the trainer would print.

``TrainConfig`` holds one small config per part (``model``, ``data``, ``optim``, ``diloco``, ``checkpoint``,
``cluster``) and the loop's own settings; the command line stays flat (``--sync-every``, not
``--diloco.sync-every``): a flag's name is its field's, unless the field says otherwise.

Environment (as in torchft's DiLoCo example; the TorchX components set them), read by :func:`read_group_env`
only: ``REPLICA_GROUP_ID`` (0..N-1), ``NUM_REPLICA_GROUPS`` (N), ``TORCHFT_LIGHTHOUSE`` (http://host:port) and
``TORCHX_DILOCO_RUN_ID`` (optional: the run the lighthouse and the groups belong to).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

from torchx_diloco.errors import UserError
from torchx_diloco.pace import AutoH
from torchx_diloco.presets import PRESETS

PROG = "python -m torchx_diloco.train"
IMPLEMENTATIONS = ("torchx_diloco", "torchft")
DTYPES = ("fp32", "bf16")
CODECS = ("fp32", "bf16", "int8", "int4", "int2", "topk")
DEFAULT_TOPK_DENSITY = 0.02  # --codec topk's share of values sent when --topk-density is not given
# --error-feedback auto turns it on for these codecs: where it measured better (docs/benchmarks.md, issue 18)
ERROR_FEEDBACK_BY_DEFAULT = ("int2", "topk")
ERROR_FEEDBACK = {"auto": None, "on": True, "off": False}  # the flag's values, as DiLoCo(error_feedback=...)
PARALLEL = ("ddp", "fsdp")  # how the ranks of one group share the work
DEFAULT_DATA = "pydoc"  # the English text of Python's own pydoc_data.topics: on every CPython, no download

# Run-level defaults shared by the lighthouse, the components and the tests: written here only.
LIGHTHOUSE_PORT = 29510  # the by-hand lighthouse's port; the components pick a free one per run
LIGHTHOUSE_IDLE_EXIT_S = 30.0  # above a group's restart time, so a restarting group does not end the run
LIGHTHOUSE_FIRST_JOIN_TIMEOUT_S = 600.0
# How long a quorum waits for a group of the previous one that has not asked for it yet (torchft's lighthouse join
# timeout): a straggler is left out of the round after this, and heals at the next sync. Below quorum_timeout.
STRAGGLER_GRACE_S = 60.0

# The environment the components set for every group (and a user's own loop reads through group_manager).
REPLICA_GROUP_ID_ENV = "REPLICA_GROUP_ID"
NUM_REPLICA_GROUPS_ENV = "NUM_REPLICA_GROUPS"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
RUN_ID_ENV = "TORCHX_DILOCO_RUN_ID"
MIN_REPLICAS_ENV = "TORCHX_DILOCO_MIN_REPLICAS"  # for a user's own script (--script/--m): the trainer has a flag


# --- value parsers: each error names the requirement (argparse prefixes the flag) --------------------------
def _number(text: str, kind: type, ok: Callable[[Any], bool], requirement: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        try:
            float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} must be {requirement}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, ">= 1")


def sync_every_value(text: str) -> int:
    """H, or ``auto:H`` (:class:`~torchx_diloco.pace.AutoH`: H for the fastest group, fewer for slower ones)."""
    if text.startswith("auto:"):
        return AutoH(positive_int(text[len("auto:") :]))
    return positive_int(text)


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "> 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, ">= 0")


def unit_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "in [0, 1)")


def closed_unit_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "in [0, 1]")


def density(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "in (0, 1]")


def device_name(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")


def local_dir(text: str) -> str:
    """A directory on this machine: a path or a file:// URL (TensorBoard's writer writes local files only)."""
    parsed = urlparse(text)
    if parsed.scheme == "file":
        text = parsed.path
    elif parsed.scheme and len(parsed.scheme) > 1:  # (one letter: a Windows drive)
        raise argparse.ArgumentTypeError(f"{text!r} is not a local directory: pass a path on this machine")
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: pass a directory")
    return text


_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def model_spec(text: str) -> str:
    """A preset name or ``package.module:factory`` (imported and called by the trainer, not here)."""
    if text in PRESETS or _FACTORY.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor package.module:factory "
        "(e.g. torchx_diloco.hf:causal_lm)"
    )


def json_object(text: str) -> str:
    """JSON text of an object (kept as text: the config stays hashable); the trainer passes it as keywords."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({e}); pass an object like '{{\"n_layer\": 4}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; pass one like '{{\"n_layer\": 4}}'")
    return text


def flag(
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    choices: Optional[Sequence[str]] = None,
    name: Optional[str] = None,
    per_group: bool = False,
) -> Any:
    """A training flag: its default, how its text is parsed and checked, its --help line, and its name on the
    command line where that is not the field's (``name="model"`` makes ``ModelConfig.spec`` ``--model``).
    ``per_group``: groups of one run may differ in it, so it takes one value for all or one per group (``8,8,4``)."""
    metadata = {"parse": parse, "help": help, "choices": choices, "name": name, "per_group": per_group}
    return field(default=default, metadata=metadata)


class PerGroup(tuple):
    """A flag's values, one per replica group in group order (``--batch-size 8,8,4``)."""


def one_or_each(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for a per-group flag: ``8`` is one value for every group, ``8,8,4`` one per group."""

    def parse_values(text: str) -> Any:
        if "," not in text:
            return parse(text)
        return PerGroup(parse(part.strip()) for part in text.split(","))

    return parse_values


def from_env(default: Any) -> Any:
    """A setting read from the environment (set by the components), not a flag."""
    return field(default=default, metadata={"env": True})


def part(config: type) -> Any:
    """A part's own config inside ``TrainConfig``: its flags are the part's fields."""
    return field(default_factory=config, metadata={"part": True})


_PRESET_SHAPES = ", ".join(f"{k} ({v.n_layer}x{v.n_embd})" for k, v in PRESETS.items())


@dataclass(frozen=True)
class ModelConfig:
    """What model trains (modeling.build_model) and how its forward runs."""

    spec: str = flag(
        "tiny",
        model_spec,
        f"a GPT size preset ({_PRESET_SHAPES}) or package.module:factory, a callable returning a torch.nn.Module "
        "(e.g. torchx_diloco.hf:causal_lm); called as model(input_ids), it may return a Hugging Face output "
        "(.logits), a tuple whose first element is the logits, or the logits; the loss is their cross-entropy "
        "against the next tokens (labels are never passed); torchx_diloco.hf:causal_lm's arguments (arch, config "
        "fields, defaults): python -m pydoc torchx_diloco.hf.causal_lm, or docs/training-options.md",
        name="model",
    )
    args: str = flag(
        "{}",
        json_object,
        "JSON object of keyword arguments for --model's factory (for a preset: GPT fields)",
        name="model_args",
    )
    dtype: str = flag(
        "fp32",
        str,
        "precision of the forward and the loss: fp32, or bf16 (autocast; weights, gradients and the DiLoCo "
        "state stay fp32)",
        choices=DTYPES,
    )
    compile: bool = flag(False, bool, "torch.compile the model's forward (the optimizers keep the same parameters)")


@dataclass(frozen=True)
class DataConfig:
    """What each inner step and each evaluation reads (data.Corpus)."""

    path: str = flag(
        DEFAULT_DATA,
        str,
        "'pydoc' (Python's own docs, on every CPython), or an fsspec URL, glob or directory of UTF-8 text files "
        "or of token shards (.bin/.npy; see docs/data.md)",
        name="data",
    )
    eval_path: Optional[str] = flag(
        None, str, "held-out data, the same kinds as --data (default: the last 5%% of --data)", name="eval_data"
    )
    batch_size: int = flag(16, positive_int, "sequences per inner step per group", per_group=True)
    seq_len: int = flag(128, positive_int, "tokens (bytes) per sequence")
    grad_accum: int = flag(
        1,
        positive_int,
        "micro-batches of --batch-size per inner step (gradients accumulated, loss scaled by 1/K)",
        per_group=True,
    )
    eval_batches: int = flag(4, non_negative_int, "held-out batches per eval (0 = no eval)")


@dataclass(frozen=True)
class OptimConfig:
    """The inner AdamW and the outer SGD with Nesterov momentum (train.build_optimizers), and the inner schedule."""

    inner_lr: float = flag(4e-4, positive_float, "AdamW peak learning rate (paper: 4e-4)")
    outer_lr: float = flag(0.7, positive_float, "outer SGD learning rate (paper: 0.7)")
    outer_momentum: float = flag(0.9, unit_float, "outer Nesterov momentum (paper: 0.9)")
    weight_decay: float = flag(0.1, non_negative_float, "AdamW weight decay on matrices (paper: 0.1)")
    warmup_steps: Optional[int] = flag(
        None,
        non_negative_int,
        "inner warm-up steps before the cosine decay (default: 5%% of all inner steps, at most 1000)",
    )
    max_grad_norm: float = flag(1.0, non_negative_float, "clip inner gradients to this norm (0 = off)")


@dataclass(frozen=True)
class DiLoCoConfig:
    """The outer loop: when it syncs and what it sends (diloco.DiLoCo)."""

    sync_every: int = flag(
        50,
        sync_every_value,
        "H: inner steps between syncs (a slower group may take fewer: one per group; or auto:H, the fastest group "
        "takes H and each other group fewer, from the step times of the last round)",
        per_group=True,
    )
    fragments: int = flag(
        1,
        positive_int,
        "P: Streaming DiLoCo, the model split into P fragments of about equal size that sync in turn, one "
        "every H/P inner steps (each fragment sync is one outer step); H must be a multiple of P",
    )
    overlap_steps: int = flag(
        0,
        non_negative_int,
        "tau: a fragment's sync is sent tau inner steps before it is applied and its communication runs while "
        "they train (0 = blocking); below H/P",
    )
    mix_alpha: float = flag(
        0.0,
        closed_unit_float,
        "after a fragment's outer step, keep this share of the local weights: local = lerp(global, local, alpha)",
    )
    codec: str = flag(
        "fp32",
        str,
        "what the pseudo-gradient crosses the link as: fp32, bf16, int8, int4 or int2 (block-scaled; a quantized "
        "reduce-scatter + all-gather on Gloo and NCCL), or topk (sparse: each 4096 values' largest, all-gathered: "
        "fewer bytes than int2 while the groups number under about 0.3 / --topk-density, more beyond)",
        choices=CODECS,
    )
    topk_density: Optional[float] = flag(
        None,
        density,
        f"--codec topk: the share of each chunk's values sent (0.01-0.05 typical); unset, {DEFAULT_TOPK_DENSITY}",
    )
    error_feedback: str = flag(
        "auto",
        str,
        "carry what a lossy --codec did not send of a fragment's pseudo-gradient into its next sync (each rank's "
        "residual, kept beside the global weights and in checkpoints): auto (on for "
        f"{' and '.join(ERROR_FEEDBACK_BY_DEFAULT)}, where it measured better; off otherwise), on or off",
        choices=tuple(ERROR_FEEDBACK),
    )
    outer_delay: int = flag(
        0,
        non_negative_int,
        "1: eager outer steps (Kale et al., arXiv 2502.12996): a sync's exchange runs during the whole next H/P "
        "inner steps and is applied at the next sync, each group training meanwhile from where its own "
        "pseudo-gradient says that outer step lands; training never waits for the link (0 = each outer step waits "
        "for its sync)",
    )
    impl: str = flag(
        "torchx_diloco",
        str,
        "whose outer loop runs: ours, or torchft.local_sgd.DiLoCo (for comparison)",
        choices=IMPLEMENTATIONS,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Durable backups and the metrics beside them (checkpoint.Checkpointer)."""

    dir: str = flag(
        "checkpoints/diloco",
        str,
        "fsspec URL of the durable backups (local path, memory://, s3://, gs://); a run "
        "resumes from the newest complete checkpoint found there",
        name="checkpoint_dir",
    )
    every: int = flag(1, positive_int, "write a checkpoint every k committed outer steps", name="checkpoint_every")
    keep: int = flag(3, positive_int, "how many checkpoints to keep", name="keep_checkpoints")
    lease_s: float = flag(
        60.0,
        positive_float,
        "a live run holds --checkpoint-dir (renewing a lease there every quarter of this): a run of another id is "
        "refused until this many seconds after the holder's last renewal (a run that ends releases it at once)",
        name="checkpoint_lease_s",
    )
    take_over: bool = flag(
        False, bool, "take --checkpoint-dir over from the run holding it now (that run stops at its next renewal)"
    )


@dataclass(frozen=True)
class ClusterConfig:
    """How this group joins the run (cluster.join_run) and how its ranks share the work (parallel.parallelize)."""

    min_replicas: int = flag(1, positive_int, "groups needed to commit an outer step (the others may be down)")
    lighthouse_timeout: float = flag(
        60.0,
        positive_float,
        "seconds to wait for the lighthouse at start, and how long a sync keeps retrying "
        "while it is away (restarted lighthouse)",
    )
    group_wait: float = flag(
        60.0,
        non_negative_float,
        "seconds to wait at start for all NUM_REPLICA_GROUPS groups to reach the lighthouse (0 = don't)",
    )
    collective_timeout: float = flag(
        60.0,
        positive_float,
        "seconds an all-reduce, commit vote or peer checkpoint fetch may take before the round is dropped",
    )
    quorum_timeout: float = flag(
        120.0,
        positive_float,
        "seconds one quorum may take: longer than the lighthouse's join timeout, so slow groups are waited for",
    )
    parallel: str = flag(
        "ddp",
        str,
        "a group of several ranks trains as ddp (replicas; each rank sends 1/G of the pseudo-gradient to other "
        "groups) or fsdp (FSDP2 over the group's ranks: parameters, global weights and outer momentum sharded)",
        choices=PARALLEL,
    )

    group_id: int = from_env(0)
    num_groups: int = from_env(1)
    lighthouse: str = from_env("")
    run_id: Optional[str] = from_env(None)


@dataclass(frozen=True)
class TrainConfig:
    """One replica group's settings: the loop's own, then one config per part. A new flag is one line in the
    part that reads it: the parser is generated from the declarations."""

    outer_steps: int = flag(10, positive_int, "outer steps (syncs) to train for")
    seed: int = flag(0, int, "seeds the initial weights (same in every group) and the data order")
    device: str = flag("auto", device_name, "'auto' (CUDA if visible, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    tensorboard: Optional[str] = flag(
        None, local_dir, "also write the metrics as TensorBoard events to this local directory (extra: tb)"
    )

    model: ModelConfig = part(ModelConfig)
    data: DataConfig = part(DataConfig)
    optim: OptimConfig = part(OptimConfig)
    diloco: DiLoCoConfig = part(DiLoCoConfig)
    checkpoint: CheckpointConfig = part(CheckpointConfig)
    cluster: ClusterConfig = part(ClusterConfig)

    @property
    def steps_per_outer_step(self) -> int:
        """Inner steps between two outer steps: H, or H/P when the model syncs in P fragments."""
        return self.diloco.sync_every // self.diloco.fragments

    @property
    def total_inner_steps(self) -> int:
        return self.outer_steps * self.steps_per_outer_step


def _declared(config: type = TrainConfig, where: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], Field]]:
    """Every flag's place in ``TrainConfig`` (the part's attribute, if any) and its field, in declaration order."""
    for f in fields(config):
        if f.metadata.get("part"):
            yield from _declared(f.default_factory, (*where, f.name))  # type: ignore[arg-type]
        elif "parse" in f.metadata:
            yield where, f


def flag_name(f: Field) -> str:
    """The field's flag without the dashes, as argparse and the components spell it (``checkpoint_dir``)."""
    return f.metadata["name"] or f.name


FLAG_DEFAULTS: Dict[str, Any] = {flag_name(f): f.default for _, f in _declared()}  # "sync_every" -> 50


def streaming_problem(
    sync_every: int,
    fragments: int,
    overlap_steps: int,
    mix_alpha: float,
    codec: str,
    as_arguments: bool = False,
    error_feedback: Optional[bool] = None,
    topk_density: Optional[float] = None,
    outer_delay: int = 0,
) -> Optional[str]:
    """What is wrong with a Streaming DiLoCo setting, as one line naming the fix; None if nothing. (``error_feedback``
    None: the codec's default, :func:`error_feedback_on`.)

    The trainer's flags and ``DiLoCo``'s arguments are checked by this same function; ``as_arguments`` names
    them as ``DiLoCo``'s keyword arguments (``overlap_steps``) instead of flags (``--overlap-steps``)."""

    def name(field_name: str) -> str:
        return field_name if as_arguments else "--" + field_name.replace("_", "-")

    if fragments < 1:
        return f"{name('fragments')} must be >= 1, got {fragments}"
    if isinstance(sync_every, AutoH) and (fragments > 1 or overlap_steps or outer_delay):
        return (
            f"{name('sync_every')} {sync_every} adapts one whole-model sync per round: it needs "
            f"{name('fragments')} 1, {name('overlap_steps')} 0 and {name('outer_delay')} 0 (or give each group its "
            f"own H: {name('sync_every')} 50,50,25)"
        )
    if sync_every % fragments:
        return (
            f"{name('sync_every')} {sync_every} is not a multiple of {name('fragments')} {fragments}: "
            "make H a multiple of P"
        )
    if not 0 <= overlap_steps < sync_every // fragments:
        return (
            f"{name('overlap_steps')} {overlap_steps} must be below H/P = {sync_every // fragments} (a fragment's "
            f"sync must land before the next one starts): lower it or raise {name('sync_every')}"
        )
    if not 0.0 <= mix_alpha <= 1.0:
        return f"{name('mix_alpha')} {mix_alpha} must be in [0, 1]"
    if codec not in CODECS:
        return f"unknown {name('codec')} {codec!r}: use one of {', '.join(CODECS)}"
    if topk_density is not None and codec != "topk":
        return f"{name('topk_density')} applies to {name('codec')} topk only: drop it or pass {name('codec')} topk"
    if topk_density is not None and not 0 < topk_density <= 1:
        return f"{name('topk_density')} {topk_density} must be in (0, 1]"
    if error_feedback is True and codec == "fp32":
        return (
            f"{name('error_feedback')} needs a lossy {name('codec')} (fp32 sends every bit): drop it or pass "
            f"{name('codec')} {' or '.join(c for c in CODECS if c != 'fp32')}"
        )
    if outer_delay not in (0, 1):
        return f"{name('outer_delay')} {outer_delay} is not supported: pass 0 (wait for each sync) or 1 (eager)"
    if outer_delay and overlap_steps:
        return (
            f"{name('outer_delay')} 1 already overlaps a sync with all H/P inner steps after it: drop "
            f"{name('overlap_steps')}"
        )
    if outer_delay and mix_alpha:
        return (
            f"{name('outer_delay')} 1 leaves the local weights training while the outer step lands: drop "
            f"{name('mix_alpha')}"
        )
    return None


def error_feedback_on(codec: str, error_feedback: Optional[bool] = None) -> bool:
    """Whether ``codec`` runs with error feedback: as asked, or by default where it measured better."""
    return codec in ERROR_FEEDBACK_BY_DEFAULT if error_feedback is None else error_feedback


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line that names the fix (a UserError: exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The training module's command line, generated from ``TrainConfig``'s declarations."""
    parser = _OneLineParser(
        prog=PROG,
        description="One DiLoCo replica group: inner AdamW steps, every H steps an outer SGD-Nesterov step on "
        f"the pseudo-gradient averaged across groups through torchft. Reads {REPLICA_GROUP_ID_ENV}, "
        f"{NUM_REPLICA_GROUPS_ENV}, {LIGHTHOUSE_ENV} and {RUN_ID_ENV} from the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --outer-step is a typo, not --outer-steps
    )
    for _, f in _declared():
        option = "--" + flag_name(f).replace("_", "-")
        if f.metadata["parse"] is bool:  # an on/off switch: --compile
            parser.add_argument(option, dest=flag_name(f), action="store_true", help=f.metadata["help"])
            continue
        per_group = f.metadata["per_group"]
        parser.add_argument(
            option,
            dest=flag_name(f),
            type=one_or_each(f.metadata["parse"]) if per_group else f.metadata["parse"],
            default=f.default,
            choices=f.metadata["choices"],
            help=f.metadata["help"] + ("; one value for all groups, or one per group: 8,8,4" if per_group else ""),
        )
    return parser


def _from_flags(values: Mapping[str, Any], group: int, config: type = TrainConfig) -> Any:
    """``config`` built from the parsed flags (parts from their own fields), with group ``group``'s values of the
    per-group flags."""
    kwargs = {}
    for f in fields(config):
        if f.metadata.get("part"):
            kwargs[f.name] = _from_flags(values, group, f.default_factory)  # type: ignore[arg-type]
        elif "parse" in f.metadata:
            value = values[flag_name(f)]
            kwargs[f.name] = value[group] if isinstance(value, PerGroup) else value
    return config(**kwargs)


def _check_per_group(values: Mapping[str, Any], num_replica_groups: Optional[int]) -> bool:
    """Whether any flag has one value per group; their counts must be the run's number of groups."""
    lists = {name: v for name, v in values.items() if isinstance(v, PerGroup)}
    for name, v in lists.items():
        given = f"--{name.replace('_', '-')} {','.join(map(str, v))}"
        if num_replica_groups is None:
            raise UserError(
                f"{given} gives one value per group, but the number of groups is unknown: set NUM_REPLICA_GROUPS"
            )
        if len(v) != num_replica_groups:
            raise UserError(
                f"{given} gives {len(v)} values for {num_replica_groups} replica groups: give one value for all "
                "groups or one per group"
            )
    return bool(lists)


def parse_flags(
    argv: Optional[Sequence[str]] = None, num_replica_groups: Optional[int] = None, group: Optional[int] = None
) -> TrainConfig:
    """The flags alone (no environment), as group ``group`` runs with them; ``group`` None (the components, before
    launch): every group's flags are checked, and group 0's returned."""
    values = vars(build_parser().parse_args(None if argv is None else list(argv)))
    if isinstance(values["sync_every"], PerGroup) and any(isinstance(h, AutoH) for h in values["sync_every"]):
        listed = ",".join(map(str, values["sync_every"]))
        raise UserError(f"--sync-every {listed}: auto:H is one value for all groups (the fastest group's H)")
    per_group = _check_per_group(values, num_replica_groups)
    groups = [group] if group is not None else range(num_replica_groups or 1) if per_group else [0]
    configs = []
    for g in groups:
        try:
            configs.append(_checked(_from_flags(values, g), num_replica_groups))
        except UserError as e:
            raise UserError(f"group {g}: {e}" if per_group else str(e)) from None
    return configs[0]


def _checked(cfg: TrainConfig, num_replica_groups: Optional[int]) -> TrainConfig:
    d = cfg.diloco
    problem = streaming_problem(
        d.sync_every,
        d.fragments,
        d.overlap_steps,
        d.mix_alpha,
        d.codec,
        False,
        ERROR_FEEDBACK[d.error_feedback],
        d.topk_density,
        d.outer_delay,
    )
    if problem is not None:
        raise UserError(problem)
    if d.impl == "torchft" and isinstance(d.sync_every, AutoH):
        raise UserError(f"--sync-every {d.sync_every} needs --impl torchx_diloco (torchft's DiLoCo has one fixed H)")
    if d.impl == "torchft" and d.outer_delay:
        raise UserError("--outer-delay 1 needs --impl torchx_diloco (torchft's DiLoCo has no delayed outer step)")
    if d.impl == "torchft" and d.codec != "fp32":
        raise UserError(f"--codec {d.codec} needs --impl torchx_diloco (torchft quantizes only on CUDA with Triton)")
    if num_replica_groups is not None and cfg.cluster.min_replicas > num_replica_groups:
        raise UserError(
            f"--min-replicas {cfg.cluster.min_replicas} exceeds the {num_replica_groups} replica groups: lower it"
        )
    return cfg


@dataclass(frozen=True)
class GroupEnv:
    """Which replica group this process belongs to, of which run, and where the run's lighthouse is."""

    group_id: int
    num_groups: int
    lighthouse: str
    run_id: Optional[str]


def _env_int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name, "")
    if raw == "":
        if default is None:
            raise UserError(f"{name} is not set: set it (e.g. {name}=0) or launch through the TorchX component")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not an integer: set it to a whole number") from None


def read_group_env(
    env: Optional[Mapping[str, str]] = None,
    *,
    group_id: Optional[int] = None,
    num_groups: Optional[int] = None,
    lighthouse: Optional[str] = None,
    run_id: Optional[str] = None,
) -> GroupEnv:
    """The group's identity from the environment the components set (arguments given win over it), checked:
    a missing or bad value is a :class:`UserError` naming the variable and the fix."""
    env = os.environ if env is None else env
    groups = num_groups if num_groups is not None else _env_int(env, NUM_REPLICA_GROUPS_ENV, 1)
    if groups < 1:
        raise UserError(f"{NUM_REPLICA_GROUPS_ENV}={groups} must be >= 1")
    group = group_id if group_id is not None else _env_int(env, REPLICA_GROUP_ID_ENV, 0 if groups == 1 else None)
    if not 0 <= group < groups:
        raise UserError(
            f"{REPLICA_GROUP_ID_ENV}={group} is outside 0..{groups - 1}: set it below {NUM_REPLICA_GROUPS_ENV}={groups}"
        )
    url = lighthouse or env.get(LIGHTHOUSE_ENV)
    if not url:
        raise UserError(
            f"{LIGHTHOUSE_ENV} is not set: start a lighthouse (python -m torchx_diloco.lighthouse) and set "
            f"{LIGHTHOUSE_ENV}=http://HOST:PORT, or launch through the TorchX component"
        )
    run = run_id if run_id is not None else (env.get(RUN_ID_ENV) or None)
    return GroupEnv(group, groups, parse_lighthouse(url), run)


def parse_lighthouse(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not parsed.port:
        raise UserError(
            f"{LIGHTHOUSE_ENV}={url!r} is not a lighthouse URL: set it to http://HOST:PORT "
            f"(e.g. http://localhost:{LIGHTHOUSE_PORT})"
        )
    return url.rstrip("/")


def parse_config(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> TrainConfig:
    """The flags plus the group's environment: what one replica group runs with."""
    values = build_parser().parse_args(None if argv is None else list(argv))  # --help and a bad flag come first
    group = read_group_env(env)
    if values.min_replicas > group.num_groups:
        raise UserError(
            f"--min-replicas {values.min_replicas} exceeds {NUM_REPLICA_GROUPS_ENV}={group.num_groups}: lower it"
        )
    cfg = parse_flags(argv, group.num_groups, group.group_id)
    cluster = replace(
        cfg.cluster,
        group_id=group.group_id,
        num_groups=group.num_groups,
        lighthouse=group.lighthouse,
        run_id=group.run_id,
    )
    return replace(cfg, cluster=cluster)
