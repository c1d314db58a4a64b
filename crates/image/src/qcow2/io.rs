//! Guest-facing operations of [`Qcow2Image`]: reads, writes (allocation and copy-on-write),
//! discard, zeroes, block status, fast-path mapping, resize.

use std::sync::atomic::Ordering;

use super::compress::{compress, decompress};
use super::format::{L2Entry, MAX_VIRTUAL_SIZE};
use super::meta::{HostCluster, Meta};
use super::Qcow2Image;
use crate::{Error, Extent, LayerStatus, Mapping, Result};

/// Bytes one planning round of a read or write covers at most (the lock is released between
/// rounds).
const MAX_PLAN_BYTES: usize = 32 << 20;
/// Clusters one write round allocates at most.
const MAX_PLAN_ALLOCS: usize = 1024;
/// Clusters a block-status query looks at, at most.
const MAX_STATUS_CLUSTERS: u64 = 1 << 20;
/// Zero buffer size for writing zeroes by hand.
const ZERO_CHUNK: usize = 1 << 20;

/// One piece of a planned read.
#[derive(Debug)]
enum RSeg {
    Host {
        host: u64,
        len: usize,
    },
    Zero {
        len: usize,
    },
    Backing {
        off: u64,
        len: usize,
    },
    Compressed {
        host: u64,
        clen: u64,
        skip: usize,
        len: usize,
    },
}

impl RSeg {
    fn len(&self) -> usize {
        match *self {
            RSeg::Host { len, .. }
            | RSeg::Zero { len }
            | RSeg::Backing { len, .. }
            | RSeg::Compressed { len, .. } => len,
        }
    }
}

/// One piece of a planned write. `at` is the offset in the request's buffer.
#[derive(Debug)]
enum WSeg {
    /// Overwrite in place (a cluster with refcount one: COPIED).
    InPlace { host: u64, at: usize, len: usize },
    /// Write the whole of a fresh cluster `new` (`reuse`: the cluster preallocated for a zero
    /// entry), then point guest cluster `g` at it. `old` is the mapping being replaced,
    /// `clen` its readable compressed length.
    Alloc {
        g: u64,
        new: u64,
        reuse: bool,
        old: L2Entry,
        clen: u64,
        in_off: usize,
        at: usize,
        len: usize,
        /// `new` was never written (it lies past everything written to the file, inside the
        /// room allocated ahead, so it reads as zeroes and the file covers it) and the guest
        /// cluster read as zeroes before: a partial write writes only its own bytes, not a
        /// whole cluster padded with zeroes (QEMU zeroes such clusters with a cheap
        /// write-zeroes first).
        zero_rest: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum ZeroMode {
    Discard,
    Zero { unmap: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Compressed,
    Zero,
    Unallocated,
}

fn kind(e: L2Entry) -> Kind {
    match e {
        L2Entry::Normal { .. } => Kind::Data,
        L2Entry::Compressed { .. } => Kind::Compressed,
        L2Entry::Zero { .. } => Kind::Zero,
        L2Entry::Unallocated => Kind::Unallocated,
    }
}

impl Qcow2Image {
    fn ctx(&self, what: &str) -> String {
        format!("{what} {}", self.file.name())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn split_cluster(&self, off: u64, end: u64) -> (u64, usize, usize) {
        let g = off >> self.cb;
        let in_off = (off & (self.cs - 1)) as usize;
        let n = (self.cs - in_off as u64).min(end - off) as usize;
        (g, in_off, n)
    }

    // ---- reads -----------------------------------------------------------------------

    /// Blocking read (any alignment).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _guard = self.tracker.enter();
        let mut done = 0usize;
        while done < buf.len() {
            let (segs, n) = {
                let mut m = self.lock();
                self.plan_read(&mut m, offset + done as u64, buf.len() - done)?
            };
            let mut at = done;
            for s in &segs {
                let l = s.len();
                self.exec_read(s, &mut buf[at..at + l])?;
                at += l;
            }
            done += n;
        }
        Ok(())
    }

    fn plan_read(&self, m: &mut Meta, offset: u64, len: usize) -> Result<(Vec<RSeg>, usize)> {
        let end = offset + len as u64;
        let mut segs: Vec<RSeg> = Vec::new();
        let mut pos = offset;
        while pos < end && ((pos - offset) as usize) < MAX_PLAN_BYTES && segs.len() < 4096 {
            let (g, in_off, n) = self.split_cluster(pos, end);
            let seg = match m.lookup(g)? {
                L2Entry::Normal { host, .. } => RSeg::Host {
                    host: host + in_off as u64,
                    len: n,
                },
                L2Entry::Zero { .. } => RSeg::Zero { len: n },
                L2Entry::Unallocated if self.backing.is_some() => {
                    RSeg::Backing { off: pos, len: n }
                }
                L2Entry::Unallocated => RSeg::Zero { len: n },
                L2Entry::Compressed { host, len: clen } => RSeg::Compressed {
                    host,
                    clen: clen.min(m.file_len - host),
                    skip: in_off,
                    len: n,
                },
            };
            match (segs.last_mut(), &seg) {
                (Some(RSeg::Host { host: h, len: l }), RSeg::Host { host, len })
                    if *h + *l as u64 == *host =>
                {
                    *l += len
                }
                (Some(RSeg::Zero { len: l }), RSeg::Zero { len }) => *l += len,
                (Some(RSeg::Backing { len: l, .. }), RSeg::Backing { len, .. }) => *l += len,
                _ => segs.push(seg),
            }
            pos += n as u64;
        }
        Ok((segs, (pos - offset) as usize))
    }

    fn exec_read(&self, s: &RSeg, out: &mut [u8]) -> Result<()> {
        match *s {
            RSeg::Host { host, .. } => self
                .file
                .read_at(out, host)
                .map_err(|e| Error::io(self.ctx("cannot read from"), e)),
            RSeg::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            RSeg::Backing { off, .. } => self.read_backing(out, off),
            RSeg::Compressed {
                host, clen, skip, ..
            } => {
                let mut cluster = vec![0u8; self.cs as usize];
                self.read_compressed(host, clen, &mut cluster)?;
                out.copy_from_slice(&cluster[skip..skip + out.len()]);
                Ok(())
            }
        }
    }

    /// Reads from the backing image; what lies past its end reads as zeroes ("If there is no
    /// backing file or the backing file is smaller than the image, they shall read zeros").
    fn read_backing(&self, out: &mut [u8], off: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            out.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let n = if off >= bsize {
            0
        } else {
            (bsize - off).min(out.len() as u64) as usize
        };
        if n > 0 {
            b.read_at(&mut out[..n], off)?;
        }
        out[n..].fill(0);
        Ok(())
    }

    /// Reads and decompresses one compressed cluster (`clen` was bounded by the file end).
    fn read_compressed(&self, host: u64, clen: u64, out: &mut [u8]) -> Result<()> {
        let mut stream = vec![0u8; clen as usize];
        self.file
            .read_at(&mut stream, host)
            .map_err(|e| Error::io(self.ctx("cannot read a compressed cluster from"), e))?;
        decompress(self.compression, &stream, out)
    }

    // ---- writes ----------------------------------------------------------------------

    /// Blocking write (any alignment).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset, true)
    }

    /// A write; `track`: record it in the dirty bitmaps (false for the pieces of requests
    /// that recorded themselves: write-zeroes, discard).
    fn write_inner(&self, buf: &[u8], offset: u64, track: bool) -> Result<()> {
        self.check_writable()?;
        let _guard = self.tracker.enter();
        let mut done = 0usize;
        while done < buf.len() {
            let len = buf.len() - done;
            let (segs, n) = self.plan_write(offset + done as u64, len, track && done == 0)?;
            let r = self.exec_write(&segs, &buf[done..]);
            self.finish_write(&segs, r)?;
            done += n;
        }
        Ok(())
    }

    /// Resolves the next part of a write under the lock: in-place pieces, and fresh clusters
    /// for the others (their guest clusters are marked in flight). `track`: first record the
    /// whole `[offset, offset + len)` in the dirty bitmaps.
    fn plan_write(&self, offset: u64, len: usize, track: bool) -> Result<(Vec<WSeg>, usize)> {
        let end = offset + len as u64;
        let mut m = self.lock();
        if track {
            m.track_write(offset, len as u64)?;
        }
        let mut segs: Vec<WSeg> = Vec::new();
        let mut pos = 0usize;
        let mut allocs = 0usize;
        while pos < len && pos < MAX_PLAN_BYTES {
            let off = offset + pos as u64;
            let (g, in_off, n) = self.split_cluster(off, end);
            if m.inflight.contains(&g) {
                if segs.is_empty() {
                    m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                break;
            }
            let e = match m.lookup(g) {
                Ok(e) => e,
                Err(err) => {
                    self.abort_allocs(&mut m, &segs);
                    return Err(err);
                }
            };
            match e {
                L2Entry::Normal { host, copied: true } => {
                    let host = host + in_off as u64;
                    match segs.last_mut() {
                        Some(WSeg::InPlace {
                            host: h,
                            at,
                            len: l,
                        }) if *h + *l as u64 == host && *at + *l == pos => *l += n,
                        _ => segs.push(WSeg::InPlace {
                            host,
                            at: pos,
                            len: n,
                        }),
                    }
                }
                _ => {
                    if allocs >= MAX_PLAN_ALLOCS {
                        break;
                    }
                    let (new, reuse) = match e {
                        L2Entry::Zero {
                            prealloc: Some(p),
                            copied: true,
                        } => (p, true),
                        _ => match m.alloc_cluster() {
                            Ok(c) => (c.0 << self.cb, false),
                            Err(err) => {
                                self.abort_allocs(&mut m, &segs);
                                return Err(err);
                            }
                        },
                    };
                    let clen = match e {
                        L2Entry::Compressed { host, len } => len.min(m.file_len - host),
                        _ => 0,
                    };
                    let zero_rest = !reuse
                        && new >= m.file_len
                        && new + self.cs <= m.ahead.end
                        && match e {
                            L2Entry::Zero { .. } => true,
                            L2Entry::Unallocated => self.backing.is_none(),
                            _ => false,
                        };
                    m.inflight.insert(g);
                    allocs += 1;
                    segs.push(WSeg::Alloc {
                        g,
                        new,
                        reuse,
                        old: e,
                        clen,
                        in_off,
                        at: pos,
                        len: n,
                        zero_rest,
                    });
                }
            }
            pos += n;
        }
        Ok((segs, pos))
    }

    /// Rolls back the allocations of a plan that will not be installed.
    fn abort_allocs(&self, m: &mut Meta, segs: &[WSeg]) {
        for s in segs {
            if let WSeg::Alloc { g, new, reuse, .. } = *s {
                if !reuse {
                    m.release_unused(HostCluster(new >> self.cb));
                }
                m.inflight.remove(&g);
            }
        }
        self.alloc_done.notify_all();
    }

    /// The data I/O of a planned write (no lock held).
    fn exec_write(&self, segs: &[WSeg], buf: &[u8]) -> Result<()> {
        let cs = self.cs as usize;
        let werr = |e| Error::io(self.ctx("cannot write to"), e);
        let mut i = 0;
        while i < segs.len() {
            match segs[i] {
                WSeg::InPlace { host, at, len } => {
                    self.file.write_at(&buf[at..at + len], host).map_err(werr)?;
                }
                WSeg::Alloc {
                    new,
                    in_off: 0,
                    at,
                    len,
                    ..
                } if len == cs => {
                    // Whole clusters straight from the caller's buffer, merged while the new
                    // clusters are contiguous.
                    let mut total = len;
                    let mut j = i + 1;
                    while let Some(&WSeg::Alloc {
                        new: n2,
                        in_off: 0,
                        at: a2,
                        len: l2,
                        ..
                    }) = segs.get(j)
                    {
                        if l2 != cs || n2 != new + total as u64 || a2 != at + total {
                            break;
                        }
                        total += cs;
                        j += 1;
                    }
                    self.file
                        .write_at(&buf[at..at + total], new)
                        .map_err(werr)?;
                    i = j;
                    continue;
                }
                WSeg::Alloc {
                    new,
                    in_off,
                    at,
                    len,
                    zero_rest: true,
                    ..
                } => {
                    // The rest of the cluster reads as zeroes already.
                    self.file
                        .write_at(&buf[at..at + len], new + in_off as u64)
                        .map_err(werr)?;
                }
                WSeg::Alloc {
                    g,
                    new,
                    old,
                    clen,
                    in_off,
                    at,
                    len,
                    ..
                } => {
                    // Copy-on-write: the untouched part comes from the old mapping.
                    let mut c = vec![0u8; cs];
                    self.read_old_cluster(old, g, clen, &mut c)?;
                    c[in_off..in_off + len].copy_from_slice(&buf[at..at + len]);
                    self.file.write_at(&c, new).map_err(werr)?;
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// The current contents of guest cluster `g` given its (old) mapping.
    fn read_old_cluster(&self, old: L2Entry, g: u64, clen: u64, out: &mut [u8]) -> Result<()> {
        match old {
            L2Entry::Unallocated => self.read_backing(out, g << self.cb),
            L2Entry::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } => self
                .file
                .read_at(out, host)
                .map_err(|e| Error::io(self.ctx("cannot read from"), e)),
            L2Entry::Compressed { host, .. } => self.read_compressed(host, clen, out),
        }
    }

    /// Installs the new mappings of a write whose data is on disk (or rolls back on error).
    fn finish_write(&self, segs: &[WSeg], r: Result<()>) -> Result<()> {
        let mut m = self.lock();
        // The new clusters were written (or may have been, in part): whether they end up
        // mapped or released, they no longer count as never written (see
        // `WSeg::Alloc::zero_rest`).
        for s in segs {
            if let WSeg::Alloc { new, .. } = *s {
                m.file_len = m.file_len.max(new + self.cs);
            }
        }
        if let Err(e) = r {
            self.abort_allocs(&mut m, segs);
            return Err(e);
        }
        let mut first_err = None;
        for s in segs {
            let WSeg::Alloc {
                g, new, reuse, old, ..
            } = *s
            else {
                continue;
            };
            if first_err.is_none() {
                // Rule 2: the data is written; it becomes durable with the sync that
                // precedes the next mapping write.
                m.unsynced = true;
                let r = m.set_entry(
                    g,
                    L2Entry::Normal {
                        host: new,
                        copied: true,
                    },
                );
                match r {
                    Ok(()) => {
                        if !reuse {
                            m.free_entry_later(old);
                        }
                    }
                    Err(e) => first_err = Some(e),
                }
            }
            if first_err.is_some() && !reuse {
                // Never referenced (its set_entry failed or was not attempted).
                m.release_unused(HostCluster(new >> self.cb));
            }
            m.inflight.remove(&g);
        }
        self.alloc_done.notify_all();
        if let Some(e) = first_err {
            return Err(e);
        }
        m.maybe_writeback()
    }

    // ---- compressed writes -----------------------------------------------------------

    /// Writes guest cluster `g` whole, compressed with the image's compression type
    /// (qcow2.txt, "Compressed Clusters Descriptor"), as `qemu-img convert -c` does. `data`
    /// is the cluster's contents: exactly one cluster, or less for the last cluster of an
    /// image whose size is not cluster-aligned (the rest is stored as zeroes).
    ///
    /// The cluster is written uncompressed (an ordinary write) when its compressed form is
    /// not smaller than a cluster, or when the cluster is already allocated (only
    /// unallocated clusters and zero clusters without a preallocated host cluster take
    /// compressed data). Returns whether it was stored compressed. Callers skip all-zero
    /// clusters themselves (they need no data at all).
    pub fn write_compressed_cluster(&self, g: u64, data: &[u8]) -> Result<bool> {
        self.check_writable()?;
        let cs = self.cs as usize;
        let start = g
            .checked_mul(self.cs)
            .filter(|&s| s < self.size())
            .ok_or_else(|| Error::OutOfRange {
                offset: g.saturating_mul(self.cs),
                len: data.len() as u64,
                size: self.size(),
            })?;
        let whole = data.len() == cs;
        let last_partial = data.len() < cs && start + data.len() as u64 == self.size();
        if data.is_empty() || !(whole || last_partial) {
            return Err(Error::InvalidArgument(format!(
                "a compressed write covers one whole cluster ({cs} bytes) or the image's \
                 partial last cluster, not {} bytes at cluster {g}",
                data.len()
            )));
        }
        let padded;
        let cluster = if whole {
            data
        } else {
            let mut v = data.to_vec();
            v.resize(cs, 0);
            padded = v;
            &padded[..]
        };
        // Compression runs without the lock. QEMU's rule: the compressed form must be
        // smaller than the cluster, else the cluster is stored as is.
        let Some(mut stream) = compress(self.compression, cluster, cs)? else {
            self.write_at(data, start)?;
            return Ok(false);
        };
        let len = stream.len() as u64;
        let _guard = self.tracker.enter();
        let mut m = self.lock();
        m.track_write(start, data.len() as u64)?;
        while m.inflight.contains(&g) {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        match m.lookup(g)? {
            L2Entry::Unallocated | L2Entry::Zero { prealloc: None, .. } => {}
            _ => {
                drop(m);
                self.write_inner(data, start, false)?;
                return Ok(false);
            }
        }
        let host = m.alloc_compressed(len)?;
        // The stream is padded with zeroes to the end of its last 512-byte sector, so that
        // the sectors the descriptor names lie inside the file ("compressed data that ends at
        // the end of the image is padded"); the padding is free space the next stream packed
        // behind this one overwrites.
        stream.resize(
            (host + len).next_multiple_of(512).saturating_sub(host) as usize,
            0,
        );
        // Rule 2: the data goes to the file before the entry (write_meta marks the file
        // unsynced, so the sync before the next mapping write covers it); rule 1: the
        // refcounts taken above are written before the L2 table that uses them.
        let r = m
            .write_meta(&stream, host, "a compressed cluster")
            .and_then(|()| m.set_entry(g, L2Entry::Compressed { host, len }));
        if let Err(e) = r {
            m.unref_compressed(host, len);
            return Err(e);
        }
        m.maybe_writeback()?;
        Ok(true)
    }

    // ---- discard and zeroes ----------------------------------------------------------

    /// Splits `[offset, offset+len)` into a partial head, whole guest clusters and a partial
    /// tail. The last cluster of an image whose size is not cluster-aligned counts as whole
    /// when the range reaches the end of the image.
    fn split_range(&self, offset: u64, len: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
        let cs = self.cs;
        let end = offset + len;
        let first_full = offset.next_multiple_of(cs);
        let full_end = if end == self.size() {
            end.next_multiple_of(cs)
        } else {
            end / cs * cs
        };
        let head = (offset, first_full.min(end) - offset);
        if full_end > first_full {
            let tail_start = full_end;
            let tail = (tail_start, end.saturating_sub(tail_start));
            (head, (first_full >> self.cb, full_end >> self.cb), tail)
        } else {
            let tail_start = first_full.max(offset);
            (head, (0, 0), (tail_start, end.saturating_sub(tail_start)))
        }
    }

    /// Discards a range (see [`crate::Image::discard`]). Whole clusters follow QEMU: v3
    /// images get the zero flag when a backing file could show through, else become
    /// unallocated; v2 images have no zero flag, so their discarded clusters become
    /// unallocated and, with a backing file, show the backing data again (QEMU does the
    /// same; discard is advisory). The host clusters are freed. Partial clusters at the edges
    /// get zeroes written (except in v2 images with a backing file, which leave them alone).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        // QEMU marks discarded ranges dirty.
        self.lock().track_write(offset, len)?;
        let (head, full, tail) = self.split_range(offset, len);
        if full.1 > full.0 {
            self.zero_clusters(full.0, full.1, ZeroMode::Discard)?;
        }
        if !(self.version < 3 && self.backing.is_some()) {
            for (o, l) in [head, tail] {
                if l > 0 {
                    self.zero_partial(o, l)?;
                }
            }
        }
        Ok(())
    }

    /// Makes a range read as zeroes. v3: whole clusters get the zero flag (`unmap` frees
    /// their host clusters; otherwise a cluster we own stays preallocated), partial ones get
    /// zero bytes. v2 (no zero flag): zeroes are written, except that unallocated clusters
    /// without a backing file already read as zeroes, and with `unmap` and no backing file
    /// whole clusters are deallocated instead.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.lock().track_write(offset, len)?;
        self.zero_range(offset, len, unmap)
    }

    /// [`Qcow2Image::write_zeroes`] without recording the range in the dirty bitmaps (a
    /// resize's zeroes are not a guest write: QEMU leaves a grown range clean).
    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.version < 3 && !(unmap && self.backing.is_none()) {
            return self.write_real_zeroes(offset, len);
        }
        let (head, full, tail) = self.split_range(offset, len);
        if full.1 > full.0 {
            self.zero_clusters(full.0, full.1, ZeroMode::Zero { unmap })?;
        }
        for (o, l) in [head, tail] {
            if l > 0 {
                self.zero_partial(o, l)?;
            }
        }
        Ok(())
    }

    /// Whether an unallocated cluster is already what `mode` wants (nothing to do).
    fn unallocated_is_target(&self, _mode: ZeroMode) -> bool {
        self.version < 3 || self.backing.is_none()
    }

    /// The new entry for a whole cluster (`None`: leave it) and whether the old entry's host
    /// clusters are released.
    fn zero_target(&self, mode: ZeroMode, e: L2Entry) -> Option<(L2Entry, bool)> {
        let zero = L2Entry::Zero {
            prealloc: None,
            copied: false,
        };
        if self.version < 3 {
            // Discard, or write_zeroes with unmap and no backing file: deallocate.
            return (e != L2Entry::Unallocated).then_some((L2Entry::Unallocated, true));
        }
        match (mode, e) {
            (_, L2Entry::Unallocated) if self.backing.is_none() => None,
            (ZeroMode::Discard, L2Entry::Zero { prealloc: None, .. }) if self.backing.is_some() => {
                None
            }
            (ZeroMode::Discard, _) if self.backing.is_some() => Some((zero, true)),
            (ZeroMode::Discard, _) => Some((L2Entry::Unallocated, true)),
            (ZeroMode::Zero { .. }, L2Entry::Zero { prealloc: None, .. }) => None,
            (ZeroMode::Zero { unmap: false }, L2Entry::Zero { .. }) => None,
            (ZeroMode::Zero { unmap: false }, L2Entry::Normal { host, copied: true }) => Some((
                L2Entry::Zero {
                    prealloc: Some(host),
                    copied: true,
                },
                false,
            )),
            (ZeroMode::Zero { .. }, _) => Some((zero, true)),
        }
    }

    /// Applies `mode` to whole guest clusters `[g0, g1)`, one L2 table per lock hold.
    fn zero_clusters(&self, g0: u64, g1: u64, mode: ZeroMode) -> Result<()> {
        let mut g = g0;
        while g < g1 {
            let mut m = self.lock();
            let l2e = m.l2_entries();
            let chunk_end = g1.min((g / l2e + 1) * l2e);
            while g < chunk_end {
                if m.inflight.contains(&g) {
                    m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                if self.unallocated_is_target(mode) && m.l2_unallocated(g)? {
                    g = chunk_end;
                    continue;
                }
                let e = m.lookup(g)?;
                if let Some((new, free_old)) = self.zero_target(mode, e) {
                    m.set_entry(g, new)?;
                    if free_old {
                        m.free_entry_later(e);
                    }
                }
                g += 1;
            }
            m.maybe_writeback()?;
        }
        Ok(())
    }

    /// Whether `[off, off+len)` (inside one cluster) already reads as zeroes by its mapping.
    fn reads_zero(&self, m: &mut Meta, off: u64) -> Result<bool> {
        Ok(match m.lookup(off >> self.cb)? {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.backing.as_ref().is_none_or(|b| off >= b.size()),
            _ => false,
        })
    }

    /// Zeroes part of one cluster by writing zero bytes (unless it already reads as zeroes).
    fn zero_partial(&self, off: u64, len: u64) -> Result<()> {
        let skip = {
            let mut m = self.lock();
            self.reads_zero(&mut m, off)?
        };
        if !skip {
            self.write_inner(&vec![0u8; len as usize], off, false)?;
        }
        Ok(())
    }

    /// Whether the cluster piece at `p` is unallocated and reads zeroes (no backing data).
    fn unallocated_zero(&self, m: &mut Meta, p: u64) -> Result<bool> {
        Ok(m.lookup(p >> self.cb)? == L2Entry::Unallocated
            && self.backing.as_ref().is_none_or(|b| p >= b.size()))
    }

    /// v2 write_zeroes: writes zero bytes everywhere except where unallocated clusters
    /// already read as zeroes.
    fn write_real_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let limit = (ZERO_CHUNK as u64).max(self.cs);
        let zeroes = vec![0u8; limit.min(len) as usize];
        let mut pos = offset;
        while pos < end {
            let (s, e) = {
                let mut m = self.lock();
                let l2_span = m.l2_entries() << self.cb;
                let mut p = pos;
                while p < end {
                    let (g, _, n) = self.split_cluster(p, end);
                    if self.backing.is_none() && m.l2_unallocated(g)? {
                        p = end.min((p / l2_span + 1) * l2_span);
                    } else if self.unallocated_zero(&mut m, p)? {
                        p += n as u64;
                    } else {
                        break;
                    }
                }
                let s = p;
                while p < end {
                    let (_, _, n) = self.split_cluster(p, end);
                    if p > s && (p - s + n as u64 > limit || self.unallocated_zero(&mut m, p)?) {
                        break;
                    }
                    p += n as u64;
                }
                (s, p)
            };
            if e > s {
                self.write_inner(&zeroes[..(e - s) as usize], s, false)?;
            }
            pos = e;
        }
        Ok(())
    }

    // ---- block status ----------------------------------------------------------------

    /// Status of this layer for the first run of equal status from `offset` (at most `len`).
    pub fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        let end = offset + len;
        let mut m = self.lock();
        let l2_span = m.l2_entries() << self.cb;
        let mut pos = offset;
        let mut first: Option<(Kind, u64)> = None; // kind, host offset of the first byte
        let mut next_host = 0u64;
        let mut clusters = 0u64;
        while pos < end && clusters < MAX_STATUS_CLUSTERS {
            let (g, in_off, n) = self.split_cluster(pos, end);
            if m.l2_unallocated(g)? {
                match first {
                    None => first = Some((Kind::Unallocated, 0)),
                    Some((Kind::Unallocated, _)) => {}
                    Some(_) => break,
                }
                pos = end.min((pos / l2_span + 1) * l2_span);
                clusters += 1;
                continue;
            }
            let e = m.lookup(g)?;
            let k = kind(e);
            match first {
                None => {
                    let host = match e {
                        L2Entry::Normal { host, .. } => host + in_off as u64,
                        _ => 0,
                    };
                    first = Some((k, host));
                }
                Some((fk, _)) if fk != k => break,
                Some(_) => {
                    if let L2Entry::Normal { host, .. } = e {
                        if host != next_host {
                            break;
                        }
                    }
                }
            }
            if let L2Entry::Normal { host, .. } = e {
                next_host = host + self.cs;
            }
            pos += n as u64;
            clusters += 1;
        }
        let len = pos - offset;
        Ok(match first {
            None | Some((Kind::Unallocated, _)) => LayerStatus::Unallocated { len },
            Some((Kind::Zero, _)) => LayerStatus::Zero { len },
            Some((Kind::Data, host)) => LayerStatus::Data {
                len,
                offset: Some(host),
                compressed: false,
            },
            Some((Kind::Compressed, _)) => LayerStatus::Data {
                len,
                offset: None,
                compressed: true,
            },
        })
    }

    // ---- fast path -------------------------------------------------------------------

    /// Fast-path mapping (see [`crate::Image::map`]): never waits on disk I/O or on a busy
    /// lock; anything not resolvable from cached metadata answers [`Mapping::Slow`].
    pub fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Extent>,
    ) -> Result<Mapping> {
        // The guard first: a cluster freed after we looked it up is not reused before the
        // caller's I/O is done.
        let guard = self.tracker.enter();
        let start = out.len();
        let mut m = match self.meta.try_lock() {
            Ok(m) => m,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(Mapping::Slow),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        // A write is recorded in the dirty bitmaps now, before its I/O (if the bitmaps must
        // be marked in use on disk first, the slow path does it).
        if write && !m.try_track_write(offset, len) {
            return Ok(Mapping::Slow);
        }
        let end = offset + len;
        let mut pos = offset;
        let slow = |out: &mut Vec<Extent>| {
            out.truncate(start);
            Ok(Mapping::Slow)
        };
        while pos < end {
            let (g, in_off, n) = self.split_cluster(pos, end);
            let e = match m.lookup_cached(g) {
                Ok(Some(e)) => e,
                Ok(None) | Err(_) => return slow(out),
            };
            let host = match (e, write) {
                (L2Entry::Normal { host, copied: true }, true) => Some(host),
                (_, true) => return slow(out),
                (L2Entry::Normal { host, .. }, false) => Some(host),
                (L2Entry::Compressed { .. }, false) => return slow(out),
                (L2Entry::Zero { .. }, false) => None,
                (L2Entry::Unallocated, false) => {
                    if let Some(b) = &self.backing {
                        let bsize = b.size();
                        let bn = if pos >= bsize {
                            0
                        } else {
                            (bsize - pos).min(n as u64)
                        };
                        if bn > 0 {
                            match b.map(pos, bn, false, out)? {
                                // The backing file is read-only: nothing there is ever freed,
                                // so its guard need not outlive this call.
                                Mapping::Mapped(_g) => {}
                                Mapping::Slow => return slow(out),
                            }
                        }
                        if bn < n as u64 {
                            push_zero(out, start, n as u64 - bn);
                        }
                        pos += n as u64;
                        continue;
                    }
                    None
                }
            };
            match host {
                Some(h) => {
                    let h = h + in_off as u64;
                    let ours = out.len() > start;
                    if let Some(Extent::Data {
                        storage,
                        offset,
                        len,
                    }) = out.last_mut()
                    {
                        if ours
                            && xdisk_io::same_storage(storage, &self.file)
                            && *offset + *len == h
                        {
                            *len += n as u64;
                            pos += n as u64;
                            continue;
                        }
                    }
                    out.push(Extent::Data {
                        storage: self.file.clone(),
                        offset: h,
                        len: n as u64,
                    });
                }
                None => push_zero(out, start, n as u64),
            }
            pos += n as u64;
        }
        drop(m);
        Ok(Mapping::Mapped(guard))
    }

    // ---- resize ----------------------------------------------------------------------

    /// Changes the virtual size. Growing grows the L1 table if needed and makes the new
    /// range read as zeroes (even where a larger backing file or the stale tail of the old
    /// last cluster would show through, as QEMU does); shrinking (refused with internal
    /// snapshots) frees every cluster past the new end.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} exceeds the qcow2 limit of {MAX_VIRTUAL_SIZE} bytes"
            )));
        }
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        let need_l1 = super::format::Header::l1_entries_for(new_size, self.cb);
        if new_size > old {
            {
                let mut m = self.lock();
                m.bitmaps_before_resize(new_size)?;
                if need_l1 > m.l1.len() as u64 {
                    m.grow_l1(need_l1)?;
                }
                m.write_header_size(new_size)?;
                m.flush()?;
                m.bitmaps_resized(new_size)?;
                self.size.store(new_size, Ordering::Release);
            }
            let mut zero_end = old.next_multiple_of(self.cs);
            if let Some(b) = &self.backing {
                zero_end = zero_end.max(b.size());
            }
            let zero_end = zero_end.min(new_size);
            if zero_end > old {
                self.zero_range(old, zero_end - old, false)?;
            }
            return Ok(());
        }
        if !self.snapshots.is_empty() {
            return Err(Error::Unsupported(
                "shrinking a qcow2 image that has internal snapshots".into(),
            ));
        }
        let mut m = self.lock();
        while !m.inflight.is_empty() {
            m = self.alloc_done.wait(m).unwrap_or_else(|e| e.into_inner());
        }
        m.bitmaps_before_resize(new_size)?;
        m.write_header_size(new_size)?;
        m.bitmaps_resized(new_size)?;
        self.size.store(new_size, Ordering::Release);
        let l2e = m.l2_entries();
        let first_g = new_size.div_ceil(self.cs);
        let old_end_g = old.div_ceil(self.cs);
        // Clusters past the end inside L2 tables that stay.
        let kept_end = old_end_g.min(need_l1 * l2e);
        let mut g = first_g;
        while g < kept_end {
            if m.l2_unallocated(g)? {
                g = (g / l2e + 1) * l2e;
                continue;
            }
            let e = m.lookup(g)?;
            if e != L2Entry::Unallocated {
                m.set_entry(g, L2Entry::Unallocated)?;
                m.free_entry_later(e);
            }
            g += 1;
        }
        // L2 tables wholly past the end.
        for i in need_l1 as usize..m.l1.len() {
            let Some((off, _)) = m.l1_entry(i)? else {
                continue;
            };
            m.load_l2(off)?;
            let table = m.l2.peek(off).cloned().unwrap_or_default();
            for raw in table {
                match L2Entry::decode(raw, self.cb).and_then(|e| m.check_entry(e)) {
                    Ok(e) => m.free_entry_later(e),
                    Err(err) => tracing::warn!("shrink: skipping a bad L2 entry: {err}"),
                }
            }
            m.l2.remove(off);
            m.l1[i] = 0;
            m.mark_l1_dirty(i);
            m.meta_set.remove(&(off >> self.cb));
            m.free_later(HostCluster(off >> self.cb));
        }
        m.flush()
    }
}

/// Appends zeroes, merging with a zero extent this call added.
fn push_zero(out: &mut Vec<Extent>, start: usize, n: u64) {
    if out.len() > start {
        if let Some(Extent::Zero { len }) = out.last_mut() {
            *len += n;
            return;
        }
    }
    out.push(Extent::Zero { len: n });
}
