//! DIMSE status codes (PS3.7 Annex C, PS3.4 §B.2.3).

/// A status Kade sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 0000: success.
    Success,
    /// FF00: pending (a C-FIND match follows).
    Pending,
    /// A900 for C-FIND: the identifier does not match the SOP class (also used for unusable values).
    IdentifierDoesNotMatch,
    /// C001: unable to process (C-FIND).
    UnableToProcess,
    /// A801: the C-MOVE destination is not a configured peer.
    MoveDestinationUnknown,
    /// A702: refused, unable to perform sub-operations (destination unreachable).
    UnableToPerformSubOperations,
    /// B000: sub-operations complete, one or more failed.
    SubOperationsFailed,
    /// FE00: sub-operations terminated by a C-CANCEL.
    Cancelled,
    /// C111: a different object already has this SOP Instance UID. A failure in the C-STORE
    /// "cannot understand" (Cxxx) family: the general status 0111 (Duplicate SOP Instance)
    /// is not a C-STORE status, and peers such as DCMTK treat it as unknown, not as failure.
    DuplicateSopInstance,
    /// 0122: the SOP class is not supported on this presentation context.
    SopClassNotSupported,
    /// 0124: not authorised.
    NotAuthorized,
    /// 0211: unrecognised operation.
    UnrecognizedOperation,
    /// A700: refused, out of resources (storage or index failure).
    OutOfResources,
    /// A900: data set does not match SOP class (or the command).
    DataSetDoesNotMatch,
    /// C000: cannot understand.
    CannotUnderstand,
}

impl Status {
    /// The 16-bit code.
    pub fn code(self) -> u16 {
        match self {
            Status::Success => 0x0000,
            Status::Pending => 0xFF00,
            Status::IdentifierDoesNotMatch => 0xA900,
            Status::UnableToProcess => 0xC001,
            Status::MoveDestinationUnknown => 0xA801,
            Status::UnableToPerformSubOperations => 0xA702,
            Status::SubOperationsFailed => 0xB000,
            Status::Cancelled => 0xFE00,
            Status::DuplicateSopInstance => 0xC111,
            Status::SopClassNotSupported => 0x0122,
            Status::NotAuthorized => 0x0124,
            Status::UnrecognizedOperation => 0x0211,
            Status::OutOfResources => 0xA700,
            Status::DataSetDoesNotMatch => 0xA900,
            Status::CannotUnderstand => 0xC000,
        }
    }
}
