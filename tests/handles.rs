//! Open handles on a real FUSE mount keep their inode, whatever happens to its names:
//! `fstat` answers as ext4 does (link count 0), never EIO or ESTALE.
//!
//! Needs root and /dev/fuse; without them each test prints "skipped" and passes.

mod common;

use common::{MountSpec, Scratch};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;

const IMAGE_BYTES: u64 = 256 << 20;
/// No attribute or entry caching: every fstat reaches the daemon.
const STRICT: &str = "attr_timeout=0,entry_timeout=0";

#[test]
fn fstat_of_an_open_directory_after_rmdir_shows_no_links() {
    require_fuse!();
    let scratch = Scratch::new("rmdir-fstat");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "a").mount_with_options(STRICT);
    let dir = mount.join("d");
    fs::create_dir(&dir).expect("mkdir");
    // A shell whose cwd is the directory holds it like this.
    let handle = File::open(&dir).expect("opening the directory");
    let ino = handle.metadata().expect("fstat before").ino();
    fs::remove_dir(&dir).expect("rmdir");
    let after = handle
        .metadata()
        .expect("fstat of the open directory after rmdir");
    assert_eq!((after.ino(), after.nlink()), (ino, 0));
    assert!(after.is_dir());
    drop(handle);
    mount.unmount();
}

#[test]
fn fstat_of_an_open_file_whose_name_was_renamed_over_shows_no_links() {
    require_fuse!();
    let scratch = Scratch::new("rename-fstat");
    let image = scratch.image("volume.img", IMAGE_BYTES);
    let mount = MountSpec::in_scratch(&scratch, &image, "a").mount_with_options(STRICT);
    let (old, new) = (mount.join("f"), mount.join("g"));
    fs::write(&old, b"the old file").expect("write f");
    fs::write(&new, b"the new file").expect("write g");
    let mut handle = File::open(&old).expect("open f");
    let ino = handle.metadata().expect("fstat before").ino();
    fs::rename(&new, &old).expect("rename g over f");
    let after = handle
        .metadata()
        .expect("fstat of the open file after its name was replaced");
    assert_eq!((after.ino(), after.nlink(), after.len()), (ino, 0, 12));
    let mut data = Vec::new();
    handle.seek(SeekFrom::Start(0)).expect("seek");
    handle.read_to_end(&mut data).expect("read");
    assert_eq!(data, b"the old file");
    assert_eq!(fs::read(&old).expect("read the new f"), b"the new file");
    drop(handle);
    mount.unmount();
}
