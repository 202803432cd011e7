#!/usr/bin/env bash
# Where does a game's packet wait while someone downloads? A two-namespace lanrage party (A hosts,
# B joins, veth between them), an iperf3 TCP download B -> A, and 200 pings B -> A at 10 ms
# during it. tcpdump stamps each ping on B's party interface, on the veth (the encrypted
# datagram) and on A's party interface, both ways, so the round trip splits into its legs:
#   B tap -> veth   the request waits in B's TAP ring and for B's daemon to encrypt and send it
#   veth -> A tap   ... in A's UDP socket and for A's daemon to decrypt and write it
#   A kernel echo   A's kernel answers
#   A tap -> veth   the reply (the direction with only ACKs) waits for A's daemon
#   veth -> B tap   ... and for B's daemon
# It also prints each daemon thread's CPU share, scheduling priority and how often it was put
# on a CPU, and the daemons' real-time counters (src/realtime.rs).
#
#   sudo scripts/latency_probe.sh [BIN]        (default target/release/lanrage)
# Environment: WRAP="chrt -r 5" (a command that execs the daemons), IPERF_RATE=500M (cap the
# download), IPERF_EXTRA="-u -b 0 -l 100" (a small-packet flood instead), LANRAGE__* (passed to
# the daemons, e.g. LANRAGE__NETWORK__REALTIME=false).
# Needs root, iproute2, iperf3, iputils-ping, tcpdump, python3. Not part of the test suite;
# contacts nothing outside the two namespaces; removes everything on exit.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-$PWD/target/release/lanrage}
[ -x "$BIN" ] || { echo "latency_probe.sh: no daemon binary at $BIN" >&2; exit 1; }
A=lrlat-$$-a
B=lrlat-$$-b
W=$(mktemp -d /tmp/lrlat.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

ip netns add "$A"
ip netns add "$B"
ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
ip -n "$A" addr add 198.51.100.1/24 dev eth0
ip -n "$B" addr add 198.51.100.2/24 dev eth0
for n in "$A" "$B"; do ip -n "$n" link set lo up; ip -n "$n" link set eth0 up; done
for s in a b; do
  mkdir -p "$W/$s"
  cat > "$W/$s.toml" <<EOF
[node]
name = "probe-$s"
state_dir = "$W/$s"
[network]
mtu = 1420
[discovery]
mdns = true
file = "$W/discovery.json"
EOF
done
# shellcheck disable=SC2086 # WRAP is a command and its arguments
LANRAGE_LOG=warn ip netns exec "$A" ${WRAP:-} "$BIN" up --config "$W/a.toml" > "$W/a.log" 2>&1 &
PA=$!
PIDS+=("$PA")
# shellcheck disable=SC2086
LANRAGE_LOG=warn ip netns exec "$B" ${WRAP:-} "$BIN" up --config "$W/b.toml" > "$W/b.log" 2>&1 &
PB=$!
PIDS+=("$PB")
for _ in $(seq 40); do ip netns exec "$A" "$BIN" status >/dev/null 2>&1 && break; sleep 0.25; done
P=$(ip netns exec "$A" "$BIN" party create probe --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["party_id"])')
for _ in $(seq 40); do ip netns exec "$B" "$BIN" party list --json | grep -q "$P" && break; sleep 0.25; done
ip netns exec "$B" "$BIN" party join "$P" >/dev/null
for _ in $(seq 60); do ip netns exec "$B" ping -c1 -W1 10.66.0.1 >/dev/null 2>&1 && break; sleep 0.25; done

ip netns exec "$A" iperf3 -s -p 5299 -1 >/dev/null 2>&1 &
PIDS+=("$!")
ip netns exec "$B" tcpdump -i lanrage0 -n -tt -l --time-stamp-precision=micro icmp > "$W/tap_b.txt" 2>/dev/null &
PIDS+=("$!")
ip netns exec "$A" tcpdump -i lanrage0 -n -tt -l --time-stamp-precision=micro icmp > "$W/tap_a.txt" 2>/dev/null &
PIDS+=("$!")
# A ping's datagram: 84-byte IP packet + 32 bytes of WireGuard = UDP length 124.
ip netns exec "$B" tcpdump -i eth0 -n -tt -l --time-stamp-precision=micro 'udp and udp[4:2] = 124' > "$W/veth.txt" 2>/dev/null &
PIDS+=("$!")
sleep 1
# shellcheck disable=SC2086 # IPERF_EXTRA is a list of arguments
ip netns exec "$B" iperf3 -p 5299 -c 10.66.0.1 -t 5 ${IPERF_RATE:+-b $IPERF_RATE} ${IPERF_EXTRA:-} > "$W/iperf.txt" 2>&1 &
PI=$!
sleep 1
python3 - "$PA" "$PB" > "$W/threads.txt" <<'EOF' &
import os, sys, time
def snap(pid):
    d = {}
    for t in os.listdir(f'/proc/{pid}/task'):
        try:
            s = open(f'/proc/{pid}/task/{t}/stat').read()
            f = s[s.rindex(')') + 2:].split()
            runs = int(open(f'/proc/{pid}/task/{t}/schedstat').read().split()[2])
            d[t] = (s[s.index('(') + 1:s.rindex(')')], int(f[11]) + int(f[12]), f[15], runs)
        except (OSError, ValueError):
            pass
    return d
pids = [int(p) for p in sys.argv[1:]]
a = {p: snap(p) for p in pids}
time.sleep(2)
b = {p: snap(p) for p in pids}
hz = os.sysconf('SC_CLK_TCK')
for name, p in zip('AB', pids):
    out = []
    for t, (n, cpu, prio, runs) in b[p].items():
        if t in a[p]:
            share = (cpu - a[p][t][1]) / hz / 2 * 100
            if share >= 1:
                out.append(f"{n}[{t}] {share:.0f}% prio={prio} runs/s={(runs - a[p][t][3]) / 2:.0f}")
    print(f"daemon {name} threads: " + ' | '.join(out))
EOF
ip netns exec "$B" ping -c 200 -i 0.01 10.66.0.1 > "$W/ping.txt"
wait "$PI" || true
sleep 0.5
for n in "$A" "$B"; do
  ip netns exec "$n" "$BIN" status --json | python3 -c '
import json, sys
c = json.load(sys.stdin)["counters"]
print("  counters:", {k: v for k, v in c.items() if k.startswith(("realtime", "codel"))})'
done
sleep 1
python3 - "$W" <<'EOF'
import re, statistics, sys
w = sys.argv[1]
def icmp(path):
    d = {}
    for line in open(path):
        m = re.match(r'([\d.]+) .*ICMP echo (request|reply), id \d+, seq (\d+)', line)
        if m:
            d[(m.group(2), int(m.group(3)))] = float(m.group(1))
    return d
tb, ta = icmp(f'{w}/tap_b.txt'), icmp(f'{w}/tap_a.txt')
req, rep = [], []
for line in open(f'{w}/veth.txt'):
    m = re.match(r'([\d.]+) IP ([\d.]+)\.\d+ > ', line)
    if m:
        (req if m.group(2) == '198.51.100.2' else rep).append(float(m.group(1)))
seqs = sorted(s for (k, s) in tb if k == 'request')
req, rep = req[-len(seqs):], rep[-len(seqs):]
rows = []
for i, s in enumerate(seqs):
    try:
        t1, t3, t4, t6 = tb[('request', s)], ta[('request', s)], ta[('reply', s)], tb[('reply', s)]
    except KeyError:
        continue
    rows.append((t1, req[i] if i < len(req) else None, t3, t4, rep[i] if i < len(rep) else None, t6))
def show(name, xs):
    xs = sorted(x * 1000 for x in xs if x is not None and x >= 0)
    if xs:
        print(f"{name:16s} n={len(xs):3d} avg={statistics.mean(xs):6.2f} p50={xs[len(xs) // 2]:6.2f} "
              f"p99={xs[max(0, int(.99 * len(xs)) - 1)]:6.2f} ms")
ok = lambda a, b: a is not None and b is not None
show('B tap -> veth', [r[1] - r[0] for r in rows if ok(r[1], r[0])])
show('veth -> A tap', [r[2] - r[1] for r in rows if ok(r[2], r[1])])
show('A kernel echo', [r[3] - r[2] for r in rows])
show('A tap -> veth', [r[4] - r[3] for r in rows if ok(r[4], r[3])])
show('veth -> B tap', [r[5] - r[4] for r in rows if ok(r[5], r[4])])
show('round trip', [r[5] - r[0] for r in rows])
EOF
cat "$W/threads.txt"
tail -1 "$W/ping.txt"
grep -E "sender|receiver" "$W/iperf.txt" || true
