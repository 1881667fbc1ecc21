//! `atsfs status` and `atsfs locks`: who uses a volume and who holds what, read from
//! the disk alone. Both are read-only: they hold no slot and no lease, and never
//! write (the CLI opens the device read-only).
//!
//! - `status`: the heartbeat slots, watched on this tool's own monotonic clock.
//! - `locks`: the lock records of every inode reached from the root (paths from
//!   fsck's tree walk) and of every allocation group header, with their holders
//!   judged against the same watch.
//!
//! Liveness needs no synchronised clocks (the rule of `cluster::view`, reused here):
//! a slot whose sector changed while the tool watched is `live`; a LIVE slot that did
//! not change is `live?` until it has been silent for a lease on the tool's clock,
//! then `dead`. The watch ends early once every slot in use is settled (moved, or
//! dead), and never lasts longer than lease + interval + 500 ms.
//!
//! What the tools cannot see: an inode unlinked while a host still has it open is in
//! no directory, so its lock record is not listed; a hard-linked file is known under
//! one of its names only. On a mounted volume everything read is a snapshot that the
//! hosts keep changing.
//!
//! No byte on disk makes them panic: a slot or lock record that does not decode is
//! shown as `damaged`, with the reason.

mod locks;
mod print;
mod status;

pub use locks::{
    locks, HolderState, LockQuery, LockReport, LockRow, Owner, RecordMode, ResourceKind, Waiter,
};
pub use print::{render_locks, render_status};
pub use status::{status, watch_window, SlotRow, SlotState, Status};

use crate::cluster::{check_ats_mode, volume_ats_kind};
use crate::format::{get_str, Superblock};
use crate::lun::{AtsKind, Lun};
use serde::Serialize;

/// The volume's identity and cluster parameters, as the superblock records them.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub device: String,
    pub label: String,
    pub volume_uuid: String,
    /// `emulated` (file locks, one kernel), `hardware` (SCSI COMPARE AND WRITE) or
    /// `disk-paxos` (the volume's token over plain reads and writes).
    pub ats_mode: String,
    /// The ATS kind of the device this tool opened: `emulated`, `hardware`, `none`
    /// (a plain disk), or `disk-paxos` on a Disk Paxos volume (every opener takes
    /// the token).
    pub opener_ats: String,
    /// Whether a host opening the volume this way could mount it (`check_ats_mode`).
    pub opener_matches: bool,
    pub ats_sector_size: u32,
    pub heartbeat_interval_ms: u32,
    pub lease_ms: u32,
    pub max_hosts: u32,
    /// How the storage fences hosts: the LUN's persistent reservation and keys.
    pub fencing: Fencing,
    /// On a Disk Paxos volume: the token as its region shows it.
    pub token: Option<Token>,
}

/// The Disk Paxos token as one read of its region shows it (`cluster::paxos`).
#[derive(Clone, Debug, Serialize)]
pub struct Token {
    /// The last decided instance (`lver`): how many times the token was taken.
    pub instance: u64,
    /// The slot and generation the leader record names for that instance (0 and
    /// `None` before the first).
    pub owner_slot: Option<u32>,
    pub owner_generation: Option<u32>,
    /// True when that owner gave the token back; otherwise it holds it, or held it
    /// until its token lease (`lease_ms`) ran out.
    pub released: bool,
    /// `Superblock::paxos_token_ms`.
    pub lease_ms: u32,
    /// Slots whose dblock is about a later instance: taking the token now, or
    /// waiting for it.
    pub wanted_by: Vec<u32>,
    /// Why the region could not be read or decoded, if so.
    pub error: Option<String>,
}

impl Token {
    fn read(lun: &dyn Lun, sb: &Superblock) -> Option<Token> {
        use crate::cluster::paxos::{read_region, PaxosRegion};
        use crate::format::{PAXOS_LEADER_RELEASED, PAXOS_NO_OWNER};
        let region = PaxosRegion::of(&crate::format::Geometry::from_superblock(sb))?;
        let mut token = Token {
            instance: 0,
            owner_slot: None,
            owner_generation: None,
            released: true,
            lease_ms: sb.paxos_token_ms,
            wanted_by: Vec::new(),
            error: None,
        };
        let view = match read_region(lun, &region) {
            Ok(view) => view,
            Err(e) => {
                token.error = Some(e.to_string());
                return Some(token);
            }
        };
        let leader = &view.leader;
        token.instance = leader.lver;
        if leader.owner_slot != PAXOS_NO_OWNER {
            token.owner_slot = Some(leader.owner_slot);
            token.owner_generation = Some(leader.owner_gen);
        }
        token.released = leader.flags & PAXOS_LEADER_RELEASED != 0;
        token.wanted_by = (0..region.hosts)
            .filter(|&slot| {
                view.dblocks
                    .get(slot as usize)
                    .and_then(|d| d.as_ref())
                    .is_some_and(|d| d.lver > leader.lver)
            })
            .collect();
        Some(token)
    }
}

/// The storage side of fencing, as the LUN reports it (`cluster::fence`).
#[derive(Clone, Debug, Serialize)]
pub struct Fencing {
    /// `none` (no persistent reservations: the lease alone), `reservation`, or
    /// `unreadable` (PERSISTENT RESERVE IN failed: `detail` says why).
    pub kind: String,
    pub detail: String,
    /// The registered keys and whose they are.
    pub keys: Vec<FencingKey>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FencingKey {
    pub key: String,
    /// "slot 3, generation 7", "a joining host", "a tool", or "another program".
    pub owner: String,
    /// Whether this key holds the reservation.
    pub holder: bool,
}

impl Fencing {
    fn read(lun: &dyn Lun) -> Fencing {
        use crate::cluster::fence::{key_owner, JOIN_SLOT, TOOL_SLOT};
        let Some(pr) = lun.reservations() else {
            return Fencing {
                kind: "none".into(),
                detail: "no SCSI persistent reservations: a paused host's late writes are \
                         stopped by its lease alone"
                    .into(),
                keys: Vec::new(),
            };
        };
        let read = pr
            .read_reservation()
            .and_then(|held| Ok((held, pr.read_keys()?)));
        let (held, mut keys) = match read {
            Ok(read) => read,
            Err(e) => {
                return Fencing {
                    kind: "unreadable".into(),
                    detail: format!("PERSISTENT RESERVE IN failed: {e}"),
                    keys: Vec::new(),
                }
            }
        };
        keys.sort();
        keys.dedup();
        let detail = match held {
            Some(held) => format!("reserved {:?} (type {})", held.kind, held.kind.code()),
            None => "not reserved: no host has mounted it yet, or the reservation was \
                     dropped (the next mount reserves it again)"
                .into(),
        };
        let keys = keys
            .into_iter()
            .map(|key| FencingKey {
                key: key.to_string(),
                owner: match key_owner(key) {
                    Some((JOIN_SLOT, _)) => "a joining host".into(),
                    Some((TOOL_SLOT, _)) => "a tool (recover, fsck --repair, mkfs)".into(),
                    Some((slot, generation)) => format!("slot {slot}, generation {generation}"),
                    None => "another program".into(),
                },
                holder: held.is_some_and(|h| h.key == key),
            })
            .collect();
        Fencing {
            kind: "reservation".into(),
            detail,
            keys,
        }
    }
}

impl VolumeInfo {
    fn new(lun: &dyn Lun, sb: &Superblock) -> VolumeInfo {
        let volume = volume_ats_kind(sb).unwrap_or(AtsKind::Emulated);
        // On a Disk Paxos volume, atsfs takes the token over whatever device it
        // opens (`cluster::paxos::mounted_lun`): every opener matches.
        let opener = match volume {
            AtsKind::DiskPaxos => AtsKind::DiskPaxos,
            _ => lun.ats_kind(),
        };
        let opener_matches = volume == AtsKind::DiskPaxos || check_ats_mode(lun, sb).is_ok();
        VolumeInfo {
            device: lun.describe(),
            label: get_str(&sb.label),
            volume_uuid: uuid::Uuid::from_bytes(sb.volume_uuid).to_string(),
            ats_mode: volume.name().into(),
            opener_ats: opener.name().into(),
            opener_matches,
            ats_sector_size: sb.ats_sector_size,
            heartbeat_interval_ms: sb.heartbeat_interval_ms,
            lease_ms: sb.lease_ms,
            max_hosts: sb.max_hosts,
            fencing: Fencing::read(lun),
            token: Token::read(lun, sb),
        }
    }
}

#[cfg(test)]
mod tests;
