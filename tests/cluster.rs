//! Two `atsfs mount` daemons (hosts A and B, different host ids) on one image file:
//! the cluster acceptance scenario, through real FUSE mounts.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGE_BYTES: u64 = 512 << 20;

fn two_hosts(name: &str) -> (Scratch, PathBuf, Mount, Mount) {
    let scratch = Scratch::new(name);
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &short_lease_opts());
    let a = MountSpec::in_scratch(&scratch, &image, "a").mount();
    let b = MountSpec::in_scratch(&scratch, &image, "b").mount();
    (scratch, image, a, b)
}

/// Creates `count` files named PREFIX-i in `dir`.
fn create_many(dir: PathBuf, prefix: &'static str, count: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for i in 0..count {
            let path = dir.join(format!("{prefix}-{i}"));
            File::create(&path)
                .and_then(|mut f| f.write_all(prefix.as_bytes()))
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        }
    })
}

/// Tries O_CREAT|O_EXCL on every name (from the last one when `reverse`, so that two
/// racers meet in the middle); returns the names this host won.
fn race_exclusive(
    dir: PathBuf,
    names: usize,
    reverse: bool,
) -> std::thread::JoinHandle<Vec<usize>> {
    std::thread::spawn(move || {
        let mut won = Vec::new();
        let order: Vec<usize> = if reverse {
            (0..names).rev().collect()
        } else {
            (0..names).collect()
        };
        for i in order {
            let path = dir.join(format!("race-{i}"));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(_) => won.push(i),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => panic!("O_EXCL create of {}: {e}", path.display()),
            }
        }
        won
    })
}

#[test]
fn two_hosts_share_a_volume_through_fuse() {
    require_fuse!();
    let (_scratch, image, a, b) = two_hosts("cluster-share");

    // A file written on A is read on B within 4 s.
    fs::write(a.join("hello"), b"written on host A").expect("write on A");
    let started = Instant::now();
    loop {
        match read_all(&b.join("hello")) {
            Ok(data) if data == b"written on host A" => break,
            other if started.elapsed() < Duration::from_secs(4) => {
                let _ = other;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => panic!("B did not see A's file within 4 s: {other:?}"),
        }
    }
    eprintln!("B read A's file after {:?}", started.elapsed());

    // Both create 500 files in one directory at the same time.
    fs::create_dir(a.join("shared")).expect("mkdir");
    let started = Instant::now();
    let on_a = create_many(a.join("shared"), "a", 500);
    let on_b = create_many(b.join("shared"), "b", 500);
    on_a.join().expect("creates on A");
    on_b.join().expect("creates on B");
    eprintln!(
        "1000 creates on two hosts in one directory took {:?}",
        started.elapsed()
    );
    for mount in [&a, &b] {
        let count = fs::read_dir(mount.join("shared")).expect("readdir").count();
        assert_eq!(
            count,
            1000,
            "{} lists {count} entries",
            mount.path().display()
        );
    }

    // O_EXCL races on the same 200 names: every name is won exactly once.
    fs::create_dir(a.join("race")).expect("mkdir");
    let on_a = race_exclusive(a.join("race"), 200, false);
    let on_b = race_exclusive(b.join("race"), 200, true);
    let (won_a, won_b) = (
        on_a.join().expect("race on A"),
        on_b.join().expect("race on B"),
    );
    let mut all: Vec<usize> = won_a.iter().chain(&won_b).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..200).collect::<Vec<_>>(),
        "A won {} and B won {}",
        won_a.len(),
        won_b.len()
    );
    eprintln!("O_EXCL race: A won {}, B won {}", won_a.len(), won_b.len());

    // A holds a file open for writing: B's open for writing fails with EBUSY.
    let mut held = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("vm.disk"))
        .expect("open on A");
    held.write_all(b"AAAAAAAA").expect("write on A");
    let err = OpenOptions::new()
        .write(true)
        .open(b.join("vm.disk"))
        .expect_err("B must not open it for writing");
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    drop(held);
    // The kernel tells the daemon about a close (FUSE release) just after close()
    // returns, so the other host may need a moment to see it.
    let (mut on_b, waited) = open_for_writing_within(&b.join("vm.disk"), Duration::from_secs(2));
    eprintln!("B could open for writing {waited:?} after A closed");
    on_b.write_all(b"BBBBBBBB").expect("B overwrites");
    drop(on_b);
    assert_eq!(
        read_within(&a.join("vm.disk"), Duration::from_secs(2)),
        b"BBBBBBBB"
    );

    // A third mount with A's host UUID is refused.
    let scratch_b = a.spec().clone();
    let third = MountSpec {
        mountpoint: scratch_b.mountpoint.with_extension("third"),
        log: scratch_b.log.with_extension("third.log"),
        ..scratch_b
    };
    fs::create_dir_all(&third.mountpoint).expect("mount point");
    let out = third.command().output().expect("running atsfs mount");
    assert!(
        !out.status.success(),
        "a second mount with A's host id must be refused"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already mounted"),
        "unclear refusal: {stderr}"
    );

    a.unmount();
    b.unmount();
    assert_fsck_clean(&image);
}

#[test]
fn status_lists_both_hosts_live() {
    require_fuse!();
    let (_scratch, image, a, b) = two_hosts("cluster-status");
    let out = Command::new(atsfs_bin())
        .arg("status")
        .arg("--json")
        .arg(&image)
        .output()
        .expect("atsfs status");
    assert!(
        out.status.success(),
        "atsfs status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let live = text.matches("\"live\"").count();
    assert_eq!(live, 2, "expected two live slots in:\n{text}");
    a.unmount();
    b.unmount();
}

fn recovery_opts() -> atsfs::mkfs::MkfsOptions {
    atsfs::mkfs::MkfsOptions {
        heartbeat_interval: Duration::from_millis(500),
        lease: Duration::from_secs(2),
        ..atsfs::mkfs::MkfsOptions::default()
    }
}

#[test]
fn a_killed_host_is_recovered_by_the_survivor() {
    require_fuse!();
    let scratch = Scratch::new("cluster-kill");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &recovery_opts());
    let a = MountSpec::in_scratch(&scratch, &image, "a").mount();
    let b = MountSpec::in_scratch(&scratch, &image, "b").mount();
    fs::create_dir(a.join("fsynced")).expect("mkdir");
    for i in 0..200 {
        let mut f = File::create(a.join(&format!("fsynced/f{i}"))).expect("create");
        f.write_all(format!("file {i} from host A").as_bytes())
            .expect("write");
        f.sync_all().expect("fsync");
    }
    let mut held = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("held"))
        .expect("open");
    held.write_all(b"A holds this").expect("write");
    held.sync_all().expect("fsync");
    let a_spec = a.kill9();
    let killed = Instant::now();
    drop(held);
    // B takes the file over within lease + 2 s of the kill.
    let (mut on_b, _) = open_for_writing_within(&b.join("held"), Duration::from_secs(10));
    let took = killed.elapsed();
    eprintln!("B opened A's file for writing {took:?} after the kill");
    // On Disk Paxos the recoverer also confirms its takeover of the slot after
    // fresh + 2 io_timeouts (the delta rule: 625 ms here) and may wait out the token
    // the killed host kept (token + margin, 3 io_timeouts: 750 ms here; io_timeout is
    // an eighth of the lease): docs/locking.md, "Disk Paxos test-and-set".
    let bound = if common::disk_paxos() {
        Duration::from_millis(4000 + 1000 + 625)
    } else {
        Duration::from_secs(4)
    };
    assert!(
        took <= bound,
        "took {took:?}, more than lease + 2 s (+ the Disk Paxos waits)"
    );
    on_b.write_all(b"B took over").expect("write on B");
    drop(on_b);
    // `atsfs status` no longer shows A live.
    let out = Command::new(atsfs_bin())
        .arg("status")
        .arg("--json")
        .arg(&image)
        .output()
        .expect("atsfs status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let a_live = status["slots"].as_array().expect("slots").iter().any(|s| {
        s["host_uuid"] == a_spec.host_id.as_str()
            && s["state"].as_str().is_some_and(|st| st.starts_with("live"))
    });
    assert!(!a_live, "A still shows live: {status}");
    for i in 0..200 {
        let data = read_all(&b.join(&format!("fsynced/f{i}"))).expect("fsynced file on B");
        assert_eq!(data, format!("file {i} from host A").as_bytes());
    }
    // A comes back with a new generation and sees B's write.
    let a = a_spec.mount();
    // B overwrote the first 11 of A's 12 bytes.
    assert_eq!(
        read_within(&a.join("held"), Duration::from_secs(2)),
        b"B took overs"
    );
    a.unmount();
    b.unmount();
    assert_fsck_clean(&image);
}

#[test]
fn a_host_stopped_past_its_lease_never_writes_again() {
    require_fuse!();
    let scratch = Scratch::new("cluster-stop");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &recovery_opts());
    let a = MountSpec::in_scratch(&scratch, &image, "a").mount();
    let b = MountSpec::in_scratch(&scratch, &image, "b").mount();
    let target = a.join("log");
    let writer = {
        let target = target.clone();
        std::thread::spawn(move || {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&target)
                .expect("open on A");
            let mut written = 0u64;
            loop {
                match file
                    .write_all(b"A writes a line\n")
                    .and_then(|_| file.sync_data())
                {
                    Ok(()) => written += 1,
                    Err(e) => return (written, e),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // Readers on A whose pages sit in A's kernel page cache: of the file A writes,
    // and of one it only reads.
    let reader = File::open(&target).expect("open for reading on A");
    let mut first = [0u8; 16];
    reader.read_exact_at(&mut first, 0).expect("read on A");
    assert_eq!(&first, b"A writes a line\n");
    fs::write(b.join("still"), b"old bytes, read on A").expect("write on B");
    let still = File::open(a.join("still")).expect("open for reading on A");
    still.read_exact_at(&mut first, 0).expect("read on A");
    assert_eq!(&first, b"old bytes, read ");
    let pid = a.daemon_pid().expect("A's daemon");
    // SAFETY: signals to our own daemon.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    // Meanwhile B recovers A and writes a marker into the file.
    let (mut on_b, _) = open_for_writing_within(&b.join("log"), Duration::from_secs(10));
    on_b.write_all(b"MARKER FROM B\n").expect("marker");
    on_b.sync_all().expect("fsync marker");
    drop(on_b);
    let (mut on_b, _) = open_for_writing_within(&b.join("still"), Duration::from_secs(10));
    on_b.write_all(b"NEW BYTES FROM B").expect("overwrite on B");
    on_b.sync_all().expect("fsync on B");
    drop(on_b);
    let remaining = Duration::from_secs(6).saturating_sub(stopped.elapsed());
    std::thread::sleep(remaining);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let (written, err) = writer.join().expect("writer thread");
    eprintln!("A's writer wrote {written} lines, then: {err}");
    // A lost its lease: it answers EIO, not what it had cached (old bytes, an old size,
    // an old listing), through its own caches and through the kernel's.
    let mut again = [0u8; 16];
    let read = reader.read_exact_at(&mut again, 0);
    assert_eq!(
        read.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "a read on A after its lease ran out: {:?}",
        String::from_utf8_lossy(&again)
    );
    let read = still.read_exact_at(&mut again, 0);
    assert_eq!(
        read.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "a read of cached pages on A after its lease ran out: {:?}",
        String::from_utf8_lossy(&again)
    );
    drop(still);
    let stat = fs::metadata(&target);
    assert_eq!(
        stat.as_ref().map(|m| m.len()).map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "stat on A after its lease ran out"
    );
    let listing = fs::read_dir(a.path()).and_then(|d| d.collect::<Result<Vec<_>, _>>());
    assert_eq!(
        listing
            .as_ref()
            .map(|l| l.len())
            .map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "readdir on A after its lease ran out"
    );
    drop(reader);
    // B's marker stays: A wrote nothing after it was fenced.
    let data = read_all(&b.join("log")).expect("read on B");
    assert!(
        data.starts_with(b"MARKER FROM B\n"),
        "B's marker was overwritten: {:?}",
        String::from_utf8_lossy(&data[..data.len().min(64)])
    );
    drop(a);
    b.unmount();
    assert_fsck_clean(&image);
}

#[test]
fn eight_rounds_of_kill_9_among_three_hosts_lose_no_fsynced_file() {
    require_fuse!();
    let scratch = Scratch::new("cluster-rounds");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &recovery_opts());
    let mut hosts: Vec<Option<Mount>> = ["a", "b", "c"]
        .iter()
        .map(|name| Some(MountSpec::in_scratch(&scratch, &image, name).mount()))
        .collect();
    let mut specs: Vec<MountSpec> = hosts.iter().flatten().map(|m| m.spec().clone()).collect();
    let mut fsynced: Vec<(String, Vec<u8>)> = Vec::new();
    // A fixed pseudo-random victim order (no RNG dependency in the tests).
    let victims = [1usize, 0, 2, 2, 1, 0, 1, 2];
    for (round, &victim) in victims.iter().enumerate() {
        // Every host writes and fsyncs files, each in its own directory.
        for (h, mount) in hosts.iter().enumerate() {
            let mount = mount.as_ref().expect("all hosts are up between rounds");
            let dir = mount.join(&format!("host{h}"));
            fs::create_dir_all(&dir).expect("mkdir");
            for i in 0..10 {
                let name = format!("host{h}/r{round}-{i}");
                let content = format!("round {round} file {i} of host {h}").into_bytes();
                let mut f = File::create(mount.join(&name)).expect("create");
                f.write_all(&content).expect("write");
                f.sync_all().expect("fsync");
                fsynced.push((name, content));
            }
        }
        let killed = hosts[victim].take().expect("victim is up");
        specs[victim] = killed.kill9();
        // A survivor reads everything fsynced so far (it recovers the victim if it
        // needs the victim's locks).
        let survivor = hosts.iter().flatten().next().expect("a survivor");
        for (name, content) in &fsynced {
            let data = read_within(&survivor.join(name), Duration::from_secs(2));
            assert_eq!(&data, content, "round {round}: {name}");
        }
        hosts[victim] = Some(specs[victim].mount());
    }
    for mount in hosts.into_iter().flatten() {
        mount.unmount();
    }
    assert_fsck_clean(&image);
}

/// Waits (bounded) until `atsfs fsck` of the mounted volume lists no file unlinked
/// while open: the survivor recovered the killed host and reclaimed its orphans.
fn wait_orphans_reclaimed(image: &Path, limit: Duration) {
    let started = Instant::now();
    loop {
        let out = fsck(image);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() == Some(0) && !text.contains("unlinked while open") {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "the killed host's unlinked open file was not reclaimed within {limit:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn files_unlinked_while_open_on_a_killed_host_are_reclaimed_by_the_survivor() {
    require_fuse!();
    let scratch = Scratch::new("cluster-orphans");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &recovery_opts());
    let a = MountSpec::in_scratch(&scratch, &image, "a").mount();
    let b = MountSpec::in_scratch(&scratch, &image, "b").mount();
    // "only-a" is open on A alone; "both" is open on A and on B. A unlinks both.
    for name in ["only-a", "both"] {
        let mut f = File::create(a.join(name)).expect("create");
        f.write_all(&vec![b'x'; 1 << 20]).expect("write");
        f.sync_all().expect("fsync");
    }
    let held_a = File::open(a.join("only-a")).expect("open on A");
    let held_both_a = File::open(a.join("both")).expect("open on A");
    let mut held_both_b = File::open(b.join("both")).expect("open on B");
    fs::remove_file(a.join("only-a")).expect("unlink on A");
    fs::remove_file(a.join("both")).expect("unlink on A");
    File::create(a.join("marker"))
        .and_then(|f| f.sync_all())
        .expect("fsync commits the unlinks");
    let _a_spec = a.kill9();
    drop(held_a);
    drop(held_both_a);
    // B recovers A and frees "only-a"; "both" stays while B has it open.
    let mut data = Vec::new();
    held_both_b.read_to_end(&mut data).expect("B still reads");
    assert_eq!(data.len(), 1 << 20);
    drop(held_both_b);
    wait_orphans_reclaimed(&image, Duration::from_secs(30));
    b.unmount();
    assert_fsck_clean(&image);
}

#[test]
fn a_host_reads_all_of_another_hosts_append_within_its_attribute_ttl() {
    require_fuse!();
    let scratch = Scratch::new("append-after-stat");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &short_lease_opts());
    // Long TTLs: without invalidation, B's kernel would still trust the old size.
    let ttls = "attr_timeout=60,entry_timeout=60";
    let a = MountSpec::in_scratch(&scratch, &image, "a").mount_with_options(ttls);
    let b = MountSpec::in_scratch(&scratch, &image, "b").mount_with_options(ttls);
    let (on_a, on_b) = (a.join("f"), b.join("f"));
    let first = vec![b'1'; 3000];
    fs::write(&on_a, &first).expect("write on a");
    let wait = Duration::from_secs(30);
    assert_eq!(read_within(&on_b, wait), first, "b reads a's file");
    assert_eq!(fs::metadata(&on_b).expect("stat on b").len(), 3000);
    let appended = vec![b'2'; 5000];
    let mut file = open_for_writing_within(&on_a, wait).0;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).expect("seek to the end");
    file.write_all(&appended).expect("append on a");
    drop(file);
    let mut expected = first.clone();
    expected.extend_from_slice(&appended);
    let seen = read_within(&on_b, wait);
    assert_eq!(
        (seen.len(), seen == expected),
        (expected.len(), true),
        "b read {} bytes of a's {}",
        seen.len(),
        expected.len()
    );
    assert_eq!(fs::metadata(&on_b).expect("stat on b").len(), 8000);
    b.unmount();
    a.unmount();
}

#[test]
fn a_name_another_host_moved_away_and_reused_is_looked_up_again_within_the_entry_ttl() {
    require_fuse!();
    let scratch = Scratch::new("replaced-name");
    let image = scratch.image_with("volume.img", IMAGE_BYTES, &short_lease_opts());
    // Names are not invalidated (a notification that waits for a directory's lock
    // could hang a killed daemon's mount for good): B's kernel maps "n" to the inode
    // that moved away (still alive as "m") until the entry TTL (1 s) runs out, then
    // looks the name up again. Attributes are cached for long to show they do not
    // keep the old name alive.
    let ttls = "attr_timeout=60,entry_timeout=1";
    let a = MountSpec::in_scratch(&scratch, &image, "a").mount_with_options(ttls);
    let b = MountSpec::in_scratch(&scratch, &image, "b").mount_with_options(ttls);
    fs::create_dir(a.join("d")).expect("mkdir on a");
    fs::write(a.join("d/n"), b"old").expect("write on a");
    let wait = Duration::from_secs(30);
    assert_eq!(read_within(&b.join("d/n"), wait), b"old");
    fs::rename(a.join("d/n"), a.join("d/m")).expect("rename n to m on a");
    fs::write(a.join("d/n"), b"new").expect("write a new n on a");
    let started = Instant::now();
    loop {
        let seen = read_within(&b.join("d/n"), wait);
        if seen == b"new" {
            break;
        }
        assert_eq!(seen, b"old", "b read neither version of d/n");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "b still maps d/n to the moved inode after 10 s (entry TTL 1 s)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("b saw the new d/n after {:?}", started.elapsed());
    assert_eq!(read_within(&b.join("d/m"), wait), b"old");
    b.unmount();
    a.unmount();
}
