"""syncd: capture every change of an app's SQLite file and ship it to PostgreSQL through PostgREST."""

__version__ = "0.1.0"
