//! Writing instances into the index, inside a transaction the caller owns.

use kade_core::{InstanceAttributes, attrs::search_key};
use sqlx::{AnyConnection, Executor, Row};

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
    /// SHA-256 of the dataset part of the blob (after the File Meta group), lowercase hex;
    /// empty when not computed (ingest computes it only when it compares two instances whose
    /// blobs differ; the blob's SHA-256 identifies the data set otherwise).
    pub dataset_sha256: &'a str,
    /// Calling AE title (DIMSE) or principal (HTTP) that sent it.
    pub source_ae: Option<&'a str>,
    /// Network address it came from.
    pub source_address: Option<&'a str>,
    /// How it arrived, for routing: `ae:CALLED` (DIMSE), `exchange:ORG`, `web`.
    pub received_via: Option<&'a str>,
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
    /// Its blob's SHA-256.
    pub sha256: String,
    /// Its dataset digest, to tell a resend of the same object from a different object
    /// (empty when not computed).
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
    other_ids_by_study(tx, rec, study).await?;
    let (series, new_series) = upsert_series(tx, a, study, &now).await?;
    let placement = Placement { study, series };
    let modalities = add_modality(&modalities, a.series.modality.as_deref());
    let update = StudyUpdate {
        new_series,
        modalities,
    };
    let outcome = insert_placed(tx, rec, placement, update, &now).await?;
    Ok((outcome, placement))
}

/// Where an instance's series and study rows are, as [`insert_instance`] found or made them.
/// A caller that keeps this for a series it sees again can skip the lookups with
/// [`insert_into_series_audited`] or [`commit_batch_sqlite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Study row id.
    pub study: i64,
    /// Series row id.
    pub series: i64,
}

struct StudyUpdate {
    new_series: bool,
    /// ModalitiesInStudy to set.
    modalities: String,
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

    let sql = format!(
        "INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES ({INSTANCE_VALUES}, $18) \
         ON CONFLICT (sop_uid) DO NOTHING RETURNING id"
    );
    let id: Option<i64> = bind_instance(sqlx::query(&sql), rec, series, now)
        .bind(rec.received_via)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
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
         num_series = num_series + $2, modalities = $3, updated_at = $4 \
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

/// An audit log entry, already chained (see `kade_audit::Chain`), ready to be written.
#[derive(Debug, Clone, Copy)]
pub struct AuditRow<'a> {
    /// Sequence number.
    pub seq: i64,
    /// When (RFC 3339 UTC).
    pub at: &'a str,
    /// Event name.
    pub event: &'a str,
    /// Outcome name.
    pub outcome: &'a str,
    /// Who.
    pub actor: &'a str,
    /// From where.
    pub actor_address: Option<&'a str>,
    /// Patient ID.
    pub patient_id: Option<&'a str>,
    /// Study Instance UID.
    pub study_uid: Option<&'a str>,
    /// SOP Instance UID.
    pub sop_uid: Option<&'a str>,
    /// Free text.
    pub detail: Option<&'a str>,
    /// Hash of the previous entry.
    pub prev_hash: &'a str,
    /// This entry's hash.
    pub hash: &'a str,
}

/// The columns of an audit entry, in the order [`bind_audit`] binds them.
const AUDIT_COLUMNS: &str = "seq, at, event, outcome, actor, actor_address, patient_id, \
                             study_uid, sop_uid, detail, prev_hash, hash";

fn bind_audit<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    e: &AuditRow<'q>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    q.bind(e.seq)
        .bind(e.at)
        .bind(e.event)
        .bind(e.outcome)
        .bind(e.actor)
        .bind(e.actor_address)
        .bind(e.patient_id)
        .bind(e.study_uid)
        .bind(e.sop_uid)
        .bind(e.detail)
        .bind(e.prev_hash)
        .bind(e.hash)
}

/// Writes an audit entry.
///
/// # Errors
/// Database errors.
pub async fn insert_audit(conn: &mut AnyConnection, e: &AuditRow<'_>) -> Result<(), IndexError> {
    let sql = format!(
        "INSERT INTO audit_log ({AUDIT_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    );
    bind_audit(sqlx::query(&sql), e).execute(conn).await?;
    Ok(())
}

/// Inserts an instance into a series whose rows exist already (see [`Placement`]), updates
/// the counts and writes the instance's audit entry, in one round trip to the database
/// (SQLite: one multi-statement query; PostgreSQL: one statement of data-modifying CTEs).
/// Returns the new row id.
///
/// # Errors
/// Database errors, including a unique-constraint violation when the SOP Instance UID is
/// indexed already, which leaves the transaction for the caller to roll back (to a savepoint).
pub async fn insert_into_series_audited(
    conn: &mut AnyConnection,
    rec: &NewInstance<'_>,
    placement: Placement,
    audit: &AuditRow<'_>,
) -> Result<i64, IndexError> {
    let sqlite = conn.backend_name() == "SQLite";
    let sql = if sqlite {
        sqlite_item_sql()
    } else {
        format!(
            "WITH ins AS (INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES ({INSTANCE_VALUES}, $32) \
             RETURNING id), \
             meta AS (INSERT INTO instance_metadata (instance_fk, json) SELECT id, $18 FROM ins), \
             se AS ({UPDATE_SERIES}), st AS ({UPDATE_STUDY}), \
             au AS (INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ({AUDIT_VALUES})) \
             SELECT id FROM ins"
        )
    };
    let q = bind_item(sqlx::query(&sql), rec, placement, audit, &crate::now());
    // `fetch_all`: every statement of a multi-statement query runs only if the rows are drained.
    let rows = q.fetch_all(&mut *conn).await?;
    let row = rows.first().ok_or_else(|| {
        IndexError::Db(sqlx::Error::Protocol(
            "instance insert returned no id".into(),
        ))
    })?;
    let id = row.try_get(0)?;
    other_ids_by_study(conn, rec, placement.study).await?;
    Ok(id)
}

/// One instance of [`commit_batch_sqlite`].
#[derive(Debug, Clone)]
pub struct BatchItem<'a> {
    /// The instance.
    pub rec: NewInstance<'a>,
    /// Its series and study rows, which exist.
    pub placement: Placement,
    /// Its audit entry.
    pub audit: AuditRow<'a>,
}

/// SQLite only: commits instances into series whose rows exist, with their audit entries and
/// the audit chain's new head (`head`: sequence number and hash after the last entry), in one
/// round trip to the database: one multi-statement query from `BEGIN` to `COMMIT`. With
/// `durable: false` the commit does not wait for the sync (`synchronous` NORMAL for this
/// commit, FULL again after it). Returns the new row ids in order (`Ok(Err(_))`: rolled back).
///
/// Every statement must succeed, or nothing is committed: a SOP Instance UID indexed already
/// (unique constraint), a series row gone (foreign key), or an audit chain that another writer
/// has moved on since `head` was read (the entries' sequence numbers exist: primary key).
/// The caller then runs the batch again the slow way, which tells these apart.
///
/// # Errors
/// Only when a failed batch could not be rolled back or the connection could not be put back
/// to durable commits: the caller must then close the connection.
pub async fn commit_batch_sqlite(
    conn: &mut AnyConnection,
    items: &[BatchItem<'_>],
    head: (i64, &str),
    durable: bool,
) -> Result<Result<Vec<i64>, IndexError>, IndexError> {
    const PER_ITEM: usize = 32;
    let mut sql = String::with_capacity(items.len() * 1200 + 200);
    if !durable {
        sql.push_str("PRAGMA synchronous = NORMAL; ");
    }
    sql.push_str("BEGIN; ");
    let item = sqlite_item_sql();
    for k in 0..items.len() {
        renumber(&item, k * PER_ITEM, &mut sql);
        sql.push_str("; ");
    }
    let n = items.len() * PER_ITEM;
    // The Other Patient IDs items, once per study of the batch (its instances mostly repeat
    // them), bound after the audit head.
    let mut other_ids: Vec<(&kade_core::OtherPatientId, i64)> = Vec::new();
    for it in items {
        for o in &it.rec.attrs.patient.other_ids {
            if !other_ids.contains(&(o, it.placement.study)) {
                other_ids.push((o, it.placement.study));
            }
        }
    }
    for k in 0..other_ids.len() {
        renumber(OTHER_ID_BY_STUDY, n + 2 + k * 4, &mut sql);
        sql.push_str("; ");
    }
    sql.push_str(&format!(
        "UPDATE audit_head SET seq = ${}, hash = ${} WHERE id = 1; COMMIT",
        n + 1,
        n + 2
    ));
    if !durable {
        sql.push_str("; PRAGMA synchronous = FULL");
    }
    let now = crate::now();
    let mut q = sqlx::query(&sql);
    for it in items {
        q = bind_item(q, &it.rec, it.placement, &it.audit, &now);
    }
    let mut q = q.bind(head.0).bind(head.1);
    for (o, study) in other_ids {
        q = q
            .bind(o.id.as_str())
            .bind(o.issuer.as_str())
            .bind(o.universal_id.as_str())
            .bind(study);
    }
    Ok(one_round_trip(conn, q, durable).await?.map(|rows| {
        // Every statement ran, so every row is committed: the ids are for information.
        rows.iter()
            .map(|r| r.try_get(0).unwrap_or_default())
            .collect()
    }))
}

/// SQLite only: appends one audit entry and moves the chain's head to it, in one round trip
/// (`BEGIN` … `COMMIT`), without waiting for the sync unless `durable`. `Ok(Err(_))`: rolled
/// back, notably when the entry's sequence number is taken (another writer appended since the
/// caller read the head: primary key).
///
/// # Errors
/// As [`commit_batch_sqlite`]: only when the connection must be closed.
pub async fn append_audit_sqlite(
    conn: &mut AnyConnection,
    entry: &AuditRow<'_>,
    durable: bool,
) -> Result<Result<(), IndexError>, IndexError> {
    let sql = format!(
        "{}BEGIN; INSERT INTO audit_log ({AUDIT_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12); \
         UPDATE audit_head SET seq = $1, hash = $12 WHERE id = 1; COMMIT{}",
        if durable {
            ""
        } else {
            "PRAGMA synchronous = NORMAL; "
        },
        if durable {
            ""
        } else {
            "; PRAGMA synchronous = FULL"
        },
    );
    let q = bind_audit(sqlx::query(&sql), entry);
    Ok(one_round_trip(conn, q, durable).await?.map(|_| ()))
}

/// Runs a multi-statement query from `BEGIN` to `COMMIT` (bracketed by `PRAGMA synchronous`
/// NORMAL / FULL unless `durable`). On failure, rolls back and restores durable commits:
/// `Ok(Err(_))`; `Err(_)` when that fails too and the connection must be closed.
async fn one_round_trip<'q>(
    conn: &mut AnyConnection,
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    durable: bool,
) -> Result<Result<Vec<sqlx::any::AnyRow>, IndexError>, IndexError> {
    // `fetch_all`: every statement of a multi-statement query runs only if the rows are drained.
    match q.fetch_all(&mut *conn).await {
        Ok(rows) => Ok(Ok(rows)),
        Err(e) => {
            let undo = if durable {
                "ROLLBACK"
            } else {
                "ROLLBACK; PRAGMA synchronous = FULL"
            };
            // Without an open transaction ROLLBACK fails harmlessly; the PRAGMA must not.
            if let Err(r) = conn.execute(undo).await {
                if !durable && !r.to_string().contains("no transaction") {
                    return Err(IndexError::Db(r));
                }
                if !durable {
                    conn.execute("PRAGMA synchronous = FULL").await?;
                }
            }
            Ok(Err(e.into()))
        }
    }
}

/// SQLite: one instance into a known series, its counts and its audit entry, as statements
/// bound by [`bind_item`] (`$1`…`$32`).
fn sqlite_item_sql() -> String {
    format!(
        "INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES ({INSTANCE_VALUES}, $32) RETURNING id; \
         INSERT INTO instance_metadata (instance_fk, json) VALUES (last_insert_rowid(), $18); \
         {UPDATE_SERIES}; {UPDATE_STUDY}; \
         INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ({AUDIT_VALUES})"
    )
}

/// Binds an instance (`$1`…`$17`), its DICOM JSON (`$18`), its study row (`$19`), its audit
/// entry (`$20`…`$31`) and how it arrived (`$32`).
fn bind_item<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rec: &NewInstance<'q>,
    placement: Placement,
    audit: &AuditRow<'q>,
    now: &str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let q = bind_instance(q, rec, placement.series, now)
        .bind(rec.metadata_json)
        .bind(placement.study);
    bind_audit(q, audit).bind(rec.received_via)
}

/// Appends `template` to `out` with every `$N` placeholder shifted to `$(N + by)`.
fn renumber(template: &str, by: usize, out: &mut String) {
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: usize = rest[..digits].parse().expect("placeholders are $N");
        out.push_str(&(n + by).to_string());
        rest = &rest[digits..];
    }
    out.push_str(rest);
}

/// Instance columns, bound by [`bind_instance`] as `$1`…`$17`.
const INSTANCE_COLUMNS: &str = "sop_uid, series_fk, sop_class_uid, instance_number, pixel_rows, \
     pixel_columns, number_of_frames, bits_allocated, transfer_syntax_uid, \
     specific_character_set, blob_key, size_bytes, sha256, dataset_sha256, received_at, \
     source_ae, source_address, received_via";
const INSTANCE_VALUES: &str =
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17";
/// The series' counts (`$2` series id, `$12` size, `$15` time).
const UPDATE_SERIES: &str = "UPDATE series SET num_instances = num_instances + 1, \
     size_bytes = size_bytes + $12, updated_at = $15 WHERE id = $2";
/// The study's counts for an instance of a known series (`$19` study id).
const UPDATE_STUDY: &str = "UPDATE studies SET num_instances = num_instances + 1, \
     size_bytes = size_bytes + $12, updated_at = $15 WHERE id = $19";
const AUDIT_VALUES: &str = "$20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31";

fn bind_instance<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    rec: &NewInstance<'q>,
    series: i64,
    now: &str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let a = rec.attrs;
    q.bind(a.sop_instance_uid.as_str())
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
        .bind(now.to_owned())
        .bind(rec.source_ae)
        .bind(rec.source_address)
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
    let row = sqlx::query(
        "SELECT id, blob_key, sha256, dataset_sha256 FROM instances WHERE sop_uid = $1",
    )
    .bind(sop_uid)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(r) => Some(ExistingInstance {
            id: r.try_get(0)?,
            blob_key: r.try_get(1)?,
            sha256: r.try_get(2)?,
            dataset_sha256: r.try_get(3)?,
        }),
        None => None,
    })
}

/// Records one Other Patient IDs item for the patient of study row `$4`.
const OTHER_ID_BY_STUDY: &str = "INSERT INTO patient_other_ids (other_id, issuer, universal_id, \
     patient_fk) SELECT $1, $2, $3, patient_fk FROM studies WHERE id = $4 ON CONFLICT DO NOTHING";

/// Records the Other Patient IDs items of `rec` for the patient of its study row (every insert
/// path; the fast ones do not touch the patient row).
async fn other_ids_by_study(
    conn: &mut AnyConnection,
    rec: &NewInstance<'_>,
    study: i64,
) -> Result<(), IndexError> {
    for o in &rec.attrs.patient.other_ids {
        sqlx::query(OTHER_ID_BY_STUDY)
            .bind(&o.id)
            .bind(&o.issuer)
            .bind(&o.universal_id)
            .bind(study)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
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
    fn placeholders_are_renumbered() {
        let mut out = String::new();
        super::renumber("VALUES ($1, $12); x = $3", 31, &mut out);
        assert_eq!(out, "VALUES ($32, $43); x = $34");
    }

    #[test]
    fn modality_set() {
        assert_eq!(super::add_modality("", Some("CT")), "CT");
        assert_eq!(super::add_modality("CT\\SR", Some("MR")), "CT\\MR\\SR");
        assert_eq!(super::add_modality("CT", Some("CT")), "CT");
        assert_eq!(super::add_modality("CT", None), "CT");
    }
}
