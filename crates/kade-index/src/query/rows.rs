//! What a match returns: the attributes of each row, with the VR they are written in. QIDO-RS
//! renders them as DICOM JSON and C-FIND as response identifiers, from this one list (PS3.18
//! Tables 10.6.3-2..4 and the PS3.4 §C.6 keys Kade indexes).

use super::{InstanceRow, PatientRow, SeriesRow, StudyRow};

/// A value of a returned attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// The archive has no value: the attribute is returned empty.
    Empty,
    /// One text value (a person name in its DICOM form, `Alphabetic=Ideographic=Phonetic`).
    Text(String),
    /// Several text values.
    Texts(Vec<String>),
    /// An integer (IS, US, UL, …).
    Int(i64),
}

impl Value {
    fn text(v: &Option<String>) -> Value {
        match v.as_deref().map(str::trim_end) {
            Some(s) if !s.is_empty() => Value::Text(s.to_owned()),
            _ => Value::Empty,
        }
    }

    fn int(v: Option<i64>) -> Value {
        v.map_or(Value::Empty, Value::Int)
    }

    /// The value as DICOM text: several values joined by `\`, empty when there is none.
    pub fn to_dicom(&self) -> String {
        match self {
            Value::Empty => String::new(),
            Value::Text(s) => s.clone(),
            Value::Texts(v) => v.join("\\"),
            Value::Int(n) => n.to_string(),
        }
    }
}

/// One attribute of a match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    /// Its tag as `(group, element)`.
    pub tag: (u16, u16),
    /// Its VR (PS3.6).
    pub vr: &'static str,
    /// Its value.
    pub value: Value,
}

fn r(tag: (u16, u16), vr: &'static str, value: Value) -> Returned {
    Returned { tag, vr, value }
}

fn patient(
    id: &str,
    issuer: &str,
    name: &Option<String>,
    birth: &Option<String>,
    sex: &Option<String>,
) -> Vec<Returned> {
    vec![
        r((0x0010, 0x0010), "PN", Value::text(name)),
        r((0x0010, 0x0020), "LO", Value::text(&Some(id.to_owned()))),
        r(
            (0x0010, 0x0021),
            "LO",
            Value::text(&Some(issuer.to_owned())),
        ),
        r((0x0010, 0x0030), "DA", Value::text(birth)),
        r((0x0010, 0x0040), "CS", Value::text(sex)),
    ]
}

impl PatientRow {
    /// The attributes a PATIENT-level match returns.
    pub fn returned(&self) -> Vec<Returned> {
        let mut v = patient(
            &self.patient_id,
            &self.issuer,
            &self.name,
            &self.birth_date,
            &self.sex,
        );
        v.extend([
            r((0x0020, 0x1200), "IS", Value::Int(self.num_studies)),
            r((0x0020, 0x1202), "IS", Value::Int(self.num_series)),
            r((0x0020, 0x1204), "IS", Value::Int(self.num_instances)),
        ]);
        v
    }
}

impl StudyRow {
    /// The attributes a study match returns: its patient's and its own.
    pub fn returned(&self) -> Vec<Returned> {
        let mut v = patient(
            &self.patient_id,
            &self.issuer,
            &self.patient_name,
            &self.birth_date,
            &self.sex,
        );
        let modalities: Vec<String> = self
            .modalities
            .split('\\')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        v.extend([
            r((0x0008, 0x0020), "DA", Value::text(&self.study_date)),
            r((0x0008, 0x0030), "TM", Value::text(&self.study_time)),
            r((0x0008, 0x0050), "SH", Value::text(&self.accession_number)),
            r(
                (0x0008, 0x0061),
                "CS",
                if modalities.is_empty() {
                    Value::Empty
                } else {
                    Value::Texts(modalities)
                },
            ),
            r(
                (0x0008, 0x0090),
                "PN",
                Value::text(&self.referring_physician),
            ),
            r((0x0008, 0x1030), "LO", Value::text(&self.description)),
            r((0x0020, 0x000D), "UI", Value::Text(self.study_uid.clone())),
            r((0x0020, 0x0010), "SH", Value::text(&self.study_id)),
            r((0x0020, 0x1206), "IS", Value::Int(self.num_series)),
            r((0x0020, 0x1208), "IS", Value::Int(self.num_instances)),
        ]);
        v
    }
}

impl SeriesRow {
    /// The attributes a series match returns.
    pub fn returned(&self) -> Vec<Returned> {
        vec![
            r((0x0008, 0x0060), "CS", Value::text(&self.modality)),
            r((0x0008, 0x103E), "LO", Value::text(&self.description)),
            r((0x0018, 0x0015), "CS", Value::text(&self.body_part)),
            r((0x0020, 0x000D), "UI", Value::Text(self.study_uid.clone())),
            r((0x0020, 0x000E), "UI", Value::Text(self.series_uid.clone())),
            r((0x0020, 0x0011), "IS", Value::int(self.number)),
            r((0x0020, 0x1209), "IS", Value::Int(self.num_instances)),
            r((0x0040, 0x0244), "DA", Value::text(&self.pps_start_date)),
        ]
    }
}

impl InstanceRow {
    /// The attributes an instance match returns.
    pub fn returned(&self) -> Vec<Returned> {
        vec![
            r(
                (0x0008, 0x0016),
                "UI",
                Value::Text(self.sop_class_uid.clone()),
            ),
            r((0x0008, 0x0018), "UI", Value::Text(self.sop_uid.clone())),
            r(
                (0x0008, 0x3002),
                "UI",
                Value::Text(self.transfer_syntax_uid.clone()),
            ),
            r((0x0020, 0x000D), "UI", Value::Text(self.study_uid.clone())),
            r((0x0020, 0x000E), "UI", Value::Text(self.series_uid.clone())),
            r((0x0020, 0x0013), "IS", Value::int(self.number)),
            r((0x0028, 0x0008), "IS", Value::int(self.frames)),
            r((0x0028, 0x0010), "US", Value::int(self.rows)),
            r((0x0028, 0x0011), "US", Value::int(self.columns)),
            r((0x0028, 0x0100), "US", Value::int(self.bits_allocated)),
        ]
    }
}
