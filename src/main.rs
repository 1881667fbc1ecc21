//! `atsfs`: mount an atsfs volume, check it, look at who uses it.

use anyhow::{bail, Context, Result};
use atsfs::cluster::HostUuid;
use atsfs::fs::{Fs, MountOptions};
use atsfs::fuse::{parse_options, FuseOptions, Mounted};
use atsfs::lun::{open_device, Lun, OpenMode};
use clap::{Parser, Subcommand};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

mod docs;
mod helpers;
mod umount;

/// Where a host keeps its UUID when `--host-id` is not given.
const HOST_ID_FILE: &str = "/var/lib/atsfs/host-id";
/// Where a background daemon logs when `--log` is not given.
const DEFAULT_LOG: &str = "/var/log/atsfs.log";

#[derive(Parser)]
#[command(
    name = "atsfs",
    version,
    about = "atsfs: one shared LUN, many hosts, coordination by atomic test-and-set",
    after_long_help = "The volume is made by mkfs.atsfs(8); mount(8) and /etc/fstab mount it \
                       through mount.atsfs(8), umount(8) through umount.fuse.atsfs(8), \
                       fsck(8) checks it through fsck.atsfs(8). Each subcommand has its \
                       page: atsfs-mount(8), atsfs-umount(8), atsfs-status(8), \
                       atsfs-locks(8), atsfs-stats(8), atsfs-recover(8), \
                       atsfs-ats-selftest(8), atsfs-fsck(8). The administrator's guide is \
                       docs/operations.md in the source."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a volume; returns once the mount is live (the daemon keeps serving).
    Mount {
        /// Stay in the foreground.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// This host's UUID (default: kept in /var/lib/atsfs/host-id).
        #[arg(long)]
        host_id: Option<String>,
        /// Mount options, comma separated (attr_timeout=S, entry_timeout=S, allow_other, ...).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Log file of the background daemon.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Internal: the pipe to report readiness on.
        #[arg(long, hide = true)]
        ready_fd: Option<i32>,
        device: PathBuf,
        mountpoint: PathBuf,
    },
    /// Unmount and wait until the daemon has written everything home, released its
    /// heartbeat slot and exited (what umount(8) does through umount.fuse.atsfs).
    /// Exit 0 done, 32 the unmount failed or the daemon failed or took too long.
    Umount {
        /// Detach now (umount -l); the daemon leaves when the last open file is
        /// closed. Waits a few seconds for it, then returns.
        #[arg(short = 'l', long)]
        lazy: bool,
        /// Abort the FUSE connection (umount -f), failing requests in flight; the
        /// daemon still commits what it has and releases its slot.
        #[arg(short = 'f', long)]
        force: bool,
        /// Say what is done and how long the daemon took.
        #[arg(short = 'v', long)]
        verbose: bool,
        mountpoint: PathBuf,
    },
    /// Show the host slots of a volume: who is live, dead or gone (read-only).
    Status {
        /// Print JSON: {volume: {...}, watched_ms, slots: [...]}.
        #[arg(long)]
        json: bool,
        /// Watch the heartbeats for up to this long (default: two heartbeat intervals
        /// + 200 ms; at most lease + interval + 500 ms, which settles every slot).
        #[arg(long)]
        watch_ms: Option<u64>,
        device: PathBuf,
    },
    /// Show the held lock records of a volume, or the record of one PATH inside it,
    /// with their holders and open files (read-only).
    Locks {
        /// Print JSON: {volume: {...}, watched_ms, locks: [...]}.
        #[arg(long)]
        json: bool,
        /// List free records too.
        #[arg(long)]
        all: bool,
        /// Watch the heartbeats for up to this long to judge the holders (as status).
        #[arg(long)]
        watch_ms: Option<u64>,
        device: PathBuf,
        /// A path inside the volume, like /dir/file (not through a mount point).
        path: Option<String>,
    },
    /// Show a mounted host's counters since mount: the device I/O its filesystem
    /// issued (reads, writes, ATS, flushes), journal commits and locks.
    Stats {
        /// Print the JSON the daemon reports (the `user.atsfs.stats` xattr).
        #[arg(long)]
        json: bool,
        /// The mount point (the root of an atsfs mount).
        mountpoint: PathBuf,
    },
    /// Recover dead hosts' slots offline: replay their journals and free their slots.
    /// Watches each slot for a lease first; live hosts are left alone.
    Recover {
        /// Only this slot.
        #[arg(long)]
        slot: Option<u32>,
        device: PathBuf,
    },
    /// Prove that DEVICE's compare-and-write is atomic: several sessions (each its own
    /// open of DEVICE) race read-then-compare-and-write increments of a counter on a
    /// scratch sector, which gets its content back afterwards. Exit 0 atomic, 1 not
    /// (lost updates, false miscompares), 2 could not run. On an atsfs volume it runs
    /// only while every host slot is free; it refuses another filesystem.
    AtsSelftest {
        /// Racing sessions.
        #[arg(long, default_value_t = atsfs::lun::selftest::SESSIONS_DEFAULT)]
        sessions: usize,
        /// Increments per session.
        #[arg(long, default_value_t = atsfs::lun::selftest::INCREMENTS_DEFAULT)]
        increments: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        device: PathBuf,
    },
    /// Check a volume (read-only). Exit 0 clean, 1 errors corrected (--repair),
    /// 4 errors left, 8 operational error.
    Fsck {
        /// Print every problem as JSON.
        #[arg(long)]
        json: bool,
        /// Repair what the check finds: first watches the host slots for a lease and
        /// refuses (exit 8) while a host is live, recovers dead hosts, then repairs and
        /// checks again. With --json: {fixed, notes, after}.
        #[arg(long)]
        repair: bool,
        /// With --repair: do not watch for live hosts first; treat every slot in use as
        /// a dead host. Repairing under a live host corrupts the volume.
        #[arg(long, requires = "repair")]
        force: bool,
        device: PathBuf,
    },
}

/// Reads the `user.atsfs.stats` xattr of a mount point.
fn read_stats_xattr(mountpoint: &Path) -> Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .context("the mount point contains a NUL byte")?;
    let name = c"user.atsfs.stats";
    let not_atsfs = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => anyhow::anyhow!(
            "{} is not the root of an atsfs mount (no user.atsfs.stats attribute); \
             give the directory the volume is mounted on",
            mountpoint.display()
        ),
        _ => anyhow::anyhow!("reading the stats of {}: {e}", mountpoint.display()),
    };
    for _ in 0..4 {
        // SAFETY: `path` and `name` are NUL-terminated; a null buffer of size 0 asks
        // for the value's size.
        let size = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(not_atsfs(std::io::Error::last_os_error()));
        }
        // Room for the value to grow between the two calls.
        let mut buf = vec![0u8; size as usize + 256];
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let got = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(not_atsfs(e));
        }
    }
    bail!(
        "the stats of {} kept growing while being read",
        mountpoint.display()
    )
}

fn stats(mountpoint: &Path, json: bool) -> Result<()> {
    let raw = read_stats_xattr(mountpoint)?;
    if json {
        println!("{}", String::from_utf8_lossy(&raw));
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&raw).context("the daemon's stats are not JSON")?;
    let n = |path: &[&str]| -> u64 {
        path.iter()
            .try_fold(&v, |v, k| v.get(k))
            .and_then(|x| x.as_u64())
            .unwrap_or(0)
    };
    println!("host slot {} on {}", n(&["slot"]), mountpoint.display());
    println!("device I/O since mount (the filesystem's; heartbeats not included):");
    println!(
        "  reads        {:>12}  ({} bytes)",
        n(&["io", "reads"]),
        n(&["io", "read_bytes"])
    );
    println!(
        "  writes       {:>12}  ({} bytes)",
        n(&["io", "writes"]),
        n(&["io", "written_bytes"])
    );
    println!("  ATS          {:>12}", n(&["io", "caws"]));
    println!("  flushes      {:>12}", n(&["io", "flushes"]));
    println!("journal:");
    println!(
        "  transactions {:>12}  ({} images, {} waited for a group commit)",
        n(&["commits"]),
        n(&["committed_images"]),
        n(&["sealed_transactions"])
    );
    println!(
        "  groups       {:>12}  committed in the background while operations went on",
        n(&["pipelined_commits"])
    );
    println!("locks:");
    // Counted by `Meta::need`; the lock of a new inode (`Meta::take_new`) is not.
    println!(
        "  acquired     {:>12}  (existing inodes and groups; new inodes' not counted)",
        n(&["lock_acquires"])
    );
    println!("  released     {:>12}", n(&["lock_releases"]));
    println!("  held now     {:>12}", n(&["locks_held"]));
    println!("data:");
    println!(
        "  read ahead   {:>12}  ranges of sequential O_DIRECT reads ({} served a read)",
        n(&["readaheads"]),
        n(&["readahead_hits"])
    );
    Ok(())
}

/// Logs to stderr at `default_level` unless RUST_LOG says otherwise, with fuser's own
/// unmount messages only as errors: fuser warns when its session, dropped after
/// `umount` ended it, finds the mount already gone ("Failed to umount filesystem:
/// Invalid argument", "Unmount failed": the normal end of every mount), and this
/// daemon reports a failed unmount of its own (signal thread, `Mounted`) itself.
pub(crate) fn init_tracing(default_level: &str) {
    let default_filter = format!("{default_level},fuser::session=error,fuser::mnt=error");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The name this program was started by (the file name of argv[0]).
fn invoked_as() -> String {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

fn main() -> ExitCode {
    // One program, four names: mount(8), umount(8) and fsck(8) run `mount.atsfs`,
    // `umount.fuse.atsfs` and `fsck.atsfs` (links to this binary) with their own
    // conventions.
    match invoked_as().as_str() {
        "mount.atsfs" | "mount.fuse.atsfs" => return helpers::mount_main(),
        "fsck.atsfs" => return helpers::fsck_main(),
        "umount.fuse.atsfs" | "umount.atsfs" => return umount::helper_main(),
        _ => {}
    }
    init_tracing("info");
    // Internal, and no subcommand: clap_complete would offer a hidden one too.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == docs::GENERATE) {
        let [_, _, out] = &args[..] else {
            eprintln!("usage: atsfs {} OUT", docs::GENERATE);
            return ExitCode::from(2);
        };
        return match docs::generate(Path::new(out)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("atsfs: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    // The mount daemon's last words name it: mounts share /var/log/atsfs.log, and
    // umount.fuse.atsfs looks there for this daemon's.
    let daemon = matches!(
        cli.command,
        Command::Mount { foreground, ready_fd, .. } if foreground || ready_fd.is_some()
    );
    let result = match cli.command {
        Command::Mount {
            foreground,
            host_id,
            options,
            log,
            ready_fd,
            device,
            mountpoint,
        } => {
            if foreground || ready_fd.is_some() {
                mount_foreground(&device, &mountpoint, host_id.as_deref(), &options, ready_fd)
            } else {
                mount_background(&MountRequest {
                    device,
                    mountpoint,
                    host_id,
                    options,
                    log,
                })
            }
        }
        Command::Umount {
            lazy,
            force,
            verbose,
            mountpoint,
        } => {
            return ExitCode::from(umount::unmount(&umount::Request {
                dir: &mountpoint,
                lazy,
                force,
                verbose,
                name: "atsfs umount",
                by_umount8: false,
            }))
        }
        Command::Fsck {
            json,
            repair: true,
            force,
            device,
        } => return ExitCode::from(fsck_repair(&device, json, force)),
        Command::Fsck { json, device, .. } => return ExitCode::from(fsck(&device, json)),
        Command::AtsSelftest {
            sessions,
            increments,
            json,
            device,
        } => return ats_selftest(&device, sessions, increments, json),
        Command::Recover { slot, device } => recover(&device, slot),
        Command::Stats { json, mountpoint } => stats(&mountpoint, json),
        Command::Status {
            json,
            watch_ms,
            device,
        } => show_status(&device, json, watch_ms),
        Command::Locks {
            json,
            all,
            watch_ms,
            device,
            path,
        } => {
            let query = atsfs::inspect::LockQuery {
                path,
                all,
                watch: watch_ms.map(std::time::Duration::from_millis),
            };
            show_locks(&device, json, &query)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if daemon => {
            eprintln!("atsfs[{}]: {e:#}", std::process::id());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("atsfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads this host's UUID, making one on first use.
fn host_uuid(given: Option<&str>) -> Result<HostUuid> {
    if let Some(text) = given {
        let uuid = uuid::Uuid::parse_str(text)
            .with_context(|| format!("--host-id {text} is not a UUID"))?;
        return Ok(HostUuid(*uuid.as_bytes()));
    }
    if let Ok(text) = std::fs::read_to_string(HOST_ID_FILE) {
        let uuid = uuid::Uuid::parse_str(text.trim())
            .with_context(|| format!("{HOST_ID_FILE} does not hold a UUID; fix or delete it"))?;
        return Ok(HostUuid(*uuid.as_bytes()));
    }
    let uuid = uuid::Uuid::new_v4();
    let dir = Path::new(HOST_ID_FILE).parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(HOST_ID_FILE, format!("{}\n", uuid.hyphenated()))
        .with_context(|| format!("writing {HOST_ID_FILE}"))?;
    tracing::info!("made this host's UUID {uuid} in {HOST_ID_FILE}");
    Ok(HostUuid(*uuid.as_bytes()))
}

/// What `atsfs mount` (and `mount.atsfs`) hands the mount daemon.
pub(crate) struct MountRequest {
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub host_id: Option<String>,
    pub options: Vec<String>,
    pub log: Option<PathBuf>,
}

impl MountRequest {
    /// The daemon's arguments after `atsfs`: `mount [--host-id ID] [-o OPTS] DEVICE
    /// DIR`, without `--ready-fd`.
    fn daemon_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["mount".into()];
        if let Some(id) = &self.host_id {
            args.push("--host-id".into());
            args.push(id.into());
        }
        for o in &self.options {
            args.push("-o".into());
            args.push(o.into());
        }
        // `--` so that a device or mount point whose name starts with `-` stays one.
        args.push("--".into());
        args.push(self.device.clone().into_os_string());
        args.push(self.mountpoint.clone().into_os_string());
        args
    }
}

/// Runs this program again in the foreground as a daemon (`atsfs mount --ready-fd N
/// ...`), and waits until it says the mount is live (or why not).
pub(crate) fn mount_background(request: &MountRequest) -> Result<()> {
    let log_path = request.log.as_deref().unwrap_or(Path::new(DEFAULT_LOG));
    if let Some(dir) = log_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening the log {}", log_path.display()))?;
    let (read_end, write_end) = nix::unistd::pipe().context("making a pipe")?;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut args = request.daemon_args();
    // Options go before `--`.
    args.insert(1, write_end_raw(&write_end).to_string().into());
    args.insert(1, "--ready-fd".into());
    let mut command = std::process::Command::new(exe);
    // Named `atsfs` whatever name started us (`mount.atsfs` is the same program).
    std::os::unix::process::CommandExt::arg0(&mut command, "atsfs");
    command
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone().context("log file")?)
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe; the child only detaches from our session.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the mount daemon")?;
    drop(write_end);
    let mut message = String::new();
    // SAFETY: read_end is an fd we own, turned into a File exactly once.
    let mut reader = unsafe { std::fs::File::from_raw_fd(read_end.into_raw_fd()) };
    let _ = reader.read_to_string(&mut message);
    let message = message.trim();
    if message == "ok" {
        umount::record_helper(&request.mountpoint);
        return Ok(());
    }
    let status = child.try_wait().ok().flatten();
    if message.is_empty() {
        bail!(
            "the mount daemon exited ({}) before the mount was live; see {}",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "no status".into()),
            log_path.display()
        );
    }
    bail!("{message}")
}

fn write_end_raw(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// The pipe `atsfs mount` waits on (`--ready-fd`): the daemon writes one line to it,
/// "ok" once the mount is live or why it failed, and closes it. Only the first
/// report goes out: the daemon that fails after "ok" must not write to (or close)
/// the fd number again, which by then may name another file (the device).
struct ReadyPipe(Option<std::fs::File>);

impl ReadyPipe {
    /// Takes ownership of `fd` (the parent passed it for this one message).
    fn new(fd: Option<i32>) -> ReadyPipe {
        // SAFETY: the parent passed us this fd for exactly this one message; it is
        // owned here and nowhere else.
        ReadyPipe(fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) }))
    }

    /// Writes `message` and closes the pipe; nothing after the first call.
    fn report(&mut self, message: &str) {
        if let Some(mut pipe) = self.0.take() {
            let _ = writeln!(pipe, "{message}");
        }
    }
}

fn mount_foreground(
    device: &Path,
    mountpoint: &Path,
    host_id: Option<&str>,
    options: &[String],
    ready_fd: Option<i32>,
) -> Result<()> {
    let mut ready = ReadyPipe::new(ready_fd);
    let result = mount_and_serve(device, mountpoint, host_id, options, &mut ready);
    if let Err(e) = &result {
        // Before "ok": why the mount failed, for `atsfs mount` to print. After it:
        // nothing (the error goes to the log, from main).
        ready.report(&format!("{e:#}"));
    }
    result
}

/// The mount's source as /proc/self/mountinfo shows it: the device by an absolute
/// path (a relative name would mean nothing to a reader elsewhere), an iSCSI URL
/// without its password.
fn source_name(device: &Path) -> String {
    if atsfs::lun::device_kind(device) == atsfs::lun::DeviceKind::Iscsi {
        return atsfs::lun::display_name(device);
    }
    let absolute = std::path::absolute(device).unwrap_or_else(|_| device.to_path_buf());
    atsfs::lun::display_name(&absolute)
}

fn mount_and_serve(
    device: &Path,
    mountpoint: &Path,
    host_id: Option<&str>,
    options: &[String],
    ready: &mut ReadyPipe,
) -> Result<()> {
    let mut fuse_opts = FuseOptions {
        fsname: source_name(device),
        ..FuseOptions::default()
    };
    let host = host_uuid(host_id)?;
    let mut mount_opts = MountOptions::new(host);
    parse_options(options, &mut fuse_opts, &mut mount_opts)?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    // Block the termination signals in every thread; one thread waits for them.
    let mut signals = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    let lun: Arc<dyn Lun> = open_device(device, OpenMode::ReadWrite)
        .with_context(|| format!("opening {}", atsfs::lun::display_name(device)))?;
    let fs = Fs::mount(lun, mount_opts)
        .with_context(|| format!("mounting {}", atsfs::lun::display_name(device)))?;
    let (slot, generation) = fs.slot().unwrap_or((0, 0));
    tracing::info!(slot, generation, host = %host, "joined the volume");
    let mut mounted = match Mounted::mount(fs.clone(), mountpoint, fuse_opts) {
        Ok(m) => m,
        Err(e) => {
            let _ = fs.unmount();
            return Err(e);
        }
    };
    let mut unmounter = mounted.unmounter();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                tracing::info!("{signal}: unmounting");
                if let Err(e) = unmounter.unmount() {
                    tracing::error!("unmount failed: {e}; run `umount` on the mount point");
                }
            }
        })
        .context("starting the signal thread")?;
    ready.report("ok");
    let served = mounted.run();
    let unmounted = fs.unmount();
    tracing::info!("unmounted {}", mountpoint.display());
    served.and(unmounted)
}

/// `atsfs fsck`: 0 clean, 4 problems found, 8 could not check.
fn fsck(device: &Path, json: bool) -> u8 {
    let lun = match open_device(device, OpenMode::ReadOnly) {
        Ok(lun) => lun,
        Err(e) => {
            eprintln!(
                "atsfs fsck: cannot open {}: {e}",
                atsfs::lun::display_name(device)
            );
            return 8;
        }
    };
    match atsfs::fsck::check(&lun) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                report.print();
            }
            if report.problems.is_empty() {
                0
            } else {
                4
            }
        }
        Err(e) => {
            eprintln!("atsfs fsck: {}: {e:#}", atsfs::lun::display_name(device));
            8
        }
    }
}

fn recover(device: &Path, only: Option<u32>) -> Result<()> {
    use atsfs::cluster::{recover_offline, Clock, OfflineOutcome, SystemClock, ToolSession};
    let lun = open_device(device, OpenMode::ReadWrite)
        .with_context(|| format!("opening {}", atsfs::lun::display_name(device)))?;
    let sb = atsfs::fs::read_superblock(&lun)?;
    let geo = atsfs::format::Geometry::from_superblock(&sb);
    let interval = std::time::Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease = std::time::Duration::from_millis(u64::from(sb.lease_ms));
    // Past the storage's reservation, where the LUN has one, for the replays' writes.
    let registration = atsfs::cluster::fence::ToolRegistration::new(lun.as_ref())?;
    // Recovery replays journals and frees slots by ATS: one kind of ATS per volume
    // (checked here), and on a Disk Paxos volume a slot of our own to take the
    // token with.
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    if sb.ats_mode == atsfs::format::ATS_MODE_DISK_PAXOS {
        println!(
            "claiming a slot for this tool (Disk Paxos: test-and-set takes the volume's token; \
             the claim settles for half a lease)..."
        );
    }
    let session = ToolSession::join(&lun, &sb, &registration, clock.clone())?;
    println!(
        "watching the slots in use for {} ms (lease + heartbeat interval) to tell live hosts from dead ones...",
        (lease + interval).as_millis()
    );
    // The watch and the replays, as a spinner on a terminal (`atsfs::progress`).
    let spinner = atsfs::progress::spinner(
        "recovering: watching the slots, replaying journals {spinner} {elapsed}",
    );
    let outcomes = recover_offline(
        session.lun().as_ref(),
        &geo,
        sb.volume_uuid,
        &registration,
        only,
        interval,
        lease,
        clock.as_ref(),
    );
    spinner.finish_and_clear();
    let outcomes = outcomes?;
    // Before the mount below, which claims a slot of its own.
    session.leave()?;
    let mut recovered = 0;
    for (slot, outcome) in outcomes {
        match outcome {
            OfflineOutcome::Recovered => {
                recovered += 1;
                println!("slot {slot}: recovered (journal replayed, slot freed)");
            }
            OfflineOutcome::Live => println!("slot {slot}: live (its heartbeat moves); left alone"),
            OfflineOutcome::Free if only.is_some() => {
                println!("slot {slot}: free, nothing to recover")
            }
            OfflineOutcome::Free => {}
        }
    }
    println!("{recovered} slot(s) recovered");
    // Before the mount below, which registers a key of its own on this initiator.
    drop(registration);
    if recovered > 0 && geo.orphan_start != 0 {
        // Files the dead hosts had unlinked while open: a short-lived mount of our
        // own reclaims the orphan tables of every free slot.
        println!("reclaiming files the recovered hosts had unlinked while open...");
        atsfs::fs::Fs::reclaim_orphans_offline(lun)
            .context("reclaiming orphan tables (the next mount of any host does it too)")?;
        println!("orphan tables reclaimed");
    }
    Ok(())
}

fn open_read_only(device: &Path) -> Result<Arc<dyn Lun>> {
    open_device(device, OpenMode::ReadOnly)
        .with_context(|| format!("opening {}", atsfs::lun::display_name(device)))
}

fn show_status(device: &Path, json: bool, watch_ms: Option<u64>) -> Result<()> {
    let lun = open_read_only(device)?;
    let watch = watch_ms.map(std::time::Duration::from_millis);
    let status = atsfs::inspect::status(&lun, watch)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", atsfs::inspect::render_status(&status));
    }
    Ok(())
}

fn show_locks(device: &Path, json: bool, query: &atsfs::inspect::LockQuery) -> Result<()> {
    let lun = open_read_only(device)?;
    let report = atsfs::inspect::locks(&lun, query)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", atsfs::inspect::render_locks(&report));
    }
    Ok(())
}

/// `atsfs fsck --repair`: 0 nothing to repair, 1 repaired, 4 problems left, 8 could
/// not repair.
fn fsck_repair(device: &Path, json: bool, force: bool) -> u8 {
    let lun = match open_device(device, OpenMode::ReadWrite) {
        Ok(lun) => lun,
        Err(e) => {
            eprintln!(
                "atsfs fsck: cannot open {}: {e}",
                atsfs::lun::display_name(device)
            );
            return 8;
        }
    };
    match atsfs::fsck::repair_device(&lun, force) {
        Ok(done) => {
            for note in &done.notes {
                eprintln!("atsfs fsck --repair: warning: {note}");
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&done).unwrap_or_default()
                );
            } else {
                for line in &done.fixed {
                    println!("repaired: {line}");
                }
                done.after.print();
            }
            done.exit_code()
        }
        Err(e) => {
            eprintln!(
                "atsfs fsck --repair: {}: {e:#}",
                atsfs::lun::display_name(device)
            );
            8
        }
    }
}

/// `atsfs ats-selftest`: exit 0 atomic, 1 the device failed, 2 the test could not run.
fn ats_selftest(device: &Path, sessions: usize, increments: u64, json: bool) -> ExitCode {
    use atsfs::lun::selftest::{self, SelftestOptions};
    let name = atsfs::lun::display_name(device);
    let mut opts = SelftestOptions {
        offset: 0,
        sessions,
        increments,
    };
    if let Err(e) = selftest::check_options(&opts) {
        eprintln!("atsfs ats-selftest: {e}");
        return ExitCode::from(2);
    }
    let first = match open_device(device, OpenMode::ReadWrite) {
        Ok(lun) => lun,
        Err(e) => {
            eprintln!("atsfs ats-selftest: cannot open {name} for writing: {e}");
            return ExitCode::from(2);
        }
    };
    opts.offset = match atsfs::mkfs::selftest_sector(first.as_ref(), false) {
        Ok(offset) => offset,
        Err(e) => {
            eprintln!("atsfs ats-selftest: {e}");
            return ExitCode::from(2);
        }
    };
    // Past a reservation the LUN's volume left: every session registers a tool key
    // (dropped again at the end, unless it came to hold the reservation).
    let registration = match atsfs::cluster::fence::ToolRegistration::new(first.as_ref()) {
        Ok(registration) => registration,
        Err(e) => {
            eprintln!("atsfs ats-selftest: {name}: {e:#}");
            return ExitCode::from(2);
        }
    };
    let offset = opts.offset;
    eprintln!(
        "racing {sessions} sessions x {increments} compare-and-write increments on {name}, \
         scratch sector at byte {offset}..."
    );
    let open = || {
        let session = open_device(device, OpenMode::ReadWrite)?;
        if let (Some(key), Some(pr)) = (registration.key(), session.reservations()) {
            pr.register(key)?;
        }
        Ok(session)
    };
    let mut progress = |done: u64, total: u64| eprintln!("  {done}/{total} increments");
    match selftest::run(&open, &opts, &mut progress) {
        Ok(report) if json => {
            let value = serde_json::json!({ "passed": report.passed(), "report": report });
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            ExitCode::from(if report.passed() { 0 } else { 1 })
        }
        Ok(report) => {
            print_selftest(&report);
            ExitCode::from(if report.passed() { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("atsfs ats-selftest: {name}: {e}");
            ExitCode::from(if e.blames_device() { 1 } else { 2 })
        }
    }
}

fn print_selftest(r: &atsfs::lun::selftest::SelftestReport) {
    println!(
        "ATS self-test of {} ({} ATS, {}-byte sectors), scratch sector at byte {}",
        r.device, r.ats_kind, r.sector_size, r.offset
    );
    println!(
        "  sessions          {} x {} increments",
        r.sessions, r.increments_per_session
    );
    println!(
        "  succeeded         {} compare-and-writes; the counter moved {}",
        r.succeeded, r.counter_moved
    );
    println!("  miscompares seen  {}", r.miscompares);
    if r.lost_replies > 0 {
        println!(
            "  lost replies      {} (the write had landed; counted as successes)",
            r.lost_replies
        );
    }
    println!(
        "  rate              {:.0} CAW/s ({} ms)",
        r.caws_per_s, r.elapsed_ms
    );
    let restored = if r.restored {
        "yes"
    } else {
        "NO: someone else changed it; check the device"
    };
    println!("  sector restored   {restored}");
    if r.passed() {
        println!("passed: COMPARE AND WRITE is atomic on this device");
        return;
    }
    for problem in &r.problems {
        eprintln!("atsfs ats-selftest: FAILED: {problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The daemon reports "ok", later fails: the failure must not reach the fd
    /// number, which by then names another file.
    #[test]
    fn the_ready_pipe_is_written_and_closed_once() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let number = write_end.into_raw_fd();
        let mut ready = ReadyPipe::new(Some(number));
        ready.report("ok");
        // The lowest free number: the pipe's, now closed.
        let scratch = std::env::temp_dir().join(format!("atsfs-ready-{}", std::process::id()));
        let reused = std::fs::File::create(&scratch).unwrap();
        let reused_number = reused.as_raw_fd();
        ready.report("mounting failed");
        let mut text = String::new();
        std::fs::File::from(read_end)
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "ok\n");
        if reused_number == number {
            // Still open (not closed behind its owner's back), and nothing written.
            assert!(reused.metadata().is_ok());
            assert_eq!(std::fs::read(&scratch).unwrap(), b"");
        }
        drop(reused);
        let _ = std::fs::remove_file(&scratch);
    }
}
