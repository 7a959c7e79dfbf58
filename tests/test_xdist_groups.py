"""`make test` runs two tests at a time and relies on `--dist loadgroup` to keep some on one worker: tests/conftest.py
groups the Slurm cluster's tests, netlab's and those sharing a module fixture that trains. Two ways this has silently
stopped working: pytest 9.2 with pytest-xdist 3.8 drops every group (pytest-dev/pytest-xdist#1386), and a conftest
hook that adds the marks after xdist has read them (pytest-dev/pytest-xdist#1253). This runs a scratch suite with
this repository's conftest, the way `make test` does, and checks that a group stays on one worker."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")
GROUPED_FILE = "test_slurm.py"  # in conftest.SERIAL_GROUPS
TESTS = 8  # under plain `--dist load`, 8 quick tests in each of two files are dealt to both workers


def test_the_conftest_groups_run_on_one_worker(tmp_path: Path) -> None:
    record = tmp_path / "workers"
    record.mkdir()
    assert f'"{GROUPED_FILE}": ' in CONFTEST.read_text()
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    for name in (GROUPED_FILE, "test_free.py"):
        (tmp_path / name).write_text(
            textwrap.dedent(
                f"""
                import os
                from pathlib import Path

                import pytest

                @pytest.mark.parametrize("i", range({TESTS}))
                def test_it(i):
                    (Path({str(record)!r}) / f"{name}-{{i}}").write_text(os.environ["PYTEST_XDIST_WORKER"])
                """
            )
        )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this repository's settings (timeouts, markers)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    grouped = {(record / f"{GROUPED_FILE}-{i}").read_text() for i in range(TESTS)}
    workers = {p.read_text() for p in record.iterdir()}
    assert len(workers) == 2, f"the scratch suite ran on {workers}: it cannot show a group kept together"
    assert len(grouped) == 1, (
        f"{GROUPED_FILE}'s tests ran on workers {sorted(grouped)}: --dist loadgroup did not keep tests/conftest.py's "
        "group together (the conftest hook must run before xdist's; pytest must be below 9.2 with xdist 3.8)"
    )
