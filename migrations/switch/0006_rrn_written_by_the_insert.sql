-- The RRN (F37) is still the id's last twelve digits, but no longer a stored
-- generated column: PostgreSQL builds a generation expression anew for every
-- statement that inserts or updates rows, and computes it again on every
-- UPDATE (each outcome), though the id never changes. The journal's insert
-- draws the id and writes the RRN made of it beside it
-- (`journal::requests_cte`); the column stays, so `WHERE rrn = ...` reads as
-- before.
ALTER TABLE journal ALTER COLUMN rrn DROP EXPRESSION;
ALTER TABLE journal ALTER COLUMN rrn SET NOT NULL;
