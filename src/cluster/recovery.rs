//! Recovering other hosts' slots: their journal is replayed and their slot freed, so
//! nothing they committed is lost. At mount on a volume with emulated ATS, hosts of
//! another kernel are refused (their test-and-set would not be atomic with ours).
//!
//! Invariants:
//! - The recoverer renews the RECOVERING slot every interval while it replays, as a
//!   heartbeat, so a replay longer than the lease never looks like a dead recoverer
//!   (`RecoveryHold`). Its replay writes only while that hold is valid by its own
//!   clock (`now < last renewal issued + lease - interval`), like a host's lease: when
//!   a renewal finds the slot changed, or fails for that long, the replay stops and
//!   the slot is not freed. Another host recovers the silent slot again.
//! - A host recovers other slots through its own lease-guarded LUN, so its recovery
//!   stops with its own lease too.
//! - Every replay write and flush re-reads the slot first (`RecoveryHold::confirm`):
//!   a slot that no longer names us as its recoverer stops the replay at once.
//! - On a Disk Paxos volume the recoverer marks the slot's mailbox before it replays
//!   anything, so that the slot's owner, whose renewal without the token may land
//!   over the takeover, finds the mark and fences itself (`heartbeat::MarkWatch`).

use super::heartbeat::{caw_looked, read_slot, renew_image, same_holder, MarkWatch, Renewal};
use super::mailbox::{mark_recovered, RecoveryMark};
use super::{Clock, HostUuid};
use crate::format::{
    encode_padded, Geometry, HeartbeatSlot, OnDisk, SLOT_FREE, SLOT_LIVE, SLOT_RECOVERING,
};
use crate::journal::Journal;
use crate::lun::{Caw, Lun, LunError, LunResult};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A slot another host holds, as first seen.
pub(crate) struct Held {
    pub slot: u32,
    pub raw: Vec<u8>,
    pub image: HeartbeatSlot,
}

/// Watches every other slot marked in use by a host of another kernel (`boot_id`)
/// for `lease + interval` on our own clock. Refuses when any of them moves: emulated
/// ATS is atomic only within one kernel. Recovers the ones that do not move, when
/// `recover` (a read-only host leaves them to a read-write one).
#[allow(clippy::too_many_arguments)]
pub fn settle_foreign_slots(
    lun: &dyn Lun,
    geo: &Geometry,
    volume_uuid: [u8; 16],
    my_slot: u32,
    me: HostUuid,
    interval: Duration,
    lease: Duration,
    clock: &dyn Clock,
    recover: bool,
) -> Result<()> {
    let mut held = Vec::new();
    let my_boot = super::boot_id()?;
    for slot in (0..geo.max_hosts).filter(|&s| s != my_slot) {
        let (raw, image) = read_slot(lun, geo, slot)?;
        if let Some(image) = image.filter(|i| i.state != SLOT_FREE && i.boot_id != my_boot) {
            held.push(Held { slot, raw, image });
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    tracing::info!(
        slots = ?held.iter().map(|h| h.slot).collect::<Vec<_>>(),
        "slots of hosts on another kernel are marked in use; watching them for the lease"
    );
    let deadline = clock.now_ms() + (lease + interval).as_millis() as u64;
    while clock.now_ms() < deadline {
        clock.sleep(Duration::from_millis(100));
        for h in &held {
            let (raw, image) = read_slot(lun, geo, h.slot)?;
            if raw != h.raw {
                let who = image
                    .map(|i| {
                        format!(
                            "{} ({})",
                            HostUuid(i.host_uuid),
                            crate::format::get_str(&i.hostname)
                        )
                    })
                    .unwrap_or_default();
                bail!(
                    "host {who} on another kernel uses this volume now (slot {}), and the volume's \
                     test-and-set is emulated with file locks, which are atomic only within one \
                     kernel: mount it from that machine, or use a LUN with real COMPARE AND WRITE",
                    h.slot
                );
            }
        }
    }
    if !recover {
        tracing::info!(
            slots = ?held.iter().map(|h| h.slot).collect::<Vec<_>>(),
            "hosts of another kernel left these slots; a read-only host does not recover them"
        );
        return Ok(());
    }
    let timing = Timing {
        interval,
        lease,
        clock,
    };
    for h in held {
        // Emulated volumes only: no storage-side fencing to do.
        recover_slot(lun, geo, volume_uuid, h, (my_slot, me), None, timing)?;
    }
    Ok(())
}

/// How a recovery is timed: the volume's heartbeat interval and lease, on a clock.
#[derive(Clone, Copy)]
pub(crate) struct Timing<'a> {
    pub interval: Duration,
    pub lease: Duration,
    pub clock: &'a dyn Clock,
}

/// Claims a dead host's slot for recovery (by ATS, so only one host recovers it),
/// replays its journal while renewing the claim, then frees the slot.
pub(crate) fn recover_slot(
    lun: &dyn Lun,
    geo: &Geometry,
    volume_uuid: [u8; 16],
    h: Held,
    recoverer: (u32, HostUuid),
    fence_key: Option<crate::lun::ReservationKey>,
    timing: Timing<'_>,
) -> Result<()> {
    let (my_slot, me) = recoverer;
    let sector = geo.ats_sector_size as usize;
    let mut claimed = h.image;
    claimed.state = SLOT_RECOVERING;
    claimed.recoverer_uuid = me.0;
    claimed.recoverer_slot = my_slot;
    claimed.counter = claimed.counter.wrapping_add(1);
    claimed.seal();
    let claimed_raw = encode_padded(&claimed, sector);
    let issued_ms = timing.clock.now_ms();
    match caw_looked(lun, geo.slot_offset(h.slot), &h.raw, &claimed_raw)? {
        Caw::Written => {}
        Caw::Miscompare(actual) if actual == claimed_raw => {}
        Caw::Miscompare(_) => bail!(
            "slot {} changed while we were about to recover it; mount again",
            h.slot
        ),
    }
    let dead = HostUuid(h.image.host_uuid);
    let was = if h.image.state == SLOT_LIVE {
        "crashed host"
    } else {
        "interrupted recovery of host"
    };
    // The storage refuses the dead host's writes from now on (where it can): a write
    // it still had on its way must not land on what the replay writes. And a recovery
    // we take over: the stalled recoverer's too.
    if h.image.state == SLOT_RECOVERING {
        if let Some((key, whose)) = stalled_recoverer_key(lun, geo, &h.image) {
            super::fence::fence_key(lun, fence_key, key, &whose)?;
        }
    }
    super::fence::fence_dead(lun, fence_key, h.slot, h.image.generation)?;
    // On a Disk Paxos volume the dead host renews without the token: a renewal it
    // began before a pause of its clock can still land over our takeover and erase
    // it. Our mark, written before anything is replayed, makes it give the slot up
    // when it reads the mark after that renewal (`MarkWatch`); and every replay write
    // re-reads the slot first (`RecoveryHold::confirm`).
    let marks = MarkWatch::for_lun(lun, geo, h.slot);
    let mark = RecoveryMark::new(h.image.generation);
    if marks.is_some() {
        mark_recovered(lun, geo, h.slot, mark)
            .with_context(|| format!("marking slot {} as recovered", h.slot))?;
    }
    tracing::info!(slot = h.slot, host = %dead, "recovering {was}: replaying its journal");
    let mut hold = RecoveryHold::new(lun, geo, h.slot, claimed_raw, issued_ms, timing);
    hold.marks = marks.map(|m| (m, mark));
    let report = hold.replay(volume_uuid)?;
    tracing::info!(
        slot = h.slot,
        transactions = report.transactions,
        "journal replayed"
    );
    hold.free()
}

/// The reservation key of the recoverer a RECOVERING slot names, when it is not the
/// slot's own host replaying its own journal (that one has the slot's key): a host in
/// another slot (its key is that slot's current life, if the slot still names it) or
/// a tool (`atsfs recover`, `fsck --repair`: `fence::tool_key` of its uuid).
fn stalled_recoverer_key(
    lun: &dyn Lun,
    geo: &Geometry,
    image: &crate::format::HeartbeatSlot,
) -> Option<(crate::lun::ReservationKey, String)> {
    if image.recoverer_uuid == image.host_uuid {
        return None;
    }
    if image.recoverer_slot == image.slot {
        let key = super::fence::tool_key(image.recoverer_uuid);
        return Some((
            key,
            format!("the tool that was recovering slot {}", image.slot),
        ));
    }
    let (_, theirs) = read_slot(lun, geo, image.recoverer_slot).ok()?;
    let theirs = theirs.filter(|s| s.host_uuid == image.recoverer_uuid)?;
    Some((
        super::fence::host_key(image.recoverer_slot, theirs.generation),
        format!(
            "the host in slot {} that was recovering slot {}",
            image.recoverer_slot, image.slot
        ),
    ))
}

/// A recoverer's hold on a RECOVERING slot: renewed every interval while the
/// journal is replayed (see the module invariants).
struct RecoveryHold<'a> {
    lun: &'a dyn Lun,
    geo: &'a Geometry,
    slot: u32,
    timing: Timing<'a>,
    /// The slot's image as we last wrote it.
    current: Mutex<Vec<u8>>,
    /// The image of our takeover: every later image of ours names the same holder.
    claimed: Vec<u8>,
    /// Disk Paxos: where a recovery leaves its mark, and ours.
    marks: Option<(MarkWatch, RecoveryMark)>,
    /// Clock time at which the last successful renewal (or the claim) was issued.
    renewed_at_ms: AtomicU64,
    /// Why the hold was lost, once it is.
    lost: Mutex<Option<String>>,
    done: AtomicBool,
}

impl<'a> RecoveryHold<'a> {
    fn new(
        lun: &'a dyn Lun,
        geo: &'a Geometry,
        slot: u32,
        claimed: Vec<u8>,
        issued_ms: u64,
        timing: Timing<'a>,
    ) -> RecoveryHold<'a> {
        RecoveryHold {
            lun,
            geo,
            slot,
            timing,
            current: Mutex::new(claimed.clone()),
            claimed,
            marks: None,
            renewed_at_ms: AtomicU64::new(issued_ms),
            lost: Mutex::new(None),
            done: AtomicBool::new(false),
        }
    }

    /// Replays the slot's journal through `HeldLun` while a thread renews the hold.
    fn replay(&self, volume_uuid: [u8; 16]) -> Result<crate::journal::ReplayReport> {
        let slot = self.slot;
        std::thread::scope(|scope| {
            let renewer = std::thread::Builder::new()
                .name(format!("recovering-{slot}"))
                .spawn_scoped(scope, || self.renew_until_done())
                .map_err(|e| anyhow!("starting the renewal of slot {slot}: {e}"))?;
            let held = HeldLun { hold: self };
            let replayed = Journal::open_and_replay(&held, self.geo, slot, volume_uuid);
            self.done.store(true, Ordering::SeqCst);
            let _ = renewer.join();
            let (_, report) =
                replayed.with_context(|| format!("replaying the journal of slot {slot}"))?;
            Ok(report)
        })
    }

    fn renew_until_done(&self) {
        let clock = self.timing.clock;
        while !self.done.load(Ordering::SeqCst) && self.check().is_ok() {
            let delay = match self.renew_once() {
                Ok(()) => self.timing.interval,
                Err(e) => {
                    tracing::warn!(
                        slot = self.slot,
                        "renewing a recovery failed, retrying: {e}"
                    );
                    Duration::from_millis(100).min(self.timing.interval)
                }
            };
            let mut left = delay;
            while !left.is_zero() && !self.done.load(Ordering::SeqCst) {
                let step = left.min(Duration::from_millis(10));
                clock.sleep(step);
                left -= step;
            }
        }
    }

    fn renew_once(&self) -> Result<(), LunError> {
        let Ok(mut current) = self.current.lock() else {
            self.lose("recovery state poisoned");
            return Ok(());
        };
        let issued_ms = self.timing.clock.now_ms();
        let offset = self.geo.slot_offset(self.slot);
        match renew_image(self.lun, offset, self.geo.ats_sector_size, &current)? {
            Renewal::Renewed(next) => {
                let before = std::mem::replace(&mut *current, next);
                // A renewal that stood still (its clock too) may have landed over a
                // later recoverer's takeover: its mark says so. Until the mark is
                // read, the renewal does not count.
                if let Some((marks, ours)) = self.marks {
                    let generation = HeartbeatSlot::decode(&before, 0)
                        .map(|s| s.generation)
                        .unwrap_or_default();
                    if let Some(reason) = marks.taken(self.lun, generation, Some(ours))? {
                        self.lose(&reason);
                        return Ok(());
                    }
                }
                self.renewed_at_ms.fetch_max(issued_ms, Ordering::SeqCst);
            }
            Renewal::Lost(_) => {
                self.lose("another host changed the slot we were recovering");
            }
        }
        Ok(())
    }

    fn lose(&self, reason: &str) {
        if let Ok(mut lost) = self.lost.lock() {
            if lost.is_none() {
                tracing::error!(slot = self.slot, "recovery stopped: {reason}");
                *lost = Some(reason.to_string());
            }
        }
    }

    /// Ok while the recoverer may write: the hold is not lost and its last renewal
    /// was issued less than `lease - interval` ago.
    fn check(&self) -> LunResult<()> {
        let lost = self.lost.lock().map(|l| l.clone()).unwrap_or(None);
        if let Some(reason) = lost {
            return Err(LunError::Fenced(format!(
                "recovery of slot {}: {reason}",
                self.slot
            )));
        }
        let valid_ms = self
            .timing
            .lease
            .saturating_sub(self.timing.interval)
            .as_millis() as u64;
        let age_ms = self
            .timing
            .clock
            .now_ms()
            .saturating_sub(self.renewed_at_ms.load(Ordering::SeqCst));
        if age_ms >= valid_ms {
            self.lose(&format!("the recovery was not renewed for {age_ms} ms"));
            return self.check();
        }
        Ok(())
    }

    /// `check`, and a read of the slot: it must still name us as its recoverer. Before
    /// every replay write, so that a late write of the slot's own host (a renewal it
    /// began before its clock stood still, landing over our takeover) stops the replay
    /// at once, not at our next renewal.
    fn confirm(&self) -> LunResult<()> {
        self.check()?;
        let mut actual = vec![0u8; self.claimed.len()];
        self.lun
            .read_at(&mut actual, self.geo.slot_offset(self.slot))?;
        if !same_holder(&self.claimed, &actual) {
            self.lose("the slot changed under the recovery (its host wrote it late, or another host took it over)");
            return self.check();
        }
        Ok(())
    }

    /// Frees the slot: CAW from the image we last renewed, while the hold is valid.
    fn free(&self) -> Result<()> {
        self.check()
            .map_err(|e| anyhow!("not freeing slot {}: {e}", self.slot))?;
        let current = self
            .current
            .lock()
            .map_err(|_| anyhow!("recovery state poisoned"))?;
        let mut freed = HeartbeatSlot::decode(&current, 0).context("our recovery image")?;
        freed.state = SLOT_FREE;
        freed.owner_pid = 0;
        freed.counter = freed.counter.wrapping_add(1);
        freed.seal();
        let freed_raw = encode_padded(&freed, current.len());
        let offset = self.geo.slot_offset(self.slot);
        match caw_looked(self.lun, offset, &current, &freed_raw)? {
            Caw::Written => {}
            Caw::Miscompare(actual) if actual == freed_raw => {}
            Caw::Miscompare(_) => bail!("slot {} changed during its recovery", self.slot),
        }
        self.lun.flush()?;
        Ok(())
    }
}

/// The LUN as a replay sees it: every write, compare-and-write and flush first checks
/// the recovery's hold, as `GuardedLun` checks a host's lease, and re-reads the slot
/// (`RecoveryHold::confirm`).
struct HeldLun<'a, 'b> {
    hold: &'b RecoveryHold<'a>,
}

impl Lun for HeldLun<'_, '_> {
    fn sector_size(&self) -> u32 {
        self.hold.lun.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.hold.lun.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.hold.lun.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.hold.confirm()?;
        self.hold.lun.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.hold.confirm()?;
        self.hold.lun.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.hold.confirm()?;
        self.hold.lun.flush()
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.hold.lun.read_uncached(buf, offset)
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.hold.confirm()?;
        self.hold.lun.write_uncached(buf, offset)
    }
    fn may_write(&self) -> LunResult<()> {
        self.hold.check()?;
        self.hold.lun.may_write()
    }
    fn describe(&self) -> String {
        self.hold.lun.describe()
    }
    fn ats_kind(&self) -> crate::lun::AtsKind {
        self.hold.lun.ats_kind()
    }
    fn reservations(&self) -> Option<&dyn crate::lun::Reservations> {
        self.hold.lun.reservations()
    }
}

/// What `recover_offline` did with one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OfflineOutcome {
    /// The slot's journal was replayed and the slot freed.
    Recovered,
    /// The slot moved while watched: its host is alive; left alone.
    Live,
    /// The slot was free: nothing to do.
    Free,
}

/// Recovers dead slots without mounting (`atsfs recover`), for volumes that no live
/// host will recover (all hosts down): watches every slot in use (or just `only`) for
/// `lease + interval` on our own clock, and recovers the ones that did not move,
/// exactly as a surviving host would. The tool holds no slot and no lease of its own,
/// except on a Disk Paxos volume: there `lun` is its `ToolSession`'s, and the slot
/// that session holds (named by the tool's uuid) is left alone. The caller's `tool`
/// registration gets the tool past the storage's reservation and names the tool in
/// the slots it claims.
#[allow(clippy::too_many_arguments)]
pub fn recover_offline(
    lun: &dyn Lun,
    geo: &Geometry,
    volume_uuid: [u8; 16],
    tool: &super::fence::ToolRegistration<'_>,
    only: Option<u32>,
    interval: Duration,
    lease: Duration,
    clock: &dyn Clock,
) -> Result<Vec<(u32, OfflineOutcome)>> {
    let slots: Vec<u32> = match only {
        Some(slot) if slot >= geo.max_hosts => bail!(
            "slot {slot} does not exist (the volume has {} slots)",
            geo.max_hosts
        ),
        Some(slot) => vec![slot],
        None => (0..geo.max_hosts).collect(),
    };
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for slot in slots {
        let (raw, image) = read_slot(lun, geo, slot)?;
        // The tool's own slot (a `ToolSession` on a Disk Paxos volume) was free
        // before the tool took it.
        match image.filter(|i| i.state != SLOT_FREE && i.host_uuid != tool.uuid()) {
            Some(image) => held.push(Held { slot, raw, image }),
            None => outcomes.push((slot, OfflineOutcome::Free)),
        }
    }
    let deadline = clock.now_ms() + (lease + interval).as_millis() as u64;
    while !held.is_empty() && clock.now_ms() < deadline {
        clock.sleep(Duration::from_millis(100));
        let mut still = Vec::new();
        for h in held {
            let (raw, _) = read_slot(lun, geo, h.slot)?;
            if raw == h.raw {
                still.push(h);
            } else {
                outcomes.push((h.slot, OfflineOutcome::Live));
            }
        }
        held = still;
    }
    let (fence_key, tool) = (tool.key(), HostUuid(tool.uuid()));
    let timing = Timing {
        interval,
        lease,
        clock,
    };
    for h in held {
        let slot = h.slot;
        recover_slot(lun, geo, volume_uuid, h, (slot, tool), fence_key, timing)?;
        outcomes.push((slot, OfflineOutcome::Recovered));
    }
    outcomes.sort_by_key(|o| o.0);
    Ok(outcomes)
}

#[cfg(test)]
mod tests;
