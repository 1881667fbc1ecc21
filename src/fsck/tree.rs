//! The namespace walk: from the root inode, depth first with an explicit stack (no
//! recursion, so a deep tree cannot overflow the stack).
//!
//! Every inode reached is checked once, however many entries name it; every block it
//! owns is claimed in the `BlockMap`, which reports blocks used twice or outside the
//! data area. Link counts are compared once the walk is over: a directory's is 2 plus
//! its subdirectories, anything else's the number of entries naming it.

use super::check_lock;
use super::groups::{BlockMap, Claim};
use super::report::{
    DropReason, EntryFix, EntryRef, FsckReport, Problem, ProblemKind, PROBLEMS_PER_OBJECT_MAX,
};
use super::volume::Volume;
use crate::format::{
    BlockNo, DirBucket, DirTableBlock, Extent, ExtentLeaf, InodeBody, OnDisk, OrphanTable,
    XattrBlock, BLOCK_SIZE_U64, DIR_TABLE_PTRS, EXTENT_UNWRITTEN, INODE_AREA_SIZE,
    INODE_DIR_PTRS_MAX, INODE_FLAG_EXTENT_TREE, INODE_FLAG_INLINE, INODE_FLAG_MULTI_WRITER,
    RESOURCE_BODY_SIZE,
};
use crate::fs::dir::{index_of, name_hash, parse_entries, DIR_DEPTH_MAX};
use crate::fs::file::{area_extents, FILE_SIZE_MAX};
use crate::fs::inode::dtype_of;
use crate::fs::{Ino, INODE_FLAG_FREED};
use anyhow::Result;
use indicatif::ProgressBar;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

/// File blocks a file can map (`FILE_SIZE_MAX` in blocks).
const FILE_BLOCKS_MAX: u64 = FILE_SIZE_MAX / BLOCK_SIZE_U64;
/// Longest symlink target (PATH_MAX less the terminating zero).
const SYMLINK_MAX: u64 = 4095;
/// Every inode flag of format v1.
const INODE_FLAGS_KNOWN: u32 =
    INODE_FLAG_INLINE | INODE_FLAG_EXTENT_TREE | INODE_FLAG_MULTI_WRITER | INODE_FLAG_FREED;
/// Xattr namespaces the fs accepts.
const XATTR_NAMESPACES: [&[u8]; 4] = [b"user.", b"trusted.", b"security.", b"system."];

/// An entry to follow (or the root).
struct Visit {
    ino: Ino,
    /// The directory that holds the entry (the root itself for the root).
    parent: Ino,
    path: String,
    /// The entry's DT_* kind; `None` for the root.
    kind: Option<u8>,
    /// Where the entry is: its bucket, its position there and its name (for repair;
    /// unused for the root).
    bucket: BlockNo,
    index: usize,
    name: Vec<u8>,
    /// Listed by this slot's orphan table rather than named by an entry.
    orphan_of: Option<u32>,
}

impl Visit {
    /// True for the root (named by the superblock).
    fn is_root(&self) -> bool {
        self.kind.is_none() && self.orphan_of.is_none()
    }

    /// The entry this visit follows; `None` for the root and orphans.
    fn entry(&self) -> Option<EntryRef> {
        self.kind?;
        Some(EntryRef {
            dir: self.parent,
            bucket: self.bucket,
            index: self.index,
            name: self.name.clone(),
            ino: self.ino,
            path: self.path.clone(),
        })
    }
}

/// A non-directory inode already reached.
struct FileLinks {
    nlink: u32,
    found: u32,
    dtype: u8,
    path: String,
}

/// A directory already reached.
struct DirLinks {
    nlink: u32,
    subdirs: u32,
    path: String,
}

/// One distinct bucket of a directory's table.
struct BucketUse {
    local: u32,
    prefix: u64,
    /// Table indices pointing at it.
    pointers: u64,
    /// Some index pointing at it is outside its prefix's range.
    misplaced: bool,
}

/// What an inode owns besides its resource, for its block count.
#[derive(Default)]
struct Owned {
    data: u64,
    leaves: u64,
    dir_blocks: u64,
    xattr: u64,
    /// Some of it could not be read (already a problem): the count is not checked.
    incomplete: bool,
    /// The file block after the last one its extents map.
    mapped_end: u64,
}

pub(crate) fn walk(
    vol: &mut Volume,
    map: &mut BlockMap,
    report: &mut FsckReport,
    progress: &ProgressBar,
) -> Result<()> {
    let root = vol.sb.root_ino;
    let mut walk = Walk {
        vol,
        map,
        report,
        progress,
        files: HashMap::new(),
        dirs: HashMap::new(),
        stack: Vec::new(),
        orphan_bits: HashMap::new(),
        listed: HashMap::new(),
    };
    walk.stack.push(Visit {
        ino: root,
        parent: root,
        path: "/".into(),
        kind: None,
        bucket: 0,
        index: 0,
        name: Vec::new(),
        orphan_of: None,
    });
    while let Some(visit) = walk.stack.pop() {
        walk.visit(visit)?;
    }
    walk.orphan_tables()?;
    walk.check_link_counts();
    let paths: Vec<(Ino, String)> = walk
        .files
        .iter()
        .map(|(&ino, f)| (ino, f.path.clone()))
        .chain(walk.dirs.iter().map(|(&ino, d)| (ino, d.path.clone())))
        .collect();
    walk.report.paths.extend(paths);
    Ok(())
}

struct Walk<'w, 'a> {
    vol: &'w mut Volume<'a>,
    map: &'w mut BlockMap,
    report: &'w mut FsckReport,
    progress: &'w ProgressBar,
    files: HashMap<Ino, FileLinks>,
    dirs: HashMap<Ino, DirLinks>,
    stack: Vec<Visit>,
    /// Inodes reached whose `orphan_slots` is not zero: the bits, and the path.
    orphan_bits: HashMap<Ino, (u64, String)>,
    /// Inodes the orphan tables list: a bit per table.
    listed: HashMap<Ino, u64>,
}

fn child_path(dir: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn kind_name(dtype: u8) -> &'static str {
    match dtype {
        libc::DT_REG => "file",
        libc::DT_DIR => "directory",
        libc::DT_LNK => "symlink",
        libc::DT_FIFO => "fifo",
        libc::DT_SOCK => "socket",
        libc::DT_CHR => "character device",
        libc::DT_BLK => "block device",
        _ => "unknown kind",
    }
}

impl Walk<'_, '_> {
    fn problem(&mut self, kind: ProblemKind, block: BlockNo, path: &str, msg: impl Into<String>) {
        self.report.problem(kind, Some(block), Some(path), msg);
    }

    /// Notes an entry for repair to remove (the root has none).
    fn drop_entry(&mut self, v: &Visit, why: DropReason) {
        if let Some(entry) = v.entry() {
            self.report.fixes.drop_entries.push((entry, why));
        }
    }

    /// Notes that the walk could not follow something on disk: blocks it did not
    /// reach may still be in use.
    fn hidden(&mut self, path: &str, what: &str) {
        self.report.fixes.hidden.push(format!("{path}: {what}"));
    }

    /// Claims blocks for a reachable structure; a bad claim is a problem of `kind`
    /// (or of `DoublyUsedBlock` when the blocks are only used twice). Returns false
    /// when some block lies outside the data area (and must not be read).
    fn claim(
        &mut self,
        kind: ProblemKind,
        what: &str,
        start: BlockNo,
        len: u64,
        path: &str,
    ) -> bool {
        let claim: Claim = self.map.claim(start, len);
        if claim.is_ok() {
            return true;
        }
        let kind = if claim.outside == 0 && claim.group_meta == 0 {
            ProblemKind::DoublyUsedBlock
        } else {
            kind
        };
        let at = claim.first_bad.unwrap_or(start);
        let mut msg = claim.describe(what);
        // An inode's first block is its number: name the other user when it is one.
        let other = self.files.get(&at).map(|f| &f.path);
        if let Some(other) = other.or_else(|| self.dirs.get(&at).map(|d| &d.path)) {
            msg += &format!(" (the inode of {other})");
        }
        self.problem(kind, at, path, msg);
        claim.outside == 0
    }

    fn visit(&mut self, v: Visit) -> Result<()> {
        if let Some(seen) = self.dirs.get(&v.ino) {
            let msg = if v.ino == self.vol.sb.root_ino {
                "an entry names the root directory".to_string()
            } else {
                format!("directory {} is also reachable here", seen.path)
            };
            self.problem(ProblemKind::DirLinkedTwice, v.ino, &v.path, msg);
            self.drop_entry(&v, DropReason::DirLinkedTwice);
            return Ok(());
        }
        if let Some(seen) = self.files.get_mut(&v.ino) {
            seen.found += 1;
            let dtype = seen.dtype;
            self.check_entry_kind(&v, dtype);
            return Ok(());
        }
        let Some(inode) = self.load_inode(&v)? else {
            return Ok(());
        };
        self.progress.inc(1);
        let dtype = dtype_of(inode.mode);
        self.check_entry_kind(&v, dtype);
        let owned = if dtype == libc::DT_DIR {
            self.enter_dir(&v, &inode)?
        } else {
            self.files.insert(
                v.ino,
                FileLinks {
                    nlink: inode.nlink,
                    found: u32::from(v.orphan_of.is_none()),
                    dtype,
                    path: v.path.clone(),
                },
            );
            self.check_non_dir(&v, &inode, dtype)?
        };
        let xattr = self.check_xattr(&v, &inode)?;
        self.check_block_count(&v, &inode, Owned { xattr, ..owned });
        Ok(())
    }

    /// A problem with what an entry names; for the root (named by the superblock),
    /// a problem with the root inode.
    fn entry_problem(&mut self, v: &Visit, msg: String) {
        if let Some(slot) = v.orphan_of {
            let msg = format!("the orphan table of slot {slot} {msg}");
            self.problem(ProblemKind::OrphanTable, v.ino, &v.path, msg);
        } else if v.kind.is_none() {
            let msg = format!("the superblock's root directory {msg}; nothing is reachable");
            self.problem(ProblemKind::Inode, v.ino, &v.path, msg);
            self.hidden(&v.path, "the root inode cannot be read");
        } else {
            self.problem(ProblemKind::DirEntry, v.ino, &v.path, msg);
            self.drop_entry(v, DropReason::NotAnInode);
        }
    }

    fn check_entry_kind(&mut self, v: &Visit, dtype: u8) {
        if v.orphan_of.is_some() {
            return;
        }
        match v.kind {
            Some(kind) if kind != dtype => {
                let msg = format!(
                    "the entry says {} but inode {} is a {}",
                    kind_name(kind),
                    v.ino,
                    kind_name(dtype)
                );
                self.problem(ProblemKind::DirEntry, v.ino, &v.path, msg);
                if let Some(entry) = v.entry() {
                    self.report
                        .fixes
                        .entry_fixes
                        .push((entry, EntryFix::Kind(dtype)));
                }
            }
            None if dtype != libc::DT_DIR => {
                let msg = format!("the root inode is a {}", kind_name(dtype));
                self.problem(ProblemKind::Inode, v.ino, &v.path, msg);
                self.hidden(&v.path, "the root inode is not a directory");
            }
            _ => {}
        }
    }

    /// Reads and decodes the inode an entry names; problems for anything that is not
    /// a live inode.
    fn load_inode(&mut self, v: &Visit) -> Result<Option<InodeBody>> {
        let geo = self.vol.geo;
        let span = u64::from(geo.resource_blocks);
        let placed = geo.ag_of(v.ino).is_some_and(|ag| {
            v.ino >= geo.ag_first(ag) + geo.ag_meta_blocks()
                && v.ino.saturating_add(span) <= geo.ag_end(ag)
        });
        if !placed {
            let msg = format!("names block {}, where no inode can be", v.ino);
            self.entry_problem(v, msg);
            return Ok(None);
        }
        let raw = self.vol.blocks(v.ino, span)?;
        let sector = geo.ats_sector_size as usize;
        let body = raw.get(sector..sector + RESOURCE_BODY_SIZE).unwrap_or(&[]);
        let inode = match InodeBody::decode(body, v.ino) {
            Ok(inode) => inode,
            Err(e) if !InodeBody::has_magic(body) => {
                let msg = format!("names block {}, which holds no inode ({e})", v.ino);
                self.entry_problem(v, msg);
                return Ok(None);
            }
            Err(e) => {
                self.problem(ProblemKind::Inode, v.ino, &v.path, e.to_string());
                if v.is_root() {
                    self.hidden(&v.path, "the root inode does not decode");
                }
                self.drop_entry(v, DropReason::DamagedInode);
                return Ok(None);
            }
        };
        if inode.flags & INODE_FLAG_FREED != 0 {
            let msg = format!("names inode {}, which was freed", v.ino);
            let kind = match v.orphan_of {
                Some(_) => ProblemKind::OrphanTable,
                None => ProblemKind::FreedInode,
            };
            self.problem(kind, v.ino, &v.path, msg);
            if v.is_root() {
                self.hidden(&v.path, "the root inode was freed");
            }
            self.drop_entry(v, DropReason::FreedInode);
            return Ok(None);
        }
        let unknown = inode.flags & !INODE_FLAGS_KNOWN;
        if unknown != 0 {
            let msg = format!("unknown inode flags {unknown:#x}");
            self.problem(ProblemKind::Inode, v.ino, &v.path, msg);
            self.report.inode_fix(v.ino, &v.path).flags = Some(inode.flags & INODE_FLAGS_KNOWN);
        }
        if let Err(e) = check_lock(
            raw.get(..sector).unwrap_or(&[]),
            v.ino,
            v.kind.is_none(),
            self.report,
        ) {
            self.problem(ProblemKind::LockRecord, v.ino, &v.path, e);
        }
        if inode.orphan_slots != 0 {
            self.orphan_bits
                .insert(v.ino, (inode.orphan_slots, v.path.clone()));
        }
        let what = format!("inode {} (blocks {}..{})", v.ino, v.ino, v.ino + span);
        self.claim(ProblemKind::Inode, &what, v.ino, span, &v.path);
        self.report.counts.inodes += 1;
        Ok(Some(inode))
    }

    // ------------------------------------------------------------------------------
    // Directories.
    // ------------------------------------------------------------------------------

    /// Checks a directory reached for the first time and queues its entries.
    fn enter_dir(&mut self, v: &Visit, inode: &InodeBody) -> Result<Owned> {
        self.report.counts.directories += 1;
        let root = self.vol.sb.root_ino;
        if inode.parent != v.parent {
            let msg = format!(
                "the directory's parent field says {}, but it is an entry of {}",
                inode.parent, v.parent
            );
            self.problem(ProblemKind::DirParent, v.ino, &v.path, msg);
            self.report.inode_fix(v.ino, &v.path).parent = Some(v.parent);
        }
        if v.ino != root {
            if let Some(parent) = self.dirs.get_mut(&v.parent) {
                parent.subdirs += 1;
            }
        }
        self.dirs.insert(
            v.ino,
            DirLinks {
                nlink: inode.nlink,
                subdirs: 0,
                path: v.path.clone(),
            },
        );
        if inode.flags & (INODE_FLAG_INLINE | INODE_FLAG_EXTENT_TREE) != 0
            || inode.extent_count != 0
        {
            let msg = format!(
                "directory with file flags {:#x} or extents ({})",
                inode.flags, inode.extent_count
            );
            self.problem(ProblemKind::Extent, v.ino, &v.path, msg);
        }
        if inode.dir_depth > DIR_DEPTH_MAX {
            let msg = format!(
                "table depth {} (at most {DIR_DEPTH_MAX}); its entries are not checked",
                inode.dir_depth
            );
            self.problem(ProblemKind::DirTable, v.ino, &v.path, msg);
            self.hidden(&v.path, "the directory's table depth is impossible");
            return Ok(Owned {
                incomplete: true,
                ..Owned::default()
            });
        }
        let (ptrs, table_blocks) = self.dir_table(v, inode)?;
        let Some(ptrs) = ptrs else {
            self.hidden(&v.path, "the directory's table cannot be read");
            return Ok(Owned {
                incomplete: true,
                ..Owned::default()
            });
        };
        let buckets = self.dir_buckets(v, inode, &ptrs)?;
        Ok(Owned {
            dir_blocks: table_blocks + buckets,
            ..Owned::default()
        })
    }

    /// The directory's bucket pointers (None when they cannot all be read) and the
    /// number of table blocks it lists.
    fn dir_table(&mut self, v: &Visit, inode: &InodeBody) -> Result<(Option<Vec<u64>>, u64)> {
        let len = 1usize << inode.dir_depth;
        let have = inode.dir_table_blocks as usize;
        if have == 0 {
            if len > INODE_DIR_PTRS_MAX {
                let msg = format!("a table of {len} bucket pointers cannot be inline in the inode");
                self.problem(ProblemKind::DirTable, v.ino, &v.path, msg);
                return Ok((None, 0));
            }
            return Ok((
                Some((0..len).map(|i| area_u64(&inode.area, i)).collect()),
                0,
            ));
        }
        self.report.counts.dir_table_blocks += have as u64;
        let needed = len.div_ceil(DIR_TABLE_PTRS);
        let mut whole = have == needed;
        if !whole {
            let msg = format!(
                "{have} table blocks, but a table of depth {} takes {needed}",
                inode.dir_depth
            );
            self.problem(ProblemKind::DirTable, v.ino, &v.path, msg);
        }
        let mut ptrs = Vec::with_capacity(len);
        for which in 0..have {
            let block = area_u64(&inode.area, which);
            match self.table_block(v, block, which)? {
                Some(table) if which < needed => {
                    let take = (len - ptrs.len()).min(DIR_TABLE_PTRS);
                    ptrs.extend_from_slice(table.ptrs.get(..take).unwrap_or(&[]));
                }
                Some(_) => {}
                None => whole = false,
            }
        }
        whole &= ptrs.len() == len;
        Ok((whole.then_some(ptrs), have as u64))
    }

    fn table_block(
        &mut self,
        v: &Visit,
        block: BlockNo,
        which: usize,
    ) -> Result<Option<DirTableBlock>> {
        let what = format!("directory table block {which} (block {block})");
        if !self.claim(ProblemKind::DirTable, &what, block, 1, &v.path) {
            return Ok(None);
        }
        let raw = self.vol.blocks(block, 1)?;
        let msg = match DirTableBlock::decode(&raw, block) {
            Err(e) => e.to_string(),
            Ok(t) if t.owner != v.ino => format!("{what} belongs to inode {}", t.owner),
            Ok(t) if t.index as usize != which => format!("{what} says it is block {}", t.index),
            Ok(t) => return Ok(Some(t)),
        };
        self.problem(ProblemKind::DirTable, block, &v.path, msg);
        Ok(None)
    }

    /// Checks every distinct bucket the table points at, the table's extendible-hash
    /// structure and the directory's counts. Returns the number of buckets.
    fn dir_buckets(&mut self, v: &Visit, inode: &InodeBody, ptrs: &[u64]) -> Result<u64> {
        let depth = inode.dir_depth;
        let mut uses: HashMap<BlockNo, Option<BucketUse>> = HashMap::new();
        let mut order = Vec::new();
        let mut entries = 0u64;
        let mut entry_problems = Vec::new();
        let mut unreadable = 0;
        for (i, &block) in ptrs.iter().enumerate() {
            if let Entry::Vacant(slot) = uses.entry(block) {
                let used = self.bucket(v, block, depth, &mut entries, &mut entry_problems)?;
                unreadable += usize::from(used.is_none());
                slot.insert(used);
                order.push(block);
            }
            if let Some(Some(used)) = uses.get_mut(&block) {
                used.pointers += 1;
                if (i as u64) >> (depth - used.local) != used.prefix {
                    used.misplaced = true;
                }
            }
        }
        self.push_capped(entry_problems, v);
        for block in &order {
            let Some(Some(used)) = uses.get(block) else {
                continue;
            };
            let span = 1u64 << (depth - used.local);
            if used.misplaced || used.pointers != span {
                let msg = format!(
                    "bucket {block} (local depth {}, prefix {}) has {} table pointers, expected \
                     the {span} pointers {}..{}",
                    used.local,
                    used.prefix,
                    used.pointers,
                    used.prefix * span,
                    (used.prefix + 1) * span
                );
                self.problem(ProblemKind::DirTable, *block, &v.path, msg);
            }
        }
        let buckets = order.len() as u64;
        self.report.counts.dir_buckets += buckets;
        self.report.counts.dir_entries += entries;
        if unreadable > 0 {
            let what = format!("{unreadable} directory buckets cannot be read");
            self.hidden(&v.path, &what);
        }
        self.check_dir_counts(v, inode, buckets, entries, unreadable == 0);
        Ok(buckets)
    }

    /// Checks a directory's counts and size; notes the right ones for repair when
    /// every bucket could be read (`complete`).
    fn check_dir_counts(
        &mut self,
        v: &Visit,
        inode: &InodeBody,
        buckets: u64,
        entries: u64,
        complete: bool,
    ) {
        let size = buckets * BLOCK_SIZE_U64;
        if inode.dir_entries != entries {
            let msg = format!("counts {} entries, holds {entries}", inode.dir_entries);
            self.problem(ProblemKind::DirCount, v.ino, &v.path, msg);
        }
        if inode.dir_buckets != buckets {
            let msg = format!("counts {} buckets, has {buckets}", inode.dir_buckets);
            self.problem(ProblemKind::DirCount, v.ino, &v.path, msg);
        }
        if inode.size != size {
            let msg = format!(
                "size {} bytes, but {buckets} buckets make {size} bytes",
                inode.size
            );
            self.problem(ProblemKind::DirCount, v.ino, &v.path, msg);
        }
        let wrong = (inode.dir_entries, inode.dir_buckets, inode.size) != (entries, buckets, size);
        if complete && wrong {
            let fix = self.report.inode_fix(v.ino, &v.path);
            fix.dir_entries = Some(entries);
            fix.dir_buckets = Some(buckets);
            fix.size = Some(size);
        }
    }

    /// Reads and checks one bucket and queues its entries. None when it is unusable.
    fn bucket(
        &mut self,
        v: &Visit,
        block: BlockNo,
        depth: u32,
        entries: &mut u64,
        entry_problems: &mut Vec<Problem>,
    ) -> Result<Option<BucketUse>> {
        let what = format!("directory bucket {block}");
        if !self.claim(ProblemKind::DirTable, &what, block, 1, &v.path) {
            return Ok(None);
        }
        let raw = self.vol.blocks(block, 1)?;
        let bucket = match DirBucket::decode(&raw, block) {
            Ok(b) => b,
            Err(e) => {
                self.problem(ProblemKind::DirBucket, block, &v.path, e.to_string());
                return Ok(None);
            }
        };
        let h = bucket.header;
        let msg = if h.owner != v.ino {
            format!("bucket belongs to inode {}", h.owner)
        } else if h.local_depth > depth {
            format!(
                "bucket's local depth {} is deeper than the table's {depth}",
                h.local_depth
            )
        } else if h.prefix >> h.local_depth != 0 {
            format!(
                "bucket's prefix {} does not fit its local depth {}",
                h.prefix, h.local_depth
            )
        } else {
            *entries += self.bucket_entries(v, &bucket, entry_problems);
            return Ok(Some(BucketUse {
                local: h.local_depth,
                prefix: h.prefix,
                pointers: 0,
                misplaced: false,
            }));
        };
        self.problem(ProblemKind::DirBucket, block, &v.path, msg);
        Ok(None)
    }

    /// Checks a bucket's entries and queues the ones to follow. Returns their count.
    fn bucket_entries(
        &mut self,
        v: &Visit,
        bucket: &DirBucket,
        problems: &mut Vec<Problem>,
    ) -> u64 {
        let h = bucket.header;
        let seed = self.vol.sb.dir_hash_seed;
        let entries = parse_entries(bucket);
        let mut names = HashSet::new();
        for (index, e) in entries.iter().enumerate() {
            let path = child_path(&v.path, &e.name);
            let visit = Visit {
                ino: e.ino,
                parent: v.ino,
                path: path.clone(),
                kind: Some(e.kind),
                bucket: h.blockno,
                index,
                name: e.name.clone(),
                orphan_of: None,
            };
            let mut bad = |message: String| {
                problems.push(Problem {
                    kind: ProblemKind::DirEntry,
                    block: Some(h.blockno),
                    path: Some(path.clone()),
                    message,
                });
            };
            let name = &e.name;
            if name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
                bad(format!(
                    "bad name {:?}; not followed",
                    String::from_utf8_lossy(name)
                ));
                self.drop_entry(&visit, DropReason::BadName);
                continue;
            }
            if !names.insert(name.clone()) {
                bad("a second entry of the same name; not followed".into());
                self.drop_entry(&visit, DropReason::BadName);
                continue;
            }
            let hash = name_hash(seed, name);
            if e.hash != hash {
                bad(format!("stored hash {:#x} is not the name's hash", e.hash));
                if index_of(hash, h.local_depth) == h.prefix {
                    if let Some(entry) = visit.entry() {
                        self.report
                            .fixes
                            .entry_fixes
                            .push((entry, EntryFix::Hash(hash)));
                    }
                }
            } else if index_of(e.hash, h.local_depth) != h.prefix {
                bad("entry in the wrong bucket for its hash: lookups cannot find it".into());
            }
            self.stack.push(visit);
        }
        if entries.len() != h.count as usize {
            problems.push(Problem {
                kind: ProblemKind::DirBucket,
                block: Some(h.blockno),
                path: Some(v.path.clone()),
                message: format!("bucket counts {} entries, holds {}", h.count, entries.len()),
            });
        }
        entries.len() as u64
    }

    /// Reports a directory's entry problems: the first few, then a sum.
    fn push_capped(&mut self, problems: Vec<Problem>, v: &Visit) {
        let more = problems.len().saturating_sub(PROBLEMS_PER_OBJECT_MAX);
        self.report
            .problems
            .extend(problems.into_iter().take(PROBLEMS_PER_OBJECT_MAX));
        if more > 0 {
            let msg = format!("{more} more entry problems in this directory");
            self.problem(ProblemKind::DirEntry, v.ino, &v.path, msg);
        }
    }

    // ------------------------------------------------------------------------------
    // Files, symlinks, special files.
    // ------------------------------------------------------------------------------

    fn check_non_dir(&mut self, v: &Visit, inode: &InodeBody, dtype: u8) -> Result<Owned> {
        match dtype {
            libc::DT_REG => {
                self.report.counts.regular_files += 1;
                if inode.flags & INODE_FLAG_INLINE != 0 {
                    let msg = "regular file flagged inline";
                    self.problem(ProblemKind::Extent, v.ino, &v.path, msg);
                    return Ok(Owned::default());
                }
                let owned = self.check_extents(v, inode)?;
                if inode.size > FILE_SIZE_MAX {
                    let msg = format!("size {} past the largest file", inode.size);
                    self.problem(ProblemKind::Inode, v.ino, &v.path, msg);
                    let end = owned.mapped_end.saturating_mul(BLOCK_SIZE_U64);
                    self.report.inode_fix(v.ino, &v.path).size = Some(end.min(FILE_SIZE_MAX));
                }
                Ok(owned)
            }
            libc::DT_LNK => {
                self.report.counts.symlinks += 1;
                self.check_symlink(v, inode)
            }
            _ => {
                self.report.counts.special_files += 1;
                if inode.flags & (INODE_FLAG_INLINE | INODE_FLAG_EXTENT_TREE) != 0
                    || inode.extent_count != 0
                {
                    let msg = format!(
                        "{} with data flags {:#x} or extents ({})",
                        kind_name(dtype),
                        inode.flags,
                        inode.extent_count
                    );
                    self.problem(ProblemKind::Extent, v.ino, &v.path, msg);
                }
                Ok(Owned::default())
            }
        }
    }

    fn check_symlink(&mut self, v: &Visit, inode: &InodeBody) -> Result<Owned> {
        if inode.flags & INODE_FLAG_INLINE != 0 {
            // Decoding checked that the target fits the area.
            if inode.size == 0 || inode.size > INODE_AREA_SIZE as u64 {
                let msg = format!("inline target of {} bytes", inode.size);
                self.problem(ProblemKind::Symlink, v.ino, &v.path, msg);
            }
            return Ok(Owned::default());
        }
        if inode.size == 0 || inode.size > SYMLINK_MAX {
            let msg = format!("target of {} bytes", inode.size);
            self.problem(ProblemKind::Symlink, v.ino, &v.path, msg);
        }
        let owned = self.check_extents(v, inode)?;
        if owned.data * BLOCK_SIZE_U64 < inode.size {
            let msg = format!(
                "target of {} bytes stored in {} blocks",
                inode.size, owned.data
            );
            self.problem(ProblemKind::Symlink, v.ino, &v.path, msg);
        }
        Ok(owned)
    }

    /// Checks a file's extents (inline or in leaves) and claims their blocks.
    fn check_extents(&mut self, v: &Visit, inode: &InodeBody) -> Result<Owned> {
        // Decoding bounded extent_count by what the area holds.
        let listed = area_extents(&inode.area, inode.extent_count as usize);
        let (extents, leaves, incomplete) = if inode.flags & INODE_FLAG_EXTENT_TREE != 0 {
            let (extents, complete) = self.load_leaves(v, &listed)?;
            if !complete {
                self.hidden(&v.path, "extent leaves cannot be read");
            }
            (extents, listed.len() as u64, !complete)
        } else {
            (listed, 0, false)
        };
        self.report.counts.extents += extents.len() as u64;
        self.report.counts.extent_leaves += leaves;
        let mut problems = Vec::new();
        let mut prev_end = 0u64;
        let mut data = 0u64;
        for (k, e) in extents.iter().enumerate() {
            let len = u64::from(e.len);
            data += len;
            let end = e.file_block.checked_add(len);
            let what = format!(
                "extent {k} (file block {}, {len} blocks at block {})",
                e.file_block, e.disk_block
            );
            if len == 0 {
                problems.push(format!("{what} is empty"));
            }
            if e.flags & !EXTENT_UNWRITTEN != 0 {
                problems.push(format!("{what} has unknown flags {:#x}", e.flags));
            }
            if end.is_none_or(|end| end > FILE_BLOCKS_MAX) {
                problems.push(format!("{what} maps past the largest file"));
            }
            if e.file_block < prev_end {
                problems.push(format!("{what} overlaps or precedes the extent before it"));
            }
            prev_end = prev_end.max(end.unwrap_or(u64::MAX));
            if len > 0 {
                self.claim(ProblemKind::Extent, &what, e.disk_block, len, &v.path);
            }
        }
        let more = problems.len().saturating_sub(PROBLEMS_PER_OBJECT_MAX);
        for msg in problems.into_iter().take(PROBLEMS_PER_OBJECT_MAX) {
            self.problem(ProblemKind::Extent, v.ino, &v.path, msg);
        }
        if more > 0 {
            let msg = format!("{more} more extent problems in this file");
            self.problem(ProblemKind::Extent, v.ino, &v.path, msg);
        }
        self.report.counts.data_blocks += data;
        Ok(Owned {
            data,
            leaves,
            incomplete,
            mapped_end: prev_end,
            ..Owned::default()
        })
    }

    /// The extents of a file in tree mode, from the leaves its index entries name,
    /// and whether every leaf could be read.
    fn load_leaves(&mut self, v: &Visit, index: &[Extent]) -> Result<(Vec<Extent>, bool)> {
        let mut out = Vec::new();
        let mut complete = true;
        for (k, entry) in index.iter().enumerate() {
            let block = entry.disk_block;
            let what = format!("extent leaf {k} (block {block})");
            if !self.claim(ProblemKind::ExtentLeaf, &what, block, 1, &v.path) {
                complete = false;
                continue;
            }
            let raw = self.vol.blocks(block, 1)?;
            let leaf = match ExtentLeaf::decode(&raw, block) {
                Ok(leaf) => leaf,
                Err(e) => {
                    self.problem(ProblemKind::ExtentLeaf, block, &v.path, e.to_string());
                    complete = false;
                    continue;
                }
            };
            if leaf.owner != v.ino {
                let msg = format!("{what} belongs to inode {}", leaf.owner);
                self.problem(ProblemKind::ExtentLeaf, block, &v.path, msg);
                complete = false;
                continue;
            }
            // Decoding bounded the count by the leaf's capacity.
            let extents = leaf.extents.get(..leaf.count as usize).unwrap_or(&[]);
            let first = extents.first().map(|e| e.file_block);
            if leaf.count == 0 || leaf.count != entry.len || first != Some(entry.file_block) {
                let msg = format!(
                    "{what} holds {} extents from file block {:?}; its index entry says {} from {}",
                    leaf.count, first, entry.len, entry.file_block
                );
                self.problem(ProblemKind::ExtentLeaf, block, &v.path, msg);
            }
            out.extend_from_slice(extents);
        }
        Ok((out, complete))
    }

    // ------------------------------------------------------------------------------
    // What every inode has.
    // ------------------------------------------------------------------------------

    /// Checks an inode's xattr block; returns the blocks it takes (0 or 1). A block
    /// outside the data area, that does not decode or belongs to another inode is
    /// noted for repair to drop.
    fn check_xattr(&mut self, v: &Visit, inode: &InodeBody) -> Result<u64> {
        let block = inode.xattr_block;
        if block == 0 {
            return Ok(0);
        }
        self.report.counts.xattr_blocks += 1;
        let what = format!("xattr block {block}");
        if !self.claim(ProblemKind::Xattr, &what, block, 1, &v.path) {
            self.report.inode_fix(v.ino, &v.path).xattr_block = Some(0);
            return Ok(1);
        }
        let raw = self.vol.blocks(block, 1)?;
        let x = match XattrBlock::decode(&raw, block) {
            Ok(x) if x.owner == v.ino => x,
            other => {
                let msg = match other {
                    Err(e) => e.to_string(),
                    Ok(x) => format!("xattr block belongs to inode {}", x.owner),
                };
                self.problem(ProblemKind::Xattr, block, &v.path, msg);
                self.report.inode_fix(v.ino, &v.path).xattr_block = Some(0);
                return Ok(1);
            }
        };
        let pairs = crate::fs::xattr::parse(&x);
        let mut names = HashSet::new();
        let bad = pairs.iter().find_map(|(name, _)| {
            let shown = String::from_utf8_lossy(name);
            if !names.insert(name) {
                Some(format!("attribute {shown:?} is there twice"))
            } else if !XATTR_NAMESPACES
                .iter()
                .any(|ns| name.starts_with(ns) && name.len() > ns.len())
            {
                Some(format!("attribute {shown:?} is in no known namespace"))
            } else {
                None
            }
        });
        if let Some(msg) = bad {
            self.problem(ProblemKind::Xattr, block, &v.path, msg);
        }
        Ok(1)
    }

    fn check_block_count(&mut self, v: &Visit, inode: &InodeBody, owned: Owned) {
        if owned.incomplete {
            return;
        }
        let resource = u64::from(self.vol.geo.resource_blocks);
        let expected = resource + owned.data + owned.leaves + owned.dir_blocks + owned.xattr;
        if inode.blocks != expected {
            let msg = format!(
                "counts {} blocks, owns {expected} ({resource} inode, {} data, {} extent leaves, \
                 {} directory, {} xattr)",
                inode.blocks, owned.data, owned.leaves, owned.dir_blocks, owned.xattr
            );
            self.problem(ProblemKind::BlockCount, v.ino, &v.path, msg);
            self.report.inode_fix(v.ino, &v.path).blocks = Some(expected);
        }
    }

    // ------------------------------------------------------------------------------
    // Orphan tables.
    // ------------------------------------------------------------------------------

    /// Walks every slot's orphan table: each inode listed is reachable (an unlinked
    /// file some host had open), and must be an orphan whose `orphan_slots` names
    /// exactly the tables that list it.
    fn orphan_tables(&mut self) -> Result<()> {
        for slot in 0..self.vol.geo.max_hosts {
            let Some(block) = self.vol.geo.orphan_table(slot) else {
                return Ok(());
            };
            for ino in self.orphan_table(slot, block)? {
                *self.listed.entry(ino).or_default() |= 1u64 << slot;
                if self.files.contains_key(&ino) || self.dirs.contains_key(&ino) {
                    continue;
                }
                self.visit(Visit {
                    ino,
                    parent: 0,
                    path: format!("(orphan {ino} of slot {slot})"),
                    kind: None,
                    bucket: 0,
                    index: 0,
                    name: Vec::new(),
                    orphan_of: Some(slot),
                })?;
                while let Some(visit) = self.stack.pop() {
                    self.visit(visit)?;
                }
            }
        }
        self.check_orphan_listings();
        Ok(())
    }

    /// Reads one orphan table; the inodes it lists (each once).
    fn orphan_table(&mut self, slot: u32, block: BlockNo) -> Result<Vec<Ino>> {
        let geo = self.vol.geo;
        let raw = self.vol.blocks(block, u64::from(geo.resource_blocks))?;
        let sector = geo.ats_sector_size as usize;
        let path = format!("(orphan table of slot {slot})");
        if let Err(e) = check_lock(raw.get(..sector).unwrap_or(&[]), block, true, self.report) {
            self.problem(ProblemKind::LockRecord, block, &path, e);
        }
        let body = raw.get(sector..sector + RESOURCE_BODY_SIZE).unwrap_or(&[]);
        let table = match OrphanTable::decode(body, block) {
            Ok(table) if table.slot == slot => table,
            Ok(table) => {
                let msg = format!("names slot {}", table.slot);
                self.problem(ProblemKind::OrphanTable, block, &path, msg);
                return Ok(Vec::new());
            }
            Err(e) => {
                self.problem(ProblemKind::OrphanTable, block, &path, e.to_string());
                return Ok(Vec::new());
            }
        };
        let mut seen = HashSet::new();
        let listed = table
            .listed()
            .iter()
            .copied()
            .filter(|&ino| seen.insert(ino));
        let listed: Vec<Ino> = listed.collect();
        if listed.len() != table.listed().len() {
            let msg = "lists an inode twice";
            self.problem(ProblemKind::OrphanTable, block, &path, msg);
        }
        self.report.counts.orphans += listed.len() as u64;
        Ok(listed)
    }

    /// Each listed inode is an orphan of a kind that can be one, and its
    /// `orphan_slots` names exactly the tables that list it.
    fn check_orphan_listings(&mut self) {
        let mut inos: Vec<Ino> = self.listed.keys().copied().collect();
        inos.extend(self.orphan_bits.keys().copied());
        inos.sort_unstable();
        inos.dedup();
        for ino in inos {
            let listed = self.listed.get(&ino).copied().unwrap_or(0);
            let (bits, path) = match self.orphan_bits.get(&ino) {
                Some((bits, path)) => (*bits, path.clone()),
                None => (0, format!("(orphan {ino})")),
            };
            let linked = self.files.get(&ino).is_some_and(|f| f.found > 0);
            let dir = self.dirs.contains_key(&ino);
            let msg = if listed != 0 && (linked || dir) {
                format!("inode {ino} is listed as an orphan but is linked")
            } else if bits != listed && (listed != 0 || self.files.contains_key(&ino)) {
                format!(
                    "inode {ino} says orphan tables {bits:#x} list it, but tables {listed:#x} do"
                )
            } else {
                continue;
            };
            self.problem(ProblemKind::OrphanTable, ino, &path, msg);
        }
    }

    /// Compares link counts with the entries found. Repair sets them to what was
    /// found, but while the walk could not see everything (`hidden`) it only raises
    /// them: an entry the walk did not see may still name the inode.
    fn check_link_counts(&mut self) {
        let mut wrong = Vec::new();
        for (&ino, f) in &self.files {
            if f.nlink != f.found {
                let msg = format!("link count {}, but {} entries name it", f.nlink, f.found);
                wrong.push((ino, f.path.clone(), msg, f.nlink, f.found));
            }
        }
        for (&ino, d) in &self.dirs {
            let expected = 2u32.saturating_add(d.subdirs);
            if d.nlink != expected {
                let msg = format!(
                    "link count {}, but 2 + {} subdirectories make {expected}",
                    d.nlink, d.subdirs
                );
                wrong.push((ino, d.path.clone(), msg, d.nlink, expected));
            }
        }
        wrong.sort();
        let lower_ok = self.report.fixes.hidden.is_empty();
        for (ino, path, msg, nlink, found) in wrong {
            self.problem(ProblemKind::LinkCount, ino, &path, msg);
            if found > nlink || lower_ok {
                self.report.inode_fix(ino, &path).nlink = Some(found);
            }
        }
    }
}

/// Little-endian u64 `i` of an inode area; 0 past its end.
fn area_u64(area: &[u8], i: usize) -> u64 {
    let mut bytes = [0u8; 8];
    match area.get(i * 8..i * 8 + 8) {
        Some(raw) => bytes.copy_from_slice(raw),
        None => return 0,
    }
    u64::from_le_bytes(bytes)
}
