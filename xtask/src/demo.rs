//! `cargo xtask demo`: atsfs from mkfs to fsck, every command printed so that a
//! reader can type it again.
//!
//! The demo is a list of steps over a `Demo` (the temporary directory, the image,
//! the hosts): hosts A and B mount one volume at once and share it; A crashes
//! (`kill -9`) with a file open for writing, B recovers A's journal and takes the
//! file over after the lease; A comes back and sees everything; fsck is clean.
//! Host C mounts read-only next to them for a look. At the end no daemon log may
//! hold a WARN or ERROR line: in a run where nothing is wrong, an administrator has
//! nothing to act on (a crash the survivor recovers is logged at INFO). The volume
//! is what `mkfs.atsfs` makes on an image file by default (Disk Paxos); `--ats
//! emulated` shows the one-kernel emulation instead.

use crate::mount::{Host, Mounted};
use crate::sh::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Fixed host UUIDs, so that the printed commands are the same every run.
const HOST_A_ID: &str = "a0a0a0a0-0000-4000-8000-00000000000a";
const HOST_B_ID: &str = "b0b0b0b0-0000-4000-8000-00000000000b";
const HOST_C_ID: &str = "c0c0c0c0-0000-4000-8000-00000000000c";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep the temporary directory (image and logs) at the end.
    #[arg(long)]
    keep: bool,
    /// The volume's test-and-set, as `mkfs.atsfs --ats` takes it. The default is
    /// what a user gets on an image file: Disk Paxos (`auto`); `emulated` is the
    /// one-kernel file locks.
    #[arg(long, default_value = "auto")]
    ats: String,
}

/// The demo's world: where the volume is and who uses it.
struct Demo {
    /// `mkfs.atsfs --ats`.
    ats: String,
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
        ats: args.ats.clone(),
        dir: temp.path().to_path_buf(),
        image: temp.path().join("volume.img"),
        atsfs: PathBuf::from("atsfs"),
    };
    let result = two_hosts(&demo);
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

/// Two hosts share one volume; one crashes and the other recovers it.
fn two_hosts(demo: &Demo) -> Result<()> {
    // A 4 s lease: on Disk Paxos a recoverer's claim of a dead slot may wait out
    // the dead host's token and settles for half a lease, all within the hold it
    // takes on the slot (lease - interval); a 2 s lease leaves too little
    // (docs/review/paxos-2026-12-05.md, finding 7).
    sh::heading("Making a 512 MiB volume in an image file (lease 4 s, heartbeat every 250 ms)");
    let mut mkfs = Cmd::new("mkfs-atsfs").args([
        "-L",
        "demo",
        "--size",
        "512M",
        "--lease",
        "4s",
        "--heartbeat-interval",
        "250ms",
    ]);
    if demo.ats != "auto" {
        // The default goes unsaid, as a user types it.
        mkfs = mkfs.args(["--ats", &demo.ats]);
    }
    mkfs.arg(&demo.image).run()?;

    let host_a = demo.host("A", HOST_A_ID);
    let host_b = demo.host("B", HOST_B_ID);
    sh::heading("Host A mounts the volume and writes to it");
    let mount_a = host_a.mount(&demo.atsfs, &demo.image)?;
    write_sample(&mount_a, &demo.sums())?;

    sh::heading("Host B mounts the same volume at the same time and reads A's files");
    let mount_b = host_b.mount(&demo.atsfs, &demo.image)?;
    check_sample(&mount_b, &demo.sums())?;

    let host_c = demo.host("C", HOST_C_ID);
    sh::heading("Host C mounts it read-only: it reads, takes no lock, and may write nothing");
    let mount_c = host_c.mount_with(&demo.atsfs, &demo.image, Some("ro"))?;
    let c = sh::quote(mount_c.path().as_os_str());
    Cmd::shell(&format!(
        "cat {c}/hello.txt; grep ' {c} ' /proc/mounts; \
         touch {c}/new-file || echo '(refused: read-only file system)'"
    ))
    .run()?;
    status(demo)?;
    mount_c.unmount()?;

    sh::heading("Both hosts create files in one directory at once; both see all of them");
    let (a, b) = (
        sh::quote(mount_a.path().as_os_str()),
        sh::quote(mount_b.path().as_os_str()),
    );
    Cmd::shell(&format!(
        "mkdir {a}/shared; \
         (for i in $(seq 1 200); do echo a > {a}/shared/from-a-$i; done) & \
         (for i in $(seq 1 200); do echo b > {b}/shared/from-b-$i; done); wait; \
         ls {a}/shared | wc -l; ls {b}/shared | wc -l"
    ))
    .run()?;

    sh::heading("A opens a file for writing; B's open for writing is refused (EBUSY)");
    let holder = Cmd::shell(&format!(
        "exec 3>>{a}/vm.disk; echo 'A was here' >&3; sleep 600"
    ))
    .into_command()
    .spawn()
    .context("starting the process that holds the file open on A")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Cmd::shell(&format!(
        "echo 'B tries' >> {b}/vm.disk || echo '(refused, as it should be)'"
    ))
    .run()?;

    sh::heading("Host A crashes: its daemon is killed with SIGKILL while the file is open");
    mount_a.kill9()?;
    let mut holder = holder;
    let _ = holder.kill();
    let _ = holder.wait();
    sh::heading("B waits for A's lease to run out, recovers A's journal, and takes the file over");
    Cmd::shell(&format!(
        "start=$(date +%s%N); until echo 'B took over' >> {b}/vm.disk 2>/dev/null; do sleep 0.2; done; \
         echo \"B could write $(( ($(date +%s%N) - start) / 1000000 )) ms after the crash\"; cat {b}/vm.disk"
    ))
    .run()?;
    status(demo)?;

    sh::heading("Host A comes back (a new generation of its slot) and sees B's changes");
    let mount_a = host_a.mount(&demo.atsfs, &demo.image)?;
    Cmd::shell(&format!("cat {a}/vm.disk; ls {a}/shared | wc -l")).run()?;
    check_sample(&mount_a, &demo.sums())?;
    mount_a.unmount()?;
    mount_b.unmount()?;

    sh::heading("Checking the volume (fsck: 0 clean, 4 errors found, 8 could not check)");
    fsck(demo)?;
    sh::heading("Checking the daemon logs: no WARN or ERROR line in a normal run");
    quiet_logs(&[&host_a, &host_b, &host_c])
}

/// Fails when a daemon log holds a WARN or ERROR line: each must be something an
/// administrator acts on, and nothing in the demo is wrong.
fn quiet_logs(hosts: &[&Host]) -> Result<()> {
    let mut loud = Vec::new();
    for host in hosts {
        let text = std::fs::read_to_string(&host.log)
            .with_context(|| format!("reading {}", host.log.display()))?;
        loud.extend(
            warnings(&text)
                .into_iter()
                .map(|line| format!("{}: {line}", host.log.display())),
        );
    }
    if !loud.is_empty() {
        bail!(
            "{} WARN/ERROR line(s) in the daemon logs of a normal run (demote them, or fix \
             what they report):\n{}",
            loud.len(),
            loud.join("\n")
        );
    }
    println!("no WARN or ERROR line in {} daemon logs", hosts.len());
    Ok(())
}

/// The WARN and ERROR lines of a daemon log (tracing's format: time, level, ...).
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| {
            let level = line.split_whitespace().nth(1).unwrap_or("");
            level == "WARN" || level == "ERROR" || line.contains("panicked")
        })
        .collect()
}

/// `atsfs status`, when this build has it.
fn status(demo: &Demo) -> Result<()> {
    let out = Cmd::new(&demo.atsfs)
        .arg("status")
        .arg(&demo.image)
        .output()?;
    if out.status.success() {
        print!(
            "$ atsfs status {}\n{}",
            demo.image.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    #[test]
    fn warnings_are_the_warn_and_error_lines() {
        let log = "\
2026-12-06T02:12:08.978Z  INFO atsfs: joined the volume slot=1
2026-12-06T02:12:09.001Z  WARN atsfs::fs::mount: something to act on
2026-12-06T02:12:09.002Z DEBUG atsfs: a WARN inside a message is no warning
2026-12-06T02:12:09.003Z ERROR atsfs::fs::meta: commit failed
";
        assert_eq!(
            super::warnings(log),
            vec![
                "2026-12-06T02:12:09.001Z  WARN atsfs::fs::mount: something to act on",
                "2026-12-06T02:12:09.003Z ERROR atsfs::fs::meta: commit failed",
            ]
        );
    }
}
