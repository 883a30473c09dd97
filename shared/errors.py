"""The one exception hierarchy pgcg raises; driver errors are translated into it in db.py.

Each class says whether retrying can help and its message tells the user what to do.
"""

from __future__ import annotations


class PgcgError(Exception):
    """Base class. `retriable` says whether the same call may succeed later."""

    retriable = False
    exit_code = 1


class ConfigError(PgcgError):
    """A setting is missing or malformed."""

    exit_code = 2


class PermissionDenied(ConfigError):
    """The database role lacks a privilege this process needs (a grant to add)."""


class MissingExtra(ConfigError):
    """A feature needs an optional dependency that is not installed (`pip install 'pgcg[x]'`)."""


class InvalidInput(PgcgError):
    """Bad input from the caller (payload, key, name); nothing was written."""

    exit_code = 2


class InvalidName(InvalidInput):
    """A topic or group name that cannot be used as given."""


class PayloadTooLarge(InvalidInput):
    """A payload over the configured size limit."""


class UnknownTopic(PgcgError):
    exit_code = 3


class UnknownGroup(PgcgError):
    exit_code = 3


class DatabaseUnavailable(PgcgError):
    """The server cannot be reached or dropped the connection; retry later."""

    retriable = True
    exit_code = 4


class Contention(DatabaseUnavailable):
    """A deadlock, serialization failure or lock timeout: transient, retry the statement."""


class StatementFailed(PgcgError):
    """The database refused a statement for a reason that retrying will not change (a
    limit, a constraint, a bug): the caller isolates the item that caused it instead of
    retrying the whole batch forever."""

    exit_code = 1


class SchemaNotMigrated(PgcgError):
    """The pgcg schema is missing or older than this code expects."""

    exit_code = 5


class LostOwnership(PgcgError):
    """A fenced write matched no row: the partition (or leadership) moved on.

    Never retried blindly: the caller stops acting on the partition and rejoins.
    """


class HandlerMisuse(PgcgError):
    """A handler did something the consumer cannot allow (e.g. committed its transaction)."""


class HandlerLoadError(ConfigError):
    """`--handler module:function` does not name an importable callable."""
