//! End-to-end tests: a real `kade serve` process driven by real DICOM peers (DCMTK) and by
//! Kade's own requestor for traffic no ordinary peer sends. Every test runs on every
//! configured backend (see `common::backends`).

mod common;

mod admin;
mod association;
mod charset;
mod conformance;
mod corpus;
mod crash;
mod dicom_tls;
mod dicomweb;
mod dimse_conformance;
mod exchange;
mod gateway;
mod http_limits;
mod orthanc_fixture;
mod pynetdicom;
mod query;
mod robustness;
mod viewer;
