-- Every journal insert asks whether a reversal of that very request came
-- first (R3). Through the terminal's batch index that probe reads the whole
-- batch so far, which grows all day; reversals are a few per cent of the
-- journal, so a partial index of them answers it in one step.
CREATE INDEX journal_reversals ON journal (terminal_id, batch, stan) WHERE mti_class = 4;
