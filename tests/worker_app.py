"""An App for `pgcg worker tests.worker_app:app` (tests/test_app.py): two handlers that
record what they handled in a table of the test's database."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from pgcg import App, Message

app = App(coordinator=True)


def _record(handler: str, message: Message[Any]) -> None:
    with psycopg.connect(os.environ["PGCG_DATABASE_URL"]) as conn:
        conn.execute(
            "INSERT INTO public.worker_seen (handler, message_id) VALUES (%s, %s)",
            (handler, message.id),
        )


@app.handler(topic="orders", group="billing")
def bill(message: Message[dict[str, int]]) -> None:
    _record("bill", message)


@app.handler(topic="emails", group="mailer", concurrency=2)
def mail(message: Message[str]) -> None:
    _record("mail", message)
