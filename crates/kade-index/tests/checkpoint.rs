//! SQLite's write-ahead log is checkpointed in the background, not by the writer's commits.

use kade_index::{CHECKPOINT_EVERY, Index};

/// Rows of `t` in the database file alone, without its write-ahead log: what a checkpoint
/// has copied into it.
async fn rows_in_main_file(db: &std::path::Path, scratch: &std::path::Path) -> i64 {
    let copy = scratch.join("copy.db");
    std::fs::copy(db, &copy).unwrap();
    let url = format!("sqlite://{}?mode=ro", copy.display());
    let conn = sqlx::AnyPool::connect(&url).await.unwrap();
    let n = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM t")
        .fetch_one(&conn)
        .await
        .unwrap_or(0);
    conn.close().await;
    std::fs::remove_file(copy).unwrap();
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_is_copied_into_the_database_beside_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let db = dir.path().join("index.db");
    let index = Index::open_sqlite(&db).await.unwrap();
    // About 1,500 pages: past the 1,000 at which SQLite's automatic checkpoint would copy
    // them into the database within the commit.
    let mut tx = index.begin_write().await.unwrap();
    sqlx::query("CREATE TABLE t (x BLOB)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for _ in 0..1500 {
        sqlx::query("INSERT INTO t (x) VALUES (zeroblob(4000))")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(
        rows_in_main_file(&db, scratch.path()).await,
        0,
        "the commit checkpointed the log itself"
    );
    let deadline = std::time::Instant::now() + CHECKPOINT_EVERY * 5;
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY / 4).await;
        if rows_in_main_file(&db, scratch.path()).await == 1500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no background checkpoint within {:?}",
            CHECKPOINT_EVERY * 5
        );
    }
    // Readers and writers go on as before.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(index.read_pool())
        .await
        .unwrap();
    assert_eq!(n, 1500);
    index.close().await;
}
