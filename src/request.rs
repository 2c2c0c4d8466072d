//! Requests as the context threads see them: the decoded envelope of a request (its op,
//! its encoded parts and the options this side acts on), the jobs the router queues
//! for a context, and the spec a context is created from.
//!
//! These types belong to neither the router nor the context nor the session: the
//! router builds them, the context thread queues and runs them, the session serves
//! them. Keeping them here lets the arrows point one way: router -> context -> session.

use std::time::Instant;

use crate::error::Error;
use crate::etf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    OwnGil,
    Main,
}

/// How to create a context (from a `new_context` request).
#[derive(Clone, Debug)]
pub struct Spec {
    pub id: u64,
    pub mode: Mode,
    pub name: Option<String>,
    pub preload: Option<String>,
    pub path: Vec<String>,
}

/// What a job asks of a context.
pub enum Kind {
    /// Serve the request in the frame.
    Request,
    /// Become the context described (always the first job of a thread).
    Start(Box<Spec>),
    /// End the interpreter and the thread.
    Stop,
}

/// One unit of work for a context, with the frame it came in (for the reply header).
pub struct Job {
    pub frame: Vec<u8>,
    /// Byte range of the reply header inside `frame`.
    pub header: (usize, usize),
    /// Where the ETF body starts inside `frame`.
    pub body: usize,
    pub kind: Kind,
    /// When the router read it (request deadlines count from here).
    pub arrived: Instant,
    /// Made by Erlang code that Python of this context called (`erlang.call`): a
    /// context waiting in `erlang.call` always serves these (see `context`).
    pub reentrant: bool,
}

/// The top bit of a request's context id marks a re-entrant request.
pub const REENTRANT_BIT: u64 = 1 << 63;

impl Job {
    pub fn header(&self) -> &[u8] {
        &self.frame[self.header.0..self.header.1]
    }
    pub fn body(&self) -> &[u8] {
        &self.frame[self.body..]
    }

    /// Whether the job gives back what another request took (`stream_cancel`,
    /// `stream_credit`, `drop_env`, `release`, sent with no reply wanted): a full queue
    /// takes it all the same, since refusing it would leave the stream running (or
    /// stalled), the env or the object alive, with nobody left to ask again. There are
    /// at most as many as there are things to give back.
    pub fn gives_back(&self) -> bool {
        if !matches!(self.kind, Kind::Request) || self.header.0 != self.header.1 {
            return false;
        }
        let Ok(mut r) = etf::Reader::new(self.body()) else {
            return false;
        };
        if r.tuple_header().is_err() {
            return false;
        }
        matches!(
            r.atom().as_deref(),
            Ok("stream_cancel" | "stream_credit" | "drop_env" | "release")
        )
    }
}

/// The options of a request that this side acts on (others are ignored).
#[derive(Default)]
pub struct Opts<'a> {
    /// ETF of the pid that made the request (for `erlang.self()`).
    pub caller: Option<&'a [u8]>,
    /// The env whose globals to use.
    pub env: Option<u64>,
    /// Keep the result in the context and answer a handle.
    pub return_ref: bool,
    /// Milliseconds from arrival; `None` for infinity or absent.
    pub timeout_ms: Option<u64>,
    /// Stream items that may be ahead of what the consumer took (`stream` only).
    pub window: Option<u64>,
    /// `arrays => binary | lists`: the form of numpy arrays in the reply (issue 19);
    /// `None`: the runtime's default.
    pub arrays: Option<bool>,
}

impl<'a> Opts<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut r = etf::Reader::body(bytes);
        if r.u8()? != etf::MAP {
            return Err(Error::BadRequest("options must be a map".into()));
        }
        let n = r.u32()? as usize;
        let mut opts = Opts::default();
        for _ in 0..n {
            let key = r.peek_atom();
            r.term_slice()?;
            let value = r.term_slice()?;
            match key.as_deref() {
                Some("caller")
                    if matches!(value.first(), Some(&etf::NEW_PID) | Some(&etf::PID)) =>
                {
                    opts.caller = Some(value)
                }
                Some("env") => {
                    opts.env = Some(
                        small_uint(value)
                            .ok_or_else(|| Error::BadRequest("env must be an env id".into()))?,
                    )
                }
                Some("return") => {
                    opts.return_ref = etf::Reader::body(value).atom().ok().as_deref() == Some("ref")
                }
                Some("timeout") => opts.timeout_ms = small_uint(value),
                Some("arrays") => {
                    opts.arrays = match etf::Reader::body(value).atom().ok().as_deref() {
                        Some("binary") => Some(true),
                        Some("lists") => Some(false),
                        _ => {
                            return Err(Error::BadRequest("arrays must be binary or lists".into()))
                        }
                    }
                }
                Some("window") => {
                    opts.window = Some(small_uint(value).filter(|&w| w > 0).ok_or_else(|| {
                        Error::BadRequest("window must be a positive integer".into())
                    })?)
                }
                _ => {}
            }
        }
        Ok(opts)
    }
}

/// A non-negative integer term that fits in u64, from its encoded body.
pub fn small_uint(body: &[u8]) -> Option<u64> {
    let mut r = etf::Reader::body(body);
    etf::Term::read(&mut r, 0).ok()?.as_u64()
}

/// The part of a request after its op atom: the encoded elements, the last being Opts.
pub struct Parts<'a> {
    items: [&'a [u8]; 5],
    pub len: usize,
}

impl<'a> Parts<'a> {
    pub fn get(&self, i: usize) -> &'a [u8] {
        self.items[i]
    }
    pub fn text(&self, i: usize, what: &str) -> Result<std::borrow::Cow<'a, str>, Error> {
        etf::Reader::body(self.items[i])
            .text()
            .map_err(|_| Error::BadRequest(format!("{what} must be an atom or a binary")))
    }
    pub fn id(&self, i: usize, what: &str) -> Result<u64, Error> {
        small_uint(self.items[i])
            .ok_or_else(|| Error::BadRequest(format!("{what} must be a non-negative integer")))
    }
}

/// `{Op, Part1, ..., Opts}` split into the op and the encoded parts (each skipped once,
/// which also checks that the whole body is well-formed ETF).
fn split_body(body: &[u8]) -> Result<(std::borrow::Cow<'_, str>, Parts<'_>), Error> {
    let mut r = etf::Reader::new(body)?;
    let arity = r
        .tuple_header()
        .map_err(|_| Error::BadRequest("a request is a tuple".into()))?;
    let op = r
        .atom()
        .map_err(|_| Error::BadRequest("a request starts with an atom".into()))?;
    let mut parts = Parts {
        items: [&[]; 5],
        len: arity.saturating_sub(1),
    };
    if arity < 2 || parts.len > parts.items.len() {
        return Err(Error::BadRequest(format!("unknown request {op}/{arity}")));
    }
    for item in parts.items.iter_mut().take(parts.len) {
        *item = r.term_slice()?;
    }
    r.finish()?;
    Ok((op, parts))
}

/// A request decoded once: its op, its encoded parts (the last is Opts) and the
/// options. Malformed ETF is `bad_term`; a well-formed term of the wrong shape
/// `bad_request`. Only a refused request pays for telling them apart.
pub struct Request<'a> {
    pub op: std::borrow::Cow<'a, str>,
    pub parts: Parts<'a>,
    pub opts: Opts<'a>,
}

impl<'a> Request<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Error> {
        let (op, parts) = split_body(body).map_err(|e| classify(body, e))?;
        let opts = Opts::parse(parts.get(parts.len - 1))?;
        Ok(Request { op, parts, opts })
    }
}

/// The error to report for a body `split_body` refused: what is wrong with the ETF
/// if anything, else `shape`.
fn classify(body: &[u8], shape: Error) -> Error {
    let check = etf::Reader::new(body).and_then(|mut r| r.skip(0).and_then(|()| r.finish()));
    match check {
        Err(e) => e.into(),
        Ok(()) => shape,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BadTerm;
    use crate::etf::Term;

    fn call(opts: Term) -> Vec<u8> {
        Term::Tuple(vec![
            Term::atom("call"),
            Term::Binary(b"operator".to_vec()),
            Term::Binary(b"add".to_vec()),
            Term::List(vec![Term::Int(1), Term::Int(2)]),
            Term::Map(vec![]),
            opts,
        ])
        .encode()
    }

    #[test]
    fn options_are_read_and_unknown_ones_ignored() {
        let opts = Term::Map(vec![
            (Term::atom("env"), Term::Int(7)),
            (Term::atom("return"), Term::atom("ref")),
            (Term::atom("timeout"), Term::Int(250)),
            (Term::atom("whatever"), Term::List(vec![Term::Int(1)])),
        ]);
        let body = call(opts);
        let (op, parts) = split_body(&body).unwrap();
        assert_eq!(op, "call");
        assert_eq!(parts.len, 5);
        let opts = Opts::parse(parts.get(4)).unwrap();
        assert_eq!(
            (opts.env, opts.return_ref, opts.timeout_ms, opts.caller),
            (Some(7), true, Some(250), None)
        );
        let infinity = Term::Map(vec![(Term::atom("timeout"), Term::atom("infinity"))]).encode();
        let infinity = Opts::parse(&infinity[1..]).unwrap();
        assert_eq!(infinity.timeout_ms, None);
    }

    #[test]
    fn options_must_be_a_map() {
        let body = call(Term::atom("x"));
        let (_, parts) = split_body(&body).unwrap();
        assert!(matches!(
            Opts::parse(parts.get(4)),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn malformed_etf_is_bad_term_and_wrong_shape_is_bad_request() {
        let shape = |body: &[u8]| split_body(body).map(|_| ()).map_err(|e| classify(body, e));
        // truncated in the tuple header: bad_term, not bad_request
        assert!(matches!(
            shape(&[131, 104]),
            Err(Error::BadTerm(BadTerm::Invalid(_)))
        ));
        // a list header claiming 2^32 elements
        assert!(matches!(
            shape(&[131, 108, 255, 255, 255, 255]),
            Err(Error::BadTerm(_))
        ));
        // trailing bytes after a valid request
        let mut body = call(Term::Map(vec![]));
        body.push(0);
        assert!(matches!(
            shape(&body),
            Err(Error::BadTerm(BadTerm::Invalid(_)))
        ));
        // valid ETF, wrong shape
        assert!(matches!(
            shape(&Term::Int(1).encode()),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            shape(&Term::Tuple(vec![Term::Int(1), Term::Int(2)]).encode()),
            Err(Error::BadRequest(_))
        ));
        assert!(shape(&call(Term::Map(vec![]))).is_ok());
    }

    fn job(header: &[u8], body: &[u8]) -> Job {
        let mut frame = vec![0; 10];
        frame.extend_from_slice(header);
        frame.extend_from_slice(body);
        Job {
            header: (10, 10 + header.len()),
            body: 10 + header.len(),
            frame,
            kind: Kind::Request,
            arrived: Instant::now(),
            reentrant: false,
        }
    }

    #[test]
    fn frames_that_give_back_are_told_apart() {
        let give =
            |op: &str| Term::Tuple(vec![Term::atom(op), Term::Int(7), Term::Map(vec![])]).encode();
        for op in ["stream_cancel", "drop_env", "release"] {
            assert!(job(b"", &give(op)).gives_back(), "{op}");
            // one that wants a reply is an ordinary request
            assert!(!job(b"h", &give(op)).gives_back(), "{op}");
        }
        let credit = Term::Tuple(vec![
            Term::atom("stream_credit"),
            Term::Binary(b"s".to_vec()),
            Term::Int(1),
            Term::Map(vec![]),
        ])
        .encode();
        assert!(job(b"", &credit).gives_back());
        assert!(!job(b"", &call(Term::Map(vec![]))).gives_back(), "a cast");
        assert!(!job(b"", &[131, 104]).gives_back(), "malformed");
    }
}
