//! `umount.fuse.atsfs` and `atsfs umount`: unmount, then wait for the daemon.
//!
//! The kernel detaches a FUSE mount as soon as its own part is done; the atsfs daemon
//! then still commits its journal and releases its heartbeat slot. umount(8) (and
//! with it systemd's mount units at shutdown, `umount; fsck`, `umount; detach the
//! LUN`) must not return before that. umount(8) runs `/sbin/umount.fuse.atsfs DIR
//! [-nlfvr] [-N NS]` for a mount of type `fuse.atsfs` (it tries `umount.fuse.atsfs`,
//! then `umount.fuse`; the helper's exit status is umount's). This helper finds the
//! daemon serving DIR, unmounts, and waits until that process is gone.

use clap::Parser;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// umount(8)'s exit codes.
const UMOUNT_USAGE: u8 = 1;
const UMOUNT_FAILED: u8 = 32;

/// The lease when the daemon does not say (mkfs's default is far shorter).
const LEASE_UNKNOWN: Duration = Duration::from_secs(30);
/// How long to wait for the daemon's answer to the pid question.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// After a lazy unmount: how long the daemon may take before the helper leaves it
/// serving the files still open under the detached mount.
const LAZY_WAIT: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "umount.fuse.atsfs",
    bin_name = "umount.fuse.atsfs",
    version,
    about = "Unmount an atsfs mount and wait until its daemon has written everything home",
    long_about = "Unmount an atsfs mount: the helper umount(8) runs for a mount of type \
                  fuse.atsfs (`umount DIR`, systemd's mount units, umount -a). It unmounts, \
                  then waits until the mount daemon serving DIR has committed its journal, \
                  released its heartbeat slot and exited, so that the volume is clean when \
                  umount returns: `umount DIR; fsck DEVICE`, a shutdown that takes the \
                  network or the iSCSI session away after the mount unit stops, and \
                  `atsfs status` right after see no live slot of this host.\n\n\
                  It prints a line when the daemon takes longer than a second, and gives \
                  up after twice the volume's lease plus 30 seconds (exit 32: the mount is \
                  gone, the daemon still writing; should it die before it finishes, the \
                  other hosts recover its slot from its journal). `atsfs umount DIR` does \
                  the same.",
    after_long_help = "Exit status (umount(8)'s): 0 unmounted and the daemon done, 1 bad \
                       usage, 32 the unmount failed (busy, not mounted, not atsfs), or the \
                       daemon failed while writing home or did not finish in time (the \
                       reason is printed; the daemon's log is /var/log/atsfs.log unless \
                       log= said otherwise).\n\n\
                       See also: atsfs(8), atsfs-umount(8), mount.atsfs(8), umount(8), \
                       systemd.mount(5)."
)]
pub(crate) struct UmountHelper {
    /// The mount point.
    dir: PathBuf,
    /// Do not write /etc/mtab (umount -n): accepted; there is none to write.
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Lazy (umount -l): detach now; the daemon keeps serving files still open under
    /// the mount and writes back and leaves when the last is closed. Waits a few
    /// seconds for it, then returns.
    #[arg(short = 'l')]
    lazy: bool,
    /// Force (umount -f): abort the FUSE connection, failing requests in flight;
    /// the daemon still commits what it has and releases its slot (waited for).
    #[arg(short = 'f')]
    force: bool,
    /// Verbose: say what is done and how long the daemon took.
    #[arg(short = 'v')]
    verbose: bool,
    /// Remount read-only if the unmount fails (umount -r): accepted; a busy atsfs
    /// mount stays as it is.
    #[arg(short = 'r')]
    read_only: bool,
    /// The type (umount(8) passes it when the helper's name does not carry it).
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    /// Unmount in another mount namespace (umount -N): not supported.
    #[arg(short = 'N', value_name = "NS")]
    namespace: Option<String>,
}

/// What to do: the helper's and `atsfs umount`'s flags.
pub(crate) struct Request<'a> {
    pub dir: &'a Path,
    pub lazy: bool,
    pub force: bool,
    pub verbose: bool,
    /// The name messages start with.
    pub name: &'a str,
    /// Run by umount(8) (`umount.fuse.atsfs`), which updates /run/mount/utab itself;
    /// else (`atsfs umount`) the entry `record_helper` made is dropped here.
    pub by_umount8: bool,
}

/// `umount.fuse.atsfs`: umount(8)'s exit codes.
pub(crate) fn helper_main() -> ExitCode {
    crate::init_tracing("warn");
    let name = "umount.fuse.atsfs";
    let args = match UmountHelper::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { UMOUNT_USAGE } else { 0 });
        }
    };
    if let Some(fstype) = &args.fstype {
        if fstype != "atsfs" && fstype != "fuse.atsfs" {
            eprintln!("{name}: type {fstype} is not atsfs");
            return ExitCode::from(UMOUNT_USAGE);
        }
    }
    if args.namespace.is_some() {
        eprintln!("{name}: -N (unmount in another namespace) is not supported");
        return ExitCode::from(UMOUNT_USAGE);
    }
    ExitCode::from(unmount(&Request {
        dir: &args.dir,
        lazy: args.lazy,
        force: args.force,
        verbose: args.verbose,
        name,
        by_umount8: true,
    }))
}

/// A mount as /proc/self/mountinfo shows it.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    fstype: String,
    source: String,
    /// The superblock's device number (kernel encoding): a FUSE mount's connection
    /// in /sys/fs/fuse/connections.
    dev: Option<u64>,
}

/// The last mount on `dir` in a mountinfo text (the one a umount of `dir` removes).
fn find_mount(mountinfo: &str, dir: &Path) -> Option<MountEntry> {
    let want = dir.as_os_str().as_encoded_bytes();
    mountinfo.lines().rev().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - type source ...
        let (head, tail) = line.split_once(" - ")?;
        let point = head.split(' ').nth(4)?;
        if atsfs::fuse::unescape_mountinfo(point) != want {
            return None;
        }
        let dev = head.split(' ').nth(2).and_then(|d| {
            let (major, minor) = d.split_once(':')?;
            Some((major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?)
        });
        let mut fields = tail.split(' ');
        let fstype = fields.next()?.to_string();
        let source = fields.next().unwrap_or("");
        let source = String::from_utf8_lossy(&atsfs::fuse::unescape_mountinfo(source)).into();
        Some(MountEntry {
            fstype,
            source,
            dev,
        })
    })
}

/// The daemon serving the mount, as it describes itself.
#[derive(Debug)]
struct Daemon {
    pid: i32,
    /// /proc/PID/stat's start time: tells the daemon from a later process that got
    /// its pid.
    start: Option<u64>,
    lease: Option<Duration>,
    /// The heartbeat slot it says it holds (its stats).
    slot: Option<u32>,
    /// Whether it answered.
    health: Health,
    /// Its stderr when that is a file (the log), with its length before the unmount.
    log: Option<(PathBuf, u64)>,
}

/// How the daemon responded before the unmount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    /// It answered (or the question failed at once).
    Answering,
    /// Stopped (SIGSTOP, a debugger: /proc state T or t): not asked.
    Stopped,
    /// It did not answer within `ASK_TIMEOUT`.
    Silent,
}

/// True when `pid` is stopped (SIGSTOP or traced).
fn stopped(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state == 'T' || state == 't')
}

/// The state letter and start time (field 22) of /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; fields follow it.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 (state) is fields[0], so field 22 is fields[19].
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// True while the daemon runs (a zombie has done all it will do).
fn running(daemon: &Daemon) -> bool {
    match proc_stat(daemon.pid) {
        Some((state, start)) => {
            state != 'Z' && state != 'X' && daemon.start.is_none_or(|s| s == start)
        }
        None => false,
    }
}

/// What the daemon says of itself in its stats.
struct Answer {
    pid: i32,
    lease: Option<Duration>,
    slot: Option<u32>,
}

/// The pid, lease and slot the daemon reports in its stats (the `user.atsfs.stats`
/// xattr of the mount's root). Asked by a child process (`atsfs stats --json DIR`):
/// a request to a daemon that does not answer pins the mount (umount2 fails with
/// EBUSY while it waits), and a child can be killed after `ASK_TIMEOUT`, which
/// ends a request the daemon has not read yet. Err(Silent) when it did not answer.
fn ask_daemon(dir: &Path) -> Result<Answer, Health> {
    use std::io::Read;
    let exe = std::env::current_exe().map_err(|_| Health::Answering)?;
    let mut command = std::process::Command::new(exe);
    std::os::unix::process::CommandExt::arg0(&mut command, "atsfs");
    let mut child = command
        .args([std::ffi::OsStr::new("stats"), "--json".as_ref()])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|_| Health::Answering)?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < ASK_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                // Reaped when it has died (its request had not been read); else
                // left to init (an abort of the connection ends the request).
                std::thread::sleep(Duration::from_millis(50));
                let _ = child.try_wait();
                return Err(Health::Silent);
            }
        }
    }
    let mut raw = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut raw);
    }
    let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| Health::Answering)?;
    let pid = v
        .get("pid")
        .and_then(|p| p.as_u64())
        .and_then(|p| i32::try_from(p).ok())
        .ok_or(Health::Answering)?;
    let lease = v
        .get("lease_ms")
        .and_then(|l| l.as_u64())
        .map(Duration::from_millis);
    let slot = v
        .get("slot")
        .and_then(|s| s.as_u64())
        .and_then(|s| u32::try_from(s).ok());
    Ok(Answer { pid, lease, slot })
}

/// The `atsfs mount` processes whose mount point argument is `dir` (relative ones
/// taken from the process's working directory).
fn scan_daemons(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if is_daemon_for(pid, dir) {
            found.push(pid);
        }
    }
    found
}

/// The mount point argument of `pid` when it is an `atsfs mount ... DIR` process.
fn daemon_mountpoint(pid: i32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    let program = Path::new(std::ffi::OsStr::from_bytes(args.first()?));
    if program.file_name()? != "atsfs" || args.get(1) != Some(&&b"mount"[..]) {
        return None;
    }
    // The mount point is the last argument (`atsfs mount [options] [--] DEVICE DIR`).
    let given = Path::new(std::ffi::OsStr::from_bytes(args.last()?));
    if given.is_absolute() {
        return Some(given.to_path_buf());
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    Some(cwd.join(given))
}

/// True when `pid` is an `atsfs mount ... DIR` process whose DIR is `dir`.
fn is_daemon_for(pid: i32, dir: &Path) -> bool {
    daemon_mountpoint(pid).is_some_and(|p| lexical_normal(&p) == lexical_normal(dir))
}

/// `path` without `.` components, `..` taken back and trailing slashes dropped,
/// without asking the filesystem (a stat under a FUSE mount goes to its daemon).
fn lexical_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Finds the daemon serving the mount on `dir`: the one `atsfs mount` process
/// whose mount point is `dir`, not asked when it is stopped; else (none found,
/// several, or in another pid namespace) the pid it reports itself.
fn find_daemon(dir: &Path) -> Option<Daemon> {
    let scanned = match scan_daemons(dir)[..] {
        [pid] => Some(pid),
        _ => None,
    };
    let (pid, lease, slot, health) = match scanned {
        Some(pid) if stopped(pid) => (pid, None, None, Health::Stopped),
        _ => match ask_daemon(dir) {
            // An `atsfs mount` process (its DIR may be another path to the same
            // directory); in another pid namespace the number names someone else.
            Ok(a) if daemon_mountpoint(a.pid).is_some() => {
                (a.pid, a.lease, a.slot, Health::Answering)
            }
            Ok(_) => (scanned?, None, None, Health::Answering),
            Err(health) => (scanned?, None, None, health),
        },
    };
    let log = std::fs::read_link(format!("/proc/{pid}/fd/2"))
        .ok()
        .filter(|p| p.is_absolute())
        .and_then(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            meta.is_file().then_some((p, meta.len()))
        });
    Some(Daemon {
        pid,
        start: proc_stat(pid).map(|(_, start)| start),
        lease,
        slot,
        health,
        log,
    })
}

/// What the daemon `pid` wrote to its log after `from` as its last words: the line
/// `atsfs[PID]: ...` main prints when the daemon ends with an error. Only lines
/// naming the pid count: every mount logs to /var/log/atsfs.log by default.
fn last_words(log: &Path, from: u64, pid: i32) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    let read = std::fs::File::open(log).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        // At most the last MiB matters.
        f.take(1 << 20).read_to_end(&mut bytes)
    });
    if read.is_err() {
        return Vec::new();
    }
    failures_in(&String::from_utf8_lossy(&bytes), pid)
}

fn failures_in(text: &str, pid: i32) -> Vec<String> {
    let tag = format!("atsfs[{pid}]: ");
    text.lines()
        .filter(|l| l.starts_with(&tag))
        .map(str::to_string)
        .collect()
}

/// The heartbeat slot a daemon holds, as read from the device before the unmount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    slot: u32,
    generation: u32,
    host_uuid: [u8; 16],
}

/// What became of the daemon's slot after it exited.
#[derive(Debug, PartialEq, Eq)]
enum SlotFate {
    /// Released (FREE).
    Released,
    /// Still LIVE under the daemon's host and generation: not written home.
    StillLive,
    /// Recovered, or claimed again, by a host (this one or another): the daemon did
    /// not release it itself.
    TakenOver(String),
}

/// This process's PID namespace, as the heartbeat records it (the inode of
/// /proc/self/ns/pid); 0 when unknown.
fn pid_namespace() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok())
        .unwrap_or(0)
}

/// The volume on `source`, opened read-only: its geometry.
fn open_volume(
    source: &str,
) -> Result<(std::sync::Arc<dyn atsfs::lun::Lun>, atsfs::format::Geometry), String> {
    let lun = atsfs::lun::open_device(Path::new(source), atsfs::lun::OpenMode::ReadOnly)
        .map_err(|e| format!("opening {source}: {e}"))?;
    let sb = atsfs::fs::read_superblock(lun.as_ref())
        .map_err(|e| format!("reading the superblock of {source}: {e:#}"))?;
    Ok((lun, atsfs::format::Geometry::from_superblock(&sb)))
}

/// The slot the daemon `pid` holds on `source`: the one its stats named, else the
/// held slot whose owner is `pid` of this kernel and pid namespace.
fn held_slot(source: &str, pid: i32, named: Option<u32>) -> Result<Option<Held>, String> {
    let (lun, geo) = open_volume(source)?;
    let boot = atsfs::cluster::boot_id().ok();
    let ns = pid_namespace();
    let slots: Vec<u32> = match named {
        Some(slot) => vec![slot],
        None => (0..geo.max_hosts).collect(),
    };
    for slot in slots {
        let image = match atsfs::cluster::read_slot(lun.as_ref(), &geo, slot) {
            Ok((_, Some(image))) => image,
            Ok((_, None)) => continue,
            Err(e) if named.is_some() => return Err(format!("{e:#}")),
            Err(_) => continue,
        };
        if image.state == atsfs::format::SLOT_FREE {
            continue;
        }
        let owner = u32::try_from(pid).is_ok_and(|p| p == image.owner_pid)
            && image.owner_pid_ns == ns
            && boot.is_some_and(|b| b == image.boot_id);
        if named.is_some() || owner {
            return Ok(Some(Held {
                slot,
                generation: image.generation,
                host_uuid: image.host_uuid,
            }));
        }
    }
    Ok(None)
}

/// What became of `held` on `source`.
fn slot_fate(source: &str, held: &Held) -> Result<SlotFate, String> {
    let (lun, geo) = open_volume(source)?;
    let image = match atsfs::cluster::read_slot(lun.as_ref(), &geo, held.slot) {
        Ok((_, Some(image))) => image,
        Ok((_, None)) => return Err(format!("slot {} reads as never used", held.slot)),
        Err(e) => return Err(format!("{e:#}")),
    };
    Ok(judge_slot(held, &image))
}

fn judge_slot(held: &Held, now: &atsfs::format::HeartbeatSlot) -> SlotFate {
    use atsfs::format::{SLOT_FREE, SLOT_LIVE};
    let same = now.generation == held.generation && now.host_uuid == held.host_uuid;
    match now.state {
        SLOT_FREE => SlotFate::Released,
        SLOT_LIVE if same => SlotFate::StillLive,
        SLOT_LIVE => SlotFate::TakenOver(format!(
            "claimed again (generation {}) by host {}",
            now.generation,
            atsfs::cluster::HostUuid(now.host_uuid)
        )),
        _ => SlotFate::TakenOver(format!(
            "being recovered by the host in slot {}",
            now.recoverer_slot
        )),
    }
}

/// Unmounts `dir` and waits for its daemon; umount(8)'s exit code.
pub(crate) fn unmount(request: &Request) -> u8 {
    let name = request.name;
    // As mountinfo shows it (umount(8) passes that already; `atsfs umount` may get
    // a relative path or one through a symlink).
    let dir = canonical_mountpoint(request.dir).unwrap_or_else(|| request.dir.to_path_buf());
    let shown = dir.display();
    let mountinfo = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{name}: reading /proc/self/mountinfo: {e}");
            return UMOUNT_FAILED;
        }
    };
    let Some(entry) = find_mount(&mountinfo, &dir) else {
        eprintln!("{name}: {shown}: not mounted");
        return UMOUNT_FAILED;
    };
    if entry.fstype != "fuse.atsfs" && request.by_umount8 {
        // Sent here by a stale `helper=fuse.atsfs` in utab: unmount as umount would.
        return match detach(&dir, request, None, None) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{name}: {shown}: {e}");
                UMOUNT_FAILED
            }
        };
    }
    if entry.fstype != "fuse.atsfs" {
        eprintln!(
            "{name}: {shown} is not an atsfs mount (type {}); use umount",
            entry.fstype
        );
        return UMOUNT_FAILED;
    }
    let daemon = find_daemon(&dir);
    // The daemon's slot as it is now, to tell after it exits whether it released it.
    let held = daemon
        .as_ref()
        .map(|d| held_slot(&entry.source, d.pid, d.slot));
    if request.verbose {
        match &daemon {
            Some(d) => eprintln!(
                "{name}: {shown} is served by the atsfs daemon pid {}",
                d.pid
            ),
            None => eprintln!("{name}: no atsfs daemon found for {shown}"),
        }
    }
    let hung = daemon
        .as_ref()
        .filter(|d| d.health != Health::Answering)
        .map(|d| (d.pid, d.health));
    if let Some((pid, health)) = hung {
        eprintln!(
            "{name}: the atsfs daemon (pid {pid}) {}",
            hung_words(health)
        );
    }
    if let Err(e) = detach(&dir, request, hung, entry.dev) {
        eprintln!("{name}: {shown}: {e}");
        return UMOUNT_FAILED;
    }
    if request.verbose {
        eprintln!("{name}: {shown} unmounted");
    }
    if !request.by_umount8 {
        forget_helper(&dir);
    }
    let (Some(daemon), Some(held)) = (daemon, held) else {
        eprintln!(
            "{name}: note: could not find the atsfs daemon serving {shown} (it had \
             exited, or runs in another pid namespace): unmounted only, without waiting \
             for it to write back. `atsfs status {}` shows whether its slot is still \
             live; if it is gone, the other hosts recover that slot from its journal",
            entry.source
        );
        return 0;
    };
    let status = wait_for(&daemon, held, &dir, &entry.source, request);
    if status != 0 && request.by_umount8 {
        // The mount is gone, but umount(8) keeps its utab entry when its helper
        // fails: drop it here, or it stays behind for a mount that no longer exists.
        forget_helper(&dir);
    }
    status
}

/// The helper option `record_helper` puts in /run/mount/utab.
const UTAB_HELPER: &str = "helper=fuse.atsfs";
const UTAB: &str = "/run/mount/utab";

/// Makes umount(8) run umount.fuse.atsfs for the mount on `dir` (as root).
///
/// As root, umount(8) learns the type of `umount DIR` from statfs(2), which says
/// `fuse` for every FUSE mount, and then looks for /sbin/umount.fuse; it reads
/// mountinfo (type `fuse.atsfs`) only when /run/mount/utab has an entry for DIR
/// (systemd's `umount -c`, -l and -f read it always). So the mount gets an entry
/// with `helper=fuse.atsfs`, which sends every unmount of it to umount.fuse.atsfs
/// ("helper=" in umount(8)). libmount writes it: `mount --fake --internal-only`
/// records a mount in utab without mounting or running a helper. umount(8) drops
/// the entry when the helper succeeds; otherwise `forget_helper` does.
pub(crate) fn record_helper(dir: &Path) {
    if !nix::unistd::geteuid().is_root() {
        // A user's mount: umount(8) reads mountinfo for it anyway.
        return;
    }
    let Some(target) = canonical_mountpoint(dir) else {
        return;
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(entry) = find_mount(&mountinfo, &target) else {
        tracing::warn!("{} is not in /proc/self/mountinfo", target.display());
        return;
    };
    if entry.fstype != "fuse.atsfs" {
        return;
    }
    // Entries of earlier mounts on `target` that nobody dropped (a crashed daemon).
    forget_helper(&target);
    let out = std::process::Command::new("mount")
        .args(["--fake", "--internal-only", "--no-canonicalize"])
        .args(["-t", "fuse.atsfs", "-o", UTAB_HELPER])
        .arg(&entry.source)
        .arg(&target)
        .stdin(std::process::Stdio::null())
        .output();
    let failed = match out {
        Ok(out) if out.status.success() => return,
        Ok(out) => format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => e.to_string(),
    };
    tracing::warn!(
        "could not record the unmount helper in {UTAB} ({failed}): `umount {}` may          return before the daemon has written everything home; `atsfs umount` waits",
        target.display()
    );
}

/// Drops the utab entries `record_helper` made for `dir`: after `atsfs umount`, after
/// a helper run that failed once the mount was gone (umount(8) then keeps the entry),
/// and before a new entry for `dir` (stale ones of earlier mounts there). The mount
/// is no longer in mountinfo by then, so `umount --fake` would not find it: the
/// file is rewritten here, under libmount's lock (`flock` of utab.lock), as
/// libmount itself updates it (a new file renamed over the old).
fn forget_helper(dir: &Path) {
    if let Err(e) = rewrite_utab(dir) {
        tracing::debug!("could not drop the utab entry of {}: {e}", dir.display());
    }
}

fn rewrite_utab(dir: &Path) -> std::io::Result<()> {
    let utab = Path::new(UTAB);
    if !utab.exists() {
        return Ok(());
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{UTAB}.lock"))?;
    // Released when `lock` is closed.
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))
        .and_then(|_locked| {
            let text = std::fs::read_to_string(utab)?;
            let target = format!("TARGET={} ", mangle(dir));
            let ours = |l: &str| l.contains(&target) && l.contains(UTAB_HELPER);
            if !text.lines().any(ours) {
                return Ok(());
            }
            let kept: String = text
                .lines()
                .filter(|l| !ours(l))
                .map(|l| format!("{l}\n"))
                .collect();
            let tmp = format!("{UTAB}.atsfs-{}", std::process::id());
            std::fs::write(&tmp, kept)?;
            std::fs::rename(&tmp, utab)
        })
}

/// A path as libmount writes it in utab: space, tab, newline and backslash as
/// `\ooo`.
fn mangle(path: &Path) -> String {
    let mut out = Vec::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.extend(format!("\\{b:03o}").bytes()),
            _ => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The absolute path of mount point `dir` as the kernel shows it (its parent
/// resolved; the mount point itself not statted: that would ask the daemon).
fn canonical_mountpoint(dir: &Path) -> Option<PathBuf> {
    let absolute = lexical_normal(&std::path::absolute(dir).ok()?);
    let parent = absolute.parent()?;
    let name = absolute.file_name()?;
    Some(std::fs::canonicalize(parent).ok()?.join(name))
}

/// What a hung daemon is doing, after "the atsfs daemon (pid N)".
fn hung_words(health: Health) -> &'static str {
    match health {
        Health::Stopped => "is stopped (SIGSTOP or a debugger; `kill -CONT` it to let it go on)",
        _ => "does not answer (hung)",
    }
}

/// Aborts the FUSE connection `dev` (/sys/fs/fuse/connections/DEV/abort): every
/// request to the daemon fails at once, and the processes waiting in one (and
/// pinning the mount) go on.
fn abort_connection(dev: u64) -> Result<(), String> {
    let path = format!("/sys/fs/fuse/connections/{dev}/abort");
    std::fs::write(&path, b"1").map_err(|e| format!("writing {path}: {e}"))
}

/// umount2 (as root) or fusermount -u (a user's own mount). `hung`: the daemon's pid
/// and state when it is stopped or silent; with -f its connection is aborted first.
fn detach(
    dir: &Path,
    request: &Request,
    hung: Option<(i32, Health)>,
    dev: Option<u64>,
) -> Result<(), String> {
    let mut flags = nix::mount::MntFlags::empty();
    if request.lazy {
        flags |= nix::mount::MntFlags::MNT_DETACH;
    }
    if request.force {
        flags |= nix::mount::MntFlags::MNT_FORCE;
        if let (Some(_), Some(dev)) = (hung, dev) {
            if let Err(e) = abort_connection(dev) {
                tracing::warn!("{e}; unmounting with MNT_FORCE only");
            }
        }
    }
    // After an abort (MNT_FORCE aborts a FUSE connection too), the processes that
    // waited on the daemon let go of the mount a moment later.
    let tries = if request.force { 20 } else { 1 };
    let mut result = nix::mount::umount2(dir, flags);
    for _ in 1..tries {
        if result != Err(nix::errno::Errno::EBUSY) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        result = nix::mount::umount2(dir, flags);
    }
    match result {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) if !nix::unistd::geteuid().is_root() => {
            fusermount(dir, request.lazy)
        }
        Err(nix::errno::Errno::EBUSY) => Err(match hung {
            Some((pid, health)) if !request.force => format!(
                "target is busy: the atsfs daemon (pid {pid}) {}, and processes wait on \
                 it; -f (umount -f) aborts its connection, failing their requests",
                hung_words(health)
            ),
            _ => "target is busy (files are open under it: `fuser -vm DIR` shows who; \
                  umount -l detaches it anyway)"
                .into(),
        }),
        Err(nix::errno::Errno::EINVAL) => Err("not mounted".into()),
        Err(e) => Err(format!("umount failed: {}", e.desc())),
    }
}

/// A user's own FUSE mount: fusermount3 -u (or fusermount), which checks the user
/// may.
fn fusermount(dir: &Path, lazy: bool) -> Result<(), String> {
    for program in ["fusermount3", "fusermount"] {
        let mut command = std::process::Command::new(program);
        command.arg("-u");
        if lazy {
            command.arg("-z");
        }
        match command.arg(dir).status() {
            Ok(status) if status.success() => return Ok(()),
            Ok(status) => return Err(format!("{program} -u failed ({status})")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("running {program}: {e}")),
        }
    }
    Err("must be superuser to unmount (and no fusermount3 to unmount as a user)".into())
}

/// Waits for the daemon to exit: 0 done, 32 it failed or took too long.
fn wait_for(
    daemon: &Daemon,
    held: Result<Option<Held>, String>,
    dir: &Path,
    source: &str,
    request: &Request,
) -> u8 {
    let name = request.name;
    let pid = daemon.pid;
    let lease = daemon.lease.unwrap_or(LEASE_UNKNOWN);
    let bound = if request.lazy {
        LAZY_WAIT
    } else {
        lease * 2 + Duration::from_secs(30)
    };
    let log_hint = daemon
        .log
        .as_ref()
        .map(|(p, _)| format!("; its log is {}", p.display()))
        .unwrap_or_default();
    let start = Instant::now();
    let mut said = false;
    while running(daemon) {
        if stopped(pid) && !request.lazy {
            eprintln!(
                "{name}: the mount is gone, but the atsfs daemon (pid {pid}) {}: it \
                 cannot write back and release its slot until it is continued. Killed \
                 instead, the other hosts (or `atsfs recover {source}`) recover its slot \
                 from its journal after the lease: what it had committed stays{log_hint}",
                hung_words(Health::Stopped)
            );
            return UMOUNT_FAILED;
        }
        let waited = start.elapsed();
        if !said && waited >= Duration::from_secs(1) && !request.lazy {
            eprintln!(
                "{name}: waiting for the atsfs daemon (pid {pid}) to write back and release \
                 its slot..."
            );
            said = true;
        }
        if waited >= bound {
            if request.lazy {
                eprintln!(
                    "{name}: {} is detached; the atsfs daemon (pid {pid}) keeps serving the \
                     files still open under it, and writes everything back and releases its \
                     slot when the last one is closed",
                    dir.display()
                );
                return 0;
            }
            eprintln!(
                "{name}: the mount is gone, but the atsfs daemon (pid {pid}) has not \
                 finished writing back after {} s (twice the lease + 30 s){log_hint}. It \
                 keeps going: wait for it before detaching {source}. If it dies or is \
                 killed first, the other hosts (or `atsfs recover {source}`) recover its \
                 slot from its journal: what it had committed stays, the rest is lost",
                bound.as_secs()
            );
            return UMOUNT_FAILED;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log_name = daemon
        .log
        .as_ref()
        .map(|(p, _)| p.display().to_string())
        .unwrap_or_else(|| "its log (/var/log/atsfs.log unless log= said otherwise)".into());
    let words = daemon
        .log
        .as_ref()
        .map(|(log, from)| last_words(log, *from, pid))
        .unwrap_or_default();
    let fate = match held {
        Ok(Some(held)) => Some((held.slot, slot_fate(source, &held))),
        Ok(None) => None,
        Err(e) => Some((u32::MAX, Err(e))),
    };
    if let Some((slot, Ok(SlotFate::StillLive))) = &fate {
        eprintln!(
            "{name}: the atsfs daemon (pid {pid}) exited without releasing slot {slot}: \
             its last changes may not be written home; other hosts will recover its \
             journal after the lease (`atsfs recover {source}` when no other host is up); \
             see {log_name}"
        );
        for line in &words {
            eprintln!("  {line}");
        }
        return UMOUNT_FAILED;
    }
    if !words.is_empty() {
        eprintln!("{name}: the atsfs daemon (pid {pid}) failed while unmounting; {log_name} says:");
        for line in &words {
            eprintln!("  {line}");
        }
        return UMOUNT_FAILED;
    }
    let took = start.elapsed().as_millis();
    match &fate {
        Some((slot, Ok(SlotFate::TakenOver(what)))) => eprintln!(
            "{name}: the atsfs daemon (pid {pid}) exited without releasing slot {slot} \
             itself: it is {what} (its lease had run out); see {log_name}"
        ),
        Some((_, Err(e))) => eprintln!(
            "{name}: the atsfs daemon (pid {pid}) exited ({took} ms after the unmount), \
             but whether it released its slot could not be checked: {e}; `atsfs status \
             {source}` shows it"
        ),
        None if request.verbose || said => eprintln!(
            "{name}: the atsfs daemon (pid {pid}) exited without an error ({took} ms after \
             the unmount); its slot was not found to check"
        ),
        Some((slot, Ok(_))) if request.verbose || said => eprintln!(
            "{name}: the atsfs daemon (pid {pid}) wrote back, released slot {slot} and \
             exited ({took} ms after the unmount)"
        ),
        _ => {}
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_of_umount8_parse() {
        // As umount(8) calls a helper: the target, then flags.
        let a = UmountHelper::try_parse_from([
            "umount.fuse.atsfs",
            "/mnt/a b",
            "-n",
            "-l",
            "-f",
            "-v",
            "-r",
            "-t",
            "fuse.atsfs",
        ])
        .unwrap();
        assert!(a.no_mtab && a.lazy && a.force && a.verbose && a.read_only);
        assert_eq!(a.dir, Path::new("/mnt/a b"));
        assert_eq!(a.fstype.as_deref(), Some("fuse.atsfs"));
        let a = UmountHelper::try_parse_from(["umount.fuse.atsfs", "/m", "-N", "/proc/1/ns/mnt"])
            .unwrap();
        assert!(a.namespace.is_some() && !a.lazy);
        assert!(UmountHelper::try_parse_from(["umount.fuse.atsfs"]).is_err());
        UmountHelper::command().debug_assert();
    }

    #[test]
    fn the_last_mount_on_a_path_is_found_with_type_and_source() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /mnt/a\\040b rw,nosuid - fuse.atsfs /tmp/x\\040y.img rw,user_id=0
41 22 0:51 / /mnt/c rw - tmpfs tmpfs rw
42 40 0:52 / /mnt/a\\040b rw,nosuid shared:7 - fuse.atsfs /dev/sdb rw,user_id=0
";
        let e = find_mount(info, Path::new("/mnt/a b")).unwrap();
        assert_eq!(e.fstype, "fuse.atsfs");
        assert_eq!(e.source, "/dev/sdb");
        assert_eq!(
            find_mount(info, Path::new("/mnt/c")).unwrap().fstype,
            "tmpfs"
        );
        assert!(find_mount(info, Path::new("/mnt")).is_none());
    }

    #[test]
    fn utab_paths_are_mangled_as_libmount_does() {
        assert_eq!(mangle(Path::new("/mnt/a b\\c")), "/mnt/a\\040b\\134c");
        assert_eq!(mangle(Path::new("/mnt/plain")), "/mnt/plain");
    }

    #[test]
    fn paths_are_normalised_without_the_filesystem() {
        assert_eq!(
            lexical_normal(Path::new("/a/./b/../c/")),
            Path::new("/a/c").to_path_buf()
        );
    }

    #[test]
    fn only_this_daemons_last_words_count() {
        // Two daemons share the log: the other one's failure is not ours.
        let log = "2026-12-06T10:00:00Z  INFO atsfs: unmounted /m\n\
                   2026-12-06T10:00:00Z ERROR atsfs::fs: journal write failed\n\
                   atsfs[41]: unmount could not write everything home: EIO\n\
                   atsfs[4]: mounting /dev/sdc: no such device\n\
                   atsfs: an old daemon's line\n\
                   2026-12-06T10:00:00Z  WARN atsfs: slow\n";
        let f = failures_in(log, 41);
        assert_eq!(
            f,
            ["atsfs[41]: unmount could not write everything home: EIO"]
        );
        assert!(failures_in(log, 7).is_empty());
        assert!(failures_in("2026 INFO atsfs: unmounted /m\n", 41).is_empty());
    }

    #[test]
    fn a_slot_still_live_under_the_daemons_generation_was_not_released() {
        use atsfs::format::{HeartbeatSlot, SLOT_FREE, SLOT_LIVE, SLOT_RECOVERING};
        let held = Held {
            slot: 3,
            generation: 7,
            host_uuid: [9; 16],
        };
        let image = |state, generation, host_uuid| HeartbeatSlot {
            slot: 3,
            state,
            generation,
            host_uuid,
            ..bytemuck::Zeroable::zeroed()
        };
        assert_eq!(
            judge_slot(&held, &image(SLOT_LIVE, 7, [9; 16])),
            SlotFate::StillLive
        );
        assert_eq!(
            judge_slot(&held, &image(SLOT_FREE, 7, [9; 16])),
            SlotFate::Released
        );
        assert!(matches!(
            judge_slot(&held, &image(SLOT_LIVE, 8, [5; 16])),
            SlotFate::TakenOver(_)
        ));
        assert!(matches!(
            judge_slot(&held, &image(SLOT_RECOVERING, 7, [9; 16])),
            SlotFate::TakenOver(_)
        ));
    }

    #[test]
    fn this_process_is_running_and_a_gone_one_is_not() {
        let me = std::process::id() as i32;
        let start = proc_stat(me).map(|(_, s)| s);
        assert!(start.is_some());
        let daemon = |start| Daemon {
            pid: me,
            start,
            lease: None,
            slot: None,
            health: Health::Answering,
            log: None,
        };
        assert!(running(&daemon(start)));
        // Another process that got the pid later: not the daemon.
        assert!(!running(&daemon(start.map(|s| s + 1))));
        assert!(!is_daemon_for(me, Path::new("/nowhere")));
    }
}
