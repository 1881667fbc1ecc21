//! Crash-point tests: record every write of a workload, cut the log at every point
//! (and tear the last write), recover, and check that every fsynced file is intact
//! and the volume is consistent.

use super::tests::fresh_volume;
use super::*;
use crate::cluster::HostUuid;
use crate::format::{encode_padded, Geometry, HeartbeatSlot, OnDisk};
use crate::lun::{
    crash_image, durable_image, flushes_at_cut, FaultConfig, FaultLun, Lun, MemLun, WriteRecord,
};

const REG: u32 = libc::S_IFREG | 0o644;

/// A file whose fsync returned: its content, and how much of the log existed then.
struct Durable {
    name: String,
    content: Vec<u8>,
    records_before: usize,
    flushes_before: u64,
}

struct Recorded {
    /// Transactions sealed for a group commit during the workload.
    seals: u64,
    /// Groups written by the committer thread during the workload.
    pipelined: u64,
    base: Vec<u8>,
    records: Vec<WriteRecord>,
    flush_count: u64,
    durable: Vec<Durable>,
}

fn content_of(i: usize) -> Vec<u8> {
    (0..(i * 977 % 9000 + 1))
        .map(|b| (b * 31 + i) as u8)
        .collect()
}

/// Runs a workload of creates, writes, renames, unlinks and fsyncs (of every
/// `fsync_every`-th file) on a recording LUN.
fn record_workload(files: usize, fsync_every: usize) -> Recorded {
    // 2 MiB journals when transactions are grouped (a 1 MiB one takes one at a time).
    let mem = if fsync_every > 2 {
        volume_with_journal(16 << 20, 2 << 20)
    } else {
        fresh_volume(12 << 20)
    };
    let base = mem.snapshot();
    let fault = Arc::new(FaultLun::new(mem.clone(), FaultConfig::default()));
    fault.start_recording();
    let lun: Arc<dyn Lun> = fault.clone();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.commit_interval = std::time::Duration::from_secs(3600);
    let fs = Fs::mount(lun, options).expect("mount");
    let root = fs.root();
    let dir = fs.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
    let mut durable = Vec::new();
    for i in 0..files {
        let name = format!("file-{i}");
        let parent = if i % 2 == 0 { root } else { dir };
        let ino = fs
            .mknod(parent, name.as_bytes(), REG, 0, 0, 0)
            .expect("create")
            .ino;
        let content = content_of(i);
        fs.write_data(ino, 0, &content).expect("write");
        if i % 3 == 0 {
            // An unsynced rename and unlink along the way.
            fs.rename(
                parent,
                name.as_bytes(),
                parent,
                format!("{name}-renamed").as_bytes(),
                0,
            )
            .expect("rename");
            fs.rename(
                parent,
                format!("{name}-renamed").as_bytes(),
                parent,
                name.as_bytes(),
                0,
            )
            .expect("rename back");
            let tmp = fs.mknod(parent, b"tmp", REG, 0, 0, 0).expect("tmp").ino;
            fs.write_data(tmp, 0, &[9; 5000]).expect("tmp write");
            fs.unlink(parent, b"tmp").expect("unlink");
        }
        if i % fsync_every == 0 {
            fs.fsync(ino, false).expect("fsync");
            durable.push(Durable {
                name: if parent == dir {
                    format!("d/{name}")
                } else {
                    name
                },
                content,
                records_before: fault.records().len(),
                flushes_before: fault.flush_count(),
            });
        }
    }
    fault.stop_recording();
    let records = fault.records();
    let flush_count = fault.flush_count();
    let stats = fs.stats().expect("stats");
    drop(fs);
    Recorded {
        seals: stats.seals,
        pipelined: stats.pipelined,
        base,
        records,
        flush_count,
        durable,
    }
}

fn volume_with_journal(bytes: u64, journal_bytes: u64) -> Arc<MemLun> {
    let lun = Arc::new(MemLun::new(bytes, 512));
    let opts = crate::mkfs::MkfsOptions {
        max_hosts: 2,
        heartbeat_interval: std::time::Duration::from_millis(100),
        lease: std::time::Duration::from_millis(1000),
        journal_bytes: Some(journal_bytes),
        ..crate::mkfs::MkfsOptions::default()
    };
    crate::mkfs::mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    lun
}

/// Marks slot 0's owner process as gone, as it is after a real crash, so the next
/// mount by the same host takes the slot back at once.
fn owner_gone(image: &mut [u8]) {
    let geo = Geometry::from_superblock(
        &read_superblock(&MemLun::from_image(image.to_vec(), 512)).expect("sb"),
    );
    let offset = geo.slot_offset(0) as usize;
    let Ok(mut slot) = HeartbeatSlot::decode(&image[offset..offset + 512], geo.hb_start) else {
        return;
    };
    slot.owner_pid = 0;
    slot.seal();
    image[offset..offset + 512].copy_from_slice(&encode_padded(&slot, 512));
}

/// Recovers a crash image and checks the files that must have survived.
fn recover_and_check(
    mut image: Vec<u8>,
    must_have: impl Fn(&Durable) -> bool,
    recorded: &Recorded,
    what: &str,
) {
    owner_gone(&mut image);
    let mem = Arc::new(MemLun::from_image(image, 512));
    let lun: Arc<dyn Lun> = mem.clone();
    let fs = Fs::mount(lun, MountOptions::new(HostUuid([1; 16])))
        .unwrap_or_else(|e| panic!("{what}: mount: {e:#}"));
    let root = fs.root();
    let dir = fs.lookup(root, b"d").map(|a| a.ino);
    for d in recorded.durable.iter().filter(|d| must_have(d)) {
        let (parent, name) = match d.name.strip_prefix("d/") {
            Some(name) => (
                dir.as_ref()
                    .unwrap_or_else(|e| panic!("{what}: d: {e}"))
                    .to_owned(),
                name,
            ),
            None => (root, d.name.as_str()),
        };
        let attr = fs
            .lookup(parent, name.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: fsynced {} is missing: {e}", d.name));
        let data = fs.read_data(attr.ino, 0, 1 << 20).expect("read");
        assert!(
            data == d.content,
            "{what}: fsynced {} has the wrong content",
            d.name
        );
    }
    fs.unmount()
        .unwrap_or_else(|e| panic!("{what}: unmount: {e:#}"));
    let report = crate::fsck::check(mem.as_ref()).unwrap_or_else(|e| panic!("{what}: fsck: {e:#}"));
    assert!(
        report.problems.is_empty(),
        "{what}: fsck found {:?}",
        report.problems
    );
}

#[test]
fn every_prefix_of_the_write_log_recovers_with_fsynced_files_intact() {
    check_every_prefix(&record_workload(24, 2));
}

#[test]
fn group_commits_cut_at_every_write_recover_with_fsynced_files_intact() {
    // Few fsyncs: the running transaction outgrows its soft limit between them and
    // is sealed, so commits write groups of transactions with one flush.
    let recorded = record_workload(150, 75);
    assert!(recorded.seals > 0, "no transaction was sealed");
    assert!(
        recorded.pipelined > 0,
        "no group went to the committer thread"
    );
    check_every_prefix(&recorded);
}

fn check_every_prefix(recorded: &Recorded) {
    let n = recorded.records.len();
    assert!(n > 50, "the workload wrote only {n} times");
    for cut in 0..=n {
        let image = crash_image(&recorded.base, &recorded.records, cut, None, 512);
        recover_and_check(
            image,
            |d| d.records_before <= cut,
            recorded,
            &format!("cut {cut}/{n}"),
        );
        if cut > 0 && recorded.records[cut - 1].data.len() > 512 {
            let sectors = recorded.records[cut - 1].data.len() / 512;
            let torn = crash_image(
                &recorded.base,
                &recorded.records,
                cut,
                Some(cut % sectors),
                512,
            );
            // The torn write itself may be part of an fsync in progress: only files
            // fsynced before it must be there.
            recover_and_check(
                torn,
                |d| d.records_before < cut,
                recorded,
                &format!("cut {cut}/{n} torn"),
            );
        }
    }
}

#[test]
fn unflushed_writes_may_all_be_lost() {
    let recorded = record_workload(16, 2);
    let n = recorded.records.len();
    for cut in 0..=n {
        let flushes = flushes_at_cut(&recorded.records, cut, recorded.flush_count);
        let image = durable_image(&recorded.base, &recorded.records, cut, flushes);
        recover_and_check(
            image,
            |d| d.flushes_before <= flushes,
            &recorded,
            &format!("durable cut {cut}/{n}"),
        );
    }
}

/// Records a workload that unlinks files while they are open (and closes some of
/// them again), with fsyncs between: every crash cut leaves files that were unlinked
/// but still open, which the next mount must reclaim.
fn record_orphan_workload() -> Recorded {
    let mem = fresh_volume(12 << 20);
    let base = mem.snapshot();
    let fault = Arc::new(FaultLun::new(mem.clone(), FaultConfig::default()));
    fault.start_recording();
    let lun: Arc<dyn Lun> = fault.clone();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.commit_interval = std::time::Duration::from_secs(3600);
    let fs = Fs::mount(lun, options).expect("mount");
    let root = fs.root();
    let mut durable = Vec::new();
    let mut open = Vec::new();
    for i in 0..6usize {
        let name = format!("orphan-{i}");
        let ino = fs
            .mknod(root, name.as_bytes(), REG, 0, 0, 0)
            .expect("create")
            .ino;
        fs.write_data(ino, 0, &content_of(i + 3)).expect("write");
        fs.open(ino, i % 2 == 0).expect("open");
        fs.unlink(root, name.as_bytes()).expect("unlink while open");
        open.push((ino, i % 2 == 0));
        if i % 3 == 2 {
            // Close an earlier one: it is freed now.
            let (ino, write) = open.remove(0);
            fs.release(ino, write).expect("release");
        }
        let kept = format!("kept-{i}");
        let k = fs
            .mknod(root, kept.as_bytes(), REG, 0, 0, 0)
            .expect("kept")
            .ino;
        fs.write_data(k, 0, &content_of(i)).expect("write kept");
        fs.fsync(k, false).expect("fsync");
        durable.push(Durable {
            name: kept,
            content: content_of(i),
            records_before: fault.records().len(),
            flushes_before: fault.flush_count(),
        });
    }
    fault.stop_recording();
    let records = fault.records();
    let flush_count = fault.flush_count();
    drop(fs); // crash with the rest of the files still open
    Recorded {
        seals: 0,
        pipelined: 0,
        base,
        records,
        flush_count,
        durable,
    }
}

#[test]
fn unlinked_open_files_are_reclaimed_after_a_crash_at_every_write() {
    check_every_prefix(&record_orphan_workload());
}
