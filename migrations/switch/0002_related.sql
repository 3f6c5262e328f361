-- Related transactions: voids, reversals, refunds, pre-authorisation,
-- settlement and batch upload.

ALTER TABLE journal
    -- Refunds so far against this entry (F3: never above its amount).
    ADD COLUMN refunded_amount bigint NOT NULL DEFAULT 0 CHECK (refunded_amount >= 0),
    -- R3: a reversal came while this entry was still at the issuer; an
    -- approval is reversed as soon as it arrives.
    ADD COLUMN reversal_requested boolean NOT NULL DEFAULT false,
    -- What the terminal sent to name the original (F61.1, F61.2, F61.3, F37, F38).
    ADD COLUMN original_ref text,
    ADD CONSTRAINT journal_refunds_within_amount CHECK (refunded_amount <= amount);

-- Voids find their original by terminal + batch + STAN; pre-auth cancels
-- and completions by auth code.
CREATE INDEX journal_auth_code ON journal (auth_code) WHERE kind = 'preauth';
CREATE INDEX journal_original ON journal (original_id) WHERE original_id IS NOT NULL;

-- S1: one settlement per terminal batch, as the terminal and the switch counted it.
CREATE TABLE settlements (
    terminal_id      text NOT NULL,
    batch            integer NOT NULL,
    merchant_id      text NOT NULL,
    terminal_totals  text NOT NULL,     -- F48 as the terminal sent it
    switch_totals    text NOT NULL,     -- the same 62 digits from the journal
    balanced         boolean NOT NULL,
    operator         text,
    settled_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, batch)
);

-- Batch upload (0320) records, compared with the journal in the settlement report.
CREATE TABLE batch_uploads (
    terminal_id  text NOT NULL,
    batch        integer NOT NULL,
    stan         integer NOT NULL,
    card_type    text NOT NULL,         -- 00 domestic, 01 foreign
    pan_masked   text,
    amount       bigint NOT NULL,
    uploaded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (terminal_id, batch, stan)
);
