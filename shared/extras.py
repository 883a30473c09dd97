"""Optional dependencies: what the core can do without, and one way to say what is missing.

The core install is what an application embeds (psycopg without a bundled libpq, the OTel
API without the SDK). Everything else is an extra, and code that needs one checks here
first, so the user reads which extra to install rather than an ImportError.
"""

from __future__ import annotations

import functools
import importlib.util

from pgcg.shared.errors import MissingExtra


@functools.cache
def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def require(extra: str, module: str, what: str) -> None:
    """Raise MissingExtra unless `module` (part of pgcg's `extra`) is installed."""
    if not installed(module):
        raise MissingExtra(f"{what} needs pgcg's {extra!r} extra: pip install 'pgcg[{extra}]'")


def require_or_exit(extra: str, module: str, what: str) -> None:
    """For commands: one line on stderr and exit code 2 when the extra is missing."""
    import click

    try:
        require(extra, module, what)
    except MissingExtra as exc:
        click.echo(f"pgcg: error: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
