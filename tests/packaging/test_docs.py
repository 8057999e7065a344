"""The API reference and the user guide build warning-free (issue 18).

``docs/build.py`` runs pdoc with every warning an error; it runs here in its own
interpreter, as CI and a user run it (it sets warning filters and the front page).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_docs_build_warning_free_with_the_guide_and_the_api(tmp_path: Path) -> None:
    out = tmp_path / "html"
    r = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "build.py"), str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Warning" not in r.stderr, r.stderr
    front = (out / "dwcp.html").read_text()
    for heading in ("Keys and trust", "Sessions and channels", "Bulk transfers",
                    "Errors and what to do about each", "Tuning for a path"):  # fmt: skip
        assert heading in front, heading
    streams = (out / "dwcp" / "streams.html").read_text()
    assert "open_connection" in streams and "start_server" in streams
    transport = (out / "dwcp" / "transport.html").read_text()
    assert "open_bulk" in transport and "TransportConfig" in transport
    assert (out / "dwcp" / "errors.html").is_file() and (out / "search.js").is_file()
