//! Writing instances into the index, inside a transaction the caller owns.

use kade_core::{InstanceAttributes, attrs::search_key};
use sqlx::{AnyConnection, Row};

use crate::IndexError;

/// Everything needed to index one stored instance.
#[derive(Debug, Clone)]
pub struct NewInstance<'a> {
    /// The extracted attributes.
    pub attrs: &'a InstanceAttributes,
    /// Transfer syntax the blob is encoded in.
    pub transfer_syntax_uid: &'a str,
    /// Where the blob is.
    pub blob_key: &'a str,
    /// Blob size in bytes.
    pub size_bytes: u64,
    /// SHA-256 of the blob, lowercase hex.
    pub sha256: &'a str,
    /// SHA-256 of the dataset part of the blob (after the File Meta group), lowercase hex.
    pub dataset_sha256: &'a str,
    /// Calling AE title (DIMSE) or principal (HTTP) that sent it.
    pub source_ae: Option<&'a str>,
    /// Network address it came from.
    pub source_address: Option<&'a str>,
    /// DICOM JSON without bulk data.
    pub metadata_json: &'a str,
}

/// An instance already in the index under the same SOP Instance UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingInstance {
    /// Row id.
    pub id: i64,
    /// Its blob.
    pub blob_key: String,
    /// Its dataset digest, to tell a resend of the same object from a different object.
    pub dataset_sha256: String,
}

/// What [`insert_instance`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new instance row was added.
    Inserted {
        /// Row id of the new instance.
        id: i64,
    },
    /// Nothing was inserted: the SOP Instance UID is already indexed.
    Exists(ExistingInstance),
}

/// Inserts an instance (and its patient, study and series when new) and updates the derived
/// counts. Returns [`InsertOutcome::Exists`] without changing anything about the instance
/// when its SOP Instance UID is already present.
///
/// # Errors
/// Database errors. The caller should roll back its transaction on error.
pub async fn insert_instance(
    tx: &mut AnyConnection,
    rec: &NewInstance<'_>,
) -> Result<(InsertOutcome, Placement), IndexError> {
    let a = rec.attrs;
    let now = crate::now();
    let patient = upsert_patient(tx, a, &now).await?;
    let (study, modalities) = upsert_study(tx, a, patient, &now).await?;
    let (series, new_series) = upsert_series(tx, a, study, &now).await?;
    let placement = Placement { study, series };
    let modalities = add_modality(&modalities, a.series.modality.as_deref());
    let update = StudyUpdate {
        new_series,
        modalities: Some(modalities),
    };
    let outcome = insert_placed(tx, rec, placement, update, &now).await?;
    Ok((outcome, placement))
}

/// Where an instance's series and study rows are, as [`insert_instance`] found or made them.
/// A caller that keeps this for a series it sees again can skip the lookups with
/// [`insert_into_series`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Study row id.
    pub study: i64,
    /// Series row id.
    pub series: i64,
}

struct StudyUpdate {
    new_series: bool,
    /// ModalitiesInStudy to set, when it may have changed.
    modalities: Option<String>,
}

/// Inserts an instance into a series whose rows exist already (see [`Placement`]).
///
/// # Errors
/// Database errors, including a foreign-key violation when the placement is stale.
pub async fn insert_into_series(
    tx: &mut AnyConnection,
    rec: &NewInstance<'_>,
    placement: Placement,
) -> Result<InsertOutcome, IndexError> {
    let update = StudyUpdate {
        new_series: false,
        modalities: None,
    };
    insert_placed(tx, rec, placement, update, &crate::now()).await
}

async fn insert_placed(
    tx: &mut AnyConnection,
    rec: &NewInstance<'_>,
    placement: Placement,
    update: StudyUpdate,
    now: &str,
) -> Result<InsertOutcome, IndexError> {
    let a = rec.attrs;
    let Placement { study, series } = placement;

    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO instances (sop_uid, series_fk, sop_class_uid, instance_number, pixel_rows, \
         pixel_columns, number_of_frames, bits_allocated, transfer_syntax_uid, \
         specific_character_set, blob_key, size_bytes, sha256, dataset_sha256, received_at, \
         source_ae, source_address) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         ON CONFLICT (sop_uid) DO NOTHING RETURNING id",
    )
    .bind(a.sop_instance_uid.as_str())
    .bind(series)
    .bind(a.sop_class_uid.as_str())
    .bind(a.instance_number)
    .bind(a.rows)
    .bind(a.columns)
    .bind(a.number_of_frames)
    .bind(a.bits_allocated)
    .bind(rec.transfer_syntax_uid)
    .bind(a.specific_character_set.as_deref())
    .bind(rec.blob_key)
    .bind(rec.size_bytes as i64)
    .bind(rec.sha256)
    .bind(rec.dataset_sha256)
    .bind(now)
    .bind(rec.source_ae)
    .bind(rec.source_address)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else {
        // Inserted concurrently by another node since the check above.
        let existing = find_instance(tx, a.sop_instance_uid.as_str()).await?;
        return Ok(InsertOutcome::Exists(
            existing.expect("conflicting row exists"),
        ));
    };
    sqlx::query("INSERT INTO instance_metadata (instance_fk, json) VALUES ($1, $2)")
        .bind(id)
        .bind(rec.metadata_json)
        .execute(&mut *tx)
        .await?;

    let size = rec.size_bytes as i64;
    sqlx::query(
        "UPDATE series SET num_instances = num_instances + 1, size_bytes = size_bytes + $1, \
         updated_at = $2 WHERE id = $3",
    )
    .bind(size)
    .bind(now)
    .bind(series)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE studies SET num_instances = num_instances + 1, size_bytes = size_bytes + $1, \
         num_series = num_series + $2, modalities = COALESCE($3, modalities), updated_at = $4 \
         WHERE id = $5",
    )
    .bind(size)
    .bind(i64::from(update.new_series))
    .bind(update.modalities)
    .bind(now)
    .bind(study)
    .execute(&mut *tx)
    .await?;
    Ok(InsertOutcome::Inserted { id })
}

/// Removes an instance row (its metadata goes with it) and updates the derived counts.
/// Series and studies left empty are removed too. The blob is the caller's to delete,
/// after the transaction commits.
///
/// # Errors
/// Database errors.
pub async fn delete_instance(tx: &mut AnyConnection, id: i64) -> Result<(), IndexError> {
    let row = sqlx::query(
        "SELECT i.series_fk, i.size_bytes, s.study_fk FROM instances i \
         JOIN series s ON s.id = i.series_fk WHERE i.id = $1",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let (series, size, study): (i64, i64, i64) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    sqlx::query("DELETE FROM instance_metadata WHERE instance_fk = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM instances WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let now = crate::now();
    sqlx::query(
        "UPDATE series SET num_instances = num_instances - 1, size_bytes = size_bytes - $1, \
         updated_at = $2 WHERE id = $3",
    )
    .bind(size)
    .bind(&now)
    .bind(series)
    .execute(&mut *tx)
    .await?;
    let emptied = sqlx::query("DELETE FROM series WHERE id = $1 AND num_instances = 0")
        .bind(series)
        .execute(&mut *tx)
        .await?
        .rows_affected() as i64;
    // Recompute ModalitiesInStudy from the series that remain.
    let mods: Vec<Option<String>> =
        sqlx::query_scalar("SELECT modality FROM series WHERE study_fk = $1 ORDER BY id")
            .bind(study)
            .fetch_all(&mut *tx)
            .await?;
    let modalities = mods
        .iter()
        .fold(String::new(), |acc, m| add_modality(&acc, m.as_deref()));
    sqlx::query(
        "UPDATE studies SET num_instances = num_instances - 1, size_bytes = size_bytes - $1, \
         num_series = num_series - $2, modalities = $3, updated_at = $4 WHERE id = $5",
    )
    .bind(size)
    .bind(emptied)
    .bind(modalities)
    .bind(&now)
    .bind(study)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM studies WHERE id = $1 AND num_instances = 0")
        .bind(study)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Looks up an instance by SOP Instance UID.
///
/// # Errors
/// Database errors.
pub async fn find_instance(
    conn: &mut AnyConnection,
    sop_uid: &str,
) -> Result<Option<ExistingInstance>, IndexError> {
    let row = sqlx::query("SELECT id, blob_key, dataset_sha256 FROM instances WHERE sop_uid = $1")
        .bind(sop_uid)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(r) => Some(ExistingInstance {
            id: r.try_get(0)?,
            blob_key: r.try_get(1)?,
            dataset_sha256: r.try_get(2)?,
        }),
        None => None,
    })
}

async fn upsert_patient(
    tx: &mut AnyConnection,
    a: &InstanceAttributes,
    now: &str,
) -> Result<i64, IndexError> {
    let p = &a.patient;
    let issuer = p.issuer.as_deref().unwrap_or("");
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO patients (patient_id, issuer, name, name_search, birth_date, sex, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
         ON CONFLICT (patient_id, issuer) DO NOTHING RETURNING id",
    )
    .bind(&p.patient_id)
    .bind(issuer)
    .bind(p.name.as_deref())
    .bind(p.name.as_deref().map(search_key))
    .bind(p.birth_date.as_deref())
    .bind(p.sex.as_deref())
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(id) = inserted {
        return Ok(id);
    }
    Ok(
        sqlx::query_scalar("SELECT id FROM patients WHERE patient_id = $1 AND issuer = $2")
            .bind(&p.patient_id)
            .bind(issuer)
            .fetch_one(&mut *tx)
            .await?,
    )
}

async fn upsert_study(
    tx: &mut AnyConnection,
    a: &InstanceAttributes,
    patient: i64,
    now: &str,
) -> Result<(i64, String), IndexError> {
    let s = &a.study;
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO studies (study_uid, patient_fk, study_date, study_time, accession_number, \
         referring_physician, referring_physician_search, description, study_id, \
         timezone_offset, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         ON CONFLICT (study_uid) DO NOTHING RETURNING id",
    )
    .bind(s.study_uid.as_str())
    .bind(patient)
    .bind(s.date.as_deref())
    .bind(s.time.as_deref())
    .bind(s.accession_number.as_deref())
    .bind(s.referring_physician.as_deref())
    .bind(s.referring_physician.as_deref().map(search_key))
    .bind(s.description.as_deref())
    .bind(s.study_id.as_deref())
    .bind(s.timezone_offset.as_deref())
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(id) = inserted {
        return Ok((id, String::new()));
    }
    let row = sqlx::query("SELECT id, patient_fk, modalities FROM studies WHERE study_uid = $1")
        .bind(s.study_uid.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let owner: i64 = row.try_get(1)?;
    if owner != patient {
        tracing::warn!(
            study = %s.study_uid,
            "instance names a different patient than its study already has; kept under the study's patient"
        );
    }
    Ok((row.try_get(0)?, row.try_get(2)?))
}

async fn upsert_series(
    tx: &mut AnyConnection,
    a: &InstanceAttributes,
    study: i64,
    now: &str,
) -> Result<(i64, bool), IndexError> {
    let s = &a.series;
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO series (series_uid, study_fk, modality, series_number, description, \
         body_part, pps_start_date, pps_start_time, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) \
         ON CONFLICT (series_uid) DO NOTHING RETURNING id",
    )
    .bind(s.series_uid.as_str())
    .bind(study)
    .bind(s.modality.as_deref())
    .bind(s.number)
    .bind(s.description.as_deref())
    .bind(s.body_part.as_deref())
    .bind(s.pps_start_date.as_deref())
    .bind(s.pps_start_time.as_deref())
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(id) = inserted {
        return Ok((id, true));
    }
    let id = sqlx::query_scalar("SELECT id FROM series WHERE series_uid = $1")
        .bind(s.series_uid.as_str())
        .fetch_one(&mut *tx)
        .await?;
    Ok((id, false))
}

/// Adds `modality` to a `\`-separated set, keeping it sorted and without duplicates.
fn add_modality(set: &str, modality: Option<&str>) -> String {
    let mut v: Vec<&str> = set.split('\\').filter(|m| !m.is_empty()).collect();
    if let Some(m) = modality.filter(|m| !m.is_empty()) {
        v.push(m);
    }
    v.sort_unstable();
    v.dedup();
    v.join("\\")
}

#[cfg(test)]
mod tests {
    #[test]
    fn modality_set() {
        assert_eq!(super::add_modality("", Some("CT")), "CT");
        assert_eq!(super::add_modality("CT\\SR", Some("MR")), "CT\\MR\\SR");
        assert_eq!(super::add_modality("CT", Some("CT")), "CT");
        assert_eq!(super::add_modality("CT", None), "CT");
    }
}
