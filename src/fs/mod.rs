//! The filesystem core: namespace, inodes, directories, file data, allocation, on top
//! of the journal and the cluster layer. Usable without FUSE: tests start hosts in
//! one process and call it directly.
//!
//! Concurrency: one `Mutex<Core>` per mounted host serialises metadata operations;
//! the FUSE adapter may call from many threads.
//!
//! Every operation that changes metadata runs inside the running transaction
//! (`meta::Meta`), committed by `fsync`, by the background syncer every
//! `commit_interval`, when the transaction grows large, and at unmount.

mod alloc;
pub mod atime;
pub(crate) mod dir;
pub(crate) mod file;
pub(crate) mod inode;
mod locks;
pub mod meta;
mod mount;
mod namei;
pub mod nodes;
mod orphan;
pub(crate) mod readahead;
pub(crate) mod xattr;

pub use inode::{Attr, INODE_FLAG_FREED};
pub use mount::{read_superblock, MountOptions};
pub use namei::{SetAttr, SetTime};

use crate::cluster::{Lease, Membership};
use crate::format::{FormatError, Superblock};
use crate::journal::JournalError;
use crate::lun::LunError;
use meta::Meta;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;

/// An inode number: the block number of the inode's resource.
pub type Ino = u64;

/// Receives directory entries: (ino, offset of the next entry, DT_* type, name);
/// returns true when the caller's buffer is full.
pub type DirSink<'a> = dyn FnMut(Ino, u64, u8, &[u8]) -> bool + 'a;

#[derive(Debug, Error)]
pub enum FsError {
    /// A POSIX error for the caller (ENOENT, EEXIST, ...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    #[error("no space left on the volume")]
    NoSpace,
    #[error(transparent)]
    Io(#[from] LunError),
    #[error(transparent)]
    Corrupted(FormatError),
    #[error("this host can no longer write: {0}")]
    Failed(String),
    /// Another live host holds a lock this operation needs; `Fs` asks it to let go
    /// and retries the operation.
    #[error("resource {resource} is locked by another host")]
    NeedLock {
        resource: u64,
        mode: crate::cluster::lock::LockMode,
        holders: Vec<(u32, u32)>,
    },
}

impl FsError {
    pub fn corrupted(what: &'static str, block: u64, reason: impl Into<String>) -> FsError {
        FsError::Corrupted(FormatError::corrupted(what, block, reason))
    }

    /// The errno for the FUSE reply.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Errno(e) => *e,
            FsError::NoSpace => libc::ENOSPC,
            FsError::Io(e) => e.errno(),
            FsError::Corrupted(_) | FsError::Failed(_) => libc::EIO,
            FsError::NeedLock { .. } => libc::EAGAIN,
        }
    }
}

impl From<JournalError> for FsError {
    fn from(e: JournalError) -> FsError {
        match e {
            JournalError::Lun(e) => FsError::Io(e),
            JournalError::Format(e) => FsError::Corrupted(e),
            JournalError::TooLarge(n) => FsError::Failed(format!(
                "a transaction of {n} images does not fit the journal"
            )),
            e @ (JournalError::Nonce { .. } | JournalError::BadTarget { .. }) => {
                FsError::Failed(e.to_string())
            }
        }
    }
}

impl From<FormatError> for FsError {
    fn from(e: FormatError) -> FsError {
        FsError::Corrupted(e)
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// How long an operation waits for another host's lock before failing with EAGAIN.
/// A dead holder is recovered well within it (lease + interval).
const LOCK_WAIT_MAX_MS: u64 = 60_000;
/// The longest middle of the backoff between two tries at a lock another host
/// holds (each sleep is half of it plus up to all of it at random). Short, because
/// the wait is usually for a handover already asked for: the holder gives the lock
/// up within one mailbox tick (20 ms), and then waits for this asker to take it
/// (`YIELD_GRACE_MS`), idle, so every millisecond the asker sleeps past the release
/// is lost by both hosts. Measured: a cap of 100 ms gave two hosts creating in one
/// directory 0.08x one host's rate, 8 ms gave 0.68x (`cargo xtask bench`).
const BACKOFF_CAP_MS: u64 = 8;

/// How often a read-only host reads an operation's structures again when one fails
/// its checks (a write home in progress on another host) before it reports EIO.
const READ_ONLY_RETRIES_MAX: u32 = 4;

/// Everything a host's operations share, behind one lock.
pub struct Core {
    pub meta: Meta,
    pub sb: Superblock,
    /// Open handles per inode: an unlinked inode is freed at its last close.
    open_counts: HashMap<Ino, OpenCount>,
    last_generation: u64,
}

/// This host's open handles on one inode, by kind. The lock record says which hosts
/// have the file open; these counts say when this host's entry can go.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenCount {
    pub read: u32,
    pub write: u32,
}

impl OpenCount {
    pub fn total(&self) -> u32 {
        self.read + self.write
    }
}

/// A host's counters since mount (`atsfs stats`, the `user.atsfs.stats` xattr).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HostStats {
    pub slot: u32,
    /// The process serving the mount (`atsfs umount` waits for it to exit).
    pub pid: u32,
    /// The volume's lease: how long the others wait before they take a silent
    /// host's slot (bounds `atsfs umount`'s wait).
    pub lease_ms: u32,
    /// Device I/O the filesystem issued (not the membership thread's heartbeats).
    pub io: crate::lun::IoStats,
    /// Journal transactions written.
    pub commits: u64,
    pub committed_images: u64,
    /// Transactions that waited for a group commit.
    pub sealed_transactions: u64,
    /// Groups committed by the committer thread while operations went on.
    pub pipelined_commits: u64,
    pub lock_acquires: u64,
    /// Locks let go by ATS (asked for by other hosts, at unmount, freed inodes').
    pub lock_releases: u64,
    pub locks_held: u64,
    /// Ranges of sequential O_DIRECT reads read ahead, and reads they served.
    pub readaheads: u64,
    pub readahead_hits: u64,
}

/// Volume-wide usage, for statfs.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub free_blocks: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// One mounted host.
pub struct Fs {
    core: Mutex<Core>,
    /// Entered by data reads done outside the core lock; see `file::ReadPlan`.
    data_io: Arc<readahead::IoBarrier>,
    /// Read-ahead of sequential O_DIRECT reads.
    readahead: readahead::ReadAhead,
    /// Device I/O this host's filesystem issued (heartbeats and mailbox polls of the
    /// membership thread are not included).
    io_counters: Arc<crate::lun::IoCounters>,
    root: Ino,
    lease: Arc<Lease>,
    membership: Mutex<Option<Membership>>,
    /// Slots this host recovered while waiting for a lock, whose orphan tables the
    /// service thread reclaims next (not inside the waiting operation).
    orphans_pending: Mutex<Vec<u32>>,
    /// Where this host's mailbox is (read without the core lock).
    mailbox: MailboxRef,
    /// Lock requests read from the mailbox and not yet yielded (`yield_requested`).
    yield_wanted: Mutex<Vec<crate::format::BlockNo>>,
    pub options: MountOptions,
    /// The inodes the kernel holds through this host's mount, with their generations.
    nodes: nodes::KernelNodes,
    /// The kernel's caches, when a FUSE adapter connected them.
    kernel_cache: std::sync::OnceLock<Box<dyn KernelCache>>,
}

/// This host's mailbox sector: the LUN, the geometry and the slot.
pub(super) struct MailboxRef {
    lun: Arc<dyn crate::lun::Lun>,
    geo: crate::format::Geometry,
    slot: u32,
}

/// The kernel's caches of a mount, as the FUSE adapter invalidates them.
pub trait KernelCache: Send + Sync {
    /// Drops the kernel's cached attributes of `ino` (not its pages: the kernel drops
    /// a file's pages at every open, and another host cannot write a file while this
    /// one has it open; with FUSE_AUTO_INVAL_DATA a read of cached pages whose
    /// attributes are stale asks the daemon first). Must not block on a request of
    /// this mount. No names: see the adapter's `FuseCache` for why.
    fn inval_attrs(&self, ino: Ino);
}

/// Most nodes whose kernel caches a fenced host drops (`drop_kernel_caches`); the
/// rest expire with their TTLs.
const FENCED_INVALS_MAX: usize = 1 << 16;

impl Fs {
    /// The root directory's inode number.
    pub fn root(&self) -> Ino {
        self.root
    }

    pub fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }

    /// This host's slot and generation.
    pub fn slot(&self) -> Option<(u32, u32)> {
        self.membership
            .lock()
            .ok()
            .and_then(|m| m.as_ref().map(|m| (m.slot, m.generation)))
    }

    fn core(&self) -> FsResult<MutexGuard<'_, Core>> {
        let core = self
            .core
            .lock()
            .map_err(|_| FsError::Failed("an earlier operation panicked".into()))?;
        core.meta.check_healthy()?;
        Ok(core)
    }

    /// Runs a read-only operation (it may still take shared locks).
    fn read<T>(&self, op: impl FnMut(&mut Core) -> FsResult<T>) -> FsResult<T> {
        self.run(false, op)
    }

    /// Runs a mutating operation inside the running transaction.
    fn write<T>(&self, op: impl FnMut(&mut Core) -> FsResult<T>) -> FsResult<T> {
        self.run(true, op)
    }

    /// Runs a read-only operation on inodes the kernel named (`inos`): each must
    /// still be the inode the kernel looked up (`nodes`), else ESTALE.
    fn read_on<T>(&self, inos: &[Ino], op: impl FnMut(&mut Core) -> FsResult<T>) -> FsResult<T> {
        self.run(false, self.checked(inos, op))
    }

    /// Runs a mutating operation on inodes the kernel named, checked as `read_on`.
    fn write_on<T>(&self, inos: &[Ino], op: impl FnMut(&mut Core) -> FsResult<T>) -> FsResult<T> {
        self.run(true, self.checked(inos, op))
    }

    /// `op`, after checking that each of `inos` the kernel holds still has the
    /// generation the kernel knows it by. Checked under the core lock, in the same
    /// attempt as the operation, so no other host can free the inode in between.
    fn checked<T>(
        &self,
        inos: &[Ino],
        mut op: impl FnMut(&mut Core) -> FsResult<T>,
    ) -> impl FnMut(&mut Core) -> FsResult<T> {
        let expected: Vec<(Ino, u64)> = inos
            .iter()
            .filter_map(|&ino| Some((ino, self.nodes.generation(ino)?)))
            .collect();
        move |c: &mut Core| {
            for &(ino, generation) in &expected {
                c.check_generation(ino, generation)?;
            }
            op(c)
        }
    }

    /// The kernel got `attr`'s inode in a reply (one more lookup to forget).
    pub fn remember(&self, attr: &Attr) {
        self.nodes.remember(attr.ino, attr.generation);
    }

    /// Connects the kernel's caches (the FUSE adapter's notifier): from now on they
    /// are invalidated when another host may change what they hold.
    pub fn set_kernel_cache(&self, cache: Box<dyn KernelCache>) {
        if self.kernel_cache.set(cache).is_err() {
            tracing::warn!("a kernel cache was connected twice; the second is ignored");
        }
    }

    /// Invalidates what the kernel caches of `stale` inodes (locks this host let go
    /// to another host, or took back changed): the attributes of each node the
    /// kernel holds. Called without the core lock, before the reply.
    fn invalidate_kernel(&self, stale: Vec<Ino>) {
        let Some(cache) = self.kernel_cache.get() else {
            return;
        };
        for ino in stale {
            if self.nodes.generation(ino).is_some() {
                cache.inval_attrs(ino);
            }
        }
    }

    /// Drops the kernel's cached attributes of every node of this mount once the host
    /// is fenced: it must not answer from caches that other hosts may have made stale
    /// since its lease ran out. The next stat, and (FUSE_AUTO_INVAL_DATA) the next
    /// read of cached pages, then asks the daemon, which answers EIO.
    pub(super) fn drop_kernel_caches(&self) {
        let Some(cache) = self.kernel_cache.get() else {
            return;
        };
        // The root is the one node the kernel holds without a lookup.
        let known = self.nodes.all(FENCED_INVALS_MAX);
        for ino in std::iter::once(self.root).chain(known) {
            cache.inval_attrs(ino);
        }
    }

    /// The kernel forgot `lookups` of its lookups of `ino`.
    pub fn forget(&self, ino: Ino, lookups: u64) {
        self.nodes.forget(ino, lookups);
    }

    /// Fails with EIO once the lease has run out (`Lease::confirm`). Every operation
    /// checks it when it starts (a fenced host changes nothing, not even in memory,
    /// and answers nothing from its caches) and again just before it answers: what it
    /// read is only known to be current while this host still holds its locks, and
    /// after the lease ran out another host may have recovered it, broken its locks
    /// and changed what it read (or reused the blocks of an extent map it followed).
    fn leased<T>(&self, result: FsResult<T>) -> FsResult<T> {
        self.lease.confirm()?;
        result
    }

    /// Runs an operation; when it needs a lock another host holds, rolls it back,
    /// asks the holder (or recovers it, if dead) outside the core lock, and retries.
    fn run<T>(&self, mutating: bool, mut op: impl FnMut(&mut Core) -> FsResult<T>) -> FsResult<T> {
        if mutating && self.options.read_only {
            return Err(FsError::Errno(libc::EROFS));
        }
        let clock = self.lease.clock().clone();
        let started = clock.now_ms();
        let mut unsettled_reads = 0u32;
        for attempt in 0u32.. {
            self.lease.confirm()?;
            let (result, stale) = {
                let mut core = self.core()?;
                if self.options.read_only {
                    // No lock tells a read-only host when another host changed what
                    // it cached: every operation reads the disk afresh.
                    core.meta.drop_cache();
                }
                self.yield_requested(&mut core)?;
                core.meta.settle_if_done()?;
                // Also before an operation that is not "mutating" but may add to the
                // running transaction (an atime update after a read): reads alone must
                // not grow it past what one journal transaction holds.
                if !self.options.read_only && core.meta.tx_len() > meta::TX_SOFT_LIMIT {
                    core.meta.seal()?;
                }
                if mutating {
                    core.meta.epoch += 1;
                }
                core.meta.begin_op();
                let result = op(&mut core);
                core.meta.end_op(result.is_ok());
                (result, core.meta.take_kernel_stale())
            };
            // Before the caller replies: the kernel must not serve the old attributes
            // to the request that follows this one (see `invalidate_kernel`).
            self.invalidate_kernel(stale);
            if self.options.read_only && matches!(result, Err(FsError::Corrupted(_))) {
                // Read without a lock, a structure may be caught halfway through
                // another host's write home: read it again a little later.
                unsettled_reads += 1;
                if unsettled_reads <= READ_ONLY_RETRIES_MAX {
                    tracing::debug!(
                        attempt,
                        "read-only host: {result:?}; reading again",
                        result = result.as_ref().err()
                    );
                    clock.sleep(std::time::Duration::from_millis(
                        u64::from(unsettled_reads) * 5,
                    ));
                    continue;
                }
            }
            let Err(FsError::NeedLock {
                resource,
                mode,
                holders,
            }) = result
            else {
                return self.leased(result);
            };
            if clock.now_ms().saturating_sub(started) > LOCK_WAIT_MAX_MS {
                tracing::warn!(resource, ?holders, "gave up waiting for a lock");
                return Err(FsError::Errno(libc::EAGAIN));
            }
            self.wait_for_lock(resource, mode, &holders, attempt);
        }
        Err(FsError::Errno(libc::EAGAIN))
    }

    /// Asks the holders of a lock to release it (recovering dead ones), then backs off
    /// with jitter so that two hosts that want each other's locks do not keep colliding.
    fn wait_for_lock(
        &self,
        resource: u64,
        mode: crate::cluster::lock::LockMode,
        holders: &[(u32, u32)],
        attempt: u32,
    ) {
        let Some(node) = self.core.lock().ok().map(|c| c.meta.node.clone()) else {
            return;
        };
        if attempt % 50 == 49 {
            let stale: Vec<bool> = holders.iter().map(|&(s, g)| node.stale(s, g)).collect();
            tracing::debug!(
                me = node.me.slot,
                resource,
                ?mode,
                ?holders,
                ?stale,
                attempt,
                "still waiting for a lock"
            );
        }
        if let Err(e) = node.refresh() {
            tracing::warn!("reading the heartbeat region: {e:#}");
        }
        let code = match mode {
            crate::cluster::lock::LockMode::Exclusive => crate::format::LOCK_EXCLUSIVE,
            crate::cluster::lock::LockMode::Shared => crate::format::LOCK_SHARED,
            crate::cluster::lock::LockMode::MultiWriter => crate::format::LOCK_MULTI_WRITER,
        };
        for &(slot, _) in holders.iter().filter(|&&(slot, _)| slot != node.me.slot) {
            let outcome = match node.recover_if_dead(slot) {
                Ok(true) => {
                    if let Ok(mut pending) = self.orphans_pending.lock() {
                        pending.push(slot);
                    }
                    Ok(())
                }
                Ok(false) => node.ask_release(slot, resource, code),
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::warn!(slot, resource, "asking for a lock: {e:#}");
            }
        }
        let base_ms = (2u64 << attempt.min(6)).min(BACKOFF_CAP_MS);
        let jitter = rand::random::<u64>() % (base_ms + 1);
        node.clock
            .sleep(std::time::Duration::from_millis(base_ms / 2 + jitter));
    }

    pub fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        self.read_on(&[ino], |c| c.inode(ino).map(|i| inode::attr_of(&i)))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        self.read_on(&[parent], |c| c.lookup(parent, name))
    }

    pub fn setattr(&self, ino: Ino, set: &SetAttr) -> FsResult<Attr> {
        self.write_on(&[ino], |c| c.setattr(ino, set))
    }

    /// Creates a regular file, fifo, socket or device node.
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.write_on(&[parent], |c| {
            c.create_node(parent, name, mode, rdev, uid, gid, None)
        })
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        let mode = (mode & 0o7777) | libc::S_IFDIR;
        self.write_on(&[parent], |c| {
            c.create_node(parent, name, mode, 0, uid, gid, None)
        })
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.write_on(&[parent], |c| {
            c.create_node(
                parent,
                name,
                libc::S_IFLNK | 0o777,
                0,
                uid,
                gid,
                Some(target),
            )
        })
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.read_on(&[ino], |c| c.readlink(ino))
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        self.write_on(&[ino, parent], |c| c.link(ino, parent, name))
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.write_on(&[parent], |c| c.unlink(parent, name, false))
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.write_on(&[parent], |c| c.unlink(parent, name, true))
    }

    /// Renames; `flags` takes RENAME_NOREPLACE and RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.write_on(&[parent, new_parent], |c| {
            c.rename(parent, name, new_parent, new_name, flags)
        })
    }

    /// Opens a file: records this host's open in the file's lock record (VMFS
    /// semantics: an open for writing fails with EBUSY while another host has the
    /// file open, a read-only open while another host has it open for writing).
    /// Returns the attributes and whether the file is multi-writer (direct I/O).
    pub fn open(&self, ino: Ino, write: bool) -> FsResult<(Attr, bool)> {
        if write && self.options.read_only {
            return Err(FsError::Errno(libc::EROFS));
        }
        self.open_op(&[ino], |c| c.open(ino, write))
    }

    /// Opens a directory: like `open` for reading (the directory outlives its
    /// removal until the handle is released with `release`).
    pub fn opendir(&self, ino: Ino) -> FsResult<Attr> {
        self.open_op(&[ino], |c| c.open_dir(ino))
    }

    /// Drops an open handle; frees the inode if it was unlinked meanwhile.
    pub fn release(&self, ino: Ino, write: bool) -> FsResult<()> {
        self.open_op(&[], |c| c.release(ino, write))
    }

    /// Runs an open or a release: a change of the lock record (who has the file
    /// open) on a read-write host, a read on a read-only one, which records nothing.
    fn open_op<T>(&self, inos: &[Ino], op: impl FnMut(&mut Core) -> FsResult<T>) -> FsResult<T> {
        if self.options.read_only {
            self.read_on(inos, op)
        } else {
            self.write_on(inos, op)
        }
    }

    /// Reads file data. The blocks are mapped under the core lock and read without
    /// it, so reads (the kernel's read-ahead sends several at once) run in parallel
    /// with each other and with metadata operations.
    pub fn read_data(&self, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = Vec::new();
        let range = self.read_into(ino, offset, size, &mut buf, false)?;
        buf.truncate(range.end);
        buf.drain(..range.start);
        Ok(buf)
    }

    /// Like `read_data`, into a buffer the caller reuses; returns where the bytes are.
    /// `uncached` reads (O_DIRECT) bypass the image file's page cache; when they come
    /// one at a time, each where the last ended, the next ranges are read ahead
    /// (`readahead`).
    pub fn read_into(
        &self,
        ino: Ino,
        offset: u64,
        size: u32,
        buf: &mut Vec<u8>,
        uncached: bool,
    ) -> FsResult<std::ops::Range<usize>> {
        // A read-only host drops its cache (and moves the epoch) at every operation,
        // so a read-ahead would never serve the next read: none is issued there.
        let read_ahead = uncached && !self.options.read_only;
        let candidate = if read_ahead {
            self.readahead.take(ino, offset, size)
        } else {
            None
        };
        let (_reading, ahead) = if read_ahead {
            let (reading, ahead) = self.readahead.note_read(ino, offset, size);
            (Some(reading), ahead)
        } else {
            (None, Vec::new())
        };
        let (plan, epoch, lun, token, next, atime_due) = self.read_on(&[ino], |c| {
            let plan = c.plan_read(ino, offset, size as usize)?;
            let atime_due = self.atime_due(c, ino)?;
            let epoch = c.meta.epoch;
            let lun = c.meta.lun.clone();
            let mut next = Vec::new();
            if plan.may_read_ahead() {
                for &at in &ahead {
                    let Ok(plan) = c.plan_read(ino, at, size as usize) else {
                        break;
                    };
                    if !plan.may_read_ahead() {
                        break;
                    }
                    next.push(readahead::Next {
                        ino,
                        offset: at,
                        size,
                        epoch,
                        plan,
                        lun: lun.clone(),
                        // Entered before the core lock is let go: see `file::ReadPlan`.
                        token: self.data_io.enter(),
                    });
                }
            }
            let token = plan.needs_io().then(|| self.data_io.enter());
            Ok((plan, epoch, lun, token, next, atime_due))
        })?;
        for next in next {
            self.readahead.start(next);
        }
        // A read-ahead serves only a host sure of its lease (another host may have
        // taken over the file's lock from one that is not).
        let candidate = candidate.filter(|_| self.lease.check().is_ok());
        let result = match self.readahead.settle(candidate, epoch, &plan, buf) {
            Some(range) => Ok(range),
            None => plan.execute_into(lun.as_ref(), buf, uncached),
        };
        drop(token);
        // Only once the data I/O barrier is let go: the atime update waits for the core
        // lock, whose holder may be waiting for the barrier to be idle (a sync or a
        // lock release in `release_quarantine`), and may itself release locks.
        if atime_due {
            self.touch_atime(ino);
        }
        // The blocks were mapped under the lease; they are still this file's only if
        // the lease still runs now that they have been read.
        self.leased(result)
    }

    /// Read-ahead counters: ranges read ahead, and reads they served.
    pub fn readahead_stats(&self) -> readahead::ReadAheadStats {
        self.readahead.stats()
    }

    pub fn write_data(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.write_on(&[ino], |c| c.write_file(ino, offset, data))
    }

    /// Makes the file's data and all metadata committed so far durable.
    pub fn fsync(&self, _ino: Ino, _datasync: bool) -> FsResult<()> {
        if self.options.read_only {
            // Nothing of a read-only host waits to be written.
            return self.read(|_| Ok(()));
        }
        self.write(|c| c.meta.commit())
    }

    /// Commits the running transaction (the background syncer, `sync`).
    pub fn sync(&self) -> FsResult<()> {
        let core = self.core()?;
        if !core.meta.has_uncommitted()
            && !core.meta.data_dirty
            && !core.meta.has_committed_quarantine()
        {
            return Ok(());
        }
        drop(core);
        self.write(|c| c.meta.sync_all())
    }

    /// The periodic commit of the service thread: like `sync`, but the commit itself
    /// runs on the committer thread while operations go on (`Meta::background_commit`).
    pub fn background_sync(&self) -> FsResult<()> {
        let core = self.core()?;
        if !core.meta.has_uncommitted()
            && !core.meta.data_dirty
            && !core.meta.has_committed_quarantine()
        {
            return Ok(());
        }
        drop(core);
        self.write(|c| c.meta.background_commit())
    }

    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        self.write_on(&[ino], |c| c.fallocate(ino, offset, len, mode))
    }

    /// Lists a directory after `offset` (0 = from the start, including "." and "..").
    /// `emit(ino, next_offset, dtype, name)` returns true when the caller's buffer is
    /// full.
    pub fn readdir(&self, ino: Ino, offset: u64, emit: &mut DirSink<'_>) -> FsResult<()> {
        let atime_due = self.read_on(&[ino], |c| {
            c.readdir(ino, offset, emit)?;
            self.atime_due(c, ino)
        })?;
        if atime_due {
            self.touch_atime(ino);
        }
        Ok(())
    }

    /// True when a read of `ino` must update its atime on this host (never on a
    /// read-only one: that would be a write).
    fn atime_due(&self, c: &mut Core, ino: Ino) -> FsResult<bool> {
        if self.options.read_only {
            return Ok(false);
        }
        c.atime_due(ino, self.options.atime, self.options.nodiratime)
    }

    /// Updates `ino`'s atime after a read (`fs::atime`): one inode image in the
    /// running transaction, committed with the next periodic commit. It may wait for
    /// the inode's lock like any change (with relatime, at most once per change of
    /// the file or per day). A failure fails nothing: the read has its bytes.
    fn touch_atime(&self, ino: Ino) {
        let (mode, nodiratime) = (self.options.atime, self.options.nodiratime);
        // Not a "mutating" run: the data a read-ahead holds stays valid.
        let result = self.run(
            false,
            self.checked(&[ino], |c| c.touch_atime(ino, mode, nodiratime)),
        );
        if let Err(e) = result {
            tracing::debug!(ino, "access time not updated: {e}");
        }
    }

    pub fn statfs(&self) -> FsResult<StatFs> {
        self.read(|c| {
            Ok(StatFs {
                blocks: c.meta.geo.data_blocks(),
                free_blocks: c.meta.free_blocks()?,
                block_size: crate::format::BLOCK_SIZE as u32,
                name_max: crate::format::NAME_MAX as u32,
            })
        })
    }

    /// Reads an xattr. `user.atsfs.stats` on the root directory is the host's
    /// counters as JSON (`HostStats`), made up at each read and stored nowhere.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        if name == xattr::STATS_XATTR {
            if ino != self.root {
                return Err(FsError::Errno(libc::ENODATA));
            }
            let stats = self.host_stats()?;
            return serde_json::to_vec(&stats)
                .map_err(|e| FsError::Failed(format!("encoding the stats: {e}")));
        }
        self.read_on(&[ino], |c| c.getxattr(ino, name))
    }

    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        self.read_on(&[ino], |c| c.listxattr(ino))
    }

    /// Sets an xattr; `flags` takes XATTR_CREATE and XATTR_REPLACE.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        if name == xattr::STATS_XATTR {
            return Err(FsError::Errno(libc::EPERM));
        }
        self.write_on(&[ino], |c| c.setxattr(ino, name, value, flags))
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        if name == xattr::STATS_XATTR {
            return Err(FsError::Errno(libc::EPERM));
        }
        self.write_on(&[ino], |c| c.removexattr(ino, name))
    }

    /// Checks this host's beliefs against the disk: every lock it thinks it holds is
    /// recorded with it as a holder (exclusive ones with it alone). A fenced host is
    /// exempt: it believes nothing any more. While this runs the host can neither
    /// take nor release a lock, so the comparison is exact. For the simulator.
    pub fn verify_locks(&self) -> Result<usize, String> {
        let core = self.core.lock().map_err(|_| "poisoned".to_string())?;
        if self.lease.check().is_err() || core.meta.check_healthy().is_err() {
            return Ok(0);
        }
        let me = core.meta.node.me;
        let held = core.meta.locks.held();
        for &(resource, mode) in &held {
            let state =
                crate::cluster::lock::read_lock(core.meta.lun.as_ref(), &core.meta.geo, resource)
                    .map_err(|e| format!("reading the lock of {resource}: {e}"))?;
            let holders = state.holders();
            let ok = match mode {
                crate::cluster::lock::LockMode::Exclusive => {
                    state.record.mode == crate::format::LOCK_EXCLUSIVE
                        && holders == vec![(me.slot, me.generation)]
                }
                _ => holders.contains(&(me.slot, me.generation)),
            };
            if !ok {
                return Err(format!(
                    "host in slot {} (generation {}) believes it holds {resource} {mode:?}, \
                     but the record says mode {} holders {holders:?}",
                    me.slot, me.generation, state.record.mode
                ));
            }
        }
        Ok(held.len())
    }

    /// Commits and releases every lock this host holds (as if other hosts had asked
    /// for all of them). For benchmarks and tests.
    pub fn release_all_locks(&self) -> FsResult<usize> {
        let (released, stale) = {
            let mut core = self.core()?;
            let released = core.meta.release_locks(None)?.len();
            (released, core.meta.take_kernel_stale())
        };
        self.invalidate_kernel(stale);
        Ok(released)
    }

    /// Device I/O counters since mount.
    pub fn stats(&self) -> FsResult<meta::MetaStats> {
        self.read(|c| Ok(c.meta.stats))
    }

    /// Everything `atsfs stats` shows: the device I/O the filesystem issued and the
    /// journal and lock counters, since mount.
    pub fn host_stats(&self) -> FsResult<HostStats> {
        let (meta, slot, locks_held, lease_ms) = self.read(|c| {
            Ok((
                c.meta.stats,
                c.meta.node.me.slot,
                c.meta.locks.held().len() as u64,
                c.sb.lease_ms,
            ))
        })?;
        let readahead = self.readahead.stats();
        Ok(HostStats {
            slot,
            pid: std::process::id(),
            lease_ms,
            io: self.io_counters.snapshot(),
            commits: meta.commits,
            committed_images: meta.committed_images,
            sealed_transactions: meta.seals,
            pipelined_commits: meta.pipelined,
            lock_acquires: meta.lock_acquires,
            lock_releases: meta.lock_releases,
            locks_held,
            readaheads: readahead.issued,
            readahead_hits: readahead.used,
        })
    }
}

#[cfg(test)]
mod atime_tests;
#[cfg(test)]
mod ats_tests;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod fence_tests;
#[cfg(test)]
mod node_tests;
#[cfg(test)]
mod paxos_mount_tests;
#[cfg(test)]
mod readonly_tests;
#[cfg(test)]
mod recovery_tests;
#[cfg(test)]
mod reservation_tests;
#[cfg(test)]
mod safety_tests;
#[cfg(test)]
mod tests;
