"""Named SQL statements, loaded once from the `.sql` files shipped in pgcg.sql.queries.

A file holds blocks that each start with a `-- name: <name>` line; the text up to the next
such line is the statement. Values are always bound as %(name)s parameters.
"""

from __future__ import annotations

import functools
import importlib.resources
import re

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@functools.cache
def load(module: str) -> dict[str, str]:
    """All named queries of `sql/queries/<module>.sql`."""
    text = (importlib.resources.files("pgcg.sql") / "queries" / f"{module}.sql").read_text(
        encoding="utf-8"
    )
    return parse(text)


class Queries:
    """Attribute access to one file's queries; an unknown name says which file was searched."""

    def __init__(self, module: str) -> None:
        self._queries = load(module)
        self._module = module

    def __getattr__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise AttributeError(f"no query {name!r} in sql/queries/{self._module}.sql") from None
