//! Python exceptions as `{python, Type, Message, Traceback}` errors. The conversion
//! runs on the interpreter's own thread: only the resulting Rust strings cross threads.

use pyo3::prelude::*;
use pyo3::types::PyTracebackMethods;

use crate::convert::qualified_name;
use crate::error::Error;

pub fn to_error(py: Python<'_>, err: &PyErr) -> Error {
    let kind = qualified_name(&err.get_type(py).into_any());
    let value = err.value(py);
    let message = value
        .str()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let traceback = err
        .traceback(py)
        .and_then(|tb| tb.format().ok())
        .unwrap_or_default();
    Error::Python {
        kind,
        message,
        traceback,
    }
}

impl From<PyErr> for Error {
    fn from(e: PyErr) -> Self {
        Python::attach(|py| to_error(py, &e))
    }
}
