//! fsck: a read-only check of a whole volume (`check` never writes), and `repair`,
//! which mends what the check found on a volume no host uses.
//!
//! The passes, in order (each a submodule):
//!
//! 1. `superblock`: the primary must decode and describe a possible layout, else the
//!    backup (in the device's last block) is used and the damaged primary is a
//!    problem; the backup must equal the primary but for its block number.
//! 2. `slots`: every heartbeat slot decodes (all zeros: never used); live ones are
//!    noted. Every journal header decodes; committed transactions not yet written
//!    home (the host crashed, or is mounted) are loaded into an overlay, and every
//!    later pass reads the volume through it: the state replay will leave. That is
//!    a note, not a problem.
//! 3. `groups`: every allocation group header decodes and names its group, its
//!    bitmap matches the header's checksum (a `BITMAP_UNINIT` group's bitmap is its
//!    own metadata only), the free count matches the bitmap.
//! 4. `tree`: from the root inode, depth first: inodes, directories (table, buckets,
//!    entries, counts, parents, link counts), files (extents, leaves), symlinks,
//!    xattr blocks; every block reached is claimed once in a map of the volume.
//!    Then every slot's orphan table: each inode it lists (a file unlinked while
//!    open) is walked the same way, and listings and `orphan_slots` must agree.
//! 5. `groups` again: every bitmap against the claimed map: blocks marked used that
//!    nothing reachable uses are leaked; blocks in use but marked free are serious.
//!
//! Only metadata is read: directories, inodes, extent leaves, xattr blocks, group
//! headers and bitmaps, journals; never file data.
//!
//! What the check cannot tell apart:
//! - An inode unlinked while open has no entry; the walk finds it through the orphan
//!   tables (after the namespace) and counts it reachable. On a volume made without
//!   orphan tables, or when a host's table was full, such a file's blocks are
//!   reported as leaked blocks after its host crashed.
//! - On a mounted volume, other hosts change metadata while fsck reads it: what it
//!   reports may be in-flight state. Live heartbeat slots are noted for that reason.
//! - The journals have no revoke records: the overlay applies every pending image
//!   of a slot in order, slot after slot, exactly as replay will, even an image of a
//!   block that was freed and reused since. fsck never reads file data, so an old
//!   metadata image that replay would write over a reused data block goes unseen.
//!
//! Besides the problems, the passes record what `repair` can mend and where
//! (`FsckReport::fixes`): entries to remove or retype, inode fields to set, lock
//! records to reset, the reachable blocks of every group, and whether the walk could
//! read everything (if not, repair frees nothing it did not reach).
//!
//! Errors and problems: an unreadable device, or no usable superblock at all, is an
//! `Err` (exit 8); anything wrong on disk is a `Problem` (exit 4). No byte on disk can
//! make the check panic: every disk-provided index or count is bounds checked.

pub(crate) mod groups;
mod repair;
mod report;
pub(crate) mod slots;
mod superblock;
pub use repair::{repair, repair_device, Repair};
pub(crate) mod tree;
pub(crate) mod volume;

pub use report::{Counts, FsckReport, Problem, ProblemKind};

use crate::format::{get_str, BlockNo, LockRecord, OnDisk, LOCK_FREE};
use crate::lun::Lun;
use anyhow::Result;
use indicatif::ProgressBar;

/// Volumes with at least this many allocation groups (8 GiB) get a progress bar
/// when stderr is a terminal.
const PROGRESS_GROUPS_MIN: u64 = 64;

/// How to check; `Default` is what `check` does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    /// Read the volume through the pending journal transactions (as after replay).
    pub replay_journals: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            replay_journals: true,
        }
    }
}

/// Checks the volume on `lun`, read only.
pub fn check(lun: &dyn Lun) -> Result<FsckReport> {
    check_with(lun, Options::default())
}

pub(crate) fn check_with(lun: &dyn Lun, options: Options) -> Result<FsckReport> {
    let mut report = FsckReport {
        device: lun.describe(),
        ..FsckReport::default()
    };
    let sb = superblock::load(lun, &mut report)?;
    report.volume_uuid = uuid::Uuid::from_bytes(sb.volume_uuid).to_string();
    report.label = get_str(&sb.label);
    if sb.ats_sector_size != lun.sector_size() {
        report.note(format!(
            "the device has {}-byte ATS sectors (its physical block, at least its logical \
             one) but the volume was made for {}-byte sectors: \
             hosts refuse to mount it on this device",
            lun.sector_size(),
            sb.ats_sector_size
        ));
    }
    let mut vol = volume::Volume::new(lun, sb);
    slots::check_heartbeats(&mut vol, &mut report)?;
    slots::check_journals(&mut vol, &mut report, options.replay_journals)?;

    let show = crate::progress::shown() && vol.geo.ag_count >= PROGRESS_GROUPS_MIN;
    let bar = progress(show, Some(vol.geo.ag_count), "allocation groups");
    let groups = groups::check_groups(&mut vol, &mut report, &bar)?;
    bar.finish_and_clear();

    let bar = progress(show, None, "inodes");
    let mut map = groups::BlockMap::new(vol.geo);
    tree::walk(&mut vol, &mut map, &mut report, &bar)?;
    bar.finish_and_clear();

    groups::compare_bitmaps(&mut vol, &mut report, &map, &groups)?;
    report.counts.metadata_reads = vol.reads;
    Ok(report)
}

/// A progress bar (a spinner without `len`), or a hidden one (`crate::progress`:
/// only on a terminal).
fn progress(show: bool, len: Option<u64>, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => crate::progress::bar(len, "checking {msg} {wide_bar} {pos}/{len}"),
        None => crate::progress::spinner("checking {msg} {spinner} {pos}"),
    };
    bar.set_message(what.to_owned());
    bar
}

/// Checks a resource's lock sector: a valid lock record naming the resource, or all
/// zeros (never locked) where `zero_is_free` (group headers and the root, which mkfs
/// leaves so; every other inode gets a record when it is created, and atsfs takes an
/// all-zero sector there for a stale inode number). Counts it when held, and notes it
/// for repair when it is damaged or names a host (as holder or opener). Err(why)
/// when it is damaged.
pub(crate) fn check_lock(
    raw: &[u8],
    resource: BlockNo,
    zero_is_free: bool,
    report: &mut FsckReport,
) -> std::result::Result<(), String> {
    if raw.iter().all(|&b| b == 0) {
        if zero_is_free {
            return Ok(());
        }
        report.fixes.locks.push(resource);
        return Err("lock sector is all zeros: not a lock record".into());
    }
    match LockRecord::decode(raw, resource) {
        Ok(lock) => {
            report.counts.locks_held += u64::from(lock.mode != LOCK_FREE);
            if lock.mode != LOCK_FREE || lock.open_flags != 0 || lock.open_readers != 0 {
                report.fixes.locks.push(resource);
            }
            Ok(())
        }
        Err(e) => {
            report.fixes.locks.push(resource);
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests;
