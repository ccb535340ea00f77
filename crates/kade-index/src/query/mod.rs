//! The query model shared by QIDO-RS and C-FIND ("one query model, two front ends"):
//! attribute matching per PS3.4 §C.2.2.2, translated to SQL that runs unchanged on SQLite and
//! PostgreSQL.
//!
//! - [`attributes`]: the one table of matching keys ([`Attr`]): tag, keyword, level, column
//!   and how each matches, and the audit text of a query ([`audit_text`]).
//! - [`rows`]: the attributes a match returns ([`Returned`]), which both front ends render.
//! - this module: the conditions and the `find_*` queries of each level.
//!
//! Matching kinds: universal (empty value or `*`), single value, wildcard (`*` any run, `?`
//! exactly one character, also a non-ASCII one), UID list (`\`- or `,`-separated), and
//! date/time range (`A-B`, `-B`, `A-`). Person names match case-insensitively through their
//! upper-case search key; every other attribute matches case-sensitively (§C.2.2.2.1).
//! A query at one level may name attributes of the levels above it (a series query its
//! patient and study); an attribute of a level below is refused ([`QueryError`]).

pub mod attributes;
pub mod rows;

pub use attributes::{Attr, Level, audit_text};
pub use rows::{Returned, Value};

use attributes::Kind;
use sqlx::Row;

use crate::{Index, IndexError};

/// Study-level matching keys: the one [`Attr`] table.
pub type StudyKey = Attr;
/// Patient-level matching keys: the one [`Attr`] table.
pub type PatientKey = Attr;
/// Series-level matching keys: the one [`Attr`] table.
pub type SeriesKey = Attr;
/// Instance-level matching keys: the one [`Attr`] table.
pub type InstanceKey = Attr;

/// A query at one level.
#[derive(Debug, Clone)]
pub struct LevelQuery<K = Attr> {
    /// Matching keys with their values.
    pub matches: Vec<(K, String)>,
    /// At most this many results (None: no limit).
    pub limit: Option<i64>,
    /// Skip this many results.
    pub offset: i64,
}

impl<K> Default for LevelQuery<K> {
    fn default() -> Self {
        LevelQuery {
            matches: Vec::new(),
            limit: None,
            offset: 0,
        }
    }
}

/// A study-level query.
pub type StudyQuery = LevelQuery<Attr>;

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
    /// Performed Procedure Step Start Date.
    pub pps_start_date: Option<String>,
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

/// The columns of an [`InstanceRow`], in the order [`instance_row`] reads them, from
/// `instances i` joined as [`INSTANCE_ROW_JOINS`].
pub(crate) const INSTANCE_ROW_COLUMNS: &str = "st.study_uid, se.series_uid, i.sop_uid, \
     i.sop_class_uid, i.instance_number, i.pixel_rows, i.pixel_columns, i.number_of_frames, \
     i.transfer_syntax_uid, i.blob_key, i.bits_allocated, p.patient_id";
/// The joins from `instances i` that [`INSTANCE_ROW_COLUMNS`] needs.
pub(crate) const INSTANCE_ROW_JOINS: &str = "JOIN series se ON se.id = i.series_fk \
     JOIN studies st ON st.id = se.study_fk JOIN patients p ON p.id = st.patient_fk";

/// An [`InstanceRow`] from a row selecting [`INSTANCE_ROW_COLUMNS`] first.
pub(crate) fn instance_row(r: &sqlx::any::AnyRow) -> Result<InstanceRow, sqlx::Error> {
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
}

/// A query value that cannot be used, or a key this level does not match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {key}: {why}")]
pub struct QueryError {
    /// The key (its keyword).
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

/// Whether `d` is a date of the form `YYYYMMDD`.
fn is_date(d: &str) -> bool {
    d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `t` is a time of the form `HH[MM[SS[.F{1,6}]]]` (PS3.5 §6.2, VR TM).
fn is_time(t: &str) -> bool {
    let (hms, frac) = t.split_once('.').unwrap_or((t, ""));
    matches!(hms.len(), 2 | 4 | 6)
        && hms.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 6
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (frac.is_empty() || hms.len() == 6)
        && !t.ends_with('.')
}

impl Sql {
    fn param(&mut self, v: String) -> String {
        self.params.push(v);
        format!("${}", self.params.len())
    }

    /// A single value or a range `A-B`, `-B`, `A-` of dates or times (§C.2.2.2.5), compared as
    /// text: both DA and TM sort in time order.
    fn range(
        &mut self,
        col: &str,
        v: &str,
        ok: fn(&str) -> bool,
        bad: impl Fn(&'static str) -> QueryError,
        why: &'static str,
    ) -> Result<String, QueryError> {
        match v.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (from.trim(), to.trim());
                let fine = |d: &str| d.is_empty() || ok(d);
                if !fine(from) || !fine(to) || (from.is_empty() && to.is_empty()) {
                    return Err(bad(why));
                }
                let mut c = Vec::new();
                if !from.is_empty() {
                    c.push(format!("{col} >= {}", self.param(from.to_owned())));
                }
                if !to.is_empty() {
                    c.push(format!("{col} <= {}", self.param(to.to_owned())));
                }
                Ok(c.join(" AND "))
            }
            None if ok(v) => Ok(format!("{col} = {}", self.param(v.to_owned()))),
            None => Err(bad(why)),
        }
    }

    /// The condition for `attr` matching `value`; `None` when it matches everything.
    fn add(&mut self, attr: Attr, value: &str) -> Result<Option<String>, QueryError> {
        let def = attr.def();
        let col = def.column;
        let bad = |why| QueryError {
            key: def.keyword.to_owned(),
            value: value.to_owned(),
            why,
        };
        let v = value.trim();
        if v.is_empty() || v == "*" {
            return Ok(None);
        }
        let cond = match def.kind {
            Kind::Uid => {
                // §C.2.2.2.2: a list of UIDs separated by `\`; PS3.18 §8.3.4.1 lets QIDO-RS
                // separate them by commas.
                let uids: Vec<&str> = v
                    .split(['\\', ','])
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .collect();
                if uids.is_empty()
                    || uids
                        .iter()
                        .any(|u| !u.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
                {
                    return Err(bad(
                        "a UID has only digits and dots; several are separated by `\\` or `,`",
                    ));
                }
                let ps: Vec<String> = uids.iter().map(|u| self.param((*u).to_owned())).collect();
                format!("{col} IN ({})", ps.join(", "))
            }
            Kind::Date => self.range(
                col,
                v,
                is_date,
                bad,
                "a date is YYYYMMDD, a range YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-",
            )?,
            Kind::Time => self.range(
                col,
                v,
                is_time,
                bad,
                "a time is HH[MM[SS[.FFFFFF]]], a range TIME-TIME, -TIME or TIME-",
            )?,
            Kind::Integer => {
                let n: i64 = v.parse().map_err(|_| bad("an integer is expected"))?;
                format!("{col} = CAST({} AS BIGINT)", self.param(n.to_string()))
            }
            Kind::PersonName | Kind::Text => {
                let v = if def.kind == Kind::PersonName {
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
        };
        Ok(Some(if attr == Attr::ModalitiesInStudy {
            // Uncorrelated, so it runs once through the modality index; a correlated EXISTS
            // made SQLite scan every matching series for every study.
            format!("st.id IN (SELECT ms.study_fk FROM series ms WHERE {cond})")
        } else {
            cond
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

/// The conditions of a query at `level`; a key of a level below is refused.
fn conditions(level: Level, matches: &[(Attr, String)]) -> Result<Sql, QueryError> {
    let mut sql = Sql::default();
    for (attr, value) in matches {
        if !attr.matches_at(level) {
            return Err(QueryError {
                key: attr.keyword().to_owned(),
                value: value.clone(),
                why: match level {
                    Level::Patient => "a patient query matches on patient attributes only",
                    Level::Study => "a study query matches on patient and study attributes only",
                    _ => "not a matching key at this level",
                },
            });
        }
        if let Some(c) = sql.add(*attr, value)? {
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
        let sql = match conditions(Level::Study, &q.matches) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let text = finish_sql(
            "SELECT st.study_uid, st.study_date, st.study_time, st.accession_number, st.description, \
             st.study_id, st.referring_physician, st.modalities, st.num_series, st.num_instances, \
             p.patient_id, p.issuer, p.name, p.birth_date, p.sex \
             FROM studies st JOIN patients p ON p.id = st.patient_fk"
                .into(),
            &sql,
            "st.study_date DESC, st.study_uid",
            q.limit,
            q.offset,
        );
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

    /// Patients matching `q`, ordered by Patient ID.
    ///
    /// # Errors
    /// [`QueryError`] (wrapped in `Ok(Err)`) for unusable values; database errors otherwise.
    pub async fn find_patients(
        &self,
        q: &LevelQuery<PatientKey>,
    ) -> Result<Result<Vec<PatientRow>, QueryError>, IndexError> {
        let sql = match conditions(Level::Patient, &q.matches) {
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
        let sql = match conditions(Level::Series, &q.matches) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let text = finish_sql(
            "SELECT st.study_uid, se.series_uid, se.modality, se.series_number, se.description, \
             se.body_part, se.num_instances, se.pps_start_date FROM series se \
             JOIN studies st ON st.id = se.study_fk JOIN patients p ON p.id = st.patient_fk"
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
                    pps_start_date: r.try_get(7)?,
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
        let sql = match conditions(Level::Instance, &q.matches) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let text = finish_sql(
            format!("SELECT {INSTANCE_ROW_COLUMNS} FROM instances i {INSTANCE_ROW_JOINS}"),
            &sql,
            "i.instance_number, i.sop_uid",
            q.limit,
            q.offset,
        );
        let rows = self.fetch(&text, &sql).await?;
        let out = rows
            .iter()
            .map(instance_row)
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

    #[test]
    fn uid_lists_take_backslashes_and_commas() {
        let mut sql = Sql::default();
        let c = sql
            .add(Attr::StudyInstanceUid, "1.2.3,1.2.4\\1.2.5")
            .unwrap()
            .unwrap();
        assert_eq!(c, "st.study_uid IN ($1, $2, $3)");
        assert_eq!(sql.params, ["1.2.3", "1.2.4", "1.2.5"]);
        assert!(Sql::default().add(Attr::StudyInstanceUid, "1.2;3").is_err());
    }

    #[test]
    fn times_and_dates_have_their_forms() {
        for ok in ["10", "1030", "103000", "103000.5", "103000.123456"] {
            assert!(is_time(ok), "{ok}");
        }
        for bad in ["1", "103", "10:30", "1030.5", "103000.", "103000.1234567"] {
            assert!(!is_time(bad), "{bad}");
        }
        let mut sql = Sql::default();
        let c = sql.add(Attr::StudyTime, "0800-").unwrap().unwrap();
        assert_eq!(c, "st.study_time >= $1");
    }

    #[test]
    fn keys_of_a_lower_level_are_refused() {
        let e = conditions(Level::Study, &[(Attr::Modality, "CT".into())]).unwrap_err();
        assert_eq!(e.key, "Modality");
        assert!(conditions(Level::Series, &[(Attr::PatientId, "P".into())]).is_ok());
    }
}
