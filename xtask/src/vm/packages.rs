//! What the guests are made of, from Debian's packages: QEMU 10 with its iSCSI block
//! driver, busybox-static, and the kernel package (downloaded and unpacked, never
//! installed on this machine).
//!
//! On bookworm, QEMU comes from bookworm-backports: plain bookworm's QEMU 7.2 would
//! replace the qemu-utils 10 that machines of this kind come with. A sources entry for
//! backports is written when apt knows none.

use crate::sh::{self, Cmd};
use crate::tgt::apt_install;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// QEMU's iSCSI block driver, a module of package qemu-block-extra.
const QEMU_ISCSI_MODULE: &str = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so";
/// Where busybox-static puts its one binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// Written when apt knows no bookworm-backports.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/atsfs-backports.sources";

/// Installs QEMU (with the iSCSI driver) and busybox-static when missing.
pub fn ensure_installed() -> Result<()> {
    let qemu_ok =
        sh::which("qemu-system-x86_64").is_some() && Path::new(QEMU_ISCSI_MODULE).exists();
    if !qemu_ok {
        install_qemu()?;
    }
    if !busybox_is_static() {
        apt_install(&["busybox-static"])?;
    }
    if !busybox_is_static() {
        bail!("{BUSYBOX} is not a static binary even after installing busybox-static");
    }
    let version = Cmd::new("qemu-system-x86_64")
        .arg("--version")
        .quiet()
        .read()?;
    println!("vm: {}", version.lines().next().unwrap_or("qemu"));
    Ok(())
}

fn busybox_is_static() -> bool {
    std::fs::read(BUSYBOX).is_ok_and(|elf| super::initramfs::is_static_elf(&elf))
}

fn install_qemu() -> Result<()> {
    let packages = ["qemu-system-x86", "qemu-block-extra"];
    if sh::os_release("VERSION_CODENAME").as_deref() != Some("bookworm") {
        return apt_install(&packages);
    }
    if !knows_backports() {
        println!("vm: apt knows no bookworm-backports; writing {BACKPORTS_SOURCES}");
        std::fs::write(
            BACKPORTS_SOURCES,
            "# Added by `cargo xtask vm`: QEMU 10 (qemu-system-x86) from bookworm-backports.\n\
             Types: deb\n\
             URIs: http://deb.debian.org/debian\n\
             Suites: bookworm-backports\n\
             Components: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
        Cmd::new("apt-get").args(["update", "-q"]).run()?;
    }
    Cmd::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(["-t", "bookworm-backports"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .context("installing QEMU from bookworm-backports")
}

fn knows_backports() -> bool {
    sh::apt_cache_says(&["policy", "qemu-system-x86"], "bookworm-backports")
}

/// An unpacked kernel package: its vmlinuz and its modules directory.
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// Downloads the kernel package that `linux-image-amd64` names into `dir` and
/// unpacks it into `dir`/root (a fresh download each run: about 70 MB).
pub fn kernel(dir: &Path) -> Result<Kernel> {
    let package = kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .context("odd kernel package name")?
        .to_string();
    Cmd::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(dir)
        .run()
        .context("downloading the kernel package")?;
    let deb = find_deb(dir, &package).context("apt-get download left no .deb")?;
    let root = dir.join("root");
    Cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).run()?;
    std::fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    let kernel = Kernel {
        vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
        modules: root.join(format!("lib/modules/{release}")),
        release,
    };
    if !kernel.vmlinuz.is_file() || !kernel.modules.join("modules.order").is_file() {
        bail!("{package} holds no vmlinuz or modules.order");
    }
    Ok(kernel)
}

/// The versioned package `linux-image-amd64` depends on, e.g. linux-image-6.1.0-57-amd64.
fn kernel_package() -> Result<String> {
    let text = Cmd::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .read()?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .context("apt-cache names no linux-image-*-amd64 for linux-image-amd64: run apt-get update")
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}
