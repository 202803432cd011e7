#!/usr/bin/env bash
# lanrage-relay's forwarder against coturn (Debian's turnserver) on loopback, in alternating
# rounds: coturn, an older lanrage-relay build (optional), this tree's lanrage-relay. Each run is
# relay/examples/loadgen.rs (see there): N sessions x M pps per direction of P-byte payloads, and
# a saturation run. Prints markdown rows; nothing leaves loopback.
#
#   scripts/bench_relay.sh [--rounds 2] [--old /path/to/old/lanrage-relay] [--secs 10]
#
# The fixed-rate runs leave scheduling to the kernel; the saturation runs pin the relay to CPU 0
# and the generator to CPU 1, so they compare what one core of relay forwards.
#
# Needs: coturn (apt-get install coturn), a release build:
#   cargo build --release -p lanrage-relay --bin lanrage-relay --example loadgen
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=2
old=""
secs=10
sessions=100
pps=500
payload=128
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --old) old=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --sessions) sessions=$2; shift 2 ;;
    --pps) pps=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

command -v turnserver >/dev/null || { echo "turnserver missing: apt-get install coturn" >&2; exit 1; }
loadgen=target/release/examples/loadgen
new=target/release/lanrage-relay
[ -x "$loadgen" ] && [ -x "$new" ] || { echo "build first (see the header)" >&2; exit 1; }

tmp=$(mktemp -d)
turn_pid=""
cleanup() {
  if [ -n "$turn_pid" ]; then kill "$turn_pid" 2>/dev/null || true; wait "$turn_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# A port nobody uses, on loopback.
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$tmp/turnserver.conf" <<CONF
listening-ip=127.0.0.1
relay-ip=127.0.0.1
listening-port=$port
min-port=40000
max-port=45000
lt-cred-mech
user=load:load
realm=lanrage.test
userdb=$tmp/turndb.sqlite
allow-loopback-peers
no-multicast-peers
no-stun
no-cli
no-tls
no-dtls
no-tcp
no-tcp-relay
no-rfc5780
no-stun-backward-compatibility
log-file=$tmp/turn.log
simple-log
pidfile=$tmp/turn.pid
CONF

start_turn() {
  turnserver -c "$tmp/turnserver.conf" >/dev/null 2>&1 &
  turn_pid=$!
  sleep 1
  kill -0 "$turn_pid" || { cat "$tmp/turn.log" >&2; exit 1; }
}
stop_turn() {
  kill "$turn_pid" 2>/dev/null || true
  wait "$turn_pid" 2>/dev/null || true
  turn_pid=""
}

echo "| relay | sessions | pps per session and direction | payload | offered pps | forwarded pps | received pps | reordered | kernel drops | relay drops | relay CPU | relay CPU us per datagram | of it user | of it kernel | generator CPU |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
run_all() { # $1: prefix command for the generator ("" or "taskset -c 1"); $2: extra loadgen args
  start_turn
  $1 "$loadgen" --turn "127.0.0.1:$port" --turn-pid "$turn_pid" --label coturn $2 2>/dev/null
  stop_turn
  if [ -n "$old" ]; then
    LANRAGE_RELAY_BIN="$old" $1 "$loadgen" --label "lanrage-relay (old)" $2 2>/dev/null
  fi
  LANRAGE_RELAY_BIN="$new" $1 "$loadgen" --label "lanrage-relay" $2 2>/dev/null
}
for r in $(seq 1 "$rounds"); do
  run_all "" "--sessions $sessions --pps $pps --secs $secs --payload $payload"
done
for r in $(seq 1 "$rounds"); do
  run_all "taskset -c 1" "--sessions $sessions --saturate --relay-cpu 0 --secs $secs --payload $payload"
done
