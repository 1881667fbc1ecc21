//! Opening a device by name: the one place that turns what a user typed (a path or
//! an `iscsi://` URL) into a LUN. Every command (mount, mkfs, fsck, status, locks,
//! recover, ats-selftest) opens its device here.

use super::{FileLun, Lun, LunResult, OpenMode};
use std::path::Path;
use std::sync::Arc;

/// What kind of device a name names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// An image file or a block device, through the kernel (`FileLun`).
    File,
}

/// Tells what kind of device `name` names, without opening it.
pub fn device_kind(name: &Path) -> DeviceKind {
    let _ = name;
    DeviceKind::File
}

/// Opens the device `name` names.
pub fn open_device(name: &Path, mode: OpenMode) -> LunResult<Arc<dyn Lun>> {
    match device_kind(name) {
        DeviceKind::File => Ok(Arc::new(FileLun::open(name, mode)?)),
    }
}
