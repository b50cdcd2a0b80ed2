-- Operational monitoring (issue 25, gateway/store/oprecords.py): a row per exchange,
-- callback and outbox attempt, apart from the evidence log (no chain, no bodies),
-- pruned by its own retention. Members page their own rows newest first (id).
CREATE TABLE monitoring_records (
    id             bigserial        PRIMARY KEY,
    kind           text             NOT NULL,
    received_at    double precision NOT NULL,
    message_id     text,
    seq            bigint,
    correlation_id text,
    client         text,
    service        text,
    target         text,
    adapter        text,
    via            text,
    relay          text,
    verified_ms    double precision,
    validated_ms   double precision,
    upstream_ms    double precision,
    answered_ms    double precision,
    delivered_ms   double precision,
    duration_ms    double precision NOT NULL,
    request_size   integer,
    response_size  integer,
    status         integer,
    code           text,
    outcome        text,
    ok             integer          NOT NULL,
    attempt        integer,
    instance       text             NOT NULL,
    trace_id       text
);
CREATE INDEX monitoring_client ON monitoring_records (client, id);
CREATE INDEX monitoring_received ON monitoring_records (received_at);
