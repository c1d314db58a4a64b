//! Random request mixes through the rings, checked against an in-memory model of the disk:
//! reads, writes (direct and indirect), discards, flushes, barriers and invalid requests,
//! several in flight at once on several queues, on raw and qcow2, with each data path.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use xdisk_backend::DataPath;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::{Status, SECTOR_SIZE};

const DISK: u64 = 2 << 20;
const SECTORS: u64 = DISK / SECTOR_SIZE as u64;

#[derive(Debug, Clone)]
enum Step {
    Read {
        sector: u64,
        sectors: u32,
    },
    Write {
        sector: u64,
        sectors: u32,
        seed: u64,
    },
    /// Discard of `units` discard-granularity units at unit `at`.
    Discard {
        at: u64,
        units: u64,
    },
    Flush,
    Barrier {
        sector: u64,
        sectors: u32,
        seed: u64,
    },
    /// A request past the end of the disk (answered with an error).
    PastEnd {
        over: u64,
    },
    /// Wait for everything in flight.
    Sync,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..SECTORS, 1u32..=300).prop_map(|(sector, n)| Step::Read {
            sector: sector.min(SECTORS - u64::from(n)),
            sectors: n
        }),
        4 => (0..SECTORS, 1u32..=300, any::<u64>()).prop_map(|(sector, n, seed)| Step::Write {
            sector: sector.min(SECTORS - u64::from(n)),
            sectors: n,
            seed
        }),
        1 => (0u64..16, 1u64..4).prop_map(|(at, units)| Step::Discard { at, units }),
        1 => Just(Step::Flush),
        1 => (0..SECTORS - 16, 0u32..=16, any::<u64>()).prop_map(|(sector, sectors, seed)| {
            Step::Barrier { sector, sectors, seed }
        }),
        1 => (0u64..1000).prop_map(|over| Step::PastEnd { over }),
        1 => Just(Step::Sync),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Setup {
    qcow2: bool,
    path: DataPath,
    persistent: bool,
    queues: u32,
    first_sect: u8,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<bool>(),
        prop_oneof![Just(DataPath::Map), Just(DataPath::Copy)],
        any::<bool>(),
        prop_oneof![Just(1u32), Just(3)],
        0u8..8,
    )
        .prop_map(|(qcow2, path, persistent, queues, first_sect)| Setup {
            qcow2,
            path,
            persistent,
            queues,
            first_sect,
        })
}

/// What a submitted request expects.
enum Expect {
    Okay,
    Data(u64, usize),
    Error,
}

fn run(setup: Setup, steps: Vec<Step>) {
    let host = host();
    let disk = if setup.qcow2 {
        qcow2_disk(DISK)
    } else {
        raw_disk(DISK)
    };
    let image = open_image(&disk.path, false);
    let fe = FrontConfig {
        persistent: setup.persistent,
        max_queues: setup.queues,
        first_sect: setup.first_sect,
        max_ring_page_order: 1,
        ..FrontConfig::default()
    };
    let mut p = pair(
        &host,
        1,
        768,
        image.clone(),
        |c| {
            c.data_path = setup.path;
            c.max_queues = 4;
        },
        fe,
    );
    let gran = u64::from(p.front.info().discard_granularity) / 512;
    let mut model = vec![0u8; DISK as usize];
    // Requests in flight: (tag, range, is_write, expectation).
    let mut in_flight: Vec<(u64, (u64, u64), bool, Expect)> = Vec::new();
    let queues = p.front.info().queues;
    let mut q = 0usize;

    fn drain(p: &mut Pair, model: &[u8], in_flight: &mut Vec<(u64, (u64, u64), bool, Expect)>) {
        for (tag, _, _, expect) in in_flight.drain(..) {
            let c = p.front.wait(tag).expect("completion");
            match expect {
                Expect::Okay => assert_eq!(c.status, Status::Okay),
                Expect::Error => assert_eq!(c.status, Status::Error),
                Expect::Data(sector, len) => {
                    assert_eq!(c.status, Status::Okay);
                    let want = &model[sector as usize * 512..sector as usize * 512 + len];
                    assert!(c.data.as_deref() == Some(want), "read at {sector} differs");
                }
            }
        }
    }

    for s in steps {
        // Ranges touched, and whether the step changes the disk.
        let (range, writes) = match &s {
            Step::Read { sector, sectors } => ((*sector, sector + u64::from(*sectors)), false),
            Step::Write {
                sector, sectors, ..
            } => ((*sector, sector + u64::from(*sectors)), true),
            Step::Barrier {
                sector, sectors, ..
            } => ((*sector, sector + u64::from(*sectors)), true),
            Step::Discard { at, units } => ((at * gran, (at + units) * gran), true),
            Step::Flush | Step::PastEnd { .. } => ((0, 0), false),
            Step::Sync => ((0, 0), false),
        };
        let conflict = in_flight
            .iter()
            .any(|(_, (a, b), w, _)| (writes || *w) && range.0 < *b && *a < range.1);
        // Barriers, and anything overlapping a write in flight, wait for the others (a
        // well-behaved guest does not race overlapping I/O).
        if conflict || matches!(s, Step::Sync | Step::Barrier { .. }) {
            drain(&mut p, &model, &mut in_flight);
        }
        let (op, expect) = match s {
            Step::Sync => continue,
            Step::Read { sector, sectors } => (
                Op::Read { sector, sectors },
                Expect::Data(sector, sectors as usize * 512),
            ),
            Step::Write {
                sector,
                sectors,
                seed,
            } => {
                let data = pattern(seed, sectors as usize * 512);
                model[sector as usize * 512..][..data.len()].copy_from_slice(&data);
                (Op::Write { sector, data }, Expect::Okay)
            }
            Step::Barrier {
                sector,
                sectors,
                seed,
            } => {
                let data = pattern(seed, sectors as usize * 512);
                model[sector as usize * 512..][..data.len()].copy_from_slice(&data);
                (Op::Barrier { sector, data }, Expect::Okay)
            }
            Step::Discard { at, units } => {
                let (a, b) = ((at * gran).min(SECTORS), ((at + units) * gran).min(SECTORS));
                if a >= b {
                    continue;
                }
                model[a as usize * 512..b as usize * 512].fill(0);
                (
                    Op::Discard {
                        sector: a,
                        nr_sectors: b - a,
                        secure: false,
                    },
                    Expect::Okay,
                )
            }
            Step::Flush => (Op::Flush, Expect::Okay),
            Step::PastEnd { over } => (
                Op::Read {
                    sector: SECTORS - 4 + over,
                    sectors: 8,
                },
                Expect::Error,
            ),
        };
        let tag = loop {
            match p.front.submit(q, op.clone()) {
                Ok(t) => break t,
                Err(xdisk_blkfront::Error::RingFull(_)) => {
                    drain(&mut p, &model, &mut in_flight);
                }
                Err(e) => panic!("submit: {e}"),
            }
        };
        q = (q + 1) % queues;
        in_flight.push((tag, range, writes, expect));
    }
    drain(&mut p, &model, &mut in_flight);
    let whole = p.front.read(0, SECTORS).unwrap();
    assert!(whole == model, "disk differs from the model");
    p.front.disconnect().unwrap();
    assert_eq!(p.front.leaked_grants(), 0);
    wait_until("closed", Duration::from_secs(10), || {
        p.device.stats().mappings == 0
    });
    p.device.shutdown().unwrap();
    image.close().unwrap();
    drop(image);
    assert!(contents(&disk) == model, "image differs from the model");
    check_clean(&disk);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_mixes_match_the_model(
        setup in setup(),
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        run(setup, steps);
    }
}
