-- Statements of shared/migrate.py. The version table lives outside the numbered
-- migrations because it records them.

-- name: create_version_table
CREATE SCHEMA IF NOT EXISTS pgcg;
CREATE TABLE IF NOT EXISTS pgcg.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)

-- name: lock
SELECT pg_advisory_xact_lock(%(lock)s)

-- name: applied_versions
SELECT version FROM pgcg.schema_migrations

-- name: record
INSERT INTO pgcg.schema_migrations (version, name) VALUES (%(version)s, %(name)s)

-- name: version_table_exists
-- Asked on its own: a statement that names a missing table fails when it is parsed, even
-- inside a CASE branch that would never run.
SELECT to_regclass('pgcg.schema_migrations') IS NOT NULL AS present

-- name: current_version
SELECT coalesce(max(version), 0) AS version FROM pgcg.schema_migrations

-- name: version_function_callable
-- From version 5 a role without table privileges (an admin's) reads the version through
-- pgcg.schema_version(); before version 5 there is no such function, and the table is read.
SELECT coalesce(has_function_privilege(to_regprocedure('pgcg.schema_version()'), 'EXECUTE'),
                false) AS callable

-- name: current_version_by_function
SELECT pgcg.schema_version() AS version
