-- Statements of shared/journal.py: the history a demo, chaos run or test records, and the
-- checks over it. These tables are not part of the pgcg schema.

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
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS pgcg_journal_key ON public.pgcg_journal (key, started_at);

-- name: record
INSERT INTO public.pgcg_journal
    (message_id, key, seq, partition, member_id, epoch, attempt, pid, started_at, finished_at)
VALUES (%(message_id)s, %(key)s, %(seq)s, %(partition)s, %(member_id)s, %(epoch)s,
        %(attempt)s, %(pid)s, %(started_at)s, %(finished_at)s)

-- name: produced
INSERT INTO public.pgcg_produced (seq, key, message_id)
SELECT * FROM unnest(%(seqs)s::bigint[], %(keys)s::text[], %(ids)s::bigint[])

-- name: produced_rows
SELECT seq, key FROM public.pgcg_produced

-- name: journal_rows
SELECT id, message_id, key, seq, partition, member_id, epoch, pid, started_at, finished_at
FROM public.pgcg_journal ORDER BY id

-- name: queue_depth
SELECT (SELECT count(*) FROM pgcg.messages WHERE topic = %(topic)s) AS pending,
       (SELECT count(*) FROM pgcg.dead_letters WHERE topic = %(topic)s) AS dead

-- name: max_seq
SELECT coalesce(max(seq), -1) AS seq FROM public.pgcg_produced
