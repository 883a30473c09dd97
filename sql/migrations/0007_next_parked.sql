-- pgcg schema, version 7: when the next parked message of a member's partitions can be
-- loaded, so an idle consumer that hears of new messages by NOTIFY can sleep until then
-- (or a slow safety poll) instead of polling the parked queue (consumer/reader.py).
--
-- Nothing notifies when a parked message becomes due: a retry's backoff, a producer's
-- delay parked with its key, a claim abandoned past its deadline. The reader asks this
-- before a long wait and wakes in time to load it (load_parked loads what is due within
-- its lookahead).

-- Per partition, in the order of parked_heads (available_at of the flagged heads), the
-- first head load_parked would load once due: unclaimed or its claim abandoned, and the
-- first of its key (a flag can be left on a row that is no longer its key's first, see
-- 0006; such a row is never loaded, so counting it would wake the reader for nothing, over
-- and over). The heads that scan passes over before it are the claimed ones (running
-- deliveries, a few per member) and stale flags; a claimed head becomes loadable when its
-- claim runs out, so the second probe reads those same rows again and takes the earliest
-- end of a claim. NULL: nothing parked there. Read only; never fenced, as load_parked.
CREATE FUNCTION pgcg.next_parked(p_group text, p_partitions integer[])
RETURNS TABLE (due_in_ms bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg SET jit = off AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY
    WITH g AS (SELECT gr.id FROM pgcg.groups AS gr WHERE gr.group_name = p_group),
    firsts AS (
        SELECT p.p, (
            SELECT pk.available_at FROM pgcg.parked AS pk
            WHERE pk.head AND pk.group_id = g.id AND pk.partition = p.p
              AND (pk.claimed_epoch IS NULL OR pk.locked_until < clock_timestamp())
              AND pk.id = (
                  SELECT q.id FROM pgcg.parked AS q
                  WHERE q.group_id = pk.group_id AND q.partition = pk.partition
                    AND hashtextextended(q.key, 0) = hashtextextended(pk.key, 0)
                    AND q.key = pk.key
                  ORDER BY q.id LIMIT 1)
            ORDER BY pk.available_at LIMIT 1) AS at
        FROM g, unnest(p_partitions) AS p(p)
    ), due AS (
        SELECT f.at FROM firsts AS f
        UNION ALL
        SELECT (
            SELECT min(greatest(pk.available_at, pk.locked_until)) FROM pgcg.parked AS pk
            WHERE pk.head AND pk.group_id = g.id AND pk.partition = f.p
              AND pk.available_at <= coalesce(f.at, 'infinity')
              AND pk.claimed_epoch IS NOT NULL AND pk.locked_until >= clock_timestamp())
        FROM g, firsts AS f
    )
    -- (greatest() skips NULLs: nothing parked must stay NULL, not become "due now".)
    SELECT CASE WHEN min(d.at) IS NOT NULL THEN
               greatest(0, (extract(epoch FROM min(d.at) - clock_timestamp()) * 1000)::bigint)
           END
    FROM due AS d;
END $$;

REVOKE EXECUTE ON FUNCTION pgcg.next_parked(text, integer[]) FROM PUBLIC;

-- Roles that `pgcg roles consumer` made before this version may call load_parked but not
-- this: each gets it too, so a consumer keeps working through the upgrade without running
-- `pgcg roles` again (its script grants it from now on, shared/grants.py).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::regrole AS grantee
        FROM pg_catalog.pg_proc AS p, pg_catalog.aclexplode(p.proacl) AS a
        WHERE p.oid = 'pgcg.load_parked(text, integer[], bigint[], bigint, integer, integer,
                                        text[], bigint[], integer[])'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgcg.next_parked(text, integer[]) TO %s',
                       r.grantee);
    END LOOP;
END $$;
