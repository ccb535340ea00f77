//! Opening a node's components from the configuration.

use anyhow::Context;
use kade_audit::Audit;
use kade_index::Index;
use kade_ingest::Ingest;
use kade_store::BlobStore;

use crate::config::{Config, StorageBackend};

/// The opened components of a node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Blob store.
    pub store: BlobStore,
    /// Index.
    pub index: Index,
    /// Ingest pipeline.
    pub ingest: Ingest,
    /// Audit log.
    pub audit: Audit,
}

impl Node {
    /// Opens (creating if needed) the data directory, index and blob store.
    ///
    /// # Errors
    /// When a component cannot be opened; the message says which and why.
    pub async fn open(cfg: &Config) -> anyhow::Result<Node> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
        let spool = cfg.data_dir.join("spool");
        let store = match cfg.storage.backend {
            StorageBackend::Local => BlobStore::local(&cfg.data_dir.join("blobs"), &spool),
            StorageBackend::S3 => BlobStore::s3(
                cfg.storage.s3.as_ref().context("[storage.s3] missing")?,
                &spool,
            ),
        }
        .context("cannot open blob storage")?;
        let url = cfg.index_url();
        let index = Index::open(&url)
            .await
            .with_context(|| format!("cannot open the index database ({})", redact(&url)))?;
        let ingest = Ingest::new(store.clone(), index.clone(), cfg.ingest.duplicate_policy);
        let audit = Audit::new(index.clone());
        Ok(Node {
            store,
            index,
            ingest,
            audit,
        })
    }
}

/// Hides a password in a database URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://kade:secret@db/kade"),
            "postgres://kade:***@db/kade"
        );
        assert_eq!(
            super::redact("postgres://kade@db/kade"),
            "postgres://kade@db/kade"
        );
        assert_eq!(
            super::redact("sqlite:///x/index.db"),
            "sqlite:///x/index.db"
        );
    }
}
