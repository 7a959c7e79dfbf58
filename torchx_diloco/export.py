"""Take the trained model out of a checkpoint folder: ``python -m torchx_diloco.export CHECKPOINT_DIR --out DIR``.

The weights of a verified step (the newest complete one unless ``--step`` names one) go into a model rebuilt
from the step's own fingerprint (``--model``, ``--model-args`` and every parameter's name and shape, recorded by
the trainer), loaded strictly, so tied weights come out right and nothing depends on the flags you remember:

- a ``transformers`` model (``--model torchx_diloco.hf:causal_lm`` or any factory of a ``PreTrainedModel``)
  becomes a ``save_pretrained`` folder (``config.json``, ``model.safetensors``) that
  ``AutoModelForCausalLM.from_pretrained`` loads, with ``--tokenizer`` the tokenizer beside it;
- any other model (the GPT presets, factories returning a plain ``nn.Module``): ``model.safetensors`` (its state
  dict, written and read with ``safetensors.torch.save_model``/``load_model``, which keep tied tensors once).

Both get ``export.json``: how the model is built, the step, which weights. Sharded steps (groups of several
ranks, DCP) are consolidated in this one process. Nothing read can run code: the store verifies every file's
checksum first and reads with its safe readers; the output is safetensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore, CorruptCheckpoint, group_part
from torchx_diloco.errors import UserError
from torchx_diloco.modeling import build_model, fingerprint, fingerprint_mismatch
from torchx_diloco.presets import PRESETS

__all__ = ["export", "main", "build_parser"]

logger = logging.getLogger(__name__)

PROG = "python -m torchx_diloco.export"
INFO_NAME = "export.json"
WEIGHTS_NAME = "model.safetensors"
_GROUP = re.compile(r"group:(\d+)$")
HF_FACTORY = "torchx_diloco.hf:causal_lm"  # ours, like the presets: built without asking (any other factory is code)
_WEIGHTS_HELP = (
    "'global' (default): the global weights, what every group agrees on after an outer step (the model DiLoCo "
    "trains); 'group:G': group G's local weights at that step. With --fragments > 1 or --mix-alpha > 0 a group's "
    "model keeps weights of its own after a commit (the fragments that did not sync, the mixed-in share): "
    "those are saved in its part as local_weights and exported. Otherwise a group's weights right after a commit "
    "are the global ones: those are exported, and the export says so"
)
# special tokens by the names tokenizers give them, most common first
_SPECIAL_NAMES = {
    "bos": ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "<|bos|>", "[BOS]"),
    "eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]"),
    "pad": ("<pad>", "<|pad|>", "<|padding|>", "[PAD]"),
    "unk": ("<unk>", "<|unk|>", "[UNK]"),
}


# --- which step, which weights ----------------------------------------------------------------------------------
@dataclass
class _Step:
    """A verified step: its global part, and the chosen group's part when group weights are asked for."""

    number: int
    global_state: Dict[str, Any]
    global_sharded: bool
    group_state: Optional[Dict[str, Any]] = None
    group_sharded: bool = False


def parse_weights(text: str) -> Optional[int]:
    """``global`` -> None, ``group:G`` -> G."""
    if text == "global":
        return None
    m = _GROUP.match(text)
    if m is None:
        raise UserError(f"--weights {text!r}: pass 'global' or 'group:G' with G a group number (e.g. group:0)")
    return int(m.group(1))


def _read(store: CheckpointStore, step: int, part: str) -> tuple[Dict[str, Any], bool]:
    """A part of ``step``, verified (sizes and sha256 of every file against its manifest), and whether it is
    sharded (its tensors then are for ``load_sharded_part``)."""
    manifest = store.read_manifest(step, part)
    return store.read_part(step, part, manifest), manifest.get("layout") == "dcp"


def _verified_step(store: CheckpointStore, step: int, group: Optional[int]) -> _Step:
    state, sharded = _read(store, step, GLOBAL_PART)
    chosen = _Step(step, state, sharded)
    if group is not None:
        chosen.group_state, chosen.group_sharded = _read(store, step, group_part(group))
    return chosen


def choose_step(store: CheckpointStore, step: Optional[int], group: Optional[int]) -> _Step:
    """The step ``step`` (refused in one line if absent, incomplete or damaged), or the newest complete, verified
    one (for group weights: the newest that holds that group's part); a damaged step is skipped with a warning."""
    steps = store.steps()
    where = store.url
    if not steps:
        raise UserError(f"{where} holds no checkpoint steps (step_NNNNNNNN folders): pass a run's --checkpoint-dir")
    if step is not None:
        if step not in steps:
            raise UserError(
                f"--step {step}: {where} has no step {step} (it has {_listed(steps)}): pass one of those, "
                "or leave --step out for the newest"
            )
        if not store.has_part(step, GLOBAL_PART):
            raise UserError(
                f"--step {step}: {store.step_dir(step)} is incomplete (no MANIFEST.{GLOBAL_PART}.json: it was being "
                "written when the run stopped): pass an earlier --step, or leave --step out for the newest complete one"
            )
        if group is not None and not store.has_part(step, group_part(group)):
            raise UserError(
                f"--step {step}: group {group} wrote no part at that step (it did not take part in it): pass "
                "--weights global, or a --step the group wrote"
            )
        try:
            return _verified_step(store, step, group)
        except CorruptCheckpoint as e:
            raise UserError(
                f"--step {step} fails verification ({e}): pass an earlier --step, or leave --step out for the newest "
                "sound one"
            ) from e
    skipped = 0  # incomplete or damaged (each warned of); steps without the group's part are passed over quietly
    for number in reversed(steps):
        if not store.has_part(number, GLOBAL_PART):
            logger.warning("%s is incomplete (no manifest): skipping it", store.step_dir(number))
            skipped += 1
        elif group is None or store.has_part(number, group_part(group)):
            try:
                return _verified_step(store, number, group)
            except CorruptCheckpoint as e:
                logger.warning("skipping a damaged step: %s", e)
                skipped += 1
    if group is not None and skipped < len(steps):
        raise UserError(
            f"no step of {where} ({_listed(steps)}) holds a part of group {group}: pass --weights group:G with a "
            "group of that run, or --weights global"
        )
    raise UserError(f"{where} holds no complete, verified step (of {_listed(steps)}): see the warnings above")


def _listed(steps: List[int]) -> str:
    return ", ".join(map(str, steps[-10:])) + (f" and {len(steps) - 10} earlier" if len(steps) > 10 else "")


# --- the model ---------------------------------------------------------------------------------------------------
def rebuild_model(
    spec: Dict[str, Any], where: str, confirmed: Optional[str] = None
) -> tuple[nn.Module, Dict[str, Any]]:
    """The model the checkpoint was trained with, built from its fingerprint, and the ``model_args`` that
    rebuild it with ``build_model(model, json.dumps(model_args))`` (a preset's context length included).

    A factory other than the presets and ``torchx_diloco.hf:causal_lm`` is imported and called only when the
    caller names it (``confirmed``): the fingerprint is data from storage, and a crafted one could name any
    callable (``os:system``) with any arguments."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise UserError(
            f"{where} has no model fingerprint (it was written by an older torchx-diloco): train on with this "
            "version for one more outer step, then export"
        )
    name, args = spec["model"], dict(spec.get("model_args") or {})
    if confirmed is not None and confirmed != name:
        raise UserError(f"--model {confirmed}: {where} was trained with --model {name}: pass that, or no --model")
    if confirmed is None and name not in PRESETS and name != HF_FACTORY:
        raise UserError(
            f"{where} was trained with --model {name}: building it imports and runs that code; if you trust it, "
            f"pass --model {name} (with that package importable)"
        )
    rebuild_args = dict(args)
    seq_len = None
    if name in PRESETS and "block_size" not in args:  # the trainer gave the preset --seq-len as its context
        shapes = {n: shape for n, shape in spec.get("parameters", [])}
        if "pos_emb.weight" in shapes:
            seq_len = int(shapes["pos_emb.weight"][0])
            rebuild_args["block_size"] = seq_len
    with torch.random.fork_rng():  # every parameter is overwritten: the caller's random numbers stay as they were
        model = build_model(name, json.dumps(args), seq_len)
    differs = fingerprint_mismatch(spec, fingerprint(model, name, json.dumps(args)))
    if differs is not None:
        raise UserError(
            f"the model rebuilt from {where}'s fingerprint is not the one trained ({differs}): export with the "
            "code (and versions) that trained it"
        )
    return model, rebuild_args


def _load_sharded(store: CheckpointStore, step: int, part: str, key: str, model: nn.Module) -> Dict[str, Any]:
    """``key`` (the weights) of a sharded part, consolidated in this process: DCP reads every rank's shards into
    one plain tensor per trainable parameter of ``model`` (tied ones once)."""
    target = {key: {n: torch.empty(p.shape, dtype=p.dtype) for n, p in model.named_parameters() if p.requires_grad}}
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        store.load_sharded_part(step, part, target, None)
    except CorruptCheckpoint as e:
        raise UserError(f"{store.step_dir(step)}/{part}: {e}; pass another --step") from e
    except (CheckpointException, RuntimeError, ValueError) as e:  # DCP's: a rank's traceback, its error last
        raise UserError(
            f"{store.step_dir(step)}/{part}: its {key} do not fit the model rebuilt from the fingerprint "
            f"({str(e).strip().splitlines()[-1][:200]}): export with the code that trained it"
        ) from e
    return target[key]


def read_weights(
    store: CheckpointStore, chosen: _Step, model: nn.Module, group: Optional[int]
) -> tuple[Dict[str, Any], str]:
    """The weights to export (parameter name -> tensor) and a sentence saying which they are."""
    if group is not None:
        assert chosen.group_state is not None
        values = chosen.group_state
        if chosen.group_sharded and values.get("local_weights"):
            local = _load_sharded(store, chosen.number, group_part(group), "local_weights", model)
            return local, f"group {group}'s local weights at outer step {chosen.number}"
        if not chosen.group_sharded and isinstance(values.get("local_weights"), dict):
            return values["local_weights"], f"group {group}'s local weights at outer step {chosen.number}"
        note = (
            f"group {group}'s weights at outer step {chosen.number}, the global ones (right after a commit a group "
            "holds the global weights when the run uses neither --fragments > 1 nor --mix-alpha > 0)"
        )
    else:
        note = f"the global weights of outer step {chosen.number}"
    if chosen.global_sharded:
        return _load_sharded(store, chosen.number, GLOBAL_PART, "global_weights", model), note
    try:
        return chosen.global_state["diloco"]["global_weights"], note
    except (KeyError, TypeError) as e:
        raise UserError(
            f"{store.step_dir(chosen.number)}/{GLOBAL_PART}.pt holds no DiLoCo global weights (no {e}): "
            "pass the --checkpoint-dir of a torchx-diloco run"
        ) from e


def load_weights(model: nn.Module, weights: Dict[str, Any], where: str) -> None:
    """Every parameter from ``weights``, by name, strictly: none missing, none left over, the same shapes."""
    params = dict(model.named_parameters())  # tied parameters once: setting one sets the other
    missing = [n for n in params if n not in weights]
    unexpected = [n for n in weights if n not in params]
    if missing or unexpected:
        frozen = [n for n in missing if not params[n].requires_grad]
        why = " (frozen parameters are not checkpointed: DiLoCo trains and saves the trainable ones)" if frozen else ""
        raise UserError(
            f"the weights of {where} do not fit the model rebuilt from its fingerprint (missing: "
            f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'}){why}: "
            "export with the code that trained it"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = weights[name]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(p.shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(
                    f"{where}: weight {name} is {shape}, the model's is {tuple(p.shape)}: export with the code that "
                    "trained it"
                )
            p.copy_(value)


def _pretrained_class() -> Any:
    """transformers' PreTrainedModel if transformers is loaded (a factory of such a model imported it), else None."""
    tf = sys.modules.get("transformers")
    return getattr(tf, "PreTrainedModel", None) if tf is not None else None


def is_transformers_model(model: nn.Module) -> bool:
    cls = _pretrained_class()
    return cls is not None and isinstance(model, cls)


# --- the tokenizer -----------------------------------------------------------------------------------------------
def load_tokenizer(path: Union[str, Path]) -> Any:
    """A ``PreTrainedTokenizerFast`` from a ``tokenizers`` file (``tokenizer.json``, or a folder with one), its
    special tokens (bos, eos, pad, unk) found by their usual names."""
    given = Path(path)
    file = given / "tokenizer.json" if given.is_dir() else given
    if not file.is_file():
        raise UserError(f"--tokenizer {path}: no tokenizer.json there; pass the tokenizer.json of the data's prepare")
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        raise UserError(f"--tokenizer needs transformers: pip install 'torchx-diloco[hf]' ({e})") from e
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise plain Exceptions for bad files
        raise UserError(
            f"--tokenizer {path} is not a Hugging Face tokenizers file ({str(e).splitlines()[0][:200]}); pass a "
            "tokenizer.json (tokenizer.save(...))"
        ) from e
    vocab = tok.get_vocab()  # added tokens included
    found: Dict[str, Any] = {}
    for role, names in _SPECIAL_NAMES.items():
        named = next((n for n in names if n in vocab), None)
        if named is not None:
            found[f"{role}_token"] = named
    if found:
        tok.add_special_tokens(found)  # already in the vocab: this only names them
    return tok


def _special_ids(model: nn.Module, tokenizer: Any, vocab: int) -> None:
    """bos/eos/pad ids in the config (and generation config) that exist in the vocab: the tokenizer's own with
    ``--tokenizer``; else the config's, dropped (None) where outside the vocab (transformers warns of those)."""
    configs = [c for c in (model.config, getattr(model, "generation_config", None)) if c is not None]
    for role in ("bos", "eos", "pad"):
        attr = f"{role}_token_id"
        if tokenizer is not None:
            value = getattr(tokenizer, attr, None)
        else:
            value = getattr(model.config, attr, None)
            if isinstance(value, int) and not 0 <= value < vocab:
                logger.warning("%s %d is outside the vocab of %d: exported as None", attr, value, vocab)
                value = None
        for config in configs:
            if hasattr(config, attr) or config is model.config:
                setattr(config, attr, value)


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]


# --- writing -----------------------------------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder: pass a new folder, or remove it first")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be created ({e}): pass a folder you can write to") from e


def _check_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    vocab = _vocab_size(model)
    if len(tokenizer) > vocab:
        raise UserError(
            f"--tokenizer has {len(tokenizer)} tokens, the model only {vocab}: pass the tokenizer the data was "
            "prepared with"
        )


def _write_transformers(model: nn.Module, out: Path, tokenizer: Any) -> List[str]:
    _special_ids(model, tokenizer, _vocab_size(model))
    model.save_pretrained(str(out))  # type: ignore[operator]
    if tokenizer is not None:
        config = model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(positions, int):  # else transformers' "no limit" placeholder, a 31-digit number
            tokenizer.model_max_length = positions
        tokenizer.save_pretrained(str(out))
    return sorted(p.name for p in out.iterdir())


def _write_plain(model: nn.Module, out: Path, info: Dict[str, Any]) -> List[str]:
    try:
        from safetensors.torch import save_model
    except ImportError as e:
        raise UserError(f"the export writes safetensors: pip install 'torchx-diloco[hf]' (or safetensors) ({e})") from e

    meta = {"model": str(info["model"]), "model_args": json.dumps(info["model_args"]), "step": str(info["step"])}
    save_model(model, str(out / WEIGHTS_NAME), metadata=meta)  # a tied tensor once; load_model restores both names
    return [WEIGHTS_NAME]


def export(
    checkpoint_dir: str,
    out: Union[str, Path],
    step: Optional[int] = None,
    weights: str = "global",
    tokenizer: Optional[Union[str, Path]] = None,
    model: Optional[str] = None,
) -> Path:
    """Write the model of ``checkpoint_dir`` (a local path or fsspec URL) at ``step`` (default: the newest
    complete, verified one) to the new folder ``out``; ``weights``: ``"global"`` or ``"group:G"``; ``tokenizer``:
    a ``tokenizer.json`` to save beside a transformers model; ``model``: the run's ``--model``, needed (as
    consent to run its code) when it is a factory of your own. Returns ``out``. Bad input raises ``UserError``."""
    group = parse_weights(weights)
    out = Path(out)
    store = CheckpointStore(checkpoint_dir)
    chosen = choose_step(store, step, group)
    where = store.step_dir(chosen.number)
    spec = chosen.global_state.get("model_fingerprint")
    built, model_args = rebuild_model(spec, where, model)  # type: ignore[arg-type]
    name = spec["model"]  # type: ignore[index]
    hf = is_transformers_model(built)
    if tokenizer is not None and not hf:
        raise UserError(
            f"--tokenizer is for transformers models; --model {name} is a plain nn.Module: leave --tokenizer out "
            "(keep the tokenizer.json beside the export yourself)"
        )
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None:
        _check_tokenizer(built, tok)
    values, note = read_weights(store, chosen, built, group)
    load_weights(built, values, where)
    _check_out(out)
    info: Dict[str, Any] = {
        "format": "torchx-diloco-export",
        "version": 1,
        "checkpoint": store.url,
        "step": chosen.number,
        "weights": weights,
        "what": note,
        "model": name,
        "model_args": model_args,
        "layout": "transformers" if hf else "safetensors",
    }
    files = _write_transformers(built, out, tok) if hf else _write_plain(built, out, info)
    info["files"] = files
    (out / INFO_NAME).write_text(json.dumps(info, indent=1) + "\n")
    return out


# --- the command -------------------------------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {PROG} --help)")


def _step_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an outer step number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1 (outer steps count from 1)")
    return value


def _weights(text: str) -> str:
    try:
        parse_weights(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--weights {text!r}: ")) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=PROG,
        allow_abbrev=False,
        description="Export the model of a checkpoint folder: a save_pretrained folder for transformers models "
        "(from_pretrained loads it; --tokenizer puts the tokenizer beside it), model.safetensors for any other "
        f"model; {INFO_NAME} says how it was built, the step and which weights. The step is verified first.",
    )
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="the run's --checkpoint-dir (path or fsspec URL)")
    p.add_argument("--out", required=True, help="a new (or empty) local folder for the export")
    p.add_argument(
        "--step", type=_step_number, default=None, help="the outer step to export (default: the newest complete one)"
    )
    p.add_argument("--weights", type=_weights, default="global", help=_WEIGHTS_HELP)
    p.add_argument(
        "--model",
        default=None,
        help="the run's --model, when it is a factory of your own (package.module:factory): building the model "
        "runs that code, so the export asks you to name it; not needed for the presets and "
        f"{HF_FACTORY}",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a tokenizers file (tokenizer.json, or a folder with one) to save beside a transformers model; "
        "its bos/eos/pad tokens become the config's ids",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Writing model shards" bars
    logging.basicConfig(level=logging.WARNING, format="torchx_diloco.export: %(message)s")
    logging.getLogger("torchx_diloco").setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
        out = export(args.checkpoint_dir, args.out, args.step, args.weights, args.tokenizer, args.model)
    except UserError as e:
        print(f"torchx_diloco.export: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    info = json.loads((out / INFO_NAME).read_text())
    print(f"wrote {info['what']} from {info['checkpoint']} to {out}: {', '.join(info['files'])}")
    return 0


class _CallableModule(types.ModuleType):
    """``torchx_diloco.export`` is this module once imported (Python sets a package's attribute to its submodule,
    over the lazy function of the same name): calling it calls :func:`export`, so both spellings work."""

    def __call__(
        self,
        checkpoint_dir: str,
        out: Union[str, Path],
        step: Optional[int] = None,
        weights: str = "global",
        tokenizer: Optional[Union[str, Path]] = None,
        model: Optional[str] = None,
    ) -> Path:
        return export(checkpoint_dir, out, step, weights, tokenizer, model)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
