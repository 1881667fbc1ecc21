//! What this host knows of the other slots: their last image and when it last changed
//! on our own clock (the lease's clock, CLOCK_BOOTTIME for real hosts). No
//! synchronised clocks are needed.
//!
//! - A LIVE (or RECOVERING) slot is dead when its sector has not changed for `lease`
//!   on our clock: the host itself stopped writing an interval before that (it writes
//!   only while `now < last renewal + lease - interval` on its own clock).
//! - A lock holder `(slot, generation)` is stale when the slot has moved past that
//!   generation, or is FREE at it: only then was its journal replayed (by recovery
//!   or by a clean unmount), so only then may its locks be overwritten. Staleness
//!   never reverts, so judging it from an old view is safe; a generation newer than
//!   the view is never stale.

use super::heartbeat::read_slot;
use super::Clock;
use crate::format::{Geometry, HeartbeatSlot, SLOT_FREE};
use crate::lun::Lun;
use anyhow::Result;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct SlotView {
    pub raw: Vec<u8>,
    pub image: Option<HeartbeatSlot>,
    /// Our clock when we first saw this raw image.
    pub since_ms: u64,
}

pub struct ClusterView {
    slots: Mutex<Vec<SlotView>>,
    dead_after_ms: u64,
}

impl ClusterView {
    pub fn new(max_hosts: u32, lease: Duration, interval: Duration) -> ClusterView {
        let empty = SlotView {
            raw: Vec::new(),
            image: None,
            since_ms: 0,
        };
        ClusterView {
            slots: Mutex::new(vec![empty; max_hosts as usize]),
            // The host itself stops writing `interval` before its lease ends (on its own
            // clock), and we saw its last change no earlier than it was written: a
            // lease of silence on our clock is past its last possible write.
            dead_after_ms: lease.max(interval * 2).as_millis() as u64,
        }
    }

    /// Reads every slot and notes which changed.
    pub fn refresh(&self, lun: &dyn Lun, geo: &Geometry, clock: &dyn Clock) -> Result<()> {
        let mut fresh = Vec::with_capacity(geo.max_hosts as usize);
        for slot in 0..geo.max_hosts {
            // A sector that does not decode is treated as never used.
            let (raw, image) = read_slot(lun, geo, slot).unwrap_or_else(|_| (Vec::new(), None));
            fresh.push((raw, image));
        }
        let now = clock.now_ms();
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| anyhow::anyhow!("cluster view poisoned"))?;
        for (view, (raw, image)) in slots.iter_mut().zip(fresh) {
            if view.raw != raw {
                *view = SlotView {
                    raw,
                    image,
                    since_ms: now,
                };
            }
        }
        Ok(())
    }

    pub fn slot(&self, slot: u32) -> Option<SlotView> {
        self.slots.lock().ok()?.get(slot as usize).cloned()
    }

    /// True when the holder `(slot, generation)` no longer holds anything: the slot
    /// has moved past that generation, or is free at it (released cleanly or
    /// recovered). A generation newer than what we saw is never judged stale: our
    /// view is just old.
    pub fn stale(&self, slot: u32, generation: u32) -> bool {
        match self.slot(slot).and_then(|v| v.image) {
            Some(image) => {
                image.generation > generation
                    || (image.state == SLOT_FREE && image.generation >= generation)
            }
            // A slot never used has no generation anyone could hold.
            None => false,
        }
    }

    /// Like `stale`, for the 16 low bits of a generation (file openers' entries). The
    /// opener's generation is read as the one nearest the view's (generations grow by
    /// one per mount, wrapping past 16 bits): newer than the view is never stale, the
    /// view's own only when the slot is free at it, older always. Misjudged only
    /// after 32768 mounts of one slot between two looks at it.
    pub fn stale16(&self, slot: u32, generation: u16) -> bool {
        let Some(image) = self.slot(slot).and_then(|v| v.image) else {
            return false;
        };
        let newer_by = generation.wrapping_sub(image.generation as u16) as i16;
        match newer_by {
            0 => image.state == SLOT_FREE,
            newer_by => newer_by < 0,
        }
    }

    /// True when the slot is held (LIVE or RECOVERING) but has not moved for the lease.
    pub fn dead(&self, slot: u32, clock: &dyn Clock) -> bool {
        match self.slot(slot) {
            Some(SlotView {
                image: Some(image),
                since_ms,
                ..
            }) if image.state != SLOT_FREE => {
                clock.now_ms().saturating_sub(since_ms) >= self.dead_after_ms
            }
            _ => false,
        }
    }

    /// Every slot's view, for `atsfs status`.
    pub fn all(&self) -> Vec<SlotView> {
        self.slots.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
