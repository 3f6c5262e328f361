-- Rule K3: a terminal holds a MAC key from its sign-on. The switch hands out
-- working keys (PIN, MAC and perhaps track key) in F62, each encrypted under
-- the terminal's master key, which is derived from the terminal master
-- derivation key of the switch's key file and the terminal id. The terminal
-- keeps the F62 it was sent: the cryptograms and their check values, never
-- a clear key. NULL: the terminal holds no keys and sends no MAC.
ALTER TABLE terminals ADD COLUMN working_keys bytea;

-- The derivation key the terminals' working keys are under, as a check
-- value (8 zero bytes encrypted under it): a switch started with another
-- would find every MAC wrong and answer every terminal A0.
ALTER TABLE meta ADD COLUMN terminal_key_check bytea;
