//! The FUSE adapter: decodes a kernel request, calls the fs core, maps the result.
//! No filesystem logic lives here.

use crate::fs::{Attr, Fs, FsError, Ino, SetAttr, SetTime};
use anyhow::{bail, Context, Result};
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, IoctlFlags, KernelConfig, LockOwner, MountOption, OpenFlags, PollEvents, PollFlags,
    PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionACL, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// File handle of a handle opened for writing (read-only handles are 0).
const HANDLE_WRITE: u64 = 1;

fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

fn handle(write: bool) -> FileHandle {
    FileHandle(if write { HANDLE_WRITE } else { 0 })
}

/// Multi-writer files bypass the kernel page cache: every host reads the disk.
fn open_flags(multi: bool) -> FopenFlags {
    if multi {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// Largest write the kernel sends at once.
const MAX_WRITE_BYTES: u32 = 1 << 20;
/// O_DIRECT reads this large or larger bypass the image file's page cache.
const UNCACHED_READ_MIN: u32 = 128 << 10;

thread_local! {
    /// Each FUSE thread's read buffer, reused from read to read.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer larger than this (a read larger than any the kernel sends) is not kept.
const READ_BUFFER_KEEP_BYTES: usize = 4 << 20;

/// Default read-ahead of a mount, in KiB: enough for several 1 MiB requests in flight.
const READAHEAD_KB_DEFAULT: u32 = 4096;

/// Mount options of the FUSE side (`-o`).
#[derive(Clone, Debug)]
pub struct FuseOptions {
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub allow_other: bool,
    pub default_permissions: bool,
    pub threads: usize,
    pub fsname: String,
    /// Read-ahead of the mount's kernel page cache in KiB (the kernel starts a FUSE
    /// mount at 128 KiB, which leaves sequential reads waiting on small requests);
    /// 0 keeps the kernel's value.
    pub readahead_kb: u32,
    /// Ask the kernel for asynchronous direct I/O (`FUSE_ASYNC_DIO`): O_DIRECT
    /// requests submitted together (libaio, io_uring) reach the daemon together;
    /// one-at-a-time O_DIRECT requests then go through the kernel's background queue.
    pub async_dio: bool,
    /// The kernel's per-mount flags of the same names (`nosuid`, `nodev`, `noexec`,
    /// and their opposites, the defaults), as on any filesystem.
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            allow_other: nix::unistd::geteuid().is_root(),
            default_permissions: true,
            threads: 4,
            fsname: "atsfs".into(),
            readahead_kb: READAHEAD_KB_DEFAULT,
            async_dio: true,
            nosuid: false,
            nodev: false,
            noexec: false,
        }
    }
}

pub struct AtsFuse {
    fs: Arc<Fs>,
    opts: FuseOptions,
}

/// The errno of a core error. Errors an administrator acts on (I/O, damage, a
/// failed host) are logged; a POSIX answer or a full volume (ENOSPC, which the
/// caller sees and `df` shows) is not, so that one cannot flood the log.
fn errno(e: &FsError) -> Errno {
    match e {
        FsError::Errno(_) => {}
        FsError::NoSpace => tracing::debug!("{e}"),
        FsError::Io(_) | FsError::Corrupted(_) | FsError::Failed(_) | FsError::NeedLock { .. } => {
            tracing::warn!("{e}")
        }
    }
    Errno::from_i32(e.errno())
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dtype_file_type(dtype: u8) -> FileType {
    match dtype {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => SetTime::At(at),
    }
}

impl AtsFuse {
    pub fn new(fs: Arc<Fs>, opts: FuseOptions) -> AtsFuse {
        AtsFuse { fs, opts }
    }

    fn ino_in(&self, ino: INodeNo) -> Ino {
        if ino.0 == 1 {
            self.fs.root()
        } else {
            ino.0
        }
    }

    fn ino_out(&self, ino: Ino) -> INodeNo {
        node_id(self.fs.root(), ino)
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.ino_out(a.ino),
            size: a.size,
            blocks: a.blocks_512,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            crtime: a.crtime,
            kind: file_type(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev as u32,
            blksize: crate::format::BLOCK_SIZE as u32,
            flags: 0,
        }
    }

    /// Replies with a node; the core learns that the kernel holds it (`forget` lets
    /// go).
    fn entry(&self, reply: ReplyEntry, result: Result<Attr, FsError>) {
        if let Ok(a) = &result {
            self.fs.remember(a);
        }
        match result {
            Ok(a) => reply.entry_with_ttls(
                &self.opts.attr_ttl,
                &self.opts.entry_ttl,
                &self.attr(&a),
                Generation(a.generation),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty(reply: ReplyEmpty, result: Result<(), FsError>) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn xattr(reply: ReplyXattr, size: u32, result: Result<Vec<u8>, FsError>) {
        match result {
            Ok(data) if size == 0 => reply.size(data.len() as u32),
            Ok(data) if data.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl Filesystem for AtsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        // A cached read whose attributes are older than the attribute TTL asks the
        // daemon for them first (and drops the pages if the file changed): so the
        // kernel's page cache answers for at most one TTL beyond the daemon, and a
        // host that lost its lease fails such a read with EIO (docs/locking.md).
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_AUTO_INVAL_DATA) {
            tracing::warn!(
                ?missing,
                "the kernel cannot check cached file data against the attributes"
            );
        }
        // Direct I/O submitted asynchronously (io_submit, io_uring: QEMU with
        // cache=none) reaches the daemon as concurrent requests instead of one at a
        // time, as libfuse has it by default (see docs/perf.md for the cost to
        // one-at-a-time direct I/O).
        if !self.opts.async_dio {
            tracing::debug!("asynchronous direct I/O not asked for (noasync_dio)");
        } else if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO) {
            tracing::debug!(
                ?missing,
                "the kernel does not offer asynchronous direct I/O"
            );
        }
        Ok(())
    }

    fn destroy(&mut self) {}

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = self.ino_in(parent);
        self.entry(reply, self.fs.lookup(parent, name.as_bytes()));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(self.ino_in(ino), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(self.ino_in(ino)) {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime,
        };
        match self.fs.setattr(self.ino_in(ino), &set) {
            Ok(a) => reply.attr(&self.opts.attr_ttl, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(self.ino_in(ino)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mode = (mode & libc::S_IFMT) | (mode & 0o7777 & !umask);
        let result = self.fs.mknod(
            self.ino_in(parent),
            name.as_bytes(),
            mode,
            u64::from(rdev),
            req.uid(),
            req.gid(),
        );
        self.entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.fs.mkdir(
            self.ino_in(parent),
            name.as_bytes(),
            mode & !umask,
            req.uid(),
            req.gid(),
        );
        self.entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.unlink(self.ino_in(parent), name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.rmdir(self.ino_in(parent), name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.fs.symlink(
            self.ino_in(parent),
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            req.uid(),
            req.gid(),
        );
        self.entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.fs.rename(
            self.ino_in(parent),
            name.as_bytes(),
            self.ino_in(newparent),
            newname.as_bytes(),
            flags.bits(),
        );
        Self::empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newparent = self.ino_in(newparent);
        let result = self
            .fs
            .link(self.ino_in(ino), newparent, newname.as_bytes());
        self.entry(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = wants_write(flags.0);
        match self.fs.open(self.ino_in(ino), write) {
            Ok((_, multi)) => reply.opened(handle(write), open_flags(multi)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // O_DIRECT reads of at least UNCACHED_READ_MIN bytes skip the image file's
        // page cache too (streaming: no page-cache fills); smaller ones may be served
        // from it (see docs/perf.md).
        let uncached = flags.0 & libc::O_DIRECT != 0 && size >= UNCACHED_READ_MIN;
        READ_BUFFER.with_borrow_mut(|buf| {
            match self
                .fs
                .read_into(self.ino_in(ino), offset, size, buf, uncached)
            {
                Ok(range) => reply.data(&buf[range]),
                Err(e) => reply.error(errno(&e)),
            }
            if buf.capacity() > READ_BUFFER_KEEP_BYTES {
                *buf = Vec::new();
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write_data(self.ino_in(ino), offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Nothing to do at close (data reaches the core at each write, and durability is
    /// fsync's job). ENOSYS tells the kernel never to send FLUSH again, which saves a
    /// round trip per close(); the kernel still writes back its dirty pages first.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            reply,
            self.fs.release(self.ino_in(ino), fh.0 == HANDLE_WRITE),
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.fsync(self.ino_in(ino), datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(self.ino_in(ino)) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.release(self.ino_in(ino), false));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self
            .fs
            .readdir(self.ino_in(ino), offset, &mut |child, next, dtype, name| {
                reply.add(
                    self.ino_out(child),
                    next,
                    dtype_file_type(dtype),
                    OsStr::from_bytes(name),
                )
            });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.fsync(self.ino_in(ino), datasync));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.free_blocks,
                s.free_blocks,
                s.blocks,
                s.free_blocks,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            reply,
            self.fs
                .setxattr(self.ino_in(ino), name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        Self::xattr(
            reply,
            size,
            self.fs.getxattr(self.ino_in(ino), name.as_bytes()),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        Self::xattr(reply, size, self.fs.listxattr(self.ino_in(ino)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(
            reply,
            self.fs.removexattr(self.ino_in(ino), name.as_bytes()),
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only says
        // whether the inode exists.
        Self::empty(reply, self.fs.getattr(self.ino_in(ino)).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let write = wants_write(flags);
        let mode = libc::S_IFREG | (mode & 0o7777 & !umask);
        let result = self
            .fs
            .mknod(
                self.ino_in(parent),
                name.as_bytes(),
                mode,
                0,
                req.uid(),
                req.gid(),
            )
            .and_then(|a| self.fs.open(a.ino, write).map(|(_, multi)| (a, multi)));
        if let Ok((a, _)) = &result {
            self.fs.remember(a);
        }
        match result {
            Ok((a, multi)) => reply.created(
                &self.opts.entry_ttl,
                &self.attr(&a),
                Generation(a.generation),
                handle(write),
                open_flags(multi),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            reply,
            self.fs.fallocate(self.ino_in(ino), offset, length, mode),
        );
    }

    // What atsfs does not implement is answered without a log line per call (fuser's
    // defaults log a WARN each time: a Python open() asks TCGETS).

    /// No ioctl is implemented: ENOTTY, "not a terminal", as a file system without
    /// ioctls answers (the kernel would turn ENOSYS into ENOTTY too).
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        tracing::trace!(ino = ino.0, cmd, "ioctl not implemented: ENOTTY");
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    /// SEEK_DATA / SEEK_HOLE: ENOSYS, after which the kernel answers them itself
    /// (the whole file is data) and asks no more.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    /// ENOSYS: the kernel copies through read and write instead, and asks no more.
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    /// ENOSYS: the kernel then treats the file as always ready, and asks no more.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }
}

/// Parses `-o` options into FUSE options and the core's mount options (commit
/// interval, read-only, access times).
pub fn parse_options(
    list: &[String],
    opts: &mut FuseOptions,
    mount: &mut crate::fs::MountOptions,
) -> Result<()> {
    use crate::fs::atime::AtimeMode;
    for item in list
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let secs = |v: Option<&str>| -> Result<Duration> {
            let text = v.with_context(|| format!("option {key} needs a value, like {key}=1"))?;
            let secs: f64 = text
                .parse()
                .with_context(|| format!("option {key}: '{text}' is not a number of seconds"))?;
            if !(0.0..=86400.0).contains(&secs) {
                bail!("option {key}: {secs} seconds is out of range");
            }
            Ok(Duration::from_secs_f64(secs))
        };
        match key {
            "attr_timeout" => opts.attr_ttl = secs(value)?,
            "entry_timeout" => opts.entry_ttl = secs(value)?,
            "commit_interval" => {
                mount.commit_interval = secs(value)?.max(Duration::from_millis(10))
            }
            "allow_other" => opts.allow_other = true,
            "noallow_other" => opts.allow_other = false,
            "default_permissions" => opts.default_permissions = true,
            "nodefault_permissions" => opts.default_permissions = false,
            "threads" => {
                let text = value.context("option threads needs a value, like threads=4")?;
                opts.threads = text
                    .parse()
                    .ok()
                    .filter(|&n| (1..=64).contains(&n))
                    .with_context(|| format!("threads={text}: give 1 to 64"))?;
            }
            "readahead_kb" => {
                let text =
                    value.context("option readahead_kb needs a value, like readahead_kb=4096")?;
                opts.readahead_kb =
                    text.parse()
                        .ok()
                        .filter(|&n| n <= 1 << 20)
                        .with_context(|| {
                            format!("readahead_kb={text}: give 0 (the kernel's default) to 1048576")
                        })?;
            }
            "async_dio" => opts.async_dio = true,
            "noasync_dio" => opts.async_dio = false,
            "ro" => mount.read_only = true,
            "rw" => mount.read_only = false,
            "relatime" | "atime" => mount.atime = AtimeMode::Relatime,
            "noatime" => mount.atime = AtimeMode::NoAtime,
            "strictatime" => mount.atime = AtimeMode::StrictAtime,
            "nodiratime" => mount.nodiratime = true,
            "diratime" => mount.nodiratime = false,
            "remount" => bail!(
                "remount: an atsfs mount cannot change its options while mounted (the mode \
                 of a host, read-only or read-write, is decided when it joins the volume); \
                 unmount and mount again with the new options"
            ),
            "lazytime" => bail!(
                "lazytime is not supported: atime updates already go with the next periodic \
                 commit, never a write of their own (relatime writes at most one per file \
                 per change or day); use relatime (the default) or noatime"
            ),
            "nosuid" => opts.nosuid = true,
            "suid" => opts.nosuid = false,
            "nodev" => opts.nodev = true,
            "dev" => opts.nodev = false,
            "noexec" => opts.noexec = true,
            "exec" => opts.noexec = false,
            "sync" | "dirsync" => bail!(
                "{key} is not supported: atsfs commits every commit_interval and on fsync; \
                 use fsync (or open with O_SYNC / O_DSYNC) where a write must be durable at \
                 once, or a shorter commit_interval=S"
            ),
            "defaults" | "async" | "auto" | "noauto" | "nofail" | "user" | "nouser"
            | "_netdev" => {}
            other => bail!(
                "unknown mount option '{other}' (known: ro, rw, relatime, noatime, strictatime, \
                 nodiratime, nosuid, nodev, noexec, attr_timeout=S, entry_timeout=S, commit_interval=S, allow_other, \
                 noallow_other, default_permissions, nodefault_permissions, threads=N, \
                 readahead_kb=N, async_dio, noasync_dio)"
            ),
        }
    }
    Ok(())
}

/// The `major:minor` device of the mount on `mountpoint`, from /proc/self/mountinfo
/// (a stat of the mount point would be a FUSE request nobody serves yet).
fn mount_device(mountinfo: &str, mountpoint: &Path) -> Option<String> {
    let want = mountpoint.as_os_str().as_bytes();
    // Fields: id parent major:minor root mount-point ...; the last mount wins.
    mountinfo.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let point = fields.nth(1)?;
        (unescape_mountinfo(point) == want).then(|| device.to_string())
    })
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
pub fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Sets the read-ahead of the mount's backing device info (sysfs, root only).
fn set_readahead(mountpoint: &Path, kb: u32) -> Result<()> {
    let parent = mountpoint
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let canonical = std::fs::canonicalize(parent)
        .map(|parent| match mountpoint.file_name() {
            Some(name) => parent.join(name),
            None => parent,
        })
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let device = mount_device(&mountinfo, &canonical)
        .with_context(|| format!("{} is not in /proc/self/mountinfo", canonical.display()))?;
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    std::fs::write(&knob, format!("{kb}\n")).with_context(|| format!("writing {knob}"))?;
    tracing::debug!(kb, "read-ahead set through {knob}");
    Ok(())
}

/// The kernel's caches of this mount, invalidated through the session's notifier
/// when the core says another host may change what they hold.
///
/// Attributes only: no name (dentry) or page invalidation. Those make the kernel
/// wait for the directory's inode lock or a page lock, which a request waiting for
/// this daemon may hold; if the daemon is killed (kill -9, the OOM killer) while a
/// notification waits there, that thread cannot die, the FUSE device stays open,
/// the request is never aborted, and the mount hangs for good (seen in
/// tests/stress.rs). Names expire with the entry TTL instead (docs/locking.md).
struct FuseCache {
    notifier: fuser::Notifier,
    root: Ino,
}

fn node_id(root: Ino, ino: Ino) -> INodeNo {
    INodeNo(if ino == root { 1 } else { ino })
}

impl crate::fs::KernelCache for FuseCache {
    /// Attributes only (offset -1): the kernel then takes no page or inode lock, so
    /// this is safe from any thread that does not hold the core lock, also while
    /// serving a request for the same inode; it is sent before that request's reply.
    fn inval_attrs(&self, ino: Ino) {
        if let Err(e) = self.notifier.inval_inode(node_id(self.root, ino), -1, 0) {
            tracing::trace!(ino, "attribute invalidation: {e}");
        }
    }
}

/// A mounted FUSE session, ready to serve.
pub struct Mounted {
    session: fuser::Session<AtsFuse>,
}

impl Mounted {
    /// Mounts: when this returns, the kernel has completed the FUSE handshake and the
    /// mount point is live.
    pub fn mount(fs: Arc<Fs>, mountpoint: &Path, opts: FuseOptions) -> Result<Mounted> {
        let mut mount_options = vec![
            // The source column of /proc/self/mountinfo: the device, as mount(8) shows it.
            MountOption::FSName(opts.fsname.clone()),
            // The type `fuse.atsfs`. fuser's own mount(2) as root drops
            // `MountOption::Subtype` (the type stays `fuse`), so the subtype goes to the
            // kernel as a mount parameter, which it takes since Linux 5.4 (and
            // fusermount3, for a non-root mount, reads it as its own subtype option).
            MountOption::CUSTOM("subtype=atsfs".into()),
            if opts.nodev {
                MountOption::NoDev
            } else {
                MountOption::Dev
            },
            if opts.nosuid {
                MountOption::NoSuid
            } else {
                MountOption::Suid
            },
            if opts.noexec {
                MountOption::NoExec
            } else {
                MountOption::Exec
            },
        ];
        if opts.default_permissions {
            mount_options.push(MountOption::DefaultPermissions);
        }
        // The kernel refuses changes on a read-only mount itself (EROFS before a
        // request is sent); the daemon refuses them too, should one arrive. And the
        // mount shows its access-time mode (the kernel leaves FUSE atimes to the
        // daemon either way).
        if fs.options.read_only {
            mount_options.push(MountOption::RO);
        }
        if fs.options.atime == crate::fs::atime::AtimeMode::NoAtime {
            mount_options.push(MountOption::NoAtime);
        }
        let mut config = Config::default();
        config.mount_options = mount_options;
        config.acl = if opts.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(opts.threads);
        config.clone_fd = true;
        let threads = opts.threads;
        let readahead_kb = opts.readahead_kb;
        let root = fs.root();
        let session = fuser::Session::new(AtsFuse::new(fs.clone(), opts), mountpoint, &config)
            .with_context(|| format!("mounting on {}", mountpoint.display()))?;
        fs.set_kernel_cache(Box::new(FuseCache {
            notifier: session.notifier(),
            root,
        }));
        tracing::info!(threads, "mounted on {}", mountpoint.display());
        if readahead_kb > 0 {
            if let Err(e) = set_readahead(mountpoint, readahead_kb) {
                tracing::warn!(
                    "could not set the read-ahead of {} to {readahead_kb} KiB \
                     (sequential reads stay slower; needs root): {e:#}",
                    mountpoint.display()
                );
            }
        }
        Ok(Mounted { session })
    }

    /// Something that unmounts the session from another thread (signal handling).
    pub fn unmounter(&mut self) -> fuser::SessionUnmounter {
        self.session.unmount_callable()
    }

    /// Serves requests until the file system is unmounted.
    pub fn run(self) -> Result<()> {
        self.session.run().context("serving FUSE requests")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_device_finds_the_last_mount_on_a_path_with_escapes() {
        let info = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 22 0:40 / /tmp/a\\040b rw,nosuid - fuse.atsfs a.img rw
91 22 0:41 / /tmp/c rw - fuse.atsfs c.img rw
92 90 0:42 / /tmp/a\\040b rw - fuse.atsfs d.img rw
";
        assert_eq!(
            mount_device(info, Path::new("/tmp/a b")).as_deref(),
            Some("0:42")
        );
        assert_eq!(
            mount_device(info, Path::new("/tmp/c")).as_deref(),
            Some("0:41")
        );
        assert_eq!(mount_device(info, Path::new("/tmp/nope")), None);
        assert_eq!(unescape_mountinfo("x\\134y\\01"), b"x\\y\\01".to_vec());
    }

    #[test]
    fn readahead_option_is_parsed_and_bounded() {
        let mut opts = FuseOptions::default();
        let mut mount = mount_options();
        parse_options(&["readahead_kb=1024".into()], &mut opts, &mut mount).unwrap();
        assert_eq!(opts.readahead_kb, 1024);
        parse_options(&["readahead_kb=0".into()], &mut opts, &mut mount).unwrap();
        assert_eq!(opts.readahead_kb, 0);
        assert!(parse_options(&["readahead_kb=x".into()], &mut opts, &mut mount).is_err());
        assert!(parse_options(&["readahead_kb".into()], &mut opts, &mut mount).is_err());
    }

    #[test]
    fn async_dio_is_on_unless_turned_off() {
        let mut opts = FuseOptions::default();
        let mut mount = mount_options();
        assert!(opts.async_dio);
        parse_options(&["rw,noasync_dio".into()], &mut opts, &mut mount).unwrap();
        assert!(!opts.async_dio);
        parse_options(&["async_dio".into()], &mut opts, &mut mount).unwrap();
        assert!(opts.async_dio);
    }

    #[test]
    fn kernel_flags_are_parsed_and_sync_is_refused_with_a_reason() {
        let mut opts = FuseOptions::default();
        let mut mount = mount_options();
        assert!(!opts.nosuid && !opts.nodev && !opts.noexec);
        parse_options(&["nosuid,nodev,noexec,async".into()], &mut opts, &mut mount).unwrap();
        assert!(opts.nosuid && opts.nodev && opts.noexec);
        parse_options(&["suid,dev,exec".into()], &mut opts, &mut mount).unwrap();
        assert!(!opts.nosuid && !opts.nodev && !opts.noexec);
        for refused in ["sync", "dirsync"] {
            let e = parse_options(&[refused.into()], &mut opts, &mut mount).unwrap_err();
            assert!(e.to_string().contains("fsync"), "{refused}: {e}");
        }
    }

    fn mount_options() -> crate::fs::MountOptions {
        crate::fs::MountOptions::new(crate::cluster::HostUuid([1; 16]))
    }

    #[test]
    fn ro_and_atime_options_reach_the_mount_options() {
        use crate::fs::atime::AtimeMode;
        let mut opts = FuseOptions::default();
        let mut mount = mount_options();
        assert!(!mount.read_only);
        assert_eq!(mount.atime, AtimeMode::Relatime);
        parse_options(
            &["defaults,ro,noatime,_netdev".into()],
            &mut opts,
            &mut mount,
        )
        .unwrap();
        assert!(mount.read_only);
        assert_eq!(mount.atime, AtimeMode::NoAtime);
        parse_options(
            &["rw".into(), "strictatime,nodiratime".into()],
            &mut opts,
            &mut mount,
        )
        .unwrap();
        assert!(!mount.read_only);
        assert_eq!(mount.atime, AtimeMode::StrictAtime);
        assert!(mount.nodiratime);
        parse_options(&["relatime".into()], &mut opts, &mut mount).unwrap();
        assert_eq!(mount.atime, AtimeMode::Relatime);
        for refused in ["remount,ro", "lazytime", "bogus"] {
            let err = parse_options(&[refused.into()], &mut opts, &mut mount).unwrap_err();
            let first = refused.split(',').next().unwrap_or(refused);
            assert!(err.to_string().contains(first), "{refused}: {err}");
        }
    }
}
