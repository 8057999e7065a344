"""Every example in examples/ runs end to end on loopback (issue 18), and type-checks
under mypy --strict as a user's code would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"chat_streams", "delta_sync_dir", "file_transfer", "request_service"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{example.name}:\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip()


def test_examples_type_check() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
