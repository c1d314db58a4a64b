//! The node tree of the in-process xenstored.
//!
//! A persistent (copy-on-write) tree: nodes are shared through `Arc`, a mutation copies only
//! the nodes on the path from the root to what it changes (`Arc::make_mut`), so cloning a
//! [`Tree`] is O(number of owners) and gives a transaction a true snapshot of the store.
//!
//! Semantics follow xenstore.txt ("Database read, write and permissions operations") and, where
//! it is silent, what xenstored does:
//! - permissions: the first entry names the owner and the access of every domain not listed
//!   further on; dom0 and the owner have full access (xenstore.txt, "GET_PERMS").
//! - a missing node reports `EACCES` instead of `ENOENT` when the nearest existing ancestor does
//!   not grant the requested access (so that unreadable subtrees do not leak their shape).
//! - new nodes inherit their parent's permissions; a node created by an unprivileged domain is
//!   owned by that domain.
//! - every change of a node's value, permissions or child list gives it a new generation number;
//!   transactions use generations to detect conflicts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use xdisk_xen::xenstore::wire::{Access, DomId, Errno, Perm};

/// A node's permission list (never empty).
pub(crate) type Perms = Arc<[Perm]>;

pub(crate) const READ: u8 = 1;
pub(crate) const WRITE: u8 = 2;
pub(crate) const OWNER: u8 = 4;
const ALL: u8 = READ | WRITE | OWNER;

#[derive(Clone)]
pub(crate) struct Node {
    pub value: Vec<u8>,
    pub perms: Perms,
    pub children: BTreeMap<String, Arc<Node>>,
    pub gen: u64,
}

impl Drop for Node {
    // Paths may be ~1500 components deep; dropping such a chain recursively could exhaust a
    // thread's stack, so dismantle uniquely owned descendants iteratively.
    fn drop(&mut self) {
        let mut stack: Vec<Arc<Node>> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(n) = stack.pop() {
            if let Some(mut n) = Arc::into_inner(n) {
                stack.extend(std::mem::take(&mut n.children).into_values());
            }
        }
    }
}

/// Who performs an operation: a domain, and the domain it targets if dom0 said so
/// (xenstore.txt, "SET_TARGET").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Actor {
    pub dom: DomId,
    pub target: Option<DomId>,
}

/// Limits that apply to unprivileged domains.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_nodes_per_domain: usize,
    pub max_value_size: usize,
    pub max_perms_per_node: usize,
}

/// A change that may fire watches (see the server's `fire`).
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub path: String,
    /// Match only watches on exactly this path (used for the descendants of a removed node,
    /// xenstore.txt "WATCH_EVENT": "if the event was the recursive removal of an parent of
    /// <wpath>, <epath> is just <wpath>").
    pub exact: bool,
    /// The node's permissions (before removal for removed nodes), which decide who may see it.
    pub perms: Perms,
    /// The previous permissions, for SET_PERMS: whoever could read either may see the event.
    pub old_perms: Option<Perms>,
}

impl Event {
    pub fn new(path: &str, perms: Perms) -> Event {
        Event {
            path: path.to_owned(),
            exact: false,
            perms,
            old_perms: None,
        }
    }
}

/// A mutation, as recorded by a transaction and replayed on commit.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<Perm>),
}

impl Op {
    pub fn path(&self) -> &str {
        match self {
            Op::Write(p, _) | Op::Mkdir(p) | Op::Rm(p) | Op::SetPerms(p, _) => p,
        }
    }

    /// Rough memory cost, for the transaction byte budget.
    pub fn cost(&self) -> usize {
        let extra = match self {
            Op::Write(_, v) => v.len(),
            Op::SetPerms(_, p) => p.len() * std::mem::size_of::<Perm>(),
            Op::Mkdir(_) | Op::Rm(_) => 0,
        };
        self.path().len() + extra + 32
    }
}

fn mask(a: Access) -> u8 {
    match a {
        Access::None => 0,
        Access::Read => READ,
        Access::Write => WRITE,
        Access::Both => READ | WRITE,
    }
}

/// The owner of a permission list.
pub(crate) fn owner(perms: &[Perm]) -> DomId {
    perms.first().map_or(0, |p| p.domid)
}

/// The rights (`READ | WRITE | OWNER` bits) of `actor` on a node with `perms`.
pub(crate) fn rights(perms: &[Perm], actor: Actor) -> u8 {
    if actor.dom == 0 {
        return ALL;
    }
    let own = owner(perms);
    if own == actor.dom || Some(own) == actor.target {
        return ALL;
    }
    let mut found: Option<u8> = None;
    for p in perms.iter().skip(1) {
        if p.domid == actor.dom || Some(p.domid) == actor.target {
            found = Some(found.unwrap_or(0) | mask(p.access));
        }
    }
    found.unwrap_or_else(|| perms.first().map_or(0, |p| mask(p.access)))
}

/// The components of an absolute path ("/" has none).
pub(crate) fn components(path: &str) -> Vec<&str> {
    match path.strip_prefix('/') {
        Some("") | None => Vec::new(),
        Some(rest) => rest.split('/').collect(),
    }
}

fn path_of(c: &[&str]) -> String {
    if c.is_empty() {
        "/".to_owned()
    } else {
        let mut s = String::with_capacity(c.iter().map(|x| x.len() + 1).sum());
        for x in c {
            s.push('/');
            s.push_str(x);
        }
        s
    }
}

fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

fn bump(gen: &mut u64) -> u64 {
    *gen += 1;
    *gen
}

#[derive(Clone)]
pub(crate) struct Tree {
    root: Arc<Node>,
    /// Number of nodes owned by each domain (quota accounting).
    owners: HashMap<DomId, usize>,
}

impl Tree {
    /// A tree with only the root, owned by dom0 and closed to everybody else (`n0`).
    pub fn new(gen: &mut u64) -> Tree {
        let root = Node {
            value: Vec::new(),
            perms: vec![Perm::new(Access::None, 0)].into(),
            children: BTreeMap::new(),
            gen: bump(gen),
        };
        Tree {
            root: Arc::new(root),
            owners: HashMap::from([(0, 1)]),
        }
    }

    /// Number of nodes owned by `dom`.
    pub fn owned_by(&self, dom: DomId) -> usize {
        self.owners.get(&dom).copied().unwrap_or(0)
    }

    /// Follows `c` as far as it exists: the deepest existing node and how many components
    /// matched (`== c.len()` iff the node exists).
    fn walk(&self, c: &[&str]) -> (&Node, usize) {
        let mut cur: &Node = &self.root;
        let mut depth = 0;
        for name in c {
            match cur.children.get(*name) {
                Some(n) => {
                    cur = n;
                    depth += 1;
                }
                None => break,
            }
        }
        (cur, depth)
    }

    fn node_mut(&mut self, c: &[&str]) -> Option<&mut Node> {
        let mut cur = Arc::make_mut(&mut self.root);
        for name in c {
            cur = Arc::make_mut(cur.children.get_mut(*name)?);
        }
        Some(cur)
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        let c = components(path);
        let (n, depth) = self.walk(&c);
        (depth == c.len()).then_some(n)
    }

    /// The node's generation, 0 if it does not exist.
    pub fn gen_of(&self, path: &str) -> u64 {
        self.get(path).map_or(0, |n| n.gen)
    }

    /// For transaction bookkeeping: the generations a decision about `path` depends on: the
    /// node itself (0 if missing) and, if it is missing, its nearest existing ancestor.
    pub fn dependencies(&self, path: &str) -> Vec<(String, u64)> {
        let c = components(path);
        let (n, depth) = self.walk(&c);
        if depth == c.len() {
            vec![(path.to_owned(), n.gen)]
        } else {
            vec![(path.to_owned(), 0), (path_of(&c[..depth]), n.gen)]
        }
    }

    /// The node at `path` if `actor` has the `need` rights on it.
    pub fn lookup(&self, path: &str, actor: Actor, need: u8) -> Result<&Node, Errno> {
        let c = components(path);
        let (n, depth) = self.walk(&c);
        let allowed = rights(&n.perms, actor) & need == need;
        match (depth == c.len(), allowed) {
            (true, true) => Ok(n),
            (_, false) => Err(Errno::EACCES),
            (false, true) => Err(Errno::ENOENT),
        }
    }

    pub fn apply(
        &mut self,
        op: &Op,
        actor: Actor,
        lim: &Limits,
        gen: &mut u64,
    ) -> Result<Vec<Event>, Errno> {
        match op {
            Op::Write(p, v) => self.write(p, v.clone(), actor, lim, gen),
            Op::Mkdir(p) => self.mkdir(p, actor, lim, gen),
            Op::Rm(p) => self.rm(p, actor, gen),
            Op::SetPerms(p, perms) => self.set_perms(p, perms, actor, lim, gen),
        }
    }

    /// xenstore.txt "WRITE": stores the value, creating missing parents with empty values.
    pub fn write(
        &mut self,
        path: &str,
        value: Vec<u8>,
        actor: Actor,
        lim: &Limits,
        gen: &mut u64,
    ) -> Result<Vec<Event>, Errno> {
        if actor.dom != 0 && value.len() > lim.max_value_size {
            return Err(Errno::ENOSPC);
        }
        let c = components(path);
        let (n, depth) = self.walk(&c);
        if rights(&n.perms, actor) & WRITE == 0 {
            return Err(Errno::EACCES);
        }
        let perms = if depth == c.len() {
            let g = bump(gen);
            let n = self.node_mut(&c).ok_or(Errno::EIO)?;
            n.value = value;
            n.gen = g;
            n.perms.clone()
        } else {
            self.create(&c, depth, value, actor, lim, gen)?
        };
        Ok(vec![Event::new(path, perms)])
    }

    /// xenstore.txt "MKDIR": ensures the node exists, leaving existing values alone.
    pub fn mkdir(
        &mut self,
        path: &str,
        actor: Actor,
        lim: &Limits,
        gen: &mut u64,
    ) -> Result<Vec<Event>, Errno> {
        let c = components(path);
        let (n, depth) = self.walk(&c);
        if rights(&n.perms, actor) & WRITE == 0 {
            return Err(Errno::EACCES);
        }
        if depth == c.len() {
            return Ok(Vec::new());
        }
        let perms = self.create(&c, depth, Vec::new(), actor, lim, gen)?;
        Ok(vec![Event::new(path, perms)])
    }

    /// Creates `c[depth..]` below the existing `c[..depth]`; the caller checked the write right
    /// on that ancestor. Returns the new nodes' permissions.
    fn create(
        &mut self,
        c: &[&str],
        depth: usize,
        value: Vec<u8>,
        actor: Actor,
        lim: &Limits,
        gen: &mut u64,
    ) -> Result<Perms, Errno> {
        let new_nodes = c.len() - depth;
        let parent_perms = self.walk(&c[..depth]).0.perms.clone();
        let perms: Perms = if actor.dom != 0 {
            let mut p = parent_perms.to_vec();
            if let Some(first) = p.first_mut() {
                first.domid = actor.dom;
            }
            p.into()
        } else {
            parent_perms
        };
        if actor.dom != 0 && self.owned_by(actor.dom) + new_nodes > lim.max_nodes_per_domain {
            return Err(Errno::ENOSPC);
        }
        let g = bump(gen);
        let leaf = |value| Node {
            value,
            perms: perms.clone(),
            children: BTreeMap::new(),
            gen: g,
        };
        let mut node = leaf(value);
        for i in (depth + 1..c.len()).rev() {
            let mut parent = leaf(Vec::new());
            parent.children.insert(c[i].to_owned(), Arc::new(node));
            node = parent;
        }
        let anc = self.node_mut(&c[..depth]).ok_or(Errno::EIO)?;
        anc.children.insert(c[depth].to_owned(), Arc::new(node));
        anc.gen = g;
        *self.owners.entry(owner(&perms)).or_default() += new_nodes;
        Ok(perms)
    }

    /// xenstore.txt "RM": removes the node and its subtree; a missing node is fine if its
    /// parent exists. Removing the root is `EINVAL`.
    pub fn rm(&mut self, path: &str, actor: Actor, gen: &mut u64) -> Result<Vec<Event>, Errno> {
        let c = components(path);
        let (n, depth) = self.walk(&c);
        if rights(&n.perms, actor) & WRITE == 0 {
            return Err(Errno::EACCES);
        }
        if depth < c.len() {
            return if depth + 1 == c.len() {
                Ok(Vec::new())
            } else {
                Err(Errno::ENOENT)
            };
        }
        let Some((last, parent)) = c.split_last() else {
            return Err(Errno::EINVAL);
        };
        let mut events = vec![Event::new(path, n.perms.clone())];
        let mut removed: HashMap<DomId, usize> = HashMap::new();
        let mut stack: Vec<(String, &Node)> = vec![(path.to_owned(), n)];
        while let Some((p, node)) = stack.pop() {
            *removed.entry(owner(&node.perms)).or_default() += 1;
            for (name, child) in &node.children {
                let cp = child_path(&p, name);
                events.push(Event {
                    path: cp.clone(),
                    exact: true,
                    perms: child.perms.clone(),
                    old_perms: None,
                });
                stack.push((cp, child));
            }
        }
        for (dom, k) in removed {
            let left = self.owned_by(dom).saturating_sub(k);
            if left == 0 {
                self.owners.remove(&dom);
            } else {
                self.owners.insert(dom, left);
            }
        }
        let g = bump(gen);
        let p = self.node_mut(parent).ok_or(Errno::EIO)?;
        p.children.remove(*last);
        p.gen = g;
        Ok(events)
    }

    /// xenstore.txt "SET_PERMS": needs write access and ownership; an unprivileged domain may
    /// not give the node away.
    pub fn set_perms(
        &mut self,
        path: &str,
        perms: &[Perm],
        actor: Actor,
        lim: &Limits,
        gen: &mut u64,
    ) -> Result<Vec<Event>, Errno> {
        if perms.is_empty() {
            return Err(Errno::EINVAL);
        }
        if actor.dom != 0 && perms.len() > lim.max_perms_per_node {
            return Err(Errno::ENOSPC);
        }
        let c = components(path);
        let (n, depth) = self.walk(&c);
        let r = rights(&n.perms, actor);
        if depth < c.len() {
            return Err(if r & WRITE == 0 {
                Errno::EACCES
            } else {
                Errno::ENOENT
            });
        }
        if r & (WRITE | OWNER) != WRITE | OWNER {
            return Err(Errno::EACCES);
        }
        let (old_owner, new_owner) = (owner(&n.perms), owner(perms));
        if actor.dom != 0 && old_owner != new_owner {
            return Err(Errno::EPERM);
        }
        let old = n.perms.clone();
        let new: Perms = perms.into();
        let g = bump(gen);
        let node = self.node_mut(&c).ok_or(Errno::EIO)?;
        node.perms = new.clone();
        node.gen = g;
        if old_owner != new_owner {
            let left = self.owned_by(old_owner).saturating_sub(1);
            if left == 0 {
                self.owners.remove(&old_owner);
            } else {
                self.owners.insert(old_owner, left);
            }
            *self.owners.entry(new_owner).or_default() += 1;
        }
        Ok(vec![Event {
            path: path.to_owned(),
            exact: false,
            perms: new,
            old_perms: Some(old),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM0: Actor = Actor {
        dom: 0,
        target: None,
    };
    const LIM: Limits = Limits {
        max_nodes_per_domain: 10,
        max_value_size: 16,
        max_perms_per_node: 3,
    };

    fn dom(d: DomId) -> Actor {
        Actor {
            dom: d,
            target: None,
        }
    }

    #[test]
    fn write_creates_parents_and_counts_owners() {
        let mut g = 0;
        let mut t = Tree::new(&mut g);
        t.write("/a/b/c", b"x".to_vec(), DOM0, &LIM, &mut g)
            .unwrap();
        assert_eq!(t.get("/a/b/c").unwrap().value, b"x");
        assert_eq!(t.get("/a/b").unwrap().value, b"");
        assert_eq!(t.owned_by(0), 4);
        t.rm("/a", DOM0, &mut g).unwrap();
        assert!(t.get("/a").is_none());
        assert_eq!(t.owned_by(0), 1);
    }

    #[test]
    fn snapshots_are_isolated() {
        let mut g = 0;
        let mut t = Tree::new(&mut g);
        t.write("/a/b", b"1".to_vec(), DOM0, &LIM, &mut g).unwrap();
        let snap = t.clone();
        t.write("/a/b", b"2".to_vec(), DOM0, &LIM, &mut g).unwrap();
        t.rm("/a", DOM0, &mut g).unwrap();
        assert_eq!(snap.get("/a/b").unwrap().value, b"1");
        assert!(t.get("/a/b").is_none());
    }

    #[test]
    fn domain_permissions_and_quota() {
        let mut g = 0;
        let mut t = Tree::new(&mut g);
        t.mkdir("/local/domain/5", DOM0, &LIM, &mut g).unwrap();
        assert_eq!(
            t.write("/local/domain/5/x", vec![], dom(5), &LIM, &mut g)
                .unwrap_err(),
            Errno::EACCES
        );
        assert_eq!(
            t.lookup("/local/domain/5/x", dom(5), READ).err(),
            Some(Errno::EACCES)
        );
        t.set_perms(
            "/local/domain/5",
            &[Perm::new(Access::None, 5)],
            DOM0,
            &LIM,
            &mut g,
        )
        .unwrap();
        t.write("/local/domain/5/x", vec![1], dom(5), &LIM, &mut g)
            .unwrap();
        assert_eq!(owner(&t.get("/local/domain/5/x").unwrap().perms), 5);
        assert_eq!(
            t.write("/local/domain/5/y", vec![0; 17], dom(5), &LIM, &mut g)
                .unwrap_err(),
            Errno::ENOSPC
        );
        // 2 owned so far; 9 more components exceed the quota of 10.
        let deep = "/local/domain/5/a/b/c/d/e/f/g/h/i";
        assert_eq!(
            t.write(deep, vec![], dom(5), &LIM, &mut g).unwrap_err(),
            Errno::ENOSPC
        );
        assert_eq!(
            t.set_perms(
                "/local/domain/5",
                &[Perm::new(Access::None, 6)],
                dom(5),
                &LIM,
                &mut g
            )
            .unwrap_err(),
            Errno::EPERM
        );
        assert_eq!(
            t.lookup("/local/domain/5/nope", dom(5), READ).err(),
            Some(Errno::ENOENT)
        );
        assert_eq!(
            t.lookup("/local/domain/6", dom(5), READ).err(),
            Some(Errno::EACCES)
        );
    }

    #[test]
    fn deep_trees_drop_without_recursion() {
        let mut g = 0;
        let mut t = Tree::new(&mut g);
        let deep: String = "/a".repeat(1500);
        t.write(&deep, vec![], DOM0, &LIM, &mut g).unwrap();
        let _snap = t.clone();
        t.rm("/a", DOM0, &mut g).unwrap();
    }
}
