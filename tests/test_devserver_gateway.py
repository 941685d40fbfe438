"""`--require-apikey`: the dev server behaves like Supabase's gateway in front of PostgREST."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from syncd import auth
from tests.conftest import DevServer, start_devserver


@pytest.fixture(scope="module")
def gateway(devserver: DevServer, migrations_with_tests: Path) -> Iterator[DevServer]:
    server = start_devserver("--pg-url", devserver.pg_url, "--require-apikey", "--jwt-secret", devserver.jwt_secret,
                             migrations=migrations_with_tests)
    yield server
    server.stop()


def test_missing_apikey_is_401_no_api_key_found(gateway: DevServer):
    r = gateway.client(gateway.service_key).get("/items")
    assert r.status_code == 401 and r.json() == {"message": "No API key found in request"}


def test_wrong_apikey_is_401_invalid_api_key(gateway: DevServer):
    forged = auth.mint_token("y" * 40, "service_role")
    r = gateway.client(gateway.service_key, apikey=forged).get("/items")
    assert r.status_code == 401 and r.json() == {"message": "Invalid API key"}


def test_apikey_alone_authenticates_as_its_role(gateway: DevServer):
    """Without Authorization, the gateway forwards the apikey as the bearer token."""
    service = gateway.client(apikey=gateway.service_key)
    r = service.post("/people?on_conflict=id", json=[{"id": 901, "email": "gw@x"}],
                     headers={"Prefer": "resolution=merge-duplicates"})
    assert r.status_code in (200, 201)
    anon = gateway.client(apikey=gateway.anon_key)
    assert anon.post("/people", json={"id": 902}).status_code == 401


def test_authorization_wins_over_the_apikey_role(gateway: DevServer):
    client = gateway.client(gateway.service_key, apikey=gateway.anon_key)
    assert client.get("/people").status_code == 200


def test_dev_endpoints_do_not_exist_without_faults_flag(gateway: DevServer):
    assert httpx.get(f"{gateway.root}/_dev/faults").status_code == 404
