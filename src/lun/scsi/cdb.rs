//! Command descriptor blocks and the parameter data atsfs sends and parses (SBC-3,
//! SPC-4). Pure functions: no I/O. Device replies are input: every parser checks
//! lengths and returns `None` or a short list rather than panic.

// SCSI fields are big endian on the wire (SPC-4 3.5); the crate-wide lint against
// big-endian conversions is for atsfs's own on-disk format.
#![allow(clippy::big_endian_bytes)]

use crate::lun::reservations::{
    Reservation, ReservationCapabilities, ReservationKey, ReservationType,
};

pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8A;
pub const COMPARE_AND_WRITE: u8 = 0x89;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
pub const SA_READ_CAPACITY_16: u8 = 0x10;
pub const INQUIRY: u8 = 0x12;
pub const MAINTENANCE_IN: u8 = 0xA3;
pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
pub const TEST_UNIT_READY: u8 = 0x00;

/// The Block Limits VPD page (SBC-3 6.5.3).
pub const VPD_BLOCK_LIMITS: u8 = 0xB0;

/// Service actions of PERSISTENT RESERVE IN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrIn {
    ReadKeys = 0x00,
    ReadReservation = 0x01,
    ReportCapabilities = 0x02,
}

/// Service actions of PERSISTENT RESERVE OUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrOut {
    Register = 0x00,
    Reserve = 0x01,
    Release = 0x02,
    Preempt = 0x04,
    PreemptAndAbort = 0x05,
    RegisterAndIgnoreExistingKey = 0x06,
}

/// Length of the basic PERSISTENT RESERVE OUT parameter list.
pub const PR_OUT_PARAMETER_BYTES: usize = 24;

fn lba_cdb16(opcode: u8, lba: u64) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = opcode;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb
}

/// READ(16) of `blocks` logical blocks at `lba`.
pub fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = lba_cdb16(READ_16, lba);
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// WRITE(16) of `blocks` logical blocks at `lba`.
pub fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = lba_cdb16(WRITE_16, lba);
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// COMPARE AND WRITE of `blocks` logical blocks at `lba`; the data-out buffer is the
/// expected blocks followed by the new ones (2 × blocks × block size bytes).
pub fn compare_and_write(lba: u64, blocks: u8) -> [u8; 16] {
    let mut cdb = lba_cdb16(COMPARE_AND_WRITE, lba);
    cdb[13] = blocks;
    cdb
}

/// SYNCHRONIZE CACHE(16) of the whole device (LBA 0, NUMBER OF BLOCKS 0 = to the end),
/// without IMMED: the reply comes when the cache is on the medium.
pub fn synchronize_cache16() -> [u8; 16] {
    lba_cdb16(SYNCHRONIZE_CACHE_16, 0)
}

/// SYNCHRONIZE CACHE(10) of the whole device, for devices without the 16-byte form.
pub fn synchronize_cache10() -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = SYNCHRONIZE_CACHE_10;
    cdb
}

/// Bytes atsfs asks for in READ CAPACITY(16).
pub const READ_CAPACITY_16_BYTES: usize = 32;

/// READ CAPACITY(16).
pub fn read_capacity16() -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = SERVICE_ACTION_IN_16;
    cdb[1] = SA_READ_CAPACITY_16;
    cdb[10..14].copy_from_slice(&(READ_CAPACITY_16_BYTES as u32).to_be_bytes());
    cdb
}

/// What READ CAPACITY(16) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub last_lba: u64,
    pub logical_block_bytes: u32,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
    pub physical_exponent: u8,
}

pub fn parse_read_capacity16(data: &[u8]) -> Option<Capacity> {
    let last_lba = u64::from_be_bytes(data.get(0..8)?.try_into().ok()?);
    let logical_block_bytes = u32::from_be_bytes(data.get(8..12)?.try_into().ok()?);
    let physical_exponent = data.get(13)? & 0x0F;
    Some(Capacity {
        last_lba,
        logical_block_bytes,
        physical_exponent,
    })
}

/// INQUIRY of a VPD page.
pub fn inquiry_vpd(page: u8, allocation: u16) -> [u8; 6] {
    let mut cdb = [0u8; 6];
    cdb[0] = INQUIRY;
    cdb[1] = 0x01;
    cdb[2] = page;
    cdb[3..5].copy_from_slice(&allocation.to_be_bytes());
    cdb
}

/// MAXIMUM COMPARE AND WRITE LENGTH of the Block Limits VPD page (in logical blocks;
/// 0 = the device states no limit). `None` when the reply is not that page.
pub fn parse_max_caw_blocks(page: &[u8]) -> Option<u8> {
    if page.get(1) != Some(&VPD_BLOCK_LIMITS) {
        return None;
    }
    page.get(5).copied()
}

/// REPORT SUPPORTED OPERATION CODES for one command without service action
/// (REPORTING OPTIONS 001b).
pub fn report_supported_opcode(opcode: u8, allocation: u32) -> [u8; 12] {
    let mut cdb = [0u8; 12];
    cdb[0] = MAINTENANCE_IN;
    cdb[1] = SA_REPORT_SUPPORTED_OPCODES;
    cdb[2] = 0x01;
    cdb[3] = opcode;
    cdb[6..10].copy_from_slice(&allocation.to_be_bytes());
    cdb
}

/// What a device says about one operation code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcodeSupport {
    Supported,
    NotSupported,
    /// The device has no data about it (SUPPORT 000b) or answered something else.
    Unknown,
}

/// The SUPPORT field of a one-command RSOC reply (byte 1, bits 2..0).
pub fn parse_opcode_support(data: &[u8]) -> OpcodeSupport {
    match data.get(1).map(|b| b & 0x07) {
        Some(0b001) => OpcodeSupport::NotSupported,
        Some(0b011) | Some(0b101) => OpcodeSupport::Supported,
        _ => OpcodeSupport::Unknown,
    }
}

/// PERSISTENT RESERVE IN with `allocation` bytes.
pub fn pr_in(action: PrIn, allocation: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = PERSISTENT_RESERVE_IN;
    cdb[1] = action as u8;
    cdb[7..9].copy_from_slice(&allocation.to_be_bytes());
    cdb
}

/// PERSISTENT RESERVE OUT, LU scope, with the basic 24-byte parameter list.
pub fn pr_out(action: PrOut, kind: ReservationType) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = PERSISTENT_RESERVE_OUT;
    cdb[1] = action as u8;
    cdb[2] = kind.code() & 0x0F;
    cdb[5..9].copy_from_slice(&(PR_OUT_PARAMETER_BYTES as u32).to_be_bytes());
    cdb
}

/// The PR OUT parameter list: RESERVATION KEY, SERVICE ACTION RESERVATION KEY, and
/// no flags (no SPEC_I_PT, ALL_TG_PT or APTPL).
pub fn pr_out_parameters(key: u64, service_action_key: u64) -> [u8; PR_OUT_PARAMETER_BYTES] {
    let mut data = [0u8; PR_OUT_PARAMETER_BYTES];
    data[0..8].copy_from_slice(&key.to_be_bytes());
    data[8..16].copy_from_slice(&service_action_key.to_be_bytes());
    data
}

fn be_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

/// READ KEYS: the keys listed, as far as both the ADDITIONAL LENGTH and the buffer
/// go. Returns the list and whether it was cut short by the buffer.
pub fn parse_read_keys(data: &[u8]) -> Option<(Vec<ReservationKey>, bool)> {
    let additional = be_u32(data, 4)? as usize;
    let listed = additional / 8;
    let fit = data.len().saturating_sub(8) / 8;
    let keys = (0..listed.min(fit))
        .filter_map(|i| be_u64(data, 8 + 8 * i).map(ReservationKey))
        .collect();
    Some((keys, listed > fit))
}

/// READ RESERVATION: the reservation, or `None` inside when there is none.
pub fn parse_read_reservation(data: &[u8]) -> Option<Option<Reservation>> {
    let additional = be_u32(data, 4)?;
    if additional == 0 {
        return Some(None);
    }
    let key = be_u64(data, 8)?;
    let kind = data.get(21)? & 0x0F;
    Some(Some(Reservation {
        key: ReservationKey(key),
        kind: ReservationType::from_code(kind),
    }))
}

/// REPORT CAPABILITIES.
pub fn parse_report_capabilities(data: &[u8]) -> Option<ReservationCapabilities> {
    let flags = *data.get(2)?;
    let more = *data.get(3)?;
    let mask_hi = *data.get(4)?;
    let mask_lo = *data.get(5)?;
    Some(ReservationCapabilities {
        compatible_reservation_handling: flags & 0x10 != 0,
        ptpl_capable: flags & 0x01 != 0,
        ptpl_active: more & 0x01 != 0,
        type_mask_valid: more & 0x80 != 0,
        write_exclusive_all_registrants: mask_hi & 0x80 != 0,
        exclusive_access_registrants_only: mask_hi & 0x40 != 0,
        write_exclusive_registrants_only: mask_hi & 0x20 != 0,
        exclusive_access: mask_hi & 0x08 != 0,
        write_exclusive: mask_hi & 0x02 != 0,
        exclusive_access_all_registrants: mask_lo & 0x01 != 0,
    })
}
