//! The ATS self-test: proves that a device's compare-and-write is really atomic
//! before a volume trusts it (`atsfs ats-selftest`, and mkfs before it records
//! hardware ATS).
//!
//! It works on one scratch sector that the caller chose (see
//! `mkfs::selftest_sector`) and that nobody else uses while it runs:
//!
//! 1. reads the sector's content, to put it back at the end, and claims the sector
//!    by compare-and-write: from then on it holds a test image (magic, a random run
//!    nonce, a counter, the writing session, the counter again in its last 8 bytes);
//! 2. from a second session, a compare-and-write with a wrong `expected` must be
//!    reported as `Caw::Miscompare` with the sector's real content and leave the
//!    sector unchanged; one with the right `expected` must write (checked by reading
//!    through the first session);
//! 3. `sessions` sessions (each a separate `open` of the device: on iSCSI each is its
//!    own initiator) race read-then-compare-and-write increments of the counter;
//!    every miscompare retries from the actual content it reported. A miscompare
//!    that reports the session's own new image means its write landed (a lost reply
//!    that the backend retried): it counts as a success, as a host counts it;
//! 4. the counter must have moved by exactly the number of compare-and-writes that
//!    reported success. Fewer means lost updates (two "successful" increments from
//!    the same value): the device's compare-and-write is not atomic;
//! 5. the sector gets its first content back (by compare-and-write from the last
//!    test image, so a sector someone else took meanwhile is left alone).
//!
//! An image without this run's nonce means another self-test (or someone else) wrote
//! the sector: the run stops with `SelftestError::Interfered` rather than blame the
//! device. Every loop is bounded (`ATTEMPTS_MAX` per increment).

use super::{Caw, Lun, LunError, LunResult};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Default number of racing sessions.
pub const SESSIONS_DEFAULT: usize = 8;
/// Default number of increments per session.
pub const INCREMENTS_DEFAULT: u64 = 2000;
/// Most sessions a run may open.
pub const SESSIONS_MAX: usize = 256;
/// Most compare-and-writes one increment may take before the run gives up: some
/// session wins every round, so a live device never needs nearly this many.
pub const ATTEMPTS_MAX: u64 = 100_000;
/// How often `run` reports progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// The first 8 bytes of a test image.
const MAGIC: &[u8; 8] = b"ATSSELFT";
/// Bytes of the image header: magic, nonce, counter, writer.
const HEADER_BYTES: usize = 40;
/// The writer of the images the run writes outside the race.
const SETUP_WRITER: u64 = u64::MAX;

/// What to run.
#[derive(Clone, Debug)]
pub struct SelftestOptions {
    /// Byte offset of the scratch sector (sector aligned).
    pub offset: u64,
    /// Racing sessions, 2..=SESSIONS_MAX.
    pub sessions: usize,
    /// Increments per session, at least 1.
    pub increments: u64,
}

/// What a run found. `problems` is empty when the device passed.
#[derive(Clone, Debug, Serialize)]
pub struct SelftestReport {
    pub device: String,
    /// `hardware` or `emulated`: how the device says its compare-and-write works.
    pub ats_kind: String,
    pub offset: u64,
    pub sector_size: u32,
    pub sessions: usize,
    pub increments_per_session: u64,
    /// Compare-and-writes of the race that reported success.
    pub succeeded: u64,
    /// How far the counter moved during the race.
    pub counter_moved: u64,
    /// Compare-and-writes of the race that reported a miscompare.
    pub miscompares: u64,
    /// Of those, the ones that reported the session's own new image: the write had
    /// landed (a lost reply); counted in `succeeded` too.
    pub lost_replies: u64,
    pub elapsed_ms: u64,
    /// Compare-and-writes issued per second during the race (successes and
    /// miscompares).
    pub caws_per_s: f64,
    /// Whether the scratch sector got its first content back.
    pub restored: bool,
    /// What is wrong with the device's compare-and-write; empty when it passed.
    pub problems: Vec<String>,
}

impl SelftestReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Why a run could not judge the device (as opposed to finding it broken).
#[derive(Debug, Error)]
pub enum SelftestError {
    #[error("bad self-test options: {0}")]
    BadOptions(String),
    #[error("opening a session to the device: {0}")]
    Open(#[source] LunError),
    #[error("{0}; the self-test cannot judge the device after an I/O error: fix the path to the storage and run it again")]
    Io(#[from] LunError),
    #[error(
        "the scratch sector at byte {offset} was changed by someone else during the self-test \
         (another ats-selftest on this device, or a host?); run it again when nothing else uses \
         the device"
    )]
    Interfered { offset: u64 },
    #[error(
        "an increment of session {session} still failed after {ATTEMPTS_MAX} compare-and-writes: \
         the device keeps reporting miscompares without anyone winning; its compare-and-write \
         is broken"
    )]
    NoProgress { session: usize },
    #[error(
        "session {session}: a miscompare reported content that is not what the sector can \
         hold ({what}); the device's compare-and-write is broken"
    )]
    BadReply { session: usize, what: String },
    #[error(
        "{who} read a torn scratch sector (this run's image, counter {head} at its start but \
         {tail} at its end): a read saw half of a compare-and-write, so COMPARE AND WRITE is \
         not atomic on this device; for tgt, run tgtd with one I/O thread per LUN (-t 1)"
    )]
    Torn { who: String, head: u64, tail: u64 },
}

impl SelftestError {
    /// True when the error is a finding about the device (its compare-and-write is
    /// broken), false when the run could not judge it.
    pub fn blames_device(&self) -> bool {
        matches!(
            self,
            SelftestError::NoProgress { .. }
                | SelftestError::BadReply { .. }
                | SelftestError::Torn { .. }
        )
    }
}

/// Opens one session to the device under test.
pub type SessionFactory<'a> = dyn Fn() -> LunResult<Arc<dyn Lun>> + Sync + 'a;

/// Runs the self-test. `progress(done, total)` is called from this thread about
/// twice a second during the race, with increments done so far.
pub fn run(
    open: &SessionFactory<'_>,
    opts: &SelftestOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SelftestReport, SelftestError> {
    check_options(opts)?;
    let first = open().map_err(SelftestError::Open)?;
    let sector = first.sector_size() as usize;
    check_offset(first.as_ref(), opts.offset)?;
    let mut original = vec![0u8; sector];
    first.read_at(&mut original, opts.offset)?;
    let run = Run {
        offset: opts.offset,
        sector,
        nonce: rand::random(),
    };
    let mut report = SelftestReport {
        device: first.describe(),
        ats_kind: first.ats_kind().name().into(),
        offset: opts.offset,
        sector_size: first.sector_size(),
        sessions: opts.sessions,
        increments_per_session: opts.increments,
        succeeded: 0,
        counter_moved: 0,
        miscompares: 0,
        lost_replies: 0,
        elapsed_ms: 0,
        caws_per_s: 0.0,
        restored: false,
        problems: Vec::new(),
    };
    // Claim the sector: from here on, it must get its content back.
    let claimed = match first.compare_and_write(run.offset, &original, &run.image(0)) {
        Ok(claimed) => claimed,
        Err(e) => {
            // The write may have landed with its reply lost: put the sector back if it
            // holds our image.
            run.restore(first.as_ref(), &original);
            return Err(e.into());
        }
    };
    match claimed {
        Caw::Written => {}
        // A miscompare reporting our own image: the write landed, its reply was lost.
        Caw::Miscompare(actual) if actual == run.image(0) => {}
        Caw::Miscompare(actual) if actual == original => {
            report.problems.push(format!(
                "a compare-and-write with the sector's own content as `expected` was reported \
                 as a miscompare: {}",
                not_usable()
            ));
            return Ok(report);
        }
        Caw::Miscompare(_) => return Err(SelftestError::Interfered { offset: run.offset }),
    }
    let outcome = run.checks_and_race(first.as_ref(), open, opts, &mut report, progress);
    report.restored = run.restore(first.as_ref(), &original);
    outcome.map(|()| report)
}

fn not_usable() -> &'static str {
    "atsfs cannot use this device's COMPARE AND WRITE (fix the storage, or make the volume \
     with Disk Paxos, which needs none: mkfs.atsfs --ats auto or --ats paxos)"
}

/// Refuses options `run` would refuse, before anything is opened.
pub fn check_options(opts: &SelftestOptions) -> Result<(), SelftestError> {
    if opts.sessions < 2 || opts.sessions > SESSIONS_MAX {
        return Err(SelftestError::BadOptions(format!(
            "--sessions {} must be between 2 and {SESSIONS_MAX}",
            opts.sessions
        )));
    }
    if opts.increments == 0 {
        return Err(SelftestError::BadOptions(
            "--increments must be at least 1".into(),
        ));
    }
    Ok(())
}

fn check_offset(lun: &dyn Lun, offset: u64) -> Result<(), SelftestError> {
    let sector = u64::from(lun.sector_size());
    if sector < HEADER_BYTES as u64 + 8
        || offset % sector != 0
        || offset.saturating_add(sector) > lun.len_bytes()
    {
        return Err(SelftestError::BadOptions(format!(
            "the scratch sector at byte {offset} is not a whole {sector}-byte sector of {} \
             ({} bytes)",
            lun.describe(),
            lun.len_bytes()
        )));
    }
    Ok(())
}

/// One run's scratch sector and nonce.
struct Run {
    offset: u64,
    sector: usize,
    nonce: [u8; 16],
}

/// What a racing session counted.
#[derive(Default)]
struct Tally {
    succeeded: u64,
    miscompares: u64,
    lost_replies: u64,
    /// Miscompares whose reported content was the `expected` we sent.
    false_miscompares: u64,
}

impl Run {
    /// The test image with counter `n` written outside the race.
    fn image(&self, n: u64) -> Vec<u8> {
        self.image_by(n, SETUP_WRITER)
    }

    /// The test image with counter `n` written by `writer`: magic, nonce, counter,
    /// writer, zeros, counter again.
    fn image_by(&self, n: u64, writer: u64) -> Vec<u8> {
        let mut image = vec![0u8; self.sector];
        image[..8].copy_from_slice(MAGIC);
        image[8..24].copy_from_slice(&self.nonce);
        image[24..32].copy_from_slice(&n.to_le_bytes());
        image[32..40].copy_from_slice(&writer.to_le_bytes());
        let tail = self.sector - 8;
        image[tail..].copy_from_slice(&n.to_le_bytes());
        image
    }

    /// The counter of a test image of this run; `None` for any other content.
    fn counter(&self, image: &[u8]) -> Option<u64> {
        if image.len() != self.sector || &image[..8] != MAGIC || image[8..24] != self.nonce {
            return None;
        }
        let n = u64::from_le_bytes(image[24..32].try_into().ok()?);
        let writer = u64::from_le_bytes(image[32..40].try_into().ok()?);
        (image == self.image_by(n, writer).as_slice()).then_some(n)
    }

    /// True for a test image of another run (another self-test on the same sector).
    fn foreign_image(&self, image: &[u8]) -> bool {
        image.get(..8) == Some(&MAGIC[..]) && image.get(8..24) != Some(&self.nonce[..])
    }

    /// A sector of this run that is no whole image (parts of two writes): the head
    /// and tail counters.
    fn torn(&self, image: &[u8]) -> Option<(u64, u64)> {
        if image.len() != self.sector
            || &image[..8] != MAGIC
            || image[8..24] != self.nonce
            || self.counter(image).is_some()
        {
            return None;
        }
        let head = u64::from_le_bytes(image[24..32].try_into().ok()?);
        let tail = u64::from_le_bytes(image[self.sector - 8..].try_into().ok()?);
        Some((head, tail))
    }

    /// The counter of what `who` read or was replied, when it is no whole image of
    /// this run: torn (the device's fault), another run's (interference), or, for a
    /// read, anything else someone wrote (interference).
    fn counter_of(&self, who: &str, image: &[u8]) -> Result<u64, SelftestError> {
        if let Some(n) = self.counter(image) {
            return Ok(n);
        }
        match self.torn(image) {
            Some((head, tail)) => Err(SelftestError::Torn {
                who: who.into(),
                head,
                tail,
            }),
            None => Err(SelftestError::Interfered {
                offset: self.offset,
            }),
        }
    }

    /// The counter of a miscompare's reply.
    fn reply_counter(&self, session: usize, reply: &[u8]) -> Result<u64, SelftestError> {
        if self.counter(reply).is_none() && self.torn(reply).is_none() && !self.foreign_image(reply)
        {
            return Err(SelftestError::BadReply {
                session,
                what: describe_image(self, reply),
            });
        }
        self.counter_of(&format!("session {session}"), reply)
    }

    fn read_counter(&self, lun: &dyn Lun) -> Result<u64, SelftestError> {
        let mut image = vec![0u8; self.sector];
        lun.read_at(&mut image, self.offset)?;
        self.counter_of("the final read", &image)
    }

    fn checks_and_race(
        &self,
        first: &dyn Lun,
        open: &SessionFactory<'_>,
        opts: &SelftestOptions,
        report: &mut SelftestReport,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), SelftestError> {
        let second = open().map_err(SelftestError::Open)?;
        self.check_miscompare(first, second.as_ref(), &mut report.problems)?;
        if !report.problems.is_empty() {
            return Ok(());
        }
        self.check_write(first, second.as_ref(), &mut report.problems)?;
        if !report.problems.is_empty() {
            return Ok(());
        }
        drop(second);
        let base = self.read_counter(first)?;
        let started = Instant::now();
        let tally = self.race(open, opts, progress)?;
        let elapsed = started.elapsed();
        let end = self.read_counter(first)?;
        report.elapsed_ms = elapsed.as_millis() as u64;
        report.succeeded = tally.succeeded;
        report.miscompares = tally.miscompares;
        report.lost_replies = tally.lost_replies;
        report.counter_moved = end.wrapping_sub(base);
        let caws = tally.succeeded + tally.miscompares;
        report.caws_per_s = caws as f64 / elapsed.as_secs_f64().max(1e-9);
        judge(report, &tally);
        Ok(())
    }

    /// A compare-and-write with a wrong `expected` must report the real content and
    /// change nothing.
    fn check_miscompare(
        &self,
        first: &dyn Lun,
        second: &dyn Lun,
        problems: &mut Vec<String>,
    ) -> Result<(), SelftestError> {
        let held = self.image(0);
        match second.compare_and_write(self.offset, &self.image(1), &self.image(2))? {
            Caw::Written => problems.push(format!(
                "a compare-and-write with a wrong `expected` wrote the sector instead of \
                 reporting a miscompare: {}",
                not_usable()
            )),
            Caw::Miscompare(actual) if actual != held => {
                if self.foreign_image(&actual) {
                    return Err(SelftestError::Interfered {
                        offset: self.offset,
                    });
                }
                problems.push(format!(
                    "a miscompare reported content that is not the sector's (the sector holds \
                     counter 0, the reply {}): {}",
                    describe_image(self, &actual),
                    not_usable()
                ));
            }
            Caw::Miscompare(_) => {}
        }
        let mut now = vec![0u8; self.sector];
        first.read_at(&mut now, self.offset)?;
        if problems.is_empty() && now != held {
            problems.push(format!(
                "a compare-and-write that reported a miscompare changed the sector (now {}): {}",
                describe_image(self, &now),
                not_usable()
            ));
        }
        Ok(())
    }

    /// A compare-and-write with the right `expected` must write, visibly to another
    /// session.
    fn check_write(
        &self,
        first: &dyn Lun,
        second: &dyn Lun,
        problems: &mut Vec<String>,
    ) -> Result<(), SelftestError> {
        match second.compare_and_write(self.offset, &self.image(0), &self.image(1))? {
            Caw::Written => {}
            Caw::Miscompare(actual) if actual == self.image(1) => {}
            Caw::Miscompare(actual) => {
                problems.push(format!(
                    "a compare-and-write with the sector's own content as `expected` was \
                     reported as a miscompare (reply {}): {}",
                    describe_image(self, &actual),
                    not_usable()
                ));
                return Ok(());
            }
        }
        let mut now = vec![0u8; self.sector];
        first.read_at(&mut now, self.offset)?;
        if now != self.image(1) {
            problems.push(format!(
                "a compare-and-write that reported success did not write: another session \
                 reads {}: {}",
                describe_image(self, &now),
                not_usable()
            ));
        }
        Ok(())
    }

    /// `opts.sessions` threads, each with its own session, increment the counter.
    fn race(
        &self,
        open: &SessionFactory<'_>,
        opts: &SelftestOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Tally, SelftestError> {
        let mut sessions = Vec::with_capacity(opts.sessions);
        for _ in 0..opts.sessions {
            sessions.push(open().map_err(SelftestError::Open)?);
        }
        let total = opts.increments * opts.sessions as u64;
        let done = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let barrier = Barrier::new(opts.sessions);
        let tally = Mutex::new(Tally::default());
        let first_error: Mutex<Option<SelftestError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for (index, lun) in sessions.iter().enumerate() {
                let (done, stop, barrier) = (&done, &stop, &barrier);
                let (tally, first_error) = (&tally, &first_error);
                scope.spawn(move || {
                    barrier.wait();
                    let result = self.session(index, lun.as_ref(), opts.increments, done, stop);
                    match result {
                        Ok(mine) => {
                            let mut all = tally.lock().unwrap_or_else(|e| e.into_inner());
                            all.succeeded += mine.succeeded;
                            all.miscompares += mine.miscompares;
                            all.lost_replies += mine.lost_replies;
                            all.false_miscompares += mine.false_miscompares;
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                            slot.get_or_insert(e);
                        }
                    }
                });
            }
            // The scope joins the sessions; meanwhile, report progress.
            let mut last = Instant::now();
            while done.load(Ordering::Relaxed) < total && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() >= PROGRESS_INTERVAL {
                    progress(done.load(Ordering::Relaxed), total);
                    last = Instant::now();
                }
            }
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        progress(done.load(Ordering::Relaxed), total);
        Ok(tally.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// One session's increments: read, then compare-and-write from what was read, and
    /// from each miscompare's reported content until one succeeds.
    fn session(
        &self,
        index: usize,
        lun: &dyn Lun,
        increments: u64,
        done: &AtomicU64,
        stop: &AtomicBool,
    ) -> Result<Tally, SelftestError> {
        let mut tally = Tally::default();
        let mut current = vec![0u8; self.sector];
        for _ in 0..increments {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            lun.read_at(&mut current, self.offset)?;
            let mut n = self.counter_of(&format!("session {index}"), &current)?;
            let mut won = false;
            for _ in 0..ATTEMPTS_MAX {
                let new = self.image_by(n + 1, index as u64);
                match lun.compare_and_write(self.offset, &current, &new)? {
                    Caw::Written => {
                        tally.succeeded += 1;
                        won = true;
                        break;
                    }
                    Caw::Miscompare(actual) if actual == new => {
                        // Our write landed; its reply was lost and the retry found it.
                        tally.miscompares += 1;
                        tally.lost_replies += 1;
                        tally.succeeded += 1;
                        won = true;
                        break;
                    }
                    Caw::Miscompare(actual) => {
                        tally.miscompares += 1;
                        if actual == current {
                            tally.false_miscompares += 1;
                        }
                        n = self.reply_counter(index, &actual)?;
                        current = actual;
                    }
                }
            }
            if !won {
                return Err(SelftestError::NoProgress { session: index });
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(tally)
    }

    /// Puts the first content back, by compare-and-write from the test image found
    /// there. Returns whether it did.
    fn restore(&self, lun: &dyn Lun, original: &[u8]) -> bool {
        let mut now = vec![0u8; self.sector];
        if lun.read_at(&mut now, self.offset).is_err() || self.counter(&now).is_none() {
            return false;
        }
        matches!(
            lun.compare_and_write(self.offset, &now, original),
            Ok(Caw::Written)
        )
    }
}

/// Fills in the report's problems from the race's counts.
fn judge(report: &mut SelftestReport, tally: &Tally) {
    if report.counter_moved != report.succeeded {
        report.problems.push(format!(
            "COMPARE AND WRITE is not atomic on this device: {} increments succeeded but the \
             counter says {}; for tgt, run tgtd with one I/O thread per LUN (-t 1)",
            report.succeeded, report.counter_moved
        ));
    }
    if tally.false_miscompares > 0 {
        report.problems.push(format!(
            "{} compare-and-writes were reported as miscompares although the content they \
             reported was the `expected` they sent: {}",
            tally.false_miscompares,
            not_usable()
        ));
    }
}

/// A short description of a sector's content for messages.
fn describe_image(run: &Run, image: &[u8]) -> String {
    match run.counter(image) {
        Some(n) => format!("counter {n}"),
        None if image.len() != run.sector => format!("{} bytes, not a sector", image.len()),
        None if image.iter().all(|&b| b == 0) => "all zeros".into(),
        None => "bytes that are not a test image".into(),
    }
}

#[cfg(test)]
mod tests;
