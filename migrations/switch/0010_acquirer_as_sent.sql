-- The F32 (acquiring institution) and F33 (forwarding institution) a row's
-- messages carry, as they were sent. The issuer keys a message by its F32,
-- STAN, F7 and MTI, and finds an original by the F32 and F33 in a follow-
-- on's F90. Taken from the switch's config at the time of the request,
-- they would change with the config: a reversal or refund advice sent
-- after `institution_id` changed named an original the issuer did not
-- have (a reversal that reversed nothing, a refund answered 25). A row
-- written before this migration has neither, and is named by the config.
ALTER TABLE journal ADD COLUMN institution_id text, ADD COLUMN forwarding_id text;
-- An advice's original, as the advice's F90 names it (the advice's own F32
-- and F33 are its row's).
ALTER TABLE advices ADD COLUMN original_institution_id text,
    ADD COLUMN original_forwarding_id text;
-- As every other column of these tables (0008): a small sample for ANALYZE.
ALTER TABLE journal ALTER COLUMN institution_id SET STATISTICS 10,
    ALTER COLUMN forwarding_id SET STATISTICS 10;
ALTER TABLE advices ALTER COLUMN original_institution_id SET STATISTICS 10,
    ALTER COLUMN original_forwarding_id SET STATISTICS 10;
