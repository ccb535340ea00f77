//! Validated Application Entity titles (PS3.5 §6.2, VR AE).

use std::fmt;

/// An AE title: 1 to 16 characters of the default character repertoire, no backslash and no
/// control characters. Leading and trailing spaces are not significant and are removed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct AeTitle(String);

/// Why a string is not a valid AE title.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AeTitleError {
    /// Nothing but spaces.
    #[error("AE title is empty")]
    Empty,
    /// More than 16 characters.
    #[error("AE title {0:?} is longer than 16 characters")]
    TooLong(String),
    /// A backslash, a control character or a non-ASCII character.
    #[error(
        "AE title {0:?} contains a character that is not allowed (backslash, control or non-ASCII)"
    )]
    BadChar(String),
}

impl AeTitle {
    /// Validates `s` as an AE title.
    ///
    /// # Errors
    /// Returns an [`AeTitleError`] saying what is wrong.
    pub fn new(s: &str) -> Result<Self, AeTitleError> {
        let t = s.trim_matches([' ', '\0']);
        if t.is_empty() {
            return Err(AeTitleError::Empty);
        }
        if t.chars().count() > 16 {
            return Err(AeTitleError::TooLong(t.to_owned()));
        }
        if t.chars()
            .any(|c| c == '\\' || c.is_control() || !c.is_ascii())
        {
            return Err(AeTitleError::BadChar(t.to_owned()));
        }
        Ok(AeTitle(t.to_owned()))
    }

    /// The title without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AeTitle({})", self.0)
    }
}

impl std::str::FromStr for AeTitle {
    type Err = AeTitleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AeTitle::new(s)
    }
}

impl<'de> serde::Deserialize<'de> for AeTitle {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AeTitle::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_validates() {
        assert_eq!(AeTitle::new(" KADE  ").unwrap().as_str(), "KADE");
        assert_eq!(AeTitle::new("STORESCU\0").unwrap().as_str(), "STORESCU");
        assert_eq!(AeTitle::new("   "), Err(AeTitleError::Empty));
        assert!(matches!(
            AeTitle::new("ABCDEFGHIJKLMNOPQ"),
            Err(AeTitleError::TooLong(_))
        ));
        assert!(matches!(
            AeTitle::new("A\\B"),
            Err(AeTitleError::BadChar(_))
        ));
    }
}
