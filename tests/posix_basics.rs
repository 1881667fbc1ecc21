//! POSIX behaviour of a real FUSE mount, and that everything survives an unmount.
//!
//! `acceptance_everything_survives_a_remount` is the acceptance scenario of the
//! single-host milestone: fill a fresh volume with every kind of object and change,
//! record every path, mount again, compare, and check with fsck. The other tests
//! each look at one corner (rename flags, special files, xattrs, statfs, error
//! numbers, a large directory).
//!
//! Needs root and /dev/fuse; without them each test prints "skipped" and passes.

mod common;

use common::{assert_fsck_clean, cpath, last_errno, MountSpec, Scratch};
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// The volume size of every test here.
const IMAGE_BYTES: u64 = 512 * MIB;
/// Files larger than this are hashed by sampled windows (see `hash_file`): reading
/// 5 GiB of holes through a debug build twice would take most of a minute.
const FULL_HASH_BYTES_MAX: u64 = 256 * MIB;

// ---------------------------------------------------------------------------------
// Recording a tree

/// What a path looks like from outside: everything a user would notice changing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    kind: &'static str,
    /// Permission bits with setuid/setgid/sticky.
    mode: u32,
    size: u64,
    nlink: u64,
    mtime: (i64, i64),
    uid: u32,
    gid: u32,
    /// File: content hash; symlink: target; device: rdev; otherwise empty.
    content: String,
    /// The first path (in sorted order) of this inode: hard links share it.
    link_group: PathBuf,
}

fn kind_of(ft: &fs::FileType) -> &'static str {
    if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "unknown"
    }
}

/// Records every path under `root` (relative to it), recursively.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Record> {
    let mut out = BTreeMap::new();
    let mut first_path_of_ino: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&relative))
            .unwrap_or_else(|e| panic!("listing {}: {e}", relative.display()))
            .map(|entry| entry.expect("directory entry").file_name())
            .collect();
        names.sort();
        for name in names {
            let path = relative.join(&name);
            let full = root.join(&path);
            let meta = fs::symlink_metadata(&full)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", full.display()));
            let kind = kind_of(&meta.file_type());
            let content = match kind {
                "file" => format!("{:032x}", hash_file(&full, meta.len())),
                "symlink" => fs::read_link(&full)
                    .expect("readlink")
                    .display()
                    .to_string(),
                "char" | "block" => format!("rdev {:#x}", meta.rdev()),
                _ => String::new(),
            };
            if kind == "dir" {
                pending.push(path.clone());
            }
            let link_group = first_path_of_ino
                .entry(meta.ino())
                .or_insert_with(|| path.clone())
                .clone();
            let record = Record {
                kind,
                mode: meta.mode() & 0o7777,
                size: meta.len(),
                nlink: meta.nlink(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                uid: meta.uid(),
                gid: meta.gid(),
                content,
                link_group,
            };
            out.insert(path, record);
        }
    }
    out
}

/// A content hash. Files up to `FULL_HASH_BYTES_MAX` are hashed whole; larger ones
/// by windows: the first 2 MiB of every GiB and the last MiB (the tests put their
/// data of large sparse files inside those windows).
fn hash_file(path: &Path, len: u64) -> u128 {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut windows = Vec::new();
    if len <= FULL_HASH_BYTES_MAX {
        windows.push((0, len));
    } else {
        let mut start = 0;
        while start < len {
            windows.push((start, (2 * MIB).min(len - start)));
            start += GIB;
        }
        windows.push((len - MIB, MIB));
    }
    let mut buf = vec![0u8; MIB as usize];
    for (start, window_len) in windows {
        file.seek(SeekFrom::Start(start)).expect("seek");
        let mut left = window_len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let got = file.read(&mut buf[..want]).expect("read");
            assert!(got > 0, "{} ended early at {start}", path.display());
            hasher.update(&buf[..got]);
            left -= got as u64;
        }
    }
    hasher.digest128()
}

/// Asserts that two snapshots are equal, listing the differences if not.
fn assert_same_tree(before: &BTreeMap<PathBuf, Record>, after: &BTreeMap<PathBuf, Record>) {
    let mut problems = Vec::new();
    for (path, old) in before {
        match after.get(path) {
            None => problems.push(format!("{} is gone", path.display())),
            Some(new) if new != old => problems.push(format!(
                "{} changed:\n   before {old:?}\n   after  {new:?}",
                path.display()
            )),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        problems.push(format!("{} appeared", path.display()));
    }
    assert!(
        problems.is_empty(),
        "{} of {} paths differ after the remount (first 20):\n{}",
        problems.len(),
        before.len(),
        problems[..problems.len().min(20)].join("\n")
    );
}

// ---------------------------------------------------------------------------------
// Filling a volume

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

fn write_file(path: &Path, bytes: &[u8]) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(bytes).expect("write");
}

/// 1,000 small files of 0 to 8 KiB under `small/`.
fn write_small_files(root: &Path) {
    fs::create_dir(root.join("small")).expect("mkdir small");
    for i in 0..1000u64 {
        let len = (i * 37 % (8 * KIB + 1)) as usize;
        write_file(&root.join(format!("small/f{i:04}")), &random_bytes(i, len));
    }
}

/// A 64 MiB file of random bytes, written in 1 MiB pieces and fsynced; its hash.
fn write_big_random(path: &Path) -> u128 {
    let mut file = File::create(path).expect("create big file");
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for i in 0..64u64 {
        let chunk = random_bytes(1_000_000 + i, MIB as usize);
        hasher.update(&chunk);
        file.write_all(&chunk).expect("write big file");
    }
    file.sync_all().expect("fsync big file");
    hasher.digest128()
}

/// Symlinks, a hard link, renames of a file and a directory, chmods, truncates.
fn change_names_and_attributes(root: &Path) {
    std::os::unix::fs::symlink("big.bin", root.join("big.link")).expect("symlink");
    std::os::unix::fs::symlink("no/such/target", root.join("dangling.link")).expect("symlink");
    fs::hard_link(root.join("small/f0000"), root.join("hardlink")).expect("link");
    fs::rename(root.join("small/f0001"), root.join("renamed")).expect("rename file");
    fs::create_dir_all(root.join("dir-old/inner")).expect("mkdir");
    write_file(
        &root.join("dir-old/inner/file"),
        b"inside a renamed directory\n",
    );
    fs::rename(root.join("dir-old"), root.join("dir-new")).expect("rename dir");
    let chmod = |path: &str, mode: u32| {
        fs::set_permissions(root.join(path), fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {path}: {e}"));
    };
    chmod("small/f0002", 0o600);
    chmod("renamed", 0o4751);
    chmod("dir-new/inner", 0o700);
    write_file(
        &root.join("trunc-shrink"),
        &random_bytes(7, 100 * KIB as usize),
    );
    let shrink = OpenOptions::new()
        .write(true)
        .open(root.join("trunc-shrink"));
    shrink
        .expect("open")
        .set_len(12_345)
        .expect("truncate down");
    write_file(&root.join("trunc-grow"), &random_bytes(8, 1000));
    let grow = OpenOptions::new().write(true).open(root.join("trunc-grow"));
    grow.expect("open")
        .set_len(3 * MIB + 5)
        .expect("truncate up");
    File::create(root.join("empty")).expect("create empty");
}

/// Where the data of the sparse file lies: past 4 GiB, inside a hash window.
const SPARSE_DATA_OFFSET: u64 = 4 * GIB + 4096;

/// A 5 GiB sparse file with 1 MiB of data past 4 GiB and 4 KiB at its start.
fn write_sparse(path: &Path) -> Vec<u8> {
    let mut file = File::create(path).expect("create sparse");
    file.set_len(5 * GIB).expect("set_len 5 GiB");
    file.write_all(&random_bytes(9, 4096)).expect("write head");
    let data = random_bytes(10, MIB as usize);
    file.seek(SeekFrom::Start(SPARSE_DATA_OFFSET))
        .expect("seek");
    file.write_all(&data).expect("write past 4 GiB");
    file.sync_all().expect("fsync sparse");
    data
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = File::open(path).expect("open");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).expect("read");
    buf
}

/// Checks what the writes above promise, on the live mount.
fn check_contents(root: &Path, big_hash: u128, sparse_data: &[u8]) {
    let big = root.join("big.bin");
    assert_eq!(
        hash_file(&big, 64 * MIB),
        big_hash,
        "big.bin reads back wrong"
    );
    let grown = fs::read(root.join("trunc-grow")).expect("read trunc-grow");
    assert_eq!(grown.len() as u64, 3 * MIB + 5);
    assert_eq!(&grown[..1000], &random_bytes(8, 1000)[..]);
    assert!(
        grown[1000..].iter().all(|&b| b == 0),
        "grown tail is not zero"
    );
    let shrunk = fs::read(root.join("trunc-shrink")).expect("read trunc-shrink");
    assert_eq!(shrunk, random_bytes(7, 100 * KIB as usize)[..12_345]);
    let sparse = root.join("sparse.bin");
    assert_eq!(fs::metadata(&sparse).expect("stat").len(), 5 * GIB);
    assert_eq!(
        read_at(&sparse, SPARSE_DATA_OFFSET, sparse_data.len()),
        sparse_data
    );
    assert!(
        read_at(&sparse, 2 * GIB, 4096).iter().all(|&b| b == 0),
        "hole not zero"
    );
    let hard = fs::metadata(root.join("hardlink")).expect("stat hardlink");
    let orig = fs::metadata(root.join("small/f0000")).expect("stat f0000");
    assert_eq!((hard.ino(), hard.nlink()), (orig.ino(), 2), "hard link");
    assert!(!root.join("small/f0001").exists() && !root.join("dir-old").exists());
}

#[test]
fn acceptance_everything_survives_a_remount() {
    require_fuse!();
    let scratch = Scratch::new("acceptance");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let root = mount.path().to_path_buf();

    let started = Instant::now();
    write_small_files(&root);
    let big_hash = write_big_random(&root.join("big.bin"));
    change_names_and_attributes(&root);
    let sparse_data = write_sparse(&root.join("sparse.bin"));
    eprintln!("filled the volume in {:?}", started.elapsed());
    check_contents(&root, big_hash, &sparse_data);
    let before = snapshot(&root);
    assert!(before.len() > 1000, "only {} paths recorded", before.len());

    let mount = mount.remount();
    let after = snapshot(mount.path());
    assert_same_tree(&before, &after);
    check_contents(mount.path(), big_hash, &sparse_data);
    eprintln!("{} paths identical after the remount", after.len());
    mount.unmount();
    assert_fsck_clean(&image);
}

// ---------------------------------------------------------------------------------
// Corners

fn renameat2(from: &Path, to: &Path, flags: u32) -> Result<(), i32> {
    let (from, to) = (cpath(from), cpath(to));
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD is a valid dirfd.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

#[test]
fn rename_noreplace_and_exchange() {
    require_fuse!();
    let scratch = Scratch::new("renameat2");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let p = |name: &str| mount.join(name);
    write_file(&p("a"), b"A");
    write_file(&p("b"), b"B");
    fs::create_dir(p("dir")).expect("mkdir");
    write_file(&p("dir/inside"), b"I");

    assert_eq!(
        renameat2(&p("a"), &p("b"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST),
        "RENAME_NOREPLACE onto an existing name"
    );
    assert_eq!(fs::read(p("b")).expect("read b"), b"B", "b was replaced");
    renameat2(&p("a"), &p("c"), libc::RENAME_NOREPLACE).expect("NOREPLACE to a new name");
    assert!(!p("a").exists());

    renameat2(&p("b"), &p("c"), libc::RENAME_EXCHANGE).expect("EXCHANGE two files");
    assert_eq!(fs::read(p("b")).expect("read b"), b"A");
    assert_eq!(fs::read(p("c")).expect("read c"), b"B");
    renameat2(&p("b"), &p("dir"), libc::RENAME_EXCHANGE).expect("EXCHANGE file and dir");
    assert_eq!(fs::read(p("b/inside")).expect("read b/inside"), b"I");
    assert_eq!(fs::read(p("dir")).expect("read dir"), b"A");
    assert_eq!(
        renameat2(&p("c"), &p("missing"), libc::RENAME_EXCHANGE),
        Err(libc::ENOENT),
        "RENAME_EXCHANGE with a missing target"
    );

    let mount = mount.remount();
    let p = |name: &str| mount.join(name);
    assert_eq!(fs::read(p("b/inside")).expect("read b/inside"), b"I");
    assert_eq!(fs::read(p("dir")).expect("read dir"), b"A");
    assert_eq!(fs::read(p("c")).expect("read c"), b"B");
    assert!(!p("a").exists());
    mount.unmount();
}

fn mknod(path: &Path, mode: u32, dev: u64) -> Result<(), i32> {
    let c = cpath(path);
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

#[test]
fn fifo_socket_and_device_nodes() {
    require_fuse!();
    let scratch = Scratch::new("mknod");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let null_dev = libc::makedev(1, 3);
    let loop_dev = libc::makedev(7, 0);
    mknod(&mount.join("fifo"), libc::S_IFIFO | 0o640, 0).expect("mknod fifo");
    mknod(&mount.join("socket"), libc::S_IFSOCK | 0o600, 0).expect("mknod socket");
    mknod(&mount.join("null"), libc::S_IFCHR | 0o666, null_dev).expect("mknod char");
    mknod(&mount.join("loop"), libc::S_IFBLK | 0o660, loop_dev).expect("mknod block");
    assert_eq!(
        mknod(&mount.join("fifo"), libc::S_IFIFO | 0o640, 0),
        Err(libc::EEXIST)
    );

    let check = |root: &Path| {
        let meta = |name: &str| fs::symlink_metadata(root.join(name)).expect("lstat");
        assert!(meta("fifo").file_type().is_fifo());
        assert_eq!(meta("fifo").mode() & 0o7777, 0o640);
        assert!(meta("socket").file_type().is_socket());
        assert!(meta("null").file_type().is_char_device());
        assert_eq!(meta("null").rdev(), null_dev);
        assert!(meta("loop").file_type().is_block_device());
        assert_eq!(meta("loop").rdev(), loop_dev);
    };
    check(mount.path());
    let mount = mount.remount();
    check(mount.path());
    mount.unmount();
}

fn setxattr(path: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let (c, n) = (cpath(path), std::ffi::CString::new(name).expect("name"));
    // SAFETY: valid C strings; value points to value.len() readable bytes.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (c, n) = (cpath(path), std::ffi::CString::new(name).expect("name"));
    // SAFETY: a size query with a null buffer of length 0.
    let size = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(last_errno());
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: buf has buf.len() writable bytes.
    let got = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(last_errno());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

fn listxattr(path: &Path) -> Vec<String> {
    let c = cpath(path);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: buf has buf.len() writable bytes.
    let got = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(got >= 0, "listxattr: errno {}", last_errno());
    buf.truncate(got as usize);
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    names.sort();
    names
}

fn removexattr(path: &Path, name: &str) -> Result<(), i32> {
    let (c, n) = (cpath(path), std::ffi::CString::new(name).expect("name"));
    // SAFETY: valid C strings.
    let rc = unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

#[test]
fn extended_attributes() {
    require_fuse!();
    let scratch = Scratch::new("xattr");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let file = mount.join("file");
    let dir = mount.join("dir");
    write_file(&file, b"data");
    fs::create_dir(&dir).expect("mkdir");
    let large = random_bytes(11, 3000);

    setxattr(&file, "user.color", b"blue", 0).expect("setxattr");
    setxattr(&file, "user.large", &large, 0).expect("setxattr 3000 bytes");
    setxattr(&file, "user.empty", b"", 0).expect("setxattr empty value");
    setxattr(&dir, "user.on-dir", b"yes", 0).expect("setxattr on a directory");
    assert_eq!(
        setxattr(&file, "user.color", b"red", libc::XATTR_CREATE),
        Err(libc::EEXIST),
        "XATTR_CREATE of an existing name"
    );
    assert_eq!(
        setxattr(&file, "user.nope", b"x", libc::XATTR_REPLACE),
        Err(libc::ENODATA),
        "XATTR_REPLACE of a missing name"
    );
    setxattr(&file, "user.color", b"green", libc::XATTR_REPLACE).expect("XATTR_REPLACE");
    assert_eq!(getxattr(&file, "user.missing"), Err(libc::ENODATA));
    setxattr(&file, "user.gone", b"soon", 0).expect("setxattr");
    removexattr(&file, "user.gone").expect("removexattr");
    assert_eq!(removexattr(&file, "user.gone"), Err(libc::ENODATA));

    let check = |file: &Path, dir: &Path| {
        assert_eq!(getxattr(file, "user.color").expect("get color"), b"green");
        assert_eq!(getxattr(file, "user.large").expect("get large"), large);
        assert_eq!(getxattr(file, "user.empty").expect("get empty"), b"");
        assert_eq!(getxattr(dir, "user.on-dir").expect("get on-dir"), b"yes");
        assert_eq!(
            listxattr(file),
            ["user.color", "user.empty", "user.large"],
            "listxattr"
        );
    };
    check(&file, &dir);
    let mount = mount.remount();
    check(&mount.join("file"), &mount.join("dir"));
    mount.unmount();
}

fn statvfs(path: &Path) -> libc::statvfs {
    let c = cpath(path);
    // SAFETY: statvfs is plain old data; an all-zero value is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid path, st a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs: errno {}", last_errno());
    st
}

#[test]
fn direct_io_reads_what_buffered_io_wrote() {
    require_fuse!();
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let scratch = Scratch::new("odirect");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let path = mount.path().join("f");
    let data = random_bytes(7, 6 << 20);
    write_file(&path, &data);
    // Not synced: the daemon's O_DIRECT reads of the image must still see it.
    let direct = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open with O_DIRECT");
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096).expect("layout");
    // SAFETY: the layout has a non-zero size; the memory is freed below.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!ptr.is_null());
    // SAFETY: ptr points to layout.size() bytes we own until dealloc.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, layout.size()) };
    let before = stats_json(mount.path());
    for chunk in 0..4u64 {
        direct
            .read_exact_at(buf, chunk << 20)
            .expect("O_DIRECT read");
        let at = (chunk << 20) as usize;
        assert!(buf[..] == data[at..at + (1 << 20)], "chunk {chunk} differs");
    }
    // Sequential O_DIRECT reads are read ahead; a buffered write to a range read
    // ahead (in the page cache until the kernel writes it back before the direct
    // read) is what the next read returns.
    let buffered = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for buffered writes");
    buffered
        .write_all_at(&[0x77; 1 << 20], 4 << 20)
        .expect("buffered write");
    direct.read_exact_at(buf, 4 << 20).expect("O_DIRECT read");
    assert!(
        buf.iter().all(|&b| b == 0x77),
        "an O_DIRECT read returned what was read ahead before a buffered write"
    );
    direct.read_exact_at(buf, 5 << 20).expect("O_DIRECT read");
    assert!(buf[..] == data[5 << 20..6 << 20], "chunk 5 differs");
    let after = stats_json(mount.path());
    let grew = |key: &str| after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
    assert!(
        grew("readaheads") >= 2 && grew("readahead_hits") >= 1,
        "sequential O_DIRECT reads were not read ahead: {after}"
    );
    // An O_DIRECT write is read back by buffered I/O, and the other way round.
    buf.fill(0x5a);
    direct.write_all_at(buf, 1 << 20).expect("O_DIRECT write");
    let back = read_at(&path, 1 << 20, 1 << 20);
    assert!(
        back.iter().all(|&b| b == 0x5a),
        "buffered read after O_DIRECT write"
    );
    direct.read_exact_at(buf, 0).expect("O_DIRECT read");
    assert!(buf[..] == data[..1 << 20]);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
}

#[test]
fn statfs_reports_the_volume() {
    require_fuse!();
    let scratch = Scratch::new("statfs");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let st = statvfs(mount.path());
    eprintln!(
        "statfs: bsize {} frsize {} blocks {} bfree {} bavail {} files {} ffree {} namemax {}",
        st.f_bsize,
        st.f_frsize,
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
        st.f_namemax
    );
    assert_eq!(st.f_frsize, 4096);
    let total = st.f_blocks * st.f_frsize;
    assert!(
        total <= IMAGE_BYTES && total > IMAGE_BYTES / 2,
        "{total} bytes total on a {IMAGE_BYTES} byte volume"
    );
    assert!(st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_bfree);
    assert_eq!(st.f_namemax, 255);

    let mut file = File::create(mount.join("eight-mib")).expect("create");
    file.write_all(&random_bytes(12, 8 * MIB as usize))
        .expect("write");
    file.sync_all().expect("fsync");
    let after = statvfs(mount.path());
    let used = st.f_bfree.saturating_sub(after.f_bfree) * after.f_frsize;
    assert!(used >= 8 * MIB, "writing 8 MiB used only {used} bytes");
    drop(file);
    fs::remove_file(mount.join("eight-mib")).expect("unlink");
    mount.unmount();
}

fn errno_of<T>(result: std::io::Result<T>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn error_numbers() {
    require_fuse!();
    let scratch = Scratch::new("errno");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let p = |name: &str| mount.join(name);
    let long = "n".repeat(256);
    let longest = "n".repeat(255);

    assert_eq!(errno_of(File::create(p(&long))), Some(libc::ENAMETOOLONG));
    assert_eq!(errno_of(fs::create_dir(p(&long))), Some(libc::ENAMETOOLONG));
    write_file(&p(&longest), b"255 bytes is the longest name");
    assert_eq!(
        errno_of(fs::rename(p(&longest), p(&long))),
        Some(libc::ENAMETOOLONG)
    );
    assert!(p(&longest).exists());

    fs::create_dir(p("full")).expect("mkdir");
    write_file(&p("full/file"), b"x");
    assert_eq!(errno_of(fs::remove_dir(p("full"))), Some(libc::ENOTEMPTY));
    fs::create_dir(p("empty-dir")).expect("mkdir");
    assert_eq!(
        errno_of(fs::rename(p("empty-dir"), p("full"))),
        Some(libc::ENOTEMPTY),
        "rename onto a non-empty directory"
    );

    assert_eq!(errno_of(fs::create_dir(p("full"))), Some(libc::EEXIST));
    let exclusive = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(p("full/file"));
    assert_eq!(errno_of(exclusive), Some(libc::EEXIST));
    assert_eq!(
        errno_of(fs::hard_link(p("full/file"), p(&longest))),
        Some(libc::EEXIST)
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("x", p("full/file"))),
        Some(libc::EEXIST)
    );

    assert_eq!(errno_of(File::open(p("missing"))), Some(libc::ENOENT));
    assert_eq!(
        errno_of(File::create(p("full/file/below"))),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        errno_of(fs::remove_dir(p("full/file"))),
        Some(libc::ENOTDIR)
    );
    assert_eq!(errno_of(fs::remove_file(p("full"))), Some(libc::EISDIR));
    let err = fs::read_dir(p("missing")).expect_err("listing a missing dir");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    mount.unmount();
}

#[test]
fn directory_of_100000_entries() {
    require_fuse!();
    const ENTRIES: usize = 100_000;
    let scratch = Scratch::new("bigdir");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let dir = mount.join("big");
    fs::create_dir(&dir).expect("mkdir");
    let name = |i: usize| format!("entry-{i:06}");

    let started = Instant::now();
    for i in 0..ENTRIES {
        File::create(dir.join(name(i))).unwrap_or_else(|e| panic!("create {}: {e}", name(i)));
    }
    eprintln!("created {ENTRIES} entries in {:?}", started.elapsed());
    let list = |dir: &Path| {
        let started = Instant::now();
        let names: Vec<String> = fs::read_dir(dir)
            .expect("opendir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        eprintln!("listed {} entries in {:?}", names.len(), started.elapsed());
        names
    };
    let check = |names: Vec<String>| {
        let unique: HashSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "readdir returned duplicates");
        assert_eq!(names.len(), ENTRIES, "readdir returned the wrong count");
        assert!(
            (0..ENTRIES).all(|i| unique.contains(&name(i))),
            "an entry is missing"
        );
    };
    check(list(&dir));
    let started = Instant::now();
    for i in (0..ENTRIES).step_by(997) {
        fs::metadata(dir.join(name(i))).unwrap_or_else(|e| panic!("stat {}: {e}", name(i)));
    }
    eprintln!("looked up 101 entries in {:?}", started.elapsed());
    assert_eq!(
        fs::metadata(&dir).expect("stat dir").nlink(),
        2,
        "a directory of files has 2 links"
    );

    let mount = mount.remount();
    check(list(&mount.join("big")));
    mount.unmount();
}

/// `atsfs stats MOUNTPOINT --json`, parsed.
fn stats_json(mountpoint: &Path) -> serde_json::Value {
    let out = std::process::Command::new(common::atsfs_bin())
        .args(["stats", "--json"])
        .arg(mountpoint)
        .output()
        .expect("run atsfs stats");
    assert!(
        out.status.success(),
        "atsfs stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

#[test]
fn stats_count_the_device_io_of_the_daemon() {
    require_fuse!();
    let scratch = Scratch::new("stats");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "host").mount();
    let before = stats_json(mount.path());
    for i in 0..100 {
        fs::write(mount.path().join(format!("f{i}")), b"some bytes").expect("write");
    }
    File::open(mount.path().join("f0"))
        .expect("open")
        .sync_all()
        .expect("fsync");
    let after = stats_json(mount.path());
    let grew = |key: &str| {
        let a = after["io"][key].as_u64().expect("a counter");
        let b = before["io"][key].as_u64().expect("a counter");
        assert!(a > b, "io.{key} did not grow: {b} -> {a}");
        a - b
    };
    // Each new file's data block is written, its lock taken by ATS; fsync flushes.
    assert!(grew("writes") >= 100);
    assert!(grew("caws") >= 100);
    grew("flushes");
    assert!(after["commits"].as_u64() > before["commits"].as_u64());
    // Only the mount's root answers; the name is read-only and not listed.
    let sub = std::process::Command::new(common::atsfs_bin())
        .args(["stats"])
        .arg(mount.path().join("f0"))
        .output()
        .expect("run atsfs stats");
    assert!(!sub.status.success());
    assert!(String::from_utf8_lossy(&sub.stderr).contains("not the root of an atsfs mount"));
    let root = cpath(mount.path());
    let value = b"1";
    // SAFETY: NUL-terminated path and name, a valid value buffer.
    let rc = unsafe {
        libc::setxattr(
            root.as_ptr(),
            c"user.atsfs.stats".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(last_errno(), libc::EPERM);
    let mut list = vec![0u8; 4096];
    // SAFETY: NUL-terminated path, a valid buffer of its length.
    let n = unsafe { libc::listxattr(root.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(n >= 0);
    assert!(!String::from_utf8_lossy(&list[..n as usize]).contains("atsfs.stats"));
    drop(mount);
    assert_fsck_clean(&image);
}
