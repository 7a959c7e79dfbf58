"""`make test` runs two tests at a time and relies on `--dist loadgroup` to keep some on one worker (tests/conftest.py:
the Slurm cluster's nodes, netlab's namespaces, module fixtures that train). pytest 9.2 with pytest-xdist 3.8 drops
the groups without a word (pytest-dev/pytest-xdist#1386): this runs a scratch suite the way `make test` does and
checks that a group stays on one worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

GROUPED = 8  # under plain `--dist load`, 8 quick tests of 16 are dealt to both workers


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    record = tmp_path / "workers"
    record.mkdir()
    body = textwrap.dedent(
        f"""
        import os
        from pathlib import Path

        import pytest

        @pytest.mark.xdist_group("shared")
        @pytest.mark.parametrize("i", range({GROUPED}))
        def test_grouped(i):
            (Path({str(record)!r}) / f"grouped-{{i}}").write_text(os.environ["PYTEST_XDIST_WORKER"])

        @pytest.mark.parametrize("i", range({GROUPED}))
        def test_free(i):
            (Path({str(record)!r}) / f"free-{{i}}").write_text(os.environ["PYTEST_XDIST_WORKER"])
        """
    )
    (tmp_path / "test_scratch.py").write_text(body)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this repository's settings (timeouts, markers)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    grouped = {(record / f"grouped-{i}").read_text() for i in range(GROUPED)}
    workers = {p.read_text() for p in record.iterdir()}
    assert len(workers) == 2, f"the scratch suite ran on {workers}: it cannot show a group kept together"
    assert len(grouped) == 1, (
        f"an xdist_group ran on workers {sorted(grouped)}: this pytest/pytest-xdist pair ignores --dist loadgroup "
        "(pytest-dev/pytest-xdist#1386); keep the pins in pyproject.toml's test extra"
    )
