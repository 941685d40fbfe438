-- 002_cipher_tables.sql
--
-- The Cipher tables of the seed (cipher_memory, user_prefs, skills_registry) with its columns,
-- indexes and row-level security, corrected:
--
--   The seed's service-role policies test current_setting('request.jwt.claim.role', true). PostgREST
--   v12+ no longer sets the per-claim settings `request.jwt.claim.<name>` (v10/v11 set them only on
--   PostgreSQL < 14); it sets one JSON setting, `request.jwt.claims`. On a current installation those
--   policies therefore never match, and a service_role without BYPASSRLS could neither read nor write.
--   The policies below use Supabase's auth.role() / auth.uid(), which read `request.jwt.claims`
--   (falling back to the legacy per-claim setting when one is set), i.e. the same as
--   (current_setting('request.jwt.claims', true)::jsonb ->> 'role') = 'service_role'.
--
-- auth.uid() / auth.role() are wrapped in (SELECT ...) so PostgreSQL evaluates them once per
-- statement instead of once per row (Supabase's advice for RLS performance).
--
-- Idempotent: IF NOT EXISTS for tables and indexes, DROP POLICY IF EXISTS before each CREATE POLICY.
-- Needs 000_roles_and_auth.sql (roles, auth.users, auth.uid(), auth.role()) on plain PostgreSQL.

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

-- Tables -------------------------------------------------------------------------------------------

-- Agent memory fragments, owned by a user.
CREATE TABLE IF NOT EXISTS public.cipher_memory (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid REFERENCES auth.users (id),
    category   text NOT NULL,
    content    jsonb NOT NULL,
    context    jsonb,
    embedding  vector(384),                   -- pgvector, for semantic search
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_cipher_memory_user ON public.cipher_memory (user_id);
CREATE INDEX IF NOT EXISTS idx_cipher_memory_category ON public.cipher_memory (category);
-- On an empty table pgvector only notes that the index was built with little data.
CREATE INDEX IF NOT EXISTS idx_cipher_memory_embedding
    ON public.cipher_memory USING ivfflat (embedding vector_cosine_ops);

-- One row of preferences per user.
CREATE TABLE IF NOT EXISTS public.user_prefs (
    user_id     uuid PRIMARY KEY REFERENCES auth.users (id),
    preferences jsonb NOT NULL DEFAULT '{}'::jsonb,
    theme       text DEFAULT 'system',
    language    text DEFAULT 'en',
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now()
);

-- Agent skills / capabilities.
CREATE TABLE IF NOT EXISTS public.skills_registry (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text UNIQUE NOT NULL,
    description  text,
    parameters   jsonb NOT NULL DEFAULT '{}'::jsonb,
    workflow_def jsonb NOT NULL,
    enabled      boolean DEFAULT true,
    created_by   uuid REFERENCES auth.users (id),
    created_at   timestamptz DEFAULT now(),
    updated_at   timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_skills_name ON public.skills_registry (name);
CREATE INDEX IF NOT EXISTS idx_skills_enabled ON public.skills_registry (enabled);

-- Row-level security ---------------------------------------------------------------------------------

ALTER TABLE public.cipher_memory ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.user_prefs ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.skills_registry ENABLE ROW LEVEL SECURITY;

-- cipher_memory: a user reads and writes only its own rows (anon: auth.uid() is NULL, so nothing);
-- service_role everything.
DROP POLICY IF EXISTS "Users read own memories" ON public.cipher_memory;
CREATE POLICY "Users read own memories" ON public.cipher_memory
    FOR SELECT
    USING ((SELECT auth.uid()) = user_id);

DROP POLICY IF EXISTS "Users insert own memories" ON public.cipher_memory;
CREATE POLICY "Users insert own memories" ON public.cipher_memory
    FOR INSERT
    WITH CHECK ((SELECT auth.uid()) = user_id);

DROP POLICY IF EXISTS "Users update own memories" ON public.cipher_memory;
CREATE POLICY "Users update own memories" ON public.cipher_memory
    FOR UPDATE
    USING ((SELECT auth.uid()) = user_id)
    WITH CHECK ((SELECT auth.uid()) = user_id);

DROP POLICY IF EXISTS "Users delete own memories" ON public.cipher_memory;
CREATE POLICY "Users delete own memories" ON public.cipher_memory
    FOR DELETE
    USING ((SELECT auth.uid()) = user_id);

-- Seed: USING (current_setting('request.jwt.claim.role', true) = 'service_role') -- never matches.
DROP POLICY IF EXISTS "Service role full access" ON public.cipher_memory;
CREATE POLICY "Service role full access" ON public.cipher_memory
    FOR ALL
    USING ((SELECT auth.role()) = 'service_role')
    WITH CHECK ((SELECT auth.role()) = 'service_role');

-- user_prefs: as in the seed, users read, insert and update their own row (no delete policy: only
-- service_role deletes).
DROP POLICY IF EXISTS "Users read own prefs" ON public.user_prefs;
CREATE POLICY "Users read own prefs" ON public.user_prefs
    FOR SELECT
    USING ((SELECT auth.uid()) = user_id);

DROP POLICY IF EXISTS "Users insert own prefs" ON public.user_prefs;
CREATE POLICY "Users insert own prefs" ON public.user_prefs
    FOR INSERT
    WITH CHECK ((SELECT auth.uid()) = user_id);

DROP POLICY IF EXISTS "Users update own prefs" ON public.user_prefs;
CREATE POLICY "Users update own prefs" ON public.user_prefs
    FOR UPDATE
    USING ((SELECT auth.uid()) = user_id)
    WITH CHECK ((SELECT auth.uid()) = user_id);

-- Seed: USING (current_setting('request.jwt.claim.role', true) = 'service_role') -- never matches.
DROP POLICY IF EXISTS "Service role prefs access" ON public.user_prefs;
CREATE POLICY "Service role prefs access" ON public.user_prefs
    FOR ALL
    USING ((SELECT auth.role()) = 'service_role')
    WITH CHECK ((SELECT auth.role()) = 'service_role');

-- skills_registry: everyone reads enabled skills; only service_role writes.
DROP POLICY IF EXISTS "Users read enabled skills" ON public.skills_registry;
CREATE POLICY "Users read enabled skills" ON public.skills_registry
    FOR SELECT
    USING (enabled = true);

-- Not in the seed: service_role also sees disabled skills. It has BYPASSRLS on Supabase anyway; the
-- policy keeps it correct without BYPASSRLS, where UPDATE ... WHERE and INSERT ... ON CONFLICT DO
-- UPDATE (PostgREST's upsert) must also pass a SELECT policy for the existing row.
DROP POLICY IF EXISTS "Service role reads all skills" ON public.skills_registry;
CREATE POLICY "Service role reads all skills" ON public.skills_registry
    FOR SELECT
    USING ((SELECT auth.role()) = 'service_role');

-- Seed: WITH CHECK / USING (current_setting('request.jwt.claim.role', true) = 'service_role').
DROP POLICY IF EXISTS "Admins insert skills" ON public.skills_registry;
CREATE POLICY "Admins insert skills" ON public.skills_registry
    FOR INSERT
    WITH CHECK ((SELECT auth.role()) = 'service_role');

DROP POLICY IF EXISTS "Admins update skills" ON public.skills_registry;
CREATE POLICY "Admins update skills" ON public.skills_registry
    FOR UPDATE
    USING ((SELECT auth.role()) = 'service_role')
    WITH CHECK ((SELECT auth.role()) = 'service_role');

DROP POLICY IF EXISTS "Admins delete skills" ON public.skills_registry;
CREATE POLICY "Admins delete skills" ON public.skills_registry
    FOR DELETE
    USING ((SELECT auth.role()) = 'service_role');

-- Privileges ---------------------------------------------------------------------------------------
-- Table privileges decide which commands a role may try; the policies above decide on which rows.
-- REVOKE first: Supabase's default privileges give anon and authenticated ALL on new public tables.
--   anon:          SELECT on all three (RLS: no memories, no prefs, enabled skills); no writes, so an
--                  anon write fails with 42501 (PostgREST: 401).
--   authenticated: SELECT, INSERT, UPDATE, DELETE on all three; RLS limits them to its own rows and
--                  to reading enabled skills (a skill INSERT fails with 42501, UPDATE/DELETE touch 0
--                  rows).
--   service_role:  SELECT, INSERT, UPDATE, DELETE on all three (and BYPASSRLS).
REVOKE ALL ON TABLE public.cipher_memory, public.user_prefs, public.skills_registry
    FROM anon, authenticated;
GRANT SELECT ON TABLE public.cipher_memory, public.user_prefs, public.skills_registry TO anon;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON TABLE public.cipher_memory, public.user_prefs, public.skills_registry TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON TABLE public.cipher_memory, public.user_prefs, public.skills_registry TO service_role;

NOTIFY pgrst, 'reload schema';
