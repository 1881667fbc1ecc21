//! `atsfs status`: the heartbeat slots, watched on this tool's own clock.
//!
//! The watch reads every slot, sleeps, reads again, and notes on its own monotonic
//! clock when each sector last changed (`cluster::view::ClusterView`, the view every
//! mounted host keeps). It stops when the window ends, or earlier once every slot in
//! use has either moved or is dead: nothing more can be learnt by waiting.

use super::VolumeInfo;
use crate::cluster::view::{ClusterView, SlotView};
use crate::cluster::{read_slot, Clock, HostUuid, SystemClock};
use crate::format::{get_str, Geometry, Superblock, SLOT_FREE, SLOT_LIVE, SLOT_RECOVERING};
use crate::fs::read_superblock;
use crate::lun::Lun;
use anyhow::Result;
use serde::Serialize;
use std::time::Duration;

/// How often the watch re-reads the heartbeat region.
const POLL: Duration = Duration::from_millis(50);
/// Beyond lease + interval, watching longer cannot change a verdict; this much more
/// leaves room for the tool's own reads.
const WATCH_SLACK: Duration = Duration::from_millis(500);

/// What the tool concluded about a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SlotState {
    /// LIVE, and its sector changed during the watch.
    #[serde(rename = "live")]
    Live,
    /// LIVE, but not seen changing yet; dead only once silent for a lease.
    #[serde(rename = "live?")]
    Unsure,
    /// LIVE or RECOVERING, and silent for at least a lease on the tool's clock.
    #[serde(rename = "dead")]
    Dead,
    /// Released by a clean unmount, or freed by a recovery.
    #[serde(rename = "free")]
    Free,
    /// Another host (or the owner itself, after a crash) replays its journal.
    #[serde(rename = "recovering")]
    Recovering,
    /// The sector cannot be read or does not decode.
    #[serde(rename = "damaged")]
    Damaged,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Live => "live",
            SlotState::Unsure => "live?",
            SlotState::Dead => "dead",
            SlotState::Free => "free",
            SlotState::Recovering => "recovering",
            SlotState::Damaged => "damaged",
        }
    }

    /// True for `live` and `live?`: not known to be dead.
    pub fn is_live(self) -> bool {
        matches!(self, SlotState::Live | SlotState::Unsure)
    }
}

/// One heartbeat slot that is not never-used.
#[derive(Clone, Debug, Serialize)]
pub struct SlotRow {
    pub slot: u32,
    /// Empty for a damaged slot.
    pub host_uuid: String,
    pub hostname: String,
    pub generation: u32,
    pub state: SlotState,
    /// Milliseconds since the tool last saw the slot change. When it did not change
    /// during the watch (`changed` false) this is the watch's length: a lower bound.
    pub age_ms: u64,
    /// True when the sector changed during the watch.
    pub changed: bool,
    pub counter: u64,
    /// While recovering: the slot of the host replaying this slot's journal.
    pub recoverer_slot: Option<u32>,
    /// A sentence for `live?`, `dead`, `recovering` and `damaged` slots.
    pub note: Option<String>,
}

/// `atsfs status`: the volume and every slot ever used.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub volume: VolumeInfo,
    /// How long the tool watched the heartbeats.
    pub watched_ms: u64,
    pub slots: Vec<SlotRow>,
}

/// The watch to use: `asked`, or two heartbeat intervals + 200 ms (every live host
/// renews within that), never more than lease + interval + 500 ms.
pub fn watch_window(sb: &Superblock, asked: Option<Duration>) -> Duration {
    let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease = Duration::from_millis(u64::from(sb.lease_ms));
    let default = interval * 2 + Duration::from_millis(200);
    asked.unwrap_or(default).min(lease + interval + WATCH_SLACK)
}

/// Watches the heartbeat region for up to `watch` (default: `watch_window`) and
/// reports every slot that is not never-used.
pub fn status(lun: &dyn Lun, watch: Option<Duration>) -> Result<Status> {
    let sb = read_superblock(lun)?;
    let geo = Geometry::from_superblock(&sb);
    let (watched, slots) = watch_slots(lun, &geo, &sb, watch_window(&sb, watch))?;
    Ok(Status {
        volume: VolumeInfo::new(lun, &sb),
        watched_ms: watched.as_millis() as u64,
        slots,
    })
}

/// The watch itself: how long it ran, and one row per slot in use.
pub(super) fn watch_slots(
    lun: &dyn Lun,
    geo: &Geometry,
    sb: &Superblock,
    window: Duration,
) -> Result<(Duration, Vec<SlotRow>)> {
    let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease = Duration::from_millis(u64::from(sb.lease_ms));
    let clock = SystemClock::default();
    let view = ClusterView::new(geo.max_hosts, lease, interval);
    view.refresh(lun, geo, &clock)?;
    // Clock times of the images seen first: a later time means the slot moved.
    let first: Vec<u64> = view.all().iter().map(|v| v.since_ms).collect();
    let window_ms = window.as_millis() as u64;
    // Bounded: every pass sleeps, and the window is at most lease + interval + 500 ms.
    while clock.now_ms() < window_ms && !settled(&view, &first, &clock) {
        let left = Duration::from_millis(window_ms.saturating_sub(clock.now_ms()));
        clock.sleep(POLL.min(left));
        view.refresh(lun, geo, &clock)?;
    }
    let now_ms = clock.now_ms();
    let rows = view
        .all()
        .into_iter()
        .zip(first)
        .enumerate()
        .filter_map(|(i, (v, first_ms))| {
            let slot = i as u32;
            let seen = Seen {
                dead: view.dead(slot, &clock),
                changed: v.since_ms != first_ms,
                age_ms: now_ms.saturating_sub(v.since_ms),
                lease_ms: sb.lease_ms,
            };
            slot_row(lun, geo, slot, &v, &seen)
        })
        .collect();
    Ok((Duration::from_millis(now_ms), rows))
}

/// True when waiting longer cannot change any verdict: every slot held (LIVE or
/// RECOVERING) has moved or is dead.
fn settled(view: &ClusterView, first: &[u64], clock: &dyn Clock) -> bool {
    view.all()
        .iter()
        .zip(first)
        .enumerate()
        .all(|(i, (v, &t))| {
            let held = v.image.is_some_and(|img| img.state != SLOT_FREE);
            !held || v.since_ms != t || view.dead(i as u32, clock)
        })
}

/// What the watch saw of one slot.
struct Seen {
    dead: bool,
    changed: bool,
    age_ms: u64,
    lease_ms: u32,
}

fn slot_row(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
    v: &SlotView,
    seen: &Seen,
) -> Option<SlotRow> {
    let Some(image) = v.image else {
        // The view keeps no bytes of a sector that failed to read or decode.
        if v.raw.is_empty() {
            return Some(damaged_row(lun, geo, slot, seen));
        }
        return None; // all zeros: never used
    };
    // mkfs writes every slot FREE at generation 0; a claim makes it at least 1.
    if image.state == SLOT_FREE && image.generation == 0 {
        return None;
    }
    let (state, note) = judge(image.state, image.recoverer_slot, seen);
    Some(SlotRow {
        slot,
        host_uuid: HostUuid(image.host_uuid).to_string(),
        hostname: get_str(&image.hostname),
        generation: image.generation,
        state,
        age_ms: seen.age_ms,
        changed: seen.changed,
        counter: image.counter,
        recoverer_slot: (image.state == SLOT_RECOVERING).then_some(image.recoverer_slot),
        note,
    })
}

/// A slot's state and the sentence that goes with it.
fn judge(state: u32, recoverer: u32, seen: &Seen) -> (SlotState, Option<String>) {
    let age = seen.age_ms;
    let lease = seen.lease_ms;
    match state {
        SLOT_FREE => (SlotState::Free, None),
        SLOT_LIVE | SLOT_RECOVERING if seen.dead => {
            let what = if state == SLOT_LIVE {
                "its host is down"
            } else {
                "the recovery of this slot stopped"
            };
            let note = format!(
                "silent for {age} ms (lease {lease} ms): {what}; a live host recovers it, \
                 or `atsfs recover` when none is left"
            );
            (SlotState::Dead, Some(note))
        }
        SLOT_RECOVERING => {
            let note = format!("its journal is being replayed by the host in slot {recoverer}");
            (SlotState::Recovering, Some(note))
        }
        _ if seen.changed => (SlotState::Live, None),
        _ => {
            let note = format!("not moving for {age} ms; dead after the lease ({lease} ms)");
            (SlotState::Unsure, Some(note))
        }
    }
}

fn damaged_row(lun: &dyn Lun, geo: &Geometry, slot: u32, seen: &Seen) -> SlotRow {
    // The view dropped the reason: read the slot once more for it.
    let reason = match read_slot(lun, geo, slot) {
        Err(e) => format!("{e:#}"),
        Ok(_) => "could not be read or decoded during the watch".into(),
    };
    SlotRow {
        slot,
        host_uuid: String::new(),
        hostname: String::new(),
        generation: 0,
        state: SlotState::Damaged,
        age_ms: seen.age_ms,
        changed: seen.changed,
        counter: 0,
        recoverer_slot: None,
        note: Some(reason),
    }
}
