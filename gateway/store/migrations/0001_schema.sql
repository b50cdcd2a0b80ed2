-- The PostgreSQL schema, as SQLite's migrations 1-5 left it (gateway/store/sqlite.py).
-- Times are double precision (the chain verifier compares them exactly with the floats
-- it chained); bodies are bytea and headers text: the exact bytes the digests cover.

CREATE TABLE messages (
    seq              bigserial PRIMARY KEY,
    message_id       text             NOT NULL,
    client           text             NOT NULL,
    service          text             NOT NULL,
    mode             text             NOT NULL,
    state            text             NOT NULL,
    target           text,
    adapter          text,
    request_headers  text             NOT NULL,
    request_body     bytea,
    request_digest   text             NOT NULL,
    status           integer,
    code             text,
    response_headers text             NOT NULL DEFAULT '{}',
    response_body    bytea,
    result           bytea,
    error            text,
    attempts         integer          NOT NULL DEFAULT 0,
    next_attempt_at  double precision,
    lease_until      double precision,
    lease_owner      text,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    timings          text             NOT NULL DEFAULT '{}',
    trace_id         text,
    UNIQUE (client, message_id)
);
CREATE INDEX messages_due ON messages (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX messages_state ON messages (state, created_at);
CREATE INDEX messages_message_id ON messages (message_id);

CREATE TABLE callbacks (
    seq             bigserial PRIMARY KEY,
    message_id      text             NOT NULL,
    client          text             NOT NULL,
    correlation_id  text             NOT NULL,
    original_seq    bigint           NOT NULL REFERENCES messages (seq),
    service         text             NOT NULL,
    headers         text             NOT NULL,
    body            bytea            NOT NULL,
    digest          text             NOT NULL,
    state           text             NOT NULL,
    attempts        integer          NOT NULL DEFAULT 0,
    next_attempt_at double precision,
    lease_until     double precision,
    lease_owner     text,
    error           text,
    created_at      double precision NOT NULL,
    updated_at      double precision NOT NULL,
    UNIQUE (client, message_id)
);
CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX callbacks_original ON callbacks (original_seq);

CREATE TABLE rejections (
    seq        bigserial PRIMARY KEY,
    at         double precision NOT NULL,
    client     text,
    message_id text,
    service    text,
    status     integer          NOT NULL,
    code       text             NOT NULL,
    detail     text             NOT NULL,
    digest     text,
    size       integer          NOT NULL,
    headers    text             NOT NULL
);

CREATE TABLE resources (
    kind       text             NOT NULL,
    id         text             NOT NULL,
    body       text,            -- JSON; NULL is a tombstone (deleted by an admin)
    updated_at double precision NOT NULL,
    updated_by text             NOT NULL,
    PRIMARY KEY (kind, id)
);

-- The admin change trail (who changed which resource), not the message log.
CREATE TABLE admin_changes (
    seq         bigserial PRIMARY KEY,
    at          double precision NOT NULL,
    actor       text             NOT NULL,
    role        text             NOT NULL,
    action      text             NOT NULL,
    kind        text             NOT NULL,
    resource_id text             NOT NULL,
    before      text,
    after       text
);

CREATE TABLE admin_tokens (
    name       text PRIMARY KEY,
    role       text             NOT NULL,
    hash       text             NOT NULL UNIQUE,
    created_at double precision NOT NULL,
    revoked_at double precision
);

-- The tamper-evident message log (gateway/store/chain.py). seq is given under the head
-- row's lock, so N writers append one chain.
CREATE TABLE log_chain (
    seq            bigint PRIMARY KEY,
    at             double precision NOT NULL,
    kind           text             NOT NULL,
    ref            bigint,
    facts          text             NOT NULL,
    content_digest text             NOT NULL,
    prev_hash      text             NOT NULL,
    hash           text             NOT NULL
);
CREATE INDEX log_chain_ref ON log_chain (ref);

-- One row: the chain's head, and the last checkpoint id handed out. Each batch locks it
-- (SELECT … FOR UPDATE) just before it appends, and holds it until COMMIT.
CREATE TABLE log_head (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq           bigint  NOT NULL,
    hash          text    NOT NULL,
    checkpoint_id bigint  NOT NULL DEFAULT 0
);
INSERT INTO log_head (seq, hash) VALUES (0, repeat('0', 64));

CREATE TABLE checkpoints (
    id   bigint PRIMARY KEY,
    seq  bigint           NOT NULL,
    hash text             NOT NULL,
    at   double precision NOT NULL,
    kid  text             NOT NULL,
    jws  text             NOT NULL
);

-- Signature nonces seen, kept until the signature could no longer be fresh anyway.
CREATE TABLE nonces (
    signer     text             NOT NULL,
    keyid      text             NOT NULL,
    nonce      text             NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (signer, keyid, nonce)
);
CREATE INDEX nonces_expiry ON nonces (expires_at);
