//! External Term Format: a bounds-checked, zero-copy reader, a writer, and a small
//! `Term` tree used for control requests and tests.
//!
//! The reader never allocates on the word of a length field: every length is checked
//! against the bytes that are actually left before anything is reserved (a list header
//! claiming 2^32 elements fails at once). Python values are decoded straight from the
//! reader by `convert`, without this tree.

use std::fmt;

pub const VERSION: u8 = 131;
pub const SMALL_INTEGER: u8 = 97;
pub const INTEGER: u8 = 98;
pub const FLOAT: u8 = 99;
pub const NEW_FLOAT: u8 = 70;
pub const ATOM: u8 = 100;
pub const SMALL_ATOM: u8 = 115;
pub const ATOM_UTF8: u8 = 118;
pub const SMALL_ATOM_UTF8: u8 = 119;
pub const SMALL_TUPLE: u8 = 104;
pub const LARGE_TUPLE: u8 = 105;
pub const NIL: u8 = 106;
pub const STRING: u8 = 107;
pub const LIST: u8 = 108;
pub const BINARY: u8 = 109;
pub const BIT_BINARY: u8 = 77;
pub const SMALL_BIG: u8 = 110;
pub const LARGE_BIG: u8 = 111;
pub const MAP: u8 = 116;
pub const PID: u8 = 103;
pub const NEW_PID: u8 = 88;
pub const REFERENCE: u8 = 101;
pub const NEW_REFERENCE: u8 = 114;
pub const NEWER_REFERENCE: u8 = 90;
pub const PORT: u8 = 102;
pub const NEW_PORT: u8 = 89;
pub const V4_PORT: u8 = 120;
pub const NEW_FUN: u8 = 112;
pub const EXPORT: u8 = 113;
pub const FUN: u8 = 117;

/// Why a byte string is not a term we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end in the middle of a term.
    Truncated,
    /// No version byte 131 at the start.
    BadVersion(u8),
    /// A tag this decoder does not know (compressed terms, atom cache refs, ...).
    UnknownTag(u8),
    /// An atom that is not valid UTF-8 (for UTF-8 atoms) or too long.
    BadAtom,
    /// Nesting deeper than the limit.
    TooDeep,
    /// Bytes left over after the term.
    Trailing(usize),
    /// A float in the old text format (`FLOAT_EXT`) that does not parse.
    BadFloat,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "truncated term"),
            DecodeError::BadVersion(v) => write!(f, "bad version byte {v}"),
            DecodeError::UnknownTag(t) => write!(f, "unsupported tag {t}"),
            DecodeError::BadAtom => write!(f, "bad atom"),
            DecodeError::TooDeep => write!(f, "nesting too deep"),
            DecodeError::Trailing(n) => write!(f, "{n} trailing bytes after the term"),
            DecodeError::BadFloat => write!(f, "bad float"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub type Result<T> = std::result::Result<T, DecodeError>;

/// Maximum nesting of lists, tuples and maps, in both directions.
pub const MAX_DEPTH: usize = 1000;

/// A cursor over ETF bytes.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over a whole term, after checking the version byte.
    pub fn new(buf: &'a [u8]) -> Result<Self> {
        match buf.first() {
            Some(&VERSION) => Ok(Reader { buf, pos: 1 }),
            Some(&v) => Err(DecodeError::BadVersion(v)),
            None => Err(DecodeError::Truncated),
        }
    }

    /// A reader over a term body without the version byte (a slice of a larger term).
    pub fn body(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Reads a tuple header; returns its arity.
    pub fn tuple_header(&mut self) -> Result<usize> {
        match self.u8()? {
            SMALL_TUPLE => Ok(self.u8()? as usize),
            LARGE_TUPLE => Ok(self.u32()? as usize),
            t => Err(DecodeError::UnknownTag(t)),
        }
    }

    /// Skips one term and returns its bytes.
    pub fn term_slice(&mut self) -> Result<&'a [u8]> {
        let start = self.pos;
        self.skip(0)?;
        Ok(&self.buf[start..self.pos])
    }

    /// The bytes of a binary.
    pub fn binary(&mut self) -> Result<&'a [u8]> {
        match self.u8()? {
            BINARY => {
                let n = self.u32()? as usize;
                self.bytes(n)
            }
            t => Err(DecodeError::UnknownTag(t)),
        }
    }

    /// Text of a binary or an atom.
    pub fn text(&mut self) -> Result<std::borrow::Cow<'a, str>> {
        match self.peek()? {
            BINARY => {
                self.u8()?;
                let n = self.u32()? as usize;
                let b = self.bytes(n)?;
                Ok(std::borrow::Cow::Borrowed(
                    std::str::from_utf8(b).map_err(|_| DecodeError::BadAtom)?,
                ))
            }
            _ => self.atom(),
        }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Moves back (or forward) to a position previously returned by `pos`.
    pub fn seek(&mut self, pos: usize) {
        assert!(pos <= self.buf.len());
        self.pos = pos;
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The raw bytes between two positions, e.g. to keep a term verbatim.
    pub fn slice(&self, from: usize, to: usize) -> &'a [u8] {
        &self.buf[from..to]
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    pub fn peek(&self) -> Result<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn skip_bytes(&mut self, n: usize) -> Result<()> {
        self.bytes(n).map(|_| ())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_be_bytes(self.array()?))
    }

    /// Reads a count of elements that each take at least `min_size` bytes, refusing
    /// counts the remaining input cannot hold.
    pub fn count(&mut self, n: usize, min_size: usize) -> Result<usize> {
        if n.saturating_mul(min_size) > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    /// Reads an atom of any of the four encodings; returns its text as UTF-8.
    /// Latin-1 atoms (still emitted by OTP 25) are transcoded.
    pub fn atom(&mut self) -> Result<std::borrow::Cow<'a, str>> {
        let tag = self.u8()?;
        self.atom_body(tag)
    }

    pub fn atom_body(&mut self, tag: u8) -> Result<std::borrow::Cow<'a, str>> {
        let (len, utf8) = match tag {
            SMALL_ATOM_UTF8 => (self.u8()? as usize, true),
            ATOM_UTF8 => (self.u16()? as usize, true),
            SMALL_ATOM => (self.u8()? as usize, false),
            ATOM => (self.u16()? as usize, false),
            t => return Err(DecodeError::UnknownTag(t)),
        };
        let raw = self.bytes(len)?;
        if utf8 {
            let s = std::str::from_utf8(raw).map_err(|_| DecodeError::BadAtom)?;
            if s.chars().count() > 255 {
                return Err(DecodeError::BadAtom);
            }
            Ok(std::borrow::Cow::Borrowed(s))
        } else if raw.is_ascii() {
            // SAFETY-free fast path: ASCII is UTF-8.
            Ok(std::borrow::Cow::Borrowed(
                std::str::from_utf8(raw).map_err(|_| DecodeError::BadAtom)?,
            ))
        } else {
            Ok(std::borrow::Cow::Owned(
                raw.iter().map(|&b| b as char).collect(),
            ))
        }
    }

    /// If the next term is an atom, returns its text without consuming it.
    pub fn peek_atom(&self) -> Option<std::borrow::Cow<'a, str>> {
        let mut r = self.clone();
        match r.peek().ok()? {
            SMALL_ATOM_UTF8 | ATOM_UTF8 | SMALL_ATOM | ATOM => r.atom().ok(),
            _ => None,
        }
    }

    /// Skips one whole term, returning nothing; used to keep opaque terms verbatim.
    /// Skips one element of a container: numbers inline, the rest through `skip`.
    #[inline]
    fn skip_elem(&mut self, depth: usize) -> Result<()> {
        let step = match self.buf.get(self.pos) {
            Some(&SMALL_INTEGER) => 2,
            Some(&INTEGER) => 5,
            Some(&NEW_FLOAT) => 9,
            _ => return self.skip(depth),
        };
        if step > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        self.pos += step;
        Ok(())
    }

    pub fn skip(&mut self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let tag = self.u8()?;
        match tag {
            SMALL_INTEGER => self.skip_bytes(1)?,
            INTEGER => self.skip_bytes(4)?,
            NEW_FLOAT => self.skip_bytes(8)?,
            FLOAT => self.skip_bytes(31)?,
            SMALL_ATOM_UTF8 | ATOM_UTF8 | SMALL_ATOM | ATOM => drop(self.atom_body(tag)?),
            SMALL_TUPLE | LARGE_TUPLE => {
                let n = if tag == SMALL_TUPLE {
                    self.u8()? as usize
                } else {
                    self.u32()? as usize
                };
                for _ in 0..self.count(n, 1)? {
                    self.skip_elem(depth + 1)?;
                }
            }
            NIL => {}
            STRING => {
                let n = self.u16()? as usize;
                self.skip_bytes(n)?
            }
            LIST => {
                let n = self.u32()? as usize;
                for _ in 0..self.count(n, 1)? {
                    self.skip_elem(depth + 1)?;
                }
                self.skip_elem(depth + 1)?;
            }
            BINARY => {
                let n = self.u32()? as usize;
                self.skip_bytes(n)?
            }
            BIT_BINARY => {
                let n = self.u32()? as usize;
                self.skip_bytes(n + 1)?
            }
            SMALL_BIG => {
                let n = self.u8()? as usize;
                self.skip_bytes(n + 1)?
            }
            LARGE_BIG => {
                let n = self.u32()? as usize;
                self.skip_bytes(n + 1)?
            }
            MAP => {
                let n = self.u32()? as usize;
                for _ in 0..self.count(n, 2)? {
                    self.skip_elem(depth + 1)?;
                    self.skip_elem(depth + 1)?;
                }
            }
            PID | NEW_PID => {
                self.atom()?;
                self.skip_bytes(if tag == NEW_PID { 12 } else { 9 })?
            }
            PORT | NEW_PORT | V4_PORT => {
                self.atom()?;
                self.skip_bytes(match tag {
                    PORT => 5,
                    NEW_PORT => 8,
                    _ => 12,
                })?
            }
            REFERENCE => {
                self.atom()?;
                self.skip_bytes(5)?
            }
            NEW_REFERENCE | NEWER_REFERENCE => {
                let n = self.u16()? as usize;
                self.atom()?;
                let creation = if tag == NEWER_REFERENCE { 4 } else { 1 };
                self.skip_bytes(creation + 4 * n)?
            }
            NEW_FUN => {
                // The size field counts itself.
                let size = self.u32()? as usize;
                self.skip_bytes(size.checked_sub(4).ok_or(DecodeError::Truncated)?)?
            }
            EXPORT => {
                self.skip_elem(depth + 1)?;
                self.skip_elem(depth + 1)?;
                self.skip_elem(depth + 1)?;
            }
            t => return Err(DecodeError::UnknownTag(t)),
        }
        Ok(())
    }
}

/// Writes ETF into a byte vector. Lists are always written as `LIST_EXT` (never
/// `STRING_EXT`), so small integers stay integers whatever their sign or count.
pub struct Writer<'a> {
    pub out: &'a mut Vec<u8>,
    /// Set when an atom past the `max_atoms` budget was written (see `atoms`).
    pub needs_safe_decode: bool,
}

impl<'a> Writer<'a> {
    /// Starts a new term (writes the version byte).
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(VERSION);
        Writer {
            out,
            needs_safe_decode: false,
        }
    }

    /// Continues a term already started in `out`.
    pub fn continuing(out: &'a mut Vec<u8>) -> Self {
        Writer {
            out,
            needs_safe_decode: false,
        }
    }

    /// Erlang's `true` or `false`.
    pub fn boolean(&mut self, b: bool) {
        self.atom(if b { "true" } else { "false" });
    }

    pub fn atom(&mut self, name: &str) {
        let b = name.as_bytes();
        if b.len() < 256 {
            self.out.push(SMALL_ATOM_UTF8);
            self.out.push(b.len() as u8);
        } else {
            self.out.push(ATOM_UTF8);
            self.out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        }
        self.out.extend_from_slice(b);
    }

    pub fn int(&mut self, v: i64) {
        if (0..=255).contains(&v) {
            self.out.push(SMALL_INTEGER);
            self.out.push(v as u8);
        } else if let Ok(v32) = i32::try_from(v) {
            self.out.push(INTEGER);
            self.out.extend_from_slice(&v32.to_be_bytes());
        } else {
            let mag = v.unsigned_abs().to_le_bytes();
            let len = 8 - mag.iter().rev().take_while(|&&b| b == 0).count();
            self.big(v < 0, &mag[..len]);
        }
    }

    /// A bignum from its sign and little-endian magnitude.
    pub fn big(&mut self, negative: bool, magnitude_le: &[u8]) {
        if magnitude_le.len() < 256 {
            self.out.push(SMALL_BIG);
            self.out.push(magnitude_le.len() as u8);
        } else {
            self.out.push(LARGE_BIG);
            self.out
                .extend_from_slice(&(magnitude_le.len() as u32).to_be_bytes());
        }
        self.out.push(negative as u8);
        self.out.extend_from_slice(magnitude_le);
    }

    /// A finite float; callers map NaN and infinities to atoms first.
    pub fn float(&mut self, v: f64) {
        self.out.push(NEW_FLOAT);
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn binary(&mut self, b: &[u8]) {
        self.out.push(BINARY);
        self.out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.out.extend_from_slice(b);
    }

    pub fn tuple_header(&mut self, arity: usize) {
        if arity < 256 {
            self.out.push(SMALL_TUPLE);
            self.out.push(arity as u8);
        } else {
            self.out.push(LARGE_TUPLE);
            self.out.extend_from_slice(&(arity as u32).to_be_bytes());
        }
    }

    /// A list header; after `n > 0` elements, call `nil()` for the tail.
    pub fn list_header(&mut self, n: usize) {
        self.out.push(LIST);
        self.out.extend_from_slice(&(n as u32).to_be_bytes());
    }

    pub fn nil(&mut self) {
        self.out.push(NIL);
    }

    pub fn map_header(&mut self, n: usize) {
        self.out.push(MAP);
        self.out.extend_from_slice(&(n as u32).to_be_bytes());
    }

    /// Bytes of a complete term body (without version byte), written verbatim.
    pub fn raw(&mut self, body: &[u8]) {
        self.out.extend_from_slice(body);
    }
}

/// A decoded term, for control requests and tests. Terms this tree has no variant
/// for (pids, refs, funs, ...) are kept verbatim in `Other`.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Int(i64),
    Float(f64),
    Atom(String),
    Binary(Vec<u8>),
    List(Vec<Term>),
    Tuple(Vec<Term>),
    Map(Vec<(Term, Term)>),
    /// Any other term, as its encoded body (without the version byte).
    Other(Vec<u8>),
}

impl Term {
    pub fn atom(s: &str) -> Term {
        Term::Atom(s.to_string())
    }

    /// Erlang's `true` or `false`.
    pub fn boolean(b: bool) -> Term {
        Term::atom(if b { "true" } else { "false" })
    }

    /// Decodes a whole term (version byte, one term, no trailing bytes).
    pub fn decode(buf: &[u8]) -> Result<Term> {
        let mut r = Reader::new(buf)?;
        let t = Term::read(&mut r, 0)?;
        r.finish()?;
        Ok(t)
    }

    pub fn read(r: &mut Reader<'_>, depth: usize) -> Result<Term> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        let start = r.pos();
        let tag = r.peek()?;
        Ok(match tag {
            SMALL_INTEGER => {
                r.u8()?;
                Term::Int(r.u8()? as i64)
            }
            INTEGER => {
                r.u8()?;
                Term::Int(r.i32()? as i64)
            }
            NEW_FLOAT => {
                r.u8()?;
                Term::Float(r.f64()?)
            }
            SMALL_ATOM_UTF8 | ATOM_UTF8 | SMALL_ATOM | ATOM => Term::Atom(r.atom()?.into_owned()),
            SMALL_TUPLE | LARGE_TUPLE => {
                r.u8()?;
                let n = if tag == SMALL_TUPLE {
                    r.u8()? as usize
                } else {
                    r.u32()? as usize
                };
                let n = r.count(n, 1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(Term::read(r, depth + 1)?);
                }
                Term::Tuple(v)
            }
            NIL => {
                r.u8()?;
                Term::List(Vec::new())
            }
            STRING => {
                r.u8()?;
                let n = r.u16()? as usize;
                Term::List(r.bytes(n)?.iter().map(|&b| Term::Int(b as i64)).collect())
            }
            LIST => {
                r.u8()?;
                let n = r.u32()? as usize;
                let n = r.count(n, 1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(Term::read(r, depth + 1)?);
                }
                if r.peek()? == NIL {
                    r.u8()?;
                    Term::List(v)
                } else {
                    r.skip(depth + 1)?;
                    Term::Other(r.slice(start, r.pos()).to_vec())
                }
            }
            BINARY => {
                r.u8()?;
                let n = r.u32()? as usize;
                Term::Binary(r.bytes(n)?.to_vec())
            }
            SMALL_BIG => {
                r.skip(depth)?;
                let raw = r.slice(start, r.pos());
                match small_big_to_i64(raw) {
                    Some(i) => Term::Int(i),
                    None => Term::Other(raw.to_vec()),
                }
            }
            MAP => {
                r.u8()?;
                let n = r.u32()? as usize;
                let n = r.count(n, 2)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = Term::read(r, depth + 1)?;
                    v.push((k, Term::read(r, depth + 1)?));
                }
                Term::Map(v)
            }
            _ => {
                r.skip(depth)?;
                Term::Other(r.slice(start, r.pos()).to_vec())
            }
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut Writer::new(&mut out));
        out
    }

    pub fn write(&self, w: &mut Writer<'_>) {
        match self {
            Term::Int(i) => w.int(*i),
            Term::Float(f) => w.float(*f),
            Term::Atom(a) => w.atom(a),
            Term::Binary(b) => w.binary(b),
            Term::List(items) => {
                if !items.is_empty() {
                    w.list_header(items.len());
                    for t in items {
                        t.write(w);
                    }
                }
                w.nil();
            }
            Term::Tuple(items) => {
                w.tuple_header(items.len());
                for t in items {
                    t.write(w);
                }
            }
            Term::Map(pairs) => {
                w.map_header(pairs.len());
                for (k, v) in pairs {
                    k.write(w);
                    v.write(w);
                }
            }
            Term::Other(raw) => w.raw(raw),
        }
    }

    /// Looks a key up in a map term by atom name.
    pub fn map_get(&self, key: &str) -> Option<&Term> {
        match self {
            Term::Map(pairs) => pairs.iter().find_map(|(k, v)| match k {
                Term::Atom(a) if a == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    pub fn as_atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }

    /// Text of a binary, atom or byte-valued list (charlist).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Term::Binary(b) => String::from_utf8(b.clone()).ok(),
            Term::Atom(a) => Some(a.clone()),
            Term::List(items) => {
                let mut s = String::new();
                for t in items {
                    match t {
                        Term::Int(c) => s.push(char::from_u32(u32::try_from(*c).ok()?)?),
                        _ => return None,
                    }
                }
                Some(s)
            }
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Term::Int(i) => u64::try_from(*i).ok(),
            Term::Other(raw) => match small_big_magnitude(raw)? {
                (false, m) => Some(m),
                (true, _) => None,
            },
            _ => None,
        }
    }
}

/// Sign and magnitude of a `SMALL_BIG_EXT` body of at most 8 bytes.
fn small_big_magnitude(raw: &[u8]) -> Option<(bool, u64)> {
    match raw {
        [SMALL_BIG, n, sign, digits @ ..] if *n as usize == digits.len() && digits.len() <= 8 => {
            let mut b = [0u8; 8];
            b[..digits.len()].copy_from_slice(digits);
            Some((*sign != 0, u64::from_le_bytes(b)))
        }
        _ => None,
    }
}

fn small_big_to_i64(raw: &[u8]) -> Option<i64> {
    let (negative, m) = small_big_magnitude(raw)?;
    let v = if negative { -(m as i128) } else { m as i128 };
    i64::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn negative_small_ints_in_lists_stay_ints() {
        // eetf encoded [-1, 2] as the byte string [255, 2].
        let t = Term::List(vec![Term::Int(-1), Term::Int(2)]);
        let bytes = t.encode();
        assert_eq!(bytes[1], LIST);
        assert_eq!(Term::decode(&bytes).unwrap(), t);
    }

    #[test]
    fn long_byte_lists_keep_their_length() {
        // eetf truncated the length of byte lists over 65535 elements.
        let t = Term::List((0..70_000).map(|i| Term::Int(i % 256)).collect());
        assert_eq!(Term::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn latin1_atoms_decode() {
        // 'café' as OTP 25 emits it: ATOM_EXT with Latin-1 bytes.
        let bytes = [VERSION, ATOM, 0, 4, b'c', b'a', b'f', 0xe9];
        assert_eq!(Term::decode(&bytes).unwrap(), Term::atom("café"));
        let small = [VERSION, SMALL_ATOM, 4, b'c', b'a', b'f', 0xe9];
        assert_eq!(Term::decode(&small).unwrap(), Term::atom("café"));
    }

    #[test]
    fn huge_list_header_fails_without_allocating() {
        let bytes = [VERSION, LIST, 255, 255, 255, 255];
        assert_eq!(Term::decode(&bytes), Err(DecodeError::Truncated));
        let map = [VERSION, MAP, 255, 255, 255, 255];
        assert_eq!(Term::decode(&map), Err(DecodeError::Truncated));
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = Term::Int(1).encode();
        bytes.push(0);
        assert_eq!(Term::decode(&bytes), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut bytes = vec![VERSION];
        for _ in 0..(MAX_DEPTH + 5) {
            bytes.extend_from_slice(&[LIST, 0, 0, 0, 1]);
        }
        bytes.extend(std::iter::repeat_n(NIL, MAX_DEPTH + 6));
        assert_eq!(Term::decode(&bytes), Err(DecodeError::TooDeep));
    }

    #[test]
    fn improper_lists_are_kept_verbatim() {
        // [1 | 2]
        let bytes = [
            VERSION,
            LIST,
            0,
            0,
            0,
            1,
            SMALL_INTEGER,
            1,
            SMALL_INTEGER,
            2,
        ];
        let t = Term::decode(&bytes).unwrap();
        assert_eq!(t, Term::Other(bytes[1..].to_vec()));
        assert_eq!(t.encode(), bytes);
    }

    #[test]
    fn big_ints_and_u64() {
        let t = Term::Int(i64::MIN);
        let bytes = t.encode();
        assert_eq!(bytes[1], SMALL_BIG);
        let big = [
            VERSION, SMALL_BIG, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255,
        ];
        assert_eq!(Term::decode(&big).unwrap().as_u64(), Some(u64::MAX));
    }

    #[test]
    fn truncation_at_every_point_is_an_error_not_a_panic() {
        let t = Term::Tuple(vec![
            Term::atom("call"),
            Term::Binary(b"mod".to_vec()),
            Term::List(vec![Term::Int(1), Term::Float(2.5)]),
            Term::Map(vec![(Term::atom("k"), Term::Int(-70000))]),
        ]);
        let bytes = t.encode();
        for cut in 0..bytes.len() {
            assert!(Term::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    fn arb_term() -> impl Strategy<Value = Term> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Term::Int),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Term::Float),
            "[a-zA-Z_é😀]{0,20}".prop_map(Term::Atom),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Term::Binary),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Term::List),
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Term::Tuple),
                proptest::collection::vec((inner.clone(), inner), 0..5).prop_map(Term::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn round_trip(t in arb_term()) {
            prop_assert_eq!(Term::decode(&t.encode()).unwrap(), t);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut input = vec![VERSION];
            input.extend(bytes);
            let _ = Term::decode(&input);
        }
    }
}
