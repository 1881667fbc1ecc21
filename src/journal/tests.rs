use super::*;
use crate::format::{Geometry, MkfsParams};
use crate::lun::MemLun;
use proptest::prelude::*;

const UUID: [u8; 16] = [7; 16];

fn setup(journal_blocks: u64) -> (MemLun, Geometry) {
    let params = MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: 512,
        max_hosts: 2,
        journal_blocks: Some(journal_blocks),
        disk_paxos: false,
    };
    let geo = Geometry::plan(&params).expect("plan");
    let lun = MemLun::new(params.total_bytes, 512);
    for slot in 0..2 {
        let mut header = JournalHeader {
            magic: JournalHeader::MAGIC,
            crc: 0,
            blockno: geo.journal_of(slot),
            slot,
            pad: 0,
            tail_seq: 1,
            tail_block: 1,
            journal_blocks: geo.journal_blocks,
            volume_uuid: UUID,
            nonce: 0,
            reserved: [0; 56],
        };
        header.seal();
        lun.write_at(
            &encode_padded(&header, BLOCK_SIZE),
            geo.journal_of(slot) * BLOCK_SIZE_U64,
        )
        .expect("header");
    }
    (lun, geo)
}

fn target(geo: &Geometry, n: u64) -> u64 {
    (geo.ag_start + 10 + n) * BLOCK_SIZE_U64
}

fn record(geo: &Geometry, n: u64, fill: u8) -> Record {
    Record {
        target: target(geo, n),
        image: vec![fill; BLOCK_SIZE],
    }
}

fn read_block(lun: &MemLun, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    lun.read_at(&mut buf, offset).expect("read");
    buf
}

/// The volume's bytes with slot 0's journal header block cut out.
fn without_header(geo: &Geometry, mut image: Vec<u8>) -> Vec<u8> {
    let at = (geo.journal_of(0) * BLOCK_SIZE_U64) as usize;
    image.drain(at..at + BLOCK_SIZE);
    image
}

#[test]
fn committed_transactions_are_replayed_after_a_crash() {
    let (lun, geo) = setup(256);
    let (mut journal, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    assert_eq!(report.transactions, 0);
    journal
        .commit(&lun, &[record(&geo, 0, 1), record(&geo, 1, 2)], 0)
        .expect("commit");
    journal
        .commit(&lun, &[record(&geo, 1, 3)], 0)
        .expect("commit");
    // Crash: nothing was written home.
    assert_eq!(read_block(&lun, target(&geo, 0)), vec![0; BLOCK_SIZE]);
    let (_, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    assert_eq!(
        report,
        ReplayReport {
            transactions: 2,
            records: 3
        }
    );
    assert_eq!(read_block(&lun, target(&geo, 0)), vec![1; BLOCK_SIZE]);
    assert_eq!(read_block(&lun, target(&geo, 1)), vec![3; BLOCK_SIZE]);
    // A second open finds the journal empty.
    let (_, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("reopen");
    assert_eq!(report.transactions, 0);
}

#[test]
fn pending_transactions_lists_what_replay_writes_without_writing() {
    let (lun, geo) = setup(256);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    let first = vec![record(&geo, 0, 1), record(&geo, 1, 2)];
    let second = vec![record(&geo, 1, 3)];
    journal.commit(&lun, &first, 0).expect("commit");
    journal.commit(&lun, &second, 0).expect("commit");
    // Fill the journal past its end so the chain wraps to block 1.
    let mut expected = vec![first, second];
    for i in 0..100u8 {
        let tx = vec![record(&geo, u64::from(i % 5), i)];
        journal.commit(&lun, &tx, 0).expect("commit");
        expected.push(tx);
    }
    let before = lun.snapshot();
    let pending = pending_transactions(&lun, &geo, 0, UUID).expect("pending");
    assert_eq!(lun.snapshot(), before, "listing pending transactions wrote");
    // The live region was moved forward when the journal wrapped: only the
    // transactions after the last mark are pending, and they end the list we made.
    assert!(!pending.is_empty() && pending.len() < expected.len());
    assert_eq!(pending[..], expected[expected.len() - pending.len()..]);
    // A foreign volume's transactions are not pending; another slot has none.
    assert!(pending_transactions(&lun, &geo, 0, [9; 16])
        .expect("foreign")
        .is_empty());
    assert!(pending_transactions(&lun, &geo, 1, UUID)
        .expect("slot 1")
        .is_empty());
    // Replay writes exactly what was listed, and leaves nothing pending.
    let (_, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    assert_eq!(report.transactions, pending.len() as u64);
    assert!(pending_transactions(&lun, &geo, 0, UUID)
        .expect("after replay")
        .is_empty());
}

#[test]
fn a_torn_transaction_is_not_replayed() {
    let (lun, geo) = setup(256);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    journal
        .commit(&lun, &[record(&geo, 0, 1)], 0)
        .expect("commit");
    journal
        .commit(&lun, &[record(&geo, 0, 2), record(&geo, 1, 2)], 0)
        .expect("commit");
    // Tear the second transaction: its second image never landed.
    let start = geo.journal_of(0);
    lun.write_at(&vec![0u8; BLOCK_SIZE], (start + 3 + 2) * BLOCK_SIZE_U64)
        .expect("tear");
    let (_, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    assert_eq!(report.transactions, 1);
    assert_eq!(read_block(&lun, target(&geo, 0)), vec![1; BLOCK_SIZE]);
    assert_eq!(read_block(&lun, target(&geo, 1)), vec![0; BLOCK_SIZE]);
}

#[test]
fn journals_of_other_slots_are_separate() {
    let (lun, geo) = setup(256);
    let (mut j0, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    j0.commit(&lun, &[record(&geo, 0, 9)], 0).expect("commit");
    let (_, report) = Journal::open_and_replay(&lun, &geo, 1, UUID).expect("slot 1");
    assert_eq!(report.transactions, 0);
}

#[test]
fn a_foreign_volume_transaction_is_not_replayed() {
    let (lun, geo) = setup(256);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, [9; 16]).expect("open");
    journal
        .commit(&lun, &[record(&geo, 0, 5)], 0)
        .expect("commit");
    let (_, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    assert_eq!(report.transactions, 0);
}

#[test]
fn oversized_transactions_are_refused() {
    let (lun, geo) = setup(256);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    let records: Vec<Record> = (0..journal.records_max() as u64 + 1)
        .map(|n| record(&geo, n, 1))
        .collect();
    assert!(matches!(
        journal.commit(&lun, &records, 0),
        Err(JournalError::TooLarge(_))
    ));
    assert!(matches!(
        journal.commit(&lun, &[], 0),
        Err(JournalError::TooLarge(0))
    ));
}

/// The model: after each commit the caller writes the images home, as the fs does,
/// except that it may crash before writing the last transaction home. Replay must
/// leave every target holding the last committed image.
fn run_model(journal_blocks: u64, txs: &[Vec<(u64, u8)>], last_home: bool) {
    let home_until = if last_home { txs.len() } else { txs.len() - 1 };
    let (lun, geo) = setup(journal_blocks);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    let mut expected = std::collections::BTreeMap::new();
    for (i, tx) in txs.iter().enumerate() {
        let records: Vec<Record> = tx.iter().map(|&(n, fill)| record(&geo, n, fill)).collect();
        journal.commit(&lun, &records, 0).expect("commit");
        if i < home_until {
            for r in &records {
                lun.write_at(&r.image, r.target).expect("home");
            }
        }
        for &(n, fill) in tx {
            expected.insert(n, fill);
        }
    }
    let (_, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    for (&n, &fill) in &expected {
        assert_eq!(read_block(&lun, target(&geo, n))[0], fill, "block {n}");
    }
    // Replay is idempotent: a second run changes nothing but the header's nonce.
    let before = without_header(&geo, lun.snapshot());
    Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay again");
    assert_eq!(before, without_header(&geo, lun.snapshot()));
}

#[test]
fn wrapping_keeps_the_newest_images() {
    let txs: Vec<Vec<(u64, u8)>> = (0..200u64)
        .map(|i| {
            (0..(i % 7 + 1))
                .map(|k| ((i + k) % 13, (i % 250) as u8 + 1))
                .collect()
        })
        .collect();
    run_model(256, &txs, false);
    run_model(256, &txs, true);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn replay_matches_the_model(
        txs in prop::collection::vec(prop::collection::vec((0u64..20, 1u8..255), 1..40), 1..60),
        last_home in any::<bool>(),
    ) {
        run_model(256, &txs, last_home);
    }
}

/// Commits groups of transactions (`commit_group`), writing each group home except
/// perhaps the last; replay must leave every target holding the last image.
fn run_group_model(journal_blocks: u64, groups: &[Vec<Vec<(u64, u8)>>], last_home: bool) {
    let (lun, geo) = setup(journal_blocks);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    assert_eq!(journal.group_span_max(), 769);
    let mut expected = std::collections::BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let txs: Vec<Vec<Record>> = group
            .iter()
            .map(|tx| tx.iter().map(|&(n, fill)| record(&geo, n, fill)).collect())
            .collect();
        journal.commit_group(&lun, &txs, 0).expect("commit group");
        if last_home || g + 1 < groups.len() {
            for r in txs.iter().flatten() {
                lun.write_at(&r.image, r.target).expect("home");
            }
        }
        for &(n, fill) in group.iter().flatten() {
            expected.insert(n, fill);
        }
    }
    Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    for (&n, &fill) in &expected {
        assert_eq!(read_block(&lun, target(&geo, n))[0], fill, "block {n}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn group_replay_matches_the_model(
        groups in prop::collection::vec(
            // At most 12 x (60 + 2) = 744 blocks: within the bound of a 1024-block journal.
            prop::collection::vec(prop::collection::vec((0u64..30, 1u8..255), 1..61), 1..13),
            1..40,
        ),
        last_home in any::<bool>(),
    ) {
        run_group_model(1024, &groups, last_home);
    }
}

#[test]
fn a_group_larger_than_its_bound_is_refused_and_one_transaction_always_fits() {
    let (lun, geo) = setup(256);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    assert!(journal.group_span_max() < 6);
    let tx = vec![record(&geo, 0, 1)];
    assert!(matches!(
        journal.commit_group(&lun, &[tx.clone(), tx.clone()], 0),
        Err(JournalError::TooLarge(_))
    ));
    journal
        .commit_group(&lun, &[tx], 0)
        .expect("one transaction");
}

#[test]
fn a_group_cut_at_any_write_replays_a_prefix_of_its_transactions() {
    use crate::lun::{crash_image, FaultConfig, FaultLun};
    let (mem, geo) = setup(1024);
    let mem = std::sync::Arc::new(mem);
    let lun = FaultLun::new(mem.clone(), FaultConfig::default());
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    // An earlier group, home already, so that the next one lands behind it.
    let first: Vec<Vec<Record>> = (0..3u8)
        .map(|i| vec![record(&geo, u64::from(i), 100 + i)])
        .collect();
    journal.commit_group(&lun, &first, 0).expect("first group");
    for r in first.iter().flatten() {
        lun.write_at(&r.image, r.target).expect("home");
    }
    lun.flush().expect("flush");
    let base = mem.snapshot();
    lun.start_recording();
    // Five transactions over overlapping targets; transaction t fills with t + 1.
    let txs: Vec<Vec<Record>> = (0..5u64)
        .map(|t| {
            (0..4)
                .map(|k| record(&geo, (t + k) % 6, t as u8 + 1))
                .collect()
        })
        .collect();
    journal.commit_group(&lun, &txs, 0).expect("group");
    lun.stop_recording();
    let records = lun.records();
    // The state after the first `k` transactions, for every k.
    let states: Vec<Vec<u8>> = (0..=txs.len())
        .map(|k| {
            let mut block = vec![0u8; 6];
            for (n, b) in block.iter_mut().enumerate() {
                *b = if n < 3 { 100 + n as u8 } else { 0 };
            }
            for tx in &txs[..k] {
                for r in tx {
                    let n = (r.target / BLOCK_SIZE_U64 - geo.ag_start - 10) as usize;
                    block[n] = r.image[0];
                }
            }
            block
        })
        .collect();
    let mut images = Vec::new();
    for cut in 0..=records.len() {
        images.push(crash_image(&base, &records, cut, None, 512));
        images.push(crash_image(&base, &records, cut, Some(1), 512));
    }
    // Nothing orders the writes before the flush: any subset of them may land.
    assert!(records.len() <= 10, "{} writes", records.len());
    for subset in 0u32..1 << records.len() {
        let landed: Vec<_> = (0..records.len())
            .filter(|i| subset & (1 << i) != 0)
            .map(|i| records[i].clone())
            .collect();
        images.push(crash_image(&base, &landed, landed.len(), None, 512));
    }
    for (i, image) in images.into_iter().enumerate() {
        let crashed = MemLun::from_image(image, 512);
        Journal::open_and_replay(&crashed, &geo, 0, UUID).expect("replay");
        let now: Vec<u8> = (0..6)
            .map(|n| read_block(&crashed, target(&geo, n))[0])
            .collect();
        assert!(
            states.contains(&now),
            "crash image {i}: {now:?} is not the state after any prefix of the group"
        );
    }
}

/// A group of two transactions whose second run landed and whose first did not
/// (nothing orders the writes before the group's flush), then a new life: replay,
/// commit `next`, write it home, mark it home, and another host changes the blocks the
/// landed run names. A further replay must find nothing: the landed run belongs to
/// a life that is over, even where its position and sequence number come round again.
fn replay_after_a_lost_first_run(advance: u64, lost: usize, landed: usize, next: usize) {
    use crate::lun::{crash_image, FaultConfig, FaultLun};
    let (mem, geo) = setup(1024);
    let mem = std::sync::Arc::new(mem);
    let lun = FaultLun::new(mem.clone(), FaultConfig::default());
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    for i in 0..advance {
        let tx = vec![record(&geo, 100 + i % 7, 1)];
        journal.commit(&lun, &tx, 0).expect("commit");
        journal.mark_all_home(&lun).expect("mark");
    }
    let base = mem.snapshot();
    lun.start_recording();
    let lost_tx: Vec<Record> = (0..lost as u64).map(|n| record(&geo, n, 0xAA)).collect();
    let landed_tx: Vec<Record> = (0..landed as u64)
        .map(|n| record(&geo, 40 + n, 0xEE))
        .collect();
    journal
        .commit_group(&lun, &[lost_tx, landed_tx.clone()], 0)
        .expect("group");
    lun.stop_recording();
    let records = lun.records();
    assert_eq!(records.len(), 2, "one write per run");
    let crashed = MemLun::from_image(crash_image(&base, &records[1..], 1, None, 512), 512);

    let (mut journal, report) = Journal::open_and_replay(&crashed, &geo, 0, UUID).expect("replay");
    assert_eq!(report.transactions, 0, "the first run is missing");
    let next_tx: Vec<Record> = (0..next as u64).map(|n| record(&geo, 80 + n, 3)).collect();
    journal.commit(&crashed, &next_tx, 0).expect("commit");
    for r in &next_tx {
        crashed.write_at(&r.image, r.target).expect("home");
    }
    journal.mark_all_home(&crashed).expect("mark");
    // Another host changes the blocks the stale run names.
    for r in &landed_tx {
        crashed
            .write_at(&vec![0x55; BLOCK_SIZE], r.target)
            .expect("other host");
    }
    assert!(pending_transactions(&crashed, &geo, 0, UUID)
        .expect("pending")
        .is_empty());
    let (_, report) = Journal::open_and_replay(&crashed, &geo, 0, UUID).expect("replay again");
    assert_eq!(
        report.transactions, 0,
        "a stale run of an earlier life was replayed"
    );
    for r in &landed_tx {
        assert_eq!(read_block(&crashed, r.target)[0], 0x55);
    }
}

#[test]
fn a_run_of_an_earlier_life_is_not_replayed_at_its_old_position() {
    // No wrap: the new life's transaction has the size of the lost one, so the next
    // sequence number is expected exactly where the stale run lies.
    replay_after_a_lost_first_run(0, 2, 1, 2);
}

#[test]
fn a_run_of_an_earlier_life_is_not_replayed_at_block_1() {
    // The landed run wrapped to block 1 (head at 1000, 3 + 32 blocks do not fit);
    // the new life's smaller transaction leaves the tail at 1003, where nothing is,
    // and replay looks at block 1.
    replay_after_a_lost_first_run(333, 1, 30, 1);
}

#[test]
fn every_life_stamps_a_new_nonce_and_journals_without_one_still_replay() {
    let (lun, geo) = setup(256);
    let header_nonce = |lun: &MemLun| read_header(lun, geo.journal_of(0)).expect("header").nonce;
    // mkfs (and an atsfs before nonces) leaves nonce 0 everywhere.
    assert_eq!(header_nonce(&lun), 0);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    let first = header_nonce(&lun);
    assert_ne!(first, 0);
    assert_eq!(journal.nonce, first);
    // A journal written by an atsfs before nonces: header and runs carry 0.
    journal.nonce = 0;
    journal.mark_all_home(&lun).expect("mark");
    journal
        .commit(&lun, &[record(&geo, 0, 4)], 0)
        .expect("commit");
    let (journal, report) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("replay");
    assert_eq!(report.transactions, 1);
    assert_eq!(read_block(&lun, target(&geo, 0)), vec![4; BLOCK_SIZE]);
    let second = header_nonce(&lun);
    assert!(second != 0 && second != first);
    assert_eq!(journal.nonce, second);
}

/// Byte targets a journal must never write: the superblock, the heartbeat region,
/// the journals (its own and another's), a group header's lock sector, the backup
/// superblock, past the end, and an image running off the last group.
fn forbidden_targets(geo: &Geometry) -> Vec<(&'static str, u64)> {
    let b = BLOCK_SIZE_U64;
    let last = geo.ag_count - 1;
    vec![
        ("superblock", 0),
        ("heartbeat region", geo.hb_start * b),
        ("own journal", (geo.journal_of(0) + 200) * b),
        ("another journal", geo.journal_of(1) * b),
        ("group header lock sector", geo.ag_header(last) * b),
        (
            "orphan table lock sector",
            geo.orphan_table(1).expect("orphan tables") * b,
        ),
        ("backup superblock", geo.backup_superblock() * b),
        ("past the end", geo.total_blocks * b),
        ("far past the end", u64::MAX - 4095),
        (
            "straddling the end of the groups",
            geo.ag_end(last) * b - 512,
        ),
    ]
}

#[test]
fn replay_refuses_a_transaction_that_writes_outside_the_groups() {
    for (what, bad) in forbidden_targets(&setup(256).1) {
        let (lun, geo) = setup(256);
        let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
        let good = record(&geo, 0, 6);
        journal
            .commit(&lun, std::slice::from_ref(&good), 0)
            .expect("a good transaction");
        // Checks at commit are bypassed here: this is what a damaged or foreign
        // journal would hold.
        let seq = journal.next_seq;
        journal
            .commit_unchecked(
                &lun,
                &[
                    record(&geo, 1, 6),
                    Record {
                        target: bad,
                        image: vec![6; BLOCK_SIZE],
                    },
                ],
            )
            .expect("commit unchecked");
        let err = Journal::open_and_replay(&lun, &geo, 0, UUID)
            .err()
            .unwrap_or_else(|| panic!("{what}: a target at byte {bad} was replayed"));
        let message = err.to_string();
        for part in ["slot 0", &format!("seq {seq}"), &format!("byte {bad}")] {
            assert!(message.contains(part), "{what}: {message:?} lacks {part:?}");
        }
        // Nothing of the refused transaction was written; the earlier one was.
        assert_eq!(read_block(&lun, good.target), vec![6; BLOCK_SIZE]);
        assert_eq!(
            read_block(&lun, target(&geo, 1)),
            vec![0; BLOCK_SIZE],
            "{what}"
        );
        assert!(pending_transactions(&lun, &geo, 0, UUID).is_err(), "{what}");
    }
}

#[test]
fn the_writer_refuses_a_target_outside_the_groups() {
    let (lun, geo) = setup(256);
    let (mut journal, _) = Journal::open_and_replay(&lun, &geo, 0, UUID).expect("open");
    for (what, bad) in forbidden_targets(&geo) {
        let tx = [Record {
            target: bad,
            image: vec![1; BLOCK_SIZE],
        }];
        assert!(journal.commit(&lun, &tx, 0).is_err(), "{what}");
    }
    // Every structure the filesystem journals lies in a group (an inode body, a
    // group header body and bitmap, whole blocks up to the last one) or is an orphan
    // table's body.
    let last = geo.ag_count - 1;
    let sector = u64::from(geo.ats_sector_size);
    let ok = [
        (geo.body_offset(geo.ag_header(0)), geo.body_len()),
        (geo.ag_bitmap(0) * BLOCK_SIZE_U64, BLOCK_SIZE),
        (geo.body_offset(geo.ag_first(0) + 40), geo.body_len()),
        ((geo.ag_end(last) - 1) * BLOCK_SIZE_U64, BLOCK_SIZE),
        (geo.ag_header(last) * BLOCK_SIZE_U64 + sector, 512),
        (
            geo.body_offset(geo.orphan_table(1).expect("orphan tables")),
            geo.body_len(),
        ),
    ];
    for (at, len) in ok {
        let tx = [Record {
            target: at,
            image: vec![1; len],
        }];
        journal.commit(&lun, &tx, 0).expect("a target in a group");
    }
}
