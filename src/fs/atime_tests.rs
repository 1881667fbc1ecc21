//! Access times through the fs core, one mount per mode (`fs::atime`).

use super::atime::AtimeMode;
use super::tests::fresh_volume;
use super::*;
use crate::cluster::HostUuid;
use crate::lun::{Lun, MemLun};
use std::time::{Duration, SystemTime};

const REG: u32 = libc::S_IFREG | 0o644;

fn mount_with(lun: &Arc<MemLun>, atime: AtimeMode, nodiratime: bool) -> Arc<Fs> {
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.atime = atime;
    options.nodiratime = nodiratime;
    let shared: Arc<dyn Lun> = lun.clone();
    Fs::mount(shared, options).expect("mount")
}

fn atime(fs: &Fs, ino: Ino) -> SystemTime {
    fs.getattr(ino).expect("getattr").atime
}

/// Sets atime and mtime (ctime becomes now, as utimes does).
fn set_times(fs: &Fs, ino: Ino, atime: SystemTime, mtime: SystemTime) {
    let set = SetAttr {
        atime: Some(SetTime::At(atime)),
        mtime: Some(SetTime::At(mtime)),
        ..Default::default()
    };
    fs.setattr(ino, &set).expect("setattr");
}

fn ago(secs: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(secs)
}

fn list(fs: &Fs, dir: Ino) {
    fs.readdir(dir, 0, &mut |_, _, _, _| false)
        .expect("readdir");
}

/// A new file in the root with four bytes of data.
fn file_with_data(fs: &Fs, name: &[u8]) -> Ino {
    let f = fs.mknod(fs.root(), name, REG, 0, 0, 0).expect("create");
    fs.write_data(f.ino, 0, b"data").expect("write");
    f.ino
}

#[test]
fn relatime_updates_once_after_each_change_and_after_a_day() {
    let lun = fresh_volume(64 << 20);
    let fs = mount_with(&lun, AtimeMode::Relatime, false);
    let f = file_with_data(&fs, b"f");
    // Just written: mtime >= atime, so the first read updates the atime.
    let before = atime(&fs, f);
    fs.read_data(f, 0, 4).expect("read");
    let first = atime(&fs, f);
    assert!(first > before, "{first:?} <= {before:?}");
    // Newer than the mtime and the ctime, less than a day old: reads leave it.
    std::thread::sleep(Duration::from_millis(5));
    fs.read_data(f, 0, 4).expect("read");
    assert_eq!(atime(&fs, f), first);
    // A write moves the mtime past it: the next read updates it once.
    std::thread::sleep(Duration::from_millis(5));
    fs.write_data(f, 0, b"DATA").expect("write");
    fs.read_data(f, 0, 4).expect("read");
    let after_write = atime(&fs, f);
    assert!(after_write > first);
    fs.read_data(f, 0, 4).expect("read");
    assert_eq!(atime(&fs, f), after_write);
    // Older than a day (set so; the ctime is now, after it): updated. An atime newer
    // than the ctime but older than a day cannot be made with utimes, which moves
    // the ctime to now; `AtimeMode::due`'s own tests cover that rule alone.
    set_times(&fs, f, ago(2 * 86400), ago(3 * 86400));
    fs.read_data(f, 0, 4).expect("read");
    assert!(atime(&fs, f) > ago(60));
    // Directories too, when listed.
    let d = fs.mkdir(fs.root(), b"d", 0o755, 0, 0).expect("mkdir").ino;
    let before = atime(&fs, d);
    std::thread::sleep(Duration::from_millis(5));
    list(&fs, d);
    assert!(atime(&fs, d) > before);
    // Committed like any change: still there after a remount.
    let kept = atime(&fs, f);
    fs.unmount().expect("unmount");
    drop(fs);
    let fs = mount_with(&lun, AtimeMode::Relatime, false);
    assert_eq!(atime(&fs, f), kept);
}

#[test]
fn noatime_never_updates() {
    let lun = fresh_volume(64 << 20);
    let fs = mount_with(&lun, AtimeMode::NoAtime, false);
    let f = file_with_data(&fs, b"f");
    set_times(&fs, f, ago(2 * 86400), ago(3 * 86400));
    let before = atime(&fs, f);
    fs.read_data(f, 0, 4).expect("read");
    list(&fs, fs.root());
    assert_eq!(atime(&fs, f), before);
    let d = fs.mkdir(fs.root(), b"d", 0o755, 0, 0).expect("mkdir").ino;
    let before = atime(&fs, d);
    list(&fs, d);
    assert_eq!(atime(&fs, d), before);
}

#[test]
fn strictatime_updates_on_every_read_and_nodiratime_spares_directories() {
    let lun = fresh_volume(64 << 20);
    let fs = mount_with(&lun, AtimeMode::StrictAtime, true);
    let f = file_with_data(&fs, b"f");
    let mut last = atime(&fs, f);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(5));
        fs.read_data(f, 0, 4).expect("read");
        let now = atime(&fs, f);
        assert!(now > last, "{now:?} <= {last:?}");
        last = now;
    }
    let d = fs.mkdir(fs.root(), b"d", 0o755, 0, 0).expect("mkdir").ino;
    let before = atime(&fs, d);
    std::thread::sleep(Duration::from_millis(5));
    list(&fs, d);
    assert_eq!(atime(&fs, d), before, "nodiratime");
    // An atime update is no transaction of its own: nothing was committed by the
    // reads (the periodic commit writes them later).
    let commits = fs.host_stats().expect("stats").commits;
    fs.read_data(f, 0, 4).expect("read");
    assert_eq!(fs.host_stats().expect("stats").commits, commits);
}

/// A read whose atime is due holds the data I/O barrier (its IoToken) while
/// `touch_atime` waits for the core lock; a thread that holds the core lock in
/// `release_quarantine` (a sync, a lock release) waits for the barrier to be idle.
/// Runs `reads` reads of a 64 KiB file (strictatime: each one's atime is due) on a
/// thread named "slow-reader" against `syncs` rounds of create, write, unlink and
/// sync; fails if they have not both finished within a minute.
fn reads_race_syncs(fs: &Arc<Fs>, reads: u32, syncs: u32) {
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    fs.write_data(f, 0, &vec![7u8; 64 << 10]).expect("write");
    fs.sync().expect("sync");
    let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let reader = {
        let (fs, done) = (fs.clone(), done.clone());
        std::thread::Builder::new()
            .name("slow-reader".into())
            .spawn(move || {
                for _ in 0..reads {
                    fs.read_data(f, 0, 64 << 10).expect("read");
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
            .expect("spawn")
    };
    let syncer = {
        let (fs, done) = (fs.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..syncs {
                let name = format!("g{i}");
                let g = fs
                    .mknod(fs.root(), name.as_bytes(), REG, 0, 0, 0)
                    .expect("create");
                fs.write_data(g.ino, 0, &[1u8; 8192]).expect("write");
                fs.unlink(fs.root(), name.as_bytes()).expect("unlink");
                fs.sync().expect("sync");
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let start = std::time::Instant::now();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "deadlock: a read waiting in touch_atime (holding the data I/O barrier) and a \
             sync waiting in release_quarantine (holding the core lock)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("reader");
    syncer.join().expect("syncer");
}

#[test]
fn a_read_with_its_atime_due_and_a_sync_do_not_deadlock() {
    let lun = fresh_volume(64 << 20);
    let fs = mount_with(&lun, AtimeMode::StrictAtime, false);
    reads_race_syncs(&fs, 3000, 3000);
}

/// A clock that stalls the thread named "slow-reader" at every reading, as a
/// preempted thread would be stalled: it widens the window between a read's
/// mapping (core lock let go, data I/O barrier entered) and its `touch_atime`.
struct StallingClock(crate::cluster::SystemClock);

impl crate::cluster::Clock for StallingClock {
    fn now_ms(&self) -> u64 {
        if std::thread::current().name() == Some("slow-reader") {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.now_ms()
    }
    fn sleep(&self, duration: Duration) {
        self.0.sleep(duration)
    }
}

#[test]
fn a_preempted_read_with_its_atime_due_and_a_sync_do_not_deadlock() {
    let lun = fresh_volume(64 << 20);
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.atime = AtimeMode::StrictAtime;
    options.clock = Arc::new(StallingClock(crate::cluster::SystemClock::default()));
    let shared: Arc<dyn Lun> = lun.clone();
    let fs = Fs::mount(shared, options).expect("mount");
    reads_race_syncs(&fs, 20, 500);
}

/// Atime updates run as non-mutating operations, which never seal the
/// running transaction at `TX_SOFT_LIMIT`: reads alone grow it without bound until
/// the next periodic commit, past what one journal transaction can hold.
#[test]
fn atime_updates_of_many_reads_fit_the_journal() {
    let lun = fresh_volume(64 << 20);
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.atime = AtimeMode::StrictAtime;
    options.commit_interval = Duration::from_secs(3600);
    let shared: Arc<dyn Lun> = lun.clone();
    let fs = Fs::mount(shared, options).expect("mount");
    let journal_blocks = geometry_journal_blocks(&lun);
    let n = (journal_blocks + 200) as usize;
    let mut inos = Vec::new();
    for i in 0..n {
        inos.push(file_with_data(&fs, format!("f{i}").as_bytes()));
    }
    fs.sync().expect("sync after the creates");
    std::thread::sleep(Duration::from_millis(20));
    for &ino in &inos {
        fs.read_data(ino, 0, 4).expect("read");
    }
    fs.sync().expect("sync of the atime updates");
    fs.mkdir(fs.root(), b"after", 0o755, 0, 0)
        .expect("the host still works");
}

fn geometry_journal_blocks(lun: &MemLun) -> u64 {
    crate::format::Geometry::from_superblock(&read_superblock(lun).expect("sb")).journal_blocks
}

#[test]
fn an_atime_update_never_asks_another_host_for_the_lock() {
    // Both hosts read one file (shared locks); the reader with strictatime leaves the
    // atime alone rather than ask the other host to let its lock go.
    let lun = fresh_volume(64 << 20);
    let a = mount_with(&lun, AtimeMode::NoAtime, false);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"data").expect("write");
    a.fsync(f, false).expect("fsync");
    let mut options = MountOptions::new(HostUuid([2; 16]));
    options.atime = AtimeMode::StrictAtime;
    let shared: Arc<dyn Lun> = lun.clone();
    let b = Fs::mount(shared, options).expect("mount b");
    let fb = b.lookup(b.root(), b"f").expect("lookup").ino;
    for _ in 0..3 {
        a.read_data(f, 0, 4).expect("read on a");
        b.read_data(fb, 0, 4).expect("read on b");
        std::thread::sleep(Duration::from_millis(100));
    }
    let releases = a.host_stats().expect("stats").lock_releases;
    let before = atime(&b, fb);
    std::thread::sleep(Duration::from_millis(20));
    b.read_data(fb, 0, 4).expect("read on b");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        a.host_stats().expect("stats").lock_releases,
        releases,
        "b's atime update asked a for the file's lock"
    );
    assert_eq!(atime(&b, fb), before, "b's atime changed under a's lock");
    b.unmount().expect("unmount b");
    a.unmount().expect("unmount a");
}
