"""The forwarding loop's process: runs ``dwcp_emu_run`` on two TUN fds until told to stop.

A child process (not a thread) so its CPU time is its own and it dies with its
parent: it stops when the parent closes the stop pipe or exits. Counters live in
a shared memfd, so the parent reads them live.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import subprocess
import sys
import time
from typing import Any

from dwcp._net import ffi, lib
from dwcp.errors import EmulatorError
from dwcp.netemu.params import Direction, direction_seed

REPORT_SIZE = ffi.sizeof("dwcp_emu_report")
# Above endpoints a benchmark may run at SCHED_FIFO 1 (transport_bench --rt), so the link
# keeps its timing even then.
RT_PRIORITY = 2


class Forwarder:
    """Parent-side handle of the forwarding process."""

    def __init__(
        self, fd_a: int, fd_b: int, ab: Direction, ba: Direction, seed: int, realtime: bool
    ) -> None:
        self._memfd = os.memfd_create("dwcp-netemu", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, REPORT_SIZE)
        self._mem = mmap.mmap(self._memfd, REPORT_SIZE)
        self.report: Any = ffi.from_buffer("dwcp_emu_report *", self._mem)
        stop_r, self._stop_w = os.pipe()
        spec = {"ab": ab.to_json(), "ba": ba.to_json(), "seed": seed, "realtime": realtime}
        args = [str(fd_a), str(fd_b), str(stop_r), str(self._memfd), json.dumps(spec)]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dwcp.netemu.forwarder", *args],
                pass_fds=(fd_a, fd_b, stop_r, self._memfd),
                stderr=subprocess.PIPE,
            )
        finally:
            os.close(stop_r)
        deadline = time.monotonic() + 20
        while not self.report.running:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.stop()
                raise EmulatorError(f"the link emulator's forwarder did not start: {err}")
            time.sleep(0.005)

    def stop(self) -> str:
        """Stop the loop (idempotent); return what it printed on stderr."""
        if self._stop_w >= 0:
            os.close(self._stop_w)
            self._stop_w = -1
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace").strip() if err else ""

    def close(self) -> None:
        self.stop()
        self.report = None
        self._mem.close()
        os.close(self._memfd)


def _prioritise(realtime: bool) -> None:
    """Run ahead of the endpoints so the link keeps its timing while they load the CPU.

    SCHED_FIFO cut the mean delivery lateness under load from
    ~0.7 ms to ~25 us; the loop blocks in ppoll between packets and the kernel's RT
    throttling caps it at 95% of a core. Falls back to nice -10 where RT is refused.
    """
    if realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
            return
        except (OSError, AttributeError):
            pass
    with contextlib.suppress(OSError):
        os.nice(-10)


def _main(argv: list[str]) -> int:
    fd_a, fd_b, stop_fd, memfd = (int(x) for x in argv[:4])
    spec = json.loads(argv[4])
    seed = int(spec["seed"])
    ab = Direction(**spec["ab"]).to_c(direction_seed(seed, "ab"))
    ba = Direction(**spec["ba"]).to_c(direction_seed(seed, "ba"))
    _prioritise(bool(spec.get("realtime", True)))
    mem = mmap.mmap(memfd, REPORT_SIZE)
    report = ffi.from_buffer("dwcp_emu_report *", mem)
    rc = lib.dwcp_emu_run(fd_a, fd_b, stop_fd, ab, ba, report)
    if rc < 0:
        print(f"dwcp_emu_run failed: {os.strerror(-rc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
