//! The per-slot redo journal.
//!
//! A transaction is a list of home writes (byte offset + image, each at most one
//! block, sector aligned). On disk it is one contiguous run of journal blocks:
//! a descriptor (seq, targets, per-image CRCs), one block per image, and a commit
//! record whose `data_crc` covers the descriptor and every image. The run is written
//! with one write and made durable with one flush; a torn run fails its CRCs and is
//! never replayed.
//!
//! Invariants:
//! - Sequence numbers only grow; replay follows them from the header's tail.
//! - Each life of a journal (one `open_and_replay`: a mount, a recovery, a repair)
//!   writes a fresh random nonce into the header before it writes any transaction,
//!   and stamps every descriptor and commit record with it. Replay accepts only
//!   transactions carrying the header's nonce, so a run left over from an earlier
//!   life (one that landed while an earlier run of its group did not) is never taken
//!   for the new life's transaction of the same sequence number and position.
//! - A transaction never wraps: if it does not fit before the end, it starts at
//!   block 1. Replay, on finding no transaction of the expected seq at its position,
//!   looks at block 1 for it.
//! - The header's tail moves forward only after every transaction before it is home
//!   and flushed. The writer never overwrites the block at the tail with a new
//!   transaction before moving the tail past it (`make_room`).
//!
//! - Every home write lies inside the allocation groups, off the group headers' lock
//!   sectors (`Geometry::check_journal_target`): the writer refuses other targets,
//!   and replay refuses a committed transaction that names one, before writing any
//!   of its images.
//!
//! Caller's duties: write every committed image home (the caller's checkpoint) and
//! flush before calling `mark_all_home`; never write a metadata image home before
//! the transaction holding it is committed.

use crate::format::{
    encode_padded, BlockNo, FormatError, Geometry, JournalCommit, JournalDescriptor, JournalEntry,
    JournalHeader, OnDisk, BLOCK_SIZE, BLOCK_SIZE_U64, JOURNAL_DESC_ENTRIES,
};
use crate::lun::{Lun, LunError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error(transparent)]
    Lun(#[from] LunError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("transaction of {0} blocks is larger than the journal allows")]
    TooLarge(usize),
    #[error("no random nonce for the journal of slot {slot}: {reason}")]
    Nonce { slot: u32, reason: String },
    #[error(
        "journal of slot {slot}, transaction seq {seq}: a home write of {len} bytes at \
         byte {target} lies {reason}, where atsfs never journals; refusing it"
    )]
    BadTarget {
        slot: u32,
        seq: u64,
        target: u64,
        len: u64,
        reason: String,
    },
}

/// One home write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Byte offset on the volume.
    pub target: u64,
    /// The image: at most one block, a multiple of 512 bytes.
    pub image: Vec<u8>,
}

/// What replay found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub transactions: u64,
    pub records: u64,
}

/// The writer side of one slot's journal.
pub struct Journal {
    slot: u32,
    geo: Geometry,
    start: BlockNo,
    blocks: u64,
    volume_uuid: [u8; 16],
    /// This life's nonce: in the header and in every transaction written.
    nonce: u64,
    /// Where the next transaction goes (relative block, >= 1).
    head: u64,
    /// Sequence number of the next transaction.
    next_seq: u64,
    /// The tail the header records on disk.
    tail: u64,
    /// The sequence number the header records: the live region is empty iff it
    /// equals `next_seq` (tail == head alone cannot tell empty from full).
    tail_seq: u64,
}

impl Journal {
    /// Largest number of records one transaction may hold.
    pub fn records_max(&self) -> usize {
        JOURNAL_DESC_ENTRIES.min(self.blocks as usize - 3)
    }

    /// Opens a slot's journal, replaying whatever committed transactions it holds, and
    /// leaves it empty (tail = head) on disk, under a fresh nonce: a new life.
    pub fn open_and_replay(
        lun: &dyn Lun,
        geo: &Geometry,
        slot: u32,
        volume_uuid: [u8; 16],
    ) -> Result<(Journal, ReplayReport), JournalError> {
        let mut journal = Journal::open_read_only(lun, geo, slot, volume_uuid)?;
        let old_nonce = journal.nonce;
        let report = journal.replay(lun)?;
        // The new life begins when this header is durable: from here on, replay
        // accepts only what this life writes.
        journal.nonce = fresh_nonce(slot, old_nonce)?;
        journal.mark_all_home(lun)?;
        Ok((journal, report))
    }

    /// Opens a slot's journal as it is, writing nothing (`open_and_replay` starts
    /// here): for a read-only host, whose
    /// journal must stay as the slot's last life left it (empty, checked by the
    /// caller) and which never commits. A commit through it would write under the
    /// old life's nonce; `Meta` refuses to commit on a read-only host.
    pub fn open_read_only(
        lun: &dyn Lun,
        geo: &Geometry,
        slot: u32,
        volume_uuid: [u8; 16],
    ) -> Result<Journal, JournalError> {
        let start = geo.journal_of(slot);
        let header = read_header(lun, start)?;
        Ok(Journal {
            slot,
            geo: *geo,
            start,
            blocks: geo.journal_blocks,
            volume_uuid,
            nonce: header.nonce,
            head: header.tail_block,
            next_seq: header.tail_seq,
            tail: header.tail_block,
            tail_seq: header.tail_seq,
        })
    }

    /// Replays committed transactions from the tail, in order. Idempotent.
    fn replay(&mut self, lun: &dyn Lun) -> Result<ReplayReport, JournalError> {
        let mut report = ReplayReport::default();
        let mut chain = Chain {
            slot: self.slot,
            geo: self.geo,
            start: self.start,
            blocks: self.blocks,
            volume_uuid: self.volume_uuid,
            nonce: self.nonce,
            head: self.head,
            next_seq: self.next_seq,
            steps_left: self.blocks,
        };
        while let Some(records) = chain.next(lun)? {
            for record in &records {
                lun.write_at(&record.image, record.target)?;
            }
            report.transactions += 1;
            report.records += records.len() as u64;
        }
        self.head = chain.head;
        self.next_seq = chain.next_seq;
        Ok(report)
    }

    /// Writes one transaction to the journal and makes it durable. When this returns
    /// Ok, the transaction is committed: replay will redo it after any crash.
    pub fn commit(
        &mut self,
        lun: &dyn Lun,
        records: &[Record],
        now_unix_ms: u64,
    ) -> Result<u64, JournalError> {
        check_targets(&self.geo, self.slot, self.next_seq, records)?;
        let seq = self.write_tx(lun, records, now_unix_ms, true)?;
        lun.flush()?;
        // This is the commit point: the transaction is durable in the journal.
        Ok(seq)
    }

    /// `commit` without the check of its targets: writes what a damaged or foreign
    /// journal could hold, for tests of the readers' checks.
    #[cfg(test)]
    pub(crate) fn commit_unchecked(
        &mut self,
        lun: &dyn Lun,
        records: &[Record],
    ) -> Result<u64, JournalError> {
        let seq = self.write_tx(lun, records, 0, true)?;
        lun.flush()?;
        Ok(seq)
    }

    /// Most journal blocks a group of transactions (`commit_group`) may span, so
    /// that the group can never lap itself: the group's runs plus the blocks skipped
    /// at one wrap (less than one run) fit in the journal's blocks after the header.
    pub fn group_span_max(&self) -> u64 {
        self.blocks
            .saturating_sub(1)
            .saturating_sub(self.records_max() as u64 + 2)
    }

    /// Writes several transactions, in order, and makes them durable with one flush
    /// (group commit). Replay redoes a prefix of them after a crash before the flush
    /// returns, and all of them after. Returns the last one's sequence number.
    pub fn commit_group(
        &mut self,
        lun: &dyn Lun,
        txs: &[Vec<Record>],
        now_unix_ms: u64,
    ) -> Result<u64, JournalError> {
        if let [one] = txs {
            return self.commit(lun, one, now_unix_ms);
        }
        let mut spans = Vec::with_capacity(txs.len());
        for (seq, records) in (self.next_seq..).zip(txs) {
            check_targets(&self.geo, self.slot, seq, records)?;
            let count = records.len();
            if count == 0 || count > self.records_max() {
                return Err(JournalError::TooLarge(count));
            }
            spans.push(count as u64 + 2);
        }
        let total: u64 = spans.iter().sum();
        if total > self.group_span_max() {
            return Err(JournalError::TooLarge(total as usize));
        }
        // Move the tail first if the group would land on transactions replay may
        // still need; within the group nothing may be marked home (its images are
        // not home yet), and the size bound keeps it from lapping itself.
        if self.group_overlaps_live(&spans) {
            self.mark_all_home(lun)?;
        }
        let mut last = 0;
        for records in txs {
            last = self.write_tx(lun, records, now_unix_ms, false)?;
        }
        lun.flush()?;
        Ok(last)
    }

    /// True when placing runs of `spans` blocks from the head would overwrite the
    /// live region (tail to head) as it stands.
    fn group_overlaps_live(&self, spans: &[u64]) -> bool {
        if !self.has_unmarked() {
            return false;
        }
        let mut pos = self.head;
        for &span in spans {
            let at = self.run_start(pos, span);
            if (at..at + span).any(|b| self.in_live(b)) {
                return true;
            }
            pos = at + span;
        }
        false
    }

    /// Where a run of `span` blocks goes when the head is at `pos`: there, or at
    /// block 1 when it would not fit before the end (a run never wraps).
    fn run_start(&self, pos: u64, span: u64) -> u64 {
        if pos + span > self.blocks {
            1
        } else {
            pos
        }
    }

    /// True when block `b` lies in the live region (tail to head); when tail and head
    /// meet, the whole journal counts (callers ask only when it is not empty).
    fn in_live(&self, b: u64) -> bool {
        let (tail, head) = (self.tail, self.head);
        if tail == head {
            true
        } else if tail < head {
            b >= tail && b < head
        } else {
            b >= tail || b < head
        }
    }

    /// Writes one transaction's run at the head (no flush) and advances the head.
    /// With `may_mark` false, a run that would need the tail moved is an error.
    fn write_tx(
        &mut self,
        lun: &dyn Lun,
        records: &[Record],
        now_unix_ms: u64,
        may_mark: bool,
    ) -> Result<u64, JournalError> {
        let count = records.len();
        if count == 0 || count > self.records_max() {
            return Err(JournalError::TooLarge(count));
        }
        let span = count as u64 + 2;
        self.make_room(lun, span, may_mark)?;
        let at = self.head;
        let desc_block = self.start + at;
        let seq = self.next_seq;
        let mut run = vec![0u8; (count + 2) * BLOCK_SIZE];
        let mut desc: JournalDescriptor = bytemuck::Zeroable::zeroed();
        desc.magic = JournalDescriptor::MAGIC;
        desc.blockno = desc_block;
        desc.seq = seq;
        desc.count = count as u32;
        desc.volume_uuid = self.volume_uuid;
        desc.nonce = self.nonce;
        for (i, record) in records.iter().enumerate() {
            debug_assert!(!record.image.is_empty() && record.image.len() <= BLOCK_SIZE);
            desc.entries[i] = JournalEntry {
                target: record.target,
                len: record.image.len() as u32,
                crc: crc32fast::hash(&record.image),
            };
            let slot = (i + 1) * BLOCK_SIZE;
            run[slot..slot + record.image.len()].copy_from_slice(&record.image);
        }
        desc.seal();
        run[..BLOCK_SIZE].copy_from_slice(bytemuck::bytes_of(&desc));
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&run[..BLOCK_SIZE]);
        for record in records {
            hasher.update(&record.image);
        }
        let mut commit: JournalCommit = bytemuck::Zeroable::zeroed();
        commit.magic = JournalCommit::MAGIC;
        commit.blockno = desc_block + 1 + count as u64;
        commit.seq = seq;
        commit.count = count as u32;
        commit.data_crc = hasher.finalize();
        commit.volume_uuid = self.volume_uuid;
        commit.commit_unix_ms = now_unix_ms;
        commit.nonce = self.nonce;
        commit.seal();
        let tail = (count + 1) * BLOCK_SIZE;
        run[tail..tail + std::mem::size_of::<JournalCommit>()]
            .copy_from_slice(bytemuck::bytes_of(&commit));
        lun.write_at(&run, desc_block * BLOCK_SIZE_U64)?;
        self.head = at + span;
        if self.head >= self.blocks {
            self.head = 1;
        }
        self.next_seq += 1;
        Ok(seq)
    }

    /// Makes sure `span` blocks can be written at the head without overwriting a
    /// transaction replay might still need: if the run would land in the live region
    /// (tail to head), the tail is moved first. Callers checkpoint synchronously after
    /// each commit, so every committed image is already home by then.
    fn make_room(&mut self, lun: &dyn Lun, span: u64, may_mark: bool) -> Result<(), JournalError> {
        let at = self.run_start(self.head, span);
        if self.has_unmarked() && (at..at + span).any(|b| self.in_live(b)) {
            if !may_mark {
                return Err(JournalError::TooLarge(span as usize));
            }
            self.mark_all_home(lun)?;
        }
        self.head = at;
        Ok(())
    }

    /// Records on disk that every committed transaction is home: flushes the home
    /// writes, then moves the header's tail to the head and flushes that.
    pub fn mark_all_home(&mut self, lun: &dyn Lun) -> Result<(), JournalError> {
        lun.flush()?;
        let mut header = JournalHeader {
            magic: JournalHeader::MAGIC,
            crc: 0,
            blockno: self.start,
            slot: self.slot,
            pad: 0,
            tail_seq: self.next_seq,
            tail_block: self.head,
            journal_blocks: self.blocks,
            volume_uuid: self.volume_uuid,
            nonce: self.nonce,
            reserved: [0; 56],
        };
        header.seal();
        lun.write_at(
            &encode_padded(&header, BLOCK_SIZE),
            self.start * BLOCK_SIZE_U64,
        )?;
        lun.flush()?;
        self.tail = self.head;
        self.tail_seq = self.next_seq;
        Ok(())
    }

    /// The first sequence number replay would still apply after a crash: every
    /// transaction before it is home and can never be replayed again.
    pub fn tail_seq(&self) -> u64 {
        self.tail_seq
    }

    /// True when the header's tail is behind the head (committed transactions that a
    /// crash would replay).
    pub fn has_unmarked(&self) -> bool {
        self.tail_seq != self.next_seq
    }
}

/// The chain of committed transactions of one slot's journal, from the header's tail:
/// the walk replay makes, as a cursor that reads and never writes.
struct Chain {
    slot: u32,
    geo: Geometry,
    start: BlockNo,
    blocks: u64,
    volume_uuid: [u8; 16],
    /// The header's nonce: only the life that wrote the header has transactions here.
    nonce: u64,
    /// Where the next transaction is expected (relative block).
    head: u64,
    /// The sequence number it must carry.
    next_seq: u64,
    /// Each transaction takes at least 3 blocks, so `blocks` steps bound the chain.
    steps_left: u64,
}

impl Chain {
    /// The next committed transaction of the chain, if there is one. A transaction
    /// that did not fit before the end of the journal starts at block 1.
    fn next(&mut self, lun: &dyn Lun) -> Result<Option<Vec<Record>>, JournalError> {
        if self.steps_left == 0 {
            return Ok(None);
        }
        self.steps_left -= 1;
        let found = match self.read_transaction(lun, self.head)? {
            Some(records) => Some((self.head, records)),
            None if self.head != 1 => self.read_transaction(lun, 1)?.map(|r| (1, r)),
            None => None,
        };
        let Some((at, records)) = found else {
            return Ok(None);
        };
        self.head = at + records.len() as u64 + 2;
        // The header's seq comes from disk: no overflow panic on a damaged one.
        self.next_seq = self.next_seq.wrapping_add(1);
        if self.head >= self.blocks {
            self.head = 1;
        }
        Ok(Some(records))
    }

    /// Reads the transaction of seq `next_seq` at relative block `at`, if a whole,
    /// valid one is there.
    fn read_transaction(
        &self,
        lun: &dyn Lun,
        at: u64,
    ) -> Result<Option<Vec<Record>>, JournalError> {
        if at.saturating_add(3) > self.blocks {
            return Ok(None);
        }
        let mut block = vec![0u8; BLOCK_SIZE];
        let desc_block = self.start + at;
        lun.read_at(&mut block, desc_block * BLOCK_SIZE_U64)?;
        let Ok(desc) = JournalDescriptor::decode(&block, desc_block) else {
            return Ok(None);
        };
        let count = desc.count as usize;
        if desc.seq != self.next_seq
            || desc.volume_uuid != self.volume_uuid
            || desc.nonce != self.nonce
            || at + count as u64 + 2 > self.blocks
        {
            return Ok(None);
        }
        let mut run = vec![0u8; (count + 1) * BLOCK_SIZE];
        lun.read_at(&mut run, (desc_block + 1) * BLOCK_SIZE_U64)?;
        let commit_block = desc_block + 1 + count as u64;
        let Ok(commit) = JournalCommit::decode(&run[count * BLOCK_SIZE..], commit_block) else {
            return Ok(None);
        };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&block);
        let mut records = Vec::with_capacity(count);
        for (i, entry) in desc.entries[..count].iter().enumerate() {
            let image = &run[i * BLOCK_SIZE..i * BLOCK_SIZE + entry.len as usize];
            if crc32fast::hash(image) != entry.crc {
                return Ok(None);
            }
            hasher.update(image);
            records.push(Record {
                target: entry.target,
                image: image.to_vec(),
            });
        }
        let valid = commit.seq == desc.seq
            && commit.count == desc.count
            && commit.nonce == desc.nonce
            && commit.data_crc == hasher.finalize();
        if !valid {
            return Ok(None);
        }
        // A committed transaction: it must write nowhere atsfs does not journal.
        check_targets(&self.geo, self.slot, desc.seq, &records)?;
        Ok(Some(records))
    }
}

/// The committed transactions of a slot's journal that replay would write home, in
/// order, read without writing anything (fsck looks at the volume as it will be after
/// replay). Fails when the journal header is unreadable or damaged.
pub fn pending_transactions(
    lun: &dyn Lun,
    geo: &Geometry,
    slot: u32,
    volume_uuid: [u8; 16],
) -> Result<Vec<Vec<Record>>, JournalError> {
    let start = geo.journal_of(slot);
    let header = read_header(lun, start)?;
    let mut chain = Chain {
        slot,
        geo: *geo,
        start,
        blocks: geo.journal_blocks,
        volume_uuid,
        nonce: header.nonce,
        head: header.tail_block,
        next_seq: header.tail_seq,
        steps_left: geo.journal_blocks,
    };
    let mut out = Vec::new();
    while let Some(records) = chain.next(lun)? {
        out.push(records);
    }
    Ok(out)
}

/// Fails unless every record of transaction `seq` of slot `slot`'s journal writes
/// where atsfs journals (`Geometry::check_journal_target`).
fn check_targets(
    geo: &Geometry,
    slot: u32,
    seq: u64,
    records: &[Record],
) -> Result<(), JournalError> {
    for record in records {
        let len = record.image.len() as u64;
        if let Err(reason) = geo.check_journal_target(record.target, len) {
            return Err(JournalError::BadTarget {
                slot,
                seq,
                target: record.target,
                len,
                reason,
            });
        }
    }
    Ok(())
}

/// A nonce for a new life of slot `slot`'s journal: random, never 0 (the nonce of a
/// journal no life has stamped) and never the previous life's `old`. 64 random bits
/// make a repeat of any earlier life's nonce as unlikely as a CRC-64 collision.
fn fresh_nonce(slot: u32, old: u64) -> Result<u64, JournalError> {
    use rand::RngCore;
    const TRIES_MAX: usize = 8;
    let mut bytes = [0u8; 8];
    for _ in 0..TRIES_MAX {
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| JournalError::Nonce {
                slot,
                reason: e.to_string(),
            })?;
        let nonce = u64::from_le_bytes(bytes);
        if nonce != 0 && nonce != old {
            return Ok(nonce);
        }
    }
    Err(JournalError::Nonce {
        slot,
        reason: format!("{TRIES_MAX} draws gave 0 or the old nonce"),
    })
}

/// Reads and validates a journal header.
pub fn read_header(lun: &dyn Lun, start: BlockNo) -> Result<JournalHeader, JournalError> {
    let mut block = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut block, start * BLOCK_SIZE_U64)?;
    Ok(JournalHeader::decode(&block, start)?)
}

#[cfg(test)]
mod tests;
