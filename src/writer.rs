//! The single outbound stream to Erlang, shared by the router and every context thread.
//!
//! Any thread with a finished frame appends it under a short lock. If no other thread is
//! writing, it becomes the flusher and writes everything queued so far in one `write`,
//! repeating while frames keep coming; frames queued meanwhile by others ride along in
//! the next batch. So replies are batched under load without a writer thread to wake.
//!
//! The queue is bounded: a sender that finds [`ROOM`] bytes queued behind the flusher
//! waits until a batch has gone out. And a flusher whose own frame is out hands the rest
//! to a waiting sender instead of writing on: a thread that floods the stream (a context
//! in a loop of `erlang.send`) pays for its own frames, and a thread that answers one
//! request between two of them is not kept writing the flood's frames for as long as
//! it lasts.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::Error;
use crate::etf;
use crate::framing::{begin_frame, finish_frame, KIND_EVENT, KIND_REPLY};
use crate::sync::Unpoison;

/// How many bytes may wait behind the flusher before senders wait (plus one frame: a
/// frame larger than this is queued when nothing else is).
pub const ROOM: usize = 1 << 20;

struct Queue {
    pending: Vec<u8>,
    flushing: bool,
    broken: bool,
    /// Bytes ever handed to the stream, and bytes written: stream offsets, so a flusher
    /// knows when its own frame is out.
    queued: u64,
    written: u64,
    /// Senders waiting for room.
    waiting: usize,
}

pub struct Writer {
    queue: Mutex<Queue>,
    /// Signalled when a batch has gone out or the flusher stops.
    room: Condvar,
    out: Mutex<File>,
}

impl Writer {
    pub fn new(out: File) -> Self {
        Writer {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                flushing: false,
                broken: false,
                queued: 0,
                written: 0,
                waiting: 0,
            }),
            room: Condvar::new(),
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
        while q.flushing
            && !q.broken
            && !q.pending.is_empty()
            && q.pending.len() + frame.len() > ROOM
        {
            q.waiting += 1;
            q = self.room.wait(q).unpoison();
            q.waiting -= 1;
        }
        if q.broken {
            return;
        }
        q.queued += frame.len() as u64;
        if q.flushing {
            q.pending.extend_from_slice(frame);
            return;
        }
        q.flushing = true;
        let mine = q.queued;
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
            let sent = bytes.len() as u64;
            batch.clear();
            q = self.lock();
            q.written += sent;
            if let Err(e) = result {
                // Nothing can be delivered any more. A broken pipe is Erlang closing
                // the port (its node halted, or it let the runtime go): the end of
                // the stream, which nobody needs to hear about on the node's stderr.
                q.broken = true;
                q.flushing = false;
                q.pending = Vec::new();
                self.room.notify_all();
                if e.kind() != io::ErrorKind::BrokenPipe {
                    eprintln!("pyport: protocol stream failed: {e}");
                }
                return;
            }
            if q.pending.is_empty() {
                q.flushing = false;
                if batch.capacity() > q.pending.capacity() && batch.capacity() <= ROOM {
                    q.pending = batch;
                }
                self.room.notify_all();
                return;
            }
            if q.waiting > 0 {
                // A sender waits for room: it takes over as flusher once ours is out,
                // or queues behind this batch.
                if q.written >= mine {
                    q.flushing = false;
                    self.room.notify_all();
                    return;
                }
                self.room.notify_all();
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
