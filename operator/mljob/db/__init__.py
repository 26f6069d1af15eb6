"""Postgres persistence for mljob: the versioned schema (``migrations/*.sql``) and its migration runner.

Postgres is the durable system of record for jobs, per-item results and the phase audit trail;
everything is created in the connection's current ``search_path`` schema so deployments (and tests)
can isolate themselves by schema.
"""
