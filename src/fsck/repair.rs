//! `atsfs fsck --repair`: fixes what the check finds, on a volume no host uses.
//!
//! Order: make sure no host is live (or `force`), recover dead hosts (replay their
//! journals, free their slots), then repair from the replayed state: the superblock
//! copies, link counts, every group's bitmap and free count rebuilt from what is
//! reachable (leaked blocks, orphans and their blocks are freed), and lock records
//! reset (with no live host, every lock is stale). Every write is a whole, sealed
//! structure; an interrupted repair is simply run again. The check runs again at the
//! end and says what is left.

use super::FsckReport;
use crate::cluster::{recover_offline, OfflineOutcome, SystemClock};
use crate::format::{
    encode_padded, AgHeader, Geometry, InodeBody, LockRecord, OnDisk, Superblock,
    AG_FLAG_BITMAP_UNINIT, BLOCK_SIZE, BLOCK_SIZE_U64, LOCK_FREE,
};
use crate::journal::Journal;
use crate::lun::Lun;
use anyhow::{bail, Context, Result};
use std::time::Duration;

/// What a repair did, and the check after it.
pub struct Repair {
    pub fixed: Vec<String>,
    pub after: FsckReport,
}

/// Repairs the volume on `lun`. Refuses while a host is live unless `force`.
pub fn repair(lun: &dyn Lun, force: bool) -> Result<Repair> {
    let mut fixed = Vec::new();
    let sb = repair_superblocks(lun, &mut fixed)?;
    let geo = Geometry::from_superblock(&sb);
    settle_hosts(lun, &sb, &geo, force, &mut fixed)?;
    let report = super::check(lun)?;
    fix_link_counts(lun, &geo, &report, &mut fixed)?;
    rebuild_bitmaps(lun, &geo, &report, &mut fixed)?;
    reset_locks(lun, &geo, &report, &mut fixed)?;
    lun.flush()?;
    let after = super::check(lun)?;
    Ok(Repair { fixed, after })
}

/// Rewrites a damaged primary superblock from the backup, or the backup from the
/// primary. Returns the superblock in force.
fn repair_superblocks(lun: &dyn Lun, fixed: &mut Vec<String>) -> Result<Superblock> {
    let last = lun.len_bytes() / BLOCK_SIZE_U64 - 1;
    let read = |block: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        lun.read_at(&mut buf, block * BLOCK_SIZE_U64)?;
        Ok(buf)
    };
    let primary = Superblock::decode(&read(0)?, 0);
    let backup_block = primary
        .as_ref()
        .map_or(last, |sb| Geometry::from_superblock(sb).backup_superblock());
    let backup = Superblock::decode(&read(backup_block)?, backup_block);
    match (primary, backup) {
        (Ok(sb), Ok(b)) => {
            let mut same = b;
            same.self_block = 0;
            same.crc = sb.crc;
            let mut expected = sb;
            expected.crc = same.crc;
            if same != expected {
                write_superblock(lun, sb, backup_block)?;
                fixed.push("backup superblock rewritten from the primary (they differed)".into());
            }
            Ok(sb)
        }
        (Ok(sb), Err(_)) => {
            write_superblock(lun, sb, backup_block)?;
            fixed.push(format!(
                "backup superblock (block {backup_block}) rewritten from the primary"
            ));
            Ok(sb)
        }
        (Err(_), Ok(b)) => {
            write_superblock(lun, b, 0)?;
            fixed.push("primary superblock rewritten from the backup".into());
            Ok(b)
        }
        (Err(e), Err(_)) => {
            bail!("both superblocks are damaged ({e}); there is nothing to repair from")
        }
    }
}

fn write_superblock(lun: &dyn Lun, mut sb: Superblock, block: u64) -> Result<()> {
    sb.self_block = block;
    sb.seal();
    lun.write_at(&encode_padded(&sb, BLOCK_SIZE), block * BLOCK_SIZE_U64)?;
    lun.flush()?;
    Ok(())
}

/// Refuses while a host is live (unless forced) and recovers dead hosts, so the
/// repair works on everything that was committed.
fn settle_hosts(
    lun: &dyn Lun,
    sb: &Superblock,
    geo: &Geometry,
    force: bool,
    fixed: &mut Vec<String>,
) -> Result<()> {
    if force {
        // No watching: replay every journal as it is (a live host would corrupt the
        // volume now, which is what --force accepts).
        for slot in 0..geo.max_hosts {
            let (_, report) = Journal::open_and_replay(lun, geo, slot, sb.volume_uuid)
                .with_context(|| format!("replaying the journal of slot {slot}"))?;
            if report.transactions > 0 {
                fixed.push(format!(
                    "journal of slot {slot}: {} transactions replayed",
                    report.transactions
                ));
            }
        }
        return Ok(());
    }
    let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease = Duration::from_millis(u64::from(sb.lease_ms));
    let outcomes = recover_offline(
        lun,
        geo,
        sb.volume_uuid,
        None,
        interval,
        lease,
        &SystemClock::default(),
    )?;
    let live: Vec<u32> = outcomes
        .iter()
        .filter(|o| o.1 == OfflineOutcome::Live)
        .map(|o| o.0)
        .collect();
    if !live.is_empty() {
        bail!(
            "hosts are using the volume now (slots {live:?}); unmount every host before repairing \
             (--force repairs anyway, which corrupts the volume if a host really is live)"
        );
    }
    for (slot, outcome) in outcomes {
        if outcome == OfflineOutcome::Recovered {
            fixed.push(format!(
                "slot {slot}: dead host recovered (journal replayed, slot freed)"
            ));
        }
    }
    Ok(())
}

fn fix_link_counts(
    lun: &dyn Lun,
    geo: &Geometry,
    report: &FsckReport,
    fixed: &mut Vec<String>,
) -> Result<()> {
    for &(ino, nlink) in &report.link_fixes {
        let mut raw = vec![0u8; geo.body_len()];
        lun.read_at(&mut raw, geo.body_offset(ino))?;
        let Ok(mut inode) = InodeBody::decode(&raw, ino) else {
            continue;
        };
        let old = inode.nlink;
        inode.nlink = nlink;
        inode.seal();
        lun.write_at(&encode_padded(&inode, geo.body_len()), geo.body_offset(ino))?;
        let path = report.paths.get(&ino).cloned().unwrap_or_default();
        fixed.push(format!("inode {ino} {path}: link count {old} -> {nlink}"));
    }
    Ok(())
}

/// Every group's bitmap becomes exactly what is reachable (plus its own metadata),
/// and its header's free count and bitmap CRC follow.
fn rebuild_bitmaps(
    lun: &dyn Lun,
    geo: &Geometry,
    report: &FsckReport,
    fixed: &mut Vec<String>,
) -> Result<()> {
    let mut changed_groups = 0;
    for ag in 0..geo.ag_count {
        let Some(words) = report.reachable.get(ag as usize) else {
            continue;
        };
        let len = geo.ag_len(ag);
        let mut bitmap = vec![0u8; BLOCK_SIZE];
        for (i, word) in words.iter().enumerate() {
            bitmap[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        let meta = geo.ag_meta_blocks();
        for i in 0..meta {
            bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        // Bits past a short group's end mean nothing; mark them used as mkfs does.
        for i in len..(BLOCK_SIZE as u64 * 8) {
            bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        let used: u64 = (0..len)
            .filter(|&i| bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0)
            .count() as u64;
        let hdr = geo.ag_header(ag);
        let mut raw = vec![0u8; geo.body_len()];
        lun.read_at(&mut raw, geo.body_offset(hdr))?;
        let mut header = match AgHeader::decode(&raw, hdr) {
            Ok(h) => h,
            Err(_) => {
                let mut h: AgHeader = bytemuck::Zeroable::zeroed();
                h.magic = AgHeader::MAGIC;
                h.blockno = hdr;
                h.ag_index = ag;
                h.start = geo.ag_first(ag);
                h.blocks = len;
                h.rotor = meta;
                h
            }
        };
        let mut on_disk = vec![0u8; BLOCK_SIZE];
        lun.read_at(&mut on_disk, geo.ag_bitmap(ag) * BLOCK_SIZE_U64)?;
        let was_uninit = header.flags & AG_FLAG_BITMAP_UNINIT != 0;
        let same = !was_uninit
            && on_disk == bitmap
            && header.free_blocks == len - used
            && header.bitmap_crc == crc32fast::hash(&bitmap)
            && AgHeader::decode(&raw, hdr).is_ok();
        if same || (was_uninit && used == meta && header.free_blocks == len - meta) {
            continue;
        }
        lun.write_at(&bitmap, geo.ag_bitmap(ag) * BLOCK_SIZE_U64)?;
        header.flags &= !AG_FLAG_BITMAP_UNINIT;
        header.free_blocks = len - used;
        header.bitmap_crc = crc32fast::hash(&bitmap);
        if header.rotor >= len {
            header.rotor = meta;
        }
        header.seal();
        lun.write_at(
            &encode_padded(&header, geo.body_len()),
            geo.body_offset(hdr),
        )?;
        changed_groups += 1;
    }
    if changed_groups > 0 {
        fixed.push(format!(
            "{changed_groups} allocation group bitmaps rebuilt from the reachable blocks"
        ));
    }
    Ok(())
}

/// With no live host every lock record is stale: reset them to free.
fn reset_locks(
    lun: &dyn Lun,
    geo: &Geometry,
    report: &FsckReport,
    fixed: &mut Vec<String>,
) -> Result<()> {
    let sector = geo.ats_sector_size as usize;
    let zero = vec![0u8; sector];
    let mut reset = 0;
    let resources = report
        .paths
        .keys()
        .copied()
        .chain((0..geo.ag_count).map(|ag| geo.ag_header(ag)));
    for resource in resources {
        let mut raw = vec![0u8; sector];
        lun.read_at(&mut raw, geo.lock_offset(resource))?;
        let idle = match LockRecord::decode(&raw, resource) {
            Ok(r) => r.mode == LOCK_FREE && r.open_flags == 0 && r.open_readers == 0,
            Err(_) => raw == zero,
        };
        if !idle {
            lun.write_at(&zero, geo.lock_offset(resource))?;
            reset += 1;
        }
    }
    if reset > 0 {
        fixed.push(format!(
            "{reset} lock records reset (no host holds anything now)"
        ));
    }
    Ok(())
}
