"""What every `pgcg` command shares: settings as flags, errors as one line and an exit
code, and plain tables."""

from __future__ import annotations

import functools
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click
import psycopg
import pydantic
from pydantic import SecretStr

from pgcg.shared.db import translate
from pgcg.shared.errors import ConfigError, PgcgError
from pgcg.shared.redaction import scrub
from pgcg.shared.settings import Settings
from pgcg.shared.telemetry import setup_logging
from pgcg.shared.terminal import printable

log = logging.getLogger("pgcg.cli")

F = Callable[..., Any]


def _settings_from(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'/'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def with_settings(*fields: str) -> Callable[[F], F]:
    """Add a flag per named Settings field (all of them if none named); the command then
    receives `settings`. Flags override PGCG_* environment variables."""

    def decorate(fn: F) -> F:
        chosen = fields or tuple(Settings.model_fields)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            overrides = {name: kwargs.pop(name, None) for name in chosen}
            try:
                settings = _settings_from(overrides)
            except PgcgError as exc:
                fail(exc)
            setup_logging(settings.log_level, settings.log_format)
            return fn(*args, settings=settings, **kwargs)

        for name in reversed(chosen):
            info = Settings.model_fields[name]
            env = f"PGCG_{name.upper()}"
            flag = f"--{name.replace('_', '-')}"
            kind = _click_type(info.annotation)
            wrapper = click.option(
                f"{flag}/--no-{name.replace('_', '-')}" if kind is bool else flag,
                name,
                type=None if kind is bool else kind,
                metavar="URL" if info.annotation == SecretStr | None else None,
                # None when not given, so the PGCG_* variable or the default applies.
                default=None,
                show_default=False,
                help=f"{info.description or ''} [env {env}; default {info.default!r}]".strip(),
            )(wrapper)
        return wrapper

    return decorate


def _click_type(annotation: Any) -> Any:
    """The click type for a Settings field, so --help and usage errors show the real one
    (FLOAT, INTEGER, a choice); pydantic still checks the ranges. `bool` means a flag pair."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in args], case_sensitive=False)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = args  # Optional[X]: a flag for X
    if annotation is bool:
        return bool
    if annotation is SecretStr:
        return click.STRING
    return {int: click.INT, float: click.FLOAT, str: click.STRING}[annotation]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def fail(exc: PgcgError) -> NoReturn:
    # Errors quote names, keys and database text: one line, nothing a terminal obeys.
    click.echo(f"pgcg: error: {printable(scrub(str(exc)))}", err=True)
    sys.exit(exc.exit_code)


def _ours(exc: BaseException) -> PgcgError | None:
    """The pgcg error for `exc`, translating a driver error that escaped its boundary."""
    if isinstance(exc, PgcgError):
        return exc
    if isinstance(exc, psycopg.Error):
        return translate(exc)
    return None


def run_cli(fn: F) -> F:
    """Turn pgcg errors into one line on stderr and their exit code; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (PgcgError, psycopg.Error) as exc:
            ours = _ours(exc)
            if ours is None:
                raise
            fail(ours)
        except BaseExceptionGroup as group:
            # A loop inside a task group failed with one of ours: report it like any other.
            first = next((e for e in map(_ours, _leaves(group)) if e is not None), None)
            if first is None:
                raise
            fail(first)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


# click 8.2 shows the help of a group called without arguments by raising this UsageError
# (exit 2, help on stderr); click 8.1, our floor, exits 0 without one.
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None
)


class OneLineErrors(click.Group):
    """A bad flag or value in any subcommand is one line and exit 2, like every other
    error of pgcg, instead of click's usage block."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(
                f"pgcg: error: {printable(exc.format_message())} (see `{where} --help`)",
                err=True,
            )
            sys.exit(2)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: str = "") -> str:
    """Aligned columns for a terminal; every cell made printable. Columns whose header is
    in `right` (by position, 'r' or 'l') are right-aligned."""
    cells = [[printable(str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = right.ljust(len(headers), "l")
    return "\n".join(
        "  ".join(
            c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align, strict=True)
        ).rstrip()
        for r in cells
    )
