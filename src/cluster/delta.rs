//! The delta lease: how a host claims a heartbeat slot on a Disk Paxos volume, where
//! it has no compare-and-write yet (its slot is its Paxos identity; docs/locking.md,
//! "The chicken and the egg").
//!
//! `DeltaLun` wraps the device for `claim_slot` only: its `compare_and_write` is
//! sanlock's delta-lease step, built from plain reads and writes of the one sector:
//!
//! 1. read the sector (note the read's issue time); a different content is a
//!    miscompare, as for any compare-and-write;
//! 2. right before writing, check that the read is younger than `fresh_ms`, else read
//!    again (back to 1, bounded);
//! 3. write `new`, wait `settle_ms`, read again: only if the sector still holds
//!    `new` exactly is the write ours ("written"); anything else is a miscompare with
//!    what is there (someone wrote after us and won).
//!
//! Why two claimers never both win: the later write wins and the earlier writer sees
//! it when it reads again. A write landing after the winner's second read would have
//! been issued more than `settle_ms - io_max` after the winner's write completed, and
//! the read that justified it (at most `fresh_ms` earlier) would have come after that
//! write and seen the slot taken. So it holds while `settle_ms > fresh_ms + io_max`,
//! where `io_max` is the longest a write may sit in the I/O path: a timing
//! assumption, as sanlock's `io_timeout`. Each writer holds itself to it: a write
//! whose reply took longer than the volume's io_timeout (half of `io_max`) is not
//! trusted, and the host fences itself (`untrusted_write`).
//!
//! Every writer of a sector that a delta claim may race (another claimer, a
//! recoverer taking a dead slot) must follow the same rule, or hold the Disk Paxos
//! token and confirm its write by the same re-read after `settle_ms`.
//! Reads, writes and flushes pass through.

use super::Clock;
use crate::lun::{check_caw, AtsKind, Caw, Lun, LunResult};
use std::sync::Arc;
use std::time::Duration;

/// Times one compare-and-write reads again because its read grew stale before the
/// write (the host stood still).
const STALE_READS_MAX: u32 = 16;

/// The delta lease's timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaTiming {
    /// The longest time between the read that justifies a write and the write.
    pub fresh_ms: u64,
    /// How long after its write a claimer reads again.
    pub settle_ms: u64,
    /// The longest a write of ours may take, issue to reply, and still be trusted to
    /// have landed within `io_max` of its issue (`untrusted_write`).
    pub io_timeout_ms: u64,
}

impl DeltaTiming {
    /// For a volume's heartbeat: reads a quarter interval fresh, and settles for
    /// `fresh + 2 * io_timeout`, so `io_max`, the longest a write may sit in the I/O
    /// path, is twice the io_timeout every writer holds itself to (2 s with the
    /// defaults: settle 2.25 s). The claim write counts as the slot's first heartbeat;
    /// the settle is well under the lease, so observers still see the slot alive.
    pub fn for_volume(interval: Duration, io_timeout: Duration) -> DeltaTiming {
        let fresh_ms = interval.as_millis() as u64 / 4;
        let io_timeout_ms = io_timeout.as_millis() as u64;
        DeltaTiming {
            fresh_ms,
            settle_ms: fresh_ms + 2 * io_timeout_ms,
            io_timeout_ms,
        }
    }
}

/// The error for a write of ours that took `took_ms`, more than `io_timeout_ms`,
/// issue to reply: it may have landed later than the rule it was issued under allows
/// (after our token ran out, after a rival's settle), so the host does not trust it
/// and fences itself, as sanlock's watchdog would.
pub(crate) fn untrusted_write(
    device: &str,
    offset: u64,
    took_ms: u64,
    io_timeout_ms: u64,
) -> crate::lun::LunError {
    crate::lun::LunError::Fenced(format!(
        "a write to {device} at byte {offset} took {took_ms} ms, more than the volume's \
         io_timeout of {io_timeout_ms} ms: it may have landed after another host acted on \
         the sector, so this host does not trust it"
    ))
}

/// The device as `claim_slot` sees it on a Disk Paxos volume.
pub struct DeltaLun {
    inner: Arc<dyn Lun>,
    clock: Arc<dyn Clock>,
    timing: DeltaTiming,
}

impl DeltaLun {
    pub fn new(inner: Arc<dyn Lun>, clock: Arc<dyn Clock>, timing: DeltaTiming) -> DeltaLun {
        DeltaLun {
            inner,
            clock,
            timing,
        }
    }

    /// Reads the sector: its content and the read's issue time.
    fn read(&self, offset: u64, len: usize) -> LunResult<(Vec<u8>, u64)> {
        let issued_ms = self.clock.now_ms();
        let mut actual = vec![0u8; len];
        self.inner.read_at(&mut actual, offset)?;
        Ok((actual, issued_ms))
    }
}

impl Lun for DeltaLun {
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
        check_caw(offset, expected, new, self.sector_size(), self.len_bytes())?;
        for _ in 0..STALE_READS_MAX {
            let (actual, read_ms) = self.read(offset, expected.len())?;
            if actual != expected {
                return Ok(Caw::Miscompare(actual));
            }
            // The read must still be fresh when the write is issued.
            if self.clock.now_ms().saturating_sub(read_ms) >= self.timing.fresh_ms {
                continue;
            }
            // Once the write is issued it may land, whatever its reply says: a lost
            // reply must not let the caller's read-back count it won before `settle`
            // (a later claimer could still write over it and win too). So the write's
            // error is not returned: settle, then the read decides. Unless the write
            // took longer than io_timeout: then it may land after anything we read.
            let issued_ms = self.clock.now_ms();
            let wrote = self.inner.write_at(new, offset);
            let took_ms = self.clock.now_ms().saturating_sub(issued_ms);
            if took_ms > self.timing.io_timeout_ms {
                return Err(untrusted_write(
                    &self.inner.describe(),
                    offset,
                    took_ms,
                    self.timing.io_timeout_ms,
                ));
            }
            if let Err(e) = wrote {
                tracing::debug!(
                    offset,
                    "delta-lease write failed ({e}); settling before the read decides"
                );
            }
            self.clock
                .sleep(Duration::from_millis(self.timing.settle_ms));
            let (after, _) = self.read(offset, new.len())?;
            if after == new {
                return Ok(Caw::Written);
            }
            return Ok(Caw::Miscompare(after));
        }
        Err(crate::lun::LunError::AtsTimeout {
            device: self.inner.describe(),
            offset,
            waited_ms: self.timing.fresh_ms * u64::from(STALE_READS_MAX),
        })
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn ats_kind(&self) -> AtsKind {
        AtsKind::DiskPaxos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{claim_slot, HostUuid, ManualClock, SystemClock};
    use crate::format::{Geometry, MkfsParams};
    use crate::lun::{FaultConfig, FaultLun, MemLun};
    use std::sync::atomic::{AtomicBool, Ordering};

    const SECTOR: usize = 512;
    const AT: u64 = 4096;

    fn image(byte: u8) -> Vec<u8> {
        vec![byte; SECTOR]
    }

    /// A LUN that runs `then` once, right after the first write lands: "another
    /// claimer writes while we settle".
    struct AfterWrite {
        inner: Arc<MemLun>,
        armed: AtomicBool,
        then: Box<dyn Fn(&MemLun) + Send + Sync>,
    }

    impl Lun for AfterWrite {
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
            self.inner.write_at(buf, offset)?;
            if self.armed.swap(false, Ordering::SeqCst) {
                (self.then)(&self.inner);
            }
            Ok(())
        }
        fn compare_and_write(&self, o: u64, e: &[u8], n: &[u8]) -> LunResult<Caw> {
            self.inner.compare_and_write(o, e, n)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "after-write".into()
        }
    }

    fn timing() -> DeltaTiming {
        DeltaTiming {
            fresh_ms: 25,
            settle_ms: 100,
            io_timeout_ms: 1000,
        }
    }

    #[test]
    fn a_claimer_overwritten_while_it_settles_loses() {
        // A and B both read the slot free; A writes, then B writes over it while A
        // settles. A must see B's image when it reads again, and not win.
        let mem = Arc::new(MemLun::new(1 << 20, SECTOR as u32));
        let lun = Arc::new(AfterWrite {
            inner: mem.clone(),
            armed: AtomicBool::new(true),
            then: Box::new(|m| m.write_at(&image(2), AT).expect("B")),
        });
        let a = DeltaLun::new(lun, Arc::new(ManualClock::default()), timing());
        let outcome = a.compare_and_write(AT, &image(0), &image(1)).expect("caw");
        assert_eq!(outcome, Caw::Miscompare(image(2)));
    }

    #[test]
    fn an_undisturbed_claimer_wins_after_settling() {
        let mem = Arc::new(MemLun::new(1 << 20, SECTOR as u32));
        let clock = Arc::new(ManualClock::default());
        let a = DeltaLun::new(mem.clone(), clock.clone(), timing());
        assert_eq!(
            a.compare_and_write(AT, &image(0), &image(1)).expect("caw"),
            Caw::Written
        );
        assert!(clock.now_ms() >= 100, "did not settle");
        assert_eq!(
            a.compare_and_write(AT, &image(0), &image(3)).expect("caw"),
            Caw::Miscompare(image(1))
        );
    }

    /// A LUN whose reads take `ms` on a manual clock: the host stands still there.
    struct SlowReads {
        inner: Arc<MemLun>,
        clock: Arc<ManualClock>,
        ms: u64,
        reads: std::sync::atomic::AtomicU64,
    }

    impl Lun for SlowReads {
        fn sector_size(&self) -> u32 {
            self.inner.sector_size()
        }
        fn len_bytes(&self) -> u64 {
            self.inner.len_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.clock.advance(Duration::from_millis(self.ms));
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
            self.inner.write_at(buf, offset)
        }
        fn compare_and_write(&self, o: u64, e: &[u8], n: &[u8]) -> LunResult<Caw> {
            self.inner.compare_and_write(o, e, n)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "slow-reads".into()
        }
    }

    #[test]
    fn a_read_that_grew_stale_is_never_acted_on() {
        // Every read takes longer than `fresh_ms`: no write may follow one.
        let mem = Arc::new(MemLun::new(1 << 20, SECTOR as u32));
        let clock = Arc::new(ManualClock::default());
        let slow = Arc::new(SlowReads {
            inner: mem.clone(),
            clock: clock.clone(),
            ms: 30,
            reads: Default::default(),
        });
        let a = DeltaLun::new(slow.clone(), clock, timing());
        let err = a.compare_and_write(AT, &image(0), &image(1)).unwrap_err();
        assert!(
            matches!(err, crate::lun::LunError::AtsTimeout { .. }),
            "{err}"
        );
        let mut now = image(9);
        mem.read_at(&mut now, AT).expect("read");
        assert_eq!(now, image(0), "a stale read was acted on");
        assert_eq!(
            slow.reads.load(Ordering::SeqCst),
            u64::from(STALE_READS_MAX)
        );
    }

    /// A LUN whose writes take `ms` on a manual clock.
    struct SlowWrites {
        inner: Arc<MemLun>,
        clock: Arc<ManualClock>,
        ms: u64,
    }

    impl Lun for SlowWrites {
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
            self.clock.advance(Duration::from_millis(self.ms));
            self.inner.write_at(buf, offset)
        }
        fn compare_and_write(&self, o: u64, e: &[u8], n: &[u8]) -> LunResult<Caw> {
            self.inner.compare_and_write(o, e, n)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "slow-writes".into()
        }
    }

    #[test]
    fn a_claim_write_slower_than_io_timeout_does_not_win() {
        // `settle` covers a rival's write that lands within io_max of its issue; our
        // own write, if slower than io_timeout, may have landed after a rival's
        // settle and confirming read: the claim is not trusted, whatever we read.
        let mem = Arc::new(MemLun::new(1 << 20, SECTOR as u32));
        let clock = Arc::new(ManualClock::default());
        let slow = Arc::new(SlowWrites {
            inner: mem.clone(),
            clock: clock.clone(),
            ms: timing().io_timeout_ms + 1,
        });
        let a = DeltaLun::new(slow, clock, timing());
        let outcome = a.compare_and_write(AT, &image(0), &image(1));
        assert!(
            matches!(outcome, Err(crate::lun::LunError::Fenced(_))),
            "{outcome:?}"
        );
        // claim_slot's call does not take our image for a won claim either.
        let mem2 = Arc::new(MemLun::new(1 << 20, SECTOR as u32));
        let clock2 = Arc::new(ManualClock::default());
        let slow2 = Arc::new(SlowWrites {
            inner: mem2,
            clock: clock2.clone(),
            ms: timing().io_timeout_ms + 1,
        });
        let b = DeltaLun::new(slow2, clock2, timing());
        let looked = crate::cluster::heartbeat::caw_looked(&b, AT, &image(0), &image(1));
        assert!(
            matches!(looked, Err(crate::lun::LunError::Fenced(_))),
            "{looked:?}"
        );
    }

    #[test]
    fn hosts_claiming_at_once_through_delta_leases_get_distinct_slots() {
        let geo = Geometry::plan(&MkfsParams {
            total_bytes: 64 << 20,
            ats_sector_size: SECTOR as u32,
            max_hosts: 4,
            journal_blocks: Some(256),
            disk_paxos: true,
        })
        .expect("plan");
        let mem = Arc::new(MemLun::new(64 << 20, SECTOR as u32));
        let (interval, io_timeout) = (Duration::from_millis(20), Duration::from_millis(100));
        let slots: Vec<u32> = std::thread::scope(|scope| {
            let runs: Vec<_> = (1..=4u8)
                .map(|host| {
                    let mem = mem.clone();
                    scope.spawn(move || {
                        let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
                        let timing = DeltaTiming::for_volume(interval, io_timeout);
                        // I/Os take up to 2 ms, so that claims interleave.
                        let faults = FaultConfig {
                            seed: u64::from(host),
                            latency_max_us: 2000,
                            ..FaultConfig::default()
                        };
                        let slow = Arc::new(FaultLun::new(mem, faults));
                        let lun = DeltaLun::new(slow, clock.clone(), timing);
                        let me = HostUuid([host; 16]);
                        claim_slot(&lun, &geo, me, interval, 8 * io_timeout, clock.as_ref())
                            .expect("claim")
                            .slot
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().expect("host")).collect()
        });
        let mut distinct = slots.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "two hosts claimed one slot: {slots:?}");
    }
}

#[cfg(test)]
mod lost_reply_tests {
    use super::*;
    use crate::cluster::ManualClock;
    use crate::lun::{Caw, LunError, MemLun};
    use std::sync::atomic::{AtomicBool, Ordering};

    const SECTOR: usize = 512;
    const AT: u64 = 4096;

    /// A's device: its write lands, but the reply is lost (an error comes back).
    struct LostReply(Arc<MemLun>);
    impl Lun for LostReply {
        fn sector_size(&self) -> u32 {
            self.0.sector_size()
        }
        fn len_bytes(&self) -> u64 {
            self.0.len_bytes()
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> LunResult<()> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> LunResult<()> {
            self.0.write_at(b, o)?;
            Err(LunError::Io {
                device: "a".into(),
                op: "write",
                offset: o,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "lost reply"),
            })
        }
        fn compare_and_write(&self, o: u64, e: &[u8], n: &[u8]) -> LunResult<Caw> {
            self.0.compare_and_write(o, e, n)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "a".into()
        }
    }
    /// B's device: right after B's first read, A runs its whole claim.
    struct AfterRead {
        inner: Arc<MemLun>,
        armed: AtomicBool,
        then: Box<dyn Fn() + Send + Sync>,
    }
    impl Lun for AfterRead {
        fn sector_size(&self) -> u32 {
            self.inner.sector_size()
        }
        fn len_bytes(&self) -> u64 {
            self.inner.len_bytes()
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> LunResult<()> {
            self.inner.read_at(b, o)?;
            if self.armed.swap(false, Ordering::SeqCst) {
                (self.then)();
            }
            Ok(())
        }
        fn write_at(&self, b: &[u8], o: u64) -> LunResult<()> {
            self.inner.write_at(b, o)
        }
        fn compare_and_write(&self, o: u64, e: &[u8], n: &[u8]) -> LunResult<Caw> {
            self.inner.compare_and_write(o, e, n)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "b".into()
        }
    }

    #[test]
    fn a_claim_whose_reply_is_lost_still_settles_before_it_wins() {
        let timing = DeltaTiming {
            fresh_ms: 25,
            settle_ms: 100,
            io_timeout_ms: 1000,
        };
        let mem = Arc::new(MemLun::new(1 << 20, SECTOR as u32));
        // One clock for both hosts (time passes for everyone; a clock that stands still
        // is the lease's documented window, not this test's).
        let clock = Arc::new(ManualClock::default());
        let a_won = Arc::new(AtomicBool::new(false));
        let then = {
            let (mem, a_won, clock) = (mem.clone(), a_won.clone(), clock.clone());
            Box::new(move || {
                let a = DeltaLun::new(Arc::new(LostReply(mem.clone())), clock.clone(), timing);
                // claim_slot's call: caw_looked
                let r =
                    crate::cluster::heartbeat::caw_looked(&a, AT, &[0u8; SECTOR], &[1u8; SECTOR])
                        .expect("a");
                let won = matches!(&r, Caw::Written)
                    || matches!(&r, Caw::Miscompare(x) if x == &vec![1u8; SECTOR]);
                a_won.store(won, Ordering::SeqCst);
            })
        };
        let b_lun = Arc::new(AfterRead {
            inner: mem.clone(),
            armed: AtomicBool::new(true),
            then,
        });
        let b = DeltaLun::new(b_lun, clock, timing);
        let rb = crate::cluster::heartbeat::caw_looked(&b, AT, &[0u8; SECTOR], &[2u8; SECTOR])
            .expect("b");
        let b_won = matches!(&rb, Caw::Written)
            || matches!(&rb, Caw::Miscompare(x) if x == &vec![2u8; SECTOR]);
        assert!(
            !(a_won.load(Ordering::SeqCst) && b_won),
            "both claimers won the slot"
        );
    }
}
