-- 001_initial_schema.sql
--
-- The document tables behind the seed application's write methods (add_artifact, add_fact, ...,
-- store_summary). syncd ships them from the application's SQLite file (syncd/demo/schema.sql names
-- each table's SQLite source and the column transforms) with the service_role key.
--
-- Idempotent: IF NOT EXISTS everywhere, constraints inside CREATE TABLE, grants re-applied.
-- Needs 000_roles_and_auth.sql (the roles) on plain PostgreSQL.
--
-- Conventions
--   * Text primary keys: the application generates its ids (uuid4 as text) itself.
--   * Foreign keys with ON DELETE CASCADE where a child means nothing without its parent, SET NULL
--     for optional references. syncd/demo/schema.sql declares the same actions, so with
--     PRAGMA foreign_keys=ON both sides delete the same rows (SQLite's cascades fire the capture
--     triggers too).
--   * NOT NULL on exactly the columns that are NOT NULL in SQLite: any row the application can store
--     passes here.
--   * No triggers that rewrite columns (e.g. updated_at = now()): the secondary must hold exactly the
--     values shipped, or `syncd verify` would report every row as different.

-- pgvector: create it only when it is not installed anywhere (Supabase keeps extensions in the
-- schema `extensions`, which is on its search_path; elsewhere it goes into public).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'extensions') THEN
            CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA extensions;
        ELSE
            CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;
        END IF;
    END IF;
END
$$;

-- add_artifact / update_artifact: an uploaded file.
CREATE TABLE IF NOT EXISTS public.artifacts (
    id          text PRIMARY KEY,
    filename    text NOT NULL,
    filepath    text NOT NULL,
    filetype    text NOT NULL,
    report_week text,
    status      text,                         -- queued | processing | processed | error
    source_url  text,
    sha256      bytea,                        -- digest of the file
    extras      jsonb,                        -- SQLite artifact.extra_json
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- add_evidence: an extracted chunk of an artifact.
CREATE TABLE IF NOT EXISTS public.evidence (
    id           text PRIMARY KEY,
    artifact_id  text NOT NULL REFERENCES public.artifacts (id) ON DELETE CASCADE,
    locator      text,                        -- e.g. 'page 5'
    preview      text,
    content_type text,                        -- e.g. 'table', 'text'
    coordinates  jsonb,
    full_data    jsonb
);
CREATE INDEX IF NOT EXISTS idx_evidence_artifact_id ON public.evidence (artifact_id);
CREATE INDEX IF NOT EXISTS idx_evidence_content_type ON public.evidence (content_type);

-- add_fact: a metric extracted from an artifact, optionally pointing at its evidence.
CREATE TABLE IF NOT EXISTS public.facts (
    id          text PRIMARY KEY,
    artifact_id text NOT NULL REFERENCES public.artifacts (id) ON DELETE CASCADE,
    evidence_id text REFERENCES public.evidence (id) ON DELETE SET NULL,
    report_week text,
    entity      text,
    content     text,                         -- searchable text (?content=fts.revenue)
    metrics     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS idx_facts_artifact_id ON public.facts (artifact_id);
CREATE INDEX IF NOT EXISTS idx_facts_evidence_id ON public.facts (evidence_id);
CREATE INDEX IF NOT EXISTS idx_facts_report_week ON public.facts (report_week);

-- add_document: a parsed document (pdf | xml | openapi | postman).
CREATE TABLE IF NOT EXISTS public.documents (
    id         text PRIMARY KEY,
    path       text NOT NULL,
    type       text NOT NULL,
    title      text,
    source     text,
    created_at timestamptz
);
CREATE INDEX IF NOT EXISTS idx_documents_type ON public.documents (type);

-- add_section
CREATE TABLE IF NOT EXISTS public.document_sections (
    id          text PRIMARY KEY,
    document_id text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    ordinal     integer NOT NULL,             -- position in the document
    text        text NOT NULL,
    page        integer,
    bbox        jsonb
);
CREATE INDEX IF NOT EXISTS idx_document_sections_document_id ON public.document_sections (document_id);

-- add_table
CREATE TABLE IF NOT EXISTS public.document_tables (
    id          text PRIMARY KEY,
    document_id text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    ordinal     integer NOT NULL,
    page        integer,
    content     jsonb NOT NULL                -- rows and cells
);
CREATE INDEX IF NOT EXISTS idx_document_tables_document_id ON public.document_tables (document_id);

-- add_api: an endpoint found in an OpenAPI / Postman document.
CREATE TABLE IF NOT EXISTS public.api_endpoints (
    id          text PRIMARY KEY,
    document_id text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    name        text,
    method      text NOT NULL,
    path        text NOT NULL,
    summary     text,
    tags        jsonb,
    params      jsonb,
    responses   jsonb,
    deprecated  boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS idx_api_endpoints_document_id ON public.api_endpoints (document_id);

-- add_log: a log line, of a document (a log file) or of the application.
CREATE TABLE IF NOT EXISTS public.logs (
    id          text PRIMARY KEY,
    document_id text REFERENCES public.documents (id) ON DELETE CASCADE,
    ts          timestamptz,
    level       text,
    code        text,
    component   text,
    message     text,
    attrs       jsonb
);
CREATE INDEX IF NOT EXISTS idx_logs_document_id ON public.logs (document_id);
CREATE INDEX IF NOT EXISTS idx_logs_ts ON public.logs (ts);

-- add_tag
CREATE TABLE IF NOT EXISTS public.tags (
    id          text PRIMARY KEY,
    document_id text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    tag         text NOT NULL,
    score       double precision,
    source_ptr  text,
    hrm_steps   integer
);
CREATE INDEX IF NOT EXISTS idx_tags_document_id ON public.tags (document_id);

-- save_tag_prompt
CREATE TABLE IF NOT EXISTS public.tag_prompts (
    id          text PRIMARY KEY,
    document_id text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    prompt_text text NOT NULL,
    examples    jsonb,
    author      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_tag_prompts_document_id ON public.tag_prompts (document_id);

-- store_search_chunks: embedded chunks for semantic search, of a document or of an artifact.
CREATE TABLE IF NOT EXISTS public.search_chunks (
    id          text PRIMARY KEY,
    document_id text REFERENCES public.documents (id) ON DELETE CASCADE,
    artifact_id text REFERENCES public.artifacts (id) ON DELETE CASCADE,
    source_type text,
    chunk_index integer,
    text        text NOT NULL,
    meta        jsonb,
    embedding   vector(384)
);
CREATE INDEX IF NOT EXISTS idx_search_chunks_document_id ON public.search_chunks (document_id);
CREATE INDEX IF NOT EXISTS idx_search_chunks_artifact_id ON public.search_chunks (artifact_id);

-- store_entities: named entities of a document.
CREATE TABLE IF NOT EXISTS public.entities (
    id           text PRIMARY KEY,
    document_id  text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    label        text NOT NULL,
    text         text NOT NULL,
    start_char   integer,
    end_char     integer,
    page         integer,
    context      text,
    source_index integer
);
CREATE INDEX IF NOT EXISTS idx_entities_document_id ON public.entities (document_id);
CREATE INDEX IF NOT EXISTS idx_entities_label ON public.entities (label);

-- store_structure: one heading hierarchy per document (keyed by document_id, not id).
CREATE TABLE IF NOT EXISTS public.structure (
    document_id text PRIMARY KEY REFERENCES public.documents (id) ON DELETE CASCADE,
    hierarchy   jsonb NOT NULL
);

-- store_metric_hits
CREATE TABLE IF NOT EXISTS public.metric_hits (
    id           text PRIMARY KEY,
    document_id  text NOT NULL REFERENCES public.documents (id) ON DELETE CASCADE,
    type         text NOT NULL,
    value        text,
    context      text,
    position     integer,
    page         integer,
    source_index integer
);
CREATE INDEX IF NOT EXISTS idx_metric_hits_document_id ON public.metric_hits (document_id);
CREATE INDEX IF NOT EXISTS idx_metric_hits_type ON public.metric_hits (type);

-- store_summary: artifact_ids / evidence_ids are JSON arrays of ids, not foreign keys.
CREATE TABLE IF NOT EXISTS public.summaries (
    id           text PRIMARY KEY,
    scope        text NOT NULL,               -- workspace | document | custom
    scope_key    text NOT NULL,
    style        text NOT NULL,               -- bullet | detailed | executive
    provider     text,
    prompt       text,
    summary_text text NOT NULL,
    artifact_ids jsonb NOT NULL DEFAULT '[]'::jsonb,
    evidence_ids jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_summaries_scope_key_style ON public.summaries (scope_key, style, created_at DESC);

-- Privileges ---------------------------------------------------------------------------------------
-- No RLS on these tables: the API roles' table privileges are the whole policy. Everyone may read;
-- only service_role (syncd) writes. The REVOKE matters on Supabase, whose default privileges give
-- anon and authenticated ALL on every new table in public.
REVOKE ALL ON TABLE
    public.artifacts, public.evidence, public.facts, public.documents, public.document_sections,
    public.document_tables, public.api_endpoints, public.logs, public.tags, public.tag_prompts,
    public.search_chunks, public.entities, public.structure, public.metric_hits, public.summaries
FROM anon, authenticated;

GRANT SELECT ON TABLE
    public.artifacts, public.evidence, public.facts, public.documents, public.document_sections,
    public.document_tables, public.api_endpoints, public.logs, public.tags, public.tag_prompts,
    public.search_chunks, public.entities, public.structure, public.metric_hits, public.summaries
TO anon, authenticated;

GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE
    public.artifacts, public.evidence, public.facts, public.documents, public.document_sections,
    public.document_tables, public.api_endpoints, public.logs, public.tags, public.tag_prompts,
    public.search_chunks, public.entities, public.structure, public.metric_hits, public.summaries
TO service_role;

-- Tell PostgREST (and syncd's dev server) to reload its schema cache once this commits.
NOTIFY pgrst, 'reload schema';
