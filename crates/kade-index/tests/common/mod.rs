//! Shared by the index's integration tests: a fresh database of each backend.

use kade_index::Index;
use sqlx::Connection;

/// Runs `suite` on a fresh SQLite index.
pub async fn on_sqlite(suite: impl AsyncFnOnce(&Index)) {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open_sqlite(&dir.path().join("index.db"))
        .await
        .unwrap();
    suite(&index).await;
}

/// Runs `suite` on a fresh PostgreSQL database `kade_e2e_{tag}{pid}` when KADE_TEST_PG_URL is
/// set; says it skipped otherwise (a failure under KADE_TEST_REQUIRE_ALL=1).
pub async fn on_postgres(tag: &str, suite: impl AsyncFnOnce(&Index)) {
    let Ok(base) = std::env::var("KADE_TEST_PG_URL") else {
        let msg = "PostgreSQL not configured: set KADE_TEST_PG_URL";
        assert!(
            std::env::var("KADE_TEST_REQUIRE_ALL").as_deref() != Ok("1"),
            "{msg}"
        );
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let db = format!("kade_e2e_{tag}{}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(&base).await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&mut conn)
        .await;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    let index = Index::open(&format!("{head}/{db}")).await.unwrap();
    suite(&index).await;
    index.close().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&mut conn)
        .await;
}
