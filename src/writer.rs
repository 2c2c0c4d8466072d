//! The single outbound stream to Erlang, shared by the router and every context thread.
//!
//! Any thread with a finished frame appends it under a short lock. If no other thread is
//! writing, it becomes the flusher and writes everything queued so far in one `write`,
//! repeating until the queue is empty; frames queued meanwhile by others ride along in the
//! next batch. So replies are batched under load without a writer thread to wake.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard};

use crate::error::Error;
use crate::etf;
use crate::framing::{begin_frame, finish_frame, KIND_EVENT, KIND_REPLY};
use crate::sync::Unpoison;

struct Queue {
    pending: Vec<u8>,
    flushing: bool,
    broken: bool,
}

pub struct Writer {
    queue: Mutex<Queue>,
    out: Mutex<File>,
}

impl Writer {
    pub fn new(out: File) -> Self {
        Writer {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                flushing: false,
                broken: false,
            }),
            out: Mutex::new(out),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unpoison()
    }

    /// Queues one complete frame (length prefix included) and flushes if nobody is.
    /// With nothing queued, the frame is written straight from `frame`, uncopied.
    pub fn send(&self, frame: &[u8]) {
        // A forked child writes nothing (src/fork.rs), nor takes a lock that a thread
        // of its parent may have held at the fork.
        if crate::fork::in_child() {
            return;
        }
        let mut q = self.lock();
        if q.broken {
            return;
        }
        if q.flushing {
            q.pending.extend_from_slice(frame);
            return;
        }
        q.flushing = true;
        let mut direct = q.pending.is_empty().then_some(frame);
        if direct.is_none() {
            q.pending.extend_from_slice(frame);
        }
        let mut batch = Vec::new();
        loop {
            let bytes: &[u8] = match direct.take() {
                Some(frame) => frame,
                None => {
                    std::mem::swap(&mut batch, &mut q.pending);
                    &batch
                }
            };
            drop(q);
            let result = self.out.lock().unpoison().write_all(bytes);
            batch.clear();
            q = self.lock();
            if let Err(e) = result {
                // Nothing can be delivered any more. A broken pipe is Erlang closing
                // the port (its node halted, or it let the runtime go): the end of
                // the stream, which nobody needs to hear about on the node's stderr.
                q.broken = true;
                q.flushing = false;
                q.pending = Vec::new();
                if e.kind() != io::ErrorKind::BrokenPipe {
                    eprintln!("pyport: protocol stream failed: {e}");
                }
                return;
            }
            if q.pending.is_empty() {
                q.flushing = false;
                if batch.capacity() > q.pending.capacity() && batch.capacity() <= 1 << 20 {
                    q.pending = batch;
                }
                return;
            }
        }
    }

    /// Sends a reply whose ETF payload is written by `payload`.
    pub fn reply(&self, header: &[u8], payload: impl FnOnce(&mut etf::Writer<'_>)) {
        self.frame(KIND_REPLY, header, payload);
    }

    /// Sends an event for the port owner.
    pub fn event(&self, payload: impl FnOnce(&mut etf::Writer<'_>)) {
        self.frame(KIND_EVENT, &[], payload);
    }

    /// Answers a failed request with `{error, Error}`, or, for a cast (empty header),
    /// logs it at `level` for context `ctx`.
    pub fn fail(&self, header: &[u8], ctx: u64, level: &str, err: &Error) {
        if header.is_empty() {
            self.log(level, ctx, &format!("cast failed: {err}"));
        } else {
            self.reply(header, |w| err.write_reply(w));
        }
    }

    fn frame(&self, kind: u8, header: &[u8], payload: impl FnOnce(&mut etf::Writer<'_>)) {
        let mut frame = Vec::with_capacity(64);
        begin_frame(&mut frame, kind, header);
        payload(&mut etf::Writer::new(&mut frame));
        self.send_finished(frame);
    }

    fn send_finished(&self, mut frame: Vec<u8>) {
        match finish_frame(&mut frame) {
            Ok(()) => self.send(&frame),
            Err(e) => self.log("error", 0, &format!("frame not sent: {e}")),
        }
    }

    /// Sends a frame of `kind` with an empty header and a ready ETF payload.
    pub fn event_kind(&self, kind: u8, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 7);
        begin_frame(&mut frame, kind, &[]);
        frame.extend_from_slice(payload);
        self.send_finished(frame);
    }

    /// Sends `{log, Level, Ctx, Message}`.
    pub fn log(&self, level: &str, ctx: u64, message: &str) {
        self.event(|w| {
            w.tuple_header(4);
            w.atom("log");
            w.atom(level);
            w.int(ctx as i64);
            w.binary(message.as_bytes());
        });
    }

    /// Flushes what the OS buffers hold (used before exiting).
    pub fn flush(&self) -> io::Result<()> {
        self.out.lock().unpoison().flush()
    }
}
