-- pgcg schema, version 8: the starts of a round (marks of log messages, claims of parked
-- ones) are fenced by their own epoch, as its results always were.
--
-- A start passed when its partition was startable for this member at any epoch the round
-- named. A member that lost a partition with a claim still waiting to be written (the
-- database was out of reach), then got the partition back at a later epoch and claimed
-- the same parked message again, sent both claims in one round: the stale one went
-- through on the current epoch's ownership and could leave the row claimed under the old
-- epoch. The current delivery's result, fenced by its epoch, then did not delete the
-- row; the consumer took the answer for "written before", moved the key on, and the next
-- owner ran the message again after the key's later ones. Now a start needs (partition,
-- epoch) to be startable, a claim is answered by the claim its row holds (epoch and
-- token), and a mark is answered per (partition, epoch), its epoch in `ref`.
--
-- The body is version 3's settle (renamed settle_unchecked by version 4) with those three
-- changes; the checked pgcg.settle still calls it.

CREATE OR REPLACE FUNCTION pgcg.settle_unchecked(
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
    start_e bigint[];
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
           array_agg(o.partition) FILTER (WHERE o.startable),
           array_agg(o.epoch) FILTER (WHERE o.startable)
    INTO owned_p, owned_e, start_p, start_e
    FROM pgcg.owned(p_group, p_member, parts, epochs) AS o;
    owned_p := coalesce(owned_p, '{}'); owned_e := coalesce(owned_e, '{}');
    start_p := coalesce(start_p, '{}'); start_e := coalesce(start_e, '{}');

    -- Marks: one ledger row per partition, in the slot of the round's newest message.
    INSERT INTO pgcg.ledger (slot, group_id, partition, kind, gen, epoch, tick, offsets)
    SELECT (array_agg(m.s ORDER BY m.t DESC, m.o DESC))[1], g.id, m.p, 'm', g.seek_gen, m.e,
           max(m.t), array_agg(m.o)
    FROM unnest(m_parts, m_epochs, m_ticks, m_offsets, m_slots) AS m(p, e, t, o, s)
    WHERE (m.p, m.e) IN (SELECT * FROM unnest(start_p, start_e))
    GROUP BY m.p, m.e;
    RETURN QUERY SELECT DISTINCT 'm'::"char", m.p, m.e,
                        (m.p, m.e) IN (SELECT * FROM unnest(start_p, start_e)), NULL::bigint
                 FROM unnest(m_parts, m_epochs) AS m(p, e);

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
          AND (c.p, c.e) IN (SELECT * FROM unnest(start_p, start_e))
          -- A claim past its deadline is abandoned (see load_parked): claimed again.
          AND (pk.claimed_epoch IS NULL OR pk.claim_token = c.tok
               OR pk.locked_until < clock_timestamp())
        RETURNING pk.id, pk.partition, pk.attempts, pk.claimed_epoch, pk.claim_token
    )
    SELECT 'c'::"char", c.p, c.id, cl.id IS NOT NULL, cl.attempts::bigint
    FROM unnest(c_ids, c_parts, c_epochs, c_tokens) AS c(id, p, e, tok)
    LEFT JOIN claimed AS cl ON cl.id = c.id AND cl.claimed_epoch = c.e AND cl.claim_token = c.tok;

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
