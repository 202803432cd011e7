#!/usr/bin/env bash
# Full check of the lanrage workspace on a fresh Debian machine, run as root:
#   - installs the system tools the tests need (apt-get, only what is missing),
#   - cargo fmt --check, cargo clippy -D warnings, cargo test (network-namespace tests included).
# Exits non-zero on any failure. CI runs it through .ci/run.
#
# Environment:
#   TEST_THREADS   parallel tests per test binary (default 2; netns tests start several daemons)
#   LANRAGE_LOG    log filter of the daemons started by the tests (default debug)
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

[[ $(uname -s) == Linux ]] || die "Linux only (the tests use network namespaces)"
[[ $EUID -eq 0 ]] || die "run as root: the integration tests create network namespaces and TUN devices"

# --- system packages -------------------------------------------------------------------------
# command -> Debian package
declare -A want=(
  [ip]=iproute2
  [nft]=nftables
  [ping]=iputils-ping
  [iperf3]=iperf3
  [wireguard-go]=wireguard-go
  [wg]=wireguard-tools
  [python3]=python3
  [turnutils_stunclient]=coturn
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
# rustc links through `cc`.
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# coturn's package may start a TURN server on 3478; the relay tests use their own ports, but a
# stray server is noise nobody asked for.
if pgrep -x turnserver >/dev/null 2>&1; then
  systemctl disable --now coturn >/dev/null 2>&1 || pkill -x turnserver || true
fi
[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing (load the tun module / give the container the device)"
ip netns add "lrci-probe-$$" || die "'ip netns add' does not work here (needs CAP_SYS_ADMIN)"
ip netns del "lrci-probe-$$"

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

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log"
# Totals over every test binary (the last binary cargo runs is often the doc tests, with none).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' "$log"
