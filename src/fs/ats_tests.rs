//! One kind of ATS per volume: mount and `fsck --repair` refuse a device whose ATS
//! kind is not the volume's, both ways, before writing anything; read-only tools do
//! not.

use super::*;
use crate::cluster::HostUuid;
use crate::format::{ATS_MODE_EMULATED, ATS_MODE_HARDWARE};
use crate::lun::{AtsKind, Caw, Lun, LunResult, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use std::time::Duration;

/// A LUN that says its compare-and-write is the storage's (as an iSCSI or SG_IO
/// backend does), over a shared in-memory image.
struct HardwareLun(Arc<MemLun>);

impl Lun for HardwareLun {
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.0.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.0.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.0.flush()
    }
    fn describe(&self) -> String {
        "hardware-ATS test LUN".into()
    }
    fn ats_kind(&self) -> AtsKind {
        AtsKind::Hardware
    }
}

/// A fresh volume made for `ats_mode` in memory.
fn volume(ats_mode: u32) -> Arc<MemLun> {
    let mem = Arc::new(MemLun::new(64 << 20, 512));
    let opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ats_mode,
        ..MkfsOptions::default()
    };
    mkfs(mem.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    mem
}

fn hardware(mem: &Arc<MemLun>) -> Arc<dyn Lun> {
    Arc::new(HardwareLun(mem.clone()))
}

fn mount(lun: Arc<dyn Lun>) -> anyhow::Result<Arc<Fs>> {
    Fs::mount(lun, MountOptions::new(HostUuid([1; 16])))
}

#[test]
fn a_hardware_volume_refuses_an_emulated_opener_and_writes_nothing() {
    let mem = volume(ATS_MODE_HARDWARE);
    let before = mem.snapshot();
    let err = mount(mem.clone())
        .err()
        .expect("an emulated opener is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("made for hardware ATS")
            && text.contains("not through the target's backing image file"),
        "{text}"
    );
    let err = crate::fsck::repair(mem.as_ref(), true).expect_err("repair refused too");
    assert!(
        format!("{err:#}").contains("made for hardware ATS"),
        "{err:#}"
    );
    assert!(
        mem.snapshot() == before,
        "a refused opener wrote to the volume"
    );
    // Read-only tools still look.
    let report = crate::fsck::check(mem.as_ref()).expect("read-only fsck runs");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let status = crate::inspect::status(mem.as_ref(), Some(Duration::ZERO)).expect("status runs");
    assert_eq!(status.volume.ats_mode, "hardware");
    assert_eq!(status.volume.opener_ats, "emulated");
    assert!(!status.volume.opener_matches);
    assert!(status.volume.token.is_none(), "no token without Disk Paxos");
    let text = crate::inspect::render_status(&status);
    assert!(
        text.contains("ATS: hardware (SCSI COMPARE AND WRITE), 512-byte sectors; this device: emulated ATS, does NOT match"),
        "{text}"
    );
}

#[test]
fn an_emulated_volume_refuses_a_hardware_opener_and_writes_nothing() {
    let mem = volume(ATS_MODE_EMULATED);
    let before = mem.snapshot();
    let err = mount(hardware(&mem))
        .err()
        .expect("a hardware opener is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("made for emulated ATS") && text.contains("mkfs.atsfs --ats hardware"),
        "{text}"
    );
    let err = crate::fsck::repair(hardware(&mem).as_ref(), true).expect_err("repair refused too");
    assert!(
        format!("{err:#}").contains("made for emulated ATS"),
        "{err:#}"
    );
    assert!(
        mem.snapshot() == before,
        "a refused opener wrote to the volume"
    );
    let status =
        crate::inspect::status(hardware(&mem).as_ref(), Some(Duration::ZERO)).expect("status runs");
    assert_eq!(status.volume.ats_mode, "emulated");
    assert_eq!(status.volume.opener_ats, "hardware");
    assert!(!status.volume.opener_matches);
}

#[test]
fn matching_openers_mount_both_kinds() {
    let mem = volume(ATS_MODE_HARDWARE);
    let fs = mount(hardware(&mem)).expect("hardware opener on a hardware volume");
    fs.unmount().expect("unmount");
    let status =
        crate::inspect::status(hardware(&mem).as_ref(), Some(Duration::ZERO)).expect("status runs");
    assert!(status.volume.opener_matches);
    let text = crate::inspect::render_status(&status);
    assert!(
        text.contains("this device: hardware ATS, matches"),
        "{text}"
    );
    crate::fsck::repair(hardware(&mem).as_ref(), true).expect("repair through hardware");
    let mem = volume(ATS_MODE_EMULATED);
    let fs = mount(mem.clone()).expect("emulated opener on an emulated volume");
    fs.unmount().expect("unmount");
}

#[test]
fn two_hosts_share_a_disk_paxos_volume_on_a_disk_without_compare_and_write() {
    let mem = volume(crate::format::ATS_MODE_DISK_PAXOS);
    // A plain shared disk: every compare-and-write of the device itself fails.
    let plain =
        |mem: &Arc<MemLun>| -> Arc<dyn Lun> { Arc::new(crate::lun::PlainDisk(mem.clone())) };
    let a = Fs::mount(plain(&mem), MountOptions::new(HostUuid([1; 16]))).expect("mount a");
    let b = Fs::mount(plain(&mem), MountOptions::new(HostUuid([2; 16]))).expect("mount b");
    let root = a.root;
    let made = a.mkdir(root, b"from-a", 0o755, 0, 0).expect("mkdir on a");
    a.sync().expect("sync a");
    let seen = b.lookup(root, b"from-a").expect("b sees a's directory");
    assert_eq!(seen.ino, made.ino);
    b.mkdir(root, b"from-b", 0o755, 0, 0).expect("mkdir on b");
    b.sync().expect("sync b");
    a.lookup(root, b"from-b").expect("a sees b's directory");
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
    let report = crate::fsck::check(mem.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let status =
        crate::inspect::status(plain(&mem).as_ref(), Some(Duration::ZERO)).expect("status");
    assert_eq!(status.volume.ats_mode, "disk-paxos");
    assert!(status.volume.opener_matches);
    let text = crate::inspect::render_status(&status);
    assert!(text.contains("Disk Paxos"), "{text}");
    // The token: taken many times by the two hosts, by one of their slots.
    let token = status
        .volume
        .token
        .expect("a Disk Paxos volume shows its token");
    assert!(token.error.is_none(), "{:?}", token.error);
    assert!(token.instance > 1, "{token:?}");
    assert!(token.owner_slot.is_some_and(|s| s < 2), "{token:?}");
    assert!(
        text.contains(&format!("token: instance {}, ", token.instance)),
        "{text}"
    );
}

#[test]
fn emulated_and_hardware_volumes_refuse_a_disk_without_compare_and_write() {
    for mode in [ATS_MODE_EMULATED, ATS_MODE_HARDWARE] {
        let mem = volume(mode);
        let before = mem.snapshot();
        let plain: Arc<dyn Lun> = Arc::new(crate::lun::PlainDisk(mem.clone()));
        assert_eq!(plain.ats_kind(), AtsKind::Plain);
        let err = mount(plain.clone()).err().expect("a plain disk is refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("has no compare-and-write at all")
                && text.contains("only a Disk Paxos volume works on a plain disk"),
            "mode {mode}: {text}"
        );
        assert!(
            mem.snapshot() == before,
            "a refused opener wrote to the volume"
        );
        let status = crate::inspect::status(plain.as_ref(), Some(Duration::ZERO)).expect("status");
        assert_eq!(status.volume.opener_ats, "none");
        assert!(!status.volume.opener_matches);
    }
}

/// A host that crashed with an fsynced file on a Disk Paxos volume, seen through a
/// disk without compare-and-write; returns the file's name.
fn crash_a_host_on_disk_paxos(plain: &Arc<dyn Lun>, host: u8) -> Vec<u8> {
    let fs = Fs::mount(plain.clone(), MountOptions::new(HostUuid([host; 16]))).expect("mount");
    let name = format!("from-{host}").into_bytes();
    let ino = fs
        .mknod(fs.root, &name, libc::S_IFREG | 0o644, 0, 0, 0)
        .expect("create")
        .ino;
    fs.write_data(ino, 0, &name).expect("write");
    fs.fsync(ino, false).expect("fsync");
    drop(fs); // a crash: the slot stays live, the journal unreplayed
    name
}

#[test]
fn recover_and_repair_take_the_token_on_a_disk_paxos_volume_without_compare_and_write() {
    use crate::cluster::{fence::ToolRegistration, recover_offline, OfflineOutcome, ToolSession};
    let mem = volume(crate::format::ATS_MODE_DISK_PAXOS);
    let plain: Arc<dyn Lun> = Arc::new(crate::lun::PlainDisk(mem.clone()));
    let sb = read_superblock(plain.as_ref()).expect("superblock");
    let geo = crate::format::Geometry::from_superblock(&sb);
    let first = crash_a_host_on_disk_paxos(&plain, 1);

    // `atsfs recover`: the tool claims a slot of its own for the token.
    let clock: Arc<dyn crate::cluster::Clock> = Arc::new(crate::cluster::SystemClock::default());
    let tool = ToolRegistration::new(plain.as_ref()).expect("registration");
    let session = ToolSession::join(&plain, &sb, &tool, clock.clone()).expect("join");
    let own = session.slot().expect("a Disk Paxos tool holds a slot");
    assert_ne!(own, 0, "slot 0 is the crashed host's");
    let outcomes = recover_offline(
        session.lun().as_ref(),
        &geo,
        sb.volume_uuid,
        &tool,
        None,
        Duration::from_millis(100),
        Duration::from_millis(1000),
        clock.as_ref(),
    )
    .expect("recover");
    assert!(
        outcomes.contains(&(0, OfflineOutcome::Recovered)),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&(own, OfflineOutcome::Free)),
        "{outcomes:?}"
    );
    session.leave().expect("leave");
    drop(tool);
    let report = crate::fsck::check(mem.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.counts.slots_live, 0, "{:?}", report.notes);

    // `atsfs fsck --repair`: the device alone cannot (it has no compare-and-write),
    // the repair as a tool with a slot can.
    let second = crash_a_host_on_disk_paxos(&plain, 2);
    let err = crate::fsck::repair(plain.as_ref(), false).expect_err("no token, no repair");
    assert!(format!("{err:#}").contains("Disk Paxos"), "{err:#}");
    let done = crate::fsck::repair_device(&plain, false).expect("repair");
    assert!(
        done.fixed
            .iter()
            .any(|l| l.starts_with("dead hosts recovered")),
        "{:?}",
        done.fixed
    );
    assert!(done.after.is_clean(), "{}", done.after.render());
    assert_eq!(done.after.counts.slots_live, 0, "{:?}", done.after.notes);

    let fs = Fs::mount(plain.clone(), MountOptions::new(HostUuid([3; 16]))).expect("mount");
    for name in [first, second] {
        let ino = fs.lookup(fs.root, &name).expect("lookup").ino;
        assert_eq!(fs.read_data(ino, 0, 64).expect("read"), name);
    }
    fs.unmount().expect("unmount");
}
