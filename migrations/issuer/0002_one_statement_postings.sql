-- What lets a follow-on or a reversal be decided and posted by one statement.

-- A six-digit auth code: unique among any million consecutive postings
-- (7919 is prime to 10^6), and the same for every repeat.
CREATE FUNCTION issuer.auth_code(id bigint) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN lpad((((id % 1000000) * 7919 + 13) % 1000000)::text, 6, '0');

-- Undoes the statement that calls it, as a serialization failure, which the
-- issuer retries: for a reversal whose original turned up (committed by
-- another transaction) after the statement took its snapshot, so that it
-- cannot be read there, only found by its key.
CREATE FUNCTION issuer.try_again(reason text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    AS $$ BEGIN RAISE EXCEPTION '%', reason USING ERRCODE = 'serialization_failure'; END $$;
