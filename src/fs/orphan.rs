//! Orphans: files whose last link went while hosts had them open. Each slot has an
//! orphan table (a locked resource, see `docs/format.md`) listing the inodes that
//! host had open when they were unlinked; an inode's `orphan_slots` names the tables
//! that list it. The table and the inode change in one transaction, so a crash at
//! any point leaves them in agreement.
//!
//! - `drop_link` lists an inode in the table of every host that has it open when its
//!   last link goes; `open` of an unlinked inode lists it in the opener's table.
//! - A host's last close takes the inode off its own table; the close that leaves no
//!   host with it open frees it (`free_inode` takes it off every table).
//! - Once a slot is FREE (recovered, or released), its open entries are stale and
//!   its table is reclaimed (`reclaim_one`): each inode is taken off it and freed
//!   unless another host still has it open.
//!
//! On a volume without orphan tables (made before them) nothing is listed, and a
//! crashed host's unlinked open files leak as before.

use super::inode::is_dir;
use super::{Core, Fs, FsError, FsResult, Ino};
use crate::cluster::lock::LockMode;
use crate::format::{BlockNo, InodeBody, OnDisk, OrphanTable, ORPHAN_ENTRIES_MAX};

impl Core {
    /// The resource of `slot`'s orphan table, if the volume has orphan tables.
    fn orphan_block(&self, slot: u32) -> FsResult<Option<BlockNo>> {
        let Some(block) = self.meta.geo.orphan_table(slot) else {
            return Ok(None);
        };
        if slot >= self.meta.geo.max_hosts {
            return Err(FsError::corrupted(
                "orphan table",
                block,
                format!("slot {slot} does not exist"),
            ));
        }
        Ok(Some(block))
    }

    /// Loads `slot`'s orphan table under its exclusive lock.
    fn load_orphans(&mut self, block: BlockNo, slot: u32) -> FsResult<OrphanTable> {
        self.meta.need(block, LockMode::Exclusive)?;
        let geo = self.meta.geo;
        let table: OrphanTable = self
            .meta
            .get(geo.body_offset(block), geo.body_len(), block)?;
        if table.slot != slot {
            return Err(FsError::corrupted(
                "orphan table",
                block,
                format!("names slot {}", table.slot),
            ));
        }
        Ok(table)
    }

    fn store_orphans(&mut self, block: BlockNo, table: OrphanTable) {
        let geo = self.meta.geo;
        self.meta.put(geo.body_offset(block), geo.body_len(), table);
    }

    /// Lists `inode` in `slot`'s table (the caller puts the inode). A full table
    /// leaves it unlisted there, with a warning: that host's crash would leak it.
    pub(super) fn orphan_add(&mut self, inode: &mut InodeBody, slot: u32) -> FsResult<()> {
        let bit = 1u64 << slot;
        if inode.orphan_slots & bit != 0 || is_dir(inode) {
            return Ok(());
        }
        let Some(block) = self.orphan_block(slot)? else {
            return Ok(());
        };
        let mut table = self.load_orphans(block, slot)?;
        let ino = inode.blockno;
        if !table.listed().contains(&ino) {
            let count = table.count as usize;
            if count >= ORPHAN_ENTRIES_MAX {
                tracing::warn!(
                    ino,
                    slot,
                    "the orphan table is full: if that host crashes with the file open, \
                     its blocks leak until `atsfs fsck --repair`"
                );
                return Ok(());
            }
            table.entries[count] = ino;
            table.count += 1;
            self.store_orphans(block, table);
        }
        inode.orphan_slots |= bit;
        Ok(())
    }

    /// Takes `inode` off `slot`'s table (the caller puts or frees the inode).
    pub(super) fn orphan_remove(&mut self, inode: &mut InodeBody, slot: u32) -> FsResult<()> {
        let bit = 1u64.checked_shl(slot).unwrap_or(0);
        if inode.orphan_slots & bit == 0 {
            return Ok(());
        }
        if let Some(block) = self.orphan_block(slot)? {
            let mut table = self.load_orphans(block, slot)?;
            if unlist(&mut table, inode.blockno) {
                self.store_orphans(block, table);
            }
        }
        inode.orphan_slots &= !bit;
        Ok(())
    }

    /// Takes an inode that is being freed off every table that lists it.
    pub(super) fn orphan_forget(&mut self, inode: &mut InodeBody) -> FsResult<()> {
        for slot in 0..64u32 {
            if inode.orphan_slots & (1u64 << slot) != 0 {
                self.orphan_remove(inode, slot)?;
            }
        }
        inode.orphan_slots = 0;
        Ok(())
    }

    /// True when this host or a live (or unrecovered) other host has `ino` open.
    pub(super) fn open_anywhere(&mut self, inode: &InodeBody) -> FsResult<bool> {
        let ino = inode.blockno;
        if self.open_counts.get(&ino).map_or(0, |c| c.total()) > 0 {
            return Ok(true);
        }
        Ok(super::namei::records_opens(inode) && self.meta.open_elsewhere(ino)?)
    }

    /// Reclaims one inode of `slot`'s table, whose host is gone (its slot is FREE, or
    /// it is this host's own slot from before this mount). Returns false when the
    /// table is empty (or the volume has none).
    pub(super) fn reclaim_one(&mut self, slot: u32) -> FsResult<bool> {
        let Some(block) = self.orphan_block(slot)? else {
            return Ok(false);
        };
        let mut table = self.load_orphans(block, slot)?;
        let Some(&ino) = table.listed().last() else {
            return Ok(false);
        };
        unlist(&mut table, ino);
        self.store_orphans(block, table);
        let mut inode = match self.inode(ino) {
            Ok(inode) => inode,
            Err(FsError::Errno(libc::ESTALE)) => {
                tracing::warn!(ino, slot, "an orphan table named a freed inode; dropped");
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let bit = 1u64 << slot;
        if inode.nlink != 0 || inode.orphan_slots & bit == 0 {
            tracing::warn!(
                ino,
                slot,
                nlink = inode.nlink,
                "an orphan table named an inode that is not its orphan; dropped"
            );
            return Ok(true);
        }
        inode.orphan_slots &= !bit;
        if self.open_anywhere(&inode)? {
            // Another host still has it open: its last close frees it.
            return self.put_inode(&inode).map(|()| true);
        }
        tracing::info!(
            ino,
            slot,
            "freeing a file unlinked while open on a host now gone"
        );
        self.free_inode(inode)?;
        Ok(true)
    }

    /// Inodes listed in `slot`'s table as on disk (no lock, for deciding whether to
    /// reclaim it at all); 0 when the volume has no tables or it does not decode.
    fn orphans_on_disk(&mut self, slot: u32) -> FsResult<u32> {
        let Some(block) = self.orphan_block(slot)? else {
            return Ok(0);
        };
        let geo = self.meta.geo;
        let mut body = vec![0u8; geo.body_len()];
        self.meta.lun.read_at(&mut body, geo.body_offset(block))?;
        Ok(OrphanTable::decode(&body, block).map_or(0, |t| t.count))
    }
}

/// Removes `ino` from a table, keeping the others; false when it was not there.
fn unlist(table: &mut OrphanTable, ino: Ino) -> bool {
    let count = table.listed().len();
    let Some(at) = table.listed().iter().position(|&i| i == ino) else {
        return false;
    };
    table.entries[at] = table.entries[count - 1];
    table.entries[count - 1] = 0;
    table.count = (count - 1) as u32;
    true
}

impl Fs {
    /// Reclaims `slot`'s orphan table, one inode per transaction. Errors are logged:
    /// what is left stays listed, and the next mount (or `fsck --repair`) finds it.
    pub fn reclaim_orphans(&self, slot: u32) -> usize {
        let mut reclaimed = 0;
        // Bounded: each round takes one entry off the table.
        for _ in 0..=ORPHAN_ENTRIES_MAX {
            match self.write(|c| c.reclaim_one(slot)) {
                Ok(true) => reclaimed += 1,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(slot, "reclaiming the orphan table: {e}");
                    break;
                }
            }
        }
        reclaimed
    }

    /// At mount: reclaims this host's own table (files it had open when it last
    /// stopped) and every FREE slot's non-empty table (a recoverer that stopped
    /// before reclaiming, or a host that unmounted with files still open).
    pub(super) fn reclaim_orphans_at_mount(&self) {
        let Some((me, node)) = self
            .core()
            .ok()
            .map(|c| (c.meta.node.me.slot, c.meta.node.clone()))
        else {
            return;
        };
        for slot in 0..node.geo.max_hosts {
            let free = node
                .view
                .slot(slot)
                .is_none_or(|v| v.image.is_none_or(|i| i.state == crate::format::SLOT_FREE));
            if slot != me && !free {
                continue;
            }
            match self.read(|c| c.orphans_on_disk(slot)) {
                Ok(0) => {}
                Ok(_) => {
                    let n = self.reclaim_orphans(slot);
                    tracing::info!(slot, reclaimed = n, "reclaimed an orphan table");
                }
                Err(e) => tracing::warn!(slot, "reading an orphan table: {e}"),
            }
        }
    }
}

impl Fs {
    /// For `atsfs recover`, after it recovered dead slots with no host mounted:
    /// mounts as a short-lived host of its own (a new host id), whose mount reclaims
    /// the orphan tables of every FREE slot, and unmounts.
    pub fn reclaim_orphans_offline(lun: std::sync::Arc<dyn crate::lun::Lun>) -> anyhow::Result<()> {
        let me = crate::cluster::HostUuid(*uuid::Uuid::new_v4().as_bytes());
        let fs = Fs::mount(lun, super::MountOptions::new(me))?;
        fs.unmount()
    }
}
