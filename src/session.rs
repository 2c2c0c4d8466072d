//! What a context does with a request: `call`, `eval`, `exec`, process-local envs and
//! object handles, with arguments decoded from ETF and the result encoded back.
//!
//! A `Session` holds the interpreter's objects that every request needs (the `erlang`
//! module's types, `sys.modules`, `__main__`'s namespace, envs, handles, the event loop).
//! It lives on the context thread and is dropped there, attached. Requests nest (while
//! Python waits in `erlang.call`), so no `RefCell` borrow is held across Python code.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
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
                _ => {}
            }
        }
        Ok(opts)
    }
}

/// A non-negative integer term that fits in u64, from its encoded body.
fn small_uint(body: &[u8]) -> Option<u64> {
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
    fn text(&self, i: usize, what: &str) -> Result<std::borrow::Cow<'a, str>, Error> {
        etf::Reader::body(self.items[i])
            .text()
            .map_err(|_| Error::BadRequest(format!("{what} must be an atom or a binary")))
    }
    fn id(&self, i: usize, what: &str) -> Result<u64, Error> {
        small_uint(self.items[i])
            .ok_or_else(|| Error::BadRequest(format!("{what} must be a non-negative integer")))
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
    envs: RefCell<HashMap<u64, Py<PyDict>>>,
    next_id: Cell<u64>,
}

/// `{Op, Part1, ..., Opts}` split into the op and the encoded parts (each skipped once,
/// which also checks that the whole body is well-formed ETF).
fn split_request(body: &[u8]) -> Result<(std::borrow::Cow<'_, str>, Parts<'_>), Error> {
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

/// The error to report for a body `split_request` refused: what is wrong with the ETF
/// if anything, else `shape`.
fn classify(body: &[u8], shape: Error) -> Error {
    let check = etf::Reader::new(body).and_then(|mut r| r.skip(0).and_then(|()| r.finish()));
    match check {
        Err(e) => e.into(),
        Ok(()) => shape,
    }
}

/// A random start for env and handle ids, so a handle from another runtime, or from
/// before a restart, cannot name a live object here (ids stay below 2^62).
fn random_id_base() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    (u64::from_le_bytes(bytes) & ((1 << 62) - 1)) | (1 << 40)
}

/// What a request answers before it is encoded.
enum Reply<'py> {
    Value(Bound<'py, PyAny>),
    Id(u64),
    Ok,
}

/// Resolves a dotted name: the first part with `first`, the rest as attributes.
fn lookup<'py>(
    base: &Bound<'py, PyAny>,
    dotted: &str,
    first: impl Fn(&Bound<'py, PyAny>, &str) -> PyResult<Option<Bound<'py, PyAny>>>,
) -> Result<Bound<'py, PyAny>, Error> {
    let mut parts = dotted.split('.');
    let head = parts.next().unwrap_or_default();
    let mut target = first(base, head)?.ok_or_else(|| {
        Error::from(pyo3::exceptions::PyNameError::new_err(format!(
            "name '{head}' is not defined"
        )))
    })?;
    for part in parts {
        target = target.getattr(part)?;
    }
    Ok(target)
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
            types: Types::from_module(&erlang)?.for_context(spec.id),
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
            envs: RefCell::new(HashMap::new()),
            next_id: Cell::new(random_id_base()),
        };
        if let Some(code) = &spec.preload {
            session
                .exec
                .bind(py)
                .call1((code, session.main_dict.bind(py)))?;
        }
        Ok(session)
    }

    /// Runs `code` in `__main__` (for benchmarks and tests).
    pub fn exec_for_bench(&self, py: Python<'_>, code: &str) {
        self.exec
            .bind(py)
            .call1((code, self.main_dict.bind(py)))
            .expect("code runs");
    }

    /// Releases what the session holds; runs attached, before the interpreter ends.
    pub fn close(&self, py: Python<'_>) {
        let _ = erlang_module(py).and_then(|m| m.call_method0("_before_end"));
        if let Some(lp) = self.event_loop.borrow_mut().take() {
            let _ = lp.bind(py).call_method0("close");
        }
        self.types.clear();
        self.envs.borrow_mut().clear();
    }

    /// Serves one request body; on success `out` holds the complete reply frame.
    ///
    /// The envelope (`{call, M, F, Args, Kwargs, Opts}` and friends) is taken apart in
    /// Rust; only the values Python needs become Python objects.
    /// `start(timeout_ms)` is called once the options are known, before any Python runs;
    /// it returns false if the request's deadline has already passed (it is then dropped).
    pub fn serve(
        &self,
        py: Python<'_>,
        header: &[u8],
        body: &[u8],
        out: &mut Vec<u8>,
        start: &dyn Fn(Option<u64>) -> bool,
    ) -> Result<(), Error> {
        let (op, parts) = match split_request(body) {
            Ok(split) => split,
            // Malformed ETF is `bad_term`; a well-formed term of the wrong shape
            // `bad_request`. Only a failed request pays for telling them apart.
            Err(e) => return Err(classify(body, e)),
        };
        let opts = Opts::parse(parts.get(parts.len - 1))?;
        if !start(opts.timeout_ms) {
            return Err(Error::Timeout);
        }
        let previous = self.link.swap_caller(opts.caller);
        let result = self.dispatch(py, &op, &parts, &opts);
        if self.link.take_unflushed_output() {
            // `print(..., end="")`: the line would otherwise wait for its newline.
            let _ = erlang_module(py).and_then(|m| m.call_method0("_flush_output"));
        }
        self.link.swap_caller(previous.as_deref());
        let result = result?;
        begin_frame(out, KIND_REPLY, header);
        let mut w = etf::Writer::new(out);
        match result {
            Reply::Value(value) => {
                let value = self.await_if_coroutine(py, value)?;
                w.tuple_header(2);
                w.atom("ok");
                if opts.return_ref {
                    let id = self.new_id();
                    self.types.refs.borrow_mut().insert(id, value.unbind());
                    w.tuple_header(2);
                    w.atom("pyport_ref");
                    w.int(id as i64);
                } else {
                    convert::encode_term(&self.types, &value, &mut w, 0)?;
                }
            }
            Reply::Id(id) => {
                w.tuple_header(2);
                w.atom("ok");
                w.int(id as i64);
            }
            Reply::Ok => w.atom("ok"),
        }
        finish_frame(out);
        Ok(())
    }

    fn new_id(&self) -> u64 {
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        id
    }

    fn dispatch<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        parts: &Parts<'_>,
        opts: &Opts<'_>,
    ) -> Result<Reply<'py>, Error> {
        let globals = self.globals(py, opts.env)?;
        Ok(match (op, parts.len) {
            ("call", 5) => {
                let module = parts.text(0, "module")?;
                let function = parts.text(1, "function")?;
                let target = if module == "__main__" {
                    lookup(globals.as_any(), &function, |g, name| {
                        g.cast::<PyDict>().map_err(PyErr::from)?.get_item(name)
                    })?
                } else {
                    let module = self.module(py, &PyString::new(py, &module))?;
                    lookup(&module, &function, |m, name| Ok(Some(m.getattr(name)?)))?
                };
                Reply::Value(self.invoke(py, &target, parts.get(2), parts.get(3))?)
            }
            ("eval", 3) => {
                let code = convert::decode_body(py, &self.types, parts.get(0))?;
                let locals = convert::decode_body(py, &self.types, parts.get(1))?;
                Reply::Value(self.eval(py, &code, &locals, &globals)?)
            }
            ("exec", 2) => {
                let code = source_text(&convert::decode_body(py, &self.types, parts.get(0))?)?;
                self.exec.bind(py).call1((code, globals))?;
                Reply::Ok
            }
            ("new_env", 1) => {
                let env = PyDict::new(py);
                env.set_item("__builtins__", py.import("builtins")?)?;
                env.set_item("__name__", "__main__")?;
                let id = self.new_id();
                self.envs.borrow_mut().insert(id, env.unbind());
                Reply::Id(id)
            }
            ("drop_env", 2) => {
                let env = self.envs.borrow_mut().remove(&parts.id(0, "env id")?);
                drop(env);
                Reply::Ok
            }
            ("getattr", 3) => Reply::Value(
                self.handle(py, parts.id(0, "ref id")?)?
                    .getattr(parts.text(1, "name")?.as_ref())?,
            ),
            ("call_method", 5) => {
                let method = self
                    .handle(py, parts.id(0, "ref id")?)?
                    .getattr(parts.text(1, "method")?.as_ref())?;
                Reply::Value(self.invoke(py, &method, parts.get(2), parts.get(3))?)
            }
            ("to_term", 2) => Reply::Value(self.handle(py, parts.id(0, "ref id")?)?),
            ("release", 2) => {
                let obj = self.types.refs.borrow_mut().remove(&parts.id(0, "ref id")?);
                drop(obj);
                Reply::Ok
            }
            _ => {
                return Err(Error::BadRequest(format!(
                    "unknown request {op}/{}",
                    parts.len + 1
                )))
            }
        })
    }

    /// The globals for a request: an env's, or `__main__`'s.
    fn globals<'py>(&self, py: Python<'py>, env: Option<u64>) -> Result<Bound<'py, PyDict>, Error> {
        match env {
            None => Ok(self.main_dict.bind(py).clone()),
            Some(id) => self
                .envs
                .borrow()
                .get(&id)
                .map(|e| e.bind(py).clone())
                .ok_or(Error::NotFound),
        }
    }

    fn handle<'py>(&self, py: Python<'py>, id: u64) -> Result<Bound<'py, PyAny>, Error> {
        self.types
            .refs
            .borrow()
            .get(&id)
            .map(|o| o.bind(py).clone())
            .ok_or(Error::NotFound)
    }

    /// Calls `target(*args, **kwargs)` with both decoded from ETF.
    fn invoke<'py>(
        &self,
        py: Python<'py>,
        target: &Bound<'py, PyAny>,
        args: &[u8],
        kwargs: &[u8],
    ) -> Result<Bound<'py, PyAny>, Error> {
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
        globals: &Bound<'py, PyDict>,
    ) -> Result<Bound<'py, PyAny>, Error> {
        let code = source_text(code)?;
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
        let (op, parts) = split_request(&body).unwrap();
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
        let (_, parts) = split_request(&body).unwrap();
        assert!(matches!(
            Opts::parse(parts.get(4)),
            Err(Error::BadRequest(_))
        ));
    }

    #[test]
    fn malformed_etf_is_bad_term_and_wrong_shape_is_bad_request() {
        let shape = |body: &[u8]| {
            split_request(body)
                .map(|_| ())
                .map_err(|e| classify(body, e))
        };
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
}
