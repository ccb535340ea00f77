//! multipart/related (RFC 2387) as DICOMweb uses it: a streaming reader for STOW-RS request
//! bodies (memory stays at one network chunk plus a delimiter's length, whatever the size of
//! a part) and the pieces of a streamed WADO-RS response.

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use memchr::memmem;

/// Why a multipart body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// The body does not follow the multipart syntax.
    #[error("malformed multipart body: {0}")]
    Malformed(&'static str),
    /// The body is larger than allowed.
    #[error("the request body is larger than the configured limit of {0} bytes")]
    TooLarge(u64),
    /// The connection failed while the body was being read.
    #[error("the request body could not be read: {0}")]
    Body(String),
}

/// The boundary parameter of a multipart Content-Type, if any.
pub fn boundary(content_type: &str) -> Option<String> {
    param(content_type, "boundary")
}

/// A parameter of a media type (`type`, `boundary`, `transfer-syntax`), unquoted.
pub fn param(media_type: &str, name: &str) -> Option<String> {
    media_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// The headers of one part (names lower-cased).
#[derive(Debug, Clone, Default)]
pub struct PartHeaders(pub Vec<(String, String)>);

impl PartHeaders {
    /// A header's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter: the part's headers (or the closing `--`) follow.
    AfterDelimiter,
    /// Inside a part's body.
    Body,
    /// After the closing delimiter.
    Done,
}

/// Reads parts one after the other from a body stream.
pub struct Reader<S> {
    stream: S,
    buf: BytesMut,
    delimiter: Vec<u8>,
    state: State,
    read: u64,
    max: u64,
    eof: bool,
}

impl<S> std::fmt::Debug for Reader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("state", &self.state)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<S, E> Reader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    /// A reader for `boundary`, refusing bodies larger than `max` bytes.
    pub fn new(stream: S, boundary: &str, max: u64) -> Self {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        // The first delimiter may open the body without a preceding CRLF.
        buf.extend_from_slice(b"\r\n");
        Reader {
            stream,
            buf,
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            state: State::Preamble,
            read: 0,
            max,
            eof: false,
        }
    }

    async fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        match self.stream.next().await {
            Some(Ok(b)) => {
                self.read += b.len() as u64;
                if self.read > self.max {
                    return Err(MultipartError::TooLarge(self.max));
                }
                self.buf.extend_from_slice(&b);
                Ok(true)
            }
            Some(Err(e)) => Err(MultipartError::Body(e.to_string())),
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// Advances to the next part and returns its headers; `None` after the last part.
    /// The rest of the current part, if any, is skipped.
    ///
    /// # Errors
    /// When the body is malformed, too large or cannot be read.
    pub async fn next_part(&mut self) -> Result<Option<PartHeaders>, MultipartError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Body => while self.next_chunk().await?.is_some() {},
                State::Preamble => {
                    if let Some(i) = memmem::find(&self.buf, &self.delimiter) {
                        self.buf.advance(i + self.delimiter.len());
                        self.state = State::AfterDelimiter;
                    } else {
                        let keep = self.delimiter.len();
                        if self.buf.len() > keep {
                            let n = self.buf.len() - keep;
                            self.buf.advance(n);
                        }
                        if !self.fill().await? {
                            return Err(MultipartError::Malformed(
                                "no boundary delimiter: check the boundary parameter",
                            ));
                        }
                    }
                }
                State::AfterDelimiter => {
                    while self.buf.len() < 2 {
                        if !self.fill().await? {
                            return Err(MultipartError::Malformed("body ends after a delimiter"));
                        }
                    }
                    if self.buf.starts_with(b"--") {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    let end = loop {
                        if let Some(i) = memmem::find(&self.buf, b"\r\n\r\n") {
                            break i;
                        }
                        if self.buf.len() > 16 * 1024 {
                            return Err(MultipartError::Malformed("part headers too long"));
                        }
                        if !self.fill().await? {
                            return Err(MultipartError::Malformed("body ends inside part headers"));
                        }
                    };
                    let head = self.buf.split_to(end + 4);
                    let text = String::from_utf8_lossy(&head);
                    let mut lines = text.split("\r\n");
                    // The rest of the delimiter line: transport padding only.
                    if lines.next().is_some_and(|l| !l.trim().is_empty()) {
                        return Err(MultipartError::Malformed("text after a boundary delimiter"));
                    }
                    let headers = lines
                        .filter(|l| !l.is_empty())
                        .filter_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        })
                        .collect();
                    self.state = State::Body;
                    return Ok(Some(PartHeaders(headers)));
                }
            }
        }
    }

    /// The next piece of the current part's body; `None` at its end.
    ///
    /// # Errors
    /// When the body is truncated, too large or cannot be read.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if self.state != State::Body {
            return Ok(None);
        }
        loop {
            if let Some(i) = memmem::find(&self.buf, &self.delimiter) {
                if i > 0 {
                    return Ok(Some(self.buf.split_to(i).freeze()));
                }
                self.buf.advance(self.delimiter.len());
                self.state = State::AfterDelimiter;
                return Ok(None);
            }
            // Everything but a possible start of the delimiter can be handed out.
            let keep = self.delimiter.len() - 1;
            if self.buf.len() > keep + 8 * 1024 {
                let n = self.buf.len() - keep;
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            if !self.fill().await? {
                return Err(MultipartError::Malformed(
                    "body ends inside a part (no closing delimiter)",
                ));
            }
        }
    }
}

/// A boundary for a response: random, so no instance's bytes can contain it by design.
pub fn new_boundary() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().r#gen();
    format!("kade-{n:032x}")
}

/// The header block that opens a part.
pub fn part_head(boundary: &str, content_type: &str, extra: &[(&str, String)]) -> Bytes {
    let mut s = format!("--{boundary}\r\nContent-Type: {content_type}\r\n");
    for (k, v) in extra {
        s.push_str(&format!("{k}: {v}\r\n"));
    }
    s.push_str("\r\n");
    Bytes::from(s)
}

/// The closing delimiter.
pub fn closing(boundary: &str) -> Bytes {
    Bytes::from(format!("--{boundary}--\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(body: &[u8], chunk: usize) -> Result<Vec<(PartHeaders, Vec<u8>)>, String> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut r = Reader::new(futures::stream::iter(chunks), "XyZ", 1 << 20);
        let mut out = Vec::new();
        while let Some(h) = r.next_part().await.map_err(|e| e.to_string())? {
            let mut body = Vec::new();
            while let Some(c) = r.next_chunk().await.map_err(|e| e.to_string())? {
                body.extend_from_slice(&c);
            }
            out.push((h, body));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn parts_are_read_whatever_the_chunking() {
        let mut body = b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        let first: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        body.extend_from_slice(&first);
        body.extend_from_slice(
            b"\r\n--XyZ\r\ncontent-type: application/dicom\r\n\r\nsecond\r\n--X",
        );
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        for chunk in [1, 3, 7, 100, 4096, 1 << 20] {
            let parts = read_all(&body, chunk).await.unwrap();
            assert_eq!(parts.len(), 2, "chunk {chunk}");
            assert_eq!(parts[0].0.get("content-type"), Some("application/dicom"));
            assert_eq!(parts[0].1, first);
            assert_eq!(parts[1].1, b"second\r\n--X");
        }
    }

    #[tokio::test]
    async fn truncated_and_oversized_bodies_are_errors() {
        let body = b"--XyZ\r\nContent-Type: a/b\r\n\r\nno end";
        assert!(read_all(body, 5).await.is_err());
        assert!(read_all(b"no delimiter at all", 5).await.is_err());
        let big = vec![b'a'; (1 << 20) + 10];
        let err = read_all(&big, 4096).await.unwrap_err();
        assert!(err.contains("larger"), "{err}");
    }

    #[test]
    fn media_type_parameters() {
        let ct = "multipart/related; type=\"application/dicom\"; boundary=abc; transfer-syntax=*";
        assert_eq!(boundary(ct).as_deref(), Some("abc"));
        assert_eq!(param(ct, "type").as_deref(), Some("application/dicom"));
        assert_eq!(param(ct, "transfer-syntax").as_deref(), Some("*"));
    }
}
