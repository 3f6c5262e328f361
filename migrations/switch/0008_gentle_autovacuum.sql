-- Autovacuum without a stall. The journal grows by every transaction and
-- is updated once per forwarded one, so autovacuum visits it (and the
-- advice queue) about once a minute under load; on a small machine each
-- visit was a burst of a core for most of a second, and every transaction
-- of that second waited behind it (a p99 of 150 to 400 ms where the others
-- had 40).
--
-- * ANALYZE samples 300 rows per point of the largest statistics target of
--   a table's columns, and sorts the sample once per column: 30,000 rows
--   and 34 sorts at the default of 100, 0.3 s of CPU. The journal and the
--   queue are read by keys (the request key, ids, terminal and batch), for
--   which ten buckets estimate as well: 3,000 rows, 0.03 s.
-- * VACUUM sleeps 10 ms, not 2, after each 200 units of its work (a page
--   found in shared buffers costs one, read in two, dirtied twenty): the
--   same work, spread over a few seconds at a fraction of a core.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT attrelid::regclass AS tab, attname FROM pg_attribute
             WHERE attrelid IN ('journal'::regclass, 'advices'::regclass)
               AND attnum > 0 AND NOT attisdropped
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS 10', c.tab, c.attname);
    END LOOP;
END $$;

ALTER TABLE journal SET (autovacuum_vacuum_cost_delay = 10);
ALTER TABLE advices SET (autovacuum_vacuum_cost_delay = 10);
