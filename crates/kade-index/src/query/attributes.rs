//! The one table of matching keys: which attribute matches at which level, how, and against
//! which column. QIDO-RS and C-FIND both look attributes up here, so the two front ends cannot
//! disagree on what a key does.

/// A level of the Query/Retrieve information models (PS3.4 §C.6.1.1, §C.6.2.1) and of the
/// QIDO-RS resources (PS3.18 §10.6): patients, studies, series, instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// PATIENT (Patient Root only).
    Patient,
    /// STUDY.
    Study,
    /// SERIES.
    Series,
    /// IMAGE (C-FIND) or instances (QIDO-RS).
    Instance,
}

impl Level {
    /// The Query/Retrieve Level value (0008,0052) of this level.
    pub fn as_dicom(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Instance => "IMAGE",
        }
    }

    /// The level a Query/Retrieve Level value (0008,0052) names.
    pub fn from_dicom(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "PATIENT" => Level::Patient,
            "STUDY" => Level::Study,
            "SERIES" => Level::Series,
            "IMAGE" => Level::Instance,
            _ => return None,
        })
    }
}

/// How a value of an attribute is matched (PS3.4 §C.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A person name (PN): case-insensitive (PS3.4 §C.2.2.2.1), wildcards allowed.
    PersonName,
    /// A string (AE, CS, LO, SH, ST, …): case-sensitive, wildcards allowed.
    Text,
    /// A date (DA): single value or range (§C.2.2.2.5).
    Date,
    /// A time (TM): single value or range.
    Time,
    /// A UID (UI): single value or list (§C.2.2.2.2), no wildcards.
    Uid,
    /// An integer (IS): single value.
    Integer,
}

/// An attribute Kade matches on (a matching key of PS3.4 §C.6 and PS3.18 Table 10.6.1-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attr {
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
    /// StudyDate (0008,0020).
    StudyDate,
    /// StudyTime (0008,0030).
    StudyTime,
    /// AccessionNumber (0008,0050).
    AccessionNumber,
    /// StudyInstanceUID (0020,000D).
    StudyInstanceUid,
    /// ModalitiesInStudy (0008,0061): matches if any series of the study has the modality.
    ModalitiesInStudy,
    /// ReferringPhysicianName (0008,0090).
    ReferringPhysicianName,
    /// StudyID (0020,0010).
    StudyId,
    /// StudyDescription (0008,1030).
    StudyDescription,
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
    /// PerformedProcedureStepStartDate (0040,0244).
    PerformedProcedureStepStartDate,
    /// SOPInstanceUID (0008,0018).
    SopInstanceUid,
    /// SOPClassUID (0008,0016).
    SopClassUid,
    /// InstanceNumber (0020,0013).
    InstanceNumber,
}

/// One row of the table.
#[derive(Debug)]
pub(crate) struct Def {
    pub(crate) attr: Attr,
    pub(crate) tag: (u16, u16),
    pub(crate) keyword: &'static str,
    pub(crate) level: Level,
    pub(crate) column: &'static str,
    pub(crate) kind: Kind,
}

macro_rules! defs {
    ($(($attr:ident, $kw:literal, $g:literal, $e:literal, $level:ident, $col:literal, $kind:ident)),* $(,)?) => {
        &[$(Def {
            attr: Attr::$attr,
            tag: ($g, $e),
            keyword: $kw,
            level: Level::$level,
            column: $col,
            kind: Kind::$kind,
        }),*]
    };
}

/// Every matching key, its level and its column (the query's table aliases: `p` patients,
/// `st` studies, `se` series, `i` instances).
pub(crate) const DEFS: &[Def] = defs![
    (
        PatientName,
        "PatientName",
        0x0010,
        0x0010,
        Patient,
        "p.name_search",
        PersonName
    ),
    (
        PatientId,
        "PatientID",
        0x0010,
        0x0020,
        Patient,
        "p.patient_id",
        Text
    ),
    (
        IssuerOfPatientId,
        "IssuerOfPatientID",
        0x0010,
        0x0021,
        Patient,
        "p.issuer",
        Text
    ),
    (
        PatientBirthDate,
        "PatientBirthDate",
        0x0010,
        0x0030,
        Patient,
        "p.birth_date",
        Date
    ),
    (
        PatientSex,
        "PatientSex",
        0x0010,
        0x0040,
        Patient,
        "p.sex",
        Text
    ),
    (
        StudyDate,
        "StudyDate",
        0x0008,
        0x0020,
        Study,
        "st.study_date",
        Date
    ),
    (
        StudyTime,
        "StudyTime",
        0x0008,
        0x0030,
        Study,
        "st.study_time",
        Time
    ),
    (
        AccessionNumber,
        "AccessionNumber",
        0x0008,
        0x0050,
        Study,
        "st.accession_number",
        Text
    ),
    (
        StudyInstanceUid,
        "StudyInstanceUID",
        0x0020,
        0x000D,
        Study,
        "st.study_uid",
        Uid
    ),
    (
        ModalitiesInStudy,
        "ModalitiesInStudy",
        0x0008,
        0x0061,
        Study,
        "ms.modality",
        Text
    ),
    (
        ReferringPhysicianName,
        "ReferringPhysicianName",
        0x0008,
        0x0090,
        Study,
        "st.referring_physician_search",
        PersonName
    ),
    (
        StudyId,
        "StudyID",
        0x0020,
        0x0010,
        Study,
        "st.study_id",
        Text
    ),
    (
        StudyDescription,
        "StudyDescription",
        0x0008,
        0x1030,
        Study,
        "st.description",
        Text
    ),
    (
        SeriesInstanceUid,
        "SeriesInstanceUID",
        0x0020,
        0x000E,
        Series,
        "se.series_uid",
        Uid
    ),
    (
        Modality,
        "Modality",
        0x0008,
        0x0060,
        Series,
        "se.modality",
        Text
    ),
    (
        SeriesNumber,
        "SeriesNumber",
        0x0020,
        0x0011,
        Series,
        "se.series_number",
        Integer
    ),
    (
        SeriesDescription,
        "SeriesDescription",
        0x0008,
        0x103E,
        Series,
        "se.description",
        Text
    ),
    (
        BodyPartExamined,
        "BodyPartExamined",
        0x0018,
        0x0015,
        Series,
        "se.body_part",
        Text
    ),
    (
        PerformedProcedureStepStartDate,
        "PerformedProcedureStepStartDate",
        0x0040,
        0x0244,
        Series,
        "se.pps_start_date",
        Date
    ),
    (
        SopInstanceUid,
        "SOPInstanceUID",
        0x0008,
        0x0018,
        Instance,
        "i.sop_uid",
        Uid
    ),
    (
        SopClassUid,
        "SOPClassUID",
        0x0008,
        0x0016,
        Instance,
        "i.sop_class_uid",
        Uid
    ),
    (
        InstanceNumber,
        "InstanceNumber",
        0x0020,
        0x0013,
        Instance,
        "i.instance_number",
        Integer
    ),
];

impl Attr {
    pub(crate) fn def(self) -> &'static Def {
        DEFS.iter()
            .find(|d| d.attr == self)
            .expect("every attribute has a row in DEFS")
    }

    /// The matching key with tag `(group, element)`, at any level.
    pub fn from_tag(group: u16, element: u16) -> Option<Attr> {
        DEFS.iter()
            .find(|d| d.tag == (group, element))
            .map(|d| d.attr)
    }

    /// Its tag as `(group, element)`.
    pub fn tag(self) -> (u16, u16) {
        self.def().tag
    }

    /// Its keyword as in PS3.6 (`PatientName`).
    pub fn keyword(self) -> &'static str {
        self.def().keyword
    }

    /// The level the attribute belongs to.
    pub fn level(self) -> Level {
        self.def().level
    }

    /// Whether it is a matching key of a query at `level`: an attribute of that level or of a
    /// level above it (a series query may name its patient and study). Attributes of the
    /// levels below are not: a study has many modalities, which ModalitiesInStudy matches.
    pub fn matches_at(self, level: Level) -> bool {
        self.level() <= level
    }

    /// Whether its values are person names, which never enter the audit log.
    pub fn is_person_name(self) -> bool {
        self.def().kind == Kind::PersonName
    }
}

/// Every matching key, in the table's order.
pub fn all() -> impl Iterator<Item = Attr> {
    DEFS.iter().map(|d| d.attr)
}

/// The matching keys of a query as the audit log records them: `Keyword=value`, separated by
/// spaces, person names masked as `(name)`. Both front ends audit through this.
pub fn audit_text(matches: &[(Attr, String)]) -> String {
    matches
        .iter()
        .map(|(a, v)| {
            if a.is_person_name() {
                format!("{}=(name)", a.keyword())
            } else {
                format!("{}={v}", a.keyword())
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attribute_has_one_row() {
        for d in DEFS {
            assert_eq!(d.attr.def().tag, d.tag, "{}", d.keyword);
            assert_eq!(
                DEFS.iter().filter(|o| o.tag == d.tag).count(),
                1,
                "{}",
                d.keyword
            );
            assert_eq!(Attr::from_tag(d.tag.0, d.tag.1), Some(d.attr));
        }
    }

    #[test]
    fn keys_match_at_their_level_and_below() {
        assert!(Attr::PatientId.matches_at(Level::Instance));
        assert!(Attr::StudyDescription.matches_at(Level::Series));
        assert!(!Attr::Modality.matches_at(Level::Study));
        assert!(!Attr::StudyDate.matches_at(Level::Patient));
    }

    #[test]
    fn names_are_masked_in_the_audit_text() {
        let t = audit_text(&[
            (Attr::PatientName, "Doe*".into()),
            (Attr::PatientId, "123".into()),
            (Attr::ReferringPhysicianName, "X".into()),
        ]);
        assert_eq!(
            t,
            "PatientName=(name) PatientID=123 ReferringPhysicianName=(name)"
        );
    }
}
