//! `atsfs locks`: the lock records of a volume, with their holders.
//!
//! Every inode's lock record is the first sector of its block, and every allocation
//! group header is a resource too. The inodes and their paths come from fsck's tree
//! walk (read through the journals' pending transactions, as replay will leave the
//! volume); the records themselves are read from the device, where hosts change them
//! by ATS. The walk runs while another thread watches the heartbeats, so the holders
//! are judged by the same rule as `atsfs status`.

use super::status::{watch_slots, watch_window, SlotRow, SlotState};
use super::VolumeInfo;
use crate::cluster::lock::{read_lock, LockState};
use crate::cluster::mailbox::read_mailbox;
use crate::cluster::HostUuid;
use crate::format::{
    BlockNo, Geometry, Superblock, LOCK_EXCLUSIVE, LOCK_MULTI_WRITER, LOCK_SHARED, OPEN_WRITER,
};
use crate::fs::read_superblock;
use crate::fsck::{groups::BlockMap, slots::check_journals, tree, volume::Volume, FsckReport};
use crate::lun::Lun;
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct LockQuery {
    /// Only this path inside the volume (like `/dir/file`), whatever its record holds.
    pub path: Option<String>,
    /// Free records too.
    pub all: bool,
    /// The heartbeat watch (default: `watch_window`).
    pub watch: Option<Duration>,
}

/// `atsfs locks`: the volume and its lock records.
#[derive(Clone, Debug, Serialize)]
pub struct LockReport {
    pub volume: VolumeInfo,
    /// How long the tool watched the heartbeats to judge the holders.
    pub watched_ms: u64,
    pub locks: Vec<LockRow>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    Inode,
    AllocationGroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordMode {
    Free,
    Exclusive,
    Shared,
    MultiWriter,
    /// The sector cannot be read, or does not decode (see `LockRow::error`).
    Damaged,
}

impl RecordMode {
    fn of(code: u32) -> RecordMode {
        match code {
            LOCK_EXCLUSIVE => RecordMode::Exclusive,
            LOCK_SHARED => RecordMode::Shared,
            LOCK_MULTI_WRITER => RecordMode::MultiWriter,
            _ => RecordMode::Free,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecordMode::Free => "free",
            RecordMode::Exclusive => "exclusive",
            RecordMode::Shared => "shared",
            RecordMode::MultiWriter => "multi-writer",
            RecordMode::Damaged => "damaged",
        }
    }
}

/// Whether a holder named by a record still counts, judged from the watched slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum HolderState {
    /// Its slot is LIVE with this generation and moved during the watch.
    #[serde(rename = "live")]
    Live,
    /// Its slot is LIVE with this generation but did not move yet.
    #[serde(rename = "live?")]
    Unsure,
    /// Its slot is silent past the lease: the hold lasts until a host recovers it.
    #[serde(rename = "dead")]
    Dead,
    /// Its slot's journal is being replayed; the hold is cleared after that.
    #[serde(rename = "recovering")]
    Recovering,
    /// Its slot has a newer generation, or was freed at this one: the hold is
    /// left over and any host may take the lock.
    #[serde(rename = "stale")]
    Stale,
    /// Its slot is never used, damaged, or older than the record says.
    #[serde(rename = "unknown")]
    Unknown,
}

impl HolderState {
    pub fn as_str(self) -> &'static str {
        match self {
            HolderState::Live => "live",
            HolderState::Unsure => "live?",
            HolderState::Dead => "dead",
            HolderState::Recovering => "recovering",
            HolderState::Stale => "stale",
            HolderState::Unknown => "unknown",
        }
    }
}

/// A host named by a record: a lock holder, the open writer or an open reader.
#[derive(Clone, Debug, Serialize)]
pub struct Owner {
    pub slot: u32,
    /// For open readers the record keeps only the low 16 bits of the generation.
    pub generation: u32,
    /// Recorded in the record (exclusive holder), else the slot's host when it is at
    /// this generation.
    pub host_uuid: Option<String>,
    pub hostname: Option<String>,
    pub state: HolderState,
    /// True while the holder counts (`live` or `live?`).
    pub live: bool,
}

/// A request in a holder's mailbox: `slot` wants the lock in `mode`.
#[derive(Clone, Debug, Serialize)]
pub struct Waiter {
    pub slot: u32,
    pub mode: RecordMode,
}

#[derive(Clone, Debug, Serialize)]
pub struct LockRow {
    /// The resource's block number (an inode's number, or a group's first block).
    pub resource: BlockNo,
    pub kind: ResourceKind,
    /// The inode's path, or `group N`.
    pub path: Option<String>,
    pub mode: RecordMode,
    pub change_seq: u64,
    /// The holders of the metadata lock.
    pub owners: Vec<Owner>,
    /// The host that has the file open for writing.
    pub open_writer: Option<Owner>,
    /// The hosts that have the file open read-only (or multi-writer).
    pub open_readers: Vec<Owner>,
    /// Hosts asking the holders for this lock (mailbox requests).
    pub waiters: Vec<Waiter>,
    /// Why the record is `damaged`.
    pub error: Option<String>,
}

impl LockRow {
    /// True when the record names anyone: a holder or an opener.
    pub fn held(&self) -> bool {
        !self.owners.is_empty() || self.open_writer.is_some() || !self.open_readers.is_empty()
    }
}

/// Lists the lock records: held (or damaged) ones, every one with `query.all`, or the
/// one of `query.path` whatever it holds.
pub fn locks(lun: &dyn Lun, query: &LockQuery) -> Result<LockReport> {
    let sb = read_superblock(lun)?;
    let geo = Geometry::from_superblock(&sb);
    let window = watch_window(&sb, query.watch);
    // The watch mostly sleeps: walk the tree meanwhile.
    let (watched, paths) = std::thread::scope(|scope| {
        let watch = scope.spawn(|| watch_slots(lun, &geo, &sb, window));
        let paths = inode_paths(lun, sb);
        let watched = watch
            .join()
            .map_err(|_| anyhow!("the heartbeat watch failed"))?;
        Ok::<_, anyhow::Error>((watched?, paths?))
    })?;
    let (watched, slots) = watched;
    let resources = match &query.path {
        Some(path) => vec![resource_of(&paths, path)?],
        None => every_resource(&geo, paths),
    };
    let waiters = waiters(lun, &geo, &slots);
    let mut rows = Vec::new();
    for (resource, kind, path) in resources {
        let row = lock_row(lun, &geo, resource, kind, path, &slots, &waiters);
        if query.path.is_some() || query.all || row.held() || row.mode == RecordMode::Damaged {
            rows.push(row);
        }
    }
    Ok(LockReport {
        volume: VolumeInfo::new(lun, &sb),
        watched_ms: watched.as_millis() as u64,
        locks: rows,
    })
}

/// Every inode reachable from the root, with (one of) its paths: fsck's tree walk,
/// read as replay will leave the volume. What the walk finds wrong is fsck's
/// business; here it only costs the paths it could not reach.
fn inode_paths(lun: &dyn Lun, sb: Superblock) -> Result<BTreeMap<BlockNo, String>> {
    let mut report = FsckReport::default();
    let mut vol = Volume::new(lun, sb);
    check_journals(&mut vol, &mut report, true)?;
    let mut map = BlockMap::new(vol.geo);
    tree::walk(
        &mut vol,
        &mut map,
        &mut report,
        &indicatif::ProgressBar::hidden(),
    )?;
    Ok(report.paths)
}

/// `path` made absolute, without empty or `.` components, `..` applied.
fn normalise(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    format!("/{}", parts.join("/"))
}

type Resource = (BlockNo, ResourceKind, Option<String>);

fn resource_of(paths: &BTreeMap<BlockNo, String>, path: &str) -> Result<Resource> {
    let want = normalise(path);
    match paths.iter().find(|(_, p)| **p == want) {
        Some((&ino, p)) => Ok((ino, ResourceKind::Inode, Some(p.clone()))),
        None => bail!(
            "{want}: no such path on the volume (give the path inside the volume, like \
             /dir/file, not through a mount point)"
        ),
    }
}

fn every_resource(geo: &Geometry, paths: BTreeMap<BlockNo, String>) -> Vec<Resource> {
    let inodes = paths
        .into_iter()
        .map(|(ino, p)| (ino, ResourceKind::Inode, Some(p)));
    let groups = (0..geo.ag_count).map(|ag| {
        let path = Some(format!("group {ag}"));
        (geo.ag_header(ag), ResourceKind::AllocationGroup, path)
    });
    inodes.chain(groups).collect()
}

/// Pending mailbox requests by resource, from the mailboxes of the slots in use.
fn waiters(lun: &dyn Lun, geo: &Geometry, slots: &[SlotRow]) -> HashMap<BlockNo, Vec<Waiter>> {
    let mut by_resource: HashMap<BlockNo, Vec<Waiter>> = HashMap::new();
    for row in slots.iter().filter(|r| r.state != SlotState::Damaged) {
        // A mailbox that cannot be read shows no waiters; it is not worth failing for.
        let Ok(mailbox) = read_mailbox(lun, geo, row.slot) else {
            continue;
        };
        for request in mailbox.requests() {
            by_resource
                .entry(request.resource)
                .or_default()
                .push(Waiter {
                    slot: request.from_slot,
                    mode: RecordMode::of(request.mode),
                });
        }
    }
    by_resource
}

fn lock_row(
    lun: &dyn Lun,
    geo: &Geometry,
    resource: BlockNo,
    kind: ResourceKind,
    path: Option<String>,
    slots: &[SlotRow],
    waiters: &HashMap<BlockNo, Vec<Waiter>>,
) -> LockRow {
    let mut row = LockRow {
        resource,
        kind,
        path,
        mode: RecordMode::Damaged,
        change_seq: 0,
        owners: Vec::new(),
        open_writer: None,
        open_readers: Vec::new(),
        waiters: waiters.get(&resource).cloned().unwrap_or_default(),
        error: None,
    };
    match read_lock(lun, geo, resource) {
        Ok(state) => fill(&mut row, &state, slots),
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

/// The record's mode, holders and openers.
fn fill(row: &mut LockRow, state: &LockState, slots: &[SlotRow]) {
    let r = &state.record;
    row.mode = RecordMode::of(r.mode);
    row.change_seq = r.change_seq;
    let recorded = (r.mode == LOCK_EXCLUSIVE).then_some(r.owner_uuid);
    row.owners = state
        .holders()
        .into_iter()
        .map(|(slot, generation)| owner(slots, slot, generation, false, recorded))
        .collect();
    row.open_writer = (r.open_flags & OPEN_WRITER != 0)
        .then(|| owner(slots, r.open_writer_slot, r.open_writer_gen, false, None));
    row.open_readers = (0..64u32)
        .filter(|&s| r.open_readers & (1u64 << s) != 0)
        .map(|s| {
            let generation = u32::from(r.open_reader_gen[s as usize]);
            owner(slots, s, generation, true, None)
        })
        .collect();
}

/// True when `generation` (only its low 16 bits when `low16`, read as the one
/// nearest the slot's) is older than the slot's.
fn older(slot_generation: u32, generation: u32, low16: bool) -> bool {
    if low16 {
        ((generation as u16).wrapping_sub(slot_generation as u16) as i16) < 0
    } else {
        slot_generation > generation
    }
}

/// A holder `(slot, generation)` judged against the watched slots (`low16`: only the
/// generation's low 16 bits are recorded). Same rule as `cluster::view`: a holder
/// is stale once its slot moved past its generation or was freed at it.
fn owner(
    slots: &[SlotRow],
    slot: u32,
    generation: u32,
    low16: bool,
    recorded: Option<[u8; 16]>,
) -> Owner {
    let row = slots.iter().find(|r| r.slot == slot);
    let same = row.filter(|r| {
        r.state != SlotState::Damaged
            && if low16 {
                u32::from(r.generation as u16) == generation
            } else {
                r.generation == generation
            }
    });
    let state = match (row, same) {
        (_, Some(r)) => match r.state {
            SlotState::Live => HolderState::Live,
            SlotState::Unsure => HolderState::Unsure,
            SlotState::Dead => HolderState::Dead,
            SlotState::Recovering => HolderState::Recovering,
            SlotState::Free => HolderState::Stale,
            SlotState::Damaged => HolderState::Unknown,
        },
        (Some(r), None)
            if r.state != SlotState::Damaged && older(r.generation, generation, low16) =>
        {
            HolderState::Stale
        }
        _ => HolderState::Unknown,
    };
    let host_uuid = recorded
        .map(|u| HostUuid(u).to_string())
        .or_else(|| same.map(|r| r.host_uuid.clone()));
    Owner {
        slot,
        generation,
        host_uuid,
        hostname: same.map(|r| r.hostname.clone()),
        state,
        live: matches!(state, HolderState::Live | HolderState::Unsure),
    }
}
