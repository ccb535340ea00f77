//! The metadata index: patients, studies, series and instances, on SQLite (the embedded
//! default, WAL) or PostgreSQL (for scale-out), through one code path (`sqlx::Any`).
//!
//! # Layout
//! - [`Index`] (this module): opening, migrations, the write/read connection split.
//! - [`write`]: inserting and removing instances inside a caller's transaction, so that the
//!   ingest path can add its audit entry to the same commit.
//! - [`read`]: statistics, lookups and the blob inventory used by `kade verify` and `kade fsck`.
//! - [`peers`]: the DIMSE peer table behind `kade peer add/list/remove`.
//! - [`gateway`]: routing rules, the durable job queue and the router (gateway mode).
//! - [`query`]: the query model shared by QIDO-RS and C-FIND (matching per PS3.4 C.2.2.2).
//!
//! # Backends
//! Both backends run the same SQL (`$1` placeholders, `ON CONFLICT`, `RETURNING`); only the
//! migrations differ in their column types (`migrations/sqlite`, `migrations/postgres`).
//! SQLite allows one writer at a time, so the index keeps a one-connection write pool and a
//! separate read pool; PostgreSQL uses one pool for both.

pub mod gateway;
pub mod peers;
pub mod query;
pub mod read;
pub mod write;

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use kade_core::lockfile::FileLock;

use sqlx::{
    Any, AnyConnection, AnyPool, Executor, Transaction,
    any::AnyPoolOptions,
    migrate::{Migration, MigrationType, Migrator},
};

/// Errors from the index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The database reported an error.
    #[error("index database: {0}")]
    Db(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("index schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no supported backend.
    #[error("unsupported index URL {0:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
}

/// Which database the index runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, a file in the data directory.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A transaction on the index's write connection.
pub type WriteTx = Transaction<'static, Any>;

/// A handle on the index; cheap to clone.
#[derive(Debug, Clone)]
pub struct Index {
    write: AnyPool,
    read: AnyPool,
    backend: Backend,
    /// Held by every clone; SQLite's checkpointer stops when the last one is gone.
    _alive: Arc<()>,
}

/// How often SQLite's write-ahead log is checkpointed into the database file, off the write
/// connection (see [`Index::open`]).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "archive",
        include_str!("../../../migrations/sqlite/0001_archive.sql"),
    ),
    (
        2,
        "peer query limits",
        include_str!("../../../migrations/sqlite/0002_peer_query_limits.sql"),
    ),
    (
        3,
        "auth",
        include_str!("../../../migrations/sqlite/0003_auth.sql"),
    ),
    (
        4,
        "peer tls",
        include_str!("../../../migrations/sqlite/0004_peer_tls.sql"),
    ),
    (
        5,
        "exchange",
        include_str!("../../../migrations/sqlite/0005_exchange.sql"),
    ),
    (
        6,
        "peer outbound tls",
        include_str!("../../../migrations/sqlite/0006_peer_outbound_tls.sql"),
    ),
    (
        7,
        "index sync",
        include_str!("../../../migrations/sqlite/0007_index_sync.sql"),
    ),
    (
        8,
        "mailbox chunk digest",
        include_str!("../../../migrations/sqlite/0008_mailbox_chunk_digest.sql"),
    ),
    (
        9,
        "patient other ids",
        include_str!("../../../migrations/sqlite/0009_patient_other_ids.sql"),
    ),
    (
        10,
        "gateway",
        include_str!("../../../migrations/sqlite/0010_gateway.sql"),
    ),
];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "archive",
        include_str!("../../../migrations/postgres/0001_archive.sql"),
    ),
    (
        2,
        "peer query limits",
        include_str!("../../../migrations/postgres/0002_peer_query_limits.sql"),
    ),
    (
        3,
        "auth",
        include_str!("../../../migrations/postgres/0003_auth.sql"),
    ),
    (
        4,
        "peer tls",
        include_str!("../../../migrations/postgres/0004_peer_tls.sql"),
    ),
    (
        5,
        "exchange",
        include_str!("../../../migrations/postgres/0005_exchange.sql"),
    ),
    (
        6,
        "peer outbound tls",
        include_str!("../../../migrations/postgres/0006_peer_outbound_tls.sql"),
    ),
    (
        7,
        "index sync",
        include_str!("../../../migrations/postgres/0007_index_sync.sql"),
    ),
    (
        8,
        "mailbox chunk digest",
        include_str!("../../../migrations/postgres/0008_mailbox_chunk_digest.sql"),
    ),
    (
        9,
        "patient other ids",
        include_str!("../../../migrations/postgres/0009_patient_other_ids.sql"),
    ),
    (
        10,
        "gateway",
        include_str!("../../../migrations/postgres/0010_gateway.sql"),
    ),
];

/// The file of a `sqlite://PATH?…` (or `sqlite:PATH`) URL; `None` for an in-memory database.
fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

impl Index {
    /// Opens the index in the SQLite file at `path`, creating and migrating it if needed.
    ///
    /// # Errors
    /// When the file cannot be opened or migrated.
    pub async fn open_sqlite(path: &Path) -> Result<Self, IndexError> {
        Self::open(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Opens the index at `url` (`sqlite://…` or `postgres://…`) and applies migrations.
    ///
    /// # Errors
    /// When the database cannot be reached or migrated.
    pub async fn open(url: &str) -> Result<Self, IndexError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(IndexError::UnsupportedUrl(url.to_owned()));
        };
        let index = match backend {
            Backend::Sqlite => {
                let write = sqlite_pool(1, false).connect(url).await?;
                let read = sqlite_pool(4, true).connect(url).await?;
                let alive = Arc::new(());
                checkpoint_in_background(read.clone(), Arc::downgrade(&alive));
                Index {
                    write,
                    read,
                    backend,
                    _alive: alive,
                }
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await?;
                Index {
                    write: pool.clone(),
                    read: pool,
                    backend,
                    _alive: Arc::default(),
                }
            }
        };
        // Two processes opening a new SQLite index at once (`kade serve` starting while a
        // `kade` command runs) would both apply the same migration; sqlx locks migrations on
        // PostgreSQL only. A lock file beside the database serialises them.
        let _lock = match sqlite_file(url) {
            Some(db) if backend == Backend::Sqlite => {
                let path = PathBuf::from(format!("{db}.migrate-lock"));
                let held = tokio::task::spawn_blocking(move || FileLock::acquire(&path))
                    .await
                    .map_err(|e| IndexError::Db(sqlx::Error::Protocol(e.to_string())))?;
                Some(held.map_err(|e| IndexError::Db(sqlx::Error::Io(e)))?)
            }
            _ => None,
        };
        index.migrate().await?;
        Ok(index)
    }

    async fn migrate(&self) -> Result<(), IndexError> {
        let list = match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        let migrations: Vec<Migration> = list
            .iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    Cow::Borrowed(d),
                    MigrationType::Simple,
                    Cow::Borrowed(sql),
                    false,
                )
            })
            .collect();
        let migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ignore_missing: false,
            locking: true,
            no_tx: false,
        };
        migrator.run(&self.write).await?;
        Ok(())
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a transaction on the write connection.
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn begin_write(&self) -> Result<WriteTx, IndexError> {
        Ok(match self.backend {
            // IMMEDIATE takes the write lock at once, waiting for it (busy_timeout) if another
            // process holds it. A deferred transaction that reads first and then writes fails
            // at once with SQLITE_BUSY_SNAPSHOT (517, "database is locked") when another
            // connection committed in between, which a running `kade serve` often does.
            Backend::Sqlite => self.write.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.write.begin().await?,
        })
    }

    /// A connection of the write pool, for callers that must be able to close it (see
    /// `kade_ingest`'s group commit: after a failed commit the connection's transaction state
    /// cannot be trusted, so it is closed instead of going back to the pool).
    ///
    /// # Errors
    /// When no connection can be had.
    pub async fn acquire_write(&self) -> Result<sqlx::pool::PoolConnection<Any>, IndexError> {
        Ok(self.write.acquire().await?)
    }

    /// Makes commits on `conn` wait for the database's sync (`durable`, the default) or not.
    /// Without it a commit is safe from a crash of Kade but not from a power cut or a kernel
    /// crash, until [`Index::sync_barrier`] or any durable commit after it. SQLite: `PRAGMA
    /// synchronous` NORMAL (WAL) or FULL; PostgreSQL: `synchronous_commit` off or on. Call it
    /// outside a transaction.
    ///
    /// # Errors
    /// The database's error.
    pub async fn set_durable_commits(
        &self,
        conn: &mut AnyConnection,
        durable: bool,
    ) -> Result<(), sqlx::Error> {
        let sql = match (self.backend, durable) {
            (Backend::Sqlite, true) => "PRAGMA synchronous = FULL",
            (Backend::Sqlite, false) => "PRAGMA synchronous = NORMAL",
            (Backend::Postgres, true) => "SET synchronous_commit TO on",
            (Backend::Postgres, false) => "SET synchronous_commit TO off",
        };
        conn.execute(sql).await.map(|_| ())
    }

    /// Commits a one-row write durably on `conn` (which must make durable commits), making
    /// every earlier commit of the database durable too: both databases sync their log in
    /// order.
    ///
    /// # Errors
    /// The database's error.
    pub async fn sync_barrier(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE index_sync SET synced_at = $1 WHERE id = 1")
            .bind(now())
            .execute(conn)
            .await
            .map(|_| ())
    }

    /// Whether `e` may have ended the database's transaction behind sqlx's back (SQLite rolls
    /// a transaction back by itself on a full disk, an I/O error, lack of memory…), or lost the
    /// connection. After such an error a batch must be failed as a whole and its connection
    /// closed.
    pub fn is_fatal(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Database(db) => {
                // SQLite primary result codes: BUSY 5, NOMEM 7, INTERRUPT 9, IOERR 10,
                // CORRUPT 11, FULL 13. PostgreSQL keeps its transaction state consistent.
                db.code()
                    .and_then(|c| c.parse::<i64>().ok())
                    .is_some_and(|c| matches!(c & 0xff, 5 | 7 | 9 | 10 | 11 | 13))
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            _ => false,
        }
    }

    /// The pool for read-only queries.
    pub fn read_pool(&self) -> &AnyPool {
        &self.read
    }

    /// Closes every connection (checkpointing SQLite's WAL).
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// Checkpoints SQLite's write-ahead log every [`CHECKPOINT_EVERY`] on a connection of `read`
/// until `alive` is gone or the pool is closed.
///
/// The write connection does not checkpoint by itself (`wal_autocheckpoint = 0`): SQLite's
/// automatic checkpoint runs in the commit that takes the log past 1,000 pages and copies
/// them into the database with a sync, which made one query's audit entry in about 220 wait
/// 4-5 ms. A passive checkpoint here runs beside the writer and the readers and waits for
/// neither; it syncs the log before copying from it, and copies only what no reader still
/// needs, so the log stays about one interval of writes long.
fn checkpoint_in_background(read: AnyPool, alive: std::sync::Weak<()>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECKPOINT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            if alive.strong_count() == 0 || read.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&read)
                .await
            {
                tracing::warn!(error = %e, "could not checkpoint the index's write-ahead log");
            }
        }
    });
}

/// Options for a pool of SQLite connections; `checkpoints`: whether a commit on them may
/// checkpoint the write-ahead log (see [`checkpoint_in_background`]).
fn sqlite_pool(max: u32, checkpoints: bool) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(60))
        // A connection to a local file cannot drop the way a network one can, and the ping
        // that tests it costs a round trip to its worker thread on every acquire.
        .test_before_acquire(false)
        .after_connect(move |conn: &mut AnyConnection, _meta| {
            Box::pin(async move {
                // FULL: a commit is on disk before it returns, which an acknowledged C-STORE needs.
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                     PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON; \
                     PRAGMA case_sensitive_like = ON;",
                )
                .await?;
                if !checkpoints {
                    conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                }
                Ok(())
            })
        })
}

/// The form of a person name used for case-insensitive matching (Unicode upper case).
pub use kade_core::attrs::search_key;

/// The current time as stored in the index: RFC 3339 UTC with microseconds.
pub fn now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sqlite" => Ok(Backend::Sqlite),
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            _ => Err(format!(
                "unknown index backend {s:?}: use sqlite or postgres"
            )),
        }
    }
}
