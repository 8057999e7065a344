"""Node configuration (``node.toml``): read with tomllib, validated once, then frozen.

Every error names the file, the key and what was expected, so an operator can
fix the file without reading code. Paths in the file are relative to the file's
directory, so a node directory can be moved as a whole. ``dwcp peers add``
appends a ``[[peers]]`` table instead of rewriting the file, which keeps the
operator's comments.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwcp import rates
from dwcp.errors import ConfigError, KeyFileError
from dwcp.identity import PublicKey

DEFAULT_PORT = 7400
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT`` pair; IPv6 hosts are written ``[::1]:7400``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Peer:
    """A trusted peer: its name for the CLI, where it listens and its public key."""

    name: str
    address: Address
    public_key: PublicKey


@dataclass(frozen=True)
class Limits:
    """Resource limits; defaults suit a small node."""

    max_transfers: int = 4
    drain_seconds: float = 10.0
    bwlimit: int = 0  # bytes per second for outgoing migrations; 0 = unlimited
    level: int = 3  # zstd level for outgoing data
    max_image_bytes: int = 4 * 1024**4  # largest incoming image accepted
    # Memory all incoming transfers together may hold for manifests and plans (16 bytes
    # per 4 KiB of image data): 512 MiB is enough for 128 GiB of data at once.
    transfer_memory: int = 512 * 1024**2
    idle_timeout: float = 30.0  # seconds of peer silence before a session is declared lost
    partial_max_age_days: float = 7.0  # unfinished incoming transfers idle longer are removed


@dataclass(frozen=True)
class Consensus:
    """``[consensus]``: the PBFT cluster (ACP) that records which node owns each VM."""

    cluster: Path  # cluster file written by 'dwcp cluster init'
    replica: int | None = None  # this node also runs replica N of that cluster
    timeout: float = 30.0  # seconds to wait for a quorum before a migration fails


@dataclass(frozen=True)
class NodeConfig:
    """The validated contents of one ``node.toml``."""

    path: Path
    listen: Address
    key_path: Path
    data_dir: Path
    control_path: Path
    metrics_listen: Address | None = None
    name: str = "node"
    limits: Limits = field(default_factory=Limits)
    peers: tuple[Peer, ...] = ()
    consensus: Consensus | None = None

    def peer(self, name: str) -> Peer:
        """The trusted peer called ``name``; ``ConfigError`` listing the known ones otherwise."""
        for p in self.peers:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.peers) or "none"
        raise ConfigError(
            f"unknown peer {name!r} in {self.path} (known: {known}); "
            f"add it with 'dwcp --config {self.path} peers add {name} HOST:PORT PUBKEY'"
        )

    def peer_by_key(self, key: bytes) -> Peer | None:
        for p in self.peers:
            if p.public_key.raw == key:
                return p
        return None


def parse_address(text: str, *, default_port: int | None = DEFAULT_PORT) -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT``); raise ``ValueError`` saying what is expected."""
    text = text.strip()
    host, sep, port_s = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        end = text.index("]")
        host, rest = text[1:end], text[end + 1 :]
        sep, port_s = (":", rest[1:]) if rest.startswith(":") else ("", "")
    elif not sep or ":" in host:
        host, port_s = text, ""
    if not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not port_s:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT with a port, got {text!r}")
        return Address(host, default_port)
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"expected a port 1-65535 in {text!r}")
    return Address(host, int(port_s))


def parse_rate(value: str | int | float) -> int:
    """A rate in node.toml: ``dwcp.rates.parse_rate`` with a bare number in bytes/s."""
    return rates.parse_rate(value, bare=1)


class _Reader:
    """Typed access to one TOML table with errors naming file and key."""

    def __init__(self, path: Path, table: Mapping[str, Any], prefix: str) -> None:
        self.path, self.table, self.prefix = path, table, prefix

    def fail(self, key: str, expected: str, got: object = None) -> ConfigError:
        where = f"{self.prefix}.{key}" if self.prefix else key
        got_s = "" if got is None else f", got {got!r}"
        return ConfigError(f"{self.path}: {where}: expected {expected}{got_s}")

    def text(self, key: str, default: str | None = None) -> str:
        v = self.table.get(key, default)
        if not isinstance(v, str) or not v:
            raise self.fail(key, "a non-empty string", v)
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(key, f"an integer from {lo} to {hi}", v)
        return v

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise self.fail(key, f"a number from {lo} to {hi}", v)
        return float(v)

    def address(self, key: str, default: str | None = None) -> Address:
        v = self.text(key, default)
        try:
            return parse_address(v)
        except ValueError as exc:
            raise self.fail(key, f"HOST:PORT ({exc})") from None

    def rel_path(self, key: str, default: str, base: Path) -> Path:
        return (base / self.text(key, default)).resolve()

    def check_keys(self, allowed: set[str]) -> None:
        for k in self.table:
            if k not in allowed:
                raise self.fail(k, f"one of the known keys {sorted(allowed)}", "unknown key")


def _table(path: Path, doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"{path}: [{key}]: expected a table")
    return v


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate ``node.toml``; raise ``ConfigError`` naming file, key and expectation."""
    p = Path(path).resolve()
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no such config file; create one with 'dwcp init DIR --listen HOST:PORT'"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    for k in doc:
        if k not in ("node", "limits", "peers", "consensus"):
            raise ConfigError(
                f"{p}: [{k}]: unknown section; expected [node], [limits], [consensus], [[peers]]"
            )
    base = p.parent
    node = _Reader(p, _table(p, doc, "node"), "node")
    node.check_keys({"name", "listen", "key", "data_dir", "control", "metrics_listen"})
    name = node.text("name", "node")
    if not NAME_RE.match(name):
        raise node.fail("name", "letters, digits, '.', '_' or '-' (at most 64)", name)
    data_dir = node.rel_path("data_dir", "data", base)
    metrics = node.address("metrics_listen") if "metrics_listen" in node.table else None
    lim = _Reader(p, _table(p, doc, "limits"), "limits")
    lim.check_keys(
        {
            "max_transfers",
            "drain_seconds",
            "bwlimit",
            "level",
            "max_image_bytes",
            "transfer_memory",
            "idle_timeout",
            "partial_max_age_days",
        }
    )
    raw_bw = lim.table.get("bwlimit", 0)
    try:
        bwlimit = parse_rate(raw_bw)
    except ValueError as exc:
        raise lim.fail("bwlimit", str(exc).removeprefix("expected ")) from None
    limits = Limits(
        max_transfers=lim.integer("max_transfers", 4, 1, 256),
        drain_seconds=lim.number("drain_seconds", 10.0, 0.0, 3600.0),
        bwlimit=bwlimit,
        level=lim.integer("level", 3, -7, 19),
        max_image_bytes=lim.integer("max_image_bytes", 4 * 1024**4, 1, 2**62),
        transfer_memory=lim.integer("transfer_memory", 512 * 1024**2, 1, 2**62),
        idle_timeout=lim.number("idle_timeout", 30.0, 1.0, 3600.0),
        partial_max_age_days=lim.number("partial_max_age_days", 7.0, 0.0, 3650.0),
    )
    control = node.rel_path("control", str(data_dir / "control.sock"), base)
    key_path = node.rel_path("key", "node.key", base)
    _check_kind(node, "control", control, stat.S_ISSOCK, "a socket")
    _check_kind(node, "data_dir", data_dir, stat.S_ISDIR, "a directory")
    _check_kind(node, "key", key_path, stat.S_ISREG, "a regular file")
    return NodeConfig(
        path=p,
        listen=node.address("listen"),
        key_path=key_path,
        data_dir=data_dir,
        control_path=control,
        metrics_listen=metrics,
        name=name,
        limits=limits,
        peers=_load_peers(p, doc.get("peers", [])),
        consensus=_load_consensus(p, doc) if "consensus" in doc else None,
    )


def _check_kind(r: _Reader, key: str, path: Path, ok: Callable[[int], bool], noun: str) -> None:
    """A path the node creates or uses must be of its kind if it exists: the node never
    removes or replaces a file it did not create."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(
            f"{r.path}: {r.prefix}.{key}: cannot inspect {path}: {exc.strerror}"
        ) from None
    if not ok(st.st_mode):
        raise ConfigError(
            f"{r.path}: {r.prefix}.{key}: {path} exists and is not {noun}; the node never "
            "removes or replaces a file it did not create: choose another path"
        )


def _load_consensus(p: Path, doc: Mapping[str, Any]) -> Consensus:
    r = _Reader(p, _table(p, doc, "consensus"), "consensus")
    r.check_keys({"cluster", "replica", "timeout"})
    cluster = (p.parent / r.text("cluster")).resolve()
    if not cluster.is_file():
        raise r.fail("cluster", "an existing cluster file (see 'dwcp cluster init')", str(cluster))
    replica = r.integer("replica", 0, 0, 1000) if "replica" in r.table else None
    return Consensus(cluster, replica, r.number("timeout", 30.0, 0.1, 3600.0))


def _load_peers(p: Path, raw: object) -> tuple[Peer, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{p}: peers: expected [[peers]] tables")
    peers: list[Peer] = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ConfigError(f"{p}: peers[{i}]: expected a table")
        r = _Reader(p, t, f"peers[{i}]")
        r.check_keys({"name", "address", "public_key"})
        name = r.text("name")
        if not NAME_RE.match(name):
            raise r.fail("name", "letters, digits, '.', '_' or '-' (at most 64)", name)
        try:
            key = PublicKey.parse(r.text("public_key"))
        except KeyFileError as exc:
            raise r.fail("public_key", f"'ed25519:<base64>' ({exc})") from None
        for q in peers:
            if q.name == name:
                raise r.fail("name", "a name not used by another peer", name)
            if q.public_key == key:
                raise r.fail("public_key", f"a key not already trusted as peer {q.name!r}")
        peers.append(Peer(name, r.address("address"), key))
    return tuple(peers)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def starter_config(listen: Address, name: str) -> str:
    """The text ``dwcp init`` writes: every key, commented where it has a default."""
    return f"""# dwcp node configuration (read by dwcp-node and the dwcp CLI).
# Paths are relative to this file's directory.

[node]
name = {_toml_str(name)}
listen = {_toml_str(str(listen))}
key = "node.key"
data_dir = "data"
# control = "data/control.sock"      # local control socket (mode 0600)
# metrics_listen = "127.0.0.1:9400"  # Prometheus /metrics over HTTP

[limits]
max_transfers = 4      # concurrent migrations, in and out
drain_seconds = 10     # SIGTERM: how long transfers get to stop cleanly
bwlimit = 0            # outgoing bytes/s (0 = unlimited; 10M = 10 MiB/s, 100Mbit)
level = 3              # zstd level of outgoing data
idle_timeout = 30      # seconds of peer silence before a transfer counts as interrupted
# transfer_memory = 536870912  # bytes incoming transfers may hold together (manifests,
#                              # 16 bytes per 4 KiB of image data); larger ones are refused

# VM ownership through a PBFT cluster (optional; see 'dwcp cluster init'):
# [consensus]
# cluster = "cluster.json"   # the cluster file shared by every member
# replica = 0                # this node also runs replica 0 (its key is listed there)
# timeout = 30               # seconds to wait for a quorum

# Trusted peers: added with 'dwcp --config node.toml peers add NAME HOST:PORT PUBKEY'.
"""


def append_peer(config: NodeConfig, name: str, address: str, public_key: str) -> Peer:
    """Validate a new peer and append it as a ``[[peers]]`` table; return it."""
    if not NAME_RE.match(name):
        raise ConfigError(f"peer name {name!r}: expected letters, digits, '.', '_' or '-'")
    try:
        addr = parse_address(address)
    except ValueError as exc:
        raise ConfigError(f"peer address: {exc}") from None
    key = PublicKey.parse(public_key)
    for q in config.peers:
        if q.name == name:
            raise ConfigError(
                f"{config.path}: a peer named {name!r} already exists; "
                "edit or delete its [[peers]] table first"
            )
        if q.public_key == key:
            raise ConfigError(f"{config.path}: this key is already trusted as peer {q.name!r}")
    block = (
        f"\n[[peers]]\nname = {_toml_str(name)}\naddress = {_toml_str(str(addr))}\n"
        f"public_key = {_toml_str(key.text)}\n"
    )
    with open(config.path, "a", encoding="utf-8") as f:
        f.write(block)
    load_config(config.path)  # the file must still be valid
    return Peer(name, addr, key)


def remove_peer(config: NodeConfig, name: str) -> Peer:
    """Delete the ``[[peers]]`` table named ``name`` from the config file; return the peer.

    The rest of the file (comments, other tables) is kept as written; the new text is
    checked by loading it, then replaces the file by temp file, fsync and rename.
    """
    gone = next((p for p in config.peers if p.name == name), None)
    if gone is None:
        known = ", ".join(p.name for p in config.peers) or "none"
        raise ConfigError(f"{config.path}: no peer named {name!r} (peers: {known})")
    lines = config.path.read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")] + [len(lines)]
    keep: list[str] = lines[: starts[0]]
    for a, b in itertools.pairwise(starts):
        block = lines[a:b]
        if block[0].strip() == "[[peers]]":
            table = tomllib.loads("".join(block[1:]))
            if table.get("name") == name:
                continue
        keep.extend(block)
    text = "".join(keep)
    tmp = config.path.with_name(f".{config.path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(config.path.stat().st_mode))
        _ = load_config(tmp)  # the file must still be valid before it replaces the old one
        os.replace(tmp, config.path)
    finally:
        tmp.unlink(missing_ok=True)
    return gone
