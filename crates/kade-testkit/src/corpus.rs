//! The test corpus in `testdata/` and pydicom's view of it (`testdata/expected.json`).

use std::path::PathBuf;

use serde_json::Value;

/// One corpus file with pydicom's reading of it.
#[derive(Debug, Clone)]
pub struct CorpusFile {
    /// Path on disk.
    pub path: PathBuf,
    /// Path relative to `testdata/`.
    pub name: String,
    /// pydicom's values (`readable`, `sop_instance_uid`, `patient_name`, …).
    pub expected: Value,
}

impl CorpusFile {
    /// A string field of the expectation.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.expected.get(key).and_then(Value::as_str)
    }

    /// An integer field of the expectation.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.expected.get(key).and_then(Value::as_i64)
    }
}

/// Every corpus file, sorted by name.
///
/// # Panics
/// If `expected.json` is missing or malformed.
pub fn all() -> Vec<CorpusFile> {
    let dir = crate::testdata_dir();
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("testdata/expected.json");
    let v: serde_json::Map<String, Value> =
        serde_json::from_str(&text).expect("valid expected.json");
    let mut out: Vec<CorpusFile> = v
        .into_iter()
        .map(|(name, expected)| CorpusFile {
            path: dir.join(&name),
            name,
            expected,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
