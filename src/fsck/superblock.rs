//! The superblock: the primary in block 0, the backup in the volume's last block.
//!
//! A primary that decodes and describes a possible layout is used; else the backup
//! (found where the device ends, as mount looks for it), and the damaged primary is a
//! problem. Neither usable is an error: there is nothing to check.

use super::report::{FsckReport, ProblemKind};
use crate::format::{FormatError, Geometry, OnDisk, Superblock, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::lun::Lun;
use anyhow::{bail, Context, Result};

/// Reads the superblock to check the volume by, reporting what is wrong with the
/// primary and the backup.
pub(crate) fn load(lun: &dyn Lun, report: &mut FsckReport) -> Result<Superblock> {
    let device = lun.describe();
    let device_blocks = lun.len_bytes() / BLOCK_SIZE_U64;
    if device_blocks < 2 {
        bail!(
            "{device} is too small ({} bytes) to hold an atsfs volume",
            lun.len_bytes()
        );
    }
    let primary = read_candidate(lun, 0, device_blocks)?;
    let primary_err = match primary {
        Ok(sb) => {
            check_backup(lun, &sb, report)?;
            report.superblock = "primary".into();
            return Ok(sb);
        }
        Err(e) => e,
    };
    let last = device_blocks - 1;
    match read_candidate(lun, last, device_blocks)? {
        Ok(sb) => {
            report.problem(
                ProblemKind::PrimarySuperblockDamaged,
                Some(0),
                None,
                format!("primary superblock damaged ({primary_err}); checked with the backup in block {last}"),
            );
            report.superblock = format!("backup in block {last}");
            Ok(sb)
        }
        Err(backup_err) => {
            bail!("{device}: no usable atsfs superblock\n  primary (block 0): {primary_err}\n  backup (block {last}): {backup_err}")
        }
    }
}

/// Reads and checks a superblock at `block`: Ok(Err(why)) when it is not usable.
fn read_candidate(
    lun: &dyn Lun,
    block: u64,
    device_blocks: u64,
) -> Result<std::result::Result<Superblock, String>> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut buf, block * BLOCK_SIZE_U64)
        .with_context(|| format!("reading block {block} of {}", lun.describe()))?;
    let sb = match Superblock::decode(&buf, block) {
        Ok(sb) => sb,
        Err(FormatError::Unsupported(what)) => {
            bail!("{}: {what}; use a newer atsfs", lun.describe())
        }
        Err(e) => return Ok(Err(e.to_string())),
    };
    let geo = Geometry::from_superblock(&sb);
    if let Err(reason) = geo.check() {
        return Ok(Err(format!("impossible layout: {reason}")));
    }
    if sb.total_blocks > device_blocks {
        return Ok(Err(format!(
            "the volume has {} blocks but the device only {device_blocks} (truncated image or wrong device)",
            sb.total_blocks
        )));
    }
    if sb.root_ino >= sb.total_blocks {
        return Ok(Err(format!("root inode {} past the volume", sb.root_ino)));
    }
    Ok(Ok(sb))
}

/// The backup must be present and equal to the primary except for its block number.
fn check_backup(lun: &dyn Lun, sb: &Superblock, report: &mut FsckReport) -> Result<()> {
    let geo = Geometry::from_superblock(sb);
    let at = geo.backup_superblock();
    let mut buf = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut buf, at * BLOCK_SIZE_U64)
        .with_context(|| format!("reading block {at} of {}", lun.describe()))?;
    let message = match Superblock::decode(&buf, at) {
        Err(e) => format!("backup superblock missing or damaged: {e}"),
        Ok(backup) => {
            let mut same = backup;
            same.self_block = sb.self_block;
            same.crc = sb.crc;
            if same == *sb {
                return Ok(());
            }
            "backup superblock differs from the primary".to_string()
        }
    };
    report.problem(ProblemKind::BackupSuperblock, Some(at), None, message);
    Ok(())
}
