//! Heartbeat slots and journals.
//!
//! A journal that holds committed transactions not yet home (its host crashed, or is
//! still mounted) is not corruption: fsck loads those transactions into the
//! volume's overlay, slot by slot in order, and checks everything else as replay will
//! leave it.

use super::report::{FsckReport, ProblemKind};
use super::volume::Volume;
use crate::format::{
    get_str, HeartbeatSlot, JournalHeader, OnDisk, BLOCK_SIZE, SLOT_FREE, SLOT_LIVE,
    SLOT_RECOVERING,
};
use crate::journal::{pending_transactions, JournalError};
use anyhow::{Context, Result};

/// Checks every heartbeat slot; notes those marked live.
pub(crate) fn check_heartbeats(vol: &mut Volume, report: &mut FsckReport) -> Result<()> {
    let geo = vol.geo;
    let region = vol.device_blocks(geo.hb_start, geo.hb_blocks)?;
    let sector = geo.ats_sector_size as usize;
    for slot in 0..geo.max_hosts {
        let at = (geo.slot_offset(slot) - geo.hb_start * BLOCK_SIZE as u64) as usize;
        let Some(raw) = region.get(at..at + sector) else {
            break;
        };
        if raw.iter().all(|&b| b == 0) {
            continue;
        }
        let block = geo.hb_start + (at / BLOCK_SIZE) as u64;
        let hb = match HeartbeatSlot::decode(raw, block) {
            Ok(hb) if hb.slot == slot => hb,
            Ok(hb) => {
                let msg = format!("heartbeat slot {slot} claims to be slot {}", hb.slot);
                report.problem(ProblemKind::HeartbeatSlot, Some(block), None, msg);
                continue;
            }
            Err(e) => {
                let msg = format!("heartbeat slot {slot}: {e}");
                report.problem(ProblemKind::HeartbeatSlot, Some(block), None, msg);
                continue;
            }
        };
        if hb.host_uuid != [0; 16] || hb.state != SLOT_FREE {
            report.counts.slots_used += 1;
        }
        if matches!(hb.state, SLOT_LIVE | SLOT_RECOVERING) {
            report.counts.slots_live += 1;
            let what = if hb.state == SLOT_LIVE {
                "live"
            } else {
                "being recovered"
            };
            report.note(format!(
                "heartbeat slot {slot} is marked {what} (host {}, {:?}, pid {}, generation {}): \
                 that host is mounted, or crashed and not yet recovered",
                uuid::Uuid::from_bytes(hb.host_uuid),
                get_str(&hb.hostname),
                hb.owner_pid,
                hb.generation
            ));
        }
    }
    Ok(())
}

/// Checks every slot's journal header and loads the committed transactions that are
/// not home yet into the overlay (when `replay` is set).
pub(crate) fn check_journals(
    vol: &mut Volume,
    report: &mut FsckReport,
    replay: bool,
) -> Result<()> {
    for slot in 0..vol.geo.max_hosts {
        if !check_journal_header(vol, report, slot)? {
            continue;
        }
        let uuid = vol.sb.volume_uuid;
        let pending = match pending_transactions(vol.lun(), &vol.geo, slot, uuid) {
            Ok(pending) => pending,
            Err(JournalError::Lun(e)) => {
                return Err(e).with_context(|| format!("reading the journal of slot {slot}"))
            }
            Err(e) => {
                let block = vol.geo.journal_of(slot);
                let kind = match e {
                    JournalError::BadTarget { .. } => ProblemKind::JournalRecord,
                    _ => ProblemKind::JournalHeader,
                };
                report.problem(kind, Some(block), None, e.to_string());
                continue;
            }
        };
        if pending.is_empty() {
            continue;
        }
        let records: usize = pending.iter().map(Vec::len).sum();
        report.counts.pending_transactions += pending.len() as u64;
        report.counts.pending_records += records as u64;
        let checked = if replay {
            "checked the volume as replay will leave it"
        } else {
            "NOT applied to this check"
        };
        report.note(format!(
            "journal of slot {slot} holds {} committed transactions ({records} images) not yet \
             written home; it needs replay (its host crashed or is still mounted); {checked}",
            pending.len()
        ));
        if replay {
            apply_all(vol, report, slot, &pending)?;
        }
    }
    Ok(())
}

fn apply_all(
    vol: &mut Volume,
    report: &mut FsckReport,
    slot: u32,
    pending: &[Vec<crate::journal::Record>],
) -> Result<()> {
    for record in pending.iter().flatten() {
        if !vol.apply(record)? {
            report.problem(
                ProblemKind::JournalRecord,
                Some(vol.geo.journal_of(slot)),
                None,
                format!(
                    "journal of slot {slot} holds a committed image of {} bytes for byte {}, \
                     past the end of the device",
                    record.image.len(),
                    record.target
                ),
            );
        }
    }
    Ok(())
}

/// True when the header is good enough to walk the journal by.
fn check_journal_header(vol: &mut Volume, report: &mut FsckReport, slot: u32) -> Result<bool> {
    let block = vol.geo.journal_of(slot);
    let raw = vol.device_blocks(block, 1)?;
    let mut bad = |message: String| {
        report.problem(ProblemKind::JournalHeader, Some(block), None, message);
    };
    let header = match JournalHeader::decode(&raw, block) {
        Ok(header) => header,
        Err(e) => {
            bad(format!(
                "journal of slot {slot}: {e}; a host cannot mount with this slot"
            ));
            return Ok(false);
        }
    };
    let mut usable = true;
    if header.slot != slot {
        bad(format!(
            "journal header of slot {slot} names slot {}",
            header.slot
        ));
    }
    if header.volume_uuid != vol.sb.volume_uuid {
        bad(format!(
            "journal header of slot {slot} names another volume"
        ));
    }
    if header.journal_blocks != vol.geo.journal_blocks
        || header.tail_block >= vol.geo.journal_blocks
    {
        bad(format!(
            "journal header of slot {slot} says {} blocks with its tail at {} (the superblock says {} blocks)",
            header.journal_blocks, header.tail_block, vol.geo.journal_blocks
        ));
        usable = false;
    }
    Ok(usable)
}
