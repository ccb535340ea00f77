//! Kade's configuration: one TOML file (see `kade.example.toml`), overlaid by `KADE_*`
//! environment variables, with secrets also readable from `*_FILE` paths.
//!
//! Every key is documented on its field below and in `kade.example.toml`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kade_core::{AeTitle, Peer};
use kade_ingest::DuplicatePolicy;
use kade_store::S3Options;
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where Kade keeps its index (SQLite), blobs (local backend), spool and keys.
    /// Default `./kade-data`. Env `KADE_DATA_DIR`; the `--data-dir` option wins over both.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The DICOM (DIMSE) listener.
    #[serde(default)]
    pub dicom: DicomConfig,
    /// The metadata index.
    #[serde(default)]
    pub index: IndexConfig,
    /// Blob storage.
    #[serde(default)]
    pub storage: StorageConfig,
    /// The ingest path.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Process logs.
    #[serde(default)]
    pub log: LogConfig,
    /// The HTTPS listener (DICOMweb, viewer, health).
    #[serde(default)]
    pub http: HttpConfig,
    /// Authentication of web requests.
    #[serde(default)]
    pub auth: AuthConfig,
    /// This node's side of the hospital exchange (`kade exchange …`).
    #[serde(default)]
    pub exchange: ExchangeConfig,
    /// The exchange mailbox service (`kade mailbox serve`).
    #[serde(default)]
    pub mailbox: MailboxConfig,
    /// Gateway mode: the router and the job runners (`kade route`, `kade jobs`).
    #[serde(default)]
    pub gateway: GatewayConfig,
}

/// `[gateway]`: forwarding what arrives by the routing rules (`kade route add`) and running
/// the job queue (`kade jobs`) inside `kade serve`. Jobs live in the index, so they survive
/// restarts and are shared by nodes on one PostgreSQL database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Run the router and the job runners in `kade serve`. Default true (with no routes and
    /// no jobs they only look at the index twice a second).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Jobs this node runs at once. Default 2.
    #[serde(default = "default_gateway_workers")]
    pub workers: usize,
    /// Seconds before the first retry after a transient failure (destination down or busy);
    /// doubled after each further failure. Default 5.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_secs: u64,
    /// Longest wait between retries, seconds. Default 300.
    #[serde(default = "default_retry_max")]
    pub retry_max_secs: u64,
    /// A job that has failed transiently for this many hours is failed for good (the
    /// dead-letter state, `kade jobs list --state failed`). Default 72.
    #[serde(default = "default_give_up_hours")]
    pub give_up_after_hours: u64,
    /// Seconds to connect to and negotiate with a destination. Default 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            enabled: true,
            workers: default_gateway_workers(),
            retry_initial_secs: default_retry_initial(),
            retry_max_secs: default_retry_max(),
            give_up_after_hours: default_give_up_hours(),
            connect_timeout_secs: default_connect_timeout(),
        }
    }
}

fn default_gateway_workers() -> usize {
    2
}
fn default_retry_initial() -> u64 {
    5
}
fn default_retry_max() -> u64 {
    300
}
fn default_give_up_hours() -> u64 {
    72
}
fn default_connect_timeout() -> u64 {
    10
}

/// `[exchange]`: sending and receiving studies through a mailbox. The identity, the mailbox
/// URL and the certificates live in `DATA_DIR/exchange/` (`kade exchange init` / `join`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// While `kade serve` runs it receives by itself: it asks the mailbox to notify it of the
    /// next sealed bundle, waiting up to this many seconds per request (the mailbox holds a
    /// request at most 60 s), so a bundle is fetched moments after its seal; a mailbox that
    /// does not notify is asked again every this many seconds. 0 turns automatic receiving
    /// off (`kade exchange receive` still works). Default 30. Env `KADE_EXCHANGE_POLL_SECS`.
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
    /// Plaintext bytes per encrypted chunk, 1 KiB to 64 MiB. Default 4 MiB.
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: u32,
    /// Days a sent bundle stays at the mailbox when the recipient does not fetch it; it then
    /// expires and its ciphertext is deleted. Default 30.
    #[serde(default = "default_bundle_days")]
    pub bundle_lifetime_days: u64,
    /// Sends larger than this many bytes ask for confirmation (or `--yes`). Default 2 GB.
    #[serde(default = "default_confirm_bytes")]
    pub confirm_above_bytes: u64,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        ExchangeConfig {
            poll_secs: default_poll_secs(),
            chunk_bytes: default_chunk_bytes(),
            bundle_lifetime_days: default_bundle_days(),
            confirm_above_bytes: default_confirm_bytes(),
        }
    }
}

/// `[mailbox]`: the exchange relay. Its CA, certificates and directory live in
/// `DATA_DIR/mailbox/` (`kade mailbox init`); its index and blob store are configured like a
/// node's (`[index]`, `[storage]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    /// Address to listen on. Default `0.0.0.0`. Env `KADE_MAILBOX_BIND`.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// TCP port (HTTPS with client certificates). Default 9443. Env `KADE_MAILBOX_PORT`.
    #[serde(default = "default_mailbox_port")]
    pub port: u16,
    /// Days the ciphertext of an acknowledged bundle is kept after its receipt. Default 7.
    #[serde(default = "default_ack_days")]
    pub acknowledged_retention_days: u64,
    /// Seconds between two retention sweeps (expiry, purge). Default 60.
    #[serde(default = "default_sweep_secs")]
    pub sweep_secs: u64,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        MailboxConfig {
            bind: default_bind(),
            port: default_mailbox_port(),
            acknowledged_retention_days: default_ack_days(),
            sweep_secs: default_sweep_secs(),
        }
    }
}

fn default_poll_secs() -> u64 {
    30
}
fn default_chunk_bytes() -> u32 {
    4 * 1024 * 1024
}
fn default_bundle_days() -> u64 {
    30
}
fn default_confirm_bytes() -> u64 {
    2_000_000_000
}
fn default_mailbox_port() -> u16 {
    9443
}
fn default_ack_days() -> u64 {
    7
}
fn default_sweep_secs() -> u64 {
    60
}

/// `[http]`: the HTTPS listener. There is no plain-HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve HTTPS at all. Default true. Env `KADE_HTTP_ENABLED`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address to listen on. Default `0.0.0.0`. Env `KADE_HTTP_BIND`.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// TCP port. Default 8443. Env `KADE_HTTP_PORT`.
    #[serde(default = "default_http_port")]
    pub port: u16,
    /// Certificate chain (PEM). Unset: a self-signed certificate is generated on first start
    /// into `DATA_DIR/tls/` and its SHA-256 fingerprint printed. Re-read on SIGHUP.
    /// Env `KADE_HTTP_TLS_CERT`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM, PKCS#8, RSA or SEC1) for `tls_cert`. Env `KADE_HTTP_TLS_KEY`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Extra host names and addresses for the generated certificate (besides localhost,
    /// 127.0.0.1, ::1 and this machine's host name), e.g. `["pacs.hospital.example"]`.
    #[serde(default)]
    pub tls_names: Vec<String>,
    /// Base URL clients use, for URLs in responses (RetrieveURL, BulkDataURI), e.g.
    /// `https://pacs.hospital.example:8443`. Unset: taken from each request's Host header.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Largest STOW-RS request in bytes; larger ones get 413. Default 4 GiB.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: u64,
    /// Most instances in one STOW-RS request. Default 10000.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Origins allowed to call DICOMweb from a browser page on another origin (CORS), e.g.
    /// `["https://viewer.hospital.example"]`. Default none: the viewer Kade serves itself
    /// is same-origin and needs no CORS.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// HTTPS connections held at once, from all addresses; more are closed at accept.
    /// Default 1024.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTPS connections held at once from one source address (IPv6: one address, not the
    /// /64). Default 64.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Seconds allowed for the TLS handshake, and for a request's headers to arrive (also the
    /// most an HTTP/1.1 connection may sit idle between requests). Default 10.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// On shutdown, seconds in-flight requests may take to finish before their connections
    /// are closed. Default 30.
    #[serde(default = "default_http_drain_timeout")]
    pub drain_timeout_secs: u64,
}

/// `[auth]`: who may use the web side.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `[auth.oidc]`: accept bearer JWTs from a hospital identity provider (issuer,
    /// audience, jwks_url or jwks_file, roles_claim). Unset: local API tokens only.
    #[serde(default)]
    pub oidc: Option<kade_auth::OidcConfig>,
}

/// `[dicom]`: the DIMSE listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomConfig {
    /// Kade's AE title; associations must call it. Default `KADE`. Env `KADE_DICOM_AE_TITLE`.
    #[serde(default = "default_ae_title")]
    pub ae_title: AeTitle,
    /// Address to listen on. Default `0.0.0.0` (peers are still checked by AE title and
    /// address). Env `KADE_DICOM_BIND`.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// TCP port. Default 11112 (the registered DICOM port). Env `KADE_DICOM_PORT`.
    #[serde(default = "default_dicom_port")]
    pub port: u16,
    /// Associations of allowed peers served at once; more are rejected as transient. A slot
    /// is taken only once the association request was checked against the peers, so
    /// connections of strangers never hold one. Default 32.
    #[serde(default = "default_max_associations")]
    pub max_associations: usize,
    /// Connections not yet associated (TLS handshake, association request not yet read or
    /// checked), from all addresses together; more are closed at once. Each is held for at
    /// most `establish_timeout_secs`. Default 64.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Connections not yet associated from one source address; more are closed at once.
    /// Default 8.
    #[serde(default = "default_max_pending_per_address")]
    pub max_pending_per_address: usize,
    /// Largest PDU accepted, in bytes (announced to peers). Default 262144.
    #[serde(default = "default_max_pdu")]
    pub max_pdu: u32,
    /// Seconds from connect to a complete association request, and for the DICOM TLS
    /// handshake before it (the ARTIM timeout). Default 5.
    #[serde(default = "default_establish_timeout")]
    pub establish_timeout_secs: u64,
    /// Seconds a peer may stay silent between or within PDUs. Default 60.
    #[serde(default = "default_read_timeout")]
    pub read_timeout_secs: u64,
    /// Peers allowed to connect, in addition to those added with `kade peer add`.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Serve plain (unencrypted) DIMSE on `port`. Default true; false leaves only the DICOM
    /// TLS listener. Env `KADE_DICOM_PLAIN`.
    #[serde(default = "default_true")]
    pub plain: bool,
    /// `[dicom.tls]`: the DICOM TLS listener.
    #[serde(default)]
    pub tls: DicomTlsConfig,
}

/// `[dicom.tls]`: DIMSE over TLS 1.2/1.3 (PS3.15 B.12, BCP 195).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomTlsConfig {
    /// Serve DICOM TLS. Default false. Env `KADE_DICOM_TLS_ENABLED`.
    #[serde(default)]
    pub enabled: bool,
    /// TCP port. Default 2762 (the registered DICOM TLS port). Env `KADE_DICOM_TLS_PORT`.
    #[serde(default = "default_dicom_tls_port")]
    pub port: u16,
    /// Certificate chain and key (PEM). Unset: the HTTPS listener's (configured or generated).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Private key for `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates. Set: every peer must present a certificate
    /// issued by one of these CAs, and a peer whose `tls_cert_sha256` is set must present
    /// exactly that one. Unset: no client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// CA bundle (PEM) that certificates of C-MOVE destinations added with `--tls` must be
    /// issued by; Kade presents its DICOM TLS certificate as client certificate. Unset: such
    /// destinations cannot be reached (the C-MOVE fails with a message naming this key).
    #[serde(default)]
    pub peer_ca: Option<PathBuf>,
}

impl Default for DicomTlsConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

/// `[index]`: the metadata database.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexConfig {
    /// Database URL: empty for SQLite at `DATA_DIR/index.db` (default), or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`. Env `KADE_INDEX_URL` (or `KADE_INDEX_URL_FILE`).
    #[serde(default)]
    pub url: String,
}

/// `[storage]`: where blobs go.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (default: files under `DATA_DIR/blobs`) or `s3`. Env `KADE_STORAGE_BACKEND`.
    #[serde(default)]
    pub backend: StorageBackend,
    /// `[storage.s3]`, required when `backend = "s3"`. Env `KADE_STORAGE_S3_ENDPOINT`,
    /// `_BUCKET`, `_REGION`, `_ACCESS_KEY_ID`, `_SECRET_ACCESS_KEY` (or `_SECRET_ACCESS_KEY_FILE`),
    /// `_PREFIX`.
    pub s3: Option<S3Options>,
}

/// A blob storage backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Files in the data directory.
    #[default]
    Local,
    /// An S3-compatible bucket.
    S3,
}

/// `[ingest]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// What to do with a different object arriving under an existing SOP Instance UID:
    /// `reject` (default; failure status C111), `keep-existing` (success, keep the stored
    /// one) or `replace`. Every case is audited. Env `KADE_INGEST_DUPLICATE_POLICY`.
    #[serde(default)]
    pub duplicate_policy: DuplicatePolicy,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`. Env `KADE_LOG_FORMAT`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter such as `info` or `kade_dimse=debug,info`. Default `info`.
    /// Env `KADE_LOG` (or `RUST_LOG`).
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./kade-data")
}
fn default_ae_title() -> AeTitle {
    AeTitle::new("KADE").expect("valid")
}
fn default_bind() -> String {
    "0.0.0.0".into()
}
fn default_dicom_port() -> u16 {
    11112
}
fn default_max_associations() -> usize {
    32
}
fn default_max_pdu() -> u32 {
    256 * 1024
}
fn default_establish_timeout() -> u64 {
    5
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_address() -> usize {
    64
}
fn default_header_timeout() -> u64 {
    10
}
fn default_http_drain_timeout() -> u64 {
    30
}
fn default_max_pending() -> usize {
    64
}
fn default_max_pending_per_address() -> usize {
    8
}
fn default_read_timeout() -> u64 {
    60
}
fn default_dicom_tls_port() -> u16 {
    2762
}
fn default_true() -> bool {
    true
}
fn default_http_port() -> u16 {
    8443
}
fn default_max_request_bytes() -> u64 {
    4 * 1024 * 1024 * 1024
}
fn default_max_instances() -> usize {
    10_000
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for DicomConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl Config {
    /// Loads `file` (if given), then applies `KADE_*` environment overrides and `data_dir`.
    ///
    /// # Errors
    /// When the file cannot be read or parsed, or an override is malformed.
    pub fn load(file: Option<&Path>, data_dir: Option<&Path>) -> anyhow::Result<Config> {
        let text = match file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read config file {}", f.display()))?,
            None => String::new(),
        };
        let mut cfg: Config = toml::from_str(&text).with_context(|| match file {
            Some(f) => format!("invalid config file {}", f.display()),
            None => "invalid default configuration".into(),
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        if let Some(d) = data_dir {
            cfg.data_dir = d.to_owned();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        let secret = |k: &str| -> anyhow::Result<Option<String>> {
            if let Some(v) = get(k) {
                return Ok(Some(v));
            }
            match get(&format!("{k}_FILE")) {
                Some(path) => read_secret_file(Path::new(&path)).map(Some),
                None => Ok(None),
            }
        };
        if let Some(v) = get("KADE_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("KADE_DICOM_AE_TITLE") {
            self.dicom.ae_title = AeTitle::new(&v).context("KADE_DICOM_AE_TITLE")?;
        }
        if let Some(v) = get("KADE_EXCHANGE_POLL_SECS") {
            self.exchange.poll_secs = v
                .parse()
                .context("KADE_EXCHANGE_POLL_SECS must be a number of seconds")?;
        }
        if let Some(v) = get("KADE_MAILBOX_BIND") {
            self.mailbox.bind = v;
        }
        if let Some(v) = get("KADE_MAILBOX_PORT") {
            self.mailbox.port = v
                .parse()
                .context("KADE_MAILBOX_PORT must be a port number")?;
        }
        if let Some(v) = get("KADE_DICOM_BIND") {
            self.dicom.bind = v;
        }
        if let Some(v) = get("KADE_DICOM_PORT") {
            self.dicom.port = v.parse().context("KADE_DICOM_PORT must be a port number")?;
        }
        if let Some(v) = secret("KADE_INDEX_URL")? {
            self.index.url = v;
        }
        if let Some(v) = get("KADE_STORAGE_BACKEND") {
            self.storage.backend = match v.as_str() {
                "local" => StorageBackend::Local,
                "s3" => StorageBackend::S3,
                _ => bail!("KADE_STORAGE_BACKEND must be local or s3, not {v:?}"),
            };
        }
        let s3_keys = [
            "ENDPOINT",
            "BUCKET",
            "REGION",
            "ACCESS_KEY_ID",
            "SECRET_ACCESS_KEY",
        ];
        let mut s3_env = Vec::new();
        for k in s3_keys {
            s3_env.push(secret(&format!("KADE_STORAGE_S3_{k}"))?);
        }
        if s3_env.iter().any(Option::is_some) {
            let s3 = self.storage.s3.get_or_insert_with(|| S3Options {
                endpoint: String::new(),
                bucket: String::new(),
                region: "us-east-1".into(),
                access_key_id: String::new(),
                secret_access_key: String::new(),
                prefix: String::new(),
            });
            let fields = [
                &mut s3.endpoint,
                &mut s3.bucket,
                &mut s3.region,
                &mut s3.access_key_id,
                &mut s3.secret_access_key,
                &mut s3.prefix,
            ];
            for (field, v) in fields.into_iter().zip(s3_env) {
                if let Some(v) = v {
                    *field = v;
                }
            }
        }
        if let Some(v) = get("KADE_INGEST_DUPLICATE_POLICY") {
            self.ingest.duplicate_policy = toml::Value::String(v.clone())
                .try_into()
                .map_err(|_| anyhow::anyhow!("KADE_INGEST_DUPLICATE_POLICY must be reject, keep-existing or replace, not {v:?}"))?;
        }
        if let Some(v) = get("KADE_DICOM_PLAIN") {
            self.dicom.plain = v
                .parse()
                .context("KADE_DICOM_PLAIN must be true or false")?;
        }
        if let Some(v) = get("KADE_DICOM_TLS_ENABLED") {
            self.dicom.tls.enabled = v
                .parse()
                .context("KADE_DICOM_TLS_ENABLED must be true or false")?;
        }
        if let Some(v) = get("KADE_DICOM_TLS_PORT") {
            self.dicom.tls.port = v
                .parse()
                .context("KADE_DICOM_TLS_PORT must be a port number")?;
        }
        if let Some(v) = get("KADE_HTTP_ENABLED") {
            self.http.enabled = v
                .parse()
                .context("KADE_HTTP_ENABLED must be true or false")?;
        }
        if let Some(v) = get("KADE_HTTP_BIND") {
            self.http.bind = v;
        }
        if let Some(v) = get("KADE_HTTP_PORT") {
            self.http.port = v.parse().context("KADE_HTTP_PORT must be a port number")?;
        }
        if let Some(v) = get("KADE_HTTP_TLS_CERT") {
            self.http.tls_cert = Some(v.into());
        }
        if let Some(v) = get("KADE_HTTP_TLS_KEY") {
            self.http.tls_key = Some(v.into());
        }
        if let Some(v) = get("KADE_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = get("KADE_LOG").or_else(|| get("RUST_LOG")) {
            self.log.level = v;
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.storage.backend == StorageBackend::S3 {
            let Some(s3) = &self.storage.s3 else {
                bail!(
                    "storage.backend is \"s3\" but [storage.s3] is missing: set endpoint, bucket, region, access_key_id and secret_access_key"
                );
            };
            for (name, v) in [
                ("endpoint", &s3.endpoint),
                ("bucket", &s3.bucket),
                ("access_key_id", &s3.access_key_id),
            ] {
                if v.is_empty() {
                    bail!("storage.s3.{name} is empty");
                }
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            bail!("log.format must be text or json, not {:?}", self.log.format);
        }
        if !self.dicom.plain && !self.dicom.tls.enabled {
            bail!(
                "dicom.plain = false needs dicom.tls.enabled = true, or no DICOM listener is left"
            );
        }
        if self.dicom.tls.cert.is_some() != self.dicom.tls.key.is_some() {
            bail!(
                "dicom.tls.cert and dicom.tls.key go together: set both, or neither to use the HTTPS certificate"
            );
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            bail!(
                "http.tls_cert and http.tls_key go together: set both, or neither for a generated certificate"
            );
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.dicom.max_pdu) {
            bail!("dicom.max_pdu must be between 1024 and 16777216 bytes");
        }
        Ok(())
    }

    /// The index URL, defaulting to SQLite in the data directory.
    pub fn index_url(&self) -> String {
        if self.index.url.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("index.db").display()
            )
        } else {
            self.index.url.clone()
        }
    }
}

/// Reads a secret from a file that must not be readable by other users.
fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("cannot read secret file {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "secret file {} is readable by other users (mode {:o}): run chmod 600 on it",
                path.display(),
                mode & 0o777
            );
        }
    }
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    Ok(s.trim_end_matches(['\n', '\r']).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../kade.example.toml");
        let cfg: Config = toml::from_str(text).expect("kade.example.toml must stay valid");
        assert_eq!(cfg.dicom.ae_title.as_str(), "KADE");
        assert_eq!(cfg.dicom.port, 11112);
        cfg.validate().unwrap();
    }

    #[test]
    fn env_overrides() {
        let mut cfg: Config = toml::from_str("").unwrap();
        let env = |k: &str| match k {
            "KADE_DICOM_PORT" => Some("4242".to_string()),
            "KADE_STORAGE_BACKEND" => Some("s3".into()),
            "KADE_STORAGE_S3_ENDPOINT" => Some("http://127.0.0.1:9000".into()),
            "KADE_STORAGE_S3_BUCKET" => Some("b".into()),
            "KADE_STORAGE_S3_ACCESS_KEY_ID" => Some("k".into()),
            "KADE_INGEST_DUPLICATE_POLICY" => Some("keep-existing".into()),
            _ => None,
        };
        cfg.apply_env(env).unwrap();
        assert_eq!(cfg.dicom.port, 4242);
        assert_eq!(cfg.storage.backend, StorageBackend::S3);
        assert_eq!(cfg.storage.s3.as_ref().unwrap().bucket, "b");
        assert_eq!(cfg.ingest.duplicate_policy, DuplicatePolicy::KeepExisting);
        cfg.validate().unwrap();
        let bad = |k: &str| (k == "KADE_DICOM_PORT").then(|| "x".to_string());
        assert!(cfg.apply_env(bad).is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[dicom]\naetitle = \"X\"").is_err());
    }
}
