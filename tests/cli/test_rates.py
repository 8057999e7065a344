"""One rate parser for ``--bwlimit``, ``perf --rate`` and node.toml, read like rsync's
``--bwlimit`` (issue 16): a table of inputs and the bytes/s each means."""

from __future__ import annotations

import pytest

from dwcp.cli import EXIT_USAGE, build_parser
from dwcp.node.config import parse_rate as config_rate
from dwcp.rates import parse_rate

KiB, MiB, GiB = 1024, 1024**2, 1024**3

TABLE = [
    ("0", 0),
    ("500", 500 * KiB),  # a bare number is KiB/s, as in rsync
    ("1.5", 1536),
    ("500K", 500 * KiB),
    ("500k", 500 * KiB),
    ("500KiB", 500 * KiB),
    ("500KB", 500_000),  # rsync: KB is decimal
    ("10M", 10 * MiB),
    ("10MiB/s", 10 * MiB),
    ("10MB/s", 10_000_000),
    ("2G", 2 * GiB),
    ("1T", 1024**4),
    ("100mbit", 12_500_000),
    ("100Mbit", 12_500_000),
    ("100Mbit/s", 12_500_000),
    ("100Mbps", 12_500_000),
    ("10Mb/s", 1_250_000),  # was 10 MiB/s (84 Mbit/s): a lowercase b is bits
    ("1gbit", 125_000_000),
    ("64kbit", 8_000),
    ("800bit", 100),
    ("800B", 800),
    (" 12 M ", 12 * MiB),
]


@pytest.mark.parametrize(("text", "value"), TABLE)
def test_rate_table(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "fast", "10X", "-5", "10 M B", "1e6", "M"])
def test_rejected_rates_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"100mbit"):
        parse_rate(text)


def test_node_toml_integers_stay_bytes_per_second() -> None:
    assert config_rate(12_500_000) == 12_500_000
    assert config_rate("10M") == parse_rate("10M")
    assert config_rate("100mbit") == 12_500_000


@pytest.mark.parametrize(
    ("argv", "attr"),
    [
        (["migrate", "img", "--to", "b", "--bwlimit", "10Mb/s"], "bwlimit"),
        (["perf", "127.0.0.1:1", "--key", "k", "--trust", "p", "--rate", "10Mb/s"], "rate"),
    ],
)
def test_every_command_uses_the_same_parser(argv: list[str], attr: str) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, attr) == 1_250_000


def test_a_bad_bwlimit_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["migrate", "img", "--to", "b", "--bwlimit", "lots"])
    assert exc.value.code == EXIT_USAGE
    assert "100mbit" in capsys.readouterr().err


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    import dwcp

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.split()[:2] == ["dwcp", dwcp.__version__]
