//! DIMSE command sets (PS3.7 §9.3, §E): a pure codec for group 0000 in Implicit VR Little
//! Endian, and the typed [`Command`] enum that requests are turned into.

use std::collections::BTreeMap;

use crate::status::Status;

/// Command Field values (PS3.7 §E.1).
pub mod field {
    /// C-STORE-RQ.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-FIND-RQ.
    pub const C_FIND_RQ: u16 = 0x0020;
    /// C-FIND-RSP.
    pub const C_FIND_RSP: u16 = 0x8020;
    /// C-GET-RQ.
    pub const C_GET_RQ: u16 = 0x0010;
    /// C-GET-RSP.
    pub const C_GET_RSP: u16 = 0x8010;
    /// C-MOVE-RQ.
    pub const C_MOVE_RQ: u16 = 0x0021;
    /// C-MOVE-RSP.
    pub const C_MOVE_RSP: u16 = 0x8021;
    /// C-CANCEL-RQ.
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    /// N-ACTION-RQ.
    pub const N_ACTION_RQ: u16 = 0x0130;
    /// N-ACTION-RSP.
    pub const N_ACTION_RSP: u16 = 0x8130;
    /// N-EVENT-REPORT-RQ.
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    /// N-EVENT-REPORT-RSP.
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
}

/// Command element numbers in group 0000 (PS3.7 §E.1).
pub mod tag {
    #[allow(missing_docs)]
    pub const AFFECTED_SOP_CLASS_UID: u16 = 0x0002;
    #[allow(missing_docs)]
    pub const COMMAND_FIELD: u16 = 0x0100;
    #[allow(missing_docs)]
    pub const MESSAGE_ID: u16 = 0x0110;
    #[allow(missing_docs)]
    pub const MESSAGE_ID_BEING_RESPONDED_TO: u16 = 0x0120;
    #[allow(missing_docs)]
    pub const PRIORITY: u16 = 0x0700;
    #[allow(missing_docs)]
    pub const COMMAND_DATA_SET_TYPE: u16 = 0x0800;
    #[allow(missing_docs)]
    pub const STATUS: u16 = 0x0900;
    #[allow(missing_docs)]
    pub const ERROR_COMMENT: u16 = 0x0902;
    #[allow(missing_docs)]
    pub const AFFECTED_SOP_INSTANCE_UID: u16 = 0x1000;
    #[allow(missing_docs)]
    pub const MOVE_ORIGINATOR_AE_TITLE: u16 = 0x1030;
    #[allow(missing_docs)]
    pub const MOVE_ORIGINATOR_MESSAGE_ID: u16 = 0x1031;
    #[allow(missing_docs)]
    pub const MOVE_DESTINATION: u16 = 0x0600;
    #[allow(missing_docs)]
    pub const NUMBER_OF_REMAINING_SUBOPERATIONS: u16 = 0x1020;
    #[allow(missing_docs)]
    pub const NUMBER_OF_COMPLETED_SUBOPERATIONS: u16 = 0x1021;
    #[allow(missing_docs)]
    pub const NUMBER_OF_FAILED_SUBOPERATIONS: u16 = 0x1022;
    #[allow(missing_docs)]
    pub const NUMBER_OF_WARNING_SUBOPERATIONS: u16 = 0x1023;
    #[allow(missing_docs)]
    pub const REQUESTED_SOP_CLASS_UID: u16 = 0x0003;
    #[allow(missing_docs)]
    pub const REQUESTED_SOP_INSTANCE_UID: u16 = 0x1001;
    #[allow(missing_docs)]
    pub const EVENT_TYPE_ID: u16 = 0x1002;
    #[allow(missing_docs)]
    pub const ACTION_TYPE_ID: u16 = 0x1008;
}

/// CommandDataSetType value meaning "no data set follows".
const NO_DATA_SET: u16 = 0x0101;

/// A decoded command set: element number (group 0000) → raw value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSet(BTreeMap<u16, Vec<u8>>);

/// A command set that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The bytes are not a valid command set.
    #[error("malformed command set: {0}")]
    Malformed(&'static str),
    /// A required element is missing.
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

impl CommandSet {
    /// Decodes an Implicit VR Little Endian command set.
    ///
    /// # Errors
    /// When an element header or value runs past the end, or an element is not in group 0000.
    pub fn decode(mut b: &[u8]) -> Result<Self, CommandError> {
        let mut m = BTreeMap::new();
        while !b.is_empty() {
            if b.len() < 8 {
                return Err(CommandError::Malformed("element header cut short"));
            }
            let group = u16::from_le_bytes([b[0], b[1]]);
            let elem = u16::from_le_bytes([b[2], b[3]]);
            let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
            if group != 0 {
                return Err(CommandError::Malformed("element outside group 0000"));
            }
            if len > b.len() - 8 {
                return Err(CommandError::Malformed("element value cut short"));
            }
            m.insert(elem, b[8..8 + len].to_vec());
            b = &b[8 + len..];
        }
        Ok(CommandSet(m))
    }

    /// Encodes with a leading CommandGroupLength (0000,0000).
    pub fn encode(&self) -> Vec<u8> {
        let body_len: usize = self
            .0
            .iter()
            .filter(|(e, _)| **e != 0)
            .map(|(_, v)| 8 + v.len())
            .sum();
        let mut out = Vec::with_capacity(12 + body_len);
        put(&mut out, 0x0000, &(body_len as u32).to_le_bytes());
        for (e, v) in self.0.iter().filter(|(e, _)| **e != 0) {
            put(&mut out, *e, v);
        }
        out
    }

    /// A US value.
    pub fn u16(&self, elem: u16) -> Option<u16> {
        self.0
            .get(&elem)
            .filter(|v| v.len() >= 2)
            .map(|v| u16::from_le_bytes([v[0], v[1]]))
    }

    /// A text value without padding.
    pub fn str(&self, elem: u16) -> Option<String> {
        let v = self.0.get(&elem)?;
        let s = String::from_utf8_lossy(v);
        let s = s.trim_end_matches(['\0', ' ']).trim_start_matches(' ');
        (!s.is_empty()).then(|| s.to_owned())
    }

    /// Sets a US value.
    pub fn set_u16(&mut self, elem: u16, v: u16) -> &mut Self {
        self.0.insert(elem, v.to_le_bytes().to_vec());
        self
    }

    /// Sets a UI value (padded with NUL to even length).
    pub fn set_uid(&mut self, elem: u16, v: &str) -> &mut Self {
        self.0.insert(elem, padded(v, 0));
        self
    }

    /// Sets a text value (padded with a space to even length).
    pub fn set_text(&mut self, elem: u16, v: &str) -> &mut Self {
        self.0.insert(elem, padded(v, b' '));
        self
    }
}

fn put(out: &mut Vec<u8>, elem: u16, v: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(v);
}

fn padded(v: &str, pad: u8) -> Vec<u8> {
    let mut b = v.as_bytes().to_vec();
    if b.len() % 2 == 1 {
        b.push(pad);
    }
    b
}

/// A C-STORE-RQ command set (PS3.7 §9.3.1.1), with the Move Originator fields when the
/// store is a C-MOVE sub-operation.
pub fn store_request(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
    move_originator: Option<(&str, u16)>,
) -> CommandSet {
    let mut cs = CommandSet::default();
    cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, sop_class)
        .set_u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
        .set_u16(tag::MESSAGE_ID, message_id)
        .set_u16(tag::PRIORITY, 0)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000)
        .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, sop_instance);
    if let Some((ae, id)) = move_originator {
        cs.set_text(tag::MOVE_ORIGINATOR_AE_TITLE, ae)
            .set_u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, id);
    }
    cs
}

/// A DIMSE request, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// C-ECHO-RQ (PS3.7 §9.3.5).
    Echo {
        /// Message ID.
        message_id: u16,
        /// Affected SOP Class UID (Verification).
        sop_class: String,
    },
    /// C-STORE-RQ (PS3.7 §9.3.1).
    Store {
        /// Message ID.
        message_id: u16,
        /// Affected SOP Class UID.
        sop_class: String,
        /// Affected SOP Instance UID.
        sop_instance: String,
        /// Move Originator AE Title, when the store is a C-MOVE sub-operation.
        move_originator: Option<String>,
    },
    /// C-FIND-RQ (PS3.7 §9.3.2); the identifier follows as a data set.
    Find {
        /// Message ID.
        message_id: u16,
        /// Affected SOP Class UID (the query/retrieve information model).
        sop_class: String,
    },
    /// C-MOVE-RQ (PS3.7 §9.3.4); the identifier follows as a data set.
    Move {
        /// Message ID.
        message_id: u16,
        /// Affected SOP Class UID (the query/retrieve information model).
        sop_class: String,
        /// Move Destination AE title.
        destination: String,
    },
    /// C-GET-RQ (PS3.7 §9.3.3); the identifier follows as a data set.
    Get {
        /// Message ID.
        message_id: u16,
        /// Affected SOP Class UID (the query/retrieve information model).
        sop_class: String,
    },
    /// N-ACTION-RQ (PS3.7 §10.1.4): here, a Storage Commitment request.
    Action {
        /// Message ID.
        message_id: u16,
        /// Requested SOP Class UID.
        sop_class: String,
        /// Requested SOP Instance UID.
        sop_instance: String,
        /// Action Type ID.
        action_type: u16,
    },
    /// C-CANCEL-RQ (PS3.7 §9.3.2.3): cancel the operation with this Message ID.
    Cancel {
        /// Message ID Being Responded To.
        message_id: u16,
    },
    /// A known request lacking a required element; answered with a failure, not an abort.
    Invalid {
        /// Command Field.
        command_field: u16,
        /// Message ID.
        message_id: u16,
        /// Whether a data set follows.
        has_data_set: bool,
        /// What is missing.
        reason: CommandError,
    },
    /// Any command Kade does not (yet) serve.
    Unsupported {
        /// Command Field.
        command_field: u16,
        /// Message ID (0 if absent).
        message_id: u16,
        /// Affected SOP Class UID, if any.
        sop_class: Option<String>,
        /// Whether a data set follows.
        has_data_set: bool,
    },
}

impl Command {
    /// Types a decoded command set.
    ///
    /// # Errors
    /// When the Command Field or, for a known command, a required element is missing.
    pub fn parse(cs: &CommandSet) -> Result<Self, CommandError> {
        let command_field = cs
            .u16(tag::COMMAND_FIELD)
            .ok_or(CommandError::Missing("CommandField"))?;
        let message_id = cs.u16(tag::MESSAGE_ID).unwrap_or(0);
        let has_data_set = cs
            .u16(tag::COMMAND_DATA_SET_TYPE)
            .is_some_and(|t| t != NO_DATA_SET);
        let sop_class = cs.str(tag::AFFECTED_SOP_CLASS_UID);
        Ok(match command_field {
            field::C_ECHO_RQ => Command::Echo {
                message_id,
                sop_class: sop_class.unwrap_or_else(|| crate::VERIFICATION.to_owned()),
            },
            field::C_STORE_RQ => {
                let sop_instance = cs.str(tag::AFFECTED_SOP_INSTANCE_UID);
                match (sop_class, sop_instance) {
                    (Some(sop_class), Some(sop_instance)) => Command::Store {
                        message_id,
                        sop_class,
                        sop_instance,
                        move_originator: cs.str(tag::MOVE_ORIGINATOR_AE_TITLE),
                    },
                    (c, _) => Command::Invalid {
                        command_field,
                        message_id,
                        has_data_set,
                        reason: CommandError::Missing(if c.is_none() {
                            "AffectedSOPClassUID"
                        } else {
                            "AffectedSOPInstanceUID"
                        }),
                    },
                }
            }
            field::C_FIND_RQ => match sop_class {
                Some(sop_class) => Command::Find {
                    message_id,
                    sop_class,
                },
                None => Command::Invalid {
                    command_field,
                    message_id,
                    has_data_set,
                    reason: CommandError::Missing("AffectedSOPClassUID"),
                },
            },
            field::C_GET_RQ => match sop_class {
                Some(sop_class) => Command::Get {
                    message_id,
                    sop_class,
                },
                None => Command::Invalid {
                    command_field,
                    message_id,
                    has_data_set,
                    reason: CommandError::Missing("AffectedSOPClassUID"),
                },
            },
            field::C_MOVE_RQ => match (sop_class, cs.str(tag::MOVE_DESTINATION)) {
                (Some(sop_class), Some(destination)) => Command::Move {
                    message_id,
                    sop_class,
                    destination,
                },
                (c, _) => Command::Invalid {
                    command_field,
                    message_id,
                    has_data_set,
                    reason: CommandError::Missing(if c.is_none() {
                        "AffectedSOPClassUID"
                    } else {
                        "MoveDestination"
                    }),
                },
            },
            field::N_ACTION_RQ => match (
                cs.str(tag::REQUESTED_SOP_CLASS_UID),
                cs.str(tag::REQUESTED_SOP_INSTANCE_UID),
            ) {
                (Some(sop_class), Some(sop_instance)) => Command::Action {
                    message_id,
                    sop_class,
                    sop_instance,
                    action_type: cs.u16(tag::ACTION_TYPE_ID).unwrap_or(0),
                },
                (c, _) => Command::Invalid {
                    command_field,
                    message_id,
                    has_data_set,
                    reason: CommandError::Missing(if c.is_none() {
                        "RequestedSOPClassUID"
                    } else {
                        "RequestedSOPInstanceUID"
                    }),
                },
            },
            field::C_CANCEL_RQ => Command::Cancel {
                message_id: cs.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO).unwrap_or(0),
            },
            _ => Command::Unsupported {
                command_field,
                message_id,
                sop_class,
                has_data_set,
            },
        })
    }

    /// Whether a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        match self {
            Command::Echo { .. } | Command::Cancel { .. } => false,
            Command::Store { .. }
            | Command::Action { .. }
            | Command::Find { .. }
            | Command::Move { .. }
            | Command::Get { .. } => true,
            Command::Unsupported { has_data_set, .. } | Command::Invalid { has_data_set, .. } => {
                *has_data_set
            }
        }
    }
}

/// A DIMSE response, built from types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Command Field of the response (request's | 0x8000).
    pub command_field: u16,
    /// Message ID Being Responded To.
    pub message_id: u16,
    /// Affected SOP Class UID.
    pub sop_class: Option<String>,
    /// Affected SOP Instance UID.
    pub sop_instance: Option<String>,
    /// Status.
    pub status: Status,
    /// Error Comment (at most 64 characters are sent).
    pub error_comment: Option<String>,
}

impl Response {
    /// Encodes the response command set (no data set follows).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(false)
    }

    /// Encodes the response command set, announcing a data set when `data_set` is true.
    pub fn encode_with(&self, data_set: bool) -> Vec<u8> {
        let mut cs = CommandSet::default();
        if let Some(c) = &self.sop_class {
            cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, c);
        }
        cs.set_u16(tag::COMMAND_FIELD, self.command_field)
            .set_u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, self.message_id)
            .set_u16(
                tag::COMMAND_DATA_SET_TYPE,
                if data_set { 0x0001 } else { NO_DATA_SET },
            )
            .set_u16(tag::STATUS, self.status.code());
        if let Some(c) = &self.error_comment {
            let c: String = c
                .chars()
                .filter(|c| c.is_ascii() && !c.is_control())
                .take(64)
                .collect();
            cs.set_text(tag::ERROR_COMMENT, &c);
        }
        if let Some(i) = &self.sop_instance {
            cs.set_uid(tag::AFFECTED_SOP_INSTANCE_UID, i);
        }
        cs.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_rq() -> CommandSet {
        let mut cs = CommandSet::default();
        cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2")
            .set_u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
            .set_u16(tag::MESSAGE_ID, 7)
            .set_u16(tag::PRIORITY, 0)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000)
            .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, "1.2.3")
            .set_text(tag::MOVE_ORIGINATOR_AE_TITLE, "WS1")
            .set_u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, 3);
        cs
    }

    #[test]
    fn store_request_round_trip() {
        let wire = store_rq().encode();
        // Group length covers everything after itself.
        assert_eq!(
            u32::from_le_bytes(wire[8..12].try_into().unwrap()) as usize,
            wire.len() - 12
        );
        let cmd = Command::parse(&CommandSet::decode(&wire).unwrap()).unwrap();
        assert_eq!(
            cmd,
            Command::Store {
                message_id: 7,
                sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance: "1.2.3".into(),
                move_originator: Some("WS1".into()),
            }
        );
        assert!(cmd.has_data_set());
    }

    #[test]
    fn response_encoding() {
        let r = Response {
            command_field: field::C_STORE_RSP,
            message_id: 7,
            sop_class: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            sop_instance: Some("1.2.3".into()),
            status: Status::OutOfResources,
            error_comment: Some("disk full".into()),
        };
        let cs = CommandSet::decode(&r.encode()).unwrap();
        assert_eq!(cs.u16(tag::STATUS), Some(0xA700));
        assert_eq!(cs.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO), Some(7));
        assert_eq!(cs.u16(tag::COMMAND_DATA_SET_TYPE), Some(NO_DATA_SET));
        assert_eq!(
            cs.str(tag::AFFECTED_SOP_INSTANCE_UID).as_deref(),
            Some("1.2.3")
        );
        assert_eq!(cs.str(tag::ERROR_COMMENT).as_deref(), Some("disk full"));
        // UI values are NUL-padded to even length.
        assert_eq!(cs.0[&tag::AFFECTED_SOP_INSTANCE_UID], b"1.2.3\0");
    }

    #[test]
    fn malformed_sets_are_errors() {
        assert!(CommandSet::decode(&[0, 0, 0, 1, 9, 0, 0, 0, 1]).is_err());
        assert!(CommandSet::decode(&[8, 0, 0x18, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(
            Command::parse(&CommandSet::default()),
            Err(CommandError::Missing("CommandField"))
        );
    }
}
