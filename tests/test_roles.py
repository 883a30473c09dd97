"""Least privilege with isolation: each kind of process under its own non-superuser role made
by `pgcg roles`; a consumer role acts only for its groups, a producer role writes only its
topics, a coordinator and an administrator do their whole job through their functions, and
none of them holds a privilege on any table (docs/security.md, "Roles and grants")."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from psycopg.rows import dict_row

from pgcg.shared.producer import OutgoingMessage, enqueue_many_sync
from tests.helpers import owners, unfinished, wait_for
from tests.logclient import Owner, give, tick_now
from tests.ops_helpers import dead_letter
from tests.test_privileges import _error_line, _finish, _start

A, B = ("ga", "ta"), ("gb", "tb")


@pytest.fixture
def roles(
    db: psycopg.Connection[Any], dsn: str, cli: Callable[..., Result]
) -> Iterator[Callable[..., str]]:
    """roles(kind, *options) -> the name of a new NOLOGIN role made by `pgcg roles ... --apply`;
    dropped when the test ends."""
    made: list[str] = []

    def make(kind: str, *options: str) -> str:
        name = f"pgcg_{kind}_{uuid.uuid4().hex[:8]}"
        made.append(name)
        result = cli(dsn, "roles", kind, name, *options, "--apply")
        assert result.exit_code == 0, result.output + str(result.exception)
        return name

    try:
        yield make
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            for name in made:
                admin.execute(f'DROP OWNED BY "{name}"')
                admin.execute(f'DROP ROLE "{name}"')


def _setup(db: psycopg.Connection[Any]) -> None:
    for group, topic in (A, B):
        db.execute("SELECT pgcg.create_topic(%s, 2)", (topic,))
        db.execute("SELECT pgcg.create_group(%s, %s)", (group, topic))
        enqueue_many_sync(
            db, topic, [OutgoingMessage(f"k{i}", {"secret": topic}) for i in range(4)]
        )


def _login(make_role: Callable[..., str], member_of: str) -> psycopg.Connection[dict[str, Any]]:
    """A connection of a new login role that is a member of `member_of`."""
    dsn = make_role(f'GRANT "{member_of}" TO {{role}}')
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


def _denied(conn: psycopg.Connection[Any], statement: str, params: Any = None) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
        conn.execute(statement, params)
    return str(caught.value).splitlines()[0]


def _state(db: psycopg.Connection[Any]) -> list[Any]:
    return [
        db.execute("SELECT count(*) AS n FROM pgcg.log").fetchone(),
        db.execute("SELECT * FROM pgcg.partition_assignments ORDER BY 1, 2, 3").fetchall(),
        db.execute("SELECT * FROM pgcg.consumer_groups ORDER BY 1, 2").fetchall(),
        db.execute("SELECT * FROM pgcg.group_progress ORDER BY 1, 2").fetchall(),
        db.execute("SELECT count(*) AS n FROM pgcg.role_scopes").fetchone(),
    ]


SETTLE_NULLS = ", ".join(["NULL"] * 27)


def test_a_consumer_role_acts_only_for_its_groups(
    db: psycopg.Connection[Any], make_role: Callable[..., str], roles: Callable[..., str]
) -> None:
    _setup(db)
    role = roles("consumer", "--group", A[0], "--topic", A[1])
    conn = _login(make_role, role)
    # Its own group works, through the functions only.
    tick_now(db, A[1])
    owner = Owner(conn, A[0], "m0")
    for partition, epoch in give(db, A[0], "m0", [0, 1]).items():
        assert owner.adopt(partition, epoch) is not None
    assert {r.payload["secret"] for r in owner.fetch()} == {A[1]}
    conn.execute("SELECT pgcg.join_group(%s, 'm1', 'h', 1, 10000)", (A[0],))
    assert conn.execute("SELECT * FROM pgcg.heartbeat(%s, 'm1')", (A[0],)).fetchone()["alive"]
    before = _state(db)
    # No table: not the log, not another topic's messages, not another group's assignments,
    # not the bindings themselves.
    for statement in (
        "DELETE FROM pgcg.log",
        f"SELECT payload FROM pgcg.log_{B[1]}",
        f"SELECT payload FROM pgcg.log_{A[1]}",
        "UPDATE pgcg.partition_assignments SET member_id = 'attacker', epoch = epoch + 100 "
        f"WHERE group_name = '{B[0]}'",
        "INSERT INTO pgcg.role_scopes (kind, name, role_id) "
        f"VALUES ('group', '*', '{role}'::regrole)",
    ):
        assert "permission denied for table" in _denied(conn, statement), statement
    # No function of another group, nor of its own group on another topic.
    for statement in (
        "SELECT * FROM pgcg.fetch(%s, '{0}', '{NULL}', '{NULL}', '{NULL}', 100, 1000000)",
        "SELECT * FROM pgcg.heartbeat(%s, 'm1')",
        "SELECT pgcg.join_group(%s, 'attacker', 'h', 1, 10000)",
        "SELECT pgcg.leave_group(%s, 'm1')",
        "SELECT * FROM pgcg.adopt(%s, 'm1', 0, 1, 5, 0)",
        f"SELECT * FROM pgcg.settle(%s, 'm1', {SETTLE_NULLS})",
        "SELECT * FROM pgcg.release(%s, 'm1', '{0}', '{1}', '{1}', '{t}', false)",
        "SELECT * FROM pgcg.group_lag(%s)",
        "SELECT * FROM pgcg.member_expectation(%s, 'm1')",
    ):
        assert _denied(conn, statement, (B[0],)) == f"permission denied for group {B[0]}"
    line = _denied(conn, "SELECT pgcg.create_group(%s, %s)", (A[0], B[1]))
    assert line == f"permission denied for group {A[0]}"
    line = _denied(conn, "SELECT pgcg.create_group(%s, %s)", ("other", A[1]))
    assert line == "permission denied for group other"
    # Nor the bodies behind the checks, nor what producers and operators call.
    for statement in (
        "SELECT * FROM pgcg.fetch_unchecked(%s, '{0}', '{NULL}', '{NULL}', '{NULL}', 1, 1)",
        "SELECT * FROM pgcg.enqueue(%s, '{k}', '{\"{}\"}')",
        "SELECT pgcg.create_topic(%s)",
    ):
        assert "permission denied for function" in _denied(conn, statement, (B[1],))
    assert _state(db) == before


def test_a_producer_role_writes_only_its_topics(
    db: psycopg.Connection[Any], make_role: Callable[..., str], roles: Callable[..., str]
) -> None:
    _setup(db)
    role = roles("producer", "--topic", A[1])
    conn = _login(make_role, role)
    ids = enqueue_many_sync(conn, A[1], [OutgoingMessage("k", {"n": 1})])
    assert len(ids) == 1 and ids[0] is not None
    before = _state(db)
    enqueue = "SELECT * FROM pgcg.enqueue(%s, '{k}', '{\"{}\"}')"
    assert _denied(conn, enqueue, (B[1],)) == f"permission denied for topic {B[1]}"
    for statement in (
        f'INSERT INTO pgcg.log_{A[1]} (slot, partition, "offset", txid, key, payload) '
        "VALUES (0, 0, 0, pg_current_xact_id(), 'k', '{}')",
        "SELECT count(*) FROM pgcg.log",
        "DELETE FROM pgcg.dedup",
    ):
        assert "permission denied for table" in _denied(conn, statement), statement
    for statement in (
        f"SELECT * FROM pgcg.fetch('{A[0]}', '{{0}}', '{{NULL}}', '{{NULL}}', '{{NULL}}', 1, 1)",
        f"SELECT * FROM pgcg.heartbeat('{A[0]}', 'm1')",
    ):
        assert "permission denied for function" in _denied(conn, statement), statement
    assert _state(db) == before


def test_a_consumer_of_a_group_it_is_not_bound_to_stops_with_one_line(
    db: psycopg.Connection[Any], make_role: Callable[..., str], roles: Callable[..., str]
) -> None:
    _setup(db)
    dsn = make_role(f'GRANT "{roles("consumer", "--group", A[0], "--topic", A[1])}" TO {{role}}')
    code, stderr = _finish(_start(["consumer", "--group", B[0], "--topic", B[1], "--handler",
                                   "pgcg.bench.chaos.journal:record"], dsn))  # fmt: skip
    line = _error_line(stderr)
    assert code == 2, stderr[-3000:]
    assert f"is not bound to group {B[0]}" in line and "pgcg roles consumer" in line, line


def test_every_process_under_its_own_role(
    db: psycopg.Connection[Any],
    make_role: Callable[..., str],
    roles: Callable[..., str],
    tmp_path: Path,
) -> None:
    """A producer, a consumer and a coordinator, each a login member of a role `pgcg roles`
    made, move a topic's messages end to end; the consumer of another group sees none."""
    _setup(db)
    producer = _login(make_role, roles("producer", "--topic", A[1]))
    (tmp_path / "least.py").write_text("async def handle(message):\n    return None\n")
    coordinator = _start(["coordinator"], make_role(f'GRANT "{roles("coordinator")}" TO {{role}}'))
    consumer = _start(
        ["consumer", "--group", A[0], "--topic", A[1], "--handler-path", str(tmp_path),
         "--handler", "least:handle"],
        make_role(f'GRANT "{roles("consumer", "--group", A[0], "--topic", A[1])}" TO {{role}}'),
    )  # fmt: skip
    procs = (consumer, coordinator)
    try:
        enqueue_many_sync(producer, A[1], [OutgoingMessage(f"p{i}", {}) for i in range(6)])

        def done_or_failed() -> bool:
            if any(proc.poll() is not None for proc in procs):
                return True
            row = db.execute(
                "SELECT count(*) AS n FROM pgcg.group_progress AS gp "
                "JOIN pgcg.groups AS g ON g.id = gp.group_id "
                "WHERE g.group_name = %s", (A[0],)
            ).fetchone()  # fmt: skip
            lag = db.execute("SELECT coalesce(sum(lag), 0) AS n FROM pgcg.group_lag(%s)", (A[0],))
            return row["n"] > 0 and lag.fetchone()["n"] == 0

        wait_for(done_or_failed, 60, "the group's messages handled")
        exited = [proc.poll() for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        results = [_finish(proc) for proc in procs]
    for _code, stderr in results:
        assert "pgcg: error:" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert exited == [None, None]
    lag_b = db.execute("SELECT coalesce(sum(lag), 0) AS n FROM pgcg.group_lag(%s)", (B[0],))
    assert lag_b.fetchone()["n"] == 4  # nobody read the other topic


def test_the_script_is_printed_and_names_no_table_for_runtime_roles(
    db: psycopg.Connection[Any], dsn: str, cli: Callable[..., Result]
) -> None:
    _setup(db)
    for kind, options in (("producer", ["--topic", A[1]]),
                          ("consumer", ["--group", A[0], "--topic", A[1]])):  # fmt: skip
        result = cli(dsn, "roles", kind, "someone", *options)
        assert result.exit_code == 0, result.output
        lines = result.output.strip().splitlines()
        assert lines[0] == 'CREATE ROLE "someone";'
        assert not any(" ON TABLE" in line or "ALL TABLES" in line for line in lines), lines
        assert any("pgcg.role_scopes" in line for line in lines)
    assert (
        db.execute("SELECT count(*) AS n FROM pg_roles WHERE rolname = 'someone'").fetchone()["n"]
        == 0
    )  # printing changes nothing
    bad = cli(dsn, "roles", "consumer", "Robert'); DROP", "--group", A[0], "--topic", A[1])
    assert bad.exit_code == 2 and "invalid role name" in bad.output


def test_every_checked_function_is_definer_with_a_fixed_search_path(
    db: psycopg.Connection[Any],
) -> None:
    """PostgreSQL grants EXECUTE to PUBLIC by default: every SECURITY DEFINER function of the
    schema must have it revoked, and a search_path of its own."""
    rows = db.execute(
        """
        SELECT p.proname, p.proconfig,
               has_function_privilege('public', p.oid, 'EXECUTE') AS public
        FROM pg_proc AS p
        WHERE p.pronamespace = 'pgcg'::regnamespace AND p.prosecdef
        """
    ).fetchall()
    assert {"fetch", "settle", "enqueue", "heartbeat"} <= {r["proname"] for r in rows}
    for r in rows:
        assert not r["public"], r["proname"]
        assert any(c.startswith("search_path=pg_catalog, pgcg") for c in r["proconfig"] or ()), r
    unchecked = db.execute(
        "SELECT p.proname FROM pg_proc AS p WHERE p.pronamespace = 'pgcg'::regnamespace "
        "AND p.proname LIKE '%%_unchecked' AND has_function_privilege('public', p.oid, 'EXECUTE')"
    ).fetchall()
    assert unchecked == []


def _table_privileges(db: psycopg.Connection[Any], role: str) -> list[str]:
    """pgcg's tables (a topic's own ones included) on which `role` holds any privilege,
    directly or through a role it is a member of, and its schema-wide default ones."""
    tables = db.execute(
        "SELECT c.relname FROM pg_class AS c WHERE c.relnamespace = 'pgcg'::regnamespace "
        "AND c.relkind IN ('r', 'p', 'S') AND has_table_privilege(%s, c.oid, "
        "'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') ORDER BY 1",
        (role,),
    ).fetchall()
    defaults = db.execute(
        "SELECT d.defaclobjtype FROM pg_default_acl AS d, aclexplode(d.defaclacl) AS a "
        "WHERE a.grantee = %s::regrole",
        (role,),
    ).fetchall()
    return [r["relname"] for r in tables] + [f"default {r['defaclobjtype']}" for r in defaults]


def test_a_coordinator_role_rebalances_and_drains_through_its_functions(
    db: psycopg.Connection[Any],
    make_role: Callable[..., str],
    roles: Callable[..., str],
    tmp_path: Path,
) -> None:
    """A coordinator as a login member of `pgcg roles coordinator`, with no privilege on any
    table: elects itself, assigns a group's partitions, moves one to a second member (revoke,
    release, assign), expires nobody alive, and its upkeep rotates and reclaims segments."""
    _setup(db)
    db.execute("SELECT pgcg.alter_topic(%s, p_retention_ms => 1000)", (A[1],))
    coordinator_role = roles("coordinator")
    consumer_role = roles("consumer", "--group", A[0], "--topic", A[1])
    assert _table_privileges(db, coordinator_role) == []
    (tmp_path / "least.py").write_text("async def handle(message):\n    return None\n")

    def consumer() -> Any:
        return _start(["consumer", "--group", A[0], "--topic", A[1], "--handler-path",
                       str(tmp_path), "--handler", "least:handle"],
                      make_role(f'GRANT "{consumer_role}" TO {{role}}'))  # fmt: skip

    procs = [
        _start(["coordinator"], make_role(f'GRANT "{coordinator_role}" TO {{role}}'),
               PGCG_MAINTENANCE_INTERVAL="0.2"),
        consumer(),
    ]  # fmt: skip
    try:

        def exited() -> bool:
            return any(proc.poll() is not None for proc in procs)

        def owned_by(n: int) -> bool:
            current = owners(db, A[0]).values()
            return exited() or (
                len({m for m, _, state in current if m and state == "assigned"}) == n
                and all(state == "assigned" for _, _, state in current)
            )

        wait_for(lambda: owned_by(1), 60, "the first member owning every partition")
        procs.append(consumer())
        wait_for(lambda: owned_by(2), 60, "a partition handed over to the second member")

        def drained() -> bool:
            if exited():
                return True
            if unfinished(db, A[0]) > 0:
                return False
            reclaimed = db.execute(
                "SELECT count(*) AS n FROM pgcg.segments AS s JOIN pgcg.topics AS t "
                "ON t.id = s.topic_id WHERE t.name = %s AND s.reclaimed_at IS NOT NULL",
                (A[1],),
            ).fetchone()
            if reclaimed["n"] > 0:
                return True
            # A live topic: a segment goes once a tick after its seal shows it complete.
            enqueue_many_sync(db, A[1], [OutgoingMessage("more", {})])
            return False

        wait_for(drained, 60, "the group drained and a segment reclaimed")
        still_running = [proc.poll() for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        results = [_finish(proc) for proc in procs]
    for _code, stderr in results:
        assert "pgcg: error:" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert still_running == [None, None, None]
    history = db.execute(
        "SELECT count(*) AS n FROM pgcg.rebalances WHERE group_name = %s", (A[0],)
    ).fetchone()
    assert history["n"] >= 2  # the first assignment and the hand-over, recorded by the leader


def test_a_coordinator_role_cannot_touch_the_tables(
    db: psycopg.Connection[Any], make_role: Callable[..., str], roles: Callable[..., str]
) -> None:
    _setup(db)
    role = roles("coordinator")
    conn = _login(make_role, role)
    assert [r["name"] for r in conn.execute("SELECT name FROM pgcg.topic_names()")] == [
        A[1], B[1]
    ]  # fmt: skip
    before = _state(db)
    for statement in (
        "SELECT payload FROM pgcg.log",
        f"SELECT payload FROM pgcg.log_{A[1]}",
        "SELECT payload FROM pgcg.dead_letters",
        "UPDATE pgcg.partition_assignments SET member_id = 'attacker', epoch = epoch + 100",
        "DELETE FROM pgcg.consumer_groups",
        f"TRUNCATE pgcg.log_{A[1]}_0",
        "UPDATE pgcg.coordinator_leader SET leader_epoch = leader_epoch + 1",
        "INSERT INTO pgcg.role_scopes (kind, name, role_id) "
        f"VALUES ('topic', '*', '{role}'::regrole)",
    ):
        assert "permission denied for" in _denied(conn, statement), statement
    # Nor what consumers, producers and administrators call, nor the bodies behind them.
    for statement in (
        f"SELECT * FROM pgcg.fetch('{A[0]}', '{{0}}', '{{NULL}}', '{{NULL}}', '{{NULL}}', 1, 1)",
        f"SELECT * FROM pgcg.enqueue('{A[1]}', '{{k}}', '{{\"{{}}\"}}')",
        "SELECT * FROM pgcg.list_dead_letters(NULL, NULL, NULL, NULL, NULL, 10)",
        f"SELECT * FROM pgcg.seek_group('{A[0]}', 'latest')",
        f"SELECT * FROM pgcg.maintain_unchecked('{A[1]}')",
        f"SELECT * FROM pgcg.status_partitions('{A[0]}', '{A[1]}')",
    ):
        assert "permission denied for function" in _denied(conn, statement), statement
    assert _state(db) == before


def test_an_admin_role_does_its_job_through_its_functions(
    db: psycopg.Connection[Any],
    make_role: Callable[..., str],
    roles: Callable[..., str],
    cli: Callable[..., Result],
) -> None:
    """`pgcg status`, `dlq list/replay/purge`, `group` and `topic` as a login member of
    `pgcg roles admin`, with no privilege on any table."""
    _setup(db)
    role = roles("admin")
    assert _table_privileges(db, role) == []
    dsn = make_role(f'GRANT "{role}" TO {{role}}')
    for n, key in enumerate(("a", "b", "c"), start=1):
        dead_letter(db, A[0], A[1], n * 1024, key)

    def ok(*args: str) -> str:
        result = cli(dsn, *args)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return str(result.stdout)

    status = ok("status", "--json")
    assert A[0] in status and B[1] in status
    assert ok("dlq", "list").count(A[0]) == 3
    ok("dlq", "replay", "--group", A[0], "--key", "a")
    assert ok("dlq", "list").count(A[0]) == 2
    ok("dlq", "purge", "--group", A[0], "--key", "b")
    assert ok("dlq", "list").count(A[0]) == 1
    ok("topic", "create", "tc", "--partitions", "2")
    ok("topic", "alter", "tc", "--retention", "1h")
    assert "tc" in ok("topic", "list")
    ok("group", "create", "gc", "--topic", "tc")
    assert "gc" in ok("group", "list")
    ok("group", "seek", "gc", "--to", "latest")
    ok("group", "delete", "gc")
    assert _table_privileges(db, role) == []  # the new topic's tables are the owner's alone


def test_an_admin_role_cannot_write_the_tables(
    db: psycopg.Connection[Any], make_role: Callable[..., str], roles: Callable[..., str]
) -> None:
    _setup(db)
    conn = _login(make_role, roles("admin"))
    give(db, A[0], "m0", [0, 1])
    before = _state(db)
    for statement in (
        "UPDATE pgcg.partition_assignments SET member_id = 'attacker', epoch = epoch + 100",
        "SELECT count(*) FROM pgcg.dead_letters",
        "SELECT payload FROM pgcg.log",
        "DELETE FROM pgcg.group_progress",
        "INSERT INTO pgcg.role_scopes (kind, name, role_id) "
        "VALUES ('group', '*', current_user::text::regrole)",
    ):
        assert "permission denied for table" in _denied(conn, statement), statement
    # Nor what the coordinator, consumers and producers call.
    for statement in (
        f"SELECT * FROM pgcg.assign_partitions('{A[0]}', '{A[1]}', '{{0}}', '{{attacker}}')",
        f"SELECT * FROM pgcg.expire_members('{A[0]}', '{{m0}}', ARRAY[now()])",
        f"SELECT * FROM pgcg.maintain('{A[1]}')",
        "SELECT * FROM pgcg.fetch('ga', '{0}', '{NULL}', '{NULL}', '{NULL}', 1, 1)",
        f"SELECT * FROM pgcg.enqueue('{A[1]}', '{{k}}', '{{\"{{}}\"}}')",
    ):
        assert "permission denied for function" in _denied(conn, statement), statement
    assert _state(db) == before


@pytest.mark.parametrize("kind", ["coordinator", "admin"])
def test_running_the_script_again_after_the_upgrade_takes_table_privileges_away(
    db: psycopg.Connection[Any], dsn: str, make_role: Callable[..., str],
    cli: Callable[..., Result], kind: str,
) -> None:  # fmt: skip
    """Before schema version 5 `pgcg roles coordinator|admin` granted table privileges, and
    granted each new topic's tables ahead: the script of version 5 revokes both."""
    _setup(db)
    owner = db.execute("SELECT nspowner::regrole::text AS o FROM pg_namespace "
                       "WHERE nspname = 'pgcg'").fetchone()["o"]  # fmt: skip
    role_dsn = make_role(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgcg TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgcg TO {role}",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA pgcg "
        "GRANT SELECT, TRUNCATE ON TABLES TO {role}",
    )
    role = str(psycopg.conninfo.conninfo_to_dict(role_dsn)["user"])
    assert _table_privileges(db, role) != []
    result = cli(dsn, "roles", kind, role, "--apply")
    assert result.exit_code == 0, result.output
    assert _table_privileges(db, role) == []
    db.execute("SELECT pgcg.create_topic('later', 2)")
    assert _table_privileges(db, role) == []
