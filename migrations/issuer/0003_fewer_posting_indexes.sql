-- Every authorisation inserts a posting, so each index and foreign key of
-- the postings is paid for by every message. Two indexes served no query
-- (postings are found by their key or their id), and the clearing file reads
-- a day by created_at, which grows with the id: a BRIN index covers it for a
-- fraction of a btree's upkeep. The card of a posting is the card row the
-- same statement locked, and cards are never deleted, so its foreign key
-- (a lookup and a row lock per posting) checked nothing the statement does
-- not already guarantee.
DROP INDEX issuer.postings_original_id;
DROP INDEX issuer.postings_card_id;
DROP INDEX issuer.postings_created_at;
CREATE INDEX postings_created_at ON issuer.postings USING brin (created_at);
ALTER TABLE issuer.postings DROP CONSTRAINT postings_card_id_fkey;
