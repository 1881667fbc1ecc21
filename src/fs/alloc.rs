//! The block allocator: one bitmap block and one header per allocation group.
//!
//! Bit i of a group's bitmap (LSB first within each byte) is set when block
//! `group start + i` is in use; the header keeps the free count and the bitmap's CRC.
//! A group whose header says `BITMAP_UNINIT` has never had its bitmap written: all
//! its blocks but its own metadata are free.

use super::meta::Meta;
use super::{FsError, FsResult};
use crate::cluster::lock::LockMode;
use crate::format::{AgHeader, BlockNo, OnDisk, AG_FLAG_BITMAP_UNINIT, BLOCK_SIZE, BLOCK_SIZE_U64};

/// A group's header and bitmap, loaded and checked against each other.
struct Group {
    ag: u64,
    header: AgHeader,
    bitmap: Vec<u8>,
}

fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0
}

fn set_bits(bitmap: &mut [u8], start: u64, len: u64, value: bool) {
    for i in start..start + len {
        let byte = &mut bitmap[(i / 8) as usize];
        if value {
            *byte |= 1 << (i % 8);
        } else {
            *byte &= !(1 << (i % 8));
        }
    }
}

/// The first clear bit in `[from, to)`.
fn next_clear(bitmap: &[u8], from: u64, to: u64) -> Option<u64> {
    let mut i = from;
    while i < to {
        if i % 64 == 0 && i + 64 <= to {
            let word_at = (i / 8) as usize;
            let mut word = [0u8; 8];
            word.copy_from_slice(&bitmap[word_at..word_at + 8]);
            let word = u64::from_le_bytes(word);
            if word == u64::MAX {
                i += 64;
                continue;
            }
            return Some(i + u64::from((!word).trailing_zeros()));
        }
        if !bit(bitmap, i) {
            return Some(i);
        }
        i += 1;
    }
    None
}

impl Meta {
    fn load_group(&mut self, ag: u64) -> FsResult<Group> {
        let hdr_block = self.geo.ag_header(ag);
        let header: AgHeader = self.get(
            self.geo.body_offset(hdr_block),
            self.geo.body_len(),
            hdr_block,
        )?;
        if header.ag_index != ag
            || header.start != self.geo.ag_first(ag)
            || header.blocks != self.geo.ag_len(ag)
        {
            return Err(FsError::corrupted(
                "allocation group header",
                hdr_block,
                "names another group",
            ));
        }
        let bitmap_block = self.geo.ag_bitmap(ag);
        let bitmap = if header.flags & AG_FLAG_BITMAP_UNINIT != 0 {
            let mut fresh = vec![0u8; BLOCK_SIZE];
            set_bits(&mut fresh, 0, self.geo.ag_meta_blocks(), true);
            fresh
        } else {
            let (raw, checked) = self.raw_checked(bitmap_block * BLOCK_SIZE_U64, BLOCK_SIZE)?;
            if !checked && crc32fast::hash(&raw) != header.bitmap_crc {
                self.forget(bitmap_block * BLOCK_SIZE_U64);
                return Err(FsError::corrupted(
                    "allocation bitmap",
                    bitmap_block,
                    "checksum mismatch",
                ));
            }
            if !checked {
                self.mark_checked(bitmap_block * BLOCK_SIZE_U64);
            }
            raw.to_vec()
        };
        Ok(Group { ag, header, bitmap })
    }

    fn store_group(&mut self, mut group: Group) {
        group.header.flags &= !AG_FLAG_BITMAP_UNINIT;
        group.header.bitmap_crc = crc32fast::hash(&group.bitmap);
        let hdr_block = self.geo.ag_header(group.ag);
        self.put(
            self.geo.body_offset(hdr_block),
            self.geo.body_len(),
            group.header,
        );
        self.put_raw(self.geo.ag_bitmap(group.ag) * BLOCK_SIZE_U64, group.bitmap);
    }

    /// Allocates a run of up to `want` blocks (exactly `want` when `exact`), as near
    /// to `goal` as it finds. Returns the first block and the length.
    pub fn alloc(&mut self, goal: BlockNo, want: u64, exact: bool) -> FsResult<(BlockNo, u64)> {
        let (start, len) = self.alloc_any(goal, want, exact)?;
        self.forget_freed_locks(start, len, None);
        Ok((start, len))
    }

    /// Allocates the `span` blocks of a new inode near `goal`; the caller takes its
    /// lock with `take_new`, free of I/O when it is a freed inode's lock we kept.
    pub fn alloc_inode(&mut self, goal: BlockNo, span: u64) -> FsResult<BlockNo> {
        let (start, len) = self.alloc_any(goal, span, true)?;
        self.forget_freed_locks(start, len, Some(start));
        Ok(start)
    }

    fn alloc_any(&mut self, goal: BlockNo, want: u64, exact: bool) -> FsResult<(BlockNo, u64)> {
        match self.alloc_once(goal, want, exact) {
            Err(FsError::NoSpace) if self.has_committed_quarantine() => {
                // Freed blocks wait for the journal tail (and sealed transactions for
                // their commit): commit those, move the tail and look again.
                self.commit_sealed()?;
                self.release_quarantine()?;
                self.alloc_once(goal, want, exact)
            }
            other => other,
        }
    }

    fn alloc_once(&mut self, goal: BlockNo, want: u64, exact: bool) -> FsResult<(BlockNo, u64)> {
        debug_assert!(want > 0);
        let ag_count = self.geo.ag_count;
        let first_ag = self.geo.ag_of(goal).unwrap_or(0);
        for step in 0..ag_count {
            let ag = (first_ag + step) % ag_count;
            let goal_in_ag = if step == 0 {
                goal
            } else {
                self.geo.ag_first(ag)
            };
            if let Some(run) = self.alloc_in_group(ag, goal_in_ag, want, exact)? {
                return Ok(run);
            }
        }
        // No group we could lock had room. If others hold groups, wait for the first
        // of them (the operation is retried) before saying the volume is full.
        let busy = (0..ag_count)
            .map(|step| self.geo.ag_header((first_ag + step) % ag_count))
            .find(|&hdr| self.locks.held_mode(hdr).is_none());
        match busy {
            Some(hdr) => {
                self.need(hdr, LockMode::Exclusive)?;
                let ag = self.geo.ag_of(hdr).unwrap_or(0);
                let goal_in_ag = self.geo.ag_first(ag);
                self.alloc_in_group(ag, goal_in_ag, want, exact)?
                    .ok_or(FsError::NoSpace)
            }
            None => Err(FsError::NoSpace),
        }
    }

    fn alloc_in_group(
        &mut self,
        ag: u64,
        goal: BlockNo,
        want: u64,
        exact: bool,
    ) -> FsResult<Option<(BlockNo, u64)>> {
        let hdr_block = self.geo.ag_header(ag);
        // Another host works in this group: try the next one rather than wait.
        if !self.try_need(hdr_block, LockMode::Exclusive)? {
            return Ok(None);
        }
        let header: AgHeader = self.get(
            self.geo.body_offset(hdr_block),
            self.geo.body_len(),
            hdr_block,
        )?;
        if header.free_blocks == 0 || (exact && header.free_blocks < want) {
            return Ok(None);
        }
        let mut group = self.load_group(ag)?;
        let first = self.geo.ag_first(ag);
        let len = self.geo.ag_len(ag);
        let meta = self.geo.ag_meta_blocks();
        let start_at = goal.saturating_sub(first).clamp(meta, len);
        // Search from the goal to the end, then from the start of the group.
        let ranges = [(start_at, len), (meta, start_at)];
        for (from, to) in ranges {
            let mut i = from;
            while let Some(start) = next_clear(&group.bitmap, i, to) {
                let mut end = start + 1;
                while end < to && end - start < want && !bit(&group.bitmap, end) {
                    end += 1;
                }
                // Blocks freed by the running transaction are not reused before it commits.
                if let Some((q_start, q_end)) = self.quarantined_in(first + start, first + end) {
                    if q_start > first + start {
                        end = q_start - first;
                    } else {
                        i = q_end - first;
                        continue;
                    }
                }
                if exact && end - start < want {
                    i = end;
                    continue;
                }
                set_bits(&mut group.bitmap, start, end - start, true);
                group.header.free_blocks -= end - start;
                self.adjust_statfs(-((end - start) as i64));
                group.header.rotor = if end < len { end } else { meta };
                self.store_group(group);
                return Ok(Some((first + start, end - start)));
            }
        }
        Ok(None)
    }

    /// Frees a run of blocks (within one group). The blocks stay unusable until the
    /// running transaction commits.
    pub fn free(&mut self, start: BlockNo, len: u64) -> FsResult<()> {
        let Some(ag) = self.geo.ag_of(start) else {
            return Err(FsError::corrupted(
                "extent",
                start,
                "points outside the data area",
            ));
        };
        if self.geo.ag_of(start + len - 1) != Some(ag) {
            return Err(FsError::corrupted(
                "extent",
                start,
                "crosses an allocation group",
            ));
        }
        self.need(self.geo.ag_header(ag), LockMode::Exclusive)?;
        let mut group = self.load_group(ag)?;
        let first = self.geo.ag_first(ag);
        for i in start - first..start - first + len {
            if !bit(&group.bitmap, i) || i < self.geo.ag_meta_blocks() {
                return Err(FsError::corrupted(
                    "allocation bitmap",
                    self.geo.ag_bitmap(ag),
                    format!("block {} freed twice", first + i),
                ));
            }
        }
        set_bits(&mut group.bitmap, start - first, len, false);
        group.header.free_blocks += len;
        self.adjust_statfs(len as i64);
        self.store_group(group);
        for block in start..start + len {
            self.forget(block * BLOCK_SIZE_U64);
            self.forget(self.geo.body_offset(block));
        }
        self.quarantine(start, len);
        Ok(())
    }

    /// Keeps the statfs total current with this host's own allocations (other hosts'
    /// show up when the total expires).
    fn adjust_statfs(&mut self, delta: i64) {
        if let Some((_, total)) = self.statfs_cache.as_mut() {
            *total = total.saturating_add_signed(delta);
        }
    }

    /// Free blocks in all groups. Groups this host holds are read through the cache;
    /// the others straight from the disk without their locks (a moment's staleness is
    /// fine for statfs), and the sum is kept for two seconds.
    pub fn free_blocks(&mut self) -> FsResult<u64> {
        let now = self.node.clock.now_ms();
        if let Some((at, total)) = self.statfs_cache {
            if now.saturating_sub(at) < 2000 {
                return Ok(total);
            }
        }
        let mut total = 0;
        for ag in 0..self.geo.ag_count {
            let hdr_block = self.geo.ag_header(ag);
            let offset = self.geo.body_offset(hdr_block);
            let header: Option<AgHeader> = if self.locks.held_mode(hdr_block).is_some() {
                Some(self.get(offset, self.geo.body_len(), hdr_block)?)
            } else {
                let mut raw = vec![0u8; self.geo.body_len()];
                self.lun.read_at(&mut raw, offset)?;
                AgHeader::decode(&raw, hdr_block).ok()
            };
            total += header.map_or(0, |h| h.free_blocks);
        }
        self.statfs_cache = Some((now, total));
        Ok(total)
    }
}
