#!/usr/bin/env bash
# Full check of the lanrage workspace on a fresh Debian machine, run as root:
#   - installs the system tools the tests need (apt-get, only what is missing),
#   - cargo fmt --check, cargo clippy -D warnings, cargo test (network-namespace tests included).
# Exits non-zero on any failure. CI runs it through .ci/run.
#
# Environment:
#   TEST_THREADS   parallel tests per test binary (default 2; netns tests start several daemons)
#   LANRAGE_LOG    log filter of the daemons started by the tests (default debug)
#   TEST_TIMEOUT   bound of the whole cargo test run (default 70m; timeout(1) syntax)
#   LANRAGE_CI_CACHE  where the browser tests' Python venv is kept (default /var/cache/lanrage-ci)
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

# The closing line is printed whatever happens; setup failures before the tests count as one.
log=$(mktemp)
totals_printed=0
on_exit() {
  local rc=$?
  rm -f "$log"
  if [[ $totals_printed != 1 ]]; then
    echo "tests: 0 passed, 1 failed"
    [[ $rc == 0 ]] && rc=1
  fi
  exit "$rc"
}
trap on_exit EXIT

[[ $(uname -s) == Linux ]] || die "Linux only (the tests use network namespaces)"
[[ $EUID -eq 0 ]] || die "run as root: the integration tests create network namespaces and TUN devices"

# --- system packages -------------------------------------------------------------------------
# command -> Debian package
declare -A want=(
  [ip]=iproute2
  [nft]=nftables
  [conntrack]=conntrack
  [ping]=iputils-ping
  [iperf3]=iperf3
  [wireguard-go]=wireguard-go
  [wg]=wireguard-tools
  [python3]=python3
  [turnutils_stunclient]=coturn
  [faketime]=faketime
  # Real programs across the party (tests/netns_lan_programs.rs): a game's LAN server and mDNS.
  [chocolate-server]=chocolate-doom
  [avahi-daemon]=avahi-daemon
  [avahi-browse]=avahi-utils
  [dbus-daemon]=dbus-daemon
  # The web UI in a real browser (tests/netns_webui.rs): Debian's Chromium, driven by Playwright
  # for Python from a venv (below); Playwright never downloads a browser here.
  [chromium]=chromium
)
# Debian installs games in /usr/games, which is not on root's PATH.
case ":$PATH:" in *:/usr/games:*) ;; *) export PATH="$PATH:/usr/games" ;; esac
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
# rustc links through `cc`.
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
# Debian's python3 needs python3-venv for `python3 -m venv` (ensurepip comes with it).
if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Installed packages must not start their services here (avahi-daemon would announce this
  # machine on its real network): a policy-rc.d that exits 101 tells invoke-rc.d and
  # deb-systemd-invoke not to. The tests start their own instances inside namespaces.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  install_rc=0
  apt-get install -y -q --no-install-recommends "${missing[@]}" || install_rc=$?
  [[ $made_policy == 1 ]] && rm -f "$policy"
  [[ $install_rc == 0 ]] || die "apt-get install ${missing[*]} failed ($install_rc)"
fi
# coturn's package may start a TURN server on 3478; the relay tests use their own ports, but a
# stray server is noise nobody asked for.
if pgrep -x turnserver >/dev/null 2>&1; then
  systemctl disable --now coturn >/dev/null 2>&1 || pkill -x turnserver || true
fi
[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing (load the tun module / give the container the device)"
ip netns add "lrci-probe-$$" || die "'ip netns add' does not work here (needs CAP_SYS_ADMIN)"
ip netns del "lrci-probe-$$"

# --- Python venv for the browser tests ---------------------------------------------------------
# Playwright for Python, pinned, in a venv outside the repository (kept between runs; made again
# only when the pinned version changes). The package ships its own driver; browsers are never
# downloaded (the tests launch /usr/bin/chromium).
PLAYWRIGHT_VERSION=1.65.2
venv="${LANRAGE_CI_CACHE:-/var/cache/lanrage-ci}/venv"
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$PLAYWRIGHT_VERSION')" >/dev/null 2>&1; then
  step "python venv with playwright==$PLAYWRIGHT_VERSION in $venv"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv" || die "python3 -m venv $venv failed"
  PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install -q \
    "playwright==$PLAYWRIGHT_VERSION" || die "pip install playwright==$PLAYWRIGHT_VERSION failed"
fi
export LANRAGE_WEBUI_PYTHON="$venv/bin/python"

# --- Rust toolchain --------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (https://rustup.rs)"
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 || die "cargo ${comp} missing and no rustup to add it"
    rustup component add "$comp"
  fi
done
cargo --version

# --- checks ----------------------------------------------------------------------------------
# The netns tests must not silently skip here.
export LANRAGE_REQUIRE_NETNS=1
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# fmt and clippy count as one test each in the totals; a failure there does not stop the tests.
checks_failed=0
checks_passed=0
check() {
  local what=$1
  shift
  if "$@"; then
    checks_passed=$((checks_passed + 1))
  else
    echo "FAILED: $what"
    checks_failed=$((checks_failed + 1))
  fi
}

step "cargo fmt --check"
check "cargo fmt --check" cargo fmt --all -- --check

step "cargo clippy"
check "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
# Every test binary runs even when an earlier one fails (--no-fail-fast). Network-namespace tests
# start several daemons each, so each binary runs TEST_THREADS tests at a time; binaries run one
# after another, which keeps the flood tests (tests/netns_flood.rs, serialised inside) alone.
set +e
# A hung test must not keep the totals line from being printed: the whole run is bounded.
timeout --signal=INT --kill-after=60 "${TEST_TIMEOUT:-70m}" \
  cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
[[ $status == 124 ]] && echo "FAILED: the tests did not finish within ${TEST_TIMEOUT:-70m}"
set -e
# Totals over every test binary (the last binary cargo runs is often the doc tests, with none).
set +e
awk -v status="$status" -v cp="$checks_passed" -v cf="$checks_failed" '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
  END {
    if (status != 0 && f == 0) f = 1   # a binary that did not build or crashed counts as a failure
    printf "tests: %d passed, %d failed\n", p + cp, f + cf
    exit (p == 0 || f + cf > 0 || status != 0)
  }' "$log"
rc=$?
totals_printed=1
exit "$rc"
