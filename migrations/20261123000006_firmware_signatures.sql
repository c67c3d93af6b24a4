-- The platform's ed25519 signature of each released image's digest, and the signing key's id.
ALTER TABLE firmware ADD COLUMN signature text, ADD COLUMN signing_key_id text;
