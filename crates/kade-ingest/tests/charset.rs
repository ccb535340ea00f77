//! Instances whose text uses ISO 2022 code extensions are indexed and stored decoded.

use kade_ingest::parse::parse_bytes;

fn sample(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/pydicom-charset")
        .join(name);
    std::fs::read(path).unwrap()
}

/// The names are those pydicom 3 decodes from these samples.
#[test]
fn names_in_code_extensions_are_indexed_and_stored_decoded() {
    let cases = [
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
        ("chrKoreanMulti.dcm", "김희중"),
        ("chrJapMulti.dcm", "やまだ^たろう"),
    ];
    for (name, patient) in cases {
        let parsed = parse_bytes(&sample(name)).unwrap();
        assert_eq!(
            parsed.attrs.patient.name.as_deref(),
            Some(patient),
            "{name}"
        );
        let json: serde_json::Value = serde_json::from_str(&parsed.metadata_json).unwrap();
        assert_eq!(json["00080005"]["Value"][0], "ISO_IR 192", "{name}");
        let groups = &json["00100010"]["Value"][0];
        let mut expected = patient.split('=');
        for group in ["Alphabetic", "Ideographic", "Phonetic"] {
            match expected.next() {
                Some(g) if !g.is_empty() => assert_eq!(groups[group], g, "{name} {group}"),
                _ => assert!(groups.get(group).is_none(), "{name} {group}"),
            }
        }
        assert!(!parsed.metadata_json.contains("\\u001b"), "{name}");
    }
}

/// Data sets without code extensions keep their character set.
#[test]
fn other_character_sets_are_stored_as_they_were() {
    let parsed = parse_bytes(&sample("chrFren.dcm")).unwrap();
    assert_eq!(parsed.attrs.patient.name.as_deref(), Some("Buc^Jérôme"));
    let json: serde_json::Value = serde_json::from_str(&parsed.metadata_json).unwrap();
    assert_eq!(json["00080005"]["Value"][0], "ISO_IR 100");
}
