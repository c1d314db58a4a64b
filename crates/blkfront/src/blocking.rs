//! Blocking I/O on top of [`Frontend::submit`] and [`Frontend::wait`]: one operation, or reads
//! and writes of any size split over the queues.

use std::time::{Duration, Instant};

use xdisk_blkif::wire::{Status, SECTOR_SIZE};

use crate::{Completion, Error, Frontend, Op, Result};

impl Frontend {
    /// Submits on `queue`, waiting for ring space, and waits for the completion.
    pub fn run(&mut self, queue: usize, op: Op) -> Result<Completion> {
        let deadline = Instant::now() + self.cfg.timeout;
        let tag = loop {
            match self.submit(queue, op.clone()) {
                Err(Error::RingFull(_)) if Instant::now() < deadline => {
                    let done = self.poll(Duration::from_millis(50))?;
                    self.ready.extend(done);
                }
                other => break other?,
            }
        };
        self.wait(tag)
    }

    fn check(c: Completion) -> Result<Completion> {
        match c.status {
            Status::Okay => Ok(c),
            s => Err(Error::Failed(s)),
        }
    }

    /// Reads `sectors` sectors at `sector` (split into requests as large as allowed, spread
    /// over the queues, all in flight at once).
    pub fn read(&mut self, sector: u64, sectors: u64) -> Result<Vec<u8>> {
        let chunk = self.max_request_sectors();
        let mut tags = Vec::new();
        let mut s = 0;
        let mut i = 0;
        while s < sectors {
            let n = chunk.min(sectors - s);
            let q = i % self.queues.len().max(1);
            let op = Op::Read {
                sector: sector + s,
                sectors: n as u32,
            };
            tags.push(self.submit_waiting(q, op)?);
            s += n;
            i += 1;
        }
        let mut out = Vec::with_capacity(sectors as usize * SECTOR_SIZE);
        for t in tags {
            let c = Self::check(self.wait(t)?)?;
            out.extend(c.data.unwrap_or_default());
        }
        Ok(out)
    }

    /// Writes `data` at `sector` (split like [`Frontend::read`]).
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        let chunk = self.max_request_sectors() as usize * SECTOR_SIZE;
        let mut tags = Vec::new();
        for (i, piece) in data.chunks(chunk).enumerate() {
            let q = i % self.queues.len().max(1);
            let op = Op::Write {
                sector: sector + (i * chunk / SECTOR_SIZE) as u64,
                data: piece.to_vec(),
            };
            tags.push(self.submit_waiting(q, op)?);
        }
        let mut result = Ok(());
        for t in tags {
            if let Err(e) = Self::check(self.wait(t)?) {
                result = Err(e);
            }
        }
        result
    }

    fn submit_waiting(&mut self, queue: usize, op: Op) -> Result<u64> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            match self.submit(queue, op.clone()) {
                Err(Error::RingFull(_)) if Instant::now() < deadline => {
                    let done = self.poll(Duration::from_millis(50))?;
                    self.ready.extend(done);
                }
                other => return other,
            }
        }
    }

    /// `BLKIF_OP_FLUSH_DISKCACHE` on queue 0.
    pub fn flush(&mut self) -> Result<()> {
        Self::check(self.run(0, Op::Flush)?).map(drop)
    }

    /// `BLKIF_OP_DISCARD` on queue 0.
    pub fn discard(&mut self, sector: u64, nr_sectors: u64) -> Result<()> {
        Self::check(self.run(
            0,
            Op::Discard {
                sector,
                nr_sectors,
                secure: false,
            },
        )?)
        .map(drop)
    }
}
