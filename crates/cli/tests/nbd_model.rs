//! A model-based property test of `xdisk nbd` driven by xdisk's own NBD client: random
//! sequences of reads, writes, zero writes, trims and flushes over 1 to 4 connections to one
//! export (raw or qcow2), each checked against an in-memory model as it completes. A write
//! completed on one connection must be seen by a read on any other (every connection shares
//! one image and its caches). At the end a flush on a random connection and a SIGKILL of the
//! server: the image on disk must equal the model (qemu-img reading it) and qcow2 must pass
//! `qemu-img check`.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use xdisk_io::Storage;
use xdisk_nbd_client::{ClientConfig, NbdStorage};

const SIZE: u64 = 8 << 20;
const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    Write {
        conn: usize,
        sector: u64,
        sectors: u64,
        byte: u8,
    },
    Read {
        conn: usize,
        sector: u64,
        sectors: u64,
    },
    Zero {
        conn: usize,
        sector: u64,
        sectors: u64,
    },
    Trim {
        conn: usize,
        sector: u64,
        sectors: u64,
    },
    Flush {
        conn: usize,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    // Mostly small, sometimes spanning clusters and L2 tables.
    let total = SIZE / SECTOR;
    prop_oneof![
        3 => (0..total, 1u64..=16),
        1 => (0..total, 1u64..=2048),
    ]
    .prop_map(move |(s, n)| (s, n.min(total - s)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, range(), any::<u8>()).prop_map(|(conn, (sector, sectors), byte)| Op::Write { conn, sector, sectors, byte }),
        4 => (0..4usize, range()).prop_map(|(conn, (sector, sectors))| Op::Read { conn, sector, sectors }),
        1 => (0..4usize, range()).prop_map(|(conn, (sector, sectors))| Op::Zero { conn, sector, sectors }),
        1 => (0..4usize, range()).prop_map(|(conn, (sector, sectors))| Op::Trim { conn, sector, sectors }),
        1 => (0..4usize).prop_map(|conn| Op::Flush { conn }),
    ]
}

/// The model: per sector, its byte (sectors are written whole), or `None` after a trim
/// (contents unspecified until written again).
struct Model(Vec<Option<u8>>);

impl Model {
    fn set(&mut self, sector: u64, sectors: u64, v: Option<u8>) {
        for s in &mut self.0[sector as usize..(sector + sectors) as usize] {
            *s = v;
        }
    }
    fn check(&self, sector: u64, data: &[u8], what: &str) {
        for (i, chunk) in data.chunks(SECTOR as usize).enumerate() {
            let s = sector as usize + i;
            if let Some(b) = self.0[s] {
                assert!(
                    chunk.iter().all(|&x| x == b),
                    "{what}: sector {s} should hold {b:#x}, holds {:#x}..",
                    chunk[0]
                );
            }
        }
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ok(cmd: &mut Command) -> Vec<u8> {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

fn start(dir: &Path, img: &Path, format: &str) -> (Server, String) {
    let sock = dir.join("nbd.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_xdisk"))
        .args([
            "nbd",
            "-t",
            "-e",
            "4",
            "--discard",
            "unmap",
            "-x",
            "m",
            "-f",
            format,
        ])
        .arg("-k")
        .arg(&sock)
        .arg(img)
        .spawn()
        .unwrap();
    let mut srv = Server(child);
    let t = Instant::now();
    while !sock.exists() {
        assert!(srv.0.try_wait().unwrap().is_none(), "xdisk nbd exited");
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    (srv, format!("nbd+unix:///m?socket={}", sock.display()))
}

fn run_case(qcow2: bool, conns: usize, ops: &[Op], flush_conn: usize) {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-nbd-model-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let format = if qcow2 { "qcow2" } else { "raw" };
    let img = dir.path().join(format!("disk.{format}"));
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&img)
        .arg(SIZE.to_string()));
    let (mut srv, uri) = start(dir.path(), &img, format);
    let cfg = ClientConfig {
        reconnect_attempts: 0,
        ..ClientConfig::default()
    };
    let c: Vec<NbdStorage> = (0..conns)
        .map(|_| NbdStorage::open_uri(&uri, &cfg).unwrap())
        .collect();
    let mut model = Model(vec![Some(0); (SIZE / SECTOR) as usize]);
    for (i, op) in ops.iter().enumerate() {
        let what = format!("op {i} {op:?}");
        match *op {
            Op::Write {
                conn,
                sector,
                sectors,
                byte,
            } => {
                let buf = vec![byte; (sectors * SECTOR) as usize];
                c[conn % conns].write_at(&buf, sector * SECTOR).unwrap();
                model.set(sector, sectors, Some(byte));
            }
            Op::Read {
                conn,
                sector,
                sectors,
            } => {
                let mut buf = vec![0xa5; (sectors * SECTOR) as usize];
                c[conn % conns].read_at(&mut buf, sector * SECTOR).unwrap();
                model.check(sector, &buf, &what);
            }
            Op::Zero {
                conn,
                sector,
                sectors,
            } => {
                c[conn % conns]
                    .write_zeroes(sector * SECTOR, sectors * SECTOR)
                    .unwrap();
                model.set(sector, sectors, Some(0));
            }
            Op::Trim {
                conn,
                sector,
                sectors,
            } => {
                c[conn % conns]
                    .discard(sector * SECTOR, sectors * SECTOR)
                    .unwrap();
                model.set(sector, sectors, None);
            }
            Op::Flush { conn } => c[conn % conns].flush().unwrap(),
        }
    }
    // Durable after a flush on any one connection, whatever connection wrote.
    c[flush_conn % conns].flush().unwrap();
    srv.0.kill().unwrap();
    srv.0.wait().unwrap();
    drop(c);
    if qcow2 {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&img)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("ERROR") && !text.contains("corrupt"),
            "qemu-img check: {text}"
        );
    }
    let flat = dir.path().join("flat.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(&img)
        .arg(&flat));
    let data = std::fs::read(&flat).unwrap();
    assert_eq!(data.len() as u64, SIZE);
    model.check(0, &data, "the image after SIGKILL");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 40, ..ProptestConfig::default() })]

    #[test]
    fn nbd_export_matches_a_model_over_several_connections(
        qcow2 in any::<bool>(),
        conns in 1usize..=4,
        ops in prop::collection::vec(op(), 1..80),
        flush_conn in 0usize..4,
    ) {
        run_case(qcow2, conns, &ops, flush_conn);
    }
}
