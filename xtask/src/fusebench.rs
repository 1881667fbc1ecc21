//! `cargo xtask bench --fuse`: atsfs through FUSE against what a user would run
//! instead, in the same run on the same machine: ext4 on a loop device (the kernel),
//! bindfs over that ext4 (what FUSE itself costs), and a plain file with O_DIRECT for
//! streaming (fio). Prints ratios next to their targets.

use crate::sh::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Unmounts and detaches what the benchmark set up, even when it fails.
#[derive(Default)]
struct Cleanup {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Cmd::new("umount").arg(m).quiet().status();
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        for l in &self.loops {
            let _ = Cmd::new("losetup").args(["-d", l]).quiet().status();
        }
    }
}

/// Operations per second of each phase of the metadata workload, and atsfs's device
/// I/O per operation in each phase (when a stats probe is given).
struct Meta {
    create: f64,
    stat: f64,
    readdir: f64,
    unlink: f64,
    cost: Vec<(&'static str, Io)>,
}

/// Device I/O counters of an atsfs daemon (`atsfs stats --json`).
#[derive(Clone, Copy, Default)]
struct Io {
    reads: f64,
    writes: f64,
    caws: f64,
    flushes: f64,
}

impl Io {
    fn per_op(self, before: Io, n: usize) -> Io {
        let n = n as f64;
        Io {
            reads: (self.reads - before.reads) / n,
            writes: (self.writes - before.writes) / n,
            caws: (self.caws - before.caws) / n,
            flushes: (self.flushes - before.flushes) / n,
        }
    }
}

/// Reads a mounted atsfs host's counters.
fn atsfs_io(atsfs: &Path, mountpoint: &Path) -> Result<Io> {
    let out = Cmd::new(atsfs)
        .args(["stats", "--json"])
        .arg(mountpoint)
        .read()?;
    let v: serde_json::Value = serde_json::from_str(&out).context("atsfs stats --json")?;
    let get = |k: &str| v["io"][k].as_f64().unwrap_or(0.0);
    Ok(Io {
        reads: get("reads"),
        writes: get("writes"),
        caws: get("caws"),
        flushes: get("flushes"),
    })
}

fn rate(n: usize, started: Instant) -> f64 {
    n as f64 / started.elapsed().as_secs_f64()
}

/// create + 100-byte write + close, stat, readdir and unlink of `n` files; `probe`
/// reads the daemon's counters around each phase (atsfs only). The counters include
/// the daemon's background commits during the phase.
fn metadata(dir: &Path, n: usize, probe: Option<&dyn Fn() -> Result<Io>>) -> Result<Meta> {
    std::fs::create_dir_all(dir)?;
    let name = |i: usize| dir.join(format!("file-{i:06}"));
    let mut cost = Vec::new();
    let mut mark = |what: &'static str, before: Option<Io>| -> Result<Option<Io>> {
        let Some(probe) = probe else { return Ok(None) };
        let now = probe()?;
        if let (Some(before), false) = (before, what.is_empty()) {
            cost.push((what, now.per_op(before, n)));
        }
        Ok(Some(now))
    };
    let before = mark("", None)?;
    let started = Instant::now();
    for i in 0..n {
        std::fs::write(name(i), [b'x'; 100])
            .with_context(|| format!("creating {}", name(i).display()))?;
    }
    let create = rate(n, started);
    let before = mark("create + 100 B write + close", before)?;
    let started = Instant::now();
    for i in 0..n {
        std::fs::metadata(name(i))?;
    }
    let stat = rate(n, started);
    let before = mark("stat", before)?;
    let started = Instant::now();
    let listed = std::fs::read_dir(dir)?.count();
    if listed != n {
        bail!("{} lists {listed} entries, not {n}", dir.display());
    }
    let readdir = rate(n, started);
    let before = mark("", before)?;
    let started = Instant::now();
    for i in 0..n {
        std::fs::remove_file(name(i))?;
    }
    let unlink = rate(n, started);
    mark("unlink", before)?;
    Ok(Meta {
        create,
        stat,
        readdir,
        unlink,
        cost,
    })
}

/// The median of a few measurements.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Each phase's median rate over rounds; the cost model of the last round.
fn medians(rounds: &[Meta]) -> Meta {
    let med = |f: fn(&Meta) -> f64| median(rounds.iter().map(f).collect());
    Meta {
        create: med(|m| m.create),
        stat: med(|m| m.stat),
        readdir: med(|m| m.readdir),
        unlink: med(|m| m.unlink),
        cost: rounds.last().map(|m| m.cost.clone()).unwrap_or_default(),
    }
}

/// Rounds of each workload, alternating the file systems, of which the median counts:
/// single runs on a shared machine vary by a third.
const ROUNDS: usize = 3;
/// Rounds of each fio job: the plain file's own rate moves by half from one run to
/// the next on the shared machines.
const STREAM_ROUNDS: usize = 5;

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// One fio job (psync unless `extra` names another engine); returns MiB/s (read +
/// write).
fn fio(file: &Path, rw: &str, bs: &str, size: &str, direct: bool, extra: &[&str]) -> Result<f64> {
    let out = Cmd::new("fio")
        .arg("--name=bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--size={size}"))
        .arg(format!("--direct={}", u8::from(direct)))
        .arg("--output-format=json")
        .args((!extra.iter().any(|a| a.starts_with("--ioengine="))).then_some("--ioengine=psync"))
        .args(extra)
        .read()?;
    let json: serde_json::Value = serde_json::from_str(&out).context("fio's JSON output")?;
    let job = &json["jobs"][0];
    let kib =
        job["read"]["bw"].as_f64().unwrap_or(0.0) + job["write"]["bw"].as_f64().unwrap_or(0.0);
    Ok(kib / 1024.0)
}

fn need(program: &str, package: &str) -> Result<()> {
    if sh::which(program).is_none() {
        Cmd::new("apt-get")
            .args(["install", "-y", "-q", package])
            .run()?;
    }
    Ok(())
}

/// `ats`: the volume's test-and-set, as `mkfs.atsfs --ats` takes it.
pub fn run(quick: bool, ats: &str) -> Result<String> {
    crate::require_root_and_fuse("bench --fuse")?;
    need("bindfs", "bindfs")?;
    need("fio", "fio")?;
    need("mkfs.ext4", "e2fsprogs")?;
    let bin = crate::install::build_release()?;
    let atsfs = bin.join("atsfs");
    let mkfs = bin.join("mkfs-atsfs");
    let temp = tempfile::Builder::new()
        .prefix("atsfs-fusebench-")
        .tempdir()?;
    let dir = temp.path();
    let mut cleanup = Cleanup::default();
    let (files, stream) = if quick { (2000, "256M") } else { (10000, "1G") };

    // atsfs, one host.
    let image = dir.join("atsfs.img");
    Cmd::new(&mkfs)
        .args(["-q", "--size", "4G", "--ats", ats])
        .arg(&image)
        .run()?;
    let mnt_atsfs = dir.join("atsfs");
    std::fs::create_dir_all(&mnt_atsfs)?;
    Cmd::new(&atsfs)
        .args([
            "mount",
            "--host-id",
            "b0000000-0000-4000-8000-00000000000b",
            "--log",
        ])
        .arg(dir.join("atsfs.log"))
        .arg(&image)
        .arg(&mnt_atsfs)
        .run()?;
    cleanup.mounts.push(mnt_atsfs.clone());

    // ext4 on a loop device, and bindfs over it.
    let ext4_img = dir.join("ext4.img");
    std::fs::File::create(&ext4_img)?.set_len(4 << 30)?;
    let lo = Cmd::new("losetup")
        .args(["-f", "--show"])
        .arg(&ext4_img)
        .read()?
        .trim()
        .to_string();
    cleanup.loops.push(lo.clone());
    Cmd::new("mkfs.ext4").args(["-q", "-F", &lo]).run()?;
    let mnt_ext4 = dir.join("ext4");
    std::fs::create_dir_all(&mnt_ext4)?;
    Cmd::new("mount").arg(&lo).arg(&mnt_ext4).run()?;
    cleanup.mounts.push(mnt_ext4.clone());
    let mnt_bindfs = dir.join("bindfs");
    std::fs::create_dir_all(&mnt_bindfs)?;
    std::fs::create_dir_all(mnt_ext4.join("under-bindfs"))?;
    Cmd::new("bindfs")
        .arg(mnt_ext4.join("under-bindfs"))
        .arg(&mnt_bindfs)
        .run()?;
    cleanup.mounts.push(mnt_bindfs.clone());

    let probe = || atsfs_io(&atsfs, &mnt_atsfs);
    let mut runs: [Vec<Meta>; 3] = Default::default();
    for round in 0..ROUNDS {
        let dir = format!("meta-{round}");
        // Rotate who goes first, so that no one always runs on a warmer machine.
        for k in 0..3 {
            let which = (round + k) % 3;
            let m = match which {
                0 => metadata(&mnt_atsfs.join(&dir), files, Some(&probe))?,
                1 => metadata(&mnt_bindfs.join(&dir), files, None)?,
                _ => metadata(&mnt_ext4.join(&dir), files, None)?,
            };
            runs[which].push(m);
        }
    }
    let [m_atsfs, m_bindfs, m_ext4] = runs.map(|r| medians(&r));

    let mut table = format!(
        "Medians of {ROUNDS} rounds; in each round atsfs, bindfs and ext4 run the workload one after another, in rotating order.\n\n\
         | measure | atsfs | bindfs over ext4 | ext4 | atsfs / bindfs | target |\n|---|---|---|---|---|---|\n"
    );
    for (what, a, b, e) in [
        (
            "create + 100 B write + close /s",
            m_atsfs.create,
            m_bindfs.create,
            m_ext4.create,
        ),
        ("stat /s", m_atsfs.stat, m_bindfs.stat, m_ext4.stat),
        (
            "readdir entries /s",
            m_atsfs.readdir,
            m_bindfs.readdir,
            m_ext4.readdir,
        ),
        ("unlink /s", m_atsfs.unlink, m_bindfs.unlink, m_ext4.unlink),
    ] {
        let target = if what.starts_with("readdir") {
            "-"
        } else {
            ">= 1.0x"
        };
        table.push_str(&format!(
            "| {what} ({files} files) | {a:.0} | {b:.0} | {e:.0} | {:.2}x | {target} |\n",
            a / b
        ));
    }

    // Streaming: the same fio job on atsfs (through FUSE) and on a plain file, both
    // with O_DIRECT; on bindfs with O_DIRECT (what FUSE itself costs); and on atsfs
    // through the page cache, for what buffered I/O costs. The buffered job has a
    // file of its own: on the O_DIRECT job's file it would leave a gigabyte of the
    // kernel's FUSE page cache that the next O_DIRECT write must write back and drop
    // first, a cost no other column pays.
    let plain = dir.join("plain.bin");
    let on_atsfs = mnt_atsfs.join("stream.bin");
    let on_atsfs_buffered = mnt_atsfs.join("stream-buffered.bin");
    let on_bindfs = mnt_bindfs.join("stream.bin");
    let mut stream_rows = Vec::new();
    for (what, rw, bs, extra) in [
        (
            "sequential write 1 MiB blocks, fsync at end",
            "write",
            "1M",
            vec!["--end_fsync=1"],
        ),
        ("cold sequential read 1 MiB blocks", "read", "1M", vec![]),
        (
            "cold sequential read 1 MiB blocks, 4 in flight (libaio)",
            "read",
            "1M",
            vec!["--ioengine=libaio", "--iodepth=4"],
        ),
        (
            "4 KiB random read/write",
            "randrw",
            "4k",
            vec!["--runtime=10", "--time_based"],
        ),
    ] {
        // [atsfs O_DIRECT, atsfs buffered, plain O_DIRECT, bindfs O_DIRECT], in
        // rotating order.
        let mut runs: [Vec<f64>; 4] = Default::default();
        for round in 0..STREAM_ROUNDS {
            for k in 0..4 {
                let which = (round + k) % 4;
                if rw == "read" {
                    drop_caches();
                }
                let (file, direct) = match which {
                    0 => (&on_atsfs, true),
                    1 => (&on_atsfs_buffered, false),
                    2 => (&plain, true),
                    _ => (&on_bindfs, true),
                };
                runs[which].push(fio(file, rw, bs, stream, direct, &extra)?);
            }
        }
        let [d, b, p, f] = runs.map(median);
        stream_rows.push(format!(
            "| {what} ({stream}) | {d:.0} MiB/s | {p:.0} MiB/s | {:.2}x | >= 0.8x | {f:.0} MiB/s | {:.2}x | {b:.0} MiB/s | {:.2}x |\n",
            d / p,
            d / f,
            b / p
        ));
    }
    table.push_str(&format!(
        "\nMedians of {STREAM_ROUNDS} rounds of the same fio job (psync, one request at a time, unless the row says otherwise) with O_DIRECT on atsfs, on a plain file (the target's baseline) and on bindfs over ext4 (what FUSE itself costs); the last two columns are atsfs without O_DIRECT (through the page cache) against the plain file.\n\n\
         | streaming | atsfs, O_DIRECT | plain file, O_DIRECT | ratio | target | bindfs, O_DIRECT | atsfs / bindfs | atsfs, buffered | ratio |\n|---|---|---|---|---|---|---|---|---|\n",
    ));
    for row in stream_rows {
        table.push_str(&row);
    }
    table.push_str(&format!(
        "\natsfs device I/O per operation, from the daemon's counters (`atsfs stats`, last round, background commits included):\n\n\
         | phase ({files} files) | reads | writes | ATS | flushes |\n|---|---|---|---|---|\n"
    ));
    for (what, io) in &m_atsfs.cost {
        table.push_str(&format!(
            "| {what} | {:.2} | {:.2} | {:.2} | {:.3} |\n",
            io.reads, io.writes, io.caws, io.flushes
        ));
    }
    drop(cleanup);
    Ok(table)
}
