//! C-ECHO SCP (PS3.4 Annex A, PS3.7 §9.1.5).

use crate::command::{Response, field};
use crate::status::Status;

/// The response to a C-ECHO-RQ: always success; the association policy already decided
/// whether the peer may echo (the Verification context is only accepted for peers that may).
pub fn respond(message_id: u16, sop_class: &str) -> Response {
    Response {
        command_field: field::C_ECHO_RSP,
        message_id,
        sop_class: Some(sop_class.to_owned()),
        sop_instance: None,
        status: Status::Success,
        error_comment: None,
    }
}
