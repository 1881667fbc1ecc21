//! Mount and unmount on a Disk Paxos volume: what they leave behind of the slot and
//! of the token (review of 2026-12-05, finding 7).

use super::*;
use crate::cluster::paxos::{read_region, PaxosRegion};
use crate::cluster::{Clock, HostUuid};
use crate::format::{Geometry, HeartbeatSlot, OnDisk, SLOT_FREE};
use crate::lun::{Lun, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use std::time::Duration;

fn volume() -> (Arc<MemLun>, Geometry) {
    let mem = Arc::new(MemLun::new(64 << 20, 512));
    let opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(800),
        ats_mode: crate::format::ATS_MODE_DISK_PAXOS,
        ..MkfsOptions::default()
    };
    let geo = mkfs(mem.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    (mem, geo)
}

/// A clock that stands still while its sleeps take real time: a token is never
/// idle long enough for the releaser to give it back, nor ever runs out.
struct FrozenClock;

impl Clock for FrozenClock {
    fn now_ms(&self) -> u64 {
        0
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

fn slot_state(mem: &MemLun, geo: &Geometry, slot: u32) -> Option<u32> {
    let mut raw = vec![0u8; 512];
    mem.read_at(&mut raw, geo.slot_offset(slot)).expect("read");
    HeartbeatSlot::decode(&raw, 0).ok().map(|s| s.state)
}

#[test]
fn unmount_gives_the_token_back() {
    // A mounted host keeps the token between its compare-and-writes; at unmount it
    // must give it back, not leave the others to wait out its lease.
    let (mem, geo) = volume();
    let mut options = MountOptions::new(HostUuid([7; 16]));
    options.clock = Arc::new(FrozenClock);
    let fs = Fs::mount(mem.clone(), options).expect("mount");
    fs.mkdir(fs.root(), b"d", 0o755, 0, 0).expect("mkdir");
    fs.unmount().expect("unmount");
    let region = PaxosRegion::of(&geo).expect("region");
    let view = read_region(mem.as_ref(), &region).expect("region");
    assert_eq!(view.holder(), None, "the token is still held after unmount");
    drop(fs);
}

#[test]
fn a_mount_that_fails_after_its_claim_frees_the_slot() {
    let (mem, geo) = volume();
    // Slot 0's journal is unreadable: the mount claims the slot, then fails.
    let mut block = vec![0u8; crate::format::BLOCK_SIZE];
    let journal = geo.journal_of(0) * crate::format::BLOCK_SIZE_U64;
    mem.read_at(&mut block, journal).expect("read");
    block[..64].fill(0xee);
    mem.write_at(&block, journal).expect("damage");
    let options = MountOptions::new(HostUuid([7; 16]));
    assert!(Fs::mount(mem.clone(), options).is_err());
    assert_eq!(
        slot_state(&mem, &geo, 0),
        Some(SLOT_FREE),
        "the failed mount left its slot claimed"
    );
}
