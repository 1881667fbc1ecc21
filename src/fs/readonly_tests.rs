//! Read-only hosts (`-o ro`): they write nothing but their own heartbeat sector,
//! refuse every change with EROFS, and see what read-write hosts commit.

use super::tests::{fresh_volume, mount};
use super::*;
use crate::cluster::HostUuid;
use crate::format::Geometry;
use crate::lun::{FaultConfig, FaultLun, Lun, MemLun};

const REG: u32 = libc::S_IFREG | 0o644;

/// Host `host` mounted read-only through a LUN that records every write that lands.
fn mount_read_only(lun: &Arc<MemLun>, host: u8) -> (Arc<Fs>, Arc<FaultLun<Arc<MemLun>>>) {
    let traced = Arc::new(FaultLun::new(lun.clone(), FaultConfig::default()));
    traced.start_recording();
    let mut options = MountOptions::new(HostUuid([host; 16]));
    options.read_only = true;
    let shared: Arc<dyn Lun> = traced.clone();
    let fs = Fs::mount(shared, options).expect("read-only mount");
    (fs, traced)
}

fn geometry(lun: &MemLun) -> Geometry {
    Geometry::from_superblock(&read_superblock(lun).expect("superblock"))
}

fn errno<T: std::fmt::Debug>(result: FsResult<T>) -> i32 {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.errno(),
    }
}

/// Fails unless every write the read-only host made landed in its own heartbeat
/// sector; returns how many there were.
fn assert_only_heartbeat_written(
    traced: &FaultLun<Arc<MemLun>>,
    geo: &Geometry,
    slot: u32,
) -> usize {
    let heartbeat = geo.slot_offset(slot)..geo.slot_offset(slot) + u64::from(geo.ats_sector_size);
    let records = traced.records();
    for r in &records {
        let end = r.offset + r.data.len() as u64;
        assert!(
            heartbeat.contains(&r.offset) && end <= heartbeat.end,
            "the read-only host in slot {slot} wrote {} bytes at byte {} (its heartbeat is {heartbeat:?})",
            r.data.len(),
            r.offset
        );
    }
    records.len()
}

#[test]
fn read_only_host_next_to_a_writer_writes_only_its_heartbeat() {
    let lun = fresh_volume(64 << 20);
    let geo = geometry(&lun);
    let rw = mount(&lun, 1);
    let root = rw.root();
    let dir = rw.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir");
    let file = rw.mknod(dir.ino, b"f", REG, 0, 0, 0).expect("create");
    rw.write_data(file.ino, 0, b"first").expect("write");
    rw.setxattr(file.ino, b"user.k", b"v", 0).expect("setxattr");
    rw.fsync(file.ino, false).expect("fsync");

    let (ro, traced) = mount_read_only(&lun, 2);
    let (slot, _) = ro.slot().expect("the read-only host has a slot");
    // Everything a reader does, while the writer keeps its locks.
    let d = ro.lookup(root, b"d").expect("lookup d");
    let f = ro.lookup(d.ino, b"f").expect("lookup f");
    assert_eq!(f.ino, file.ino);
    ro.remember(&d);
    ro.remember(&f);
    ro.opendir(d.ino).expect("opendir");
    let mut names = Vec::new();
    ro.readdir(d.ino, 0, &mut |_, _, _, name| {
        names.push(name.to_vec());
        false
    })
    .expect("readdir");
    assert!(names.contains(&b"f".to_vec()), "{names:?}");
    ro.release(d.ino, false).expect("releasedir");
    ro.open(f.ino, false).expect("open for reading");
    assert_eq!(ro.read_data(f.ino, 0, 100).expect("read"), b"first");
    assert_eq!(ro.getxattr(f.ino, b"user.k").expect("getxattr"), b"v");
    assert!(!ro.listxattr(f.ino).expect("listxattr").is_empty());
    ro.statfs().expect("statfs");
    ro.fsync(f.ino, false).expect("fsync of nothing");

    // The writer changes the file and the directory under the reader's feet: it holds
    // no lock of the reader to ask for, and the reader sees what was committed.
    rw.write_data(file.ino, 5, b" second").expect("append");
    rw.mknod(dir.ino, b"g", REG, 0, 0, 0).expect("create g");
    rw.fsync(file.ino, false).expect("fsync");
    assert_eq!(
        ro.read_data(f.ino, 0, 100).expect("read again"),
        b"first second"
    );
    assert_eq!(ro.getattr(f.ino).expect("getattr").size, 12);
    ro.lookup(d.ino, b"g").expect("the writer's new file");
    ro.release(f.ino, false).expect("release");

    // Every change is refused.
    let now = namei::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    assert_eq!(errno(ro.setattr(f.ino, &now)), libc::EROFS);
    assert_eq!(errno(ro.mknod(d.ino, b"x", REG, 0, 0, 0)), libc::EROFS);
    assert_eq!(errno(ro.mkdir(d.ino, b"x", 0o755, 0, 0)), libc::EROFS);
    assert_eq!(errno(ro.symlink(d.ino, b"x", b"f", 0, 0)), libc::EROFS);
    assert_eq!(errno(ro.link(f.ino, d.ino, b"x")), libc::EROFS);
    assert_eq!(errno(ro.unlink(d.ino, b"f")), libc::EROFS);
    assert_eq!(errno(ro.rmdir(root, b"d")), libc::EROFS);
    assert_eq!(errno(ro.rename(d.ino, b"f", d.ino, b"x", 0)), libc::EROFS);
    assert_eq!(errno(ro.write_data(f.ino, 0, b"no")), libc::EROFS);
    assert_eq!(errno(ro.fallocate(f.ino, 0, 4096, 0)), libc::EROFS);
    assert_eq!(errno(ro.setxattr(f.ino, b"user.k", b"w", 0)), libc::EROFS);
    assert_eq!(errno(ro.removexattr(f.ino, b"user.k")), libc::EROFS);
    assert_eq!(errno(ro.open(f.ino, true)), libc::EROFS);
    assert_eq!(
        ro.read_data(f.ino, 0, 100).expect("unchanged"),
        b"first second"
    );

    // Heartbeats for a while, then unmount: still nothing but the heartbeat.
    std::thread::sleep(std::time::Duration::from_millis(350));
    ro.unmount().expect("read-only unmount");
    let writes = assert_only_heartbeat_written(&traced, &geo, slot);
    assert!(writes >= 3, "claim, renewals and release: {writes} writes");
    // The writer never had to ask the reader for anything.
    rw.mknod(dir.ino, b"h", REG, 0, 0, 0).expect("create after");
    rw.unmount().expect("unmount");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.is_clean(), "not clean:\n{}", report.render());
}

#[test]
fn read_only_host_does_not_replay_its_own_crashed_journal() {
    let lun = fresh_volume(64 << 20);
    let rw = mount(&lun, 1);
    let f = rw.mknod(rw.root(), b"f", REG, 0, 0, 0).expect("create");
    rw.write_data(f.ino, 0, b"kept").expect("write");
    rw.fsync(f.ino, false).expect("fsync");
    // Crash: the slot stays live with transactions in its journal.
    drop(rw);
    let before = lun.snapshot();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.read_only = true;
    let shared: Arc<dyn Lun> = lun.clone();
    let err = match Fs::mount(shared, options) {
        Ok(_) => panic!("a read-only mount took back a slot with a journal to replay"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("mount read-write once"), "{err}");
    // Only the slot's heartbeat sector changed (claimed for recovery, then left).
    let geo = geometry(&lun);
    let after = lun.snapshot();
    let hb =
        geo.slot_offset(0) as usize..(geo.slot_offset(0) + u64::from(geo.ats_sector_size)) as usize;
    let differs: Vec<usize> = (0..before.len())
        .step_by(512)
        .filter(|&at| before[at..at + 512] != after[at..at + 512])
        .collect();
    assert!(
        differs.iter().all(|at| hb.contains(at)),
        "sectors changed outside the heartbeat {hb:?}: {differs:?}"
    );
    // A read-write mount replays it; then the host may mount read-only.
    let rw = mount(&lun, 1);
    rw.unmount().expect("unmount");
    drop(rw);
    let (ro, _) = mount_read_only(&lun, 1);
    let f = ro.lookup(ro.root(), b"f").expect("replayed file");
    assert_eq!(ro.read_data(f.ino, 0, 10).expect("read"), b"kept");
    ro.unmount().expect("unmount");
}

#[test]
fn read_only_host_on_a_disk_paxos_volume_writes_only_its_heartbeat() {
    // Each host on a plain disk (no compare-and-write at all), as on its own kernel:
    // the writer takes the volume's token for its locks; the reader takes no lock, so
    // it never takes the token and never writes its Disk Paxos dblock either.
    let lun = Arc::new(MemLun::new(64 << 20, 512));
    let opts = crate::mkfs::MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: std::time::Duration::from_millis(100),
        lease: std::time::Duration::from_millis(1000),
        ats_mode: crate::format::ATS_MODE_DISK_PAXOS,
        ..crate::mkfs::MkfsOptions::default()
    };
    crate::mkfs::mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    let geo = geometry(&lun);
    let plain = |inner: Arc<dyn Lun>| -> Arc<dyn Lun> { Arc::new(crate::lun::PlainDisk(inner)) };
    let rw = Fs::mount(plain(lun.clone()), MountOptions::new(HostUuid([1; 16]))).expect("mount");
    let root = rw.root();
    let file = rw.mknod(root, b"f", REG, 0, 0, 0).expect("create");
    rw.write_data(file.ino, 0, b"first").expect("write");
    rw.fsync(file.ino, false).expect("fsync");

    let traced = Arc::new(FaultLun::new(lun.clone(), FaultConfig::default()));
    traced.start_recording();
    let mut options = MountOptions::new(HostUuid([2; 16]));
    options.read_only = true;
    let ro = Fs::mount(plain(traced.clone()), options).expect("read-only mount");
    let (slot, _) = ro.slot().expect("the read-only host has a slot");
    let f = ro.lookup(root, b"f").expect("lookup");
    ro.remember(&f);
    ro.open(f.ino, false).expect("open for reading");
    assert_eq!(ro.read_data(f.ino, 0, 100).expect("read"), b"first");
    assert_eq!(errno(ro.mknod(root, b"x", REG, 0, 0, 0)), libc::EROFS);
    rw.write_data(file.ino, 5, b" second").expect("append");
    rw.fsync(file.ino, false).expect("fsync");
    assert_eq!(
        ro.read_data(f.ino, 0, 100).expect("read again"),
        b"first second"
    );
    ro.release(f.ino, false).expect("release");
    std::thread::sleep(std::time::Duration::from_millis(350));
    ro.unmount().expect("read-only unmount");
    let writes = assert_only_heartbeat_written(&traced, &geo, slot);
    assert!(writes >= 3, "claim, renewals and release: {writes} writes");
    rw.unmount().expect("unmount");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.is_clean(), "not clean:\n{}", report.render());
}

/// On a read-only host every operation drops the cache and moves the epoch,
/// so a read-ahead mapped by one read never serves the next: each sequential
/// O_DIRECT read still reads its two next ranges, for nothing.
#[test]
fn read_ahead_is_not_issued_on_a_read_only_host() {
    let lun = fresh_volume(64 << 20);
    let rw = mount(&lun, 1);
    let file = rw.mknod(rw.root(), b"big", REG, 0, 0, 0).expect("create");
    rw.write_data(file.ino, 0, &vec![5u8; 4 << 20])
        .expect("write");
    rw.fsync(file.ino, false).expect("fsync");
    let (ro, _) = mount_read_only(&lun, 2);
    let f = ro.lookup(ro.root(), b"big").expect("lookup");
    ro.remember(&f);
    let mut buf = Vec::new();
    for i in 0..32u64 {
        ro.read_into(f.ino, i * (128 << 10), 128 << 10, &mut buf, true)
            .expect("read");
    }
    let stats = ro.readahead_stats();
    assert!(
        stats.issued == 0 || stats.used > 0,
        "read-ahead issued {} ranges on a read-only host and used {}",
        stats.issued,
        stats.used
    );
}

#[test]
fn a_read_only_mount_that_fails_after_its_claim_frees_the_slot() {
    let lun = fresh_volume(64 << 20);
    let geo = geometry(&lun);
    // Slot 0's journal header is unreadable: the mount claims the slot, then fails.
    let mut block = vec![0u8; crate::format::BLOCK_SIZE];
    let journal = geo.journal_of(0) * crate::format::BLOCK_SIZE_U64;
    lun.read_at(&mut block, journal).expect("read");
    block[..64].fill(0xee);
    lun.write_at(&block, journal).expect("damage");
    let mut options = MountOptions::new(HostUuid([2; 16]));
    options.read_only = true;
    let shared: Arc<dyn Lun> = lun.clone();
    assert!(Fs::mount(shared, options).is_err());
    let mut raw = vec![0u8; 512];
    lun.read_at(&mut raw, geo.slot_offset(0)).expect("read");
    let slot =
        <crate::format::HeartbeatSlot as crate::format::OnDisk>::decode(&raw, 0).expect("slot");
    assert_eq!(
        slot.state,
        crate::format::SLOT_FREE,
        "the failed read-only mount left its slot claimed"
    );
}
