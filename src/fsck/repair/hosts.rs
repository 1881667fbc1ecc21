//! Before a repair: no host may be live, and every committed transaction must be
//! home, so that the repair works on the state every host would see.
//!
//! A slot is in use when its sector is not all zeros and it is not FREE (or does not
//! decode), and it is not the repair's own (on a Disk Paxos volume the repair holds a
//! slot for its run: `cluster::ToolSession`). Such slots are watched for `lease + heartbeat interval` on our own clock,
//! as a surviving host judges liveness: a sector that changes belongs to a live host
//! and the repair is refused. `--force` skips the watch and treats every slot in use
//! as a dead host. Then damaged slots have their journals replayed and are reset to
//! zeros (never used), and `recover_offline` recovers the rest exactly as a survivor
//! would (replay, free the slot).

use super::Tally;
use crate::cluster::{recover_offline, Clock, HostUuid, ManualClock, OfflineOutcome, SystemClock};
use crate::format::{get_str, Geometry, HeartbeatSlot, OnDisk, Superblock, SLOT_FREE};
use crate::journal::{pending_transactions, Journal, JournalError};
use crate::lun::{Caw, Lun};
use anyhow::{bail, Context, Result};
use std::time::Duration;

/// How often a watched slot is read.
const WATCH_STEP: Duration = Duration::from_millis(100);

/// A slot in use as first read: its raw sector, and its image if it decodes (and
/// names its own slot).
struct InUse {
    slot: u32,
    raw: Vec<u8>,
    image: Option<HeartbeatSlot>,
}

impl InUse {
    /// "slot 0 (host UUID, "name", pid N)".
    fn describe(&self) -> String {
        describe(self.slot, self.image.as_ref())
    }
}

fn describe(slot: u32, image: Option<&HeartbeatSlot>) -> String {
    match image {
        Some(i) => format!(
            "slot {slot} (host {}, {:?}, pid {})",
            HostUuid(i.host_uuid),
            get_str(&i.hostname),
            i.owner_pid
        ),
        None => format!("slot {slot} (damaged heartbeat sector)"),
    }
}

/// Refuses while a host is live (unless `force`), then recovers every slot in use.
pub(super) fn settle(
    lun: &dyn Lun,
    sb: &Superblock,
    geo: &Geometry,
    (force, tool): (bool, &crate::cluster::fence::ToolRegistration<'_>),
    tally: &mut Tally,
    notes: &mut Vec<String>,
) -> Result<()> {
    let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease = Duration::from_millis(u64::from(sb.lease_ms));
    let in_use = slots_in_use(lun, geo, tool.uuid())?;
    if !in_use.is_empty() && force {
        let named: Vec<String> = in_use.iter().map(InUse::describe).collect();
        notes.push(format!(
            "--force: {} not watched for liveness and recovered as dead hosts; if a host is \
             live, repairing under it corrupts the volume",
            named.join(", ")
        ));
    } else if !in_use.is_empty() {
        refuse_live(lun, geo, &in_use, lease + interval)?;
    }
    for slot in in_use.iter().filter(|s| s.image.is_none()) {
        reset_damaged(lun, geo, sb, slot, tally, notes)?;
    }
    // Nothing moved for a lease (or we were told not to look): every slot left in use
    // is dead. A clock that does not wait makes `recover_offline` recover them at once.
    let outcomes = recover_offline(
        lun,
        geo,
        sb.volume_uuid,
        tool,
        None,
        interval,
        lease,
        &ManualClock::default(),
    )?;
    for (slot, outcome) in outcomes {
        let first = in_use.iter().find(|s| s.slot == slot);
        let who = first.map_or_else(|| format!("slot {slot}"), InUse::describe);
        match outcome {
            OfflineOutcome::Recovered => {
                tally.add("dead hosts recovered (journal replayed, slot freed)", who)
            }
            OfflineOutcome::Live if force => notes.push(format!(
                "{who} changed while it was being recovered: that host IS live, and this \
                 repair runs under it (--force)"
            )),
            OfflineOutcome::Live => bail!(
                "{who} came alive during the repair: a host is mounting; unmount every host \
                 and run the repair again"
            ),
            OfflineOutcome::Free => {}
        }
    }
    replay_free_journals(lun, geo, sb, tally)
}

/// The slots whose sector is neither all zeros nor a FREE slot of the right index,
/// but the tool's own (named by its uuid `tool`: a `ToolSession` holds one on a Disk
/// Paxos volume).
fn slots_in_use(lun: &dyn Lun, geo: &Geometry, tool: [u8; 16]) -> Result<Vec<InUse>> {
    let mut out = Vec::new();
    for slot in 0..geo.max_hosts {
        let raw = read_sector(lun, geo, slot)?;
        if raw.iter().all(|&b| b == 0) {
            continue;
        }
        let image = HeartbeatSlot::decode(&raw, geo.hb_start)
            .ok()
            .filter(|i| i.slot == slot);
        if image.is_some_and(|i| i.state == SLOT_FREE || i.host_uuid == tool) {
            continue;
        }
        out.push(InUse { slot, raw, image });
    }
    Ok(out)
}

fn read_sector(lun: &dyn Lun, geo: &Geometry, slot: u32) -> Result<Vec<u8>> {
    let mut raw = vec![0u8; geo.ats_sector_size as usize];
    lun.read_at(&mut raw, geo.slot_offset(slot))
        .with_context(|| format!("reading heartbeat slot {slot}"))?;
    Ok(raw)
}

/// Watches the slots in use for `window` on our own clock; an error naming every
/// slot whose sector changed (a live host).
fn refuse_live(lun: &dyn Lun, geo: &Geometry, in_use: &[InUse], window: Duration) -> Result<()> {
    let slots: Vec<u32> = in_use.iter().map(|s| s.slot).collect();
    tracing::info!(
        ?slots,
        window_ms = window.as_millis() as u64,
        "watching the heartbeat slots in use for a lease + interval to tell live hosts from dead ones"
    );
    let clock = SystemClock::default();
    let deadline = clock.now_ms() + window.as_millis() as u64;
    let mut watching: Vec<&InUse> = in_use.iter().collect();
    let mut live = Vec::new();
    while !watching.is_empty() && clock.now_ms() < deadline {
        clock.sleep(WATCH_STEP);
        let mut still = Vec::new();
        for s in watching {
            let now = read_sector(lun, geo, s.slot)?;
            if now == s.raw {
                still.push(s);
                continue;
            }
            let image = HeartbeatSlot::decode(&now, geo.hb_start).ok();
            live.push(describe(s.slot, image.as_ref().or(s.image.as_ref())));
        }
        watching = still;
    }
    if live.is_empty() {
        return Ok(());
    }
    bail!(
        "hosts are using this volume: {} (its heartbeat sector changed while watched); \
         unmount every host, then repair. --force skips this watch, but repairing under a \
         live host corrupts the volume",
        live.join(", ")
    )
}

/// A slot whose sector does not decode: its journal is replayed (what it committed
/// is kept), then the sector is reset to zeros (a slot never used).
fn reset_damaged(
    lun: &dyn Lun,
    geo: &Geometry,
    sb: &Superblock,
    s: &InUse,
    tally: &mut Tally,
    notes: &mut Vec<String>,
) -> Result<()> {
    match Journal::open_and_replay(lun, geo, s.slot, sb.volume_uuid) {
        Ok(_) => {}
        Err(JournalError::Lun(e)) => {
            return Err(e).with_context(|| format!("replaying the journal of slot {}", s.slot))
        }
        Err(e) => notes.push(format!(
            "slot {}: its heartbeat sector and its journal are damaged ({e}); the slot is \
             reset without a replay",
            s.slot
        )),
    }
    let zeros = vec![0u8; s.raw.len()];
    match lun.compare_and_write(geo.slot_offset(s.slot), &s.raw, &zeros)? {
        Caw::Written => {}
        Caw::Miscompare(actual) if actual == zeros => {}
        Caw::Miscompare(_) => bail!(
            "heartbeat slot {} changed during the repair: a host is using the volume",
            s.slot
        ),
    }
    lun.flush()?;
    tally.add(
        "damaged heartbeat slots reset (journal replayed)",
        format!("slot {}", s.slot),
    );
    Ok(())
}

/// Replays the journals of free slots that still hold committed transactions (a
/// host never leaves its slot so; the check reads them as replayed, so repair makes
/// them so). A damaged journal header is the check's to report.
fn replay_free_journals(
    lun: &dyn Lun,
    geo: &Geometry,
    sb: &Superblock,
    tally: &mut Tally,
) -> Result<()> {
    for slot in 0..geo.max_hosts {
        let pending = match pending_transactions(lun, geo, slot, sb.volume_uuid) {
            Ok(pending) => pending,
            Err(JournalError::Lun(e)) => {
                return Err(e).with_context(|| format!("reading the journal of slot {slot}"))
            }
            Err(_) => continue,
        };
        if pending.is_empty() {
            continue;
        }
        let (_, done) = Journal::open_and_replay(lun, geo, slot, sb.volume_uuid)
            .with_context(|| format!("replaying the journal of slot {slot}"))?;
        tally.add(
            "journals of free slots replayed",
            format!("slot {slot}: {} transactions", done.transactions),
        );
    }
    Ok(())
}
