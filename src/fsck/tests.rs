//! fsck tests: volumes built in memory through the fs core, checked clean, then
//! corrupted one thing at a time on a copy.

use super::*;
use crate::cluster::HostUuid;
use crate::format::{
    crc_of, AgHeader, DirBucket, Extent, Geometry, InodeBody, Superblock, BLOCK_SIZE,
    BLOCK_SIZE_U64, DIR_ENTRY_FIXED, RESOURCE_BODY_SIZE,
};
use crate::fs::{Fs, Ino, MountOptions};
use crate::lun::{FaultConfig, FaultLun, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub(super) const REG: u32 = libc::S_IFREG | 0o644;

fn mkfs_options() -> MkfsOptions {
    MkfsOptions {
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ..MkfsOptions::default()
    }
}

pub(super) fn fresh(bytes: u64) -> Arc<MemLun> {
    let lun = Arc::new(MemLun::new(bytes, 512));
    mkfs(lun.as_ref(), &mkfs_options(), &mut |_, _| {}).expect("mkfs");
    lun
}

pub(super) fn mount(lun: Arc<dyn Lun>) -> Arc<Fs> {
    Fs::mount(lun, MountOptions::new(HostUuid([1; 16]))).expect("mount")
}

pub(super) fn kinds(report: &FsckReport) -> Vec<ProblemKind> {
    report.problems.iter().map(|p| p.kind).collect()
}

pub(super) fn assert_clean(report: &FsckReport) {
    assert!(report.is_clean(), "not clean:\n{}", report.render());
}

/// The populated test volume, built once, and the inode numbers of its files.
pub(super) struct Built {
    pub image: Vec<u8>,
    pub inos: HashMap<&'static str, Ino>,
}

/// A volume with two allocation groups holding: nested directories, a directory of
/// 3000 long names (split buckets, table blocks), hard links, short and long
/// symlinks, xattrs, a fifo, a file of 300 extents (tree mode), a file preallocated
/// past its size, and the leftovers of renames, unlinks and rmdirs.
pub(super) fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let lun = fresh(160 << 20);
        let fs = mount(lun.clone());
        let inos = populate(&fs);
        fs.unmount().expect("unmount");
        Built {
            image: lun.snapshot(),
            inos,
        }
    })
}

fn populate(fs: &Fs) -> HashMap<&'static str, Ino> {
    let root = fs.root();
    let mut inos = HashMap::new();
    let docs = fs.mkdir(root, b"docs", 0o755, 0, 0).expect("mkdir").ino;
    for name in ["a", "b", "c", "d"] {
        let f = fs
            .mknod(docs, name.as_bytes(), REG, 0, 0, 0)
            .expect("create");
        fs.write_data(f.ino, 0, &vec![7u8; 5000]).expect("write");
    }
    let a = fs.lookup(docs, b"a").expect("a").ino;
    inos.insert("/docs/b", fs.lookup(docs, b"b").expect("b").ino);
    inos.insert("/docs/a", a);
    fs.link(a, root, b"hard1").expect("link");
    fs.setxattr(a, b"user.test", b"value", 0).expect("xattr");
    fs.setxattr(docs, b"trusted.x", &[1; 300], 0)
        .expect("xattr");

    let big = fs.mkdir(root, b"big", 0o755, 0, 0).expect("mkdir").ino;
    for i in 0..3000u32 {
        let name = format!("{i:0>200}");
        fs.mknod(big, name.as_bytes(), REG, 0, 0, 0)
            .expect("create");
    }
    fs.link(a, big, b"hard2").expect("link");

    fs.symlink(root, b"slink", b"docs/a", 0, 0)
        .expect("symlink");
    let long = vec![b'x'; 4000];
    let l = fs.symlink(root, b"longlink", &long, 0, 0).expect("symlink");
    fs.setxattr(l.ino, b"user.on-link", b"1", 0).expect("xattr");
    let fifo = fs
        .mknod(root, b"fifo", libc::S_IFIFO | 0o644, 0, 0, 0)
        .expect("fifo");
    inos.insert("/fifo", fifo.ino);

    // A sparse file of 300 one-block extents: past 138, so in leaf blocks.
    let frag = fs.mknod(root, b"frag", REG, 0, 0, 0).expect("create").ino;
    for i in 0..300u64 {
        fs.write_data(frag, i * 2 * BLOCK_SIZE_U64, b"frag")
            .expect("write");
    }
    inos.insert("/frag", frag);
    let pre = fs
        .mknod(root, b"prealloc", REG, 0, 0, 0)
        .expect("create")
        .ino;
    fs.write_data(pre, 0, b"short").expect("write");
    fs.fallocate(pre, 0, 1 << 20, libc::FALLOC_FL_KEEP_SIZE)
        .expect("fallocate");

    // Nesting, renames across directories, unlink and rmdir.
    let mut dir = root;
    for name in ["n1", "n2", "n3", "n4"] {
        dir = fs
            .mkdir(dir, name.as_bytes(), 0o755, 0, 0)
            .expect("mkdir")
            .ino;
    }
    fs.mkdir(dir, b"moved", 0o755, 0, 0).expect("mkdir");
    fs.rename(dir, b"moved", docs, b"moved", 0)
        .expect("rename dir");
    fs.rename(docs, b"c", root, b"c-renamed", 0)
        .expect("rename file");
    fs.unlink(docs, b"d").expect("unlink");
    fs.mkdir(root, b"gone", 0o755, 0, 0).expect("mkdir");
    fs.rmdir(root, b"gone").expect("rmdir");
    fs.fsync(root, false).expect("fsync");
    inos
}

pub(super) fn check_image(image: Vec<u8>) -> FsckReport {
    let lun = MemLun::from_image(image, 512);
    check(&lun).expect("fsck")
}

/// Checks a copy of the built volume after `corrupt` changed it.
fn check_corrupted(
    corrupt: impl FnOnce(&mut Vec<u8>, &Geometry, &HashMap<&str, Ino>),
) -> FsckReport {
    let b = built();
    let mut image = b.image.clone();
    let geo = geometry(&image);
    corrupt(&mut image, &geo, &b.inos);
    check_image(image)
}

pub(super) fn geometry(image: &[u8]) -> Geometry {
    let sb = Superblock::decode(&image[..BLOCK_SIZE], 0).expect("superblock");
    Geometry::from_superblock(&sb)
}

pub(super) fn body_range(geo: &Geometry, ino: Ino) -> std::ops::Range<usize> {
    let at = geo.body_offset(ino) as usize;
    at..at + RESOURCE_BODY_SIZE
}

pub(super) fn read_inode(image: &[u8], geo: &Geometry, ino: Ino) -> InodeBody {
    InodeBody::decode(&image[body_range(geo, ino)], ino).expect("inode")
}

pub(super) fn write_inode(image: &mut [u8], geo: &Geometry, mut inode: InodeBody) {
    inode.seal();
    let range = body_range(geo, inode.blockno);
    image[range].copy_from_slice(bytemuck::bytes_of(&inode));
}

pub(super) fn block_range(block: u64) -> std::ops::Range<usize> {
    let at = (block * BLOCK_SIZE_U64) as usize;
    at..at + BLOCK_SIZE
}

/// Recomputes the CRC of a structure of `size` bytes at byte `at`.
pub(super) fn reseal(image: &mut [u8], at: usize, size: usize) {
    let crc = crc_of(&image[at..at + size]);
    image[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn first_data_block(inode: &InodeBody) -> u64 {
    let e: Extent = bytemuck::pod_read_unaligned(&inode.area[..24]);
    assert!(e.len > 0);
    e.disk_block
}

/// Sets or clears a block's bit in its group's bitmap, fixing the header's CRC.
pub(super) fn set_bitmap_bit(image: &mut [u8], geo: &Geometry, block: u64, used: bool) {
    let ag = geo.ag_of(block).expect("in a group");
    let i = (block - geo.ag_first(ag)) as usize;
    let byte = geo.ag_bitmap(ag) as usize * BLOCK_SIZE + i / 8;
    if used {
        image[byte] |= 1 << (i % 8);
    } else {
        image[byte] &= !(1 << (i % 8));
    }
    let hdr = geo.ag_header(ag);
    let at = geo.body_offset(hdr) as usize;
    let mut header = AgHeader::decode(&image[at..at + RESOURCE_BODY_SIZE], hdr).expect("header");
    assert_eq!(header.flags & crate::format::AG_FLAG_BITMAP_UNINIT, 0);
    header.bitmap_crc = crc32fast::hash(&image[block_range(geo.ag_bitmap(ag))]);
    header.seal();
    image[at..at + std::mem::size_of::<AgHeader>()].copy_from_slice(bytemuck::bytes_of(&header));
}

pub(super) fn bit_is_set(image: &[u8], geo: &Geometry, block: u64) -> bool {
    let ag = geo.ag_of(block).expect("in a group");
    let i = (block - geo.ag_first(ag)) as usize;
    image[geo.ag_bitmap(ag) as usize * BLOCK_SIZE + i / 8] & (1 << (i % 8)) != 0
}

// ----------------------------------------------------------------------------------
// A clean volume.
// ----------------------------------------------------------------------------------

#[test]
fn a_fresh_volume_is_clean() {
    let lun = fresh(64 << 20);
    let report = check(lun.as_ref()).expect("fsck");
    assert_clean(&report);
    assert_eq!(report.counts.inodes, 1);
    assert_eq!(report.counts.directories, 1);
    assert_eq!(report.superblock, "primary");
}

#[test]
fn a_populated_volume_is_clean_and_fsck_writes_nothing() {
    let b = built();
    let lun = MemLun::from_image(b.image.clone(), 512);
    let report = check(&lun).expect("fsck");
    assert_clean(&report);
    assert!(lun.snapshot() == b.image, "fsck wrote to the volume");
    let c = &report.counts;
    // root, docs, big, n1..n4, moved.
    assert_eq!(c.directories, 8);
    // docs/a and b, c-renamed, 3000 in big, frag, prealloc.
    assert_eq!(c.regular_files, 3005);
    assert_eq!(c.symlinks, 2);
    assert_eq!(c.special_files, 1);
    assert!(c.dir_table_blocks > 0, "big never got table blocks: {c:?}");
    assert!(c.extent_leaves >= 2, "frag is not in tree mode: {c:?}");
    assert_eq!(c.xattr_blocks, 3);
    assert_eq!(c.allocation_groups, 2);
    assert_eq!(c.pending_transactions, 0);
    assert_eq!(c.blocks_used, c.blocks_reachable);
    assert_eq!(c.blocks_used + c.blocks_free, c.blocks_total);
    // The report serialises, and says it is clean.
    let json = serde_json::to_string(&report).expect("json");
    assert!(json.contains("\"problems\":[]"));
    assert!(report.render().contains("clean"));
}

// ----------------------------------------------------------------------------------
// One corruption at a time.
// ----------------------------------------------------------------------------------

#[test]
fn a_flipped_byte_in_an_inode_is_reported_with_its_path() {
    let b = built();
    let ino = b.inos["/docs/b"];
    let report = check_corrupted(|image, geo, _| {
        image[geo.body_offset(ino) as usize + 100] ^= 0x40;
    });
    let p = report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::Inode)
        .unwrap_or_else(|| panic!("no inode problem:\n{}", report.render()));
    assert_eq!(p.block, Some(ino));
    assert_eq!(p.path.as_deref(), Some("/docs/b"));
    // Its blocks can no longer be reached.
    assert!(report.has(ProblemKind::LeakedBlocks));
    let text = report.render();
    assert!(text.contains("/docs/b") && text.contains(&format!("block {ino}")));
}

#[test]
fn a_used_block_marked_free_is_reported() {
    let b = built();
    let ino = b.inos["/docs/b"];
    let mut target = 0;
    let report = check_corrupted(|image, geo, _| {
        target = first_data_block(&read_inode(image, geo, ino));
        assert!(bit_is_set(image, geo, target));
        set_bitmap_bit(image, geo, target, false);
    });
    let p = report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::BlockMarkedFree)
        .unwrap_or_else(|| panic!("not found:\n{}", report.render()));
    assert_eq!(p.block, Some(target));
    assert!(report.has(ProblemKind::FreeCount));
    assert!(!report.has(ProblemKind::BitmapChecksum));
}

#[test]
fn a_bitmap_that_fails_its_checksum_is_reported() {
    let report = check_corrupted(|image, geo, _| {
        image[geo.ag_bitmap(0) as usize * BLOCK_SIZE + 3000] ^= 1;
    });
    assert!(
        report.has(ProblemKind::BitmapChecksum),
        "{}",
        report.render()
    );
}

#[test]
fn a_leaked_block_is_reported_once_per_run() {
    let mut leaked = Vec::new();
    let report = check_corrupted(|image, geo, _| {
        let end = geo.ag_end(0);
        leaked = (end - 40..end - 30).collect();
        for &block in &leaked {
            assert!(!bit_is_set(image, geo, block), "block {block} is in use");
            set_bitmap_bit(image, geo, block, true);
        }
    });
    let leaks: Vec<&Problem> = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::LeakedBlocks)
        .collect();
    assert_eq!(leaks.len(), 1, "{}", report.render());
    assert_eq!(leaks[0].block, Some(leaked[0]));
    assert!(leaks[0].message.contains("10 blocks"));
    assert!(!report.has(ProblemKind::BlockMarkedFree));
}

/// Finds `name` in the root directory's single bucket: (bucket block, entry offset).
pub(super) fn root_entry(image: &[u8], geo: &Geometry, name: &[u8]) -> (u64, usize) {
    let sb = Superblock::decode(&image[..BLOCK_SIZE], 0).expect("superblock");
    let root = read_inode(image, geo, sb.root_ino);
    assert_eq!(root.dir_depth, 0);
    let bucket_block = u64::from_le_bytes(root.area[..8].try_into().expect("8 bytes"));
    let bucket =
        DirBucket::decode(&image[block_range(bucket_block)], bucket_block).expect("bucket");
    let mut pos = 0;
    for _ in 0..bucket.header.count {
        let len = bucket.area[pos + 17] as usize;
        if &bucket.area[pos + DIR_ENTRY_FIXED..pos + DIR_ENTRY_FIXED + len] == name {
            return (bucket_block, pos);
        }
        pos += DIR_ENTRY_FIXED + len;
    }
    panic!("no entry {name:?}");
}

#[test]
fn an_entry_naming_a_data_block_is_reported() {
    let b = built();
    let data = first_data_block(&read_inode(
        &b.image,
        &geometry(&b.image),
        b.inos["/docs/b"],
    ));
    let report = check_corrupted(|image, geo, _| {
        let (bucket, pos) = root_entry(image, geo, b"fifo");
        let at = (bucket * BLOCK_SIZE_U64) as usize
            + std::mem::size_of::<crate::format::DirBucketHeader>()
            + pos
            + 8;
        image[at..at + 8].copy_from_slice(&data.to_le_bytes());
        reseal(image, (bucket * BLOCK_SIZE_U64) as usize, BLOCK_SIZE);
    });
    let p = report
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::DirEntry)
        .unwrap_or_else(|| panic!("not found:\n{}", report.render()));
    assert_eq!(p.path.as_deref(), Some("/fifo"));
    assert_eq!(p.block, Some(data));
    // The fifo's own inode is now unreachable, and its block leaked.
    assert!(report.has(ProblemKind::LeakedBlocks));
}

#[test]
fn an_entry_outside_the_data_area_is_reported() {
    let report = check_corrupted(|image, geo, _| {
        let (bucket, pos) = root_entry(image, geo, b"fifo");
        let at = (bucket * BLOCK_SIZE_U64) as usize + 48 + pos + 8;
        image[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        reseal(image, (bucket * BLOCK_SIZE_U64) as usize, BLOCK_SIZE);
    });
    assert!(report.has(ProblemKind::DirEntry), "{}", report.render());
}

#[test]
fn a_bumped_link_count_is_reported() {
    let b = built();
    let ino = b.inos["/docs/b"];
    let report = check_corrupted(|image, geo, _| {
        let mut inode = read_inode(image, geo, ino);
        inode.nlink += 1;
        write_inode(image, geo, inode);
    });
    assert_eq!(
        kinds(&report),
        vec![ProblemKind::LinkCount],
        "{}",
        report.render()
    );
    assert_eq!(report.problems[0].path.as_deref(), Some("/docs/b"));
}

#[test]
fn a_wrong_block_count_and_a_bad_extent_are_reported() {
    let b = built();
    let ino = b.inos["/docs/b"];
    let report = check_corrupted(|image, geo, _| {
        let mut inode = read_inode(image, geo, ino);
        inode.blocks += 3;
        write_inode(image, geo, inode);
    });
    assert_eq!(
        kinds(&report),
        vec![ProblemKind::BlockCount],
        "{}",
        report.render()
    );
    let report = check_corrupted(|image, geo, _| {
        let mut inode = read_inode(image, geo, ino);
        // Point the file's extent at the fifo's inode: a block used twice.
        let mut e: Extent = bytemuck::pod_read_unaligned(&inode.area[..24]);
        e.disk_block = b.inos["/fifo"];
        inode.area[..24].copy_from_slice(bytemuck::bytes_of(&e));
        write_inode(image, geo, inode);
    });
    assert!(
        report.has(ProblemKind::DoublyUsedBlock),
        "{}",
        report.render()
    );
}

#[test]
fn a_damaged_extent_leaf_is_reported() {
    let b = built();
    let frag = b.inos["/frag"];
    let report = check_corrupted(|image, geo, _| {
        let inode = read_inode(image, geo, frag);
        assert_ne!(inode.flags & crate::format::INODE_FLAG_EXTENT_TREE, 0);
        let index: Extent = bytemuck::pod_read_unaligned(&inode.area[..24]);
        image[(index.disk_block * BLOCK_SIZE_U64) as usize + 200] ^= 1;
    });
    assert!(report.has(ProblemKind::ExtentLeaf), "{}", report.render());
    // The data the leaf mapped is unreachable now; the block count is not judged
    // from a partial extent list.
    assert!(report.has(ProblemKind::LeakedBlocks));
    assert!(!report.has(ProblemKind::BlockCount), "{}", report.render());
}

#[test]
fn a_zeroed_primary_superblock_is_reported_and_the_backup_used() {
    let report = check_corrupted(|image, _, _| {
        image[..BLOCK_SIZE].fill(0);
    });
    assert_eq!(
        kinds(&report),
        vec![ProblemKind::PrimarySuperblockDamaged],
        "{}",
        report.render()
    );
    assert!(report.superblock.starts_with("backup"));
    assert_eq!(report.counts.regular_files, 3005);
}

#[test]
fn a_damaged_backup_superblock_is_reported() {
    let report = check_corrupted(|image, _, _| {
        let last = image.len() - BLOCK_SIZE;
        image[last + 100] ^= 1;
    });
    assert_eq!(kinds(&report), vec![ProblemKind::BackupSuperblock]);
}

#[test]
fn no_superblock_at_all_is_an_error() {
    let lun = MemLun::new(8 << 20, 512);
    assert!(check(&lun).is_err());
}

#[test]
fn random_bytes_give_an_error_or_problems_never_a_panic() {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut image = vec![0u8; 32 << 20];
    rng.fill(&mut image[..]);
    assert!(check(&MemLun::from_image(image.clone(), 512)).is_err());
    // Keep both superblocks so the check goes on into random metadata.
    let b = built();
    let mut image = b.image.clone();
    let keep_end = image.len() - BLOCK_SIZE;
    rng.fill(&mut image[BLOCK_SIZE..keep_end]);
    let report = check_image(image);
    assert!(!report.is_clean());
}

/// Mutates a few bytes of one metadata structure at a time and re-seals its CRC, so
/// the check sees well-formed structures with impossible fields. It must never panic
/// (the test harness catches a panic as a failure) and must report something.
#[test]
fn resealed_random_field_changes_never_panic() {
    let b = built();
    let geo = geometry(&b.image);
    let lun = MemLun::from_image(b.image.clone(), 512);
    let mut rng = SmallRng::seed_from_u64(42);
    let magic_at =
        |image: &[u8], at: usize| u32::from_le_bytes(image[at..at + 4].try_into().expect("4"));
    let known = [
        InodeBody::MAGIC,
        AgHeader::MAGIC,
        DirBucket::MAGIC,
        crate::format::DirTableBlock::MAGIC,
        crate::format::ExtentLeaf::MAGIC,
        crate::format::XattrBlock::MAGIC,
    ];
    // Metadata blocks in use: the structure's offset in the block and its size.
    let targets: Vec<(u64, usize, usize)> = (geo.ag_first(0)..geo.ag_end(0))
        .filter_map(|blk| {
            let image = &b.image[block_range(blk)];
            if known.contains(&magic_at(image, 512)) {
                let size = if AgHeader::has_magic(&image[512..]) {
                    128
                } else {
                    RESOURCE_BODY_SIZE
                };
                Some((blk, 512, size))
            } else if known.contains(&magic_at(image, 0)) {
                Some((blk, 0, BLOCK_SIZE))
            } else {
                None
            }
        })
        .collect();
    assert!(targets.len() > 3000);
    let mut reported = 0;
    let rounds = 300;
    for _ in 0..rounds {
        let (block, at, size) = targets[rng.gen_range(0..targets.len())];
        let original = b.image[block_range(block)].to_vec();
        let mut image = original.clone();
        for _ in 0..rng.gen_range(1..4) {
            // Mostly the fixed fields after magic and CRC; sometimes anywhere.
            let field = if rng.gen_bool(0.6) {
                rng.gen_range(8..64)
            } else {
                rng.gen_range(8..size)
            };
            image[at + field] = rng.gen();
        }
        reseal(&mut image, at, size);
        lun.write_at(&image, block * BLOCK_SIZE_U64).expect("write");
        let report = check(&lun).expect("fsck");
        if !report.is_clean() {
            reported += 1;
        }
        lun.write_at(&original, block * BLOCK_SIZE_U64)
            .expect("restore");
    }
    // Most changes are caught (a few land in padding or times).
    assert!(
        reported > rounds / 4,
        "only {reported} of {rounds} changes were reported"
    );
}

// ----------------------------------------------------------------------------------
// Crashes: the journal overlay.
// ----------------------------------------------------------------------------------

#[test]
fn a_crashed_host_leaves_a_clean_volume_and_fsck_does_not_replay() {
    let lun = fresh(64 << 20);
    let fs = mount(lun.clone());
    let root = fs.root();
    for i in 0..40u32 {
        let f = fs
            .mknod(root, format!("f{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create");
        fs.write_data(f.ino, 0, b"data").expect("write");
    }
    fs.fsync(root, false).expect("fsync");
    drop(fs);
    let before = lun.snapshot();
    let report = check(lun.as_ref()).expect("fsck");
    assert_clean(&report);
    assert!(lun.snapshot() == before, "fsck wrote to the volume");
    assert!(report.counts.pending_transactions > 0);
    assert_eq!(report.counts.slots_live, 1);
    assert!(report.notes.iter().any(|n| n.contains("needs replay")));
    assert!(report.render().contains("mounted"));
    assert_eq!(report.counts.regular_files, 40);
}

/// Records every write of a workload and checks the volume as a crash after each
/// one would leave it: always clean when read through the journal, and not always
/// clean without (so the overlay is what makes it clean).
#[test]
fn every_crash_point_is_clean_after_replay() {
    let base_lun = fresh(24 << 20);
    let base = base_lun.snapshot();
    let fault = Arc::new(FaultLun::new(base_lun, FaultConfig::default()));
    fault.start_recording();
    let fs = mount(fault.clone());
    let root = fs.root();
    let dir = fs.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
    for i in 0..12u32 {
        let f = fs
            .mknod(dir, format!("f{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create");
        fs.write_data(f.ino, 0, &vec![1; 9000]).expect("write");
        if i % 3 == 2 {
            fs.unlink(dir, format!("f{}", i - 1).as_bytes())
                .expect("unlink");
        }
        fs.fsync(f.ino, false).expect("fsync");
    }
    fs.rename(dir, b"f0", root, b"top", 0).expect("rename");
    fs.fsync(root, false).expect("fsync");
    drop(fs);
    fault.stop_recording();
    let records = fault.records();
    assert!(records.len() > 20);
    let lun = MemLun::from_image(base, 512);
    let mut unclean_without_replay = 0;
    for (i, record) in records.iter().enumerate() {
        lun.write_at(&record.data, record.offset).expect("apply");
        let report = check(&lun).expect("fsck");
        assert!(
            report.is_clean(),
            "crash after write {i} of {}:\n{}",
            records.len(),
            report.render()
        );
        let raw = check_with(
            &lun,
            Options {
                replay_journals: false,
            },
        )
        .expect("fsck");
        unclean_without_replay += usize::from(!raw.is_clean());
    }
    assert!(
        unclean_without_replay > 0,
        "no crash point needed the journal: the test does not exercise the overlay"
    );
}

// ----------------------------------------------------------------------------------
// Speed, and metadata only.
// ----------------------------------------------------------------------------------

#[test]
fn a_512_mib_volume_checks_fast_without_reading_data() {
    let lun = fresh(512 << 20);
    let fs = mount(lun.clone());
    let root = fs.root();
    let dir = fs.mkdir(root, b"many", 0o755, 0, 0).expect("mkdir").ino;
    for i in 0..1000u32 {
        let f = fs
            .mknod(dir, format!("file-{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create");
        fs.write_data(f.ino, 0, &[3; 100]).expect("write");
    }
    let big = fs.mknod(root, b"big", REG, 0, 0, 0).expect("create").ino;
    let chunk = vec![5u8; 1 << 20];
    for i in 0..64u64 {
        fs.write_data(big, i << 20, &chunk).expect("write");
    }
    fs.unmount().expect("unmount");
    let counting = FaultLun::new(lun, FaultConfig::default());
    let start = Instant::now();
    let report = check(&counting).expect("fsck");
    let took = start.elapsed();
    assert_clean(&report);
    assert_eq!(report.counts.regular_files, 1001);
    assert!(report.counts.data_blocks >= 16384);
    let read = counting.stats().read_bytes;
    assert!(
        read < 16 << 20,
        "fsck read {read} bytes: it reads file data"
    );
    // Debug builds are slower; a release build takes a few milliseconds.
    assert!(took < Duration::from_secs(2), "fsck took {took:?}");
}

#[test]
fn a_committed_write_outside_the_groups_is_reported_not_applied() {
    let lun = fresh(24 << 20);
    let sb = crate::fs::read_superblock(lun.as_ref()).expect("sb");
    let geo = Geometry::from_superblock(&sb);
    let (mut journal, _) =
        crate::journal::Journal::open_and_replay(lun.as_ref(), &geo, 3, sb.volume_uuid)
            .expect("open");
    let heartbeat = geo.hb_start * BLOCK_SIZE_U64;
    let record = crate::journal::Record {
        target: heartbeat,
        image: vec![0xAB; 512],
    };
    journal
        .commit_unchecked(lun.as_ref(), &[record])
        .expect("commit");
    let report = check(lun.as_ref()).expect("fsck");
    assert!(
        kinds(&report).contains(&ProblemKind::JournalRecord),
        "{}",
        report.render()
    );
    let render = report.render();
    assert!(render.contains("slot 3") && render.contains(&format!("byte {heartbeat}")));
}

// ----------------------------------------------------------------------------------
// Orphan tables.
// ----------------------------------------------------------------------------------

/// A volume whose host crashed with a file (`ino`) unlinked but open: only slot 0's
/// orphan table names it. Its journal is home (its locks were let go).
fn crashed_with_an_orphan() -> (Vec<u8>, Ino) {
    let lun = fresh(64 << 20);
    let fs = mount(lun.clone());
    let f = fs.mknod(fs.root(), b"f", REG, 0, 0, 0).expect("create").ino;
    fs.write_data(f, 0, &[5; 20_000]).expect("write");
    fs.open(f, false).expect("open");
    fs.unlink(fs.root(), b"f").expect("unlink while open");
    fs.fsync(f, false).expect("fsync");
    // Everything home and the journal empty, so that a change to the image is seen.
    fs.release_all_locks().expect("release");
    drop(fs); // crash: the file stays open for ever
    (lun.snapshot(), f)
}

fn orphan_table_of(image: &[u8], geo: &Geometry, slot: u32) -> crate::format::OrphanTable {
    let block = geo.orphan_table(slot).expect("orphan tables");
    crate::format::OrphanTable::decode(&image[body_range(geo, block)], block).expect("table")
}

fn write_orphan_table(image: &mut [u8], geo: &Geometry, mut table: crate::format::OrphanTable) {
    table.seal();
    let range = body_range(geo, table.blockno);
    image[range].copy_from_slice(bytemuck::bytes_of(&table));
}

#[test]
fn a_file_unlinked_while_open_is_reachable_through_its_orphan_table() {
    let (image, f) = crashed_with_an_orphan();
    let geo = geometry(&image);
    assert_eq!(orphan_table_of(&image, &geo, 0).listed(), &[f]);
    let report = check_image(image.clone());
    assert_clean(&report);
    assert_eq!(report.counts.regular_files, 1, "{}", report.render());

    // A listing the inode does not agree with is a problem.
    let mut linked = image.clone();
    let mut table = orphan_table_of(&linked, &geo, 1);
    table.entries[0] = f;
    table.count = 1;
    write_orphan_table(&mut linked, &geo, table);
    let report = check_image(linked);
    assert_eq!(
        kinds(&report),
        vec![ProblemKind::OrphanTable],
        "{}",
        report.render()
    );

    // So is a damaged table: its inode is then unreachable.
    let mut damaged = image.clone();
    let at = geo.body_offset(geo.orphan_table(0).expect("tables")) as usize;
    damaged[at + 40] ^= 1;
    let report = check_image(damaged);
    assert!(report.has(ProblemKind::OrphanTable), "{}", report.render());
    assert!(report.has(ProblemKind::LeakedBlocks), "{}", report.render());
}

#[test]
fn repair_frees_the_files_orphan_tables_list() {
    let (image, f) = crashed_with_an_orphan();
    let geo = geometry(&image);
    let lun = MemLun::from_image(image, 512);
    let done = repair(&lun, true).expect("repair");
    assert_eq!(
        done.exit_code(),
        1,
        "{:?}\n{}",
        done.fixed,
        done.after.render()
    );
    let after = lun.snapshot();
    assert_eq!(orphan_table_of(&after, &geo, 0).count, 0);
    assert!(
        !bit_is_set(&after, &geo, f),
        "the orphan's inode was not freed"
    );
    assert_clean(&check_image(after));
}
