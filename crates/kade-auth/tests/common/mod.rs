//! Test databases: SQLite in a temporary directory, and PostgreSQL when KADE_TEST_PG_URL is
//! set (a throwaway database per test, `kade_e2e_auth_*`, dropped at the end; CI also drops
//! leftovers of crashed runs by that prefix).

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use kade_index::Index;
use sqlx::Connection as _;

/// An index for one test.
pub struct Db {
    /// The index.
    pub index: Index,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Db {
    /// A fresh SQLite index.
    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open_sqlite(&dir.path().join("index.db"))
            .await
            .unwrap();
        Db {
            index,
            _dir: Some(dir),
            pg: None,
        }
    }

    /// A fresh PostgreSQL database, or None (with a message) when KADE_TEST_PG_URL is unset.
    pub async fn postgres() -> Option<Db> {
        let Some(base) = std::env::var("KADE_TEST_PG_URL")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            let msg = "PostgreSQL not configured: set KADE_TEST_PG_URL";
            assert!(
                std::env::var("KADE_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
                "{msg}"
            );
            eprintln!("SKIPPED: {msg}");
            return None;
        };
        let mut suffix = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
        let db = format!(
            "kade_e2e_auth_{}_{}",
            std::process::id(),
            hex::encode(suffix)
        );
        let mut conn = sqlx::PgConnection::connect(&base)
            .await
            .expect("connect to KADE_TEST_PG_URL");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let (head, _) = base.rsplit_once('/').unwrap();
        let index = Index::open(&format!("{head}/{db}")).await.unwrap();
        Some(Db {
            index,
            _dir: None,
            pg: Some((base, db)),
        })
    }

    /// Closes the index and drops a PostgreSQL test database.
    pub async fn finish(self) {
        self.index.close().await;
        if let Some((base, db)) = self.pg {
            let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
}

/// Runs the async test case `$case(&Index)` on SQLite and, when configured, on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                let db = $crate::common::Db::sqlite().await;
                super::$case(&db.index).await;
                db.finish().await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                let Some(db) = $crate::common::Db::postgres().await else {
                    return;
                };
                super::$case(&db.index).await;
                db.finish().await;
            }
        }
    )*};
}

/// A client address not used before in this process, so that the failure throttle of one
/// check does not slow down another.
pub fn fresh_ip() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
}

/// `Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
