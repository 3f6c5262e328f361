-- A CHECK constraint is parsed and prepared again by every statement that
-- writes its table, and evaluated again on every UPDATE of a row, whatever
-- columns changed: each purchase re-checked its card's expiry against a
-- regular expression, and each posting re-parsed seven checks. In `perf`
-- this was the largest single item of PostgreSQL's CPU under load (8.8%,
-- ExecConstraints; half of it reading the checks' stored expressions).
--
-- * Lists of values become domains: a domain's check is prepared once per
--   session and runs only when a value is written to that column.
-- * Formats the issuer has already checked before any statement are not
--   checked twice: F32, F11 and F7 are digits by the network dialect and
--   `request::read`, the PAN hash is a 32-byte HMAC by construction, and
--   the expiry is checked by the config (`config check`).
-- * The money guards become domains too: amounts, refunds and holds never
--   below zero, limits above zero, checked where such a value is written
--   (a purchase checks the hold it writes, not the card's limit again).
CREATE DOMAIN issuer.posting_kind AS text CHECK (VALUE IN ('balance_inquiry', 'purchase', 'void',
    'refund', 'preauth', 'preauth_cancel', 'completion', 'completion_void', 'reversal', 'awaited'));
CREATE DOMAIN issuer.posting_state AS text CHECK (VALUE IN ('processing', 'awaited', 'approved',
    'declined', 'voided', 'reversed', 'partially_refunded', 'refunded', 'completed', 'cancelled'));
CREATE DOMAIN issuer.card_status AS text CHECK (VALUE IN ('active', 'blocked', 'lost', 'stolen'));
CREATE DOMAIN issuer.fen AS bigint CHECK (VALUE >= 0);
CREATE DOMAIN issuer.limit_fen AS bigint CHECK (VALUE > 0);

ALTER TABLE issuer.postings
    DROP CONSTRAINT postings_acquirer_check,
    DROP CONSTRAINT postings_stan_check,
    DROP CONSTRAINT postings_transmitted_check,
    DROP CONSTRAINT postings_kind_check,
    DROP CONSTRAINT postings_state_check,
    DROP CONSTRAINT postings_amount_check,
    DROP CONSTRAINT postings_refunded_check,
    ALTER COLUMN kind TYPE issuer.posting_kind,
    ALTER COLUMN state TYPE issuer.posting_state,
    ALTER COLUMN amount TYPE issuer.fen,
    ALTER COLUMN refunded TYPE issuer.fen;

ALTER TABLE issuer.cards
    DROP CONSTRAINT cards_pan_hash_check,
    DROP CONSTRAINT cards_expiry_check,
    DROP CONSTRAINT cards_status_check,
    DROP CONSTRAINT cards_held_check,
    DROP CONSTRAINT cards_txn_limit_check,
    ALTER COLUMN status TYPE issuer.card_status,
    ALTER COLUMN held TYPE issuer.fen,
    ALTER COLUMN txn_limit TYPE issuer.limit_fen;
