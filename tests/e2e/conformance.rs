//! Conformance to the text of the DICOM standard (Kade issue 15): DICOM JSON (PS3.18 Annex F),
//! attribute matching through QIDO-RS and C-FIND (PS3.4 C.2.2.2), QIDO-RS query parameters
//! (PS3.18 8.3, 8.3.4, 10.6) and the transfer syntax of WADO-RS responses (PS3.18 8.7.3).
//!
//! The expectations are written from the standard's tables, not from Kade's code: each table
//! row names the section it comes from. Test data is made at test time by
//! `py/conformance_check.py fixtures` (pydicom, and a hand encoder for values pydicom would
//! normalise) and stored through STOW-RS; the rows refer to its UIDs by name (`S1`, `S1a`,
//! `I1a1`: study 1, its first series, that series' first instance). The corpus:
//!
//! | study | patient (ID, name)       | date     | time   | description          | accession | series (modality, description, instances) |
//! |-------|--------------------------|----------|--------|----------------------|-----------|-------------------------------------------|
//! | S1    | CONF-P1, Müller^Jürgen   | 20200115 | 101500 | Brain MR routine     | ACC-001   | S1a MR "T1 axial" 2; S1b CT "Scout" 1     |
//! | S2    | CONF-P1, Müller^Jürgen   | 20201231 | 080000 | brain mr follow-up   | acc-001   | S2a MR "T2 axial" 1                       |
//! | S3    | CONF-P2, Möller^Jan      | 20210101 | 143000 | Chest CT             | ACC-003   | S3a CT "Lung" 2                           |
//! | S4    | CONF-P3, MULLER^HANS     | 20191231 | 235959 | BRAIN MR             | ACC-004   | S4a MR "t1 AXIAL" 1                       |
//! | S5    | conf-p1, Maier^Anna      | 20200601 | 000000 | Knie Übersicht MRI   | ACC-005   | S5a MR "PD sag" 1                         |
//!
//! Instance numbers count from 1 within each series. MR series hold MR Image Storage
//! instances, CT series CT Image Storage.
//!
//! Every failing row of a table is collected and reported together, with its section.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use dicom_dictionary_std::tags;
use kade_testkit::part10::Part10;
use kade_testkit::{testdata_dir, tools};
use serde_json::{Value, json};

use crate::common::{Node, backends};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/e2e/py/conformance_check.py"
);
const EXPLICIT: &str = "1.2.840.10008.1.2.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
const RLE: &str = "1.2.840.10008.1.2.5";
const JPEG_2000_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";

// ---------------------------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------------------------

/// The instances written by `conformance_check.py fixtures`, and their UIDs by name.
#[derive(Debug)]
struct Fixtures {
    _dir: tempfile::TempDir,
    manifest: PathBuf,
    uids: BTreeMap<String, String>,
    corpus: Vec<PathBuf>,
    zoo: Vec<PathBuf>,
    wado: Vec<PathBuf>,
}

impl Fixtures {
    /// Writes the test data; `None` (after a notice) when python3 lacks the modules.
    fn make(modules: &[&str]) -> Option<Fixtures> {
        if !tools::python_modules(modules) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("python3")
            .arg(SCRIPT)
            .args(["fixtures", "--out"])
            .arg(dir.path())
            .arg("--rle")
            .arg(testdata_dir().join("pydicom/MR_small_RLE.dcm"))
            .output()
            .unwrap();
        assert!(o.status.success(), "fixtures: {}", tools::text(&o));
        let manifest = dir.path().join("manifest.json");
        let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        let files = |group: &str| -> Vec<PathBuf> {
            m["files"][group]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| PathBuf::from(p.as_str().unwrap()))
                .collect()
        };
        let uids = m["uids"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        Some(Fixtures {
            corpus: files("corpus"),
            zoo: files("zoo"),
            wado: files("wado"),
            manifest,
            uids,
            _dir: dir,
        })
    }

    fn uid(&self, name: &str) -> &str {
        self.uids
            .get(name)
            .unwrap_or_else(|| panic!("no fixture {name}"))
    }

    /// `text` with every `{NAME}` replaced by that fixture's UID.
    fn expand(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (name, uid) in &self.uids {
            out = out.replace(&format!("{{{name}}}"), uid);
        }
        out
    }

    /// A UID's fixture name (or the value itself), for readable messages.
    fn name_of(&self, value: &str) -> String {
        self.uids
            .iter()
            .find(|(_, u)| u.as_str() == value)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| value.to_owned())
    }
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A client for a node's DICOMweb service with the admin token.
struct Web {
    c: reqwest::Client,
    base: String,
    token: String,
}

/// A response: status, headers, body.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Percent-encodes a query written as `key=value&key=value`: every byte but the unreserved
/// ones and `* , ? -` (which a query component may carry as they are, RFC 3986 3.4).
fn encode_query(query: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                b'*' | b',' | b'?' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => format!("{}={}", enc(k), enc(v)),
            None => enc(p),
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Web {
    fn new(node: &Node) -> Web {
        Web {
            c: node.http_client(),
            base: format!("{}/dicom-web", node.https()),
            token: node.admin_token.clone(),
        }
    }

    async fn get_url(&self, url: &str, accept: &str) -> Reply {
        let r = self
            .c
            .get(url)
            .bearer_auth(&self.token)
            .header("accept", accept)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        Reply {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.bytes().await.unwrap().to_vec(),
        }
    }

    async fn get(&self, path: &str, accept: &str) -> Reply {
        self.get_url(&format!("{}{path}", self.base), accept).await
    }

    /// A QIDO-RS search: `path` and a raw `key=value&…` query (encoded here).
    async fn search(&self, path: &str, query: &str) -> Reply {
        let q = encode_query(query);
        let target = if q.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{q}")
        };
        self.get(&target, "application/dicom+json").await
    }

    /// A search that must succeed: the results (an empty list for 204 or an empty body).
    async fn results(&self, path: &str, query: &str) -> Result<Vec<Value>, String> {
        parse_results(&self.search(path, query).await)
    }

    async fn stow(&self, files: &[PathBuf]) {
        let mut body = Vec::new();
        for f in files {
            body.extend_from_slice(b"--KADEconf\r\nContent-Type: application/dicom\r\n\r\n");
            body.extend_from_slice(&std::fs::read(f).unwrap());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--KADEconf--\r\n");
        let r = self
            .c
            .post(format!("{}/studies", self.base))
            .bearer_auth(&self.token)
            .header(
                "content-type",
                "multipart/related; type=\"application/dicom\"; boundary=KADEconf",
            )
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert_eq!(
            status,
            200,
            "STOW-RS of the test data: {}",
            r.text().await.unwrap()
        );
    }
}

/// The results of a search that must succeed (an empty list for 204 or an empty body).
fn parse_results(r: &Reply) -> Result<Vec<Value>, String> {
    if r.status == 204 || (r.status == 200 && r.body.is_empty()) {
        return Ok(Vec::new());
    }
    if r.status != 200 {
        return Err(format!("status {} ({})", r.status, r.text()));
    }
    let ct = r.header("content-type");
    if !ct.starts_with("application/dicom+json") {
        return Err(format!(
            "Content-Type {ct:?}, not application/dicom+json (PS3.18 10.6.1)"
        ));
    }
    match serde_json::from_slice::<Value>(&r.body) {
        Ok(Value::Array(v)) => Ok(v),
        Ok(other) => Err(format!("not a JSON array: {other}")),
        Err(e) => Err(format!("not JSON ({e}): {}", r.text())),
    }
}

/// The first value of `tag` in a DICOM JSON object, as text.
fn first(obj: &Value, tag: &str) -> Option<String> {
    match &obj[tag]["Value"][0] {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// The unique key of a result at each level.
fn unique_key(path: &str) -> &'static str {
    if path.ends_with("/instances") {
        "00080018"
    } else if path.ends_with("/series") {
        "0020000E"
    } else {
        "0020000D"
    }
}

/// A multipart/related body split into (part headers lower-cased, part body).
fn multipart(content_type: &str, body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .ok_or_else(|| format!("no boundary in {content_type:?}"))?
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let find = |from: usize| {
        body.get(from..)?
            .windows(delim.len())
            .position(|w| w == delim.as_bytes())
            .map(|i| i + from)
    };
    let mut out = Vec::new();
    let mut start = find(0).ok_or("no first delimiter")?;
    loop {
        let pos = start + delim.len();
        if body[pos..].starts_with(b"--") {
            break;
        }
        let head_end = body[pos..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("part without header end")?
            + pos;
        let headers = String::from_utf8_lossy(&body[pos..head_end]).to_lowercase();
        let next = find(head_end + 4).ok_or("part without closing delimiter")?;
        out.push((headers, body[head_end + 4..next - 2].to_vec()));
        start = next;
    }
    Ok(out)
}

/// A parameter of a part's Content-Type header (`name=value`), quotes removed.
fn content_type_param(headers: &str, name: &str) -> Option<String> {
    let ct = headers
        .lines()
        .find_map(|l| l.trim().strip_prefix("content-type:"))?;
    ct.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
    })
}

// ---------------------------------------------------------------------------------------------
// 1. DICOM JSON: PS3.18 F.2
// ---------------------------------------------------------------------------------------------

/// What an attribute of the zoo instance must look like in DICOM JSON.
#[derive(Debug, Clone)]
enum Want {
    /// The "Value" array (F.2.4; null for an empty value of a multi-valued attribute, F.2.5).
    Values(Value),
    /// Present, with no "Value", "BulkDataURI" or "InlineBinary" (F.2.5).
    Empty,
    /// The Value Field as InlineBinary (base64, F.2.7) or behind a BulkDataURI (F.2.6).
    Binary(Vec<u8>),
    /// A sequence with this many items (F.2.2).
    Items(usize),
    /// A sequence item with no attributes: an empty object (F.2.5).
    EmptyItem,
    /// Must not be present: Group Length (F.2.2).
    Absent,
}

/// Table F.2.3-1: VRs whose JSON type is Number.
const NUMBER_VRS: [&str; 6] = ["FL", "FD", "SL", "SS", "UL", "US"];
/// Table F.2.3-1: "Number or String" (see its note).
const NUMBER_OR_STRING_VRS: [&str; 4] = ["DS", "IS", "SV", "UV"];

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn le_f64(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every attribute of the zoo instance (`conformance_check.py`, `write_zoo`): path (tag, or
/// tag/item/tag inside sequences), VR, the value as stored (PS3.5 encoding), and the JSON the
/// standard prescribes for it. Sections: PS3.18 F.2.2 (structure), F.2.3 Table F.2.3-1 (JSON
/// type of each VR), F.2.4 (Value arrays), F.2.5 (empty values), F.2.6/F.2.7 (binary).
fn zoo_table() -> Vec<(&'static str, &'static str, &'static str, Want)> {
    use Want::*;
    let v = |j: Value| Values(j);
    vec![
        ("00080000", "UL", "Group Length 200", Absent),
        ("00080005", "CS", "ISO_IR 192", v(json!(["ISO_IR 192"]))),
        (
            "00080008",
            "CS",
            "ORIGINAL\\PRIMARY",
            v(json!(["ORIGINAL", "PRIMARY"])),
        ),
        ("00080020", "DA", "20230301", v(json!(["20230301"]))),
        ("00080030", "TM", "120000", v(json!(["120000"]))),
        ("00080050", "SH", "(zero length)", Empty),
        ("00080090", "PN", "(zero length)", Empty),
        ("00081140", "SQ", "(no items)", Empty),
        ("00081161", "UL", "(zero length)", Empty),
        (
            "00090010",
            "LO",
            "KADE CONFORMANCE",
            v(json!(["KADE CONFORMANCE"])),
        ),
        (
            "00091001",
            "UN",
            "10 20 30 40",
            Binary(vec![0x10, 0x20, 0x30, 0x40]),
        ),
        ("00100010", "PN", "(zero length)", Empty),
        ("00100020", "LO", "CONF-ZOO", v(json!(["CONF-ZOO"]))),
        ("00100030", "DA", "(zero length)", Empty),
        ("00100040", "CS", "(zero length)", Empty),
        ("00180050", "DS", "(zero length)", Empty),
        ("00181271", "FD", "(zero length)", Empty),
        ("00200010", "SH", "(zero length)", Empty),
        ("00200011", "IS", "1", v(json!([1]))),
        ("00200012", "IS", "(zero length)", Empty),
        ("00200013", "IS", "1", v(json!([1]))),
        ("00280009", "AT", "(zero length)", Empty),
        ("00280010", "US", "4", v(json!([4]))),
        ("00282000", "OB", "(zero length)", Empty),
        (
            "0072005E",
            "AE",
            "KADE\\\\STORESCU",
            v(json!(["KADE", null, "STORESCU"])),
        ),
        ("0072005F", "AS", "042Y\\003M", v(json!(["042Y", "003M"]))),
        // AT: the eight-digit uppercase hexadecimal tag (PS3.18 F.2.3).
        (
            "00720060",
            "AT",
            "(0010,0010)\\(7FE0,0010)",
            v(json!(["00100010", "7FE00010"])),
        ),
        (
            "00720061",
            "DA",
            "20200115\\19991231",
            v(json!(["20200115", "19991231"])),
        ),
        (
            "00720062",
            "CS",
            "ORIGINAL\\\\AXIAL",
            v(json!(["ORIGINAL", null, "AXIAL"])),
        ),
        (
            "00720063",
            "DT",
            "20200115103000.123456+0100\\2020",
            v(json!(["20200115103000.123456+0100", "2020"])),
        ),
        // IS with a leading space, a plus sign and an empty value: Numbers and null.
        (
            "00720064",
            "IS",
            " 42\\+7\\-3\\\\0",
            v(json!([42, 7, -3, null, 0])),
        ),
        (
            "00720065",
            "OB",
            "00 01 02 FE FF 80",
            Binary(vec![0, 1, 2, 0xFE, 0xFF, 0x80]),
        ),
        (
            "00720066",
            "LO",
            "Müller GmbH\\Second value",
            v(json!(["Müller GmbH", "Second value"])),
        ),
        ("00720067", "OF", "0.5, -1.0", Binary(le_f32(&[0.5, -1.0]))),
        // LT is single-valued: its backslash is text, not a delimiter (PS3.5 6.2).
        (
            "00720068",
            "LT",
            "Line one\\r\\nLine two \\ one value",
            v(json!(["Line one\r\nLine two \\ one value"])),
        ),
        (
            "00720069",
            "OW",
            "0001 0002 FFFF",
            Binary(vec![1, 0, 2, 0, 0xFF, 0xFF]),
        ),
        // PN: objects with the non-empty component groups (F.2.2), null for the empty value.
        (
            "0072006A",
            "PN",
            "Yamada^Tarou=山田^太郎=やまだ^たろう\\\\Doe^John\\=山田^花子",
            v(json!([
                {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
                null,
                {"Alphabetic": "Doe^John"},
                {"Ideographic": "山田^花子"}
            ])),
        ),
        (
            "0072006B",
            "TM",
            "103000.123\\0700",
            v(json!(["103000.123", "0700"])),
        ),
        ("0072006C", "SH", "ABC\\def", v(json!(["ABC", "def"]))),
        ("0072006D", "UN", "01 02 03 04", Binary(vec![1, 2, 3, 4])),
        (
            "0072006E",
            "ST",
            "Short text \\ one value",
            v(json!(["Short text \\ one value"])),
        ),
        (
            "0072006F",
            "UC",
            "Unlimited one\\Unlimited two",
            v(json!(["Unlimited one", "Unlimited two"])),
        ),
        (
            "00720070",
            "UT",
            "Unlimited text \\ one value",
            v(json!(["Unlimited text \\ one value"])),
        ),
        (
            "00720071",
            "UR",
            "https://example.invalid/a%20b?x=1",
            v(json!(["https://example.invalid/a%20b?x=1"])),
        ),
        // DS in forms that are valid PS3.5 Decimal Strings but not JSON numbers: a JSON
        // Number of the same value each (Table F.2.3-1), null for the empty value (F.2.5).
        (
            "00720072",
            "DS",
            " 1.5\\+1\\.5\\1.\\1e3\\\\-2.5E-1",
            v(json!([1.5, 1, 0.5, 1, 1000, null, -0.25])),
        ),
        ("00720073", "OD", "1.5, -2.0", Binary(le_f64(&[1.5, -2.0]))),
        (
            "00720074",
            "FD",
            "1.2345678901234567\\-1e-300",
            v(json!([1.234_567_890_123_456_7_f64, -1e-300])),
        ),
        (
            "00720075",
            "OL",
            "1, 0xDEADBEEF",
            Binary(
                [1u32, 0xDEAD_BEEF]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        ),
        ("00720076", "FL", "0.5\\-2.25", v(json!([0.5, -2.25]))),
        (
            "00720078",
            "UL",
            "0\\4294967295",
            v(json!([0, 4294967295u64])),
        ),
        ("0072007A", "US", "0\\65535", v(json!([0, 65535]))),
        (
            "0072007C",
            "SL",
            "-2147483648\\2147483647",
            v(json!([-2147483648i64, 2147483647])),
        ),
        ("0072007E", "SS", "-32768\\32767", v(json!([-32768, 32767]))),
        (
            "0072007F",
            "UI",
            "1.2.3\\1.2.840.10008.1.2.1",
            v(json!(["1.2.3", EXPLICIT])),
        ),
        ("00720080", "SQ", "3 items", Items(3)),
        ("00720080/0/00080100", "SH", "C1", v(json!(["C1"]))),
        (
            "00720080/0/00080104",
            "LO",
            "Meaning ü",
            v(json!(["Meaning ü"])),
        ),
        ("00720080/0/0040A730", "SQ", "1 item", Items(1)),
        (
            "00720080/0/0040A730/0/00080104",
            "LO",
            "Deep",
            v(json!(["Deep"])),
        ),
        (
            "00720080/0/00720060",
            "AT",
            "(0008,0100)",
            v(json!(["00080100"])),
        ),
        (
            "00720080/0/00720062",
            "CS",
            "A\\\\B",
            v(json!(["A", null, "B"])),
        ),
        ("00720080/0/00720064", "IS", "+9", v(json!([9]))),
        ("00720080/0/00720065", "OB", "01 02", Binary(vec![1, 2])),
        (
            "00720080/0/0072006A",
            "PN",
            "Nested^Name",
            v(json!([{"Alphabetic": "Nested^Name"}])),
        ),
        ("00720080/0/00720072", "DS", " 2.5\\+3", v(json!([2.5, 3]))),
        ("00720080/0/0072007A", "US", "7\\8", v(json!([7, 8]))),
        ("00720080/1", "", "an empty item", EmptyItem),
        ("00720080/2/00080100", "SH", "C3", v(json!(["C3"]))),
        (
            "00720081",
            "OV",
            "1, 2^64-1",
            Binary(
                [1u64, u64::MAX]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        ),
        // SV/UV beyond 2^53: a Number, or a String where a Number would lose precision (note).
        (
            "00720082",
            "SV",
            "-2^63\\0\\2^53+1",
            v(json!([i64::MIN, 0, 9_007_199_254_740_993u64])),
        ),
        (
            "00720083",
            "UV",
            "0\\2^64-1\\2^53+1",
            v(json!([0, u64::MAX, 9_007_199_254_740_993u64])),
        ),
        ("7FE00010", "OB", "00 01 … 0F", Binary((0u8..16).collect())),
    ]
}

/// The attribute at `path` (`tag/item/tag…`) of a DICOM JSON object.
fn at_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    let mut parts = path.split('/');
    while let Some(tag) = parts.next() {
        cur = cur.get(tag)?;
        if let Some(item) = parts.next() {
            cur = cur.get("Value")?.get(item.parse::<usize>().ok()?)?;
        }
    }
    Some(cur)
}

fn int_of(n: &serde_json::Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

fn same_number(got: &serde_json::Number, want: &serde_json::Number) -> bool {
    match (int_of(got), int_of(want)) {
        (Some(a), Some(b)) => a == b,
        _ => got.as_f64() == want.as_f64(),
    }
}

/// One value of a "Value" array against the standard's encoding for `vr`.
fn check_value(vr: &str, got: &Value, want: &Value) -> Result<(), String> {
    match (got, want) {
        (Value::Null, Value::Null) => Ok(()),
        (_, Value::Null) => Err(format!(
            "{got} where the stored value is empty: null (F.2.5)"
        )),
        (Value::Number(g), Value::Number(w)) => {
            if same_number(g, w) {
                Ok(())
            } else {
                Err(format!("{g} is not {w}"))
            }
        }
        (Value::String(s), Value::Number(w)) if NUMBER_OR_STRING_VRS.contains(&vr) => {
            // Table F.2.3-1 note: a String "if needed to avoid losing precision". Kade answers
            // Numbers and a String only where a Number would change the value (beyond 2^53).
            let beyond = int_of(w).is_some_and(|i| i.unsigned_abs() > 1 << 53);
            if beyond && s.trim().parse::<i128>().ok() == int_of(w) {
                Ok(())
            } else {
                Err(format!(
                    "the String {s:?}: {vr} {w} must be a JSON Number of the same value \
                     (Table F.2.3-1; a String only where a Number would lose precision)"
                ))
            }
        }
        (_, Value::Number(_)) if NUMBER_VRS.contains(&vr) => Err(format!(
            "{got}: Table F.2.3-1 maps {vr} to a JSON Number, with no String alternative"
        )),
        (_, Value::Number(_)) => Err(format!(
            "{got}: Table F.2.3-1 maps {vr} to a JSON Number (or a String, see its note)"
        )),
        (Value::String(g), Value::String(w)) => {
            if g == w {
                Ok(())
            } else {
                Err(format!("{g:?} is not {w:?}"))
            }
        }
        (Value::Object(_), Value::Object(_)) => {
            if got == want {
                Ok(())
            } else {
                Err(format!(
                    "{got} is not {want} (PN: an object of its non-empty component groups, F.2.2)"
                ))
            }
        }
        _ => Err(format!(
            "{got} is not {want} (JSON type of {vr}, Table F.2.3-1)"
        )),
    }
}

impl Web {
    /// The bytes behind a BulkDataURI (a WADO-RS bulk data resource, F.2.6).
    async fn bulk(&self, uri: &str) -> Result<Vec<u8>, String> {
        let url = reqwest::Url::parse(&self.base)
            .unwrap()
            .join(uri)
            .map_err(|e| format!("BulkDataURI {uri:?}: {e}"))?;
        let r = self
            .get_url(
                url.as_str(),
                "multipart/related; type=\"application/octet-stream\"",
            )
            .await;
        if r.status != 200 {
            return Err(format!("BulkDataURI {uri}: status {}", r.status));
        }
        let parts = multipart(&r.header("content-type"), &r.body)?;
        parts
            .into_iter()
            .next()
            .map(|(_, b)| b)
            .ok_or_else(|| format!("BulkDataURI {uri}: no part"))
    }

    /// Checks one attribute of a DICOM JSON object against the zoo table.
    async fn check_attr(
        &self,
        obj: &Value,
        path: &str,
        vr: &str,
        want: &Want,
    ) -> Result<(), String> {
        let a = at_path(obj, path);
        let a = match (a, want) {
            (None, Want::Absent) => return Ok(()),
            (Some(_), Want::Absent) => {
                return Err("a Group Length attribute: F.2.2 excludes them".into());
            }
            (None, _) => return Err("missing".into()),
            (Some(a), _) => a,
        };
        if let Want::EmptyItem = want {
            return if a.as_object().is_some_and(|o| o.is_empty()) {
                Ok(())
            } else {
                Err(format!(
                    "{a}: an empty item is an empty JSON object (F.2.5)"
                ))
            };
        }
        if a["vr"] != vr {
            return Err(format!("\"vr\" is {}, stored {vr} (F.2.3)", a["vr"]));
        }
        let payload = ["Value", "BulkDataURI", "InlineBinary"]
            .iter()
            .filter(|k| a.get(**k).is_some())
            .count();
        match want {
            Want::Empty => {
                if payload == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{a}: an empty attribute has no \"Value\", \"BulkDataURI\" or \"InlineBinary\" (F.2.5)"
                    ))
                }
            }
            Want::Items(n) => match a["Value"].as_array() {
                Some(items) if items.len() == *n && items.iter().all(Value::is_object) => Ok(()),
                _ => Err(format!(
                    "{a}: expected {n} items, each a JSON object (F.2.2)"
                )),
            },
            Want::Binary(bytes) => {
                if payload != 1 {
                    return Err(format!(
                        "{a}: exactly one of \"InlineBinary\" or \"BulkDataURI\" (F.2.2)"
                    ));
                }
                let got = if let Some(b64) = a["InlineBinary"].as_str() {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| format!("InlineBinary is not base64 ({e}) (F.2.7)"))?
                } else if let Some(uri) = a["BulkDataURI"].as_str() {
                    self.bulk(uri).await?
                } else {
                    return Err(format!(
                        "{a}: {vr} as InlineBinary or BulkDataURI (Table F.2.3-1)"
                    ));
                };
                // An odd-length value is padded to even length by one byte (PS3.5 7.1.1).
                if got == *bytes || (got.len() == bytes.len() + 1 && got.starts_with(bytes)) {
                    Ok(())
                } else {
                    Err(format!("binary value {got:02X?}, stored {bytes:02X?}"))
                }
            }
            Want::Values(w) => {
                let got = a["Value"]
                    .as_array()
                    .ok_or_else(|| format!("{a}: no \"Value\" array (F.2.4)"))?;
                let w = w.as_array().unwrap();
                if got.len() != w.len() {
                    return Err(format!(
                        "{} values {got:?}, stored {} (F.2.4: one array element per value)",
                        got.len(),
                        w.len()
                    ));
                }
                let errors: Vec<String> = got
                    .iter()
                    .zip(w)
                    .enumerate()
                    .filter_map(|(i, (g, w))| {
                        check_value(vr, g, w).err().map(|e| format!("[{i}] {e}"))
                    })
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(errors.join("; "))
                }
            }
            Want::EmptyItem | Want::Absent => unreachable!(),
        }
    }

    /// Checks `obj` against `table`; `present_only` skips attributes the response lacks.
    async fn check_object(
        &self,
        where_: &str,
        obj: &Value,
        table: &[(&str, &str, &str, Want)],
        present_only: bool,
        fails: &mut Vec<String>,
    ) {
        for (path, vr, stored, want) in table {
            if present_only && at_path(obj, path).is_none() {
                continue;
            }
            if let Err(e) = self.check_attr(obj, path, vr, want).await {
                fails.push(format!("{where_}: {path} {vr} stored as {stored:?}: {e}"));
            }
        }
    }
}

/// The attributes every QIDO-RS response for the zoo must carry, by level (PS3.18 10.6.3.3,
/// Tables 10.6.3-3, 10.6.3-4 and 10.6.3-5), with their JSON encoding (Table F.2.3-1, F.2.5).
fn qido_required(
    level: &str,
    f: &Fixtures,
) -> Vec<(&'static str, &'static str, &'static str, Want)> {
    use Want::*;
    let uid = |n: &str| Values(json!([f.uid(n)]));
    match level {
        "study" => vec![
            ("00080020", "DA", "20230301", Values(json!(["20230301"]))),
            ("00080030", "TM", "120000", Values(json!(["120000"]))),
            ("00080050", "SH", "(zero length)", Empty),
            ("00080061", "CS", "OT", Values(json!(["OT"]))),
            ("00100010", "PN", "(zero length)", Empty),
            ("00100020", "LO", "CONF-ZOO", Values(json!(["CONF-ZOO"]))),
            ("0020000D", "UI", "Z", uid("Z")),
            ("00201206", "IS", "1 series", Values(json!([1]))),
            ("00201208", "IS", "1 instance", Values(json!([1]))),
        ],
        "series" => vec![
            ("00080060", "CS", "OT", Values(json!(["OT"]))),
            ("0020000E", "UI", "Zs", uid("Zs")),
            ("00200011", "IS", "1", Values(json!([1]))),
            ("00201209", "IS", "1 instance", Values(json!([1]))),
        ],
        _ => vec![
            (
                "00080016",
                "UI",
                "Secondary Capture",
                Values(json!(["1.2.840.10008.5.1.4.1.1.7"])),
            ),
            ("00080018", "UI", "Zi", uid("Zi")),
            ("00200013", "IS", "1", Values(json!([1]))),
            ("00280010", "US", "4", Values(json!([4]))),
            ("00280011", "US", "4", Values(json!([4]))),
            ("00280100", "US", "8", Values(json!([8]))),
        ],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dicom_json_encodes_every_vr_as_ps3_18_annex_f_prescribes() {
    let Some(f) = Fixtures::make(&["pydicom", "dicomweb_client"]) else {
        return;
    };
    let table = zoo_table();
    // Optional study-level attributes, checked when present (Table 10.6.3-3).
    let optional_study = vec![
        ("00080090", "PN", "(zero length)", Want::Empty),
        ("00100030", "DA", "(zero length)", Want::Empty),
        ("00100040", "CS", "(zero length)", Want::Empty),
        ("00200010", "SH", "(zero length)", Want::Empty),
    ];
    for b in backends() {
        let node = Node::start(&b).await;
        let web = Web::new(&node);
        web.stow(&f.zoo).await;
        web.stow(&f.corpus).await;
        let mut fails = Vec::new();
        let (z, zs, zi) = (f.uid("Z"), f.uid("Zs"), f.uid("Zi"));

        // WADO-RS metadata at study, series and instance level (PS3.18 10.4.1.1.2).
        for path in [
            format!("/studies/{z}/metadata"),
            format!("/studies/{z}/series/{zs}/metadata"),
            format!("/studies/{z}/series/{zs}/instances/{zi}/metadata"),
        ] {
            let r = web.get(&path, "application/dicom+json").await;
            let Ok(Value::Array(list)) = serde_json::from_slice::<Value>(&r.body) else {
                fails.push(format!(
                    "GET {path}: status {}, not a JSON array of data sets: {}",
                    r.status,
                    r.text()
                ));
                continue;
            };
            match list
                .iter()
                .find(|o| first(o, "00080018").as_deref() == Some(zi))
            {
                Some(obj) => {
                    web.check_object(&format!("GET {path}"), obj, &table, false, &mut fails)
                        .await
                }
                None => fails.push(format!(
                    "GET {path}: the zoo instance is not in the response"
                )),
            }
        }

        // QIDO-RS at each level: the attributes each level returns, and with includefield=all
        // every zoo attribute that the response carries.
        let searches = [
            (
                "study",
                "/studies".to_owned(),
                format!("StudyInstanceUID={z}"),
            ),
            ("series", format!("/studies/{z}/series"), String::new()),
            (
                "instance",
                format!("/studies/{z}/series/{zs}/instances"),
                String::new(),
            ),
            (
                "instance",
                format!("/studies/{z}/series/{zs}/instances"),
                "includefield=all".to_owned(),
            ),
            (
                "instance",
                "/instances".to_owned(),
                format!("SOPInstanceUID={zi}&includefield=all"),
            ),
        ];
        for (level, path, query) in &searches {
            let where_ = format!("QIDO {path}?{query}");
            match web.results(path, query).await {
                Err(e) => fails.push(format!("{where_}: {e}")),
                Ok(list) if list.len() != 1 => {
                    fails.push(format!(
                        "{where_}: {} results, expected the zoo only",
                        list.len()
                    ));
                }
                Ok(list) => {
                    let obj = &list[0];
                    web.check_object(&where_, obj, &qido_required(level, &f), false, &mut fails)
                        .await;
                    if *level == "study" {
                        web.check_object(&where_, obj, &optional_study, true, &mut fails)
                            .await;
                    }
                    web.check_object(&where_, obj, &table, true, &mut fails)
                        .await;
                }
            }
        }

        // Standard clients: dicomweb-client for every search and metadata resource, each data
        // set read by pydicom's Dataset.from_json with warnings as errors, key order (F.2.2),
        // and the zoo's metadata holding the stored values.
        let o = Command::new("python3")
            .arg(SCRIPT)
            .arg("clients")
            .arg("--url")
            .arg(&web.base)
            .arg("--token")
            .arg(&web.token)
            .arg("--ca")
            .arg(node.cert_path())
            .arg("--manifest")
            .arg(&f.manifest)
            .output()
            .unwrap();
        if !o.status.success() {
            fails.push(format!(
                "dicomweb-client / pydicom (strict):\n{}",
                tools::text(&o)
            ));
        }
        assert!(
            fails.is_empty(),
            "[{}] DICOM JSON departs from PS3.18 Annex F in {} places:\n{}",
            b.name,
            fails.len(),
            fails.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Attribute matching: PS3.4 C.2.2.2, through QIDO-RS and C-FIND
// ---------------------------------------------------------------------------------------------

const SINGLE: &str = "PS3.4 C.2.2.2.1 Single Value Matching";
const SINGLE_CASE: &str = "PS3.4 C.2.2.2.1 Single Value Matching is case-sensitive (not a PN)";
const PN_CASE: &str = "PS3.4 C.2.2.2.1/C.2.2.2.4: PN matching is left to the Conformance \
                       Statement; Kade's (README, docs/dicomweb.md) matches names case-insensitively";
const UID_LIST: &str = "PS3.4 C.2.2.2.2 List of UID Matching (QIDO: PS3.18 8.3.4.1 uid-list-match, \
                        a comma-separated 1#value list)";
const UNIVERSAL: &str = "PS3.4 C.2.2.2.3 Universal Matching";
const WILD: &str = "PS3.4 C.2.2.2.4 Wild Card Matching (\"?\" is one character)";
const WILD_CASE: &str = "PS3.4 C.2.2.2.4 Wild Card Matching is case-sensitive except for PN";
const RANGE: &str = "PS3.4 C.2.2.2.5 Range Matching";
const COMBINED: &str = "PS3.4 C.2.2.2: every key must match";

/// (section, QIDO path, query `key=value&…`, expected set of results by fixture name). Rows on
/// the hierarchical resources without comma lists are also run through C-FIND (Study Root) at
/// the level of the path, with the UIDs of the path as keys.
const MATCHING: &[(&str, &str, &str, &[&str])] = &[
    // Studies.
    (UNIVERSAL, "/studies", "", &["S1", "S2", "S3", "S4", "S5"]),
    (
        UNIVERSAL,
        "/studies",
        "PatientName=",
        &["S1", "S2", "S3", "S4", "S5"],
    ),
    (
        UNIVERSAL,
        "/studies",
        "PatientName=*",
        &["S1", "S2", "S3", "S4", "S5"],
    ),
    (
        UNIVERSAL,
        "/studies",
        "StudyDescription=*",
        &["S1", "S2", "S3", "S4", "S5"],
    ),
    (SINGLE, "/studies", "PatientID=CONF-P1", &["S1", "S2"]),
    (SINGLE_CASE, "/studies", "PatientID=conf-p1", &["S5"]),
    (SINGLE_CASE, "/studies", "AccessionNumber=ACC-001", &["S1"]),
    (SINGLE_CASE, "/studies", "AccessionNumber=acc-001", &["S2"]),
    (SINGLE, "/studies", "StudyDescription=Chest CT", &["S3"]),
    (SINGLE_CASE, "/studies", "StudyDescription=chest ct", &[]),
    (SINGLE, "/studies", "StudyDescription=Chest", &[]),
    (
        SINGLE,
        "/studies",
        "PatientName=Müller^Jürgen",
        &["S1", "S2"],
    ),
    (
        PN_CASE,
        "/studies",
        "PatientName=müller^jürgen",
        &["S1", "S2"],
    ),
    (SINGLE, "/studies", "StudyDate=20200115", &["S1"]),
    (SINGLE, "/studies", "ModalitiesInStudy=CT", &["S1", "S3"]),
    (
        SINGLE,
        "/studies",
        "ModalitiesInStudy=MR",
        &["S1", "S2", "S4", "S5"],
    ),
    (
        WILD,
        "/studies",
        "PatientName=M?ller*",
        &["S1", "S2", "S3", "S4"],
    ),
    (
        PN_CASE,
        "/studies",
        "PatientName=m?ller^j*",
        &["S1", "S2", "S3"],
    ),
    (WILD, "/studies", "PatientName=M??ller*", &[]),
    (WILD, "/studies", "PatientName=MULLER*", &["S4"]),
    (
        PN_CASE,
        "/studies",
        "PatientName=*ller^J*",
        &["S1", "S2", "S3"],
    ),
    (
        WILD,
        "/studies",
        "PatientID=CONF-P?",
        &["S1", "S2", "S3", "S4"],
    ),
    (WILD_CASE, "/studies", "PatientID=conf-*", &["S5"]),
    (
        WILD,
        "/studies",
        "AccessionNumber=ACC-00?",
        &["S1", "S3", "S4", "S5"],
    ),
    (WILD_CASE, "/studies", "StudyDescription=*Brain*", &["S1"]),
    (WILD_CASE, "/studies", "StudyDescription=*brain*", &["S2"]),
    (
        WILD_CASE,
        "/studies",
        "StudyDescription=*MR*",
        &["S1", "S4", "S5"],
    ),
    (
        WILD,
        "/studies",
        "StudyDescription=Brain MR?routine",
        &["S1"],
    ),
    (WILD, "/studies", "StudyDescription=?hest CT", &["S3"]),
    (
        WILD,
        "/studies",
        "StudyDescription=Knie ?bersicht*",
        &["S5"],
    ),
    (WILD, "/studies", "StudyDescription=Knie ??bersicht*", &[]),
    (WILD, "/studies", "ModalitiesInStudy=C?", &["S1", "S3"]),
    (UID_LIST, "/studies", "StudyInstanceUID={S1}", &["S1"]),
    (
        UID_LIST,
        "/studies",
        "StudyInstanceUID={S1},{S3}",
        &["S1", "S3"],
    ),
    (
        UID_LIST,
        "/studies",
        "StudyInstanceUID={S1}\\{S3}",
        &["S1", "S3"],
    ),
    (UID_LIST, "/studies", "StudyInstanceUID={S1},9.9.9", &["S1"]),
    (
        RANGE,
        "/studies",
        "StudyDate=20200101-20201231",
        &["S1", "S2", "S5"],
    ),
    (
        RANGE,
        "/studies",
        "StudyDate=20200101-",
        &["S1", "S2", "S3", "S5"],
    ),
    (
        RANGE,
        "/studies",
        "StudyDate=-20201231",
        &["S1", "S2", "S4", "S5"],
    ),
    (RANGE, "/studies", "StudyDate=-20191231", &["S4"]),
    (RANGE, "/studies", "StudyDate=20191231-20191231", &["S4"]),
    (RANGE, "/studies", "StudyDate=20210102-", &[]),
    (RANGE, "/studies", "StudyTime=100000-150000", &["S1", "S3"]),
    (RANGE, "/studies", "StudyTime=-080000", &["S2", "S5"]),
    (RANGE, "/studies", "StudyTime=143000-", &["S3", "S4"]),
    (
        COMBINED,
        "/studies",
        "PatientID=CONF-P1&StudyDate=20200101-20200630",
        &["S1"],
    ),
    (
        COMBINED,
        "/studies",
        "PatientName=m?ller*&StudyDescription=*MR*",
        &["S1", "S4"],
    ),
    // A study's series (hierarchical).
    (UNIVERSAL, "/studies/{S1}/series", "", &["S1a", "S1b"]),
    (SINGLE, "/studies/{S1}/series", "Modality=CT", &["S1b"]),
    (WILD, "/studies/{S1}/series", "Modality=M?", &["S1a"]),
    (SINGLE, "/studies/{S1}/series", "SeriesNumber=2", &["S1b"]),
    (
        WILD,
        "/studies/{S1}/series",
        "SeriesDescription=*axial*",
        &["S1a"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series",
        "SeriesInstanceUID={S1a}",
        &["S1a"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series",
        "SeriesInstanceUID={S1a},{S1b}",
        &["S1a", "S1b"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series",
        "SeriesInstanceUID={S1a}\\{S1b}",
        &["S1a", "S1b"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series",
        "SeriesInstanceUID={S2a}",
        &[],
    ),
    // All series (relational, PS3.18 Table 10.6.1-1).
    (
        UNIVERSAL,
        "/series",
        "",
        &["S1a", "S1b", "S2a", "S3a", "S4a", "S5a"],
    ),
    (
        SINGLE,
        "/series",
        "Modality=MR",
        &["S1a", "S2a", "S4a", "S5a"],
    ),
    (
        WILD_CASE,
        "/series",
        "SeriesDescription=*axial*",
        &["S1a", "S2a"],
    ),
    (
        WILD,
        "/series",
        "SeriesDescription=T? axial",
        &["S1a", "S2a"],
    ),
    (WILD_CASE, "/series", "SeriesDescription=t1*", &["S4a"]),
    (WILD_CASE, "/series", "SeriesDescription=*AXIAL", &["S4a"]),
    (
        UID_LIST,
        "/series",
        "SeriesInstanceUID={S1a},{S3a}",
        &["S1a", "S3a"],
    ),
    (
        UID_LIST,
        "/series",
        "SeriesInstanceUID={S1a}\\{S3a}",
        &["S1a", "S3a"],
    ),
    // A series' instances (hierarchical).
    (
        UNIVERSAL,
        "/studies/{S1}/series/{S1a}/instances",
        "",
        &["I1a1", "I1a2"],
    ),
    (
        SINGLE,
        "/studies/{S1}/series/{S1a}/instances",
        "InstanceNumber=2",
        &["I1a2"],
    ),
    (
        SINGLE,
        "/studies/{S1}/series/{S1a}/instances",
        "SOPClassUID=1.2.840.10008.5.1.4.1.1.4",
        &["I1a1", "I1a2"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series/{S1a}/instances",
        "SOPInstanceUID={I1a1}",
        &["I1a1"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series/{S1a}/instances",
        "SOPInstanceUID={I1a1},{I1a2}",
        &["I1a1", "I1a2"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series/{S1a}/instances",
        "SOPInstanceUID={I1a1}\\{I1a2}",
        &["I1a1", "I1a2"],
    ),
    (
        UID_LIST,
        "/studies/{S1}/series/{S1a}/instances",
        "SOPInstanceUID={I1b1}",
        &[],
    ),
    // A study's instances and all instances (relational).
    (
        UNIVERSAL,
        "/studies/{S1}/instances",
        "",
        &["I1a1", "I1a2", "I1b1"],
    ),
    (
        SINGLE,
        "/studies/{S1}/instances",
        "SOPClassUID=1.2.840.10008.5.1.4.1.1.2",
        &["I1b1"],
    ),
    (
        UNIVERSAL,
        "/instances",
        "",
        &[
            "I1a1", "I1a2", "I1b1", "I2a1", "I3a1", "I3a2", "I4a1", "I5a1",
        ],
    ),
    (SINGLE, "/instances", "InstanceNumber=2", &["I1a2", "I3a2"]),
    (
        SINGLE,
        "/instances",
        "SOPClassUID=1.2.840.10008.5.1.4.1.1.2",
        &["I1b1", "I3a1", "I3a2"],
    ),
    (
        UID_LIST,
        "/instances",
        "SOPClassUID=1.2.840.10008.5.1.4.1.1.2,1.2.840.10008.5.1.4.1.1.4",
        &[
            "I1a1", "I1a2", "I1b1", "I2a1", "I3a1", "I3a2", "I4a1", "I5a1",
        ],
    ),
    (
        UID_LIST,
        "/instances",
        "SOPInstanceUID={I1a1},{I3a1}",
        &["I1a1", "I3a1"],
    ),
    (
        UID_LIST,
        "/instances",
        "SOPInstanceUID={I1a1}\\{I3a1}",
        &["I1a1", "I3a1"],
    ),
];

/// Runs every row of `table` as a QIDO-RS search; the failures.
async fn run_qido_rows(
    web: &Web,
    f: &Fixtures,
    table: &[(&str, &str, &str, &[&str])],
    also_400: bool,
) -> Vec<String> {
    let mut fails = Vec::new();
    for (section, path, query, want) in table {
        let (p, q) = (f.expand(path), f.expand(query));
        let shown = format!("GET {path}?{query}");
        let r = web.search(&p, &q).await;
        if also_400 && r.status == 400 {
            continue;
        }
        match parse_results(&r) {
            Err(e) => fails.push(format!("{shown} [{section}]: {e}")),
            Ok(list) => {
                let got: BTreeSet<String> = list
                    .iter()
                    .map(|o| {
                        first(o, unique_key(path))
                            .map(|u| f.name_of(&u))
                            .unwrap_or_else(|| "(no unique key)".into())
                    })
                    .collect();
                if got != names(want) || list.len() != want.len() {
                    fails.push(format!(
                        "{shown} [{section}]: got {got:?} ({} results), expected {:?}",
                        list.len(),
                        names(want)
                    ));
                }
            }
        }
    }
    fails
}

#[tokio::test(flavor = "multi_thread")]
async fn qido_rs_matches_as_ps3_4_c_2_2_2_specifies_at_every_level() {
    let Some(f) = Fixtures::make(&["pydicom"]) else {
        return;
    };
    for b in backends() {
        let node = Node::start(&b).await;
        let web = Web::new(&node);
        web.stow(&f.corpus).await;
        let fails = run_qido_rows(&web, &f, MATCHING, false).await;
        assert!(
            fails.is_empty(),
            "[{}] {} of {} QIDO-RS matching rows fail:\n{}",
            b.name,
            fails.len(),
            MATCHING.len(),
            fails.join("\n")
        );
    }
}

/// Runs findscu (`-S` Study Root or `-P` Patient Root) with `keys`: whether the final status
/// was Success, the values of `return_key` in the responses, and the tool's output.
fn c_find(
    node: &Node,
    findscu: &Path,
    model: &str,
    keys: &[String],
    return_key: dicom_core::Tag,
) -> (bool, Vec<String>, String) {
    let out = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = ["-v", model, "-X", "-od"].map(String::from).to_vec();
    args.push(out.path().to_str().unwrap().to_owned());
    for k in keys {
        args.push("-k".into());
        args.push(k.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = node.dcmtk(findscu, "FINDSCU", &refs, &[]);
    let text = tools::text(&o);
    let values = crate::common::list_files(out.path())
        .iter()
        .map(|p| {
            dicom_object::open_file(p)
                .ok()
                .and_then(|obj| {
                    obj.get(return_key)
                        .and_then(|e| e.to_str().ok())
                        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
                })
                .unwrap_or_else(|| "(no return key)".into())
        })
        .collect();
    let ok = o.status.success() && text.contains("Received Final Find Response (Success)");
    (ok, values, text)
}

/// (section, Patient Root level, keys, expected values of the level's unique key: patient IDs
/// at PATIENT level, fixture names below). Patient Root queries below PATIENT level carry the
/// unique keys of the levels above (PS3.4 C.4.1.2.2.1 Hierarchical Search Method).
const PATIENT_ROOT: &[(&str, &str, &[&str], &[&str])] = &[
    (
        WILD,
        "PATIENT",
        &["PatientName=M?ller*"],
        &["CONF-P1", "CONF-P2", "CONF-P3"],
    ),
    (
        PN_CASE,
        "PATIENT",
        &["PatientName=m?ller^j*"],
        &["CONF-P1", "CONF-P2"],
    ),
    (WILD, "PATIENT", &["PatientName=M??ller*"], &[]),
    (
        SINGLE,
        "PATIENT",
        &["PatientName=Müller^Jürgen"],
        &["CONF-P1"],
    ),
    (
        PN_CASE,
        "PATIENT",
        &["PatientName=müller^jürgen"],
        &["CONF-P1"],
    ),
    (
        UNIVERSAL,
        "PATIENT",
        &["PatientName="],
        &["CONF-P1", "CONF-P2", "CONF-P3", "conf-p1"],
    ),
    (
        UNIVERSAL,
        "PATIENT",
        &["PatientName=*"],
        &["CONF-P1", "CONF-P2", "CONF-P3", "conf-p1"],
    ),
    (SINGLE, "PATIENT", &["PatientID=CONF-P1"], &["CONF-P1"]),
    (SINGLE_CASE, "PATIENT", &["PatientID=conf-p1"], &["conf-p1"]),
    (
        WILD,
        "PATIENT",
        &["PatientID=CONF-P?"],
        &["CONF-P1", "CONF-P2", "CONF-P3"],
    ),
    (SINGLE, "STUDY", &["PatientID=CONF-P1"], &["S1", "S2"]),
    (
        RANGE,
        "STUDY",
        &["PatientID=CONF-P1", "StudyDate=20200101-20200630"],
        &["S1"],
    ),
    (
        WILD_CASE,
        "STUDY",
        &["PatientID=CONF-P1", "StudyDescription=*brain*"],
        &["S2"],
    ),
    (
        UID_LIST,
        "STUDY",
        &["PatientID=CONF-P1", "StudyInstanceUID={S1}\\{S2}"],
        &["S1", "S2"],
    ),
    (
        SINGLE_CASE,
        "STUDY",
        &["PatientID=CONF-P1", "AccessionNumber=ACC-001"],
        &["S1"],
    ),
    (
        SINGLE,
        "SERIES",
        &["PatientID=CONF-P1", "StudyInstanceUID={S1}", "Modality=MR"],
        &["S1a"],
    ),
    (
        WILD,
        "SERIES",
        &[
            "PatientID=CONF-P1",
            "StudyInstanceUID={S1}",
            "SeriesDescription=T? axial",
        ],
        &["S1a"],
    ),
    (
        UID_LIST,
        "SERIES",
        &[
            "PatientID=CONF-P1",
            "StudyInstanceUID={S1}",
            "SeriesInstanceUID={S1a}\\{S1b}",
        ],
        &["S1a", "S1b"],
    ),
    (
        UID_LIST,
        "IMAGE",
        &[
            "PatientID=CONF-P1",
            "StudyInstanceUID={S1}",
            "SeriesInstanceUID={S1a}",
            "SOPInstanceUID={I1a1}\\{I1a2}",
        ],
        &["I1a1", "I1a2"],
    ),
    (
        SINGLE,
        "IMAGE",
        &[
            "PatientID=CONF-P1",
            "StudyInstanceUID={S1}",
            "SeriesInstanceUID={S1a}",
            "InstanceNumber=2",
        ],
        &["I1a2"],
    ),
];

fn level_key(level: &str) -> (&'static str, dicom_core::Tag) {
    match level {
        "PATIENT" => ("PatientID", tags::PATIENT_ID),
        "STUDY" => ("StudyInstanceUID", tags::STUDY_INSTANCE_UID),
        "SERIES" => ("SeriesInstanceUID", tags::SERIES_INSTANCE_UID),
        _ => ("SOPInstanceUID", tags::SOP_INSTANCE_UID),
    }
}

/// A C-FIND peer (DCMTK findscu) against a node, with the fixtures for names.
struct Finder<'a> {
    node: &'a Node,
    findscu: &'a Path,
    f: &'a Fixtures,
}

impl Finder<'_> {
    /// One C-FIND row: the keys (after the level, Specific Character Set and the empty return
    /// key, so that a row's own value of that key wins), compared with the expected set.
    fn row(
        &self,
        model: &str,
        level: &str,
        keys: &[String],
        want: &[&str],
        section: &str,
    ) -> Option<String> {
        let (key, tag) = level_key(level);
        let mut all = vec![
            format!("QueryRetrieveLevel={level}"),
            // PS3.4 C.2.2.2: it specifies the encoding of the other keys and is never matched.
            "SpecificCharacterSet=ISO_IR 192".to_owned(),
            key.to_owned(),
        ];
        all.extend(keys.iter().map(|k| self.f.expand(k)));
        let (ok, values, text) = c_find(self.node, self.findscu, model, &all, tag);
        let shown = format!("C-FIND {model} {level} {}", keys.join(" "));
        if !ok {
            let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Some(format!(
                "{shown} [{section}]: no Success final status ({tail})"
            ));
        }
        let got: BTreeSet<String> = values.iter().map(|v| self.f.name_of(v)).collect();
        (got != names(want) || values.len() != want.len()).then(|| {
            format!(
                "{shown} [{section}]: got {got:?} ({} responses), expected {:?}",
                values.len(),
                names(want)
            )
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn c_find_matches_as_ps3_4_c_2_2_2_specifies_in_both_models() {
    let Some(findscu) = tools::dcmtk("findscu") else {
        return;
    };
    let Some(f) = Fixtures::make(&["pydicom"]) else {
        return;
    };
    for b in backends() {
        let node = Node::start(&b).await;
        let web = Web::new(&node);
        web.stow(&f.corpus).await;
        let finder = Finder {
            node: &node,
            findscu: &findscu,
            f: &f,
        };
        let mut fails = Vec::new();
        let mut rows = 0;
        // Study Root: the hierarchical rows of the QIDO table at the level of their path. A
        // DIMSE UID list is backslash-separated (C.2.2.2.2), so comma rows are QIDO-only.
        for (section, path, query, want) in MATCHING {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let (level, mut keys): (&str, Vec<String>) = match segments.as_slice() {
                ["studies"] => ("STUDY", vec![]),
                ["studies", st, "series"] => ("SERIES", vec![format!("StudyInstanceUID={st}")]),
                ["studies", st, "series", se, "instances"] => (
                    "IMAGE",
                    vec![
                        format!("StudyInstanceUID={st}"),
                        format!("SeriesInstanceUID={se}"),
                    ],
                ),
                _ => continue, // relational resources: not in baseline C-FIND
            };
            if query.contains(',') {
                continue;
            }
            keys.extend(query.split('&').filter(|k| !k.is_empty()).map(String::from));
            rows += 1;
            fails.extend(finder.row("-S", level, &keys, want, section));
        }
        for (section, level, keys, want) in PATIENT_ROOT {
            let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
            rows += 1;
            fails.extend(finder.row("-P", level, &keys, want, section));
        }
        assert!(
            fails.is_empty(),
            "[{}] {} of {rows} C-FIND matching rows fail:\n{}",
            b.name,
            fails.len(),
            fails.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. QIDO-RS query parameters: PS3.18 8.3, 8.3.4, 10.6
// ---------------------------------------------------------------------------------------------

const RELATIONAL: &str = "PS3.18 Table 10.6.1-1: All Series / All Instances / Study's Instances \
                          are relational queries; keys of a higher level match there (or 400, \
                          never ignored)";
const IGNORE_UNKNOWN: &str = "PS3.18 8.3: the origin server shall ignore any unsupported Query \
                              Parameters and process the request as if they were not present";

/// Keys of a higher level on lower-level resources: the exact set, or 400 for a key the
/// server does not support (a silently ignored key returns more).
const HIGHER_LEVEL_KEYS: &[(&str, &str, &str, &[&str])] = &[
    (
        RELATIONAL,
        "/series",
        "PatientID=CONF-P1",
        &["S1a", "S1b", "S2a"],
    ),
    (
        RELATIONAL,
        "/series",
        "PatientName=M?ller*",
        &["S1a", "S1b", "S2a", "S3a", "S4a"],
    ),
    (
        RELATIONAL,
        "/series",
        "StudyDate=20200101-20201231",
        &["S1a", "S1b", "S2a", "S5a"],
    ),
    (
        RELATIONAL,
        "/series",
        "AccessionNumber=ACC-001",
        &["S1a", "S1b"],
    ),
    (RELATIONAL, "/series", "StudyDescription=*brain*", &["S2a"]),
    (
        RELATIONAL,
        "/series",
        "ModalitiesInStudy=CT",
        &["S1a", "S1b", "S3a"],
    ),
    (
        RELATIONAL,
        "/series",
        "StudyInstanceUID={S1}\\{S3}",
        &["S1a", "S1b", "S3a"],
    ),
    (
        RELATIONAL,
        "/series",
        "StudyInstanceUID={S1},{S3}&Modality=CT",
        &["S1b", "S3a"],
    ),
    (
        RELATIONAL,
        "/instances",
        "PatientID=CONF-P1&StudyDate=20200101-20200630",
        &["I1a1", "I1a2", "I1b1"],
    ),
    (
        RELATIONAL,
        "/instances",
        "PatientName=m?ller^j*&Modality=CT",
        &["I1b1", "I3a1", "I3a2"],
    ),
    (
        RELATIONAL,
        "/instances",
        "Modality=CT",
        &["I1b1", "I3a1", "I3a2"],
    ),
    (
        RELATIONAL,
        "/instances",
        "SeriesDescription=*axial*",
        &["I1a1", "I1a2", "I2a1"],
    ),
    (
        RELATIONAL,
        "/instances",
        "StudyInstanceUID={S3}&InstanceNumber=2",
        &["I3a2"],
    ),
    (
        RELATIONAL,
        "/instances",
        "SeriesInstanceUID={S1a}",
        &["I1a1", "I1a2"],
    ),
    (
        RELATIONAL,
        "/studies/{S1}/instances",
        "Modality=MR",
        &["I1a1", "I1a2"],
    ),
    (
        RELATIONAL,
        "/studies/{S1}/instances",
        "SeriesInstanceUID={S1b}",
        &["I1b1"],
    ),
];

/// Unsupported parameters: the same answer as without them.
const UNKNOWN_PARAMETERS: &[(&str, &str, &str, &[&str])] = &[
    (
        IGNORE_UNKNOWN,
        "/studies",
        "_=1",
        &["S1", "S2", "S3", "S4", "S5"],
    ),
    (
        IGNORE_UNKNOWN,
        "/studies",
        "PatientID=CONF-P1&_=1700000000000",
        &["S1", "S2"],
    ),
    (
        IGNORE_UNKNOWN,
        "/studies",
        "PatientID=CONF-P1&vendorextension=x",
        &["S1", "S2"],
    ),
    (
        IGNORE_UNKNOWN,
        "/series",
        "_=1&Modality=CT",
        &["S1b", "S3a"],
    ),
    (
        IGNORE_UNKNOWN,
        "/studies/{S1}/series/{S1a}/instances",
        "_=1",
        &["I1a1", "I1a2"],
    ),
];

/// (section, path, query, attribute, expected "Value") on a one-result search.
const RETURNED: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "PS3.18 8.3.4.3 includefield by keyword",
        "/studies",
        "StudyInstanceUID={S3}&includefield=StudyDescription",
        "00081030",
        &["Chest CT"],
    ),
    (
        "PS3.18 8.3.4.3 includefield by tag",
        "/studies",
        "StudyInstanceUID={S3}&includefield=00081030",
        "00081030",
        &["Chest CT"],
    ),
    (
        "PS3.18 8.3.4.3 includefield: a comma-separated list",
        "/studies",
        "StudyInstanceUID={S3}&includefield=StudyDescription,00100040",
        "00081030",
        &["Chest CT"],
    ),
    (
        "PS3.18 8.3.4.3 includefield: a comma-separated list",
        "/studies",
        "StudyInstanceUID={S3}&includefield=StudyDescription,00100040",
        "00100040",
        &["O"],
    ),
    (
        "PS3.18 8.3.4.3 includefield: repeated",
        "/studies",
        "StudyInstanceUID={S3}&includefield=PatientSex&includefield=StudyDescription",
        "00081030",
        &["Chest CT"],
    ),
    (
        "PS3.18 10.6.3.3.1: match keys are returned",
        "/studies",
        "StudyDescription=Chest*",
        "00081030",
        &["Chest CT"],
    ),
    (
        "PS3.18 10.6.3.3.2: Study attributes as includefield at series level",
        "/series",
        "SeriesInstanceUID={S3a}&includefield=StudyDescription",
        "00081030",
        &["Chest CT"],
    ),
    (
        "PS3.18 10.6.3.3.2: All Series results carry the Study attributes",
        "/series",
        "SeriesInstanceUID={S3a}",
        "0020000D",
        &["{S3}"],
    ),
    (
        "PS3.18 10.6.3.3.2: All Series results carry the Study attributes",
        "/series",
        "SeriesInstanceUID={S3a}",
        "00100020",
        &["CONF-P2"],
    ),
    (
        "PS3.18 10.6.3.3.2: All Series results carry the Study attributes",
        "/series",
        "SeriesInstanceUID={S3a}",
        "00080020",
        &["20210101"],
    ),
    (
        "PS3.18 10.6.3.3.3: All Instances results carry Study and Series attributes",
        "/instances",
        "SOPInstanceUID={I3a2}",
        "0020000D",
        &["{S3}"],
    ),
    (
        "PS3.18 10.6.3.3.3: All Instances results carry Study and Series attributes",
        "/instances",
        "SOPInstanceUID={I3a2}",
        "0020000E",
        &["{S3a}"],
    ),
    (
        "PS3.18 10.6.3.3.3: All Instances results carry Study and Series attributes",
        "/instances",
        "SOPInstanceUID={I3a2}",
        "00080060",
        &["CT"],
    ),
    (
        "PS3.18 10.6.3.3.3: All Instances results carry Study and Series attributes",
        "/instances",
        "SOPInstanceUID={I3a2}",
        "00100020",
        &["CONF-P2"],
    ),
];

/// A supported parameter with an invalid value.
const INVALID: &[(&str, &str)] = &[
    ("/studies", "limit=abc"),
    ("/studies", "offset=-1"),
    ("/studies", "fuzzymatching=maybe"),
];

#[tokio::test(flavor = "multi_thread")]
async fn qido_rs_query_parameters_follow_ps3_18_8_3_4() {
    let Some(f) = Fixtures::make(&["pydicom"]) else {
        return;
    };
    for b in backends() {
        let node = Node::start(&b).await;
        let web = Web::new(&node);
        web.stow(&f.corpus).await;
        let mut fails = run_qido_rows(&web, &f, HIGHER_LEVEL_KEYS, true).await;
        fails.extend(run_qido_rows(&web, &f, UNKNOWN_PARAMETERS, false).await);

        for (section, path, query, tag, want) in RETURNED {
            let shown = format!("GET {path}?{query} {tag} [{section}]");
            match web.results(&f.expand(path), &f.expand(query)).await {
                Err(e) => fails.push(format!("{shown}: {e}")),
                Ok(list) if list.len() != 1 => {
                    fails.push(format!("{shown}: {} results, expected 1", list.len()))
                }
                Ok(list) => {
                    let want: Vec<Value> =
                        want.iter().map(|w| Value::String(f.expand(w))).collect();
                    if list[0][tag]["Value"] != Value::Array(want.clone()) {
                        fails.push(format!(
                            "{shown}: {} is {}, expected {want:?}",
                            tag, list[0][tag]
                        ));
                    }
                }
            }
        }

        // PS3.18 8.3.4.4: limit and offset page through the results, each result once.
        for (path, query, total) in [
            ("/studies", "", 5),
            ("/series", "", 6),
            ("/instances", "", 8),
            ("/studies", "PatientName=M?ller*", 4),
            ("/instances", "Modality=CT", 3),
        ] {
            let all: BTreeSet<String> = match web.results(path, query).await {
                Ok(l) => l
                    .iter()
                    .filter_map(|o| first(o, unique_key(path)))
                    .collect(),
                Err(e) => {
                    fails.push(format!("GET {path}?{query}: {e}"));
                    continue;
                }
            };
            if all.len() != total {
                fails.push(format!(
                    "GET {path}?{query}: {} results, expected {total}",
                    all.len()
                ));
                continue;
            }
            for limit in [1usize, 2, 3] {
                let mut seen: Vec<String> = Vec::new();
                let mut offset = 0;
                while offset <= total {
                    let q = format!("{query}&limit={limit}&offset={offset}");
                    match web.results(path, &q).await {
                        Err(e) => fails.push(format!("GET {path}?{q} [PS3.18 8.3.4.4]: {e}")),
                        Ok(page) => {
                            let want = limit.min(total - offset);
                            if page.len() != want {
                                fails.push(format!(
                                    "GET {path}?{q} [PS3.18 8.3.4.4]: {} results, expected {want}",
                                    page.len()
                                ));
                            }
                            seen.extend(page.iter().filter_map(|o| first(o, unique_key(path))));
                        }
                    }
                    offset += limit;
                }
                let distinct: BTreeSet<String> = seen.iter().cloned().collect();
                if distinct != all || seen.len() != total {
                    fails.push(format!(
                        "GET {path}?{query} pages of {limit} [PS3.18 8.3.4.4]: {} results, {} \
                         distinct, not the {total} of the unpaged search",
                        seen.len(),
                        distinct.len()
                    ));
                }
            }
        }

        // PS3.18 8.3: "If a supported Query Parameter has an invalid value, the origin server
        // shall return a 400 (Bad Request)".
        for (path, query) in INVALID {
            let r = web.search(path, query).await;
            if r.status != 400 {
                fails.push(format!(
                    "GET {path}?{query} [PS3.18 8.3: invalid value of a supported parameter]: \
                     status {}, expected 400",
                    r.status
                ));
            }
        }
        assert!(
            fails.is_empty(),
            "[{}] {} QIDO-RS query parameter checks fail:\n{}",
            b.name,
            fails.len(),
            fails.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. WADO-RS transfer syntax: PS3.18 8.7.3
// ---------------------------------------------------------------------------------------------

/// What a WADO-RS retrieve must answer.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 200; every part in this transfer syntax, with the same pixel values.
    Ts(&'static str),
    /// 200; every part exactly as stored (data set bytes and transfer syntax).
    AsStored,
    /// `transfer-syntax=*`: as stored, except that Implicit VR Little Endian shall not be used
    /// with Web Services (PS3.18 8.7.3): such instances in any other syntax.
    Star,
    /// 406, or 200 with no part in one of these syntaxes.
    NotIn(&'static [&'static str]),
    /// 406 Not Acceptable.
    NotAcceptable,
}

const DEFAULT_TS: &str = "PS3.18 8.7.3 / 8.7.3.5.2 / 8.7.8.2 / Table 8.7.3-2: without a \
                          transfer-syntax parameter the response is in the default, Explicit \
                          VR Little Endian";
const STAR: &str = "PS3.18 8.7.3.5.2: \"*\" accepts any syntax; Kade returns the stored one \
                    (docs/dicomweb.md), but never Implicit VR Little Endian (8.7.3)";
const LISTED: &str = "PS3.18 8.7.3.5.2 / 8.7.8.2: the requested transfer syntax, when the origin \
                      server can provide it";
const UNAVAILABLE: &str = "PS3.18 8.7.8 / RFC 9110 15.5.7: 406 when no acceptable representation \
                           can be produced";
const NOT_FOR_WEB: &str = "PS3.18 8.7.3: Implicit VR Little Endian and Explicit VR Big Endian \
                           shall not be used with Web Services";

/// (section, resource: an instance name or the study "W", transfer-syntax parameter or "" for
/// none, expectation).
const WADO: &[(&str, &str, &str, Expect)] = &[
    (DEFAULT_TS, "W_implicit", "", Expect::Ts(EXPLICIT)),
    (DEFAULT_TS, "W_explicit", "", Expect::Ts(EXPLICIT)),
    (DEFAULT_TS, "W_rle", "", Expect::Ts(EXPLICIT)),
    (DEFAULT_TS, "W", "", Expect::Ts(EXPLICIT)),
    (STAR, "W_explicit", "*", Expect::AsStored),
    (STAR, "W_rle", "*", Expect::AsStored),
    (STAR, "W_implicit", "*", Expect::Star),
    (STAR, "W", "*", Expect::Star),
    (LISTED, "W_implicit", EXPLICIT, Expect::Ts(EXPLICIT)),
    (LISTED, "W_rle", EXPLICIT, Expect::Ts(EXPLICIT)),
    (LISTED, "W", EXPLICIT, Expect::Ts(EXPLICIT)),
    (LISTED, "W_rle", RLE, Expect::AsStored),
    (
        UNAVAILABLE,
        "W_explicit",
        JPEG_2000_LOSSLESS,
        Expect::NotAcceptable,
    ),
    (
        NOT_FOR_WEB,
        "W_explicit",
        IMPLICIT,
        Expect::NotIn(&[IMPLICIT]),
    ),
    (
        NOT_FOR_WEB,
        "W_implicit",
        BIG_ENDIAN,
        Expect::NotIn(&[BIG_ENDIAN, IMPLICIT]),
    ),
];

fn pixel_data(part10: &[u8]) -> Option<Vec<u8>> {
    dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(part10)
        .ok()?
        .element(tags::PIXEL_DATA)
        .ok()?
        .to_bytes()
        .ok()
        .map(|b| b.to_vec())
}

/// Checks one part of a WADO-RS response: its Content-Type against its File Meta group
/// (PS3.18 8.7.9), then `expect` against what was stored.
fn check_part(
    headers: &str,
    bytes: &[u8],
    sent: &BTreeMap<String, (Part10, Vec<u8>)>,
    expect: Expect,
) -> Result<(), String> {
    let p = Part10::parse(bytes.to_vec()).map_err(|e| format!("a part is not Part 10: {e}"))?;
    let (stored, pixels) = sent
        .get(&p.sop_instance)
        .ok_or_else(|| format!("unexpected instance {}", p.sop_instance))?;
    let who = format!("{} (stored {})", p.sop_instance, stored.transfer_syntax);
    match content_type_param(headers, "transfer-syntax") {
        Some(ts) if ts == p.transfer_syntax => {}
        Some(ts) => {
            return Err(format!(
                "{who}: Content-Type transfer-syntax={ts} but (0002,0010) is {} (PS3.18 8.7.9)",
                p.transfer_syntax
            ));
        }
        None => {
            return Err(format!(
                "{who}: the part's Content-Type has no transfer-syntax parameter (PS3.18 8.7.9: \
                 it shall specify the encoding of the part): {}",
                headers.replace("\r\n", " | ")
            ));
        }
    }
    let same_pixels = || -> Result<(), String> {
        match pixel_data(bytes) {
            Some(px) if px == *pixels => Ok(()),
            Some(_) => Err(format!(
                "{who}: pixel data differs from the stored instance's"
            )),
            None => Err(format!("{who}: no readable pixel data")),
        }
    };
    let as_stored = || -> Result<(), String> {
        if p.transfer_syntax == stored.transfer_syntax && p.dataset == stored.dataset {
            Ok(())
        } else {
            Err(format!(
                "{who}: returned in {}, not as stored",
                p.transfer_syntax
            ))
        }
    };
    match expect {
        Expect::Ts(ts) => {
            if p.transfer_syntax != ts {
                return Err(format!(
                    "{who}: returned in {}, expected {ts}",
                    p.transfer_syntax
                ));
            }
            same_pixels()
        }
        Expect::AsStored => as_stored(),
        Expect::Star if stored.transfer_syntax == IMPLICIT => {
            if p.transfer_syntax == IMPLICIT || p.transfer_syntax == BIG_ENDIAN {
                return Err(format!(
                    "{who}: returned in {} ({NOT_FOR_WEB})",
                    p.transfer_syntax
                ));
            }
            same_pixels()
        }
        Expect::Star => as_stored(),
        Expect::NotIn(list) => {
            if list.contains(&p.transfer_syntax.as_str()) {
                return Err(format!("{who}: returned in {}", p.transfer_syntax));
            }
            same_pixels()
        }
        Expect::NotAcceptable => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wado_rs_transfer_syntax_follows_ps3_18_8_7_3() {
    let Some(f) = Fixtures::make(&["pydicom"]) else {
        return;
    };
    // What was stored, and the pixel values each instance must keep: the RLE instance's
    // decoded pixels are those of MR_small.dcm, of which it is the lossless compression.
    let reference =
        pixel_data(&std::fs::read(testdata_dir().join("pydicom/MR_small.dcm")).unwrap())
            .expect("MR_small pixel data");
    let mut sent = BTreeMap::new();
    for path in &f.wado {
        let p = Part10::read(path).unwrap();
        let px = if p.transfer_syntax == RLE {
            reference.clone()
        } else {
            pixel_data(&p.bytes).unwrap()
        };
        sent.insert(p.sop_instance.clone(), (p, px));
    }
    assert_eq!(
        sent.values()
            .map(|(p, _)| p.transfer_syntax.as_str())
            .collect::<BTreeSet<_>>(),
        [IMPLICIT, EXPLICIT, RLE].into_iter().collect(),
        "the WADO-RS study holds one instance per stored syntax"
    );
    for b in backends() {
        let node = Node::start(&b).await;
        let web = Web::new(&node);
        web.stow(&f.wado).await;
        let (w, ws) = (f.uid("W"), f.uid("Ws"));
        let mut fails = Vec::new();
        for (section, resource, ts, expect) in WADO {
            let (path, count) = if *resource == "W" {
                (format!("/studies/{w}"), 3)
            } else {
                (
                    format!("/studies/{w}/series/{ws}/instances/{}", f.uid(resource)),
                    1,
                )
            };
            let mut accept = "multipart/related; type=\"application/dicom\"".to_owned();
            if !ts.is_empty() {
                accept.push_str(&format!("; transfer-syntax={ts}"));
            }
            let shown = format!("GET {resource} Accept: {accept} [{section}]");
            let r = web.get(&path, &accept).await;
            match (expect, r.status) {
                (Expect::NotAcceptable, 406) | (Expect::NotIn(_), 406) => continue,
                (Expect::NotAcceptable, s) => {
                    fails.push(format!("{shown}: status {s}, expected 406"));
                    continue;
                }
                (_, 200) => {}
                (_, s) => {
                    fails.push(format!("{shown}: status {s}: {}", r.text()));
                    continue;
                }
            }
            let ct = r.header("content-type");
            if !ct.starts_with("multipart/related") || !ct.contains("application/dicom") {
                fails.push(format!("{shown}: Content-Type {ct:?}"));
            }
            match multipart(&ct, &r.body) {
                Err(e) => fails.push(format!("{shown}: {e}")),
                Ok(parts) => {
                    if parts.len() != count {
                        fails.push(format!("{shown}: {} parts, expected {count}", parts.len()));
                    }
                    for (headers, bytes) in &parts {
                        if let Err(e) = check_part(headers, bytes, &sent, *expect) {
                            fails.push(format!("{shown}: {e}"));
                        }
                    }
                }
            }
        }
        assert!(
            fails.is_empty(),
            "[{}] {} of {} WADO-RS transfer syntax rows fail:\n{}",
            b.name,
            fails.len(),
            WADO.len(),
            fails.join("\n")
        );
    }
}
