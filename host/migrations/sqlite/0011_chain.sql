-- Tamper evidence: SHA-256 linking each event to the one before it in the
-- global log (see ARCHITECTURE.md, "Proving history"). Rows written before
-- this column existed are sealed by the host when it opens the store.
ALTER TABLE events ADD COLUMN chain BLOB;
