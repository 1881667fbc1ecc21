//! Read-ahead of sequential O_DIRECT reads, and the barrier that keeps blocks being
//! read outside the core lock from being reused.
//!
//! A program that reads a file with O_DIRECT one large block at a time (`dd
//! iflag=direct`, a backup, fio's psync engine) sends the next FUSE read only after
//! the reply to the last one: without read-ahead the device sits idle while the
//! reply is copied and the next request comes, and the kernel's own read-ahead does
//! not apply to direct I/O. A disk controller would read ahead; this is the same,
//! in the daemon: when uncached reads of a file come one at a time, each where the
//! last ended, the next two ranges of the same size are mapped in the critical
//! section of the read and read by a read-ahead thread while the reply goes out.
//! A program with several reads in flight (asynchronous direct I/O) keeps the
//! device busy itself and is left alone.
//!
//! File data is still never served from a cache that could be stale. A read-ahead
//! is used only by the read of exactly its range, and only if that read's own
//! mapping (made under the core lock, as every read's) is identical and this host's
//! epoch (`Meta::epoch`) has not moved since the read-ahead was mapped: the epoch
//! moves with every mutating operation of this host (its own writes, truncates,
//! frees) and whenever it lets a lock go or drops its cache (another host may then
//! change the file). Another host can change a file's data only under that file's
//! lock, which this host must let go first; files in multi-writer mode, which other
//! hosts write while this one holds the lock, are never read ahead. Otherwise the
//! read-ahead is dropped and the read goes to the device as it would have.

use super::file::ReadPlan;
use super::{FsResult, Ino};
use crate::lun::Lun;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Counts data reads in progress outside the core lock (see `file::ReadPlan`).
/// A reader enters under the core lock and leaves when its device reads are done;
/// `wait_idle`, called under the core lock before freed blocks become reusable,
/// waits for every reader that entered before. A token may be handed to another
/// thread (the read-ahead thread), unlike a lock guard.
#[derive(Debug, Default)]
pub struct IoBarrier {
    readers: Mutex<usize>,
    idle: Condvar,
}

/// One reader inside the barrier; leaves it when dropped.
#[derive(Debug)]
pub struct IoToken(Arc<IoBarrier>);

impl IoBarrier {
    fn readers(&self) -> MutexGuard<'_, usize> {
        self.readers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enter(self: &Arc<Self>) -> IoToken {
        *self.readers() += 1;
        IoToken(self.clone())
    }

    /// Returns once no reader is inside.
    pub fn wait_idle(&self) {
        let mut readers = self.readers();
        while *readers > 0 {
            readers = self.idle.wait(readers).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for IoToken {
    fn drop(&mut self) {
        let mut readers = self.0.readers();
        *readers -= 1;
        if *readers == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Files whose sequential reads are followed at once (least recently read dropped).
const STREAMS_MAX: usize = 8;
/// Ranges read ahead of a stream's last read: two keep the device busy while the
/// reply to one goes out and the request for the next comes.
const DEPTH: u64 = 2;
/// Read-ahead threads: the two ranges ahead of a stream are read at the same time
/// (one at a time left the device idle between them: docs/perf.md).
const READERS: usize = 2;
/// Serial sequential reads in a row before the next ranges are read ahead.
const SERIAL_MIN: u32 = 2;
/// Buffers kept for reuse: a fresh one costs a page fault per page.
const SPARE_BUFFERS_MAX: usize = 6;
/// How long a read waits for the read-ahead of its range before reading itself.
const WAIT_MAX: Duration = Duration::from_secs(2);

/// The bytes of a finished read-ahead: the buffer and where the caller's bytes are.
type Filled = FsResult<(Vec<u8>, Range<usize>)>;

struct Ahead {
    /// Which job fills it: a job for the same offset started for an earlier,
    /// discarded ahead (another mapping) must not fill this one.
    id: u64,
    offset: u64,
    size: u32,
    /// `Meta::epoch` when it was mapped, and the mapping.
    epoch: u64,
    plan: ReadPlan,
    /// None while a read-ahead thread reads it.
    filled: Option<Filled>,
}

struct Stream {
    ino: Ino,
    /// Where the next sequential read starts.
    next: u64,
    last_used: u64,
    /// Reads of the file in progress.
    in_flight: u32,
    /// Sequential reads in a row that came with no other read of the file in
    /// progress. A program with several reads in flight (asynchronous direct I/O)
    /// keeps the device busy itself; reading ahead for it would only funnel its
    /// parallel reads through the read-ahead threads.
    serial: u32,
    /// Oldest first.
    aheads: VecDeque<Ahead>,
}

#[derive(Default)]
struct State {
    streams: Vec<Stream>,
    tick: u64,
    spare: Vec<Vec<u8>>,
    /// The id of the last read-ahead started.
    last_id: u64,
}

struct Job {
    id: u64,
    ino: Ino,
    plan: ReadPlan,
    lun: Arc<dyn Lun>,
    _token: IoToken,
    buf: Vec<u8>,
}

/// A read-ahead the caller may use, once its own mapping is known.
pub struct Candidate {
    epoch: u64,
    plan: ReadPlan,
    buf: Vec<u8>,
    range: Range<usize>,
}

/// A range to read ahead, mapped in the critical section of the read before it.
pub struct Next {
    pub ino: Ino,
    pub offset: u64,
    pub size: u32,
    pub epoch: u64,
    pub plan: ReadPlan,
    pub lun: Arc<dyn Lun>,
    pub token: IoToken,
}

/// A read in progress (`ReadAhead::note_read`).
pub struct Reading<'a> {
    readahead: &'a ReadAhead,
    ino: Ino,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut state = self.readahead.shared.state();
        if let Some(stream) = state.stream(self.ino) {
            stream.in_flight = stream.in_flight.saturating_sub(1);
        }
    }
}

/// Counters for `atsfs stats`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadAheadStats {
    /// Ranges read ahead.
    pub issued: u64,
    /// Reads served from a read-ahead.
    pub used: u64,
}

#[derive(Default)]
pub struct ReadAhead {
    shared: Arc<Shared>,
    worker: OnceLock<mpsc::Sender<Job>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    filled: Condvar,
    stats: Mutex<ReadAheadStats>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, ReadAheadStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a finished read-ahead, if it is still wanted.
    fn fill(&self, ino: Ino, id: u64, filled: Filled) {
        let mut state = self.state();
        let slot = state.stream(ino).and_then(|s| {
            s.aheads
                .iter_mut()
                .find(|a| a.id == id && a.filled.is_none())
        });
        match slot {
            Some(ahead) => ahead.filled = Some(filled),
            None => {
                if let Ok((buf, _)) = filled {
                    state.recycle(buf);
                }
            }
        }
        drop(state);
        self.filled.notify_all();
    }
}

impl State {
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS_MAX && buf.capacity() > 0 {
            self.spare.push(buf);
        }
    }

    /// Drops a read-ahead nobody will use (one still being read is dropped when
    /// its read-ahead thread finds it gone).
    fn discard(&mut self, ahead: Ahead) {
        if let Some(Ok((buf, _))) = ahead.filled {
            self.recycle(buf);
        }
    }

    fn stream(&mut self, ino: Ino) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.ino == ino)
    }
}

impl ReadAhead {
    pub fn stats(&self) -> ReadAheadStats {
        *self.shared.stats()
    }

    /// Before a read is mapped: takes the read-ahead of exactly this range, waiting
    /// for it if a read-ahead thread is still reading it. Holds no lock meanwhile
    /// (a read-ahead thread needs none, and a commit may be waiting for it).
    /// Read-aheads of ranges before this one are dropped: the reader moved on.
    pub fn take(&self, ino: Ino, offset: u64, size: u32) -> Option<Candidate> {
        let mut state = self.shared.state();
        let deadline = std::time::Instant::now() + WAIT_MAX;
        loop {
            let stream = state.stream(ino)?;
            let mut stale = Vec::new();
            while let Some(front) = stream.aheads.front() {
                if front.offset > offset || (front.offset == offset && front.size == size) {
                    break;
                }
                stale.extend(stream.aheads.pop_front());
            }
            let ready = match stream.aheads.front() {
                Some(front) if front.offset == offset => front.filled.is_some(),
                _ => {
                    stale.into_iter().for_each(|a| state.discard(a));
                    return None;
                }
            };
            stale.into_iter().for_each(|a| state.discard(a));
            if ready {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::debug!(ino, offset, "gave up waiting for a read-ahead");
                let late = state.stream(ino)?.aheads.pop_front()?;
                state.discard(late);
                return None;
            }
            state = self
                .shared
                .filled
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let ahead = state.stream(ino)?.aheads.pop_front()?;
        match ahead.filled? {
            Ok((buf, range)) => Some(Candidate {
                epoch: ahead.epoch,
                plan: ahead.plan,
                buf,
                range,
            }),
            Err(e) => {
                tracing::debug!(ino, offset, "read-ahead failed: {e}");
                None
            }
        }
    }

    /// Uses a candidate when the read's own mapping, made at `epoch`, is the one the
    /// read-ahead read: swaps its bytes into `buf` and returns where they are. The
    /// caller's old buffer is kept for a later read-ahead.
    pub fn settle(
        &self,
        candidate: Option<Candidate>,
        epoch: u64,
        plan: &ReadPlan,
        buf: &mut Vec<u8>,
    ) -> Option<Range<usize>> {
        let mut candidate = candidate?;
        let valid = candidate.epoch == epoch && candidate.plan == *plan;
        if valid {
            std::mem::swap(buf, &mut candidate.buf);
            self.shared.stats().used += 1;
        }
        self.shared.state().recycle(candidate.buf);
        valid.then_some(candidate.range)
    }

    /// Notes the start of a read of `size` bytes at `offset` (it ends when the
    /// returned guard is dropped); when it follows the previous read of the file,
    /// serially (`Stream::serial`), returns the offsets of the ranges of the same
    /// size after it that are worth reading ahead (those not being read ahead
    /// already).
    pub fn note_read(&self, ino: Ino, offset: u64, size: u32) -> (Reading<'_>, Vec<u64>) {
        let reading = Reading {
            readahead: self,
            ino,
        };
        let mut state = self.shared.state();
        state.tick += 1;
        let tick = state.tick;
        let next = offset.saturating_add(u64::from(size));
        if let Some(stream) = state.stream(ino) {
            let sequential = stream.next == offset && size > 0;
            stream.serial = match (sequential, stream.in_flight) {
                (true, 0) => stream.serial.saturating_add(1),
                _ => 0,
            };
            stream.in_flight += 1;
            stream.next = next;
            stream.last_used = tick;
            if stream.serial < SERIAL_MIN {
                return (reading, Vec::new());
            }
            let wanted = (1..=DEPTH)
                .filter_map(|k| offset.checked_add(k * u64::from(size)))
                .filter(|&o| !stream.aheads.iter().any(|a| a.offset == o))
                .collect();
            return (reading, wanted);
        }
        if state.streams.len() >= STREAMS_MAX {
            let oldest = (0..state.streams.len()).min_by_key(|&i| state.streams[i].last_used);
            if let Some(oldest) = oldest {
                let gone = state.streams.swap_remove(oldest);
                gone.aheads.into_iter().for_each(|a| state.discard(a));
            }
        }
        state.streams.push(Stream {
            ino,
            next,
            last_used: tick,
            in_flight: 1,
            serial: 0,
            aheads: VecDeque::new(),
        });
        (reading, Vec::new())
    }

    /// Starts reading `next` ahead on a read-ahead thread.
    pub fn start(&self, next: Next) {
        let (buf, id) = {
            let mut state = self.shared.state();
            let buf = state.spare.pop().unwrap_or_default();
            state.last_id += 1;
            let id = state.last_id;
            let Some(stream) = state.stream(next.ino) else {
                return;
            };
            stream.aheads.push_back(Ahead {
                id,
                offset: next.offset,
                size: next.size,
                epoch: next.epoch,
                plan: next.plan.clone(),
                filled: None,
            });
            if stream.aheads.len() > DEPTH as usize {
                if let Some(oldest) = stream.aheads.pop_front() {
                    state.discard(oldest);
                }
            }
            (buf, id)
        };
        let job = Job {
            id,
            ino: next.ino,
            plan: next.plan,
            lun: next.lun,
            _token: next.token,
            buf,
        };
        if self.worker().is_some_and(|w| w.send(job).is_ok()) {
            self.shared.stats().issued += 1;
        } else {
            let failed = super::FsError::Failed("no read-ahead thread".into());
            self.shared.fill(next.ino, id, Err(failed));
        }
    }

    /// The read-ahead threads (`READERS`, sharing one queue), started on first use;
    /// they end when `self` is dropped.
    fn worker(&self) -> Option<&mpsc::Sender<Job>> {
        if let Some(worker) = self.worker.get() {
            return Some(worker);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..READERS {
            let shared = self.shared.clone();
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name("atsfs-readahead".into())
                .spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(mut job) = next else {
                        return;
                    };
                    let filled = job
                        .plan
                        .execute_into(job.lun.as_ref(), &mut job.buf, true)
                        .map(|range| (job.buf, range));
                    shared.fill(job.ino, job.id, filled);
                });
            if let Err(e) = spawned {
                tracing::warn!("no read-ahead thread: {e}");
                return None;
            }
        }
        Some(self.worker.get_or_init(|| tx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn only_serial_sequential_reads_are_read_ahead() {
        let ra = ReadAhead::default();
        const MIB: u32 = 1 << 20;
        let at = |i: u64| i * u64::from(MIB);
        // One read at a time, each where the last ended: from the third on, the
        // next two ranges are wanted (less those already asked for).
        assert!(ra.note_read(7, at(0), MIB).1.is_empty());
        assert!(ra.note_read(7, at(1), MIB).1.is_empty());
        assert_eq!(ra.note_read(7, at(2), MIB).1, vec![at(3), at(4)]);
        // A jump starts over.
        assert!(ra.note_read(7, at(9), MIB).1.is_empty());
        assert!(ra.note_read(7, at(10), MIB).1.is_empty());
        assert_eq!(ra.note_read(7, at(11), MIB).1, vec![at(12), at(13)]);
        // Reads of a file in flight together (asynchronous direct I/O): none,
        // however sequential.
        let (first, _) = ra.note_read(7, at(12), MIB);
        for i in 13..20 {
            let (_reading, wanted) = ra.note_read(7, at(i), MIB);
            assert!(
                wanted.is_empty(),
                "read {i} alongside another was read ahead"
            );
        }
        drop(first);
        // Serial again: read ahead again after SERIAL_MIN reads.
        assert!(ra.note_read(7, at(20), MIB).1.is_empty());
        assert_eq!(ra.note_read(7, at(21), MIB).1, vec![at(22), at(23)]);
        // Another file is a stream of its own.
        assert!(ra.note_read(8, at(21), MIB).1.is_empty());
    }

    #[test]
    fn a_late_read_ahead_of_an_earlier_mapping_never_fills_a_newer_one() {
        // Read-ahead threads finish in any order. The job of an ahead that was
        // discarded (its range was mapped again, to other blocks) must not fill
        // the new ahead of the same range, whose check compares the new mapping.
        let ra = ReadAhead::default();
        let ahead = |id, plan: &ReadPlan| Ahead {
            id,
            offset: 4096,
            size: 4096,
            epoch: 2,
            plan: plan.clone(),
            filled: None,
        };
        let plan = ReadPlan::ready(vec![0; 4096]);
        {
            let mut state = ra.shared.state();
            state.streams.push(Stream {
                ino: 7,
                next: 4096,
                last_used: 0,
                in_flight: 0,
                serial: 0,
                aheads: VecDeque::from([ahead(2, &plan)]),
            });
        }
        // Job 1 (the discarded ahead's, read from the old blocks) ends last.
        ra.shared.fill(7, 1, Ok((vec![1; 4096], 0..4096)));
        {
            let mut state = ra.shared.state();
            let stream = state.stream(7).expect("stream");
            assert!(
                stream.aheads[0].filled.is_none(),
                "an older job filled a newer ahead"
            );
        }
        ra.shared.fill(7, 2, Ok((vec![2; 4096], 0..4096)));
        let candidate = ra.take(7, 4096, 4096).expect("the new ahead is filled");
        assert_eq!(candidate.buf, vec![2; 4096]);
    }

    #[test]
    fn the_barrier_waits_for_readers_that_entered_before_on_any_thread() {
        let barrier = Arc::new(IoBarrier::default());
        barrier.wait_idle();
        let done = Arc::new(AtomicBool::new(false));
        let token = barrier.enter();
        let other = barrier.enter();
        drop(other);
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                done.store(true, Ordering::SeqCst);
                drop(token);
            })
        };
        barrier.wait_idle();
        assert!(
            done.load(Ordering::SeqCst),
            "wait_idle returned while a reader was inside"
        );
        reader.join().expect("reader");
    }
}
