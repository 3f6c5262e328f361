-- Every index of the journal is written when a request's row goes in and
-- again when its outcome is recorded (the outcome UPDATE is not HOT), so each
-- one costs every transaction twice. Three only served lookups another index
-- can serve:
--
-- * the RRN is the id's last twelve digits (see the `rrn` column): a lookup
--   by RRN goes through the primary key (`journal::rrn_id`), exact for the
--   first 10^12 entries;
-- * the request key, led by terminal and batch, serves the settlement
--   totals, the settlement report and `txn show` by terminal, batch and STAN
--   (its uniqueness does not depend on the column order);
-- * a pre-authorisation is found by its card (P1: auth code + date + card),
--   which never changes, where the auth code is written with the outcome.
ALTER TABLE journal DROP CONSTRAINT journal_request_key;
ALTER TABLE journal ADD CONSTRAINT journal_request_key UNIQUE (terminal_id, batch, stan, mti_class, merchant_id);
DROP INDEX journal_terminal_batch;
DROP INDEX journal_rrn;
DROP INDEX journal_auth_code;
CREATE INDEX journal_preauths ON journal (pan_hash) WHERE kind = 'preauth';
