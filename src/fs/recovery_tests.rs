//! Recoveries that take longer than the lease: the RECOVERING slot must keep moving,
//! or another host recovers it again while the first recoverer still writes.

use super::tests::fresh_volume;
use super::*;
use crate::cluster::{read_slot, HostUuid};
use crate::format::{Geometry, HeartbeatSlot, OnDisk, SLOT_FREE, SLOT_RECOVERING};
use crate::lun::{Caw, Lun, LunResult, MemLun};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const REG: u32 = libc::S_IFREG | 0o644;

/// A LUN whose plain writes each take `delay` (compare-and-writes do not, so the
/// heartbeat keeps its pace): a slow path for journal replay.
struct SlowWrites {
    inner: Arc<MemLun>,
    delay: Duration,
    writes: AtomicU64,
}

impl SlowWrites {
    fn new(inner: Arc<MemLun>, delay: Duration) -> Arc<SlowWrites> {
        Arc::new(SlowWrites {
            inner,
            delay,
            writes: AtomicU64::new(0),
        })
    }
}

impl Lun for SlowWrites {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        std::thread::sleep(self.delay);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "slow writes".into()
    }
}

fn geometry(lun: &MemLun) -> Geometry {
    Geometry::from_superblock(&read_superblock(lun).expect("superblock"))
}

fn slot_image(lun: &MemLun, slot: u32) -> HeartbeatSlot {
    read_slot(lun, &geometry(lun), slot)
        .expect("read slot")
        .1
        .expect("slot in use")
}

/// Waits (at most 30 s) until `slot` satisfies `what`.
fn wait_for_slot(lun: &MemLun, slot: u32, what: impl Fn(&HeartbeatSlot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !what(&slot_image(lun, slot)) {
        assert!(
            Instant::now() < deadline,
            "slot {slot} never got there: {:?}",
            slot_image(lun, slot)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Host 1 writes many transactions to its journal and crashes.
fn crash_with_a_long_journal(mem: &Arc<MemLun>) {
    let a = super::tests::mount(mem, 1);
    let d = a.mkdir(a.root(), b"d", 0o755, 0, 0).expect("mkdir").ino;
    for i in 0..150 {
        let f = a
            .mknod(d, format!("f{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create")
            .ino;
        a.write_data(f, 0, format!("file {i} from host 1").as_bytes())
            .expect("write");
        if i % 10 == 9 {
            a.fsync(f, false).expect("fsync");
        }
    }
    a.fsync(d, false).expect("fsync");
    drop(a); // crash: slot 0 stays live, its journal holds the transactions
}

fn assert_fsck_clean(mem: &MemLun) {
    let report = crate::fsck::check(mem).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_slow_recoverer_is_not_overtaken_by_a_third_host() {
    let mem = fresh_volume(64 << 20);
    crash_with_a_long_journal(&mem);
    // Host 2 recovers host 1 over a path where every write takes 25 ms: its replay
    // takes several leases.
    let slow = SlowWrites::new(mem.clone(), Duration::from_millis(25));
    let b_lun: Arc<dyn Lun> = slow.clone();
    // Its mount needs host 1's lock of the root: it recovers host 1 on the way.
    let mount_b =
        std::thread::spawn(move || Fs::mount(b_lun, MountOptions::new(HostUuid([2; 16]))));
    wait_for_slot(&mem, 0, |s| {
        s.state == SLOT_RECOVERING && s.recoverer_uuid == [2; 16]
    });
    let writes_before = slow.writes.load(Ordering::SeqCst);
    // Host 3 needs host 1's locks meanwhile: it must wait for host 2's recovery, not
    // recover host 1 again and write while host 2 still replays old images.
    let c = super::tests::mount(&mem, 3);
    let d = c.lookup(c.root(), b"d").expect("lookup on c").ino;
    let f = c.lookup(d, b"f7").expect("lookup on c").ino;
    c.write_data(f, 0, b"file 7 from host 3")
        .expect("write on c");
    c.mknod(d, b"from-c", REG, 0, 0, 0).expect("create on c");
    c.fsync(f, false).expect("fsync on c");
    wait_for_slot(&mem, 0, |s| s.state == SLOT_FREE);
    let recovered_by = slot_image(&mem, 0).recoverer_uuid;
    assert_eq!(recovered_by, [2; 16], "host 2's recovery was overtaken");
    let b = mount_b.join().expect("mount thread").expect("mount b");
    eprintln!(
        "host 2 wrote {} blocks while recovering",
        slow.writes.load(Ordering::SeqCst) - writes_before
    );
    c.unmount().expect("unmount c");
    b.unmount().expect("unmount b");
    assert_fsck_clean(&mem);
    let check = super::tests::mount(&mem, 4);
    let d = check.lookup(check.root(), b"d").expect("d").ino;
    check.lookup(d, b"from-c").expect("host 3's file survived");
    let f = check.lookup(d, b"f7").expect("f7").ino;
    assert_eq!(
        check.read_data(f, 0, 64).expect("read"),
        b"file 7 from host 3"
    );
    check.unmount().expect("unmount");
}

#[test]
fn a_host_replaying_its_own_journal_slowly_keeps_its_slot() {
    let mem = fresh_volume(64 << 20);
    crash_with_a_long_journal(&mem);
    // Host 1 mounts again over a slow path: its own replay takes several leases,
    // while host 2, mounted meanwhile, watches its slot.
    let slow = SlowWrites::new(mem.clone(), Duration::from_millis(25));
    let a_lun: Arc<dyn Lun> = slow.clone();
    let remount =
        std::thread::spawn(move || Fs::mount(a_lun, MountOptions::new(HostUuid([1; 16]))));
    wait_for_slot(&mem, 0, |s| {
        s.state == SLOT_RECOVERING && s.recoverer_uuid == [1; 16]
    });
    let b = super::tests::mount(&mem, 2);
    let a = remount
        .join()
        .expect("mount thread")
        .expect("host 1 mounts after replaying its journal");
    assert!(
        slow.writes.load(Ordering::SeqCst) * 25 > 2000,
        "the replay was not slower than the lease"
    );
    let d = a.lookup(a.root(), b"d").expect("d").ino;
    let f = a.lookup(d, b"f149").expect("f149").ino;
    assert_eq!(
        a.read_data(f, 0, 64).expect("read"),
        b"file 149 from host 1"
    );
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
    assert_fsck_clean(&mem);
}

/// A LUN of host 2 that lets a phantom host 9 take over the slot host 2 recovers, on
/// host 2's `TAKEOVER_AT`-th write of the recovery, and counts host 2's writes that
/// land while the phantom holds the slot.
struct Takeover {
    inner: Arc<MemLun>,
    geo: Geometry,
    state: std::sync::Mutex<Phase>,
    renewal_seen: std::sync::atomic::AtomicBool,
    late_writes: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Before,
    Recovering(u32),
    TakenOver,
}

const TAKEOVER_AT: u32 = 20;

impl Takeover {
    fn slot0(&self) -> HeartbeatSlot {
        slot_image(&self.inner, 0)
    }

    /// Counts the write and, on the chosen one, lets host 9 take the slot over and
    /// holds the write until host 2's renewal has run into the change.
    fn before_write(&self) {
        std::thread::sleep(Duration::from_millis(10));
        let slot = self.slot0();
        let Ok(mut phase) = self.state.lock() else {
            return;
        };
        match *phase {
            Phase::Before if slot.state == SLOT_RECOVERING && slot.recoverer_uuid == [2; 16] => {
                *phase = Phase::Recovering(1);
            }
            Phase::Recovering(n) if n + 1 < TAKEOVER_AT => *phase = Phase::Recovering(n + 1),
            Phase::Recovering(_) => {
                let mut taken = slot;
                taken.recoverer_uuid = [9; 16];
                taken.recoverer_slot = 3;
                taken.counter += 1;
                taken.seal();
                self.inner
                    .write_at(
                        &crate::format::encode_padded(&taken, 512),
                        self.geo.slot_offset(0),
                    )
                    .expect("takeover");
                *phase = Phase::TakenOver;
                drop(phase);
                let deadline = Instant::now() + Duration::from_secs(5);
                while !self.renewal_seen.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Generous room for the renewer to note what it found.
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => {}
        }
    }
}

impl Lun for Takeover {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.before_write();
        if self.slot0().recoverer_uuid == [9; 16] {
            self.late_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        let outcome = self.inner.compare_and_write(offset, expected, new);
        let taken = self
            .state
            .lock()
            .map(|p| *p == Phase::TakenOver)
            .unwrap_or(false);
        if taken && offset == self.geo.slot_offset(0) {
            self.renewal_seen.store(true, Ordering::SeqCst);
        }
        outcome
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "takeover".into()
    }
}

#[test]
fn a_recoverer_stops_replaying_when_its_renewal_finds_the_slot_taken() {
    let mem = fresh_volume(64 << 20);
    crash_with_a_long_journal(&mem);
    let lun = Arc::new(Takeover {
        geo: geometry(&mem),
        inner: mem.clone(),
        state: std::sync::Mutex::new(Phase::Before),
        renewal_seen: std::sync::atomic::AtomicBool::new(false),
        late_writes: AtomicU64::new(0),
    });
    let b_lun: Arc<dyn Lun> = lun.clone();
    // Host 2 recovers host 1 while mounting; host 9 takes the slot over midway and
    // dies, so host 2 recovers the slot again one lease later and mounts.
    let b = Fs::mount(b_lun, MountOptions::new(HostUuid([2; 16]))).expect("mount b");
    assert_eq!(*lun.state.lock().expect("state"), Phase::TakenOver);
    assert!(
        lun.renewal_seen.load(Ordering::SeqCst),
        "no renewal of the recovery"
    );
    // Only the write already past its check when the slot changed hands landed.
    assert_eq!(lun.late_writes.load(Ordering::SeqCst), 1);
    assert_eq!(slot_image(&mem, 0).state, SLOT_FREE);
    let d = b.lookup(b.root(), b"d").expect("d").ino;
    let f = b.lookup(d, b"f149").expect("f149").ino;
    assert_eq!(
        b.read_data(f, 0, 64).expect("read"),
        b"file 149 from host 1"
    );
    b.unmount().expect("unmount b");
    assert_fsck_clean(&mem);
}
