use super::namei::{SetAttr, SetTime};
use super::*;
use crate::cluster::HostUuid;
use crate::format::Geometry;
use crate::lun::{Lun, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use std::time::Duration;

pub(crate) fn fresh_volume(bytes: u64) -> Arc<MemLun> {
    let lun = Arc::new(MemLun::new(bytes, 512));
    let opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ..MkfsOptions::default()
    };
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    lun
}

pub(crate) fn mount(lun: &Arc<MemLun>, host: u8) -> Arc<Fs> {
    let lun: Arc<dyn Lun> = lun.clone();
    Fs::mount(lun, MountOptions::new(HostUuid([host; 16]))).expect("mount")
}

fn names(fs: &Fs, dir: Ino) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let mut batch = Vec::new();
        fs.readdir(dir, offset, &mut |_, next, _, name| {
            batch.push((next, name.to_vec()));
            batch.len() >= 37
        })
        .expect("readdir");
        let Some(&(last, _)) = batch.last() else {
            break;
        };
        offset = last;
        out.extend(batch.into_iter().map(|(_, n)| n));
    }
    out
}

const REG: u32 = libc::S_IFREG | 0o644;

#[test]
fn create_lookup_readdir_and_persist_across_remount() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let root = fs.root();
    let a = fs.mknod(root, b"a", REG, 0, 1000, 1000).expect("create a");
    let d = fs.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir");
    assert_eq!(
        fs.mknod(root, b"a", REG, 0, 0, 0)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::EEXIST)
    );
    assert_eq!(fs.lookup(root, b"a").expect("lookup").ino, a.ino);
    assert_eq!(
        fs.lookup(root, b"nope").map_err(|e| e.errno()).err(),
        Some(libc::ENOENT)
    );
    assert_eq!(fs.getattr(root).expect("root").nlink, 3);
    assert_eq!(fs.getattr(d.ino).expect("d").nlink, 2);
    let mut listed = names(&fs, root);
    listed.sort();
    assert_eq!(
        listed,
        vec![b".".to_vec(), b"..".to_vec(), b"a".to_vec(), b"d".to_vec()]
    );
    fs.write_data(a.ino, 0, b"hello").expect("write");
    fs.unmount().expect("unmount");
    drop(fs);
    let fs = mount(&lun, 1);
    let a2 = fs.lookup(fs.root(), b"a").expect("lookup after remount");
    assert_eq!((a2.ino, a2.size, a2.uid, a2.mode), (a.ino, 5, 1000, REG));
    assert_eq!(fs.read_data(a.ino, 0, 100).expect("read"), b"hello");
}

#[test]
fn fsynced_data_survives_a_crash() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let root = fs.root();
    for i in 0..50u32 {
        let name = format!("f{i}");
        let f = fs
            .mknod(root, name.as_bytes(), REG, 0, 0, 0)
            .expect("create");
        fs.write_data(f.ino, 0, name.as_bytes()).expect("write");
        fs.fsync(f.ino, false).expect("fsync");
    }
    // Crash: no unmount. The slot stays live; the same host mounting again replays.
    drop(fs);
    let fs = mount(&lun, 1);
    for i in 0..50u32 {
        let name = format!("f{i}");
        let f = fs.lookup(fs.root(), name.as_bytes()).expect("fsynced file");
        assert_eq!(fs.read_data(f.ino, 0, 64).expect("read"), name.as_bytes());
    }
}

#[test]
fn reads_and_writes_at_any_offset_with_holes() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create");
    let pattern: Vec<u8> = (0..20000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs.write_data(f.ino, 1000, &pattern).expect("write");
    let far = 5u64 << 30;
    fs.write_data(f.ino, far, b"past 4 GiB").expect("far write");
    let attr = fs.getattr(f.ino).expect("attr");
    assert_eq!(attr.size, far + 10);
    assert!(
        attr.blocks_512 < 100,
        "sparse file uses {} sectors",
        attr.blocks_512
    );
    assert_eq!(fs.read_data(f.ino, 0, 1000).expect("hole"), vec![0; 1000]);
    assert_eq!(fs.read_data(f.ino, 1000, 20000).expect("data"), pattern);
    assert_eq!(
        fs.read_data(f.ino, 1u64 << 30, 4096).expect("hole"),
        vec![0; 4096]
    );
    assert_eq!(fs.read_data(f.ino, far, 100).expect("far"), b"past 4 GiB");
    // Overwrite in the middle of a block.
    fs.write_data(f.ino, 4000, b"XYZ").expect("overwrite");
    let back = fs.read_data(f.ino, 3998, 7).expect("read");
    assert_eq!(&back[2..5], b"XYZ");
    assert_eq!(back[0], pattern[2998]);
}

#[test]
fn truncate_zeroes_what_it_cut_and_frees_blocks() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let before = fs.statfs().expect("statfs").free_blocks;
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create");
    fs.write_data(f.ino, 0, &vec![0xab; 1 << 20])
        .expect("write");
    fs.setattr(
        f.ino,
        &SetAttr {
            size: Some(5000),
            ..SetAttr::default()
        },
    )
    .expect("shrink");
    fs.setattr(
        f.ino,
        &SetAttr {
            size: Some(9000),
            ..SetAttr::default()
        },
    )
    .expect("grow");
    let data = fs.read_data(f.ino, 0, 9000).expect("read");
    assert!(data[..5000].iter().all(|&b| b == 0xab));
    assert!(
        data[5000..].iter().all(|&b| b == 0),
        "bytes past the cut must read as zero"
    );
    fs.sync().expect("sync");
    fs.unlink(fs.root(), b"f").expect("unlink");
    fs.sync().expect("sync");
    assert_eq!(fs.statfs().expect("statfs").free_blocks, before);
}

#[test]
fn large_directories_split_and_list_every_entry_once() {
    let lun = fresh_volume(256 << 20);
    let fs = mount(&lun, 1);
    let d = fs.mkdir(fs.root(), b"big", 0o755, 0, 0).expect("mkdir").ino;
    let count = 12_000;
    for i in 0..count {
        fs.mknod(
            d,
            format!("entry-with-a-longish-name-{i:06}").as_bytes(),
            REG,
            0,
            0,
            0,
        )
        .expect("create");
    }
    let listed = names(&fs, d);
    assert_eq!(listed.len(), count + 2);
    let unique: std::collections::HashSet<_> = listed.iter().collect();
    assert_eq!(unique.len(), count + 2);
    for i in (0..count).step_by(997) {
        fs.lookup(d, format!("entry-with-a-longish-name-{i:06}").as_bytes())
            .expect("lookup");
    }
    assert_eq!(
        fs.rmdir(fs.root(), b"big").map_err(|e| e.errno()).err(),
        Some(libc::ENOTEMPTY)
    );
    for i in 0..count {
        fs.unlink(d, format!("entry-with-a-longish-name-{i:06}").as_bytes())
            .expect("unlink");
    }
    assert_eq!(names(&fs, d).len(), 2);
    fs.rmdir(fs.root(), b"big").expect("rmdir");
    fs.unmount().expect("unmount");
}

#[test]
fn rename_replaces_exchanges_and_refuses_loops() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let root = fs.root();
    let a = fs.mkdir(root, b"a", 0o755, 0, 0).expect("a").ino;
    let b = fs.mkdir(root, b"b", 0o755, 0, 0).expect("b").ino;
    let x = fs.mknod(a, b"x", REG, 0, 0, 0).expect("x").ino;
    let y = fs.mknod(b, b"y", REG, 0, 0, 0).expect("y").ino;
    // Replace y with x across directories.
    fs.rename(a, b"x", b, b"y", 0).expect("rename");
    assert_eq!(fs.lookup(b, b"y").expect("y").ino, x);
    assert_eq!(
        fs.getattr(y).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
    // NOREPLACE.
    fs.mknod(a, b"z", REG, 0, 0, 0).expect("z");
    assert_eq!(
        fs.rename(a, b"z", b, b"y", libc::RENAME_NOREPLACE)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::EEXIST)
    );
    // EXCHANGE a file and a directory between two parents.
    let sub = fs.mkdir(a, b"sub", 0o755, 0, 0).expect("sub").ino;
    assert_eq!(fs.getattr(a).expect("a").nlink, 3);
    fs.rename(a, b"sub", b, b"y", libc::RENAME_EXCHANGE)
        .expect("exchange");
    assert_eq!(fs.lookup(b, b"y").expect("y").ino, sub);
    assert_eq!(fs.lookup(a, b"sub").expect("sub").ino, x);
    assert_eq!(fs.getattr(a).expect("a").nlink, 2);
    assert_eq!(fs.getattr(b).expect("b").nlink, 3);
    let mut dotdot = 0;
    fs.readdir(sub, 1, &mut |ino, _, _, name| {
        if name == b".." {
            dotdot = ino;
        }
        true
    })
    .expect("readdir");
    assert_eq!(dotdot, b);
    // A directory cannot move into itself.
    assert_eq!(
        fs.rename(root, b"b", sub, b"loop", 0)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::EINVAL)
    );
    // Directory over a non-empty directory.
    fs.mknod(sub, b"f", REG, 0, 0, 0).expect("f");
    assert_eq!(
        fs.rename(root, b"a", b, b"y", 0)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::ENOTEMPTY)
    );
    // Directory over an empty directory in the same parent.
    fs.mkdir(root, b"empty", 0o755, 0, 0).expect("empty");
    let root_links = fs.getattr(root).expect("root").nlink;
    fs.rename(root, b"a", root, b"empty", 0)
        .expect("dir over empty dir");
    assert_eq!(fs.getattr(root).expect("root").nlink, root_links - 1);
}

#[test]
fn unlinked_open_files_stay_readable_until_the_last_close() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    fs.write_data(f, 0, b"still here").expect("write");
    fs.open(f, false).expect("open");
    fs.unlink(fs.root(), b"f").expect("unlink");
    assert_eq!(fs.read_data(f, 0, 100).expect("read"), b"still here");
    fs.release(f, false).expect("release");
    assert_eq!(
        fs.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
}

#[test]
fn hard_links_symlinks_and_xattrs() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let root = fs.root();
    let f = fs.mknod(root, b"f", REG, 0, 0, 0).expect("create").ino;
    fs.link(f, root, b"g").expect("link");
    assert_eq!(fs.getattr(f).expect("f").nlink, 2);
    fs.unlink(root, b"f").expect("unlink");
    assert_eq!(fs.getattr(f).expect("f").nlink, 1);
    let short = fs.symlink(root, b"s", b"g", 0, 0).expect("symlink").ino;
    assert_eq!(fs.readlink(short).expect("readlink"), b"g");
    let long_target = vec![b'x'; 4000];
    let long = fs
        .symlink(root, b"l", &long_target, 0, 0)
        .expect("long symlink")
        .ino;
    assert_eq!(fs.readlink(long).expect("readlink"), long_target);
    fs.setxattr(f, b"user.a", b"1", 0).expect("set");
    assert_eq!(
        fs.setxattr(f, b"user.a", b"2", libc::XATTR_CREATE)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::EEXIST)
    );
    assert_eq!(
        fs.setxattr(f, b"user.b", b"2", libc::XATTR_REPLACE)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::ENODATA)
    );
    fs.setxattr(f, b"user.b", b"22", 0).expect("set b");
    assert_eq!(fs.getxattr(f, b"user.b").expect("get"), b"22");
    assert_eq!(fs.listxattr(f).expect("list"), b"user.a\0user.b\0");
    assert_eq!(
        fs.setxattr(f, b"user.big", &vec![0; 4040], 0)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::ENOSPC)
    );
    fs.removexattr(f, b"user.a").expect("remove");
    assert_eq!(
        fs.getxattr(f, b"user.a").map_err(|e| e.errno()).err(),
        Some(libc::ENODATA)
    );
    fs.unmount().expect("unmount");
    let fs = mount(&lun, 1);
    assert_eq!(fs.getxattr(f, b"user.b").expect("get after remount"), b"22");
    assert_eq!(
        fs.readlink(long).expect("readlink after remount"),
        long_target
    );
}

#[test]
fn fragmented_files_move_their_extents_to_leaf_blocks() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    let g = fs.mknod(fs.root(), b"g", REG, 0, 0, 0).expect("create").ino;
    // Interleave two files so neither gets contiguous blocks.
    for i in 0..400u64 {
        fs.write_data(f, i * 8192, &i.to_le_bytes())
            .expect("write f");
        fs.write_data(g, i * 4096, &i.to_le_bytes())
            .expect("write g");
    }
    fs.unmount().expect("unmount");
    let fs = mount(&lun, 1);
    for i in 0..400u64 {
        assert_eq!(fs.read_data(f, i * 8192, 8).expect("read"), i.to_le_bytes());
        if i < 399 {
            assert_eq!(fs.read_data(f, i * 8192 + 4096, 8).expect("hole"), [0; 8]);
        }
    }
    fs.setattr(
        f,
        &SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    assert_eq!(fs.getattr(f).expect("attr").blocks_512, 8);
}

#[test]
fn fallocate_preallocates_punches_and_zeroes() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    fs.write_data(f, 0, &vec![1u8; 65536]).expect("write");
    fs.fallocate(f, 0, 1 << 20, 0).expect("preallocate");
    let attr = fs.getattr(f).expect("attr");
    assert_eq!(attr.size, 1 << 20);
    assert!(attr.blocks_512 >= (1 << 20) / 512);
    assert_eq!(
        fs.read_data(f, 65536, 4096).expect("unwritten"),
        vec![0; 4096]
    );
    fs.fallocate(
        f,
        1000,
        10000,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    )
    .expect("punch");
    let data = fs.read_data(f, 0, 65536).expect("read");
    assert!(data[..1000].iter().all(|&b| b == 1));
    assert!(data[1000..11000].iter().all(|&b| b == 0));
    assert!(data[11000..].iter().all(|&b| b == 1));
    fs.fallocate(f, 1 << 20, 4096, libc::FALLOC_FL_KEEP_SIZE)
        .expect("past eof");
    assert_eq!(fs.getattr(f).expect("attr").size, 1 << 20);
    assert_eq!(
        fs.fallocate(f, 0, 10, 0x40).map_err(|e| e.errno()).err(),
        Some(libc::EOPNOTSUPP)
    );
}

#[test]
fn a_full_volume_fails_cleanly_and_keeps_working() {
    let lun = fresh_volume(48 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match fs.write_data(f, written, &chunk) {
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOSPC);
                break;
            }
        }
        assert!(written < 1 << 30, "never ran out of space");
    }
    let size = fs.getattr(f).expect("attr").size;
    assert_eq!(size, written, "a failed write must not change the size");
    // Creating more files fails or succeeds cleanly; deleting frees space again.
    fs.unlink(fs.root(), b"f").expect("unlink");
    fs.sync().expect("sync");
    let g = fs
        .mknod(fs.root(), b"g", REG, 0, 0, 0)
        .expect("create after free")
        .ino;
    fs.write_data(g, 0, &chunk).expect("write after free");
    fs.unmount().expect("unmount");
}

#[test]
fn times_and_modes_are_set_as_asked() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    let when = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    let attr = fs
        .setattr(
            f,
            &SetAttr {
                mode: Some(0o4711),
                uid: Some(42),
                gid: Some(43),
                mtime: Some(SetTime::At(when)),
                atime: Some(SetTime::At(when)),
                ..SetAttr::default()
            },
        )
        .expect("setattr");
    assert_eq!(
        (attr.mode, attr.uid, attr.gid, attr.mtime, attr.atime),
        (libc::S_IFREG | 0o4711, 42, 43, when, when)
    );
    let before = std::time::UNIX_EPOCH - Duration::from_secs(1000);
    let attr = fs
        .setattr(
            f,
            &SetAttr {
                mtime: Some(SetTime::At(before)),
                ..SetAttr::default()
            },
        )
        .expect("old");
    assert_eq!(attr.mtime, before);
}

#[test]
fn two_hosts_share_one_volume() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    assert_ne!(a.slot().map(|s| s.0), b.slot().map(|s| s.0));
    let f = a
        .mknod(a.root(), b"from-a", REG, 0, 0, 0)
        .expect("create on a")
        .ino;
    a.write_data(f, 0, b"written on host a").expect("write");
    let seen = b.lookup(b.root(), b"from-a").expect("b sees a's file");
    assert_eq!(
        b.read_data(seen.ino, 0, 100).expect("read on b"),
        b"written on host a"
    );
    // Both create in one directory; every name appears once on both hosts.
    let d = a
        .mkdir(a.root(), b"shared", 0o755, 0, 0)
        .expect("mkdir")
        .ino;
    for i in 0..40 {
        a.mknod(d, format!("a{i}").as_bytes(), REG, 0, 0, 0)
            .expect("a create");
        b.mknod(d, format!("b{i}").as_bytes(), REG, 0, 0, 0)
            .expect("b create");
    }
    assert_eq!(
        b.mknod(d, b"a7", REG, 0, 0, 0).map_err(|e| e.errno()).err(),
        Some(libc::EEXIST)
    );
    assert_eq!(names(&a, d).len(), 82);
    assert_eq!(names(&b, d).len(), 82);
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn another_host_recovers_a_crashed_hosts_journal() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let f = a
        .mknod(a.root(), b"committed", REG, 0, 0, 0)
        .expect("create")
        .ino;
    a.write_data(f, 0, b"fsynced on host 1").expect("write");
    a.fsync(f, false).expect("fsync");
    drop(a); // crash: slot 0 stays live, its journal may hold the last transaction
    let b = mount(&lun, 2);
    let found = b
        .lookup(b.root(), b"committed")
        .expect("host 2 sees host 1's file");
    assert_eq!(
        b.read_data(found.ino, 0, 100).expect("read"),
        b"fsynced on host 1"
    );
    let (_, slot0) = crate::cluster::read_slot(
        lun.as_ref(),
        &Geometry::from_superblock(&read_superblock(lun.as_ref()).expect("sb")),
        0,
    )
    .expect("slot");
    assert_eq!(slot0.map(|s| s.state), Some(crate::format::SLOT_FREE));
}

#[test]
fn volumes_on_4096_byte_sector_devices_work() {
    let lun = Arc::new(MemLun::new(64 << 20, 4096));
    let opts = MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ..MkfsOptions::default()
    };
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    let fs = mount(&lun, 1);
    let d = fs.mkdir(fs.root(), b"d", 0o755, 0, 0).expect("mkdir").ino;
    for i in 0..300 {
        let f = fs
            .mknod(d, format!("f{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create")
            .ino;
        fs.write_data(f, 100, b"data").expect("write");
    }
    fs.unmount().expect("unmount");
    let fs = mount(&lun, 1);
    let f = fs.lookup(d, b"f299").expect("lookup").ino;
    assert_eq!(fs.read_data(f, 100, 10).expect("read"), b"data");
}

#[test]
fn replay_after_a_crash_never_overwrites_a_reused_block() {
    // A directory's bucket is journaled, the directory removed, its block reused for
    // file data; a crash must not bring the old bucket image back over that data.
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let root = fs.root();
    for round in 0..4u8 {
        let d = fs.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
        fs.fsync(d, false).expect("fsync");
        fs.rmdir(root, b"d").expect("rmdir");
        fs.fsync(root, false).expect("fsync");
        let name = format!("f{round}");
        let f = fs
            .mknod(root, name.as_bytes(), REG, 0, 0, 0)
            .expect("create")
            .ino;
        fs.write_data(f, 0, &[0xab; 8192]).expect("write");
        fs.fsync(f, false).expect("fsync");
    }
    drop(fs);
    let fs = mount(&lun, 1);
    for round in 0..4u8 {
        let f = fs
            .lookup(fs.root(), format!("f{round}").as_bytes())
            .expect("lookup")
            .ino;
        let data = fs.read_data(f, 0, 8192).expect("read");
        assert!(
            data == vec![0xab; 8192],
            "file f{round} was overwritten (starts {:?})",
            &data[..8]
        );
    }
}

#[test]
fn an_open_for_writing_excludes_other_hosts() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.open(f, true).expect("a opens for writing");
    a.open(f, true).expect("a opens again: same host");
    assert_eq!(
        b.open(f, true).map_err(|e| e.errno()).err(),
        Some(libc::EBUSY)
    );
    assert_eq!(
        b.open(f, false).map_err(|e| e.errno()).err(),
        Some(libc::EBUSY)
    );
    a.write_data(f, 0, b"from a").expect("write");
    a.release(f, true).expect("close");
    assert_eq!(
        b.open(f, true).map_err(|e| e.errno()).err(),
        Some(libc::EBUSY),
        "one handle is still open"
    );
    a.release(f, true).expect("close");
    b.open(f, true).expect("b may write once a closed");
    b.write_data(f, 0, b"from b").expect("b writes");
    // Readers on A are refused while B writes; once B closes, A reads B's bytes.
    assert_eq!(
        a.open(f, false).map_err(|e| e.errno()).err(),
        Some(libc::EBUSY)
    );
    b.release(f, true).expect("b closes");
    a.open(f, false).expect("a reads");
    assert_eq!(a.read_data(f, 0, 100).expect("read"), b"from b");
    // Readers share; a writer is refused while anyone else reads.
    b.open(f, false).expect("b reads too");
    assert_eq!(
        b.open(f, true).map_err(|e| e.errno()).err(),
        Some(libc::EBUSY)
    );
    a.release(f, false).expect("a closes");
    b.open(f, true).expect("b alone may write");
    b.release(f, true).expect("close");
    b.release(f, false).expect("close");
    // A host that crashes with the file open does not hold it past its recovery.
    b.open(f, true).expect("b opens");
    drop(b);
    let started = std::time::Instant::now();
    let waited = loop {
        match a.open(f, true) {
            Ok(_) => break started.elapsed(),
            Err(e) if e.errno() == libc::EBUSY && started.elapsed() < Duration::from_secs(10) => {
                a.watch_cluster().expect("watch");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("open after b crashed: {e}"),
        }
    };
    assert!(
        waited >= Duration::from_millis(900),
        "b's open ignored too early ({waited:?})"
    );
}

#[test]
fn multi_writer_files_may_be_open_for_writing_on_several_hosts() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let f = a
        .mknod(a.root(), b"vmdk", REG, 0, 0, 0)
        .expect("create")
        .ino;
    assert_eq!(
        a.setxattr(f, b"user.atsfs.multiwriter", b"maybe", 0)
            .map_err(|e| e.errno())
            .err(),
        Some(libc::EINVAL)
    );
    a.setxattr(f, b"user.atsfs.multiwriter", b"1", 0)
        .expect("opt in");
    let (_, multi) = a.open(f, true).expect("a writes");
    assert!(multi);
    let (_, multi) = b.open(f, true).expect("b writes too");
    assert!(multi);
    a.write_data(f, 0, b"aaaa").expect("a");
    b.write_data(f, 4096, b"bbbb").expect("b");
    assert_eq!(&a.read_data(f, 4096, 4).expect("read"), b"bbbb");
    a.release(f, true).expect("close");
    b.release(f, true).expect("close");
}

#[test]
fn emulated_ats_refuses_a_live_host_of_another_kernel() {
    use crate::format::{encode_padded, HeartbeatSlot, OnDisk, SLOT_LIVE};
    let lun = fresh_volume(64 << 20);
    let geo = Geometry::from_superblock(&read_superblock(lun.as_ref()).expect("sb"));
    let slot_lun = lun.clone();
    let write_slot = move |counter: u64| {
        let mut slot: HeartbeatSlot = bytemuck::Zeroable::zeroed();
        slot.magic = HeartbeatSlot::MAGIC;
        slot.slot = 2;
        slot.state = SLOT_LIVE;
        slot.host_uuid = [0x77; 16];
        slot.generation = 1;
        slot.counter = counter;
        slot.boot_id = [0xee; 16];
        slot.seal();
        slot_lun
            .write_at(&encode_padded(&slot, 512), geo.slot_offset(2))
            .expect("slot");
    };
    write_slot(1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beating = {
        let (stop, write_slot) = (stop.clone(), write_slot.clone());
        std::thread::spawn(move || {
            let mut counter = 1;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                counter += 1;
                write_slot(counter);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let lun_dyn: Arc<dyn Lun> = lun.clone();
    let err = Fs::mount(lun_dyn.clone(), MountOptions::new(HostUuid([1; 16])))
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("another kernel"), "{err:#}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    beating.join().expect("thread");
    // The foreign host is gone: the next mount recovers its slot and proceeds.
    let fs = Fs::mount(lun_dyn, MountOptions::new(HostUuid([1; 16])))
        .expect("mount after the foreign host died");
    let (_, slot2) = crate::cluster::read_slot(lun.as_ref(), &geo, 2).expect("read");
    assert_eq!(slot2.map(|s| s.state), Some(crate::format::SLOT_FREE));
    fs.unmount().expect("unmount");
}

#[test]
fn offline_recovery_replays_a_dead_hosts_journal() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let f = a
        .mknod(a.root(), b"kept", REG, 0, 0, 0)
        .expect("create")
        .ino;
    a.write_data(f, 0, b"fsynced").expect("write");
    a.fsync(f, false).expect("fsync");
    let b = mount(&lun, 2);
    drop(a); // crash of host 1 while host 2 runs
    drop(b); // and of host 2
    let geo = Geometry::from_superblock(&read_superblock(lun.as_ref()).expect("sb"));
    let sb = read_superblock(lun.as_ref()).expect("sb");
    let clock = crate::cluster::SystemClock::default();
    let tool = crate::cluster::fence::ToolRegistration::new(lun.as_ref()).expect("tool");
    let outcomes = crate::cluster::recover_offline(
        lun.as_ref(),
        &geo,
        sb.volume_uuid,
        &tool,
        None,
        Duration::from_millis(100),
        Duration::from_millis(1000),
        &clock,
    )
    .expect("recover");
    let recovered: Vec<u32> = outcomes
        .iter()
        .filter(|o| o.1 == crate::cluster::OfflineOutcome::Recovered)
        .map(|o| o.0)
        .collect();
    assert_eq!(recovered, vec![0, 1]);
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let c = mount(&lun, 3);
    let kept = c.lookup(c.root(), b"kept").expect("lookup");
    assert_eq!(c.read_data(kept.ino, 0, 10).expect("read"), b"fsynced");
}

#[test]
fn a_file_open_on_another_host_outlives_its_unlink() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"still readable").expect("write");
    b.open(f, false).expect("b reads it");
    a.unlink(a.root(), b"f").expect("unlink on a");
    assert_eq!(
        b.read_data(f, 0, 100).expect("b still reads"),
        b"still readable"
    );
    b.release(f, false).expect("b's last close frees it");
    assert_eq!(
        a.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
    a.unmount().expect("unmount");
    b.unmount().expect("unmount");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_recoverer_that_dies_mid_recovery_is_recovered_in_turn() {
    use crate::format::{encode_padded, HeartbeatSlot, OnDisk, SLOT_RECOVERING};
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let f = a
        .mknod(a.root(), b"from-a", REG, 0, 0, 0)
        .expect("create")
        .ino;
    a.write_data(f, 0, b"committed by a").expect("write");
    a.fsync(f, false).expect("fsync");
    drop(a); // crash of host 1
             // Host 9 claimed slot 0 for recovery, then died before replaying or freeing it.
    let geo = Geometry::from_superblock(&read_superblock(lun.as_ref()).expect("sb"));
    let (_, slot) = crate::cluster::read_slot(lun.as_ref(), &geo, 0).expect("read");
    let mut slot: HeartbeatSlot = slot.expect("slot 0");
    slot.state = SLOT_RECOVERING;
    slot.recoverer_uuid = [9; 16];
    slot.recoverer_slot = 3;
    slot.counter += 1;
    slot.seal();
    lun.write_at(&encode_padded(&slot, 512), geo.slot_offset(0))
        .expect("write slot");
    // Host 2 needs host 1's locks: it recovers the abandoned recovery and goes on.
    let b = mount(&lun, 2);
    let found = b
        .lookup(b.root(), b"from-a")
        .expect("lookup after recovery");
    assert_eq!(
        b.read_data(found.ino, 0, 64).expect("read"),
        b"committed by a"
    );
    let (_, slot0) = crate::cluster::read_slot(lun.as_ref(), &geo, 0).expect("read");
    assert_eq!(slot0.map(|s| s.state), Some(crate::format::SLOT_FREE));
    b.unmount().expect("unmount");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn random_writes_and_reads_match_a_model() {
    use rand::{Rng, SeedableRng};
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model: Vec<u8> = Vec::new();
    for round in 0..300u32 {
        // Offsets and lengths that start, end and span blocks in every way: inside
        // one block, across two, and partial blocks around whole ones.
        let offset = rng.gen_range(0..200_000u64);
        let len = match round % 3 {
            0 => rng.gen_range(1..4096usize),
            1 => rng.gen_range(4096..20_000usize),
            _ => 4096 * rng.gen_range(1..5usize),
        };
        let byte = (round % 251) as u8 + 1;
        let data = vec![byte; len];
        fs.write_data(f, offset, &data).expect("write");
        let end = offset as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].copy_from_slice(&data);
        if round % 50 == 49 {
            fs.sync().expect("sync");
        }
        let at = rng.gen_range(0..model.len() as u64);
        let want = rng.gen_range(1..70_000u32);
        let got = fs.read_data(f, at, want).expect("read");
        let stop = model.len().min(at as usize + want as usize);
        assert_eq!(
            got,
            &model[at as usize..stop],
            "round {round}: read {want} at {at}"
        );
    }
    let all = fs.read_data(f, 0, model.len() as u32).expect("read all");
    assert_eq!(all, model);
}

/// Reads large transfers in two halves with a pause before each, so that a read of
/// file data takes long enough for other operations to run in the middle of it.
struct SlowDataReads(Arc<MemLun>);

impl Lun for SlowDataReads {
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::lun::LunResult<()> {
        if buf.len() < 64 << 10 {
            return self.0.read_at(buf, offset);
        }
        let half = buf.len() / 2 / 4096 * 4096;
        let (a, b) = buf.split_at_mut(half);
        std::thread::sleep(Duration::from_millis(3));
        self.0.read_at(a, offset)?;
        std::thread::sleep(Duration::from_millis(3));
        self.0.read_at(b, offset + half as u64)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::lun::LunResult<()> {
        self.0.write_at(buf, offset)
    }
    fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> crate::lun::LunResult<crate::lun::Caw> {
        self.0.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> crate::lun::LunResult<()> {
        self.0.flush()
    }
    fn describe(&self) -> String {
        "slow data reads".into()
    }
}

#[test]
fn reads_never_see_blocks_reused_after_a_truncate() {
    // Reads run without the core lock. A truncate frees the blocks a read mapped, and
    // once the quarantine is released a new write may reuse them. The data I/O
    // barrier makes the release wait for the read, so each read sees one version of
    // the file: every byte the same.
    let lun: Arc<dyn Lun> = Arc::new(SlowDataReads(fresh_volume(64 << 20)));
    let fs = Fs::mount(lun, MountOptions::new(HostUuid([1; 16]))).expect("mount");
    let root = fs.root();
    let x = fs.mknod(root, b"x", REG, 0, 0, 0).expect("x").ino;
    const LEN: usize = 256 << 10;
    fs.write_data(x, 0, &vec![0xff; LEN]).expect("write x");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let fs = fs.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let data = fs.read_data(x, 0, LEN as u32).expect("read x");
                let first = data.first().copied().unwrap_or(0);
                assert!(
                    data.iter().all(|&b| b == first),
                    "a read saw two versions of the file's blocks"
                );
                reads += u64::from(!data.is_empty());
            }
            reads
        })
    };
    for round in 0..60u8 {
        let set = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        fs.setattr(x, &set).expect("truncate x");
        fs.sync().expect("sync");
        fs.write_data(x, 0, &vec![round; LEN]).expect("rewrite x");
        fs.sync().expect("sync");
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader");
    assert!(reads > 10, "only {reads} reads saw data");
}

#[test]
fn space_freed_by_a_sealed_transaction_is_found_when_the_volume_is_full() {
    // A 2 MiB journal lets transactions be sealed for a group commit. Blocks a sealed
    // transaction freed must become allocatable when nothing else is left, without
    // waiting for the background commit.
    let lun = Arc::new(MemLun::new(48 << 20, 512));
    let opts = MkfsOptions {
        max_hosts: 2,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        journal_bytes: Some(2 << 20),
        ..MkfsOptions::default()
    };
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    let shared: Arc<dyn Lun> = lun.clone();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.commit_interval = Duration::from_secs(3600);
    let fs = Fs::mount(shared, options).expect("mount");
    let root = fs.root();
    let f = fs.mknod(root, b"f", REG, 0, 0, 0).expect("create").ino;
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0u64;
    while fs.write_data(f, written, &chunk).is_ok() {
        written += chunk.len() as u64;
    }
    assert!(written > 8 << 20, "only {written} bytes fit");
    fs.fsync(f, false).expect("fsync");
    let seals_before = fs.stats().expect("stats").seals;
    fs.unlink(root, b"f").expect("unlink");
    // Enough small changes after the unlink that its transaction gets sealed.
    for i in 0..300 {
        fs.mknod(root, format!("small-{i}").as_bytes(), REG, 0, 0, 0)
            .expect("small create");
    }
    assert!(
        fs.stats().expect("stats").seals > seals_before,
        "nothing was sealed"
    );
    let g = fs.mknod(root, b"g", REG, 0, 0, 0).expect("create g").ino;
    let mut again = 0u64;
    while again < written / 2 {
        fs.write_data(g, again, &chunk)
            .expect("the freed space is found again");
        again += chunk.len() as u64;
    }
    fs.unmount().expect("unmount");
}

/// Host 1 on a fresh volume behind a FaultLun (no faults yet), without periodic
/// commits, with one empty file "f": (volume, fault LUN, fs, f's inode).
type FaultedVolume = (
    Arc<MemLun>,
    Arc<crate::lun::FaultLun<Arc<MemLun>>>,
    Arc<Fs>,
    Ino,
);

fn mounted_on_faults() -> FaultedVolume {
    let mem = fresh_volume(32 << 20);
    let fault = Arc::new(crate::lun::FaultLun::new(
        mem.clone(),
        crate::lun::FaultConfig::default(),
    ));
    let shared: Arc<dyn Lun> = fault.clone();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.commit_interval = Duration::from_secs(3600);
    let fs = Fs::mount(shared, options).expect("mount");
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    (mem, fault, fs, f)
}

#[test]
fn a_failed_commit_fences_the_host_so_the_others_recover_it() {
    // A host whose commit failed must not keep heartbeating: it would hold its locks
    // for ever. It fences its lease; the heartbeat stops.
    let (mem, fault, fs, f) = mounted_on_faults();
    fault.set_config(crate::lun::FaultConfig {
        eio_flush_prob: 1.0,
        ..crate::lun::FaultConfig::default()
    });
    assert_eq!(
        fs.fsync(f, false).map_err(|e| e.errno()).err(),
        Some(libc::EIO)
    );
    assert!(
        fs.lease().is_fenced(),
        "the failed host is still not fenced"
    );
    assert!(fs.mknod(fs.root(), b"g", REG, 0, 0, 0).is_err());
    // Another host finds it dead after the lease and takes over its locks.
    fault.set_config(crate::lun::FaultConfig::default());
    let other = mount(&mem, 2);
    let started = std::time::Instant::now();
    // The lookup waits inside for the dead host's locks (at most 60 s, then EAGAIN).
    match other.lookup(other.root(), b"f") {
        Ok(_) | Err(FsError::Errno(libc::ENOENT)) => {}
        Err(e) => panic!("the other host could not look: {e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_large_write_that_fails_behind_the_caller_fails_fsync_and_fences_the_host() {
    // A 1 MiB write is queued (WriteBehind): the caller gets success before the
    // device has it. When the device then refuses it, fsync must not succeed, and
    // the host stops writing as after a failed commit.
    let (_mem, fault, fs, f) = mounted_on_faults();
    fs.fsync(f, false).expect("fsync of the empty file");
    fault.set_config(crate::lun::FaultConfig {
        eio_write_prob: 1.0,
        ..crate::lun::FaultConfig::default()
    });
    let data = vec![0x5au8; 1 << 20];
    assert_eq!(fs.write_data(f, 0, &data).expect("queued"), data.len());
    // A read of the range waits for the queued write; after it, only that write has
    // failed, and the journal's writes of the commit would succeed.
    let _ = fs.read_data(f, 0, 4096);
    fault.set_config(crate::lun::FaultConfig::default());
    assert_eq!(
        fs.fsync(f, false).map_err(|e| e.errno()).err(),
        Some(libc::EIO),
        "fsync reported lost data as durable"
    );
    assert!(fs.lease().is_fenced(), "the host still writes");
    assert!(fs.write_data(f, 0, &data).is_err());
}

/// Holds every flush until the gate opens; can make flushes fail.
struct GatedFlush {
    inner: Arc<MemLun>,
    gate: std::sync::Mutex<Gate>,
    opened: std::sync::Condvar,
}

#[derive(Default)]
struct Gate {
    closed: bool,
    fail: bool,
    /// Flushes waiting at the closed gate.
    waiting: u32,
}

impl GatedFlush {
    fn new(inner: Arc<MemLun>) -> GatedFlush {
        GatedFlush {
            inner,
            gate: std::sync::Mutex::new(Gate::default()),
            opened: std::sync::Condvar::new(),
        }
    }
    fn set(&self, closed: bool, fail: bool) {
        let mut g = self.gate.lock().expect("gate");
        g.closed = closed;
        g.fail = fail;
        self.opened.notify_all();
    }
    fn waiting(&self) -> u32 {
        self.gate.lock().expect("gate").waiting
    }
}

impl Lun for GatedFlush {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::lun::LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::lun::LunResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> crate::lun::LunResult<crate::lun::Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> crate::lun::LunResult<()> {
        let mut g = self.gate.lock().expect("gate");
        g.waiting += 1;
        // Never for ever: a test that panics with the gate closed still ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while g.closed && std::time::Instant::now() < deadline {
            g = self
                .opened
                .wait_timeout(g, Duration::from_millis(100))
                .expect("gate")
                .0;
        }
        g.waiting -= 1;
        if g.fail {
            return Err(crate::lun::LunError::Io {
                device: "gated".into(),
                op: "flush",
                offset: 0,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "gated flushes".into()
    }
}

/// A volume with a 2 MiB journal (transactions are sealed and grouped) behind a
/// flush gate, mounted without background commits.
fn gated_volume() -> (Arc<MemLun>, Arc<GatedFlush>, Arc<Fs>) {
    let mem = Arc::new(MemLun::new(32 << 20, 512));
    let opts = MkfsOptions {
        max_hosts: 2,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        journal_bytes: Some(2 << 20),
        ..MkfsOptions::default()
    };
    mkfs(mem.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    let gated = Arc::new(GatedFlush::new(mem.clone()));
    let lun: Arc<dyn Lun> = gated.clone();
    let mut options = MountOptions::new(HostUuid([1; 16]));
    options.commit_interval = Duration::from_secs(3600);
    let fs = Fs::mount(lun, options).expect("mount");
    (mem, gated, fs)
}

/// Creates files in `dir` until a group goes to the committer thread, which then
/// waits at the closed gate; returns the names created.
fn create_until_pipelined(fs: &Fs, gated: &GatedFlush, dir: Ino) -> Vec<String> {
    gated.set(true, false);
    let mut names = Vec::new();
    while fs.stats().expect("stats").pipelined == 0 {
        let name = format!("f{}", names.len());
        fs.mknod(dir, name.as_bytes(), REG, 0, 0, 0)
            .expect("create");
        names.push(name);
        assert!(names.len() < 5000, "no group was pipelined");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gated.waiting() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the committer never flushed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    names
}

#[test]
fn operations_go_on_and_see_a_group_while_it_is_committed() {
    let (mem, gated, fs) = gated_volume();
    let root = fs.root();
    let dir = fs.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
    let names = create_until_pipelined(&fs, &gated, dir);
    // The group's images are neither home nor in the cache: only in flight.
    for name in &names {
        fs.lookup(dir, name.as_bytes())
            .expect("a file of the group in flight");
    }
    for i in 0..20 {
        fs.mknod(dir, format!("late{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create while a group is in flight");
    }
    assert_eq!(
        gated.waiting(),
        1,
        "the committer is still held at the gate"
    );
    gated.set(false, false);
    fs.fsync(dir, false).expect("fsync");
    drop(fs);
    // A crash now: the next mount replays the journal; everything is there.
    let copy = Arc::new(MemLun::new(32 << 20, 512));
    copy.write_at(&mem.snapshot(), 0).expect("copy");
    let lun: Arc<dyn Lun> = copy;
    let mut options = MountOptions::new(HostUuid([2; 16]));
    options.commit_interval = Duration::from_secs(3600);
    let fs = Fs::mount(lun, options).expect("mount the copy");
    let root = fs.root();
    let dir = fs.lookup(root, b"d").expect("d").ino;
    for name in names
        .iter()
        .cloned()
        .chain((0..20).map(|i| format!("late{i}")))
    {
        fs.lookup(dir, name.as_bytes())
            .expect("fsynced file after the crash");
    }
}

#[test]
fn a_failed_pipelined_commit_fails_the_host_and_fences_its_lease() {
    let (_mem, gated, fs) = gated_volume();
    let root = fs.root();
    create_until_pipelined(&fs, &gated, root);
    gated.set(false, true);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The first operation to take in the group's result gets its I/O error.
    while fs.mknod(root, b"after", REG, 0, 0, 0).is_ok() {
        // The committer has not reported yet; the create went into memory.
        if fs.unlink(root, b"after").is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failure never surfaced"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        fs.lease().is_fenced(),
        "a host whose commit failed keeps its lease"
    );
    // Failed by the core, or refused by the fenced lease first: EIO either way.
    assert!(
        matches!(
            fs.getattr(root),
            Err(FsError::Failed(_) | FsError::Io(LunError::Fenced(_)))
        ),
        "a failed host goes on serving"
    );
}

/// An O_DIRECT read through `read_into`, as the FUSE adapter makes it.
fn read_direct(fs: &Fs, ino: Ino, offset: u64, size: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    let range = fs
        .read_into(ino, offset, size, &mut buf, true)
        .expect("direct read");
    buf[range].to_vec()
}

/// Chunk `i` of version `v` of a test file: every byte says which it is.
fn chunk(i: u64, v: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (i as u8).wrapping_mul(31) ^ v ^ (k as u8))
        .collect()
}

const CHUNK: usize = 16 << 10;

fn file_of_chunks(fs: &Fs, name: &[u8], chunks: u64) -> Ino {
    let f = fs.mknod(fs.root(), name, REG, 0, 0, 0).expect("create").ino;
    for i in 0..chunks {
        fs.write_data(f, i * CHUNK as u64, &chunk(i, 0, CHUNK))
            .expect("write");
    }
    fs.sync().expect("sync");
    f
}

#[test]
fn sequential_direct_reads_are_read_ahead_and_never_stale() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = file_of_chunks(&fs, b"stream", 64);
    for i in 0..64 {
        assert_eq!(
            read_direct(&fs, f, i * CHUNK as u64, CHUNK as u32),
            chunk(i, 0, CHUNK),
            "chunk {i}"
        );
    }
    let stats = fs.readahead_stats();
    assert!(
        stats.used >= 60 && stats.issued >= stats.used,
        "sequential reads were not read ahead: {stats:?}"
    );
    // Chunks overwritten in place (same blocks, so the same mapping) between a
    // sequential read and the next: the next read returns the new bytes, whatever
    // was read ahead before the write.
    for (v, at) in (1u8..).zip((2..60).step_by(4)) {
        assert_eq!(
            read_direct(&fs, f, (at - 1) * CHUNK as u64, CHUNK as u32),
            chunk(at - 1, 0, CHUNK)
        );
        assert_eq!(
            read_direct(&fs, f, at * CHUNK as u64, CHUNK as u32),
            chunk(at, 0, CHUNK)
        );
        // Let the read-ahead of `at + 1` land before the write, now and then.
        if v % 2 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        fs.write_data(f, (at + 1) * CHUNK as u64, &chunk(at + 1, v, CHUNK))
            .expect("overwrite");
        assert_eq!(
            read_direct(&fs, f, (at + 1) * CHUNK as u64, CHUNK as u32),
            chunk(at + 1, v, CHUNK),
            "a read after an overwrite returned what was read ahead before it"
        );
    }
    // A truncate between two reads: the next read ends at the new size.
    read_direct(&fs, f, 0, CHUNK as u32);
    read_direct(&fs, f, CHUNK as u64, CHUNK as u32);
    let set = SetAttr {
        size: Some(2 * CHUNK as u64 + 100),
        ..SetAttr::default()
    };
    fs.setattr(f, &set).expect("truncate");
    assert_eq!(
        read_direct(&fs, f, 2 * CHUNK as u64, CHUNK as u32),
        chunk(2, 0, CHUNK)[..100].to_vec()
    );
    fs.unmount().expect("unmount");
}

#[test]
fn a_read_ahead_is_not_served_after_another_host_wrote_the_file() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let f = file_of_chunks(&a, b"shared", 16);
    for round in 1..=3u8 {
        // a reads three chunks in sequence: the next ones are read ahead.
        let at = u64::from(round) * 4 + 3;
        for before in at - 3..at {
            read_direct(&a, f, before * CHUNK as u64, CHUNK as u32);
        }
        std::thread::sleep(Duration::from_millis(5));
        // b takes the file's lock from a and overwrites the next chunk in place.
        b.write_data(f, at * CHUNK as u64, &chunk(at, round, CHUNK))
            .expect("b overwrites");
        b.fsync(f, false).expect("fsync on b");
        assert_eq!(
            read_direct(&a, f, at * CHUNK as u64, CHUNK as u32),
            chunk(at, round, CHUNK),
            "host a served what it read ahead before host b wrote"
        );
    }
    assert!(a.readahead_stats().issued > 0);
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
}

#[test]
fn multi_writer_files_are_never_read_ahead() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = file_of_chunks(&fs, b"vmdk", 8);
    fs.setxattr(f, b"user.atsfs.multiwriter", b"1", 0)
        .expect("opt in");
    for i in 0..8 {
        assert_eq!(
            read_direct(&fs, f, i * CHUNK as u64, CHUNK as u32),
            chunk(i, 0, CHUNK)
        );
    }
    assert_eq!(fs.readahead_stats().issued, 0);
    fs.unmount().expect("unmount");
}

#[test]
fn lock_counters_count_acquires_and_releases() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let root = a.root();
    let files: Vec<Ino> = (0..5)
        .map(|i| {
            a.mknod(root, format!("f{i}").as_bytes(), REG, 0, 0, 0)
                .expect("create")
                .ino
        })
        .collect();
    let before = a.host_stats().expect("stats");
    let released = a.release_all_locks().expect("release") as u64;
    let after = a.host_stats().expect("stats");
    assert_eq!(after.lock_releases - before.lock_releases, released);
    assert_eq!(after.locks_held, 0);
    for &f in &files {
        a.getattr(f).expect("stat");
    }
    let again = a.host_stats().expect("stats");
    // Each file's lock, and the root's for nothing (stat needs only the inode's).
    assert!(again.lock_acquires - after.lock_acquires >= files.len() as u64);
    // Another host's write takes a file's lock from this one.
    let b = mount(&lun, 2);
    b.write_data(files[0], 0, b"from b").expect("write on b");
    let later = a.host_stats().expect("stats");
    assert!(later.lock_releases > again.lock_releases);
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
}

#[test]
fn a_reused_read_buffer_never_shows_the_last_reads_bytes() {
    let lun = fresh_volume(64 << 20);
    let fs = mount(&lun, 1);
    let f = fs
        .mknod(fs.root(), b"holes", REG, 0, 0, 0)
        .expect("create")
        .ino;
    // Data in blocks 0-3 and 8-11, a hole in 4-7, and a block half written at 12.
    fs.write_data(f, 0, &[0xaa; 16384]).expect("write");
    fs.write_data(f, 32768, &[0xbb; 16384]).expect("write");
    fs.write_data(f, 49152, &[0xcc; 100]).expect("write");
    let mut buf = Vec::new();
    for uncached in [false, true] {
        let r = fs.read_into(f, 0, 16384, &mut buf, uncached).expect("read");
        assert!(buf[r].iter().all(|&b| b == 0xaa));
        // Same size, now over the hole and half the second run.
        let r = fs
            .read_into(f, 16384, 32768, &mut buf, uncached)
            .expect("read");
        let got = &buf[r];
        assert!(
            got[..16384].iter().all(|&b| b == 0),
            "the hole shows old bytes"
        );
        assert!(got[16384..].iter().all(|&b| b == 0xbb));
        // Smaller, unaligned, across the end of the file.
        let r = fs
            .read_into(f, 49100, 4096, &mut buf, uncached)
            .expect("read");
        let got = &buf[r];
        assert_eq!(got.len(), 152);
        assert!(got[..52].iter().all(|&b| b == 0xbb));
        assert!(got[52..].iter().all(|&b| b == 0xcc));
    }
    fs.unmount().expect("unmount");
}

/// Opens a new file with some data on `fs`, unlinks it while open, and commits the
/// unlink: the file now lives only through the open handle.
fn unlinked_open_file(fs: &Fs, name: &[u8]) -> Ino {
    let f = fs.mknod(fs.root(), name, REG, 0, 0, 0).expect("create").ino;
    fs.write_data(f, 0, &vec![7u8; 3 * 4096 + 100])
        .expect("write");
    fs.open(f, false).expect("open");
    fs.unlink(fs.root(), name).expect("unlink");
    fs.fsync(f, false).expect("fsync the unlink");
    f
}

fn assert_fsck_clean(lun: &MemLun) {
    let report = crate::fsck::check(lun).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Waits (bounded) until `fs` has recovered `slot` (its watch recovers dead hosts).
fn recover_by_watching(fs: &Fs, lun: &MemLun, slot: u32) {
    let geo = Geometry::from_superblock(&read_superblock(lun).expect("sb"));
    let started = std::time::Instant::now();
    loop {
        fs.watch_cluster().expect("watch");
        let (_, image) = crate::cluster::read_slot(lun, &geo, slot).expect("slot");
        if image.map(|s| s.state) == Some(crate::format::SLOT_FREE) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "slot {slot} was not recovered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_survivor_reclaims_the_unlinked_open_files_of_a_crashed_host() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let f = unlinked_open_file(&a, b"orphan");
    unlinked_open_file(&a, b"orphan-2");
    drop(a); // crash of host 1 with both files open
    recover_by_watching(&b, &lun, 0);
    assert_eq!(
        b.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE),
        "the orphan was freed by the recovery"
    );
    b.unmount().expect("unmount");
    assert_fsck_clean(&lun);
}

#[test]
fn a_host_reclaims_its_own_unlinked_open_files_when_it_mounts_again() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let before = a.statfs().expect("statfs").free_blocks;
    let f = unlinked_open_file(&a, b"orphan");
    drop(a); // crash with the file open
    let a = mount(&lun, 1);
    assert_eq!(
        a.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
    assert_eq!(a.statfs().expect("statfs").free_blocks, before);
    a.unmount().expect("unmount");
    assert_fsck_clean(&lun);
}

#[test]
fn an_unlinked_file_stays_until_its_last_open_on_any_host() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let c = mount(&lun, 3);
    let f = a.mknod(a.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"shared").expect("write");
    b.open(f, false).expect("b reads");
    c.open(f, false).expect("c reads");
    a.unlink(a.root(), b"f").expect("unlink on a");
    b.release(f, false).expect("b closes");
    assert_eq!(c.read_data(f, 0, 100).expect("c still reads"), b"shared");
    c.release(f, false).expect("c's close frees it");
    assert_eq!(
        a.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
    for fs in [a, b, c] {
        fs.unmount().expect("unmount");
    }
    assert_fsck_clean(&lun);
}

#[test]
fn an_unlinked_file_open_on_a_crashed_host_and_a_live_one_stays_for_the_live_one() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let c = mount(&lun, 3);
    let f = c.mknod(c.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    c.write_data(f, 0, b"kept for b").expect("write");
    c.fsync(f, false).expect("fsync");
    a.open(f, false).expect("a reads");
    b.open(f, false).expect("b reads");
    c.unlink(c.root(), b"f").expect("unlink on c");
    c.fsync(c.root(), false).expect("commit the unlink");
    drop(a); // crash of host 1 with the file open
    recover_by_watching(&b, &lun, 0);
    assert_eq!(
        b.read_data(f, 0, 100).expect("b still reads"),
        b"kept for b"
    );
    drop(b); // and of host 2, the last one with it open
    recover_by_watching(&c, &lun, 1);
    assert_eq!(
        c.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
    c.unmount().expect("unmount");
    assert_fsck_clean(&lun);
}

#[test]
fn offline_recovery_reclaims_the_unlinked_open_files_of_dead_hosts() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let f = unlinked_open_file(&a, b"orphan");
    drop(a); // crash; no host left to recover it
    let sb = read_superblock(lun.as_ref()).expect("sb");
    let geo = Geometry::from_superblock(&sb);
    let clock = crate::cluster::SystemClock::default();
    let tool = crate::cluster::fence::ToolRegistration::new(lun.as_ref()).expect("tool");
    let outcomes = crate::cluster::recover_offline(
        lun.as_ref(),
        &geo,
        sb.volume_uuid,
        &tool,
        None,
        Duration::from_millis(100),
        Duration::from_millis(1000),
        &clock,
    )
    .expect("recover");
    assert!(outcomes.contains(&(0, crate::cluster::OfflineOutcome::Recovered)));
    let dyn_lun: Arc<dyn Lun> = lun.clone();
    Fs::reclaim_orphans_offline(dyn_lun).expect("reclaim");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.counts.orphans, 0, "the orphan table still lists it");
    let c = mount(&lun, 3);
    assert_eq!(
        c.getattr(f).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
}
