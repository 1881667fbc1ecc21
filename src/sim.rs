//! The cluster simulator: many hosts in one process over one shared in-memory LUN,
//! random operations chosen from a seed, and checkers after every step.
//!
//! - Every host is a real `Fs` over its own `FaultLun` (seeded latency and, with
//!   `faults`, lost replies) on one `MemLun`, whose compare-and-write is an atomic
//!   one-sector ATS. Volumes use a 100 ms heartbeat and a 600 ms lease, so leases run
//!   out fast on the real clock (the manual clock does not mix with the hosts' own
//!   threads).
//! - With `disk_paxos`, the volume is a Disk Paxos one and each host is as if on its
//!   own kernel with a plain disk: `PlainDisk` (no compare-and-write; the shared
//!   `TraceLun` under every host refuses one too, so nothing goes around it), and
//!   only a sector is atomic: the `FaultLun` carries multi-sector reads and writes
//!   out sector by sector (a write's sectors in a random order), so other hosts' I/O
//!   lands between them. With `faults` also: torn writes (a random subset of a
//!   multi-sector write lands, the call fails; one sector never tears) and delayed
//!   writes (in flight up to the token's margin, the `io_max` the protocol allows,
//!   landing at a random point: writes reordered between hosts). Each host's clock
//!   is a `PausableClock` over the common one, and pauses may stop a host mid-protocol
//!   (`PausePoint`: at a clock read anywhere, mid-ballot, holding the token, between
//!   the read and the write of the delta rule).
//! - The RNG decides everything the simulator does (which host, which operation,
//!   which name, crashes, restarts, pauses and their points) and each host's faults
//!   (seeded per mount); thread timing inside the hosts still varies from run to run
//!   (each host's renewal, commit, mailbox and token-releaser threads, two hosts'
//!   concurrent operations, which thread reaches a pause point first, sleeps), so a
//!   failing seed usually, not always, fails again. `ATSFS_SIM_TRACE=1` keeps a
//!   backtrace of every write over a block's first sector, and a lock-safety failure
//!   then prints every write to that block and its group's header, by host, with the
//!   simulator's steps in between (`TraceLog`).
//! - Pauses: a host's I/O is held up past its lease (`PausableLun`, as a SIGSTOP or a
//!   lost path would), with a read in flight (or, at a protocol point, a write);
//!   another host recovers it and writes the same file; the paused host is asked
//!   again while paused (not when stopped at a protocol point: it holds its core
//!   lock, as a stopped host would) and after, and the other host must read its own
//!   write back.
//! - Checkers after every step: (1) lock safety: every lock a live host believes it
//!   holds is recorded on disk with that host as holder (exclusive: alone), so two
//!   hosts never both own one; (2) every operation completes or fails with a clean
//!   errno (EIO only from an injected fault or a fence); (3) coherence: data a host
//!   wrote is read back by another host at once, and two hosts list a directory
//!   alike; fenced hosts are asked too; (4) fencing: an operation that starts after
//!   its host's lease ran out fails with EIO, and no operation on any host returns
//!   data that a later-fenced host could not have seen before its lease ran out
//!   (written by another host only after that); (5) at the end, after unmounting,
//!   fsck finds no problem.

use crate::cluster::{Clock, HostUuid, SystemClock};
use crate::format::{LockRecord, OnDisk};
use crate::fs::{Fs, FsError, MountOptions};
use crate::lun::{Caw, FaultConfig, FaultLun, Lun, LunError, LunResult, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const REG: u32 = libc::S_IFREG | 0o644;
/// Directories the hosts share: few, so that they contend.
const DIRS: [&[u8]; 3] = [b"d0", b"d1", b"d2"];
/// Names per directory.
const NAMES: u32 = 12;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub hosts: usize,
    pub seed: u64,
    pub steps: usize,
    /// Inject lost replies (hosts that see one on a commit fence themselves and are
    /// restarted).
    pub faults: bool,
    /// Make a Disk Paxos volume and give every host a plain disk with no
    /// compare-and-write (`PlainDisk`): no lock of any kind is shared between the
    /// hosts but the disk itself, as if each ran on its own kernel.
    pub disk_paxos: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SimSummary {
    pub ops: u64,
    pub ok: u64,
    pub clean_errors: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub locks_checked: u64,
    /// Hosts paused past their lease, and the answers of fenced hosts checked.
    pub pauses: u64,
    pub fenced_checked: u64,
    /// Pauses that stopped a thread of the host at a protocol point (Disk Paxos mode:
    /// a clock read, mid-ballot, holding the token, in the delta rule), and those
    /// whose point was not reached in time (the host was paused at once instead).
    pub pause_points: u64,
    pub pause_points_missed: u64,
    /// Mounts and unmounts that failed because the host fenced itself after its lease
    /// lapsed (renewals late under load) and were tried again, as after a fault.
    pub lease_lapses: u64,
    /// Writes not made durable whose host failed before another host read them
    /// (the read may show the file as before).
    pub unsynced_lost: u64,
}

struct Host {
    uuid: HostUuid,
    fs: Option<Arc<Fs>>,
    /// Holds this host's I/O up, for pauses.
    lun: Option<Arc<PausableLun>>,
    /// File contents this mount's reads returned, with what read them: checked
    /// against its lease once it is fenced.
    seen: Vec<(Vec<u8>, String)>,
}

struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    mem: Arc<MemLun>,
    hosts: Vec<Host>,
    summary: SimSummary,
    step: usize,
    /// The clock every host measures its lease on, so that times compare.
    clock: Arc<dyn Clock>,
    /// Every content written, by whom and when the write started.
    written: HashMap<Vec<u8>, (usize, u64)>,
    /// Every write that landed on `mem`, by host.
    trace: Arc<Mutex<TraceLog>>,
    mounts: u64,
    geo: crate::format::Geometry,
    /// The longest a write may sit in the I/O path, as the protocols assume: delayed
    /// writes stay in flight at most this long (Disk Paxos mode).
    io_max_us: u64,
}

/// Runs one seed. `Err` names the seed, the step and what went wrong.
pub fn run(cfg: &SimConfig) -> Result<SimSummary, String> {
    let mut sim = Sim::new(cfg.clone())?;
    let result = sim.run_steps();
    let finish = sim.finish();
    result.and(finish).map(|()| sim.summary.clone())
}

impl Sim {
    fn new(cfg: SimConfig) -> Result<Sim, String> {
        let hosts = cfg.hosts.clamp(1, crate::format::HOSTS_MAX as usize);
        let mem = Arc::new(MemLun::new(256 << 20, 512));
        let opts = MkfsOptions {
            max_hosts: hosts as u32,
            heartbeat_interval: Duration::from_millis(100),
            lease: Duration::from_millis(600),
            journal_bytes: Some(1 << 20),
            ats_mode: if cfg.disk_paxos {
                crate::format::ATS_MODE_DISK_PAXOS
            } else {
                crate::format::ATS_MODE_EMULATED
            },
            ..MkfsOptions::default()
        };
        mkfs(mem.as_ref(), &opts, &mut |_, _| {}).map_err(|e| format!("mkfs: {e}"))?;
        let sb =
            crate::fs::read_superblock(mem.as_ref()).map_err(|e| format!("superblock: {e:#}"))?;
        let geo = crate::format::Geometry::from_superblock(&sb);
        // The token's margin: the longest a write may sit in the I/O path between the
        // holder's check and its landing (docs/locking.md, "A paused holder").
        let io_max_us = crate::cluster::paxos::TokenTiming::for_token(u64::from(sb.paxos_token_ms))
            .margin_ms
            * 1000;
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(cfg.seed),
            mem,
            hosts: (0..hosts)
                .map(|i| Host {
                    uuid: HostUuid([i as u8 + 1; 16]),
                    fs: None,
                    lun: None,
                    seen: Vec::new(),
                })
                .collect(),
            summary: SimSummary::default(),
            step: 0,
            clock: Arc::new(SystemClock::default()),
            written: HashMap::new(),
            trace: Arc::default(),
            mounts: 0,
            geo,
            io_max_us,
            cfg,
        };
        for i in 0..hosts {
            sim.mount(i)?;
        }
        for dir in DIRS {
            sim.setup_dir(dir)?;
        }
        Ok(sim)
    }

    /// Makes one of the shared directories on host 0. A host that an injected fault
    /// (or a lease lapse) stopped is restarted and asked again, as for a mount.
    fn setup_dir(&mut self, dir: &[u8]) -> Result<(), String> {
        const TRIES: u32 = 4;
        for _ in 0..TRIES {
            let Some(fs) = self.live_host(0) else {
                self.mount(0)?;
                continue;
            };
            match fs.mkdir(fs.root(), dir, 0o755, 0, 0) {
                Ok(_) => return Ok(()),
                // Made by a try whose reply was lost.
                Err(e) if e.errno() == libc::EEXIST => return Ok(()),
                Err(e) if e.errno() == libc::EIO && (self.cfg.faults || fs.lease().is_fenced()) => {
                    self.summary.clean_errors += 1;
                    self.note_lapse(&format!("{e}"));
                    self.drop_fenced(0)?;
                }
                Err(e) => return Err(self.fail(&format!("mkdir: {e}"))),
            }
        }
        Err(self.fail(&format!("mkdir: no try left in {TRIES}")))
    }

    /// Counts a host that fenced itself because its lease lapsed (its renewals ran
    /// late, on a loaded machine with the simulator's 600 ms lease).
    fn note_lapse(&mut self, error: &str) {
        if error.contains("lease not renewed") {
            self.summary.lease_lapses += 1;
        }
    }

    fn event(&self, what: String) {
        if let Ok(mut log) = self.trace.lock() {
            log.event(self.clock.now_ms(), what);
        }
    }

    fn fail(&self, what: &str) -> String {
        let mut out = format!("seed={} step={}: {what}", self.cfg.seed, self.step);
        if std::env::var_os("ATSFS_SIM_TRACE").is_some() {
            let log = self.trace.lock().unwrap_or_else(|e| e.into_inner());
            out.push_str(&format!(
                "\nthe simulator's last steps:\n{}",
                log.events(60)
            ));
        }
        out
    }

    /// Mounts host `i`. A mount that fails on an injected fault (a lost reply during
    /// its replay) or a lease lapse fails cleanly, as an I/O error does for an admin,
    /// who mounts again: so does the simulator, up to `MOUNT_TRIES` times, each with
    /// other faults (`restartable`).
    fn mount(&mut self, i: usize) -> Result<(), String> {
        const MOUNT_TRIES: u64 = 4;
        for attempt in 0..MOUNT_TRIES {
            match self.mount_once(i, attempt) {
                Err(e) if restartable(&e) && attempt + 1 < MOUNT_TRIES => {
                    self.event(format!("mount of host {i} failed: {e}"));
                    self.summary.clean_errors += 1;
                    self.note_lapse(&e);
                }
                other => return other,
            }
        }
        Err(self.fail(&format!("mount of host {i}: no try left")))
    }

    fn mount_once(&mut self, i: usize, attempt: u64) -> Result<(), String> {
        let faults = self.cfg.faults;
        let paxos = self.cfg.disk_paxos;
        let config = FaultConfig {
            seed: self
                .cfg
                .seed
                .wrapping_mul(1000)
                .wrapping_add(i as u64 + self.summary.restarts)
                .wrapping_add(attempt * 7919),
            latency_max_us: 50,
            lost_reply_prob: if faults { 0.0005 } else { 0.0 },
            // On a plain disk only a sector is atomic: others' I/O comes between the
            // sectors of one command, and a failed write may land in part.
            sector_by_sector: paxos,
            torn_write_prob: if faults && paxos { 0.0005 } else { 0.0 },
            // Writes reordered between hosts, within the io_max the token allows for.
            delayed_write_prob: if faults && paxos { 0.01 } else { 0.0 },
            delay_max_us: if paxos { self.io_max_us } else { 0 },
            ..FaultConfig::default()
        };
        self.mounts += 1;
        let traced = TraceLun {
            inner: self.mem.clone(),
            host: i,
            mount: self.mounts,
            clock: self.clock.clone(),
            log: self.trace.clone(),
            backtraces: std::env::var_os("ATSFS_SIM_TRACE").is_some(),
            caw: !paxos,
        };
        let faulty: Arc<dyn Lun> = Arc::new(FaultLun::new(traced, config));
        let pause = Arc::new(HostPause::new(paxos.then(|| self.mem.clone())));
        let pausable = Arc::new(PausableLun::with_pause(faulty, pause.clone()));
        let lun: Arc<dyn Lun> = if paxos {
            Arc::new(crate::lun::PlainDisk(pausable.clone()))
        } else {
            pausable.clone()
        };
        let mut options = MountOptions::new(self.hosts[i].uuid);
        options.commit_interval = Duration::from_millis(200);
        options.clock = if paxos {
            Arc::new(PausableClock {
                inner: self.clock.clone(),
                pause: pause.clone(),
            })
        } else {
            self.clock.clone()
        };
        let fs =
            Fs::mount(lun, options).map_err(|e| self.fail(&format!("mount of host {i}: {e:#}")))?;
        if paxos {
            let slot = fs.slot().map(|(slot, _)| slot);
            pause.set_points(slot.and_then(|slot| ProtocolPoints::of(&self.geo, slot)));
        }
        self.event(format!("host {i} mounted (mount {})", self.mounts));
        self.hosts[i].fs = Some(fs);
        self.hosts[i].lun = Some(pausable);
        self.hosts[i].seen.clear();
        Ok(())
    }

    /// True when the host may no longer answer anything: fenced, or its lease ran
    /// out by its clock (it fences itself at its next operation).
    fn lease_gone(&self, fs: &Fs) -> bool {
        fs.lease().is_fenced() || self.clock.now_ms() >= fs.lease().expires_at_ms()
    }

    /// Stops host `i`'s I/O for good: it crashed (its `Fs` may live on a little in
    /// threads that still hold it, which must not renew its slot nor write).
    fn kill(&self, i: usize) {
        if let Some(lun) = &self.hosts[i].lun {
            lun.host_pause().kill();
        }
    }

    /// Drops a host that was fenced (it is restarted later with a new generation),
    /// after checking what its reads returned against its lease.
    fn drop_fenced(&mut self, host: usize) -> Result<(), String> {
        self.check_seen(host)?;
        if self.hosts[host].fs.take().is_some() {
            self.kill(host);
            self.event(format!("host {host} fenced: dropped"));
            self.summary.crashes += 1;
        }
        Ok(())
    }

    /// No read of a fenced host returned data another host wrote only after the
    /// fenced host's lease had run out: data it could not have seen while its lease
    /// ran (another host writes a file this one had locked only after recovering it,
    /// one lease after its last renewal).
    fn check_seen(&mut self, host: usize) -> Result<(), String> {
        let Some(fs) = self.hosts[host].fs.clone() else {
            return Ok(());
        };
        if !self.lease_gone(&fs) {
            return Ok(());
        }
        let expired_ms = fs.lease().expires_at_ms();
        for (content, what) in std::mem::take(&mut self.hosts[host].seen) {
            self.summary.fenced_checked += 1;
            if let Some(&(writer, started_ms)) = self.written.get(&content) {
                if writer != host && started_ms >= expired_ms {
                    return Err(self.fail(&format!(
                        "host {host} ({what}) returned {:?}, which host {writer} began to write \
                         {} ms after host {host}'s lease ran out",
                        String::from_utf8_lossy(&content),
                        started_ms - expired_ms
                    )));
                }
            }
        }
        Ok(())
    }

    fn live_host(&self, i: usize) -> Option<Arc<Fs>> {
        self.hosts.get(i).and_then(|h| h.fs.clone())
    }

    fn random_live(&mut self) -> Option<(usize, Arc<Fs>)> {
        let live: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| self.hosts[i].fs.is_some())
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = live[self.rng.gen_range(0..live.len())];
        self.live_host(i).map(|fs| (i, fs))
    }

    fn run_steps(&mut self) -> Result<(), String> {
        for step in 0..self.cfg.steps {
            self.step = step;
            self.event(format!("step {step}"));
            let roll = self.rng.gen_range(0..100);
            if roll < 2 && self.hosts.len() > 1 {
                self.crash_one();
            } else if roll < 4 && self.hosts.len() > 1 {
                self.pause_one()?;
            } else if roll < 6 {
                self.restart_one()?;
            } else if roll < 20 && self.hosts.len() > 1 {
                self.concurrent_step()?;
            } else {
                self.one_op()?;
            }
            self.check_locks()?;
        }
        Ok(())
    }

    fn crash_one(&mut self) {
        let i = self.rng.gen_range(0..self.hosts.len());
        if self.hosts[i].fs.take().is_some() {
            self.kill(i);
            self.event(format!("crash of host {i}"));
            self.summary.crashes += 1;
        }
    }

    fn restart_one(&mut self) -> Result<(), String> {
        let down: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| self.hosts[i].fs.is_none())
            .collect();
        if down.is_empty() {
            return self.one_op();
        }
        let i = down[self.rng.gen_range(0..down.len())];
        self.summary.restarts += 1;
        self.mount(i)
    }

    /// Picks an operation and its arguments.
    fn pick(&mut self) -> Op {
        let dir = self.rng.gen_range(0..DIRS.len());
        let name = format!("n{}", self.rng.gen_range(0..NAMES)).into_bytes();
        let kind = self.rng.gen_range(0..100);
        let value = self.rng.gen::<u32>();
        Op {
            dir,
            name,
            kind,
            value,
        }
    }

    fn one_op(&mut self) -> Result<(), String> {
        let Some((i, fs)) = self.random_live() else {
            return Ok(());
        };
        let op = self.pick();
        let gone = self.lease_gone(&fs);
        let started_ms = self.clock.now_ms();
        let outcome = op.apply(&fs);
        let succeeded = outcome.is_ok();
        self.account(i, &op, gone, outcome)?;
        let written = if succeeded { op.written() } else { None };
        if let Some(content) = &written {
            self.written.insert(content.clone(), (i, started_ms));
        }
        // Coherence: what a host wrote, another host reads at once (a fenced one must
        // refuse).
        if let (Some(expected), Some((j, other))) = (written, self.random_live()) {
            if j != i {
                let unsynced = (!op.synced()).then_some(Unsynced(fs.as_ref()));
                self.check_read(j, &other, &op, &expected, unsynced)?;
            }
        }
        Ok(())
    }

    /// Two hosts at once, each on its own thread, on the same directory.
    fn concurrent_step(&mut self) -> Result<(), String> {
        let (Some((i, a)), Some((j, b))) = (self.random_live(), self.random_live()) else {
            return Ok(());
        };
        let (op_a, mut op_b) = (self.pick(), self.pick());
        op_b.dir = op_a.dir;
        let (gone_a, gone_b) = (self.lease_gone(&a), self.lease_gone(&b));
        let started_ms = self.clock.now_ms();
        let ta = {
            let (a, op) = (a.clone(), op_a.clone());
            std::thread::spawn(move || op.apply(&a))
        };
        let rb = op_b.apply(&b);
        let ra = ta
            .join()
            .map_err(|_| self.fail("a host operation panicked"))?;
        for (host, op, outcome) in [(i, &op_a, &ra), (j, &op_b, &rb)] {
            if let (Ok(()), Some(content)) = (outcome, op.written()) {
                self.written.insert(content, (host, started_ms));
            }
        }
        self.account(i, &op_a, gone_a, ra)?;
        self.account(j, &op_b, gone_b, rb)?;
        self.check_listing(&a, &b, op_a.dir)
    }

    /// Holds one host's I/O up past its lease with a read of a file in flight; another
    /// host recovers it and writes that file; the paused host must then refuse
    /// everything (while still paused, from its caches, and after), and the read in
    /// flight must not return what the other host wrote. In Disk Paxos mode the pause
    /// may instead stop a thread of the host at a protocol point (`PausePoint`), with
    /// a write of the same file in flight: `pause_at`.
    fn pause_one(&mut self) -> Result<(), String> {
        let (Some((h, fs)), Some((j, other))) = (self.random_live(), self.random_live()) else {
            return Ok(());
        };
        let Some(lun) = self.hosts[h].lun.clone() else {
            return Ok(());
        };
        if h == j {
            return self.one_op();
        }
        self.summary.pauses += 1;
        let mut op = self.pick();
        op.kind = 30; // a write of its own content, below
        if self.cfg.disk_paxos {
            let point = match self.rng.gen_range(0..5) {
                0 => PausePoint::Now,
                1 => PausePoint::ClockRead(self.rng.gen_range(1..=40)),
                2 => PausePoint::MidBallot,
                3 => PausePoint::HoldingToken,
                _ => PausePoint::DeltaRead,
            };
            if point != PausePoint::Now {
                return self.pause_at(h, &fs, &lun, j, &other, op, point);
            }
        }
        self.event(format!("pause of host {h}; host {j} overwrites"));
        // Warm the paused host's caches with the file, and hold its lock.
        let _ = read_file(&fs, op.dir, &op.name);
        lun.pause();
        let in_flight = {
            let (fs, dir, name) = (fs.clone(), op.dir, op.name.clone());
            std::thread::spawn(move || read_file(&fs, dir, &name))
        };
        self.wait_past_lease(&fs);
        // The other host overwrites the file in place (recovering the paused host when
        // it needs one of its locks), all of it after the paused host's lease ran out.
        let started_ms = self.clock.now_ms();
        let outcome = op.overwrite(&other);
        if let (Ok(()), Some(content)) = (&outcome, op.written()) {
            self.written.insert(content, (j, started_ms));
        }
        let other_gone = self.lease_gone(&other);
        self.account(j, &op, other_gone, outcome)?;
        self.wait_past_lease(&fs);
        let probes = self.probe_paused(h, &fs, &op);
        lun.resume();
        probes?;
        let read = in_flight
            .join()
            .map_err(|_| self.fail("a read on the paused host panicked"))?;
        match read {
            Ok(data) => self.hosts[h]
                .seen
                .push((data, "a read in flight while paused".into())),
            Err(e) if e.errno() == libc::EIO => {}
            Err(e) if [libc::ENOENT, libc::EISDIR, libc::EAGAIN].contains(&e.errno()) => {}
            Err(e) => {
                return Err(self.fail(&format!(
                    "host {h}: a read in flight while paused failed with {e}"
                )))
            }
        }
        self.drop_fenced(h)
    }

    /// Host `h` writes a file (its own content) while one of its threads is stopped at
    /// `point` (the host's I/O held up with it) until past its lease; host `j`
    /// overwrites the same file meanwhile (recovering `h` for its lock). Once `h`
    /// goes on, it must refuse everything, and nothing it did may land over `j`'s
    /// write: `j` reads its own content back.
    #[allow(clippy::too_many_arguments)]
    fn pause_at(
        &mut self,
        h: usize,
        fs: &Arc<Fs>,
        lun: &Arc<PausableLun>,
        j: usize,
        other: &Arc<Fs>,
        op: Op,
        point: PausePoint,
    ) -> Result<(), String> {
        let pause = lun.host_pause().clone();
        let mut mine = op.clone();
        mine.value = self.rng.gen();
        self.event(format!(
            "pause of host {h} at {point:?}; host {j} overwrites"
        ));
        let _ = read_file(fs, op.dir, &op.name);
        let mine_started_ms = self.clock.now_ms();
        pause.arm(point);
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (fs, mine) = (fs.clone(), mine.clone());
            std::thread::spawn(move || {
                let _ = tx.send(mine.overwrite(&fs));
            });
        }
        let deadline_ms = self.clock.now_ms() + 3_000;
        while !pause.fired() && self.clock.now_ms() < deadline_ms {
            self.clock.sleep(Duration::from_millis(2));
        }
        if pause.fired() {
            self.summary.pause_points += 1;
        } else {
            self.summary.pause_points_missed += 1;
        }
        pause.pause();
        self.event(format!(
            "host {h} paused (point reached: {})",
            pause.fired()
        ));
        self.wait_past_lease(fs);
        let started_ms = self.clock.now_ms();
        let outcome = op.overwrite(other);
        let overwritten = outcome.is_ok();
        if let (Ok(()), Some(content)) = (&outcome, op.written()) {
            self.written.insert(content, (j, started_ms));
        }
        let other_gone = self.lease_gone(other);
        self.account(j, &op, other_gone, outcome)?;
        self.wait_past_lease(fs);
        pause.resume();
        self.event(format!("host {h} resumed"));
        let mine_outcome = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
            self.fail(&format!(
                "host {h}: a write paused at {point:?} never ended"
            ))
        })?;
        match mine_outcome {
            Ok(()) => {
                if let Some(content) = mine.written() {
                    self.written.insert(content, (h, mine_started_ms));
                }
            }
            Err(e) if e.errno() == libc::EIO => {}
            Err(e) if [libc::ENOENT, libc::EISDIR, libc::EAGAIN].contains(&e.errno()) => {}
            Err(e) => {
                return Err(self.fail(&format!(
                    "host {h}: a write paused at {point:?} failed with {e}"
                )))
            }
        }
        // Past its lease, the host refuses everything once it goes on.
        self.probe_paused(h, fs, &op)?;
        // Nothing the paused host had in flight landed over the other host's write.
        if overwritten && self.hosts[j].fs.is_some() {
            if let Some(expected) = op.written() {
                // `overwrite` does not truncate: a longer old content keeps its tail.
                self.check_read(j, other, &op, &expected, Some(Overwrite))?;
            }
        }
        self.drop_fenced(h)
    }

    /// Waits until the host's lease has run out by its clock (a renewal issued just
    /// before a pause may still be recorded after it: the expiry is read again).
    fn wait_past_lease(&self, fs: &Fs) {
        let deadline_ms = self.clock.now_ms() + 10_000;
        while !self.lease_gone(fs) && self.clock.now_ms() < deadline_ms {
            self.clock.sleep(Duration::from_millis(20));
        }
    }

    /// Asks a host paused past its lease for a file's attributes, its directory and
    /// its data: each must fail with EIO at once, from whatever it has cached.
    fn probe_paused(&mut self, h: usize, fs: &Arc<Fs>, op: &Op) -> Result<(), String> {
        let probes: [(&str, Probe); 3] = [
            ("stat", |fs, dir, name| {
                let d = fs.lookup(fs.root(), DIRS[dir])?.ino;
                fs.lookup(d, name).map(|_| ())
            }),
            ("readdir", |fs, dir, _| listing(fs, dir).map(|_| ())),
            ("read", |fs, dir, name| read_file(fs, dir, name).map(|_| ())),
        ];
        for (what, probe) in probes {
            self.summary.fenced_checked += 1;
            let (fs, dir, name) = (fs.clone(), op.dir, op.name.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(probe(&fs, dir, &name));
            });
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Err(e)) if e.errno() == libc::EIO => {}
                Ok(outcome) => {
                    return Err(self.fail(&format!(
                        "host {h}, paused past its lease, answered a {what} with {outcome:?}"
                    )))
                }
                Err(_) => {
                    return Err(self.fail(&format!(
                        "host {h}, paused past its lease, did not answer a {what}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Counts an operation's outcome and checks it; `gone`: the host's lease had run
    /// out before the operation started.
    fn account(
        &mut self,
        host: usize,
        op: &Op,
        gone: bool,
        outcome: Result<(), FsError>,
    ) -> Result<(), String> {
        self.summary.ops += 1;
        self.event(format!("host {host}: {op:?} -> {outcome:?}"));
        if gone {
            self.summary.fenced_checked += 1;
        }
        match outcome {
            Ok(()) if gone => {
                return Err(self.fail(&format!(
                    "host {host}: {op:?} succeeded after the host's lease ran out"
                )))
            }
            Ok(()) => self.summary.ok += 1,
            Err(e) => {
                let errno = e.errno();
                let clean = [
                    libc::EEXIST,
                    libc::ENOENT,
                    libc::ENOTEMPTY,
                    libc::EISDIR,
                    libc::ENOTDIR,
                    libc::EBUSY,
                    libc::EAGAIN,
                    libc::ESTALE,
                    libc::EINVAL,
                    libc::EPERM,
                    libc::EMLINK,
                ];
                let fenced = self.hosts[host]
                    .fs
                    .as_ref()
                    .is_some_and(|fs| fs.lease().is_fenced());
                if gone && errno != libc::EIO {
                    return Err(self.fail(&format!(
                        "host {host}: {op:?} failed with {e}, not EIO, after the host's lease ran out"
                    )));
                } else if clean.contains(&errno) {
                    self.summary.clean_errors += 1;
                } else if errno == libc::EIO && (self.cfg.faults || fenced) {
                    // An injected fault (or a fence after one): the host stops; a
                    // restart gives it a new generation.
                    self.summary.clean_errors += 1;
                    self.drop_fenced(host)?;
                } else {
                    return Err(self.fail(&format!("host {host}: {op:?} failed with {e}")));
                }
            }
        }
        Ok(())
    }

    fn check_locks(&mut self) -> Result<(), String> {
        let anomalies = {
            let mut log = self.trace.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut log.anomalies)
        };
        if let Some(first) = anomalies.first() {
            let block = first
                .split("lock record of ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .unwrap_or("?");
            return Err(self.fail(&format!(
                "lock safety: {}{}",
                anomalies.join("; "),
                self.history_of(&format!("resource {block}"))
            )));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if let Some(fs) = &host.fs {
                let n = fs.verify_locks().map_err(|e| {
                    self.fail(&format!(
                        "lock safety, host {i}: {e}{}",
                        self.history_of(&e)
                    ))
                })?;
                self.summary.locks_checked += n as u64;
            }
        }
        Ok(())
    }

    /// With `ATSFS_SIM_TRACE` set: the writes to the resource a lock error names.
    fn history_of(&self, error: &str) -> String {
        if std::env::var_os("ATSFS_SIM_TRACE").is_none() {
            return String::new();
        }
        let Some(block) = error
            .split("resource ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return String::new();
        };
        let log = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        let group = crate::fs::read_superblock(self.mem.as_ref())
            .ok()
            .map(|sb| crate::format::Geometry::from_superblock(&sb))
            .and_then(|geo| geo.ag_of(block).map(|ag| geo.ag_header(ag)));
        let mut out = format!("\nwrites to block {block}:\n{}", log.history(block, false));
        if let Some(header) = group {
            out.push_str(&format!(
                "\nwrites to its group's header {header}:\n{}",
                log.history(header, true)
            ));
        }
        out
    }

    /// Host `host` reads what `op` wrote: it must read `expected` (followed by the
    /// old content's tail after an `Overwrite`). Unless the write was not made durable
    /// (no fsync) and its host (`Unsynced`) failed since (an injected fault fenced it,
    /// or its lease lapsed): then the write is lost with it, as on any filesystem
    /// after a crash, and the read may show the file as before (counted in
    /// `unsynced_lost`).
    fn check_read(
        &mut self,
        host: usize,
        fs: &Fs,
        op: &Op,
        expected: &[u8],
        how: Option<Written<'_>>,
    ) -> Result<(), String> {
        let (unsynced, overwrite) = match how {
            Some(Unsynced(writer)) => (Some(writer), false),
            Some(Overwrite) => (None, true),
            None => (None, false),
        };
        let gone = self.lease_gone(fs);
        let (ino, found) = match lookup(fs, op.dir, &op.name) {
            Ok(ino) => (Some(ino), fs.read_data(ino, 0, 64)),
            Err(e) => (None, Err(e)),
        };
        if gone {
            // A fenced host refuses: it may not say what it had cached.
            self.summary.fenced_checked += 1;
            return match found {
                Err(e) if e.errno() == libc::EIO => Ok(()),
                other => Err(self.fail(&format!(
                    "host {host}, past its lease, answered a read with {:?}",
                    other.map(|d| String::from_utf8_lossy(&d).into_owned())
                ))),
            };
        }
        if let Ok(data) = &found {
            self.hosts[host]
                .seen
                .push((data.clone(), "a coherence read".into()));
        }
        let writer_failed = unsynced.is_some_and(|w| self.lease_gone(w));
        match found {
            Ok(data) if data == expected || (overwrite && data.starts_with(expected)) => Ok(()),
            Ok(data) if writer_failed => {
                let why = unsynced
                    .and_then(|w| w.lease().check().err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                self.event(format!(
                    "host {host} reads {:?} in {}/{}: the unsynced write of {:?} was lost with its host ({why})",
                    String::from_utf8_lossy(&data),
                    String::from_utf8_lossy(DIRS[op.dir]),
                    String::from_utf8_lossy(&op.name),
                    String::from_utf8_lossy(expected),
                ));
                self.summary.unsynced_lost += 1;
                Ok(())
            }
            Ok(data) => Err(self.fail(&format!(
                "host {host} reads {:?} in {}/{} after a write of {:?}{}",
                String::from_utf8_lossy(&data),
                String::from_utf8_lossy(DIRS[op.dir]),
                String::from_utf8_lossy(&op.name),
                String::from_utf8_lossy(expected),
                ino.map(|ino| self.history_of(&format!("resource {ino}")))
                    .unwrap_or_default()
            ))),
            // Gone meanwhile (a restart replayed nothing wrong; a concurrent host is
            // not running here) would be a bug too, except for transient lock waits.
            Err(e) if [libc::EAGAIN, libc::EIO].contains(&e.errno()) => Ok(()),
            Err(e) => Err(self.fail(&format!(
                "another host cannot read what was just written: {e}"
            ))),
        }
    }

    fn check_listing(&self, a: &Fs, b: &Fs, dir: usize) -> Result<(), String> {
        let (Ok(la), Ok(lb)) = (listing(a, dir), listing(b, dir)) else {
            return Ok(());
        };
        if la != lb {
            return Err(self.fail(&format!(
                "two hosts list {} differently: {} vs {} entries",
                String::from_utf8_lossy(DIRS[dir]),
                la.len(),
                lb.len()
            )));
        }
        Ok(())
    }

    /// Unmounts host `i` at the end. An unmount that an injected fault or a lease
    /// lapse broke (the host fenced itself: its commit's reply was lost, or its
    /// renewals ran late) is a crash: the host mounts again, which replays its
    /// journal, and unmounts again (bounded).
    fn unmount_at_end(&mut self, i: usize) -> Result<(), String> {
        const UNMOUNT_TRIES: u32 = 4;
        for _ in 0..UNMOUNT_TRIES {
            let Some(fs) = self.hosts[i].fs.take() else {
                return Ok(());
            };
            match fs.unmount() {
                Ok(()) => return Ok(()),
                Err(e) if restartable(&format!("{e:#}")) => {
                    self.note_lapse(&format!("{e:#}"));
                    drop(fs);
                    self.kill(i);
                    self.summary.crashes += 1;
                    self.mount(i)?;
                }
                Err(e) => return Err(self.fail(&format!("unmount of host {i}: {e:#}"))),
            }
        }
        Err(self.fail(&format!(
            "unmount of host {i}: injected faults broke {UNMOUNT_TRIES} unmounts"
        )))
    }

    /// Unmounts every host and checks the volume.
    fn finish(&mut self) -> Result<(), String> {
        for i in 0..self.hosts.len() {
            self.check_seen(i)?;
        }
        // Restart the hosts that are down so every journal is replayed by its owner
        // or recovered, then unmount all.
        for i in 0..self.hosts.len() {
            if self.hosts[i].fs.is_none() {
                self.mount(i)?;
            }
        }
        for i in 0..self.hosts.len() {
            self.unmount_at_end(i)?;
        }
        let report = crate::fsck::check(self.mem.as_ref())
            .map_err(|e| self.fail(&format!("fsck: {e:#}")))?;
        if !report.problems.is_empty() {
            return Err(self.fail(&format!(
                "fsck found {} problems: {:?}",
                report.problems.len(),
                report.problems
            )));
        }
        Ok(())
    }
}

/// Whether a mount or unmount failed on something the simulator provoked, after which
/// an admin would mount again: an injected fault, or a lease that lapsed (the host
/// fenced itself, as it must when its renewals run late; with the simulator's 600 ms
/// lease on a loaded machine they sometimes do; counted in `lease_lapses`).
fn restartable(error: &str) -> bool {
    error.contains("injected fault") || error.contains("lease not renewed")
}

/// How long paused I/O waits for `resume` at most (a bound on every wait).
const PAUSE_MAX: Duration = Duration::from_secs(60);

/// Where a pause stops a host (beyond holding up its I/O).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PausePoint {
    /// At once, wherever its threads are (`PausableLun::pause`).
    Now,
    /// The thread that reads the host's clock for the `n`-th time from now stops
    /// inside that read, before it gets the time: anywhere in the protocols (a token
    /// check, a lease check, a ballot step, a renewal). The time it gets when it goes
    /// on is the time after the pause: the host's clock ran (SIGSTOP, or a VM whose
    /// clock catches up), it did not stand still.
    ClockRead(u32),
    /// Right after one of the host's writes of its own Disk Paxos dblock landed: in
    /// the middle of a ballot (or after a waiter's request).
    MidBallot,
    /// Right after a read of a lock sector while the leader record names the host as
    /// the token's holder: holding the token, between a compare-and-write's read and
    /// its write.
    HoldingToken,
    /// Right after a read of a heartbeat sector: between the read and the write of
    /// the delta rule (a renewal, a takeover, a claim).
    DeltaRead,
}

/// The offsets that mark the Disk Paxos protocol points of one host.
#[derive(Clone, Copy, Debug)]
pub struct ProtocolPoints {
    pub slot: u32,
    pub own_dblock: u64,
    pub leader: u64,
    pub hb_first: u64,
    pub hb_stride: u64,
    pub hb_end: u64,
    pub data_start: u64,
    pub sector: usize,
}

impl ProtocolPoints {
    pub fn of(geo: &crate::format::Geometry, slot: u32) -> Option<ProtocolPoints> {
        let region = crate::cluster::paxos::PaxosRegion::of(geo)?;
        Some(ProtocolPoints {
            slot,
            own_dblock: region.dblock_offset(slot),
            leader: region.leader_offset,
            hb_first: geo.slot_offset(0),
            hb_stride: geo.slot_offset(1) - geo.slot_offset(0),
            hb_end: geo.slot_offset(geo.max_hosts),
            data_start: geo.ag_start * crate::format::BLOCK_SIZE_U64,
            sector: geo.ats_sector_size as usize,
        })
    }

    fn is_heartbeat(&self, offset: u64, len: usize) -> bool {
        len == self.sector
            && (self.hb_first..self.hb_end).contains(&offset)
            && (offset - self.hb_first) % self.hb_stride == 0
    }

    fn is_lock_sector(&self, offset: u64, len: usize) -> bool {
        len == self.sector
            && offset >= self.data_start
            && offset % crate::format::BLOCK_SIZE_U64 == 0
    }
}

/// One host's pause, shared by its `PausableLun` and `PausableClock`.
pub struct HostPause {
    state: Mutex<PauseState>,
    resumed: Condvar,
    /// The shared disk, to see who the leader record names (for `HoldingToken`).
    disk: Option<Arc<MemLun>>,
}

#[derive(Default)]
struct PauseState {
    /// The host crashed: every later I/O of it fails (a dropped `Fs` whose threads
    /// still run, finishing an operation, must not renew or write any more).
    dead: bool,
    paused: bool,
    armed: Option<PausePoint>,
    fired: bool,
    points: Option<ProtocolPoints>,
}

impl HostPause {
    pub fn new(disk: Option<Arc<MemLun>>) -> HostPause {
        HostPause {
            state: Mutex::new(PauseState::default()),
            resumed: Condvar::new(),
            disk,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_points(&self, points: Option<ProtocolPoints>) {
        self.state().points = points;
    }

    pub fn pause(&self) {
        self.state().paused = true;
    }

    /// The host is gone: its I/O fails from now on, for good.
    pub fn kill(&self) {
        let mut st = self.state();
        st.dead = true;
        st.paused = false;
        st.armed = None;
        drop(st);
        self.resumed.notify_all();
    }

    fn is_dead(&self) -> bool {
        self.state().dead
    }

    pub fn resume(&self) {
        let mut st = self.state();
        st.paused = false;
        st.armed = None;
        drop(st);
        self.resumed.notify_all();
    }

    /// The host pauses when one of its threads reaches `point`; that thread stops
    /// there until `resume`.
    pub fn arm(&self, point: PausePoint) {
        let mut st = self.state();
        st.fired = false;
        st.armed = Some(point);
    }

    /// True once an armed point was reached (the host is paused).
    pub fn fired(&self) -> bool {
        self.state().fired
    }

    /// Waits while paused; true when it had to wait.
    fn hold(&self) -> bool {
        let mut st = self.state();
        let held = st.paused;
        let deadline = std::time::Instant::now() + PAUSE_MAX;
        while st.paused && std::time::Instant::now() < deadline {
            st = match self.resumed.wait_timeout(st, Duration::from_millis(100)) {
                Ok((guard, _)) => guard,
                Err(_) => return held,
            };
        }
        held
    }

    /// The calling thread reached a point: if it is the armed one, the host pauses
    /// and this thread stops here until `resume`.
    fn reached(&self, point: PausePoint) {
        let mut st = self.state();
        let fire = match (st.armed, point) {
            (Some(PausePoint::ClockRead(n)), PausePoint::ClockRead(_)) => {
                st.armed = (n > 1).then_some(PausePoint::ClockRead(n - 1));
                n <= 1
            }
            (Some(armed), _) => armed == point,
            (None, _) => false,
        };
        if !fire {
            return;
        }
        st.armed = None;
        st.fired = true;
        st.paused = true;
        drop(st);
        self.hold();
    }

    /// An I/O of the host completed: the point it marks, if any is armed.
    fn after_io(&self, write: bool, offset: u64, len: usize) {
        let (armed, points) = {
            let st = self.state();
            (st.armed, st.points)
        };
        let (Some(armed), Some(p)) = (armed, points) else {
            return;
        };
        let point = match armed {
            PausePoint::MidBallot if write && offset == p.own_dblock && len == p.sector => armed,
            PausePoint::DeltaRead if !write && p.is_heartbeat(offset, len) => armed,
            PausePoint::HoldingToken
                if !write && p.is_lock_sector(offset, len) && self.holds_token(&p) =>
            {
                armed
            }
            _ => return,
        };
        self.reached(point);
    }

    /// Whether the leader record on the disk names this host's slot, unreleased.
    fn holds_token(&self, p: &ProtocolPoints) -> bool {
        use crate::format::{OnDisk, PaxosLeader, PAXOS_LEADER_RELEASED};
        let Some(disk) = &self.disk else {
            return false;
        };
        let mut raw = vec![0u8; p.sector];
        if disk.read_at(&mut raw, p.leader).is_err() {
            return false;
        }
        let block = p.leader / crate::format::BLOCK_SIZE_U64;
        PaxosLeader::decode(&raw, block)
            .is_ok_and(|l| l.owner_slot == p.slot && l.flags & PAXOS_LEADER_RELEASED == 0)
    }
}

/// A host's clock: the shared one, but a thread of the host can be stopped inside a
/// read of it (`PausePoint::ClockRead`).
pub struct PausableClock {
    inner: Arc<dyn Clock>,
    pause: Arc<HostPause>,
}

impl Clock for PausableClock {
    fn now_ms(&self) -> u64 {
        self.pause.reached(PausePoint::ClockRead(0));
        self.inner.now_ms()
    }
    fn sleep(&self, duration: Duration) {
        self.inner.sleep(duration)
    }
}

/// A LUN whose I/O can be held up, as a host's is while the host is stopped
/// (SIGSTOP, a paused VM) or its path to the storage is down. I/O issued while paused
/// waits for `resume`; then reads go on (and see whatever the other hosts wrote
/// meanwhile), and writes, compare-and-writes and flushes fail. A write held that
/// long (past the lease, far past any `io_max`) is one that storage-side fencing
/// refuses, or, on a plain disk (Disk Paxos), one whose host a watchdog resets first
/// (docs/locking.md: without either, such a write lands: the residual window).
/// Pause only past the lease, so that the host is always recovered.
pub struct PausableLun {
    inner: Arc<dyn Lun>,
    pause: Arc<HostPause>,
}

impl PausableLun {
    pub fn new(inner: Arc<dyn Lun>) -> PausableLun {
        PausableLun::with_pause(inner, Arc::new(HostPause::new(None)))
    }

    pub fn with_pause(inner: Arc<dyn Lun>, pause: Arc<HostPause>) -> PausableLun {
        PausableLun { inner, pause }
    }

    pub fn host_pause(&self) -> &Arc<HostPause> {
        &self.pause
    }

    pub fn pause(&self) {
        self.pause.pause();
    }

    pub fn resume(&self) {
        self.pause.resume();
    }

    /// The error of an I/O issued after the host crashed.
    fn crashed(&self, op: &'static str, offset: u64) -> LunResult<()> {
        if !self.pause.is_dead() {
            return Ok(());
        }
        Err(LunError::Io {
            device: self.inner.describe(),
            op,
            offset,
            source: std::io::Error::other("the host crashed"),
        })
    }

    /// Holds a write while paused; fails it if it had to wait.
    fn hold_write(&self, op: &'static str, offset: u64) -> LunResult<()> {
        self.crashed(op, offset)?;
        if self.pause.hold() {
            return Err(LunError::Io {
                device: self.inner.describe(),
                op,
                offset,
                source: std::io::Error::other("refused: issued while the host was paused"),
            });
        }
        Ok(())
    }

    fn after<T>(&self, result: LunResult<T>, write: bool, offset: u64, len: usize) -> LunResult<T> {
        if result.is_ok() {
            self.pause.after_io(write, offset, len);
        }
        result
    }
}

impl Lun for PausableLun {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.pause.hold();
        self.crashed("read", offset)?;
        let result = self.inner.read_at(buf, offset);
        self.after(result, false, offset, buf.len())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.hold_write("write", offset)?;
        let result = self.inner.write_at(buf, offset);
        self.after(result, true, offset, buf.len())
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.hold_write("compare-and-write", offset)?;
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.hold_write("flush", 0)?;
        self.inner.flush()
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.pause.hold();
        self.crashed("read", offset)?;
        self.inner.read_uncached(buf, offset)
    }
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.hold_write("write", offset)?;
        self.inner.write_uncached(buf, offset)
    }
    fn may_write(&self) -> LunResult<()> {
        self.inner.may_write()
    }
    fn describe(&self) -> String {
        format!("pausable {}", self.inner.describe())
    }
}

/// How the content a coherence read expects was written (`Sim::check_read`).
#[derive(Clone, Copy)]
enum Written<'a> {
    /// Without fsync, by this host: lost if the host fails before it is read.
    Unsynced(&'a Fs),
    /// By `Op::overwrite` (fsynced, not truncated first).
    Overwrite,
}
use Written::{Overwrite, Unsynced};

/// An operation on a paused host: (fs, directory index, name).
type Probe = fn(&Fs, usize, &[u8]) -> Result<(), FsError>;

fn read_file(fs: &Fs, dir: usize, name: &[u8]) -> Result<Vec<u8>, FsError> {
    let ino = lookup(fs, dir, name)?;
    fs.read_data(ino, 0, 64)
}

fn lookup(fs: &Fs, dir: usize, name: &[u8]) -> Result<u64, FsError> {
    let d = fs.lookup(fs.root(), DIRS[dir])?.ino;
    Ok(fs.lookup(d, name)?.ino)
}

fn listing(fs: &Fs, dir: usize) -> Result<Vec<Vec<u8>>, FsError> {
    let d = fs.lookup(fs.root(), DIRS[dir])?.ino;
    let mut names = Vec::new();
    fs.readdir(d, 0, &mut |_, _, _, name| {
        names.push(name.to_vec());
        false
    })?;
    names.sort();
    Ok(names)
}

#[derive(Clone, Debug)]
struct Op {
    dir: usize,
    name: Vec<u8>,
    kind: u32,
    value: u32,
}

impl Op {
    /// What a write puts in the file: of one length for every write of a name, so
    /// that an overwrite in place replaces it whole.
    fn content(&self) -> Vec<u8> {
        format!("{}:{:010}", String::from_utf8_lossy(&self.name), self.value).into_bytes()
    }

    /// Writes the content over the start of the file, without truncating it first
    /// (creates it if needed), and makes it durable.
    fn overwrite(&self, fs: &Fs) -> Result<(), FsError> {
        let d = fs.lookup(fs.root(), DIRS[self.dir])?.ino;
        let ino = match fs.lookup(d, &self.name) {
            Ok(a) if a.is_dir() => return Err(FsError::Errno(libc::EISDIR)),
            Ok(a) => a.ino,
            Err(e) if e.errno() == libc::ENOENT => fs.mknod(d, &self.name, REG, 0, 0, 0)?.ino,
            Err(e) => return Err(e),
        };
        fs.write_data(ino, 0, &self.content())?;
        fs.fsync(ino, false)
    }

    /// Whether the write (if it writes) is made durable before the call returns.
    fn synced(&self) -> bool {
        self.value % 3 == 0
    }

    /// The bytes this operation writes at offset 0, if it writes.
    fn written(&self) -> Option<Vec<u8>> {
        (30..55).contains(&self.kind).then(|| self.content())
    }

    fn apply(&self, fs: &Fs) -> Result<(), FsError> {
        let d = fs.lookup(fs.root(), DIRS[self.dir])?.ino;
        let other = format!("n{}", self.value % NAMES).into_bytes();
        match self.kind {
            0..=29 => fs.mknod(d, &self.name, REG, 0, 0, 0).map(|_| ()),
            30..=54 => {
                let ino = match fs.lookup(d, &self.name) {
                    Ok(a) => a.ino,
                    Err(e) if e.errno() == libc::ENOENT => {
                        fs.mknod(d, &self.name, REG, 0, 0, 0)?.ino
                    }
                    Err(e) => return Err(e),
                };
                if fs.getattr(ino)?.is_dir() {
                    return Err(FsError::Errno(libc::EISDIR));
                }
                fs.setattr(
                    ino,
                    &crate::fs::SetAttr {
                        size: Some(0),
                        ..Default::default()
                    },
                )?;
                fs.write_data(ino, 0, &self.content())?;
                if self.synced() {
                    fs.fsync(ino, false)?;
                }
                Ok(())
            }
            55..=69 => fs.unlink(d, &self.name),
            70..=79 => {
                let to = (self.dir + 1 + (self.value as usize % 2)) % DIRS.len();
                let td = fs.lookup(fs.root(), DIRS[to])?.ino;
                fs.rename(d, &self.name, td, &other, 0)
            }
            80..=86 => {
                let ino = fs.lookup(d, &self.name)?.ino;
                fs.link(ino, d, &other).map(|_| ())
            }
            87..=92 => fs.mkdir(d, &self.name, 0o755, 0, 0).map(|_| ()),
            93..=96 => fs.rmdir(d, &self.name),
            _ => {
                let ino = fs.lookup(d, &self.name)?.ino;
                fs.read_data(ino, 0, 4096).map(|_| ())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_seed_simulation_passes_on_disk_paxos() {
        let cfg = SimConfig {
            hosts: 3,
            seed: 1,
            steps: 40,
            faults: false,
            disk_paxos: true,
        };
        let summary = run(&cfg).unwrap_or_else(|e| panic!("sim: {e}"));
        assert!(summary.ok > 0, "nothing succeeded: {summary:?}");
    }

    #[test]
    fn a_fixed_seed_simulation_passes() {
        for seed in [1, 2] {
            let cfg = SimConfig {
                hosts: 4,
                seed,
                steps: 60,
                faults: false,
                disk_paxos: false,
            };
            let summary = run(&cfg).unwrap_or_else(|e| panic!("sim: {e}"));
            assert!(summary.ok > 0, "nothing succeeded: {summary:?}");
            assert!(
                summary.locks_checked > 0,
                "no lock was ever checked: {summary:?}"
            );
        }
    }
}

/// Every write that lands on the shared LUN, by which host and when (for finding who
/// wrote what over a block after a failure). `ATSFS_SIM_TRACE=1` also keeps a
/// backtrace of each write that puts something other than a lock record over the
/// first sector of a block.
#[derive(Default)]
pub struct TraceLog {
    entries: Vec<TraceEntry>,
    /// Lock records replaced by one whose `change_seq` is not the next: two
    /// test-and-sets that overlapped (checked after every step).
    anomalies: Vec<String>,
}

pub struct TraceEntry {
    pub host: usize,
    pub mount: u64,
    pub at_ms: u64,
    pub offset: u64,
    pub len: usize,
    pub caw: bool,
    /// The first 8 bytes of every block start the write covers.
    pub heads: Vec<(u64, [u8; 8])>,
    pub what: String,
    pub backtrace: Option<std::backtrace::Backtrace>,
}

pub struct TraceLun {
    inner: Arc<MemLun>,
    host: usize,
    mount: u64,
    clock: Arc<dyn Clock>,
    log: Arc<Mutex<TraceLog>>,
    backtraces: bool,
    /// False in Disk Paxos mode: the shared disk has no compare-and-write at all (the
    /// hosts' `PlainDisk` refuses it already; this proves nothing goes around it).
    caw: bool,
}

impl TraceLun {
    /// Lands the write (`land`) and logs it under the log's lock, so that the log
    /// order is the landing order.
    fn landed<T>(
        &self,
        buf: &[u8],
        offset: u64,
        caw: bool,
        land: impl FnOnce() -> LunResult<T>,
        logged: impl Fn(&T) -> bool,
    ) -> LunResult<T> {
        const BLOCK: u64 = crate::format::BLOCK_SIZE_U64;
        let mut heads = Vec::new();
        let mut foreign = false;
        let mut b = offset.div_ceil(BLOCK) * BLOCK;
        while b + 8 <= offset + buf.len() as u64 {
            let at = (b - offset) as usize;
            let mut head = [0u8; 8];
            head.copy_from_slice(&buf[at..at + 8]);
            if head[..4] != crate::format::magic(b"ALCK").to_le_bytes() && head != [0u8; 8] {
                foreign = true;
            }
            heads.push((b / BLOCK, head));
            b += BLOCK;
        }
        let what = describe_write(buf, offset);
        let backtrace = (self.backtraces && (foreign || !heads.is_empty()))
            .then(std::backtrace::Backtrace::force_capture);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        // Under the log's lock no other host lands a write: what the disk holds now is
        // what this write replaces.
        let before: Vec<(u64, Option<LockRecord>)> = heads
            .iter()
            .filter(|(_, head)| head[..4] == LockRecord::MAGIC.to_le_bytes())
            .map(|&(block, _)| {
                let mut raw = vec![0u8; self.inner.sector_size() as usize];
                let old = self
                    .inner
                    .read_at(&mut raw, block * BLOCK)
                    .ok()
                    .and_then(|()| lock_record(&raw, block));
                (block, old)
            })
            .collect();
        let result = land()?;
        if logged(&result) {
            for (block, old) in before {
                let at = (block * BLOCK - offset) as usize;
                let (Some(old), Some(new)) = (old, lock_record(&buf[at..], block)) else {
                    continue;
                };
                if new.change_seq != old.change_seq.wrapping_add(1) {
                    log.anomalies.push(format!(
                        "host {} (mount {}) wrote the lock record of {block} with change_seq {} \
                         over change_seq {} (mode {} owner ({},{}) shared {:#x}): not one \
                         test-and-set after the other",
                        self.host,
                        self.mount,
                        new.change_seq,
                        old.change_seq,
                        old.mode,
                        old.owner_slot,
                        old.owner_gen,
                        old.shared_slots
                    ));
                }
            }
            log.entries.push(TraceEntry {
                host: self.host,
                mount: self.mount,
                at_ms: self.clock.now_ms(),
                offset,
                len: buf.len(),
                caw,
                heads,
                what,
                backtrace,
            });
        }
        Ok(result)
    }
}

/// The lock record of `block` in `raw` (a sector at least), if it holds one.
fn lock_record(raw: &[u8], block: u64) -> Option<LockRecord> {
    let size = std::mem::size_of::<LockRecord>();
    let record = bytemuck::try_pod_read_unaligned::<LockRecord>(raw.get(..size)?).ok()?;
    (record.magic == LockRecord::MAGIC && record.resource == block).then_some(record)
}

/// A lock record or inode body a write carries, decoded, for the trace.
fn describe_write(buf: &[u8], offset: u64) -> String {
    use crate::format::{InodeBody, LockRecord, BLOCK_SIZE_U64};
    let block = offset / BLOCK_SIZE_U64;
    let within = offset % BLOCK_SIZE_U64;
    let lock_magic = crate::format::magic(b"ALCK").to_le_bytes();
    let ino_magic = crate::format::magic(b"AINO").to_le_bytes();
    if within == 0 && buf.len() >= 512 && buf[..4] == lock_magic {
        if let Ok(r) = bytemuck::try_pod_read_unaligned::<LockRecord>(&buf[..512]) {
            let shared: Vec<(u32, u32)> = (0..64u32)
                .filter(|s| r.shared_slots & (1u64 << s) != 0)
                .map(|s| (s, r.shared_gen[s as usize]))
                .collect();
            return format!(
                "lock mode {} owner ({},{}) shared {shared:?} seq {} res {}",
                r.mode, r.owner_slot, r.owner_gen, r.change_seq, r.resource
            );
        }
    }
    if within == 512 && buf.len() >= 3584 && buf[..4] == ino_magic {
        if let Ok(i) = bytemuck::try_pod_read_unaligned::<InodeBody>(&buf[..3584]) {
            return format!(
                "inode {} gen {} mode {:o} nlink {} size {} flags {:#x} area {:?}",
                i.blockno,
                i.generation,
                i.mode,
                i.nlink,
                i.size,
                i.flags,
                String::from_utf8_lossy(&i.area[..16])
            );
        }
    }
    let _ = block;
    String::new()
}

impl TraceLog {
    /// Notes something the simulator did, between the writes.
    pub fn event(&mut self, at_ms: u64, what: String) {
        self.entries.push(TraceEntry {
            host: usize::MAX,
            mount: 0,
            at_ms,
            offset: 0,
            len: 0,
            caw: false,
            heads: Vec::new(),
            what,
            backtrace: None,
        });
    }

    /// The last `n` things the simulator did, oldest first.
    pub fn events(&self, n: usize) -> String {
        let events: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.len == 0)
            .map(|e| format!("t={} {}", e.at_ms, e.what))
            .collect();
        events[events.len().saturating_sub(n)..].join("\n")
    }

    /// The writes that touched block `block`, oldest first.
    pub fn history(&self, block: u64, quiet: bool) -> String {
        const BLOCK: u64 = crate::format::BLOCK_SIZE_U64;
        let mut out = String::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.len == 0 {
                if quiet {
                    continue;
                }
                out.push_str(&format!("#{i} t={} -- {}\n", e.at_ms, e.what));
                continue;
            }
            let end = e.offset + e.len as u64;
            if end <= block * BLOCK || e.offset >= (block + 1) * BLOCK {
                continue;
            }
            let head = e
                .heads
                .iter()
                .find(|(b, _)| *b == block)
                .map(|(_, h)| format!("{:?}", String::from_utf8_lossy(h)))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "#{i} t={} host {} mount {} {} at {} (+{}) len {} head {head} {}\n",
                e.at_ms,
                e.host,
                e.mount,
                if e.caw { "caw" } else { "write" },
                e.offset,
                e.offset as i64 - (block * BLOCK) as i64,
                e.len,
                e.what
            ));
            if let Some(bt) = &e.backtrace {
                let frames: Vec<String> = bt
                    .to_string()
                    .lines()
                    .filter_map(|l| l.trim().split_once(": ").map(|(_, f)| f.to_string()))
                    .filter(|f| {
                        f.contains("atsfs::")
                            && !f.contains("as atsfs::lun::Lun>")
                            && !f.contains("TraceLun")
                            && !f.contains("{{closure}}")
                    })
                    .map(|f| f.replace("atsfs::", ""))
                    .collect();
                out.push_str(&format!("    via {}\n", frames.join(" < ")));
            }
        }
        out
    }
}

impl Lun for TraceLun {
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
        self.landed(
            buf,
            offset,
            false,
            || self.inner.write_at(buf, offset),
            |_| true,
        )
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        if !self.caw {
            return Err(LunError::NoCompareAndWrite {
                device: self.describe(),
                detail: "the simulator's plain shared disk".into(),
            });
        }
        self.landed(
            new,
            offset,
            true,
            || self.inner.compare_and_write(offset, expected, new),
            |caw| *caw == Caw::Written,
        )
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn ats_kind(&self) -> crate::lun::AtsKind {
        self.inner.ats_kind()
    }
}
