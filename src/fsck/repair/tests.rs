//! Repair tests: each corruption fsck's own tests inject, on a copy of the populated
//! volume, repaired; then the check must be clean, a second repair must find nothing,
//! and every file the corruption did not touch must read back through a fresh mount
//! (which also creates a file, so the repaired bitmaps are used by the allocator).

use super::{repair, Repair};
use crate::cluster::HostUuid;
use crate::format::{
    AgHeader, DirBucketHeader, Geometry, InodeBody, LockRecord, OnDisk, Superblock, BLOCK_SIZE,
    BLOCK_SIZE_U64, DIR_ENTRY_FIXED, LOCK_EXCLUSIVE, LOCK_FREE, OPEN_WRITER, RESOURCE_BODY_SIZE,
};
use crate::fs::{Fs, Ino, MountOptions};
use crate::fsck::tests::{
    assert_clean, bit_is_set, block_range, built, check_image, first_data_block, fresh, geometry,
    mount, read_inode, reseal, root_entry, set_bitmap_bit, write_inode, REG,
};
use crate::fsck::{check, ProblemKind};
use crate::lun::{crash_image, FaultConfig, FaultLun, Lun, MemLun};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Inos = HashMap<&'static str, Ino>;

/// Files of the built volume and what they hold, to read back after a repair.
const FILES: [(&str, &[u8]); 6] = [
    ("/docs/a", &[7; 5000]),
    ("/docs/b", &[7; 5000]),
    ("/c-renamed", &[7; 5000]),
    ("/hard1", &[7; 5000]),
    ("/big/hard2", &[7; 5000]),
    ("/prealloc", b"short"),
];

fn lookup_path(fs: &Fs, path: &str) -> Option<Ino> {
    let mut ino = fs.root();
    for name in path.split('/').filter(|n| !n.is_empty()) {
        ino = fs.lookup(ino, name.as_bytes()).ok()?.ino;
    }
    Some(ino)
}

/// Mounts the volume as a new host and reads back every file not in `lost` (which
/// must be gone), creates one file, unmounts, and checks the volume clean.
fn assert_files_read_back(lun: &Arc<MemLun>, lost: &[&str]) {
    let fs = Fs::mount(
        lun.clone() as Arc<dyn Lun>,
        MountOptions::new(HostUuid([9; 16])),
    )
    .expect("mount after repair");
    for (path, content) in FILES {
        let found = lookup_path(&fs, path);
        if lost.contains(&path) {
            assert!(found.is_none(), "{path} is still there");
            continue;
        }
        let ino = found.unwrap_or_else(|| panic!("{path} is gone"));
        let data = fs.read_data(ino, 0, 8192).expect("read");
        assert_eq!(data, content, "{path} reads back wrong");
    }
    let frag = lookup_path(&fs, "/frag").expect("/frag");
    for i in [0u64, 150, 299] {
        let data = fs.read_data(frag, i * 2 * BLOCK_SIZE_U64, 4).expect("read");
        assert_eq!(data, b"frag", "/frag block {i}");
    }
    let slink = lookup_path(&fs, "/slink").expect("/slink");
    assert_eq!(fs.readlink(slink).expect("readlink"), b"docs/a");
    assert!(lookup_path(&fs, "/n1/n2/n3/n4").is_some());
    assert!(lookup_path(&fs, "/docs/moved").is_some());
    let big = lookup_path(&fs, "/big").expect("/big");
    for i in (0..3000u32).step_by(299) {
        let name = format!("{i:0>200}");
        assert!(fs.lookup(big, name.as_bytes()).is_ok(), "/big/{i} is gone");
    }
    let new = fs
        .mknod(fs.root(), b"after-repair", REG, 0, 0, 0)
        .expect("create");
    fs.write_data(new.ino, 0, &[5; 20000]).expect("write");
    assert_eq!(
        fs.read_data(new.ino, 0, 20000).expect("read"),
        vec![5; 20000]
    );
    fs.unmount().expect("unmount");
    assert_clean(&check(lun.as_ref()).expect("check"));
}

/// Corrupts a copy of the built volume, checks that the check sees it, repairs it and
/// asserts: corrections reported (exit 1), clean after, a second repair finds nothing,
/// files read back (`lost` gone). Returns the repair, the repaired volume, and its
/// image as the repair left it (before the remount wrote to it).
fn repaired(
    corrupt: impl FnOnce(&mut Vec<u8>, &Geometry, &Inos),
    lost: &[&str],
) -> (Repair, Arc<MemLun>, Vec<u8>) {
    let b = built();
    let mut image = b.image.clone();
    let geo = geometry(&image);
    corrupt(&mut image, &geo, &b.inos);
    let before = check_image(image.clone());
    assert!(!before.is_clean(), "the corruption was not seen");
    let lun = Arc::new(MemLun::from_image(image, 512));
    let done = repair(lun.as_ref(), false).expect("repair");
    assert!(!done.fixed.is_empty(), "nothing repaired");
    assert_clean(&done.after);
    assert_eq!(done.exit_code(), 1, "{:?}", done.fixed);
    let again = repair(lun.as_ref(), false).expect("second repair");
    assert!(again.fixed.is_empty(), "second repair: {:?}", again.fixed);
    assert_eq!(again.exit_code(), 0);
    let image = lun.snapshot();
    assert_files_read_back(&lun, lost);
    (done, lun, image)
}

/// The one line of `fixed` that contains `what`.
fn line<'a>(done: &'a Repair, what: &str) -> &'a str {
    done.fixed
        .iter()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no repair line with {what:?}: {:?}", done.fixed))
}

// ----------------------------------------------------------------------------------
// The corruptions of fsck's tests.
// ----------------------------------------------------------------------------------

#[test]
fn an_inode_that_does_not_decode_is_lost_its_entry_removed_and_its_blocks_freed() {
    let b = built();
    let ino = b.inos["/docs/b"];
    let geo = geometry(&b.image);
    let data = first_data_block(&read_inode(&b.image, &geo, ino));
    let (done, _, image) = repaired(
        |image, geo, _| image[geo.body_offset(ino) as usize + 100] ^= 0x40,
        &["/docs/b"],
    );
    let lost = line(&done, "files lost");
    assert!(
        lost.contains("/docs/b") && lost.contains(&ino.to_string()),
        "{lost}"
    );
    assert!(line(&done, "allocation groups").contains("unreachable blocks freed"));
    assert!(
        !bit_is_set(&image, &geo, ino),
        "the lost inode's block is still used"
    );
    assert!(
        !bit_is_set(&image, &geo, data),
        "the lost file's data is still used"
    );
}

#[test]
fn a_used_block_marked_free_is_marked_used() {
    let ino = built().inos["/docs/b"];
    let mut target = 0;
    let (done, _, image) = repaired(
        |image, geo, _| {
            target = first_data_block(&read_inode(image, geo, ino));
            set_bitmap_bit(image, geo, target, false);
        },
        &[],
    );
    assert!(line(&done, "allocation groups").contains("1 blocks in use marked used"));
    assert!(bit_is_set(&image, &geometry(&image), target));
}

#[test]
fn a_leaked_run_is_freed() {
    let mut leaked = Vec::new();
    let (done, _, image) = repaired(
        |image, geo, _| {
            let end = geo.ag_end(0);
            leaked = (end - 40..end - 30).collect();
            for &block in &leaked {
                set_bitmap_bit(image, geo, block, true);
            }
        },
        &[],
    );
    assert!(
        line(&done, "allocation groups").contains("group 0: 10 unreachable blocks freed"),
        "{:?}",
        done.fixed
    );
    let geo = geometry(&image);
    assert!(leaked.iter().all(|&block| !bit_is_set(&image, &geo, block)));
}

#[test]
fn a_bumped_link_count_is_set_back() {
    let ino = built().inos["/docs/b"];
    let (done, _, _) = repaired(
        |image, geo, _| {
            let mut inode = read_inode(image, geo, ino);
            inode.nlink += 1;
            write_inode(image, geo, inode);
        },
        &[],
    );
    assert_eq!(
        line(&done, "link counts"),
        "link counts set to the entries found (1): /docs/b 2 -> 1"
    );
}

#[test]
fn a_zeroed_primary_superblock_is_rewritten_from_the_backup() {
    let (done, _, image) = repaired(|image, _, _| image[..BLOCK_SIZE].fill(0), &[]);
    line(&done, "primary superblock rewritten from the backup");
    let sb = Superblock::decode(&image[..BLOCK_SIZE], 0).expect("primary");
    assert_eq!(sb.self_block, 0);
}

#[test]
fn a_bitmap_that_fails_its_checksum_is_rebuilt() {
    let (done, _, _) = repaired(
        |image, geo, _| image[geo.ag_bitmap(0) as usize * BLOCK_SIZE + 3000] ^= 1,
        &[],
    );
    line(&done, "group 0");
}

#[test]
fn an_entry_naming_a_data_block_is_removed() {
    let b = built();
    let geo = geometry(&b.image);
    let data = first_data_block(&read_inode(&b.image, &geo, b.inos["/docs/b"]));
    let fifo = b.inos["/fifo"];
    let (done, lun, image) = repaired(
        |image, geo, _| {
            edit_root_entry(image, geo, b"fifo", |e| {
                e[8..16].copy_from_slice(&data.to_le_bytes());
            });
        },
        &[],
    );
    assert!(
        line(&done, "named no inode").ends_with(": /fifo"),
        "{:?}",
        done.fixed
    );
    // The fifo's inode, unreachable now, was freed; /docs/b's block stays in use.
    assert!(line(&done, "allocation groups").contains("1 unreachable blocks freed"));
    assert!(!bit_is_set(&image, &geo, fifo));
    assert!(bit_is_set(&image, &geo, data));
    let fs = mount(lun.clone());
    assert!(fs.lookup(fs.root(), b"fifo").is_err());
    fs.unmount().expect("unmount");
}

// ----------------------------------------------------------------------------------
// More of what repair fixes.
// ----------------------------------------------------------------------------------

#[test]
fn a_damaged_backup_superblock_is_rewritten_from_the_primary() {
    let (done, _, _) = repaired(
        |image, _, _| {
            let last = image.len() - BLOCK_SIZE;
            image[last + 100] ^= 1;
        },
        &[],
    );
    line(&done, "backup superblock rewritten from the primary");
}

#[test]
fn a_wrong_block_count_is_set() {
    let ino = built().inos["/docs/b"];
    let (done, _, _) = repaired(
        |image, geo, _| {
            let mut inode = read_inode(image, geo, ino);
            inode.blocks += 3;
            write_inode(image, geo, inode);
        },
        &[],
    );
    assert!(
        line(&done, "block counts").contains("/docs/b 6 -> 3"),
        "{:?}",
        done.fixed
    );
}

#[test]
fn an_entry_outside_the_data_area_is_removed() {
    let (done, _, _) = repaired(
        |image, geo, _| {
            edit_root_entry(image, geo, b"fifo", |e| {
                e[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            });
        },
        &[],
    );
    line(&done, "named no inode");
}

#[test]
fn a_wrong_entry_kind_is_set_to_the_inodes() {
    let (done, lun, _) = repaired(
        |image, geo, _| {
            edit_root_entry(image, geo, b"fifo", |e| e[16] = libc::DT_DIR);
        },
        &[],
    );
    assert!(line(&done, "entry kinds").ends_with(": /fifo"));
    let fs = mount(lun.clone());
    let fifo = fs.lookup(fs.root(), b"fifo").expect("/fifo is kept");
    assert_eq!(fifo.kind(), libc::S_IFIFO);
    fs.unmount().expect("unmount");
}

#[test]
fn directory_counts_and_parent_fields_are_set() {
    let (done, _, _) = repaired(
        |image, geo, _| {
            let docs = entry_ino(image, geo, b"docs");
            let mut d = read_inode(image, geo, docs);
            d.dir_entries += 2;
            d.size += BLOCK_SIZE_U64;
            write_inode(image, geo, d);
            let n1 = entry_ino(image, geo, b"n1");
            let mut n = read_inode(image, geo, n1);
            n.parent = docs;
            write_inode(image, geo, n);
        },
        &[],
    );
    assert!(line(&done, "entry and bucket counts").contains("/docs"));
    assert!(line(&done, "sizes set").contains("/docs"));
    assert!(line(&done, "parent fields").contains("/n1"));
}

#[test]
fn unknown_flags_a_size_past_the_largest_file_and_a_damaged_xattr_block_are_fixed() {
    let b = built();
    let frag = b.inos["/frag"];
    let a = b.inos["/docs/a"];
    let geo = geometry(&b.image);
    let xattr = read_inode(&b.image, &geo, a).xattr_block;
    assert_ne!(xattr, 0);
    let (done, _, image) = repaired(
        |image, geo, _| {
            let mut inode = read_inode(image, geo, frag);
            inode.flags |= 0x4000;
            inode.size = u64::MAX / 2;
            write_inode(image, geo, inode);
            image[(xattr * BLOCK_SIZE_U64) as usize + 100] ^= 1;
        },
        &[],
    );
    assert!(line(&done, "unknown inode flags").contains("/frag"));
    // /frag's last extent maps file block 598: its data ends at block 599.
    let size = line(&done, "sizes set");
    assert!(
        size.contains(&format!(
            "/frag {} -> {}",
            u64::MAX / 2,
            599 * BLOCK_SIZE_U64
        )),
        "{size}"
    );
    line(&done, "xattr blocks dropped");
    assert_eq!(read_inode(&image, &geo, a).xattr_block, 0);
    assert!(
        !bit_is_set(&image, &geo, xattr),
        "the dropped xattr block is still used"
    );
}

#[test]
fn a_wrong_stored_hash_in_the_right_bucket_is_set() {
    let (done, _, _) = repaired(
        |image, geo, _| {
            // The root has one bucket of depth 0: every hash belongs there.
            edit_root_entry(image, geo, b"fifo", |e| {
                e[..8].copy_from_slice(&12345u64.to_le_bytes());
            });
        },
        &[],
    );
    assert!(line(&done, "entry hashes").ends_with(": /fifo"));
}

/// Changes the fixed bytes of entry `name` of the root's single bucket (hash at 0,
/// inode at 8, kind at 16) and reseals the bucket.
fn edit_root_entry(image: &mut [u8], geo: &Geometry, name: &[u8], edit: impl FnOnce(&mut [u8])) {
    let (bucket, pos) = root_entry(image, geo, name);
    let block = (bucket * BLOCK_SIZE_U64) as usize;
    let at = block + std::mem::size_of::<DirBucketHeader>() + pos;
    edit(&mut image[at..at + DIR_ENTRY_FIXED]);
    reseal(image, block, BLOCK_SIZE);
}

/// The inode a name in the root's single bucket names.
fn entry_ino(image: &[u8], geo: &Geometry, name: &[u8]) -> Ino {
    let (bucket, pos) = root_entry(image, geo, name);
    let at = (bucket * BLOCK_SIZE_U64) as usize + std::mem::size_of::<DirBucketHeader>() + pos;
    u64::from_le_bytes(image[at + 8..at + 16].try_into().expect("8 bytes"))
}

#[test]
fn damaged_and_stale_lock_records_are_reset() {
    let a = built().inos["/docs/a"];
    let (done, _, image) = repaired(
        |image, geo, inos| {
            // Garbage in the group header's lock sector: a problem.
            let hdr = geo.ag_header(0) as usize * BLOCK_SIZE;
            image[hdr..hdr + 512].fill(0x5a);
            // A record naming a host that is gone, with the file open: not a problem
            // for the check, but stale once no host is live.
            let mut lock: LockRecord = bytemuck::Zeroable::zeroed();
            lock.magic = LockRecord::MAGIC;
            lock.mode = LOCK_EXCLUSIVE;
            lock.owner_slot = 0;
            lock.owner_gen = 5;
            lock.resource = inos["/docs/a"];
            lock.change_seq = 9;
            lock.open_flags = OPEN_WRITER;
            lock.seal();
            let at = (inos["/docs/a"] * BLOCK_SIZE_U64) as usize;
            image[at..at + 512].copy_from_slice(bytemuck::bytes_of(&lock));
        },
        &[],
    );
    assert!(line(&done, "damaged lock records").ends_with(": group 0"));
    // /docs/a has three names; the walk names it by one of them.
    let stale = line(&done, "stale lock records");
    assert!(
        ["/docs/a", "/hard1", "/big/hard2"]
            .iter()
            .any(|p| stale.contains(p)),
        "{stale}"
    );
    let at = (a * BLOCK_SIZE_U64) as usize;
    let lock = LockRecord::decode(&image[at..at + 512], a).expect("lock");
    assert_eq!((lock.mode, lock.open_flags), (LOCK_FREE, 0));
    assert!(lock.change_seq >= 10);
}

#[test]
fn inode_lock_sectors_damaged_or_zeroed_get_a_free_record_and_the_files_stay_usable() {
    // atsfs takes an all-zero lock sector for a free lock only on group headers and
    // the root: elsewhere it means "not an inode any more" (a stale inode number).
    let (a, b) = (built().inos["/docs/a"], built().inos["/docs/b"]);
    let (done, _, image) = repaired(
        |image, _, inos| {
            let at = (inos["/docs/a"] * BLOCK_SIZE_U64) as usize;
            image[at..at + 512].fill(0);
            let at = (inos["/docs/b"] * BLOCK_SIZE_U64) as usize;
            image[at..at + 512].fill(0x5a);
        },
        &[],
    );
    line(&done, "lock sectors of all zeros");
    line(&done, "damaged lock records");
    for ino in [a, b] {
        let at = (ino * BLOCK_SIZE_U64) as usize;
        let lock = LockRecord::decode(&image[at..at + 512], ino).expect("a free lock record");
        assert_eq!(lock.mode, LOCK_FREE);
    }
}

#[test]
fn a_stale_lock_alone_is_reset_and_counts_as_a_correction() {
    let b = built();
    let mut image = b.image.clone();
    let a = b.inos["/docs/a"];
    let mut lock: LockRecord = bytemuck::Zeroable::zeroed();
    lock.magic = LockRecord::MAGIC;
    lock.mode = LOCK_EXCLUSIVE;
    lock.owner_gen = 3;
    lock.resource = a;
    lock.seal();
    let at = (a * BLOCK_SIZE_U64) as usize;
    image[at..at + 512].copy_from_slice(bytemuck::bytes_of(&lock));
    let lun = MemLun::from_image(image, 512);
    assert_clean(&check(&lun).expect("check"));
    let done = repair(&lun, false).expect("repair");
    assert_eq!(done.exit_code(), 1);
    line(&done, "stale lock records");
}

#[test]
fn a_damaged_heartbeat_slot_is_reset() {
    let (done, _, _) = repaired(
        |image, geo, _| {
            let at = geo.slot_offset(2) as usize;
            image[at..at + 512].fill(0xa5);
        },
        &[],
    );
    assert!(line(&done, "damaged heartbeat slots").ends_with(": slot 2"));
}

// ----------------------------------------------------------------------------------
// What repair leaves, and when it does nothing.
// ----------------------------------------------------------------------------------

#[test]
fn a_damaged_extent_leaf_is_left_and_unreachable_blocks_are_kept() {
    let b = built();
    let frag = b.inos["/frag"];
    let mut image = b.image.clone();
    let geo = geometry(&image);
    let inode = read_inode(&image, &geo, frag);
    let index: crate::format::Extent = bytemuck::pod_read_unaligned(&inode.area[..24]);
    image[(index.disk_block * BLOCK_SIZE_U64) as usize + 200] ^= 1;
    // Also a leak the repair would free if the walk were complete.
    let end = geo.ag_end(0);
    set_bitmap_bit(&mut image, &geo, end - 5, true);
    let leaf_data: Vec<u64> = {
        let leaf = &b.image[block_range(index.disk_block)];
        let e: crate::format::Extent = bytemuck::pod_read_unaligned(&leaf[32..56]);
        (e.disk_block..e.disk_block + u64::from(e.len)).collect()
    };
    let lun = MemLun::from_image(image, 512);
    let done = repair(&lun, false).expect("repair");
    assert_eq!(done.exit_code(), 4, "{}", done.after.render());
    assert!(done.after.has(ProblemKind::ExtentLeaf));
    assert!(done.after.has(ProblemKind::LeakedBlocks));
    assert!(
        done.notes
            .iter()
            .any(|n| n.contains("kept marked used") && n.contains("/frag")),
        "{:?}",
        done.notes
    );
    let after = lun.snapshot();
    assert!(
        bit_is_set(&after, &geo, end - 5),
        "an unreachable block was freed"
    );
    for block in leaf_data {
        assert!(
            bit_is_set(&after, &geo, block),
            "block {block} of the leaf was freed"
        );
    }
}

#[test]
fn a_damaged_root_frees_nothing() {
    let b = built();
    let mut image = b.image.clone();
    let geo = geometry(&image);
    let sb = Superblock::decode(&image[..BLOCK_SIZE], 0).expect("superblock");
    image[geo.body_offset(sb.root_ino) as usize + 100] ^= 1;
    let lun = MemLun::from_image(image.clone(), 512);
    let done = repair(&lun, false).expect("repair");
    assert_eq!(done.exit_code(), 4);
    assert!(done.after.has(ProblemKind::Inode));
    let bitmaps = |image: &[u8]| -> Vec<u8> {
        (0..geo.ag_count)
            .flat_map(|ag| image[block_range(geo.ag_bitmap(ag))].to_vec())
            .collect()
    };
    assert!(
        bitmaps(&lun.snapshot()) == bitmaps(&image),
        "bitmaps changed"
    );
}

#[test]
fn a_clean_volume_is_not_written() {
    let b = built();
    let lun = MemLun::from_image(b.image.clone(), 512);
    let done = repair(&lun, false).expect("repair");
    assert!(done.fixed.is_empty(), "{:?}", done.fixed);
    assert_eq!(done.exit_code(), 0);
    assert!(lun.snapshot() == b.image, "repair wrote to a clean volume");
}

/// Several corruptions at once, repaired while every write is recorded; then a crash
/// after each write: running the repair again from there must end clean.
#[test]
fn an_interrupted_repair_is_finished_by_running_it_again() {
    let b = built();
    let mut image = b.image.clone();
    let geo = geometry(&image);
    let docs_b = b.inos["/docs/b"];
    image[geo.body_offset(docs_b) as usize + 100] ^= 0x40;
    let frag = b.inos["/frag"];
    let mut inode = read_inode(&image, &geo, frag);
    inode.nlink += 2;
    write_inode(&mut image, &geo, inode);
    let end = geo.ag_end(0);
    for block in end - 20..end - 10 {
        set_bitmap_bit(&mut image, &geo, block, true);
    }
    let hdr = geo.ag_header(1) as usize * BLOCK_SIZE;
    image[hdr..hdr + 512].fill(0x33);
    edit_root_entry(&mut image, &geo, b"fifo", |e| e[16] = libc::DT_REG);

    let fault = FaultLun::new(
        MemLun::from_image(image.clone(), 512),
        FaultConfig::default(),
    );
    fault.start_recording();
    let done = repair(&fault, false).expect("repair");
    assert_clean(&done.after);
    let records = fault.records();
    assert!(records.len() >= 6, "{} writes", records.len());
    for cut in 0..records.len() {
        let lun = MemLun::from_image(crash_image(&image, &records, cut, None, 512), 512);
        let again = repair(&lun, false).expect("repair after the crash");
        assert!(
            again.after.is_clean(),
            "crash after write {cut} of {}:\n{}",
            records.len(),
            again.after.render()
        );
    }
}

// ----------------------------------------------------------------------------------
// Hosts.
// ----------------------------------------------------------------------------------

#[test]
fn repair_refuses_while_a_host_is_live_and_recovers_a_crashed_one() {
    let lun = fresh(64 << 20);
    let fs = mount(lun.clone());
    let f = fs
        .mknod(fs.root(), b"kept", REG, 0, 0, 0)
        .expect("create")
        .ino;
    fs.write_data(f, 0, b"fsynced").expect("write");
    fs.fsync(f, false).expect("fsync");
    let err = repair(lun.as_ref(), false).expect_err("refused while live");
    let msg = format!("{err:#}");
    assert!(msg.contains("slot 0"), "{msg}");
    assert!(msg.contains(&HostUuid([1; 16]).to_string()), "{msg}");
    assert!(msg.contains("unmount every host"), "{msg}");
    assert!(msg.contains("corrupts the volume"), "{msg}");
    drop(fs); // a crash: the slot stays LIVE and stops moving
    let done = repair(lun.as_ref(), false).expect("repair");
    assert!(line(&done, "dead hosts recovered").contains("slot 0"));
    // The dead host's locks were stale: reset.
    line(&done, "stale lock records");
    assert_clean(&done.after);
    assert_eq!(done.after.counts.slots_live, 0);
    let fs = Fs::mount(
        lun.clone() as Arc<dyn Lun>,
        MountOptions::new(HostUuid([9; 16])),
    )
    .expect("mount");
    let kept = fs.lookup(fs.root(), b"kept").expect("kept");
    assert_eq!(fs.read_data(kept.ino, 0, 16).expect("read"), b"fsynced");
    fs.unmount().expect("unmount");
}

#[test]
fn force_does_not_watch_and_recovers_every_slot_in_use() {
    let lun = fresh(64 << 20);
    let fs = mount(lun.clone());
    let f = fs
        .mknod(fs.root(), b"kept", REG, 0, 0, 0)
        .expect("create")
        .ino;
    fs.write_data(f, 0, b"fsynced").expect("write");
    fs.fsync(f, false).expect("fsync");
    drop(fs);
    let start = Instant::now();
    let done = repair(lun.as_ref(), true).expect("repair");
    // The lease is 1 s: a watch would take 1.1 s.
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "{:?}",
        start.elapsed()
    );
    assert!(
        done.notes
            .iter()
            .any(|n| n.contains("--force") && n.contains("corrupts the volume")),
        "{:?}",
        done.notes
    );
    line(&done, "dead hosts recovered");
    assert_clean(&done.after);
    let fs = mount(lun.clone());
    let kept = fs.lookup(fs.root(), b"kept").expect("kept");
    assert_eq!(fs.read_data(kept.ino, 0, 16).expect("read"), b"fsynced");
    fs.unmount().expect("unmount");
}

#[test]
fn repair_writes_whole_aligned_structures() {
    // Every write of a repair is sector aligned and a whole number of sectors, and
    // each superblock, inode body, bucket and header it writes decodes.
    let b = built();
    let mut image = b.image.clone();
    let geo = geometry(&image);
    let ino = b.inos["/docs/b"];
    let mut inode = read_inode(&image, &geo, ino);
    inode.nlink += 1;
    write_inode(&mut image, &geo, inode);
    image[..BLOCK_SIZE].fill(0);
    image[geo.ag_bitmap(0) as usize * BLOCK_SIZE + 3000] ^= 1;
    let fault = FaultLun::new(MemLun::from_image(image, 512), FaultConfig::default());
    fault.start_recording();
    let done = repair(&fault, false).expect("repair");
    assert_clean(&done.after);
    for r in fault.records() {
        assert_eq!(r.offset % 512, 0, "unaligned write at {}", r.offset);
        assert_eq!(r.data.len() % 512, 0, "partial sector at {}", r.offset);
        let block = r.offset / BLOCK_SIZE_U64;
        if r.offset == geo.body_offset(ino) {
            InodeBody::decode(&r.data[..RESOURCE_BODY_SIZE], ino).expect("inode");
        } else if r.offset == geo.body_offset(geo.ag_header(0)) {
            AgHeader::decode(&r.data, block).expect("header");
        } else if r.offset == 0 {
            Superblock::decode(&r.data, 0).expect("superblock");
        }
    }
}

// ----------------------------------------------------------------------------------
// Any bytes.
// ----------------------------------------------------------------------------------

#[test]
fn random_metadata_never_makes_repair_panic() {
    use rand::{Rng, SeedableRng};
    let b = built();
    let mut image = b.image.clone();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let keep_end = image.len() - BLOCK_SIZE;
    rng.fill(&mut image[BLOCK_SIZE..keep_end]);
    let lun = MemLun::from_image(image, 512);
    let done = repair(&lun, false).expect("repair of random bytes");
    assert_eq!(done.exit_code(), 4, "{:?}", done.fixed);
}

/// Resealed random field changes of one metadata structure at a time (as fsck's own
/// test makes them): repair must never panic, and a second repair must find nothing
/// more to write (the first one went as far as it can).
#[test]
fn resealed_random_field_changes_are_repaired_as_far_as_possible() {
    use crate::format::{DirBucket, DirTableBlock, ExtentLeaf, XattrBlock};
    use rand::{Rng, SeedableRng};
    let b = built();
    let geo = geometry(&b.image);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let magic_at = |at: usize| u32::from_le_bytes(b.image[at..at + 4].try_into().expect("4 bytes"));
    let known = [
        InodeBody::MAGIC,
        AgHeader::MAGIC,
        DirBucket::MAGIC,
        DirTableBlock::MAGIC,
        ExtentLeaf::MAGIC,
        XattrBlock::MAGIC,
    ];
    let targets: Vec<(u64, usize, usize)> = (geo.ag_first(0)..geo.ag_end(0))
        .filter_map(|blk| {
            let at = (blk * BLOCK_SIZE_U64) as usize;
            if known.contains(&magic_at(at + 512)) {
                let size = if magic_at(at + 512) == AgHeader::MAGIC {
                    128
                } else {
                    RESOURCE_BODY_SIZE
                };
                Some((blk, 512, size))
            } else if known.contains(&magic_at(at)) {
                Some((blk, 0, BLOCK_SIZE))
            } else {
                None
            }
        })
        .collect();
    let mut clean = 0;
    let rounds = 24;
    for round in 0..rounds {
        let (block, at, size) = targets[rng.gen_range(0..targets.len())];
        let mut image = b.image.clone();
        let base = (block * BLOCK_SIZE_U64) as usize + at;
        for _ in 0..rng.gen_range(1..4) {
            let field = if rng.gen_bool(0.6) {
                rng.gen_range(8..64)
            } else {
                rng.gen_range(8..size)
            };
            image[base + field] = rng.gen();
        }
        reseal(&mut image, base, size);
        let lun = MemLun::from_image(image, 512);
        let done = repair(&lun, false).expect("repair");
        clean += usize::from(done.after.is_clean());
        let again = repair(&lun, false).expect("second repair");
        assert!(
            again.fixed.is_empty(),
            "round {round}, block {block}: the second repair still wrote {:?}\nfirst: {:?}\n{}",
            again.fixed,
            done.fixed,
            again.after.render()
        );
    }
    // Most changes are repaired (the rest are what repair leaves: bad extents, buckets).
    assert!(
        clean > rounds / 3,
        "only {clean} of {rounds} repaired clean"
    );
}
