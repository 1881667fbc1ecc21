//! Allocation groups: their headers and bitmaps, and the map of blocks that the
//! reachable tree uses, compared against the bitmaps once the walk is done.
//!
//! Bit i of a group's bitmap (LSB first within each byte, so also within each
//! little-endian u64 word) stands for block `group start + i`. The first
//! `ag_meta_blocks()` blocks of a group are its own metadata (header resource and
//! bitmap) and must be marked used; bits past the group's end mean nothing.

use super::check_lock;
use super::report::{FsckReport, ProblemKind, PROBLEMS_PER_OBJECT_MAX};
use super::volume::Volume;
use crate::format::{AgHeader, BlockNo, Geometry, OnDisk, AG_BLOCKS, AG_FLAG_BITMAP_UNINIT};
use anyhow::Result;

/// u64 words of one group's bitmap.
const WORDS: usize = (AG_BLOCKS / 64) as usize;

/// The blocks claimed by reachable structures: one bit per block, a group's words
/// allocated when it is first claimed from.
pub(crate) struct BlockMap {
    geo: Geometry,
    groups: Vec<Option<Box<[u64]>>>,
}

/// What claiming a run of blocks found wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Claim {
    /// Blocks outside every group (or past the volume).
    pub outside: u64,
    /// Blocks that are a group's own header or bitmap.
    pub group_meta: u64,
    /// Blocks already claimed by something else reachable.
    pub twice: u64,
    pub first_bad: Option<BlockNo>,
}

impl Claim {
    pub fn is_ok(&self) -> bool {
        self.outside == 0 && self.group_meta == 0 && self.twice == 0
    }

    /// A sentence for a bad claim by `what` (which names its blocks).
    pub fn describe(&self, what: &str) -> String {
        let mut parts = Vec::new();
        if self.outside > 0 {
            parts.push(format!("{} blocks outside the data area", self.outside));
        }
        if self.group_meta > 0 {
            parts.push(format!(
                "{} blocks on allocation group metadata",
                self.group_meta
            ));
        }
        if self.twice > 0 {
            parts.push(format!(
                "{} blocks also used by another file or metadata block",
                self.twice
            ));
        }
        let first = self
            .first_bad
            .map_or(String::new(), |b| format!(", the first is block {b}"));
        format!("{what}: {}{first}", parts.join(", "))
    }
}

impl BlockMap {
    pub fn new(geo: Geometry) -> BlockMap {
        BlockMap {
            geo,
            groups: (0..geo.ag_count).map(|_| None).collect(),
        }
    }

    /// Marks `len` blocks from `start` as used by a reachable structure.
    pub fn claim(&mut self, start: BlockNo, len: u64) -> Claim {
        let geo = self.geo;
        let mut claim = Claim::default();
        let end = start.saturating_add(len);
        let mut at = start;
        while at < end {
            let Some(ag) = geo.ag_of(at) else {
                // Before the groups, or past the last one: all outside up to the next
                // group (only the first group can follow).
                let next = if at < geo.ag_start {
                    geo.ag_start.min(end)
                } else {
                    end
                };
                claim.outside += next - at;
                claim.first_bad.get_or_insert(at);
                at = next;
                continue;
            };
            let first = geo.ag_first(ag);
            let chunk_end = geo.ag_end(ag).min(end);
            let meta_end = first + geo.ag_meta_blocks();
            if at < meta_end {
                let n = meta_end.min(chunk_end) - at;
                claim.group_meta += n;
                claim.first_bad.get_or_insert(at);
                at += n;
            }
            let Some(words) = self.group_mut(ag) else {
                break;
            };
            for block in at..chunk_end {
                let i = (block - first) as usize;
                let (w, bit) = (i / 64, 1u64 << (i % 64));
                if let Some(word) = words.get_mut(w) {
                    if *word & bit != 0 {
                        claim.twice += 1;
                        claim.first_bad.get_or_insert(block);
                    }
                    *word |= bit;
                }
            }
            at = chunk_end.max(at);
        }
        claim
    }

    fn group_mut(&mut self, ag: u64) -> Option<&mut [u64]> {
        let slot = self.groups.get_mut(ag as usize)?;
        Some(slot.get_or_insert_with(|| vec![0u64; WORDS].into_boxed_slice()))
    }

    fn group_words(&self, ag: u64) -> Option<&[u64]> {
        self.groups.get(ag as usize)?.as_deref()
    }

    /// Blocks claimed.
    pub fn claimed(&self) -> u64 {
        self.groups
            .iter()
            .flatten()
            .map(|w| w.iter().map(|x| u64::from(x.count_ones())).sum::<u64>())
            .sum()
    }
}

/// A group whose header decoded and named its group.
#[derive(Clone, Copy)]
pub(crate) struct GoodGroup {
    header: AgHeader,
}

/// Checks every group's header and bitmap on their own. Returns the groups whose
/// bitmaps can be compared with the tree later.
pub(crate) fn check_groups(
    vol: &mut Volume,
    report: &mut FsckReport,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<Option<GoodGroup>>> {
    let mut out = Vec::with_capacity(vol.geo.ag_count as usize);
    for ag in 0..vol.geo.ag_count {
        out.push(check_group(vol, report, ag)?);
        progress.inc(1);
    }
    Ok(out)
}

fn check_group(vol: &mut Volume, report: &mut FsckReport, ag: u64) -> Result<Option<GoodGroup>> {
    let geo = vol.geo;
    let first = geo.ag_first(ag);
    let (meta, len) = (geo.ag_meta_blocks(), geo.ag_len(ag));
    report.counts.allocation_groups += 1;
    report.counts.blocks_total += len;
    let raw = vol.blocks(first, meta)?;
    let sector = geo.ats_sector_size as usize;
    let (lock, body) = raw.split_at(sector.min(raw.len()));
    if let Err(e) = check_lock(lock, first, true, report) {
        let msg = format!("allocation group {ag}: {e}");
        report.problem(ProblemKind::LockRecord, Some(first), None, msg);
    }
    let header = match AgHeader::decode(body, first) {
        Ok(h) => h,
        Err(e) => {
            let msg = format!("allocation group {ag}: {e}; its bitmap is not checked");
            report.problem(ProblemKind::AgHeader, Some(first), None, msg);
            return Ok(None);
        }
    };
    if header.ag_index != ag || header.start != first || header.blocks != len {
        let msg = format!(
            "allocation group {ag}'s header names group {} (start {}, {} blocks); expected start {first}, {len} blocks",
            header.ag_index, header.start, header.blocks
        );
        report.problem(ProblemKind::AgHeader, Some(first), None, msg);
        return Ok(None);
    }
    if header.flags & !AG_FLAG_BITMAP_UNINIT != 0 {
        let msg = format!("allocation group {ag}: unknown flags {:#x}", header.flags);
        report.problem(ProblemKind::AgHeader, Some(first), None, msg);
    }
    let bitmap_block = geo.ag_bitmap(ag);
    let bitmap = if header.flags & AG_FLAG_BITMAP_UNINIT != 0 {
        uninit_bitmap(&geo)
    } else {
        let on_disk = raw
            .get(raw.len() - crate::format::BLOCK_SIZE..)
            .unwrap_or(&[]);
        if crc32fast::hash(on_disk) != header.bitmap_crc {
            let msg = format!(
                "allocation group {ag}: the bitmap does not match the checksum in its header"
            );
            report.problem(ProblemKind::BitmapChecksum, Some(bitmap_block), None, msg);
        }
        words_of(on_disk)
    };
    let meta_free = clear_bits(&bitmap, 0, meta);
    if meta_free > 0 {
        let msg = format!(
            "allocation group {ag}: {meta_free} of its own {meta} metadata blocks are marked free"
        );
        report.problem(ProblemKind::BlockMarkedFree, Some(first), None, msg);
    }
    let free = clear_bits(&bitmap, 0, len);
    if free != header.free_blocks {
        let msg = format!(
            "allocation group {ag}: the header counts {} free blocks, the bitmap has {free}",
            header.free_blocks
        );
        report.problem(ProblemKind::FreeCount, Some(first), None, msg);
    }
    report.counts.blocks_used += len - free;
    report.counts.blocks_free += header.free_blocks;
    Ok(Some(GoodGroup { header }))
}

/// The bitmap of a group whose bitmap was never written: its metadata in use only.
fn uninit_bitmap(geo: &Geometry) -> Vec<u64> {
    let mut words = vec![0u64; WORDS];
    for i in 0..geo.ag_meta_blocks() as usize {
        if let Some(w) = words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    words
}

fn words_of(bytes: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; WORDS];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *word = u64::from_le_bytes(b);
    }
    words
}

fn bit(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn clear_bits(words: &[u64], from: u64, to: u64) -> u64 {
    (from..to).filter(|&i| !bit(words, i)).count() as u64
}

/// Compares every checkable group's bitmap with the blocks the tree claimed:
/// leaked blocks (marked used, unreachable) and blocks in use but marked free.
pub(crate) fn compare_bitmaps(
    vol: &mut Volume,
    report: &mut FsckReport,
    map: &BlockMap,
    groups: &[Option<GoodGroup>],
) -> Result<()> {
    let geo = vol.geo;
    report.counts.blocks_reachable = map.claimed() + geo.ag_count * geo.ag_meta_blocks();
    let empty = vec![0u64; WORDS];
    report.fixes.reachable = (0..geo.ag_count)
        .map(|ag| {
            map.group_words(ag)
                .map_or_else(|| empty.clone(), |w| w.to_vec())
        })
        .collect();
    for (ag, group) in groups.iter().enumerate() {
        let ag = ag as u64;
        let Some(group) = group else { continue };
        let disk = if group.header.flags & AG_FLAG_BITMAP_UNINIT != 0 {
            uninit_bitmap(&geo)
        } else {
            words_of(&vol.blocks(geo.ag_bitmap(ag), 1)?)
        };
        let reach = map.group_words(ag).unwrap_or(&empty);
        let (from, to) = (geo.ag_meta_blocks(), geo.ag_len(ag));
        let first = geo.ag_first(ag);
        let leaked = runs(&disk, reach, from, to, |d, r| d & !r);
        let lost = runs(&disk, reach, from, to, |d, r| r & !d);
        report_runs(report, ag, first, &lost, ProblemKind::BlockMarkedFree);
        report_runs(report, ag, first, &leaked, ProblemKind::LeakedBlocks);
    }
    Ok(())
}

/// Runs `(first bit, length)` of the bits of `pick(disk, reach)` within `[from, to)`.
fn runs(
    disk: &[u64],
    reach: &[u64],
    from: u64,
    to: u64,
    pick: fn(u64, u64) -> u64,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, (&d, &r)) in disk.iter().zip(reach).enumerate() {
        let mut bits = pick(d, r);
        while bits != 0 {
            let i = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if i < from || i >= to {
                continue;
            }
            match out.last_mut() {
                Some((start, len)) if *start + *len == i => *len += 1,
                _ => out.push((i, 1)),
            }
        }
    }
    out
}

fn report_runs(
    report: &mut FsckReport,
    ag: u64,
    first: BlockNo,
    runs: &[(u64, u64)],
    kind: ProblemKind,
) {
    let what = match kind {
        ProblemKind::LeakedBlocks => {
            "marked used in the bitmap but used by nothing reachable (leaked; a host that \
             crashed while files it had unlinked were still open leaves such blocks)"
        }
        _ => "in use but marked free in the bitmap: the allocator would hand them out again",
    };
    for &(start, len) in runs.iter().take(PROBLEMS_PER_OBJECT_MAX) {
        let (a, b) = (first + start, first + start + len - 1);
        let msg = if len == 1 {
            format!("block {a} is {what}")
        } else {
            format!("blocks {a}-{b} ({len} blocks) are {what}")
        };
        report.problem(kind, Some(a), None, msg);
    }
    if runs.len() > PROBLEMS_PER_OBJECT_MAX {
        let rest = &runs[PROBLEMS_PER_OBJECT_MAX..];
        let blocks: u64 = rest.iter().map(|r| r.1).sum();
        let msg = format!(
            "allocation group {ag}: {} more runs ({blocks} blocks) are {what}",
            rest.len()
        );
        report.problem(kind, Some(first), None, msg);
    }
}
