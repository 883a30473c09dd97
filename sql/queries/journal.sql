-- Statements of bench/chaos/journal.py: the history a demo, chaos run or test records, and the
-- checks over it. These tables are not part of the pgcg schema.
--
-- Besides what the producer and the recording handler write, AFTER triggers on pgcg's own
-- tables record what the database decided, with the server's clock_timestamp() (as
-- public.pgcg_real_clock(): a run that steps the server's clock undoes the step there):
--   pgcg_completed  every completion a group's fenced write recorded (a handled log message
--                   in the ledger, or a parked message deleted), and which process's session
--                   wrote it (the pgcg.proc setting, see bench/cluster.py);
--   pgcg_ownership  every change of a partition's owner, epoch or state, per group.
-- They only insert into these side tables, so pgcg behaves as without them. Together they
-- tell exactly which handling's completion was accepted and when each epoch ended, without
-- assuming that the fencing under test works.

-- name: create
CREATE OR REPLACE FUNCTION public.pgcg_real_clock() RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$ SELECT clock_timestamp() $$;
CREATE TABLE IF NOT EXISTS public.pgcg_produced (
    seq         bigint PRIMARY KEY,
    key         text NOT NULL,
    message_id  bigint,
    poison      text,  -- raise | crash: the recording handler never handles it
    produced_at timestamptz NOT NULL DEFAULT public.pgcg_real_clock()
);
CREATE TABLE IF NOT EXISTS public.pgcg_journal (
    id           bigserial PRIMARY KEY,
    group_name   text NOT NULL,
    message_id   bigint NOT NULL,
    key          text NOT NULL,
    seq          bigint NOT NULL,
    partition    integer NOT NULL,
    member_id    text NOT NULL,
    epoch        bigint NOT NULL,
    attempt      integer NOT NULL,
    pid          integer NOT NULL,
    proc         text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    kind         text NOT NULL DEFAULT 'async'  -- async | sync (a def handler's thread)
);
-- Every delivery of a poison message, journaled before the handler fails or exits.
CREATE TABLE IF NOT EXISTS public.pgcg_poison (
    id           bigserial PRIMARY KEY,
    group_name   text NOT NULL,
    message_id   bigint NOT NULL,
    seq          bigint NOT NULL,
    poison       text NOT NULL,
    partition    integer NOT NULL,
    member_id    text NOT NULL,
    epoch        bigint NOT NULL,
    attempt      integer NOT NULL,
    pid          integer NOT NULL,
    kind         text NOT NULL,
    at           timestamptz NOT NULL DEFAULT public.pgcg_real_clock()
);
CREATE INDEX IF NOT EXISTS pgcg_journal_key ON public.pgcg_journal (group_name, key, started_at);
CREATE TABLE IF NOT EXISTS public.pgcg_completed (
    group_name    text NOT NULL,
    message_id    bigint NOT NULL,
    partition     integer NOT NULL,
    epoch         bigint,
    proc          text,
    completed_at  timestamptz NOT NULL DEFAULT public.pgcg_real_clock()
);
CREATE TABLE IF NOT EXISTS public.pgcg_ownership (
    id          bigserial PRIMARY KEY,
    group_name  text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    member_id   text,
    epoch       bigint NOT NULL,
    state       text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT public.pgcg_real_clock()
);
CREATE OR REPLACE FUNCTION public.pgcg_journal_handled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'd' AND NOT NEW.parked THEN
        INSERT INTO public.pgcg_completed (group_name, message_id, partition, epoch, proc)
        SELECT g.group_name, o * 1024 + NEW.partition, NEW.partition, NEW.epoch,
               current_setting('pgcg.proc', true)
        FROM pgcg.groups AS g, unnest(coalesce(NEW.offsets, ARRAY[NEW."offset"])) AS o
        WHERE g.id = NEW.group_id;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER pgcg_journal_handled AFTER INSERT ON pgcg.ledger
    FOR EACH ROW EXECUTE FUNCTION public.pgcg_journal_handled();
CREATE OR REPLACE FUNCTION public.pgcg_journal_unparked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.pgcg_completed (group_name, message_id, partition, epoch, proc)
    SELECT g.group_name, OLD."offset" * 1024 + OLD.partition, OLD.partition,
           OLD.claimed_epoch, current_setting('pgcg.proc', true)
    FROM pgcg.groups AS g WHERE g.id = OLD.group_id;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER pgcg_journal_unparked AFTER DELETE ON pgcg.parked
    FOR EACH ROW EXECUTE FUNCTION public.pgcg_journal_unparked();
CREATE OR REPLACE FUNCTION public.pgcg_journal_ownership() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.member_id IS DISTINCT FROM OLD.member_id
       OR NEW.epoch <> OLD.epoch OR NEW.state <> OLD.state THEN
        INSERT INTO public.pgcg_ownership (group_name, topic, partition, member_id, epoch, state)
        VALUES (NEW.group_name, NEW.topic, NEW.partition, NEW.member_id, NEW.epoch, NEW.state);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER pgcg_journal_ownership AFTER INSERT OR UPDATE
    ON pgcg.partition_assignments
    FOR EACH ROW EXECUTE FUNCTION public.pgcg_journal_ownership();

-- name: unfenced
-- Test builds only (`pgcg chaos --unsafe-no-fencing`): every fenced write of pgcg goes
-- through pgcg.owned; this one says every partition asked about is owned, so a zombie's
-- writes go through, and the checker must catch what the fence prevents.
CREATE OR REPLACE FUNCTION pgcg.owned(p_group text, p_member text, p_partitions integer[],
                                      p_epochs bigint[])
RETURNS TABLE (partition integer, epoch bigint, startable boolean)
LANGUAGE sql AS $$
    SELECT w.p, w.e, true FROM unnest(p_partitions, p_epochs) AS w(p, e)
$$

-- name: count_after_handler
-- Test builds only (`pgcg chaos --unsafe-count-after-handler`): a parked message's delivery
-- is counted when its handler returned with a retry, not when it was claimed. The claim
-- still answers with the delivery's number, as the consumer expects, but does not keep
-- it: a delivery whose handler never returns (it took its process down) is never counted,
-- so a crashing message is claimed again and again and never dead-lettered.
CREATE OR REPLACE FUNCTION pgcg.settle(
    p_group text, p_member text,
    m_parts integer[], m_epochs bigint[], m_ticks bigint[], m_offsets bigint[], m_slots integer[],
    c_ids bigint[], c_parts integer[], c_epochs bigint[], c_tokens text[], c_visibility_ms bigint,
    l_kinds "char"[], l_parts integer[], l_epochs bigint[], l_ticks bigint[], l_offsets bigint[],
    l_slots integer[], l_attempts integer[], l_delays_ms bigint[], l_errors text[],
    l_origins text[], l_claimed boolean[],
    k_kinds "char"[], k_ids bigint[], k_parts integer[], k_epochs bigint[], k_delays_ms bigint[],
    k_errors text[]
) RETURNS TABLE (what "char", partition integer, ref bigint, ok boolean, info bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
#variable_conflict use_column
DECLARE
    resent bigint[];  -- claims sent again with their token: they count nothing anyway
    retried bigint[];
    r record;
BEGIN
    PERFORM pgcg.require_group(p_group);
    SELECT coalesce(array_agg(pk.id), '{}') INTO resent
    FROM pgcg.parked AS pk JOIN unnest(c_ids, c_tokens) AS c(id, tok)
      ON pk.id = c.id AND pk.claim_token = c.tok;
    SELECT coalesce(array_agg(k.id), '{}') INTO retried
    FROM unnest(k_kinds, k_ids) AS k(kind, id) WHERE k.kind = 'r';
    FOR r IN SELECT * FROM pgcg.settle_unchecked(
        p_group, p_member, m_parts, m_epochs, m_ticks, m_offsets, m_slots,
        c_ids, c_parts, c_epochs, c_tokens, c_visibility_ms,
        l_kinds, l_parts, l_epochs, l_ticks, l_offsets, l_slots, l_attempts, l_delays_ms,
        l_errors, l_origins, l_claimed,
        k_kinds, k_ids, k_parts, k_epochs, k_delays_ms, k_errors) AS s
    LOOP
        IF r.what = 'c' AND r.ok AND NOT r.ref = ANY (resent) THEN
            UPDATE pgcg.parked AS pk SET attempts = pk.attempts - 1 WHERE pk.id = r.ref;
        ELSIF r.what = 'k' AND r.ok AND r.info IS NOT NULL AND r.ref = ANY (retried) THEN
            UPDATE pgcg.parked AS pk SET attempts = pk.attempts + 1 WHERE pk.id = r.ref;
        END IF;
        what := r.what; partition := r.partition; ref := r.ref; ok := r.ok; info := r.info;
        RETURN NEXT;
    END LOOP;
END $$

-- name: real_clock
-- Runs that step the server's wall clock (libfaketime, the offset in seconds read from a
-- file on every call, bench/throwaway.py): the history keeps the host's time, so the
-- checker never judges with a stepped clock. The file is read before and after the clock;
-- a step between the two reads is read again.
CREATE OR REPLACE FUNCTION public.pgcg_real_clock() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    before text;
    after text;
    stepped timestamptz;
BEGIN
    LOOP
        before := pg_read_file({path});
        stepped := clock_timestamp();
        after := pg_read_file({path});
        EXIT WHEN before = after;
    END LOOP;
    RETURN stepped - btrim(before)::float8 * interval '1 second';
END $$

-- name: record
INSERT INTO public.pgcg_journal
    (group_name, message_id, key, seq, partition, member_id, epoch, attempt, pid, proc,
     started_at, finished_at, kind)
VALUES (%(group)s, %(message_id)s, %(key)s, %(seq)s, %(partition)s, %(member_id)s,
        %(epoch)s, %(attempt)s, %(pid)s, current_setting('pgcg.proc', true), %(started_at)s,
        %(finished_at)s, %(kind)s)

-- name: record_poison
INSERT INTO public.pgcg_poison
    (group_name, message_id, seq, poison, partition, member_id, epoch, attempt, pid, kind)
VALUES (%(group)s, %(message_id)s, %(seq)s, %(poison)s, %(partition)s, %(member_id)s,
        %(epoch)s, %(attempt)s, %(pid)s, %(kind)s)

-- name: poison_rows
-- Per poison message and group: its deliveries, and its dead letter if it has one.
SELECT p.seq, p.message_id, p.key, p.poison, g.group_name,
       (SELECT count(*) FROM public.pgcg_poison AS x
        WHERE x.group_name = g.group_name AND x.message_id = p.message_id) AS deliveries,
       d.reason, d.attempts, d.dead_at
FROM public.pgcg_produced AS p CROSS JOIN (SELECT %(group)s::text AS group_name) AS g
LEFT JOIN pgcg.dead_letters AS d
  ON d.group_name = g.group_name AND d.message_id = p.message_id
WHERE p.poison IS NOT NULL
ORDER BY p.seq

-- name: produced
INSERT INTO public.pgcg_produced (seq, key, message_id, poison)
SELECT * FROM unnest(%(seqs)s::bigint[], %(keys)s::text[], %(ids)s::bigint[],
                     %(poison)s::text[])

-- name: produced_rows
SELECT seq, key, message_id, poison, produced_at FROM public.pgcg_produced

-- name: groups
SELECT group_name FROM pgcg.groups WHERE topic = %(topic)s ORDER BY group_name

-- name: journal_rows
SELECT id, message_id, key, seq, partition, member_id, epoch, attempt, pid, proc,
       started_at, finished_at, kind
FROM public.pgcg_journal WHERE group_name = %(group)s ORDER BY id

-- name: completed_rows
SELECT message_id, partition, epoch, proc, completed_at
FROM public.pgcg_completed WHERE group_name = %(group)s ORDER BY completed_at

-- name: ownership_rows
SELECT partition, member_id, epoch, state, changed_at FROM public.pgcg_ownership
WHERE group_name = %(group)s ORDER BY id

-- name: pending_ids
-- What the group has not finished: log messages after its position with no completion,
-- and its parked messages.
SELECT l."offset" * 1024 + l.partition AS id
FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
JOIN pgcg.log AS l ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
JOIN pgcg.group_progress AS gp ON gp.group_id = g.id AND gp.partition = l.partition
JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
WHERE g.group_name = %(group)s
  AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)
  AND (l.only_group IS NULL OR l.only_group = g.id)
  AND NOT EXISTS (
      SELECT FROM pgcg.ledger AS d
      WHERE d.group_id = g.id AND d.partition = l.partition AND d.kind = 'd'
        AND d.gen = g.seek_gen AND l."offset" = ANY (coalesce(d.offsets, ARRAY[d."offset"])))
UNION
SELECT pk."offset" * 1024 + pk.partition FROM pgcg.parked AS pk
JOIN pgcg.groups AS g ON g.id = pk.group_id WHERE g.group_name = %(group)s

-- name: pending_by_partition
SELECT u.group_name, u.partition, count(*) AS pending, count(*) FILTER (WHERE u.parked) AS parked,
       pa.member_id, pa.epoch, pa.state
FROM (
    SELECT g.group_name, l.partition, false AS parked
    FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
    JOIN pgcg.log AS l ON l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
    JOIN pgcg.group_progress AS gp ON gp.group_id = g.id AND gp.partition = l.partition
    JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
    WHERE g.topic = %(topic)s
      AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)
      AND (l.only_group IS NULL OR l.only_group = g.id)
      AND NOT EXISTS (
          SELECT FROM pgcg.ledger AS d
          WHERE d.group_id = g.id AND d.partition = l.partition AND d.kind = 'd'
            AND d.gen = g.seek_gen AND l."offset" = ANY (coalesce(d.offsets, ARRAY[d."offset"])))
    UNION ALL
    SELECT g.group_name, pk.partition, true FROM pgcg.parked AS pk
    JOIN pgcg.groups AS g ON g.id = pk.group_id WHERE g.topic = %(topic)s
) AS u
JOIN pgcg.partition_assignments AS pa
  ON pa.group_name = u.group_name AND pa.partition = u.partition
GROUP BY 1, 2, 5, 6, 7 ORDER BY 1, 2

-- name: dead_ids
SELECT message_id FROM pgcg.dead_letters WHERE group_name = %(group)s

-- name: forced_handoffs
-- Hand-offs the leader forced (drain deadline passed, or the owner died): redeliveries
-- after these are expected.
SELECT r.started_at, (m ->> 'partition')::int AS partition
FROM pgcg.rebalances AS r, jsonb_array_elements(r.moves) AS m
WHERE m ->> 'kind' = 'forced' AND r.group_name = %(group)s

-- name: rebalances
-- The leaders' recorded rebalances of the groups consuming a topic, in generation order.
SELECT r.group_name, r.generation, r.leader_epoch, r.started_at
FROM pgcg.rebalances AS r JOIN pgcg.groups AS s USING (group_name)
WHERE s.topic = %(topic)s
ORDER BY r.group_name, r.generation

-- name: queue_depth
-- Per group of the topic: what it has not finished yet, and its dead letters.
SELECT g.group_name,
       (SELECT coalesce(sum(x.lag), 0) FROM pgcg.group_lag(g.group_name) AS x)::bigint AS pending,
       (SELECT count(*) FROM pgcg.dead_letters AS d WHERE d.group_name = g.group_name) AS dead
FROM pgcg.groups AS g WHERE g.topic = %(topic)s ORDER BY g.group_name

-- name: max_seq
SELECT coalesce(max(seq), -1) AS seq FROM public.pgcg_produced

-- name: min_seq
SELECT coalesce(min(seq), 0) AS seq FROM public.pgcg_produced

-- name: dump_ledger
-- What the groups recorded, for a failed run's kept history (ledger.csv).
SELECT g.group_name, l.partition, l.kind, l.gen, l.epoch, l.tick, l.offsets, l."offset",
       l.parked, l.slot
FROM pgcg.ledger AS l JOIN pgcg.groups AS g ON g.id = l.group_id

-- name: dump_ticks
-- The ticks of the run's topics, for a failed run's kept history (ticks.csv).
SELECT topic_id, tick, snapshot::text AS snapshot, offsets, at FROM pgcg.ticks

-- name: dump_progress
-- Each group's position, for a failed run's kept history (group_progress.csv).
SELECT g.group_name, p.partition, p.tick, p.gen, p.clean_epoch, p.charged_epoch, p.updated_at
FROM pgcg.group_progress AS p JOIN pgcg.groups AS g ON g.id = p.group_id
-- name: dump_activity
-- Every session of the run's server as a drain that did not finish left it, taken while
-- the processes still run (activity.csv): which statement each waits in, on what, and
-- behind whom. A consumer that holds partitions and does nothing shows here as a statement
-- waiting on a lock (and its blocker), as a statement active with no wait (a server
-- process stuck), or as every session idle (it waits on itself).
SELECT a.pid, a.application_name, a.backend_type, a.state, a.wait_event_type, a.wait_event,
       pg_blocking_pids(a.pid) AS blocked_by, a.backend_start, a.xact_start, a.query_start,
       a.state_change, clock_timestamp() AS taken_at, a.query
FROM pg_stat_activity AS a
WHERE a.pid <> pg_backend_pid() AND (a.datname = current_database() OR a.datname IS NULL)
-- name: dump_parked_heads
-- The first parked message of every key, as a drain that did not finish left it
-- (parked_heads.csv): whether it is flagged, due, claimed, and by whom.
SELECT g.group_name, p.partition, p.key, p.id, p.head, p.attempts, p.origin,
       p.claimed_epoch, p.claimed_by, p.locked_until, p.available_at, p.parked_at,
       (SELECT count(*) FROM pgcg.parked AS q
        WHERE q.group_id = p.group_id AND q.partition = p.partition
          AND hashtextextended(q.key, 0) = hashtextextended(p.key, 0) AND q.key = p.key) AS depth
FROM pgcg.parked AS p JOIN pgcg.groups AS g ON g.id = p.group_id
-- By key through parked_key's hash, as pgcg's own queries go: by partition alone, a
-- deep parked queue is read once per row.
WHERE p.id = (SELECT min(q.id) FROM pgcg.parked AS q
              WHERE q.group_id = p.group_id AND q.partition = p.partition
                AND hashtextextended(q.key, 0) = hashtextextended(p.key, 0) AND q.key = p.key)
-- name: expire_on_database_clock
-- Test builds only (`pgcg chaos --unsafe-expire-on-database-clock`): members are expired as
-- a coordinator trusting the database's clock would, in every rebalance (the leader's sweep
-- runs one each heartbeat interval): whoever's last heartbeat is older than its session
-- timeout by the server's clock is gone. A forward step of that clock then expires members
-- whose leases are still valid, and their partitions go to others while they still work.
CREATE OR REPLACE FUNCTION pgcg.live_members(p_group text)
RETURNS TABLE (member_id text, host text, pid integer)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    DELETE FROM pgcg.consumer_groups AS cg
    WHERE cg.group_name = p_group
      AND cg.last_heartbeat < clock_timestamp() - cg.session_timeout_ms * interval '1 millisecond';
    SELECT cg.member_id, cg.host, cg.pid FROM pgcg.consumer_groups AS cg
    WHERE cg.group_name = p_group ORDER BY cg.joined_at, cg.member_id
$$

-- name: hold_fetches
-- For the fault revoke-cancel-fetch (`pgcg chaos`): pgcg.fetch as migrated, but a fetch of
-- a group listed in public.pgcg_chaos_fetch_hold waits twice for advisory locks the chaos
-- tool holds meanwhile (bench/chaos/nemesis.py): before it reads (FETCH_GATE_LOCK), so the
-- log fills up behind it and its read brings messages of most keys, and, if it read rows,
-- with those rows in hand (FETCH_HOLD_LOCK). While it waits there, the fault issues a
-- revocation and calls it off: the rows reach their reader as read before the revocation.
CREATE TABLE public.pgcg_chaos_fetch_hold (group_name text PRIMARY KEY);
CREATE OR REPLACE FUNCTION pgcg.fetch(
    p_group        text,
    p_partitions   integer[],
    p_done         bigint[],
    p_cur          bigint[],
    p_cur_offsets  bigint[],
    p_limit        integer,
    p_limit_bytes  bigint
) RETURNS TABLE (partition integer, state "char", a_tick bigint, tick bigint, "offset" bigint,
                 slot integer, key text, payload jsonb, headers jsonb, dedup_key text,
                 enqueued_at timestamptz, due_in_ms bigint, bytes integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM pgcg.require_group(p_group);
    IF EXISTS (SELECT FROM public.pgcg_chaos_fetch_hold AS h WHERE h.group_name = p_group) THEN
        PERFORM pg_advisory_xact_lock_shared(1885825895, 2);
    END IF;
    RETURN QUERY SELECT * FROM pgcg.fetch_unchecked(p_group, p_partitions, p_done, p_cur,
                                                    p_cur_offsets, p_limit, p_limit_bytes);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND EXISTS (SELECT FROM public.pgcg_chaos_fetch_hold AS h
                         WHERE h.group_name = p_group) THEN
        PERFORM pg_advisory_xact_lock_shared(1885825895, 1);
    END IF;
END $$

-- name: rebalance_gate
-- A chaos run with `assignment-lock` faults (variants `rebalance`, `rebalance-stall`): pgcg.assignments_for_update, which a rebalance
-- calls right after it read the group's members, first waits on the group's row of
-- public.pgcg_chaos_gate while a fault holds it, but only if a member joined the group
-- after the fault set the gate (so only a rebalance that read the join, and revokes
-- partitions for it, waits; the periodic sweeps before the join pass). It is a row lock
-- like the rebalance's own on the assignment rows, so the rebalance's lock_timeout bounds
-- it. The fault deletes the row as it lets go: the waiter then finds no row and goes on.
CREATE TABLE IF NOT EXISTS public.pgcg_chaos_gate (
    group_name text PRIMARY KEY,
    since      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION pgcg.assignments_for_update(p_group text, p_topic text)
RETURNS TABLE (partition integer, member_id text, epoch bigint, state text,
               target_member_id text, overdue boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM 1 FROM public.pgcg_chaos_gate AS g
    WHERE g.group_name = p_group
      AND EXISTS (SELECT 1 FROM pgcg.consumer_groups AS cg
                  WHERE cg.group_name = p_group AND cg.joined_at >= g.since)
    FOR SHARE OF g;
    RETURN QUERY
    SELECT locked.partition, locked.member_id, locked.epoch, locked.state,
           locked.target_member_id,
           locked.revoke_deadline IS NOT NULL AND locked.revoke_deadline <= clock_timestamp()
    FROM (
        SELECT pa.partition, pa.member_id, pa.epoch, pa.state, pa.target_member_id,
               pa.revoke_deadline
        FROM pgcg.partition_assignments AS pa
        WHERE pa.group_name = p_group AND pa.topic = p_topic
        ORDER BY pa.partition
        FOR UPDATE
    ) AS locked
    ORDER BY locked.partition;
END
$$

-- name: deadline_from_transaction_start
-- Test builds only (`pgcg chaos --unsafe-deadline-from-transaction-start`): a revocation's
-- deadline is counted from the start of the rebalance's transaction (now()), not from when
-- it holds the rows, and the rebalance waits for the rows (and an `assignment-lock`
-- fault's gate) without bound, as pgcg did before it bounded its lock waits. Owners' heartbeats
-- read the assignments without a lock, so during a long wait they still see `assigned`
-- and renew their leases; the revocation then lands with its deadline already spent.
CREATE OR REPLACE FUNCTION pgcg.revoke_partitions(p_group text, p_topic text,
                                                  p_partitions integer[], p_targets text[],
                                                  p_drain_deadline_s float8)
RETURNS TABLE (partition integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.partition_assignments AS pa
    SET state = 'revoking', target_member_id = a.target,
        revoke_deadline = coalesce(
            pa.revoke_deadline,
            now() + greatest(
                p_drain_deadline_s * interval '1 second',
                (SELECT cg.session_timeout_ms * interval '1 millisecond'
                 FROM pgcg.consumer_groups AS cg
                 WHERE cg.group_name = pa.group_name AND cg.member_id = pa.member_id)))
    FROM unnest(p_partitions, p_targets) AS a(partition, target)
    WHERE pa.group_name = p_group AND pa.topic = p_topic AND pa.partition = a.partition
    RETURNING pa.partition
$$;
ALTER FUNCTION pgcg.assignments_for_update(text, text) SET lock_timeout = 0
