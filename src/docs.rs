//! `atsfs __generate-docs OUT` (internal): the man pages and shell completions of atsfs,
//! mkfs.atsfs, mount.atsfs, fsck.atsfs and umount.fuse.atsfs, generated from the clap
//! definitions each program parses its arguments with, so that they cannot drift
//! apart.
//!
//! OUT/man8/NAME.8 (one page per program, and one per `atsfs` subcommand:
//! atsfs-mount.8, ...), OUT/completions/bash/NAME, OUT/completions/zsh/_NAME,
//! OUT/completions/fish/NAME.fish. `cargo xtask install` and `cargo xtask package`
//! run it and put the files where man(1) and the shells look.

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::Path;

// mkfs.atsfs is another crate's binary; its definition is a file of its own that
// both include.
#[allow(dead_code)]
#[path = "../mkfs/src/cli.rs"]
mod mkfs_cli;

/// The internal command's name (not a clap subcommand: clap_complete offers hidden
/// subcommands too).
pub(crate) const GENERATE: &str = "__generate-docs";

/// The programs, as their clap commands.
pub(crate) fn commands() -> Vec<clap::Command> {
    vec![
        crate::Cli::command(),
        mkfs_cli::Args::command(),
        crate::helpers::MountHelper::command(),
        crate::helpers::FsckHelper::command(),
        crate::umount::UmountHelper::command(),
    ]
}

pub(crate) fn generate(out: &Path) -> Result<()> {
    let man_dir = out.join("man8");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let mut pages = 0;
    for command in commands() {
        pages += write_man_pages(command, &man_dir)?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let dir = out.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for mut command in commands() {
            let name = command.get_name().to_string();
            let file = dir.join(completion_file(shell, &name));
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut command, &name, &mut text);
            std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        }
    }
    println!(
        "wrote {pages} man pages to {} and bash, zsh and fish completions to {}",
        man_dir.display(),
        out.join("completions").display()
    );
    Ok(())
}

/// Where each shell looks for a command's completion: bash-completion loads
/// `completions/NAME`, zsh `_NAME` from its fpath, fish `NAME.fish`.
fn completion_file(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_string(),
    }
}

/// Writes the page of `command` and of each visible subcommand (`atsfs-mount.8`);
/// returns how many.
fn write_man_pages(command: clap::Command, dir: &Path) -> Result<usize> {
    let mut command = command.disable_help_subcommand(true);
    command.build();
    write_page(&command, dir)
}

fn write_page(command: &clap::Command, dir: &Path) -> Result<usize> {
    let mut written = 0;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        written += write_page(sub, dir)?;
    }
    let man = clap_mangen::Man::new(command.clone())
        .section("8")
        .manual("System Administration")
        .source(format!("atsfs {}", env!("CARGO_PKG_VERSION")));
    let path = dir.join(man.get_filename());
    let mut text = Vec::new();
    man.render(&mut text)
        .with_context(|| format!("rendering {}", path.display()))?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(written + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_gets_its_pages_and_completions() {
        let out = tempfile::tempdir().unwrap();
        generate(out.path()).unwrap();
        let man = |name: &str| std::fs::read_to_string(out.path().join("man8").join(name));
        for (page, says) in [
            ("atsfs.8", "fsck"),
            ("atsfs-mount.8", "foreground"),
            ("atsfs-fsck.8", "repair"),
            ("mkfs.atsfs.8", "max\\-hosts"),
            ("mount.atsfs.8", "_netdev"),
            ("fsck.atsfs.8", "Preen"),
            ("umount.fuse.atsfs.8", "lease"),
            ("atsfs-umount.8", "lazy"),
        ] {
            let text = man(page).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(
                text.starts_with(".ie") || text.contains(".TH"),
                "{page}: {text}"
            );
            assert!(
                text.contains(says),
                "{page} does not mention {says}:\n{text}"
            );
        }
        // Hidden commands get no page.
        assert!(man("atsfs-generate-docs.8").is_err());
        for file in [
            "bash/atsfs",
            "bash/mount.atsfs",
            "zsh/_fsck.atsfs",
            "fish/mkfs.atsfs.fish",
        ] {
            let text = std::fs::read_to_string(out.path().join("completions").join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(text.contains("atsfs"), "{file}: {text}");
        }
        let bash = std::fs::read_to_string(out.path().join("completions/bash/atsfs")).unwrap();
        assert!(bash.contains("ats-selftest") && !bash.contains("generate"));
    }
}
