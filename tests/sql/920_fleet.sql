-- Secondary tables for multi-file mode's tests (tests/test_fleet.py): one table for every tenant's file, the
-- tenant column first in the key, as `syncd init --glob` writes them.
CREATE TABLE IF NOT EXISTS public.fleet_parents (tenant_id text NOT NULL, id bigint NOT NULL, name text,
                                                 PRIMARY KEY (tenant_id, id));
CREATE TABLE IF NOT EXISTS public.fleet_notes (
    tenant_id text NOT NULL,
    id bigint NOT NULL,
    parent_id bigint,
    body text,
    n integer,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, parent_id) REFERENCES public.fleet_parents (tenant_id, id)
);
GRANT ALL ON public.fleet_parents, public.fleet_notes TO service_role;
