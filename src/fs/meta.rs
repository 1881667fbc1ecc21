//! Metadata I/O for one host: a cache of clean images, the running transaction, and
//! commit + checkpoint.
//!
//! Every metadata change goes into the running transaction (`put`); reads see the
//! transaction first (`get`). `commit` writes the transaction to this host's journal
//! (the commit point), then writes every image home, synchronously.
//!
//! Group commit: when the running transaction grows past `TX_SOFT_LIMIT` images
//! between two operations, it is sealed (`seal`) rather than committed: it waits in
//! memory, whole, for the next commit, which writes every sealed transaction and the
//! running one to the journal with one flush (`Journal::commit_group`) and then home.
//! Nothing is lost that was promised: a sealed transaction holds no fsynced change
//! (fsync commits), and no lock is released before a commit. Reads see the running
//! transaction, then the sealed ones (newest first), then the cache.
//!
//! Pipelined commit: once the sealed transactions take a quarter of the group's
//! bound, `start_async` hands them (with the journal) to this host's committer
//! thread, which writes them to the journal, flushes and writes them home while
//! operations go on under the core lock. Until the group is settled (`settle`: the
//! journal comes back, its images go to the cache, the blocks and locks it freed get
//! its sequence number) reads see its images after the sealed ones. Everything that
//! needs the journal or promises durability (every other commit, moving the tail,
//! releasing a lock) settles first, so commits still reach the journal and home in
//! order, and no lock is released before what it covers is committed and home.
//!
//! Invariants:
//! - A metadata image is written home only after the transaction holding it is
//!   committed. File data is flushed before the commit that points at it.
//! - A freed block is not reused until the journal's tail has moved past the
//!   transaction that freed it (`quarantine`): before that, a crash could either
//!   undo the free (the transaction is not committed) or replay an older image of
//!   the block over its new contents (the journal still holds it).
//! - After a failed commit or checkpoint the in-memory state is ahead of the disk:
//!   `failed` is set and every later operation fails (sticky), as after a fence.

use super::locks::Locks;
use super::readahead::IoBarrier;
use super::{FsError, FsResult};
use crate::cluster::Node;
use crate::format::{BlockNo, Geometry, OnDisk, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::journal::{Journal, Record};
use crate::lun::Lun;
use lru::LruCache;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::mpsc;
use std::sync::Arc;

/// A metadata image (one block or sector), shared rather than copied.
type Image = Arc<Vec<u8>>;

/// Clean metadata images kept in memory.
const CACHE_ENTRIES: usize = 32768;
/// A mutating operation commits the running transaction first when it holds more
/// images than this, so that one operation (at most ~150 images) always fits.
pub const TX_SOFT_LIMIT: usize = 96;

/// Data writes at least this large go past the image's page cache (`write_uncached`),
/// queued behind by `WriteBehind`: streaming writes then reach the device while the
/// next ones arrive, without filling page-cache pages. Smaller ones stay cached until
/// the commit flushes them (a small random write costs no device round trip).
const UNCACHED_WRITE_MIN: usize = 128 << 10;

/// In `quarantine` and `freed_locks`: freed by a sealed transaction, which gets its
/// sequence number when the next commit writes it.
const SEALED_SEQ: u64 = u64::MAX;
/// Likewise, freed by the group the committer thread is writing.
const INFLIGHT_SEQ: u64 = u64::MAX - 1;

/// Most journal blocks sealed transactions may wait with (16 MiB of images): bounds
/// memory and the work of the next commit.
const SEALED_SPAN_MAX: u64 = 4096;

/// Freed blocks waiting for the journal tail before the tail is moved at once.
const QUARANTINE_BLOCKS_MAX: u64 = 16384;

/// A group of sealed transactions the committer thread is writing.
struct Inflight {
    /// The newest image of each block in the group, read until the group settles.
    images: HashMap<u64, Image>,
    /// Blocks forgotten (freed) meanwhile: neither read from the group nor cached.
    /// (A dropped cache does not touch the group: like the running and sealed
    /// transactions, it holds this host's own changes to blocks whose locks it has
    /// kept since.)
    forgotten: HashSet<u64>,
}

/// What writing a group did (`write_group`).
#[derive(Default)]
struct GroupDone {
    /// The last transaction's sequence number (None: no transaction, data only).
    seq: Option<u64>,
    commits: u64,
    images: u64,
    flushes: u64,
}

/// A group for the committer thread: the journal travels with it and comes back
/// with the result, so no one else can write the journal meanwhile.
struct Job {
    lun: Arc<dyn Lun>,
    journal: Journal,
    group: Vec<BTreeMap<u64, Image>>,
    flush_data: bool,
    span_max: u64,
}

type JobResult = (Journal, FsResult<GroupDone>);

/// This host's committer thread (started at the first pipelined commit).
struct Committer {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<JobResult>,
}

impl Committer {
    fn spawn() -> std::io::Result<Committer> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || {
                for mut job in job_rx {
                    let result = write_group(
                        job.lun.as_ref(),
                        &mut job.journal,
                        &job.group,
                        job.flush_data,
                        job.span_max,
                    );
                    if done_tx.send((job.journal, result)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Committer { jobs, done })
    }
}

/// Writes a group of transactions: file data flushed first (with `flush_data`), then
/// the transactions to the journal in chunks of at most `span_max` journal blocks,
/// one flush each, each chunk written home before the next is journaled (writing one
/// may move the journal's tail).
fn write_group(
    lun: &dyn Lun,
    journal: &mut Journal,
    group: &[BTreeMap<u64, Image>],
    flush_data: bool,
    span_max: u64,
) -> FsResult<GroupDone> {
    let mut done = GroupDone::default();
    if flush_data {
        // Ordered mode: file data is durable before the commit that points at it.
        lun.flush()?;
        done.flushes += 1;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut rest = group;
    while !rest.is_empty() {
        let mut take = 0;
        let mut span = 0;
        for tx in rest {
            let next = tx.len() as u64 + 2;
            if take > 0 && span + next > span_max {
                break;
            }
            span += next;
            take += 1;
        }
        let (chunk, after) = rest.split_at(take);
        rest = after;
        let txs: Vec<Vec<Record>> = chunk
            .iter()
            .map(|tx| {
                tx.iter()
                    .map(|(&target, image)| Record {
                        target,
                        image: image.as_ref().clone(),
                    })
                    .collect()
            })
            .collect();
        done.seq = Some(journal.commit_group(lun, &txs, now)?);
        done.commits += txs.len() as u64;
        done.flushes += 1;
        done.images += txs.iter().map(|t| t.len() as u64).sum::<u64>();
        // Home writes: the newest image of each block.
        let mut home = BTreeMap::new();
        for tx in chunk {
            home.extend(tx.iter().map(|(&o, i)| (o, i)));
        }
        write_home(lun, &home)?;
    }
    Ok(done)
}

/// Writes committed images home, merging neighbours into one write.
fn write_home(lun: &dyn Lun, images: &BTreeMap<u64, &Image>) -> FsResult<()> {
    let mut run_start = 0u64;
    let mut run: Vec<u8> = Vec::new();
    for (&offset, image) in images {
        if !run.is_empty() && run_start + run.len() as u64 != offset {
            lun.write_at(&run, run_start)?;
            run.clear();
        }
        if run.is_empty() {
            run_start = offset;
        }
        run.extend_from_slice(image);
    }
    if !run.is_empty() {
        lun.write_at(&run, run_start)?;
    }
    Ok(())
}

/// Counters of device I/O, for `atsfs stats` and the benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct MetaStats {
    pub meta_reads: u64,
    pub commits: u64,
    pub committed_images: u64,
    pub data_reads: u64,
    pub data_writes: u64,
    pub flushes: u64,
    pub lock_acquires: u64,
    pub lock_releases: u64,
    /// Transactions sealed to wait for a group commit.
    pub seals: u64,
    /// Groups handed to the committer thread (pipelined commits).
    pub pipelined: u64,
}

pub struct Meta {
    pub lun: Arc<dyn Lun>,
    pub geo: Geometry,
    pub volume_uuid: [u8; 16],
    /// With each image: whether a decode has checked it (CRC, fields). Images this
    /// host wrote are checked by construction; images read from disk until decoded.
    cache: LruCache<u64, (Image, bool)>,
    /// Images are shared with `get` callers and the cache, never copied to be read.
    tx: BTreeMap<u64, Image>,
    /// Sealed transactions waiting for the next commit, oldest first.
    sealed: Vec<BTreeMap<u64, Image>>,
    /// The newest image of each block in `sealed`.
    sealed_index: HashMap<u64, Image>,
    /// Journal blocks the sealed transactions will take.
    sealed_span: u64,
    /// None while the committer thread has it (`inflight`).
    journal: Option<Journal>,
    /// Most journal blocks one group may take (`Journal::group_span_max`).
    span_max: u64,
    inflight: Option<Inflight>,
    committer: Option<Committer>,
    /// Freed runs: (start, len, the transaction that freed them; None = running).
    quarantine: Vec<(BlockNo, u64, Option<u64>)>,
    /// File data was written since the last flush.
    pub data_dirty: bool,
    /// Set when a commit or checkpoint failed: the host must not go on.
    failed: Option<String>,
    /// While an operation runs: the transaction's images before the operation touched
    /// them, so a failed operation leaves no half-done change behind.
    undo: Option<HashMap<u64, Option<Image>>>,
    undo_quarantine: usize,
    pub stats: MetaStats,
    /// This host in the cluster, and the locks it holds.
    pub node: Arc<Node>,
    pub locks: Locks,
    /// Inodes freed by committed transactions whose locks are released once the
    /// journal tail has passed them.
    pub(super) freed_locks: Vec<(BlockNo, Option<u64>)>,
    /// (clock ms, free blocks) of the last statfs.
    pub statfs_cache: Option<(u64, u64)>,
    /// Data reads carried out without the core lock are inside this (see
    /// `file::ReadPlan`); making freed blocks reusable waits for it to be empty.
    pub data_io: Arc<IoBarrier>,
    /// Moves whenever this host may have changed what a read returns: each
    /// mutating operation, each lock let go, each cache drop. A read-ahead mapped at
    /// one epoch serves only a read mapped at the same epoch (`fs::readahead`).
    pub epoch: u64,
    /// This host's lease: a failed commit fences it (`fail`).
    lease: Option<Arc<crate::cluster::Lease>>,
    /// A read-only host: takes no lock (`need` of a shared lock reads without one,
    /// anything else is EROFS), records no open, commits nothing.
    pub read_only: bool,
}

impl Meta {
    pub fn new(
        lun: Arc<dyn Lun>,
        geo: Geometry,
        volume_uuid: [u8; 16],
        journal: Journal,
        node: Arc<Node>,
    ) -> Meta {
        let cap = NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Meta {
            lun,
            geo,
            volume_uuid,
            cache: LruCache::new(cap),
            tx: BTreeMap::new(),
            sealed: Vec::new(),
            sealed_index: HashMap::new(),
            sealed_span: 0,
            span_max: journal.group_span_max(),
            journal: Some(journal),
            inflight: None,
            committer: None,
            quarantine: Vec::new(),
            data_dirty: false,
            failed: None,
            undo: None,
            undo_quarantine: 0,
            stats: MetaStats::default(),
            node,
            locks: Locks::default(),
            freed_locks: Vec::new(),
            statfs_cache: None,
            data_io: Arc::new(IoBarrier::default()),
            epoch: 0,
            lease: None,
            read_only: false,
        }
    }

    /// The lease to fence when a commit fails.
    pub fn set_lease(&mut self, lease: Arc<crate::cluster::Lease>) {
        self.lease = Some(lease);
    }

    /// Marks the host failed after a commit or checkpoint failed: every later
    /// operation fails, and the lease is fenced, so the heartbeat stops and the
    /// other hosts recover this host's journal and break its locks after one lease
    /// (a failed host that kept heartbeating would hold its locks for ever).
    fn fail(&mut self, e: &FsError) {
        self.fail_for(format!("commit failed: {e}"));
    }

    /// Marks the host failed and fences its lease, as `fail` does, for `reason`.
    pub(super) fn fail_for(&mut self, reason: String) {
        tracing::error!("{reason}; no further writes from this host");
        if let Some(lease) = &self.lease {
            lease.fence(&reason);
        }
        self.failed = Some(reason);
    }

    /// Fails when an earlier commit failed.
    pub fn check_healthy(&self) -> FsResult<()> {
        match &self.failed {
            Some(reason) => Err(FsError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Raw bytes of the image at `offset` (`len` bytes): the running transaction's
    /// version if any, else the cache's, else the disk's.
    pub fn raw(&mut self, offset: u64, len: usize) -> FsResult<Arc<Vec<u8>>> {
        Ok(self.raw_checked(offset, len)?.0)
    }

    /// `raw`, and whether the image is known good: written by this host, or read
    /// from disk and since checked by a decode (`mark_checked`).
    pub fn raw_checked(&mut self, offset: u64, len: usize) -> FsResult<(Image, bool)> {
        if let Some(image) = self.tx.get(&offset) {
            return Ok((image.clone(), true));
        }
        if let Some(image) = self.sealed_index.get(&offset) {
            return Ok((image.clone(), true));
        }
        if let Some(inflight) = &self.inflight {
            if let Some(image) = inflight.images.get(&offset) {
                if !inflight.forgotten.contains(&offset) {
                    return Ok((image.clone(), true));
                }
            }
        }
        if let Some((image, checked)) = self.cache.get(&offset) {
            if image.len() == len {
                return Ok((image.clone(), *checked));
            }
        }
        let mut buf = vec![0u8; len];
        self.lun.read_at(&mut buf, offset)?;
        self.stats.meta_reads += 1;
        tracing::trace!(offset, len, "metadata read");
        let image = Arc::new(buf);
        self.cache.put(offset, (image.clone(), false));
        Ok((image, false))
    }

    /// Notes that the cached image at `offset` passed its checks.
    pub fn mark_checked(&mut self, offset: u64) {
        if let Some(entry) = self.cache.peek_mut(&offset) {
            entry.1 = true;
        }
    }

    /// Decodes a structure at `offset`; `block` names it in errors. Images read from
    /// disk are validated (magic, CRC, block number) before they are trusted; an image
    /// that fails is dropped from the cache so a later read tries the disk again.
    pub fn get<T: OnDisk>(&mut self, offset: u64, len: usize, block: BlockNo) -> FsResult<T> {
        let (image, checked) = self.raw_checked(offset, len)?;
        if checked {
            return T::decode_checked(&image, block).map_err(FsError::Corrupted);
        }
        match T::decode(&image, block) {
            Ok(value) => {
                self.mark_checked(offset);
                Ok(value)
            }
            Err(e) => {
                self.cache.pop(&offset);
                Err(FsError::Corrupted(e))
            }
        }
    }

    /// Starts an operation: its changes can be undone until it ends.
    pub fn begin_op(&mut self) {
        self.locks.created_in_op.clear();
        self.undo = Some(HashMap::new());
        self.undo_quarantine = self.quarantine.len();
    }

    /// Ends an operation; a failed one has its changes to the running transaction
    /// undone (changes it committed along the way stay: each commit is consistent).
    pub fn end_op(&mut self, ok: bool) {
        let Some(undo) = self.undo.take() else { return };
        let created = std::mem::take(&mut self.locks.created_in_op);
        if ok {
            return;
        }
        // The blocks these locks were taken for are free again: let the locks go.
        for resource in created {
            if let Err(e) = self.drop_freed(resource) {
                tracing::warn!(resource, "releasing the lock of an undone allocation: {e}");
            }
        }
        for (offset, before) in undo {
            match before {
                Some(image) => self.tx.insert(offset, image),
                None => self.tx.remove(&offset),
            };
        }
        self.quarantine.truncate(self.undo_quarantine);
    }

    fn note_undo(&mut self, offset: u64) {
        if let Some(undo) = self.undo.as_mut() {
            undo.entry(offset)
                .or_insert_with(|| self.tx.get(&offset).cloned());
        }
    }

    /// Puts a structure into the running transaction, sealed.
    pub fn put<T: OnDisk>(&mut self, offset: u64, len: usize, mut value: T) {
        self.note_undo(offset);
        value.seal();
        let mut image = vec![0u8; len];
        let bytes = bytemuck::bytes_of(&value);
        image[..bytes.len()].copy_from_slice(bytes);
        self.tx.insert(offset, Arc::new(image));
    }

    /// Puts raw bytes (a bitmap block) into the running transaction.
    pub fn put_raw(&mut self, offset: u64, image: Vec<u8>) {
        self.note_undo(offset);
        self.tx.insert(offset, Arc::new(image));
    }

    /// Images in the running transaction.
    pub fn tx_len(&self) -> usize {
        self.tx.len()
    }

    /// True when changes wait for a commit (running, sealed or in-flight
    /// transactions).
    pub fn has_uncommitted(&self) -> bool {
        !self.tx.is_empty() || !self.sealed.is_empty() || self.inflight.is_some()
    }

    /// Between operations: closes the running transaction and keeps it for the next
    /// commit's group, or commits when the group would outgrow the journal's bound.
    pub fn seal(&mut self) -> FsResult<()> {
        self.check_healthy()?;
        if self.tx.is_empty() {
            return Ok(());
        }
        let span = self.tx.len() as u64 + 2;
        let bound = self.span_max.min(SEALED_SPAN_MAX);
        if self.sealed_span + span > bound {
            return self.commit();
        }
        self.sealed_span += span;
        let tx = std::mem::take(&mut self.tx);
        self.sealed_index
            .extend(tx.iter().map(|(&o, i)| (o, i.clone())));
        self.sealed.push(tx);
        self.stats.seals += 1;
        for q in self.quarantine.iter_mut().filter(|q| q.2.is_none()) {
            q.2 = Some(SEALED_SEQ);
        }
        for f in self.freed_locks.iter_mut().filter(|f| f.1.is_none()) {
            f.1 = Some(SEALED_SEQ);
        }
        self.settle_if_done()?;
        if self.inflight.is_none() && self.sealed_span >= bound / 4 {
            self.start_async()?;
        }
        Ok(())
    }

    /// The periodic commit: commits the running transaction (and flushes file data)
    /// through the committer thread, unless a group is still in flight; first lets go
    /// of blocks and locks freed by transactions already committed.
    pub fn background_commit(&mut self) -> FsResult<()> {
        self.check_healthy()?;
        self.settle_if_done()?;
        if self.inflight.is_some() {
            return Ok(());
        }
        let committed = |s: Option<u64>| s.is_some_and(|s| s < INFLIGHT_SEQ);
        if self.quarantine.iter().any(|q| committed(q.2))
            || self.freed_locks.iter().any(|f| committed(f.1))
        {
            self.release_quarantine()?;
        }
        if !self.tx.is_empty() {
            self.seal()?;
        }
        if self.inflight.is_none() && (!self.sealed.is_empty() || self.data_dirty) {
            self.start_async()?;
        }
        Ok(())
    }

    /// Hands the sealed transactions (and a pending data flush) to the committer
    /// thread. Without one (it cannot be started), commits them here.
    fn start_async(&mut self) -> FsResult<()> {
        debug_assert!(self.inflight.is_none());
        if self.committer.is_none() {
            match Committer::spawn() {
                Ok(c) => self.committer = Some(c),
                Err(e) => {
                    tracing::warn!("no committer thread ({e}); committing in line");
                    return self.commit_sealed();
                }
            }
        }
        let Some(journal) = self.journal.take() else {
            return Err(FsError::Failed("the journal is gone".into()));
        };
        let job = Job {
            lun: self.lun.clone(),
            journal,
            group: std::mem::take(&mut self.sealed),
            flush_data: std::mem::take(&mut self.data_dirty),
            span_max: self.span_max,
        };
        let images = std::mem::take(&mut self.sealed_index);
        self.sealed_span = 0;
        for q in self
            .quarantine
            .iter_mut()
            .filter(|q| q.2 == Some(SEALED_SEQ))
        {
            q.2 = Some(INFLIGHT_SEQ);
        }
        for f in self
            .freed_locks
            .iter_mut()
            .filter(|f| f.1 == Some(SEALED_SEQ))
        {
            f.1 = Some(INFLIGHT_SEQ);
        }
        self.stats.pipelined += 1;
        self.inflight = Some(Inflight {
            images,
            forgotten: HashSet::new(),
        });
        let sent = match &self.committer {
            Some(c) => c.jobs.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(mut job) = sent {
            // The thread is gone: write the group here and settle it at once.
            self.committer = None;
            let result = write_group(
                job.lun.as_ref(),
                &mut job.journal,
                &job.group,
                job.flush_data,
                job.span_max,
            );
            return self.finish_inflight((job.journal, result));
        }
        Ok(())
    }

    /// Takes in the group in flight when the committer thread is done with it.
    pub fn settle_if_done(&mut self) -> FsResult<()> {
        if self.inflight.is_none() {
            return Ok(());
        }
        let Some(c) = &self.committer else {
            return self.settle();
        };
        match c.done.try_recv() {
            Ok(done) => self.finish_inflight(done),
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => self.settle(),
        }
    }

    /// Waits for the group in flight, if any, and takes it in.
    pub fn settle(&mut self) -> FsResult<()> {
        if self.inflight.is_none() {
            return Ok(());
        }
        let done = match &self.committer {
            Some(c) => c.done.recv().ok(),
            None => None,
        };
        match done {
            Some(done) => self.finish_inflight(done),
            None => {
                self.inflight = None;
                let e = FsError::Failed("the committer thread died with the journal".into());
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// The journal back; on success the group's images into the cache and its
    /// sequence number onto the blocks and locks it freed; on failure the host fails.
    fn finish_inflight(&mut self, (journal, result): JobResult) -> FsResult<()> {
        self.journal = Some(journal);
        let Some(inflight) = self.inflight.take() else {
            return Ok(());
        };
        let done = match result {
            Ok(done) => done,
            Err(e) => {
                self.fail(&e);
                return Err(e);
            }
        };
        self.stats.commits += done.commits;
        self.stats.committed_images += done.images;
        self.stats.flushes += done.flushes;
        if let Some(seq) = done.seq {
            for q in self
                .quarantine
                .iter_mut()
                .filter(|q| q.2 == Some(INFLIGHT_SEQ))
            {
                q.2 = Some(seq);
            }
            for f in self
                .freed_locks
                .iter_mut()
                .filter(|f| f.1 == Some(INFLIGHT_SEQ))
            {
                f.1 = Some(seq);
            }
        }
        for (offset, image) in inflight.images {
            if !inflight.forgotten.contains(&offset) {
                self.cache.put(offset, (image, true));
            }
        }
        Ok(())
    }

    /// Commits the sealed transactions only (each is whole operations; the running
    /// one may be half an operation), e.g. when blocks they freed are needed.
    pub fn commit_sealed(&mut self) -> FsResult<()> {
        self.check_healthy()?;
        let result = self.commit_inner(false);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Marks a run of blocks freed in the running transaction.
    pub fn quarantine(&mut self, start: BlockNo, len: u64) {
        self.quarantine.push((start, len, None));
    }

    /// True when blocks freed by committed transactions wait for the journal tail.
    pub fn has_committed_quarantine(&self) -> bool {
        self.quarantine.iter().any(|q| q.2.is_some())
    }

    /// Moves the journal tail past every committed transaction (all are home), which
    /// lets the blocks they freed be reused.
    pub fn release_quarantine(&mut self) -> FsResult<()> {
        self.settle()?;
        // Reads mapped before the blocks were freed finish first.
        self.data_io.wait_idle();
        let lun = self.lun.clone();
        let journal = self.journal_mut()?;
        let marked = journal.has_unmarked();
        if marked {
            journal.mark_all_home(lun.as_ref())?;
        }
        let tail = journal.tail_seq();
        if marked {
            self.stats.flushes += 2;
        }
        self.quarantine
            .retain(|q| q.2.is_none_or(|seq| seq >= tail));
        self.undo_quarantine = self.undo_quarantine.min(self.quarantine.len());
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.freed_locks)
            .into_iter()
            .partition(|f| f.1.is_some_and(|seq| seq < tail));
        self.freed_locks = waiting;
        for (resource, _) in done {
            self.drop_freed(resource)?;
        }
        Ok(())
    }

    /// Notes that the running transaction frees the inode `resource`: its lock is let
    /// go once that is committed and behind the journal tail.
    pub fn freed_lock(&mut self, resource: BlockNo) {
        self.freed_locks.push((resource, None));
    }

    /// Drops every cached clean image (another host changed something we cached).
    pub fn drop_cache(&mut self) {
        self.epoch += 1;
        self.cache.clear();
    }

    /// The journal (not in flight: callers settle first).
    fn journal_mut(&mut self) -> FsResult<&mut Journal> {
        self.journal
            .as_mut()
            .ok_or_else(|| FsError::Failed("the journal is gone".into()))
    }

    /// The first quarantined block at or after `start` within `[start, end)`, as the
    /// end of the free run that may be used.
    pub fn quarantined_in(&self, start: BlockNo, end: BlockNo) -> Option<(BlockNo, BlockNo)> {
        self.quarantine
            .iter()
            .filter(|&&(s, l, _)| s < end && s + l > start)
            .map(|&(s, l, _)| (s.max(start), s + l))
            .min()
    }

    /// Drops a freed block's image from the cache and the transaction, so a later
    /// reuse of the block as metadata cannot see stale bytes.
    pub fn forget(&mut self, offset: u64) {
        if self.tx.contains_key(&offset) {
            self.note_undo(offset);
            self.tx.remove(&offset);
        }
        self.cache.pop(&offset);
        if let Some(inflight) = &mut self.inflight {
            inflight.forgotten.insert(offset);
        }
    }

    /// Commits the running transaction and writes it home. Sticky on failure.
    pub fn commit(&mut self) -> FsResult<()> {
        self.check_healthy()?;
        let result = self.commit_inner(true);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Commits the sealed transactions and, with `running`, the running one.
    fn commit_inner(&mut self, running: bool) -> FsResult<()> {
        self.settle()?;
        let mut group = std::mem::take(&mut self.sealed);
        self.sealed_index.clear();
        self.sealed_span = 0;
        if running && !self.tx.is_empty() {
            group.push(std::mem::take(&mut self.tx));
        }
        let flush_data = std::mem::take(&mut self.data_dirty);
        if group.is_empty() && !flush_data {
            return Ok(());
        }
        if self.read_only {
            // Every change is refused before it reaches a transaction; one that got
            // here anyway is a bug, and the host stops rather than write.
            return Err(FsError::Failed(
                "a read-only host tried to commit a change".into(),
            ));
        }
        let lun = self.lun.clone();
        let span_max = self.span_max;
        let done = write_group(
            lun.as_ref(),
            self.journal_mut()?,
            &group,
            flush_data,
            span_max,
        )?;
        self.stats.commits += done.commits;
        self.stats.committed_images += done.images;
        self.stats.flushes += done.flushes;
        for tx in group {
            for (offset, image) in tx {
                self.cache.put(offset, (image, true));
            }
        }
        let Some(seq) = done.seq else {
            return Ok(());
        };
        let committed = |s: Option<u64>| s == Some(SEALED_SEQ) || running && s.is_none();
        for q in self.quarantine.iter_mut().filter(|q| committed(q.2)) {
            q.2 = Some(seq);
        }
        for f in self.freed_locks.iter_mut().filter(|f| committed(f.1)) {
            f.1 = Some(seq);
        }
        if !running {
            return Ok(());
        }
        if self.undo.is_some() {
            // What is committed stays, whatever the rest of the operation does.
            self.undo = Some(HashMap::new());
            self.undo_quarantine = self.quarantine.len();
            self.locks.created_in_op.clear();
        }
        let waiting: u64 = self.quarantine.iter().map(|q| q.1).sum();
        if waiting > QUARANTINE_BLOCKS_MAX {
            self.release_quarantine()?;
        }
        Ok(())
    }

    /// Commits, then records in the journal header that everything is home.
    pub fn sync_all(&mut self) -> FsResult<()> {
        self.commit()?;
        self.release_quarantine()
    }

    /// Flushes file data without a commit (fdatasync of a file whose metadata is
    /// unchanged).
    pub fn flush_data(&mut self) -> FsResult<()> {
        // A group in flight may be the one to flush earlier data.
        self.settle()?;
        if self.data_dirty {
            // A failed flush may stand for a queued data write that is lost: as fatal
            // as a failed commit.
            if let Err(e) = self.lun.flush() {
                let e = FsError::from(e);
                self.fail(&e);
                return Err(e);
            }
            self.stats.flushes += 1;
            self.data_dirty = false;
        }
        Ok(())
    }

    /// Reads whole data blocks.
    pub fn read_data(&mut self, buf: &mut [u8], block: BlockNo) -> FsResult<()> {
        self.lun.read_at(buf, block * BLOCK_SIZE_U64)?;
        self.stats.data_reads += 1;
        Ok(())
    }

    /// Writes whole data blocks (not journaled; ordered before the next commit).
    pub fn write_data(&mut self, buf: &[u8], block: BlockNo) -> FsResult<()> {
        debug_assert!(buf.len() % BLOCK_SIZE == 0);
        let offset = block * BLOCK_SIZE_U64;
        if buf.len() >= UNCACHED_WRITE_MIN {
            self.lun.write_uncached(buf, offset)?;
        } else {
            self.lun.write_at(buf, offset)?;
        }
        self.stats.data_writes += 1;
        self.data_dirty = true;
        Ok(())
    }
}

impl Drop for Meta {
    /// A group in flight is finished first: the host stops with it written whole.
    fn drop(&mut self) {
        if self.inflight.is_some() {
            if let Some(c) = &self.committer {
                let _ = c.done.recv();
            }
        }
    }
}
