//! The event loop of a context: one wait per context thread, shared by the requests
//! and by that interpreter's asyncio loop.
//!
//! The [`Reactor`] owns the context thread's [`Poller`]: its waker (new requests, results
//! of `erlang.async_call`, credit for streams) and the fds Python registers through the
//! loop's selector. Rust owns the wait. When the poll reports fds, or the loop's next
//! timer is due, the context thread *steps* the asyncio loop once ([`EventLoop::step`]):
//! the selector's `select()` hands over the events already collected and returns at
//! once. Between steps no loop is marked running, so sync requests (which run between
//! steps) can call `asyncio.run()` like any other code.
//!
//! The poll is edge-triggered and asyncio expects level-triggered readiness, so every fd
//! handed to Python is re-armed (`EPOLL_CTL_MOD`) as it is handed over: if Python leaves
//! data unread, the next poll reports the fd again.
//!
//! The asyncio side (selector, loop subclass, task and stream pumps) is in
//! `priv/python/erlang.py`; what it sends to Erlang goes through [`Outlet`].

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::convert::{self, Types};
use crate::error::Error;
use crate::etf;
use crate::framing::KIND_STREAM;
use crate::poller::{Events, Poller};
use crate::writer::Writer;

/// The poll token of the context's waker; fd `n` uses token `n + 1`.
pub const WAKE: u64 = 0;
/// `selectors.EVENT_READ` and `selectors.EVENT_WRITE`.
pub const READ: u8 = 1;
pub const WRITE: u8 = 2;

/// The context thread's poll and the fds Python watches with it.
pub struct Reactor {
    poll: Poller,
    events: RefCell<Events>,
    fds: RefCell<HashMap<RawFd, u8>>,
    /// Readiness the poll reported and Python has not taken yet.
    ready: RefCell<Vec<(RawFd, u8)>>,
    /// True while the asyncio loop steps (its `select()` must not wait).
    stepping: Cell<bool>,
    /// Whether requests or callback results wait for the context (set by the context).
    busy: RefCell<Option<Box<dyn Fn() -> bool>>>,
    /// Set when Python scheduled a callback outside a step (`erlang._Loop.call_soon`).
    touched: Cell<bool>,
    /// The interpreter's `erlang._Loop` for this context, made on first use. Taken
    /// (attached) when the context ends.
    py_loop: RefCell<Option<Py<PyAny>>>,
}

/// The poll token of fd `fd`.
fn token(fd: RawFd) -> u64 {
    u64::try_from(fd).unwrap_or(u64::MAX - 1) + 1
}

/// What a selector mask asks the poll for: (read, write); `None` when it asks nothing.
fn interest(mask: u8) -> Option<(bool, bool)> {
    let (read, write) = (mask & READ != 0, mask & WRITE != 0);
    (read || write).then_some((read, write))
}

impl Reactor {
    pub fn new(poll: Poller) -> io::Result<Self> {
        Ok(Reactor {
            poll,
            events: RefCell::new(Events::with_capacity(64)),
            fds: RefCell::new(HashMap::new()),
            ready: RefCell::new(Vec::new()),
            stepping: Cell::new(false),
            busy: RefCell::new(None),
            touched: Cell::new(false),
            py_loop: RefCell::new(None),
        })
    }

    /// The context's asyncio loop, made (and made this thread's current loop) on first use.
    pub fn py_loop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(py_loop) = self.py_loop.borrow().as_ref() {
            return Ok(py_loop.bind(py).clone());
        }
        // The session made the `erlang` module before any loop can be asked for.
        let py_loop = py.import("erlang")?.call_method0("_new_loop")?;
        *self.py_loop.borrow_mut() = Some(py_loop.clone().unbind());
        Ok(py_loop)
    }

    fn existing_loop<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.py_loop.borrow().as_ref().map(|l| l.bind(py).clone())
    }

    /// Python scheduled a callback outside a step: the loop's due time may have moved.
    pub fn touch(&self) {
        self.touched.set(true);
    }

    /// Tells the reactor how to see that other work waits for its thread.
    pub fn set_busy_probe(&self, probe: Box<dyn Fn() -> bool>) {
        *self.busy.borrow_mut() = Some(probe);
    }

    /// Whether other work waits (a long stream pump yields to it).
    pub fn busy(&self) -> bool {
        self.has_ready() || self.busy.borrow().as_ref().is_some_and(|p| p())
    }

    /// Whether Python watches any fd (then a spinning thread polls them too).
    pub fn has_fds(&self) -> bool {
        !self.fds.borrow().is_empty()
    }

    /// Whether the poll reported fds that Python has not taken yet.
    pub fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    /// Waits at most `timeout` (`None`: until woken) and collects fd readiness.
    /// Call it detached: it touches no Python object.
    pub fn wait(&self, timeout: Option<Duration>) {
        let mut events = self.events.borrow_mut();
        self.poll.wait(&mut events, timeout);
        let mut ready = self.ready.borrow_mut();
        for ev in events.iter() {
            if ev.token == WAKE {
                continue;
            }
            let mut mask = 0;
            if ev.read {
                mask |= READ;
            }
            if ev.write {
                mask |= WRITE;
            }
            let Ok(fd) = RawFd::try_from(ev.token - 1) else {
                continue;
            };
            ready.push((fd, mask));
        }
    }

    /// Watches `fd` for `mask` (replacing an earlier registration).
    pub fn watch(&self, fd: RawFd, mask: u8) -> io::Result<()> {
        let (read, write) =
            interest(mask).ok_or_else(|| io::Error::other("no events to watch for"))?;
        let mut fds = self.fds.borrow_mut();
        if fds.contains_key(&fd) {
            self.poll.modify(fd, token(fd), read, write)?;
        } else {
            self.poll.add(fd, token(fd), read, write)?;
        }
        fds.insert(fd, mask);
        Ok(())
    }

    /// Stops watching `fd`. A closed fd has left the poll already: that is no error.
    pub fn unwatch(&self, fd: RawFd) {
        if self.fds.borrow_mut().remove(&fd).is_some() {
            let _ = self.poll.delete(fd);
        }
        self.ready.borrow_mut().retain(|&(f, _)| f != fd);
    }

    /// Hands the collected readiness to Python, re-arming each fd (level-triggered).
    pub fn take_ready(&self) -> Vec<(RawFd, u8)> {
        let ready = std::mem::take(&mut *self.ready.borrow_mut());
        let fds = self.fds.borrow();
        let mut out = Vec::with_capacity(ready.len());
        for (fd, mask) in ready {
            let Some(&watched) = fds.get(&fd) else {
                continue;
            };
            if let Some((read, write)) = interest(watched) {
                let _ = self.poll.modify(fd, token(fd), read, write);
            }
            match out.iter_mut().find(|(f, _)| *f == fd) {
                Some((_, m)) => *m |= mask,
                None => out.push((fd, mask)),
            }
        }
        out
    }

    /// What the loop's selector returns: during a step, what was collected; otherwise
    /// (a loop run from inside a request, like `run_until_complete`) a real wait.
    pub fn select(&self, py: Python<'_>, timeout: Option<Duration>) -> Vec<(RawFd, u8)> {
        if !self.stepping.get() && !self.has_ready() {
            crate::python::detached(py, || self.wait(timeout));
        }
        self.take_ready()
    }
}

/// How the loop's tasks and streams answer Erlang: requests answered later than their
/// own turn (coroutine results, streams) are "open" until their final frame is sent.
pub struct Outlet {
    pub writer: Arc<Writer>,
    pub types: Rc<Types>,
    open: RefCell<HashSet<Vec<u8>>>,
    /// How many requests are open, for `pyport:info/1` (read on the router thread).
    open_count: Arc<AtomicUsize>,
}

/// Outbox entries (`_OUT_*` in erlang.py).
const OUT_RESULT: u8 = 0;
const OUT_RESULT_REF: u8 = 1;
const OUT_ITEM: u8 = 2;
const OUT_DONE: u8 = 3;
const OUT_ERROR: u8 = 4;

impl Outlet {
    pub fn new(writer: Arc<Writer>, types: Rc<Types>, open_count: Arc<AtomicUsize>) -> Self {
        Outlet {
            writer,
            types,
            open: RefCell::new(HashSet::new()),
            open_count,
        }
    }

    fn counted(&self, open: &HashSet<Vec<u8>>) {
        self.open_count.store(open.len(), Ordering::Relaxed);
    }

    /// A request will be answered later (a cast, with an empty header, never is).
    pub fn open(&self, header: &[u8]) {
        if !header.is_empty() {
            let mut open = self.open.borrow_mut();
            open.insert(header.to_vec());
            self.counted(&open);
        }
    }

    /// The request will not be answered by the loop: it failed before it was handed
    /// to the loop (its caller is answered by the usual path), or it was a stream and
    /// its consumer cancelled it (no frame of it follows).
    pub fn forget(&self, header: &[u8]) {
        self.close(header);
    }

    fn close(&self, header: &[u8]) -> bool {
        let mut open = self.open.borrow_mut();
        let was = open.remove(header);
        self.counted(&open);
        was
    }

    /// Answers every open request with `err` (the context is ending).
    pub fn fail_open(&self, err: &Error) {
        let open = std::mem::take(&mut *self.open.borrow_mut());
        self.open_count.store(0, Ordering::Relaxed);
        for header in open {
            self.writer.reply(&header, |w| err.write_reply(w));
        }
    }

    /// A stream item: `{data, Item}` as a non-final frame. An item that cannot be
    /// converted ends the stream with that error instead (returned as `Err`).
    pub fn item(&self, header: &[u8], item: &Bound<'_, PyAny>) -> Result<(), Error> {
        let mut frame = Vec::with_capacity(64);
        crate::framing::begin_frame(&mut frame, KIND_STREAM, header);
        let safe = {
            let mut w = etf::Writer::new(&mut frame);
            w.tuple_header(2);
            w.atom("data");
            convert::encode_term(&self.types, item, &mut w, 1)?;
            w.needs_safe_decode
        };
        if safe {
            crate::framing::mark_safe_decode(&mut frame);
        }
        crate::framing::finish_reply(&mut frame)?;
        self.writer.send(&frame);
        Ok(())
    }

    /// The final reply of an open request.
    fn finish(&self, header: &[u8], result: Result<Reply<'_, '_>, Error>) {
        if header.is_empty() {
            if let Err(e) = result {
                self.writer.fail(header, self.types.ctx, "warning", &e);
            }
            return;
        }
        if !self.close(header) {
            return; // answered already (the context failed it, or a duplicate)
        }
        let mut out = Vec::with_capacity(64);
        let encoded = match result {
            Ok(reply) => self.encode_reply(header, reply, &mut out),
            Err(e) => Err(e),
        };
        match encoded {
            Ok(()) => self.writer.send(&out),
            Err(e) => self.writer.reply(header, |w| e.write_reply(w)),
        }
    }

    fn encode_reply(
        &self,
        header: &[u8],
        reply: Reply<'_, '_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        crate::framing::begin_frame(out, crate::framing::KIND_REPLY, header);
        let mut w = etf::Writer::new(out);
        match reply {
            Reply::Done => w.atom("done"),
            Reply::Value(v) => {
                w.tuple_header(2);
                w.atom("ok");
                convert::encode_term(&self.types, v, &mut w, 1)?;
                if w.needs_safe_decode {
                    crate::framing::mark_safe_decode(out);
                }
            }
            Reply::Ref(v) => {
                let id = self.types.new_id();
                self.types.refs.insert(id, v.clone().unbind());
                w.tuple_header(2);
                w.atom("ok");
                w.tuple_header(2);
                w.atom("pyport_ref");
                w.int(id as i64);
            }
        }
        crate::framing::finish_reply(out)
    }

    /// Sends what the loop's last step produced (`loop._pyport_outbox`).
    fn drain(&self, py: Python<'_>, outbox: &Bound<'_, PyAny>) -> PyResult<()> {
        let entries = outbox.call_method0("_pyport_take")?;
        if entries.is_none() {
            return Ok(());
        }
        for entry in entries.try_iter()? {
            let entry = entry?;
            let entry = entry.cast::<PyTuple>()?;
            let tag: u8 = entry.get_item(0)?.extract()?;
            let header = entry.get_item(1)?;
            let header = header.cast::<PyBytes>()?.as_bytes();
            let value = entry.get_item(2)?;
            match tag {
                OUT_ITEM if self.is_open(header) => {
                    if let Err(e) = self.item(header, &value) {
                        // An item with no Erlang form ends the stream with that error.
                        self.finish(header, Err(e));
                        outbox.call_method1("_pyport_cancel", (PyBytes::new(py, header),))?;
                    }
                }
                OUT_ITEM => {}
                OUT_DONE => self.finish(header, Ok(Reply::Done)),
                OUT_ERROR => self.finish(header, Err(exception_error(py, &value))),
                OUT_RESULT | OUT_RESULT_REF => {
                    let result = task_result(py, &value);
                    let reply = match &result {
                        Ok(v) if tag == OUT_RESULT_REF => Ok(Reply::Ref(v)),
                        Ok(v) => Ok(Reply::Value(v)),
                        Err(e) => Err(e.clone()),
                    };
                    self.finish(header, reply);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether the request is still open (its stream was not closed by an error).
    pub fn is_open(&self, header: &[u8]) -> bool {
        self.open.borrow().contains(header)
    }
}

enum Reply<'a, 'py> {
    Value(&'a Bound<'py, PyAny>),
    Ref(&'a Bound<'py, PyAny>),
    Done,
}

/// An exception object as the error an Erlang caller sees.
fn exception_error(py: Python<'_>, exc: &Bound<'_, PyAny>) -> Error {
    let err = PyErr::from_value(exc.clone());
    if let Some(stopped) = err
        .get_type(py)
        .name()
        .ok()
        .and_then(|n| crate::error::stop_error(&n.to_string_lossy()))
    {
        return stopped;
    }
    crate::pyerr::to_error(py, &err)
}

/// The outcome of a finished task: its result, or its exception as an error. A task
/// cancelled by its deadline answers `timeout`.
fn task_result<'py>(py: Python<'py>, task: &Bound<'py, PyAny>) -> Result<Bound<'py, PyAny>, Error> {
    if task
        .call_method0("cancelled")
        .is_ok_and(|c| c.is_truthy().unwrap_or(false))
    {
        return Err(Error::Timeout);
    }
    match task.call_method0("exception") {
        Ok(exc) if exc.is_none() => task
            .call_method0("result")
            .map_err(|e| crate::pyerr::to_error(py, &e)),
        Ok(exc) => Err(exception_error(py, &exc)),
        Err(e) => Err(crate::pyerr::to_error(py, &e)),
    }
}

/// The asyncio loop of one context, created on first use, and when it wants a step.
pub struct EventLoop {
    pub reactor: Rc<Reactor>,
    pub outlet: Rc<Outlet>,
    /// When the loop wants its next step (ready callbacks: now; else its next timer).
    due: Cell<Option<Instant>>,
    /// Steps that raised in a row, and until when the loop is not stepped after the
    /// last of them (see [`EventLoop::step`]).
    failed_steps: Cell<u32>,
    backoff_until: Cell<Option<Instant>>,
}

/// The pause after a step that raised: doubled with every step in a row that raised,
/// from `STEP_BACKOFF_MIN` up to `STEP_BACKOFF_MAX`.
const STEP_BACKOFF_MIN: Duration = Duration::from_millis(1);
const STEP_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl EventLoop {
    pub fn new(reactor: Rc<Reactor>, outlet: Rc<Outlet>) -> Self {
        EventLoop {
            reactor,
            outlet,
            due: Cell::new(None),
            failed_steps: Cell::new(0),
            backoff_until: Cell::new(None),
        }
    }

    /// Whether the loop exists (a context that never used asyncio pays nothing).
    pub fn exists(&self) -> bool {
        self.reactor.py_loop.borrow().is_some()
    }

    /// Whether the loop is running one of its steps now (the caller is inside it).
    pub fn is_stepping(&self) -> bool {
        self.reactor.stepping.get()
    }

    /// When the loop needs a step, if ever (after a step that raised: not before its
    /// pause is over).
    pub fn due(&self) -> Option<Instant> {
        let due = if self.reactor.has_ready() {
            Some(Instant::now())
        } else {
            self.due.get()
        };
        match (due, self.backoff_until.get()) {
            (Some(d), Some(b)) => Some(d.max(b)),
            (due, _) => due,
        }
    }

    /// Whether a step is wanted now.
    pub fn wants_step(&self) -> bool {
        (self.reactor.has_ready() || self.due.get().is_some_and(|d| d <= Instant::now()))
            && !self.backing_off()
    }

    /// Whether the loop pauses after steps that raised: it is not stepped (nor is its fd
    /// readiness waited for) until the pause is over.
    pub fn backing_off(&self) -> bool {
        match self.backoff_until.get() {
            None => false,
            Some(b) if b > Instant::now() => true,
            Some(_) => false,
        }
    }

    /// After a request: if it scheduled callbacks on the loop, re-read when the loop is due.
    pub fn after_request(&self, py: Python<'_>) {
        if self.reactor.touched.replace(false) {
            self.refresh(py);
        }
    }

    /// Re-reads when the loop wants its next step (after Python code ran outside a step).
    pub fn refresh(&self, py: Python<'_>) {
        let Some(py_loop) = self.reactor.existing_loop(py) else {
            return;
        };
        let due = py_loop.call_method0("_pyport_due");
        self.set_due(due.ok().and_then(|d| d.extract::<f64>().ok()));
    }

    fn set_due(&self, seconds: Option<f64>) {
        self.due.set(match seconds {
            Some(s) if s >= 0.0 => Some(Instant::now() + Duration::from_secs_f64(s.min(1e6))),
            _ => None,
        });
    }

    /// Runs one iteration of the loop, then sends what it produced. Not re-entrant:
    /// returns false without stepping when called from inside a step.
    pub fn step(&self, py: Python<'_>) -> bool {
        if self.reactor.stepping.get() {
            return false;
        }
        let Some(py_loop) = self.reactor.existing_loop(py) else {
            return false;
        };
        let py_loop = &py_loop;
        self.reactor.stepping.set(true);
        let due = py_loop.call_method0("_pyport_step");
        self.reactor.stepping.set(false);
        if crate::fork::in_child() {
            self.end_forked_child(py, py_loop, due.err());
        }
        self.reactor.touched.set(false);
        match due {
            Ok(d) => {
                self.set_due(d.extract::<f64>().ok());
                self.failed_steps.set(0);
                self.backoff_until.set(None);
            }
            Err(e) => {
                // `_run_once` let an exception through (SystemExit from a callback, its
                // selector failing): report it and keep the loop; step again soon. A
                // step that raises again and again (a broken selector) would spin the
                // thread and flood the log: the pause before the next step doubles with
                // each one in a row, and only the 1st, 2nd, 4th, 8th... are logged.
                let failed = self.failed_steps.get().saturating_add(1);
                self.failed_steps.set(failed);
                let pause = STEP_BACKOFF_MIN
                    .saturating_mul(1 << (failed - 1).min(20))
                    .min(STEP_BACKOFF_MAX);
                let now = Instant::now();
                self.backoff_until.set(Some(now + pause));
                self.due.set(Some(now));
                if failed.is_power_of_two() {
                    let err = crate::pyerr::to_error(py, &e);
                    let again = if failed == 1 {
                        String::new()
                    } else {
                        format!(" ({failed} steps in a row; next step in {pause:?})")
                    };
                    self.outlet.writer.log(
                        "error",
                        0,
                        &format!("event loop step raised: {err}{again}"),
                    );
                }
            }
        }
        if let Err(e) = self.outlet.drain(py, py_loop) {
            let err = crate::pyerr::to_error(py, &e);
            self.outlet
                .writer
                .log("error", 0, &format!("event loop outbox: {err}"));
        }
        true
    }

    /// A task forked during the step just run, and this is the child, back in the loop:
    /// it ends here, as a child forked by a request ends when the request returns
    /// (src/fork.rs). Its status comes from what raised out of the step (a
    /// `SystemExit`), else from the task that forked (`_pyport_forked_task`, noted by
    /// erlang.py as the child starts) if it ended, else 0: a task that awaited after
    /// the fork does not go on in the child.
    fn end_forked_child(
        &self,
        py: Python<'_>,
        py_loop: &Bound<'_, PyAny>,
        raised: Option<PyErr>,
    ) -> ! {
        let outcome = match raised {
            Some(e) => Some(crate::pyerr::to_error(py, &e)),
            None => py_loop
                .getattr("_pyport_forked_task")
                .ok()
                .filter(|task| {
                    task.call_method0("done")
                        .is_ok_and(|d| d.is_truthy().unwrap_or(false))
                })
                .and_then(|task| task_result(py, &task).err()),
        };
        crate::fork::end_child(py, outcome.as_ref().map_or(Ok(()), Err))
    }

    /// Calls `method(*args)` on the loop (a pyport helper of `erlang._Loop`), then sends
    /// what it produced and re-reads when the loop is due.
    pub fn call<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        args: impl pyo3::call::PyCallArgs<'py>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py_loop = self.reactor.py_loop(py)?;
        let result = py_loop.call_method1(method, args);
        let _ = self.outlet.drain(py, &py_loop);
        self.reactor.touched.set(false);
        self.refresh(py);
        result
    }

    /// Ends the loop: every open request is answered with `err`, tasks are cancelled
    /// and given a few steps to run their `finally` blocks, then the loop is closed.
    pub fn close(&self, py: Python<'_>, err: &Error) {
        self.outlet.fail_open(err);
        let taken = self.reactor.py_loop.borrow_mut().take();
        if let Some(py_loop) = taken {
            let py_loop = py_loop.bind(py);
            if let Err(e) = py_loop.call_method0("_pyport_shutdown") {
                let err = crate::pyerr::to_error(py, &e);
                self.outlet
                    .writer
                    .log("warning", 0, &format!("event loop shutdown: {err}"));
            }
        }
    }
}
