"""The wheel a user installs (issue 18): built from this tree with ``python -m build``,
installed into a fresh venv
(the cffi modules compiled in), it runs, shows its one version, and mypy on a user's
script that imports it sees its types (py.typed).

The fresh venv gets dwcp only from the wheel; its third-party dependencies are borrowed
from the development venv through a path entry (a plain path line: that directory's own
.pth files, among them the editable install's, are not run), so the test needs no index.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

import dwcp

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(python of a fresh venv with the wheel installed, a scratch directory)."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    # python -m build, as a packager runs it (no isolation: the build needs no index)
    _run(
        sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, ROOT,
        cwd=tmp,
    )  # fmt: skip
    wheels = list(dist.glob("dwcp-*.whl"))
    assert len(wheels) == 1, wheels
    assert wheels[0].name.startswith(f"dwcp-{dwcp.__version__}-")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    fresh_site = Path(
        _run(
            py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp
        ).stdout.strip()
    )
    (fresh_site / "dev-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(
        sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheels[0],
        cwd=tmp,
    )  # fmt: skip
    work = tmp / "work"
    work.mkdir()
    return py, work


@pytest.mark.slow
def test_the_wheel_runs_from_a_fresh_venv(installed: tuple[Path, Path]) -> None:
    py, work = installed
    where = _run(py, "-c", "import dwcp, dwcp._hde, dwcp._net; print(dwcp.__file__)", cwd=work)
    assert str(ROOT) not in where.stdout  # the installed copy, not this tree
    assert Path(where.stdout.strip()).with_name("py.typed").is_file()
    dwcp_cli = py.parent / "dwcp"
    assert _run(dwcp_cli, "--version", cwd=work).stdout.split()[:2] == ["dwcp", dwcp.__version__]
    old, new = work / "old.raw", work / "new.raw"
    old.write_bytes(os.urandom(1 << 20))
    new.write_bytes(old.read_bytes()[: 1 << 19] + os.urandom(1 << 19))
    _run(dwcp_cli, "delta", new, "--base", old, "-o", work / "d.dwcpd", cwd=work)
    _run(dwcp_cli, "patch", work / "d.dwcpd", "--base", old, "-o", work / "out.raw", cwd=work)
    assert (work / "out.raw").read_bytes() == new.read_bytes()


@pytest.mark.slow
def test_mypy_sees_the_installed_types(installed: tuple[Path, Path]) -> None:
    py, work = installed
    script = work / "user.py"
    script.write_text(
        textwrap.dedent(
            """
            import dwcp.delta as hde

            manifest = hde.scan_image("vm.raw")
            size: str = manifest.size  # a user's mistake mypy must catch
            """
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--python-executable", str(py), "--no-incremental",
         "--cache-dir", str(work / ".mypy"), str(script)],
        cwd=work, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'Incompatible types in assignment (expression has type "int"' in r.stdout, r.stdout
    assert "missing library stubs or py.typed" not in r.stdout
