"""The failing TCP proxy (bench/chaos/netproxy.py) between psycopg and a real PostgreSQL."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator

import psycopg
import pytest

from pgcg.bench.chaos.netproxy import NetProxy, ProxyHub
from tests.helpers import wait_for


@pytest.fixture
def proxy(pg_server: str) -> Iterator[NetProxy]:
    params = psycopg.conninfo.conninfo_to_dict(pg_server)
    with ProxyHub() as hub:
        yield hub.proxy(str(params["host"]), int(params["port"]))


def connect(proxy: NetProxy, pg_server: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn_for(pg_server), autocommit=True, connect_timeout=3)


def test_cut_resets_connections_and_refuses_new_ones(proxy: NetProxy, pg_server: str) -> None:
    conn = connect(proxy, pg_server)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.cut(refuse_for=0.5) == 1
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, pg_server)
    # The refusal ends by itself: wait for it on a deadline rather than a fixed sleep.
    again = wait_for(lambda: _try_connect(proxy, pg_server), 10, "connections accepted again")
    with again:
        assert again.execute("SELECT 2").fetchone() == (2,)


def _try_connect(proxy: NetProxy, pg_server: str) -> psycopg.Connection[tuple[object, ...]] | None:
    try:
        return connect(proxy, pg_server)
    except psycopg.OperationalError:
        return None


def test_stall_holds_traffic_with_the_connection_open(proxy: NetProxy, pg_server: str) -> None:
    with connect(proxy, pg_server) as conn:
        proxy.stall(0.8)
        started = time.monotonic()
        assert conn.execute("SELECT 3").fetchone() == (3,)
        assert time.monotonic() - started >= 0.7
        proxy.stall(30)
        proxy.heal()
        assert conn.execute("SELECT 4").fetchone() == (4,)


def test_the_chaos_run_keeps_tls_settings_and_an_encoded_password(pg_server: str) -> None:
    """`pgcg chaos --database-url` hands its processes (direct and behind a proxy) the
    database as libpq parsed it: sslmode and sslrootcert kept, the password decoded once."""
    from pgcg.bench.chaos.run import _Database

    server = psycopg.conninfo.conninfo_to_dict(pg_server)
    url = (
        f"postgresql://postgres:p%40ss%20w%3A%2F@{server['host']}:{server['port']}/postgres"
        "?sslmode=disable&sslrootcert=/nonexistent/ca.pem&application_name=chaos-test"
    )
    with _Database(url) as db, ProxyHub() as hub:
        proxy = hub.proxy(*db.host_port())
        for dsn in (db.dsn, proxy.dsn_for(db.dsn)):
            params = psycopg.conninfo.conninfo_to_dict(dsn)
            assert params["password"] == "p@ss w:/"  # the test server trusts any password
            assert (params["sslmode"], params["sslrootcert"]) == ("disable", "/nonexistent/ca.pem")
            assert params["host"] == server["host"] and params["dbname"] == db.name
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                assert conn.execute("SELECT current_database()").fetchone() == (db.name,)
        assert proxy.connections == 1


def test_blackhole_drops_traffic_without_a_reset(proxy: NetProxy, pg_server: str) -> None:
    """Bytes vanish both ways and nothing tells the client: no answer, no reset, no EOF;
    a new connection gets no answer either. When it ends, the connections that lost bytes
    are reset (their streams are corrupt), and new ones work."""
    conn = connect(proxy, pg_server)
    proxy.blackhole(60)
    conn.pgconn.send_query(b"SELECT 5")
    conn.pgconn.flush()
    # Silence: the socket neither answers nor closes while the black hole lasts.
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0.5)
    assert readable == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn_for(pg_server), connect_timeout=2)
    proxy.heal()
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 10)
    assert readable, "the black-holed connection is reset when the black hole ends"
    with pytest.raises(psycopg.OperationalError):
        conn.pgconn.consume_input()  # a reset, not an answer
    conn.close()
    again = wait_for(lambda: _try_connect(proxy, pg_server), 10, "connections work again")
    with again:
        assert again.execute("SELECT 7").fetchone() == (7,)
