"""``dwcp migrate --progress`` without a terminal (issue 16): plain lines on stderr
(no ANSI codes, binary units), one per phase at least; ``--quiet`` prints none."""

from __future__ import annotations

import json
import re
from pathlib import Path

from node.cluster import NodeProc, make_image

LINE = re.compile(
    r"^vm\.raw -> b: sending, [0-9.]+ (B|KiB|MiB) of [0-9.]+ (B|KiB|MiB) sent, "
    r"[0-9.]+ (B|KiB|MiB)/s on the wire, [0-9.]+% already there"
)


def test_progress_without_a_terminal_is_plain_lines_and_quiet_is_silent(tmp_path: Path) -> None:
    a, b = NodeProc(tmp_path, "a"), NodeProc(tmp_path, "b")
    a.trust(b)
    b.trust(a)
    img = tmp_path / "vm.raw"
    make_image(img, 4, seed=3)
    a.start()
    b.start()
    try:
        r = a.cli("migrate", str(img), "--to", "b", "--progress", "--bwlimit", "1M", "--json")
        assert "\x1b" not in r.stderr and "\r" not in r.stderr
        lines = r.stderr.splitlines()
        assert lines and all(line.startswith("vm.raw -> b: ") for line in lines), r.stderr
        assert any(LINE.match(line) for line in lines), r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["name"] == "vm.raw"
        q = a.cli("migrate", str(img), "--to", "b", "--name", "v2.raw", "--quiet")
        assert q.stderr == "" and "migrated v2.raw to b" in q.stdout
        plain = a.cli("migrate", str(img), "--to", "b", "--name", "v3.raw")
        assert plain.stderr == ""  # no terminal and no --progress: nothing on stderr
    finally:
        a.stop()
        b.stop()
