"""`syncd healthcheck`: the container's HEALTHCHECK, asking the daemon running beside it whether its loop is alive.

The daemon's metrics address is found the way `syncd run` finds it, without loading the whole configuration (a
healthcheck must not fail because a secret file is unreadable, say): `--metrics-addr`, else SYNCD_METRICS_ADDR,
else `[worker] metrics_addr` of the configuration file, else the default 127.0.0.1:9464. A wildcard host (0.0.0.0,
[::]) is asked on loopback. Exit 0 when /healthz answers 200 (metrics.Health.alive), 1 otherwise, with the reason
on stderr: Docker keeps the last few outputs in `docker inspect`'s .State.Health.Log.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import httpx

from syncd.config import WorkerConfig, default_config_file
from syncd.metrics import local_url

HEALTHZ_TIMEOUT_SECONDS = 4.0  # below the Dockerfile's HEALTHCHECK --timeout (5 s)


def metrics_address(flag: str | None, env: Mapping[str, str] | None = None) -> str:
    """host:port of the daemon's /healthz: the flag, SYNCD_METRICS_ADDR, the config file's [worker] metrics_addr or
    the default, in that order (an unreadable config file counts as one without the key)."""
    environ = os.environ if env is None else env
    if flag:
        return flag
    if environ.get("SYNCD_METRICS_ADDR"):
        return environ["SYNCD_METRICS_ADDR"]
    return configured_address(default_config_file(environ)) or WorkerConfig().metrics_addr


def configured_address(path: Path | None) -> str | None:
    """`[worker] metrics_addr` of the TOML file at `path`, or None (no file, not TOML, no such key)."""
    if path is None:
        return None
    try:
        with path.open("rb") as handle:
            worker = tomllib.load(handle).get("worker", {})
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    value = worker.get("metrics_addr") if isinstance(worker, dict) else None
    return value if isinstance(value, str) and value else None


def probe(address: str) -> tuple[bool, str]:
    """(healthy, what was seen): GET /healthz at `address`; healthy only on 200."""
    url = local_url(address, "/healthz")
    try:
        answer = httpx.get(url, timeout=HEALTHZ_TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return False, f"{url}: {type(exc).__name__} (is `syncd run` listening there? it logs its metrics address)"
    if answer.status_code != 200:
        return False, f"{url}: HTTP {answer.status_code} {answer.text.strip()[:200]} (the drain loop is not alive: " \
                      "see the daemon's log)"
    return True, f"{url}: alive"
