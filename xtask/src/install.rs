//! `cargo xtask install [--prefix /usr/local]`: release binaries into PREFIX/sbin,
//! man pages into PREFIX/share/man/man8, shell completions where bash, zsh and fish
//! look.
//!
//! cargo cannot name a binary `mkfs.atsfs` (no dots in binary names), so the mkfs
//! crate builds `mkfs-atsfs` and this installs it under the name `mkfs(8)` looks for.
//! `mount.atsfs`, `mount.fuse.atsfs`, `umount.fuse.atsfs` and `fsck.atsfs` are links
//! to `atsfs`, which acts as mount(8)'s and umount(8)'s helper and fsck(8)'s checker
//! under those names.

use crate::sh::{self, Cmd};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The names `atsfs` is installed under besides its own (links to it).
pub const HELPER_LINKS: [&str; 4] = [
    "mount.atsfs",
    "mount.fuse.atsfs",
    "umount.fuse.atsfs",
    "fsck.atsfs",
];

/// The helpers mount(8) and umount(8) run, from /sbin only.
pub const SBIN_HELPERS: [&str; 3] = ["mount.atsfs", "mount.fuse.atsfs", "umount.fuse.atsfs"];

/// Where mount(8) and umount(8) look for helpers (util-linux's FS_SEARCH_PATH);
/// fsck(8) and mkfs(8) search PATH as well.
const MOUNT_HELPER_DIR: &str = "/sbin";

/// Builds both binaries in release mode; returns the directory they are in.
pub fn build_release() -> Result<PathBuf> {
    sh::cargo()
        .args(["build", "--release", "-p", "atsfs", "-p", "mkfs-atsfs"])
        .current_dir(&sh::workspace_root()?)
        .run()?;
    Ok(sh::target_dir()?.join("release"))
}

/// Generates the man pages and completions with the built `atsfs` (from the clap
/// definitions of all four programs) into BIN/atsfs-docs; returns that directory.
pub fn generate_docs(bin: &Path) -> Result<PathBuf> {
    let out = bin.join("atsfs-docs");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    Cmd::new(bin.join("atsfs"))
        .arg("__generate-docs")
        .arg(&out)
        .run()?;
    Ok(out)
}

/// The generated files: (file, directory under PREFIX it goes to).
pub fn doc_files(docs: &Path, prefix: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    // Debian's zsh reads vendor-completions under /usr; zsh's own default fpath has
    // site-functions under /usr/local (and other prefixes).
    let zsh = if prefix == Path::new("/usr") {
        "share/zsh/vendor-completions"
    } else {
        "share/zsh/site-functions"
    };
    let mut files = Vec::new();
    for (from, to) in [
        ("man8", "share/man/man8"),
        ("completions/bash", "share/bash-completion/completions"),
        ("completions/zsh", zsh),
        ("completions/fish", "share/fish/vendor_completions.d"),
    ] {
        let dir = docs.join(from);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        files.extend(names.into_iter().map(|f| (f, prefix.join(to))));
    }
    Ok(files)
}

pub fn run(prefix: &Path) -> Result<bool> {
    sh::heading("Building atsfs and mkfs-atsfs (release)");
    let bin = build_release()?;
    sh::heading("Generating man pages and shell completions");
    let docs = generate_docs(&bin)?;
    let sbin = prefix.join("sbin");
    sh::heading(&format!("Installing into {}", prefix.display()));
    // `install` replaces the target by a new file, so a running daemon keeps its
    // binary and no "text file busy" error stops an upgrade.
    for (built, installed) in [("atsfs", "atsfs"), ("mkfs-atsfs", "mkfs.atsfs")] {
        Cmd::new("install")
            .args(["-D", "-m", "0755"])
            .arg(bin.join(built))
            .arg(sbin.join(installed))
            .run()?;
    }
    for link in HELPER_LINKS {
        Cmd::new("ln")
            .args(["-sfn", "atsfs"])
            .arg(sbin.join(link))
            .run()?;
    }
    for (file, dir) in doc_files(&docs, prefix)? {
        Cmd::new("install")
            .args(["-D", "-m", "0644", "-t"])
            .arg(&dir)
            .arg(&file)
            .quiet()
            .run()?;
    }
    println!(
        "installed man pages into {} and completions into {}/share/{{bash-completion,zsh,fish}}",
        prefix.join("share/man/man8").display(),
        prefix.display()
    );
    link_mount_helpers(&sbin)?;
    println!(
        "\ninstalled {0}/atsfs, {0}/mkfs.atsfs and {0}/{{mount,mount.fuse,umount.fuse,fsck}}.atsfs; \
         try: man atsfs, mkfs.atsfs --help, mount -t atsfs DEVICE DIR",
        sbin.display()
    );
    Ok(true)
}

/// mount(8) and umount(8) run helpers from /sbin only: with another prefix, links
/// /sbin/mount.atsfs, /sbin/mount.fuse.atsfs and /sbin/umount.fuse.atsfs to the
/// installed `atsfs` (never replacing a file that is not a link).
fn link_mount_helpers(sbin: &Path) -> Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if canonical(sbin) == canonical(Path::new(MOUNT_HELPER_DIR)) {
        return Ok(());
    }
    for name in SBIN_HELPERS {
        let link = Path::new(MOUNT_HELPER_DIR).join(name);
        let is_file = std::fs::symlink_metadata(&link).is_ok_and(|m| !m.file_type().is_symlink());
        if is_file {
            println!(
                "note: {} exists and is not a link; left alone (mount(8) or umount(8) runs it)",
                link.display()
            );
            continue;
        }
        Cmd::new("ln")
            .arg("-sfn")
            .arg(sbin.join("atsfs"))
            .arg(&link)
            .run()
            .with_context(|| {
                format!(
                    "mount(8) and umount(8) look for helpers in {MOUNT_HELPER_DIR} only; link {} there by \
                     hand (as root)",
                    name
                )
            })?;
    }
    Ok(())
}
