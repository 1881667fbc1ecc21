//! `cargo xtask`: the project's tasks, in Rust so that they run wherever cargo does.
//!
//! - `demo`: build, make a volume, mount it, use it, mount it again, check it.
//! - `install`: build release binaries and install them into PREFIX/sbin, with man
//!   pages and shell completions.
//! - `package`: the Debian package (cargo-deb); `--check` installs it in a scratch
//!   root and uses it as a new user would.
//! - `pjdfstest`: run the POSIX suite on a fresh mount, against the exclusion list.
//! - `test`: everything CI runs: build, unit and integration tests, pjdfstest.
//! - `tgt`: the real-iSCSI test bed (a tgtd with COMPARE AND WRITE, hosts in network
//!   namespaces).
//! - `vm`: the cluster inside QEMU guests that share one disk.
//!
//! Modules: `sh` runs and prints commands, `mount` holds hosts and their mounts
//! (a guard that always unmounts), one module per task.

mod demo;
mod fusebench;
mod install;
mod mount;
mod package;
mod pjdfstest;
mod sh;
mod suite;
mod testbed;
mod tgt;
mod vm;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "atsfs project tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build atsfs, make a 512 MiB volume in a temporary directory, mount it, use it,
    /// mount it again, check it with fsck, clean up. Needs root and /dev/fuse.
    Demo(demo::DemoArgs),
    /// Build release binaries and install `atsfs`, `mkfs.atsfs` and the links
    /// `mount.atsfs`, `mount.fuse.atsfs`, `fsck.atsfs` into PREFIX/sbin, man pages into
    /// PREFIX/share/man/man8, bash, zsh and fish completions under PREFIX/share. With a
    /// PREFIX other than /, links /sbin/mount.atsfs (mount(8) looks only there).
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Make the Debian package with cargo-deb (release build; installs cargo-deb when
    /// missing) and print its path.
    Package {
        /// Then install it into a scratch root and use it as a new user would: an
        /// fstab line, mount, write, umount, fsck -t atsfs, man. Needs root and
        /// /dev/fuse.
        #[arg(long)]
        check: bool,
    },
    /// Run pjdfstest (the POSIX suite) on a fresh mount; fail on any failure that
    /// docs/pjdfstest-exclusions.txt does not list. Needs root and /dev/fuse.
    Pjdfstest(pjdfstest::PjdArgs),
    /// The whole test suite, as CI runs it: cargo build, cargo test, pjdfstest.
    Test,
    /// Benchmarks (release build): the in-process cluster cost model, scaling,
    /// failover and mkfs; writes docs/perf.md.
    Bench {
        /// Fewer files (quicker, noisier).
        #[arg(long)]
        quick: bool,
        /// Also run the FUSE-level comparison with ext4, bindfs and fio (root).
        #[arg(long)]
        fuse: bool,
        /// The FUSE comparison's volume test-and-set, as `mkfs.atsfs --ats` takes it.
        /// `emulated` by default, as every run recorded in docs/perf.md so far;
        /// `auto` (Disk Paxos on the image file) measures what a user gets.
        #[arg(long, default_value = "emulated")]
        ats: String,
    },
    /// The real-iSCSI test bed: tgtd (built from Debian's source with COMPARE AND
    /// WRITE enabled) serving an image as LUN 1, and hosts in network namespaces.
    #[command(subcommand)]
    Tgt(tgt::TgtTask),
    /// The cluster inside QEMU guests (TCG) sharing the test bed's LUN through
    /// scsi-block: mkfs, mount, share, concurrent creates, EBUSY, kill -9 of a guest
    /// and its recovery. Builds the guest image from Debian packages. Root.
    Vm(vm::VmArgs),
    /// The cluster simulator: N in-process hosts over one simulated LUN, random
    /// operations from K seeds, checkers after every step (release build).
    Sim {
        #[arg(long, default_value_t = 4)]
        hosts: u32,
        #[arg(long, default_value_t = 4)]
        seeds: u64,
        #[arg(long, default_value_t = 200)]
        steps: u64,
        #[arg(long, default_value_t = 1)]
        seed_start: u64,
        /// Also inject lost replies.
        #[arg(long)]
        faults: bool,
        /// A Disk Paxos volume; every host on a plain disk without compare-and-write.
        #[arg(long)]
        paxos: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Demo(args) => demo::run(&args),
        Task::Install { prefix } => install::run(&prefix),
        Task::Package { check } => package::run(check),
        Task::Pjdfstest(args) => pjdfstest::run_task(&args),
        Task::Test => suite::run(),
        Task::Tgt(task) => tgt::run(&task),
        Task::Vm(args) => vm::run(&args),
        Task::Bench { quick, fuse, ats } => bench(quick, fuse, &ats),
        Task::Sim {
            hosts,
            seeds,
            steps,
            seed_start,
            faults,
            paxos,
        } => sh::cargo()
            .args(["run", "--quiet", "--release", "--example", "sim", "--"])
            .args([
                hosts.to_string(),
                seeds.to_string(),
                steps.to_string(),
                seed_start.to_string(),
            ])
            .arg(if faults { "1" } else { "0" })
            .arg(if paxos { "1" } else { "0" })
            .status()
            .map(|s| s.success()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fails with a clear message unless FUSE mounts can work here.
fn require_root_and_fuse(task: &str) -> anyhow::Result<()> {
    if !sh::is_root() {
        anyhow::bail!(
            "`cargo xtask {task}` mounts through FUSE and needs root; \
             run it as root, e.g. sudo \"$(command -v cargo)\" xtask {task}"
        );
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        anyhow::bail!(
            "`cargo xtask {task}` needs /dev/fuse (load the module with `modprobe fuse`; \
             in a container, pass the device in, e.g. docker run --device /dev/fuse --cap-add SYS_ADMIN)"
        );
    }
    Ok(())
}

/// Runs examples/bench.rs in release mode and records its table in docs/perf.md.
fn bench(quick: bool, fuse: bool, ats: &str) -> anyhow::Result<bool> {
    use anyhow::Context;
    let files = if quick { "2000" } else { "10000" };
    let big_dir = if quick { "100000" } else { "1000000" };
    let scratch = tempfile::Builder::new()
        .prefix("atsfs-bench-")
        .tempdir()
        .context("temp dir")?;
    // A real iSCSI LUN too, where the test bed is built (tgtd on localhost).
    let target = tgt::bench_target(&scratch.path().join("iscsi-lun.img"), 4 << 30);
    let command = format!(
        "{}cargo run --release --example bench -- DIR {files} {big_dir}",
        if target.is_some() {
            "ATSFS_BENCH_ISCSI=URL "
        } else {
            ""
        }
    );
    let mut run = sh::cargo()
        .args(["run", "--quiet", "--release", "--example", "bench", "--"])
        .arg(scratch.path())
        .arg(files)
        .arg(big_dir);
    if let Some(target) = &target {
        run = run.env("ATSFS_BENCH_ISCSI", target.url());
    }
    let out = run.output()?;
    drop(target);
    if !out.status.success() {
        anyhow::bail!(
            "the benchmark failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{table}");
    let machine = format!(
        "{} cores, kernel {}, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        sh::Cmd::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .read()
            .unwrap_or_default()
            .trim()
    );
    let flags = format!(
        "{}{}",
        if quick { " --quick" } else { "" },
        if fuse {
            format!(" --fuse --ats {ats}")
        } else {
            String::new()
        }
    );
    record(
        "bench",
        &format!("Last run: `cargo xtask bench{flags}` ({command}), {machine}.\n\n{table}"),
    )?;
    if fuse {
        let fuse_table = fusebench::run(quick, ats)?;
        print!("{fuse_table}");
        record(
            "fusebench",
            &format!("Last run: `cargo xtask bench{flags}`, {machine}.\n\n{fuse_table}"),
        )?;
    }
    let perf = sh::workspace_root()?.join("docs/perf.md");
    println!("(recorded in {})", perf.display());
    Ok(true)
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in
/// docs/perf.md (appending the block when it is missing).
fn record(name: &str, body: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let perf = sh::workspace_root()?.join("docs/perf.md");
    let text = std::fs::read_to_string(&perf).unwrap_or_default();
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let block = format!("{begin}\n{body}{end}");
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if a < b => format!("{}{}{}", &text[..a], block, &text[b + end.len()..]),
        _ => format!("{text}\n{block}\n"),
    };
    std::fs::write(&perf, updated).with_context(|| format!("writing {}", perf.display()))
}
