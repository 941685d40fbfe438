-- Tables for the dev server's conformance tests (applied after the project's migrations).
CREATE TABLE IF NOT EXISTS public.items (
    id integer PRIMARY KEY,
    name text NOT NULL,
    qty integer CHECK (qty >= 0),
    tags text[],
    doc jsonb,
    body text,
    made timestamptz DEFAULT now(),
    note text DEFAULT 'none'
);
CREATE TABLE IF NOT EXISTS public.parents (id integer PRIMARY KEY, name text);
CREATE TABLE IF NOT EXISTS public.children (
    id integer PRIMARY KEY,
    parent_id integer REFERENCES public.parents (id),
    name text
);
CREATE TABLE IF NOT EXISTS public.pairs (a text, b integer, v text, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS public.people (id integer PRIMARY KEY, email text UNIQUE);
CREATE TABLE IF NOT EXISTS public.bench (id bigint PRIMARY KEY, a text, b integer, c double precision, d boolean);

-- raiser: inserting a row raises the SQLSTATE named in its `code` column, so each row of
-- PostgREST's error table can be checked through the real request path.
CREATE TABLE IF NOT EXISTS public.raiser (id integer PRIMARY KEY, code text, seconds float);
CREATE OR REPLACE FUNCTION public.raise_code() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seconds IS NOT NULL THEN
        PERFORM pg_sleep(NEW.seconds);
    END IF;
    IF NEW.code IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = NEW.code, MESSAGE = 'raised ' || NEW.code;
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS raiser_raise ON public.raiser;
CREATE TRIGGER raiser_raise BEFORE INSERT ON public.raiser FOR EACH ROW EXECUTE FUNCTION public.raise_code();

CREATE SCHEMA IF NOT EXISTS syncd_test;
CREATE TABLE IF NOT EXISTS syncd_test.items (id integer PRIMARY KEY, label text);
CREATE SCHEMA IF NOT EXISTS hidden;
CREATE TABLE IF NOT EXISTS hidden.items (id integer PRIMARY KEY);

GRANT USAGE ON SCHEMA syncd_test, hidden TO anon, authenticated, service_role;
GRANT ALL ON public.items, public.parents, public.children, public.pairs, public.people, public.bench,
    public.raiser, syncd_test.items, hidden.items TO service_role;
GRANT SELECT ON public.items TO anon, authenticated;

-- Identifiers PostgREST needs double-quoted in on_conflict and logic trees.
CREATE TABLE IF NOT EXISTS public."odd names" ("my col" text, "b.c" integer, "v,w" text, PRIMARY KEY ("my col", "b.c"));
GRANT ALL ON public."odd names" TO service_role;
