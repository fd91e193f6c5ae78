#!/usr/bin/env bash
# Installs the Debian packages podagent's tests and demo use, when any is missing.
set -euo pipefail
need=()
command -v snmpget >/dev/null || need+=(snmp)
command -v mbpoll >/dev/null || need+=(mbpoll)
command -v socat >/dev/null || need+=(socat)
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v tmux >/dev/null || need+=(tmux)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v openssl >/dev/null || need+=(openssl)
command -v promtool >/dev/null || need+=(prometheus)  # promtool and the server: tests/test_prometheus*.py
# `debs.sh packaging`: also what `make deb` (dpkg-buildpackage, debhelper, dh-virtualenv, Debian's
# python3-venv/-dev) and `make test-deb` (debootstrap) use.
if [ "${1:-}" = packaging ]; then
  for p in dpkg-dev debhelper dh-virtualenv python3-venv python3-dev debootstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
  done
fi
# bench/vs_collectd.py: collectd 5.12 (snmp and modbus plugins; the modbus one needs libmodbus).
command -v collectd >/dev/null || need+=(collectd-core libmodbus5)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
