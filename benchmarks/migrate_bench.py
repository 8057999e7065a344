"""Migration benchmark: ``dwcp migrate`` against rsync over an emulated WAN link.

Two network namespaces joined by ``dwcp.netemu.Link`` (default 100 Mbit/s,
50 ms RTT, 0.5% loss, seeded). Side a is the source (dwcp node a, rsync
client); side b the destination (dwcp node b, rsync daemon over TCP). Three
cases, in one run, each tool starting from the same destination state:

- cold:  the destination has nothing;
- warm:  the destination has the previous version (``vm.img``) of the image;
- cross: a different image (another ext4 file system sharing half its files
  with the first) goes to a new name. rsync needs a basis file of the same name
  to delta against, so it is given a copy of the stored image at the new name
  (its best case; without it, it sends the whole image).

rsync runs as ``rsync --no-whole-file -z`` (delta + zlib, as an operator would
over a WAN). With ``--big`` it runs the sparse cell instead (``big_cell``): a
64 GiB sparse image holding 4 GiB of data, cold then warm after 2% of the data
changed, and reports the peak RSS (VmHWM) of both node processes. Wall time
is the client command's; link bytes are what crossed the emulated link both
ways (headers, acks and retransmissions included). The destination's SHA-256
is checked after every transfer.

    python benchmarks/migrate_bench.py [--size MiB] [--data MiB] [--json]
    python benchmarks/migrate_bench.py --big [--big-size GiB] [--big-data MiB] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dwcp.demo import build_ext4, modify_ext4, sha256_file, stage_tree
from dwcp.netemu import ADDR_A, ADDR_B, Link, unavailable_reason
from dwcp.node import control
from dwcp.node.config import load_config

MiB = 1 << 20
PY = sys.executable
RSYNC_PORT = 8873
TIMEOUT = 900


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_images(work: Path, size_mib: int, data_mib: int) -> dict[str, Path]:
    tree, extra, other = work / "tree", work / "extra", work / "other"
    stage_tree(tree, data_mib * MiB, seed=0)
    stage_tree(
        extra, max(1, data_mib // 16) * MiB, sources=("/usr/share/locale", "/usr/bin"), seed=7
    )
    # The cross image: every second file of the first tree, plus as much new data.
    other.mkdir()
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    for i, p in enumerate(files[::2]):
        (other / f"{i:05d}-{p.name}").write_bytes(p.read_bytes())
    stage_tree(
        other / "new", data_mib // 2 * MiB, sources=("/usr/share/doc", "/usr/include"), seed=3
    )
    v1, v2, cross = work / "vm-v1.img", work / "vm-v2.img", work / "other.img"
    build_ext4(v1, size_mib, tree)
    modify_ext4(v1, v2, extra)
    build_ext4(cross, size_mib, other)
    for d in (tree, extra, other):
        shutil.rmtree(d)
    return {"v1": v1, "v2": v2, "cross": cross}


def link_bytes(link: Link) -> int:
    s = link.stats()
    return int(s.ab.tx_bytes + s.ba.tx_bytes)


def link_loss(link: Link) -> tuple[int, int]:
    """(packets offered to the link, packets it dropped at random), both directions."""
    s = link.stats()
    return int(s.ab.rx_packets + s.ba.rx_packets), int(s.ab.lost + s.ba.lost)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dwcp(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [PY, "-m", "dwcp.cli", *args], capture_output=True, text=True, timeout=TIMEOUT
    )
    if r.returncode:
        raise SystemExit(f"dwcp {' '.join(args)} failed: {r.stderr}")
    return r


class Nodes:
    """dwcp nodes a (in namespace a) and b (in namespace b)."""

    def __init__(self, link: Link, work: Path) -> None:
        self.link = link
        self.cfg: dict[str, Path] = {}
        keys: dict[str, str] = {}
        ports = {"a": free_port(), "b": free_port()}
        addrs = {"a": ADDR_A, "b": ADDR_B}
        for side in ("a", "b"):
            out = dwcp("init", str(work / side), "--listen", f"{addrs[side]}:{ports[side]}")
            keys[side] = out.stdout.strip().splitlines()[-1]
            self.cfg[side] = work / side / "node.toml"
        for me, peer in (("a", "b"), ("b", "a")):
            dwcp(
                "--config",
                str(self.cfg[me]),
                "peers",
                "add",
                peer,
                f"{addrs[peer]}:{ports[peer]}",
                keys[peer],
            )
        self.procs = {}
        for side in ("a", "b"):
            errf = open(work / f"{side}.log", "ab")  # noqa: SIM115 - closed with the process
            self.procs[side] = link.popen(
                side,
                [PY, "-m", "dwcp.node", "--config", str(self.cfg[side])],
                stdout=subprocess.DEVNULL,
                stderr=errf,
            )
            sock = load_config(self.cfg[side]).control_path
            for _ in range(600):
                try:
                    control.call(sock, "status", timeout=10)
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise SystemExit(f"node {side} did not start: {(work / f'{side}.log').read_text()}")
        self.images_b = work / "b" / "data" / "images"

    def migrate(self, image: Path, name: str) -> dict[str, Any]:
        r = dwcp(
            "--config",
            str(self.cfg["a"]),
            "migrate",
            str(image),
            "--to",
            "b",
            "--name",
            name,
            "--force",  # the warm case replaces the previous version, from another file
            "--json",
        )
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
            p.wait(timeout=60)


class Rsyncd:
    def __init__(self, link: Link, work: Path) -> None:
        self.dest = work / "rsync-dest"
        self.dest.mkdir()
        conf = work / "rsyncd.conf"
        conf.write_text(
            f"use chroot = no\nuid = root\ngid = root\npid file = {work}/rsyncd.pid\n"
            f"[dst]\npath = {self.dest}\nread only = no\n"
        )
        self.proc = link.popen(
            "b",
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={RSYNC_PORT}",
                f"--address={ADDR_B}",
            ],
        )
        for _ in range(100):
            r = link.run_in_a(["rsync", f"rsync://{ADDR_B}:{RSYNC_PORT}/"], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit("rsync daemon did not start")

    def push(self, link: Link, image: Path, name: str) -> subprocess.CompletedProcess[str]:
        r = link.run_in_a(
            [
                "rsync",
                "--no-whole-file",
                "-z",
                "--stats",
                str(image),
                f"rsync://{ADDR_B}:{RSYNC_PORT}/dst/{name}",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if r.returncode:
            raise SystemExit(f"rsync failed: {r.stderr}")
        return r

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def timed(fn: Any, link: Link) -> tuple[float, int, Any, float]:
    """Wall time, link bytes, the result, and the random-loss rate the run saw."""
    b0, (p0, l0) = link_bytes(link), link_loss(link)
    t0 = time.monotonic()
    out = fn()
    elapsed = time.monotonic() - t0
    p1, l1 = link_loss(link)
    return elapsed, link_bytes(link) - b0, out, (l1 - l0) / max(1, p1 - p0)


GiB = 1 << 30
BLOCK = 4096
ISLANDS = 64


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size of process ``pid`` (VmHWM, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for process {pid}")


def _half_random(rng: random.Random, nbytes: int) -> bytes:
    """``nbytes`` where every 4 KiB block is 2 KiB of random bytes then 2 KiB of zeros:
    each block non-zero and unique, and the data compresses about 2x, as VM disks do."""
    buf = bytearray(nbytes)
    rnd = rng.randbytes(nbytes // 2)
    half = BLOCK // 2
    for i in range(nbytes // BLOCK):
        buf[i * BLOCK : i * BLOCK + half] = rnd[i * half : (i + 1) * half]
    return bytes(buf)


def make_sparse_image(path: Path, size: int, data: int, seed: int) -> list[tuple[int, int]]:
    """A ``size``-byte sparse file holding ``data`` bytes in ``ISLANDS`` evenly spaced
    islands (the rest a hole); returns the islands as (offset, length)."""
    rng = random.Random(seed)
    island = data // ISLANDS // BLOCK * BLOCK
    stride = size // ISLANDS // BLOCK * BLOCK
    if island > stride or island == 0:
        raise SystemExit(f"--big-data {data} does not fit {ISLANDS} islands in {size} bytes")
    islands = [(k * stride + stride // 4 // BLOCK * BLOCK, island) for k in range(ISLANDS)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in islands:
            f.seek(off)
            for pos in range(0, length, 8 * MiB):
                f.write(_half_random(rng, min(8 * MiB, length - pos)))
    return islands


def change_sparse_image(
    path: Path, islands: list[tuple[int, int]], fraction: float, seed: int
) -> int:
    """Overwrite ``fraction`` of the data in place, in 64 KiB extents at random places
    in the islands (as a running VM writes); returns the bytes changed (an upper bound:
    extents may overlap)."""
    rng = random.Random(seed)
    extent = 64 * 1024
    total = sum(n for _, n in islands)
    count = max(1, int(total * fraction) // extent)
    with open(path, "r+b") as f:
        for _ in range(count):
            off, length = islands[rng.randrange(len(islands))]
            f.seek(off + rng.randrange(length // extent) * extent)
            f.write(_half_random(rng, extent))
        f.flush()
        os.fsync(f.fileno())
    return count * extent


def big_cell(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Cold then warm migration of a large sparse image; wall time, link bytes and the
    peak RSS of each node process after each case."""
    size, data = args.big_size * GiB, args.big_data * MiB
    image = work / "big.img"
    log(f"big: writing a {args.big_size} GiB sparse image with {args.big_data} MiB of data")
    islands = make_sparse_image(image, size, data, args.seed)
    rows: list[dict[str, Any]] = []
    with Link(rate_bps=args.rate, delay_ms=args.rtt / 2, loss=args.loss, seed=args.seed) as link:
        nodes = Nodes(link, work)
        try:
            changed = 0
            for case in ("cold", "warm"):
                if case == "warm":
                    changed = change_sparse_image(image, islands, 0.02, args.seed + 1)
                want = sha256_file(image)
                log(f"big {case}: dwcp migrate {image.name}")
                d_t, d_link, res, d_loss = timed(lambda: nodes.migrate(image, "big.img"), link)
                got = nodes.images_b / "big.img"
                ok = got.stat().st_size == size and sha256_file(got) == want == res["sha256"]
                if not ok:
                    raise SystemExit(f"big {case}: the stored image differs from the source")
                rss = {s: vm_hwm_kib(p.pid) for s, p in nodes.procs.items()}
                rows.append(
                    {
                        "case": f"big-{case}",
                        "image_bytes": size,
                        "data_bytes": data,
                        "changed_bytes": changed,
                        "missing_bytes": res["bytes_missing"],
                        "dwcp_s": round(d_t, 2),
                        "dwcp_link_bytes": d_link,
                        "dwcp_app_bytes": res["bytes_wire"],
                        "dwcp_loss": round(d_loss, 4),
                        "peak_rss_mib_a": round(rss["a"] / 1024, 1),
                        "peak_rss_mib_b": round(rss["b"] / 1024, 1),
                        "sha256_ok": True,
                    }
                )
        finally:
            nodes.stop()
    return {"rows": rows}


def print_big(args: argparse.Namespace, out: dict[str, Any]) -> None:
    print(
        f"link: {args.rate / 1e6:.0f} Mbit/s, {args.rtt:.0f} ms RTT, {args.loss:.1%} loss; "
        f"{args.big_size} GiB sparse image with {args.big_data} MiB of data "
        "(each block half random), warm after 2% of the data changed"
    )
    print(
        f"{'case':<9} {'missing':>10} {'dwcp s':>8} {'link MB':>9} {'MB/s':>7} "
        f"{'RSS a MiB':>10} {'RSS b MiB':>10}"
    )
    for r in out["rows"]:
        print(
            f"{r['case']:<9} {r['missing_bytes'] / 1e6:>9.1f}M {r['dwcp_s']:>8.2f} "
            f"{r['dwcp_link_bytes'] / 1e6:>9.2f} {r['missing_bytes'] / 1e6 / r['dwcp_s']:>7.1f} "
            f"{r['peak_rss_mib_a']:>10.1f} {r['peak_rss_mib_b']:>10.1f}"
        )
    print("RSS: each node process's VmHWM (peak since it started) after the case; SHA-256 verified")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="image size, MiB (default 256)")
    ap.add_argument("--data", type=int, default=110, help="MiB of files in it (default 110)")
    ap.add_argument("--rate", type=float, default=100e6, help="link rate, bit/s")
    ap.add_argument("--rtt", type=float, default=50.0, help="round-trip time, ms")
    ap.add_argument("--loss", type=float, default=0.005, help="loss rate per direction")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    ap.add_argument("--big", action="store_true", help="run the large sparse image cell only")
    ap.add_argument("--big-size", type=int, default=64, help="sparse image size, GiB (64)")
    ap.add_argument("--big-data", type=int, default=4096, help="MiB of data in it (4096)")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        log(f"migrate_bench: skipped: the link emulator is unavailable ({reason})")
        if args.json:
            print(json.dumps({"skipped": reason}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="dwcp-migrate-bench-"))
    os.chmod(work, 0o755)
    if args.big:
        try:
            out = big_cell(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print_big(args, out)
        if args.json:
            link = {"rate_bps": args.rate, "rtt_ms": args.rtt, "loss": args.loss}
            print(json.dumps({"link": link, "big_size_gib": args.big_size, **out}))
        return 0
    rows: list[dict[str, Any]] = []
    try:
        log(f"building images ({args.size} MiB ext4, ~{args.data} MiB of files) in {work}")
        imgs = make_images(work, args.size, args.data)
        with Link(
            rate_bps=args.rate, delay_ms=args.rtt / 2, loss=args.loss, seed=args.seed
        ) as link:
            nodes = Nodes(link, work)
            rsyncd = Rsyncd(link, work)
            try:
                cases = [
                    ("cold", imgs["v1"], "vm.img"),
                    ("warm", imgs["v2"], "vm.img"),
                    ("cross", imgs["cross"], "other.img"),
                ]
                for case, image, name in cases:
                    want = sha256_file(image)
                    log(f"{case}: dwcp migrate {image.name}")
                    d_t, d_link, res, d_loss = timed(
                        lambda i=image, n=name: nodes.migrate(i, n), link
                    )
                    ok_d = sha256_file(nodes.images_b / name) == want == res["sha256"]
                    if case == "cross":  # rsync's best case: a basis file under the new name
                        shutil.copyfile(rsyncd.dest / "vm.img", rsyncd.dest / name)
                    log(f"{case}: rsync {image.name}")
                    r_t, r_link, _, r_loss = timed(
                        lambda i=image, n=name: rsyncd.push(link, i, n), link
                    )
                    ok_r = sha256_file(rsyncd.dest / name) == want
                    if not (ok_d and ok_r):
                        raise SystemExit(f"{case}: SHA-256 mismatch (dwcp {ok_d}, rsync {ok_r})")
                    rows.append(
                        {
                            "case": case,
                            "image_bytes": image.stat().st_size,
                            "missing_bytes": res["bytes_missing"],
                            "dwcp_s": round(d_t, 2),
                            "dwcp_link_bytes": d_link,
                            "dwcp_app_bytes": res["bytes_wire"],
                            "rsync_s": round(r_t, 2),
                            "rsync_link_bytes": r_link,
                            "time_ratio": round(d_t / r_t, 3),
                            "bytes_ratio": round(d_link / r_link, 3) if r_link else None,
                            "dwcp_loss": round(d_loss, 4),
                            "rsync_loss": round(r_loss, 4),
                            "sha256_ok": True,
                        }
                    )
            finally:
                rsyncd.stop()
                nodes.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"link: {args.rate / 1e6:.0f} Mbit/s, {args.rtt:.0f} ms RTT, {args.loss:.1%} loss; "
        f"image {args.size} MiB ext4 with ~{args.data} MiB of files"
    )
    print(
        f"{'case':<6} {'missing':>9} {'dwcp s':>8} {'dwcp MB':>9} {'rsync s':>8} "
        f"{'rsync MB':>9} {'time x':>7} {'bytes x':>8}"
    )
    for r in rows:
        print(
            f"{r['case']:<6} {r['missing_bytes'] / 1e6:>8.1f}M {r['dwcp_s']:>8.2f} "
            f"{r['dwcp_link_bytes'] / 1e6:>9.2f} {r['rsync_s']:>8.2f} "
            f"{r['rsync_link_bytes'] / 1e6:>9.2f} {r['time_ratio']:>7.3f} "
            f"{r['bytes_ratio'] if r['bytes_ratio'] is not None else '-':>8}"
        )
    print("time x / bytes x: dwcp over rsync (lower is better); SHA-256 verified for every row")
    print(
        "random loss seen: "
        + ", ".join(
            f"{r['case']} dwcp {r['dwcp_loss']:.2%} rsync {r['rsync_loss']:.2%}" for r in rows
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    "link": {"rate_bps": args.rate, "rtt_ms": args.rtt, "loss": args.loss},
                    "size_mib": args.size,
                    "data_mib": args.data,
                    "rows": rows,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
