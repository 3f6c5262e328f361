-- Whether an advice is being sent, and until when: set when the advice
-- worker takes it, cleared when its try is recorded. A request that sends
-- its family's pending reversals first (`advice::flush_family`) leaves
-- those the worker has in flight alone instead of sending them a second
-- time. `next_attempt_at` cannot tell: a leased advice and one waiting out
-- its back-off both have it in the future.
ALTER TABLE advices ADD COLUMN leased_until timestamptz;
-- As every other column of the queue (0008): a small sample for ANALYZE.
ALTER TABLE advices ALTER COLUMN leased_until SET STATISTICS 10;
