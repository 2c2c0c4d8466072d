//! Context threads: each owns one interpreter for its whole life (an OWN_GIL
//! sub-interpreter, or the shared main interpreter) and serves its mailbox in order.
//!
//! Frames are routed into a context's bounded [`Mailbox`], which wakes the thread only if
//! it sleeps. A thread that runs out of work spins for a short, bounded while (GIL
//! released, yielding the CPU between tries) before it sleeps in its own poll,
//! because a sleeping thread costs tens of microseconds of wake-up latency (docs/architecture.md, "Latency").
//! While it spins it also reads stdin itself through the shared [`Inbox`]: a request for
//! an idle context is then read, served and answered by that one thread, with no hop.
//! (The router implements [`Inbox`]; this module knows it only by that trait, so the
//! arrow goes one way: router -> context.)

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::erlang_module::{self, Link, NestedServe};
use crate::error::{panic_message, stop_error, Error};
use crate::event_loop::{Reactor, WAKE};
use crate::poller::{Poller, Waker};
use crate::python::{detached, SubInterpreter};
use crate::request::{Job, Kind, Mode};
use crate::session::{Passed, Served, Session};
use crate::sync::Unpoison;
use crate::watchdog::{Deadline, StopReason};
use crate::writer::Writer;

/// How long an idle context spins before it sleeps: adaptive between these bounds. It
/// doubles when work came while spinning and shrinks by 1/8 when the spin was in vain,
/// so a steady stream of requests (even a jittery one) meets a spinning thread, while
/// sparse traffic soon costs a few microseconds of CPU per request instead of 200.
const SPIN_MAX_US: u32 = 200;
const SPIN_MIN_US: u32 = 5;
/// How deep a context waiting in `erlang.call` nests requests that are not re-entrant
/// (not made by the Erlang code that Python called): beyond it only re-entrant ones,
/// which re-entrancy needs, are served. Under a load of callbacks, serving everything
/// while waiting nested unrelated requests until Python's recursion limit.
const MAX_NESTED_UNRELATED: usize = 16;
/// For this long a spinning context tries stdin back to back; after that it yields the
/// core between tries. The caller of a sequence of requests sends the next one within
/// a few microseconds of its reply, and a yield can hand the core to another thread for
/// far longer than that; but past this, the yields leave the cores to the BEAM.
const EAGER_SPIN: Duration = Duration::from_micros(15);

/// How often a spinning context polls the event loop's fds.
const FD_POLL_WHILE_SPINNING: Duration = Duration::from_micros(50);

/// What a context thread needs of the router: the shared stdin it reads while it spins
/// (see `router::Inbox`), and the writer of outbound frames.
pub trait Inbox: Send + Sync {
    /// Reads and routes what stdin has, unless another thread is doing it right now.
    /// False when another thread is reading stdin right now.
    fn try_pump(&self) -> bool;
    /// A context starts spinning (it takes stdin over from the router if need be).
    fn spin_enter(&self);
    /// A spinning context found work.
    fn spin_to_work(&self);
    /// A spinning context goes to sleep.
    fn spin_to_sleep(&self);
    fn writer(&self) -> &Arc<Writer>;
    /// The request `stuck` runs is blocked past its deadline plus `stuck_after`
    /// (called on the watchdog thread): replace the context.
    fn replace_stuck(&self, ctx: u64, stuck: &Arc<Mailbox>);
}

/// Context threads abandoned while stuck in C that have not ended yet.
static ABANDONED_THREADS: AtomicUsize = AtomicUsize::new(0);

/// How many abandoned context threads still run.
pub fn abandoned_threads() -> usize {
    ABANDONED_THREADS.load(Ordering::SeqCst)
}

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const DEAD: u8 = 2;

/// The queue between the router and one context thread.
pub struct Mailbox {
    queue: Mutex<VecDeque<Job>>,
    capacity: usize,
    waker: Waker,
    sleeping: AtomicBool,
    /// Why the context is dead, once it is.
    death: Mutex<String>,
    /// The running request's deadline, for the watchdog.
    deadline: Arc<Deadline>,
    /// The context's link to Erlang, once its session started.
    link: std::sync::OnceLock<Arc<Link>>,
    /// Jobs queued, readable without the lock (for spinning).
    queued: AtomicUsize,
    /// Re-entrant jobs among them.
    reentrant_queued: AtomicUsize,
    /// The current spin budget in microseconds (see `SPIN_MAX_US`).
    spin_us: std::sync::atomic::AtomicU32,
    state: AtomicU8,
    /// How long a request may run past its deadline before the context is replaced.
    stuck_after: Option<Duration>,
    /// Set when the context was replaced while stuck: its thread ends once it returns.
    abandoned: AtomicBool,
    /// Requests served, and how many of them answered an error / `timeout`.
    served: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    /// How many times the context got a new interpreter (stuck in C).
    replaced: AtomicU64,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.queue.lock().unpoison()
    }

    /// Queues a job; gives it back if the queue is full or the context is dead.
    // The job is handed back (not boxed) so the caller can answer it; this is cold.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, job: Job) -> Result<(), (Job, Error)> {
        if self.is_dead() {
            let reason = self.death.lock().unpoison().clone();
            return Err((job, Error::ContextDown(reason)));
        }
        {
            let mut q = self.lock();
            if q.len() >= self.capacity && matches!(job.kind, Kind::Request { gives_back: false }) {
                return Err((job, Error::Overloaded));
            }
            if job.reentrant {
                self.reentrant_queued.fetch_add(1, Ordering::SeqCst);
            }
            q.push_back(job);
            self.queued.store(q.len(), Ordering::SeqCst);
        }
        self.wake_if_sleeping();
        Ok(())
    }

    /// The next job; with `only_reentrant`, the first re-entrant one (see
    /// `MAX_NESTED_UNRELATED`).
    fn pop(&self, only_reentrant: bool) -> Option<Job> {
        if self.is_empty() || (only_reentrant && !self.has_reentrant()) {
            return None;
        }
        let mut q = self.lock();
        let at = if only_reentrant {
            q.iter().position(|j| j.reentrant)?
        } else {
            0
        };
        let job = q.remove(at);
        self.queued.store(q.len(), Ordering::SeqCst);
        if job.as_ref().is_some_and(|j| j.reentrant) {
            self.reentrant_queued.fetch_sub(1, Ordering::SeqCst);
        }
        job
    }

    fn is_empty(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == 0
    }

    fn has_reentrant(&self) -> bool {
        self.reentrant_queued.load(Ordering::SeqCst) != 0
    }

    /// Whether a job `pop(only_reentrant)` would take may be queued.
    fn has_work(&self, only_reentrant: bool) -> bool {
        if only_reentrant {
            self.has_reentrant()
        } else {
            !self.is_empty()
        }
    }

    pub fn is_dead(&self) -> bool {
        self.state.load(Ordering::SeqCst) == DEAD
    }

    fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    /// The context is being replaced (its thread is stuck in C): hands back the jobs it
    /// still holds, for its replacement, and lets its thread end when it returns.
    pub fn abandon(&self) -> Vec<Job> {
        self.abandoned.store(true, Ordering::SeqCst);
        ABANDONED_THREADS.fetch_add(1, Ordering::SeqCst);
        let mut q = self.lock();
        self.queued.store(0, Ordering::SeqCst);
        self.reentrant_queued.store(0, Ordering::SeqCst);
        q.drain(..).collect()
    }

    /// Waits until the queue may hold something (a re-entrant job, with
    /// `only_reentrant`), `ready()` holds, `due` passes, or
    /// (`with_loop`: the event loop may step here) the loop has work: fd events or
    /// channel news. Spins first (reading stdin when no other thread is, and polling
    /// the loop's fds if it has any), then sleeps in the reactor's poll.
    fn wait(
        &self,
        inbox: &dyn Inbox,
        reactor: &Reactor,
        ready: &dyn Fn() -> bool,
        only_reentrant: bool,
        with_loop: bool,
        due: Option<Instant>,
    ) {
        let budget = self.spin_us.load(Ordering::Relaxed);
        let mut until = Instant::now() + Duration::from_micros(budget.into());
        if let Some(d) = due {
            until = until.min(d);
        }
        let link = self.link.get();
        let loop_work =
            || with_loop && (reactor.has_ready() || link.is_some_and(|l| l.channels.changed()));
        let async_results = || link.is_some_and(|l| l.callbacks.has_async_results());
        let idle =
            || !self.has_work(only_reentrant) && !ready() && !loop_work() && !async_results();
        let poll_fds = with_loop && reactor.has_fds();
        let mut next_fd_poll = Instant::now();
        let eager_until = Instant::now() + EAGER_SPIN;
        inbox.spin_enter();
        loop {
            let now = Instant::now();
            if !idle() || now >= until {
                break;
            }
            let pumped = inbox.try_pump();
            // The loop's fds (its self-pipe at least) are polled now and then, not on
            // every try: a syscall per try would slow the plain request's pick-up.
            if poll_fds && now >= next_fd_poll {
                reactor.wait(Some(Duration::ZERO));
                next_fd_poll = now + FD_POLL_WHILE_SPINNING;
            }
            if !idle() {
                break;
            }
            // Another context thread reading stdin will route this one's requests to
            // it: no need to hold the core meanwhile.
            if !pumped || now >= eager_until {
                std::thread::yield_now();
            }
        }
        if !idle() {
            inbox.spin_to_work();
            self.spin_us
                .store((budget * 2).min(SPIN_MAX_US), Ordering::Relaxed);
            return;
        }
        inbox.spin_to_sleep();
        self.spin_us
            .store((budget - budget / 8).max(SPIN_MIN_US), Ordering::Relaxed);
        self.sleeping.store(true, Ordering::SeqCst);
        if idle() {
            reactor.wait(due.map(|d| d.saturating_duration_since(Instant::now())));
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Delivers the result of an `erlang.call` made in this context and wakes the thread
    /// if it sleeps (it may be the one waiting).
    pub fn deliver_callback(&self, id: u64, term: Vec<u8>) {
        if let Some(link) = self.link.get() {
            link.callbacks.deliver(id, term);
            self.wake_if_sleeping();
        }
    }

    /// This mailbox replaces `old` (a stuck context's): the context's counters go on.
    pub fn replaces(&self, old: &Mailbox) {
        for (new, old) in [
            (&self.served, &old.served),
            (&self.errors, &old.errors),
            (&self.timeouts, &old.timeouts),
        ] {
            new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.replaced
            .store(old.replaced.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn count(&self, outcome: Outcome) {
        self.served.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Error => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Timeout => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `#{requests, errors, timeouts, replaced, queued, running, open, channels}` for
    /// `pyport:info/1`.
    pub fn stats(&self) -> crate::etf::Term {
        use crate::etf::Term;
        let n = |a: &AtomicU64| Term::Int(a.load(Ordering::Relaxed) as i64);
        Term::Map(vec![
            (Term::atom("requests"), n(&self.served)),
            (Term::atom("errors"), n(&self.errors)),
            (Term::atom("timeouts"), n(&self.timeouts)),
            (Term::atom("replaced"), n(&self.replaced)),
            (
                Term::atom("queued"),
                Term::Int(self.queued.load(Ordering::Relaxed) as i64),
            ),
            (
                Term::atom("running"),
                Term::boolean(self.deadline.current().0 != 0),
            ),
            (
                Term::atom("open"),
                Term::Int(
                    self.link
                        .get()
                        .map_or(0, |l| l.open_requests.load(Ordering::Relaxed) as i64),
                ),
            ),
            (
                Term::atom("channels"),
                Term::Int(self.link.get().map_or(0, |l| l.channels.count() as i64)),
            ),
        ])
    }

    /// Erlang dropped a send of this context to destination `id`: it is busy (`busy`
    /// true) until Erlang clears it (false).
    pub fn send_busy(&self, id: u64, busy: bool) {
        if let Some(link) = self.link.get() {
            if busy {
                link.sends.busy(id);
            } else {
                link.sends.clear(id);
            }
        }
    }

    /// `pyport:interrupt/1`: stops the request this context runs now.
    pub fn interrupt(&self) {
        self.deadline.interrupt();
    }

    /// Delivers an item (`Some`) or the close (`None`) of channel `id` of this context.
    pub fn deliver_channel(&self, id: u64, item: Option<Vec<u8>>) {
        if let Some(link) = self.link.get() {
            match item {
                Some(term) => link.channels.push(id, term),
                None => link.channels.close(id),
            }
            self.wake_if_sleeping();
        }
    }

    pub fn wake_if_sleeping(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// Marks the context dead and answers everything still queued.
    fn fail_all(&self, writer: &Writer, reason: &str) {
        *self.death.lock().unpoison() = reason.to_string();
        self.state.store(DEAD, Ordering::SeqCst);
        let jobs: Vec<Job> = {
            let mut q = self.lock();
            self.queued.store(0, Ordering::SeqCst);
            self.reentrant_queued.store(0, Ordering::SeqCst);
            q.drain(..).collect()
        };
        let err = Error::ContextDown(reason.into());
        for job in jobs {
            if !job.header().is_empty() {
                writer.reply(job.header(), |w| err.write_reply(w));
            }
        }
    }
}

/// Starts a context thread for `mode`. An `owngil` thread creates its interpreter at
/// once; either waits for its first job, a [`Kind::Start`] with the context's spec. So
/// the router can keep a spare owngil thread with its interpreter ready, and a new
/// context costs its session set-up only (interpreter creation takes ~10 ms).
pub fn spawn(
    mode: Mode,
    inbox: Arc<dyn Inbox>,
    capacity: usize,
    stuck_after: Option<Duration>,
) -> std::io::Result<Arc<Mailbox>> {
    let poll = Poller::new()?;
    let waker = Waker::new(&poll, WAKE)?;
    let mailbox = Arc::new(Mailbox {
        queue: Mutex::new(VecDeque::new()),
        capacity,
        waker,
        sleeping: AtomicBool::new(false),
        death: Mutex::new(String::new()),
        link: std::sync::OnceLock::new(),
        deadline: Arc::new(Deadline::default()),
        queued: AtomicUsize::new(0),
        reentrant_queued: AtomicUsize::new(0),
        spin_us: std::sync::atomic::AtomicU32::new(SPIN_MAX_US),
        state: AtomicU8::new(STARTING),
        stuck_after,
        abandoned: AtomicBool::new(false),
        served: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
        replaced: AtomicU64::new(0),
    });
    let mb = mailbox.clone();
    std::thread::Builder::new()
        .name("pyport-ctx".into())
        .stack_size(64 << 20)
        .spawn(move || run(mode, mb, inbox, poll))?;
    Ok(mailbox)
}

fn run(mode: Mode, mailbox: Arc<Mailbox>, inbox: Arc<dyn Inbox>, poll: Poller) {
    match mode {
        Mode::Main => serve(&mailbox, &inbox, poll),
        Mode::OwnGil => match SubInterpreter::new() {
            Ok(interp) => {
                serve(&mailbox, &inbox, poll);
                interp.end();
            }
            Err(e) => {
                mailbox.fail_all(inbox.writer(), &format!("interpreter creation failed: {e}"))
            }
        },
    }
}

/// Waits for the next job (spinning, then sleeping with the GIL released).
fn next_job(py: Python<'_>, mailbox: &Mailbox, inbox: &dyn Inbox, reactor: &Reactor) -> Job {
    loop {
        if let Some(job) = mailbox.pop(false) {
            return job;
        }
        detached(py, || {
            mailbox.wait(inbox, reactor, &|| false, false, false, None)
        });
    }
}

/// The context's loop, attached to its interpreter.
fn serve(mailbox: &Arc<Mailbox>, inbox: &Arc<dyn Inbox>, poll: Poller) {
    serve_interpreter(mailbox, inbox, poll);
    // Before the interpreter ends (in `run`): the watchdog and `pyport:interrupt/1`
    // queue no interrupt on it from now on.
    mailbox.deadline.unbind_thread();
    if mailbox.is_abandoned() {
        ABANDONED_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_interpreter(mailbox: &Arc<Mailbox>, inbox: &Arc<dyn Inbox>, poll: Poller) {
    let writer: &Writer = inbox.writer();
    let reactor = match Reactor::new(poll) {
        Ok(r) => Rc::new(r),
        Err(e) => return mailbox.fail_all(writer, &format!("poll set-up failed: {e}")),
    };
    Python::attach(|py| {
        let start = next_job(py, mailbox, &**inbox, &reactor);
        let Kind::Start(spec) = &start.kind else {
            mailbox.fail_all(writer, "not_started");
            return;
        };
        let link = Link::new(spec.id, inbox.writer().clone(), mailbox.deadline.clone());
        erlang_module::register(&link, reactor.clone());
        if let Err(e) = erlang_module::install_thread_hook(py) {
            let e = Error::from(e);
            writer.log(
                "warning",
                spec.id,
                &format!("threading hook not installed: {e}"),
            );
        }
        let _ = mailbox.link.set(link.clone());
        let session = match Session::new(py, spec, link.clone(), reactor.clone()) {
            Ok(s) => s,
            Err(e) => {
                writer.fail(start.header(), spec.id, "error", &e);
                mailbox.fail_all(writer, "start_failed");
                link.stop(); // threads the preload started
                erlang_module::unregister(&link);
                return;
            }
        };
        let probe = (Arc::downgrade(mailbox), link.clone());
        reactor.set_busy_probe(Box::new(move || {
            probe.0.upgrade().is_some_and(|m| !m.is_empty())
                || probe.1.callbacks.has_async_results()
        }));
        let me = Arc::downgrade(mailbox);
        mailbox.deadline.bind_thread(Box::new(move || {
            if let Some(m) = me.upgrade() {
                m.wake_if_sleeping();
            }
        }));
        if let Some(after) = mailbox.stuck_after {
            let (inbox, me, id) = (inbox.clone(), Arc::downgrade(mailbox), spec.id);
            mailbox.deadline.on_stuck(
                after,
                Box::new(move || {
                    if let Some(m) = me.upgrade() {
                        inbox.replace_stuck(id, &m);
                    }
                }),
            );
        }
        mailbox.state.store(RUNNING, Ordering::SeqCst);
        if !start.header().is_empty() {
            writer.reply(start.header(), |w| w.atom("ok"));
        }
        let server = Rc::new(Server {
            mailbox: mailbox.clone(),
            inbox: inbox.clone(),
            session,
            stop: RefCell::new(None),
            out: Cell::new(Vec::new()),
            next_fd_poll: Cell::new(Instant::now()),
            depth: Cell::new(0),
        });
        // Python reaches the loop again through `erlang.call` and channel receives.
        let weak: Weak<Server> = Rc::downgrade(&server);
        erlang_module::set_nested_serve(Some(weak));
        // A panic inside a request is that request's error reply (see `answer`); one
        // outside any request (in the loop's own code) ends the context: it is marked
        // down at once, so queued and later requests get `{context_down, panic}`
        // instead of waiting for a thread that no longer serves them.
        let served = catch_unwind(AssertUnwindSafe(|| {
            let done = || server.stop.borrow().is_some() || mailbox.is_abandoned();
            let _ = server.serve_until(py, &done, None);
        }));
        erlang_module::set_nested_serve(None);
        let reason = match served {
            Ok(()) => "stopped",
            Err(panic) => {
                mailbox.fail_all(writer, "panic");
                let message = panic_message(&*panic);
                writer.log(
                    "error",
                    spec.id,
                    &format!("the context thread panicked outside a request ({message}): the context is down"),
                );
                "panic"
            }
        };
        let stop = server.stop.borrow_mut().take();
        // Threads the context's code started that wait in `erlang.call` are released
        // now: the interpreter's end joins them.
        link.stop();
        if catch_unwind(AssertUnwindSafe(|| server.session.close(py))).is_err() {
            writer.log("error", spec.id, "closing the context's session panicked");
        }
        erlang_module::unregister(&link);
        mailbox.fail_all(writer, reason);
        if let Some(job) = stop {
            writer.reply(job.header(), |w| w.atom("ok"));
        }
    });
}

/// A running context's serving loop and all it works with: the mailbox, the router's
/// side (stdin, the writer), the session (interpreter objects, envs, handles, the
/// event loop). Owned by the context thread for the context's life; reachable again
/// from inside Python through a weak reference (re-entrancy: while Python waits in
/// `erlang.call`, the thread keeps serving its mailbox; see
/// `erlang_module::NestedServe`).
struct Server {
    mailbox: Arc<Mailbox>,
    inbox: Arc<dyn Inbox>,
    session: Session,
    /// A stop request, held until the outermost loop can act on it.
    stop: RefCell<Option<Job>>,
    /// The reply buffer, kept between requests.
    out: Cell<Vec<u8>>,
    /// When a busy thread polls the event loop's fds next.
    next_fd_poll: Cell<Instant>,
    /// How many `serve_until` frames are active (1: the outermost loop).
    depth: Cell<usize>,
}

/// Reply buffers up to this size are kept for the next request.
const MAX_KEPT_BUFFER: usize = 64 << 20;

impl NestedServe for Server {
    /// Serves jobs until `done()` holds (`None`), or, when the waiting code is a
    /// request's, until that request is stopped or its deadline passes (`Some(why)`).
    /// `until` is a time at which `done()` may turn true by itself (a wait with a
    /// timeout), so the thread wakes up for it. The waiting request is parked meanwhile
    /// (see `Deadline::park`): its stop is raised by its wait, never into the tasks and
    /// requests that run while it waits.
    fn serve_until(
        &self,
        py: Python<'_>,
        done: &dyn Fn() -> bool,
        until: Option<Instant>,
    ) -> Option<StopReason> {
        let deadline = &self.mailbox.deadline;
        let parked = deadline.park();
        let given_up = || deadline.given_up(parked);
        let stop = || done() || given_up().is_some();
        let done = &stop;
        // Nested in this many waits (`erlang.call`, channel receives), a context serves
        // only re-entrant requests, so unrelated ones cannot pile up on its stack.
        let depth = self.depth.get();
        self.depth.set(depth + 1);
        let only_reentrant = depth > MAX_NESTED_UNRELATED;
        self.serve_while(py, done, until, only_reentrant);
        self.depth.set(depth);
        let why = given_up();
        if why.is_some() {
            deadline.delivered(parked.seq);
        }
        deadline.unpark(parked);
        why
    }
}

impl Server {
    fn serve_while(
        &self,
        py: Python<'_>,
        done: &dyn Fn() -> bool,
        until: Option<Instant>,
        only_reentrant: bool,
    ) {
        let event_loop = &self.session.event_loop;
        while !done() {
            let job = self.mailbox.pop(only_reentrant);
            let served = job.is_some();
            if let Some(job) = job {
                self.run(py, job);
            }
            // One loop step between two requests at most: a busy queue does not starve
            // the loop's tasks, streams and servers, nor the loop the requests.
            if self.loop_turn(py, served) || served {
                continue;
            }
            if until.is_some_and(|u| u <= Instant::now()) {
                break;
            }
            let may_step = event_loop.exists() && !event_loop.is_stepping();
            let due = match (may_step.then(|| event_loop.due()).flatten(), until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Pausing after steps that raised, the loop's news does not end the wait:
            // its pause does (`due`).
            let with_loop = may_step && !event_loop.backing_off();
            detached(py, || {
                self.mailbox.wait(
                    &*self.inbox,
                    &event_loop.reactor,
                    done,
                    only_reentrant,
                    with_loop,
                    due,
                )
            });
        }
    }

    /// The event loop's share between requests: resolve `erlang.async_call` results,
    /// wake channel readers, and step the loop once if it is due. After a request, the
    /// loop's fds are polled (now and then) too, as a busy queue never lets the thread
    /// wait in its poll. Returns whether the loop stepped.
    fn loop_turn(&self, py: Python<'_>, after_request: bool) -> bool {
        let event_loop = &self.session.event_loop;
        let link = &self.session.link;
        if link.callbacks.has_async_results() {
            self.session.resolve_async_calls(py);
        }
        // The loop steps between requests, never inside one of its own steps (a task
        // waiting in `erlang.call` serves requests, not the loop).
        if !event_loop.exists() || event_loop.is_stepping() {
            return false;
        }
        if link.channels.take_changed() {
            self.session.channels_changed(py);
        }
        if after_request && event_loop.reactor.has_fds() {
            let now = Instant::now();
            if now >= self.next_fd_poll.get() {
                self.next_fd_poll.set(now + FD_POLL_WHILE_SPINNING);
                event_loop.reactor.wait(Some(Duration::ZERO));
            }
        }
        event_loop.wants_step() && event_loop.step(py)
    }

    /// Runs one job of the mailbox.
    fn run(&self, py: Python<'_>, job: Job) {
        let writer = self.inbox.writer();
        match job.kind {
            Kind::Request { .. } => {
                // Reuse the reply buffer (a large reply would otherwise fault in fresh
                // pages every time); a nested request takes an empty one meanwhile.
                let mut out = self.out.take();
                answer(py, &self.session, &job, writer, &self.mailbox, &mut out);
                if self.session.link.take_test_panic() {
                    panic!("test hook: _pyport._test_panic_outside_request()");
                }
                if out.capacity() <= MAX_KEPT_BUFFER {
                    out.clear();
                    self.out.replace(out);
                }
                // The request may have scheduled callbacks or started tasks.
                self.session.event_loop.after_request(py);
            }
            Kind::Stop => *self.stop.borrow_mut() = Some(job),
            Kind::Start(_) => {
                let e = Error::BadRequest("context already started".into());
                writer.reply(job.header(), |w| e.write_reply(w));
            }
        }
    }
}

/// How a request ended, for the context's counters.
enum Outcome {
    Ok,
    Error,
    Timeout,
}

/// Serves one request; a panic becomes an error reply and the context lives on.
/// Serves `job` and writes its answer, counted in the mailbox's counters first (so
/// `pyport:info/1` made after the reply arrived counts it).
fn answer(
    py: Python<'_>,
    session: &Session,
    job: &Job,
    writer: &Writer,
    mailbox: &Mailbox,
    out: &mut Vec<u8>,
) {
    let deadline = &mailbox.deadline;
    let (outer, outer_at) = deadline.current();
    // Giving back (stream credit or cancel, dropping an env, releasing an object) is
    // bookkeeping, not a request of the caller's: it never becomes the request the
    // context "runs now", so a `pyport:interrupt/1` made while it is served nested in a
    // waiting request still reaches that request (known since the job was made).
    let bookkeeping = job.gives_back();
    let start = |timeout_ms: Option<u64>| {
        if bookkeeping {
            return Ok(None);
        }
        let at = timeout_ms.map(|ms| job.arrived + Duration::from_millis(ms));
        match deadline.begin(at, job.reentrant) {
            Some(_) => Ok(at),
            None => Err(Passed),
        }
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        session.serve(py, job.header(), job.body(), out, &start)
    }));
    if !bookkeeping {
        deadline.end(outer, outer_at);
    }
    if crate::fork::in_child() {
        // The request forked and this is the child, back from it: it ends here.
        match &result {
            Ok(r) => crate::fork::end_child(py, r.as_ref().map(drop)),
            Err(_) => crate::fork::end_child(py, Err(&Error::Panic("panic".into()))),
        }
    }
    // Interrupted at its deadline: the caller sees `timeout`, whichever of its own timer
    // and this reply comes first.
    let result = result.map(|r| {
        r.map_err(|e| match e {
            Error::Python { ref kind, .. } => stop_error(kind).unwrap_or(e),
            other => other,
        })
    });
    let header = job.header();
    match result {
        Ok(Ok(Served::Now)) if !header.is_empty() => {
            mailbox.count(Outcome::Ok);
            writer.send(out);
        }
        Ok(Ok(_)) => mailbox.count(Outcome::Ok),
        Ok(Err(e)) => {
            mailbox.count(match e {
                Error::Timeout => Outcome::Timeout,
                _ => Outcome::Error,
            });
            writer.fail(header, session.id, "warning", &e);
        }
        Err(panic) => {
            let e = Error::Panic(panic_message(&*panic));
            mailbox.count(Outcome::Error);
            writer.fail(header, session.id, "error", &e);
        }
    }
}
