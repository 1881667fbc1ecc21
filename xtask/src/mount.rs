//! Hosts and their live mounts, for the demo and pjdfstest.
//!
//! A `Host` is one machine's view of a volume: its UUID, its mount point, its log.
//! `Host::mount` runs `atsfs mount` in background mode and returns a `Mounted`
//! guard; dropping the guard (on success or on any error) unmounts and waits for the
//! daemon to finish writing, so no task leaves a mount behind.
//!
//! Today one host mounts a volume at a time. The two-host demo will make two `Host`s
//! over the same image; nothing here assumes a single one.

use crate::sh::Cmd;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a daemon may take to write everything back and exit after `umount`.
const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(60);

/// One host using a volume.
pub struct Host {
    /// A short name for messages ("A", "B").
    pub name: String,
    pub host_id: String,
    pub mountpoint: PathBuf,
    pub log: PathBuf,
}

impl Host {
    /// A host whose mount point and log live in `dir` (`mnt-NAME`, `host-NAME.log`).
    pub fn new(name: &str, host_id: &str, dir: &Path) -> Host {
        let lower = name.to_lowercase();
        Host {
            name: name.to_string(),
            host_id: host_id.to_string(),
            mountpoint: dir.join(format!("mnt-{lower}")),
            log: dir.join(format!("host-{lower}.log")),
        }
    }

    /// Mounts `image` with `atsfs` (a program name or path) in background mode; it
    /// returns once the mount is live.
    pub fn mount(&self, atsfs: &Path, image: &Path) -> Result<Mounted<'_>> {
        self.mount_with(atsfs, image, None)
    }

    /// `mount`, with `-o OPTIONS` when given.
    pub fn mount_with(
        &self,
        atsfs: &Path,
        image: &Path,
        options: Option<&str>,
    ) -> Result<Mounted<'_>> {
        if !self.mountpoint.is_dir() {
            Cmd::new("mkdir").arg("-p").arg(&self.mountpoint).run()?;
        }
        let mut command = Cmd::new(atsfs)
            .arg("mount")
            .arg("--host-id")
            .arg(&self.host_id)
            .arg("--log")
            .arg(&self.log);
        if let Some(options) = options {
            command = command.arg("-o").arg(options);
        }
        let status = command.arg(image).arg(&self.mountpoint).status()?;
        if !status.success() {
            bail!(
                "host {}: atsfs mount failed ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        let daemon_pid = find_daemon(&self.mountpoint);
        if daemon_pid.is_none() {
            println!(
                "(warning: no daemon process found for {}; cannot wait for it at unmount)",
                self.mountpoint.display()
            );
        }
        Ok(Mounted {
            host: self,
            daemon_pid,
            active: true,
        })
    }
}

/// A live mount. Drop unmounts it (quietly, for error paths); `unmount` is the
/// checked way.
pub struct Mounted<'a> {
    host: &'a Host,
    daemon_pid: Option<i32>,
    active: bool,
}

impl Mounted<'_> {
    pub fn path(&self) -> &Path {
        &self.host.mountpoint
    }

    /// Unmounts with `umount`, then waits for the daemon to exit: its last writes
    /// to the volume happen after `umount` returns.
    pub fn unmount(mut self) -> Result<()> {
        self.active = false;
        Cmd::new("umount").arg(&self.host.mountpoint).run()?;
        if let Some(pid) = self.daemon_pid {
            println!("(waiting for the daemon, pid {pid}, to write back and exit)");
            if !wait_exit(pid, DAEMON_EXIT_WAIT) {
                bail!(
                    "host {}: the daemon {pid} still runs {DAEMON_EXIT_WAIT:?} after umount; log:\n{}",
                    self.host.name,
                    log_tail(&self.host.log)
                );
            }
        }
        Ok(())
    }
}

impl Mounted<'_> {
    /// Kills the daemon with SIGKILL, as a crash would, and detaches the dead mount
    /// point (it answers "Transport endpoint is not connected" until then).
    pub fn kill9(mut self) -> Result<()> {
        self.active = false;
        let Some(pid) = self.daemon_pid else {
            bail!("host {}: no daemon process to kill", self.host.name);
        };
        Cmd::new("kill").arg("-9").arg(pid.to_string()).run()?;
        if !wait_exit(pid, DAEMON_EXIT_WAIT) {
            bail!("host {}: the daemon {pid} survived SIGKILL", self.host.name);
        }
        Cmd::new("umount")
            .arg("-l")
            .arg(&self.host.mountpoint)
            .run()
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        println!(
            "(cleaning up: unmounting {} of host {})",
            self.host.mountpoint.display(),
            self.host.name
        );
        let unmounted = Cmd::new("umount")
            .arg(&self.host.mountpoint)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !unmounted {
            let _ = Cmd::new("umount")
                .arg("-l")
                .arg(&self.host.mountpoint)
                .status();
        }
        if let Some(pid) = self.daemon_pid {
            if !wait_exit(pid, DAEMON_EXIT_WAIT) {
                println!("(the daemon {pid} did not exit; killing it)");
                let _ = Cmd::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}

/// The last lines of a log file, or why there are none.
pub fn log_tail(log: &Path) -> String {
    const LINES: usize = 30;
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// Finds the background daemon serving `mountpoint`: an `atsfs mount` process
/// started with `--ready-fd` (by the foreground command) whose arguments name it.
pub fn find_daemon(mountpoint: &Path) -> Option<i32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_daemon = args.contains(&&b"mount"[..])
            && args.contains(&&b"--ready-fd"[..])
            && args.contains(&want);
        if is_daemon && process_alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// True while `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to exit; true when it did.
fn wait_exit(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while process_alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
