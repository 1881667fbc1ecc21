//! `cargo xtask vm [--vms N] [--keep]`: the cluster inside real guests. Each guest is
//! its own Linux kernel (Debian's, under QEMU's TCG) with its own page cache, so this
//! catches what hosts on one kernel cannot: a stale cache of the shared disk, a
//! missing O_DIRECT, a backend that only works on the host.
//!
//! Stages, each timed:
//! 1. packages (`packages`): QEMU 10 with its iSCSI driver, busybox-static;
//! 2. the tgt test bed's build (`cargo xtask tgt build`);
//! 3. `atsfs` and `mkfs.atsfs`, statically linked (`initramfs::build_static`);
//! 4. the guest image, from the kernel package and the above (`initramfs`);
//! 5. per variant (`scenario::variants`): tgt serving a fresh LUN, N guests booted
//!    (`guest`), the scenario's steps (`scenario`).
//!
//! Nothing of the image is kept unless `--keep`; the host namespaces stay up (the
//! iSCSI tests leave them up too).

mod guest;
mod initramfs;
mod packages;
mod scenario;

use crate::sh;
use crate::testbed::{self, TargetSpec};
use anyhow::{bail, Context, Result};
use guest::{Disk, GuestImage};
use scenario::{Attachment, Variant};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Instant;

/// Most guests: each is a TCG QEMU on this machine's cores.
const VMS_MAX: u32 = 8;
/// The shared disk (sparse).
const DISK_BYTES: u64 = 512 << 20;

#[derive(clap::Args)]
pub struct VmArgs {
    /// Guests sharing the disk (2..=8).
    #[arg(long, default_value_t = 2)]
    vms: u32,
    /// Keep the work directory (kernel, initramfs, disk image, consoles) at the end.
    #[arg(long)]
    keep: bool,
}

/// Wall-clock seconds of each stage, for the closing table.
#[derive(Default)]
struct Stages {
    rows: Vec<(String, f64)>,
}

impl Stages {
    fn time<T>(&mut self, name: &str, stage: impl FnOnce() -> Result<T>) -> Result<T> {
        sh::heading(name);
        let began = Instant::now();
        let result = stage();
        self.rows
            .push((name.to_string(), began.elapsed().as_secs_f64()));
        result
    }
}

/// How one variant ended, for the summary line.
enum Outcome {
    Passed { steps: usize },
    Failed { failed: String, passed: usize },
    NotRun(String),
}

/// Prints each step of a variant's run: name, verdict, seconds, what it found.
fn print_steps(name: &str, steps: &[scenario::StepOutcome]) {
    sh::heading(&format!("{name}: steps"));
    for step in steps {
        println!(
            "{:<9} {:<6} {:>6.1} s  {}",
            step.name,
            if step.passed { "ok" } else { "FAILED" },
            step.seconds,
            step.said
        );
    }
}

pub fn run(args: &VmArgs) -> Result<bool> {
    if !sh::is_root() {
        bail!(
            "`cargo xtask vm` needs root (apt-get, tgtd, network namespaces); run it as root, \
             e.g. sudo \"$(command -v cargo)\" xtask vm"
        );
    }
    if !(2..=VMS_MAX).contains(&args.vms) {
        bail!("--vms must be 2..={VMS_MAX}, not {}", args.vms);
    }
    let began = Instant::now();
    let mut stages = Stages::default();
    stages.time(
        "packages: QEMU, busybox-static (apt)",
        packages::ensure_installed,
    )?;
    let tgt = stages.time("the tgt test bed (cargo xtask tgt build)", || {
        crate::tgt::build(false)
    })?;
    let binaries = stages.time(
        "atsfs and mkfs.atsfs, statically linked (release)",
        initramfs::build_static,
    )?;
    let vm_dir = sh::target_dir()?.join("vm");
    std::fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&vm_dir)
        .context("making the work directory")?;
    let image = stages.time("the guest image: kernel package, initramfs", || {
        build_image(work.path(), &binaries)
    })?;
    let mut outcomes = Vec::new();
    for variant in scenario::variants() {
        let outcome = match missing(&variant, &binaries) {
            Some(reason) => {
                println!("\n{}: not run: {reason}", variant.name);
                Outcome::NotRun(reason)
            }
            None => run_variant(&variant, &image, &tgt, args.vms, work.path(), &mut stages)?,
        };
        outcomes.push((variant.name, outcome));
    }
    let passed = summary(&stages, &outcomes, began);
    if args.keep {
        let kept = work.keep();
        println!("(kept {})", kept.display());
    }
    Ok(passed)
}

/// Why `variant` cannot run on this branch, if it cannot.
fn missing(variant: &Variant, binaries: &Path) -> Option<String> {
    if variant.ats != "paxos" {
        return None;
    }
    let help = sh::Cmd::new(binaries.join("mkfs-atsfs"))
        .arg("--help")
        .quiet()
        .read()
        .unwrap_or_default();
    (!help.contains("paxos")).then(|| "Disk Paxos (issue 14) is not on this branch".to_string())
}

/// Builds vmlinux and the initramfs in `work`.
fn build_image(work: &Path, binaries: &Path) -> Result<GuestImage> {
    let kernel_dir = work.join("kernel");
    std::fs::create_dir_all(&kernel_dir)?;
    let kernel = packages::kernel(&kernel_dir)?;
    println!("vm: kernel {}", kernel.release);
    let image = GuestImage {
        vmlinux: work.join("vmlinux"),
        initramfs: work.join("initramfs.cpio.gz"),
    };
    initramfs::extract_vmlinux(&kernel.vmlinuz, &image.vmlinux)?;
    let modules = initramfs::module_closure(&kernel.modules, &initramfs::MODULES)?;
    let names: Vec<_> = modules
        .iter()
        .filter_map(|m| m.file_stem()?.to_str())
        .collect();
    println!("vm: modules, in load order: {}", names.join(" "));
    let contents = initramfs::Contents {
        busybox: Path::new(packages::BUSYBOX),
        modules: &modules,
        binaries,
    };
    initramfs::build(&contents, &image.initramfs)?;
    std::fs::remove_dir_all(&kernel_dir).ok();
    for file in [&image.vmlinux, &image.initramfs] {
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        println!(
            "vm: {} ({:.1} MiB)",
            file.display(),
            bytes as f64 / f64::from(1 << 20)
        );
    }
    Ok(image)
}

/// The disk for `variant` (for iSCSI, a tgtd serving a fresh LUN: the returned
/// target stops it on drop), then the guests and the steps.
fn run_variant(
    variant: &Variant,
    image: &GuestImage,
    tgt: &testbed::TgtBinaries,
    vms: u32,
    work: &Path,
    stages: &mut Stages,
) -> Result<Outcome> {
    let disk_image = work.join(format!("{}.img", variant.name));
    std::fs::File::create(&disk_image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .with_context(|| format!("making {}", disk_image.display()))?;
    let mut target = None;
    let disk = match variant.attachment {
        Attachment::IscsiPassthrough => {
            let spec = TargetSpec {
                image: disk_image.clone(),
                portal: SocketAddrV4::new(
                    Ipv4Addr::UNSPECIFIED,
                    testbed::free_port().map_err(anyhow::Error::msg)?,
                ),
                threads: 1,
                run_dir: work.join(format!("{}.tgt", variant.name)),
                allowed: testbed::allowed_default(),
            };
            testbed::netns_up(vms, true).map_err(anyhow::Error::msg)?;
            let started = testbed::Target::start(tgt, &spec, true).map_err(anyhow::Error::msg)?;
            let url = started.url_for_hosts();
            target = Some(started);
            Disk::IscsiPassthrough { url }
        }
        Attachment::SharedVirtio => {
            testbed::netns_up(vms, true).map_err(anyhow::Error::msg)?;
            Disk::SharedVirtio { image: disk_image }
        }
    };
    let began = Instant::now();
    let run = scenario::run(variant, image, &disk, vms, work);
    let seconds = began.elapsed().as_secs_f64();
    drop(target);
    let run = match run {
        Ok(run) => run,
        Err(e) => {
            println!("{}: the guests did not boot: {e:#}", variant.name);
            return Ok(Outcome::Failed {
                failed: "boot".into(),
                passed: 0,
            });
        }
    };
    stages.rows.push((
        format!("{}: boot {vms} guests", variant.name),
        run.boot_seconds,
    ));
    stages.rows.push((
        format!("{}: scenario", variant.name),
        seconds - run.boot_seconds,
    ));
    print_steps(variant.name, &run.steps);
    let passed = run.steps.iter().filter(|s| s.passed).count();
    Ok(match run.steps.iter().find(|s| !s.passed) {
        None if passed == scenario::STEP_COUNT => Outcome::Passed { steps: passed },
        None => Outcome::Failed {
            failed: "incomplete".into(),
            passed,
        },
        Some(step) => Outcome::Failed {
            failed: step.name.to_string(),
            passed,
        },
    })
}

/// Prints the steps' and stages' tables and the summary line; true when every
/// variant that ran passed.
fn summary(stages: &Stages, outcomes: &[(&str, Outcome)], began: Instant) -> bool {
    sh::heading("Summary");
    println!("{:<56} {:>9}", "stage", "seconds");
    for (name, seconds) in &stages.rows {
        println!("{name:<56} {seconds:>9.1}");
    }
    let mut parts = Vec::new();
    let mut passed = true;
    for (name, outcome) in outcomes {
        parts.push(match outcome {
            Outcome::Passed { steps } => {
                format!("{name}: {steps}/{} steps passed", scenario::STEP_COUNT)
            }
            Outcome::Failed { failed, passed: ok } => {
                passed = false;
                format!(
                    "{name}: FAILED at {failed} ({ok}/{} steps passed)",
                    scenario::STEP_COUNT
                )
            }
            Outcome::NotRun(reason) => format!("{name}: not run: {reason}"),
        });
    }
    println!(
        "\nxtask vm: {} ({}) in {:.0} s",
        if passed { "PASSED" } else { "FAILED" },
        parts.join("; "),
        began.elapsed().as_secs_f64()
    );
    passed
}
