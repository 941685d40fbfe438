-- Secondary tables for the end-to-end tests of `syncd run` (SQLite names in tests/test_run.py).
CREATE TABLE IF NOT EXISTS public.e2e_items (
    id bigint PRIMARY KEY,
    name text,
    qty integer CHECK (qty >= 0),
    flag boolean,
    doc jsonb,
    made timestamptz,
    email text UNIQUE
);
CREATE TABLE IF NOT EXISTS public.e2e_parents (id bigint PRIMARY KEY, name text);
CREATE TABLE IF NOT EXISTS public.e2e_children (
    id bigint PRIMARY KEY,
    parent_id bigint REFERENCES public.e2e_parents (id),
    name text
);
CREATE TABLE IF NOT EXISTS public.e2e_pairs (a text, b integer, v text, PRIMARY KEY (a, b));
GRANT ALL ON public.e2e_items, public.e2e_parents, public.e2e_children, public.e2e_pairs TO service_role;
-- For `syncd verify`: a key that PostgreSQL orders differently from SQLite (SQLite INTEGER 9 < 10, text
-- '10' < '9'), and one column of each type whose values PostgreSQL spells differently from what syncd sends.
CREATE TABLE IF NOT EXISTS public.e2e_words (
    n text PRIMARY KEY,
    word text,
    cnt bigint,
    score real,
    amount numeric,
    tags jsonb,
    at timestamptz,
    naive timestamp,
    day date,
    vec vector(3),
    raw bytea,
    uid uuid,
    ok boolean,
    note text
);
GRANT ALL ON public.e2e_words TO service_role;
