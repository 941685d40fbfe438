#!/usr/bin/env bash
# Download every wheel the image's build installs (deploy/requirements.txt and deploy/requirements-build.txt,
# hash-checked) into DIR, for an offline build (README, "Deployment"). Run it on a machine of the image's
# platform (Linux x86_64 or aarch64, CPython 3.11), with network.
set -euo pipefail
dir=${1:?usage: deploy/image/wheelhouse.sh DIR}
cd "$(dirname "$0")/../.."
python3 -m pip download -q --disable-pip-version-check --no-deps --require-hashes --only-binary=:all: \
  --implementation cp --python-version 3.11 --dest "$dir" \
  -r deploy/requirements.txt -r deploy/requirements-build.txt
echo "$dir: $(ls "$dir" | wc -l) wheels"
