//! Tests of the format layer: the spec's byte tables against the code, round trips
//! and corruption detection of every structure, and geometry planning.

use super::*;
use proptest::prelude::*;
use std::fmt::Debug;
use std::mem::size_of;

// ---------------------------------------------------------------------------------
// docs/format.md byte tables == layout_tables()
// ---------------------------------------------------------------------------------

/// A struct's table as the doc lists it: name, size, rows of (field, offset, size).
type Table = (String, usize, Vec<(String, usize, usize)>);

const TABLE_HEADER: &str = "| offset | size | field | meaning |";

/// Finds every `### Name (N bytes)` section and its table. Malformed sections and
/// rows are reported as problems rather than skipped.
fn parse_doc_tables(doc: &str) -> (Vec<Table>, Vec<String>) {
    let mut tables = Vec::new();
    let mut problems = Vec::new();
    let lines: Vec<&str> = doc.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(heading) = line.strip_prefix("### ") else {
            continue;
        };
        let Some((name, size)) = parse_heading(heading) else {
            if heading.contains("bytes") {
                problems.push(format!("line {}: malformed heading {line:?}", i + 1));
            }
            continue;
        };
        let mut rest = lines[i + 1..].iter().map(|l| l.trim());
        if rest.next() != Some(TABLE_HEADER) || rest.next() != Some("|---|---|---|---|") {
            problems.push(format!("{name}: the table header must follow the heading"));
            continue;
        }
        let mut rows = Vec::new();
        for row in rest.take_while(|l| l.starts_with('|')) {
            match parse_row(row) {
                Some(parsed) => rows.push(parsed),
                None => problems.push(format!("{name}: malformed row {row:?}")),
            }
        }
        tables.push((name, size, rows));
    }
    (tables, problems)
}

/// `Superblock (512 bytes)` -> ("Superblock", 512).
fn parse_heading(heading: &str) -> Option<(String, usize)> {
    let (name, rest) = heading.trim().split_once(" (")?;
    let size = rest.strip_suffix(" bytes)")?.parse().ok()?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric());
    valid.then(|| (name.to_string(), size))
}

/// `| 0 | 4 | magic | "ATSB" |` -> ("magic", 0, 4); the meaning must not be empty.
fn parse_row(row: &str) -> Option<(String, usize, usize)> {
    let cells: Vec<&str> = row
        .strip_prefix('|')?
        .strip_suffix('|')?
        .split('|')
        .map(str::trim)
        .collect();
    let [offset, size, field, meaning] = cells[..] else {
        return None;
    };
    if meaning.is_empty() || field.is_empty() {
        return None;
    }
    Some((field.to_string(), offset.parse().ok()?, size.parse().ok()?))
}

/// Every difference between the doc's tables and the code's.
fn table_differences(doc: &str) -> Vec<String> {
    let (tables, mut diffs) = parse_doc_tables(doc);
    let code = layout_tables();
    for (name, size, rows) in &code {
        let found: Vec<&Table> = tables.iter().filter(|t| t.0 == *name).collect();
        let [(_, doc_size, doc_rows)] = found[..] else {
            diffs.push(format!(
                "{name}: {} sections in the doc, expected one",
                found.len()
            ));
            continue;
        };
        if doc_size != size {
            diffs.push(format!(
                "{name}: doc says {doc_size} bytes, code has {size}"
            ));
        }
        for i in 0..rows.len().max(doc_rows.len()) {
            let want = rows.get(i).map(|&(f, o, s)| (f.to_string(), o, s));
            let have = doc_rows.get(i).cloned();
            if want != have {
                diffs.push(format!(
                    "{name} row {i}: doc has {have:?}, code has {want:?}"
                ));
            }
        }
    }
    for (name, _, _) in &tables {
        if !code.iter().any(|(n, _, _)| n == name) {
            diffs.push(format!("{name}: in the doc but not in layout_tables()"));
        }
    }
    diffs
}

fn format_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/format.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn doc_tables_match_the_code() {
    let diffs = table_differences(&format_doc());
    assert!(
        diffs.is_empty(),
        "docs/format.md disagrees with layout_tables():\n  {}",
        diffs.join("\n  ")
    );
}

#[test]
fn the_doc_check_catches_drift() {
    let doc = format_doc();
    let cases = [
        ("| 8 | 4 | version |", "| 8 | 4 | versions |"),
        ("| 240 | 272 | reserved |", "| 240 | 27 | reserved |"),
        ("### AgHeader (128 bytes)", "### AgHeader (120 bytes)"),
        (
            "### JournalCommit (64 bytes)",
            "### JournalCommitX (64 bytes)",
        ),
        ("| 56 | 8 | rotor |", "| 56 | 8 | rotor | x | y |"),
        (
            "| 88 | 64 | hostname | owner's host name, zero padded (informational) |\n",
            "",
        ),
    ];
    for (from, to) in cases {
        assert!(doc.contains(from), "the doc no longer contains {from:?}");
        let drifted = doc.replacen(from, to, 1);
        assert!(
            !table_differences(&drifted).is_empty(),
            "changing {from:?} went unnoticed"
        );
    }
}

#[test]
fn layout_rows_tile_each_struct() {
    // A field missing from layout_tables() would leave a gap, and the doc test would
    // then miss it too.
    for (name, size, rows) in layout_tables() {
        let mut next = 0;
        for (field, offset, len) in rows {
            assert_eq!(
                offset, next,
                "{name}.{field} does not follow the field before"
            );
            next = offset + len;
        }
        assert_eq!(
            next, size,
            "{name}: fields do not reach the end of the struct"
        );
    }
}

// ---------------------------------------------------------------------------------
// Round trips and corruption
// ---------------------------------------------------------------------------------

const BLOCK: BlockNo = 1234;

/// Byte positions to corrupt: all of a small struct, a spread of a large one.
fn positions(len: usize) -> Vec<usize> {
    if len <= 512 {
        (0..len).collect()
    } else {
        (0..64)
            .chain((64..len).step_by(29))
            .chain([len - 1])
            .collect()
    }
}

/// Seal, decode, corrupt each byte, decode at the wrong block, decode short.
fn check_on_disk<T: OnDisk + Debug + PartialEq>(mut value: T, names_its_block: bool) {
    value.seal();
    let bytes = bytemuck::bytes_of(&value).to_vec();
    assert_eq!(T::decode(&bytes, BLOCK), Ok(value), "{}", T::WHAT);
    let padded = encode_padded(&value, 8192);
    assert_eq!(T::decode(&padded, BLOCK), Ok(value), "{} padded", T::WHAT);
    for pos in positions(bytes.len()) {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x41;
        match T::decode(&bad, BLOCK) {
            Err(FormatError::Corrupted { what, block, .. }) => {
                assert_eq!((what, block), (T::WHAT, BLOCK), "byte {pos}")
            }
            other => panic!("{}: byte {pos} corrupted gave {other:?}", T::WHAT),
        }
    }
    let short = T::decode(&bytes[..bytes.len() - 1], BLOCK);
    assert!(
        matches!(short, Err(FormatError::Corrupted { .. })),
        "{}",
        T::WHAT
    );
    let elsewhere = T::decode(&bytes, BLOCK + 1);
    if names_its_block {
        match elsewhere {
            Err(FormatError::Corrupted { block, .. }) => assert_eq!(block, BLOCK + 1),
            other => panic!("{} accepted at the wrong block: {other:?}", T::WHAT),
        }
    } else {
        assert_eq!(elsewhere, Ok(value));
    }
}

fn superblock() -> Superblock {
    let geo = Geometry::plan(&MkfsParams {
        total_bytes: 512 << 20,
        ats_sector_size: 512,
        max_hosts: 32,
        journal_blocks: None,
    })
    .unwrap();
    let mut sb: Superblock = zeroed();
    sb.magic = Superblock::MAGIC;
    sb.version = FORMAT_VERSION;
    sb.ats_mode = ATS_MODE_EMULATED;
    sb.volume_uuid = [7; 16];
    put_str(&mut sb.label, "data");
    sb.block_size = BLOCK_SIZE as u32;
    sb.ats_sector_size = 512;
    sb.max_hosts = 32;
    sb.resource_blocks = geo.resource_blocks;
    sb.heartbeat_interval_ms = 1000;
    sb.lease_ms = 8000;
    sb.total_blocks = geo.total_blocks;
    sb.hb_start = geo.hb_start;
    sb.hb_blocks = geo.hb_blocks;
    sb.journal_start = geo.journal_start;
    sb.journal_blocks = geo.journal_blocks;
    sb.ag_start = geo.ag_start;
    sb.ag_count = geo.ag_count;
    sb.root_ino = geo.ag_start + 2;
    sb.self_block = BLOCK;
    sb.dir_hash_seed = 0x1234_5678_9abc_def0;
    sb
}

fn orphan_table() -> OrphanTable {
    let mut t: OrphanTable = zeroed();
    t.magic = OrphanTable::MAGIC;
    t.blockno = BLOCK;
    t.slot = 2;
    t.count = 2;
    t.entries[0] = 5000;
    t.entries[1] = 6000;
    t
}

fn heartbeat_slot() -> HeartbeatSlot {
    let mut hb: HeartbeatSlot = zeroed();
    hb.magic = HeartbeatSlot::MAGIC;
    hb.slot = 3;
    hb.state = SLOT_LIVE;
    hb.host_uuid = [9; 16];
    hb.generation = 4;
    hb.counter = 77;
    put_str(&mut hb.hostname, "node-a");
    hb
}

fn lock_record() -> LockRecord {
    let mut lock: LockRecord = zeroed();
    lock.magic = LockRecord::MAGIC;
    lock.mode = LOCK_SHARED;
    lock.holders_count = 2;
    lock.resource = BLOCK;
    lock.change_seq = 5;
    lock.shared_slots = 0b101;
    lock.shared_gen[0] = 1;
    lock.shared_gen[2] = 3;
    lock
}

fn ag_header() -> AgHeader {
    let mut ag: AgHeader = zeroed();
    ag.magic = AgHeader::MAGIC;
    ag.blockno = BLOCK;
    ag.ag_index = 2;
    ag.start = BLOCK;
    ag.blocks = AG_BLOCKS;
    ag.free_blocks = AG_BLOCKS - 2;
    ag.rotor = 2;
    ag
}

fn inode() -> InodeBody {
    let mut ino: InodeBody = zeroed();
    ino.magic = InodeBody::MAGIC;
    ino.blockno = BLOCK;
    ino.generation = 1;
    ino.mode = libc::S_IFREG | 0o644;
    ino.nlink = 1;
    ino.extent_count = 2;
    ino.size = 10_000;
    ino.blocks = 4;
    let extents = [
        Extent {
            file_block: 0,
            disk_block: 5000,
            len: 2,
            flags: 0,
        },
        Extent {
            file_block: 2,
            disk_block: 6000,
            len: 1,
            flags: EXTENT_UNWRITTEN,
        },
    ];
    ino.area[..48].copy_from_slice(bytemuck::cast_slice(&extents));
    ino
}

fn extent_leaf() -> ExtentLeaf {
    let mut leaf: ExtentLeaf = zeroed();
    leaf.magic = ExtentLeaf::MAGIC;
    leaf.blockno = BLOCK;
    leaf.owner = 99;
    leaf.count = 1;
    leaf.extents[0] = Extent {
        file_block: 7,
        disk_block: 8,
        len: 9,
        flags: 0,
    };
    leaf
}

fn dir_table_block() -> DirTableBlock {
    let mut table: DirTableBlock = zeroed();
    table.magic = DirTableBlock::MAGIC;
    table.blockno = BLOCK;
    table.owner = 99;
    table.index = 1;
    table.ptrs[0] = 555;
    table
}

/// Appends one directory entry to a bucket.
fn push_entry(bucket: &mut DirBucket, hash: u64, ino: u64, kind: u8, name: &[u8]) {
    let at = bucket.header.used as usize;
    let area = &mut bucket.area[at..];
    area[..8].copy_from_slice(&hash.to_le_bytes());
    area[8..16].copy_from_slice(&ino.to_le_bytes());
    area[16] = kind;
    area[17] = name.len() as u8;
    area[18..18 + name.len()].copy_from_slice(name);
    bucket.header.used += (DIR_ENTRY_FIXED + name.len()) as u32;
    bucket.header.count += 1;
}

fn dir_bucket() -> DirBucket {
    let mut bucket: DirBucket = zeroed();
    bucket.header.magic = DirBucket::MAGIC;
    bucket.header.blockno = BLOCK;
    bucket.header.owner = 99;
    bucket.header.local_depth = 1;
    bucket.header.prefix = 1;
    push_entry(&mut bucket, 1 << 62 | 5, 100, 8, b"hello.txt");
    push_entry(&mut bucket, 1 << 62 | 9, 101, 4, &[b'x'; 255]);
    bucket
}

fn xattr_block() -> XattrBlock {
    let mut x: XattrBlock = zeroed();
    x.magic = XattrBlock::MAGIC;
    x.blockno = BLOCK;
    x.owner = 99;
    let name = b"user.comment";
    let value = b"hi";
    x.area[0] = name.len() as u8;
    x.area[1..3].copy_from_slice(&(value.len() as u16).to_le_bytes());
    x.area[3..3 + name.len()].copy_from_slice(name);
    x.area[3 + name.len()..3 + name.len() + value.len()].copy_from_slice(value);
    x.count = 1;
    x.used = (XATTR_ENTRY_FIXED + name.len() + value.len()) as u32;
    x
}

fn journal_header() -> JournalHeader {
    let mut h: JournalHeader = zeroed();
    h.magic = JournalHeader::MAGIC;
    h.blockno = BLOCK;
    h.slot = 3;
    h.tail_seq = 10;
    h.tail_block = 17;
    h.journal_blocks = 256;
    h.volume_uuid = [7; 16];
    h
}

fn journal_descriptor() -> JournalDescriptor {
    let mut d: JournalDescriptor = zeroed();
    d.magic = JournalDescriptor::MAGIC;
    d.blockno = BLOCK;
    d.seq = 10;
    d.count = 2;
    d.volume_uuid = [7; 16];
    d.entries[0] = JournalEntry {
        target: 4096 * 50,
        len: 4096,
        crc: 1,
    };
    d.entries[1] = JournalEntry {
        target: 4096 * 51 + 512,
        len: 512,
        crc: 2,
    };
    d
}

fn journal_commit() -> JournalCommit {
    let mut c: JournalCommit = zeroed();
    c.magic = JournalCommit::MAGIC;
    c.blockno = BLOCK;
    c.seq = 10;
    c.count = 2;
    c.data_crc = 0xdead_beef;
    c.volume_uuid = [7; 16];
    c
}

#[test]
fn every_structure_round_trips_and_detects_corruption() {
    check_on_disk(superblock(), true);
    check_on_disk(heartbeat_slot(), false);
    check_on_disk(lock_record(), true);
    check_on_disk(ag_header(), true);
    check_on_disk(orphan_table(), true);
    check_on_disk(inode(), true);
    check_on_disk(extent_leaf(), true);
    check_on_disk(dir_table_block(), true);
    check_on_disk(dir_bucket(), true);
    check_on_disk(xattr_block(), true);
    check_on_disk(journal_header(), true);
    check_on_disk(journal_descriptor(), true);
    check_on_disk(journal_commit(), true);
}

/// Seals `value` after `change` and decodes it at `BLOCK`.
fn decode_changed<T: OnDisk>(mut value: T, change: impl FnOnce(&mut T)) -> Result<T, FormatError> {
    change(&mut value);
    value.seal();
    T::decode(bytemuck::bytes_of(&value), BLOCK)
}

fn is_corrupted<T: Debug>(result: Result<T, FormatError>) -> bool {
    matches!(result, Err(FormatError::Corrupted { block: BLOCK, .. }))
}

fn is_unsupported<T: Debug>(result: Result<T, FormatError>) -> bool {
    matches!(result, Err(FormatError::Unsupported(_)))
}

#[test]
fn superblock_refuses_what_it_does_not_know() {
    assert!(is_unsupported(decode_changed(superblock(), |s| s
        .feature_incompat =
        1)));
    assert!(is_unsupported(decode_changed(superblock(), |s| s
        .feature_ro_compat =
        1 << 40)));
    assert!(is_unsupported(decode_changed(superblock(), |s| s
        .version =
        2)));
    // Unknown compatible features are fine.
    assert!(decode_changed(superblock(), |s| s.feature_compat = 1).is_ok());
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .block_size =
        8192)));
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .ats_sector_size =
        1024)));
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .max_hosts =
        0)));
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .max_hosts =
        65)));
    assert!(is_corrupted(
        decode_changed(superblock(), |s| s.lease_ms = 1000)
    ));
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .heartbeat_interval_ms =
        0)));
    assert!(is_corrupted(
        decode_changed(superblock(), |s| s.ats_mode = 0)
    ));
    let err = decode_changed(superblock(), |s| s.feature_incompat = 4).unwrap_err();
    assert!(err.to_string().contains("newer atsfs"), "{err}");
    // Orphan tables: the flag and the region's block go together.
    assert!(decode_changed(superblock(), |s| s.orphan_start = 0).is_ok());
    let with = |s: &mut Superblock| {
        s.feature_ro_compat = FEATURE_RO_COMPAT_ORPHAN_TABLES;
        s.orphan_start = 8201;
    };
    assert!(decode_changed(superblock(), with).is_ok());
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .feature_ro_compat =
        FEATURE_RO_COMPAT_ORPHAN_TABLES)));
    assert!(is_corrupted(decode_changed(superblock(), |s| s
        .orphan_start =
        8201)));
}

#[test]
fn orphan_tables_refuse_more_entries_than_they_hold() {
    let mut t = orphan_table();
    t.count = ORPHAN_ENTRIES_MAX as u32;
    assert!(decode_changed(t, |_| {}).is_ok());
    assert!(is_corrupted(decode_changed(t, |t| t.count += 1)));
    assert_eq!(orphan_table().listed(), &[5000, 6000]);
}

#[test]
fn a_volume_without_orphan_tables_keeps_its_layout() {
    // Made before orphan tables: the groups follow the journals directly, and the
    // superblock neither sets the flag nor names a region.
    let planned = Geometry::plan(&params(512 * MIB, 512, 32)).unwrap();
    let mut old = planned;
    old.orphan_start = 0;
    old.ag_start = planned.orphan_start;
    old.ag_count = 4;
    assert_eq!(old.check(), Ok(()));
    assert_eq!(old.orphan_table(0), None);
    let mut sb = superblock();
    sb.ag_start = old.ag_start;
    sb.feature_ro_compat = 0;
    sb.orphan_start = 0;
    assert_eq!(Geometry::from_superblock(&sb).orphan_start, 0);
    sb.feature_ro_compat = FEATURE_RO_COMPAT_ORPHAN_TABLES;
    sb.orphan_start = planned.orphan_start;
    sb.ag_start = planned.ag_start;
    let geo = Geometry::from_superblock(&sb);
    assert_eq!(geo.orphan_table(3), Some(planned.orphan_start + 3));
}

#[test]
fn field_checks_catch_impossible_values() {
    assert!(is_corrupted(decode_changed(heartbeat_slot(), |h| h
        .state =
        3)));
    assert!(is_corrupted(decode_changed(lock_record(), |l| l.mode = 4)));
    assert!(is_corrupted(
        decode_changed(ag_header(), |a| a.rotor = a.blocks)
    ));
    assert!(is_corrupted(decode_changed(ag_header(), |a| a
        .free_blocks =
        a.blocks + 1)));
    assert!(is_corrupted(
        decode_changed(ag_header(), |a| a.blocks = AG_BLOCKS + 1)
    ));
    assert!(is_corrupted(decode_changed(inode(), |i| i.mode = 0o644)));
    assert!(is_corrupted(
        decode_changed(inode(), |i| i.extent_count = 139)
    ));
    assert!(decode_changed(inode(), |i| i.extent_count = 138).is_ok());
    assert!(is_corrupted(decode_changed(inode(), |i| {
        i.flags = INODE_FLAG_INLINE;
        i.extent_count = 0;
        i.size = INODE_AREA_SIZE as u64 + 1;
    })));
    assert!(is_corrupted(decode_changed(inode(), |i| {
        i.mode = libc::S_IFDIR | 0o755;
        i.extent_count = 0;
        i.dir_table_blocks = INODE_DIR_PTRS_MAX as u32 + 1;
    })));
    assert!(is_corrupted(
        decode_changed(extent_leaf(), |l| l.count = 170)
    ));
    assert!(is_corrupted(decode_changed(dir_bucket(), |b| b
        .header
        .used -=
        1)));
    assert!(is_corrupted(decode_changed(dir_bucket(), |b| b
        .header
        .count +=
        1)));
    assert!(is_corrupted(
        decode_changed(dir_bucket(), |b| b.area[17] = 0)
    ));
    assert!(is_corrupted(decode_changed(dir_bucket(), |b| b
        .header
        .local_depth =
        64)));
    assert!(is_corrupted(decode_changed(xattr_block(), |x| x.used += 1)));
    assert!(is_corrupted(
        decode_changed(xattr_block(), |x| x.area[0] = 0)
    ));
    assert!(is_corrupted(decode_changed(journal_header(), |h| h
        .tail_block =
        0)));
    assert!(is_corrupted(decode_changed(journal_header(), |h| h
        .tail_block =
        256)));
    assert!(is_corrupted(decode_changed(journal_descriptor(), |d| d
        .count =
        0)));
    assert!(is_corrupted(decode_changed(journal_descriptor(), |d| d
        .count =
        253)));
    assert!(is_corrupted(decode_changed(journal_descriptor(), |d| d
        .entries[1]
        .len =
        100)));
    assert!(is_corrupted(decode_changed(journal_descriptor(), |d| d
        .entries[0]
        .target +=
        1)));
    assert!(is_corrupted(decode_changed(journal_descriptor(), |d| d
        .entries[0]
        .len =
        8192)));
}

#[test]
fn errors_name_the_structure_and_block() {
    let mut bytes = bytemuck::bytes_of(&{
        let mut i = inode();
        i.seal();
        i
    })
    .to_vec();
    bytes[100] ^= 1;
    let text = InodeBody::decode(&bytes, BLOCK).unwrap_err().to_string();
    assert!(text.contains("inode") && text.contains("1234"), "{text}");
    assert!(text.contains("checksum"), "{text}");
}

/// Decodes `bytes` as every structure; only a panic fails.
fn decode_as_everything(bytes: &[u8], block: BlockNo) {
    let _ = Superblock::decode(bytes, block);
    let _ = HeartbeatSlot::decode(bytes, block);
    let _ = LockRecord::decode(bytes, block);
    let _ = AgHeader::decode(bytes, block);
    let _ = InodeBody::decode(bytes, block);
    let _ = ExtentLeaf::decode(bytes, block);
    let _ = DirTableBlock::decode(bytes, block);
    let _ = DirBucket::decode(bytes, block);
    let _ = XattrBlock::decode(bytes, block);
    let _ = JournalHeader::decode(bytes, block);
    let _ = JournalDescriptor::decode(bytes, block);
    let _ = JournalCommit::decode(bytes, block);
}

/// `bytes` made into a structure that passes the magic and CRC checks, so that the
/// field checks see random content.
fn sealed_random<T: OnDisk>(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.resize(size_of::<T>(), 0);
    bytes[..4].copy_from_slice(&T::MAGIC.to_le_bytes());
    let crc = crc_of(&bytes);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    bytes
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4200), block: u64) {
        decode_as_everything(&bytes, block);
    }

    #[test]
    fn random_sealed_structures_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 4096),
        small in 0u32..300,
        used in 0u32..4100,
    ) {
        // Small counts and plausible `used` values reach the entry walks.
        let mut biased = bytes.clone();
        biased[28..32].copy_from_slice(&small.to_le_bytes());
        biased[32..36].copy_from_slice(&used.to_le_bytes());
        biased[24..28].copy_from_slice(&(small % 8).to_le_bytes());
        for raw in [bytes, biased] {
            let block = u64::from_le_bytes(raw[8..16].try_into().unwrap());
            decode_as_everything(&sealed_random::<DirBucket>(raw.clone()), block);
            decode_as_everything(&sealed_random::<XattrBlock>(raw.clone()), block);
            decode_as_everything(&sealed_random::<JournalDescriptor>(raw.clone()), block);
            decode_as_everything(&sealed_random::<InodeBody>(raw.clone()), block);
            decode_as_everything(&sealed_random::<Superblock>(raw.clone()), block);
            decode_as_everything(&sealed_random::<AgHeader>(raw.clone()), block);
            decode_as_everything(&sealed_random::<ExtentLeaf>(raw), block);
        }
    }
}

// ---------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;

fn params(total_bytes: u64, ats: u32, hosts: u32) -> MkfsParams {
    MkfsParams {
        total_bytes,
        ats_sector_size: ats,
        max_hosts: hosts,
        journal_blocks: None,
    }
}

#[test]
fn a_512mib_volume_with_32_hosts() {
    let geo = Geometry::plan(&params(512 * MIB, 512, 32)).unwrap();
    assert_eq!(geo.total_blocks, 131_072);
    assert_eq!(geo.resource_blocks, 1);
    assert_eq!((geo.hb_start, geo.hb_blocks), (1, 8));
    assert_eq!(geo.journal_start, 9);
    assert_eq!(geo.journal_blocks, 256); // 131072 / (16 * 32)
    assert_eq!(geo.orphan_start, 9 + 32 * 256);
    assert_eq!(geo.orphan_table(31), Some(geo.orphan_start + 31));
    assert_eq!(geo.ag_start, 9 + 32 * 256 + 32);
    // 122838 data blocks: three full groups and a tail of 24534.
    assert_eq!(geo.ag_count, 4);
    assert_eq!(geo.ag_len(3), 24_534);
    assert_eq!(geo.ag_end(3), geo.backup_superblock());
    assert_eq!(geo.data_blocks(), 131_072 - 1 - geo.ag_start);
    assert_eq!(geo.slot_offset(31), 4096 + 2 * 31 * 512);
    assert_eq!(geo.mailbox_offset(31), 4096 + 2 * 31 * 512 + 512);
    assert_eq!(geo.journal_of(31), 9 + 31 * 256);
    assert_eq!(
        (geo.ag_bitmap(1), geo.ag_meta_blocks()),
        (geo.ag_first(1) + 1, 2)
    );
    assert_eq!(geo.body_offset(100), 100 * 4096 + 512);
    assert_eq!(geo.check(), Ok(()));
}

#[test]
fn a_1tib_volume() {
    let geo = Geometry::plan(&params(1 << 40, 512, 32)).unwrap();
    assert_eq!(geo.total_blocks, 1 << 28);
    assert_eq!(geo.journal_blocks, 16_384); // clamped to 64 MiB
    assert_eq!(geo.ag_start, 9 + 32 * 16_384 + 32);
    assert_eq!(geo.ag_count, 8176);
    assert_eq!(geo.ag_len(8175), 32_726);
    assert_eq!(geo.check(), Ok(()));
}

#[test]
fn a_4096_byte_sector_takes_two_blocks_per_resource() {
    let geo = Geometry::plan(&params(512 * MIB, 4096, 32)).unwrap();
    assert_eq!(geo.resource_blocks, 2);
    assert_eq!(geo.hb_blocks, 64);
    assert_eq!(geo.ag_meta_blocks(), 3);
    assert_eq!(geo.ag_bitmap(0), geo.ag_first(0) + 2);
    assert_eq!(geo.body_offset(100), 100 * 4096 + 4096);
    assert_eq!(geo.slot_offset(1), 3 * 4096);
    assert_eq!(geo.orphan_table(1), Some(geo.orphan_start + 2));
    assert_eq!(geo.ag_start, geo.orphan_start + 32 * 2);
    assert_eq!(geo.check(), Ok(()));
}

#[test]
fn too_small_devices_say_what_they_need() {
    let err = Geometry::plan(&params(MIB, 512, 32)).unwrap_err();
    // 1 superblock + 8 slot blocks (heartbeat + mailbox) + 32 journals of 256 + 32
    // orphan tables + 64 + 1 backup.
    let need = (1 + 8 + 32 * 256 + 32 + 64 + 1) * 4096;
    assert_eq!(err, GeometryError::TooSmall { have: MIB, need });
    assert!(Geometry::plan(&params(need, 512, 32)).is_ok());
    assert!(Geometry::plan(&params(need - 1, 512, 32)).is_err());
    assert!(err.to_string().contains(&need.to_string()));
}

#[test]
fn bad_parameters_are_refused() {
    let plan = |p: MkfsParams| Geometry::plan(&p).unwrap_err();
    assert_eq!(plan(params(MIB << 10, 512, 0)), GeometryError::BadHosts(0));
    assert_eq!(
        plan(params(MIB << 10, 512, 65)),
        GeometryError::BadHosts(65)
    );
    assert_eq!(
        plan(params(MIB << 10, 1024, 4)),
        GeometryError::BadSector(1024)
    );
    let short_journal = MkfsParams {
        journal_blocks: Some(255),
        ..params(MIB << 10, 512, 4)
    };
    assert_eq!(plan(short_journal), GeometryError::JournalTooSmall);
}

#[test]
fn huge_journals_are_too_small_devices_not_overflows() {
    for journal_blocks in [u64::MAX, u64::MAX / 64, 1 << 52] {
        let p = MkfsParams {
            journal_blocks: Some(journal_blocks),
            ..params(1 << 40, 512, 64)
        };
        let err = Geometry::plan(&p).unwrap_err();
        assert!(matches!(err, GeometryError::TooSmall { .. }), "{err:?}");
    }
}

#[test]
fn check_refuses_tampered_geometries() {
    let geo = Geometry::plan(&params(512 * MIB, 512, 32)).unwrap();
    type Tamper = (&'static str, fn(&mut Geometry));
    let tampered: [Tamper; 12] = [
        ("resource span", |g| g.resource_blocks += 1),
        ("heartbeat start", |g| g.hb_start = 2),
        ("heartbeat size", |g| g.hb_blocks -= 1),
        ("journal start", |g| g.journal_start += 1),
        ("journal size", |g| g.journal_blocks = 255),
        ("journal size", |g| g.journal_blocks += 1),
        ("group start", |g| g.ag_start += 1),
        ("orphan tables", |g| g.orphan_start += 1),
        ("no room for orphan tables", |g| g.ag_start = g.orphan_start),
        ("no groups", |g| g.ag_count = 0),
        ("a group too many", |g| g.ag_count += 1),
        ("volume shrunk", |g| {
            g.total_blocks = g.ag_first(g.ag_count - 1) + 64
        }),
    ];
    for (what, change) in tampered {
        let mut bad = geo;
        change(&mut bad);
        assert!(bad.check().is_err(), "{what}: {bad:?}");
    }
    let mut huge = geo;
    huge.ag_count = u64::MAX;
    assert!(huge.check().is_err());
    huge = geo;
    huge.journal_blocks = u64::MAX / 2;
    assert!(huge.check().is_err());
}

proptest! {
    #[test]
    fn planned_geometries_check_and_cover_the_data_area(
        total_bytes in (300u64 * 4096)..(64u64 << 40),
        hosts in 1u32..=64,
        big_sector: bool,
        journal_mib in prop::option::of(1u64..256),
    ) {
        let ats = if big_sector { 4096 } else { 512 };
        let p = MkfsParams {
            journal_blocks: journal_mib.map(|mib| mib * 256),
            ..params(total_bytes, ats, hosts)
        };
        let Ok(geo) = Geometry::plan(&p) else {
            return Ok(());
        };
        prop_assert_eq!(geo.check(), Ok(()));
        prop_assert!(geo.ag_count >= 1);
        prop_assert!(geo.journal_blocks >= 256);
        let mut next = geo.ag_start;
        // One group (a small volume) is visited once, not three times.
        let mut ags = vec![0, geo.ag_count / 2, geo.ag_count - 1];
        ags.dedup();
        for ag in ags {
            prop_assert!(geo.ag_len(ag) >= 64 && geo.ag_len(ag) <= AG_BLOCKS);
            prop_assert_eq!(geo.ag_of(geo.ag_first(ag)), Some(ag));
            prop_assert_eq!(geo.ag_of(geo.ag_end(ag) - 1), Some(ag));
            prop_assert!(geo.ag_first(ag) >= next);
            next = geo.ag_end(ag);
        }
        prop_assert!(next < geo.total_blocks);
        prop_assert_eq!(geo.ag_of(geo.ag_start - 1), None);
        prop_assert_eq!(geo.ag_of(geo.backup_superblock()), None);
        // Unused tail: fewer than AG_BLOCKS_MIN blocks.
        prop_assert!(geo.backup_superblock() - next < 64);
        prop_assert!(geo.slot_offset(hosts - 1) + u64::from(ats)
            <= geo.journal_start * BLOCK_SIZE_U64);
    }
}

#[test]
fn decode_checked_skips_only_the_crc() {
    let mut h = journal_header();
    h.seal();
    let mut bytes = bytemuck::bytes_of(&h).to_vec();
    bytes[40] ^= 1;
    assert!(
        JournalHeader::decode(&bytes, BLOCK).is_err(),
        "decode checks the CRC"
    );
    let trusted = JournalHeader::decode_checked(&bytes, BLOCK).expect("a checked image");
    assert_eq!(bytemuck::bytes_of(&trusted), &bytes[..]);
    bytes[0] ^= 1;
    assert!(
        JournalHeader::decode_checked(&bytes, BLOCK).is_err(),
        "a wrong magic is never trusted"
    );
    assert!(JournalHeader::decode_checked(&bytes[..8], BLOCK).is_err());
}
