//! File data: the extent map, read, write, truncate, fallocate.
//!
//! Extents live inline in the inode (up to `INODE_EXTENTS_MAX`) or, past that, in
//! leaf blocks listed by index entries in the inode (tree mode). The in-memory form
//! is a sorted, non-overlapping `Vec<Extent>`.
//!
//! Ordered mode: data blocks are written before the commit that maps them, and a
//! newly allocated block is written whole (zeros around the caller's bytes), so a
//! crash never exposes stale bytes.

use super::inode::{is_reg, is_symlink, touch_ctime, touch_mtime_ctime};
use super::{Core, FsError, FsResult, Ino};
use crate::format::{
    BlockNo, Extent, ExtentLeaf, InodeBody, OnDisk, BLOCK_SIZE, BLOCK_SIZE_U64, EXTENT_UNWRITTEN,
    INODE_AREA_SIZE, INODE_EXTENTS_MAX, INODE_FLAG_EXTENT_TREE, INODE_FLAG_INLINE,
    INODE_FLAG_MULTI_WRITER, LEAF_EXTENTS_MAX,
};

/// A read mapped to device blocks under the core lock, carried out with or without
/// it. `Fs::read_data` carries it out without the core lock, inside the data I/O
/// barrier (`Meta::data_io`, entered under the core lock) instead: the blocks it
/// names cannot be reused before it ends, because a freed block only becomes
/// allocatable again through `Meta::release_quarantine`, which waits for the
/// barrier to be empty, and a lock is only handed to another host after
/// `release_quarantine`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadPlan {
    /// Holes and unwritten extents read as zeros; `runs` fill the rest.
    buf_len: usize,
    runs: Vec<ReadRun>,
    /// The caller's bytes: `[skip, skip + len)` of the block-aligned buffer.
    skip: usize,
    len: usize,
    /// Bytes known without device I/O (inline data, end of file).
    ready: Option<Vec<u8>>,
    /// The file is in multi-writer mode: other hosts may write it meanwhile.
    multi_writer: bool,
}

/// Blocks `disk..disk + blocks` land at `at` in the plan's buffer.
#[derive(Clone, Debug, PartialEq)]
struct ReadRun {
    at: usize,
    disk: BlockNo,
    blocks: usize,
}

impl ReadPlan {
    pub(crate) fn ready(bytes: Vec<u8>) -> ReadPlan {
        ReadPlan {
            buf_len: 0,
            runs: Vec::new(),
            skip: 0,
            len: bytes.len(),
            ready: Some(bytes),
            multi_writer: false,
        }
    }

    /// True when the plan needs device reads.
    pub fn needs_io(&self) -> bool {
        !self.runs.is_empty()
    }

    /// True when the blocks may be read ahead of their read (`fs::readahead`): they
    /// need device reads, and no other host may write them while this one holds
    /// the file's lock.
    pub fn may_read_ahead(&self) -> bool {
        self.needs_io() && !self.multi_writer
    }

    /// Reads the blocks and returns the caller's bytes.
    pub fn execute(self, lun: &dyn crate::lun::Lun) -> FsResult<Vec<u8>> {
        let mut buf = Vec::new();
        let range = self.execute_into(lun, &mut buf, false)?;
        buf.truncate(range.end);
        buf.drain(..range.start);
        Ok(buf)
    }

    /// Reads the blocks into `buf` (reused between calls: a fresh buffer per read
    /// costs a page fault per page) and returns where the caller's bytes are in it.
    /// With `uncached` (the file was opened with O_DIRECT), the blocks are read
    /// past the host's page cache (`Lun::read_uncached`). The blocks land at a
    /// block-aligned place in `buf`, so that direct reads need no bounce copy.
    pub fn execute_into(
        self,
        lun: &dyn crate::lun::Lun,
        buf: &mut Vec<u8>,
        uncached: bool,
    ) -> FsResult<std::ops::Range<usize>> {
        if let Some(bytes) = self.ready {
            buf.clear();
            buf.extend_from_slice(&bytes);
            return Ok(0..bytes.len());
        }
        if buf.capacity() < self.buf_len + BLOCK_SIZE {
            buf.clear();
            buf.reserve(self.buf_len + BLOCK_SIZE);
        }
        // Capacity is there: the resize below keeps the buffer where it is, and
        // zeroes only what it adds (every byte below is written: the runs read over
        // what the last read left, holes are zeroed); zeroing a 1 MiB buffer on
        // every read was 12% of the daemon's CPU in a cold O_DIRECT read.
        let base = buf.as_ptr().align_offset(BLOCK_SIZE).min(BLOCK_SIZE);
        buf.resize(base + self.buf_len, 0);
        let blocks = &mut buf[base..];
        // Holes read as zeros.
        let mut covered = 0usize;
        for run in &self.runs {
            blocks[covered..run.at].fill(0);
            let len = run.blocks * BLOCK_SIZE;
            let target = &mut blocks[run.at..run.at + len];
            let offset = run.disk * BLOCK_SIZE_U64;
            if uncached {
                lun.read_uncached(target, offset)?;
            } else {
                lun.read_at(target, offset)?;
            }
            covered = run.at + len;
        }
        blocks[covered..].fill(0);
        Ok(base + self.skip..base + self.skip + self.len)
    }
}

/// Largest file size: 2^32 blocks of 4 KiB (16 TiB), as ext4.
pub const FILE_SIZE_MAX: u64 = (1u64 << 32) * BLOCK_SIZE_U64;
/// Most blocks one write allocates at once (keeps a transaction small).
const ALLOC_CHUNK_BLOCKS: u64 = 8192;
/// Most extents one truncate round frees before committing.
const TRUNCATE_EXTENTS_PER_TX: usize = 48;

pub(crate) fn area_extents(area: &[u8], count: usize) -> Vec<Extent> {
    (0..count)
        .map(|i| bytemuck::pod_read_unaligned::<Extent>(&area[i * 24..i * 24 + 24]))
        .collect()
}

fn set_area_extents(area: &mut [u8], extents: &[Extent]) {
    area.fill(0);
    for (i, e) in extents.iter().enumerate() {
        area[i * 24..i * 24 + 24].copy_from_slice(bytemuck::bytes_of(e));
    }
}

/// Merges neighbours that continue each other on disk with the same flags.
fn normalize(extents: &mut Vec<Extent>) {
    extents.retain(|e| e.len > 0);
    extents.sort_by_key(|e| e.file_block);
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.drain(..) {
        if let Some(last) = out.last_mut() {
            let contiguous = last.file_block + u64::from(last.len) == e.file_block
                && last.disk_block + u64::from(last.len) == e.disk_block
                && last.flags == e.flags
                && u64::from(last.len) + u64::from(e.len) <= u64::from(u32::MAX);
            if contiguous {
                last.len += e.len;
                continue;
            }
        }
        out.push(e);
    }
    *extents = out;
}

/// The extent covering `block`, or the index of the first extent after it.
fn find(extents: &[Extent], block: u64) -> Result<usize, usize> {
    let pos = extents.partition_point(|e| e.file_block + u64::from(e.len) <= block);
    match extents.get(pos) {
        Some(e) if e.file_block <= block => Ok(pos),
        _ => Err(pos),
    }
}

/// Cuts `[from, to)` (file blocks) out of an extent list; returns the disk runs that
/// were mapped there.
fn cut_range(extents: &mut Vec<Extent>, from: u64, to: u64) -> Vec<(BlockNo, u64)> {
    let mut freed = Vec::new();
    let mut out = Vec::with_capacity(extents.len() + 1);
    for e in extents.drain(..) {
        let start = e.file_block;
        let end = start + u64::from(e.len);
        if end <= from || start >= to {
            out.push(e);
            continue;
        }
        let cut_start = start.max(from);
        let cut_end = end.min(to);
        if start < cut_start {
            out.push(Extent {
                len: (cut_start - start) as u32,
                ..e
            });
        }
        freed.push((e.disk_block + (cut_start - start), cut_end - cut_start));
        if cut_end < end {
            out.push(Extent {
                file_block: cut_end,
                disk_block: e.disk_block + (cut_end - start),
                len: (end - cut_end) as u32,
                flags: e.flags,
            });
        }
    }
    *extents = out;
    freed
}

impl Core {
    /// Loads a file's extent list.
    pub fn load_extents(&mut self, inode: &InodeBody) -> FsResult<Vec<Extent>> {
        let count = inode.extent_count as usize;
        if inode.flags & INODE_FLAG_INLINE != 0 {
            return Ok(Vec::new());
        }
        if inode.flags & INODE_FLAG_EXTENT_TREE == 0 {
            return Ok(area_extents(&inode.area, count));
        }
        let mut out = Vec::new();
        for index in area_extents(&inode.area, count) {
            let leaf = self.get_leaf(index.disk_block, inode.blockno)?;
            out.extend_from_slice(&leaf.extents[..leaf.count as usize]);
        }
        Ok(out)
    }

    fn get_leaf(&mut self, block: BlockNo, owner: Ino) -> FsResult<ExtentLeaf> {
        let leaf: ExtentLeaf = self.meta.get(block * BLOCK_SIZE_U64, BLOCK_SIZE, block)?;
        if leaf.owner != owner {
            return Err(FsError::corrupted(
                "extent leaf",
                block,
                format!("owned by inode {}", leaf.owner),
            ));
        }
        Ok(leaf)
    }

    /// Stores a file's extent list: inline when it fits, else in leaf blocks (reusing
    /// the file's current leaves, allocating or freeing as needed).
    pub fn store_extents(
        &mut self,
        inode: &mut InodeBody,
        mut extents: Vec<Extent>,
    ) -> FsResult<()> {
        normalize(&mut extents);
        let old_leaves: Vec<BlockNo> = if inode.flags & INODE_FLAG_EXTENT_TREE != 0 {
            area_extents(&inode.area, inode.extent_count as usize)
                .iter()
                .map(|i| i.disk_block)
                .collect()
        } else {
            Vec::new()
        };
        if extents.len() <= INODE_EXTENTS_MAX {
            for leaf in old_leaves {
                self.meta.free(leaf, 1)?;
                inode.blocks -= 1;
            }
            set_area_extents(&mut inode.area, &extents);
            inode.extent_count = extents.len() as u32;
            inode.flags &= !INODE_FLAG_EXTENT_TREE;
            return Ok(());
        }
        let needed = extents.len().div_ceil(LEAF_EXTENTS_MAX);
        if needed > INODE_EXTENTS_MAX {
            return Err(FsError::Errno(libc::EFBIG));
        }
        let mut leaves = old_leaves;
        while leaves.len() < needed {
            let goal = leaves.last().copied().unwrap_or(inode.blockno);
            let (b, _) = self.meta.alloc(goal, 1, true)?;
            inode.blocks += 1;
            leaves.push(b);
        }
        for extra in leaves.split_off(needed) {
            self.meta.free(extra, 1)?;
            inode.blocks -= 1;
        }
        let mut index = Vec::with_capacity(needed);
        for (chunk, &block) in extents.chunks(LEAF_EXTENTS_MAX).zip(&leaves) {
            let mut leaf: ExtentLeaf = bytemuck::Zeroable::zeroed();
            leaf.magic = ExtentLeaf::MAGIC;
            leaf.blockno = block;
            leaf.owner = inode.blockno;
            leaf.count = chunk.len() as u32;
            leaf.extents[..chunk.len()].copy_from_slice(chunk);
            let unchanged = matches!(self.get_leaf(block, inode.blockno), Ok(old) if old.extents == leaf.extents && old.count == leaf.count);
            if !unchanged {
                self.meta.put(block * BLOCK_SIZE_U64, BLOCK_SIZE, leaf);
            }
            index.push(Extent {
                file_block: chunk[0].file_block,
                disk_block: block,
                len: chunk.len() as u32,
                flags: 0,
            });
        }
        set_area_extents(&mut inode.area, &index);
        inode.extent_count = index.len() as u32;
        inode.flags |= INODE_FLAG_EXTENT_TREE;
        Ok(())
    }

    /// Reads up to `size` bytes at `offset` (short at end of file), under the core lock.
    pub fn read_file(&mut self, ino: Ino, offset: u64, size: usize) -> FsResult<Vec<u8>> {
        let plan = self.plan_read(ino, offset, size)?;
        self.meta.stats.data_reads += plan.runs.len() as u64;
        plan.execute(self.meta.lun.as_ref())
    }

    /// Maps a read of up to `size` bytes at `offset` to device blocks. The plan is
    /// carried out later, possibly without the core lock (see `ReadPlan`).
    pub fn plan_read(&mut self, ino: Ino, offset: u64, size: usize) -> FsResult<ReadPlan> {
        let inode = self.inode(ino)?;
        if !is_reg(&inode) && !is_symlink(&inode) {
            return Err(FsError::Errno(libc::EISDIR));
        }
        if offset >= inode.size || size == 0 {
            return Ok(ReadPlan::ready(Vec::new()));
        }
        let end = inode.size.min(offset + size as u64);
        if inode.flags & INODE_FLAG_INLINE != 0 {
            let bytes = inode
                .area
                .get(offset as usize..end as usize)
                .ok_or_else(|| {
                    FsError::corrupted("inode", ino, "inline data shorter than the size")
                })?;
            return Ok(ReadPlan::ready(bytes.to_vec()));
        }
        let extents = self.load_extents(&inode)?;
        let first = offset / BLOCK_SIZE_U64;
        let last = end.div_ceil(BLOCK_SIZE_U64);
        let mut runs = Vec::new();
        let mut block = first;
        while block < last {
            match find(&extents, block) {
                Ok(i) => {
                    let e = extents[i];
                    let run_end = (e.file_block + u64::from(e.len)).min(last);
                    if e.flags & EXTENT_UNWRITTEN == 0 {
                        runs.push(ReadRun {
                            at: ((block - first) * BLOCK_SIZE_U64) as usize,
                            disk: e.disk_block + (block - e.file_block),
                            blocks: (run_end - block) as usize,
                        });
                    }
                    block = run_end;
                }
                Err(next) => {
                    block = extents.get(next).map_or(last, |e| e.file_block.min(last));
                }
            }
        }
        Ok(ReadPlan {
            buf_len: ((last - first) * BLOCK_SIZE_U64) as usize,
            runs,
            skip: (offset - first * BLOCK_SIZE_U64) as usize,
            len: (end - offset) as usize,
            ready: None,
            multi_writer: inode.flags & INODE_FLAG_MULTI_WRITER != 0,
        })
    }

    /// Writes `data` at `offset`, allocating as needed.
    pub fn write_file(&mut self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<usize> {
        let mut inode = self.inode(ino)?;
        if !is_reg(&inode) {
            return Err(FsError::Errno(libc::EISDIR));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        if end > FILE_SIZE_MAX {
            return Err(FsError::Errno(libc::EFBIG));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let mut extents = self.load_extents(&inode)?;
        let changed = self.write_blocks(&mut inode, &mut extents, offset, data)?;
        if changed {
            self.store_extents(&mut inode, extents)?;
        }
        inode.size = inode.size.max(end);
        touch_mtime_ctime(&mut inode);
        // Writing by a non-owner clears set-user-ID, as ext4 does; the kernel asks for
        // it through setattr (killpriv) when it must, so only the owner case is left.
        self.put_inode(&inode)?;
        Ok(data.len())
    }

    /// Writes whole blocks covering `[offset, offset + data.len())`; returns whether
    /// the extent list changed.
    fn write_blocks(
        &mut self,
        inode: &mut InodeBody,
        extents: &mut Vec<Extent>,
        offset: u64,
        data: &[u8],
    ) -> FsResult<bool> {
        let end = offset + data.len() as u64;
        let mut changed = false;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE_U64;
            let (disk, run_blocks, fresh) = match find(extents, block) {
                Ok(i) => {
                    let e = extents[i];
                    let unwritten = e.flags & EXTENT_UNWRITTEN != 0;
                    let run_end = e.file_block + u64::from(e.len);
                    let disk = e.disk_block + (block - e.file_block);
                    let blocks = run_end.min(end.div_ceil(BLOCK_SIZE_U64)) - block;
                    if unwritten {
                        // The written part becomes a normal extent.
                        cut_range(extents, block, block + blocks);
                        extents.push(Extent {
                            file_block: block,
                            disk_block: disk,
                            len: blocks as u32,
                            flags: 0,
                        });
                        normalize(extents);
                        changed = true;
                    }
                    (disk, blocks, unwritten)
                }
                Err(next) => {
                    let hole_end = extents.get(next).map_or(u64::MAX, |e| e.file_block);
                    let want = (hole_end.min(end.div_ceil(BLOCK_SIZE_U64)) - block)
                        .min(ALLOC_CHUNK_BLOCKS);
                    let goal = self.data_goal(inode, extents, block);
                    let (disk, got) = self.meta.alloc(goal, want, false)?;
                    inode.blocks += got;
                    extents.push(Extent {
                        file_block: block,
                        disk_block: disk,
                        len: got as u32,
                        flags: 0,
                    });
                    normalize(extents);
                    changed = true;
                    (disk, got, true)
                }
            };
            let seg_end = end.min((block + run_blocks) * BLOCK_SIZE_U64);
            let src = &data[(pos - offset) as usize..(seg_end - offset) as usize];
            self.write_segment(disk, block, pos, seg_end, src, fresh)?;
            pos = seg_end;
        }
        Ok(changed)
    }

    /// Where to allocate file block `block`: right after the block before it if that
    /// is mapped, else near the inode.
    fn data_goal(&self, inode: &InodeBody, extents: &[Extent], block: u64) -> BlockNo {
        match find(extents, block.saturating_sub(1)) {
            Ok(i) if block > 0 => extents[i].disk_block + (block - extents[i].file_block),
            _ => inode.blockno + u64::from(self.meta.geo.resource_blocks),
        }
    }

    /// Writes `[pos, seg_end)` of the file, which maps to disk blocks from `disk` (for
    /// file block `block`). Partial blocks are read and patched, or zero-filled when
    /// `fresh` (newly allocated or never written).
    fn write_segment(
        &mut self,
        disk: BlockNo,
        block: u64,
        pos: u64,
        seg_end: u64,
        src: &[u8],
        fresh: bool,
    ) -> FsResult<()> {
        let first = pos / BLOCK_SIZE_U64;
        debug_assert_eq!(first, block);
        let last = seg_end.div_ceil(BLOCK_SIZE_U64);
        let nblocks = (last - first) as usize;
        let head = (pos % BLOCK_SIZE_U64) as usize;
        let tail = (seg_end % BLOCK_SIZE_U64) as usize;
        if head == 0 && tail == 0 {
            // Whole blocks: straight from the caller's buffer.
            return self.meta.write_data(src, disk);
        }
        if nblocks > 2 {
            // A partial first and/or last block around whole ones: patch the partial
            // blocks in a block buffer each, write the middle from the caller's buffer.
            let mut at = 0usize;
            let mut block_pos = first;
            if head != 0 {
                let n = BLOCK_SIZE - head;
                self.write_segment(disk, block_pos, pos, pos + n as u64, &src[..n], fresh)?;
                at = n;
                block_pos += 1;
            }
            let whole_end = if tail == 0 {
                src.len()
            } else {
                src.len() - tail
            };
            self.meta
                .write_data(&src[at..whole_end], disk + (block_pos - first))?;
            if tail != 0 {
                let last_pos = seg_end - tail as u64;
                let last_disk = disk + (last - 1 - first);
                self.write_segment(
                    last_disk,
                    last - 1,
                    last_pos,
                    seg_end,
                    &src[whole_end..],
                    fresh,
                )?;
            }
            return Ok(());
        }
        let mut buf = vec![0u8; nblocks * BLOCK_SIZE];
        if !fresh {
            if head != 0 {
                self.meta.read_data(&mut buf[..BLOCK_SIZE], disk)?;
            }
            if tail != 0 && (nblocks > 1 || head == 0) {
                let at = (nblocks - 1) * BLOCK_SIZE;
                self.meta
                    .read_data(&mut buf[at..], disk + nblocks as u64 - 1)?;
            }
        }
        buf[head..head + src.len()].copy_from_slice(src);
        self.meta.write_data(&buf, disk)
    }

    /// Frees file blocks from `keep_blocks` on, in rounds that each fit one
    /// transaction (committing between rounds).
    pub fn truncate_blocks(&mut self, inode: &mut InodeBody, keep_blocks: u64) -> FsResult<()> {
        loop {
            let mut extents = self.load_extents(inode)?;
            let tail: Vec<&Extent> = extents
                .iter()
                .filter(|e| e.file_block + u64::from(e.len) > keep_blocks)
                .collect();
            if tail.is_empty() {
                return Ok(());
            }
            let from = if tail.len() > TRUNCATE_EXTENTS_PER_TX {
                tail[tail.len() - TRUNCATE_EXTENTS_PER_TX]
                    .file_block
                    .max(keep_blocks)
            } else {
                keep_blocks
            };
            let freed = cut_range(&mut extents, from, u64::MAX);
            for (start, len) in freed {
                self.free_run(start, len)?;
                inode.blocks -= len;
            }
            self.store_extents(inode, extents)?;
            if from == keep_blocks {
                return Ok(());
            }
            inode.size = inode.size.min(from * BLOCK_SIZE_U64);
            self.put_inode(inode)?;
            self.meta.commit()?;
        }
    }

    /// Frees a disk run that may span allocation groups.
    fn free_run(&mut self, start: BlockNo, len: u64) -> FsResult<()> {
        let mut at = start;
        let end = start + len;
        while at < end {
            let Some(ag) = self.meta.geo.ag_of(at) else {
                return Err(FsError::corrupted(
                    "extent",
                    at,
                    "points outside the data area",
                ));
            };
            let piece_end = end.min(self.meta.geo.ag_end(ag));
            self.meta.free(at, piece_end - at)?;
            at = piece_end;
        }
        Ok(())
    }

    /// Sets a file's size: frees blocks past it, zeroes the tail of a partial last
    /// block so a later extension reads zeros.
    pub fn truncate(&mut self, inode: &mut InodeBody, size: u64) -> FsResult<()> {
        if size > FILE_SIZE_MAX {
            return Err(FsError::Errno(libc::EFBIG));
        }
        if size < inode.size {
            let keep = size.div_ceil(BLOCK_SIZE_U64);
            self.truncate_blocks(inode, keep)?;
            let partial = (size % BLOCK_SIZE_U64) as usize;
            if partial != 0 {
                let extents = self.load_extents(inode)?;
                if let Ok(i) = find(&extents, size / BLOCK_SIZE_U64) {
                    let e = extents[i];
                    if e.flags & EXTENT_UNWRITTEN == 0 {
                        let disk = e.disk_block + (size / BLOCK_SIZE_U64 - e.file_block);
                        let mut buf = vec![0u8; BLOCK_SIZE];
                        self.meta.read_data(&mut buf, disk)?;
                        buf[partial..].fill(0);
                        self.meta.write_data(&buf, disk)?;
                    }
                }
            }
        }
        if size != inode.size {
            inode.size = size;
            touch_mtime_ctime(inode);
        }
        Ok(())
    }

    /// fallocate(2): preallocation (unwritten extents), PUNCH_HOLE and ZERO_RANGE.
    pub fn fallocate(&mut self, ino: Ino, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let mut inode = self.inode(ino)?;
        if !is_reg(&inode) {
            return Err(FsError::Errno(libc::ENODEV));
        }
        let end = offset.checked_add(len).ok_or(FsError::Errno(libc::EFBIG))?;
        if len == 0 {
            return Err(FsError::Errno(libc::EINVAL));
        }
        if end > FILE_SIZE_MAX {
            return Err(FsError::Errno(libc::EFBIG));
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && !keep_size) || (punch && zero) {
            return Err(FsError::Errno(libc::EOPNOTSUPP));
        }
        let mut extents = self.load_extents(&inode)?;
        if punch || zero {
            self.zero_range(&mut inode, &mut extents, offset, end)?;
        }
        if !punch {
            self.preallocate(&mut inode, &mut extents, offset, end)?;
            if !keep_size && end > inode.size {
                inode.size = end;
            }
        }
        self.store_extents(&mut inode, extents)?;
        touch_ctime(&mut inode);
        if punch || zero {
            touch_mtime_ctime(&mut inode);
        }
        self.put_inode(&inode)?;
        Ok(())
    }

    /// Makes `[offset, end)` read as zeros: whole blocks are unmapped, partial edge
    /// blocks are zeroed on disk.
    fn zero_range(
        &mut self,
        inode: &mut InodeBody,
        extents: &mut Vec<Extent>,
        offset: u64,
        end: u64,
    ) -> FsResult<()> {
        if offset >= end {
            return Ok(());
        }
        let first_whole = offset.div_ceil(BLOCK_SIZE_U64);
        let last_whole = end / BLOCK_SIZE_U64;
        for (edge_start, edge_end) in [
            (offset, end.min(first_whole * BLOCK_SIZE_U64)),
            ((last_whole * BLOCK_SIZE_U64).max(offset), end),
        ] {
            if edge_start >= edge_end
                || edge_start % BLOCK_SIZE_U64 == 0 && edge_end - edge_start == BLOCK_SIZE_U64
            {
                continue;
            }
            let block = edge_start / BLOCK_SIZE_U64;
            if let Ok(i) = find(extents, block) {
                let e = extents[i];
                if e.flags & EXTENT_UNWRITTEN == 0 {
                    let disk = e.disk_block + (block - e.file_block);
                    let mut buf = vec![0u8; BLOCK_SIZE];
                    self.meta.read_data(&mut buf, disk)?;
                    let from = (edge_start % BLOCK_SIZE_U64) as usize;
                    let to = from + (edge_end - edge_start) as usize;
                    buf[from..to].fill(0);
                    self.meta.write_data(&buf, disk)?;
                }
            }
        }
        if first_whole < last_whole {
            for (start, len) in cut_range(extents, first_whole, last_whole) {
                self.free_run(start, len)?;
                inode.blocks -= len;
            }
        }
        Ok(())
    }

    /// Allocates unwritten extents over the holes of `[offset, end)`.
    fn preallocate(
        &mut self,
        inode: &mut InodeBody,
        extents: &mut Vec<Extent>,
        offset: u64,
        end: u64,
    ) -> FsResult<()> {
        let mut block = offset / BLOCK_SIZE_U64;
        let last = end.div_ceil(BLOCK_SIZE_U64);
        while block < last {
            match find(extents, block) {
                Ok(i) => block = extents[i].file_block + u64::from(extents[i].len),
                Err(next) => {
                    let hole_end = extents.get(next).map_or(last, |e| e.file_block.min(last));
                    let want = (hole_end - block).min(ALLOC_CHUNK_BLOCKS);
                    let goal = self.data_goal(inode, extents, block);
                    let (disk, got) = self.meta.alloc(goal, want, false)?;
                    inode.blocks += got;
                    extents.push(Extent {
                        file_block: block,
                        disk_block: disk,
                        len: got as u32,
                        flags: EXTENT_UNWRITTEN,
                    });
                    normalize(extents);
                    block += got;
                    if self.meta.tx_len() > super::meta::TX_SOFT_LIMIT {
                        // A huge preallocation commits as it goes; each step is consistent.
                        self.store_extents(inode, extents.clone())?;
                        self.put_inode(inode)?;
                        self.meta.commit()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A symlink's target.
    pub fn readlink(&mut self, ino: Ino) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        if !is_symlink(&inode) {
            return Err(FsError::Errno(libc::EINVAL));
        }
        if inode.flags & INODE_FLAG_INLINE != 0 {
            return Ok(inode.area[..inode.size as usize].to_vec());
        }
        self.read_file(ino, 0, inode.size as usize)
    }

    /// Stores a new symlink's target: inline when it fits the area, else as data.
    pub fn set_symlink_target(&mut self, inode: &mut InodeBody, target: &[u8]) -> FsResult<()> {
        if target.len() <= INODE_AREA_SIZE {
            inode.area.fill(0);
            inode.area[..target.len()].copy_from_slice(target);
            inode.flags |= INODE_FLAG_INLINE;
            inode.extent_count = 0;
            inode.size = target.len() as u64;
            return Ok(());
        }
        let mut extents = Vec::new();
        self.write_blocks(inode, &mut extents, 0, target)?;
        self.store_extents(inode, extents)?;
        inode.size = target.len() as u64;
        Ok(())
    }
}
