//! Text decoding by Specific Character Set (0008,0005), including the ISO 2022 code
//! extensions of PS3.5 §6.1.2.4 and §6.1.2.5 (Japanese, Korean and Chinese: PS3.5 Annexes H,
//! I and K) and text that arrived with VR UN (PS3.5 §6.2.2).
//!
//! dicom-rs picks one codec from the first value of (0008,0005) and never switches on escape
//! sequences, so a name in `\ISO 2022 IR 87` comes out of it with the raw escape sequences
//! in it. [`decode_code_extensions`] repairs such a parsed data set in place: it turns each
//! text value back into the bytes dicom-rs decoded and decodes them again here, leaving the
//! data set in UTF-8 (`ISO_IR 192`).

use dicom_core::header::Header;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataDictionary, DataElement, Tag, VR, dictionary::VirtualVr};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_encoding::text::{SpecificCharacterSet, TextCodec};
use dicom_object::InMemDicomObject;
use encoding_rs::Encoding;

const ESC: u8 = 0x1B;

/// A graphic character set that an escape sequence (PS3.3 Tables C.12-3 and C.12-4) or the
/// first value of (0008,0005) designates to G0 (the bytes 0x21..=0x7E) or G1 (0xA0..=0xFF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Set {
    /// ISO-IR 6, ASCII (G0).
    Ascii,
    /// ISO-IR 14, the JIS X 0201 Romaji half (G0). Its 0x5C (a yen sign) and 0x7E (an
    /// overline) are read as ASCII, as Shift_JIS decoders and pydicom do: in DICOM 0x5C is the
    /// value delimiter whatever G0 holds.
    JisRoman,
    /// ISO-IR 87, JIS X 0208 kanji and kana (G0, two bytes a character).
    Jis0208,
    /// ISO-IR 159, JIS X 0212 supplementary kanji (G0, two bytes a character).
    Jis0212,
    /// ISO-IR 13, the JIS X 0201 katakana half (G1).
    Katakana,
    /// ISO-IR 100, Latin-1 (G1); also what undefined G1 bytes are read as, so that no byte is lost.
    Latin1,
    /// Another 96-character set of ISO 8859 or TIS 620 (G1), one byte a character.
    SingleByte(&'static Encoding),
    /// ISO-IR 149, KS X 1001 Hangul and Hanja (G1, two bytes a character).
    Ksx1001,
    /// ISO-IR 58, GB 2312 (G1, two bytes a character).
    Gb2312,
}

impl Set {
    fn double_byte_g0(self) -> bool {
        matches!(self, Set::Jis0208 | Set::Jis0212)
    }
}

/// The sets designated to G0 and G1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    g0: Set,
    g1: Set,
}

/// How a Specific Character Set encodes text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// ISO 2022 (PS3.5 §6.1.2.5.4 a to c): single-byte sets and code extensions, starting from
    /// this initial designation.
    Iso2022(State),
    /// A variable-length code outside ISO 2022 (PS3.5 §6.1.2.5.4 d): UTF-8, GB18030 or GBK.
    Whole(&'static Encoding),
}

/// The character sets named by the values of a Specific Character Set (0008,0005).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharacterSets {
    kind: Kind,
    code_extensions: bool,
}

impl Default for CharacterSets {
    /// The default character repertoire (ISO-IR 6), read as Latin-1 so that no byte is lost.
    fn default() -> Self {
        CharacterSets {
            kind: Kind::Iso2022(State {
                g0: Set::Ascii,
                g1: Set::Latin1,
            }),
            code_extensions: false,
        }
    }
}

/// The initial designation of a defined term used as value 1 (PS3.5 §6.1.2.5.4), `None` for an
/// unknown term. `g1` is `None` where value 1 leaves G1 undefined.
fn initial(term: &str) -> Option<Kind> {
    let term = term.trim();
    let sb = |e: &'static Encoding| Set::SingleByte(e);
    let (g0, g1) = match term.strip_prefix("ISO 2022 ").unwrap_or(term) {
        "" | "ISO_IR 6" | "IR 6" => (Set::Ascii, None),
        "ISO_IR 100" | "IR 100" => (Set::Ascii, Some(Set::Latin1)),
        "ISO_IR 101" | "IR 101" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_2))),
        "ISO_IR 109" | "IR 109" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_3))),
        "ISO_IR 110" | "IR 110" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_4))),
        "ISO_IR 126" | "IR 126" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_7))),
        "ISO_IR 127" | "IR 127" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_6))),
        "ISO_IR 138" | "IR 138" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_8))),
        "ISO_IR 144" | "IR 144" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_5))),
        // ISO 8859-9 and TIS 620 are the upper halves of these two.
        "ISO_IR 148" | "IR 148" => (Set::Ascii, Some(sb(encoding_rs::WINDOWS_1254))),
        "ISO_IR 166" | "IR 166" => (Set::Ascii, Some(sb(encoding_rs::WINDOWS_874))),
        "ISO_IR 203" | "IR 203" => (Set::Ascii, Some(sb(encoding_rs::ISO_8859_15))),
        "ISO_IR 13" | "IR 13" => (Set::JisRoman, Some(Set::Katakana)),
        // Multi-byte sets are not meant as value 1, but read them if they are.
        "IR 87" => (Set::Jis0208, None),
        "IR 159" => (Set::Jis0212, None),
        "IR 149" | "ISO_IR 149" => (Set::Ascii, Some(Set::Ksx1001)),
        "IR 58" | "ISO_IR 58" => (Set::Ascii, Some(Set::Gb2312)),
        "ISO_IR 192" => return Some(Kind::Whole(encoding_rs::UTF_8)),
        "GB18030" => return Some(Kind::Whole(encoding_rs::GB18030)),
        "GBK" => return Some(Kind::Whole(encoding_rs::GBK)),
        _ => return None,
    };
    Some(Kind::Iso2022(State {
        g0,
        g1: g1.unwrap_or(Set::Latin1),
    }))
}

/// The escape sequence at the start of `b` (which starts with ESC): its length and the
/// designation it makes (PS3.3 Tables C.12-3 and C.12-4), `None` if it is not one of them.
fn escape(b: &[u8]) -> Option<(usize, bool, Set)> {
    let sb = |e: &'static Encoding| Set::SingleByte(e);
    // (G0?, set)
    let (len, g0, set) = match b.get(1..)? {
        [b'(', b'B', ..] => (3, true, Set::Ascii),
        [b'(', b'J', ..] => (3, true, Set::JisRoman),
        [b'$', b'B', ..] => (3, true, Set::Jis0208),
        [b'$', b'(', b'B', ..] => (4, true, Set::Jis0208),
        [b'$', b'(', b'D', ..] => (4, true, Set::Jis0212),
        [b')', b'I', ..] => (3, false, Set::Katakana),
        [b'$', b')', b'C', ..] => (4, false, Set::Ksx1001),
        [b'$', b')', b'A', ..] => (4, false, Set::Gb2312),
        [b'-', f, ..] => (
            3,
            false,
            match f {
                b'A' => Set::Latin1,
                b'B' => sb(encoding_rs::ISO_8859_2),
                b'C' => sb(encoding_rs::ISO_8859_3),
                b'D' => sb(encoding_rs::ISO_8859_4),
                b'F' => sb(encoding_rs::ISO_8859_7),
                b'G' => sb(encoding_rs::ISO_8859_6),
                b'H' => sb(encoding_rs::ISO_8859_8),
                b'L' => sb(encoding_rs::ISO_8859_5),
                b'M' => sb(encoding_rs::WINDOWS_1254),
                b'T' => sb(encoding_rs::WINDOWS_874),
                b'b' => sb(encoding_rs::ISO_8859_15),
                _ => return None,
            },
        ),
        _ => return None,
    };
    Some((len, g0, set))
}

/// Where the character sets return to their initial designation (PS3.5 §6.1.2.5.3): at the
/// end of a line or page and before other control characters, at the end of each value, and in
/// a person name before `^` and `=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delimiters {
    /// Multi-valued text (SH, LO, UC, and values of unknown VR): 0x5C ends a value.
    Values,
    /// Person names: 0x5C ends a value, and `^` and `=` separate components and groups.
    PersonName,
    /// ST, LT and UT: one value, in which 0x5C is a character.
    Text,
}

/// Appends the decoding of a run of bytes of one set to `out`.
fn flush(set: Set, run: &mut Vec<u8>, out: &mut String) {
    if run.is_empty() {
        return;
    }
    let decode = |e: &'static Encoding, bytes: &[u8], out: &mut String| {
        out.push_str(&e.decode_without_bom_handling(bytes).0);
    };
    match set {
        Set::Ascii | Set::JisRoman | Set::Latin1 => out.extend(run.iter().map(|&b| b as char)),
        // The EUC forms of these sets are their ISO 2022 bytes with the high bit set.
        Set::Jis0208 => {
            let euc: Vec<u8> = run.iter().map(|b| b | 0x80).collect();
            decode(encoding_rs::EUC_JP, &euc, out);
        }
        // EUC-JP reaches JIS X 0212 through the single shift 0x8F.
        Set::Jis0212 => {
            let mut euc = Vec::with_capacity(run.len() / 2 * 3 + 1);
            for pair in run.chunks(2) {
                euc.push(0x8F);
                euc.extend(pair.iter().map(|b| b | 0x80));
            }
            decode(encoding_rs::EUC_JP, &euc, out);
        }
        Set::Katakana => out.extend(run.iter().map(|&b| match b {
            0xA1..=0xDF => char::from_u32(0xFF61 + u32::from(b - 0xA1)).unwrap_or('\u{FFFD}'),
            _ => '\u{FFFD}',
        })),
        Set::SingleByte(e) => decode(e, run, out),
        Set::Ksx1001 => decode(encoding_rs::EUC_KR, run, out),
        Set::Gb2312 => decode(encoding_rs::GBK, run, out),
    }
    run.clear();
}

/// Decodes ISO 2022 text that starts in `init` (PS3.5 §6.1.2.5): bytes below 0x80 in the set
/// designated to G0, the others in the one designated to G1, escape sequences switching
/// them. Returns the values (one for [`Delimiters::Text`]).
fn decode_iso2022(bytes: &[u8], init: State, delimiters: Delimiters) -> Vec<String> {
    let mut values = Vec::new();
    let mut out = String::with_capacity(bytes.len());
    let mut run = Vec::new();
    let mut run_set = Set::Ascii;
    let mut st = init;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == ESC {
            flush(run_set, &mut run, &mut out);
            match escape(&bytes[i..]) {
                Some((len, g0, set)) => {
                    if g0 {
                        st.g0 = set;
                    } else {
                        st.g1 = set;
                    }
                    i += len;
                }
                None => {
                    // Not a designation this knows: kept as it came.
                    out.push('\u{1b}');
                    i += 1;
                }
            }
            continue;
        }
        let set = if b >= 0x80 {
            st.g1
        } else if b <= 0x20 || b == 0x7F {
            // Control characters and SPACE are never part of a two-byte G0 character.
            if b < 0x20 {
                st = init;
            }
            Set::Ascii
        } else if st.g0.double_byte_g0() {
            st.g0
        } else {
            match (b, delimiters) {
                (b'\\', Delimiters::Values | Delimiters::PersonName) => {
                    flush(run_set, &mut run, &mut out);
                    values.push(std::mem::take(&mut out));
                    st = init;
                    i += 1;
                    continue;
                }
                (b'^' | b'=', Delimiters::PersonName) => st = init,
                _ => {}
            }
            st.g0
        };
        if set != run_set {
            flush(run_set, &mut run, &mut out);
            run_set = set;
        }
        run.push(b);
        i += 1;
    }
    flush(run_set, &mut run, &mut out);
    values.push(out);
    values
}

impl CharacterSets {
    /// The character sets of the values of (0008,0005). No value, or an empty or unknown value
    /// 1, means the default repertoire (PS3.5 §6.1.2.5.4), whose G1 is read as Latin-1 so
    /// that no byte is lost.
    pub fn from_values<S: AsRef<str>>(values: &[S]) -> Self {
        let code_extensions = values.len() > 1
            || values
                .iter()
                .any(|v| v.as_ref().trim().starts_with("ISO 2022"));
        let kind = values
            .first()
            .and_then(|v| initial(v.as_ref()))
            .unwrap_or(CharacterSets::default().kind);
        CharacterSets {
            kind,
            code_extensions,
        }
    }

    /// The character sets of a data set's (0008,0005), if it has one.
    pub fn of(obj: &InMemDicomObject) -> Option<Self> {
        values_of(obj).map(|v| Self::from_values(&v))
    }

    /// Whether these are code extensions (PS3.5 §6.1.2.4): more than one value, or an
    /// `ISO 2022` term.
    pub fn has_code_extensions(&self) -> bool {
        self.code_extensions
    }

    /// Decodes the bytes of an element value of this VR into its values (a single one for
    /// ST, LT and UT, whose 0x5C is a character; VR UN is taken as multi-valued text).
    pub fn decode(&self, bytes: &[u8], vr: VR) -> Vec<String> {
        let delimiters = match vr {
            VR::PN => Delimiters::PersonName,
            VR::ST | VR::LT | VR::UT => Delimiters::Text,
            _ => Delimiters::Values,
        };
        match self.kind {
            Kind::Iso2022(init) => decode_iso2022(bytes, init, delimiters),
            Kind::Whole(e) => {
                // Decoded first: a GB18030 or GBK second byte may be 0x5C.
                let s = e.decode_without_bom_handling(bytes).0;
                match delimiters {
                    Delimiters::Text => vec![s.into_owned()],
                    _ => s.split('\\').map(str::to_owned).collect(),
                }
            }
        }
    }
}

/// Decodes raw element bytes as text in the character sets named by
/// `specific_character_set` (the value of (0008,0005), its values separated by `\`; none
/// means the default repertoire, read as Latin-1 so that no byte is lost). Multiple values
/// come back separated by `\`.
pub fn decode_text(bytes: &[u8], specific_character_set: Option<&str>) -> String {
    let values: Vec<&str> = specific_character_set
        .map(|s| s.split('\\').collect())
        .unwrap_or_default();
    CharacterSets::from_values(&values)
        .decode(bytes, VR::UN)
        .join("\\")
}

fn values_of(obj: &InMemDicomObject) -> Option<Vec<String>> {
    let e = obj.get(tags::SPECIFIC_CHARACTER_SET)?;
    match e.value() {
        Value::Primitive(PrimitiveValue::Strs(v)) => Some(v.iter().cloned().collect()),
        Value::Primitive(PrimitiveValue::Str(v)) => {
            Some(v.split('\\').map(str::to_owned).collect())
        }
        Value::Primitive(PrimitiveValue::Empty) => Some(Vec::new()),
        Value::Primitive(PrimitiveValue::U8(b)) => Some(
            String::from_utf8_lossy(b)
                .split('\\')
                .map(str::to_owned)
                .collect(),
        ),
        _ => None,
    }
}

/// Whether the text of an item (or data set) with these own character sets, inside one with
/// `inherited` ones, needs [`decode_code_extensions`]: code extensions, or a change of
/// character set, which dicom-rs carries past the end of the item.
fn item_needs_decoding(obj: &InMemDicomObject, inherited: Option<&[String]>) -> bool {
    let own = values_of(obj);
    if let Some(own) = &own {
        if CharacterSets::from_values(own).has_code_extensions() {
            return true;
        }
        if inherited.is_some_and(|parent| !same_terms(parent, own)) {
            return true;
        }
    }
    let scope = own.as_deref().or(inherited).or(Some(&[]));
    obj.iter().any(|e| {
        e.vr() == VR::SQ
            && e.items()
                .is_some_and(|items| items.iter().any(|it| item_needs_decoding(it, scope)))
    })
}

fn same_terms(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.trim() == y.trim())
}

/// The bytes that dicom-rs decoded into `s` with `codec`. Its decoders write a byte they
/// cannot decode as `\` and three octal digits; in values that cannot hold a `\` (all but
/// ST, LT and UT) those are turned back into the byte.
fn reencode(codec: &SpecificCharacterSet, s: &str, octal_escapes: bool) -> Option<Vec<u8>> {
    if !octal_escapes || !s.contains('\\') {
        return codec.encode(s).ok();
    }
    let mut out = Vec::with_capacity(s.len());
    for (n, part) in s.split('\\').enumerate() {
        let rest = match part.as_bytes() {
            [a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', ..] if n > 0 => {
                out.push(((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'));
                &part[3..]
            }
            _ => {
                if n > 0 {
                    out.push(b'\\');
                }
                part
            }
        };
        out.extend(codec.encode(rest).ok()?);
    }
    Some(out)
}

fn is_text_vr(vr: VR) -> bool {
    matches!(
        vr,
        VR::PN | VR::LO | VR::SH | VR::ST | VR::LT | VR::UC | VR::UT
    )
}

/// Decodes again, in `scope`, the text values of one item (or the data set), which dicom-rs
/// decoded with `parsed`: the codec its parser held, which it takes from the first value of
/// each (0008,0005) it meets, at any depth, and keeps past the end of the item.
fn redecode(
    obj: &mut InMemDicomObject,
    inherited: &CharacterSets,
    parsed: &mut SpecificCharacterSet,
) {
    let own = CharacterSets::of(obj);
    let scope = own.clone().unwrap_or_else(|| inherited.clone());
    let tag_vrs: Vec<(Tag, VR)> = obj.iter().map(|e| (e.tag(), e.vr())).collect();
    for (tag, vr) in tag_vrs {
        if tag == tags::SPECIFIC_CHARACTER_SET {
            if vr == VR::CS
                && let Some(cs) = values_of(obj)
                    .and_then(|v| v.first().and_then(|t| SpecificCharacterSet::from_code(t)))
            {
                *parsed = cs;
            }
            continue;
        }
        match vr {
            VR::SQ => {
                obj.update_value(tag, |v| {
                    if let Some(items) = v.items_mut() {
                        for item in items.iter_mut() {
                            redecode(item, &scope, parsed);
                        }
                    }
                });
            }
            VR::UN => {
                let dict_vr = StandardDataDictionary
                    .by_tag(tag)
                    .and_then(|entry| match entry.vr {
                        VirtualVr::Exact(vr) => Some(vr),
                        _ => None,
                    });
                let Some(dict_vr) = dict_vr.filter(|&v| is_text_vr(v)) else {
                    continue;
                };
                // Raw bytes: decoded here for the first time, kept as UTF-8 bytes.
                obj.update_value(tag, |v| {
                    if let Value::Primitive(PrimitiveValue::U8(bytes)) = v {
                        let mut utf8 = scope.decode(bytes, dict_vr).join("\\").into_bytes();
                        if utf8.len() % 2 == 1 {
                            utf8.push(b' ');
                        }
                        *v = Value::Primitive(PrimitiveValue::U8(utf8.into()));
                    }
                });
            }
            vr if is_text_vr(vr) => {
                let octal = !matches!(vr, VR::ST | VR::LT | VR::UT);
                obj.update_value(tag, |v| {
                    let Value::Primitive(p) = v else { return };
                    let (bytes, was_str) = match &*p {
                        PrimitiveValue::Str(s) => (reencode(parsed, s, octal), true),
                        PrimitiveValue::Strs(vals) => {
                            let mut bytes = Some(Vec::new());
                            for (n, s) in vals.iter().enumerate() {
                                match (bytes.as_mut(), reencode(parsed, s, octal)) {
                                    (Some(out), Some(b)) => {
                                        if n > 0 {
                                            out.push(b'\\');
                                        }
                                        out.extend(b);
                                    }
                                    _ => bytes = None,
                                }
                            }
                            (bytes, false)
                        }
                        _ => return,
                    };
                    // Not bytes dicom-rs made: left as they are.
                    let Some(bytes) = bytes else { return };
                    let mut values = scope.decode(&bytes, vr);
                    *p = if was_str && values.len() == 1 {
                        PrimitiveValue::Str(values.remove(0))
                    } else {
                        PrimitiveValue::Strs(values.into_iter().collect())
                    };
                });
            }
            _ => {}
        }
    }
    if own.is_some() {
        obj.put(utf8_element());
    }
}

fn utf8_element() -> DataElement<InMemDicomObject> {
    DataElement::new(
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        PrimitiveValue::from("ISO_IR 192"),
    )
}

/// Decodes in place the text of a data set that dicom-rs parsed but could not decode: one
/// whose Specific Character Set (0008,0005) uses ISO 2022 code extensions (PS3.5 §6.1.2.4,
/// §6.1.2.5), or one with a sequence item whose own (0008,0005) differs from its parent's
/// (PS3.5 §7.5.1 lets an item have its own; dicom-rs carries it past the item's end).
///
/// Every text value (VR PN, LO, SH, ST, LT, UC, UT, and UN where the dictionary gives one of
/// these) is then UTF-8, and the data set's and items' (0008,0005) say `ISO_IR 192`.
/// Data sets that need none of this, the great majority, are left untouched, at the cost of a
/// look-up of (0008,0005) and a walk over their sequence items.
///
/// The object must come from a dicom-rs parser that started with the default character set
/// (as `open_file`, `from_reader`, `OpenFileOptions` and `read_dataset_with_ts` do). Returns
/// whether it changed anything.
pub fn decode_code_extensions(obj: &mut InMemDicomObject) -> bool {
    let top = values_of(obj);
    let extended = top
        .as_ref()
        .is_some_and(|v| CharacterSets::from_values(v).has_code_extensions());
    if !extended && !item_needs_decoding(obj, None) {
        return false;
    }
    let mut parsed = SpecificCharacterSet::default();
    redecode(obj, &CharacterSets::default(), &mut parsed);
    obj.put(utf8_element());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_object::OpenFileOptions;
    use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

    #[test]
    fn decodes_latin1_and_utf8() {
        assert_eq!(decode_text(b"M\xfcller", Some("ISO_IR 100")), "Müller");
        assert_eq!(
            decode_text("Müller".as_bytes(), Some("ISO_IR 192")),
            "Müller"
        );
        assert_eq!(decode_text(b"Smith", None), "Smith");
    }

    /// The Patient's Names of pydicom's single-byte samples (testdata/pydicom-charset/
    /// FileInfo.txt), decoded as pydicom 3 decodes them.
    #[test]
    fn decodes_single_byte_sets_as_pydicom() {
        let cases: [(&[u8], &str, &str); 6] = [
            (
                b"\xe2\xc8\xc7\xe6\xea^\xe4\xe6\xd2\xc7\xd1",
                "ISO_IR 127",
                "قباني^لنزار",
            ),
            (b"Buc^J\xe9r\xf4me", "ISO_IR 100", "Buc^Jérôme"),
            (b"\xc4neas^R\xfcdiger", "ISO_IR 100", "Äneas^Rüdiger"),
            (
                b"\xc4\xe9\xef\xed\xf5\xf3\xe9\xef\xf2",
                "ISO_IR 126",
                "Διονυσιος",
            ),
            (
                b"\xf9\xf8\xe5\xef^\xe3\xe1\xe5\xf8\xe4",
                "ISO_IR 138",
                "שרון^דבורה",
            ),
            (b"\xbb\xee\xdace\xdc\xd1yp\xd3", "ISO_IR 144", "Люкceмбypг"),
        ];
        for (bytes, cs, expected) in cases {
            assert_eq!(decode_text(bytes, Some(cs)), expected, "{cs}");
            // The same set through code extensions, designated in each component (PS3.5
            // §6.1.2.5.3: `^` returns G1 to the initial, here undefined, set).
            let esc = [0x1b, b'-', escape_final(cs)];
            let mut escaped = Vec::new();
            for (n, component) in bytes.split(|&b| b == b'^').enumerate() {
                if n > 0 {
                    escaped.push(b'^');
                }
                escaped.extend(esc);
                escaped.extend(component);
            }
            assert_eq!(
                CharacterSets::from_values(&["", &cs.replace("ISO_IR", "ISO 2022 IR")])
                    .decode(&escaped, VR::PN),
                [expected],
                "{cs} by escape sequence"
            );
        }
        assert_eq!(
            decode_text(b"Wang^XiaoDong=\xcd\xf5^\xd0\xa1\xb6\xab=", Some("GB18030")),
            "Wang^XiaoDong=王^小东="
        );
        assert_eq!(
            decode_text(
                b"Wang^XiaoDong=\xe7\x8e\x8b^\xe5\xb0\x8f\xe6\x9d\xb1=",
                Some("ISO_IR 192")
            ),
            "Wang^XiaoDong=王^小東="
        );
    }

    fn escape_final(cs: &str) -> u8 {
        match cs {
            "ISO_IR 100" => b'A',
            "ISO_IR 126" => b'F',
            "ISO_IR 127" => b'G',
            "ISO_IR 138" => b'H',
            "ISO_IR 144" => b'L',
            _ => unreachable!(),
        }
    }

    fn pn(cs: &[&str], bytes: &[u8]) -> Vec<String> {
        CharacterSets::from_values(cs).decode(bytes, VR::PN)
    }

    /// PS3.5 Example H.3-1 (pydicom's chrH31.dcm) and Example H.3-2, whose byte values the
    /// standard lists (chrH32.dcm): ま is 0x24 0x5E, a `^` byte inside JIS X 0208.
    #[test]
    fn decodes_the_japanese_examples_of_annex_h() {
        assert_eq!(
            pn(
                &["", "ISO 2022 IR 87"],
                b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
            ),
            ["Yamada^Tarou=山田^太郎=やまだ^たろう"]
        );
        assert_eq!(
            pn(
                &["ISO 2022 IR 13", "ISO 2022 IR 87"],
                b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J=\x1b$B$d$^$@\x1b(J^\x1b$B$?$m$&\x1b(J"
            ),
            ["ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"]
        );
    }

    /// JIS X 0212 (ISO 2022 IR 159), G0 by ESC $ ( D; the expected text is what Python's
    /// iso2022_jp_2 codec makes of these bytes.
    #[test]
    fn decodes_jis_x_0212() {
        assert_eq!(
            pn(
                &["", "ISO 2022 IR 87", "ISO 2022 IR 159"],
                b"\x1b$(D0!0\"\x1b(B^\x1b$B;3\x1b(B"
            ),
            ["丂丄^山"]
        );
    }

    /// PS3.5 Example I.2-1 (pydicom's chrI2.dcm): KS X 1001 in G1, designated anew in each
    /// component.
    #[test]
    fn decodes_the_korean_example_of_annex_i() {
        assert_eq!(
            pn(
                &["", "ISO 2022 IR 149"],
                b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf"
            ),
            ["Hong^Gildong=洪^吉洞=홍^길동"]
        );
    }

    /// PS3.5 Examples K.2-1 and K.3-1, with the byte values the standard lists: GB 2312 in G1,
    /// designated anew in each name component and each line.
    #[test]
    fn decodes_the_chinese_examples_of_annex_k() {
        let cs = ["", "ISO 2022 IR 58"];
        assert_eq!(
            pn(
                &cs,
                b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab= "
            ),
            ["Zhang^XiaoDong=张^小东= "]
        );
        let lt = b"1.\x1b$)A\xb5\xda\xd2\xbb\xd0\xd0\xce\xc4\xd7\xd6\xa1\xa3\r\n\
                   2.\x1b$)A\xb5\xda\xb6\xfe\xd0\xd0\xce\xc4\xd7\xd6\xa1\xa3\r\n\
                   3.\x1b$)A\xb5\xda\xc8\xfd\xd0\xd0\xce\xc4\xd7\xd6\xa1\xa3\r\n";
        assert_eq!(
            CharacterSets::from_values(&cs).decode(lt, VR::LT),
            ["1.第一行文字。\r\n2.第二行文字。\r\n3.第三行文字。\r\n"]
        );
    }

    /// PS3.5 §6.1.2.5.3: at CR, LF, `^`, `=` and the end of a value the initial sets are back,
    /// G1 included (undefined here, so read as Latin-1); but a delimiter byte inside a two-byte
    /// G0 character is part of that character (移 is 0x30 0x5C).
    #[test]
    fn character_sets_return_to_the_initial_ones_at_delimiters() {
        let cs = CharacterSets::from_values(&["", "ISO 2022 IR 58", "ISO 2022 IR 87"]);
        assert_eq!(
            cs.decode(b"\x1b$)A\xb5\xda\r\n\xb5\xda", VR::LT),
            ["第\r\nµÚ"]
        );
        assert_eq!(cs.decode(b"\x1b$)A\xb5\xda^\xb5\xda", VR::PN), ["第^µÚ"]);
        assert_eq!(
            cs.decode(b"\x1b$)A\xb5\xda\\\xb5\xda", VR::LO),
            ["第", "µÚ"]
        );
        assert_eq!(cs.decode(b"\x1b$B0\\\x1b(B\\a", VR::LO), ["移", "a"]);
        // In LT a backslash is a character, and does not end the JIS X 0208 run.
        assert_eq!(cs.decode(b"\x1b$B0\\\x1b(B\\", VR::LT), ["移\\"]);
        // An unknown escape sequence is kept.
        assert_eq!(cs.decode(b"a\x1b$)Zb", VR::LO), ["a\u{1b}$)Zb"]);
    }

    fn sample(name: &str) -> InMemDicomObject {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/pydicom-charset")
            .join(name);
        OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .unwrap()
            .into_inner()
    }

    /// An element's text as Kade indexes it: values separated by `\`, without the padding,
    /// and for PN without empty trailing groups (as pydicom shows a name).
    fn text(obj: &InMemDicomObject, tag: Tag) -> String {
        let e = obj.get(tag).unwrap();
        let s = e.to_str().unwrap();
        let s = s.trim_end_matches([' ', '\0']);
        if e.vr() == VR::PN {
            s.split('\\')
                .map(|v| v.trim_end_matches(['=', ' ']))
                .collect::<Vec<_>>()
                .join("\\")
        } else {
            s.to_owned()
        }
    }

    fn charset(obj: &InMemDicomObject) -> String {
        obj.get(tags::SPECIFIC_CHARACTER_SET)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_owned()
    }

    const PN: Tag = tags::PATIENT_NAME;

    /// pydicom's charset samples, parsed as Kade parses an instance, then decoded: the text
    /// equals what pydicom 3 decodes (the expected values are pydicom 3.0's output).
    #[test]
    fn decodes_the_pydicom_samples_as_pydicom() {
        let h3 = "Yamada^Tarou=山田^太郎=やまだ^たろう";
        let h32 = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう";
        let yamada = "やまだ^たろう";
        let kim = "김희중";
        let multi: [(Tag, String); 5] = [
            (PN, yamada.into()),
            (tags::OTHER_PATIENT_NAMES, format!("{yamada}\\{yamada}")),
            (tags::ADDITIONAL_PATIENT_HISTORY, "たろう".into()),
            (tags::STUDY_DESCRIPTION, "Chest".into()),
            (tags::SERIES_DESCRIPTION, "Chest PA PA".into()),
        ];
        let cases: Vec<(&str, Vec<(Tag, String)>)> = vec![
            (
                "chrH31.dcm",
                vec![(PN, h3.into()), (tags::PATIENT_ID, "H31EXAMPLE".into())],
            ),
            (
                "chrH32.dcm",
                vec![(PN, h32.into()), (tags::STUDY_ID, "H32EXAMPLE".into())],
            ),
            (
                "chrI2.dcm",
                vec![(PN, "Hong^Gildong=洪^吉洞=홍^길동".into())],
            ),
            ("chrJapMulti.dcm", multi.to_vec()),
            ("chrJapMultiExplicitIR6.dcm", multi.to_vec()),
            (
                "chrKoreanMulti.dcm",
                vec![
                    (PN, kim.into()),
                    (tags::OPERATORS_NAME, kim.into()),
                    (tags::OTHER_PATIENT_NAMES, format!("{kim}\\{kim}")),
                    (tags::ADDITIONAL_PATIENT_HISTORY, kim.into()),
                    (tags::MANUFACTURER, "Agfa-Gevaert AG".into()),
                ],
            ),
            (
                "chrSQEncoding.dcm",
                vec![
                    (tags::CODE_VALUE, "Code Value".into()),
                    (tags::REQUESTING_PHYSICIAN, "Doctor^Who^^MD".into()),
                ],
            ),
            (
                "chrSQEncoding1.dcm",
                vec![
                    (tags::CODE_VALUE, "Code Value".into()),
                    (tags::REQUESTING_PHYSICIAN, "Doctor^Who^^MD".into()),
                ],
            ),
        ];
        for (name, expected) in cases {
            let mut obj = sample(name);
            assert!(decode_code_extensions(&mut obj), "{name}");
            assert_eq!(charset(&obj), "ISO_IR 192", "{name}");
            for (tag, value) in expected {
                assert_eq!(text(&obj, tag), value, "{name} {tag}");
            }
        }
        for name in ["chrSQEncoding.dcm", "chrSQEncoding1.dcm"] {
            let mut obj = sample(name);
            decode_code_extensions(&mut obj);
            let seq = obj.get(tags::REQUESTED_PROCEDURE_CODE_SEQUENCE).unwrap();
            let item = &seq.items().unwrap()[0];
            assert_eq!(text(item, PN), h32, "{name}");
            assert_eq!(text(item, tags::CODE_VALUE), "CodeValue", "{name}");
            if name == "chrSQEncoding.dcm" {
                assert_eq!(charset(item), "ISO_IR 192");
            }
        }
    }

    /// Data sets without code extensions are left as dicom-rs decoded them, which for these
    /// is what pydicom 3 decodes.
    #[test]
    fn leaves_the_other_pydicom_samples_alone() {
        let cases = [
            ("chrArab.dcm", "ISO_IR 127", "قباني^لنزار"),
            ("chrFren.dcm", "ISO_IR 100", "Buc^Jérôme"),
            ("chrFrenMulti.dcm", "ISO_IR 100", "Buc^Jérôme"),
            ("chrGerm.dcm", "ISO_IR 100", "Äneas^Rüdiger"),
            ("chrGreek.dcm", "ISO_IR 126", "Διονυσιος"),
            ("chrHbrw.dcm", "ISO_IR 138", "שרון^דבורה"),
            ("chrRuss.dcm", "ISO_IR 144", "Люкceмбypг"),
            ("chrX1.dcm", "ISO_IR 192", "Wang^XiaoDong=王^小東"),
            ("chrX2.dcm", "GB18030", "Wang^XiaoDong=王^小东"),
        ];
        for (name, cs, name_value) in cases {
            let mut obj = sample(name);
            assert!(!decode_code_extensions(&mut obj), "{name}");
            assert_eq!(charset(&obj), cs, "{name}");
            assert_eq!(text(&obj, PN), name_value, "{name}");
        }
        let obj = sample("chrFrenMulti.dcm");
        assert_eq!(
            text(&obj, tags::OTHER_PATIENT_NAMES),
            "Buc^Jérôme\\Buc^Jérôme"
        );
        assert_eq!(text(&obj, Tag(0x0010, 0x1000)), "eggs\\spam");
    }

    /// An Explicit VR Little Endian data set of these elements, parsed by dicom-rs.
    fn parse(elements: &[(Tag, &[u8; 2], Vec<u8>)]) -> InMemDicomObject {
        let mut out = Vec::new();
        for (tag, vr, value) in elements {
            let mut value = value.clone();
            if value.len() % 2 == 1 {
                value.push(b' ');
            }
            out.extend(tag.0.to_le_bytes());
            out.extend(tag.1.to_le_bytes());
            out.extend(*vr);
            if matches!(*vr, b"SQ" | b"UN" | b"UT" | b"UC" | b"OB") {
                out.extend([0, 0]);
                out.extend((value.len() as u32).to_le_bytes());
            } else {
                out.extend((value.len() as u16).to_le_bytes());
            }
            out.extend(value);
        }
        InMemDicomObject::read_dataset_with_ts(&out[..], &EXPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap()
    }

    /// An item (defined length) holding these elements, as bytes of a sequence value.
    fn item(elements: &[(Tag, &[u8; 2], Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (tag, vr, value) in elements {
            body.extend(tag.0.to_le_bytes());
            body.extend(tag.1.to_le_bytes());
            body.extend(*vr);
            body.extend((value.len() as u16).to_le_bytes());
            body.extend(value);
        }
        let mut out = vec![0xFE, 0xFF, 0x00, 0xE0];
        out.extend((body.len() as u32).to_le_bytes());
        out.extend(body);
        out
    }

    /// Other Patient IDs (0010,1000), multi-valued LO (retired, but a plain LO for this test).
    const OTHER_PATIENT_IDS: Tag = Tag(0x0010, 0x1000);

    /// A multi-valued LO whose JIS X 0208 character holds a 0x5C byte, which dicom-rs split
    /// on, and a PN that arrived as UN.
    #[test]
    fn decodes_values_dicom_rs_split_and_text_of_vr_un() {
        let mut obj = parse(&[
            (
                tags::SPECIFIC_CHARACTER_SET,
                b"CS",
                b"\\ISO 2022 IR 87".to_vec(),
            ),
            (tags::PATIENT_NAME, b"UN", b"\x1b$B;3ED\x1b(B^Taro".to_vec()),
            (tags::PATIENT_ID, b"LO", b"ID1".to_vec()),
            (OTHER_PATIENT_IDS, b"LO", b"\x1b$B0\\\x1b(B\\abc".to_vec()),
        ]);
        assert!(decode_code_extensions(&mut obj));
        assert_eq!(text(&obj, OTHER_PATIENT_IDS), "移\\abc");
        assert_eq!(text(&obj, tags::PATIENT_ID), "ID1");
        let un = obj.get(tags::PATIENT_NAME).unwrap().to_bytes().unwrap();
        assert_eq!(decode_text(&un, Some("ISO_IR 192")).trim_end(), "山田^Taro");
    }

    /// dicom-rs keeps the character set of an item after the item's end: the Latin-1 text
    /// that follows an item in UTF-8 is still Latin-1.
    #[test]
    fn an_items_character_set_ends_with_the_item() {
        let seq = item(&[
            (tags::SPECIFIC_CHARACTER_SET, b"CS", b"ISO_IR 192".to_vec()),
            (tags::CODE_MEANING, b"LO", "Jérôme".as_bytes().to_vec()),
        ]);
        let mut obj = parse(&[
            (tags::SPECIFIC_CHARACTER_SET, b"CS", b"ISO_IR 100".to_vec()),
            (tags::PATIENT_NAME, b"PN", b"Buc^J\xe9r\xf4me".to_vec()),
            (tags::REQUESTED_PROCEDURE_CODE_SEQUENCE, b"SQ", seq),
            (
                tags::REQUESTED_PROCEDURE_DESCRIPTION,
                b"LO",
                b"J\xe9r\xf4me".to_vec(),
            ),
        ]);
        assert!(decode_code_extensions(&mut obj));
        assert_eq!(text(&obj, tags::PATIENT_NAME), "Buc^Jérôme");
        assert_eq!(text(&obj, tags::REQUESTED_PROCEDURE_DESCRIPTION), "Jérôme");
        let seq = obj.get(tags::REQUESTED_PROCEDURE_CODE_SEQUENCE).unwrap();
        assert_eq!(text(&seq.items().unwrap()[0], tags::CODE_MEANING), "Jérôme");
    }
}
