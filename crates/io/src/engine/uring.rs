//! PLACEHOLDER: being implemented.

use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

use super::{Completion, Engine, EngineConfig, Op};
use crate::buf::IoBuf;
use crate::cache::AioKind;

pub struct UringEngine;

impl UringEngine {
    pub fn new(_cfg: &EngineConfig) -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "engine not built yet",
        ))
    }
}

impl<B: IoBuf> Engine<B> for UringEngine {
    fn kind(&self) -> AioKind {
        AioKind::Threads
    }
    fn submit(&mut self, op: Op<B>) -> Result<(), (Op<B>, io::Error)> {
        Err((op, io::Error::from(io::ErrorKind::Unsupported)))
    }
    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn reap(
        &mut self,
        _out: &mut Vec<Completion<B>>,
        _min: usize,
        _t: Option<Duration>,
    ) -> io::Result<usize> {
        Ok(0)
    }
    fn event_fd(&self) -> RawFd {
        -1
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn capacity(&self) -> usize {
        0
    }
}
