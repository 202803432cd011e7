#!/usr/bin/env bash
# Benchmark: lanrage vs wireguard-go between two network namespaces on one veth link.
#
#   sudo scripts/bench.sh [--wg-only | --lanrage-only] [--duration SECS] [--no-record]
#
# Lab: namespaces A (198.51.100.1/24) and B (198.51.100.2/24), joined by a veth pair.
#   (a) lanrage: a daemon in each namespace, A creates a party, B joins it;
#   (b) wireguard-go: one userspace WireGuard interface in each namespace (keys from `wg genkey`),
#       same virtual addresses 10.66.0.1 / 10.66.0.2 and MTU 1420 as lanrage's defaults.
# For each: iperf3 TCP B -> A for --duration seconds (default 10), then 200 pings B -> A at a
# 10 ms interval. Prints a table with the ratio lanrage / wireguard-go and appends a dated
# section to BENCHMARKS.md (unless --no-record). Everything is removed on exit.
# Not part of the test suite. Needs root, iproute2, iperf3, iputils-ping, wireguard-go,
# wireguard-tools, python3 (installed with apt-get if missing). LANRAGE_BENCH_BIN=path benchmarks
# that binary instead of building target/release/lanrage; LANRAGE_LOG sets the daemons' log filter.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# LANRAGE_BENCH_BIN: benchmark this binary instead of building target/release/lanrage.
LR_BIN=${LANRAGE_BENCH_BIN:-$ROOT/target/release/lanrage}

run_lanrage=1
run_wg=1
record=1
duration=10
pings=200
while (($#)); do
  case $1 in
    --wg-only) run_lanrage=0 ;;
    --lanrage-only) run_wg=0 ;;
    --no-record) record=0 ;;
    --duration) duration=$2; shift ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { printf 'bench.sh: %s\n' "$*" >&2; exit 1; }
log() { printf '[bench] %s\n' "$*" >&2; }

[[ $EUID -eq 0 ]] || die "run as root (network namespaces, TUN devices)"

declare -A want=([ip]=iproute2 [ping]=iputils-ping [iperf3]=iperf3 [wireguard-go]=wireguard-go
  [wg]=wireguard-tools [python3]=python3)
missing=()
for cmd in "${!want[@]}"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

NS_A="lrb-$$-a"
NS_B="lrb-$$-b"
WORK=$(mktemp -d /tmp/lanrage-bench.XXXXXX)
PIDS=()

cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for ns in "$NS_A" "$NS_B"; do
    if ip netns list | grep -qw "$ns"; then
      # Only processes started by this script live in these namespaces.
      for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
      ip netns del "$ns"
    fi
  done
  rm -f /var/run/wireguard/lrb$$a.sock /var/run/wireguard/lrb$$b.sock
  if ((rc != 0)); then
    for f in "$WORK"/*.log; do
      [[ -f $f ]] && { echo "---- tail of $(basename "$f") ----"; tail -n 30 "$f"; } >&2
    done
  fi
  rm -rf "$WORK"
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

setup_lab() {
  log "lab: $NS_A (198.51.100.1) <-veth-> $NS_B (198.51.100.2)"
  ip netns add "$NS_A"
  ip netns add "$NS_B"
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

iperf_listening() {
  [[ -n $(ip netns exec "$NS_A" ss -Hltn 'sport = :5201') ]]
}

# measure LABEL SERVER_IP: iperf3 B -> A, then pings B -> A; writes $WORK/LABEL.result
measure() {
  local label=$1 ip=$2
  log "$label: iperf3 TCP ${duration}s to $ip"
  ip netns exec "$NS_A" iperf3 -s -1 -B "$ip" -p 5201 >"$WORK/$label-iperf-server.log" 2>&1 &
  PIDS+=($!)
  wait_for 10 iperf_listening || die "$label: iperf3 server did not start"
  ip netns exec "$NS_B" iperf3 -c "$ip" -p 5201 -t "$duration" -J >"$WORK/$label-iperf.json" \
    2>"$WORK/$label-iperf-client.log" || die "$label: iperf3 failed: $(tail -n 5 "$WORK/$label-iperf.json")"
  log "$label: $pings pings at 10 ms to $ip"
  ip netns exec "$NS_B" ping -n -c "$pings" -i 0.01 -W 1 "$ip" >"$WORK/$label-ping.txt" 2>&1 || true
  python3 - "$WORK/$label-iperf.json" "$WORK/$label-ping.txt" "$pings" >"$WORK/$label.result" <<'PY'
import json, math, re, sys
iperf = json.load(open(sys.argv[1]))
end = iperf["end"]
mbps = end["sum_received"]["bits_per_second"] / 1e6
retr = end.get("sum_sent", {}).get("retransmits", 0)
rtts = sorted(float(m) for m in re.findall(r"time=([0-9.]+) ms", open(sys.argv[2]).read()))
sent = int(sys.argv[3])
if not rtts:
    sys.exit("no ping replies")
pct = lambda p: rtts[max(0, math.ceil(p / 100 * len(rtts)) - 1)]
loss = 100.0 * (sent - len(rtts)) / sent
print(f"mbps={mbps:.1f} retr={retr} avg={sum(rtts)/len(rtts):.3f} p50={pct(50):.3f} "
      f"p99={pct(99):.3f} max={rtts[-1]:.3f} loss={loss:.1f}")
PY
  log "$label: $(cat "$WORK/$label.result")"
}

lanrage_cli() {
  local ns=$1; shift
  ip netns exec "$ns" "$LR_BIN" --api 127.0.0.1:8666 "$@"
}

bench_lanrage() {
  if [[ -z ${LANRAGE_BENCH_BIN:-} ]]; then
    log "building release"
    cargo build --release --quiet
  fi
  local bin=$LR_BIN
  for side in a b; do
    mkdir -p "$WORK/$side-state"
    cat >"$WORK/$side.toml" <<EOF
[node]
name = "bench-$side"
state_dir = "$WORK/$side-state"
[network]
interface = "lanrage0"
subnet = "10.66.0.0/16"
mtu = 1420
listen_port = 51820
[api]
listen = "127.0.0.1:8666"
[discovery]
mdns = true
file = "$WORK/discovery.json"
EOF
  done
  LANRAGE_LOG=${LANRAGE_LOG:-info} ip netns exec "$NS_A" "$bin" up --config "$WORK/a.toml" \
    >"$WORK/lanrage-a.log" 2>&1 &
  local pid_a=$!
  LANRAGE_LOG=${LANRAGE_LOG:-info} ip netns exec "$NS_B" "$bin" up --config "$WORK/b.toml" \
    >"$WORK/lanrage-b.log" 2>&1 &
  local pid_b=$!
  PIDS+=("$pid_a" "$pid_b")
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
  local vip_b
  vip_b=$(lanrage_cli "$NS_B" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["node"]["virtual_ip"])')
  log "lanrage: B is $vip_b, tunnel up"
  measure lanrage 10.66.0.1
  # stop both daemons before wireguard-go takes the port
  kill -9 "$pid_a" "$pid_b" 2>/dev/null || true
  wait "$pid_a" "$pid_b" 2>/dev/null || true
}

bench_wireguard_go() {
  local names=("lrb$$a" "lrb$$b") nss=("$NS_A" "$NS_B") vips=(10.66.0.1 10.66.0.2)
  local under=(198.51.100.1 198.51.100.2)
  local k
  for k in 0 1; do
    (umask 077 && wg genkey >"$WORK/wg$k.key")
    wg pubkey <"$WORK/wg$k.key" >"$WORK/wg$k.pub"
    # Distinct interface names: the UAPI sockets in /var/run/wireguard are shared by namespaces.
    WG_PROCESS_FOREGROUND=1 ip netns exec "${nss[$k]}" wireguard-go "${names[$k]}" \
      >"$WORK/wireguard-go-$k.log" 2>&1 &
    PIDS+=($!)
    wait_for 10 test -S "/var/run/wireguard/${names[$k]}.sock" || die "wireguard-go $k did not start"
  done
  for k in 0 1; do
    local o=$((1 - k))
    ip netns exec "${nss[$k]}" wg set "${names[$k]}" listen-port 51820 private-key "$WORK/wg$k.key" \
      peer "$(cat "$WORK/wg$o.pub")" allowed-ips "${vips[$o]}/32" endpoint "${under[$o]}:51820"
    ip -n "${nss[$k]}" addr add "${vips[$k]}/16" dev "${names[$k]}"
    ip -n "${nss[$k]}" link set "${names[$k]}" mtu 1420 up
  done
  wait_for 20 ip netns exec "$NS_B" ping -c 1 -W 1 10.66.0.1 || die "wireguard-go tunnel never worked"
  log "wireguard-go: tunnel up ($(wireguard-go --version 2>/dev/null | head -n 1))"
  measure wireguard-go 10.66.0.1
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
setup_lab
if ((run_lanrage)); then bench_lanrage; fi
if ((run_wg)); then bench_wireguard_go; fi

# --- report ----------------------------------------------------------------------------------
stamp=$(date -u '+%Y-%m-%d %H:%M UTC')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "no commit")
if [[ -n $(git status --porcelain 2>/dev/null | grep -v '^??' || true) ]]; then commit="$commit+dirty"; fi
machine="$(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load before run $LOAD_BEFORE"
python3 - "$WORK/lanrage.result" "$WORK/wireguard-go.result" "$stamp" "$commit" "$machine" \
  "$duration" "$pings" >"$WORK/report.md" <<'PY'
import os, sys
def load(p):
    if not os.path.exists(p):
        return None
    return {k: float(v) for k, v in (kv.split("=") for kv in open(p).read().split())}
lr, wg = load(sys.argv[1]), load(sys.argv[2])
stamp, commit, machine, duration, pings = sys.argv[3:8]
rows = [("TCP throughput (Mbit/s)", "mbps", "higher is better"),
        ("TCP retransmits", "retr", ""),
        ("ping avg (ms)", "avg", "lower is better"),
        ("ping p50 (ms)", "p50", ""),
        ("ping p99 (ms)", "p99", ""),
        ("ping max (ms)", "max", ""),
        ("ping loss (%)", "loss", "")]
fmt = lambda d, k: "n/a" if d is None else (f"{d[k]:.0f}" if k in ("retr",) else f"{d[k]:.3f}" if k not in ("mbps", "loss") else f"{d[k]:.1f}")
def ratio(k):
    if lr is None or wg is None or wg[k] == 0:
        return "n/a"
    return f"{lr[k] / wg[k]:.2f}"
print(f"## {stamp}\n")
print(f"commit {commit}; {machine}; iperf3 TCP {duration} s B -> A; {pings} pings at 10 ms.\n")
print("| metric | lanrage | wireguard-go | lanrage / wireguard-go |")
print("|---|---:|---:|---:|")
for title, k, _ in rows:
    print(f"| {title} | {fmt(lr, k)} | {fmt(wg, k)} | {ratio(k)} |")
if lr is None:
    print("\nlanrage not measured in this run (--wg-only).")
if wg is None:
    print("\nwireguard-go not measured in this run (--lanrage-only).")
PY
echo
cat "$WORK/report.md"
if ((record)); then
  if [[ ! -f BENCHMARKS.md ]]; then
    cat >BENCHMARKS.md <<'EOF'
# Benchmarks

lanrage against wireguard-go (the reference userspace WireGuard) between two network
namespaces joined by a veth pair, on the same machine: iperf3 TCP throughput and ping latency
through the tunnel (virtual IP to virtual IP). Ratios are lanrage / wireguard-go.

Rerun (as root, Debian; installs iperf3, wireguard-go, wireguard-tools if missing):

    scripts/bench.sh                # both, appends a section below
    scripts/bench.sh --wg-only      # only the wireguard-go baseline
    scripts/bench.sh --no-record    # print only

Numbers from different machines or CPU loads are not comparable; compare ratios.

EOF
  fi
  { cat "$WORK/report.md"; echo; } >>BENCHMARKS.md
  log "appended to BENCHMARKS.md"
fi
