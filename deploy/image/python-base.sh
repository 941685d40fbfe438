#!/usr/bin/env bash
# Build the base image from Debian's packages when python:3.11-slim-bookworm cannot be pulled (no registry, an
# air-gapped network): Debian 12's Python 3.11 with pip and venv, CA certificates, netbase and tzdata, imported
# as localhost/python-base:3.11-bookworm (pass it with --build-arg PYTHON_IMAGE=...). Needs root, mmdebstrap and
# the Debian archive this machine's apt uses (MIRROR, default deb.debian.org). ENGINE: podman (default) or docker.
set -euo pipefail
engine=${ENGINE:-podman}
name=${BASE_IMAGE:-localhost/python-base:3.11-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
tar=$(mktemp --suffix .tar)
trap 'rm -f "$tar"' EXIT
# pip would refuse to install into Debian's Python without removing its EXTERNALLY-MANAGED marker (PEP 668):
# the image, like python:3.11-slim, is a Python for one application.
mmdebstrap --quiet --variant=minbase \
  --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,netbase,tzdata \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook='rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED' \
  bookworm "$tar" "$mirror"
"$engine" import --change 'CMD ["python3"]' "$tar" "$name" >/dev/null
echo "$name"
