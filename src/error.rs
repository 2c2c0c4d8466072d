//! Errors as the Erlang caller sees them: each variant writes the `Error` of an
//! `{error, Error}` reply (see docs/protocol.md).

use std::fmt;

use crate::etf::{self, DecodeError};

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// `{python, Type, Message, Traceback}`
    Python {
        kind: String,
        message: String,
        traceback: String,
    },
    /// `{bad_term, Detail}`
    BadTerm(BadTerm),
    /// `{bad_request, Message}`
    BadRequest(String),
    /// `overloaded`
    Overloaded,
    /// `{context_down, Reason}`
    ContextDown(String),
    /// `{frame_too_large, Size, Max}`
    FrameTooLarge { size: usize, max: usize },
    /// `{reply_too_large, Size, Max}`: a reply (or stream item) over what one frame
    /// can carry.
    ReplyTooLarge { size: usize, max: usize },
    /// `{panic, Message}`
    Panic(String),
    /// `not_found`
    NotFound,
    /// `timeout`: the request's deadline passed (before it ran, or while it ran: it
    /// was interrupted).
    Timeout,
    /// `interrupted`: `pyport:interrupt/1` stopped the request.
    Interrupted,
}

/// Why a value could not cross between Erlang and Python.
#[derive(Debug, Clone, PartialEq)]
pub enum BadTerm {
    /// `too_deep`
    TooDeep,
    /// `{unsupported, TypeName}`: a Python object with no Erlang form.
    Unsupported(String),
    /// `{invalid, Message}`: malformed ETF.
    Invalid(String),
    /// `{ref_wrong_context, Ctx}`: an object handle of another context.
    RefWrongContext(u64),
    /// `{ref_not_found, Id}`: a released or unknown object handle.
    RefNotFound(u64),
}

/// What the caller sees of the `erlang` exceptions pyport raises to stop a request
/// (`CallTimeout`, `Interrupted`; the class name qualified or not): `timeout` and
/// `interrupted`. Other exceptions: `None`.
pub fn stop_error(class: &str) -> Option<Error> {
    match class.strip_prefix("erlang.").unwrap_or(class) {
        "CallTimeout" => Some(Error::Timeout),
        "Interrupted" => Some(Error::Interrupted),
        _ => None,
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::BadTerm(match e {
            DecodeError::TooDeep => BadTerm::TooDeep,
            other => BadTerm::Invalid(other.to_string()),
        })
    }
}

impl From<BadTerm> for Error {
    fn from(e: BadTerm) -> Self {
        Error::BadTerm(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Python { kind, message, .. } => write!(f, "{kind}: {message}"),
            Error::BadTerm(BadTerm::TooDeep) => write!(f, "term nested too deep"),
            Error::BadTerm(BadTerm::Unsupported(t)) => write!(f, "cannot convert a Python {t}"),
            Error::BadTerm(BadTerm::Invalid(m)) => write!(f, "invalid term: {m}"),
            Error::BadTerm(BadTerm::RefWrongContext(c)) => {
                write!(f, "object handle of context {c}")
            }
            Error::BadTerm(BadTerm::RefNotFound(i)) => write!(f, "no object handle {i}"),
            Error::BadRequest(m) => write!(f, "bad request: {m}"),
            Error::Overloaded => write!(f, "overloaded"),
            Error::ContextDown(r) => write!(f, "context down: {r}"),
            Error::FrameTooLarge { size, max } => {
                write!(f, "frame of {size} bytes is over the limit of {max}")
            }
            Error::ReplyTooLarge { size, max } => {
                write!(f, "reply of {size} bytes is over the limit of {max}")
            }
            Error::Panic(m) => write!(f, "panic: {m}"),
            Error::NotFound => write!(f, "not found"),
            Error::Timeout => write!(f, "timeout"),
            Error::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// Writes `{error, Error}`.
    pub fn write_reply(&self, w: &mut etf::Writer<'_>) {
        w.tuple_header(2);
        w.atom("error");
        self.write(w);
    }

    pub fn write(&self, w: &mut etf::Writer<'_>) {
        match self {
            Error::Python {
                kind,
                message,
                traceback,
            } => {
                w.tuple_header(4);
                w.atom("python");
                w.binary(kind.as_bytes());
                w.binary(message.as_bytes());
                w.binary(traceback.as_bytes());
            }
            Error::BadTerm(detail) => {
                w.tuple_header(2);
                w.atom("bad_term");
                match detail {
                    BadTerm::TooDeep => w.atom("too_deep"),
                    BadTerm::Unsupported(t) => tagged(w, "unsupported", t),
                    BadTerm::Invalid(m) => tagged(w, "invalid", m),
                    BadTerm::RefWrongContext(c) => {
                        w.tuple_header(2);
                        w.atom("ref_wrong_context");
                        w.int(*c as i64);
                    }
                    BadTerm::RefNotFound(i) => {
                        w.tuple_header(2);
                        w.atom("ref_not_found");
                        w.int(*i as i64);
                    }
                }
            }
            Error::BadRequest(m) => tagged(w, "bad_request", m),
            Error::Overloaded => w.atom("overloaded"),
            Error::ContextDown(reason) => {
                w.tuple_header(2);
                w.atom("context_down");
                w.atom(reason);
            }
            Error::FrameTooLarge { size, max } => {
                w.tuple_header(3);
                w.atom("frame_too_large");
                w.int(*size as i64);
                w.int(*max as i64);
            }
            Error::ReplyTooLarge { size, max } => {
                w.tuple_header(3);
                w.atom("reply_too_large");
                w.int(*size as i64);
                w.int(*max as i64);
            }
            Error::Panic(m) => tagged(w, "panic", m),
            Error::NotFound => w.atom("not_found"),
            Error::Timeout => w.atom("timeout"),
            Error::Interrupted => w.atom("interrupted"),
        }
    }
}

/// `{Tag, <<Text>>}`
fn tagged(w: &mut etf::Writer<'_>, tag: &str, text: &str) {
    w.tuple_header(2);
    w.atom(tag);
    w.binary(text.as_bytes());
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
