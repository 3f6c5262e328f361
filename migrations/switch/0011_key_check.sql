-- The PAN hash key the journal is written with, as a check value (an HMAC
-- of a fixed text under the key; the key cannot be had from it). Every
-- match of a void, refund, completion or duplicate compares keyed hashes of
-- the card: a switch started with another key would find no original's
-- card and answer 14 or 94 where it should not. One row: the first switch
-- to start records its key, and every later start must bring the same.
--
-- acquirer_kept: whether the rows journalled before 0010 that may still be
-- named by a later message (a refund, a completion, a reversal advice)
-- have been given the F32 and F33 of the config at the first start that
-- kept them (`switch::keep_acquirer_of_older_rows`).
CREATE TABLE meta (
    id            smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    key_check     bytea NOT NULL,
    acquirer_kept boolean NOT NULL DEFAULT false
);
