//! `cargo xtask package [--check]`: the Debian package, made by cargo-deb from
//! `[package.metadata.deb]` in the root Cargo.toml (installed with `cargo install
//! cargo-deb` when missing). Release build; not part of `cargo xtask test`.
//!
//! `--check` then installs the package as a new user would, into a scratch root
//! (`dpkg -x`): checks its files and Depends, makes a volume with the installed
//! mkfs.atsfs (`mkfs -t atsfs`), mounts it from a scratch fstab line (`mount -T
//! FSTAB DIR`) through the installed mount.atsfs, writes, `umount`s through the
//! installed umount.fuse.atsfs, checks that right after umount the daemon is gone and
//! no heartbeat slot is live (`atsfs status`), runs `fsck -t atsfs DEVICE` once
//! (exit 0, no "marked live" note) with the installed fsck.atsfs, renders the installed man
//! page (`man -l`, and `man atsfs` on the package's man path) and loads a bash
//! completion. Root and /dev/fuse.
//!
//! mount(8) and umount(8) run helpers from /sbin only, so the check links
//! /sbin/mount.atsfs and /sbin/umount.fuse.atsfs to the scratch root's (and removes
//! the links afterwards); it refuses to replace one that exists (an installed atsfs).

use crate::install;
use crate::sh::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What the package must hold (paths in the root).
const EXPECTED: [&str; 20] = [
    "usr/sbin/atsfs",
    "usr/sbin/mkfs.atsfs",
    "usr/sbin/mount.atsfs",
    "usr/sbin/mount.fuse.atsfs",
    "usr/sbin/umount.fuse.atsfs",
    "usr/sbin/fsck.atsfs",
    "usr/share/man/man8/atsfs.8.gz",
    "usr/share/man/man8/atsfs-mount.8.gz",
    "usr/share/man/man8/atsfs-umount.8.gz",
    "usr/share/man/man8/umount.fuse.atsfs.8.gz",
    "usr/share/man/man8/atsfs-fsck.8.gz",
    "usr/share/man/man8/mkfs.atsfs.8.gz",
    "usr/share/man/man8/mount.atsfs.8.gz",
    "usr/share/man/man8/fsck.atsfs.8.gz",
    "usr/share/bash-completion/completions/atsfs",
    "usr/share/zsh/vendor-completions/_atsfs",
    "usr/share/fish/vendor_completions.d/atsfs.fish",
    "usr/share/doc/atsfs/examples/fstab",
    "usr/share/doc/atsfs/examples/mnt-shared.mount",
    "usr/share/doc/atsfs/operations.md",
];

pub fn run(check: bool) -> Result<bool> {
    ensure_cargo_deb()?;
    sh::heading("Building atsfs and mkfs-atsfs (release)");
    let bin = install::build_release()?;
    sh::heading("Generating man pages and shell completions");
    let docs = install::generate_docs(&bin)?;
    // Debian compresses man pages; cargo-deb leaves files under target/release alone.
    Cmd::new("sh")
        .arg("-c")
        .arg("gzip -9nf \"$0\"/man8/*.8")
        .arg(&docs)
        .run()?;
    sh::heading("Making the Debian package (cargo deb)");
    // --strip: the release profile keeps line tables (debug = 1) for backtraces in
    // target/; the package does without (about 60 MB less).
    let out = sh::cargo()
        .args(["deb", "-p", "atsfs", "--no-build", "--strip"])
        .current_dir(&sh::workspace_root()?)
        .read()?;
    let deb = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb printed no .deb path")?;
    println!("package: {}", deb.display());
    if check {
        check_package(&deb)?;
        println!("\npackage check passed: {}", deb.display());
    }
    Ok(true)
}

/// Installs cargo-deb with `cargo install` when `cargo deb` does not run.
fn ensure_cargo_deb() -> Result<()> {
    let present = sh::cargo()
        .args(["deb", "--version"])
        .quiet()
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    sh::heading("Installing cargo-deb (cargo install, a few minutes)");
    sh::cargo()
        .args(["install", "--locked", "cargo-deb"])
        .run()
        .context("installing cargo-deb")
}

/// Installs man-db and groff-base when `man` is missing, so that the pages render.
fn ensure_man() -> Result<()> {
    if sh::which("man").is_some() && sh::which("groff").is_some() {
        return Ok(());
    }
    crate::tgt::apt_install(&["man-db", "groff-base"])
}

/// Undoes what the check set up: the scratch mount and the /sbin links.
struct Cleanup {
    mountpoint: Option<PathBuf>,
    links: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = &self.mountpoint {
            if is_mounted(dir) {
                let _ = Cmd::new("umount").arg("-l").arg(dir).quiet().status();
            }
        }
        for link in &self.links {
            let _ = std::fs::remove_file(link);
        }
    }
}

fn check_package(deb: &Path) -> Result<()> {
    crate::require_root_and_fuse("package --check")?;
    ensure_man()?;
    sh::heading("Checking the package in a scratch root");
    let scratch = tempfile::Builder::new()
        .prefix("atsfs-package-")
        .tempdir()
        .context("making a scratch directory")?;
    let root = scratch.path().join("root");
    Cmd::new("dpkg").arg("-x").arg(deb).arg(&root).run()?;
    let depends = Cmd::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg("Depends")
        .read()?;
    if !depends.split(',').any(|d| d.trim().starts_with("fuse3")) {
        bail!(
            "the package does not depend on fuse3 (Depends: {})",
            depends.trim()
        );
    }
    for file in EXPECTED {
        let path = root.join(file);
        if std::fs::symlink_metadata(&path).is_err() {
            bail!("the package lacks /{file}");
        }
    }
    let sbin = root.join("usr/sbin");
    for link in install::HELPER_LINKS {
        let target = std::fs::read_link(sbin.join(link))
            .with_context(|| format!("/usr/sbin/{link} is not a link"))?;
        if target != Path::new("atsfs") {
            bail!("/usr/sbin/{link} points to {}", target.display());
        }
    }
    println!("files and Depends ({}) as expected", depends.trim());

    // The man page, as `man -l` and as `man atsfs` finds it on the package's path.
    let page = Cmd::new("man")
        .arg("-l")
        .arg(root.join("usr/share/man/man8/atsfs.8.gz"))
        .env("MANWIDTH", "80")
        .read()?;
    if !page.contains("SYNOPSIS") || !page.contains("atsfs-mount(8)") {
        bail!("man -l atsfs.8.gz did not render the page:\n{page}");
    }
    let page = Cmd::new("man")
        .arg("-M")
        .arg(root.join("usr/share/man"))
        .arg("fsck.atsfs")
        .env("MANWIDTH", "80")
        .read()?;
    if !page.contains("Preen") {
        bail!("man fsck.atsfs did not render the page:\n{page}");
    }
    let completion = root.join("usr/share/bash-completion/completions/atsfs");
    Cmd::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p atsfs",
            sh::quote(completion.as_os_str())
        ))
        .run()
        .context("the bash completion does not load")?;

    // A volume, an fstab line, mount DIR, a write, umount, fsck -t atsfs.
    let mut cleanup = Cleanup {
        mountpoint: None,
        links: Vec::new(),
    };
    let path = format!(
        "{}:{}",
        sbin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let image = scratch.path().join("shared.img");
    Cmd::new("mkfs")
        .args(["-t", "atsfs", "--size", "256M"])
        .arg(&image)
        .env("PATH", &path)
        .run()?;
    let dir = scratch.path().join("shared");
    std::fs::create_dir(&dir)?;
    let log = scratch.path().join("atsfs.log");
    let fstab = scratch.path().join("fstab");
    let line = format!(
        "{}  {}  atsfs  _netdev,nofail,host_id={},log={}  0  2\n",
        image.display(),
        dir.display(),
        new_uuid()?,
        log.display()
    );
    std::fs::write(&fstab, &line)?;
    println!("scratch fstab: {}", line.trim());
    for name in ["mount.atsfs", "umount.fuse.atsfs"] {
        let link = Path::new("/sbin").join(name);
        if std::fs::symlink_metadata(&link).is_ok() {
            bail!(
                "{} exists (an installed atsfs?); the check needs it for the package's own helper",
                link.display()
            );
        }
        Cmd::new("ln")
            .arg("-s")
            .arg(sbin.join(name))
            .arg(&link)
            .run()?;
        cleanup.links.push(link);
    }
    Cmd::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&dir)
        .run()
        .with_context(|| format!("mount from the fstab line; log:\n{}", read(&log)))?;
    cleanup.mountpoint = Some(dir.clone());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let entry = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == dir.to_str())
        .context("the mount is not in /proc/self/mountinfo")?;
    if !entry.contains(&format!(" - fuse.atsfs {} ", image.display())) {
        bail!("the mount is not type fuse.atsfs with the image as source: {entry}");
    }
    std::fs::write(dir.join("hello"), "from the package\n")?;
    if std::fs::read_to_string(dir.join("hello"))? != "from the package\n" {
        bail!("the file written does not read back");
    }
    let daemon = daemon_of(&dir);
    // Through umount.fuse.atsfs: umount returns once the daemon has written back,
    // released its slot and exited. Nothing is waited for after it.
    Cmd::new("umount").arg(&dir).run()?;
    cleanup.mountpoint = None;
    if let Some(pid) = daemon.filter(|&pid| alive(pid)) {
        bail!("the atsfs daemon (pid {pid}) still runs after umount returned");
    }
    let status = Cmd::new(sbin.join("atsfs"))
        .args(["status", "--json", "--watch-ms", "0"])
        .arg(&image)
        .read()?;
    let status: serde_json::Value =
        serde_json::from_str(&status).context("atsfs status --json is not JSON")?;
    let busy: Vec<String> = status["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["state"] != "free")
        .map(|s| format!("slot {} {}", s["slot"], s["state"]))
        .collect();
    if !busy.is_empty() {
        bail!("right after umount the volume has slots not free: {busy:?}");
    }
    let out = Cmd::new("fsck")
        .args(["-T", "-t", "atsfs"])
        .arg(&image)
        .env("PATH", &path)
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout);
    if out.status.code() != Some(0) || said.contains("marked live") {
        bail!(
            "fsck -t atsfs right after umount exited {:?}:\n{said}",
            out.status.code()
        );
    }
    println!("umount waited for the daemon: no live slot, fsck clean right after it");
    drop(cleanup);
    Ok(())
}

/// The pid of the `atsfs mount` daemon whose last argument is `dir`.
fn daemon_of(dir: &Path) -> Option<u32> {
    let want = dir.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            (args.get(1) == Some(&&b"mount"[..]) && args.last() == Some(&want)).then_some(pid)
        })
}

/// True while `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// True when `dir` is a mount point in /proc/self/mountinfo.
fn is_mounted(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|text| text.lines().any(|l| l.split(' ').nth(4) == dir.to_str()))
}

fn new_uuid() -> Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading a random UUID")?
        .trim()
        .to_string())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
}
