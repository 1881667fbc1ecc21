//! How an offline tool that writes a volume (`atsfs recover`, `atsfs fsck --repair`)
//! takes part in the cluster while it runs.
//!
//! On a volume with hardware or emulated ATS the tool writes through the device
//! itself, once `check_ats_mode` accepted it: it holds no slot, and the slots it
//! recovers name it by the uuid of its `ToolRegistration`.
//!
//! On a Disk Paxos volume every compare-and-write takes the volume's token, and a
//! ballot for the token writes the dblock of a slot: a tool needs a slot of its own.
//! So it joins like a host for its run (docs/locking.md, "Tools on a Disk Paxos
//! volume"): it claims a free slot through the delta lease under its registration's
//! uuid, renews it every interval (`Membership`), and writes through a `PaxosLun`
//! with that slot and generation as identity, behind its own lease (`GuardedLun`), so
//! a tool paused past its lease writes nothing more. `leave` (or drop) frees the slot.
//!
//! Invariants:
//! - A slot whose `host_uuid` is the tool's uuid is the tool's own: the tool never
//!   recovers it, and does not count it as a live host (`recover_offline`, the
//!   repair's watch).
//! - Everything the tool writes on a Disk Paxos volume goes through `lun()`; the
//!   device's own compare-and-write is never used there.

use super::fence::ToolRegistration;
use super::{check_ats_mode, claim_slot, paxos, Clock, GuardedLun, HostUuid, Lease, Membership};
use crate::format::{Geometry, Superblock, ATS_MODE_DISK_PAXOS};
use crate::lun::Lun;
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::Duration;

/// An offline tool's way to write one volume, for the tool's run.
pub struct ToolSession {
    lun: Arc<dyn Lun>,
    /// On a Disk Paxos volume: the tool's slot, renewed until `leave`.
    membership: Option<Membership>,
}

impl ToolSession {
    /// Joins the volume of `sb` on `device` as the tool `tool`. Refuses a device
    /// whose ATS kind is not the volume's; on a Disk Paxos volume claims a slot
    /// (which waits half a lease: the delta lease's settle) and starts renewing it.
    pub fn join(
        device: &Arc<dyn Lun>,
        sb: &Superblock,
        tool: &ToolRegistration<'_>,
        clock: Arc<dyn Clock>,
    ) -> Result<ToolSession> {
        if sb.ats_mode != ATS_MODE_DISK_PAXOS {
            check_ats_mode(device.as_ref(), sb)?;
            return Ok(ToolSession {
                lun: device.clone(),
                membership: None,
            });
        }
        let geo = Geometry::from_superblock(sb);
        let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
        let lease_time = Duration::from_millis(u64::from(sb.lease_ms));
        let claim = claim_slot(
            paxos::claim_lun(device, sb, &clock).as_ref(),
            &geo,
            HostUuid(tool.uuid()),
            interval,
            lease_time,
            clock.as_ref(),
        )
        .context("claiming a slot for the tool (it takes the Disk Paxos token as a host does)")?;
        if claim.after_crash {
            // A fresh uuid never names a slot already; a slot that did would hold a
            // journal to replay first, which is a mount's work.
            bail!("the tool's new uuid names slot {} already", claim.slot);
        }
        let lease = Arc::new(Lease::for_claim(
            clock.clone(),
            &claim,
            lease_time,
            interval,
        ));
        let lun = paxos::mounted_lun(device.clone(), sb, &claim, &clock, &lease);
        check_ats_mode(lun.as_ref(), sb)?;
        tracing::info!(
            slot = claim.slot,
            generation = claim.generation,
            "the tool holds a slot for its run: its compare-and-writes take the Disk Paxos token"
        );
        let membership = Membership::start(lun.clone(), &geo, claim, lease.clone(), interval);
        Ok(ToolSession {
            lun: Arc::new(GuardedLun::new(lun, lease)),
            membership: Some(membership),
        })
    }

    /// The LUN the tool writes through.
    pub fn lun(&self) -> &Arc<dyn Lun> {
        &self.lun
    }

    /// The tool's own slot, on a Disk Paxos volume.
    pub fn slot(&self) -> Option<u32> {
        self.membership.as_ref().map(|m| m.slot)
    }

    /// Flushes and frees the tool's slot, if it holds one.
    pub fn leave(mut self) -> Result<()> {
        let Some(membership) = self.membership.take() else {
            return Ok(());
        };
        self.lun
            .flush()
            .context("flushing before the tool leaves")?;
        membership.release().context("freeing the tool's slot")
    }
}

impl Drop for ToolSession {
    /// A tool that stopped on an error frees its slot too (it holds no lock and
    /// keeps no journal, so nothing of it needs recovering); if that fails, the
    /// slot stops moving and a host recovers it after a lease.
    fn drop(&mut self) {
        if let Some(membership) = self.membership.take() {
            if let Err(e) = membership.release() {
                tracing::warn!("freeing the tool's slot: {e:#}");
            }
        }
    }
}
