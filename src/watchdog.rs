//! Deadlines: interrupts Python code that runs past its request's `timeout`.
//!
//! Each context publishes the deadline of the request it runs (atomics in its
//! [`Deadline`]). One watchdog thread sleeps until the earliest deadline; it is poked
//! only when a new deadline is earlier than the one it sleeps for, so the usual 30 s
//! deadlines cost an uncontended lock and a few atomic stores per request. At a deadline
//! it asks the interpreter to run [`interrupt`] at its next bytecode boundary
//! (`_PyEval_AddPendingCall`, CPython's own mechanism for signals, reaching the target
//! in well under a millisecond), which raises `erlang.CallTimeout` in the overrunning
//! code if that request's own code is what runs then. Code blocked in C (a blocking socket, a C library) is not interrupted until it
//! returns; the waits pyport owns (`time.sleep` on a context thread, `erlang.call`,
//! channel receives) watch the same state and give up at once.
//!
//! `pyport:interrupt/1` uses the same path with `erlang.Interrupted`.
//!
//! A stop reaches its own request only. While a request waits in one of pyport's waits
//! it is *parked* ([`Deadline::park`]): the context thread runs other code meanwhile
//! (the loop's tasks and stream pumps, nested requests), and the interrupt is not
//! raised into that code. The parked request's wait sees the stop (or its own deadline
//! passed) and raises it there, when control is back in that request. The interrupt
//! raises only while the request's own code is what runs ([`Deadline::code`]).

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use pyo3::ffi;

use crate::sync::Unpoison;

/// The running request of one context, as the watchdog sees it.
pub struct Deadline {
    /// Sequence number of the running request; 0 when idle.
    running: AtomicU64,
    /// The request whose own Python code runs on the context thread now; 0 when the
    /// thread runs anything else (between requests, the loop's tasks and stream pumps)
    /// or the running request is parked in a pyport wait.
    code: AtomicU64,
    /// The last request whose stop its own wait raised (no interrupt raises it again).
    delivered: AtomicU64,
    next_seq: AtomicU64,
    /// Nanoseconds since the watchdog's epoch; 0 for none.
    at: AtomicU64,
    /// The context's interpreter and thread, set when its loop starts and cleared (under
    /// `bound`) before the interpreter ends.
    interp: AtomicPtr<ffi::PyInterpreterState>,
    /// Held while an interrupt is queued on `interp`, and while `interp` is cleared: the
    /// interpreter cannot end while a pending call is being added to it.
    bound: Mutex<()>,
    thread_ident: AtomicU64,
    /// Set when an interrupt went to another thread of the interpreter with
    /// `PyThreadState_SetAsyncExc`, so the context thread must clear a stray one.
    async_sent: AtomicU64,
    /// The sequence number of the last request whose deadline fired.
    fired: AtomicU64,
    /// The sequence number of the last request `pyport:interrupt/1` stopped.
    interrupted: AtomicU64,
    /// Wakes a `time.sleep` of the context thread when its request is stopped.
    sleeper: (Mutex<()>, Condvar),
    /// See [`Deadline::switching`].
    switch: Mutex<()>,
    /// When a request whose deadline fired counts as stuck if it still runs (nanos
    /// since the watchdog's epoch; 0 for none), and which request that is.
    stuck_at: AtomicU64,
    stuck_seq: AtomicU64,
    /// How long past its deadline a request may run before it is stuck (0: never).
    stuck_after: AtomicU64,
    /// Called (on the watchdog thread) when the running request is stuck.
    on_stuck: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Wakes the context thread if it sleeps (it may wait for a callback that hangs).
    wake: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline {
            running: AtomicU64::new(0),
            code: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            next_seq: AtomicU64::new(0),
            at: AtomicU64::new(0),
            interp: AtomicPtr::new(std::ptr::null_mut()),
            bound: Mutex::new(()),
            thread_ident: AtomicU64::new(0),
            async_sent: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            interrupted: AtomicU64::new(0),
            sleeper: (Mutex::new(()), Condvar::new()),
            switch: Mutex::new(()),
            stuck_at: AtomicU64::new(0),
            stuck_seq: AtomicU64::new(0),
            stuck_after: AtomicU64::new(0),
            on_stuck: OnceLock::new(),
            wake: OnceLock::new(),
        }
    }
}

/// A request parked in a wait (see [`Deadline::park`]): its number (0: the waiting
/// code is no request's) and its deadline (0: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Parked {
    pub seq: u64,
    at: u64,
}

/// Why a running request was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Its deadline passed: `erlang.CallTimeout`.
    Timeout,
    /// `pyport:interrupt/1`: `erlang.Interrupted`.
    Interrupted,
}

impl StopReason {
    /// The `erlang` module's exception class for it, and its message.
    pub fn exception(self) -> (&'static std::ffi::CStr, &'static std::ffi::CStr) {
        match self {
            StopReason::Timeout => (c"CallTimeout", c"the call ran past its timeout"),
            StopReason::Interrupted => (c"Interrupted", c"interrupted by pyport:interrupt/1"),
        }
    }
}

impl Deadline {
    /// Whether request `seq` was stopped, and why.
    pub fn stopped(&self, seq: u64) -> Option<StopReason> {
        if seq == 0 {
            None
        } else if self.interrupted.load(Ordering::SeqCst) == seq {
            Some(StopReason::Interrupted)
        } else if self.fired.load(Ordering::SeqCst) == seq {
            Some(StopReason::Timeout)
        } else {
            None
        }
    }

    /// A request still running `after` past its deadline (code blocked inside C, which
    /// no interrupt reaches) makes the watchdog call `on_stuck`.
    pub fn on_stuck(&self, after: Duration, on_stuck: Box<dyn Fn() + Send + Sync>) {
        self.stuck_after
            .store(after.as_nanos() as u64, Ordering::SeqCst);
        let _ = self.on_stuck.set(on_stuck);
    }

    /// `pyport:interrupt/1`: stops the request running now, if any (from any thread).
    pub fn interrupt(self: &Arc<Self>) {
        let seq = {
            let _switch = self.switching();
            let seq = self.running.load(Ordering::SeqCst);
            if seq == 0 {
                return;
            }
            self.interrupted.store(seq, Ordering::SeqCst);
            seq
        };
        self.stop(seq, StopReason::Interrupted);
    }

    /// Raises the stop in the running request at its next bytecode boundary, and wakes
    /// the context thread if it waits (in its poll, or in `time.sleep`).
    fn stop(self: &Arc<Self>, seq: u64, why: StopReason) {
        if crate::test_hooks() {
            std::thread::sleep(Duration::from_millis(20)); // see `crate::TEST_HOOKS`
        }
        request_interrupt(self, Arc::downgrade(self), seq, why);
        if let Some(wake) = self.wake.get() {
            wake();
        }
        let _guard = self.sleeper.0.lock().unpoison();
        self.sleeper.1.notify_all();
    }

    /// `time.sleep` on the context thread, for the parked request `parked`: waits
    /// until `until`, or returns early with the reason the request was stopped. Call
    /// it detached.
    pub fn sleep(&self, parked: Parked, until: Instant) -> Option<StopReason> {
        let mut guard = self.sleeper.0.lock().unpoison();
        loop {
            if let Some(why) = self.given_up(parked) {
                return Some(why);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = self.sleeper.1.wait_timeout(guard, left).unpoison().0;
        }
    }

    /// Called on the context thread, attached, when its loop starts; `wake` wakes it
    /// from its sleep.
    pub fn bind_thread(self: &Arc<Self>, wake: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wake.set(wake);
        // SAFETY: attached, so there is a current interpreter and thread.
        unsafe {
            self.interp
                .store(ffi::PyInterpreterState_Get(), Ordering::SeqCst);
            self.thread_ident
                .store(ffi::PyThread_get_thread_ident() as u64, Ordering::SeqCst);
        }
        watchdog().watch(Arc::downgrade(self));
    }

    /// Called on the context thread when its loop is over, before its interpreter ends
    /// (`Py_EndInterpreter`): no interrupt is queued on that interpreter after this
    /// returns. The watchdog (and `pyport:interrupt/1`) may still hold this `Deadline`
    /// (they upgrade their weak reference before they act), so the pointer is cleared
    /// under the same lock [`request_interrupt`] holds while it queues a call.
    pub fn unbind_thread(&self) {
        let _bound = self.bound.lock().unpoison();
        self.interp.store(std::ptr::null_mut(), Ordering::SeqCst);
    }

    /// A request starts; `deadline` is when it must be done; `on_behalf`: it is
    /// re-entrant (see below). Returns its sequence number, or `None` if the deadline
    /// has already passed (the caller gave up).
    pub fn begin(&self, deadline: Option<Instant>, on_behalf: bool) -> Option<u64> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let wd = watchdog();
        let at = match deadline {
            None => 0,
            Some(d) if d <= Instant::now() => return None,
            Some(d) => wd.nanos(d).max(1),
        };
        // A re-entrant request (one the Erlang code that an outer request called with
        // `erlang.call` made) runs on the outer one's behalf: it gets the earlier of
        // the two deadlines, so the outer deadline keeps running while it runs. An
        // unrelated request served while the outer one waits keeps its own: the outer
        // deadline, maybe past already, is not its business.
        let at = {
            let _switch = self.switching();
            let outer_at = if on_behalf {
                self.at.load(Ordering::SeqCst)
            } else {
                0
            };
            let at = match (at, outer_at) {
                (0, outer) => outer,
                (own, 0) => own,
                (own, outer) => own.min(outer),
            };
            self.running.store(seq, Ordering::SeqCst);
            self.code.store(seq, Ordering::SeqCst);
            self.at.store(at, Ordering::SeqCst);
            at
        };
        if at != 0 {
            wd.poke_if_earlier(at);
        }
        Some(seq)
    }

    /// The request `seq` is done; `outer` is the request it was nested in (0 if none),
    /// which runs again with its own deadline `outer_at`. A nested request only runs
    /// while the outer one is parked in a wait: no request's own code runs now.
    pub fn end(&self, outer: u64, outer_at: u64) {
        {
            let _switch = self.switching();
            self.running.store(outer, Ordering::SeqCst);
            self.code.store(0, Ordering::SeqCst);
            self.at.store(outer_at, Ordering::SeqCst);
        }
        if outer_at != 0 {
            watchdog().poke_if_earlier(outer_at);
        }
        self.clear_async_exception();
    }

    /// Clears an interrupt another thread aimed at the context thread with
    /// `PyThreadState_SetAsyncExc` and that was not raised yet. Call it on the context
    /// thread, attached.
    fn clear_async_exception(&self) {
        if self.async_sent.swap(0, Ordering::SeqCst) != 0 {
            // SAFETY: clears a pending async exception of this very thread (we are the
            // context thread, attached); NULL means "clear".
            unsafe {
                ffi::PyThreadState_SetAsyncExc(
                    ffi::PyThread_get_thread_ident() as _,
                    std::ptr::null_mut(),
                );
            }
        }
    }

    /// The code of the context thread enters one of pyport's waits (`erlang.call`, a
    /// channel receive, `time.sleep`), in which other code may run. If that code is a
    /// request's own, the request is parked until [`Deadline::unpark`]: no interrupt
    /// is raised meanwhile (it would land in whatever runs), and the wait watches
    /// [`Deadline::given_up`] instead. A wait of other code (a task, a stream pump)
    /// parks nothing: a request's deadline is none of its business. Call it on the
    /// context thread, attached.
    pub fn park(&self) -> Parked {
        let parked = {
            // With the lock, an interrupt sent from another thread of the interpreter
            // (which holds it) was either sent before, and is cleared below, or sees
            // the request parked and is not sent.
            let _switch = self.switching();
            let seq = self.code.swap(0, Ordering::SeqCst);
            let at = if seq != 0 && self.running.load(Ordering::SeqCst) == seq {
                self.at.load(Ordering::SeqCst)
            } else {
                0
            };
            Parked { seq, at }
        };
        self.clear_async_exception();
        parked
    }

    /// The wait of [`Deadline::park`] is over: the parked request's code runs again.
    pub fn unpark(&self, parked: Parked) {
        self.code.store(parked.seq, Ordering::SeqCst);
    }

    /// Runs pyport's own Python code in the middle of a request (handing a stream or a
    /// coroutine to the loop) as no request's code: a stop raised into it would leave
    /// the loop's bookkeeping half done (a stream registered without its task, whose
    /// caller then waits for items that never come). A stop that comes meanwhile is
    /// left to the request's own code, if any runs after.
    pub fn outside_request<R>(&self, f: impl FnOnce() -> R) -> R {
        let parked = self.park();
        let result = f();
        self.unpark(parked);
        result
    }

    /// Whether the request parked in a wait must stop, and why: it was stopped (its
    /// deadline fired, or `pyport:interrupt/1`), or its own deadline has passed (it may
    /// have passed while a nested request ran, or fired for a request nested on its
    /// behalf). `None` for a wait of no request.
    pub fn given_up(&self, parked: Parked) -> Option<StopReason> {
        if parked.seq == 0 {
            return None;
        }
        if let Some(why) = self.stopped(parked.seq) {
            return Some(why);
        }
        (parked.at != 0 && watchdog().nanos(Instant::now()) >= parked.at)
            .then_some(StopReason::Timeout)
    }

    /// The wait of request `seq` raises its stop now: no interrupt raises it again.
    pub fn delivered(&self, seq: u64) {
        self.delivered.store(seq, Ordering::SeqCst);
    }

    /// The request whose own code runs on the context thread now (0: none).
    pub fn code(&self) -> u64 {
        self.code.load(Ordering::SeqCst)
    }

    /// Held while the running request and its deadline change together, and while the
    /// watchdog reads them: it must never see one request's deadline with another's
    /// number (it would stop a request that is not late).
    fn switching(&self) -> std::sync::MutexGuard<'_, ()> {
        self.switch.lock().unpoison()
    }

    /// The running request and its deadline, to restore after a nested one.
    pub fn current(&self) -> (u64, u64) {
        (
            self.running.load(Ordering::SeqCst),
            self.at.load(Ordering::SeqCst),
        )
    }
}

struct Watchdog {
    epoch: Instant,
    watched: Mutex<Vec<Weak<Deadline>>>,
    poke: Condvar,
    /// When the watchdog will wake next (nanos since epoch; u64::MAX for never).
    next_wake: AtomicU64,
    /// Bumped by every new deadline, so a pass that ran meanwhile (and may have read
    /// the old one) looks again instead of sleeping past the new one.
    generation: AtomicU64,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let wd: &'static Watchdog = Box::leak(Box::new(Watchdog {
            epoch: Instant::now(),
            watched: Mutex::new(Vec::new()),
            poke: Condvar::new(),
            next_wake: AtomicU64::new(u64::MAX),
            generation: AtomicU64::new(0),
        }));
        std::thread::Builder::new()
            .name("pyport-watchdog".into())
            .spawn(move || wd.run())
            .expect("watchdog thread starts");
        wd
    })
}

impl Watchdog {
    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn watch(&self, d: Weak<Deadline>) {
        self.watched.lock().unpoison().push(d);
    }

    fn poke_if_earlier(&self, at: u64) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if at < self.next_wake.load(Ordering::SeqCst) {
            let _guard = self.watched.lock().unpoison();
            self.next_wake.store(at, Ordering::SeqCst);
            self.poke.notify_one();
        }
    }

    fn run(&self) {
        let mut watched = self.watched.lock().unpoison();
        loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let now = self.nanos(Instant::now());
            let mut earliest = u64::MAX;
            let mut stuck = Vec::new();
            watched.retain(|w| {
                let Some(d) = w.upgrade() else { return false };
                let switch = d.switching();
                let at = d.at.load(Ordering::SeqCst);
                if at != 0 && at <= now {
                    d.at.store(0, Ordering::SeqCst);
                    let seq = d.running.load(Ordering::SeqCst);
                    d.fired.store(seq, Ordering::SeqCst);
                    drop(switch);
                    d.stop(seq, StopReason::Timeout);
                    let after = d.stuck_after.load(Ordering::SeqCst);
                    if after != 0 {
                        d.stuck_seq.store(seq, Ordering::SeqCst);
                        d.stuck_at.store(now + after, Ordering::SeqCst);
                    }
                } else if at != 0 {
                    earliest = earliest.min(at);
                }
                let stuck_at = d.stuck_at.load(Ordering::SeqCst);
                if stuck_at != 0 && stuck_at <= now {
                    d.stuck_at.store(0, Ordering::SeqCst);
                    let seq = d.stuck_seq.load(Ordering::SeqCst);
                    if seq != 0 && d.running.load(Ordering::SeqCst) == seq {
                        stuck.push(d.clone());
                    }
                } else if stuck_at != 0 {
                    earliest = earliest.min(stuck_at);
                }
                true
            });
            if !stuck.is_empty() {
                // Outside the lock: replacing a context starts threads that register here.
                drop(watched);
                for d in stuck {
                    if let Some(on_stuck) = d.on_stuck.get() {
                        on_stuck();
                    }
                }
                watched = self.watched.lock().unpoison();
                continue;
            }
            self.next_wake.store(earliest, Ordering::SeqCst);
            if self.generation.load(Ordering::SeqCst) != generation {
                // A deadline was set during the pass: it may not have been seen.
                continue;
            }
            watched = if earliest == u64::MAX {
                self.poke.wait(watched).unpoison()
            } else {
                let wait = Duration::from_nanos(earliest - now);
                self.poke.wait_timeout(watched, wait).unpoison().0
            };
        }
    }
}

struct Interrupt {
    target: Weak<Deadline>,
    seq: u64,
    why: StopReason,
}

/// Asks the interpreter to stop request `seq` (if it still runs then).
fn request_interrupt(d: &Deadline, target: Weak<Deadline>, seq: u64, why: StopReason) {
    let _bound = d.bound.lock().unpoison();
    let interp = d.interp.load(Ordering::SeqCst);
    if interp.is_null() || seq == 0 {
        return;
    }
    let arg = Box::into_raw(Box::new(Interrupt { target, seq, why })) as *mut c_void;
    // SAFETY: `interp` is alive: the context thread clears it under `bound` (which we
    // hold) before it ends the interpreter (`Deadline::unbind_thread`), so a non-null
    // pointer read under the lock names a live interpreter until we release it. The
    // callback frees `arg`; if the queue of pending calls is full, free it here. (A
    // call still queued when the interpreter ends either runs then, finds its request
    // over and only frees `arg`, or is dropped with the queue: `arg` leaks, a few
    // bytes, on that race only.)
    unsafe {
        if _PyEval_AddPendingCall(interp, interrupt, arg, 0) != 0 {
            drop(Box::from_raw(arg as *mut Interrupt));
        }
    }
}

extern "C" {
    /// CPython's (exported, internal) per-interpreter pending call queue.
    fn _PyEval_AddPendingCall(
        interp: *mut ffi::PyInterpreterState,
        func: extern "C" fn(*mut c_void) -> c_int,
        arg: *mut c_void,
        flags: c_int,
    ) -> c_int;
}

/// Runs in the target interpreter, attached, at a bytecode boundary.
extern "C" fn interrupt(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` was made by `Box::into_raw` in `request_interrupt`, used once.
    let Interrupt { target, seq, why } = *unsafe { Box::from_raw(arg as *mut Interrupt) };
    let Some(d) = target.upgrade() else { return 0 };
    // Raised only into that request's own code: not once it is over (the next request
    // would be hit), nor while it is parked in a wait (the code running then is a task,
    // a stream pump or a nested request; the wait raises the stop itself), nor after
    // its wait raised it already.
    let aimed =
        || d.code.load(Ordering::SeqCst) == seq && d.delivered.load(Ordering::SeqCst) != seq;
    if !aimed() {
        return 0;
    }
    // SAFETY: attached to the target interpreter (pending calls run attached).
    unsafe {
        let (name, message) = why.exception();
        let class = exception_class(name);
        if class.is_null() {
            ffi::PyErr_Clear();
            return 0;
        }
        let ident = d.thread_ident.load(Ordering::SeqCst);
        let result = if ffi::PyThread_get_thread_ident() as u64 == ident {
            // At a bytecode boundary of the context thread, whose code is the request's.
            ffi::PyErr_SetString(class, message.as_ptr());
            -1
        } else {
            // Another Python thread of that interpreter runs: aim at the context thread,
            // unless the request parked meanwhile (`park` clears what was sent before).
            let _switch = d.switching();
            if aimed() {
                d.async_sent.store(1, Ordering::SeqCst);
                ffi::PyThreadState_SetAsyncExc(ident as _, class);
            }
            0
        };
        ffi::Py_DECREF(class);
        result
    }
}

/// `erlang.<name>` of the current interpreter (a new reference, or NULL).
unsafe fn exception_class(name: &std::ffi::CStr) -> *mut ffi::PyObject {
    // SAFETY: attached; plain C API calls with checked results.
    unsafe {
        let module = ffi::PyImport_ImportModule(c"erlang".as_ptr());
        if module.is_null() {
            return std::ptr::null_mut();
        }
        let class = ffi::PyObject_GetAttrString(module, name.as_ptr());
        ffi::Py_DECREF(module);
        class
    }
}
