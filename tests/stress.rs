//! kill -9 among two hosts that both run a metadata-heavy stress in one shared tree.
//!
//! Each round mounts hosts A and B on one image and starts a stress worker on each:
//! creates (some fsynced), unlinks, unlinks of files still held open (which stay open
//! past the kill on the victim: orphans for recovery to reclaim), renames across
//! directories, hard links, xattrs, truncates, mkdir and rmdir, all on a small pool of
//! names so the hosts meet on every directory and many files. Then one host is killed
//! with SIGKILL, and the volume is recovered:
//!
//! - rounds 0 and 1: the survivor goes on working (it needs the victim's locks and
//!   recovers it), its background watch recovers the victim's slot, and it unmounts;
//! - round 2: the survivor unmounts at once, before the victim's lease runs out, and
//!   the victim recovers itself when it mounts again, then unmounts.
//!
//! After every round `atsfs fsck` (no `--repair`) must exit 0: no leaked blocks, no
//! stale links, nothing.
//!
//! Needs root and /dev/fuse; without them the test prints "skipped" and passes.

mod common;

use common::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IMAGE_BYTES: u64 = 512 << 20;
/// Directories of the shared tree, and file names per directory.
const DIRS: usize = 4;
const NAMES: usize = 12;
/// Unlinked files a worker keeps open at once.
const HELD_MAX: usize = 4;
/// How long both hosts work at least before the kill, and the survivor after it.
const WORK_BEFORE_KILL: Duration = Duration::from_secs(3);
/// Operations the victim must have done, and unlinked files it must hold open,
/// before it is killed (both hosts contend for every directory, so an operation can
/// wait for several lock handovers).
const VICTIM_OPS_MIN: u64 = 40;
/// Bound on the wait for that.
const VICTIM_WORK_WAIT: Duration = Duration::from_secs(120);
const WORK_AFTER_KILL: Duration = Duration::from_secs(3);
/// Bound on the wait for the survivor to recover the victim's slot.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

fn volume_opts() -> atsfs::mkfs::MkfsOptions {
    atsfs::mkfs::MkfsOptions {
        heartbeat_interval: Duration::from_millis(500),
        lease: Duration::from_secs(3),
        ..atsfs::mkfs::MkfsOptions::default()
    }
}

/// What one worker managed to do (errors are expected: the other host holds files
/// open, removes names, and one host dies).
#[derive(Debug, Default)]
struct Done {
    ops_ok: u64,
    ops_failed: u64,
    unlinked_while_open: u64,
    /// The longest any one operation took (printed: a sign of lock handover trouble).
    slowest_op: Duration,
    /// Unlinked files still open when the worker stopped (the victim's become orphans).
    held_at_end: usize,
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in test paths")
}

fn set_xattr(path: &Path, value: &[u8]) -> std::io::Result<()> {
    let (p, name) = (cpath(path), c"user.stress");
    // SAFETY: valid C strings and a valid buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn remove_xattr(path: &Path) -> std::io::Result<()> {
    let (p, name) = (cpath(path), c"user.stress");
    // SAFETY: valid C strings.
    let rc = unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A random file path of the shared tree.
fn pick(root: &Path, rng: &mut SmallRng) -> PathBuf {
    root.join(format!("d{}", rng.gen_range(0..DIRS)))
        .join(format!("f{}", rng.gen_range(0..NAMES)))
}

fn write_new(path: &Path, rng: &mut SmallRng) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    let len = rng.gen_range(0..48 * 1024);
    file.write_all(&vec![rng.gen::<u8>(); len])?;
    if rng.gen_bool(0.3) {
        file.sync_all()?;
    }
    Ok(())
}

/// Opens a file for writing, unlinks its name and writes through the descriptor.
fn unlink_held(path: &Path, rng: &mut SmallRng) -> std::io::Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    fs::remove_file(path)?;
    file.write_all(&vec![7u8; rng.gen_range(1..64 * 1024)])?;
    file.sync_all()?;
    Ok(file)
}

/// One random operation on the shared tree.
fn one_op(root: &Path, rng: &mut SmallRng, held: &mut Vec<File>, done: &mut Done) -> bool {
    let path = pick(root, rng);
    let started = Instant::now();
    let result = match rng.gen_range(0..10) {
        0 | 1 => write_new(&path, rng),
        2 => fs::remove_file(&path),
        3 => unlink_held(&path, rng).map(|file| {
            done.unlinked_while_open += 1;
            held.push(file);
            if held.len() > HELD_MAX {
                held.remove(0);
            }
        }),
        4 => fs::rename(&path, pick(root, rng)),
        5 => fs::hard_link(&path, pick(root, rng)),
        6 => set_xattr(&path, &vec![b'x'; rng.gen_range(1..200)]),
        7 => remove_xattr(&path),
        8 => OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(rng.gen_range(0..64 * 1024))),
        _ => {
            let dir = path.with_extension("dir");
            if rng.gen_bool(0.5) {
                fs::create_dir(&dir)
            } else {
                fs::remove_dir(&dir)
            }
        }
    };
    done.slowest_op = done.slowest_op.max(started.elapsed());
    match result {
        Ok(()) => done.ops_ok += 1,
        Err(e) => {
            done.ops_failed += 1;
            // The daemon is gone (killed) or fenced: stop.
            if matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::EIO)) {
                return false;
            }
        }
    }
    true
}

/// What a running worker has done so far.
#[derive(Default)]
struct Progress {
    ops_ok: AtomicU64,
    held: AtomicUsize,
}

/// Waits until the worker of `progress` did `VICTIM_OPS_MIN` operations and holds an
/// unlinked file open (bounded).
fn wait_for_victim_work(progress: &Progress) {
    let started = Instant::now();
    while progress.ops_ok.load(Ordering::Relaxed) < VICTIM_OPS_MIN
        || progress.held.load(Ordering::Relaxed) == 0
    {
        assert!(
            started.elapsed() < VICTIM_WORK_WAIT,
            "the victim did {} operations in {VICTIM_WORK_WAIT:?}",
            progress.ops_ok.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker thread: what it did, and the unlinked files it still holds open.
type Worker = JoinHandle<(Done, Vec<File>)>;

/// Starts a worker on `root` until `stop` is set or its mount dies.
fn start_worker(
    root: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> Worker {
    std::thread::spawn(move || {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut held = Vec::new();
        let mut done = Done::default();
        while !stop.load(Ordering::Relaxed) && one_op(&root, &mut rng, &mut held, &mut done) {
            progress.ops_ok.store(done.ops_ok, Ordering::Relaxed);
            progress.held.store(held.len(), Ordering::Relaxed);
        }
        done.held_at_end = held.len();
        (done, held)
    })
}

/// True when `atsfs status` shows host `host_id` in a live state.
fn shows_live(image: &Path, host_id: &str) -> bool {
    let out = Command::new(atsfs_bin())
        .args(["status", "--json"])
        .arg(image)
        .output()
        .expect("atsfs status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    status["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .any(|s| s["host_uuid"] == host_id && s["state"] != "free")
}

fn wait_recovered(image: &Path, host_id: &str) {
    let started = Instant::now();
    while shows_live(image, host_id) {
        assert!(
            started.elapsed() < RECOVERY_WAIT,
            "the survivor did not recover the victim's slot within {RECOVERY_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One round: both hosts work, the victim is killed, the volume is recovered and
/// left with every host unmounted.
fn round(image: &Path, specs: &[MountSpec; 2], number: u64, victim: usize, self_recovery: bool) {
    let mounts: Vec<Mount> = specs.iter().map(MountSpec::mount).collect();
    for d in 0..DIRS {
        fs::create_dir_all(mounts[0].join(&format!("d{d}"))).expect("mkdir");
    }
    let stops: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let progress: Vec<Arc<Progress>> = (0..2).map(|_| Arc::default()).collect();
    let mut workers: Vec<Option<Worker>> = mounts
        .iter()
        .zip(&stops)
        .enumerate()
        .map(|(h, (m, stop))| {
            let seed = number * 10 + h as u64;
            Some(start_worker(
                m.path().to_path_buf(),
                seed,
                stop.clone(),
                progress[h].clone(),
            ))
        })
        .collect();
    std::thread::sleep(WORK_BEFORE_KILL);
    wait_for_victim_work(&progress[victim]);
    let survivor = 1 - victim;
    let mut mounts: Vec<Option<Mount>> = mounts.into_iter().map(Some).collect();
    // The victim's worker stops at its next operation: after the kill, `umount -l`
    // leaves its paths naming the empty mount point directory.
    stops[victim].store(true, Ordering::Relaxed);
    let victim_spec = mounts[victim].take().expect("victim").kill9();
    let (victim_done, victim_held) = workers[victim]
        .take()
        .expect("victim's worker")
        .join()
        .expect("victim's worker thread");
    eprintln!("round {number}: victim {victim} did {victim_done:?}");
    assert!(
        victim_done.held_at_end > 0,
        "the victim held no unlinked file open at the kill: {victim_done:?}"
    );
    drop(victim_held);
    if !self_recovery {
        std::thread::sleep(WORK_AFTER_KILL);
    }
    stops[survivor].store(true, Ordering::Relaxed);
    let (survivor_done, survivor_held) = workers[survivor]
        .take()
        .expect("survivor's worker")
        .join()
        .expect("survivor's worker thread");
    eprintln!("round {number}: survivor {survivor} did {survivor_done:?}");
    drop(survivor_held);
    let survivor_mount = mounts[survivor].take().expect("survivor");
    if self_recovery {
        survivor_mount.unmount();
        victim_spec.mount().unmount();
    } else {
        wait_recovered(image, &victim_spec.host_id);
        survivor_mount.unmount();
    }
    assert_fsck_clean(image);
}

#[test]
fn three_rounds_of_kill_9_in_a_shared_stress_leave_fsck_clean() {
    require_fuse!();
    let scratch = Scratch::new("stress-kill");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &volume_opts());
    let specs = [
        MountSpec::in_scratch(&scratch, &image, "a"),
        MountSpec::in_scratch(&scratch, &image, "b"),
    ];
    round(&image, &specs, 0, 0, false);
    round(&image, &specs, 1, 1, false);
    round(&image, &specs, 2, 0, true);
}
