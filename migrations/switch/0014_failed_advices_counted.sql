-- `/metrics` counts the advices given up (`failed`, for an operator) at
-- every scrape, as it counts the pending ones through `advices_due`: an
-- index of the few failed ones, rather than a pass over every advice ever
-- answered.
CREATE INDEX advices_failed ON advices (id) WHERE state = 'failed';
