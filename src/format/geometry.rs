//! Where every region lives: computed once by mkfs, recorded in the superblock, and
//! re-derived from it on mount. All offset arithmetic of the format lives here.

use super::{
    BlockNo, Superblock, AG_BLOCKS, BLOCK_SIZE, BLOCK_SIZE_U64, FEATURE_INCOMPAT_DISK_PAXOS,
    FEATURE_RO_COMPAT_ORPHAN_TABLES, HOSTS_MAX, RESOURCE_BODY_SIZE,
};
use thiserror::Error;

/// ATS sectors per host slot in the heartbeat region: the heartbeat, then the mailbox.
pub const SLOT_SECTORS: u64 = 2;
/// Smallest journal per slot: must hold the largest transaction (a descriptor, 252
/// images, a commit) with room to spare.
pub const JOURNAL_BLOCKS_MIN: u64 = 256;
/// Largest default journal per slot (64 MiB).
pub const JOURNAL_BLOCKS_DEFAULT_MAX: u64 = 16384;
/// Smallest allocation group mkfs will create (the tail of a volume shorter than this
/// stays unused).
pub const AG_BLOCKS_MIN: u64 = 64;

/// What mkfs was asked for.
#[derive(Clone, Debug)]
pub struct MkfsParams {
    pub total_bytes: u64,
    pub ats_sector_size: u32,
    pub max_hosts: u32,
    /// Journal size per slot in blocks; `None` picks a default from the volume size.
    pub journal_blocks: Option<u64>,
    /// Lay out a Disk Paxos region (`ATS_MODE_DISK_PAXOS`) after the heartbeats.
    pub disk_paxos: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("the device is too small: {have} bytes, atsfs needs at least {need} bytes for this layout (fewer hosts with -N or a smaller --journal-size need less)")]
    TooSmall { have: u64, need: u64 },
    #[error("max hosts must be between 1 and {HOSTS_MAX}, not {0}")]
    BadHosts(u32),
    #[error("the journal must be at least {} KiB per host", JOURNAL_BLOCKS_MIN * 4)]
    JournalTooSmall,
    #[error("sector size {0} is not supported (512 or 4096)")]
    BadSector(u32),
}

/// The volume's regions, in blocks unless a name says bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub total_blocks: u64,
    pub ats_sector_size: u32,
    pub max_hosts: u32,
    pub resource_blocks: u32,
    pub hb_start: BlockNo,
    pub hb_blocks: u64,
    /// First block of the Disk Paxos region (leader record, then one dblock per
    /// slot; `paxos_blocks()` long), right after the heartbeat region; 0 on volumes
    /// without one.
    pub paxos_start: BlockNo,
    pub journal_start: BlockNo,
    pub journal_blocks: u64,
    /// First block of the orphan tables (one resource per slot, right after the
    /// journals); 0 on volumes made without them.
    pub orphan_start: BlockNo,
    pub ag_start: BlockNo,
    pub ag_count: u64,
}

impl Geometry {
    /// Plans a fresh layout.
    pub fn plan(params: &MkfsParams) -> Result<Geometry, GeometryError> {
        if params.max_hosts == 0 || params.max_hosts > HOSTS_MAX {
            return Err(GeometryError::BadHosts(params.max_hosts));
        }
        let ats = params.ats_sector_size;
        if !matches!(ats, 512 | 4096) {
            return Err(GeometryError::BadSector(ats));
        }
        let total_blocks = params.total_bytes / BLOCK_SIZE_U64;
        let hosts = u64::from(params.max_hosts);
        let hb_blocks = (hosts * SLOT_SECTORS * u64::from(ats)).div_ceil(BLOCK_SIZE_U64);
        let journal_blocks = match params.journal_blocks {
            Some(blocks) if blocks < JOURNAL_BLOCKS_MIN => {
                return Err(GeometryError::JournalTooSmall)
            }
            Some(blocks) => blocks,
            None => {
                (total_blocks / (16 * hosts)).clamp(JOURNAL_BLOCKS_MIN, JOURNAL_BLOCKS_DEFAULT_MAX)
            }
        };
        let resource_blocks = resource_blocks_for(ats);
        let hb_start = 1;
        let (paxos_start, paxos_blocks) = if params.disk_paxos {
            (
                hb_start + hb_blocks,
                paxos_blocks_for(params.max_hosts, ats),
            )
        } else {
            (0, 0)
        };
        let journal_start = hb_start + hb_blocks + paxos_blocks;
        // A caller's journal size can be anything: saturate rather than wrap, so an
        // absurd one is a device that is too small, not an overflow.
        let orphan_start = hosts
            .saturating_mul(journal_blocks)
            .saturating_add(journal_start);
        let ag_start = orphan_start.saturating_add(hosts * u64::from(resource_blocks));
        // The last block holds the backup superblock.
        let need_blocks = ag_start.saturating_add(AG_BLOCKS_MIN + 1);
        if total_blocks < need_blocks {
            return Err(GeometryError::TooSmall {
                have: params.total_bytes,
                need: need_blocks.saturating_mul(BLOCK_SIZE_U64),
            });
        }
        let data_blocks = total_blocks - 1 - ag_start;
        let mut ag_count = data_blocks / AG_BLOCKS;
        if data_blocks % AG_BLOCKS >= AG_BLOCKS_MIN {
            ag_count += 1;
        }
        Ok(Geometry {
            total_blocks,
            ats_sector_size: ats,
            max_hosts: params.max_hosts,
            resource_blocks,
            hb_start,
            hb_blocks,
            paxos_start,
            journal_start,
            journal_blocks,
            orphan_start,
            ag_start,
            ag_count,
        })
    }

    /// The geometry a (validated) superblock records.
    pub fn from_superblock(sb: &Superblock) -> Geometry {
        Geometry {
            total_blocks: sb.total_blocks,
            ats_sector_size: sb.ats_sector_size,
            max_hosts: sb.max_hosts,
            resource_blocks: sb.resource_blocks,
            hb_start: sb.hb_start,
            hb_blocks: sb.hb_blocks,
            paxos_start: if sb.feature_incompat & FEATURE_INCOMPAT_DISK_PAXOS != 0 {
                sb.paxos_start
            } else {
                0
            },
            journal_start: sb.journal_start,
            journal_blocks: sb.journal_blocks,
            orphan_start: if sb.feature_ro_compat & FEATURE_RO_COMPAT_ORPHAN_TABLES != 0 {
                sb.orphan_start
            } else {
                0
            },
            ag_start: sb.ag_start,
            ag_count: sb.ag_count,
        }
    }

    /// Checks that a superblock's regions are in order and inside the volume, so later
    /// arithmetic on them cannot overflow or run off the device.
    pub fn check(&self) -> Result<(), String> {
        let hosts = u64::from(self.max_hosts);
        let expect_hb =
            (hosts * SLOT_SECTORS * u64::from(self.ats_sector_size)).div_ceil(BLOCK_SIZE_U64);
        if self.resource_blocks != resource_blocks_for(self.ats_sector_size) {
            return Err(format!("resource span {} blocks", self.resource_blocks));
        }
        if self.hb_start != 1 || self.hb_blocks != expect_hb {
            return Err("heartbeat region misplaced".into());
        }
        let paxos_blocks = match self.paxos_start {
            0 => 0,
            start if start == self.hb_start + self.hb_blocks => self.paxos_blocks(),
            _ => return Err("Disk Paxos region misplaced".into()),
        };
        if self.journal_start != self.hb_start + self.hb_blocks + paxos_blocks
            || self.journal_blocks < JOURNAL_BLOCKS_MIN
        {
            return Err("journal region misplaced".into());
        }
        let journals_end = hosts
            .checked_mul(self.journal_blocks)
            .and_then(|j| j.checked_add(self.journal_start));
        let groups_start = match self.orphan_start {
            0 => journals_end,
            start if Some(start) == journals_end => {
                start.checked_add(hosts * u64::from(self.resource_blocks))
            }
            _ => return Err("orphan tables misplaced".into()),
        };
        if groups_start != Some(self.ag_start) {
            return Err("allocation groups misplaced".into());
        }
        if self.ag_count == 0 {
            return Err("no allocation groups".into());
        }
        let last_first = (self.ag_count - 1)
            .checked_mul(AG_BLOCKS)
            .and_then(|blocks| blocks.checked_add(self.ag_start));
        match last_first {
            Some(first) if first.saturating_add(AG_BLOCKS_MIN) < self.total_blocks => Ok(()),
            _ => Err("allocation groups run past the volume".into()),
        }
    }

    /// Byte offset of a slot's heartbeat sector.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.hb_start * BLOCK_SIZE_U64
            + u64::from(slot) * SLOT_SECTORS * u64::from(self.ats_sector_size)
    }

    /// Byte offset of a slot's mailbox sector (lock release requests to that host),
    /// right after its heartbeat sector.
    pub fn mailbox_offset(&self, slot: u32) -> u64 {
        self.slot_offset(slot) + u64::from(self.ats_sector_size)
    }

    /// Blocks of the Disk Paxos region; 0 without one.
    pub fn paxos_blocks(&self) -> u64 {
        if self.paxos_start == 0 {
            return 0;
        }
        paxos_blocks_for(self.max_hosts, self.ats_sector_size)
    }

    /// Byte offset of the Disk Paxos leader record (the region's first sector).
    pub fn paxos_leader_offset(&self) -> u64 {
        self.paxos_start * BLOCK_SIZE_U64
    }

    /// Byte offset of a slot's Disk Paxos dblock: sector `1 + slot` of the region.
    pub fn paxos_dblock_offset(&self, slot: u32) -> u64 {
        self.paxos_leader_offset() + (1 + u64::from(slot)) * u64::from(self.ats_sector_size)
    }

    /// Bytes of the leader record and every dblock: what one read of "everybody"
    /// reads.
    pub fn paxos_region_len(&self) -> usize {
        (1 + self.max_hosts as usize) * self.ats_sector_size as usize
    }

    /// First block of a slot's journal (its header).
    pub fn journal_of(&self, slot: u32) -> BlockNo {
        self.journal_start + u64::from(slot) * self.journal_blocks
    }

    /// The orphan table resource of `slot`, if the volume has orphan tables.
    pub fn orphan_table(&self, slot: u32) -> Option<BlockNo> {
        (self.orphan_start != 0)
            .then(|| self.orphan_start + u64::from(slot) * u64::from(self.resource_blocks))
    }

    /// True when `block` is one of the orphan tables.
    pub fn is_orphan_table(&self, block: BlockNo) -> bool {
        let span = u64::from(self.resource_blocks);
        self.orphan_start != 0
            && block >= self.orphan_start
            && block < self.ag_start
            && (block - self.orphan_start) % span == 0
    }

    /// First block of allocation group `ag`.
    pub fn ag_first(&self, ag: u64) -> BlockNo {
        self.ag_start + ag * AG_BLOCKS
    }

    /// One past the last block of allocation group `ag`.
    pub fn ag_end(&self, ag: u64) -> BlockNo {
        (self.ag_first(ag) + AG_BLOCKS).min(self.total_blocks - 1)
    }

    /// Blocks in allocation group `ag`.
    pub fn ag_len(&self, ag: u64) -> u64 {
        self.ag_end(ag) - self.ag_first(ag)
    }

    /// The group header resource of `ag` (its first block).
    pub fn ag_header(&self, ag: u64) -> BlockNo {
        self.ag_first(ag)
    }

    /// The bitmap block of `ag`.
    pub fn ag_bitmap(&self, ag: u64) -> BlockNo {
        self.ag_first(ag) + u64::from(self.resource_blocks)
    }

    /// Blocks at the start of every group taken by its own metadata.
    pub fn ag_meta_blocks(&self) -> u64 {
        u64::from(self.resource_blocks) + 1
    }

    /// The group that holds `block`, if it is in the data area.
    pub fn ag_of(&self, block: BlockNo) -> Option<u64> {
        if block < self.ag_start {
            return None;
        }
        let ag = (block - self.ag_start) / AG_BLOCKS;
        (ag < self.ag_count && block < self.ag_end(ag)).then_some(ag)
    }

    /// Checks that a journaled home write of `len` bytes at byte `target` lies where
    /// the filesystem journals: inside the allocation groups (inodes, directory and
    /// extent blocks, xattr blocks, group header bodies, bitmaps) or the orphan tables'
    /// bodies, and not over a group header's or an orphan table's lock sector (lock
    /// sectors change only by ATS). The superblock,
    /// the heartbeat region, the journals, the backup superblock and anything past
    /// the last group are never journaled. Says why not when it does not.
    pub fn check_journal_target(&self, target: u64, len: u64) -> Result<(), String> {
        let from = if self.orphan_start != 0 {
            self.orphan_start
        } else {
            self.ag_start
        };
        let area = || {
            format!(
                "outside the orphan tables and allocation groups (bytes {}..{})",
                from * BLOCK_SIZE_U64,
                self.ag_end(self.ag_count.saturating_sub(1)) * BLOCK_SIZE_U64
            )
        };
        let Some(end) = target.checked_add(len).filter(|_| len > 0) else {
            return Err(area());
        };
        let first = target / BLOCK_SIZE_U64;
        let last = (end - 1) / BLOCK_SIZE_U64;
        if self.orphan_start != 0 && first >= self.orphan_start && last < self.ag_start {
            return self.check_orphan_target(target, end, first, last);
        }
        let (Some(ag_first), Some(ag_last)) = (self.ag_of(first), self.ag_of(last)) else {
            return Err(area());
        };
        for ag in [ag_first, ag_last] {
            let lock = self.lock_offset(self.ag_header(ag));
            if target < lock + u64::from(self.ats_sector_size) && end > lock {
                return Err(format!(
                    "over the lock sector of allocation group {ag}'s header"
                ));
            }
        }
        Ok(())
    }

    /// The orphan-table half of `check_journal_target`: a table's body may be
    /// journaled, its lock sector never.
    fn check_orphan_target(
        &self,
        target: u64,
        end: u64,
        first: u64,
        last: u64,
    ) -> Result<(), String> {
        let span = u64::from(self.resource_blocks);
        for block in [first, last] {
            let table = self.orphan_start + (block - self.orphan_start) / span * span;
            let lock = self.lock_offset(table);
            if target < lock + u64::from(self.ats_sector_size) && end > lock {
                let slot = (table - self.orphan_start) / span;
                return Err(format!(
                    "over the lock sector of slot {slot}'s orphan table"
                ));
            }
        }
        Ok(())
    }

    /// Byte offset of a resource's lock sector.
    pub fn lock_offset(&self, resource: BlockNo) -> u64 {
        resource * BLOCK_SIZE_U64
    }

    /// Byte offset of a resource's body.
    pub fn body_offset(&self, resource: BlockNo) -> u64 {
        resource * BLOCK_SIZE_U64 + u64::from(self.ats_sector_size)
    }

    /// Bytes read and written for a resource's body: `RESOURCE_BODY_SIZE` rounded up
    /// to whole sectors, so body I/O stays sector aligned on 4096-byte-sector devices.
    pub fn body_len(&self) -> usize {
        RESOURCE_BODY_SIZE.next_multiple_of(self.ats_sector_size as usize)
    }

    /// The backup superblock's block.
    pub fn backup_superblock(&self) -> BlockNo {
        self.total_blocks - 1
    }

    /// Total blocks in all groups (what statfs reports as the size).
    pub fn data_blocks(&self) -> u64 {
        (0..self.ag_count).map(|ag| self.ag_len(ag)).sum()
    }
}

/// Blocks of a Disk Paxos region: the leader record and one dblock per slot, one
/// ATS sector each, rounded up to whole blocks.
pub fn paxos_blocks_for(max_hosts: u32, ats_sector_size: u32) -> u64 {
    ((1 + u64::from(max_hosts)) * u64::from(ats_sector_size)).div_ceil(BLOCK_SIZE_U64)
}

/// Blocks one locked resource spans: its lock sector plus a body of
/// `RESOURCE_BODY_SIZE` bytes.
pub fn resource_blocks_for(ats_sector_size: u32) -> u32 {
    (ats_sector_size as usize + RESOURCE_BODY_SIZE).div_ceil(BLOCK_SIZE) as u32
}
