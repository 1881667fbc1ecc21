//! Opening a device by name: the one place that turns what a user typed (a path or
//! an `iscsi://` URL) into a LUN. Every command (mount, mkfs, fsck, status, locks,
//! recover, ats-selftest) opens its device here.
//!
//! - `iscsi://...` is an iSCSI LUN through libiscsi (`ScsiLun<IscsiTransport>`).
//! - A path that answers SG_IO (a SCSI disk `/dev/sdX`, a SCSI generic node
//!   `/dev/sgN`, a device-mapper node over SCSI paths) is a `ScsiLun<SgTransport>`:
//!   every command, data included, goes through SG_IO (docs/scsi.md says why).
//!   Partitions and partial device-mapper maps are files: SG_IO on them would address
//!   the whole disk.
//! - Anything else (an image file, a loop, virtio or NVMe device) is a `FileLun`,
//!   with compare-and-write emulated, unless `ATSFS_ATS_EMULATION=off` is set: then
//!   it has no compare-and-write at all (`PlainDisk`), as two VMs on one plain
//!   shared disk see it; only a Disk Paxos volume works there.

use super::scsi::ScsiLun;
use super::sg::{self, SgTransport};
use super::{
    AtsKind, Caw, FileLun, IscsiTransport, Lun, LunError, LunResult, OpenMode, Reservations,
};
use std::path::Path;
use std::sync::Arc;

/// What kind of device a name names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// An image file or a block device, through the kernel (`FileLun`).
    File,
    /// An `iscsi://` URL (libiscsi).
    Iscsi,
    /// A device node that answers SCSI commands through SG_IO.
    Sg,
}

/// Tells what kind of device `name` names. A path is asked whether it answers SG_IO
/// (an INQUIRY-free ioctl probe: SG_GET_VERSION_NUM on a node opened read-only).
pub fn device_kind(name: &Path) -> DeviceKind {
    if name.to_str().is_some_and(|s| s.starts_with("iscsi://")) {
        return DeviceKind::Iscsi;
    }
    if sg::answers_sg_io(name) {
        return DeviceKind::Sg;
    }
    DeviceKind::File
}

/// Opens the device `name` names.
pub fn open_device(name: &Path, mode: OpenMode) -> LunResult<Arc<dyn Lun>> {
    match device_kind(name) {
        DeviceKind::File if emulation_off() => {
            Ok(Arc::new(PlainDisk(Arc::new(FileLun::open(name, mode)?))))
        }
        DeviceKind::File => Ok(Arc::new(FileLun::open(name, mode)?)),
        DeviceKind::Iscsi => {
            let url = name.to_string_lossy();
            let transport = IscsiTransport::connect(&url)?;
            Ok(Arc::new(ScsiLun::open(transport, mode)?))
        }
        DeviceKind::Sg => {
            let transport = SgTransport::open(name, mode)?;
            let lun = ScsiLun::open(transport, mode)?;
            sg::check_same_size(name, lun.len_bytes())?;
            Ok(Arc::new(lun))
        }
    }
}

/// The environment variable that turns the emulated compare-and-write off.
pub const ATS_EMULATION_ENV: &str = "ATSFS_ATS_EMULATION";

fn emulation_off() -> bool {
    std::env::var(ATS_EMULATION_ENV).is_ok_and(|v| v == "off")
}

/// A device without any compare-and-write: a plain shared disk. Every
/// compare-and-write fails with `NoCompareAndWrite`; everything else passes through.
pub struct PlainDisk(pub Arc<dyn Lun>);

impl Lun for PlainDisk {
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.0.write_at(buf, offset)
    }
    fn compare_and_write(&self, _offset: u64, _expected: &[u8], _new: &[u8]) -> LunResult<Caw> {
        Err(LunError::NoCompareAndWrite {
            device: self.describe(),
            detail: format!("{ATS_EMULATION_ENV}=off"),
        })
    }
    fn flush(&self) -> LunResult<()> {
        self.0.flush()
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.0.read_uncached(buf, offset)
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.0.write_uncached(buf, offset)
    }
    fn may_write(&self) -> LunResult<()> {
        self.0.may_write()
    }
    fn describe(&self) -> String {
        format!("{} (no compare-and-write)", self.0.describe())
    }
    fn ats_kind(&self) -> AtsKind {
        AtsKind::Plain
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        self.0.reservations()
    }
}

/// `name` as messages, logs and the mount table show it: an `iscsi://` URL without
/// its password (CHAP secrets never reach /proc/mounts or a log).
pub fn display_name(name: &Path) -> String {
    let shown = name.display().to_string();
    if name.to_str().is_some_and(|s| s.starts_with("iscsi://")) {
        super::iscsi::redact_url(&shown)
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_apart() {
        assert_eq!(
            device_kind(Path::new("iscsi://127.0.0.1/iqn.2026-12.org.atsfs:t/1")),
            DeviceKind::Iscsi
        );
        let img = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(device_kind(img.path()), DeviceKind::File);
        assert_eq!(device_kind(Path::new("/nonexistent/x")), DeviceKind::File);
    }

    #[test]
    fn a_device_name_is_shown_without_its_chap_password() {
        let url = Path::new("iscsi://alice%s3cret@10.0.0.1:3260/iqn.2003-01.org.x:t/1");
        let shown = display_name(url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("alice@10.0.0.1:3260/iqn.2003-01.org.x:t/1"),
            "{shown}"
        );
        assert_eq!(display_name(Path::new("/srv/a.img")), "/srv/a.img");
    }
}
