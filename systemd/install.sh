#!/usr/bin/env bash
# Installs podagent as a systemd service: the podagent user and group, /opt/podagent (venv),
# the unit, and a config skeleton in /etc/podagent (never overwrites an existing config).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
src=$(cd "$(dirname "$0")/.." && pwd)
getent group podagent >/dev/null || groupadd --system podagent
id podagent >/dev/null 2>&1 || useradd --system --gid podagent --home-dir /var/lib/podagent \
  --shell /usr/sbin/nologin --comment "podagent edge agent" podagent
install -d -m 0755 /opt/podagent
if [ "$src" != /opt/podagent ]; then
  cp -a "$src/pyproject.toml" "$src/README.md" "$src/agent" "$src/hwsim" "$src/config" /opt/podagent/
fi
python3 -m venv /opt/podagent/.venv
/opt/podagent/.venv/bin/pip install -q --upgrade pip
/opt/podagent/.venv/bin/pip install -q /opt/podagent
install -d -m 0750 -o root -g podagent /etc/podagent
if [ ! -e /etc/podagent/podagent.toml ]; then
  install -m 0640 -o root -g podagent "$src/config/example.toml" /etc/podagent/podagent.toml
  echo "wrote /etc/podagent/podagent.toml: edit it, then: podagent check-config /etc/podagent/podagent.toml"
fi
install -m 0644 "$src/systemd/podagent.service" /etc/systemd/system/podagent.service
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "installed; start with: systemctl enable --now podagent"
else
  echo "installed (systemd is not running here: enable the unit on the target host)"
fi
