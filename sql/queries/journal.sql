-- Statements of bench/chaos/journal.py: the history a demo, chaos run or test records, and the
-- checks over it. These tables are not part of the pgcg schema.
--
-- Besides what the producer and the recording handler write, two AFTER triggers on pgcg's
-- own tables record what the database decided, with the server's clock_timestamp():
--   pgcg_deleted    every message row deleted (an accepted ack or a dead-letter), and which
--                   process's session deleted it (the pgcg.proc setting, see cluster.py);
--   pgcg_ownership  every change of a partition's owner, epoch or state.
-- They only insert into these side tables, so pgcg behaves as without them. Together they
-- tell exactly which handling's ack was accepted and when each epoch ended, without
-- assuming that the fencing under test works.

-- name: create
CREATE TABLE IF NOT EXISTS public.pgcg_produced (
    seq         bigint PRIMARY KEY,
    key         text NOT NULL,
    message_id  bigint,
    produced_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS public.pgcg_journal (
    id           bigserial PRIMARY KEY,
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
    finished_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS pgcg_journal_key ON public.pgcg_journal (key, started_at);
CREATE TABLE IF NOT EXISTS public.pgcg_deleted (
    message_id   bigint NOT NULL,
    topic        text NOT NULL,
    partition    integer NOT NULL,
    proc         text,
    claimed_by   text,
    claim_epoch  bigint,
    deleted_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS public.pgcg_ownership (
    id          bigserial PRIMARY KEY,
    group_name  text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    member_id   text,
    epoch       bigint NOT NULL,
    state       text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION public.pgcg_journal_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.pgcg_deleted (message_id, topic, partition, proc, claimed_by, claim_epoch)
    VALUES (OLD.id, OLD.topic, OLD.partition, current_setting('pgcg.proc', true),
            OLD.claimed_by, OLD.claim_epoch);
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER pgcg_journal_deleted AFTER DELETE ON pgcg.messages
    FOR EACH ROW EXECUTE FUNCTION public.pgcg_journal_deleted();
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

-- name: record
INSERT INTO public.pgcg_journal
    (message_id, key, seq, partition, member_id, epoch, attempt, pid, proc, started_at,
     finished_at)
VALUES (%(message_id)s, %(key)s, %(seq)s, %(partition)s, %(member_id)s, %(epoch)s,
        %(attempt)s, %(pid)s, current_setting('pgcg.proc', true), %(started_at)s,
        %(finished_at)s)

-- name: produced
INSERT INTO public.pgcg_produced (seq, key, message_id)
SELECT * FROM unnest(%(seqs)s::bigint[], %(keys)s::text[], %(ids)s::bigint[])

-- name: produced_rows
SELECT seq, key, message_id FROM public.pgcg_produced

-- name: journal_rows
SELECT id, message_id, key, seq, partition, member_id, epoch, attempt, pid, proc,
       started_at, finished_at
FROM public.pgcg_journal ORDER BY id

-- name: deleted_rows
SELECT message_id, partition, proc, deleted_at FROM public.pgcg_deleted
WHERE topic = %(topic)s ORDER BY deleted_at

-- name: ownership_rows
SELECT partition, member_id, epoch, state, changed_at FROM public.pgcg_ownership
WHERE topic = %(topic)s ORDER BY id

-- name: pending_ids
SELECT id FROM pgcg.messages WHERE topic = %(topic)s

-- name: dead_ids
SELECT message_id FROM pgcg.dead_letters WHERE topic = %(topic)s

-- name: forced_handoffs
-- Hand-offs the leader forced (drain deadline passed, or the owner died): redeliveries
-- after these are expected.
SELECT r.started_at, (m ->> 'partition')::int AS partition
FROM pgcg.rebalances AS r, jsonb_array_elements(r.moves) AS m
WHERE m ->> 'kind' = 'forced'

-- name: rebalances
-- The leaders' recorded rebalances of the groups consuming a topic, in generation order.
SELECT r.group_name, r.generation, r.leader_epoch, r.started_at
FROM pgcg.rebalances AS r JOIN pgcg.subscriptions AS s USING (group_name)
WHERE s.topic = %(topic)s
ORDER BY r.group_name, r.generation

-- name: queue_depth
SELECT (SELECT count(*) FROM pgcg.messages WHERE topic = %(topic)s) AS pending,
       (SELECT count(*) FROM pgcg.dead_letters WHERE topic = %(topic)s) AS dead

-- name: max_seq
SELECT coalesce(max(seq), -1) AS seq FROM public.pgcg_produced
