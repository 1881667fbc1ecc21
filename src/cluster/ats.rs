//! Which test-and-set a volume uses, and whether a host's device can do it.
//!
//! A volume is made for one kind of ATS (`Superblock::ats_mode`) and every host that
//! writes it must use that kind: the two kinds are not atomic against each other.
//! Emulated ATS is a read, compare and write under an OFD lock of this kernel; the
//! storage's COMPARE AND WRITE does not take that lock, and the OFD lock does not
//! stop the storage's COMPARE AND WRITE. So a host of one kind can read a lock
//! record, another host of the other kind can take the lock, and the first can write
//! over it: two owners of one lock. Both directions are unsafe as soon as the kinds
//! mix; a hardware volume is the more exposed (nothing else stops an emulated host
//! there, while an emulated volume's one-kernel boot-id rule at least keeps out hosts
//! of other kernels), but one kernel can open the same storage both ways (its image
//! file and an iSCSI session to a target serving it), so both are refused.
//!
//! A device with no compare-and-write at all (`AtsKind::Plain`: a plain disk) can
//! serve a Disk Paxos volume only; on such a volume every host takes the token over
//! plain reads and writes whatever its device does (`cluster::paxos::mounted_lun`).
//!
//! `check_ats_mode` is the one check. Everything that writes the volume or takes its
//! locks calls it: mount (`Fs::mount`), `atsfs recover` and `atsfs fsck --repair`.
//! Read-only tools (fsck, status, locks) do not refuse; `status` shows whether the
//! opener matches.

use crate::format::{Superblock, ATS_MODE_DISK_PAXOS, ATS_MODE_EMULATED, ATS_MODE_HARDWARE};
use crate::lun::{AtsKind, Lun};
use thiserror::Error;

/// The ATS kind a volume was made for; `None` for a mode this code does not know
/// (a decoded superblock never has one).
pub fn volume_ats_kind(sb: &Superblock) -> Option<AtsKind> {
    match sb.ats_mode {
        ATS_MODE_EMULATED => Some(AtsKind::Emulated),
        ATS_MODE_HARDWARE => Some(AtsKind::Hardware),
        ATS_MODE_DISK_PAXOS => Some(AtsKind::DiskPaxos),
        _ => None,
    }
}

/// How people read an ATS kind: "hardware (SCSI COMPARE AND WRITE)" or "emulated
/// (one kernel only)".
pub fn describe_ats_kind(kind: AtsKind) -> &'static str {
    match kind {
        AtsKind::Hardware => "hardware (SCSI COMPARE AND WRITE)",
        AtsKind::Emulated => "emulated (one kernel only)",
        AtsKind::DiskPaxos => "Disk Paxos (a token over plain sector reads and writes)",
        AtsKind::Plain => "none (no compare-and-write: a plain disk)",
    }
}

/// A host's device cannot do the volume's kind of ATS.
#[derive(Debug, Error)]
pub enum AtsMismatch {
    #[error(
        "{device} holds a volume made for hardware ATS (SCSI COMPARE AND WRITE), but this \
         host opens it with emulated ATS (a file lock of this kernel around read, compare and \
         write): that is not atomic against the other hosts' COMPARE AND WRITE, and two hosts \
         could own one lock. Open the volume through a device that does COMPARE AND WRITE \
         (its iSCSI URL, or a SCSI disk reachable with SG_IO), not through the target's \
         backing image file or a block device without SG_IO"
    )]
    HardwareVolume { device: String },
    #[error(
        "{device} holds a volume made for emulated ATS (file locks of one kernel), but this \
         host opens it with hardware ATS (SCSI COMPARE AND WRITE): the storage's COMPARE AND \
         WRITE does not take the file locks the other hosts rely on, so the two are not \
         atomic against each other. Open the volume by the path the other hosts use (the \
         image file or block device), or, if every host can use hardware ATS, copy the files \
         off, unmount every host and run mkfs.atsfs --ats hardware (it erases the volume)"
    )]
    EmulatedVolume { device: String },
    #[error(
        "{device} holds a volume made for Disk Paxos test-and-set (a token taken with plain \
         sector reads and writes), but this host opens it without the token: its \
         compare-and-writes would not be atomic against the other hosts'. Mount it with an \
         atsfs that takes the Disk Paxos token"
    )]
    DiskPaxosVolume { device: String },
    #[error(
        "{device} holds a volume made for {volume} ATS, but this device has no \
         compare-and-write at all (a plain disk: a SCSI disk without COMPARE AND WRITE, or \
         an image file or block device opened with ATSFS_ATS_EMULATION=off). Open the \
         volume the way its other hosts do; only a Disk Paxos volume works on a plain disk"
    )]
    NoCompareAndWrite {
        device: String,
        volume: &'static str,
    },
    #[error("{device}: the volume's ATS mode {mode} is unknown; use a newer atsfs")]
    Unknown { device: String, mode: u32 },
}

/// Refuses a device whose ATS kind is not the volume's. Call before writing the
/// volume or taking any of its locks.
pub fn check_ats_mode(lun: &dyn Lun, sb: &Superblock) -> Result<(), AtsMismatch> {
    let device = lun.describe();
    match (volume_ats_kind(sb), lun.ats_kind()) {
        (Some(volume), opener) if volume == opener => Ok(()),
        (Some(volume), AtsKind::Plain) if volume != AtsKind::DiskPaxos => {
            Err(AtsMismatch::NoCompareAndWrite {
                device,
                volume: volume.name(),
            })
        }
        (Some(AtsKind::Hardware), _) => Err(AtsMismatch::HardwareVolume { device }),
        (Some(AtsKind::Emulated), _) => Err(AtsMismatch::EmulatedVolume { device }),
        (Some(AtsKind::DiskPaxos), _) => Err(AtsMismatch::DiskPaxosVolume { device }),
        // A volume never records "no compare-and-write" (`volume_ats_kind`).
        (Some(AtsKind::Plain), _) | (None, _) => Err(AtsMismatch::Unknown {
            device,
            mode: sb.ats_mode,
        }),
    }
}
