//! Fault injection (feature `fault-injection`, for tests only): a [`FaultPlan`] says which
//! operations fail and how (an errno such as EIO or ENOSPC, a short transfer, or a completion
//! that is held back forever, as by a kernel that cannot finish an operation), and
//! [`FaultyEngine`] applies it to any [`Engine`]. [`crate::ImageFile`]'s synchronous I/O
//! consults the same plans (errno faults only).
//!
//! A plan is attached to a file descriptor with [`FaultPlan::register`] (or
//! `ImageFile::inject_faults`): with the feature on, [`super::open_engine`] wraps every engine
//! it builds, so image queues and backends pick the faults up without any change.
//!
//! What each fault does:
//! - [`Fault::Errno`]: the operation does not run (a harmless `fallocate(len 0)` goes to the
//!   engine instead, so that its completion still arrives through the real engine and its
//!   eventfd); it completes with that errno. A failed read's buffer is filled with garbage.
//! - [`Fault::Short`]: reads and writes of at least 1 KiB report half their length (rounded
//!   down to 512 bytes); a short read's buffer past that point is filled with garbage. A
//!   short write still writes everything (the device may have written any part of it).
//! - [`Fault::Hold`]: the operation runs, but its completion is kept by the wrapper and never
//!   returned: waiting for it fails, [`Engine::settle`] fails, and the buffer is leaked when
//!   the engine is dropped (what a real engine must do when the kernel may still use it).
//! - [`Fault::Late`]: what an engine with a deadline per request does when the storage keeps
//!   an operation too long (librbd, [`super::Phase`]): the operation runs, but completes with
//!   ETIMEDOUT. A [`IoBuf::lendable`] buffer is not handed back then ([`Phase::TimedOut`]):
//!   the wrapper keeps it, and once a no-op sent through the inner engine has completed (a
//!   later wake-up of its eventfd), overwrites it with garbage (the storage writing late) and
//!   hands it back ([`Phase::Released`]). Other buffers come back with the error at once.

use std::collections::HashMap;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Completion, Engine, Op, OpKind, Phase};
use crate::buf::IoBuf;
use crate::cache::AioKind;

/// Which operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOn {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// Flushes only.
    Flush,
    /// Reads and writes.
    ReadWrite,
    /// Reads, writes and flushes.
    Any,
}

impl FaultOn {
    fn matches(self, class: Class) -> bool {
        matches!(
            (self, class),
            (FaultOn::Read, Class::Read)
                | (FaultOn::Write, Class::Write)
                | (FaultOn::Flush, Class::Flush)
                | (FaultOn::ReadWrite, Class::Read | Class::Write)
                | (FaultOn::Any, _)
        )
    }
}

/// What happens to a chosen operation (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails with this errno (e.g. `libc::EIO`, `libc::ENOSPC`) without running.
    Errno(i32),
    /// Transfers half the bytes (reads and writes of at least 1 KiB; others run normally).
    Short,
    /// Runs, but the completion is never handed back.
    Hold,
    /// Runs, but fails with ETIMEDOUT; a lendable buffer is handed back later, scribbled.
    Late,
}

/// The kind of an operation, as far as faults are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A read (engine `Read` op or synchronous read).
    Read,
    /// A write (engine `Write` op or synchronous write).
    Write,
    /// A flush (fdatasync).
    Flush,
}

impl Class {
    fn of(kind: OpKind) -> Option<Class> {
        match kind {
            OpKind::Read => Some(Class::Read),
            OpKind::Write => Some(Class::Write),
            OpKind::Flush => Some(Class::Flush),
            OpKind::Fallocate { .. } => None,
        }
    }
}

struct Rule {
    on: FaultOn,
    /// Matching operations let through before the rule fires.
    skip: u64,
    /// How many times it fires (u64::MAX: forever).
    times: u64,
    fault: Fault,
}

struct Random {
    state: u64,
    per_million: u32,
    on: FaultOn,
    faults: Vec<Fault>,
}

impl Random {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    random: Option<Random>,
}

/// Which operations fail, and how. Shared (`Arc`) between the test and the engines.
#[derive(Default)]
pub struct FaultPlan {
    state: Mutex<State>,
    injected: AtomicU64,
}

impl std::fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultPlan")
            .field("injected", &self.injected())
            .finish()
    }
}

impl FaultPlan {
    /// An empty plan (no operation fails until rules are added).
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After `skip` matching operations, the next `times` ones get `fault`
    /// (`u64::MAX`: every one from then on).
    pub fn add(&self, on: FaultOn, skip: u64, times: u64, fault: Fault) {
        if times > 0 {
            self.lock().rules.push(Rule {
                on,
                skip,
                times,
                fault,
            });
        }
    }

    /// The next matching operation gets `fault`.
    pub fn fail_next(&self, on: FaultOn, fault: Fault) {
        self.add(on, 0, 1, fault);
    }

    /// Every matching operation from now on gets `fault`.
    pub fn fail_always(&self, on: FaultOn, fault: Fault) {
        self.add(on, 0, u64::MAX, fault);
    }

    /// Each matching operation not chosen by a rule gets one of `faults` (picked at random)
    /// with probability `per_million` / 1,000,000; deterministic for a given `seed`.
    pub fn random(&self, seed: u64, per_million: u32, on: FaultOn, faults: &[Fault]) {
        self.lock().random = Some(Random {
            state: seed | 1,
            per_million,
            on,
            faults: faults.to_vec(),
        });
    }

    /// Removes every rule and the random faults.
    pub fn clear(&self) {
        *self.lock() = State::default();
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Decides the fault of one operation of `len` bytes.
    pub fn decide(&self, class: Class, len: usize) -> Option<Fault> {
        let mut st = self.lock();
        let mut fired = None;
        for r in st.rules.iter_mut().filter(|r| r.on.matches(class)) {
            if r.skip > 0 {
                r.skip -= 1;
            } else if fired.is_none() {
                fired = Some(r.fault);
                if r.times != u64::MAX {
                    r.times -= 1;
                }
            }
        }
        st.rules.retain(|r| r.times > 0);
        if fired.is_none() {
            if let Some(rnd) = st.random.as_mut().filter(|r| r.on.matches(class)) {
                let x = rnd.next();
                if !rnd.faults.is_empty() && x % 1_000_000 < u64::from(rnd.per_million) {
                    let pick = (x / 1_000_000) as usize % rnd.faults.len();
                    fired = Some(rnd.faults[pick]);
                }
            }
        }
        drop(st);
        let fired = match fired {
            Some(Fault::Short) if class == Class::Flush || short_len(len).is_none() => None,
            f => f,
        };
        if fired.is_some() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fired
    }

    /// Attaches this plan to `fd` until the returned guard is dropped: engines built by
    /// [`super::open_engine`] and `ImageFile` then apply it to every operation on `fd`.
    pub fn register(self: &Arc<Self>, fd: RawFd) -> Registration {
        let mut reg = registry();
        reg.retain(|(f, _)| *f != fd);
        reg.push((fd, Arc::clone(self)));
        ACTIVE.store(reg.len(), Ordering::SeqCst);
        Registration { fd }
    }
}

/// Keeps a plan attached to a file descriptor (see [`FaultPlan::register`]).
#[derive(Debug)]
pub struct Registration {
    fd: RawFd,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut reg = registry();
        reg.retain(|(f, _)| *f != self.fd);
        ACTIVE.store(reg.len(), Ordering::SeqCst);
    }
}

type Registry = Vec<(RawFd, Arc<FaultPlan>)>;

static REGISTRY: Mutex<Registry> = Mutex::new(Vec::new());
/// Plans registered (a cheap check before taking the lock).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The plan registered for `fd`, if any.
pub fn plan_for(fd: RawFd) -> Option<Arc<FaultPlan>> {
    if ACTIVE.load(Ordering::SeqCst) == 0 {
        return None;
    }
    registry()
        .iter()
        .find(|(f, _)| *f == fd)
        .map(|(_, p)| Arc::clone(p))
}

/// Bytes a short transfer of `len` reports: half, rounded down to 512 (None under 1 KiB).
fn short_len(len: usize) -> Option<usize> {
    (len >= 1024).then(|| len / 2 / 512 * 512)
}

/// Overwrites `[from, to)` of a buffer with a recognisable garbage pattern.
fn scribble<B: IoBuf>(buf: &mut B, from: usize, to: usize) {
    if from < to {
        let garbage = vec![0xa5u8; to - from];
        buf.copy_in(from, &garbage);
    }
}

/// The late release of a [`Fault::Late`] operation's lent buffer, the storage having written
/// into it meanwhile (garbage) if it was a read (a write's memory is only read: it may be a
/// read-only mapping).
fn released<B: IoBuf>(
    user_data: u64,
    kind: OpKind,
    mut b: B,
    result: io::Result<usize>,
) -> Completion<B> {
    if kind == OpKind::Read {
        let n = b.total_len();
        scribble(&mut b, 0, n);
    }
    Completion {
        user_data,
        result,
        buf: Some(b),
        phase: Phase::Released,
    }
}

fn stuck() -> io::Error {
    io::Error::other("fault injection: completions are held back (the engine cannot reap)")
}

/// What the wrapper remembers of an operation in the inner engine.
struct Pending<B> {
    user_data: u64,
    kind: OpKind,
    fd: RawFd,
    offset: u64,
    fault: Option<Fault>,
    len: usize,
    /// The buffer of an op replaced by a no-op (errno faults).
    saved: Option<B>,
}

/// Where the wrapper finds its plan.
enum Source {
    Fixed(Arc<FaultPlan>),
    Registry,
}

/// An [`Engine`] that applies a [`FaultPlan`] to the operations of another engine.
pub struct FaultyEngine<B: IoBuf> {
    inner: Box<dyn Engine<B>>,
    source: Source,
    pending: HashMap<u64, Pending<B>>,
    next_key: u64,
    /// Completions held back ([`Fault::Hold`]): never returned, leaked on drop.
    held: Vec<Completion<B>>,
    /// Buffers of [`Fault::Late`] operations reported [`Phase::TimedOut`], by the key of the
    /// no-op whose completion releases them: the caller's user_data, the operation's kind,
    /// the buffer, the result.
    lent: HashMap<u64, (u64, OpKind, B, io::Result<usize>)>,
    scratch: Vec<Completion<B>>,
}

impl<B: IoBuf> FaultyEngine<B> {
    /// Applies `plan` to every operation of `inner`.
    pub fn new(inner: Box<dyn Engine<B>>, plan: Arc<FaultPlan>) -> FaultyEngine<B> {
        Self::with_source(inner, Source::Fixed(plan))
    }

    /// Applies to each operation the plan registered for its fd (none: no fault).
    pub fn registered(inner: Box<dyn Engine<B>>) -> FaultyEngine<B> {
        Self::with_source(inner, Source::Registry)
    }

    fn with_source(inner: Box<dyn Engine<B>>, source: Source) -> FaultyEngine<B> {
        FaultyEngine {
            inner,
            source,
            pending: HashMap::new(),
            next_key: 0,
            held: Vec::new(),
            lent: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Completions held back so far.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn plan(&self, fd: RawFd) -> Option<Arc<FaultPlan>> {
        match &self.source {
            Source::Fixed(p) => Some(Arc::clone(p)),
            Source::Registry => plan_for(fd),
        }
    }

    /// Turns inner completions into the wrapper's: applies faults, holds what must be held.
    fn translate(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let mut got = 0;
        let mut comps = std::mem::take(&mut self.scratch);
        for mut c in comps.drain(..) {
            if let Some((user_data, kind, b, result)) = self.lent.remove(&c.user_data) {
                out.push(released(user_data, kind, b, result));
                got += 1;
                continue;
            }
            let Some(p) = self.pending.remove(&c.user_data) else {
                tracing::error!(key = c.user_data, "fault injection: unknown completion");
                continue;
            };
            c.user_data = p.user_data;
            match p.fault {
                None => {}
                Some(Fault::Hold) => {
                    self.held.push(c);
                    continue;
                }
                Some(Fault::Errno(e)) => {
                    c.buf = p.saved;
                    if p.kind == OpKind::Read {
                        if let Some(b) = c.buf.as_mut() {
                            scribble(b, 0, p.len);
                        }
                    }
                    c.result = Err(io::Error::from_raw_os_error(e));
                }
                Some(Fault::Late) => {
                    let timed_out = io::Error::from_raw_os_error(libc::ETIMEDOUT);
                    let result = std::mem::replace(&mut c.result, Err(timed_out));
                    if let Some(b) = c.buf.take_if(|b| b.lendable()) {
                        let key = self.next_key;
                        self.next_key = self.next_key.wrapping_add(1);
                        let noop = Op {
                            kind: OpKind::Fallocate { mode: 0, len: 0 },
                            fd: p.fd,
                            offset: 0,
                            buf: None,
                            user_data: key,
                        };
                        c.phase = Phase::TimedOut;
                        if self.inner.submit(noop).is_ok() {
                            self.lent.insert(key, (c.user_data, p.kind, b, result));
                        } else {
                            // No room for the no-op: let go at once, after the timeout.
                            out.push(c);
                            out.push(released(p.user_data, p.kind, b, result));
                            got += 2;
                            continue;
                        }
                    }
                }
                Some(Fault::Short) => {
                    if let (Ok(n), Some(short)) = (&c.result, short_len(p.len)) {
                        let n = *n;
                        if n > short {
                            if p.kind == OpKind::Read {
                                if let Some(b) = c.buf.as_mut() {
                                    scribble(b, short, n);
                                }
                            }
                            c.result = Ok(short);
                        }
                    }
                }
            }
            out.push(c);
            got += 1;
        }
        self.scratch = comps;
        got
    }
}

impl<B: IoBuf> Engine<B> for FaultyEngine<B> {
    fn kind(&self) -> AioKind {
        self.inner.kind()
    }

    fn submit(&mut self, mut op: Op<B>) -> Result<(), (Op<B>, io::Error)> {
        let len = op.buf.as_ref().map_or(0, |b| b.total_len());
        let fault = Class::of(op.kind)
            .and_then(|class| Some((class, self.plan(op.fd)?)))
            .and_then(|(class, plan)| plan.decide(class, len));
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        let mut p = Pending {
            user_data: op.user_data,
            kind: op.kind,
            fd: op.fd,
            offset: op.offset,
            fault,
            len,
            saved: None,
        };
        let inner_op = match fault {
            Some(Fault::Errno(_)) => {
                p.saved = op.buf.take();
                // fallocate(len 0) fails with EINVAL before touching anything.
                Op {
                    kind: OpKind::Fallocate { mode: 0, len: 0 },
                    fd: op.fd,
                    offset: 0,
                    buf: None,
                    user_data: key,
                }
            }
            _ => Op {
                user_data: key,
                ..op
            },
        };
        match self.inner.submit(inner_op) {
            Ok(()) => {
                self.pending.insert(key, p);
                Ok(())
            }
            Err((back, e)) => {
                let buf = p.saved.take().or(back.buf);
                Err((
                    Op {
                        kind: p.kind,
                        fd: p.fd,
                        offset: p.offset,
                        buf,
                        user_data: p.user_data,
                    },
                    e,
                ))
            }
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        self.inner.commit()
    }

    fn reap(
        &mut self,
        out: &mut Vec<Completion<B>>,
        min: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let mut got = 0;
        loop {
            let want = min.saturating_sub(got);
            let inner_want = match timeout {
                None => want.min(self.inner.in_flight()),
                Some(_) => want,
            };
            let mut comps = std::mem::take(&mut self.scratch);
            let r = self.inner.reap(&mut comps, inner_want, timeout);
            self.scratch = comps;
            r?;
            got += self.translate(out);
            if !self.lent.is_empty() {
                self.inner.commit()?;
            }
            if got >= min || timeout.is_some() || self.in_flight() == 0 {
                return Ok(got);
            }
            if self.inner.in_flight() == 0 {
                // Only held completions are left: a wait for them would never end.
                return Err(stuck());
            }
        }
    }

    fn event_fd(&self) -> RawFd {
        self.inner.event_fd()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn settle(&mut self, out: &mut Vec<Completion<B>>) -> io::Result<()> {
        loop {
            let mut comps = std::mem::take(&mut self.scratch);
            let r = self.inner.settle(&mut comps);
            self.scratch = comps;
            r?;
            self.translate(out);
            // Late operations sent no-ops that release their buffers: settle those too.
            if self.lent.is_empty() {
                break;
            }
            self.inner.commit()?;
        }
        if self.held.is_empty() {
            Ok(())
        } else {
            Err(stuck())
        }
    }
}

impl<B: IoBuf> Drop for FaultyEngine<B> {
    /// Held completions stand for operations the kernel never finished: their buffers are
    /// leaked, never freed (as a real engine must do).
    fn drop(&mut self) {
        if !self.held.is_empty() {
            tracing::error!(
                "fault injection: leaking the buffers of {} operations held back",
                self.held.len()
            );
            std::mem::forget(std::mem::take(&mut self.held));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;
    use crate::engine::ThreadsEngine;
    use crate::{CacheMode, EngineConfig, ImageFile};
    use std::os::fd::AsRawFd;

    fn engine(plan: &Arc<FaultPlan>) -> FaultyEngine<AlignedBuf> {
        let inner = ThreadsEngine::<AlignedBuf>::new(&EngineConfig::default()).unwrap();
        FaultyEngine::new(Box::new(inner), Arc::clone(plan))
    }

    fn op(kind: OpKind, fd: RawFd, len: usize, user_data: u64) -> Op<AlignedBuf> {
        let mut buf = AlignedBuf::new(len, 4096);
        buf.fill(0x11);
        Op {
            kind,
            fd,
            offset: 0,
            buf: (len > 0).then_some(buf),
            user_data,
        }
    }

    fn one(e: &mut FaultyEngine<AlignedBuf>, o: Op<AlignedBuf>) -> Completion<AlignedBuf> {
        e.submit(o).map_err(|(_, e)| e).unwrap();
        let mut out = Vec::new();
        assert_eq!(e.reap(&mut out, 1, None).unwrap(), 1);
        out.pop().unwrap()
    }

    #[test]
    fn faults_apply_in_order_then_stop() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(65536).unwrap();
        let fd = f.as_raw_fd();
        let plan = FaultPlan::new();
        plan.add(FaultOn::Write, 1, 1, Fault::Errno(libc::ENOSPC));
        plan.fail_next(FaultOn::Read, Fault::Short);
        let mut e = engine(&plan);
        // The first write passes, the second fails without writing, the third passes.
        assert_eq!(
            *one(&mut e, op(OpKind::Write, fd, 4096, 1))
                .result
                .as_ref()
                .unwrap(),
            4096
        );
        let c = one(&mut e, op(OpKind::Write, fd, 4096, 2));
        assert_eq!(c.user_data, 2);
        assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert!(c.buf.is_some(), "the buffer comes back");
        assert_eq!(
            *one(&mut e, op(OpKind::Write, fd, 4096, 3))
                .result
                .as_ref()
                .unwrap(),
            4096
        );
        // A short read reports half and leaves garbage past it.
        let c = one(&mut e, op(OpKind::Read, fd, 4096, 4));
        assert_eq!(*c.result.as_ref().unwrap(), 2048);
        let b = c.buf.unwrap();
        assert!(b[..2048].iter().all(|&x| x == 0x11));
        assert!(b[2048..].iter().all(|&x| x == 0xa5));
        assert_eq!(
            *one(&mut e, op(OpKind::Read, fd, 4096, 5))
                .result
                .as_ref()
                .unwrap(),
            4096
        );
        assert_eq!(plan.injected(), 2);
    }

    #[test]
    fn held_completions_make_waits_and_settle_fail() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let plan = FaultPlan::new();
        plan.fail_next(FaultOn::Write, Fault::Hold);
        let mut e = engine(&plan);
        e.submit(op(OpKind::Write, fd, 4096, 1))
            .map_err(|(_, e)| e)
            .unwrap();
        let mut out = Vec::new();
        assert!(e.reap(&mut out, 1, None).is_err());
        assert_eq!(
            e.reap(&mut out, 1, Some(Duration::from_millis(10)))
                .unwrap(),
            0
        );
        assert_eq!(e.in_flight(), 1);
        assert_eq!(e.held(), 1);
        assert!(e.settle(&mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn a_failed_flush_breaks_the_file_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 8192]).unwrap();
        let file = ImageFile::open(&path, false, CacheMode::WriteBack).unwrap();
        let plan = FaultPlan::new();
        file.inject_faults(&plan);
        file.write_at(&[1; 512], 0).unwrap();
        plan.fail_next(FaultOn::Flush, Fault::Errno(libc::EIO));
        assert_eq!(file.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(file.is_broken());
        for r in [
            file.flush(),
            file.write_at(&[2; 512], 0),
            file.zero_range(0, 4096),
            file.punch_hole(0, 4096),
            file.set_len(4096),
        ] {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        }
        let mut b = [0u8; 512];
        file.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 512]);
        drop(file);
        let file = ImageFile::open(&path, false, CacheMode::WriteBack).unwrap();
        file.write_at(&[3; 512], 0).unwrap();
        file.flush().unwrap();
    }
}
