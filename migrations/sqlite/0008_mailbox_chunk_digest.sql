-- The mailbox no longer hashes every chunk it receives (a SHA-256 of each ciphertext cost it
-- about a second of CPU per GB). A chunk sent again for an index it already holds is
-- compared byte for byte with the stored one instead. Kept in step with
-- ../postgres/0008_mailbox_chunk_digest.sql.
ALTER TABLE mailbox_chunks DROP COLUMN sha256;
