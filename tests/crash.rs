//! Crashes and bad volumes on a real FUSE mount.
//!
//! - `kill9_keeps_every_fsynced_file`: a writer process creates files and fsyncs each
//!   one while the daemon is killed with SIGKILL; the host mounts again (taking its
//!   slot back once the lease ran out) and every file whose fsync returned must be
//!   there, byte for byte; fsck must find the volume clean. Twice, so that the second
//!   recovery also replays over the first.
//! - a 64 MiB image of random bytes is refused by mount and by fsck, with a message
//!   and no panic;
//! - a volume whose primary superblock was zeroed still mounts, from the backup;
//! - on a Disk Paxos volume opened as a plain disk (no compare-and-write at all), a
//!   killed host is taken over by `atsfs recover`, and again by `atsfs fsck
//!   --repair`: both claim a slot of their own for the token.
//!
//! Needs root and /dev/fuse; without them each test prints "skipped" and passes.

mod common;

use common::{assert_fsck_clean, is_mounted, read_log, short_lease_opts, MountSpec, Scratch};
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// Where the writer child creates its files (set by the parent test).
const WRITER_DIR_ENV: &str = "ATSFS_TEST_WRITER_DIR";
/// The file the writer child appends each name to once its fsync returned.
const WRITER_RECORD_ENV: &str = "ATSFS_TEST_WRITER_RECORD";
/// Most files one writer makes (a bound; the kill comes long before).
const WRITER_FILES_MAX: u64 = 1_000_000;
/// How many fsynced files the parent waits for before it kills the daemon.
const FILES_BEFORE_KILL: usize = 200;

/// The content of writer file `index`: 1 byte to 16 KiB, a function of the index.
fn writer_content(index: u64) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(index);
    let mut bytes = vec![0u8; rng.gen_range(1..=16 * 1024)];
    rng.fill_bytes(&mut bytes);
    bytes
}

fn writer_name(index: u64) -> String {
    format!("f{index:07}")
}

/// The body of the writer child process. The parent runs this test binary again
/// with `--exact writer_child` and the two environment variables; run as an
/// ordinary test (without them) it does nothing.
#[test]
fn writer_child() {
    let (Some(dir), Some(record)) = (
        std::env::var_os(WRITER_DIR_ENV),
        std::env::var_os(WRITER_RECORD_ENV),
    ) else {
        return;
    };
    let (dir, record) = (PathBuf::from(dir), PathBuf::from(record));
    let mut record = OpenOptions::new()
        .create(true)
        .append(true)
        .open(record)
        .expect("opening the record");
    for index in 0..WRITER_FILES_MAX {
        let name = writer_name(index);
        let written = File::create(dir.join(&name)).and_then(|mut file| {
            file.write_all(&writer_content(index))?;
            // The file is durable once this returns (and not necessarily before).
            file.sync_all()
        });
        if let Err(e) = written {
            // Expected: the daemon was killed under us.
            eprintln!("writer: stopped at {name}: {e}");
            return;
        }
        writeln!(record, "{index}").expect("appending to the record");
    }
}

/// Starts the writer child on `dir`, recording into `record`.
fn start_writer(dir: &Path, record: &Path) -> Child {
    Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
        .env(WRITER_DIR_ENV, dir)
        .env(WRITER_RECORD_ENV, record)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the writer child")
}

fn recorded(record: &Path) -> Vec<u64> {
    fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|line| line.parse().expect("a number in the record"))
        .collect()
}

/// Waits until the writer recorded `count` files; panics if it stops before.
fn wait_for_records(writer: &mut Child, record: &Path, count: usize) {
    let started = Instant::now();
    while recorded(record).len() < count {
        if let Some(status) = writer.try_wait().expect("polling the writer") {
            panic!("the writer stopped ({status}) before writing {count} files");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the writer made fewer than {count} files in 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (bounded) for the writer to notice the dead mount and exit.
fn reap_writer(mut writer: Child) {
    let started = Instant::now();
    while writer.try_wait().expect("polling the writer").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            eprintln!("the writer is stuck on the dead mount; killing it");
            let _ = writer.kill();
            let _ = writer.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks that every recorded file of `dir` holds exactly what was written.
fn check_recorded(dir: &Path, record: &Path) -> usize {
    let indexes = recorded(record);
    for &index in &indexes {
        let path = dir.join(writer_name(index));
        let bytes = fs::read(&path)
            .unwrap_or_else(|e| panic!("{} was fsynced before the crash: {e}", path.display()));
        assert!(
            bytes == writer_content(index),
            "{} was fsynced before the crash but holds other bytes ({} instead of {})",
            path.display(),
            bytes.len(),
            writer_content(index).len()
        );
    }
    indexes.len()
}

#[test]
fn kill9_keeps_every_fsynced_file() {
    require_fuse!();
    let scratch = Scratch::new("kill9");
    let image = scratch.image_with("volume.img", 512 * MIB, &short_lease_opts());
    let spec = MountSpec::in_scratch(&scratch, &image, "host");
    let mut mount = spec.mount();
    let rounds = ["round-1", "round-2"];
    for (i, round) in rounds.iter().enumerate() {
        let dir = mount.join(round);
        fs::create_dir(&dir).expect("mkdir");
        let record = scratch.join(&format!("{round}.record"));
        let mut writer = start_writer(&dir, &record);
        wait_for_records(&mut writer, &record, FILES_BEFORE_KILL);
        let spec = mount.kill9();
        reap_writer(writer);

        // The same host id takes its slot back: at once when the dead daemon is gone
        // from this kernel, otherwise once its lease ran out.
        let started = Instant::now();
        mount = spec.mount();
        eprintln!(
            "{round}: mounted again {:?} after the crash",
            started.elapsed()
        );
        for earlier in &rounds[..=i] {
            let record = scratch.join(&format!("{earlier}.record"));
            let files = check_recorded(&mount.join(earlier), &record);
            eprintln!("{round}: all {files} fsynced files of {earlier} are intact");
        }
    }
    mount.unmount();
    assert_fsck_clean(&image);
}

/// Asserts that a failed command said something and did not panic.
fn assert_clear_refusal(what: &str, out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{what}: {}; stderr: {}", out.status, stderr.trim());
    assert!(!out.status.success(), "{what} accepted random bytes");
    assert!(out.status.code().is_some(), "{what} died of a signal");
    assert!(
        !stderr.contains("panicked") && !stdout.contains("panicked"),
        "{what} panicked:\n{stderr}"
    );
    assert!(!stderr.trim().is_empty(), "{what} failed without a message");
}

#[test]
fn random_bytes_are_refused_by_mount_and_fsck() {
    require_fuse!();
    let scratch = Scratch::new("random");
    let image = scratch.join("random.img");
    let mut bytes = vec![0u8; 64 * MIB as usize];
    SmallRng::seed_from_u64(64).fill_bytes(&mut bytes);
    fs::write(&image, &bytes).expect("writing the random image");
    let spec = MountSpec::in_scratch(&scratch, &image, "host");

    let out = spec.command().output().expect("running atsfs mount");
    assert_clear_refusal("atsfs mount", &out);
    assert!(!is_mounted(&spec.mountpoint), "random bytes got mounted");
    let log = read_log(&spec.log);
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");

    let out = spec
        .command()
        .arg("-f")
        .output()
        .expect("running atsfs mount -f");
    assert_clear_refusal("atsfs mount -f", &out);

    let out = common::fsck(&image);
    assert_clear_refusal("atsfs fsck", &out);
    assert!(
        matches!(out.status.code(), Some(4) | Some(8)),
        "atsfs fsck exits 4 (errors) or 8 (operational error), not {}",
        out.status
    );
}

#[test]
fn zeroed_primary_superblock_mounts_from_backup() {
    require_fuse!();
    let scratch = Scratch::new("backup-sb");
    let image = scratch.image("volume.img", 512 * MIB);
    let spec = MountSpec::in_scratch(&scratch, &image, "host");
    let mount = spec.mount();
    fs::write(mount.join("hello"), b"still here\n").expect("write");
    fs::create_dir(mount.join("dir")).expect("mkdir");
    mount.unmount();

    let file = OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("opening the image");
    file.write_all_at(&[0u8; 4096], 0)
        .expect("zeroing the primary superblock");
    file.sync_all().expect("fsync the image");
    drop(file);

    let mount = spec.mount();
    assert_eq!(
        fs::read(mount.join("hello")).expect("read after the mount from the backup"),
        b"still here\n"
    );
    assert!(mount.join("dir").is_dir());
    fs::write(mount.join("new"), b"written with the backup superblock\n").expect("write");
    let mount = mount.remount();
    assert_eq!(
        fs::read(mount.join("new")).expect("read"),
        b"written with the backup superblock\n"
    );
    mount.unmount();
}

/// `atsfs` with the image opened as a plain disk (`ATSFS_ATS_EMULATION=off`).
fn atsfs_on_plain_disk(args: &[&str], image: &Path) -> std::process::Output {
    Command::new(common::atsfs_bin())
        .args(args)
        .arg(image)
        .env(atsfs::lun::ATS_EMULATION_ENV, "off")
        .output()
        .expect("running atsfs")
}

/// Mounts `spec`, writes and fsyncs `name`, and kills the daemon.
fn crash_with_a_file(spec: &MountSpec, name: &str) {
    let mount = spec.mount();
    let mut f = File::create(mount.join(name)).expect("create");
    f.write_all(name.as_bytes()).expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    mount.kill9();
}

/// A Disk Paxos volume in the scratch directory, and a host of it that opens the
/// image as a plain disk (no compare-and-write at all).
fn disk_paxos_volume(scratch: &Scratch) -> (PathBuf, MountSpec) {
    // A recoverer's claim of the dead slot may wait out the killed host's token
    // (token 1 s + margin 250 ms) and then settles for half a lease (2 s), and its
    // hold on the slot counts from before both: it must fit in lease - interval
    // (3.75 s). With a 2 s lease and 500 ms interval it does not (1.625 s > 1.5 s):
    // docs/review/paxos-2026-12-05.md, finding 7.
    let opts = atsfs::mkfs::MkfsOptions {
        ats_mode: atsfs::format::ATS_MODE_DISK_PAXOS,
        heartbeat_interval: Duration::from_millis(250),
        lease: Duration::from_secs(4),
        ..atsfs::mkfs::MkfsOptions::default()
    };
    let image = scratch.image_with("volume.img", 256 * MIB, &opts);
    let spec = MountSpec::in_scratch(scratch, &image, "host").on_plain_disk();
    (image, spec)
}

fn show(out: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The killed host's fsynced file reads back through a new mount; fsck is clean.
fn assert_file_survived(image: &Path, spec: &MountSpec, name: &str) {
    assert_fsck_clean(image);
    let mount = spec.mount();
    assert_eq!(fs::read(mount.join(name)).expect("read"), name.as_bytes());
    mount.unmount();
    assert_fsck_clean(image);
}

#[test]
fn atsfs_recover_takes_over_a_killed_host_on_a_disk_paxos_plain_disk() {
    require_fuse!();
    let scratch = Scratch::new("paxos-recover");
    let (image, spec) = disk_paxos_volume(&scratch);
    crash_with_a_file(&spec, "before-recover");
    // No host left: `atsfs recover` claims a slot of its own for the token and
    // replays the killed host's journal.
    let out = atsfs_on_plain_disk(&["recover"], &image);
    let text = show(&out);
    assert!(out.status.success(), "atsfs recover: {text}");
    assert!(
        text.contains("slot 0: recovered") && text.contains("1 slot(s) recovered"),
        "{text}"
    );
    assert_file_survived(&image, &spec, "before-recover");
}

#[test]
fn atsfs_fsck_repair_takes_over_a_killed_host_on_a_disk_paxos_plain_disk() {
    require_fuse!();
    let scratch = Scratch::new("paxos-repair");
    let (image, spec) = disk_paxos_volume(&scratch);
    crash_with_a_file(&spec, "before-repair");
    let out = atsfs_on_plain_disk(&["fsck", "--repair"], &image);
    let text = show(&out);
    assert_eq!(out.status.code(), Some(1), "errors corrected: {text}");
    assert!(text.contains("dead hosts recovered"), "{text}");
    assert!(
        !text.contains("marked live"),
        "the repair's own slot is not reported: {text}"
    );
    assert_file_survived(&image, &spec, "before-repair");
}
