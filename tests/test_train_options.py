"""--dtype bf16, --grad-accum, --compile, --tensorboard and ``python -m torchx_diloco.plot`` on real runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest
import torch

from torchx_diloco._fleet.testing import (
    PYTHON,
    REPO,
    Lighthouse,
    clean_env,
    committed,
    committed_checksums,
    metrics_url,
    read_metrics,
    run_groups,
)
from torchx_diloco.checkpoint import GLOBAL_PART, CheckpointStore, group_part
from torchx_diloco.metrics import TENSORBOARD_TAGS

SMALL = ["--model", "nano", "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--group-wait", "20"]


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "torchx_diloco.plot", *args], env=clean_env(), capture_output=True, text=True, cwd=REPO
    )


def train(tmp: Path, ckpt: Path, *args: str, groups: int = 1) -> None:
    lighthouse = Lighthouse(tmp, min_replicas=groups)
    try:
        run_groups(groups, lighthouse.url, [*SMALL, "--checkpoint-dir", str(ckpt), *args], tmp)
    finally:
        lighthouse.kill()


def last_state(ckpt: Path, part: str = GLOBAL_PART) -> dict:
    store = CheckpointStore(str(ckpt))
    return store.read_part(store.steps()[-1], part)


def test_plot_without_metrics_is_one_line_and_exit_2(tmp_path):
    result = plot(str(tmp_path / "no-run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "no metrics under" in result.stderr and "--checkpoint-dir" in result.stderr


def without(package: str, tmp: Path) -> dict:
    """An environment where ``import package`` fails as if it were not installed (a package of that name first
    on PYTHONPATH that raises ImportError)."""
    (tmp / "hide" / package).mkdir(parents=True)
    (tmp / "hide" / package / "__init__.py").write_text(f'raise ImportError("No module named {package}")\n')
    return clean_env(PYTHONPATH=str(tmp / "hide"), OMP_NUM_THREADS="1")


def test_tensorboard_without_its_package_is_one_line_naming_the_extra(tmp_path):
    env = {**without("tensorboard", tmp_path), "TORCHFT_LIGHTHOUSE": "http://localhost:1"}
    argv = [*SMALL, "--checkpoint-dir", str(tmp_path / "ckpt"), "--tensorboard", str(tmp_path / "tb")]
    result = subprocess.run(
        [PYTHON, "-m", "torchx_diloco.train", *argv], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "pip install 'torchx-diloco[tb]'" in result.stderr


def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path):
    result = subprocess.run(
        [PYTHON, "-m", "torchx_diloco.plot", str(tmp_path)],
        env=without("matplotlib", tmp_path),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "torchx_diloco.plot: error: plotting needs matplotlib: pip install 'torchx-diloco[plot]'"
    )


# --- one 2-group bf16 run with --tensorboard, looked at three ways ---------------------------------------------
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    ckpt, tb = tmp / "ckpt", tmp / "tb"
    args = ["--dtype", "bf16", "--outer-steps", "3", "--sync-every", "5", "--min-replicas", "2"]
    train(tmp, ckpt, *args, "--tensorboard", str(tb), "--inner-lr", "3e-3", groups=2)
    return ckpt, tb


@pytest.mark.slow
def test_bf16_run_trains_and_keeps_the_diloco_state_fp32(bf16_run):
    ckpt, _ = bf16_run
    for g in range(2):
        losses = [r["loss"] for r in committed(read_metrics(metrics_url(ckpt, g)))]
        assert len(losses) == 3
        assert losses[-1] < losses[0] - 0.1, losses
    state = last_state(ckpt)["diloco"]
    assert {w.dtype for w in state["global_weights"].values()} == {torch.float32}
    momenta = [s["momentum_buffer"] for s in state["outer_optimizer"]["state"].values()]
    assert momenta and {m.dtype for m in momenta} == {torch.float32}
    adam = last_state(ckpt, group_part(0))["inner_optimizer"]["state"].values()
    assert {s["exp_avg"].dtype for s in adam} == {torch.float32}


@pytest.mark.slow
def test_tensorboard_has_each_groups_numbers_per_committed_outer_step(bf16_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, tb = bf16_run
    for g in range(2):
        events = EventAccumulator(str(tb / f"replica_group_{g}"))
        events.Reload()
        assert set(events.Tags()["scalars"]) == set(TENSORBOARD_TAGS.values())
        records = committed(read_metrics(metrics_url(ckpt, g)))
        for key, tag in TENSORBOARD_TAGS.items():
            scalars = events.Scalars(tag)
            assert [s.step for s in scalars] == [5, 10, 15]  # the global inner step: outer step x H
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def write_metrics(ckpt: Path, keys: tuple) -> None:
    """Two groups' metrics as the trainer writes them: 3 committed outer steps and a dropped round, with the
    optional ``keys`` (sent_bytes, inner_lr, outer_lr) only if asked (metrics of older versions lack them)."""
    import json

    (ckpt / "metrics").mkdir(parents=True)
    for g in range(2):
        lines = []
        for step in (1, 2, 3):
            record = dict(outer_step=step, committed=True, inner_steps=5 * step, tokens=640 * step, loss=3.0 - step / 4)
            record.update(eval_loss=3.1 - step / 4, tokens_per_s=1e4, participants=2, sync_s=0.1, fragment=0)
            optional = dict(sent_bytes=1000 * (g + 1) * step, inner_lr=4e-4 / step, outer_lr=0.7)
            record.update({k: v for k, v in optional.items() if k in keys})
            lines.append(json.dumps(record))
        lines.append(json.dumps(dict(outer_step=4, committed=False, sync_s=0.5)))
        (ckpt / "metrics" / f"replica_group_{g}.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_draws_bytes_sent_and_learning_rates_where_the_metrics_hold_them(tmp_path):
    from torchx_diloco import plot as plot_module

    new, old = tmp_path / "new", tmp_path / "old"
    write_metrics(new, ("sent_bytes", "inner_lr", "outer_lr"))
    write_metrics(old, ())
    fig = plot_module.figure(plot_module.read_run(str(new)))
    titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    sent = titled[plot_module.BYTES_TITLE]
    assert [list(line.get_ydata()) for line in sent.get_lines()] == [[1000, 2000, 3000], [2000, 4000, 6000]]
    lrs = titled[plot_module.LR_TITLE]
    assert lrs.get_ylabel().startswith("inner lr") and len(lrs.get_lines()) == 2
    assert list(lrs.get_lines()[0].get_ydata()) == pytest.approx([4e-4, 2e-4, 4e-4 / 3])
    (outer,) = [ax for ax in fig.axes if ax.get_ylabel().startswith("outer lr")]  # the twin of the lr panel
    assert [list(line.get_ydata()) for line in outer.get_lines()] == [[0.7] * 3, [0.7] * 3]

    fig = plot_module.figure(plot_module.read_run(str(old)))  # older metrics: the four panels, nothing empty
    assert len(fig.axes) == 4 and not {plot_module.BYTES_TITLE, plot_module.LR_TITLE} & {
        a.get_title() for a in fig.axes
    }
    for run_dir in (new, old):
        result = plot(str(run_dir))
        assert result.returncode == 0, result.stderr
        assert (run_dir / "metrics" / "run.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_hf_causal_lm_defaults_are_told_where_help_points():
    """`python -m pydoc torchx_diloco.hf.causal_lm` and docs/training-options.md list every default it builds."""
    from torchx_diloco import hf

    section = (REPO / "docs" / "training-options.md").read_text().split("## Hugging Face models", 1)[1]
    doc = " ".join((hf.causal_lm.__doc__ or "").split())
    for arch, defaults in hf.DEFAULTS.items():
        assert f"`{arch}`" in section and f"- {arch}: " in doc, arch
        for name, value in defaults.items():
            assert f"{name}={value}" in section and f"{name}={value}" in doc, (arch, name)


@pytest.mark.slow
def test_plot_draws_a_png_of_a_real_run(bf16_run, tmp_path):
    ckpt, _ = bf16_run
    out = tmp_path / "run.png"
    result = plot(str(ckpt), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "(2 groups)" in result.stdout
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


# --- --grad-accum, and --compile against it --------------------------------------------------------------------
# one block: inductor's compile of the model (most of the compiled run's time, cold) takes a third less
ACCUM = ["--grad-accum", "2", "--sync-every", "4", "--outer-steps", "2", "--inner-lr", "3e-3"]
ACCUM += ["--model-args", '{"n_layer": 1}']


@pytest.fixture(scope="module")
def accum_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accum")
    train(tmp, tmp / "ckpt", *ACCUM)
    return tmp / "ckpt"


@pytest.mark.slow
def test_grad_accum_draws_k_batches_per_inner_step_and_resumes_exactly(accum_run, tmp_path):
    """K micro-batches per inner step: the data position advances by K, and a run resumed from the step-1
    checkpoint ends with the same weights as the run that went straight through.

    (K=2 with batch B is not K=1 with batch 2B here: batch number i is drawn from a generator seeded by i, so the
    two micro-batches are other windows than one double batch.)"""
    part = last_state(accum_run, group_part(0))
    assert part["inner_steps"] == 8 and part["data_position"] == 16
    records = committed(read_metrics(metrics_url(accum_run, 0)))
    assert [r["tokens"] for r in records] == [4 * 2 * 4 * 32, 8 * 2 * 4 * 32]  # inner steps x K x batch x seq

    resumed = tmp_path / "resumed"  # the same run, as if killed after its first checkpoint
    shutil.copytree(accum_run, resumed)
    shutil.rmtree(resumed / "step_00000002")
    log = resumed / "metrics" / "replica_group_0.jsonl"
    log.write_text("".join(line for line in log.read_text().splitlines(True) if '"outer_step": 1,' in line))
    assert list(committed_checksums(resumed, 0)) == [1]
    train(tmp_path, resumed, *ACCUM)
    assert committed_checksums(resumed, 0) == committed_checksums(accum_run, 0)
    assert last_state(resumed, group_part(0))["data_position"] == 16


def global_weights(ckpt: Path, step: int) -> Dict[str, torch.Tensor]:
    return CheckpointStore(str(ckpt)).read_part(step, GLOBAL_PART)["diloco"]["global_weights"]


@pytest.mark.slow
def test_compiled_run_trains_to_the_eager_weights(accum_run, tmp_path):
    """What compile must keep: the same parameters trained, the same losses, and global weights that differ from
    the eager run's by a small part of what one outer step moves them. Not a fixed tolerance: inductor's code and
    float order depend on the CPU (1e-4 apart here, more on others), and the differences grow with every step."""
    compiled_run = tmp_path / "compiled"
    train(tmp_path, compiled_run, *ACCUM, "--compile")
    losses = {
        name: [r["loss"] for r in committed(read_metrics(metrics_url(run, 0)))]
        for name, run in (("eager", accum_run), ("compiled", compiled_run))
    }
    assert len(losses["compiled"]) == 2 and losses["compiled"][1] < losses["compiled"][0], losses
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2), losses
    eager = [global_weights(accum_run, s) for s in (1, 2)]
    compiled = [global_weights(compiled_run, s) for s in (1, 2)]
    assert {n: w.shape for n, w in compiled[1].items()} == {n: w.shape for n, w in eager[1].items()}
    for name in eager[1]:  # every parameter moved at the second outer step, in both runs
        assert not torch.equal(eager[1][name], eager[0][name]) and not torch.equal(compiled[1][name], compiled[0][name])
    # apart by at most a small part of the eager run's own step: a tenth in all (seen: 1e-4), half per parameter
    # (seen: 5e-4; a small bias whose tiny gradients change sign between the two float orders moves by ~lr)
    flat = lambda w: torch.cat([w[n].reshape(-1) for n in sorted(w)])  # noqa: E731
    step = flat(eager[1]) - flat(eager[0])
    assert float((flat(compiled[1]) - flat(eager[1])).norm()) < 0.1 * float(step.norm())
    for name in eager[1]:
        apart, moved = (compiled[1][name] - eager[1][name]).norm(), (eager[1][name] - eager[0][name]).norm()
        assert float(apart) < 0.5 * float(moved), (name, float(apart), float(moved))
