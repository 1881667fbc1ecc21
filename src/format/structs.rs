//! The on-disk structures of format v1. `docs/format.md` has a byte table for each;
//! `layout_tables()` produces the same tables from the code for the doc test.

use super::{magic, BlockNo, FormatError, OnDisk, AG_BLOCKS, FORMAT_VERSION, HOSTS_MAX, NAME_MAX};
use super::{BLOCK_SIZE, RESOURCE_BODY_SIZE};
use bytemuck::{Pod, Zeroable};
use std::mem::{offset_of, size_of};

// ---------------------------------------------------------------------------------
// Superblock: block 0, and a backup copy in the last block of the volume.
// ---------------------------------------------------------------------------------

/// ATS provided by emulation (OFD byte-range locks on an image file): atomic only
/// between processes of one kernel.
pub const ATS_MODE_EMULATED: u32 = 1;
/// ATS provided by the storage (SCSI COMPARE AND WRITE).
pub const ATS_MODE_HARDWARE: u32 = 2;
/// ATS built from plain sector reads and writes: a Disk Paxos token over the region
/// at `paxos_start` (docs/locking.md, "Disk Paxos test-and-set"). Needs
/// `FEATURE_INCOMPAT_DISK_PAXOS`.
pub const ATS_MODE_DISK_PAXOS: u32 = 3;

/// Incompatible feature: the volume has a Disk Paxos region (leader record and one
/// dblock per slot) at `paxos_start`, between the heartbeat region and the journals,
/// and its hosts do test-and-set through it. Code that does not know it would find
/// the journals misplaced, and would not take the token.
pub const FEATURE_INCOMPAT_DISK_PAXOS: u64 = 1;
/// Incompatible features this code understands.
pub const FEATURE_INCOMPAT_SUPPORTED: u64 = FEATURE_INCOMPAT_DISK_PAXOS;
/// Read-only-compatible feature: each slot has an orphan table (`OrphanTable`) in
/// its own region between the journals and the allocation groups, and inodes record
/// which tables list them (`InodeBody::orphan_slots`). Code that does not know it
/// would free orphans without taking them off their tables.
pub const FEATURE_RO_COMPAT_ORPHAN_TABLES: u64 = 1;
/// Read-only-compatible features this code understands.
pub const FEATURE_RO_COMPAT_SUPPORTED: u64 = FEATURE_RO_COMPAT_ORPHAN_TABLES;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct Superblock {
    pub magic: u32,
    pub crc: u32,
    pub version: u32,
    pub ats_mode: u32,
    pub feature_compat: u64,
    pub feature_incompat: u64,
    pub feature_ro_compat: u64,
    pub volume_uuid: [u8; 16],
    pub label: [u8; 64],
    pub block_size: u32,
    pub ats_sector_size: u32,
    pub max_hosts: u32,
    pub resource_blocks: u32,
    pub heartbeat_interval_ms: u32,
    pub lease_ms: u32,
    pub total_blocks: u64,
    pub hb_start: u64,
    pub hb_blocks: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub ag_start: u64,
    pub ag_count: u64,
    pub root_ino: u64,
    pub created_unix_s: u64,
    pub self_block: u64,
    pub dir_hash_seed: u64,
    pub orphan_start: u64,
    pub paxos_start: u64,
    /// The Disk Paxos token's lease: twice the volume's io_timeout, from which the
    /// token's margin and the delta rule's settle derive (cluster::paxos).
    pub paxos_token_ms: u32,
    pub paxos_pad: u32,
    pub reserved: [u8; 256],
}
const _: () = assert!(size_of::<Superblock>() == 512);

impl OnDisk for Superblock {
    const MAGIC: u32 = magic(b"ATSB");
    const WHAT: &'static str = "superblock";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.self_block)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        let bad = |reason: String| Err(FormatError::corrupted(Self::WHAT, block, reason));
        if self.version != FORMAT_VERSION {
            return Err(FormatError::Unsupported(format!(
                "format version {} (this atsfs reads version {FORMAT_VERSION})",
                self.version
            )));
        }
        if self.block_size as usize != BLOCK_SIZE {
            return bad(format!(
                "block size {} (only {BLOCK_SIZE} exists)",
                self.block_size
            ));
        }
        if !matches!(self.ats_sector_size, 512 | 4096) {
            return bad(format!("ATS sector size {}", self.ats_sector_size));
        }
        if self.max_hosts == 0 || self.max_hosts > HOSTS_MAX {
            return bad(format!("max hosts {}", self.max_hosts));
        }
        if self.heartbeat_interval_ms == 0 || self.lease_ms <= self.heartbeat_interval_ms {
            return bad(format!(
                "heartbeat interval {} ms with lease {} ms",
                self.heartbeat_interval_ms, self.lease_ms
            ));
        }
        if !matches!(
            self.ats_mode,
            ATS_MODE_EMULATED | ATS_MODE_HARDWARE | ATS_MODE_DISK_PAXOS
        ) {
            return bad(format!("ATS mode {}", self.ats_mode));
        }
        let unknown = self.feature_incompat & !FEATURE_INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(FormatError::Unsupported(format!(
                "incompatible features {unknown:#x}: made by a newer atsfs"
            )));
        }
        let unknown_ro = self.feature_ro_compat & !FEATURE_RO_COMPAT_SUPPORTED;
        if unknown_ro != 0 {
            return Err(FormatError::Unsupported(format!(
                "read-only-compatible features {unknown_ro:#x}: made by a newer atsfs"
            )));
        }
        let orphans = self.feature_ro_compat & FEATURE_RO_COMPAT_ORPHAN_TABLES != 0;
        if orphans != (self.orphan_start != 0) {
            return bad(format!(
                "orphan tables at block {} with feature flags {:#x}",
                self.orphan_start, self.feature_ro_compat
            ));
        }
        self.validate_paxos(block)
    }
}

impl Superblock {
    /// The Disk Paxos fields agree with each other: the flag, the mode, the region
    /// and a token lease shorter than the host lease are all set, or none is.
    fn validate_paxos(&self, block: BlockNo) -> Result<(), FormatError> {
        let flag = self.feature_incompat & FEATURE_INCOMPAT_DISK_PAXOS != 0;
        let mode = self.ats_mode == ATS_MODE_DISK_PAXOS;
        let region = self.paxos_start != 0;
        let token = if flag {
            self.paxos_token_ms != 0 && self.paxos_token_ms < self.lease_ms
        } else {
            self.paxos_token_ms == 0
        };
        if flag == mode && flag == region && token {
            return Ok(());
        }
        Err(FormatError::corrupted(
            Self::WHAT,
            block,
            format!(
                "Disk Paxos fields disagree: ATS mode {}, feature flags {:#x}, region at block \
                 {}, token lease {} ms (host lease {} ms)",
                self.ats_mode,
                self.feature_incompat,
                self.paxos_start,
                self.paxos_token_ms,
                self.lease_ms
            ),
        ))
    }
}

// ---------------------------------------------------------------------------------
// Heartbeat slot: one ATS sector per host slot.
// ---------------------------------------------------------------------------------

pub const SLOT_FREE: u32 = 0;
pub const SLOT_LIVE: u32 = 1;
pub const SLOT_RECOVERING: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct HeartbeatSlot {
    pub magic: u32,
    pub crc: u32,
    pub slot: u32,
    pub state: u32,
    pub host_uuid: [u8; 16],
    pub generation: u32,
    pub recoverer_slot: u32,
    pub counter: u64,
    pub boot_id: [u8; 16],
    pub recoverer_uuid: [u8; 16],
    pub wall_clock_ms: u64,
    pub hostname: [u8; 64],
    pub owner_pid: u32,
    /// The owner's PID namespace (inode number of its /proc/self/ns/pid), which
    /// `owner_pid` belongs to; 0 when unknown (or written by an older atsfs).
    pub owner_pid_ns: u32,
    pub reserved: [u8; 352],
}
const _: () = assert!(size_of::<HeartbeatSlot>() == 512);

impl OnDisk for HeartbeatSlot {
    const MAGIC: u32 = magic(b"AHBT");
    const WHAT: &'static str = "heartbeat slot";
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if !matches!(self.state, SLOT_FREE | SLOT_LIVE | SLOT_RECOVERING) {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("slot {} has state {}", self.slot, self.state),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Mailbox: the ATS sector after each heartbeat slot. Other hosts post requests to
// release locks there; the slot's owner reads it and honours them.
// ---------------------------------------------------------------------------------

/// One request: "release `resource`, `from_slot` wants it in `mode`".
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct MailRequest {
    pub resource: u64,
    pub from_slot: u32,
    pub mode: u32,
}
const _: () = assert!(size_of::<MailRequest>() == 16);

/// Requests one mailbox holds.
pub const MAILBOX_REQUESTS_MAX: usize = 30;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct Mailbox {
    pub magic: u32,
    pub crc: u32,
    pub slot: u32,
    pub count: u32,
    pub change_seq: u64,
    /// Disk Paxos volumes: the generation of this slot a recoverer took over and
    /// `recovery_mark`, the random nonce of that recovery (0: none). A host whose
    /// renewal, written without the token, may have landed over the takeover reads
    /// it after each renewal (docs/locking.md, "Recovery of a Disk Paxos slot").
    pub recovered_gen: u32,
    pub recovery_mark: u32,
    pub requests: [MailRequest; MAILBOX_REQUESTS_MAX],
}
const _: () = assert!(size_of::<Mailbox>() == 512);

impl OnDisk for Mailbox {
    const MAGIC: u32 = magic(b"AMBX");
    const WHAT: &'static str = "mailbox";
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.count as usize > MAILBOX_REQUESTS_MAX {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("{} requests", self.count),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Lock record: the first ATS sector of every locked resource.
// ---------------------------------------------------------------------------------

pub const LOCK_FREE: u32 = 0;
pub const LOCK_EXCLUSIVE: u32 = 1;
pub const LOCK_SHARED: u32 = 2;
pub const LOCK_MULTI_WRITER: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct LockRecord {
    pub magic: u32,
    pub crc: u32,
    pub mode: u32,
    pub owner_slot: u32,
    pub owner_uuid: [u8; 16],
    pub owner_gen: u32,
    pub holders_count: u32,
    pub resource: u64,
    pub change_seq: u64,
    pub shared_slots: u64,
    pub shared_gen: [u32; 64],
    pub open_writer_slot: u32,
    pub open_writer_gen: u32,
    pub open_flags: u32,
    pub open_pad: u32,
    pub open_readers: u64,
    pub open_reader_gen: [u16; 64],
    pub reserved: [u8; 40],
}
const _: () = assert!(size_of::<LockRecord>() == 512);

/// `LockRecord::open_flags`: a host has the file open for writing (named by
/// `open_writer_slot` / `open_writer_gen`).
pub const OPEN_WRITER: u32 = 1;
const _: () = assert!(HOSTS_MAX as usize <= 64);

impl OnDisk for LockRecord {
    const MAGIC: u32 = magic(b"ALCK");
    const WHAT: &'static str = "lock record";
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.mode > LOCK_MULTI_WRITER {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("mode {}", self.mode),
            ));
        }
        if self.resource != block {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("lock names resource {}", self.resource),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Allocation group header: a locked resource at the start of each group.
// ---------------------------------------------------------------------------------

/// The group's bitmap block was never written: every block past the group's own
/// metadata is free. Lets mkfs skip writing bitmaps.
pub const AG_FLAG_BITMAP_UNINIT: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct AgHeader {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub ag_index: u64,
    pub start: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub flags: u32,
    pub bitmap_crc: u32,
    pub rotor: u64,
    pub reserved: [u8; 64],
}
const _: () = assert!(size_of::<AgHeader>() == 128);

impl OnDisk for AgHeader {
    const MAGIC: u32 = magic(b"AAGH");
    const WHAT: &'static str = "allocation group header";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.blocks == 0 || self.blocks > AG_BLOCKS || self.free_blocks > self.blocks {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("{} free of {} blocks", self.free_blocks, self.blocks),
            ));
        }
        if self.rotor >= self.blocks {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                "rotor past the group",
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Orphan table: a locked resource per slot, listing the inodes unlinked while that
// slot's host had them open (feature FEATURE_RO_COMPAT_ORPHAN_TABLES).
// ---------------------------------------------------------------------------------

/// Inode numbers one orphan table holds.
pub const ORPHAN_ENTRIES_MAX: usize = 444;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct OrphanTable {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub slot: u32,
    pub count: u32,
    pub reserved: [u8; 8],
    pub entries: [u64; ORPHAN_ENTRIES_MAX],
}
const _: () = assert!(size_of::<OrphanTable>() == RESOURCE_BODY_SIZE);

impl OnDisk for OrphanTable {
    const MAGIC: u32 = magic(b"AORP");
    const WHAT: &'static str = "orphan table";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.count as usize > ORPHAN_ENTRIES_MAX {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("{} entries", self.count),
            ));
        }
        Ok(())
    }
}

impl OrphanTable {
    /// The inodes listed.
    pub fn listed(&self) -> &[u64] {
        &self.entries[..(self.count as usize).min(ORPHAN_ENTRIES_MAX)]
    }
}

// ---------------------------------------------------------------------------------
// Inode: a locked resource. Inode number = its first block number.
// ---------------------------------------------------------------------------------

/// The inode's area holds a symlink target instead of extents.
pub const INODE_FLAG_INLINE: u32 = 1;
/// The inode's area holds index entries pointing at extent leaf blocks.
pub const INODE_FLAG_EXTENT_TREE: u32 = 2;
/// Opt-in multi-writer file: opened with direct I/O on every host.
pub const INODE_FLAG_MULTI_WRITER: u32 = 4;
/// The last image of a freed inode: its number is stale.
pub const INODE_FLAG_FREED: u32 = 8;

/// Deepest directory table: doubling to it rewrites 130 table blocks, which one
/// transaction holds; one more doubling would not fit.
pub const DIR_DEPTH_MAX: u32 = 16;

/// Bytes of the inode area (extents, directory table pointers or inline data).
pub const INODE_AREA_SIZE: usize = 3328;
/// Extents that fit in the inode area.
pub const INODE_EXTENTS_MAX: usize = INODE_AREA_SIZE / size_of::<Extent>();
/// Directory table pointers that fit in the inode area.
pub const INODE_DIR_PTRS_MAX: usize = INODE_AREA_SIZE / 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct InodeBody {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub generation: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub flags: u32,
    pub extent_count: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime_s: i64,
    pub mtime_s: i64,
    pub ctime_s: i64,
    pub crtime_s: i64,
    pub atime_ns: u32,
    pub mtime_ns: u32,
    pub ctime_ns: u32,
    pub crtime_ns: u32,
    pub rdev: u64,
    pub xattr_block: u64,
    pub parent: u64,
    pub dir_depth: u32,
    pub dir_table_blocks: u32,
    pub dir_entries: u64,
    pub dir_buckets: u64,
    pub orphan_slots: u64,
    pub reserved: [u8; 88],
    pub area: [u8; INODE_AREA_SIZE],
}
const _: () = assert!(size_of::<InodeBody>() == RESOURCE_BODY_SIZE);
const _: () = assert!(offset_of!(InodeBody, area) == 256);

impl OnDisk for InodeBody {
    const MAGIC: u32 = magic(b"AINO");
    const WHAT: &'static str = "inode";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        let kind = self.mode & libc::S_IFMT;
        let known = [
            libc::S_IFREG,
            libc::S_IFDIR,
            libc::S_IFLNK,
            libc::S_IFIFO,
            libc::S_IFSOCK,
            libc::S_IFCHR,
            libc::S_IFBLK,
        ];
        if !known.contains(&kind) {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("mode {:#o}", self.mode),
            ));
        }
        let limit = if self.flags & INODE_FLAG_INLINE != 0 {
            0
        } else {
            INODE_EXTENTS_MAX
        };
        if self.extent_count as usize > limit {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("{} extents in the inode", self.extent_count),
            ));
        }
        if self.flags & INODE_FLAG_INLINE != 0 && self.size as usize > INODE_AREA_SIZE {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                "inline data longer than the area",
            ));
        }
        if kind == libc::S_IFDIR {
            // The table has 2^depth pointers: inline while they fit the area, else in
            // exactly enough table blocks.
            let ok = self.dir_depth <= DIR_DEPTH_MAX && {
                let ptrs = 1usize << self.dir_depth;
                match self.dir_table_blocks as usize {
                    0 => ptrs <= INODE_DIR_PTRS_MAX,
                    n => n == ptrs.div_ceil(DIR_TABLE_PTRS) && n <= INODE_DIR_PTRS_MAX,
                }
            };
            if !ok {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    format!(
                        "directory depth {} with {} table blocks",
                        self.dir_depth, self.dir_table_blocks
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Extent flag: allocated but never written (fallocate); reads as zeros.
pub const EXTENT_UNWRITTEN: u32 = 1;

/// A run of file blocks mapped to a run of disk blocks. In an inode in tree mode the
/// same layout is an index entry: `file_block` is the first file block of the leaf,
/// `disk_block` the leaf block and `len` the number of extents in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct Extent {
    pub file_block: u64,
    pub disk_block: u64,
    pub len: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<Extent>() == 24);

// ---------------------------------------------------------------------------------
// Plain metadata blocks owned by one inode (protected by that inode's lock).
// ---------------------------------------------------------------------------------

/// Extents that fit in an extent leaf block.
pub const LEAF_EXTENTS_MAX: usize = 169;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct ExtentLeaf {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub owner: u64,
    pub count: u32,
    pub pad: u32,
    pub extents: [Extent; LEAF_EXTENTS_MAX],
    pub tail: [u8; 8],
}
const _: () = assert!(size_of::<ExtentLeaf>() == BLOCK_SIZE);

impl OnDisk for ExtentLeaf {
    const MAGIC: u32 = magic(b"AEXT");
    const WHAT: &'static str = "extent leaf";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.count as usize > LEAF_EXTENTS_MAX {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("{} extents", self.count),
            ));
        }
        Ok(())
    }
}

/// Bucket pointers in one directory table block.
pub const DIR_TABLE_PTRS: usize = 508;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct DirTableBlock {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub owner: u64,
    pub index: u32,
    pub pad: u32,
    pub ptrs: [u64; DIR_TABLE_PTRS],
}
const _: () = assert!(size_of::<DirTableBlock>() == BLOCK_SIZE);

impl OnDisk for DirTableBlock {
    const MAGIC: u32 = magic(b"ADTB");
    const WHAT: &'static str = "directory table block";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
}

/// Header of a directory bucket block; variable-size entries follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct DirBucketHeader {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub owner: u64,
    pub local_depth: u32,
    pub count: u32,
    pub used: u32,
    pub pad: u32,
    pub prefix: u64,
}
const _: () = assert!(size_of::<DirBucketHeader>() == 48);
/// Bytes for entries in a bucket block.
pub const DIR_BUCKET_AREA: usize = BLOCK_SIZE - size_of::<DirBucketHeader>();
/// Fixed part of a directory entry: hash u64, ino u64, kind u8, name_len u8.
pub const DIR_ENTRY_FIXED: usize = 18;

/// A directory bucket: header plus its entries area, as one block-sized struct so the
/// CRC covers the entries too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct DirBucket {
    pub header: DirBucketHeader,
    pub area: [u8; DIR_BUCKET_AREA],
}
const _: () = assert!(size_of::<DirBucket>() == BLOCK_SIZE);

impl OnDisk for DirBucket {
    const MAGIC: u32 = magic(b"ADIR");
    const WHAT: &'static str = "directory bucket";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.header.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.header.used as usize > DIR_BUCKET_AREA || self.header.local_depth > 63 {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!(
                    "{} bytes used, depth {}",
                    self.header.used, self.header.local_depth
                ),
            ));
        }
        // Walk the entries once so later parsing cannot run off the area.
        let mut pos = 0usize;
        let used = self.header.used as usize;
        for _ in 0..self.header.count {
            let Some(fixed) = self.area.get(pos..pos + DIR_ENTRY_FIXED) else {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    "entry runs past the area",
                ));
            };
            let name_len = fixed[17] as usize;
            if name_len == 0 || name_len > NAME_MAX {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    "entry with a bad name length",
                ));
            }
            pos += DIR_ENTRY_FIXED + name_len;
            if pos > used {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    "entry runs past the used bytes",
                ));
            }
        }
        if pos != used {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                "used bytes disagree with entries",
            ));
        }
        Ok(())
    }
}

/// Header of an extended attribute block; entries (name_len u8, value_len u16, name,
/// value) follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct XattrBlock {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub owner: u64,
    pub count: u32,
    pub used: u32,
    pub area: [u8; XATTR_AREA],
}
/// Bytes for entries in an xattr block.
pub const XATTR_AREA: usize = BLOCK_SIZE - 32;
const _: () = assert!(size_of::<XattrBlock>() == BLOCK_SIZE);
/// Fixed part of an xattr entry.
pub const XATTR_ENTRY_FIXED: usize = 3;

impl OnDisk for XattrBlock {
    const MAGIC: u32 = magic(b"AXAT");
    const WHAT: &'static str = "xattr block";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        let used = self.used as usize;
        if used > XATTR_AREA {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                "used past the area",
            ));
        }
        let mut pos = 0usize;
        for _ in 0..self.count {
            let Some(fixed) = self.area.get(pos..pos + XATTR_ENTRY_FIXED) else {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    "entry runs past the area",
                ));
            };
            let name_len = fixed[0] as usize;
            let value_len = u16::from_le_bytes([fixed[1], fixed[2]]) as usize;
            if name_len == 0 {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    "entry with an empty name",
                ));
            }
            pos += XATTR_ENTRY_FIXED + name_len + value_len;
            if pos > used {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    "entry runs past the used bytes",
                ));
            }
        }
        if pos != used {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                "used bytes disagree with entries",
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Journal: one per slot. Block 0 is the header; transactions follow.
// ---------------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct JournalHeader {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub slot: u32,
    pub pad: u32,
    pub tail_seq: u64,
    pub tail_block: u64,
    pub journal_blocks: u64,
    pub volume_uuid: [u8; 16],
    /// The life of the journal that wrote this header: every descriptor and commit
    /// record written since carries it, and replay accepts no other. 0: a journal
    /// no atsfs with life nonces has opened yet (mkfs, or an older atsfs).
    pub nonce: u64,
    pub reserved: [u8; 56],
}
const _: () = assert!(size_of::<JournalHeader>() == 128);

impl OnDisk for JournalHeader {
    const MAGIC: u32 = magic(b"AJHD");
    const WHAT: &'static str = "journal header";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.tail_block == 0 || self.tail_block >= self.journal_blocks {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("tail block {} of {}", self.tail_block, self.journal_blocks),
            ));
        }
        Ok(())
    }
}

/// One home write of a transaction: `len` bytes at byte `target` of the volume.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq, Default)]
pub struct JournalEntry {
    pub target: u64,
    pub len: u32,
    pub crc: u32,
}
const _: () = assert!(size_of::<JournalEntry>() == 16);

/// Entries one descriptor block holds: the most blocks one transaction can write.
pub const JOURNAL_DESC_ENTRIES: usize = 252;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct JournalDescriptor {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub seq: u64,
    pub count: u32,
    pub pad: u32,
    pub volume_uuid: [u8; 16],
    /// The header's nonce of the life that wrote this transaction.
    pub nonce: u64,
    pub reserved: [u8; 8],
    pub entries: [JournalEntry; JOURNAL_DESC_ENTRIES],
}
const _: () = assert!(size_of::<JournalDescriptor>() == BLOCK_SIZE);

impl OnDisk for JournalDescriptor {
    const MAGIC: u32 = magic(b"AJDS");
    const WHAT: &'static str = "journal descriptor";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.count == 0 || self.count as usize > JOURNAL_DESC_ENTRIES {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("{} entries", self.count),
            ));
        }
        for entry in &self.entries[..self.count as usize] {
            if entry.len == 0
                || entry.len as usize > BLOCK_SIZE
                || entry.len % 512 != 0
                || entry.target % 512 != 0
            {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    format!("entry of {} bytes at byte {}", entry.len, entry.target),
                ));
            }
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct JournalCommit {
    pub magic: u32,
    pub crc: u32,
    pub blockno: u64,
    pub seq: u64,
    pub count: u32,
    pub data_crc: u32,
    pub volume_uuid: [u8; 16],
    pub commit_unix_ms: u64,
    /// The header's nonce of the life that wrote this transaction.
    pub nonce: u64,
}
const _: () = assert!(size_of::<JournalCommit>() == 64);

impl OnDisk for JournalCommit {
    const MAGIC: u32 = magic(b"AJCM");
    const WHAT: &'static str = "journal commit";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
}

// ---------------------------------------------------------------------------------
// Disk Paxos region: the leader record, then one dblock per slot, one ATS sector each.
// ---------------------------------------------------------------------------------

/// `PaxosLeader::owner_slot` of a leader that names no owner (mkfs's first record).
pub const PAXOS_NO_OWNER: u32 = u32::MAX;
/// `PaxosLeader::flags`: the owner gave the token back; a taker need not wait.
pub const PAXOS_LEADER_RELEASED: u32 = 1;

/// The last decided instance of the volume's test-and-set token and who owns it.
/// Written by whoever decided or learned the instance (several hosts may write the
/// same decided value); a released record is written only by its owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct PaxosLeader {
    pub magic: u32,
    pub crc: u32,
    /// The region's first block (`paxos_start`): where the record belongs.
    pub blockno: u64,
    /// The instance this record tells the owner of; 0 before the first.
    pub lver: u64,
    pub owner_slot: u32,
    pub owner_gen: u32,
    pub flags: u32,
    /// The slot that wrote this record (informational).
    pub writer_slot: u32,
    pub reserved: [u8; 472],
}
const _: () = assert!(size_of::<PaxosLeader>() == 512);

impl OnDisk for PaxosLeader {
    const MAGIC: u32 = magic(b"APXL");
    const WHAT: &'static str = "Disk Paxos leader record";
    fn self_block(&self) -> Option<BlockNo> {
        Some(self.blockno)
    }
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        if self.owner_slot != PAXOS_NO_OWNER && self.owner_slot >= HOSTS_MAX {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("owner slot {}", self.owner_slot),
            ));
        }
        if self.flags & !PAXOS_LEADER_RELEASED != 0 {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("flags {:#x}", self.flags),
            ));
        }
        Ok(())
    }
}

/// One slot's Disk Paxos block: written only by the owner of that slot. All zeros
/// (mkfs) is a slot that never took part.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable, PartialEq, Eq)]
pub struct PaxosDblock {
    pub magic: u32,
    pub crc: u32,
    /// The slot this block belongs to (must match its position).
    pub slot: u32,
    /// Generation of the slot's owner that wrote it (informational).
    pub owner_gen: u32,
    /// The instance `mbal`, `bal` and `inp` are about.
    pub lver: u64,
    /// The highest ballot this slot started or joined for `lver`.
    pub mbal: u64,
    /// The ballot in which `inp` was accepted; 0 = none.
    pub bal: u64,
    /// The accepted value: the token's owner for `lver`, by slot and generation.
    pub inp_slot: u32,
    pub inp_gen: u32,
    pub reserved: [u8; 464],
}
const _: () = assert!(size_of::<PaxosDblock>() == 512);

impl OnDisk for PaxosDblock {
    const MAGIC: u32 = magic(b"APXD");
    const WHAT: &'static str = "Disk Paxos dblock";
    fn validate_fields(&self, block: BlockNo) -> Result<(), FormatError> {
        let bad = |reason: String| Err(FormatError::corrupted(Self::WHAT, block, reason));
        if self.slot >= HOSTS_MAX {
            return bad(format!("slot {}", self.slot));
        }
        if self.bal > self.mbal {
            return bad(format!(
                "ballot {} accepted above ballot {}",
                self.bal, self.mbal
            ));
        }
        if self.bal != 0 && self.inp_slot >= HOSTS_MAX {
            return bad(format!("accepted owner slot {}", self.inp_slot));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Layout tables, for the doc test.
// ---------------------------------------------------------------------------------

/// One row of a struct's byte table: field name, byte offset, size in bytes.
pub type LayoutRow = (&'static str, usize, usize);

macro_rules! layout {
    ($ty:ty { $($field:ident),* $(,)? }) => {{
        let value: $ty = bytemuck::Zeroable::zeroed();
        let _ = &value;
        vec![$((
            stringify!($field),
            offset_of!($ty, $field),
            size_of_field(&value.$field),
        )),*]
    }};
}

fn size_of_field<T>(_: &T) -> usize {
    size_of::<T>()
}

/// Every on-disk struct's name, size and field table, as `docs/format.md` lists them.
pub fn layout_tables() -> Vec<(&'static str, usize, Vec<LayoutRow>)> {
    vec![
        (
            "Superblock",
            size_of::<Superblock>(),
            layout!(Superblock {
                magic,
                crc,
                version,
                ats_mode,
                feature_compat,
                feature_incompat,
                feature_ro_compat,
                volume_uuid,
                label,
                block_size,
                ats_sector_size,
                max_hosts,
                resource_blocks,
                heartbeat_interval_ms,
                lease_ms,
                total_blocks,
                hb_start,
                hb_blocks,
                journal_start,
                journal_blocks,
                ag_start,
                ag_count,
                root_ino,
                created_unix_s,
                self_block,
                dir_hash_seed,
                orphan_start,
                paxos_start,
                paxos_token_ms,
                paxos_pad,
                reserved
            }),
        ),
        (
            "HeartbeatSlot",
            size_of::<HeartbeatSlot>(),
            layout!(HeartbeatSlot {
                magic,
                crc,
                slot,
                state,
                host_uuid,
                generation,
                recoverer_slot,
                counter,
                boot_id,
                recoverer_uuid,
                wall_clock_ms,
                hostname,
                owner_pid,
                owner_pid_ns,
                reserved
            }),
        ),
        (
            "PaxosLeader",
            size_of::<PaxosLeader>(),
            layout!(PaxosLeader {
                magic,
                crc,
                blockno,
                lver,
                owner_slot,
                owner_gen,
                flags,
                writer_slot,
                reserved
            }),
        ),
        (
            "PaxosDblock",
            size_of::<PaxosDblock>(),
            layout!(PaxosDblock {
                magic,
                crc,
                slot,
                owner_gen,
                lver,
                mbal,
                bal,
                inp_slot,
                inp_gen,
                reserved
            }),
        ),
        (
            "MailRequest",
            size_of::<MailRequest>(),
            layout!(MailRequest {
                resource,
                from_slot,
                mode
            }),
        ),
        (
            "Mailbox",
            size_of::<Mailbox>(),
            layout!(Mailbox {
                magic,
                crc,
                slot,
                count,
                change_seq,
                recovered_gen,
                recovery_mark,
                requests
            }),
        ),
        (
            "LockRecord",
            size_of::<LockRecord>(),
            layout!(LockRecord {
                magic,
                crc,
                mode,
                owner_slot,
                owner_uuid,
                owner_gen,
                holders_count,
                resource,
                change_seq,
                shared_slots,
                shared_gen,
                open_writer_slot,
                open_writer_gen,
                open_flags,
                open_pad,
                open_readers,
                open_reader_gen,
                reserved
            }),
        ),
        (
            "AgHeader",
            size_of::<AgHeader>(),
            layout!(AgHeader {
                magic,
                crc,
                blockno,
                ag_index,
                start,
                blocks,
                free_blocks,
                flags,
                bitmap_crc,
                rotor,
                reserved
            }),
        ),
        (
            "OrphanTable",
            size_of::<OrphanTable>(),
            layout!(OrphanTable {
                magic,
                crc,
                blockno,
                slot,
                count,
                reserved,
                entries
            }),
        ),
        (
            "InodeBody",
            size_of::<InodeBody>(),
            layout!(InodeBody {
                magic,
                crc,
                blockno,
                generation,
                mode,
                uid,
                gid,
                nlink,
                flags,
                extent_count,
                size,
                blocks,
                atime_s,
                mtime_s,
                ctime_s,
                crtime_s,
                atime_ns,
                mtime_ns,
                ctime_ns,
                crtime_ns,
                rdev,
                xattr_block,
                parent,
                dir_depth,
                dir_table_blocks,
                dir_entries,
                dir_buckets,
                orphan_slots,
                reserved,
                area
            }),
        ),
        (
            "Extent",
            size_of::<Extent>(),
            layout!(Extent {
                file_block,
                disk_block,
                len,
                flags
            }),
        ),
        (
            "ExtentLeaf",
            size_of::<ExtentLeaf>(),
            layout!(ExtentLeaf {
                magic,
                crc,
                blockno,
                owner,
                count,
                pad,
                extents,
                tail
            }),
        ),
        (
            "DirTableBlock",
            size_of::<DirTableBlock>(),
            layout!(DirTableBlock {
                magic,
                crc,
                blockno,
                owner,
                index,
                pad,
                ptrs
            }),
        ),
        (
            "DirBucketHeader",
            size_of::<DirBucketHeader>(),
            layout!(DirBucketHeader {
                magic,
                crc,
                blockno,
                owner,
                local_depth,
                count,
                used,
                pad,
                prefix
            }),
        ),
        (
            "XattrBlock",
            size_of::<XattrBlock>(),
            layout!(XattrBlock {
                magic,
                crc,
                blockno,
                owner,
                count,
                used,
                area
            }),
        ),
        (
            "JournalHeader",
            size_of::<JournalHeader>(),
            layout!(JournalHeader {
                magic,
                crc,
                blockno,
                slot,
                pad,
                tail_seq,
                tail_block,
                journal_blocks,
                volume_uuid,
                nonce,
                reserved
            }),
        ),
        (
            "JournalEntry",
            size_of::<JournalEntry>(),
            layout!(JournalEntry { target, len, crc }),
        ),
        (
            "JournalDescriptor",
            size_of::<JournalDescriptor>(),
            layout!(JournalDescriptor {
                magic,
                crc,
                blockno,
                seq,
                count,
                pad,
                volume_uuid,
                nonce,
                reserved,
                entries
            }),
        ),
        (
            "JournalCommit",
            size_of::<JournalCommit>(),
            layout!(JournalCommit {
                magic,
                crc,
                blockno,
                seq,
                count,
                data_crc,
                volume_uuid,
                commit_unix_ms,
                nonce
            }),
        ),
    ]
}
