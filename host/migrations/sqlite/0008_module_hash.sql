-- The content hash (SHA-256 of the .wasm) of the build that produced each
-- event: the CloudEvents extension `modulehash`. Events appended before
-- this column existed, or by a writer outside the command path, have none.
ALTER TABLE events ADD COLUMN module_hash TEXT;
