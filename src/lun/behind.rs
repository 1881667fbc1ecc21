//! Write-behind of large data writes: `WriteBehind` wraps the fs's LUN and queues each
//! `write_uncached` to a writer thread, so that the caller (a FUSE write) returns once
//! its bytes are copied, while the device writes the previous request.
//!
//! Why: an image file's page cache made every large write a copy into fresh page-cache
//! pages (on a VM that reports free pages to its host, each first touch is a host
//! fault: about 3 ms per MiB here), and a block device, opened with O_DIRECT, made each
//! FUSE write wait for the device. The queue writes past the page cache from a few
//! buffers that stay allocated, and overlaps the device with the next request.
//!
//! Rules (each is what a page cache gives, made explicit):
//! - Every other operation on a range that overlaps a queued write (read, write,
//!   compare-and-write, uncached read) waits until that write is done, so no caller
//!   ever sees the device without a write it was told is done, and no later write is
//!   overtaken by an earlier one.
//! - `flush` waits until the queue is empty, then flushes: what the fs commits after
//!   a flush never points at data still in the queue.
//! - A queued write that fails is not retried and not forgotten: every later `flush`
//!   and `write_uncached` fails with its error, so fsync never reports lost data as
//!   durable. The fs treats a failed flush as fatal for this mount.
//! - The writer thread writes through the inner LUN, so the lease is checked again
//!   right before each write (`GuardedLun`); a queued write is also refused at once
//!   when the inner LUN says it may not write (`may_write`).
//! - At most `QUEUE_BUFFERS` buffers of `CHUNK_BYTES` are queued; a writer that finds
//!   them all in use waits for the oldest.
//! - Dropping the wrapper writes what is queued, then stops the thread.

use super::{Caw, Lun, LunError, LunResult};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Largest piece of one queued write; larger writes are queued in pieces.
const CHUNK_BYTES: usize = 1 << 20;
/// Buffers of `CHUNK_BYTES` a queue may fill before writers wait.
const QUEUE_BUFFERS: usize = 8;
/// Alignment of offsets, lengths and buffers of queued writes (O_DIRECT on any
/// device an image file may sit on). Other writes go straight to the inner LUN.
const ALIGN: usize = 4096;

/// A buffer of `CHUNK_BYTES` at an `ALIGN`-aligned address.
struct ChunkBuf {
    storage: Vec<u8>,
    start: usize,
}

impl ChunkBuf {
    fn new() -> ChunkBuf {
        let storage = vec![0u8; CHUNK_BYTES + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
        ChunkBuf { storage, start }
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.storage[self.start..self.start + len]
    }

    fn slice(&self, len: usize) -> &[u8] {
        &self.storage[self.start..self.start + len]
    }
}

/// A queued write.
struct Queued {
    /// Its place in the queue: 1, 2, ...
    seq: u64,
    offset: u64,
    len: usize,
    buf: ChunkBuf,
}

struct State {
    /// Writes not yet started, oldest first.
    queue: VecDeque<Queued>,
    /// The range the writer thread is writing now.
    writing: Option<(u64, usize)>,
    /// Buffers not in use.
    spare: Vec<ChunkBuf>,
    /// Buffers allocated so far (in use or spare).
    buffers: usize,
    /// The sequence number of the last write queued.
    queued: u64,
    /// Every write up to this sequence number is done (written or failed).
    done: u64,
    /// The first queued write that failed.
    failed: Option<LunError>,
    /// The wrapper is dropped: the thread writes what is queued and stops.
    closing: bool,
}

impl State {
    fn overlaps(&self, offset: u64, len: usize) -> bool {
        let end = offset.saturating_add(len as u64);
        let hit = |o: u64, l: usize| o < end && offset < o.saturating_add(l as u64);
        self.writing.is_some_and(|(o, l)| hit(o, l))
            || self.queue.iter().any(|q| hit(q.offset, q.len))
    }
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the queue grows, a write finishes, or the wrapper closes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }
}

/// A LUN whose large data writes are written behind (see the module docs).
pub struct WriteBehind {
    inner: Arc<dyn Lun>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl WriteBehind {
    pub fn new(inner: Arc<dyn Lun>) -> WriteBehind {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                writing: None,
                queued: 0,
                done: 0,
                spare: Vec::new(),
                buffers: 0,
                failed: None,
                closing: false,
            }),
            changed: Condvar::new(),
        });
        WriteBehind {
            inner,
            shared,
            worker: Mutex::new(None),
        }
    }

    /// Waits until no queued write overlaps `[offset, offset + len)`.
    fn wait_for_range(&self, offset: u64, len: usize) {
        let mut state = self.shared.lock();
        while state.overlaps(offset, len) {
            state = self.shared.wait(state);
        }
    }

    /// Waits until every write queued before the call is done (not for writes queued
    /// meanwhile, which a steady stream would never stop adding); returns the error
    /// of a failed queued write.
    fn drain(&self) -> LunResult<()> {
        let mut state = self.shared.lock();
        let target = state.queued;
        while state.done < target {
            state = self.shared.wait(state);
        }
        match &state.failed {
            Some(e) => Err(duplicate(e)),
            None => Ok(()),
        }
    }

    /// Starts the writer thread unless it runs; false when it cannot be started.
    fn ensure_worker(&self) -> bool {
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if worker.is_some() {
            return true;
        }
        let shared = self.shared.clone();
        let inner = self.inner.clone();
        match std::thread::Builder::new()
            .name("atsfs-writeback".into())
            .spawn(move || write_queued(&shared, inner.as_ref()))
        {
            Ok(handle) => {
                *worker = Some(handle);
                true
            }
            Err(e) => {
                tracing::warn!("no write-behind thread ({e}); writing in line");
                false
            }
        }
    }

    /// Queues one piece of at most `CHUNK_BYTES`.
    fn queue_piece(&self, piece: &[u8], offset: u64) -> LunResult<()> {
        let mut state = self.shared.lock();
        loop {
            if let Some(e) = &state.failed {
                return Err(duplicate(e));
            }
            if let Some(mut buf) = state.spare.pop() {
                // The copy runs without the lock, so the writer thread is not held
                // up meanwhile.
                drop(state);
                buf.slice_mut(piece.len()).copy_from_slice(piece);
                state = self.shared.lock();
                if let Some(e) = &state.failed {
                    let e = duplicate(e);
                    state.spare.push(buf);
                    return Err(e);
                }
                state.queued += 1;
                let seq = state.queued;
                state.queue.push_back(Queued {
                    seq,
                    offset,
                    len: piece.len(),
                    buf,
                });
                self.shared.changed.notify_all();
                return Ok(());
            }
            if state.buffers < QUEUE_BUFFERS {
                state.buffers += 1;
                state.spare.push(ChunkBuf::new());
                continue;
            }
            state = self.shared.wait(state);
        }
    }
}

/// The writer thread: writes the queue in order until the wrapper is dropped.
fn write_queued(shared: &Shared, inner: &dyn Lun) {
    let mut state = shared.lock();
    loop {
        let Some(item) = state.queue.pop_front() else {
            if state.closing {
                return;
            }
            state = shared.wait(state);
            continue;
        };
        state.writing = Some((item.offset, item.len));
        // After a failure nothing queued later is written: it could otherwise land
        // without an earlier write it depends on.
        let skip = state.failed.is_some();
        drop(state);
        let result = if skip {
            Ok(())
        } else {
            inner.write_uncached(item.buf.slice(item.len), item.offset)
        };
        state = shared.lock();
        if let Err(e) = result {
            tracing::error!("write-behind of {} bytes failed: {e}", item.len);
            state.failed.get_or_insert(e);
        }
        state.writing = None;
        state.done = item.seq;
        state.spare.push(item.buf);
        shared.changed.notify_all();
    }
}

/// A copy of a LUN error for each caller that must see it.
fn duplicate(e: &LunError) -> LunError {
    match e {
        LunError::Io {
            device,
            op,
            offset,
            source,
        } => LunError::Io {
            device: device.clone(),
            op,
            offset: *offset,
            source: match source.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(source.kind(), source.to_string()),
            },
        },
        LunError::ReadOnly { device, op, offset } => LunError::ReadOnly {
            device: device.clone(),
            op,
            offset: *offset,
        },
        LunError::Misaligned {
            op,
            offset,
            len,
            sector,
        } => LunError::Misaligned {
            op,
            offset: *offset,
            len: *len,
            sector: *sector,
        },
        LunError::OutOfRange {
            op,
            offset,
            len,
            size,
        } => LunError::OutOfRange {
            op,
            offset: *offset,
            len: *len,
            size: *size,
        },
        LunError::Fenced(why) => LunError::Fenced(why.clone()),
        LunError::AtsTimeout {
            device,
            offset,
            waited_ms,
        } => LunError::AtsTimeout {
            device: device.clone(),
            offset: *offset,
            waited_ms: *waited_ms,
        },
        LunError::Scsi {
            device,
            op,
            offset,
            detail,
        } => LunError::Scsi {
            device: device.clone(),
            op,
            offset: *offset,
            detail: detail.clone(),
        },
        LunError::Transport {
            device,
            op,
            offset,
            detail,
        } => LunError::Transport {
            device: device.clone(),
            op,
            offset: *offset,
            detail: detail.clone(),
        },
        LunError::NoCompareAndWrite { device, detail } => LunError::NoCompareAndWrite {
            device: device.clone(),
            detail: detail.clone(),
        },
        LunError::Open { device, detail } => LunError::Open {
            device: device.clone(),
            detail: detail.clone(),
        },
    }
}

impl Lun for WriteBehind {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.wait_for_range(offset, buf.len());
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.wait_for_range(offset, buf.len());
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.wait_for_range(offset, new.len());
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.drain()?;
        self.inner.flush()
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.wait_for_range(offset, buf.len());
        self.inner.read_uncached(buf, offset)
    }
    /// Queues the write (in pieces of at most `CHUNK_BYTES`) and returns; see the
    /// module docs for when it is on the device. Unaligned writes are written in line.
    fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        let aligned = offset % ALIGN as u64 == 0 && buf.len() % ALIGN == 0;
        super::check_range("write", offset, buf.len(), self.inner.len_bytes(), None)?;
        self.inner.may_write()?;
        if !aligned || !self.ensure_worker() {
            self.wait_for_range(offset, buf.len());
            return self.inner.write_uncached(buf, offset);
        }
        for (i, piece) in buf.chunks(CHUNK_BYTES).enumerate() {
            self.queue_piece(piece, offset + (i * CHUNK_BYTES) as u64)?;
        }
        Ok(())
    }
    fn may_write(&self) -> LunResult<()> {
        if let Some(e) = &self.shared.lock().failed {
            return Err(duplicate(e));
        }
        self.inner.may_write()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn ats_kind(&self) -> super::AtsKind {
        self.inner.ats_kind()
    }
    fn reservations(&self) -> Option<&dyn super::Reservations> {
        self.inner.reservations()
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        let worker = self.worker.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = worker.take() {
            if handle.join().is_err() {
                tracing::error!("the write-behind thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::MemLun;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    /// A MemLun whose uncached writes wait while `held` is set, can be made to fail,
    /// and are logged (with flushes) in the order the device sees them.
    struct Gated {
        mem: MemLun,
        held: Mutex<bool>,
        released: Condvar,
        /// How many of the next uncached writes fail.
        fail_next: AtomicUsize,
        log: Mutex<Vec<String>>,
        in_flight: AtomicUsize,
        in_flight_max: AtomicUsize,
    }

    impl Gated {
        fn new(len: u64) -> Arc<Gated> {
            Arc::new(Gated {
                mem: MemLun::new(len, 512),
                held: Mutex::new(false),
                released: Condvar::new(),
                fail_next: AtomicUsize::new(0),
                log: Mutex::new(Vec::new()),
                in_flight: AtomicUsize::new(0),
                in_flight_max: AtomicUsize::new(0),
            })
        }
        fn hold(&self, held: bool) {
            *self.held.lock().unwrap() = held;
            self.released.notify_all();
        }
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl Lun for Gated {
        fn sector_size(&self) -> u32 {
            512
        }
        fn len_bytes(&self) -> u64 {
            self.mem.len_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
            self.log.lock().unwrap().push(format!("write {offset}"));
            self.mem.write_at(buf, offset)
        }
        fn write_uncached(&self, buf: &[u8], offset: u64) -> LunResult<()> {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.in_flight_max.fetch_max(n, Ordering::SeqCst);
            let mut held = self.held.lock().unwrap();
            while *held {
                held = self.released.wait(held).unwrap();
            }
            drop(held);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let fail = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(LunError::Io {
                    device: "gated".into(),
                    op: "write",
                    offset,
                    source: io::Error::from_raw_os_error(libc::EIO),
                });
            }
            self.log.lock().unwrap().push(format!("uncached {offset}"));
            self.mem.write_at(buf, offset)
        }
        fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
            self.mem.compare_and_write(offset, expected, new)
        }
        fn flush(&self) -> LunResult<()> {
            self.log.lock().unwrap().push("flush".into());
            Ok(())
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    /// Opens the gate when dropped, so that a failed assertion does not leave the
    /// writer thread (and the wrapper's drop) waiting forever.
    struct Opens(Arc<Gated>);

    impl Drop for Opens {
        fn drop(&mut self) {
            self.0.hold(false);
        }
    }

    fn queue_len(wb: &WriteBehind) -> usize {
        let state = wb.shared.lock();
        state.queue.len() + usize::from(state.writing.is_some())
    }

    /// Waits (bounded) until `cond` holds on the queue.
    fn wait_until(wb: &WriteBehind, cond: impl Fn(&State) -> bool) {
        for _ in 0..2000 {
            if cond(&wb.shared.lock()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the queue never reached the expected state");
    }

    #[test]
    fn a_write_returns_before_the_device_has_it_and_an_overlapping_read_waits_for_it() {
        let gated = Gated::new(8 * MIB as u64);
        let wb = Arc::new(WriteBehind::new(gated.clone()));
        gated.hold(true);
        let _opens = Opens(gated.clone());
        wb.write_uncached(&vec![7u8; MIB], MIB as u64).unwrap();
        assert_eq!(queue_len(&wb), 1, "the write is queued, not done");

        // A read elsewhere does not wait.
        let mut other = vec![1u8; 4096];
        wb.read_at(&mut other, 4 * MIB as u64).unwrap();
        assert_eq!(other, vec![0u8; 4096]);

        // A read of the last block of the range waits, and sees the new bytes.
        let reader = {
            let wb = wb.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                wb.read_uncached(&mut buf, 2 * MIB as u64 - 4096).unwrap();
                buf
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!reader.is_finished(), "the read went past a queued write");
        gated.hold(false);
        assert_eq!(reader.join().unwrap(), vec![7u8; 4096]);
    }

    #[test]
    fn flush_waits_for_the_writes_queued_before_it() {
        let gated = Gated::new(16 * MIB as u64);
        let wb = WriteBehind::new(gated.clone());
        for i in 0..4u64 {
            wb.write_uncached(&vec![i as u8; 2 * MIB], i * 2 * MIB as u64)
                .unwrap();
        }
        wb.flush().unwrap();
        let log = gated.log();
        let expected: Vec<String> = (0..8u64)
            .map(|i| format!("uncached {}", i * MIB as u64))
            .chain(["flush".to_string()])
            .collect();
        assert_eq!(log, expected, "pieces in order, all before the flush");
    }

    #[test]
    fn a_write_over_a_queued_one_lands_after_it() {
        let gated = Gated::new(8 * MIB as u64);
        let wb = WriteBehind::new(gated.clone());
        gated.hold(true);
        let _opens = Opens(gated.clone());
        wb.write_uncached(&vec![1u8; MIB], 0).unwrap();
        wb.write_uncached(&vec![2u8; MIB], 0).unwrap();
        let inline = std::thread::scope(|s| {
            let t = s.spawn(|| wb.write_at(&[3u8; 4096], 8192));
            std::thread::sleep(Duration::from_millis(50));
            let waited = !t.is_finished();
            gated.hold(false);
            t.join().unwrap().unwrap();
            waited
        });
        assert!(inline, "a small write went past queued writes of its range");
        let mut buf = vec![0u8; MIB];
        wb.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..8192], &[2u8; 8192][..]);
        assert_eq!(&buf[8192..12288], &[3u8; 4096][..]);
        assert_eq!(&buf[12288..], &vec![2u8; MIB - 12288][..]);
    }

    #[test]
    fn a_failed_queued_write_fails_every_later_flush_and_write() {
        let gated = Gated::new(8 * MIB as u64);
        let wb = WriteBehind::new(gated.clone());
        gated.hold(true);
        let _opens = Opens(gated.clone());
        // Only the first write fails at the device; the one behind it must not land.
        gated.fail_next.store(1, Ordering::SeqCst);
        wb.write_uncached(&vec![1u8; MIB], 0).unwrap();
        wb.write_uncached(&vec![2u8; MIB], MIB as u64).unwrap();
        gated.hold(false);
        wait_until(&wb, |s| s.failed.is_some() && s.done == 2);
        let err = wb.flush().unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
        assert!(wb.flush().is_err(), "the error is sticky");
        assert!(wb.write_uncached(&vec![3u8; MIB], 0).is_err());
        assert!(wb.may_write().is_err());
        assert!(
            !gated.log().iter().any(|l| l.starts_with("uncached")),
            "a write queued after the failed one reached the device: {:?}",
            gated.log()
        );
        assert!(!gated.log().contains(&"flush".to_string()));
    }

    #[test]
    fn the_queue_holds_at_most_its_buffers_and_drop_writes_it_out() {
        let gated = Gated::new(64 * MIB as u64);
        let wb = Arc::new(WriteBehind::new(gated.clone()));
        gated.hold(true);
        let _opens = Opens(gated.clone());
        let writer = {
            let wb = wb.clone();
            std::thread::spawn(move || {
                for i in 0..(QUEUE_BUFFERS as u64 + 4) {
                    wb.write_uncached(&vec![i as u8 + 1; MIB], i * MIB as u64)
                        .unwrap();
                }
            })
        };
        wait_until(&wb, |s| {
            s.queue.len() + usize::from(s.writing.is_some()) >= QUEUE_BUFFERS
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !writer.is_finished(),
            "the writer did not wait for a buffer"
        );
        assert_eq!(queue_len(&wb), QUEUE_BUFFERS);
        gated.hold(false);
        writer.join().unwrap();
        assert!(wb.shared.lock().buffers <= QUEUE_BUFFERS);
        assert_eq!(gated.in_flight_max.load(Ordering::SeqCst), 1);
        drop(Arc::into_inner(wb).expect("one owner"));
        for i in 0..(QUEUE_BUFFERS as u64 + 4) {
            let mut buf = vec![0u8; 4096];
            gated.mem.read_at(&mut buf, i * MIB as u64 + 8192).unwrap();
            assert_eq!(buf, vec![i as u8 + 1; 4096], "piece {i} lost at drop");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Queue { block: u64, blocks: u64, byte: u8 },
        Write { block: u64, byte: u8 },
        Read { block: u64, blocks: u64 },
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..64u64, 1..80u64, any::<u8>())
                .prop_map(|(block, blocks, byte)| Op::Queue { block, blocks, byte }),
            2 => (0..140u64, any::<u8>()).prop_map(|(block, byte)| Op::Write { block, byte }),
            3 => (0..140u64, 1..8u64).prop_map(|(block, blocks)| Op::Read { block, blocks }),
            1 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever mix of queued writes, in-line writes, reads and flushes: every
        /// read returns what a LUN without a queue would, and after a flush the
        /// device itself holds it.
        #[test]
        fn reads_always_see_the_writes_before_them(ops in proptest::collection::vec(op(), 1..60)) {
            const BLOCK: usize = 4096;
            let len = 160 * BLOCK;
            let gated = Gated::new(len as u64);
            let wb = WriteBehind::new(gated.clone());
            let mut model = vec![0u8; len];
            for op in ops {
                match op {
                    Op::Queue { block, blocks, byte } => {
                        let (at, n) = (block as usize * BLOCK, blocks as usize * BLOCK);
                        wb.write_uncached(&vec![byte; n], at as u64).unwrap();
                        model[at..at + n].fill(byte);
                    }
                    Op::Write { block, byte } => {
                        let at = block as usize * BLOCK;
                        wb.write_at(&[byte; BLOCK], at as u64).unwrap();
                        model[at..at + BLOCK].fill(byte);
                    }
                    Op::Read { block, blocks } => {
                        let (at, n) = (block as usize * BLOCK, blocks as usize * BLOCK);
                        let n = n.min(len - at);
                        let mut buf = vec![0u8; n];
                        wb.read_at(&mut buf, at as u64).unwrap();
                        prop_assert!(buf == model[at..at + n], "read at block {block}");
                    }
                    Op::Flush => {
                        wb.flush().unwrap();
                        prop_assert!(gated.mem.snapshot() == model);
                    }
                }
            }
        }
    }
}
