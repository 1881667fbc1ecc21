//! Mount and unmount: find the superblock, join the cluster, replay our journal.

use super::meta::Meta;
use super::{Core, Fs, FsError};
use crate::cluster::{
    claim_slot, settle_other_slots, Clock, GuardedLun, HostUuid, Lease, Membership, SystemClock,
};
use crate::format::{Geometry, OnDisk, Superblock, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::journal::Journal;
use crate::lun::Lun;
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
}

impl MountOptions {
    pub fn new(host_uuid: HostUuid) -> MountOptions {
        MountOptions {
            host_uuid,
            commit_interval: Duration::from_secs(1),
            clock: Arc::new(SystemClock::default()),
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
            "{device} has {}-byte sectors but the volume was made for {}-byte sectors; \
             atomic test-and-set would not cover one lock record",
            lun.sector_size(),
            sb.ats_sector_size
        );
    }
    Ok(sb)
}

impl Fs {
    /// Mounts the volume on `lun` as one host: claims a heartbeat slot, replays this
    /// slot's journal, and starts the heartbeat and the background committer.
    pub fn mount(lun: Arc<dyn Lun>, options: MountOptions) -> Result<Arc<Fs>> {
        let sb = read_superblock(lun.as_ref())?;
        let geo = Geometry::from_superblock(&sb);
        let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
        let lease_time = Duration::from_millis(u64::from(sb.lease_ms));
        let claim = claim_slot(
            lun.as_ref(),
            &geo,
            options.host_uuid,
            interval,
            lease_time,
            options.clock.as_ref(),
        )?;
        let slot = claim.slot;
        if claim.after_crash {
            tracing::info!(
                slot,
                "this host crashed while mounted; replaying its journal"
            );
        }
        let lease = Arc::new(Lease::new(options.clock.clone(), lease_time, interval));
        let membership = Membership::start(lun.clone(), &geo, claim, lease.clone(), interval);
        let guarded: Arc<dyn Lun> = Arc::new(GuardedLun::new(lun, lease.clone()));
        let settled = settle_other_slots(
            guarded.as_ref(),
            &geo,
            sb.volume_uuid,
            slot,
            options.host_uuid,
            interval,
            lease_time,
            options.clock.as_ref(),
        );
        if let Err(e) = settled {
            if let Err(release) = membership.release() {
                tracing::warn!("could not free our slot again: {release:#}");
            }
            return Err(e);
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
        let meta = Meta::new(guarded, geo, sb.volume_uuid, journal);
        let root = sb.root_ino;
        let mut core = Core {
            meta,
            sb,
            open_counts: HashMap::new(),
            last_generation: 0,
        };
        core.inode(root)
            .map_err(|e| anyhow::anyhow!("the root directory (inode {root}) is unreadable: {e}"))?;
        let fs = Arc::new(Fs {
            core: Mutex::new(core),
            root,
            lease,
            membership: Mutex::new(Some(membership)),
            options,
        });
        spawn_committer(Arc::downgrade(&fs), fs.options.commit_interval);
        Ok(fs)
    }

    /// Commits everything, marks the journal empty and frees the heartbeat slot.
    pub fn unmount(&self) -> Result<()> {
        let sync_result = self
            .core
            .lock()
            .map_err(|_| FsError::Failed("poisoned".into()))
            .and_then(|mut core| core.meta.sync_all());
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

fn spawn_committer(fs: Weak<Fs>, interval: Duration) {
    let spawned = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            let Some(fs) = fs.upgrade() else { return };
            if fs.lease.is_fenced() {
                return;
            }
            if let Err(e) = fs.sync() {
                tracing::warn!("background commit failed: {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "no background committer ({e}): metadata is committed by fsync and unmount only"
        );
    }
}
