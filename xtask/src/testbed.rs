//! The real-iSCSI test bed: a tgtd serving one image file as LUN 1, and hosts as
//! network namespaces that reach it over a bridge, each a separate initiator.
//!
//! `cargo xtask tgt` uses this module, and so do the integration tests
//! (`tests/common/mod.rs` includes this very file with `#[path]`), so it uses std only
//! and reports errors as `String`s that say what to do next.
//!
//! - `TgtBinaries`: a tgtd and tgtadm built with COMPARE AND WRITE enabled
//!   (`cargo xtask tgt build` makes them in TARGET/tgt/bin).
//! - `Target::start`: runs tgtd in the foreground as our child (its own process group,
//!   logging to RUN_DIR/tgtd.log), then creates target `IQN`, LUN 1 (backing store the
//!   image, `--bstype rdwr`) and binds it to the allowed initiator addresses (by
//!   default this machine and the host namespaces).
//!   `Target::stop` (or `stop_recorded` from another process) kills it.
//! - `netns_up(n)`: bridge `BRIDGE` (`BRIDGE_ADDR`/24) in the root namespace and, for
//!   host k in 1..=n, namespace `atsfs-hk` whose `eth0` (10.213.0.(10+k)/24) is a veth
//!   into the bridge. `host_command(k, program)` runs a program there with only the
//!   network namespace entered (`nsenter --net`), so FUSE mounts stay visible.
//!
//! Each tgtd keeps its management socket, pid and log in its own run directory
//! (`TGT_IPC_SOCKET`), so several test beds can run at once on different ports.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The target's name; the LUN is `LUN` of it.
pub const IQN: &str = "iqn.2026-12.org.atsfs:testbed";
/// The LUN that serves the image (LUN 0 is tgt's controller; `configure` names 1).
pub const LUN: u32 = 1;
/// The bridge the host namespaces hang off, and its address (where tgtd is reached).
pub const BRIDGE: &str = "atsfs-br0";
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// Host k has address 10.213.0.(HOST_ADDR_BASE + k).
const HOST_ADDR_BASE: u32 = 10;
pub const HOSTS_MAX: u32 = 200;
/// How long tgtd may take to come up, and to go away after SIGKILL.
const START_WAIT: Duration = Duration::from_secs(10);
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The URL libiscsi and QEMU take for LUN `LUN` of our target behind `addr:port`.
pub fn url(addr: Ipv4Addr, port: u16) -> String {
    format!("iscsi://{addr}:{port}/{IQN}/{LUN}")
}

/// A built tgtd and its tgtadm.
#[derive(Clone, Debug)]
pub struct TgtBinaries {
    pub tgtd: PathBuf,
    pub tgtadm: PathBuf,
}

impl TgtBinaries {
    /// Where `cargo xtask tgt build` puts them: CACHE_DIR/bin (CACHE_DIR is
    /// TARGET/tgt).
    pub fn in_cache(cache_dir: &Path) -> TgtBinaries {
        TgtBinaries {
            tgtd: cache_dir.join("bin/tgtd"),
            tgtadm: cache_dir.join("bin/tgtadm"),
        }
    }

    pub fn exist(&self) -> bool {
        self.tgtd.is_file() && self.tgtadm.is_file()
    }
}

/// What to serve, where.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    /// The backing file of LUN 1 (must exist, non-empty).
    pub image: PathBuf,
    /// Where tgtd listens; 0.0.0.0 reaches it from the root namespace (127.0.0.1) and
    /// from the host namespaces (`BRIDGE_ADDR`).
    pub portal: SocketAddrV4,
    /// tgtd's I/O threads per LUN (`-t`). 1 makes COMPARE AND WRITE atomic: tgt's
    /// rdwr backend compares with pread and writes with pwrite, unlocked, so two
    /// threads can both pass the compare.
    pub threads: u32,
    /// tgtd's management socket, pid file and log.
    pub run_dir: PathBuf,
    /// Initiator addresses allowed to log in (`tgtadm --op bind -I`: an address, a
    /// CIDR network, or `ALL`); `ALLOWED_DEFAULT` unless told otherwise.
    pub allowed: Vec<String>,
}

/// Who may log in by default: this machine and the host namespaces. There is no
/// CHAP, so the test bed never serves the LUN to the rest of the network.
pub const ALLOWED_DEFAULT: [&str; 2] = ["127.0.0.1", "10.213.0.0/24"];

/// `ALLOWED_DEFAULT` as a `TargetSpec` takes it.
pub fn allowed_default() -> Vec<String> {
    ALLOWED_DEFAULT.iter().map(|a| a.to_string()).collect()
}

/// A running tgtd that serves a `TargetSpec`.
#[derive(Debug)]
pub struct Target {
    pub spec: TargetSpec,
    pub pid: u32,
    /// Present when this process started tgtd (then `stop` reaps it).
    child: Option<Child>,
}

impl Target {
    /// Starts tgtd and sets up the target; on any failure tgtd is stopped again and the
    /// error carries the end of its log. `show` prints each command as `$ ...`.
    pub fn start(bins: &TgtBinaries, spec: &TargetSpec, show: bool) -> Result<Target, String> {
        if !bins.exist() {
            return Err(format!(
                "no tgtd at {}: build it with `cargo xtask tgt build`",
                bins.tgtd.display()
            ));
        }
        check_image(&spec.image)?;
        if let Some(pid) = recorded_pid(&spec.run_dir) {
            return Err(format!(
                "a tgtd (pid {pid}) already runs from {}: stop it first \
                 (`cargo xtask tgt stop`) or use another port",
                spec.run_dir.display()
            ));
        }
        check_port_free(spec.portal)?;
        // A tgtd killed without `stop` left its socket: tgtadm must not find it.
        remove_run_dir(&spec.run_dir)?;
        fs::create_dir_all(&spec.run_dir)
            .map_err(|e| format!("creating {}: {e}", spec.run_dir.display()))?;
        let child = spawn_tgtd(bins, spec, show)?;
        let mut target = Target {
            spec: spec.clone(),
            pid: child.id(),
            child: Some(child),
        };
        if let Err(e) = target.configure(bins, show) {
            let log = log_tail(&spec.run_dir.join("tgtd.log"));
            let _ = target.stop(false);
            return Err(format!("{e}\ntgtd's log:\n{log}"));
        }
        Ok(target)
    }

    /// Waits for tgtd's socket, creates target, LUN and ACL, and waits for the portal.
    fn configure(&mut self, bins: &TgtBinaries, show: bool) -> Result<(), String> {
        let socket = self.spec.run_dir.join("socket.0");
        let deadline = Instant::now() + START_WAIT;
        while !socket.exists() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("tgtd exited at once ({status})"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("tgtd made no socket {} in time", socket.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket file appears at bind(), before tgtd listens on it: a tgtadm sent
        // in between fails with "Transport endpoint is not connected" (CI saw it).
        // A read-only query is asked until tgtd answers, so no change is sent twice.
        let show_targets = ["--mode", "target", "--op", "show"];
        while let Err(e) = self.tgtadm(bins, &show_targets, false) {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("tgtd exited at once ({status})"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("tgtd does not answer tgtadm in time: {e}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let image = self.spec.image.to_string_lossy().into_owned();
        let words = |line: &'static str| line.split(' ').collect::<Vec<&str>>();
        let mut target_new = words("--mode target --op new --tid 1 --targetname");
        target_new.push(IQN);
        self.tgtadm(bins, &target_new, show)?;
        let mut lun_new = words("--mode logicalunit --op new --tid 1 --lun 1 --bstype rdwr");
        lun_new.extend(["--backing-store", &image]);
        self.tgtadm(bins, &lun_new, show)?;
        for allowed in &self.spec.allowed {
            let mut bind = words("--mode target --op bind --tid 1 -I");
            bind.push(allowed);
            self.tgtadm(bins, &bind, show)?;
        }
        let probe = SocketAddrV4::new(
            connect_addr(*self.spec.portal.ip()),
            self.spec.portal.port(),
        );
        while TcpStream::connect_timeout(&probe.into(), Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("tgtd does not accept connections on {probe}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Runs `tgtadm --lld iscsi ARGS` against this tgtd; fails unless it exits 0.
    pub fn tgtadm(&self, bins: &TgtBinaries, args: &[&str], show: bool) -> Result<String, String> {
        let mut cmd = Command::new(&bins.tgtadm);
        cmd.env("TGT_IPC_SOCKET", self.spec.run_dir.join("socket"))
            .args(["--lld", "iscsi"])
            .args(args);
        run_captured(cmd, show)
    }

    /// The URL from the root namespace.
    pub fn url(&self) -> String {
        url(
            connect_addr(*self.spec.portal.ip()),
            self.spec.portal.port(),
        )
    }

    /// The URL from the host namespaces (tgtd must listen on 0.0.0.0 or the bridge).
    pub fn url_for_hosts(&self) -> String {
        url(BRIDGE_ADDR, self.spec.portal.port())
    }

    /// Stops tgtd and removes its run directory.
    pub fn stop(&mut self, show: bool) -> Result<(), String> {
        let run_dir = self.spec.run_dir.clone();
        match self.child.take() {
            Some(mut child) => {
                kill(self.pid, show);
                let _ = child.wait();
                remove_run_dir(&run_dir)
            }
            None => stop_recorded(&run_dir, show).map(|_| ()),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(false);
        }
    }
}

/// Keeps tgtd running after `self` goes away (for `cargo xtask tgt start`): records its
/// pid in RUN_DIR/pid for `stop_recorded`.
pub fn detach(mut target: Target) -> Result<u32, String> {
    let pid = target.pid;
    let pid_file = target.spec.run_dir.join("pid");
    fs::write(&pid_file, format!("{pid}\n"))
        .map_err(|e| format!("writing {}: {e}", pid_file.display()))?;
    // Dropping the Child handle neither kills nor waits: tgtd outlives us.
    target.child = None;
    Ok(pid)
}

/// Stops the tgtd whose pid RUN_DIR/pid records, if it still runs, and removes
/// RUN_DIR. Returns whether one was running.
pub fn stop_recorded(run_dir: &Path, show: bool) -> Result<bool, String> {
    let running = recorded_pid(run_dir);
    if let Some(pid) = running {
        kill(pid, show);
        let deadline = Instant::now() + STOP_WAIT;
        while is_tgtd(pid) {
            if Instant::now() > deadline {
                return Err(format!("tgtd (pid {pid}) did not exit after SIGKILL"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    remove_run_dir(run_dir)?;
    Ok(running.is_some())
}

/// The pid RUN_DIR/pid records, if that process is a live tgtd.
pub fn recorded_pid(run_dir: &Path) -> Option<u32> {
    let text = fs::read_to_string(run_dir.join("pid")).ok()?;
    let pid = text.trim().parse().ok()?;
    is_tgtd(pid).then_some(pid)
}

/// True when `pid` is a live (not zombie) process whose program is a tgtd.
fn is_tgtd(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let program = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    program.ends_with(b"tgtd")
}

fn remove_run_dir(run_dir: &Path) -> Result<(), String> {
    match fs::remove_dir_all(run_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", run_dir.display())),
    }
}

fn check_image(image: &Path) -> Result<(), String> {
    match fs::metadata(image) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        Ok(_) => Err(format!(
            "{} is not a non-empty file: make the volume first, e.g. \
             `mkfs.atsfs --size 1G {0}` or `truncate -s 1G {0}`",
            image.display()
        )),
        Err(e) => Err(format!(
            "{}: {e}: make the volume first, e.g. `mkfs.atsfs --size 1G {0}`",
            image.display()
        )),
    }
}

fn check_port_free(portal: SocketAddrV4) -> Result<(), String> {
    TcpListener::bind(portal).map(drop).map_err(|e| {
        format!(
            "cannot listen on {portal} ({e}): another iSCSI target (tgtd, targetcli) \
             uses it; stop it or choose another port with --portal"
        )
    })
}

/// A free TCP port on all addresses (for tests that each want their own tgtd).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free TCP port: {e}"))
}

/// The address to connect to for a portal address (0.0.0.0 means loopback here).
fn connect_addr(addr: Ipv4Addr) -> Ipv4Addr {
    if addr.is_unspecified() {
        Ipv4Addr::LOCALHOST
    } else {
        addr
    }
}

fn spawn_tgtd(bins: &TgtBinaries, spec: &TargetSpec, show: bool) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let log_path = spec.run_dir.join("tgtd.log");
    let log =
        fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(&bins.tgtd);
    cmd.env("TGT_IPC_SOCKET", spec.run_dir.join("socket"))
        .args(["-f", "-t", &spec.threads.to_string()])
        .args(["--iscsi", &format!("portal={}", spec.portal)])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for cargo must not end the target.
        .process_group(0);
    if show {
        println!(
            "$ TGT_IPC_SOCKET={} {} > {} 2>&1 &",
            spec.run_dir.join("socket").display(),
            shown(&cmd),
            log_path.display()
        );
    }
    cmd.spawn()
        .map_err(|e| format!("could not start {}: {e}", bins.tgtd.display()))
}

/// The last lines of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// SIGKILLs tgtd. tgtd ignores SIGTERM (its handler is empty), and `tgtadm --mode
/// system --op delete` only works once every target is gone. Killing loses nothing:
/// the rdwr backend has pwrite()n a command's data before it answers, so what was
/// acknowledged is in the kernel's page cache; connections see a reset.
fn kill(pid: u32, show: bool) {
    let mut cmd = Command::new("kill");
    cmd.args(["-KILL", &pid.to_string()]);
    let _ = run_captured(cmd, show);
}

// ---- hosts in network namespaces ----

/// The network namespace of host `k` (1-based).
pub fn ns_name(host: u32) -> String {
    format!("atsfs-h{host}")
}

/// Host `k`'s address inside its namespace.
pub fn host_addr(host: u32) -> Ipv4Addr {
    let last = u8::try_from(HOST_ADDR_BASE + host).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 213, 0, last)
}

/// `nsenter --net=/run/netns/atsfs-hK PROGRAM`: only the network namespace is
/// entered. (`ip netns exec` would also make a new mount namespace, hiding a FUSE
/// mount made inside it from everyone else.)
pub fn host_command(host: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns_name(host)))
        .arg(program);
    cmd
}

/// Fails unless host `k` can open a TCP connection to `addr:port` (bash's /dev/tcp,
/// inside its namespace).
pub fn host_reaches(host: u32, addr: Ipv4Addr, port: u16, show: bool) -> Result<(), String> {
    let mut cmd = host_command(host, "timeout");
    cmd.args([
        "5",
        "bash",
        "-c",
        &format!("exec 3<>/dev/tcp/{addr}/{port}"),
    ]);
    run_captured(cmd, show)
        .map(drop)
        .map_err(|e| format!("host {host} cannot reach {addr}:{port}: {e}"))
}

/// Makes the bridge and namespaces of hosts 1..=hosts (keeping those that are
/// already complete). Idempotent; not safe against a concurrent `netns_down`.
pub fn netns_up(hosts: u32, show: bool) -> Result<(), String> {
    if hosts == 0 || hosts > HOSTS_MAX {
        return Err(format!("hosts must be 1..={HOSTS_MAX}, not {hosts}"));
    }
    if !link_exists(BRIDGE) {
        ip(&["link", "add", BRIDGE, "type", "bridge"], show)
            .map_err(|e| format!("{e}\n(the kernel needs bridge support: CONFIG_BRIDGE)"))?;
        ip(
            &["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", BRIDGE],
            show,
        )?;
    }
    ip(&["link", "set", BRIDGE, "up"], show)?;
    for host in 1..=hosts {
        if !host_ready(host) {
            make_host(host, show)?;
        }
    }
    Ok(())
}

/// Removes every `atsfs-h*` namespace and the bridge. Idempotent.
pub fn netns_down(show: bool) -> Result<(), String> {
    let mut names: Vec<String> = fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("atsfs-h"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        ip(&["netns", "delete", &name], show)?;
    }
    if link_exists(BRIDGE) {
        ip(&["link", "delete", BRIDGE], show)?;
    }
    Ok(())
}

/// True when host `k`'s namespace exists and its eth0 has its address.
fn host_ready(host: u32) -> bool {
    let ns = ns_name(host);
    if !Path::new("/run/netns").join(&ns).exists() {
        return false;
    }
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"]);
    run_captured(cmd, false)
        .map(|out| out.contains(&format!("{}/24", host_addr(host))))
        .unwrap_or(false)
}

/// (Re)makes host `k`'s namespace from scratch.
fn make_host(host: u32, show: bool) -> Result<(), String> {
    let ns = ns_name(host);
    let veth = format!("atsfs-v{host}");
    if Path::new("/run/netns").join(&ns).exists() {
        ip(&["netns", "delete", &ns], show)?;
    }
    if link_exists(&veth) {
        ip(&["link", "delete", &veth], show)?;
    }
    let addr = format!("{}/24", host_addr(host));
    ip(&["netns", "add", &ns], show)?;
    ip(
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
        show,
    )
    .map_err(|e| format!("{e}\n(the kernel needs veth support: CONFIG_VETH)"))?;
    ip(&["link", "set", &veth, "master", BRIDGE, "up"], show)?;
    ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"], show)?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"], show)?;
    ip(&["-n", &ns, "link", "set", "lo", "up"], show)?;
    Ok(())
}

fn link_exists(name: &str) -> bool {
    let mut cmd = Command::new("ip");
    cmd.args(["link", "show", "dev", name]);
    run_captured(cmd, false).is_ok()
}

fn ip(args: &[&str], show: bool) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_captured(cmd, show)
}

/// Runs `cmd` with stdin closed, capturing its output; fails (with its stderr)
/// unless it exits 0.
fn run_captured(mut cmd: Command, show: bool) -> Result<String, String> {
    let line = shown(&cmd);
    if show {
        println!("$ {line}");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not start `{line}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command as a reader would type it.
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|w| {
            let w = w.to_string_lossy();
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c))
            {
                w.into_owned()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
