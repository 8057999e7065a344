#!/usr/bin/env bash
# dwcp developer entry point: installs what it needs, then runs one job.
#   bash dev.sh demo    a local two-node migration demo (for now: the delta demo)
#   bash dev.sh test    ruff, mypy (strict on dwcp/) and the whole test suite
#   bash dev.sh bench   the benchmarks (see benchmarks/RESULTS.md)
#   bash dev.sh env     only install (Debian packages, then .venv)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${DWCP_VENV:-$ROOT/.venv}
PY=$VENV/bin/python

APT_PACKAGES=(build-essential python3-dev python3-venv pkg-config libzstd-dev libxxhash-dev
  zstd rsync iperf3 iputils-ping e2fsprogs iproute2 util-linux
  qemu-system-x86 qemu-utils busybox-static)

need_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

need_venv() {
  local stamp=$VENV/.dwcp-installed
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  # Reinstall when the packaging or the C sources changed since the last install.
  if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py native -newer "$stamp" 2>/dev/null | head -n1)" ]; then
    # Drop pip's notices about this machine's unused local indexes; keep real errors.
    "$PY" -m pip install -q --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2) >/dev/null
    "$PY" -m pip install -q -e '.[dev]' 2> >(grep -vE "is ignored: it is neither|Warning|^ *!!|^ *\*{5}|^ *$" >&2)
    touch "$stamp"
  fi
}

run_tests() {
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
  "$VENV/bin/mypy" dwcp
  "$PY" -m pytest "$@"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  env) need_apt; need_venv ;;
  test) need_apt; need_venv; run_tests "$@" ;;
  demo) need_apt; need_venv; exec "$PY" -m dwcp.demo "$@" ;;
  bench) need_apt; need_venv; for b in benchmarks/*_bench.py; do "$PY" "$b" "$@"; done ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
