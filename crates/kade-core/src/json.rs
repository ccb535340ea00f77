//! An instance's DICOM JSON (PS3.18 §F.2) without bulk data, stored in the index so that
//! WADO-RS `/metadata` is answered without reading blobs.
//!
//! Top-level binary values longer than [`BULK_THRESHOLD`] bytes, and Pixel Data, are not
//! inlined: they become `{"vr": .., "BulkDataURI": "bulkdata/GGGGEEEE"}`. The URI is
//! relative to the instance's WADO-RS URL; the DICOMweb layer makes it absolute when serving.
//!
//! Values follow PS3.18 Table F.2.3-1 ([`conform`]): DS and IS values are JSON Numbers
//! (dicom-json writes them as the strings they were), SV and UV Numbers while a JavaScript
//! client can hold them exactly, and an empty value of a multi-valued element is `null`
//! (§F.2.5). The table allows a String for DS, IS, SV and UV "to preserve the original format
//! … or if needed to avoid losing precision": Kade keeps a String where a Number would change
//! the value (more significant digits than a double holds, beyond 2^53) or where the stored
//! text is not a number at all, so nothing the modality wrote is lost.

use dicom_object::InMemDicomObject;
use serde_json::{Map, Value};

/// Binary values longer than this many bytes are referenced, not inlined.
pub const BULK_THRESHOLD: usize = 1024;

/// Serialises `obj` (a dataset read up to, not including, Pixel Data) as DICOM JSON.
/// `pixel_data_vr` is the VR of the Pixel Data element the full instance carries, if any.
///
/// # Errors
/// Fails only if dicom-json cannot represent a value (a value whose VR is inconsistent).
pub fn metadata_json(
    obj: &InMemDicomObject,
    pixel_data_vr: Option<&str>,
) -> Result<String, serde_json::Error> {
    let mut value = dicom_json::to_value(obj)?;
    if let Value::Object(map) = &mut value {
        conform(map);
        strip_top_level(map);
        if let Some(vr) = pixel_data_vr {
            map.insert("7FE00010".into(), bulk_ref("7FE00010", vr));
        }
    }
    serde_json::to_string(&value)
}

fn strip_top_level(map: &mut Map<String, Value>) {
    // Group lengths (gggg0000) are not part of DICOM JSON.
    map.retain(|tag, _| !tag.ends_with("0000"));
    let long: Vec<(String, String)> = map
        .iter()
        .filter_map(|(tag, el)| {
            let b64 = el.get("InlineBinary")?.as_str()?;
            // base64: 4 characters for every 3 bytes.
            let vr = el.get("vr")?.as_str()?;
            (b64.len() / 4 * 3 > BULK_THRESHOLD).then(|| (tag.clone(), vr.to_owned()))
        })
        .collect();
    for (tag, vr) in long {
        let r = bulk_ref(&tag, &vr);
        map.insert(tag, r);
    }
}

/// Brings the values of a DICOM JSON object (and of its sequence items) to the JSON types of
/// PS3.18 Table F.2.3-1 and the empty-value rule of §F.2.5: see the module documentation.
pub fn conform(map: &mut Map<String, Value>) {
    for el in map.values_mut() {
        let Value::Object(el) = el else { continue };
        let vr = el
            .get("vr")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let Some(Value::Array(values)) = el.get_mut("Value") else {
            continue;
        };
        for v in values.iter_mut() {
            match (vr.as_str(), &mut *v) {
                ("SQ", Value::Object(item)) => conform(item),
                (_, Value::String(s)) if s.trim().is_empty() => *v = Value::Null,
                // An empty person name: no component group at all (§F.2.2 writes only the
                // groups present), which is an empty value (§F.2.5).
                ("PN", Value::Object(pn))
                    if pn
                        .values()
                        .all(|g| g.as_str().is_none_or(|g| g.trim().is_empty())) =>
                {
                    *v = Value::Null
                }
                ("DS", Value::String(s)) => *v = decimal(s),
                ("IS" | "SV" | "UV", Value::String(s)) => *v = integer(s),
                ("SV" | "UV", Value::Number(n)) if !n.as_i64().is_some_and(exact_in_double) => {
                    *v = Value::String(n.to_string());
                }
                _ => {}
            }
        }
        if values.iter().all(Value::is_null) {
            // Nothing but empty values: an empty attribute, which has no "Value" (§F.2.5).
            el.remove("Value");
        }
    }
}

/// Largest integer magnitude a JSON (IEEE double) number holds exactly.
const MAX_EXACT: i64 = 1 << 53;

fn exact_in_double(n: i64) -> bool {
    n.unsigned_abs() <= MAX_EXACT as u64
}

/// An IS (or SV/UV written as text) value as a Number, or the trimmed text when it is not an
/// integer a double holds exactly.
fn integer(s: &str) -> Value {
    let t = s.trim();
    match t.strip_prefix('+').unwrap_or(t).parse::<i64>() {
        Ok(n) if exact_in_double(n) && !t.starts_with("+-") => Value::from(n),
        _ => Value::String(t.to_owned()),
    }
}

/// A DS value (PS3.5 §6.2: `[+-]digits[.digits][(e|E)[+-]digits]`, also `.5` and `5.`) as a
/// Number with the same value, or the trimmed text when it is not a decimal string or has more
/// significant digits than a double keeps (15).
fn decimal(s: &str) -> Value {
    let t = s.trim();
    let text = Value::String(t.to_owned());
    if !is_decimal_string(t) {
        return text;
    }
    let (mantissa, _) = t.split_once(['e', 'E']).unwrap_or((t, ""));
    let significant = mantissa
        .bytes()
        .filter(u8::is_ascii_digit)
        .skip_while(|&b| b == b'0')
        .count();
    let Ok(x) = t.parse::<f64>() else { return text };
    if significant > 15 || !x.is_finite() {
        return text;
    }
    // An integral value within range is written as an integer (1, not 1.0).
    if x.fract() == 0.0 && x.abs() < MAX_EXACT as f64 {
        return Value::from(x as i64);
    }
    serde_json::Number::from_f64(x).map_or(text, Value::Number)
}

/// Whether `t` has the form of a DS value (PS3.5 §6.2, VR DS): an optional sign, digits with
/// at most one decimal point (and at least one digit), an optional exponent.
fn is_decimal_string(t: &str) -> bool {
    let (mantissa, exponent) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (t, None),
    };
    let unsigned = |s: &str| s.strip_prefix(['+', '-']).unwrap_or(s).to_owned();
    let m = unsigned(mantissa);
    let (whole, frac) = m.split_once('.').unwrap_or((&m, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(whole) && digits(frac) && !(whole.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = unsigned(e);
        !e.is_empty() && digits(&e)
    });
    mantissa_ok && exponent_ok
}

fn bulk_ref(tag: &str, vr: &str) -> Value {
    serde_json::json!({ "vr": vr, "BulkDataURI": format!("bulkdata/{tag}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    #[test]
    fn large_binaries_become_references() {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from("P1"),
        ));
        o.put(DataElement::new(
            tags::ENCAPSULATED_DOCUMENT,
            VR::OB,
            PrimitiveValue::from(vec![7u8; 4096]),
        ));
        o.put(DataElement::new(
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            VR::US,
            PrimitiveValue::from([256u16, 0, 16]),
        ));
        let v: Value = serde_json::from_str(&metadata_json(&o, Some("OW")).unwrap()).unwrap();
        assert_eq!(v["00100020"]["Value"][0], "P1");
        assert_eq!(v["00420011"]["BulkDataURI"], "bulkdata/00420011");
        assert!(v["00420011"].get("InlineBinary").is_none());
        assert_eq!(v["7FE00010"]["vr"], "OW");
        assert_eq!(v["00281101"]["Value"][0], 256);
    }

    /// PS3.18 Table F.2.3-1 and §F.2.5, for every VR whose JSON type Kade changes, as
    /// dicom-json hands them over.
    #[test]
    fn values_take_the_json_types_of_table_f_2_3_1() {
        let mut m: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "00180050": {"vr": "DS", "Value": ["5.0"]},
            "00280030": {"vr": "DS", "Value": [" 0.661468", "0.661468 "]},
            "00181310": {"vr": "DS", "Value": ["+1", ".5", "5.", "-2.5E-3", "1e3"]},
            "00181311": {"vr": "DS", "Value": ["1", "", "3"]},
            "00181312": {"vr": "DS", "Value": ["abc", "1.2.3", "0.12345678901234567", "1e999"]},
            "00200013": {"vr": "IS", "Value": ["1"]},
            "00200012": {"vr": "IS", "Value": ["+7", " -3 ", "x", "99999999999999999"]},
            "00201002": {"vr": "IS", "Value": [""]},
            "00101010": {"vr": "AS", "Value": ["", "045Y"]},
            "00100020": {"vr": "LO", "Value": ["P1"]},
            "0072006A": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}, {}, {"Ideographic": "山田"}]},
            "00101005": {"vr": "PN", "Value": [{}]},
            "00660040": {"vr": "SV", "Value": [5, "9007199254740993"]},
            "00660041": {"vr": "UV", "Value": [9007199254740993u64]},
            "00081115": {"vr": "SQ", "Value": [{
                "00200013": {"vr": "IS", "Value": ["12"]},
                "00081140": {"vr": "SQ", "Value": [{"00181050": {"vr": "DS", "Value": ["0.5"]}}]}
            }]}
        }))
        .unwrap();
        conform(&mut m);
        let v = Value::Object(m);
        let expect = [
            ("00180050", serde_json::json!([5])),
            ("00280030", serde_json::json!([0.661468, 0.661468])),
            ("00181310", serde_json::json!([1, 0.5, 5, -0.0025, 1000])),
            ("00181311", serde_json::json!([1, null, 3])),
            (
                "00181312",
                serde_json::json!(["abc", "1.2.3", "0.12345678901234567", "1e999"]),
            ),
            ("00200013", serde_json::json!([1])),
            (
                "00200012",
                serde_json::json!([7, -3, "x", "99999999999999999"]),
            ),
            ("00101010", serde_json::json!([null, "045Y"])),
            ("00100020", serde_json::json!(["P1"])),
            (
                "0072006A",
                serde_json::json!([{"Alphabetic": "Doe^John"}, null, {"Ideographic": "山田"}]),
            ),
            ("00660040", serde_json::json!([5, "9007199254740993"])),
            ("00660041", serde_json::json!(["9007199254740993"])),
        ];
        for (tag, want) in expect {
            assert_eq!(v[tag]["Value"], want, "{tag}");
        }
        assert!(
            v["00201002"].get("Value").is_none(),
            "an empty IS has no Value"
        );
        assert!(
            v["00101005"].get("Value").is_none(),
            "an empty PN has no Value"
        );
        assert_eq!(
            v["00081115"]["Value"][0]["00200013"]["Value"],
            serde_json::json!([12])
        );
        assert_eq!(
            v["00081115"]["Value"][0]["00081140"]["Value"][0]["00181050"]["Value"],
            serde_json::json!([0.5])
        );
    }

    #[test]
    fn decimal_strings_have_the_form_of_ps3_5() {
        for ok in ["0", "-1", "+1", ".5", "5.", "1.5e3", "1.5E-3", "-.5e+2"] {
            assert!(is_decimal_string(ok), "{ok}");
        }
        for bad in [
            "", ".", "+", "1e", "e3", "1.2.3", "1,5", "0x10", "NaN", "inf", "1 2",
        ] {
            assert!(!is_decimal_string(bad), "{bad}");
        }
    }

    #[test]
    fn stored_instances_get_numbers() {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            tags::SLICE_THICKNESS,
            VR::DS,
            PrimitiveValue::from("5.0"),
        ));
        o.put(DataElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from("12 "),
        ));
        let v: Value = serde_json::from_str(&metadata_json(&o, None).unwrap()).unwrap();
        assert_eq!(v["00180050"]["Value"], serde_json::json!([5]));
        assert_eq!(v["00200013"]["Value"], serde_json::json!([12]));
    }
}
