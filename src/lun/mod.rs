//! The shared device: one trait, several backends.
//!
//! Callers' duties:
//! - Offsets and lengths of metadata I/O are multiples of `sector_size()`; data I/O
//!   is block aligned. Backends may refuse misaligned I/O with `LunError::Misaligned`.
//! - `compare_and_write` covers exactly one ATS sector (`sector_size()` bytes).
//! - Nothing written is durable until `flush` returns.
//!
//! Backends: `FileLun` (image files and block devices, ATS emulated with OFD locks),
//! `ScsiLun` (SCSI over libiscsi for `iscsi://` URLs or SG_IO for SCSI device nodes:
//! the device's COMPARE AND WRITE, persistent reservations; docs/scsi.md),
//! `MemLun` (in memory, for tests and the simulator), and `FaultLun` (wraps any LUN
//! and injects faults, records writes for crash-point tests). `WriteBehind` wraps the
//! fs's LUN and queues large data writes to a writer thread. `selftest` proves that a
//! device's compare-and-write is atomic (`atsfs ats-selftest`).

pub mod selftest;

mod behind;
mod fault;
mod file;
mod iscsi;
mod mem;
mod open;
mod pr_emu;
mod readonly;
pub mod reservations;
pub mod scsi;
mod sg;

pub use behind::WriteBehind;
pub use fault::{
    crash_image, durable_image, flushes_at_cut, FaultConfig, FaultLun, IoStats, WriteRecord,
};
pub use file::{FileLun, OpenMode};
pub use iscsi::IscsiTransport;
pub use mem::MemLun;
pub use open::{device_kind, display_name, open_device, DeviceKind, PlainDisk, ATS_EMULATION_ENV};
pub use pr_emu::{PrDevice, PrSession};
pub use readonly::ReadOnlyLun;
pub use reservations::{
    Reservation, ReservationCapabilities, ReservationKey, ReservationType, Reservations,
};
pub use scsi::{CawSupport, ScsiLun};
pub use sg::SgTransport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

/// Counters of the I/O a LUN wrapper passes on (relaxed atomics: each is exact, a
/// snapshot of several is not taken at one instant). `FaultLun` and the fs's
/// `GuardedLun` count with it.
#[derive(Debug, Default)]
pub struct IoCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    caws: AtomicU64,
    flushes: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

impl IoCounters {
    pub fn read(&self, len: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
    pub fn write(&self, len: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.written_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
    pub fn caw(&self) {
        self.caws.fetch_add(1, Ordering::Relaxed);
    }
    pub fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> IoStats {
        IoStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            caws: self.caws.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
        }
    }
    pub fn reset(&self) {
        for counter in [
            &self.reads,
            &self.writes,
            &self.caws,
            &self.flushes,
            &self.read_bytes,
            &self.written_bytes,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// How a LUN does its test-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtsKind {
    /// Read-compare-write under a lock of this kernel (OFD locks on an image file or
    /// block device; a mutex in memory): atomic only among processes of one kernel.
    Emulated,
    /// The storage's own SCSI COMPARE AND WRITE: atomic among all initiators.
    Hardware,
    /// Read-compare-write while holding the volume's Disk Paxos token, built from
    /// plain sector reads and writes (`cluster::paxos::PaxosLun`): atomic among all
    /// hosts that take the token, on any shared disk.
    DiskPaxos,
    /// No compare-and-write at all: a plain shared disk (`PlainDisk`, a SCSI disk
    /// that refuses COMPARE AND WRITE). Only a Disk Paxos volume can be used
    /// through it (every host then takes the token over plain reads and writes).
    Plain,
}

impl AtsKind {
    /// The kind's name in messages and JSON: `hardware`, `emulated`, `disk-paxos`
    /// or `none`.
    pub fn name(self) -> &'static str {
        match self {
            AtsKind::Hardware => "hardware",
            AtsKind::Emulated => "emulated",
            AtsKind::DiskPaxos => "disk-paxos",
            AtsKind::Plain => "none",
        }
    }
}

/// The result of an atomic compare-and-write of one sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caw {
    /// The sector held `expected` and now holds `new`.
    Written,
    /// The sector did not hold `expected`; it holds `actual` and was not changed.
    Miscompare(Vec<u8>),
}

#[derive(Debug, Error)]
pub enum LunError {
    #[error("I/O error on {device} ({op} at byte {offset}): {source}")]
    Io {
        device: String,
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} of {len} bytes at byte {offset} is not aligned to the {sector}-byte sector")]
    Misaligned {
        op: &'static str,
        offset: u64,
        len: usize,
        sector: u32,
    },
    #[error("{op} of {len} bytes at byte {offset} runs past the end of the device ({size} bytes)")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("the device is fenced: {0}")]
    Fenced(String),
    /// An emulated compare-and-write found its sector locked by another process for
    /// longer than it waits (a host stopped inside its own test-and-set). Nothing was
    /// written: not a miscompare, not a success. Try again later.
    #[error(
        "compare-and-write at byte {offset} of {device}: the sector stayed locked by another \
         process for {waited_ms} ms (a host stopped inside a test-and-set?); try again later"
    )]
    AtsTimeout {
        device: String,
        offset: u64,
        waited_ms: u64,
    },
    /// A SCSI command failed: the device's sense data, decoded, or an answer that
    /// makes no sense.
    #[error("SCSI error on {device} ({op} at byte {offset}): {detail}")]
    Scsi {
        device: String,
        op: &'static str,
        offset: u64,
        detail: String,
    },
    /// The transport to a SCSI device failed (connection lost, no reply in time) and
    /// one reconnect did not help. A write or compare-and-write may or may not have
    /// landed.
    #[error(
        "lost the path to {device} ({op} at byte {offset}): {detail}; a write may or may not \
         have landed; check the network and the target"
    )]
    Transport {
        device: String,
        op: &'static str,
        offset: u64,
        detail: String,
    },
    /// The device has no usable SCSI COMPARE AND WRITE.
    #[error(
        "{device} has no usable SCSI COMPARE AND WRITE ({detail}); atsfs needs the storage's \
         own atomic test-and-set to share a LUN between machines: use a target or array that \
         supports COMPARE AND WRITE (VAAI ATS), or a Disk Paxos volume, which needs none \
         (mkfs.atsfs picks it on such a device: --ats auto or --ats paxos)"
    )]
    NoCompareAndWrite { device: String, detail: String },
    /// The device cannot be opened as asked (a missing library, a name that is not a
    /// SCSI device, a bad URL).
    #[error("cannot open {device}: {detail}")]
    Open { device: String, detail: String },
    /// A write through the read-only view of a read-only host (`ReadOnlyLun`).
    #[error("{device} is mounted read-only here: no {op} (at byte {offset})")]
    ReadOnly {
        device: String,
        op: &'static str,
        offset: u64,
    },
}

impl LunError {
    /// The errno this error maps to for a caller that must give one.
    pub fn errno(&self) -> i32 {
        match self {
            LunError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            LunError::Misaligned { .. } | LunError::OutOfRange { .. } => libc::EINVAL,
            LunError::Fenced(_) => libc::EIO,
            LunError::AtsTimeout { .. } => libc::EAGAIN,
            LunError::Scsi { .. } | LunError::Transport { .. } => libc::EIO,
            LunError::NoCompareAndWrite { .. } => libc::EOPNOTSUPP,
            LunError::Open { .. } => libc::ENODEV,
            LunError::ReadOnly { .. } => libc::EROFS,
        }
    }
}

pub type LunResult<T> = Result<T, LunError>;

/// A shared block device.
pub trait Lun: Send + Sync {
    /// The ATS sector size: the unit of `compare_and_write` and of metadata alignment.
    fn sector_size(&self) -> u32;
    /// Size of the device in bytes.
    fn len_bytes(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()>;
    /// Atomically: if the sector at `offset` holds `expected`, write `new`.
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw>;
    /// Makes every completed write durable.
    fn flush(&self) -> LunResult<()>;
    /// `read_at` past the host's page cache, where the LUN has one (an image file),
    /// for reads whose caller asked for direct I/O. The same bytes as `read_at`.
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.read_at(buf, offset)
    }
    /// `write_at` past the host's page cache, where the LUN has one, for large data
    /// writes (block aligned). Not durable until `flush`, like any write; a layer may
    /// queue it (`WriteBehind`), and then keeps every later I/O of the range, and
    /// `flush`, behind it.
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.write_at(buf, offset)
    }
    /// Whether a write issued now would be allowed (`GuardedLun`: the lease), so that
    /// a layer that queues writes can refuse one at once.
    fn may_write(&self) -> LunResult<()> {
        Ok(())
    }
    /// The host leaves the volume (unmount, or a mount that failed after its claim):
    /// give back what the LUN holds for it between calls (the Disk Paxos token) and
    /// stop its background work. Called while the host may still write.
    fn retire(&self) -> LunResult<()> {
        Ok(())
    }
    /// A short description for messages ("image file /tmp/a.img").
    fn describe(&self) -> String;
    /// How `compare_and_write` is made atomic.
    fn ats_kind(&self) -> AtsKind {
        AtsKind::Emulated
    }
    /// The LUN's SCSI-3 persistent reservations, where it has them (SCSI backends).
    fn reservations(&self) -> Option<&dyn Reservations> {
        None
    }
}

impl<T: Lun + ?Sized> Lun for Arc<T> {
    fn sector_size(&self) -> u32 {
        (**self).sector_size()
    }
    fn len_bytes(&self) -> u64 {
        (**self).len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        (**self).write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        (**self).compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        (**self).flush()
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        (**self).read_uncached(buf, offset)
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        (**self).write_uncached(buf, offset)
    }
    fn may_write(&self) -> LunResult<()> {
        (**self).may_write()
    }
    fn retire(&self) -> LunResult<()> {
        (**self).retire()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn ats_kind(&self) -> AtsKind {
        (**self).ats_kind()
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        (**self).reservations()
    }
}

/// Checks a request against the device bounds and, when `sector` is given, alignment.
pub fn check_range(
    op: &'static str,
    offset: u64,
    len: usize,
    size: u64,
    sector: Option<u32>,
) -> LunResult<()> {
    if let Some(sector) = sector {
        let s = u64::from(sector);
        if offset % s != 0 || (len as u64) % s != 0 {
            return Err(LunError::Misaligned {
                op,
                offset,
                len,
                sector,
            });
        }
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(LunError::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

/// Checks the arguments of a compare-and-write: one whole sector.
pub fn check_caw(
    offset: u64,
    expected: &[u8],
    new: &[u8],
    sector: u32,
    size: u64,
) -> LunResult<()> {
    let s = sector as usize;
    if expected.len() != s || new.len() != s {
        return Err(LunError::Misaligned {
            op: "compare-and-write",
            offset,
            len: expected.len().max(new.len()),
            sector,
        });
    }
    check_range("compare-and-write", offset, s, size, Some(sector))
}

/// Compiles `source` (C) with the system's `cc`, runs it and returns what it printed;
/// None where there is no compiler. For the tests that hold the FFI mirrors of C
/// structs (libiscsi's, SG_IO's) against the installed headers.
#[cfg(test)]
pub(crate) fn c_program_output(source: &str) -> Option<String> {
    let dir = tempfile::tempdir().ok()?;
    let src = dir.path().join("layout.c");
    std::fs::write(&src, source).ok()?;
    let exe = dir.path().join("layout");
    let built = std::process::Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .ok()?;
    if !built.success() {
        return None;
    }
    let out = std::process::Command::new(&exe).output().ok()?;
    String::from_utf8(out.stdout).ok()
}
