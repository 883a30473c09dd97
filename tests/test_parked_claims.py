"""Claims of parked messages through the SQL API: a claim its holder abandoned under an epoch
that never moves on (the member lost the partition by its lease and got it back under the
same epoch, or could not start what it claimed) must not keep the key from ever running."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgcg.shared.queries import Queries
from tests.helpers import wait_for
from tests.logclient import Owner, enqueue, give, settle_round, tick_now

pytestmark = pytest.mark.pg15

Q = Queries("consumer")
TOPIC, GROUP = "orders", "billing"


def claim(owner: Owner, parked_id: int, epoch: int, token: str, visibility_ms: int) -> Any:
    """The owner's claim of one parked message before its handler starts (as the writer)."""
    rows = owner.conn.execute(
        Q.settle,
        owner.params(
            m_parts=[], m_epochs=[], m_ticks=[], m_offsets=[], m_slots=[],
            c_ids=[parked_id], c_parts=[0], c_epochs=[epoch], c_tokens=[token],
            visibility_ms=visibility_ms,
            l_kinds=[], l_parts=[], l_epochs=[], l_ticks=[], l_offsets=[], l_slots=[],
            l_attempts=[], l_delays=[], l_errors=[], l_origins=[], l_claimed=[],
            k_kinds=[], k_ids=[], k_parts=[], k_epochs=[], k_delays=[], k_errors=[],
        ),
    ).fetchall()  # fmt: skip
    (row,) = rows
    return row


def due(owner: Owner) -> list[int]:
    rows = owner.conn.execute(
        Q.load_parked,
        {"group": GROUP, "partitions": [0], "held": [], "lookahead_ms": 0, "limit": 10,
         "followers": 0},
    ).fetchall()  # fmt: skip
    return [r["id"] for r in rows]


def test_an_abandoned_claim_is_claimed_again_past_its_deadline(
    db: psycopg.Connection[Any],
) -> None:
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    enqueue(db, TOPIC, ["k"])
    tick_now(db, TOPIC)
    owner = Owner(db, GROUP, "member")
    (epoch,) = give(db, GROUP, owner.member, [0]).values()
    assert owner.adopt(0, epoch) is not None
    (row,) = owner.fetch()
    owner.settle(park=[row])  # its first delivery failed: retried from the parked queue
    (parked_id,) = due(owner)

    first = claim(owner, parked_id, epoch, "first", visibility_ms=60_000)
    assert first["ok"] and first["info"] == 2
    # Claimed and running (or so the database must assume): nobody may load or claim it.
    assert due(owner) == []
    assert not claim(owner, parked_id, epoch, "second", visibility_ms=60_000)["ok"]

    # A claim whose deadline passed with the epoch unchanged: its delivery was abandoned
    # (a running handler is cancelled at that deadline). It is due again, and claimed
    # again as a new attempt.
    short = claim(owner, parked_id, epoch, "first", visibility_ms=1)
    assert short["ok"] and short["info"] == 2  # the same claim sent again counts once
    wait_for(lambda: due(owner) == [parked_id], 10, "the abandoned claim to be due again")
    again = claim(owner, parked_id, epoch, "third", visibility_ms=60_000)
    assert again["ok"] and again["info"] == 3
    assert due(owner) == []


def test_a_start_left_over_from_an_earlier_epoch_is_refused_beside_the_current_one(
    db: psycopg.Connection[Any],
) -> None:
    """A member lost a partition with a claim still waiting to be written (the network was
    down), rejoined and got the partition back at a later epoch, and claimed the same
    parked message again: both claims went out in one round. The stale one must not pass
    the fence because the partition is owned at the other epoch: it would leave the row
    claimed under the old epoch, the current delivery's result would then not delete it,
    the key would move on past it, and the next owner would run it again, out of order."""
    db.execute("SELECT pgcg.create_topic(%s, 1)", (TOPIC,))
    db.execute("SELECT pgcg.create_group(%s, %s)", (GROUP, TOPIC))
    enqueue(db, TOPIC, ["k", "k"])
    tick_now(db, TOPIC)
    owner = Owner(db, GROUP, "member")
    (old,) = give(db, GROUP, owner.member, [0]).values()
    assert owner.adopt(0, old) is not None
    first, second = owner.fetch()
    owner.settle(park=[first])
    (parked_id,) = due(owner)
    (new,) = give(db, GROUP, owner.member, [0]).values()
    assert owner.adopt(0, new) is not None

    rows = settle_round(
        owner,
        claims=[(parked_id, 0, old, "stale"), (parked_id, 0, new, "current")],
        marks=[(second, old), (second, new)],
    )
    answers = {(r["what"], r["ref"], r["ok"]) for r in rows}
    # Claims are answered by parked id, marks by epoch: the stale one of each is refused.
    assert sorted(r["ok"] for r in rows if r["what"] == "c") == [False, True]
    claimed = db.execute(
        "SELECT claimed_epoch, claim_token, attempts FROM pgcg.parked WHERE id = %s",
        (parked_id,),
    ).fetchone()
    assert claimed == {"claimed_epoch": new, "claim_token": "current", "attempts": 2}
    assert ("m", old, False) in answers and ("m", new, True) in answers
    marked = db.execute(
        "SELECT array_agg(DISTINCT epoch) AS epochs FROM pgcg.ledger WHERE kind = 'm'"
    ).fetchone()
    assert marked == {"epochs": [new]}

    # The current delivery's result finishes the message.
    (result,) = settle_round(owner, parked=[("d", parked_id, 0, new)])
    assert result["ok"]
    assert db.execute("SELECT count(*) AS n FROM pgcg.parked").fetchone() == {"n": 0}
