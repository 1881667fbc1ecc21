//! `cargo xtask install [--prefix /usr/local]`: release binaries into PREFIX/sbin.
//!
//! cargo cannot name a binary `mkfs.atsfs` (no dots in binary names), so the mkfs
//! crate builds `mkfs-atsfs` and this installs it under the name `mkfs(8)` looks for.

use crate::sh::{self, Cmd};
use anyhow::Result;
use std::path::Path;

/// Builds both binaries in release mode; returns the directory they are in.
pub fn build_release() -> Result<std::path::PathBuf> {
    sh::cargo()
        .args(["build", "--release", "-p", "atsfs", "-p", "mkfs-atsfs"])
        .current_dir(&sh::workspace_root()?)
        .run()?;
    Ok(sh::target_dir()?.join("release"))
}

pub fn run(prefix: &Path) -> Result<bool> {
    sh::heading("Building atsfs and mkfs-atsfs (release)");
    let bin = build_release()?;
    let sbin = prefix.join("sbin");
    sh::heading(&format!("Installing into {}", sbin.display()));
    // `install` replaces the target by a new file, so a running daemon keeps its
    // binary and no "text file busy" error stops an upgrade.
    for (built, installed) in [("atsfs", "atsfs"), ("mkfs-atsfs", "mkfs.atsfs")] {
        Cmd::new("install")
            .args(["-D", "-m", "0755"])
            .arg(bin.join(built))
            .arg(sbin.join(installed))
            .run()?;
    }
    println!(
        "\ninstalled {0}/atsfs and {0}/mkfs.atsfs; try: mkfs.atsfs --help, atsfs --help",
        sbin.display()
    );
    Ok(true)
}
