//! The cluster simulator: many hosts in one process over one shared in-memory LUN,
//! random operations chosen from a seed, and checkers after every step.
//!
//! - Every host is a real `Fs` over its own `FaultLun` (seeded latency and, with
//!   `faults`, lost replies) on one `MemLun`, whose compare-and-write is an atomic
//!   one-sector ATS; with `disk_paxos`, the volume is a Disk Paxos one and each host
//!   sees a plain disk without compare-and-write, so its test-and-set is the token. Volumes use a 100 ms heartbeat and a 600 ms lease, so leases run
//!   out fast on the real clock (the manual clock does not mix with the hosts' own
//!   threads).
//! - The RNG decides everything the simulator does (which host, which operation,
//!   which name, crashes and restarts); thread timing inside the hosts still varies
//!   from run to run, so a failing seed usually, not always, fails again.
//! - Pauses: a host's I/O is held up past its lease (`PausableLun`, as a SIGSTOP or a
//!   lost path would), with a read in flight; another host recovers it and writes
//!   the file it was reading; the paused host is asked again while paused and after.
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
            cfg,
        };
        for i in 0..hosts {
            sim.mount(i)?;
        }
        let fs = sim.live_host(0).ok_or("no host")?;
        for dir in DIRS {
            fs.mkdir(fs.root(), dir, 0o755, 0, 0)
                .map_err(|e| sim.fail(&format!("mkdir: {e}")))?;
        }
        Ok(sim)
    }

    fn fail(&self, what: &str) -> String {
        format!("seed={} step={}: {what}", self.cfg.seed, self.step)
    }

    /// Mounts host `i`. A mount that fails on an injected fault (a lost reply during
    /// its replay) fails cleanly, as an I/O error does for an admin, who mounts again:
    /// so does the simulator, up to `MOUNT_TRIES` times, each with other faults.
    fn mount(&mut self, i: usize) -> Result<(), String> {
        const MOUNT_TRIES: u64 = 4;
        for attempt in 0..MOUNT_TRIES {
            match self.mount_once(i, attempt) {
                Err(e) if e.contains("injected fault") && attempt + 1 < MOUNT_TRIES => {
                    self.summary.clean_errors += 1;
                }
                other => return other,
            }
        }
        Err(self.fail(&format!("mount of host {i}: no try left")))
    }

    fn mount_once(&mut self, i: usize, attempt: u64) -> Result<(), String> {
        let config = FaultConfig {
            seed: self
                .cfg
                .seed
                .wrapping_mul(1000)
                .wrapping_add(i as u64 + self.summary.restarts)
                .wrapping_add(attempt * 7919),
            latency_max_us: 50,
            lost_reply_prob: if self.cfg.faults { 0.0005 } else { 0.0 },
            ..FaultConfig::default()
        };
        let faulty: Arc<dyn Lun> = Arc::new(FaultLun::new(self.mem.clone(), config));
        let pausable = Arc::new(PausableLun::new(faulty));
        let lun: Arc<dyn Lun> = if self.cfg.disk_paxos {
            Arc::new(crate::lun::PlainDisk(pausable.clone()))
        } else {
            pausable.clone()
        };
        let mut options = MountOptions::new(self.hosts[i].uuid);
        options.commit_interval = Duration::from_millis(200);
        options.clock = self.clock.clone();
        let fs =
            Fs::mount(lun, options).map_err(|e| self.fail(&format!("mount of host {i}: {e:#}")))?;
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

    /// Drops a host that was fenced (it is restarted later with a new generation),
    /// after checking what its reads returned against its lease.
    fn drop_fenced(&mut self, host: usize) -> Result<(), String> {
        self.check_seen(host)?;
        if self.hosts[host].fs.take().is_some() {
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
                self.check_read(j, &other, &op, &expected)?;
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

    /// Counts an operation's outcome and checks it; `gone`: the host's lease had run
    /// out before the operation started.
    /// Holds one host's I/O up past its lease with a read of a file in flight; another
    /// host recovers it and writes that file; the paused host must then refuse
    /// everything (while still paused, from its caches, and after), and the read in
    /// flight must not return what the other host wrote.
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

    fn account(
        &mut self,
        host: usize,
        op: &Op,
        gone: bool,
        outcome: Result<(), FsError>,
    ) -> Result<(), String> {
        self.summary.ops += 1;
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
        for (i, host) in self.hosts.iter().enumerate() {
            if let Some(fs) = &host.fs {
                let n = fs
                    .verify_locks()
                    .map_err(|e| self.fail(&format!("lock safety, host {i}: {e}")))?;
                self.summary.locks_checked += n as u64;
            }
        }
        Ok(())
    }

    fn check_read(&mut self, host: usize, fs: &Fs, op: &Op, expected: &[u8]) -> Result<(), String> {
        let gone = self.lease_gone(fs);
        let found = lookup(fs, op.dir, &op.name).and_then(|ino| fs.read_data(ino, 0, 64));
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
        match found {
            Ok(data) if data == expected => Ok(()),
            Ok(data) => Err(self.fail(&format!(
                "another host reads {:?} in {}/{} after a write of {:?}",
                String::from_utf8_lossy(&data),
                String::from_utf8_lossy(DIRS[op.dir]),
                String::from_utf8_lossy(&op.name),
                String::from_utf8_lossy(expected)
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

    /// Unmounts host `i` at the end. An unmount that an injected fault broke (the
    /// host fenced itself: its commit's reply was lost) is a crash: the host mounts
    /// again, which replays its journal, and unmounts again (bounded).
    fn unmount_at_end(&mut self, i: usize) -> Result<(), String> {
        const UNMOUNT_TRIES: u32 = 4;
        for _ in 0..UNMOUNT_TRIES {
            let Some(fs) = self.hosts[i].fs.take() else {
                return Ok(());
            };
            match fs.unmount() {
                Ok(()) => return Ok(()),
                Err(e) if format!("{e:#}").contains("injected fault") => {
                    drop(fs);
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

/// How long paused I/O waits for `resume` at most (a bound on every wait).
const PAUSE_MAX: Duration = Duration::from_secs(60);

/// A LUN whose I/O can be held up, as a host's is while the host is stopped
/// (SIGSTOP, a paused VM) or its path to the storage is down. I/O issued while paused
/// waits for `resume`; then reads go on (and see whatever the other hosts wrote
/// meanwhile), and writes, compare-and-writes and flushes fail, as storage-side
/// fencing refuses the late writes of a host that was recovered meanwhile (without
/// it, they would land: the window `docs/locking.md` states). Pause only past the
/// lease, so that the host is always recovered.
pub struct PausableLun {
    inner: Arc<dyn Lun>,
    paused: Mutex<bool>,
    resumed: Condvar,
}

impl PausableLun {
    pub fn new(inner: Arc<dyn Lun>) -> PausableLun {
        PausableLun {
            inner,
            paused: Mutex::new(false),
            resumed: Condvar::new(),
        }
    }

    pub fn pause(&self) {
        if let Ok(mut paused) = self.paused.lock() {
            *paused = true;
        }
    }

    pub fn resume(&self) {
        if let Ok(mut paused) = self.paused.lock() {
            *paused = false;
        }
        self.resumed.notify_all();
    }

    /// Waits while paused; true when the I/O had to wait.
    fn hold(&self) -> bool {
        let Ok(mut paused) = self.paused.lock() else {
            return false;
        };
        let held = *paused;
        let deadline = std::time::Instant::now() + PAUSE_MAX;
        while *paused && std::time::Instant::now() < deadline {
            match self
                .resumed
                .wait_timeout(paused, Duration::from_millis(100))
            {
                Ok((guard, _)) => paused = guard,
                Err(_) => return held,
            }
        }
        held
    }

    /// Holds a write while paused; fails it if it had to wait.
    fn hold_write(&self, op: &'static str, offset: u64) -> LunResult<()> {
        if self.hold() {
            return Err(LunError::Io {
                device: self.inner.describe(),
                op,
                offset,
                source: std::io::Error::other("refused: issued while the host was paused"),
            });
        }
        Ok(())
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
        self.hold();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.hold_write("write", offset)?;
        self.inner.write_at(buf, offset)
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
        self.hold();
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
                if self.value % 3 == 0 {
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
