#!/usr/bin/env bash
# `make deb`: builds podagent_VERSION_ARCH.deb with Debian's own tooling (dpkg-buildpackage,
# debhelper, dh-virtualenv from Debian 12) from a copy of this tree, and puts it in dist/.
# Installs the build dependencies when missing (.ci/debs.sh packaging).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
bash "$src/.ci/debs.sh" packaging
work=$(mktemp -d "${TMPDIR:-/tmp}/podagent-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/podagent"
tar -C "$src" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache \
  --exclude=./.hypothesis -cf - . | tar -C "$work/podagent" -xf -
echo "deb: dpkg-buildpackage in $work/podagent (pip fetches the dependencies from PyPI)"
# Debian's python3, whatever python3 is first on PATH (pyenv, a venv).
(cd "$work/podagent" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc)
mkdir -p "$src/dist"
cp "$work"/podagent_*.deb "$src/dist/"
ls -l "$src"/dist/podagent_*.deb
