-- Gateway mode: routing rules, the durable job queue and the router's position in the archive
-- (kept in step with ../sqlite/0010_gateway.sql). Times are unix seconds.

-- How an instance arrived, for routing: 'ae:CALLED' (DIMSE, the AE title the sender called:
-- Kade's own or a route's), 'exchange:ORG' (imported from a bundle of ORG), 'web' (STOW-RS);
-- NULL when unknown (re-indexed by recovery, or stored before this migration).
ALTER TABLE instances ADD COLUMN received_via TEXT;

-- Routing rules: what arrives and matches every set criterion is forwarded to the
-- destination. A rule with a called AE title also makes Kade answer to that AE title.
CREATE TABLE routes (
    name        TEXT PRIMARY KEY,
    called_ae   TEXT,                  -- criteria: NULL matches anything
    calling_ae  TEXT,
    modality    TEXT,
    sop_class   TEXT,
    from_exchange TEXT,                -- imported from the exchange: this organisation, or '*'
    dest_kind   TEXT NOT NULL,         -- 'peer' (C-STORE to a DIMSE peer) or 'exchange'
    destination TEXT NOT NULL,         -- the peer's AE title or the organisation id
    quiet_secs  BIGINT NOT NULL,       -- a study is complete after this long without arrivals
    reason      TEXT,                  -- exchange: the reason for referral sent with the study
    created_at  BIGINT NOT NULL
);

-- Every forward and send is a job; its instances are listed in job_instances, each sent once.
CREATE TABLE jobs (
    id               BIGSERIAL PRIMARY KEY,
    kind             TEXT NOT NULL,    -- 'dimse-store' or 'exchange-send'
    destination      TEXT NOT NULL,    -- peer AE title or organisation id
    route            TEXT,             -- the route that made it (NULL: made by hand or import)
    study_uid        TEXT NOT NULL,
    reason           TEXT,
    requested_by     TEXT NOT NULL,    -- for the audit log: user:NAME, route:NAME, import:BUNDLE
    state            TEXT NOT NULL,    -- collecting, queued, running, done, failed, cancelled
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_at          BIGINT NOT NULL,  -- due from (collecting: when the study is quiet)
    owner            TEXT,             -- the node running it
    lease_until      BIGINT,           -- a running job whose lease passed is taken over
    total            BIGINT NOT NULL DEFAULT 0,
    sent             BIGINT NOT NULL DEFAULT 0,
    failed           BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    result           TEXT,             -- e.g. the bundle id of an exchange send
    first_failure_at BIGINT,           -- transient failures are retried until give-up
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX jobs_due ON jobs (state, next_at);
CREATE UNIQUE INDEX jobs_collecting ON jobs (route, study_uid) WHERE state = 'collecting';

CREATE TABLE job_instances (
    job_fk  BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sop_uid TEXT NOT NULL,
    state   TEXT NOT NULL DEFAULT 'pending',   -- pending, sent, failed
    detail  TEXT,
    PRIMARY KEY (job_fk, sop_uid)
);

-- Positions of the consumers of the archive (the router reads instances by row id).
CREATE TABLE gateway_cursors (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
-- What is in the archive already is not routed.
INSERT INTO gateway_cursors (name, position) SELECT 'router', COALESCE(MAX(id), 0) FROM instances;
