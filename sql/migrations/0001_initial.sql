-- pgcg schema, version 1.
--
-- Everything lives in the `pgcg` schema. Ownership of a partition is a row in
-- partition_assignments with an epoch; every claim, ack and release names the epoch it
-- believes in, so a paused or partitioned process acts on nothing once the epoch moved on.

CREATE SCHEMA IF NOT EXISTS pgcg;

-- Topics -------------------------------------------------------------------------------

CREATE TABLE pgcg.topics (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$'),
    partitions  integer NOT NULL DEFAULT 16 CHECK (partitions BETWEEN 1 AND 1024),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The partition of an ordering key: the first four bytes of MD5(key as UTF-8), read as a
-- big-endian unsigned integer, modulo the topic's partition count. MD5 is not used for
-- security here; it is everywhere, so producers in any language can compute the same
-- partition, and PostgreSQL itself is the reference that enqueue() uses.
CREATE FUNCTION pgcg.partition_for(key text, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (('x' || lpad(substr(md5(key), 1, 8), 16, '0'))::bit(64)::bigint % partitions)::integer;

COMMENT ON FUNCTION pgcg.partition_for(text, integer) IS
    'Partition of an ordering key: first 4 bytes of md5(key) as unsigned big-endian int, mod partitions';

-- Messages: LIST-partitioned by topic, each topic LIST-partitioned by partition number, so
-- a consumer's scan of one partition touches one small table and a hot partition can be
-- vacuumed on its own.
CREATE SEQUENCE pgcg.message_id_seq AS bigint;

CREATE TABLE pgcg.messages (
    id            bigint NOT NULL DEFAULT nextval('pgcg.message_id_seq'),
    topic         text NOT NULL,
    partition     integer NOT NULL,
    key           text NOT NULL CHECK (key <> ''),
    payload       jsonb NOT NULL,
    headers       jsonb NOT NULL DEFAULT '{}'::jsonb,
    dedup_key     text,
    enqueued_at   timestamptz NOT NULL DEFAULT now(),
    -- A retry waits until available_at; the consumer blocks the whole key meanwhile.
    available_at  timestamptz NOT NULL DEFAULT now(),
    -- Failed deliveries so far (handler errors, and claims lost to a crash or forced
    -- hand-off). The handler sees attempt = attempts + 1.
    attempts      integer NOT NULL DEFAULT 0,
    -- The claim: which member holds the row in memory, under which partition epoch, and
    -- until when a handler may run on it without reporting progress.
    claimed_by    text,
    claim_epoch   bigint,
    locked_until  timestamptz,
    last_error    text,
    progress      jsonb,
    PRIMARY KEY (topic, partition, id)
) PARTITION BY LIST (topic);

-- Enqueue-if-not-exists: a dedup key is unique among the pending messages of one ordering key.
CREATE UNIQUE INDEX messages_dedup ON pgcg.messages (topic, partition, key, dedup_key)
    WHERE dedup_key IS NOT NULL;

CREATE TABLE pgcg.dead_letters (
    id             bigserial PRIMARY KEY,
    message_id     bigint NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    key            text NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb NOT NULL,
    enqueued_at    timestamptz NOT NULL,
    attempts       integer NOT NULL,
    last_error     text,
    group_name     text,
    member_id      text,
    dead_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_topic_key ON pgcg.dead_letters (topic, key, dead_at);
CREATE INDEX dead_letters_dead_at ON pgcg.dead_letters (dead_at);

-- Creating a topic creates its partition tables. Names are checked by the topics CHECK
-- constraint before any identifier is built from them.
CREATE FUNCTION pgcg.create_topic(p_name text, p_partitions integer DEFAULT 16)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    parent text := 'messages_' || p_name;
BEGIN
    INSERT INTO pgcg.topics (name, partitions) VALUES (p_name, p_partitions)
    ON CONFLICT (name) DO NOTHING;
    IF NOT FOUND THEN
        IF (SELECT partitions FROM pgcg.topics WHERE name = p_name) <> p_partitions THEN
            RAISE EXCEPTION 'topic % exists with a different partition count', p_name
                USING ERRCODE = 'PGC02',
                      HINT = 'The partition count is fixed when a topic is created.';
        END IF;
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE pgcg.%I PARTITION OF pgcg.messages FOR VALUES IN (%L) PARTITION BY LIST (partition)',
        parent, p_name);
    FOR p IN 0 .. p_partitions - 1 LOOP
        -- Rows are updated in place by claims (HOT: no indexed column changes), so leave
        -- room on each page; vacuum small partitions early instead of waiting for 20 %.
        EXECUTE format(
            'CREATE TABLE pgcg.%I PARTITION OF pgcg.%I FOR VALUES IN (%s) WITH ('
            'fillfactor = 70, autovacuum_vacuum_scale_factor = 0.0, '
            'autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_insert_scale_factor = 0.0, '
            'autovacuum_vacuum_insert_threshold = 20000, autovacuum_vacuum_cost_delay = 0)',
            parent || '_p' || p, parent, p);
    END LOOP;
    RETURN true;
END $$;

-- Groups and members -------------------------------------------------------------------

-- Which topic a group consumes. One topic per group in this version; keeping the two
-- names apart leaves room for several groups on one topic later.
CREATE TABLE pgcg.subscriptions (
    group_name  text PRIMARY KEY CHECK (group_name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$'),
    topic       text NOT NULL REFERENCES pgcg.topics (name),
    created_at  timestamptz NOT NULL DEFAULT now(),
    generation  bigint NOT NULL DEFAULT 0
);

-- One row per live member.
CREATE TABLE pgcg.consumer_groups (
    group_name          text NOT NULL REFERENCES pgcg.subscriptions (group_name),
    member_id           text NOT NULL,
    host                text NOT NULL,
    pid                 integer NOT NULL,
    joined_at           timestamptz NOT NULL DEFAULT now(),
    last_heartbeat      timestamptz NOT NULL DEFAULT now(),
    session_timeout_ms  integer NOT NULL CHECK (session_timeout_ms >= 1000),
    PRIMARY KEY (group_name, member_id)
);

-- Who owns each partition, under which epoch. state:
--   assigned    member_id owns it and may claim and ack;
--   revoking    member_id must stop claiming, finish, ack and release by revoke_deadline;
--   unassigned  nobody owns it (member_id is null).
CREATE TABLE pgcg.partition_assignments (
    group_name        text NOT NULL REFERENCES pgcg.subscriptions (group_name),
    topic             text NOT NULL REFERENCES pgcg.topics (name),
    partition         integer NOT NULL,
    member_id         text,
    epoch             bigint NOT NULL DEFAULT 0,
    state             text NOT NULL DEFAULT 'unassigned'
                      CHECK (state IN ('assigned', 'revoking', 'unassigned')),
    target_member_id  text,
    revoke_deadline   timestamptz,
    assigned_at       timestamptz,
    PRIMARY KEY (group_name, topic, partition),
    CHECK ((state = 'unassigned') = (member_id IS NULL))
);
CREATE INDEX partition_assignments_member ON pgcg.partition_assignments (group_name, member_id);

-- Coordinator leadership, per group. The advisory lock says who may try to lead; this row's
-- epoch is what fences the leader's writes.
CREATE TABLE pgcg.coordinator_leader (
    scope         text PRIMARY KEY,
    leader_epoch  bigint NOT NULL DEFAULT 0,
    leader_id     text,
    backend_pid   integer,
    heartbeat_at  timestamptz,
    elected_at    timestamptz
);

-- History of rebalances, for `pgcg status` and debugging.
CREATE TABLE pgcg.rebalances (
    group_name    text NOT NULL,
    generation    bigint NOT NULL,
    leader_epoch  bigint NOT NULL,
    reason        text NOT NULL,
    members       integer NOT NULL,
    moves         jsonb NOT NULL,
    started_at    timestamptz NOT NULL,
    duration_ms   double precision NOT NULL,
    PRIMARY KEY (group_name, generation)
);

-- Enqueue --------------------------------------------------------------------------------

-- Enqueue a batch in one statement, for producers in any language. Arrays are parallel;
-- headers, dedup keys and delays may be null. Returns one row per input in input order:
-- the new id, or null where the dedup key matched a pending message of the same key. Ids
-- are drawn in input order, so a batch keeps its per-key order. One NOTIFY per call names
-- the partitions that got work.
CREATE FUNCTION pgcg.enqueue(
    p_topic       text,
    p_keys        text[],
    p_payloads    jsonb[],
    p_headers     jsonb[] DEFAULT NULL,
    p_dedup_keys  text[] DEFAULT NULL,
    p_delays_ms   bigint[] DEFAULT NULL
) RETURNS TABLE (ord bigint, id bigint, partition integer)
LANGUAGE plpgsql AS $$
DECLARE
    n_partitions integer;
    touched text;
BEGIN
    SELECT t.partitions INTO n_partitions FROM pgcg.topics t WHERE t.name = p_topic;
    IF n_partitions IS NULL THEN
        RAISE EXCEPTION 'unknown topic %', p_topic USING ERRCODE = 'PGC01',
            HINT = 'Create it first: pgcg topic create <name>';
    END IF;
    RETURN QUERY
    WITH input AS (
        SELECT nextval('pgcg.message_id_seq') AS new_id, s.*,
               pgcg.partition_for(s.key, n_partitions) AS part
        FROM (
            SELECT u.ord, u.key, u.payload, u.headers, u.dedup_key, u.delay_ms
            FROM unnest(p_keys, p_payloads, p_headers, p_dedup_keys, p_delays_ms)
                 WITH ORDINALITY AS u(key, payload, headers, dedup_key, delay_ms, ord)
            WHERE u.ord <= cardinality(p_keys)
            ORDER BY u.ord
        ) s
    ), inserted AS (
        INSERT INTO pgcg.messages AS m
            (id, topic, partition, key, payload, headers, dedup_key, available_at)
        SELECT i.new_id, p_topic, i.part, i.key, i.payload, coalesce(i.headers, '{}'::jsonb),
               i.dedup_key, now() + coalesce(i.delay_ms, 0) * interval '1 millisecond'
        FROM input i
        ON CONFLICT DO NOTHING
        RETURNING m.id
    )
    SELECT i.ord, ins.id, i.part FROM input i LEFT JOIN inserted ins ON ins.id = i.new_id
    ORDER BY i.ord;

    SELECT string_agg(DISTINCT pgcg.partition_for(k, n_partitions)::text, ',') INTO touched
    FROM unnest(p_keys) AS k;
    IF touched IS NOT NULL THEN
        PERFORM pg_notify('pgcg.t.' || p_topic, touched);
    END IF;
END $$;
