-- One row rewritten with a full sync to make every earlier commit durable: ingest commits
-- index rows of journaled blobs without waiting for the sync, and settles their journal
-- markers after such a barrier (see kade_ingest's commit module). Kept in step with
-- ../postgres/0007_index_sync.sql.
CREATE TABLE index_sync (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    synced_at TEXT NOT NULL
);
INSERT INTO index_sync (id, synced_at) VALUES (1, '');
