//! Inode numbers the kernel (or a caller) keeps after the inode is gone: they must
//! never lead to a lock taken in a block that is no longer an inode.

use super::namei::SetAttr;
use super::tests::{fresh_volume, mount};
use super::{Ino, KernelCache};

use crate::format::{BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::lun::Lun;

const REG: u32 = libc::S_IFREG | 0o644;
/// Blocks of file data written to reuse a freed directory's block.
const DATA_BLOCKS: usize = 64;

/// File data whose every block starts with a zero sector (what an all-zero guess of a
/// free lock record would match), then bytes that are not zero.
fn data_with_zero_first_sectors() -> Vec<u8> {
    let mut data = vec![0u8; DATA_BLOCKS * BLOCK_SIZE];
    for (i, byte) in data.iter_mut().enumerate() {
        if i % BLOCK_SIZE >= 512 {
            *byte = (i % 251) as u8 | 1;
        }
    }
    data
}

fn read_block(lun: &dyn Lun, block: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut buf, block * BLOCK_SIZE_U64)
        .expect("reading the image");
    buf
}

#[test]
fn a_removed_directorys_number_never_takes_a_lock_in_the_file_data_that_reused_it() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let root = a.root();
    // The file's data goes right after its inode: where the directory is now.
    let f = a.mknod(root, b"f", REG, 0, 0, 0).expect("create").ino;
    let d = a.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
    // Host b looks at the directory (a shell's cwd), so it keeps the image of the
    // lock record it left when a took the lock back.
    b.getattr(d).expect("b stats d");
    a.rmdir(root, b"d").expect("rmdir");
    a.sync().expect("sync");
    let data = data_with_zero_first_sectors();
    a.write_data(f, 0, &data).expect("write");
    a.sync().expect("sync");
    let before = read_block(lun.as_ref(), d);
    let offset_in_file = data
        .chunks(BLOCK_SIZE)
        .position(|block| block == before.as_slice());
    assert!(
        offset_in_file.is_some(),
        "the test needs the directory's block reused for the file's data"
    );
    for (name, host) in [("b", &b), ("a", &a)] {
        let stat = host.getattr(d).map_err(|e| e.errno()).err();
        assert!(
            read_block(lun.as_ref(), d) == before,
            "host {name} wrote into the file data that reused the directory's block"
        );
        assert_eq!(
            stat,
            Some(libc::ESTALE),
            "host {name}: stat of the removed directory's number"
        );
    }
    assert_eq!(
        a.read_data(f, 0, data.len() as u32).expect("read"),
        data,
        "the file's data changed"
    );
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
}

#[test]
fn a_directory_open_on_another_host_outlives_its_removal_until_released() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let root = a.root();
    let d = a.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
    b.opendir(d).expect("b opens d");
    a.rmdir(root, b"d").expect("rmdir on a");
    let seen = b.getattr(d).expect("b stats its open directory");
    assert_eq!((seen.nlink, seen.is_dir()), (0, true));
    assert_eq!(
        b.mknod(d, b"x", REG, 0, 0, 0).map_err(|e| e.errno()).err(),
        Some(libc::ENOENT),
        "a removed directory takes no new entries"
    );
    b.release(d, false).expect("b releases d");
    assert_eq!(
        b.getattr(d).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE),
        "the last release frees the directory"
    );
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
    let report = crate::fsck::check(lun.as_ref()).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_node_the_kernel_holds_is_stale_once_its_block_holds_another_inode() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let root = a.root();
    let d = a.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir");
    a.remember(&d); // the kernel looked it up: a shell's cwd
    a.rmdir(root, b"d").expect("rmdir");
    a.sync().expect("sync");
    let f = a.mknod(root, b"f", REG, 0, 0, 0).expect("create");
    assert_eq!(f.ino, d.ino, "the test needs the directory's block reused");
    assert_ne!(f.generation, d.generation);
    for (what, result) in [
        ("stat", a.getattr(d.ino).map(|_| ())),
        ("readdir", a.readdir(d.ino, 0, &mut |_, _, _, _| false)),
        (
            "create in it",
            a.mknod(d.ino, b"x", REG, 0, 0, 0).map(|_| ()),
        ),
        (
            "chmod",
            a.setattr(
                d.ino,
                &SetAttr {
                    mode: Some(0o700),
                    ..SetAttr::default()
                },
            )
            .map(|_| ()),
        ),
    ] {
        assert_eq!(
            result.map_err(|e| e.errno()).err(),
            Some(libc::ESTALE),
            "{what} through the kernel's node of the removed directory"
        );
    }
    assert_eq!(
        a.getattr(f.ino).map(|_| ()).map_err(|e| e.errno()).err(),
        Some(libc::ESTALE)
    );
    // Once the kernel looks the new file up, it knows the node by its generation.
    a.remember(&a.lookup(root, b"f").expect("lookup of the new file"));
    let seen = a.getattr(f.ino).expect("stat of the new file");
    assert_eq!((seen.mode, seen.generation), (REG, f.generation));
    a.forget(f.ino, 2);
    a.unmount().expect("unmount");
}

/// A kernel cache that records what it was told to drop.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<(Ino, Option<Vec<u8>>)>>);

impl KernelCache for std::sync::Arc<Recorded> {
    fn inval_attrs(&self, ino: Ino) {
        self.0.lock().expect("lock").push((ino, None));
    }
}

impl Recorded {
    /// Waits (bounded) until `want` was recorded: the holder's service thread sends
    /// it right after letting the lock go, which the other host sees first.
    fn wait_for(&self, want: &(Ino, Option<Vec<u8>>)) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(20) {
            if self.0.lock().expect("lock").contains(want) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }
}

#[test]
fn the_kernel_caches_of_what_another_host_takes_over_are_invalidated() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let kernel = std::sync::Arc::new(Recorded::default());
    b.set_kernel_cache(Box::new(kernel.clone()));
    let root = a.root();
    let d = a.mkdir(root, b"d", 0o755, 0, 0).expect("mkdir").ino;
    let f = a.mknod(d, b"f", REG, 0, 0, 0).expect("create").ino;
    let hidden = a.mknod(d, b"unknown", REG, 0, 0, 0).expect("create").ino;
    // b's kernel looks up d and d/f (not d/unknown).
    b.remember(&b.lookup(root, b"d").expect("lookup d"));
    b.remember(&b.lookup(d, b"f").expect("lookup f"));
    b.getattr(hidden)
        .expect("b stats the file its kernel does not hold");
    kernel.0.lock().expect("lock").clear();
    a.write_data(f, 0, b"appended on a").expect("write on a");
    assert!(
        kernel.wait_for(&(f, None)),
        "f's attributes: {:?}",
        kernel.0.lock()
    );
    a.mknod(d, b"new", REG, 0, 0, 0).expect("create on a");
    assert!(
        kernel.wait_for(&(d, None)),
        "d's attributes: {:?}",
        kernel.0.lock()
    );
    // Taken back changed: invalidated before b answers (its kernel holds f).
    kernel.0.lock().expect("lock").clear();
    assert_eq!(b.getattr(f).expect("stat on b").size, 13);
    assert!(kernel.0.lock().expect("lock").contains(&(f, None)));
    assert!(
        !kernel
            .0
            .lock()
            .expect("lock")
            .iter()
            .any(|(ino, _)| *ino == hidden),
        "only nodes the kernel holds are invalidated"
    );
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
}

#[test]
fn a_fenced_host_drops_the_kernel_attributes_of_its_mount() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let kernel = std::sync::Arc::new(Recorded::default());
    a.set_kernel_cache(Box::new(kernel.clone()));
    let root = a.root();
    let f = a.mknod(root, b"f", REG, 0, 0, 0).expect("create").ino;
    a.write_data(f, 0, b"cached by the kernel").expect("write");
    a.remember(&a.lookup(root, b"f").expect("lookup f"));
    a.getattr(root).expect("stat");
    kernel.0.lock().expect("lock").clear();
    // The lease runs out (as after a pause past it).
    a.lease().fence("test: lease lost");
    assert!(
        kernel.wait_for(&(f, None)),
        "the fenced host kept its kernel's attributes of f"
    );
    assert!(
        kernel.wait_for(&(root, None)),
        "the fenced host kept its kernel's attributes of the root"
    );
    assert!(a.getattr(f).is_err(), "a fenced host answers nothing");
}

#[test]
fn a_host_holding_a_freed_inodes_lock_is_asked_before_the_block_is_reused() {
    let lun = fresh_volume(64 << 20);
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let root = a.root();
    let old = a.mknod(root, b"old", REG, 0, 0, 0).expect("create").ino;
    a.write_data(old, 0, b"a holds it").expect("write");
    // B changes it while A holds it: B's first try fails to get it exclusive, so for
    // a while B takes that lock exclusive wherever it would take it shared.
    let chmod = super::namei::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    b.getattr(old).expect("stat on b"); // B takes it shared (A lets it go)
    a.getattr(old).expect("stat on a"); // both hold it shared
    b.setattr(old, &chmod).expect("chmod on b"); // B's exclusive try fails first
    a.unlink(root, b"old").expect("unlink on a");
    // Everything home, the freed inode's lock and its group's let go.
    a.release_all_locks().expect("release");
    // B comes by the old number and takes its lock (exclusive) to find it freed.
    let answer = b.getattr(old);
    assert!(answer.is_err(), "the freed inode is gone: {answer:?}");
    b.verify_locks().expect("B's beliefs before the reuse");
    // A allocates the same block for a new inode: it must ask B, not overwrite.
    let new = a
        .mknod(root, b"new", REG, 0, 0, 0)
        .expect("create again")
        .ino;
    assert_eq!(new, old, "the test needs the block reused");
    b.verify_locks()
        .expect("B believes it holds a lock whose record another host overwrote");
    a.verify_locks().expect("A's beliefs");
    a.unmount().expect("unmount a");
    b.unmount().expect("unmount b");
}
