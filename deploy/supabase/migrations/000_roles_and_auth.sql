-- 000_roles_and_auth.sql
--
-- What a Supabase project already has and a plain PostgreSQL (the dev server, docker compose) lacks:
-- the API roles PostgREST switches to, the `auth` schema with `auth.users`, and Supabase's
-- `auth.uid()`, `auth.role()`, `auth.jwt()` that the RLS policies of 002 call.
--
-- Idempotent, and harmless on a real Supabase project, where all of this exists and belongs to
-- supabase_admin / supabase_auth_admin: every object is created only when missing (checked in
-- pg_roles, pg_namespace, pg_class, pg_proc), so nothing that exists is replaced, altered or
-- re-owned; grants that the running role may not give only raise a NOTICE.
--
-- Run as a superuser on plain PostgreSQL (BYPASSRLS can only be given by one).

-- Roles --------------------------------------------------------------------------------------------
-- anon: requests without a JWT role / with the anon key; authenticated: a signed-in user (JWT `sub`);
-- service_role: the backend (syncd), bypasses RLS; authenticator: the role PostgREST logs in as and
-- then `SET ROLE`s to the JWT's role (NOINHERIT: on its own it can do nothing).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticator') THEN
        -- No password: locally it connects through trust/peer authentication. Set one with
        -- ALTER ROLE authenticator PASSWORD '...' where the server needs it.
        CREATE ROLE authenticator LOGIN NOINHERIT;
    END IF;
END
$$;

-- authenticator must be able to SET ROLE to each API role. Granted only when missing: on Supabase
-- the memberships exist and the migrating role may lack ADMIN OPTION to grant them again.
DO $$
DECLARE
    api_role text;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (
            SELECT 1
            FROM pg_auth_members m
            JOIN pg_roles r ON r.oid = m.roleid
            JOIN pg_roles u ON u.oid = m.member
            WHERE r.rolname = api_role AND u.rolname = 'authenticator'
        ) THEN
            EXECUTE format('GRANT %I TO authenticator', api_role);
        END IF;
    END LOOP;
END
$$;

-- Schema auth and auth.users -----------------------------------------------------------------------
-- Created only when missing (on Supabase the migrating role may not even have CREATE on `auth`,
-- which CREATE ... IF NOT EXISTS would check before noticing that the object exists).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        CREATE SCHEMA auth;
    END IF;
    IF NOT EXISTS (  -- not to_regclass(): it needs USAGE on the schema
        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'auth' AND c.relname = 'users'
    ) THEN
        -- The subset of Supabase's auth.users that foreign keys (cipher_memory.user_id,
        -- user_prefs.user_id, skills_registry.created_by) and tests need.
        CREATE TABLE IF NOT EXISTS auth.users (
            id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            email      text,
            created_at timestamptz DEFAULT now()
        );
    END IF;
END
$$;

-- auth.uid(), auth.role(), auth.jwt() -----------------------------------------------------------------
-- Exactly Supabase's definitions: PostgREST (v12+) puts all claims into `request.jwt.claims`; the
-- per-claim settings `request.jwt.claim.<name>` were set only by old versions and are read first,
-- for compatibility, when non-empty. Created only when missing, never replaced.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'auth' AND p.proname = 'uid' AND p.pronargs = 0
    ) THEN
        EXECUTE $fn$
            CREATE FUNCTION auth.uid() RETURNS uuid
            LANGUAGE sql STABLE
            AS $body$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
                )::uuid
            $body$
        $fn$;
        EXECUTE $c$COMMENT ON FUNCTION auth.uid() IS 'Deprecated. Use auth.jwt() -> ''sub'' instead.'$c$;
    END IF;

    IF NOT EXISTS (
        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'auth' AND p.proname = 'role' AND p.pronargs = 0
    ) THEN
        EXECUTE $fn$
            CREATE FUNCTION auth.role() RETURNS text
            LANGUAGE sql STABLE
            AS $body$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim.role', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
                )::text
            $body$
        $fn$;
        EXECUTE $c$COMMENT ON FUNCTION auth.role() IS 'Deprecated. Use auth.jwt() -> ''role'' instead.'$c$;
    END IF;

    IF NOT EXISTS (
        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'auth' AND p.proname = 'jwt' AND p.pronargs = 0
    ) THEN
        EXECUTE $fn$
            CREATE FUNCTION auth.jwt() RETURNS jsonb
            LANGUAGE sql STABLE
            AS $body$
                SELECT coalesce(
                    nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), '')
                )::jsonb
            $body$
        $fn$;
    END IF;
END
$$;

-- Grants ---------------------------------------------------------------------------------------------
-- Each grant is repeatable; on Supabase, where they exist already and the migrating role may not own
-- the object, a refusal is reported as a NOTICE instead of aborting the migration.
DO $$
DECLARE
    stmt text;
BEGIN
    FOREACH stmt IN ARRAY ARRAY[
        'GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role',
        'GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role',
        'GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated, service_role',
        'GRANT EXECUTE ON FUNCTION auth.role() TO anon, authenticated, service_role',
        'GRANT EXECUTE ON FUNCTION auth.jwt() TO anon, authenticated, service_role'
    ] LOOP
        BEGIN
            EXECUTE stmt;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'skipped (%): %', SQLERRM, stmt;
        END;
    END LOOP;
END
$$;
