//! What a context does with a request: `call`, `eval`, `exec`, process-local envs and
//! object handles, with arguments decoded from ETF and the result encoded back.
//!
//! A `Session` holds the interpreter's objects that every request needs (the `erlang`
//! module's types, `sys.modules`, `__main__`'s namespace, envs, handles, the event loop).
//! It lives on the context thread and is dropped there, attached. Requests nest (while
//! Python waits in `erlang.call`), so no `RefCell` borrow is held across Python code.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::convert::{self, Types};
use crate::erlang_module::{erlang_module, Link};
use crate::error::Error;
use crate::etf;
use crate::event_loop::{EventLoop, Outlet, Reactor};
use crate::framing::{begin_frame, KIND_REPLY};
use crate::request::{Invoke, Op, Request, Spec};

pub struct Session {
    pub id: u64,
    pub link: Arc<Link>,
    types: Rc<Types>,
    modules: Py<PyDict>,
    import_module: Py<PyAny>,
    main_dict: Py<PyDict>,
    eval: Py<PyAny>,
    exec: Py<PyAny>,
    /// The context's asyncio loop and the poll it shares with the requests.
    pub event_loop: EventLoop,
    envs: RefCell<HashMap<u64, Py<PyDict>>>,
    /// The names the context's preload bound in `__main__` (new or rebound), taken
    /// once after it ran: every new env starts with a shallow copy of them.
    preloaded: Option<Py<PyDict>>,
}

/// How a request was answered.
pub enum Served {
    /// The reply frame is in `out`.
    Now,
    /// A task or a stream answers it later (through the event loop's outlet).
    Later,
}

/// `Session::serve`'s `start`: the request's deadline has passed already.
#[derive(Debug)]
pub struct Passed;

/// A random start for env and handle ids, so a handle from another runtime, or from
/// before a restart, cannot name a live object here (ids stay below 2^62).
fn random_id_base() -> u64 {
    let mut bytes = [0u8; 8];
    // getrandom(2), not /dev/urandom: a context starting opens no fd while other
    // contexts run Python (see `poller`)
    // SAFETY: fills the 8 bytes of `bytes`.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != 8 {
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
    /// Answered later by the event loop (a stream was started).
    Later,
}

/// Stream items ahead of the consumer when the request names no `window`.
const DEFAULT_WINDOW: u64 = 64;

fn is_coroutine(value: &Bound<'_, PyAny>) -> bool {
    // SAFETY: a type check on a live object, attached.
    unsafe { ffi::PyCoro_CheckExact(value.as_ptr()) != 0 }
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

/// The names of `after` that `before` (a copy of the same namespace) did not have, or
/// had bound to another object.
fn bound_by<'py>(
    py: Python<'py>,
    before: &Bound<'py, PyDict>,
    after: &Bound<'py, PyDict>,
) -> Result<Bound<'py, PyDict>, Error> {
    let bound = PyDict::new(py);
    for (name, value) in after.iter() {
        match before.get_item(&name)? {
            Some(old) if old.is(&value) => {}
            _ => bound.set_item(name, value)?,
        }
    }
    Ok(bound)
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
    pub fn new(
        py: Python<'_>,
        spec: &Spec,
        link: Arc<Link>,
        reactor: Rc<Reactor>,
    ) -> Result<Self, Error> {
        crate::python::prepend_sys_path(py, &spec.path)?;
        let sys = py.import("sys")?;
        let erlang = erlang_module(py)?;
        erlang.call_method0("_install_output")?;
        erlang.call_method0("_install_logging")?;
        erlang.call_method0("_install_asyncio")?;
        erlang.call_method0("_install_sleep")?;
        if matches!(spec.mode, crate::request::Mode::Main) {
            erlang.call_method0("_no_daemon_context_thread")?;
        }
        let builtins = py.import("builtins")?;
        let main = py.import("__main__")?;
        let types = Rc::new(Types::from_module(&erlang)?.for_context(spec.id, random_id_base()));
        link.set_handles(types.refs.clone());
        let outlet = Rc::new(Outlet::new(
            link.writer.clone(),
            types.clone(),
            link.open_requests.clone(),
        ));
        let mut session = Session {
            id: spec.id,
            link,
            types,
            modules: sys
                .getattr("modules")?
                .cast_into::<PyDict>()
                .map_err(PyErr::from)?
                .unbind(),
            import_module: py.import("importlib")?.getattr("import_module")?.unbind(),
            main_dict: main.dict().unbind(),
            eval: builtins.getattr("eval")?.unbind(),
            exec: builtins.getattr("exec")?.unbind(),
            event_loop: EventLoop::new(reactor, outlet),
            envs: RefCell::new(HashMap::new()),
            preloaded: None,
        };
        if let Some(code) = &spec.preload {
            let main_dict = session.main_dict.bind(py);
            let before = main_dict.copy()?;
            if let Err(e) = session.exec.bind(py).call1((code, main_dict)) {
                // The preload may have made the loop: release it here, attached.
                session.close(py);
                return Err(e.into());
            }
            session.preloaded = Some(bound_by(py, &before, main_dict)?.unbind());
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
        self.link.channels.close_all();
        self.event_loop
            .close(py, &Error::ContextDown("stopped".into()));
        self.types.clear();
        self.envs.borrow_mut().clear();
    }

    /// Serves one request body: on `Served::Now`, `out` holds the complete reply frame.
    ///
    /// The envelope (`{call, M, F, Args, Kwargs, Opts}` and friends) is decoded once in
    /// Rust, into a typed `request::Op`; only the values Python needs become Python
    /// objects. `start(timeout_ms)` is
    /// called once the options are known, before any Python runs; it returns the
    /// request's deadline (its arrival plus its timeout), or `Err(Passed)` if that has
    /// passed already (the request is then dropped). A coroutine
    /// result becomes a task on the context's loop and answers later, as do streams.
    pub fn serve(
        &self,
        py: Python<'_>,
        header: &[u8],
        body: &[u8],
        out: &mut Vec<u8>,
        start: &dyn Fn(Option<u64>) -> Result<Option<Instant>, Passed>,
    ) -> Result<Served, Error> {
        let req = Request::decode(body)?;
        let Ok(deadline) = start(req.opts.timeout_ms) else {
            return Err(Error::Timeout);
        };
        let previous = self.link.swap_caller(req.opts.caller);
        let result = self.dispatch(py, header, &req);
        if self.link.take_unflushed_output() {
            // `print(..., end="")`: the line would otherwise wait for its newline.
            let _ = erlang_module(py).and_then(|m| m.call_method0("_flush_output"));
        }
        self.link.swap_caller(previous.as_deref());
        let result = result?;
        let value = match result {
            Reply::Value(value) if is_coroutine(&value) => {
                self.start_task(py, header, value, &req, deadline)?;
                return Ok(Served::Later);
            }
            Reply::Later => return Ok(Served::Later),
            other => other,
        };
        begin_frame(out, KIND_REPLY, header);
        let mut w = etf::Writer::new(out);
        match value {
            Reply::Value(value) => {
                w.tuple_header(2);
                w.atom("ok");
                if req.opts.return_ref {
                    let id = self.types.new_id();
                    self.types.refs.insert(id, value.unbind());
                    w.tuple_header(2);
                    w.atom("pyport_ref");
                    w.int(id as i64);
                } else {
                    // issue 19: the call's `arrays` option for the arrays in the reply
                    self.types.with_arrays(req.opts.arrays, || {
                        convert::encode_term(&self.types, &value, &mut w, 0)
                    })?;
                }
            }
            Reply::Id(id) => {
                w.tuple_header(2);
                w.atom("ok");
                w.int(id as i64);
            }
            Reply::Ok => w.atom("ok"),
            Reply::Later => unreachable!("handled above"),
        }
        if w.needs_safe_decode {
            crate::framing::mark_safe_decode(out);
        }
        crate::framing::finish_reply(out)?;
        Ok(Served::Now)
    }

    /// Resolves the futures of `erlang.async_call`s whose results came back.
    pub fn resolve_async_calls(&self, py: Python<'_>) {
        for (id, term) in self.link.callbacks.take_async_results() {
            let result = match convert::decode(py, &self.types, &term) {
                Ok(v) => v,
                Err(e) => {
                    let err = ("error", e.to_string());
                    match err.into_pyobject(py) {
                        Ok(t) => t.into_any(),
                        Err(_) => continue,
                    }
                }
            };
            if let Err(e) = self.event_loop.call(py, "_pyport_resolve", (id, result)) {
                let err = crate::pyerr::to_error(py, &e);
                self.link.writer.log(
                    "warning",
                    self.id,
                    &format!("erlang.async_call result: {err}"),
                );
            }
        }
    }

    /// Items or closes arrived on channels: coroutines waiting in `async for` look again.
    pub fn channels_changed(&self, py: Python<'_>) {
        if let Err(e) = self.event_loop.call(py, "_pyport_channels_changed", ()) {
            let err = crate::pyerr::to_error(py, &e);
            self.link
                .writer
                .log("warning", self.id, &format!("channel wake-up: {err}"));
        }
    }

    /// The caller's pid as an `erlang.Pid`, or None.
    fn caller_pid<'py>(&self, py: Python<'py>, req: &Request<'_>) -> PyResult<Bound<'py, PyAny>> {
        match req.opts.caller {
            Some(pid) => self.types.pid.bind(py).call1((PyBytes::new(py, pid),)),
            None => Ok(py.None().into_bound(py)),
        }
    }

    /// Runs a coroutine as a task on the loop; its result is the reply. The task is
    /// cancelled at the request's deadline (its arrival plus its timeout, however long
    /// it was queued).
    fn start_task(
        &self,
        py: Python<'_>,
        header: &[u8],
        coro: Bound<'_, PyAny>,
        req: &Request<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64());
        self.answer_later(py, header, req, "_pyport_start_task", |header, caller| {
            (header, coro, timeout, caller, req.opts.return_ref)
        })
    }

    /// Starts streaming the items of `source` (a generator, an async generator or any
    /// iterable) to the request's caller.
    fn start_stream(
        &self,
        py: Python<'_>,
        header: &[u8],
        source: Bound<'_, PyAny>,
        req: &Request<'_>,
    ) -> Result<(), Error> {
        let window = req.opts.window.unwrap_or(DEFAULT_WINDOW);
        self.answer_later(py, header, req, "_pyport_start_stream", |header, caller| {
            (header, source, window, caller)
        })
    }

    /// Hands the request to the loop (`method(*args(header, caller pid))`), which
    /// answers it later; if that fails, the request is answered now with the error.
    /// This is pyport's own Python, run as no request's code: a stop raised into it
    /// would leave the loop's bookkeeping half done (`Deadline::outside_request`).
    fn answer_later<'py, A: pyo3::call::PyCallArgs<'py>>(
        &self,
        py: Python<'py>,
        header: &[u8],
        req: &Request<'_>,
        method: &str,
        args: impl FnOnce(Bound<'py, PyBytes>, Bound<'py, PyAny>) -> A,
    ) -> Result<(), Error> {
        self.link.deadline.outside_request(|| {
            let args = args(PyBytes::new(py, header), self.caller_pid(py, req)?);
            self.event_loop.outlet.open(header);
            if let Err(e) = self.event_loop.call(py, method, args) {
                self.event_loop.outlet.forget(header);
                return Err(e.into());
            }
            Ok(())
        })
    }

    fn dispatch<'py>(
        &self,
        py: Python<'py>,
        header: &[u8],
        req: &Request<'_>,
    ) -> Result<Reply<'py>, Error> {
        let globals = self.globals(py, req.opts.env)?;
        Ok(match &req.op {
            Op::Call(call) => {
                let target = self.function(py, &globals, call)?;
                Reply::Value(self.invoke(py, &target, call.args, call.kwargs)?)
            }
            Op::Stream(call) => {
                let target = self.function(py, &globals, call)?;
                let source = self.invoke(py, &target, call.args, call.kwargs)?;
                self.start_stream(py, header, source, req)?;
                Reply::Later
            }
            Op::ChannelOpen { name, capacity } => {
                Reply::Id(self.link.channels.open(name, *capacity as usize))
            }
            Op::StreamCredit { stream, credit } => {
                self.event_loop
                    .call(py, "_pyport_credit", (PyBytes::new(py, stream), *credit))?;
                Reply::Ok
            }
            Op::StreamCancel { stream } => {
                // The stream wants no final frame now: it is no longer open (nor is
                // any item of it still in the loop's outbox sent).
                self.event_loop.outlet.forget(stream);
                if self.event_loop.exists() {
                    self.event_loop
                        .call(py, "_pyport_cancel", (PyBytes::new(py, stream),))?;
                }
                Reply::Ok
            }
            Op::Eval { code, locals } => {
                let code = convert::decode_body(py, &self.types, code)?;
                let locals = convert::decode_body(py, &self.types, locals)?;
                Reply::Value(self.eval(py, &code, &locals, &globals)?)
            }
            Op::Exec { code } => {
                let code = source_text(&convert::decode_body(py, &self.types, code)?)?;
                self.exec.bind(py).call1((code, globals))?;
                Reply::Ok
            }
            Op::NewEnv => {
                let env = PyDict::new(py);
                env.set_item("__builtins__", py.import("builtins")?)?;
                env.set_item("__name__", "__main__")?;
                if let Some(preloaded) = &self.preloaded {
                    env.update(preloaded.bind(py).as_mapping())?;
                }
                let id = self.types.new_id();
                self.envs.borrow_mut().insert(id, env.unbind());
                Reply::Id(id)
            }
            Op::DropEnv { env } => {
                let env = self.envs.borrow_mut().remove(env);
                drop(env);
                Reply::Ok
            }
            Op::GetAttr { handle, name } => {
                Reply::Value(self.object(py, *handle)?.getattr(name.as_ref())?)
            }
            Op::CallMethod {
                handle,
                method,
                args,
                kwargs,
            } => {
                let method = self.object(py, *handle)?.getattr(method.as_ref())?;
                Reply::Value(self.invoke(py, &method, args, kwargs)?)
            }
            Op::ToTerm { handle } => Reply::Value(self.object(py, *handle)?),
            Op::Release { handle } => {
                let obj = self.types.refs.remove(*handle);
                drop(obj);
                Reply::Ok
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

    fn object<'py>(&self, py: Python<'py>, id: u64) -> Result<Bound<'py, PyAny>, Error> {
        self.types.refs.get(py, id).ok_or(Error::NotFound)
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

    /// The function a `call` or `stream` names: `Module.Function`, dotted names
    /// walking attributes; `__main__` is the request's globals.
    fn function<'py>(
        &self,
        py: Python<'py>,
        globals: &Bound<'py, PyDict>,
        call: &Invoke<'_>,
    ) -> Result<Bound<'py, PyAny>, Error> {
        let function = call.function.as_ref();
        if call.module == "__main__" {
            lookup(globals.as_any(), function, |g, name| {
                g.cast::<PyDict>().map_err(PyErr::from)?.get_item(name)
            })
        } else {
            let module = self.module(py, &PyString::new(py, &call.module))?;
            lookup(&module, function, |m, name| Ok(Some(m.getattr(name)?)))
        }
    }
}
