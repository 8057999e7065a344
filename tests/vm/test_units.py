"""The parts of dwcp.vm that need no QEMU: definitions, the QEMU command, QMP parsing,
the guest's archive and tick parsers."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import pytest

from dwcp.errors import UsageError, VmError
from dwcp.vm import definition as vmdef
from dwcp.vm import guest
from dwcp.vm.qmp import QmpClient, QmpError, QmpParser, reply_value


def test_memory_sizes() -> None:
    assert vmdef.parse_memory("256M") == 256
    assert vmdef.parse_memory("1G") == 1024
    assert vmdef.parse_memory("512") == 512
    for bad in ("lots", "1T", "8M"):
        with pytest.raises(UsageError):
            vmdef.parse_memory(bad)


def test_definition_round_trip_and_validation(tmp_path: Path) -> None:
    d = vmdef.VmDefinition("web", "web.raw", 128, 2, True, True, "console=ttyS0", ("-rtc", "utc"))
    p = vmdef.VmPaths(tmp_path / "web")
    vmdef.save(p, d)
    assert vmdef.load(p) == d
    assert not list(p.root.glob(".*tmp"))  # written through a temp file
    with pytest.raises(UsageError, match="no VM other"):
        vmdef.load(vmdef.VmPaths(tmp_path / "other"))
    with pytest.raises(UsageError):
        vmdef.VmDefinition("../x", "d")
    with pytest.raises(UsageError, match="needs a kernel"):
        vmdef.VmDefinition("x", "d", initrd=True)
    (p.definition).write_text("[1]")
    with pytest.raises(VmError, match="not a JSON object"):
        vmdef.load(p)


def test_qemu_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmdef.shutil, "which", lambda _: "/usr/bin/qemu-system-x86_64")
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"QFI\xfb" + bytes(100))
    d = vmdef.VmDefinition("vm1", "d.qcow2", kernel=True, append="quiet", qemu_args=("-x",))
    argv = vmdef.qemu_argv(d, vmdef.VmPaths(tmp_path), disk, "tcg", incoming="defer")
    s = " ".join(argv)
    assert "-accel tcg" in s and "-S" in argv and "-daemonize" in argv
    assert "driver=qcow2,file=file0,node-name=disk0" in s
    assert argv[argv.index("-incoming") + 1] == "defer"
    assert argv[-1] == "-x" and "-initrd" not in argv
    monkeypatch.setattr(vmdef.shutil, "which", lambda _: None)
    with pytest.raises(VmError, match="apt-get install qemu-system-x86"):
        vmdef.qemu_argv(d, vmdef.VmPaths(tmp_path), disk, "tcg")


def test_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_VM_ACCEL", "tcg")
    assert vmdef.detect_accel() == "tcg"


def test_qmp_parser() -> None:
    p = QmpParser()
    assert p.feed_line(b'{"QMP": {"version": {}}}\n') == ("greeting", {"QMP": {"version": {}}})
    assert p.feed_line(b"\n") is None
    kind, ev = p.feed_line(b'{"event": "STOP", "timestamp": {}}') or ("", {})
    assert kind == "event" and list(p.events) == [ev]
    with pytest.raises(VmError):
        p.feed_line(b"not json")
    assert reply_value("x", {"return": {"a": 1}}) == {"a": 1}
    with pytest.raises(QmpError, match="QEMU refused migrate: no way"):
        reply_value("migrate", {"error": {"class": "GenericError", "desc": "no way"}})


async def _fake_qemu(path: Path, replies: list[bytes]) -> asyncio.Server:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        for extra in replies:
            line = await r.readline()
            if not line:
                break
            msg = json.loads(line)
            w.write(extra.replace(b"ID", str(msg["id"]).encode()))
            await w.drain()
        w.close()

    return await asyncio.start_unix_server(serve, str(path))


def test_qmp_client_against_a_fake_qemu(tmp_path: Path) -> None:
    async def main() -> None:
        sock = tmp_path / "q.sock"
        server = await _fake_qemu(
            sock,
            [
                b'{"return": {}, "id": ID}\n',
                b'{"event": "RESUME", "data": {}}\n{"return": {"status": "running"}, "id": ID}\n',
                b'{"error": {"class": "GenericError", "desc": "bad"}, "id": ID}\n',
            ],
        )
        async with server:
            c = await QmpClient.connect(str(sock))
            assert await c.execute("query-status") == {"status": "running"}
            ev = await c.wait_event("RESUME", timeout=5)
            assert ev["event"] == "RESUME"
            with pytest.raises(QmpError, match="bad"):
                await c.execute("cont")
            assert await c.wait_closed(5)  # the fake QEMU hung up
            with pytest.raises(VmError, match="gone"):
                await c.execute("query-status")
            await c.close()

    asyncio.run(main())


def test_initrd_archive_and_tick_parsers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF fake")
    monkeypatch.setattr(guest, "BUSYBOX", bb)
    mods = tmp_path / "drivers"
    for m in guest.MODULES:
        (mods / m).parent.mkdir(parents=True, exist_ok=True)
        (mods / m).write_bytes(b"mod " + m.encode())
    out = guest.build_initrd(mods, tmp_path / "initrd.gz", interval=0.25)
    cpio = gzip.decompress(out.read_bytes())
    assert cpio.startswith(b"070701") and b"TRAILER!!!" in cpio
    assert b"sleep 0.25" in cpio and b"virtio_blk.ko" in cpio and b"\x7fELF fake" in cpio
    log = b"boot noise\nTICK 1 3.10 abcd\nTICK 2 3.60 abcd\n"
    assert guest.console_ticks(log) == [(1, "abcd"), (2, "abcd")]
    disk = bytearray(512 * 8)
    for n in (1, 2, 5):
        rec = f"TICK {n} 1.0 abcd".ljust(511).encode() + b"\n"
        disk[n * 512 : n * 512 + 512] = rec
    assert guest.disk_ticks(bytes(disk)) == {1: "abcd", 2: "abcd", 5: "abcd"}
