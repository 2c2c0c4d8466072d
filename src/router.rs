//! Routing: reads request frames from Erlang without blocking, hands each one to its
//! context's mailbox, and serves control requests (context 0). It never runs Python:
//! replies come from the context threads, through the shared [`Writer`].
//!
//! The routing state sits behind one lock in the [`Router`]. The router thread takes it
//! whenever epoll says stdin is readable; an idle, spinning context thread takes it
//! with `try_lock` and reads stdin itself, so under light load the thread that will
//! serve a request is the one that reads it (no wake-up on the request path). Either
//! way stdin is read until `WouldBlock` and new data raises a new epoll edge, so no
//! frame waits for a thread that is not coming.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::context::{self, Inbox, Mailbox};
use crate::error::Error;
use crate::etf::Term;
use crate::framing::{split_request, FrameReader, Inbound, Status};
use crate::python::PythonInfo;
use crate::request::{Job, Kind, Mode, Spec, REENTRANT_BIT};
use crate::sync::Unpoison;
use crate::writer::Writer;

const STDIN: Token = Token(0);

pub struct Config {
    pub max_frame: usize,
    pub queue_capacity: usize,
    /// How long a request may run past its deadline, blocked where no interrupt
    /// reaches it, before its context is replaced (`None`: never).
    pub stuck_after: Option<Duration>,
    /// Resident bytes the whole process may use (`memory`).
    pub max_memory: Option<u64>,
    /// `sys.path` entries for every interpreter.
    pub path: Vec<String>,
}

/// The routing state, shared by the router thread and spinning context threads.
pub struct Router {
    routing: Mutex<Routing>,
    writer: Arc<Writer>,
    watch: Mutex<Option<Watch>>,
    /// Nanoseconds since `epoch` of the last time anyone read stdin.
    last_pump: AtomicU64,
    epoch: Instant,
}

/// Who watches stdin.
///
/// While context threads spin, they read stdin themselves and the router thread's epoll
/// does not watch it: an epoll wake-up of the router for every frame costs the spinning
/// reader ~5 microseconds per request on 2 cores, and toggling the registration for each
/// request costs ~3. So a context that starts spinning takes stdin over (once), keeps it
/// while it serves requests and spins again, and the last spinner hands it back before it
/// sleeps. If the context that took it over is busy in Python for long, the router,
/// which then polls with a short timeout, sees that nobody has read stdin for
/// `TAKEOVER` and takes it back.
struct Watch {
    registry: mio::Registry,
    waker: mio::Waker,
    fd: std::os::fd::RawFd,
    spinners: usize,
    /// True when the router's epoll watches stdin.
    router_watches: bool,
}

impl Watch {
    fn watch_again(&mut self) {
        match self
            .registry
            .register(&mut SourceFd(&self.fd), STDIN, Interest::READABLE)
        {
            Ok(()) => self.router_watches = true,
            // Without a watcher, frames could wait forever: fail loudly.
            Err(e) => panic!("pyport: cannot watch stdin again: {e}"),
        }
    }
}

/// Stuck context threads left to end on their own before the runtime restarts instead.
const MAX_ABANDONED: usize = 8;
/// The exit status of a runtime that restarts because contexts are stuck.
const STUCK_EXIT: i32 = 75;

/// How long stdin may go unread, while a context holds it, before the router takes it back.
const TAKEOVER: Duration = Duration::from_micros(500);
const WAKE: Token = Token(1);

impl Router {
    pub fn new(config: Config, python: PythonInfo, writer: Arc<Writer>, input: File) -> Arc<Self> {
        Arc::new_cyclic(|me| Router {
            routing: Mutex::new(Routing {
                reader: FrameReader::new(config.max_frame),
                config,
                python,
                writer: writer.clone(),
                input,
                inbound: Vec::new(),
                contexts: HashMap::new(),
                specs: HashMap::new(),
                spare: None,
                closed: false,
                me: me.clone(),
            }),
            writer,
            watch: Mutex::new(None),
            last_pump: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Routing> {
        self.routing.lock().unpoison()
    }

    fn watch(&self) -> MutexGuard<'_, Option<Watch>> {
        self.watch.lock().unpoison()
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The router thread: runs until stdin closes.
    pub fn run(&self) -> io::Result<()> {
        let mut poll = Poll::new()?;
        let fd = self.lock().input.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), STDIN, Interest::READABLE)?;
        let waker = mio::Waker::new(poll.registry(), WAKE)?;
        self.lock().make_spare();
        *self.watch() = Some(Watch {
            registry: poll.registry().try_clone()?,
            waker,
            fd,
            spinners: 0,
            router_watches: true,
        });
        let mut events = Events::with_capacity(8);
        loop {
            {
                let mut routing = self.lock();
                routing.pump(false)?;
                if routing.closed {
                    return Ok(());
                }
            }
            let timeout = match self.watch().as_ref() {
                Some(w) if !w.router_watches => Some(TAKEOVER),
                _ => None,
            };
            match poll.poll(&mut events, timeout) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            if timeout.is_some() {
                self.take_back_if_stale();
            }
        }
    }

    fn take_back_if_stale(&self) {
        let idle = self
            .now()
            .saturating_sub(self.last_pump.load(Ordering::Relaxed));
        if idle < TAKEOVER.as_nanos() as u64 {
            return;
        }
        if let Some(w) = self.watch().as_mut() {
            if !w.router_watches && w.spinners == 0 {
                w.watch_again();
            }
        }
    }
}

impl Inbox for Router {
    fn replace_stuck(&self, ctx: u64, stuck: &Arc<Mailbox>) {
        self.lock().replace_stuck(ctx, stuck);
    }

    fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// Reads and routes what stdin has, unless another thread is doing it right now.
    fn try_pump(&self) -> bool {
        let Ok(mut routing) = self.routing.try_lock() else {
            return false;
        };
        self.last_pump.store(self.now(), Ordering::Relaxed);
        if let Err(e) = routing.pump(true) {
            eprintln!("pyport: reading stdin: {e}");
        }
        true
    }

    /// A context starts spinning: it takes stdin over from the router if need be.
    fn spin_enter(&self) {
        self.last_pump.store(self.now(), Ordering::Relaxed);
        if let Some(w) = self.watch().as_mut() {
            w.spinners += 1;
            if w.router_watches && w.registry.deregister(&mut SourceFd(&w.fd)).is_ok() {
                w.router_watches = false;
                // The router sleeps without a timeout; make it poll with one now.
                let _ = w.waker.wake();
            }
        }
    }

    /// A spinning context found work; it keeps stdin (see [`Watch`]).
    fn spin_to_work(&self) {
        if let Some(w) = self.watch().as_mut() {
            w.spinners = w.spinners.saturating_sub(1);
        }
    }

    /// A spinning context goes to sleep; the last one hands stdin back.
    fn spin_to_sleep(&self) {
        if let Some(w) = self.watch().as_mut() {
            w.spinners = w.spinners.saturating_sub(1);
            if w.spinners == 0 && !w.router_watches {
                w.watch_again();
            }
        }
    }
}

/// A frame the router hands to a context's shared state rather than its queue, so it
/// reaches a thread waiting for it even while the context thread is busy.
#[derive(Debug, PartialEq)]
enum Direct {
    /// `{callback_result, Id, Result}`: the answer to an `erlang.call` (the id and the
    /// whole ETF term of `Result`).
    CallbackResult(u64, Vec<u8>),
    /// `{channel_send, ChanId, Term}`: an item for a channel (the term's ETF body).
    ChannelSend(u64, Vec<u8>),
    /// `{channel_close, ChanId}`.
    ChannelClose(u64),
    /// `{interrupt}`: stop the request the context runs now.
    Interrupt,
    /// `{send_busy, DestId}`: an `erlang.send` to that destination was dropped, it is
    /// busy; `{send_clear, DestId}`: it is not any more.
    SendBusy(u64, bool),
}

/// The [`Direct`] frame in `body`, if it is one; anything else goes to the context.
fn direct(body: &[u8]) -> Option<Direct> {
    let mut r = crate::etf::Reader::new(body).ok()?;
    let arity = r.tuple_header().ok()?;
    let op = r.atom().ok()?;
    let id = |r: &mut crate::etf::Reader<'_>| Term::read(r, 0).ok()?.as_u64();
    let found = match (op.as_ref(), arity) {
        ("callback_result", 3) => {
            let id = id(&mut r)?;
            let result = r.term_slice().ok()?;
            let mut term = Vec::with_capacity(result.len() + 1);
            term.push(crate::etf::VERSION);
            term.extend_from_slice(result);
            Direct::CallbackResult(id, term)
        }
        ("channel_send", 3) => Direct::ChannelSend(id(&mut r)?, r.term_slice().ok()?.to_vec()),
        ("channel_close", 2) => Direct::ChannelClose(id(&mut r)?),
        ("interrupt", 1) => Direct::Interrupt,
        ("send_busy", 2) => Direct::SendBusy(id(&mut r)?, true),
        ("send_clear", 2) => Direct::SendBusy(id(&mut r)?, false),
        _ => return None,
    };
    r.finish().ok()?;
    Some(found)
}

struct Routing {
    config: Config,
    python: PythonInfo,
    writer: Arc<Writer>,
    input: File,
    reader: FrameReader,
    inbound: Vec<Inbound>,
    contexts: HashMap<u64, Arc<Mailbox>>,
    /// How each context was made, to make it again if it gets stuck.
    specs: HashMap<u64, Spec>,
    /// An owngil thread whose interpreter is created, waiting to become a context.
    spare: Option<Arc<Mailbox>>,
    closed: bool,
    /// The Router this state lives in, handed to the contexts it starts.
    me: std::sync::Weak<Router>,
}

/// `shutdown`: the runtime stops. The process exits at once, from whichever thread read
/// the request, whatever its contexts are doing (one may be blocked in C): Python is
/// not finalized (that could hang on a stuck context), and the OS reclaims the rest.
/// Erlang waits for the exit status, so a stop returns once the process is gone.
fn shutdown() -> ! {
    // SAFETY: ends the process without running atexit handlers or destructors.
    unsafe { libc::_exit(0) }
}

impl Routing {
    /// Reads stdin until `WouldBlock` and routes every complete frame.
    /// `spinning`: the caller is a spinning context thread, which reads again soon and
    /// so may stop at a short read (see `FrameReader::fill`); the router thread, woken
    /// by an edge-triggered poll, reads until `WouldBlock` or the end.
    fn pump(&mut self, spinning: bool) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let status = self
            .reader
            .fill(&mut self.input, &mut self.inbound, spinning)?;
        let mut inbound = std::mem::take(&mut self.inbound);
        for item in inbound.drain(..) {
            self.route(item);
        }
        self.inbound = inbound;
        if let Status::Closed { clean } = status {
            if !clean {
                eprintln!("pyport: stdin closed in the middle of a frame");
            }
            self.closed = true;
        }
        Ok(())
    }

    fn route(&mut self, item: Inbound) {
        match item {
            Inbound::Frame(frame) => self.route_frame(frame),
            Inbound::Oversized { len, head } => {
                let err = Error::FrameTooLarge {
                    size: len,
                    max: self.config.max_frame,
                };
                match split_request(&head) {
                    Some(req) if !req.header.is_empty() => {
                        self.writer.reply(req.header, |w| err.write_reply(w))
                    }
                    _ => self.writer.log("error", 0, &err.to_string()),
                }
            }
        }
    }

    fn route_frame(&mut self, frame: Vec<u8>) {
        let Some(req) = split_request(&frame) else {
            self.writer.log(
                "error",
                0,
                &format!(
                    "protocol error: a frame of {} bytes is too short",
                    frame.len()
                ),
            );
            return;
        };
        let (ctx, header_len) = (req.ctx & !REENTRANT_BIT, req.header.len());
        let reentrant = req.ctx & REENTRANT_BIT != 0;
        let job = Job::request(frame, header_len, reentrant);
        if ctx == 0 {
            return self.control(job);
        }
        let Some(mailbox) = self.contexts.get(&ctx) else {
            return self.fail(&job, Error::ContextDown("unknown_context".into()));
        };
        match direct(job.body()) {
            Some(Direct::CallbackResult(id, term)) => return mailbox.deliver_callback(id, term),
            Some(Direct::ChannelSend(id, term)) => return mailbox.deliver_channel(id, Some(term)),
            Some(Direct::ChannelClose(id)) => return mailbox.deliver_channel(id, None),
            Some(Direct::Interrupt) => return mailbox.interrupt(),
            Some(Direct::SendBusy(id, busy)) => return mailbox.send_busy(id, busy),
            None => {}
        }
        if let Err((job, err)) = mailbox.push(job) {
            if mailbox.is_dead() {
                self.contexts.remove(&ctx);
            }
            self.fail(&job, err);
        }
    }

    fn fail(&self, job: &Job, err: Error) {
        self.writer.fail(job.header(), 0, "warning", &err);
    }

    fn control(&mut self, job: Job) {
        let term = match Term::decode(job.body()) {
            Ok(t) => t,
            Err(e) => return self.fail(&job, e.into()),
        };
        let result = match &term {
            Term::Tuple(items) => match items.as_slice() {
                [op, id, opts] if op.as_atom() == Some("new_context") => {
                    self.new_context(id, opts, job)
                }
                [op, id] if op.as_atom() == Some("stop_context") => self.stop_context(id, job),
                _ => Err((job, Error::BadRequest("unknown control request".into()))),
            },
            Term::Atom(a) if a == "info" => {
                self.info(&job);
                Ok(())
            }
            Term::Atom(a) if a == "shutdown" => shutdown(),
            _ => Err((job, Error::BadRequest("unknown control request".into()))),
        };
        if let Err((job, err)) = result {
            self.fail(&job, err);
        }
    }

    #[allow(clippy::result_large_err)] // see Mailbox::push
    fn new_context(&mut self, id: &Term, opts: &Term, job: Job) -> Result<(), (Job, Error)> {
        let spec = match self.parse_spec(id, opts) {
            Ok(spec) => spec,
            Err(e) => return Err((job, e)),
        };
        if spec.mode == Mode::OwnGil && !self.python.owngil {
            let msg = format!(
                "owngil contexts need Python 3.12 or newer (this is {})",
                self.python.version
            );
            return Err((job, Error::BadRequest(msg)));
        }
        if self.contexts.get(&spec.id).is_some_and(|m| !m.is_dead()) {
            return Err((
                job,
                Error::BadRequest(format!("context id {} is in use", spec.id)),
            ));
        }
        let mode = spec.mode;
        let id = spec.id;
        let spare = match mode {
            Mode::OwnGil => self.spare.take().filter(|m| !m.is_dead()),
            Mode::Main => None,
        };
        let mailbox = match spare {
            Some(m) => m,
            None => match self.spawn(mode) {
                Ok(m) => m,
                Err(e) => return Err((job, e)),
            },
        };
        self.specs.insert(id, spec.clone());
        mailbox.push(Job {
            kind: Kind::Start(Box::new(spec)),
            ..job
        })?;
        self.contexts.insert(id, mailbox);
        if mode == Mode::OwnGil {
            self.make_spare();
        }
        Ok(())
    }

    fn spawn(&self, mode: Mode) -> Result<Arc<Mailbox>, Error> {
        let inbox = self
            .me
            .upgrade()
            .ok_or_else(|| Error::ContextDown("shutting_down".into()))?;
        context::spawn(
            mode,
            inbox,
            self.config.queue_capacity,
            self.config.stuck_after,
        )
        .map_err(|e| Error::ContextDown(format!("thread start failed: {e}")))
    }

    /// Context `id` (the mailbox `stuck`) runs a request blocked past its deadline where
    /// no interrupt reaches it (inside C). An owngil context gets a new interpreter (its
    /// preload run again) that serves the queued and later requests under the same
    /// id; the stuck thread ends on its own when it returns. A `main` context shares the
    /// interpreter's GIL, which the stuck code may hold, and past `MAX_ABANDONED` stuck
    /// threads the process is in a bad way: both restart the runtime instead.
    fn replace_stuck(&mut self, id: u64, stuck: &Arc<Mailbox>) {
        if !self
            .contexts
            .get(&id)
            .is_some_and(|m| Arc::ptr_eq(m, stuck))
        {
            return; // replaced or stopped meanwhile
        }
        let Some(spec) = self.specs.get(&id).cloned() else {
            return;
        };
        if spec.mode == Mode::Main || context::abandoned_threads() >= MAX_ABANDONED {
            let why = match spec.mode {
                Mode::Main => "a main context".to_string(),
                Mode::OwnGil => format!("{MAX_ABANDONED} stuck contexts"),
            };
            self.writer.log(
                "error",
                id,
                &format!("{why} stuck in code no interrupt reaches: restarting the runtime"),
            );
            let _ = self.writer.flush();
            // SAFETY: ends the process at once, without running CPython's finalizer,
            // which would wait for the stuck thread forever.
            unsafe { libc::_exit(STUCK_EXIT) };
        }
        let jobs = stuck.abandon();
        let mailbox = match self.spare.take().filter(|m| !m.is_dead()) {
            Some(m) => m,
            None => match self.spawn(Mode::OwnGil) {
                Ok(m) => m,
                Err(e) => {
                    self.writer
                        .log("error", id, &format!("cannot replace a stuck context: {e}"));
                    return;
                }
            },
        };
        let start = Job {
            frame: Vec::new(),
            header: (0, 0),
            body: 0,
            kind: Kind::Start(Box::new(spec)),
            arrived: Instant::now(),
            reentrant: false,
        };
        mailbox.replaces(stuck);
        let queued = std::iter::once(start).chain(jobs);
        for job in queued {
            if let Err((job, err)) = mailbox.push(job) {
                self.fail(&job, err);
            }
        }
        self.contexts.insert(id, mailbox);
        self.make_spare();
        self.writer.log(
            "warning",
            id,
            "a request stayed blocked past its deadline where no interrupt reaches it \
             (inside C): the context was replaced by a new interpreter (preload run again)",
        );
    }

    /// Prepares the next owngil context ahead of time.
    fn make_spare(&mut self) {
        if self.python.owngil && self.spare.is_none() {
            self.spare = self.spawn(Mode::OwnGil).ok();
        }
    }

    fn parse_spec(&self, id: &Term, opts: &Term) -> Result<Spec, Error> {
        if !matches!(opts, Term::Map(_)) {
            return Err(Error::BadRequest("context options must be a map".into()));
        }
        let id = id
            .as_u64()
            .filter(|&i| i > 0)
            .ok_or_else(|| Error::BadRequest("context id must be a positive integer".into()))?;
        let mode = match opts.map_get("mode").and_then(Term::as_atom) {
            None | Some("owngil") => Mode::OwnGil,
            Some("main") => Mode::Main,
            Some(other) => return Err(Error::BadRequest(format!("unknown mode {other}"))),
        };
        let text = |key: &str| opts.map_get(key).and_then(Term::as_text);
        let mut path = self.config.path.clone();
        if let Some(Term::List(dirs)) = opts.map_get("path") {
            for d in dirs {
                path.push(
                    d.as_text()
                        .ok_or_else(|| Error::BadRequest("path entries must be strings".into()))?,
                );
            }
        }
        Ok(Spec {
            id,
            mode,
            name: text("name"),
            preload: text("preload"),
            path,
        })
    }

    #[allow(clippy::result_large_err)] // see Mailbox::push
    fn stop_context(&mut self, id: &Term, job: Job) -> Result<(), (Job, Error)> {
        let Some(id) = id.as_u64() else {
            return Err((
                job,
                Error::BadRequest("context id must be a positive integer".into()),
            ));
        };
        self.specs.remove(&id);
        let Some(mailbox) = self.contexts.remove(&id) else {
            return Err((job, Error::NotFound));
        };
        let job = Job {
            kind: Kind::Stop,
            ..job
        };
        mailbox.push(job).map_err(|(job, _)| (job, Error::NotFound))
    }

    fn info(&mut self, job: &Job) {
        self.contexts.retain(|_, m| !m.is_dead());
        let mut ids: Vec<u64> = self.contexts.keys().copied().collect();
        ids.sort_unstable();
        let info = Term::Map(vec![
            (
                Term::atom("python_version"),
                Term::Binary(self.python.version.clone().into_bytes()),
            ),
            (Term::atom("owngil"), Term::boolean(self.python.owngil)),
            (Term::atom("os_pid"), Term::Int(std::process::id() as i64)),
            (
                Term::atom("contexts"),
                Term::List(ids.iter().map(|&i| Term::Int(i as i64)).collect()),
            ),
            (
                Term::atom("context_stats"),
                Term::Map(
                    ids.iter()
                        .map(|i| (Term::Int(*i as i64), self.contexts[i].stats()))
                        .collect(),
                ),
            ),
        ]);
        self.writer.reply(job.header(), |w| {
            w.tuple_header(2);
            w.atom("ok");
            info.write(w);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_results_are_recognised_and_kept_whole() {
        let result = Term::Tuple(vec![
            Term::atom("ok"),
            Term::List(vec![Term::Int(-1), Term::Int(2)]),
        ]);
        let body = Term::Tuple(vec![
            Term::atom("callback_result"),
            Term::Int(42),
            result.clone(),
        ])
        .encode();
        let Some(Direct::CallbackResult(id, term)) = direct(&body) else {
            panic!("not a callback result");
        };
        assert_eq!(id, 42);
        assert_eq!(Term::decode(&term).unwrap(), result);
        let send = Term::Tuple(vec![
            Term::atom("channel_send"),
            Term::Int(7),
            Term::Int(-1),
        ]);
        assert_eq!(
            direct(&send.encode()),
            Some(Direct::ChannelSend(7, Term::Int(-1).encode()[1..].to_vec()))
        );
        let close = Term::Tuple(vec![Term::atom("channel_close"), Term::Int(7)]);
        assert_eq!(direct(&close.encode()), Some(Direct::ChannelClose(7)));
        // anything else goes to the context
        let call = Term::Tuple(vec![Term::atom("call"), Term::Int(1), Term::Int(2)]).encode();
        assert!(direct(&call).is_none());
        assert!(direct(&[131, 104]).is_none());
    }
}
