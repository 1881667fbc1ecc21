//! Shared helpers of the FUSE integration tests: temporary volumes, real mounts, and
//! a guard that always unmounts.
//!
//! These tests mount through the kernel, so they need root and `/dev/fuse`. Every
//! test starts with `require_fuse!()`, which prints "skipped: needs root and
//! /dev/fuse" and returns when either is missing (CI has both).
//!
//! Each mount gets its own image, its own mount point, its own daemon log and a fresh
//! host UUID, so tests of one file run in parallel without meeting each other.
//!
//! Caller's duties: keep the `Mount` alive while using its path, and drop it (or call
//! `unmount`) before reading the image with anything else (fsck, a second mount).

#![allow(dead_code)] // Each test file uses a different part of this module.

// The real-iSCSI test bed: `testbed` is the very code of `cargo xtask tgt`.
#[path = "../../xtask/src/testbed.rs"]
pub mod testbed;
pub mod tgt;

use atsfs::lun::{FileLun, OpenMode};
use atsfs::mkfs::MkfsOptions;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// How long a daemon may take to exit after its mount point is unmounted.
const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(60);

/// Skips the calling test (returns from it) unless FUSE mounts can work here.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if !$crate::common::fuse_available() {
            eprintln!("skipped: needs root and /dev/fuse");
            return;
        }
    };
}

/// True when this process is root and the FUSE device exists.
pub fn fuse_available() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/fuse").exists()
}

/// The `atsfs` binary that cargo built for these tests.
pub fn atsfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_atsfs")
}

/// A fresh random host UUID, as `--host-id` takes it.
pub fn new_host_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// A temporary directory for one test: images, mount points, logs. Removed on drop
/// (after the mounts in it, which the test drops first).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(test_name: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("atsfs-{test_name}-"))
            .tempdir()
            .expect("making a temporary directory");
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the scratch directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes an empty directory for a mount point.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let path = self.join(name);
        std::fs::create_dir_all(&path).expect("making a mount point");
        path
    }

    /// Makes a fresh volume of `bytes` in the image file `name` with the default
    /// mkfs options.
    pub fn image(&self, name: &str, bytes: u64) -> PathBuf {
        self.image_with(name, bytes, &MkfsOptions::default())
    }

    /// Makes a fresh volume of `bytes` in the image file `name`.
    pub fn image_with(&self, name: &str, bytes: u64, opts: &MkfsOptions) -> PathBuf {
        let path = self.join(name);
        make_image(&path, bytes, opts);
        path
    }
}

/// mkfs options with a short lease, so that a host that comes back after a crash
/// takes its slot back in a few seconds instead of the default lease. Not shorter:
/// a loaded two-core CI machine must still renew its heartbeat in time.
pub fn short_lease_opts() -> MkfsOptions {
    MkfsOptions {
        heartbeat_interval: Duration::from_secs(1),
        lease: Duration::from_secs(4),
        ..MkfsOptions::default()
    }
}

/// True when the suite runs on Disk Paxos volumes (`ATSFS_ATS_EMULATION=off`).
pub fn disk_paxos() -> bool {
    std::env::var(atsfs::lun::ATS_EMULATION_ENV).is_ok_and(|v| v == "off")
}

/// Creates (or grows) the sparse image file `path` to `bytes` and lays out a volume
/// on it through the library, as `mkfs.atsfs` does.
///
/// The volume's ATS mode is `opts.ats_mode`: emulated by default
/// (`MkfsOptions::default()`), although `mkfs.atsfs` makes Disk Paxos volumes on
/// image files. That is a choice for the suite's time: on Disk Paxos every mount
/// waits half a lease for its slot and a test-and-set costs more I/O (the cluster
/// tests took 61 s instead of 22 s), and CI runs the whole suite. Disk Paxos is
/// covered by the tests that ask for it (`ats_mode` set, daemons `on_plain_disk`),
/// pjdfstest and the demo (the mkfs default), and by the whole suite run with
/// `ATSFS_ATS_EMULATION=off` in the environment (which the daemons and tools
/// inherit: they then open the image as a plain disk without compare-and-write):
/// then every volume is made for Disk Paxos, e.g.
/// `ATSFS_ATS_EMULATION=off cargo test --test cluster`.
pub fn make_image(path: &Path, bytes: u64, opts: &MkfsOptions) {
    let mut opts = opts.clone();
    if disk_paxos() {
        opts.ats_mode = atsfs::format::ATS_MODE_DISK_PAXOS;
    }
    let opts = &opts;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("creating the image file");
    file.set_len(bytes).expect("sizing the image file");
    drop(file);
    let lun = FileLun::open(path, OpenMode::ReadWrite).expect("opening the image");
    atsfs::mkfs::mkfs(&lun, opts, &mut |_, _| {}).expect("mkfs");
}

/// Runs `atsfs fsck DEVICE` and returns its output.
pub fn fsck(image: &Path) -> Output {
    Command::new(atsfs_bin())
        .arg("fsck")
        .arg(image)
        .output()
        .expect("running atsfs fsck")
}

/// Asserts that `atsfs fsck` finds the volume clean (exit 0).
pub fn assert_fsck_clean(image: &Path) {
    let out = fsck(image);
    assert_eq!(
        out.status.code(),
        Some(0),
        "atsfs fsck {} did not exit 0 (clean)\nstdout:\n{}\nstderr:\n{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a mount is made of: which image, where, logging where, as which host.
#[derive(Clone, Debug)]
pub struct MountSpec {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
    pub host_id: String,
    /// Open the image as a plain disk, without compare-and-write
    /// (`ATSFS_ATS_EMULATION=off` for this daemon only): for Disk Paxos volumes.
    pub plain_disk: bool,
}

impl MountSpec {
    /// A mount of `image` in the scratch directory: mount point `NAME.mnt`, log
    /// `NAME.log`, a new host UUID.
    pub fn in_scratch(scratch: &Scratch, image: &Path, name: &str) -> MountSpec {
        MountSpec {
            image: image.to_path_buf(),
            mountpoint: scratch.mountpoint(&format!("{name}.mnt")),
            log: scratch.join(&format!("{name}.log")),
            host_id: new_host_id(),
            plain_disk: false,
        }
    }

    /// This mount without compare-and-write (`plain_disk`).
    pub fn on_plain_disk(mut self) -> MountSpec {
        self.plain_disk = true;
        self
    }

    /// The `atsfs mount` command line (background mode).
    pub fn command(&self) -> Command {
        let mut command = Command::new(atsfs_bin());
        command
            .arg("mount")
            .arg("--host-id")
            .arg(&self.host_id)
            .arg("--log")
            .arg(&self.log)
            .arg(&self.image)
            .arg(&self.mountpoint);
        if self.plain_disk {
            command.env(atsfs::lun::ATS_EMULATION_ENV, "off");
        }
        command
    }

    /// Mounts. Panics with the daemon's log when the mount fails.
    pub fn mount(&self) -> Mount {
        self.mount_command(self.command())
    }

    /// Mounts with `-o OPTIONS` (e.g. "attr_timeout=0,entry_timeout=0").
    pub fn mount_with_options(&self, options: &str) -> Mount {
        let mut command = self.command();
        command.arg("-o").arg(options);
        self.mount_command(command)
    }

    fn mount_command(&self, mut command: Command) -> Mount {
        let out = command.output().expect("running atsfs mount");
        assert!(
            out.status.success(),
            "atsfs mount {} {} failed ({})\nstderr:\n{}\nlog:\n{}",
            self.image.display(),
            self.mountpoint.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            read_log(&self.log)
        );
        let daemon_pid = find_daemon(&self.mountpoint);
        if daemon_pid.is_none() {
            eprintln!(
                "warning: no daemon process found for {}",
                self.mountpoint.display()
            );
        }
        Mount {
            spec: self.clone(),
            daemon_pid,
            mounted: true,
        }
    }
}

/// A live mount of one volume by one host, through a background `atsfs mount`.
///
/// Drop unmounts it with `umount` and waits for the daemon to exit, so that the
/// volume is quiet afterwards. Drop never panics (it may run while a test unwinds);
/// `unmount` is the checked way.
pub struct Mount {
    spec: MountSpec,
    daemon_pid: Option<i32>,
    mounted: bool,
}

impl Mount {
    pub fn path(&self) -> &Path {
        &self.spec.mountpoint
    }

    /// A path inside the mount.
    pub fn join(&self, relative: &str) -> PathBuf {
        self.spec.mountpoint.join(relative)
    }

    pub fn spec(&self) -> &MountSpec {
        &self.spec
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        self.daemon_pid
    }

    /// Unmounts and mounts the same image again as the same host.
    pub fn remount(self) -> Mount {
        self.unmount().mount()
    }

    /// Unmounts, waits for the daemon to exit, and checks that it did not panic.
    pub fn unmount(mut self) -> MountSpec {
        self.mounted = false;
        let spec = self.spec.clone();
        // "target is busy" can be a moment's: a process another test forked has not
        // exec'd yet and holds a copy of a descriptor into the mount.
        let mut tries = 0;
        loop {
            let out = Command::new("umount")
                .arg(&spec.mountpoint)
                .output()
                .expect("running umount");
            if out.status.success() {
                break;
            }
            tries += 1;
            assert!(
                tries < 50,
                "umount {} failed ({}): {}",
                spec.mountpoint.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(pid) = self.daemon_pid {
            assert!(
                wait_exit(pid, DAEMON_EXIT_WAIT),
                "the daemon {pid} of {} still runs {DAEMON_EXIT_WAIT:?} after umount\nlog:\n{}",
                spec.mountpoint.display(),
                read_log(&spec.log)
            );
        }
        let log = read_log(&spec.log);
        assert!(
            !log.contains("panicked"),
            "the daemon of {} panicked; log:\n{log}",
            spec.mountpoint.display()
        );
        spec
    }

    /// Kills the daemon with SIGKILL, as a crash would, and detaches the dead mount
    /// point (`umount -l`: it answers "Transport endpoint is not connected") so that
    /// it can be mounted again. The volume is left as the crash left it.
    pub fn kill9(mut self) -> MountSpec {
        let pid = self
            .daemon_pid
            .expect("kill9 needs the daemon's pid, and it was not found");
        // SAFETY: kill has no memory-safety preconditions; pid is our daemon's.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
        assert!(wait_exit(pid, DAEMON_EXIT_WAIT), "{pid} survived SIGKILL");
        let status = Command::new("umount")
            .arg("-l")
            .arg(&self.spec.mountpoint)
            .status()
            .expect("running umount -l");
        assert!(
            status.success(),
            "umount -l {} failed",
            self.spec.mountpoint.display()
        );
        self.mounted = false;
        self.spec.clone()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let mountpoint = &self.spec.mountpoint;
        let unmounted = Command::new("umount")
            .arg(mountpoint)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !unmounted {
            eprintln!(
                "umount {} failed; detaching it with umount -l",
                mountpoint.display()
            );
            let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
        }
        if let Some(pid) = self.daemon_pid {
            if !wait_exit(pid, DAEMON_EXIT_WAIT) {
                eprintln!("the daemon {pid} did not exit; killing it");
                // SAFETY: as in kill9.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The daemon's log, or a note that there is none.
pub fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_else(|e| format!("(no log at {}: {e})", log.display()))
}

/// Finds the background daemon serving `mountpoint`: an `atsfs mount` process
/// (started with `--ready-fd` by the foreground command) whose arguments name it.
pub fn find_daemon(mountpoint: &Path) -> Option<i32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_daemon = args.contains(&&b"mount"[..])
            && args.contains(&&b"--ready-fd"[..])
            && args.contains(&want);
        if is_daemon && process_alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to exit. True when it did.
pub fn wait_exit(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while process_alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// True when `path` is a mount point in this process's mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    // Field 5 of mountinfo is the mount point (spaces escaped as \040).
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mp| mp.replace("\\040", " ") == want)
}

/// The last OS error as an errno value.
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A path as a C string for libc calls.
pub fn cpath(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

/// Reads a file, retrying while another host still has it open for writing (its
/// close reaches its daemon just after close() returns).
pub fn read_within(path: &Path, limit: Duration) -> Vec<u8> {
    let started = Instant::now();
    loop {
        match read_all(path) {
            Ok(data) => return data,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reading {}: {e}", path.display()),
        }
    }
}

pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    File::open(path)?.read_to_end(&mut out)?;
    Ok(out)
}

/// Retries an open for writing until it succeeds; returns how long it took.
pub fn open_for_writing_within(path: &Path, limit: Duration) -> (File, Duration) {
    let started = Instant::now();
    loop {
        match OpenOptions::new().write(true).open(path) {
            Ok(file) => return (file, started.elapsed()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!(
                "open of {} for writing after {:?}: {e}",
                path.display(),
                started.elapsed()
            ),
        }
    }
}
