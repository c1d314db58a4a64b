//! Interoperability with the real xenstore tools (Debian's `xenstore-utils`, built on
//! libxenstore, which honours `XENSTORED_PATH`): they run against the in-process server.
//! Skipped, with a message, when the tools are not installed (scripts/setup installs them).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use xdisk_xen::xenstore::{Access, Client, Perm};
use xdisk_xensim::xenstored::Server;

fn have_tools() -> bool {
    let all = [
        "xenstore-read",
        "xenstore-write",
        "xenstore-ls",
        "xenstore-rm",
        "xenstore-chmod",
        "xenstore-exists",
        "xenstore-list",
        "xenstore-watch",
    ];
    let missing: Vec<&str> = all
        .iter()
        .copied()
        .filter(|t| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .collect();
    if !missing.is_empty() {
        println!(
            "SKIPPED: xenstore tools missing ({}); install xenstore-utils (scripts/setup)",
            missing.join(", ")
        );
        return false;
    }
    true
}

fn tool(sock: &Path, name: &str, args: &[&str]) -> Output {
    let out = Command::new(name)
        .args(args)
        .env("XENSTORED_PATH", sock)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    println!(
        "$ {name} {} -> {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(sock: &Path, name: &str, args: &[&str]) -> String {
    let out = tool(sock, name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn start() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind(dir.path().join("socket")).unwrap();
    (dir, server)
}

#[test]
fn xenstore_tools_read_write_ls_rm() {
    if !have_tools() {
        return;
    }
    let (dir, server) = start();
    let sock = dir.path().join("socket");

    ok(&sock, "xenstore-write", &["/a/b", "hello"]);
    assert_eq!(server.read_node("/a/b").as_deref(), Some(&b"hello"[..]));
    assert_eq!(ok(&sock, "xenstore-read", &["/a/b"]), "hello\n");

    ok(
        &sock,
        "xenstore-write",
        &["/a/c", "world", "/a/d/e", "deep"],
    );
    let ls = ok(&sock, "xenstore-ls", &["/a"]);
    assert!(ls.contains("b = \"hello\""), "{ls}");
    assert!(ls.contains("c = \"world\""), "{ls}");
    assert!(ls.contains("d = \"\""), "{ls}");
    assert!(ls.contains(" e = \"deep\""), "{ls}");
    let list = ok(&sock, "xenstore-list", &["/a"]);
    assert_eq!(list, "b\nc\nd\n");

    assert!(tool(&sock, "xenstore-exists", &["/a/b"]).status.success());
    ok(&sock, "xenstore-rm", &["/a/b"]);
    assert!(!tool(&sock, "xenstore-exists", &["/a/b"]).status.success());
    assert!(!tool(&sock, "xenstore-read", &["/a/b"]).status.success());
    assert_eq!(server.read_node("/a/b"), None);

    // Our client sees what the tools wrote.
    let c = Client::connect_unix(&sock).unwrap();
    assert_eq!(c.read_string("/a/c").unwrap(), "world");
    assert_eq!(c.directory("/a").unwrap(), vec!["c", "d"]);
}

#[test]
fn xenstore_tools_chmod_and_perms() {
    if !have_tools() {
        return;
    }
    let (dir, server) = start();
    let sock = dir.path().join("socket");
    ok(&sock, "xenstore-write", &["/vm/x", "secret"]);
    ok(&sock, "xenstore-chmod", &["/vm/x", "n0", "r5"]);
    let c = Client::connect_unix(&sock).unwrap();
    assert_eq!(
        c.get_perms("/vm/x").unwrap(),
        vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 5)]
    );
    let ls = ok(&sock, "xenstore-ls", &["-p", "/vm"]);
    assert!(ls.contains("n0,r5"), "{ls}");

    // The permissions set by the tool are enforced for domain 5 and domain 6.
    let d5 = server.client_as(5).unwrap();
    assert_eq!(d5.read_string("/vm/x").unwrap(), "secret");
    assert!(d5.write("/vm/x", "no").is_err());
    let d6 = server.client_as(6).unwrap();
    assert!(d6.read("/vm/x").is_err());

    // Recursive chmod.
    ok(&sock, "xenstore-write", &["/vm/y/z", "1"]);
    ok(&sock, "xenstore-chmod", &["-r", "/vm", "b7"]);
    assert_eq!(
        c.get_perms("/vm/y/z").unwrap(),
        vec![Perm::new(Access::Both, 7)]
    );
}

#[test]
fn xenstore_tools_watch() {
    if !have_tools() {
        return;
    }
    let (dir, server) = start();
    let sock = dir.path().join("socket");
    ok(&sock, "xenstore-write", &["/w", ""]);
    // Two events: the initial one, then our write below /w.
    let mut child = Command::new("xenstore-watch")
        .args(["-n", "2", "/w"])
        .env("XENSTORED_PATH", &sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = Client::connect_unix(&sock).unwrap();
    // Wait until the tool's watch is registered, then write below it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.watch_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "xenstore-watch never set its watch"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c.write("/w/k", "v").unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "xenstore-watch did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!(
        "xenstore-watch: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, vec!["/w", "/w/k"]);
}

#[test]
fn xenstore_tools_list_long_directory() {
    if !have_tools() {
        return;
    }
    let (dir, _server) = start();
    let sock = dir.path().join("socket");
    // ~16 KiB of names: DIRECTORY answers E2BIG and libxenstore falls back to DIRECTORY_PART.
    let c = Client::connect_unix(&sock).unwrap();
    let names: Vec<String> = (0..500)
        .map(|i| format!("a-rather-long-child-name-{i:04}"))
        .collect();
    c.transaction(|tx| {
        for n in &names {
            tx.write(&format!("/big/{n}"), "")?;
        }
        Ok(())
    })
    .unwrap();
    let list = ok(&sock, "xenstore-list", &["/big"]);
    let got: Vec<&str> = list.lines().collect();
    assert_eq!(got, names);
    assert_eq!(c.directory("/big").unwrap(), names);
}

#[test]
fn xenstore_tools_errors() {
    if !have_tools() {
        return;
    }
    let (dir, _server) = start();
    let sock = dir.path().join("socket");
    assert!(!tool(&sock, "xenstore-read", &["/missing"]).status.success());
    assert!(!tool(&sock, "xenstore-write", &["/bad path", "x"])
        .status
        .success());
    assert!(!tool(&sock, "xenstore-rm", &["/no/such/parent"])
        .status
        .success());
    // Removing a missing node whose parent exists is fine.
    ok(&sock, "xenstore-write", &["/p", ""]);
    ok(&sock, "xenstore-rm", &["/p/missing"]);
}
