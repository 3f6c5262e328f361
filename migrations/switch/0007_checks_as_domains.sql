-- Checks where values are written. A CHECK constraint is parsed and
-- prepared again by every statement that writes its table, and evaluated on
-- every UPDATE of a row whatever changed (each outcome re-checked the
-- amount). A domain's check is prepared once per session and runs only
-- where a value of it is written. The same values are refused as before;
-- only the rule that spans two columns (refunds within the amount, F3)
-- stays a table constraint.
CREATE DOMAIN journal_state AS text CHECK (VALUE IN ('received', 'sent', 'approved', 'declined',
    'unknown', 'voided', 'reversed', 'partially_refunded', 'refunded', 'completed', 'cancelled'));
CREATE DOMAIN advice_kind AS text CHECK (VALUE IN ('reversal', 'refund', 'completion'));
CREATE DOMAIN advice_state AS text CHECK (VALUE IN ('pending', 'done', 'failed'));
-- An amount in fen, never below zero.
CREATE DOMAIN fen AS bigint CHECK (VALUE >= 0);

ALTER TABLE journal
    DROP CONSTRAINT journal_state_check,
    DROP CONSTRAINT journal_amount_check,
    DROP CONSTRAINT journal_refunded_amount_check,
    ALTER COLUMN state TYPE journal_state,
    ALTER COLUMN amount TYPE fen,
    ALTER COLUMN refunded_amount TYPE fen;

ALTER TABLE advices
    DROP CONSTRAINT advices_kind_check,
    DROP CONSTRAINT advices_state_check,
    ALTER COLUMN kind TYPE advice_kind,
    ALTER COLUMN state TYPE advice_state;
