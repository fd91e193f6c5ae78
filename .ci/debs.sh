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
# bench/vs_collectd.py: collectd 5.12 (snmp and modbus plugins; the modbus one needs libmodbus).
command -v collectd >/dev/null || need+=(collectd-core libmodbus5)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
