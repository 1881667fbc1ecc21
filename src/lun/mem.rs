//! An in-memory LUN: every host of a test or of the simulator shares one `Arc<MemLun>`.
//! Compare-and-write is atomic under the image's lock. Like a block device opened
//! with O_DIRECT, it refuses I/O that is not sector aligned, so tests catch it.

use super::{check_caw, check_range, Caw, Lun, LunResult};
use std::sync::RwLock;

pub struct MemLun {
    sector: u32,
    image: RwLock<Vec<u8>>,
}

impl MemLun {
    pub fn new(len_bytes: u64, sector: u32) -> MemLun {
        MemLun {
            sector,
            image: RwLock::new(vec![0u8; len_bytes as usize]),
        }
    }

    /// A LUN holding a copy of `image`.
    pub fn from_image(image: Vec<u8>, sector: u32) -> MemLun {
        MemLun {
            sector,
            image: RwLock::new(image),
        }
    }

    /// A copy of the whole image.
    pub fn snapshot(&self) -> Vec<u8> {
        self.image.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Lun for MemLun {
    fn sector_size(&self) -> u32 {
        self.sector
    }
    fn len_bytes(&self) -> u64 {
        self.image.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        let image = self.image.read().unwrap_or_else(|e| e.into_inner());
        check_range(
            "read",
            offset,
            buf.len(),
            image.len() as u64,
            Some(self.sector),
        )?;
        let start = offset as usize;
        buf.copy_from_slice(&image[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
        check_range(
            "write",
            offset,
            buf.len(),
            image.len() as u64,
            Some(self.sector),
        )?;
        let start = offset as usize;
        image[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        let mut image = self.image.write().unwrap_or_else(|e| e.into_inner());
        check_caw(offset, expected, new, self.sector, image.len() as u64)?;
        let start = offset as usize;
        let sector = &mut image[start..start + new.len()];
        if sector != expected {
            return Ok(Caw::Miscompare(sector.to_vec()));
        }
        sector.copy_from_slice(new);
        Ok(Caw::Written)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "in-memory LUN".to_string()
    }
}
