//! Locks that stay usable after a panic.
//!
//! A panic inside a request is caught and answered as that request's error, and the
//! context lives on (see `context::answer`); a panic on another thread may leave a lock
//! poisoned too. pyport's shared state under a lock is kept whole between statements
//! (queues, maps, counters), so a poisoned lock is taken as it is instead of spreading
//! the panic to every thread that touches it afterwards.

use std::sync::{LockResult, PoisonError};

/// `Mutex::lock`, `RwLock::read`/`write`, `Condvar::wait*`: the guard, poisoned or not.
pub trait Unpoison<G> {
    fn unpoison(self) -> G;
}

impl<G> Unpoison<G> for LockResult<G> {
    fn unpoison(self) -> G {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_poisoned_lock_is_taken_as_it_is() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unpoison();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *m.lock().unpoison() += 1;
        assert_eq!(*m.lock().unpoison(), 2);
    }
}
