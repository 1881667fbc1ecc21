//! Image files and block devices as a LUN.
//!
//! A block device is opened with `O_DIRECT`: a host must never read another host's
//! update from its own page cache. Direct I/O needs offsets, lengths and memory aligned
//! to the device's logical block size, so:
//! - a caller buffer at an unaligned address goes through an aligned bounce buffer;
//! - an unaligned read is widened to whole blocks;
//! - an unaligned write is refused with `LunError::Misaligned`, because a
//!   read-modify-write of a shared block could undo another host's update.
//!
//! Image files use the page cache, which is coherent between the processes of one
//! kernel; any offset and length works there. Large file data goes through a second,
//! O_DIRECT descriptor (`read_uncached`, `write_uncached`): the kernel keeps the two
//! coherent (a direct write writes back and drops cached pages of its range first).
//! Direct writes alone, one at a time, were slower than the page cache for 1 MiB
//! streams; the fs queues them behind (`WriteBehind`, docs/perf.md).
//!
//! Compare-and-write is emulated: take an OFD write lock on exactly the sector's byte
//! range, read, compare, write if equal, unlock. OFD locks exclude other open file
//! descriptions (other opens in this process and other processes), but not threads
//! that share one `FileLun`, so the sector is first marked busy in an in-process set.
//!
//! **The wait for a sector is bounded.** A process stopped (SIGSTOP, a frozen cgroup)
//! inside a compare-and-write keeps the sector locked for as long as it is stopped.
//! Both locks are only ever *tried*, with backoff, for at most `ATS_WAIT_MAX` (then
//! `ATS_WAIT_SUSPECT` for a sector whose last wait timed out, until one succeeds);
//! past that the call fails with `LunError::AtsTimeout`, which is neither a success
//! nor a miscompare: nothing was written and the caller tries again later. Nothing
//! is held while waiting, so a stuck sector never holds up a compare-and-write of
//! another sector.
//!
//! **Emulated ATS is atomic only within one kernel.** Hosts that share a LUN over
//! iSCSI/FC or a shared virtual disk need real COMPARE AND WRITE (or Disk Paxos). Also,
//! a plain `write_at` does not take these locks: a sector that is updated by
//! compare-and-write must not be written with `write_at` while others may CAW it. Like
//! any write, a compare-and-write is durable only after `flush`.
//!
//! **The ATS sector of a block device is its physical block**, or its logical block
//! where that is larger: a 512e disk (512-byte logical, 4096-byte physical blocks)
//! writes 4 KiB at a time, so only a whole physical block is written atomically.
//!
//! The device size is read once, at open.

use super::{check_caw, check_range, Caw, Lun, LunError, LunResult};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::collections::HashSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The ATS sector of an image file unless the caller asks for another.
const SECTOR_DEFAULT_BYTES: u32 = 512;
const SECTOR_MIN_BYTES: u32 = 512;
const SECTOR_MAX_BYTES: u32 = 64 * 1024;
/// Bounce buffers are at least page aligned, which satisfies any logical block size
/// up to a page; larger blocks raise the alignment to the block size.
const BOUNCE_ALIGN_BYTES: usize = 4096;
/// Large unaligned transfers are bounced in chunks of this size to bound memory.
const BOUNCE_CHUNK_BYTES: usize = 1024 * 1024;
/// How long a compare-and-write waits for its sector's locks before it fails with
/// `LunError::AtsTimeout`. A healthy holder keeps a sector for one read and one
/// write of it.
const ATS_WAIT_MAX: Duration = Duration::from_secs(1);
/// The wait on a sector whose last wait timed out, until a wait on it succeeds: a
/// stopped host holds it for as long as it is stopped, and every caller that tries
/// again meanwhile learns that quickly.
const ATS_WAIT_SUSPECT: Duration = Duration::from_millis(20);
/// Backoff between attempts to lock a sector: doubling from the first to the last.
const ATS_BACKOFF_FIRST: Duration = Duration::from_micros(50);
const ATS_BACKOFF_MAX: Duration = Duration::from_millis(5);
/// Sectors remembered as suspect; past that the memory is cleared (only costs waits).
const SUSPECT_SECTORS_MAX: usize = 4096;
/// Bound on retries of an unlock interrupted by a signal.
const UNLOCK_RETRIES_MAX: u32 = 1000;

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): the device size in bytes.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104) with an int out-argument: the logical block size.
    nix::ioctl_read_bad!(blksszget, libc::BLKSSZGET, libc::c_int);
    // BLKPBSZGET = _IO(0x12, 123) with an unsigned int out-argument: the physical
    // block size, the unit the device writes atomically.
    nix::ioctl_read_bad!(blkpbszget, libc::BLKPBSZGET, libc::c_uint);
}

/// How to open the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadWrite,
    /// Reads only: writes and compare-and-writes fail (fsck, inspection tools).
    ReadOnly,
}

/// An image file or a block device.
pub struct FileLun {
    file: File,
    path: PathBuf,
    block_device: bool,
    read_only: bool,
    /// The ATS sector size.
    sector: u32,
    /// Alignment that direct I/O needs for offsets, lengths and memory; 1 when the
    /// page cache is used.
    io_align: u32,
    len_bytes: u64,
    /// Sectors (by offset) a compare-and-write of this open is in, and the ones
    /// whose last wait timed out.
    sectors: Mutex<SectorSets>,
    /// An image file opened again with O_DIRECT, for `read_uncached` and
    /// `write_uncached` (None where the file is direct already, or its filesystem
    /// refuses O_DIRECT, as tmpfs does).
    uncached: Option<File>,
    /// Test fault hook: runs inside every compare-and-write while the sector is
    /// locked, with the sector's offset (a test stops a host there).
    #[cfg(test)]
    caw_hook: Mutex<Option<CawHook>>,
}

#[derive(Default)]
struct SectorSets {
    busy: HashSet<u64>,
    suspect: HashSet<u64>,
}

/// A function run inside a compare-and-write (`FileLun::set_caw_hook`).
#[cfg(test)]
pub(crate) type CawHook = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// Alignment of `read_uncached` on an image file: a block, which covers the logical
/// block size of any device an image file may sit on.
const UNCACHED_ALIGN: u32 = 4096;

/// Open-time choices; `direct_align` forces O_DIRECT on an image file (tests).
struct OpenOptionsLun {
    sector: Option<u32>,
    direct_align: Option<u32>,
}

impl FileLun {
    /// Opens an image file (sector 512) or a block device (its physical block size,
    /// at least its logical one: `ats_sector_for`).
    pub fn open(path: impl AsRef<Path>, mode: OpenMode) -> LunResult<FileLun> {
        let options = OpenOptionsLun {
            sector: None,
            direct_align: None,
        };
        Self::open_with(path.as_ref(), mode, options)
    }

    /// Opens with a chosen ATS sector size (a power of two, 512..=65536). On a block
    /// device it must be a multiple of the logical block size, so that every
    /// compare-and-write is a whole number of device blocks.
    pub fn open_with_sector(
        path: impl AsRef<Path>,
        mode: OpenMode,
        sector: u32,
    ) -> LunResult<FileLun> {
        let options = OpenOptionsLun {
            sector: Some(sector),
            direct_align: None,
        };
        Self::open_with(path.as_ref(), mode, options)
    }

    /// True when the LUN is a block device (opened with O_DIRECT).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The path this LUN was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_with(path: &Path, mode: OpenMode, options: OpenOptionsLun) -> LunResult<FileLun> {
        let device = path.display().to_string();
        let err = |op: &'static str, source: io::Error| LunError::Io {
            device: device.clone(),
            op,
            offset: 0,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)
            .map_err(|e| err("open", e))?;
        let meta = file.metadata().map_err(|e| err("stat", e))?;
        let file_type = meta.file_type();
        let block_device = file_type.is_block_device();
        if !block_device && !file_type.is_file() {
            let source = io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            );
            return Err(err("open", source));
        }
        let (len_bytes, logical_bytes, physical_bytes) = if block_device {
            block_device_geometry(&file).map_err(|e| err("ioctl", e))?
        } else {
            (meta.len(), SECTOR_DEFAULT_BYTES, SECTOR_DEFAULT_BYTES)
        };
        let direct_align = match (block_device, options.direct_align) {
            (true, _) => Some(logical_bytes),
            (false, forced) => forced,
        };
        if let Some(align) = direct_align {
            set_direct(&file).map_err(|e| err("set O_DIRECT", e))?;
            check_io_align(align).map_err(|e| err("open", e))?;
        }
        let io_align = direct_align.unwrap_or(1);
        let sector = options
            .sector
            .unwrap_or(ats_sector_for(logical_bytes, physical_bytes).max(io_align));
        check_sector(sector, io_align).map_err(|e| err("open", e))?;
        let uncached = if direct_align.is_none() {
            OpenOptions::new()
                .read(true)
                .write(mode == OpenMode::ReadWrite)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok()
        } else {
            None
        };
        Ok(FileLun {
            file,
            uncached,
            path: path.to_path_buf(),
            block_device,
            read_only: mode == OpenMode::ReadOnly,
            sector,
            io_align,
            len_bytes,
            sectors: Mutex::new(SectorSets::default()),
            #[cfg(test)]
            caw_hook: Mutex::new(None),
        })
    }

    /// Sets (or clears) the test fault hook run inside every compare-and-write.
    #[cfg(test)]
    pub(crate) fn set_caw_hook(&self, hook: Option<CawHook>) {
        *self.caw_hook.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    #[cfg(test)]
    fn run_caw_hook(&self, offset: u64) {
        let hook = self
            .caw_hook
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(offset);
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, source: io::Error) -> LunError {
        LunError::Io {
            device: self.describe(),
            op,
            offset,
            source,
        }
    }

    fn check_writable(&self, op: &'static str, offset: u64) -> LunResult<()> {
        if !self.read_only {
            return Ok(());
        }
        let source = io::Error::new(io::ErrorKind::PermissionDenied, "opened read-only");
        Err(self.io_error(op, offset, source))
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_aligned(&self.file, self.io_align, buf, offset)
    }

    /// Writes `buf`; the offset and length are already aligned to `io_align`.
    fn write_raw(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_aligned(&self.file, self.io_align, buf, offset)
    }

    fn sectors(&self) -> std::sync::MutexGuard<'_, SectorSets> {
        self.sectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the sector at `offset` for a compare-and-write: in this process and by
    /// an OFD lock. Tries with backoff and never waits holding anything; gives up with
    /// `AtsTimeout` after `ATS_WAIT_MAX` (`ATS_WAIT_SUSPECT` on a suspect sector).
    fn lock_sector(&self, offset: u64) -> LunResult<SectorLock<'_>> {
        let wait = if self.sectors().suspect.contains(&offset) {
            ATS_WAIT_SUSPECT
        } else {
            ATS_WAIT_MAX
        };
        let started = Instant::now();
        let mut backoff = ATS_BACKOFF_FIRST;
        loop {
            if let Some(locked) = self.try_lock_sector(offset)? {
                self.sectors().suspect.remove(&offset);
                return Ok(locked);
            }
            let waited = started.elapsed();
            if waited >= wait {
                let mut sectors = self.sectors();
                if sectors.suspect.len() >= SUSPECT_SECTORS_MAX {
                    sectors.suspect.clear();
                }
                sectors.suspect.insert(offset);
                tracing::warn!(offset, waited_ms = waited.as_millis() as u64, device = %self.describe(), "compare-and-write gave up waiting for its sector");
                return Err(LunError::AtsTimeout {
                    device: self.describe(),
                    offset,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            std::thread::sleep(backoff.min(wait - waited));
            backoff = (backoff * 2).min(ATS_BACKOFF_MAX);
        }
    }

    /// One attempt at both locks of a sector; `None` when either is held.
    fn try_lock_sector(&self, offset: u64) -> LunResult<Option<SectorLock<'_>>> {
        if !self.sectors().busy.insert(offset) {
            return Ok(None);
        }
        let busy = BusySector { lun: self, offset };
        let range = OfdLock::try_acquire(&self.file, offset, u64::from(self.sector))
            .map_err(|e| self.io_error("compare-and-write lock", offset, e))?;
        Ok(range.map(|range| SectorLock {
            _range: range,
            _busy: busy,
        }))
    }

    /// Read, compare and write one sector; the caller holds both CAW locks.
    fn caw_locked(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        let op = "compare-and-write";
        let mut sector = AlignedBuf::new(new.len(), bounce_align(self.io_align))
            .map_err(|e| self.io_error(op, offset, e))?;
        let image = sector.as_mut_slice();
        self.read_raw(image, offset)
            .map_err(|e| self.io_error("compare-and-write read", offset, e))?;
        if image != expected {
            return Ok(Caw::Miscompare(image.to_vec()));
        }
        image.copy_from_slice(new);
        self.write_raw(image, offset)
            .map_err(|e| self.io_error("compare-and-write write", offset, e))?;
        Ok(Caw::Written)
    }
}

impl Lun for FileLun {
    fn sector_size(&self) -> u32 {
        self.sector
    }

    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        check_range("read", offset, buf.len(), self.len_bytes, None)?;
        self.read_raw(buf, offset)
            .map_err(|e| self.io_error("read", offset, e))
    }

    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        let Some(direct) = &self.uncached else {
            return self.read_at(buf, offset);
        };
        check_range("read", offset, buf.len(), self.len_bytes, None)?;
        read_aligned(direct, UNCACHED_ALIGN, buf, offset)
            .map_err(|e| self.io_error("read", offset, e))
    }

    /// Through the O_DIRECT descriptor when the write is aligned for it; the kernel
    /// writes back and drops any cached pages of the range, so the page cache and the
    /// device stay coherent for both descriptors.
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        let align = u64::from(UNCACHED_ALIGN);
        let Some(direct) = &self.uncached else {
            return self.write_at(buf, offset);
        };
        if offset % align != 0 || buf.len() as u64 % align != 0 {
            return self.write_at(buf, offset);
        }
        check_range("write", offset, buf.len(), self.len_bytes, None)?;
        self.check_writable("write", offset)?;
        write_aligned(direct, UNCACHED_ALIGN, buf, offset)
            .map_err(|e| self.io_error("write", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        check_range("write", offset, buf.len(), self.len_bytes, None)?;
        if self.io_align > 1 {
            check_range("write", offset, buf.len(), u64::MAX, Some(self.io_align))?;
        }
        self.check_writable("write", offset)?;
        self.write_raw(buf, offset)
            .map_err(|e| self.io_error("write", offset, e))
    }

    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        check_caw(offset, expected, new, self.sector, self.len_bytes)?;
        self.check_writable("compare-and-write", offset)?;
        let _locked = self.lock_sector(offset)?;
        #[cfg(test)]
        self.run_caw_hook(offset);
        self.caw_locked(offset, expected, new)
    }

    fn flush(&self) -> LunResult<()> {
        self.file
            .sync_data()
            .map_err(|e| self.io_error("flush", 0, e))
    }

    fn describe(&self) -> String {
        let kind = if self.block_device {
            "block device"
        } else {
            "image file"
        };
        format!("{kind} {}", self.path.display())
    }
}

impl fmt::Debug for FileLun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLun")
            .field("path", &self.path)
            .field("block_device", &self.block_device)
            .field("read_only", &self.read_only)
            .field("sector", &self.sector)
            .field("io_align", &self.io_align)
            .field("len_bytes", &self.len_bytes)
            .finish_non_exhaustive()
    }
}

fn bounce_align(io_align: u32) -> usize {
    BOUNCE_ALIGN_BYTES.max(io_align as usize)
}

thread_local! {
    /// A bounce buffer kept per thread: allocating one per transfer costs a page
    /// fault per page.
    static BOUNCE: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on an aligned buffer of `len` bytes (contents unspecified).
fn with_bounce<T>(
    len: usize,
    align: usize,
    f: impl FnOnce(&mut [u8]) -> io::Result<T>,
) -> io::Result<T> {
    let cached = BOUNCE.with_borrow_mut(|slot| {
        slot.take()
            .filter(|b| b.capacity() >= len && b.align_ok(align))
    });
    let mut bounce = match cached {
        Some(b) => b,
        None => AlignedBuf::new(len.max(64 * 1024), align)?,
    };
    let result = f(&mut bounce.as_mut_slice()[..len]);
    if bounce.capacity() <= BOUNCE_CHUNK_BYTES {
        BOUNCE.with_borrow_mut(|slot| *slot = Some(bounce));
    }
    result
}

/// Reads `buf` at `offset` from `file`, which needs `align`-aligned memory, offsets
/// and lengths (1: anything goes): an unaligned request is widened to whole blocks
/// and bounced, chunk by chunk.
fn read_aligned(file: &File, align: u32, buf: &mut [u8], offset: u64) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    if is_aligned(align, buf.as_ptr(), buf.len(), offset) {
        return file.read_exact_at(buf, offset);
    }
    let align64 = u64::from(align);
    let end = offset + buf.len() as u64;
    let span_start = offset - offset % align64;
    let span_end = end.div_ceil(align64) * align64;
    let chunk_max = BOUNCE_CHUNK_BYTES.min((span_end - span_start) as usize);
    with_bounce(chunk_max, bounce_align(align), |bounce| {
        let mut pos = span_start;
        while pos < span_end {
            let chunk_len = ((span_end - pos) as usize).min(chunk_max);
            let chunk = &mut bounce[..chunk_len];
            file.read_exact_at(chunk, pos)?;
            let lo = pos.max(offset);
            let hi = (pos + chunk_len as u64).min(end);
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&chunk[(lo - pos) as usize..(hi - pos) as usize]);
            pos += chunk_len as u64;
        }
        Ok(())
    })
}

/// Writes `buf` at `offset` to `file`; offset and length are already aligned to
/// `align`, the memory may not be (then it is bounced, chunk by chunk).
fn write_aligned(file: &File, align: u32, buf: &[u8], offset: u64) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    if is_aligned(align, buf.as_ptr(), buf.len(), offset) {
        return file.write_all_at(buf, offset);
    }
    let chunk_max = BOUNCE_CHUNK_BYTES.min(buf.len());
    with_bounce(chunk_max, bounce_align(align), |bounce| {
        let mut done = 0;
        while done < buf.len() {
            let chunk_len = (buf.len() - done).min(chunk_max);
            let chunk = &mut bounce[..chunk_len];
            chunk.copy_from_slice(&buf[done..done + chunk_len]);
            file.write_all_at(chunk, offset + done as u64)?;
            done += chunk_len;
        }
        Ok(())
    })
}

/// True when direct I/O can use this buffer, offset and length as they are.
fn is_aligned(align: u32, addr: *const u8, len: usize, offset: u64) -> bool {
    let align = align as usize;
    (addr as usize) % align == 0 && len % align == 0 && offset % (align as u64) == 0
}

/// The size in bytes, logical and physical block size of a block device.
fn block_device_geometry(file: &File) -> io::Result<(u64, u32, u32)> {
    let fd = file.as_raw_fd();
    let mut len_bytes: u64 = 0;
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: `fd` is an open block device and each pointer is to a live local of the
    // type the ioctl writes (u64 for BLKGETSIZE64, int for BLKSSZGET, unsigned int
    // for BLKPBSZGET).
    unsafe {
        ioctl::blkgetsize64(fd, &mut len_bytes).map_err(io::Error::from)?;
        ioctl::blksszget(fd, &mut logical).map_err(io::Error::from)?;
        ioctl::blkpbszget(fd, &mut physical).map_err(io::Error::from)?;
    }
    let logical = u32::try_from(logical).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "negative logical block size from BLKSSZGET",
        )
    })?;
    Ok((len_bytes, logical, physical))
}

/// The ATS sector a block device gets unless the caller asks for another: its
/// physical block, the unit it writes atomically, where that is a power-of-two
/// multiple of the logical block; else the logical block (a device that reports no
/// physical size says 0). A physical block larger than the format allows is kept, so
/// that mkfs and mount refuse the device instead of assuming an atomicity it lacks.
fn ats_sector_for(logical: u32, physical: u32) -> u32 {
    let whole_blocks = physical.is_power_of_two() && physical.checked_rem(logical) == Some(0);
    if whole_blocks && physical > logical {
        physical
    } else {
        logical
    }
}

fn set_direct(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT))?;
    Ok(())
}

fn check_io_align(align: u32) -> io::Result<()> {
    if align.is_power_of_two() && (SECTOR_MIN_BYTES..=SECTOR_MAX_BYTES).contains(&align) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("unsupported logical block size {align}"),
    ))
}

fn check_sector(sector: u32, io_align: u32) -> io::Result<()> {
    let sane = sector.is_power_of_two()
        && (SECTOR_MIN_BYTES..=SECTOR_MAX_BYTES).contains(&sector)
        && sector % io_align == 0;
    if sane {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "ATS sector size {sector} is not a power of two in \
             {SECTOR_MIN_BYTES}..={SECTOR_MAX_BYTES} and a multiple of the \
             {io_align}-byte block"
        ),
    ))
}

/// A zeroed heap buffer whose start is aligned for direct I/O. Over-allocates by
/// `align` and slices, which needs no unsafe code.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        if start >= align {
            return Err(io::Error::other("cannot align a bounce buffer"));
        }
        Ok(AlignedBuf {
            storage,
            start,
            len,
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    fn capacity(&self) -> usize {
        self.len
    }

    fn align_ok(&self, align: usize) -> bool {
        (self.storage.as_ptr() as usize + self.start) % align == 0
    }
}

/// Both locks of a sector in a compare-and-write; the OFD lock goes first on drop.
struct SectorLock<'a> {
    _range: OfdLock<'a>,
    _busy: BusySector<'a>,
}

/// A sector marked busy in this process, unmarked on drop.
struct BusySector<'a> {
    lun: &'a FileLun,
    offset: u64,
}

impl Drop for BusySector<'_> {
    fn drop(&mut self) {
        self.lun.sectors().busy.remove(&self.offset);
    }
}

/// An OFD write lock on a byte range, released on drop (and by the kernel when the
/// file is closed, should the unlock ever fail).
struct OfdLock<'a> {
    file: &'a File,
    start: u64,
    len: u64,
}

impl<'a> OfdLock<'a> {
    /// Takes the lock if no other open file description holds the range.
    fn try_acquire(file: &'a File, start: u64, len: u64) -> io::Result<Option<OfdLock<'a>>> {
        let got = set_ofd_lock(file, libc::F_WRLCK, start, len)?;
        Ok(got.then_some(OfdLock { file, start, len }))
    }
}

impl Drop for OfdLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = set_ofd_lock(self.file, libc::F_UNLCK, self.start, self.len) {
            tracing::error!(start = self.start, len = self.len, error = %e, "OFD unlock failed");
        }
    }
}

/// Sets or clears an OFD lock on `[start, start + len)` without waiting: false when
/// another open file description holds a conflicting lock.
fn set_ofd_lock(file: &File, kind: libc::c_int, start: u64, len: u64) -> io::Result<bool> {
    let to_off = |v: u64| {
        libc::off_t::try_from(v)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "lock range too large"))
    };
    // SAFETY: `flock` is a plain C struct of integers; all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = to_off(start)?;
    fl.l_len = to_off(len)?;
    // OFD locks require l_pid == 0 (zeroed above).
    for _ in 0..UNLOCK_RETRIES_MAX {
        match fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => return Ok(false),
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::Interrupted,
        "OFD lock call interrupted too often",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    const LEN_BYTES: u64 = 1024 * 1024;

    fn image(len_bytes: u64) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(len_bytes).unwrap();
        file
    }

    /// Opens an image file with O_DIRECT forced, if the filesystem supports it.
    fn open_direct(path: &Path, align: u32) -> Option<FileLun> {
        let options = OpenOptionsLun {
            sector: None,
            direct_align: Some(align),
        };
        match FileLun::open_with(path, OpenMode::ReadWrite, options) {
            Ok(lun) => Some(lun),
            Err(e) => {
                eprintln!("skipping: O_DIRECT not supported here: {e}");
                None
            }
        }
    }

    #[test]
    fn round_trip_and_reopen() {
        let img = image(LEN_BYTES);
        let lun = FileLun::open(img.path(), OpenMode::ReadWrite).unwrap();
        assert_eq!(lun.sector_size(), 512);
        assert_eq!(lun.len_bytes(), LEN_BYTES);
        assert!(!lun.is_block_device());
        assert_eq!(lun.path(), img.path());
        assert_eq!(
            lun.describe(),
            format!("image file {}", img.path().display())
        );

        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        lun.write_at(&data, 4096).unwrap();
        lun.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        lun.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);

        let again = FileLun::open(img.path(), OpenMode::ReadOnly).unwrap();
        let mut part = vec![0u8; 100];
        again.read_at(&mut part, 4096 + 7).unwrap();
        assert_eq!(part, data[7..107]);
        let mut before = vec![0xffu8; 512];
        again.read_at(&mut before, 3584).unwrap();
        assert!(before.iter().all(|&b| b == 0));
    }

    #[test]
    fn uncached_reads_see_what_buffered_writes_left_in_the_page_cache() {
        let img = image(LEN_BYTES);
        let lun = FileLun::open(img.path(), OpenMode::ReadWrite).unwrap();
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i * 7 % 251) as u8).collect();
        lun.write_at(&data, 8192).unwrap();
        // Not flushed: O_DIRECT reads must still see it (the kernel writes it back
        // first). Aligned, misaligned memory and a partial block.
        let mut aligned = AlignedBuf::new(data.len(), 4096).unwrap();
        lun.read_uncached(aligned.as_mut_slice(), 8192).unwrap();
        assert_eq!(aligned.as_mut_slice(), &data[..]);
        let mut odd = vec![0u8; data.len() + 1];
        lun.read_uncached(&mut odd[1..], 8192).unwrap();
        assert_eq!(&odd[1..], &data[..]);
        let mut part = vec![0u8; 100];
        lun.read_uncached(&mut part, 8192 + 4000).unwrap();
        assert_eq!(part, &data[4000..4100]);
        let err = lun.read_uncached(&mut part, LEN_BYTES - 50).unwrap_err();
        assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn out_of_range_is_refused() {
        let img = image(LEN_BYTES);
        let lun = FileLun::open(img.path(), OpenMode::ReadWrite).unwrap();
        let mut buf = vec![0u8; 1024];
        let err = lun.read_at(&mut buf, LEN_BYTES - 512).unwrap_err();
        assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
        let err = lun.write_at(&buf, LEN_BYTES).unwrap_err();
        assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
        let err = lun.write_at(&buf, u64::MAX - 10).unwrap_err();
        assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
        let sector = vec![0u8; 512];
        let err = lun
            .compare_and_write(LEN_BYTES, &sector, &sector)
            .unwrap_err();
        assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
        // The file did not grow.
        assert_eq!(img.as_file().metadata().unwrap().len(), LEN_BYTES);
    }

    #[test]
    fn read_only_refuses_writes() {
        let img = image(LEN_BYTES);
        let lun = FileLun::open(img.path(), OpenMode::ReadOnly).unwrap();
        let sector = vec![1u8; 512];
        let err = lun.write_at(&sector, 0).unwrap_err();
        assert!(matches!(err, LunError::Io { .. }), "{err}");
        let err = lun.compare_and_write(0, &[0u8; 512], &sector).unwrap_err();
        assert!(matches!(err, LunError::Io { .. }), "{err}");
        let mut back = vec![9u8; 512];
        lun.read_at(&mut back, 0).unwrap();
        assert_eq!(back, vec![0u8; 512]);
    }

    #[test]
    fn open_errors_are_io_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileLun::open(dir.path().join("missing"), OpenMode::ReadWrite).unwrap_err();
        assert!(matches!(err, LunError::Io { op: "open", .. }), "{err}");
        // A directory is neither an image file nor a block device.
        let err = FileLun::open(dir.path(), OpenMode::ReadOnly).unwrap_err();
        assert!(matches!(err, LunError::Io { .. }), "{err}");
        let img = image(LEN_BYTES);
        for bad in [0, 256, 768, 1 << 17] {
            let err = FileLun::open_with_sector(img.path(), OpenMode::ReadWrite, bad);
            assert!(err.is_err(), "sector {bad} was accepted");
        }
    }

    #[test]
    fn caw_writes_or_reports_actual() {
        let img = image(LEN_BYTES);
        let lun = FileLun::open(img.path(), OpenMode::ReadWrite).unwrap();
        let zero = vec![0u8; 512];
        let a = vec![0xaau8; 512];
        let b = vec![0xbbu8; 512];
        assert_eq!(
            lun.compare_and_write(1024, &zero, &a).unwrap(),
            Caw::Written
        );
        let mut back = vec![0u8; 512];
        lun.read_at(&mut back, 1024).unwrap();
        assert_eq!(back, a);
        // Expected is stale: nothing changes and the caller learns what is there.
        assert_eq!(
            lun.compare_and_write(1024, &zero, &b).unwrap(),
            Caw::Miscompare(a.clone())
        );
        lun.read_at(&mut back, 1024).unwrap();
        assert_eq!(back, a);
        // Neighbours are untouched.
        lun.read_at(&mut back, 512).unwrap();
        assert_eq!(back, zero);
        lun.read_at(&mut back, 1536).unwrap();
        assert_eq!(back, zero);
        // Not one whole aligned sector.
        let err = lun.compare_and_write(1000, &zero, &a).unwrap_err();
        assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
        let err = lun
            .compare_and_write(1024, &zero[..256], &a[..256])
            .unwrap_err();
        assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    }

    #[test]
    fn sector_4096() {
        let img = image(LEN_BYTES);
        let lun = FileLun::open_with_sector(img.path(), OpenMode::ReadWrite, 4096).unwrap();
        assert_eq!(lun.sector_size(), 4096);
        let small = vec![0u8; 512];
        let err = lun.compare_and_write(0, &small, &small).unwrap_err();
        assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
        let zero = vec![0u8; 4096];
        let new = vec![0x5au8; 4096];
        let err = lun.compare_and_write(512, &zero, &new).unwrap_err();
        assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
        assert_eq!(
            lun.compare_and_write(8192, &zero, &new).unwrap(),
            Caw::Written
        );
        assert_eq!(
            lun.compare_and_write(8192, &zero, &zero).unwrap(),
            Caw::Miscompare(new.clone())
        );
        let mut back = vec![0u8; 4096];
        lun.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, new);
    }

    /// Adds one to the little-endian counter in the first 8 bytes of the sector at
    /// `offset`, by read and compare-and-write until the CAW succeeds.
    fn increment(lun: &FileLun, offset: u64) {
        let sector = lun.sector_size() as usize;
        let mut expected = vec![0u8; sector];
        lun.read_at(&mut expected, offset).unwrap();
        for _ in 0..100_000 {
            let count = u64::from_le_bytes(expected[..8].try_into().unwrap());
            let mut new = expected.clone();
            new[..8].copy_from_slice(&(count + 1).to_le_bytes());
            match lun.compare_and_write(offset, &expected, &new).unwrap() {
                Caw::Written => return,
                Caw::Miscompare(actual) => expected = actual,
            }
        }
        panic!("increment did not succeed within the retry bound");
    }

    /// Four threads each add `INCREMENTS` to one counter; the first `shared` of them
    /// use one `FileLun`, the others each open their own.
    fn contend(shared: usize) {
        const THREADS: usize = 4;
        const INCREMENTS: u64 = 500;
        const OFFSET: u64 = 512;
        let img = image(LEN_BYTES);
        let one = Arc::new(FileLun::open(img.path(), OpenMode::ReadWrite).unwrap());
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let lun = if i < shared {
                    Arc::clone(&one)
                } else {
                    Arc::new(FileLun::open(img.path(), OpenMode::ReadWrite).unwrap())
                };
                thread::spawn(move || {
                    for _ in 0..INCREMENTS {
                        increment(&lun, OFFSET);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut back = vec![0u8; 512];
        one.read_at(&mut back, OFFSET).unwrap();
        let count = u64::from_le_bytes(back[..8].try_into().unwrap());
        assert_eq!(
            count,
            THREADS as u64 * INCREMENTS,
            "{shared} threads shared"
        );
    }

    #[test]
    fn caw_is_atomic_between_threads_of_one_open() {
        contend(4);
    }

    #[test]
    fn caw_is_atomic_between_opens() {
        contend(0);
    }

    #[test]
    fn caw_is_atomic_under_mixed_contention() {
        contend(2);
    }

    /// A compare-and-write on `lun` at `offset` stopped inside (holding the sector, as
    /// a host stopped by SIGSTOP would) until the gate is opened or dropped.
    struct StoppedCaw {
        open: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl StoppedCaw {
        fn start(lun: Arc<FileLun>, offset: u64) -> StoppedCaw {
            use std::sync::atomic::{AtomicBool, Ordering};
            let open = Arc::new(AtomicBool::new(false));
            let inside = Arc::new(AtomicBool::new(false));
            let (gate, entered) = (open.clone(), inside.clone());
            lun.set_caw_hook(Some(Arc::new(move |at| {
                if at != offset || gate.load(Ordering::SeqCst) {
                    return;
                }
                entered.store(true, Ordering::SeqCst);
                while !gate.load(Ordering::SeqCst) {
                    thread::sleep(std::time::Duration::from_millis(5));
                }
            })));
            let thread = thread::spawn(move || {
                let sector = lun.sector_size() as usize;
                let _ = lun.compare_and_write(offset, &vec![0; sector], &vec![7; sector]);
            });
            for _ in 0..2000 {
                if inside.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(
                inside.load(Ordering::SeqCst),
                "the CAW never reached the hook"
            );
            StoppedCaw {
                open,
                thread: Some(thread),
            }
        }
    }

    impl Drop for StoppedCaw {
        fn drop(&mut self) {
            self.open.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    #[test]
    fn a_caw_on_a_sector_held_by_a_stopped_host_times_out() {
        let img = image(LEN_BYTES);
        let stopped_host = Arc::new(FileLun::open(img.path(), OpenMode::ReadWrite).unwrap());
        let other_host = FileLun::open(img.path(), OpenMode::ReadWrite).unwrap();
        let gate = StoppedCaw::start(stopped_host, 1024);
        let (zeros, ones) = (vec![0u8; 512], vec![1u8; 512]);
        for _ in 0..3 {
            match other_host.compare_and_write(1024, &zeros, &ones) {
                Err(LunError::AtsTimeout { offset: 1024, .. }) => {}
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        // Other sectors are not held up.
        assert_eq!(
            other_host.compare_and_write(2048, &zeros, &ones).unwrap(),
            Caw::Written
        );
        drop(gate);
        // Once the stopped host goes on, its CAW lands and the sector works again.
        assert_eq!(
            other_host
                .compare_and_write(1024, &vec![7u8; 512], &ones)
                .unwrap(),
            Caw::Written
        );
    }

    #[test]
    fn a_caw_never_waits_for_a_caw_of_another_sector() {
        // Sectors 2 and 66 of one open (once in one stripe of a striped mutex): a thread stopped inside the
        // first must not hold up the second (a heartbeat behind a stuck lock record).
        let img = image(LEN_BYTES);
        let lun = Arc::new(FileLun::open(img.path(), OpenMode::ReadWrite).unwrap());
        let gate = StoppedCaw::start(lun.clone(), 1024);
        let other = 1024 + 512 * 64;
        let (zeros, ones) = (vec![0u8; 512], vec![1u8; 512]);
        assert_eq!(
            lun.compare_and_write(other, &zeros, &ones).unwrap(),
            Caw::Written
        );
        drop(gate);
    }

    #[test]
    fn direct_io_bounces_unaligned_buffers() {
        let img = image(LEN_BYTES);
        let Some(lun) = open_direct(img.path(), 4096) else {
            return;
        };
        assert_eq!(lun.sector_size(), 4096);
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 253) as u8).collect();
        // An unaligned source address, aligned offset and length.
        let mut shifted = vec![0u8; data.len() + 1];
        shifted[1..].copy_from_slice(&data);
        lun.write_at(&shifted[1..], 8192).unwrap();
        // An unaligned destination, and a read that is unaligned in offset and length.
        let mut back = vec![0u8; data.len() + 1];
        lun.read_at(&mut back[1..], 8192).unwrap();
        assert_eq!(back[1..], data[..]);
        let mut part = vec![0u8; 5000];
        lun.read_at(&mut part, 8192 + 100).unwrap();
        assert_eq!(part, data[100..5100]);
        // Writes must be whole blocks: no read-modify-write of a shared block.
        let err = lun.write_at(&data[..100], 8192).unwrap_err();
        assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
        let err = lun.write_at(&data[..4096], 8192 + 512).unwrap_err();
        assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
        // Compare-and-write through the direct path.
        let zero = vec![0u8; 4096];
        assert_eq!(
            lun.compare_and_write(0, &zero, &data[..4096]).unwrap(),
            Caw::Written
        );
        assert_eq!(
            lun.compare_and_write(0, &zero, &zero).unwrap(),
            Caw::Miscompare(data[..4096].to_vec())
        );
    }

    #[test]
    fn direct_io_large_unaligned_transfer_spans_chunks() {
        let img = image(4 * 1024 * 1024);
        let Some(lun) = open_direct(img.path(), 4096) else {
            return;
        };
        let len = BOUNCE_CHUNK_BYTES + 3 * 4096;
        let data: Vec<u8> = (0..len as u32).map(|i| (i % 241) as u8).collect();
        let mut shifted = vec![0u8; len + 3];
        shifted[3..].copy_from_slice(&data);
        lun.write_at(&shifted[3..], 4096).unwrap();
        let mut back = vec![0u8; len - 50];
        lun.read_at(&mut back, 4096 + 25).unwrap();
        assert_eq!(back, data[25..len - 25]);
    }

    #[test]
    fn the_ats_sector_of_a_block_device_is_its_physical_block() {
        // 512e: the disk writes 4 KiB at a time, so a 512-byte sector is not atomic.
        assert_eq!(ats_sector_for(512, 4096), 4096);
        assert_eq!(ats_sector_for(512, 512), 512);
        assert_eq!(ats_sector_for(4096, 4096), 4096);
        // A device that reports no physical block size (0), or one that is not a
        // power-of-two multiple of the logical block: the logical block.
        assert_eq!(ats_sector_for(512, 0), 512);
        assert_eq!(ats_sector_for(4096, 512), 4096);
        assert_eq!(ats_sector_for(512, 1536), 512);
        // Larger physical blocks are kept: the format refuses them rather than lose
        // the atomicity it assumes.
        assert_eq!(ats_sector_for(512, 8192), 8192);
    }

    /// The physical block size sysfs reports for a block device (or its disk, for a
    /// partition), read apart from the code under test.
    fn sysfs_physical_block_size(path: &str) -> u32 {
        let real = std::fs::canonicalize(path).unwrap();
        let name = real.file_name().unwrap().to_str().unwrap().to_string();
        let own = format!("/sys/class/block/{name}/queue/physical_block_size");
        let disk = format!("/sys/class/block/{name}/../queue/physical_block_size");
        let text = std::fs::read_to_string(own)
            .or_else(|_| std::fs::read_to_string(disk))
            .unwrap();
        text.trim().parse().unwrap()
    }

    /// Runs against a 512e block device (512-byte logical, 4096-byte physical blocks)
    /// named by ATSFS_TEST_512E_DEVICE, opened read only: nothing is written. Such a
    /// disk writes whole physical blocks, so the ATS sector must be one.
    #[test]
    #[ignore = "needs ATSFS_TEST_512E_DEVICE (a 512e disk; opened read only)"]
    fn a_512e_device_gets_ats_sectors_of_its_physical_block() {
        let Ok(path) = std::env::var("ATSFS_TEST_512E_DEVICE") else {
            return;
        };
        let lun = FileLun::open(&path, OpenMode::ReadOnly).unwrap();
        assert!(lun.is_block_device());
        assert_eq!(
            lun.io_align, 512,
            "not a 512e device: logical {}",
            lun.io_align
        );
        let physical = sysfs_physical_block_size(&path);
        assert!(physical > 512, "not a 512e device: physical {physical}");
        assert_eq!(lun.sector_size(), physical);
        // A smaller ATS sector may still be asked for explicitly (old volumes).
        let small = FileLun::open_with_sector(&path, OpenMode::ReadOnly, 512).unwrap();
        assert_eq!(small.sector_size(), 512);
    }

    /// Runs against a real block device named by ATSFS_TEST_BLOCK_DEVICE (its contents
    /// are overwritten), e.g. a loop device.
    #[test]
    #[ignore = "needs ATSFS_TEST_BLOCK_DEVICE (destroys its contents)"]
    fn block_device() {
        let Ok(path) = std::env::var("ATSFS_TEST_BLOCK_DEVICE") else {
            return;
        };
        let lun = FileLun::open(&path, OpenMode::ReadWrite).unwrap();
        assert!(lun.is_block_device());
        assert!(lun.describe().starts_with("block device "));
        assert!(lun.len_bytes() >= 1024 * 1024);
        let flags = fcntl(lun.file.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(OFlag::from_bits_truncate(flags).contains(OFlag::O_DIRECT));
        let sector = lun.sector_size() as usize;
        eprintln!(
            "{}: sector {sector}, {} bytes",
            lun.describe(),
            lun.len_bytes()
        );
        if sector > 512 {
            // A sector smaller than the logical block cannot be written alone.
            assert!(FileLun::open_with_sector(&path, OpenMode::ReadOnly, 512).is_err());
        }
        let old = {
            let mut buf = vec![0u8; sector];
            lun.read_at(&mut buf, 0).unwrap();
            buf
        };
        let new: Vec<u8> = old.iter().map(|b| b.wrapping_add(1)).collect();
        assert_eq!(lun.compare_and_write(0, &old, &new).unwrap(), Caw::Written);
        lun.flush().unwrap();
        let other = FileLun::open(&path, OpenMode::ReadOnly).unwrap();
        let mut back = vec![0u8; sector + 1];
        other.read_at(&mut back[1..], 0).unwrap();
        assert_eq!(back[1..], new[..]);
        // A plain write from an unaligned buffer, seen through the other open.
        back[1..].copy_from_slice(&old);
        lun.write_at(&back[1..], 0).unwrap();
        let mut again = vec![0u8; sector];
        other.read_at(&mut again, 0).unwrap();
        assert_eq!(again, old);
    }
}
