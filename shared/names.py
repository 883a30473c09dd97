"""Validation of names that come from users and end up in identifiers or channel names."""

from __future__ import annotations

import re

from pgcg.shared.errors import InvalidName

# Topic names become part of table names (messages_<topic>_p<N>), so they stay within
# PostgreSQL's 63-byte identifier limit and need no quoting.
TOPIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Group names only ever travel as values and inside NOTIFY channel names (max 63 bytes).
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")


def topic_name(name: str) -> str:
    if not isinstance(name, str) or not TOPIC_RE.fullmatch(name):
        raise InvalidName(
            f"invalid topic name {name!r}: use 1-40 characters, lowercase letters, digits "
            "and underscores, starting with a letter"
        )
    return name


def group_name(name: str) -> str:
    if not isinstance(name, str) or not GROUP_RE.fullmatch(name):
        raise InvalidName(
            f"invalid group name {name!r}: use 1-48 characters from letters, digits, '.', "
            "'_' and '-', starting with a letter or digit"
        )
    return name


def topic_channel(topic: str) -> str:
    """NOTIFY channel that wakes the consumers of a topic."""
    return f"pgcg.t.{topic}"


def group_channel(group: str) -> str:
    """NOTIFY channel that tells a group's members their assignments changed."""
    return f"pgcg.g.{group}"


COORDINATOR_CHANNEL = "pgcg.coordinator"
