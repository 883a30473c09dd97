-- pgcg schema, version 6: the parked queue keeps its keys' heads apart, so loading parked
-- messages reads the due heads through a small index instead of every due parked message.
--
-- load_parked looks for "the due first message of each parked key". Through parked_due it
-- read every due parked row of the partitions and probed parked_key for each: one deep key
-- parked whole (a million messages, all due, its head running) made every load read a
-- million rows. Now a flag marks each key's first row and a partial index holds only the
-- flagged rows.
--
-- The invariant: the lowest-id row of every (group, partition, key) has head = true. More
-- flags than that are harmless, because load_parked keeps its first-of-key probe and so
-- filters them out; only a missing flag would strand a key (never loaded). So whenever a
-- trigger cannot be sure, it flags.
--
-- Triggers keep it, in one place whatever function writes (adopt, settle, tx_complete,
-- seek_group, replay_dead_letters, delete_group's cascade):
-- - before an insert: a new row is its key's head unless an earlier row of the key exists
--   and the inserter can hold a FOR KEY SHARE lock on it until commit. The lock makes a
--   delete of that row wait for the insert's commit, so the deleter's trigger then sees the
--   new row. SKIP LOCKED: a row being deleted by an open transaction (a transactional
--   handler's own, which completes its parked message by deleting it) is not waited for,
--   the new row is flagged instead; the writer never waits on a handler's transaction here.
--   A new row behind a claimed one is flagged too (see parked_flag_head).
--   The claims, progress reports and retries only UPDATE non-key columns (FOR NO KEY UPDATE),
--   which does not conflict with FOR KEY SHARE.
-- - after a delete: for each key a statement deleted rows of, unless an earlier row of the
--   key remains, the key's first remaining row is flagged (see parked_pass_head).

ALTER TABLE pgcg.parked ADD COLUMN head boolean NOT NULL DEFAULT false;

-- The migration holds parked's ACCESS EXCLUSIVE lock from here to its commit: no row comes
-- or goes between this backfill and the triggers.
UPDATE pgcg.parked AS pk SET head = true
WHERE pk.id IN (SELECT min(q.id) FROM pgcg.parked AS q GROUP BY q.group_id, q.partition, q.key);

CREATE INDEX parked_heads ON pgcg.parked (group_id, partition, available_at) WHERE head;

CREATE FUNCTION pgcg.parked_flag_head() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    tail_id bigint;
    claimed bigint;
BEGIN
    -- Rows this statement inserted before this one are visible here (a BEFORE ROW trigger
    -- sees its command's earlier rows), so a batch of one key gets one head.
    SELECT q.id INTO tail_id FROM pgcg.parked AS q
    WHERE q.group_id = NEW.group_id AND q.partition = NEW.partition
      AND hashtextextended(q.key, 0) = hashtextextended(NEW.key, 0) AND q.key = NEW.key
      AND q.id < NEW.id
    ORDER BY q.id DESC LIMIT 1;
    IF FOUND THEN
        -- Locked by id alone: if the tail is being deleted, the new row is flagged rather
        -- than looking further down the key (that could walk a whole deep key).
        SELECT q.claimed_epoch INTO claimed FROM pgcg.parked AS q WHERE q.id = tail_id
        FOR KEY SHARE SKIP LOCKED;
    END IF;
    -- A claimed tail is flagged behind too: a claimed row is deleted by its result, maybe
    -- in a transactional handler's own transaction at REPEATABLE READ, whose delete
    -- trigger reads an older snapshot than this commit and would not see the new row.
    NEW.head := NOT FOUND OR claimed IS NOT NULL;
    RETURN NEW;
END $$;

-- `gone`: the statement's deleted rows. Per key: when no earlier row remains, the first
-- remaining one is locked (FOR KEY SHARE, waiting) and flagged. Waiting, not skipping: a
-- row locked by a delete in an open transaction comes back if that transaction rolls back,
-- and then it must be flagged. No deadlock: the other deleter, whose row is later in the
-- key, sees this statement's rows as still there (not committed) and so waits for nothing
-- here; and the delete waited for is a handler's completion right before its COMMIT.
-- In READ COMMITTED each statement here takes a fresh snapshot, so a row an inserter
-- committed while this delete waited for its FOR KEY SHARE lock is seen.
CREATE FUNCTION pgcg.parked_pass_head() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    k record;
    first record;
BEGIN
    FOR k IN SELECT o.group_id, o.partition, o.key, min(o.id) AS id
             FROM gone AS o GROUP BY o.group_id, o.partition, o.key LOOP
        -- Every deleted row's key, flagged or not: a flag is cheap to check, and a missed
        -- one strands the key.
        CONTINUE WHEN EXISTS (
            SELECT FROM pgcg.parked AS q
            WHERE q.group_id = k.group_id AND q.partition = k.partition
              AND hashtextextended(q.key, 0) = hashtextextended(k.key, 0) AND q.key = k.key
              AND q.id < k.id);
        SELECT q.id, q.head INTO first FROM pgcg.parked AS q
        WHERE q.group_id = k.group_id AND q.partition = k.partition
          AND hashtextextended(q.key, 0) = hashtextextended(k.key, 0) AND q.key = k.key
        ORDER BY q.id LIMIT 1
        FOR KEY SHARE;
        IF FOUND THEN
            IF NOT first.head THEN
                UPDATE pgcg.parked AS q SET head = true WHERE q.id = first.id;
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

REVOKE EXECUTE ON FUNCTION pgcg.parked_flag_head(), pgcg.parked_pass_head() FROM PUBLIC;

CREATE TRIGGER parked_flag_head BEFORE INSERT ON pgcg.parked
    FOR EACH ROW EXECUTE FUNCTION pgcg.parked_flag_head();
-- Per statement, with the deleted rows as a table: a seek deletes a partition's whole
-- parked queue in one statement, and each key is looked at once.
CREATE TRIGGER parked_pass_head AFTER DELETE ON pgcg.parked
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION pgcg.parked_pass_head();

-- load_parked (0004 wraps it as load_parked_unchecked): the same question, through the
-- flagged heads. Same signature, so the wrapper and the grants stay as they are.
CREATE OR REPLACE FUNCTION pgcg.load_parked_unchecked(
    p_group text, p_partitions integer[], p_held bigint[],
    p_lookahead_ms bigint, p_limit integer, p_followers integer, p_refill_keys text[],
    p_refill_after bigint[], p_refill_parts integer[])
RETURNS TABLE (id bigint, partition integer, tick bigint, "offset" bigint, key text,
               payload jsonb, headers jsonb, dedup_key text, enqueued_at timestamptz,
               attempts integer, due_in_ms bigint, origin text, bytes integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgcg SET jit = off AS $$
    WITH g AS (SELECT gr.id FROM pgcg.groups AS gr WHERE gr.group_name = p_group),
    heads AS (
        SELECT pk.* FROM pgcg.parked AS pk, g
        -- Flagged heads only (parked_heads): a deep key's followers are never read here.
        WHERE pk.head AND pk.group_id = g.id AND pk.partition = ANY (p_partitions)
          -- Computed once (an InitPlan), so it bounds the scan of parked_heads.
          AND pk.available_at <= (SELECT clock_timestamp() + p_lookahead_ms * interval '1 millisecond')
          AND pk.id <> ALL (p_held)
          -- Unclaimed, or claimed by a delivery past its deadline: its handler was
          -- cancelled by then, unless it reported progress (which moves the deadline). A
          -- member that lost a partition by its lease and got it back under the same epoch
          -- abandoned its claims there, and no adopt would ever release them.
          AND (pk.claimed_epoch IS NULL OR pk.locked_until < clock_timestamp())
          -- The first of its key: a flag can be left on a row that is no longer its key's
          -- first (see the triggers above), so the flag narrows and this probe of
          -- parked_key in id order decides (as a NOT EXISTS, the planner may hash the
          -- whole queue, or read a partition's rows for each message).
          AND pk.id = (
              SELECT q.id FROM pgcg.parked AS q
              WHERE q.group_id = pk.group_id AND q.partition = pk.partition
                AND hashtextextended(q.key, 0) = hashtextextended(pk.key, 0)
                AND q.key = pk.key
              ORDER BY q.id LIMIT 1)
        ORDER BY pk.available_at LIMIT p_limit
    ), picked AS (
        SELECT h.* FROM heads AS h
        UNION
        SELECT f.* FROM heads AS h CROSS JOIN LATERAL (
            SELECT q.* FROM pgcg.parked AS q
            WHERE q.group_id = h.group_id AND q.partition = h.partition
              AND hashtextextended(q.key, 0) = hashtextextended(h.key, 0) AND q.key = h.key
              AND q.id > h.id AND q.id <> ALL (p_held)
            ORDER BY q.id LIMIT p_followers) AS f
        UNION
        SELECT f.* FROM g, unnest(p_refill_keys, p_refill_after, p_refill_parts) AS rk(k, after, p)
        CROSS JOIN LATERAL (
            SELECT q.* FROM pgcg.parked AS q
            WHERE q.group_id = g.id AND q.partition = rk.p
              AND hashtextextended(q.key, 0) = hashtextextended(rk.k, 0) AND q.key = rk.k
              AND q.id > rk.after AND q.id <> ALL (p_held)
            ORDER BY q.id LIMIT p_followers) AS f
    )
    SELECT p.id, p.partition, p.tick, p."offset", p.key, p.payload, p.headers, p.dedup_key,
           p.enqueued_at, p.attempts,
           greatest(0, (extract(epoch FROM p.available_at - clock_timestamp()) * 1000)::bigint),
           p.origin, coalesce(pg_column_size(p.payload), 0) + coalesce(pg_column_size(p.headers), 0)
    FROM picked AS p ORDER BY p.partition, p.key, p.id
$$;
