//! Cluster membership through the disk: heartbeat slots and the lease.
//!
//! A mounted host owns one heartbeat slot, claimed by ATS with a new generation and
//! renewed every heartbeat interval by ATS (previous image -> counter + 1).
//!
//! Invariants:
//! - A host writes to the LUN only while its lease is valid by its own clock
//!   (CLOCK_BOOTTIME): `now < issue of last successful renewal + lease - interval`.
//!   Every write of the fs goes through `GuardedLun`, which checks that before each
//!   write, so no path can write without a valid lease. When the last renewal is
//!   older than one interval, it also re-reads our slot first (`Lease::confirm`).
//! - Liveness of the other slots is judged on the same clock (`view`).
//! - A renewal that finds our slot changed by someone else (not a false miscompare,
//!   where our own new image is already there) means we were declared dead: the host
//!   fences itself at once and never writes again under this generation.

mod ats;
pub mod fence;
mod heartbeat;
pub mod lock;
pub mod mailbox;
mod node;
mod recovery;
pub mod view;

pub use ats::{check_ats_mode, describe_ats_kind, volume_ats_kind, AtsMismatch};
use heartbeat::SlotWatch;
pub use heartbeat::{claim_slot, go_live, read_slot, Membership, SlotClaim};
pub use node::Node;
pub use recovery::{recover_offline, settle_foreign_slots, OfflineOutcome};

use crate::lun::{Caw, IoCounters, Lun, LunError, LunResult};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A host's identity, kept in `/var/lib/atsfs/host-id` by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostUuid(pub [u8; 16]);

impl std::fmt::Display for HostUuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes(self.0).hyphenated())
    }
}

/// A monotonic clock in milliseconds. Tests and the simulator inject their own, so
/// leases can expire without waiting.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
    fn sleep(&self, duration: Duration);
}

/// The real clock: CLOCK_BOOTTIME, which keeps counting while the machine is
/// suspended. (CLOCK_MONOTONIC, behind `Instant`, stops during a suspend: a host that
/// wakes up would believe its lease still ran.)
pub struct SystemClock {
    origin_ms: u64,
}

impl SystemClock {
    pub const CLOCK_ID: libc::clockid_t = libc::CLOCK_BOOTTIME;

    fn read_ms() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill; CLOCK_BOOTTIME exists
        // on every Linux since 2.6.39, so the call cannot fail.
        unsafe { libc::clock_gettime(Self::CLOCK_ID, &mut ts) };
        (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin_ms: Self::read_ms(),
        }
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        Self::read_ms().saturating_sub(self.origin_ms)
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A clock that moves only when told to (or when slept on): for tests and the
/// simulator.
#[derive(Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    pub fn advance(&self, duration: Duration) {
        self.now_ms
            .fetch_add(duration.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
    fn sleep(&self, duration: Duration) {
        self.advance(duration);
        std::thread::yield_now();
    }
}

/// This host's right to write, by its own clock.
pub struct Lease {
    clock: Arc<dyn Clock>,
    /// Clock time at which the last successful renewal was *issued*.
    renewed_at_ms: AtomicU64,
    /// How long after a renewal the host may still write.
    valid_ms: u64,
    /// The heartbeat interval: a renewal older than this is late.
    interval_ms: u64,
    /// Our heartbeat slot, re-read before a write when the renewal is late.
    watch: OnceLock<SlotWatch>,
    fenced: AtomicBool,
    reason: std::sync::Mutex<String>,
}

impl Lease {
    /// A lease renewed now, valid for `lease - interval` after each renewal.
    pub fn new(clock: Arc<dyn Clock>, lease: Duration, interval: Duration) -> Lease {
        let now = clock.now_ms();
        Lease::issued_at(clock, now, lease, interval)
    }

    /// The lease a claimed slot gives: it runs from when the claim was *issued*, not
    /// from when its reply came back.
    pub fn for_claim(
        clock: Arc<dyn Clock>,
        claim: &SlotClaim,
        lease: Duration,
        interval: Duration,
    ) -> Lease {
        Lease::issued_at(clock, claim.issued_ms, lease, interval)
    }

    fn issued_at(
        clock: Arc<dyn Clock>,
        issued_ms: u64,
        lease: Duration,
        interval: Duration,
    ) -> Lease {
        Lease {
            clock,
            renewed_at_ms: AtomicU64::new(issued_ms),
            valid_ms: (lease.saturating_sub(interval)).as_millis() as u64,
            interval_ms: interval.as_millis() as u64,
            watch: OnceLock::new(),
            fenced: AtomicBool::new(false),
            reason: std::sync::Mutex::new(String::new()),
        }
    }

    /// Records a renewal that was issued at `issued_ms`. One that completes after the
    /// lease ran out does not bring it back (past the lease the host is fenced for
    /// good, whether or not anything asked the lease meanwhile): it fences instead.
    pub fn renewed(&self, issued_ms: u64) {
        if self.check().is_err() {
            return;
        }
        self.renewed_at_ms.fetch_max(issued_ms, Ordering::SeqCst);
    }

    /// Gives the lease our heartbeat slot to re-read when a renewal is late (the
    /// membership does, once).
    pub(crate) fn watch_slot(&self, watch: SlotWatch) {
        let _ = self.watch.set(watch);
    }

    /// Fences the host for good (this generation).
    pub fn fence(&self, reason: &str) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!("fenced: {reason}; every operation now fails with EIO until the volume is mounted again");
            if let Ok(mut r) = self.reason.lock() {
                *r = reason.to_string();
            }
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Clock time until which this host may write (and answer from its caches), by
    /// its own clock: the last renewal's issue time plus `lease - interval`.
    pub fn expires_at_ms(&self) -> u64 {
        self.renewed_at_ms.load(Ordering::SeqCst) + self.valid_ms
    }

    /// Ok while this host may write, by its own clock.
    pub fn check(&self) -> LunResult<()> {
        if self.is_fenced() {
            let reason = self.reason.lock().map(|r| r.clone()).unwrap_or_default();
            return Err(LunError::Fenced(reason));
        }
        let age = self.age_ms();
        if age >= self.valid_ms {
            self.fence(&format!("lease not renewed for {age} ms"));
            return Err(LunError::Fenced(format!("lease not renewed for {age} ms")));
        }
        Ok(())
    }

    /// `check`, and when the last renewal is older than one interval, re-reads our
    /// heartbeat slot: if another host changed it (it declared us dead, on a clock
    /// that did not stand still as ours may have, in a paused VM), the host fences
    /// itself. Every write, commit and lock release goes through this.
    pub fn confirm(&self) -> LunResult<()> {
        self.check()?;
        if self.age_ms() <= self.interval_ms {
            return Ok(());
        }
        let Some(watch) = self.watch.get() else {
            return Ok(());
        };
        if let Some(reason) = watch.taken()? {
            self.fence(&reason);
            return Err(LunError::Fenced(reason));
        }
        Ok(())
    }

    fn age_ms(&self) -> u64 {
        self.clock
            .now_ms()
            .saturating_sub(self.renewed_at_ms.load(Ordering::SeqCst))
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// The LUN as the fs sees it: every write, compare-and-write and flush first checks
/// the lease. It also counts the device I/O the fs issues (`IoCounters`).
pub struct GuardedLun {
    inner: Arc<dyn Lun>,
    lease: Arc<Lease>,
    /// The device I/O the fs issued through it since it was made.
    counters: Arc<IoCounters>,
}

impl GuardedLun {
    pub fn new(inner: Arc<dyn Lun>, lease: Arc<Lease>) -> GuardedLun {
        GuardedLun {
            inner,
            lease,
            counters: Arc::new(IoCounters::default()),
        }
    }
    pub fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }
    /// The counters of the I/O issued through this LUN.
    /// `result`, and when the storage itself refused the write (another host removed
    /// our reservation key: RESERVATION CONFLICT), this host is fenced for good from
    /// now on, whatever the lease says.
    fn storage_fenced<T>(&self, result: LunResult<T>) -> LunResult<T> {
        if let Err(LunError::Fenced(why)) = &result {
            self.lease.fence(why);
        }
        result
    }

    pub fn counters(&self) -> &Arc<IoCounters> {
        &self.counters
    }
}

impl Lun for GuardedLun {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.counters.read(buf.len());
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.lease.confirm()?;
        self.counters.write(buf.len());
        self.storage_fenced(self.inner.write_at(buf, offset))
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.lease.confirm()?;
        self.counters.caw();
        self.storage_fenced(self.inner.compare_and_write(offset, expected, new))
    }
    fn flush(&self) -> LunResult<()> {
        self.lease.confirm()?;
        self.counters.flush();
        self.storage_fenced(self.inner.flush())
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.counters.read(buf.len());
        self.inner.read_uncached(buf, offset)
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.lease.confirm()?;
        self.counters.write(buf.len());
        self.storage_fenced(self.inner.write_uncached(buf, offset))
    }
    fn may_write(&self) -> LunResult<()> {
        self.lease.confirm()?;
        self.inner.may_write()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn ats_kind(&self) -> crate::lun::AtsKind {
        self.inner.ats_kind()
    }
    fn reservations(&self) -> Option<&dyn crate::lun::Reservations> {
        self.inner.reservations()
    }
}

/// This kernel's boot id: emulated ATS is atomic only between processes of one kernel,
/// and the slots' boot ids are how hosts tell kernels apart. An unreadable one is an
/// error, never zeros: every host with zeros would look like one of this kernel.
pub fn boot_id() -> anyhow::Result<[u8; 16]> {
    read_boot_id(std::path::Path::new("/proc/sys/kernel/random/boot_id"))
}

fn read_boot_id(path: &std::path::Path) -> anyhow::Result<[u8; 16]> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading this kernel's boot id from {}", path.display()))?;
    let id = uuid::Uuid::parse_str(text.trim())
        .with_context(|| format!("the boot id in {} is not a UUID", path.display()))?;
    if id.is_nil() {
        anyhow::bail!("the boot id in {} is all zeros", path.display());
    }
    Ok(*id.as_bytes())
}

/// This machine's host name, for `atsfs status`.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
