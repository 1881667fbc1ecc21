//! `cargo xtask demo`: atsfs from mkfs to fsck, every command printed so that a
//! reader can type it again.
//!
//! The demo is a list of steps over a `Demo` (the temporary directory, the image,
//! the hosts). Today one host, A, mounts the volume, unmounts it and mounts it again.
//! When cluster locking lands, the two-host demo adds host B
//! (`demo.host("B", HOST_B_ID)`), mounts both at once, writes on A and reads on B;
//! until then two hosts on one volume are not safe, so the demo never does it.

use crate::mount::{Host, Mounted};
use crate::sh::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Fixed host UUIDs, so that the printed commands are the same every run.
const HOST_A_ID: &str = "a0a0a0a0-0000-4000-8000-00000000000a";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep the temporary directory (image and logs) at the end.
    #[arg(long)]
    keep: bool,
}

/// The demo's world: where the volume is and who uses it.
struct Demo {
    dir: PathBuf,
    image: PathBuf,
    /// `atsfs` as the commands name it (found in PATH, which the demo sets).
    atsfs: PathBuf,
}

impl Demo {
    fn host(&self, name: &str, host_id: &str) -> Host {
        Host::new(name, host_id, &self.dir)
    }

    /// Where a host keeps the checksums it will compare after the remount.
    fn sums(&self) -> PathBuf {
        self.dir.join("SHA256SUMS")
    }
}

pub fn run(args: &DemoArgs) -> Result<bool> {
    crate::require_root_and_fuse("demo")?;
    sh::heading("Building atsfs and mkfs-atsfs (release)");
    let bin = crate::install::build_release()?;
    put_in_path(&bin)?;

    let temp = tempfile::Builder::new()
        .prefix("atsfs-demo-")
        .tempdir()
        .context("making a temporary directory")?;
    let demo = Demo {
        dir: temp.path().to_path_buf(),
        image: temp.path().join("volume.img"),
        atsfs: PathBuf::from("atsfs"),
    };
    let result = single_host(&demo);
    if args.keep || result.is_err() {
        let kept = temp.keep();
        println!("(kept {} with the image and the logs)", kept.display());
    }
    result?;
    println!("\ndemo: done. Install with `cargo xtask install`; see docs/operations.md.");
    Ok(true)
}

/// Prepends the build directory to PATH, so the commands below read as typed.
fn put_in_path(bin: &Path) -> Result<()> {
    let old = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&old));
    let new = std::env::join_paths(dirs).context("building PATH")?;
    println!("$ export PATH={}:$PATH", sh::quote(bin.as_os_str()));
    // The demo is single-threaded here; nothing reads the environment concurrently.
    std::env::set_var("PATH", new);
    Ok(())
}

/// One host: make, mount, write, unmount, mount again, compare, check.
fn single_host(demo: &Demo) -> Result<()> {
    sh::heading("Making a 512 MiB volume in an image file");
    Cmd::new("mkfs-atsfs")
        .args(["-L", "demo", "--size", "512M"])
        .arg(&demo.image)
        .run()?;

    let host_a = demo.host("A", HOST_A_ID);
    sh::heading("Host A mounts the volume and writes to it");
    let mount = host_a.mount(&demo.atsfs, &demo.image)?;
    write_sample(&mount, &demo.sums())?;
    sh::heading("Host A unmounts");
    mount.unmount()?;

    sh::heading("Host A mounts the volume again: everything is still there");
    let mount = host_a.mount(&demo.atsfs, &demo.image)?;
    check_sample(&mount, &demo.sums())?;
    mount.unmount()?;

    sh::heading("Checking the volume (fsck: 0 clean, 4 errors found, 8 could not check)");
    fsck(demo)
}

/// Files, a directory, a symlink; a listing, the free space and checksums.
fn write_sample(mount: &Mounted, sums: &Path) -> Result<()> {
    let m = sh::quote(mount.path().as_os_str());
    let s = sh::quote(sums.as_os_str());
    for script in [
        format!("echo 'Hello from host A' > {m}/hello.txt"),
        format!("mkdir -p {m}/projects/atsfs"),
        format!("seq 1 100000 > {m}/projects/atsfs/numbers.txt"),
        format!("head -c 32M /dev/urandom > {m}/random.bin"),
        format!("ln -s projects/atsfs/numbers.txt {m}/numbers.link"),
        format!("ls -lR {m}"),
        format!("df -h {m}"),
        format!("cd {m} && sha256sum hello.txt projects/atsfs/numbers.txt random.bin | tee {s}"),
    ] {
        Cmd::shell(&script).run()?;
    }
    Ok(())
}

fn check_sample(mount: &Mounted, sums: &Path) -> Result<()> {
    let m = sh::quote(mount.path().as_os_str());
    let s = sh::quote(sums.as_os_str());
    for script in [
        format!("ls -lR {m}"),
        format!("cat {m}/hello.txt"),
        format!("readlink {m}/numbers.link"),
        format!("cd {m} && sha256sum -c {s}"),
    ] {
        Cmd::shell(&script).run()?;
    }
    Ok(())
}

fn fsck(demo: &Demo) -> Result<()> {
    let status = Cmd::new(&demo.atsfs)
        .arg("fsck")
        .arg(&demo.image)
        .status()?;
    match status.code() {
        Some(0) => Ok(()),
        Some(4) => bail!("atsfs fsck found errors on the volume (exit 4)"),
        Some(8) => bail!("atsfs fsck could not check the volume (exit 8)"),
        _ => bail!("atsfs fsck failed ({status})"),
    }
}
