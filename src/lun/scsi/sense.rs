//! Sense data (SPC-4 4.5): fixed (0x70/0x71) and descriptor (0x72/0x73) formats.
//!
//! Sense bytes come from the device: a short or odd buffer is parsed as far as it
//! goes and never panics.

// SCSI fields are big endian on the wire (SPC-4 3.5); the crate-wide lint against
// big-endian conversions is for atsfs's own on-disk format.
#![allow(clippy::big_endian_bytes)]

use std::fmt;

pub const NO_SENSE: u8 = 0x0;
pub const RECOVERED_ERROR: u8 = 0x1;
pub const NOT_READY: u8 = 0x2;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const HARDWARE_ERROR: u8 = 0x4;
pub const ILLEGAL_REQUEST: u8 = 0x5;
pub const UNIT_ATTENTION: u8 = 0x6;
pub const DATA_PROTECT: u8 = 0x7;
pub const ABORTED_COMMAND: u8 = 0xB;
pub const MISCOMPARE: u8 = 0xE;

/// ASC/ASCQ pairs atsfs acts on.
pub const ASC_INVALID_OPCODE: (u8, u8) = (0x20, 0x00);
pub const ASC_LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
pub const ASC_INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
pub const ASC_MISCOMPARE_DURING_VERIFY: (u8, u8) = (0x1D, 0x00);
pub const ASC_BECOMING_READY: (u8, u8) = (0x04, 0x01);
pub const ASC_REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);
pub const ASC_RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);

/// Parsed sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense {
    /// The response code (0x70..=0x73).
    pub response_code: u8,
    /// The sense reports an error of an earlier command (0x71/0x73): for example a
    /// write that failed after the device had acknowledged it.
    pub deferred: bool,
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field where the device marked it valid (for a MISCOMPARE of
    /// COMPARE AND WRITE: the offset of the first differing byte).
    pub information: Option<u64>,
}

impl Sense {
    /// Parses fixed or descriptor sense; `None` for an empty buffer or an unknown
    /// response code.
    pub fn parse(bytes: &[u8]) -> Option<Sense> {
        let code = *bytes.first()? & 0x7F;
        match code {
            0x70 | 0x71 => Some(Self::parse_fixed(bytes, code)),
            0x72 | 0x73 => Some(Self::parse_descriptor(bytes, code)),
            _ => None,
        }
    }

    fn parse_fixed(bytes: &[u8], code: u8) -> Sense {
        let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
        let valid = bytes.first().is_some_and(|b| b & 0x80 != 0);
        let information = match bytes.get(3..7) {
            Some(info) if valid => {
                let mut raw = [0u8; 4];
                raw.copy_from_slice(info);
                Some(u64::from(u32::from_be_bytes(raw)))
            }
            _ => None,
        };
        Sense {
            response_code: code,
            deferred: code == 0x71,
            key: at(2) & 0x0F,
            asc: at(12),
            ascq: at(13),
            information,
        }
    }

    fn parse_descriptor(bytes: &[u8], code: u8) -> Sense {
        let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
        let additional = usize::from(at(7));
        let end = bytes.len().min(8 + additional);
        let mut information = None;
        let mut pos = 8;
        // Each descriptor: type, additional length, body; bounded by the buffer.
        while pos + 2 <= end {
            let kind = bytes[pos];
            let len = usize::from(bytes[pos + 1]);
            let body_end = (pos + 2 + len).min(end);
            // Information descriptor: VALID bit, reserved, 8-byte INFORMATION.
            if kind == 0x00 && body_end >= pos + 12 && bytes[pos + 2] & 0x80 != 0 {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes[pos + 4..pos + 12]);
                information = Some(u64::from_be_bytes(raw));
            }
            pos = pos + 2 + len;
        }
        Sense {
            response_code: code,
            deferred: code == 0x73,
            key: at(1) & 0x0F,
            asc: at(2),
            ascq: at(3),
            information,
        }
    }

    pub fn asc_ascq(&self) -> (u8, u8) {
        (self.asc, self.ascq)
    }

    /// A MISCOMPARE of COMPARE AND WRITE (key 0x0E, 0x1D/0x00).
    pub fn is_miscompare(&self) -> bool {
        self.key == MISCOMPARE && self.asc_ascq() == ASC_MISCOMPARE_DURING_VERIFY
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE: the device lacks the command.
    pub fn is_invalid_opcode(&self) -> bool {
        self.key == ILLEGAL_REQUEST && self.asc_ascq() == ASC_INVALID_OPCODE
    }
}

/// Names of sense keys.
pub fn key_name(key: u8) -> &'static str {
    match key {
        NO_SENSE => "NO SENSE",
        RECOVERED_ERROR => "RECOVERED ERROR",
        NOT_READY => "NOT READY",
        MEDIUM_ERROR => "MEDIUM ERROR",
        HARDWARE_ERROR => "HARDWARE ERROR",
        ILLEGAL_REQUEST => "ILLEGAL REQUEST",
        UNIT_ATTENTION => "UNIT ATTENTION",
        DATA_PROTECT => "DATA PROTECT",
        0x8 => "BLANK CHECK",
        0x9 => "VENDOR SPECIFIC",
        0xA => "COPY ABORTED",
        ABORTED_COMMAND => "ABORTED COMMAND",
        0xD => "VOLUME OVERFLOW",
        MISCOMPARE => "MISCOMPARE",
        _ => "RESERVED",
    }
}

/// A few ASC/ASCQ texts atsfs's users are likely to meet, with what to do.
fn asc_text(asc: u8, ascq: u8) -> Option<&'static str> {
    Some(match (asc, ascq) {
        (0x04, 0x01) => "logical unit is in process of becoming ready",
        (0x04, _) => "logical unit not ready",
        (0x11, _) => "unrecovered read error",
        (0x0C, _) => "write error",
        (0x1D, 0x00) => "miscompare during verify operation",
        (0x20, 0x00) => "invalid command operation code (the device lacks this command)",
        (0x21, 0x00) => "logical block address out of range",
        (0x24, 0x00) => "invalid field in CDB",
        (0x25, 0x00) => "logical unit not supported (check the LUN number)",
        (0x26, _) => "invalid field in parameter list",
        (0x27, _) => "write protected (make the LUN writable on the storage)",
        (0x28, 0x00) => "not ready to ready change, medium may have changed",
        (0x29, _) => "power on, reset, or bus device reset occurred",
        (0x2A, 0x01) => "mode parameters changed",
        (0x2A, 0x03) => "reservations preempted",
        (0x2A, 0x04) => "reservations released",
        (0x2A, 0x05) => "registrations preempted",
        (0x2A, 0x09) => "capacity data has changed",
        (0x3F, 0x0E) => "reported LUNs data has changed",
        (0x44, _) => "internal target failure",
        (0x47, _) => "SCSI parity error",
        (0x55, _) => "system resource failure",
        _ => return None,
    })
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.deferred {
            write!(
                f,
                "deferred error (an earlier command failed after it was acknowledged): "
            )?;
        }
        write!(
            f,
            "{} (key {:#x}), ASC/ASCQ {:#04x}/{:#04x}",
            key_name(self.key),
            self.key,
            self.asc,
            self.ascq
        )?;
        if let Some(text) = asc_text(self.asc, self.ascq) {
            write!(f, ": {text}")?;
        }
        Ok(())
    }
}
