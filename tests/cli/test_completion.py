"""``dwcp completion bash`` (issue 16): a script bash accepts that completes the real
commands and flags (generated from the parser, so a new command completes at once)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dwcp.cli import command_modules, main


def _script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_commands_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script("bash", capsys)
    probe = (
        script
        + "\nf=$(complete -p dwcp | sed -E 's/.* -F ([^ ]+) .*/\\1/')"
        + "\nCOMP_WORDS=(dwcp mi); COMP_CWORD=1; COMP_LINE='dwcp mi'; COMP_POINT=7; $f"
        + '\necho "A:${COMPREPLY[*]}"'
        + "\nCOMP_WORDS=(dwcp pull --d); COMP_CWORD=2; COMP_LINE='dwcp pull --d'; COMP_POINT=13; $f"
        + '\necho "B:${COMPREPLY[*]}"\n'
    )
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines() if line[:2] in ("A:", "B:"))
    assert set(lines["A"].split()) == {"migrate"}
    assert "--dry-run" in lines["B"].split()


def test_every_command_is_in_every_script(capsys: pytest.CaptureFixture[str]) -> None:
    names = {m.removesuffix("_cmd") for m in command_modules()}
    assert {"migrate", "pull", "vm", "completion"} <= names
    for shell in ("bash", "zsh"):
        script = _script(shell, capsys)
        assert all(n in script for n in names), shell


def test_an_unknown_shell_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["completion", "fish"])
    assert e.value.code == 2
