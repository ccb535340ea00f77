-- DICOM TLS: a peer's AE title bound to its client certificate (kept in step with
-- ../postgres/0004_peer_tls.sql).
ALTER TABLE peers ADD COLUMN tls_cert_sha256 TEXT;   -- NULL: no binding
