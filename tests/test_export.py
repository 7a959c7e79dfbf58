"""Getting the model out (python -m torchx_diloco.export): real runs' checkpoints, one-file and sharded, exported
and loaded back the way users load them (from_pretrained, safetensors), with the logits of the trained model."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import torch

from tests.conftest import lighthouse_server
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore
from torchx_diloco.config import parse_config
from torchx_diloco.modeling import build_model, logits_of
from torchx_diloco.train import Trainer

# tiny GPT-2 from a config; bos/eos 50256 lie outside its vocab of 300 (GPT-2's ids, as a user may leave them)
HF_ARGS = {"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32, "vocab_size": 300}
HF_ARGS.update(bos_token_id=50256, eos_token_id=50256)
HF_MODEL = ["--model", "torchx_diloco.hf:causal_lm", "--model-args", json.dumps(HF_ARGS)]
SEQ = 32
COMMON = ["--seq-len", str(SEQ), "--batch-size", "2", "--eval-batches", "0", "--group-wait", "0", "--device", "cpu"]


def train(ckpt: Path, args: List[str]) -> Trainer:
    """One group in this process, against a real lighthouse, to the end; the trainer (its model) is returned."""
    with lighthouse_server() as url:
        env = {"REPLICA_GROUP_ID": "0", "NUM_REPLICA_GROUPS": "1", "TORCHFT_LIGHTHOUSE": url}
        trainer = Trainer(parse_config([*COMMON, *args, "--checkpoint-dir", str(ckpt)], env))
        assert trainer.run() == 0
    return trainer


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A transformers GPT-2 trained for 2 outer steps (one-file checkpoints)."""
    ckpt = tmp_path_factory.mktemp("hf") / "ckpt"
    trainer = train(ckpt, [*HF_MODEL, "--sync-every", "3", "--outer-steps", "2"])
    return trainer, ckpt


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory):
    """The nano GPT preset with 2 fragments (Streaming DiLoCo): 3 outer steps, each a fragment's sync."""
    ckpt = tmp_path_factory.mktemp("nano") / "ckpt"
    trainer = train(ckpt, ["--model", "nano", "--sync-every", "4", "--outer-steps", "3", "--fragments", "2"])
    return trainer, ckpt


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    """A BPE tokenizer of 300 tokens trained here on pydoc text (nothing downloaded), as for prepare."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:50]], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@contextmanager
def no_warnings() -> Iterator[List[str]]:
    """Every warning transformers logs and every Python warning raised inside, as text (to assert it empty)."""
    from transformers.utils import logging as hf_logging

    seen: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Keep()
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        hf_logging.get_logger().removeHandler(handler)


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return logits_of(model(x))


def from_fingerprint(ckpt: Path, step: int) -> torch.nn.Module:
    """By hand: the model its fingerprint names, with the one-file step's global weights (only tied ones absent)."""
    state = CheckpointStore(str(ckpt)).read_part(step, GLOBAL_PART)
    spec = state["model_fingerprint"]
    model = build_model(spec["model"], json.dumps(spec["model_args"]), SEQ)
    result = model.load_state_dict(state["diloco"]["global_weights"], strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight", "head.weight"}, result
    return model


def export_cli(*args: Any) -> int:
    from torchx_diloco.export import main

    return main([str(a) for a in args])


def info(out: Path) -> Dict[str, Any]:
    return json.loads((out / "export.json").read_text())


# --- transformers models -----------------------------------------------------------------------------------------
def test_hf_export_loads_quietly_with_from_pretrained_and_gives_the_trained_logits(hf_run, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, ckpt = hf_run
    out = tmp_path / "export"
    assert export_cli(ckpt, "--out", out) == 0
    assert {"config.json", "model.safetensors", "export.json"} <= {p.name for p in out.iterdir()}
    assert info(out)["step"] == 2 and info(out)["weights"] == "global" and info(out)["layout"] == "transformers"
    with no_warnings() as seen:
        model = AutoModelForCausalLM.from_pretrained(out)
    assert seen == [], seen  # no missing lm_head, no bos/eos outside the vocab
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "the head is tied again"
    assert model.config.bos_token_id is None and model.config.eos_token_id is None  # 50256 is not in 300 ids
    x = batch()
    # no fragments, no mixing: right after its last commit the trainer's model holds the global weights
    assert torch.equal(logits(model, x), logits(trainer.model, x))
    assert torch.equal(logits(model, x), logits(from_fingerprint(ckpt, 2), x))


def test_hf_export_with_its_tokenizer_is_a_hub_folder(hf_run, bpe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torchx_diloco
    import torchx_diloco.export  # noqa: F401 - the submodule imported first: the package's name still calls

    _, ckpt = hf_run
    out = torchx_diloco.export(str(ckpt), tmp_path / "hub", tokenizer=bpe)
    with no_warnings() as seen:
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out)
    assert seen == [], seen
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eot == 1 and tok.eos_token == "<|endoftext|>" and tok.unk_token == "<unk>"
    assert model.config.eos_token_id == eot and model.generation_config.eos_token_id == eot
    assert model.config.bos_token_id is None and model.config.pad_token_id is None  # the tokenizer has neither
    assert tok.model_max_length == HF_ARGS["n_positions"]
    text = "def export(checkpoint): return the model"
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = torch.tensor([tok(text)["input_ids"]])
    assert torch.equal(logits(model, ids), logits(from_fingerprint(ckpt, 2), ids))


def test_group_weights_without_fragments_are_the_global_ones_and_say_so(hf_run, tmp_path):
    from safetensors.torch import load_file

    _, ckpt = hf_run
    assert export_cli(ckpt, "--out", tmp_path / "global") == 0
    assert export_cli(ckpt, "--out", tmp_path / "group", "--weights", "group:0") == 0
    assert "at outer step 2, the global ones" in info(tmp_path / "group")["what"], info(tmp_path / "group")
    one, other = (load_file(tmp_path / name / "model.safetensors") for name in ("global", "group"))
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)


def test_a_tokenizer_larger_than_the_vocab_is_refused(hf_run, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    big = tmp_path / "tok"
    big.mkdir()
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0")).save(str(big / "tokenizer.json"))
    assert export_cli(hf_run[1], "--out", tmp_path / "out", "--tokenizer", big) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "400 tokens, the model only 300" in err, err
    assert not (tmp_path / "out").exists()


# --- any other model ---------------------------------------------------------------------------------------------
def test_preset_export_is_safetensors_and_json_that_rebuild_the_model(nano_run, tmp_path):
    from safetensors.torch import load_model

    _, ckpt = nano_run
    out = tmp_path / "nano"
    assert export_cli(ckpt, "--out", out) == 0
    built = info(out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.safetensors"]
    assert (built["model"], built["model_args"], built["step"]) == ("nano", {"block_size": SEQ}, 3), built
    model = build_model(built["model"], json.dumps(built["model_args"]))  # the JSON alone rebuilds it
    torch.nn.init.zeros_(model.tok_emb.weight)
    load_model(model, str(out / "model.safetensors"))  # strict: every name, the tied head included
    x = batch()
    assert torch.equal(logits(model, x), logits(from_fingerprint(ckpt, 3), x))


def test_group_weights_with_fragments_are_the_groups_local_ones(nano_run, tmp_path):
    from safetensors.torch import load_model

    trainer, ckpt = nano_run
    out = tmp_path / "group0"
    assert export_cli(ckpt, "--out", out, "--weights", "group:0") == 0
    assert info(out)["what"] == "group 0's local weights at outer step 3", info(out)
    model = build_model("nano", json.dumps(info(out)["model_args"]))
    load_model(model, str(out / "model.safetensors"))
    x = batch()
    # with 2 fragments the fragment that did not sync last keeps the group's own progress
    assert torch.equal(logits(model, x), logits(trainer.model, x))
    assert not torch.equal(logits(model, x), logits(from_fingerprint(ckpt, 3), x))


def write_step(ckpt: Path, spec: str, args: Dict[str, Any], model: torch.nn.Module) -> None:
    """A global part as the trainer writes one, for ``model`` built by ``--model spec --model-args args``."""
    from torchx_diloco.modeling import fingerprint

    CheckpointStore(str(ckpt)).write_part(
        1,
        GLOBAL_PART,
        {
            "outer_step": 1,
            "model_fingerprint": fingerprint(model, spec, json.dumps(args)),
            "manager": {"step": 1},
            "diloco": {"global_weights": {n: p.detach().clone() for n, p in model.named_parameters()}},
        },
    )


def test_a_factory_of_your_own_is_built_only_when_you_name_it(tmp_path, capsys):
    """A factory is code: the export runs it only on --model naming it (tests/model_factories.py, by name)."""
    from safetensors.torch import load_model

    from tests.model_factories import bare_logits

    spec, args = "tests.model_factories:bare_logits", {"vocab_size": 64, "max_positions": 16}
    trained = bare_logits(**args)
    write_step(tmp_path / "ckpt", spec, args, trained)
    assert export_cli(tmp_path / "ckpt", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"if you trust it, pass --model {spec}" in err, err
    assert export_cli(tmp_path / "ckpt", "--out", tmp_path / "out", "--model", "nano") == 2
    assert f"was trained with --model {spec}: pass that" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    assert export_cli(tmp_path / "ckpt", "--out", tmp_path / "out", "--model", spec) == 0
    assert (info(tmp_path / "out")["model"], info(tmp_path / "out")["model_args"]) == (spec, args)
    model = bare_logits(**args)
    load_model(model, str(tmp_path / "out" / "model.safetensors"))
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(logits(model, x), logits(trained, x))


def test_a_crafted_fingerprint_runs_nothing(tmp_path, capsys):
    """A checkpoint from a shared bucket naming os:system as its model: refused, the command never runs."""
    pwned = tmp_path / "PWNED"
    CheckpointStore(str(tmp_path / "ckpt")).write_part(
        1,
        GLOBAL_PART,
        {"model_fingerprint": {"model": "os:system", "model_args": {"command": f"touch {pwned}"}, "parameters": []}},
    )
    assert export_cli(tmp_path / "ckpt", "--out", tmp_path / "out") == 2
    assert "building it imports and runs that code" in capsys.readouterr().err
    assert not pwned.exists()


def test_one_file_and_sharded_steps_on_s3_export_like_local_ones(nano_run, s3_url, tmp_path):
    """From the S3 server: the nano run's steps uploaded as they are, then a sharded (DCP) step written on S3."""
    import fsspec
    from safetensors.torch import load_file, load_model

    from torchx_diloco.modeling import fingerprint

    trainer, ckpt = nano_run
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(ckpt / "step_00000003"), f"{s3_url}/step_00000003", recursive=True)
    assert export_cli(s3_url, "--out", tmp_path / "s3") == 0 and export_cli(ckpt, "--out", tmp_path / "local") == 0
    from_s3, local = (load_file(tmp_path / name / "model.safetensors") for name in ("s3", "local"))
    assert from_s3.keys() == local.keys() and all(torch.equal(from_s3[k], local[k]) for k in local)

    weights = {n: torch.randn(p.shape) for n, p in trainer.model.named_parameters()}
    values = {"outer_step": 4, "model_fingerprint": fingerprint(trainer.model, "nano", "{}"), "manager": {"step": 4}}
    CheckpointStore(s3_url).write_sharded_part(4, GLOBAL_PART, {"global_weights": weights}, values, None)
    assert export_cli(s3_url, "--out", tmp_path / "sharded") == 0 and info(tmp_path / "sharded")["step"] == 4
    model = build_model("nano", json.dumps(info(tmp_path / "sharded")["model_args"]))
    load_model(model, str(tmp_path / "sharded" / "model.safetensors"))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


# --- refusals ----------------------------------------------------------------------------------------------------
def test_a_missing_step_is_refused_in_one_line(nano_run, tmp_path, capsys):
    """The real command: one line naming the steps there are, exit 2, nothing written."""
    _, ckpt = nano_run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchx_diloco.export", str(ckpt), "--out", str(out), "--step", "9"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no step 9 (it has 1, 2, 3)" in lines[0], done.stderr
    assert not out.exists()
    for bad, says in (
        (["--weights", "group"], "'group:G'"),
        (["--step", "0"], "must be >= 1"),
        (["--weights", "group:5"], "holds a part of group 5: pass --weights group:G with a group of that run"),
    ):
        assert export_cli(ckpt, "--out", out, *bad) == 2
        assert says in capsys.readouterr().err
    assert not out.exists()


def test_a_damaged_or_incomplete_step_is_refused_and_the_newest_sound_one_exported(nano_run, tmp_path, capsys, caplog):
    _, original = nano_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original, ckpt)
    victim = ckpt / "step_00000003" / "global.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, size unchanged: only the checksum sees it
    victim.write_bytes(bytes(data))

    assert export_cli(ckpt, "--out", tmp_path / "out", "--step", "3") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--step 3 fails verification" in err and "does not match its checksum" in err
    assert not (tmp_path / "out").exists()

    assert export_cli(ckpt, "--out", tmp_path / "out") == 0  # the newest sound step instead, with a warning
    assert info(tmp_path / "out")["step"] == 2
    assert "skipping a damaged step" in caplog.text and "step_00000003: global.pt does not match" in caplog.text

    (ckpt / "step_00000002" / "MANIFEST.global.json").unlink()  # a step whose writing never finished
    assert export_cli(ckpt, "--out", tmp_path / "out2", "--step", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is incomplete" in err, err
    assert export_cli(ckpt, "--out", tmp_path / "out2") == 0 and info(tmp_path / "out2")["step"] == 1


def test_a_sharded_step_that_does_not_fit_its_fingerprint_is_refused_in_one_line(nano_run, tmp_path, capsys):
    from torchx_diloco.modeling import fingerprint

    model = nano_run[0].model
    weights = {n: torch.zeros(p.shape) for n, p in model.named_parameters() if n != "ln_f.weight"}
    values = {"outer_step": 1, "model_fingerprint": fingerprint(model, "nano", "{}"), "manager": {"step": 1}}
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.write_sharded_part(1, GLOBAL_PART, {"global_weights": weights}, values, None)
    assert export_cli(tmp_path / "ckpt", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "its global_weights do not fit the model" in err and "ln_f.weight" in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_out_folder_is_not_overwritten(nano_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert export_cli(nano_run[1], "--out", out) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


# --- sharded steps -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sharded_step_of_two_fsdp_ranks_per_group_exports_consolidated(tmp_path, capsys):
    """2 groups x 2 FSDP ranks (torchrun, Gloo) with 2 fragments: every rank wrote its shards (DCP). The export
    consolidates them in one process: from_pretrained gives the logits of the global weights, and the rank-0
    shard of what it exported is what the trainer recorded (the metrics' checksum of its global weights)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from torchx_diloco._fleet.testing import Group, Lighthouse, committed_checksums
    from torchx_diloco.metrics import weights_checksum

    ckpt = tmp_path / "ckpt"
    args = [*HF_MODEL, *COMMON, "--group-wait", "30", "--min-replicas", "2", "--parallel", "fsdp"]
    args += ["--sync-every", "4", "--outer-steps", "2", "--fragments", "2", "--checkpoint-dir", str(ckpt)]
    fleet = Lighthouse(tmp_path, min_replicas=2)
    groups = [Group(g, 2, fleet.url, args, tmp_path, nproc=2, extra_env={"HF_HUB_OFFLINE": "1"}) for g in range(2)]
    try:
        for g in groups:
            assert g.wait(240) == 0, g.output()[-3000:]
    finally:
        for g in groups:
            g.kill()
        fleet.kill()
    step = ckpt / "step_00000002"
    assert {p.name for p in (step / "global").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    out = tmp_path / "export"
    assert export_cli(ckpt, "--out", out) == 0
    with no_warnings() as seen:
        model = AutoModelForCausalLM.from_pretrained(out)
    assert seen == [], seen
    # by hand: the global part's shards read into one plain copy of the model
    spec = CheckpointStore(str(ckpt)).read_part(2, GLOBAL_PART)["model_fingerprint"]
    reference = build_model(spec["model"], json.dumps(spec["model_args"]))
    target = {"global_weights": {n: torch.zeros_like(p) for n, p in reference.named_parameters()}}
    CheckpointStore(str(ckpt)).load_sharded_part(2, GLOBAL_PART, target, None)
    reference.load_state_dict(target["global_weights"], strict=False)
    x = batch()
    assert torch.equal(logits(model, x), logits(reference, x))
    # FSDP2 gave rank 0 the first half of every parameter's rows: the shards the trainer checksummed
    rank0 = [p.detach().chunk(2, dim=0)[0] for _, p in model.named_parameters()]
    assert weights_checksum(rank0) == committed_checksums(ckpt, 0)[2]

    group = tmp_path / "group1"
    assert export_cli(ckpt, "--out", group, "--weights", "group:1") == 0
    assert info(group)["what"] == "group 1's local weights at outer step 2", info(group)
    local, shared = load_file(group / "model.safetensors"), load_file(out / "model.safetensors")
    differ = {k for k in shared if not torch.equal(local[k], shared[k])}
    assert differ and differ != set(shared), "the fragment that synced last is at the global weights, the other not"

    victim = step / "global" / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert export_cli(ckpt, "--out", tmp_path / "damaged", "--step", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fails verification" in err and "__1_0.distcp" in err, err
