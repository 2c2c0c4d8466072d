//! `{packet,4}` framing: an incremental reader for a non-blocking byte stream, and the
//! layout of outbound frames.
//!
//! The reader hands out whole frames only. Small frames are cut out of a 64 KiB staging
//! buffer; a frame larger than that is read straight into its own allocation, so a
//! 16 MiB binary is copied once in user space. A frame over `max_frame` is not kept:
//! its first bytes are (to answer the request) and the rest is read and dropped.

use std::io::{self, Read};

const STAGING: usize = 64 * 1024;
/// Frames up to this size get their whole buffer when their header arrives; a larger
/// announced length is allocated only as its bytes come (at most doubling).
const EAGER_FRAME: usize = 64 << 20;
/// Bytes of an oversized frame kept so its request can still be answered:
/// context id (8) + header length (2) + the largest header (65535).
pub const HEAD_KEEP: usize = 8 + 2 + 65535;

/// Something the reader produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A whole frame, without its 4-byte length.
    Frame(Vec<u8>),
    /// A frame over the limit: its declared length and its first bytes.
    Oversized { len: usize, head: Vec<u8> },
}

enum Big {
    /// A large frame being read into its own buffer.
    /// `frame` grows as bytes arrive (at most doubling), so a length announced by a
    /// frame header is not allocated before its bytes come.
    Filling {
        frame: Vec<u8>,
        filled: usize,
        len: usize,
    },
    /// An oversized frame: keep `head`, drop the rest.
    Discarding {
        head: Vec<u8>,
        len: usize,
        seen: usize,
    },
}

pub struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    big: Option<Big>,
    max_frame: usize,
}

/// Whether the stream is still open after a `fill`.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// Read until `WouldBlock`; more may come.
    Open,
    /// End of stream. `clean` is false if it cut a frame in two.
    Closed { clean: bool },
}

impl FrameReader {
    pub fn new(max_frame: usize) -> Self {
        FrameReader {
            buf: vec![0u8; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
            big: None,
            max_frame,
        }
    }

    /// Reads what `src` has now and pushes each complete frame to `out`. `EINTR` is
    /// retried. It stops at `WouldBlock` or at the end of the stream; with
    /// `stop_short`, also after a short read: a pipe that gave less than asked for was
    /// emptied by that read, and skipping the read that would only say so gets the frame
    /// to its context sooner. Only a reader that will read again soon may stop short
    /// (a spinning context): the end of the stream may stand right behind those bytes,
    /// and an edge-triggered poll would not say so twice.
    pub fn fill<R: Read>(
        &mut self,
        src: &mut R,
        out: &mut Vec<Inbound>,
        stop_short: bool,
    ) -> io::Result<Status> {
        loop {
            let (asked, got) = match self.read_some(src) {
                (_, Ok(0)) => {
                    let clean = self.big.is_none() && self.start == self.end;
                    return Ok(Status::Closed { clean });
                }
                (asked, Ok(n)) => (asked, n),
                (_, Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                (_, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Status::Open),
                (_, Err(e)) => return Err(e),
            };
            self.advance(got, out);
            if stop_short && got < asked {
                return Ok(Status::Open);
            }
        }
    }

    /// One read into the buffer that needs bytes now: how many bytes it asked for, and
    /// the result.
    fn read_some<R: Read>(&mut self, src: &mut R) -> (usize, io::Result<usize>) {
        match &mut self.big {
            Some(Big::Filling { frame, filled, len }) => {
                if frame.len() == *filled {
                    let grown = (*filled * 2).max(*filled + STAGING).min(*len);
                    frame.resize(grown, 0);
                }
                let space = &mut frame[*filled..];
                (space.len(), src.read(space))
            }
            Some(Big::Discarding { .. }) => {
                self.start = 0;
                self.end = 0;
                (self.buf.len(), src.read(&mut self.buf))
            }
            None => {
                if self.end == self.buf.len() {
                    self.compact();
                }
                let space = &mut self.buf[self.end..];
                (space.len(), src.read(space))
            }
        }
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Accounts for `n` fresh bytes, then cuts out every complete frame.
    fn advance(&mut self, n: usize, out: &mut Vec<Inbound>) {
        match &mut self.big {
            Some(Big::Filling { filled, len, .. }) => {
                *filled += n;
                if *filled == *len {
                    if let Some(Big::Filling { frame, .. }) = self.big.take() {
                        out.push(Inbound::Frame(frame));
                    }
                }
                return;
            }
            Some(Big::Discarding { .. }) => self.end = n,
            None => self.end += n,
        }
        self.discard_staged(out);
        self.cut_frames(out);
    }

    /// Feeds staged bytes to an oversized frame being discarded.
    fn discard_staged(&mut self, out: &mut Vec<Inbound>) {
        let Some(Big::Discarding { head, len, seen }) = &mut self.big else {
            return;
        };
        let avail = self.end - self.start;
        let take = avail.min(*len - *seen);
        let keep = take.min(HEAD_KEEP.saturating_sub(head.len()));
        head.extend_from_slice(&self.buf[self.start..self.start + keep]);
        *seen += take;
        self.start += take;
        if *seen == *len {
            if let Some(Big::Discarding { head, len, .. }) = self.big.take() {
                out.push(Inbound::Oversized { len, head });
            }
        }
    }

    fn cut_frames(&mut self, out: &mut Vec<Inbound>) {
        while self.big.is_none() && self.end - self.start >= 4 {
            let s = self.start;
            let len = u32::from_be_bytes([
                self.buf[s],
                self.buf[s + 1],
                self.buf[s + 2],
                self.buf[s + 3],
            ]) as usize;
            let avail = self.end - s - 4;
            if len > self.max_frame {
                self.start += 4;
                self.big = Some(Big::Discarding {
                    head: Vec::new(),
                    len,
                    seen: 0,
                });
                self.discard_staged(out);
            } else if avail >= len {
                out.push(Inbound::Frame(self.buf[s + 4..s + 4 + len].to_vec()));
                self.start += 4 + len;
            } else if len + 4 > self.buf.len() {
                // Up to EAGER_FRAME the whole frame is allocated now (one copy for a
                // large binary); beyond, it grows as its bytes come.
                let mut frame = Vec::with_capacity(len.min(EAGER_FRAME));
                frame.extend_from_slice(&self.buf[s + 4..self.end]);
                if len <= EAGER_FRAME {
                    frame.resize(len, 0);
                }
                self.start = 0;
                self.end = 0;
                self.big = Some(Big::Filling {
                    frame,
                    filled: avail,
                    len,
                });
            } else {
                break;
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Kinds of outbound frames (see docs/protocol.md).
pub const KIND_REPLY: u8 = 0;
pub const KIND_EVENT: u8 = 1;
pub const KIND_CALLBACK: u8 = 2;
pub const KIND_SEND: u8 = 3;
/// A non-final frame of a request (a stream item), routed like a reply.
pub const KIND_STREAM: u8 = 4;

/// Starts an outbound frame in `out`: room for the length, the kind, the header.
/// The ETF payload is appended after it, then `finish_frame` fills in the length.
pub fn begin_frame(out: &mut Vec<u8>, kind: u8, header: &[u8]) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    out.extend_from_slice(&(header.len() as u16).to_be_bytes());
    out.extend_from_slice(header);
}

/// `max_reply`: bytes one reply or stream item may take (`--max-reply`).
static MAX_REPLY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

pub fn set_max_reply(max: usize) {
    MAX_REPLY.store(max, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes one reply or stream item may take.
pub fn max_reply() -> usize {
    MAX_REPLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes the length of a reply or stream item built by [`begin_frame`], which must
/// stay within `max_reply` (the node never holds a larger one).
pub fn finish_reply(out: &mut [u8]) -> Result<(), crate::error::Error> {
    let max = MAX_REPLY.load(std::sync::atomic::Ordering::Relaxed);
    let size = out.len() - 7;
    if size > max {
        return Err(crate::error::Error::ReplyTooLarge { size, max });
    }
    finish_frame(out)
}

/// Marks a frame built by [`begin_frame`] for a `[safe]` decode (see `atoms`).
pub fn mark_safe_decode(out: &mut [u8]) {
    out[4] |= crate::atoms::SAFE_DECODE;
}

/// Writes the length of a frame built by [`begin_frame`]; a frame longer than the
/// 4-byte length can say is an error (it would corrupt the stream).
pub fn finish_frame(out: &mut [u8]) -> Result<(), crate::error::Error> {
    let len = frame_length(out.len() - 4)?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

fn frame_length(size: usize) -> Result<u32, crate::error::Error> {
    u32::try_from(size).map_err(|_| crate::error::Error::ReplyTooLarge {
        size,
        max: u32::MAX as usize,
    })
}

/// A request frame split into its parts: `<<Ctx:64, HLen:16, Header, Body>>`.
pub struct RequestFrame<'a> {
    pub ctx: u64,
    pub header: &'a [u8],
    pub body: &'a [u8],
}

/// Splits a request frame; `None` if it is too short for its fixed fields.
pub fn split_request(frame: &[u8]) -> Option<RequestFrame<'_>> {
    if frame.len() < 10 {
        return None;
    }
    let ctx = u64::from_be_bytes(frame[..8].try_into().ok()?);
    let hlen = u16::from_be_bytes([frame[8], frame[9]]) as usize;
    if frame.len() < 10 + hlen {
        return None;
    }
    Some(RequestFrame {
        ctx,
        header: &frame[10..10 + hlen],
        body: &frame[10 + hlen..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Yields the input in chunks of the given sizes, with `WouldBlock` between them.
    struct Chunks {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        i: usize,
        blocked: bool,
    }

    impl Read for Chunks {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.data.len() {
                return Ok(0);
            }
            if self.blocked {
                self.blocked = false;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.blocked = true;
            let want = self.sizes[self.i % self.sizes.len()].max(1);
            self.i += 1;
            let n = want.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn read_all(data: Vec<u8>, sizes: Vec<usize>, max: usize) -> (Vec<Inbound>, Status) {
        let mut src = Chunks {
            data,
            pos: 0,
            sizes,
            i: 0,
            blocked: false,
        };
        let mut r = FrameReader::new(max);
        let mut out = Vec::new();
        loop {
            if let Status::Closed { clean } = r.fill(&mut src, &mut out, true).unwrap() {
                return (out, Status::Closed { clean });
            }
        }
    }

    #[test]
    fn big_frame_is_read_whole() {
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut data = packet(b"a");
        data.extend(packet(&big));
        data.extend(packet(b"bc"));
        let (out, status) = read_all(data, vec![7000, 65536, 3], 1 << 30);
        assert_eq!(status, Status::Closed { clean: true });
        assert_eq!(
            out,
            vec![
                Inbound::Frame(b"a".to_vec()),
                Inbound::Frame(big),
                Inbound::Frame(b"bc".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_frame_keeps_head_and_the_stream_goes_on() {
        let big = vec![9u8; 300_000];
        let mut data = packet(&big);
        data.extend(packet(b"next"));
        let (out, _) = read_all(data, vec![1000], 100_000);
        assert_eq!(out.len(), 2);
        match &out[0] {
            Inbound::Oversized { len, head } => {
                assert_eq!(*len, 300_000);
                assert_eq!(head.len(), HEAD_KEEP);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[1], Inbound::Frame(b"next".to_vec()));
    }

    #[test]
    fn a_draining_fill_sees_the_end_right_behind_the_last_frame() {
        // The router thread's poll is edge-triggered: the end of the stream that comes
        // with the last bytes is not reported again, so its one fill must see it.
        let mut r = FrameReader::new(1 << 20);
        let mut out = Vec::new();
        let mut src = &packet(b"last")[..];
        assert_eq!(
            r.fill(&mut src, &mut out, false).unwrap(),
            Status::Closed { clean: true }
        );
        assert_eq!(out, vec![Inbound::Frame(b"last".to_vec())]);
    }

    #[test]
    fn a_huge_announced_length_is_not_allocated_before_its_bytes() {
        let mut r = FrameReader::new(1 << 30);
        let mut out = Vec::new();
        let mut src = &[0x3f, 0xff, 0xff, 0xff, 1, 2, 3][..];
        // a short read ends a fill that may stop short; the next one sees the end
        assert_eq!(r.fill(&mut src, &mut out, true).unwrap(), Status::Open);
        assert_eq!(
            r.fill(&mut src, &mut out, true).unwrap(),
            Status::Closed { clean: false }
        );
        match &r.big {
            Some(Big::Filling { frame, filled, len }) => {
                assert_eq!((*filled, *len), (3, 0x3fff_ffff));
                assert!(frame.capacity() <= EAGER_FRAME);
            }
            _ => panic!("not filling"),
        }
    }

    #[test]
    fn a_frame_over_4_gib_is_an_error_not_a_wrapped_length() {
        assert_eq!(frame_length(7).unwrap(), 7);
        assert_eq!(frame_length(u32::MAX as usize).unwrap(), u32::MAX);
        assert!(matches!(
            frame_length(u32::MAX as usize + 1),
            Err(crate::error::Error::ReplyTooLarge { .. })
        ));
    }

    #[test]
    fn cut_frame_is_not_clean() {
        let mut data = packet(b"hello");
        data.truncate(6);
        let (out, status) = read_all(data, vec![100], 1000);
        assert!(out.is_empty());
        assert_eq!(status, Status::Closed { clean: false });
    }

    #[test]
    fn split_request_checks_lengths() {
        assert!(split_request(&[0; 9]).is_none());
        let mut f = vec![0, 0, 0, 0, 0, 0, 0, 7, 0, 3, 1, 2];
        assert!(split_request(&f).is_none());
        f.extend_from_slice(&[3, 131, 106]);
        let r = split_request(&f).unwrap();
        assert_eq!(
            (r.ctx, r.header, r.body),
            (7, &[1u8, 2, 3][..], &[131u8, 106][..])
        );
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_frames(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..20),
            sizes in proptest::collection::vec(1usize..5000, 1..10),
        ) {
            let data: Vec<u8> = frames.iter().flat_map(|f| packet(f)).collect();
            let (out, status) = read_all(data, sizes, 1 << 20);
            prop_assert_eq!(status, Status::Closed { clean: true });
            let expect: Vec<Inbound> = frames.into_iter().map(Inbound::Frame).collect();
            prop_assert_eq!(out, expect);
        }
    }
}
