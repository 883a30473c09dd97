-- pgcg schema, version 4: consumers and producers act only through functions that run as
-- the schema's owner, each bound to the groups and topics its role may act for.
--
-- docs/security.md ("Roles and grants") is the design. In short:
-- - every statement a consumer or producer sends is a call of a function below, SECURITY
--   DEFINER with a fixed search_path and EXECUTE revoked from PUBLIC: the runtime roles need
--   USAGE on the schema and EXECUTE on their functions, and no privilege on any table;
-- - each of these functions first checks, once per call, that the role is bound to the group
--   (and that group's topic) or topic it names, in pgcg.role_scopes;
-- - the identity checked is the session's login role (session_user) and the roles it is a
--   member of: SET ROLE can only reach roles the login is a member of, so it neither widens
--   nor narrows what a session may act for (inside a SECURITY DEFINER function current_user
--   is the owner, so the caller's current_user is not available there anyway);
-- - a login that is a member of the schema's owner (the migrator, superusers) is unbound;
-- - functions that run as the caller (SECURITY INVOKER) grant nothing the caller does not
--   already hold on the tables; they keep PUBLIC's EXECUTE, except the bodies the checked
--   functions wrap (`*_unchecked`), which only the owner calls.
--
-- The checked functions wrap the bodies of version 3, renamed `<name>_unchecked`, so the
-- bodies and their plans stay as they are: one extra call and one copy of the result per
-- call, no per-row work. (A function with SET clauses is never inlined: neither the bodies
-- nor these wrappers ever were.)
--
-- Coordinators and the administrative commands (status, dlq, group seek and delete, topic
-- alter) still work with table privileges (shared/grants.py); `pgcg roles` grants them.

-- Bindings ----------------------------------------------------------------------------------

-- kind 'group': the role may consume as group `name` (or any, '*') on topic `topic` (or any
-- topic, '*'). kind 'topic': the role may produce to topic `name` (or any, '*'); `topic` is
-- '*' there. A dropped role's rows match nobody (pg_has_role gives NULL for its oid).
CREATE TABLE pgcg.role_scopes (
    kind      text NOT NULL CHECK (kind IN ('group', 'topic')),
    name      text NOT NULL,
    role_id   regrole NOT NULL,
    topic     text NOT NULL DEFAULT '*',
    PRIMARY KEY (kind, name, role_id, topic),
    CHECK (kind = 'group' OR topic = '*')
);

-- Unbound: the session's login may become the owner of the function calling this one (inside
-- a SECURITY DEFINER function, current_user is its owner). Superusers are members of every role.
CREATE FUNCTION pgcg.unbound() RETURNS boolean LANGUAGE sql STABLE
RETURN pg_catalog.pg_has_role(session_user, current_user, 'MEMBER');

CREATE FUNCTION pgcg.scope_denied(p_kind text, p_name text, p_topic text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RAISE EXCEPTION 'permission denied for % %', p_kind, p_name
        USING ERRCODE = '42501',
              DETAIL = format('role %s is not bound to %s %s%s', session_user, p_kind, p_name,
                              CASE WHEN p_topic IS NOT NULL THEN ' on topic ' || p_topic
                                   ELSE '' END),
              HINT = 'Bind it with `pgcg roles` (docs/security.md).';
END $$;

-- The caller may act for group p_group: bound to it, on the topic the group reads (p_topic
-- when the group is about to be created). One probe of the bindings and one of the group.
-- No SET clause (each costs a save and restore of the setting on every call): these are
-- not SECURITY DEFINER and are called only by functions whose search_path is fixed.
CREATE FUNCTION pgcg.require_group(p_group text, p_topic text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF pgcg.unbound() OR EXISTS (
        SELECT FROM pgcg.role_scopes AS s
        WHERE s.kind = 'group' AND s.name IN (p_group, '*')
          AND (s.topic = '*' OR s.topic = coalesce(p_topic, (
                   SELECT g.topic FROM pgcg.groups AS g WHERE g.group_name = p_group)))
          AND pg_catalog.pg_has_role(session_user, s.role_id, 'MEMBER'))
    THEN
        RETURN;
    END IF;
    PERFORM pgcg.scope_denied('group', p_group, coalesce(p_topic, (
        SELECT g.topic FROM pgcg.groups AS g WHERE g.group_name = p_group)));
END $$;

-- The caller may produce to topic p_topic.
CREATE FUNCTION pgcg.require_topic(p_topic text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF pgcg.unbound() OR EXISTS (
        SELECT FROM pgcg.role_scopes AS s
        WHERE s.kind = 'topic' AND s.name IN (p_topic, '*')
          AND pg_catalog.pg_has_role(session_user, s.role_id, 'MEMBER'))
    THEN
        RETURN;
    END IF;
    PERFORM pgcg.scope_denied('topic', p_topic, NULL);
END $$;

-- Version 3's bodies, called only by the checked functions -------------------------------------

ALTER FUNCTION pgcg.enqueue(text, text[], jsonb[], jsonb[], text[], bigint[])
    RENAME TO enqueue_unchecked;
ALTER FUNCTION pgcg.fetch(text, integer[], bigint[], bigint[], bigint[], integer, bigint)
    RENAME TO fetch_unchecked;
ALTER FUNCTION pgcg.adopt(text, text, integer, bigint, integer, bigint)
    RENAME TO adopt_unchecked;
ALTER FUNCTION pgcg.settle(text, text, integer[], bigint[], bigint[], bigint[], integer[],
                           bigint[], integer[], bigint[], text[], bigint, "char"[], integer[],
                           bigint[], bigint[], bigint[], integer[], integer[], bigint[], text[],
                           text[], boolean[], "char"[], bigint[], integer[], bigint[], bigint[],
                           text[])
    RENAME TO settle_unchecked;
ALTER FUNCTION pgcg.load_parked(text, integer[], bigint[], bigint, integer, integer, text[],
                                bigint[], integer[])
    RENAME TO load_parked_unchecked;
ALTER FUNCTION pgcg.report_progress(text, text, bigint[], integer[], bigint[], float8[], text[],
                                    bigint)
    RENAME TO report_progress_unchecked;
ALTER FUNCTION pgcg.save_position(text, text, integer[], bigint[], bigint[])
    RENAME TO save_position_unchecked;
ALTER FUNCTION pgcg.release(text, text, integer[], bigint[], bigint[], boolean[], boolean)
    RENAME TO release_unchecked;
ALTER FUNCTION pgcg.tx_complete(text, text, integer, bigint, bigint, bigint, integer, bigint)
    RENAME TO tx_complete_unchecked;
ALTER FUNCTION pgcg.create_group(text, text, text) RENAME TO create_group_unchecked;
ALTER FUNCTION pgcg.group_lag(text) RENAME TO group_lag_unchecked;
ALTER FUNCTION pgcg.create_topic(text, integer, integer) RENAME TO create_topic_unchecked;

REVOKE EXECUTE ON FUNCTION
    pgcg.enqueue_unchecked(text, text[], jsonb[], jsonb[], text[], bigint[]),
    pgcg.fetch_unchecked(text, integer[], bigint[], bigint[], bigint[], integer, bigint),
    pgcg.adopt_unchecked(text, text, integer, bigint, integer, bigint),
    pgcg.settle_unchecked(text, text, integer[], bigint[], bigint[], bigint[], integer[],
                          bigint[], integer[], bigint[], text[], bigint, "char"[], integer[],
                          bigint[], bigint[], bigint[], integer[], integer[], bigint[], text[],
                          text[], boolean[], "char"[], bigint[], integer[], bigint[], bigint[],
                          text[]),
    pgcg.load_parked_unchecked(text, integer[], bigint[], bigint, integer, integer, text[],
                               bigint[], integer[]),
    pgcg.report_progress_unchecked(text, text, bigint[], integer[], bigint[], float8[], text[],
                                   bigint),
    pgcg.save_position_unchecked(text, text, integer[], bigint[], bigint[]),
    pgcg.release_unchecked(text, text, integer[], bigint[], bigint[], boolean[], boolean),
    pgcg.tx_complete_unchecked(text, text, integer, bigint, bigint, bigint, integer, bigint),
    pgcg.create_group_unchecked(text, text, text),
    pgcg.group_lag_unchecked(text),
    pgcg.create_topic_unchecked(text, integer, integer),
    pgcg.unbound(), pgcg.scope_denied(text, text, text), pgcg.require_group(text, text),
    pgcg.require_topic(text)
FROM PUBLIC;

-- Producers -----------------------------------------------------------------------------------

CREATE FUNCTION pgcg.enqueue(
    p_topic       text,
    p_keys        text[],
    p_payloads    jsonb[],
    p_headers     jsonb[] DEFAULT NULL,
    p_dedup_keys  text[] DEFAULT NULL,
    p_delays_ms   bigint[] DEFAULT NULL
) RETURNS TABLE (ord bigint, id bigint, partition integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_topic(p_topic);
    RETURN QUERY SELECT * FROM pgcg.enqueue_unchecked(p_topic, p_keys, p_payloads, p_headers,
                                                      p_dedup_keys, p_delays_ms);
END $$;

-- A topic's partition count, for a consumer joining one of its groups (not a secret: no
-- binding needed).
CREATE FUNCTION pgcg.topic_partitions(p_topic text) RETURNS TABLE (partitions integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
    SELECT t.partitions FROM pgcg.topics AS t WHERE t.name = p_topic
$$;

-- Membership ------------------------------------------------------------------------------------

CREATE FUNCTION pgcg.create_group(p_name text, p_topic text, p_from text DEFAULT 'earliest')
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_name, p_topic);
    RETURN pgcg.create_group_unchecked(p_name, p_topic, p_from);
END $$;

CREATE FUNCTION pgcg.join_group(p_group text, p_member text, p_host text, p_pid integer,
                                p_session_timeout_ms integer)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    INSERT INTO pgcg.consumer_groups (group_name, member_id, host, pid, session_timeout_ms,
                                      protocol)
    VALUES (p_group, p_member, p_host, p_pid, p_session_timeout_ms, 3);
END $$;

-- The heartbeat and the member's view of its assignments in one call. `alive` is false once
-- the coordinator expelled the member: it stops everything and rejoins.
CREATE FUNCTION pgcg.heartbeat(p_group text, p_member text)
RETURNS TABLE (alive boolean, partition integer, epoch bigint, state text, revoke_in float8)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY
    WITH me AS (
        UPDATE pgcg.consumer_groups AS cg SET last_heartbeat = now()
        WHERE cg.group_name = p_group AND cg.member_id = p_member
        RETURNING cg.member_id
    )
    SELECT me.member_id IS NOT NULL, pa.partition, pa.epoch, pa.state,
           extract(epoch FROM pa.revoke_deadline - now())::float8
    FROM (SELECT 1) AS one
    LEFT JOIN me ON true
    LEFT JOIN pgcg.partition_assignments AS pa
           ON pa.group_name = p_group AND pa.member_id = me.member_id
    ORDER BY pa.partition;
END $$;

-- The heartbeat of every member of one process (consumer/heartbeat.py) in one call: each
-- (group, member) pair renewed and answered as pgcg.heartbeat answers one member, with its
-- group and member on each row (one row with a NULL partition for a member without
-- partitions). Every group is checked first: one not bound to the caller fails the call.
-- Each pair is the process's own member and the coordinator locks one group's rows at a
-- time, so the several row locks cannot close a cycle with another process's.
CREATE FUNCTION pgcg.heartbeat_members(p_groups text[], p_members text[])
RETURNS TABLE (group_name text, member_id text, alive boolean, partition integer,
               epoch bigint, state text, revoke_in float8)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
#variable_conflict use_column
DECLARE
    g text;
BEGIN
    FOR g IN SELECT DISTINCT x FROM unnest(p_groups) AS x LOOP
        PERFORM pgcg.require_group(g);
    END LOOP;
    RETURN QUERY
    WITH asked AS (
        SELECT x.g AS group_name, x.m AS member_id
        FROM unnest(p_groups, p_members) AS x(g, m)
    ), me AS (
        UPDATE pgcg.consumer_groups AS cg SET last_heartbeat = now()
        FROM asked
        WHERE cg.group_name = asked.group_name AND cg.member_id = asked.member_id
        RETURNING cg.group_name, cg.member_id
    )
    SELECT asked.group_name, asked.member_id, me.member_id IS NOT NULL, pa.partition,
           pa.epoch, pa.state, extract(epoch FROM pa.revoke_deadline - now())::float8
    FROM asked
    LEFT JOIN me ON me.group_name = asked.group_name AND me.member_id = asked.member_id
    LEFT JOIN pgcg.partition_assignments AS pa
           ON pa.group_name = me.group_name AND pa.member_id = me.member_id
    ORDER BY asked.group_name, asked.member_id, pa.partition;
END $$;

CREATE FUNCTION pgcg.leave_group(p_group text, p_member text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    DELETE FROM pgcg.consumer_groups AS cg
    WHERE cg.group_name = p_group AND cg.member_id = p_member;
END $$;

-- What the group expects of one member, for its readiness (consumer/readiness.py): how many
-- partitions the group has and how many live members share them, which partitions are
-- assigned to this member and which are on their way to it.
CREATE FUNCTION pgcg.member_expectation(p_group text, p_member text)
RETURNS TABLE (partitions bigint, members bigint, assigned integer[], incoming integer[])
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT
        (SELECT count(*) FROM pgcg.partition_assignments AS pa
         WHERE pa.group_name = p_group),
        (SELECT count(*) FROM pgcg.consumer_groups AS cg
         WHERE cg.group_name = p_group
           AND cg.last_heartbeat >= now() - cg.session_timeout_ms * interval '1 millisecond'),
        coalesce((SELECT array_agg(pa.partition ORDER BY pa.partition)
                  FROM pgcg.partition_assignments AS pa
                  WHERE pa.group_name = p_group AND pa.member_id = p_member
                    AND pa.state = 'assigned'), '{}'),
        coalesce((SELECT array_agg(pa.partition ORDER BY pa.partition)
                  FROM pgcg.partition_assignments AS pa
                  WHERE pa.group_name = p_group AND pa.target_member_id = p_member
                    AND pa.member_id IS DISTINCT FROM p_member), '{}');
END $$;

-- Whether the member owns the partition under this epoch now (no lock: a transactional
-- handler's first statement, see consumer/transactional.py).
CREATE FUNCTION pgcg.owns(p_group text, p_topic text, p_partition integer, p_member text,
                          p_epoch bigint)
RETURNS boolean LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN EXISTS (
        SELECT FROM pgcg.partition_assignments AS pa
        WHERE pa.group_name = p_group AND pa.topic = p_topic AND pa.partition = p_partition
          AND pa.member_id = p_member AND pa.epoch = p_epoch
          AND pa.state IN ('assigned', 'revoking'));
END $$;

-- Reading and writing -----------------------------------------------------------------------------

CREATE FUNCTION pgcg.adopt(p_group text, p_member text, p_partition integer, p_epoch bigint,
                           p_max_attempts integer, p_retry_delay_ms bigint)
RETURNS TABLE (tick bigint, gen integer, finished bigint[], charged integer, buried integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.adopt_unchecked(p_group, p_member, p_partition, p_epoch,
                                                    p_max_attempts, p_retry_delay_ms);
END $$;

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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.fetch_unchecked(p_group, p_partitions, p_done, p_cur,
                                                    p_cur_offsets, p_limit, p_limit_bytes);
END $$;

CREATE FUNCTION pgcg.load_parked(p_group text, p_partitions integer[], p_held bigint[],
                                 p_lookahead_ms bigint, p_limit integer, p_followers integer,
                                 p_refill_keys text[], p_refill_after bigint[],
                                 p_refill_parts integer[])
RETURNS TABLE (id bigint, partition integer, tick bigint, "offset" bigint, key text,
               payload jsonb, headers jsonb, dedup_key text, enqueued_at timestamptz,
               attempts integer, due_in_ms bigint, origin text, bytes integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.load_parked_unchecked(
        p_group, p_partitions, p_held, p_lookahead_ms, p_limit, p_followers, p_refill_keys,
        p_refill_after, p_refill_parts);
END $$;

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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.settle_unchecked(
        p_group, p_member, m_parts, m_epochs, m_ticks, m_offsets, m_slots,
        c_ids, c_parts, c_epochs, c_tokens, c_visibility_ms,
        l_kinds, l_parts, l_epochs, l_ticks, l_offsets, l_slots, l_attempts, l_delays_ms,
        l_errors, l_origins, l_claimed,
        k_kinds, k_ids, k_parts, k_epochs, k_delays_ms, k_errors);
END $$;

CREATE FUNCTION pgcg.report_progress(p_group text, p_member text, p_ids bigint[],
                                     p_parts integer[], p_epochs bigint[],
                                     p_percents float8[], p_texts text[], p_visibility_ms bigint)
RETURNS TABLE (partition integer, epoch bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.report_progress_unchecked(
        p_group, p_member, p_ids, p_parts, p_epochs, p_percents, p_texts, p_visibility_ms);
END $$;

CREATE FUNCTION pgcg.save_position(p_group text, p_member text, p_parts integer[],
                                   p_epochs bigint[], p_ticks bigint[])
RETURNS TABLE (partition integer)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.save_position_unchecked(p_group, p_member, p_parts,
                                                            p_epochs, p_ticks);
END $$;

CREATE FUNCTION pgcg.release(p_group text, p_member text, p_parts integer[], p_epochs bigint[],
                             p_ticks bigint[], p_clean boolean[], p_revoked_only boolean)
RETURNS TABLE (partition integer, epoch bigint, new_owner text, old_epoch bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.release_unchecked(p_group, p_member, p_parts, p_epochs,
                                                      p_ticks, p_clean, p_revoked_only);
END $$;

CREATE FUNCTION pgcg.tx_complete(p_group text, p_member text, p_partition integer,
                                 p_epoch bigint, p_tick bigint, p_offset bigint, p_slot integer,
                                 p_parked_id bigint)
RETURNS TABLE (owned boolean, completed boolean, parked_left bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_group);
    RETURN QUERY SELECT * FROM pgcg.tx_complete_unchecked(
        p_group, p_member, p_partition, p_epoch, p_tick, p_offset, p_slot, p_parked_id);
END $$;

-- A group's lag per partition (consumers' and coordinators' metrics, `pgcg group list`).
CREATE FUNCTION pgcg.group_lag(p_name text)
RETURNS TABLE (partition integer, lag bigint, age_s float8, position_tick bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    PERFORM pgcg.require_group(p_name);
    RETURN QUERY SELECT * FROM pgcg.group_lag_unchecked(p_name);
END $$;

-- Administration ----------------------------------------------------------------------------------

-- A topic's tables and its reader are created by the owner, whoever asks: the checked
-- functions read them as the owner. Only roles granted EXECUTE may create topics.
CREATE FUNCTION pgcg.create_topic(p_name text, p_partitions integer DEFAULT 16,
                                  p_segments integer DEFAULT 8)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgcg AS $$
BEGIN
    RETURN pgcg.create_topic_unchecked(p_name, p_partitions, p_segments);
END $$;

REVOKE EXECUTE ON FUNCTION
    pgcg.enqueue(text, text[], jsonb[], jsonb[], text[], bigint[]),
    pgcg.topic_partitions(text),
    pgcg.create_group(text, text, text),
    pgcg.join_group(text, text, text, integer, integer),
    pgcg.heartbeat(text, text),
    pgcg.heartbeat_members(text[], text[]),
    pgcg.leave_group(text, text),
    pgcg.member_expectation(text, text),
    pgcg.owns(text, text, integer, text, bigint),
    pgcg.adopt(text, text, integer, bigint, integer, bigint),
    pgcg.fetch(text, integer[], bigint[], bigint[], bigint[], integer, bigint),
    pgcg.load_parked(text, integer[], bigint[], bigint, integer, integer, text[], bigint[],
                     integer[]),
    pgcg.settle(text, text, integer[], bigint[], bigint[], bigint[], integer[], bigint[],
                integer[], bigint[], text[], bigint, "char"[], integer[], bigint[], bigint[],
                bigint[], integer[], integer[], bigint[], text[], text[], boolean[], "char"[],
                bigint[], integer[], bigint[], bigint[], text[]),
    pgcg.report_progress(text, text, bigint[], integer[], bigint[], float8[], text[], bigint),
    pgcg.save_position(text, text, integer[], bigint[], bigint[]),
    pgcg.release(text, text, integer[], bigint[], bigint[], boolean[], boolean),
    pgcg.tx_complete(text, text, integer, bigint, bigint, bigint, integer, bigint),
    pgcg.group_lag(text),
    pgcg.create_topic(text, integer, integer)
FROM PUBLIC;
