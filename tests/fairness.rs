//! Lock handover between busy hosts: a host creating in a directory in a tight loop
//! must let another host's creates in that directory through, each within 2 s (a
//! liveness bound of issue 12, not a speed check).
//!
//! In a test binary of its own: cargo runs test binaries one after another, so no
//! other test loads the two cores while this one measures waits (in the library's
//! test binary, under the load of the tests beside it, a create took 2.9 s). Its two
//! tests (emulated ATS, Disk Paxos) take turns (`ONE_AT_A_TIME`) for the same reason.

use atsfs::cluster::HostUuid;
use atsfs::fs::{Fs, MountOptions};
use atsfs::lun::{Lun, MemLun, PlainDisk};
use atsfs::mkfs::{mkfs, MkfsOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REG: u32 = libc::S_IFREG | 0o644;

/// The tests of this binary run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A fresh in-memory volume: 4 slots, heartbeat 100 ms, lease 1 s; with `paxos`, a
/// Disk Paxos volume.
fn fresh_volume(bytes: u64, paxos: bool) -> Arc<MemLun> {
    let lun = Arc::new(MemLun::new(bytes, 512));
    let mut opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ..MkfsOptions::default()
    };
    if paxos {
        opts.ats_mode = atsfs::format::ATS_MODE_DISK_PAXOS;
    }
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    lun
}

/// A host on its own view of the volume; with `paxos`, as a plain disk (no
/// compare-and-write: every test-and-set goes through the Disk Paxos token).
fn mount(lun: &Arc<MemLun>, host: u8, paxos: bool) -> Arc<Fs> {
    let lun: Arc<dyn Lun> = if paxos {
        Arc::new(PlainDisk(lun.clone()))
    } else {
        lun.clone()
    };
    Fs::mount(lun, MountOptions::new(HostUuid([host; 16]))).expect("mount")
}

/// One round on a fresh volume: A creates (and unlinks) in D in a tight loop while
/// B makes 50 creates in D. Returns B's slowest create, or which create broke the
/// 2 s bound; A must have created something meanwhile.
fn round(paxos: bool) -> Result<Duration, String> {
    let lun = fresh_volume(64 << 20, paxos);
    let a = mount(&lun, 1, paxos);
    let b = mount(&lun, 2, paxos);
    let d = a.mkdir(a.root(), b"d", 0o755, 0, 0).expect("mkdir").ino;
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut created = 0u32;
            while !stop.load(Ordering::SeqCst) && created < 1_000_000 {
                // Create and unlink, so that the volume never fills.
                let name = format!("a{}", created % 64);
                if created >= 64 {
                    a.unlink(d, name.as_bytes()).expect("A unlinks");
                }
                a.mknod(d, name.as_bytes(), REG, 0, 0, 0)
                    .expect("A creates");
                created += 1;
            }
            created
        })
    };
    let mut outcome = Ok(Duration::ZERO);
    for i in 0..50 {
        let started = Instant::now();
        let created = b.mknod(d, format!("b{i}").as_bytes(), REG, 0, 0, 0);
        let took = started.elapsed();
        if let Err(e) = created {
            outcome = Err(format!("B's create {i} failed after {took:?}: {e}"));
            break;
        }
        if took > Duration::from_secs(2) {
            outcome = Err(format!("B's create {i} took {took:?}"));
            break;
        }
        outcome = outcome.map(|slowest| slowest.max(took));
    }
    stop.store(true, Ordering::SeqCst);
    let created = busy.join().expect("A's loop");
    println!("A created {created} meanwhile; B: {outcome:?}");
    assert!(created > 0, "A created nothing");
    outcome
}

/// The bound is a liveness bound under a scheduler the test does not control (two
/// cores shared by both hosts' threads), so a round that misses it is run once more;
/// a broken handover misses it every time (before the fix, B's creates waited until
/// EAGAIN after 60 s, and later up to 42 s, in every run).
fn twice_if_needed(paxos: bool) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let first = round(paxos);
    if let Err(why) = &first {
        println!("first round missed the bound ({why}); once more");
        if let Err(why) = round(paxos) {
            panic!("twice in a row: {why}");
        }
    }
}

#[test]
fn a_busy_host_lets_an_asking_host_have_its_turn() {
    twice_if_needed(false);
}

/// The same through the Disk Paxos token: B needs the token for every lock and
/// mailbox change while A keeps it busy; the token's hand-off (requests, step-backs,
/// the releaser) must let B through as the mailbox does.
#[test]
fn on_disk_paxos_a_busy_host_lets_an_asking_host_have_its_turn() {
    twice_if_needed(true);
}
