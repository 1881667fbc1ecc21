//! Inodes: allocation, loading, attributes.

use super::{Core, FsError, FsResult, Ino};
use crate::cluster::lock::LockMode;
use crate::format::{BlockNo, InodeBody, OnDisk, INODE_FLAG_INLINE};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::format::INODE_FLAG_FREED;

/// What `stat` shows of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub generation: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    /// 512-byte units, as `st_blocks`.
    pub blocks_512: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
}

impl Attr {
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
}

pub fn now() -> (i64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(_) => (0, 0),
    }
}

pub fn to_system_time(secs: i64, nanos: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nanos))
    }
}

pub fn from_system_time(time: SystemTime) -> (i64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

pub fn attr_of(inode: &InodeBody) -> Attr {
    Attr {
        ino: inode.blockno,
        generation: inode.generation,
        mode: inode.mode,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev: inode.rdev,
        size: inode.size,
        blocks_512: inode.blocks * 8,
        atime: to_system_time(inode.atime_s, inode.atime_ns),
        mtime: to_system_time(inode.mtime_s, inode.mtime_ns),
        ctime: to_system_time(inode.ctime_s, inode.ctime_ns),
        crtime: to_system_time(inode.crtime_s, inode.crtime_ns),
    }
}

pub fn is_dir(inode: &InodeBody) -> bool {
    inode.mode & libc::S_IFMT == libc::S_IFDIR
}

pub fn is_reg(inode: &InodeBody) -> bool {
    inode.mode & libc::S_IFMT == libc::S_IFREG
}

pub fn is_symlink(inode: &InodeBody) -> bool {
    inode.mode & libc::S_IFMT == libc::S_IFLNK
}

/// The DT_* type of a mode, as stored in directory entries.
pub fn dtype_of(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        _ => libc::DT_UNKNOWN,
    }
}

pub fn touch_ctime(inode: &mut InodeBody) {
    let (s, ns) = now();
    inode.ctime_s = s;
    inode.ctime_ns = ns;
}

pub fn touch_mtime_ctime(inode: &mut InodeBody) {
    let (s, ns) = now();
    inode.mtime_s = s;
    inode.mtime_ns = ns;
    inode.ctime_s = s;
    inode.ctime_ns = ns;
}

impl Core {
    /// Loads an inode by number. A number outside the data area, or a freed inode, is
    /// stale.
    pub fn inode(&mut self, ino: Ino) -> FsResult<InodeBody> {
        if self.meta.geo.ag_of(ino).is_none() {
            return Err(FsError::Errno(libc::ESTALE));
        }
        match self.meta.need(ino, LockMode::Shared) {
            // A stale number whose block now holds something else has no lock record.
            Err(FsError::Corrupted(e)) => {
                tracing::debug!("inode {ino}: {e}; treating the inode number as stale");
                return Err(FsError::Errno(libc::ESTALE));
            }
            other => other?,
        }
        let inode: InodeBody = self.meta.get(
            self.meta.geo.body_offset(ino),
            self.meta.geo.body_len(),
            ino,
        )?;
        if inode.flags & INODE_FLAG_FREED != 0 {
            // Another host freed it: do not keep a lock on a block that may be reused.
            // (This host's own free keeps its lock until the commit: `freed_by_me`.)
            // An exclusive lock may be another host's freed inode too: a host takes a
            // lock exclusive where it asked for shared after failing to get it
            // exclusive (`Locks::want_exclusive`); kept, it was left believing it held
            // a lock in what became another host's inode or file data.
            if !self.meta.freed_by_me(ino) {
                self.meta.drop_freed(ino)?;
            }
            return Err(FsError::Errno(libc::ESTALE));
        }
        Ok(inode)
    }

    /// ESTALE unless `ino` is still the inode of `generation` (the one the kernel
    /// looked up: the block may since hold another inode).
    pub fn check_generation(&mut self, ino: Ino, generation: u64) -> FsResult<()> {
        if self.inode(ino)?.generation != generation {
            tracing::debug!(ino, generation, "the kernel's node is an older inode");
            return Err(FsError::Errno(libc::ESTALE));
        }
        Ok(())
    }

    /// Puts a changed inode into the running transaction; takes its lock exclusive
    /// first (a no-op when held so already).
    pub fn put_inode(&mut self, inode: &InodeBody) -> FsResult<()> {
        self.meta.need(inode.blockno, LockMode::Exclusive)?;
        let offset = self.meta.geo.body_offset(inode.blockno);
        self.meta.put(offset, self.meta.geo.body_len(), *inode);
        Ok(())
    }

    /// Allocates and initialises a new inode near `goal`. The caller links it and puts
    /// it.
    pub fn new_inode(
        &mut self,
        goal: BlockNo,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
    ) -> FsResult<InodeBody> {
        let span = u64::from(self.meta.geo.resource_blocks);
        let ino = self.meta.alloc_inode(goal, span)?;
        // The block may have held anything: its lock record becomes ours now (locks
        // are never journaled; if we crash before the commit the block is still free
        // and the record names a dead generation).
        self.meta.take_new(ino)?;
        let (s, ns) = now();
        let mut inode: InodeBody = bytemuck::Zeroable::zeroed();
        inode.magic = InodeBody::MAGIC;
        inode.blockno = ino;
        inode.generation = self.next_generation();
        inode.mode = mode;
        inode.uid = uid;
        inode.gid = gid;
        inode.nlink = 1;
        inode.rdev = rdev;
        inode.blocks = span;
        inode.atime_s = s;
        inode.mtime_s = s;
        inode.ctime_s = s;
        inode.crtime_s = s;
        inode.atime_ns = ns;
        inode.mtime_ns = ns;
        inode.ctime_ns = ns;
        inode.crtime_ns = ns;
        Ok(inode)
    }

    /// A generation number for a new inode: distinct from any earlier user of the
    /// same inode number (time-based, strictly increasing within this mount).
    fn next_generation(&mut self) -> u64 {
        let (s, ns) = now();
        let candidate = (s as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(u64::from(ns));
        self.last_generation = candidate.max(self.last_generation + 1);
        self.last_generation
    }

    /// Frees an inode and everything it owns. Its last image is a tombstone so a stale
    /// handle gets ESTALE.
    pub fn free_inode(&mut self, mut inode: InodeBody) -> FsResult<()> {
        if inode.orphan_slots != 0 {
            self.orphan_forget(&mut inode)?;
        }
        if is_dir(&inode) {
            self.dir_free_all(&mut inode)?;
        } else if inode.flags & INODE_FLAG_INLINE == 0 {
            self.truncate_blocks(&mut inode, 0)?;
        }
        if inode.xattr_block != 0 {
            self.meta.free(inode.xattr_block, 1)?;
            inode.xattr_block = 0;
        }
        let span = u64::from(self.meta.geo.resource_blocks);
        self.meta.free(inode.blockno, span)?;
        // The tombstone goes home with the free (`free` dropped the cached body).
        inode.flags |= INODE_FLAG_FREED;
        inode.nlink = 0;
        self.put_inode(&inode)?;
        self.meta.freed_lock(inode.blockno);
        Ok(())
    }
}
