//! The writes of one repair pass, each derived from the check that precedes it.
//!
//! Every structure is re-read and decoded before it is changed, and left alone when
//! it no longer is what the check saw. Every write is the whole structure, sealed,
//! at its aligned home: a bucket block, an inode body, a lock sector (by
//! compare-and-write, so a host that appeared meanwhile is noticed), a bitmap block
//! and then its group header (whose checksum of the bitmap makes the pair whole).

use super::Tally;
use crate::format::{
    encode_padded, AgHeader, BlockNo, DirBucket, Geometry, InodeBody, LockRecord, OnDisk,
    OrphanTable, Superblock, AG_BLOCKS, AG_FLAG_BITMAP_UNINIT, BLOCK_SIZE, BLOCK_SIZE_U64,
    DIR_BUCKET_AREA, DIR_ENTRY_FIXED, LOCK_FREE,
};
use crate::fs::dir::{parse_entries, Entry};
use crate::fsck::report::{DropReason, EntryFix, EntryRef, Fixes, FsckReport, InodeFix};
use crate::lun::{Caw, Lun};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};

/// Writes one pass of fixes from `report`, entries first and bitmaps last. Returns
/// true when anything was written.
pub(super) fn fix_pass(
    lun: &dyn Lun,
    geo: &Geometry,
    report: &FsckReport,
    tally: &mut Tally,
    notes: &mut Vec<String>,
) -> Result<bool> {
    let fixes = &report.fixes;
    let mut wrote = fix_entries(lun, fixes, tally)?;
    wrote |= fix_inodes(lun, geo, fixes, tally)?;
    wrote |= reset_locks(lun, geo, report, tally)?;
    wrote |= fix_bitmaps(lun, geo, fixes, tally, notes)?;
    Ok(wrote)
}

/// Writes a superblock copy at `block` (0 or the backup's block).
pub(super) fn superblock(lun: &dyn Lun, mut sb: Superblock, block: BlockNo) -> Result<()> {
    sb.self_block = block;
    sb.seal();
    lun.write_at(&encode_padded(&sb, BLOCK_SIZE), block * BLOCK_SIZE_U64)?;
    lun.flush()?;
    Ok(())
}

/// Empties every orphan table that lists anything or is damaged, and frees its lock
/// sector: no host is live, so no file is open, and the inodes the tables listed
/// become unreachable, for the passes that follow to free. Returns true when it wrote.
pub(super) fn empty_orphan_tables(
    lun: &dyn Lun,
    geo: &Geometry,
    tally: &mut Tally,
) -> Result<bool> {
    let sector = geo.ats_sector_size as usize;
    let mut wrote = false;
    for slot in 0..geo.max_hosts {
        let Some(block) = geo.orphan_table(slot) else {
            return Ok(false);
        };
        let mut raw = vec![0u8; geo.resource_blocks as usize * BLOCK_SIZE];
        lun.read_at(&mut raw, block * BLOCK_SIZE_U64)?;
        let body = raw.get(sector..).unwrap_or(&[]);
        let (kind, item) = match OrphanTable::decode(body, block) {
            Ok(t) if t.slot == slot && t.count == 0 => continue,
            Ok(t) if t.slot == slot => (
                "orphan tables emptied (the files they listed, unlinked while open, are freed)",
                format!("slot {slot}: {} files", t.count),
            ),
            _ => (
                "damaged orphan tables rewritten empty",
                format!("slot {slot}"),
            ),
        };
        let mut table: OrphanTable = bytemuck::Zeroable::zeroed();
        table.magic = OrphanTable::MAGIC;
        table.blockno = block;
        table.slot = slot;
        table.seal();
        let mut image = vec![0u8; raw.len()];
        let bytes = bytemuck::bytes_of(&table);
        image[sector..sector + bytes.len()].copy_from_slice(bytes);
        lun.write_at(&image, block * BLOCK_SIZE_U64)?;
        tally.add(kind, item);
        wrote = true;
    }
    Ok(wrote)
}

// ----------------------------------------------------------------------------------
// Directory entries.
// ----------------------------------------------------------------------------------

/// What to do with one entry.
#[derive(Clone, Copy)]
enum EntryChange {
    Drop(DropReason),
    Fix(EntryFix),
}

/// Removes and corrects entries, one bucket rewrite per bucket.
fn fix_entries(lun: &dyn Lun, fixes: &Fixes, tally: &mut Tally) -> Result<bool> {
    let mut by_bucket: BTreeMap<BlockNo, Vec<(&EntryRef, EntryChange)>> = BTreeMap::new();
    let drops = fixes
        .drop_entries
        .iter()
        .map(|(e, why)| (e, EntryChange::Drop(*why)));
    let corrections = fixes
        .entry_fixes
        .iter()
        .map(|(e, fix)| (e, EntryChange::Fix(*fix)));
    for (entry, change) in drops.chain(corrections) {
        by_bucket
            .entry(entry.bucket)
            .or_default()
            .push((entry, change));
    }
    let mut wrote = false;
    for (block, changes) in by_bucket {
        wrote |= fix_bucket(lun, block, &changes, tally)?;
    }
    Ok(wrote)
}

fn fix_bucket(
    lun: &dyn Lun,
    block: BlockNo,
    changes: &[(&EntryRef, EntryChange)],
    tally: &mut Tally,
) -> Result<bool> {
    let mut raw = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut raw, block * BLOCK_SIZE_U64)?;
    let Ok(mut bucket) = DirBucket::decode(&raw, block) else {
        return Ok(false);
    };
    let mut entries: Vec<Option<Entry>> = parse_entries(&bucket).into_iter().map(Some).collect();
    let mut done = Vec::new();
    for &(want, change) in changes {
        // The entry must still be where, and what, the check saw.
        let Some(slot) = entries.get_mut(want.index) else {
            continue;
        };
        let same = slot.as_ref().is_some_and(|e| {
            e.name == want.name && e.ino == want.ino && bucket.header.owner == want.dir
        });
        if !same {
            continue;
        }
        match (change, slot.as_mut()) {
            (EntryChange::Drop(_), _) => *slot = None,
            (EntryChange::Fix(EntryFix::Kind(kind)), Some(e)) => e.kind = kind,
            (EntryChange::Fix(EntryFix::Hash(hash)), Some(e)) => e.hash = hash,
            (EntryChange::Fix(_), None) => continue,
        }
        done.push((want, change));
    }
    if done.is_empty() {
        return Ok(false);
    }
    let kept: Vec<Entry> = entries.into_iter().flatten().collect();
    if !store_entries(&mut bucket, &kept) {
        return Ok(false);
    }
    bucket.seal();
    lun.write_at(bytemuck::bytes_of(&bucket), block * BLOCK_SIZE_U64)?;
    for (entry, change) in done {
        let (kind, item) = match change {
            EntryChange::Drop(why) => entry_drop_line(why, entry),
            EntryChange::Fix(EntryFix::Kind(_)) => (
                "directory entry kinds set to their inode's",
                entry.path.clone(),
            ),
            EntryChange::Fix(EntryFix::Hash(_)) => (
                "directory entry hashes set to their name's",
                entry.path.clone(),
            ),
        };
        tally.add(kind, item);
    }
    Ok(true)
}

fn entry_drop_line(why: DropReason, entry: &EntryRef) -> (&'static str, String) {
    let path = entry.path.clone();
    match why {
        DropReason::NotAnInode => ("directory entries removed: they named no inode", path),
        DropReason::FreedInode => ("directory entries removed: they named a freed inode", path),
        DropReason::DamagedInode => (
            "files lost: their inode does not decode (entry removed, blocks freed)",
            format!("{path} (inode {})", entry.ino),
        ),
        DropReason::BadName => (
            "directory entries removed: impossible or duplicate name",
            path,
        ),
        DropReason::DirLinkedTwice => (
            "directory entries removed: a second entry of a directory",
            path,
        ),
    }
}

/// Serialises entries into a bucket (as `fs::dir` stores them); false when they do
/// not fit, which fewer entries than the bucket held always do.
fn store_entries(bucket: &mut DirBucket, entries: &[Entry]) -> bool {
    let mut area = [0u8; DIR_BUCKET_AREA];
    let mut pos = 0;
    for e in entries {
        let end = pos + DIR_ENTRY_FIXED + e.name.len();
        let Some(at) = area.get_mut(pos..end) else {
            return false;
        };
        at[0..8].copy_from_slice(&e.hash.to_le_bytes());
        at[8..16].copy_from_slice(&e.ino.to_le_bytes());
        at[16] = e.kind;
        at[17] = e.name.len() as u8;
        at[DIR_ENTRY_FIXED..].copy_from_slice(&e.name);
        pos = end;
    }
    bucket.area = area;
    bucket.header.count = entries.len() as u32;
    bucket.header.used = pos as u32;
    true
}

// ----------------------------------------------------------------------------------
// Inode fields.
// ----------------------------------------------------------------------------------

/// Sets link counts, block counts, parents and directory counts to what the walk
/// found, one body write per inode.
fn fix_inodes(lun: &dyn Lun, geo: &Geometry, fixes: &Fixes, tally: &mut Tally) -> Result<bool> {
    let mut wrote = false;
    for (&ino, fix) in &fixes.inodes {
        let mut raw = vec![0u8; geo.body_len()];
        lun.read_at(&mut raw, geo.body_offset(ino))?;
        let Ok(mut inode) = InodeBody::decode(&raw, ino) else {
            continue;
        };
        let changed = apply_inode_fix(&mut inode, fix, tally);
        if changed {
            inode.seal();
            lun.write_at(&encode_padded(&inode, geo.body_len()), geo.body_offset(ino))?;
            wrote = true;
        }
    }
    Ok(wrote)
}

fn apply_inode_fix(inode: &mut InodeBody, fix: &InodeFix, tally: &mut Tally) -> bool {
    let before = *inode;
    let mut set = Setter {
        tally,
        path: &fix.path,
    };
    set.field(
        "link counts set to the entries found",
        &mut inode.nlink,
        fix.nlink,
    );
    let blocks = "inode block counts set to the blocks owned";
    set.field(blocks, &mut inode.blocks, fix.blocks);
    let parent = "directory parent fields set to the holding directory";
    set.field(parent, &mut inode.parent, fix.parent);
    let counts = "directory entry and bucket counts set to what the buckets hold";
    set.field(counts, &mut inode.dir_entries, fix.dir_entries);
    set.field(counts, &mut inode.dir_buckets, fix.dir_buckets);
    let size = "sizes set (a directory's to its buckets, a file's past the largest to its data)";
    set.field(size, &mut inode.size, fix.size);
    let xattr = "xattr blocks dropped: outside the volume, damaged or another inode's";
    set.field(xattr, &mut inode.xattr_block, fix.xattr_block);
    set.field("unknown inode flags cleared", &mut inode.flags, fix.flags);
    bytemuck::bytes_of(inode) != bytemuck::bytes_of(&before)
}

/// Sets inode fields and tallies each change as "path old -> new".
struct Setter<'a> {
    tally: &'a mut Tally,
    path: &'a str,
}

impl Setter<'_> {
    fn field<T: Copy + PartialEq + std::fmt::Display>(
        &mut self,
        kind: &str,
        field: &mut T,
        want: Option<T>,
    ) {
        if let Some(want) = want.filter(|w| w != field) {
            self.tally
                .add(kind, format!("{} {field} -> {want}", self.path));
            *field = want;
        }
    }
}

// ----------------------------------------------------------------------------------
// Lock records.
// ----------------------------------------------------------------------------------

/// Resets every lock record the check noted to free: damaged ones (and inodes'
/// all-zero sectors) to a free record, ones naming a holder or an open file to a free
/// record with the next `change_seq`. No host is live, so every holder is stale (its
/// journal is replayed).
fn reset_locks(
    lun: &dyn Lun,
    geo: &Geometry,
    report: &FsckReport,
    tally: &mut Tally,
) -> Result<bool> {
    let sector = geo.ats_sector_size as usize;
    let resources: BTreeSet<BlockNo> = report.fixes.locks.iter().copied().collect();
    let mut wrote = false;
    for resource in resources {
        let offset = geo.lock_offset(resource);
        let mut raw = vec![0u8; sector];
        lun.read_at(&mut raw, offset)?;
        let Some((kind, new)) = free_lock_image(&raw, resource, sector) else {
            continue;
        };
        match lun.compare_and_write(offset, &raw, &new)? {
            Caw::Written => {}
            Caw::Miscompare(actual) if actual == new => {}
            Caw::Miscompare(_) => bail!(
                "the lock record of resource {resource} changed during the repair: a host is \
                 using the volume; unmount every host and run the repair again"
            ),
        }
        let name = match report.paths.get(&resource) {
            Some(path) => path.clone(),
            None => geo
                .ag_of(resource)
                .map_or_else(String::new, |ag| format!("group {ag}")),
        };
        tally.add(kind, name);
        wrote = true;
    }
    Ok(wrote)
}

/// The free image that replaces a lock sector the check noted, and the repair's
/// name; None when the sector is already idle. A free record, never zeros: atsfs
/// takes an all-zero sector for a free lock only on group headers and the root.
fn free_lock_image(
    raw: &[u8],
    resource: BlockNo,
    sector: usize,
) -> Option<(&'static str, Vec<u8>)> {
    if raw.iter().all(|&b| b == 0) {
        let kind = "inode lock sectors of all zeros given a free record";
        return Some((kind, free_record(resource, 1, sector)));
    }
    let Ok(old) = LockRecord::decode(raw, resource) else {
        let kind = "damaged lock records reset to free";
        return Some((kind, free_record(resource, 1, sector)));
    };
    if old.mode == LOCK_FREE && old.open_flags == 0 && old.open_readers == 0 {
        return None;
    }
    let kind = "stale lock records and open-file entries reset to free (no host is live)";
    let next_seq = old.change_seq.wrapping_add(1);
    Some((kind, free_record(resource, next_seq, sector)))
}

/// A free lock record of `resource`, padded to the sector.
fn free_record(resource: BlockNo, change_seq: u64, sector: usize) -> Vec<u8> {
    let mut free: LockRecord = bytemuck::Zeroable::zeroed();
    free.magic = LockRecord::MAGIC;
    free.resource = resource;
    free.mode = LOCK_FREE;
    free.change_seq = change_seq;
    free.seal();
    encode_padded(&free, sector)
}

// ----------------------------------------------------------------------------------
// Bitmaps and group headers.
// ----------------------------------------------------------------------------------

/// Rewrites every group whose bitmap, free count, checksum or header is not what
/// reachability says. While the walk could not see everything, blocks are only ever
/// marked used, never freed.
fn fix_bitmaps(
    lun: &dyn Lun,
    geo: &Geometry,
    fixes: &Fixes,
    tally: &mut Tally,
    notes: &mut Vec<String>,
) -> Result<bool> {
    let keep_used = !fixes.hidden.is_empty();
    let empty = vec![0u64; (AG_BLOCKS / 64) as usize];
    let mut wrote = false;
    let mut kept = 0;
    for ag in 0..geo.ag_count {
        let reach = fixes.reachable.get(ag as usize).unwrap_or(&empty);
        let done = fix_group(lun, geo, ag, reach, keep_used)?;
        kept += done.kept;
        if done.wrote {
            tally.add(
                "allocation groups rewritten from reachability",
                done.describe(ag),
            );
            wrote = true;
        }
    }
    if kept > 0 {
        let first = fixes.hidden.first().cloned().unwrap_or_default();
        notes.push(format!(
            "{kept} blocks that nothing reachable uses are kept marked used: the walk could not \
             read everything ({first}{}), so something may still use them",
            if fixes.hidden.len() > 1 { ", ..." } else { "" }
        ));
    }
    Ok(wrote)
}

/// What one group's rewrite did.
struct GroupFix {
    wrote: bool,
    freed: u64,
    marked: u64,
    kept: u64,
    header_rebuilt: bool,
}

impl GroupFix {
    fn describe(&self, ag: u64) -> String {
        let mut parts = Vec::new();
        if self.freed > 0 {
            parts.push(format!("{} unreachable blocks freed", self.freed));
        }
        if self.marked > 0 {
            parts.push(format!("{} blocks in use marked used", self.marked));
        }
        if self.header_rebuilt {
            parts.push("header rebuilt".to_owned());
        }
        if parts.is_empty() {
            parts.push("free count and checksum".to_owned());
        }
        format!("group {ag}: {}", parts.join(", "))
    }
}

/// The group's header as found, if it decodes and names this group.
fn read_header(lun: &dyn Lun, geo: &Geometry, ag: u64) -> Result<Option<AgHeader>> {
    let hdr = geo.ag_header(ag);
    let mut raw = vec![0u8; geo.body_len()];
    lun.read_at(&mut raw, geo.body_offset(hdr))?;
    Ok(AgHeader::decode(&raw, hdr)
        .ok()
        .filter(|h| h.ag_index == ag && h.start == geo.ag_first(ag) && h.blocks == geo.ag_len(ag)))
}

fn fix_group(
    lun: &dyn Lun,
    geo: &Geometry,
    ag: u64,
    reach: &[u64],
    keep_used: bool,
) -> Result<GroupFix> {
    let (len, meta) = (geo.ag_len(ag), geo.ag_meta_blocks());
    let header = read_header(lun, geo, ag)?;
    let uninit = header.is_some_and(|h| h.flags & AG_FLAG_BITMAP_UNINIT != 0);
    let mut disk = vec![0u8; BLOCK_SIZE];
    if uninit {
        set_range(&mut disk, 0, meta);
    } else {
        lun.read_at(&mut disk, geo.ag_bitmap(ag) * BLOCK_SIZE_U64)?;
    }
    let mut want = vec![0u8; BLOCK_SIZE];
    for (chunk, word) in want.chunks_exact_mut(8).zip(reach) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    set_range(&mut want, 0, meta);
    let unreached = count(&disk, &want, meta, len, |d, w| d && !w);
    if keep_used {
        for (w, d) in want.iter_mut().zip(&disk) {
            *w |= d;
        }
    }
    let same_bits = count(&disk, &want, 0, len, |d, w| d != w) == 0;
    let free = len - count(&want, &want, 0, len, |w, _| w);
    let fine = header.is_some_and(|h| {
        let crc_ok = uninit || h.bitmap_crc == crc32fast::hash(&disk);
        let flags_ok = h.flags & !AG_FLAG_BITMAP_UNINIT == 0;
        crc_ok && flags_ok && h.free_blocks == free
    });
    let kept = if keep_used { unreached } else { 0 };
    if same_bits && fine {
        let done = GroupFix {
            wrote: false,
            freed: 0,
            marked: 0,
            kept,
            header_rebuilt: false,
        };
        return Ok(done);
    }
    // Bits past a short group's end are set, as the format requires.
    set_range(&mut want, len, AG_BLOCKS);
    let done = GroupFix {
        wrote: true,
        freed: count(&disk, &want, meta, len, |d, w| d && !w),
        marked: count(&disk, &want, meta, len, |d, w| !d && w),
        kept,
        header_rebuilt: header.is_none(),
    };
    write_group(lun, geo, ag, header, &want, free)?;
    Ok(done)
}

/// Writes a group's bitmap, then its header (free count, the bitmap's checksum, flags
/// cleared, the fields that name the group). A repair stopped between the two leaves
/// a bitmap that fails its checksum, which the next repair rebuilds.
fn write_group(
    lun: &dyn Lun,
    geo: &Geometry,
    ag: u64,
    header: Option<AgHeader>,
    bitmap: &[u8],
    free: u64,
) -> Result<()> {
    let (hdr, len, meta) = (geo.ag_header(ag), geo.ag_len(ag), geo.ag_meta_blocks());
    lun.write_at(bitmap, geo.ag_bitmap(ag) * BLOCK_SIZE_U64)?;
    let mut h = header.unwrap_or_else(bytemuck::Zeroable::zeroed);
    h.magic = AgHeader::MAGIC;
    h.blockno = hdr;
    h.ag_index = ag;
    h.start = geo.ag_first(ag);
    h.blocks = len;
    h.flags = 0;
    h.free_blocks = free;
    h.bitmap_crc = crc32fast::hash(bitmap);
    if h.rotor < meta || h.rotor >= len {
        h.rotor = meta;
    }
    h.seal();
    lun.write_at(&encode_padded(&h, geo.body_len()), geo.body_offset(hdr))?;
    Ok(())
}

fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap
        .get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn set_range(bitmap: &mut [u8], from: u64, to: u64) {
    for i in from..to {
        if let Some(b) = bitmap.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }
}

/// Bits `i` in `[from, to)` for which `pick(a[i], b[i])` holds.
fn count(a: &[u8], b: &[u8], from: u64, to: u64, pick: fn(bool, bool) -> bool) -> u64 {
    (from..to).filter(|&i| pick(bit(a, i), bit(b, i))).count() as u64
}
