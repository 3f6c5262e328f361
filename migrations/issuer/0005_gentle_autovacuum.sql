-- Autovacuum without a stall: see the switch's migration of the same name.
-- Postings grow by every message, and a card is updated by every posting
-- that moves its money.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT attrelid::regclass AS tab, attname FROM pg_attribute
             WHERE attrelid = 'issuer.postings'::regclass AND attnum > 0 AND NOT attisdropped
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS 10', c.tab, c.attname);
    END LOOP;
END $$;

ALTER TABLE issuer.postings SET (autovacuum_vacuum_cost_delay = 10);
ALTER TABLE issuer.cards SET (autovacuum_vacuum_cost_delay = 10);
