#!/usr/bin/env bash
# Installs podagent as a systemd service on Debian 12 (run as root; `make install-service`):
# the podagent user and group, the podagent-admin group (changing podctl requests), a venv in
# /opt/podagent/.venv with podagent and podctl linked into /usr/local/bin, the units, man pages,
# shell completion, docs in /usr/share/doc/podagent, and a config skeleton in /etc/podagent
# (never overwrites an existing config). Safe to run again to upgrade.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/podagent
step() { echo "install.sh: $*"; }

if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
  step "installing Debian's python3-venv"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
fi

step "users and groups: podagent (the service; podctl read access), podagent-admin (podctl changes)"
getent group podagent >/dev/null || groupadd --system podagent
id podagent >/dev/null 2>&1 || useradd --system --gid podagent --home-dir /var/lib/podagent \
  --no-create-home --shell /usr/sbin/nologin --comment "podagent edge agent" podagent
getent group podagent-admin >/dev/null || groupadd --system podagent-admin

step "venv $prefix/.venv (Debian's python3) with podagent from $src"
install -d -m 0755 "$prefix"
[ -x "$prefix/.venv/bin/python" ] || /usr/bin/python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/pip" install -q --upgrade pip
# Build from a copy: a non-editable install that leaves no root-owned build/ in the checkout.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -a "$src/pyproject.toml" "$src/README.md" "$src/agent" "$src/hwsim" "$stage/"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
"$prefix/.venv/bin/pip" install --upgrade "$stage"
for cmd in podagent podctl; do ln -sfn "$prefix/.venv/bin/$cmd" "/usr/local/bin/$cmd"; done

step "man pages, shell completion, docs"
"$prefix/.venv/bin/python" -m agent.manpages "$stage/man"
install -d /usr/local/share/man/man1
install -m 0644 "$stage"/man/*.1 /usr/local/share/man/man1/
install -d /usr/share/bash-completion/completions /usr/local/share/zsh/site-functions
_PODCTL_COMPLETE=source_bash "$prefix/.venv/bin/podctl" >/usr/share/bash-completion/completions/podctl
_PODCTL_COMPLETE=source_zsh "$prefix/.venv/bin/podctl" >/usr/local/share/zsh/site-functions/_podctl
install -d /usr/share/doc/podagent/docs
install -m 0644 "$src/README.md" "$src/config/example.toml" /usr/share/doc/podagent/
install -m 0644 "$src"/docs/*.md /usr/share/doc/podagent/docs/

install -d -m 0750 -o root -g podagent /etc/podagent
if [ ! -e /etc/podagent/podagent.toml ]; then
  install -m 0640 -o root -g podagent "$src/config/example.toml" /etc/podagent/podagent.toml
  step "wrote /etc/podagent/podagent.toml: edit it (devices, secrets), then:"
  step "  podagent check-config /etc/podagent/podagent.toml"
fi

step "units: $(cd "$src/systemd" && echo *.service)"
install -m 0644 "$src"/systemd/*.service /etc/systemd/system/
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  step "installed; start with: systemctl enable --now podagent"
else
  step "installed (systemd is not running here: enable the unit on the target host)"
fi
