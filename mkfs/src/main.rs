//! mkfs.atsfs: lay out a fresh atsfs volume on a LUN or an image file.
//!
//! Refuses (exit 1) a device that hosts are using now — even with `-f` — and, without
//! `-f`, a device that holds an atsfs volume or another filesystem's signature.
//! `--ats` chooses the volume's test-and-set; hardware ATS is recorded only after the
//! device passed the ATS self-test (`atsfs::lun::selftest`).
//! Exit codes: 0 done, 1 refused or bad input, 2 I/O error.

use atsfs::format::{Superblock, ATS_MODE_EMULATED, ATS_MODE_HARDWARE, BLOCK_SIZE_U64};
use atsfs::lun::selftest::{self, SelftestOptions, SelftestReport, SessionFactory};
use atsfs::lun::{device_kind, open_device, AtsKind, DeviceKind, Lun, LunError, OpenMode};
use atsfs::mkfs::{
    live_hosts, mkfs, plan_for, probe, selftest_sector, slots_marked_live, validate_options,
    MkfsError, MkfsOptions, Probe, LEASE_MAX,
};
use atsfs::units::{format_size, parse_duration, parse_size};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Volumes with at least this many allocation groups get a progress bar.
const PROGRESS_AGS_MIN: u64 = 1024;
/// The ATS sector `FileLun` gives an image file.
const IMAGE_SECTOR_BYTES: u32 = 512;
/// Increments per session of the ATS self-test mkfs runs before it trusts a device's
/// hardware ATS: the default of `atsfs ats-selftest`, not fewer. Measured on tgt with
/// 16 I/O threads per LUN (8 sessions of read-then-CAW increments on one machine,
/// 15 runs each): 8 x 100 saw lost updates in 3 runs, 8 x 500 in 12, 8 x 1,000 and
/// 8 x 2,000 in all 15 (the fewest lost were 1 and 9 of 16,000 in two other runs),
/// and 8 x 2,000 takes about 2 s there.
const SELFTEST_INCREMENTS: u64 = selftest::INCREMENTS_DEFAULT;
/// Extra time to watch heartbeats beyond two intervals, for I/O latency.
const WATCH_MARGIN: Duration = Duration::from_millis(200);

#[derive(Parser, Debug)]
#[command(
    name = "mkfs.atsfs",
    bin_name = "mkfs.atsfs",
    version,
    about = "Make an atsfs shared-disk filesystem on a LUN or an image file",
    after_help = "Exit status: 0 done, 1 refused or bad input, 2 I/O error.\n\
                  mkfs.atsfs never formats a volume that hosts are using, not even with -f."
)]
struct Args {
    /// Volume label (at most 63 bytes).
    #[arg(short = 'L', long, default_value = "")]
    label: String,
    /// Most hosts that can mount the volume at once (1..=64).
    #[arg(short = 'N', long = "max-hosts", default_value_t = 32)]
    max_hosts: u32,
    /// Create the image file with this size if it is missing, or grow it (sparse) if
    /// it is smaller. Never shrinks. E.g. 10G.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Journal size per host, e.g. 64M (default: from the volume size, 1-64 MiB).
    #[arg(long = "journal-size", value_parser = parse_size)]
    journal_size: Option<u64>,
    /// How often each host renews its heartbeat, e.g. 1s or 500ms.
    #[arg(long = "heartbeat-interval", value_parser = parse_duration, default_value = "1s")]
    heartbeat_interval: Duration,
    /// How long a silent host keeps its locks before peers recover it (> 2 intervals).
    #[arg(long, value_parser = parse_duration, default_value = "8s")]
    lease: Duration,
    /// Which test-and-set the volume uses: `hardware` (the storage's SCSI COMPARE AND
    /// WRITE, hosts on any machine), `emulated` (file locks: every host on this
    /// machine) or `auto` (hardware when the device has it and passes the ATS
    /// self-test, else emulated).
    #[arg(long, value_enum, default_value_t = AtsChoice::Auto)]
    ats: AtsChoice,
    /// Overwrite an existing atsfs volume or another filesystem.
    #[arg(short, long)]
    force: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
    /// The block device or image file.
    device: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum AtsChoice {
    Auto,
    Hardware,
    Emulated,
}

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
        // Chosen once the device is known (`choose_ats`).
        ats_mode: ATS_MODE_EMULATED,
        volume_uuid: None,
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let mut opts = options(args);
    validate_options(&opts)?;
    let path = &args.device;
    check_device(args, &opts)?;
    let lun = open(path)?;
    // The device is ours to overwrite from here on (checked above).
    let sessions = || open_device(path, OpenMode::ReadWrite);
    let (ats_mode, tested) = choose_ats(lun.as_ref(), args, &sessions)?;
    opts.ats_mode = ats_mode;
    let started = Instant::now();
    let geo = {
        let mut progress = Progress::new(args.quiet);
        let result = mkfs(lun.as_ref(), &opts, &mut |done, total| {
            progress.update(done, total)
        });
        progress.finish();
        result?
    };
    tracing::info!(elapsed = ?started.elapsed(), ag_count = geo.ag_count, "mkfs finished");
    // Read the result back: what we print is what a mount will find.
    let superblock = match probe(lun.as_ref())? {
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
        print_summary(lun.as_ref(), &superblock, tested.as_ref());
    }
    Ok(())
}

/// Checks the device (or the image file to be made) and everything on it, and makes
/// or grows the image file (`--size`). Writes nothing to a device that exists.
fn check_device(args: &Args, opts: &MkfsOptions) -> Result<(), Failure> {
    let path = &args.device;
    // A name that is not a file here (an `iscsi://` URL) has nothing to look at or
    // create; any other kind of device is a node that exists.
    let on_disk = device_kind(path) == DeviceKind::File || path.exists();
    let exists = !on_disk
        || path
            .try_exists()
            .map_err(|e| Failure::Refused(format!("cannot look at {}: {e}", path.display())))?;
    // A new image file gets the image default of 512-byte ATS sectors.
    let mut sector = IMAGE_SECTOR_BYTES;
    if exists {
        check_size_request(path, args.size, on_disk)?;
        let lun = open(path)?;
        check_ats_request(lun.as_ref(), args)?;
        check_existing(lun.as_ref(), args)?;
        sector = lun.sector_size();
    } else if args.size.is_none() {
        return Err(Failure::Refused(format!(
            "{} does not exist; give --size SIZE to create an image file of that size",
            path.display()
        )));
    } else if args.ats == AtsChoice::Hardware {
        // Refused before the file is made: a new image file has no hardware ATS.
        return Err(Failure::Refused(format!(
            "--ats hardware: {} would be a new image file, which has no hardware ATS (SCSI \
             COMPARE AND WRITE); use --ats emulated, or give a device that reaches the \
             storage's COMPARE AND WRITE",
            path.display()
        )));
    }
    if let Some(size) = args.size {
        // Refuse a layout that cannot fit before creating or growing anything.
        plan_for(size, sector, opts)?;
        create_or_grow(path, size)?;
    }
    Ok(())
}

/// Refuses an `--ats` the device cannot do, before anything else is looked at.
fn check_ats_request(lun: &dyn Lun, args: &Args) -> Result<(), Failure> {
    let device = lun.describe();
    match (args.ats, lun.ats_kind()) {
        (AtsChoice::Hardware, AtsKind::Emulated) => Err(Failure::Refused(format!(
            "--ats hardware: {device} has no hardware ATS (SCSI COMPARE AND WRITE); image \
             files and block devices without SG_IO have none. Give the device by a name that \
             reaches the storage's COMPARE AND WRITE (an iscsi:// URL, or a SCSI disk), or use \
             --ats emulated with every host on this machine"
        ))),
        (AtsChoice::Emulated, AtsKind::Hardware) => Err(Failure::Refused(format!(
            "--ats emulated: {device} does hardware ATS, and a host that opens an emulated \
             volume through it is refused (the two kinds are not atomic against each other). \
             Make the volume through the name the hosts will use (the image file or block \
             device), or use --ats hardware"
        ))),
        _ => Ok(()),
    }
}

/// The volume's ATS mode (`--ats`), with the self-test's report when it ran. A
/// device with hardware ATS is trusted only once the self-test passed on it, run
/// over sessions from `open`.
fn choose_ats(
    lun: &dyn Lun,
    args: &Args,
    open: &SessionFactory<'_>,
) -> Result<(u32, Option<SelftestReport>), Failure> {
    check_ats_request(lun, args)?;
    if lun.ats_kind() == AtsKind::Emulated {
        if args.ats == AtsChoice::Auto {
            say(
                args,
                &format!(
                    "ATS: emulated, because {} has no hardware COMPARE AND WRITE (image files \
                     and block devices without SG_IO have none): test-and-set is a file lock \
                     of this kernel, so every host must run on this machine (one kernel)",
                    lun.describe()
                ),
            );
        }
        return Ok((ATS_MODE_EMULATED, None));
    }
    let report = run_selftest(lun, args, open)?;
    say(
        args,
        &format!(
            "ATS: hardware (SCSI COMPARE AND WRITE): the self-test passed ({} sessions x {} \
             increments, {:.0} CAW/s)",
            report.sessions, report.increments_per_session, report.caws_per_s
        ),
    );
    Ok((ATS_MODE_HARDWARE, Some(report)))
}

/// The ATS self-test on the sector mkfs is about to overwrite; refuses a device that
/// fails it.
fn run_selftest(
    lun: &dyn Lun,
    args: &Args,
    open: &SessionFactory<'_>,
) -> Result<SelftestReport, Failure> {
    let device = lun.describe();
    let opts = SelftestOptions {
        offset: selftest_sector(lun, true)?,
        sessions: selftest::SESSIONS_DEFAULT,
        increments: SELFTEST_INCREMENTS,
    };
    say(
        args,
        &format!(
            "testing that {device}'s COMPARE AND WRITE is atomic ({} sessions x {} increments)...",
            opts.sessions, opts.increments
        ),
    );
    let report = selftest::run(open, &opts, &mut |_, _| {}).map_err(|e| {
        let message = format!("the ATS self-test of {device} could not finish: {e}");
        if e.blames_device() {
            Failure::Refused(message)
        } else {
            Failure::Io(message)
        }
    })?;
    if report.passed() {
        return Ok(report);
    }
    Err(Failure::Refused(format!(
        "{device} failed the ATS self-test, so mkfs.atsfs will not make a hardware-ATS volume \
         on it: {}. Fix the storage and run mkfs.atsfs again (`atsfs ats-selftest` repeats \
         the test); or make the volume with --ats emulated through the image file or block \
         device, with every host on one machine",
        report.problems.join("; ")
    )))
}

/// `--size` applies to image files only, and never shrinks one.
fn check_size_request(path: &Path, size: Option<u64>, on_disk: bool) -> Result<(), Failure> {
    let Some(size) = size else { return Ok(()) };
    if !on_disk {
        return Err(Failure::Refused(format!(
            "--size is for image files; {} is not a path on this machine (a LUN has the \
             size the storage gives it): drop --size",
            path.display()
        )));
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure::Io(format!("cannot stat {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Failure::Refused(format!(
            "--size is for image files; {} is not a regular file (a block device has \
             a fixed size): drop --size",
            path.display()
        )));
    }
    if meta.len() > size {
        return Err(Failure::Refused(format!(
            "{} is {} ({} bytes), larger than --size {}; mkfs.atsfs never shrinks an \
             image: drop --size to use the whole file, or truncate it yourself",
            path.display(),
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
            path.display(),
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
            path.display()
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
    let device = args.device.display();
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
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("writing allocation groups {bar:40} {pos}/{len}")
            {
                bar.set_style(style);
            }
            bar
        });
        bar.set_position(done);
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn print_summary(lun: &dyn Lun, sb: &Superblock, tested: Option<&SelftestReport>) {
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
    } else {
        println!(
            "  ATS                hardware (SCSI COMPARE AND WRITE), {}-byte sectors",
            sb.ats_sector_size
        );
    }
    if let Some(report) = tested {
        println!(
            "  ATS self-test      passed: {} sessions x {} increments, {:.0} CAW/s, {} miscompares",
            report.sessions, report.increments_per_session, report.caws_per_s, report.miscompares
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atsfs::lun::{check_caw, Caw, LunResult, MemLun};

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["mkfs.atsfs", "-q"];
        argv.extend_from_slice(extra);
        argv.push("/dev/null");
        Args::try_parse_from(argv).expect("arguments parse")
    }

    fn refusal(result: Result<impl std::fmt::Debug, Failure>) -> String {
        match result {
            Err(Failure::Refused(message)) => message,
            Err(Failure::Io(message)) => panic!("an I/O failure, not a refusal: {message}"),
            Ok(v) => panic!("not refused: {v:?}"),
        }
    }

    /// Says its compare-and-write is the storage's; `racy` makes it read, compare,
    /// sleep and write without a lock, as a target with several I/O threads per LUN.
    struct TestHardwareLun {
        inner: Arc<MemLun>,
        racy: bool,
    }

    impl Lun for TestHardwareLun {
        fn sector_size(&self) -> u32 {
            self.inner.sector_size()
        }
        fn len_bytes(&self) -> u64 {
            self.inner.len_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
            self.inner.write_at(buf, offset)
        }
        fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
            if !self.racy {
                return self.inner.compare_and_write(offset, expected, new);
            }
            check_caw(offset, expected, new, self.sector_size(), self.len_bytes())?;
            let mut actual = vec![0u8; expected.len()];
            self.inner.read_at(&mut actual, offset)?;
            if actual != expected {
                return Ok(Caw::Miscompare(actual));
            }
            std::thread::sleep(Duration::from_micros(50));
            self.inner.write_at(new, offset)?;
            Ok(Caw::Written)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "test LUN".into()
        }
        fn ats_kind(&self) -> AtsKind {
            AtsKind::Hardware
        }
    }

    fn hardware(mem: &Arc<MemLun>, racy: bool) -> Arc<dyn Lun> {
        Arc::new(TestHardwareLun {
            inner: mem.clone(),
            racy,
        })
    }

    #[test]
    fn size_is_refused_for_a_device_that_is_no_path() {
        let text = refusal(check_size_request(
            Path::new("iscsi://target/iqn.x/0"),
            Some(1 << 30),
            false,
        ));
        assert!(text.contains("drop --size"), "{text}");
    }

    #[test]
    fn auto_takes_emulated_on_an_emulated_device_and_hardware_is_refused_there() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(mem.clone()) };
        let (mode, tested) = choose_ats(mem.as_ref(), &args(&[]), &open).expect("auto");
        assert_eq!((mode, tested.is_none()), (ATS_MODE_EMULATED, true));
        let text = refusal(choose_ats(
            mem.as_ref(),
            &args(&["--ats", "hardware"]),
            &open,
        ));
        assert!(text.contains("has no hardware ATS"), "{text}");
    }

    #[test]
    fn emulated_is_refused_on_a_hardware_device() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        let lun = hardware(&mem, false);
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(hardware(&mem, false)) };
        let text = refusal(choose_ats(
            lun.as_ref(),
            &args(&["--ats", "emulated"]),
            &open,
        ));
        assert!(text.contains("does hardware ATS"), "{text}");
    }

    #[test]
    fn hardware_needs_the_self_test_to_pass() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        let lun = hardware(&mem, false);
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(hardware(&mem, false)) };
        for choice in [&[][..], &["--ats", "hardware"][..]] {
            let (mode, tested) = choose_ats(lun.as_ref(), &args(choice), &open).expect("atomic");
            assert_eq!(mode, ATS_MODE_HARDWARE);
            assert!(tested.is_some_and(|r| r.passed()));
        }
        let racy = || -> LunResult<Arc<dyn Lun>> { Ok(hardware(&mem, true)) };
        for choice in [&[][..], &["--ats", "hardware"][..]] {
            let text = refusal(choose_ats(lun.as_ref(), &args(choice), &racy));
            assert!(
                text.contains("failed the ATS self-test")
                    && text.contains("COMPARE AND WRITE is not atomic on this device"),
                "{text}"
            );
        }
        // The borrowed sector got its content back.
        let mut sector = vec![1u8; 512];
        mem.read_at(&mut sector, 512).expect("read");
        assert_eq!(sector, vec![0u8; 512]);
    }
}
