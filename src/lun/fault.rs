//! A fault-injecting wrapper around any LUN, for tests and the simulator.
//!
//! Faults, each drawn from one RNG seeded by `FaultConfig::seed`, so that a run with a
//! fixed order of I/Os replays from its seed:
//! - EIO: nothing happens and the call fails.
//! - Lost reply: the write or compare-and-write is carried out, then the call fails.
//!   A caller that re-reads a sector after a failed compare-and-write must recognise
//!   its own image (a false miscompare on retry).
//! - Torn write: of a multi-sector write, only a prefix of whole sectors (possibly
//!   none) lands, then the call fails. One sector is atomic, so a single-sector write
//!   or a compare-and-write never tears.
//! - Crash: after `fail_all_writes(true)` or a `fail_after_writes` countdown, every
//!   write, compare-and-write and flush fails; reads still work so a test can look.
//! - Latency: each I/O sleeps a random time up to `latency_max_us`.
//! - Sector by sector (`sector_by_sector`): a read or write of several sectors is
//!   carried out one sector at a time, a write's sectors in a random order, so that
//!   another host's I/O can come between two sectors of one command; only a sector is
//!   atomic, as on a shared disk with nothing between the hosts but the disk. A torn
//!   write then keeps a random subset of its sectors instead of a prefix.
//! - Delayed write: a write (or compare-and-write) stays in the I/O path a random time
//!   up to `delay_max_us` and lands at a random point of it; the reply comes at its
//!   end. Another host's write issued later may land first: writes are reordered
//!   between hosts, within the bound a protocol must allow for (`io_max`).
//!
//! Requests outside the device or misaligned fail as the inner LUN would, before any
//! fault is drawn.
//!
//! The write log records every write that landed (also the landed part of a torn write
//! and the written sector of a compare-and-write), in landing order, with the number
//! of flushes completed before it. `crash_image` and `durable_image` rebuild the device
//! as a crash at any point of the log would leave it. While recording, writes and
//! flushes are serialised so that the log order is the device order; turn recording on
//! and off only while no I/O is in flight.

use super::{check_caw, check_range, Caw, Lun, LunError, LunResult};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Fault probabilities (0.0 = never, 1.0 = always) and the RNG seed.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    /// A write or compare-and-write lands but its caller gets an error.
    pub lost_reply_prob: f64,
    pub eio_read_prob: f64,
    /// A write or compare-and-write does nothing and fails.
    pub eio_write_prob: f64,
    /// A multi-sector write lands only in part (a prefix of whole sectors) and fails.
    pub torn_write_prob: f64,
    /// A flush does nothing and fails.
    pub eio_flush_prob: f64,
    /// Each I/O first sleeps a uniform random time in `0..=latency_max_us`.
    pub latency_max_us: u64,
    /// Multi-sector I/O one sector at a time (a write's sectors in a random order).
    pub sector_by_sector: bool,
    /// A write stays in flight up to `delay_max_us` and lands at a random point of it.
    pub delayed_write_prob: f64,
    pub delay_max_us: u64,
}

impl Default for FaultConfig {
    /// No faults, seed 0.
    fn default() -> FaultConfig {
        FaultConfig {
            seed: 0,
            lost_reply_prob: 0.0,
            eio_read_prob: 0.0,
            eio_write_prob: 0.0,
            torn_write_prob: 0.0,
            eio_flush_prob: 0.0,
            latency_max_us: 0,
            sector_by_sector: false,
            delayed_write_prob: 0.0,
            delay_max_us: 0,
        }
    }
}

/// One write that landed on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// Position in the log, from 0 at `start_recording`.
    pub seq: u64,
    pub offset: u64,
    /// The bytes that landed (for a torn write, only the prefix).
    pub data: Vec<u8>,
    /// Flushes completed (since `start_recording`) before this write landed.
    pub after_flush: u64,
}

/// I/O counts since creation or `reset_stats`: every call, failed or not (a
/// snapshot of `IoCounters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoStats {
    pub reads: u64,
    pub writes: u64,
    pub caws: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    /// Bytes of `write_at` calls; compare-and-writes are not included.
    pub written_bytes: u64,
}

/// Wraps a LUN and injects faults; see the module documentation.
pub struct FaultLun<L: Lun> {
    inner: L,
    faults: Mutex<Faults>,
    recording: AtomicBool,
    log: Mutex<Log>,
    counters: super::IoCounters,
}

struct Faults {
    config: FaultConfig,
    rng: SmallRng,
    crashed: bool,
    /// Writes still allowed before the crash, when a countdown runs.
    writes_left: Option<u64>,
}

#[derive(Default)]
struct Log {
    records: Vec<WriteRecord>,
    flushes: u64,
}

/// When and in which order one write's sectors land.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Landing {
    /// In flight before the write lands, and after it until the reply.
    before: Duration,
    after: Duration,
    /// The sectors in landing order, when they land one at a time
    /// (`sector_by_sector`); empty: all at once.
    order: Vec<usize>,
}

/// What happens to one write or compare-and-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteFault {
    None,
    Crashed,
    Eio,
    Torn { sectors_kept: usize },
    LostReply,
}

impl<L: Lun> FaultLun<L> {
    pub fn new(inner: L, config: FaultConfig) -> FaultLun<L> {
        FaultLun {
            inner,
            faults: Mutex::new(Faults {
                rng: SmallRng::seed_from_u64(config.seed),
                config,
                crashed: false,
                writes_left: None,
            }),
            recording: AtomicBool::new(false),
            log: Mutex::new(Log::default()),
            counters: super::IoCounters::default(),
        }
    }

    /// The wrapped LUN, for looking behind the faults.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Replaces the configuration and reseeds the RNG from its seed.
    pub fn set_config(&self, config: FaultConfig) {
        let mut faults = self.faults();
        faults.rng = SmallRng::seed_from_u64(config.seed);
        faults.config = config;
    }

    pub fn config(&self) -> FaultConfig {
        self.faults().config.clone()
    }

    /// `true` crashes the device: every later write, compare-and-write and flush fails.
    /// `false` revives it and cancels a countdown.
    pub fn fail_all_writes(&self, crashed: bool) {
        let mut faults = self.faults();
        faults.crashed = crashed;
        faults.writes_left = None;
    }

    /// Lets `n` more writes or compare-and-writes through (faults still apply), then
    /// crashes as `fail_all_writes(true)`.
    pub fn fail_after_writes(&self, n: u64) {
        let mut faults = self.faults();
        faults.crashed = false;
        faults.writes_left = Some(n);
    }

    pub fn is_crashed(&self) -> bool {
        self.faults().crashed
    }

    /// Clears the write log and starts recording; call while no I/O is in flight.
    pub fn start_recording(&self) {
        let mut log = self.log();
        *log = Log::default();
        self.recording.store(true, Ordering::SeqCst);
    }

    /// Stops recording; the log is kept.
    pub fn stop_recording(&self) {
        let _log = self.log();
        self.recording.store(false, Ordering::SeqCst);
    }

    /// A copy of the write log.
    pub fn records(&self) -> Vec<WriteRecord> {
        self.log().records.clone()
    }

    /// Flushes completed while recording.
    pub fn flush_count(&self) -> u64 {
        self.log().flushes
    }

    pub fn stats(&self) -> IoStats {
        self.counters.snapshot()
    }

    pub fn reset_stats(&self) {
        self.counters.reset();
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn injected(&self, op: &'static str, offset: u64, what: &str) -> LunError {
        LunError::Io {
            device: self.describe(),
            op,
            offset,
            source: io::Error::other(format!("injected fault: {what}")),
        }
    }

    /// Draws the fate of a write of `sectors` sectors, and sleeps until it lands.
    /// Always draws the same number of values for a given outcome, so the stream does
    /// not depend on probabilities that did not fire (and draws nothing for the
    /// options that are off, so older configurations replay as before).
    fn decide_write(&self, sectors: usize) -> (WriteFault, Landing) {
        let (fault, landing) = {
            let mut f = self.faults();
            if f.crashed {
                return (WriteFault::Crashed, Landing::default());
            }
            if let Some(left) = f.writes_left {
                if left == 0 {
                    f.crashed = true;
                    return (WriteFault::Crashed, Landing::default());
                }
                f.writes_left = Some(left - 1);
            }
            let latency = draw_latency(&mut f);
            let eio = draw(&mut f, |c| c.eio_write_prob);
            let torn = draw(&mut f, |c| c.torn_write_prob);
            let lost = draw(&mut f, |c| c.lost_reply_prob);
            let fault = if eio {
                WriteFault::Eio
            } else if torn && sectors >= 2 {
                WriteFault::Torn {
                    sectors_kept: f.rng.gen_range(0..sectors),
                }
            } else if lost {
                WriteFault::LostReply
            } else {
                WriteFault::None
            };
            let mut landing = Landing {
                before: latency,
                ..Landing::default()
            };
            if f.config.delayed_write_prob > 0.0 && draw(&mut f, |c| c.delayed_write_prob) {
                let max = f.config.delay_max_us;
                let delay = f.rng.gen_range(0..=max);
                let lands = f.rng.gen_range(0..=delay);
                landing.before += Duration::from_micros(lands);
                landing.after = Duration::from_micros(delay - lands);
            }
            if f.config.sector_by_sector && sectors >= 2 {
                let mut order: Vec<usize> = (0..sectors).collect();
                order.shuffle(&mut f.rng);
                landing.order = order;
            }
            (fault, landing)
        };
        sleep(landing.before);
        (fault, landing)
    }

    /// Lands the first `count` sectors of `buf` in landing order: all at once, or one
    /// at a time in `landing.order` (giving other threads a chance in between).
    fn land_sectors(
        &self,
        buf: &[u8],
        offset: u64,
        landing: &Landing,
        count: usize,
    ) -> LunResult<()> {
        let sector = self.inner.sector_size() as usize;
        if landing.order.is_empty() {
            let kept = (count * sector).min(buf.len());
            return match kept {
                0 => Ok(()),
                _ => self.land_write(&buf[..kept], offset),
            };
        }
        for (i, &at) in landing.order.iter().take(count).enumerate() {
            if i > 0 {
                std::thread::yield_now();
            }
            let from = at * sector;
            let to = (from + sector).min(buf.len());
            self.land_write(&buf[from..to], offset + from as u64)?;
        }
        Ok(())
    }

    /// Writes to the inner LUN and, when recording, logs the write in device order.
    fn land_write(&self, data: &[u8], offset: u64) -> LunResult<()> {
        if !self.recording.load(Ordering::SeqCst) {
            return self.inner.write_at(data, offset);
        }
        let mut log = self.log();
        self.inner.write_at(data, offset)?;
        log.push(offset, data);
        Ok(())
    }

    fn land_caw(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        if !self.recording.load(Ordering::SeqCst) {
            return self.inner.compare_and_write(offset, expected, new);
        }
        let mut log = self.log();
        let caw = self.inner.compare_and_write(offset, expected, new)?;
        if caw == Caw::Written {
            log.push(offset, new);
        }
        Ok(caw)
    }

    fn land_flush(&self) -> LunResult<()> {
        if !self.recording.load(Ordering::SeqCst) {
            return self.inner.flush();
        }
        let mut log = self.log();
        self.inner.flush()?;
        log.flushes += 1;
        Ok(())
    }
}

impl Log {
    fn push(&mut self, offset: u64, data: &[u8]) {
        let seq = self.records.len() as u64;
        self.records.push(WriteRecord {
            seq,
            offset,
            data: data.to_vec(),
            after_flush: self.flushes,
        });
    }
}

fn draw(f: &mut Faults, prob: impl Fn(&FaultConfig) -> f64) -> bool {
    let p = prob(&f.config);
    f.rng.gen::<f64>() < p
}

fn draw_latency(f: &mut Faults) -> Duration {
    let max = f.config.latency_max_us;
    if max == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(f.rng.gen_range(0..=max))
}

fn sleep(latency: Duration) {
    if !latency.is_zero() {
        std::thread::sleep(latency);
    }
}

impl<L: Lun> Lun for FaultLun<L> {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }

    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.counters.read(buf.len());
        check_range("read", offset, buf.len(), self.inner.len_bytes(), None)?;
        let (eio, latency) = {
            let mut f = self.faults();
            let latency = draw_latency(&mut f);
            (draw(&mut f, |c| c.eio_read_prob), latency)
        };
        sleep(latency);
        if eio {
            return Err(self.injected("read", offset, "EIO"));
        }
        let sector = self.inner.sector_size() as usize;
        if !self.faults().config.sector_by_sector || buf.len() <= sector {
            return self.inner.read_at(buf, offset);
        }
        for (i, piece) in buf.chunks_mut(sector).enumerate() {
            if i > 0 {
                std::thread::yield_now();
            }
            self.inner.read_at(piece, offset + (i * sector) as u64)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.counters.write(buf.len());
        check_range("write", offset, buf.len(), self.inner.len_bytes(), None)?;
        let sector = self.inner.sector_size() as usize;
        let sectors = buf.len().div_ceil(sector);
        let (fault, landing) = self.decide_write(sectors);
        let result = match fault {
            WriteFault::None => self.land_sectors(buf, offset, &landing, sectors),
            WriteFault::Crashed => return Err(self.injected("write", offset, "device crashed")),
            WriteFault::Eio => Err(self.injected("write", offset, "EIO")),
            WriteFault::Torn { sectors_kept } => {
                self.land_sectors(buf, offset, &landing, sectors_kept)?;
                Err(self.injected("write", offset, "torn write"))
            }
            WriteFault::LostReply => {
                self.land_sectors(buf, offset, &landing, sectors)?;
                Err(self.injected("write", offset, "lost reply (the write landed)"))
            }
        };
        sleep(landing.after);
        result
    }

    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.counters.caw();
        let (sector, size) = (self.inner.sector_size(), self.inner.len_bytes());
        check_caw(offset, expected, new, sector, size)?;
        let op = "compare-and-write";
        let (fault, landing) = self.decide_write(1);
        let result = match fault {
            WriteFault::None | WriteFault::Torn { .. } => self.land_caw(offset, expected, new),
            WriteFault::Crashed => return Err(self.injected(op, offset, "device crashed")),
            WriteFault::Eio => Err(self.injected(op, offset, "EIO")),
            WriteFault::LostReply => self
                .land_caw(offset, expected, new)
                .and_then(|_| Err(self.injected(op, offset, "lost reply (the command completed)"))),
        };
        sleep(landing.after);
        result
    }

    fn flush(&self) -> LunResult<()> {
        self.counters.flush();
        let (crashed, eio, latency) = {
            let mut f = self.faults();
            let latency = draw_latency(&mut f);
            (f.crashed, draw(&mut f, |c| c.eio_flush_prob), latency)
        };
        sleep(latency);
        if crashed {
            return Err(self.injected("flush", 0, "device crashed"));
        }
        if eio {
            return Err(self.injected("flush", 0, "EIO"));
        }
        self.land_flush()
    }

    fn describe(&self) -> String {
        format!("fault-injecting {}", self.inner.describe())
    }

    fn ats_kind(&self) -> super::AtsKind {
        self.inner.ats_kind()
    }
    fn reservations(&self) -> Option<&dyn super::Reservations> {
        self.inner.reservations()
    }
}

/// The device after a crash right after `records[..cut]` landed, with every landed
/// write durable (a device without a volatile cache). With `tear_last = Some(n)`, the
/// last applied write kept only its first `n` sectors.
///
/// Panics if `cut > records.len()` or a record lies outside `base`: both are bugs of
/// the test that calls it.
pub fn crash_image(
    base: &[u8],
    records: &[WriteRecord],
    cut: usize,
    tear_last: Option<usize>,
    sector: u32,
) -> Vec<u8> {
    assert!(
        cut <= records.len(),
        "cut {cut} past {} records",
        records.len()
    );
    let mut image = base.to_vec();
    for (i, record) in records[..cut].iter().enumerate() {
        let keep = match tear_last {
            Some(sectors) if i + 1 == cut => (sectors * sector as usize).min(record.data.len()),
            _ => record.data.len(),
        };
        apply(&mut image, record, keep);
    }
    image
}

/// The device after a crash right after `records[..cut]` landed, when nothing that
/// was not flushed survives: only the writes with `after_flush < flushes_before_cut`
/// are kept. `flushes_before_cut` can be anything from
/// `records[cut - 1].after_flush` to `flushes_at_cut(records, cut, flush_count)`,
/// i.e. the crash may fall before or after flushes that completed between the two
/// writes around the cut.
pub fn durable_image(
    base: &[u8],
    records: &[WriteRecord],
    cut: usize,
    flushes_before_cut: u64,
) -> Vec<u8> {
    assert!(
        cut <= records.len(),
        "cut {cut} past {} records",
        records.len()
    );
    let mut image = base.to_vec();
    for record in records[..cut]
        .iter()
        .filter(|r| r.after_flush < flushes_before_cut)
    {
        apply(&mut image, record, record.data.len());
    }
    image
}

/// The most flushes that can have completed before a crash at `cut`: those before
/// `records[cut]`, or all `flush_count` of them when the cut is at the end.
pub fn flushes_at_cut(records: &[WriteRecord], cut: usize, flush_count: u64) -> u64 {
    records.get(cut).map_or(flush_count, |r| r.after_flush)
}

fn apply(image: &mut [u8], record: &WriteRecord, keep: usize) {
    let start = usize::try_from(record.offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(keep);
    assert!(
        end <= image.len(),
        "record {} at byte {} runs past the {}-byte image",
        record.seq,
        record.offset,
        image.len()
    );
    image[start..end].copy_from_slice(&record.data[..keep]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::MemLun;
    use std::sync::Arc;

    const SECTOR: u32 = 512;
    const LEN_BYTES: u64 = 64 * 1024;

    fn lun(config: FaultConfig) -> FaultLun<Arc<MemLun>> {
        FaultLun::new(Arc::new(MemLun::new(LEN_BYTES, SECTOR)), config)
    }

    fn always(set: impl Fn(&mut FaultConfig)) -> FaultConfig {
        let mut config = FaultConfig {
            seed: 7,
            ..FaultConfig::default()
        };
        set(&mut config);
        config
    }

    fn sectors_of(lun: &MemLun, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        lun.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn is_injected(result: LunResult<impl std::fmt::Debug>) -> bool {
        match result {
            Err(LunError::Io { source, .. }) => source.to_string().contains("injected"),
            _ => false,
        }
    }

    #[test]
    fn no_faults_passes_through() {
        let f = lun(FaultConfig::default());
        f.write_at(&[3u8; 1024], 512).unwrap();
        let mut buf = [0u8; 1024];
        f.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [3u8; 1024]);
        assert_eq!(
            f.compare_and_write(0, &[0u8; 512], &[1u8; 512]).unwrap(),
            Caw::Written
        );
        f.flush().unwrap();
        assert!(f.describe().contains("in-memory LUN"));
        let stats = f.stats();
        let want = IoStats {
            reads: 1,
            writes: 1,
            caws: 1,
            flushes: 1,
            read_bytes: 1024,
            written_bytes: 1024,
        };
        assert_eq!(stats, want);
        f.reset_stats();
        assert_eq!(f.stats(), IoStats::default());
    }

    #[test]
    fn lost_reply_write_lands_but_fails() {
        let f = lun(always(|c| c.lost_reply_prob = 1.0));
        f.start_recording();
        assert!(is_injected(f.write_at(&[9u8; 1024], 2048)));
        assert_eq!(sectors_of(f.inner(), 2048, 1024), vec![9u8; 1024]);
        let records = f.records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].data, vec![9u8; 1024]);
    }

    #[test]
    fn lost_reply_caw_lands_and_retry_sees_own_image() {
        let f = lun(always(|c| c.lost_reply_prob = 1.0));
        let (old, new) = ([0u8; 512], [0x42u8; 512]);
        assert!(is_injected(f.compare_and_write(1024, &old, &new)));
        assert_eq!(sectors_of(f.inner(), 1024, 512), new.to_vec());
        // The caller retries: a miscompare that shows its own image means it landed.
        f.set_config(FaultConfig::default());
        assert_eq!(
            f.compare_and_write(1024, &old, &new).unwrap(),
            Caw::Miscompare(new.to_vec())
        );
    }

    #[test]
    fn eio_changes_nothing() {
        let f = lun(always(|c| {
            c.eio_write_prob = 1.0;
            c.eio_read_prob = 1.0;
            c.eio_flush_prob = 1.0;
        }));
        f.start_recording();
        assert!(is_injected(f.write_at(&[1u8; 512], 0)));
        assert!(is_injected(f.compare_and_write(
            512,
            &[0u8; 512],
            &[1u8; 512]
        )));
        let mut buf = [0u8; 512];
        assert!(is_injected(f.read_at(&mut buf, 0)));
        assert!(is_injected(f.flush()));
        assert_eq!(f.inner().snapshot(), vec![0u8; LEN_BYTES as usize]);
        assert!(f.records().is_empty());
        assert_eq!(f.flush_count(), 0);
        // Range errors come first and are not injected.
        let err = f.write_at(&[1u8; 512], LEN_BYTES).unwrap_err();
        assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
    }

    #[test]
    fn torn_write_keeps_a_sector_prefix() {
        let mut kept_counts = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let f = lun(FaultConfig {
                seed,
                torn_write_prob: 1.0,
                ..FaultConfig::default()
            });
            f.start_recording();
            let data: Vec<u8> = (0..8 * 512u32).map(|i| (i / 512 + 1) as u8).collect();
            assert!(is_injected(f.write_at(&data, 4096)));
            let image = sectors_of(f.inner(), 4096, data.len());
            let kept = image.iter().take_while(|&&b| b != 0).count();
            assert_eq!(kept % 512, 0, "seed {seed}: tear inside a sector");
            assert!(kept < data.len(), "seed {seed}: a torn write landed whole");
            assert_eq!(image[..kept], data[..kept]);
            assert!(image[kept..].iter().all(|&b| b == 0));
            let records = f.records();
            assert_eq!(records.len(), usize::from(kept > 0), "seed {seed}");
            if kept > 0 {
                assert_eq!(records[0].data, data[..kept]);
            }
            kept_counts.insert(kept / 512);
        }
        // The prefix length varies with the seed, including nothing at all.
        assert!(kept_counts.len() > 3, "{kept_counts:?}");
        assert!(kept_counts.contains(&0), "{kept_counts:?}");
    }

    #[test]
    fn sector_by_sector_writes_land_one_sector_at_a_time_in_any_order() {
        let mut non_prefix = 0;
        for seed in 0..40 {
            let f = lun(FaultConfig {
                seed,
                torn_write_prob: 1.0,
                sector_by_sector: true,
                ..FaultConfig::default()
            });
            f.start_recording();
            let data: Vec<u8> = (0..8 * 512u32).map(|i| (i / 512 + 1) as u8).collect();
            assert!(is_injected(f.write_at(&data, 4096)));
            let image = sectors_of(f.inner(), 4096, data.len());
            let kept: Vec<bool> = image.chunks(512).map(|s| s[0] != 0).collect();
            for (i, sector) in image.chunks(512).enumerate() {
                let want = if kept[i] { (i + 1) as u8 } else { 0 };
                assert!(
                    sector.iter().all(|&b| b == want),
                    "seed {seed}: sector {i} mixed"
                );
            }
            // One record per landed sector, each one sector long.
            let records = f.records();
            assert_eq!(records.len(), kept.iter().filter(|&&k| k).count());
            assert!(records.iter().all(|r| r.data.len() == 512));
            let landed = kept.iter().filter(|&&k| k).count();
            if kept.iter().take(landed).any(|&k| !k) {
                non_prefix += 1;
            }
        }
        assert!(
            non_prefix > 5,
            "torn writes kept only prefixes: {non_prefix}"
        );
        // Whole writes and reads still carry every sector.
        let f = lun(FaultConfig {
            seed: 3,
            sector_by_sector: true,
            ..FaultConfig::default()
        });
        let data: Vec<u8> = (0..4 * 512u32).map(|i| (i % 251) as u8).collect();
        f.write_at(&data, 8192).unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn delayed_writes_land_inside_their_delay_and_replay_from_the_seed() {
        let config = FaultConfig {
            seed: 5,
            delayed_write_prob: 0.5,
            delay_max_us: 20_000,
            ..FaultConfig::default()
        };
        let plans = |config: &FaultConfig| -> Vec<Landing> {
            let f = lun(config.clone());
            (0..40).map(|_| f.decide_write(1).1).collect()
        };
        let a = plans(&config);
        assert_eq!(a, plans(&config));
        let delayed = a
            .iter()
            .filter(|l| l.before + l.after > Duration::ZERO)
            .count();
        assert!(delayed > 5 && delayed < 35, "{delayed} of 40 delayed");
        assert!(a
            .iter()
            .all(|l| l.before + l.after <= Duration::from_micros(20_000)));
        assert!(
            a.iter().any(|l| l.after > Duration::ZERO),
            "none lands early"
        );
        // The write has landed when the call returns.
        let f = lun(config);
        for i in 0..4u8 {
            f.write_at(&[i + 1; 512], 0).unwrap();
            assert_eq!(sectors_of(f.inner(), 0, 512), vec![i + 1; 512]);
        }
    }

    #[test]
    fn single_sector_writes_never_tear() {
        let f = lun(always(|c| c.torn_write_prob = 1.0));
        f.write_at(&[5u8; 512], 0).unwrap();
        assert_eq!(
            f.compare_and_write(512, &[0u8; 512], &[6u8; 512]).unwrap(),
            Caw::Written
        );
        assert_eq!(sectors_of(f.inner(), 0, 1024)[..512], [5u8; 512]);
    }

    #[test]
    fn countdown_then_crash() {
        let f = lun(FaultConfig::default());
        f.fail_after_writes(2);
        f.write_at(&[1u8; 512], 0).unwrap();
        assert_eq!(
            f.compare_and_write(512, &[0u8; 512], &[2u8; 512]).unwrap(),
            Caw::Written
        );
        assert!(!f.is_crashed());
        assert!(is_injected(f.write_at(&[3u8; 512], 1024)));
        assert!(f.is_crashed());
        assert!(is_injected(f.compare_and_write(
            1536,
            &[0u8; 512],
            &[4u8; 512]
        )));
        assert!(is_injected(f.flush()));
        // Reads still work; nothing after the countdown landed.
        let image = sectors_of(f.inner(), 0, 2048);
        assert_eq!(image[..512], [1u8; 512]);
        assert_eq!(image[512..1024], [2u8; 512]);
        assert!(image[1024..].iter().all(|&b| b == 0));
        f.fail_all_writes(false);
        f.write_at(&[3u8; 512], 1024).unwrap();
        f.fail_all_writes(true);
        assert!(is_injected(f.write_at(&[3u8; 512], 1024)));
    }

    fn record(seq: u64, offset: u64, byte: u8, sectors: usize, after_flush: u64) -> WriteRecord {
        WriteRecord {
            seq,
            offset,
            data: vec![byte; sectors * SECTOR as usize],
            after_flush,
        }
    }

    #[test]
    fn crash_image_applies_a_prefix_and_tears_the_last() {
        let base = vec![0u8; 4096];
        let records = [
            record(0, 0, 0xa, 2, 0),
            record(1, 512, 0xb, 1, 0),
            record(2, 1024, 0xc, 3, 1),
        ];
        assert_eq!(crash_image(&base, &records, 0, None, SECTOR), base);
        let two = crash_image(&base, &records, 2, None, SECTOR);
        assert_eq!(two[..512], [0xa; 512]);
        assert_eq!(two[512..1024], [0xb; 512]);
        assert!(two[1024..].iter().all(|&b| b == 0));
        // Tearing the third write to nothing gives the two-write image.
        assert_eq!(crash_image(&base, &records, 3, Some(0), SECTOR), two);
        let torn = crash_image(&base, &records, 3, Some(1), SECTOR);
        assert_eq!(torn[1024..1536], [0xc; 512]);
        assert!(torn[1536..].iter().all(|&b| b == 0));
        let all = crash_image(&base, &records, 3, None, SECTOR);
        assert_eq!(all[1024..2560], [0xc; 1536]);
        // Tearing to more sectors than written keeps it whole.
        assert_eq!(crash_image(&base, &records, 3, Some(9), SECTOR), all);
    }

    #[test]
    fn durable_image_keeps_only_flushed_writes() {
        let f = lun(FaultConfig::default());
        let base = f.inner().snapshot();
        f.start_recording();
        f.write_at(&[1u8; 512], 0).unwrap(); // a: after 0 flushes
        f.flush().unwrap();
        f.write_at(&[2u8; 512], 512).unwrap(); // b: after 1
        assert_eq!(
            f.compare_and_write(1024, &[0u8; 512], &[3u8; 512]).unwrap(),
            Caw::Written
        ); // c: after 1
        assert_eq!(
            f.compare_and_write(1024, &[0u8; 512], &[9u8; 512]).unwrap(),
            Caw::Miscompare(vec![3u8; 512])
        ); // a miscompare writes nothing and is not logged
        f.flush().unwrap();
        f.write_at(&[4u8; 512], 1536).unwrap(); // d: after 2
        let records = f.records();
        let flushes = f.flush_count();
        assert_eq!(flushes, 2);
        let after: Vec<u64> = records.iter().map(|r| r.after_flush).collect();
        assert_eq!(after, [0, 1, 1, 2]);
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);

        // The full crash image is the live device.
        let live = crash_image(&base, &records, records.len(), None, SECTOR);
        assert_eq!(live, f.inner().snapshot());

        let at = |cut: usize| flushes_at_cut(&records, cut, flushes);
        assert_eq!([at(0), at(1), at(2), at(3), at(4)], [0, 1, 1, 2, 2]);
        let d = durable_image(&base, &records, 4, at(4));
        assert_eq!(
            d[..1536],
            crash_image(&base, &records, 3, None, SECTOR)[..1536]
        );
        assert!(d[1536..].iter().all(|&b| b == 0), "d was never flushed");
        // A crash before the second flush completed keeps only a.
        let d = durable_image(&base, &records, 4, 1);
        assert_eq!(d, crash_image(&base, &records, 1, None, SECTOR));
        // A cut before a flush has nothing durable.
        assert_eq!(durable_image(&base, &records, 1, at(1) - 1), base);
    }

    /// Runs a fixed workload and returns which calls failed and the final image.
    fn run(seed: u64) -> (Vec<bool>, Vec<u8>) {
        let f = lun(FaultConfig {
            seed,
            lost_reply_prob: 0.2,
            eio_read_prob: 0.2,
            eio_write_prob: 0.2,
            torn_write_prob: 0.2,
            eio_flush_prob: 0.2,
            latency_max_us: 0,
            ..FaultConfig::default()
        });
        let mut outcomes = Vec::new();
        for i in 0..200u64 {
            let offset = (i % 16) * 2048;
            let byte = (i % 250) as u8 + 1;
            outcomes.push(f.write_at(&[byte; 2048], offset).is_err());
            let mut buf = [0u8; 512];
            outcomes.push(f.read_at(&mut buf, offset).is_err());
            let caw = f.compare_and_write(offset, &buf, &[byte; 512]);
            outcomes.push(caw.is_err());
            outcomes.push(f.flush().is_err());
        }
        (outcomes, f.inner().snapshot())
    }

    #[test]
    fn faults_replay_from_the_seed() {
        let (a, image_a) = run(11);
        let (b, image_b) = run(11);
        assert_eq!(a, b);
        assert_eq!(image_a, image_b);
        let failures = a.iter().filter(|&&e| e).count();
        assert!(failures > 50 && failures < a.len() - 50, "{failures}");
        let (c, _) = run(12);
        assert_ne!(a, c, "another seed gave the same faults");
    }
}
