-- The simulated issuer's books, in schema `issuer` (the switch has its own
-- tables in the same database; every name here is schema-qualified).
--
-- Card data: a card is found by the HMAC-SHA-256 of its PAN under the
-- issuer's own key, and shown masked (first 6 / last 4). No clear PAN, track
-- data or PIN block is ever stored.

-- What the database remembers of the PAN key (the HMAC of a fixed label),
-- so that a process holding another key is refused instead of seeding a
-- second set of cards.
CREATE TABLE issuer.meta (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    key_check  bytea NOT NULL
);

CREATE TABLE issuer.cards (
    id               bigserial PRIMARY KEY,
    pan_hash         bytea NOT NULL UNIQUE CHECK (length(pan_hash) = 32),
    pan_masked       text NOT NULL,
    expiry           text NOT NULL CHECK (expiry ~ '^[0-9]{2}(0[1-9]|1[0-2])$'),   -- YYMM
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked', 'lost', 'stolen')),
    opening_balance  bigint NOT NULL,                  -- fen, as seeded
    balance          bigint NOT NULL,                  -- fen, the ledger balance
    held             bigint NOT NULL DEFAULT 0 CHECK (held >= 0),  -- open pre-authorisation holds
    txn_limit        bigint NOT NULL CHECK (txn_limit > 0),        -- largest purchase / pre-auth
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- One row per message of the switch that posts or declines, keyed as the
-- switch keys it: a repeat (or a concurrent duplicate) conflicts on the key
-- and gets the stored outcome. A reversal advice that overtakes its
-- original leaves a row under the original's key with kind 'awaited' and no
-- fingerprint: the original, when it comes, is declined `68` and never posted.
CREATE TABLE issuer.postings (
    id               bigserial PRIMARY KEY,
    acquirer         text NOT NULL CHECK (acquirer ~ '^[0-9]{11}$'),  -- F32, zero-padded as in F90
    stan             text NOT NULL CHECK (stan ~ '^[0-9]{6}$'),       -- F11 of the link
    transmitted      text NOT NULL CHECK (transmitted ~ '^[0-9]{10}$'), -- F7, MMDDhhmmss UTC
    mti_class        smallint NOT NULL,                                 -- 1, 2, 4
    mti              text NOT NULL,                    -- as first received, e.g. 0220 (a repeat 0221 is the same row)
    forwarding       text,                             -- F33
    fingerprint      bytea,                            -- what a repeat must match; NULL: 'awaited'
    kind             text NOT NULL CHECK (kind IN ('balance_inquiry', 'purchase', 'void', 'refund', 'preauth',
                         'preauth_cancel', 'completion', 'completion_void', 'reversal', 'awaited')),
    processing_code  text,                             -- F3
    condition_code   text,                             -- F25
    card_id          bigint REFERENCES issuer.cards (id),
    pan_masked       text,
    amount           bigint NOT NULL DEFAULT 0 CHECK (amount >= 0),  -- F4, fen
    balance_change   bigint NOT NULL DEFAULT 0,        -- what this posting did to the card's balance
    hold_change      bigint NOT NULL DEFAULT 0,        -- ... and to its holds
    response_code    text,                             -- F39 answered
    auth_code        text,                             -- F38 answered
    available_reply  bigint,                           -- F54 answered (balance inquiry)
    rrn              text,                             -- F37
    terminal         text,                             -- F41
    merchant         text,                             -- F42
    original_ref     text,                             -- F90 as sent
    original_id      bigint REFERENCES issuer.postings (id),
    reason           text,                             -- F39 of a reversal advice
    state            text NOT NULL CHECK (state IN ('processing', 'awaited', 'approved', 'declined', 'voided',
                         'reversed', 'partially_refunded', 'refunded', 'completed', 'cancelled')),
    refunded         bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0),  -- refunds credited against it
    reversed         boolean NOT NULL DEFAULT false,   -- a reversal undid (or pre-empted) it
    reversal_id      bigint REFERENCES issuer.postings (id),
    note             text,                             -- why, for people: 'applied', 'original not seen', ...
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT postings_key UNIQUE (acquirer, stan, transmitted, mti_class)
);

CREATE INDEX postings_created_at ON issuer.postings (created_at);
CREATE INDEX postings_original_id ON issuer.postings (original_id);
CREATE INDEX postings_card_id ON issuer.postings (card_id);
