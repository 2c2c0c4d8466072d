//! Erlang terms <-> Python objects, decoded straight from ETF bytes into Python objects
//! and encoded straight from Python objects into ETF bytes (no intermediate tree).
//!
//! The mapping is the table in docs/api.md, "Type mapping". Everything here runs on the
//! thread that owns the interpreter; the per-interpreter type objects live in [`Types`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PyMemoryView, PySet,
    PyString, PyTuple,
};

use crate::error::{BadTerm, Error};
use crate::etf::{self, Reader, Writer, MAX_DEPTH};

mod hooks;
use hooks::Hooks;
pub use hooks::{arrays_binary, set_arrays_binary};

/// The `erlang` module's types, as objects of one interpreter, plus a cache of atoms.
pub struct Types {
    pub atom: Py<PyAny>,
    pub pid: Py<PyAny>,
    pub reference: Py<PyAny>,
    pub opaque: Py<PyAny>,
    pub term: Py<PyAny>,
    /// The conversions past the built-in mapping (`erlang_codec.py`, see [`hooks`]).
    hooks: Hooks,
    atoms: RefCell<HashMap<Box<str>, Py<PyAny>>>,
    /// The context these types serve (0 outside a context), for object handles.
    pub ctx: u64,
    /// Objects kept for Erlang (`return => ref`), by handle id: one table per context,
    /// shared with its [`Link`](crate::erlang_module::Link), so any thread of the
    /// interpreter finds them (a callback's result or a channel item may name one).
    pub refs: Arc<Handles>,
    /// The last id given to an env or an object handle.
    next_id: std::cell::Cell<u64>,
}

/// The objects a context keeps for Erlang, by handle id. Every use is attached to the
/// context's interpreter; the lock is for that interpreter's other threads.
#[derive(Default)]
pub struct Handles(Mutex<HashMap<u64, Py<PyAny>>>);

impl Handles {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Py<PyAny>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, id: u64, obj: Py<PyAny>) {
        self.lock().insert(id, obj);
    }

    /// Takes the object out (the caller drops it attached).
    pub fn remove(&self, id: u64) -> Option<Py<PyAny>> {
        self.lock().remove(&id)
    }

    pub fn get<'py>(&self, py: Python<'py>, id: u64) -> Option<Bound<'py, PyAny>> {
        self.lock().get(&id).map(|o| o.bind(py).clone())
    }

    /// Takes every object out (the caller drops them attached).
    pub fn take_all(&self) -> HashMap<u64, Py<PyAny>> {
        std::mem::take(&mut *self.lock())
    }
}

const ATOM_CACHE_MAX: usize = 4096;

/// The atom Python's `None` becomes (runtime option `none`): `none` unless set once at
/// start-up (`nil` for Elixir users). `none`, `nil` and `undefined` all decode to `None`.
static NONE_ATOM: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Sets the atom for `None`; only `none`, `nil` and `undefined` are accepted.
pub fn set_none_atom(name: &str) -> Result<(), String> {
    let atom = match name {
        "none" => "none",
        "nil" => "nil",
        "undefined" => "undefined",
        other => {
            return Err(format!(
                "--none-as takes none, nil or undefined, not {other}"
            ))
        }
    };
    NONE_ATOM
        .set(atom)
        .map_err(|_| "--none-as given twice".to_string())
}

fn none_atom() -> &'static str {
    NONE_ATOM.get().copied().unwrap_or("none")
}

impl Types {
    /// Reads the types from an imported `erlang` module.
    pub fn from_module(module: &Bound<'_, PyModule>) -> PyResult<Self> {
        let get = |name: &str| module.getattr(name).map(Bound::unbind);
        Ok(Types {
            atom: get("Atom")?,
            pid: get("Pid")?,
            reference: get("Ref")?,
            opaque: get("Opaque")?,
            term: get("_Term")?,
            hooks: Hooks::from_module(module)?,
            atoms: RefCell::new(HashMap::new()),
            ctx: 0,
            refs: Arc::default(),
            next_id: std::cell::Cell::new(0),
        })
    }

    /// These types for context `ctx`, whose env and handle ids start at `id_base`.
    pub fn for_context(self, ctx: u64, id_base: u64) -> Self {
        Types {
            ctx,
            next_id: std::cell::Cell::new(id_base),
            ..self
        }
    }

    /// These types for the context of `ctx` and `refs` (its handle table).
    pub fn with_handles(self, ctx: u64, refs: Arc<Handles>) -> Self {
        Types { ctx, refs, ..self }
    }

    /// A fresh id for an env or an object handle.
    pub fn new_id(&self) -> u64 {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        id
    }

    /// Drops every cached object; must run while attached to this interpreter.
    pub fn clear(&self) {
        self.atoms.borrow_mut().clear();
        drop(self.refs.take_all());
    }

    /// The object behind `{pyport_ref, Key, Ctx, Id, Home}`.
    fn resolve_ref<'py>(
        &self,
        py: Python<'py>,
        ctx: u64,
        id: u64,
    ) -> Result<Bound<'py, PyAny>, Error> {
        if ctx != self.ctx {
            return Err(BadTerm::RefWrongContext(ctx).into());
        }
        self.refs
            .get(py, id)
            .ok_or_else(|| BadTerm::RefNotFound(id).into())
    }

    fn atom<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        if let Some(a) = self.atoms.borrow().get(name) {
            return Ok(a.bind(py).clone());
        }
        let a = self.atom.bind(py).call1((name,))?;
        let mut cache = self.atoms.borrow_mut();
        if cache.len() < ATOM_CACHE_MAX {
            cache.insert(name.into(), a.clone().unbind());
        }
        Ok(a)
    }
}

/// Decodes a whole term (version byte included, nothing after it).
pub fn decode<'py>(
    py: Python<'py>,
    types: &Types,
    bytes: &[u8],
) -> Result<Bound<'py, PyAny>, Error> {
    let mut r = Reader::new(bytes)?;
    let v = decode_term(py, types, &mut r, 0)?;
    r.finish()?;
    Ok(v)
}

/// Decodes a term body (no version byte) that must be consumed whole.
pub fn decode_body<'py>(
    py: Python<'py>,
    types: &Types,
    bytes: &[u8],
) -> Result<Bound<'py, PyAny>, Error> {
    let mut r = Reader::body(bytes);
    let v = decode_term(py, types, &mut r, 0)?;
    r.finish()?;
    Ok(v)
}

/// Decodes a proper list body straight into a tuple (call arguments).
pub fn decode_args<'py>(
    py: Python<'py>,
    types: &Types,
    bytes: &[u8],
) -> Result<Bound<'py, PyTuple>, Error> {
    let mut r = Reader::body(bytes);
    let tuple = match r.u8()? {
        etf::NIL => new_tuple(py, 0)?,
        etf::STRING => {
            let n = r.u16()? as usize;
            PyTuple::new(py, r.bytes(n)?.iter().copied())?
        }
        etf::LIST => {
            let n = r.u32()? as usize;
            let n = r.count(n, 1)?;
            let tuple = decode_tuple_items(py, types, &mut r, n, 1)?;
            if r.u8()? != etf::NIL {
                return Err(Error::BadRequest("args must be a proper list".into()));
            }
            tuple
        }
        _ => return Err(Error::BadRequest("args must be a list".into())),
    };
    r.finish()?;
    Ok(tuple)
}

/// Decodes the next term of `r`.
pub fn decode_term<'py>(
    py: Python<'py>,
    types: &Types,
    r: &mut Reader<'_>,
    depth: usize,
) -> Result<Bound<'py, PyAny>, Error> {
    if depth > MAX_DEPTH {
        return Err(BadTerm::TooDeep.into());
    }
    let start = r.pos();
    let tag = r.u8()?;
    Ok(match tag {
        etf::SMALL_INTEGER => r.u8()?.into_pyobject(py).map_err(PyErr::from)?.into_any(),
        etf::INTEGER => r.i32()?.into_pyobject(py).map_err(PyErr::from)?.into_any(),
        etf::SMALL_BIG | etf::LARGE_BIG => {
            let n = if tag == etf::SMALL_BIG {
                r.u8()? as usize
            } else {
                r.u32()? as usize
            };
            let negative = r.u8()? != 0;
            big_int(py, negative, r.bytes(n)?)?
        }
        etf::NEW_FLOAT => PyFloat::new(py, r.f64()?).into_any(),
        etf::FLOAT => {
            let raw = r.bytes(31)?;
            let text = std::str::from_utf8(raw).map_err(|_| etf::DecodeError::BadFloat)?;
            let v: f64 = text
                .trim_end_matches('\0')
                .trim()
                .parse()
                .map_err(|_| etf::DecodeError::BadFloat)?;
            PyFloat::new(py, v).into_any()
        }
        etf::SMALL_ATOM_UTF8 | etf::ATOM_UTF8 | etf::SMALL_ATOM | etf::ATOM => {
            let name = r.atom_body(tag)?;
            atom_to_py(py, types, &name)?
        }
        etf::BINARY => {
            let n = r.u32()? as usize;
            binary_to_py(py, r.bytes(n)?)
        }
        etf::NIL => PyList::empty(py).into_any(),
        etf::STRING => {
            let n = r.u16()? as usize;
            PyList::new(py, r.bytes(n)?.iter().copied())?.into_any()
        }
        etf::LIST => {
            let n = r.u32()? as usize;
            let n = r.count(n, 1)?;
            let list = new_list(py, n)?;
            for i in 0..n {
                let item = decode_term(py, types, r, depth + 1)?;
                // SAFETY: `list` is a fresh list of length n and slot i is empty; SET_ITEM
                // steals the reference. A list with empty slots left by an error is
                // still safe to free.
                unsafe {
                    ffi::PyList_SET_ITEM(list.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr())
                };
            }
            if r.peek()? == etf::NIL {
                r.u8()?;
                list.into_any()
            } else {
                // An improper list: keep the whole term verbatim.
                r.skip(depth + 1)?;
                raw_term(py, &types.opaque, r.slice(start, r.pos()))?
            }
        }
        etf::SMALL_TUPLE | etf::LARGE_TUPLE => {
            let n = if tag == etf::SMALL_TUPLE {
                r.u8()? as usize
            } else {
                r.u32()? as usize
            };
            let n = r.count(n, 1)?;
            let tag = if n > 0 { r.peek_atom() } else { None };
            match tag.as_deref() {
                // `{pyport_ref, Key, Ctx, Id, Home}` (Key and Home are the Erlang side's)
                Some("pyport_ref") if n == 4 || n == 5 => {
                    let mut probe = r.clone();
                    probe.atom()?;
                    probe.skip(depth + 1)?;
                    let ctx = etf::Term::read(&mut probe, depth + 1)?.as_u64();
                    let id = etf::Term::read(&mut probe, depth + 1)?.as_u64();
                    if n == 5 {
                        probe.skip(depth + 1)?;
                    }
                    if let (Some(ctx), Some(id)) = (ctx, id) {
                        *r = probe;
                        return types.resolve_ref(py, ctx, id);
                    }
                }
                Some("bytes") if n == 2 => {
                    let mut probe = r.clone();
                    probe.atom()?;
                    if probe.peek()? == etf::BINARY {
                        probe.u8()?;
                        let len = probe.u32()? as usize;
                        let bytes = PyBytes::new(py, probe.bytes(len)?).into_any();
                        *r = probe;
                        return Ok(bytes);
                    }
                }
                Some(tag) => {
                    if let Some(v) = hooks::decode_tagged(py, types, r, tag, n, depth + 1)? {
                        return Ok(v);
                    }
                }
                None => {}
            }
            let tuple = decode_tuple_items(py, types, r, n, depth + 1)?;
            tuple.into_any()
        }
        etf::MAP => {
            let n = r.u32()? as usize;
            let n = r.count(n, 2)?;
            let dict = PyDict::new(py);
            for _ in 0..n {
                let key_start = r.pos();
                let key = decode_term(py, types, r, depth + 1)?;
                let key_end = r.pos();
                let value = decode_term(py, types, r, depth + 1)?;
                match dict.set_item(&key, &value) {
                    Ok(()) => {}
                    Err(e) if e.is_instance_of::<PyTypeError>(py) => {
                        // Unhashable in Python (a list or map key): keep the key verbatim,
                        // hashable and exact on the way back.
                        let key = raw_term(py, &types.opaque, r.slice(key_start, key_end))?;
                        dict.set_item(key, value)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            dict.into_any()
        }
        etf::PID | etf::NEW_PID => {
            r.atom()?;
            r.bytes(if tag == etf::NEW_PID { 12 } else { 9 })?;
            raw_term(py, &types.pid, r.slice(start, r.pos()))?
        }
        etf::REFERENCE | etf::NEW_REFERENCE | etf::NEWER_REFERENCE => {
            r.seek(start);
            r.skip(depth)?;
            raw_term(py, &types.reference, r.slice(start, r.pos()))?
        }
        _ => {
            // Ports, funs, bitstrings: verbatim. Unknown tags fail inside `skip`.
            r.seek(start);
            r.skip(depth)?;
            raw_term(py, &types.opaque, r.slice(start, r.pos()))?
        }
    })
}

/// A tuple of the next `n` terms of `r` (at nesting `depth`).
fn decode_tuple_items<'py>(
    py: Python<'py>,
    types: &Types,
    r: &mut Reader<'_>,
    n: usize,
    depth: usize,
) -> Result<Bound<'py, PyTuple>, Error> {
    let tuple = new_tuple(py, n)?;
    for i in 0..n {
        let item = decode_term(py, types, r, depth)?;
        // SAFETY: `tuple` is fresh, of length n, and slot i is empty; SET_ITEM steals the
        // reference. A tuple with empty slots left by an error is safe to free.
        unsafe { ffi::PyTuple_SET_ITEM(tuple.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr()) };
    }
    Ok(tuple)
}

fn new_list(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyList>> {
    // SAFETY: PyList_New returns a new reference or NULL with an exception set.
    let ptr = unsafe { ffi::PyList_New(n as ffi::Py_ssize_t) };
    // SAFETY: as above; `from_owned_ptr_or_err` takes the new reference.
    Ok(unsafe { Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked() })
}

fn new_tuple(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyTuple>> {
    // SAFETY: PyTuple_New returns a new reference or NULL with an exception set.
    let ptr = unsafe { ffi::PyTuple_New(n as ffi::Py_ssize_t) };
    // SAFETY: as above.
    Ok(unsafe { Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked() })
}

fn atom_to_py<'py>(py: Python<'py>, types: &Types, name: &str) -> PyResult<Bound<'py, PyAny>> {
    Ok(match name {
        "true" => PyBool::new(py, true).to_owned().into_any(),
        "false" => PyBool::new(py, false).to_owned().into_any(),
        "none" | "nil" | "undefined" => py.None().into_bound(py),
        _ => types.atom(py, name)?,
    })
}

/// A binary is a `str` when it is valid UTF-8, else `bytes`.
fn binary_to_py<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyAny> {
    match std::str::from_utf8(b) {
        Ok(s) => PyString::new(py, s).into_any(),
        Err(_) => PyBytes::new(py, b).into_any(),
    }
}

fn raw_term<'py>(py: Python<'py>, class: &Py<PyAny>, body: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    class.bind(py).call1((PyBytes::new(py, body),))
}

fn big_int<'py>(
    py: Python<'py>,
    negative: bool,
    magnitude_le: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    if magnitude_le.len() <= 16 {
        let mut b = [0u8; 16];
        b[..magnitude_le.len()].copy_from_slice(magnitude_le);
        let m = u128::from_le_bytes(b);
        if !negative {
            return Ok(m.into_pyobject(py)?.into_any());
        }
        if let Ok(v) = i128::try_from(m) {
            return Ok((-v).into_pyobject(py)?.into_any());
        }
    }
    let int_type = py.get_type::<PyInt>();
    let v = int_type.call_method1("from_bytes", (PyBytes::new(py, magnitude_le), "little"))?;
    if negative {
        v.neg()
    } else {
        Ok(v)
    }
}

/// Encodes `obj` as a whole term (with the version byte) into `out`.
pub fn encode(types: &Types, obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), Error> {
    let mut w = Writer::new(out);
    encode_term(types, obj, &mut w, 0)
}

pub fn encode_term(
    types: &Types,
    obj: &Bound<'_, PyAny>,
    w: &mut Writer<'_>,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(BadTerm::TooDeep.into());
    }
    let py = obj.py();
    if obj.is_none() {
        w.atom(none_atom());
    } else if let Ok(b) = obj.cast_exact::<PyBool>() {
        w.boolean(b.is_true());
    } else if let Ok(s) = obj.cast_exact::<PyString>() {
        w.binary(s.to_str()?.as_bytes());
    } else if obj.is_exact_instance_of::<PyInt>()
        || (obj.is_instance_of::<PyInt>() && !obj.is_instance_of::<PyBool>())
    {
        encode_int(obj, w)?;
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        if v.is_nan() {
            w.atom("nan");
        } else if v.is_infinite() {
            w.atom(if v > 0.0 { "infinity" } else { "neg_infinity" });
        } else {
            w.float(v);
        }
    } else if let Ok(list) = obj.cast::<PyList>() {
        let n = list.len();
        if n > 0 {
            w.list_header(n);
            for item in list.iter() {
                encode_term(types, &item, w, depth + 1)?;
            }
        }
        w.nil();
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        w.tuple_header(t.len());
        for item in t.iter() {
            encode_term(types, &item, w, depth + 1)?;
        }
    } else if let Ok(d) = obj.cast::<PyDict>() {
        w.map_header(d.len());
        for (k, v) in d.iter() {
            encode_term(types, &k, w, depth + 1)?;
            encode_term(types, &v, w, depth + 1)?;
        }
    } else if let Ok(s) = obj.cast::<PyString>() {
        if obj.is_instance(types.atom.bind(py))? {
            let name = s.to_str()?;
            if name.chars().count() > 255 {
                return Err(BadTerm::Unsupported("Atom longer than 255 characters".into()).into());
            }
            if !crate::atoms::admit(name) {
                w.needs_safe_decode = true;
            }
            w.atom(name);
        } else {
            w.binary(s.to_str()?.as_bytes());
        }
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        w.binary(b.as_bytes());
    } else if let Ok(b) = obj.cast::<PyByteArray>() {
        w.binary(&b.to_vec());
    } else if obj.is_instance_of::<PyMemoryView>() {
        hooks::encode_buffer(obj, w)?;
    } else if obj.is_instance(types.term.bind(py))? {
        let raw = obj.getattr("_etf")?;
        w.raw(raw.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
    } else if obj.is_instance_of::<PySet>() || obj.is_instance_of::<PyFrozenSet>() {
        let items: Vec<Bound<'_, PyAny>> = obj.try_iter()?.collect::<PyResult<_>>()?;
        if !items.is_empty() {
            w.list_header(items.len());
            for item in &items {
                encode_term(types, item, w, depth + 1)?;
            }
        }
        w.nil();
    } else {
        hooks::encode_other(types, obj, w, depth)?;
    }
    Ok(())
}

fn encode_int(obj: &Bound<'_, PyAny>, w: &mut Writer<'_>) -> Result<(), Error> {
    if let Ok(v) = obj.extract::<i64>() {
        w.int(v);
        return Ok(());
    }
    let negative = obj.lt(0)?;
    let magnitude = obj.abs()?;
    let bits: usize = magnitude.call_method0("bit_length")?.extract()?;
    let nbytes = bits.div_ceil(8);
    let bytes = magnitude.call_method1("to_bytes", (nbytes, "little"))?;
    w.big(
        negative,
        bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes(),
    );
    Ok(())
}

/// `module.QualName` of an object's type, or just the name for builtins.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    qualified_name(&obj.get_type().into_any())
}

pub fn qualified_name(ty: &Bound<'_, PyAny>) -> String {
    let name = ty
        .getattr("__qualname__")
        .and_then(|n| n.extract::<String>())
        .unwrap_or_else(|_| "?".to_string());
    match ty.getattr("__module__").and_then(|m| m.extract::<String>()) {
        Ok(m) if m != "builtins" => format!("{m}.{name}"),
        _ => name,
    }
}
