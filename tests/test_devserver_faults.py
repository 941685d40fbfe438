"""Fault injection (`--faults`): each fault does what a sync client must survive, and is counted."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import psycopg
import pytest

from tests.conftest import DevServer

pytestmark = pytest.mark.usefixtures("clean")
Configure = Callable[..., dict[str, object]]


def stats(devserver: DevServer) -> dict[str, dict[str, object]]:
    return httpx.get(f"{devserver.root}/_dev/stats").json()


def test_error_rate_answers_the_configured_status(devserver: DevServer, service: httpx.Client,
                                                  faults: Configure, pg: psycopg.Connection):
    faults(error_rate=1, error_status=500)
    r = service.post("/items", json={"id": 1, "name": "a"})
    assert r.status_code == 500 and set(r.json()) == {"code", "details", "hint", "message"}
    assert pg.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert stats(devserver) == {"requests": {"POST": {"500": 1}}, "faults": {"error": 1}}


def test_reset_closes_the_connection_without_an_answer_and_applies_nothing(
        devserver: DevServer, service: httpx.Client, faults: Configure, pg: psycopg.Connection):
    faults(reset_rate=1)
    with pytest.raises(httpx.RemoteProtocolError):
        service.post("/items", json={"id": 1, "name": "a"})
    assert pg.execute("SELECT count(*) FROM items").fetchone() == (0,)
    assert stats(devserver)["faults"] == {"reset": 1}


def test_timeout_applies_the_request_but_never_answers(devserver: DevServer, faults: Configure,
                                                       pg: psycopg.Connection):
    """The written-but-unacknowledged case: the client times out, yet the row was committed."""
    faults(timeout_rate=1, delay_ms=1500)
    with devserver.client(devserver.service_key) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/items", json={"id": 1, "name": "a"}, timeout=0.5)
    assert pg.execute("SELECT name FROM items").fetchall() == [("a",)]


def test_down_answers_503_pgrst000_with_retry_after(devserver: DevServer, service: httpx.Client, faults: Configure):
    faults(down=True, retry_after=3)
    r = service.get("/items")
    assert r.status_code == 503 and r.json()["code"] == "PGRST000"
    assert r.headers["retry-after"] == "3"
    faults(down=False)
    assert service.get("/items").status_code == 200


def test_delay_slows_every_answer(service: httpx.Client, faults: Configure):
    faults(delay_ms=300)
    started = time.monotonic()
    assert service.get("/items").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_same_seed_gives_the_same_sequence_of_faults(service: httpx.Client, faults: Configure):
    def pattern() -> list[int]:
        faults(error_rate=0.5, error_status=502, seed=42)
        return [service.get("/items").status_code for _ in range(30)]

    first = pattern()
    assert first == pattern()
    assert {200, 502} == set(first)


def test_stats_count_requests_by_method_and_status(devserver: DevServer, service: httpx.Client, faults: Configure):
    service.get("/items")
    service.get("/nope")
    service.post("/items", json={"id": 1, "name": "a"})
    assert stats(devserver)["requests"] == {"GET": {"200": 1, "404": 1}, "POST": {"201": 1}}


@pytest.mark.parametrize("body", [{"error_rate": 2}, {"reset_rate": -0.1}, {"bogus": 1}, {"error_status": 200}])
def test_invalid_fault_settings_are_refused_naming_the_field(devserver: DevServer, faults: Configure,
                                                             body: dict[str, object]):
    r = httpx.put(f"{devserver.root}/_dev/faults", json=body)
    assert r.status_code == 400
    assert next(iter(body)) in r.json()["message"]
    assert httpx.get(f"{devserver.root}/_dev/faults").json()["error_rate"] == 0
