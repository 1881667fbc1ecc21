//! A LUN through which nothing can be written: the filesystem of a read-only host
//! sees the device only through it, so that whatever path of the fs core would
//! write (a lock, a commit, a recovery, a mailbox request) fails with EROFS instead.
//! The host's own heartbeat goes through the LUN underneath (`Membership`).

use super::{AtsKind, Caw, Lun, LunError, LunResult, Reservations};
use std::sync::Arc;

pub struct ReadOnlyLun {
    inner: Arc<dyn Lun>,
}

impl ReadOnlyLun {
    pub fn new(inner: Arc<dyn Lun>) -> ReadOnlyLun {
        ReadOnlyLun { inner }
    }

    fn refuse(&self, op: &'static str, offset: u64) -> LunError {
        tracing::debug!(op, offset, "write refused: read-only host");
        LunError::ReadOnly {
            device: self.inner.describe(),
            op,
            offset,
        }
    }
}

impl Lun for ReadOnlyLun {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], offset: u64) -> LunResult<()> {
        Err(self.refuse("write", offset))
    }
    fn compare_and_write(&self, offset: u64, _expected: &[u8], _new: &[u8]) -> LunResult<Caw> {
        Err(self.refuse("compare-and-write", offset))
    }
    /// Nothing was written through this LUN, so there is nothing to make durable.
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_uncached(buf, offset)
    }
    fn write_uncached(&self, _buf: &[u8], offset: u64) -> LunResult<()> {
        Err(self.refuse("write", offset))
    }
    fn may_write(&self) -> LunResult<()> {
        Err(self.refuse("write", 0))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn ats_kind(&self) -> AtsKind {
        self.inner.ats_kind()
    }
    fn reservations(&self) -> Option<&dyn Reservations> {
        self.inner.reservations()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::MemLun;

    #[test]
    fn reads_pass_and_every_write_is_refused_with_erofs() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        mem.write_at(&[7u8; 512], 4096).unwrap();
        let ro = ReadOnlyLun::new(mem.clone());
        let mut buf = [0u8; 512];
        ro.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [7u8; 512]);
        let refused = [
            ro.write_at(&[1u8; 512], 0).unwrap_err(),
            ro.write_uncached(&[1u8; 512], 0).unwrap_err(),
            ro.compare_and_write(4096, &[7u8; 512], &[1u8; 512])
                .unwrap_err(),
            ro.may_write().unwrap_err(),
        ];
        for e in refused {
            assert_eq!(e.errno(), libc::EROFS, "{e}");
        }
        ro.flush().unwrap();
        mem.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [7u8; 512], "the device was not changed");
    }
}
