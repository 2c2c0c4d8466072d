//! Channels: queues that Erlang feeds (`pyport:channel_send/2`) and Python code of one
//! context reads (`erlang.channel(name)`), sync or from coroutines.
//!
//! Items are kept as ETF bytes and become Python objects only when taken, on the
//! taking thread. The router delivers sends and closes straight here (not through the
//! context's queue), so a thread blocked in `receive()` gets an item even while the
//! context thread is busy. Erlang answers `busy` on its own, from a counter of items
//! Python has not taken: each take is acknowledged with a `channel_ack` event, in
//! batches of half the capacity, or at once when the channel runs empty.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::sync::Unpoison;
use crate::writer::Writer;

struct Chan {
    items: VecDeque<Vec<u8>>,
    capacity: usize,
    closed: bool,
    /// Items taken and not yet acknowledged to Erlang.
    unacked: usize,
    /// Its name, and whether `erlang.channel(name)` still finds it (a channel opened
    /// again under that name replaces it; a closed one is forgotten in time, see
    /// `RETIRED_NAMES`).
    name: String,
    named: bool,
    /// Python `Channel` objects holding its id (`_pyport.channel_lookup` and
    /// `_pyport.channel_release`).
    handles: usize,
}

/// How many closed channels `erlang.channel(name)` still finds (closed), by name.
/// Older ones are forgotten: their names then raise `LookupError`, and what they still
/// held is dropped unless a Python `Channel` object holds them.
pub const RETIRED_NAMES: usize = 1024;

#[derive(Default)]
struct Table {
    /// The channels Python may still take from. A channel leaves once closed and
    /// empty, or closed and out of Python's reach (no `Channel` object holds it and its
    /// name was reused or forgotten): a take then finds it closed.
    chans: HashMap<u64, Chan>,
    /// Each name's latest channel (possibly closed and gone).
    names: HashMap<String, u64>,
    /// Names of closed channels, oldest first (with the channel's id, to tell a name
    /// opened again since), at most `RETIRED_NAMES`.
    retired: VecDeque<(String, u64)>,
    next: u64,
}

impl Table {
    /// Frees channel `id` if no take can ever find an item in it again.
    fn collect(&mut self, id: u64) {
        if let Some(c) = self.chans.get(&id) {
            if c.closed && (c.items.is_empty() || (c.handles == 0 && !c.named)) {
                self.chans.remove(&id);
            }
        }
    }

    /// Channel `id` was closed: its name is retired (forgetting the oldest past the
    /// bound), and it is freed if nothing can take from it.
    fn retire(&mut self, id: u64) {
        if let Some(c) = self.chans.get(&id).filter(|c| c.named) {
            self.retired.push_back((c.name.clone(), id));
            while self.retired.len() > RETIRED_NAMES {
                let Some((name, old)) = self.retired.pop_front() else {
                    break;
                };
                if self.names.get(&name) == Some(&old) {
                    self.names.remove(&name);
                    if let Some(c) = self.chans.get_mut(&old) {
                        c.named = false;
                    }
                    self.collect(old);
                }
            }
        }
        self.collect(id);
    }
}

/// The channels of one context.
#[derive(Default)]
pub struct Channels {
    table: Mutex<Table>,
    arrived: Condvar,
    /// Set when an item or a close arrived, for the context's event loop.
    changed: AtomicBool,
}

/// What a take found.
pub enum Take {
    Item(Vec<u8>),
    Empty,
    Closed,
    Unknown,
}

impl Channels {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unpoison()
    }

    /// Opens channel `name` (an open one of that name is replaced: its readers see it
    /// closed) and returns its id.
    pub fn open(&self, name: &str, capacity: usize) -> u64 {
        let mut t = self.lock();
        t.next += 1;
        let id = t.next;
        if let Some(old) = t.names.insert(name.to_string(), id) {
            if let Some(c) = t.chans.get_mut(&old) {
                c.closed = true;
                c.named = false;
            }
            t.collect(old);
        }
        t.chans.insert(
            id,
            Chan {
                items: VecDeque::new(),
                capacity: capacity.max(1),
                closed: false,
                unacked: 0,
                name: name.to_string(),
                named: true,
                handles: 0,
            },
        );
        drop(t);
        self.notify();
        id
    }

    /// How many channels the context holds (open ones, and closed ones with items
    /// Python may still take), for `pyport:info/1`.
    pub fn count(&self) -> usize {
        self.lock().chans.len()
    }

    /// The id of the channel called `name`, for a new Python `Channel` object (which
    /// calls `release` when it goes).
    pub fn lookup(&self, name: &str) -> Option<u64> {
        let mut t = self.lock();
        let id = t.names.get(name).copied()?;
        if let Some(c) = t.chans.get_mut(&id) {
            c.handles += 1;
        }
        Some(id)
    }

    /// A Python `Channel` object of channel `id` is gone.
    pub fn release(&self, id: u64) {
        let mut t = self.lock();
        if let Some(c) = t.chans.get_mut(&id) {
            c.handles = c.handles.saturating_sub(1);
        }
        t.collect(id);
    }

    /// An item from Erlang (a whole ETF term). Items for a closed or unknown channel
    /// are dropped, as Erlang already answered the sender.
    pub fn push(&self, id: u64, term: Vec<u8>) {
        if let Some(c) = self.lock().chans.get_mut(&id).filter(|c| !c.closed) {
            c.items.push_back(term);
        }
        self.notify();
    }

    /// Erlang closed the channel: readers drain what is left, then see it closed.
    pub fn close(&self, id: u64) {
        let mut t = self.lock();
        if let Some(c) = t.chans.get_mut(&id).filter(|c| !c.closed) {
            c.closed = true;
            t.retire(id);
        }
        drop(t);
        self.notify();
    }

    /// The context ends: every channel is closed.
    pub fn close_all(&self) {
        for c in self.lock().chans.values_mut() {
            c.closed = true;
        }
        self.notify();
    }

    fn notify(&self) {
        self.changed.store(true, Ordering::SeqCst);
        self.arrived.notify_all();
    }

    /// Whether an item or a close arrived since the last call (for the event loop).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    pub fn changed(&self) -> bool {
        self.changed.load(Ordering::SeqCst)
    }

    /// Takes the next item without waiting; acknowledges it to Erlang.
    pub fn take(&self, ctx: u64, id: u64, writer: &Writer) -> Take {
        let mut t = self.lock();
        let Some(c) = t.chans.get_mut(&id) else {
            return Take::Unknown;
        };
        match c.items.pop_front() {
            Some(item) => {
                c.unacked += 1;
                if c.items.is_empty() || c.unacked >= (c.capacity / 2).max(1) {
                    let n = std::mem::take(&mut c.unacked);
                    t.collect(id);
                    drop(t);
                    ack(writer, ctx, id, n);
                }
                Take::Item(item)
            }
            None if c.closed => {
                // Its name stays (retired), so `erlang.channel(name)` still finds it
                // closed.
                t.chans.remove(&id);
                Take::Closed
            }
            None => Take::Empty,
        }
    }

    /// Whether a take would not find the channel empty (an item, or closed).
    pub fn ready(&self, id: u64) -> bool {
        self.lock()
            .chans
            .get(&id)
            .map_or(true, |c| c.closed || !c.items.is_empty())
    }

    /// Blocks (a thread that is not the context's) until `ready(id)` or `until`.
    pub fn wait(&self, id: u64, until: Option<Instant>) {
        let mut t = self.lock();
        loop {
            if t.chans
                .get(&id)
                .map_or(true, |c| c.closed || !c.items.is_empty())
            {
                return;
            }
            t = match until {
                None => self.arrived.wait(t).unpoison(),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    self.arrived.wait_timeout(t, left).unpoison().0
                }
            };
        }
    }
}

/// `{channel_ack, Ctx, ChanId, N}`: Python took `n` items.
fn ack(writer: &Writer, ctx: u64, id: u64, n: usize) {
    writer.event(|w| {
        w.tuple_header(4);
        w.atom("channel_ack");
        w.int(ctx as i64);
        w.int(id as i64);
        w.int(n as i64);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> Writer {
        Writer::new(std::fs::File::create("/dev/null").unwrap())
    }

    fn take_all(ch: &Channels, w: &Writer, id: u64) -> usize {
        let mut n = 0;
        while let Take::Item(_) = ch.take(1, id, w) {
            n += 1;
        }
        n
    }

    #[test]
    fn closed_and_empty_is_freed_and_still_reads_closed() {
        let (ch, w) = (Channels::default(), writer());
        let id = ch.open("q", 4);
        ch.close(id);
        assert_eq!(ch.count(), 0);
        assert_eq!(ch.lookup("q"), Some(id));
        assert!(matches!(ch.take(1, id, &w), Take::Unknown));
        assert!(ch.ready(id));
    }

    #[test]
    fn closed_with_items_stays_until_drained() {
        let (ch, w) = (Channels::default(), writer());
        let id = ch.open("q", 4);
        ch.push(id, vec![131, 97, 1]);
        ch.push(id, vec![131, 97, 2]);
        ch.close(id);
        assert_eq!(ch.count(), 1);
        assert_eq!(take_all(&ch, &w, id), 2);
        assert_eq!(ch.count(), 0);
    }

    #[test]
    fn replaced_channel_goes_unless_python_holds_it() {
        let (ch, w) = (Channels::default(), writer());
        let old = ch.open("q", 4);
        ch.push(old, vec![131, 97, 1]);
        let new = ch.open("q", 4);
        assert_eq!(ch.count(), 1, "nobody can reach the replaced one");
        ch.close(new);

        let held = ch.open("q", 4);
        assert_eq!(ch.lookup("q"), Some(held)); // a Python Channel object
        ch.push(held, vec![131, 97, 1]);
        ch.open("q", 4);
        assert_eq!(ch.count(), 2, "a Python object still takes from it");
        assert_eq!(take_all(&ch, &w, held), 1);
        assert_eq!(ch.count(), 1);
        ch.release(held);
        assert_eq!(ch.count(), 1);

        let dropped = ch.lookup("q").unwrap();
        ch.push(dropped, vec![131, 97, 1]);
        ch.open("q", 4);
        assert_eq!(ch.count(), 2);
        ch.release(dropped);
        assert_eq!(ch.count(), 1);
    }

    #[test]
    fn closed_names_are_bounded() {
        let ch = Channels::default();
        for i in 0..RETIRED_NAMES + 10 {
            let id = ch.open(&format!("n{i}"), 4);
            ch.push(id, vec![131, 97, 1]);
            ch.close(id);
        }
        assert_eq!(ch.count(), RETIRED_NAMES);
        assert_eq!(ch.lookup("n0"), None);
        assert!(ch.lookup(&format!("n{}", RETIRED_NAMES + 9)).is_some());
        assert!(ch.lock().names.len() <= RETIRED_NAMES);
        // one name over and over: its stale entries do not hold anything
        for _ in 0..3 * RETIRED_NAMES {
            let id = ch.open("same", 4);
            ch.close(id);
        }
        assert!(ch.lock().retired.len() <= RETIRED_NAMES);
        assert!(ch.lock().names.len() <= RETIRED_NAMES + 1);
    }
}
