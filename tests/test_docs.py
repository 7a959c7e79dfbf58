"""The documentation stays navigable: every relative link resolves, and the shell blocks can be extracted.

``shell_commands`` is the helper for tests that run the documented commands: it reads the fenced shell blocks of
a markdown file and returns one string per command, backslash-continued lines joined.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]


def doc_files() -> List[Path]:
    """The markdown files whose links must resolve."""
    files = [REPO / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md")]
    files += sorted((REPO / "docs").glob("*.md"))
    files += sorted((REPO / "examples").glob("**/README.md"))
    return [f for f in files if f.is_file()]


# --- markdown, just enough of it ----------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
_SHELL_INFO = {"bash", "sh", "shell", "console", "zsh"}


def _blocks(text: str) -> Iterator[Tuple[bool, str, List[str]]]:
    """(in_fence, info string, lines) runs of a markdown text, in order."""
    run: List[str] = []
    fence = ""
    info = ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if not fence and m:
            yield False, "", run
            run, fence, info = [], m.group(1), m.group(2).lower()
        elif fence and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            yield True, info, run
            run, fence, info = [], "", ""
        else:
            run.append(line)
    yield bool(fence), info, run


def prose_lines(text: str) -> List[str]:
    """The lines outside fenced code blocks."""
    return [line for in_fence, _, lines in _blocks(text) if not in_fence for line in lines]


def shell_commands(path: Path) -> List[str]:
    """The commands of the fenced shell blocks (```bash, ```sh, ...) of ``path``, one string per command.

    Backslash-continued lines are joined into one command; blank lines and comment-only lines are dropped.
    Trailing ``# comments`` stay (the shell ignores them).
    """
    commands: List[str] = []
    for in_fence, info, lines in _blocks(Path(path).read_text(encoding="utf-8")):
        if not in_fence or info not in _SHELL_INFO:
            continue
        pending = ""
        for line in lines:
            stripped = line.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1].rstrip() + " "
                continue
            commands.append(pending + stripped)
            pending = ""
        if pending.strip():
            commands.append(pending.strip())
    return commands


_INLINE_CODE = re.compile(r"(`+).+?\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def links(text: str) -> List[str]:
    """Link and image targets outside code (inline ``[x](target)`` and reference definitions ``[x]: target``)."""
    found: List[str] = []
    for line in prose_lines(text):
        ref = _REF_DEF.match(line)
        if ref:
            found.append(ref.group(1))
            continue
        found += [m.group(1) for m in _LINK.finditer(_INLINE_CODE.sub("", line))]
    return found


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: Dict[str, int] = {}
    result: Set[str] = set()
    for line in prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def broken_links(path: Path) -> List[str]:
    """The relative links of ``path`` that point at nothing (a missing file, or a missing heading)."""
    text = path.read_text(encoding="utf-8")
    broken: List[str] = []
    for target in links(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # https:, mailto:, ...: not ours to check offline
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file: {_shown(dest)})")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file():
            if unquote(anchor).lower() not in anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{target} (no heading #{anchor} in {_shown(dest)})")
    return broken


# --- tests ----------------------------------------------------------------------------------------------------


def test_the_docs_are_found():
    names = {str(f.relative_to(REPO)) for f in doc_files()}
    assert {"README.md", "docs/architecture.md", "examples/slurm/README.md"} <= names, names
    assert len(links((REPO / "README.md").read_text(encoding="utf-8"))) >= 10, "the link parser finds no links"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(REPO)} has broken links: " + "; ".join(broken)


def test_the_link_check_catches_a_broken_file_and_a_broken_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Run `make bench`, twice\n\n## Run `make bench`, twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#a-page) [ok](docs/a.md#run-make-bench-twice-1) [web](https://x.org/y)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#no-such-heading) ![img](pic.png)\n"
    )
    assert [b.split(" ")[0] for b in broken_links(page)] == ["docs/b.md", "docs/a.md#no-such-heading", "pic.png"]


def test_shell_commands_joins_continued_lines_and_skips_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```bash\n# a comment\nmake run   # trains\n\ntorchx run diloco.diloco \\\n"
        "    --replica_groups 3 \\\n    --outer_steps 20\n```\n\n```\nnot shell\n```\n\n```python\nprint(1)\n```\n"
    )
    assert shell_commands(page) == [
        "make run   # trains",
        "torchx run diloco.diloco --replica_groups 3 --outer_steps 20",
    ]


def test_the_readme_documents_its_commands():
    commands = shell_commands(REPO / "README.md")
    assert any(c.startswith("make run") for c in commands), commands
    assert any(c.startswith("python -m torchx_diloco.lighthouse") for c in commands), commands


def test_the_readme_names_every_extra_and_all_holds_the_user_facing_ones():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert [name for name in extras if f"`[{name}]`" not in readme] == [], "extras the README does not name"
    user_facing = sorted(set(extras) - {"all", "test", "bench", "dev"})
    (spec,) = extras["all"]  # the package's own extras, by name: one list to keep
    assert spec.startswith("torchx-diloco[") and sorted(spec[len("torchx-diloco[") : -1].split(",")) == user_facing


# --- every documented command runs -------------------------------------------------------------------------------

_ENV_PREFIX = re.compile(r"^([A-Z_][A-Z0-9_]*)=(\S*)$")


def documented_commands() -> List[Tuple[str, str]]:
    """(file, command) for each documented `torchx run` and `python -m torchx_diloco...` command."""
    found = []
    for path in doc_files():
        for command in shell_commands(path):
            if re.search(r"(^|\s)(torchx run|python -m torchx_diloco\.)", command):
                found.append((_shown(path), command))
    return found


def split_command(command: str) -> Tuple[Dict[str, str], List[str]]:
    """Environment prefix and argv of one documented command (comment and `&` dropped, `$g` is group 0)."""
    import shlex

    words = shlex.split(command.replace("$g", "0"), comments=True)
    words = [w for w in words if w != "&"]
    env: Dict[str, str] = {}
    while words and _ENV_PREFIX.match(words[0]):
        key, value = _ENV_PREFIX.match(words[0]).groups()  # type: ignore[union-attr]
        env[key] = value
        words = words[1:]
    return env, words


@pytest.fixture(scope="module")
def eight_gpu_machine(tmp_path_factory) -> Dict[str, str]:
    """The GPU commands describe an 8-GPU machine (one Slurm node of 8): a fake nvidia-smi (what TorchX's local
    scheduler asks) and TORCHX_DILOCO_GPUS=8 (the documented override) stand for it here."""
    import os

    from torchx_diloco._fleet.testing import cli_env

    fake = tmp_path_factory.mktemp("fakebin") / "nvidia-smi"
    fake.write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: Fake GPU (UUID: GPU-fake-$i)"; done\n')
    fake.chmod(0o755)
    env = cli_env(TORCHX_DILOCO_GPUS="8")
    env["PATH"] = f"{fake.parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def dry_runs(eight_gpu_machine) -> Dict[str, Any]:
    """Every documented `torchx run` as a real dry run, four at a time: each is mostly a Python interpreter
    starting and importing TorchX, so one after the other they cost the suite minutes."""
    from concurrent.futures import ThreadPoolExecutor

    from torchx_diloco._fleet.testing import run_cli

    def dry_run(command: str) -> Any:
        env, argv = split_command(command)
        if "--dryrun" not in argv and "--help" not in argv:
            argv.insert(2, "--dryrun")
        return run_cli(argv, cwd=REPO, env={**eight_gpu_machine, **env}, timeout=300)

    commands = sorted({c for _, c in documented_commands() if split_command(c)[1][:2] == ["torchx", "run"]})
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(commands, pool.map(dry_run, commands), strict=True))


def test_the_docs_document_commands():
    assert len(documented_commands()) >= 10


@pytest.mark.parametrize(
    "where, command", documented_commands(), ids=[f"{w}:{c[:60]}" for w, c in documented_commands()]
)
def test_every_documented_command_runs(where, command, dry_runs):
    """`torchx run` commands run for real as dry runs (TorchX builds the app, our components check every flag,
    the scheduler prints what it would start or submit); the by-hand runtime's commands are parsed by its own
    parsers with their environment. A command that drifts from the code fails here."""
    env, argv = split_command(command)
    if argv[:2] == ["torchx", "run"]:
        out = dry_runs[command]
        assert out.returncode == 0, f"{where}: {command}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        return
    module = argv[argv.index("-m") + 1]
    args = argv[argv.index("-m") + 2 :]
    if module == "torchx_diloco.train":
        from torchx_diloco.config import parse_config

        parse_config(args, env)
    elif module == "torchx_diloco.lighthouse":
        from torchx_diloco.lighthouse import parse_args

        parse_args(args)
    elif module == "torchx_diloco.prepare":
        from torchx_diloco.prepare import build_parser

        build_parser().parse_args(args)  # its flags; the inputs, tokenizer and output are examples
    elif module == "torchx_diloco.plot":
        from torchx_diloco.plot import build_parser

        build_parser().parse_args(args)
    elif module == "torchx_diloco.export":
        from torchx_diloco.export import build_parser

        build_parser().parse_args(args)  # its flags; the checkpoint folders are examples
    else:
        raise AssertionError(f"{where}: no dry run known for {module}: teach this test one")


# --- the README's way from data to a model, for real --------------------------------------------------------------
QUICK_START = "### From your text to a Hugging Face model"


def quick_start_commands() -> List[str]:
    """The commands of the README's block under QUICK_START, as a user copies them."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(QUICK_START) :]
    section = section[: section.index("\n## ")]  # up to the next section
    page = REPO / ".quick-start.md"
    try:
        page.write_text(section, encoding="utf-8")
        return shell_commands(page)
    finally:
        page.unlink()


def test_the_quick_start_block_is_found():
    commands = quick_start_commands()
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "torchx_diloco.prepare"],
        ["torchx", "run", "diloco.diloco"],
        ["python", "-m", "torchx_diloco.export"],
        ["python", "-c", '"from'],
    ], commands


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_goes_from_text_to_a_hugging_face_model_as_written(tmp_path):
    """The README's four commands, run as written in a fresh directory (which holds the package's sources, their
    input): shards and a trained tokenizer, a real `torchx run` of two groups, the export, and transformers'
    own pipeline loading the folder and generating."""
    import subprocess

    from torchx_diloco._fleet.testing import cli_env

    (tmp_path / "torchx_diloco").symlink_to(REPO / "torchx_diloco")
    env = cli_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    outputs = []
    for command in quick_start_commands():
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, f"{command}\n{outputs[-1][-4000:]}"
    assert "job finished: SUCCEEDED" in outputs[1], outputs[1][-3000:]
    assert "wrote the global weights of outer step 6" in outputs[2], outputs[2]
    assert "'generated_text': 'def " in outputs[3], outputs[3][-2000:]
    assert (tmp_path / "exported" / "code" / "tokenizer.json").exists()
