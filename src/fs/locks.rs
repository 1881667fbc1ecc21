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
//!   Otherwise the whole cache is dropped (simple, and rare when hosts work apart),
//!   and the inode is noted for the kernel (`note_kernel_stale`), as is every lock
//!   let go to another host.
//! - A lock is taken by ATS only from a valid lock record of the resource, or from
//!   an all-zero sector where mkfs left it so (`Meta::zero_is_free`): never from a
//!   sector of a block that is no longer an inode (a stale inode number), where the
//!   write would land in file data.
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
/// How long a host leaves a lock alone after giving it up to another host, unless the
/// asker took it sooner: several times an asker's longest backoff between two tries
/// (12 ms, `Fs::wait_for_lock`), so an asker that keeps trying gets its turn even on
/// a loaded machine; short, because a host whose asker went away (crashed, or its
/// operation failed) waits it out idle.
const YIELD_GRACE_MS: u64 = 100;
/// How long a host takes a lock exclusive where its operations asked for it
/// shared, after an operation of its own could not get it exclusive
/// (`Locks::want_exclusive`).
const WANT_EXCLUSIVE_MS: u64 = 1000;

#[derive(Default)]
pub struct Locks {
    held: HashMap<BlockNo, (LockState, LockMode)>,
    /// The image we left on disk when we last released a lock.
    released: HashMap<BlockNo, Vec<u8>>,
    /// When we last gave a lock up because another host asked for it: we do not take
    /// it back for `YIELD_GRACE_MS` or until the asker took it, so the asker gets its
    /// turn (`Meta::in_yield_grace`).
    yielded: HashMap<BlockNo, u64>,
    /// When an operation of this host last failed to take a lock exclusive. For
    /// `WANT_EXCLUSIVE_MS` after, the lock is taken exclusive even where shared is
    /// asked for: an operation reads a directory (shared) before it changes it
    /// (exclusive), and two hosts that both hold it shared and both want it
    /// exclusive would each keep theirs (seen: a create waiting 4 s behind a host
    /// creating in the same directory).
    want_exclusive: HashMap<BlockNo, u64>,
    /// Locks of resources created by the operation in progress: if it fails, the
    /// allocation is undone and so must the lock be.
    pub(super) created_in_op: Vec<BlockNo>,
    /// Exclusive locks of inodes this host freed, kept while it holds the lock of
    /// their allocation group (nobody else can allocate the block meanwhile), so that
    /// reusing the block for a new inode costs no I/O. Released with the group's lock.
    freed_held: std::collections::HashSet<BlockNo>,
    /// The root directory's inode: with the group headers, the only resources whose
    /// lock sector mkfs leaves all zeros (`Meta::zero_is_free`).
    pub(super) root: BlockNo,
    /// Inodes whose copies in the kernel's caches may go stale: their locks were let
    /// go to another host, or taken back after another host held them. Drained after
    /// every operation and every mailbox pass (`take_kernel_stale`), so it holds at
    /// most the locks of one operation or one release.
    kernel_stale: std::collections::HashSet<BlockNo>,
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
        if self.read_only {
            // A read-only host reads without locks (docs/locking.md, "Read-only
            // hosts") and changes nothing.
            // The sector is still read and checked as before a first acquire: a stale
            // inode number's block may hold file data now (ESTALE, `Core::inode`).
            return match mode {
                LockMode::Shared => {
                    let state =
                        read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?;
                    self.check_lock_sector(resource, &state)
                }
                LockMode::Exclusive | LockMode::MultiWriter => Err(FsError::Errno(libc::EROFS)),
            };
        }
        let mode = self.mode_to_take(resource, mode);
        let result = self.need_as(resource, mode);
        if mode == LockMode::Exclusive && matches!(result, Err(FsError::NeedLock { .. })) {
            let now_ms = self.node.clock.now_ms();
            if self.locks.want_exclusive.len() > 4096 {
                self.locks
                    .want_exclusive
                    .retain(|_, at| now_ms.saturating_sub(*at) < WANT_EXCLUSIVE_MS);
            }
            self.locks.want_exclusive.insert(resource, now_ms);
        }
        result
    }

    /// `mode`, or exclusive for a shared request while `want_exclusive` says so.
    fn mode_to_take(&self, resource: BlockNo, mode: LockMode) -> LockMode {
        let recent = |at: &u64| self.node.clock.now_ms().saturating_sub(*at) < WANT_EXCLUSIVE_MS;
        if mode == LockMode::Shared && self.locks.want_exclusive.get(&resource).is_some_and(recent)
        {
            LockMode::Exclusive
        } else {
            mode
        }
    }

    fn need_as(&mut self, resource: BlockNo, mode: LockMode) -> FsResult<()> {
        if self
            .locks
            .held_mode(resource)
            .is_some_and(|held| satisfies(held, mode))
        {
            return Ok(());
        }
        if self.in_yield_grace(resource)? {
            // Nobody to ask: the operation backs off and tries again.
            return Err(FsError::NeedLock {
                resource,
                mode,
                holders: Vec::new(),
            });
        }
        let upgrade = self
            .locks
            .held
            .get(&resource)
            .map(|(state, _)| state.clone());
        let mut state = match (&upgrade, self.locks.released.get(&resource)) {
            (Some(state), _) => state.clone(),
            (None, Some(raw)) => decode_known(raw, resource),
            // Never seen, and mkfs left it all zeros: guess it untouched; a
            // miscompare tells us the truth without a separate read.
            (None, None) if self.zero_is_free(resource) => {
                decode_known(&vec![0u8; self.geo.ats_sector_size as usize], resource)
            }
            // Never seen otherwise: the sector may not even be a lock record any more
            // (a stale inode number), so look before the ATS.
            (None, None) => {
                read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?
            }
        };
        let expected_first = state.raw.clone();
        let node = self.node.clone();
        let stale = |slot: u32, generation: u32| node.stale(slot, generation);
        for _ in 0..ATTEMPTS_MAX {
            self.check_lock_sector(resource, &state)?;
            let outcome = try_acquire(
                self.lun.as_ref(),
                &self.geo,
                &state,
                &self.node.me,
                mode,
                &stale,
            )
            .map_err(|e| wait_or_fail(e, &state, mode))?;
            match outcome {
                Ok(Acquire::Got(now)) => {
                    // Trust the cache only if nobody held the lock since we let it go.
                    let untouched = upgrade.is_some()
                        || self.locks.released.get(&resource) == Some(&expected_first)
                            && state.raw == expected_first;
                    if !untouched {
                        tracing::debug!(resource, "lock taken after another holder: cache dropped");
                        self.drop_cache();
                        self.note_kernel_stale(resource);
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

    /// True while `resource` was given up on request less than `YIELD_GRACE_MS` ago
    /// and the asker has not taken it yet (its record is still the image we left).
    fn in_yield_grace(&mut self, resource: BlockNo) -> FsResult<bool> {
        let Some(&yielded_ms) = self.locks.yielded.get(&resource) else {
            return Ok(false);
        };
        let now_ms = self.node.clock.now_ms();
        if now_ms.saturating_sub(yielded_ms) < YIELD_GRACE_MS {
            let state = read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?;
            if self.locks.released.get(&resource) == Some(&state.raw) {
                return Ok(true);
            }
        }
        self.locks.yielded.remove(&resource);
        Ok(false)
    }

    /// True for the resources whose lock sector mkfs leaves all zeros (group headers,
    /// orphan tables and the root directory): only there is an all-zero sector a free
    /// lock. Every other inode's sector holds a lock record from the moment the inode
    /// is created (`take_new`), so all zeros there means the block is no longer an
    /// inode.
    pub fn zero_is_free(&self, resource: BlockNo) -> bool {
        resource == self.locks.root
            || self.geo.is_orphan_table(resource)
            || self
                .geo
                .ag_of(resource)
                .is_some_and(|ag| self.geo.ag_header(ag) == resource)
    }

    /// Refuses to take a lock by ATS from an image that is not a lock record of the
    /// resource: an all-zero sector of a block that mkfs did not leave so is file data
    /// (or a never-used block) where a stale inode number points; an ATS from that
    /// image would write a lock record into someone's data. `Core::inode` turns the
    /// error into ESTALE, like a sector that fails to decode as a lock record.
    fn check_lock_sector(&self, resource: BlockNo, state: &LockState) -> FsResult<()> {
        if self.zero_is_free(resource) || state.raw.iter().any(|&b| b != 0) {
            return Ok(());
        }
        Err(FsError::corrupted(
            "lock record",
            resource,
            "all zeros: the block is not an inode (any more)",
        ))
    }

    /// Notes an inode whose kernel-cached attributes and names may be stale (group
    /// headers are not in the kernel's caches).
    fn note_kernel_stale(&mut self, resource: BlockNo) {
        let header = self
            .geo
            .ag_of(resource)
            .is_some_and(|ag| self.geo.ag_header(ag) == resource);
        if !header {
            self.locks.kernel_stale.insert(resource);
        }
    }

    /// The inodes noted by `note_kernel_stale` since the last call.
    pub fn take_kernel_stale(&mut self) -> Vec<BlockNo> {
        self.locks.kernel_stale.drain().collect()
    }

    /// Takes `resource`'s lock exclusive only when no other host holds it: false
    /// otherwise, without asking the holders to let it go and without making later
    /// shared takes exclusive (`want_exclusive`). For best-effort changes that must
    /// never wait for another host (an access time after a read).
    pub fn try_exclusive_without_asking(&mut self, resource: BlockNo) -> FsResult<bool> {
        if self.read_only {
            return Ok(false);
        }
        match self.need_as(resource, LockMode::Exclusive) {
            Ok(()) => Ok(true),
            Err(FsError::NeedLock { .. }) => Ok(false),
            Err(e) => Err(e),
        }
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
    /// once (`in_yield_grace`).
    pub fn yield_locks(&mut self, wanted: &[BlockNo]) -> FsResult<Vec<BlockNo>> {
        let now_ms = self.node.clock.now_ms();
        let mut released = self.release_locks(Some(wanted))?;
        // A record may name this host although it does not hold the lock: a freed
        // inode's kept lock forgotten when its block was allocated for something
        // that has not overwritten the record yet (preallocated, or an allocation
        // rolled back). Free such a record when asked, or the asker waits for nothing.
        for &resource in wanted {
            if self.locks.held.contains_key(&resource) || released.contains(&resource) {
                continue;
            }
            if self.geo.ag_of(resource).is_none() {
                continue;
            }
            let Ok(state) = read_lock(self.lun.as_ref(), &self.geo, resource) else {
                continue;
            };
            if !state.held_by(&self.node.me) {
                continue;
            }
            if let Ok(Ok(now)) = try_release(self.lun.as_ref(), &self.geo, &state, &self.node.me) {
                tracing::debug!(resource, "freed a lock record that named this host");
                self.stats.lock_releases += 1;
                self.locks.released.insert(resource, now.raw);
                released.push(resource);
            }
        }
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
        let mut targets: Vec<BlockNo> = match which {
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
        // Another host may change what these locks cover as soon as they are gone.
        self.epoch += 1;
        // After this, every freed inode whose lock we keep is in `freed_held`.
        self.sync_all()?;
        // Freed inodes' locks go with their group's lock (see `Locks::freed_held`).
        let groups: std::collections::HashSet<u64> = targets
            .iter()
            .filter_map(|&r| {
                let ag = self.geo.ag_of(r)?;
                (self.geo.ag_header(ag) == r).then_some(ag)
            })
            .collect();
        if which.is_some() && !groups.is_empty() {
            let geo = self.geo;
            let extra: Vec<BlockNo> = self
                .locks
                .freed_held
                .iter()
                .copied()
                .filter(|&r| geo.ag_of(r).is_some_and(|ag| groups.contains(&ag)))
                .filter(|r| !targets.contains(r))
                .collect();
            targets.extend(extra);
        }
        // Groups last: a kept lock is let go while its group still covers it, so a
        // release that fails part way (an I/O error, a token not taken) never leaves
        // a kept lock believed held without its group's, whose block another host
        // could then allocate and overwrite (the simulator's "damaged" lock record).
        let geo = self.geo;
        targets.sort_by_key(|&r| geo.ag_of(r).is_some_and(|ag| geo.ag_header(ag) == r));
        for &resource in &targets {
            let kept = self.locks.freed_held.remove(&resource);
            let Some((state, _)) = self.locks.held.remove(&resource) else {
                continue;
            };
            self.release_one(state, kept)?;
        }
        Ok(targets)
    }

    /// Frees one record this host holds (`state`: the image it last wrote or read).
    /// A record that no longer names this host means another host took the lock,
    /// believing this one dead: the host fences itself. Except for a freed inode's
    /// lock kept with its group (`kept`), whose record this host's own first write to
    /// the reused block may have overwritten: that is simply forgotten.
    fn release_one(&mut self, mut state: LockState, kept: bool) -> FsResult<()> {
        let resource = state.record.resource;
        for _ in 0..ATTEMPTS_MAX {
            let outcome = match try_release(self.lun.as_ref(), &self.geo, &state, &self.node.me) {
                Ok(outcome) => outcome,
                Err(crate::cluster::lock::LockError::Corrupted { .. }) if kept => return Ok(()),
                Err(crate::cluster::lock::LockError::Corrupted { reason, .. }) => {
                    return Err(self.lost_lock(resource, format!("is no lock record ({reason})")))
                }
                Err(e) => return Err(lock_error(e)),
            };
            match outcome {
                Ok(now) => {
                    self.stats.lock_releases += 1;
                    self.locks.released.insert(resource, now.raw);
                    self.note_kernel_stale(resource);
                    return Ok(());
                }
                // Another holder joined or left a shared lock: release from the new image.
                Err(now) if now.held_by(&self.node.me) => state = now,
                Err(_) if kept => return Ok(()),
                Err(now) => {
                    let names = format!("names {:?}", now.holders());
                    return Err(self.lost_lock(resource, names));
                }
            }
        }
        Ok(())
    }

    /// Fences this host: the lock record of `resource` it held now `found`.
    fn lost_lock(&mut self, resource: BlockNo, found: String) -> FsError {
        let reason = format!(
            "the lock record of resource {resource}, held by this host, now {found}: \
             another host took the lock, believing this one dead"
        );
        self.fail_for(reason.clone());
        FsError::Failed(reason)
    }

    /// Records the lock of a resource this host just created (a new inode on a block
    /// it allocated): taken exclusive by ATS from whatever the sector holds.
    pub fn take_new(&mut self, resource: BlockNo) -> FsResult<()> {
        if self.locks.freed_held.remove(&resource)
            && self.locks.held_mode(resource) == Some(LockMode::Exclusive)
        {
            // We freed this inode and kept its lock: nobody else can have taken it.
            self.locks.created_in_op.push(resource);
            return Ok(());
        }
        self.locks.released.remove(&resource);
        self.locks.held.remove(&resource);
        let mut raw = vec![0u8; self.geo.ats_sector_size as usize];
        self.lun.read_at(&mut raw, self.geo.lock_offset(resource))?;
        // Whatever a free block's sector held (old data, a dead record) is not a lock,
        // except a live host's hold: a host may take the lock of a freed inode through
        // a stale inode number (to find out that it is stale) and keep it cached.
        // Overwriting that would leave it believing it holds the new inode's lock, so
        // it is asked to let go like any holder (the allocation is rolled back and
        // retried).
        let mut state = match LockRecord::decode(&raw, resource) {
            Ok(record) => {
                let state = LockState { raw, record };
                let me = (self.node.me.slot, self.node.me.generation);
                let live: Vec<(u32, u32)> = state
                    .holders()
                    .into_iter()
                    .filter(|&(slot, generation)| {
                        (slot, generation) != me && !self.node.stale(slot, generation)
                    })
                    .collect();
                if !live.is_empty() {
                    return Err(FsError::NeedLock {
                        resource,
                        mode: LockMode::Exclusive,
                        holders: live,
                    });
                }
                state
            }
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
        if self.read_only {
            // A read-only host's opens are its own business: they keep no inode alive
            // on another host (docs/locking.md, "Read-only hosts").
            return Ok(());
        }
        let mut state = match self.locks.held.get(&resource) {
            Some((state, _)) => state.clone(),
            None => read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?,
        };
        let node = self.node.clone();
        let stale = |slot: u32, generation: u32| node.stale(slot, generation);
        let stale16 = |slot: u32, generation: u16| node.stale16(slot, generation);
        let held_mode = self.locks.held_mode(resource).unwrap_or(LockMode::Shared);
        for _ in 0..ATTEMPTS_MAX {
            self.check_lock_sector(resource, &state)?;
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
            .map_err(|e| wait_or_fail(e, &state, held_mode))?
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

    /// True when another live host has the file open. A host changes its open entries
    /// only while it holds the inode's lock (`Core::open` and `Core::release` load the
    /// inode first), so while this host holds it exclusive the record is the image it
    /// last wrote; otherwise it is read from the disk.
    pub fn open_elsewhere(&mut self, resource: BlockNo) -> FsResult<bool> {
        Ok(!self.open_slots_elsewhere(resource)?.is_empty())
    }

    /// Whether another live host has the file open for writing, and whether another
    /// live host has it open read-only (or multi-writer); see `open_elsewhere`.
    pub fn opens_elsewhere(&mut self, resource: BlockNo) -> FsResult<(bool, bool)> {
        let (writer, readers) = self.openers_elsewhere(resource)?;
        Ok((writer.is_some(), !readers.is_empty()))
    }

    /// The other hosts' slots that have the file open (live, or dead but not yet
    /// recovered), lowest first; read as `open_elsewhere` reads them.
    pub fn open_slots_elsewhere(&mut self, resource: BlockNo) -> FsResult<Vec<u32>> {
        let (writer, readers) = self.openers_elsewhere(resource)?;
        let mut slots: Vec<u32> = writer.into_iter().chain(readers).collect();
        slots.sort_unstable();
        slots.dedup();
        Ok(slots)
    }

    /// The other host that has the file open for writing, if any, and the other
    /// hosts that have it open read-only (or multi-writer), as the record says and
    /// the view does not prove stale.
    fn openers_elsewhere(&mut self, resource: BlockNo) -> FsResult<(Option<u32>, Vec<u32>)> {
        let state = match self.locks.held.get(&resource) {
            Some((state, LockMode::Exclusive)) => state.clone(),
            _ => read_lock(self.lun.as_ref(), &self.geo, resource).map_err(lock_error)?,
        };
        let r = &state.record;
        let me = self.node.me;
        let writer = (r.open_flags & crate::format::OPEN_WRITER != 0
            && r.open_writer_slot != me.slot
            && !self.node.stale(r.open_writer_slot, r.open_writer_gen))
        .then_some(r.open_writer_slot);
        let readers = (0..64u32).filter(|&s| {
            s != me.slot
                && r.open_readers & (1u64 << s) != 0
                && !self.node.stale16(s, r.open_reader_gen[s as usize])
        });
        let readers = readers.collect();
        Ok((writer, readers))
    }

    /// Forgets the kept locks of freed inodes in `[start, start + len)` (except
    /// `keep`): the blocks were just allocated for something else, which overwrites
    /// their lock sectors. Nobody else believes it holds them (we did, exclusive).
    pub fn forget_freed_locks(&mut self, start: BlockNo, len: u64, keep: Option<BlockNo>) {
        if self.locks.freed_held.is_empty() {
            return;
        }
        let gone: Vec<BlockNo> = self
            .locks
            .freed_held
            .iter()
            .copied()
            .filter(|&r| r >= start && r < start + len && Some(r) != keep)
            .collect();
        for r in gone {
            self.locks.freed_held.remove(&r);
            self.locks.held.remove(&r);
            self.locks.released.remove(&r);
        }
    }

    /// True when this host freed inode `resource` itself and keeps its lock for it:
    /// noted by the running or a committed transaction (`freed_lock`), or kept with
    /// its group (`Locks::freed_held`).
    pub fn freed_by_me(&self, resource: BlockNo) -> bool {
        self.locks.freed_held.contains(&resource)
            || self.freed_locks.iter().any(|&(r, _)| r == resource)
    }

    /// Lets go of the lock of a freed inode: kept (see `Locks::freed_held`) when it is
    /// ours exclusive and we hold its group's lock exclusive, else released.
    pub fn drop_freed(&mut self, resource: BlockNo) -> FsResult<()> {
        let group_held = self.geo.ag_of(resource).is_some_and(|ag| {
            self.locks.held_mode(self.geo.ag_header(ag)) == Some(LockMode::Exclusive)
        });
        if group_held && self.locks.held_mode(resource) == Some(LockMode::Exclusive) {
            self.locks.freed_held.insert(resource);
            return Ok(());
        }
        self.locks.freed_held.remove(&resource);
        if let Some((state, _)) = self.locks.held.remove(&resource) {
            self.epoch += 1;
            if let Ok(Ok(now)) = try_release(self.lun.as_ref(), &self.geo, &state, &self.node.me) {
                self.stats.lock_releases += 1;
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

/// A lock record whose sector stayed locked past the bound (a host stopped inside a
/// test-and-set) is treated as a lock its holders keep: the operation is rolled back
/// and retried outside the core lock (`Fs::run`), up to its 60 s bound. Never a
/// success, never a conflict.
fn wait_or_fail(e: crate::cluster::lock::LockError, state: &LockState, mode: LockMode) -> FsError {
    match e {
        crate::cluster::lock::LockError::Lun(crate::lun::LunError::AtsTimeout { .. }) => {
            FsError::NeedLock {
                resource: state.record.resource,
                mode,
                holders: state.holders(),
            }
        }
        e => lock_error(e),
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
