//! Administrative commands: peers, stats, verify, fsck, audit.

use std::collections::HashSet;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use kade_audit::{AuditEvent, EventKind, Outcome};
use kade_core::{AeTitle, Peer, peer};
use sha2::{Digest, Sha256};

use crate::cli::{AuditCommand, FsckArgs, PeerCommand};
use crate::config::Config;
use crate::node::Node;

/// Whether a check found the archive clean (the process exit status follows it).
pub type Clean = bool;

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, ETA {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// `kade peer …`.
///
/// # Errors
/// Invalid arguments or database errors.
pub async fn peer(cfg: &Config, cmd: PeerCommand) -> anyhow::Result<()> {
    let node = Node::open(cfg).await?;
    match cmd {
        PeerCommand::Add {
            ae_title,
            host,
            port,
            allow,
            max_matches,
            narrow_queries,
            tls_cert_sha256,
            tls,
        } => {
            let p = Peer {
                ae_title: AeTitle::new(&ae_title).context("AE title")?,
                host: peer::parse_host(&host).map_err(anyhow::Error::msg)?,
                port,
                allow: peer::parse_permissions(&allow).map_err(anyhow::Error::msg)?,
                max_matches,
                narrow_queries,
                tls_cert_sha256: tls_cert_sha256
                    .map(|f| {
                        let n = peer::normalize_fingerprint(&f);
                        if n.len() == 64 {
                            Ok(n)
                        } else {
                            Err(anyhow::anyhow!(
                                "--tls-cert-sha256 must be a SHA-256 fingerprint (64 hex digits, \
                                 colons allowed), e.g. from: openssl x509 -in cert.pem -noout \
                                 -fingerprint -sha256"
                            ))
                        }
                    })
                    .transpose()?,
                tls,
            };
            node.index.put_peer(&p).await?;
            record(
                &node,
                format!(
                    "peer {} added: host {}, allow {}{}",
                    p.ae_title,
                    p.host,
                    peer::format_permissions(&p.allow),
                    if p.tls { ", reached over TLS" } else { "" }
                ),
            )
            .await;
            println!(
                "peer {} may connect from {} ({})",
                p.ae_title,
                p.host,
                peer::format_permissions(&p.allow)
            );
        }
        PeerCommand::Remove { ae_title } => {
            let ae = AeTitle::new(&ae_title).context("AE title")?;
            if node.index.remove_peer(&ae).await? {
                record(&node, format!("peer {ae} removed")).await;
                println!("peer {ae} removed");
            } else if cfg.dicom.peers.iter().any(|p| p.ae_title == ae) {
                anyhow::bail!("peer {ae} comes from the configuration file: remove it there");
            } else {
                anyhow::bail!("no peer {ae}: see kade peer list");
            }
        }
        PeerCommand::List { json } => {
            let mut all: Vec<(Peer, &str)> = cfg
                .dicom
                .peers
                .iter()
                .cloned()
                .map(|p| (p, "config"))
                .collect();
            all.extend(
                node.index
                    .peers()
                    .await?
                    .into_iter()
                    .map(|p| (p, "database")),
            );
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|(p, src)| serde_json::json!({"ae_title": p.ae_title, "host": p.host.to_string(), "port": p.port, "allow": p.allow, "tls": p.tls, "source": src}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if all.is_empty() {
                println!("no peers; add one with: kade peer add AE --host ADDR --allow echo,store");
            } else {
                println!(
                    "{:<16} {:<20} {:<6} {:<28} SOURCE",
                    "AE TITLE", "HOST", "PORT", "ALLOW"
                );
                for (p, src) in all {
                    let port = p.port.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<16} {:<20} {:<6} {:<28} {src}",
                        p.ae_title,
                        p.host,
                        port,
                        peer::format_permissions(&p.allow)
                    );
                }
            }
        }
    }
    node.index.close().await;
    Ok(())
}

async fn record(node: &Node, detail: String) {
    let ev = AuditEvent::new(EventKind::Admin, Outcome::Success, "admin:cli").detail(detail);
    if let Err(e) = node.audit.record(&ev).await {
        eprintln!("warning: could not write audit entry: {e}");
    }
}

/// `kade stats`.
///
/// # Errors
/// Database errors.
pub async fn stats(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let node = Node::open(cfg).await?;
    let s = node.index.stats().await?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("patients   {}", s.patients);
        println!("studies    {}", s.studies);
        println!("series     {}", s.series);
        println!("instances  {}", s.instances);
        println!(
            "bytes      {} ({:.1} MiB)",
            s.bytes,
            s.bytes as f64 / 1048576.0
        );
        println!("storage    {}", node.store.describe());
    }
    node.index.close().await;
    Ok(())
}

/// `kade verify`: re-hash every blob.
///
/// # Errors
/// Database or storage errors other than a missing blob.
pub async fn verify(cfg: &Config, json: bool) -> anyhow::Result<Clean> {
    let node = Node::open(cfg).await?;
    let total = node.index.stats().await?.instances as u64;
    let pb = bar(total, "verifying");
    let (mut checked, mut missing, mut changed) = (0u64, Vec::new(), Vec::new());
    let mut after = 0;
    loop {
        let page = node.index.blob_refs(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let results: Vec<_> = futures::stream::iter(page)
            .map(|r| {
                let store = node.store.clone();
                async move {
                    let outcome = hash_blob(&store, &r.blob_key).await;
                    (r, outcome)
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for (r, outcome) in results {
            checked += 1;
            pb.inc(1);
            match outcome? {
                None => missing.push(r.sop_uid),
                Some((size, sha)) if sha != r.sha256 || size as i64 != r.size_bytes => {
                    changed.push(r.sop_uid)
                }
                Some(_) => {}
            }
        }
    }
    pb.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({"checked": checked, "missing": missing, "changed": changed})
        );
    } else {
        println!(
            "checked {checked} blobs: {} missing, {} changed",
            missing.len(),
            changed.len()
        );
        for s in &missing {
            println!("missing  {s}");
        }
        for s in &changed {
            println!("changed  {s}");
        }
    }
    node.index.close().await;
    Ok(missing.is_empty() && changed.is_empty())
}

async fn hash_blob(
    store: &kade_store::BlobStore,
    key: &str,
) -> anyhow::Result<Option<(u64, String)>> {
    let mut stream = match store.get_stream(key).await {
        Ok(s) => s,
        Err(kade_store::StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.try_next().await? {
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    Ok(Some((n, hex::encode(h.finalize()))))
}

/// `kade fsck`: orphaned and missing blobs.
///
/// # Errors
/// Database or storage errors.
pub async fn fsck(cfg: &Config, args: FsckArgs) -> anyhow::Result<Clean> {
    let node = Node::open(cfg).await?;
    let mut referenced = HashSet::new();
    let mut after = 0;
    loop {
        let page = node.index.blob_refs(after, 5000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        referenced.extend(page.into_iter().map(|r| (r.blob_key, r.sop_uid)));
    }
    let keys: HashSet<&str> = referenced.iter().map(|(k, _)| k.as_str()).collect();
    let pb = ProgressBar::new_spinner();
    pb.set_message("listing blobs");
    let mut present = HashSet::new();
    let mut orphans = Vec::new();
    let cutoff = chrono::Utc::now() - chrono::Duration::seconds(args.min_age as i64);
    let mut young = 0;
    // Blobs still named in the journal are settled (re-indexed if need be) by `kade serve`
    // at start-up, never deleted here.
    let journaled: HashSet<String> = node.store.journaled()?.iter().map(|m| m.key()).collect();
    let mut list = node.store.list("dicom/");
    while let Some(b) = list.try_next().await? {
        pb.inc(1);
        if keys.contains(b.key.as_str()) {
            present.insert(b.key);
        } else if journaled.contains(&b.key) {
            young += 1;
        } else if b.modified <= cutoff {
            orphans.push(b);
        } else {
            young += 1;
        }
    }
    pb.finish_and_clear();
    let missing: Vec<&(String, String)> = referenced
        .iter()
        .filter(|(k, _)| !present.contains(k))
        .collect();
    let mut repaired = 0;
    if args.repair && !orphans.is_empty() {
        let pb = bar(orphans.len() as u64, "deleting orphans");
        for o in &orphans {
            // Re-check: a store may have indexed it since the listing.
            if !node.index.blob_is_referenced(&o.key).await? {
                node.store.delete(&o.key).await?;
                repaired += 1;
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        record(&node, format!("fsck removed {repaired} orphaned blob(s)")).await;
    }
    let orphan_bytes: u64 = orphans.iter().map(|o| o.size).sum();
    if args.json {
        let v = serde_json::json!({
            "indexed": referenced.len(),
            "orphans": orphans.iter().map(|o| &o.key).collect::<Vec<_>>(),
            "orphans_removed": repaired,
            "recent_unindexed": young,
            "missing": missing.iter().map(|(k, s)| serde_json::json!({"sop_instance_uid": s, "blob": k})).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!(
            "{} indexed instances, {} blobs present",
            referenced.len(),
            present.len()
        );
        println!(
            "orphaned blobs: {} ({} bytes){}",
            orphans.len(),
            orphan_bytes,
            if args.repair {
                format!(", {repaired} removed")
            } else {
                String::new()
            }
        );
        if young > 0 {
            println!(
                "blobs younger than {} s not yet indexed (probably stores in progress): {young}",
                args.min_age
            );
        }
        println!("missing blobs: {}", missing.len());
        for (k, s) in &missing {
            println!("missing  {s}  ({k})");
        }
        if !orphans.is_empty() && !args.repair {
            println!("run `kade fsck --repair` to delete the orphaned blobs");
        }
    }
    node.index.close().await;
    Ok(missing.is_empty() && (orphans.is_empty() || repaired == orphans.len()))
}

/// `kade audit …`.
///
/// # Errors
/// Database errors.
pub async fn audit(cfg: &Config, cmd: AuditCommand) -> anyhow::Result<Clean> {
    let node = Node::open(cfg).await?;
    let clean = match cmd {
        AuditCommand::Verify => {
            let pb = ProgressBar::new_spinner();
            pb.set_message("verifying audit chain");
            let r = kade_audit::verify(&node.index, |n| pb.set_position(n as u64)).await?;
            pb.finish_and_clear();
            match r.broken {
                None => {
                    println!("audit log intact: {} entries, chain verified", r.entries);
                    true
                }
                Some((seq, why)) => {
                    println!(
                        "audit log BROKEN at entry {seq}: {why} ({} entries before it verified)",
                        r.entries
                    );
                    false
                }
            }
        }
        AuditCommand::Tail { n, json } => {
            for e in node.audit.tail(n).await?.into_iter().rev() {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!(
                        "{:>6} {} {:<22} {:<15} {:<20} {} {}",
                        e.seq,
                        e.at,
                        e.event,
                        e.outcome,
                        e.actor,
                        e.sop_uid.or(e.study_uid).unwrap_or_default(),
                        e.detail.unwrap_or_default()
                    );
                }
            }
            true
        }
    };
    node.index.close().await;
    Ok(clean)
}
