-- syncd's snapshot mode (`[worker] consistency = "snapshot"`): one PostgreSQL transaction per snapshot of the
-- SQLite file, called through PostgREST as POST /rpc/syncd_stage and POST /rpc/syncd_apply. Written by
-- `syncd init --consistency snapshot` into schema.sql; the same text is deploy/supabase/migrations/
-- 003_syncd_snapshots.sql. Idempotent: run it again and nothing changes.
--
-- A snapshot is a document of upserts and deletes for many tables. One that fits a request is applied by one call
-- to syncd_apply; a larger one is staged first, chunk by chunk (syncd_stage), and applied by a final call that
-- also removes the staged chunks. Both functions run with the caller's rights (SECURITY INVOKER): grants and RLS
-- apply exactly as for syncd's table requests. The last snapshot applied per source file is recorded in the same
-- transaction, so a retried apply (its answer lost) changes nothing.
--
-- A chunk document: {"upserts": [{"table": t, "rows": [{column: value}, ...]}, ...],
--                    "deletes": [{"table": t, "keys": [{key column: value}, ...]}, ...]}
-- syncd_apply's `tables`: [{"schema": s, "table": t, "key": [columns]}, ...] with parents before children. Every chunk's
-- upserts are applied table by table in that order, then every chunk's deletes in the reverse order; the
-- constraints that are DEFERRABLE are checked at the commit.

CREATE TABLE IF NOT EXISTS public.syncd_snapshot (
    source text PRIMARY KEY,          -- the SQLite file (its generation as syncd's state file records it)
    snapshot text NOT NULL,           -- the last snapshot applied from it
    rows bigint NOT NULL,             -- how many rows it upserted and deleted
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.syncd_staging (
    source text NOT NULL,
    snapshot text NOT NULL,
    chunk integer NOT NULL,
    doc jsonb NOT NULL,
    staged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, snapshot, chunk)
);
ALTER TABLE public.syncd_snapshot ENABLE ROW LEVEL SECURITY;  -- no policy: only roles that bypass RLS see them
ALTER TABLE public.syncd_staging ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.syncd_snapshot, public.syncd_staging FROM PUBLIC;
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON public.syncd_snapshot, public.syncd_staging FROM anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON public.syncd_snapshot, public.syncd_staging FROM authenticated;
    END IF;
END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.syncd_snapshot, public.syncd_staging TO service_role;

-- Stage one chunk of a snapshot. Chunks another snapshot of the same source left (a crash, a restart) are removed
-- first: only one snapshot per source is ever being staged. Returns the chunk's number.
CREATE OR REPLACE FUNCTION public.syncd_stage(source text, snapshot text, chunk integer, doc jsonb)
RETURNS integer LANGUAGE plpgsql SECURITY INVOKER SET search_path = '' AS $fn$
BEGIN
    DELETE FROM public.syncd_staging s WHERE s.source = syncd_stage.source AND s.snapshot <> syncd_stage.snapshot;
    INSERT INTO public.syncd_staging AS s (source, snapshot, chunk, doc)
    VALUES (syncd_stage.source, syncd_stage.snapshot, syncd_stage.chunk, syncd_stage.doc)
    ON CONFLICT ON CONSTRAINT syncd_staging_pkey DO UPDATE SET doc = excluded.doc, staged_at = now();
    RETURN syncd_stage.chunk;
END
$fn$;

-- Apply one snapshot in one transaction: the `staged` chunks staged for it (0..staged-1) and `doc`, table by table
-- in the order of `tables` (a document naming a table not in `tables` is refused: nothing is left out silently).
-- Returns {"applied": true|false, "rows": n}: false when this snapshot was the last one applied from `source`
-- already (a retry), which changes nothing. Raises SQLSTATE PT503 (HTTP 503 through PostgREST: the caller stages
-- again) when a chunk it names is not staged.
CREATE OR REPLACE FUNCTION public.syncd_apply(source text, snapshot text, tables jsonb, doc jsonb,
                                              staged integer DEFAULT 0)
RETURNS jsonb LANGUAGE plpgsql SECURITY INVOKER SET search_path = '' AS $fn$
DECLARE
    parts jsonb[];
    part jsonb;
    spec jsonb;
    grp jsonb;
    sch text;
    tbl text;
    key text[];
    cols text;
    sets text;
    matches text;
    n bigint := 0;
    done bigint;
    groups integer := 0;
BEGIN
    IF EXISTS (SELECT 1 FROM public.syncd_snapshot s
               WHERE s.source = syncd_apply.source AND s.snapshot = syncd_apply.snapshot) THEN
        DELETE FROM public.syncd_staging s WHERE s.source = syncd_apply.source;
        RETURN jsonb_build_object('applied', false, 'rows', 0);
    END IF;
    SELECT coalesce(array_agg(s.doc ORDER BY s.chunk), '{}') INTO parts FROM public.syncd_staging s
    WHERE s.source = syncd_apply.source AND s.snapshot = syncd_apply.snapshot AND s.chunk < syncd_apply.staged;
    IF coalesce(array_length(parts, 1), 0) <> syncd_apply.staged THEN
        RAISE EXCEPTION 'snapshot % of % names % staged chunks, % are staged', syncd_apply.snapshot,
            syncd_apply.source, syncd_apply.staged, coalesce(array_length(parts, 1), 0)
            USING ERRCODE = 'PT503', HINT = 'stage the snapshot again';
    END IF;
    parts := parts || syncd_apply.doc;
    SET CONSTRAINTS ALL DEFERRED;
    FOR spec IN SELECT value FROM jsonb_array_elements(syncd_apply.tables) LOOP
        tbl := spec->>'table';
        sch := coalesce(spec->>'schema', 'public');
        FOREACH part IN ARRAY parts LOOP
            FOR grp IN SELECT value FROM jsonb_array_elements(coalesce(part->'upserts', '[]')) WHERE value->>'table' = tbl
            LOOP
                groups := groups + 1;
                CONTINUE WHEN jsonb_array_length(grp->'rows') = 0;
                key := ARRAY(SELECT jsonb_array_elements_text(spec->'key'));
                SELECT string_agg(format('%I', k), ', '),
                       string_agg(format('%I = excluded.%I', k, k), ', ') FILTER (WHERE k <> ALL (key))
                INTO cols, sets FROM jsonb_object_keys(grp->'rows'->0) k;
                EXECUTE format('INSERT INTO %I.%I AS t (%s) SELECT %s FROM jsonb_populate_recordset(NULL::%I.%I, $1) '
                               'ON CONFLICT (%s) DO %s', sch, tbl, cols, cols, sch, tbl,
                               (SELECT string_agg(format('%I', c), ', ') FROM unnest(key) c),
                               CASE WHEN sets IS NULL THEN 'NOTHING' ELSE 'UPDATE SET ' || sets END)
                USING grp->'rows';
                GET DIAGNOSTICS done = ROW_COUNT;
                n := n + done;
            END LOOP;
        END LOOP;
    END LOOP;
    FOR spec IN SELECT value FROM jsonb_array_elements(syncd_apply.tables) WITH ORDINALITY AS t(value, i)
                ORDER BY i DESC LOOP
        tbl := spec->>'table';
        sch := coalesce(spec->>'schema', 'public');
        key := ARRAY(SELECT jsonb_array_elements_text(spec->'key'));
        SELECT string_agg(format('t.%I = k.%I', c, c), ' AND ') INTO matches FROM unnest(key) c;
        FOREACH part IN ARRAY parts LOOP
            FOR grp IN SELECT value FROM jsonb_array_elements(coalesce(part->'deletes', '[]')) WHERE value->>'table' = tbl
            LOOP
                groups := groups + 1;
                CONTINUE WHEN jsonb_array_length(grp->'keys') = 0;
                EXECUTE format('DELETE FROM %I.%I AS t USING jsonb_populate_recordset(NULL::%I.%I, $1) AS k '
                               'WHERE %s', sch, tbl, sch, tbl, matches)
                USING grp->'keys';
                GET DIAGNOSTICS done = ROW_COUNT;
                n := n + done;
            END LOOP;
        END LOOP;
    END LOOP;
    IF groups <> (SELECT coalesce(sum(jsonb_array_length(coalesce(p->'upserts', '[]'))
                                       + jsonb_array_length(coalesce(p->'deletes', '[]'))), 0) FROM unnest(parts) p) THEN
        RAISE EXCEPTION 'snapshot % names a table that its list of tables does not', syncd_apply.snapshot
            USING HINT = 'every table of the document must be in `tables` (a bug of the caller)';
    END IF;
    DELETE FROM public.syncd_staging s WHERE s.source = syncd_apply.source;
    INSERT INTO public.syncd_snapshot AS s (source, snapshot, rows, applied_at)
    VALUES (syncd_apply.source, syncd_apply.snapshot, n, now())
    ON CONFLICT ON CONSTRAINT syncd_snapshot_pkey DO UPDATE SET snapshot = excluded.snapshot, rows = excluded.rows, applied_at = now();
    RETURN jsonb_build_object('applied', true, 'rows', n);
END
$fn$;

REVOKE ALL ON FUNCTION public.syncd_stage(text, text, integer, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.syncd_apply(text, text, jsonb, jsonb, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.syncd_stage(text, text, integer, jsonb) TO service_role;
GRANT EXECUTE ON FUNCTION public.syncd_apply(text, text, jsonb, jsonb, integer) TO service_role;

NOTIFY pgrst, 'reload schema';
