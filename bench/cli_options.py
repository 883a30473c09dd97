"""Options several `pgcg bench` commands share."""

from __future__ import annotations

import click

server_option = click.option(
    "--server",
    default=None,
    help="Throwaway server when no database is given: 18 (embedded, the default), 15 "
    "(Debian's postgresql-15 package) or a server's bin/ folder.",
)

servers_option = click.option(
    "--server",
    default=None,
    help="Throwaway server(s) when no database is given: 18 (embedded, the default), 15 "
    "(Debian's postgresql-15 package) or a server's bin/ folder; several, comma-separated "
    "(15,18), run the same drains on each, one server after the other, and compare them.",
)
