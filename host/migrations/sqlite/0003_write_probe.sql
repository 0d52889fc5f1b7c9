-- One row the writer rewrites while its writes fail, to find out when the
-- database accepts writes again (readiness comes back on its own).
CREATE TABLE write_probe (
    id           INTEGER PRIMARY KEY,
    probed_at_us BIGINT  NOT NULL
);
