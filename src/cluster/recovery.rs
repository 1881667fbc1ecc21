//! Recovering other hosts' slots: their journal is replayed and their slot freed, so
//! nothing they committed is lost. At mount on a volume with emulated ATS, hosts of
//! another kernel are refused (their test-and-set would not be atomic with ours).

use super::heartbeat::read_slot;
use super::{Clock, HostUuid};
use crate::format::{
    encode_padded, Geometry, HeartbeatSlot, OnDisk, SLOT_FREE, SLOT_LIVE, SLOT_RECOVERING,
};
use crate::journal::Journal;
use crate::lun::{Caw, Lun};
use anyhow::{bail, Context, Result};
use std::time::Duration;

/// A slot another host holds, as first seen.
pub(crate) struct Held {
    pub slot: u32,
    pub raw: Vec<u8>,
    pub image: HeartbeatSlot,
}

/// Watches every other slot marked in use by a host of another kernel (`boot_id`)
/// for `lease + interval` on our own clock. Refuses when any of them moves: emulated
/// ATS is atomic only within one kernel. Recovers the ones that do not move.
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
    for h in held {
        recover_slot(lun, geo, volume_uuid, h, my_slot, me)?;
    }
    Ok(())
}

/// Claims a dead host's slot for recovery (by ATS, so only one host recovers it),
/// replays its journal, then frees the slot.
pub(crate) fn recover_slot(
    lun: &dyn Lun,
    geo: &Geometry,
    volume_uuid: [u8; 16],
    h: Held,
    my_slot: u32,
    me: HostUuid,
) -> Result<()> {
    let sector = geo.ats_sector_size as usize;
    let mut claimed = h.image;
    claimed.state = SLOT_RECOVERING;
    claimed.recoverer_uuid = me.0;
    claimed.recoverer_slot = my_slot;
    claimed.counter = claimed.counter.wrapping_add(1);
    claimed.seal();
    let claimed_raw = encode_padded(&claimed, sector);
    match lun.compare_and_write(geo.slot_offset(h.slot), &h.raw, &claimed_raw)? {
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
    tracing::warn!(slot = h.slot, host = %dead, "recovering {was}: replaying its journal");
    let (_, report) = Journal::open_and_replay(lun, geo, h.slot, volume_uuid)
        .with_context(|| format!("replaying the journal of slot {}", h.slot))?;
    tracing::info!(
        slot = h.slot,
        transactions = report.transactions,
        "journal replayed"
    );
    let mut freed = claimed;
    freed.state = SLOT_FREE;
    freed.owner_pid = 0;
    freed.counter = freed.counter.wrapping_add(1);
    freed.seal();
    let freed_raw = encode_padded(&freed, sector);
    match lun.compare_and_write(geo.slot_offset(h.slot), &claimed_raw, &freed_raw)? {
        Caw::Written => {}
        Caw::Miscompare(actual) if actual == freed_raw => {}
        Caw::Miscompare(_) => bail!("slot {} changed during its recovery", h.slot),
    }
    lun.flush()?;
    Ok(())
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

/// Recovers dead slots without mounting (`atsfs recover`): watches every slot in use
/// (or just `only`) for `lease + interval` on our own clock, and recovers the ones
/// that did not move, exactly as a surviving host would. The tool holds no slot and no
/// lease: it is for volumes that no live host will recover (all hosts down).
pub fn recover_offline(
    lun: &dyn Lun,
    geo: &Geometry,
    volume_uuid: [u8; 16],
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
        match image.filter(|i| i.state != SLOT_FREE) {
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
    let tool = HostUuid(*uuid::Uuid::new_v4().as_bytes());
    for h in held {
        let slot = h.slot;
        recover_slot(lun, geo, volume_uuid, h, slot, tool)?;
        outcomes.push((slot, OfflineOutcome::Recovered));
    }
    outcomes.sort_by_key(|o| o.0);
    Ok(outcomes)
}
