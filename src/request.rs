//! Requests as the context threads see them: a request decoded once into its typed
//! [`Op`] and the options this side acts on (the one place that knows the ops' shapes),
//! the jobs the router queues for a context, and the spec a context is created from.
//!
//! These types belong to neither the router nor the context nor the session: the
//! router builds them, the context thread queues and runs them, the session serves
//! them. Keeping them here lets the arrows point one way: router -> context -> session.

use std::borrow::Cow;
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
    /// Serve the request in the frame. `gives_back`: see [`Job::gives_back`] (read once,
    /// when the job is made: the mailbox admits by it and the context times by it).
    Request { gives_back: bool },
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
    /// A request frame `<<Ctx:64, HLen:16, Header, Body>>` (its lengths checked by
    /// `framing::split_request`) as a job.
    pub fn request(frame: Vec<u8>, header_len: usize, reentrant: bool) -> Job {
        let header = (10, 10 + header_len);
        let gives_back = header_len == 0 && op_gives_back(&frame[header.1..]);
        Job {
            frame,
            header,
            body: header.1,
            kind: Kind::Request { gives_back },
            arrived: Instant::now(),
            reentrant,
        }
    }

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
        matches!(self.kind, Kind::Request { gives_back: true })
    }
}

/// The ops that give back what another request took (see [`Job::gives_back`]).
const GIVING_BACK: [&str; 4] = ["stream_cancel", "stream_credit", "drop_env", "release"];

/// Whether a request body's op is one of [`GIVING_BACK`] (its first atom only).
fn op_gives_back(body: &[u8]) -> bool {
    let Ok(mut r) = etf::Reader::new(body) else {
        return false;
    };
    r.tuple_header().is_ok() && r.atom().is_ok_and(|op| GIVING_BACK.contains(&op.as_ref()))
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
struct Parts<'a> {
    items: [&'a [u8]; 5],
    len: usize,
}

impl<'a> Parts<'a> {
    fn get(&self, i: usize) -> &'a [u8] {
        self.items[i]
    }
    fn text(&self, i: usize, what: &str) -> Result<Cow<'a, str>, Error> {
        etf::Reader::body(self.items[i])
            .text()
            .map_err(|_| Error::BadRequest(format!("{what} must be an atom or a binary")))
    }
    fn id(&self, i: usize, what: &str) -> Result<u64, Error> {
        small_uint(self.items[i])
            .ok_or_else(|| Error::BadRequest(format!("{what} must be a non-negative integer")))
    }
    fn binary(&self, i: usize, what: &str) -> Result<&'a [u8], Error> {
        etf::Reader::body(self.items[i])
            .binary()
            .map_err(|_| Error::BadRequest(format!("{what} must be a binary")))
    }
}

/// `{Op, Part1, ..., Opts}` split into the op and the encoded parts (each skipped once,
/// which also checks that the whole body is well-formed ETF).
fn split_body(body: &[u8]) -> Result<(Cow<'_, str>, Parts<'_>), Error> {
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

/// A request decoded once: its typed op and the options. Malformed ETF is `bad_term`;
/// a well-formed term of the wrong shape `bad_request`. Only a refused request pays
/// for telling them apart.
pub struct Request<'a> {
    pub op: Op<'a>,
    pub opts: Opts<'a>,
}

impl<'a> Request<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Error> {
        let (name, parts) = split_body(body).map_err(|e| classify(body, e))?;
        let opts = Opts::parse(parts.get(parts.len - 1))?;
        let op = Op::decode(&name, &parts)?;
        Ok(Request { op, opts })
    }
}

/// What a request asks of a context, with its fields typed (`docs/protocol.md`,
/// "Erlang -> port"). Values Python gets (arguments, code, locals) stay encoded: only
/// the session, attached to the interpreter, can make them Python objects.
pub enum Op<'a> {
    /// `{call, Module, Function, Args, Kwargs, Opts}`
    Call(Invoke<'a>),
    /// `{stream, Module, Function, Args, Kwargs, Opts}`: the result's items, streamed.
    Stream(Invoke<'a>),
    /// `{eval, Code, Locals, Opts}`
    Eval { code: &'a [u8], locals: &'a [u8] },
    /// `{exec, Code, Opts}`
    Exec { code: &'a [u8] },
    /// `{new_env, Opts}`
    NewEnv,
    /// `{drop_env, EnvId, Opts}`
    DropEnv { env: u64 },
    /// `{getattr, RefId, Name, Opts}`
    GetAttr { handle: u64, name: Cow<'a, str> },
    /// `{call_method, RefId, Name, Args, Kwargs, Opts}`
    CallMethod {
        handle: u64,
        method: Cow<'a, str>,
        args: &'a [u8],
        kwargs: &'a [u8],
    },
    /// `{to_term, RefId, Opts}`
    ToTerm { handle: u64 },
    /// `{release, RefId, Opts}`
    Release { handle: u64 },
    /// `{stream_credit, StreamId, N, Opts}`
    StreamCredit { stream: &'a [u8], credit: u64 },
    /// `{stream_cancel, StreamId, Opts}`
    StreamCancel { stream: &'a [u8] },
    /// `{channel_open, Name, Capacity, Opts}`
    ChannelOpen { name: Cow<'a, str>, capacity: u64 },
}

/// `Module:Function(*Args, **Kwargs)` of a `call` or a `stream`.
pub struct Invoke<'a> {
    pub module: Cow<'a, str>,
    pub function: Cow<'a, str>,
    /// The encoded argument list and keyword map.
    pub args: &'a [u8],
    pub kwargs: &'a [u8],
}

impl<'a> Op<'a> {
    /// The op named `name` from its parts (the last of which, Opts, it leaves alone).
    fn decode(name: &str, p: &Parts<'a>) -> Result<Self, Error> {
        let invoke = || -> Result<Invoke<'a>, Error> {
            Ok(Invoke {
                module: p.text(0, "module")?,
                function: p.text(1, "function")?,
                args: p.get(2),
                kwargs: p.get(3),
            })
        };
        Ok(match (name, p.len) {
            ("call", 5) => Op::Call(invoke()?),
            ("stream", 5) => Op::Stream(invoke()?),
            ("eval", 3) => Op::Eval {
                code: p.get(0),
                locals: p.get(1),
            },
            ("exec", 2) => Op::Exec { code: p.get(0) },
            ("new_env", 1) => Op::NewEnv,
            ("drop_env", 2) => Op::DropEnv {
                env: p.id(0, "env id")?,
            },
            ("getattr", 3) => Op::GetAttr {
                handle: p.id(0, "ref id")?,
                name: p.text(1, "name")?,
            },
            ("call_method", 5) => Op::CallMethod {
                handle: p.id(0, "ref id")?,
                method: p.text(1, "method")?,
                args: p.get(2),
                kwargs: p.get(3),
            },
            ("to_term", 2) => Op::ToTerm {
                handle: p.id(0, "ref id")?,
            },
            ("release", 2) => Op::Release {
                handle: p.id(0, "ref id")?,
            },
            ("stream_credit", 3) => Op::StreamCredit {
                stream: p.binary(0, "stream id")?,
                credit: p.id(1, "credit")?,
            },
            ("stream_cancel", 2) => Op::StreamCancel {
                stream: p.binary(0, "stream id")?,
            },
            ("channel_open", 3) => Op::ChannelOpen {
                name: p.text(0, "channel name")?,
                capacity: p.id(1, "capacity")?,
            },
            (name, n) => {
                return Err(Error::BadRequest(format!(
                    "unknown request {name}/{}",
                    n + 1
                )))
            }
        })
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
        Job::request(frame, header.len(), false)
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

    #[test]
    fn requests_decode_into_typed_ops() {
        let body = call(Term::Map(vec![(Term::atom("env"), Term::Int(3))]));
        let req = Request::decode(&body).unwrap();
        let Op::Call(invoke) = req.op else {
            panic!("a call")
        };
        assert_eq!(
            (invoke.module.as_ref(), invoke.function.as_ref()),
            ("operator", "add")
        );
        assert_eq!(
            invoke.args,
            &Term::List(vec![Term::Int(1), Term::Int(2)]).encode()[1..]
        );
        assert_eq!(req.opts.env, Some(3));
        let credit = Term::Tuple(vec![
            Term::atom("stream_credit"),
            Term::Binary(b"s".to_vec()),
            Term::Int(9),
            Term::Map(vec![]),
        ])
        .encode();
        assert!(matches!(
            Request::decode(&credit).unwrap().op,
            Op::StreamCredit {
                stream: b"s",
                credit: 9
            }
        ));
    }

    #[test]
    fn a_field_of_the_wrong_type_or_an_unknown_op_is_a_bad_request() {
        let bad = |parts: Vec<Term>| {
            let body = Term::Tuple(parts).encode();
            match Request::decode(&body) {
                Err(Error::BadRequest(why)) => why,
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("decoded"),
            }
        };
        let opts = || Term::Map(vec![]);
        assert_eq!(
            bad(vec![Term::atom("release"), Term::atom("x"), opts()]),
            "ref id must be a non-negative integer"
        );
        assert_eq!(
            bad(vec![Term::atom("stream_cancel"), Term::Int(1), opts()]),
            "stream id must be a binary"
        );
        assert_eq!(
            bad(vec![
                Term::atom("call"),
                Term::Int(1),
                Term::atom("f"),
                Term::List(vec![]),
                opts(),
                opts()
            ]),
            "module must be an atom or a binary"
        );
        assert_eq!(
            bad(vec![
                Term::atom("release"),
                Term::Int(1),
                Term::Int(2),
                opts()
            ]),
            "unknown request release/4"
        );
        assert_eq!(
            bad(vec![Term::atom("nope"), opts()]),
            "unknown request nope/2"
        );
    }
}
