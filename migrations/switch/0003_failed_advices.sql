-- A refund or completion advice the issuer declines cannot be retried into
-- success (the issuer replays its stored answer): it is `failed`, for an
-- operator, and reconcile names the break.
ALTER TABLE advices DROP CONSTRAINT advices_state_check;
ALTER TABLE advices ADD CONSTRAINT advices_state_check CHECK (state IN ('pending', 'done', 'failed'));
