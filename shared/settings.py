"""Every pgcg setting in one place: defaults, PGCG_* environment variables, validation.

The CLI turns each field into a flag (see cli.py), so a setting is declared once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The longest delay pgcg schedules (a message's delay, one retry's backoff): far beyond
# any sensible use, far inside what a PostgreSQL timestamp can hold (now() + 1e14 s
# overflows it and fails the whole statement).
MAX_DELAY_SECONDS = 10 * 365 * 24 * 3600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PGCG_", extra="ignore", frozen=True)

    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL connection URL (postgresql://user:pass@host:5432/db). "
        "Required except for `pgcg demo`, which starts a throwaway server without it.",
    )
    session_database_url: SecretStr | None = Field(
        None,
        description="Direct PostgreSQL URL (same database) for what needs a session of its "
        "own when PGCG_DATABASE_URL goes through a transaction pooler: the coordinator's "
        "leader lock and LISTEN. Unset: PGCG_DATABASE_URL, unless that is pooled.",
    )
    pooler: Literal["auto", "none", "transaction"] = Field(
        "auto",
        description="`transaction`: PGCG_DATABASE_URL goes through a transaction-mode pooler "
        "(PgBouncer pool_mode=transaction): no prepared statements on it, and LISTEN and the "
        "leader lock use PGCG_SESSION_DATABASE_URL. `auto` detects a pooler at start.",
    )
    listen: bool = Field(
        True,
        description="LISTEN for new messages and assignment changes; false: poll only "
        "(new messages within poll_interval, assignments within heartbeat_interval).",
    )
    heartbeat_interval: float = Field(
        2.0,
        gt=0,
        description="Seconds between member heartbeats (and the coordinator's full sweeps; "
        "expired members are also probed for every 0.25 s).",
    )
    session_timeout: float = Field(
        10.0,
        ge=3.0,
        description="Seconds without a heartbeat after which a member is considered dead.",
    )
    drain_deadline: float = Field(
        10.0,
        gt=0,
        description="Seconds a revoked partition's owner gets to finish in-flight messages "
        "before the hand-off is forced (never sooner than the owner's session timeout); at "
        "least session_timeout minus the lease margin (the larger of 1 s and 20 % of it).",
    )
    leader_timeout: float = Field(
        10.0, ge=2.0, description="Seconds without a leader heartbeat before a standby takes over."
    )
    rebalance_interval: float = Field(
        30.0, gt=0, description="Seconds between safety-net rebalances of every group."
    )
    concurrency: int = Field(10, ge=1, le=10_000, description="Handlers running at once.")
    max_attempts: int = Field(
        10, ge=1, description="Deliveries of a message before it is dead-lettered."
    )
    retry_base: float = Field(
        1.0,
        gt=0,
        le=MAX_DELAY_SECONDS,
        description="Seconds: scale of the exponential retry backoff (full jitter).",
    )
    retry_max: float = Field(
        300.0,
        gt=0,
        le=MAX_DELAY_SECONDS,
        description="Seconds: cap of one retry delay (at most 10 years).",
    )
    visibility_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a handler may run without reporting progress before it is "
        "treated as stuck and its message retried.",
    )
    max_payload_bytes: int = Field(
        1_048_576, gt=0, description="Largest accepted payload (JSON text, bytes)."
    )
    prefetch: int = Field(1000, ge=1, description="Messages a consumer holds in memory at most.")
    maintenance_interval: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds between a coordinator's rounds of topic upkeep (segment rotation "
        "and reclaim by retention).",
    )
    prefetch_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes of payload and headers a consumer holds in memory at most.",
    )
    park_after: float = Field(
        30.0,
        gt=0,
        description="Seconds a key may hold its partition's position back (a long delay, a "
        "slow message) before its messages move to the group's parked queue.",
    )
    poll_interval: float = Field(
        2.0,
        gt=0,
        description="Seconds: longest wait between polls when no NOTIFY arrives (adaptive); "
        "an idle consumer whose LISTEN works polls every 30 s instead.",
    )
    http_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port for /healthz, /readyz and /metrics; 0 turns the endpoint off.",
    )
    instrument_psycopg: bool = Field(
        False,
        description="Trace every query as a child span (needs `pip install 'pgcg[otel]'`; "
        "tracing itself is configured by the standard OTEL_* variables).",
    )
    log_format: Literal["auto", "json", "text", "none"] = Field(
        "auto",
        description="json lines, or text; auto picks text on a terminal; none leaves "
        "logging alone (handlers, levels and format are the host program's).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.heartbeat_interval * 2 > self.session_timeout:
            raise ValueError(
                "session_timeout must be at least twice heartbeat_interval, or one late "
                "heartbeat expels a healthy member"
            )
        if self.retry_max < self.retry_base:
            raise ValueError("retry_max must not be smaller than retry_base")
        # A hair of tolerance: the Helm chart checks the same rule in decimal arithmetic,
        # and a value it accepts at the boundary must not fail here in binary floats.
        if self.drain_deadline < self.session_timeout - self.lease_margin - 1e-9:
            # An owner cut off from the database before it heard of a revocation keeps
            # handling until its lease runs out; a forced hand-off earlier than that would
            # give its keys to a second member while it still works on them.
            raise ValueError(
                f"drain_deadline ({self.drain_deadline:g}s) must be at least session_timeout "
                f"minus the lease margin ({self.session_timeout - self.lease_margin:g}s), or "
                "a forced hand-off can overtake an owner that never heard of its revocation: "
                "raise PGCG_DRAIN_DEADLINE or lower PGCG_SESSION_TIMEOUT"
            )
        return self

    def dsn(self) -> str:
        from pgcg.shared.errors import ConfigError

        if self.database_url is None:
            raise ConfigError(
                "no database configured: set PGCG_DATABASE_URL (or pass --database-url), "
                "e.g. postgresql://user:password@localhost:5432/app"
            )
        return self.database_url.get_secret_value()

    def session_dsn(self) -> str | None:
        """PGCG_SESSION_DATABASE_URL as given (see shared/pooler.py for what uses it)."""
        url = self.session_database_url
        return url.get_secret_value() if url is not None else None

    @property
    def lease_margin(self) -> float:
        """How much earlier than the database a member stops trusting its lease.

        Covers the heartbeat's own round trip and scheduling jitter on a busy host.
        """
        return max(1.0, self.session_timeout * 0.2)
