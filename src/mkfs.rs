//! mkfs: lay out a fresh volume on a LUN, and look at what a LUN holds before that.
//!
//! `mkfs` initialises metadata only, never data blocks, so a large sparse LUN is
//! formatted in about one write per allocation group. The order of its writes:
//!
//! 1. clear the old primary superblock, the old backup and the first MiB (other
//!    filesystems' signatures), then flush;
//! 2. heartbeat slots, journal headers (and each journal's block 1), every slot's
//!    empty orphan table, allocation group headers (AG 0 with a real bitmap), the root directory's inode and bucket, the
//!    backup superblock; flush;
//! 3. the primary superblock; flush.
//!
//! The primary superblock is what makes a volume mountable, and it lands only after
//! everything it describes is durable, so an interrupted mkfs never leaves a volume
//! that looks valid but is not.
//!
//! Caller's duty: no host may be using the LUN (see `live_hosts`). mkfs writes with
//! plain writes, which a host's compare-and-write does not expect.

use crate::format::{
    encode_padded, put_str, AgHeader, DirBucket, FormatError, Geometry, GeometryError,
    HeartbeatSlot, InodeBody, JournalHeader, MkfsParams, OnDisk, OrphanTable, PaxosLeader,
    Superblock, AG_BLOCKS, ATS_MODE_DISK_PAXOS, ATS_MODE_EMULATED, ATS_MODE_HARDWARE, BLOCK_SIZE,
    BLOCK_SIZE_U64, FEATURE_INCOMPAT_DISK_PAXOS, FEATURE_RO_COMPAT_ORPHAN_TABLES, FORMAT_VERSION,
    PAXOS_LEADER_RELEASED, PAXOS_NO_OWNER, SLOT_FREE, SLOT_LIVE,
};
use crate::lun::{Lun, LunError};
use crate::units::format_size;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// Shortest heartbeat interval: below this, ordinary I/O latency would look like a
/// missed heartbeat.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Longest lease: a dead host's locks stay held this long, and tools wait this long.
pub const LEASE_MAX: Duration = Duration::from_secs(600);
/// Longest label in bytes (the field keeps a terminating zero).
pub const LABEL_BYTES_MAX: usize = 63;
/// Bytes at the start of the device that mkfs clears, so that no other filesystem's
/// signature survives there (btrfs keeps its superblock at 64 KiB, for example).
const WIPE_HEAD_BYTES: u64 = 1 << 20;
/// Bytes at the start of the device that `probe` reads: every signature it knows
/// lies inside.
const PROBE_HEAD_BYTES: u64 = 128 * 1024;

/// What to make. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MkfsOptions {
    pub label: String,
    pub max_hosts: u32,
    /// Journal size per host in bytes (a multiple of 4 KiB); `None` picks one from
    /// the volume size.
    pub journal_bytes: Option<u64>,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
    /// `ATS_MODE_EMULATED`, `ATS_MODE_HARDWARE` or `ATS_MODE_DISK_PAXOS`. The
    /// library's default is emulated, for in-process tests on one kernel;
    /// `mkfs.atsfs` chooses from the device (`--ats auto`: hardware or Disk Paxos).
    pub ats_mode: u32,
    /// `None` draws a random (v4) UUID.
    pub volume_uuid: Option<[u8; 16]>,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            label: String::new(),
            max_hosts: 32,
            journal_bytes: None,
            heartbeat_interval: Duration::from_secs(1),
            lease: Duration::from_secs(8),
            ats_mode: ATS_MODE_EMULATED,
            volume_uuid: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum MkfsError {
    #[error(
        "the device is too small: it has {}, this layout needs at least {} \
         (use fewer hosts with -N, a smaller --journal-size, or a larger device)",
        format_size(*.have),
        format_size(*.need)
    )]
    TooSmall { have: u64, need: u64 },
    #[error("{0}")]
    BadOption(String),
    #[error("{0}; check the device (permissions, dmesg, the path to the storage) and run mkfs.atsfs again")]
    Io(#[from] LunError),
    #[error("the volume's superblock describes an impossible layout ({0}); run fsck.atsfs")]
    BadGeometry(String),
    /// The device holds something a tool must not write to (refused input).
    #[error("{0}")]
    Refused(String),
}

impl MkfsError {
    /// True for failures of the device itself (as opposed to refused input).
    pub fn is_io(&self) -> bool {
        matches!(self, MkfsError::Io(_))
    }
}

impl From<GeometryError> for MkfsError {
    fn from(err: GeometryError) -> Self {
        match err {
            GeometryError::TooSmall { have, need } => MkfsError::TooSmall { have, need },
            other => MkfsError::BadOption(other.to_string()),
        }
    }
}

/// Checks options that do not depend on the device. `mkfs` calls it too; tools call
/// it first to refuse bad input before touching anything.
pub fn validate_options(opts: &MkfsOptions) -> Result<(), MkfsError> {
    let bad = |msg: String| Err(MkfsError::BadOption(msg));
    if opts.label.len() > LABEL_BYTES_MAX || opts.label.contains('\0') {
        return bad(format!(
            "the label {:?} is {} bytes; the most is {LABEL_BYTES_MAX} bytes without NUL characters",
            opts.label,
            opts.label.len()
        ));
    }
    let interval = opts.heartbeat_interval;
    if interval < HEARTBEAT_INTERVAL_MIN {
        return bad(format!(
            "the heartbeat interval {interval:?} is too short: use at least {HEARTBEAT_INTERVAL_MIN:?}"
        ));
    }
    let twice = interval.saturating_mul(2);
    if opts.lease <= twice || opts.lease > LEASE_MAX {
        return bad(format!(
            "the lease {:?} must be longer than twice the heartbeat interval ({twice:?}) and at most {LEASE_MAX:?}",
            opts.lease
        ));
    }
    if !matches!(
        opts.ats_mode,
        ATS_MODE_EMULATED | ATS_MODE_HARDWARE | ATS_MODE_DISK_PAXOS
    ) {
        return bad(format!("unknown ATS mode {}", opts.ats_mode));
    }
    if let Some(bytes) = opts.journal_bytes {
        if bytes % BLOCK_SIZE_U64 != 0 {
            return bad(format!(
                "the journal size {bytes} bytes is not a multiple of 4 KiB (e.g. use 64M)"
            ));
        }
    }
    if opts.volume_uuid == Some([0; 16]) {
        return bad("the volume UUID must not be the nil UUID".into());
    }
    Ok(())
}

/// Plans the layout `mkfs` would make on `lun` (nothing is written).
pub fn plan(lun: &dyn Lun, opts: &MkfsOptions) -> Result<Geometry, MkfsError> {
    plan_for(lun.len_bytes(), lun.sector_size(), opts)
}

/// Plans the layout `mkfs` would make on a device of `total_bytes` with ATS sectors
/// of `ats_sector_size` bytes: lets a tool refuse bad input before it creates an image.
pub fn plan_for(
    total_bytes: u64,
    ats_sector_size: u32,
    opts: &MkfsOptions,
) -> Result<Geometry, MkfsError> {
    validate_options(opts)?;
    let geo = Geometry::plan(&MkfsParams {
        total_bytes,
        ats_sector_size,
        max_hosts: opts.max_hosts,
        journal_blocks: opts.journal_bytes.map(|bytes| bytes / BLOCK_SIZE_U64),
        disk_paxos: opts.ats_mode == ATS_MODE_DISK_PAXOS,
    })?;
    // A planned geometry that its own check refuses is a bug of the planner; refuse
    // to write it rather than make a volume no host will mount.
    geo.check().map_err(|e| {
        MkfsError::BadOption(format!(
            "internal error: the planned layout fails its own check ({e}); please report this bug"
        ))
    })?;
    Ok(geo)
}

/// Makes a fresh volume on `lun`. `progress(done, total)` is called as allocation
/// groups are written. Returns the layout it made.
pub fn mkfs(
    lun: &dyn Lun,
    opts: &MkfsOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Geometry, MkfsError> {
    let geo = plan(lun, opts)?;
    let now = unix_now();
    let primary = build_superblock(&geo, opts, now.as_secs());
    tracing::info!(?geo, device = %lun.describe(), "mkfs: layout planned");

    wipe_old_signatures(lun, &geo)?;
    lun.flush()?;
    write_heartbeat_slots(lun, &geo)?;
    write_paxos_region(lun, &geo)?;
    write_journals(lun, &geo, primary.volume_uuid)?;
    write_orphan_tables(lun, &geo)?;
    write_ag_headers(lun, &geo, progress)?;
    write_root_directory(lun, &geo, primary.root_ino, now)?;

    let mut backup = primary;
    backup.self_block = geo.backup_superblock();
    write_superblock(lun, backup)?;
    lun.flush()?;
    // The volume becomes valid here: everything the superblock describes is durable.
    write_superblock(lun, primary)?;
    lun.flush()?;
    tracing::info!("mkfs: done");
    Ok(geo)
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// The root directory's inode number: the first block of AG 0 past the group's own
/// metadata.
pub fn root_ino(geo: &Geometry) -> u64 {
    geo.ag_first(0) + geo.ag_meta_blocks()
}

/// The root directory's single bucket: the block right after the inode resource.
pub fn root_bucket(geo: &Geometry) -> u64 {
    root_ino(geo) + u64::from(geo.resource_blocks)
}

/// Blocks at the start of AG 0 in use after mkfs: the group's metadata, the root
/// inode and its bucket.
pub fn ag0_used_blocks(geo: &Geometry) -> u64 {
    root_bucket(geo) + 1 - geo.ag_first(0)
}

fn build_superblock(geo: &Geometry, opts: &MkfsOptions, created_unix_s: u64) -> Superblock {
    let mut sb: Superblock = bytemuck::Zeroable::zeroed();
    sb.magic = Superblock::MAGIC;
    sb.version = FORMAT_VERSION;
    sb.ats_mode = opts.ats_mode;
    sb.volume_uuid = opts
        .volume_uuid
        .unwrap_or_else(|| *uuid::Uuid::new_v4().as_bytes());
    put_str(&mut sb.label, &opts.label);
    sb.block_size = BLOCK_SIZE as u32;
    sb.ats_sector_size = geo.ats_sector_size;
    sb.max_hosts = geo.max_hosts;
    sb.resource_blocks = geo.resource_blocks;
    // validate_options bounds both by LEASE_MAX, far below u32::MAX ms.
    sb.heartbeat_interval_ms = opts.heartbeat_interval.as_millis() as u32;
    sb.lease_ms = opts.lease.as_millis() as u32;
    sb.total_blocks = geo.total_blocks;
    sb.hb_start = geo.hb_start;
    sb.hb_blocks = geo.hb_blocks;
    sb.journal_start = geo.journal_start;
    sb.journal_blocks = geo.journal_blocks;
    sb.ag_start = geo.ag_start;
    sb.ag_count = geo.ag_count;
    sb.root_ino = root_ino(geo);
    sb.created_unix_s = created_unix_s;
    sb.self_block = 0;
    sb.dir_hash_seed = rand::random::<u64>();
    sb.orphan_start = geo.orphan_start;
    sb.feature_ro_compat |= FEATURE_RO_COMPAT_ORPHAN_TABLES;
    if geo.paxos_start != 0 {
        sb.paxos_start = geo.paxos_start;
        sb.paxos_token_ms = paxos_token_ms(sb.lease_ms);
        sb.feature_incompat |= FEATURE_INCOMPAT_DISK_PAXOS;
    }
    sb
}

/// The Disk Paxos token's lease: twice the volume's io_timeout, which is an eighth of
/// the host lease (sanlock's `host_dead_seconds` is 8 io_timeouts): 2 s with the
/// default 8 s lease. docs/locking.md, "Timing: one io_timeout".
fn paxos_token_ms(lease_ms: u32) -> u32 {
    (lease_ms / 4).max(2)
}

/// The Disk Paxos region: a leader record that names no owner and is released, and
/// every dblock zero (never used), in one write.
fn write_paxos_region(lun: &dyn Lun, geo: &Geometry) -> Result<(), MkfsError> {
    if geo.paxos_start == 0 {
        return Ok(());
    }
    let sector = geo.ats_sector_size as usize;
    let mut leader: PaxosLeader = bytemuck::Zeroable::zeroed();
    leader.magic = PaxosLeader::MAGIC;
    leader.blockno = geo.paxos_start;
    leader.owner_slot = PAXOS_NO_OWNER;
    leader.writer_slot = PAXOS_NO_OWNER;
    leader.flags = PAXOS_LEADER_RELEASED;
    leader.seal();
    let mut region = vec![0u8; (geo.paxos_blocks() * BLOCK_SIZE_U64) as usize];
    region[..sector].copy_from_slice(&encode_padded(&leader, sector));
    lun.write_at(&region, geo.paxos_leader_offset())?;
    Ok(())
}

/// Clears the old primary and backup superblocks (of any size of old volume that
/// ended where this one ends), the first MiB, and the bytes past the last block.
fn wipe_old_signatures(lun: &dyn Lun, geo: &Geometry) -> Result<(), MkfsError> {
    let head = WIPE_HEAD_BYTES.min(geo.ag_start * BLOCK_SIZE_U64);
    lun.write_at(&vec![0u8; head as usize], 0)?;
    let last = geo.backup_superblock() * BLOCK_SIZE_U64;
    let tail = lun.len_bytes() - last;
    if tail % u64::from(geo.ats_sector_size) == 0 {
        lun.write_at(&vec![0u8; tail as usize], last)?;
    } else {
        lun.write_at(&[0u8; BLOCK_SIZE], last)?;
    }
    Ok(())
}

/// Every slot free, generation 0, every mailbox empty, in one write of the whole
/// heartbeat region.
fn write_heartbeat_slots(lun: &dyn Lun, geo: &Geometry) -> Result<(), MkfsError> {
    let sector = geo.ats_sector_size as usize;
    let mut region = vec![0u8; (geo.hb_blocks * BLOCK_SIZE_U64) as usize];
    for slot in 0..geo.max_hosts {
        let mut hb: HeartbeatSlot = bytemuck::Zeroable::zeroed();
        hb.magic = HeartbeatSlot::MAGIC;
        hb.slot = slot;
        hb.state = SLOT_FREE;
        hb.seal();
        // Heartbeat sectors are at their geometry offsets; mailboxes stay all zero (empty).
        let at = (geo.slot_offset(slot) - geo.hb_start * BLOCK_SIZE_U64) as usize;
        region[at..at + sector].copy_from_slice(&encode_padded(&hb, sector));
    }
    lun.write_at(&region, geo.hb_start * BLOCK_SIZE_U64)?;
    Ok(())
}

/// Each slot's journal: an empty header (tail at block 1, seq 1) and a zeroed block 1,
/// so that no transaction of an older filesystem can be replayed.
fn write_journals(lun: &dyn Lun, geo: &Geometry, volume_uuid: [u8; 16]) -> Result<(), MkfsError> {
    for slot in 0..geo.max_hosts {
        let start = geo.journal_of(slot);
        let mut header: JournalHeader = bytemuck::Zeroable::zeroed();
        header.magic = JournalHeader::MAGIC;
        header.blockno = start;
        header.slot = slot;
        header.tail_seq = 1;
        header.tail_block = 1;
        header.journal_blocks = geo.journal_blocks;
        header.volume_uuid = volume_uuid;
        header.seal();
        let mut run = encode_padded(&header, BLOCK_SIZE);
        run.resize(2 * BLOCK_SIZE, 0);
        lun.write_at(&run, start * BLOCK_SIZE_U64)?;
    }
    Ok(())
}

/// Every slot's orphan table, empty (free lock sector), in one write of the region.
fn write_orphan_tables(lun: &dyn Lun, geo: &Geometry) -> Result<(), MkfsError> {
    let mut region = Vec::new();
    for slot in 0..geo.max_hosts {
        let Some(block) = geo.orphan_table(slot) else {
            return Ok(());
        };
        let mut table: OrphanTable = bytemuck::Zeroable::zeroed();
        table.magic = OrphanTable::MAGIC;
        table.blockno = block;
        table.slot = slot;
        table.seal();
        region.extend_from_slice(&resource_image(geo, &table));
    }
    lun.write_at(&region, geo.orphan_start * BLOCK_SIZE_U64)?;
    Ok(())
}

/// A whole resource (lock sector, then body, zero padded): one write.
fn resource_image<T: OnDisk>(geo: &Geometry, body: &T) -> Vec<u8> {
    let sector = geo.ats_sector_size as usize;
    let mut image = vec![0u8; geo.resource_blocks as usize * BLOCK_SIZE];
    // image[..sector] stays zero: an all-zero lock sector is a free lock.
    let bytes = bytemuck::bytes_of(body);
    image[sector..sector + bytes.len()].copy_from_slice(bytes);
    image
}

/// Every group's header resource; AG 0 also gets its bitmap.
fn write_ag_headers(
    lun: &dyn Lun,
    geo: &Geometry,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), MkfsError> {
    progress(0, geo.ag_count);
    let bitmap = ag0_bitmap(geo);
    let mut header0 = ag_header(geo, 0);
    header0.flags = 0;
    header0.bitmap_crc = crc32fast::hash(&bitmap);
    header0.free_blocks = geo.ag_len(0) - ag0_used_blocks(geo);
    header0.rotor = ag0_used_blocks(geo);
    header0.seal();
    lun.write_at(&bitmap, geo.ag_bitmap(0) * BLOCK_SIZE_U64)?;
    lun.write_at(
        &resource_image(geo, &header0),
        geo.lock_offset(geo.ag_header(0)),
    )?;
    progress(1, geo.ag_count);
    for ag in 1..geo.ag_count {
        let mut header = ag_header(geo, ag);
        header.seal();
        lun.write_at(
            &resource_image(geo, &header),
            geo.lock_offset(geo.ag_header(ag)),
        )?;
        progress(ag + 1, geo.ag_count);
    }
    Ok(())
}

/// A group header as mkfs leaves it: bitmap never written, only the group's own
/// metadata in use.
fn ag_header(geo: &Geometry, ag: u64) -> AgHeader {
    let blocks = geo.ag_len(ag);
    let mut header: AgHeader = bytemuck::Zeroable::zeroed();
    header.magic = AgHeader::MAGIC;
    header.blockno = geo.ag_header(ag);
    header.ag_index = ag;
    header.start = geo.ag_first(ag);
    header.blocks = blocks;
    header.free_blocks = blocks - geo.ag_meta_blocks();
    header.flags = crate::format::AG_FLAG_BITMAP_UNINIT;
    header.rotor = geo.ag_meta_blocks();
    header
}

/// AG 0's bitmap: bit i (LSB first) set when block `ag_first + i` is in use. Bits for
/// blocks past the group's end are set too, so a scan never hands them out.
fn ag0_bitmap(geo: &Geometry) -> Vec<u8> {
    let mut bitmap = vec![0u8; BLOCK_SIZE];
    let used = ag0_used_blocks(geo);
    let end = geo.ag_len(0);
    for bit in (0..used).chain(end..AG_BLOCKS) {
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
    bitmap
}

/// The root directory: an inode resource whose inline table points at one empty
/// bucket.
fn write_root_directory(
    lun: &dyn Lun,
    geo: &Geometry,
    ino: u64,
    now: Duration,
) -> Result<(), MkfsError> {
    let bucket_block = root_bucket(geo);
    let mut inode = root_inode(geo, ino, bucket_block, now);
    inode.seal();
    lun.write_at(&resource_image(geo, &inode), geo.lock_offset(ino))?;

    let mut bucket: DirBucket = bytemuck::Zeroable::zeroed();
    bucket.header.magic = DirBucket::MAGIC;
    bucket.header.blockno = bucket_block;
    bucket.header.owner = ino;
    bucket.seal();
    lun.write_at(bytemuck::bytes_of(&bucket), bucket_block * BLOCK_SIZE_U64)?;
    Ok(())
}

fn root_inode(geo: &Geometry, ino: u64, bucket_block: u64, now: Duration) -> InodeBody {
    let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let nanos = now.subsec_nanos();
    let mut inode: InodeBody = bytemuck::Zeroable::zeroed();
    inode.magic = InodeBody::MAGIC;
    inode.blockno = ino;
    inode.generation = 1;
    inode.mode = libc::S_IFDIR | 0o755;
    inode.nlink = 2;
    inode.size = BLOCK_SIZE_U64;
    inode.blocks = 1 + u64::from(geo.resource_blocks);
    (inode.atime_s, inode.mtime_s, inode.ctime_s, inode.crtime_s) = (secs, secs, secs, secs);
    (
        inode.atime_ns,
        inode.mtime_ns,
        inode.ctime_ns,
        inode.crtime_ns,
    ) = (nanos, nanos, nanos, nanos);
    inode.parent = ino;
    inode.dir_buckets = 1;
    // Depth 0: a table of one bucket pointer, held inline in the area.
    inode.area[..8].copy_from_slice(&bucket_block.to_le_bytes());
    inode
}

fn write_superblock(lun: &dyn Lun, mut sb: Superblock) -> Result<(), MkfsError> {
    sb.seal();
    lun.write_at(
        &encode_padded(&sb, BLOCK_SIZE),
        sb.self_block * BLOCK_SIZE_U64,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Probing what a device holds.
// ---------------------------------------------------------------------------------

/// What a device holds now.
// Made once per mkfs or mount; a boxed superblock would only make matching clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Nothing recognised (all zeros, or bytes of no known format).
    Empty,
    /// An atsfs volume. `from_backup` when the primary superblock is damaged or
    /// missing and the backup in the device's last block is valid (an interrupted
    /// mkfs leaves this too).
    Atsfs {
        superblock: Superblock,
        from_backup: bool,
    },
    /// Another filesystem, volume manager or partition table.
    Other(&'static str),
}

/// Looks at the start (and, for atsfs, the end) of the device. Reads only.
pub fn probe(lun: &dyn Lun) -> Result<Probe, MkfsError> {
    let sector = u64::from(lun.sector_size().max(1));
    let head_len = PROBE_HEAD_BYTES.min(lun.len_bytes()) / sector * sector;
    let mut head = vec![0u8; head_len as usize];
    lun.read_at(&mut head, 0)?;
    if let Ok(superblock) = Superblock::decode(&head, 0) {
        return Ok(Probe::Atsfs {
            superblock,
            from_backup: false,
        });
    }
    if let Some(name) = foreign_signature(&head) {
        return Ok(Probe::Other(name));
    }
    if let Some(superblock) = read_backup_superblock(lun)? {
        return Ok(Probe::Atsfs {
            superblock,
            from_backup: true,
        });
    }
    if Superblock::has_magic(&head) {
        return Ok(Probe::Other(
            "atsfs with a damaged or newer-version superblock",
        ));
    }
    Ok(Probe::Empty)
}

/// The superblock in the device's last whole block, if it is a valid one.
fn read_backup_superblock(lun: &dyn Lun) -> Result<Option<Superblock>, MkfsError> {
    let blocks = lun.len_bytes() / BLOCK_SIZE_U64;
    if blocks < 2 {
        return Ok(None);
    }
    let last = blocks - 1;
    let mut block = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut block, last * BLOCK_SIZE_U64)?;
    Ok(Superblock::decode(&block, last)
        .ok()
        .filter(|sb| sb.total_blocks == blocks))
}

/// `bytes` at `offset` of `head`, if `head` is long enough to hold them.
fn has_at(head: &[u8], offset: usize, bytes: &[u8]) -> bool {
    head.get(offset..offset + bytes.len()) == Some(bytes)
}

/// The name of the first known foreign signature in the device's first bytes.
pub fn foreign_signature(head: &[u8]) -> Option<&'static str> {
    let sig = |offset: usize, bytes: &[u8]| has_at(head, offset, bytes);
    if sig(0, b"LUKS\xba\xbe") {
        return Some("LUKS encrypted volume");
    }
    if sig(0, b"XFSB") {
        return Some("XFS filesystem");
    }
    if sig(65600, b"_BHRfS_M") {
        return Some("btrfs filesystem");
    }
    if sig(4086, b"SWAPSPACE2") || sig(4086, b"SWAP-SPACE") {
        return Some("Linux swap space");
    }
    if [0, 512, 1024, 1536].iter().any(|&at| sig(at, b"LABELONE")) {
        return Some("LVM2 physical volume");
    }
    if sig(0, &MD_MAGIC) || sig(4096, &MD_MAGIC) {
        return Some("Linux MD RAID member");
    }
    if sig(512, b"EFI PART") || sig(4096, b"EFI PART") {
        return Some("GPT partition table");
    }
    if sig(32769, b"CD001") {
        return Some("ISO 9660 filesystem");
    }
    if sig(1080, &[0x53, 0xEF]) {
        return Some("ext2/ext3/ext4 filesystem");
    }
    if sig(3, b"NTFS    ") {
        return Some("NTFS filesystem");
    }
    if sig(54, b"FAT") || sig(82, b"FAT") {
        return Some("FAT filesystem");
    }
    if sig(510, &[0x55, 0xAA]) && mbr_has_partition(head) {
        return Some("MBR partition table");
    }
    None
}

/// Linux MD superblock v1.x magic 0xa92b4efc, little endian.
const MD_MAGIC: [u8; 4] = [0xfc, 0x4e, 0x2b, 0xa9];

/// True when one of the four MBR partition entries (16 bytes each from byte 446)
/// has a partition type.
fn mbr_has_partition(head: &[u8]) -> bool {
    (0..4).any(|i| head.get(446 + 16 * i + 4).is_some_and(|&kind| kind != 0))
}

// ---------------------------------------------------------------------------------
// Hosts using a volume.
// ---------------------------------------------------------------------------------

/// Slots whose heartbeat moved during `wait` and that are marked live: hosts using
/// the volume now. Sleeps for `wait`.
pub fn live_hosts(lun: &dyn Lun, sb: &Superblock, wait: Duration) -> Result<Vec<u32>, MkfsError> {
    let geo = checked_geometry(sb)?;
    let before = read_slots(lun, &geo)?;
    std::thread::sleep(wait);
    let after = read_slots(lun, &geo)?;
    let live = before
        .iter()
        .zip(&after)
        .enumerate()
        .filter(|(_, (old, new))| match new {
            Some(new) => new.state == SLOT_LIVE && heartbeat_moved(old.as_ref(), new),
            None => false,
        })
        .map(|(slot, _)| slot as u32)
        .collect();
    Ok(live)
}

/// Slots marked live right now, moving or not (a host that crashed without
/// unmounting stays marked live until a peer recovers it).
pub fn slots_marked_live(lun: &dyn Lun, sb: &Superblock) -> Result<Vec<u32>, MkfsError> {
    let geo = checked_geometry(sb)?;
    let slots = read_slots(lun, &geo)?;
    Ok(slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_some_and(|s| s.state == SLOT_LIVE))
        .map(|(slot, _)| slot as u32)
        .collect())
}

fn checked_geometry(sb: &Superblock) -> Result<Geometry, MkfsError> {
    let geo = Geometry::from_superblock(sb);
    geo.check().map_err(MkfsError::BadGeometry)?;
    Ok(geo)
}

fn heartbeat_moved(old: Option<&HeartbeatSlot>, new: &HeartbeatSlot) -> bool {
    match old {
        None => true,
        Some(old) => {
            old.counter != new.counter
                || old.generation != new.generation
                || old.host_uuid != new.host_uuid
        }
    }
}

/// Every slot, decoded; `None` for a sector that is all zeros, fails to decode or
/// names another slot.
/// The scratch sector where the ATS self-test (`lun::selftest`) may race
/// compare-and-writes on `lun`, refusing a device where no sector is safe to borrow.
/// The self-test puts the sector's content back when it ends.
///
/// - `overwrite` (mkfs, once it has decided to overwrite the device and checked that
///   no host uses it): the second ATS sector (byte S), which mkfs rewrites anyway.
/// - A device with no recognised content: the second ATS sector too.
/// - An atsfs volume: the heartbeat sector of the last slot, and only while every
///   slot is free (no host mounted, none dead and unrecovered): a mount claims its
///   own or the lowest free slot, and a sector that does not decode (the self-test's
///   image, should the test be killed) is a free slot to every host. A host that does
///   claim the slot during the test makes it stop (`Interfered`), not misjudge.
/// - Another filesystem: refused; the self-test writes one sector of the device.
pub fn selftest_sector(lun: &dyn Lun, overwrite: bool) -> Result<u64, MkfsError> {
    let device = lun.describe();
    let blank = u64::from(lun.sector_size());
    if overwrite {
        return Ok(blank);
    }
    let sb = match probe(lun)? {
        Probe::Empty => return Ok(blank),
        Probe::Other(name) => {
            return Err(MkfsError::Refused(format!(
                "{device} holds a {name}; the ATS self-test writes one sector and does not \
                 touch another filesystem: run it on an empty device, or let mkfs.atsfs run it \
                 (with -f it overwrites the device anyway)"
            )))
        }
        Probe::Atsfs { superblock, .. } => superblock,
    };
    let geo = checked_geometry(&sb)?;
    if sb.ats_sector_size != lun.sector_size() {
        return Err(MkfsError::Refused(format!(
            "{device} has {}-byte ATS sectors but its volume was made for {}-byte sectors; \
             run the self-test through a device with the volume's sector size",
            lun.sector_size(),
            sb.ats_sector_size
        )));
    }
    let in_use: Vec<u32> = read_slots(lun, &geo)?
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_some_and(|s| s.state != SLOT_FREE))
        .map(|(slot, _)| slot as u32)
        .collect();
    if !in_use.is_empty() {
        let list: Vec<String> = in_use.iter().map(u32::to_string).collect();
        return Err(MkfsError::Refused(format!(
            "{device} holds an atsfs volume whose slots {} are in use (hosts mounted, or dead \
             and not yet recovered); the self-test borrows a slot's sector only while every \
             slot is free: unmount every host (and run `atsfs recover` for dead ones) first",
            list.join(", ")
        )));
    }
    Ok(geo.slot_offset(geo.max_hosts - 1))
}

fn read_slots(lun: &dyn Lun, geo: &Geometry) -> Result<Vec<Option<HeartbeatSlot>>, MkfsError> {
    let sector = geo.ats_sector_size as usize;
    let mut region = vec![0u8; geo.hb_blocks as usize * BLOCK_SIZE];
    lun.read_at(&mut region, geo.hb_start * BLOCK_SIZE_U64)?;
    let slots = (0..geo.max_hosts)
        .map(|slot| {
            let at = (geo.slot_offset(slot) - geo.hb_start * BLOCK_SIZE_U64) as usize;
            let raw = region.get(at..at + sector)?;
            let decoded: Result<HeartbeatSlot, FormatError> =
                HeartbeatSlot::decode(raw, geo.hb_start);
            decoded.ok().filter(|hb| hb.slot == slot)
        })
        .collect();
    Ok(slots)
}

#[cfg(test)]
mod tests {
    /// Writes bytes at any offset by read-modify-write of whole sectors (the LUNs
    /// refuse unaligned I/O, as O_DIRECT devices do).
    fn poke(lun: &dyn Lun, offset: u64, bytes: &[u8]) {
        let sector = u64::from(lun.sector_size());
        let start = offset / sector * sector;
        let end = (offset + bytes.len() as u64).div_ceil(sector) * sector;
        let mut buf = vec![0u8; (end - start) as usize];
        lun.read_at(&mut buf, start).unwrap();
        let at = (offset - start) as usize;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        lun.write_at(&buf, start).unwrap();
    }

    use super::*;
    use crate::format::{JournalDescriptor, AG_FLAG_BITMAP_UNINIT};
    use crate::lun::{crash_image, Caw, FaultConfig, FaultLun, LunResult, MemLun};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    const UUID: [u8; 16] = *b"0123456789abcdef";
    const MIB: u64 = 1 << 20;

    fn opts(hosts: u32) -> MkfsOptions {
        MkfsOptions {
            label: "test volume".into(),
            max_hosts: hosts,
            volume_uuid: Some(UUID),
            ..MkfsOptions::default()
        }
    }

    fn read_block(lun: &dyn Lun, block: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        lun.read_at(&mut buf, block * BLOCK_SIZE_U64).unwrap();
        buf
    }

    fn read_sector(lun: &dyn Lun, offset: u64) -> Vec<u8> {
        let mut buf = vec![0u8; lun.sector_size() as usize];
        lun.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn read_body(lun: &dyn Lun, geo: &Geometry, resource: u64) -> Vec<u8> {
        let mut buf = vec![0u8; geo.body_len()];
        lun.read_at(&mut buf, geo.body_offset(resource)).unwrap();
        buf
    }

    /// Decodes everything mkfs wrote and checks every field it sets.
    fn check_volume(lun: &dyn Lun, o: &MkfsOptions) -> Superblock {
        let sb = Superblock::decode(&read_block(lun, 0), 0).unwrap();
        let geo = Geometry::from_superblock(&sb);
        geo.check().unwrap();
        assert_eq!(geo.total_blocks, lun.len_bytes() / BLOCK_SIZE_U64);
        assert_eq!(sb.ats_sector_size, lun.sector_size());
        assert_eq!(sb.max_hosts, o.max_hosts);
        assert_eq!(get_label(&sb), o.label);
        assert_eq!(Some(sb.volume_uuid), o.volume_uuid.or(Some(sb.volume_uuid)));
        assert_eq!(
            sb.heartbeat_interval_ms as u128,
            o.heartbeat_interval.as_millis()
        );
        assert_eq!(sb.lease_ms as u128, o.lease.as_millis());
        assert_eq!(sb.ats_mode, o.ats_mode);
        assert_eq!(sb.root_ino, root_ino(&geo));
        assert!(sb.created_unix_s > 1_600_000_000);

        let backup_block = geo.backup_superblock();
        let backup = Superblock::decode(&read_block(lun, backup_block), backup_block).unwrap();
        assert_eq!(backup.self_block, backup_block);
        let mut same = backup;
        same.self_block = 0;
        same.crc = sb.crc;
        assert_eq!(same, sb, "the backup differs from the primary");

        check_slots(lun, &geo);
        check_journals(lun, &geo, sb.volume_uuid);
        check_orphan_tables(lun, &geo);
        check_groups(lun, &geo);
        check_root(lun, &geo, sb.root_ino);
        sb
    }

    fn get_label(sb: &Superblock) -> String {
        crate::format::get_str(&sb.label)
    }

    fn check_slots(lun: &dyn Lun, geo: &Geometry) {
        for slot in 0..geo.max_hosts {
            let raw = read_sector(lun, geo.slot_offset(slot));
            let hb = HeartbeatSlot::decode(&raw, geo.hb_start).unwrap();
            assert_eq!(
                (hb.slot, hb.state, hb.generation, hb.counter),
                (slot, SLOT_FREE, 0, 0)
            );
            assert!(raw[std::mem::size_of::<HeartbeatSlot>()..]
                .iter()
                .all(|&b| b == 0));
        }
    }

    fn check_orphan_tables(lun: &dyn Lun, geo: &Geometry) {
        for slot in 0..geo.max_hosts {
            let block = geo.orphan_table(slot).expect("mkfs makes orphan tables");
            assert!(read_sector(lun, geo.lock_offset(block))
                .iter()
                .all(|&b| b == 0));
            let table = OrphanTable::decode(&read_body(lun, geo, block), block).unwrap();
            assert_eq!((table.slot, table.count), (slot, 0));
        }
        assert_eq!(
            geo.orphan_table(geo.max_hosts - 1)
                .map(|b| b + u64::from(geo.resource_blocks)),
            Some(geo.ag_start)
        );
    }

    fn check_journals(lun: &dyn Lun, geo: &Geometry, uuid: [u8; 16]) {
        for slot in 0..geo.max_hosts {
            let start = geo.journal_of(slot);
            let header = JournalHeader::decode(&read_block(lun, start), start).unwrap();
            assert_eq!(header.slot, slot);
            assert_eq!((header.tail_seq, header.tail_block), (1, 1));
            assert_eq!(header.journal_blocks, geo.journal_blocks);
            assert_eq!(header.volume_uuid, uuid);
            assert!(read_block(lun, start + 1).iter().all(|&b| b == 0));
        }
    }

    fn check_groups(lun: &dyn Lun, geo: &Geometry) {
        let meta = geo.ag_meta_blocks();
        for ag in 0..geo.ag_count {
            let block = geo.ag_header(ag);
            assert!(read_sector(lun, geo.lock_offset(block))
                .iter()
                .all(|&b| b == 0));
            let header = AgHeader::decode(&read_body(lun, geo, block), block).unwrap();
            assert_eq!(header.ag_index, ag);
            assert_eq!(header.start, geo.ag_first(ag));
            assert_eq!(header.blocks, geo.ag_len(ag));
            if ag == 0 {
                continue;
            }
            assert_eq!(header.flags, AG_FLAG_BITMAP_UNINIT);
            assert_eq!(header.free_blocks, header.blocks - meta);
            assert_eq!(header.rotor, meta);
            assert_eq!(header.bitmap_crc, 0);
        }
        let header0 =
            AgHeader::decode(&read_body(lun, geo, geo.ag_header(0)), geo.ag_header(0)).unwrap();
        let bitmap = read_block(lun, geo.ag_bitmap(0));
        assert_eq!(header0.flags, 0);
        assert_eq!(header0.bitmap_crc, crc32fast::hash(&bitmap));
        let used = meta + u64::from(geo.resource_blocks) + 1;
        assert_eq!(header0.free_blocks, header0.blocks - used);
        assert_eq!(header0.rotor, used);
        for bit in 0..AG_BLOCKS {
            let set = bitmap[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
            let expect = bit < used || bit >= header0.blocks;
            assert_eq!(set, expect, "AG 0 bitmap bit {bit}");
        }
    }

    fn check_root(lun: &dyn Lun, geo: &Geometry, ino: u64) {
        assert_eq!(ino, geo.ag_first(0) + geo.ag_meta_blocks());
        assert!(read_sector(lun, geo.lock_offset(ino))
            .iter()
            .all(|&b| b == 0));
        let inode = InodeBody::decode(&read_body(lun, geo, ino), ino).unwrap();
        assert_eq!(inode.mode, libc::S_IFDIR | 0o755);
        assert_eq!((inode.nlink, inode.uid, inode.gid), (2, 0, 0));
        assert_eq!(
            (inode.size, inode.blocks),
            (4096, 1 + u64::from(geo.resource_blocks))
        );
        assert_eq!((inode.generation, inode.parent), (1, ino));
        assert_eq!((inode.dir_depth, inode.dir_table_blocks), (0, 0));
        assert_eq!((inode.dir_entries, inode.dir_buckets), (0, 1));
        assert!(inode.mtime_s > 1_600_000_000);
        assert_eq!(inode.atime_s, inode.crtime_s);
        let bucket_block = u64::from_le_bytes(inode.area[..8].try_into().unwrap());
        assert_eq!(bucket_block, ino + u64::from(geo.resource_blocks));
        assert!(inode.area[8..].iter().all(|&b| b == 0));
        let bucket = DirBucket::decode(&read_block(lun, bucket_block), bucket_block).unwrap();
        assert_eq!(bucket.header.owner, ino);
        assert_eq!(
            (
                bucket.header.local_depth,
                bucket.header.count,
                bucket.header.used
            ),
            (0, 0, 0)
        );
        assert_eq!(bucket.header.prefix, 0);
    }

    #[test]
    fn mkfs_writes_a_volume_that_decodes() {
        // Three groups (two full, one short), 512- and 4096-byte ATS sectors.
        for sector in [512, 4096] {
            let lun = MemLun::new(300 * MIB, sector);
            let o = opts(4);
            let mut calls = Vec::new();
            let geo = mkfs(&lun, &o, &mut |done, total| calls.push((done, total))).unwrap();
            assert_eq!(geo.ag_count, 3);
            assert_eq!(geo.resource_blocks, if sector == 512 { 1 } else { 2 });
            assert_eq!(calls.first(), Some(&(0, 3)));
            assert_eq!(calls.last(), Some(&(3, 3)));
            assert!(calls.windows(2).all(|w| w[0].0 < w[1].0));
            let sb = check_volume(&lun, &o);
            assert_eq!(sb.volume_uuid, UUID);
            assert_eq!(Geometry::from_superblock(&sb), geo);
        }
    }

    #[test]
    fn defaults_draw_a_random_uuid_and_seed() {
        let o = MkfsOptions {
            max_hosts: 2,
            ..MkfsOptions::default()
        };
        let a = MemLun::new(8 * MIB, 512);
        let b = MemLun::new(8 * MIB, 512);
        mkfs(&a, &o, &mut |_, _| {}).unwrap();
        mkfs(&b, &o, &mut |_, _| {}).unwrap();
        let sa = check_volume(&a, &o);
        let sb = check_volume(&b, &o);
        assert_ne!(sa.volume_uuid, sb.volume_uuid);
        assert_ne!(sa.volume_uuid, [0; 16]);
        assert_ne!(sa.dir_hash_seed, sb.dir_hash_seed);
        assert_eq!(sa.max_hosts, 2);
    }

    #[test]
    fn options_are_checked() {
        let lun = MemLun::new(8 * MIB, 512);
        let cases = [
            MkfsOptions {
                label: "x".repeat(64),
                ..opts(2)
            },
            MkfsOptions {
                heartbeat_interval: Duration::from_millis(99),
                ..opts(2)
            },
            MkfsOptions {
                lease: Duration::from_secs(2),
                ..opts(2)
            },
            MkfsOptions {
                lease: Duration::from_secs(601),
                ..opts(2)
            },
            MkfsOptions {
                heartbeat_interval: Duration::MAX,
                ..opts(2)
            },
            MkfsOptions {
                journal_bytes: Some(MIB + 512),
                ..opts(2)
            },
            MkfsOptions {
                journal_bytes: Some(512 * 1024),
                ..opts(2)
            },
            MkfsOptions {
                ats_mode: 7,
                ..opts(2)
            },
            MkfsOptions {
                max_hosts: 0,
                ..opts(2)
            },
            MkfsOptions {
                max_hosts: 65,
                ..opts(2)
            },
            MkfsOptions {
                volume_uuid: Some([0; 16]),
                ..opts(2)
            },
        ];
        for o in cases {
            let err = mkfs(&lun, &o, &mut |_, _| {}).unwrap_err();
            assert!(matches!(err, MkfsError::BadOption(_)), "{o:?}: {err}");
            assert!(!err.is_io());
        }
        assert!(
            lun.snapshot().iter().all(|&b| b == 0),
            "a refused mkfs wrote"
        );
        let ok = MkfsOptions {
            label: "x".repeat(63),
            ..opts(2)
        };
        mkfs(&lun, &ok, &mut |_, _| {}).unwrap();
        check_volume(&lun, &ok);
    }

    #[test]
    fn a_small_device_is_refused_with_the_size_needed() {
        let lun = MemLun::new(2 * MIB, 512);
        let err = mkfs(&lun, &opts(32), &mut |_, _| {}).unwrap_err();
        let MkfsError::TooSmall { have, need } = err else {
            panic!("{err}");
        };
        assert_eq!(have, 2 * MIB);
        assert!(need > have);
        let text = err_text(&lun);
        assert!(
            text.contains("2 MiB") && text.contains("at least"),
            "{text}"
        );
    }

    fn err_text(lun: &MemLun) -> String {
        mkfs(lun, &opts(32), &mut |_, _| {})
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn probe_names_foreign_signatures() {
        let cases: [(usize, &[u8], &str); 9] = [
            (1080, &[0x53, 0xEF], "ext2/ext3/ext4 filesystem"),
            (0, b"XFSB", "XFS filesystem"),
            (65600, b"_BHRfS_M", "btrfs filesystem"),
            (0, b"LUKS\xba\xbe", "LUKS encrypted volume"),
            (4086, b"SWAPSPACE2", "Linux swap space"),
            (512, b"EFI PART", "GPT partition table"),
            (32769, b"CD001", "ISO 9660 filesystem"),
            (82, b"FAT32   ", "FAT filesystem"),
            (512, b"LABELONE", "LVM2 physical volume"),
        ];
        for (offset, bytes, name) in cases {
            let lun = MemLun::new(MIB, 512);
            poke(&lun, offset as u64, bytes);
            assert_eq!(probe(&lun).unwrap(), Probe::Other(name));
        }
        // An MBR signature counts only with a partition entry.
        let lun = MemLun::new(MIB, 512);
        poke(&lun, 510, &[0x55, 0xAA]);
        assert_eq!(probe(&lun).unwrap(), Probe::Empty);
        poke(&lun, 446 + 16 + 4, &[0x83]);
        assert_eq!(probe(&lun).unwrap(), Probe::Other("MBR partition table"));
    }

    #[test]
    fn probe_reads_within_tiny_devices() {
        for len in [0, 512, 1024, 4096, 65536] {
            let lun = MemLun::from_image(vec![0xEF; len], 512);
            assert!(probe(&lun).is_ok(), "{len}");
        }
        // The ext magic lies past the end of a 1 KiB device: not found, no panic.
        let lun = MemLun::from_image(vec![0x53; 1024], 512);
        assert_eq!(probe(&lun).unwrap(), Probe::Empty);
    }

    #[test]
    fn probe_finds_atsfs_and_its_backup() {
        let lun = MemLun::new(8 * MIB, 512);
        assert_eq!(probe(&lun).unwrap(), Probe::Empty);
        mkfs(&lun, &opts(2), &mut |_, _| {}).unwrap();
        let Probe::Atsfs {
            superblock,
            from_backup: false,
        } = probe(&lun).unwrap()
        else {
            panic!("no atsfs found");
        };
        assert_eq!(superblock.volume_uuid, UUID);
        lun.write_at(&[0u8; 4096], 0).unwrap();
        let Probe::Atsfs {
            superblock: backup,
            from_backup: true,
        } = probe(&lun).unwrap()
        else {
            panic!("the backup was not found");
        };
        assert_eq!(backup.volume_uuid, UUID);
        // A primary with the magic that does not decode, and no backup.
        let end = lun.len_bytes() - 4096;
        lun.write_at(&[0u8; 4096], end).unwrap();
        poke(&lun, 0, b"ATSB");
        assert!(matches!(probe(&lun).unwrap(), Probe::Other(name) if name.contains("atsfs")));
    }

    #[test]
    fn mkfs_wipes_other_signatures_and_old_journals() {
        let lun = MemLun::new(8 * MIB, 512);
        poke(&lun, 1080, &[0x53, 0xEF]);
        poke(&lun, 65600, b"_BHRfS_M");
        let o = opts(2);
        let geo = plan(&lun, &o).unwrap();
        // A stale transaction in journal 1: a sealed descriptor at its block 1.
        let block1 = geo.journal_of(1) + 1;
        let mut desc: JournalDescriptor = bytemuck::Zeroable::zeroed();
        desc.magic = JournalDescriptor::MAGIC;
        desc.blockno = block1;
        desc.seq = 1;
        desc.seal();
        lun.write_at(bytemuck::bytes_of(&desc), block1 * BLOCK_SIZE_U64)
            .unwrap();
        assert_eq!(probe(&lun).unwrap(), Probe::Other("btrfs filesystem"));

        mkfs(&lun, &o, &mut |_, _| {}).unwrap();
        check_volume(&lun, &o);
        let image = lun.snapshot();
        assert_eq!(foreign_signature(&image), None);
        assert!(image[65600..65608].iter().all(|&b| b == 0));
    }

    /// Crash at every write of mkfs (and tear the last one): a valid primary
    /// superblock appears only once everything else has landed.
    #[test]
    fn an_interrupted_mkfs_never_looks_valid() {
        let len = 4 * MIB;
        let lun = FaultLun::new(MemLun::new(len, 512), FaultConfig::default());
        lun.start_recording();
        let o = opts(2);
        mkfs(&lun, &o, &mut |_, _| {}).unwrap();
        let records = lun.records();
        let base = vec![0u8; len as usize];
        for cut in 0..=records.len() {
            let sectors = records
                .get(cut.wrapping_sub(1))
                .map_or(0, |r| r.data.len() / 512);
            let tears = std::iter::once(None).chain((0..sectors).map(Some));
            for tear in tears {
                let crashed = MemLun::from_image(crash_image(&base, &records, cut, tear, 512), 512);
                // The superblock is the first sector of the last write; a tear that
                // keeps it leaves only zero padding missing.
                let complete = cut == records.len() && tear != Some(0);
                match probe(&crashed).unwrap() {
                    Probe::Atsfs {
                        from_backup: false, ..
                    } => {
                        assert!(complete, "valid primary at cut {cut} tear {tear:?}");
                        check_volume(&crashed, &o);
                    }
                    other => assert!(!complete, "{other:?}"),
                }
            }
        }
        // Under a volatile cache, unflushed writes may land in any order: the primary
        // must be alone in its flush epoch, after every other write.
        let (last, rest) = records.split_last().unwrap();
        assert_eq!(last.offset, 0);
        assert!(Superblock::has_magic(&last.data));
        assert!(rest.iter().all(|r| r.after_flush < last.after_flush));
        assert!(
            lun.flush_count() > last.after_flush,
            "no flush after the primary"
        );
    }

    /// A sparse LUN that stores only written sectors and counts bytes written.
    struct SparseLun {
        len: u64,
        sectors: Mutex<HashMap<u64, Vec<u8>>>,
        written: AtomicU64,
    }

    impl SparseLun {
        fn new(len: u64) -> SparseLun {
            SparseLun {
                len,
                sectors: Mutex::new(HashMap::new()),
                written: AtomicU64::new(0),
            }
        }
    }

    impl Lun for SparseLun {
        fn sector_size(&self) -> u32 {
            512
        }
        fn len_bytes(&self) -> u64 {
            self.len
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
            crate::lun::check_range("read", offset, buf.len(), self.len, Some(512))?;
            let sectors = self.sectors.lock().unwrap();
            for (i, chunk) in buf.chunks_mut(512).enumerate() {
                match sectors.get(&(offset / 512 + i as u64)) {
                    Some(data) => chunk.copy_from_slice(data),
                    None => chunk.fill(0),
                }
            }
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
            crate::lun::check_range("write", offset, buf.len(), self.len, Some(512))?;
            let mut sectors = self.sectors.lock().unwrap();
            for (i, chunk) in buf.chunks(512).enumerate() {
                sectors.insert(offset / 512 + i as u64, chunk.to_vec());
            }
            self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(())
        }
        fn compare_and_write(&self, _: u64, _: &[u8], _: &[u8]) -> LunResult<Caw> {
            unreachable!("mkfs never compares and writes")
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "sparse test LUN".into()
        }
    }

    #[test]
    fn a_1tib_volume_gets_metadata_only() {
        let lun = SparseLun::new(1 << 40);
        let o = opts(32);
        let geo = mkfs(&lun, &o, &mut |_, _| {}).unwrap();
        // 1 TiB less 2 GiB of journals, in groups of 128 MiB; the last one short.
        assert_eq!(geo.ag_count, 8176);
        assert_eq!(geo.ag_len(8175), 32726);
        assert_eq!(geo.journal_blocks, 16384);
        // Heads, slots, journals' first blocks, one resource per group, AG 0 bitmap,
        // root: a few MiB of the 1 TiB.
        let written = lun.written.load(Ordering::Relaxed);
        // Blocks past the first MiB: the old backup, the slots, two per journal, one per
        // group, AG 0's bitmap, the root inode and bucket, two superblocks, one orphan
        // table per slot.
        let blocks = 1 + geo.hb_blocks + 2 * 32 + geo.ag_count + 1 + 2 + 2 + 32;
        assert_eq!(written, MIB + blocks * 4096);
        check_volume(&lun, &o);
    }

    fn set_slot(lun: &dyn Lun, geo: &Geometry, slot: u32, state: u32, counter: u64) {
        let mut hb: HeartbeatSlot = bytemuck::Zeroable::zeroed();
        hb.magic = HeartbeatSlot::MAGIC;
        hb.slot = slot;
        hb.state = state;
        hb.generation = 1;
        hb.counter = counter;
        hb.seal();
        lun.write_at(&encode_padded(&hb, 512), geo.slot_offset(slot))
            .unwrap();
    }

    #[test]
    fn live_hosts_are_the_moving_live_slots() {
        let lun = Arc::new(MemLun::new(16 * MIB, 512));
        let o = opts(8);
        let geo = mkfs(&*lun, &o, &mut |_, _| {}).unwrap();
        let Probe::Atsfs { superblock, .. } = probe(&*lun).unwrap() else {
            panic!("no volume");
        };
        set_slot(&*lun, &geo, 2, SLOT_LIVE, 7); // crashed host: live but still
        lun.write_at(&[0xAB; 512], geo.slot_offset(6)).unwrap(); // garbage
        set_slot(&*lun, &geo, 7, SLOT_LIVE, 1); // names another slot below
        lun.write_at(&[0u8; 512], geo.slot_offset(4)).unwrap(); // never used
        let wrong = {
            let mut hb = HeartbeatSlot::decode(&read_sector(&*lun, geo.slot_offset(7)), 1).unwrap();
            hb.slot = 3;
            hb.seal();
            hb
        };
        lun.write_at(&encode_padded(&wrong, 512), geo.slot_offset(7))
            .unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let beater = {
            let (lun, stop) = (Arc::clone(&lun), Arc::clone(&stop));
            std::thread::spawn(move || {
                for counter in 0..10_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    set_slot(&*lun, &geo, 1, SLOT_LIVE, counter); // a live host
                    set_slot(&*lun, &geo, 5, SLOT_FREE, counter); // moving but free
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        let live = live_hosts(&*lun, &superblock, Duration::from_millis(100));
        let marked = slots_marked_live(&*lun, &superblock);
        stop.store(true, Ordering::Relaxed);
        beater.join().unwrap();
        assert_eq!(live.unwrap(), vec![1]);
        assert_eq!(marked.unwrap(), vec![1, 2]);
        // Once the host stops, nothing moves.
        assert_eq!(
            live_hosts(&*lun, &superblock, Duration::from_millis(20)).unwrap(),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn live_hosts_refuses_an_impossible_geometry() {
        let lun = MemLun::new(8 * MIB, 512);
        mkfs(&lun, &opts(2), &mut |_, _| {}).unwrap();
        let Probe::Atsfs { mut superblock, .. } = probe(&lun).unwrap() else {
            panic!("no volume");
        };
        superblock.hb_blocks += 1;
        let err = live_hosts(&lun, &superblock, Duration::ZERO).unwrap_err();
        assert!(matches!(err, MkfsError::BadGeometry(_)), "{err}");
    }

    #[test]
    fn the_selftest_borrows_a_sector_only_where_it_is_safe() {
        // No volume: the second sector; mkfs (about to overwrite): the same, always.
        let lun = MemLun::new(64 * MIB, 512);
        assert_eq!(selftest_sector(&lun, false).unwrap(), 512);
        let geo = mkfs(&lun, &opts(4), &mut |_, _| {}).unwrap();
        assert_eq!(selftest_sector(&lun, true).unwrap(), 512);
        // A volume with every slot free: the last slot's heartbeat sector.
        assert_eq!(selftest_sector(&lun, false).unwrap(), geo.slot_offset(3));
        // A slot in use (live, or dead and not yet recovered): refused.
        for state in [SLOT_LIVE, crate::format::SLOT_RECOVERING] {
            set_slot(&lun, &geo, 1, state, 5);
            let err = selftest_sector(&lun, false).unwrap_err().to_string();
            assert!(err.contains("slots 1 are in use"), "{err}");
        }
        // A sector that does not decode (a killed self-test's image) is free to all.
        lun.write_at(&[0xAB; 512], geo.slot_offset(1)).unwrap();
        assert_eq!(selftest_sector(&lun, false).unwrap(), geo.slot_offset(3));
        // Another filesystem: refused.
        let ext = MemLun::new(MIB, 512);
        poke(&ext, 1080, &[0x53, 0xEF]);
        let err = selftest_sector(&ext, false).unwrap_err().to_string();
        assert!(err.contains("does not touch another filesystem"), "{err}");
    }

    #[test]
    fn a_selftest_on_a_volume_leaves_it_as_it_was() {
        let lun = Arc::new(MemLun::new(64 * MIB, 512));
        mkfs(lun.as_ref(), &opts(4), &mut |_, _| {}).unwrap();
        let before = lun.snapshot();
        let offset = selftest_sector(lun.as_ref(), false).unwrap();
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(lun.clone()) };
        let options = crate::lun::selftest::SelftestOptions {
            offset,
            sessions: 4,
            increments: 100,
        };
        let report = crate::lun::selftest::run(&open, &options, &mut |_, _| {}).unwrap();
        assert!(report.passed() && report.restored, "{report:?}");
        assert!(lun.snapshot() == before, "the volume changed");
        let check = crate::fsck::check(lun.as_ref()).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
    }
}
