//! One thread per process that wakes whoever asked at the time they asked for: how an engine
//! whose requests are stuck in librbd (a full pool, a cluster that stopped answering) gets
//! back to its reactor when their deadline passes, without a thread per request or per
//! queue, and without a timer in every reactor.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::Instant;

use crate::storage::lock;

/// Something to wake up.
pub(crate) trait Wake: Send + Sync {
    /// Called on the deadline thread at (or just after) the time asked for: must not block.
    fn wake(&self);
}

struct Entry {
    at: Instant,
    seq: u64,
    target: Weak<dyn Wake>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Reversed: the heap's top is the earliest.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

struct Shared {
    timers: Mutex<Timers>,
    cond: Condvar,
}

fn shared() -> Option<&'static Arc<Shared>> {
    static S: OnceLock<Option<Arc<Shared>>> = OnceLock::new();
    S.get_or_init(|| {
        let s = Arc::new(Shared {
            timers: Mutex::new(Timers::default()),
            cond: Condvar::new(),
        });
        let t = s.clone();
        match std::thread::Builder::new()
            .name("xdisk-rbd-deadline".into())
            .spawn(move || run(&t))
        {
            Ok(_) => Some(s),
            Err(e) => {
                tracing::error!("cannot start the RBD deadline thread: {e}; requests past their deadline fail only when the queue next looks");
                None
            }
        }
    })
    .as_ref()
}

fn run(s: &Shared) {
    let mut t = lock(&s.timers);
    loop {
        let now = Instant::now();
        let mut due = Vec::new();
        while t.heap.peek().is_some_and(|e| e.at <= now) {
            if let Some(e) = t.heap.pop() {
                due.push(e.target);
            }
        }
        if !due.is_empty() {
            drop(t);
            for w in due {
                if let Some(w) = w.upgrade() {
                    w.wake();
                }
            }
            t = lock(&s.timers);
            continue;
        }
        t = match t.heap.peek().map(|e| e.at) {
            None => s.cond.wait(t).unwrap_or_else(|e| e.into_inner()),
            Some(at) => {
                s.cond
                    .wait_timeout(t, at.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

/// Calls `target.wake()` at `at` (unless `target` is gone by then).
pub(crate) fn wake_at(at: Instant, target: Weak<dyn Wake>) {
    let Some(s) = shared() else { return };
    let mut t = lock(&s.timers);
    t.seq = t.seq.wrapping_add(1);
    let seq = t.seq;
    let earliest = t.heap.peek().is_none_or(|e| at < e.at);
    t.heap.push(Entry { at, seq, target });
    drop(t);
    if earliest {
        s.cond.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering as O};
    use std::time::Duration;

    struct Count(AtomicU32, Mutex<Vec<Instant>>);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, O::SeqCst);
            lock(&self.1).push(Instant::now());
        }
    }

    #[test]
    fn wakes_in_order_at_the_time_asked_and_not_the_dropped() {
        let a: Arc<Count> = Arc::new(Count(AtomicU32::new(0), Mutex::new(Vec::new())));
        let gone: Arc<Count> = Arc::new(Count(AtomicU32::new(0), Mutex::new(Vec::new())));
        let t0 = Instant::now();
        let aw: Arc<dyn Wake> = a.clone();
        let gw: Arc<dyn Wake> = gone.clone();
        wake_at(t0 + Duration::from_millis(300), Arc::downgrade(&aw));
        wake_at(t0 + Duration::from_millis(100), Arc::downgrade(&aw));
        wake_at(t0 + Duration::from_millis(50), Arc::downgrade(&gw));
        drop(gw);
        drop(gone);
        let until = Instant::now() + Duration::from_secs(20);
        while a.0.load(O::SeqCst) < 2 {
            assert!(Instant::now() < until, "not woken");
            std::thread::sleep(Duration::from_millis(10));
        }
        let times = lock(&a.1).clone();
        assert!(times[0] >= t0 + Duration::from_millis(100));
        assert!(times[1] >= t0 + Duration::from_millis(300));
    }
}
