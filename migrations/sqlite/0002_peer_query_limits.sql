-- Per-peer C-FIND limits (kept in step with ../postgres/0002_peer_query_limits.sql).
ALTER TABLE peers ADD COLUMN max_matches INTEGER;               -- NULL: the global cap
ALTER TABLE peers ADD COLUMN narrow_queries INTEGER NOT NULL DEFAULT 0;  -- 1: refuse sweeps
