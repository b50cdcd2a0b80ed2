-- The configuration version (gateway/live.py), bumped in the transaction of every admin
-- write: each instance notices a change (NOTIFY gateway_config, and a poll of this one
-- row), and the overlay applies in version order, not by the writers' clocks.
ALTER TABLE resources ADD COLUMN version bigint NOT NULL DEFAULT 0;
UPDATE resources r SET version = o.n
FROM (SELECT kind, id, row_number() OVER (ORDER BY updated_at, kind, id) AS n FROM resources) o
WHERE r.kind = o.kind AND r.id = o.id;
CREATE TABLE config_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO config_version (version) SELECT count(*) FROM resources;
