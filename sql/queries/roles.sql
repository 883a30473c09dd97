-- Statements of shared/roles.py (`pgcg roles`): what the grants it writes are made of.

-- name: role_exists
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = %(role)s) AS present

-- name: context
-- The schema's owner (it owns every table and runs the checked functions) and the database.
SELECT n.nspowner::regrole::text AS owner, current_database() AS database
FROM pg_namespace AS n WHERE n.nspname = 'pgcg'

-- name: bind
INSERT INTO pgcg.role_scopes (kind, name, role_id, topic)
VALUES (%(kind)s, %(name)s, %(role)s::regrole, %(topic)s)
ON CONFLICT DO NOTHING
