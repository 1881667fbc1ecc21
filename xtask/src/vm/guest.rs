//! One guest: a QEMU (TCG, PVH boot of `vmlinux`) in host namespace `atsfs-hK`, so
//! that tgt sees each guest as its own initiator, with the shared disk attached as
//! `Disk` says.
//!
//! The host talks to the guest's /init (xtask/vm/init.sh) over the second serial
//! port, which is QEMU's stdio: `send` writes one command line, `reply` collects the
//! output lines ("@@| ...") up to "@@end STATUS". The kernel's console (the first
//! serial port) goes to a file. Dropping a `Guest` kills its QEMU.

use crate::testbed;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Memory per guest: the initramfs (busybox, modules, two static binaries) lives in
/// it, and the page cache.
const MEMORY_MB: u32 = 512;
/// How long a guest may take from QEMU's start to /init's first line under TCG.
const BOOT_WAIT: Duration = Duration::from_secs(120);

/// How the guests reach the shared disk.
#[derive(Clone, Debug)]
pub enum Disk {
    /// The tgt LUN through QEMU's iSCSI driver and `scsi-block` passthrough on a
    /// virtio-scsi controller: every SCSI command of the guest, COMPARE AND WRITE and
    /// PERSISTENT RESERVE included, reaches tgt. `/dev/sda` in the guest.
    IscsiPassthrough { url: String },
    /// One image file of this machine, a plain virtio disk attached to every guest
    /// with `share-rw=on` (no COMPARE AND WRITE). `/dev/vda` in the guest.
    SharedVirtio { image: PathBuf },
}

impl Disk {
    pub fn guest_device(&self) -> &'static str {
        match self {
            Disk::IscsiPassthrough { .. } => "/dev/sda",
            Disk::SharedVirtio { .. } => "/dev/vda",
        }
    }

    fn qemu_args(&self, guest: u32) -> Vec<String> {
        let args: Vec<String> = match self {
            Disk::IscsiPassthrough { url } => vec![
                "-iscsi".into(),
                format!("initiator-name={}", initiator_name(guest)),
                "-device".into(),
                "virtio-scsi-pci,id=scsi0".into(),
                "-drive".into(),
                format!("file={url},if=none,id=lun,format=raw,cache=none"),
                "-device".into(),
                "scsi-block,drive=lun,bus=scsi0.0".into(),
            ],
            Disk::SharedVirtio { image } => vec![
                "-drive".into(),
                format!(
                    "file={},if=none,id=disk,format=raw,cache=none,file.locking=off",
                    image.display()
                ),
                "-device".into(),
                "virtio-blk-pci,drive=disk,share-rw=on".into(),
            ],
        };
        args
    }
}

/// The iSCSI initiator name of guest `k`, as tgt's logs and reservations show it.
pub fn initiator_name(guest: u32) -> String {
    format!("iqn.2026-12.org.atsfs:vm{guest}")
}

/// The kernel and initramfs every guest boots.
pub struct GuestImage {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// What a command printed and how it ended.
pub struct Reply {
    pub status: i32,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status == 0
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

pub struct Guest {
    pub name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub console: PathBuf,
    /// Seconds from QEMU's start to /init's "@@ready".
    pub boot_seconds: f64,
}

impl Guest {
    /// Starts QEMU for guest `index` in namespace `atsfs-h{index}`; does not wait.
    pub fn start(index: u32, image: &GuestImage, disk: &Disk, work: &Path) -> Result<Guest> {
        let name = format!("vm{index}");
        let console = work.join(format!("{name}.console"));
        let qemu_log = std::fs::File::create(work.join(format!("{name}.qemu.log")))?;
        let mut cmd = testbed::host_command(index, "qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", &MEMORY_MB.to_string(), "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-monitor", "none"])
            .arg("-kernel")
            .arg(&image.vmlinux)
            .arg("-initrd")
            .arg(&image.initramfs)
            .args([
                "-append",
                &format!("console=ttyS0 loglevel=4 panic=-1 guest={index}"),
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-serial", "stdio"])
            .args(["-device", "virtio-rng-pci"])
            .args(disk.qemu_args(index));
        println!("{name}$ {}", shown(&cmd));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(qemu_log)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let stdout = child.stdout.take().context("qemu's stdout")?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        Ok(Guest {
            name,
            child: Some(child),
            stdin,
            lines: rx,
            console,
            boot_seconds: 0.0,
        })
    }

    /// Waits for /init's "@@ready" line.
    pub fn wait_ready(&mut self, started: Instant) -> Result<()> {
        let deadline = started + BOOT_WAIT;
        loop {
            let line = self.next_line(deadline)?;
            if let Some(rest) = line.strip_prefix("@@ready") {
                self.boot_seconds = started.elapsed().as_secs_f64();
                println!(
                    "{}: ready {:.1} s after QEMU started (guest{rest})",
                    self.name, self.boot_seconds
                );
                return Ok(());
            }
        }
    }

    fn next_line(&mut self, deadline: Instant) -> Result<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => bail!("{}: no answer in time", self.name),
            Err(RecvTimeoutError::Disconnected) => bail!("{}: QEMU exited", self.name),
        }
    }

    /// Sends one command line to the guest's /init.
    pub fn send(&mut self, command: &str) -> Result<()> {
        println!("{}# {command}", self.name);
        let stdin = self.stdin.as_mut().context("the guest is gone")?;
        writeln!(stdin, "{command}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("{}: writing to QEMU's stdio", self.name))
    }

    /// Collects the answer to the last command sent, printing its lines.
    pub fn reply(&mut self, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let line = self.next_line(deadline)?;
            if let Some(text) = line.strip_prefix("@@| ") {
                println!("{}  | {text}", self.name);
                lines.push(text.to_string());
            } else if let Some(status) = line.strip_prefix("@@end ") {
                let status = status.trim().parse().unwrap_or(-1);
                if status != 0 {
                    println!("{}  (exit status {status})", self.name);
                }
                return Ok(Reply { status, lines });
            } else if line == "@@|" {
                lines.push(String::new());
            }
        }
    }

    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<Reply> {
        self.send(command)?;
        self.reply(timeout)
    }

    /// SIGKILL to QEMU: the guest stops at once, its kernel, page cache and daemon
    /// with it, as at a power loss.
    pub fn kill9(&mut self) -> Result<()> {
        let mut child = self.child.take().context("the guest is gone")?;
        println!("$ kill -9 {}   # {}'s QEMU", child.id(), self.name);
        child.kill().context("killing QEMU")?;
        child.wait().context("reaping QEMU")?;
        self.stdin = None;
        Ok(())
    }

    /// Powers the guest off and waits for QEMU to exit (killing it after `timeout`).
    pub fn power_off(&mut self, timeout: Duration) {
        let _ = self.send("poweroff -f");
        self.stdin = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The last lines of the kernel's console, for a failure report.
    pub fn console_tail(&self, lines: usize) -> String {
        testbed::log_tail(&self.console)
            .lines()
            .rev()
            .take(lines)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A command as a reader would type it.
fn shown(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(crate::sh::quote)
        .collect::<Vec<_>>()
        .join(" ")
}
