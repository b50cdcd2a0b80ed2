-- The last federation directory this gateway accepted (a JWS, gateway/federation.py),
-- for a restart while the national platform is down. One row; a lower version never
-- replaces it.
CREATE TABLE directory (
    one         boolean          PRIMARY KEY DEFAULT true CHECK (one),
    version     bigint           NOT NULL,
    jws         text             NOT NULL,
    accepted_at double precision NOT NULL
);
