//! End-to-end tests of the bundle core: a sender seals, a recipient opens, and every
//! tampering the mailbox or a network could do is refused with the error that names it.

use kade_exchange::ExchangeError;
use kade_exchange::bundle::{
    BSN_ISSUER_OID, BundleHeader, Directory, DirectoryFile, InstanceDraft, InstanceOutcome,
    ManifestDraft, NodeKeys, OutcomeEntry, Patient, Receipt, SealOptions, SealedChunk, Sealer,
    SignedDirectoryEntry, SignedReceipt, SigningKey, Study,
};
use sha2::{Digest, Sha256};

/// "Now" for every test (unix seconds).
const NOW: u64 = 1_750_000_000;
const YEAR: u64 = 365 * 24 * 3600;
const PATIENT_NAME: &str = "Jansen^Pieternella";
const BSN: &str = "999911120";
const STUDY_UID: &str = "1.2.826.0.1.3680043.2.1125.1.77";

/// Three hospitals and a directory authority.
struct World {
    authority: SigningKey,
    a: NodeKeys,
    b: NodeKeys,
    c: NodeKeys,
    dir: Directory,
}

fn world() -> World {
    let authority = SigningKey::generate(&mut rand::rngs::OsRng);
    let a = NodeKeys::generate("00000001").unwrap();
    let b = NodeKeys::generate("00000002").unwrap();
    let c = NodeKeys::generate("00000003").unwrap();
    let entries: Vec<_> = [(&a, "A"), (&b, "B"), (&c, "C")]
        .into_iter()
        .map(|(k, name)| {
            SignedDirectoryEntry::sign(
                k.public(name, "https://mailbox.example/", NOW + YEAR),
                &authority,
            )
        })
        .collect();
    let text = DirectoryFile::new(entries).to_json();
    let dir = Directory::from_json(&text, &authority.verifying_key()).unwrap();
    World {
        authority,
        a,
        b,
        c,
        dir,
    }
}

/// Deterministic pseudo-random bytes.
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn draft(blobs: &[Vec<u8>]) -> ManifestDraft {
    ManifestDraft {
        sender_user: "dr.verzender".into(),
        intended_clinician: Some("dr.ontvanger".into()),
        reason: "Verwijzing: second opinion longnodus".into(),
        patient: Patient {
            id: "PID-4711".into(),
            issuer: Some("HOSP-A".into()),
            national_id: Some(BSN.into()),
            national_id_issuer: Some(BSN_ISSUER_OID.into()),
            name: PATIENT_NAME.into(),
            birth_date: Some("19540312".into()),
            sex: Some("F".into()),
        },
        studies: vec![Study {
            study_uid: STUDY_UID.into(),
            description: Some("CT thorax".into()),
            modalities: vec!["CT".into()],
            date: Some("20250601".into()),
        }],
        instances: blobs
            .iter()
            .enumerate()
            .map(|(n, b)| InstanceDraft {
                sop_instance_uid: format!("{STUDY_UID}.1.{n}"),
                study_uid: STUDY_UID.into(),
                series_uid: format!("{STUDY_UID}.1"),
                sha256: Sha256::digest(b).into(),
                size: b.len() as u64,
            })
            .collect(),
    }
}

/// A sealed bundle as the mailbox would hold it.
struct Sent {
    header: BundleHeader,
    chunks: Vec<SealedChunk>,
    manifest_sha256: [u8; 32],
}

/// Seals `blobs` from `from` to `to` at time `at`, writing in pieces of `piece` bytes.
fn send(
    from: &NodeKeys,
    to: &NodeKeys,
    w: &World,
    blobs: &[Vec<u8>],
    chunk_size: u32,
    at: u64,
) -> Sent {
    let entry = w.dir.recipient(to.org_id(), at).unwrap();
    let opts = SealOptions::new()
        .chunk_size(chunk_size)
        .lifetime_secs(7 * 24 * 3600);
    let mut sealer = Sealer::new(from, entry, draft(blobs), opts, at).unwrap();
    let mut chunks = Vec::new();
    let mut writer = sealer.writer();
    for b in blobs {
        for piece in b.chunks(64 * 1024) {
            chunks.extend(writer.write(piece).unwrap());
        }
    }
    writer.finish().unwrap();
    Sent {
        header: sealer.header().clone(),
        chunks,
        manifest_sha256: sealer.manifest_sha256(),
    }
}

/// A small bundle A → B: three instances over several 1 KiB chunks.
fn small(w: &World) -> (Vec<Vec<u8>>, Sent) {
    let blobs = vec![blob(1, 1500), blob(2, 2500), blob(3, 700)];
    let sent = send(&w.a, &w.b, w, &blobs, 1024, NOW);
    (blobs, sent)
}

/// Opens `header` as `keys` and feeds `(index, ciphertext)` in the given order; returns the
/// reassembled instances.
fn receive(
    header: &BundleHeader,
    keys: &NodeKeys,
    dir: &Directory,
    now: u64,
    chunks: &[(u32, &[u8])],
) -> Result<Vec<Vec<u8>>, ExchangeError> {
    let (opener, manifest) = kade_exchange::bundle::Opener::open(header, keys, dir, now)?;
    let mut asm = opener.assembler(&manifest)?;
    let mut out = vec![Vec::new(); manifest.instances.len()];
    for &(index, ct) in chunks {
        let opened = asm.push(index, ct)?;
        for p in &opened.pieces {
            out[p.instance].extend_from_slice(opened.bytes(p));
        }
    }
    asm.finish()?;
    Ok(out)
}

fn in_order(chunks: &[SealedChunk]) -> Vec<(u32, &[u8])> {
    chunks
        .iter()
        .map(|c| (c.index, c.ciphertext.as_slice()))
        .collect()
}

#[test]
fn ten_megabytes_in_one_mebibyte_chunks_round_trip() {
    let w = world();
    let blobs = vec![
        blob(11, 3_000_000),
        blob(12, 4_500_001),
        blob(13, 2_500_000),
    ];
    let sent = send(&w.a, &w.b, &w, &blobs, 1024 * 1024, NOW);
    assert_eq!(sent.header.total_chunks, 10);
    assert_eq!(sent.chunks.len(), 10);
    assert_eq!(sent.header.payload_size, 10_000_001);
    assert!(
        sent.chunks
            .iter()
            .enumerate()
            .all(|(i, c)| c.index == i as u32)
    );

    let (opener, manifest) =
        kade_exchange::bundle::Opener::open(&sent.header, &w.b, &w.dir, NOW + 60).unwrap();
    assert_eq!(manifest.patient.name, PATIENT_NAME);
    assert_eq!(manifest.patient.national_id.as_deref(), Some(BSN));
    assert_eq!(manifest.sender, "00000001");
    assert_eq!(manifest.reason, "Verwijzing: second opinion longnodus");
    assert_eq!(manifest.chunks_of(1), 2..8);
    assert_eq!(opener.manifest_sha256(), sent.manifest_sha256);

    let mut asm = opener.assembler(&manifest).unwrap();
    let mut got = vec![Vec::new(); 3];
    let mut verified = Vec::new();
    for c in &sent.chunks {
        let opened = asm.push(c.index, &c.ciphertext).unwrap();
        for p in &opened.pieces {
            got[p.instance].extend_from_slice(opened.bytes(p));
            if p.completes {
                verified.push(p.instance);
            }
        }
    }
    asm.finish().unwrap();
    assert_eq!(verified, [0, 1, 2], "each instance verified once, in order");
    assert_eq!(got, blobs);
}

#[test]
fn small_bundle_round_trips() {
    let w = world();
    let (blobs, sent) = small(&w);
    assert_eq!(sent.header.total_chunks, 5);
    assert_eq!(
        receive(&sent.header, &w.b, &w.dir, NOW, &in_order(&sent.chunks)).unwrap(),
        blobs
    );
}

#[test]
fn bit_flip_in_a_chunk_is_tampering_and_a_clean_copy_can_follow() {
    let w = world();
    let (blobs, sent) = small(&w);
    let mut bad = sent.chunks[2].ciphertext.clone();
    bad[100] ^= 0x01;
    let mut order = in_order(&sent.chunks);
    order[2].1 = &bad;
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &order).unwrap_err();
    assert!(matches!(err, ExchangeError::Tampered { chunk: 2 }), "{err}");

    // The assembler stays at chunk 2, so a re-downloaded clean copy completes the bundle.
    let (opener, manifest) =
        kade_exchange::bundle::Opener::open(&sent.header, &w.b, &w.dir, NOW).unwrap();
    let mut asm = opener.assembler(&manifest).unwrap();
    let mut got = vec![Vec::new(); 3];
    for (i, c) in sent.chunks.iter().enumerate() {
        if i == 2 {
            assert!(asm.push(2, &bad).is_err());
        }
        let o = asm.push(c.index, &c.ciphertext).unwrap();
        for p in &o.pieces {
            got[p.instance].extend_from_slice(o.bytes(p));
        }
    }
    asm.finish().unwrap();
    assert_eq!(got, blobs);
}

#[test]
fn swapped_chunks_are_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let mut order = in_order(&sent.chunks);
    order.swap(0, 1);
    order[0].0 = 0;
    order[1].0 = 1;
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &order).unwrap_err();
    assert!(matches!(err, ExchangeError::Tampered { chunk: 0 }), "{err}");
}

#[test]
fn truncated_bundle_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let order = in_order(&sent.chunks);
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &order[..4]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::MissingChunk { index: 4 }),
        "{err}"
    );
}

#[test]
fn gap_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let order = in_order(&sent.chunks);
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &[order[0], order[2]]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::MissingChunk { index: 1 }),
        "{err}"
    );
}

#[test]
fn duplicated_chunk_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let order = in_order(&sent.chunks);
    // The same chunk delivered twice under its own index.
    let twice = [order[0], order[0], order[1], order[2], order[3], order[4]];
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &twice).unwrap_err();
    assert!(
        matches!(err, ExchangeError::DuplicateChunk { index: 0 }),
        "{err}"
    );
    // The same chunk replayed under the next index.
    let replayed = [order[0], (1, order[0].1)];
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &replayed).unwrap_err();
    assert!(matches!(err, ExchangeError::Tampered { chunk: 1 }), "{err}");
}

#[test]
fn out_of_range_index_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let order = in_order(&sent.chunks);
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &[(5, order[4].1)]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::ChunkOutOfRange { index: 5, total: 5 }),
        "{err}"
    );
}

#[test]
fn chunk_from_another_bundle_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let (_, other) = small(&w);
    let mut order = in_order(&sent.chunks);
    order[0].1 = &other.chunks[0].ciphertext;
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &order).unwrap_err();
    assert!(matches!(err, ExchangeError::Tampered { chunk: 0 }), "{err}");
}

#[test]
fn unknown_sender_is_refused() {
    let w = world();
    let stranger = NodeKeys::generate("99999999").unwrap();
    let blobs = vec![blob(1, 2000)];
    let sent = send(&stranger, &w.b, &w, &blobs, 1024, NOW);
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(
        matches!(err, ExchangeError::UnknownSender { ref org_id } if org_id == "99999999"),
        "{err}"
    );
}

#[test]
fn known_org_with_the_wrong_key_is_refused() {
    let w = world();
    let impostor = NodeKeys::generate("00000001").unwrap();
    let sent = send(&impostor, &w.b, &w, &[blob(1, 2000)], 1024, NOW);
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(
        matches!(
            err,
            ExchangeError::BadSignature {
                what: "bundle header"
            }
        ),
        "{err}"
    );
}

#[test]
fn tampered_sealed_manifest_is_refused_before_decryption() {
    let w = world();
    let (_, mut sent) = small(&w);
    sent.header.sealed_manifest[10] ^= 0x80;
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::BadSignature { .. }), "{err}");
}

#[test]
fn tampered_wrapped_key_is_refused() {
    let w = world();
    let (_, mut sent) = small(&w);
    sent.header.wrapped_key[40] ^= 0x01;
    let err = receive(&sent.header, &w.b, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::BadSignature { .. }), "{err}");
}

#[test]
fn changed_header_fields_are_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let mut h = sent.header.clone();
    h.sender = w.c.org_id().into();
    let err = receive(&h, &w.b, &w.dir, NOW, &[]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::BadSignature { .. }),
        "sender → known org C: {err}"
    );
    let mut h = sent.header.clone();
    h.sender = "12345678".into();
    let err = receive(&h, &w.b, &w.dir, NOW, &[]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::UnknownSender { .. }),
        "sender → unknown org: {err}"
    );
    let mut h = sent.header.clone();
    h.expires_at += YEAR;
    let err = receive(&h, &w.b, &w.dir, NOW, &[]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::BadSignature { .. }),
        "expires_at: {err}"
    );
    let mut h = sent.header.clone();
    h.total_chunks = 4;
    let err = receive(&h, &w.b, &w.dir, NOW, &[]).unwrap_err();
    assert!(
        matches!(err, ExchangeError::BadSignature { .. }),
        "total_chunks: {err}"
    );
}

#[test]
fn bundle_for_someone_else_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let err = receive(&sent.header, &w.c, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::NotForUs { .. }), "{err}");
    // Readdressing the header to C breaks the signature.
    let mut h = sent.header.clone();
    h.recipient = w.c.org_id().into();
    let err = receive(&h, &w.c, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::BadSignature { .. }), "{err}");
    // B's org id with other keys (rotated away) cannot unwrap the content key.
    let old_b = NodeKeys::generate("00000002").unwrap();
    let err = receive(&sent.header, &old_b, &w.dir, NOW, &in_order(&sent.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::KeyUnwrap), "{err}");
}

#[test]
fn stale_bundle_is_refused() {
    let w = world();
    let (_, sent) = small(&w);
    let exp = sent.header.expires_at;
    assert!(receive(&sent.header, &w.b, &w.dir, exp - 1, &in_order(&sent.chunks)).is_ok());
    let err = receive(&sent.header, &w.b, &w.dir, exp, &in_order(&sent.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::Stale { .. }), "{err}");
}

#[test]
fn bundle_from_the_future_is_refused() {
    let w = world();
    let blobs = vec![blob(1, 2000)];
    let within_skew = send(&w.a, &w.b, &w, &blobs, 1024, NOW + 240);
    assert!(
        receive(
            &within_skew.header,
            &w.b,
            &w.dir,
            NOW,
            &in_order(&within_skew.chunks)
        )
        .is_ok()
    );
    let future = send(&w.a, &w.b, &w, &blobs, 1024, NOW + 3600);
    let err = receive(&future.header, &w.b, &w.dir, NOW, &in_order(&future.chunks)).unwrap_err();
    assert!(matches!(err, ExchangeError::NotYetValid { .. }), "{err}");
}

#[test]
fn no_directory_entry_no_bundle() {
    let w = world();
    let err = w.dir.recipient("55555555", NOW).unwrap_err();
    assert!(
        matches!(err, ExchangeError::UnknownRecipient { .. }),
        "{err}"
    );
    let err = w.dir.recipient(w.b.org_id(), NOW + YEAR).unwrap_err();
    assert!(matches!(err, ExchangeError::EntryExpired { .. }), "{err}");
    let entry = w.dir.get(w.b.org_id()).unwrap();
    let err = Sealer::new(
        &w.a,
        entry,
        draft(&[blob(1, 10)]),
        SealOptions::new(),
        NOW + YEAR,
    )
    .unwrap_err();
    assert!(matches!(err, ExchangeError::EntryExpired { .. }), "{err}");
}

#[test]
fn changed_blob_is_caught_at_the_sender() {
    let w = world();
    let blobs = vec![blob(1, 3000)];
    let entry = w.dir.recipient(w.b.org_id(), NOW).unwrap();
    let opts = SealOptions::new().chunk_size(1024);
    let mut sealer = Sealer::new(&w.a, entry, draft(&blobs), opts, NOW).unwrap();
    let mut changed = blobs[0].clone();
    changed[2999] ^= 1;
    let mut writer = sealer.writer();
    let err = writer.write(&changed).unwrap_err();
    assert!(
        matches!(err, ExchangeError::InstanceMismatch { .. }),
        "{err}"
    );
    let err = sealer.seal_chunk(0, &[0; 10]).unwrap_err();
    assert!(
        matches!(
            err,
            ExchangeError::ChunkLength {
                expected: 1024,
                actual: 10,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_instance_hash_from_a_signed_sender_is_caught_at_the_recipient() {
    let w = world();
    let blobs = vec![blob(1, 3000)];
    let mut d = draft(&blobs);
    d.instances[0].sha256 = [0xAB; 32];
    let entry = w.dir.recipient(w.b.org_id(), NOW).unwrap();
    let mut sealer = Sealer::new(&w.a, entry, d, SealOptions::new().chunk_size(1024), NOW).unwrap();
    // seal_chunk does not check hashes (the writer does), so this sender can lie.
    let chunks: Vec<_> = blobs[0]
        .chunks(1024)
        .enumerate()
        .map(|(i, p)| sealer.seal_chunk(i as u32, p).unwrap())
        .collect();
    let err = receive(sealer.header(), &w.b, &w.dir, NOW, &in_order(&chunks)).unwrap_err();
    assert!(
        matches!(err, ExchangeError::InstanceMismatch { .. }),
        "{err}"
    );
}

#[test]
fn header_json_holds_no_patient_data() {
    let w = world();
    let (_, sent) = small(&w);
    let json = sent.header.to_json();
    let d = draft(&[blob(1, 1500)]);
    for secret in [
        PATIENT_NAME,
        "Jansen",
        BSN,
        STUDY_UID,
        "PID-4711",
        "19540312",
        "second opinion",
        "dr.verzender",
        "dr.ontvanger",
        d.instances[0].sop_instance_uid.as_str(),
        "1.2.826.0.1.3680043",
    ] {
        assert!(!json.contains(secret), "header JSON contains {secret:?}");
    }
    let back = BundleHeader::from_json(&json).unwrap();
    assert_eq!(back, sent.header);
}

#[test]
fn receipts_verify_and_tampering_is_caught() {
    let w = world();
    let (_, sent) = small(&w);
    let (opener, manifest) =
        kade_exchange::bundle::Opener::open(&sent.header, &w.b, &w.dir, NOW).unwrap();
    let receipt = Receipt {
        bundle_id: opener.bundle_id(),
        manifest_sha256: opener.manifest_sha256(),
        sender: opener.sender().into(),
        recipient: w.b.org_id().into(),
        refused: None,
        outcomes: vec![
            OutcomeEntry {
                sop_instance_uid: manifest.instances[0].sop_instance_uid.clone(),
                outcome: InstanceOutcome::Imported,
            },
            OutcomeEntry {
                sop_instance_uid: manifest.instances[1].sop_instance_uid.clone(),
                outcome: InstanceOutcome::AlreadyPresent,
            },
            OutcomeEntry {
                sop_instance_uid: manifest.instances[2].sop_instance_uid.clone(),
                outcome: InstanceOutcome::Rejected {
                    reason: "UID collision with different content".into(),
                },
            },
        ],
        at: NOW + 10,
    };
    assert!(
        receipt.clone().sign(&w.c).is_err(),
        "only the recipient signs its receipt"
    );
    let signed = receipt.sign(&w.b).unwrap();

    // Through the mailbox: sealed to A, who opens and verifies it.
    let sealed = signed.seal_for(w.dir.get(w.a.org_id()).unwrap()).unwrap();
    let text = String::from_utf8_lossy(&sealed);
    assert!(!text.contains(STUDY_UID));
    let got =
        SignedReceipt::open_sealed(&sealed, &w.a, w.b.org_id(), &sent.header.bundle_id).unwrap();
    let r = got.verify(&w.dir).unwrap();
    assert_eq!(r.manifest_sha256, sent.manifest_sha256);
    assert_eq!(r.outcomes.len(), 3);
    let err = SignedReceipt::open_sealed(&sealed, &w.c, w.b.org_id(), &sent.header.bundle_id)
        .unwrap_err();
    assert!(matches!(err, ExchangeError::KeyUnwrap), "{err}");

    let json = serde_json::to_string(&got).unwrap();
    assert!(json.contains(r#""outcome":"already-present""#), "{json}");
    let back: SignedReceipt = serde_json::from_str(&json).unwrap();
    back.verify(&w.dir).unwrap();

    let mut forged = got.clone();
    forged.receipt.outcomes[2].outcome = InstanceOutcome::Imported;
    let err = forged.verify(&w.dir).unwrap_err();
    assert!(
        matches!(err, ExchangeError::BadSignature { what: "receipt" }),
        "{err}"
    );
    let mut forged = got.clone();
    forged.receipt.recipient = w.c.org_id().into();
    assert!(matches!(
        forged.verify(&w.dir),
        Err(ExchangeError::BadSignature { .. })
    ));
}

#[test]
fn directory_signed_by_another_authority_is_refused() {
    let w = world();
    let rogue = SigningKey::generate(&mut rand::rngs::OsRng);
    let entry = NodeKeys::generate("66666666").unwrap().public(
        "Rogue",
        "https://evil.example/",
        NOW + YEAR,
    );
    let genuine = SignedDirectoryEntry::sign(
        w.a.public("A", "https://mailbox.example/", NOW + YEAR),
        &w.authority,
    );
    let text =
        DirectoryFile::new(vec![genuine, SignedDirectoryEntry::sign(entry, &rogue)]).to_json();
    let err = Directory::from_json(&text, &w.authority.verifying_key()).unwrap_err();
    assert!(
        matches!(
            err,
            ExchangeError::BadSignature {
                what: "directory entry"
            }
        ),
        "{err}"
    );
}

#[test]
fn keys_save_and_load_with_owner_only_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exchange-keys.json");
    let keys = NodeKeys::generate("00000001").unwrap();
    keys.save(&path).unwrap();
    let back = NodeKeys::load(&path).unwrap();
    assert_eq!(back.org_id(), keys.org_id());
    assert_eq!(back.verifying_key(), keys.verifying_key());
    assert_eq!(back.encryption_public_key(), keys.encryption_public_key());
    let err = keys.save(&path).unwrap_err();
    assert!(
        matches!(err, ExchangeError::Io { .. }),
        "save must not overwrite: {err}"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeKeys::load(&path).unwrap_err();
        assert!(
            matches!(err, ExchangeError::InsecureKeyFile { mode: 0o644, .. }),
            "{err}"
        );
    }

    // The reloaded keys seal a bundle that opens against the original keys' directory entry.
    let b = NodeKeys::generate("00000002").unwrap();
    let authority = SigningKey::generate(&mut rand::rngs::OsRng);
    let signed: Vec<_> = [&keys, &b]
        .into_iter()
        .map(|k| {
            SignedDirectoryEntry::sign(
                k.public("x", "https://mailbox.example/", NOW + YEAR),
                &authority,
            )
        })
        .collect();
    let dir = Directory::from_signed(&signed, &authority.verifying_key()).unwrap();
    let blobs = vec![blob(5, 2000)];
    let entry = dir.recipient(b.org_id(), NOW).unwrap();
    let mut sealer = Sealer::new(
        &back,
        entry,
        draft(&blobs),
        SealOptions::new().chunk_size(1024),
        NOW,
    )
    .unwrap();
    let chunks = sealer.writer().write(&blobs[0]).unwrap();
    assert_eq!(
        receive(sealer.header(), &b, &dir, NOW, &in_order(&chunks)).unwrap(),
        blobs
    );
}
