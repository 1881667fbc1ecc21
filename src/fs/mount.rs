//! Mount and unmount: find the superblock, join the cluster, replay our journal.

use super::meta::Meta;
use super::{Core, Fs, FsError};
use crate::cluster::lock::Holder;
use crate::cluster::{
    check_ats_mode, claim_slot, fence, paxos, settle_foreign_slots, Clock, GuardedLun, HostUuid,
    Lease, Membership, Node, SystemClock,
};
use crate::format::{Geometry, OnDisk, Superblock, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::journal::Journal;
use crate::lun::{Lun, WriteBehind};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// What a mount needs beyond the device.
#[derive(Clone)]
pub struct MountOptions {
    pub host_uuid: HostUuid,
    /// How often the running transaction is committed when nobody calls fsync.
    pub commit_interval: Duration,
    pub clock: Arc<dyn Clock>,
    /// A read-only host (`-o ro`): takes no lock, replays and recovers nothing, and
    /// writes nothing but its own heartbeat sector; every change fails with EROFS
    /// (docs/locking.md, "Read-only hosts").
    pub read_only: bool,
    /// When reads update the access time (`relatime`, `noatime`, `strictatime`).
    pub atime: super::atime::AtimeMode,
    /// Directories' access times are never updated (`nodiratime`).
    pub nodiratime: bool,
}

impl MountOptions {
    pub fn new(host_uuid: HostUuid) -> MountOptions {
        MountOptions {
            host_uuid,
            commit_interval: Duration::from_secs(1),
            clock: Arc::new(SystemClock::default()),
            read_only: false,
            atime: super::atime::AtimeMode::default(),
            nodiratime: false,
        }
    }
}

/// Reads and validates the superblock: the primary, or the backup in the last block
/// when the primary is damaged (with a warning saying so).
pub fn read_superblock(lun: &dyn Lun) -> Result<Superblock> {
    let device = lun.describe();
    let len = lun.len_bytes();
    if len < 2 * BLOCK_SIZE_U64 {
        bail!("{device} is too small ({len} bytes) to hold an atsfs volume");
    }
    let mut block = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut block, 0)
        .with_context(|| format!("reading the superblock of {device}"))?;
    let primary = Superblock::decode(&block, 0);
    let primary_err = match primary {
        Ok(sb) => return check_superblock(lun, sb),
        Err(crate::format::FormatError::Unsupported(what)) => {
            bail!("{device}: {what}; use a newer atsfs")
        }
        Err(e) => e,
    };
    let last = len / BLOCK_SIZE_U64 - 1;
    lun.read_at(&mut block, last * BLOCK_SIZE_U64)
        .with_context(|| format!("reading the backup superblock of {device}"))?;
    match Superblock::decode(&block, last) {
        Ok(sb) => {
            tracing::warn!(
                "the primary superblock of {device} is damaged ({primary_err}); using the backup in block {last}. \
                 Run `atsfs fsck --repair` to rewrite the primary."
            );
            check_superblock(lun, sb)
        }
        Err(backup_err) => {
            if is_foreign(&primary_err) && is_foreign(&backup_err) {
                bail!(
                    "{device} does not hold an atsfs volume (no atsfs superblock in block 0 nor a backup in \
                     the last block); make one with mkfs.atsfs"
                );
            }
            bail!(
                "{device}: the atsfs superblock is damaged and so is its backup\n  primary (block 0): {primary_err}\n  \
                 backup (block {last}): {backup_err}\nthe volume cannot be mounted; `atsfs fsck` tells more"
            )
        }
    }
}

/// True when a decode failed because the block is not a superblock at all.
fn is_foreign(e: &crate::format::FormatError) -> bool {
    matches!(e, crate::format::FormatError::Corrupted { reason, .. } if reason.starts_with("bad magic"))
}

fn check_superblock(lun: &dyn Lun, sb: Superblock) -> Result<Superblock> {
    let device = lun.describe();
    let geo = Geometry::from_superblock(&sb);
    if let Err(reason) = geo.check() {
        bail!("{device}: the superblock's layout is inconsistent ({reason}); run `atsfs fsck`");
    }
    if sb.total_blocks > lun.len_bytes() / BLOCK_SIZE_U64 {
        bail!(
            "{device} is smaller ({} bytes) than the volume it holds ({} bytes): truncated image or wrong device",
            lun.len_bytes(),
            sb.total_blocks * BLOCK_SIZE_U64
        );
    }
    if sb.ats_sector_size != lun.sector_size() {
        bail!(
            "{device} has {}-byte ATS sectors (its physical block, at least its logical \
             one) but the volume was made for {}-byte sectors; a one-sector write would \
             not be atomic, or test-and-set would not cover one lock record: use the \
             volume through a device with its sector size, or copy its files to a volume \
             made anew on this device",
            lun.sector_size(),
            sb.ats_sector_size
        );
    }
    Ok(sb)
}

/// What a read-write and a read-only mount both start from: the volume's superblock
/// and timing, a claimed heartbeat slot renewed from now on, and the LUN as this host
/// writes it (on a Disk Paxos volume through the token; every write behind the lease).
struct Joined {
    sb: Superblock,
    geo: Geometry,
    interval: Duration,
    lease_time: Duration,
    slot: u32,
    /// Our slot was ours in a life that crashed: its journal may need a replay.
    after_crash: bool,
    lease: Arc<Lease>,
    /// The joining key where the storage fences.
    fencing: fence::Fencing,
    /// The LUN of the membership and the fencing (the token's, on Disk Paxos).
    lun: Arc<dyn Lun>,
    /// `lun` behind the lease: for everything the filesystem writes.
    guarded: Arc<dyn Lun>,
    io_counters: Arc<crate::lun::IoCounters>,
    membership: Option<Membership>,
}

/// Reads the superblock and claims a heartbeat slot for this host.
fn join(lun: Arc<dyn Lun>, options: &MountOptions) -> Result<Joined> {
    let sb = read_superblock(lun.as_ref())?;
    // Before anything is written or any lock taken: one kind of ATS per volume. (On a
    // Disk Paxos volume the device's own kind does not matter: the token LUN built
    // after the claim is checked instead.)
    if sb.ats_mode != crate::format::ATS_MODE_DISK_PAXOS {
        check_ats_mode(lun.as_ref(), &sb)?;
    }
    // Registered before our first write (the claim of a slot) where the storage
    // fences: the LUN may be reserved for registrants only.
    let fencing = fence::join(lun.as_ref())?;
    let geo = Geometry::from_superblock(&sb);
    let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease_time = Duration::from_millis(u64::from(sb.lease_ms));
    let claim = claim_slot(
        paxos::claim_lun(&lun, &sb, &options.clock).as_ref(),
        &geo,
        options.host_uuid,
        interval,
        lease_time,
        options.clock.as_ref(),
    )?;
    let lease = Arc::new(Lease::for_claim(
        options.clock.clone(),
        &claim,
        lease_time,
        interval,
    ));
    // From the claim on, every compare-and-write of this host takes the volume's Disk
    // Paxos token (on such a volume).
    let lun = paxos::mounted_lun(lun, &sb, &claim, &options.clock, &lease);
    check_ats_mode(lun.as_ref(), &sb)?;
    let guarded_lun = GuardedLun::new(lun.clone(), lease.clone());
    let io_counters = guarded_lun.counters().clone();
    let (slot, after_crash) = (claim.slot, claim.after_crash);
    // The slot is renewed from now on, also while we replay our own journal after a
    // crash: a replay longer than the lease must not look like a dead host.
    let membership = Some(Membership::start(
        lun.clone(),
        &geo,
        claim,
        lease.clone(),
        interval,
    ));
    Ok(Joined {
        sb,
        geo,
        interval,
        lease_time,
        slot,
        after_crash,
        lease,
        fencing,
        lun,
        guarded: Arc::new(guarded_lun),
        io_counters,
        membership,
    })
}

/// After a mount that failed once it had claimed `slot`: frees the slot again
/// rather than leave it to be recovered a lease later, once our own journal needs no
/// replay (`replayed`; before, freeing it would make our old locks stale with our
/// journal unreplayed).
fn free_slot_if_failed(
    mounted: &Result<Arc<Fs>>,
    replayed: bool,
    membership: &mut Option<Membership>,
    slot: u32,
) {
    if let (Err(e), true, Some(member)) = (mounted, replayed, membership.take()) {
        tracing::warn!(
            slot,
            "the mount failed after claiming its slot ({e:#}); freeing the slot"
        );
        if let Err(release) = member.release() {
            tracing::warn!("could not free our slot again: {release:#}");
        }
    }
}

impl Fs {
    /// Mounts the volume on `lun` as one host: claims a heartbeat slot, replays this
    /// slot's journal, and starts the heartbeat and the background committer.
    pub fn mount(lun: Arc<dyn Lun>, options: MountOptions) -> Result<Arc<Fs>> {
        if options.read_only {
            return Fs::mount_read_only(lun, options);
        }
        let Joined {
            sb,
            geo,
            interval,
            lease_time,
            slot,
            after_crash,
            lease,
            fencing,
            lun,
            guarded,
            io_counters,
            mut membership,
        } = join(lun, &options)?;
        // Our own journal needs no replay (any more): from then on a mount that fails
        // frees the slot again instead of leaving it to be recovered a lease later.
        // Before (a replay after our crash not done), freeing it would make our old
        // locks stale with our journal unreplayed.
        let mut replayed = !after_crash;
        let mounted = (|| -> Result<Arc<Fs>> {
            let Some(member) = membership.as_mut() else {
                bail!("the heartbeat of slot {slot} is gone");
            };
            // The joining key, or after a crash the key of our old life (below).
            let mut fencing = fencing;
            if after_crash {
                // Our slot is RECOVERING with the old generation: replay our journal, and
                // only then take a new generation (which makes our old locks stale).
                tracing::info!(
                    slot,
                    "this host crashed while mounted; replaying its journal"
                );
                // The old life may be a paused process rather than a dead one: the storage
                // refuses its writes from now on. And the replay runs under the old life's
                // key, so that a host that recovers this slot, should we stall in the
                // replay, fences us by fencing that life.
                fence::fence_dead(lun.as_ref(), fencing.key(), slot, member.generation)?;
                fencing = fence::become_host(lun.as_ref(), &fencing, slot, member.generation)?;
                Journal::open_and_replay(guarded.as_ref(), &geo, slot, sb.volume_uuid)
                    .with_context(|| format!("replaying the journal of slot {slot}"))?;
                member.go_live()?;
                replayed = true;
            }
            let me = Holder {
                uuid: options.host_uuid,
                slot,
                generation: member.generation,
            };
            let fencing = fence::become_host(guarded.as_ref(), &fencing, slot, member.generation)?;
            tracing::info!(
                slot,
                generation = member.generation,
                "writes fenced {fencing}"
            );
            let mut node = Node::new(
                guarded.clone(),
                geo,
                sb.volume_uuid,
                me,
                options.clock.clone(),
                interval,
                lease_time,
            );
            node.fence_key = fencing.key();
            let node = Arc::new(node);
            node.refresh()?;
            if let Some(key) = fencing.key() {
                // Keys of lives that are over: a slot freed or mounted again since.
                fence::prune(guarded.as_ref(), key, |s, g| !node.stale(s, g));
            }
            if sb.ats_mode == crate::format::ATS_MODE_EMULATED {
                let settled = settle_foreign_slots(
                    guarded.as_ref(),
                    &geo,
                    sb.volume_uuid,
                    slot,
                    options.host_uuid,
                    interval,
                    lease_time,
                    options.clock.as_ref(),
                    true,
                );
                settled?;
            }
            let (journal, report) =
                Journal::open_and_replay(guarded.as_ref(), &geo, slot, sb.volume_uuid)
                    .with_context(|| format!("replaying the journal of slot {slot}"))?;
            if report.transactions > 0 {
                tracing::info!(
                    slot,
                    transactions = report.transactions,
                    "replayed the journal"
                );
            }
            // Large data writes are queued behind (see lun/behind.rs); everything else of
            // the fs waits for the queued writes it overlaps, and every flush for all.
            let behind: Arc<dyn Lun> = Arc::new(WriteBehind::new(guarded));
            let mut meta = Meta::new(behind, geo, sb.volume_uuid, journal, node.clone());
            meta.set_lease(lease.clone());
            let root = sb.root_ino;
            meta.locks.root = root;
            let core = Core {
                meta,
                sb,
                open_counts: HashMap::new(),
                last_generation: 0,
            };
            let fs = Fs::assemble(core, io_counters, lease, membership.take(), options);
            spawn_service(Arc::downgrade(&fs), fs.options.commit_interval, interval);
            fs.check_root()?;
            fs.reclaim_orphans_at_mount();
            Ok(fs)
        })();
        free_slot_if_failed(&mounted, replayed, &mut membership, slot);
        mounted
    }

    /// The mounted host around its core.
    fn assemble(
        core: Core,
        io_counters: Arc<crate::lun::IoCounters>,
        lease: Arc<Lease>,
        membership: Option<Membership>,
        options: MountOptions,
    ) -> Arc<Fs> {
        let data_io = core.meta.data_io.clone();
        let mailbox = super::MailboxRef {
            lun: core.meta.lun.clone(),
            geo: core.meta.geo,
            slot: core.meta.node.me.slot,
        };
        let root = core.sb.root_ino;
        Arc::new(Fs {
            core: Mutex::new(core),
            data_io,
            readahead: Default::default(),
            io_counters,
            root,
            lease,
            membership: Mutex::new(membership),
            orphans_pending: Mutex::new(Vec::new()),
            mailbox,
            yield_wanted: Mutex::new(Vec::new()),
            options,
            nodes: Default::default(),
            kernel_cache: Default::default(),
        })
    }

    /// Unmounts again unless the root directory can be read.
    fn check_root(&self) -> Result<()> {
        let root = self.root;
        if let Err(e) = self.getattr(root) {
            let _ = self.unmount();
            bail!("the root directory (inode {root}) is unreadable: {e}");
        }
        Ok(())
    }

    /// Mounts as a read-only host (docs/locking.md, "Read-only hosts"): claims a
    /// heartbeat slot, so that other hosts and the tools know the volume is in use,
    /// and from then on writes nothing but that slot's heartbeat sector. It takes no
    /// lock, replays no journal (its own slot is taken back after a crash only if its
    /// journal holds nothing to replay), recovers no dead host, and sees the device
    /// through a `ReadOnlyLun`, so a path that would write fails with EROFS instead.
    /// On a Disk Paxos volume it never takes the token (it takes no lock), so it
    /// writes no dblock either: its own heartbeat is renewed without the token.
    fn mount_read_only(lun: Arc<dyn Lun>, options: MountOptions) -> Result<Arc<Fs>> {
        let Joined {
            sb,
            geo,
            interval,
            lease_time,
            slot,
            after_crash,
            lease,
            fencing,
            lun,
            guarded,
            io_counters,
            mut membership,
        } = join(lun, &options)?;
        // As for a read-write host: a mount that fails after its claim frees the slot
        // again, unless its own crashed journal still waits for a read-write mount.
        let mut replayed = !after_crash;
        let mounted = (|| -> Result<Arc<Fs>> {
            let Some(member) = membership.as_mut() else {
                bail!("the heartbeat of slot {slot} is gone");
            };
            let mut fencing = fencing;
            if after_crash {
                check_nothing_to_replay(guarded.as_ref(), &geo, slot, sb.volume_uuid)?;
                fence::fence_dead(lun.as_ref(), fencing.key(), slot, member.generation)?;
                fencing = fence::become_host(lun.as_ref(), &fencing, slot, member.generation)?;
                member.go_live()?;
                replayed = true;
            }
            let fencing = fence::become_host(guarded.as_ref(), &fencing, slot, member.generation)?;
            tracing::info!(
                slot,
                generation = member.generation,
                "mounted read-only: writes only its heartbeat ({fencing})"
            );
            let reader: Arc<dyn Lun> = Arc::new(crate::lun::ReadOnlyLun::new(guarded));
            let me = Holder {
                uuid: options.host_uuid,
                slot,
                generation: member.generation,
            };
            let mut node = Node::new(
                reader.clone(),
                geo,
                sb.volume_uuid,
                me,
                options.clock.clone(),
                interval,
                lease_time,
            );
            node.fence_key = fencing.key();
            let node = Arc::new(node);
            node.refresh()?;
            if sb.ats_mode == crate::format::ATS_MODE_EMULATED {
                settle_foreign_slots(
                    reader.as_ref(),
                    &geo,
                    sb.volume_uuid,
                    slot,
                    options.host_uuid,
                    interval,
                    lease_time,
                    options.clock.as_ref(),
                    false,
                )?;
            }
            let journal = Journal::open_read_only(reader.as_ref(), &geo, slot, sb.volume_uuid)
                .with_context(|| format!("reading the journal header of slot {slot}"))?;
            let mut meta = Meta::new(reader, geo, sb.volume_uuid, journal, node);
            meta.set_lease(lease.clone());
            meta.read_only = true;
            meta.locks.root = sb.root_ino;
            let core = Core {
                meta,
                sb,
                open_counts: HashMap::new(),
                last_generation: 0,
            };
            let fs = Fs::assemble(core, io_counters, lease, membership.take(), options);
            spawn_service(Arc::downgrade(&fs), fs.options.commit_interval, interval);
            fs.check_root()?;
            Ok(fs)
        })();
        free_slot_if_failed(&mounted, replayed, &mut membership, slot);
        mounted
    }

    /// Commits everything, marks the journal empty and frees the heartbeat slot.
    /// A read-only host only frees its slot.
    pub fn unmount(&self) -> Result<()> {
        if self.options.read_only {
            let membership = self.membership.lock().ok().and_then(|mut m| m.take());
            return match membership {
                Some(m) => m.release().context("releasing the heartbeat slot"),
                None => Ok(()),
            };
        }
        let sync_result = self
            .core
            .lock()
            .map_err(|_| FsError::Failed("poisoned".into()))
            .and_then(|mut core| {
                core.meta
                    .release_locks(None)
                    .and_then(|_| core.meta.sync_all())
            });
        let membership = self.membership.lock().ok().and_then(|mut m| m.take());
        match (sync_result, membership) {
            (Ok(()), Some(m)) => m.release().context("releasing the heartbeat slot"),
            (Ok(()), None) => Ok(()),
            (Err(e), _) => {
                // Keep the slot marked live: our journal must be replayed before anyone
                // trusts what we left. Dropping the membership stops the heartbeat.
                Err(anyhow::anyhow!(
                    "unmount could not write everything home: {e}"
                ))
            }
        }
    }
}

/// The host's background work, in two threads so that a recovery that waits (a dead
/// host's slot locked by a host stopped inside a test-and-set) never holds up the
/// rest: "cluster" honours lock release requests from other hosts (every few tens of
/// milliseconds) and commits the running transaction (every `commit_interval`);
/// "watch" re-reads the other slots and recovers dead ones (every heartbeat
/// interval). The heartbeat has a thread of its own (`Membership`).
fn spawn_service(fs: Weak<Fs>, commit_interval: Duration, interval: Duration) {
    let read_only = fs.upgrade().is_some_and(|fs| fs.options.read_only);
    let watched = fs.clone();
    let spawned = std::thread::Builder::new()
        .name("cluster".into())
        .spawn(move || serve(fs, commit_interval));
    if let Err(e) = spawned {
        tracing::warn!(
            "no background service thread ({e}): other hosts cannot get locks from this one"
        );
    }
    if read_only {
        // A read-only host recovers nobody: that writes.
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || watch(watched, interval));
    if let Err(e) = spawned {
        tracing::warn!(
            "no watch thread ({e}): dead hosts are recovered only when their locks are needed"
        );
    }
}

/// The "cluster" thread: the mailbox and the periodic commit.
fn serve(fs: Weak<Fs>, commit_interval: Duration) {
    let tick = Duration::from_millis(20);
    let mut since_commit = Duration::ZERO;
    loop {
        std::thread::sleep(tick);
        since_commit += tick;
        let Some(fs) = fs.upgrade() else { return };
        // Past the lease (known to the heartbeat, or by the clock alone): the
        // kernel's caches go too, then the service stops.
        if fs.lease.check().is_err() {
            tracing::warn!("fenced: dropping the kernel's caches of this mount");
            fs.drop_kernel_caches();
            return;
        }
        if fs.options.read_only {
            // No locks to give up, nothing to commit: only the lease to watch.
            continue;
        }
        if let Err(e) = fs.serve_mailbox() {
            tracing::warn!("serving lock requests: {e}");
        }
        if since_commit >= commit_interval {
            since_commit = Duration::ZERO;
            if let Err(e) = fs.background_sync() {
                tracing::warn!("background commit failed: {e}");
            }
        }
    }
}

/// The "watch" thread: recovers dead hosts.
fn watch(fs: Weak<Fs>, interval: Duration) {
    loop {
        std::thread::sleep(interval);
        let Some(fs) = fs.upgrade() else { return };
        if fs.lease.is_fenced() {
            return;
        }
        if let Err(e) = fs.watch_cluster() {
            tracing::warn!("watching the other hosts: {e:#}");
        }
    }
}

/// Refuses to take back this host's own slot of a crashed life as a read-only host
/// when its journal holds transactions: replaying them writes, and leaving them
/// would let the slot's new life (and its new generation) pass for recovered.
fn check_nothing_to_replay(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
    volume_uuid: [u8; 16],
) -> Result<()> {
    let pending = crate::journal::pending_transactions(lun, geo, slot, volume_uuid)
        .with_context(|| format!("reading the journal of slot {slot}"))?;
    if !pending.is_empty() {
        bail!(
            "this host's slot {slot} holds a crashed read-write mount whose journal has {} \
             transaction(s) to replay, and a read-only mount writes nothing: mount read-write \
             once (or wait for a read-write host to recover the slot, one lease after this \
             attempt), then mount read-only",
            pending.len()
        );
    }
    Ok(())
}

impl Fs {
    /// Releases the locks other hosts asked for in our mailbox.
    pub fn serve_mailbox(&self) -> Result<(), FsError> {
        let super::MailboxRef { lun, geo, slot } = &self.mailbox;
        let mailbox = crate::cluster::mailbox::read_mailbox(lun.as_ref(), geo, *slot)?;
        if mailbox.requests().is_empty() {
            return Ok(());
        }
        let wanted: Vec<u64> = mailbox.requests().iter().map(|r| r.resource).collect();
        // Handed to whichever thread takes the core lock next: a host busy with
        // operations yields at the start of its next one, so the requests need not
        // wait for this thread to win the core lock against a tight loop of them.
        self.yield_wanted
            .lock()
            .map_err(|_| FsError::Failed("an earlier operation panicked".into()))?
            .extend(&wanted);
        let stale = {
            let mut core = self.core()?;
            self.yield_requested(&mut core)?;
            core.meta.take_kernel_stale()
        };
        // Another host is about to change what these locks cover.
        self.invalidate_kernel(stale);
        crate::cluster::mailbox::remove_requests(lun.as_ref(), geo, *slot, &wanted)?;
        Ok(())
    }

    /// Yields the locks other hosts asked for since the last call (`serve_mailbox`).
    /// Called with the core lock held, by the mailbox thread and at the start of
    /// every operation.
    pub(super) fn yield_requested(&self, core: &mut Core) -> super::FsResult<()> {
        let wanted = match self.yield_wanted.lock() {
            Ok(mut wanted) if !wanted.is_empty() => std::mem::take(&mut *wanted),
            _ => return Ok(()),
        };
        let released = core.meta.yield_locks(&wanted)?;
        tracing::debug!(?wanted, ?released, "yielded locks on request");
        Ok(())
    }

    /// Re-reads the other slots and recovers the dead ones.
    pub fn watch_cluster(&self) -> Result<()> {
        let node = self
            .core()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .meta
            .node
            .clone();
        node.refresh()?;
        for slot in node.recover_all_dead() {
            tracing::info!(slot, "recovered a dead host");
            self.reclaim_orphans(slot);
        }
        self.reclaim_pending_orphans();
        Ok(())
    }

    /// Reclaims the orphan tables of the slots recovered while waiting for a lock.
    pub fn reclaim_pending_orphans(&self) {
        let pending = match self.orphans_pending.lock() {
            Ok(mut pending) => std::mem::take(&mut *pending),
            Err(_) => return,
        };
        for slot in pending {
            self.reclaim_orphans(slot);
        }
    }
}
