"""`syncd healthcheck` (the image's HEALTHCHECK): where it asks, and what it answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd import cli
from syncd.healthcheck import metrics_address, probe
from syncd.metrics import Metrics, local_url, serve
from tests.e2e import free_port


def test_the_address_is_the_flag_then_the_environment_then_the_file_then_the_default(tmp_path: Path) -> None:
    config = tmp_path / "syncd.toml"
    config.write_text('[worker]\nmetrics_addr = "127.0.0.1:7003"\n', encoding="utf-8")
    env = {"SYNCD_CONFIG": str(config), "SYNCD_METRICS_ADDR": "0.0.0.0:7002"}
    assert metrics_address("127.0.0.1:7001", env) == "127.0.0.1:7001"
    assert metrics_address(None, env) == "0.0.0.0:7002"
    assert metrics_address(None, {"SYNCD_CONFIG": str(config)}) == "127.0.0.1:7003"
    assert metrics_address(None, {"SYNCD_CONFIG": str(tmp_path / "missing.toml")}) == "127.0.0.1:9464"
    config.write_text("not toml [", encoding="utf-8")
    assert metrics_address(None, {"SYNCD_CONFIG": str(config)}) == "127.0.0.1:9464"


@pytest.mark.parametrize(("address", "url"), [("0.0.0.0:9464", "http://127.0.0.1:9464/healthz"),
                                              ("[::]:9464", "http://[::1]:9464/healthz"),
                                              ("127.0.0.2:80", "http://127.0.0.2:80/healthz")])
def test_a_wildcard_host_is_asked_on_loopback(address: str, url: str) -> None:
    assert local_url(address, "/healthz") == url


def test_healthy_stuck_and_absent(capsys: pytest.CaptureFixture[str]) -> None:
    metrics = Metrics()
    server = serve(metrics, "127.0.0.1:0")
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert probe(address) == (True, f"http://{address}/healthz: alive")
        assert cli.main(["healthcheck", "--metrics-addr", address]) == 0
        metrics.health.heartbeat = 0.0
        healthy, seen = probe(address)
        assert not healthy and "HTTP 503" in seen
        assert cli.main(["healthcheck", "--metrics-addr", address]) == 1
    finally:
        server.shutdown()
        server.server_close()
    closed = f"127.0.0.1:{free_port()}"
    assert cli.main(["healthcheck", "--metrics-addr", closed]) == 1
    assert "ConnectError" in capsys.readouterr().err


def test_syncd_run_reads_the_same_variable() -> None:
    from syncd.config import load_config

    assert load_config(None, env={"SYNCD_METRICS_ADDR": "0.0.0.0:7010"}).worker.metrics_addr == "0.0.0.0:7010"
    assert load_config(None, env={"SYNCD_METRICS_ADDR": "0.0.0.0:7010"},
                       overrides={"worker.metrics_addr": "127.0.0.1:7011"}).worker.metrics_addr == "127.0.0.1:7011"
