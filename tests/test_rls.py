"""The seed's "Testing RLS Policies" scenarios, through the dev server and the real PostgREST with real JWTs, against
the project's migrations (002_cipher_tables.sql with the corrected service-role policies)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.postgrest import Secondary

ALICE = "11111111-1111-1111-1111-111111111111"
BOB = "22222222-2222-2222-2222-222222222222"


@pytest.fixture
def seeded(pg: psycopg.Connection) -> Iterator[None]:
    """Two users with one memory and one preference row each; one enabled and one disabled skill."""
    reset = "TRUNCATE public.cipher_memory, public.user_prefs, public.skills_registry; " \
            f"DELETE FROM auth.users WHERE id IN ('{ALICE}', '{BOB}')"
    pg.execute(reset)
    pg.execute(f"INSERT INTO auth.users (id, email) VALUES ('{ALICE}', 'alice@x'), ('{BOB}', 'bob@x')")
    pg.execute(f"""INSERT INTO public.cipher_memory (user_id, category, content) VALUES
        ('{ALICE}', 'insight', '{{"text": "alice"}}'), ('{BOB}', 'insight', '{{"text": "bob"}}')""")
    pg.execute(f"INSERT INTO public.user_prefs (user_id, theme) VALUES ('{ALICE}', 'dark'), ('{BOB}', 'light')")
    pg.execute("""INSERT INTO public.skills_registry (name, workflow_def, enabled) VALUES
        ('web_search', '{}', true), ('retired', '{}', false)""")
    yield
    pg.execute(reset)


def as_user(secondary: Secondary, sub: str) -> httpx.Client:
    return secondary.client(secondary.token("authenticated", sub=sub, aud="authenticated", email="u@x"))


def memory_owners(pg: psycopg.Connection) -> list[str]:
    return [str(r[0]) for r in pg.execute("SELECT user_id FROM cipher_memory ORDER BY user_id").fetchall()]


@pytest.mark.usefixtures("seeded")
class TestCipherMemory:
    def test_anon_reads_no_memories(self, secondary: Secondary):
        r = secondary.client(secondary.anon_key).get("/cipher_memory")
        assert r.status_code == 200 and r.json() == []

    def test_anon_cannot_insert(self, secondary: Secondary, pg: psycopg.Connection):
        r = secondary.client(secondary.anon_key).post(
            "/cipher_memory", json={"user_id": ALICE, "category": "x", "content": {}})
        assert r.status_code == 401 and r.json()["code"] == "42501"
        assert len(memory_owners(pg)) == 2

    def test_user_reads_only_own_memories(self, secondary: Secondary):
        r = as_user(secondary, ALICE).get("/cipher_memory?select=user_id,content")
        assert r.json() == [{"user_id": ALICE, "content": {"text": "alice"}}]

    def test_user_writes_own_memory(self, secondary: Secondary, pg: psycopg.Connection):
        r = as_user(secondary, ALICE).post("/cipher_memory", json={"user_id": ALICE, "category": "c",
                                                                   "content": {"text": "new"}})
        assert r.status_code == 201
        assert memory_owners(pg) == [ALICE, ALICE, BOB]

    def test_user_cannot_insert_for_someone_else(self, secondary: Secondary, pg: psycopg.Connection):
        r = as_user(secondary, ALICE).post("/cipher_memory", json={"user_id": BOB, "category": "c", "content": {}})
        assert r.status_code == 403 and r.json()["code"] == "42501"
        assert "row-level security" in r.json()["message"]
        assert memory_owners(pg) == [ALICE, BOB]

    def test_user_cannot_change_or_delete_someone_elses_memory(self, secondary: Secondary, pg: psycopg.Connection):
        alice = as_user(secondary, ALICE)
        assert alice.patch(f"/cipher_memory?user_id=eq.{BOB}", json={"category": "hacked"}).status_code == 204
        assert alice.delete(f"/cipher_memory?user_id=eq.{BOB}").status_code == 204
        assert pg.execute(f"SELECT category FROM cipher_memory WHERE user_id = '{BOB}'").fetchall() == [("insight",)]

    def test_service_role_reads_and_writes_all(self, secondary: Secondary, pg: psycopg.Connection):
        service = secondary.client(secondary.service_key)
        assert len(service.get("/cipher_memory").json()) == 2
        r = service.post("/cipher_memory", json={"user_id": BOB, "category": "c", "content": {}})
        assert r.status_code == 201
        assert service.patch("/cipher_memory?category=eq.insight", json={"category": "seen"}).status_code == 204
        assert pg.execute("SELECT count(*) FROM cipher_memory WHERE category = 'seen'").fetchone() == (2,)


@pytest.mark.usefixtures("seeded")
class TestUserPrefs:
    def test_user_reads_only_own_prefs(self, secondary: Secondary):
        assert as_user(secondary, BOB).get("/user_prefs?select=theme").json() == [{"theme": "light"}]

    def test_user_cannot_write_prefs_for_someone_else(self, secondary: Secondary):
        r = as_user(secondary, ALICE).post("/user_prefs?on_conflict=user_id", json={"user_id": BOB, "theme": "x"},
                                           headers={"Prefer": "resolution=merge-duplicates"})
        assert r.status_code == 403

    def test_anon_reads_no_prefs(self, secondary: Secondary):
        assert secondary.client(secondary.anon_key).get("/user_prefs").json() == []


@pytest.mark.usefixtures("seeded")
class TestSkillsRegistry:
    @pytest.mark.parametrize("who", ["anon", "authenticated"])
    def test_everyone_reads_enabled_skills_only(self, secondary: Secondary, who: str):
        client = secondary.client(secondary.anon_key) if who == "anon" else as_user(secondary, ALICE)
        assert client.get("/skills_registry?select=name").json() == [{"name": "web_search"}]

    def test_service_role_reads_every_skill(self, secondary: Secondary):
        names = {r["name"] for r in secondary.client(secondary.service_key).get("/skills_registry").json()}
        assert names == {"web_search", "retired"}

    def test_only_service_role_writes_skills(self, secondary: Secondary, pg: psycopg.Connection):
        skill = {"name": "new_skill", "workflow_def": {"steps": []}}
        assert secondary.client(secondary.anon_key).post("/skills_registry", json=skill).status_code == 401
        user = as_user(secondary, ALICE)
        assert user.post("/skills_registry", json=skill).status_code == 403
        assert user.patch("/skills_registry?name=eq.web_search", json={"enabled": False}).status_code == 204
        assert pg.execute("SELECT enabled FROM skills_registry WHERE name = 'web_search'").fetchone() == (True,)
        service = secondary.client(secondary.service_key)
        assert service.post("/skills_registry", json=skill).status_code == 201
        assert pg.execute("SELECT count(*) FROM skills_registry").fetchone() == (3,)


def test_seed_policy_form_never_matches_on_postgrest_v12(pg: psycopg.Connection):
    """Why 002 was corrected: PostgREST v12 sets request.jwt.claims only, so the seed's per-claim
    setting is empty and `current_setting('request.jwt.claim.role', true) = 'service_role'` is never true."""
    with pg.transaction():
        pg.execute("SELECT set_config('request.jwt.claims', '{\"role\": \"service_role\"}', true)")
        seed_form, corrected = pg.execute(
            "SELECT current_setting('request.jwt.claim.role', true) = 'service_role', auth.role() = 'service_role'"
        ).fetchone()
    assert seed_form is not True and corrected is True
