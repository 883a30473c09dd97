-- pgcg schema, version 9: the fetch's per-tick helper pgcg.first_late in PL/pgSQL, for
-- PostgreSQL before 18.
--
-- The fetch calls first_late once per tick it reads. As a SQL function whose body reads
-- FROM another function it cannot be inlined, and before PostgreSQL 18 (which caches the
-- plans of SQL functions) every call set up its body's plan anew: on PostgreSQL 15 it took
-- about half of the fetch's server time (0.13 ms a call, against 0.009 ms on 18), and the
-- ordered drain cost the server twice the CPU per message it costs on 18. A PL/pgSQL
-- function keeps its plans for the session. Same answers: the body is version 3's, with
-- the unseen xids taken into a variable instead of a FROM item (compared on thousands of
-- random snapshots on both servers).

CREATE OR REPLACE FUNCTION pgcg.first_late(a pg_snapshot, a_xid xid8, b pg_snapshot)
RETURNS xid8 LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    unseen xid8[] := pgcg.tick_unseen(a, a_xid);
BEGIN
    IF unseen IS NULL THEN
        RETURN (SELECT min(x) FROM (
                    SELECT x FROM pg_snapshot_xip(a) AS x WHERE pg_visible_in_snapshot(x, b)
                    UNION ALL
                    SELECT pg_snapshot_xmax(a)
                    WHERE pg_snapshot_xmax(b) > pg_snapshot_xmax(a)) AS c);
    END IF;
    RETURN (SELECT min(x) FROM unnest(unseen) AS x WHERE pg_visible_in_snapshot(x, b));
END
$$;
