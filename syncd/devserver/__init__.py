"""`syncd dev-server`: a PostgREST v12-compatible HTTP API over a real PostgreSQL.

No PostgREST binary can be installed on a laptop without Docker, yet every test, benchmark and demo
of syncd needs a secondary that answers exactly as PostgREST does (see shared/POSTGREST.md). This
package is that secondary: `postgres` starts or connects to PostgreSQL and applies migrations,
`schema` is the schema cache, `query` turns PostgREST URLs into SQL, `api` executes one request as one
transaction under the caller's role, `http` is the HTTP/1.1 layer with fault injection.
"""
