//! `kade mailbox …` and `kade exchange …`: the hospital exchange from the command line.
//!
//! Enrolment, in four steps (the README walks through them):
//! 1. the mailbox operator runs `kade mailbox init` (CA, server certificate, directory
//!    authority key) and `kade mailbox serve`;
//! 2. each hospital runs `kade exchange init --org ORG …`, which writes `request.json`
//!    (public keys, mailbox URL, a certificate signing request: nothing secret);
//! 3. the operator runs `kade mailbox enroll --request request.json --out ORG.enrolment.json`,
//!    which signs the directory entry and issues the client certificate (subject O = ORG);
//! 4. the hospital runs `kade exchange join ORG.enrolment.json`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use kade_exchange::bundle::{
    Directory, DirectoryFile, NodeKeys, SignedDirectoryEntry, SigningKey, check_org_id,
};
use kade_exchange::mailbox::{Mailbox, MailboxOptions};
use kade_exchange::node::send::SendRequest;
use kade_exchange::node::{self, Enrolment, EnrolmentRequest, ExchangeNode, Settings};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;

use crate::cli::{ExchangeCommand, MailboxCommand};
use crate::config::Config;
use crate::https::{self, write_private};
use crate::node::Node;

fn mailbox_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("mailbox")
}

fn unix_now() -> u64 {
    node::now()
}

/// Sets a certificate's validity: from the start of the (UTC) day of `from` to the start of
/// the day of `to`.
fn set_validity(p: &mut CertificateParams, from: u64, to: u64) {
    use chrono::Datelike;
    let day = |unix: u64| {
        let d = chrono::DateTime::from_timestamp(unix as i64, 0).unwrap_or_default();
        rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
    };
    p.not_before = day(from);
    p.not_after = day(to);
}

/// Runs `kade mailbox …`.
///
/// # Errors
/// When a step fails; the message says which and what to do.
pub async fn mailbox(cfg: &Config, cmd: MailboxCommand) -> anyhow::Result<()> {
    match cmd {
        MailboxCommand::Init { names } => mailbox_init(&cfg.data_dir, &names),
        MailboxCommand::Enroll {
            request,
            out,
            valid_days,
        } => {
            let org = mailbox_enroll(&cfg.data_dir, &request, &out, valid_days)?;
            mailbox_audit(cfg, format!("organisation {org} enrolled")).await;
            Ok(())
        }
        MailboxCommand::Revoke { org, reason } => {
            mailbox_revoke(&cfg.data_dir, &org)?;
            mailbox_audit(cfg, format!("organisation {org} revoked: {reason}")).await;
            println!(
                "kade: {org} revoked: the mailbox refuses its certificate and the other nodes its bundles from now on"
            );
            Ok(())
        }
        MailboxCommand::Serve { port, bind } => {
            let mut cfg = cfg.clone();
            if let Some(p) = port {
                cfg.mailbox.port = p;
            }
            if let Some(b) = bind {
                cfg.mailbox.bind = b;
            }
            mailbox_serve(cfg).await
        }
    }
}

fn mailbox_init(data_dir: &Path, extra_names: &[String]) -> anyhow::Result<()> {
    let dir = mailbox_dir(data_dir);
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a mailbox (ca.pem); remove it first to start over",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = unix_now();
    // The CA that issues the server certificate and every node's client certificate.
    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "Kade exchange mailbox CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut ca, now.saturating_sub(86400), now + 10 * 365 * 86400);
    let ca_cert = ca.self_signed(&ca_key)?;
    // The server certificate.
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        if !h.trim().is_empty() {
            names.push(h.trim().to_owned());
        }
    }
    names.extend(extra_names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut sp = CertificateParams::new(names)?;
    sp.distinguished_name
        .push(DnType::CommonName, "Kade exchange mailbox");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut sp, now.saturating_sub(86400), now + 2 * 365 * 86400);
    let server = sp.signed_by(&server_key, &ca_cert, &ca_key)?;
    // The directory authority.
    let authority = SigningKey::generate(&mut rand::rngs::OsRng);
    write_private(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    write_private(
        &dir.join("server.key"),
        server_key.serialize_pem().as_bytes(),
    )?;
    std::fs::write(dir.join("server.pem"), server.pem())?;
    write_private(
        &dir.join("authority.key"),
        hex::encode(authority.to_bytes()).as_bytes(),
    )?;
    std::fs::write(
        dir.join("directory.json"),
        DirectoryFile::new(Vec::new()).to_json(),
    )?;
    println!("kade: mailbox initialised in {}", dir.display());
    println!(
        "kade: CA certificate {} (SHA-256 {})",
        dir.join("ca.pem").display(),
        https::fingerprint(ca_cert.der())
    );
    println!(
        "kade: directory authority public key {}",
        hex::encode(authority.verifying_key().to_bytes())
    );
    println!("kade: next: kade mailbox serve, and kade mailbox enroll for each hospital");
    Ok(())
}

fn load_authority(dir: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(dir.join("authority.key")).with_context(|| {
        format!(
            "no mailbox in {}: run `kade mailbox init` first",
            dir.display()
        )
    })?;
    let mut b = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut b).context("authority.key is not 64 hex digits")?;
    Ok(SigningKey::from_bytes(&b))
}

/// Writes an administrative entry to the mailbox's audit log.
async fn mailbox_audit(cfg: &Config, detail: String) {
    let written = async {
        let node = Node::open(cfg).await?;
        let ev = kade_audit::AuditEvent::new(
            kade_audit::EventKind::Admin,
            kade_audit::Outcome::Success,
            "admin:cli",
        )
        .detail(detail);
        node.audit.record(&ev).await?;
        node.index.close().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = written {
        eprintln!("warning: could not write the audit entry: {e:#}");
    }
}

/// Rewrites the mailbox's directory with `entries` (each signed by the authority).
fn write_directory(dir: &Path, entries: Vec<SignedDirectoryEntry>) -> anyhow::Result<()> {
    let path = dir.join("directory.json");
    let tmp = dir.join("directory.json.tmp");
    std::fs::write(&tmp, DirectoryFile::new(entries).to_json())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// The mailbox's directory entries, verified against its authority.
fn read_directory(dir: &Path, authority: &SigningKey) -> anyhow::Result<Vec<SignedDirectoryEntry>> {
    let path = dir.join("directory.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Directory::from_json(&text, &authority.verifying_key())
        .with_context(|| format!("{} does not verify", path.display()))?;
    let file: DirectoryFile = serde_json::from_str(&text)?;
    Ok(file.entries)
}

fn mailbox_revoke(data_dir: &Path, org: &str) -> anyhow::Result<()> {
    let dir = mailbox_dir(data_dir);
    let authority = load_authority(&dir)?;
    let entries = read_directory(&dir, &authority)?;
    let before = entries.len();
    let kept: Vec<_> = entries
        .into_iter()
        .filter(|e| e.entry.org_id != org)
        .collect();
    if kept.len() == before {
        bail!("{org} is not in the mailbox's directory: nothing to revoke (see directory.json)");
    }
    write_directory(&dir, kept)
}

/// Enrols the requesting organisation; returns its id.
fn mailbox_enroll(
    data_dir: &Path,
    request: &Path,
    out: &Path,
    valid_days: u64,
) -> anyhow::Result<String> {
    let dir = mailbox_dir(data_dir);
    let authority = load_authority(&dir)?;
    let req: EnrolmentRequest = serde_json::from_slice(
        &std::fs::read(request).with_context(|| format!("cannot read {}", request.display()))?,
    )
    .with_context(|| {
        format!(
            "{} is not an enrolment request (made by kade exchange init)",
            request.display()
        )
    })?;
    let org = req.entry.org_id.clone();
    check_org_id(&org)?;
    let now = unix_now();
    let not_after = now + valid_days * 86400;
    // The client certificate: the CSR's key, our subject (O = the organisation).
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key"))?)
        .context("ca.key is not a usable key")?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca_pem)
        .context("ca.pem is not a usable CA certificate")?
        .self_signed(&ca_key)?;
    let mut csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
        .context("the request's certificate signing request is not valid")?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::OrganizationName, org.as_str());
    dn.push(DnType::CommonName, org.as_str());
    csr.params.distinguished_name = dn;
    csr.params.subject_alt_names = Vec::new();
    csr.params.is_ca = IsCa::NoCa;
    csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut csr.params, now.saturating_sub(86400), not_after);
    let cert = csr.signed_by(&ca_cert, &ca_key)?;
    // The signed directory entry.
    let mut entry = req.entry.clone();
    entry.not_after = not_after;
    entry.tls_cert_sha256 = Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        cert.der(),
    )));
    let signed = SignedDirectoryEntry::sign(entry.clone(), &authority);
    // A newer enrolment replaces the organisation's entry, and with it the certificate the
    // mailbox admits.
    let mut entries: Vec<SignedDirectoryEntry> = read_directory(&dir, &authority)?
        .into_iter()
        .filter(|e| e.entry.org_id != org)
        .collect();
    entries.push(signed);
    write_directory(&dir, entries)?;
    let enrolment = Enrolment {
        org_id: org.clone(),
        client_cert_pem: cert.pem(),
        ca_pem,
        authority_key: hex::encode(authority.verifying_key().to_bytes()),
        mailbox_url: entry.mailbox_url.clone(),
    };
    std::fs::write(out, serde_json::to_string_pretty(&enrolment)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "kade: enrolled {org} ({}) until {}; give {} to its administrator for `kade exchange join`",
        entry.display_name,
        chrono::DateTime::from_timestamp(not_after as i64, 0)
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default(),
        out.display()
    );
    Ok(org)
}

async fn mailbox_serve(cfg: Config) -> anyhow::Result<()> {
    let dir = mailbox_dir(&cfg.data_dir);
    if !dir.join("ca.pem").exists() {
        bail!(
            "no mailbox in {}: run `kade mailbox init` first",
            dir.display()
        );
    }
    let node = Node::open(&cfg).await?;
    let src = https::CertSource {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        generated: true,
    };
    let tls = https::dicom_config(&src, Some(&dir.join("ca.pem")))?;
    let mailbox = Mailbox::new(
        node.index.clone(),
        node.store.clone(),
        MailboxOptions {
            acknowledged_retention_secs: cfg.mailbox.acknowledged_retention_days * 86400,
            directory_file: dir.join("directory.json"),
            authority: load_authority(&dir)?.verifying_key(),
        },
    );
    let app = kade_exchange::mailbox::router(mailbox.clone())
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let addr = format!("{}:{}", cfg.mailbox.bind, cfg.mailbox.port);
    let listener = TcpListener::bind(&addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another program using the port? Choose one with --port or mailbox.port")
    })?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "kade: mailbox listening on {} (HTTPS, client certificates from {})",
            listener.local_addr()?,
            dir.join("ca.pem").display()
        )?;
        writeln!(out, "kade: ready")?;
        out.flush()?;
    }
    let sweep = cfg.mailbox.sweep_secs.max(1);
    let sweeper = mailbox.clone();
    tokio::spawn(async move {
        loop {
            match sweeper.sweep(unix_now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(bundles = n, "retention: ciphertext deleted"),
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(sweep)).await;
        }
    });
    let shared = Arc::new(RwLock::new(tls));
    let limits = https::Limits::of(&cfg.http, None);
    https::serve(
        listener,
        shared,
        app,
        limits,
        crate::serve::shutdown_signal(),
    )
    .await;
    node.index.close().await;
    Ok(())
}

/// Opens the node's exchange side.
async fn open(cfg: &Config) -> anyhow::Result<ExchangeNode> {
    let n = Node::open(cfg).await?;
    ExchangeNode::open(&cfg.data_dir, n.index, n.store, n.ingest, n.audit)
}

fn default_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|u| format!("cli:{u}"))
        .unwrap_or_else(|| "cli".into())
}

/// Runs `kade exchange …`; returns whether everything succeeded.
///
/// # Errors
/// When a step fails; the message says which and what to do.
pub async fn exchange(cfg: &Config, cmd: ExchangeCommand) -> anyhow::Result<bool> {
    match cmd {
        ExchangeCommand::Init { org, name, mailbox } => {
            exchange_init(&cfg.data_dir, &org, &name, &mailbox).map(|()| true)
        }
        ExchangeCommand::Join { enrolment } => exchange_join(cfg, &enrolment).await.map(|()| true),
        ExchangeCommand::Send {
            study,
            to,
            reason,
            for_clinician,
            user,
            yes,
            json,
            expires_in,
        } => {
            let lifetime = match expires_in {
                Some(d) => crate::users::parse_duration(&d)?,
                None => Duration::from_secs(cfg.exchange.bundle_lifetime_days * 86400),
            };
            let req = SendRequest {
                study_uid: study,
                to,
                reason,
                for_clinician,
                user: user.unwrap_or_else(default_user),
                lifetime_secs: lifetime.as_secs().max(1),
                chunk_size: cfg.exchange.chunk_bytes,
            };
            send(cfg, req, yes, json).await.map(|()| true)
        }
        ExchangeCommand::Receive { json } => {
            let mut x = open(cfg).await?;
            let pb = (std::io::stderr().is_terminal() && !json).then(|| {
                let pb = indicatif::ProgressBar::new(0);
                pb.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {pos}/{len} chunks {elapsed_precise}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                pb
            });
            if let Some(pb) = &pb {
                let bar = pb.clone();
                x = x.with_receive_progress(move |bundle, done, total| {
                    bar.set_length(u64::from(total));
                    bar.set_position(u64::from(done));
                    bar.set_message(format!("receiving {bundle}"));
                });
            }
            let reports = x.receive_all().await;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            let reports = reports?;
            if json {
                println!("{}", serde_json::to_string(&reports)?);
            } else if reports.is_empty() {
                println!("kade: nothing waiting at the mailbox");
            } else {
                for r in &reports {
                    println!("{}", describe_received(&r.bundle_id, &r.sender, &r.result));
                }
            }
            Ok(!reports
                .iter()
                .any(|r| matches!(r.result, node::receive::Received::Refused { .. })))
        }
        ExchangeCommand::Inbox { json } => {
            let x = open(cfg).await?;
            let rows = x.inbox().await?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
                return Ok(true);
            }
            if rows.is_empty() {
                println!("kade: no bundles received");
            }
            for r in rows {
                println!(
                    "{}  from {:<12} {:<9} {}",
                    r.bundle_id,
                    r.sender,
                    r.state,
                    match (&r.state[..], &r.reason, &r.local_patient_id) {
                        ("imported", _, Some(p)) => format!("as local patient {p}"),
                        (_, Some(reason), _) => reason.clone(),
                        _ => String::new(),
                    }
                );
                if r.state == "queued" {
                    println!(
                        "    sender's patient {} name {} born {} BSN {} ({} instances; referral: {})",
                        r.sender_patient_id.as_deref().unwrap_or("?"),
                        r.patient_name.as_deref().unwrap_or("?"),
                        r.birth_date.as_deref().unwrap_or("?"),
                        r.national_id.as_deref().unwrap_or("none"),
                        r.instances.unwrap_or(0),
                        r.referral.as_deref().unwrap_or("")
                    );
                    println!(
                        "    import it with: kade exchange reconcile {} --patient LOCAL_PATIENT_ID",
                        r.bundle_id
                    );
                }
            }
            Ok(true)
        }
        ExchangeCommand::Reconcile {
            bundle,
            patient,
            issuer,
            user,
        } => {
            let x = open(cfg).await?;
            let r = x
                .reconcile(
                    &bundle,
                    &patient,
                    issuer.as_deref(),
                    &user.unwrap_or_else(default_user),
                )
                .await?;
            println!("{}", describe_received(&bundle, "", &r));
            Ok(true)
        }
        ExchangeCommand::Status { json } => {
            let x = open(cfg).await?;
            let rows = x.status().await?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
                return Ok(true);
            }
            if rows.is_empty() {
                println!("kade: no bundles sent");
            }
            for r in rows {
                let detail = match (&r.refused, r.imported) {
                    (Some(why), _) => format!("refused: {why}"),
                    (None, Some(i)) => format!(
                        "{i} imported, {} already present, {} rejected",
                        r.already_present.unwrap_or(0),
                        r.rejected.unwrap_or(0)
                    ),
                    _ => format!("{} instances", r.instances),
                };
                println!(
                    "{}  to {:<12} {:<10} study {}  {detail}",
                    r.bundle_id, r.recipient, r.state, r.study_uid
                );
            }
            Ok(true)
        }
        ExchangeCommand::Recall { bundle, user } => {
            let x = open(cfg).await?;
            x.recall(&bundle, &user.unwrap_or_else(default_user))
                .await?;
            println!("kade: bundle {bundle} recalled; the mailbox deleted its ciphertext");
            Ok(true)
        }
    }
}

fn describe_received(id: &str, sender: &str, r: &node::receive::Received) -> String {
    use node::receive::Received;
    let from = if sender.is_empty() {
        String::new()
    } else {
        format!(" from {sender}")
    };
    match r {
        Received::Imported {
            patient_id,
            imported,
            already_present,
            rejected,
        } => format!(
            "kade: bundle {id}{from} imported as local patient {patient_id}: {imported} imported, {already_present} already present, {rejected} rejected"
        ),
        Received::Queued { reason } => format!(
            "kade: bundle {id}{from} waits for reconciliation: {reason}; see kade exchange inbox"
        ),
        Received::Refused { reason } => {
            format!("kade: bundle {id}{from} refused, nothing imported: {reason}")
        }
    }
}

fn exchange_init(data_dir: &Path, org: &str, name: &str, mailbox: &str) -> anyhow::Result<()> {
    check_org_id(org)?;
    if !mailbox.starts_with("https://") {
        bail!("--mailbox must be an https:// URL, e.g. https://mailbox.example.org:9443");
    }
    let dir = node::dir(data_dir);
    if dir.join("node.key").exists() {
        bail!(
            "{} already holds an exchange identity; remove the directory to start over",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let keys = NodeKeys::generate(org)?;
    keys.save(&dir.join("node.key"))?;
    let tls_key = KeyPair::generate()?;
    write_private(&dir.join("client.key"), tls_key.serialize_pem().as_bytes())?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::OrganizationName, org);
    p.distinguished_name.push(DnType::CommonName, org);
    let csr = p.serialize_request(&tls_key)?.pem()?;
    std::fs::write(dir.join("client.csr.pem"), &csr)?;
    let request = EnrolmentRequest {
        entry: keys.public(name, mailbox, unix_now() + 365 * 86400),
        csr_pem: csr,
    };
    let path = dir.join("request.json");
    std::fs::write(&path, serde_json::to_string_pretty(&request)?)?;
    println!(
        "kade: exchange identity for {org} created in {}",
        dir.display()
    );
    println!(
        "kade: send {} to the mailbox operator (it holds public keys only); install the answer with kade exchange join FILE",
        path.display()
    );
    Ok(())
}

async fn exchange_join(cfg: &Config, file: &Path) -> anyhow::Result<()> {
    let dir = node::dir(&cfg.data_dir);
    let keys = NodeKeys::load(&dir.join("node.key"))
        .context("no exchange identity here: run `kade exchange init` first")?;
    let e: Enrolment = serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
    )
    .with_context(|| {
        format!(
            "{} is not an enrolment (made by kade mailbox enroll)",
            file.display()
        )
    })?;
    if e.org_id != keys.org_id() {
        bail!(
            "{} enrols {}, but this node is {}",
            file.display(),
            e.org_id,
            keys.org_id()
        );
    }
    node::parse_verifying_key(&e.authority_key)?;
    std::fs::write(dir.join("client.pem"), &e.client_cert_pem)?;
    std::fs::write(dir.join("mailbox-ca.pem"), &e.ca_pem)?;
    let settings = Settings {
        mailbox_url: e.mailbox_url.clone(),
        authority_key: e.authority_key.clone(),
    };
    std::fs::write(
        dir.join("settings.json"),
        serde_json::to_string_pretty(&settings)?,
    )?;
    println!("kade: {} joined the mailbox at {}", e.org_id, e.mailbox_url);
    // Check the connection now, so a mistake shows here rather than at the first send.
    match open(cfg).await {
        Ok(x) => match x.directory().await {
            Ok(d) => println!(
                "kade: mailbox reachable; directory holds {} organisations",
                d.len()
            ),
            Err(err) => eprintln!("kade: warning: cannot check the mailbox yet: {err:#}"),
        },
        Err(err) => eprintln!("kade: warning: {err:#}"),
    }
    Ok(())
}

async fn send(cfg: &Config, req: SendRequest, yes: bool, json: bool) -> anyhow::Result<()> {
    let x = open(cfg).await?;
    let prepared = x.prepare(&req).await?;
    let s = &prepared.summary;
    eprintln!(
        "kade: about to send to {}: patient {}{}, study {} ({}{}), {} series, {} instances, {:.1} MB; reason: {}",
        req.to,
        s.patient_id,
        if s.national_id_present {
            " with BSN"
        } else {
            " without BSN (the recipient must reconcile by hand)"
        },
        s.study_uid,
        s.modalities.join("/"),
        s.study_date
            .as_deref()
            .map(|d| format!(", {d}"))
            .unwrap_or_default(),
        s.series,
        s.instances,
        s.bytes as f64 / 1e6,
        req.reason
    );
    if s.bytes > cfg.exchange.confirm_above_bytes && !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "this send is larger than exchange.confirm_above_bytes ({} bytes); repeat with --yes to confirm",
                cfg.exchange.confirm_above_bytes
            );
        }
        eprint!("kade: send {:.1} MB? [y/N] ", s.bytes as f64 / 1e6);
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            bail!("not sent");
        }
    }
    let pb = if std::io::stderr().is_terminal() && !json {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} chunks {elapsed_precise}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message("uploading");
        Some(pb)
    } else {
        None
    };
    let t0 = std::time::Instant::now();
    let sent = x
        .send(&req, prepared, |done, total| {
            if let Some(pb) = &pb {
                pb.set_length(u64::from(total));
                pb.set_position(u64::from(done));
            }
        })
        .await?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string(&sent)?);
    } else {
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "kade: bundle {} sealed for {}: {} chunks, {:.1} MB in {:.1} s ({:.0} MB/s){}",
            sent.bundle_id,
            req.to,
            sent.total_chunks,
            sent.payload_bytes as f64 / 1e6,
            secs,
            sent.payload_bytes as f64 / 1e6 / secs.max(1e-3),
            if sent.retried_uploads > 0 {
                format!(
                    "; {} uploads retried after dropped connections",
                    sent.retried_uploads
                )
            } else {
                String::new()
            }
        );
        println!("kade: follow it with kade exchange status");
    }
    Ok(())
}

/// Receives in the background while `kade serve` runs (when the node has joined a mailbox
/// and `exchange.poll_secs` is not 0).
pub fn spawn_poller(cfg: &Config, node: &Node) -> anyhow::Result<bool> {
    if cfg.exchange.poll_secs == 0 || !node::dir(&cfg.data_dir).join("settings.json").exists() {
        return Ok(false);
    }
    let x = ExchangeNode::open(
        &cfg.data_dir,
        node.index.clone(),
        node.store.clone(),
        node.ingest.clone(),
        node.audit.clone(),
    )?;
    let every = Duration::from_secs(cfg.exchange.poll_secs);
    tokio::spawn(async move {
        // The inbox generation last seen: the mailbox holds the next look open until a
        // bundle is sealed after it, so a bundle is fetched moments after its seal.
        let mut seen = None;
        loop {
            let notified = match x.client.wait_inbox(seen, every).await {
                Ok(g) => {
                    seen = g;
                    g.is_some()
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "exchange: cannot reach the mailbox; retrying");
                    tokio::time::sleep(every).await;
                    continue;
                }
            };
            match x.receive_all().await {
                Ok(reports) => {
                    for r in reports {
                        tracing::info!("{}", describe_received(&r.bundle_id, &r.sender, &r.result));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "exchange: cannot receive from the mailbox; retrying");
                    // Look again after the pause even if nothing new is sealed meanwhile.
                    seen = None;
                    tokio::time::sleep(every).await;
                    continue;
                }
            }
            if !notified {
                // A mailbox that does not notify: look again every poll_secs.
                tokio::time::sleep(every).await;
            }
        }
    });
    Ok(true)
}

/// Body of `POST /api/exchange/send`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    study_uid: String,
    to: String,
    reason: String,
    #[serde(default)]
    for_clinician: Option<String>,
    /// Without it the answer is the summary only; with it the study is sealed and sent.
    #[serde(default)]
    confirm: bool,
}

#[derive(Clone)]
struct ApiState {
    node: ExchangeNode,
    auth: kade_auth::Auth,
    chunk_bytes: u32,
    lifetime_secs: u64,
    confirm_above_bytes: u64,
}

pub(crate) fn api_json(
    status: axum::http::StatusCode,
    v: serde_json::Value,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The exchange's HTTP API on the node's HTTPS listener, for admins (bearer token or OIDC):
/// - `POST /api/exchange/send` `{"study_uid", "to", "reason", "for_clinician"?, "confirm"?}`:
///   without `"confirm": true` it answers the summary (and whether the size needs
///   confirmation); with it, it seals and uploads the study and answers the bundle id;
/// - `GET /api/exchange/status`: the sent bundles (as `kade exchange status --json`);
/// - `GET /api/exchange/inbox`: the received bundles (as `kade exchange inbox --json`).
///
/// Every request is authenticated; failures and refusals are audited.
pub fn api_router(
    cfg: &Config,
    node: &Node,
    auth: kade_auth::Auth,
) -> anyhow::Result<Option<axum::Router>> {
    if !node::dir(&cfg.data_dir).join("settings.json").exists() {
        return Ok(None);
    }
    let x = ExchangeNode::open(
        &cfg.data_dir,
        node.index.clone(),
        node.store.clone(),
        node.ingest.clone(),
        node.audit.clone(),
    )?;
    let state = ApiState {
        node: x,
        auth,
        chunk_bytes: cfg.exchange.chunk_bytes,
        lifetime_secs: cfg.exchange.bundle_lifetime_days * 86400,
        confirm_above_bytes: cfg.exchange.confirm_above_bytes,
    };
    Ok(Some(
        axum::Router::new()
            .route("/send", axum::routing::post(api_send))
            .route("/status", axum::routing::get(api_status))
            .route("/inbox", axum::routing::get(api_inbox))
            .with_state(state),
    ))
}

async fn api_admin(
    st: &ApiState,
    headers: &axum::http::HeaderMap,
    ext: &axum::http::Extensions,
    what: &str,
) -> Result<kade_auth::Principal, axum::response::Response> {
    admin_principal(
        &st.auth,
        &st.node.audit,
        headers,
        ext,
        &format!("exchange API {what}"),
    )
    .await
}

/// Authenticates an admin for the node's HTTP API (`what`: the API and operation, for the
/// audit log); the error is the response to send (401 or 403, audited).
pub(crate) async fn admin_principal(
    auth: &kade_auth::Auth,
    audit: &kade_audit::Audit,
    headers: &axum::http::HeaderMap,
    ext: &axum::http::Extensions,
    what: &str,
) -> Result<kade_auth::Principal, axum::response::Response> {
    use axum::http::StatusCode;
    use kade_audit::{AuditEvent, EventKind, Outcome};
    let ip = ext
        .get::<kade_dicomweb::ClientAddr>()
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), |c| {
            c.0.ip()
        });
    let authz = headers
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    match auth.authenticate(authz.as_deref(), ip).await {
        Ok(p) if p.may(kade_auth::Action::Admin) && p.study.is_none() => Ok(p),
        Ok(p) => {
            let ev = AuditEvent::new(
                EventKind::AccessDenied,
                Outcome::MinorFailure,
                format!("user:{}", p.name),
            )
            .address(ip.to_string())
            .detail(format!("{what}: needs the admin role"));
            let _ = audit.record(&ev).await;
            Err(api_json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": format!("{what} needs the admin role")}),
            ))
        }
        Err(d) => {
            let ev = AuditEvent::new(
                EventKind::AuthenticationFailed,
                Outcome::MinorFailure,
                "anonymous",
            )
            .address(ip.to_string())
            .detail(format!("{what}: {}", d.as_str()));
            let _ = audit.record(&ev).await;
            Err(api_json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": format!("authentication required: {}", d.as_str())}),
            ))
        }
    }
}

async fn api_send(
    axum::extract::State(st): axum::extract::State<ApiState>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::http::StatusCode;
    let p = match api_admin(&st, &headers, &ext, "send").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let b: SendBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return api_json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("expected {{\"study_uid\", \"to\", \"reason\", \"confirm\"}}: {e}")}),
            );
        }
    };
    let req = SendRequest {
        study_uid: b.study_uid,
        to: b.to,
        reason: b.reason,
        for_clinician: b.for_clinician,
        user: p.name.clone(),
        lifetime_secs: st.lifetime_secs.max(1),
        chunk_size: st.chunk_bytes,
    };
    let prepared = match st.node.prepare(&req).await {
        Ok(x) => x,
        Err(e) => {
            return api_json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": format!("{e:#}")}),
            );
        }
    };
    if !b.confirm {
        return api_json(
            StatusCode::OK,
            serde_json::json!({
                "summary": prepared.summary,
                "large": prepared.summary.bytes > st.confirm_above_bytes,
                "next": "repeat with \"confirm\": true to seal and send",
            }),
        );
    }
    match st.node.send(&req, prepared, |_, _| {}).await {
        Ok(sent) => api_json(
            StatusCode::OK,
            serde_json::to_value(&sent).unwrap_or_default(),
        ),
        Err(e) => api_json(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"error": format!("{e:#}")}),
        ),
    }
}

async fn api_status(
    axum::extract::State(st): axum::extract::State<ApiState>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> axum::response::Response {
    if let Err(r) = api_admin(&st, &headers, &ext, "status").await {
        return r;
    }
    api_rows(st.node.status().await)
}

async fn api_inbox(
    axum::extract::State(st): axum::extract::State<ApiState>,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> axum::response::Response {
    if let Err(r) = api_admin(&st, &headers, &ext, "inbox").await {
        return r;
    }
    api_rows(st.node.inbox().await)
}

/// Rows as a JSON array, or 503 with the reason.
fn api_rows<T: serde::Serialize>(rows: anyhow::Result<Vec<T>>) -> axum::response::Response {
    match rows {
        Ok(rows) => api_json(
            axum::http::StatusCode::OK,
            serde_json::to_value(rows).unwrap_or_default(),
        ),
        Err(e) => api_json(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": format!("{e:#}")}),
        ),
    }
}
