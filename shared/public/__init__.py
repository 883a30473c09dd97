"""pgcg: consumer groups on PostgreSQL.

The names here are the stable public API (docs/api.md); every module below
(pgcg.shared, pgcg.consumer, pgcg.coordinator, ...) is internal and may change.

    from pgcg import App, Producer, Message, Retry, DeadLetter
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pgcg.consumer.app import App
from pgcg.consumer.message import Message
from pgcg.consumer.outcomes import DeadLetter, Outcome, Retry
from pgcg.consumer.payloads import PayloadValidationError
from pgcg.shared.errors import (
    ConfigError,
    Contention,
    DatabaseUnavailable,
    InvalidInput,
    InvalidName,
    LostOwnership,
    MissingExtra,
    PayloadTooLarge,
    PgcgError,
    SchemaNotMigrated,
    UnknownGroup,
    UnknownTopic,
)
from pgcg.shared.producer import Enqueued, OutgoingMessage, Producer, SyncProducer, create_topic
from pgcg.shared.settings import Settings

try:
    __version__ = version("pgcg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "App",
    "ConfigError",
    "Contention",
    "DatabaseUnavailable",
    "DeadLetter",
    "Enqueued",
    "InvalidInput",
    "InvalidName",
    "LostOwnership",
    "Message",
    "MissingExtra",
    "Outcome",
    "OutgoingMessage",
    "PayloadTooLarge",
    "PayloadValidationError",
    "PgcgError",
    "Producer",
    "Retry",
    "SchemaNotMigrated",
    "Settings",
    "SyncProducer",
    "UnknownGroup",
    "UnknownTopic",
    "__version__",
    "create_topic",
]
