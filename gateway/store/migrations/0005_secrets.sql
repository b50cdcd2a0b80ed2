-- Data keys (gateway/secretstore.py): random AEAD keys, each wrapped by the key-encryption
-- key from config; the highest generation seals what is written now, the older ones stay
-- so that what they sealed stays readable until `gateway store rekey` re-encrypts it.
CREATE TABLE data_keys (
    generation integer          PRIMARY KEY,
    key_id     text             NOT NULL UNIQUE,
    alg        text             NOT NULL,
    kek_id     text             NOT NULL,
    wrapped    bytea            NOT NULL,
    created_at double precision NOT NULL
);
