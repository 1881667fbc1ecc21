//! What fsck found: problems (corruption: exit 4), notes (no corruption, worth
//! knowing) and counts. Serialised as JSON by `atsfs fsck --json`.

use crate::format::BlockNo;
use serde::Serialize;

/// The kind of a problem, named in snake_case in the JSON report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The primary superblock does not decode: the backup was used.
    PrimarySuperblockDamaged,
    /// The backup superblock is missing, damaged or differs from the primary.
    BackupSuperblock,
    /// The superblock's layout is impossible or does not fit the device.
    Geometry,
    /// A heartbeat slot does not decode or names another slot.
    HeartbeatSlot,
    /// A journal header does not decode or disagrees with the superblock.
    JournalHeader,
    /// A committed journal record that replay could not write, or that would write
    /// where atsfs never journals (replay refuses its transaction).
    JournalRecord,
    /// A lock record (first ATS sector of a resource) is neither zero nor valid.
    LockRecord,
    /// An allocation group header does not decode or names another group.
    AgHeader,
    /// A group's bitmap does not match the checksum in its header.
    BitmapChecksum,
    /// A group header's free count disagrees with its bitmap.
    FreeCount,
    /// An inode does not decode (checksum, magic, block number, fields).
    Inode,
    /// A directory entry names an inode that was freed.
    FreedInode,
    /// A directory's table (depth, table blocks, pointers) is inconsistent.
    DirTable,
    /// A directory bucket does not decode, has another owner or a bad depth/prefix.
    DirBucket,
    /// A directory entry is wrong: hash, bucket, name, kind, duplicate, or it names
    /// something that is not an inode.
    DirEntry,
    /// A directory's entry or bucket count or size disagrees with its contents.
    DirCount,
    /// A directory's parent field does not name the directory that holds it.
    DirParent,
    /// A directory is reachable by more than one entry (or the root by any).
    DirLinkedTwice,
    /// An inode's link count disagrees with the entries naming it.
    LinkCount,
    /// An extent is empty, unsorted, overlapping, past the largest file or outside
    /// the data area; or an inode's flags or extent count do not fit its kind.
    Extent,
    /// An extent leaf does not decode or disagrees with its index entry.
    ExtentLeaf,
    /// A block is used twice (by two files, or by a file and metadata).
    DoublyUsedBlock,
    /// An inode's block count disagrees with what it owns.
    BlockCount,
    /// A symlink's size or storage is impossible.
    Symlink,
    /// An xattr block does not decode, has another owner or an unknown namespace.
    Xattr,
    /// An orphan table does not decode, or lists an inode that is not an orphan
    /// (freed, linked, a directory, not flagged for that table), or an inode's
    /// `orphan_slots` names a table that does not list it.
    OrphanTable,
    /// Blocks marked used in a bitmap that nothing reachable uses.
    LeakedBlocks,
    /// Blocks in use (reachable, or group metadata) but marked free: the allocator
    /// would hand them out again. Serious.
    BlockMarkedFree,
}

/// One problem: what, where (block and path when known) and a sentence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub block: Option<BlockNo>,
    pub path: Option<String>,
    pub message: String,
}

/// What the volume holds, as far as the check saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Inodes reached from the root (each counted once, however many links).
    pub inodes: u64,
    pub directories: u64,
    pub regular_files: u64,
    pub symlinks: u64,
    /// FIFOs, sockets and device nodes.
    pub special_files: u64,
    /// Entries in all directories (without "." and "..").
    pub dir_entries: u64,
    pub dir_buckets: u64,
    pub dir_table_blocks: u64,
    pub extents: u64,
    pub extent_leaves: u64,
    pub xattr_blocks: u64,
    /// Blocks mapped by file extents.
    pub data_blocks: u64,
    pub allocation_groups: u64,
    /// Blocks of all allocation groups.
    pub blocks_total: u64,
    /// Blocks marked used in the bitmaps (group metadata included).
    pub blocks_used: u64,
    /// Free blocks according to the group headers.
    pub blocks_free: u64,
    /// Blocks used by something reachable from the root, plus group metadata.
    pub blocks_reachable: u64,
    /// Heartbeat slots ever used, and those marked live (or recovering).
    pub slots_used: u64,
    pub slots_live: u64,
    /// Committed transactions (and their images) not yet written home.
    pub pending_transactions: u64,
    pub pending_records: u64,
    /// Inodes listed in orphan tables: files unlinked while a host had them open
    /// (reachable through the tables, counted among `inodes` too).
    pub orphans: u64,
    /// Lock records of reached resources that are not free.
    pub locks_held: u64,
    /// Metadata reads the check made.
    pub metadata_reads: u64,
}

/// The result of a check.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    pub device: String,
    pub volume_uuid: String,
    pub label: String,
    /// "primary", or the backup's block when the primary was damaged.
    pub superblock: String,
    pub counts: Counts,
    /// Facts worth knowing that are not corruption: pending journals, live slots.
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
    /// Every inode reached, with (one of) its paths: for `atsfs locks`.
    #[serde(skip)]
    pub paths: std::collections::BTreeMap<u64, String>,
    /// What repair can fix, in the shape it needs.
    #[serde(skip)]
    pub(crate) fixes: Fixes,
}

/// What the check found that `repair` can mend, recorded where it was found. Every
/// item names the place to write and what the walk saw there; repair re-reads each
/// structure and leaves it alone when it no longer matches.
#[derive(Clone, Debug, Default)]
pub(crate) struct Fixes {
    /// Directory entries to remove.
    pub drop_entries: Vec<(EntryRef, DropReason)>,
    /// Directory entries to correct in place.
    pub entry_fixes: Vec<(EntryRef, EntryFix)>,
    /// Inode fields to set to what the walk found.
    pub inodes: std::collections::BTreeMap<BlockNo, InodeFix>,
    /// Resources (inodes reached, group headers) whose lock record is damaged, names
    /// a holder or records an open file.
    pub locks: Vec<BlockNo>,
    /// Why the walk could not follow everything on disk (an unreadable directory
    /// table or bucket, extent leaf, root). While this is not empty, blocks the walk
    /// did not reach may still be in use, and repair must not free them.
    pub hidden: Vec<String>,
    /// Each group's bitmap of blocks reachable from the root (64-bit words, LSB
    /// first), group metadata not included.
    pub reachable: Vec<Vec<u64>>,
}

/// One directory entry, as repair finds it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryRef {
    /// The directory that holds it.
    pub dir: BlockNo,
    /// The bucket block that holds it, and its position among the bucket's entries.
    pub bucket: BlockNo,
    pub index: usize,
    pub name: Vec<u8>,
    /// The inode it names.
    pub ino: BlockNo,
    pub path: String,
}

/// Why an entry is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DropReason {
    /// It names a block that holds no inode, or lies where no inode can be.
    NotAnInode,
    /// It names an inode that was freed.
    FreedInode,
    /// It names an inode whose body does not decode: the file is lost.
    DamagedInode,
    /// Its name is impossible (`/`, NUL, `.`, `..`) or taken by an earlier entry of
    /// the bucket: lookups can never reach it.
    BadName,
    /// It names a directory already reached through another entry, or the root.
    DirLinkedTwice,
}

/// A correction of one directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryFix {
    /// Its kind is not its inode's: the inode's DT_* kind.
    Kind(u8),
    /// Its stored hash is not its name's, but the bucket is the right one for the
    /// name's: the name's hash.
    Hash(u64),
}

/// Fields of one inode to set; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct InodeFix {
    pub path: String,
    pub nlink: Option<u32>,
    pub blocks: Option<u64>,
    pub parent: Option<BlockNo>,
    pub dir_entries: Option<u64>,
    pub dir_buckets: Option<u64>,
    /// A directory's size (4096 per bucket), or a regular file's that was past the
    /// largest file (the end of its last extent).
    pub size: Option<u64>,
    /// The flags without the bits format v1 does not know.
    pub flags: Option<u32>,
    /// 0: the xattr block lies outside the data area, does not decode or belongs to
    /// another inode (its attributes are lost).
    pub xattr_block: Option<BlockNo>,
}

/// Problems of one kind listed one by one per object before they are summed up.
pub(crate) const PROBLEMS_PER_OBJECT_MAX: usize = 16;

impl FsckReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// True when a problem of `kind` was found.
    pub fn has(&self, kind: ProblemKind) -> bool {
        self.problems.iter().any(|p| p.kind == kind)
    }

    pub(crate) fn problem(
        &mut self,
        kind: ProblemKind,
        block: Option<BlockNo>,
        path: Option<&str>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            kind,
            block,
            path: path.map(str::to_owned),
            message: message.into(),
        });
    }

    pub(crate) fn note(&mut self, message: impl Into<String>) {
        self.notes.push(message.into());
    }

    /// The pending fix of inode `ino` (found at `path`), created empty.
    pub(crate) fn inode_fix(&mut self, ino: BlockNo, path: &str) -> &mut InodeFix {
        self.fixes.inodes.entry(ino).or_insert_with(|| InodeFix {
            path: path.to_owned(),
            ..InodeFix::default()
        })
    }

    /// Prints a human summary and every problem, named by block and path.
    pub fn print(&self) {
        print!("{}", self.render());
    }

    /// The text `print` prints.
    pub fn render(&self) -> String {
        let c = &self.counts;
        let mut out = format!(
            "atsfs fsck: {}\n  volume {} {:?}, superblock: {}\n",
            self.device, self.volume_uuid, self.label, self.superblock
        );
        out += &format!(
            "  {} inodes: {} directories, {} files, {} symlinks, {} other; {} directory entries\n",
            c.inodes, c.directories, c.regular_files, c.symlinks, c.special_files, c.dir_entries
        );
        out += &format!(
            "  {} of {} blocks used in {} allocation groups ({} reachable, {} free)\n",
            c.blocks_used, c.blocks_total, c.allocation_groups, c.blocks_reachable, c.blocks_free
        );
        if c.orphans > 0 {
            out += &format!(
                "  {} files unlinked while open, listed in orphan tables (reclaimed when their hosts' slots are recovered)
",
                c.orphans
            );
        }
        for note in &self.notes {
            out += &format!("  note: {note}\n");
        }
        if c.slots_live > 0 {
            out += "  note: a host may have this volume mounted: fsck then sees in-flight state, \
                    and what it reports may be transient; check again after unmounting it\n";
        }
        if self.problems.is_empty() {
            out += "  clean: no problems found\n";
            return out;
        }
        out += &format!("  {} problems found:\n", self.problems.len());
        for p in &self.problems {
            out += &format!("  - {}\n", describe(p));
        }
        out
    }
}

/// "[kind] block B, /path: message".
fn describe(p: &Problem) -> String {
    let kind = serde_json::to_value(p.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{:?}", p.kind));
    let mut place = Vec::new();
    if let Some(block) = p.block {
        place.push(format!("block {block}"));
    }
    if let Some(path) = &p.path {
        place.push(path.clone());
    }
    if place.is_empty() {
        format!("[{kind}] {}", p.message)
    } else {
        format!("[{kind}] {}: {}", place.join(", "), p.message)
    }
}
