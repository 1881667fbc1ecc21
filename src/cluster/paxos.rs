//! Disk Paxos test-and-set: the volume's one token, taken with plain sector reads and
//! writes, for shared disks without COMPARE AND WRITE (`ats_mode = 3`). The protocol
//! and why it is safe: docs/locking.md, "Disk Paxos test-and-set"; the bytes:
//! docs/format.md, "Disk Paxos region".
//!
//! Two parts:
//! - `Proposer`: one ballot of Disk Paxos for one instance of the token, as a state
//!   machine that does exactly one I/O per `step` (so tests can pause it between any
//!   two I/Os, and interleave several).
//! - `PaxosLun`: a `Lun` whose `compare_and_write` is read, compare, write while
//!   holding the token; every other call passes through. It needs the host's slot,
//!   generation and clock, so the cluster layer builds it after the slot claim.
//!
//! Invariants:
//! - A host writes only its own dblock (`region.dblock_offset(me.slot)`) and the
//!   leader record, each one whole sector.
//! - The leader record only ever names a value decided for its `lver`; only the
//!   owner of that instance writes it `RELEASED`, after its last write completed.
//! - A host writes a compare-and-write's sector only while its token is valid by its
//!   own clock (`issue of its first phase-1 write for the instance + token - margin`),
//!   checked right before the write.
//! - A taker starts instance `lver + 1` of a leader that names another holder (not
//!   released) only once that leader image has stood unchanged for `token + margin`
//!   on its own clock.
//! - A waiter says so in its dblock (`request`); a host steps back for another
//!   dblock that wants the same instance (`YIELDS_MAX`), and a mounted host, which
//!   keeps its token between compare-and-writes (`start_releaser`), gives it up when
//!   it is idle for `LINGER_MS`, half its lease old, or asked for (after the
//!   compare-and-write in progress, or within `RELEASER_TICK_MS` when idle).
//! - Every loop is bounded (`ACQUIRE_ATTEMPTS_MAX`, `CAW_ATTEMPTS_MAX`).

use super::delta::{untrusted_write, DeltaLun, DeltaTiming};
use super::{Clock, Lease, SlotClaim};
use crate::format::{
    encode_padded, BlockNo, Geometry, OnDisk, PaxosDblock, PaxosLeader, Superblock,
    ATS_MODE_DISK_PAXOS, HOSTS_MAX, PAXOS_LEADER_RELEASED, PAXOS_NO_OWNER,
};
use crate::lun::{check_caw, AtsKind, Caw, Lun, LunError, LunResult, Reservations};
use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Ballots and reads of the region one acquisition may take before it gives up
/// (`LunError::AtsTimeout`: nothing was written, try again later).
pub const ACQUIRE_ATTEMPTS_MAX: u32 = 10_000;
/// Times one compare-and-write takes the token anew because it ran out between the
/// read and the write.
const CAW_ATTEMPTS_MAX: u32 = 8;
/// Sleep between two reads of the region (one read each) while waiting for another
/// host's token that it took or last changed less than `FAST_POLL_FOR_MS` ago: a
/// live holder asked for the token gives it back within about a millisecond
/// (`start_releaser`), so a hand-off between busy hosts costs about this much.
const FAST_POLL_MS: u64 = 1;
/// How long after the leader record last changed a waiter polls every
/// `FAST_POLL_MS`; after that (a holder that keeps the token: busy without being
/// asked, paused, or dead), every `WAIT_POLL_MS`.
const FAST_POLL_FOR_MS: u64 = 50;
/// Longest sleep while waiting for another host's token, between two reads.
const WAIT_POLL_MS: u64 = 5;
/// Times one acquisition steps back (`FAST_POLL_MS` each, re-reading the region
/// after each) for another host whose dblock shows it wants the same instance: long
/// enough for a waiter that polls fast to see a release and win, so that a busy host
/// cannot starve the others.
const YIELDS_MAX: u32 = 6;
/// With a releaser (`start_releaser`): how long a token is kept after its last
/// compare-and-write, for the next one, before it is given back.
const LINGER_MS: u64 = 3;
/// The releaser's tick, and how long a kept token must have been idle before the
/// releaser reads the region to see whether another host asks for it.
const RELEASER_TICK_MS: u64 = 1;
/// The releaser sleeps this long while no token is held (it is woken when one is
/// taken), so that a mounted host that is not using the token is not woken every
/// `RELEASER_TICK_MS`.
const RELEASER_IDLE_MS: u64 = 100;
/// A busy holder of a kept token reads the region for requests (`asked_for`) before
/// a compare-and-write when it last did so this long ago or more: at most one extra
/// I/O per millisecond instead of one per compare-and-write, while a waiter, which
/// polls every `FAST_POLL_MS`, is kept waiting hardly longer.
const ASKED_CHECK_MS: u64 = 1;

/// Where the Disk Paxos region is: the leader record, then one dblock per slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaxosRegion {
    /// `paxos_start`: the leader record's self block number.
    pub blockno: BlockNo,
    pub leader_offset: u64,
    pub sector: usize,
    pub hosts: u32,
}

impl PaxosRegion {
    /// The region of a volume; `None` when it has none.
    pub fn of(geo: &Geometry) -> Option<PaxosRegion> {
        (geo.paxos_start != 0).then(|| PaxosRegion {
            blockno: geo.paxos_start,
            leader_offset: geo.paxos_leader_offset(),
            sector: geo.ats_sector_size as usize,
            hosts: geo.max_hosts,
        })
    }

    /// Bytes of the whole region: one read of "everybody".
    pub fn len(&self) -> usize {
        (1 + self.hosts as usize) * self.sector
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn dblock_offset(&self, slot: u32) -> u64 {
        self.leader_offset + (1 + u64::from(slot)) * self.sector as u64
    }
}

/// The token's owner for one instance: a slot in one generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub slot: u32,
    pub generation: u32,
}

/// The volume's io_timeout: the longest a host's write may take, issue to reply, and
/// be trusted. Everything else derives from it (`TokenTiming::for_token`,
/// `DeltaTiming::for_volume`); the superblock records the token's lease, twice it.
pub fn io_timeout_ms(sb: &Superblock) -> u64 {
    u64::from(sb.paxos_token_ms) / 2
}

/// The delta-lease timing of a volume (its heartbeat interval and io_timeout).
pub fn delta_timing(sb: &Superblock) -> DeltaTiming {
    DeltaTiming::for_volume(
        Duration::from_millis(u64::from(sb.heartbeat_interval_ms)),
        Duration::from_millis(io_timeout_ms(sb)),
    )
}

/// The device as a mount's slot claim must use it: on a Disk Paxos volume through
/// the delta lease (no compare-and-write exists yet), else the device itself.
pub fn claim_lun(lun: &Arc<dyn Lun>, sb: &Superblock, clock: &Arc<dyn Clock>) -> Arc<dyn Lun> {
    if sb.ats_mode != ATS_MODE_DISK_PAXOS {
        return lun.clone();
    }
    Arc::new(DeltaLun::new(lun.clone(), clock.clone(), delta_timing(sb)))
}

/// The device as a host uses it once its slot is claimed: on a Disk Paxos volume a
/// `PaxosLun` with the claimed slot as its identity, checking `lease` before every
/// write of its own records; else the device itself. Everything the host does from
/// then on (renewals, locks, recovery, the fs) goes through the returned LUN.
pub fn mounted_lun(
    lun: Arc<dyn Lun>,
    sb: &Superblock,
    claim: &SlotClaim,
    clock: &Arc<dyn Clock>,
    lease: &Arc<Lease>,
) -> Arc<dyn Lun> {
    let geo = Geometry::from_superblock(sb);
    let Some(region) = PaxosRegion::of(&geo) else {
        return lun;
    };
    let me = Owner {
        slot: claim.slot,
        generation: claim.generation,
    };
    let timing = TokenTiming::for_token(u64::from(sb.paxos_token_ms));
    let delta = DeltaSectors::heartbeats(&geo, claim.slot, delta_timing(sb));
    let paxos = Arc::new(
        PaxosLun::new(lun, region, me, clock.clone(), timing)
            .with_lease(lease.clone())
            .with_delta_sectors(delta),
    );
    paxos.start_releaser();
    paxos
}

/// Other slots' heartbeat sectors: a compare-and-write there may race a delta-lease
/// claim of the slot (`cluster::delta`), so it follows the delta rule as well: its
/// read is at most `fresh_ms` old when it writes, and it counts as written only if
/// the sector still holds its image `settle_ms` later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaSectors {
    first_offset: u64,
    stride: u64,
    count: u32,
    own_offset: u64,
    timing: DeltaTiming,
}

impl DeltaSectors {
    /// The heartbeat sectors of `geo`, but `own_slot`'s (only we write ours).
    pub fn heartbeats(geo: &Geometry, own_slot: u32, timing: DeltaTiming) -> DeltaSectors {
        DeltaSectors {
            first_offset: geo.slot_offset(0),
            stride: geo.slot_offset(1).saturating_sub(geo.slot_offset(0)),
            count: geo.max_hosts,
            own_offset: geo.slot_offset(own_slot),
            timing,
        }
    }

    fn is_own(&self, offset: u64) -> bool {
        offset == self.own_offset
    }

    fn covers(&self, offset: u64) -> bool {
        if offset == self.own_offset || offset < self.first_offset || self.stride == 0 {
            return false;
        }
        let from = offset - self.first_offset;
        from % self.stride == 0 && from / self.stride < u64::from(self.count)
    }
}

/// How long a token is valid, and the guard bands around it, all from one io_timeout
/// (as sanlock derives its timeouts from its `io_timeout`).
#[derive(Clone, Copy, Debug)]
pub struct TokenTiming {
    /// `Superblock::paxos_token_ms`: twice the io_timeout.
    pub token_ms: u64,
    /// The holder stops writing `margin_ms` before its token ends, and a taker waits
    /// `margin_ms` longer: a write issued at the last moment and landing within
    /// io_timeout lands before any taker starts, with as much again to spare.
    pub margin_ms: u64,
    /// A write under the token whose reply took longer is not trusted (the host
    /// fences itself): it may have landed after the token ran out.
    pub io_timeout_ms: u64,
}

impl TokenTiming {
    /// The timing for a volume's recorded token lease (`2 * io_timeout`): a margin of
    /// one io_timeout, so half the token is usable.
    pub fn for_token(token_ms: u64) -> TokenTiming {
        let io_timeout_ms = token_ms / 2;
        TokenTiming {
            token_ms,
            margin_ms: io_timeout_ms,
            io_timeout_ms,
        }
    }
}

/// One read of the whole region, decoded.
#[derive(Clone, Debug)]
pub struct RegionView {
    pub leader: PaxosLeader,
    /// The leader sector as read: a taker's wait runs from when this last changed.
    pub leader_raw: Vec<u8>,
    /// Slot `i`'s dblock; `None` for a slot that never took part (all zeros).
    pub dblocks: Vec<Option<PaxosDblock>>,
}

impl RegionView {
    /// Decodes the region's bytes. A sector that does not decode is an error: an
    /// accepted value must never be overlooked.
    pub fn decode(region: &PaxosRegion, raw: &[u8]) -> LunResult<RegionView> {
        let sector = region.sector;
        if raw.len() != region.len() {
            return Err(corrupted(region.leader_offset, "short read of the region"));
        }
        let leader = PaxosLeader::decode(&raw[..sector], region.blockno)
            .map_err(|e| corrupted(region.leader_offset, &e.to_string()))?;
        let mut dblocks = Vec::with_capacity(region.hosts as usize);
        for slot in 0..region.hosts {
            let at = (1 + slot as usize) * sector;
            let bytes = &raw[at..at + sector];
            if bytes.iter().all(|&b| b == 0) {
                dblocks.push(None);
                continue;
            }
            let offset = region.dblock_offset(slot);
            let d = PaxosDblock::decode(bytes, region.blockno)
                .map_err(|e| corrupted(offset, &e.to_string()))?;
            if d.slot != slot {
                return Err(corrupted(offset, &format!("dblock of slot {}", d.slot)));
            }
            dblocks.push(Some(d));
        }
        Ok(RegionView {
            leader,
            leader_raw: raw[..sector].to_vec(),
            dblocks,
        })
    }

    /// The leader's owner, unless it names none or was released.
    pub fn holder(&self) -> Option<Owner> {
        let l = &self.leader;
        (l.owner_slot != PAXOS_NO_OWNER && l.flags & PAXOS_LEADER_RELEASED == 0).then_some(Owner {
            slot: l.owner_slot,
            generation: l.owner_gen,
        })
    }

    /// The instance a taker works on: the leader's next one, or a later one some
    /// dblock already started (it must be finished, never skipped).
    pub fn instance_to_decide(&self) -> u64 {
        let started = self.dblocks.iter().flatten().map(|d| d.lver).max();
        (self.leader.lver + 1).max(started.unwrap_or(0))
    }

    /// Why a ballot for `lver` with ballot `mbal` must stop, if it must.
    fn conflict(&self, lver: u64, mbal: u64) -> Option<Abort> {
        for d in self.dblocks.iter().flatten() {
            if d.lver > lver {
                return Some(Abort::NewerInstance);
            }
            if d.lver == lver && d.mbal > mbal {
                return Some(Abort::HigherBallot);
            }
        }
        None
    }

    /// The value accepted in the highest ballot for `lver`, if any.
    fn accepted(&self, lver: u64) -> Option<Owner> {
        self.dblocks
            .iter()
            .flatten()
            .filter(|d| d.lver == lver && d.bal > 0)
            .max_by_key(|d| d.bal)
            .map(|d| Owner {
                slot: d.inp_slot,
                generation: d.inp_gen,
            })
    }

    /// The next ballot of `slot` for `lver`: above every ballot seen for it.
    fn next_ballot(&self, lver: u64, slot: u32) -> u64 {
        let highest = self
            .dblocks
            .iter()
            .flatten()
            .filter(|d| d.lver == lver)
            .map(|d| d.mbal)
            .max()
            .unwrap_or(0);
        let hosts = u64::from(HOSTS_MAX);
        (highest / hosts + 1) * hosts + u64::from(slot) + 1
    }
}

fn corrupted(offset: u64, reason: &str) -> LunError {
    LunError::Io {
        device: "the Disk Paxos region".into(),
        op: "decode",
        offset,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason.to_string()),
    }
}

/// Reads and decodes the whole region in one read.
pub fn read_region(lun: &dyn Lun, region: &PaxosRegion) -> LunResult<RegionView> {
    let mut raw = vec![0u8; region.len()];
    lun.read_at(&mut raw, region.leader_offset)?;
    RegionView::decode(region, &raw)
}

/// Why a ballot stopped without deciding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// Another proposer joined the instance with a higher ballot.
    HigherBallot,
    /// Some dblock is about a later instance: this one is long decided.
    NewerInstance,
}

/// How a ballot ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `owner` is decided for instance `lver` (and the leader record says so).
    Decided {
        lver: u64,
        owner: Owner,
    },
    Aborted(Abort),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Prepare,
    Promise,
    Accept,
    Accepted,
    Publish,
    Done(Outcome),
}

/// One ballot for one instance, one I/O per `step`. Built from a read of the region;
/// then: write our dblock with a new `mbal` (phase 1), read everybody, write our
/// dblock with the chosen value (phase 2), read everybody, write the leader record.
pub struct Proposer {
    region: PaxosRegion,
    me: Owner,
    lver: u64,
    mbal: u64,
    own: PaxosDblock,
    value: Owner,
    stage: Stage,
    /// Sectors per read of the region; the whole region unless a test reads it a
    /// sector at a time (a multi-sector read is not atomic).
    sectors_per_read: usize,
    buf: Vec<u8>,
    read_done: usize,
    /// Clock time at which our phase-1 write was issued.
    pub phase1_issued_ms: Option<u64>,
}

impl Proposer {
    /// A ballot for the instance `view` says is next, with a ballot above all seen.
    pub fn new(region: PaxosRegion, me: Owner, view: &RegionView) -> Proposer {
        let lver = view.instance_to_decide();
        let mbal = view.next_ballot(lver, me.slot);
        let mut own: PaxosDblock = match view.dblocks.get(me.slot as usize) {
            Some(Some(d)) if d.lver == lver => *d,
            _ => bytemuck::Zeroable::zeroed(),
        };
        own.magic = PaxosDblock::MAGIC;
        own.slot = me.slot;
        own.owner_gen = me.generation;
        own.lver = lver;
        own.mbal = mbal;
        Proposer {
            region,
            me,
            lver,
            mbal,
            own,
            value: me,
            stage: Stage::Prepare,
            sectors_per_read: 1 + region.hosts as usize,
            buf: vec![0u8; region.len()],
            read_done: 0,
            phase1_issued_ms: None,
        }
    }

    /// Reads the region `sectors` sectors at a time (tests: 1, so that other
    /// proposers' writes land between the sectors of one "read everybody").
    pub fn read_in_pieces(mut self, sectors: usize) -> Proposer {
        self.sectors_per_read = sectors.max(1);
        self
    }

    pub fn lver(&self) -> u64 {
        self.lver
    }

    pub fn outcome(&self) -> Option<Outcome> {
        match self.stage {
            Stage::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Does the next I/O of the ballot. Returns the outcome once there is one.
    pub fn step(&mut self, lun: &dyn Lun, now_ms: u64) -> LunResult<Option<Outcome>> {
        match self.stage {
            Stage::Prepare => {
                self.phase1_issued_ms.get_or_insert(now_ms);
                self.write_own(lun)?;
                self.stage = Stage::Promise;
            }
            Stage::Promise => {
                if let Some(view) = self.read_piece(lun)? {
                    self.after_promise(&view);
                }
            }
            Stage::Accept => {
                self.own.bal = self.mbal;
                self.own.inp_slot = self.value.slot;
                self.own.inp_gen = self.value.generation;
                self.write_own(lun)?;
                self.stage = Stage::Accepted;
            }
            Stage::Accepted => {
                if let Some(view) = self.read_piece(lun)? {
                    let decided = Outcome::Decided {
                        lver: self.lver,
                        owner: self.value,
                    };
                    self.stage = match view.conflict(self.lver, self.mbal) {
                        Some(abort) => Stage::Done(Outcome::Aborted(abort)),
                        // Another host's instance that the leader names already (its
                        // owner published it, perhaps used and released it): our
                        // publish would only re-arm it.
                        None if self.value != self.me && view.leader.lver >= self.lver => {
                            Stage::Done(decided)
                        }
                        None => Stage::Publish,
                    };
                }
            }
            Stage::Publish => {
                write_leader(lun, &self.region, self.lver, self.value, 0, self.me.slot)?;
                self.stage = Stage::Done(Outcome::Decided {
                    lver: self.lver,
                    owner: self.value,
                });
            }
            Stage::Done(_) => {}
        }
        Ok(self.outcome())
    }

    /// Runs the ballot to its end.
    pub fn run(&mut self, lun: &dyn Lun, clock: &dyn Clock) -> LunResult<Outcome> {
        self.run_guarded(lun, clock, &|| Ok(()))
    }

    /// True when the next step writes (our dblock or the leader).
    fn writes_next(&self) -> bool {
        matches!(self.stage, Stage::Prepare | Stage::Accept | Stage::Publish)
    }

    /// Runs the ballot to its end, asking `may_write` before each of its writes: a
    /// host paused past its lease mid-ballot may have lost its slot to a new owner,
    /// whose dblock (and accepted value) its next write would overwrite.
    pub fn run_guarded(
        &mut self,
        lun: &dyn Lun,
        clock: &dyn Clock,
        may_write: &dyn Fn() -> LunResult<()>,
    ) -> LunResult<Outcome> {
        // Five stages, each at most `1 + hosts` reads: bounded.
        for _ in 0..8 * (2 + self.region.hosts as usize) {
            if self.writes_next() {
                may_write()?;
            }
            if let Some(outcome) = self.step(lun, clock.now_ms())? {
                return Ok(outcome);
            }
        }
        Err(corrupted(self.region.leader_offset, "a ballot did not end"))
    }

    /// Phase 1's read is complete: stop, or carry on with the value of the highest
    /// accepted ballot (ours if none).
    fn after_promise(&mut self, view: &RegionView) {
        if let Some(abort) = view.conflict(self.lver, self.mbal) {
            self.stage = Stage::Done(Outcome::Aborted(abort));
            return;
        }
        self.value = view.accepted(self.lver).unwrap_or(self.me);
        self.stage = Stage::Accept;
    }

    fn write_own(&mut self, lun: &dyn Lun) -> LunResult<()> {
        let mut sealed = self.own;
        sealed.seal();
        let image = encode_padded(&sealed, self.region.sector);
        lun.write_at(&image, self.region.dblock_offset(self.me.slot))
    }

    /// Reads the next piece of the region; the decoded view once all is read.
    fn read_piece(&mut self, lun: &dyn Lun) -> LunResult<Option<RegionView>> {
        let sector = self.region.sector;
        let total = self.buf.len() / sector;
        let count = self.sectors_per_read.min(total - self.read_done);
        let from = self.read_done * sector;
        let to = from + count * sector;
        lun.read_at(
            &mut self.buf[from..to],
            self.region.leader_offset + from as u64,
        )?;
        self.read_done += count;
        if self.read_done < total {
            return Ok(None);
        }
        self.read_done = 0;
        RegionView::decode(&self.region, &self.buf).map(Some)
    }
}

/// Writes the leader record: `owner` decided for `lver`, released or not.
pub fn write_leader(
    lun: &dyn Lun,
    region: &PaxosRegion,
    lver: u64,
    owner: Owner,
    flags: u32,
    writer_slot: u32,
) -> LunResult<()> {
    let mut leader: PaxosLeader = bytemuck::Zeroable::zeroed();
    leader.magic = PaxosLeader::MAGIC;
    leader.blockno = region.blockno;
    leader.lver = lver;
    leader.owner_slot = owner.slot;
    leader.owner_gen = owner.generation;
    leader.flags = flags;
    leader.writer_slot = writer_slot;
    leader.seal();
    lun.write_at(&encode_padded(&leader, region.sector), region.leader_offset)
}

/// The token this host holds: instance `lver`, from the issue of our first phase-1
/// write for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    lver: u64,
    since_ms: u64,
}

/// This host's side of the token, under `PaxosLun::state`.
#[derive(Default)]
struct TokenState {
    held: Option<Held>,
    /// Our clock at the end of the last compare-and-write under `held`.
    used_at_ms: u64,
    /// Another host asked for `held` (seen by `ensure`): it goes back after the
    /// compare-and-write in progress.
    asked: bool,
    /// Our clock when we last read the region (for requests, or in a ballot) while
    /// holding `held`.
    asked_checked_ms: u64,
    /// The leader sector as last read, and our clock when it last changed.
    seen_leader: Vec<u8>,
    seen_at_ms: u64,
    /// An instance to decide that is ahead of the leader's next one (the leader
    /// record is late or was overwritten by a late write), and our clock when we
    /// first saw it so.
    ahead: Option<(u64, u64)>,
    /// The highest instance we saw released (or released ourselves): an unreleased
    /// leader of an instance up to it is a late write (a finisher's publish) and
    /// names nobody who holds the token.
    released_lver: u64,
}

/// Counts of what a `PaxosLun` did (for the bench and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PaxosStats {
    pub acquisitions: u64,
    pub ballots: u64,
    pub aborted_ballots: u64,
    pub releases: u64,
}

/// A LUN whose compare-and-write is atomic among hosts through the volume's Disk
/// Paxos token. Reads, writes and flushes pass through. Build one per host (per
/// mount), after its slot claim, with the slot and generation it claimed.
pub struct PaxosLun {
    inner: Arc<dyn Lun>,
    region: PaxosRegion,
    me: Owner,
    clock: Arc<dyn Clock>,
    timing: TokenTiming,
    /// Checked before every write of the token's own records (a host past its lease
    /// must not write its dblock: its slot may belong to someone else now).
    lease: Option<Arc<Lease>>,
    delta: Option<DeltaSectors>,
    state: Mutex<TokenState>,
    /// Threads of this host waiting for `state`: while there are some, the token is
    /// kept for them (up to half its lease).
    waiting: AtomicUsize,
    /// True once a releaser thread gives idle tokens back: then a token is kept
    /// between compare-and-writes (while nobody else asks for it).
    linger: std::sync::atomic::AtomicBool,
    /// Set by `retire`: the releaser thread ends, no token is kept any more.
    retired: std::sync::atomic::AtomicBool,
    /// The releaser thread, woken when a token is taken.
    releaser: std::sync::OnceLock<std::thread::Thread>,
    stats: Mutex<PaxosStats>,
}

impl PaxosLun {
    pub fn new(
        inner: Arc<dyn Lun>,
        region: PaxosRegion,
        me: Owner,
        clock: Arc<dyn Clock>,
        timing: TokenTiming,
    ) -> PaxosLun {
        assert!(
            me.slot < region.hosts,
            "slot {} of {}",
            me.slot,
            region.hosts
        );
        PaxosLun {
            inner,
            region,
            me,
            clock,
            timing,
            lease: None,
            delta: None,
            state: Mutex::new(TokenState::default()),
            waiting: AtomicUsize::new(0),
            linger: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
            releaser: std::sync::OnceLock::new(),
            stats: Mutex::new(PaxosStats::default()),
        }
    }

    /// Checks `lease` before every write of the token's records.
    pub fn with_lease(mut self, lease: Arc<Lease>) -> PaxosLun {
        self.lease = Some(lease);
        self
    }

    /// Confirms compare-and-writes of these sectors by the delta rule.
    pub fn with_delta_sectors(mut self, delta: DeltaSectors) -> PaxosLun {
        self.delta = Some(delta);
        self
    }

    /// The delta rule's timing when a compare-and-write of `offset` from `expected`
    /// may race a delta-lease claim: another slot's heartbeat sector, unless it holds
    /// a slot under another host's recovery, which no claimer writes
    /// (`heartbeat::claim_may_race`): a recoverer's renewals and its free then take
    /// only the token, and do not settle.
    fn delta_at(&self, offset: u64, expected: &[u8]) -> Option<DeltaTiming> {
        self.delta
            .filter(|d| d.covers(offset) && super::heartbeat::claim_may_race(expected))
            .map(|d| d.timing)
    }

    pub fn stats(&self) -> PaxosStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut PaxosStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The host lease by our clock only (`Lease::check`): `confirm` would re-read our
    /// heartbeat slot under the lock the renewer holds while it renews through us.
    fn may_write_records(&self) -> LunResult<()> {
        match &self.lease {
            Some(lease) => lease.check(),
            None => Ok(()),
        }
    }

    /// The host lease right before a write of a compare-and-write's sector
    /// (`Lease::confirm`: when the last renewal is older than an interval, our slot is
    /// re-read, and a slot another host took fences us). Never called with our
    /// heartbeat's state locked: the renewer locks it only around our own slot's
    /// compare-and-write, which takes no token.
    fn lease_confirmed(&self) -> LunResult<()> {
        match &self.lease {
            Some(lease) => lease.confirm(),
            None => Ok(()),
        }
    }

    /// True while `held` may still be written under, by our clock.
    fn valid(&self, held: &Held) -> bool {
        let end = held.since_ms + self.timing.token_ms;
        self.clock.now_ms() + self.timing.margin_ms < end
    }

    /// How long a taker must still wait before it may start instance `lver`.
    fn wait_ms(&self, st: &TokenState, view: &RegionView, lver: u64, now: u64) -> Option<u64> {
        if lver != view.leader.lver + 1 || view.leader.lver <= st.released_lver {
            return None;
        }
        view.holder()?;
        let free_at = st.seen_at_ms + self.timing.token_ms + self.timing.margin_ms;
        (now < free_at).then(|| free_at - now)
    }

    /// While we wait for the holder the leader record names (`wait_ms`): reads the
    /// leader sector alone (one sector, not the region) and says how long we must
    /// still wait if it has not changed. `None`: it changed (released, or a new
    /// holder), or its token is over: read everybody and decide from that. Waiting
    /// longer than the region would tell is always safe; every decision is made from
    /// a read of the whole region.
    fn holder_wait_ms(&self, st: &TokenState) -> LunResult<Option<u64>> {
        let mut leader = vec![0u8; self.region.sector];
        self.inner.read_at(&mut leader, self.region.leader_offset)?;
        if leader != st.seen_leader {
            return Ok(None);
        }
        let free_at = st.seen_at_ms + self.timing.token_ms + self.timing.margin_ms;
        let now = self.clock.now_ms();
        Ok((now < free_at).then(|| free_at - now))
    }

    /// The sleep before the next read while waiting `wait` ms more for a holder:
    /// short while the leader record changed recently (a live holder that is asked
    /// gives the token back within about a millisecond), longer after that.
    fn poll(&self, st: &TokenState, wait: u64) -> Duration {
        let seen_for = self.clock.now_ms().saturating_sub(st.seen_at_ms);
        let poll = if seen_for < FAST_POLL_FOR_MS {
            FAST_POLL_MS
        } else {
            WAIT_POLL_MS
        };
        Duration::from_millis(wait.min(poll))
    }

    /// Takes the token: waits out another holder, runs ballots until one decides us.
    fn acquire(&self, st: &mut TokenState) -> LunResult<Held> {
        // Our first phase-1 issue for the instance we are working on, in this call.
        let mut tried: Option<Held> = None;
        let mut stale: Option<u64> = None;
        let mut yields = 0;
        // While we wait for a holder, the next read may be of the leader sector alone.
        let mut leader_only = false;
        for attempt in 0..ACQUIRE_ATTEMPTS_MAX {
            if std::mem::take(&mut leader_only) {
                if let Some(wait) = self.holder_wait_ms(st)? {
                    self.clock.sleep(self.poll(st, wait));
                    leader_only = true;
                    continue;
                }
            }
            let view = read_region(self.inner.as_ref(), &self.region)?;
            let now = self.clock.now_ms();
            if view.leader_raw != st.seen_leader {
                st.seen_leader = view.leader_raw.clone();
                st.seen_at_ms = now;
            }
            if view.holder().is_none() && view.leader.owner_slot != PAXOS_NO_OWNER {
                st.released_lver = st.released_lver.max(view.leader.lver);
            }
            let lver = view.instance_to_decide();
            // Ahead of the leader's next instance: the one before it may be held by a
            // host whose leader write is late or was overwritten (a late write of an
            // older leader). That holder's token began before anything we see of the
            // later instance, so it has ended one token + margin after we first saw it
            // (unless we saw it released: then it ended then).
            if lver > view.leader.lver + 1 && lver - 1 > st.released_lver {
                let since = match st.ahead {
                    Some((k, at)) if k == lver => at,
                    _ => {
                        st.ahead = Some((lver, now));
                        now
                    }
                };
                let free_at = since + self.timing.token_ms + self.timing.margin_ms;
                if now < free_at {
                    self.request(&view, lver)?;
                    self.clock
                        .sleep(Duration::from_millis((free_at - now).min(WAIT_POLL_MS)));
                    continue;
                }
            } else {
                st.ahead = None;
            }
            if let Some(wait) = self.wait_ms(st, &view, lver, now) {
                self.request(&view, lver)?;
                self.clock.sleep(self.poll(st, wait));
                leader_only = true;
                continue;
            }
            if yields < YIELDS_MAX && self.others_want(&view, lver) {
                yields += 1;
                self.clock.sleep(Duration::from_millis(FAST_POLL_MS));
                continue;
            }
            if tried.map(|t| t.lver) != Some(lver) {
                tried = None;
                // Our value accepted for this instance by an earlier call: when that
                // ballot began is unknown, so a decision for us cannot be trusted.
                if self.own_accepted(&view, lver) {
                    stale = Some(lver);
                }
            }
            match self.ballot(&view, &mut tried)? {
                Outcome::Decided { lver, owner } if owner == self.me => {
                    if stale != Some(lver) {
                        if let Some(held) = tried.filter(|t| t.lver == lver) {
                            return Ok(held);
                        }
                    }
                    self.release_stale(lver)?;
                }
                Outcome::Decided { .. } => {}
                Outcome::Aborted(_) => self.back_off(attempt),
            }
        }
        Err(LunError::AtsTimeout {
            device: self.inner.describe(),
            offset: self.region.leader_offset,
            waited_ms: 0,
        })
    }

    /// Says in our dblock that we want instance `lver` (while another host holds the
    /// token): `lver` with no ballot, or unchanged if it already is about `lver`. A
    /// holder that sees it steps back once it has released (`others_want`).
    fn request(&self, view: &RegionView, lver: u64) -> LunResult<()> {
        if let Some(Some(own)) = view.dblocks.get(self.me.slot as usize) {
            if own.lver >= lver {
                return Ok(());
            }
        }
        self.may_write_records()?;
        let mut own: PaxosDblock = bytemuck::Zeroable::zeroed();
        own.magic = PaxosDblock::MAGIC;
        own.slot = self.me.slot;
        own.owner_gen = self.me.generation;
        own.lver = lver;
        own.seal();
        self.inner.write_at(
            &encode_padded(&own, self.region.sector),
            self.region.dblock_offset(self.me.slot),
        )
    }

    /// True when another slot's dblock is about instance `lver`: a host waiting for
    /// it, or running a ballot for it.
    fn others_want(&self, view: &RegionView, lver: u64) -> bool {
        view.dblocks
            .iter()
            .flatten()
            .any(|d| d.slot != self.me.slot && d.lver == lver)
    }

    fn own_accepted(&self, view: &RegionView, lver: u64) -> bool {
        matches!(view.dblocks.get(self.me.slot as usize), Some(Some(d))
            if d.lver == lver && d.bal > 0
                && d.inp_slot == self.me.slot && d.inp_gen == self.me.generation)
    }

    /// One ballot from `view`; records in `tried` when our first phase-1 write for
    /// its instance was issued.
    fn ballot(&self, view: &RegionView, tried: &mut Option<Held>) -> LunResult<Outcome> {
        self.may_write_records()?;
        let mut proposer = Proposer::new(self.region, self.me, view);
        let outcome = proposer.run_guarded(self.inner.as_ref(), self.clock.as_ref(), &|| {
            self.may_write_records()
        });
        if let (None, Some(since_ms)) = (*tried, proposer.phase1_issued_ms) {
            *tried = Some(Held {
                lver: proposer.lver(),
                since_ms,
            });
        }
        let outcome = outcome?;
        self.count(|s| {
            s.ballots += 1;
            if matches!(outcome, Outcome::Aborted(_)) {
                s.aborted_ballots += 1;
            }
        });
        Ok(outcome)
    }

    /// An instance decided for us that we cannot date: never write under it, and give
    /// it back so that nobody waits for it.
    fn release_stale(&self, lver: u64) -> LunResult<()> {
        self.may_write_records()?;
        write_leader(
            self.inner.as_ref(),
            &self.region,
            lver,
            self.me,
            PAXOS_LEADER_RELEASED,
            self.me.slot,
        )
    }

    /// A random pause after a lost ballot, growing with the attempts (bounded).
    fn back_off(&self, attempt: u32) {
        let ceiling_ms = 1u64 << attempt.min(5);
        let ms = rand::thread_rng().gen_range(0..=ceiling_ms);
        self.clock.sleep(Duration::from_millis(ms));
    }

    /// Gives the token back (the owner only, while it is valid; our writes under it
    /// have all completed).
    fn release(&self, st: &mut TokenState) -> LunResult<()> {
        let Some(held) = st.held.take() else {
            return Ok(());
        };
        if !self.valid(&held) {
            return Ok(());
        }
        self.may_write_records()?;
        write_leader(
            self.inner.as_ref(),
            &self.region,
            held.lver,
            self.me,
            PAXOS_LEADER_RELEASED,
            self.me.slot,
        )?;
        st.released_lver = st.released_lver.max(held.lver);
        self.count(|s| s.releases += 1);
        Ok(())
    }

    /// A valid token, taking one if we hold none. A kept token that another host
    /// asks for serves this compare-and-write still, and goes back right after it
    /// (`after_caw`): giving it back first would make us step back and wait for it.
    fn ensure(&self, st: &mut TokenState) -> LunResult<Held> {
        match st.held {
            Some(held) if self.valid(&held) => {
                let since = self.clock.now_ms().saturating_sub(st.asked_checked_ms);
                if since >= ASKED_CHECK_MS && self.asked_for(st, &held)? {
                    st.asked = true;
                }
                Ok(held)
            }
            // None, or one that ran out: it is not given back (it may not be written
            // under any more, and takers wait it out).
            _ => {
                st.held = None;
                st.asked = false;
                let held = self.acquire(st)?;
                self.count(|s| s.acquisitions += 1);
                st.held = Some(held);
                // The ballot's last read of the region was just now.
                st.asked_checked_ms = self.clock.now_ms();
                if let Some(releaser) = self.releaser.get() {
                    releaser.unpark();
                }
                Ok(held)
            }
        }
    }

    /// Read, compare and write under one token instance. `Ok(None)`: the token ran
    /// out between the read and the write; nothing was written.
    fn caw_once(
        &self,
        st: &mut TokenState,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> LunResult<Option<Caw>> {
        let held = self.ensure(st)?;
        let read_ms = self.clock.now_ms();
        let mut actual = vec![0u8; expected.len()];
        self.inner.read_at(&mut actual, offset)?;
        if actual != expected {
            return Ok(Some(Caw::Miscompare(actual)));
        }
        // The host lease again: `GuardedLun` checked it before a token wait that may
        // have been long (and after a late renewal this re-reads our slot).
        self.lease_confirmed()?;
        let stale = self
            .delta_at(offset, expected)
            .is_some_and(|t| self.clock.now_ms().saturating_sub(read_ms) >= t.fresh_ms);
        // The token is checked right before the write, as the host lease is.
        if !self.valid(&held) || stale {
            st.held = None;
            return Ok(None);
        }
        let issued_ms = self.clock.now_ms();
        let wrote = self.inner.write_at(new, offset);
        let took_ms = self.clock.now_ms().saturating_sub(issued_ms);
        if took_ms > self.timing.io_timeout_ms {
            // It may have landed after our token ran out, over another host's write:
            // the token is lost (never released) and the host trusts nothing more.
            st.held = None;
            return Err(self.untrusted(offset, took_ms, self.timing.io_timeout_ms));
        }
        if let Err(e) = wrote {
            // The write may still land: keep the token unreleased, so that takers
            // wait out its lease.
            st.held = None;
            if self.delta_at(offset, expected).is_some() {
                // A heartbeat sector: issued is what counts; the read after `settle`
                // decides (`confirm`), never a read-back at once (a lost reply must not
                // win a slot that a later writer also wins).
                tracing::debug!(offset, "write of a heartbeat sector failed ({e}); settling");
                return Ok(Some(Caw::Written));
            }
            return Err(e);
        }
        Ok(Some(Caw::Written))
    }

    /// Keeps the token while other threads of this host queue for it and it is
    /// young and no other host asked for it; otherwise gives it back.
    fn after_caw(&self, st: &mut TokenState) -> LunResult<()> {
        let asked = std::mem::take(&mut st.asked);
        let Some(held) = st.held else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        st.used_at_ms = now;
        let young = now.saturating_sub(held.since_ms) < self.timing.token_ms / 2;
        let wanted = self.waiting.load(Ordering::SeqCst) > 0;
        if young && !asked && (wanted || self.linger.load(Ordering::SeqCst)) {
            return Ok(());
        }
        self.release(st)
    }

    /// Whether another host asks for the token we keep between compare-and-writes
    /// (one read of the region; only while lingering).
    fn asked_for(&self, st: &mut TokenState, held: &Held) -> LunResult<bool> {
        if !self.linger.load(Ordering::SeqCst) {
            return Ok(false);
        }
        st.asked_checked_ms = self.clock.now_ms();
        let view = read_region(self.inner.as_ref(), &self.region)?;
        Ok(self.others_want(&view, held.lver + 1))
    }

    /// Starts a thread that gives the token back once it has been idle for
    /// `LINGER_MS`, or sooner when another host asks for it (idle for
    /// `RELEASER_TICK_MS`, one read of the region per tick); from then on, a token is
    /// kept between compare-and-writes while no other host asks for it (each then
    /// costs a read and a write, and a region read once a millisecond, instead of a
    /// whole acquisition). The
    /// thread ends with the last `Arc`.
    pub fn start_releaser(self: &Arc<Self>) {
        self.linger.store(true, Ordering::SeqCst);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("paxos-release".into())
            .spawn(move || {
                // Before the first look at the token: a token taken from now on wakes
                // us (`ensure`); one taken before is seen by that look.
                if let Some(lun) = weak.upgrade() {
                    let _ = lun.releaser.set(std::thread::current());
                }
                loop {
                    let Some(lun) = weak.upgrade() else {
                        return;
                    };
                    if lun.retired.load(Ordering::SeqCst) {
                        return;
                    }
                    let holding = lun.release_if_idle();
                    drop(lun);
                    if holding {
                        std::thread::sleep(Duration::from_millis(RELEASER_TICK_MS));
                    } else {
                        std::thread::park_timeout(Duration::from_millis(RELEASER_IDLE_MS));
                    }
                }
            });
        if spawned.is_err() {
            // Without the thread a kept token would never be given back.
            self.linger.store(false, Ordering::SeqCst);
        }
    }

    /// The host leaves: the token goes back now (if we hold a valid one), none is
    /// kept from now on, and the releaser thread ends.
    fn retire_token(&self) -> LunResult<()> {
        self.retired.store(true, Ordering::SeqCst);
        self.linger.store(false, Ordering::SeqCst);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let released = self.release(&mut st);
        if let Some(thread) = self.releaser.get() {
            thread.unpark();
        }
        released
    }

    /// Gives the token back if it is idle for `LINGER_MS`, or for a tick and asked
    /// for. False when no token is held (any more).
    fn release_if_idle(&self) -> bool {
        let Ok(mut st) = self.state.try_lock() else {
            // A compare-and-write is under way: it may be holding a token.
            return true;
        };
        let Some(held) = st.held else {
            return false;
        };
        let idle = self.clock.now_ms().saturating_sub(st.used_at_ms);
        let give_back = idle >= LINGER_MS
            || idle >= RELEASER_TICK_MS
                && match self.asked_for(&mut st, &held) {
                    Ok(asked) => asked,
                    Err(e) => {
                        tracing::debug!("reading the Disk Paxos region: {e}");
                        false
                    }
                };
        if give_back {
            if let Err(e) = self.release(&mut st) {
                tracing::warn!("giving the Disk Paxos token back: {e}");
            }
        }
        st.held.is_some()
    }
}

impl PaxosLun {
    /// Our own heartbeat sector, without the token (every host renews every
    /// interval: through the token, 16 hosts kept it busy enough that renewals ran
    /// late). Only we write it while we own the slot; anyone else who may (a
    /// recoverer, a claimer) follows the delta rule and re-reads after settling, so a
    /// renewal that lands over a takeover within io_max makes the takeover fail, and
    /// a takeover that lands after a renewal is found by our next one, which fences
    /// us. A renewal that stood still (its clock too) between the read and the write
    /// can land over a confirmed takeover: the renewer reads the recoverer's mark
    /// after it (`heartbeat::MarkWatch`).
    fn own_heartbeat_caw(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
        timing: DeltaTiming,
    ) -> LunResult<Caw> {
        for _ in 0..CAW_ATTEMPTS_MAX {
            let read_ms = self.clock.now_ms();
            let mut actual = vec![0u8; expected.len()];
            self.inner.read_at(&mut actual, offset)?;
            if actual != expected {
                return Ok(Caw::Miscompare(actual));
            }
            if self.clock.now_ms().saturating_sub(read_ms) < timing.fresh_ms {
                let issued_ms = self.clock.now_ms();
                let wrote = self.inner.write_at(new, offset);
                let took_ms = self.clock.now_ms().saturating_sub(issued_ms);
                if took_ms > timing.io_timeout_ms {
                    // A takeover's settle covers a renewal that lands within io_max of
                    // its issue only.
                    return Err(self.untrusted(offset, took_ms, timing.io_timeout_ms));
                }
                wrote?;
                return Ok(Caw::Written);
            }
        }
        Err(LunError::AtsTimeout {
            device: self.inner.describe(),
            offset,
            waited_ms: timing.fresh_ms * u64::from(CAW_ATTEMPTS_MAX),
        })
    }

    /// A write that took longer than io_timeout: the host fences itself.
    fn untrusted(&self, offset: u64, took_ms: u64, io_timeout_ms: u64) -> LunError {
        let e = untrusted_write(&self.inner.describe(), offset, took_ms, io_timeout_ms);
        if let (Some(lease), LunError::Fenced(why)) = (&self.lease, &e) {
            lease.fence(why);
        }
        e
    }

    /// The delta rule's second read, without the token: our image must still be
    /// there `settle_ms` after the write.
    fn confirm(&self, offset: u64, new: &[u8], timing: DeltaTiming) -> LunResult<Caw> {
        self.clock.sleep(Duration::from_millis(timing.settle_ms));
        let mut after = vec![0u8; new.len()];
        self.inner.read_at(&mut after, offset)?;
        if after == new {
            return Ok(Caw::Written);
        }
        Ok(Caw::Miscompare(after))
    }
}

impl Lun for PaxosLun {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        check_caw(offset, expected, new, self.sector_size(), self.len_bytes())?;
        if let Some(delta) = self.delta.filter(|d| d.is_own(offset)) {
            return self.own_heartbeat_caw(offset, expected, new, delta.timing);
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        for _ in 0..CAW_ATTEMPTS_MAX {
            if let Some(result) = self.caw_once(&mut st, offset, expected, new)? {
                let after = self.after_caw(&mut st);
                drop(st);
                return match (result, self.delta_at(offset, expected)) {
                    // Issued to a heartbeat sector: only the read after `settle` decides.
                    (Caw::Written, Some(timing)) => {
                        if let Err(e) = after {
                            tracing::debug!("after a heartbeat sector's write: {e}");
                        }
                        self.confirm(offset, new, timing)
                    }
                    (result, _) => after.map(|()| result),
                };
            }
        }
        Err(LunError::AtsTimeout {
            device: self.inner.describe(),
            offset,
            waited_ms: self.timing.token_ms * u64::from(CAW_ATTEMPTS_MAX),
        })
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_uncached(buf, offset)
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.inner.write_uncached(buf, offset)
    }
    fn may_write(&self) -> LunResult<()> {
        self.inner.may_write()
    }
    fn retire(&self) -> LunResult<()> {
        self.retire_token()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn ats_kind(&self) -> AtsKind {
        AtsKind::DiskPaxos
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        self.inner.reservations()
    }
}

impl Drop for PaxosLun {
    /// A token still kept when the last user lets go (a host dropped without an
    /// unmount) goes back, while it and the host lease are valid, rather than make
    /// the others wait it out.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.held.is_some() {
            let mut st = std::mem::take(st);
            if let Err(e) = self.release(&mut st) {
                tracing::debug!("giving the Disk Paxos token back at the end: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
