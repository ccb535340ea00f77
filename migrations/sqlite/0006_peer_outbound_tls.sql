-- C-MOVE destinations reached over DICOM TLS (kept in step with
-- ../postgres/0006_peer_outbound_tls.sql).
ALTER TABLE peers ADD COLUMN tls INTEGER NOT NULL DEFAULT 0;   -- 1: connect with TLS
