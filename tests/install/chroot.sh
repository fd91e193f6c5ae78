#!/usr/bin/env bash
# Installs podagent into a clean Debian 12 root (debootstrap --variant=minbase from the mirror apt
# uses here) and checks it there: `make test-deb` (the .deb, `apt install ./podagent_*.deb`) and
# `make test-install-service` (README's route: `make install-service` from a source tree).
#   tests/install/chroot.sh deb FILE.deb | install-service SRC_DIR
# Then: both commands on PATH, the users and groups, the unit and docs in place, the config skeleton
# passes check-config once its secrets exist, and the daemon starts and logs against nothing.
# Needs root and debootstrap. The base root is cached as a tarball ($PODAGENT_CHROOT_CACHE).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "chroot.sh: needs root (debootstrap, chroot)" >&2; exit 1; }
mode=$1 arg=$2
cache=${PODAGENT_CHROOT_CACHE:-/var/tmp/podagent-chroot/bookworm-minbase.tar}
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
t0=$SECONDS
bash "$(dirname "$0")/../../.ci/debs.sh" packaging  # debootstrap
say() { echo "chroot.sh [$((SECONDS - t0))s]: $*"; }

if [ ! -s "$cache" ]; then
  say "debootstrap bookworm (minbase) from $mirror"
  base=$(mktemp -d /var/tmp/podagent-base.XXXXXX)
  chmod 755 "$base"  # mktemp's 0700 would be the root's mode in the cache (tar keeps ".")
  debootstrap --variant=minbase bookworm "$base" "$mirror" >/dev/null
  mkdir -p "$(dirname "$cache")"
  tar -C "$base" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
  rm -rf "$base"
fi
root=$(mktemp -d /var/tmp/podagent-root.XXXXXX)
cleanup() {
  for m in root/.cache/pip dev/pts dev proc; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
tar -C "$root" -xf "$cache"
# A root directory a non-root user can traverse (su to podagent/nobody runs /bin/sh in it), even
# from a cache made before the chmod above.
chmod 755 "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# This host's way out to PyPI (a TLS-intercepting proxy's CA, a warm pip cache) goes in with it: a
# site behind such a proxy sets PIP_CERT the same way. Nothing else of the host is visible inside.
pip_env=()
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  cp "$PIP_CERT" "$root/etc/ssl/host-pip-ca.crt" 2>/dev/null || { mkdir -p "$root/etc/ssl"; cp "$PIP_CERT" "$root/etc/ssl/host-pip-ca.crt"; }
  pip_env+=(PIP_CERT=/etc/ssl/host-pip-ca.crt)
fi
[ -n "${PIP_DEFAULT_TIMEOUT:-}" ] && pip_env+=(PIP_DEFAULT_TIMEOUT="$PIP_DEFAULT_TIMEOUT")
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
if [ -d "${HOME:-/root}/.cache/pip" ]; then
  mkdir -p "$root/root/.cache/pip"
  mount --bind "${HOME:-/root}/.cache/pip" "$root/root/.cache/pip"
fi
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "${pip_env[@]}" bash -euo pipefail -c "$1"; }
say "clean root at $root"
in_root "apt-get update -qq"

case $mode in
  deb)
    cp "$arg" "$root/tmp/"
    say "apt install ./$(basename "$arg")"
    in_root "cd /tmp && apt-get install -y -q ./$(basename "$arg") >/tmp/apt.log 2>&1 || { tail -30 /tmp/apt.log; exit 1; }"
    in_root "test -f /lib/systemd/system/podagent.service && ls /lib/systemd/system/podagent*.service"
    in_root "man -w podctl >/dev/null 2>&1 || test -f /usr/share/man/man1/podctl.1.gz"
    ;;
  install-service)
    say "apt install make python3 (what README asks for) and make install-service"
    in_root "apt-get install -y -q --no-install-recommends make python3 ca-certificates >/dev/null"
    mkdir -p "$root/src/podagent"
    tar -C "$arg" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
      --exclude=__pycache__ -cf - . | tar -C "$root/src/podagent" -xf -
    in_root "cd /src/podagent && make install-service"
    in_root "test -f /etc/systemd/system/podagent.service && test -f /usr/local/share/man/man1/podctl.1"
    ;;
  *) echo "chroot.sh: mode deb or install-service" >&2; exit 2 ;;
esac

say "commands, users, groups, docs"
in_root "command -v podagent && command -v podctl && podctl --version && podagent --version"
in_root "getent passwd podagent && getent group podagent && getent group podagent-admin"
in_root "test -f /usr/share/doc/podagent/README.md"
in_root "test -s /usr/share/bash-completion/completions/podctl"
say "the config skeleton fails only for its missing secrets, then passes"
in_root "! podagent check-config /etc/podagent/podagent.toml"
in_root "umask 027; for s in pdu.auth pdu.priv; do echo secret-\$s > /etc/podagent/\$s; chgrp podagent /etc/podagent/\$s; done"
in_root "su -s /bin/sh podagent -c 'podagent check-config /etc/podagent/podagent.toml'"
say "the daemon runs as podagent against nothing, serves podctl to its group only, and logs"
cat >"$root/tmp/nothing.toml" <<'TOML'
[pod]
site = "chroot"
id = "pod-0"
[paths]
state_dir = "/tmp/podagent-state"
socket = "/tmp/podagent-state/podagent.sock"
[prometheus]
listen = "127.0.0.1:19400"
[control]
admin_group = "podagent-admin"
[[device]]
id = "pdu-nowhere"
kind = "snmp"
profile = "apc-rpdu2"
host = "127.0.0.1"
port = 1
version = "2c"
community = "public"
gpus = []
[[device]]
id = "controller"
kind = "host"
TOML
in_root "install -d -o podagent -g podagent /tmp/podagent-state; chmod 644 /tmp/nothing.toml"
in_root "su -s /bin/sh podagent -c 'podagent check-config /tmp/nothing.toml'"
cat >"$root/tmp/daemon-check.sh" <<'SH'
# The daemon as podagent in the background; podctl against it as podagent (its read group: answers)
# and as nobody (outside its groups: one podctl line, exit 4); then SIGINT and its log.
sock=/tmp/podagent-state/podagent.sock
su -s /bin/sh podagent -c 'exec timeout -s INT 25 podagent run --config /tmp/nothing.toml' >/tmp/run.log 2>&1 &
daemon=$!
for _ in $(seq 150); do [ -S "$sock" ] && break; sleep 0.2; done
[ -S "$sock" ] || { echo "no control socket"; cat /tmp/run.log; exit 1; }
su -s /bin/sh podagent -c "podctl --socket $sock devices"
rc=0; su -s /bin/sh nobody -c "podctl --socket $sock status" 2>/tmp/nobody.err || rc=$?
cat /tmp/nobody.err
[ "$rc" -eq 4 ] && grep -q '^podctl: permission denied' /tmp/nobody.err && [ "$(wc -l </tmp/nobody.err)" -eq 1 ] \
  || { echo "nobody got exit $rc, expected 4 and one podctl line"; exit 1; }
for _ in $(seq 150); do grep -q '"ready: first poll' /tmp/run.log && break; sleep 0.2; done
kill -INT "$daemon" 2>/dev/null || true
rc=0; wait "$daemon" || rc=$?
echo "podagent run exited $rc"; head -c 3000 /tmp/run.log
[ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]
grep -q '"ready: first poll of every device done", "level": "info"' /tmp/run.log
grep -q '"device": "pdu-nowhere".*SNMP v2c: check the community and port 1.*"level": "warning"' /tmp/run.log
SH
in_root "bash -eu /tmp/daemon-check.sh"
say "ok ($mode)"
