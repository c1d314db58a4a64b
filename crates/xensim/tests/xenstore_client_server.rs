//! Client <-> in-process server: every operation, permissions, transactions, watches,
//! concurrency.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use xdisk_xen::xenstore::{Access, Client, Errno, Error, Perm, WatchEvent};
use xdisk_xensim::xenstored::{Config, Server};

const T: Duration = Duration::from_secs(10);

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(dir.path().join("xs.sock")).unwrap();
    (dir, server)
}

fn errno<T: std::fmt::Debug>(r: Result<T, Error>) -> Errno {
    match r {
        Err(Error::Xs(e)) => e,
        other => panic!("expected an xenstore error, got {other:?}"),
    }
}

fn p(access: Access, domid: u16) -> Perm {
    Perm::new(access, domid)
}

/// Waits for the next event, skipping nothing.
fn next(w: &xdisk_xen::xenstore::Watch) -> WatchEvent {
    w.recv_timeout(T).expect("watch event")
}

fn no_event(w: &xdisk_xen::xenstore::Watch) {
    if let Ok(ev) = w.recv_timeout(Duration::from_millis(100)) {
        panic!("unexpected watch event {ev:?}");
    }
}

#[test]
fn read_write_mkdir_rm_directory() {
    let (dir, _s) = server();
    let c = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    assert!(c.is_connected());

    c.write("/a/b/c", "v1").unwrap();
    assert_eq!(c.read("/a/b/c").unwrap(), b"v1");
    assert_eq!(
        c.read("/a/b").unwrap(),
        b"",
        "WRITE creates missing parents with empty values"
    );
    c.write("/a/b/c", b"bin\0ary").unwrap();
    assert_eq!(c.read("/a/b/c").unwrap(), b"bin\0ary");
    c.write("/a/empty", "").unwrap();
    assert_eq!(c.read("/a/empty").unwrap(), b"");

    c.mkdir("/a/b").unwrap();
    assert_eq!(c.read("/a/b").unwrap(), b"", "MKDIR keeps existing values");
    c.write("/a/b", "kept").unwrap();
    c.mkdir("/a/b").unwrap();
    assert_eq!(c.read_string("/a/b").unwrap(), "kept");
    c.mkdir("/m/n/o").unwrap();
    assert!(c.exists("/m/n").unwrap());

    let mut d = c.directory("/a").unwrap();
    d.sort();
    assert_eq!(d, vec!["b", "empty"]);
    assert_eq!(c.directory("/a/b/c").unwrap(), Vec::<String>::new());
    assert!(c.directory("/").unwrap().contains(&"a".to_string()));

    c.rm("/a/b").unwrap();
    assert_eq!(errno(c.read("/a/b/c")), Errno::ENOENT);
    assert!(!c.exists("/a/b").unwrap());
    c.rm("/a/b").unwrap(); // missing, parent exists: fine
    assert_eq!(errno(c.rm("/x/y/z")), Errno::ENOENT);
    assert_eq!(errno(c.rm("/")), Errno::EINVAL);

    // Path syntax.
    for bad in ["", "/a/", "//a", "/a b", "/a.b", "/é"] {
        assert_eq!(errno(c.write(bad, "x")), Errno::EINVAL, "{bad:?}");
        assert_eq!(errno(c.read(bad)), Errno::EINVAL, "{bad:?}");
    }
    let too_long = format!("/{}", "a".repeat(3072));
    assert_eq!(errno(c.write(&too_long, "")), Errno::EINVAL);
    // A request that cannot fit in one message is refused before it is sent.
    assert!(matches!(
        c.write("/big", vec![b'x'; 5000]),
        Err(Error::InvalidArgument(_))
    ));
    // dom0 may write up to what fits in a message.
    c.write("/big", vec![b'x'; 4090]).unwrap();
    assert_eq!(c.read("/big").unwrap().len(), 4090);
    assert!(c.is_connected());
}

#[test]
fn perms_domain_path_and_domain_management() {
    let (dir, s) = server();
    let c = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    assert_eq!(c.get_perms("/").unwrap(), vec![p(Access::None, 0)]);
    c.write("/n", "x").unwrap();
    c.set_perms(
        "/n",
        &[p(Access::Read, 3), p(Access::Both, 4), p(Access::Write, 5)],
    )
    .unwrap();
    assert_eq!(
        c.get_perms("/n").unwrap(),
        vec![p(Access::Read, 3), p(Access::Both, 4), p(Access::Write, 5)]
    );
    c.write("/n/child", "").unwrap();
    assert_eq!(
        c.get_perms("/n/child").unwrap()[0],
        p(Access::Read, 3),
        "children inherit permissions"
    );
    assert_eq!(
        errno(c.set_perms("/missing", &[p(Access::None, 0)])),
        Errno::ENOENT
    );
    assert!(matches!(
        c.set_perms("/n", &[]),
        Err(Error::InvalidArgument(_))
    ));

    assert_eq!(c.get_domain_path(7).unwrap(), "/local/domain/7");
    assert_eq!(c.get_domain_path(0).unwrap(), "/local/domain/0");

    assert!(c.is_domain_introduced(0).unwrap());
    assert!(!c.is_domain_introduced(9).unwrap());
    let intro = c.watch("@introduceDomain", "intro").unwrap();
    let rel = c.watch("@releaseDomain", "rel").unwrap();
    assert_eq!(next(&intro).path, "@introduceDomain");
    assert_eq!(next(&rel).path, "@releaseDomain");
    c.introduce(9, 0x1234, 5).unwrap();
    assert!(c.is_domain_introduced(9).unwrap());
    assert_eq!(
        next(&intro),
        WatchEvent {
            path: "@introduceDomain".into(),
            token: "intro".into()
        }
    );
    c.resume(9).unwrap();
    assert_eq!(errno(c.resume(10)), Errno::ENOENT);
    c.release(9).unwrap();
    assert_eq!(
        next(&rel),
        WatchEvent {
            path: "@releaseDomain".into(),
            token: "rel".into()
        }
    );
    assert!(!c.is_domain_introduced(9).unwrap());
    assert_eq!(errno(c.release(9)), Errno::ENOENT);
    assert_eq!(errno(c.introduce(0, 1, 1)), Errno::EINVAL);
    // The in-process API does the same.
    s.introduce_domain(11).unwrap();
    assert_eq!(next(&intro).path, "@introduceDomain");
    assert!(c.is_domain_introduced(11).unwrap());

    let help = c.control(&["help"]).unwrap();
    assert!(String::from_utf8_lossy(&help).contains("print"));
    c.control(&["print", "hello from the test"]).unwrap();
    assert_eq!(errno(c.control(&["no-such-command"])), Errno::EINVAL);
    c.set_target(12, 11).unwrap();

    // Watch tokens are per-client unique.
    assert!(matches!(
        c.watch("/x", "intro"),
        Err(Error::DuplicateToken(_))
    ));
    c.reset_watches().unwrap();
    assert_eq!(s.watch_count(), 0);
}

#[test]
fn long_directories_use_directory_part() {
    let (dir, _s) = server();
    let c = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    let names: Vec<String> = (0..700)
        .map(|i| format!("entry-with-a-long-name-{i:05}"))
        .collect();
    c.transaction(|tx| {
        for n in &names {
            tx.mkdir(&format!("/dir/{n}"))?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(c.directory("/dir").unwrap(), names);
    // And inside a transaction.
    let tx = c.transaction_start().unwrap();
    assert_eq!(tx.directory("/dir").unwrap().len(), 700);
    tx.abort().unwrap();
}

#[test]
fn domain_permissions() {
    let (_dir, s) = server();
    let dom0 = s.client_as(0).unwrap();
    let d5 = s.client_as(5).unwrap();
    let d6 = s.client_as(6).unwrap();

    dom0.write("/secret", "dom0 only").unwrap();
    assert_eq!(errno(d5.read("/secret")), Errno::EACCES);
    assert_eq!(errno(d5.write("/secret", "x")), Errno::EACCES);
    assert_eq!(errno(d5.get_perms("/secret")), Errno::EACCES);
    assert_eq!(
        errno(d5.read("/secret/missing")),
        Errno::EACCES,
        "no ENOENT leak below an unreadable node"
    );
    assert_eq!(
        errno(d5.write("/newtop", "x")),
        Errno::EACCES,
        "may not create under /"
    );
    assert_eq!(errno(d5.mkdir("/secret/x")), Errno::EACCES);
    assert_eq!(errno(d5.rm("/secret")), Errno::EACCES);

    dom0.set_perms("/secret", &[p(Access::None, 0), p(Access::Read, 5)])
        .unwrap();
    assert_eq!(d5.read_string("/secret").unwrap(), "dom0 only");
    assert_eq!(errno(d5.write("/secret", "x")), Errno::EACCES);
    assert_eq!(errno(d6.read("/secret")), Errno::EACCES);
    assert_eq!(
        errno(d5.set_perms("/secret", &[p(Access::Both, 5)])),
        Errno::EACCES,
        "not the owner"
    );

    // dom0 gives domain 5 its home.
    dom0.mkdir("/local/domain/5").unwrap();
    assert_eq!(errno(d5.write("/local/domain/5/x", "1")), Errno::EACCES);
    dom0.set_perms("/local/domain/5", &[p(Access::None, 5)])
        .unwrap();
    d5.write("/local/domain/5/device/vbd/768/state", "1")
        .unwrap();
    d5.write("name", "relative").unwrap(); // relative to /local/domain/5
    assert_eq!(
        dom0.read_string("/local/domain/5/name").unwrap(),
        "relative"
    );
    assert_eq!(d5.read_string("name").unwrap(), "relative");
    let perms = dom0
        .get_perms("/local/domain/5/device/vbd/768/state")
        .unwrap();
    assert_eq!(
        perms,
        vec![p(Access::None, 5)],
        "new nodes: parent's perms, owner = creator"
    );
    assert_eq!(errno(d6.read("/local/domain/5/name")), Errno::EACCES);
    assert_eq!(
        errno(d6.read("name")),
        Errno::EACCES,
        "domain 6's home does not exist/readable"
    );

    // The owner may grant access but not give the node away.
    d5.set_perms(
        "/local/domain/5/name",
        &[p(Access::None, 5), p(Access::Read, 6)],
    )
    .unwrap();
    assert_eq!(d6.read_string("/local/domain/5/name").unwrap(), "relative");
    assert_eq!(
        errno(d5.set_perms("/local/domain/5/name", &[p(Access::None, 6)])),
        Errno::EPERM
    );
    // Write-only access.
    dom0.write("/wo", "").unwrap();
    dom0.set_perms("/wo", &[p(Access::None, 0), p(Access::Write, 6)])
        .unwrap();
    d6.write("/wo", "written").unwrap();
    assert_eq!(errno(d6.read("/wo")), Errno::EACCES);
    assert_eq!(dom0.read_string("/wo").unwrap(), "written");
    // Nodes a domain creates below a dom0 node it may write are its own.
    d6.write("/wo/mine", "x").unwrap();
    assert_eq!(
        dom0.get_perms("/wo/mine").unwrap(),
        vec![p(Access::None, 6), p(Access::Write, 6)]
    );
    assert_eq!(d6.read_string("/wo/mine").unwrap(), "x");

    // Privileged requests.
    assert_eq!(errno(d5.introduce(7, 1, 1)), Errno::EACCES);
    assert_eq!(errno(d5.release(7)), Errno::EACCES);
    assert_eq!(errno(d5.is_domain_introduced(7)), Errno::EACCES);
    assert_eq!(errno(d5.control(&["help"])), Errno::EACCES);
    assert_eq!(d5.get_domain_path(5).unwrap(), "/local/domain/5");

    // A target domain (device model) gets its target's rights.
    let d9 = s.client_as(9).unwrap();
    assert_eq!(errno(d9.read("/local/domain/5/name")), Errno::EACCES);
    dom0.set_target(9, 5).unwrap();
    assert_eq!(d9.read_string("/local/domain/5/name").unwrap(), "relative");
}

#[test]
fn domain_quotas() {
    let (_dir, s) = server_with(Config {
        max_nodes_per_domain: 20,
        max_value_size: 100,
        ..Config::default()
    });
    let dom0 = s.client_as(0).unwrap();
    let d5 = s.client_as(5).unwrap();
    dom0.mkdir("/local/domain/5").unwrap();
    dom0.set_perms("/local/domain/5", &[p(Access::None, 5)])
        .unwrap();
    assert_eq!(s.nodes_owned_by(5), 1);
    assert_eq!(errno(d5.write("v", vec![b'x'; 101])), Errno::ENOSPC);
    d5.write("v", vec![b'x'; 100]).unwrap();
    let mut created = 0;
    let err = loop {
        match d5.write(&format!("n{created}"), "") {
            Ok(()) => created += 1,
            Err(e) => break e,
        }
        assert!(created < 100);
    };
    assert_eq!(err.errno(), Some(Errno::ENOSPC));
    assert_eq!(s.nodes_owned_by(5), 20);
    assert_eq!(created, 18);
    // Removing frees quota.
    d5.rm("n0").unwrap();
    d5.write("again", "").unwrap();
    // Permission lists are bounded for domains.
    let many: Vec<Perm> = std::iter::once(p(Access::None, 5))
        .chain((1..10).map(|d| p(Access::Read, d)))
        .collect();
    assert_eq!(errno(d5.set_perms("v", &many)), Errno::ENOSPC);
    dom0.set_perms("/local/domain/5/v", &many).unwrap(); // dom0 is not limited
}

fn server_with(cfg: Config) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind_with_config(dir.path().join("xs.sock"), cfg).unwrap();
    (dir, server)
}

#[test]
fn transactions_conflict_and_retry() {
    let (_dir, s) = server();
    let c = s.client_as(0).unwrap();
    let other = s.client_as(0).unwrap();
    c.write("/counter", "0").unwrap();

    // Snapshot: the transaction does not see later outside writes, nor the outside its writes.
    let tx = c.transaction_start().unwrap();
    assert_ne!(tx.id(), 0);
    assert_eq!(tx.read_string("/counter").unwrap(), "0");
    other.write("/counter", "5").unwrap();
    assert_eq!(
        tx.read_string("/counter").unwrap(),
        "0",
        "transactions see a snapshot"
    );
    tx.write("/counter", "1").unwrap();
    tx.write("/txonly/a", "x").unwrap();
    assert_eq!(other.read_string("/counter").unwrap(), "5");
    assert!(!other.exists("/txonly").unwrap());
    assert_eq!(errno(tx.commit()), Errno::EAGAIN);
    assert_eq!(c.read_string("/counter").unwrap(), "5");
    assert!(
        !c.exists("/txonly").unwrap(),
        "a failed commit changes nothing"
    );

    // Without interference the commit applies everything at once.
    let tx = c.transaction_start().unwrap();
    tx.write("/counter", "6").unwrap();
    tx.mkdir("/txonly/b").unwrap();
    tx.rm("/txonly/b").unwrap();
    tx.write("/txonly/c", "y").unwrap();
    tx.set_perms("/txonly/c", &[p(Access::Read, 0)]).unwrap();
    assert_eq!(tx.directory("/txonly").unwrap(), vec!["c"]);
    assert_eq!(tx.get_perms("/txonly/c").unwrap(), vec![p(Access::Read, 0)]);
    tx.commit().unwrap();
    assert_eq!(c.read_string("/counter").unwrap(), "6");
    assert_eq!(c.read_string("/txonly/c").unwrap(), "y");

    // Writes to unrelated nodes do not conflict.
    let tx = c.transaction_start().unwrap();
    tx.read("/counter").unwrap();
    other.write("/unrelated", "z").unwrap();
    tx.commit().unwrap();

    // A node created meanwhile where the transaction saw none conflicts.
    let tx = c.transaction_start().unwrap();
    assert!(!tx.exists("/late").unwrap());
    other.write("/late", "1").unwrap();
    tx.write("/x", "1").unwrap();
    assert_eq!(errno(tx.commit()), Errno::EAGAIN);

    // Abort discards.
    let tx = c.transaction_start().unwrap();
    tx.write("/aborted", "1").unwrap();
    tx.abort().unwrap();
    assert!(!c.exists("/aborted").unwrap());
    // Dropping without commit aborts too.
    {
        let tx = c.transaction_start().unwrap();
        tx.write("/dropped", "1").unwrap();
    }
    assert!(!c.exists("/dropped").unwrap());

    // The helper retries on EAGAIN: interfere on the first attempt only.
    let mut attempts = 0;
    let v = c
        .transaction(|tx| {
            attempts += 1;
            let n: u32 = tx.read_string("/counter")?.parse().unwrap();
            if attempts == 1 {
                other.write("/counter", "100").unwrap();
            }
            tx.write("/counter", (n + 1).to_string())?;
            Ok(n + 1)
        })
        .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(v, 101);
    assert_eq!(c.read_string("/counter").unwrap(), "101");

    // Errors from the closure abort and are returned without retry.
    let mut attempts = 0;
    let r: Result<(), Error> = c.transaction(|tx| {
        attempts += 1;
        tx.write("/from-failed", "1")?;
        tx.read("/does/not/exist")?;
        Ok(())
    });
    assert_eq!(r.unwrap_err().errno(), Some(Errno::ENOENT));
    assert_eq!(attempts, 1);
    assert!(!c.exists("/from-failed").unwrap());

    // Retries are bounded.
    let r: Result<(), Error> = c.transaction(|tx| {
        tx.read("/counter")?;
        other.write("/counter", "0").unwrap();
        Ok(())
    });
    assert_eq!(r.unwrap_err().errno(), Some(Errno::EAGAIN));
}

#[test]
fn transaction_limits_and_bad_ids() {
    let (_dir, s) = server_with(Config {
        max_transactions_per_conn: 3,
        ..Config::default()
    });
    let c = s.client_as(0).unwrap();
    let t1 = c.transaction_start().unwrap();
    let _t2 = c.transaction_start().unwrap();
    let _t3 = c.transaction_start().unwrap();
    assert_eq!(errno(c.transaction_start()), Errno::ENOSPC);
    t1.commit().unwrap();
    let _t4 = c.transaction_start().unwrap();
}

#[test]
fn concurrent_increments_with_transactions() {
    let (_dir, s) = server();
    let s = Arc::new(s);
    let setup = s.client_as(0).unwrap();
    setup.write("/count", "0").unwrap();
    let threads = 6;
    let per = 15;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let s = s.clone();
            thread::spawn(move || {
                let c = s.client_as(0).unwrap();
                for _ in 0..per {
                    // Contention is high: retry whole transactions until done.
                    loop {
                        let r = c.transaction(|tx| {
                            let n: u32 = tx.read_string("/count")?.parse().unwrap();
                            tx.write("/count", (n + 1).to_string())
                        });
                        match r {
                            Ok(()) => break,
                            Err(Error::Xs(Errno::EAGAIN)) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        setup.read_string("/count").unwrap(),
        (threads * per).to_string()
    );
}

#[test]
fn watches_fire_for_descendants_with_token() {
    let (_dir, s) = server();
    let c = s.client_as(0).unwrap();
    let writer = s.client_as(0).unwrap();
    c.write("/backend/vbd", "").unwrap();
    let w = c.watch("/backend", "tok-1").unwrap();
    assert_eq!(
        next(&w),
        WatchEvent {
            path: "/backend".into(),
            token: "tok-1".into()
        },
        "initial event"
    );

    writer.write("/backend/vbd/5/768/state", "1").unwrap();
    assert_eq!(
        next(&w),
        WatchEvent {
            path: "/backend/vbd/5/768/state".into(),
            token: "tok-1".into()
        }
    );
    writer.write("/backend", "self").unwrap();
    assert_eq!(next(&w).path, "/backend");
    writer.mkdir("/backend/new").unwrap();
    assert_eq!(next(&w).path, "/backend/new");
    writer.mkdir("/backend/new").unwrap(); // exists already: no change, no event
    writer
        .set_perms("/backend/new", &[p(Access::Read, 0)])
        .unwrap();
    assert_eq!(next(&w).path, "/backend/new");
    writer.rm("/backend/vbd").unwrap();
    assert_eq!(next(&w).path, "/backend/vbd");
    writer.write("/backendX", "sibling").unwrap();
    writer.write("/other", "x").unwrap();
    no_event(&w);

    // Removing a parent fires watches set below it with their own path.
    writer.write("/dev/a/b", "").unwrap();
    let below = c.watch("/dev/a/b", "below").unwrap();
    assert_eq!(next(&below).path, "/dev/a/b");
    writer.rm("/dev").unwrap();
    assert_eq!(next(&below).path, "/dev/a/b");
    no_event(&w);

    // Watches on missing nodes fire when they appear.
    let later = c.watch("/not/yet", "later").unwrap();
    assert_eq!(next(&later).path, "/not/yet");
    writer.write("/not/yet/there", "1").unwrap();
    assert_eq!(next(&later).path, "/not/yet/there");

    // Transactions fire on commit only; aborted ones never.
    let tx = writer.transaction_start().unwrap();
    tx.write("/backend/in-tx", "1").unwrap();
    no_event(&w);
    tx.commit().unwrap();
    assert_eq!(next(&w).path, "/backend/in-tx");
    let tx = writer.transaction_start().unwrap();
    tx.write("/backend/aborted", "1").unwrap();
    tx.abort().unwrap();
    no_event(&w);

    // Unwatch stops events.
    w.unwatch().unwrap();
    writer.write("/backend/after", "1").unwrap();
    assert_eq!(errno(c.unwatch("/backend", "tok-1")), Errno::ENOENT);
    // Dropping a Watch unwatches too.
    drop(later);
    let deadline = Instant::now() + T;
    while s.watch_count() != 1 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn watches_share_a_channel_and_respect_permissions() {
    let (_dir, s) = server();
    let dom0 = s.client_as(0).unwrap();
    let d5 = s.client_as(5).unwrap();
    dom0.mkdir("/local/domain/5").unwrap();
    dom0.set_perms("/local/domain/5", &[p(Access::None, 5)])
        .unwrap();
    dom0.write("/local/domain/5/device/vbd/768/state", "1")
        .unwrap();
    dom0.set_perms("/local/domain/5/device", &[p(Access::None, 5)])
        .unwrap();

    let (tx, rx) = mpsc::channel();
    d5.watch_with_sender("device", "rel", tx.clone()).unwrap();
    d5.watch_with_sender("/local/domain/5/name", "abs", tx.clone())
        .unwrap();
    d5.watch_with_sender("/", "root", tx).unwrap();
    let mut initial: Vec<WatchEvent> = (0..3).map(|_| rx.recv_timeout(T).unwrap()).collect();
    initial.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(
        initial[0],
        WatchEvent {
            path: "/local/domain/5/name".into(),
            token: "abs".into()
        }
    );
    assert_eq!(
        initial[1],
        WatchEvent {
            path: "device".into(),
            token: "rel".into()
        }
    );
    assert_eq!(
        initial[2],
        WatchEvent {
            path: "/".into(),
            token: "root".into()
        }
    );

    // Relative watch: relative event paths. The root watch sees it too (readable node).
    dom0.write("/local/domain/5/device/vbd/768/state", "4")
        .unwrap();
    let mut evs: Vec<WatchEvent> = (0..2).map(|_| rx.recv_timeout(T).unwrap()).collect();
    evs.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(
        evs[0],
        WatchEvent {
            path: "device/vbd/768/state".into(),
            token: "rel".into()
        }
    );
    assert_eq!(
        evs[1],
        WatchEvent {
            path: "/local/domain/5/device/vbd/768/state".into(),
            token: "root".into()
        }
    );

    // Changes to nodes domain 5 cannot read are not reported to it.
    dom0.write("/secret", "x").unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    // The special watches are dom0's business (only the initial event arrives).
    let (stx, srx) = mpsc::channel();
    d5.watch_with_sender("@releaseDomain", "special", stx)
        .unwrap();
    assert_eq!(srx.recv_timeout(T).unwrap().path, "@releaseDomain");
    s.introduce_domain(8).unwrap();
    s.release_domain(8).unwrap();
    assert!(srx.recv_timeout(Duration::from_millis(100)).is_err());
    assert!(rx.recv_timeout(Duration::from_millis(10)).is_err());
}

#[test]
fn release_disconnects_the_domain() {
    let (_dir, s) = server();
    let d5 = s.client_as(5).unwrap();
    s.introduce_domain(5).unwrap();
    assert_eq!(d5.get_domain_path(5).unwrap(), "/local/domain/5");
    s.release_domain(5).unwrap();
    let deadline = Instant::now() + T;
    while d5.is_connected() {
        assert!(Instant::now() < deadline, "released domain still connected");
        thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(d5.read("/"), Err(Error::Disconnected(_))));
}

#[test]
fn many_concurrent_clients() {
    let (dir, s) = server();
    let sock = dir.path().join("xs.sock");
    let watcher = s.client_as(0).unwrap();
    let (etx, erx) = mpsc::channel();
    watcher.watch_with_sender("/conc", "all", etx).unwrap();
    assert_eq!(erx.recv_timeout(T).unwrap().path, "/conc");

    let clients = 16;
    let ops = 40;
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let sock = sock.clone();
            thread::spawn(move || {
                let c = Client::connect_unix(&sock).unwrap();
                for j in 0..ops {
                    let path = format!("/conc/c{i}/k{j}");
                    c.write(&path, format!("{i}-{j}")).unwrap();
                    assert_eq!(c.read_string(&path).unwrap(), format!("{i}-{j}"));
                }
                assert_eq!(c.directory(&format!("/conc/c{i}")).unwrap().len(), ops);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // One client shared by many threads: replies are matched by req_id.
    let shared = Arc::new(Client::connect_unix(&sock).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let c = shared.clone();
            thread::spawn(move || {
                for j in 0..50 {
                    let path = format!("/conc/shared/t{i}");
                    c.write(&path, j.to_string()).unwrap();
                    assert_eq!(c.read_string(&path).unwrap(), j.to_string());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Every write fired the watch: 16*40 + 8*50 events.
    let mut n = 0;
    while n < clients * ops + 8 * 50 {
        erx.recv_timeout(T).unwrap();
        n += 1;
    }
    assert!(erx.recv_timeout(Duration::from_millis(100)).is_err());
    assert_eq!(s.read_node("/conc/c3/k7").as_deref(), Some(&b"3-7"[..]));
}

#[test]
fn client_times_out_and_notices_disconnects() {
    // A "daemon" that never answers.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let c = Client::from_stream(ours).unwrap();
    c.set_timeout(Duration::from_millis(100));
    assert_eq!(c.timeout(), Duration::from_millis(100));
    let t0 = Instant::now();
    assert!(matches!(c.read("/x"), Err(Error::Timeout(_))));
    assert!(t0.elapsed() >= Duration::from_millis(100));
    drop(theirs);
    let deadline = Instant::now() + T;
    while c.is_connected() {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
    assert!(matches!(c.read("/x"), Err(Error::Disconnected(_))));

    // The server going away wakes waiters and ends watches.
    let (_dir, s) = server();
    let c = s.client_as(0).unwrap();
    let w = c.watch("/x", "t").unwrap();
    next(&w);
    drop(s);
    assert!(matches!(w.recv_timeout(T), Err(Error::Disconnected(_))));
    assert!(matches!(c.read("/x"), Err(Error::Disconnected(_))));
}

#[test]
fn open_honours_xenstored_path() {
    let (dir, _s) = server();
    // Only this test in this binary touches XENSTORED_PATH.
    std::env::set_var("XENSTORED_PATH", dir.path().join("xs.sock"));
    let c = Client::open().unwrap();
    std::env::remove_var("XENSTORED_PATH");
    c.write("/opened", "yes").unwrap();
    assert_eq!(c.read_string("/opened").unwrap(), "yes");
}

/// The shape of a PV block device handshake, as the backend tests will use it: the toolstack
/// (dom0) lays out both directories with the usual permissions, the frontend (domain 5) and
/// the backend (dom0) each watch the other's `state`.
#[test]
fn xenbus_handshake_simulation() {
    let (_dir, s) = server();
    let toolstack = s.client_as(0).unwrap();
    let backend = s.client_as(0).unwrap();
    let frontend = s.client_as(5).unwrap();
    let fe = "/local/domain/5/device/vbd/768";
    let be = "/local/domain/0/backend/vbd/5/768";
    toolstack
        .transaction(|tx| {
            tx.mkdir("/local/domain/5")?;
            tx.set_perms("/local/domain/5", &[p(Access::None, 5)])?;
            tx.write(&format!("{fe}/backend"), be)?;
            tx.write(&format!("{fe}/backend-id"), "0")?;
            tx.write(&format!("{fe}/state"), "1")?;
            tx.set_perms(fe, &[p(Access::None, 5), p(Access::Read, 0)])?;
            tx.write(&format!("{be}/frontend"), fe)?;
            tx.write(&format!("{be}/frontend-id"), "5")?;
            tx.write(&format!("{be}/state"), "1")?;
            for n in ["", "/frontend", "/frontend-id", "/state"] {
                tx.set_perms(
                    &format!("{be}{n}"),
                    &[p(Access::None, 0), p(Access::Read, 5)],
                )?;
            }
            Ok(())
        })
        .unwrap();
    s.introduce_domain(5).unwrap();

    let be_watch = backend.watch(&format!("{fe}/state"), "fe-state").unwrap();
    let fe_watch = frontend.watch(&format!("{be}/state"), "be-state").unwrap();
    assert_eq!(next(&be_watch).path, format!("{fe}/state"));
    assert_eq!(next(&fe_watch).path, format!("{be}/state"));

    // Backend: InitWait (2) with its features.
    backend
        .transaction(|tx| {
            tx.write(&format!("{be}/feature-flush-cache"), "1")?;
            tx.write(&format!("{be}/state"), "2")
        })
        .unwrap();
    assert_eq!(next(&fe_watch).path, format!("{be}/state"));
    assert_eq!(frontend.read_string(&format!("{be}/state")).unwrap(), "2");
    assert_eq!(
        frontend
            .read_string(&format!("{be}/feature-flush-cache"))
            .unwrap(),
        "1"
    );
    assert_eq!(
        errno(frontend.write(&format!("{be}/state"), "6")),
        Errno::EACCES
    );

    // Frontend: ring details, then Initialised (3) - using relative paths, as guests do.
    frontend
        .transaction(|tx| {
            tx.write("device/vbd/768/ring-ref", "8")?;
            tx.write("device/vbd/768/event-channel", "12")?;
            tx.write("device/vbd/768/state", "3")
        })
        .unwrap();
    assert_eq!(next(&be_watch).path, format!("{fe}/state"));
    assert_eq!(backend.read_string(&format!("{fe}/ring-ref")).unwrap(), "8");
    assert_eq!(
        toolstack.get_perms(&format!("{fe}/ring-ref")).unwrap(),
        vec![p(Access::None, 5), p(Access::Read, 0)]
    );

    backend.write(&format!("{be}/state"), "4").unwrap();
    assert_eq!(next(&fe_watch).path, format!("{be}/state"));
    frontend.write("device/vbd/768/state", "4").unwrap();
    assert_eq!(next(&be_watch).path, format!("{fe}/state"));
    assert_eq!(backend.read_string(&format!("{fe}/state")).unwrap(), "4");

    // Teardown: the toolstack removes the frontend directory; the backend's watch fires.
    toolstack.rm("/local/domain/5/device").unwrap();
    assert_eq!(next(&be_watch).path, format!("{fe}/state"));
    s.release_domain(5).unwrap();
}
