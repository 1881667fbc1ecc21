//! Storage-side fencing with SCSI-3 persistent reservations, where the LUN has them
//! (`Lun::reservations`). The lease stops a paused host from *issuing* writes once it
//! wakes up; it cannot stop a write that was already on its way to the storage. The
//! storage can: every host registers a key of its own, the LUN is reserved Write
//! Exclusive – Registrants Only, so that only registered initiators may write, and a
//! host that recovers a dead host first removes the dead host's key (PREEMPT AND
//! ABORT, or PREEMPT where the target lacks it). From then on the storage refuses
//! every write of the dead host, late or queued, with RESERVATION CONFLICT, and the
//! dead host, should it wake up, learns from that refusal that it is fenced.
//!
//! - **Keys** (`host_key`): `0x4154` ("AT") in the top 16 bits, the slot in the next
//!   16, the slot's generation in the low 32: one key per life of a slot, so a host
//!   that mounts again never has a key that a recovery of its old life removes.
//!   Before its slot (and so its generation) is known, a mounting host registers a
//!   *joining* key (`JOIN_SLOT`, random low bits), needed because the claim of a slot
//!   is itself a write; it replaces it with its host key once the generation is final.
//!   Offline tools that write (`atsfs recover`, `fsck --repair`) register a *tool* key
//!   (`TOOL_SLOT`) for their run and drop it at the end (`ToolRegistration`).
//! - **Hosts never unregister**, not even at unmount: under Registrants Only one
//!   registrant holds the reservation, and when it unregisters the reservation is
//!   gone, and with it the fence of every host preempted before. A preempt of the
//!   holder's key hands the reservation to the preempting host instead, so it lasts.
//!   Host keys of lives that are over (a slot free, or live at another generation) are
//!   removed by every host at mount (`prune`) and by every recovery. On tgt every
//!   session is a new initiator port, so a key left behind grants nobody a write.
//!
//! Caller's duties: `join` before the first write of a mount; `become_host` once the
//! generation is final; `fence_dead` after the recovery claim of a slot and before
//! its replay.

use crate::lun::{Lun, LunError, ReservationKey, ReservationType, Reservations};
use anyhow::{bail, Context, Result};

/// The top 16 bits of every key atsfs registers.
const KEY_MAGIC: u64 = 0x4154;
/// The slot field of the key of a host that has not claimed its slot yet.
pub const JOIN_SLOT: u32 = 0xfffe;
/// The slot field of the key of an offline tool (no slot of its own).
pub const TOOL_SLOT: u32 = 0xffff;

/// The key of one life of a slot (or, with `JOIN_SLOT` / `TOOL_SLOT`, of a joining
/// host or a tool, with random low bits).
pub fn host_key(slot: u32, generation: u32) -> ReservationKey {
    ReservationKey(KEY_MAGIC << 48 | u64::from(slot & 0xffff) << 32 | u64::from(generation))
}

/// The slot and generation of an atsfs key; None for another program's key.
pub fn key_owner(key: ReservationKey) -> Option<(u32, u32)> {
    if key.0 >> 48 != KEY_MAGIC {
        return None;
    }
    Some((((key.0 >> 32) & 0xffff) as u32, key.0 as u32))
}

/// A key for `slot` (`JOIN_SLOT` or `TOOL_SLOT`) with random low bits (never zero).
fn random_key(slot: u32) -> ReservationKey {
    host_key(slot, rand::random::<u32>() | 1)
}

/// How a host's writes are fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fencing {
    /// By the lease alone: the LUN has no persistent reservations (an image file, a
    /// block device through the kernel, a target without them).
    LeaseOnly(String),
    /// By the storage too: `key` is registered and the LUN is reserved.
    Reservation(ReservationKey),
}

impl Fencing {
    /// The registered key, when the storage fences.
    pub fn key(&self) -> Option<ReservationKey> {
        match self {
            Fencing::LeaseOnly(_) => None,
            Fencing::Reservation(key) => Some(*key),
        }
    }
}

impl std::fmt::Display for Fencing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fencing::LeaseOnly(why) => write!(f, "by the lease only ({why})"),
            Fencing::Reservation(key) => write!(
                f,
                "by the storage too: SCSI-3 persistent reservation, Write Exclusive - \
                 Registrants Only, this host's key {key}"
            ),
        }
    }
}

/// Refuses a LUN reserved by another program in a way that would refuse our writes
/// or that we must not take over.
fn check_foreign_reservation(lun: &dyn Lun) -> Result<()> {
    let Some(pr) = lun.reservations() else {
        return Ok(());
    };
    let device = lun.describe();
    if let Some(held) = pr
        .read_reservation()
        .with_context(|| format!("reading the reservation of {device}"))?
    {
        let ours = held.kind == ReservationType::WriteExclusiveRegistrantsOnly
            && key_owner(held.key).is_some();
        if !ours {
            bail!(
                "{device} is reserved by another initiator (key {}, {:?}): atsfs would not be \
                 allowed to write, or would take the LUN from its owner. Find who holds it \
                 (`sg_persist --in --read-reservation` on a machine that sees the LUN, or the \
                 storage's admin tool), release the reservation, then try again",
                held.key,
                held.kind
            );
        }
    }
    Ok(())
}

/// First step of a mount, before its first write (the claim of a slot): registers a
/// joining key and makes sure the LUN is reserved for registrants only.
pub fn join(lun: &dyn Lun) -> Result<Fencing> {
    let Some(pr) = lun.reservations() else {
        return Ok(Fencing::LeaseOnly(format!(
            "{} has no SCSI persistent reservations",
            lun.describe()
        )));
    };
    let device = lun.describe();
    if let Err(e) = pr.capabilities() {
        // A lost path is no answer: mounting unfenced on a LUN that has reservations
        // would leave this host's late writes unrefused.
        if matches!(e, LunError::Transport { .. }) {
            return Err(e).context("asking the LUN for its persistent reservations");
        }
        tracing::warn!(
            "{device}: persistent reservations do not work ({e}); a paused host's late \
             writes are fenced by its lease alone"
        );
        return Ok(Fencing::LeaseOnly(format!(
            "PERSISTENT RESERVE IN failed: {e}"
        )));
    }
    check_foreign_reservation(lun)?;
    let key = random_key(JOIN_SLOT);
    pr.register(key)
        .with_context(|| format!("registering reservation key {key} on {device}"))?;
    pr.reserve(key)
        .with_context(|| format!("reserving {device} (Write Exclusive - Registrants Only)"))?;
    Ok(Fencing::Reservation(key))
}

/// Once the slot's generation is final: the joining key becomes the host key of this
/// life (REGISTER AND IGNORE EXISTING KEY keeps the reservation if we hold it).
pub fn become_host(
    lun: &dyn Lun,
    fencing: &Fencing,
    slot: u32,
    generation: u32,
) -> Result<Fencing> {
    let (Some(pr), Some(_)) = (lun.reservations(), fencing.key()) else {
        return Ok(fencing.clone());
    };
    let key = host_key(slot, generation);
    pr.register(key).with_context(|| {
        format!(
            "registering this host's reservation key {key} on {} (slot {slot}, generation \
             {generation})",
            lun.describe()
        )
    })?;
    Ok(Fencing::Reservation(key))
}

/// Removes the registrations of host keys whose life is over: `live(slot,
/// generation)` is false. Joining and tool keys are left alone (their hosts may be
/// about to write). Best effort: failures are logged, never fatal.
pub fn prune(lun: &dyn Lun, own: ReservationKey, live: impl Fn(u32, u32) -> bool) -> usize {
    let Some(pr) = lun.reservations() else {
        return 0;
    };
    let keys = match pr.read_keys() {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!("reading the LUN's reservation keys: {e}");
            return 0;
        }
    };
    let mut removed = 0;
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        let Some((slot, generation)) = key_owner(key) else {
            continue;
        };
        if key == own || slot >= JOIN_SLOT || live(slot, generation) || !seen.insert(key) {
            continue;
        }
        match pr.preempt(own, key, false) {
            Ok(()) => {
                removed += 1;
                tracing::info!(key = %key, slot, generation, "removed the reservation key of a life that is over")
            }
            Err(e) => tracing::warn!(key = %key, "removing a stale reservation key: {e}"),
        }
    }
    removed
}

/// Makes sure `own` is registered and the LUN reserved before a missing key is taken
/// to mean "fenced". A target that lost its reservations (restarted without persist
/// through power loss, or cleared by an admin) lost every key with them: then nobody
/// is fenced, and the reservation is taken again with our key (every other live host
/// then finds its writes refused and stops: safe, but each must be mounted again).
/// Our own key missing under a reservation that still stands means another host
/// fenced us: an error, and this host must not recover anyone.
fn ensure_reserved(lun: &dyn Lun, pr: &dyn Reservations, own: ReservationKey) -> Result<()> {
    let device = lun.describe();
    let keys = pr
        .read_keys()
        .context("reading the LUN's reservation keys")?;
    let held = pr
        .read_reservation()
        .context("reading the LUN's reservation")?;
    match (keys.contains(&own), held) {
        (true, Some(_)) => Ok(()),
        (false, Some(_)) => Err(anyhow::Error::new(LunError::Fenced(format!(
            "this host's reservation key {own} is no longer registered on {device}: another \
             host fenced it"
        )))),
        (registered, None) => {
            tracing::warn!(
                "{device} has no reservation (it never had one, or a target restart or a CLEAR \
                 dropped it, and with it every host's key): reserving it before fencing; \
                 hosts still mounted without their key will find their writes refused and stop"
            );
            if !registered {
                pr.register(own)
                    .with_context(|| format!("registering reservation key {own} on {device}"))?;
            }
            pr.reserve(own)
                .with_context(|| format!("reserving {device} again"))?;
            Ok(())
        }
    }
}

/// Removes `victim`'s registrations with our registered `own` key (PREEMPT AND ABORT,
/// or PREEMPT where the target lacks it), after `ensure_reserved`. Ok when the LUN
/// has no reservations or we fence by the lease only (`own` None), or when the key
/// is gone already. An error means the victim may still write: do not replay.
pub fn fence_key(
    lun: &dyn Lun,
    own: Option<ReservationKey>,
    victim: ReservationKey,
    whose: &str,
) -> Result<()> {
    let (Some(pr), Some(own)) = (lun.reservations(), own) else {
        return Ok(());
    };
    ensure_reserved(lun, pr, own)?;
    if victim == own {
        return Ok(());
    }
    let keys = pr
        .read_keys()
        .with_context(|| format!("reading the LUN's reservation keys before fencing {whose}"))?;
    if !keys.contains(&victim) {
        return Ok(());
    }
    pr.preempt(own, victim, true).with_context(|| {
        format!("fencing {whose} at the storage (removing its reservation key {victim})")
    })?;
    tracing::info!(key = %victim, "fenced {whose} at the storage");
    Ok(())
}

/// Before a dead host's journal is replayed: removes its key, so that the storage
/// refuses whatever it still sends (`fence_key`).
pub fn fence_dead(
    lun: &dyn Lun,
    own: Option<ReservationKey>,
    slot: u32,
    generation: u32,
) -> Result<()> {
    fence_key(
        lun,
        own,
        host_key(slot, generation),
        &format!("the dead host of slot {slot} (generation {generation})"),
    )?;
    tracing::info!(slot, generation, "fenced a dead host at the storage");
    Ok(())
}

/// The key of a tool whose recovery claim names `uuid` (`ToolRegistration`): its low
/// bits are the uuid's first four bytes, so a host that takes over an interrupted
/// recovery can fence the tool that stalled in it.
pub fn tool_key(uuid: [u8; 16]) -> ReservationKey {
    let low = u32::from_le_bytes([uuid[0], uuid[1], uuid[2], uuid[3]]);
    host_key(TOOL_SLOT, low | 1)
}

/// An offline tool's registration (`atsfs recover`, `fsck --repair`, `ats-selftest`)
/// for its run: its key (`tool_key` of its uuid, which it writes into the slots it
/// recovers) is registered; dropped at the end unless the tool ended up holding the
/// reservation (by fencing a dead host that held it).
pub struct ToolRegistration<'a> {
    lun: &'a dyn Lun,
    uuid: [u8; 16],
    key: Option<ReservationKey>,
}

impl<'a> ToolRegistration<'a> {
    pub fn new(lun: &'a dyn Lun) -> Result<ToolRegistration<'a>> {
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let mut tool = ToolRegistration {
            lun,
            uuid,
            key: None,
        };
        let Some(pr) = lun.reservations() else {
            return Ok(tool);
        };
        if let Err(e) = pr.capabilities() {
            if matches!(e, LunError::Transport { .. }) {
                return Err(e).context("asking the LUN for its persistent reservations");
            }
            return Ok(tool);
        }
        check_foreign_reservation(lun)?;
        // Registered whether or not the LUN is reserved: a fence the tool does
        // (`fence_key`) reserves it first where nobody has.
        let key = tool_key(uuid);
        pr.register(key)
            .with_context(|| format!("registering reservation key {key} on {}", lun.describe()))?;
        tool.key = Some(key);
        Ok(tool)
    }

    /// The tool's key, when it registered one.
    pub fn key(&self) -> Option<ReservationKey> {
        self.key
    }

    /// The uuid the tool writes into the slots it recovers.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }
}

impl Drop for ToolRegistration<'_> {
    fn drop(&mut self) {
        let (Some(key), Some(pr)) = (self.key, self.lun.reservations()) else {
            return;
        };
        // A tool that preempted the holder (a dead host) holds the reservation now;
        // unregistering would drop it, and with it every fence. It stays registered.
        match pr.read_reservation() {
            Ok(Some(held)) if held.key == key => {
                tracing::debug!(key = %key, "the tool holds the LUN's reservation now; its key stays registered");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("reading the reservation: {e}; the tool's key stays registered");
                return;
            }
        }
        if let Err(e) = pr.unregister() {
            tracing::warn!("dropping the tool's reservation key: {e}");
        }
    }
}

/// Before mkfs writes a new volume: takes the LUN over from the volume it held. Every
/// atsfs key the old volume left (its hosts never unregister) is removed and the LUN
/// is reserved under a tool key of mkfs's own, which it keeps: a host of the old
/// volume that was paused past its lease must not write into the new one. Returns
/// that key (None where the LUN has no reservations) for mkfs's other sessions (the
/// ATS self-test) to register too. The caller has made sure no host is live. Refuses
/// a LUN that another program reserved.
pub fn take_for_mkfs(lun: &dyn Lun) -> Result<Option<ReservationKey>> {
    let Some(pr) = lun.reservations() else {
        return Ok(None);
    };
    if let Err(e) = pr.capabilities() {
        if matches!(e, LunError::Transport { .. }) {
            return Err(e).context("asking the LUN for its persistent reservations");
        }
        return Ok(None);
    }
    check_foreign_reservation(lun)?;
    let device = lun.describe();
    let own = random_key(TOOL_SLOT);
    pr.register(own)
        .with_context(|| format!("registering reservation key {own} on {device}"))?;
    let keys = pr
        .read_keys()
        .with_context(|| format!("reading the reservation keys of {device}"))?;
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        if key == own || key_owner(key).is_none() || !seen.insert(key) {
            continue;
        }
        pr.preempt(own, key, true)
            .with_context(|| format!("removing the old volume's reservation key {key}"))?;
        tracing::info!(key = %key, "removed a reservation key of the old volume");
    }
    // The preempt of the old holder made us the holder; on a LUN nobody had reserved,
    // this reserves it.
    ensure_reserved(lun, pr, own)?;
    Ok(Some(own))
}
