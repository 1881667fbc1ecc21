//! Extended attributes: one block per inode, allocated at the first set. As on ext4,
//! all of an inode's attributes together must fit that block (else ENOSPC).

use super::inode::touch_ctime;
use super::{Core, FsError, FsResult, Ino};
use crate::format::{
    OnDisk, XattrBlock, BLOCK_SIZE, BLOCK_SIZE_U64, INODE_FLAG_MULTI_WRITER, XATTR_AREA,
    XATTR_ENTRY_FIXED,
};

/// Setting this attribute to "1" makes a regular file multi-writer: every host may
/// open it for writing at once, and all I/O to it bypasses the page cache.
pub const MULTI_WRITER_XATTR: &[u8] = b"user.atsfs.multiwriter";
/// Read-only, on the root directory only, not listed: the host's counters as JSON.
pub const STATS_XATTR: &[u8] = b"user.atsfs.stats";

/// Longest attribute value (the block less its header and one short name).
pub const XATTR_VALUE_MAX: usize = XATTR_AREA - XATTR_ENTRY_FIXED - 8;

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub(crate) fn parse(block: &XattrBlock) -> Pairs {
    let mut out = Vec::with_capacity(block.count as usize);
    let area = &block.area[..block.used as usize];
    let mut pos = 0;
    while pos + XATTR_ENTRY_FIXED <= area.len() {
        let name_len = area[pos] as usize;
        let value_len = u16::from_le_bytes([area[pos + 1], area[pos + 2]]) as usize;
        let start = pos + XATTR_ENTRY_FIXED;
        let (Some(name), Some(value)) = (
            area.get(start..start + name_len),
            area.get(start + name_len..start + name_len + value_len),
        ) else {
            break;
        };
        out.push((name.to_vec(), value.to_vec()));
        pos = start + name_len + value_len;
    }
    out
}

fn store(block: &mut XattrBlock, pairs: &Pairs) -> bool {
    let total: usize = pairs
        .iter()
        .map(|(n, v)| XATTR_ENTRY_FIXED + n.len() + v.len())
        .sum();
    if total > XATTR_AREA {
        return false;
    }
    block.area.fill(0);
    let mut pos = 0;
    for (name, value) in pairs {
        block.area[pos] = name.len() as u8;
        block.area[pos + 1..pos + 3].copy_from_slice(&(value.len() as u16).to_le_bytes());
        let start = pos + XATTR_ENTRY_FIXED;
        block.area[start..start + name.len()].copy_from_slice(name);
        block.area[start + name.len()..start + name.len() + value.len()].copy_from_slice(value);
        pos = start + name.len() + value.len();
    }
    block.count = pairs.len() as u32;
    block.used = pos as u32;
    true
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() {
        return Err(FsError::Errno(libc::EINVAL));
    }
    if name.len() > 255 {
        return Err(FsError::Errno(libc::ERANGE));
    }
    const NAMESPACES: [&[u8]; 4] = [b"user.", b"trusted.", b"security.", b"system."];
    if !NAMESPACES
        .iter()
        .any(|ns| name.starts_with(ns) && name.len() > ns.len())
    {
        return Err(FsError::Errno(libc::EOPNOTSUPP));
    }
    Ok(())
}

impl Core {
    fn xattr_pairs(&mut self, ino: Ino) -> FsResult<(Option<XattrBlock>, Pairs)> {
        let inode = self.inode(ino)?;
        if inode.xattr_block == 0 {
            return Ok((None, Vec::new()));
        }
        let b = inode.xattr_block;
        let block: XattrBlock = self.meta.get(b * BLOCK_SIZE_U64, BLOCK_SIZE, b)?;
        if block.owner != ino {
            return Err(FsError::corrupted(
                "xattr block",
                b,
                format!("owned by inode {}", block.owner),
            ));
        }
        let pairs = parse(&block);
        Ok((Some(block), pairs))
    }

    pub fn getxattr(&mut self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        check_name(name)?;
        let (_, pairs) = self.xattr_pairs(ino)?;
        pairs
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::Errno(libc::ENODATA))
    }

    /// Names, each followed by a zero byte, as listxattr(2) returns them.
    pub fn listxattr(&mut self, ino: Ino) -> FsResult<Vec<u8>> {
        let (_, pairs) = self.xattr_pairs(ino)?;
        let mut out = Vec::new();
        for (name, _) in pairs {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&mut self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> FsResult<()> {
        check_name(name)?;
        if value.len() > XATTR_VALUE_MAX {
            return Err(FsError::Errno(libc::E2BIG));
        }
        let (block, mut pairs) = self.xattr_pairs(ino)?;
        let existing = pairs.iter().position(|(n, _)| n == name);
        match (existing, flags) {
            (Some(_), f) if f & libc::XATTR_CREATE != 0 => {
                return Err(FsError::Errno(libc::EEXIST))
            }
            (None, f) if f & libc::XATTR_REPLACE != 0 => return Err(FsError::Errno(libc::ENODATA)),
            (Some(i), _) => pairs[i].1 = value.to_vec(),
            (None, _) => pairs.push((name.to_vec(), value.to_vec())),
        }
        if name == MULTI_WRITER_XATTR {
            let on = match value {
                b"1" | b"1\n" | b"on" | b"yes" | b"true" => true,
                b"0" | b"0\n" | b"off" | b"no" | b"false" => false,
                _ => return Err(FsError::Errno(libc::EINVAL)),
            };
            self.set_multi_writer(ino, on)?;
        }
        self.write_pairs(ino, block, &pairs)
    }

    /// Turns the multi-writer flag of a regular file on or off.
    fn set_multi_writer(&mut self, ino: Ino, on: bool) -> FsResult<()> {
        let mut inode = self.inode(ino)?;
        if !super::inode::is_reg(&inode) {
            return Err(FsError::Errno(libc::EINVAL));
        }
        if self.open_counts.get(&ino).is_some_and(|c| c.total() > 0) {
            return Err(FsError::Errno(libc::EBUSY));
        }
        if on {
            inode.flags |= INODE_FLAG_MULTI_WRITER;
        } else {
            inode.flags &= !INODE_FLAG_MULTI_WRITER;
        }
        self.put_inode(&inode)
    }

    pub fn removexattr(&mut self, ino: Ino, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        let (block, mut pairs) = self.xattr_pairs(ino)?;
        let Some(i) = pairs.iter().position(|(n, _)| n == name) else {
            return Err(FsError::Errno(libc::ENODATA));
        };
        pairs.remove(i);
        if name == MULTI_WRITER_XATTR {
            self.set_multi_writer(ino, false)?;
        }
        self.write_pairs(ino, block, &pairs)
    }

    fn write_pairs(&mut self, ino: Ino, block: Option<XattrBlock>, pairs: &Pairs) -> FsResult<()> {
        let mut inode = self.inode(ino)?;
        let mut block = match block {
            Some(block) => block,
            None => {
                let (b, _) = self.meta.alloc(ino + 1, 1, true)?;
                inode.xattr_block = b;
                inode.blocks += 1;
                let mut fresh: XattrBlock = bytemuck::Zeroable::zeroed();
                fresh.magic = XattrBlock::MAGIC;
                fresh.blockno = b;
                fresh.owner = ino;
                fresh
            }
        };
        if !store(&mut block, pairs) {
            return Err(FsError::NoSpace);
        }
        let b = block.blockno;
        self.meta.put(b * BLOCK_SIZE_U64, BLOCK_SIZE, block);
        touch_ctime(&mut inode);
        self.put_inode(&inode)?;
        Ok(())
    }
}
