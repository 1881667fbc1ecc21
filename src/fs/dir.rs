//! Directories: extendible hashing over bucket blocks.
//!
//! A directory has a table of `2^dir_depth` bucket pointers: inline in the inode area
//! while it fits, else in table blocks listed in the area. An entry's 63-bit name hash
//! picks the bucket by its top `dir_depth` bits. A full bucket splits; when its local
//! depth equals the table's depth the table doubles first. Readdir walks buckets in
//! table order and entries in hash order, so the hash is a stable readdir cookie.

use super::inode::is_dir;
use super::{Core, DirSink, FsError, FsResult, Ino};
use crate::format::{
    BlockNo, DirBucket, DirBucketHeader, DirTableBlock, InodeBody, OnDisk, BLOCK_SIZE,
    BLOCK_SIZE_U64, DIR_BUCKET_AREA, DIR_ENTRY_FIXED, DIR_TABLE_PTRS, INODE_DIR_PTRS_MAX,
};

pub use crate::format::DIR_DEPTH_MAX;
/// Readdir offsets 1 and 2 are "." and ".."; entry hashes start at 3.
const FIRST_HASH: u64 = 3;

/// A directory entry as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hash: u64,
    pub ino: Ino,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// The stored hash of a name.
pub fn name_hash(seed: u64, name: &[u8]) -> u64 {
    (xxhash_rust::xxh3::xxh3_64_with_seed(name, seed) >> 1).max(FIRST_HASH)
}

pub(crate) fn index_of(hash: u64, depth: u32) -> u64 {
    if depth == 0 {
        0
    } else {
        hash >> (63 - depth)
    }
}

/// An entry of a bucket, borrowed from the bucket's bytes.
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    pub hash: u64,
    pub ino: Ino,
    pub kind: u8,
    pub name: &'a [u8],
}

impl EntryRef<'_> {
    fn to_entry(self) -> Entry {
        Entry {
            hash: self.hash,
            ino: self.ino,
            kind: self.kind,
            name: self.name.to_vec(),
        }
    }
}

/// Entries of a (validated) bucket, without copying them out.
pub fn bucket_entries(bucket: &DirBucket) -> impl Iterator<Item = EntryRef<'_>> {
    let area = &bucket.area[..(bucket.header.used as usize).min(bucket.area.len())];
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let fixed = area.get(pos..pos + DIR_ENTRY_FIXED)?;
        let name_len = usize::from(fixed[17]);
        let name = area.get(pos + DIR_ENTRY_FIXED..pos + DIR_ENTRY_FIXED + name_len)?;
        let mut hash = [0u8; 8];
        hash.copy_from_slice(&fixed[0..8]);
        let mut ino = [0u8; 8];
        ino.copy_from_slice(&fixed[8..16]);
        pos += DIR_ENTRY_FIXED + name_len;
        Some(EntryRef {
            hash: u64::from_le_bytes(hash),
            ino: u64::from_le_bytes(ino),
            kind: fixed[16],
            name,
        })
    })
}

/// Entries of a (validated) bucket.
pub fn parse_entries(bucket: &DirBucket) -> Vec<Entry> {
    bucket_entries(bucket).map(EntryRef::to_entry).collect()
}

/// Appends one entry at the end of a bucket's used area; false when it does not fit.
fn append_entry(bucket: &mut DirBucket, e: &Entry) -> bool {
    let pos = bucket.header.used as usize;
    let end = pos + entry_size(&e.name);
    if end > DIR_BUCKET_AREA || end > bucket.area.len() {
        return false;
    }
    let slot = &mut bucket.area[pos..end];
    slot[0..8].copy_from_slice(&e.hash.to_le_bytes());
    slot[8..16].copy_from_slice(&e.ino.to_le_bytes());
    slot[16] = e.kind;
    slot[17] = e.name.len() as u8;
    slot[DIR_ENTRY_FIXED..].copy_from_slice(&e.name);
    bucket.header.count += 1;
    bucket.header.used = end as u32;
    true
}

fn entry_size(name: &[u8]) -> usize {
    DIR_ENTRY_FIXED + name.len()
}

/// Serialises entries into a bucket; false when they do not fit.
fn store_entries(bucket: &mut DirBucket, entries: &[Entry]) -> bool {
    let total: usize = entries.iter().map(|e| entry_size(&e.name)).sum();
    if total > DIR_BUCKET_AREA {
        return false;
    }
    bucket.area.fill(0);
    let mut pos = 0;
    for e in entries {
        bucket.area[pos..pos + 8].copy_from_slice(&e.hash.to_le_bytes());
        bucket.area[pos + 8..pos + 16].copy_from_slice(&e.ino.to_le_bytes());
        bucket.area[pos + 16] = e.kind;
        bucket.area[pos + 17] = e.name.len() as u8;
        bucket.area[pos + DIR_ENTRY_FIXED..pos + DIR_ENTRY_FIXED + e.name.len()]
            .copy_from_slice(&e.name);
        pos += entry_size(&e.name);
    }
    bucket.header.count = entries.len() as u32;
    bucket.header.used = pos as u32;
    true
}

fn area_u64(area: &[u8], i: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&area[i * 8..i * 8 + 8]);
    u64::from_le_bytes(bytes)
}

fn set_area_u64(area: &mut [u8], i: usize, value: u64) {
    area[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
}

impl Core {
    fn hash_name(&self, name: &[u8]) -> u64 {
        name_hash(self.sb.dir_hash_seed, name)
    }

    pub fn get_bucket(&mut self, block: BlockNo, owner: Ino) -> FsResult<DirBucket> {
        let bucket: DirBucket = self.meta.get(block * BLOCK_SIZE_U64, BLOCK_SIZE, block)?;
        if bucket.header.owner != owner {
            return Err(FsError::corrupted(
                "directory bucket",
                block,
                format!("owned by inode {}", bucket.header.owner),
            ));
        }
        Ok(bucket)
    }

    fn put_bucket(&mut self, bucket: DirBucket) {
        let block = bucket.header.blockno;
        self.meta.put(block * BLOCK_SIZE_U64, BLOCK_SIZE, bucket);
    }

    fn get_table_block(&mut self, block: BlockNo, owner: Ino) -> FsResult<DirTableBlock> {
        let table: DirTableBlock = self.meta.get(block * BLOCK_SIZE_U64, BLOCK_SIZE, block)?;
        if table.owner != owner {
            return Err(FsError::corrupted(
                "directory table block",
                block,
                "owned by another inode",
            ));
        }
        Ok(table)
    }

    /// Bucket pointer `i` of a directory's table.
    pub fn table_get(&mut self, dir: &InodeBody, i: u64) -> FsResult<BlockNo> {
        if dir.dir_table_blocks == 0 {
            return Ok(area_u64(&dir.area, i as usize));
        }
        let which = (i / DIR_TABLE_PTRS as u64) as usize;
        if which >= dir.dir_table_blocks as usize {
            return Err(FsError::corrupted(
                "directory",
                dir.blockno,
                "table index out of range",
            ));
        }
        let table = self.get_table_block(area_u64(&dir.area, which), dir.blockno)?;
        Ok(table.ptrs[(i % DIR_TABLE_PTRS as u64) as usize])
    }

    /// The whole table, in order.
    fn table_all(&mut self, dir: &InodeBody) -> FsResult<Vec<BlockNo>> {
        let len = 1usize << dir.dir_depth;
        if dir.dir_table_blocks == 0 {
            return Ok((0..len).map(|i| area_u64(&dir.area, i)).collect());
        }
        let mut out = Vec::with_capacity(len);
        for which in 0..dir.dir_table_blocks as usize {
            let table = self.get_table_block(area_u64(&dir.area, which), dir.blockno)?;
            let take = (len - out.len()).min(DIR_TABLE_PTRS);
            out.extend_from_slice(&table.ptrs[..take]);
        }
        Ok(out)
    }

    /// Writes a whole table (new depth in `dir.dir_depth`), inline when it fits,
    /// else into table blocks: reusing the directory's, allocating or freeing as needed.
    fn table_store(&mut self, dir: &mut InodeBody, ptrs: &[BlockNo]) -> FsResult<()> {
        let old_blocks: Vec<BlockNo> = (0..dir.dir_table_blocks as usize)
            .map(|i| area_u64(&dir.area, i))
            .collect();
        let inline_max = INODE_DIR_PTRS_MAX.min(256);
        if ptrs.len() <= inline_max {
            dir.area.fill(0);
            for (i, &p) in ptrs.iter().enumerate() {
                set_area_u64(&mut dir.area, i, p);
            }
            dir.dir_table_blocks = 0;
            for b in old_blocks {
                self.meta.free(b, 1)?;
                dir.blocks -= 1;
            }
            return Ok(());
        }
        let needed = ptrs.len().div_ceil(DIR_TABLE_PTRS);
        if needed > INODE_DIR_PTRS_MAX {
            return Err(FsError::NoSpace);
        }
        let mut blocks = old_blocks.clone();
        while blocks.len() < needed {
            let goal = blocks.last().copied().unwrap_or(dir.blockno);
            let (b, _) = self.meta.alloc(goal, 1, true)?;
            dir.blocks += 1;
            blocks.push(b);
        }
        for (which, chunk) in ptrs.chunks(DIR_TABLE_PTRS).enumerate() {
            let mut table: DirTableBlock = bytemuck::Zeroable::zeroed();
            table.magic = DirTableBlock::MAGIC;
            table.blockno = blocks[which];
            table.owner = dir.blockno;
            table.index = which as u32;
            table.ptrs[..chunk.len()].copy_from_slice(chunk);
            self.meta
                .put(blocks[which] * BLOCK_SIZE_U64, BLOCK_SIZE, table);
        }
        dir.area.fill(0);
        for (i, &b) in blocks.iter().enumerate() {
            set_area_u64(&mut dir.area, i, b);
        }
        dir.dir_table_blocks = needed as u32;
        Ok(())
    }

    /// Sets table pointers `[from, to)` to `bucket`.
    fn table_set_range(
        &mut self,
        dir: &mut InodeBody,
        from: u64,
        to: u64,
        bucket: BlockNo,
    ) -> FsResult<()> {
        if dir.dir_table_blocks == 0 {
            for i in from..to {
                set_area_u64(&mut dir.area, i as usize, bucket);
            }
            return Ok(());
        }
        let per = DIR_TABLE_PTRS as u64;
        let mut i = from;
        while i < to {
            let which = (i / per) as usize;
            let block = area_u64(&dir.area, which);
            let mut table = self.get_table_block(block, dir.blockno)?;
            let end = to.min((which as u64 + 1) * per);
            for j in i..end {
                table.ptrs[(j % per) as usize] = bucket;
            }
            self.meta.put(block * BLOCK_SIZE_U64, BLOCK_SIZE, table);
            i = end;
        }
        Ok(())
    }

    /// Makes a new empty directory's first bucket.
    pub fn dir_init(&mut self, dir: &mut InodeBody, parent: Ino) -> FsResult<()> {
        let (bucket_block, _) = self.meta.alloc(dir.blockno + 1, 1, true)?;
        dir.blocks += 1;
        let bucket = new_bucket(bucket_block, dir.blockno, 0, 0);
        self.put_bucket(bucket);
        dir.area.fill(0);
        set_area_u64(&mut dir.area, 0, bucket_block);
        dir.dir_depth = 0;
        dir.dir_table_blocks = 0;
        dir.dir_buckets = 1;
        dir.dir_entries = 0;
        dir.parent = parent;
        dir.size = BLOCK_SIZE_U64;
        Ok(())
    }

    /// Finds `name` in a directory: (ino, dtype).
    pub fn dir_lookup(&mut self, dir: &InodeBody, name: &[u8]) -> FsResult<Option<(Ino, u8)>> {
        let hash = self.hash_name(name);
        let block = self.table_get(dir, index_of(hash, dir.dir_depth))?;
        let bucket = self.get_bucket(block, dir.blockno)?;
        let found = bucket_entries(&bucket)
            .find(|e| e.hash == hash && e.name == name)
            .map(|e| (e.ino, e.kind));
        Ok(found)
    }

    /// Adds an entry (the caller checked that the name is absent) and updates `dir`
    /// in memory; the caller puts `dir`.
    pub fn dir_add(
        &mut self,
        dir: &mut InodeBody,
        name: &[u8],
        ino: Ino,
        kind: u8,
    ) -> FsResult<()> {
        let hash = self.hash_name(name);
        let entry = Entry {
            hash,
            ino,
            kind,
            name: name.to_vec(),
        };
        // Each round either inserts or splits a bucket; depth bounds the splits.
        for _ in 0..=64 {
            let index = index_of(hash, dir.dir_depth);
            let block = self.table_get(dir, index)?;
            let mut bucket = self.get_bucket(block, dir.blockno)?;
            if append_entry(&mut bucket, &entry) {
                self.put_bucket(bucket);
                dir.dir_entries += 1;
                return Ok(());
            }
            self.split(dir, bucket)?;
        }
        Err(FsError::corrupted(
            "directory",
            dir.blockno,
            "bucket split did not converge",
        ))
    }

    /// Splits a full bucket in two, doubling the table first if needed.
    fn split(&mut self, dir: &mut InodeBody, mut bucket: DirBucket) -> FsResult<()> {
        let local = bucket.header.local_depth;
        if local == dir.dir_depth {
            if dir.dir_depth >= DIR_DEPTH_MAX {
                return Err(FsError::NoSpace);
            }
            let old = self.table_all(dir)?;
            let doubled: Vec<BlockNo> = (0..old.len() * 2).map(|i| old[i / 2]).collect();
            dir.dir_depth += 1;
            self.table_store(dir, &doubled)?;
        }
        let depth = dir.dir_depth;
        let new_local = local + 1;
        let prefix = bucket.header.prefix;
        let (new_block, _) = self.meta.alloc(bucket.header.blockno, 1, true)?;
        dir.blocks += 1;
        dir.dir_buckets += 1;
        dir.size += BLOCK_SIZE_U64;
        let entries = parse_entries(&bucket);
        let high_prefix = prefix * 2 + 1;
        let (high, low): (Vec<Entry>, Vec<Entry>) = entries
            .into_iter()
            .partition(|e| index_of(e.hash, new_local) == high_prefix);
        bucket.header.local_depth = new_local;
        bucket.header.prefix = prefix * 2;
        let mut sibling = new_bucket(new_block, dir.blockno, new_local, high_prefix);
        if !store_entries(&mut bucket, &low) || !store_entries(&mut sibling, &high) {
            return Err(FsError::corrupted(
                "directory bucket",
                new_block,
                "entries do not fit after a split",
            ));
        }
        self.put_bucket(bucket);
        self.put_bucket(sibling);
        let shift = depth - new_local;
        self.table_set_range(
            dir,
            high_prefix << shift,
            (high_prefix + 1) << shift,
            new_block,
        )
    }

    /// Removes `name`; returns its (ino, dtype).
    pub fn dir_remove(&mut self, dir: &mut InodeBody, name: &[u8]) -> FsResult<Option<(Ino, u8)>> {
        let hash = self.hash_name(name);
        let block = self.table_get(dir, index_of(hash, dir.dir_depth))?;
        let mut bucket = self.get_bucket(block, dir.blockno)?;
        // Where the entry starts in the area, and its size.
        let mut at = 0usize;
        let mut found = None;
        for e in bucket_entries(&bucket) {
            let size = entry_size(e.name);
            if e.hash == hash && e.name == name {
                found = Some((at, size, e.ino, e.kind));
                break;
            }
            at += size;
        }
        let Some((at, size, ino, kind)) = found else {
            return Ok(None);
        };
        // Close the gap in place; the freed tail is zeroed as store_entries leaves it.
        let used = bucket.header.used as usize;
        bucket.area.copy_within(at + size..used, at);
        bucket.area[used - size..used].fill(0);
        bucket.header.used = (used - size) as u32;
        bucket.header.count = bucket.header.count.saturating_sub(1);
        self.put_bucket(bucket);
        dir.dir_entries = dir.dir_entries.saturating_sub(1);
        Ok(Some((ino, kind)))
    }

    /// Points an existing entry at another inode (rename over an existing name).
    pub fn dir_replace(
        &mut self,
        dir: &InodeBody,
        name: &[u8],
        ino: Ino,
        kind: u8,
    ) -> FsResult<()> {
        let hash = self.hash_name(name);
        let block = self.table_get(dir, index_of(hash, dir.dir_depth))?;
        let mut bucket = self.get_bucket(block, dir.blockno)?;
        let mut entries = parse_entries(&bucket);
        let Some(entry) = entries
            .iter_mut()
            .find(|e| e.hash == hash && e.name == name)
        else {
            return Err(FsError::Errno(libc::ENOENT));
        };
        entry.ino = ino;
        entry.kind = kind;
        store_entries(&mut bucket, &entries);
        self.put_bucket(bucket);
        Ok(())
    }

    /// Lists entries with hash > `after`, in hash order.
    pub fn dir_list(
        &mut self,
        dir: &InodeBody,
        after: u64,
        emit: &mut dyn FnMut(&Entry) -> bool,
    ) -> FsResult<()> {
        let depth = dir.dir_depth;
        let len = 1u64 << depth;
        let start = if after < FIRST_HASH {
            0
        } else {
            index_of(after, depth)
        };
        let mut i = start;
        while i < len {
            let block = self.table_get(dir, i)?;
            let bucket = self.get_bucket(block, dir.blockno)?;
            let span = 1u64 << (depth - bucket.header.local_depth.min(depth));
            let mut entries = parse_entries(&bucket);
            entries.sort_by_key(|e| e.hash);
            for e in entries.iter().filter(|e| e.hash > after) {
                if emit(e) {
                    return Ok(());
                }
            }
            // Skip the other table slots that point at this bucket.
            i = (i / span + 1) * span;
        }
        Ok(())
    }

    pub fn dir_is_empty(&mut self, dir: &InodeBody) -> FsResult<bool> {
        Ok(dir.dir_entries == 0)
    }

    /// Frees every bucket and table block of a directory (at rmdir).
    pub fn dir_free_all(&mut self, dir: &mut InodeBody) -> FsResult<()> {
        debug_assert!(is_dir(dir));
        let mut buckets = self.table_all(dir)?;
        buckets.sort_unstable();
        buckets.dedup();
        for b in buckets {
            self.meta.free(b, 1)?;
        }
        for i in 0..dir.dir_table_blocks as usize {
            self.meta.free(area_u64(&dir.area, i), 1)?;
        }
        dir.dir_table_blocks = 0;
        dir.dir_buckets = 0;
        dir.area.fill(0);
        Ok(())
    }

    /// Lists a directory for readdir: "." and ".." first (offsets 1 and 2), then
    /// entries with their hash as offset.
    pub fn readdir(&mut self, ino: Ino, offset: u64, emit: &mut DirSink<'_>) -> FsResult<()> {
        let dir = self.inode(ino)?;
        if !is_dir(&dir) {
            return Err(FsError::Errno(libc::ENOTDIR));
        }
        if offset < 1 && emit(ino, 1, libc::DT_DIR, b".") {
            return Ok(());
        }
        if offset < 2 && emit(dir.parent, 2, libc::DT_DIR, b"..") {
            return Ok(());
        }
        self.dir_list(&dir, offset, &mut |e| emit(e.ino, e.hash, e.kind, &e.name))
    }
}

fn new_bucket(block: BlockNo, owner: Ino, local_depth: u32, prefix: u64) -> DirBucket {
    let mut bucket: DirBucket = bytemuck::Zeroable::zeroed();
    bucket.header = DirBucketHeader {
        magic: DirBucket::MAGIC,
        crc: 0,
        blockno: block,
        owner,
        local_depth,
        count: 0,
        used: 0,
        pad: 0,
        prefix,
    };
    bucket
}
