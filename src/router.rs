//! The router thread: reads request frames from Erlang without blocking, hands each one
//! to its context's mailbox, and serves control requests (context 0). It never runs
//! Python: replies come from the context threads, through the shared [`Writer`].

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::context::{self, Job, Mailbox, Mode, Spec};
use crate::error::Error;
use crate::etf::Term;
use crate::framing::{split_request, FrameReader, Inbound, Status};
use crate::python::PythonInfo;
use crate::writer::Writer;

const STDIN: Token = Token(0);
/// How long the router keeps polling stdin without sleeping after it saw a frame.
const SPIN: Duration = Duration::from_micros(40);

pub struct Config {
    pub max_frame: usize,
    pub queue_capacity: usize,
    /// `sys.path` entries for every interpreter.
    pub path: Vec<String>,
}

pub struct Router {
    config: Config,
    python: PythonInfo,
    writer: Arc<Writer>,
    contexts: HashMap<u64, Arc<Mailbox>>,
}

impl Router {
    pub fn new(config: Config, python: PythonInfo, writer: Arc<Writer>) -> Self {
        Router { config, python, writer, contexts: HashMap::new() }
    }

    /// Runs until stdin closes.
    pub fn run(&mut self, mut input: File) -> io::Result<()> {
        let mut poll = Poll::new()?;
        let fd = input.as_raw_fd();
        poll.registry().register(&mut SourceFd(&fd), STDIN, Interest::READABLE)?;
        let mut events = Events::with_capacity(8);
        let mut reader = FrameReader::new(self.config.max_frame);
        let mut inbound = Vec::new();
        let mut busy_until = Instant::now();
        loop {
            let timeout = if Instant::now() < busy_until { Some(Duration::ZERO) } else { None };
            match poll.poll(&mut events, timeout) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            // Edge-triggered: read whatever is there, whether or not an event came (the
            // spin phase polls with a zero timeout).
            if events.is_empty() && timeout.is_none() {
                continue;
            }
            let status = reader.fill(&mut input, &mut inbound)?;
            if !inbound.is_empty() {
                busy_until = Instant::now() + SPIN;
            }
            for item in inbound.drain(..) {
                self.route(item);
            }
            if let Status::Closed { clean } = status {
                if !clean {
                    eprintln!("pyport: stdin closed in the middle of a frame");
                }
                return Ok(());
            }
        }
    }

    fn route(&mut self, item: Inbound) {
        match item {
            Inbound::Frame(frame) => self.route_frame(frame),
            Inbound::Oversized { len, head } => {
                let err = Error::FrameTooLarge { size: len, max: self.config.max_frame };
                match split_request(&head) {
                    Some(req) if !req.header.is_empty() => self.writer.reply(req.header, |w| err.write_reply(w)),
                    _ => self.writer.log("error", 0, &err.to_string()),
                }
            }
        }
    }

    fn route_frame(&mut self, frame: Vec<u8>) {
        let Some(req) = split_request(&frame) else {
            self.writer.log("error", 0, &format!("protocol error: a frame of {} bytes is too short", frame.len()));
            return;
        };
        let (ctx, header) = (req.ctx, (10, 10 + req.header.len()));
        let job = Job { body: header.1, header, frame, stop: false };
        if ctx == 0 {
            return self.control(job);
        }
        let Some(mailbox) = self.contexts.get(&ctx) else {
            return self.fail(&job, Error::ContextDown("unknown_context".into()));
        };
        if let Err((job, err)) = mailbox.push(job) {
            if mailbox.is_dead() {
                self.contexts.remove(&ctx);
            }
            self.fail(&job, err);
        }
    }

    fn fail(&self, job: &Job, err: Error) {
        if job.header().is_empty() {
            self.writer.log("warning", 0, &err.to_string());
        } else {
            self.writer.reply(job.header(), |w| err.write_reply(w));
        }
    }

    fn control(&mut self, job: Job) {
        let term = match Term::decode(job.body()) {
            Ok(t) => t,
            Err(e) => return self.fail(&job, e.into()),
        };
        let result = match &term {
            Term::Tuple(items) => match items.as_slice() {
                [op, id, opts] if op.as_atom() == Some("new_context") => self.new_context(id, opts, job),
                [op, id] if op.as_atom() == Some("stop_context") => self.stop_context(id, job),
                _ => Err((job, Error::BadRequest("unknown control request".into()))),
            },
            Term::Atom(a) if a == "info" => {
                self.info(&job);
                Ok(())
            }
            _ => Err((job, Error::BadRequest("unknown control request".into()))),
        };
        if let Err((job, err)) = result {
            self.fail(&job, err);
        }
    }

    fn new_context(&mut self, id: &Term, opts: &Term, job: Job) -> Result<(), (Job, Error)> {
        let spec = match self.parse_spec(id, opts) {
            Ok(spec) => spec,
            Err(e) => return Err((job, e)),
        };
        if spec.mode == Mode::OwnGil && !self.python.owngil {
            let msg = format!("owngil contexts need Python 3.12 or newer (this is {})", self.python.version);
            return Err((job, Error::BadRequest(msg)));
        }
        if self.contexts.get(&spec.id).is_some_and(|m| !m.is_dead()) {
            return Err((job, Error::BadRequest(format!("context id {} is in use", spec.id))));
        }
        let id = spec.id;
        let header = job.header().to_vec();
        match context::spawn(spec, job, self.writer.clone(), self.config.queue_capacity) {
            Ok(mailbox) => {
                self.contexts.insert(id, mailbox);
                Ok(())
            }
            Err(e) => {
                let err = Error::ContextDown(format!("thread start failed: {e}"));
                self.writer.reply(&header, |w| err.write_reply(w));
                Ok(())
            }
        }
    }

    fn parse_spec(&self, id: &Term, opts: &Term) -> Result<Spec, Error> {
        let id = id.as_u64().filter(|&i| i > 0).ok_or_else(|| Error::BadRequest("context id must be a positive integer".into()))?;
        let mode = match opts.map_get("mode").and_then(Term::as_atom) {
            None | Some("owngil") => Mode::OwnGil,
            Some("main") => Mode::Main,
            Some(other) => return Err(Error::BadRequest(format!("unknown mode {other}"))),
        };
        let text = |key: &str| opts.map_get(key).and_then(Term::as_text);
        let mut path = self.config.path.clone();
        if let Some(Term::List(dirs)) = opts.map_get("path") {
            for d in dirs {
                path.push(d.as_text().ok_or_else(|| Error::BadRequest("path entries must be strings".into()))?);
            }
        }
        Ok(Spec { id, mode, name: text("name"), preload: text("preload"), path })
    }

    fn stop_context(&mut self, id: &Term, job: Job) -> Result<(), (Job, Error)> {
        let Some(mailbox) = id.as_u64().and_then(|id| self.contexts.remove(&id)) else {
            return Err((job, Error::NotFound));
        };
        let job = Job { stop: true, ..job };
        mailbox.push(job).map_err(|(job, _)| (job, Error::NotFound))
    }

    fn info(&mut self, job: &Job) {
        self.contexts.retain(|_, m| !m.is_dead());
        let mut ids: Vec<u64> = self.contexts.keys().copied().collect();
        ids.sort_unstable();
        let info = Term::Map(vec![
            (Term::atom("python_version"), Term::Binary(self.python.version.clone().into_bytes())),
            (Term::atom("owngil"), Term::atom(if self.python.owngil { "true" } else { "false" })),
            (Term::atom("os_pid"), Term::Int(std::process::id() as i64)),
            (Term::atom("contexts"), Term::List(ids.into_iter().map(|i| Term::Int(i as i64)).collect())),
        ]);
        self.writer.reply(job.header(), |w| {
            w.tuple_header(2);
            w.atom("ok");
            info.write(w);
        });
    }
}
