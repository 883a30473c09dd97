-- Statements of the consumer (consumer/member.py, assignment.py, fetcher.py, acker.py).
--
-- Fencing: every statement that acts on a partition names the (member, epoch) it believes
-- owns it and locks that assignment row FOR SHARE, so an epoch bump by the coordinator
-- either waits for the statement or makes it match nothing. Zero rows means "lost it".

-- name: topic_partitions
SELECT partitions FROM pgcg.topics WHERE name = %(topic)s

-- name: subscribe
INSERT INTO pgcg.subscriptions (group_name, topic) VALUES (%(group)s, %(topic)s)
ON CONFLICT (group_name) DO NOTHING

-- name: subscription
SELECT topic FROM pgcg.subscriptions WHERE group_name = %(group)s

-- name: ensure_assignment_rows
INSERT INTO pgcg.partition_assignments (group_name, topic, partition)
SELECT %(group)s, %(topic)s, p FROM generate_series(0, %(partitions)s - 1) AS p
ON CONFLICT DO NOTHING

-- name: join
INSERT INTO pgcg.consumer_groups (group_name, member_id, host, pid, session_timeout_ms)
VALUES (%(group)s, %(member)s, %(host)s, %(pid)s, %(session_timeout_ms)s)

-- name: notify_coordinator
SELECT pg_notify('pgcg.coordinator', json_build_object(
    'group', %(group)s::text, 'event', %(event)s::text, 'member', %(member)s::text)::text)

-- name: heartbeat
-- The heartbeat and the member's view of its assignments in one round trip. `alive` is
-- false once the coordinator expelled us: stop everything and rejoin.
WITH me AS (
    UPDATE pgcg.consumer_groups SET last_heartbeat = now()
    WHERE group_name = %(group)s AND member_id = %(member)s
    RETURNING member_id
)
SELECT me.member_id IS NOT NULL AS alive, pa.partition, pa.epoch, pa.state,
       extract(epoch FROM pa.revoke_deadline - now())::float8 AS revoke_in
FROM (SELECT 1) AS one
LEFT JOIN me ON true
LEFT JOIN pgcg.partition_assignments AS pa
       ON pa.group_name = %(group)s AND pa.member_id = me.member_id
ORDER BY pa.partition

-- name: leave
DELETE FROM pgcg.consumer_groups WHERE group_name = %(group)s AND member_id = %(member)s

-- name: adopt
-- A partition (re)started in memory: rows we claimed earlier under this same epoch (before
-- a self-fence or a claim whose answer was lost) are put back so the next claim sees them.
-- Rows we still hold in memory (`held`) stay claimed: a claim returning one of them could
-- race its ack, and the scheduler would take the acked message for a new one.
UPDATE pgcg.messages AS m
SET claim_epoch = NULL, claimed_by = NULL
FROM (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
      AND pa.partition = %(partition)s AND pa.epoch = %(epoch)s
    FOR SHARE
) AS o
WHERE m.topic = %(topic)s AND m.partition = o.partition AND m.claim_epoch = o.epoch
  AND m.id <> ALL(%(held)s::bigint[])

-- name: claim
-- Claim the oldest unclaimed rows of each owned partition, up to a limit per partition,
-- including rows not yet due: the scheduler must see a waiting head to block its key.
-- A row claimed under an older epoch and never finished was lost to a crash or a forced
-- hand-off: that counts as a failed delivery.
--
-- The UPDATE finds its rows by id list (an index lookup per owned partition), not by a
-- join with the picked rows: the planner costs a join against the partitioned table as
-- if every partition were probed per row, and picked a hash join over a full scan of
-- the topic instead, once per owned partition, so a claim cost O(backlog). The epoch
-- comes from `owned`, which only holds partitions this member owns at that epoch.
WITH owned AS (
    SELECT pa.partition, pa.epoch
    FROM pgcg.partition_assignments AS pa
    JOIN unnest(%(partitions)s::int[], %(epochs)s::bigint[]) AS want(partition, epoch)
      ON want.partition = pa.partition AND want.epoch = pa.epoch
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
      AND pa.member_id = %(member)s AND pa.state = 'assigned'
    ORDER BY pa.partition
    FOR SHARE OF pa
), picked AS (
    SELECT c.id
    FROM owned AS o
    CROSS JOIN LATERAL (
        SELECT m.id FROM pgcg.messages AS m
        WHERE m.topic = %(topic)s AND m.partition = o.partition
          AND m.claim_epoch IS DISTINCT FROM o.epoch
          AND m.key <> ALL (%(skip_keys)s::text[])  -- keys held behind a waiting head
        ORDER BY m.id
        LIMIT %(limit)s
    ) AS c
)
UPDATE pgcg.messages AS m
SET claim_epoch = (SELECT o.epoch FROM owned AS o WHERE o.partition = m.partition),
    claimed_by = %(member)s,
    attempts = m.attempts + (m.claimed_by IS NOT NULL)::int,
    locked_until = now() + %(visibility_s)s * interval '1 second',
    progress = NULL  -- a dead delivery's last report says nothing about this one
WHERE m.topic = %(topic)s
  AND m.partition = ANY (%(partitions)s::int[])
  AND m.id = ANY (ARRAY(SELECT id FROM picked))
RETURNING m.id, m.partition, m.key, m.payload,
          nullif(m.headers, '{}'::jsonb) AS headers,  -- most have none: nothing to parse
          m.attempts, m.enqueued_at, m.claim_epoch AS epoch,
          greatest(extract(epoch FROM m.available_at - now()), 0)::float8 AS due_in

-- name: unclaim
-- Later messages of a key whose head waits for a retry go back to the table (fenced like
-- a claim), so they do not fill the prefetch window; claimed_by is cleared, so claiming
-- them again counts no failed attempt.
WITH owned AS (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
      AND pa.partition = ANY(%(partitions)s::int[])
    ORDER BY pa.partition
    FOR SHARE
)
UPDATE pgcg.messages AS m
SET claim_epoch = NULL, claimed_by = NULL, locked_until = NULL
FROM owned AS o
WHERE m.topic = %(topic)s AND m.partition = ANY(%(partitions)s::int[])
  AND m.id = ANY(%(ids)s::bigint[]) AND m.partition = o.partition AND m.claim_epoch = o.epoch

-- name: owned_now
-- What this member owns right now (no lock, no heartbeat): used to tell a zombie's rejected
-- result from one whose row an earlier write of ours already removed.
SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
  AND pa.state IN ('assigned', 'revoking')

-- name: ack
-- One statement for a whole batch; each row is checked against its own partition's epoch,
-- so a stale entry neither lets the others through nor blocks them. Returns what was acked.
WITH batch AS (
    SELECT * FROM unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[])
        AS b(partition, epoch, id)
), owned AS (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
      AND pa.state IN ('assigned', 'revoking')
      AND pa.partition = ANY(%(partitions)s::int[])
    ORDER BY pa.partition
    FOR SHARE
)
DELETE FROM pgcg.messages AS m
USING batch AS b JOIN owned AS o ON o.partition = b.partition AND o.epoch = b.epoch
WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
RETURNING m.id

-- name: nack
-- Failed deliveries: count the attempt, wait before the next one. The key stays blocked.
WITH batch AS (
    SELECT * FROM unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[],
                         %(delays_ms)s::bigint[], %(errors)s::text[])
        AS b(partition, epoch, id, delay_ms, error)
), owned AS (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
      AND pa.state IN ('assigned', 'revoking')
      AND pa.partition = ANY(%(partitions)s::int[])
    ORDER BY pa.partition
    FOR SHARE
)
UPDATE pgcg.messages AS m
SET attempts = m.attempts + 1,
    available_at = now() + b.delay_ms * interval '1 millisecond',
    last_error = b.error,
    claimed_by = NULL,
    progress = NULL
FROM batch AS b JOIN owned AS o ON o.partition = b.partition AND o.epoch = b.epoch
WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
RETURNING m.id

-- name: dead_letter
-- The last failure: the message leaves the queue and enters dead_letters atomically.
WITH batch AS (
    SELECT * FROM unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[],
                         %(errors)s::text[])
        AS b(partition, epoch, id, error)
), owned AS (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
      AND pa.state IN ('assigned', 'revoking')
      AND pa.partition = ANY(%(partitions)s::int[])
    ORDER BY pa.partition
    FOR SHARE
), gone AS (
    DELETE FROM pgcg.messages AS m
    USING batch AS b JOIN owned AS o ON o.partition = b.partition AND o.epoch = b.epoch
    WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
    RETURNING m.*, b.error
)
INSERT INTO pgcg.dead_letters
    (message_id, topic, partition, key, payload, headers, enqueued_at, attempts, last_error,
     group_name, member_id)
SELECT g.id, g.topic, g.partition, g.key, g.payload, g.headers, g.enqueued_at,
       g.attempts + 1, g.error, %(group)s, %(member)s
FROM gone AS g
RETURNING message_id AS id

-- name: release
-- Hand revoked (or, on leave, all) partitions on: to the target the leader chose, else to
-- nobody, with the epoch bumped either way. Rows we claimed but did not finish are
-- unclaimed so the next owner takes them without counting a failed attempt.
WITH locked AS (
    -- Assignment rows are locked in partition order everywhere, so we never deadlock
    -- with a rebalance that locks the whole group.
    SELECT pa.partition FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
      AND pa.partition = ANY(%(partitions)s::int[]) AND pa.member_id = %(member)s
    ORDER BY pa.partition
    FOR UPDATE
), released AS (
    UPDATE pgcg.partition_assignments AS pa
    SET member_id = pa.target_member_id,
        state = CASE WHEN pa.target_member_id IS NULL THEN 'unassigned' ELSE 'assigned' END,
        epoch = pa.epoch + 1,
        target_member_id = NULL,
        revoke_deadline = NULL,
        assigned_at = now()
    FROM unnest(%(partitions)s::int[], %(epochs)s::bigint[]) AS r(partition, epoch)
    JOIN locked AS l ON l.partition = r.partition
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
      AND pa.partition = r.partition AND pa.epoch = r.epoch AND pa.member_id = %(member)s
      -- A release of revoked partitions must not hand on one whose revocation the leader
      -- called off meanwhile: we are working on it again. (On shutdown, all go.)
      AND (NOT %(revoked_only)s OR pa.state = 'revoking')
    RETURNING pa.partition, pa.epoch, pa.member_id AS new_owner, r.epoch AS old_epoch
), unclaimed AS (
    UPDATE pgcg.messages AS m
    SET claim_epoch = NULL, claimed_by = NULL, locked_until = NULL, progress = NULL
    FROM released AS r
    WHERE m.topic = %(topic)s AND m.partition = r.partition AND m.claim_epoch = r.old_epoch
    RETURNING 1
)
SELECT r.partition, r.epoch, r.new_owner,
       (SELECT count(*) FROM unclaimed) AS unclaimed,
       pg_notify('pgcg.g.' || %(group)s::text, 'assignment'),
       pg_notify('pgcg.coordinator', json_build_object(
           'group', %(group)s::text, 'event', 'release', 'member', %(member)s::text)::text)
FROM released AS r
ORDER BY r.partition

-- name: progress
-- Progress reports of running handlers (consumer/progress.py), a batch in one statement,
-- each row fenced by its partition's epoch like an ack and written only while the row is
-- still claimed by us. A report also moves the row's visibility deadline. Returns the
-- batch's partitions we still own: a partition missing from the answer was lost. (The
-- UPDATE runs although nothing reads it: data-modifying CTEs always run to completion.)
WITH batch AS (
    SELECT * FROM unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[],
                         %(percents)s::float8[], %(texts)s::text[])
        AS b(partition, epoch, id, percent, text)
), owned AS (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s AND pa.member_id = %(member)s
      AND pa.state IN ('assigned', 'revoking')
      AND pa.partition = ANY(%(partitions)s::int[])
    ORDER BY pa.partition
    FOR SHARE
), written AS (
    UPDATE pgcg.messages AS m
    SET progress = jsonb_build_object('percent', b.percent, 'text', b.text, 'at', now()),
        locked_until = now() + %(visibility_s)s * interval '1 second'
    FROM batch AS b JOIN owned AS o ON o.partition = b.partition AND o.epoch = b.epoch
    WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
      AND m.claimed_by = %(member)s AND m.claim_epoch = b.epoch
    RETURNING m.id
)
SELECT DISTINCT o.partition, o.epoch
FROM owned AS o JOIN batch AS b ON b.partition = o.partition AND b.epoch = o.epoch

-- name: tx_begin
-- The first statement of a transactional handler's transaction (sent with BEGIN in one
-- round trip, see consumer/transactional.py): a token local to this transaction, so the
-- ack can tell that the handler did not end it, and whether we still own the partition.
-- No lock here: it is taken by tx_ack, so a long handler never holds up a hand-off.
SELECT set_config('pgcg.tx_token', %(token)s, true) AS token,
       EXISTS (
           SELECT FROM pgcg.partition_assignments AS pa
           WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
             AND pa.partition = %(partition)s AND pa.member_id = %(member)s
             AND pa.epoch = %(epoch)s AND pa.state IN ('assigned', 'revoking')
       ) AS owned

-- name: tx_ack
-- The ack of a transactional handler, in its own transaction right before COMMIT. The
-- assignment row is locked FOR SHARE here, so an epoch bump either waits for our commit
-- or has already happened and this matches nothing: then the caller rolls back and the
-- handler's writes never land. `intact` is false when the transaction is not the one
-- tx_begin opened (the handler committed and began another).
WITH owned AS (
    SELECT pa.partition, pa.epoch FROM pgcg.partition_assignments AS pa
    WHERE pa.group_name = %(group)s AND pa.topic = %(topic)s
      AND pa.partition = %(partition)s AND pa.member_id = %(member)s
      AND pa.epoch = %(epoch)s AND pa.state IN ('assigned', 'revoking')
    FOR SHARE
), gone AS (
    DELETE FROM pgcg.messages AS m
    USING owned AS o
    WHERE m.topic = %(topic)s AND m.partition = o.partition AND m.id = %(id)s
    RETURNING m.id
)
SELECT coalesce(current_setting('pgcg.tx_token', true) = %(token)s, false) AS intact,
       EXISTS (SELECT FROM owned) AS owned,
       EXISTS (SELECT FROM gone) AS acked

-- Test builds only: PGCG_UNSAFE_DISABLE_FENCING=1 makes the acker use these instead of
-- ack, nack and dead_letter. They are the same writes without the epoch fence, so a
-- zombie's result goes through; `pgcg chaos --unsafe-no-fencing` runs them to prove its
-- checker catches what the fence prevents. Never set it in production.

-- name: ack_unfenced
DELETE FROM pgcg.messages AS m
USING unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[])
    AS b(partition, epoch, id)
WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
RETURNING m.id

-- name: nack_unfenced
UPDATE pgcg.messages AS m
SET attempts = m.attempts + 1,
    available_at = now() + b.delay_ms * interval '1 millisecond',
    last_error = b.error,
    claimed_by = NULL,
    progress = NULL
FROM unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[],
            %(delays_ms)s::bigint[], %(errors)s::text[])
    AS b(partition, epoch, id, delay_ms, error)
WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
RETURNING m.id

-- name: dead_letter_unfenced
WITH gone AS (
    DELETE FROM pgcg.messages AS m
    USING unnest(%(partitions)s::int[], %(epochs)s::bigint[], %(ids)s::bigint[],
                 %(errors)s::text[]) AS b(partition, epoch, id, error)
    WHERE m.topic = %(topic)s AND m.partition = b.partition AND m.id = b.id
    RETURNING m.*, b.error
)
INSERT INTO pgcg.dead_letters
    (message_id, topic, partition, key, payload, headers, enqueued_at, attempts, last_error,
     group_name, member_id)
SELECT g.id, g.topic, g.partition, g.key, g.payload, g.headers, g.enqueued_at,
       g.attempts + 1, g.error, %(group)s, %(member)s
FROM gone AS g
RETURNING message_id AS id
