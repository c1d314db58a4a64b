//! Simulated event channels, following xen/include/public/event_channel.h:
//!
//! - `EVTCHNOP_alloc_unbound`: a domain allocates a port that one `remote_dom` may bind.
//! - `EVTCHNOP_bind_interdomain`: `remote_dom` binds a new local port to it; both ends are then
//!   `ECS_INTERDOMAIN`. Binding a port that is not unbound for us fails.
//! - `EVTCHNOP_send`: marks the other end pending; here, its eventfd becomes readable. On a
//!   port whose peer has closed (state `ECS_UNBOUND` again) the event is silently dropped, as
//!   Xen does.
//! - `EVTCHNOP_close`: dropping an end frees its port; the peer's port returns to
//!   `ECS_UNBOUND` for the same remote domain, so it can be bound again (reconnection).
//!
//! Ports are per domain, allocated lowest first from 1 (port 0 is never valid), at most
//! [`MAX_PORTS`] per domain (the 2-level ABI's limit on 64-bit guests).

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::mem::EventFd;
use xdisk_xen::platform::{DomId, EventChannel, EventChannels, PlatformError, Port};

/// Ports per domain (`EVTCHN_2L_NR_CHANNELS` for 64-bit guests).
pub const MAX_PORTS: Port = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `ECS_UNBOUND`: waiting for `remote` to bind.
    Unbound { remote: DomId },
    /// `ECS_INTERDOMAIN`: connected to `port` of `remote`.
    Interdomain { remote: DomId, port: Port },
}

#[derive(Debug)]
struct PortEntry {
    fd: Arc<EventFd>,
    state: State,
    /// Identifies the owner object (a port number can be reused after a close).
    gen: u64,
}

#[derive(Debug, Default)]
struct Registry {
    alive: HashSet<DomId>,
    ports: BTreeMap<(DomId, Port), PortEntry>,
}

impl Registry {
    fn free_port(&self, domid: DomId) -> Option<Port> {
        let mut want: Port = 1;
        for (&(_, p), _) in self.ports.range((domid, 1)..=(domid, Port::MAX)) {
            if p != want {
                break;
            }
            want += 1;
        }
        (want < MAX_PORTS).then_some(want)
    }
}

/// All event channels of the simulated host.
#[derive(Debug, Default)]
pub(crate) struct EvtchnHub {
    reg: Mutex<Registry>,
    gen: AtomicU64,
}

fn ev_err(msg: impl Into<String>) -> PlatformError {
    PlatformError::EventChannel(msg.into())
}

impl EvtchnHub {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn add_domain(&self, domid: DomId) {
        self.lock().alive.insert(domid);
    }

    /// Closes every port of `domid` (their peers become unbound) and forgets the domain.
    pub(crate) fn remove_domain(&self, domid: DomId) {
        let mut reg = self.lock();
        reg.alive.remove(&domid);
        let ports: Vec<Port> = reg
            .ports
            .range((domid, 1)..=(domid, Port::MAX))
            .map(|(&(_, p), _)| p)
            .collect();
        for p in ports {
            close_locked(&mut reg, domid, p);
        }
    }

    fn new_port(
        self: &Arc<Self>,
        reg: &mut Registry,
        domid: DomId,
        state: State,
    ) -> Result<SimPort, PlatformError> {
        let port = reg
            .free_port(domid)
            .ok_or_else(|| ev_err(format!("domain {domid} has no free event channel port")))?;
        let fd = Arc::new(EventFd::new().map_err(|source| PlatformError::Io {
            context: "eventfd".into(),
            source,
        })?);
        let gen = self.gen.fetch_add(1, Ordering::Relaxed);
        reg.ports.insert(
            (domid, port),
            PortEntry {
                fd: fd.clone(),
                state,
                gen,
            },
        );
        Ok(SimPort {
            hub: self.clone(),
            domid,
            port,
            fd,
            gen,
        })
    }

    /// Number of open ports of `domid` (for tests).
    pub(crate) fn port_count(&self, domid: DomId) -> usize {
        self.lock()
            .ports
            .range((domid, 1)..=(domid, Port::MAX))
            .count()
    }
}

fn close_locked(reg: &mut Registry, domid: DomId, port: Port) {
    let Some(entry) = reg.ports.remove(&(domid, port)) else {
        return;
    };
    if let State::Interdomain {
        remote,
        port: rport,
    } = entry.state
    {
        if let Some(peer) = reg.ports.get_mut(&(remote, rport)) {
            if peer.state
                == (State::Interdomain {
                    remote: domid,
                    port,
                })
            {
                peer.state = State::Unbound { remote: domid };
            }
        }
    }
}

/// The event channel operations of one simulated domain.
#[derive(Debug)]
pub struct SimEventChannels {
    hub: Arc<EvtchnHub>,
    domid: DomId,
}

impl SimEventChannels {
    pub(crate) fn new(hub: Arc<EvtchnHub>, domid: DomId) -> SimEventChannels {
        SimEventChannels { hub, domid }
    }

    /// The domain these channels belong to.
    pub fn domid(&self) -> DomId {
        self.domid
    }
}

impl EventChannels for SimEventChannels {
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError> {
        let mut reg = self.hub.lock();
        if !reg.alive.contains(&self.domid) {
            return Err(ev_err(format!("domain {} does not exist", self.domid)));
        }
        if !reg.alive.contains(&domid) {
            return Err(ev_err(format!("remote domain {domid} does not exist")));
        }
        match reg.ports.get(&(domid, remote_port)).map(|e| e.state) {
            Some(State::Unbound { remote }) if remote == self.domid => {}
            Some(State::Unbound { remote }) => {
                return Err(ev_err(format!(
                    "port {remote_port} of domain {domid} is reserved for domain {remote}"
                )))
            }
            Some(State::Interdomain { .. }) => {
                return Err(ev_err(format!(
                    "port {remote_port} of domain {domid} is already bound"
                )))
            }
            None => {
                return Err(ev_err(format!(
                    "port {remote_port} of domain {domid} is not allocated"
                )))
            }
        }
        let local = self.hub.new_port(
            &mut reg,
            self.domid,
            State::Interdomain {
                remote: domid,
                port: remote_port,
            },
        )?;
        if let Some(e) = reg.ports.get_mut(&(domid, remote_port)) {
            e.state = State::Interdomain {
                remote: self.domid,
                port: local.port,
            };
        }
        Ok(Box::new(local))
    }

    fn alloc_unbound(&self, remote: DomId) -> Result<Box<dyn EventChannel>, PlatformError> {
        let mut reg = self.hub.lock();
        if !reg.alive.contains(&self.domid) {
            return Err(ev_err(format!("domain {} does not exist", self.domid)));
        }
        if !reg.alive.contains(&remote) {
            return Err(ev_err(format!("remote domain {remote} does not exist")));
        }
        let port = self
            .hub
            .new_port(&mut reg, self.domid, State::Unbound { remote })?;
        Ok(Box::new(port))
    }
}

/// One end of a simulated event channel; closing it (drop) is `EVTCHNOP_close`.
#[derive(Debug)]
pub struct SimPort {
    hub: Arc<EvtchnHub>,
    domid: DomId,
    port: Port,
    fd: Arc<EventFd>,
    gen: u64,
}

impl SimPort {
    /// The peer's doorbell if connected; `Err` if this port was closed under us (its domain
    /// was destroyed).
    fn peer_fd(&self) -> Result<Option<Arc<EventFd>>, PlatformError> {
        let reg = self.hub.lock();
        let me = reg
            .ports
            .get(&(self.domid, self.port))
            .filter(|e| e.gen == self.gen)
            .ok_or_else(|| {
                ev_err(format!(
                    "port {} of domain {} is closed",
                    self.port, self.domid
                ))
            })?;
        Ok(match me.state {
            State::Interdomain { remote, port } => {
                reg.ports.get(&(remote, port)).map(|p| p.fd.clone())
            }
            State::Unbound { .. } => None,
        })
    }
}

impl EventChannel for SimPort {
    fn local_port(&self) -> Port {
        self.port
    }

    fn notify(&self) -> Result<(), PlatformError> {
        if let Some(fd) = self.peer_fd()? {
            fd.try_signal().map_err(|source| PlatformError::Io {
                context: "event channel notify".into(),
                source,
            })?;
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn clear(&self) -> Result<bool, PlatformError> {
        self.fd.try_drain().map_err(|source| PlatformError::Io {
            context: "event channel clear".into(),
            source,
        })
    }
}

impl Drop for SimPort {
    fn drop(&mut self) {
        let mut reg = self.hub.lock();
        if reg
            .ports
            .get(&(self.domid, self.port))
            .is_some_and(|e| e.gen == self.gen)
        {
            close_locked(&mut reg, self.domid, self.port);
        }
    }
}
