//! PDU framing over a byte stream (PS3.8 §9.3), with a hard cap on every PDU's length.
//!
//! P-DATA-TF PDUs, the hot path, are split into PDVs here without copying their payloads;
//! every other PDU is decoded by `dicom_ul::pdu::read_pdu` once it is completely buffered.

use bytes::{Buf, Bytes, BytesMut};
use dicom_ul::pdu::{self, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest non-P-DATA PDU accepted (an A-ASSOCIATE-RQ with hundreds of contexts fits).
const MAX_CONTROL_PDU: u32 = 1024 * 1024;

/// One presentation data value (PS3.8 §9.3.5.1).
#[derive(Debug, Clone)]
pub struct Pdv {
    /// Presentation context id.
    pub pc_id: u8,
    /// Command (true) or data set (false) fragment.
    pub is_command: bool,
    /// Last fragment of the command or data set.
    pub is_last: bool,
    /// The fragment.
    pub data: Bytes,
}

/// A received PDU.
#[derive(Debug)]
pub enum Received {
    /// P-DATA-TF, split into PDVs.
    Data(Vec<Pdv>),
    /// Any other PDU.
    Control(Pdu),
}

/// Errors while reading PDUs.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    /// The connection failed or was closed mid-PDU.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// A PDU is longer than allowed.
    #[error("PDU of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// Allowed length.
        max: u32,
    },
    /// The PDU is malformed.
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

/// Reads the next PDU. Returns `None` when the peer closed the connection between PDUs.
/// P-DATA-TF PDUs may be at most `max_pdata` bytes long (the maximum length Kade announced).
///
/// # Errors
/// I/O errors, PDUs over the limit, malformed PDUs.
pub async fn read<R: AsyncRead + Unpin>(
    r: &mut R,
    max_pdata: u32,
) -> Result<Option<Received>, PduError> {
    let mut head = [0u8; 6];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..]).await?;
    let ty = head[0];
    let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
    let max = if ty == 0x04 {
        max_pdata
    } else {
        MAX_CONTROL_PDU
    };
    if len > max {
        return Err(PduError::TooLarge { len, max });
    }
    let mut body = BytesMut::zeroed(len as usize);
    r.read_exact(&mut body).await?;
    if ty == 0x04 {
        return split_pdata(body.freeze()).map(|v| Some(Received::Data(v)));
    }
    let mut whole = BytesMut::with_capacity(6 + len as usize);
    whole.extend_from_slice(&head);
    whole.extend_from_slice(&body);
    match pdu::read_pdu(whole.freeze(), pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(p)) => Ok(Some(Received::Control(p))),
        Ok(None) => Err(PduError::Malformed("truncated PDU".into())),
        Err(e) => Err(PduError::Malformed(e.to_string())),
    }
}

/// Splits a P-DATA-TF body into PDVs (pure; no I/O).
///
/// # Errors
/// When an item length runs past the body or is shorter than its header.
pub fn split_pdata(mut body: Bytes) -> Result<Vec<Pdv>, PduError> {
    let mut out = Vec::with_capacity(1);
    while body.has_remaining() {
        if body.remaining() < 6 {
            return Err(PduError::Malformed("PDV item header cut short".into()));
        }
        let item_len = body.get_u32() as usize;
        if item_len < 2 || item_len > body.remaining() {
            return Err(PduError::Malformed(format!(
                "PDV item length {item_len} is invalid"
            )));
        }
        let pc_id = body.get_u8();
        let ctl = body.get_u8();
        let data = body.split_to(item_len - 2);
        out.push(Pdv {
            pc_id,
            is_command: ctl & 1 != 0,
            is_last: ctl & 2 != 0,
            data,
        });
    }
    if out.is_empty() {
        return Err(PduError::Malformed("P-DATA-TF without PDV items".into()));
    }
    Ok(out)
}

/// Encodes a control PDU.
///
/// # Panics
/// Only if dicom-ul cannot encode a PDU Kade built (a programming error).
pub fn encode(p: &Pdu) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    pdu::write_pdu(&mut v, p).expect("Kade builds only encodable PDUs");
    v
}

/// Encodes `data` as P-DATA-TF PDUs of at most `peer_max` bytes each (0 = unlimited).
pub fn encode_pdata(pc_id: u8, is_command: bool, data: &[u8], peer_max: u32) -> Vec<u8> {
    let mut out = Vec::new();
    append_pdata(&mut out, pc_id, is_command, data, peer_max);
    out
}

/// Appends `data`, encoded as by [`encode_pdata`], to `out`. Senders gather a command and its
/// data set, or many C-FIND responses, into one buffer and write it at once: each write is a
/// system call here and a wake-up at the peer.
pub fn append_pdata(out: &mut Vec<u8>, pc_id: u8, is_command: bool, data: &[u8], peer_max: u32) {
    let chunk = pdv_payload(peer_max);
    out.reserve(data.len() + PDU_OVERHEAD * (data.len() / chunk + 1));
    let mut parts: Vec<&[u8]> = data.chunks(chunk).collect();
    if parts.is_empty() {
        parts.push(&[]);
    }
    let n = parts.len();
    for (i, part) in parts.into_iter().enumerate() {
        pdata_header(out, pc_id, is_command, i + 1 == n, part.len());
        out.extend_from_slice(part);
    }
}

/// Bytes a P-DATA-TF PDU with one PDV adds to its payload: the PDU header (6) and the PDV
/// item header (4 + 2).
const PDU_OVERHEAD: usize = 12;

/// The most payload one PDV may carry when the peer accepts PDUs of `peer_max` bytes
/// (0 = unlimited): PDU length = PDV item length field (4) + PDV header (2) + payload.
fn pdv_payload(peer_max: u32) -> usize {
    let peer_max = if peer_max == 0 {
        u32::MAX
    } else {
        peer_max.max(pdu::MINIMUM_PDU_SIZE)
    };
    (peer_max - 6).min(1 << 24) as usize
}

fn pdata_header(out: &mut Vec<u8>, pc_id: u8, is_command: bool, last: bool, len: usize) {
    out.push(0x04);
    out.push(0);
    out.extend_from_slice(&(len as u32 + 6).to_be_bytes());
    out.extend_from_slice(&(len as u32 + 2).to_be_bytes());
    out.push(pc_id);
    out.push(u8::from(is_command) | if last { 2 } else { 0 });
}

/// A data set laid out as P-DATA-TF PDUs, with room in front for the command that goes with
/// it, so that command and data set leave in one write without copying the data set again.
#[derive(Debug)]
pub struct Framed {
    buf: Vec<u8>,
    start: usize,
}

/// Room left in front of a [`Framed`] data set: a C-STORE-RQ with two 64-character UIDs and
/// a Move Originator fits.
const COMMAND_ROOM: usize = 512;

impl Framed {
    /// Reads `len` data set bytes from `r` straight into P-DATA-TF PDUs (as
    /// [`encode_pdata`] would frame them) on context `pc_id` for a peer that accepts PDUs of
    /// `peer_max` bytes. Each byte is copied once, from the reader into its PDU.
    ///
    /// # Errors
    /// Read errors; `UnexpectedEof` when `r` holds fewer than `len` bytes.
    pub fn read_from(
        mut r: impl std::io::Read,
        len: usize,
        pc_id: u8,
        peer_max: u32,
    ) -> std::io::Result<Self> {
        use std::io::Read as _;
        let chunk = pdv_payload(peer_max);
        let mut buf = Vec::with_capacity(COMMAND_ROOM + len + PDU_OVERHEAD * (len / chunk + 1));
        buf.resize(COMMAND_ROOM, 0);
        let mut left = len;
        loop {
            let n = left.min(chunk);
            pdata_header(&mut buf, pc_id, false, n == left, n);
            // read_to_end appends into spare capacity without zeroing it first.
            let got = (&mut r).take(n as u64).read_to_end(&mut buf)?;
            if got < n {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
            if left == 0 {
                break;
            }
        }
        Ok(Self {
            buf,
            start: COMMAND_ROOM,
        })
    }

    /// Frames a data set held in memory (a copy).
    pub fn from_bytes(data: &[u8], pc_id: u8, peer_max: u32) -> Self {
        let mut buf = vec![0; COMMAND_ROOM];
        append_pdata(&mut buf, pc_id, false, data, peer_max);
        Self {
            buf,
            start: COMMAND_ROOM,
        }
    }

    /// The data set's PDUs.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The encoded `command` PDUs followed by the data set's, to send in one write. A command
    /// larger than the room in front (none Kade sends) costs one copy of the data set.
    pub fn with_command(&mut self, command: &[u8]) -> &[u8] {
        if command.len() > self.start {
            let mut buf = Vec::with_capacity(command.len() + self.data().len());
            buf.resize(command.len(), 0);
            buf.extend_from_slice(self.data());
            self.buf = buf;
            self.start = command.len();
        }
        let at = self.start - command.len();
        self.buf[at..self.start].copy_from_slice(command);
        &self.buf[at..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdata_round_trip_with_fragmentation() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let wire = encode_pdata(3, false, &data, 2048);
        let mut rest = Bytes::from(wire);
        let mut got = Vec::new();
        let mut lasts = Vec::new();
        while rest.has_remaining() {
            assert_eq!(rest.get_u8(), 0x04);
            rest.advance(1);
            let len = rest.get_u32() as usize;
            assert!(len <= 2048);
            for pdv in split_pdata(rest.split_to(len)).unwrap() {
                assert_eq!(pdv.pc_id, 3);
                assert!(!pdv.is_command);
                got.extend_from_slice(&pdv.data);
                lasts.push(pdv.is_last);
            }
        }
        assert_eq!(got, data);
        assert_eq!(lasts.iter().filter(|l| **l).count(), 1);
        assert!(*lasts.last().unwrap());
    }

    #[test]
    fn framed_reading_lays_out_the_same_pdus_as_encoding() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        for (len, max) in [(70_000, 16_384), (70_000, 0), (0, 16_384), (16_378, 16_384)] {
            let mut f = Framed::read_from(&data[..len], len, 5, max).unwrap();
            let expected = encode_pdata(5, false, &data[..len], max);
            assert_eq!(f.data(), &expected[..], "len {len}, max {max}");
            let command = encode_pdata(5, true, b"command set", max);
            let mut both = command.clone();
            both.extend_from_slice(&expected);
            assert_eq!(f.with_command(&command), &both[..]);
            assert_eq!(
                Framed::from_bytes(&data[..len], 5, max).data(),
                &expected[..]
            );
        }
        // A short file is an error, not a short data set.
        let e = Framed::read_from(&data[..100], 200, 1, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        // A command too large for the room in front is still put in front, whole.
        let mut f = Framed::from_bytes(b"xy", 1, 0);
        let big = vec![7; 4096];
        let mut both = big.clone();
        both.extend_from_slice(&encode_pdata(1, false, b"xy", 0));
        assert_eq!(f.with_command(&big), &both[..]);
        assert_eq!(
            f.with_command(b"short"),
            &[b"short".as_slice(), &both[4096..]].concat()[..]
        );
    }

    #[test]
    fn rejects_bad_item_lengths() {
        let body = Bytes::from_static(&[0, 0, 0, 9, 1, 3, 0xAA]);
        assert!(matches!(split_pdata(body), Err(PduError::Malformed(_))));
        assert!(split_pdata(Bytes::new()).is_err());
    }

    #[tokio::test]
    async fn caps_pdata_length() {
        let wire = [0x04u8, 0, 0x10, 0, 0, 0];
        let err = read(&mut &wire[..], 65536).await.unwrap_err();
        assert!(matches!(
            err,
            PduError::TooLarge {
                len: 0x1000_0000,
                max: 65536
            }
        ));
        let none = read(&mut &[][..], 65536).await.unwrap();
        assert!(none.is_none());
    }
}
