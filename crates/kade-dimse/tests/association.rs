//! One association served in-process over an in-memory pipe (`tokio::io::duplex`): no
//! process, no port. A small requestor written here speaks PDUs directly, so the tests can
//! send what ordinary peers never do and take the C-STORE sub-operations of a C-GET.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{
    AssociationRQ, Pdu, PresentationContextProposed, PresentationContextResultReason,
    RequestorRoles, UserVariableItem,
};
use kade_core::{AeTitle, Peer, Permission};
use kade_dimse::association::{self, Context};
use kade_dimse::command::{CommandSet, field, tag};
use kade_dimse::pdu::{self, Pdv, Received};
use kade_dimse::{PeerDirectory, ServerOptions};
use kade_testkit::{r#gen, part10::Part10};
use tokio::io::{AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const ELE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// A node's DIMSE side on a temporary directory (local blobs, SQLite index).
struct Node {
    _dir: tempfile::TempDir,
    ctx: Arc<Context>,
}

impl Node {
    async fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let store = kade_store::BlobStore::local(&root.join("blobs"), &root.join("spool")).unwrap();
        let index = kade_index::Index::open_sqlite(&root.join("index.db"))
            .await
            .unwrap();
        let ingest =
            kade_ingest::Ingest::new(store, index.clone(), kade_ingest::DuplicatePolicy::Reject);
        let peer = Peer {
            ae_title: AeTitle::new("SCU").unwrap(),
            host: "127.0.0.1/32".parse().unwrap(),
            port: None,
            allow: vec![Permission::Echo, Permission::Store, Permission::Get],
            max_matches: None,
            narrow_queries: false,
            tls_cert_sha256: None,
            tls: false,
        };
        let ctx = Context::new(
            ServerOptions::new(AeTitle::new("KADE").unwrap()),
            ingest,
            PeerDirectory::new(vec![peer], None),
            kade_audit::Audit::new(index),
        );
        Node {
            _dir: dir,
            ctx: Arc::new(ctx),
        }
    }

    /// Serves one association over a pipe and returns the requestor's end, associated with
    /// `proposals` (abstract syntax, transfer syntax), taking the SCP role for `scp_role`.
    async fn associate(&self, proposals: &[(&str, &str)], scp_role: &[&str]) -> Client {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let _stop = _stop;
            let addr = "127.0.0.1:40000".parse().unwrap();
            association::serve(theirs, addr, ctx, shutdown, None, None).await;
        });
        let (rd, wr) = tokio::io::split(ours);
        let mut c = Client {
            rd: BufReader::new(rd),
            wr,
            pending: VecDeque::new(),
            contexts: Vec::new(),
        };
        c.negotiate(proposals, scp_role).await;
        c
    }

    async fn instances(&self) -> usize {
        let q = kade_index::query::LevelQuery {
            matches: Vec::new(),
            limit: None,
            offset: 0,
        };
        self.ctx
            .ingest
            .index()
            .find_instances(&q)
            .await
            .unwrap()
            .unwrap()
            .len()
    }
}

/// A message: its command set and data set, if any.
struct Message {
    pc: u8,
    command: CommandSet,
    data: Option<Vec<u8>>,
}

/// The requestor's end of an association.
struct Client {
    rd: BufReader<ReadHalf<DuplexStream>>,
    wr: WriteHalf<DuplexStream>,
    pending: VecDeque<Pdv>,
    /// Accepted contexts: id, abstract syntax, transfer syntax.
    contexts: Vec<(u8, String, String)>,
}

impl Client {
    async fn negotiate(&mut self, proposals: &[(&str, &str)], scp_role: &[&str]) {
        let mut user_variables = vec![
            UserVariableItem::MaxLength(64 * 1024),
            UserVariableItem::ImplementationClassUID("1.2.3.4".into()),
        ];
        for uid in scp_role {
            user_variables.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                (*uid).into(),
                RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ));
        }
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: "KADE".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: proposals
                .iter()
                .enumerate()
                .map(|(i, (abs, ts))| PresentationContextProposed {
                    id: (i * 2 + 1) as u8,
                    abstract_syntax: (*abs).into(),
                    transfer_syntaxes: vec![(*ts).into()],
                })
                .collect(),
            user_variables,
        };
        self.wr
            .write_all(&pdu::encode(&Pdu::AssociationRQ(rq)))
            .await
            .unwrap();
        let Some(Received::Control(Pdu::AssociationAC(ac))) =
            pdu::read(&mut self.rd, 1 << 20).await.unwrap()
        else {
            panic!("association not accepted");
        };
        for pc in ac.presentation_contexts {
            if pc.reason == PresentationContextResultReason::Acceptance {
                let (abs, _) = proposals[(pc.id as usize - 1) / 2];
                let ts = pc.transfer_syntax.trim_end_matches('\0').to_owned();
                self.contexts.push((pc.id, abs.to_owned(), ts));
            }
        }
    }

    fn context(&self, abstract_syntax: &str) -> u8 {
        self.contexts
            .iter()
            .find(|(_, a, _)| a == abstract_syntax)
            .unwrap_or_else(|| panic!("{abstract_syntax} not accepted"))
            .0
    }

    async fn send(&mut self, pc: u8, command: &CommandSet, data: Option<&[u8]>) {
        let mut out = pdu::encode_pdata(pc, true, &command.encode(), 64 * 1024);
        if let Some(d) = data {
            out.extend(pdu::encode_pdata(pc, false, d, 64 * 1024));
        }
        self.wr.write_all(&out).await.unwrap();
    }

    async fn pdv(&mut self) -> Pdv {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return p;
            }
            match pdu::read(&mut self.rd, 1 << 20).await.unwrap() {
                Some(Received::Data(pdvs)) => self.pending.extend(pdvs),
                other => panic!("expected P-DATA, got {other:?}"),
            }
        }
    }

    /// The next message, within `limit`.
    async fn message(&mut self, limit: Duration) -> Message {
        tokio::time::timeout(limit, async {
            let mut cmd = Vec::new();
            let pc = loop {
                let p = self.pdv().await;
                assert!(p.is_command, "data set where a command was expected");
                cmd.extend_from_slice(&p.data);
                if p.is_last {
                    break p.pc_id;
                }
            };
            let command = CommandSet::decode(&cmd).unwrap();
            if command.u16(tag::COMMAND_DATA_SET_TYPE) == Some(0x0101) {
                return Message {
                    pc,
                    command,
                    data: None,
                };
            }
            let mut data = Vec::new();
            loop {
                let p = self.pdv().await;
                assert!(!p.is_command, "command where a data set was expected");
                data.extend_from_slice(&p.data);
                if p.is_last {
                    break;
                }
            }
            Message {
                pc,
                command,
                data: Some(data),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no message within {limit:?}"))
    }

    /// Sends a C-STORE of `data` on the CT context; its response.
    async fn store(&mut self, sop: &str, data: &[u8]) -> CommandSet {
        let pc = self.context(CT);
        let cs = kade_dimse::command::store_request(7, CT, sop, None);
        self.send(pc, &cs, Some(data)).await;
        self.message(Duration::from_secs(10)).await.command
    }

    /// A C-GET of `class` with `identifier`: the SOP Instance UIDs of the instances
    /// received, and the final response.
    async fn get(&mut self, class: &str, identifier: &[u8]) -> (BTreeSet<String>, CommandSet) {
        let pc = self.context(class);
        let mut cs = CommandSet::default();
        cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, class)
            .set_u16(tag::COMMAND_FIELD, field::C_GET_RQ)
            .set_u16(tag::MESSAGE_ID, 9)
            .set_u16(tag::PRIORITY, 0)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000);
        self.send(pc, &cs, Some(identifier)).await;
        let mut got = BTreeSet::new();
        loop {
            let m = self.message(Duration::from_secs(30)).await;
            match m.command.u16(tag::COMMAND_FIELD) {
                Some(field::C_STORE_RQ) => {
                    let sop = m.command.str(tag::AFFECTED_SOP_INSTANCE_UID).unwrap();
                    assert!(m.data.is_some_and(|d| !d.is_empty()));
                    let mut rsp = CommandSet::default();
                    rsp.set_uid(tag::AFFECTED_SOP_CLASS_UID, CT)
                        .set_u16(tag::COMMAND_FIELD, field::C_STORE_RSP)
                        .set_u16(
                            tag::MESSAGE_ID_BEING_RESPONDED_TO,
                            m.command.u16(tag::MESSAGE_ID).unwrap(),
                        )
                        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0101)
                        .set_u16(tag::STATUS, 0)
                        .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, &sop);
                    self.send(m.pc, &rsp, None).await;
                    got.insert(sop);
                }
                Some(field::C_GET_RSP) if m.command.u16(tag::STATUS) == Some(0xFF00) => {}
                Some(field::C_GET_RSP) => return (got, m.command),
                other => panic!("unexpected command {other:?}"),
            }
        }
    }

    async fn release(mut self) {
        self.wr
            .write_all(&pdu::encode(&Pdu::ReleaseRQ))
            .await
            .unwrap();
        let rp = pdu::read(&mut self.rd, 1 << 20).await.unwrap();
        assert!(
            matches!(rp, Some(Received::Control(Pdu::ReleaseRP))),
            "{rp:?}"
        );
    }
}

/// An identifier in Explicit VR Little Endian; `\` separates values.
fn identifier(elements: &[(dicom_core::Tag, VR, &str)]) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    for (t, vr, v) in elements {
        let values: Vec<String> = v.split('\\').map(str::to_owned).collect();
        obj.put(DataElement::new(
            *t,
            *vr,
            PrimitiveValue::Strs(values.into()),
        ));
    }
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, TransferSyntaxRegistry.get(ELE).unwrap())
        .unwrap();
    out
}

/// An element in implicit VR little endian.
fn implicit(g: u16, e: u16, v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(v);
    out
}

/// `data` as one stored (uncompressed) deflate block (RFC 1951 §3.2.4).
fn deflate_stored(data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).unwrap();
    let mut out = vec![1];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// An item element claiming 4 GB inside a defined-length (0008,1115) sequence, which the data
/// dictionary makes a sequence in implicit VR.
fn overrun_in_a_sequence() -> Vec<u8> {
    let mut inner = vec![0x10, 0x00, 0x10, 0x00];
    inner.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
    item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
    item.extend_from_slice(&inner);
    let mut d = implicit(0x0008, 0x0018, b"1.2.3.4\0");
    d.extend(implicit(0x0008, 0x1115, &item));
    d
}

/// Explicit VR: a value claiming 4 GB after the SOP Instance UID.
fn overrun_explicit() -> Vec<u8> {
    let mut d = vec![0x08, 0x00, 0x18, 0x00, b'U', b'I', 8, 0];
    d.extend_from_slice(b"1.2.3.4\0");
    d.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
    d.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    d.extend_from_slice(b"abcd");
    d
}

#[tokio::test]
async fn unparsable_data_sets_get_cannot_understand_at_once() {
    let node = Node::new().await;
    let random: Vec<u8> = (0..3000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let cases: [(&str, &str, Vec<u8>); 5] = [
        (ELE, "random bytes", random.clone()),
        (ELE, "a value past the end", overrun_explicit()),
        (
            IMPLICIT,
            "a value past the end of a sequence item",
            overrun_in_a_sequence(),
        ),
        (DEFLATED, "random bytes", random),
        (
            DEFLATED,
            "a value past the end",
            deflate_stored(&overrun_explicit()),
        ),
    ];
    for (ts, what, data) in cases {
        let mut c = node.associate(&[(CT, ts)], &[]).await;
        let t = Instant::now();
        let rsp = c.store("1.2.3.4", &data).await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{ts}, {what}: answered after {:?}",
            t.elapsed()
        );
        assert_eq!(rsp.u16(tag::STATUS), Some(0xC000), "{ts}, {what}");
        assert!(rsp.str(tag::ERROR_COMMENT).is_some(), "{ts}, {what}");
        c.release().await;
    }
    // The association that refused one stores the next, and only that one is kept.
    let good = Part10::read(&kade_testkit::testdata_dir().join("pydicom/CT_small.dcm")).unwrap();
    let mut c = node.associate(&[(CT, ELE)], &[]).await;
    let rsp = c.store("1.2.3.4", &overrun_explicit()).await;
    assert_eq!(rsp.u16(tag::STATUS), Some(0xC000));
    let rsp = c.store(&good.sop_instance, &good.dataset).await;
    assert_eq!(rsp.u16(tag::STATUS), Some(0));
    c.release().await;
    assert_eq!(node.instances().await, 1);
}

#[tokio::test]
async fn c_get_at_patient_level_sends_every_study_of_the_patient() {
    let node = Node::new().await;
    let dir = tempfile::tempdir().unwrap();
    let a1 = r#gen::CtSpec::small(1, 2);
    let a2 = r#gen::CtSpec {
        patient_id: a1.patient_id.clone(),
        ..r#gen::CtSpec::small(2, 1)
    };
    let mut b1 = r#gen::CtSpec::small(1, 1);
    b1.patient_id = format!("{}B", a1.patient_id);
    let mut store = node.associate(&[(CT, ELE)], &[]).await;
    let mut of_a = BTreeSet::new();
    for (name, spec) in [("a1", &a1), ("a2", &a2), ("b1", &b1)] {
        for f in r#gen::ct_study(&dir.path().join(name), spec) {
            let p = Part10::read(&f).unwrap();
            let rsp = store.store(&p.sop_instance, &p.dataset).await;
            assert_eq!(rsp.u16(tag::STATUS), Some(0));
            if spec.patient_id == a1.patient_id {
                of_a.insert(p.sop_instance);
            }
        }
    }
    store.release().await;
    assert_eq!(of_a.len(), 4);

    let proposals = [(PATIENT_ROOT_GET, ELE), (STUDY_ROOT_GET, ELE), (CT, ELE)];
    let mut c = node.associate(&proposals, &[CT]).await;
    let patient = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "PATIENT"),
        (tags::PATIENT_ID, VR::LO, &a1.patient_id),
    ]);
    let (got, last) = c.get(PATIENT_ROOT_GET, &patient).await;
    assert_eq!(last.u16(tag::STATUS), Some(0));
    assert_eq!(last.u16(tag::NUMBER_OF_COMPLETED_SUBOPERATIONS), Some(4));
    assert_eq!(got, of_a);

    // The Study Root model has no PATIENT level.
    let (got, last) = c.get(STUDY_ROOT_GET, &patient).await;
    assert_eq!(last.u16(tag::STATUS), Some(0xA900));
    let why = last.str(tag::ERROR_COMMENT).unwrap();
    assert!(why.contains("no PATIENT level"), "{why}");
    assert!(got.is_empty());

    // A STUDY level UID list retrieves exactly the listed studies...
    let list = format!("{}\\{}", a2.study_uid, b1.study_uid);
    let studies = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::STUDY_INSTANCE_UID, VR::UI, &list),
    ]);
    let (got, _) = c.get(STUDY_ROOT_GET, &studies).await;
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|s| s.starts_with(&a2.study_uid) || s.starts_with(&b1.study_uid))
    );
    // ...and in the Patient Root model, only those of the patient named.
    let of_patient = identifier(&[
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY"),
        (tags::PATIENT_ID, VR::LO, &b1.patient_id),
        (tags::STUDY_INSTANCE_UID, VR::UI, &list),
    ]);
    let (got, _) = c.get(PATIENT_ROOT_GET, &of_patient).await;
    assert_eq!(got.len(), 1);
    assert!(got.iter().all(|s| s.starts_with(&b1.study_uid)));
    c.release().await;
}
