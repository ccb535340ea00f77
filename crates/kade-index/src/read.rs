//! Read-only queries: statistics, instance lookups, and the blob inventory.

use sqlx::Row;

use crate::{Index, IndexError};

/// Archive totals, as printed by `kade stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Number of patients.
    pub patients: i64,
    /// Number of studies.
    pub studies: i64,
    /// Number of series.
    pub series: i64,
    /// Number of instances.
    pub instances: i64,
    /// Total size of the stored instances in bytes.
    pub bytes: i64,
}

/// One indexed instance with its storage bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceRow {
    /// Row id.
    pub id: i64,
    /// SOP Instance UID.
    pub sop_uid: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Patient ID.
    pub patient_id: String,
    /// Patient's name as decoded.
    pub patient_name: Option<String>,
    /// Modality of the series.
    pub modality: Option<String>,
    /// Transfer syntax of the blob.
    pub transfer_syntax_uid: String,
    /// Rows (0028,0010).
    pub rows: Option<i64>,
    /// Columns (0028,0011).
    pub columns: Option<i64>,
    /// Number of Frames (0028,0008).
    pub number_of_frames: Option<i64>,
    /// Blob key.
    pub blob_key: String,
    /// Blob size.
    pub size_bytes: i64,
    /// SHA-256 of the blob.
    pub sha256: String,
    /// When Kade received it.
    pub received_at: String,
    /// Who sent it.
    pub source_ae: Option<String>,
}

/// A blob the index refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// Row id (pages are ordered by it).
    pub id: i64,
    /// SOP Instance UID.
    pub sop_uid: String,
    /// Blob key.
    pub blob_key: String,
    /// Expected SHA-256.
    pub sha256: String,
    /// Expected size.
    pub size_bytes: i64,
}

impl Index {
    /// Totals over the whole archive.
    ///
    /// # Errors
    /// Database errors.
    pub async fn stats(&self) -> Result<Stats, IndexError> {
        let r = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM patients p WHERE EXISTS \
                        (SELECT 1 FROM studies s WHERE s.patient_fk = p.id)), \
                    (SELECT COUNT(*) FROM studies), \
                    (SELECT COUNT(*) FROM series), \
                    (SELECT COUNT(*) FROM instances), \
                    (SELECT CAST(COALESCE(SUM(size_bytes), 0) AS BIGINT) FROM instances)",
        )
        .fetch_one(self.read_pool())
        .await?;
        Ok(Stats {
            patients: r.try_get(0)?,
            studies: r.try_get(1)?,
            series: r.try_get(2)?,
            instances: r.try_get(3)?,
            bytes: r.try_get(4)?,
        })
    }

    /// One instance by SOP Instance UID.
    ///
    /// # Errors
    /// Database errors.
    pub async fn instance(&self, sop_uid: &str) -> Result<Option<InstanceRow>, IndexError> {
        let r = sqlx::query(
            "SELECT i.id, i.sop_uid, i.sop_class_uid, se.series_uid, st.study_uid, p.patient_id, \
                    p.name, se.modality, i.transfer_syntax_uid, i.pixel_rows, i.pixel_columns, \
                    i.number_of_frames, i.blob_key, i.size_bytes, i.sha256, i.received_at, \
                    i.source_ae \
             FROM instances i JOIN series se ON se.id = i.series_fk \
             JOIN studies st ON st.id = se.study_fk JOIN patients p ON p.id = st.patient_fk \
             WHERE i.sop_uid = $1",
        )
        .bind(sop_uid)
        .fetch_optional(self.read_pool())
        .await?;
        let Some(r) = r else { return Ok(None) };
        Ok(Some(InstanceRow {
            id: r.try_get(0)?,
            sop_uid: r.try_get(1)?,
            sop_class_uid: r.try_get(2)?,
            series_uid: r.try_get(3)?,
            study_uid: r.try_get(4)?,
            patient_id: r.try_get(5)?,
            patient_name: r.try_get(6)?,
            modality: r.try_get(7)?,
            transfer_syntax_uid: r.try_get(8)?,
            rows: r.try_get(9)?,
            columns: r.try_get(10)?,
            number_of_frames: r.try_get(11)?,
            blob_key: r.try_get(12)?,
            size_bytes: r.try_get(13)?,
            sha256: r.try_get(14)?,
            received_at: r.try_get(15)?,
            source_ae: r.try_get(16)?,
        }))
    }

    /// The stored DICOM JSON of an instance.
    ///
    /// # Errors
    /// Database errors.
    pub async fn instance_metadata(&self, sop_uid: &str) -> Result<Option<String>, IndexError> {
        Ok(sqlx::query_scalar(
            "SELECT m.json FROM instance_metadata m JOIN instances i ON i.id = m.instance_fk \
             WHERE i.sop_uid = $1",
        )
        .bind(sop_uid)
        .fetch_optional(self.read_pool())
        .await?)
    }

    /// The stored DICOM JSON of every instance of a study, or of one of its series, as
    /// `(series UID, SOP Instance UID, JSON)` ordered by series, instance number and UID.
    ///
    /// # Errors
    /// Database errors.
    pub async fn metadata_of(
        &self,
        study_uid: &str,
        series_uid: Option<&str>,
    ) -> Result<Vec<(String, String, String)>, IndexError> {
        let mut text = String::from(
            "SELECT se.series_uid, i.sop_uid, m.json FROM instance_metadata m \
             JOIN instances i ON i.id = m.instance_fk JOIN series se ON se.id = i.series_fk \
             JOIN studies st ON st.id = se.study_fk WHERE st.study_uid = $1",
        );
        if series_uid.is_some() {
            text.push_str(" AND se.series_uid = $2");
        }
        text.push_str(" ORDER BY se.series_uid, i.instance_number, i.sop_uid");
        let mut q = sqlx::query(&text).bind(study_uid);
        if let Some(s) = series_uid {
            q = q.bind(s);
        }
        let rows = q.fetch_all(self.read_pool()).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// The Patient ID of a study, or `None` when the study is not stored.
    ///
    /// # Errors
    /// Database errors.
    pub async fn study_patient(&self, study_uid: &str) -> Result<Option<String>, IndexError> {
        Ok(sqlx::query_scalar(
            "SELECT p.patient_id FROM studies st JOIN patients p ON p.id = st.patient_fk \
             WHERE st.study_uid = $1",
        )
        .bind(study_uid)
        .fetch_optional(self.read_pool())
        .await?)
    }

    /// Per-series instance counts and modality for a study, ordered by series UID.
    ///
    /// # Errors
    /// Database errors.
    pub async fn study_series(&self, study_uid: &str) -> Result<Vec<(String, i64)>, IndexError> {
        let rows = sqlx::query(
            "SELECT se.series_uid, se.num_instances FROM series se \
             JOIN studies st ON st.id = se.study_fk WHERE st.study_uid = $1 ORDER BY se.series_uid",
        )
        .bind(study_uid)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// A page of blob references with row id greater than `after`, in id order.
    ///
    /// # Errors
    /// Database errors.
    pub async fn blob_refs(&self, after: i64, limit: i64) -> Result<Vec<BlobRef>, IndexError> {
        let rows = sqlx::query(
            "SELECT id, sop_uid, blob_key, sha256, size_bytes FROM instances \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.read_pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(BlobRef {
                    id: r.try_get(0)?,
                    sop_uid: r.try_get(1)?,
                    blob_key: r.try_get(2)?,
                    sha256: r.try_get(3)?,
                    size_bytes: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Whether any instance row refers to `blob_key`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn blob_is_referenced(&self, blob_key: &str) -> Result<bool, IndexError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE blob_key = $1")
            .bind(blob_key)
            .fetch_one(self.read_pool())
            .await?;
        Ok(n > 0)
    }
}
