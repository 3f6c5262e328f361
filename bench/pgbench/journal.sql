-- PostgreSQL's own rate for the switch's journal statements, the naive way:
-- the `sent` row, then its outcome, each in its own transaction (autocommit),
-- as `journal::insert` and `journal::complete` do for a purchase.
-- Run against a database migrated by the switch (schema `switch`):
--   pgbench -n -c 16 -j 2 -T 10 -f bench/pgbench/journal.sql "$DATABASE_URL"
\set batch random(1, 999999)
\set stan random(1, 2000000000)
\set amount random(1, 100000)
INSERT INTO switch.journal (id, rrn, terminal_id, merchant_id, batch, stan, mti, mti_class,
    processing_code, pos_condition, kind, amount, pan_hash, pan_masked, request_digest, state, issuer,
    link_stan, link_f7, business_date, sent_at)
SELECT id, lpad((id % 1000000000000)::text, 12, '0'), 'B' || lpad(:client_id::text, 7, '0'),
    '898310048160001', :batch, :stan, 200, 2, '000000', '00', 'purchase', :amount, '\x00',
    '622202*********0001', '\x00', 'sent', 'sim', nextval('switch.link_stan')::int,
    to_char(now(), 'MMDDHH24MISS'), current_date, now()
FROM (SELECT nextval('switch.journal_id_seq') AS id) n
RETURNING id AS journal_id \gset
UPDATE switch.journal SET state = 'approved', response_code = '00', auth_code = '123456', reply = '\x00',
    completed_at = now()
WHERE id = :journal_id AND state = 'sent';
