//! atsfs as the system's tools see it: `mount -t atsfs`, an fstab line, `umount`,
//! `fsck -t atsfs` with fsck's -n / -y / -p, through the real mount(8) and fsck(8).
//!
//! mount(8) and umount(8) look for their helpers in /sbin only (util-linux's
//! FS_SEARCH_PATH "/sbin:/sbin/fs.d:/sbin/fs"), so these tests link /sbin/mount.atsfs
//! (and /sbin/mount.fuse.atsfs, /sbin/umount.fuse.atsfs) to the binary
//! cargo built for as long as they run (`SbinHelper`, removed on drop, also after a
//! panic; a link left by a killed run is recognised and replaced). They never replace
//! a mount.atsfs that is not such a link (an installed atsfs): they skip instead.
//! fsck(8) also searches PATH, so fsck.atsfs comes from a scratch directory in PATH.

mod common;

use common::{atsfs_bin, find_daemon, new_host_id, process_alive, read_log, wait_exit, Scratch};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

/// One test at a time owns /sbin/mount.atsfs.
static SBIN: Mutex<()> = Mutex::new(());

/// The names mount(8) looks for: `mount.atsfs` (type atsfs) and `mount.fuse.atsfs`
/// (type fuse.atsfs, as the kernel shows it: remount); and umount(8)'s for type
/// fuse.atsfs, `umount.fuse.atsfs`.
const HELPERS: [&str; 3] = [
    "/sbin/mount.atsfs",
    "/sbin/mount.fuse.atsfs",
    "/sbin/umount.fuse.atsfs",
];

/// The helpers in /sbin, links to the built atsfs while it lives.
struct SbinHelper {
    made: Vec<PathBuf>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl SbinHelper {
    /// None (after saying why) when an installed mount.atsfs is in the way.
    fn install() -> Option<SbinHelper> {
        let lock = SBIN.lock().unwrap_or_else(|e| e.into_inner());
        for path in HELPERS.map(Path::new) {
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                continue;
            };
            let ours = meta.file_type().is_symlink()
                && std::fs::read_link(path)
                    .is_ok_and(|t| t.ends_with("debug/atsfs") || t.ends_with("release/atsfs"));
            if !ours {
                eprintln!(
                    "skipped: {} exists and is not a link into a cargo target directory \
                     (an installed atsfs?); not replacing it",
                    path.display()
                );
                return None;
            }
            std::fs::remove_file(path).expect("removing a stale helper link");
        }
        let mut helper = SbinHelper {
            made: Vec::new(),
            _lock: lock,
        };
        for path in HELPERS.map(PathBuf::from) {
            std::os::unix::fs::symlink(atsfs_bin(), &path).expect("linking a helper in /sbin");
            helper.made.push(path);
        }
        Some(helper)
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        for path in &self.made {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn run(command: &mut Command) -> Output {
    let out = command.output().expect("starting a command");
    eprintln!(
        "$ {command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The (source, type) of the mount on `dir` in /proc/self/mountinfo.
fn mountinfo(dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dir = dir.to_str()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        if fields.get(4) != Some(&dir) {
            return None;
        }
        Some((
            fields.get(dash + 2)?.to_string(),
            fields.get(dash + 1)?.to_string(),
        ))
    })
}

/// Writes and reads back a file on the mount, umounts it with `umount DIR` (through
/// umount.fuse.atsfs), and checks that the daemon is gone when umount returns.
fn use_and_umount(dir: &Path, image: &Path, log: &Path) {
    let (source, fstype) = mountinfo(dir).expect("the mount is not in /proc/self/mountinfo");
    assert_eq!(fstype, "fuse.atsfs");
    assert_eq!(
        Path::new(&source),
        image,
        "the mount's source is not the device"
    );
    let file = dir.join("hello");
    std::fs::write(&file, b"written through mount(8)\n").expect("writing on the mount");
    assert_eq!(
        std::fs::read(&file).expect("reading it back"),
        b"written through mount(8)\n"
    );
    let daemon = find_daemon(dir).expect("no atsfs daemon for the mount");
    let out = run(Command::new("umount").arg(dir));
    assert!(out.status.success(), "umount failed");
    assert!(mountinfo(dir).is_none(), "still mounted after umount");
    let running = process_alive(daemon);
    assert!(
        wait_exit(daemon, Duration::from_secs(60)),
        "the daemon did not exit after umount; log:\n{}",
        read_log(log)
    );
    assert!(
        !running,
        "umount returned while the daemon (pid {daemon}) still ran; log:\n{}",
        read_log(log)
    );
}

/// The heartbeat slots of `image` that are not free, read right now (no watch).
fn slots_not_free(image: &Path) -> Vec<String> {
    let lun = atsfs::lun::FileLun::open(image, atsfs::lun::OpenMode::ReadOnly).unwrap();
    let status = atsfs::inspect::status(&lun, Some(Duration::ZERO)).unwrap();
    status
        .slots
        .iter()
        .filter(|s| s.state != atsfs::inspect::SlotState::Free)
        .map(|s| format!("slot {} {:?}", s.slot, s.state))
        .collect()
}

/// `umount DIR` returns only once the daemon has written back what was written (not
/// synced), released its heartbeat slot and exited: right after it, the daemon is
/// gone, no slot is live, `fsck -t atsfs` finds the volume clean without a "marked
/// live" note, and a fresh mount has the files. `atsfs umount` does the same for a
/// mount `atsfs mount` made, and fails (32) on what is not an atsfs mount.
#[test]
fn umount_waits_until_the_daemon_wrote_back_and_freed_its_slot() {
    require_fuse!();
    let Some(_helper) = SbinHelper::install() else {
        return;
    };
    let scratch = Scratch::new("system-umount");
    let bin_dir = scratch.mountpoint("bin");
    std::os::unix::fs::symlink(atsfs_bin(), bin_dir.join("fsck.atsfs")).unwrap();
    let image = scratch.image("vol.img", 256 << 20);
    let dir = scratch.mountpoint("mnt");
    let log = scratch.join("daemon.log");
    let options = format!("host_id={},log={}", new_host_id(), log.display());
    mount_t_atsfs(&image, &dir, &options, &log);
    let daemon = find_daemon(&dir).expect("no atsfs daemon for the mount");
    // Written, never synced: the kernel and the daemon hold it until the unmount.
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("big"), &big).unwrap();
    for i in 0..100 {
        std::fs::write(dir.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    assert!(
        !slots_not_free(&image).is_empty(),
        "the mount holds no slot"
    );

    let out = run(Command::new("umount").arg(&dir));
    assert!(out.status.success(), "umount failed");
    let running = process_alive(daemon);
    let live = slots_not_free(&image);
    assert!(
        wait_exit(daemon, Duration::from_secs(60)),
        "the daemon did not exit; log:\n{}",
        read_log(&log)
    );
    assert!(
        !running,
        "umount returned while the daemon (pid {daemon}) still ran; log:\n{}",
        read_log(&log)
    );
    assert!(live.is_empty(), "slots in use right after umount: {live:?}");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new("fsck")
        .env("PATH", path)
        .args(["-T", "-t", "atsfs"])
        .arg(&image));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("marked live"),
        "fsck right after umount saw a live slot"
    );

    // A fresh mount (by `atsfs mount`) has everything; `atsfs umount` unmounts it the
    // same way, given a relative path.
    let spec = common::MountSpec::in_scratch(&scratch, &image, "again");
    let mount = spec.mount();
    assert_eq!(std::fs::read(mount.join("big")).unwrap(), big);
    for i in 0..100 {
        assert_eq!(
            std::fs::read_to_string(mount.join(&format!("f{i}"))).unwrap(),
            format!("file {i}\n")
        );
    }
    std::fs::write(mount.join("more"), b"more").unwrap();
    let daemon = mount.daemon_pid().expect("no daemon for atsfs mount");
    let out = run(Command::new(atsfs_bin()).current_dir(scratch.path()).args([
        "umount",
        "-v",
        "again.mnt",
    ]));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !process_alive(daemon),
        "atsfs umount returned before the daemon exited"
    );
    assert!(slots_not_free(&image).is_empty());
    std::mem::forget(mount); // unmounted already; its drop would umount again

    // Not mounted, and not atsfs: umount(8)'s failure, 32.
    let out = run(Command::new(atsfs_bin()).arg("umount").arg(&dir));
    assert_eq!(out.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not mounted"));
    let out = run(Command::new(atsfs_bin()).args(["umount", "/proc"]));
    assert_eq!(out.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an atsfs mount"));
    common::assert_fsck_clean(&image);
}

#[test]
fn mount_t_atsfs_and_an_fstab_line_mount_as_fuse_atsfs_and_umount() {
    require_fuse!();
    let Some(_helper) = SbinHelper::install() else {
        return;
    };
    let scratch = Scratch::new("system-mount");
    let image = scratch.image("vol.img", 256 << 20);
    let dir = scratch.mountpoint("mnt");
    let log = scratch.join("daemon.log");
    let host = new_host_id();
    let options = format!("rw,_netdev,host_id={host},log={}", log.display());

    mount_t_atsfs(&image, &dir, &options, &log);
    // A remount reaches mount.fuse.atsfs (the type in mountinfo): refused clearly,
    // the mount left as it was.
    let out = run(Command::new("mount").args(["-o", "remount,rw"]).arg(&dir));
    assert_eq!(out.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("remount is not supported"));
    assert!(mountinfo(&dir).is_some());
    use_and_umount(&dir, &image, &log);

    // An fstab line, as an administrator writes it (a scratch fstab: mount -T).
    let fstab = scratch.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# scratch fstab\n{}  {}  atsfs  _netdev,nofail,x-systemd.after=network-online.target,host_id={host},log={}  0  2\n",
            image.display(),
            dir.display(),
            log.display()
        ),
    )
    .expect("writing the scratch fstab");
    let out = run(Command::new("mount").arg("-T").arg(&fstab).arg(&dir));
    assert!(
        out.status.success(),
        "mount DIR from fstab failed; log:\n{}",
        read_log(&log)
    );
    assert_eq!(
        std::fs::read(dir.join("hello")).expect("the first mount's file"),
        b"written through mount(8)\n"
    );
    use_and_umount(&dir, &image, &log);

    // A bad option fails the mount with mount(8)'s status 32 and atsfs's reason.
    let out = run(Command::new("mount")
        .args(["-t", "atsfs", "-o", "no_such_option"])
        .arg(&image)
        .arg(&dir));
    assert_eq!(out.status.code(), Some(32));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_option"));
    assert!(mountinfo(&dir).is_none());
    common::assert_fsck_clean(&image);
}

/// `fsck -t atsfs ARGS DEVICE` with fsck.atsfs found through PATH; its exit code.
fn fsck(bin_dir: &Path, args: &[&str], image: &Path) -> i32 {
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new("fsck")
        .env("PATH", path)
        .args(["-T", "-t", "atsfs"])
        .args(args)
        .arg(image));
    out.status.code().expect("fsck was killed")
}

/// Flips one bit of the image at `offset`.
fn flip(image: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, offset).unwrap();
}

#[test]
fn fsck_t_atsfs_maps_n_y_and_p_onto_check_and_repair() {
    require_fuse!();
    let scratch = Scratch::new("system-fsck");
    let bin_dir = scratch.mountpoint("bin");
    std::os::unix::fs::symlink(atsfs_bin(), bin_dir.join("fsck.atsfs")).unwrap();
    let image = scratch.image("vol.img", 256 << 20);
    let spec = common::MountSpec::in_scratch(&scratch, &image, "host");
    let mount = spec.mount();
    std::fs::write(mount.join("file"), b"some data").unwrap();
    std::fs::write(mount.join("kept"), b"kept").unwrap();
    let ino = std::fs::metadata(mount.join("file")).unwrap().ino();
    mount.unmount();

    assert_eq!(fsck(&bin_dir, &[], &image), 0, "a clean volume");
    assert_eq!(fsck(&bin_dir, &["-n"], &image), 0);
    assert_eq!(fsck(&bin_dir, &["-p"], &image), 0);
    assert_eq!(fsck(&bin_dir, &["-n", "-y"], &image), 16, "usage error");
    assert_eq!(
        fsck(&bin_dir, &["-n"], &scratch.join("missing.img")),
        8,
        "operational error"
    );

    let lun = atsfs::lun::FileLun::open(&image, atsfs::lun::OpenMode::ReadOnly).unwrap();
    let sb = atsfs::fs::read_superblock(&lun).unwrap();
    let geo = atsfs::format::Geometry::from_superblock(&sb);
    drop(lun);

    // Damage that loses no data (the backup superblock): -p repairs it alone.
    flip(&image, geo.backup_superblock() * 4096 + 100);
    assert_eq!(fsck(&bin_dir, &["-n"], &image), 4, "-n finds it");
    assert_eq!(fsck(&bin_dir, &["-n"], &image), 4, "-n changed nothing");
    assert_eq!(fsck(&bin_dir, &["-a"], &image), 1, "-a (preen) repairs it");
    assert_eq!(fsck(&bin_dir, &["-n"], &image), 0);

    // Damage that loses a file (its inode no longer decodes): -p leaves it alone,
    // -y repairs, and the next run finds nothing.
    flip(&image, geo.body_offset(ino) + 100);
    assert_eq!(fsck(&bin_dir, &["-n"], &image), 4);
    assert_eq!(
        fsck(&bin_dir, &["-p"], &image),
        4,
        "preen must not lose files"
    );
    assert_eq!(fsck(&bin_dir, &["-n"], &image), 4, "preen wrote nothing");
    assert_eq!(fsck(&bin_dir, &["-y"], &image), 1, "-y repairs");
    assert_eq!(
        fsck(&bin_dir, &["-y"], &image),
        0,
        "a second run finds nothing"
    );
    assert_eq!(fsck(&bin_dir, &[], &image), 0);

    // The other file is still there.
    let mount = spec.mount();
    assert_eq!(std::fs::read(mount.join("kept")).unwrap(), b"kept");
    assert!(!mount.join("file").exists());
    mount.unmount();
}

#[test]
fn fsck_p_skips_a_volume_a_live_host_has_mounted() {
    require_fuse!();
    let scratch = Scratch::new("system-preen-live");
    let bin_dir = scratch.mountpoint("bin");
    std::os::unix::fs::symlink(atsfs_bin(), bin_dir.join("fsck.atsfs")).unwrap();
    let image = scratch.image_with("vol.img", 256 << 20, &common::short_lease_opts());
    let spec = common::MountSpec::in_scratch(&scratch, &image, "host");
    let mount = spec.mount();
    let out = run(Command::new(bin_dir.join("fsck.atsfs"))
        .arg("-p")
        .arg(&image));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not checked"),
        "preen checked a volume in use"
    );
    // -y refuses to repair under it: fsck's operational error.
    let out = run(Command::new(bin_dir.join("fsck.atsfs"))
        .arg("-y")
        .arg(&image));
    assert_eq!(out.status.code(), Some(8));
    mount.unmount();
}

/// systemd's fstab generator, as at boot: an atsfs line with `_netdev` becomes a
/// mount unit of type atsfs wanted by remote-fs.target, and with fsck.atsfs in PATH
/// and pass 2 it requires systemd-fsck@ (which runs `fsck -a`, i.e. fsck.atsfs -a).
#[test]
fn systemds_fstab_generator_makes_a_remote_mount_unit_with_fsck() {
    let generator = Path::new("/usr/lib/systemd/system-generators/systemd-fstab-generator");
    if !generator.exists() {
        eprintln!("skipped: no {}", generator.display());
        return;
    }
    let scratch = Scratch::new("system-generator");
    let bin_dir = scratch.mountpoint("bin");
    std::os::unix::fs::symlink(atsfs_bin(), bin_dir.join("fsck.atsfs")).unwrap();
    let out_dir = scratch.mountpoint("units");
    let fstab = scratch.join("fstab");
    std::fs::write(
        &fstab,
        "/dev/disk/by-id/wwn-0x6001405a1b2c3d4e  /mnt/shared  atsfs  _netdev,nofail  0  2\n",
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new(generator)
        .env("SYSTEMD_FSTAB", &fstab)
        .env("PATH", path)
        .args([&out_dir, &out_dir, &out_dir]));
    assert!(out.status.success());
    let unit = std::fs::read_to_string(out_dir.join("mnt-shared.mount"))
        .expect("the generator made no mnt-shared.mount");
    for line in [
        "Type=atsfs",
        "What=/dev/disk/by-id/wwn-0x6001405a1b2c3d4e",
        "Options=_netdev,nofail",
        "Requires=systemd-fsck@dev-disk-by\\x2did-wwn\\x2d0x6001405a1b2c3d4e.service",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line} in:\n{unit}");
    }
    assert!(
        std::fs::symlink_metadata(out_dir.join("remote-fs.target.wants/mnt-shared.mount")).is_ok(),
        "_netdev did not make it a remote mount"
    );
}

/// `umount.fuse.atsfs DIR` as umount(8) runs it (a link named so in `bin_dir`), with
/// -v and `flags`.
/// `mount -t atsfs -o OPTIONS IMAGE DIR`, which must succeed (else the daemon's log
/// `log` is shown).
fn mount_t_atsfs(image: &Path, dir: &Path, options: &str, log: &Path) {
    let out = run(Command::new("mount")
        .args(["-t", "atsfs", "-o", options])
        .arg(image)
        .arg(dir));
    assert!(
        out.status.success(),
        "mount -t atsfs failed; log:\n{}",
        read_log(log)
    );
}

fn umount_helper(bin_dir: &Path, dir: &Path, flags: &[&str]) -> Output {
    let helper = bin_dir.join("umount.fuse.atsfs");
    if !helper.exists() {
        std::os::unix::fs::symlink(atsfs_bin(), &helper).unwrap();
    }
    run(Command::new(helper).arg(dir).arg("-v").args(flags))
}

/// A volume with a 2 s lease, so that a daemon stopped for a few seconds is fenced.
fn short_lease_image(scratch: &Scratch) -> PathBuf {
    let opts = atsfs::mkfs::MkfsOptions {
        heartbeat_interval: Duration::from_millis(250),
        lease: Duration::from_secs(2),
        ..atsfs::mkfs::MkfsOptions::default()
    };
    scratch.image_with("vol.img", 256 << 20, &opts)
}

/// The helper reports success only when the daemon released its slot: a daemon that
/// was stopped past its lease is fenced, cannot commit at the unmount and exits
/// with its slot still live; the helper says so (32) and the daemon's last words
/// (`atsfs[PID]: ...`, printed once it failed after "ok") are in the log. Another
/// daemon's failure lines in the shared log do not fail an unrelated umount.
#[test]
fn umount_fails_when_the_daemon_exits_without_releasing_its_slot() {
    require_fuse!();
    let scratch = Scratch::new("system-umount-fenced");
    let bin_dir = scratch.mountpoint("bin");
    let image = short_lease_image(&scratch);
    let log = scratch.join("shared.log");
    let mut spec = common::MountSpec::in_scratch(&scratch, &image, "a");
    spec.log = log.clone();

    // A clean unmount, with other daemons' failures in the log it shares.
    let mount = spec.mount();
    std::fs::write(mount.join("x"), b"hi\n").unwrap();
    let daemon = mount.daemon_pid().expect("no daemon");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "atsfs: mounting /dev/sdz: no such device").unwrap();
        writeln!(
            f,
            "atsfs[{}]: unmount could not write home",
            daemon + 100_000
        )
        .unwrap();
        writeln!(
            f,
            "2026-12-06T10:00:00Z ERROR atsfs::fs::meta: commit failed"
        )
        .unwrap();
    }
    let out = umount_helper(&bin_dir, mount.path(), &[]);
    assert_eq!(out.status.code(), Some(0), "log:\n{}", read_log(&log));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("released slot"),
        "the helper did not check the slot"
    );
    assert!(!process_alive(daemon));
    assert!(slots_not_free(&image).is_empty());
    std::mem::forget(mount);

    // Stopped past the lease: fenced.
    let mount = spec.mount();
    std::fs::write(mount.join("y"), b"hi\n").unwrap();
    let daemon = mount.daemon_pid().expect("no daemon");
    let pid = nix::unistd::Pid::from_raw(daemon);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = umount_helper(&bin_dir, mount.path(), &[]);
    std::mem::forget(mount);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(32), "log:\n{}", read_log(&log));
    assert!(
        stderr.contains("exited without releasing slot"),
        "the helper did not say the slot is still held"
    );
    assert!(!stderr.contains("wrote back"));
    assert!(mountinfo(&spec.mountpoint).is_none(), "still mounted");
    // umount(8) keeps its utab entry when the helper fails: the helper drops it.
    let target = format!("TARGET={} ", spec.mountpoint.display());
    let utab = std::fs::read_to_string("/run/mount/utab").unwrap_or_default();
    assert!(
        !utab.lines().any(|l| l.contains(&target)),
        "a utab entry outlived the mount:\n{utab}"
    );
    assert!(wait_exit(daemon, Duration::from_secs(30)));
    let live = slots_not_free(&image);
    assert!(
        !live.is_empty(),
        "no slot is held, yet the helper said one is"
    );
    let text = read_log(&log);
    assert!(
        text.contains(&format!("atsfs[{daemon}]: ")),
        "the daemon's last words are not in its log:\n{text}"
    );
}

/// Runs `command`, killed after `limit`: a helper that hangs on a stopped daemon
/// fails the test instead of hanging it.
fn run_within(command: &mut Command, limit: Duration) -> Output {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting a command");
    let pid = child.id() as i32;
    let watchdog = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while process_alive(pid) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        let hung = process_alive(pid);
        if hung {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        hung
    });
    let out = child.wait_with_output().expect("waiting for a command");
    assert!(!watchdog.join().unwrap(), "{command:?} hung");
    eprintln!(
        "$ {command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A stopped (hung) daemon's mount can be unmounted through the helper: the helper
/// does not ask the stopped daemon (which would pin the mount), unmounts, and says
/// the daemon is stopped (32: it has not written home). With a process waiting on
/// the daemon under the mount, the helper says the daemon is stopped (not "files
/// are open"), and -f aborts the connection and unmounts.
#[test]
fn umount_of_a_stopped_daemon_unmounts_and_says_so() {
    require_fuse!();
    let scratch = Scratch::new("system-umount-stopped");
    let bin_dir = scratch.mountpoint("bin");
    let image = short_lease_image(&scratch);
    let spec = common::MountSpec::in_scratch(&scratch, &image, "a");
    let helper = bin_dir.join("umount.fuse.atsfs");
    std::os::unix::fs::symlink(atsfs_bin(), &helper).unwrap();
    let stop = |pid: i32, signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    };
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};

    // Nothing else under the mount: a plain unmount goes through.
    let mount = spec.mount();
    std::fs::write(mount.join("x"), b"hi\n").unwrap();
    let daemon = mount.daemon_pid().expect("no daemon");
    stop(daemon, SIGSTOP);
    let out = run_within(
        Command::new(&helper).arg(mount.path()).arg("-v"),
        Duration::from_secs(30),
    );
    stop(daemon, SIGCONT);
    std::mem::forget(mount);
    assert_eq!(out.status.code(), Some(32));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is stopped"), "the helper did not say so");
    assert!(!stderr.contains("target is busy"));
    assert!(mountinfo(&spec.mountpoint).is_none(), "still mounted");
    assert!(wait_exit(daemon, Duration::from_secs(30)));

    // A process waits on the stopped daemon: busy, and why; -f unmounts.
    let mount = spec.mount();
    let daemon = mount.daemon_pid().expect("no daemon");
    stop(daemon, SIGSTOP);
    let mut waiter = Command::new("stat")
        .arg(mount.join("x"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = run_within(
        Command::new(&helper).arg(mount.path()).arg("-v"),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(32));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is stopped") && stderr.contains("-f"),
        "busy, but not said why"
    );
    assert!(mountinfo(&spec.mountpoint).is_some());
    let out = run_within(
        Command::new(&helper).arg(mount.path()).args(["-v", "-f"]),
        Duration::from_secs(30),
    );
    stop(daemon, SIGCONT);
    std::mem::forget(mount);
    let _ = waiter.wait();
    assert_eq!(
        out.status.code(),
        Some(32),
        "the daemon has not written home"
    );
    assert!(mountinfo(&spec.mountpoint).is_none(), "-f did not unmount");
    assert!(wait_exit(daemon, Duration::from_secs(30)));
}
