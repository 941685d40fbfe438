"""The demo application: the seed's write methods over SQLite, and a workload that calls them at a rate.

`DemoApp` is what the seed's `ExtendedDatabase` does for its writes (add_artifact, add_fact, add_evidence,
add_document ... add_memory, set_user_pref, register_skill, update_skill, reset), written the way a real
application writes and knowing nothing of syncd: stdlib `sqlite3`, WAL mode, foreign keys on, one
transaction per call. `Workload` picks the next call from what already exists (inserts, updates and
deletes over every table of syncd/demo/schema.sql, with JSON text, 0/1 booleans, ISO and unix times,
BLOB digests and float32 embeddings) and paces them. `python -m syncd.demo.app --db PATH --rate N` runs it
on its own (the compose file's app container); `syncd demo` runs it in a thread.

The Cipher tables reference auth.users in PostgreSQL: the app only uses the users of `DEMO_USERS`, which
the secondary must hold (`python -m syncd.demo.app --users-sql` prints the INSERT).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import signal
import sqlite3
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from types import FrameType

__all__ = ["DEMO_USERS", "EMBEDDING_DIMENSIONS", "DemoApp", "Workload", "connect", "schema_sql", "users_sql"]

EMBEDDING_DIMENSIONS = 384
JsonValue = Mapping[str, object] | Sequence[object] | str | int | float | bool | None
OnWrite = Callable[[str, int], None]

# Stable ids (uuid5), so the secondary's auth.users can be prepared before the app ever runs.
DEMO_USERS: tuple[tuple[str, str], ...] = tuple(
    (str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.demo.syncd.invalid")), f"{name}@demo.syncd.invalid")
    for name in ("alice", "bob", "chen", "dara", "emeka")
)
# Child tables before parents: what reset() empties (the workspace; users' memories, prefs and skills stay).
DOCUMENT_TABLES = ("fact", "evidence", "search_chunk", "document_section", "document_table", "api_endpoint",
                   "log", "tag", "tag_prompt", "entity", "structure", "metric_hit", "summary", "artifact",
                   "document")


def schema_sql() -> str:
    """The demo app's SQLite schema (syncd/demo/schema.sql, package data), as SQL text."""
    return resources.files("syncd.demo").joinpath("schema.sql").read_text(encoding="utf-8")


def users_sql() -> str:
    """The INSERT that gives the secondary's auth.users the demo's users (idempotent)."""
    values = ",\n    ".join(f"('{user_id}', '{email}')" for user_id, email in DEMO_USERS)
    return f"INSERT INTO auth.users (id, email) VALUES\n    {values}\nON CONFLICT (id) DO NOTHING;"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating when new) the app's database as the app does: WAL, foreign keys, explicit transactions."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'artifact'").fetchone() is None:
        conn.executescript(f"BEGIN;\n{schema_sql()}\nCOMMIT;")
    return conn


def now_iso() -> str:
    """ISO 8601 UTC with milliseconds, as the schema's defaults write it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    """A new row id: a random uuid4, as text."""
    return str(uuid.uuid4())


def to_json(value: JsonValue) -> str | None:
    """A value as JSON text; text is taken to be JSON already (as the seed stores it), None stays NULL."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def float32_blob(vector: Sequence[float]) -> bytes:
    """An embedding as search_chunk.embedding holds it: little-endian float32."""
    return struct.pack(f"<{len(vector)}f", *vector)


class DemoApp:
    """The seed's write methods; each call is one transaction (BEGIN IMMEDIATE), rolled back when it raises.
    `rows_written` counts the rows its committed statements changed (not those a foreign key cascades to). Errors are
    sqlite3's: IntegrityError for a missing parent, a NOT NULL or UNIQUE violation; OperationalError when the
    file stays locked past the 30 s busy timeout."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.rows_written = 0
        self._rows_in_transaction = 0

    @classmethod
    def open(cls, path: Path) -> DemoApp:
        """A DemoApp on `connect(path)`: the file and its schema are created when new."""
        return cls(connect(path))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        self._rows_in_transaction = 0
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        self.rows_written += self._rows_in_transaction

    def _write(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> int:
        changed = self.conn.execute(sql, params).rowcount
        self._rows_in_transaction += changed
        return changed

    def _insert(self, table: str, values: Mapping[str, object]) -> None:
        columns = ", ".join(values)
        self._write(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(values))})", list(values.values()))

    def _add(self, table: str, **values: object) -> str:
        row_id = new_id()
        with self._transaction():
            self._insert(table, {"id": row_id, **values})
        return row_id

    # ---- artifacts, evidence, facts ---------------------------------------------------------------------

    def add_artifact(self, filename: str, filepath: str, filetype: str, *, report_week: str | None = None,
                     status: str | None = "queued", source_url: str | None = None, sha256: bytes | None = None,
                     extras: JsonValue = None) -> str:
        """Insert one `artifact` row (`sha256` a BLOB, `extras` JSON text in extra_json); returns its new id."""
        return self._add("artifact", filename=filename, filepath=filepath, filetype=filetype,
                         report_week=report_week, status=status, source_url=source_url, sha256=sha256,
                         extra_json=to_json(extras))

    def update_artifact(self, artifact_id: str, *, status: str | None = None, extras: JsonValue = None) -> bool:
        """Update the `artifact` row's status and extra_json (`extras` as JSON text; None keeps a column as it is);
        True when the row exists."""
        with self._transaction():
            changed = self._write("UPDATE artifact SET status = coalesce(?, status), "
                                  "extra_json = coalesce(?, extra_json) WHERE id = ?",
                                  (status, to_json(extras), artifact_id))
        return changed > 0

    def delete_artifact(self, artifact_id: str) -> bool:
        """Delete the `artifact` row; its foreign keys cascade the delete to its `evidence`, `fact` and `search_chunk`
        rows (and set fact.evidence_id NULL in other artifacts' facts citing that evidence). True when it existed."""
        with self._transaction():
            return self._write("DELETE FROM artifact WHERE id = ?", (artifact_id,)) > 0

    def add_evidence(self, artifact_id: str, *, locator: str | None, preview: str | None,
                     content_type: str | None, coordinates: JsonValue = None, full_data: JsonValue = None) -> str:
        """Insert one `evidence` row under the artifact (coordinates, full_data as JSON text); returns its new id.
        IntegrityError when the artifact does not exist."""
        return self._add("evidence", artifact_id=artifact_id, locator=locator, preview=preview,
                         content_type=content_type, coordinates=to_json(coordinates), full_data=to_json(full_data))

    def add_fact(self, artifact_id: str, *, entity: str | None, content: str | None,
                 metrics: JsonValue = None, evidence_id: str | None = None, report_week: str | None = None) -> str:
        """Insert one `fact` row under the artifact, citing `evidence_id` or none (metrics as JSON text, '{}' when
        None); returns its new id. IntegrityError when the artifact or the evidence does not exist."""
        return self._add("fact", artifact_id=artifact_id, evidence_id=evidence_id, report_week=report_week,
                         entity=entity, content=content, metrics=to_json(metrics if metrics is not None else {}))

    # ---- documents and what is extracted from them ------------------------------------------------------

    def add_document(self, path: str, type: str, *, title: str | None = None, source: str | None = None,
                     created_at: str | None = None) -> str:
        """Insert one `document` row (`created_at` text stored as given, NULL when None); returns its new id."""
        return self._add("document", path=path, type=type, title=title, source=source, created_at=created_at)

    def delete_document(self, document_id: str) -> bool:
        """Delete the `document` row; its foreign keys cascade the delete to every row extracted from it:
        `document_section`, `document_table`, `api_endpoint`, `log`, `tag`, `tag_prompt`, `search_chunk`, `entity`,
        `structure` and `metric_hit` (`summary` holds no foreign key). True when it existed."""
        with self._transaction():
            return self._write("DELETE FROM document WHERE id = ?", (document_id,)) > 0

    def add_section(self, document_id: str, ordinal: int, text: str, *, page: int | None = None,
                    bbox: JsonValue = None) -> str:
        """Insert one `document_section` row under the document (bbox as JSON text); returns its new id.
        IntegrityError when the document does not exist."""
        return self._add("document_section", document_id=document_id, ordinal=ordinal, text=text, page=page,
                         bbox=to_json(bbox))

    def add_table(self, document_id: str, ordinal: int, content: JsonValue, *, page: int | None = None) -> str:
        """Insert one `document_table` row under the document (content as JSON text); returns its new id.
        IntegrityError when the document does not exist."""
        return self._add("document_table", document_id=document_id, ordinal=ordinal, page=page,
                         content=to_json(content))

    def add_api(self, document_id: str, method: str, path: str, *, name: str | None = None,
                summary: str | None = None, tags: JsonValue = None, params: JsonValue = None,
                responses: JsonValue = None, deprecated: bool = False) -> str:
        """Insert one `api_endpoint` row under the document (tags, params, responses as JSON text; deprecated as 0/1);
        returns its new id. IntegrityError when the document does not exist."""
        return self._add("api_endpoint", document_id=document_id, name=name, method=method, path=path,
                         summary=summary, tags=to_json(tags), params=to_json(params),
                         responses=to_json(responses), deprecated=int(deprecated))

    def add_log(self, message: str, *, level: str = "INFO", document_id: str | None = None,
                ts: int | None = None, code: str | None = None, component: str | None = None,
                attrs: JsonValue = None) -> str:
        """Insert one `log` row, under the document or none (`ts` in unix seconds, now when None; attrs as JSON text);
        returns its new id. IntegrityError when the document does not exist."""
        return self._add("log", document_id=document_id, ts=int(time.time()) if ts is None else ts, level=level,
                         code=code, component=component, message=message, attrs=to_json(attrs))

    def add_tag(self, document_id: str, tag: str, *, score: float | None = None, source_ptr: str | None = None,
                hrm_steps: int | None = None) -> str:
        """Insert one `tag` row under the document; returns its new id.
        IntegrityError when the document does not exist."""
        return self._add("tag", document_id=document_id, tag=tag, score=score, source_ptr=source_ptr,
                         hrm_steps=hrm_steps)

    def save_tag_prompt(self, document_id: str, prompt_text: str, *, examples: JsonValue = None,
                        author: str | None = None) -> str:
        """Insert one `tag_prompt` row under the document (examples as JSON text); returns its new id.
        IntegrityError when the document does not exist."""
        return self._add("tag_prompt", document_id=document_id, prompt_text=prompt_text,
                         examples=to_json(examples), author=author)

    def store_search_chunks(self, texts: Sequence[str], embeddings: Sequence[Sequence[float]], *,
                            document_id: str | None = None, artifact_id: str | None = None,
                            source_type: str | None = None, meta: JsonValue = None) -> list[str]:
        """Insert one `search_chunk` row per text (chunk_index 0, 1, ...; its embedding a little-endian float32 BLOB,
        meta as JSON text), under the document and/or the artifact; returns their new ids, in order. ValueError
        (nothing written) when texts and embeddings differ in length."""
        ids = [new_id() for _ in texts]
        with self._transaction():
            for index, (chunk_id, text, embedding) in enumerate(zip(ids, texts, embeddings, strict=True)):
                self._insert("search_chunk", {"id": chunk_id, "document_id": document_id, "artifact_id": artifact_id,
                                              "source_type": source_type, "chunk_index": index, "text": text,
                                              "meta": to_json(meta), "embedding": float32_blob(embedding)})
        return ids

    def reset_search_chunks(self, *, document_id: str | None = None, artifact_id: str | None = None) -> int:
        """Delete `search_chunk` rows: all of them when both ids are None, else those whose document_id and
        artifact_id are both exactly the ones given (None matching NULL). Returns how many rows were deleted."""
        with self._transaction():
            if document_id is None and artifact_id is None:
                return self._write("DELETE FROM search_chunk")
            return self._write("DELETE FROM search_chunk WHERE document_id IS ? AND artifact_id IS ?",
                               (document_id, artifact_id))

    def store_entities(self, document_id: str, entities: Sequence[Mapping[str, object]]) -> list[str]:
        """Replace the document's `entity` rows: delete them all, then insert one per mapping (its keys are entity
        columns: label, text, start_char, end_char, page, context; source_index is its position). Returns the new
        ids."""
        ids = [new_id() for _ in entities]
        with self._transaction():
            self._write("DELETE FROM entity WHERE document_id = ?", (document_id,))
            for index, (entity_id, entity) in enumerate(zip(ids, entities, strict=True)):
                self._insert("entity", {"id": entity_id, "document_id": document_id, "source_index": index,
                                        **entity})
        return ids

    def store_structure(self, document_id: str, hierarchy: JsonValue) -> None:
        """Upsert the document's one `structure` row (keyed by document_id; hierarchy as JSON text).
        IntegrityError when the document does not exist."""
        with self._transaction():
            self._write("INSERT INTO structure (document_id, hierarchy) VALUES (?, ?) "
                        "ON CONFLICT (document_id) DO UPDATE SET hierarchy = excluded.hierarchy",
                        (document_id, to_json(hierarchy)))

    def store_metric_hits(self, document_id: str, hits: Sequence[Mapping[str, object]]) -> list[str]:
        """Insert one `metric_hit` row per mapping, next to the document's existing ones (its keys are metric_hit
        columns: type, value, context, position, page; source_index is its position). Returns the new ids."""
        ids = [new_id() for _ in hits]
        with self._transaction():
            for index, (hit_id, hit) in enumerate(zip(ids, hits, strict=True)):
                self._insert("metric_hit", {"id": hit_id, "document_id": document_id, "source_index": index, **hit})
        return ids

    def store_summary(self, scope: str, scope_key: str, style: str, summary_text: str, *,
                      provider: str | None = None, prompt: str | None = None, artifact_ids: Sequence[str] = (),
                      evidence_ids: Sequence[str] = ()) -> str:
        """Insert one `summary` row (artifact_ids, evidence_ids as JSON arrays of ids, not foreign keys); returns its
        new id."""
        return self._add("summary", scope=scope, scope_key=scope_key, style=style, provider=provider, prompt=prompt,
                         summary_text=summary_text, artifact_ids=to_json(list(artifact_ids)),
                         evidence_ids=to_json(list(evidence_ids)))

    def reset(self) -> int:
        """Empty the workspace: delete every row of the DOCUMENT_TABLES, children first (fact ... artifact, document),
        so nothing is left to cascade; `cipher_memory`, `user_pref` and `skill` stay. Returns how many rows were
        deleted."""
        with self._transaction():
            return sum(self._write(f"DELETE FROM {table}") for table in DOCUMENT_TABLES)

    # ---- Cipher: memory, preferences, skills ------------------------------------------------------------

    def add_memory(self, category: str, content: JsonValue, context: JsonValue = None, *,
                   user_id: str | None = None, embedding: Sequence[float] | None = None) -> str:
        """Insert one `cipher_memory` row (content, context as JSON text; the embedding as a JSON array of numbers
        rounded to 6 decimals, TEXT, as the seed's Cipher stores it); returns its new id."""
        vector = None if embedding is None else json.dumps([round(v, 6) for v in embedding])
        return self._add("cipher_memory", user_id=user_id, category=category, content=to_json(content),
                         context=to_json(context), embedding=vector)

    def delete_memory(self, memory_id: str) -> bool:
        """Delete the `cipher_memory` row (nothing references it); True when it existed."""
        with self._transaction():
            return self._write("DELETE FROM cipher_memory WHERE id = ?", (memory_id,)) > 0

    def set_user_pref(self, user_id: str, key: str, value: JsonValue) -> None:
        """Set one preference: upsert the user's `user_pref` row (read, then INSERT ... ON CONFLICT DO UPDATE).
        `theme` and `language` have their own columns, any other key goes to the preferences JSON; updated_at is
        set to now."""
        with self._transaction():
            row = self.conn.execute("SELECT preferences, theme, language FROM user_pref WHERE user_id = ?",
                                    (user_id,)).fetchone()
            preferences, theme, language = (json.loads(row[0] or "{}"), row[1], row[2]) if row else ({}, "system",
                                                                                                     "en")
            if key == "theme":
                theme = value
            elif key == "language":
                language = value
            else:
                preferences[key] = value
            self._write("INSERT INTO user_pref (user_id, preferences, theme, language, updated_at) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
                        "preferences = excluded.preferences, theme = excluded.theme, "
                        "language = excluded.language, updated_at = excluded.updated_at",
                        (user_id, to_json(preferences), theme, language, now_iso()))

    def register_skill(self, name: str, description: str | None, parameters: JsonValue, workflow_def: JsonValue,
                       *, enabled: bool = True, created_by: str | None = None) -> str:
        """Insert one `skill` row (parameters, workflow_def as JSON text; enabled as 0/1); returns its new id.
        IntegrityError when the name is taken (UNIQUE)."""
        return self._add("skill", name=name, description=description, parameters=to_json(parameters),
                         workflow_def=to_json(workflow_def), enabled=int(enabled), created_by=created_by)

    def update_skill(self, skill_id: str, *, description: str | None = None, parameters: JsonValue = None,
                     workflow_def: JsonValue = None, enabled: bool | None = None) -> bool:
        """Update the `skill` row (None keeps a column as it is; updated_at is always set to now); True when the row
        exists."""
        with self._transaction():
            return self._write(
                "UPDATE skill SET description = coalesce(?, description), parameters = coalesce(?, parameters), "
                "workflow_def = coalesce(?, workflow_def), enabled = coalesce(?, enabled), updated_at = ? "
                "WHERE id = ?",
                (description, to_json(parameters), to_json(workflow_def), None if enabled is None else int(enabled),
                 now_iso(), skill_id)) > 0


# ---- Realistic values -------------------------------------------------------------------------------------

FILES = [("Q3_revenue_report", "pdf"), ("board_deck", "pptx"), ("sales_by_region", "xlsx"), ("churn_export", "csv"),
         ("Jahresbericht_Übersicht", "pdf"), ("contrat_fournisseur", "docx"), ("売上レポート", "pdf"),
         ("ops_incident_review", "md")]
ENTITIES = ["Acme GmbH", "Globex Corp.", "Initech", "Umbrella Health", "Société Générale d'Essai", "北海道物流"]
METRICS = ["revenue", "ebitda", "churn_rate", "arr", "headcount", "nps", "gross_margin"]
CORPUS = ("revenue grew quarter over quarter while churn fell in the enterprise segment; the board approved the "
          "budget for the new region, pending a review of supplier contracts and the café chain's données. "
          "Résumé: costs stable, margins up, hiring paused")
WORDS = CORPUS.split()
DOCUMENT_TYPES = [("pdf", "reports"), ("xml", "feeds"), ("openapi", "specs"), ("postman", "collections")]
LOG_COMPONENTS = ["ingest", "ocr", "parser", "embedder", "api", "scheduler"]
LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR"]
MEMORY_CATEGORIES = ["insight", "conversation", "preference", "task", "fact"]
SKILL_VERBS = ["search", "summarize", "extract", "translate", "classify", "compare", "schedule"]
SKILL_NOUNS = ["web", "pdf", "tables", "emails", "invoices", "tickets", "contracts"]


def sentence(rng: random.Random, words: int) -> str:
    """`words` random words of CORPUS, the first capitalised, ending in a full stop."""
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def report_week(rng: random.Random) -> str:
    """The ISO week of a day 0 to 20 weeks ago, as 'YYYY-Www' (e.g. '2024-W07')."""
    year, week, _ = (date.today() - timedelta(weeks=rng.randint(0, 20))).isocalendar()
    return f"{year}-W{week:02d}"


def created_at(rng: random.Random) -> str | None:
    """Times as apps store them: ISO with Z, with an offset, or naive with a space; sometimes none."""
    moment = datetime.now(UTC) - timedelta(minutes=rng.randint(0, 60 * 24 * 90))
    return rng.choice([moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                       moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds"),
                       moment.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="seconds"),
                       None])


def embedding(rng: random.Random) -> list[float]:
    """A random unit vector (Euclidean norm 1) of EMBEDDING_DIMENSIONS (384) floats."""
    vector = [rng.gauss(0.0, 1.0) for _ in range(EMBEDDING_DIMENSIONS)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def bbox(rng: random.Random) -> list[float]:
    """A random box on a page, [x0, y0, x1, y1] with x1 > x0 and y1 > y0, rounded to 2 decimals."""
    x, y = rng.uniform(0, 500), rng.uniform(0, 700)
    return [round(x, 2), round(y, 2), round(x + rng.uniform(20, 300), 2), round(y + rng.uniform(10, 80), 2)]


def table_content(rng: random.Random) -> dict[str, object]:
    """A random extracted table: {'columns': 4 names, 'rows': 1 to 5 lists of 4 values}."""
    columns = ["region", "quarter", *rng.sample(METRICS, 2)]
    rows = [[rng.choice(["EMEA", "APAC", "NA", "LATAM"]), f"Q{rng.randint(1, 4)}",
             round(rng.uniform(1e4, 5e6), 2), rng.randint(0, 900)] for _ in range(rng.randint(1, 5))]
    return {"columns": columns, "rows": rows}


class Workload:
    """Chooses and makes the next seed call from what exists: a realistic mix of inserts, updates, deletes."""

    RECENT = 200  # parents remembered for children to refer to

    def __init__(self, app: DemoApp, rng: random.Random | None = None) -> None:
        self.app = app
        self.rng = rng or random.Random()
        self.artifacts: deque[str] = deque(maxlen=self.RECENT)
        self.documents: deque[str] = deque(maxlen=self.RECENT)
        self.memories: deque[str] = deque(maxlen=self.RECENT)
        self.skills: deque[str] = deque(maxlen=self.RECENT)
        # name -> (weight, the call); calls needing a parent fall back to creating one.
        self.operations: dict[str, tuple[float, Callable[[], None]]] = {
            "add_artifact": (6, self.add_artifact), "update_artifact": (5, self.update_artifact),
            "add_evidence": (9, self.add_evidence), "add_fact": (12, self.add_fact),
            "add_document": (5, self.add_document), "add_section": (8, self.add_section),
            "add_table": (3, self.add_table), "add_api": (3, self.add_api), "add_log": (10, self.add_log),
            "add_tag": (5, self.add_tag), "save_tag_prompt": (2, self.save_tag_prompt),
            "store_search_chunks": (4, self.store_search_chunks), "reset_search_chunks": (1, self.reset_chunks),
            "store_entities": (3, self.store_entities), "store_structure": (2, self.store_structure),
            "store_metric_hits": (3, self.store_metric_hits), "store_summary": (2, self.store_summary),
            "add_memory": (8, self.add_memory), "delete_memory": (1, self.delete_memory),
            "set_user_pref": (5, self.set_user_pref), "register_skill": (2, self.register_skill),
            "update_skill": (3, self.update_skill), "delete_artifact": (1, self.delete_artifact),
            "delete_document": (1, self.delete_document), "reset": (0.02, self.reset),
        }
        self.remember_existing()

    def remember_existing(self) -> None:
        """Start from the newest rows already in the file (the app restarted)."""
        for table, into in (("artifact", self.artifacts), ("document", self.documents),
                            ("cipher_memory", self.memories), ("skill", self.skills)):
            into.clear()
            rows = self.app.conn.execute(f"SELECT id FROM {table} ORDER BY rowid DESC LIMIT ?", (self.RECENT,))
            into.extend(reversed([row[0] for row in rows]))

    def step(self, name: str | None = None) -> tuple[str, int]:
        """Make one call (a weighted random one unless named); returns its name and the rows it changed."""
        if name is None:
            names = list(self.operations)
            name = self.rng.choices(names, weights=[self.operations[n][0] for n in names])[0]
        before = self.app.rows_written
        try:
            self.operations[name][1]()
        except sqlite3.IntegrityError:
            self.remember_existing()  # a remembered parent is gone (another writer); the call was rolled back
        return name, self.app.rows_written - before

    def write_forever(self, rate: float, stop: threading.Event, on_write: OnWrite | None = None) -> int:
        """Make `rate` calls per second until `stop` is set; returns how many were made."""
        interval = 1.0 / rate
        next_at = time.monotonic()
        made = 0
        while not stop.is_set():
            name, rows = self.step()
            made += 1
            if on_write is not None:
                on_write(name, rows)
            # After a stall (the disk, a long busy wait) catch up by at most a second's worth of calls.
            next_at = max(next_at + interval, time.monotonic() - 1.0)
            stop.wait(max(0.0, next_at - time.monotonic()))
        return made

    # ---- the calls --------------------------------------------------------------------------------------

    def parent(self, recent: deque[str], create: Callable[[], None]) -> str:
        """A random id of `recent`; when it is empty, `create` is called first (and must add one to it)."""
        if not recent:
            create()
        return self.rng.choice(recent)

    def artifact(self) -> str:
        """A remembered artifact's id, adding an artifact first when none is remembered."""
        return self.parent(self.artifacts, self.add_artifact)

    def document(self) -> str:
        """A remembered document's id, adding a document first when none is remembered."""
        return self.parent(self.documents, self.add_document)

    def user(self) -> str:
        """The id of a random user of DEMO_USERS."""
        return self.rng.choice(DEMO_USERS)[0]

    def add_artifact(self) -> None:
        """Add an artifact with made-up values (extras: a JSON object, None or empty text) and remember it."""
        stem, filetype = self.rng.choice(FILES)
        filename = f"{stem}_{self.rng.randint(1, 999):03d}.{filetype}"
        extras = self.rng.choice([
            {"pages": self.rng.randint(1, 300), "uploader": self.rng.choice(DEMO_USERS)[1],
             "ocr": self.rng.random() < .3, "labels": self.rng.sample(["finance", "q3", "board", "legal", "ops"], 2)},
            {"source": "email", "message_id": f"<{uuid.uuid4().hex[:12]}@mail.example>"},
            None, "",  # no extras; empty text, which the json transform ships as null
        ])
        self.artifacts.append(self.app.add_artifact(
            filename, f"uploads/{date.today():%Y/%m}/{uuid.uuid4().hex[:8]}_{filename}", filetype,
            report_week=report_week(self.rng), status="queued",
            source_url=self.rng.choice([None, f"https://files.example.com/{filename}"]),
            sha256=hashlib.sha256(filename.encode() + self.rng.randbytes(8)).digest(), extras=extras))

    def update_artifact(self) -> None:
        """Set a remembered artifact's status (processing, processed or error; new extras only when processed)."""
        status = self.rng.choice(["processing", "processed", "processed", "error"])
        extras = {"processed_at": now_iso(), "warnings": self.rng.randint(0, 3)} if status == "processed" else None
        self.app.update_artifact(self.artifact(), status=status, extras=extras)

    def add_evidence(self) -> None:
        """Add a text, table or figure evidence to a remembered artifact."""
        content_type = self.rng.choice(["text", "table", "figure"])
        page = self.rng.randint(1, 40)
        full_data = table_content(self.rng) if content_type == "table" else {"text": sentence(self.rng, 12)}
        self.app.add_evidence(self.artifact(), locator=f"page {page}", preview=sentence(self.rng, 8),
                              content_type=content_type, coordinates={"page": page, "bbox": bbox(self.rng)},
                              full_data=full_data)

    def add_fact(self) -> None:
        """Add a fact to a remembered artifact, citing one of its evidence rows when it has any."""
        artifact_id = self.artifact()
        evidence = self.app.conn.execute("SELECT id FROM evidence WHERE artifact_id = ? ORDER BY random() LIMIT 1",
                                         (artifact_id,)).fetchone()
        metric = self.rng.choice(METRICS)
        value = round(self.rng.uniform(-5e5, 5e6), 2) if metric != "churn_rate" else round(self.rng.random(), 4)
        self.app.add_fact(artifact_id, entity=self.rng.choice(ENTITIES),
                          content=f"{metric.replace('_', ' ')} of {value:,} reported",
                          metrics={metric: value, "currency": self.rng.choice(["EUR", "USD", "JPY"]),
                                   "yoy_pct": round(self.rng.uniform(-30, 80), 1)},
                          evidence_id=evidence[0] if evidence else None, report_week=report_week(self.rng))

    def add_document(self) -> None:
        """Add a document (created_at in one of several time formats, or none) and remember it."""
        doc_type, folder = self.rng.choice(DOCUMENT_TYPES)
        stem = self.rng.choice(FILES)[0]
        self.documents.append(self.app.add_document(
            f"{folder}/{stem}.{doc_type}", doc_type, title=stem.replace("_", " ").title(),
            source=self.rng.choice(["upload", "crawler", "api", None]), created_at=created_at(self.rng)))

    def add_section(self) -> None:
        """Add a section to a remembered document."""
        self.app.add_section(self.document(), self.rng.randint(0, 200), sentence(self.rng, 25),
                             page=self.rng.choice([None, self.rng.randint(1, 40)]),
                             bbox=self.rng.choice([None, bbox(self.rng)]))

    def add_table(self) -> None:
        """Add a table to a remembered document."""
        self.app.add_table(self.document(), self.rng.randint(0, 20), table_content(self.rng),
                           page=self.rng.randint(1, 40))

    def add_api(self) -> None:
        """Add an API endpoint to a remembered document (deprecated 15% of the time)."""
        method = self.rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE"])
        resource = self.rng.choice(["invoices", "customers", "orders", "reports"])
        self.app.add_api(self.document(), method, f"/v1/{resource}/{{id}}", name=f"{method.lower()}_{resource}",
                         summary=f"{method} one of the {resource}", tags=[resource, "v1"],
                         params={"id": {"in": "path", "type": "string", "required": True}},
                         responses={"200": {"description": "OK"}, "404": {"description": "Not found"}},
                         deprecated=self.rng.random() < 0.15)

    def add_log(self) -> None:
        """Add a log line of the last hour, to a remembered document or to none."""
        level = self.rng.choice(LEVELS)
        self.app.add_log(sentence(self.rng, 6), level=level,
                         document_id=self.rng.choice([None, self.document()]),
                         ts=int(time.time()) - self.rng.randint(0, 3600),
                         code=f"E{self.rng.randint(100, 999)}" if level == "ERROR" else None,
                         component=self.rng.choice(LOG_COMPONENTS),
                         attrs={"duration_ms": round(self.rng.expovariate(1 / 40), 1),
                                "request_id": uuid.uuid4().hex[:16]})

    def add_tag(self) -> None:
        """Add a tag to a remembered document."""
        self.app.add_tag(self.document(), self.rng.choice(["finance", "legal", "q3", "risk", "hiring", "kpi"]),
                         score=round(self.rng.random(), 4), source_ptr=f"section:{self.rng.randint(0, 50)}",
                         hrm_steps=self.rng.choice([None, self.rng.randint(1, 8)]))

    def save_tag_prompt(self) -> None:
        """Save a tagging prompt for a remembered document."""
        self.app.save_tag_prompt(self.document(), "Tag this document with its business topics.",
                                 examples=[{"text": sentence(self.rng, 6), "tags": ["finance"]}],
                                 author=self.rng.choice(DEMO_USERS)[1])

    def store_search_chunks(self) -> None:
        """Store 1 to 3 chunks with random embeddings under a remembered document or artifact."""
        count = self.rng.randint(1, 3)
        texts = [sentence(self.rng, 20) for _ in range(count)]
        parent = self.rng.choice(["document", "artifact"])
        self.app.store_search_chunks(texts, [embedding(self.rng) for _ in texts], source_type=parent,
                                     meta={"model": "all-MiniLM-L6-v2", "tokens": self.rng.randint(40, 256)},
                                     **{f"{parent}_id": self.document() if parent == "document" else self.artifact()})

    def reset_chunks(self) -> None:
        """`reset_search_chunks` of a remembered document: deletes its chunks that have no artifact."""
        self.app.reset_search_chunks(document_id=self.document())

    def store_entities(self) -> None:
        """Replace a remembered document's entities with 1 to 4 made-up ones."""
        entities = []
        for _ in range(self.rng.randint(1, 4)):
            start = self.rng.randint(0, 5000)
            text = self.rng.choice(ENTITIES)
            entities.append({"label": self.rng.choice(["ORG", "GPE", "MONEY", "DATE"]), "text": text,
                             "start_char": start, "end_char": start + len(text), "page": self.rng.randint(1, 40),
                             "context": sentence(self.rng, 8)})
        self.app.store_entities(self.document(), entities)

    def store_structure(self) -> None:
        """Set a remembered document's structure to a made-up hierarchy."""
        hierarchy = {"title": sentence(self.rng, 3), "children": [
            {"heading": f"{i}. {sentence(self.rng, 2)}", "page": i + 1} for i in range(self.rng.randint(1, 5))]}
        self.app.store_structure(self.document(), hierarchy)

    def store_metric_hits(self) -> None:
        """Add 1 to 3 metric hits to a remembered document."""
        hits = [{"type": self.rng.choice(METRICS), "value": f"{self.rng.uniform(0, 1e6):,.2f}",
                 "context": sentence(self.rng, 6), "position": self.rng.randint(0, 9000),
                 "page": self.rng.randint(1, 40)} for _ in range(self.rng.randint(1, 3))]
        self.app.store_metric_hits(self.document(), hits)

    def store_summary(self) -> None:
        """Store a summary citing up to 3 remembered artifacts."""
        artifact_ids = self.rng.sample(list(self.artifacts), min(len(self.artifacts), 3))
        self.app.store_summary(self.rng.choice(["workspace", "document", "custom"]), report_week(self.rng),
                               self.rng.choice(["bullet", "detailed", "executive"]), sentence(self.rng, 30),
                               provider=self.rng.choice(["ollama", "openai", None]),
                               prompt="Summarise the week's reports.", artifact_ids=artifact_ids)

    def add_memory(self) -> None:
        """Add a memory (of a demo user two times in three; an embedding 70% of the time) and remember it."""
        category = self.rng.choice(MEMORY_CATEGORIES)
        self.memories.append(self.app.add_memory(
            category, {"text": sentence(self.rng, 10), "confidence": round(self.rng.random(), 2)},
            {"source": self.rng.choice(["chat", "settings_interaction", "document_review"]),
             "timestamp": date.today().isoformat()},
            user_id=self.rng.choice([self.user(), self.user(), None]),
            embedding=embedding(self.rng) if self.rng.random() < 0.7 else None))

    def delete_memory(self) -> None:
        """Forget and delete a remembered memory, if any."""
        if self.memories:
            memory_id = self.rng.choice(self.memories)
            self.memories.remove(memory_id)
            self.app.delete_memory(memory_id)

    def set_user_pref(self) -> None:
        """Set one preference (theme, language, default_model, notifications or page_size) of a demo user."""
        prefs: list[tuple[str, JsonValue]] = [
            ("theme", self.rng.choice(["dark", "light", "system"])), ("language", self.rng.choice(["en", "fr", "ja"])),
            ("default_model", self.rng.choice(["gpt-4", "llama3", "mistral"])),
            ("notifications", {"email": self.rng.random() < .5, "digest": self.rng.choice(["daily", "weekly"])}),
            ("page_size", self.rng.choice([10, 25, 50]))]
        key, value = self.rng.choice(prefs)
        self.app.set_user_pref(self.user(), key, value)

    def register_skill(self) -> None:
        """Register a skill under a new unique name and remember it."""
        verb, noun = self.rng.choice(SKILL_VERBS), self.rng.choice(SKILL_NOUNS)
        self.skills.append(self.app.register_skill(
            f"{verb}_{noun}_{uuid.uuid4().hex[:6]}", f"{verb.capitalize()} {noun}",
            {"query": {"type": "string", "required": True}, "limit": {"type": "integer", "default": 10}},
            {"steps": [{"tool": self.rng.choice(["browser", "pdf", "llm"]), "action": verb}]},
            enabled=self.rng.random() < 0.8, created_by=self.rng.choice([self.user(), None])))

    def update_skill(self) -> None:
        """Update a remembered skill's enabled flag and, half the time, its description (registering one first when
        none is remembered)."""
        if not self.skills:
            self.register_skill()
        self.app.update_skill(self.rng.choice(self.skills), enabled=self.rng.random() < 0.7,
                              description=self.rng.choice([None, sentence(self.rng, 5)]))

    def delete_artifact(self) -> None:
        """Forget and delete (cascading) the oldest remembered artifact, only while more than 5 are remembered."""
        if len(self.artifacts) > 5:  # keep some parents for the children
            artifact_id = self.artifacts.popleft()
            self.app.delete_artifact(artifact_id)

    def delete_document(self) -> None:
        """Forget and delete (cascading) the oldest remembered document, only while more than 5 are remembered."""
        if len(self.documents) > 5:
            self.app.delete_document(self.documents.popleft())

    def reset(self) -> None:
        """`DemoApp.reset` (empty the workspace), and forget the artifacts and documents."""
        self.app.reset()
        self.artifacts.clear()
        self.documents.clear()


# ---- python -m syncd.demo.app -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """`python -m syncd.demo.app`'s flags (None: sys.argv): db (Path, required unless --users-sql), rate (write
    calls per second), duration (seconds or None), seed, users_sql. Exits with status 2 on a bad flag."""
    from syncd.timeparse import parse_duration

    parser = argparse.ArgumentParser(prog="python -m syncd.demo.app",
                                     description="The demo application: write the seed's kinds of records to a "
                                                 "SQLite file (created with the demo schema when new).")
    parser.add_argument("--db", type=Path, help="the application's SQLite file")
    parser.add_argument("--rate", type=float, default=5.0, help="write calls per second (default 5)")
    parser.add_argument("--duration", type=parse_duration, help="stop after this long, e.g. 30s (default: never)")
    parser.add_argument("--seed", type=int, help="seed of the random choices (default: random)")
    parser.add_argument("--users-sql", action="store_true",
                        help="print the SQL that adds the demo's users to the secondary's auth.users, and exit")
    args = parser.parse_args(argv)
    if not args.users_sql and args.db is None:
        parser.error("--db is required")
    if args.rate <= 0:
        parser.error("--rate must be above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print the users' SQL, or write to --db at --rate until --duration, SIGTERM or SIGINT; the exit code (0)."""
    args = parse_args(argv)
    if args.users_sql:
        print(users_sql())
        return 0
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.duration is not None:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    workload = Workload(DemoApp.open(args.db), random.Random(args.seed))
    started = time.monotonic()
    last_report = [started]

    def report(name: str, rows: int) -> None:
        now = time.monotonic()
        if now - last_report[0] >= 10:
            last_report[0] = now
            print(f"demoapp: {workload.app.rows_written:,} rows written in {now - started:.0f}s", flush=True)

    made = workload.write_forever(args.rate, stop, report)
    print(f"demoapp: stopped after {made:,} calls, {workload.app.rows_written:,} rows written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
