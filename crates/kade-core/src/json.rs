//! An instance's DICOM JSON (PS3.18 §F.2) without bulk data, stored in the index so that
//! WADO-RS `/metadata` is answered without reading blobs.
//!
//! Top-level binary values longer than [`BULK_THRESHOLD`] bytes, and Pixel Data, are not
//! inlined: they become `{"vr": .., "BulkDataURI": "bulkdata/GGGGEEEE"}`. The URI is
//! relative to the instance's WADO-RS URL; the DICOMweb layer makes it absolute when serving.

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
}
