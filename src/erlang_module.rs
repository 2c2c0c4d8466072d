//! The `erlang` module of every interpreter: Python code reaching Erlang.
//!
//! A native module `_pyport` (built per interpreter with `PyModule::new` and
//! `wrap_pyfunction!`, never `#[pymodule]`) holds the functions; `erlang.py`, compiled
//! into the binary, wraps them and defines the Python-level types. Each context has a
//! [`Link`]: its id, the writer, its pending callbacks and the pid that made the current
//! request. The functions find the link of the calling thread's context: the context
//! thread through a thread-local; a `threading` thread started by a context's code (or
//! by such a thread) through the context it was started in, which it keeps for its life
//! (see [`thread_ticket`] and [`adopt`]: in `main` mode several contexts share one
//! interpreter, so the interpreter does not say which context a thread belongs to);
//! any other Python thread through its interpreter.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::ThreadId;
use std::time::Instant;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule, PyString, PyTuple};
use pyo3::{ffi, wrap_pyfunction};

use crate::channel::{Channels, Take};
use crate::convert::{self, Types};
use crate::error::Error;
use crate::etf;
use crate::event_loop::Reactor;
use crate::framing::{KIND_CALLBACK, KIND_SEND};
use crate::sync::Unpoison;
use crate::watchdog::{Deadline, StopReason};
use crate::writer::Writer;

const ERLANG_PY: &str = concat!(
    include_str!("../priv/python/erlang.py"),
    // the conversion hooks (issue 19): register_encoder/register_decoder and the
    // standard library's and numpy's types, in the same module
    include_str!("../priv/python/erlang_codec.py")
);

/// What Python code in one context needs to reach Erlang.
pub struct Link {
    pub ctx: u64,
    /// Unique over the process's life (context ids may be reused after a stop): names
    /// this link to the threads its context's code starts.
    key: u64,
    /// Set when the context stops: waits of other threads end, and their `erlang.*`
    /// calls raise `erlang.Error((context_down, stopped))`.
    stopped: AtomicBool,
    pub writer: Arc<Writer>,
    pub callbacks: Callbacks,
    pub channels: Channels,
    pub sends: Sends,
    /// ETF (without version byte) of the pid that made the current request.
    caller: Mutex<Option<Vec<u8>>>,
    thread: ThreadId,
    /// The running request's deadline (and interrupt) state.
    pub deadline: Arc<Deadline>,
    /// Python's output to the logger, at a bounded rate.
    output: OutputRate,
    /// Set when Python wrote output without a final newline.
    unflushed: std::sync::atomic::AtomicBool,
    /// Requests the context's event loop answers later (coroutine results, streams)
    /// that are still open, for `pyport:info/1`.
    pub open_requests: Arc<std::sync::atomic::AtomicUsize>,
    /// Set by the test hook `_pyport._test_panic_outside_request()` (see
    /// [`crate::TEST_HOOKS`]).
    test_panic: AtomicBool,
    /// The context's object handles, once its session started: a callback's result or
    /// a channel item may name one.
    handles: std::sync::OnceLock<Arc<convert::Handles>>,
}

impl Link {
    /// A link for the context served by the calling thread.
    pub fn new(ctx: u64, writer: Arc<Writer>, deadline: Arc<Deadline>) -> Arc<Self> {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        Arc::new(Link {
            ctx,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            stopped: AtomicBool::new(false),
            writer,
            deadline,
            callbacks: Callbacks::default(),
            channels: Channels::default(),
            sends: Sends::default(),
            caller: Mutex::new(None),
            thread: std::thread::current().id(),
            unflushed: std::sync::atomic::AtomicBool::new(false),
            test_panic: AtomicBool::new(false),
            output: OutputRate::default(),
            open_requests: Arc::default(),
            handles: std::sync::OnceLock::new(),
        })
    }

    /// The session's table of object handles (set once, when it starts).
    pub fn set_handles(&self, handles: Arc<convert::Handles>) {
        let _ = self.handles.set(handles);
    }

    /// The `erlang` types for decoding what Erlang sends this context (a callback's
    /// result, a channel item): its own object handles arrive as the objects.
    fn types(&self, py: Python<'_>) -> PyResult<Types> {
        let types = types(py)?;
        Ok(match self.handles.get() {
            Some(handles) => types.with_handles(self.ctx, handles.clone()),
            None => types,
        })
    }

    /// The context stops (called on its thread before its session closes): threads
    /// of its interpreter waiting in `erlang.call` are released with an exception, and
    /// its threads' later `erlang.*` calls raise one, so ending the interpreter (which
    /// joins them) does not wait for results that will never come.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.callbacks.close();
    }

    /// Whether the test hook asked the context thread to panic after this request.
    pub fn take_test_panic(&self) -> bool {
        self.test_panic.load(Ordering::Relaxed) && self.test_panic.swap(false, Ordering::SeqCst)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Whether output is waiting for its newline (and forget it).
    pub fn take_unflushed_output(&self) -> bool {
        self.unflushed.swap(false, Ordering::Relaxed)
    }

    /// Sets the pid of the request being served; returns the one it replaces
    /// (requests nest while Python waits in `erlang.call`).
    pub fn swap_caller(&self, pid: Option<&[u8]>) -> Option<Vec<u8>> {
        let mut slot = self.caller.lock().unpoison();
        std::mem::replace(&mut *slot, pid.map(<[u8]>::to_vec))
    }

    fn caller(&self) -> Option<Vec<u8>> {
        self.caller.lock().unpoison().clone()
    }
}

/// Lines of output (`print`, `sys.stderr`, `logging`) a context may send to Erlang's
/// logger per second; more are counted and dropped, and the count is logged, so a
/// flood of output cannot swamp the node's logger.
const OUTPUT_LINES_PER_SECOND: u32 = 1000;

#[derive(Default)]
struct OutputRate {
    window: Mutex<Option<(std::time::Instant, u32, u64)>>,
}

impl OutputRate {
    fn log(&self, writer: &Writer, level: &str, ctx: u64, text: &str) {
        let now = std::time::Instant::now();
        let mut window = self.window.lock().unpoison();
        let (start, sent, dropped) = window.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= std::time::Duration::from_secs(1) {
            if *dropped > 0 {
                writer.log(
                    "warning",
                    ctx,
                    &format!(
                        "{dropped} lines of Python output dropped (over \
                         {OUTPUT_LINES_PER_SECOND} lines/s)"
                    ),
                );
            }
            (*start, *sent, *dropped) = (now, 0, 0);
        }
        if *sent < OUTPUT_LINES_PER_SECOND {
            *sent += 1;
            drop(window);
            writer.log(level, ctx, text);
        } else {
            *dropped += 1;
        }
    }
}

/// Results of `erlang.call` that came back from Erlang, by callback id.
#[derive(Default)]
pub struct Callbacks {
    next: AtomicU64,
    results: Mutex<HashMap<u64, Vec<u8>>>,
    arrived: Condvar,
    /// Callbacks whose waiter gave up (its request timed out).
    abandoned: Mutex<std::collections::HashSet<u64>>,
    /// `erlang.async_call`s in flight: their results go to the event loop.
    async_ids: Mutex<std::collections::HashSet<u64>>,
    async_results: Mutex<Vec<(u64, Vec<u8>)>>,
    has_async: std::sync::atomic::AtomicBool,
    /// The context stopped: no result will come (set under `results`' lock).
    closed: AtomicBool,
}

impl Callbacks {
    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Stores a result (a whole ETF term) and wakes the threads waiting for results.
    /// The result of a callback whose waiter gave up is dropped.
    pub fn deliver(&self, id: u64, term: Vec<u8>) {
        if self.async_ids.lock().unpoison().remove(&id) {
            self.async_results.lock().unpoison().push((id, term));
            self.has_async.store(true, Ordering::SeqCst);
            return;
        }
        // Lock order: `abandoned`, then `results` (as in `abandon`).
        let mut abandoned = self.abandoned.lock().unpoison();
        if abandoned.remove(&id) {
            return;
        }
        self.results.lock().unpoison().insert(id, term);
        drop(abandoned);
        self.arrived.notify_all();
    }

    /// Whether results of `erlang.async_call` wait for the event loop.
    pub fn has_async_results(&self) -> bool {
        self.has_async.load(Ordering::SeqCst)
    }

    /// The results of `erlang.async_call` that came back.
    pub fn take_async_results(&self) -> Vec<(u64, Vec<u8>)> {
        let mut results = self.async_results.lock().unpoison();
        self.has_async.store(false, Ordering::SeqCst);
        std::mem::take(&mut *results)
    }

    /// The waiter of `id` gave up (its request timed out): its result is dropped,
    /// whether it came already or comes later.
    fn abandon(&self, id: u64) {
        let mut abandoned = self.abandoned.lock().unpoison();
        let came = self.results.lock().unpoison().remove(&id);
        if came.is_none() {
            abandoned.insert(id);
        }
    }

    pub fn is_ready(&self, id: u64) -> bool {
        self.results.lock().unpoison().contains_key(&id)
    }

    fn take(&self, id: u64) -> Option<Vec<u8>> {
        self.results.lock().unpoison().remove(&id)
    }

    /// No result will come any more: wakes the waiting threads (see [`Link::stop`]).
    fn close(&self) {
        let _results = self.results.lock().unpoison();
        self.closed.store(true, Ordering::SeqCst);
        self.arrived.notify_all();
    }

    /// Blocks until the result of `id` is there (used by threads other than the
    /// context's); `None` once the context stopped.
    fn wait(&self, id: u64) -> Option<Vec<u8>> {
        let mut results = self.results.lock().unpoison();
        loop {
            if let Some(r) = results.remove(&id) {
                return Some(r);
            }
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            results = self.arrived.wait(results).unpoison();
        }
    }
}

/// What the `_pyport` functions need of the context a context thread serves: its link,
/// its poll (the loop's fds and timers) and its loop's way to serve requests while
/// Python waits. Set by [`register`] and [`set_nested_serve`], cleared by
/// [`unregister`]; the context loop (`context::Server`) owns the state itself.
struct ContextThread {
    link: Arc<Link>,
    reactor: Rc<Reactor>,
    /// Weak: the thread-local never keeps the context's loop alive, so it cannot
    /// outlive it either (`None` until the loop runs).
    nested: Option<std::rc::Weak<dyn NestedServe>>,
}

thread_local! {
    /// The context this thread serves, if it is a context thread.
    ///
    /// Why a thread-local and not a parameter: the readers are `#[pyfunction]`s that
    /// Python calls (`erlang.call`, `erlang.self()`, the loop's selector, channel
    /// receives), with nothing in their arguments that names a context; and the
    /// `erlang` module cannot hold it either, since in `main` mode several context
    /// threads share one interpreter and so one module. The thread is what tells
    /// them apart. Everything else passes this state as parameters.
    static CONTEXT_THREAD: RefCell<Option<ContextThread>> = const { RefCell::new(None) };
    /// The context a `threading` thread belongs to: the one whose code started it. A
    /// thread-local for the same reason: the `_pyport` functions read it, and what it
    /// says is a property of the thread.
    static ADOPTED: RefCell<Option<Adopted>> = const { RefCell::new(None) };
}

/// What a thread started by a context's code keeps of that context.
struct Adopted {
    /// The context's [`Link::key`], passed on to the threads this one starts.
    key: u64,
    /// Weak: the thread may outlive its context (it then gets `context_down` errors).
    link: Weak<Link>,
    /// ETF of the pid whose request started the thread (its `erlang.self()`).
    caller: Option<Vec<u8>>,
}

/// Links by interpreter id, for Python threads that are not context threads.
static INTERP_LINKS: RwLock<Option<HashMap<i64, Arc<Link>>>> = RwLock::new(None);

/// Links of running contexts by their key, for [`adopt`].
static KEYED_LINKS: Mutex<Option<HashMap<u64, Weak<Link>>>> = Mutex::new(None);

fn interpreter_id() -> i64 {
    // SAFETY: called attached, so the current interpreter exists.
    unsafe { ffi::PyInterpreterState_GetID(ffi::PyInterpreterState_Get()) }
}

/// Makes `link` the one this thread and (for other threads) this interpreter use.
/// For the shared main interpreter, the latest `main` context wins for non-context threads.
/// `reactor` is the context's poll, for the loop's selector and fds.
pub fn register(link: &Arc<Link>, reactor: Rc<Reactor>) {
    let this = ContextThread {
        link: link.clone(),
        reactor,
        nested: None,
    };
    CONTEXT_THREAD.with(|c| *c.borrow_mut() = Some(this));
    KEYED_LINKS
        .lock()
        .unpoison()
        .get_or_insert_with(HashMap::new)
        .insert(link.key, Arc::downgrade(link));
    let mut map = INTERP_LINKS.write().unpoison();
    map.get_or_insert_with(HashMap::new)
        .insert(interpreter_id(), link.clone());
}

pub fn unregister(link: &Arc<Link>) {
    // Taken out first, dropped after the borrow ends (dropping runs no Python, but
    // nothing is dropped inside a borrow of the slot).
    let this = CONTEXT_THREAD.with(|c| c.borrow_mut().take());
    drop(this);
    if let Some(m) = KEYED_LINKS.lock().unpoison().as_mut() {
        m.remove(&link.key);
    }
    let mut map = INTERP_LINKS.write().unpoison();
    if let Some(m) = map.as_mut() {
        let id = interpreter_id();
        if m.get(&id).is_some_and(|l| Arc::ptr_eq(l, link)) {
            m.remove(&id);
        }
    }
}

fn current_link(py: Python<'_>) -> PyResult<Arc<Link>> {
    // A forked child has no router to carry a reply back, and a lock another thread
    // held at the fork stays held: it never reaches for the link (src/fork.rs).
    if crate::fork::in_child() {
        return Err(PyRuntimeError::new_err(
            "a forked child of a pyport context cannot reach Erlang",
        ));
    }
    if let Some(link) = thread_link() {
        return Ok(link);
    }
    let link = match ADOPTED.with(|a| a.borrow().as_ref().map(|a| a.link.clone())) {
        Some(weak) => weak.upgrade(),
        None => {
            let map = INTERP_LINKS.read().unpoison();
            let link = map.as_ref().and_then(|m| m.get(&interpreter_id()).cloned());
            if link.is_none() {
                return Err(PyRuntimeError::new_err(
                    "this interpreter is not a pyport context",
                ));
            }
            link
        }
    };
    match link {
        Some(link) if !link.is_stopped() => Ok(link),
        _ => Err(context_stopped(py)),
    }
}

/// `erlang.Error((context_down, stopped))`: the thread's context stopped.
fn context_stopped(py: Python<'_>) -> PyErr {
    let made = erlang_module(py).and_then(|m| {
        let atom = m.getattr("Atom")?;
        let reason = (atom.call1(("context_down",))?, atom.call1(("stopped",))?);
        m.getattr("Error")?.call1((reason,))
    });
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// The pid of the request that started the calling thread, if a context's code
/// started it (`Some(None)`: started outside any request, by a preload say).
fn adopted_caller() -> Option<Option<Vec<u8>>> {
    ADOPTED.with(|a| a.borrow().as_ref().map(|a| a.caller.clone()))
}

/// The pid `erlang.self()` and `erlang.call` name for the calling thread: the starting
/// request's on a thread a context's code started, else the context's running
/// request's (on the context thread: the request it serves).
fn thread_caller(link: &Link) -> Option<Vec<u8>> {
    adopted_caller().unwrap_or_else(|| link.caller())
}

/// `_pyport.thread_ticket()`: what a `threading` thread started now by the calling
/// thread needs to belong to the same context, `(key, caller)`; None outside contexts.
/// Called by `threading.Thread.start` (patched by `erlang._install_threads`).
#[pyfunction]
fn thread_ticket<'py>(py: Python<'py>) -> Option<(u64, Option<Bound<'py, PyBytes>>)> {
    let (key, caller) = match thread_link() {
        Some(link) => (link.key, link.caller()),
        // A thread whose context stopped passes the dead context on: its threads must
        // not fall back to another context of the interpreter.
        None => ADOPTED.with(|a| a.borrow().as_ref().map(|a| (a.key, a.caller.clone())))?,
    };
    Some((key, caller.map(|c| PyBytes::new(py, &c))))
}

/// `_pyport.adopt(key, caller)`: the calling thread (just started, in its bootstrap)
/// belongs to the context whose ticket this is. A context that stopped meanwhile
/// leaves it with a dead link: its `erlang.*` calls raise `context_down`.
#[pyfunction]
#[pyo3(signature = (key, caller=None))]
fn adopt(key: u64, caller: Option<&Bound<'_, PyBytes>>) {
    let link = KEYED_LINKS
        .lock()
        .unpoison()
        .as_ref()
        .and_then(|m| m.get(&key).cloned())
        .unwrap_or_default();
    let caller = caller.map(|c| c.as_bytes().to_vec());
    ADOPTED.with(|a| *a.borrow_mut() = Some(Adopted { key, link, caller }));
}

/// The link of the context this thread serves, if it is a context thread.
fn thread_link() -> Option<Arc<Link>> {
    CONTEXT_THREAD.with(|c| c.borrow().as_ref().map(|c| c.link.clone()))
}

/// The poll of the context this thread serves, if it is a context thread.
fn thread_reactor() -> Option<Rc<Reactor>> {
    CONTEXT_THREAD.with(|c| c.borrow().as_ref().map(|c| c.reactor.clone()))
}

/// The context loop's way to wait for a callback result or a channel item while
/// serving its mailbox (re-entrancy).
pub trait NestedServe {
    /// Serves requests until `done()`, or `until` passes (a wait with a timeout);
    /// `Some(why)` if the waiting request was stopped, or its deadline passed, first.
    fn serve_until(
        &self,
        py: Python<'_>,
        done: &dyn Fn() -> bool,
        until: Option<Instant>,
    ) -> Option<StopReason>;
}

/// Makes `serve` the way this context thread waits (after [`register`]) while its loop
/// runs; `None` once it ended (the session's closing waits without serving).
pub fn set_nested_serve(serve: Option<std::rc::Weak<dyn NestedServe>>) {
    CONTEXT_THREAD.with(|c| {
        if let Some(this) = c.borrow_mut().as_mut() {
            this.nested = serve;
        }
    });
}

/// Waits on the context thread, serving its requests meanwhile, until `ready()` or
/// `until`; `None` on any other thread (which must wait its own way). `Some(Err(why))`:
/// the waiting request was stopped, or its deadline passed, first.
fn serve_while_waiting(
    py: Python<'_>,
    link: &Link,
    ready: &dyn Fn() -> bool,
    until: Option<Instant>,
) -> Option<Result<(), StopReason>> {
    if std::thread::current().id() != link.thread {
        return None;
    }
    // Upgraded out of the slot: no borrow of it is held while requests run.
    let serve = CONTEXT_THREAD
        .with(|c| c.borrow().as_ref().and_then(|c| c.nested.clone()))?
        .upgrade()?;
    Some(match serve.serve_until(py, ready, until) {
        None => Ok(()),
        Some(why) => Err(why),
    })
}

fn types(py: Python<'_>) -> PyResult<Types> {
    Types::from_module(&erlang_module(py)?)
}

/// A conversion failure inside `erlang.*` as a Python exception.
fn to_pyerr(e: Error) -> PyErr {
    match e {
        Error::Python { kind, message, .. } => {
            PyRuntimeError::new_err(format!("{kind}: {message}"))
        }
        other => PyTypeError::new_err(other.to_string()),
    }
}

/// Sends the kind-2 frame of `erlang.call(name, *args)`; returns the callback id.
fn send_callback(
    py: Python<'_>,
    link: &Link,
    name: &Bound<'_, PyString>,
    args: &Bound<'_, PyTuple>,
    on_result: impl FnOnce(u64),
) -> PyResult<u64> {
    let types = types(py)?;
    let id = link.callbacks.next_id();
    let mut payload = Vec::with_capacity(64);
    let safe = {
        let mut w = etf::Writer::new(&mut payload);
        w.tuple_header(5);
        w.int(id as i64);
        w.int(link.ctx as i64);
        w.binary(name.to_str()?.as_bytes());
        let n = args.len();
        if n > 0 {
            w.list_header(n);
            for a in args.iter() {
                convert::encode_term(&types, &a, &mut w, 1).map_err(to_pyerr)?;
            }
        }
        w.nil();
        match thread_caller(link) {
            Some(pid) => w.raw(&pid),
            None => w.atom("undefined"),
        }
        w.needs_safe_decode
    };
    on_result(id);
    link.writer
        .event_kind(with_safe_decode(KIND_CALLBACK, safe), &payload);
    Ok(id)
}

/// `_pyport.call(name, args)`: runs the registered Erlang function `name`.
#[pyfunction]
fn call<'py>(
    py: Python<'py>,
    name: &Bound<'py, PyString>,
    args: &Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyAny>> {
    let link = current_link(py)?;
    let id = send_callback(py, &link, name, args, |_| {})?;
    let result = match serve_while_waiting(py, &link, &|| link.callbacks.is_ready(id), None) {
        // The context thread keeps serving its mailbox while it waits (re-entrancy).
        Some(Ok(())) => link.callbacks.take(id).expect("callback result is ready"),
        Some(Err(why)) => {
            // The request was stopped, or its deadline passed, while Erlang kept the
            // callback (or before its result was taken): stop waiting, so the context
            // serves others again. A result that came already is dropped.
            link.callbacks.abandon(id);
            return Err(stop_exception(py, why));
        }
        // Any other thread of the interpreter just waits, detached, until the result
        // comes or the context stops.
        None => match py.detach(|| link.callbacks.wait(id)) {
            Some(result) => result,
            None => return Err(context_stopped(py)),
        },
    };
    callback_result(py, &link.types(py)?, &result)
}

/// `_pyport.call_async(name, args)`: sends `erlang.call(name, *args)` and returns its
/// id at once; the result is handed to the context's event loop when it comes back
/// (`_Loop._pyport_resolve`), with no thread waiting for it.
#[pyfunction]
fn call_async(
    py: Python<'_>,
    name: &Bound<'_, PyString>,
    args: &Bound<'_, PyTuple>,
) -> PyResult<u64> {
    let link = current_link(py)?;
    if std::thread::current().id() != link.thread {
        return Err(PyRuntimeError::new_err(
            "erlang.async_call runs on the context's own event loop",
        ));
    }
    send_callback(py, &link, name, args, |id| {
        link.callbacks.async_ids.lock().unpoison().insert(id);
    })
}

/// `_pyport.watch(fd, events)`: the context's poll watches `fd` for the loop.
#[pyfunction]
fn watch(fd: i32, events: u8) -> PyResult<()> {
    let reactor = thread_reactor()
        .ok_or_else(|| PyRuntimeError::new_err("no pyport event loop on this thread"))?;
    reactor
        .watch(fd, events)
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))
}

/// `_pyport.unwatch(fd)`.
#[pyfunction]
fn unwatch(fd: i32) {
    if let Some(reactor) = thread_reactor() {
        reactor.unwatch(fd);
    }
}

/// `_pyport.select(timeout)`: `[(fd, events)]` for the loop's selector.
#[pyfunction]
#[pyo3(signature = (timeout=None))]
fn select(py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(i32, u8)>> {
    let reactor = thread_reactor()
        .ok_or_else(|| PyRuntimeError::new_err("no pyport event loop on this thread"))?;
    let timeout = timeout.map(|t| std::time::Duration::from_secs_f64(t.clamp(0.0, 1e6)));
    Ok(reactor.select(py, timeout))
}

/// `_pyport.channel_lookup(name)`: the id of the channel `name` of this context.
#[pyfunction]
fn channel_lookup(py: Python<'_>, name: &str) -> PyResult<u64> {
    current_link(py)?
        .channels
        .lookup(name)
        .ok_or_else(|| pyo3::exceptions::PyLookupError::new_err(format!("no channel {name:?}")))
}

/// `_pyport.channel_release(id)`: a Python `Channel` object of channel `id` is gone.
#[pyfunction]
fn channel_release(py: Python<'_>, id: u64) -> PyResult<()> {
    current_link(py)?.channels.release(id);
    Ok(())
}

/// A take from channel `id`: `(1, item)`, `(0, None)` when empty, `(2, None)` closed.
fn channel_take<'py>(py: Python<'py>, link: &Link, id: u64) -> PyResult<(u8, Bound<'py, PyAny>)> {
    match link.channels.take(link.ctx, id, &link.writer) {
        Take::Item(term) => {
            let item = convert::decode_body(py, &link.types(py)?, &term).map_err(to_pyerr)?;
            Ok((1, item))
        }
        Take::Empty => Ok((0, py.None().into_bound(py))),
        Take::Closed | Take::Unknown => Ok((2, py.None().into_bound(py))),
    }
}

/// `_pyport.channel_try(id)`: see [`channel_take`].
#[pyfunction]
fn channel_try<'py>(py: Python<'py>, id: u64) -> PyResult<(u8, Bound<'py, PyAny>)> {
    let link = current_link(py)?;
    channel_take(py, &link, id)
}

/// `_pyport.channel_receive(id, timeout)`: waits for an item (the context thread keeps
/// serving its requests meanwhile); `(0, None)` when the timeout passed.
#[pyfunction]
#[pyo3(signature = (id, timeout=None))]
fn channel_receive<'py>(
    py: Python<'py>,
    id: u64,
    timeout: Option<f64>,
) -> PyResult<(u8, Bound<'py, PyAny>)> {
    let link = current_link(py)?;
    let until =
        timeout.map(|t| Instant::now() + std::time::Duration::from_secs_f64(t.clamp(0.0, 1e9)));
    loop {
        let taken = channel_take(py, &link, id)?;
        if taken.0 != 0 || until.is_some_and(|u| u <= Instant::now()) {
            return Ok(taken);
        }
        match serve_while_waiting(py, &link, &|| link.channels.ready(id), until) {
            Some(Ok(())) => {}
            Some(Err(why)) => return Err(stop_exception(py, why)),
            None => py.detach(|| link.channels.wait(id, until)),
        }
    }
}

/// `_pyport.context_loop()`: the asyncio loop of the context this thread serves (made
/// now if need be), or None on other threads.
#[pyfunction]
fn context_loop(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    match thread_reactor() {
        Some(reactor) => Ok(Some(reactor.py_loop(py)?)),
        None => Ok(None),
    }
}

/// `_pyport.request_serial()`: names the request the calling context thread runs now
/// (a new number for each request); 0 on other threads and between requests.
#[pyfunction]
fn request_serial(py: Python<'_>) -> u64 {
    match current_link(py) {
        Ok(link) if std::thread::current().id() == link.thread => link.deadline.current().0,
        _ => 0,
    }
}

/// `_pyport.loop_touched()`: the loop got a callback outside a step.
#[pyfunction]
fn loop_touched() {
    if let Some(reactor) = thread_reactor() {
        reactor.touch();
    }
}

/// `_pyport.busy()`: other work waits for this context (a stream pump yields then).
#[pyfunction]
fn busy() -> bool {
    thread_reactor().is_some_and(|r| r.busy())
}

fn stop_exception(py: Python<'_>, why: StopReason) -> PyErr {
    let (name, message) = why.exception();
    match erlang_module(py)
        .and_then(|m| m.getattr(name.to_str().unwrap_or("CallTimeout")))
        .and_then(|c| c.call1((message.to_str().unwrap_or_default(),)))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

/// `_pyport.sleep(seconds)`: `time.sleep` for a request running on its context thread,
/// which its deadline and `pyport:interrupt/1` end at once. False elsewhere (other
/// threads, the event loop's steps): the caller then sleeps the usual way.
#[pyfunction]
fn sleep(py: Python<'_>, seconds: f64) -> PyResult<bool> {
    let Ok(link) = current_link(py) else {
        return Ok(false);
    };
    // Only a request's own code: a task or stream pump the loop runs while a request
    // waits sleeps the usual way (that request's deadline is none of its business).
    if link.deadline.code() == 0 || std::thread::current().id() != link.thread {
        return Ok(false);
    }
    if seconds.is_nan() || seconds < 0.0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "sleep length must be non-negative",
        ));
    }
    let until = Instant::now() + std::time::Duration::from_secs_f64(seconds.min(1e9));
    // Parked while it sleeps: an interrupt run meanwhile by another thread of the
    // interpreter is not aimed at the thread; the sleep raises the stop itself.
    let parked = link.deadline.park();
    let stopped = py.detach(|| link.deadline.sleep(parked, until));
    if stopped.is_some() {
        link.deadline.delivered(parked.seq);
    }
    link.deadline.unpark(parked);
    match stopped {
        None => Ok(true),
        Some(why) => Err(stop_exception(py, why)),
    }
}

/// `{ok, Term}` -> the value; `{error, Reason}` -> raises `erlang.Error(Reason)`.
fn callback_result<'py>(
    py: Python<'py>,
    types: &Types,
    term: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let value = convert::decode(py, types, term).map_err(to_pyerr)?;
    let tuple = value.cast_into::<PyTuple>().map_err(PyErr::from)?;
    let tag: String = tuple.get_item(0)?.extract()?;
    let payload = tuple.get_item(1)?;
    if tag == "ok" {
        Ok(payload)
    } else {
        let class = erlang_module(py)?.getattr("Error")?;
        Err(PyErr::from_value(class.call1((payload,))?))
    }
}

/// `_pyport.send(dest, term)`: fire and forget; never blocks. Raises `erlang.Busy` while
/// the destination is marked busy (see [`Sends`]).
#[pyfunction]
fn send(py: Python<'_>, dest: &Bound<'_, PyAny>, term: &Bound<'_, PyAny>) -> PyResult<()> {
    let link = current_link(py)?;
    let types = types(py)?;
    let mut dest_bytes = Vec::with_capacity(32);
    {
        let mut w = etf::Writer::continuing(&mut dest_bytes);
        if dest.is_instance(types.pid.bind(py))? || dest.is_instance(types.atom.bind(py))? {
            convert::encode_term(&types, dest, &mut w, 1).map_err(to_pyerr)?;
        } else if let Ok(name) = dest.cast::<PyString>() {
            w.binary(name.to_str()?.as_bytes());
        } else {
            return Err(PyTypeError::new_err(
                "send: dest must be an erlang.Pid or a registered name",
            ));
        }
    }
    let Some(dest_id) = link.sends.dest_id(&dest_bytes) else {
        let busy = erlang_module(py)?.getattr("Busy")?;
        return Err(PyErr::from_value(busy.call1((dest,))?));
    };
    let mut payload = Vec::with_capacity(64 + dest_bytes.len());
    let safe = {
        let mut w = etf::Writer::new(&mut payload);
        w.tuple_header(4);
        w.int(link.ctx as i64);
        w.int(dest_id as i64);
        w.raw(&dest_bytes);
        convert::encode_term(&types, term, &mut w, 1).map_err(to_pyerr)?;
        w.needs_safe_decode
    };
    link.writer
        .event_kind(with_safe_decode(KIND_SEND, safe), &payload);
    Ok(())
}

/// Destinations given a number; past this many, those not busy are forgotten (and get a
/// new number on their next send).
const DESTS_REMEMBERED: usize = 4096;

/// `erlang.send`'s destinations, by number, and those Erlang found busy. Each send
/// carries its destination's number. When a process's mailbox is over the runtime's
/// bound, the port owner drops the message and answers `{send_busy, DestId}`: sends to
/// that destination then raise `erlang.Busy` in Python until the owner answers
/// `{send_clear, DestId}` (it looks at the mailbox again every few milliseconds, and
/// clears once it has drained to half the bound or its process is gone).
#[derive(Default)]
pub struct Sends {
    inner: Mutex<SendsInner>,
}

#[derive(Default)]
struct SendsInner {
    next: u64,
    ids: HashMap<Vec<u8>, u64>,
    busy: std::collections::HashSet<u64>,
}

impl Sends {
    fn lock(&self) -> std::sync::MutexGuard<'_, SendsInner> {
        self.inner.lock().unpoison()
    }

    /// The number of `dest` for a send, or `None` while it is busy.
    fn dest_id(&self, dest: &[u8]) -> Option<u64> {
        let mut guard = self.lock();
        let s = &mut *guard;
        if let Some(&id) = s.ids.get(dest) {
            return (!s.busy.contains(&id)).then_some(id);
        }
        if s.ids.len() >= DESTS_REMEMBERED {
            let busy = &s.busy;
            s.ids.retain(|_, id| busy.contains(id));
        }
        s.next += 1;
        s.ids.insert(dest.to_vec(), s.next);
        Some(s.next)
    }

    /// Erlang dropped a send to destination `id`: its mailbox is over the bound.
    pub fn busy(&self, id: u64) {
        let mut s = self.lock();
        if s.ids.values().any(|&known| known == id) {
            s.busy.insert(id);
        }
    }

    /// Erlang found destination `id`'s mailbox drained (or its process gone).
    pub fn clear(&self, id: u64) {
        self.lock().busy.remove(&id);
    }
}

/// The frame kind, marked for a `[safe]` decode when it carries atoms past the budget.
fn with_safe_decode(kind: u8, safe: bool) -> u8 {
    if safe {
        kind | crate::atoms::SAFE_DECODE
    } else {
        kind
    }
}

/// `_pyport.caller()`: the pid that made the current request (on a thread a context's
/// code started: the request that started it), or None.
#[pyfunction]
fn caller(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // A thread whose context stopped still knows who started it.
    let pid = match adopted_caller() {
        Some(pid) => pid,
        None => current_link(py)?.caller(),
    };
    match pid {
        Some(pid) => Ok(types(py)?
            .pid
            .bind(py)
            .call1((PyBytes::new(py, &pid),))?
            .unbind()),
        None => Ok(py.None()),
    }
}

/// `_pyport.log(level, text)`: Python output and log records to Erlang's logger.
#[pyfunction]
fn log(py: Python<'_>, level: &str, text: &str) -> PyResult<()> {
    let level = match level {
        "debug" | "info" | "notice" | "warning" | "error" | "critical" | "alert" | "emergency" => {
            level
        }
        _ => "info",
    };
    match current_link(py) {
        Ok(link) => link.output.log(&link.writer, level, link.ctx, text),
        Err(_) => eprintln!("{text}"),
    }
    Ok(())
}

/// `_pyport.unflushed()`: output is waiting for its newline; flushed after the request.
#[pyfunction]
fn unflushed(py: Python<'_>) -> PyResult<()> {
    if let Ok(link) = current_link(py) {
        link.unflushed.store(true, Ordering::Relaxed);
    }
    Ok(())
}

/// Makes `threading` threads started by a context's code belong to that context (see
/// [`thread_ticket`]); once per interpreter, before the context's preload runs.
pub fn install_thread_hook(py: Python<'_>) -> PyResult<()> {
    erlang_module(py)?.call_method0("_install_threads")?;
    Ok(())
}

/// `_pyport._test_panic_outside_request()`: see [`crate::TEST_HOOKS`]. On the context
/// thread.
#[pyfunction]
fn _test_panic_outside_request() -> PyResult<()> {
    let link = thread_link().ok_or_else(|| PyRuntimeError::new_err("not on a context thread"))?;
    link.test_panic.store(true, Ordering::SeqCst);
    Ok(())
}

/// The `erlang` module of the current interpreter, created on first use (with `_pyport`).
pub fn erlang_module<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyModule>> {
    let modules = py.import("sys")?.getattr("modules")?;
    if let Ok(m) = modules.get_item("erlang") {
        return Ok(m.cast_into::<PyModule>()?);
    }
    let native = PyModule::new(py, "_pyport")?;
    native.add_function(wrap_pyfunction!(call, &native)?)?;
    native.add_function(wrap_pyfunction!(call_async, &native)?)?;
    native.add_function(wrap_pyfunction!(watch, &native)?)?;
    native.add_function(wrap_pyfunction!(unwatch, &native)?)?;
    native.add_function(wrap_pyfunction!(select, &native)?)?;
    native.add_function(wrap_pyfunction!(busy, &native)?)?;
    native.add_function(wrap_pyfunction!(loop_touched, &native)?)?;
    native.add_function(wrap_pyfunction!(context_loop, &native)?)?;
    native.add_function(wrap_pyfunction!(request_serial, &native)?)?;
    native.add_function(wrap_pyfunction!(sleep, &native)?)?;
    native.add_function(wrap_pyfunction!(channel_lookup, &native)?)?;
    native.add_function(wrap_pyfunction!(channel_release, &native)?)?;
    native.add_function(wrap_pyfunction!(channel_try, &native)?)?;
    native.add_function(wrap_pyfunction!(channel_receive, &native)?)?;
    native.add_function(wrap_pyfunction!(send, &native)?)?;
    native.add_function(wrap_pyfunction!(caller, &native)?)?;
    native.add_function(wrap_pyfunction!(log, &native)?)?;
    native.add_function(wrap_pyfunction!(unflushed, &native)?)?;
    native.add_function(wrap_pyfunction!(thread_ticket, &native)?)?;
    native.add_function(wrap_pyfunction!(adopt, &native)?)?;
    if crate::test_hooks() {
        native.add_function(wrap_pyfunction!(_test_panic_outside_request, &native)?)?;
    }
    modules.set_item("_pyport", &native)?;
    let code = CString::new(ERLANG_PY).expect("erlang.py has no NUL bytes");
    PyModule::from_code(py, &code, c"erlang.py", c"erlang")
}
