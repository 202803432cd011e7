#!/usr/bin/env bash
# Installs lanrage from this clone on Debian or Ubuntu, as root:
#
#   sudo scripts/install.sh            # the daemon and CLI
#   sudo scripts/install.sh --relay    # also lanrage-relay (for whoever runs the relay)
#
# What it does (running it again upgrades and changes nothing else):
#   - apt-get installs what the build needs if missing (a C compiler, pkg-config); Rust itself
#     (1.88 or newer) comes from rustup, see below;
#   - cargo build --release --locked (as the user who ran sudo, so target/ stays theirs);
#   - /usr/local/bin/lanrage (and lanrage-relay with --relay), mode 0755;
#   - /etc/lanrage/lanrage.toml from config/lanrage.toml, only if there is none yet, with
#     api.operator_group = "lanrage";
#   - the system group `lanrage` (members use the CLI without sudo);
#   - /etc/systemd/system/lanrage.service (and lanrage-relay.service), then daemon-reload, and
#     a restart of a service that was running (an upgrade takes effect);
#   - prints what to do next.
#
# Options:
#   --relay          also build and install lanrage-relay (config/relay.toml to
#                    /etc/lanrage-relay/relay.toml if absent, config/lanrage-relay.service)
#   --prefix DIR     install binaries to DIR/bin (default /usr/local); the units name them there
#   --destdir DIR    stage every file under DIR (for packaging and tests): no apt-get, no group,
#                    no systemctl
#   --from DIR       take the binaries from DIR instead of building them
#   -h, --help       this text
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

relay=0
prefix=/usr/local
destdir=
from=
while [ $# -gt 0 ]; do
  case "$1" in
    --relay) relay=1 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) prefix=${1#--prefix=} ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift ;;
    --destdir=*) destdir=${1#--destdir=} ;;
    --from) from=${2:?--from needs a directory}; shift ;;
    --from=*) from=${1#--from=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$prefix" in
  /*) ;;
  *) echo "install.sh: --prefix must be an absolute path" >&2; exit 2 ;;
esac
if [ -n "$destdir" ]; then
  mkdir -p "$destdir"
  destdir=$(cd "$destdir" && pwd)
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
  die "run it as root: sudo $0 $*"
fi

bins=(lanrage)
[ "$relay" = 1 ] && bins+=(lanrage-relay)

# --- Build --------------------------------------------------------------------------------
if [ -z "$from" ]; then
  if [ -z "$destdir" ] && command -v apt-get >/dev/null; then
    missing=()
    command -v cc >/dev/null || missing+=(build-essential)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    if [ ${#missing[@]} -gt 0 ]; then
      say "installing build tools: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
  fi
  # Build as the user who ran sudo when the clone is theirs (their rustup, their target/).
  build_user=
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(stat -c %U "$repo")" = "$SUDO_USER" ]; then
    build_user=$SUDO_USER
  fi
  user_home=$HOME
  [ -n "$build_user" ] && user_home=$(getent passwd "$build_user" | cut -d: -f6)
  cargo=$(command -v cargo || true)
  for c in "$user_home/.cargo/bin/cargo" /root/.cargo/bin/cargo; do
    [ -z "$cargo" ] && [ -x "$c" ] && cargo=$c
  done
  [ -n "$cargo" ] || die "Rust is not installed. Install it for your user (not root) with rustup:
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
then open a new terminal and run this script again."
  rustc=$(dirname "$cargo")/rustc
  [ -x "$rustc" ] || rustc=rustc
  version=$("$rustc" --version 2>/dev/null | awk '{print $2}')
  if ! printf '1.88.0\n%s\n' "${version:-0}" | sort -V -C; then
    die "Rust ${version:-?} is too old (lanrage needs 1.88 or newer): \`rustup update\`, or install rustup (https://rustup.rs) instead of the distribution's Rust"
  fi
  packages=()
  for b in "${bins[@]}"; do packages+=(-p "$b"); done
  say "building ${bins[*]} (cargo build --release --locked; the first build takes a while)"
  cmd=(env "PATH=$(dirname "$cargo"):$PATH" "$cargo" build --release --locked "${packages[@]}")
  if [ -n "$build_user" ]; then
    (cd "$repo" && runuser -u "$build_user" -- "${cmd[@]}")
  else
    (cd "$repo" && "${cmd[@]}")
  fi
  from=$repo/target/release
fi
for b in "${bins[@]}"; do
  [ -x "$from/$b" ] || die "$from/$b is missing"
done

# --- Files --------------------------------------------------------------------------------
bindir=$prefix/bin
etc=$destdir/etc
units=$destdir/etc/systemd/system
installed_config=0

for b in "${bins[@]}"; do
  install -D -m 0755 "$from/$b" "$destdir$bindir/$b"
  say "installed $bindir/$b"
done

if [ -e "$etc/lanrage/lanrage.toml" ]; then
  say "kept /etc/lanrage/lanrage.toml (yours)"
else
  install -d -m 0755 "$etc/lanrage"
  sed 's/^# operator_group = "lanrage"$/operator_group = "lanrage"/' "$repo/config/lanrage.toml" \
    > "$etc/lanrage/lanrage.toml.new"
  chmod 0644 "$etc/lanrage/lanrage.toml.new"
  mv "$etc/lanrage/lanrage.toml.new" "$etc/lanrage/lanrage.toml"
  installed_config=1
  say "installed /etc/lanrage/lanrage.toml (every key documented; operator_group = \"lanrage\")"
fi

# The units name the binaries where they were installed.
unit() {
  install -d -m 0755 "$units"
  sed "s#/usr/local/bin/#$bindir/#g" "$repo/config/$1" > "$units/$1.new"
  chmod 0644 "$units/$1.new"
  mv "$units/$1.new" "$units/$1"
  say "installed /etc/systemd/system/$1"
}
unit lanrage.service
if [ "$relay" = 1 ]; then
  if [ -e "$etc/lanrage-relay/relay.toml" ]; then
    say "kept /etc/lanrage-relay/relay.toml (yours)"
  else
    install -D -m 0644 "$repo/config/relay.toml" "$etc/lanrage-relay/relay.toml"
    say "installed /etc/lanrage-relay/relay.toml (set udp.public before starting it)"
  fi
  unit lanrage-relay.service
fi

# --- The system ---------------------------------------------------------------------------
group=lanrage
if [ -z "$destdir" ]; then
  if getent group "$group" >/dev/null; then
    say "group $group exists"
  else
    groupadd --system "$group"
    say "created the group $group"
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    for s in lanrage lanrage-relay; do
      if systemctl is-active --quiet "$s"; then
        systemctl restart "$s"
        say "restarted $s (now running the new version)"
      fi
    done
  fi
fi

# --- Next steps ---------------------------------------------------------------------------
user=${SUDO_USER:-$(id -un)}
member=no
if [ -z "$destdir" ] && id -nG "$user" 2>/dev/null | tr ' ' '\n' | grep -qx "$group"; then
  member=yes
fi
echo
echo "lanrage is installed. Next:"
echo "  1. Start the daemon now and at every boot:"
echo "       sudo systemctl enable --now lanrage"
if [ "$member" = no ] && [ "$user" != root ]; then
  echo "  2. Use the CLI without sudo: join the $group group, then log out and in again:"
  echo "       sudo usermod -aG $group $user"
else
  echo "  2. Members of the $group group use the CLI without sudo (sudo usermod -aG $group NAME)."
fi
if [ "$installed_config" = 0 ] && ! grep -q '^operator_group *=' "$etc/lanrage/lanrage.toml"; then
  echo "     Your /etc/lanrage/lanrage.toml has no operator_group: under [api] add"
  echo "       operator_group = \"$group\""
  echo "     then: sudo systemctl restart lanrage"
fi
echo "  3. Check this machine (firewall, MTU, ...): sudo lanrage doctor"
echo "  4. Play: lanrage party create NAME, or lanrage party list and lanrage party join ID"
echo "     For internet play set [control] server in /etc/lanrage/lanrage.toml (see the README)."
if [ "$relay" = 1 ]; then
  echo "  Relay: set udp.public in /etc/lanrage-relay/relay.toml, then"
  echo "       sudo systemctl enable --now lanrage-relay"
fi
