//! On-disk format v1: structs, checksums, encode/decode/validate. No I/O.
//!
//! `docs/format.md` is the specification; `layout_tables()` lists every struct's field
//! offsets from the code, and a test checks the doc's byte tables against it.
//!
//! Invariants:
//! - All multi-byte integers are little endian (the crate denies other conversions).
//! - Every structure starts with `magic: u32` and `crc: u32`; the CRC-32 (IEEE) covers
//!   the whole structure with the crc field zeroed. Metadata blocks also carry their
//!   own block number, so a misdirected or torn write is detected, never trusted.
//! - Decoding never panics on bad bytes: it returns `FormatError::Corrupted` naming
//!   the block.

mod geometry;
mod structs;

pub use geometry::{paxos_blocks_for, Geometry, GeometryError, MkfsParams, SLOT_SECTORS};
pub use structs::*;

use bytemuck::{Pod, Zeroable};
use thiserror::Error;

/// Size of every block: metadata blocks, data blocks, journal blocks.
pub const BLOCK_SIZE: usize = 4096;
/// `BLOCK_SIZE` as a u64, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Size of the body of a locked resource (inode, allocation group header). The lock
/// record takes the first ATS sector of the resource; the body follows it.
pub const RESOURCE_BODY_SIZE: usize = 3584;
/// Blocks covered by one allocation group: one bitmap block holds one bit per block.
pub const AG_BLOCKS: u64 = (BLOCK_SIZE * 8) as u64;
/// The on-disk format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest file name, as on ext4.
pub const NAME_MAX: usize = 255;
/// Most hosts a volume can have (one bit per slot in a lock record's shared set).
pub const HOSTS_MAX: u32 = 64;

/// A block number on the volume (unit: `BLOCK_SIZE`).
pub type BlockNo = u64;

/// Errors from decoding or validating on-disk bytes.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("corrupted {what} at block {block}: {reason}")]
    Corrupted {
        what: &'static str,
        block: BlockNo,
        reason: String,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl FormatError {
    pub fn corrupted(what: &'static str, block: BlockNo, reason: impl Into<String>) -> Self {
        FormatError::Corrupted {
            what,
            block,
            reason: reason.into(),
        }
    }
}

/// Makes a four-byte magic from its ASCII spelling, stored little endian.
pub const fn magic(tag: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*tag)
}

/// A structure that lives on disk: a Pod with `magic` at byte 0 and `crc` at byte 4.
pub trait OnDisk: Pod {
    const MAGIC: u32;
    /// Human name used in errors ("inode", "superblock").
    const WHAT: &'static str;

    /// The block number the structure claims to live at, if it records one.
    fn self_block(&self) -> Option<BlockNo> {
        None
    }

    /// Field-level checks beyond magic, CRC and block number.
    fn validate_fields(&self, _block: BlockNo) -> Result<(), FormatError> {
        Ok(())
    }

    /// Sets the CRC and returns the bytes to write.
    fn seal(&mut self) {
        set_crc(self);
    }

    /// Decodes `bytes` (at least `size_of::<Self>()`) found at `block`, checking magic,
    /// CRC, self block number and fields.
    fn decode(bytes: &[u8], block: BlockNo) -> Result<Self, FormatError> {
        let size = std::mem::size_of::<Self>();
        let Some(raw) = bytes.get(..size) else {
            return Err(FormatError::corrupted(Self::WHAT, block, "short buffer"));
        };
        let value: Self = bytemuck::pod_read_unaligned(raw);
        let found_magic = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if found_magic != Self::MAGIC {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("bad magic {found_magic:#010x}"),
            ));
        }
        let stored = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let computed = crc_of(raw);
        if stored != computed {
            return Err(FormatError::corrupted(
                Self::WHAT,
                block,
                format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
            ));
        }
        if let Some(claimed) = value.self_block() {
            if claimed != block {
                return Err(FormatError::corrupted(
                    Self::WHAT,
                    block,
                    format!("block claims to be block {claimed} (misdirected write?)"),
                ));
            }
        }
        value.validate_fields(block)?;
        Ok(value)
    }

    /// Decodes an image already known good (built by this host, or checked by
    /// `decode` before): only the length and the magic are checked, not the CRC.
    fn decode_checked(bytes: &[u8], block: BlockNo) -> Result<Self, FormatError> {
        let size = std::mem::size_of::<Self>();
        let Some(raw) = bytes.get(..size) else {
            return Err(FormatError::corrupted(Self::WHAT, block, "short buffer"));
        };
        if !Self::has_magic(raw) {
            return Self::decode(bytes, block);
        }
        Ok(bytemuck::pod_read_unaligned(raw))
    }

    /// True when `bytes` start with this structure's magic (no other check).
    fn has_magic(bytes: &[u8]) -> bool {
        bytes.len() >= 4
            && u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == Self::MAGIC
    }
}

/// CRC-32 of a structure's bytes with its crc field (bytes 4..8) taken as zero.
pub fn crc_of(raw: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&raw[..4]);
    hasher.update(&[0u8; 4]);
    hasher.update(&raw[8..]);
    hasher.finalize()
}

fn set_crc<T: Pod>(value: &mut T) {
    let bytes = bytemuck::bytes_of_mut(value);
    bytes[4..8].fill(0);
    let crc = crc_of(bytes);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a sealed structure into the front of a zeroed buffer of `len` bytes.
pub fn encode_padded<T: OnDisk>(value: &T, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len.max(std::mem::size_of::<T>())];
    out[..std::mem::size_of::<T>()].copy_from_slice(bytemuck::bytes_of(value));
    out
}

/// A zeroed value of a Pod structure.
pub fn zeroed<T: Zeroable>() -> T {
    T::zeroed()
}

/// Copies a string into a fixed, zero-padded byte field (truncating).
pub fn put_str(field: &mut [u8], text: &str) {
    field.fill(0);
    let bytes = text.as_bytes();
    let len = bytes.len().min(field.len());
    field[..len].copy_from_slice(&bytes[..len]);
}

/// Reads a zero-padded string field.
pub fn get_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

#[cfg(test)]
mod tests;
