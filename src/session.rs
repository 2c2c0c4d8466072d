//! What a context does with a request: `call`, `eval` and `exec` against its
//! interpreter, with arguments decoded from ETF and the result encoded back.
//!
//! A `Session` holds the interpreter's objects that every request needs (the `erlang`
//! module's types, `sys.modules`, `__main__`'s namespace, the event loop). It lives on
//! the context thread and is dropped there, attached.

use std::cell::RefCell;
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::context::Spec;
use crate::convert::{self, Types};
use crate::erlang_module::{erlang_module, Link};
use crate::error::Error;
use crate::etf;
use crate::framing::{begin_frame, finish_frame, KIND_REPLY};

/// The options of a request that this side acts on (others are ignored).
struct Opts<'a> {
    /// ETF of the pid that made the request (for `erlang.self()`).
    caller: Option<&'a [u8]>,
}

impl<'a> Opts<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let mut r = etf::Reader::body(bytes);
        if r.u8()? != etf::MAP {
            return Err(Error::BadRequest("options must be a map".into()));
        }
        let n = r.u32()? as usize;
        let mut opts = Opts { caller: None };
        for _ in 0..n {
            let key = r.peek_atom();
            r.term_slice()?;
            let value = r.term_slice()?;
            if key.as_deref() == Some("caller")
                && matches!(value.first(), Some(&etf::NEW_PID) | Some(&etf::PID))
            {
                opts.caller = Some(value);
            }
        }
        Ok(opts)
    }
}

pub struct Session {
    pub id: u64,
    pub link: Arc<Link>,
    types: Types,
    modules: Py<PyDict>,
    import_module: Py<PyAny>,
    main_dict: Py<PyDict>,
    eval: Py<PyAny>,
    exec: Py<PyAny>,
    event_loop: RefCell<Option<Py<PyAny>>>,
}

/// Text of Python source from an Erlang binary (`str`) or charlist (list of ints).
fn source_text(code: &Bound<'_, PyAny>) -> Result<String, Error> {
    if let Ok(s) = code.cast::<PyString>() {
        return Ok(s.to_str()?.to_string());
    }
    if let Ok(list) = code.cast::<PyList>() {
        let mut s = String::with_capacity(list.len());
        for c in list.iter() {
            let c: u32 = c
                .extract()
                .map_err(|_| Error::BadRequest("code must be a string".into()))?;
            s.push(
                char::from_u32(c)
                    .ok_or_else(|| Error::BadRequest("code is not valid text".into()))?,
            );
        }
        return Ok(s);
    }
    Err(Error::BadRequest("code must be a string".into()))
}

impl Session {
    pub fn new(py: Python<'_>, spec: &Spec, link: Arc<Link>) -> Result<Self, Error> {
        let sys = py.import("sys")?;
        let path = sys.getattr("path")?;
        for (i, dir) in spec.path.iter().enumerate() {
            path.call_method1("insert", (i, dir))?;
        }
        let erlang = erlang_module(py)?;
        erlang.call_method0("_install_output")?;
        erlang.call_method0("_install_logging")?;
        let builtins = py.import("builtins")?;
        let main = py.import("__main__")?;
        let session = Session {
            id: spec.id,
            link,
            types: Types::from_module(&erlang)?,
            modules: sys
                .getattr("modules")?
                .cast_into::<PyDict>()
                .map_err(PyErr::from)?
                .unbind(),
            import_module: py.import("importlib")?.getattr("import_module")?.unbind(),
            main_dict: main.dict().unbind(),
            eval: builtins.getattr("eval")?.unbind(),
            exec: builtins.getattr("exec")?.unbind(),
            event_loop: RefCell::new(None),
        };
        if let Some(code) = &spec.preload {
            session
                .exec
                .bind(py)
                .call1((code, session.main_dict.bind(py)))?;
        }
        Ok(session)
    }

    /// Releases what the session holds; runs attached, before the interpreter ends.
    pub fn close(&self, py: Python<'_>) {
        if let Some(lp) = self.event_loop.borrow_mut().take() {
            let _ = lp.bind(py).call_method0("close");
        }
        self.types.clear();
    }

    /// Serves one request body; on success `out` holds the complete reply frame.
    ///
    /// The envelope (`{call, M, F, Args, Kwargs, Opts}` and friends) is taken apart in
    /// Rust; only the values Python needs become Python objects.
    pub fn serve(
        &self,
        py: Python<'_>,
        header: &[u8],
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        // Malformed ETF is `bad_term`; a well-formed term of the wrong shape `bad_request`.
        let mut check = etf::Reader::new(body)?;
        check.skip(0)?;
        check.finish()?;
        let mut r = etf::Reader::new(body)?;
        let arity = r
            .tuple_header()
            .map_err(|_| Error::BadRequest("a request is a tuple".into()))?;
        let op = r
            .atom()
            .map_err(|_| Error::BadRequest("a request starts with an atom".into()))?;
        let mut parts: [&[u8]; 5] = [&[]; 5];
        if arity < 2 || arity > parts.len() + 1 {
            return Err(Error::BadRequest(format!("unknown request {op}/{arity}")));
        }
        for part in parts.iter_mut().take(arity - 1) {
            *part = r.term_slice()?;
        }
        let opts = Opts::parse(parts[arity - 2])?;
        let previous = self.link.swap_caller(opts.caller);
        let result = self.dispatch(py, &op, arity, &parts);
        self.link.swap_caller(previous.as_deref());
        let result = result?;
        begin_frame(out, KIND_REPLY, header);
        let mut w = etf::Writer::new(out);
        match result {
            Some(value) => {
                let value = self.await_if_coroutine(py, value)?;
                w.tuple_header(2);
                w.atom("ok");
                convert::encode_term(&self.types, &value, &mut w, 0)?;
            }
            None => w.atom("ok"),
        }
        finish_frame(out);
        Ok(())
    }

    fn dispatch<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        arity: usize,
        parts: &[&[u8]; 5],
    ) -> Result<Option<Bound<'py, PyAny>>, Error> {
        Ok(match (op, arity) {
            ("call", 6) => Some(self.call(py, parts[0], parts[1], parts[2], parts[3])?),
            ("eval", 4) => {
                let code = convert::decode_body(py, &self.types, parts[0])?;
                let locals = convert::decode_body(py, &self.types, parts[1])?;
                Some(self.eval(py, &code, &locals)?)
            }
            ("exec", 3) => {
                let code = source_text(&convert::decode_body(py, &self.types, parts[0])?)?;
                self.exec.bind(py).call1((code, self.main_dict.bind(py)))?;
                None
            }
            _ => return Err(Error::BadRequest(format!("unknown request {op}/{arity}"))),
        })
    }

    fn call<'py>(
        &self,
        py: Python<'py>,
        module: &[u8],
        function: &[u8],
        args: &[u8],
        kwargs: &[u8],
    ) -> Result<Bound<'py, PyAny>, Error> {
        let bad = |what: &str| Error::BadRequest(format!("{what} must be an atom or a binary"));
        let module = etf::Reader::body(module)
            .text()
            .map_err(|_| bad("module"))?;
        let function = etf::Reader::body(function)
            .text()
            .map_err(|_| bad("function"))?;
        let mut target = self.module(py, &PyString::new(py, &module))?;
        for part in function.split('.') {
            target = target.getattr(part)?;
        }
        let args = convert::decode_args(py, &self.types, args)?;
        let kwargs = match kwargs {
            [etf::MAP, 0, 0, 0, 0] => None,
            _ => {
                let k = convert::decode_body(py, &self.types, kwargs)?;
                if k.is_none() {
                    None
                } else {
                    Some(
                        k.cast_into::<PyDict>()
                            .map_err(|_| Error::BadRequest("kwargs must be a map".into()))?,
                    )
                }
            }
        };
        Ok(target.call(args, kwargs.as_ref())?)
    }

    /// The module named `name`, from `sys.modules` or imported now.
    fn module<'py>(
        &self,
        py: Python<'py>,
        name: &Bound<'py, PyString>,
    ) -> Result<Bound<'py, PyAny>, Error> {
        if let Some(m) = self.modules.bind(py).get_item(name)? {
            return Ok(m);
        }
        Ok(self.import_module.bind(py).call1((name,))?)
    }

    fn eval<'py>(
        &self,
        py: Python<'py>,
        code: &Bound<'py, PyAny>,
        locals: &Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyAny>, Error> {
        let code = source_text(code)?;
        let globals = self.main_dict.bind(py);
        let locals = match locals.cast::<PyDict>() {
            Ok(d) => d.clone(),
            Err(_) if locals.is_none() => PyDict::new(py),
            Err(_) => return Err(Error::BadRequest("locals must be a map".into())),
        };
        Ok(self.eval.bind(py).call1((code, globals, locals))?)
    }

    /// Runs a coroutine to completion on this context's event loop.
    fn await_if_coroutine<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
    ) -> Result<Bound<'py, PyAny>, Error> {
        // SAFETY: a type check on a live object, attached.
        if unsafe { ffi::PyCoro_CheckExact(value.as_ptr()) } == 0 {
            return Ok(value);
        }
        let mut slot = self.event_loop.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                py.import("asyncio")?
                    .call_method0("new_event_loop")?
                    .unbind(),
            );
        }
        let lp = slot
            .as_ref()
            .map(|l| l.clone_ref(py))
            .expect("event loop was just set");
        drop(slot);
        Ok(lp.bind(py).call_method1("run_until_complete", (value,))?)
    }
}
