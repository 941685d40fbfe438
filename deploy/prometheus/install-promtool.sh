#!/usr/bin/env bash
# Install promtool (Prometheus's rule checker and rule unit-test runner) as /usr/local/bin/promtool, for
# tests/test_deploy.py. It comes from Debian's `prometheus` package, but only that one binary is unpacked: no
# server, no service, no user, no web assets. Needs root and apt. Does nothing when promtool is already on
# PATH; fails loudly otherwise (CI must really run the rule tests).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "promtool already installed: $(command -v promtool)"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
apt-get update -qq
# As root into a private directory: download without apt's _apt sandbox user (which could not write there).
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root prometheus)
dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
install -m 0755 "$work/usr/bin/promtool" /usr/local/bin/promtool
promtool --version 2>&1 | head -n 1
