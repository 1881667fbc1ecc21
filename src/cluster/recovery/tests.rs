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

/// A clock that stands still (a VM paused with its clock: it resumes as if no time
/// had passed) but whose sleeps take real time, so a heartbeat thread runs.
struct FrozenClock;

impl Clock for FrozenClock {
    fn now_ms(&self) -> u64 {
        0
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A LUN that runs `before` once, right before a write of `offset` lands: "this host
/// stands still here while the others work".
struct BeforeWriteOf {
    inner: Arc<MemLun>,
    offset: u64,
    before: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Lun for BeforeWriteOf {
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
        if offset == self.offset {
            if let Some(before) = self.before.lock().ok().and_then(|mut b| b.take()) {
                before();
            }
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
        "before write".into()
    }
}

/// Polls `done` for up to `secs` seconds.
fn within(secs: u64, done: impl Fn() -> bool) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    done()
}

#[test]
fn a_renewal_that_lands_over_a_confirmed_takeover_fences_its_host() {
    // R renews its heartbeat without the token: a fresh read, then the write. Between
    // the two its VM is paused, clock and all. Meanwhile X finds R's slot dead, takes
    // it over through the token, confirms it after settling and recovers R. Then R's
    // write lands, over X's work: R's clock says nothing happened, and its slot shows
    // its own renewal. R must still find out (X's mark in its mailbox) and fence
    // itself, never go on as the slot's owner after X replayed its journal.
    let vol = volume(400, 2000);
    let held = vol.live(1, R);
    let slot1 = vol.geo.slot_offset(1);
    let recovered = Arc::new(Mutex::new(None));
    let x_recovers = {
        let (mem, geo, sb) = (vol.mem.clone(), vol.geo, vol.sb);
        let recovered = recovered.clone();
        let held = Held {
            slot: 1,
            raw: held.raw.clone(),
            image: held.image,
        };
        Box::new(move || {
            let vol = Volume { mem, geo, sb };
            let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
            let x = vol.host(vol.mem.clone(), 0, clock.clone());
            let result = recover_slot(
                x.as_ref(),
                &vol.geo,
                vol.sb.volume_uuid,
                held,
                (0, X),
                None,
                vol.timing(clock.as_ref()),
            );
            if let Ok(mut r) = recovered.lock() {
                *r = Some(result.map_err(|e| format!("{e:#}")));
            }
        }) as Box<dyn FnOnce() + Send>
    };
    let paused = Arc::new(BeforeWriteOf {
        inner: vol.mem.clone(),
        offset: slot1,
        before: Mutex::new(Some(x_recovers)),
    });
    let clock: Arc<dyn Clock> = Arc::new(FrozenClock);
    let r_lun: Arc<dyn Lun> = Arc::new(
        PaxosLun::new(
            paused,
            vol.region(),
            Owner {
                slot: 1,
                generation: 1,
            },
            clock.clone(),
            TokenTiming::for_token(u64::from(vol.sb.paxos_token_ms)),
        )
        .with_delta_sectors(DeltaSectors::heartbeats(
            &vol.geo,
            1,
            paxos::delta_timing(&vol.sb),
        )),
    );
    let claim = crate::cluster::SlotClaim {
        slot: 1,
        generation: 1,
        after_crash: false,
        image: held.raw.clone(),
        issued_ms: 0,
    };
    let (interval, lease_time) = (Duration::from_millis(400), Duration::from_millis(2000));
    let lease = Arc::new(Lease::for_claim(clock, &claim, lease_time, interval));
    let member = crate::cluster::Membership::start(r_lun, &vol.geo, claim, lease.clone(), interval);
    assert!(
        within(10, || recovered.lock().is_ok_and(|r| r.is_some())),
        "X did not recover R"
    );
    let outcome = recovered.lock().ok().and_then(|mut r| r.take());
    assert!(matches!(outcome, Some(Ok(()))), "X: {outcome:?}");
    assert!(
        within(3, || lease.is_fenced()),
        "R's renewal landed over X's recovery and R still holds its slot"
    );
    drop(member);
}

/// A LUN on which, right before the first write to the data area lands, the dead
/// host's late renewal lands on its slot; counts the data writes from then on.
struct LateRenewal {
    inner: Arc<MemLun>,
    data_from: u64,
    slot_offset: u64,
    renewal: Vec<u8>,
    landed: std::sync::atomic::AtomicBool,
    data_writes_after: std::sync::atomic::AtomicU32,
}

impl Lun for LateRenewal {
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
        if offset >= self.data_from {
            if !self.landed.swap(true, Ordering::SeqCst) {
                self.inner.write_at(&self.renewal, self.slot_offset)?;
            }
            self.data_writes_after.fetch_add(1, Ordering::SeqCst);
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
        "late renewal".into()
    }
}

#[test]
fn a_replay_stops_at_once_when_its_slot_changes_under_it() {
    // The dead host's late renewal lands on its slot while X replays its journal: X
    // must stop at its next write (the one already past the check lands), not replay
    // the rest over a host that goes on, nor free the slot.
    let vol = volume(400, 2000);
    let held = vol.live(1, R);
    vol.journal(1, 60);
    let mut renewed = held.image;
    renewed.counter += 1;
    renewed.seal();
    let lun = Arc::new(LateRenewal {
        inner: vol.mem.clone(),
        data_from: vol.geo.ag_start * BLOCK_SIZE_U64,
        slot_offset: vol.geo.slot_offset(1),
        renewal: encode_padded(&renewed, SECTOR),
        landed: Default::default(),
        data_writes_after: Default::default(),
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let x = vol.host(lun.clone(), 0, clock.clone());
    let recovered = recover_slot(
        x.as_ref(),
        &vol.geo,
        vol.sb.volume_uuid,
        held,
        (0, X),
        None,
        vol.timing(clock.as_ref()),
    );
    assert!(recovered.is_err(), "the recovery went on");
    assert_eq!(
        lun.data_writes_after.load(Ordering::SeqCst),
        1,
        "replay writes after the slot changed"
    );
    assert_eq!(vol.slot_image(1).map(|s| s.state), Some(SLOT_LIVE));
}

#[test]
fn a_hold_renewal_that_lands_over_a_later_takeover_stops_the_recovery() {
    // X recovers slot 1 and stands still (clock too) inside a renewal of its hold.
    // Meanwhile Z takes the recovery over (X looked dead) and marks the mailbox. X's
    // renewal lands over Z's takeover: X must find Z's mark and stop, not replay on
    // beside Z nor free the slot under it.
    let vol = volume(400, 2000);
    let held = vol.live(1, R);
    let mut claimed = held.image;
    claimed.state = SLOT_RECOVERING;
    claimed.recoverer_uuid = X.0;
    claimed.recoverer_slot = 0;
    claimed.counter += 1;
    claimed.seal();
    let claimed_raw = encode_padded(&claimed, SECTOR);
    let slot1 = vol.geo.slot_offset(1);
    vol.mem.write_at(&claimed_raw, slot1).expect("X's takeover");
    let z_takes_over = {
        let (mem, geo) = (vol.mem.clone(), vol.geo);
        let mut z = claimed;
        z.recoverer_uuid = [0xc2; 16];
        z.recoverer_slot = 2;
        z.counter += 1;
        z.seal();
        Box::new(move || {
            mem.write_at(&encode_padded(&z, SECTOR), slot1)
                .expect("Z's takeover");
            mark_recovered(mem.as_ref(), &geo, 1, RecoveryMark::new(1)).expect("Z's mark");
        }) as Box<dyn FnOnce() + Send>
    };
    let paused = Arc::new(BeforeWriteOf {
        inner: vol.mem.clone(),
        offset: slot1,
        before: Mutex::new(Some(z_takes_over)),
    });
    let clock: Arc<dyn Clock> = Arc::new(FrozenClock);
    let x = vol.host(paused, 0, clock.clone());
    let mut hold = RecoveryHold::new(
        x.as_ref(),
        &vol.geo,
        1,
        claimed_raw,
        0,
        vol.timing(clock.as_ref()),
    );
    let marks = MarkWatch::for_lun(x.as_ref(), &vol.geo, 1).expect("Disk Paxos");
    let ours = RecoveryMark::new(1);
    mark_recovered(x.as_ref(), &vol.geo, 1, ours).expect("X's mark");
    hold.marks = Some((marks, ours));
    hold.renew_once().expect("renewal");
    assert!(
        hold.check().is_err(),
        "X's renewal landed over Z's takeover and X still holds the recovery"
    );
}
