//! Persistent reservations emulated in memory, for tests and the simulator: every
//! `PrSession` of one `PrDevice` is its own initiator (I_T nexus) of one LUN, with
//! registrations and a reservation that the device enforces on writes the way SPC-4
//! says a target does for the types atsfs uses (Write Exclusive – Registrants Only and
//! – All Registrants): an unregistered initiator's write, compare-and-write or flush
//! fails with RESERVATION CONFLICT (`LunError::Fenced`); reads always pass.
//!
//! Not a full SPC model: no scopes, no APTPL, no transport IDs; PREEMPT AND ABORT has
//! nothing to abort (every command here completes before the next starts), which is
//! the guarantee it gives on a real target once it returns.

use super::reservations::{
    Reservation, ReservationCapabilities, ReservationKey, ReservationType, Reservations,
};
use super::{Caw, Lun, LunError, LunResult};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct PrState {
    /// Registered key of each initiator.
    keys: HashMap<u64, ReservationKey>,
    /// The reservation: its type and, for the single-holder types, the holder.
    reservation: Option<(ReservationType, u64)>,
}

impl PrState {
    fn all_registrants(kind: ReservationType) -> bool {
        matches!(
            kind,
            ReservationType::WriteExclusiveAllRegistrants
                | ReservationType::ExclusiveAccessAllRegistrants
        )
    }

    fn may_write(&self, nexus: u64) -> bool {
        match self.reservation {
            None => true,
            Some((ReservationType::WriteExclusive | ReservationType::ExclusiveAccess, holder)) => {
                holder == nexus
            }
            Some(_) => self.keys.contains_key(&nexus),
        }
    }

    /// Drops `nexus`'s registration, and the reservation with it when SPC-4 says so.
    fn unregister(&mut self, nexus: u64) {
        if self.keys.remove(&nexus).is_none() {
            return;
        }
        match self.reservation {
            Some((kind, _)) if Self::all_registrants(kind) && self.keys.is_empty() => {
                self.reservation = None;
            }
            Some((kind, _)) if Self::all_registrants(kind) => {}
            Some((_, holder)) if holder == nexus => self.reservation = None,
            _ => {}
        }
    }
}

/// One LUN with emulated persistent reservations; `session` opens an initiator.
pub struct PrDevice {
    inner: Arc<dyn Lun>,
    state: Arc<Mutex<PrState>>,
    next_nexus: AtomicU64,
}

impl PrDevice {
    pub fn new(inner: Arc<dyn Lun>) -> PrDevice {
        PrDevice {
            inner,
            state: Arc::new(Mutex::new(PrState::default())),
            next_nexus: AtomicU64::new(1),
        }
    }

    /// What a target restart without persist-through-power-loss (or an admin's
    /// CLEAR) does: every registration and the reservation are gone.
    pub fn forget_reservations(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = PrState::default();
    }

    /// A new initiator of this LUN, registered nowhere.
    pub fn session(&self) -> PrSession {
        PrSession {
            inner: self.inner.clone(),
            state: self.state.clone(),
            nexus: self.next_nexus.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// One initiator of a `PrDevice`.
pub struct PrSession {
    inner: Arc<dyn Lun>,
    state: Arc<Mutex<PrState>>,
    nexus: u64,
}

impl PrSession {
    fn state(&self) -> std::sync::MutexGuard<'_, PrState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn conflict(&self) -> LunError {
        LunError::Fenced(format!(
            "{}: RESERVATION CONFLICT: this initiator is not registered",
            self.inner.describe()
        ))
    }

    /// Runs a write-like command under the state lock, so that a preempt cannot pass
    /// a write that was already checked (the command is atomic with the check).
    fn writing<T>(&self, op: impl FnOnce() -> LunResult<T>) -> LunResult<T> {
        let state = self.state();
        if !state.may_write(self.nexus) {
            return Err(self.conflict());
        }
        let result = op();
        drop(state);
        result
    }
}

impl Lun for PrSession {
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
        self.writing(|| self.inner.write_at(buf, offset))
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.writing(|| self.inner.compare_and_write(offset, expected, new))
    }
    fn flush(&self) -> LunResult<()> {
        self.writing(|| self.inner.flush())
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.writing(|| self.inner.write_uncached(buf, offset))
    }
    fn describe(&self) -> String {
        format!("{} (initiator {})", self.inner.describe(), self.nexus)
    }
    fn ats_kind(&self) -> super::AtsKind {
        self.inner.ats_kind()
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        Some(self)
    }
}

impl Reservations for PrSession {
    fn register(&self, key: ReservationKey) -> LunResult<()> {
        let mut state = self.state();
        if key.0 == 0 {
            state.unregister(self.nexus);
        } else {
            state.keys.insert(self.nexus, key);
        }
        Ok(())
    }

    fn unregister(&self) -> LunResult<()> {
        self.state().unregister(self.nexus);
        Ok(())
    }

    fn reserve(&self, key: ReservationKey) -> LunResult<()> {
        let kind = ReservationType::WriteExclusiveRegistrantsOnly;
        let mut state = self.state();
        if state.keys.get(&self.nexus) != Some(&key) {
            return Err(self.conflict());
        }
        match state.reservation {
            None => {
                state.reservation = Some((kind, self.nexus));
                Ok(())
            }
            // Registrants Only: any registrant's reserve of the same type is a no-op
            // that the caller may count as done (`Reservations::reserve`).
            Some((held, _)) if held == kind => Ok(()),
            Some(_) => Err(self.conflict()),
        }
    }

    fn release(&self, key: ReservationKey) -> LunResult<()> {
        let mut state = self.state();
        if state.keys.get(&self.nexus) != Some(&key) {
            return Err(self.conflict());
        }
        if let Some((kind, holder)) = state.reservation {
            if holder == self.nexus || PrState::all_registrants(kind) {
                state.reservation = None;
            }
        }
        Ok(())
    }

    fn preempt(&self, own: ReservationKey, victim: ReservationKey, _abort: bool) -> LunResult<()> {
        let mut state = self.state();
        if state.keys.get(&self.nexus) != Some(&own) {
            return Err(self.conflict());
        }
        let victims: Vec<u64> = state
            .keys
            .iter()
            .filter(|&(&nexus, &key)| key == victim && nexus != self.nexus)
            .map(|(&nexus, _)| nexus)
            .collect();
        for nexus in victims {
            let held = state.reservation;
            state.keys.remove(&nexus);
            if let Some((kind, holder)) = held {
                if holder == nexus && !PrState::all_registrants(kind) {
                    state.reservation = Some((kind, self.nexus));
                }
            }
        }
        Ok(())
    }

    fn read_keys(&self) -> LunResult<Vec<ReservationKey>> {
        Ok(self.state().keys.values().copied().collect())
    }

    fn read_reservation(&self) -> LunResult<Option<Reservation>> {
        let state = self.state();
        Ok(state.reservation.map(|(kind, holder)| Reservation {
            key: if PrState::all_registrants(kind) {
                ReservationKey(0)
            } else {
                state
                    .keys
                    .get(&holder)
                    .copied()
                    .unwrap_or(ReservationKey(0))
            },
            kind,
        }))
    }

    fn capabilities(&self) -> LunResult<ReservationCapabilities> {
        Ok(ReservationCapabilities {
            type_mask_valid: true,
            write_exclusive_registrants_only: true,
            write_exclusive_all_registrants: true,
            ..ReservationCapabilities::default()
        })
    }
}
