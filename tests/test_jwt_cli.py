"""`syncd jwt gen|sign|verify`: the seed's tools/gen_jwt.py, with the seed's own example payloads."""

from __future__ import annotations

import re
import subprocess
import sys

import jwt
import pytest

from tests.conftest import DevServer

SECRET = "s3cr3t-" + "x" * 40
SEED_PAYLOADS = {  # verbatim from the seed's "JWT Payload Structure"
    "anon": {"role": "anon", "iss": "supabase", "iat": 1704067200, "exp": 1735689600},
    "service_role": {"role": "service_role", "iss": "supabase", "iat": 1704067200, "exp": 1735689600},
    "authenticated": {"sub": "user-uuid", "role": "authenticated", "aud": "authenticated",
                      "email": "user@example.com", "iss": "supabase", "iat": 1704067200, "exp": 1704153600},
}


def syncd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd", "jwt", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_gen_prints_secret_setting_line_and_both_keys():
    out = syncd("gen", "--secret-length", "48").stdout
    secret = re.search(r"PGRST_JWT_SECRET=(\S+)", out)[1]  # type: ignore[index]
    assert len(secret) == 48 and f"Generated JWT Secret (48 chars):\n{secret}" in out
    anon = re.search(r"SUPABASE_ANON_KEY=(\S+)", out)[1]  # type: ignore[index]
    service = re.search(r"SUPABASE_SERVICE_KEY=(\S+)", out)[1]  # type: ignore[index]
    for token, role in ((anon, "anon"), (service, "service_role")):
        claims = jwt.decode(token, secret, algorithms=["HS256"])
        assert claims["role"] == role and claims["iss"] == "supabase" and claims["exp"] > claims["iat"]


@pytest.mark.parametrize("role", list(SEED_PAYLOADS))
def test_the_seed_payloads_verify_and_are_reported_expired(role: str):
    """The seed's examples expired in 2025: verify checks the signature, shows the role, says EXPIRED."""
    token = jwt.encode(SEED_PAYLOADS[role], SECRET, algorithm="HS256")
    result = syncd("verify", token, "--secret", SECRET)
    assert "signature: valid" in result.stdout and f"role:      {role}" in result.stdout
    assert "EXPIRED" in result.stdout and result.returncode == 1
    if role == "authenticated":
        assert "sub:       user-uuid" in result.stdout and "aud:       authenticated" in result.stdout


def test_verify_flags_a_wrong_secret_and_a_malformed_token():
    token = jwt.encode({"role": "anon", "exp": 4102444800}, SECRET, algorithm="HS256")
    wrong = syncd("verify", token, "--secret", "y" * 40)
    assert "signature: INVALID" in wrong.stdout and wrong.returncode == 1
    good = syncd("verify", token, "--secret", SECRET)
    assert good.returncode == 0 and "EXPIRED" not in good.stdout
    unchecked = syncd("verify", token, env={"PATH": "/usr/bin"})
    assert "not checked" in unchecked.stdout
    assert syncd("verify", "not.a.jwt").returncode == 1


def test_signed_token_works_against_the_dev_server(devserver: DevServer):
    token = syncd("sign", "--role", "service_role", "--expires-in", "5m", "--secret", devserver.jwt_secret).stdout
    claims = jwt.decode(token.strip(), devserver.jwt_secret, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 300
    assert devserver.client(token.strip()).get("/artifacts").status_code == 200
    user = syncd("sign", "--role", "authenticated", "--sub", "u-1", "--secret", devserver.jwt_secret).stdout.strip()
    assert jwt.decode(user, devserver.jwt_secret, algorithms=["HS256"], audience="authenticated")["sub"] == "u-1"


@pytest.mark.parametrize("args", [["gen", "--secret-length", "16"], ["sign", "--role", "anon", "--secret", "short"],
                                  ["sign", "--role", "anon", "--secret", "z" * 40, "--expires-in", "soon"],
                                  ["gen", "--secret-length", "99999999999"],  # ran until killed, 11 MB/s
                                  ["gen", "--expires-in", "0"],
                                  ["sign", "--role", "anon", "--secret", "z" * 40, "--expires-in", "0s"]])
def test_bad_arguments_are_clear_errors(args: list[str]):
    result = syncd(*args)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr
    assert args[-2] in result.stderr and result.stdout == "", result.stderr
