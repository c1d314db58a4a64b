//! One generic test suite, run against each engine built directly (no fallback): io_uring,
//! native AIO and threads, on O_DIRECT (cache=none) and buffered (cache=writeback) files.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use support::{config, readable, split_lens, try_engine, Fixture, SegBuf, BLOCK};
use xdisk_io::{AioKind, AlignedBuf, CacheMode, Completion, Engine, Op, OpKind};

type Eng = Box<dyn Engine<SegBuf>>;

fn engine(kind: AioKind, qd: u32) -> Option<Eng> {
    try_engine(kind, &config(qd))
}

fn op(kind: OpKind, fd: i32, offset: u64, buf: Option<SegBuf>, user_data: u64) -> Op<SegBuf> {
    Op {
        kind,
        fd,
        offset,
        buf,
        user_data,
    }
}

fn submit(e: &mut Eng, o: Op<SegBuf>) {
    if let Err((_, err)) = e.submit(o) {
        panic!("submit failed: {err}");
    }
}

/// Submits one op and waits for its completion.
fn run(e: &mut Eng, o: Op<SegBuf>) -> Completion<SegBuf> {
    let ud = o.user_data;
    submit(e, o);
    let mut out = Vec::new();
    assert_eq!(e.reap(&mut out, 1, None).unwrap(), 1);
    let c = out.pop().unwrap();
    assert_eq!(c.user_data, ud);
    c
}

fn write_data(e: &mut Eng, fd: i32, off: u64, data: &[u8], lens: &[usize]) {
    let c = run(
        e,
        op(
            OpKind::Write,
            fd,
            off,
            Some(SegBuf::from_data(data, lens)),
            1,
        ),
    );
    assert_eq!(c.result.unwrap(), data.len());
}

fn read_data(e: &mut Eng, fd: i32, off: u64, lens: &[usize]) -> (usize, Vec<u8>) {
    let c = run(e, op(OpKind::Read, fd, off, Some(SegBuf::zeroed(lens)), 2));
    (c.result.unwrap(), c.buf.unwrap().to_vec())
}

fn random_bytes(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

// ---------------------------------------------------------------------------------------
// A driver that keeps many ops in flight against an in-memory model of the file.

/// An operation to issue, in blocks of BLOCK bytes.
#[derive(Debug, Clone)]
enum Step {
    Write {
        block: usize,
        blocks: usize,
        segs: usize,
        seed: u64,
    },
    Read {
        block: usize,
        blocks: usize,
        segs: usize,
    },
    Flush,
    Punch {
        block: usize,
        blocks: usize,
    },
    /// Reap with this `min` (clamped to what is in flight).
    Reap(usize),
}

enum Pending {
    Write {
        range: (usize, usize),
        len: usize,
    },
    Read {
        range: (usize, usize),
        expect: Vec<u8>,
    },
    Flush,
    Punch {
        range: (usize, usize),
    },
}

impl Pending {
    fn range(&self) -> Option<(usize, usize)> {
        match self {
            Pending::Write { range, .. }
            | Pending::Read { range, .. }
            | Pending::Punch { range } => Some(*range),
            Pending::Flush => None,
        }
    }
    fn mutates(&self) -> bool {
        matches!(self, Pending::Write { .. } | Pending::Punch { .. })
    }
}

struct Driver {
    e: Eng,
    fd: i32,
    model: Vec<u8>,
    pending: HashMap<u64, Pending>,
    next_ud: u64,
    /// Completions that came back before an op submitted earlier.
    out_of_order: usize,
    completed: usize,
    would_block: usize,
    max_in_flight: usize,
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Driver {
    fn new(e: Eng, fx: &Fixture, size: usize) -> Driver {
        Driver {
            e,
            fd: fx.fd(),
            model: vec![0; size],
            pending: HashMap::new(),
            next_ud: 1,
            out_of_order: 0,
            completed: 0,
            would_block: 0,
            max_in_flight: 0,
        }
    }

    fn blocks(&self) -> usize {
        self.model.len() / BLOCK
    }

    /// Reaps at least `min` completions and checks each against what was expected.
    fn reap(&mut self, min: usize) {
        let mut out = Vec::new();
        let n = self.e.reap(&mut out, min, None).unwrap();
        assert_eq!(n, out.len());
        assert!(n >= min.min(self.pending.len()), "reap returned too few");
        for c in out {
            let oldest = self.pending.keys().copied().min();
            if oldest.is_some_and(|o| o < c.user_data) {
                self.out_of_order += 1;
            }
            let p = self
                .pending
                .remove(&c.user_data)
                .unwrap_or_else(|| panic!("unknown user_data {}", c.user_data));
            self.completed += 1;
            match p {
                Pending::Write { len, .. } => {
                    assert_eq!(c.result.unwrap(), len, "write length");
                }
                Pending::Read { expect, range } => {
                    let n = c.result.unwrap();
                    assert_eq!(n, expect.len(), "read length");
                    let got = c.buf.unwrap().to_vec();
                    assert!(
                        got == expect,
                        "read of bytes {}..{} differs from the model",
                        range.0,
                        range.1
                    );
                }
                Pending::Flush | Pending::Punch { .. } => {
                    assert_eq!(c.result.unwrap(), 0);
                }
            }
        }
        assert_eq!(self.e.in_flight(), self.pending.len());
    }

    /// Waits until no in-flight op conflicts with `range` (mutating: any overlap; reading:
    /// overlap with a mutating op).
    fn wait_conflicts(&mut self, range: (usize, usize), mutating: bool) {
        while self.pending.values().any(|p| {
            p.range()
                .is_some_and(|r| overlaps(r, range) && (mutating || p.mutates()))
        }) {
            self.reap(1);
        }
    }

    fn clamp(&self, block: usize, blocks: usize) -> (usize, usize) {
        let block = block % self.blocks();
        let blocks = blocks.clamp(1, self.blocks() - block);
        (block, blocks)
    }

    fn issue_op(&mut self, mut o: Op<SegBuf>, p: Pending) {
        loop {
            match self.e.submit(o) {
                Ok(()) => break,
                Err((back, err)) => {
                    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
                    assert_eq!(self.e.in_flight(), self.e.capacity());
                    self.would_block += 1;
                    o = back;
                    self.reap(1);
                }
            }
        }
        self.pending.insert(self.next_ud, p);
        self.next_ud += 1;
        self.max_in_flight = self.max_in_flight.max(self.e.in_flight());
    }

    fn step(&mut self, s: &Step) {
        let ud = self.next_ud;
        match *s {
            Step::Write {
                block,
                blocks,
                segs,
                seed,
            } => {
                let (block, blocks) = self.clamp(block, blocks);
                let range = (block * BLOCK, (block + blocks) * BLOCK);
                self.wait_conflicts(range, true);
                let mut rng = StdRng::seed_from_u64(seed);
                let data = random_bytes(&mut rng, range.1 - range.0);
                let lens = split_lens(&mut rng, data.len(), segs);
                self.model[range.0..range.1].copy_from_slice(&data);
                let buf = SegBuf::from_data(&data, &lens);
                let o = op(OpKind::Write, self.fd, range.0 as u64, Some(buf), ud);
                self.issue_op(
                    o,
                    Pending::Write {
                        range,
                        len: data.len(),
                    },
                );
            }
            Step::Read {
                block,
                blocks,
                segs,
            } => {
                let (block, blocks) = self.clamp(block, blocks);
                let range = (block * BLOCK, (block + blocks) * BLOCK);
                self.wait_conflicts(range, false);
                let mut rng = StdRng::seed_from_u64(ud);
                let lens = split_lens(&mut rng, range.1 - range.0, segs);
                let expect = self.model[range.0..range.1].to_vec();
                let o = op(
                    OpKind::Read,
                    self.fd,
                    range.0 as u64,
                    Some(SegBuf::zeroed(&lens)),
                    ud,
                );
                self.issue_op(o, Pending::Read { range, expect });
            }
            Step::Flush => {
                let o = op(OpKind::Flush, self.fd, 0, None, ud);
                self.issue_op(o, Pending::Flush);
            }
            Step::Punch { block, blocks } => {
                let (block, blocks) = self.clamp(block, blocks);
                let range = (block * BLOCK, (block + blocks) * BLOCK);
                self.wait_conflicts(range, true);
                self.model[range.0..range.1].fill(0);
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let o = op(
                    OpKind::Fallocate {
                        mode,
                        len: (range.1 - range.0) as u64,
                    },
                    self.fd,
                    range.0 as u64,
                    None,
                    ud,
                );
                self.issue_op(o, Pending::Punch { range });
            }
            Step::Reap(min) => {
                let min = min.min(self.pending.len());
                self.reap(min);
            }
        }
        if self.next_ud.is_multiple_of(7) {
            // Push what is queued now and then without waiting (batches of varying size).
            self.e.commit().unwrap();
        }
    }

    /// Reaps everything, then compares the whole file with the model.
    fn finish(&mut self, fx: &Fixture) {
        while !self.pending.is_empty() {
            let n = self.pending.len();
            self.reap(n);
        }
        assert_eq!(self.e.in_flight(), 0);
        let on_disk = fx.contents();
        assert_eq!(on_disk.len(), self.model.len(), "file size changed");
        if let Some(i) = (0..on_disk.len()).find(|&i| on_disk[i] != self.model[i]) {
            panic!("file differs from the model at byte {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The generic tests.

/// Random aligned writes and reads of random sizes and segmentations, up to 64 in flight.
fn random_roundtrip(kind: AioKind, cache: CacheMode) {
    const SIZE: usize = 16 << 20;
    let fx = Fixture::new(cache, SIZE as u64);
    let Some(e) = engine(kind, 64) else { return };
    assert_eq!(e.capacity(), 64);
    let mut d = Driver::new(e, &fx, SIZE);
    let mut rng = StdRng::seed_from_u64(0x5eed ^ kind as u64 ^ ((cache as u64) << 8));
    let blocks = SIZE / BLOCK;
    for i in 0..600 {
        let block = rng.gen_range(0..blocks);
        let n = rng.gen_range(1..=8);
        let segs = rng.gen_range(1..=4);
        let s = if i < 300 || rng.gen_bool(0.5) {
            Step::Write {
                block,
                blocks: n,
                segs,
                seed: rng.gen(),
            }
        } else {
            Step::Read {
                block,
                blocks: n,
                segs,
            }
        };
        d.step(&s);
    }
    // Read everything back, 64 at a time.
    for block in (0..blocks).step_by(16) {
        d.step(&Step::Read {
            block,
            blocks: 16,
            segs: 3,
        });
    }
    d.finish(&fx);
    eprintln!(
        "{kind}/{cache}: {} ops, {} completed out of submission order, {} WouldBlock, \
         at most {} in flight",
        d.completed, d.out_of_order, d.would_block, d.max_in_flight
    );
    assert_eq!(d.max_in_flight, 64, "the queue never filled up");
}

/// The same with the crate's own AlignedBuf (single iovec: plain READ/WRITE opcodes).
fn aligned_buf_roundtrip(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = try_engine::<AlignedBuf>(kind, &config(32)) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(7);
    let mut expect = HashMap::new();
    for i in 0..32u64 {
        let mut b = AlignedBuf::new(2 * BLOCK, BLOCK);
        rng.fill_bytes(&mut b);
        expect.insert(i, b.to_vec());
        let o = Op {
            kind: OpKind::Write,
            fd: fx.fd(),
            offset: i * 2 * BLOCK as u64,
            buf: Some(b),
            user_data: i,
        };
        assert!(e.submit(o).is_ok());
    }
    let mut out = Vec::new();
    assert_eq!(e.reap(&mut out, 32, None).unwrap(), 32);
    assert!(out.iter().all(|c| *c.result.as_ref().unwrap() == 2 * BLOCK));
    // Read back, reusing the returned buffers.
    for c in out.drain(..) {
        let mut b = c.buf.unwrap();
        b.fill(0);
        let o = Op {
            kind: OpKind::Read,
            fd: fx.fd(),
            offset: c.user_data * 2 * BLOCK as u64,
            buf: Some(b),
            user_data: c.user_data,
        };
        assert!(e.submit(o).is_ok());
    }
    assert_eq!(e.reap(&mut out, 32, None).unwrap(), 32);
    for c in out {
        assert_eq!(c.result.unwrap(), 2 * BLOCK);
        assert_eq!(&c.buf.unwrap()[..], &expect[&c.user_data][..]);
    }
}

/// Writes with one segmentation, reads back with others.
fn vectored(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = engine(kind, 8) else { return };
    let data = random_bytes(&mut StdRng::seed_from_u64(1), 4 * BLOCK);
    write_data(
        &mut e,
        fx.fd(),
        8 * BLOCK as u64,
        &data,
        &[BLOCK, 2 * BLOCK, BLOCK],
    );
    for lens in [
        vec![4 * BLOCK],
        vec![3 * BLOCK, BLOCK],
        vec![BLOCK; 4],
        vec![BLOCK, 2 * BLOCK, BLOCK],
    ] {
        let (n, got) = read_data(&mut e, fx.fd(), 8 * BLOCK as u64, &lens);
        assert_eq!(n, data.len());
        assert_eq!(got, data, "segments {lens:?}");
    }
    assert_eq!(&fx.contents()[8 * BLOCK..12 * BLOCK], &data[..]);
}

fn flush(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = engine(kind, 8) else { return };
    let data = vec![0x5a; 2 * BLOCK];
    write_data(&mut e, fx.fd(), 0, &data, &[2 * BLOCK]);
    let c = run(&mut e, op(OpKind::Flush, fx.fd(), 0, None, 9));
    assert_eq!(c.result.unwrap(), 0);
    assert!(c.buf.is_none());
    // A flush batched with writes.
    for i in 0..4 {
        let b = SegBuf::from_data(&data, &[BLOCK, BLOCK]);
        submit(&mut e, op(OpKind::Write, fx.fd(), i * 8192, Some(b), i));
    }
    submit(&mut e, op(OpKind::Flush, fx.fd(), 0, None, 100));
    let mut out = Vec::new();
    assert_eq!(e.reap(&mut out, 5, None).unwrap(), 5);
    for c in out {
        let n = c.result.unwrap();
        assert_eq!(n, if c.user_data == 100 { 0 } else { 2 * BLOCK });
    }
}

/// Punching a hole makes the range read as zeroes; mode 0 extends the file.
fn fallocate(kind: AioKind, cache: CacheMode) {
    const SIZE: usize = 1 << 20;
    let fx = Fixture::new(cache, SIZE as u64);
    let Some(mut e) = engine(kind, 8) else { return };
    let data = vec![0xab; 16 * BLOCK];
    write_data(&mut e, fx.fd(), 0, &data, &[8 * BLOCK, 8 * BLOCK]);
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let c = run(
        &mut e,
        op(
            OpKind::Fallocate {
                mode,
                len: 4 * BLOCK as u64,
            },
            fx.fd(),
            4 * BLOCK as u64,
            None,
            3,
        ),
    );
    assert_eq!(c.result.unwrap(), 0);
    let (n, got) = read_data(&mut e, fx.fd(), 0, &[16 * BLOCK]);
    assert_eq!(n, 16 * BLOCK);
    assert!(got[..4 * BLOCK].iter().all(|&b| b == 0xab));
    assert!(got[4 * BLOCK..8 * BLOCK].iter().all(|&b| b == 0));
    assert!(got[8 * BLOCK..].iter().all(|&b| b == 0xab));
    assert_eq!(fx.file.len().unwrap(), SIZE as u64);

    let c = run(
        &mut e,
        op(
            OpKind::Fallocate {
                mode: 0,
                len: SIZE as u64,
            },
            fx.fd(),
            SIZE as u64,
            None,
            4,
        ),
    );
    assert_eq!(c.result.unwrap(), 0);
    assert_eq!(fx.file.len().unwrap(), 2 * SIZE as u64);
}

/// Errors come back as completions, never as panics or submit errors.
fn errors(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = engine(kind, 8) else { return };
    let ebadf = Some(libc::EBADF);
    let c = run(
        &mut e,
        op(OpKind::Read, -1, 0, Some(SegBuf::zeroed(&[BLOCK])), 11),
    );
    assert_eq!(c.result.unwrap_err().raw_os_error(), ebadf);
    assert!(c.buf.is_some(), "the buffer comes back with the error");
    let c = run(
        &mut e,
        op(
            OpKind::Write,
            -1,
            0,
            Some(SegBuf::zeroed(&[BLOCK, BLOCK])),
            12,
        ),
    );
    assert_eq!(c.result.unwrap_err().raw_os_error(), ebadf);
    let c = run(&mut e, op(OpKind::Flush, -1, 0, None, 13));
    assert_eq!(c.result.unwrap_err().raw_os_error(), ebadf);
    let fa = OpKind::Fallocate { mode: 0, len: 4096 };
    let c = run(&mut e, op(fa, -1, 0, None, 14));
    assert_eq!(c.result.unwrap_err().raw_os_error(), ebadf);

    // A bad op in the middle of a batch fails alone.
    for i in 0..5u64 {
        let fd = if i == 2 { -1 } else { fx.fd() };
        let b = SegBuf::zeroed(&[BLOCK]);
        submit(&mut e, op(OpKind::Read, fd, i * BLOCK as u64, Some(b), i));
    }
    let mut out = Vec::new();
    assert_eq!(e.reap(&mut out, 5, None).unwrap(), 5);
    for c in out {
        match c.user_data {
            2 => assert_eq!(c.result.unwrap_err().raw_os_error(), ebadf),
            _ => assert_eq!(c.result.unwrap(), BLOCK),
        }
    }

    // Flushing something that cannot be synced (a pipe): EINVAL (native AIO: io_submit
    // refuses IOCB_CMD_FDSYNC, the fdatasync fallback fails the same way).
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let c = run(&mut e, op(OpKind::Flush, fds[0], 0, None, 17));
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // SAFETY: both descriptors were created above and are closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }

    // Writing to a read-only file.
    let ro = xdisk_io::ImageFile::open(fx.path(), true, cache).unwrap();
    let c = run(
        &mut e,
        op(
            OpKind::Write,
            ro.fd(),
            0,
            Some(SegBuf::zeroed(&[BLOCK])),
            15,
        ),
    );
    assert_eq!(c.result.unwrap_err().raw_os_error(), ebadf);

    // A read or write without a buffer is refused at submit, and handed back.
    let (back, err) = e
        .submit(op(OpKind::Read, fx.fd(), 0, None, 16))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(back.user_data, 16);
    assert_eq!(e.in_flight(), 0);
}

/// Reads across and past the end of the file are short, not errors.
fn short_read(kind: AioKind, cache: CacheMode) {
    let len = 3 * BLOCK + 1000;
    let data = random_bytes(&mut StdRng::seed_from_u64(3), len);
    let fx = Fixture::with_contents(cache, len as u64, Some(&data));
    let Some(mut e) = engine(kind, 8) else { return };
    let (n, got) = read_data(&mut e, fx.fd(), 2 * BLOCK as u64, &[BLOCK, BLOCK]);
    assert_eq!(n, BLOCK + 1000);
    assert_eq!(&got[..n], &data[2 * BLOCK..]);
    let (n, _) = read_data(&mut e, fx.fd(), 4 * BLOCK as u64, &[BLOCK]);
    assert_eq!(n, 0);
    let (n, _) = read_data(&mut e, fx.fd(), 1 << 30, &[BLOCK]);
    assert_eq!(n, 0);
}

/// submit hands the op back with WouldBlock when the queue is full.
fn queue_full(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = engine(kind, 4) else { return };
    assert_eq!(e.capacity(), 4);
    for i in 0..4u64 {
        let b = SegBuf::zeroed(&[BLOCK]);
        submit(&mut e, op(OpKind::Read, fx.fd(), 0, Some(b), i));
    }
    assert_eq!(e.in_flight(), 4);
    let (back, err) = e
        .submit(op(
            OpKind::Read,
            fx.fd(),
            0,
            Some(SegBuf::zeroed(&[BLOCK])),
            99,
        ))
        .expect_err("queue full");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    assert_eq!(back.user_data, 99);
    assert!(back.buf.is_some());
    // Still full after the kernel got them, until they are reaped.
    e.commit().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(e.submit(back).is_err());
    let mut out = Vec::new();
    assert_eq!(e.reap(&mut out, 4, None).unwrap(), 4);
    assert_eq!(e.in_flight(), 0);
    let mut uds: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    uds.sort_unstable();
    assert_eq!(uds, [0, 1, 2, 3]);
    let c = run(
        &mut e,
        op(OpKind::Read, fx.fd(), 0, Some(SegBuf::zeroed(&[BLOCK])), 5),
    );
    assert_eq!(c.result.unwrap(), BLOCK);
}

fn reap_timing(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = engine(kind, 8) else { return };
    let mut out = Vec::new();
    let quick = Duration::from_millis(100);

    let t = Instant::now();
    assert_eq!(e.reap(&mut out, 0, None).unwrap(), 0);
    assert_eq!(
        e.reap(&mut out, 0, Some(Duration::from_secs(10))).unwrap(),
        0
    );
    // min larger than what is in flight and no timeout: returns rather than hang.
    assert_eq!(e.reap(&mut out, 1, None).unwrap(), 0);
    assert!(
        t.elapsed() < quick,
        "reap without waiting took {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let wait = Duration::from_millis(150);
    assert_eq!(e.reap(&mut out, 1, Some(wait)).unwrap(), 0);
    let el = t.elapsed();
    assert!(el >= wait && el < wait + Duration::from_secs(3), "{el:?}");

    // With one op in flight, asking for two waits for the timeout and returns the one.
    submit(
        &mut e,
        op(OpKind::Read, fx.fd(), 0, Some(SegBuf::zeroed(&[BLOCK])), 1),
    );
    let t = Instant::now();
    assert_eq!(e.reap(&mut out, 2, Some(wait)).unwrap(), 1);
    let el = t.elapsed();
    assert!(el >= wait && el < wait + Duration::from_secs(3), "{el:?}");
    assert_eq!(out.len(), 1);

    // min = 0 never waits, even for work in flight: poll until it shows up.
    submit(
        &mut e,
        op(OpKind::Read, fx.fd(), 0, Some(SegBuf::zeroed(&[BLOCK])), 2),
    );
    let t = Instant::now();
    let mut got = 0;
    while got == 0 {
        got = e.reap(&mut out, 0, None).unwrap();
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    assert_eq!(got, 1);
}

/// The event fd becomes readable once a completion can be reaped.
fn event_fd(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 1 << 20);
    let Some(mut e) = engine(kind, 8) else { return };
    let efd = e.event_fd();
    assert!(efd >= 0);
    assert!(!readable(efd, 0));
    for round in 0..3u64 {
        e.clear_event_fd();
        let b = SegBuf::zeroed(&[BLOCK, BLOCK]);
        let kind = if round == 1 {
            OpKind::Fallocate { mode: 0, len: 4096 }
        } else {
            OpKind::Read
        };
        let buf = (kind == OpKind::Read).then_some(b);
        submit(&mut e, op(kind, fx.fd(), 0, buf, round));
        e.commit().unwrap();
        assert!(readable(efd, 10_000), "event fd not signalled");
        let mut out = Vec::new();
        assert_eq!(e.reap(&mut out, 0, None).unwrap(), 1);
        assert!(out[0].result.is_ok());
        assert!(e.clear_event_fd());
        assert!(!readable(efd, 0));
    }
}

/// Dropping an engine with ops queued, in flight and completed-but-unreaped frees every
/// buffer exactly once, after the kernel is done with it.
fn drop_in_flight(kind: AioKind, cache: CacheMode) {
    let fx = Fixture::new(cache, 8 << 20);
    let drops = Arc::new(AtomicUsize::new(0));
    let mut made = 0;
    {
        let Some(mut e) = engine(kind, 64) else {
            return;
        };
        let data = vec![0x11u8; 64 * 1024];
        for i in 0..48u64 {
            let b = if i % 2 == 0 {
                SegBuf::from_data(&data, &[32 * 1024, 32 * 1024])
            } else {
                SegBuf::zeroed(&[64 * 1024])
            };
            let k = if i % 2 == 0 {
                OpKind::Write
            } else {
                OpKind::Read
            };
            submit(
                &mut e,
                op(k, fx.fd(), i * 65536, Some(b.counting(&drops)), i),
            );
            made += 1;
        }
        e.commit().unwrap();
        for i in 48..60u64 {
            let b = SegBuf::zeroed(&[BLOCK]).counting(&drops);
            submit(&mut e, op(OpKind::Read, fx.fd(), i * 4096, Some(b), i));
            made += 1;
        }
        // Dropped with 12 ops never committed.
    }
    assert_eq!(drops.load(Ordering::SeqCst), made);
}

/// open_engine builds the engine asked for when the kernel offers it.
fn open_engine_kind(kind: AioKind, _cache: CacheMode) {
    if engine(kind, 4).is_none() {
        return;
    }
    let e = xdisk_io::open_engine::<AlignedBuf>(kind, &config(4)).unwrap();
    assert_eq!(e.kind(), kind);
}

macro_rules! engine_suite {
    ($($module:ident => $kind:expr;)*) => {$(
        mod $module {
            use super::*;
            const KIND: AioKind = $kind;

            #[test]
            fn random_roundtrip_direct() {
                random_roundtrip(KIND, CacheMode::None)
            }
            #[test]
            fn random_roundtrip_writeback() {
                random_roundtrip(KIND, CacheMode::WriteBack)
            }
            #[test]
            fn aligned_buf_roundtrip_direct() {
                aligned_buf_roundtrip(KIND, CacheMode::None)
            }
            #[test]
            fn vectored_direct() {
                vectored(KIND, CacheMode::None)
            }
            #[test]
            fn vectored_writeback() {
                vectored(KIND, CacheMode::WriteBack)
            }
            #[test]
            fn flush_direct() {
                flush(KIND, CacheMode::None)
            }
            #[test]
            fn flush_writeback() {
                flush(KIND, CacheMode::WriteBack)
            }
            #[test]
            fn fallocate_punch_hole_direct() {
                fallocate(KIND, CacheMode::None)
            }
            #[test]
            fn fallocate_punch_hole_writeback() {
                fallocate(KIND, CacheMode::WriteBack)
            }
            #[test]
            fn errors_are_completions() {
                errors(KIND, CacheMode::None)
            }
            #[test]
            fn short_read_past_eof_direct() {
                short_read(KIND, CacheMode::None)
            }
            #[test]
            fn short_read_past_eof_writeback() {
                short_read(KIND, CacheMode::WriteBack)
            }
            #[test]
            fn queue_full_would_block() {
                queue_full(KIND, CacheMode::None)
            }
            #[test]
            fn reap_min_and_timeout() {
                reap_timing(KIND, CacheMode::None)
            }
            #[test]
            fn event_fd_readable_after_completion() {
                event_fd(KIND, CacheMode::None)
            }
            #[test]
            fn drop_with_ops_in_flight_direct() {
                drop_in_flight(KIND, CacheMode::None)
            }
            #[test]
            fn drop_with_ops_in_flight_writeback() {
                drop_in_flight(KIND, CacheMode::WriteBack)
            }
            #[test]
            fn open_engine_builds_this_kind() {
                open_engine_kind(KIND, CacheMode::None)
            }

            proptest! {
                #![proptest_config(ProptestConfig {
                    cases: 24,
                    failure_persistence: None,
                    ..ProptestConfig::default()
                })]
                #[test]
                fn random_ops_match_model(
                    steps in proptest::collection::vec(step_strategy(), 1..80),
                    direct in any::<bool>(),
                    qd in 1u32..=16,
                ) {
                    model_check(KIND, direct, qd, &steps);
                }
            }
        }
    )*};
}

engine_suite! {
    io_uring => AioKind::IoUring;
    native => AioKind::Native;
    threads => AioKind::Threads;
}

// ---------------------------------------------------------------------------------------
// Property test: random op sequences against an in-memory model.

const MODEL_BLOCKS: usize = 64;

fn step_strategy() -> impl Strategy<Value = Step> {
    let b = 0..MODEL_BLOCKS;
    let n = 1usize..=8;
    prop_oneof![
        4 => (b.clone(), n.clone(), 1usize..=4, any::<u64>()).prop_map(
            |(block, blocks, segs, seed)| Step::Write { block, blocks, segs, seed }
        ),
        4 => (b.clone(), n.clone(), 1usize..=4)
            .prop_map(|(block, blocks, segs)| Step::Read { block, blocks, segs }),
        1 => Just(Step::Flush),
        1 => (b, n).prop_map(|(block, blocks)| Step::Punch { block, blocks }),
        2 => (0usize..8).prop_map(Step::Reap),
    ]
}

fn model_check(kind: AioKind, direct: bool, qd: u32, steps: &[Step]) {
    let cache = if direct {
        CacheMode::None
    } else {
        CacheMode::WriteBack
    };
    let size = MODEL_BLOCKS * BLOCK;
    let fx = Fixture::new(cache, size as u64);
    let Some(e) = engine(kind, qd) else { return };
    let mut d = Driver::new(e, &fx, size);
    for s in steps {
        d.step(s);
    }
    d.finish(&fx);
}
