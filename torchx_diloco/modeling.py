"""Which model a run trains (``--model``, ``--model-args``), its loss, and the checks of it against the data.

The one place that knows model conventions. ``--model`` is a GPT preset or ``package.module:factory``, a
callable returning an ``nn.Module``, called with ``--model-args`` as keyword arguments. The trainer calls the
model as ``model(input_ids)`` and accepts three output conventions:

- a Hugging Face causal-LM output (``.logits``); labels are never passed (HF shifts them itself, and our
  batches are already shifted: ``y`` is ``x`` one token on);
- a tuple or list whose first element is the logits (our presets return ``(logits, loss)``);
- the logits themselves.

The loss is the cross-entropy of the logits against the next-token targets.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any, Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchx_diloco.errors import UserError
from torchx_diloco.model import GPT
from torchx_diloco.presets import PRESETS, VOCAB_SIZE, GPTConfig

CONVENTIONS = "a Hugging Face output with .logits, a tuple whose first element is the logits, or the logits"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def build_model(spec: str, model_args: str = "{}", seq_len: int | None = None) -> nn.Module:
    """The model ``--model spec --model-args model_args`` names; every failure is a one-line UserError.

    A preset's context length is ``seq_len`` unless ``model_args`` sets ``block_size``.
    """
    args: Dict[str, Any] = json.loads(model_args)
    if spec in PRESETS:
        fields = {**PRESETS[spec].to_dict(), **({"block_size": seq_len} if seq_len else {})}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise UserError(
                f"--model-args: {', '.join(unknown)} is not a field of the GPT presets: use {', '.join(fields)}"
            )
        try:
            return GPT(GPTConfig(**{**fields, **args}))
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"--model {spec} --model-args {model_args}: {_first_line(e)}; fix --model-args") from e
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"--model {spec}: cannot import {module_name!r} ({_first_line(e)}): install it or put it on PYTHONPATH"
        ) from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: one line for the user
        raise UserError(f"--model {spec}: importing {module_name!r} raised {_first_line(e)}: fix that module") from e
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"--model {spec}: {module_name} has no attribute {attr!r}: check the name after the colon")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"--model {spec}: {attr} is a {type(target).__name__}, not a callable: name a factory")
    try:
        model = target(**args)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory failed: one line for the user
        raise UserError(f"--model {spec}: the factory raised {_first_line(e)}: check --model-args {model_args}") from e
    if not isinstance(model, nn.Module):
        raise UserError(
            f"--model {spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module: return the model"
        )
    return model


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output, whichever of the accepted conventions it follows."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise UserError(
            f"the model returned a {type(output).__name__} with no logits: return {CONVENTIONS} (see --help of --model)"
        )
    return logits


def forward_loss(model: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model(x)``'s logits against the next tokens ``y``."""
    logits = logits_of(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def data_vocab_size(corpus: Any) -> int:
    """How many token ids the data uses (0..n-1): the corpus's ``vocab_size`` where it has one, else bytes."""
    return int(getattr(corpus, "vocab_size", VOCAB_SIZE))


@torch.no_grad()
def check_against_data(model: nn.Module, spec: str, vocab_size: int, seq_len: int, device: torch.device) -> None:
    """Before training: the model must take every token id of the data, and sequences of ``seq_len``.

    Two forwards in eval mode (no dropout, so no random numbers drawn): a short one holding the largest id,
    then one of ``seq_len`` tokens. Each failure is one line naming the fix.
    """
    was_training = model.training
    model.eval()
    try:
        probe = torch.tensor([[vocab_size - 1, 0]], dtype=torch.long, device=device)[:, : max(1, min(2, seq_len))]
        hint = f"give it a vocab of at least {vocab_size} (e.g. --model-args '{{\"vocab_size\": {vocab_size}}}')"
        try:
            logits = logits_of(model(probe))
        except (IndexError, RuntimeError) as e:
            raise UserError(
                f"--model {spec} fails on token id {vocab_size - 1} of the data ({_first_line(e)}): {hint}"
            ) from e
        if logits.size(-1) < vocab_size:
            raise UserError(
                f"--model {spec} predicts {logits.size(-1)} token ids but the data has {vocab_size}: {hint}"
            )
        full = torch.zeros((1, seq_len), dtype=torch.long, device=device)
        try:
            logits = logits_of(model(full))
        except (IndexError, RuntimeError, ValueError) as e:
            raise UserError(
                f"--seq-len {seq_len} is longer than --model {spec} takes ({_first_line(e)}): lower --seq-len or "
                "raise the model's max positions (e.g. block_size, n_positions or max_position_embeddings "
                "in --model-args)"
            ) from e
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, seq_len):
            raise UserError(
                f"--model {spec} returned logits of shape {tuple(logits.shape)} for 1 sequence of {seq_len} tokens: "
                f"return (batch, seq_len, vocab) logits as {CONVENTIONS}"
            )
    finally:
        model.train(was_training)


def fingerprint(model: nn.Module, spec: str, model_args: str) -> Dict[str, Any]:
    """What a checkpoint must match to be loaded into ``model``: the spec, its arguments, every parameter's
    name and shape (a structural fingerprint: works for any model, preset or not)."""
    return {
        "model": spec,
        "model_args": json.loads(model_args),
        "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()],
    }


def fingerprint_mismatch(saved: Dict[str, Any], mine: Dict[str, Any]) -> str | None:
    """None when a checkpoint with fingerprint ``saved`` fits; else what differs, briefly."""
    if saved.get("model") != mine["model"] or saved.get("model_args") != mine["model_args"]:
        return (
            f"--model {saved.get('model')} --model-args {json.dumps(saved.get('model_args'))}, "
            f"this run builds --model {mine['model']} --model-args {json.dumps(mine['model_args'])}"
        )
    theirs, ours = dict(map(tuple, saved.get("parameters", []))), dict(map(tuple, mine["parameters"]))
    for name in [*ours, *theirs]:
        if theirs.get(name) != ours.get(name):
            return f"parameter {name}: {theirs.get(name)} there, {ours.get(name)} here"
    return None
