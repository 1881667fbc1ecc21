//! Claiming, renewing and releasing this host's heartbeat slot.

use super::mailbox::{recovery_mark, RecoveryMark};
use super::{boot_id, hostname, Clock, HostUuid, Lease};
use crate::format::{
    encode_padded, put_str, Geometry, HeartbeatSlot, OnDisk, SLOT_FREE, SLOT_LIVE, SLOT_RECOVERING,
};
use crate::lun::{AtsKind, Caw, Lun, LunError};
use anyhow::{anyhow, bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Attempts to claim a slot before giving up (each retry follows another host's
/// concurrent claim of the slot we chose).
const CLAIM_ATTEMPTS_MAX: u32 = 16;
/// Times a mount waits (`RETRY_DELAY` each) for another host to finish recovering
/// this host's slot.
const RECOVERY_WAITS_MAX: u32 = 300;
/// Delay between renewal retries after an I/O error or a lost reply.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// The slot a mount claimed.
#[derive(Clone, Debug)]
pub struct SlotClaim {
    pub slot: u32,
    pub generation: u32,
    /// True when the slot was ours and still marked live: this host crashed, and its
    /// journal must be replayed before anything else.
    pub after_crash: bool,
    /// The sector image now on disk.
    pub image: Vec<u8>,
    /// Our clock when the claim's compare-and-write was issued: the lease runs from
    /// there.
    pub issued_ms: u64,
}

/// Reads one slot's sector. `Ok(None)` for a slot that was never used (all zeros).
pub fn read_slot(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
) -> Result<(Vec<u8>, Option<HeartbeatSlot>)> {
    let mut raw = vec![0u8; geo.ats_sector_size as usize];
    lun.read_at(&mut raw, geo.slot_offset(slot))?;
    if raw.iter().all(|&b| b == 0) {
        return Ok((raw, None));
    }
    let decoded = HeartbeatSlot::decode(&raw, geo.hb_start)
        .with_context(|| format!("heartbeat slot {slot}"))?;
    if decoded.slot != slot {
        bail!("heartbeat slot {slot} claims to be slot {}", decoded.slot);
    }
    Ok((raw, Some(decoded)))
}

fn encode_slot(slot: &HeartbeatSlot, sector: u32) -> Vec<u8> {
    let mut sealed = *slot;
    sealed.seal();
    encode_padded(&sealed, sector as usize)
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// This process's PID namespace: the inode number of /proc/self/ns/pid, 0 when
/// it cannot be read.
fn pid_namespace() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok())
        .unwrap_or(0)
}

/// False only when no running (not zombie) process with this pid exists on this
/// kernel. A pid is a number in its own PID namespace (a daemon in a container): in
/// another namespace, or an unknown one (0), it says nothing, and the owner may be
/// alive.
fn process_exists(pid: u32, pid_ns: u32) -> bool {
    if pid_ns == 0 || pid_ns != pid_namespace() {
        return true;
    }
    if pid == 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // A killed daemon whose parent has not reaped it yet is a zombie: it holds nothing.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X"))
}

/// Watches a slot for `window`: true if its image changed (its owner is alive).
fn slot_moves(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
    first: &[u8],
    window: Duration,
    clock: &dyn Clock,
) -> Result<Option<Option<HeartbeatSlot>>> {
    let step = Duration::from_millis(100).min(window);
    let deadline = clock.now_ms() + window.as_millis() as u64;
    while clock.now_ms() < deadline {
        clock.sleep(step);
        let (raw, image) = read_slot(lun, geo, slot)?;
        if raw != first {
            return Ok(Some(image));
        }
    }
    Ok(None)
}

/// Claims a heartbeat slot for `me`: our own slot if we have one (after a crash, once
/// it is certain that no live process holds it), otherwise the first free slot.
pub fn claim_slot(
    lun: &dyn Lun,
    geo: &Geometry,
    me: HostUuid,
    interval: Duration,
    lease: Duration,
    clock: &dyn Clock,
) -> Result<SlotClaim> {
    let my_boot = boot_id().context("cannot tell this kernel from others; not mounting")?;
    let mut waits = 0u32;
    for _ in 0..CLAIM_ATTEMPTS_MAX + RECOVERY_WAITS_MAX {
        let mut mine = None;
        let mut free = None;
        for slot in 0..geo.max_hosts {
            let (raw, decoded) = read_slot(lun, geo, slot)?;
            match decoded {
                Some(s) if s.host_uuid == me.0 => {
                    mine = Some((slot, raw, s));
                    break;
                }
                Some(s) if s.state == SLOT_FREE && free.is_none() => free = Some((slot, raw, s)),
                None if free.is_none() => free = Some((slot, raw, HeartbeatSlot::zeroed())),
                _ => {}
            }
        }
        let mut after_crash = false;
        let (slot, raw, old) = match (mine, free) {
            (Some((slot, raw, old)), _) => {
                if old.state == SLOT_RECOVERING && old.recoverer_uuid != me.0 {
                    // Another host is replaying our journal: wait for it to free the slot.
                    waits += 1;
                    if waits > RECOVERY_WAITS_MAX {
                        bail!(
                            "host {} has been recovering this host's slot {slot} for a long time; \
                             mount again later",
                            HostUuid(old.recoverer_uuid)
                        );
                    }
                    clock.sleep(RETRY_DELAY);
                    continue;
                }
                if old.state != SLOT_FREE {
                    let same_kernel_dead =
                        old.boot_id == my_boot && !process_exists(old.owner_pid, old.owner_pid_ns);
                    if !same_kernel_dead {
                        tracing::info!(slot, "our slot is marked live: watching it for the lease before taking it back");
                        let window = lease + interval;
                        match slot_moves(lun, geo, slot, &raw, window, clock)? {
                            Some(Some(now)) if now.state == SLOT_LIVE && now.generation == old.generation => bail!(
                                "host {me} is already mounted on this volume (slot {slot} is live); \
                                 give each host its own --host-id"
                            ),
                            // Another host recovered the slot meanwhile: look again.
                            Some(_) => continue,
                            None => {}
                        }
                    }
                    after_crash = true;
                }
                (slot, raw, old)
            }
            (None, Some(found)) => found,
            (None, None) => bail!(
                "all {} host slots are in use; unmount a host or make the volume with a larger -N",
                geo.max_hosts
            ),
        };
        let mut next = old;
        next.magic = HeartbeatSlot::MAGIC;
        next.slot = slot;
        next.host_uuid = me.0;
        if after_crash {
            // Our own crashed slot: recover it first, keeping the old generation so
            // that nobody treats its locks as stale before its journal is replayed.
            next.state = SLOT_RECOVERING;
            next.recoverer_uuid = me.0;
            next.recoverer_slot = slot;
        } else {
            next.state = SLOT_LIVE;
            next.generation = old.generation.wrapping_add(1).max(1);
        }
        next.counter = old.counter.wrapping_add(1);
        next.boot_id = my_boot;
        next.owner_pid = std::process::id();
        next.owner_pid_ns = pid_namespace();
        next.wall_clock_ms = wall_clock_ms();
        if !after_crash {
            next.recoverer_uuid = [0; 16];
            next.recoverer_slot = 0;
        }
        put_str(&mut next.hostname, &hostname());
        let image = encode_slot(&next, geo.ats_sector_size);
        let issued_ms = clock.now_ms();
        match caw_looked(lun, geo.slot_offset(slot), &raw, &image)? {
            Caw::Written => {
                return Ok(SlotClaim {
                    slot,
                    generation: next.generation,
                    after_crash,
                    image,
                    issued_ms,
                })
            }
            Caw::Miscompare(actual) if actual == image => {
                return Ok(SlotClaim {
                    slot,
                    generation: next.generation,
                    after_crash,
                    image,
                    issued_ms,
                })
            }
            Caw::Miscompare(_) => {
                tracing::debug!(slot, "lost the race for a slot; choosing again");
            }
        }
    }
    bail!("could not claim a heartbeat slot after {CLAIM_ATTEMPTS_MAX} attempts: too many hosts are mounting at once")
}

/// Whether a delta-lease claim (`claim_slot` over `cluster::delta::DeltaLun`) may
/// write a slot that holds `image`, racing another writer. A claimer writes only a
/// slot it read FREE or never used, or its own slot (LIVE, or RECOVERING by itself
/// after a crash in its own replay); a slot RECOVERING under another host's recovery
/// it only waits for. So a change from such an image races only writers that hold
/// the Disk Paxos token (or, with a clock that stood still, a late write of its old
/// owner, which no settle bounds: see the recovery's mailbox mark).
pub(crate) fn claim_may_race(image: &[u8]) -> bool {
    match HeartbeatSlot::decode(image, 0) {
        Ok(slot) => !(slot.state == SLOT_RECOVERING && slot.recoverer_uuid != slot.host_uuid),
        Err(_) => true,
    }
}

/// Whether two images of a slot name the same holder (owner, generation, state and
/// recoverer). A counter ahead is a renewal of the same holder, not a takeover.
pub(crate) fn same_holder(a: &[u8], b: &[u8]) -> bool {
    let holder = |raw: &[u8]| {
        HeartbeatSlot::decode(raw, 0).ok().map(|s| {
            (
                s.host_uuid,
                s.generation,
                s.state,
                s.recoverer_uuid,
                s.recoverer_slot,
            )
        })
    };
    a == b || matches!((holder(a), holder(b)), (Some(x), Some(y)) if x == y)
}

/// Where a recovery of a slot leaves its mark, on a Disk Paxos volume: the slot's
/// mailbox (`mailbox::mark_recovered`). A writer of the slot's heartbeat sector without
/// the token (its owner's renewals) or with it (a recoverer's) reads it after each
/// write: with a clock that stood still between its read and its write (a paused VM),
/// its write may have landed over a takeover confirmed meanwhile, and erased it; the
/// recoverer marked the mailbox before it replayed anything, so the late writer finds
/// the mark and gives the slot up (docs/locking.md, "Recovery of a Disk Paxos slot").
#[derive(Clone, Copy)]
pub(crate) struct MarkWatch {
    geo: Geometry,
    slot: u32,
}

impl MarkWatch {
    /// The watch of `slot` when `lun` takes the Disk Paxos token; `None` otherwise (a
    /// hardware or emulated compare-and-write cannot land over a takeover).
    pub(crate) fn for_lun(lun: &dyn Lun, geo: &Geometry, slot: u32) -> Option<MarkWatch> {
        (lun.ats_kind() == AtsKind::DiskPaxos).then_some(MarkWatch { geo: *geo, slot })
    }

    /// Why we no longer hold the slot at `generation`: a recovery other than `ours`
    /// marked it.
    pub(crate) fn taken(
        &self,
        lun: &dyn Lun,
        generation: u32,
        ours: Option<RecoveryMark>,
    ) -> Result<Option<String>, LunError> {
        let mark = recovery_mark(lun, &self.geo, self.slot)?;
        Ok(mark
            .filter(|m| m.generation == generation && Some(*m) != ours)
            .map(|_| {
                format!(
                    "another host recovered slot {} (generation {generation}) while our write \
                     of it was on its way: we were declared dead",
                    self.slot
                )
            }))
    }
}

/// Turns a slot claimed for our own crash recovery (RECOVERING, old generation) into
/// a live one with a new generation, once our journal is replayed.
pub fn go_live(lun: &dyn Lun, geo: &Geometry, claim: SlotClaim) -> Result<SlotClaim> {
    let marks = MarkWatch::for_lun(lun, geo, claim.slot);
    let Some((generation, image)) = go_live_from(
        lun,
        geo.slot_offset(claim.slot),
        claim.slot,
        &claim.image,
        marks,
    )?
    else {
        return Ok(claim);
    };
    Ok(SlotClaim {
        generation,
        image,
        ..claim
    })
}

/// CAW(`current` -> LIVE with a new generation); `None` when already live. Returns the
/// new generation and image.
fn go_live_from(
    lun: &dyn Lun,
    offset: u64,
    slot: u32,
    current: &[u8],
    marks: Option<MarkWatch>,
) -> Result<Option<(u32, Vec<u8>)>> {
    let old = HeartbeatSlot::decode(current, 0).context("our own slot image")?;
    if old.state == SLOT_LIVE {
        return Ok(None);
    }
    let mut next = old;
    next.state = SLOT_LIVE;
    next.generation = old.generation.wrapping_add(1).max(1);
    next.counter = old.counter.wrapping_add(1);
    next.recoverer_uuid = [0; 16];
    next.recoverer_slot = 0;
    next.wall_clock_ms = wall_clock_ms();
    let image = encode_slot(&next, current.len() as u32);
    match caw_looked(lun, offset, current, &image)? {
        Caw::Written => {}
        Caw::Miscompare(actual) if actual == image => {}
        Caw::Miscompare(_) => bail!(
            "another host took over slot {slot} while this host was replaying its own journal; mount again"
        ),
    }
    if let Some(reason) = marks
        .map(|m| m.taken(lun, old.generation, None))
        .transpose()?
        .flatten()
    {
        bail!("{reason}; mount again");
    }
    Ok(Some((next.generation, image)))
}

/// This host's membership: the claimed slot and the thread that renews it.
pub struct Membership {
    lun: Arc<dyn Lun>,
    offset: u64,
    sector: u32,
    marks: Option<MarkWatch>,
    pub slot: u32,
    pub generation: u32,
    lease: Arc<Lease>,
    current: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Membership {
    /// Starts renewing a claimed slot every `interval`.
    pub fn start(
        lun: Arc<dyn Lun>,
        geo: &Geometry,
        claim: SlotClaim,
        lease: Arc<Lease>,
        interval: Duration,
    ) -> Membership {
        let offset = geo.slot_offset(claim.slot);
        let marks = MarkWatch::for_lun(lun.as_ref(), geo, claim.slot);
        let current = Arc::new(Mutex::new(claim.image));
        let stop = Arc::new(AtomicBool::new(false));
        lease.watch_slot(SlotWatch {
            lun: lun.clone(),
            offset,
            sector: geo.ats_sector_size,
            current: current.clone(),
        });
        let renewer = Renewer {
            lun: lun.clone(),
            offset,
            sector: geo.ats_sector_size,
            marks,
            lease: lease.clone(),
            current: current.clone(),
            stop: stop.clone(),
            interval,
        };
        let thread = std::thread::Builder::new()
            .name(format!("heartbeat-{}", claim.slot))
            .spawn(move || renewer.run())
            .ok();
        if thread.is_none() {
            lease.fence("could not start the heartbeat thread");
        }
        Membership {
            lun,
            offset,
            sector: geo.ats_sector_size,
            marks,
            slot: claim.slot,
            generation: claim.generation,
            lease,
            current,
            stop,
            thread,
        }
    }

    pub fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }

    /// Takes a slot claimed for our own crash recovery (renewed meanwhile, so nobody
    /// recovers it under us) live with a new generation, once our journal is
    /// replayed. Counts as a renewal.
    pub fn go_live(&mut self) -> Result<u32> {
        self.lease
            .confirm()
            .map_err(|e| anyhow!("not going live: {e}"))?;
        let mut current = self
            .current
            .lock()
            .map_err(|_| anyhow!("heartbeat state poisoned"))?;
        let issued = self.lease.clock().now_ms();
        let went = go_live_from(
            self.lun.as_ref(),
            self.offset,
            self.slot,
            &current,
            self.marks,
        );
        let Some((generation, image)) =
            went.inspect_err(|e| self.lease.fence(&format!("{e:#}")))?
        else {
            return Ok(self.generation);
        };
        *current = image;
        self.lease.renewed(issued);
        self.generation = generation;
        Ok(generation)
    }

    /// Stops renewing and frees the slot (keeping our UUID in it, so this host gets
    /// the same slot back next time). Not done when fenced: the slot is no longer ours.
    pub fn release(mut self) -> Result<()> {
        self.stop_thread();
        self.lease
            .confirm()
            .map_err(|e| anyhow!("not releasing the heartbeat slot: {e}"))?;
        // The Disk Paxos token goes back before the slot (its dblock is the slot's).
        if let Err(e) = self.lun.retire() {
            tracing::warn!("giving the Disk Paxos token back at unmount: {e}");
        }
        let current = self
            .current
            .lock()
            .map_err(|_| anyhow!("heartbeat state poisoned"))?
            .clone();
        let mut slot = HeartbeatSlot::decode(&current, 0).context("our own heartbeat image")?;
        slot.state = SLOT_FREE;
        slot.counter = slot.counter.wrapping_add(1);
        slot.owner_pid = 0;
        slot.wall_clock_ms = wall_clock_ms();
        let image = encode_slot(&slot, self.sector);
        match caw_looked(self.lun.as_ref(), self.offset, &current, &image)? {
            Caw::Written => {}
            Caw::Miscompare(actual) if actual == image => {}
            Caw::Miscompare(_) => {
                bail!("our heartbeat slot was changed by another host while we held it")
            }
        }
        self.lun.flush()?;
        Ok(())
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Our heartbeat slot as the lease re-reads it when a renewal is late: the image
/// the renewer last wrote, and where it is.
pub(crate) struct SlotWatch {
    lun: Arc<dyn Lun>,
    offset: u64,
    sector: u32,
    current: Arc<Mutex<Vec<u8>>>,
}

impl SlotWatch {
    /// A watch of `image` at `offset`, without a heartbeat thread (tests).
    #[cfg(test)]
    pub(crate) fn new(lun: Arc<dyn Lun>, offset: u64, sector: u32, image: Vec<u8>) -> SlotWatch {
        SlotWatch {
            lun,
            offset,
            sector,
            current: Arc::new(Mutex::new(image)),
        }
    }

    /// Re-reads the slot; `Some(reason)` when another host changed who holds it (its
    /// owner, generation, state or recoverer). A counter ahead of ours is our own
    /// renewal whose reply was lost, not a takeover.
    pub(crate) fn taken(&self) -> Result<Option<String>, LunError> {
        // Holding `current` waits for a renewal in flight, so the image is settled.
        let Ok(current) = self.current.lock() else {
            return Ok(Some("heartbeat state poisoned".into()));
        };
        let mut actual = vec![0u8; self.sector as usize];
        self.lun.read_at(&mut actual, self.offset)?;
        if same_holder(&current, &actual) {
            return Ok(None);
        }
        Ok(Some(
            "another host changed our heartbeat slot while our renewal was late: \
             we were declared dead"
                .into(),
        ))
    }
}

struct Renewer {
    lun: Arc<dyn Lun>,
    offset: u64,
    sector: u32,
    marks: Option<MarkWatch>,
    lease: Arc<Lease>,
    current: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    interval: Duration,
}

impl Renewer {
    fn run(self) {
        let clock = self.lease.clock().clone();
        while !self.stop.load(Ordering::SeqCst) && !self.lease.is_fenced() {
            let delay = match self.renew_once(clock.as_ref()) {
                Ok(()) => self.interval,
                Err(e) => {
                    tracing::warn!("heartbeat renewal failed, retrying: {e}");
                    RETRY_DELAY
                }
            };
            // Sleep in short steps so unmount does not wait a whole interval.
            let mut left = delay;
            while !left.is_zero() && !self.stop.load(Ordering::SeqCst) {
                let step = left.min(Duration::from_millis(10));
                clock.sleep(step);
                left -= step;
            }
        }
    }

    fn renew_once(&self, clock: &dyn Clock) -> Result<(), LunError> {
        // Past the lease the host is fenced for good, even if nobody took the slot.
        self.lease.check()?;
        let Ok(mut current) = self.current.lock() else {
            self.lease.fence("heartbeat state poisoned");
            return Ok(());
        };
        let issued = clock.now_ms();
        // The heartbeat itself bypasses the lease guard: renewing is how the lease is kept.
        let renewal = renew_image(self.lun.as_ref(), self.offset, self.sector, &current);
        if let Err(LunError::Fenced(why)) = &renewal {
            // The storage refused our write: another host fenced us.
            self.lease.fence(why);
        }
        match renewal? {
            Renewal::Renewed(next) => {
                let before = std::mem::replace(&mut *current, next);
                // Without the token our renewal may have landed over a takeover
                // (a clock that stood still between its read and its write). Until
                // the mark is read, the renewal does not count (the next one, from
                // the image now on disk, reads it again).
                match self.taken_while_renewing(&before)? {
                    Some(reason) => self.lease.fence(&reason),
                    None => self.lease.renewed(issued),
                }
            }
            Renewal::Lost(reason) => self.lease.fence(&reason),
        }
        Ok(())
    }

    /// On a Disk Paxos volume: the mark of a recovery of our generation, read after
    /// our renewal landed (`MarkWatch`).
    fn taken_while_renewing(&self, before: &[u8]) -> Result<Option<String>, LunError> {
        let Some(marks) = self.marks else {
            return Ok(None);
        };
        let Ok(slot) = HeartbeatSlot::decode(before, 0) else {
            return Ok(Some("our heartbeat image does not decode".into()));
        };
        marks.taken(self.lun.as_ref(), slot.generation, None)
    }
}

/// Compare-and-write of a slot that looks when the call fails: the write may have
/// landed with its reply lost. Then the sector no longer holds `expected`, and what it
/// holds comes back as a miscompare (our own `new` image if the write landed, which
/// callers count as written). A failure with the sector unchanged is returned, and so
/// is `Fenced` at once (a refused write, or one the LUN does not trust: its image in
/// the sector proves nothing).
pub(crate) fn caw_looked(
    lun: &dyn Lun,
    offset: u64,
    expected: &[u8],
    new: &[u8],
) -> Result<Caw, LunError> {
    match lun.compare_and_write(offset, expected, new) {
        Ok(outcome) => Ok(outcome),
        // Refused (lease, storage), or a write that is not trusted: what the sector
        // holds proves nothing.
        Err(e @ LunError::Fenced(_)) => Err(e),
        Err(e) => {
            let mut actual = vec![0u8; expected.len()];
            lun.read_at(&mut actual, offset)?;
            if actual == expected {
                return Err(e);
            }
            Ok(Caw::Miscompare(actual))
        }
    }
}

/// What one renewal of a slot found.
pub(crate) enum Renewal {
    /// The slot holds the renewed image now.
    Renewed(Vec<u8>),
    /// Another host changed the slot (we were declared dead), or our image is broken.
    Lost(String),
}

/// Renews a slot we hold: CAW(`current` -> counter + 1). A failed call whose write
/// landed (reply lost) and a miscompare that shows our own new image both count as
/// renewed; an error with the slot unchanged is returned for a retry.
pub(crate) fn renew_image(
    lun: &dyn Lun,
    offset: u64,
    sector: u32,
    current: &[u8],
) -> Result<Renewal, LunError> {
    let Ok(mut slot) = HeartbeatSlot::decode(current, 0) else {
        return Ok(Renewal::Lost("our heartbeat image does not decode".into()));
    };
    slot.counter = slot.counter.wrapping_add(1);
    slot.wall_clock_ms = wall_clock_ms();
    let next = encode_slot(&slot, sector);
    match caw_looked(lun, offset, current, &next)? {
        Caw::Written => Ok(Renewal::Renewed(next)),
        // A false miscompare: our new image is there, only the reply was lost.
        Caw::Miscompare(actual) if actual == next => Ok(Renewal::Renewed(next)),
        // A miscompare that reports the very image we expected (a device fault, or a
        // miscompare of bytes outside what it returned): nothing changed; try again.
        Caw::Miscompare(actual) if actual == current => Err(LunError::Io {
            device: lun.describe(),
            op: "heartbeat compare-and-write",
            offset,
            source: std::io::Error::other(
                "the device reported a miscompare but the slot holds what we expected",
            ),
        }),
        Caw::Miscompare(_) => Ok(Renewal::Lost(
            "another host changed our heartbeat slot: we were declared dead".into(),
        )),
    }
}

use bytemuck::Zeroable;
