//! Hosts stopped at awkward points, lock handover between busy hosts, and open
//! records judged from an old view: liveness and safety across hosts.

use super::*;
use crate::cluster::HostUuid;
use crate::format::{Geometry, SLOT_FREE, SLOT_LIVE};
use crate::lun::{FileLun, Lun, OpenMode};
use crate::mkfs::{mkfs, MkfsOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const REG: u32 = libc::S_IFREG | 0o644;

/// An image file with a fresh volume: 4 slots, heartbeat 100 ms, lease 1 s.
fn image_volume() -> tempfile::NamedTempFile {
    let img = tempfile::NamedTempFile::new().expect("temp file");
    img.as_file().set_len(64 << 20).expect("size");
    let lun = FileLun::open(img.path(), OpenMode::ReadWrite).expect("open");
    let opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ..MkfsOptions::default()
    };
    mkfs(&lun, &opts, &mut |_, _| {}).expect("mkfs");
    img
}

/// Mounts host `host` over its own open of the image (its own OFD locks, as a
/// separate daemon would have).
fn mount_file(path: &Path, host: u8) -> (Arc<FileLun>, Arc<Fs>) {
    let lun = Arc::new(FileLun::open(path, OpenMode::ReadWrite).expect("open"));
    let shared: Arc<dyn Lun> = lun.clone();
    let fs = Fs::mount(shared, MountOptions::new(HostUuid([host; 16]))).expect("mount");
    (lun, fs)
}

fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < bound, "not within {bound:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn slot_state(lun: &dyn Lun, slot: u32) -> Option<u32> {
    let geo = Geometry::from_superblock(&read_superblock(lun).expect("superblock"));
    let (_, image) = crate::cluster::read_slot(lun, &geo, slot).expect("read slot");
    image.map(|i| i.state)
}

/// Stops the next compare-and-write of `lun` at `offset` inside the emulated
/// test-and-set (its sector locked), as SIGSTOP would, until dropped.
struct StoppedInsideCaw {
    lun: Arc<FileLun>,
    open: Arc<AtomicBool>,
}

impl StoppedInsideCaw {
    fn arm(lun: &Arc<FileLun>, offset: u64) -> (StoppedInsideCaw, Arc<AtomicBool>) {
        let open = Arc::new(AtomicBool::new(false));
        let inside = Arc::new(AtomicBool::new(false));
        let (gate, entered) = (open.clone(), inside.clone());
        lun.set_caw_hook(Some(Arc::new(move |at| {
            if at != offset || gate.load(Ordering::SeqCst) {
                return;
            }
            entered.store(true, Ordering::SeqCst);
            while !gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        })));
        let stopped = StoppedInsideCaw {
            lun: lun.clone(),
            open,
        };
        (stopped, inside)
    }
}

impl Drop for StoppedInsideCaw {
    fn drop(&mut self) {
        self.open.store(true, Ordering::SeqCst);
        self.lun.set_caw_hook(None);
    }
}

#[test]
fn a_host_stopped_inside_a_test_and_set_holds_up_nothing_else() {
    let img = image_volume();
    let (a_lun, a) = mount_file(img.path(), 1);
    let (b_lun, b) = mount_file(img.path(), 2);
    let (_, c) = mount_file(img.path(), 3);
    let geo = Geometry::from_superblock(&read_superblock(a_lun.as_ref()).expect("sb"));
    let (b_slot, c_slot) = (b.slot().expect("b").0, c.slot().expect("c").0);
    // C works in a directory of its own (and crashes below); A in another.
    let dc = c.mkdir(c.root(), b"c", 0o755, 0, 0).expect("mkdir c").ino;
    let f = c.mknod(dc, b"f", REG, 0, 0, 0).expect("create").ino;
    c.fsync(f, false).expect("fsync");
    let da = a.mkdir(a.root(), b"a", 0o755, 0, 0).expect("mkdir a").ino;
    a.mknod(da, b"f0", REG, 0, 0, 0).expect("create");
    b.release_all_locks().expect("b lets go of everything");
    // B's next heartbeat stops inside its test-and-set, with B's slot sector locked.
    let (stopped, inside) = StoppedInsideCaw::arm(&b_lun, geo.slot_offset(b_slot));
    wait_until(
        "B stops inside its heartbeat",
        Duration::from_secs(10),
        || inside.load(Ordering::SeqCst),
    );
    drop(c); // crash
             // A recovers C although B's slot, dead as well, cannot be claimed.
    wait_until("A recovers crashed host C", Duration::from_secs(20), || {
        slot_state(a_lun.as_ref(), c_slot) == Some(SLOT_FREE)
    });
    // A serves its mailbox: D mounts (reading the root A holds) and creates in A's
    // directory.
    let (_, d) = mount_file(img.path(), 4);
    d.mknod(da, b"from-d", REG, 0, 0, 0)
        .expect("D creates in A's directory");
    // A keeps its lease and commits in the background.
    let commits = a.stats().expect("stats").commits;
    a.mknod(da, b"f1", REG, 0, 0, 0).expect("A creates");
    wait_until(
        "A commits in the background",
        Duration::from_secs(20),
        || a.stats().expect("stats").commits > commits,
    );
    assert!(!a.lease().is_fenced());
    // Nobody can claim B's slot while B is stopped holding it.
    assert_eq!(slot_state(a_lun.as_ref(), b_slot), Some(SLOT_LIVE));
    drop(stopped);
    // Once B goes on, it finds its lease gone; A recovers it.
    wait_until(
        "A recovers B once it went on",
        Duration::from_secs(20),
        || slot_state(a_lun.as_ref(), b_slot) == Some(SLOT_FREE),
    );
    assert!(b.lease().check().is_err(), "B outlived its lease");
}

#[test]
fn a_reader_that_mounted_again_since_the_view_still_excludes_writers() {
    // Heartbeats every 30 s: A's view of the other slots moves only when the test
    // says so (`watch_cluster`), or when A waits for a lock (none here).
    let lun = Arc::new(crate::lun::MemLun::new(64 << 20, 512));
    let opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_secs(30),
        lease: Duration::from_secs(70),
        ..MkfsOptions::default()
    };
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    let a = super::tests::mount(&lun, 1);
    let c = super::tests::mount(&lun, 3);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"read by C").expect("write");
    c.unmount().expect("unmount C");
    drop(c);
    a.watch_cluster().expect("A sees C's slot free");
    // C mounts again (a newer generation than A's view shows) and opens F to read.
    let c = super::tests::mount(&lun, 3);
    c.open(f, false).expect("C opens F read-only");
    c.release_all_locks()
        .expect("C lets go of F's lock (its open stays recorded)");
    assert_eq!(
        a.open(f, true).map_err(|e| e.errno()).err(),
        Some(libc::EBUSY),
        "A opened F for writing while C has it open"
    );
    // Nor may an unlink on A free the file under C.
    a.unlink(a.root(), b"f").expect("unlink");
    assert_eq!(
        c.read_data(f, 0, 64).expect("C still reads F"),
        b"read by C"
    );
    c.release(f, false).expect("C's last close frees F");
}

/// Writes `sector` over `resource`'s lock record, as another host (or this host's
/// own data write) would.
fn overwrite_lock_sector(lun: &dyn Lun, resource: u64, sector: &[u8]) {
    let geo = Geometry::from_superblock(&read_superblock(lun).expect("superblock"));
    lun.write_at(sector, geo.lock_offset(resource))
        .expect("write lock sector");
}

#[test]
fn releasing_a_lock_another_host_took_fences_the_host() {
    use crate::format::{encode_padded, OnDisk, LOCK_EXCLUSIVE};
    let lun = super::tests::fresh_volume(64 << 20);
    let a = super::tests::mount(&lun, 1);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    // Another host, believing A dead, took f's lock.
    let geo = Geometry::from_superblock(&read_superblock(lun.as_ref()).expect("sb"));
    let mut taken = crate::cluster::lock::read_lock(lun.as_ref(), &geo, f)
        .expect("read lock")
        .record;
    taken.mode = LOCK_EXCLUSIVE;
    taken.owner_slot = 3;
    taken.owner_gen = 1;
    taken.owner_uuid = [9; 16];
    taken.change_seq += 1;
    taken.seal();
    overwrite_lock_sector(lun.as_ref(), f, &encode_padded(&taken, 512));
    assert!(a.release_all_locks().is_err(), "the release went through");
    assert!(a.lease().is_fenced(), "A goes on after losing a lock");
    assert_eq!(
        a.getattr(a.root()).map_err(|e| e.errno()).err(),
        Some(libc::EIO)
    );
}

#[test]
fn a_freed_inodes_kept_lock_overwritten_by_this_hosts_own_write_is_forgotten() {
    // A keeps a freed inode's lock with its group's; a data write of its own to the
    // reused block overwrites the record. Letting the locks go must not fence A.
    let lun = super::tests::fresh_volume(64 << 20);
    let a = super::tests::mount(&lun, 1);
    let g = a.mknod(a.root(), b"g", REG, 0, 0, 0).expect("create").ino;
    a.unlink(a.root(), b"g").expect("unlink");
    a.fsync(a.root(), false).expect("fsync");
    overwrite_lock_sector(lun.as_ref(), g, &[0xab; 512]);
    a.release_all_locks().expect("release");
    assert!(!a.lease().is_fenced());
    a.mknod(a.root(), b"h", REG, 0, 0, 0).expect("A goes on");
}

#[test]
fn a_truncate_is_refused_while_another_host_has_the_file_open() {
    let lun = super::tests::fresh_volume(64 << 20);
    let a = super::tests::mount(&lun, 1);
    let b = super::tests::mount(&lun, 2);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"written by A").expect("write");
    let truncate = |fs: &Fs| {
        let set = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        fs.setattr(f, &set).map(|_| ()).map_err(|e| e.errno())
    };
    a.open(f, true).expect("A opens for writing");
    assert_eq!(truncate(&b), Err(libc::EBUSY), "truncated under A's writer");
    let chmod = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    b.setattr(f, &chmod).expect("other attributes may change");
    a.release(f, true).expect("close");
    a.open(f, false).expect("A opens to read");
    assert_eq!(truncate(&b), Err(libc::EBUSY), "truncated under A's reader");
    assert_eq!(a.read_data(f, 0, 64).expect("read"), b"written by A");
    a.release(f, false).expect("close");
    truncate(&b).expect("nobody else has it open");
    assert_eq!(a.getattr(f).expect("attr").size, 0);
}

/// A LUN whose next compare-and-write at an armed offset fails with an I/O error and
/// writes nothing (as a Disk Paxos compare-and-write does when one of the token's own
/// writes fails).
struct FailingCaw {
    inner: Arc<crate::lun::MemLun>,
    armed: std::sync::Mutex<Option<u64>>,
}

impl Lun for FailingCaw {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::lun::LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::lun::LunResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> crate::lun::LunResult<crate::lun::Caw> {
        let mut armed = self.armed.lock().expect("armed");
        if *armed == Some(offset) {
            *armed = None;
            return Err(crate::lun::LunError::Io {
                device: self.describe(),
                op: "compare-and-write",
                offset,
                source: std::io::Error::other("test: the token could not be taken"),
            });
        }
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> crate::lun::LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn a_failed_release_of_a_group_leaves_no_freed_inode_lock_without_it() {
    // A keeps a freed inode's lock with its group's (nobody else can allocate the
    // block while A holds the group). Asked for the group, A lets both go; when the
    // group's release fails (nothing written), A must not be left believing it holds
    // the freed inode's lock without the group's: the group's record, still naming A,
    // is freed at the next request (`yield_locks` frees records that name this host),
    // another host allocates the block for data and overwrites the lock record A
    // believes it holds (the simulator, Disk Paxos mode, seed 4: "lock record of
    // resource 4167 is damaged: bad magic").
    let mem = super::tests::fresh_volume(64 << 20);
    let lun = Arc::new(FailingCaw {
        inner: mem.clone(),
        armed: std::sync::Mutex::new(None),
    });
    let shared: Arc<dyn Lun> = lun.clone();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.commit_interval = Duration::from_secs(3600);
    let a = Fs::mount(shared, options).expect("mount");
    let g = a.mknod(a.root(), b"g", REG, 0, 0, 0).expect("create").ino;
    a.unlink(a.root(), b"g").expect("unlink");
    a.fsync(a.root(), false).expect("fsync");
    let geo = Geometry::from_superblock(&read_superblock(mem.as_ref()).expect("sb"));
    let group = geo.ag_header(geo.ag_of(g).expect("g's group"));
    let exclusive = |a: &Fs, r| {
        a.core().expect("core").meta.locks.held_mode(r)
            == Some(crate::cluster::lock::LockMode::Exclusive)
    };
    assert!(exclusive(&a, g) && exclusive(&a, group), "A keeps both");
    *lun.armed.lock().expect("armed") = Some(geo.lock_offset(group));
    let yielded = a.core().expect("core").meta.yield_locks(&[group]);
    assert!(yielded.is_err(), "the group's release did not fail");
    assert!(
        !exclusive(&a, g) || exclusive(&a, group),
        "A believes it holds the freed inode {g}'s lock without its group's"
    );
    // What follows in the simulator: the group is let go, another writer reuses the
    // block, and A's belief meets a sector that is no lock record.
    a.core()
        .expect("core")
        .meta
        .yield_locks(&[group])
        .expect("the group's record, naming A, is freed");
    overwrite_lock_sector(mem.as_ref(), g, &[0xab; 512]);
    a.verify_locks().expect("A's beliefs match the disk");
}
