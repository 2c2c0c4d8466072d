//! Conversions past the built-in mapping: the standard library's types, numpy's scalars
//! and arrays, and the user's encoders and decoders (`erlang.register_encoder`,
//! `__erlang__`, `erlang.register_decoder`). The per-class choice lives in Python
//! (`priv/python/erlang_codec.py`, part of the `erlang` module); this side asks it only
//! for objects the built-in mapping has no form for and for tuples whose first element
//! is an atom with a decoder, so the exact built-in types never pay for it.
//!
//! Arrays come back as nested lists, or as `{ndarray, DType, Shape, Data}` with the
//! runtime option or the call option `arrays => binary`; their bytes are copied once,
//! from the array's buffer into the reply frame.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyTuple};

use super::{decode_term, encode_term, new_tuple, type_name, Types};
use crate::error::{BadTerm, Error};
use crate::etf::{self, Reader, Writer};

/// The runtime's default for `arrays` (`--arrays binary`): lists unless set.
static ARRAYS_BINARY: AtomicBool = AtomicBool::new(false);

/// Sets the runtime's default form of arrays: `binary` or `lists`.
pub fn set_arrays_binary(form: &str) -> Result<(), String> {
    match form {
        "binary" => ARRAYS_BINARY.store(true, Ordering::Relaxed),
        "lists" => ARRAYS_BINARY.store(false, Ordering::Relaxed),
        other => return Err(format!("--arrays takes binary or lists, not {other}")),
    }
    Ok(())
}

/// The runtime's default form of arrays (`true`: binary).
pub fn arrays_binary() -> bool {
    ARRAYS_BINARY.load(Ordering::Relaxed)
}

/// The tags with a built-in decoder (the shapes of docs/api.md, "Type mapping").
fn builtin_tag(tag: &str) -> bool {
    matches!(
        tag,
        "datetime"
            | "date"
            | "time"
            | "timedelta"
            | "decimal"
            | "uuid"
            | "enum"
            | "complex"
            | "range"
            | "ndarray"
    )
}

/// The `erlang` module's conversion hooks, as objects of one interpreter.
pub struct Hooks {
    encode: Py<PyAny>,
    decode: Py<PyAny>,
    decoders: Py<PyDict>,
    no_conversion: Py<PyAny>,
    too_large: Py<PyAny>,
    /// The running request's `arrays` option (`None`: the runtime's default).
    arrays: Cell<Option<bool>>,
}

impl Hooks {
    pub fn from_module(module: &Bound<'_, PyModule>) -> PyResult<Self> {
        let get = |name: &str| module.getattr(name).map(Bound::unbind);
        Ok(Hooks {
            encode: get("_encode_other")?,
            decode: get("_decode_tagged")?,
            decoders: module.getattr("_decoders")?.cast_into::<PyDict>()?.unbind(),
            no_conversion: get("_NO_CONVERSION")?,
            too_large: get("_TooLarge")?,
            arrays: Cell::new(None),
        })
    }

    /// Whether a tuple tagged `tag` goes to a decoder.
    fn decodes(&self, py: Python<'_>, tag: &str) -> bool {
        if builtin_tag(tag) {
            return true;
        }
        let decoders = self.decoders.bind(py);
        !decoders.is_empty() && decoders.contains(tag).unwrap_or(false)
    }
}

impl Types {
    /// Runs `f` with the request's `arrays` option (`None`: the runtime's default).
    pub fn with_arrays<R>(&self, arrays: Option<bool>, f: impl FnOnce() -> R) -> R {
        let previous = self.hooks.arrays.replace(arrays);
        let r = f();
        self.hooks.arrays.set(previous);
        r
    }

    fn arrays_binary(&self) -> bool {
        self.hooks.arrays.get().unwrap_or_else(arrays_binary)
    }
}

/// An object of no built-in type: what its encoder makes of it, encoded, or
/// `{unsupported, TypeName}`. An encoder that raises is the call's error.
pub(super) fn encode_other(
    types: &Types,
    obj: &Bound<'_, PyAny>,
    w: &mut Writer<'_>,
    depth: usize,
) -> Result<(), Error> {
    let py = obj.py();
    let hooks = &types.hooks;
    let max = crate::framing::max_reply();
    let value = hooks
        .encode
        .bind(py)
        .call1((obj, types.arrays_binary(), max))?;
    if value.is(hooks.no_conversion.bind(py)) {
        return Err(BadTerm::Unsupported(type_name(obj)).into());
    }
    if value.is_instance(hooks.too_large.bind(py))? {
        let size = value.getattr("size")?.extract()?;
        return Err(Error::ReplyTooLarge { size, max });
    }
    encode_term(types, &value, w, depth + 1)
}

/// An object with the buffer protocol (a `memoryview`, an array's data) as a binary,
/// copied once from its buffer into the frame; one that is not contiguous through
/// `tobytes()`.
pub(super) fn encode_buffer(obj: &Bound<'_, PyAny>, w: &mut Writer<'_>) -> Result<(), Error> {
    let py = obj.py();
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    // SAFETY: `obj` is a live object; on success the view is filled and released below.
    let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_SIMPLE) };
    if rc != 0 {
        drop(PyErr::take(py));
        let bytes = obj.call_method0("tobytes")?;
        w.binary(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
        return Ok(());
    }
    // SAFETY: PyObject_GetBuffer succeeded, so the view is initialised.
    let mut view = unsafe { view.assume_init() };
    let data = if view.len > 0 && !view.buf.is_null() {
        // SAFETY: a PyBUF_SIMPLE view is `len` contiguous bytes at `buf`, alive until
        // released.
        unsafe { std::slice::from_raw_parts(view.buf as *const u8, view.len as usize) }
    } else {
        &[]
    };
    w.binary(data);
    // SAFETY: the view was filled by PyObject_GetBuffer and is released once.
    unsafe { ffi::PyBuffer_Release(&mut view) };
    Ok(())
}

/// A tuple of `n` elements whose first is the atom `tag`, decoded then handed to its
/// decoder; `None` (nothing read) when `tag` has none. An `ndarray` tuple's data
/// becomes a `bytearray` (the array's memory, copied once from the frame).
pub(super) fn decode_tagged<'py>(
    py: Python<'py>,
    types: &Types,
    r: &mut Reader<'_>,
    tag: &str,
    n: usize,
    depth: usize,
) -> Result<Option<Bound<'py, PyAny>>, Error> {
    if !types.hooks.decodes(py, tag) {
        return Ok(None);
    }
    let ndarray = n == 4 && tag == "ndarray";
    let tuple: Bound<'py, PyTuple> = new_tuple(py, n)?;
    for i in 0..n {
        let item = if ndarray && i == 3 && r.peek()? == etf::BINARY {
            r.u8()?;
            let len = r.u32()? as usize;
            PyByteArray::new(py, r.bytes(len)?).into_any()
        } else {
            decode_term(py, types, r, depth)?
        };
        // SAFETY: `tuple` is fresh, of length n, and slot i is empty; SET_ITEM steals
        // the reference. A tuple with empty slots left by an error is safe to free.
        unsafe { ffi::PyTuple_SET_ITEM(tuple.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr()) };
    }
    Ok(Some(types.hooks.decode.bind(py).call1((tuple,))?))
}
