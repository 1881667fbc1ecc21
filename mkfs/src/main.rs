//! mkfs.atsfs: lay out a fresh atsfs volume on a LUN or an image file.
//!
//! Refuses (exit 1) a device that hosts are using now — even with `-f` — and, without
//! `-f`, a device that holds an atsfs volume or another filesystem's signature.
//! `--ats` chooses the volume's test-and-set (`ats.rs`).
//! Exit codes: 0 done, 1 refused or bad input, 2 I/O error.

use atsfs::format::{
    paxos_blocks_for, Superblock, ATS_MODE_DISK_PAXOS, ATS_MODE_EMULATED, BLOCK_SIZE_U64,
};
use atsfs::lun::{device_kind, open_device, DeviceKind, Lun, LunError, OpenMode};
use atsfs::mkfs::{
    live_hosts, mkfs, plan_for, probe, slots_marked_live, validate_options, MkfsError, MkfsOptions,
    Probe, LEASE_MAX,
};
use atsfs::units::format_size;
use clap::Parser;
use indicatif::ProgressBar;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod ats;
mod cli;

pub(crate) use cli::Args;

/// Volumes with at least this many allocation groups get a progress bar.
const PROGRESS_AGS_MIN: u64 = 1024;
/// The ATS sector `FileLun` gives an image file.
const IMAGE_SECTOR_BYTES: u32 = 512;
/// Extra time to watch heartbeats beyond two intervals, for I/O latency.
const WATCH_MARGIN: Duration = Duration::from_millis(200);

/// Why mkfs.atsfs stopped; each message says what to do next.
#[derive(Debug)]
enum Failure {
    /// Refused or bad input: exit 1.
    Refused(String),
    /// The device failed: exit 2.
    Io(String),
}

impl From<MkfsError> for Failure {
    fn from(err: MkfsError) -> Self {
        if err.is_io() {
            Failure::Io(err.to_string())
        } else {
            Failure::Refused(err.to_string())
        }
    }
}

fn main() -> ExitCode {
    init_tracing();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            // clap exits with 2 for bad usage; 2 means an I/O error here.
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 1 } else { 0 });
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(message)) => {
            eprintln!("mkfs.atsfs: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Io(message)) => {
            eprintln!("mkfs.atsfs: {message}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn options(args: &Args) -> MkfsOptions {
    MkfsOptions {
        label: args.label.clone(),
        max_hosts: args.max_hosts,
        journal_bytes: args.journal_size,
        heartbeat_interval: args.heartbeat_interval,
        lease: args.lease,
        // Chosen once the device is known (`ats::choose_ats`).
        ats_mode: ATS_MODE_EMULATED,
        volume_uuid: None,
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let mut opts = options(args);
    validate_options(&opts)?;
    let path = &args.device;
    // An iscsi:// URL names a LUN that exists (or fails to open with its own error).
    let exists = device_kind(path) == DeviceKind::Iscsi
        || path.try_exists().map_err(|e| {
            Failure::Refused(format!(
                "cannot look at {}: {e}",
                atsfs::lun::display_name(path)
            ))
        })?;
    // A new image file gets the image default of 512-byte ATS sectors.
    let mut sector = IMAGE_SECTOR_BYTES;
    if exists {
        check_size_request(path, args.size)?;
        let lun = open(path)?;
        ats::check_ats_request(&lun, args)?;
        check_existing(&lun, args)?;
        sector = lun.sector_size();
    } else if args.size.is_none() {
        return Err(Failure::Refused(format!(
            "{} does not exist; give --size SIZE to create an image file of that size",
            atsfs::lun::display_name(path)
        )));
    }
    if !exists && args.ats == ats::AtsChoice::Hardware {
        // Refused before the file is made: a new image file has no hardware ATS.
        return Err(Failure::Refused(format!(
            "--ats hardware: {} would be a new image file, which has no hardware ATS (SCSI \
             COMPARE AND WRITE); leave --ats out (Disk Paxos, which needs none), or give a \
             device that reaches the storage's COMPARE AND WRITE",
            atsfs::lun::display_name(path)
        )));
    }
    if let Some(size) = args.size {
        // Refuse a layout that cannot fit before creating or growing anything.
        plan_for(size, sector, &opts)?;
        create_or_grow(path, size)?;
    }
    let lun = open(path)?;
    // The device is ours to overwrite from here on (checked above). A LUN that held a
    // volume stays reserved by its hosts' keys (they never unregister): take it over
    // under a key of our own, or the storage refuses our writes.
    let mkfs_key = atsfs::cluster::fence::take_for_mkfs(lun.as_ref())
        .map_err(|e| Failure::Refused(format!("{e:#}")))?;
    // The self-test's sessions are initiators of their own: registered with our key,
    // or the reservation refuses their writes.
    let sessions = || {
        let session = open_device(path, OpenMode::ReadWrite)?;
        if let (Some(key), Some(pr)) = (mkfs_key, session.reservations()) {
            pr.register(key)?;
        }
        Ok(session)
    };
    let (ats_mode, tested) = ats::choose_ats(&lun, args, &sessions)?;
    opts.ats_mode = ats_mode;
    let started = Instant::now();
    let geo = {
        let mut progress = Progress::new(args.quiet);
        let result = mkfs(&lun, &opts, &mut |done, total| progress.update(done, total));
        progress.finish();
        result?
    };
    tracing::info!(elapsed = ?started.elapsed(), ag_count = geo.ag_count, "mkfs finished");
    // Read the result back: what we print is what a mount will find.
    let superblock = match probe(&lun)? {
        Probe::Atsfs {
            superblock,
            from_backup: false,
        } => superblock,
        other => {
            return Err(Failure::Io(format!(
                "the new superblock does not read back ({other:?}); the device may be \
                 dropping writes: check it, then run mkfs.atsfs again"
            )))
        }
    };
    if !args.quiet {
        print_summary(&lun, &superblock);
        if let Some(report) = &tested {
            ats::print_selftest(report);
        }
    }
    Ok(())
}

/// True for a device name that is no path on this machine (an `iscsi://` URL): a
/// device of another kind than a file that does not exist here.
fn is_no_path(path: &Path) -> bool {
    device_kind(path) != DeviceKind::File && !path.exists()
}

/// `--size` applies to image files only, and never shrinks one.
fn check_size_request(path: &Path, size: Option<u64>) -> Result<(), Failure> {
    let Some(size) = size else { return Ok(()) };
    if is_no_path(path) {
        return Err(Failure::Refused(format!(
            "--size is for image files; {} is not a path on this machine (a LUN has the \
             size the storage gives it): drop --size",
            atsfs::lun::display_name(path)
        )));
    }
    let meta = std::fs::metadata(path).map_err(|e| {
        Failure::Io(format!(
            "cannot stat {}: {e}",
            atsfs::lun::display_name(path)
        ))
    })?;
    if !meta.is_file() {
        return Err(Failure::Refused(format!(
            "--size is for image files; {} is not a regular file (a block device has \
             a fixed size): drop --size",
            atsfs::lun::display_name(path)
        )));
    }
    if meta.len() > size {
        return Err(Failure::Refused(format!(
            "{} is {} ({} bytes), larger than --size {}; mkfs.atsfs never shrinks an \
             image: drop --size to use the whole file, or truncate it yourself",
            atsfs::lun::display_name(path),
            format_size(meta.len()),
            meta.len(),
            format_size(size)
        )));
    }
    Ok(())
}

/// Creates the image file or grows it to `size` bytes; the new bytes are sparse.
fn create_or_grow(path: &Path, size: u64) -> Result<(), Failure> {
    let io = |what: &str, e: std::io::Error| {
        Failure::Io(format!(
            "cannot {what} {} to {}: {e}; check the directory, its free space and the \
             largest file its filesystem allows",
            atsfs::lun::display_name(path),
            format_size(size)
        ))
    };
    let created = !path.exists();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io("create", e))?;
    let grown = file
        .metadata()
        .and_then(|meta| match meta.len() < size {
            true => file.set_len(size).and_then(|()| file.sync_all()),
            false => Ok(()),
        })
        .map_err(|e| io("grow", e));
    if grown.is_err() && created {
        // Leave nothing behind for a file this run created.
        let _ = std::fs::remove_file(path);
    }
    grown
}

fn open(path: &Path) -> Result<Arc<dyn Lun>, Failure> {
    open_device(path, OpenMode::ReadWrite).map_err(|err| {
        let refused = matches!(
            &err,
            LunError::Io { source, .. }
                if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied)
        );
        let message = format!(
            "cannot open {} for writing: {err}; check the path and that you may write it \
             (block devices usually need root)",
            atsfs::lun::display_name(path)
        );
        if refused {
            Failure::Refused(message)
        } else {
            Failure::Io(message)
        }
    })
}

/// Refuses a device in use (always) or holding data (unless `-f`).
fn check_existing(lun: &dyn Lun, args: &Args) -> Result<(), Failure> {
    let device = atsfs::lun::display_name(&args.device);
    match probe(lun)? {
        Probe::Empty => Ok(()),
        Probe::Other(name) if args.force => {
            tracing::warn!("overwriting the {name} on {device}");
            Ok(())
        }
        Probe::Other(name) => Err(Failure::Refused(format!(
            "{device} holds a {name}; mkfs.atsfs would destroy it. If that is what you \
             want, run again with -f"
        ))),
        Probe::Atsfs {
            superblock,
            from_backup,
        } => {
            refuse_if_in_use(lun, &superblock, args)?;
            if args.force {
                return Ok(());
            }
            let which = if from_backup {
                " (its primary superblock is missing: an interrupted mkfs or a damaged volume)"
            } else {
                ""
            };
            Err(Failure::Refused(format!(
                "{device} already holds an atsfs volume (label {:?}, UUID {}){which}; \
                 run again with -f to overwrite it and lose its files",
                atsfs::format::get_str(&superblock.label),
                uuid::Uuid::from_bytes(superblock.volume_uuid)
            )))
        }
    }
}

/// Watches the volume's heartbeats. A slot marked live that does not move may be a
/// crashed host or a host stalled for a moment: then wait out a whole lease.
fn refuse_if_in_use(lun: &dyn Lun, sb: &Superblock, args: &Args) -> Result<(), Failure> {
    let interval = Duration::from_millis(u64::from(sb.heartbeat_interval_ms));
    let lease = Duration::from_millis(u64::from(sb.lease_ms)).min(LEASE_MAX);
    let watch = (interval * 2 + WATCH_MARGIN).min(LEASE_MAX);
    say(
        args,
        &format!("checking for hosts using the volume ({watch:?})..."),
    );
    let mut live = live_hosts(lun, sb, watch)?;
    if live.is_empty() {
        let marked = slots_marked_live(lun, sb)?;
        if !marked.is_empty() {
            let wait = lease + interval;
            say(
                args,
                &format!(
                    "slots {} are marked live but did not heartbeat; watching them for \
                     one lease ({wait:?}) to be sure their hosts are gone...",
                    list(&marked)
                ),
            );
            live = live_hosts(lun, sb, wait)?;
        }
    }
    if live.is_empty() {
        return Ok(());
    }
    let (hosts, them) = if live.len() == 1 {
        ("host is", "it")
    } else {
        ("hosts are", "them")
    };
    Err(Failure::Refused(format!(
        "{} {hosts} using this volume now (slots {}); unmount {them} first. \
         mkfs.atsfs never formats a volume in use, not even with -f",
        live.len(),
        list(&live)
    )))
}

fn list(slots: &[u32]) -> String {
    slots
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn say(args: &Args, message: &str) {
    if !args.quiet {
        eprintln!("{message}");
    }
}

/// A progress bar over allocation groups, shown only for large volumes on a terminal.
struct Progress {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        Progress { quiet, bar: None }
    }

    fn update(&mut self, done: u64, total: u64) {
        if self.quiet || total < PROGRESS_AGS_MIN {
            return;
        }
        // Drawn only when stderr is a terminal (`atsfs::progress`).
        let bar = self.bar.get_or_insert_with(|| {
            atsfs::progress::bar(total, "writing allocation groups {bar:40} {pos}/{len}")
        });
        bar.set_position(done);
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn print_summary(lun: &dyn Lun, sb: &Superblock) {
    let volume_bytes = sb.total_blocks * BLOCK_SIZE_U64;
    let journal_bytes = sb.journal_blocks * BLOCK_SIZE_U64;
    println!("made an atsfs volume on {}", lun.describe());
    println!(
        "  volume UUID        {}",
        uuid::Uuid::from_bytes(sb.volume_uuid)
    );
    let label = atsfs::format::get_str(&sb.label);
    if !label.is_empty() {
        println!("  label              {label}");
    }
    println!(
        "  size               {} ({} blocks of 4 KiB)",
        format_size(volume_bytes),
        sb.total_blocks
    );
    println!(
        "  hosts              {} (journal {} each)",
        sb.max_hosts,
        format_size(journal_bytes)
    );
    println!("  allocation groups  {} of up to 128 MiB", sb.ag_count);
    println!(
        "  heartbeat          every {:?}, lease {:?}",
        Duration::from_millis(u64::from(sb.heartbeat_interval_ms)),
        Duration::from_millis(u64::from(sb.lease_ms))
    );
    if sb.ats_mode == ATS_MODE_EMULATED {
        println!(
            "  ATS                emulated (one kernel only), {}-byte sectors: every host \
             must run on this machine",
            sb.ats_sector_size
        );
    } else if sb.ats_mode == ATS_MODE_DISK_PAXOS {
        println!(
            "  ATS                Disk Paxos (a token over plain sector reads and writes), \
             {}-byte sectors, token lease {} ms (io_timeout {} ms); region of {} KiB",
            sb.ats_sector_size,
            sb.paxos_token_ms,
            sb.paxos_token_ms / 2,
            paxos_blocks_for(sb.max_hosts, sb.ats_sector_size) * 4
        );
    } else {
        println!(
            "  ATS                hardware (SCSI COMPARE AND WRITE), {}-byte sectors",
            sb.ats_sector_size
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_refused_for_a_device_that_is_no_path() {
        let name = Path::new("iscsi://target/iqn.x/0");
        if device_kind(name) == DeviceKind::File {
            // Before the iSCSI backend, such a name is a (missing) file.
            return;
        }
        let text = match check_size_request(name, Some(1 << 30)) {
            Err(Failure::Refused(text)) => text,
            other => panic!("not refused: {other:?}"),
        };
        assert!(text.contains("drop --size"), "{text}");
    }
}
