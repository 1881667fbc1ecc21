//! Mount options through real FUSE mounts: a read-only host next to a read-write
//! one (`-o ro`), access times (`relatime`, the default), and quiet logs (an ioctl
//! the daemon does not implement answers ENOTTY without a log line).

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

const IMAGE_BYTES: u64 = 256 << 20;

fn erofs<T: std::fmt::Debug>(what: &str, result: std::io::Result<T>) {
    match result {
        Ok(v) => panic!("{what} on a read-only mount succeeded: {v:?}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
    }
}

/// The lines of a daemon log at WARN or ERROR.
fn warnings(log: &Path) -> Vec<String> {
    read_log(log)
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

#[test]
fn read_only_host_reads_a_writers_files_and_refuses_every_change() {
    require_fuse!();
    let scratch = Scratch::new("ro");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &short_lease_opts());
    let rw = MountSpec::in_scratch(&scratch, &image, "rw").mount();
    fs::create_dir(rw.join("d")).expect("mkdir");
    let mut file = File::create(rw.join("d/f")).expect("create");
    file.write_all(b"written by rw").expect("write");
    file.sync_all().expect("fsync");
    drop(file);

    let ro = MountSpec::in_scratch(&scratch, &image, "ro")
        .mount_with_options("ro,nosuid,nodev,noexec,attr_timeout=0,entry_timeout=0");
    let mounts = fs::read_to_string("/proc/self/mounts").expect("mounts");
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == ro.path().to_str())
        .expect("the read-only mount in /proc/self/mounts");
    assert!(
        line.split(' ').nth(3).is_some_and(|o| o.starts_with("ro,")),
        "{line}"
    );
    // The kernel's own per-mount flags, as fstab lines often ask for them.
    let flags: Vec<&str> = line.split(' ').nth(3).unwrap_or("").split(',').collect();
    for flag in ["nosuid", "nodev", "noexec"] {
        assert!(flags.contains(&flag), "{flag} missing: {line}");
    }
    let vfs = nix::sys::statvfs::statvfs(ro.path()).expect("statvfs");
    assert!(vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));

    assert_eq!(fs::read(ro.join("d/f")).expect("read"), b"written by rw");
    erofs("create", File::create(ro.join("d/new")));
    erofs(
        "open for writing",
        OpenOptions::new().write(true).open(ro.join("d/f")),
    );
    erofs("mkdir", fs::create_dir(ro.join("d/sub")));
    erofs("unlink", fs::remove_file(ro.join("d/f")));
    erofs("rename", fs::rename(ro.join("d/f"), ro.join("d/g")));
    erofs("symlink", std::os::unix::fs::symlink("f", ro.join("d/l")));
    erofs("link", fs::hard_link(ro.join("d/f"), ro.join("d/h")));
    erofs(
        "chmod",
        fs::set_permissions(
            ro.join("d/f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        ),
    );

    // The writer goes on; the reader sees what it commits.
    let mut file = OpenOptions::new()
        .append(true)
        .open(rw.join("d/f"))
        .expect("open for append");
    file.write_all(b", then more").expect("append");
    file.sync_all().expect("fsync");
    drop(file);
    File::create(rw.join("d/g"))
        .expect("create g")
        .sync_all()
        .expect("fsync g");
    assert_eq!(
        fs::read(ro.join("d/f")).expect("read again"),
        b"written by rw, then more"
    );
    assert!(ro.join("d/g").exists(), "the writer's new file");

    let ro_log = ro.spec().log.clone();
    ro.unmount();
    rw.unmount();
    assert_eq!(warnings(&ro_log), Vec::<String>::new());
    assert_fsck_clean(&image);
}

#[test]
fn reads_update_atime_as_relatime_and_ioctls_are_quiet() {
    require_fuse!();
    let scratch = Scratch::new("atime");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let m = MountSpec::in_scratch(&scratch, &image, "m").mount_with_options("attr_timeout=0");
    let path = m.join("f");
    fs::write(&path, b"data").expect("write");
    // An atime two days old, older than the mtime: the next read updates it.
    let day = Duration::from_secs(86400);
    let file = File::options().write(true).open(&path).expect("open");
    let old = fs::FileTimes::new()
        .set_accessed(SystemTime::now() - 2 * day)
        .set_modified(SystemTime::now() - day);
    file.set_times(old).expect("utimes");
    drop(file);
    let before = fs::metadata(&path)
        .expect("stat")
        .accessed()
        .expect("atime");
    assert!(before < SystemTime::now() - day);
    assert_eq!(fs::read(&path).expect("read"), b"data");
    let after = fs::metadata(&path)
        .expect("stat")
        .accessed()
        .expect("atime");
    assert!(
        after > SystemTime::now() - Duration::from_secs(600),
        "{after:?}"
    );
    // Newer than the mtime and fresh: the next read leaves it.
    fs::read(&path).expect("read again");
    let again = fs::metadata(&path)
        .expect("stat")
        .accessed()
        .expect("atime");
    assert_eq!(again, after);

    // An ioctl nobody implements (TCGETS, as Python's open() asks): ENOTTY, no log.
    let file = File::open(&path).expect("open");
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    for _ in 0..50 {
        // SAFETY: TCGETS writes at most one termios into the buffer we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TCGETS, termios.as_mut_ptr()) };
        assert_eq!(rc, -1);
        assert_eq!(last_errno(), libc::ENOTTY);
    }
    drop(file);
    let log = m.spec().log.clone();
    m.unmount();
    assert_eq!(warnings(&log), Vec::<String>::new());
}
