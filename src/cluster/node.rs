//! This host as a member of the cluster: who it is, what it sees of the other slots,
//! and the actions it takes toward them (ask for a lock, recover a dead host).

use super::lock::Holder;
use super::mailbox::post_request;
use super::recovery::{recover_slot, Held, Timing};
use super::view::ClusterView;
use super::{Clock, HostUuid};
use crate::format::{BlockNo, Geometry, MailRequest, SLOT_FREE};
use crate::lun::Lun;
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;

pub struct Node {
    pub lun: Arc<dyn Lun>,
    pub geo: Geometry,
    pub volume_uuid: [u8; 16],
    pub me: Holder,
    pub view: ClusterView,
    pub clock: Arc<dyn Clock>,
    pub interval: Duration,
    pub lease: Duration,
    /// This host's registered reservation key, when the storage fences
    /// (`fence::Fencing`): a recovery removes the dead host's key with it.
    pub fence_key: Option<crate::lun::ReservationKey>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        lun: Arc<dyn Lun>,
        geo: Geometry,
        volume_uuid: [u8; 16],
        me: Holder,
        clock: Arc<dyn Clock>,
        interval: Duration,
        lease: Duration,
    ) -> Node {
        Node {
            view: ClusterView::new(geo.max_hosts, lease, interval),
            lun,
            geo,
            volume_uuid,
            me,
            clock,
            interval,
            lease,
            fence_key: None,
        }
    }

    /// Re-reads the heartbeat region.
    pub fn refresh(&self) -> Result<()> {
        self.view
            .refresh(self.lun.as_ref(), &self.geo, self.clock.as_ref())
    }

    /// True when a lock naming `(slot, generation)` may be overwritten.
    pub fn stale(&self, slot: u32, generation: u32) -> bool {
        if slot == self.me.slot {
            return generation != self.me.generation;
        }
        self.view.stale(slot, generation)
    }

    /// Like `stale`, for the 16 low bits of a generation kept for file openers.
    pub fn stale16(&self, slot: u32, generation: u16) -> bool {
        if slot == self.me.slot {
            return generation != self.me.generation as u16;
        }
        self.view.stale16(slot, generation)
    }

    /// Asks the host in `slot` to release `resource`.
    pub fn ask_release(&self, slot: u32, resource: BlockNo, mode: u32) -> Result<()> {
        let request = MailRequest {
            resource,
            from_slot: self.me.slot,
            mode,
        };
        post_request(self.lun.as_ref(), &self.geo, slot, request)?;
        Ok(())
    }

    /// Recovers `slot` if it is held but has not moved for the lease: replays its
    /// journal and frees it. Returns true when it recovered it.
    pub fn recover_if_dead(&self, slot: u32) -> Result<bool> {
        if slot == self.me.slot || !self.view.dead(slot, self.clock.as_ref()) {
            return Ok(false);
        }
        let Some(view) = self.view.slot(slot) else {
            return Ok(false);
        };
        let Some(image) = view.image.filter(|i| i.state != SLOT_FREE) else {
            return Ok(false);
        };
        let held = Held {
            slot,
            raw: view.raw,
            image,
        };
        let timing = Timing {
            interval: self.interval,
            lease: self.lease,
            clock: self.clock.as_ref(),
        };
        // Through our own guarded LUN: the recovery stops with our own lease too.
        recover_slot(
            self.lun.as_ref(),
            &self.geo,
            self.volume_uuid,
            held,
            (self.me.slot, self.me.uuid),
            self.fence_key,
            timing,
        )?;
        self.refresh()?;
        Ok(true)
    }

    /// Recovers every slot that is dead now. A slot that cannot be recovered now (its
    /// sector stays locked by a host stopped inside a test-and-set, an I/O error) is
    /// left for the next watch and does not hold up the others.
    pub fn recover_all_dead(&self) -> Vec<u32> {
        let mut recovered = Vec::new();
        for slot in 0..self.geo.max_hosts {
            match self.recover_if_dead(slot) {
                Ok(true) => recovered.push(slot),
                Ok(false) => {}
                Err(e) => tracing::warn!(slot, "recovering a dead host, will try again: {e:#}"),
            }
        }
        recovered
    }

    pub fn host_uuid(&self) -> HostUuid {
        self.me.uuid
    }
}
