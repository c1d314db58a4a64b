//! The requests: [`State::dispatch`] checks who may send what, then one function per
//! operation (named after xenstored's `do_*` handlers) does the work, on the live tree or in a
//! transaction.

use std::collections::HashMap;

use super::tree::{self, Actor, Op, Tree, READ, WRITE};
use super::wire::{
    self, domain_path, join_strings, ok_payload, DomId, Errno, MsgType, Perm, XsRequest,
    XENSTORE_PAYLOAD_MAX,
};
use super::{directory_part, encode, parent_of, resolve, Config, Reply, State, Tx, WatchReg};

/// A request's context, once [`State::dispatch`] has accepted it.
#[derive(Clone, Copy)]
struct Ctx<'c> {
    cfg: &'c Config,
    /// The connection.
    cid: u64,
    /// The transaction (0: none; always 0 for WATCH and UNWATCH).
    tx_id: u32,
    /// The connection's domain.
    dom: DomId,
    actor: Actor,
}

impl State {
    pub(super) fn dispatch(
        &mut self,
        cfg: &Config,
        cid: u64,
        tx_id: u32,
        req: XsRequest,
    ) -> Result<Reply, Errno> {
        let dom = self.conns.get(&cid).ok_or(Errno::EIO)?.domid;
        let actor = self.actor(dom);
        // xenstored's XS_FLAG_PRIV requests.
        let privileged = matches!(
            req,
            XsRequest::Control { .. }
                | XsRequest::Introduce { .. }
                | XsRequest::Release { .. }
                | XsRequest::IsDomainIntroduced { .. }
                | XsRequest::Resume { .. }
                | XsRequest::SetTarget { .. }
        );
        if privileged && dom != 0 {
            return Err(Errno::EACCES);
        }
        // xenstore.txt "WATCH": "The tx_id in a WATCH request is ignored" (also UNWATCH).
        let ignores_tx = matches!(req, XsRequest::Watch { .. } | XsRequest::Unwatch { .. });
        let tx_id = if ignores_tx { 0 } else { tx_id };
        if tx_id != 0
            && !self
                .conns
                .get(&cid)
                .is_some_and(|c| c.txs.contains_key(&tx_id))
        {
            return Err(Errno::ENOENT);
        }
        let cx = Ctx {
            cfg,
            cid,
            tx_id,
            dom,
            actor,
        };
        match req {
            XsRequest::Read { path } => self.do_read(cx, &path),
            XsRequest::Directory { path } => self.do_directory(cx, &path),
            XsRequest::DirectoryPart { path, offset } => self.do_directory_part(cx, &path, offset),
            XsRequest::GetPerms { path } => self.do_get_perms(cx, &path),
            XsRequest::Write { path, value } => {
                self.write_op(cx, Op::Write(resolve(&path, dom)?, value))
            }
            XsRequest::Mkdir { path } => self.write_op(cx, Op::Mkdir(resolve(&path, dom)?)),
            XsRequest::Rm { path } => self.write_op(cx, Op::Rm(resolve(&path, dom)?)),
            XsRequest::SetPerms { path, perms } => self.do_set_perms(cx, path, perms),
            XsRequest::Watch { path, token } => self.do_watch(cx, path, token),
            XsRequest::Unwatch { path, token } => self.do_unwatch(cx, path, token),
            XsRequest::ResetWatches => self.do_reset_watches(cx),
            XsRequest::TransactionStart => self.do_transaction_start(cx),
            XsRequest::TransactionEnd { commit } => self.do_transaction_end(cx, commit),
            XsRequest::GetDomainPath { domid } => {
                Ok(Reply::data(join_strings(&[domain_path(domid)])))
            }
            XsRequest::Introduce { domid, .. } => self.introduce(domid).map(|()| Reply::ok()),
            XsRequest::Release { domid } => self.release(domid).map(|()| Reply::ok()),
            XsRequest::IsDomainIntroduced { domid } => Ok(self.do_is_domain_introduced(domid)),
            XsRequest::Resume { domid } => self.do_resume(domid),
            XsRequest::SetTarget { domid, target } => self.do_set_target(domid, target),
            XsRequest::Control { args } => do_control(&args),
        }
    }

    fn do_read(&mut self, cx: Ctx, path: &str) -> Result<Reply, Errno> {
        let p = resolve(path, cx.dom)?;
        self.read_op(cx, &p, |t| {
            t.lookup(&p, cx.actor, READ)
                .map(|n| Reply::data(n.value.clone()))
        })
    }

    fn do_directory(&mut self, cx: Ctx, path: &str) -> Result<Reply, Errno> {
        let p = resolve(path, cx.dom)?;
        self.read_op(cx, &p, |t| {
            let n = t.lookup(&p, cx.actor, READ)?;
            Ok(Reply::data(join_strings(
                &n.children.keys().collect::<Vec<_>>(),
            )))
        })
    }

    fn do_directory_part(&mut self, cx: Ctx, path: &str, offset: u32) -> Result<Reply, Errno> {
        let p = resolve(path, cx.dom)?;
        self.read_op(cx, &p, |t| {
            let n = t.lookup(&p, cx.actor, READ)?;
            Ok(Reply::data(directory_part(
                n.gen,
                &n.children.keys().collect::<Vec<_>>(),
                offset as usize,
            )))
        })
    }

    fn do_get_perms(&mut self, cx: Ctx, path: &str) -> Result<Reply, Errno> {
        if path.starts_with('@') {
            let perms = self.special.get(path).ok_or(Errno::ENOENT)?;
            if tree::rights(perms, cx.actor) & READ == 0 {
                return Err(Errno::EACCES);
            }
            return Ok(Reply::data(wire::perms_payload(perms)));
        }
        let p = resolve(path, cx.dom)?;
        self.read_op(cx, &p, |t| {
            t.lookup(&p, cx.actor, READ)
                .map(|n| Reply::data(wire::perms_payload(&n.perms)))
        })
    }

    fn do_set_perms(&mut self, cx: Ctx, path: String, perms: Vec<Perm>) -> Result<Reply, Errno> {
        if path.starts_with('@') {
            let cur = self.special.get(&path).ok_or(Errno::ENOENT)?;
            if tree::rights(cur, cx.actor) & (WRITE | tree::OWNER) != WRITE | tree::OWNER {
                return Err(Errno::EACCES);
            }
            if cx.dom != 0 && tree::owner(cur) != tree::owner(&perms) {
                return Err(Errno::EPERM);
            }
            self.special.insert(path, perms.into());
            return Ok(Reply::ok());
        }
        self.write_op(cx, Op::SetPerms(resolve(&path, cx.dom)?, perms))
    }

    fn do_watch(&mut self, cx: Ctx, path: String, token: Vec<u8>) -> Result<Reply, Errno> {
        let dom = cx.dom;
        let (abs, rel_base) = if path.starts_with('@') || path.starts_with('/') {
            (path.clone(), None)
        } else {
            (resolve(&path, dom)?, Some(domain_path(dom)))
        };
        let conn = self.conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        if conn
            .watches
            .iter()
            .any(|w| w.path == abs && w.token == token)
        {
            return Err(Errno::EEXIST);
        }
        if conn.watches.len() >= cx.cfg.max_watches_per_conn {
            return Err(Errno::E2BIG);
        }
        // xenstore.txt "WATCH": "When a watch is first set up it is triggered once straight
        // away, with <path> equal to <wpath>" (sent after the reply, as xenstored does).
        let initial = wire::watch_event_payload(&path, &token);
        conn.watches.push(WatchReg {
            path: abs,
            token,
            rel_base,
        });
        let after = if initial.len() <= XENSTORE_PAYLOAD_MAX {
            vec![encode(MsgType::WatchEvent, 0, 0, initial)]
        } else {
            Vec::new()
        };
        Ok(Reply {
            payload: ok_payload(),
            after,
        })
    }

    fn do_unwatch(&mut self, cx: Ctx, path: String, token: Vec<u8>) -> Result<Reply, Errno> {
        let abs = if path.starts_with('@') {
            path
        } else {
            resolve(&path, cx.dom)?
        };
        let conn = self.conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        let i = conn
            .watches
            .iter()
            .position(|w| w.path == abs && w.token == token)
            .ok_or(Errno::ENOENT)?;
        conn.watches.remove(i);
        Ok(Reply::ok())
    }

    fn do_reset_watches(&mut self, cx: Ctx) -> Result<Reply, Errno> {
        let conn = self.conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        conn.watches.clear();
        conn.txs.clear();
        Ok(Reply::ok())
    }

    fn do_transaction_start(&mut self, cx: Ctx) -> Result<Reply, Errno> {
        // xenstore.txt: "It is not legal to send non-0 tx_id in TRANSACTION_START."
        if cx.tx_id != 0 {
            return Err(Errno::EBUSY);
        }
        let id = self.next_tx_id(cx.cid);
        let conn = self.conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        if conn.txs.len() >= cx.cfg.max_transactions_per_conn {
            return Err(Errno::ENOSPC);
        }
        let tx = Tx {
            base: self.tree.clone(),
            view: self.tree.clone(),
            observed: HashMap::new(),
            ops: Vec::new(),
            bytes: 0,
        };
        conn.txs.insert(id, tx);
        Ok(Reply::data(join_strings(&[id.to_string()])))
    }

    fn do_transaction_end(&mut self, cx: Ctx, commit: bool) -> Result<Reply, Errno> {
        if cx.tx_id == 0 {
            return Err(Errno::ENOENT);
        }
        let conn = self.conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        let tx = conn.txs.remove(&cx.tx_id).ok_or(Errno::ENOENT)?;
        if commit {
            self.commit(cx.cfg, cx.actor, tx)?;
        }
        Ok(Reply::ok())
    }

    fn do_is_domain_introduced(&self, domid: DomId) -> Reply {
        let yes = domid == 0 || self.introduced.contains(&domid);
        Reply::data(join_strings(&[if yes { "T" } else { "F" }]))
    }

    fn do_resume(&self, domid: DomId) -> Result<Reply, Errno> {
        if domid != 0 && !self.introduced.contains(&domid) {
            return Err(Errno::ENOENT);
        }
        Ok(Reply::ok())
    }

    fn do_set_target(&mut self, domid: DomId, target: DomId) -> Result<Reply, Errno> {
        if domid == 0 {
            return Err(Errno::EINVAL);
        }
        self.targets.insert(domid, target);
        Ok(Reply::ok())
    }

    fn next_tx_id(&mut self, cid: u64) -> u32 {
        let in_use =
            |s: &State, id: u32| s.conns.get(&cid).is_some_and(|c| c.txs.contains_key(&id));
        loop {
            let id = self.next_tx;
            self.next_tx = self.next_tx.wrapping_add(1).max(1);
            if !in_use(self, id) {
                return id;
            }
        }
    }

    /// A query, on the live tree or on a transaction's view (recording what it depends on).
    fn read_op<F>(&mut self, cx: Ctx, path: &str, f: F) -> Result<Reply, Errno>
    where
        F: FnOnce(&Tree) -> Result<Reply, Errno>,
    {
        if cx.tx_id == 0 {
            return f(&self.tree);
        }
        let conn = self.conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        let budget = (conn.domid != 0).then_some(cx.cfg.max_transaction_bytes);
        let tx = conn.txs.get_mut(&cx.tx_id).ok_or(Errno::ENOENT)?;
        tx.observe(path, budget)?;
        f(&tx.view)
    }

    /// A change, applied to the live tree (firing watches) or recorded in a transaction.
    fn write_op(&mut self, cx: Ctx, op: Op) -> Result<Reply, Errno> {
        let lim = cx.cfg.limits();
        if cx.tx_id == 0 {
            let events = self.tree.apply(&op, cx.actor, &lim, &mut self.gen)?;
            self.fire(events);
            return Ok(Reply::ok());
        }
        let State { conns, gen, .. } = self;
        let conn = conns.get_mut(&cx.cid).ok_or(Errno::EIO)?;
        let budget = (conn.domid != 0).then_some(cx.cfg.max_transaction_bytes);
        let tx = conn.txs.get_mut(&cx.tx_id).ok_or(Errno::ENOENT)?;
        tx.observe(op.path(), budget)?;
        if let Op::Rm(p) = &op {
            // Removing changes the parent's child list.
            if let Some(parent) = parent_of(p) {
                tx.observe(parent, budget)?;
            }
        }
        if budget.is_some_and(|b| tx.bytes + op.cost() > b) {
            return Err(Errno::ENOSPC);
        }
        tx.view.apply(&op, cx.actor, &lim, gen)?;
        tx.bytes += op.cost();
        tx.ops.push(op);
        Ok(Reply::ok())
    }

    /// xenstore.txt "TRANSACTION_END": commits if nothing the transaction depends on changed;
    /// otherwise `EAGAIN`. The recorded operations are replayed on a copy of the live tree,
    /// which replaces it only if every one succeeds.
    fn commit(&mut self, cfg: &Config, actor: Actor, tx: Tx) -> Result<(), Errno> {
        if tx.observed.iter().any(|(p, &g)| self.tree.gen_of(p) != g) {
            return Err(Errno::EAGAIN);
        }
        if tx.ops.is_empty() {
            return Ok(());
        }
        let lim = cfg.limits();
        let mut next = self.tree.clone();
        let mut events = Vec::new();
        for op in &tx.ops {
            events.extend(next.apply(op, actor, &lim, &mut self.gen)?);
        }
        self.tree = next;
        self.fire(events);
        Ok(())
    }
}

/// CONTROL (xenstored's `do_control`): `help`, `check` and `print`.
fn do_control(args: &[Vec<u8>]) -> Result<Reply, Errno> {
    match args.first().map(Vec::as_slice).unwrap_or_default() {
        b"help" => Ok(Reply::data(b"check\nhelp\nprint\n\0".to_vec())),
        b"check" => Ok(Reply::ok()),
        b"print" => {
            let text = args
                .get(1)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .unwrap_or_default();
            tracing::info!(%text, "xenstored control print");
            Ok(Reply::ok())
        }
        _ => Err(Errno::EINVAL),
    }
}
