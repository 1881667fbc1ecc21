//! The locks this host holds, and the rules that tie them to the metadata cache.
//!
//! Every inode and every allocation group header is a locked resource. A host reads a
//! resource (and everything the resource owns: buckets, leaves, bitmaps) only while
//! it holds the lock shared or exclusive, and changes it only while it holds it
//! exclusive. Locks are kept after an operation ends ("cached") and released when
//! another host asks through our mailbox, or at unmount.
//!
//! Invariants:
//! - Before an exclusive lock is released, every change under it is committed, home,
//!   and behind the journal tail (`release_quarantine` moves the tail), so this
//!   host's journal can never again replay an old image over what the next holder
//!   writes.
//! - The metadata cache is trusted after re-acquiring a lock only if the record is
//!   exactly the image we left when we released it: nobody held it in between.
//!   Otherwise the whole cache is dropped (simple, and rare when hosts work apart).
//! - `need` never waits: when another live host holds the lock it fails with
//!   `FsError::NeedLock`; the operation is rolled back and retried by `Fs` after
//!   asking the holder, outside the core lock.

use super::meta::Meta;
use super::{FsError, FsResult};
use crate::cluster::lock::{
    read_lock, try_acquire, try_open, try_release, Acquire, LockMode, LockState, OpenKind,
};
use crate::format::{BlockNo, LockRecord, OnDisk};
use std::collections::HashMap;

/// ATS attempts on one record within one `need` (each retry follows a concurrent
/// change of the record by another host).
const ATTEMPTS_MAX: u32 = 8;
/// How long a host leaves a lock alone after giving it up to another host.
const YIELD_GRACE_MS: u64 = 50;

#[derive(Default)]
pub struct Locks {
    held: HashMap<BlockNo, (LockState, LockMode)>,
    /// The image we left on disk when we last released a lock.
    released: HashMap<BlockNo, Vec<u8>>,
    /// When we last gave a lock up because another host asked for it: we do not take
    /// it back for `YIELD_GRACE_MS`, so the asker gets its turn.
    yielded: HashMap<BlockNo, u64>,
    /// Locks of resources created by the operation in progress: if it fails, the
    /// allocation is undone and so must the lock be.
    pub(super) created_in_op: Vec<BlockNo>,
}

impl Locks {
    pub fn held_mode(&self, resource: BlockNo) -> Option<LockMode> {
        self.held.get(&resource).map(|(_, mode)| *mode)
    }

    pub fn held(&self) -> Vec<(BlockNo, LockMode)> {
        self.held.iter().map(|(&r, (_, m))| (r, *m)).collect()
    }
}

fn satisfies(held: LockMode, want: LockMode) -> bool {
    held == want || held == LockMode::Exclusive
}

impl Meta {
    /// Takes `resource`'s lock in `mode` if this host does not hold it so already.
    pub fn need(&mut self, resource: BlockNo, mode: LockMode) -> FsResult<()> {
        if self
            .locks
            .held_mode(resource)
            .is_some_and(|held| satisfies(held, mode))
        {
            return Ok(());
        }
        let upgrade = self
            .locks
            .held
            .get(&resource)
            .map(|(state, _)| state.clone());
        let mut state = match (&upgrade, self.locks.released.get(&resource)) {
            (Some(state), _) => state.clone(),
            (None, Some(raw)) => decode_known(raw, resource),
            // Never seen: guess an untouched (all-zero) record; a miscompare tells us
            // the truth without a separate read.
            (None, None) => decode_known(&vec![0u8; self.geo.ats_sector_size as usize], resource),
        };
        let expected_first = state.raw.clone();
        let node = self.node.clone();
        let stale = |slot: u32, generation: u32| node.stale(slot, generation);
        for _ in 0..ATTEMPTS_MAX {
            let outcome = try_acquire(
                self.lun.as_ref(),
                &self.geo,
                &state,
                &self.node.me,
                mode,
                &stale,
            )
            .map_err(lock_error)?;
            match outcome {
                Ok(Acquire::Got(now)) => {
                    // Trust the cache only if nobody held the lock since we let it go.
                    let untouched = upgrade.is_some()
                        || self.locks.released.get(&resource) == Some(&expected_first)
                            && state.raw == expected_first;
                    if !untouched {
                        self.drop_cache();
                    }
                    self.stats.lock_acquires += 1;
                    self.locks.held.insert(resource, (now, mode));
                    return Ok(());
                }
                Ok(Acquire::Held(now)) => {
                    return Err(FsError::NeedLock {
                        resource,
                        mode,
                        holders: now.holders(),
                    })
                }
                Err(now) => state = now,
            }
        }
        Err(FsError::NeedLock {
            resource,
            mode,
            holders: state.holders(),
        })
    }

    /// Like `need`, but false instead of an error when another host holds the lock.
    pub fn try_need(&mut self, resource: BlockNo, mode: LockMode) -> FsResult<bool> {
        match self.need(resource, mode) {
            Ok(()) => Ok(true),
            Err(FsError::NeedLock { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Releases locks other hosts asked for, and remembers not to take them back at
    /// once.
    pub fn yield_locks(&mut self, wanted: &[BlockNo]) -> FsResult<Vec<BlockNo>> {
        let released = self.release_locks(Some(wanted))?;
        let now_ms = self.node.clock.now_ms();
        for &resource in &released {
            self.locks.yielded.insert(resource, now_ms);
        }
        if self.locks.yielded.len() > 4096 {
            self.locks
                .yielded
                .retain(|_, at| now_ms.saturating_sub(*at) < YIELD_GRACE_MS);
        }
        Ok(released)
    }

    /// Releases the given locks (all when `None`): commits, moves the journal tail,
    /// then frees each record. Returns the resources released.
    pub fn release_locks(&mut self, which: Option<&[BlockNo]>) -> FsResult<Vec<BlockNo>> {
        let targets: Vec<BlockNo> = match which {
            Some(list) => list
                .iter()
                .copied()
                .filter(|r| self.locks.held.contains_key(r))
                .collect(),
            None => self.locks.held.keys().copied().collect(),
        };
        if targets.is_empty() {
            return Ok(targets);
        }
        self.sync_all()?;
        for &resource in &targets {
            let Some((mut state, _)) = self.locks.held.remove(&resource) else {
                continue;
            };
            for _ in 0..ATTEMPTS_MAX {
                match try_release(self.lun.as_ref(), &self.geo, &state, &self.node.me)
                    .map_err(lock_error)?
                {
                    Ok(now) => {
                        self.locks.released.insert(resource, now.raw);
                        break;
                    }
                    // Another holder joined or left a shared lock: release from the new image.
                    Err(now) if now.held_by(&self.node.me) => state = now,
                    Err(_) => break,
                }
            }
        }
        Ok(targets)
    }

    /// Records the lock of a resource this host just created (a new inode on a block
    /// it allocated): taken exclusive by ATS from whatever the sector holds.
    pub fn take_new(&mut self, resource: BlockNo) -> FsResult<()> {
        self.locks.released.remove(&resource);
        self.locks.held.remove(&resource);
        let mut raw = vec![0u8; self.geo.ats_sector_size as usize];
        self.lun.read_at(&mut raw, self.geo.lock_offset(resource))?;
        // Whatever a free block's sector held (old data, a dead record) is not a lock.
        let mut state = match LockRecord::decode(&raw, resource) {
            Ok(record) => LockState { raw, record },
            Err(_) => {
                let mut record: LockRecord = bytemuck::Zeroable::zeroed();
                record.resource = resource;
                LockState { raw, record }
            }
        };
        state.record.mode = crate::format::LOCK_FREE;
        state.record.shared_slots = 0;
        state.record.open_flags = 0;
        state.record.open_readers = 0;
        let always_stale = |_: u32, _: u32| true;
        match try_acquire(
            self.lun.as_ref(),
            &self.geo,
            &state,
            &self.node.me,
            LockMode::Exclusive,
            &always_stale,
        )
        .map_err(lock_error)?
        {
            Ok(Acquire::Got(now)) => {
                self.locks.held.insert(resource, (now, LockMode::Exclusive));
                self.locks.created_in_op.push(resource);
                Ok(())
            }
            _ => Err(FsError::corrupted(
                "lock record",
                resource,
                "changed while the block was being allocated",
            )),
        }
    }

    /// Records (or, with `add = false`, removes) this host's open of a file in its
    /// lock record. EBUSY when another live host's open conflicts.
    pub fn set_open(&mut self, resource: BlockNo, kind: OpenKind, add: bool) -> FsResult<()> {
        let mut state = match self.locks.held.get(&resource) {
            Some((state, _)) => state.clone(),
            None => read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?,
        };
        let node = self.node.clone();
        let stale = |slot: u32, generation: u32| node.stale(slot, generation);
        let stale16 = |slot: u32, generation: u16| node.stale16(slot, generation);
        for _ in 0..ATTEMPTS_MAX {
            match try_open(
                self.lun.as_ref(),
                &self.geo,
                &state,
                &self.node.me,
                kind,
                add,
                &stale,
                &stale16,
            )
            .map_err(lock_error)?
            {
                Ok(Some(now)) => {
                    match self.locks.held.get_mut(&resource) {
                        Some(held) => held.0 = now,
                        None => {
                            self.locks.released.insert(resource, now.raw);
                        }
                    }
                    return Ok(());
                }
                Ok(None) => return Err(FsError::Errno(libc::EBUSY)),
                Err(now) => state = now,
            }
        }
        Err(FsError::Errno(libc::EBUSY))
    }

    /// True when another live host has the file open (read from the disk: open
    /// entries change without the metadata lock).
    pub fn open_elsewhere(&mut self, resource: BlockNo) -> FsResult<bool> {
        let state = read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?;
        let r = &state.record;
        let me = self.node.me;
        let writer = r.open_flags & crate::format::OPEN_WRITER != 0
            && r.open_writer_slot != me.slot
            && !self.node.stale(r.open_writer_slot, r.open_writer_gen);
        let reader = (0..64u32).any(|s| {
            s != me.slot
                && r.open_readers & (1u64 << s) != 0
                && !self.node.stale16(s, r.open_reader_gen[s as usize])
        });
        Ok(writer || reader)
    }

    /// Forgets a lock whose resource was freed (its record is released with it).
    pub fn drop_freed(&mut self, resource: BlockNo) -> FsResult<()> {
        if let Some((state, _)) = self.locks.held.remove(&resource) {
            if let Ok(Ok(now)) = try_release(self.lun.as_ref(), &self.geo, &state, &self.node.me) {
                self.locks.released.insert(resource, now.raw);
            }
        }
        Ok(())
    }
}

fn decode_known(raw: &[u8], resource: BlockNo) -> LockState {
    let record = LockRecord::decode(raw, resource).unwrap_or_else(|_| {
        let mut record: LockRecord = bytemuck::Zeroable::zeroed();
        record.resource = resource;
        record
    });
    LockState {
        raw: raw.to_vec(),
        record,
    }
}

fn lock_error(e: crate::cluster::lock::LockError) -> FsError {
    match e {
        crate::cluster::lock::LockError::Lun(e) => FsError::Io(e),
        crate::cluster::lock::LockError::Corrupted { resource, reason } => {
            FsError::corrupted("lock record", resource, reason)
        }
    }
}
