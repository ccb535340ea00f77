-- Kade index, schema 1 (SQLite). Kept in step with ../postgres/0001_archive.sql.
-- Timestamps are RFC 3339 UTC text ("2026-11-22T07:41:26.123456Z"), which sorts in time order.
-- *_search columns hold the Unicode upper-case form of a person name for case-insensitive
-- wildcard matching (QIDO-RS and C-FIND); the connection runs with case_sensitive_like = ON
-- so that every other LIKE is case-sensitive, as PS3.4 C.2.2.2 wants for non-PN values.

CREATE TABLE patients (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_id    TEXT NOT NULL,              -- (0010,0020); '' when absent
    issuer        TEXT NOT NULL DEFAULT '',   -- (0010,0021); '' when absent
    name          TEXT,                       -- (0010,0010) decoded
    name_search   TEXT,
    birth_date    TEXT,                       -- (0010,0030)
    sex           TEXT,                       -- (0010,0040)
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    UNIQUE (patient_id, issuer)
);
CREATE INDEX patients_name_search ON patients (name_search);

CREATE TABLE studies (
    id                         INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid                  TEXT NOT NULL UNIQUE,
    patient_fk                 INTEGER NOT NULL REFERENCES patients (id),
    study_date                 TEXT,
    study_time                 TEXT,
    accession_number           TEXT,
    referring_physician        TEXT,
    referring_physician_search TEXT,
    description                TEXT,
    study_id                   TEXT,
    timezone_offset            TEXT,
    modalities                 TEXT NOT NULL DEFAULT '',   -- ModalitiesInStudy, '\'-separated
    num_series                 INTEGER NOT NULL DEFAULT 0,
    num_instances              INTEGER NOT NULL DEFAULT 0,
    size_bytes                 INTEGER NOT NULL DEFAULT 0,
    created_at                 TEXT NOT NULL,
    updated_at                 TEXT NOT NULL
);
CREATE INDEX studies_patient ON studies (patient_fk);
CREATE INDEX studies_date ON studies (study_date);
CREATE INDEX studies_accession ON studies (accession_number);

CREATE TABLE series (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid      TEXT NOT NULL UNIQUE,
    study_fk        INTEGER NOT NULL REFERENCES studies (id),
    modality        TEXT,
    series_number   INTEGER,
    description     TEXT,
    body_part       TEXT,
    pps_start_date  TEXT,
    pps_start_time  TEXT,
    num_instances   INTEGER NOT NULL DEFAULT 0,
    size_bytes      INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX series_study ON series (study_fk);
CREATE INDEX series_modality ON series (modality);

CREATE TABLE instances (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_uid                TEXT NOT NULL UNIQUE,
    series_fk              INTEGER NOT NULL REFERENCES series (id),
    sop_class_uid          TEXT NOT NULL,
    instance_number        INTEGER,
    pixel_rows             INTEGER,
    pixel_columns          INTEGER,
    number_of_frames       INTEGER,
    bits_allocated         INTEGER,
    transfer_syntax_uid    TEXT NOT NULL,
    specific_character_set TEXT,
    blob_key               TEXT NOT NULL,
    size_bytes             INTEGER NOT NULL,
    sha256                 TEXT NOT NULL,     -- of the whole blob
    dataset_sha256         TEXT NOT NULL,     -- of the dataset after the File Meta group
    received_at            TEXT NOT NULL,
    source_ae              TEXT,
    source_address         TEXT
);
CREATE INDEX instances_series ON instances (series_fk);
CREATE INDEX instances_blob ON instances (blob_key);

-- DICOM JSON (PS3.18 F.2) without bulk data, for WADO-RS /metadata.
CREATE TABLE instance_metadata (
    instance_fk INTEGER PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    json        TEXT NOT NULL
);

-- DIMSE peers added with `kade peer add` (peers may also come from the config file).
CREATE TABLE peers (
    ae_title    TEXT PRIMARY KEY,
    host        TEXT NOT NULL,      -- address or CIDR the peer connects from
    port        INTEGER,            -- where the peer listens (C-MOVE destinations)
    permissions TEXT NOT NULL,      -- comma-separated: echo,store,find,move,get,commit
    created_at  TEXT NOT NULL
);

-- Append-only, hash-chained audit log (NEN 7513 / DICOM PS3.15 A.5). Never updated.
CREATE TABLE audit_log (
    seq            INTEGER PRIMARY KEY,
    at             TEXT NOT NULL,
    event          TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    actor          TEXT NOT NULL,
    actor_address  TEXT,
    patient_id     TEXT,
    study_uid      TEXT,
    sop_uid        TEXT,
    detail         TEXT,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL
);
CREATE INDEX audit_log_patient ON audit_log (patient_id);
CREATE INDEX audit_log_at ON audit_log (at);

-- The head of the chain, one row; updating it serialises appends across nodes.
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
