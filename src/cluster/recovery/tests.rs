//! Recoveries on a Disk Paxos volume, through the token as a mounted host does them:
//! their timing budget, the free, and a dead host that was only paused (review of
//! 2026-12-05, findings 3 and 7).

use super::*;
use crate::cluster::paxos::{self, DeltaSectors, Owner, PaxosLun, PaxosRegion, TokenTiming};
use crate::cluster::{GuardedLun, Lease, SystemClock};
use crate::format::{Superblock, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::journal::Record;
use crate::lun::MemLun;
use crate::mkfs::{mkfs, MkfsOptions};
use std::sync::Arc;

const SECTOR: usize = 512;
const X: HostUuid = HostUuid([0xa0; 16]);
const R: HostUuid = HostUuid([0xb1; 16]);

struct Volume {
    mem: Arc<MemLun>,
    geo: Geometry,
    sb: Superblock,
}

fn volume(interval_ms: u64, lease_ms: u64) -> Volume {
    let mem = Arc::new(MemLun::new(64 << 20, SECTOR as u32));
    let opts = MkfsOptions {
        max_hosts: 2,
        journal_bytes: Some(1 << 20),
        heartbeat_interval: Duration::from_millis(interval_ms),
        lease: Duration::from_millis(lease_ms),
        ats_mode: crate::format::ATS_MODE_DISK_PAXOS,
        ..MkfsOptions::default()
    };
    let geo = mkfs(mem.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    let mut block = vec![0u8; BLOCK_SIZE];
    mem.read_at(&mut block, 0).expect("read");
    let sb = Superblock::decode(&block, 0).expect("superblock");
    Volume { mem, geo, sb }
}

impl Volume {
    fn timing<'a>(&self, clock: &'a dyn Clock) -> Timing<'a> {
        Timing {
            interval: Duration::from_millis(u64::from(self.sb.heartbeat_interval_ms)),
            lease: Duration::from_millis(u64::from(self.sb.lease_ms)),
            clock,
        }
    }

    /// Slot `slot` held by `uuid`, LIVE at generation 1; returns what a recoverer saw.
    fn live(&self, slot: u32, uuid: HostUuid) -> Held {
        let mut image: HeartbeatSlot = bytemuck::Zeroable::zeroed();
        image.magic = HeartbeatSlot::MAGIC;
        image.slot = slot;
        image.state = SLOT_LIVE;
        image.host_uuid = uuid.0;
        image.generation = 1;
        image.counter = 7;
        image.seal();
        let raw = encode_padded(&image, SECTOR);
        self.mem
            .write_at(&raw, self.geo.slot_offset(slot))
            .expect("slot");
        Held { slot, raw, image }
    }

    /// Commits `records` block records into `slot`'s journal (its host's last words).
    fn journal(&self, slot: u32, records: u64) {
        let (mut journal, _) =
            Journal::open_and_replay(self.mem.as_ref(), &self.geo, slot, self.sb.volume_uuid)
                .expect("open");
        let first = (self.geo.ag_start + 64) * BLOCK_SIZE_U64;
        let records: Vec<Record> = (0..records)
            .map(|i| Record {
                target: first + i * BLOCK_SIZE_U64,
                image: vec![i as u8 + 1; BLOCK_SIZE],
            })
            .collect();
        journal
            .commit(self.mem.as_ref(), &records, 0)
            .expect("commit");
    }

    fn region(&self) -> PaxosRegion {
        PaxosRegion::of(&self.geo).expect("region")
    }

    /// The device as a mounted host in `slot` uses it: the token under its host lease
    /// (long enough for the test: nobody renews it), behind `GuardedLun`.
    fn host(&self, inner: Arc<dyn Lun>, slot: u32, clock: Arc<dyn Clock>) -> Arc<dyn Lun> {
        let lease = Arc::new(Lease::new(
            clock.clone(),
            Duration::from_secs(600),
            Duration::from_secs(1),
        ));
        let token = PaxosLun::new(
            inner,
            self.region(),
            Owner {
                slot,
                generation: 1,
            },
            clock,
            TokenTiming::for_token(u64::from(self.sb.paxos_token_ms)),
        )
        .with_lease(lease.clone())
        .with_delta_sectors(DeltaSectors::heartbeats(
            &self.geo,
            slot,
            paxos::delta_timing(&self.sb),
        ));
        Arc::new(GuardedLun::new(Arc::new(token), lease))
    }

    fn slot_image(&self, slot: u32) -> Option<HeartbeatSlot> {
        read_slot(self.mem.as_ref(), &self.geo, slot)
            .expect("read")
            .1
    }
}

/// A LUN whose writes to the data area take `ms` of real time each (a replay that
/// lasts).
struct SlowDataWrites {
    inner: Arc<MemLun>,
    from: u64,
    ms: u64,
}

impl Lun for SlowDataWrites {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        if offset >= self.from {
            std::thread::sleep(Duration::from_millis(self.ms));
        }
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "slow data writes".into()
    }
}

#[test]
fn a_recovery_through_the_token_lasts_past_its_takeover() {
    // The dead host kept the token: the takeover waits it out (token + margin, 750
    // ms) and settles (625 ms). The hold may write for lease - interval (1.6 s) after
    // the takeover's issue, so its first renewal must land by then: a renewal that
    // settled as well (another 625 ms) came too late, and a replay that lasted past
    // it stopped and left the slot to be recovered again, and again.
    let vol = volume(400, 2000);
    let held = vol.live(1, R);
    vol.journal(1, 60);
    let region = vol.region();
    paxos::write_leader(
        vol.mem.as_ref(),
        &region,
        1,
        Owner {
            slot: 1,
            generation: 1,
        },
        0,
        1,
    )
    .expect("the dead host's token");
    let slow = Arc::new(SlowDataWrites {
        inner: vol.mem.clone(),
        from: vol.geo.ag_start * BLOCK_SIZE_U64,
        ms: 25,
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let x = vol.host(slow, 0, clock.clone());
    let recovered = recover_slot(
        x.as_ref(),
        &vol.geo,
        vol.sb.volume_uuid,
        held,
        (0, X),
        None,
        vol.timing(clock.as_ref()),
    );
    assert!(recovered.is_ok(), "{recovered:?}");
    assert_eq!(vol.slot_image(1).map(|s| s.state), Some(SLOT_FREE));
}

/// A LUN that runs `then` once, right after a write of `offset` whose image is a FREE
/// heartbeat slot lands.
struct AfterFree {
    inner: Arc<MemLun>,
    offset: u64,
    then: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Lun for AfterFree {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.inner.write_at(buf, offset)?;
        let freed = HeartbeatSlot::decode(buf, 0).is_ok_and(|s| s.state == SLOT_FREE);
        if offset == self.offset && freed {
            if let Some(then) = self.then.lock().ok().and_then(|mut t| t.take()) {
                then();
            }
        }
        Ok(())
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "after free".into()
    }
}

#[test]
fn a_claim_right_after_the_free_does_not_fail_the_recovery() {
    // The dead host comes back and claims its slot as soon as it reads it FREE. The
    // free must not count that as a failed free (nobody but token holders writes a
    // slot under recovery, so the free need not settle and read again).
    let vol = volume(400, 2000);
    let held = vol.live(1, R);
    let slot1 = vol.geo.slot_offset(1);
    let claim = {
        let mem = vol.mem.clone();
        Box::new(move || {
            let mut back: HeartbeatSlot = bytemuck::Zeroable::zeroed();
            back.magic = HeartbeatSlot::MAGIC;
            back.slot = 1;
            back.state = SLOT_LIVE;
            back.host_uuid = R.0;
            back.generation = 2;
            back.seal();
            mem.write_at(&encode_padded(&back, SECTOR), slot1)
                .expect("claim");
        }) as Box<dyn FnOnce() + Send>
    };
    let lun = Arc::new(AfterFree {
        inner: vol.mem.clone(),
        offset: slot1,
        then: Mutex::new(Some(claim)),
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let x = vol.host(lun, 0, clock.clone());
    let recovered = recover_slot(
        x.as_ref(),
        &vol.geo,
        vol.sb.volume_uuid,
        held,
        (0, X),
        None,
        vol.timing(clock.as_ref()),
    );
    assert!(recovered.is_ok(), "{recovered:?}");
    assert_eq!(vol.slot_image(1).map(|s| s.generation), Some(2));
}
