//! The namespace: lookup, create, link, unlink, rename, setattr.
//!
//! Each step loads what it changes and puts it back at once, so operations whose
//! source and target directory are the same inode see their own changes.

use super::inode::is_reg;
use super::inode::{
    attr_of, dtype_of, from_system_time, is_dir, now, touch_ctime, touch_mtime_ctime, Attr,
};
use super::{Core, FsError, FsResult, Ino, OpenCount};
use crate::cluster::lock::{LockMode, OpenKind};
use crate::format::{InodeBody, NAME_MAX};
use std::time::SystemTime;

/// Most links to one inode, as ext4.
pub const LINK_MAX: u32 = 65000;
/// Longest symlink target (PATH_MAX less the terminating zero).
pub const SYMLINK_MAX: usize = 4095;

/// A time to set: now, or a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// The changes of a setattr call; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<SystemTime>,
}

/// The open entries to add (true) or remove (false) when this host's handles on a
/// file go from `before` to `after`.
fn open_transitions(before: OpenCount, after: OpenCount, multi: bool) -> Vec<(OpenKind, bool)> {
    if multi {
        return match (before.total() > 0, after.total() > 0) {
            (false, true) => vec![(OpenKind::Shared, true)],
            (true, false) => vec![(OpenKind::Shared, false)],
            _ => Vec::new(),
        };
    }
    let mut out = Vec::new();
    for (kind, b, a) in [
        (OpenKind::Write, before.write, after.write),
        (OpenKind::Read, before.read, after.read),
    ] {
        match (b > 0, a > 0) {
            (false, true) => out.push((kind, true)),
            (true, false) => out.push((kind, false)),
            _ => {}
        }
    }
    out
}

/// Whether this host's opens of an inode are recorded in its lock record (files and
/// directories: the nodes the kernel opens), so that no host frees the inode while
/// another still has it open.
pub(super) fn records_opens(inode: &InodeBody) -> bool {
    is_reg(inode) || is_dir(inode)
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::Errno(libc::ENAMETOOLONG));
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Errno(libc::EINVAL));
    }
    Ok(())
}

fn time_of(set: SetTime) -> (i64, u32) {
    match set {
        SetTime::Now => now(),
        SetTime::At(t) => from_system_time(t),
    }
}

impl Core {
    /// Loads a directory that may still get entries (not removed).
    fn live_dir(&mut self, ino: Ino) -> FsResult<InodeBody> {
        let dir = self.inode(ino)?;
        if !is_dir(&dir) {
            return Err(FsError::Errno(libc::ENOTDIR));
        }
        if dir.nlink == 0 {
            return Err(FsError::Errno(libc::ENOENT));
        }
        Ok(dir)
    }

    /// Loads an inode, lets `f` change it, and puts it back.
    fn update<T>(
        &mut self,
        ino: Ino,
        f: impl FnOnce(&mut Core, &mut InodeBody) -> FsResult<T>,
    ) -> FsResult<T> {
        let mut inode = self.inode(ino)?;
        let out = f(self, &mut inode)?;
        self.put_inode(&inode)?;
        Ok(out)
    }

    pub fn lookup(&mut self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::Errno(libc::ENAMETOOLONG));
        }
        let dir = self.inode(parent)?;
        if !is_dir(&dir) {
            return Err(FsError::Errno(libc::ENOTDIR));
        }
        let ino = match name {
            b"." => parent,
            b".." => dir.parent,
            _ => match self.dir_lookup(&dir, name)? {
                Some((ino, _)) => ino,
                None => return Err(FsError::Errno(libc::ENOENT)),
            },
        };
        Ok(attr_of(&self.inode(ino)?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_node(
        &mut self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        symlink: Option<&[u8]>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        if symlink.is_some_and(|t| t.len() > SYMLINK_MAX) {
            return Err(FsError::Errno(libc::ENAMETOOLONG));
        }
        if symlink.is_some_and(|t| t.is_empty()) {
            return Err(FsError::Errno(libc::ENOENT));
        }
        let dir = self.live_dir(parent)?;
        if self.dir_lookup(&dir, name)?.is_some() {
            return Err(FsError::Errno(libc::EEXIST));
        }
        let making_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        if making_dir && dir.nlink >= LINK_MAX {
            return Err(FsError::Errno(libc::EMLINK));
        }
        // A set-group-ID directory hands its group down, and the bit to subdirectories.
        let (gid, mode) = if dir.mode & libc::S_ISGID != 0 {
            (
                dir.gid,
                if making_dir {
                    mode | libc::S_ISGID
                } else {
                    mode
                },
            )
        } else {
            (gid, mode)
        };
        let mut child = self.new_inode(parent, mode, uid, gid, rdev)?;
        if making_dir {
            self.dir_init(&mut child, parent)?;
            child.nlink = 2;
        }
        if let Some(target) = symlink {
            self.set_symlink_target(&mut child, target)?;
        }
        self.put_inode(&child)?;
        let ino = child.blockno;
        self.update(parent, |core, dir| {
            core.dir_add(dir, name, ino, dtype_of(mode))?;
            if making_dir {
                dir.nlink += 1;
            }
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        Ok(attr_of(&child))
    }

    pub fn link(&mut self, ino: Ino, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        let target = self.inode(ino)?;
        if is_dir(&target) {
            return Err(FsError::Errno(libc::EPERM));
        }
        if target.nlink >= LINK_MAX {
            return Err(FsError::Errno(libc::EMLINK));
        }
        if target.nlink == 0 {
            return Err(FsError::Errno(libc::ENOENT));
        }
        let dir = self.live_dir(parent)?;
        if self.dir_lookup(&dir, name)?.is_some() {
            return Err(FsError::Errno(libc::EEXIST));
        }
        let kind = dtype_of(target.mode);
        self.update(parent, |core, dir| {
            core.dir_add(dir, name, ino, kind)?;
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        self.update(ino, |_, inode| {
            inode.nlink += 1;
            touch_ctime(inode);
            Ok(attr_of(inode))
        })
    }

    /// unlink(2) and, with `rmdir`, rmdir(2).
    pub fn unlink(&mut self, parent: Ino, name: &[u8], rmdir: bool) -> FsResult<()> {
        if name.len() > NAME_MAX {
            return Err(FsError::Errno(libc::ENAMETOOLONG));
        }
        if rmdir && name == b"." {
            return Err(FsError::Errno(libc::EINVAL));
        }
        if rmdir && name == b".." {
            return Err(FsError::Errno(libc::ENOTEMPTY));
        }
        let dir = self.inode(parent)?;
        if !is_dir(&dir) {
            return Err(FsError::Errno(libc::ENOTDIR));
        }
        let Some((ino, _)) = self.dir_lookup(&dir, name)? else {
            return Err(FsError::Errno(libc::ENOENT));
        };
        let child = self.inode(ino)?;
        match (rmdir, is_dir(&child)) {
            (true, false) => return Err(FsError::Errno(libc::ENOTDIR)),
            (false, true) => return Err(FsError::Errno(libc::EISDIR)),
            (true, true) if !self.dir_is_empty(&child)? => {
                return Err(FsError::Errno(libc::ENOTEMPTY))
            }
            _ => {}
        }
        self.update(parent, |core, dir| {
            core.dir_remove(dir, name)?;
            if rmdir {
                dir.nlink = dir.nlink.saturating_sub(1);
            }
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        self.drop_link(ino)
    }

    /// Drops one link of an inode whose entry is gone; frees it at the last link when
    /// nobody has it open.
    fn drop_link(&mut self, ino: Ino) -> FsResult<()> {
        let mut inode = self.inode(ino)?;
        inode.nlink = if is_dir(&inode) {
            0
        } else {
            inode.nlink.saturating_sub(1)
        };
        touch_ctime(&mut inode);
        if inode.nlink == 0 {
            let open_here = self.open_counts.get(&ino).map_or(0, |c| c.total()) > 0;
            let elsewhere = if records_opens(&inode) {
                self.meta.open_slots_elsewhere(ino)?
            } else {
                Vec::new()
            };
            // A file open anywhere stays until the last close frees it; each host
            // with it open lists it in its orphan table, so a crash does not leak it.
            if !open_here && elsewhere.is_empty() {
                return self.free_inode(inode);
            }
            let me = self.meta.node.me.slot;
            for slot in open_here.then_some(me).into_iter().chain(elsewhere) {
                self.orphan_add(&mut inode, slot)?;
            }
        }
        self.put_inode(&inode)?;
        Ok(())
    }

    /// Opens a node for this host. For files and directories the lock record notes
    /// the open: a host's first handle of a kind adds its entry, its last removes it.
    /// Until the last handle is released the inode stays, whatever happens to its
    /// names (`drop_link`).
    pub fn open(&mut self, ino: Ino, write: bool) -> FsResult<(Attr, bool)> {
        let inode = self.inode(ino)?;
        if write && is_dir(&inode) {
            return Err(FsError::Errno(libc::EISDIR));
        }
        let before = self.open_counts.get(&ino).copied().unwrap_or_default();
        let mut after = before;
        if write {
            after.write += 1;
        } else {
            after.read += 1;
        }
        let multi = inode.flags & crate::format::INODE_FLAG_MULTI_WRITER != 0;
        if records_opens(&inode) {
            for (kind, add) in open_transitions(before, after, multi) {
                self.meta.set_open(ino, kind, add)?;
            }
        }
        let me = self.meta.node.me.slot;
        let listed = inode.orphan_slots & (1u64 << me) != 0;
        // (A read-only host lists nothing: its opens keep nothing alive.)
        if inode.nlink == 0
            && !listed
            && !is_dir(&inode)
            && self.meta.geo.orphan_start != 0
            && !self.meta.read_only
        {
            // Opened again after its last link went: list it for this host too.
            let mut inode = inode;
            self.orphan_add(&mut inode, me)?;
            self.put_inode(&inode)?;
        }
        self.open_counts.insert(ino, after);
        Ok((attr_of(&inode), multi))
    }

    /// Drops an open handle; at the very last one an unlinked inode is freed.
    /// Nothing is changed before the steps that may fail, so a retry does the same.
    pub fn release(&mut self, ino: Ino, write: bool) -> FsResult<()> {
        let before = self.open_counts.get(&ino).copied().unwrap_or_default();
        let mut after = before;
        if write {
            after.write = after.write.saturating_sub(1);
        } else {
            after.read = after.read.saturating_sub(1);
        }
        let inode = match self.inode(ino) {
            Ok(inode) => Some(inode),
            Err(FsError::Errno(libc::ESTALE)) => None,
            Err(e) => return Err(e),
        };
        if let Some(inode) = inode.as_ref().filter(|i| records_opens(i)) {
            let multi = inode.flags & crate::format::INODE_FLAG_MULTI_WRITER != 0;
            for (kind, add) in open_transitions(before, after, multi) {
                self.meta.set_open(ino, kind, add)?;
            }
        }
        if after.total() == 0 {
            if let Some(inode) = inode.filter(|i| i.nlink == 0 && !self.meta.read_only) {
                self.last_close_of_unlinked(inode)?;
            }
            self.open_counts.remove(&ino);
        } else {
            self.open_counts.insert(ino, after);
        }
        Ok(())
    }

    /// This host's last close of an unlinked inode: frees it when no other host has
    /// it open, else only takes it off this host's orphan table.
    fn last_close_of_unlinked(&mut self, mut inode: InodeBody) -> FsResult<()> {
        if records_opens(&inode) && self.meta.open_elsewhere(inode.blockno)? {
            let me = self.meta.node.me.slot;
            if inode.orphan_slots & (1u64 << me) != 0 {
                self.orphan_remove(&mut inode, me)?;
                self.put_inode(&inode)?;
            }
            return Ok(());
        }
        self.free_inode(inode)
    }

    /// Opens a directory (FUSE opendir): like `open` for reading, so the directory
    /// stays until its last handle is released (`release`), even if it is removed.
    pub fn open_dir(&mut self, ino: Ino) -> FsResult<Attr> {
        if !is_dir(&self.inode(ino)?) {
            return Err(FsError::Errno(libc::ENOTDIR));
        }
        Ok(self.open(ino, false)?.0)
    }

    /// True when `ancestor` is `ino` or one of its parents.
    fn is_ancestor(&mut self, ancestor: Ino, mut ino: Ino) -> FsResult<bool> {
        let root = self.sb.root_ino;
        // Bounded by the deepest possible tree: every step goes up one level.
        for _ in 0..1_000_000 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == root {
                return Ok(false);
            }
            ino = self.inode(ino)?.parent;
        }
        Err(FsError::corrupted(
            "directory",
            ino,
            "parent chain does not reach the root",
        ))
    }

    pub fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        check_name(new_name)?;
        if name.len() > NAME_MAX {
            return Err(FsError::Errno(libc::ENAMETOOLONG));
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return Err(FsError::Errno(libc::EINVAL));
        }
        let src_dir = self.inode(parent)?;
        if !is_dir(&src_dir) {
            return Err(FsError::Errno(libc::ENOTDIR));
        }
        let dst_dir = self.live_dir(new_parent)?;
        let Some((src, _)) = self.dir_lookup(&src_dir, name)? else {
            return Err(FsError::Errno(libc::ENOENT));
        };
        let dst = self.dir_lookup(&dst_dir, new_name)?.map(|(ino, _)| ino);
        let src_inode = self.inode(src)?;
        let src_is_dir = is_dir(&src_inode);
        if exchange {
            let Some(dst) = dst else {
                return Err(FsError::Errno(libc::ENOENT));
            };
            return self.exchange(parent, name, src, new_parent, new_name, dst);
        }
        if dst.is_some() && noreplace {
            return Err(FsError::Errno(libc::EEXIST));
        }
        if dst == Some(src) {
            // Two links to one inode: POSIX says do nothing.
            return Ok(());
        }
        if src_is_dir && new_parent != parent && self.is_ancestor(src, new_parent)? {
            return Err(FsError::Errno(libc::EINVAL));
        }
        if let Some(dst) = dst {
            let dst_inode = self.inode(dst)?;
            match (src_is_dir, is_dir(&dst_inode)) {
                (true, false) => return Err(FsError::Errno(libc::ENOTDIR)),
                (false, true) => return Err(FsError::Errno(libc::EISDIR)),
                (true, true) if !self.dir_is_empty(&dst_inode)? => {
                    return Err(FsError::Errno(libc::ENOTEMPTY))
                }
                _ => {}
            }
        }
        let kind = dtype_of(src_inode.mode);
        self.update(parent, |core, dir| {
            core.dir_remove(dir, name)?;
            if src_is_dir && new_parent != parent {
                dir.nlink = dir.nlink.saturating_sub(1);
            }
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        self.update(new_parent, |core, dir| {
            match dst {
                Some(_) => core.dir_replace(dir, new_name, src, kind)?,
                None => core.dir_add(dir, new_name, src, kind)?,
            }
            // A replaced directory takes its ".." link with it; the moved one brings one.
            let replaced_dir = dst.is_some() && src_is_dir;
            if src_is_dir && new_parent != parent && !replaced_dir {
                dir.nlink += 1;
            }
            if replaced_dir && new_parent == parent {
                dir.nlink = dir.nlink.saturating_sub(1);
            }
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        self.update(src, |_, inode| {
            if src_is_dir {
                inode.parent = new_parent;
            }
            touch_ctime(inode);
            Ok(())
        })?;
        if let Some(dst) = dst {
            self.drop_link(dst)?;
        }
        Ok(())
    }

    /// RENAME_EXCHANGE: swaps two entries atomically.
    fn exchange(
        &mut self,
        parent: Ino,
        name: &[u8],
        src: Ino,
        new_parent: Ino,
        new_name: &[u8],
        dst: Ino,
    ) -> FsResult<()> {
        if src == dst {
            return Ok(());
        }
        let src_inode = self.inode(src)?;
        let dst_inode = self.inode(dst)?;
        let (src_dir, dst_dir) = (is_dir(&src_inode), is_dir(&dst_inode));
        if new_parent != parent {
            if src_dir && self.is_ancestor(src, new_parent)? {
                return Err(FsError::Errno(libc::EINVAL));
            }
            if dst_dir && self.is_ancestor(dst, parent)? {
                return Err(FsError::Errno(libc::EINVAL));
            }
        }
        let (src_kind, dst_kind) = (dtype_of(src_inode.mode), dtype_of(dst_inode.mode));
        self.update(parent, |core, dir| {
            core.dir_replace(dir, name, dst, dst_kind)?;
            if new_parent != parent {
                dir.nlink = dir.nlink + u32::from(dst_dir) - u32::from(src_dir);
            }
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        self.update(new_parent, |core, dir| {
            core.dir_replace(dir, new_name, src, src_kind)?;
            if new_parent != parent {
                dir.nlink = dir.nlink + u32::from(src_dir) - u32::from(dst_dir);
            }
            touch_mtime_ctime(dir);
            Ok(())
        })?;
        self.update(src, |_, inode| {
            if src_dir {
                inode.parent = new_parent;
            }
            touch_ctime(inode);
            Ok(())
        })?;
        self.update(dst, |_, inode| {
            if dst_dir {
                inode.parent = parent;
            }
            touch_ctime(inode);
            Ok(())
        })
    }

    /// A truncate writes the file: like an open for writing, it fails with EBUSY while
    /// another host has the file open (for a multi-writer file, only while another
    /// host has it open exclusively for writing). Checked under the inode's exclusive
    /// lock, so no other host can record an open meanwhile.
    fn check_may_truncate(&mut self, inode: &InodeBody) -> FsResult<()> {
        self.meta.need(inode.blockno, LockMode::Exclusive)?;
        let multi = inode.flags & crate::format::INODE_FLAG_MULTI_WRITER != 0;
        let (writer, readers) = self.meta.opens_elsewhere(inode.blockno)?;
        if writer || (readers && !multi) {
            return Err(FsError::Errno(libc::EBUSY));
        }
        Ok(())
    }

    pub fn setattr(&mut self, ino: Ino, set: &SetAttr) -> FsResult<Attr> {
        self.update(ino, |core, inode| {
            if let Some(size) = set.size {
                if is_dir(inode) {
                    return Err(FsError::Errno(libc::EISDIR));
                }
                if inode.mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(FsError::Errno(libc::EINVAL));
                }
                core.check_may_truncate(inode)?;
                core.truncate(inode, size)?;
            }
            if let Some(mode) = set.mode {
                inode.mode = (inode.mode & libc::S_IFMT) | (mode & 0o7777);
            }
            if let Some(uid) = set.uid {
                inode.uid = uid;
            }
            if let Some(gid) = set.gid {
                inode.gid = gid;
            }
            if let Some(atime) = set.atime {
                (inode.atime_s, inode.atime_ns) = time_of(atime);
            }
            if let Some(mtime) = set.mtime {
                (inode.mtime_s, inode.mtime_ns) = time_of(mtime);
            }
            match set.ctime {
                Some(ctime) => (inode.ctime_s, inode.ctime_ns) = from_system_time(ctime),
                None => touch_ctime(inode),
            }
            Ok(attr_of(inode))
        })
    }
}
