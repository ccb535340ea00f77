-- Per-peer C-FIND limits (kept in step with ../sqlite/0002_peer_query_limits.sql).
ALTER TABLE peers ADD COLUMN max_matches BIGINT;                -- NULL: the global cap
ALTER TABLE peers ADD COLUMN narrow_queries BIGINT NOT NULL DEFAULT 0;   -- 1: refuse sweeps
