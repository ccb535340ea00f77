//! Validated DICOM unique identifiers (PS3.5 §9.1).

use std::fmt;

/// A DICOM UID: 1 to 64 characters, digits and dots, no empty component.
///
/// A `Uid` is safe to use as a path or object-key segment: it can never contain `/`, `..`
/// or anything but `[0-9.]`. Leading zeros in components, which PS3.5 forbids but some
/// modalities emit, are accepted so that such instances are not lost.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Uid(String);

/// Why a string is not a valid UID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidError {
    /// The value is empty (after removing padding).
    #[error("UID is empty")]
    Empty,
    /// The value is longer than 64 characters.
    #[error("UID is {0} characters long, the maximum is 64")]
    TooLong(usize),
    /// The value contains a character other than a digit or a dot.
    #[error("UID contains {0:?}, only digits and dots are allowed")]
    BadChar(char),
    /// The value has an empty component (leading, trailing or double dot).
    #[error("UID has an empty component")]
    EmptyComponent,
}

impl Uid {
    /// Validates `s` as a UID, after removing the trailing NUL or space padding DICOM allows.
    ///
    /// # Errors
    /// Returns a [`UidError`] saying what is wrong with the value.
    pub fn new(s: &str) -> Result<Self, UidError> {
        let s = s.trim_end_matches(['\0', ' ']).trim_start_matches(' ');
        if s.is_empty() {
            return Err(UidError::Empty);
        }
        if s.len() > 64 {
            return Err(UidError::TooLong(s.len()));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_digit() && *c != '.') {
            return Err(UidError::BadChar(c));
        }
        if s.split('.').any(str::is_empty) {
            return Err(UidError::EmptyComponent);
        }
        Ok(Uid(s.to_owned()))
    }

    /// The UID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({})", self.0)
    }
}

impl std::str::FromStr for Uid {
    type Err = UidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uid::new(s)
    }
}

impl AsRef<str> for Uid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Uid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Uid::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_and_padded_uids() {
        assert_eq!(
            Uid::new("1.2.840.10008.1.1").unwrap().as_str(),
            "1.2.840.10008.1.1"
        );
        assert_eq!(Uid::new("1.2.3\0").unwrap().as_str(), "1.2.3");
        assert_eq!(Uid::new("1.2.3 ").unwrap().as_str(), "1.2.3");
        assert!(Uid::new(&format!("1.{}", "2".repeat(62))).is_ok());
    }

    #[test]
    fn rejects_what_could_escape_a_storage_key() {
        assert_eq!(Uid::new(""), Err(UidError::Empty));
        assert_eq!(Uid::new("1.2/../3"), Err(UidError::BadChar('/')));
        assert_eq!(Uid::new(".."), Err(UidError::EmptyComponent));
        assert_eq!(Uid::new("1..2"), Err(UidError::EmptyComponent));
        assert_eq!(Uid::new("1.2."), Err(UidError::EmptyComponent));
        assert_eq!(Uid::new("1.2.a"), Err(UidError::BadChar('a')));
        assert_eq!(Uid::new(&"1".repeat(65)), Err(UidError::TooLong(65)));
    }
}
