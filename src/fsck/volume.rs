//! Reading the volume as replay will leave it: whole blocks from the device, patched
//! by an overlay of the committed journal records that are not home yet.
//!
//! Every read is of whole blocks (so it is aligned for any sector size), and every
//! read is checked against the device's end first. Nothing is ever written.

use crate::format::{BlockNo, Geometry, Superblock, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::journal::Record;
use crate::lun::Lun;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

pub(crate) struct Volume<'a> {
    lun: &'a dyn Lun,
    pub geo: Geometry,
    pub sb: Superblock,
    /// Blocks the device holds.
    device_blocks: u64,
    /// Whole block images after replay, for every block a pending record touches.
    overlay: HashMap<BlockNo, Vec<u8>>,
    pub reads: u64,
}

impl<'a> Volume<'a> {
    pub fn new(lun: &'a dyn Lun, sb: Superblock) -> Volume<'a> {
        Volume {
            lun,
            geo: Geometry::from_superblock(&sb),
            sb,
            device_blocks: lun.len_bytes() / BLOCK_SIZE_U64,
            overlay: HashMap::new(),
            reads: 0,
        }
    }

    /// The device.
    pub fn lun(&self) -> &'a dyn Lun {
        self.lun
    }

    /// Reads `count` whole blocks from `first`, as replay will leave them.
    pub fn blocks(&mut self, first: BlockNo, count: u64) -> Result<Vec<u8>> {
        let mut buf = self.device_blocks(first, count)?;
        if !self.overlay.is_empty() {
            for (i, chunk) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
                if let Some(image) = self.overlay.get(&(first + i as u64)) {
                    chunk.copy_from_slice(image);
                }
            }
        }
        Ok(buf)
    }

    /// Reads blocks from the device only (journals, which replay does not change).
    pub fn device_blocks(&mut self, first: BlockNo, count: u64) -> Result<Vec<u8>> {
        let end = first.checked_add(count);
        if count == 0 || end.is_none_or(|end| end > self.device_blocks) {
            bail!(
                "fsck bug: read of {count} blocks at block {first} past the device ({} blocks)",
                self.device_blocks
            );
        }
        let mut buf = vec![0u8; count as usize * BLOCK_SIZE];
        self.lun
            .read_at(&mut buf, first * BLOCK_SIZE_U64)
            .with_context(|| format!("reading block {first} of {}", self.lun.describe()))?;
        self.reads += 1;
        Ok(buf)
    }

    /// Applies one committed record to the overlay, as replay would write it. Returns
    /// false when the record lies outside the device (replay would fail there).
    pub fn apply(&mut self, record: &Record) -> Result<bool> {
        let len = record.image.len() as u64;
        let Some(end) = record.target.checked_add(len) else {
            return Ok(false);
        };
        if end > self.device_blocks * BLOCK_SIZE_U64 {
            return Ok(false);
        }
        let mut at = record.target;
        while at < end {
            let block = at / BLOCK_SIZE_U64;
            let within = (at % BLOCK_SIZE_U64) as usize;
            let take = (BLOCK_SIZE - within).min((end - at) as usize);
            let from = (at - record.target) as usize;
            if !self.overlay.contains_key(&block) {
                let image = self.device_blocks(block, 1)?;
                self.overlay.insert(block, image);
            }
            if let Some(image) = self.overlay.get_mut(&block) {
                image[within..within + take].copy_from_slice(&record.image[from..from + take]);
            }
            at += take as u64;
        }
        Ok(true)
    }
}
