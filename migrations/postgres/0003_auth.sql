-- Local users and API tokens (kept in step with ../sqlite/0003_auth.sql).
-- Times here are Unix seconds (UTC), so that expiry is a plain integer comparison.

CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,          -- admin, reader or uploader
    created_at  BIGINT NOT NULL
);

-- A token is `kade_<id>_<secret>`; only the argon2id PHC hash of the secret is kept.
-- User tokens have user_name set; study-scoped share tokens have study_uid set instead.
CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,      -- 16 lowercase hex digits, public
    user_name    TEXT REFERENCES users (name),
    study_uid    TEXT,
    secret_hash  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,                -- NULL: never
    revoked_at   BIGINT,                -- NULL: not revoked
    created_by   TEXT NOT NULL,         -- admin:cli, bootstrap, or the user who shared
    CHECK ((user_name IS NULL) <> (study_uid IS NULL))
);
CREATE INDEX tokens_user ON tokens (user_name);
