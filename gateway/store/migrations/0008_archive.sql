-- The message log's archived prefix (gateway/audit/archive.py, docs/audit.md "Archives"):
-- one row per archive file the store handed its oldest records to, in chain order.
CREATE TABLE log_archives (
    id        bigint PRIMARY KEY,
    name      text             NOT NULL UNIQUE,
    digest    text             NOT NULL,
    first_seq bigint           NOT NULL,
    last_seq  bigint           NOT NULL,
    last_hash text             NOT NULL,
    rows      bigint           NOT NULL,
    bytes     bigint           NOT NULL,
    before    text             NOT NULL,
    at        double precision NOT NULL
);
