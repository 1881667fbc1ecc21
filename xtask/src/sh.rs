//! Running programs the way a person at a shell would, and saying so.
//!
//! Every command goes through `Cmd`, which prints it as `$ program args...` (quoted
//! so that it can be pasted into a shell) before it runs. Failures carry the command
//! line in their error.

use anyhow::{bail, Context, Result};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

/// A command to run, printed before it runs.
pub struct Cmd {
    command: Command,
    shown: String,
    quiet: bool,
}

impl Cmd {
    /// `program` is looked up in `PATH` unless it is a path.
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        let program = program.as_ref();
        Cmd {
            command: Command::new(program),
            shown: quote(program),
            quiet: false,
        }
    }

    /// `sh -c SCRIPT`, shown as the script itself (it is what a reader types).
    pub fn shell(script: &str) -> Cmd {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        Cmd {
            command,
            shown: script.to_string(),
            quiet: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        let arg = arg.as_ref();
        self.shown.push(' ');
        self.shown.push_str(&quote(arg));
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }

    /// Sets an environment variable of the child (not shown).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Cmd {
        self.command.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Cmd {
        self.command.current_dir(dir);
        self
    }

    /// Do not print the command line (for bookkeeping commands a reader would not
    /// type, such as the cleanup of a failed run).
    pub fn quiet(mut self) -> Cmd {
        self.quiet = true;
        self
    }

    fn announce(&self) {
        if !self.quiet {
            println!("$ {}", self.shown);
        }
    }

    /// Runs with inherited stdio; returns the exit status whatever it is.
    pub fn status(mut self) -> Result<ExitStatus> {
        self.announce();
        self.command
            .status()
            .with_context(|| format!("could not start `{}`", self.shown))
    }

    /// Runs with inherited stdio; fails unless it exits 0.
    pub fn run(self) -> Result<()> {
        let shown = self.shown.clone();
        let status = self.status()?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    /// Runs, capturing stdout and stderr; returns the output whatever the status.
    pub fn output(mut self) -> Result<Output> {
        self.announce();
        self.command
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `{}`", self.shown))
    }

    /// Runs, capturing stdout (stderr goes to the terminal); fails unless it exits 0.
    pub fn read(mut self) -> Result<String> {
        self.announce();
        let out = self
            .command
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start `{}`", self.shown))?;
        if !out.status.success() {
            bail!("`{}` failed ({})", self.shown, out.status);
        }
        String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", self.shown))
    }

    /// The underlying command, for callers that stream its output themselves.
    pub fn into_command(self) -> Command {
        self.announce();
        self.command
    }
}

/// Quotes one word for a POSIX shell, only when it needs it.
pub fn quote(word: &OsStr) -> String {
    let text = word.to_string_lossy();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The `cargo` that runs us (cargo sets `CARGO` for `cargo run`), or `cargo`.
pub fn cargo() -> Cmd {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Cmd::new(&program);
    // Show the plain name: it is what a reader types.
    cmd.shown = "cargo".into();
    cmd
}

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .context("xtask's directory has no parent")?;
    Ok(root.to_path_buf())
}

/// Cargo's target directory of this workspace (honours `CARGO_TARGET_DIR` and
/// cargo's configuration, because cargo itself answers).
pub fn target_dir() -> Result<PathBuf> {
    let root = workspace_root()?;
    let text = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(&root)
        .quiet()
        .read()
        .context("asking cargo for the target directory")?;
    let metadata: serde_json::Value =
        serde_json::from_str(&text).context("parsing `cargo metadata`")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` names no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// The full path of `program` in `PATH`, if it is there.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// True when this process runs as root.
/// A field of /etc/os-release (`key` without the `=`), unquoted.
pub fn os_release(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    let prefix = format!("{key}=");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"').to_string())
}

/// Whether `apt-cache ARGS` runs and its output contains `needle`.
pub fn apt_cache_says(args: &[&str], needle: &str) -> bool {
    Cmd::new("apt-cache")
        .args(args)
        .quiet()
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(needle))
}

pub fn is_root() -> bool {
    // /proc/self/status names the effective uid second on its "Uid:" line; reading it
    // spares a libc dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Prints a section heading, so that a long log reads as steps.
pub fn heading(text: &str) {
    println!("\n==> {text}");
}
