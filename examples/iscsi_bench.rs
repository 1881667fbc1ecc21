//! Throughput of an iSCSI LUN with THREADS threads on one open (one session, one
//! command at a time) against one open per thread:
//! `cargo run --release --example iscsi_bench -- iscsi://HOST/IQN/LUN [THREADS]`.
//! Reads and writes the first 256 MiB of the LUN (its contents are overwritten).

use atsfs::lun::{open_device, Lun, OpenMode};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const CHUNK_BYTES: usize = 1024 * 1024;
const TOTAL_BYTES: usize = 256 * 1024 * 1024;
const SMALL_BYTES: usize = 4096;
const SMALL_OPS: usize = 4000;

fn run(luns: &[Arc<dyn Lun>], threads: usize, chunk: usize, ops: usize, write: bool) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let lun = luns[t % luns.len()].clone();
            std::thread::spawn(move || {
                let mut buf = vec![t as u8; chunk];
                for i in 0..ops / threads {
                    let offset = ((i * threads + t) * chunk % TOTAL_BYTES) as u64;
                    if write {
                        lun.write_at(&buf, offset).expect("write");
                    } else {
                        lun.read_at(&mut buf, offset).expect("read");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: iscsi_bench URL [THREADS]");
    let threads: usize = args.next().map_or(4, |t| t.parse().expect("THREADS"));
    let open = || open_device(Path::new(&url), OpenMode::ReadWrite).expect("open");
    let one = vec![open()];
    let many: Vec<_> = (0..threads).map(|_| open()).collect();
    for (name, luns) in [("one session", &one), ("a session per thread", &many)] {
        let big = TOTAL_BYTES / CHUNK_BYTES;
        let w = run(luns, threads, CHUNK_BYTES, big, true);
        let r = run(luns, threads, CHUNK_BYTES, big, false);
        let sr = run(luns, threads, SMALL_BYTES, SMALL_OPS, false);
        let mib = (TOTAL_BYTES / CHUNK_BYTES) as f64;
        println!(
            "{threads} threads, {name}: 1 MiB writes {:.0} MiB/s, 1 MiB reads {:.0} MiB/s, 4 KiB reads {:.0}/s",
            mib / w,
            mib / r,
            SMALL_OPS as f64 / sr
        );
    }
}
