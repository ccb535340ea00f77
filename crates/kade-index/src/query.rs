//! The query model shared by QIDO-RS and C-FIND ("one query model, two front ends"):
//! attribute matching per PS3.4 §C.2.2.2, translated to SQL that runs unchanged on SQLite and
//! PostgreSQL.
//!
//! Matching kinds: universal (empty value or `*`), single value, wildcard (`*` any run, `?`
//! exactly one character, also a non-ASCII one), UID list (`\`-separated), and date range
//! (`A-B`, `-B`, `A-`). Person names match case-insensitively through their upper-case search
//! key; every other attribute matches case-sensitively.

use sqlx::Row;

use crate::{Index, IndexError};

/// How a value is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A person name: case-insensitive, wildcards allowed.
    PersonName,
    /// A string: case-sensitive, wildcards allowed.
    Text,
    /// A date (DA): single value or range.
    Date,
    /// A UID: single value or `\`-separated list, no wildcards.
    Uid,
    /// An integer (IS): single value.
    Integer,
}

/// Study-level matching keys (PS3.18 Table 10.6.1-5, PS3.4 C.6.1.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StudyKey {
    /// PatientName (0010,0010).
    PatientName,
    /// PatientID (0010,0020).
    PatientId,
    /// StudyDate (0008,0020).
    StudyDate,
    /// AccessionNumber (0008,0050).
    AccessionNumber,
    /// StudyInstanceUID (0020,000D).
    StudyInstanceUid,
    /// ModalitiesInStudy (0008,0061): matches if any series has the modality.
    ModalitiesInStudy,
    /// ReferringPhysicianName (0008,0090).
    ReferringPhysicianName,
    /// StudyID (0020,0010).
    StudyId,
    /// StudyDescription (0008,1030).
    StudyDescription,
}

impl StudyKey {
    fn column(self) -> (&'static str, Kind) {
        match self {
            StudyKey::PatientName => ("p.name_search", Kind::PersonName),
            StudyKey::PatientId => ("p.patient_id", Kind::Text),
            StudyKey::StudyDate => ("st.study_date", Kind::Date),
            StudyKey::AccessionNumber => ("st.accession_number", Kind::Text),
            StudyKey::StudyInstanceUid => ("st.study_uid", Kind::Uid),
            StudyKey::ModalitiesInStudy => ("se.modality", Kind::Text),
            StudyKey::ReferringPhysicianName => ("st.referring_physician_search", Kind::PersonName),
            StudyKey::StudyId => ("st.study_id", Kind::Text),
            StudyKey::StudyDescription => ("st.description", Kind::Text),
        }
    }
}

/// A study-level query.
#[derive(Debug, Clone, Default)]
pub struct StudyQuery {
    /// Matching keys with their (already percent-decoded) values.
    pub matches: Vec<(StudyKey, String)>,
    /// At most this many results (None: no limit).
    pub limit: Option<i64>,
    /// Skip this many results.
    pub offset: i64,
}

/// A matching study with the attributes QIDO-RS and C-FIND return at study level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyRow {
    /// Study Instance UID.
    pub study_uid: String,
    /// Study Date.
    pub study_date: Option<String>,
    /// Study Time.
    pub study_time: Option<String>,
    /// Accession Number.
    pub accession_number: Option<String>,
    /// Study Description.
    pub description: Option<String>,
    /// Study ID.
    pub study_id: Option<String>,
    /// Referring Physician's Name.
    pub referring_physician: Option<String>,
    /// Modalities in Study, `\`-separated.
    pub modalities: String,
    /// Number of Study Related Series.
    pub num_series: i64,
    /// Number of Study Related Instances.
    pub num_instances: i64,
    /// Patient ID.
    pub patient_id: String,
    /// Issuer of Patient ID.
    pub issuer: String,
    /// Patient's Name.
    pub patient_name: Option<String>,
    /// Patient's Birth Date.
    pub birth_date: Option<String>,
    /// Patient's Sex.
    pub sex: Option<String>,
}

/// A query value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {key}: {why}")]
pub struct QueryError {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// What is wrong.
    pub why: &'static str,
}

/// SQL conditions with their parameters.
#[derive(Debug, Default)]
struct Sql {
    conds: Vec<String>,
    params: Vec<String>,
}

impl Sql {
    fn param(&mut self, v: String) -> String {
        self.params.push(v);
        format!("${}", self.params.len())
    }

    /// Adds the condition for `col` (of `kind`) matching `value`; `None` when universal.
    fn add(
        &mut self,
        key: &str,
        col: &str,
        kind: Kind,
        value: &str,
    ) -> Result<Option<String>, QueryError> {
        let bad = |why| QueryError {
            key: key.to_owned(),
            value: value.to_owned(),
            why,
        };
        let v = value.trim();
        if v.is_empty() || v == "*" {
            return Ok(None);
        }
        Ok(Some(match kind {
            Kind::Uid => {
                let uids: Vec<&str> = v
                    .split('\\')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .collect();
                if uids
                    .iter()
                    .any(|u| !u.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                {
                    return Err(bad("a UID has only digits and dots"));
                }
                let ps: Vec<String> = uids.iter().map(|u| self.param((*u).to_owned())).collect();
                format!("{col} IN ({})", ps.join(", "))
            }
            Kind::Date => match v.split_once('-') {
                Some((from, to)) => {
                    let ok = |d: &str| {
                        d.is_empty() || (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
                    };
                    if !ok(from) || !ok(to) || (from.is_empty() && to.is_empty()) {
                        return Err(bad(
                            "a date range is YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-",
                        ));
                    }
                    let mut c = Vec::new();
                    if !from.is_empty() {
                        c.push(format!("{col} >= {}", self.param(from.to_owned())));
                    }
                    if !to.is_empty() {
                        c.push(format!("{col} <= {}", self.param(to.to_owned())));
                    }
                    c.join(" AND ")
                }
                None => {
                    if v.len() != 8 || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad("a date is YYYYMMDD"));
                    }
                    format!("{col} = {}", self.param(v.to_owned()))
                }
            },
            Kind::Integer => {
                let n: i64 = v.parse().map_err(|_| bad("an integer is expected"))?;
                format!("{col} = CAST({} AS BIGINT)", self.param(n.to_string()))
            }
            Kind::PersonName | Kind::Text => {
                let v = if kind == Kind::PersonName {
                    crate::search_key(v)
                } else {
                    v.to_owned()
                };
                if v.contains(['*', '?']) {
                    format!("{col} LIKE {} ESCAPE '\\'", self.param(like_pattern(&v)))
                } else {
                    format!("{col} = {}", self.param(v))
                }
            }
        }))
    }
}

/// DICOM wildcards to a LIKE pattern with `\` as the escape character.
fn like_pattern(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

impl Index {
    /// Runs a built query on the read pool.
    async fn fetch(&self, text: &str, sql: &Sql) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
        let mut query = sqlx::query(text);
        for p in &sql.params {
            query = query.bind(p.as_str());
        }
        query.fetch_all(self.read_pool()).await
    }

    /// Studies matching `q`, ordered by study date (newest first), then Study Instance UID.
    ///
    /// # Errors
    /// [`QueryError`] (wrapped in `Ok(Err)`) for unusable values; database errors otherwise.
    pub async fn find_studies(
        &self,
        q: &StudyQuery,
    ) -> Result<Result<Vec<StudyRow>, QueryError>, IndexError> {
        let mut sql = Sql::default();
        for (key, value) in &q.matches {
            let (col, kind) = key.column();
            let cond = match sql.add(&format!("{key:?}"), col, kind, value) {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            if let Some(c) = cond {
                let c = if *key == StudyKey::ModalitiesInStudy {
                    // Uncorrelated, so it runs once through the modality index; a correlated
                    // EXISTS made SQLite scan every matching series for every study.
                    format!("st.id IN (SELECT se.study_fk FROM series se WHERE {c})")
                } else {
                    c
                };
                sql.conds.push(c);
            }
        }
        let mut text = String::from(
            "SELECT st.study_uid, st.study_date, st.study_time, st.accession_number, st.description, \
             st.study_id, st.referring_physician, st.modalities, st.num_series, st.num_instances, \
             p.patient_id, p.issuer, p.name, p.birth_date, p.sex \
             FROM studies st JOIN patients p ON p.id = st.patient_fk",
        );
        if !sql.conds.is_empty() {
            text.push_str(" WHERE ");
            text.push_str(&sql.conds.join(" AND "));
        }
        // Integers from our own types, not request text: safe to inline.
        let limit = q.limit.unwrap_or(i64::MAX).max(0);
        text.push_str(&format!(
            " ORDER BY st.study_date DESC, st.study_uid LIMIT {limit} OFFSET {}",
            q.offset.max(0)
        ));
        let rows = self.fetch(&text, &sql).await?;
        let out = rows
            .iter()
            .map(|r| {
                Ok(StudyRow {
                    study_uid: r.try_get(0)?,
                    study_date: r.try_get(1)?,
                    study_time: r.try_get(2)?,
                    accession_number: r.try_get(3)?,
                    description: r.try_get(4)?,
                    study_id: r.try_get(5)?,
                    referring_physician: r.try_get(6)?,
                    modalities: r.try_get(7)?,
                    num_series: r.try_get(8)?,
                    num_instances: r.try_get(9)?,
                    patient_id: r.try_get(10)?,
                    issuer: r.try_get(11)?,
                    patient_name: r.try_get(12)?,
                    birth_date: r.try_get(13)?,
                    sex: r.try_get(14)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Ok(out))
    }
}

/// Patient-level matching keys (PS3.4 C.6.1.1.2, Patient Root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatientKey {
    /// PatientName (0010,0010).
    PatientName,
    /// PatientID (0010,0020).
    PatientId,
    /// IssuerOfPatientID (0010,0021).
    IssuerOfPatientId,
    /// PatientBirthDate (0010,0030).
    PatientBirthDate,
    /// PatientSex (0010,0040).
    PatientSex,
}

/// A matching patient, with the counts C-FIND returns at PATIENT level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRow {
    /// Patient ID.
    pub patient_id: String,
    /// Issuer of Patient ID.
    pub issuer: String,
    /// Patient's Name.
    pub name: Option<String>,
    /// Patient's Birth Date.
    pub birth_date: Option<String>,
    /// Patient's Sex.
    pub sex: Option<String>,
    /// Number of Patient Related Studies.
    pub num_studies: i64,
    /// Number of Patient Related Series.
    pub num_series: i64,
    /// Number of Patient Related Instances.
    pub num_instances: i64,
}

/// Series-level matching keys (PS3.4 C.6.1.1.4), with the unique keys of the levels above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesKey {
    /// StudyInstanceUID (0020,000D).
    StudyInstanceUid,
    /// SeriesInstanceUID (0020,000E).
    SeriesInstanceUid,
    /// Modality (0008,0060).
    Modality,
    /// SeriesNumber (0020,0011).
    SeriesNumber,
    /// SeriesDescription (0008,103E).
    SeriesDescription,
    /// BodyPartExamined (0018,0015).
    BodyPartExamined,
}

/// Instance-level matching keys (PS3.4 C.6.1.1.5), with the unique keys of the levels above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKey {
    /// StudyInstanceUID (0020,000D).
    StudyInstanceUid,
    /// SeriesInstanceUID (0020,000E).
    SeriesInstanceUid,
    /// SOPInstanceUID (0008,0018).
    SopInstanceUid,
    /// SOPClassUID (0008,0016).
    SopClassUid,
    /// InstanceNumber (0020,0013).
    InstanceNumber,
}

/// A query at series or instance level.
#[derive(Debug, Clone)]
pub struct LevelQuery<K> {
    /// Matching keys with their values.
    pub matches: Vec<(K, String)>,
    /// At most this many results (None: no limit).
    pub limit: Option<i64>,
    /// Skip this many results.
    pub offset: i64,
}

/// A matching series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRow {
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// Modality.
    pub modality: Option<String>,
    /// Series Number.
    pub number: Option<i64>,
    /// Series Description.
    pub description: Option<String>,
    /// Body Part Examined.
    pub body_part: Option<String>,
    /// Number of Series Related Instances.
    pub num_instances: i64,
}

/// A matching instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// SOP Instance UID.
    pub sop_uid: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Instance Number.
    pub number: Option<i64>,
    /// Rows.
    pub rows: Option<i64>,
    /// Columns.
    pub columns: Option<i64>,
    /// Number of Frames.
    pub frames: Option<i64>,
    /// Transfer syntax the instance is stored in.
    pub transfer_syntax_uid: String,
    /// Its blob.
    pub blob_key: String,
    /// Bits Allocated (whether a codec can decode it depends on it).
    pub bits_allocated: Option<i64>,
    /// Patient ID of its patient ('' when the instance had none), for the audit log.
    pub patient_id: String,
}

fn conditions<K: Copy + std::fmt::Debug>(
    matches: &[(K, String)],
    column: impl Fn(K) -> (&'static str, Kind),
) -> Result<Sql, QueryError> {
    let mut sql = Sql::default();
    for (key, value) in matches {
        let (col, kind) = column(*key);
        if let Some(c) = sql.add(&format!("{key:?}"), col, kind, value)? {
            sql.conds.push(c);
        }
    }
    Ok(sql)
}

fn finish_sql(mut text: String, sql: &Sql, order: &str, limit: Option<i64>, offset: i64) -> String {
    if !sql.conds.is_empty() {
        text.push_str(" WHERE ");
        text.push_str(&sql.conds.join(" AND "));
    }
    // Integers from our own types, not request text: safe to inline.
    let limit = limit.unwrap_or(i64::MAX).max(0);
    text.push_str(&format!(
        " ORDER BY {order} LIMIT {limit} OFFSET {}",
        offset.max(0)
    ));
    text
}

impl Index {
    /// Patients matching `q`, ordered by Patient ID.
    ///
    /// # Errors
    /// [`QueryError`] (wrapped in `Ok(Err)`) for unusable values; database errors otherwise.
    pub async fn find_patients(
        &self,
        q: &LevelQuery<PatientKey>,
    ) -> Result<Result<Vec<PatientRow>, QueryError>, IndexError> {
        let sql = match conditions(&q.matches, |k| match k {
            PatientKey::PatientName => ("p.name_search", Kind::PersonName),
            PatientKey::PatientId => ("p.patient_id", Kind::Text),
            PatientKey::IssuerOfPatientId => ("p.issuer", Kind::Text),
            PatientKey::PatientBirthDate => ("p.birth_date", Kind::Date),
            PatientKey::PatientSex => ("p.sex", Kind::Text),
        }) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        // SUM of BIGINT is NUMERIC on PostgreSQL: cast back so both backends decode an i64.
        let text = finish_sql(
            "SELECT p.patient_id, p.issuer, p.name, p.birth_date, p.sex, \
             (SELECT COUNT(*) FROM studies st WHERE st.patient_fk = p.id), \
             (SELECT CAST(COALESCE(SUM(st.num_series), 0) AS BIGINT) FROM studies st \
              WHERE st.patient_fk = p.id), \
             (SELECT CAST(COALESCE(SUM(st.num_instances), 0) AS BIGINT) FROM studies st \
              WHERE st.patient_fk = p.id) \
             FROM patients p"
                .into(),
            &sql,
            "p.patient_id, p.issuer",
            q.limit,
            q.offset,
        );
        let rows = self.fetch(&text, &sql).await?;
        let out = rows
            .iter()
            .map(|r| {
                Ok(PatientRow {
                    patient_id: r.try_get(0)?,
                    issuer: r.try_get(1)?,
                    name: r.try_get(2)?,
                    birth_date: r.try_get(3)?,
                    sex: r.try_get(4)?,
                    num_studies: r.try_get(5)?,
                    num_series: r.try_get(6)?,
                    num_instances: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Ok(out))
    }

    /// Series matching `q`, ordered by Series Number, then Series Instance UID.
    ///
    /// # Errors
    /// [`QueryError`] (wrapped in `Ok(Err)`) for unusable values; database errors otherwise.
    pub async fn find_series(
        &self,
        q: &LevelQuery<SeriesKey>,
    ) -> Result<Result<Vec<SeriesRow>, QueryError>, IndexError> {
        let sql = match conditions(&q.matches, |k| match k {
            SeriesKey::StudyInstanceUid => ("st.study_uid", Kind::Uid),
            SeriesKey::SeriesInstanceUid => ("se.series_uid", Kind::Uid),
            SeriesKey::Modality => ("se.modality", Kind::Text),
            SeriesKey::SeriesNumber => ("se.series_number", Kind::Integer),
            SeriesKey::SeriesDescription => ("se.description", Kind::Text),
            SeriesKey::BodyPartExamined => ("se.body_part", Kind::Text),
        }) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let text = finish_sql(
            "SELECT st.study_uid, se.series_uid, se.modality, se.series_number, se.description, \
             se.body_part, se.num_instances FROM series se JOIN studies st ON st.id = se.study_fk"
                .into(),
            &sql,
            "se.series_number, se.series_uid",
            q.limit,
            q.offset,
        );
        let rows = self.fetch(&text, &sql).await?;
        let out = rows
            .iter()
            .map(|r| {
                Ok(SeriesRow {
                    study_uid: r.try_get(0)?,
                    series_uid: r.try_get(1)?,
                    modality: r.try_get(2)?,
                    number: r.try_get(3)?,
                    description: r.try_get(4)?,
                    body_part: r.try_get(5)?,
                    num_instances: r.try_get(6)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Ok(out))
    }

    /// Instances matching `q`, ordered by Instance Number, then SOP Instance UID.
    ///
    /// # Errors
    /// [`QueryError`] (wrapped in `Ok(Err)`) for unusable values; database errors otherwise.
    pub async fn find_instances(
        &self,
        q: &LevelQuery<InstanceKey>,
    ) -> Result<Result<Vec<InstanceRow>, QueryError>, IndexError> {
        let sql = match conditions(&q.matches, |k| match k {
            InstanceKey::StudyInstanceUid => ("st.study_uid", Kind::Uid),
            InstanceKey::SeriesInstanceUid => ("se.series_uid", Kind::Uid),
            InstanceKey::SopInstanceUid => ("i.sop_uid", Kind::Uid),
            InstanceKey::SopClassUid => ("i.sop_class_uid", Kind::Uid),
            InstanceKey::InstanceNumber => ("i.instance_number", Kind::Integer),
        }) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let text = finish_sql(
            "SELECT st.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, i.instance_number, \
             i.pixel_rows, i.pixel_columns, i.number_of_frames, i.transfer_syntax_uid, i.blob_key, \
             i.bits_allocated, p.patient_id FROM instances i \
             JOIN series se ON se.id = i.series_fk JOIN studies st ON st.id = se.study_fk \
             JOIN patients p ON p.id = st.patient_fk"
                .into(),
            &sql,
            "i.instance_number, i.sop_uid",
            q.limit,
            q.offset,
        );
        let rows = self.fetch(&text, &sql).await?;
        let out = rows
            .iter()
            .map(|r| {
                Ok(InstanceRow {
                    study_uid: r.try_get(0)?,
                    series_uid: r.try_get(1)?,
                    sop_uid: r.try_get(2)?,
                    sop_class_uid: r.try_get(3)?,
                    number: r.try_get(4)?,
                    rows: r.try_get(5)?,
                    columns: r.try_get(6)?,
                    frames: r.try_get(7)?,
                    transfer_syntax_uid: r.try_get(8)?,
                    blob_key: r.try_get(9)?,
                    bits_allocated: r.try_get(10)?,
                    patient_id: r.try_get(11)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Ok(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_escaped_like_patterns() {
        assert_eq!(like_pattern("M?LLER*"), "M_LLER%");
        assert_eq!(like_pattern("50%_off\\x*"), "50\\%\\_off\\\\x%");
    }
}
