#!/usr/bin/env bash
# Benchmark: lanrage against wireguard-go and GotaTun, between two network namespaces on a veth.
#
#   sudo scripts/bench.sh [--only LIST] [--rounds N] [--duration SECS] [--udp-step SECS]
#                         [--profile] [--no-record] [--title TEXT] [--note TEXT] [--keep]
#
# Lab: namespaces A (198.51.100.1/24) and B (198.51.100.2/24), joined by a veth pair (MTU 1500).
# Implementations (--only takes a comma-separated list of these; default: all four):
#   lanrage       a daemon in each namespace, A creates a party, B joins it (A is 10.66.0.1);
#   wireguard-go  Debian's wireguard-go, one interface per namespace, keys from `wg genkey`,
#                 configured with `wg set` over its UAPI socket, 10.66.0.1/16 and 10.66.0.2/16;
#   gotatun       GotaTun (Mullvad's boringtun fork, `gotatun-cli` from crates.io), the same way
#                 (it speaks the same UAPI); built once with `cargo install` into
#                 /var/cache/lanrage-bench/gotatun when missing (GOTATUN_BIN=path uses another);
#   veth          no tunnel: the same tests on the underlay addresses (MTU 1500), the lab's ceiling.
# The three tunnels all run with MTU 1420 (lanrage gets LANRAGE__NETWORK__MTU=1420; its own
# default is 1400); the script checks the MTU of each tunnel interface before measuring.
# Per implementation, in this order, all B -> A (B sends, A receives, as when A downloads from B):
#   1. 200 idle pings at 10 ms, before anything loaded the tunnel: avg, p50, p99, max;
#   2. iperf3 TCP for --duration seconds (default 10): throughput and retransmits;
#   3. iperf3 UDP, 100-byte payloads: packets per second delivered into A, counted by an nftables
#      rule in A that then drops them (no receiving program competes for the CPU). Peak: paced
#      steps of --udp-step seconds (default 3) at 20k, 30k, 45k, ... packets/s offered, until
#      two steps in a row lose 10% or more; the best step is reported with its offered rate and
#      loss (a paced sender costs every implementation the same CPU). Flood: an unpaced sender
#      (-b 0) for --duration seconds, which takes one of the two cores from the tunnel (how an
#      implementation holds up when overloaded);
#   4. the same 200 pings while an iperf3 TCP transfer B -> A runs for the whole ping run (a game
#      while someone downloads; a ping's round trip crosses the loaded direction once, so what is
#      measured is the queue the bulk stream builds in front of small packets).
# --rounds N repeats the set N times in one sitting, rotating the order, and reports every round
# plus the median (min-max) over rounds. Prints a markdown table with a column per
# implementation and the ratios lanrage / wireguard-go and lanrage / GotaTun, and appends it as
# a dated section to BENCHMARKS.md (--title names the section, --note adds a line; --no-record
# only prints). --profile runs `perf record -g` on both lanrage daemons during each TCP run and
# each 100-byte flood and keeps the data and `perf report` summaries in a directory it prints
# (not removed).
# --keep keeps the work directory (logs, iperf3 JSON, ping output) and prints its path.
# --lanrage-only and --wg-only are kept as --only lanrage / --only wireguard-go.
# Everything runs in the two namespaces; nothing but apt-get and crates.io is contacted, and only
# to install missing tools. Everything is removed on exit. Not part of the test suite.
# Needs root, iproute2, iperf3, iputils-ping, wireguard-go, wireguard-tools, nftables, python3 (installed
# with apt-get if missing), cargo for GotaTun's first build, perf for --profile.
# LANRAGE_BENCH_BIN=path benchmarks that binary instead of building target/release/lanrage;
# LANRAGE_LOG sets the daemons' log filter.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# LANRAGE_BENCH_BIN: benchmark this binary instead of building target/release/lanrage.
LR_BIN=${LANRAGE_BENCH_BIN:-$ROOT/target/release/lanrage}
# GotaTun is built once and cached outside the repository.
GOTATUN_VERSION=${GOTATUN_VERSION:-0.10.2}
GOTATUN_ROOT=/var/cache/lanrage-bench/gotatun
GOTATUN_BIN=${GOTATUN_BIN:-$GOTATUN_ROOT/bin/gotatun}
MTU=1420

ALL_IMPLS=(lanrage wireguard-go gotatun veth)
impls=("${ALL_IMPLS[@]}")
record=1
duration=10
rounds=1
profile=0
keep=0
title=""
note=""
pings=200
udp_step=3

die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }
log() { printf '[bench] %s\n' "$*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# canonical_impl NAME: the canonical implementation name, or nothing.
canonical_impl() {
  case $1 in
    lanrage) echo lanrage ;;
    wireguard-go | wg | wg-go) echo wireguard-go ;;
    gotatun | GotaTun) echo gotatun ;;
    veth | raw) echo veth ;;
  esac
}

set_only() {
  local list=$1 name c names
  impls=()
  IFS=, read -r -a names <<<"$list"
  for name in "${names[@]}"; do
    c=$(canonical_impl "$name")
    [[ -n $c ]] || die "--only: unknown implementation '$name' (known: ${ALL_IMPLS[*]})"
    [[ " ${impls[*]} " == *" $c "* ]] || impls+=("$c")
  done
  ((${#impls[@]})) || die "--only: empty list"
}

positive_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer, not '$2'"; }

while (($#)); do
  case $1 in
    --only) (($# >= 2)) || die "--only needs a list"; set_only "$2"; shift ;;
    --wg-only) set_only wireguard-go ;;
    --lanrage-only) set_only lanrage ;;
    --no-record) record=0 ;;
    --duration) (($# >= 2)) || die "--duration needs seconds"; positive_int --duration "$2"; duration=$2; shift ;;
    --rounds) (($# >= 2)) || die "--rounds needs a number"; positive_int --rounds "$2"; rounds=$2; shift ;;
    --udp-step) (($# >= 2)) || die "--udp-step needs seconds"; positive_int --udp-step "$2"; udp_step=$2; shift ;;
    --profile) profile=1 ;;
    --keep) keep=1 ;;
    --title) (($# >= 2)) || die "--title needs text"; title=$2; shift ;;
    --note) (($# >= 2)) || die "--note needs text"; note=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

has_impl() { [[ " ${impls[*]} " == *" $1 "* ]]; }

[[ $EUID -eq 0 ]] || die "run as root (network namespaces, TUN devices)"

declare -A want=([ip]=iproute2 [ping]=iputils-ping [iperf3]=iperf3 [python3]=python3 [ss]=iproute2
  [nft]=nftables)
if has_impl wireguard-go || has_impl gotatun; then want[wg]=wireguard-tools; fi
if has_impl wireguard-go; then want[wireguard-go]=wireguard-go; fi
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [[ " ${missing[*]} " == *" ${want[$cmd]} "* ]] || missing+=("${want[$cmd]}")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ((profile)); then
  has_impl lanrage || die "--profile profiles the lanrage daemons: include lanrage"
  command -v perf >/dev/null 2>&1 || die "--profile needs perf (apt-get install linux-perf)"
fi

if has_impl gotatun && [[ ! -x $GOTATUN_BIN ]]; then
  [[ $GOTATUN_BIN == "$GOTATUN_ROOT/bin/gotatun" ]] || die "GOTATUN_BIN=$GOTATUN_BIN is not executable"
  command -v cargo >/dev/null 2>&1 || die "GotaTun is built with cargo, which is missing (or pass GOTATUN_BIN=path)"
  log "building gotatun-cli $GOTATUN_VERSION once into $GOTATUN_ROOT (a few minutes)"
  mkdir -p "$GOTATUN_ROOT"
  nice -n 10 cargo install --locked --quiet gotatun-cli --version "=$GOTATUN_VERSION" --root "$GOTATUN_ROOT" ||
    die "cargo install gotatun-cli failed"
fi
if has_impl lanrage && [[ -z ${LANRAGE_BENCH_BIN:-} ]]; then
  log "building release"
  cargo build --release --quiet --bin lanrage
fi
if has_impl lanrage; then [[ -x $LR_BIN ]] || die "no lanrage binary at $LR_BIN"; fi

NS_A="lrb-$$-a"
NS_B="lrb-$$-b"
WORK=$(mktemp -d /tmp/lanrage-bench.XXXXXX)
PROFILE_DIR=""
if ((profile)); then PROFILE_DIR=$(mktemp -d /tmp/lanrage-bench-profile.XXXXXX); fi
# Background processes started by this script (removed from the list once reaped).
PIDS=()
# Inodes of our namespaces (lanrage names its API token file in /run/lanrage after them).
NS_INODES=()
# UAPI socket names of the WireGuard interfaces (in /var/run/wireguard, shared by namespaces).
WG_NAMES=("lrw$$a" "lrw$$b" "lrg$$a" "lrg$$b")

# is_our_child PID: the process exists and this script started it (a PID that was reaped and
# reused by someone else has another parent, so it is never signalled).
is_our_child() { [[ $(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ') == "$$" ]]; }
# running PID: our child and not yet exited.
running() { is_our_child "$1" && [[ $(ps -o stat= -p "$1" 2>/dev/null | tr -d ' ') != Z* ]]; }
signal() { if is_our_child "$2"; then kill "-$1" "$2" 2>/dev/null || true; fi; }

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# stop_pids PID...: SIGTERM, up to 5 s to exit, then SIGKILL; reaps them.
stop_pids() {
  local pid t
  for pid in "$@"; do signal TERM "$pid"; done
  for pid in "$@"; do
    for ((t = 0; t < 50; t++)); do
      if ! running "$pid"; then break; fi
      sleep 0.1
    done
    signal KILL "$pid"
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
  done
}

cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do signal KILL "$pid"; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for ns in "$NS_A" "$NS_B"; do
    if ip netns list | grep -qw "$ns"; then
      # Only processes started by this script live in these namespaces.
      for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null; done
      ip netns del "$ns"
    fi
  done
  for name in "${WG_NAMES[@]}"; do rm -f "/var/run/wireguard/$name.sock"; done
  for inode in "${NS_INODES[@]}"; do rm -f "/run/lanrage/api-8666-$inode.token"; done
  if ((rc != 0)); then
    for f in "$WORK"/*.log; do
      [[ -f $f ]] && { echo "---- tail of $(basename "$f") ----"; tail -n 30 "$f"; } >&2
    done
  fi
  if ((keep)); then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
  if [[ -n $PROFILE_DIR ]] && ! compgen -G "$PROFILE_DIR/*" >/dev/null; then rmdir "$PROFILE_DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Poll "$@" every 0.2 s for up to $1 seconds.
wait_for() {
  local secs=$1; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# --- parsing and reporting (python3) -----------------------------------------------------------
cat >"$WORK/bench.py" <<'PY'
"""Parses iperf3 JSON and ping output into key=value lines, and writes the markdown report."""
import json, math, os, re, statistics, sys

def tcp(path, prefix):
    end = json.load(open(path))["end"]
    mbps = end["sum_received"]["bits_per_second"] / 1e6
    retr = end.get("sum_sent", {}).get("retransmits", 0)
    print(f"{prefix}_mbps={mbps:.1f} {prefix}_retr={retr}")

def udp(path, delivered, prefix):
    """iperf3's sender side, and the packets nftables counted arriving in A."""
    end = json.load(open(path))["end"]
    sent = end.get("sum_sent", end["sum"])
    secs = sent["seconds"] or 1.0
    pps, offered = delivered / secs, sent["packets"] / secs
    loss = max(0.0, 100.0 * (1 - delivered / sent["packets"])) if sent["packets"] else 100.0
    print(f"{prefix}_pps={pps:.0f} {prefix}_sent={offered:.0f} {prefix}_loss={loss:.1f}")

def peak(path):
    """The ladder step that delivered the most packets per second."""
    steps = [dict(kv.split("=") for kv in line.split()) for line in open(path) if line.strip()]
    best = max(steps, key=lambda s: float(s["step_pps"]))
    print(f"udp_pps={best['step_pps']} udp_sent={best['step_sent']} udp_loss={best['step_loss']}")

def ping(path, prefix, sent):
    rtts = sorted(float(m) for m in re.findall(r"time=([0-9.]+) ms", open(path).read()))
    sent = int(sent)
    if not rtts:
        sys.exit(f"{prefix}: no ping replies")
    pct = lambda p: rtts[max(0, math.ceil(p / 100 * len(rtts)) - 1)]
    loss = 100.0 * (sent - len(rtts)) / sent
    print(f"{prefix}_avg={sum(rtts)/len(rtts):.3f} {prefix}_p50={pct(50):.3f} "
          f"{prefix}_p99={pct(99):.3f} {prefix}_max={rtts[-1]:.3f} {prefix}_loss={loss:.1f}")

NAMES = {"lanrage": "lanrage", "wireguard-go": "wireguard-go", "gotatun": "GotaTun",
         "veth": "veth (no tunnel)"}
# (title, key, decimals, whether a ratio means something: not for offered rates, losses and
# retransmit counts)
ROWS = [("TCP throughput (Mbit/s)", "tcp_mbps", 1, True),
        ("TCP retransmits", "tcp_retr", 0, False),
        ("UDP 100 B peak delivered (pps)", "udp_pps", 0, True),
        ("UDP 100 B offered at the peak (pps)", "udp_sent", 0, False),
        ("UDP 100 B loss at the peak (%)", "udp_loss", 1, False),
        ("UDP 100 B flood (-b 0) delivered (pps)", "flood_pps", 0, True),
        ("UDP 100 B flood offered (pps)", "flood_sent", 0, False),
        ("UDP 100 B flood loss (%)", "flood_loss", 1, False),
        ("idle ping avg (ms)", "idle_avg", 3, True),
        ("idle ping p50 (ms)", "idle_p50", 3, True),
        ("idle ping p99 (ms)", "idle_p99", 3, True),
        ("idle ping max (ms)", "idle_max", 3, True),
        ("idle ping loss (%)", "idle_loss", 1, False),
        ("ping under TCP load avg (ms)", "load_avg", 3, True),
        ("ping under TCP load p50 (ms)", "load_p50", 3, True),
        ("ping under TCP load p99 (ms)", "load_p99", 3, True),
        ("ping under TCP load max (ms)", "load_max", 3, True),
        ("ping under TCP load loss (%)", "load_loss", 1, False),
        ("TCP during the loaded pings (Mbit/s)", "load_mbps", 1, True)]
OTHERS = [("wireguard-go", "lanrage / wireguard-go"), ("gotatun", "lanrage / GotaTun")]

def load(work, rnd, impl):
    p = os.path.join(work, f"r{rnd}-{impl}.result")
    if not os.path.exists(p):
        return None
    return {k: float(v) for k, v in (kv.split("=") for kv in open(p).read().split())}

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

def num(v, dec):
    return "n/a" if v is None else f"{v:.{dec}f}"

def spread(vals, dec):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return num(med, dec)
    return f"{num(med, dec)} ({num(min(vals), dec)}–{num(max(vals), dec)})"

def table(impls, others, cell, ratio_cell):
    head = ["metric"] + [NAMES[i] for i in impls] + [t for _, t in others]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for title, key, dec, has_ratio in ROWS:
        cells = [cell(i, key, dec) for i in impls]
        cells += [ratio_cell(o, key) if has_ratio else "" for o, _ in others]
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(out)

def report():
    e = os.environ
    work, rounds = e["BENCH_WORK"], int(e["BENCH_ROUNDS"])
    impls = e["BENCH_IMPLS"].split()
    res = {(r, i): load(work, r, i) for r in range(1, rounds + 1) for i in impls}
    others = [(o, t) for o, t in OTHERS if "lanrage" in impls and o in impls]
    get = lambda r, i, k: None if res[(r, i)] is None else res[(r, i)].get(k)
    heading = e["BENCH_STAMP"] + (f": {e['BENCH_TITLE']}" if e.get("BENCH_TITLE") else "")
    print(f"## {heading}\n")
    print(e["BENCH_META"] + "\n")
    if e.get("BENCH_NOTE"):
        print(e["BENCH_NOTE"] + "\n")
    for r in range(1, rounds + 1):
        if rounds > 1:
            print(f"Round {r} (order: {e['BENCH_ORDER_' + str(r)]}):\n")
        print(table(impls, others, lambda i, k, d: num(get(r, i, k), d),
                    lambda o, k: num(ratio(get(r, "lanrage", k), get(r, o, k)), 2)))
        print()
    if rounds > 1:
        print(f"Median over the {rounds} rounds (min–max); ratios are the median of each "
              "round's ratio:\n")
        rng = range(1, rounds + 1)
        print(table(impls, others, lambda i, k, d: spread([get(r, i, k) for r in rng], d),
                    lambda o, k: spread([ratio(get(r, "lanrage", k), get(r, o, k)) for r in rng], 2)))
        print()
    if others:
        print("Ratios are lanrage / other: above 1 is better for throughput and packets per "
              "second, below 1 for latency.\n")
    if len(others) == 2:
        med = lambda o, k: statistics.median(
            [x for x in (ratio(get(r, "lanrage", k), get(r, o, k)) for r in range(1, rounds + 1))
             if x is not None] or [float("nan")])
        checks = [("TCP throughput >= 3x wireguard-go and >= 2x GotaTun", "tcp_mbps", 3, 2, ">="),
                  ("100-byte UDP peak delivered pps >= 2x both", "udp_pps", 2, 2, ">="),
                  ("ping p99 under TCP load no worse than either", "load_p99", 1, 1, "<="),
                  ("idle ping (avg) the best of the three", "idle_avg", 1, 1, "<=")]
        print("Issue 10 targets (median ratios):\n")
        for text, key, want_wg, want_gt, op in checks:
            wg, gt = med("wireguard-go", key), med("gotatun", key)
            ok = (wg >= want_wg and gt >= want_gt) if op == ">=" else (wg <= want_wg and gt <= want_gt)
            print(f"- {text}: {wg:.2f} / {gt:.2f}: {'met' if ok else 'not met'}")
        print()
    for line in e.get("BENCH_WARNINGS", "").splitlines():
        print(f"Warning: {line}\n")

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"tcp": lambda: tcp(*args), "udp": lambda: udp(args[0], int(args[1]), args[2]),
     "peak": lambda: peak(*args),
     "ping": lambda: ping(*args), "report": report}[cmd]()
PY
bench_py() { python3 "$WORK/bench.py" "$@"; }

# --- the lab -----------------------------------------------------------------------------------
setup_lab() {
  log "lab: $NS_A (198.51.100.1) <-veth-> $NS_B (198.51.100.2)"
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  NS_INODES=("$(stat -Lc %i "/run/netns/$NS_A")" "$(stat -Lc %i "/run/netns/$NS_B")")
  ip -n "$NS_A" link add eth0 type veth peer name eth0 netns "$NS_B"
  ip -n "$NS_A" addr add 198.51.100.1/24 dev eth0
  ip -n "$NS_B" addr add 198.51.100.2/24 dev eth0
  for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    # Like real hosts, each has a default route (daemons may look up their outgoing address);
    # it points at the other namespace, which forwards nothing, so no packet leaves the lab.
    ip netns exec "$ns" sh -c 'echo 0 >/proc/sys/net/ipv4/ip_forward'
  done
  ip -n "$NS_A" route add default via 198.51.100.2
  ip -n "$NS_B" route add default via 198.51.100.1
  wait_for 5 ip netns exec "$NS_A" ping -c 1 -W 1 198.51.100.2 || die "underlay does not work"
}

# check_mtu NS DEV: the tunnel interface has the MTU every implementation gets.
check_mtu() {
  local got
  got=$(ip -n "$1" -o link show "$2" | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')
  [[ $got == "$MTU" ]] || die "$2 in $1 has MTU '$got', not $MTU"
}

# --- measurements ------------------------------------------------------------------------------
iperf_listening() {
  [[ -n $(ip netns exec "$NS_A" ss -Hltn 'sport = :5201') ]]
}

IPERF_SERVER=""
# iperf_server_start NAME [many]: an iperf3 server in A for one test (or, with "many", until
# stopped).
iperf_server_start() {
  local once=(-1)
  if [[ ${2:-} == many ]]; then once=(); fi
  ip netns exec "$NS_A" iperf3 -s "${once[@]}" -B "$SERVER_IP" -p 5201 >"$WORK/$1-iperf-server.log" 2>&1 &
  IPERF_SERVER=$!
  PIDS+=("$IPERF_SERVER")
  wait_for 10 iperf_listening || die "$1: iperf3 server did not start"
}

# The server exits after one test (-1); give it 5 s, then stop it (a failed client leaves it).
iperf_server_stop() {
  local t
  for ((t = 0; t < 50; t++)); do
    if ! running "$IPERF_SERVER"; then break; fi
    sleep 0.1
  done
  stop_pids "$IPERF_SERVER"
}

# iperf_client NAME ARGS...: iperf3 from B to the server, JSON into $WORK/NAME.json.
iperf_client() {
  local name=$1; shift
  timeout -k 5 $((duration + 60)) ip netns exec "$NS_B" iperf3 -c "$SERVER_IP" -p 5201 -J "$@" \
    >"$WORK/$name.json" 2>"$WORK/$name-client.log" ||
    die "$name: iperf3 failed: $(tail -n 5 "$WORK/$name.json" "$WORK/$name-client.log")"
}

PERF_PIDS=()
PERF_DATA=()
profile_start() {
  local tag=$1 side pid
  PERF_PIDS=()
  for side in a b; do
    pid=${LR_DAEMON[$side]}
    perf record -g -p "$pid" -o "$PROFILE_DIR/$tag-$side.data" >"$WORK/perf-$tag-$side.log" 2>&1 &
    PERF_PIDS+=($!)
    PIDS+=($!)
    PERF_DATA+=("$PROFILE_DIR/$tag-$side.data")
  done
  sleep 0.5 # perf attaches
}

profile_stop() {
  local pid
  for pid in "${PERF_PIDS[@]}"; do signal INT "$pid"; done
  for pid in "${PERF_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; forget_pid "$pid"; done
  PERF_PIDS=()
}

# The 100-byte UDP test's packets (IP length 128, or a coalesced train of them; iperf3's 4-byte
# stream setup datagrams pass)
# are counted by nftables on arrival in A, on whichever interface, and dropped there: a
# receiving program would need as much CPU as the tunnel (iperf3's own receiver tops out at
# 60-80k packets/s on the shared 2-core machine even without a tunnel, below what the tunnels
# deliver), so it would measure itself. Delivered = reached A's IP stack through the tunnel.
# The rule exists only during the UDP tests (every packet into A would pass through it).
count_udp_in_a() {
  ip netns exec "$NS_A" nft -f - <<'EOF'
table inet lrbench {
  counter delivered {}
  chain input {
    type filter hook input priority -10; policy accept;
    udp dport 5201 ip length >= 128 counter name delivered drop
  }
}
EOF
}

stop_counting_udp_in_a() { ip netns exec "$NS_A" nft delete table inet lrbench; }

delivered_count() {
  # A tunnel that hands its device coalesced UDP (GRO, as lanrage does) delivers a train of
  # datagrams as one packet with one IP+UDP header (28 bytes) that the kernel splits at the
  # socket: count 100-byte payloads, not packets.
  local line packets bytes
  line=$(ip netns exec "$NS_A" nft list counter inet lrbench delivered | grep -o 'packets [0-9]* bytes [0-9]*')
  packets=$(awk '{print $2}' <<<"$line")
  bytes=$(awk '{print $4}' <<<"$line")
  [[ -n $packets && -n $bytes ]] || die "cannot read the nftables counter in $NS_A"
  echo $(((bytes - 28 * packets) / 100))
}

# udp_ladder IMPL TAG: 100-byte UDP at offered rates growing by 1.5x from 20k packets/s, for
# --udp-step seconds each, until two steps in a row lose 10% or more (the tunnel is saturated;
# one noisy step on the shared machine does not end it) or the rate passes 500k; prints the
# step that delivered the most. An unlimited sender (-b 0) takes a full
# core of the two from the tunnel and so measures the fight for CPU more than the tunnel; a paced
# sender at the same rates costs every implementation the same.
udp_ladder() {
  local impl=$1 tag=$2 rate=20000 n=0 line before lossy=0
  : >"$WORK/$tag-ladder.txt"
  iperf_server_start "$tag-ladder" many
  while ((rate <= 500000)); do
    n=$((n + 1))
    # iperf3's -b counts payload bits: 100 bytes = 800 bits a packet.
    before=$(delivered_count)
    iperf_client "$tag-udp$n" -u -l 100 -b "$((rate * 800))" -t "$udp_step"
    line=$(bench_py udp "$WORK/$tag-udp$n.json" "$(($(delivered_count) - before))" step)
    echo "$line" >>"$WORK/$tag-ladder.txt"
    log "$impl: UDP offered $rate/s: $line"
    if [[ $line =~ step_loss=([0-9]+) ]] && ((BASH_REMATCH[1] < 10)); then
      lossy=0
    else
      lossy=$((lossy + 1))
      if ((lossy == 2)); then break; fi
    fi
    rate=$((rate * 3 / 2))
  done
  # The server serves one client at a time, all the steps; stop it now.
  stop_pids "$IPERF_SERVER"
  bench_py peak "$WORK/$tag-ladder.txt"
}

# measure IMPL ROUND: the four tests against $SERVER_IP; writes $WORK/rROUND-IMPL.result.
measure() {
  local impl=$1 round=$2
  local tag="r$round-$impl"
  local out="$WORK/$tag.result"
  : >"$out"

  # Idle first: nothing has loaded the tunnel yet (after the UDP flood, queues may still drain).
  log "$impl: $pings idle pings at 10 ms"
  ip netns exec "$NS_B" ping -n -c "$pings" -i 0.01 -W 1 "$SERVER_IP" >"$WORK/$tag-idle-ping.txt" 2>&1 || true
  bench_py ping "$WORK/$tag-idle-ping.txt" idle "$pings" >>"$out"

  log "$impl: iperf3 TCP ${duration}s B -> A ($SERVER_IP)"
  iperf_server_start "$tag-tcp"
  if ((profile)) && [[ $impl == lanrage ]]; then profile_start "r$round-lanrage-tcp"; fi
  iperf_client "$tag-tcp" -t "$duration"
  if ((profile)) && [[ $impl == lanrage ]]; then profile_stop; fi
  iperf_server_stop
  bench_py tcp "$WORK/$tag-tcp.json" tcp >>"$out"

  count_udp_in_a
  udp_ladder "$impl" "$tag" >>"$out"

  log "$impl: iperf3 UDP 100-byte payloads, unlimited rate (-b 0), ${duration}s B -> A"
  iperf_server_start "$tag-flood"
  local before
  before=$(delivered_count)
  if ((profile)) && [[ $impl == lanrage ]]; then profile_start "r$round-lanrage-flood"; fi
  iperf_client "$tag-flood" -u -l 100 -b 0 -t "$duration"
  if ((profile)) && [[ $impl == lanrage ]]; then profile_stop; fi
  iperf_server_stop
  bench_py udp "$WORK/$tag-flood.json" "$(($(delivered_count) - before))" flood >>"$out"
  stop_counting_udp_in_a
  sleep 1 # let queues drain before the next test

  # The transfer starts 2 s before the pings (slow start is over) and ends well after them.
  local load_secs=$((2 + (pings + 99) / 100 + 4))
  log "$impl: $pings pings at 10 ms while iperf3 TCP B -> A runs (${load_secs}s)"
  iperf_server_start "$tag-load"
  timeout -k 5 $((load_secs + 60)) ip netns exec "$NS_B" iperf3 -c "$SERVER_IP" -p 5201 -J \
    -t "$load_secs" >"$WORK/$tag-load.json" 2>"$WORK/$tag-load-client.log" &
  local load_pid=$!
  PIDS+=("$load_pid")
  sleep 2
  ip netns exec "$NS_B" ping -n -c "$pings" -i 0.01 -W 1 "$SERVER_IP" >"$WORK/$tag-load-ping.txt" 2>&1 || true
  if ! running "$load_pid"; then
    WARNINGS+="round $round, $impl: the TCP transfer ended before the loaded pings did"$'\n'
  fi
  wait "$load_pid" || die "$impl: background iperf3 failed: $(tail -n 5 "$WORK/$tag-load.json")"
  forget_pid "$load_pid"
  iperf_server_stop
  bench_py ping "$WORK/$tag-load-ping.txt" load "$pings" >>"$out"
  bench_py tcp "$WORK/$tag-load.json" load | cut -d' ' -f1 >>"$out"
  log "$impl: $(tr '\n' ' ' <"$out")"
}

# --- implementations ---------------------------------------------------------------------------
lanrage_cli() {
  local ns=$1; shift
  ip netns exec "$ns" "$LR_BIN" --api 127.0.0.1:8666 "$@"
}

declare -A LR_DAEMON=()
IMPL_PIDS=()

up_lanrage() {
  local round=$1 side
  for side in a b; do
    # Fresh state each round: a daemon restarted with its old state rejoins its party.
    mkdir -p "$WORK/r$round-$side-state"
    cat >"$WORK/r$round-$side.toml" <<EOF
[node]
name = "bench-$side"
state_dir = "$WORK/r$round-$side-state"
[network]
interface = "lanrage0"
subnet = "10.66.0.0/16"
mtu = $MTU
listen_port = 51820
[api]
listen = "127.0.0.1:8666"
[discovery]
mdns = true
file = "$WORK/r$round-discovery.json"
EOF
  done
  local ns
  for side in a b; do
    ns=$NS_A; [[ $side == b ]] && ns=$NS_B
    LANRAGE__NETWORK__MTU=$MTU LANRAGE_LOG=${LANRAGE_LOG:-info} ip netns exec "$ns" "$LR_BIN" up \
      --config "$WORK/r$round-$side.toml" >"$WORK/r$round-lanrage-$side.log" 2>&1 &
    LR_DAEMON[$side]=$!
    PIDS+=($!)
  done
  IMPL_PIDS=("${LR_DAEMON[a]}" "${LR_DAEMON[b]}")
  wait_for 30 lanrage_cli "$NS_A" status --json || die "lanrage daemon A did not come up"
  wait_for 30 lanrage_cli "$NS_B" status --json || die "lanrage daemon B did not come up"
  local party
  party=$(lanrage_cli "$NS_A" party create bench --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["party_id"])')
  log "lanrage: party $party created in A"
  party_listed() { lanrage_cli "$NS_B" party list --json | grep -q "$party"; }
  wait_for 20 party_listed || die "B never discovered the party"
  lanrage_cli "$NS_B" party join "$party" >/dev/null
  wait_for 30 ip netns exec "$NS_B" ping -c 1 -W 1 10.66.0.1 || die "lanrage tunnel B -> 10.66.0.1 never worked"
  check_mtu "$NS_A" lanrage0
  check_mtu "$NS_B" lanrage0
  local vip_b
  vip_b=$(lanrage_cli "$NS_B" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["node"]["virtual_ip"])')
  log "lanrage: B is $vip_b, tunnel up"
  SERVER_IP=10.66.0.1
}

# up_uapi IMPL: wireguard-go or GotaTun, configured with `wg set` over the UAPI socket.
up_uapi() {
  local impl=$1 prefix
  case $impl in
    wireguard-go) prefix=lrw ;;
    gotatun) prefix=lrg ;;
  esac
  local names=("$prefix$$a" "$prefix$$b") nss=("$NS_A" "$NS_B") vips=(10.66.0.1 10.66.0.2)
  local under=(198.51.100.1 198.51.100.2)
  local k
  IMPL_PIDS=()
  for k in 0 1; do
    (umask 077 && wg genkey >"$WORK/$impl$k.key")
    wg pubkey <"$WORK/$impl$k.key" >"$WORK/$impl$k.pub"
    rm -f "/var/run/wireguard/${names[$k]}.sock"
    # Distinct interface names: the UAPI sockets in /var/run/wireguard are shared by namespaces.
    case $impl in
      wireguard-go)
        WG_PROCESS_FOREGROUND=1 ip netns exec "${nss[$k]}" wireguard-go "${names[$k]}" \
          >"$WORK/$impl-$k.log" 2>&1 &
        ;;
      gotatun)
        # Root keeps its privileges (dropping them asks getlogin(), which fails without a tty).
        ip netns exec "${nss[$k]}" "$GOTATUN_BIN" --foreground --disable-drop-privileges \
          --verbosity error "${names[$k]}" >"$WORK/$impl-$k.log" 2>&1 &
        ;;
    esac
    IMPL_PIDS+=($!)
    PIDS+=($!)
    wait_for 10 test -S "/var/run/wireguard/${names[$k]}.sock" || die "$impl $k did not start"
  done
  for k in 0 1; do
    local o=$((1 - k))
    ip netns exec "${nss[$k]}" wg set "${names[$k]}" listen-port 51820 private-key "$WORK/$impl$k.key" \
      peer "$(cat "$WORK/$impl$o.pub")" allowed-ips "${vips[$o]}/32" endpoint "${under[$o]}:51820"
    ip -n "${nss[$k]}" addr add "${vips[$k]}/16" dev "${names[$k]}"
    ip -n "${nss[$k]}" link set "${names[$k]}" mtu "$MTU" up
    check_mtu "${nss[$k]}" "${names[$k]}"
  done
  wait_for 20 ip netns exec "$NS_B" ping -c 1 -W 1 10.66.0.1 || die "$impl tunnel never worked"
  log "$impl: tunnel up"
  SERVER_IP=10.66.0.1
}

up_veth() {
  IMPL_PIDS=()
  SERVER_IP=198.51.100.1
}

# down IMPL: stop its processes; the tunnel interfaces go away with them.
down() {
  stop_pids "${IMPL_PIDS[@]}"
  IMPL_PIDS=()
  local name
  for name in "${WG_NAMES[@]}"; do rm -f "/var/run/wireguard/$name.sock"; done
  if [[ $1 != veth ]]; then
    wait_for 10 bash -c "! ip -n $NS_A addr show | grep -q 'inet 10\.66\.' && ! ip -n $NS_B addr show | grep -q 'inet 10\.66\.'" ||
      die "$1: tunnel addresses still present after stopping it"
  fi
}

version_of() {
  case $1 in
    lanrage) echo "$("$LR_BIN" --version 2>/dev/null | head -n 1) ($LR_BIN, sha256 $(sha256sum "$LR_BIN" | cut -c1-12))" ;;
    wireguard-go) wireguard-go --version 2>/dev/null | head -n 1 ;;
    gotatun) echo "$("$GOTATUN_BIN" --version 2>/dev/null | head -n 1) ($GOTATUN_BIN)" ;;
    veth) echo "the underlay, MTU 1500" ;;
  esac
}

# --- run ---------------------------------------------------------------------------------------
WARNINGS=""
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
setup_lab
declare -A ORDER=()
for ((round = 1; round <= rounds; round++)); do
  # Rotate the order each round so no implementation always runs first (or last).
  order=()
  n=${#impls[@]}
  for ((j = 0; j < n; j++)); do order+=("${impls[$(((j + round - 1) % n))]}"); done
  ORDER[$round]="${order[*]}"
  for impl in "${order[@]}"; do
    log "round $round/$rounds: $impl"
    case $impl in
      lanrage) up_lanrage "$round" ;;
      wireguard-go | gotatun) up_uapi "$impl" ;;
      veth) up_veth ;;
    esac
    measure "$impl" "$round"
    down "$impl"
  done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ------------------------------------------------------------------------------------
stamp=$(date -u '+%Y-%m-%d %H:%M UTC')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "no commit")
if [[ -n $(git status --porcelain 2>/dev/null | grep -v '^??' || true) ]]; then commit="$commit+dirty"; fi
versions=""
for impl in "${impls[@]}"; do versions+="; $impl: $(version_of "$impl")"; done
meta="scripts/bench.sh at $commit${versions}. Tunnels at MTU $MTU (lanrage via LANRAGE__NETWORK__MTU; its default is 1400). $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), Linux $(uname -r), load average before / after the run $LOAD_BEFORE / $LOAD_AFTER. B -> A: iperf3 TCP ${duration} s; iperf3 UDP 100-byte payloads, peak = the best of paced steps of ${udp_step} s at 20k, 30k, 45k... packets/s until two steps in a row lose >= 10%, flood = unpaced (-b 0) for ${duration} s (delivered = counted by nftables arriving in A, then dropped: no receiving program); $pings pings at 10 ms idle and again during an iperf3 TCP transfer. $rounds round(s)."
if ((profile)); then meta+=" With --profile: perf was recording the lanrage daemons during lanrage's TCP runs and 100-byte floods."; fi
env_order=()
for ((round = 1; round <= rounds; round++)); do env_order+=("BENCH_ORDER_$round=${ORDER[$round]}"); done
env BENCH_WORK="$WORK" BENCH_ROUNDS="$rounds" BENCH_IMPLS="${impls[*]}" BENCH_STAMP="$stamp" \
  BENCH_TITLE="$title" BENCH_NOTE="$note" BENCH_META="$meta" BENCH_WARNINGS="$WARNINGS" \
  "${env_order[@]}" python3 "$WORK/bench.py" report >"$WORK/report.md"
echo
cat "$WORK/report.md"

if ((profile)); then
  log "summarising ${#PERF_DATA[@]} perf recordings"
  for data in "${PERF_DATA[@]}"; do
    [[ -s $data ]] || continue
    perf report -i "$data" --stdio --no-children -g none --percent-limit 0.3 2>/dev/null |
      head -n 60 >"${data%.data}.txt" || true
    perf report -i "$data" --stdio --no-children 2>/dev/null | head -n 400 >"${data%.data}-callers.txt" || true
  done
  echo
  echo "perf profiles of the lanrage daemons (A receives, B sends) during the TCP runs and floods: $PROFILE_DIR"
  echo "  *.txt flat self time (perf report --stdio --no-children), *-callers.txt with call chains,"
  echo "  *.data for perf report -i FILE"
fi

if ((record)); then
  if [[ ! -f BENCHMARKS.md ]]; then
    printf '# Benchmarks\n\nSee scripts/bench.sh --help.\n\n' >BENCHMARKS.md
  fi
  # A blank line between the previous section and this one.
  if [[ -n $(tail -c 1 BENCHMARKS.md) ]]; then echo >>BENCHMARKS.md; fi
  if [[ -n $(tail -n 1 BENCHMARKS.md) ]]; then echo >>BENCHMARKS.md; fi
  cat "$WORK/report.md" >>BENCHMARKS.md
  log "appended to BENCHMARKS.md"
fi
