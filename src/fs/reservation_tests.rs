//! Storage-side fencing with persistent reservations (`cluster::fence`), in process:
//! every host is its own initiator (`PrSession`) of one emulated LUN that enforces
//! registrations the way a SCSI target does.

use super::tests::fresh_volume;
use super::*;
use crate::cluster::fence::{host_key, key_owner, JOIN_SLOT, TOOL_SLOT};
use crate::cluster::HostUuid;
use crate::lun::{
    Lun, LunError, MemLun, PrDevice, PrSession, ReservationKey, ReservationType, Reservations,
};
use std::time::Duration;

const REG: u32 = libc::S_IFREG | 0o644;

fn mount_as(session: &Arc<PrSession>, host: u8) -> Arc<Fs> {
    let lun: Arc<dyn Lun> = session.clone();
    Fs::mount(lun, MountOptions::new(HostUuid([host; 16]))).expect("mount")
}

fn keys(session: &PrSession) -> Vec<ReservationKey> {
    let mut keys = session.read_keys().expect("read keys");
    keys.sort();
    keys
}

fn assert_fsck_clean(mem: &MemLun) {
    let report = crate::fsck::check(mem).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn keys_name_the_slot_and_generation_of_a_life() {
    let key = host_key(7, 0xdead_beef);
    assert_eq!(key_owner(key), Some((7, 0xdead_beef)));
    assert_eq!(key.0 >> 48, 0x4154);
    assert_ne!(host_key(7, 1), host_key(7, 2));
    assert_ne!(host_key(1, 7), host_key(2, 7));
    assert_eq!(key_owner(ReservationKey(0x1234)), None);
}

#[test]
fn a_mounted_host_is_registered_and_the_lun_reserved_for_registrants() {
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let a_lun = Arc::new(device.session());
    let a = mount_as(&a_lun, 1);
    let (slot, generation) = a.slot().expect("a slot");
    assert_eq!(keys(&a_lun), vec![host_key(slot, generation)]);
    let held = a_lun
        .read_reservation()
        .expect("reservation")
        .expect("reserved");
    assert_eq!(held.kind, ReservationType::WriteExclusiveRegistrantsOnly);
    // An initiator that did not register cannot write; it can still read.
    let stranger = device.session();
    let sector = vec![0u8; 512];
    assert!(matches!(
        stranger.write_at(&sector, 0),
        Err(LunError::Fenced(_))
    ));
    let mut back = vec![0u8; 512];
    stranger
        .read_at(&mut back, 0)
        .expect("a stranger still reads");
    a.unmount().expect("unmount");
    assert_fsck_clean(&mem);
}

#[test]
fn a_recovered_host_is_fenced_at_the_storage_before_its_journal_is_replayed() {
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let a_lun = Arc::new(device.session());
    let a = mount_as(&a_lun, 1);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"host 1 was here").expect("write");
    a.fsync(f, false).expect("fsync");
    let (a_slot, a_generation) = a.slot().expect("a slot");
    let b_lun = Arc::new(device.session());
    let b = mount_as(&b_lun, 2);
    // Host 1 stops (its process is stuck, its last write still on the wire): its
    // slot stays live and stops moving.
    drop(a);
    // Host 2 needs host 1's locks: after the lease it recovers host 1, and first
    // removes host 1's key at the storage.
    let f_on_b = b.lookup(b.root(), b"f").expect("lookup on b").ino;
    b.write_data(f_on_b, 0, b"HOST 2").expect("write on b");
    b.fsync(f_on_b, false).expect("fsync on b");
    assert!(
        !keys(&b_lun).contains(&host_key(a_slot, a_generation)),
        "host 1's key survived its recovery"
    );
    // Host 1's late write, issued before it stopped and landing now, is refused by
    // the storage itself, not by host 1's own lease check (which it bypasses here).
    let block = crate::format::BLOCK_SIZE;
    let late = vec![0x5au8; block];
    let targets = [0u64, 512, 64 * block as u64];
    let sector_at = |offset: u64| {
        let mut sector = vec![0u8; 512];
        mem.read_at(&mut sector, offset).expect("read");
        sector
    };
    let before: Vec<Vec<u8>> = targets.iter().map(|&o| sector_at(o)).collect();
    for offset in targets {
        let err = a_lun
            .write_at(&late[..512], offset)
            .expect_err("a fenced write landed");
        assert!(matches!(err, LunError::Fenced(_)), "{err}");
    }
    assert!(a_lun
        .compare_and_write(0, &before[0], &late[..512])
        .is_err());
    let after: Vec<Vec<u8>> = targets.iter().map(|&o| sector_at(o)).collect();
    assert!(before == after, "a refused write changed the image");
    assert_eq!(
        b.read_data(f_on_b, 0, 64).expect("read"),
        b"HOST 2 was here"
    );
    b.unmount().expect("unmount b");
    assert_fsck_clean(&mem);
}

#[test]
fn a_mount_removes_the_keys_of_lives_that_are_over() {
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let a_lun = Arc::new(device.session());
    let a = mount_as(&a_lun, 1);
    let (a_slot, a_generation) = a.slot().expect("a slot");
    // Hosts never unregister: the holder leaving would drop the reservation.
    a.unmount().expect("unmount");
    assert_eq!(keys(&a_lun), vec![host_key(a_slot, a_generation)]);
    let b_lun = Arc::new(device.session());
    let b = mount_as(&b_lun, 2);
    let (b_slot, b_generation) = b.slot().expect("b slot");
    assert_eq!(
        keys(&b_lun),
        vec![host_key(b_slot, b_generation)],
        "host 1's key of a life that is over is still registered"
    );
    // The reservation went to host 2 with the preempt: still reserved.
    assert!(b_lun.read_reservation().expect("read").is_some());
    b.unmount().expect("unmount b");
}

#[test]
fn a_lun_reserved_by_another_program_is_refused_before_anything_is_written() {
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let other = device.session();
    other.register(ReservationKey(0x1234)).expect("register");
    other.reserve(ReservationKey(0x1234)).expect("reserve");
    let before = mem.snapshot();
    let lun: Arc<dyn Lun> = Arc::new(device.session());
    let err = match Fs::mount(lun, MountOptions::new(HostUuid([1; 16]))) {
        Ok(_) => panic!("mounted a LUN another program reserved"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("reserved by another initiator"), "{err}");
    assert!(err.contains("release the reservation"), "{err}");
    assert_eq!(mem.snapshot(), before);
}

#[test]
fn a_joining_host_registers_before_it_claims_a_slot() {
    // The claim of a slot is a write: under a reservation an unregistered host could
    // not even claim one. A second host mounting while the first is live shows it.
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let a_lun = Arc::new(device.session());
    let a = mount_as(&a_lun, 1);
    let b_lun = Arc::new(device.session());
    let b = mount_as(&b_lun, 2);
    let owners: Vec<u32> = keys(&b_lun)
        .into_iter()
        .filter_map(key_owner)
        .map(|(slot, _)| slot)
        .collect();
    assert_eq!(owners.len(), 2);
    assert!(owners.iter().all(|&slot| slot < JOIN_SLOT), "{owners:?}");
    std::thread::sleep(Duration::from_millis(10));
    b.unmount().expect("unmount b");
    a.unmount().expect("unmount a");
    assert_fsck_clean(&mem);
}

#[test]
fn mkfs_takes_over_the_reservation_an_old_volume_left() {
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let a_lun = Arc::new(device.session());
    mount_as(&a_lun, 1).unmount().expect("unmount");
    // Hosts never unregister: the LUN stays reserved, and a new initiator's writes
    // (mkfs) are refused until it takes the LUN over.
    let tool = device.session();
    assert!(tool.read_reservation().expect("read").is_some());
    let opts = crate::mkfs::MkfsOptions {
        max_hosts: 4,
        ..crate::mkfs::MkfsOptions::default()
    };
    assert!(crate::mkfs::mkfs(&tool, &opts, &mut |_, _| {}).is_err());
    let key = crate::cluster::fence::take_for_mkfs(&tool)
        .expect("take over")
        .expect("a key");
    assert_eq!(key_owner(key).map(|(slot, _)| slot), Some(TOOL_SLOT));
    assert_eq!(
        keys(&tool),
        vec![key],
        "the old volume's keys are still registered"
    );
    let held = tool
        .read_reservation()
        .expect("read")
        .expect("still reserved");
    assert_eq!(held.key, key);
    crate::mkfs::mkfs(&tool, &opts, &mut |_, _| {}).expect("mkfs after the takeover");
    // The old volume's host, paused past its lease, cannot write into the new one.
    assert!(matches!(
        a_lun.write_at(&[0x5a; 512], 0),
        Err(LunError::Fenced(_))
    ));
    // The new volume mounts; its first host joins the reservation mkfs left.
    let b_lun = Arc::new(device.session());
    let b = mount_as(&b_lun, 2);
    b.unmount().expect("unmount");
    // A LUN another program reserved is left alone.
    let other_mem = fresh_volume(64 << 20);
    let other_device = PrDevice::new(other_mem);
    let other = other_device.session();
    other.register(ReservationKey(0x77)).expect("register");
    other.reserve(ReservationKey(0x77)).expect("reserve");
    let mine = other_device.session();
    let err = crate::cluster::fence::take_for_mkfs(&mine).expect_err("took a foreign reservation");
    assert!(format!("{err:#}").contains("reserved by another initiator"));
    assert_eq!(keys(&mine), vec![ReservationKey(0x77)]);
}

#[test]
fn a_recovery_after_the_target_lost_its_reservations_reserves_again_before_it_trusts_a_missing_key()
{
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let a_lun = Arc::new(device.session());
    let a = mount_as(&a_lun, 1);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.fsync(f, false).expect("fsync");
    let b_lun = Arc::new(device.session());
    let b = mount_as(&b_lun, 2);
    // The target restarts: no reservation, no keys. Host 1's key is missing now, which
    // proves nothing about host 1.
    device.forget_reservations();
    drop(a);
    let f_on_b = b.lookup(b.root(), b"f").expect("lookup on b").ino;
    b.write_data(f_on_b, 0, b"HOST 2").expect("write on b");
    b.fsync(f_on_b, false).expect("fsync on b");
    // Host 2 reserved the LUN again before it replayed host 1's journal: host 1's late
    // write is refused.
    assert!(b_lun.read_reservation().expect("read").is_some());
    let err = a_lun
        .write_at(&[0x5a; 512], 0)
        .expect_err("a late write landed after the recovery");
    assert!(matches!(err, LunError::Fenced(_)), "{err}");
    b.unmount().expect("unmount b");
    assert_fsck_clean(&mem);
}

/// A new session that, before each of its writes, tries a write of the old life's
/// session (still registered unless fenced) and records whether it landed.
struct OldLifeProbe {
    new: Arc<PrSession>,
    old: Arc<PrSession>,
    old_life_wrote: std::sync::Mutex<Vec<bool>>,
}

impl Lun for OldLifeProbe {
    fn sector_size(&self) -> u32 {
        self.new.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.new.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::lun::LunResult<()> {
        self.new.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::lun::LunResult<()> {
        // A sector no replay touches: the last one of the device.
        let probe = self.new.len_bytes() - 512;
        let mut sector = vec![0u8; 512];
        self.new.read_at(&mut sector, probe)?;
        let landed = self.old.write_at(&sector, probe).is_ok();
        if let Ok(mut seen) = self.old_life_wrote.lock() {
            seen.push(landed);
        }
        self.new.write_at(buf, offset)
    }
    fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> crate::lun::LunResult<crate::lun::Caw> {
        self.new.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> crate::lun::LunResult<()> {
        self.new.flush()
    }
    fn describe(&self) -> String {
        self.new.describe()
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        Some(self.new.as_ref())
    }
}

#[test]
fn a_host_replaying_its_own_journal_after_a_crash_fences_its_old_life_first() {
    let mem = fresh_volume(64 << 20);
    let device = PrDevice::new(mem.clone());
    let old_lun = Arc::new(device.session());
    let old = mount_as(&old_lun, 1);
    let f = old
        .mknod(old.root(), b"f", REG, 0, 0, 0)
        .expect("create")
        .ino;
    old.fsync(f, false).expect("fsync");
    let (slot, old_generation) = old.slot().expect("slot");
    // The old process stalls (it is not dead: its session is still registered), and
    // the host mounts again as the same host on a new session.
    drop(old);
    let new_lun = Arc::new(device.session());
    let probe = Arc::new(OldLifeProbe {
        new: new_lun.clone(),
        old: old_lun.clone(),
        old_life_wrote: Default::default(),
    });
    let lun: Arc<dyn Lun> = probe.clone();
    let new = Fs::mount(lun, MountOptions::new(HostUuid([1; 16]))).expect("remount");
    let seen = probe.old_life_wrote.lock().expect("probe").clone();
    assert!(
        !seen.is_empty(),
        "the remount wrote nothing: no replay to watch"
    );
    assert!(
        seen.iter().all(|&landed| !landed),
        "the old life could still write while the new one replayed its journal: {seen:?}"
    );
    let (new_slot, new_generation) = new.slot().expect("slot");
    assert_eq!(new_slot, slot);
    assert_ne!(new_generation, old_generation);
    let err = old_lun
        .write_at(&[0x5a; 512], 0)
        .expect_err("the old life's late write landed on the new life's replay");
    assert!(matches!(err, LunError::Fenced(_)), "{err}");
    assert_eq!(keys(&new_lun), vec![host_key(slot, new_generation)]);
    new.unmount().expect("unmount");
    assert_fsck_clean(&mem);
}
