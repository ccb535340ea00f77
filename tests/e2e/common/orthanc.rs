//! A real Orthanc PACS (Debian package `orthanc`), standing in for the hospital's existing
//! PACS: its own process, configuration and data in a temporary directory, on free loopback
//! ports, driven through its REST API.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kade_testkit::tools;

/// Where the Debian package installs the server.
const ORTHANC_BIN: &str = "/usr/sbin/Orthanc";

/// A running (or stopped) Orthanc; killed when dropped.
#[derive(Debug)]
pub struct Orthanc {
    /// Its DICOM port.
    pub dicom_port: u16,
    /// Its REST API port (plain HTTP, loopback only).
    pub http_port: u16,
    /// Its AE title (the called AE title is checked).
    pub aet: String,
    /// Configuration, log, storage and index.
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

/// The Orthanc server binary, or `None` (after a loud notice, or a panic under
/// [`tools::require_all`]) when Orthanc is not installed.
pub fn binary() -> Option<PathBuf> {
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("Orthanc"))
                .find(|p| p.is_file())
        })
    };
    let found = Some(PathBuf::from(ORTHANC_BIN))
        .filter(|p| p.is_file())
        .or_else(on_path);
    if found.is_none() {
        let msg = "Orthanc not found: install Orthanc (Debian: apt-get install orthanc) to run \
                   this suite";
        assert!(!tools::require_all(), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn free_port() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

impl Orthanc {
    /// Starts Orthanc as `aet` knowing `modalities` (name, AE title, port on 127.0.0.1), and
    /// waits until its REST API answers; `None` when Orthanc is not installed.
    ///
    /// Any calling AE may C-ECHO and C-STORE; the listed modalities may also query and
    /// retrieve, and are the destinations of [`Orthanc::store_to`].
    pub fn start(aet: &str, modalities: &[(&str, &str, u16)]) -> Option<Orthanc> {
        let bin = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("kade-e2e-orthanc-")
            .tempdir()
            .unwrap();
        // Both listeners are held until both ports are known, so the ports differ.
        let (dicom, http) = (free_port(), free_port());
        let dicom_port = dicom.local_addr().unwrap().port();
        let http_port = http.local_addr().unwrap().port();
        drop((dicom, http));
        let db = dir.path().join("db");
        let peers: serde_json::Map<String, serde_json::Value> = modalities
            .iter()
            .map(|(name, ae, port)| {
                (
                    (*name).to_owned(),
                    serde_json::json!([ae, "127.0.0.1", port]),
                )
            })
            .collect();
        let config = serde_json::json!({
            "Name": aet,
            "StorageDirectory": db,
            "IndexDirectory": db,
            "StorageCompression": false,
            "Plugins": [],
            "HttpServerEnabled": true,
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "OrthancExplorerEnabled": false,
            "WebDavEnabled": false,
            "DicomServerEnabled": true,
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": true,
            "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowStore": true,
            "UnknownSopClassAccepted": true,
            "DicomModalities": peers,
            "DicomModalitiesInDatabase": false,
            // Release an outgoing association as soon as its job ends, not 5 s later.
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": false,
            "LogExportedResources": false,
        });
        std::fs::write(
            dir.path().join("orthanc.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        let mut o = Orthanc {
            dicom_port,
            http_port,
            aet: aet.to_owned(),
            dir,
            bin,
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        };
        o.spawn();
        Some(o)
    }

    /// Starts the process on the existing configuration and waits for `GET /system`.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(&self.bin)
            .arg(self.dir.path().join("orthanc.json"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start Orthanc");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.system_ok() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("Orthanc exited ({st}) at start; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                self.stop();
                panic!("Orthanc did not answer within 20 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `GET /system` answers 200 (a blocking probe, usable outside a runtime).
    fn system_ok(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.http_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "GET /system HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        let mut head = [0u8; 12];
        s.write_all(req.as_bytes()).is_ok()
            && s.read_exact(&mut head).is_ok()
            && head.starts_with(b"HTTP/1.")
            && &head[9..12] == b"200"
    }

    /// Declares one more modality (e.g. a peer started after this Orthanc): live through the
    /// REST API and in the configuration file, so that it survives [`Orthanc::restart`].
    pub async fn add_modality(&self, name: &str, aet: &str, port: u16) {
        let path = self.dir.path().join("orthanc.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["DicomModalities"][name] = serde_json::json!([aet, "127.0.0.1", port]);
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let body = serde_json::json!({ "AET": aet, "Host": "127.0.0.1", "Port": port });
        let (status, body) = self
            .send(
                self.http
                    .put(format!("{}/modalities/{name}", self.url()))
                    .body(body.to_string()),
                "add modality",
            )
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// Stops the process (SIGKILL) and waits for it; the data directory is kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process if running and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Orthanc's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("orthanc.log")
    }

    /// The storage and index directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// `127.0.0.1:PORT` (DICOM).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.dicom_port)
    }

    /// `http://127.0.0.1:PORT` (REST API).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Sends a request and returns the status and body (panics only on transport errors).
    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> (u16, Vec<u8>) {
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("Orthanc {what}: {e}; log:\n{}", self.log()));
        let status = resp.status().as_u16();
        (status, resp.bytes().await.unwrap().to_vec())
    }

    /// `GET path` (e.g. `/instances/ID/content/7fe0-0010`), asserting 200; the body.
    pub async fn get(&self, path: &str) -> Vec<u8> {
        let (status, body) = self
            .send(self.http.get(format!("{}{path}", self.url())), path)
            .await;
        assert_eq!(
            status,
            200,
            "Orthanc GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        body
    }

    /// `GET path` as JSON, asserting 200.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_slice(&self.get(path).await).expect("Orthanc JSON")
    }

    async fn ids(&self, path: &str) -> Vec<String> {
        serde_json::from_value(self.get_json(path).await).expect("a list of ids")
    }

    /// Orthanc's ids of its studies (`GET /studies`).
    pub async fn studies(&self) -> Vec<String> {
        self.ids("/studies").await
    }

    /// Orthanc's ids of its instances (`GET /instances`).
    pub async fn instances(&self) -> Vec<String> {
        self.ids("/instances").await
    }

    /// An instance's tags by keyword, e.g. `["PatientName"]` (`simplified-tags`).
    pub async fn instance_tags(&self, id: &str) -> serde_json::Value {
        self.get_json(&format!("/instances/{id}/simplified-tags"))
            .await
    }

    /// An instance's stored Part 10 file.
    pub async fn instance_file(&self, id: &str) -> Vec<u8> {
        self.get(&format!("/instances/{id}/file")).await
    }

    /// An instance's Pixel Data value: Orthanc lists `/content/7fe0-0010` as items (`["0"]` for
    /// native pixels: the whole value; one per fragment when encapsulated), concatenated here.
    pub async fn instance_pixel_data(&self, id: &str) -> Vec<u8> {
        let path = format!("/instances/{id}/content/7fe0-0010");
        let items: Vec<String> = serde_json::from_value(self.get_json(&path).await).unwrap();
        let mut out = Vec::new();
        for i in items {
            out.extend(self.get(&format!("{path}/{i}")).await);
        }
        out
    }

    /// Orthanc's id of the instance with SOP Instance UID `uid` (`POST /tools/lookup`).
    pub async fn find_instance_by_sop_uid(&self, uid: &str) -> Option<String> {
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/tools/lookup", self.url()))
                    .body(uid.to_owned()),
                "lookup",
            )
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let found: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        found
            .iter()
            .find(|r| r["Type"] == "Instance")
            .and_then(|r| r["ID"].as_str())
            .map(str::to_owned)
    }

    /// Has Orthanc C-STORE a study (Orthanc id) to its modality `name`, synchronously: the
    /// job's result, or Orthanc's error (a refused association, a failure status such as
    /// `DIMSE status 0xA700`…; warning statuses count as success).
    pub async fn store_to(&self, name: &str, study: &str) -> Result<serde_json::Value, String> {
        let body = serde_json::json!({ "Resources": [study], "Synchronous": true });
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/modalities/{name}/store", self.url()))
                    .body(body.to_string()),
                "store",
            )
            .await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match status {
            200 if v["FailedInstancesCount"] == 0 => Ok(v),
            _ => Err(format!(
                "HTTP {status}: {}",
                v.get("Details")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned())
            )),
        }
    }

    /// Stores a Part 10 file through the REST API (`POST /instances`); its Orthanc id.
    pub async fn upload(&self, bytes: Vec<u8>) -> String {
        let (status, body) = self
            .send(
                self.http
                    .post(format!("{}/instances", self.url()))
                    .body(bytes),
                "upload",
            )
            .await;
        assert_eq!(
            status,
            200,
            "Orthanc upload: {}",
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["ID"].as_str().expect("instance id").to_owned()
    }

    /// Uploads every file in `files`; their Orthanc ids.
    pub async fn upload_files(&self, files: &[impl AsRef<Path>]) -> Vec<String> {
        let mut ids = Vec::new();
        for f in files {
            ids.push(self.upload(std::fs::read(f).unwrap()).await);
        }
        ids
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}
