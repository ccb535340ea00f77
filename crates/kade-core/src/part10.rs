//! The DICOM Part 10 file header (PS3.10 §7.1): 128-byte preamble, `DICM`, then the File Meta
//! Information group, whose first element is its own length.

/// Bytes of the header before the File Meta group's other elements: preamble, `DICM` and the
/// File Meta Information Group Length element (0002,0000) with its 4-byte value.
pub const HEAD: usize = 144;

/// Where the data set begins (the offset after the File Meta group), read from the first
/// [`HEAD`] bytes of a Part 10 object; `None` when they are fewer or not such a header.
pub fn data_set_start(head: &[u8]) -> Option<u64> {
    if head.len() < HEAD || &head[128..132] != b"DICM" || head[132..136] != [2, 0, 0, 0] {
        return None;
    }
    let group_len = u32::from_le_bytes(head[140..144].try_into().ok()?);
    Some(HEAD as u64 + u64::from(group_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_set_starts_after_the_meta_group() {
        let mut head = vec![0u8; 128];
        head.extend_from_slice(b"DICM");
        head.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
        head.extend_from_slice(&200u32.to_le_bytes());
        assert_eq!(data_set_start(&head), Some(344));
        assert_eq!(data_set_start(&head[..143]), None, "short");
        let mut other = head.clone();
        other[132] = 8; // the first element is not (0002,0000)
        assert_eq!(data_set_start(&other), None);
        other = head.clone();
        other[128] = b'X';
        assert_eq!(data_set_start(&other), None);
    }
}
