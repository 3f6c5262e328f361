-- Reversals left `received` without a reply: the journal failed under one
-- after its row was written, or its switch died deciding it. A repeat of
-- the 0400 takes such a row over, but a terminal that stops repeating would
-- leave its sale charged while it showed the cardholder a failure. The
-- recovery sweep decides them (`Switch::decide_undecided_reversals`) and
-- finds them through this index, which holds only reversals still being
-- decided: a handful, whatever the journal's size.
CREATE INDEX journal_undecided_reversals ON journal (received_at)
    WHERE state = 'received' AND kind = 'reversal';
