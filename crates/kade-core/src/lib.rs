//! Core types shared by every Kade crate. No I/O (functions take and return bytes).
//!
//! # Layout
//! - [`uid`]: [`Uid`], a validated DICOM unique identifier (PS3.5 §9.1), safe to use in storage keys.
//! - [`ae`]: [`AeTitle`], a validated Application Entity title (PS3.5 §6.2, VR AE).
//! - [`attrs`]: [`InstanceAttributes`], the attribute set of one instance that the index stores,
//!   extracted from a parsed dataset, and [`attrs::search_key`] for case-insensitive name matching.
//! - [`json`]: the instance's DICOM JSON (PS3.18 §F.2) without bulk data, for WADO-RS metadata.
//! - [`charset`]: text decoding by Specific Character Set, ISO 2022 code extensions included
//!   ([`charset::decode_code_extensions`] repairs what dicom-rs parsed), and of text with VR UN.
//! - [`part10`]: where the data set of a Part 10 object begins.
//! - [`peer`]: [`Peer`] and [`Permission`], the DIMSE peer allow-list entries.
//! - [`transcode`]: re-encoding between the native transfer syntaxes (no codec).

pub mod ae;
pub mod attrs;
pub mod budget;
pub mod charset;
pub mod json;
pub mod lockfile;
pub mod part10;
pub mod peer;
pub mod transcode;
pub mod uid;

pub use ae::AeTitle;
pub use attrs::{
    InstanceAttributes, OtherPatientId, PatientAttributes, SeriesAttributes, StudyAttributes,
};
pub use peer::{Peer, Permission};
pub use uid::Uid;

/// Kade's implementation class UID (PS3.7 §D.3.3.2), written into every File Meta group and
/// A-ASSOCIATE PDU Kade produces. A UUID-derived UID under the `2.25` root (PS3.5 §B.2).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.172062407410928302214520337815340167839";

/// Kade's implementation version name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("KADE_", env!("CARGO_PKG_VERSION"));
