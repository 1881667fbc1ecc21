//! SCSI devices of this kernel through the SG_IO ioctl: `/dev/sgN`, `/dev/sdX`, and
//! device-mapper nodes whose table passes SG_IO to a SCSI path.
//!
//! Every command goes through SG_IO, data included (not through the block device's
//! read/write): a write refused with RESERVATION CONFLICT must come back as that
//! status, so that it becomes `LunError::Fenced`, where the block layer would turn
//! it into a bare EIO; and SG_IO never touches the page cache, as O_DIRECT would
//! not guarantee for a device opened elsewhere.
//!
//! The ioctl is written here on `libc` (the crates that wrap it were unmaintained,
//! unsound, or a much larger API than one call): `sg_io_hdr` below is the kernel's
//! `struct sg_io_hdr` (<scsi/sg.h>), checked by a layout test.
//!
//! On dm-multipath, a PERSISTENT RESERVE OUT through SG_IO reaches the current path
//! only, so a registration covers one I_T nexus; register every path (mpathpersist)
//! until atsfs uses the kernel's IOC_PR_* ioctls there.

use super::scsi::{DataDir, ScsiStatus, ScsiTransport, TransportError};
use super::{LunError, LunResult, OpenMode};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const SG_IO: libc::c_ulong = 0x2285;
const SG_GET_VERSION_NUM: libc::c_ulong = 0x2282;
const SG_INTERFACE_ID: libc::c_int = b'S' as libc::c_int;
const SG_DXFER_NONE: libc::c_int = -1;
const SG_DXFER_TO_DEV: libc::c_int = -2;
const SG_DXFER_FROM_DEV: libc::c_int = -3;
/// Sense bytes asked for (SPC-4 allows up to 252).
const SENSE_MAX_BYTES: usize = 252;
/// Milliseconds before the kernel aborts a command.
const COMMAND_TIMEOUT_MS: u32 = 30_000;
/// The largest data transfer of one command: below the block layer's usual
/// max_sectors_kb (512 KiB or more), so no command is refused for its size.
const MAX_TRANSFER_BYTES: usize = 256 * 1024;

/// Host (transport) status codes of the SCSI midlayer (include/scsi/scsi_status.h).
const DID_OK: u16 = 0x00;
const DID_TIME_OUT: u16 = 0x03;
const DID_NEXUS_FAILURE: u16 = 0x11;
/// driver_status: the command timed out in the driver.
const DRIVER_TIMEOUT: u16 = 0x06;

/// The kernel's `struct sg_io_hdr` (interface version 3).
#[repr(C)]
struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: libc::c_uchar,
    mx_sb_len: libc::c_uchar,
    iovec_count: libc::c_ushort,
    dxfer_len: libc::c_uint,
    dxferp: *mut libc::c_void,
    cmdp: *const libc::c_uchar,
    sbp: *mut libc::c_uchar,
    timeout: libc::c_uint,
    flags: libc::c_uint,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: libc::c_uchar,
    masked_status: libc::c_uchar,
    msg_status: libc::c_uchar,
    sb_len_wr: libc::c_uchar,
    host_status: libc::c_ushort,
    driver_status: libc::c_ushort,
    resid: libc::c_int,
    duration: libc::c_uint,
    info: libc::c_uint,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<SgIoHdr>() == 88);

/// A header for `cdb` with `data`, pointing into the caller's buffers; used only
/// while they live (inside `SgTransport::execute`).
fn header(cdb: &[u8], data: &mut DataDir<'_>, sense: &mut [u8]) -> Result<SgIoHdr, TransportError> {
    let (direction, len, ptr) = match data {
        DataDir::None => (SG_DXFER_NONE, 0, std::ptr::null_mut()),
        DataDir::In(buf) => (SG_DXFER_FROM_DEV, buf.len(), buf.as_mut_ptr().cast()),
        // The kernel only reads a data-out buffer; the cast to *mut is its ABI.
        DataDir::Out(buf) => (
            SG_DXFER_TO_DEV,
            buf.len(),
            buf.as_ptr() as *mut libc::c_void,
        ),
    };
    let cmd_len = u8::try_from(cdb.len())
        .ok()
        .filter(|n| (6..=16).contains(n))
        .ok_or_else(|| TransportError::NotSent(format!("a CDB of {} bytes", cdb.len())))?;
    let dxfer_len = u32::try_from(len)
        .map_err(|_| TransportError::NotSent(format!("a transfer of {len} bytes")))?;
    Ok(SgIoHdr {
        interface_id: SG_INTERFACE_ID,
        dxfer_direction: direction,
        cmd_len,
        mx_sb_len: sense.len().min(255) as u8,
        iovec_count: 0,
        dxfer_len,
        dxferp: ptr,
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: COMMAND_TIMEOUT_MS,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    })
}

/// What the kernel's answer means: a SCSI status, or a transport failure.
fn outcome(hdr: &SgIoHdr, sense: &[u8]) -> Result<ScsiStatus, TransportError> {
    let host = hdr.host_status;
    let status = if host == DID_NEXUS_FAILURE {
        // The midlayer's name for a reservation conflict.
        super::scsi::STATUS_RESERVATION_CONFLICT
    } else if host == DID_TIME_OUT || hdr.driver_status & 0x0F == DRIVER_TIMEOUT {
        return Err(TransportError::Timeout(format!(
            "the kernel timed out the command after {COMMAND_TIMEOUT_MS} ms"
        )));
    } else if host != DID_OK {
        return Err(TransportError::ConnectionLost(format!(
            "the SCSI host reported {} ({host:#04x})",
            host_status_name(host)
        )));
    } else {
        hdr.status
    };
    let written = usize::from(hdr.sb_len_wr).min(sense.len());
    Ok(ScsiStatus {
        status,
        sense: sense[..written].to_vec(),
        residual: usize::try_from(hdr.resid).unwrap_or(0),
    })
}

fn host_status_name(host: u16) -> &'static str {
    match host {
        0x01 => "DID_NO_CONNECT (no path to the device)",
        0x02 => "DID_BUS_BUSY",
        0x04 => "DID_BAD_TARGET",
        0x05 => "DID_ABORT",
        0x07 => "DID_ERROR",
        0x08 => "DID_RESET",
        0x0E => "DID_TRANSPORT_DISRUPTED",
        0x0F => "DID_TRANSPORT_FAILFAST",
        0x10 => "DID_TARGET_FAILURE",
        0x13 => "DID_MEDIUM_ERROR",
        _ => "a host error",
    }
}

/// Asks the driver behind `file` for its SG version: Ok on nodes that take SG_IO.
fn sg_version(file: &File) -> io::Result<libc::c_int> {
    let mut version: libc::c_int = 0;
    // SAFETY: SG_GET_VERSION_NUM writes one int through the pointer, which points
    // to a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), SG_GET_VERSION_NUM as _, &mut version) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(version)
}

/// Whether `path` is a device node that answers SG_IO for a whole SCSI logical unit
/// (regular files never do). Partitions and device-mapper maps other than multipath
/// are left out: SG_IO on them reaches the whole underlying disk (root may do that),
/// where atsfs's block numbers would land outside the partition.
pub fn answers_sg_io(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let kind = meta.file_type();
    if kind.is_block_device() && !whole_scsi_unit(meta.rdev()) {
        return false;
    }
    if !kind.is_block_device() && !kind.is_char_device() {
        return false;
    }
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return false;
    };
    sg_version(&file).is_ok()
}

/// Whether the block device `rdev` is a whole disk or a multipath map (by sysfs).
fn whole_scsi_unit(rdev: u64) -> bool {
    let sys = format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev as libc::dev_t),
        libc::minor(rdev as libc::dev_t)
    );
    if Path::new(&sys).join("partition").exists() {
        return false;
    }
    match std::fs::read_to_string(Path::new(&sys).join("dm/uuid")) {
        Ok(uuid) => uuid.starts_with("mpath-"),
        Err(_) => true,
    }
}

/// Refuses a block device whose size differs from what SG_IO's READ CAPACITY says:
/// the commands would address another (larger) device than the one named.
pub fn check_same_size(path: &Path, scsi_len_bytes: u64) -> LunResult<()> {
    use std::os::unix::fs::FileTypeExt;
    let device = path.display().to_string();
    let io_error = |source: io::Error| LunError::Io {
        device: device.clone(),
        op: "stat",
        offset: 0,
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_error)?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    let file = File::open(path).map_err(io_error)?;
    let mut len_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, to a live local.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut len_bytes) }
        .map_err(|e| io_error(io::Error::from(e)))?;
    if len_bytes != scsi_len_bytes {
        return Err(LunError::Open {
            device,
            detail: format!(
                "the block device is {len_bytes} bytes but SG_IO reaches a logical unit of \
                 {scsi_len_bytes} bytes (a partition or a partial mapping?); give the whole \
                 disk or its /dev/sgN node"
            ),
        });
    }
    Ok(())
}

// BLKGETSIZE64 = _IOR(0x12, 114, size_t): the device size in bytes.
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// A SCSI device node, commands through SG_IO.
pub struct SgTransport {
    file: File,
    path: PathBuf,
}

impl SgTransport {
    /// Opens `path` and checks that it takes SG_IO.
    pub fn open(path: &Path, mode: OpenMode) -> LunResult<SgTransport> {
        let device = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)
            .map_err(|source| LunError::Io {
                device: device.clone(),
                op: "open",
                offset: 0,
                source,
            })?;
        if let Err(e) = sg_version(&file) {
            let name = match e.raw_os_error() {
                Some(libc::ENOTTY) => "ENOTTY".to_string(),
                Some(libc::EINVAL) => "EINVAL".to_string(),
                _ => e.to_string(),
            };
            return Err(LunError::Open {
                device,
                detail: format!(
                    "not a SCSI device: SG_IO refused ({name}); image files, loop, virtio and \
                     NVMe devices are opened as files (emulated compare-and-write), SCSI disks \
                     as /dev/sdX or /dev/sgN"
                ),
            });
        }
        Ok(SgTransport {
            file,
            path: path.to_path_buf(),
        })
    }
}

impl ScsiTransport for SgTransport {
    fn execute(&self, cdb: &[u8], mut data: DataDir<'_>) -> Result<ScsiStatus, TransportError> {
        let mut sense = [0u8; SENSE_MAX_BYTES];
        let mut hdr = header(cdb, &mut data, &mut sense)?;
        // SAFETY: hdr points to `cdb`, the data buffer inside `data` and `sense`, all
        // alive and not otherwise used until the ioctl returns; SG_IO is synchronous
        // and keeps no pointer after it.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), SG_IO as _, &mut hdr) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::EIO) => {
                    TransportError::ConnectionLost(format!("SG_IO: {e}"))
                }
                _ => TransportError::NotSent(format!("SG_IO: {e}")),
            });
        }
        outcome(&hdr, &sense)
    }

    /// A local node has no connection to re-establish; the kernel's SCSI layer
    /// handles path failures itself (and dm-multipath fails over).
    fn reconnect(&self) -> Result<(), TransportError> {
        Err(TransportError::ConnectionLost(
            "a local SCSI device cannot be reconnected by atsfs".into(),
        ))
    }

    fn max_transfer_bytes(&self) -> usize {
        MAX_TRANSFER_BYTES
    }

    fn describe(&self) -> String {
        format!("SCSI device {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn the_header_points_at_the_buffers() {
        let cdb = super::super::scsi::cdb::read16(5, 1);
        let mut buf = [0u8; 512];
        let mut sense = [0u8; SENSE_MAX_BYTES];
        let mut data = DataDir::In(&mut buf);
        let hdr = header(&cdb, &mut data, &mut sense).unwrap();
        assert_eq!(hdr.interface_id, b'S' as i32);
        assert_eq!(hdr.dxfer_direction, SG_DXFER_FROM_DEV);
        assert_eq!(hdr.cmd_len, 16);
        assert_eq!(hdr.dxfer_len, 512);
        assert_eq!(hdr.mx_sb_len, 252);
        assert_eq!(hdr.cmdp, cdb.as_ptr());
        let out = [1u8; 1024];
        let hdr = header(&cdb, &mut DataDir::Out(&out), &mut sense).unwrap();
        assert_eq!(hdr.dxfer_direction, SG_DXFER_TO_DEV);
        assert_eq!(hdr.dxfer_len, 1024);
        let hdr = header(&cdb[..10], &mut DataDir::None, &mut sense).unwrap();
        assert_eq!((hdr.dxfer_direction, hdr.cmd_len), (SG_DXFER_NONE, 10));
        assert!(header(&[0u8; 17], &mut DataDir::None, &mut sense).is_err());
    }

    fn answered(status: u8, host: u16, driver: u16, sb_len_wr: u8) -> SgIoHdr {
        let mut sense = [0u8; 4];
        let mut hdr = header(&[0u8; 6], &mut DataDir::None, &mut sense).unwrap();
        hdr.status = status;
        hdr.host_status = host;
        hdr.driver_status = driver;
        hdr.sb_len_wr = sb_len_wr;
        hdr
    }

    #[test]
    fn kernel_answers_map_to_statuses_and_transport_errors() {
        let sense = [
            0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0,
        ];
        let ok = outcome(&answered(0x02, 0, 0x08, 18), &sense).unwrap();
        assert_eq!(ok.status, 0x02);
        assert_eq!(ok.sense, sense);
        let conflict = outcome(&answered(0, DID_NEXUS_FAILURE, 0, 0), &sense).unwrap();
        assert_eq!(conflict.status, 0x18);
        assert!(matches!(
            outcome(&answered(0, DID_TIME_OUT, 0, 0), &sense),
            Err(TransportError::Timeout(_))
        ));
        let lost = outcome(&answered(0, 0x01, 0, 0), &sense).unwrap_err();
        assert!(lost.to_string().contains("DID_NO_CONNECT"), "{lost}");
        // A sense length beyond the buffer is cut to the buffer.
        assert_eq!(
            outcome(&answered(2, 0, 0, 200), &sense[..4])
                .unwrap()
                .sense
                .len(),
            4
        );
    }

    #[test]
    fn a_regular_file_is_not_a_scsi_device() {
        let img = tempfile::NamedTempFile::new().unwrap();
        assert!(!answers_sg_io(img.path()));
        let err = SgTransport::open(img.path(), OpenMode::ReadOnly)
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("not a SCSI device: SG_IO refused (ENOTTY)"),
            "{text}"
        );
        assert_eq!(err.errno(), libc::ENODEV);
    }

    /// A loop device, where the machine lets us make one (needs root and loop).
    #[test]
    fn a_loop_device_is_not_a_scsi_device() {
        let Ok(path) = std::env::var("ATSFS_TEST_BLOCK_DEVICE") else {
            eprintln!("skipped: no block device (set ATSFS_TEST_BLOCK_DEVICE to a loop device)");
            return;
        };
        assert!(!answers_sg_io(Path::new(&path)));
        let err = SgTransport::open(Path::new(&path), OpenMode::ReadOnly)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a SCSI device"), "{err}");
    }

    #[test]
    fn sg_io_hdr_matches_the_kernel_header() {
        if !Path::new("/usr/include/scsi/sg.h").exists() {
            eprintln!("skipped: no /usr/include/scsi/sg.h");
            return;
        }
        let Some(c) = crate::lun::c_program_output(
            r#"#include <stdio.h>
#include <stddef.h>
#include <scsi/sg.h>
#define H sg_io_hdr_t
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(H),
    offsetof(H, dxfer_len), offsetof(H, dxferp), offsetof(H, cmdp), offsetof(H, sbp),
    offsetof(H, timeout), offsetof(H, usr_ptr), offsetof(H, status), offsetof(H, sb_len_wr),
    offsetof(H, host_status), offsetof(H, driver_status), offsetof(H, resid),
    offsetof(H, duration), offsetof(H, info), offsetof(H, mx_sb_len));
  return 0;
}
"#,
        ) else {
            eprintln!("skipped: no C compiler to check the layout with");
            return;
        };
        let rust = format!(
            "{} {} {} {} {} {} {} {} {} {} {} {} {} {} {}\n",
            size_of::<SgIoHdr>(),
            offset_of!(SgIoHdr, dxfer_len),
            offset_of!(SgIoHdr, dxferp),
            offset_of!(SgIoHdr, cmdp),
            offset_of!(SgIoHdr, sbp),
            offset_of!(SgIoHdr, timeout),
            offset_of!(SgIoHdr, usr_ptr),
            offset_of!(SgIoHdr, status),
            offset_of!(SgIoHdr, sb_len_wr),
            offset_of!(SgIoHdr, host_status),
            offset_of!(SgIoHdr, driver_status),
            offset_of!(SgIoHdr, resid),
            offset_of!(SgIoHdr, duration),
            offset_of!(SgIoHdr, info),
            offset_of!(SgIoHdr, mx_sb_len),
        );
        assert_eq!(rust, c);
    }
}
