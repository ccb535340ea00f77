//! Several processes may open a new SQLite index at once (`kade serve` starting while an
//! administrative `kade` command runs): each must find the schema complete, none may fail.

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_opens_of_a_new_sqlite_index_all_succeed() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                tokio::spawn(async move { kade_index::Index::open_sqlite(&p).await })
            })
            .collect();
        for o in opens {
            let index = o
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            index.close().await;
        }
    }
}
