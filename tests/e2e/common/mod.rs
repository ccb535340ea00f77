//! The end-to-end context: a real `kade serve` process on a temporary data directory, on
//! every configured backend (SQLite + files always; PostgreSQL + S3 when configured).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kade_index::Index;
use kade_testkit::tools;
use sqlx::Connection;

pub mod orthanc;

/// A backend combination the suite runs on.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Name for messages.
    pub name: &'static str,
    /// PostgreSQL server URL to create per-node databases on (None: SQLite).
    pub pg_base: Option<String>,
    /// S3 settings (None: local files).
    pub s3: Option<S3Env>,
}

/// S3 connection settings from the environment.
#[derive(Debug, Clone)]
pub struct S3Env {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

/// The backends to run on: always the embedded default, plus PostgreSQL + S3 when
/// `KADE_TEST_PG_URL` and `KADE_TEST_S3_ENDPOINT` (with `_BUCKET`, `_ACCESS_KEY`,
/// `_SECRET_KEY`, optional `_REGION`) are set. Missing ones are reported loudly, and are an
/// error under `KADE_TEST_REQUIRE_ALL=1`.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend {
        name: "sqlite+files",
        pg_base: None,
        s3: None,
    }];
    let env = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    match (env("KADE_TEST_PG_URL"), env("KADE_TEST_S3_ENDPOINT")) {
        (Some(pg), Some(endpoint)) => v.push(Backend {
            name: "postgres+s3",
            pg_base: Some(pg),
            s3: Some(S3Env {
                endpoint,
                bucket: env("KADE_TEST_S3_BUCKET").expect("KADE_TEST_S3_BUCKET"),
                region: env("KADE_TEST_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
                access_key: env("KADE_TEST_S3_ACCESS_KEY").expect("KADE_TEST_S3_ACCESS_KEY"),
                secret_key: env("KADE_TEST_S3_SECRET_KEY").expect("KADE_TEST_S3_SECRET_KEY"),
            }),
        }),
        _ => {
            let msg = "PostgreSQL + S3 backend not configured: set KADE_TEST_PG_URL and \
                       KADE_TEST_S3_ENDPOINT/_BUCKET/_ACCESS_KEY/_SECRET_KEY (see README, Testing)";
            assert!(!tools::require_all(), "{msg}");
            eprintln!("SKIPPED: {msg}");
        }
    }
    v
}

/// Peers every test node allows.
const PEERS: &str = r#"
[[dicom.peers]]
ae_title = "STORESCU"
host = "127.0.0.1"
allow = ["echo", "store"]

[[dicom.peers]]
ae_title = "ECHOONLY"
host = "127.0.0.1"
allow = ["echo"]

[[dicom.peers]]
ae_title = "FINDSCU"
host = "127.0.0.1"
allow = ["echo", "find"]

[[dicom.peers]]
ae_title = "MOVESCU"
host = "127.0.0.1"
allow = ["echo", "find", "move"]

[[dicom.peers]]
ae_title = "GETSCU"
host = "127.0.0.1"
allow = ["echo", "get"]
"#;

/// A running (or stopped) `kade serve`.
#[derive(Debug)]
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    /// HTTPS port.
    pub http_port: u16,
    /// DICOM TLS port (0 when not enabled).
    pub tls_port: u16,
    /// The admin token printed on first start.
    pub admin_token: String,
    pub index_url: String,
    child: Option<Child>,
    archive: tokio::sync::OnceCell<kade::node::Node>,
}

fn rand_suffix() -> String {
    format!("{:012x}", rand_u64() & 0xffff_ffff_ffff)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

impl Node {
    /// Starts a node on `backend` with the default test configuration.
    pub async fn start(backend: &Backend) -> Node {
        Self::start_with(backend, "").await
    }

    /// Starts a node with extra keys in its `[dicom]` table.
    pub async fn start_with_dicom(backend: &Backend, dicom: &str) -> Node {
        Self::build(backend, dicom, "").await
    }

    /// Starts a node; `extra` is TOML appended to the configuration (e.g. an `[ingest]` table).
    pub async fn start_with(backend: &Backend, extra: &str) -> Node {
        Self::build(backend, "", extra).await
    }

    /// Starts a node with extra keys in its `[http]` table.
    pub async fn start_with_http(backend: &Backend, http: &str) -> Node {
        Self::build_full(backend, "", "", None, http).await
    }

    /// Starts a node whose data directory is `data` (e.g. a small filesystem).
    pub async fn start_in(backend: &Backend, data: &Path) -> Node {
        Self::build_at(backend, "", "", Some(data)).await
    }

    async fn build(backend: &Backend, dicom: &str, extra: &str) -> Node {
        Self::build_at(backend, dicom, extra, None).await
    }

    async fn build_at(backend: &Backend, dicom: &str, extra: &str, data: Option<&Path>) -> Node {
        Self::build_full(backend, dicom, extra, data, "").await
    }

    /// A node's directory and configuration (with `extra` appended), not started: run admin
    /// commands first, then [`Node::spawn`] (or use the configuration for another command).
    pub async fn prepare(backend: &Backend, extra: &str) -> Node {
        Self::configure(backend, "", extra, None, "").await
    }

    async fn build_full(
        backend: &Backend,
        dicom: &str,
        extra: &str,
        data: Option<&Path>,
        http: &str,
    ) -> Node {
        let mut node = Self::configure(backend, dicom, extra, data, http).await;
        node.spawn();
        node
    }

    async fn configure(
        backend: &Backend,
        dicom: &str,
        extra: &str,
        data: Option<&Path>,
        http: &str,
    ) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("kade-e2e-")
            .tempdir()
            .unwrap();
        let data = data
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        let mut toml = format!(
            "data_dir = {data:?}\n[http]\nbind = \"127.0.0.1\"\nport = 0\n{http}[dicom]\nae_title = \"KADE\"\nbind = \"127.0.0.1\"\nport = 0\nread_timeout_secs = 20\n{dicom}{PEERS}\n"
        );
        let index_url = match &backend.pg_base {
            Some(base) => {
                let db = format!("kade_e2e_{}", rand_suffix());
                let mut conn = sqlx::PgConnection::connect(base)
                    .await
                    .expect("connect to KADE_TEST_PG_URL");
                sqlx::query(&format!("CREATE DATABASE {db}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let url = replace_db(base, &db);
                toml.push_str(&format!("[index]\nurl = {url:?}\n"));
                url
            }
            None => format!("sqlite://{}?mode=rwc", data.join("index.db").display()),
        };
        if let Some(s3) = &backend.s3 {
            toml.push_str(&format!(
                "[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = {:?}\nbucket = {:?}\nregion = {:?}\naccess_key_id = {:?}\nsecret_access_key = {:?}\nprefix = \"e2e-{}\"\n",
                s3.endpoint, s3.bucket, s3.region, s3.access_key, s3.secret_key, rand_suffix()
            ));
        }
        toml.push_str(extra);
        let config = dir.path().join("kade.toml");
        std::fs::write(&config, toml).unwrap();
        Node {
            dir,
            config,
            port: 0,
            http_port: 0,
            tls_port: 0,
            admin_token: String::new(),
            index_url,
            child: None,
            archive: Default::default(),
        }
    }

    /// Starts the server process and waits for its "listening" line.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kade"))
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("KADE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start kade serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let port = |rest: &str| -> u16 {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                addr.rsplit(':').next().unwrap().parse().unwrap()
            };
            let (mut http, mut token, mut dicom, mut tls) = (0, None, 0, 0);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("kade: HTTPS listening on ") {
                    http = port(rest);
                } else if let Some(rest) = line.strip_prefix("kade: admin token ") {
                    token = Some(rest.trim().to_owned());
                } else if let Some(rest) = line.strip_prefix("kade: DICOM TLS listening on ") {
                    tls = port(rest);
                } else if let Some(rest) = line.strip_prefix("kade: DICOM listening on ") {
                    dicom = port(rest);
                } else if line == "kade: ready" {
                    let _ = tx.send((dicom, http, token.take(), tls));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((dicom, http, token, tls)) => {
                self.port = dicom;
                self.http_port = http;
                self.tls_port = tls;
                if let Some(t) = token {
                    self.admin_token = t;
                }
            }
            Err(_) => panic!("kade serve did not start; log:\n{}", self.log()),
        }
        self.child = Some(child);
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("serve.log")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        let cfg = std::fs::read_to_string(&self.config).unwrap();
        let line = cfg.lines().find(|l| l.starts_with("data_dir = ")).unwrap();
        PathBuf::from(line.trim_start_matches("data_dir = ").trim_matches('"'))
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.http_port)
    }

    /// The node's generated TLS certificate (PEM path), to trust in clients.
    pub fn cert_path(&self) -> PathBuf {
        self.data_dir().join("tls").join("cert.pem")
    }

    /// An HTTPS client trusting the node's certificate.
    pub fn http_client(&self) -> reqwest::Client {
        let pem = std::fs::read(self.cert_path()).expect("generated certificate");
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Peak resident memory of the server so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .unwrap();
        for _ in 0..600 {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        c.kill().unwrap();
        panic!("kade serve did not stop within 30 s of SIGTERM");
    }

    /// Runs `kade --config … ARGS` (an admin command) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kade"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// `kade stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        let o = self.cli(&["stats", "--json"]);
        assert!(o.status.success(), "kade stats failed: {}", tools::text(&o));
        serde_json::from_slice(&o.stdout).expect("stats JSON")
    }

    /// The node's index and blob store, opened directly (once).
    async fn archive(&self) -> &kade::node::Node {
        self.archive
            .get_or_init(|| async {
                let cfg = kade::config::Config::load(Some(&self.config), None).unwrap();
                kade::node::Node::open(&cfg).await.unwrap()
            })
            .await
    }

    /// The node's index.
    pub async fn index(&self) -> Index {
        self.archive().await.index.clone()
    }

    /// The stored blob of an instance, read through the node's own blob store.
    pub async fn blob(&self, key: &str) -> Vec<u8> {
        self.archive().await.store.get(key).await.unwrap().to_vec()
    }

    /// Replaces a mailbox chunk through the node's own blob store (to simulate tampering).
    pub async fn put_chunk_blob(&self, bundle: &str, index: u32, bytes: Vec<u8>) {
        let k = kade_store::BlobKey::exchange_chunk(bundle, index);
        self.archive()
            .await
            .store
            .put_bytes(&k, bytes.into())
            .await
            .unwrap();
    }

    /// Every blob in the node's store (key and bytes).
    pub async fn all_blobs(&self) -> Vec<(String, Vec<u8>)> {
        use futures::StreamExt;
        let store = self.archive().await.store.clone();
        let infos: Vec<_> = store.list("").collect().await;
        let mut out = Vec::new();
        for i in infos {
            let key = i.unwrap().key;
            let bytes = store.get(&key).await.unwrap().to_vec();
            out.push((key, bytes));
        }
        out
    }

    /// Files left in the spool directory (incomplete transfers). The journal of stored blobs
    /// (`spool/journal`: names of complete, acknowledged blobs, settled within a second) is not
    /// counted.
    pub fn spool_files(&self) -> Vec<PathBuf> {
        let journal = self.data_dir().join("spool/journal");
        list_files(&self.data_dir().join("spool"))
            .into_iter()
            .filter(|p| !p.starts_with(&journal))
            .collect()
    }

    /// Runs a DCMTK tool against this node with calling AE `aet`.
    pub fn dcmtk(&self, tool: &Path, aet: &str, args: &[&str], files: &[PathBuf]) -> Output {
        let mut c = Command::new(tool);
        c.args(["-aet", aet, "-aec", "KADE"])
            .args(args)
            .arg("127.0.0.1")
            .arg(self.port.to_string())
            .args(files);
        tools::run(c)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every file under `dir`, recursively.
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(list_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn replace_db(base: &str, db: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (base, String::new()),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = head[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(head.len());
    format!("{}/{db}{query}", &head[..host_end])
}

/// Splits Part 10 bytes at the end of the File Meta group and returns the data set.
pub fn dataset_of(blob: &[u8]) -> Vec<u8> {
    kade_testkit::part10::Part10::parse(blob.to_vec())
        .expect("stored blob is Part 10")
        .dataset
}

/// DCMTK's storescp, started on a free loopback port, writing into its own directory;
/// stopped when dropped.
#[derive(Debug)]
pub struct StoreScp {
    child: Child,
    /// Where received instances are written.
    pub dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

impl StoreScp {
    /// Starts `storescp` as `aet` with extra `options` and waits until it accepts connections.
    pub fn start(storescp: &Path, aet: &str, options: &[&str]) -> StoreScp {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(storescp, aet, port, options)
    }

    /// As [`StoreScp::start`], on `port` (e.g. a destination coming back on its port).
    pub fn start_on(storescp: &Path, aet: &str, port: u16, options: &[&str]) -> StoreScp {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(storescp)
            .args(options)
            .args(["-aet", aet, "-od"])
            .arg(dir.path())
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        StoreScp { child, dir, port }
    }

    /// Files received so far.
    pub fn files(&self) -> Vec<PathBuf> {
        list_files(self.dir.path())
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
