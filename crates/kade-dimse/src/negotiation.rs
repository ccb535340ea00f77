//! Association acceptance (PS3.8 §7.1, PS3.7 Annex D): which presentation contexts Kade
//! accepts, with which transfer syntax, and the A-ASSOCIATE-AC that says so.

use std::collections::HashMap;

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, PresentationContextResult,
    PresentationContextResultReason as Reason, RequestorRoles, UserVariableItem,
};
use kade_core::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Peer, Permission};

use crate::VERIFICATION;

/// The DICOM application context name (PS3.7 §A.2.1).
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";

/// Standard storage SOP classes outside the `1.2.840.10008.5.1.4.1.1.` arc.
const OTHER_STORAGE: &[&str] = &[
    "1.2.840.10008.5.1.4.38.1", // Hanging Protocol Storage
    "1.2.840.10008.5.1.4.39.1", // Color Palette Storage
    "1.2.840.10008.5.1.4.43.1", // Generic Implant Template Storage
    "1.2.840.10008.5.1.4.44.1", // Implant Assembly Template Storage
    "1.2.840.10008.5.1.4.45.1", // Implant Template Group Storage
];

/// Whether `uid` names a storage SOP class: every standard one (the storage arc and the
/// few outside it) and every private SOP class (vendors' private objects are storage).
pub fn is_storage_sop_class(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.5.1.4.1.1.")
        || OTHER_STORAGE.contains(&uid)
        || !uid.starts_with("1.2.840.10008.")
}

/// An accepted presentation context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Abstract syntax (SOP class).
    pub abstract_syntax: String,
    /// Negotiated transfer syntax.
    pub transfer_syntax: String,
}

/// The outcome of negotiating an acceptable association.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The A-ASSOCIATE-AC to send.
    pub ac: AssociationAC,
    /// Accepted contexts by id.
    pub contexts: HashMap<u8, Accepted>,
    /// The peer's maximum PDU length (0 = unlimited).
    pub peer_max_pdu: u32,
}

/// Decides every proposed presentation context for `peer`.
pub fn negotiate(rq: &AssociationRQ, peer: &Peer, our_max_pdu: u32) -> Negotiated {
    let mut contexts = HashMap::new();
    // SCU/SCP role selection (PS3.7 D.3.3.4): a requestor that wants to receive C-STORE
    // sub-operations of a C-GET proposes the SCP role for those storage classes.
    let scp_role: Vec<(String, RequestorRoles)> = rq
        .user_variables
        .iter()
        .filter_map(|u| match u {
            UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) if roles.scp => {
                Some((uid.trim_end_matches('\0').to_owned(), *roles))
            }
            _ => None,
        })
        .collect();
    let wants_scp = |abs: &str| scp_role.iter().any(|(u, _)| u == abs);
    let mut roles_accepted = Vec::new();
    let results = rq
        .presentation_contexts
        .iter()
        .map(|pc| {
            let abs = pc.abstract_syntax.trim_end_matches('\0');
            let needed = if abs == VERIFICATION {
                Some(Permission::Echo)
            } else if crate::c_find::is_find_sop_class(abs) {
                Some(Permission::Find)
            } else if crate::c_move::is_move_sop_class(abs) {
                Some(Permission::Move)
            } else if crate::c_get::is_get_sop_class(abs) {
                Some(Permission::Get)
            } else if abs == crate::commitment::STORAGE_COMMITMENT_PUSH {
                Some(Permission::Commit)
            } else if is_storage_sop_class(abs) && wants_scp(abs) && peer.may(Permission::Get) {
                // Kade will send C-GET results on this context.
                Some(Permission::Get)
            } else if is_storage_sop_class(abs) {
                Some(Permission::Store)
            } else {
                None
            };
            let ts = pc
                .transfer_syntaxes
                .iter()
                .map(|t| t.trim_end_matches('\0'))
                .find(|t| {
                    TransferSyntaxRegistry
                        .get(t)
                        .is_some_and(|ts| !ts.is_unsupported())
                });
            let reason = match (needed, ts) {
                (None, _) => Reason::AbstractSyntaxNotSupported,
                (Some(p), _) if !peer.may(p) => Reason::UserRejection,
                (Some(_), None) => Reason::TransferSyntaxesNotSupported,
                (Some(_), Some(_)) => Reason::Acceptance,
            };
            let transfer_syntax = ts.unwrap_or("1.2.840.10008.1.2").to_owned();
            if reason == Reason::Acceptance && is_storage_sop_class(abs) && wants_scp(abs) {
                roles_accepted.push(abs.to_owned());
            }
            if reason == Reason::Acceptance {
                contexts.insert(
                    pc.id,
                    Accepted {
                        abstract_syntax: abs.to_owned(),
                        transfer_syntax: transfer_syntax.clone(),
                    },
                );
            }
            PresentationContextResult {
                id: pc.id,
                reason,
                transfer_syntax,
            }
        })
        .collect();
    let peer_max_pdu = rq
        .user_variables
        .iter()
        .find_map(|u| match u {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: APPLICATION_CONTEXT.to_owned(),
        presentation_contexts: results,
        user_variables: [
            UserVariableItem::MaxLength(our_max_pdu),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_owned()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_owned()),
        ]
        .into_iter()
        .chain(roles_accepted.iter().filter_map(|abs| {
            let (uid, roles) = scp_role.iter().find(|(u, _)| u == abs)?;
            Some(UserVariableItem::ScuScpRoleSelectionSubItem(
                uid.clone(),
                *roles,
            ))
        }))
        .collect(),
    };
    Negotiated {
        ac,
        contexts,
        peer_max_pdu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;
    use kade_core::{AeTitle, peer::parse_host};

    fn rq(contexts: Vec<(u8, &str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "SCU".into(),
            called_ae_title: "KADE".into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: contexts
                .into_iter()
                .map(|(id, a, ts)| PresentationContextProposed {
                    id,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn peer(allow: Vec<Permission>) -> Peer {
        Peer {
            ae_title: AeTitle::new("SCU").unwrap(),
            host: parse_host("127.0.0.1").unwrap(),
            port: None,
            allow,
            max_matches: None,
            narrow_queries: false,
            tls_cert_sha256: None,
            tls: false,
        }
    }

    #[test]
    fn accepts_storage_and_echo_per_permission() {
        let r = rq(vec![
            (1, VERIFICATION, vec!["1.2.840.10008.1.2"]),
            (
                3,
                "1.2.840.10008.5.1.4.1.1.2",
                vec!["9.9.9", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"],
            ),
            (5, "1.2.840.10008.5.1.4.31", vec!["1.2.840.10008.1.2"]), // Modality Worklist: not served
            (7, "1.2.840.10008.5.1.4.1.1.4", vec!["9.9.9"]),
            (9, "1.2.840.10008.5.1.4.1.2.2.1", vec!["1.2.840.10008.1.2"]), // Study Root FIND: not permitted
        ]);
        let n = negotiate(&r, &peer(vec![Permission::Store]), 65536);
        let reasons: Vec<_> =
            n.ac.presentation_contexts
                .iter()
                .map(|p| p.reason.clone())
                .collect();
        assert_eq!(
            reasons,
            vec![
                Reason::UserRejection,
                Reason::Acceptance,
                Reason::AbstractSyntaxNotSupported,
                Reason::TransferSyntaxesNotSupported,
                Reason::UserRejection
            ]
        );
        // Stored as received: the first proposed syntax the registry knows.
        assert_eq!(n.contexts[&3].transfer_syntax, "1.2.840.10008.1.2.4.70");
        assert_eq!(n.contexts.len(), 1);
        assert_eq!(n.peer_max_pdu, 16384);
    }

    #[test]
    fn c_get_peers_get_storage_contexts_with_the_scp_role() {
        let ct = "1.2.840.10008.5.1.4.1.1.2";
        let mut r = rq(vec![
            (1, crate::c_get::STUDY_ROOT_GET, vec!["1.2.840.10008.1.2"]),
            (3, ct, vec!["1.2.840.10008.1.2.1"]),
        ]);
        r.user_variables
            .push(UserVariableItem::ScuScpRoleSelectionSubItem(
                ct.into(),
                RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ));
        // A get-only peer: the CT context is for Kade's C-STORE sub-operations.
        let n = negotiate(&r, &peer(vec![Permission::Get]), 65536);
        assert_eq!(n.contexts.len(), 2);
        assert!(n.ac.user_variables.iter().any(|u| matches!(
            u,
            UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) if uid == ct && roles.scp
        )));
        // Without the role item, a get-only peer may not store.
        r.user_variables.pop();
        let n = negotiate(&r, &peer(vec![Permission::Get]), 65536);
        assert_eq!(n.contexts.len(), 1);
    }

    #[test]
    fn storage_class_recognition() {
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.481.2"));
        assert!(is_storage_sop_class("1.3.12.2.1107.5.9.1"));
        assert!(!is_storage_sop_class("1.2.840.10008.5.1.4.1.2.1.1"));
        assert!(!is_storage_sop_class(VERIFICATION));
    }
}
