//! Lock records: the first ATS sector of every locked resource.
//!
//! Acquire = ATS(the image we read -> an image naming us); release = ATS(our image ->
//! free). A lock is valid only while its owner's slot is live with the generation the
//! record names; `Liveness` judges that.
//!
//! Invariants:
//! - A record is only ever changed by ATS against the exact image last read, so two
//!   hosts can never both believe they changed it from the same state.
//! - `change_seq` grows by one on every acquire and release, so a host that sees the
//!   same `change_seq` it saw when it last held the lock knows nobody wrote the
//!   resource since (its cached metadata is still good).

use super::HostUuid;
use crate::format::{
    encode_padded, BlockNo, Geometry, LockRecord, OnDisk, LOCK_EXCLUSIVE, LOCK_FREE,
    LOCK_MULTI_WRITER, LOCK_SHARED,
};
use crate::lun::{Caw, Lun, LunError};
use thiserror::Error;

/// How a lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Exclusive,
    Shared,
    MultiWriter,
}

impl LockMode {
    fn code(self) -> u32 {
        match self {
            LockMode::Exclusive => LOCK_EXCLUSIVE,
            LockMode::Shared => LOCK_SHARED,
            LockMode::MultiWriter => LOCK_MULTI_WRITER,
        }
    }
}

/// Who holds (or wants) a lock: a host in a slot, in one generation of that slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub uuid: HostUuid,
    pub slot: u32,
    pub generation: u32,
}

#[derive(Debug, Error)]
pub enum LockError {
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error("lock record of resource {resource} is damaged: {reason}")]
    Corrupted { resource: BlockNo, reason: String },
}

/// A lock record as read: its raw sector (the ATS "expected" image) and its fields.
#[derive(Clone, Debug)]
pub struct LockState {
    pub raw: Vec<u8>,
    pub record: LockRecord,
}

impl LockState {
    /// The holders the record names (the exclusive owner, or every shared holder).
    pub fn holders(&self) -> Vec<(u32, u32)> {
        let r = &self.record;
        match r.mode {
            LOCK_EXCLUSIVE => vec![(r.owner_slot, r.owner_gen)],
            LOCK_SHARED | LOCK_MULTI_WRITER => (0..64u32)
                .filter(|s| r.shared_slots & (1u64 << s) != 0)
                .map(|s| (s, r.shared_gen[s as usize]))
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn is_free(&self) -> bool {
        self.record.mode == LOCK_FREE
    }

    /// True when `me` is among the holders.
    pub fn held_by(&self, me: &Holder) -> bool {
        self.holders().contains(&(me.slot, me.generation))
    }
}

/// What an acquire attempt found.
#[derive(Clone, Debug)]
pub enum Acquire {
    /// We hold it now; the state is the image on disk.
    Got(LockState),
    /// Others hold it in a conflicting mode.
    Held(LockState),
}

fn decode(raw: Vec<u8>, resource: BlockNo) -> Result<LockState, LockError> {
    if raw.iter().all(|&b| b == 0) {
        let mut record: LockRecord = bytemuck::Zeroable::zeroed();
        record.resource = resource;
        return Ok(LockState { raw, record });
    }
    let record = LockRecord::decode(&raw, resource).map_err(|e| LockError::Corrupted {
        resource,
        reason: e.to_string(),
    })?;
    Ok(LockState { raw, record })
}

/// Reads a resource's lock record.
pub fn read_lock(lun: &dyn Lun, geo: &Geometry, resource: BlockNo) -> Result<LockState, LockError> {
    let mut raw = vec![0u8; geo.ats_sector_size as usize];
    lun.read_at(&mut raw, geo.lock_offset(resource))?;
    decode(raw, resource)
}

fn encode(record: &LockRecord, sector: u32) -> Vec<u8> {
    let mut sealed = *record;
    sealed.magic = LockRecord::MAGIC;
    sealed.seal();
    encode_padded(&sealed, sector as usize)
}

/// The record after `me` takes it in `mode`, or None when the current holders
/// conflict. `stale` says which current holders may be ignored (dead, recovered).
fn taken(
    state: &LockState,
    me: &Holder,
    mode: LockMode,
    stale: &dyn Fn(u32, u32) -> bool,
) -> Option<LockRecord> {
    let mut r = state.record;
    let live: Vec<(u32, u32)> = state
        .holders()
        .into_iter()
        .filter(|&(s, g)| !stale(s, g))
        .collect();
    let others: Vec<&(u32, u32)> = live.iter().filter(|&&(s, _)| s != me.slot).collect();
    let compatible = match (r.mode, mode) {
        _ if live.is_empty() => true,
        (LOCK_SHARED, LockMode::Shared) | (LOCK_MULTI_WRITER, LockMode::MultiWriter) => true,
        _ => {
            others.is_empty()
                && live
                    .iter()
                    .all(|&(s, g)| s == me.slot && g == me.generation)
        }
    };
    if !compatible {
        return None;
    }
    if live.is_empty() {
        r.shared_slots = 0;
        r.shared_gen = [0; 64];
        r.holders_count = 0;
    }
    r.mode = mode.code();
    r.change_seq = r.change_seq.wrapping_add(1);
    match mode {
        LockMode::Exclusive => {
            r.owner_slot = me.slot;
            r.owner_uuid = me.uuid.0;
            r.owner_gen = me.generation;
            r.shared_slots = 0;
            r.shared_gen = [0; 64];
            r.holders_count = 1;
        }
        LockMode::Shared | LockMode::MultiWriter => {
            // Keep only live holders, then add us.
            let mut slots = 0u64;
            let mut gens = [0u32; 64];
            for &(s, g) in &live {
                slots |= 1u64 << s;
                gens[s as usize] = g;
            }
            slots |= 1u64 << me.slot;
            gens[me.slot as usize] = me.generation;
            r.shared_slots = slots;
            r.shared_gen = gens;
            r.holders_count = slots.count_ones();
            r.owner_slot = 0;
            r.owner_uuid = [0; 16];
            r.owner_gen = 0;
        }
    }
    Some(r)
}

/// Writes `next` over the record `state` by one ATS, telling a lost reply or a false
/// miscompare (our image is there) from a real conflict. `Ok(state)`: written;
/// `Err(state)`: the record holds something else now.
fn swap(
    lun: &dyn Lun,
    geo: &Geometry,
    state: &LockState,
    next: LockRecord,
) -> Result<Result<LockState, LockState>, LockError> {
    let resource = state.record.resource;
    let image = encode(&next, geo.ats_sector_size);
    let actual = match lun.compare_and_write(geo.lock_offset(resource), &state.raw, &image) {
        Ok(Caw::Written) => image.clone(),
        Ok(Caw::Miscompare(actual)) => actual,
        Err(e) => {
            // The reply may be lost with the write landed: look before giving up.
            let now = read_lock(lun, geo, resource)?;
            if now.raw == state.raw {
                return Err(e.into());
            }
            now.raw
        }
    };
    if actual == image {
        return Ok(Ok(LockState {
            raw: image,
            record: next,
        }));
    }
    Ok(Err(decode(actual, resource)?))
}

/// One ATS attempt to take a lock, starting from `state` (the image last read).
/// On a miscompare the new image is returned in `Err(Some(state))`-like form: the
/// caller retries from it.
pub fn try_acquire(
    lun: &dyn Lun,
    geo: &Geometry,
    state: &LockState,
    me: &Holder,
    mode: LockMode,
    stale: &dyn Fn(u32, u32) -> bool,
) -> Result<Result<Acquire, LockState>, LockError> {
    let resource = state.record.resource;
    if state.held_by(me) && (state.record.mode == mode.code()) {
        return Ok(Ok(Acquire::Got(state.clone())));
    }
    let Some(next) = taken(state, me, mode, stale) else {
        // The image may be old (a cached one): only the disk can say it is held.
        let now = read_lock(lun, geo, resource)?;
        if now.raw != state.raw {
            return Ok(Err(now));
        }
        return Ok(Ok(Acquire::Held(now)));
    };
    Ok(swap(lun, geo, state, next)?.map(Acquire::Got))
}

/// Releases our hold on a lock whose current image is `state` (as we last wrote or
/// read it). Returns the new state, or the image found when it changed under us
/// (the caller re-reads and retries, or learns it was broken by recovery).
pub fn try_release(
    lun: &dyn Lun,
    geo: &Geometry,
    state: &LockState,
    me: &Holder,
) -> Result<Result<LockState, LockState>, LockError> {
    if !state.held_by(me) {
        return Ok(Ok(state.clone()));
    }
    let mut next = state.record;
    next.change_seq = next.change_seq.wrapping_add(1);
    match next.mode {
        LOCK_EXCLUSIVE => {
            next.mode = LOCK_FREE;
            next.owner_slot = 0;
            next.owner_uuid = [0; 16];
            next.owner_gen = 0;
            next.holders_count = 0;
        }
        _ => {
            next.shared_slots &= !(1u64 << me.slot);
            next.shared_gen[me.slot as usize] = 0;
            next.holders_count = next.shared_slots.count_ones();
            if next.shared_slots == 0 {
                next.mode = LOCK_FREE;
            }
        }
    }
    swap(lun, geo, state, next)
}

/// What kind of open a host records in a lock record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenKind {
    /// Read-only: any number of hosts, but no writer on another host.
    Read,
    /// For writing: no other host may have the file open at all.
    Write,
    /// Opt-in multi-writer file: any number of hosts, each doing direct I/O.
    Shared,
}

/// The record after `me` adds (or, with `add = false`, removes) an open of `kind`;
/// `None` when another live host's open conflicts. Stale entries are cleared.
pub fn open_changed(
    record: &LockRecord,
    me: &Holder,
    kind: OpenKind,
    add: bool,
    stale: &dyn Fn(u32, u32) -> bool,
    stale16: &dyn Fn(u32, u16) -> bool,
) -> Option<LockRecord> {
    let mut r = *record;
    // Forget entries of hosts that are gone (their journals were replayed).
    if r.open_flags & crate::format::OPEN_WRITER != 0
        && stale(r.open_writer_slot, r.open_writer_gen)
    {
        r.open_flags &= !crate::format::OPEN_WRITER;
        r.open_writer_slot = 0;
        r.open_writer_gen = 0;
    }
    for s in 0..64u32 {
        if r.open_readers & (1u64 << s) != 0 && stale16(s, r.open_reader_gen[s as usize]) {
            r.open_readers &= !(1u64 << s);
            r.open_reader_gen[s as usize] = 0;
        }
    }
    let gen16 = me.generation as u16;
    let my_bit = 1u64 << me.slot;
    let other_writer = r.open_flags & crate::format::OPEN_WRITER != 0
        && (r.open_writer_slot != me.slot || r.open_writer_gen != me.generation);
    let other_readers = r.open_readers & !my_bit != 0;
    match (kind, add) {
        (OpenKind::Write, true) => {
            if other_writer || other_readers {
                return None;
            }
            r.open_flags |= crate::format::OPEN_WRITER;
            r.open_writer_slot = me.slot;
            r.open_writer_gen = me.generation;
        }
        (OpenKind::Read | OpenKind::Shared, true) => {
            if other_writer {
                return None;
            }
            r.open_readers |= my_bit;
            r.open_reader_gen[me.slot as usize] = gen16;
        }
        (OpenKind::Write, false) => {
            if !other_writer {
                r.open_flags &= !crate::format::OPEN_WRITER;
                r.open_writer_slot = 0;
                r.open_writer_gen = 0;
            }
        }
        (OpenKind::Read | OpenKind::Shared, false) => {
            r.open_readers &= !my_bit;
            r.open_reader_gen[me.slot as usize] = 0;
        }
    }
    r.change_seq = r.change_seq.wrapping_add(1);
    Some(r)
}

/// One ATS attempt to record an open or close. `Ok(Ok(Some(state)))`: written;
/// `Ok(Ok(None))`: another host's open conflicts (checked against the disk);
/// `Ok(Err(state))`: the record changed, retry from `state`.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn try_open(
    lun: &dyn Lun,
    geo: &Geometry,
    state: &LockState,
    me: &Holder,
    kind: OpenKind,
    add: bool,
    stale: &dyn Fn(u32, u32) -> bool,
    stale16: &dyn Fn(u32, u16) -> bool,
) -> Result<Result<Option<LockState>, LockState>, LockError> {
    let resource = state.record.resource;
    let Some(next) = open_changed(&state.record, me, kind, add, stale, stale16) else {
        let now = read_lock(lun, geo, resource)?;
        if now.raw != state.raw {
            return Ok(Err(now));
        }
        return Ok(Ok(None));
    };
    let mut next = next;
    next.resource = resource;
    Ok(swap(lun, geo, state, next)?.map(Some))
}
