//! The DIMSE peer table (`kade peer add/list/remove`).

use kade_core::{AeTitle, Peer, peer};
use sqlx::Row;

use crate::{Index, IndexError};

impl Index {
    /// Adds a peer, or replaces the one with the same AE title.
    ///
    /// # Errors
    /// Database errors.
    pub async fn put_peer(&self, p: &Peer) -> Result<(), IndexError> {
        sqlx::query(
            "INSERT INTO peers (ae_title, host, port, permissions, created_at, max_matches, \
             narrow_queries, tls_cert_sha256, tls) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (ae_title) DO UPDATE \
             SET host = excluded.host, port = excluded.port, permissions = excluded.permissions, \
             max_matches = excluded.max_matches, narrow_queries = excluded.narrow_queries, \
             tls_cert_sha256 = excluded.tls_cert_sha256, tls = excluded.tls",
        )
        .bind(p.ae_title.as_str())
        .bind(p.host.to_string())
        .bind(p.port.map(i64::from))
        .bind(peer::format_permissions(&p.allow))
        .bind(crate::now())
        .bind(p.max_matches.map(i64::from))
        .bind(i64::from(p.narrow_queries))
        .bind(p.tls_cert_sha256.as_deref())
        .bind(i64::from(p.tls))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Removes a peer; returns whether it existed.
    ///
    /// # Errors
    /// Database errors.
    pub async fn remove_peer(&self, ae: &AeTitle) -> Result<bool, IndexError> {
        let r = sqlx::query("DELETE FROM peers WHERE ae_title = $1")
            .bind(ae.as_str())
            .execute(&self.write)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Every peer in the table, by AE title. Rows that no longer parse are skipped with a warning.
    ///
    /// # Errors
    /// Database errors.
    pub async fn peers(&self) -> Result<Vec<Peer>, IndexError> {
        let rows = sqlx::query(
            "SELECT ae_title, host, port, permissions, max_matches, narrow_queries, \
                 tls_cert_sha256, tls FROM peers ORDER BY ae_title",
        )
        .fetch_all(self.read_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (ae, host, port, perms): (String, String, Option<i64>, String) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            let (max_matches, narrow): (Option<i64>, i64) = (r.try_get(4)?, r.try_get(5)?);
            let tls_cert_sha256: Option<String> = r.try_get(6)?;
            let tls: i64 = r.try_get(7)?;
            let parsed = (|| {
                Ok::<_, String>(Peer {
                    ae_title: AeTitle::new(&ae).map_err(|e| e.to_string())?,
                    host: peer::parse_host(&host)?,
                    port: port.and_then(|p| u16::try_from(p).ok()),
                    allow: peer::parse_permissions(&perms)?,
                    max_matches: max_matches.and_then(|m| u32::try_from(m).ok()),
                    narrow_queries: narrow != 0,
                    tls_cert_sha256,
                    tls: tls != 0,
                })
            })();
            match parsed {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::warn!(ae_title = %ae, error = %e, "skipping unreadable peer row")
                }
            }
        }
        Ok(out)
    }
}
