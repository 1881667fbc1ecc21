//! `atsfs fsck --repair`: fixes what the check finds, on a volume no host uses.
//!
//! Order, chosen so that an interrupted repair can simply be run again:
//!
//! 1. `hosts`: refuse while any heartbeat slot moves (unless forced), reset damaged
//!    slots, recover dead hosts (replay their journals, free their slots). From then
//!    on the device is exactly what the check sees: no journal holds anything.
//! 2. The superblock copies: a damaged primary from the backup, a damaged (or
//!    different) backup from the primary. Then the orphan tables are emptied: with
//!    no host live no file is open, so the files they listed (unlinked while open)
//!    become unreachable and the passes free them.
//! 3. Passes of check-then-fix (`write`), at most `PASSES_MAX`: directory entries
//!    removed or retyped (bucket rewrites), inode fields, lock records, and last the
//!    bitmaps and group headers, which follow from reachability. None of a pass's
//!    earlier writes changes what is reachable, so its bitmaps agree with its own
//!    entries. What a fix changes (a parent's counts after an entry goes, blocks of
//!    a lost inode) is found by the next pass's check. A pass that writes nothing
//!    ends the loop, and its check is the result.
//!
//! Every write is one whole structure, sealed, at its own aligned place; each is
//! derived from the check that precedes it, so a repair stopped between two writes
//! leaves a volume whose next check finds the rest. Nothing is journaled (no host
//! holds the volume): a crash in the middle of a multi-sector write can still tear
//! that one structure.
//!
//! What repair never does: free a block the walk did not reach while the walk could
//! not read everything (an unreadable directory bucket may still name it), lower a
//! link count in that case, or take any lock record's word over a live host's.

mod hosts;
mod write;

use super::report::FsckReport;
use super::{check, superblock, ProblemKind};
use crate::cluster::fence::ToolRegistration;
use crate::cluster::{Clock, SystemClock, ToolSession};
use crate::format::{Geometry, Superblock};
use crate::lun::Lun;
use anyhow::{bail, Result};
use serde::Serialize;
use std::sync::Arc;

/// Check-then-fix passes at most. One pass fixes what the check saw; the next the
/// counts that follow (a parent's link count after a subdirectory's entry went).
const PASSES_MAX: usize = 4;
/// Items (paths) listed per repair line before the rest are only counted.
const ITEMS_SHOWN_MAX: usize = 8;

/// What a repair did, and the check after it.
#[derive(Clone, Debug, Serialize)]
pub struct Repair {
    /// One line per kind of repair, with counts and paths where known.
    pub fixed: Vec<String>,
    /// Warnings that are not repairs (`--force` under hosts marked live, leaks kept).
    pub notes: Vec<String>,
    /// The check of the volume as the repair left it.
    pub after: FsckReport,
}

impl Repair {
    /// The fsck(8) exit status: 0 nothing to fix, 1 errors corrected, 4 errors left.
    pub fn exit_code(&self) -> u8 {
        match (self.after.is_clean(), self.fixed.is_empty()) {
            (true, true) => 0,
            (true, false) => 1,
            (false, _) => 4,
        }
    }
}

/// Repairs the volume on `lun`, a device that does the volume's kind of ATS itself
/// (hardware or emulated volumes; a Disk Paxos volume is refused: `repair_device`
/// takes its token). Refuses while a host is live unless `force` (which skips the
/// watch: repairing under a live host corrupts the volume).
pub fn repair(lun: &dyn Lun, force: bool) -> Result<Repair> {
    let sb = load_for_repair(lun)?;
    // Repair writes and takes the volume's locks: one kind of ATS per volume.
    crate::cluster::check_ats_mode(lun, &sb)?;
    // Past the storage's reservation, where the LUN has one, for the repair's writes.
    let registration = crate::cluster::fence::ToolRegistration::new(lun)?;
    repair_as(lun, &sb, &registration, force)
}

/// Repairs the volume on `device` whatever its ATS mode (`atsfs fsck --repair`): on
/// a Disk Paxos volume the repair holds a slot of its own for its run and takes the
/// token for its compare-and-writes (`cluster::ToolSession`); the check it reports
/// is made after it freed that slot again.
pub fn repair_device(device: &Arc<dyn Lun>, force: bool) -> Result<Repair> {
    let sb = load_for_repair(device.as_ref())?;
    let registration = crate::cluster::fence::ToolRegistration::new(device.as_ref())?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let session = ToolSession::join(device, &sb, &registration, clock)?;
    let had_slot = session.slot().is_some();
    let repaired = repair_as(session.lun().as_ref(), &sb, &registration, force);
    let left = session.leave();
    let mut done = repaired?;
    left?;
    if had_slot {
        // The last check saw the tool's own slot live.
        done.after = check(device.as_ref())?;
    }
    Ok(done)
}

/// The superblock, once the device's sector size is the volume's.
fn load_for_repair(lun: &dyn Lun) -> Result<Superblock> {
    let sb = superblock::load(lun, &mut FsckReport::default())?;
    if sb.ats_sector_size != lun.sector_size() {
        bail!(
            "the device has {}-byte ATS sectors (its physical block, at least its logical \
             one) but the volume was made for {}-byte sectors; \
             repair it through a device with the volume's sector size",
            lun.sector_size(),
            sb.ats_sector_size
        );
    }
    Ok(sb)
}

/// The repair proper, through `lun` (the device, or a `ToolSession`'s LUN), as the
/// tool `registration`.
fn repair_as(
    lun: &dyn Lun,
    sb: &Superblock,
    registration: &ToolRegistration<'_>,
    force: bool,
) -> Result<Repair> {
    let mut tally = Tally::default();
    let mut notes = Vec::new();
    let geo = Geometry::from_superblock(sb);
    hosts::settle(lun, sb, &geo, (force, registration), &mut tally, &mut notes)?;
    fix_superblocks(lun, &mut tally)?;
    if write::empty_orphan_tables(lun, &geo, &mut tally)? {
        lun.flush()?;
    }
    let mut report = check(lun)?;
    for _ in 0..PASSES_MAX {
        if !write::fix_pass(lun, &geo, &report, &mut tally, &mut notes)? {
            break;
        }
        lun.flush()?;
        report = check(lun)?;
    }
    notes.dedup();
    Ok(Repair {
        fixed: tally.lines(),
        notes,
        after: report,
    })
}

/// Rewrites a damaged primary superblock from the backup, or a damaged (or
/// different) backup from the primary: the check's own rule decides which is in force.
fn fix_superblocks(lun: &dyn Lun, tally: &mut Tally) -> Result<()> {
    let mut seen = FsckReport::default();
    let sb: Superblock = superblock::load(lun, &mut seen)?;
    if seen.has(ProblemKind::PrimarySuperblockDamaged) {
        write::superblock(lun, sb, 0)?;
        tally.add("primary superblock rewritten from the backup", "");
    } else if seen.has(ProblemKind::BackupSuperblock) {
        let backup = Geometry::from_superblock(&sb).backup_superblock();
        write::superblock(lun, sb, backup)?;
        tally.add(
            "backup superblock rewritten from the primary",
            format!("block {backup}"),
        );
    }
    Ok(())
}

/// The repairs made, by kind, in the order first made.
#[derive(Default)]
pub(super) struct Tally {
    kinds: Vec<(String, Vec<String>)>,
}

impl Tally {
    /// Records one repair of `kind`; `item` names what was repaired ("" for none).
    pub fn add(&mut self, kind: &str, item: impl Into<String>) {
        let item = item.into();
        match self.kinds.iter_mut().find(|(k, _)| k == kind) {
            Some((_, items)) => items.push(item),
            None => self.kinds.push((kind.to_owned(), vec![item])),
        }
    }

    /// "kind (count): item, item, ... and N more", one line per kind; just "kind"
    /// for a single repair that names nothing.
    pub fn lines(&self) -> Vec<String> {
        self.kinds
            .iter()
            .map(|(kind, items)| {
                let named: Vec<&str> = items
                    .iter()
                    .map(String::as_str)
                    .filter(|i| !i.is_empty())
                    .collect();
                let mut line = kind.clone();
                if items.len() > 1 || !named.is_empty() {
                    line += &format!(" ({})", items.len());
                }
                if !named.is_empty() {
                    let shown = named.len().min(ITEMS_SHOWN_MAX);
                    line += &format!(": {}", named[..shown].join(", "));
                    if named.len() > shown {
                        line += &format!(" and {} more", named.len() - shown);
                    }
                }
                line
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
