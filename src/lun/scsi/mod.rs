//! SCSI block devices as a LUN, over any transport (SG_IO, libiscsi, a test fake).
//!
//! `ScsiLun<T: ScsiTransport>` speaks SBC-3/SPC-4 through a transport that only
//! carries a CDB and its data and returns the status and sense bytes. Everything
//! about what a status means lives here:
//!
//! - I/O is READ(16)/WRITE(16) of whole logical blocks; a read at any offset is
//!   widened to whole blocks, a write must be block aligned (`Misaligned`: no
//!   read-modify-write of a shared block, as in `FileLun`).
//! - `compare_and_write` is the device's COMPARE AND WRITE (0x89) of one ATS sector
//!   (the physical block, at least the logical one). A MISCOMPARE re-reads the sector
//!   and returns it; a re-read that equals `expected` (a "false miscompare": another
//!   host changed the sector and changed it back, or the device erred) is returned
//!   as is, since callers re-verify every miscompare anyway.
//! - `flush` is SYNCHRONIZE CACHE(16) of the whole device (10-byte form as fallback).
//! - Persistent reservations (`Reservations`) are PERSISTENT RESERVE IN/OUT.
//!
//! Error mapping, in `run`: UNIT ATTENTION, BUSY, TASK SET FULL, TASK ABORTED,
//! ABORTED COMMAND and NOT READY "becoming ready" are retried a bounded number of
//! times (the command did not run); RESERVATION CONFLICT on I/O is `Fenced` (another
//! host removed this host's key); a lost connection is reconnected once and the
//! command sent once more, then `Transport`; every other CHECK CONDITION is
//! `LunError::Scsi` with the decoded sense.
//!
//! A command whose reply is lost may or may not have run: a re-sent COMPARE AND WRITE
//! that had landed comes back as a MISCOMPARE whose actual sector is the new image,
//! which callers recognise as their own write (docs/format.md, "lost reply").

pub mod cdb;
pub mod sense;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use self::cdb::{Capacity, OpcodeSupport, PrIn, PrOut};
use self::sense::Sense;
use super::reservations::{
    Reservation, ReservationCapabilities, ReservationKey, ReservationType, Reservations,
};
use super::{check_caw, check_range, AtsKind, Caw, Lun, LunError, LunResult, OpenMode};
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

/// SCSI status codes (SAM-5).
pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_CONDITION_MET: u8 = 0x04;
pub const STATUS_BUSY: u8 = 0x08;
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;
pub const STATUS_ACA_ACTIVE: u8 = 0x30;
pub const STATUS_TASK_ABORTED: u8 = 0x40;

/// Retries of a command that did not run (unit attention, busy, ...).
const RETRIES_MAX: u32 = 8;
/// Backoff between retries of a busy device: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// The ATS sector bounds (as `FileLun`'s).
const SECTOR_MIN_BYTES: u32 = 512;
const SECTOR_MAX_BYTES: u32 = 64 * 1024;
/// Bytes asked for in PERSISTENT RESERVE IN (READ KEYS holds (n-8)/8 keys).
const PR_IN_BYTES: u16 = 8 + 8 * 2048;

/// Where a command's data goes.
pub enum DataDir<'a> {
    None,
    /// Data from the device into the buffer (its length is the transfer length).
    In(&'a mut [u8]),
    /// Data from the buffer to the device.
    Out(&'a [u8]),
}

impl DataDir<'_> {
    fn reborrow(&mut self) -> DataDir<'_> {
        match self {
            DataDir::None => DataDir::None,
            DataDir::In(buf) => DataDir::In(buf),
            DataDir::Out(buf) => DataDir::Out(buf),
        }
    }
}

/// What the device answered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiStatus {
    /// The SCSI status byte.
    pub status: u8,
    /// Sense bytes (with CHECK CONDITION), as the device sent them.
    pub sense: Vec<u8>,
    /// Bytes of a data-in transfer that did not arrive (0 where unknown).
    pub residual: usize,
}

/// A command the transport could not carry to the device and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The connection or path is gone. The command may or may not have run.
    ConnectionLost(String),
    /// No reply in time. The command may or may not have run.
    Timeout(String),
    /// The command was not sent (the transport refused it); it did not run.
    NotSent(String),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::ConnectionLost(m) => write!(f, "connection lost: {m}"),
            TransportError::Timeout(m) => write!(f, "no reply in time: {m}"),
            TransportError::NotSent(m) => write!(f, "command not sent: {m}"),
        }
    }
}

/// Carries SCSI commands to one logical unit. Implementations serialize what they
/// must; `ScsiLun` calls `execute` from many threads.
pub trait ScsiTransport: Send + Sync {
    /// Sends `cdb` with its data and waits for the status.
    fn execute(&self, cdb: &[u8], data: DataDir<'_>) -> Result<ScsiStatus, TransportError>;
    /// Re-establishes a lost connection (the same initiator port, where the transport
    /// can keep it, so that persistent reservation registrations survive).
    fn reconnect(&self) -> Result<(), TransportError>;
    /// The largest data transfer of one command.
    fn max_transfer_bytes(&self) -> usize;
    /// "iSCSI iscsi://...", "SCSI device /dev/sg0".
    fn describe(&self) -> String;
}

/// Whether the device does COMPARE AND WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CawSupport {
    Supported,
    /// The device said so (REPORT SUPPORTED OPERATION CODES, or it refused the
    /// opcode), or its COMPARE AND WRITE cannot cover one ATS sector.
    NotSupported,
    /// Not known yet (read-only open of a device that does not answer RSOC).
    Unknown,
}

impl CawSupport {
    fn to_u8(self) -> u8 {
        match self {
            CawSupport::Supported => 1,
            CawSupport::NotSupported => 2,
            CawSupport::Unknown => 0,
        }
    }
    fn from_u8(v: u8) -> CawSupport {
        match v {
            1 => CawSupport::Supported,
            2 => CawSupport::NotSupported,
            _ => CawSupport::Unknown,
        }
    }
}

/// The answer to one command after the generic handling of `run`.
#[derive(Debug)]
enum Reply {
    Good,
    /// RESERVATION CONFLICT.
    Conflict,
    /// CHECK CONDITION that the caller handles (ILLEGAL REQUEST, MISCOMPARE, and
    /// anything `run` does not retry).
    Check(Sense),
}

/// A SCSI logical unit as a LUN.
pub struct ScsiLun<T: ScsiTransport> {
    transport: T,
    read_only: bool,
    logical_bytes: u32,
    sector_bytes: u32,
    len_bytes: u64,
    /// `CawSupport` as u8: learnt at open, updated when the device refuses CAW.
    caw: AtomicU8,
    /// Why CAW is not supported, for the error message.
    caw_note: std::sync::Mutex<String>,
}

impl<T: ScsiTransport> ScsiLun<T> {
    /// Opens the logical unit behind `transport`: READ CAPACITY(16) for the size and
    /// block sizes, then whether COMPARE AND WRITE is there (REPORT SUPPORTED
    /// OPERATION CODES; where the device does not answer that, a compare-and-write
    /// of sector 0 that cannot change it, on read-write opens).
    pub fn open(transport: T, mode: OpenMode) -> LunResult<ScsiLun<T>> {
        let mut lun = ScsiLun {
            transport,
            read_only: mode == OpenMode::ReadOnly,
            logical_bytes: 512,
            sector_bytes: 512,
            len_bytes: 0,
            caw: AtomicU8::new(CawSupport::Unknown.to_u8()),
            caw_note: std::sync::Mutex::new(String::new()),
        };
        let capacity = lun.read_capacity()?;
        lun.set_geometry(capacity)?;
        let (support, note) = lun.probe_caw()?;
        lun.set_caw(support, note);
        Ok(lun)
    }

    /// The transport this LUN speaks through.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The logical block size: the unit of every read and write command.
    pub fn logical_block_bytes(&self) -> u32 {
        self.logical_bytes
    }

    /// Whether the device does COMPARE AND WRITE, as far as known.
    pub fn caw_support(&self) -> CawSupport {
        CawSupport::from_u8(self.caw.load(Ordering::Relaxed))
    }

    fn set_caw(&self, support: CawSupport, note: String) {
        self.caw.store(support.to_u8(), Ordering::Relaxed);
        *self.caw_note.lock().unwrap_or_else(|e| e.into_inner()) = note;
    }

    fn set_geometry(&mut self, capacity: Capacity) -> LunResult<()> {
        let logical = capacity.logical_block_bytes;
        let bad = |detail: String| self.scsi_error("read capacity", 0, detail);
        if !logical.is_power_of_two() || !(SECTOR_MIN_BYTES..=SECTOR_MAX_BYTES).contains(&logical) {
            return Err(bad(format!(
                "logical block size {logical} bytes is not a power of two in 512..=65536"
            )));
        }
        // The exponent is a 4-bit field: the shift stays far below 64 bits.
        let physical = u64::from(logical) << (capacity.physical_exponent & 0x0F);
        let sector = u32::try_from(physical)
            .ok()
            .filter(|s| *s <= SECTOR_MAX_BYTES)
            .ok_or_else(|| {
                bad(format!(
                    "physical block of {physical} bytes is larger than an ATS sector may be"
                ))
            })?;
        let blocks = capacity.last_lba.checked_add(1);
        let len = blocks.and_then(|b| b.checked_mul(u64::from(logical)));
        self.len_bytes = len.ok_or_else(|| bad("capacity overflows 64 bits".into()))?;
        self.logical_bytes = logical;
        self.sector_bytes = sector;
        Ok(())
    }

    fn read_capacity(&self) -> LunResult<Capacity> {
        let mut data = [0u8; cdb::READ_CAPACITY_16_BYTES];
        let reply = self.run(
            "read capacity",
            0,
            &cdb::read_capacity16(),
            DataDir::In(&mut data),
        )?;
        self.io_good(reply, "read capacity", 0)?;
        cdb::parse_read_capacity16(&data).ok_or_else(|| {
            self.scsi_error("read capacity", 0, "short READ CAPACITY(16) reply".into())
        })
    }

    /// Whether COMPARE AND WRITE works on one ATS sector, and why not.
    fn probe_caw(&self) -> LunResult<(CawSupport, String)> {
        let blocks = self.sector_bytes / self.logical_bytes;
        if let Some(max) = self.max_caw_blocks()? {
            if max != 0 && u32::from(max) < blocks {
                let note = format!(
                    "its COMPARE AND WRITE covers at most {max} logical block(s) of {} bytes, \
                     but an ATS sector (the physical block) is {blocks} blocks",
                    self.logical_bytes
                );
                return Ok((CawSupport::NotSupported, note));
            }
        }
        match self.rsoc(cdb::COMPARE_AND_WRITE)? {
            OpcodeSupport::Supported => return Ok((CawSupport::Supported, String::new())),
            OpcodeSupport::NotSupported => {
                let note = "REPORT SUPPORTED OPERATION CODES says COMPARE AND WRITE (0x89) is \
                            not supported"
                    .to_string();
                return Ok((CawSupport::NotSupported, note));
            }
            OpcodeSupport::Unknown => {}
        }
        if self.read_only {
            return Ok((CawSupport::Unknown, String::new()));
        }
        self.caw_probe()
    }

    /// A compare-and-write of sector 0 that changes nothing: `expected` differs from
    /// what was just read, so a device that compares miscompares; and `new` is what
    /// was just read, so even a device whose compare is broken (writes regardless,
    /// the fault `ats-selftest` looks for) writes back the bytes that are there.
    fn caw_probe(&self) -> LunResult<(CawSupport, String)> {
        let sector = self.sector_bytes as usize;
        let mut current = vec![0u8; sector];
        self.read_blocks(&mut current, 0)?;
        let mut probe = current.clone();
        probe[0] ^= 0xFF;
        let mut data = probe;
        data.extend_from_slice(&current);
        let blocks = (self.sector_bytes / self.logical_bytes) as u8;
        let reply = self.run(
            "compare-and-write probe",
            0,
            &cdb::compare_and_write(0, blocks),
            DataDir::Out(&data),
        )?;
        Ok(match reply {
            Reply::Good => (CawSupport::Supported, String::new()),
            Reply::Check(sense) if sense.is_miscompare() => (CawSupport::Supported, String::new()),
            Reply::Check(sense) if sense.key == sense::ILLEGAL_REQUEST => (
                CawSupport::NotSupported,
                format!("it refused COMPARE AND WRITE: {sense}"),
            ),
            // A conflict (not registered under a reservation) or another error says
            // nothing about the command; the first real CAW will tell.
            _ => (CawSupport::Unknown, String::new()),
        })
    }

    /// The Block Limits VPD page's MAXIMUM COMPARE AND WRITE LENGTH, where the device
    /// has the page.
    fn max_caw_blocks(&self) -> LunResult<Option<u8>> {
        let mut page = [0u8; 64];
        let cdb = cdb::inquiry_vpd(cdb::VPD_BLOCK_LIMITS, page.len() as u16);
        match self.run("inquiry", 0, &cdb, DataDir::In(&mut page))? {
            Reply::Good => Ok(cdb::parse_max_caw_blocks(&page)),
            _ => Ok(None),
        }
    }

    fn rsoc(&self, opcode: u8) -> LunResult<OpcodeSupport> {
        let mut data = [0u8; 64];
        let cdb = cdb::report_supported_opcode(opcode, data.len() as u32);
        match self.run("report supported opcodes", 0, &cdb, DataDir::In(&mut data))? {
            Reply::Good => Ok(cdb::parse_opcode_support(&data)),
            _ => Ok(OpcodeSupport::Unknown),
        }
    }

    /// Sends one command with the generic handling: bounded retries of commands that
    /// did not run, one reconnect after a lost connection. Returns what the caller
    /// must decide on.
    fn run(
        &self,
        op: &'static str,
        offset: u64,
        cdb: &[u8],
        mut data: DataDir<'_>,
    ) -> LunResult<Reply> {
        let mut backoff = BACKOFF_FIRST;
        let mut reconnected = false;
        let mut last = String::new();
        for _ in 0..=RETRIES_MAX {
            let status = match self.transport.execute(cdb, data.reborrow()) {
                Ok(status) => status,
                Err(TransportError::ConnectionLost(why)) if !reconnected => {
                    tracing::warn!(device = %self.describe(), op, offset, %why, "lost the connection; reconnecting once");
                    reconnected = true;
                    self.transport.reconnect().map_err(|e| {
                        self.transport_error(op, offset, format!("{why}; reconnecting failed: {e}"))
                    })?;
                    continue;
                }
                Err(e) => return Err(self.transport_error(op, offset, e.to_string())),
            };
            match status.status {
                STATUS_GOOD | STATUS_CONDITION_MET => return Ok(Reply::Good),
                STATUS_RESERVATION_CONFLICT => return Ok(Reply::Conflict),
                STATUS_BUSY | STATUS_TASK_SET_FULL | STATUS_TASK_ABORTED => {
                    last = format!("status {:#04x}", status.status);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                STATUS_CHECK_CONDITION => {
                    let Some(sense) = Sense::parse(&status.sense) else {
                        let detail = format!(
                            "CHECK CONDITION without readable sense data ({} bytes)",
                            status.sense.len()
                        );
                        return Err(self.scsi_error(op, offset, detail));
                    };
                    match self.check_class(&sense) {
                        Class::Good => return Ok(Reply::Good),
                        Class::Retry => {
                            last = sense.to_string();
                            let preempted = [
                                sense::ASC_REGISTRATIONS_PREEMPTED,
                                sense::ASC_RESERVATIONS_PREEMPTED,
                            ];
                            if sense.key == sense::UNIT_ATTENTION
                                && preempted.contains(&sense.asc_ascq())
                            {
                                tracing::warn!(device = %self.describe(), op, %sense, "another host preempted this host's reservation key");
                            } else if sense.key == sense::UNIT_ATTENTION {
                                tracing::info!(device = %self.describe(), op, %sense, "unit attention");
                            } else {
                                std::thread::sleep(backoff);
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                            }
                        }
                        Class::Caller => return Ok(Reply::Check(sense)),
                    }
                }
                other => {
                    let detail = format!("unexpected SCSI status {other:#04x}");
                    return Err(self.scsi_error(op, offset, detail));
                }
            }
        }
        let detail = format!("still failing after {RETRIES_MAX} retries: {last}");
        Err(self.scsi_error(op, offset, detail))
    }

    fn check_class(&self, sense: &Sense) -> Class {
        if sense.deferred {
            return Class::Caller;
        }
        match sense.key {
            // The command completed, the device recovered from an error on its own.
            sense::RECOVERED_ERROR => Class::Good,
            sense::UNIT_ATTENTION | sense::ABORTED_COMMAND => Class::Retry,
            sense::NOT_READY if sense.asc_ascq() == sense::ASC_BECOMING_READY => Class::Retry,
            _ => Class::Caller,
        }
    }

    /// Turns a reply to an I/O command into a result: a conflict is fencing.
    fn io_good(&self, reply: Reply, op: &'static str, offset: u64) -> LunResult<()> {
        match reply {
            Reply::Good => Ok(()),
            Reply::Conflict => Err(self.fenced(op, offset)),
            Reply::Check(sense) => Err(self.sense_error(op, offset, &sense)),
        }
    }

    fn fenced(&self, op: &'static str, offset: u64) -> LunError {
        LunError::Fenced(format!(
            "the storage refused the {op} at byte {offset} of {} with RESERVATION CONFLICT: this \
             host's reservation key was removed (another host fenced it) or never registered; \
             stop using the volume and mount again once the other hosts have recovered it",
            self.describe()
        ))
    }

    fn sense_error(&self, op: &'static str, offset: u64, sense: &Sense) -> LunError {
        if sense.deferred {
            // An earlier write the device acknowledged did not land: whatever this
            // host believes it wrote may be missing. It stops (`GuardedLun` fences on
            // `Fenced`) so that a survivor replays its journal instead.
            return LunError::Fenced(format!(
                "{}: {op} at byte {offset}: {sense}; this host stops writing, and its \
                 journal is replayed by the next host that recovers it",
                self.describe()
            ));
        }
        self.scsi_error(op, offset, sense.to_string())
    }

    fn scsi_error(&self, op: &'static str, offset: u64, detail: String) -> LunError {
        LunError::Scsi {
            device: self.describe(),
            op,
            offset,
            detail,
        }
    }

    fn transport_error(&self, op: &'static str, offset: u64, detail: String) -> LunError {
        LunError::Transport {
            device: self.describe(),
            op,
            offset,
            detail,
        }
    }

    fn check_writable(&self, op: &'static str, offset: u64) -> LunResult<()> {
        if !self.read_only {
            return Ok(());
        }
        Err(LunError::Io {
            device: self.describe(),
            op,
            offset,
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "opened read-only"),
        })
    }

    /// The largest transfer of one command, in whole logical blocks (at least one).
    fn chunk_bytes(&self) -> usize {
        let block = self.logical_bytes as usize;
        (self.transport.max_transfer_bytes() / block).max(1) * block
    }

    /// Reads whole logical blocks: `offset` and `buf.len()` are block aligned.
    fn read_blocks(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        let block = u64::from(self.logical_bytes);
        let chunk = self.chunk_bytes();
        for (i, piece) in buf.chunks_mut(chunk).enumerate() {
            let at = offset + (i * chunk) as u64;
            let blocks = (piece.len() as u64 / block) as u32;
            let cdb = cdb::read16(at / block, blocks);
            let reply = self.run("read", at, &cdb, DataDir::In(piece))?;
            self.io_good(reply, "read", at)?;
        }
        Ok(())
    }

    fn write_blocks(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        let block = u64::from(self.logical_bytes);
        let chunk = self.chunk_bytes();
        for (i, piece) in buf.chunks(chunk).enumerate() {
            let at = offset + (i * chunk) as u64;
            let blocks = (piece.len() as u64 / block) as u32;
            let cdb = cdb::write16(at / block, blocks);
            let reply = self.run("write", at, &cdb, DataDir::Out(piece))?;
            self.io_good(reply, "write", at)?;
        }
        Ok(())
    }

    fn no_caw(&self) -> LunError {
        let note = self
            .caw_note
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        LunError::NoCompareAndWrite {
            device: self.describe(),
            detail: note,
        }
    }

    fn pr_out(&self, action: PrOut, key: u64, sa_key: u64) -> LunResult<Reply> {
        let cdb = cdb::pr_out(action, ReservationType::WriteExclusiveRegistrantsOnly);
        let data = cdb::pr_out_parameters(key, sa_key);
        self.run("persistent reserve out", 0, &cdb, DataDir::Out(&data))
    }

    fn pr_in(&self, action: PrIn) -> LunResult<Vec<u8>> {
        let mut data = vec![0u8; usize::from(PR_IN_BYTES)];
        let cdb = cdb::pr_in(action, PR_IN_BYTES);
        let reply = self.run("persistent reserve in", 0, &cdb, DataDir::In(&mut data))?;
        self.pr_good(reply, "persistent reserve in")?;
        Ok(data)
    }

    /// A reply to a PR command: a conflict here means this initiator is not
    /// registered (or lost its registration to a preempt).
    fn pr_good(&self, reply: Reply, op: &'static str) -> LunResult<()> {
        match reply {
            Reply::Good => Ok(()),
            Reply::Conflict => Err(LunError::Fenced(format!(
                "{op} on {}: RESERVATION CONFLICT: this initiator is not registered with that \
                 key (another host may have preempted it)",
                self.describe()
            ))),
            Reply::Check(sense) if sense.is_invalid_opcode() => Err(self.scsi_error(
                op,
                0,
                format!("the device has no persistent reservations: {sense}"),
            )),
            Reply::Check(sense) => Err(self.sense_error(op, 0, &sense)),
        }
    }

    fn flush_with(&self, cdb: &[u8]) -> LunResult<Reply> {
        self.run("flush", 0, cdb, DataDir::None)
    }
}

enum Class {
    Good,
    Retry,
    Caller,
}

impl<T: ScsiTransport> Lun for ScsiLun<T> {
    fn sector_size(&self) -> u32 {
        self.sector_bytes
    }

    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        check_range("read", offset, buf.len(), self.len_bytes, None)?;
        let block = u64::from(self.logical_bytes);
        let start = offset - offset % block;
        let end = (offset + buf.len() as u64).div_ceil(block) * block;
        if start == offset && end == offset + buf.len() as u64 {
            return self.read_blocks(buf, offset);
        }
        // Widened to whole blocks through a bounce buffer, in pieces that bound memory.
        let chunk = self.chunk_bytes() as u64;
        let mut at = start;
        while at < end {
            let len = chunk.min(end - at);
            let mut bounce = vec![0u8; len as usize];
            self.read_blocks(&mut bounce, at)?;
            let from = offset.max(at);
            let to = (offset + buf.len() as u64).min(at + len);
            if from < to {
                let dst = (from - offset) as usize..(to - offset) as usize;
                buf[dst].copy_from_slice(&bounce[(from - at) as usize..(to - at) as usize]);
            }
            at += len;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.check_writable("write", offset)?;
        check_range(
            "write",
            offset,
            buf.len(),
            self.len_bytes,
            Some(self.logical_bytes),
        )?;
        self.write_blocks(buf, offset)
    }

    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.check_writable("compare-and-write", offset)?;
        check_caw(offset, expected, new, self.sector_bytes, self.len_bytes)?;
        if self.caw_support() == CawSupport::NotSupported {
            return Err(self.no_caw());
        }
        let block = u64::from(self.logical_bytes);
        let blocks = (self.sector_bytes / self.logical_bytes) as u8;
        let mut data = Vec::with_capacity(2 * expected.len());
        data.extend_from_slice(expected);
        data.extend_from_slice(new);
        let cdb = cdb::compare_and_write(offset / block, blocks);
        let reply = self.run("compare-and-write", offset, &cdb, DataDir::Out(&data))?;
        let sense = match reply {
            Reply::Good => {
                self.caw
                    .store(CawSupport::Supported.to_u8(), Ordering::Relaxed);
                return Ok(Caw::Written);
            }
            Reply::Conflict => return Err(self.fenced("compare-and-write", offset)),
            Reply::Check(sense) => sense,
        };
        if sense.is_miscompare() {
            let mut actual = vec![0u8; expected.len()];
            self.read_blocks(&mut actual, offset)?;
            if actual == expected {
                tracing::warn!(device = %self.describe(), offset, info = ?sense.information, "false miscompare: the sector reads back as expected");
            }
            return Ok(Caw::Miscompare(actual));
        }
        if sense.is_invalid_opcode() {
            self.set_caw(
                CawSupport::NotSupported,
                format!("it refused COMPARE AND WRITE: {sense}"),
            );
            return Err(self.no_caw());
        }
        if sense.key == sense::ILLEGAL_REQUEST
            && sense.asc_ascq() == sense::ASC_INVALID_FIELD_IN_CDB
        {
            let note = format!(
                "it refused a COMPARE AND WRITE of {blocks} logical block(s) (one ATS sector of {} \
                 bytes): {sense}",
                self.sector_bytes
            );
            self.set_caw(CawSupport::NotSupported, note);
            return Err(self.no_caw());
        }
        Err(self.sense_error("compare-and-write", offset, &sense))
    }

    fn flush(&self) -> LunResult<()> {
        // A read-only open wrote nothing to flush (and a flush is a write command that
        // a reservation may refuse): Ok, as for `FileLun`.
        if self.read_only {
            return Ok(());
        }
        match self.flush_with(&cdb::synchronize_cache16())? {
            Reply::Check(sense) if sense.is_invalid_opcode() => {
                let reply = self.flush_with(&cdb::synchronize_cache10())?;
                self.io_good(reply, "flush", 0)
            }
            reply => self.io_good(reply, "flush", 0),
        }
    }

    fn describe(&self) -> String {
        self.transport.describe()
    }

    /// The device's own COMPARE AND WRITE: a `ScsiLun` never emulates it. A device
    /// known to lack it (it said so, or refused the opcode) is a plain disk, where
    /// every compare-and-write fails with `NoCompareAndWrite`; one not known yet (a
    /// read-only open of a device that does not answer RSOC) counts as hardware.
    fn ats_kind(&self) -> AtsKind {
        match self.caw_support() {
            CawSupport::NotSupported => AtsKind::Plain,
            CawSupport::Supported | CawSupport::Unknown => AtsKind::Hardware,
        }
    }

    fn reservations(&self) -> Option<&dyn Reservations> {
        Some(self)
    }
}

impl<T: ScsiTransport> Reservations for ScsiLun<T> {
    fn register(&self, key: ReservationKey) -> LunResult<()> {
        if key.0 == 0 {
            return Err(self.scsi_error("register", 0, "reservation key 0 means no key".into()));
        }
        let reply = self.pr_out(PrOut::RegisterAndIgnoreExistingKey, 0, key.0)?;
        self.pr_good(reply, "register")
    }

    fn unregister(&self) -> LunResult<()> {
        let reply = self.pr_out(PrOut::RegisterAndIgnoreExistingKey, 0, 0)?;
        self.pr_good(reply, "unregister")
    }

    fn reserve(&self, key: ReservationKey) -> LunResult<()> {
        match self.pr_out(PrOut::Reserve, key.0, 0)? {
            Reply::Conflict => match self.read_reservation()? {
                Some(Reservation {
                    kind: ReservationType::WriteExclusiveRegistrantsOnly,
                    ..
                }) => Ok(()),
                Some(other) => Err(self.scsi_error(
                    "reserve",
                    0,
                    format!(
                        "the LUN is reserved by key {} as {:?}, not Write Exclusive – \
                         Registrants Only; release it on the storage or from that host",
                        other.key, other.kind
                    ),
                )),
                None => self.pr_good(Reply::Conflict, "reserve"),
            },
            reply => self.pr_good(reply, "reserve"),
        }
    }

    fn release(&self, key: ReservationKey) -> LunResult<()> {
        let reply = self.pr_out(PrOut::Release, key.0, 0)?;
        self.pr_good(reply, "release")
    }

    fn preempt(&self, own: ReservationKey, victim: ReservationKey, abort: bool) -> LunResult<()> {
        if victim.0 == 0 || own.0 == 0 {
            return Err(self.scsi_error("preempt", 0, "reservation key 0 means no key".into()));
        }
        let action = if abort {
            PrOut::PreemptAndAbort
        } else {
            PrOut::Preempt
        };
        let mut reply = self.pr_out(action, own.0, victim.0)?;
        if abort && matches!(&reply, Reply::Check(s) if s.key == sense::ILLEGAL_REQUEST) {
            // Some targets (tgt) lack PREEMPT AND ABORT: a plain PREEMPT still removes
            // the key; only commands the victim already had queued are not aborted.
            tracing::warn!(device = %self.describe(), "PREEMPT AND ABORT refused; sending PREEMPT");
            reply = self.pr_out(PrOut::Preempt, own.0, victim.0)?;
        }
        match reply {
            // A conflict: either we are not registered, or the victim is gone already.
            Reply::Conflict => {
                let keys = self.read_keys()?;
                if !keys.contains(&own) {
                    return self.pr_good(Reply::Conflict, "preempt");
                }
                if !keys.contains(&victim) {
                    return Ok(());
                }
                self.pr_good(Reply::Conflict, "preempt")
            }
            reply => self.pr_good(reply, "preempt"),
        }
    }

    fn read_keys(&self) -> LunResult<Vec<ReservationKey>> {
        let data = self.pr_in(PrIn::ReadKeys)?;
        let (keys, cut) = cdb::parse_read_keys(&data)
            .ok_or_else(|| self.scsi_error("read keys", 0, "short READ KEYS reply".into()))?;
        if cut {
            // A key missing from a cut list could be the one a caller looks for (a
            // dead host to fence): never hand out part of the list.
            return Err(self.scsi_error(
                "read keys",
                0,
                format!(
                    "more reservation keys than the {} a READ KEYS reply holds; remove \
                     stale registrations on the storage",
                    keys.len()
                ),
            ));
        }
        Ok(keys)
    }

    fn read_reservation(&self) -> LunResult<Option<Reservation>> {
        let data = self.pr_in(PrIn::ReadReservation)?;
        cdb::parse_read_reservation(&data).ok_or_else(|| {
            self.scsi_error("read reservation", 0, "short READ RESERVATION reply".into())
        })
    }

    fn capabilities(&self) -> LunResult<ReservationCapabilities> {
        let data = self.pr_in(PrIn::ReportCapabilities)?;
        cdb::parse_report_capabilities(&data).ok_or_else(|| {
            self.scsi_error(
                "report capabilities",
                0,
                "short REPORT CAPABILITIES reply".into(),
            )
        })
    }
}
