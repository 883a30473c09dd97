-- pgcg schema, version 5: coordinators and the administrative commands act only through
-- functions that run as the schema's owner, as producers and consumers do since version 4.
--
-- docs/security.md ("Roles and grants") is the design. In short:
-- - every statement a coordinator (election, member expiry, rebalance, topic upkeep) or an
--   administrative command (`pgcg status`, `pgcg dlq`, `pgcg group`, `pgcg topic`) sends
--   calls a function below, SECURITY DEFINER with a fixed search_path and EXECUTE revoked
--   from PUBLIC: their roles need USAGE on the schema and EXECUTE on their functions, and
--   no privilege on any table (`pgcg roles coordinator|admin` grants exactly these);
-- - coordinators and administrators act for every group and topic, so these functions check
--   no binding: EXECUTE is the permission;
-- - each function is one statement of version 4's sql/queries, moved as it was: the same
--   locks (a FOR UPDATE in a function holds its rows until the caller's transaction ends,
--   so a coordinator's rebalance still locks its leader row first, in the same transaction
--   as its writes), the same clock (now() is the transaction's start inside a function too,
--   clock_timestamp() the moment it runs), the same lock_timeout (set by the caller's
--   transaction; a function's SET clause only touches search_path);
-- - the bodies of version 3 that ran as the caller (maintain, delete_group, seek_group,
--   alter_topic, replay_dead_letters) are renamed `<name>_unchecked`, only the owner calls
--   them, and a function of the same name and signature runs them as the owner.
--
-- What stays outside: advisory locks, pg_notify, set_config, and deposing a silent leader
-- (pg_locks and pg_terminate_backend, which needs pg_signal_backend for another role's
-- backend): none of them touches a table of the schema.

-- Version 3's bodies, called only by the functions below -----------------------------------

ALTER FUNCTION pgcg.maintain(text) RENAME TO maintain_unchecked;
ALTER FUNCTION pgcg.delete_group(text, boolean) RENAME TO delete_group_unchecked;
ALTER FUNCTION pgcg.seek_group(text, text) RENAME TO seek_group_unchecked;
ALTER FUNCTION pgcg.alter_topic(text, bigint, bigint, bigint, bigint, bigint, integer, bigint,
                                integer)
    RENAME TO alter_topic_unchecked;
ALTER FUNCTION pgcg.replay_dead_letters(text, bigint[]) RENAME TO replay_dead_letters_unchecked;

REVOKE EXECUTE ON FUNCTION
    pgcg.maintain_unchecked(text),
    pgcg.delete_group_unchecked(text, boolean),
    pgcg.seek_group_unchecked(text, text),
    pgcg.alter_topic_unchecked(text, bigint, bigint, bigint, bigint, bigint, integer, bigint,
                               integer),
    pgcg.replay_dead_letters_unchecked(text, bigint[])
FROM PUBLIC;

-- Leader election (coordinator/elector.py) -----------------------------------------------------

CREATE FUNCTION pgcg.ensure_leader_row(p_scope text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    INSERT INTO pgcg.coordinator_leader (scope) VALUES (p_scope) ON CONFLICT DO NOTHING
$$;

-- The caller's own backend (pg_backend_pid() is the session's, also inside a function).
CREATE FUNCTION pgcg.take_leadership(p_scope text, p_leader text)
RETURNS TABLE (leader_epoch bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.coordinator_leader
    SET leader_epoch = leader_epoch + 1, leader_id = p_leader, backend_pid = pg_backend_pid(),
        heartbeat_at = now(), elected_at = now()
    WHERE scope = p_scope
    RETURNING leader_epoch
$$;

-- Renew only while still within the leader timeout: a leader that was paused past it must
-- step down even if nobody has deposed it yet.
CREATE FUNCTION pgcg.leader_heartbeat(p_scope text, p_leader_epoch bigint, p_leader text,
                                      p_leader_timeout_s float8)
RETURNS TABLE (leader_epoch bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.coordinator_leader SET heartbeat_at = now()
    WHERE scope = p_scope AND leader_epoch = p_leader_epoch AND leader_id = p_leader
      AND heartbeat_at > now() - p_leader_timeout_s * interval '1 second'
    RETURNING leader_epoch
$$;

-- The fence of every write of a leader: its row, locked until the caller's transaction ends.
CREATE FUNCTION pgcg.lock_leadership(p_scope text, p_leader_epoch bigint, p_leader text,
                                     p_leader_timeout_s float8)
RETURNS TABLE (leader_epoch bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT cl.leader_epoch FROM pgcg.coordinator_leader AS cl
    WHERE cl.scope = p_scope AND cl.leader_epoch = p_leader_epoch AND cl.leader_id = p_leader
      AND cl.heartbeat_at > now() - p_leader_timeout_s * interval '1 second'
    FOR UPDATE
$$;

CREATE FUNCTION pgcg.stale_leader(p_scope text, p_leader_timeout_s float8)
RETURNS TABLE (backend_pid integer, leader_id text, leader_epoch bigint, silent_s float8)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT cl.backend_pid, cl.leader_id, cl.leader_epoch,
           extract(epoch FROM now() - cl.heartbeat_at)::float8
    FROM pgcg.coordinator_leader AS cl
    WHERE cl.scope = p_scope AND cl.backend_pid IS NOT NULL
      AND cl.heartbeat_at < now() - p_leader_timeout_s * interval '1 second'
$$;

-- Groups, members and rebalances (coordinator/service.py, rebalancer.py) -------------------------

CREATE FUNCTION pgcg.group_topics()
RETURNS TABLE (group_name text, topic text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT g.group_name, g.topic FROM pgcg.groups AS g ORDER BY g.group_name
$$;

CREATE FUNCTION pgcg.member_heartbeats(p_groups text[])
RETURNS TABLE (group_name text, member_id text, last_heartbeat timestamptz,
               session_timeout_ms integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT cg.group_name, cg.member_id, cg.last_heartbeat, cg.session_timeout_ms
    FROM pgcg.consumer_groups AS cg
    WHERE cg.group_name = ANY(p_groups)
$$;

-- Only members whose heartbeat is still the one the coordinator saw go silent.
CREATE FUNCTION pgcg.expire_members(p_group text, p_members text[],
                                    p_heartbeats timestamptz[])
RETURNS TABLE (member_id text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    DELETE FROM pgcg.consumer_groups AS cg
    USING unnest(p_members, p_heartbeats) AS x(member_id, last_heartbeat)
    WHERE cg.group_name = p_group AND cg.member_id = x.member_id
      AND cg.last_heartbeat = x.last_heartbeat
    RETURNING cg.member_id
$$;

CREATE FUNCTION pgcg.live_members(p_group text)
RETURNS TABLE (member_id text, host text, pid integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT cg.member_id, cg.host, cg.pid FROM pgcg.consumer_groups AS cg
    WHERE cg.group_name = p_group ORDER BY cg.joined_at, cg.member_id
$$;

-- `overdue` is judged on the clock once the rows are locked (the outer query runs after
-- the lock waits), not at the start of the transaction.
CREATE FUNCTION pgcg.assignments_for_update(p_group text, p_topic text)
RETURNS TABLE (partition integer, member_id text, epoch bigint, state text,
               target_member_id text, overdue boolean)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT partition, member_id, epoch, state, target_member_id,
           revoke_deadline IS NOT NULL AND revoke_deadline <= clock_timestamp()
    FROM (
        SELECT pa.partition, pa.member_id, pa.epoch, pa.state, pa.target_member_id,
               pa.revoke_deadline
        FROM pgcg.partition_assignments AS pa
        WHERE pa.group_name = p_group AND pa.topic = p_topic
        ORDER BY pa.partition
        FOR UPDATE
    ) AS locked
    ORDER BY partition
$$;

CREATE FUNCTION pgcg.assign_partitions(p_group text, p_topic text, p_partitions integer[],
                                       p_members text[])
RETURNS TABLE (partition integer, epoch bigint, member_id text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.partition_assignments AS pa
    SET member_id = a.member_id, state = 'assigned', epoch = pa.epoch + 1,
        target_member_id = NULL, revoke_deadline = NULL, assigned_at = now()
    FROM unnest(p_partitions, p_members) AS a(partition, member_id)
    WHERE pa.group_name = p_group AND pa.topic = p_topic AND pa.partition = a.partition
    RETURNING pa.partition, pa.epoch, pa.member_id
$$;

-- The deadline is never sooner than the owner's own session timeout, counted from now with
-- the rows locked (clock_timestamp()): sql/queries/coordinator.sql says why.
CREATE FUNCTION pgcg.revoke_partitions(p_group text, p_topic text, p_partitions integer[],
                                       p_targets text[], p_drain_deadline_s float8)
RETURNS TABLE (partition integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.partition_assignments AS pa
    SET state = 'revoking', target_member_id = a.target,
        revoke_deadline = coalesce(
            pa.revoke_deadline,
            clock_timestamp() + greatest(
                p_drain_deadline_s * interval '1 second',
                (SELECT cg.session_timeout_ms * interval '1 millisecond'
                 FROM pgcg.consumer_groups AS cg
                 WHERE cg.group_name = pa.group_name AND cg.member_id = pa.member_id)))
    FROM unnest(p_partitions, p_targets) AS a(partition, target)
    WHERE pa.group_name = p_group AND pa.topic = p_topic AND pa.partition = a.partition
    RETURNING pa.partition
$$;

CREATE FUNCTION pgcg.unrevoke_partitions(p_group text, p_topic text, p_partitions integer[])
RETURNS TABLE (partition integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.partition_assignments AS pa
    SET state = 'assigned', target_member_id = NULL, revoke_deadline = NULL
    WHERE pa.group_name = p_group AND pa.topic = p_topic AND pa.partition = ANY(p_partitions)
    RETURNING pa.partition
$$;

CREATE FUNCTION pgcg.unassign_partitions(p_group text, p_topic text, p_partitions integer[])
RETURNS TABLE (partition integer)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.partition_assignments AS pa
    SET member_id = NULL, state = 'unassigned', epoch = pa.epoch + 1,
        target_member_id = NULL, revoke_deadline = NULL
    WHERE pa.group_name = p_group AND pa.topic = p_topic AND pa.partition = ANY(p_partitions)
    RETURNING pa.partition
$$;

CREATE FUNCTION pgcg.next_generation(p_group text)
RETURNS TABLE (generation bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    UPDATE pgcg.groups SET generation = generation + 1
    WHERE group_name = p_group RETURNING generation
$$;

CREATE FUNCTION pgcg.record_rebalance(p_group text, p_generation bigint, p_leader_epoch bigint,
                                      p_reason text, p_members integer, p_moves jsonb,
                                      p_started_at timestamptz, p_duration_ms float8)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    INSERT INTO pgcg.rebalances
        (group_name, generation, leader_epoch, reason, members, moves, started_at, duration_ms)
    VALUES (p_group, p_generation, p_leader_epoch, p_reason, p_members, p_moves, p_started_at,
            p_duration_ms)
$$;

-- Topic upkeep (coordinator/retention.py) -----------------------------------------------------

CREATE FUNCTION pgcg.topic_names()
RETURNS TABLE (name text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT t.name FROM pgcg.topics AS t ORDER BY t.name
$$;

CREATE FUNCTION pgcg.maintain(p_topic text)
RETURNS TABLE (event text, seq bigint, group_name text, partition integer, n bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RETURN QUERY SELECT * FROM pgcg.maintain_unchecked(p_topic);
END $$;

-- `pgcg status` (shared/status.py) ----------------------------------------------------------------

-- The latest applied migration, for commands that refuse to run on an older schema
-- (shared/migrate.py's check): the version table is the owner's like every other.
CREATE FUNCTION pgcg.schema_version() RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT coalesce(max(m.version), 0) FROM pgcg.schema_migrations AS m
$$;

CREATE FUNCTION pgcg.status_groups(p_group text)
RETURNS TABLE (group_name text, topic text, generation bigint, seek_gen integer,
               created_at timestamptz, partitions integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT g.group_name, g.topic, g.generation, g.seek_gen, g.created_at, t.partitions
    FROM pgcg.groups AS g JOIN pgcg.topics AS t ON t.name = g.topic
    WHERE p_group IS NULL OR g.group_name = p_group
    ORDER BY g.group_name
$$;

CREATE FUNCTION pgcg.status_leader(p_group text, p_leader_timeout_s float8)
RETURNS TABLE (leader_id text, leader_epoch bigint, heartbeat_age_s float8, alive boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT cl.leader_id, cl.leader_epoch,
           extract(epoch FROM now() - cl.heartbeat_at)::float8,
           extract(epoch FROM now() - cl.heartbeat_at)::float8 < p_leader_timeout_s
    FROM pgcg.coordinator_leader AS cl WHERE cl.scope = p_group
$$;

CREATE FUNCTION pgcg.status_members(p_group text)
RETURNS TABLE (member_id text, host text, pid integer, joined_at timestamptz,
               heartbeat_age_s float8, session_timeout_s numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT cg.member_id, cg.host, cg.pid, cg.joined_at,
           extract(epoch FROM now() - cg.last_heartbeat)::float8,
           cg.session_timeout_ms / 1000.0
    FROM pgcg.consumer_groups AS cg WHERE cg.group_name = p_group
    ORDER BY cg.joined_at, cg.member_id
$$;

-- Per partition: owner, epoch, state, lag and the age of the oldest waiting message, what
-- runs in a handler now and what is parked (sql/queries/status.sql says how each is read).
CREATE FUNCTION pgcg.status_partitions(p_group text, p_topic text)
RETURNS TABLE (partition integer, member_id text, epoch bigint, state text,
               target_member_id text, revoke_in_s float8, lag bigint, position_tick bigint,
               oldest_age_s float8, in_flight bigint, parked bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT pa.partition, pa.member_id, pa.epoch, pa.state, pa.target_member_id,
           extract(epoch FROM pa.revoke_deadline - now())::float8 AS revoke_in_s,
           coalesce(gl.lag, 0) AS lag, gl.position_tick,
           CASE WHEN gl.lag > 0 THEN greatest(0, gl.age_s, (
               SELECT extract(epoch FROM now() - l.enqueued_at)::float8
               FROM pgcg.log AS l
               WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63 AND l.partition = pa.partition
                 AND l."offset" > coalesce(k.offsets[pa.partition + 1], -1)
               ORDER BY l."offset" LIMIT 1)) END AS oldest_age_s,
           coalesce(fl.n, 0) + coalesce(pk.running, 0) AS in_flight,
           coalesce(pk.parked, 0) AS parked
    FROM pgcg.partition_assignments AS pa
    JOIN pgcg.groups AS g ON g.group_name = pa.group_name
    JOIN pgcg.topics AS t ON t.name = g.topic
    LEFT JOIN pgcg.group_lag_unchecked(p_group) AS gl ON gl.partition = pa.partition
    LEFT JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gl.position_tick
    LEFT JOIN LATERAL (
        SELECT count(*) AS parked,
               count(*) FILTER (WHERE q.claimed_epoch = pa.epoch) AS running
        FROM pgcg.parked AS q WHERE q.group_id = g.id AND q.partition = pa.partition
    ) AS pk ON true
    LEFT JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT o FROM pgcg.ledger AS l, unnest(l.offsets) AS o
            WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
              AND l.group_id = g.id AND l.partition = pa.partition AND l.tick > gl.position_tick
              AND l.kind = 'm' AND l.gen = g.seek_gen AND l.epoch = pa.epoch
            EXCEPT
            SELECT o FROM pgcg.ledger AS l, unnest(coalesce(l.offsets, ARRAY[l."offset"])) AS o
            WHERE l.slot BETWEEN t.id * 64 AND t.id * 64 + 63
              AND l.group_id = g.id AND l.partition = pa.partition AND l.tick > gl.position_tick
              AND l.kind = 'd' AND l.gen = g.seek_gen
        ) AS started
    ) AS fl ON pa.member_id IS NOT NULL
    WHERE pa.group_name = p_group AND pa.topic = p_topic
    ORDER BY pa.partition
$$;

CREATE FUNCTION pgcg.dead_letter_count(p_group text) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT count(*) FROM pgcg.dead_letters AS d WHERE d.group_name = p_group
$$;

-- Messages the group lost to the topic's hard retention limit.
CREATE FUNCTION pgcg.status_losses(p_group text)
RETURNS TABLE (lost bigint, last_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT coalesce(sum(gl.lost), 0)::bigint, max(gl.at)
    FROM pgcg.group_losses AS gl JOIN pgcg.groups AS g ON g.id = gl.group_id
    WHERE g.group_name = p_group
$$;

CREATE FUNCTION pgcg.recent_rebalances(p_group text, p_limit bigint)
RETURNS TABLE (generation bigint, leader_epoch bigint, reason text, members integer,
               moves jsonb, started_at timestamptz, duration_ms float8)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT r.generation, r.leader_epoch, r.reason, r.members, r.moves, r.started_at,
           r.duration_ms
    FROM pgcg.rebalances AS r WHERE r.group_name = p_group
    ORDER BY r.generation DESC LIMIT p_limit
$$;

-- Handlers running now that reported progress, under the partition's current owner and
-- epoch (sql/queries/status.sql). `p_now` pins the clock in tests; null: now().
CREATE FUNCTION pgcg.in_flight_progress(p_group text, p_now timestamptz)
RETURNS TABLE (partition integer, message_id bigint, key text, member_id text, epoch bigint,
               attempt integer, percent float8, text text, reported_at timestamptz,
               locked_until timestamptz, reported_age_s float8, deadline_in_s float8,
               overdue boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT pk.partition, pk."offset" * 1024 + pk.partition, pk.key,
           pk.claimed_by, pk.claimed_epoch, pk.attempts,
           (pk.progress ->> 'percent')::float8, pk.progress ->> 'text',
           (pk.progress ->> 'at')::timestamptz, pk.locked_until,
           extract(epoch FROM c.now - (pk.progress ->> 'at')::timestamptz)::float8,
           extract(epoch FROM pk.locked_until - c.now)::float8,
           pk.locked_until < c.now
    FROM (SELECT coalesce(p_now, now()) AS now) AS c
    CROSS JOIN pgcg.groups AS g
    JOIN pgcg.partition_assignments AS pa
      ON pa.group_name = g.group_name AND pa.topic = g.topic
    JOIN pgcg.parked AS pk
      ON pk.group_id = g.id AND pk.partition = pa.partition
     AND pk.claimed_by = pa.member_id AND pk.claimed_epoch = pa.epoch
    WHERE g.group_name = p_group AND pk.progress IS NOT NULL
    ORDER BY pk.partition, pk.id
$$;

CREATE FUNCTION pgcg.status_topics(p_topic text)
RETURNS TABLE (name text, id integer, partitions integer, segments integer,
               retention_ms bigint, retention_bytes bigint, hard_retention_ms bigint,
               hard_retention_bytes bigint, segment_bytes bigint, current_segment bigint,
               groups text[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT t.name, t.id, t.partitions, t.segments, t.retention_ms, t.retention_bytes,
           t.hard_retention_ms, t.hard_retention_bytes, t.segment_bytes,
           coalesce(pg_sequence_last_value(t.segment_seq), 0),
           ARRAY(SELECT g.group_name FROM pgcg.groups AS g WHERE g.topic = t.name
                 ORDER BY g.group_name)
    FROM pgcg.topics AS t
    WHERE p_topic IS NULL OR t.name = p_topic
    ORDER BY t.name
$$;

-- The topic's segments still on disk and the last few reclaimed ones
-- (sql/queries/status.sql says what each column means).
CREATE FUNCTION pgcg.status_segments(p_topic text, p_current bigint, p_reclaimed bigint)
RETURNS TABLE (seq bigint, slot integer, state text, bytes bigint, created_at timestamptz,
               sealed_at timestamptz, reclaimed_at timestamptz, due_in_s float8,
               ticked boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT s.seq, (s.seq % t.segments)::integer,
           CASE WHEN s.reclaimed_at IS NOT NULL THEN 'reclaimed'
                WHEN s.seq > p_current THEN 'next'
                WHEN s.seq = p_current THEN 'current'
                WHEN s.sealed_at IS NULL THEN 'sealing'
                ELSE 'sealed' END,
           CASE WHEN s.reclaimed_at IS NULL THEN pg_total_relation_size(
               ('pgcg.' || quote_ident('log_' || t.name || '_' || (s.seq % t.segments)))::regclass)
           END,
           s.created_at, s.sealed_at, s.reclaimed_at,
           CASE WHEN s.reclaimed_at IS NULL AND s.sealed_at IS NOT NULL THEN extract(epoch FROM
               s.sealed_at + t.retention_ms * interval '1 millisecond' - now())::float8
           END,
           s.sealed_tick IS NOT NULL OR EXISTS (
               SELECT FROM pgcg.ticks AS k
               WHERE k.topic_id = t.id AND pg_snapshot_xmax(k.snapshot) > s.seal_xid)
    FROM pgcg.topics AS t JOIN pgcg.segments AS s ON s.topic_id = t.id
    WHERE t.name = p_topic
      AND (s.reclaimed_at IS NULL OR s.seq > (
          SELECT max(r.seq) - p_reclaimed FROM pgcg.segments AS r
          WHERE r.topic_id = t.id AND r.reclaimed_at IS NOT NULL))
    ORDER BY s.seq
$$;

-- What keeps the oldest sealed segment on disk, as pgcg.maintain's 'held' check decides
-- (sql/queries/status.sql).
CREATE FUNCTION pgcg.segment_holders(p_topic text, p_seq bigint)
RETURNS TABLE (group_name text, partition integer, lag bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    WITH s AS (
        SELECT sg.*, t.name AS topic, t.segments,
               coalesce(sg.sealed_tick, (
                   SELECT min(k.tick) FROM pgcg.ticks AS k
                   WHERE k.topic_id = t.id AND pg_snapshot_xmax(k.snapshot) > sg.seal_xid)) AS st
        FROM pgcg.topics AS t JOIN pgcg.segments AS sg ON sg.topic_id = t.id
        WHERE t.name = p_topic AND sg.seq = p_seq
    )
    SELECT g.group_name, gp.partition, coalesce(gl.lag, 0)
    FROM s
    JOIN pgcg.groups AS g ON g.topic = s.topic
    JOIN pgcg.group_progress AS gp ON gp.group_id = g.id
    JOIN pgcg.ticks AS k ON k.topic_id = s.topic_id AND k.tick = gp.tick
    LEFT JOIN LATERAL pgcg.group_lag_unchecked(g.group_name) AS gl ON gl.partition = gp.partition
    WHERE (s.st IS NULL OR gp.tick < s.st)
      AND (EXISTS (
               SELECT FROM pgcg.log AS l
               WHERE l.slot = pgcg.slot_of(s.topic_id, s.seq, s.segments)
                 AND l.partition = gp.partition AND l."offset" > k.offsets[gp.partition + 1])
           OR EXISTS (
               SELECT FROM pgcg.log AS l
               WHERE l.slot = pgcg.slot_of(s.topic_id, s.seq, s.segments)
                 AND l.partition = gp.partition AND l."offset" <= k.offsets[gp.partition + 1]
                 AND NOT pg_visible_in_snapshot(l.txid, k.snapshot)))
    ORDER BY g.group_name, gp.partition
$$;

-- The slot of a topic's segment, whose advisory lock producers writing into it hold.
CREATE FUNCTION pgcg.segment_slot(p_topic text, p_seq bigint) RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT pgcg.slot_of(t.id, p_seq, t.segments) FROM pgcg.topics AS t WHERE t.name = p_topic
$$;

-- Dead letters (shared/dlq.py). A null filter matches everything -------------------------------

CREATE FUNCTION pgcg.list_dead_letters(p_group text, p_topic text, p_key text,
                                       p_since timestamptz, p_until timestamptz, p_limit bigint)
RETURNS TABLE (id bigint, message_id bigint, group_name text, topic text, partition integer,
               "offset" bigint, key text, payload jsonb, headers jsonb, dedup_key text,
               attempts integer, last_error text, reason text, member_id text,
               enqueued_at timestamptz, dead_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT d.id, d.message_id, d.group_name, d.topic, d.partition, d."offset", d.key,
           d.payload, d.headers, d.dedup_key, d.attempts, d.last_error, d.reason, d.member_id,
           d.enqueued_at, d.dead_at
    FROM pgcg.dead_letters AS d
    WHERE (p_group IS NULL OR d.group_name = p_group)
      AND (p_topic IS NULL OR d.topic = p_topic)
      AND (p_key IS NULL OR d.key = p_key)
      AND (p_since IS NULL OR d.dead_at >= p_since)
      AND (p_until IS NULL OR d.dead_at < p_until)
    ORDER BY d.id
    LIMIT p_limit
$$;

-- The dead letters of one group to replay, locked until the caller's transaction (the
-- replay) commits.
CREATE FUNCTION pgcg.pick_dead_letters(p_group text, p_topic text, p_key text,
                                       p_since timestamptz, p_until timestamptz, p_limit bigint)
RETURNS TABLE (id bigint, message_id bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT d.id, d.message_id FROM pgcg.dead_letters AS d
    WHERE d.group_name = p_group
      AND (p_topic IS NULL OR d.topic = p_topic)
      AND (p_key IS NULL OR d.key = p_key)
      AND (p_since IS NULL OR d.dead_at >= p_since)
      AND (p_until IS NULL OR d.dead_at < p_until)
    ORDER BY d.id
    LIMIT p_limit
    FOR UPDATE SKIP LOCKED
$$;

CREATE FUNCTION pgcg.replay_dead_letters(p_group text, p_ids bigint[])
RETURNS TABLE (dead_letter bigint, id bigint, partition integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RETURN QUERY SELECT * FROM pgcg.replay_dead_letters_unchecked(p_group, p_ids);
END $$;

CREATE FUNCTION pgcg.purge_dead_letters(p_group text, p_topic text, p_key text,
                                        p_since timestamptz, p_until timestamptz)
RETURNS TABLE (id bigint)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    DELETE FROM pgcg.dead_letters AS d
    WHERE (p_group IS NULL OR d.group_name = p_group)
      AND (p_topic IS NULL OR d.topic = p_topic)
      AND (p_key IS NULL OR d.key = p_key)
      AND (p_since IS NULL OR d.dead_at >= p_since)
      AND (p_until IS NULL OR d.dead_at < p_until)
    RETURNING d.id
$$;

-- Groups (shared/groups.py) -------------------------------------------------------------------

CREATE FUNCTION pgcg.group_topic(p_group text)
RETURNS TABLE (topic text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT g.topic FROM pgcg.groups AS g WHERE g.group_name = p_group
$$;

-- Every group (of one topic, or all) with its members, lag, oldest waiting message and
-- parked messages (sql/queries/groups.sql).
CREATE FUNCTION pgcg.list_groups(p_topic text)
RETURNS TABLE (group_name text, topic text, created_at timestamptz, members bigint,
               lag bigint, oldest_age_s float8, parked bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT g.group_name, g.topic, g.created_at,
           (SELECT count(*) FROM pgcg.consumer_groups AS cg
            WHERE cg.group_name = g.group_name),
           coalesce(l.lag, 0)::bigint, l.oldest_age_s,
           (SELECT count(*) FROM pgcg.parked AS pk WHERE pk.group_id = g.id)
    FROM pgcg.groups AS g
    JOIN pgcg.topics AS t ON t.name = g.topic
    LEFT JOIN LATERAL (
        SELECT sum(gl.lag) AS lag,
               max(CASE WHEN gl.lag > 0 THEN greatest(0, gl.age_s, (
                   SELECT extract(epoch FROM now() - lg.enqueued_at)::float8
                   FROM pgcg.log AS lg
                   WHERE lg.slot BETWEEN t.id * 64 AND t.id * 64 + 63
                     AND lg.partition = gl.partition
                     AND lg."offset" > coalesce(k.offsets[gl.partition + 1], -1)
                   ORDER BY lg."offset" LIMIT 1)) END) AS oldest_age_s
        FROM pgcg.group_lag_unchecked(g.group_name) AS gl
        LEFT JOIN pgcg.ticks AS k ON k.topic_id = t.id AND k.tick = gl.position_tick
    ) AS l ON true
    WHERE p_topic IS NULL OR g.topic = p_topic
    ORDER BY g.group_name
$$;

CREATE FUNCTION pgcg.delete_group(p_name text, p_force boolean DEFAULT false)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RETURN pgcg.delete_group_unchecked(p_name, p_force);
END $$;

CREATE FUNCTION pgcg.seek_group(p_name text, p_to text)
RETURNS TABLE (partition integer, tick bigint, dropped bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RETURN QUERY SELECT * FROM pgcg.seek_group_unchecked(p_name, p_to);
END $$;

-- Topics (shared/topics.py) ---------------------------------------------------------------------

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
) RETURNS pgcg.topics LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RETURN pgcg.alter_topic_unchecked(p_name, p_retention_ms, p_retention_bytes,
                                      p_hard_retention_ms, p_hard_retention_bytes,
                                      p_segment_bytes, p_tick_interval_ms, p_dedup_window_ms,
                                      p_max_payload_bytes);
END $$;

CREATE FUNCTION pgcg.topic_settings(p_name text)
RETURNS TABLE (name text, partitions integer, segments integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT t.name, t.partitions, t.segments FROM pgcg.topics AS t WHERE t.name = p_name
$$;

-- Every topic with its retention, its groups and what its log takes on disk now.
CREATE FUNCTION pgcg.list_topics()
RETURNS TABLE (name text, partitions integer, segments integer, retention_ms bigint,
               retention_bytes bigint, hard_retention_ms bigint, hard_retention_bytes bigint,
               segment_bytes bigint, dedup_window_ms bigint, groups bigint, stored_bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT t.name, t.partitions, t.segments, t.retention_ms, t.retention_bytes,
           t.hard_retention_ms, t.hard_retention_bytes, t.segment_bytes, t.dedup_window_ms,
           (SELECT count(*) FROM pgcg.groups AS g WHERE g.topic = t.name),
           (SELECT coalesce(sum(pg_total_relation_size(pt.relid)), 0)
            FROM pg_partition_tree(('pgcg.' || quote_ident('log_' || t.name))::regclass) AS pt
           )::bigint
    FROM pgcg.topics AS t
    ORDER BY t.name
$$;

REVOKE EXECUTE ON FUNCTION
    pgcg.ensure_leader_row(text),
    pgcg.take_leadership(text, text),
    pgcg.leader_heartbeat(text, bigint, text, float8),
    pgcg.lock_leadership(text, bigint, text, float8),
    pgcg.stale_leader(text, float8),
    pgcg.group_topics(),
    pgcg.member_heartbeats(text[]),
    pgcg.expire_members(text, text[], timestamptz[]),
    pgcg.live_members(text),
    pgcg.assignments_for_update(text, text),
    pgcg.assign_partitions(text, text, integer[], text[]),
    pgcg.revoke_partitions(text, text, integer[], text[], float8),
    pgcg.unrevoke_partitions(text, text, integer[]),
    pgcg.unassign_partitions(text, text, integer[]),
    pgcg.next_generation(text),
    pgcg.record_rebalance(text, bigint, bigint, text, integer, jsonb, timestamptz, float8),
    pgcg.topic_names(),
    pgcg.maintain(text),
    pgcg.schema_version(),
    pgcg.status_groups(text),
    pgcg.status_leader(text, float8),
    pgcg.status_members(text),
    pgcg.status_partitions(text, text),
    pgcg.dead_letter_count(text),
    pgcg.status_losses(text),
    pgcg.recent_rebalances(text, bigint),
    pgcg.in_flight_progress(text, timestamptz),
    pgcg.status_topics(text),
    pgcg.status_segments(text, bigint, bigint),
    pgcg.segment_holders(text, bigint),
    pgcg.segment_slot(text, bigint),
    pgcg.list_dead_letters(text, text, text, timestamptz, timestamptz, bigint),
    pgcg.pick_dead_letters(text, text, text, timestamptz, timestamptz, bigint),
    pgcg.replay_dead_letters(text, bigint[]),
    pgcg.purge_dead_letters(text, text, text, timestamptz, timestamptz),
    pgcg.group_topic(text),
    pgcg.list_groups(text),
    pgcg.delete_group(text, boolean),
    pgcg.seek_group(text, text),
    pgcg.alter_topic(text, bigint, bigint, bigint, bigint, bigint, integer, bigint, integer),
    pgcg.topic_settings(text),
    pgcg.list_topics()
FROM PUBLIC;
