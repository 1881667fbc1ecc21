//! In-process cluster benchmarks: hosts are `Fs` instances in one process, each with
//! its own open of one image file (emulated ATS between the opens), behind a counting
//! wrapper. Prints a markdown table. `cargo xtask bench` runs it in release mode.
//!
//! Usage: bench IMAGE_DIR [FILES [BIG_DIR_ENTRIES]]; with ATSFS_BENCH_ISCSI=URL also
//! the iSCSI rows (`iscsi_rows`; the LUN is overwritten). The Disk Paxos rows
//! (`paxos_rows`) open the image as a plain disk: no compare-and-write below the token.

use atsfs::cluster::HostUuid;
use atsfs::fs::{Fs, MountOptions};
use atsfs::lun::{FaultConfig, FaultLun, FileLun, IoStats, Lun, OpenMode, PlainDisk};
use atsfs::mkfs::{mkfs, MkfsOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REG: u32 = libc::S_IFREG | 0o644;

type Counted = Arc<FaultLun<FileLun>>;

fn make_image(path: &Path, bytes: u64, opts: &MkfsOptions) {
    let file = std::fs::File::create(path).expect("create image");
    file.set_len(bytes).expect("size image");
    drop(file);
    let lun = FileLun::open(path, OpenMode::ReadWrite).expect("open image");
    mkfs(&lun, opts, &mut |_, _| {}).expect("mkfs");
}

fn host(path: &Path, id: u8) -> (Arc<Fs>, Counted) {
    let lun = counted(path);
    let dynlun: Arc<dyn Lun> = lun.clone();
    let fs = Fs::mount(dynlun, MountOptions::new(HostUuid([id; 16]))).expect("mount");
    (fs, lun)
}

fn counted(path: &Path) -> Counted {
    Arc::new(FaultLun::new(
        FileLun::open(path, OpenMode::ReadWrite).expect("open"),
        FaultConfig::default(),
    ))
}

/// A host of a Disk Paxos volume on its own open of the image as a plain disk (its
/// compare-and-write fails, so every test-and-set goes through the token), counted
/// below the token.
fn paxos_host(path: &Path, id: u8) -> (Arc<Fs>, Counted) {
    let lun = counted(path);
    let plain: Arc<dyn Lun> = Arc::new(PlainDisk(lun.clone()));
    let fs = Fs::mount(plain, MountOptions::new(HostUuid([id; 16]))).expect("mount");
    (fs, lun)
}

fn delta(a: IoStats, b: IoStats, n: u64) -> String {
    let per = |x: u64, y: u64| (y - x) as f64 / n as f64;
    format!(
        "{:.2} reads, {:.2} writes, {:.2} ATS, {:.3} flushes",
        per(a.reads, b.reads),
        per(a.writes, b.writes),
        per(a.caws, b.caws),
        per(a.flushes, b.flushes)
    )
}

/// Creates `n` empty files in `dir` (names `{prefix}{i}`), then commits; returns
/// files/s, commit included.
fn create_empty(fs: &Fs, dir: u64, prefix: &str, from: u64, n: u64) -> f64 {
    let started = Instant::now();
    for i in from..from + n {
        fs.mknod(dir, format!("{prefix}{i:08}").as_bytes(), REG, 0, 0, 0)
            .expect("create");
    }
    fs.sync().expect("sync");
    n as f64 / started.elapsed().as_secs_f64()
}

/// Directories of 1,000 entries made one after another in the root: the median of
/// their create rates (one sample of 1,000 creates takes a tenth of a second, and
/// swings by half from one to the next).
fn small_directories(fs: &Fs, name: &str) -> f64 {
    let mut rates: Vec<f64> = (0..SMALL_DIRS)
        .map(|k| {
            let dir = fs
                .mkdir(fs.root(), format!("{name}-{k}").as_bytes(), 0o755, 0, 0)
                .expect("mkdir")
                .ino;
            create_empty(fs, dir, "s", 0, 1000)
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Directories of 1,000 entries whose rates `small_directories` takes the median of.
const SMALL_DIRS: usize = 9;

/// A directory of `entries` entries: the create rate of its last 1% (at least 1000)
/// against that of directories of 1000 on the same volume, made right after it (same
/// fill, same caches), on one host, each with its commit. The rate of 1k
/// directories on the fresh volume is shown too.
fn big_directory(dir: &Path, entries: u64, rows: &mut Vec<(String, String)>) {
    let image = dir.join("atsfs-bench-bigdir.img");
    // One resource block per inode, plus buckets and tables: 4 KiB per entry, twice.
    let bytes = (entries * 8192).max(1 << 30).next_multiple_of(1 << 30);
    make_image(&image, bytes, &MkfsOptions::default());
    let (fs, _) = host(&image, 3);
    let fresh_rate = small_directories(&fs, "fresh");
    let big = fs.mkdir(fs.root(), b"big", 0o755, 0, 0).expect("mkdir").ino;
    let tail = (entries / 100).max(1000).min(entries);
    let started = Instant::now();
    create_empty(&fs, big, "b", 0, entries - tail);
    let tail_rate = create_empty(&fs, big, "b", entries - tail, tail);
    let total = started.elapsed().as_secs_f64();
    let small_rate = small_directories(&fs, "beside");
    let _ = fs.unmount();
    let _ = std::fs::remove_file(&image);
    rows.push((
        format!("create rate in a directory of 1,000 entries (median of {SMALL_DIRS})"),
        format!(
            "{small_rate:.0} files/s beside the big directory ({fresh_rate:.0} files/s on the fresh volume)"
        ),
    ));
    rows.push((
        format!("create rate of the last {tail} of {entries} entries in one directory"),
        format!(
            "{tail_rate:.0} files/s = {:.2}x the 1k directories beside it (target >= 0.5x); {:.2}x the fresh ones; all {entries} in {total:.0} s",
            tail_rate / small_rate,
            tail_rate / fresh_rate
        ),
    ));
}

/// Compare-and-write latency of one sector on `lun`: `n` successful CAWs in a row,
/// each from the image the last one wrote. Returns (mean µs, 99th percentile µs).
/// Mean and p99 latency (µs) of `n` uncontended compare-and-writes of one sector.
fn caw_latency(lun: &dyn Lun, offset: u64, n: usize) -> (f64, f64) {
    let sector = lun.sector_size() as usize;
    let mut current = vec![0u8; sector];
    lun.read_at(&mut current, offset).expect("read");
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let mut next = current.clone();
        next[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let started = Instant::now();
        match lun.compare_and_write(offset, &current, &next).expect("caw") {
            atsfs::lun::Caw::Written => {}
            atsfs::lun::Caw::Miscompare(_) => panic!("a CAW of an idle sector miscompared"),
        }
        times.push(started.elapsed().as_secs_f64() * 1e6);
        current = next;
    }
    let mean = times.iter().sum::<f64>() / n as f64;
    times.sort_by(f64::total_cmp);
    (mean, times[(n * 99 / 100).min(n - 1)])
}

/// Rows for a volume on a real iSCSI LUN (`cargo xtask bench` starts tgtd on
/// localhost, one I/O thread, when it is built): CAW latency against the emulation,
/// and create rates of one host and of two hosts in one directory. The LUN's contents
/// are overwritten.
fn iscsi_rows(url: &str, dir: &Path, files: u64, rows: &mut Vec<(String, String)>) {
    use atsfs::lun::open_device;
    let open = || open_device(Path::new(url), OpenMode::ReadWrite).expect("open the iSCSI LUN");
    let lun = open();
    let emulated_image = dir.join("atsfs-bench-caw.img");
    make_image(&emulated_image, 64 << 20, &MkfsOptions::default());
    let emulated = FileLun::open(&emulated_image, OpenMode::ReadWrite).expect("open");
    let (file_mean, file_p99) = caw_latency(&emulated, 1 << 20, 2000);
    let (mean, p99) = caw_latency(lun.as_ref(), 1 << 20, 2000);
    let _ = std::fs::remove_file(&emulated_image);
    rows.push((
        "ATS latency: iSCSI COMPARE AND WRITE (tgt on localhost) vs emulated (OFD lock on an image file)".into(),
        format!(
            "{mean:.0} µs mean, {p99:.0} µs p99 vs {file_mean:.1} µs, {file_p99:.1} µs; 1 device I/O per test-and-set for both"
        ),
    ));
    let opts = MkfsOptions {
        ats_mode: atsfs::format::ATS_MODE_HARDWARE,
        ..MkfsOptions::default()
    };
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs on the iSCSI LUN");
    drop(lun);
    let mount = |id: u8| {
        let lun: Arc<dyn Lun> = open();
        Fs::mount(lun, MountOptions::new(HostUuid([id; 16]))).expect("mount over iSCSI")
    };
    let a = mount(11);
    let n = files / 4;
    let d1 = a.mkdir(a.root(), b"one", 0o755, 0, 0).expect("mkdir").ino;
    let one = create_files(&a, d1, "f", n);
    rows.push((
        format!("iSCSI: 1 host, create + 100 B write of {n} files"),
        format!("{one:.0} files/s"),
    ));
    let b = mount(12);
    let same = a.mkdir(a.root(), b"same", 0o755, 0, 0).expect("mkdir").ino;
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| create_files(&a, same, "a", n / 2));
        s.spawn(|| create_files(&b, same, "b", n / 2));
    });
    let two = n as f64 / started.elapsed().as_secs_f64();
    rows.push((
        "iSCSI: 2 hosts (one initiator each), one directory".into(),
        format!(
            "{two:.0} files/s = {:.2}x one host over iSCSI (target >= 0.5x)",
            two / one
        ),
    ));
    let _ = b.unmount();
    let _ = a.unmount();
}

/// `caw_latency` on `lun` with the device I/Os each test-and-set cost on `device`
/// (below any token): "MEAN µs mean, P99 µs p99, R reads + W writes per test-and-set".
fn caw_row(lun: &dyn Lun, device: &Counted, offset: u64, n: usize) -> String {
    let before = device.stats();
    let (mean, p99) = caw_latency(lun, offset, n);
    let after = device.stats();
    let per = |x: u64, y: u64| (y - x) as f64 / n as f64;
    format!(
        "{mean:.1} µs mean, {p99:.1} µs p99; {:.2} reads + {:.2} writes + {:.2} device ATS per test-and-set",
        per(before.reads, after.reads),
        per(before.writes, after.writes),
        per(before.caws, after.caws),
    )
}

/// Disk Paxos rows: test-and-set latency and device I/Os of the emulation and of the
/// token (acquired for each test-and-set, and kept between them as a mounted host
/// keeps it), then the create rates of one host and of two hosts in one directory on
/// a Disk Paxos volume against one host on the emulation (`rate_emulated`).
fn paxos_rows(dir: &Path, files: u64, rate_emulated: f64, rows: &mut Vec<(String, String)>) {
    use atsfs::cluster::paxos::{Owner, PaxosLun, PaxosRegion, TokenTiming};
    use atsfs::cluster::{Clock, SystemClock};
    use atsfs::format::Geometry;

    let image = dir.join("atsfs-bench-paxos.img");
    let opts = MkfsOptions {
        ats_mode: atsfs::format::ATS_MODE_DISK_PAXOS,
        ..MkfsOptions::default()
    };
    make_image(&image, 2 << 30, &opts);
    // A sector past the superblock that nothing reads while no host is mounted.
    let probe = 1 << 20;
    {
        let device = counted(&image);
        rows.push((
            "ATS: emulated (OFD lock on an image file, one kernel only)".into(),
            caw_row(device.as_ref(), &device, probe, 2000),
        ));
        let sb = atsfs::fs::read_superblock(device.as_ref()).expect("superblock");
        let region = PaxosRegion::of(&Geometry::from_superblock(&sb)).expect("a Disk Paxos region");
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
        let timing = TokenTiming::for_token(u64::from(sb.paxos_token_ms));
        let me = Owner {
            slot: 0,
            generation: 1,
        };
        let plain: Arc<dyn Lun> = Arc::new(PlainDisk(device.clone()));
        let cold = PaxosLun::new(plain.clone(), region, me, clock.clone(), timing);
        rows.push((
            "ATS: Disk Paxos, token taken and given back for each test-and-set".into(),
            caw_row(&cold, &device, probe, 500),
        ));
        drop(cold);
        let kept = Arc::new(PaxosLun::new(plain, region, me, clock, timing));
        kept.start_releaser();
        rows.push((
            "ATS: Disk Paxos, token kept between test-and-sets (a busy mounted host)".into(),
            caw_row(kept.as_ref(), &device, probe, 2000),
        ));
    }
    // Create rates; mkfs again so that the probe's writes leave nothing behind.
    make_image(&image, 2 << 30, &opts);
    let (a, _lun_a) = paxos_host(&image, 21);
    let n = files / 2;
    let d1 = a.mkdir(a.root(), b"one", 0o755, 0, 0).expect("mkdir").ino;
    let one = create_files(&a, d1, "f", n);
    rows.push((
        format!("Disk Paxos: 1 host, create + 100 B write of {n} files"),
        format!(
            "{one:.0} files/s = {:.2}x one host on the emulation",
            one / rate_emulated
        ),
    ));
    let (b, _lun_b) = paxos_host(&image, 22);
    let same = a.mkdir(a.root(), b"same", 0o755, 0, 0).expect("mkdir").ino;
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| create_files(&a, same, "a", n / 4));
        s.spawn(|| create_files(&b, same, "b", n / 4));
    });
    let two = (n / 2) as f64 / started.elapsed().as_secs_f64();
    rows.push((
        "Disk Paxos: 2 hosts, one directory".into(),
        format!(
            "{two:.0} files/s = {:.2}x one Disk Paxos host, {:.2}x one host on the emulation (target >= 0.5x)",
            two / one,
            two / rate_emulated
        ),
    ));
    let _ = b.unmount();
    let _ = a.unmount();
    let _ = std::fs::remove_file(&image);
}

/// Creates `n` files with 100 bytes each in `dir`, then syncs; returns files/s.
fn create_files(fs: &Fs, dir: u64, prefix: &str, n: u64) -> f64 {
    let started = Instant::now();
    for i in 0..n {
        let f = fs
            .mknod(dir, format!("{prefix}{i}").as_bytes(), REG, 0, 0, 0)
            .expect("create")
            .ino;
        fs.write_data(f, 0, &[b'x'; 100]).expect("write");
    }
    fs.sync().expect("sync");
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().map_or("/tmp", |s| s.as_str()));
    let files: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5000);
    let big_dir: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let image = dir.join("atsfs-bench.img");
    let opts = MkfsOptions::default();
    let mut rows: Vec<(String, String)> = Vec::new();

    if std::env::var("ATSFS_BENCH_ONLY").as_deref() == Ok("paxos") {
        paxos_only(&dir, &image, files, &opts, &mut rows);
        print_rows(rows);
        return;
    }

    // mkfs of a sparse 1 TiB image.
    let big = dir.join("atsfs-bench-1t.img");
    let started = Instant::now();
    make_image(&big, 1 << 40, &opts);
    rows.push((
        "mkfs of a sparse 1 TiB image (32 hosts)".into(),
        format!("{:.2} s (target <= 2 s)", started.elapsed().as_secs_f64()),
    ));
    let _ = std::fs::remove_file(&big);

    // One host: cost model of create + 100-byte write.
    make_image(&image, 2 << 30, &opts);
    let started = Instant::now();
    let (a, lun_a) = host(&image, 1);
    rows.push((
        "mount (claim a slot, replay, root)".into(),
        format!("{:.0} ms", started.elapsed().as_secs_f64() * 1000.0),
    ));
    let d1 = a.mkdir(a.root(), b"one", 0o755, 0, 0).expect("mkdir").ino;
    let before = lun_a.stats();
    let rate_one = create_files(&a, d1, "f", files);
    rows.push((
        format!("1 host: create + 100 B write of {files} files"),
        format!("{rate_one:.0} files/s"),
    ));
    rows.push((
        "  device I/O per create (incl. commits)".into(),
        delta(before, lun_a.stats(), files),
    ));

    // Uncontended re-acquisition: release every lock, then stat every file again.
    a.release_all_locks().expect("release");
    let before = lun_a.stats();
    let mut inos = Vec::new();
    a.readdir(d1, 0, &mut |ino, _, _, name| {
        if name != b"." && name != b".." {
            inos.push(ino);
        }
        false
    })
    .expect("readdir");
    let before_stat = lun_a.stats();
    for &ino in &inos {
        a.getattr(ino).expect("stat");
    }
    rows.push((
        format!(
            "uncontended lock (re-taking {} released inode locks)",
            inos.len()
        ),
        delta(before_stat, lun_a.stats(), inos.len() as u64),
    ));
    let _ = before;

    // Two hosts in separate directories vs one host doing the same work.
    let (b, _lun_b) = host(&image, 2);
    let d_a = a.mkdir(a.root(), b"sep-a", 0o755, 0, 0).expect("mkdir").ino;
    let d_b = b.mkdir(b.root(), b"sep-b", 0o755, 0, 0).expect("mkdir").ino;
    let d_one = a
        .mkdir(a.root(), b"sep-one", 0o755, 0, 0)
        .expect("mkdir")
        .ino;
    let started = Instant::now();
    create_files(&a, d_one, "x", 2 * files);
    let one = 2.0 * files as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| create_files(&a, d_a, "a", files));
        s.spawn(|| create_files(&b, d_b, "b", files));
    });
    let two = 2.0 * files as f64 / started.elapsed().as_secs_f64();
    rows.push(("1 host, 2N creates".into(), format!("{one:.0} files/s")));
    rows.push((
        "2 hosts, N creates each, separate directories".into(),
        format!(
            "{two:.0} files/s = {:.2}x one host (target >= 1.0x)",
            two / one
        ),
    ));
    let d_same = a.mkdir(a.root(), b"same", 0o755, 0, 0).expect("mkdir").ino;
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| create_files(&a, d_same, "a", files / 4));
        s.spawn(|| create_files(&b, d_same, "b", files / 4));
    });
    let same = (files / 2) as f64 / started.elapsed().as_secs_f64();
    rows.push((
        "2 hosts, one directory".into(),
        format!(
            "{same:.0} files/s = {:.2}x one host (target >= 0.5x)",
            same / one
        ),
    ));

    // Failover at the default lease: A holds a file open for writing and dies.
    let f = a
        .mknod(a.root(), b"held", REG, 0, 0, 0)
        .expect("create")
        .ino;
    a.open(f, true).expect("open");
    a.sync().expect("sync");
    drop(a);
    let started = Instant::now();
    loop {
        match b.open(f, true) {
            Ok(_) => break,
            Err(e) if e.errno() == libc::EBUSY && started.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("failover: {e}"),
        }
    }
    rows.push((
        "failover: crash of a host holding a file open for writing, to the survivor's open".into(),
        format!(
            "{:.2} s at the default 8 s lease (target <= 9 s)",
            started.elapsed().as_secs_f64()
        ),
    ));
    let _ = b.unmount();
    let _ = std::fs::remove_file(&image);

    big_directory(&dir, big_dir, &mut rows);

    paxos_rows(&dir, files, rate_one, &mut rows);

    if let Ok(url) = std::env::var("ATSFS_BENCH_ISCSI") {
        iscsi_rows(&url, &dir, files, &mut rows);
    }

    print_rows(rows);
}

fn print_rows(rows: Vec<(String, String)>) {
    println!("| measure | result |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

/// `ATSFS_BENCH_ONLY=paxos`: the Disk Paxos rows alone, with the references they
/// are compared with (one host on the emulation; two emulated hosts in one
/// directory).
fn paxos_only(
    dir: &Path,
    image: &Path,
    files: u64,
    opts: &MkfsOptions,
    rows: &mut Vec<(String, String)>,
) {
    make_image(image, 2 << 30, opts);
    let (a, _) = host(image, 1);
    let d1 = a.mkdir(a.root(), b"one", 0o755, 0, 0).expect("mkdir").ino;
    let rate_one = create_files(&a, d1, "f", files);
    rows.push((
        format!("1 host: create + 100 B write of {files} files"),
        format!("{rate_one:.0} files/s"),
    ));
    let (b, _) = host(image, 2);
    let same = a.mkdir(a.root(), b"same", 0o755, 0, 0).expect("mkdir").ino;
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| create_files(&a, same, "a", files / 8));
        s.spawn(|| create_files(&b, same, "b", files / 8));
    });
    let two = (files / 4) as f64 / started.elapsed().as_secs_f64();
    rows.push((
        "emulated: 2 hosts, one directory".into(),
        format!("{two:.0} files/s = {:.2}x one host", two / rate_one),
    ));
    let _ = b.unmount();
    let _ = a.unmount();
    let _ = std::fs::remove_file(image);
    paxos_rows(dir, files, rate_one, rows);
}
