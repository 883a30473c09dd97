"""What a topic's storage weighs during a soak: bytes of its tables and indexes, live and dead
tuples, how often autovacuum and autoanalyze ran.

Which relations belong to a topic is decided in one place, topic_relation_prefixes():
every relation in the pgcg schema whose name starts with one of the prefixes (tables,
their partitions and segments, their indexes; TOAST counts with its table).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

_QUERY = """
WITH rel AS (
    SELECT c.oid, c.relkind
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = 'pgcg'
      AND EXISTS (SELECT 1 FROM unnest(%(prefixes)s::text[]) AS p
                  WHERE starts_with(c.relname, p))
)
SELECT coalesce(sum(pg_table_size(rel.oid)) FILTER (WHERE rel.relkind IN ('r', 'm')), 0)
           AS table_bytes,
       coalesce(sum(pg_relation_size(rel.oid)) FILTER (WHERE rel.relkind = 'i'), 0)
           AS index_bytes,
       count(*) FILTER (WHERE rel.relkind IN ('r', 'm')) AS tables,
       coalesce(sum(s.n_live_tup), 0) AS live_tuples,
       coalesce(sum(s.n_dead_tup), 0) AS dead_tuples,
       coalesce(sum(s.autovacuum_count), 0) AS autovacuums,
       coalesce(sum(s.autoanalyze_count), 0) AS autoanalyzes
FROM rel LEFT JOIN pg_stat_all_tables AS s ON s.relid = rel.oid
"""


def topic_relation_prefixes(topic: str) -> list[str]:
    """Names (prefixes) of the relations that hold `topic`'s messages.

    The topic's log `log_<topic>` with its slot tables `log_<topic>_<slot>`, and its
    ledger `ledger_<topic>` (the groups' completion rows, in the same slots), with their
    indexes. The topic's sequences share the log's prefix but are not tables, so they do
    not count. Parked messages, positions and ticks live in tables shared by every topic.
    """
    return [f"log_{topic}", f"ledger_{topic}"]


def storage_stats(conn: psycopg.Connection[Any], topic: str) -> dict[str, int]:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(_QUERY, {"prefixes": topic_relation_prefixes(topic)}).fetchone()
    assert row is not None
    return {name: int(value) for name, value in row.items()}
