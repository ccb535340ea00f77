//! Test kit for Kade's end-to-end tests (a dev-dependency only).
//!
//! # Layout
//! - [`part10`]: reading a Part 10 file into its File Meta facts and raw data set bytes.
//! - [`gen`]: generated test data (a multi-series CT study with non-ASCII names).
//! - [`corpus`]: the files in `testdata/` and what pydicom saw in them (`expected.json`).
//! - [`tools`]: locating and running the real DICOM peers (DCMTK).

pub mod corpus;
pub mod r#gen;
pub mod part10;
pub mod tools;

use std::path::PathBuf;

/// The repository's `testdata/` directory.
pub fn testdata_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}
