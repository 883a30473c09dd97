"""Schema migrations: numbered .sql files in pgcg.sql/migrations, applied in order, once.

Several pods may run `pgcg migrate` at the same time (a Helm hook per release, or every
consumer at start): a transaction-level advisory lock serialises them, and each migration
commits together with its row in pgcg.schema_migrations.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from dataclasses import dataclass

import psycopg

from pgcg.shared.db import connect_sync, translated
from pgcg.shared.errors import SchemaNotMigrated
from pgcg.shared.queries import Queries

log = logging.getLogger("pgcg.migrate")
Q = Queries("migrate")

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
# Any constant shared by every migrator; "pgcg" in ASCII.
MIGRATION_LOCK = 0x70676367


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    folder = importlib.resources.files("pgcg.sql") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


LATEST = len(migrations())


def migrate(dsn: str) -> list[Migration]:
    """Apply every pending migration; returns the ones this call applied."""
    applied: list[Migration] = []
    with translated(dsn), connect_sync(dsn, autocommit=False) as conn, conn.transaction():
        conn.execute(Q.lock, {"lock": MIGRATION_LOCK})
        conn.execute(Q.create_version_table)
        done = {row["version"] for row in conn.execute(Q.applied_versions)}
        for migration in migrations():
            if migration.version in done:
                continue
            log.info(
                "applying migration %04d_%s",
                migration.version,
                migration.name,
                extra={"action": "migration_applied", "version": migration.version},
            )
            conn.execute(migration.sql)
            conn.execute(Q.record, {"version": migration.version, "name": migration.name})
            applied.append(migration)
    return applied


def current_version(conn: psycopg.Connection[dict[str, object]]) -> int:
    """The latest applied migration; 0 for a database pgcg never touched."""
    exists = conn.execute(Q.version_table_exists).fetchone()
    if not exists or not exists["present"]:
        return 0
    callable_ = conn.execute(Q.version_function_callable).fetchone()
    by_function = bool(callable_ and callable_["callable"])
    row = conn.execute(
        Q.current_version_by_function if by_function else Q.current_version
    ).fetchone()
    return int(row["version"]) if row else 0  # type: ignore[call-overload]


def check(conn: psycopg.Connection[dict[str, object]]) -> None:
    """Raise SchemaNotMigrated unless the database has every migration this code knows."""
    version = current_version(conn)
    if version < LATEST:
        raise SchemaNotMigrated(
            f"the database schema is at version {version}, this pgcg needs {LATEST}: "
            "run `pgcg migrate`"
        )
