-- The switch's schema: terminals and merchants, the journal (one row per
-- terminal request), and the store-and-forward advice queue.
-- Card data: a keyed hash of the PAN for matching and the PAN masked to first
-- 6 / last 4 for people; never the clear PAN, track data, PIN block or CVV.

CREATE TABLE merchants (
    id       text PRIMARY KEY CHECK (length(id) = 15),   -- F42
    name     text NOT NULL,
    mcc      text NOT NULL DEFAULT '5999' CHECK (mcc ~ '^[0-9]{4}$'),
    enabled  boolean NOT NULL DEFAULT true
);

CREATE TABLE terminals (
    id            text PRIMARY KEY CHECK (length(id) = 8),  -- F41
    merchant_id   text NOT NULL REFERENCES merchants (id),
    enabled       boolean NOT NULL DEFAULT true,
    batch         integer NOT NULL DEFAULT 1 CHECK (batch BETWEEN 1 AND 999999),  -- the open batch, F60.2
    signed_on_at  timestamptz
);

-- The switch's own STAN on the issuer links (F11, n6), shared by every
-- switch process on this database.
CREATE SEQUENCE link_stan MINVALUE 1 MAXVALUE 999999 CYCLE;

CREATE TABLE journal (
    id               bigserial PRIMARY KEY,
    -- The switch-assigned retrieval reference number, F37: unique because the id is.
    rrn              text GENERATED ALWAYS AS (lpad((id % 1000000000000)::text, 12, '0')) STORED,
    terminal_id      text NOT NULL,
    merchant_id      text NOT NULL,
    batch            integer NOT NULL,
    stan             integer NOT NULL,                 -- the terminal's F11
    mti              smallint NOT NULL,                -- the terminal's MTI, e.g. 200
    mti_class        smallint NOT NULL,                -- version + class: 1, 2, 4, ...
    processing_code  text NOT NULL,
    pos_condition    text NOT NULL DEFAULT '00',
    kind             text NOT NULL,                    -- purchase, balance_inquiry, ...
    amount           bigint NOT NULL DEFAULT 0 CHECK (amount >= 0),  -- fen
    currency         text NOT NULL DEFAULT '156',
    pan_hash         bytea,                            -- HMAC-SHA-256 under the switch's key
    pan_masked       text,
    request_digest   bytea NOT NULL,                   -- what a duplicate must match (D1/D2)
    state            text NOT NULL CHECK (state IN ('received', 'sent', 'approved', 'declined', 'unknown',
                         'voided', 'reversed', 'partially_refunded', 'refunded', 'completed', 'cancelled')),
    response_code    text,
    auth_code        text,
    issuer           text,
    link_stan        integer,                          -- F11 of the network request
    link_f7          text,                             -- F7 of the network request (MMDDhhmmss UTC)
    reply            bytea,                            -- the reply from its MTI on, for duplicates
    original_id      bigint REFERENCES journal (id),
    rule             text,
    operator         text,
    reversal_reason  text,
    business_date    date NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    completed_at     timestamptz,
    -- D1/D2: one request per merchant + terminal + batch + STAN + MTI class.
    CONSTRAINT journal_request_key UNIQUE (merchant_id, terminal_id, batch, stan, mti_class)
);
CREATE UNIQUE INDEX journal_rrn ON journal (rrn);
CREATE INDEX journal_in_flight ON journal (sent_at) WHERE state = 'sent';
CREATE INDEX journal_terminal_batch ON journal (terminal_id, batch);

CREATE TABLE advices (
    id               bigserial PRIMARY KEY,
    journal_id       bigint NOT NULL REFERENCES journal (id),
    kind             text NOT NULL CHECK (kind IN ('reversal', 'refund', 'completion')),
    mti              smallint NOT NULL,                -- 420 or 220; repeats are sent as 421 / 221
    issuer           text NOT NULL,
    processing_code  text NOT NULL,
    pos_condition    text NOT NULL,
    amount           bigint NOT NULL,
    reason           text,                             -- F39 of a 0420: 68 no timely answer, 06 other
    original_mti     smallint,
    original_stan    integer,                          -- the original's link STAN
    original_f7      text,
    -- The advice's own F11 and F7, fixed at creation so that every repeat is
    -- recognisably the same advice to the issuer.
    link_stan        integer NOT NULL DEFAULT nextval('link_stan'),
    link_f7          text NOT NULL DEFAULT to_char(now() AT TIME ZONE 'UTC', 'MMDDHH24MISS'),
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    response_code    text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    done_at          timestamptz,
    UNIQUE (journal_id, kind)
);
CREATE INDEX advices_due ON advices (next_attempt_at) WHERE state = 'pending';
