-- Third-party time (gateway/timestamping.py): the TSA's stamp of each checkpoint. A row
-- is a claim (owner, lease_until: one instance at a time asks the TSA about it) and, once
-- stamped, the DER TimeStampResp with the TSA's time. No row, or no tsr: unstamped.
CREATE TABLE checkpoint_stamps (
    checkpoint_id bigint           PRIMARY KEY,
    owner         text             NOT NULL,
    lease_until   double precision NOT NULL,
    tsr           bytea,
    gen_time      double precision,
    stamped_at    double precision
);
