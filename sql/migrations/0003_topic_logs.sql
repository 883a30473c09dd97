-- pgcg schema, version 3: topics become retained logs that any number of groups read.
--
-- docs/design/storage.md is the design; this file is its schema. In short:
-- - a topic's messages are written once into a ring of segment tables and never updated
--   or deleted one by one; a segment is truncated once sealed, when no group has anything
--   unfinished in it and the topic's retention allows;
-- - readers follow commit order through ticks (transaction snapshots over time), and
--   offset order inside a batch;
-- - each group records what it finished in an insert-only ledger (a row per round), and
--   keeps per-message state (retries, long delays, crashed deliveries, a key deep enough
--   to pin its partition) in its parked queue;
-- - every write that acts on a partition is fenced by the partition's epoch.
--
-- Existing pending messages move into the new logs; each existing subscription becomes a
-- group positioned at its oldest pending message. Running members are expelled, and the
-- `protocol` column they do not know makes their rejoin fail: mixed versions are refused.

-- Members of the previous version must not act on anything any more.
DELETE FROM pgcg.consumer_groups;
UPDATE pgcg.partition_assignments
SET member_id = NULL, state = 'unassigned', epoch = epoch + 1, target_member_id = NULL,
    revoke_deadline = NULL;
ALTER TABLE pgcg.consumer_groups ADD COLUMN protocol integer NOT NULL CHECK (protocol = 3);

-- Topics --------------------------------------------------------------------------------

CREATE SEQUENCE pgcg.topic_id_seq AS integer MAXVALUE 30000000;
ALTER TABLE pgcg.topics
    -- Part of every slot number: topic id * 64 + ring slot, in an int4.
    ADD COLUMN id integer NOT NULL DEFAULT nextval('pgcg.topic_id_seq'),
    -- The ring: segment `seq` lives in slot (seq % segments).
    ADD COLUMN segments integer NOT NULL DEFAULT 8 CHECK (segments BETWEEN 3 AND 64),
    -- Finished messages stay at least this long (replay, groups created later).
    ADD COLUMN retention_ms bigint NOT NULL DEFAULT 86400000 CHECK (retention_ms >= 0),
    -- Past this size, the oldest segments no group needs go sooner.
    ADD COLUMN retention_bytes bigint CHECK (retention_bytes > 0),
    -- Past these, the oldest segment goes even if a group has not finished it.
    ADD COLUMN hard_retention_ms bigint CHECK (hard_retention_ms > 0),
    ADD COLUMN hard_retention_bytes bigint CHECK (hard_retention_bytes > 0),
    -- A segment is rotated out once older than retention / (segments - 2), or bigger than
    -- this, provided the next slot is free.
    ADD COLUMN segment_bytes bigint NOT NULL DEFAULT 1073741824 CHECK (segment_bytes > 0),
    ADD COLUMN tick_interval_ms integer NOT NULL DEFAULT 50
        CHECK (tick_interval_ms BETWEEN 1 AND 60000),
    ADD COLUMN dedup_window_ms bigint NOT NULL DEFAULT 300000 CHECK (dedup_window_ms >= 0),
    ADD COLUMN max_payload_bytes integer NOT NULL DEFAULT 1048576
        CHECK (max_payload_bytes BETWEEN 1 AND 104857600),
    -- One sequence per partition (a message's offset) and the current segment's sequence.
    ADD COLUMN offset_seqs regclass[],
    ADD COLUMN segment_seq regclass;
ALTER TABLE pgcg.topics ADD CONSTRAINT topics_id_key UNIQUE (id);
ALTER SEQUENCE pgcg.topic_id_seq OWNED BY pgcg.topics.id;

-- Limits every enqueue path checks, in UTF-8 bytes (not characters), so a key or dedup key
-- always fits the index entries that carry it.
CREATE FUNCTION pgcg.max_key_bytes() RETURNS integer LANGUAGE sql IMMUTABLE RETURN 1024;
CREATE FUNCTION pgcg.max_dedup_key_bytes() RETURNS integer LANGUAGE sql IMMUTABLE RETURN 512;
CREATE FUNCTION pgcg.max_headers_bytes() RETURNS integer LANGUAGE sql IMMUTABLE RETURN 65536;
-- The longest delay (10 years, as MAX_DELAY_SECONDS in Python and the longest retry a
-- consumer may schedule): far enough for any schedule, and well inside what timestamptz holds.
CREATE FUNCTION pgcg.max_delay_ms() RETURNS bigint LANGUAGE sql IMMUTABLE RETURN 315360000000;

-- The log: pgcg.log (by slot range: one topic) -> pgcg.log_<topic> (by slot) -> one table
-- per slot. Enqueue inserts through pgcg.log; each topic's reader reads pgcg.log_<topic>.
CREATE TABLE pgcg.log (
    slot          integer NOT NULL,       -- topic id * 64 + ring slot
    partition     integer NOT NULL,
    "offset"      bigint NOT NULL,        -- from the partition's sequence
    txid          xid8 NOT NULL,          -- top-level transaction of the enqueue
    enqueued_at   timestamptz NOT NULL,
    available_at  timestamptz,            -- null: at once
    only_group    integer,                -- a dead-letter replay: for this group only
    key           text NOT NULL,
    payload       jsonb NOT NULL,
    headers       jsonb,
    dedup_key     text
) PARTITION BY RANGE (slot);
-- The only index. A batch is an offset range of a partition; transactions that were still
-- running at the batch's first tick are picked out of a range below it by txid, inside the
-- index.
CREATE INDEX log_read ON pgcg.log (partition, "offset", txid);

CREATE TABLE pgcg.segments (
    topic_id      integer NOT NULL REFERENCES pgcg.topics (id) ON DELETE CASCADE,
    seq           bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- The newest tick when the segment became current: it has no row visible there.
    first_tick    bigint NOT NULL,
    -- The first tick taken after no producer could write into it any more: every row it
    -- will ever have is visible there.
    sealed_tick   bigint,
    sealed_at     timestamptz,
    -- An xid assigned after the seal: a tick whose snapshot's xmax is above it was taken
    -- after every producer of the segment had ended.
    seal_xid      xid8,
    reclaimed_at  timestamptz,
    PRIMARY KEY (topic_id, seq)
);

-- Ticks: snapshots over time. Batch (a, b] of a topic is what b sees and a does not.
-- `offsets` are the partitions' sequence values, read just *after* the snapshot: every row
-- the snapshot sees has an offset at or below them (a producer draws its offsets before it
-- commits). `xid` is the ticker's own transaction id, taken after the offsets were read:
-- a producer with a larger xid took it, and so drew its offsets, after that read. NULL
-- when the tick was taken inside a transaction that already had an xid.
CREATE SEQUENCE pgcg.tick_seq AS bigint;
CREATE TABLE pgcg.ticks (
    topic_id  integer NOT NULL REFERENCES pgcg.topics (id) ON DELETE CASCADE,
    tick      bigint NOT NULL,
    snapshot  pg_snapshot NOT NULL,
    offsets   bigint[] NOT NULL,
    xid       xid8,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic_id, tick)
);

-- Dedup: a (key, dedup key) digest claimed for the topic's window.
CREATE TABLE pgcg.dedup (
    topic_id    integer NOT NULL REFERENCES pgcg.topics (id) ON DELETE CASCADE,
    digest      bytea NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (topic_id, digest)
);

-- Groups ---------------------------------------------------------------------------------

ALTER TABLE pgcg.subscriptions RENAME TO groups;
ALTER TABLE pgcg.groups RENAME CONSTRAINT subscriptions_pkey TO groups_pkey;
ALTER TABLE pgcg.groups RENAME CONSTRAINT subscriptions_topic_fkey TO groups_topic_fkey;
ALTER TABLE pgcg.groups RENAME CONSTRAINT subscriptions_group_name_check TO groups_name_check;
CREATE SEQUENCE pgcg.group_id_seq AS integer;
ALTER TABLE pgcg.groups
    ADD COLUMN id integer NOT NULL DEFAULT nextval('pgcg.group_id_seq'),
    -- Bumped by a seek: what the group finished before it no longer counts.
    ADD COLUMN seek_gen integer NOT NULL DEFAULT 0;
ALTER TABLE pgcg.groups ADD CONSTRAINT groups_id_key UNIQUE (id);
ALTER SEQUENCE pgcg.group_id_seq OWNED BY pgcg.groups.id;

-- The group's position in each partition: every message of every batch up to `tick` is
-- finished. Tiny, written by the owner at most every few seconds, never in the assignment
-- row every fenced write locks.
CREATE TABLE pgcg.group_progress (
    group_id       integer NOT NULL REFERENCES pgcg.groups (id) ON DELETE CASCADE,
    partition      integer NOT NULL,
    tick           bigint NOT NULL,
    gen            integer NOT NULL DEFAULT 0,
    -- The last epoch whose owner released it with nothing of it still running.
    clean_epoch    bigint NOT NULL DEFAULT 0,
    -- Deliveries cut off under epochs up to here have been charged (see adopt).
    charged_epoch  bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, partition)
) WITH (fillfactor = 50);

-- What groups finished above their position (kind 'd') and what owners started ('m'),
-- one row per round and partition, insert-only; one row per message ("offset") for a
-- transactional handler's completion. Same slots as the log, truncated with it (a row goes
-- in the slot of its newest message).
CREATE TABLE pgcg.ledger (
    slot       integer NOT NULL,
    group_id   integer NOT NULL,
    partition  integer NOT NULL,
    kind       "char" NOT NULL CHECK (kind IN ('d', 'm')),
    gen        integer NOT NULL,
    epoch      bigint NOT NULL,
    tick       bigint NOT NULL,          -- the newest message's tick
    offsets    bigint[],
    "offset"   bigint,
    -- A 'd' row whose messages moved to the parked queue (not handled yet: done with only
    -- as far as the log is concerned).
    parked     boolean NOT NULL DEFAULT false,
    CHECK ((offsets IS NULL) <> ("offset" IS NULL))
) PARTITION BY RANGE (slot);
CREATE INDEX ledger_above ON pgcg.ledger (group_id, partition, tick);
-- Two handlings of one message can never both commit (transactional handlers).
CREATE UNIQUE INDEX ledger_once ON pgcg.ledger (group_id, partition, "offset", gen, slot)
    WHERE "offset" IS NOT NULL;

-- Per-message state of a group: retries, long delays, deliveries cut off by a crash, a key
-- deep enough to pin its partition. Copies of the message, so they never hold a segment
-- back. A key's parked messages always come before its messages still in the log.
CREATE TABLE pgcg.parked (
    id             bigserial PRIMARY KEY,   -- the order of a key's parked messages
    group_id       integer NOT NULL REFERENCES pgcg.groups (id) ON DELETE CASCADE,
    partition      integer NOT NULL,
    gen            integer NOT NULL,
    "offset"       bigint NOT NULL,
    tick           bigint NOT NULL,
    key            text NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb,
    dedup_key      text,
    enqueued_at    timestamptz NOT NULL,
    available_at   timestamptz NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    origin         text NOT NULL,   -- retry | delay | interrupted | pinned | deep | follow | migrated
    claimed_epoch  bigint,          -- the delivery that started under this epoch
    claim_token    text,            -- makes a claim sent twice count once
    claimed_by     text,
    locked_until   timestamptz,
    progress       jsonb,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (group_id, partition, "offset", gen)
);
-- By key through a hash: no key, however long, can break the index.
CREATE INDEX parked_key ON pgcg.parked (group_id, partition, hashtextextended(key, 0), id);
CREATE INDEX parked_due ON pgcg.parked (group_id, partition, available_at);

-- Messages a group lost to the hard retention limit.
CREATE TABLE pgcg.group_losses (
    group_id   integer NOT NULL REFERENCES pgcg.groups (id) ON DELETE CASCADE,
    partition  integer NOT NULL,
    lost       bigint NOT NULL,
    seq        bigint NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);

-- Dead letters are per group.
ALTER TABLE pgcg.dead_letters
    ADD COLUMN "offset" bigint,
    ADD COLUMN dedup_key text,
    ADD COLUMN reason text;
DROP INDEX pgcg.dead_letters_topic_key;
DROP INDEX pgcg.dead_letters_dead_at;
UPDATE pgcg.dead_letters AS d SET group_name = g.group_name
FROM pgcg.groups AS g WHERE d.group_name IS NULL AND g.topic = d.topic;
CREATE INDEX dead_letters_group ON pgcg.dead_letters (group_name, dead_at);
-- A result written twice (its reply was lost) dead-letters once.
CREATE UNIQUE INDEX dead_letters_once ON pgcg.dead_letters (group_name, topic, partition, "offset")
    WHERE "offset" IS NOT NULL;

-- Topics: creating, altering -------------------------------------------------------------

-- Slot number of a ring slot: the partition value of its log and ledger tables.
CREATE FUNCTION pgcg.slot_of(p_topic_id integer, p_seq bigint, p_segments integer)
RETURNS integer LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN p_topic_id * 64 + (p_seq % p_segments)::integer;

-- The current snapshot, with the caller's own transaction listed as running: a transaction
-- sees its own xid as visible, and a tick taken inside one must not (its rows are not
-- committed yet).
CREATE FUNCTION pgcg.snapshot_excluding_self() RETURNS pg_snapshot
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN me IS NULL OR me >= pg_snapshot_xmax(s) OR NOT pg_visible_in_snapshot(me, s)
                THEN s ELSE (
        pg_snapshot_xmin(s)::text || ':' || pg_snapshot_xmax(s)::text || ':' ||
        (SELECT string_agg(x::text, ',' ORDER BY x::text::bigint)
         FROM (SELECT pg_snapshot_xip(s) AS x UNION SELECT me) AS xs))::pg_snapshot END
    FROM (SELECT pg_current_snapshot() AS s, pg_current_xact_id_if_assigned() AS me) AS q
$$;

-- Transactions a tick's snapshot did not see that may have drawn offsets at or below the
-- tick's: those it lists as running, and those that took their xid after the newest
-- completed one (a snapshot's xmax is one past the newest *completed* transaction, so it
-- does not list them) and before the tick's own. NULL when the tick has no xid of its own,
-- or the span is implausibly wide: any xid from xmax on may then be one.
CREATE FUNCTION pgcg.tick_unseen(p_snapshot pg_snapshot, p_xid xid8) RETURNS xid8[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_xid IS NULL
                  OR p_xid::text::bigint - pg_snapshot_xmax(p_snapshot)::text::bigint > 65536
                THEN NULL ELSE ARRAY(
        SELECT x FROM pg_snapshot_xip(p_snapshot) AS x
        UNION ALL
        SELECT g::text::xid8
        FROM generate_series(pg_snapshot_xmax(p_snapshot)::text::bigint,
                             p_xid::text::bigint - 1) AS g) END
$$;

-- The smallest xid that tick `a` did not see and tick `b` does (NULL: none), from below
-- when `a` cannot say which it did not see.
CREATE FUNCTION pgcg.first_late(a pg_snapshot, a_xid xid8, b pg_snapshot) RETURNS xid8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN u IS NULL THEN (
               SELECT min(x) FROM (
                   SELECT x FROM pg_snapshot_xip(a) AS x WHERE pg_visible_in_snapshot(x, b)
                   UNION ALL
                   SELECT pg_snapshot_xmax(a)
                   WHERE pg_snapshot_xmax(b) > pg_snapshot_xmax(a)) AS c)
           ELSE (SELECT min(x) FROM unnest(u) AS x WHERE pg_visible_in_snapshot(x, b)) END
    FROM pgcg.tick_unseen(a, a_xid) AS u
$$;

-- Every partition's last drawn offset (-1: none yet).
CREATE FUNCTION pgcg.topic_offsets(p_seqs regclass[]) RETURNS bigint[]
LANGUAGE sql VOLATILE AS $$
    SELECT array_agg(coalesce(pg_sequence_last_value(q), -1) ORDER BY o)
    FROM unnest(p_seqs) WITH ORDINALITY AS u(q, o)
$$;

-- The ring's tables, the sequences, segment 0 and the first tick. Names are checked by the
-- topics CHECK constraint before any identifier is built from them.
CREATE FUNCTION pgcg.build_topic(p_topic_id integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    t pgcg.topics;
    seqs regclass[] := '{}';
    tick0 bigint;
BEGIN
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.id = p_topic_id;
    EXECUTE format('CREATE TABLE pgcg.%I PARTITION OF pgcg.log FOR VALUES FROM (%s) TO (%s) '
                   'PARTITION BY LIST (slot)', 'log_' || t.name, t.id * 64, t.id * 64 + 64);
    EXECUTE format('CREATE TABLE pgcg.%I PARTITION OF pgcg.ledger FOR VALUES FROM (%s) TO (%s) '
                   'PARTITION BY LIST (slot)', 'ledger_' || t.name, t.id * 64, t.id * 64 + 64);
    FOR k IN 0 .. t.segments - 1 LOOP
        -- Insert-only, truncated whole: vacuum only ever has freezing to do here.
        EXECUTE format('CREATE TABLE pgcg.%I PARTITION OF pgcg.%I FOR VALUES IN (%s) '
                       'WITH (autovacuum_vacuum_insert_scale_factor = 0.5)',
                       'log_' || t.name || '_' || k, 'log_' || t.name, t.id * 64 + k);
        EXECUTE format('CREATE TABLE pgcg.%I PARTITION OF pgcg.%I FOR VALUES IN (%s)',
                       'ledger_' || t.name || '_' || k, 'ledger_' || t.name, t.id * 64 + k);
    END LOOP;
    FOR p IN 0 .. t.partitions - 1 LOOP
        EXECUTE format('CREATE SEQUENCE pgcg.%I AS bigint MINVALUE 0 START 0',
                       'log_' || t.name || '_p' || p);
        seqs := seqs || format('pgcg.%I', 'log_' || t.name || '_p' || p)::regclass;
    END LOOP;
    EXECUTE format('CREATE SEQUENCE pgcg.%I AS bigint MINVALUE 0 START 0',
                   'log_' || t.name || '_segment');
    UPDATE pgcg.topics SET offset_seqs = seqs,
        segment_seq = format('pgcg.%I', 'log_' || t.name || '_segment')::regclass
    WHERE id = t.id;
    INSERT INTO pgcg.ticks (topic_id, tick, snapshot, offsets)
    VALUES (t.id, nextval('pgcg.tick_seq'), pgcg.snapshot_excluding_self(),
            array_fill(-1::bigint, ARRAY[t.partitions]))
    RETURNING tick INTO tick0;
    INSERT INTO pgcg.segments (topic_id, seq, first_tick) VALUES (t.id, 0, tick0);
    PERFORM pgcg.build_reader(t.id);
END $$;

DROP FUNCTION pgcg.create_topic(text, integer);
CREATE FUNCTION pgcg.create_topic(p_name text, p_partitions integer DEFAULT 16,
                                  p_segments integer DEFAULT 8)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    new_id integer;
BEGIN
    INSERT INTO pgcg.topics (name, partitions, segments)
    VALUES (p_name, p_partitions, p_segments)
    ON CONFLICT (name) DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        IF (SELECT tp.partitions FROM pgcg.topics AS tp WHERE tp.name = p_name) <> p_partitions THEN
            RAISE EXCEPTION 'topic % exists with a different partition count', p_name
                USING ERRCODE = 'PGC02',
                      HINT = 'The partition count is fixed when a topic is created.';
        END IF;
        RETURN false;
    END IF;
    PERFORM pgcg.build_topic(new_id);
    RETURN true;
END $$;

-- Change a topic's retention and limits; a null argument leaves that setting alone. The
-- hard limits are cleared with 0.
CREATE FUNCTION pgcg.alter_topic(
    p_name text,
    p_retention_ms bigint DEFAULT NULL,
    p_retention_bytes bigint DEFAULT NULL,
    p_hard_retention_ms bigint DEFAULT NULL,
    p_hard_retention_bytes bigint DEFAULT NULL,
    p_segment_bytes bigint DEFAULT NULL,
    p_tick_interval_ms integer DEFAULT NULL,
    p_dedup_window_ms bigint DEFAULT NULL,
    p_max_payload_bytes integer DEFAULT NULL
) RETURNS pgcg.topics LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    t pgcg.topics;
BEGIN
    UPDATE pgcg.topics AS tp SET
        retention_ms = coalesce(p_retention_ms, tp.retention_ms),
        retention_bytes = CASE WHEN p_retention_bytes = 0 THEN NULL
                               ELSE coalesce(p_retention_bytes, tp.retention_bytes) END,
        hard_retention_ms = CASE WHEN p_hard_retention_ms = 0 THEN NULL
                                 ELSE coalesce(p_hard_retention_ms, tp.hard_retention_ms) END,
        hard_retention_bytes = CASE WHEN p_hard_retention_bytes = 0 THEN NULL
                                    ELSE coalesce(p_hard_retention_bytes, tp.hard_retention_bytes) END,
        segment_bytes = coalesce(p_segment_bytes, tp.segment_bytes),
        tick_interval_ms = coalesce(p_tick_interval_ms, tp.tick_interval_ms),
        dedup_window_ms = coalesce(p_dedup_window_ms, tp.dedup_window_ms),
        max_payload_bytes = coalesce(p_max_payload_bytes, tp.max_payload_bytes)
    WHERE tp.name = p_name
    RETURNING tp.* INTO t;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown topic %', p_name USING ERRCODE = 'PGC01',
            HINT = 'Create it first: pgcg topic create <name>';
    END IF;
    RETURN t;
END $$;

-- Enqueue ---------------------------------------------------------------------------------

-- Advisory lock classes (first key of the two-key form).
CREATE FUNCTION pgcg.slot_lock() RETURNS integer LANGUAGE sql IMMUTABLE RETURN 28787;   -- 'pp'
CREATE FUNCTION pgcg.tick_lock() RETURNS integer LANGUAGE sql IMMUTABLE RETURN 28788;   -- 'pt'
CREATE FUNCTION pgcg.maint_lock() RETURNS integer LANGUAGE sql IMMUTABLE RETURN 28789;  -- 'pu'

-- The slot this transaction writes the topic into: the current segment's, with a shared
-- transaction-level advisory lock on it. The current segment is a sequence, read without
-- MVCC, so a REPEATABLE READ producer sees a rotation too; sealing a segment takes the
-- lock exclusively, so it waits for every producer of that slot.
CREATE FUNCTION pgcg.write_slot(t pgcg.topics) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    seg bigint;
    again bigint;
BEGIN
    LOOP
        seg := coalesce(pg_sequence_last_value(t.segment_seq), 0);
        PERFORM pg_advisory_xact_lock_shared(pgcg.slot_lock(), pgcg.slot_of(t.id, seg, t.segments));
        again := coalesce(pg_sequence_last_value(t.segment_seq), 0);
        IF again = seg THEN
            RETURN pgcg.slot_of(t.id, seg, t.segments);
        END IF;
    END LOOP;
END $$;

-- An input problem: the whole call fails and nothing of it is written.
CREATE FUNCTION pgcg.reject(p_ord bigint, p_total integer, p_what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', CASE WHEN p_total > 1 THEN 'message ' || (p_ord - 1) || ': ' ELSE '' END
                         || p_what
        USING ERRCODE = 'PGC03',
              HINT = 'Nothing of this call was written.';
END $$;

-- Claim a dedup digest for the window: true if it was free (or had expired).
CREATE FUNCTION pgcg.claim_dedup(p_topic_id integer, p_digest bytea, p_window_ms bigint)
RETURNS boolean LANGUAGE sql SET search_path = pg_catalog, pgcg AS $$
    INSERT INTO pgcg.dedup AS d (topic_id, digest, expires_at)
    VALUES (p_topic_id, p_digest, now() + p_window_ms * interval '1 millisecond')
    ON CONFLICT (topic_id, digest) DO UPDATE SET expires_at = excluded.expires_at
        WHERE d.expires_at <= now()
    RETURNING true
$$;

-- Enqueue a batch in one statement, for producers in any language. Arrays are parallel;
-- headers, dedup keys and delays may be null. Returns one row per input in input order:
-- the message id (offset * 1024 + partition), or null where the (key, dedup key) was
-- already enqueued within the topic's dedup window. One NOTIFY per call names the
-- partitions that got work (`SET pgcg.notify = off` for producers that PREPARE
-- TRANSACTION: PostgreSQL refuses NOTIFY there). Limits (key and dedup key in UTF-8
-- bytes, payload and headers in bytes, delay) are checked here, so every language gets
-- them; a violation fails the whole call.
DROP FUNCTION pgcg.enqueue(text, text[], jsonb[], jsonb[], text[], bigint[]);
CREATE FUNCTION pgcg.enqueue(
    p_topic       text,
    p_keys        text[],
    p_payloads    jsonb[],
    p_headers     jsonb[] DEFAULT NULL,
    p_dedup_keys  text[] DEFAULT NULL,
    p_delays_ms   bigint[] DEFAULT NULL
) RETURNS TABLE (ord bigint, id bigint, partition integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg SET jit = off AS $$
#variable_conflict use_column
DECLARE
    -- First: a transaction takes its xid before it draws any offset (see the ticks' bound).
    v_txid  xid8 := pg_current_xact_id();
    t       pgcg.topics;
    n       integer := coalesce(cardinality(p_keys), 0);
    v_slot  integer;
    bad     record;
BEGIN
    SELECT * INTO t FROM pgcg.topics AS tp WHERE tp.name = p_topic;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown topic %', p_topic USING ERRCODE = 'PGC01',
            HINT = 'Create it first: pgcg topic create <name>';
    END IF;
    IF coalesce(cardinality(p_payloads), 0) <> n
       OR coalesce(cardinality(p_headers), n) <> n
       OR coalesce(cardinality(p_dedup_keys), n) <> n
       OR coalesce(cardinality(p_delays_ms), n) <> n THEN
        RAISE EXCEPTION 'the arrays of keys, payloads, headers, dedup keys and delays must '
                        'have the same length' USING ERRCODE = 'PGC03';
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;

    SELECT * INTO bad FROM (
        SELECT u.o,
               CASE
                 WHEN u.k IS NULL OR u.k = '' THEN 'the ordering key must be a non-empty string'
                 WHEN octet_length(u.k) > pgcg.max_key_bytes() THEN
                   format('the ordering key is %s bytes in UTF-8, over the limit of %s',
                          octet_length(u.k), pgcg.max_key_bytes())
                 WHEN u.p IS NULL THEN 'the payload must not be null (use JSON null)'
                 WHEN octet_length(u.p::text) > t.max_payload_bytes THEN
                   format('the payload is %s bytes, over the topic''s limit of %s',
                          octet_length(u.p::text), t.max_payload_bytes)
                 WHEN u.h IS NOT NULL AND jsonb_typeof(u.h) <> 'object' THEN
                   'headers must be a JSON object of strings'
                 WHEN u.h IS NOT NULL AND octet_length(u.h::text) > pgcg.max_headers_bytes() THEN
                   format('the headers are %s bytes, over the limit of %s',
                          octet_length(u.h::text), pgcg.max_headers_bytes())
                 WHEN u.h IS NOT NULL AND EXISTS (
                        SELECT FROM jsonb_each(u.h) AS e WHERE jsonb_typeof(e.value) <> 'string') THEN
                   'headers must be a JSON object of strings'
                 WHEN u.d = '' THEN 'a dedup key must be a non-empty string'
                 WHEN octet_length(u.d) > pgcg.max_dedup_key_bytes() THEN
                   format('the dedup key is %s bytes in UTF-8, over the limit of %s',
                          octet_length(u.d), pgcg.max_dedup_key_bytes())
                 WHEN u.ms < 0 OR u.ms > pgcg.max_delay_ms() THEN
                   format('the delay must be between 0 and %s ms', pgcg.max_delay_ms())
               END AS problem
        FROM unnest(p_keys, p_payloads, p_headers, p_dedup_keys, p_delays_ms)
             WITH ORDINALITY AS u(k, p, h, d, ms, o)
    ) AS checked WHERE checked.problem IS NOT NULL ORDER BY checked.o LIMIT 1;
    IF FOUND THEN
        PERFORM pgcg.reject(bad.o, n, bad.problem);
    END IF;

    v_slot := pgcg.write_slot(t);
    RETURN QUERY
    WITH input AS (
        SELECT u.o, u.k, u.p, nullif(u.h, '{}'::jsonb) AS h, u.d, u.ms,
               pgcg.partition_for(u.k, t.partitions) AS part
        FROM unnest(p_keys, p_payloads, p_headers, p_dedup_keys, p_delays_ms)
             WITH ORDINALITY AS u(k, p, h, d, ms, o)
    ), fresh AS (
        -- The first of each (key, dedup key) in the call claims its digest for the window;
        -- a digest still live means "already enqueued": skipped.
        SELECT i.o FROM input AS i WHERE i.d IS NULL
        UNION ALL
        SELECT c.o FROM (
            SELECT DISTINCT ON (x.digest) x.o, x.digest
            FROM (SELECT i.o, sha256(convert_to(i.k, 'UTF8') || '\x00'::bytea
                                     || convert_to(i.d, 'UTF8')) AS digest
                  FROM input AS i WHERE i.d IS NOT NULL) AS x
            ORDER BY x.digest, x.o
        ) AS c
        WHERE pgcg.claim_dedup(t.id, c.digest, t.dedup_window_ms)
    ), numbered AS (
        -- Offsets drawn in input order, so a batch keeps its per-key order.
        SELECT s.*, nextval(t.offset_seqs[s.part + 1]) AS off
        FROM (SELECT i.* FROM input AS i JOIN fresh AS f ON f.o = i.o ORDER BY i.o) AS s
    ), inserted AS (
        INSERT INTO pgcg.log (slot, partition, "offset", txid, enqueued_at, available_at,
                              key, payload, headers, dedup_key)
        SELECT v_slot, nb.part, nb.off, v_txid, now(),
               CASE WHEN nb.ms > 0 THEN now() + nb.ms * interval '1 millisecond' END,
               nb.k, nb.p, nb.h, nb.d
        FROM numbered AS nb
    ), notified AS (
        SELECT pg_notify('pgcg.t.' || p_topic, string_agg(DISTINCT nb.part::text, ','))
        FROM numbered AS nb
        HAVING count(*) > 0 AND coalesce(current_setting('pgcg.notify', true), 'on') <> 'off'
    )
    SELECT i.o, nb.off * 1024 + nb.part, i.part
    FROM input AS i
    LEFT JOIN numbered AS nb ON nb.o = i.o
    LEFT JOIN notified ON true
    ORDER BY i.o;
END $$;

-- Reading: ticks ------------------------------------------------------------------------------

-- A new tick for the topic when the newest is older than the topic's tick interval and
-- something may have become visible since: a partition's offsets moved, or a transaction
-- running at the newest tick ended (a producer that drew its offsets before that tick and
-- committed after it). Returns the newest tick either
-- way. The advisory lock (held to the end of the caller's transaction) makes tick ids
-- follow the order their snapshots are taken in, and the snapshot is taken by a statement
-- that starts after the lock is held; a caller that does not get the lock uses what exists.
CREATE FUNCTION pgcg.tick(p_topic_id integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    t     pgcg.topics;
    last  pgcg.ticks;
    snap  pg_snapshot;
    offs  bigint[];
    made  pgcg.ticks;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgcg reads topics in READ COMMITTED transactions only'
            USING ERRCODE = 'PGC06';
    END IF;
    SELECT * INTO t FROM pgcg.topics AS tp WHERE tp.id = p_topic_id;
    SELECT * INTO last FROM pgcg.ticks AS k WHERE k.topic_id = p_topic_id
    ORDER BY k.tick DESC LIMIT 1;
    IF clock_timestamp() < last.at + t.tick_interval_ms * interval '1 millisecond' THEN
        RETURN last.tick;
    END IF;
    offs := pgcg.topic_offsets(t.offset_seqs);
    -- Nothing new when no offset moved and no transaction the newest tick did not see has
    -- ended since (those at or above its xmax included: it does not list them).
    IF offs = last.offsets AND (
           CASE WHEN pgcg.tick_unseen(last.snapshot, last.xid) IS NULL
                THEN pg_snapshot_xmax(pg_current_snapshot()) = pg_snapshot_xmax(last.snapshot)
                     AND NOT EXISTS (SELECT FROM pg_snapshot_xip(last.snapshot) AS x
                                     WHERE pg_xact_status(x) IS DISTINCT FROM 'in progress')
                ELSE NOT EXISTS (
                     SELECT FROM unnest(pgcg.tick_unseen(last.snapshot, last.xid)) AS x
                     WHERE pg_xact_status(x) IS DISTINCT FROM 'in progress') END) THEN
        RETURN last.tick;
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RETURN last.tick;  -- our own xid would count as visible in our snapshot
    END IF;
    IF NOT pg_try_advisory_xact_lock(pgcg.tick_lock(), p_topic_id) THEN
        RETURN last.tick;
    END IF;
    -- New statements, new snapshots: the newest tick again (someone may have just made
    -- one), then the snapshot, the offsets and our own xid, in that order (see pgcg.ticks).
    SELECT * INTO last FROM pgcg.ticks AS k WHERE k.topic_id = p_topic_id
    ORDER BY k.tick DESC LIMIT 1;
    IF clock_timestamp() < last.at + t.tick_interval_ms * interval '1 millisecond' THEN
        RETURN last.tick;
    END IF;
    snap := pg_current_snapshot();
    offs := pgcg.topic_offsets(t.offset_seqs);
    INSERT INTO pgcg.ticks (topic_id, tick, snapshot, offsets, xid, at)
    VALUES (p_topic_id, nextval('pgcg.tick_seq'), snap, offs, pg_current_xact_id(),
            clock_timestamp())
    RETURNING * INTO made;
    IF pg_snapshot_xmax(made.snapshot) < pg_snapshot_xmax(last.snapshot)
       OR pg_snapshot_xmin(made.snapshot) < pg_snapshot_xmin(last.snapshot) THEN
        RAISE EXCEPTION 'tick % of topic % went back in time (% after %)', made.tick,
            t.name, made.snapshot, last.snapshot USING ERRCODE = 'PGC07';
    END IF;
    RETURN made.tick;
END $$;

-- Reading: batches ---------------------------------------------------------------------------

-- Create (or replace) the topic's reader: pgcg.read_<topic>, static SQL over the topic's
-- own log parent, so its plan is cached per session (a generic plan: a Merge Append of the
-- slot tables' (partition, offset, txid) index scans, in offset order, stopping at the
-- limit). Arguments, per partition in call order: the tick up to which every batch was
-- read (`done`), the batch being read and the last offset read in it (`cur`, `cur_off`),
-- and whether the group has parked messages there. Rows of batch (a, b] with `oa`, `ob`
-- the partition's offsets recorded at a and b:
--   late: transactions a did not see (pgcg.tick_unseen) that b sees committed; each took
--         its xid, and then drew its offsets, after the newest tick f whose own xid is
--         below the smallest of them, so they lie in (offsets at f, oa];
--   new:  offsets in (oa, ob]: drawn after a's snapshot, so a cannot see them.
-- Every late row has a smaller offset than every new row: offset order throughout.
-- Returns the rows (state 'r' handle, 'p' park: its key has parked messages, 's' skip:
-- another group's replay) and one end marker per partition (state 'e'): every batch up to
-- `tick` is read. At most `p_limit` rows per partition, and rows stop once
-- `p_limit_bytes` of payload were returned in the call.
CREATE FUNCTION pgcg.build_reader(p_topic_id integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $build$
DECLARE
    t pgcg.topics;
BEGIN
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.id = p_topic_id;
    EXECUTE format($fn$
CREATE OR REPLACE FUNCTION pgcg.%1$I(
    p_topic_id integer, p_group_id integer, p_partitions integer[], p_done bigint[],
    p_cur bigint[], p_cur_offsets bigint[], p_parked boolean[], p_newest bigint,
    p_limit integer, p_limit_bytes bigint, p_window integer DEFAULT 512)
RETURNS TABLE (partition integer, state "char", a_tick bigint, tick bigint, "offset" bigint,
               slot integer, key text, payload jsonb, headers jsonb, dedup_key text,
               enqueued_at timestamptz, due_in_ms bigint, bytes integer)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgcg SET jit = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $body$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH c AS (
        SELECT u.p, u.done, u.cur, u.cur_off, coalesce(u.parked, false) AS parked, u.ord,
               -- The window ends at the first tick whose offsets leave room for the limit
               -- past the cursor, at most p_window ticks on, else at the newest: a round
               -- reads about what it returns however far behind it is (PostgreSQL 15 does
               -- not stop reading the batches of the window at the limit).
               (SELECT w.tick FROM (
                    SELECT k.tick, k.offsets[u.p + 1] AS o,
                           row_number() OVER (ORDER BY k.tick) AS n
                    FROM pgcg.ticks AS k
                    WHERE k.topic_id = p_topic_id AND k.tick > u.done AND k.tick <= p_newest
                    ORDER BY k.tick LIMIT p_window) AS w
                WHERE w.tick = p_newest OR w.n = p_window
                   OR w.o >= greatest(u.cur_off, (
                          SELECT d.offsets[u.p + 1] FROM pgcg.ticks AS d
                          WHERE d.topic_id = p_topic_id AND d.tick = u.done)) + p_limit
                ORDER BY w.tick LIMIT 1) AS window_end
        FROM unnest(p_partitions, p_done, p_cur, p_cur_offsets, p_parked)
             WITH ORDINALITY AS u(p, done, cur, cur_off, parked, ord)
    ), got AS MATERIALIZED (
        SELECT c.ord, c.p, c.parked, x.*
        FROM c CROSS JOIN LATERAL (
            SELECT w.a_tick, w.tick, r.*
            FROM (
                SELECT k.tick, k.b, k.ob,
                       lag(k.tick, 1, d.tick) OVER win AS a_tick,
                       coalesce(lag(k.b) OVER win, d.snapshot) AS a,
                       CASE WHEN lag(k.tick) OVER win IS NULL THEN d.xid
                            ELSE lag(k.xid) OVER win END AS a_xid,
                       coalesce(lag(k.ob) OVER win, d.offsets[c.p + 1]) AS oa
                FROM pgcg.ticks AS d
                CROSS JOIN LATERAL (
                    SELECT k.tick, k.snapshot AS b, k.xid, k.offsets[c.p + 1] AS ob
                    FROM pgcg.ticks AS k
                    WHERE k.topic_id = p_topic_id AND k.tick > c.done AND k.tick <= c.window_end
                    ORDER BY k.tick
                ) AS k
                WHERE d.topic_id = p_topic_id AND d.tick = c.done
                WINDOW win AS (ORDER BY k.tick)
            ) AS w
            CROSS JOIN LATERAL (
                SELECT pgcg.first_late(w.a, w.a_xid, w.b) AS first_late
            ) AS lt
            CROSS JOIN LATERAL (
                SELECT CASE WHEN lt.first_late IS NULL THEN NULL ELSE coalesce((
                    SELECT f.offsets[c.p + 1] FROM pgcg.ticks AS f
                    WHERE f.topic_id = p_topic_id AND f.tick <= w.a_tick
                      AND f.xid < lt.first_late
                    ORDER BY f.tick DESC LIMIT 1), -1) END AS floor,
                    CASE WHEN w.tick = c.cur THEN c.cur_off ELSE -1 END AS after
            ) AS lo
            CROSS JOIN LATERAL (
                -- One range of the (partition, offset, txid) index, in offset order: the
                -- late rows lie below oa, the new ones above it.
                SELECT l."offset", l.slot, l.txid, l.only_group, l.available_at,
                       l.enqueued_at, l.key, l.payload, l.headers, l.dedup_key
                FROM pgcg.%2$I AS l
                WHERE l.partition = c.p
                  AND l."offset" > greatest(coalesce(lo.floor, w.oa), lo.after)
                  AND l."offset" <= w.ob
                  AND pg_visible_in_snapshot(l.txid, w.b)
                  AND (l."offset" > w.oa OR NOT pg_visible_in_snapshot(l.txid, w.a))
                ORDER BY l."offset" LIMIT p_limit
            ) AS r
            ORDER BY w.tick, r."offset" LIMIT p_limit
        ) AS x
    ), sized AS (
        SELECT g.*, count(*) OVER (PARTITION BY g.ord) AS n,
               sum(coalesce(pg_column_size(g.payload), 0))
                   OVER (ORDER BY g.ord, g.tick, g."offset") AS running
        FROM got AS g
    ), kept AS (
        SELECT s.*,
               count(*) OVER (PARTITION BY s.ord) AS n_kept,
               last_value(s.a_tick) OVER (PARTITION BY s.ord ORDER BY s.tick, s."offset"
                   ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS last_a
        FROM sized AS s
        WHERE s.running - coalesce(pg_column_size(s.payload), 0) < p_limit_bytes
    )
    SELECT k.p, CASE WHEN k.only_group IS NOT NULL AND k.only_group <> p_group_id THEN 's'
                     -- A probe of parked_key per row (as an EXISTS, a planner without
                     -- statistics may hash the group's whole parked queue instead).
                     WHEN k.parked AND (
                         SELECT pk.id FROM pgcg.parked AS pk
                         WHERE pk.group_id = p_group_id AND pk.partition = k.p
                           AND hashtextextended(pk.key, 0) = hashtextextended(k.key, 0)
                           AND pk.key = k.key
                         ORDER BY pk.id LIMIT 1) IS NOT NULL THEN 'p'
                     ELSE 'r' END::"char",
           k.a_tick, k.tick, k."offset", k.slot, k.key,
           CASE WHEN k.only_group IS NULL OR k.only_group = p_group_id THEN k.payload END,
           CASE WHEN k.only_group IS NULL OR k.only_group = p_group_id THEN k.headers END,
           k.dedup_key, k.enqueued_at,
           CASE WHEN k.available_at IS NULL THEN 0::bigint ELSE greatest(0::bigint,
               (extract(epoch FROM k.available_at - clock_timestamp()) * 1000)::bigint) END,
           coalesce(pg_column_size(k.payload), 0) + coalesce(pg_column_size(k.headers), 0)
    FROM kept AS k
    UNION ALL
    -- End markers: a partition that got fewer rows than asked read its whole window; one
    -- that got its fill (or was cut by the byte budget) read every batch before its last
    -- row's.
    SELECT c.p, 'e'::"char", NULL, e.tick, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
    FROM c
    LEFT JOIN (SELECT DISTINCT s.ord, s.n FROM sized AS s) AS sn ON sn.ord = c.ord
    LEFT JOIN (SELECT DISTINCT kk.ord, kk.n_kept, kk.last_a FROM kept AS kk) AS kn
           ON kn.ord = c.ord
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN coalesce(sn.n, 0) < p_limit AND coalesce(kn.n_kept, 0) = coalesce(sn.n, 0)
                THEN coalesce(c.window_end, c.done)
            ELSE coalesce(kn.last_a, c.done) END AS tick
    ) AS e
    WHERE e.tick > c.done OR c.cur IS NOT NULL AND e.tick >= c.cur;
END $body$
$fn$, 'read_' || t.name, 'log_' || t.name);
END $build$;

-- Read the next messages of a group's partitions, in position order (tick, offset). Read
-- only, apart from a tick: nothing here is fenced, and nothing read can be handled before
-- the owner's fenced dispatch mark or parked claim. Per partition the caller passes its
-- cursor: `done` (every batch up to this tick was read) and, inside the batch after it,
-- `cur` with the last offset read there. See build_reader for what comes back.
CREATE FUNCTION pgcg.fetch(
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
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg SET jit = off AS $$
#variable_conflict use_column
DECLARE
    g pgcg.groups;
    t pgcg.topics;
BEGIN
    SELECT * INTO g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown group %', p_group USING ERRCODE = 'PGC04';
    END IF;
    SELECT * INTO t FROM pgcg.topics AS tp WHERE tp.name = g.topic;
    RETURN QUERY EXECUTE format(
        'SELECT * FROM pgcg.%I($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)', 'read_' || t.name)
    USING t.id, g.id, p_partitions, p_done, p_cur, p_cur_offsets,
          -- A probe of parked_due per partition: as an EXISTS, the planner may hash the
          -- group's whole parked queue instead.
          ARRAY(SELECT (SELECT pk.available_at FROM pgcg.parked AS pk
                        WHERE pk.group_id = g.id AND pk.partition = u.p
                        ORDER BY pk.available_at LIMIT 1) IS NOT NULL
                FROM unnest(p_partitions) WITH ORDINALITY AS u(p, o) ORDER BY u.o),
          pgcg.tick(t.id), p_limit, p_limit_bytes;
END $$;

-- Acting on partitions: every write is fenced ------------------------------------------------

-- The partitions of `p_want` (partition, epoch) that this member owns at that epoch, their
-- assignment rows locked FOR SHARE (in partition order everywhere, so no deadlock with a
-- rebalance): an epoch bump either waits for the caller's commit or has already happened
-- and the partition is not returned. `startable` is false while it is being revoked: work
-- in flight may finish there, nothing new may start.
CREATE FUNCTION pgcg.owned(p_group text, p_member text, p_partitions integer[], p_epochs bigint[])
RETURNS TABLE (partition integer, epoch bigint, startable boolean)
LANGUAGE sql SET search_path = pg_catalog, pgcg AS $$
    SELECT pa.partition, pa.epoch, pa.state = 'assigned'
    FROM pgcg.partition_assignments AS pa
    JOIN pgcg.groups AS g ON g.group_name = pa.group_name AND g.topic = pa.topic
    WHERE pa.group_name = p_group AND pa.member_id = p_member
      AND pa.state IN ('assigned', 'revoking')
      AND (pa.partition, pa.epoch) IN (
          SELECT w.p, w.e FROM unnest(p_partitions, p_epochs) AS w(p, e))
    ORDER BY pa.partition
    FOR SHARE OF pa
$$;

-- Copy log rows of a topic into the group's parked queue (or dead letters), by
-- (partition, offset): the caller's fenced writes use these.
CREATE FUNCTION pgcg.log_rows(p_topic text, p_partitions integer[], p_offsets bigint[])
RETURNS TABLE (partition integer, "offset" bigint, txid xid8, enqueued_at timestamptz,
               available_at timestamptz, key text, payload jsonb, headers jsonb, dedup_key text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgcg SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT l.partition, l."offset", l.txid, l.enqueued_at, l.available_at, l.key, '
        'l.payload, l.headers, l.dedup_key FROM unnest($1, $2) AS w(p, o) '
        'JOIN pgcg.%I AS l ON l.partition = w.p AND l."offset" = w.o', 'log_' || p_topic)
    USING p_partitions, p_offsets;
END $$;

-- The last delivery of a parked message or a charged log message: into the group's dead
-- letters (once: a result written twice dead-letters once).
CREATE FUNCTION pgcg.bury(
    p_group text, p_topic text, p_member text, p_partition integer, p_offset bigint,
    p_key text, p_payload jsonb, p_headers jsonb, p_dedup_key text, p_enqueued_at timestamptz,
    p_attempts integer, p_error text, p_reason text)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pgcg AS $$
    INSERT INTO pgcg.dead_letters
        (message_id, topic, partition, "offset", key, payload, headers, dedup_key,
         enqueued_at, attempts, last_error, reason, group_name, member_id)
    VALUES (p_offset * 1024 + p_partition, p_topic, p_partition, p_offset, p_key, p_payload,
            coalesce(p_headers, '{}'::jsonb), p_dedup_key, p_enqueued_at, p_attempts, p_error,
            p_reason, p_group, p_member)
    ON CONFLICT (group_name, topic, partition, "offset") WHERE "offset" IS NOT NULL DO NOTHING
$$;

-- A member starts a partition at `p_epoch`: read the group's position back, and charge,
-- once, the deliveries that an earlier owner started and never finished (it crashed, was
-- killed, or was fenced): each is parked with its attempt counted, or dead-lettered once
-- that reaches `p_max_attempts`. Returns nothing when the member does not own the
-- partition at that epoch. `finished`: the offsets the group finished above its position.
CREATE FUNCTION pgcg.adopt(p_group text, p_member text, p_partition integer, p_epoch bigint,
                           p_max_attempts integer, p_retry_delay_ms bigint)
RETURNS TABLE (tick bigint, gen integer, finished bigint[], charged integer, buried integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg SET jit = off AS $$
#variable_conflict use_column
DECLARE
    g       pgcg.groups;
    t       pgcg.topics;
    pr      pgcg.group_progress;
    started bigint[];
    done    bigint[];
    cut     bigint[];
    n_charged integer := 0;
    n_buried  integer := 0;
    r       record;
    reason  constant text := 'delivery interrupted: the consumer stopped (crashed, was killed '
                             'or lost the partition) while handling it';
BEGIN
    IF NOT EXISTS (SELECT FROM pgcg.owned(p_group, p_member, ARRAY[p_partition], ARRAY[p_epoch])) THEN
        RETURN;
    END IF;
    SELECT * INTO STRICT g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.name = g.topic;
    SELECT * INTO STRICT pr FROM pgcg.group_progress AS gp
    WHERE gp.group_id = g.id AND gp.partition = p_partition FOR UPDATE;

    IF pr.charged_epoch < p_epoch - 1 THEN
        -- Started under an unclean earlier epoch, and not finished (or parked) since.
        SELECT coalesce(array_agg(DISTINCT o), '{}') INTO started
        FROM pgcg.ledger AS l, unnest(l.offsets) AS o
        WHERE l.group_id = g.id AND l.partition = p_partition AND l.tick > pr.tick
          AND l.kind = 'm' AND l.gen = pr.gen
          AND l.epoch > pr.charged_epoch AND l.epoch < p_epoch AND l.epoch <> pr.clean_epoch;
        SELECT coalesce(array_agg(DISTINCT o), '{}') INTO done
        FROM pgcg.ledger AS l,
             unnest(coalesce(l.offsets, ARRAY[l."offset"])) AS o
        WHERE l.group_id = g.id AND l.partition = p_partition AND l.tick > pr.tick
          AND l.kind = 'd' AND l.gen = pr.gen AND o = ANY (started);
        SELECT coalesce(array_agg(o), '{}') INTO cut
        FROM unnest(started) AS o WHERE NOT o = ANY (done);
        -- A mark row carries its round's newest tick, so one above the position can list
        -- messages at or below it, whose 'd' rows are at or below it too: those finished
        -- (the position only moves past finished messages) and must not be charged. A
        -- message is at or below the position when the position's tick saw it committed.
        SELECT coalesce(array_agg(lr."offset"), '{}') INTO cut
        FROM pgcg.log_rows(t.name, array_fill(p_partition, ARRAY[cardinality(cut)]), cut) AS lr
        WHERE NOT EXISTS (
            SELECT FROM pgcg.ticks AS k
            WHERE k.topic_id = t.id AND k.tick = pr.tick
              AND pg_visible_in_snapshot(lr.txid, k.snapshot));
        FOR r IN SELECT * FROM pgcg.log_rows(t.name,
                     array_fill(p_partition, ARRAY[cardinality(cut)]), cut) LOOP
            IF p_max_attempts <= 1 THEN
                PERFORM pgcg.bury(p_group, t.name, p_member, r.partition, r."offset", r.key,
                                  r.payload, r.headers, r.dedup_key, r.enqueued_at, 1, reason,
                                  'handler never returned: ' || reason);
                n_buried := n_buried + 1;
            ELSE
                INSERT INTO pgcg.parked (group_id, partition, gen, "offset", tick, key, payload,
                                         headers, dedup_key, enqueued_at, available_at,
                                         attempts, last_error, origin)
                SELECT g.id, r.partition, pr.gen, r."offset",
                       (SELECT max(l.tick) FROM pgcg.ledger AS l
                        WHERE l.group_id = g.id AND l.partition = p_partition
                          AND l.tick > pr.tick AND r."offset" = ANY (l.offsets)),
                       r.key, r.payload, r.headers, r.dedup_key, r.enqueued_at,
                       clock_timestamp() + p_retry_delay_ms * interval '1 millisecond',
                       1, reason, 'interrupted'
                ON CONFLICT (group_id, partition, "offset", gen) DO NOTHING;
                n_charged := n_charged + 1;
            END IF;
        END LOOP;
        IF cardinality(cut) > 0 THEN
            INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets,
                                     parked)
            SELECT l.slot, g.id, p_partition, 'd', pr.gen, p_epoch, max(l.tick),
                   array_agg(DISTINCT o), true
            FROM pgcg.ledger AS l, unnest(l.offsets) AS o
            WHERE l.group_id = g.id AND l.partition = p_partition AND l.tick > pr.tick
              AND l.kind = 'm' AND o = ANY (cut)
            GROUP BY l.slot;
        END IF;
        -- Parked messages whose claimed delivery never finished: counted at their claim.
        FOR r IN DELETE FROM pgcg.parked AS pk
                 WHERE pk.group_id = g.id AND pk.partition = p_partition
                   AND pk.claimed_epoch > pr.charged_epoch AND pk.claimed_epoch < p_epoch
                   AND pk.claimed_epoch <> pr.clean_epoch AND pk.attempts >= p_max_attempts
                 RETURNING pk.* LOOP
            PERFORM pgcg.bury(p_group, t.name, p_member, r.partition, r."offset", r.key,
                              r.payload, r.headers, r.dedup_key, r.enqueued_at, r.attempts,
                              reason, 'handler never returned: ' || reason);
            n_buried := n_buried + 1;
        END LOOP;
        UPDATE pgcg.parked AS pk
        SET claimed_epoch = NULL, claim_token = NULL, claimed_by = NULL, locked_until = NULL,
            last_error = reason,
            available_at = clock_timestamp() + p_retry_delay_ms * interval '1 millisecond'
        WHERE pk.group_id = g.id AND pk.partition = p_partition
          AND pk.claimed_epoch IS NOT NULL AND pk.claimed_epoch < p_epoch;
        UPDATE pgcg.group_progress AS gp SET charged_epoch = p_epoch - 1
        WHERE gp.group_id = g.id AND gp.partition = p_partition;
    END IF;

    RETURN QUERY
    SELECT pr.tick, pr.gen,
           coalesce((SELECT array_agg(DISTINCT o)
                     FROM pgcg.ledger AS l, unnest(coalesce(l.offsets, ARRAY[l."offset"])) AS o
                     WHERE l.group_id = g.id AND l.partition = p_partition
                       AND l.tick > pr.tick AND l.kind = 'd' AND l.gen = pr.gen), '{}'),
           n_charged, n_buried;
END $$;

-- One round of the owner's writes, in one statement, each item fenced by its own
-- partition's epoch (a stale item neither lets the others through nor blocks them):
--   marks  (m_*): log messages about to start; nothing starts before its mark committed,
--                 and only in a partition that is assigned (not being revoked);
--   claims (c_*): parked messages about to start, their delivery counted first (a claim
--                 sent twice, with the same token, counts once);
--   log results (l_*): 'd' handled, 'p' parked (retry, delay, a key pinning the
--                 partition...; `l_claimed`: its delivery goes on, now as a parked one),
--                 'x' dead-lettered with the reason in l_errors;
--   parked results (k_*): 'd' handled (deleted), 'r' retry after k_delays_ms, 'x' dead.
-- Returns one row per item: what ('m', 'c', 'l', 'k'), its partition, its reference (the
-- partition for a mark, the parked id, the offset), whether it took effect, and for
-- claims the attempt number, for parks the parked id, for parked results how many parked
-- messages the key still has. An item of a partition this member no longer owns at that
-- epoch takes no effect.
CREATE FUNCTION pgcg.settle(
    p_group text, p_member text,
    m_parts integer[], m_epochs bigint[], m_ticks bigint[], m_offsets bigint[], m_slots integer[],
    c_ids bigint[], c_parts integer[], c_epochs bigint[], c_tokens text[], c_visibility_ms bigint,
    l_kinds "char"[], l_parts integer[], l_epochs bigint[], l_ticks bigint[], l_offsets bigint[],
    l_slots integer[], l_attempts integer[], l_delays_ms bigint[], l_errors text[],
    l_origins text[], l_claimed boolean[],
    k_kinds "char"[], k_ids bigint[], k_parts integer[], k_epochs bigint[], k_delays_ms bigint[],
    k_errors text[]
) RETURNS TABLE (what "char", partition integer, ref bigint, ok boolean, info bigint)
-- Every statement here is driven by the round's items: a lookup per item by index is right
-- at any size, while scans of the parked queue look cheaper to a planner without statistics.
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg SET jit = off
SET enable_seqscan = off SET enable_bitmapscan = off AS $$
#variable_conflict use_column
DECLARE
    g      pgcg.groups;
    t      pgcg.topics;
    parts  integer[];
    epochs bigint[];
    owned_p integer[];
    owned_e bigint[];
    start_p integer[];
    r      record;
    pid    bigint;
    -- What this call parked: (partition, offset) -> parked id.
    park_p integer[] := '{}';
    park_o bigint[] := '{}';
    park_id bigint[] := '{}';
BEGIN
    SELECT * INTO STRICT g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.name = g.topic;
    SELECT array_agg(x.p ORDER BY x.p), array_agg(x.e ORDER BY x.p) INTO parts, epochs FROM (
        SELECT DISTINCT w.p, w.e FROM (
            SELECT * FROM unnest(m_parts, m_epochs) UNION ALL
            SELECT * FROM unnest(c_parts, c_epochs) UNION ALL
            SELECT * FROM unnest(l_parts, l_epochs) UNION ALL
            SELECT * FROM unnest(k_parts, k_epochs)) AS w(p, e)) AS x;
    IF parts IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(o.partition), array_agg(o.epoch),
           array_agg(o.partition) FILTER (WHERE o.startable)
    INTO owned_p, owned_e, start_p
    FROM pgcg.owned(p_group, p_member, parts, epochs) AS o;
    owned_p := coalesce(owned_p, '{}'); owned_e := coalesce(owned_e, '{}');
    start_p := coalesce(start_p, '{}');

    -- Marks: one ledger row per partition, in the slot of the round's newest message.
    INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets)
    SELECT (array_agg(m.s ORDER BY m.t DESC, m.o DESC))[1], g.id, m.p, 'm', g.seek_gen, m.e,
           max(m.t), array_agg(m.o)
    FROM unnest(m_parts, m_epochs, m_ticks, m_offsets, m_slots) AS m(p, e, t, o, s)
    WHERE m.p = ANY (start_p)
    GROUP BY m.p, m.e;
    RETURN QUERY SELECT DISTINCT 'm'::"char", m.p, m.p::bigint, m.p = ANY (start_p), NULL::bigint
                 FROM unnest(m_parts) AS m(p);

    -- Claims of parked messages: count the delivery before it runs.
    RETURN QUERY
    WITH claimed AS (
        UPDATE pgcg.parked AS pk
        SET attempts = pk.attempts + CASE WHEN pk.claim_token = c.tok THEN 0 ELSE 1 END,
            claimed_epoch = c.e, claim_token = c.tok, claimed_by = p_member,
            locked_until = clock_timestamp() + c_visibility_ms * interval '1 millisecond',
            progress = NULL
        FROM unnest(c_ids, c_parts, c_epochs, c_tokens) AS c(id, p, e, tok)
        -- The claimed rows by primary key, whatever the statistics: without them the
        -- planner takes `group_id =` for selective and reads the group's whole parked
        -- queue through another index (IS NOT DISTINCT FROM is no index condition).
        WHERE pk.id = c.id AND pk.group_id IS NOT DISTINCT FROM g.id AND pk.partition = c.p
          AND c.p = ANY (start_p)
          -- A claim past its deadline is abandoned (see load_parked): claimed again.
          AND (pk.claimed_epoch IS NULL OR pk.claim_token = c.tok
               OR pk.locked_until < clock_timestamp())
        RETURNING pk.id, pk.partition, pk.attempts
    )
    SELECT 'c'::"char", c.p, c.id, cl.id IS NOT NULL, cl.attempts::bigint
    FROM unnest(c_ids, c_parts) AS c(id, p) LEFT JOIN claimed AS cl ON cl.id = c.id;

    -- Log results. Parked and dead-lettered messages are copies of the log rows.
    FOR r IN
        SELECT x.*, lr.txid, lr.enqueued_at, lr.key, lr.payload, lr.headers, lr.dedup_key
        FROM unnest(l_kinds, l_parts, l_epochs, l_ticks, l_offsets, l_attempts, l_delays_ms,
                    l_errors, l_origins, l_claimed)
             WITH ORDINALITY AS x(kind, p, e, tk, o, att, delay, err, origin, claimed, ord)
        JOIN pgcg.log_rows(t.name,
                           ARRAY(SELECT y.p FROM unnest(l_kinds, l_parts, l_offsets) AS y(k, p, o)
                                 WHERE y.k <> 'd'),
                           ARRAY(SELECT y.o FROM unnest(l_kinds, l_parts, l_offsets) AS y(k, p, o)
                                 WHERE y.k <> 'd')) AS lr
          ON lr.partition = x.p AND lr."offset" = x.o
        WHERE x.kind <> 'd' AND (x.p, x.e) IN (SELECT * FROM unnest(owned_p, owned_e))
        ORDER BY x.ord  -- a key's parked messages get ids in the key's order
    LOOP
        IF r.kind = 'p' THEN
            INSERT INTO pgcg.parked AS pk (group_id, partition, gen, "offset", tick, key, payload,
                                     headers, dedup_key, enqueued_at, available_at, attempts,
                                     last_error, origin, claimed_epoch, claimed_by, locked_until)
            VALUES (g.id, r.p, g.seek_gen, r.o, r.tk, r.key, r.payload, r.headers, r.dedup_key,
                    r.enqueued_at, clock_timestamp() + r.delay * interval '1 millisecond',
                    r.att, r.err, r.origin,
                    CASE WHEN r.claimed THEN r.e END, CASE WHEN r.claimed THEN p_member END,
                    CASE WHEN r.claimed THEN clock_timestamp() + c_visibility_ms * interval '1 millisecond' END)
            ON CONFLICT (group_id, partition, "offset", gen) DO NOTHING
            RETURNING pk.id INTO pid;
            IF pid IS NOT NULL THEN
                park_p := park_p || r.p; park_o := park_o || r.o; park_id := park_id || pid;
            END IF;
        ELSE
            PERFORM pgcg.bury(p_group, t.name, p_member, r.p, r.o, r.key, r.payload, r.headers,
                              r.dedup_key, r.enqueued_at, r.att, r.err, r.err);
        END IF;
    END LOOP;
    INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets, parked)
    SELECT (array_agg(x.s ORDER BY x.t DESC, x.o DESC))[1], g.id, x.p, 'd', g.seek_gen, x.e,
           max(x.t), array_agg(x.o), x.k = 'p'
    FROM unnest(l_kinds, l_parts, l_epochs, l_ticks, l_offsets, l_slots) AS x(k, p, e, t, o, s)
    WHERE (x.p, x.e) IN (SELECT * FROM unnest(owned_p, owned_e))
    GROUP BY x.p, x.e, x.k = 'p';
    -- The parked ids come from the inserts above; only a park written by an earlier call
    -- (its reply was lost) is looked up. Without statistics the planner cannot tell the
    -- unique index from the parked queue's other (group, partition) indexes.
    RETURN QUERY
    SELECT 'l'::"char", x.p, x.o, (x.p, x.e) IN (SELECT * FROM unnest(owned_p, owned_e)),
           CASE WHEN x.k = 'p' THEN coalesce(n.id, (
               SELECT pk.id FROM pgcg.parked AS pk
               WHERE pk.group_id = g.id AND pk.partition = x.p
                 AND pk."offset" = x.o AND pk.gen = g.seek_gen)) END
    FROM unnest(l_kinds, l_parts, l_epochs, l_offsets) AS x(k, p, e, o)
    LEFT JOIN unnest(park_p, park_o, park_id) AS n(p, o, id) ON n.p = x.p AND n.o = x.o;

    -- Parked results, each only under the epoch that claimed it.
    FOR r IN
        SELECT x.*, pk.id AS pid, pk.key, pk."offset" AS o, pk.payload, pk.headers,
               pk.dedup_key, pk.enqueued_at, pk.attempts
        FROM unnest(k_kinds, k_ids, k_parts, k_epochs, k_delays_ms, k_errors)
             AS x(kind, id, p, e, delay, err)
        -- By primary key, as the claims; `= ANY` too, or a join reads the whole primary key.
        LEFT JOIN pgcg.parked AS pk
               ON pk.id = x.id AND pk.id = ANY (k_ids) AND pk.group_id IS NOT DISTINCT FROM g.id
              AND pk.partition = x.p AND pk.claimed_epoch = x.e
              AND (x.p, x.e) IN (SELECT * FROM unnest(owned_p, owned_e))
    LOOP
        IF r.pid IS NOT NULL AND r.kind = 'r' THEN
            UPDATE pgcg.parked AS pk
            SET available_at = clock_timestamp() + r.delay * interval '1 millisecond',
                last_error = r.err, claimed_epoch = NULL, claim_token = NULL, claimed_by = NULL,
                locked_until = NULL, progress = NULL
            WHERE pk.id = r.pid;
        ELSIF r.pid IS NOT NULL THEN
            DELETE FROM pgcg.parked AS pk WHERE pk.id = r.pid;
            IF r.kind = 'x' THEN
                PERFORM pgcg.bury(p_group, t.name, p_member, r.p, r.o, r.key, r.payload,
                                  r.headers, r.dedup_key, r.enqueued_at, r.attempts, r.err, r.err);
            END IF;
        END IF;
        -- A result whose row is already gone while we own the partition at that epoch was
        -- written before (its reply was lost): done.
        what := 'k'; partition := r.p; ref := r.id;
        ok := (r.p, r.e) IN (SELECT * FROM unnest(owned_p, owned_e));
        info := CASE WHEN r.pid IS NULL THEN NULL ELSE (
            SELECT count(*) FROM pgcg.parked AS q
            WHERE q.group_id = g.id AND q.partition = r.p
              AND hashtextextended(q.key, 0) = hashtextextended(r.key, 0) AND q.key = r.key) END;
        RETURN NEXT;
    END LOOP;
END $$;

-- Parked messages a member can start soon: the due (or soon due) first message of each
-- parked key of these partitions, and up to `p_followers` of the key's next ones, leaving
-- out the ids it already holds (`p_held`); for keys it names in `p_refill_keys`, more of
-- the key after the id it names. Read only.
CREATE FUNCTION pgcg.load_parked(p_group text, p_partitions integer[], p_held bigint[],
                                 p_lookahead_ms bigint, p_limit integer, p_followers integer,
                                 p_refill_keys text[], p_refill_after bigint[],
                                 p_refill_parts integer[])
RETURNS TABLE (id bigint, partition integer, tick bigint, "offset" bigint, key text,
               payload jsonb, headers jsonb, dedup_key text, enqueued_at timestamptz,
               attempts integer, due_in_ms bigint, origin text, bytes integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgcg SET jit = off AS $$
    WITH g AS (SELECT gr.id FROM pgcg.groups AS gr WHERE gr.group_name = p_group),
    heads AS (
        SELECT pk.* FROM pgcg.parked AS pk, g
        WHERE pk.group_id = g.id AND pk.partition = ANY (p_partitions)
          -- Computed once (an InitPlan), so it bounds the scan of parked_due.
          AND pk.available_at <= (SELECT clock_timestamp() + p_lookahead_ms * interval '1 millisecond')
          AND pk.id <> ALL (p_held)
          -- Unclaimed, or claimed by a delivery past its deadline: its handler was
          -- cancelled by then, unless it reported progress (which moves the deadline). A
          -- member that lost a partition by its lease and got it back under the same epoch
          -- abandoned its claims there, and no adopt would ever release them.
          AND (pk.claimed_epoch IS NULL OR pk.locked_until < clock_timestamp())
          -- The first of its key: one probe of parked_key in id order (as a NOT EXISTS, the
          -- planner may hash the whole queue, or read a partition's rows for each message).
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

-- Progress reports of running parked handlers (the consumer parks a message once its
-- handler reports progress): written fenced like a result, and each moves the handler's
-- deadline. Returns the partitions of the batch still owned.
CREATE FUNCTION pgcg.report_progress(p_group text, p_member text, p_ids bigint[],
                                     p_parts integer[], p_epochs bigint[],
                                     p_percents float8[], p_texts text[], p_visibility_ms bigint)
RETURNS TABLE (partition integer, epoch bigint)
-- Lookups by id (see settle).
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg SET enable_seqscan = off
SET enable_bitmapscan = off AS $$
#variable_conflict use_column
DECLARE
    g pgcg.groups;
    -- One reading of the clock: the deadline is exactly the visibility after the report.
    v_at timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO STRICT g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    RETURN QUERY
    WITH owned AS (SELECT * FROM pgcg.owned(p_group, p_member, p_parts, p_epochs)),
    written AS (
        UPDATE pgcg.parked AS pk
        SET progress = jsonb_build_object('percent', b.pct, 'text', b.txt, 'at', v_at),
            locked_until = v_at + p_visibility_ms * interval '1 millisecond'
        FROM unnest(p_ids, p_parts, p_epochs, p_percents, p_texts) AS b(id, p, e, pct, txt)
        JOIN owned AS o ON o.partition = b.p AND o.epoch = b.e
        -- By primary key, whatever the statistics (see settle's claims).
        WHERE pk.id = b.id AND pk.group_id IS NOT DISTINCT FROM g.id
          AND pk.claimed_epoch = b.e
        RETURNING pk.id
    )
    SELECT DISTINCT o.partition, o.epoch FROM owned AS o
    WHERE (SELECT count(*) FROM written) >= 0;
END $$;

-- The owner moves the group's position (never backwards).
CREATE FUNCTION pgcg.save_position(p_group text, p_member text, p_parts integer[],
                                   p_epochs bigint[], p_ticks bigint[])
RETURNS TABLE (partition integer)
LANGUAGE sql SET search_path = pg_catalog, pgcg AS $$
    WITH owned AS (SELECT * FROM pgcg.owned(p_group, p_member, p_parts, p_epochs))
    UPDATE pgcg.group_progress AS gp
    SET tick = greatest(gp.tick, w.t), updated_at = now()
    FROM unnest(p_parts, p_epochs, p_ticks) AS w(p, e, t)
    JOIN owned AS o ON o.partition = w.p AND o.epoch = w.e
    WHERE gp.group_id = (SELECT gr.id FROM pgcg.groups AS gr WHERE gr.group_name = p_group)
      AND gp.partition = w.p AND gp.gen = (SELECT gr.seek_gen FROM pgcg.groups AS gr
                                           WHERE gr.group_name = p_group)
    RETURNING gp.partition
$$;

-- Hand revoked (or, on leave, all) partitions on: to the target the leader chose, else to
-- nobody, with the epoch bumped either way; the final position is saved with it, and
-- `clean` says nothing of this epoch is still running there (the next owner then charges
-- nothing). A release of revoked partitions does not hand on one whose revocation the
-- leader called off meanwhile (`p_revoked_only`).
CREATE FUNCTION pgcg.release(p_group text, p_member text, p_parts integer[], p_epochs bigint[],
                             p_ticks bigint[], p_clean boolean[], p_revoked_only boolean)
RETURNS TABLE (partition integer, epoch bigint, new_owner text, old_epoch bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
#variable_conflict use_column
DECLARE
    g pgcg.groups;
BEGIN
    SELECT * INTO STRICT g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    -- Locked in partition order, as everywhere.
    PERFORM FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = p_group AND pa.topic = g.topic AND pa.partition = ANY (p_parts)
      AND pa.member_id = p_member
    ORDER BY pa.partition FOR UPDATE;
    RETURN QUERY
    WITH released AS (
        UPDATE pgcg.partition_assignments AS pa
        SET member_id = pa.target_member_id,
            state = CASE WHEN pa.target_member_id IS NULL THEN 'unassigned' ELSE 'assigned' END,
            epoch = pa.epoch + 1, target_member_id = NULL, revoke_deadline = NULL,
            assigned_at = now()
        FROM unnest(p_parts, p_epochs) AS r(p, e)
        WHERE pa.group_name = p_group AND pa.topic = g.topic AND pa.partition = r.p
          AND pa.epoch = r.e AND pa.member_id = p_member
          AND (NOT p_revoked_only OR pa.state = 'revoking')
        RETURNING pa.partition, pa.epoch, pa.member_id, r.e AS old_epoch
    ), saved AS (
        UPDATE pgcg.group_progress AS gp
        SET tick = greatest(gp.tick, w.t),
            clean_epoch = CASE WHEN w.clean THEN rl.old_epoch ELSE gp.clean_epoch END,
            updated_at = now()
        FROM released AS rl JOIN unnest(p_parts, p_ticks, p_clean) AS w(p, t, clean)
             ON w.p = rl.partition
        WHERE gp.group_id = g.id AND gp.partition = rl.partition AND gp.gen = g.seek_gen
        RETURNING 1
    )
    SELECT rl.partition, rl.epoch, rl.member_id, rl.old_epoch FROM released AS rl
    WHERE (SELECT count(*) FROM saved) >= 0
    ORDER BY rl.partition;
    IF FOUND THEN
        PERFORM pg_notify('pgcg.g.' || p_group, 'assignment');
        PERFORM pg_notify('pgcg.coordinator', json_build_object(
            'group', p_group, 'event', 'release', 'member', p_member)::text);
    END IF;
END $$;

-- The completion of a transactional handler, inside its own transaction right before
-- COMMIT: fenced FOR SHARE like every result, so an epoch bump either waits for this
-- commit or has already happened and nothing matches (the caller then rolls back). A log
-- message's completion is its own ledger row under a unique index: two handlings of one
-- message can never both commit. A parked message's completion deletes its row.
CREATE FUNCTION pgcg.tx_complete(p_group text, p_member text, p_partition integer,
                                 p_epoch bigint, p_tick bigint, p_offset bigint, p_slot integer,
                                 p_parked_id bigint)
RETURNS TABLE (owned boolean, completed boolean, parked_left bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
#variable_conflict use_column
DECLARE
    g pgcg.groups;
    n integer;
    k text;
BEGIN
    SELECT * INTO STRICT g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    IF NOT EXISTS (SELECT FROM pgcg.owned(p_group, p_member, ARRAY[p_partition], ARRAY[p_epoch])) THEN
        RETURN QUERY SELECT false, false, NULL::bigint;
        RETURN;
    END IF;
    IF p_parked_id IS NOT NULL THEN
        DELETE FROM pgcg.parked AS pk
        WHERE pk.id = p_parked_id AND pk.group_id = g.id AND pk.claimed_epoch = p_epoch
        RETURNING pk.key INTO k;
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN QUERY SELECT true, n > 0, (
            SELECT count(*) FROM pgcg.parked AS q
            WHERE q.group_id = g.id AND q.partition = p_partition
              AND hashtextextended(q.key, 0) = hashtextextended(k, 0) AND q.key = k);
        RETURN;
    END IF;
    INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, "offset")
    VALUES (p_slot, g.id, p_partition, 'd', g.seek_gen, p_epoch, p_tick, p_offset)
    ON CONFLICT (group_id, partition, "offset", gen, slot) WHERE "offset" IS NOT NULL
    DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY SELECT true, n > 0, NULL::bigint;
END $$;

-- Groups ------------------------------------------------------------------------------------

-- A tick taken now, whatever the interval, for positions that must start here (a group
-- created at `latest`, a seek): waits for the tick lock, and lists the caller's own
-- transaction as running.
CREATE FUNCTION pgcg.tick_now(p_topic_id integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    t pgcg.topics;
    had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
    snap pg_snapshot;
    offs bigint[];
    made bigint;
BEGIN
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.id = p_topic_id;
    PERFORM pg_advisory_xact_lock(pgcg.tick_lock(), p_topic_id);
    -- Snapshot, offsets, xid: in that order (see pgcg.ticks). An xid taken before the
    -- offsets were read says nothing about who drew them: none is recorded then.
    snap := pgcg.snapshot_excluding_self();
    offs := pgcg.topic_offsets(t.offset_seqs);
    INSERT INTO pgcg.ticks (topic_id, tick, snapshot, offsets, xid, at)
    VALUES (p_topic_id, nextval('pgcg.tick_seq'), snap, offs,
            CASE WHEN had_xid THEN NULL ELSE pg_current_xact_id() END, clock_timestamp())
    RETURNING tick INTO made;
    RETURN made;
END $$;

-- Where a position `p_from` starts ('earliest', 'latest', or an ISO timestamp): the
-- tick before the first message to handle. Holds the topic's maintenance lock, so no
-- reclaim can remove what it points at before the caller commits.
CREATE FUNCTION pgcg.start_tick(p_topic_id integer, p_from text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    earliest bigint;
    at_ts timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(pgcg.maint_lock(), p_topic_id);
    SELECT min(s.first_tick) INTO earliest FROM pgcg.segments AS s
    WHERE s.topic_id = p_topic_id AND s.reclaimed_at IS NULL;
    IF p_from = 'earliest' THEN
        RETURN earliest;
    ELSIF p_from = 'latest' THEN
        RETURN pgcg.tick_now(p_topic_id);
    END IF;
    BEGIN
        at_ts := p_from::timestamptz;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'invalid start %: use earliest, latest or a timestamp', p_from
            USING ERRCODE = 'PGC03';
    END;
    RETURN greatest(earliest, coalesce(
        (SELECT max(k.tick) FROM pgcg.ticks AS k
         WHERE k.topic_id = p_topic_id AND k.at <= at_ts), earliest));
END $$;

-- Create a group of a topic, positioned at `p_from`; false if it exists (on the same
-- topic). A group that is joined before it is created starts at the earliest message.
CREATE FUNCTION pgcg.create_group(p_name text, p_topic text, p_from text DEFAULT 'earliest')
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
DECLARE
    t pgcg.topics;
    new_id integer;
    start bigint;
    existing text;
BEGIN
    SELECT * INTO t FROM pgcg.topics AS tp WHERE tp.name = p_topic;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown topic %', p_topic USING ERRCODE = 'PGC01',
            HINT = 'Create it first: pgcg topic create <name>';
    END IF;
    INSERT INTO pgcg.groups (group_name, topic) VALUES (p_name, p_topic)
    ON CONFLICT (group_name) DO NOTHING RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        SELECT gr.topic INTO existing FROM pgcg.groups AS gr WHERE gr.group_name = p_name;
        IF existing <> p_topic THEN
            RAISE EXCEPTION 'group % consumes topic %, not %', p_name, existing, p_topic
                USING ERRCODE = 'PGC08',
                      HINT = 'A group consumes one topic; use another group name.';
        END IF;
        RETURN false;
    END IF;
    start := pgcg.start_tick(t.id, p_from);
    INSERT INTO pgcg.group_progress (group_id, partition, tick)
    SELECT new_id, p, start FROM generate_series(0, t.partitions - 1) AS p;
    INSERT INTO pgcg.partition_assignments (group_name, topic, partition)
    SELECT p_name, p_topic, p FROM generate_series(0, t.partitions - 1) AS p;
    RETURN true;
END $$;

-- Delete a group and everything only it held: its position, parked messages, assignments
-- and leadership (dead letters stay, under its name, until purged). Refuses while it has
-- members unless forced.
CREATE FUNCTION pgcg.delete_group(p_name text, p_force boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM FROM pgcg.groups AS gr WHERE gr.group_name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF NOT p_force AND EXISTS (SELECT FROM pgcg.consumer_groups AS cg WHERE cg.group_name = p_name) THEN
        RAISE EXCEPTION 'group % has live members', p_name USING ERRCODE = 'PGC09',
            HINT = 'Stop its consumers first, or force the deletion (they will be expelled).';
    END IF;
    DELETE FROM pgcg.consumer_groups AS cg WHERE cg.group_name = p_name;
    DELETE FROM pgcg.partition_assignments AS pa WHERE pa.group_name = p_name;
    DELETE FROM pgcg.coordinator_leader AS cl WHERE cl.scope = p_name;
    DELETE FROM pgcg.groups AS gr WHERE gr.group_name = p_name;
    PERFORM pg_notify('pgcg.g.' || p_name, 'assignment');
    RETURN true;
END $$;

-- Move a group's position (Kafka's reset-offsets), safe while members run: fenced like any
-- change of ownership (every assignment row locked FOR UPDATE and its epoch bumped, so the
-- owners drop their partitions and adopt them again at the new position). `p_to` is
-- 'earliest', 'latest', a timestamp, or '<partition>:<id>' (resume that partition with that
-- message). The group's parked messages go (they are read again, or skipped). Returns, per
-- partition moved, the new position and how many parked messages were dropped.
CREATE FUNCTION pgcg.seek_group(p_name text, p_to text)
RETURNS TABLE (partition integer, tick bigint, dropped bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
#variable_conflict use_column
DECLARE
    g pgcg.groups;
    t pgcg.topics;
    only_p integer;
    msg_offset bigint;
    target bigint;
    before bigint;
    row_txid xid8;
    snap_a pg_snapshot;
    snap_b pg_snapshot;
    skipped bigint[];
BEGIN
    SELECT * INTO g FROM pgcg.groups AS gr WHERE gr.group_name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown group %', p_name USING ERRCODE = 'PGC04';
    END IF;
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.name = g.topic;
    PERFORM FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = p_name ORDER BY pa.partition FOR UPDATE;
    IF p_to ~ '^\d+:\d+$' THEN
        only_p := split_part(p_to, ':', 1)::integer;
        msg_offset := split_part(p_to, ':', 2)::bigint / 1024;
        IF only_p >= t.partitions OR split_part(p_to, ':', 2)::bigint % 1024 <> only_p THEN
            RAISE EXCEPTION 'message % is not in partition % of topic %', split_part(p_to, ':', 2),
                only_p, t.name USING ERRCODE = 'PGC03';
        END IF;
        SELECT lr.txid INTO row_txid FROM pgcg.log_rows(t.name, ARRAY[only_p], ARRAY[msg_offset]) AS lr;
        IF row_txid IS NULL THEN
            RAISE EXCEPTION 'message % of topic % is not retained', split_part(p_to, ':', 2), t.name
                USING ERRCODE = 'PGC03';
        END IF;
        PERFORM pg_advisory_xact_lock(pgcg.maint_lock(), t.id);
        SELECT min(k.tick) INTO target FROM pgcg.ticks AS k
        WHERE k.topic_id = t.id AND pg_visible_in_snapshot(row_txid, k.snapshot);
        IF target IS NULL THEN
            target := pgcg.tick_now(t.id);
        END IF;
        SELECT max(k.tick) INTO before FROM pgcg.ticks AS k WHERE k.topic_id = t.id AND k.tick < target;
        SELECT k.snapshot INTO snap_a FROM pgcg.ticks AS k WHERE k.topic_id = t.id AND k.tick = before;
        SELECT k.snapshot INTO snap_b FROM pgcg.ticks AS k WHERE k.topic_id = t.id AND k.tick = target;
        -- The messages of that batch before it count as finished.
        EXECUTE format('SELECT array_agg(l."offset") FROM pgcg.%I AS l WHERE l.partition = $1 '
                       'AND l."offset" < $2 AND pg_visible_in_snapshot(l.txid, $3) '
                       'AND NOT pg_visible_in_snapshot(l.txid, $4)', 'log_' || t.name)
        INTO skipped USING only_p, msg_offset, snap_b, snap_a;
    ELSE
        before := pgcg.start_tick(t.id, p_to);
    END IF;
    UPDATE pgcg.groups AS gr SET seek_gen = gr.seek_gen + 1 WHERE gr.id = g.id;
    IF skipped IS NOT NULL THEN
        INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets)
        VALUES (pgcg.slot_of(t.id, coalesce(pg_sequence_last_value(t.segment_seq), 0), t.segments),
                g.id, only_p, 'd', g.seek_gen + 1, 0, target, skipped);
    END IF;
    UPDATE pgcg.partition_assignments AS pa SET epoch = pa.epoch + 1
    WHERE pa.group_name = p_name AND (only_p IS NULL OR pa.partition = only_p);
    RETURN QUERY
    WITH dropped AS (
        DELETE FROM pgcg.parked AS pk
        WHERE pk.group_id = g.id AND (only_p IS NULL OR pk.partition = only_p)
        RETURNING pk.partition
    ), moved AS (
        UPDATE pgcg.group_progress AS gp
        SET tick = before, gen = g.seek_gen + 1, charged_epoch = 0, clean_epoch = 0,
            updated_at = now()
        WHERE gp.group_id = g.id AND (only_p IS NULL OR gp.partition = only_p)
        RETURNING gp.partition
    )
    SELECT m.partition, before, (SELECT count(*) FROM dropped AS d WHERE d.partition = m.partition)
    FROM moved AS m ORDER BY m.partition;
    -- Partitions the seek did not move keep counting: their gen moves with the group's.
    UPDATE pgcg.group_progress AS gp SET gen = g.seek_gen + 1
    WHERE gp.group_id = g.id AND gp.gen = g.seek_gen;
    PERFORM pg_notify('pgcg.g.' || p_name, 'assignment');
END $$;

-- Lag per partition without counting: the partition's last offset minus the one recorded
-- in the tick at the group's position (exact when no producer transaction is open), and
-- how long ago the first batch after the position became visible.
CREATE FUNCTION pgcg.group_lag(p_name text)
RETURNS TABLE (partition integer, lag bigint, age_s float8, position_tick bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pgcg AS $$
    SELECT gp.partition,
           greatest(0, coalesce(pg_sequence_last_value(t.offset_seqs[gp.partition + 1]), -1)
                       - coalesce(k.offsets[gp.partition + 1], -1)) AS lag,
           CASE WHEN coalesce(pg_sequence_last_value(t.offset_seqs[gp.partition + 1]), -1)
                     > coalesce(k.offsets[gp.partition + 1], -1)
                -- With no tick after the position yet (no consumer has read since), the
                -- first message after it: its age grows while nobody reads.
                THEN greatest(0, extract(epoch FROM clock_timestamp() - coalesce(
                         (SELECT n.at FROM pgcg.ticks AS n
                          WHERE n.topic_id = t.id AND n.tick > gp.tick
                          ORDER BY n.tick LIMIT 1),
                         (SELECT l.enqueued_at FROM pgcg.log AS l
                          WHERE l.slot >= t.id * 64 AND l.slot < t.id * 64 + 64
                            AND l.partition = gp.partition
                            AND l."offset" > coalesce(k.offsets[gp.partition + 1], -1)
                          ORDER BY l."offset" LIMIT 1),
                         clock_timestamp()))::float8)
                ELSE 0 END AS age_s,
           gp.tick
    FROM pgcg.groups AS g
    JOIN pgcg.topics AS t ON t.name = g.topic
    JOIN pgcg.group_progress AS gp ON gp.group_id = g.id
    LEFT JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
    WHERE g.group_name = p_name
    ORDER BY gp.partition
$$;

-- Retention ---------------------------------------------------------------------------------

-- One round of a topic's upkeep, by one caller at a time (the others return at once).
-- Returns what it did, for the caller's log: ('switched', seq), ('sealed', seq),
-- ('reclaimed', seq), ('held', seq, group, partition), ('lost', seq, group, partition, n),
-- ('busy', seq), ('rotating', seq), ('trimmed', ticks). A rotation is prepared by one
-- round and switched to by the next: the new segment's row must be committed before any
-- producer can be pointed at it.
CREATE FUNCTION pgcg.maintain(p_topic text)
RETURNS TABLE (event text, seq bigint, group_name text, partition integer, n bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg SET jit = off AS $$
#variable_conflict use_column
DECLARE
    t       pgcg.topics;
    cur     bigint;
    s       pgcg.segments;
    st      bigint;
    slot_t  text;
    led_t   text;
    due     boolean;
    hard    boolean;
    b       record;
    holders integer;
    size_all bigint;
    min_tick bigint;
BEGIN
    SELECT * INTO t FROM pgcg.topics AS tp WHERE tp.name = p_topic;
    IF NOT FOUND OR NOT pg_try_advisory_xact_lock(pgcg.maint_lock(), t.id) THEN
        RETURN;
    END IF;
    cur := coalesce(pg_sequence_last_value(t.segment_seq), 0);

    -- Switch to a segment prepared by an earlier round.
    IF EXISTS (SELECT FROM pgcg.segments AS sg WHERE sg.topic_id = t.id AND sg.seq = cur + 1) THEN
        PERFORM setval(t.segment_seq, cur + 1);
        cur := cur + 1;
        RETURN QUERY SELECT 'switched', cur, NULL::text, NULL::integer, NULL::bigint;
    END IF;

    -- Seal: no producer of an older segment is still running once its slot's lock is ours.
    FOR s IN SELECT * FROM pgcg.segments AS sg
             WHERE sg.topic_id = t.id AND sg.seq < cur AND sg.sealed_at IS NULL ORDER BY sg.seq LOOP
        EXIT WHEN NOT pg_try_advisory_xact_lock(pgcg.slot_lock(), pgcg.slot_of(t.id, s.seq, t.segments));
        UPDATE pgcg.segments AS sg SET sealed_at = clock_timestamp(), seal_xid = pg_current_xact_id()
        WHERE sg.topic_id = t.id AND sg.seq = s.seq;
        RETURN QUERY SELECT 'sealed', s.seq, NULL::text, NULL::integer, NULL::bigint;
    END LOOP;

    -- Reclaim the oldest segment once sealed, no group needs it, and retention allows.
    SELECT * INTO s FROM pgcg.segments AS sg
    WHERE sg.topic_id = t.id AND sg.reclaimed_at IS NULL AND sg.seq < cur
    ORDER BY sg.seq LIMIT 1;
    IF FOUND AND s.sealed_at IS NOT NULL THEN
        st := coalesce(s.sealed_tick, (
            SELECT min(k.tick) FROM pgcg.ticks AS k
            WHERE k.topic_id = t.id AND pg_snapshot_xmax(k.snapshot) > s.seal_xid));
        IF st IS NULL AND s.sealed_at < clock_timestamp() - t.tick_interval_ms * interval '1 millisecond' THEN
            -- Ticks come from fetches: on a topic nobody reads, take the one the seal waits
            -- for here (a seal of this same transaction is too recent to get one).
            PERFORM pgcg.tick_now(t.id);
            st := (SELECT min(k.tick) FROM pgcg.ticks AS k
                   WHERE k.topic_id = t.id AND pg_snapshot_xmax(k.snapshot) > s.seal_xid);
        END IF;
        IF st IS NOT NULL AND s.sealed_tick IS NULL THEN
            UPDATE pgcg.segments AS sg SET sealed_tick = st WHERE sg.topic_id = t.id AND sg.seq = s.seq;
        END IF;
        slot_t := 'log_' || t.name || '_' || (s.seq % t.segments);
        led_t := 'ledger_' || t.name || '_' || (s.seq % t.segments);
        SELECT sum(pg_total_relation_size(c.oid)) INTO size_all
        FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = format('pgcg.%I', 'log_' || t.name)::regclass;
        due := s.sealed_at + t.retention_ms * interval '1 millisecond' < clock_timestamp()
               OR size_all > t.retention_bytes;
        hard := s.sealed_at + t.hard_retention_ms * interval '1 millisecond' < clock_timestamp()
                OR size_all > t.hard_retention_bytes;
        IF st IS NOT NULL AND (due OR hard) THEN
            holders := 0;
            -- A group still needs the segment in a partition when its position is before the
            -- seal and the segment has a row there it has not passed.
            FOR b IN
                SELECT g.id AS gid, g.group_name AS gname, gp.partition AS p, gp.tick AS ptick,
                       k.offsets[gp.partition + 1] AS po, k.snapshot AS psnap
                FROM pgcg.groups AS g
                JOIN pgcg.group_progress AS gp ON gp.group_id = g.id
                JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gp.tick
                WHERE g.topic = t.name AND gp.tick < st
            LOOP
                EXECUTE format(
                    'SELECT count(*) FROM pgcg.%I AS l WHERE l.partition = $1 AND '
                    '(l."offset" > $2 OR NOT pg_visible_in_snapshot(l.txid, $3))', slot_t)
                INTO n USING b.p, b.po, b.psnap;
                CONTINUE WHEN n = 0;
                holders := holders + 1;
                IF hard THEN
                    INSERT INTO pgcg.group_losses (group_id, partition, lost, seq)
                    VALUES (b.gid, b.p, n, s.seq);
                    UPDATE pgcg.group_progress AS gp SET tick = greatest(gp.tick, st)
                    WHERE gp.group_id = b.gid AND gp.partition = b.p;
                    RETURN QUERY SELECT 'lost', s.seq, b.gname, b.p, n;
                ELSE
                    RETURN QUERY SELECT 'held', s.seq, b.gname, b.p, n;
                END IF;
            END LOOP;
            IF holders = 0 OR hard THEN
                BEGIN
                    SET LOCAL lock_timeout = '100ms';
                    EXECUTE format('TRUNCATE pgcg.%I, pgcg.%I', slot_t, led_t);
                    UPDATE pgcg.segments AS sg SET reclaimed_at = clock_timestamp()
                    WHERE sg.topic_id = t.id AND sg.seq = s.seq;
                    RETURN QUERY SELECT 'reclaimed', s.seq, NULL::text, NULL::integer, NULL::bigint;
                EXCEPTION WHEN lock_not_available THEN
                    RETURN QUERY SELECT 'busy', s.seq, NULL::text, NULL::integer, NULL::bigint;
                END;
                SET LOCAL lock_timeout = 0;
            END IF;
        END IF;
    END IF;

    -- Prepare the next segment when the current one is old or big enough and its slot free.
    SELECT * INTO s FROM pgcg.segments AS sg WHERE sg.topic_id = t.id AND sg.seq = cur;
    IF FOUND AND (
        s.created_at + greatest(t.retention_ms / (t.segments - 2), 1000) * interval '1 millisecond'
            < clock_timestamp()
        OR pg_total_relation_size(format('pgcg.%I', 'log_' || t.name || '_' || (cur % t.segments))::regclass)
            > t.segment_bytes)
       AND NOT EXISTS (SELECT FROM pgcg.segments AS sg
                       WHERE sg.topic_id = t.id AND sg.seq = cur + 1 - t.segments
                         AND sg.reclaimed_at IS NULL) THEN
        INSERT INTO pgcg.segments (topic_id, seq, first_tick)
        SELECT t.id, cur + 1, max(k.tick) FROM pgcg.ticks AS k WHERE k.topic_id = t.id;
        RETURN QUERY SELECT 'rotating', cur + 1, NULL::text, NULL::integer, NULL::bigint;
    END IF;

    -- Ticks no position and no retained segment needs; expired dedup digests.
    SELECT least(
        (SELECT min(gp.tick) FROM pgcg.group_progress AS gp JOIN pgcg.groups AS g ON g.id = gp.group_id
         WHERE g.topic = t.name),
        (SELECT min(sg.first_tick) FROM pgcg.segments AS sg
         WHERE sg.topic_id = t.id AND sg.reclaimed_at IS NULL),
        (SELECT max(k.tick) FROM pgcg.ticks AS k WHERE k.topic_id = t.id))
    INTO min_tick;
    DELETE FROM pgcg.ticks AS k WHERE k.topic_id = t.id AND k.tick < min_tick;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        RETURN QUERY SELECT 'trimmed', NULL::bigint, NULL::text, NULL::integer, n;
    END IF;
    DELETE FROM pgcg.dedup AS d WHERE d.topic_id = t.id AND d.expires_at < now();
    DELETE FROM pgcg.segments AS sg
    WHERE sg.topic_id = t.id AND sg.reclaimed_at < now() - interval '7 days';
END $$;

-- Dead letters ------------------------------------------------------------------------------

-- Replay dead letters of a group: each is enqueued again at the end of its topic's log, for
-- that group only (other groups skip it), bypassing the dedup window, keeping its headers
-- and dedup key; the dead letter is removed. Handled after the messages of its key
-- enqueued before the replay. Returns the new ids.
CREATE FUNCTION pgcg.replay_dead_letters(p_group text, p_ids bigint[])
RETURNS TABLE (dead_letter bigint, id bigint, partition integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
#variable_conflict use_column
DECLARE
    v_txid xid8 := pg_current_xact_id();
    g pgcg.groups;
    t pgcg.topics;
    v_slot integer;
BEGIN
    SELECT * INTO g FROM pgcg.groups AS gr WHERE gr.group_name = p_group;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown group %', p_group USING ERRCODE = 'PGC04';
    END IF;
    SELECT * INTO STRICT t FROM pgcg.topics AS tp WHERE tp.name = g.topic;
    v_slot := pgcg.write_slot(t);
    RETURN QUERY
    WITH picked AS (
        DELETE FROM pgcg.dead_letters AS d
        WHERE d.id IN (SELECT x.id FROM pgcg.dead_letters AS x
                       WHERE x.id = ANY (p_ids) AND x.group_name = p_group AND x.topic = t.name
                       ORDER BY x.id FOR UPDATE SKIP LOCKED)
        RETURNING d.*
    ), numbered AS (
        SELECT s.*, nextval(t.offset_seqs[s.partition + 1]) AS off
        FROM (SELECT pk.* FROM picked AS pk ORDER BY pk.id) AS s
    ), inserted AS (
        INSERT INTO pgcg.log (slot, partition, "offset", txid, enqueued_at, only_group,
                              key, payload, headers, dedup_key)
        SELECT v_slot, nb.partition, nb.off, v_txid, now(), g.id, nb.key, nb.payload,
               nullif(nb.headers, '{}'::jsonb), nb.dedup_key
        FROM numbered AS nb
    ), notified AS (
        SELECT pg_notify('pgcg.t.' || t.name, string_agg(DISTINCT nb.partition::text, ','))
        FROM numbered AS nb HAVING count(*) > 0
    )
    SELECT nb.id, nb.off * 1024 + nb.partition, nb.partition
    FROM numbered AS nb LEFT JOIN notified ON true ORDER BY nb.id;
END $$;

-- The upgrade of existing data -----------------------------------------------------------------

DO $$
DECLARE
    t pgcg.topics;
    g record;
    tick0 bigint;
BEGIN
    FOR t IN SELECT * FROM pgcg.topics ORDER BY id LOOP
        PERFORM pgcg.build_topic(t.id);
        SELECT * INTO t FROM pgcg.topics WHERE id = t.id;
        SELECT min(k.tick) INTO tick0 FROM pgcg.ticks AS k WHERE k.topic_id = t.id;
        -- Pending messages, in id order, as the first batch of the new log.
        CREATE TEMP TABLE moved ON COMMIT DROP AS
        SELECT m.id AS old_id, m.partition, nextval(t.offset_seqs[m.partition + 1]) AS off,
               m.key, m.payload, m.headers, m.dedup_key, m.enqueued_at, m.available_at,
               m.attempts, m.last_error
        FROM (SELECT * FROM pgcg.messages WHERE topic = t.name ORDER BY id) AS m;
        INSERT INTO pgcg.log (slot, partition, "offset", txid, enqueued_at, available_at, key,
                              payload, headers, dedup_key)
        SELECT pgcg.slot_of(t.id, 0, t.segments), mv.partition, mv.off, pg_current_xact_id(),
               mv.enqueued_at, CASE WHEN mv.available_at > now() THEN mv.available_at END,
               mv.key, mv.payload, nullif(mv.headers, '{}'::jsonb), mv.dedup_key
        FROM moved AS mv;
        FOR g IN SELECT * FROM pgcg.groups WHERE topic = t.name LOOP
            INSERT INTO pgcg.group_progress (group_id, partition, tick)
            SELECT g.id, p, tick0 FROM generate_series(0, t.partitions - 1) AS p;
            -- A key's messages from its first one that was retrying or delayed on: parked
            -- for the group, attempts kept (a key's parked messages come first).
            WITH firsts AS (
                SELECT mv.partition, mv.key, min(mv.old_id) AS from_id FROM moved AS mv
                WHERE mv.attempts > 0 OR mv.last_error IS NOT NULL OR mv.available_at > now()
                GROUP BY mv.partition, mv.key
            ), parked AS (
                INSERT INTO pgcg.parked (group_id, partition, gen, "offset", tick, key, payload,
                                         headers, dedup_key, enqueued_at, available_at,
                                         attempts, last_error, origin)
                SELECT g.id, mv.partition, 0, mv.off, tick0 + 1, mv.key, mv.payload,
                       nullif(mv.headers, '{}'::jsonb), mv.dedup_key, mv.enqueued_at,
                       greatest(mv.available_at, now()), mv.attempts, mv.last_error, 'migrated'
                FROM moved AS mv JOIN firsts AS f ON f.partition = mv.partition AND f.key = mv.key
                WHERE mv.old_id >= f.from_id
                ORDER BY mv.old_id
                RETURNING partition, "offset"
            )
            INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets,
                                     parked)
            SELECT pgcg.slot_of(t.id, 0, t.segments), g.id, pk.partition, 'd', 0, 0, tick0 + 1,
                   array_agg(pk."offset"), true
            FROM parked AS pk GROUP BY pk.partition;
        END LOOP;
        DROP TABLE moved;
    END LOOP;
END $$;

DROP TABLE pgcg.messages CASCADE;
DROP SEQUENCE pgcg.message_id_seq;
