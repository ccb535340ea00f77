-- Hospital-to-hospital exchange (kept in step with ../sqlite/0005_exchange.sql).
-- Times are unix seconds.

-- The mailbox: routing metadata and chunk bookkeeping only. The ciphertext lives in the blob
-- store under exchange/{bundle_id}/…; nothing here names a patient or a DICOM UID.
CREATE TABLE mailbox_bundles (
    bundle_id       TEXT PRIMARY KEY,          -- 32 hex digits; never reused (replay: 409)
    sender          TEXT NOT NULL,             -- organisation id, from the client certificate
    recipient       TEXT NOT NULL,
    header_json     TEXT NOT NULL,             -- the signed BundleHeader (ciphertext inside)
    total_chunks    BIGINT NOT NULL,
    payload_size    BIGINT NOT NULL,
    state           TEXT NOT NULL,             -- uploading, sealed, fetched, acknowledged,
                                               -- recalled, expired, purged
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    sealed_at       BIGINT,
    fetched_at      BIGINT,
    acknowledged_at BIGINT,
    receipt         TEXT,                      -- the recipient's sealed receipt, base64
    chunk_uploads   BIGINT NOT NULL DEFAULT 0  -- chunk PUTs received, resends included
);
CREATE INDEX mailbox_bundles_recipient ON mailbox_bundles (recipient, state);
CREATE INDEX mailbox_bundles_sender ON mailbox_bundles (sender);

CREATE TABLE mailbox_chunks (
    bundle_id  TEXT NOT NULL REFERENCES mailbox_bundles (bundle_id),
    idx        BIGINT NOT NULL,
    size       BIGINT NOT NULL,
    sha256     TEXT NOT NULL,                  -- of the ciphertext
    PRIMARY KEY (bundle_id, idx)
);

-- A node's bundles sent.
CREATE TABLE exchange_outbox (
    bundle_id    TEXT PRIMARY KEY,
    recipient    TEXT NOT NULL,
    study_uid    TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    sender_user  TEXT NOT NULL,
    instances    BIGINT NOT NULL,
    bytes        BIGINT NOT NULL,
    state        TEXT NOT NULL,                -- uploading, sealed, delivered, imported,
                                               -- failed, expired, recalled
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    receipt_json TEXT                          -- the verified receipt
);

-- A node's bundles received.
CREATE TABLE exchange_inbox (
    bundle_id        TEXT PRIMARY KEY,
    sender           TEXT NOT NULL,
    state            TEXT NOT NULL,            -- queued (reconciliation), imported, refused
    reason           TEXT,                     -- why it is queued or refused
    manifest_json    TEXT,                     -- the decrypted manifest (patient data: this
                                               -- node's own database)
    local_patient_id TEXT,
    local_issuer     TEXT,
    received_at      BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    outcome_json     TEXT                      -- per-instance outcome once imported
);
