//! SCSI-3 persistent reservations: storage-side fencing.
//!
//! A host registers a key of its own on the LUN, one host reserves the LUN as
//! *Write Exclusive – Registrants Only* (type 5), and from then on the storage
//! refuses writes from every initiator that is not registered. A survivor that
//! recovers a dead host first *preempts* the dead host's key: whatever the dead host
//! still has in flight, or sends later, fails with RESERVATION CONFLICT, which the
//! LUN reports as `LunError::Fenced`. That closes the gap that the lease alone leaves
//! open (a host that stalled past its lease and wakes up with a write queued).
//!
//! Registrations belong to an I_T nexus (initiator port and target port), not to a
//! process or a key: every open of an iSCSI LUN is its own initiator port, so two
//! opens in one process are two registrants.
//!
//! Caller's duties:
//! - `register` replaces this initiator's key whatever it was (REGISTER AND IGNORE
//!   EXISTING KEY). A host that finds itself fenced must not register again on its
//!   own: that would undo the fencing another host did on purpose. Register at mount.
//! - Keys are nonzero; zero means "no key" on the wire.

use super::LunResult;
use std::fmt;

/// A persistent reservation key (8 bytes on the wire; never zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationKey(pub u64);

impl fmt::Display for ReservationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// The TYPE of a persistent reservation (SPC-4 table "persistent reservation type
/// codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationType {
    WriteExclusive,
    ExclusiveAccess,
    /// Type 5, the one atsfs uses: every registrant may write, nobody else.
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
    /// A code this list does not name.
    Other(u8),
}

impl ReservationType {
    pub fn code(self) -> u8 {
        match self {
            ReservationType::WriteExclusive => 1,
            ReservationType::ExclusiveAccess => 3,
            ReservationType::WriteExclusiveRegistrantsOnly => 5,
            ReservationType::ExclusiveAccessRegistrantsOnly => 6,
            ReservationType::WriteExclusiveAllRegistrants => 7,
            ReservationType::ExclusiveAccessAllRegistrants => 8,
            ReservationType::Other(code) => code,
        }
    }

    pub fn from_code(code: u8) -> ReservationType {
        match code {
            1 => ReservationType::WriteExclusive,
            3 => ReservationType::ExclusiveAccess,
            5 => ReservationType::WriteExclusiveRegistrantsOnly,
            6 => ReservationType::ExclusiveAccessRegistrantsOnly,
            7 => ReservationType::WriteExclusiveAllRegistrants,
            8 => ReservationType::ExclusiveAccessAllRegistrants,
            other => ReservationType::Other(other),
        }
    }
}

/// The reservation a LUN holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The key of the holder.
    pub key: ReservationKey,
    pub kind: ReservationType,
}

/// What a device says it supports (PERSISTENT RESERVE IN, REPORT CAPABILITIES).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReservationCapabilities {
    /// Compatible Reservation Handling (a RESERVE(6) after PR is handled per SPC).
    pub compatible_reservation_handling: bool,
    /// Persist Through Power Loss is supported (and `ptpl_active`: turned on).
    pub ptpl_capable: bool,
    pub ptpl_active: bool,
    /// The type mask is valid; when false the `types` below say nothing.
    pub type_mask_valid: bool,
    pub write_exclusive_registrants_only: bool,
    pub exclusive_access_registrants_only: bool,
    pub write_exclusive: bool,
    pub exclusive_access: bool,
    pub write_exclusive_all_registrants: bool,
    pub exclusive_access_all_registrants: bool,
}

/// Persistent reservations of a LUN (`Lun::reservations`). Every call is one or two
/// SCSI commands; none is cached.
pub trait Reservations: Send + Sync {
    /// Registers `key` for this initiator, replacing any key it had (REGISTER AND
    /// IGNORE EXISTING KEY).
    fn register(&self, key: ReservationKey) -> LunResult<()>;
    /// Removes this initiator's registration (and its reservation, if it held one).
    /// Ok when it had none.
    fn unregister(&self) -> LunResult<()>;
    /// Reserves the LUN as Write Exclusive – Registrants Only with this initiator's
    /// registered `key`. Ok when the LUN already holds a reservation of that type
    /// (taken by this or another registrant: the protection is the same).
    fn reserve(&self, key: ReservationKey) -> LunResult<()>;
    /// Releases the reservation this initiator holds with `key`; Ok when it holds none.
    fn release(&self, key: ReservationKey) -> LunResult<()>;
    /// Removes every registration of `victim` (and takes its reservation over, as
    /// type 5, if it held it), with this initiator's registered `own` key. With
    /// `abort`, the victim's commands still queued in the device are aborted too
    /// (PREEMPT AND ABORT; on a device that refuses that service action, as tgt does,
    /// a plain PREEMPT is sent instead and the victim's queued commands may still
    /// complete). Ok when `victim` is not registered (already preempted).
    /// Fails with `Fenced` when `own` is not registered.
    fn preempt(&self, own: ReservationKey, victim: ReservationKey, abort: bool) -> LunResult<()>;
    /// The keys registered now (one per registered I_T nexus, so a key may repeat).
    fn read_keys(&self) -> LunResult<Vec<ReservationKey>>;
    /// The reservation held now, if any.
    fn read_reservation(&self) -> LunResult<Option<Reservation>>;
    /// What the device supports.
    fn capabilities(&self) -> LunResult<ReservationCapabilities>;
}
