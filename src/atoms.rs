//! `max_atoms`: how many atoms Python may create in the Erlang node over a runtime's life.
//!
//! Every `erlang.Atom` that leaves the process (in a reply, a stream item, an
//! `erlang.send`, the arguments of an `erlang.call`) is counted by name, once. Up to the
//! budget, frames are decoded by Erlang as usual. Past it, a frame holding a name not
//! counted yet is marked [`SAFE_DECODE`]: Erlang decodes it with `[safe]`, so atoms that
//! already exist in the node still decode, and one that does not is refused
//! (`{error, {bad_term, {atom_limit, Max}}}`) instead of growing the atom table, which
//! the VM cannot shrink and which aborts the node when full.
//!
//! The budget is the runtime's over its whole life, across restarts of its OS process:
//! Erlang keeps the count and starts each OS process with what is left (`--max-atoms`).
//! So every name counted here is reported to Erlang (an `{atom_admitted, Name}` event,
//! written before the frame that carries the atom), and Erlang counts it when the node
//! does not have that atom yet.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use crate::sync::Unpoison;

/// The bit of a frame's kind byte that asks Erlang to decode the payload with `[safe]`.
pub const SAFE_DECODE: u8 = 0x80;

struct Budget {
    max: usize,
    names: Mutex<HashSet<Box<str>>>,
}

static BUDGET: OnceLock<Budget> = OnceLock::new();

type Report = Box<dyn Fn(&str) + Send + Sync>;
static REPORT: OnceLock<Report> = OnceLock::new();

/// Sets what is told of each name counted (at start-up, once): it runs before the name
/// is admitted, so what it writes goes out before the frame that carries the atom.
pub fn report_with(report: impl Fn(&str) + Send + Sync + 'static) {
    let _ = REPORT.set(Box::new(report));
}

/// Sets the budget (at start-up, once).
pub fn set_max(max: usize) {
    let _ = BUDGET.set(Budget {
        max,
        names: Mutex::new(HashSet::new()),
    });
}

/// Start-up sets the budget from `--max-atoms` (the Erlang side owns its default);
/// without one (library use, unit tests) there is no bound.
fn budget() -> &'static Budget {
    BUDGET.get_or_init(|| Budget {
        max: usize::MAX,
        names: Mutex::new(HashSet::new()),
    })
}

/// The budget.
pub fn max() -> usize {
    budget().max
}

/// Counts an atom name Python sends out; false when the budget is spent and the name
/// was not counted before (its frame must then be decoded safely).
pub fn admit(name: &str) -> bool {
    let b = budget();
    let mut names = b.names.lock().unpoison();
    if names.contains(name) {
        return true;
    }
    if names.len() >= b.max {
        return false;
    }
    // Reported under the lock: another thread cannot send the atom before the report.
    if let Some(report) = REPORT.get() {
        report(name);
    }
    names.insert(name.into());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    static REPORTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    #[test]
    fn names_are_counted_and_reported_once_and_refused_past_the_budget() {
        set_max(2);
        report_with(|name| REPORTED.lock().unwrap().push(name.to_string()));
        assert!(admit("a"));
        assert!(admit("a"));
        assert!(admit("b"));
        assert!(!admit("c"));
        assert!(admit("a"), "a counted name stays admitted");
        assert_eq!(
            *REPORTED.lock().unwrap(),
            ["a", "b"],
            "each counted name once"
        );
    }
}
