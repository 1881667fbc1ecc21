//! In-process hosts over one `MemLun`, looked at by the tools.

use super::*;
use crate::cluster::HostUuid;
use crate::format::{encode_padded, Geometry, HeartbeatSlot, LockRecord, OnDisk};
use crate::fs::{Fs, Ino, MountOptions};
use crate::lun::{Lun, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use rand::{RngCore, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Long enough for every live host (100 ms interval) to renew several times; the
/// watch stops as soon as every slot moved.
const WATCH: Duration = Duration::from_millis(1000);
/// Past the 1 s lease: settles a silent slot as dead.
const SETTLE: Duration = Duration::from_millis(1600);

/// 256 MiB (two allocation groups), 4 slots, heartbeat 100 ms, lease 1 s.
fn volume() -> Arc<MemLun> {
    let lun = Arc::new(MemLun::new(256 << 20, 512));
    let opts = MkfsOptions {
        label: "inspect".into(),
        max_hosts: 4,
        heartbeat_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1000),
        ..MkfsOptions::default()
    };
    mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
    lun
}

fn mount(lun: &Arc<MemLun>, id: u8) -> Arc<Fs> {
    Fs::mount(
        lun.clone() as Arc<dyn Lun>,
        MountOptions::new(HostUuid([id; 16])),
    )
    .expect("mount")
}

fn uuid_of(id: u8) -> String {
    HostUuid([id; 16]).to_string()
}

fn create(fs: &Fs, parent: Ino, name: &str) -> Ino {
    let mode = libc::S_IFREG | 0o644;
    fs.mknod(parent, name.as_bytes(), mode, 0, 0, 0)
        .expect("create")
        .ino
}

fn mkdir(fs: &Fs, parent: Ino, name: &str) -> Ino {
    fs.mkdir(parent, name.as_bytes(), 0o755, 0, 0)
        .expect("mkdir")
        .ino
}

fn slot_states(s: &Status) -> Vec<(u32, SlotState)> {
    s.slots.iter().map(|r| (r.slot, r.state)).collect()
}

fn all_locks(lun: &MemLun, watch: Duration) -> LockReport {
    let query = LockQuery {
        watch: Some(watch),
        ..LockQuery::default()
    };
    locks(lun, &query).expect("locks")
}

fn row<'a>(report: &'a LockReport, path: &str) -> &'a LockRow {
    report
        .locks
        .iter()
        .find(|r| r.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("no row for {path} in {:#?}", report.locks))
}

/// Every host a record names, with its state.
fn named(r: &LockRow) -> Vec<&Owner> {
    r.owners
        .iter()
        .chain(&r.open_writer)
        .chain(&r.open_readers)
        .collect()
}

/// Two hosts, each with a directory and an open file: what both tools show.
struct TwoHosts {
    lun: Arc<MemLun>,
    a: Arc<Fs>,
    b: Arc<Fs>,
    fa: Ino,
}

fn two_hosts() -> TwoHosts {
    let lun = volume();
    let a = mount(&lun, 1);
    let b = mount(&lun, 2);
    let da = mkdir(&a, a.root(), "da");
    let fa = create(&a, da, "fa");
    a.open(fa, true).expect("a opens fa for writing");
    let db = mkdir(&b, b.root(), "db");
    let fb = create(&b, db, "fb");
    b.open(fb, false).expect("b opens fb read-only");
    // The tools see what is committed (the walk reads through the journals).
    a.sync().expect("sync a");
    b.sync().expect("sync b");
    TwoHosts { lun, a, b, fa }
}

#[test]
fn both_hosts_live_and_their_locks_listed_with_owners_and_paths() {
    let t = two_hosts();
    let (slot_a, gen_a) = t.a.slot().expect("a's slot");
    let (slot_b, gen_b) = t.b.slot().expect("b's slot");
    assert_ne!(slot_a, slot_b);

    let s = status(t.lun.as_ref(), Some(WATCH)).expect("status");
    assert_eq!(s.volume.label, "inspect");
    assert_eq!(s.volume.ats_mode, "emulated");
    assert_eq!(
        (s.volume.heartbeat_interval_ms, s.volume.lease_ms),
        (100, 1000)
    );
    assert_eq!(
        slot_states(&s),
        vec![(slot_a, SlotState::Live), (slot_b, SlotState::Live)]
    );
    assert_eq!(s.slots[0].host_uuid, uuid_of(1));
    assert_eq!(s.slots[0].generation, gen_a);
    assert_eq!(s.slots[1].host_uuid, uuid_of(2));
    assert!(s.slots.iter().all(|r| r.changed && r.note.is_none()));
    assert!(s.watched_ms < 1000, "the watch ends once both moved");

    let report = all_locks(&t.lun, WATCH);
    for r in &report.locks {
        assert!(r.held(), "a free record listed without --all: {r:?}");
        for o in named(r) {
            assert!(o.slot == slot_a || o.slot == slot_b, "{r:?}");
            assert_eq!(o.state, HolderState::Live, "{r:?}");
            assert!(o.live);
        }
    }
    // A's file: open for writing by A; its lock, if still held, is A's.
    let fa = row(&report, "/da/fa");
    assert_eq!(fa.kind, ResourceKind::Inode);
    assert_eq!(fa.resource, t.fa);
    let writer = fa.open_writer.as_ref().expect("fa's writer");
    assert_eq!((writer.slot, writer.generation), (slot_a, gen_a));
    assert_eq!(writer.host_uuid.as_deref(), Some(uuid_of(1).as_str()));
    assert!(fa.owners.iter().all(|o| o.slot == slot_a));
    // B's file: open read-only by B.
    let fb = row(&report, "/db/fb");
    assert!(fb.open_writer.is_none());
    let readers: Vec<u32> = fb.open_readers.iter().map(|o| o.slot).collect();
    assert_eq!(readers, vec![slot_b]);
    assert!(fb.owners.iter().all(|o| o.slot == slot_b));
    // The directories each host made are held by that host alone.
    for (path, slot, generation, id) in [("/da", slot_a, gen_a, 1), ("/db", slot_b, gen_b, 2)] {
        // Nobody else asked for them, so the holder still caches them.
        let r = row(&report, path);
        assert_eq!(r.mode, RecordMode::Exclusive, "{r:?}");
        let o = &r.owners[0];
        assert_eq!((o.slot, o.generation), (slot, generation));
        assert_eq!(o.host_uuid.as_deref(), Some(uuid_of(id).as_str()));
    }
    // Group headers are named as groups.
    for r in report
        .locks
        .iter()
        .filter(|r| r.kind == ResourceKind::AllocationGroup)
    {
        assert!(r.path.as_deref().is_some_and(|p| p.starts_with("group ")));
    }
    let text = render_locks(&report);
    assert!(
        text.contains("/da/fa") && text.contains("write 0/"),
        "{text}"
    );
    let text = render_status(&s);
    assert!(
        text.contains(&uuid_of(2)) && text.contains("live"),
        "{text}"
    );
    t.a.release(t.fa, true).expect("close");
}

#[test]
fn one_path_all_records_and_bad_paths() {
    let t = two_hosts();
    let query = |path: &str| LockQuery {
        path: Some(path.into()),
        watch: Some(Duration::ZERO),
        ..LockQuery::default()
    };
    let one = locks(t.lun.as_ref(), &query("da//./fa/")).expect("locks of one path");
    assert_eq!(one.locks.len(), 1);
    assert_eq!(one.locks[0].path.as_deref(), Some("/da/fa"));
    assert!(one.locks[0].open_writer.is_some());
    // The root is listed when asked for, held or not.
    let root = locks(t.lun.as_ref(), &query("/")).expect("locks of /");
    assert_eq!(root.locks.len(), 1);
    assert_eq!(root.locks[0].resource, t.a.root());
    let err = locks(t.lun.as_ref(), &query("/mnt/data/da/fa")).expect_err("not on the volume");
    assert!(err.to_string().contains("no such path"), "{err}");

    let every = LockQuery {
        all: true,
        watch: Some(Duration::ZERO),
        ..LockQuery::default()
    };
    let every = locks(t.lun.as_ref(), &every).expect("--all");
    let inodes = every.locks.iter().filter(|r| r.kind == ResourceKind::Inode);
    let paths: Vec<&str> = inodes.filter_map(|r| r.path.as_deref()).collect();
    for p in ["/", "/da", "/da/fa", "/db", "/db/fb"] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    let groups = every
        .locks
        .iter()
        .filter(|r| r.kind == ResourceKind::AllocationGroup)
        .count();
    assert_eq!(groups, 2);
    assert!(every.locks.len() >= 7);
    t.a.release(t.fa, true).expect("close");
}

#[test]
fn unmounted_host_is_free_and_a_crashed_one_dies_after_the_lease() {
    let t = two_hosts();
    let (slot_a, _) = t.a.slot().expect("a's slot");
    let (slot_b, gen_b) = t.b.slot().expect("b's slot");
    t.a.release(t.fa, true).expect("close");
    t.a.unmount().expect("unmount a");
    let s = status(t.lun.as_ref(), Some(WATCH)).expect("status");
    assert_eq!(
        slot_states(&s),
        vec![(slot_a, SlotState::Free), (slot_b, SlotState::Live)]
    );
    let report = all_locks(&t.lun, WATCH);
    assert!(!report.locks.is_empty(), "b still holds its locks");
    for r in &report.locks {
        for o in named(r) {
            assert_eq!(o.slot, slot_b, "a unmounted but is still named: {r:?}");
            assert_eq!(o.state, HolderState::Live);
        }
    }

    // B crashes: its heartbeat stops, its records stay.
    let TwoHosts { lun, b, .. } = t;
    drop(b);
    let s = status(lun.as_ref(), Some(Duration::from_millis(300))).expect("status");
    let row_b = s.slots.iter().find(|r| r.slot == slot_b).expect("b's row");
    assert_eq!(row_b.state, SlotState::Unsure, "{row_b:?}");
    assert!(!row_b.changed);
    let note = row_b.note.as_deref().unwrap_or_default();
    assert!(
        note.contains("not moving") && note.contains("dead after the lease"),
        "{note}"
    );
    let report = all_locks(&lun, Duration::from_millis(300));
    let held_by_b = |report: &LockReport, state: HolderState| {
        let names: Vec<&Owner> = report.locks.iter().flat_map(named).collect();
        !names.is_empty()
            && names
                .iter()
                .all(|o| (o.slot, o.generation, o.state) == (slot_b, gen_b, state))
    };
    assert!(
        held_by_b(&report, HolderState::Unsure),
        "{:#?}",
        report.locks
    );

    let started = Instant::now();
    let s = status(lun.as_ref(), Some(SETTLE)).expect("status");
    assert!(started.elapsed() < SETTLE + Duration::from_millis(500));
    let row_b = s.slots.iter().find(|r| r.slot == slot_b).expect("b's row");
    assert_eq!(row_b.state, SlotState::Dead, "{row_b:?}");
    assert!(row_b.age_ms >= 1000);
    let report = all_locks(&lun, SETTLE);
    assert!(held_by_b(&report, HolderState::Dead), "{:#?}", report.locks);
    assert!(report.locks.iter().flat_map(named).all(|o| !o.live));

    // A host that mounts recovers B: its slot is freed, what it held is stale.
    let c = mount(&lun, 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(lun.as_ref(), Some(Duration::ZERO)).expect("status");
        let state_b = s.slots.iter().find(|r| r.slot == slot_b).map(|r| r.state);
        if state_b == Some(SlotState::Free) {
            break;
        }
        assert!(Instant::now() < deadline, "b never recovered: {s:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = all_locks(&lun, WATCH);
    for o in report.locks.iter().flat_map(named) {
        if o.slot == slot_b && o.generation == gen_b {
            assert_eq!(o.state, HolderState::Stale);
            assert!(!o.live);
        }
    }
    c.unmount().expect("unmount c");
}

#[test]
fn watch_is_bounded_and_an_idle_volume_answers_at_once() {
    let lun = volume();
    let sb = crate::fs::read_superblock(lun.as_ref()).expect("superblock");
    assert_eq!(watch_window(&sb, None), Duration::from_millis(400));
    assert_eq!(
        watch_window(&sb, Some(Duration::from_secs(60))),
        Duration::from_millis(1600)
    );
    let started = Instant::now();
    let s = status(lun.as_ref(), None).expect("status");
    assert!(s.slots.is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "nothing to wait for"
    );
    assert!(render_status(&s).contains("no host has used this volume"));
    let report = all_locks(&lun, Duration::ZERO);
    assert!(report.locks.is_empty(), "{:#?}", report.locks);
    assert!(render_locks(&report).contains("no lock records held"));
    let json = serde_json::to_value(&s).expect("json");
    assert!(json["volume"]["volume_uuid"].is_string());
    assert!(json["slots"].is_array());
}

/// A sealed structure (magic and CRC right) with every other field random: the
/// tools must judge the fields, not trust them.
fn sealed<T: OnDisk>(rng: &mut rand::rngs::SmallRng, fix: impl Fn(&mut T)) -> T {
    let mut value: T = bytemuck::Zeroable::zeroed();
    rng.fill_bytes(bytemuck::bytes_of_mut(&mut value));
    fix(&mut value);
    value.seal();
    value
}

#[test]
fn no_bytes_make_the_tools_panic() {
    let lun = volume();
    let a = mount(&lun, 1);
    let f = create(&a, a.root(), "f");
    a.sync().expect("sync");
    a.unmount().expect("unmount");
    let sb = crate::fs::read_superblock(lun.as_ref()).expect("superblock");
    let geo = Geometry::from_superblock(&sb);
    let sector = geo.ats_sector_size as usize;
    let targets = [f, sb.root_ino, geo.ag_header(0), geo.ag_header(1)];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x1a75);
    for round in 0..40u64 {
        for slot in 0..geo.max_hosts {
            let image = match round % 3 {
                0 => {
                    let mut raw = vec![0u8; sector];
                    rng.fill_bytes(&mut raw);
                    raw
                }
                1 => encode_padded(
                    &sealed::<HeartbeatSlot>(&mut rng, |h| {
                        h.magic = HeartbeatSlot::MAGIC;
                        h.slot = slot;
                        h.state %= 3;
                    }),
                    sector,
                ),
                _ => vec![0u8; sector],
            };
            lun.write_at(&image, geo.slot_offset(slot))
                .expect("write slot");
            let mut mail = vec![0u8; sector];
            rng.fill_bytes(&mut mail);
            lun.write_at(&mail, geo.mailbox_offset(slot))
                .expect("write mailbox");
        }
        for &resource in &targets {
            let image = if round % 2 == 0 {
                encode_padded(
                    &sealed::<LockRecord>(&mut rng, |r| {
                        r.magic = LockRecord::MAGIC;
                        r.resource = resource;
                        r.mode %= 4;
                    }),
                    sector,
                )
            } else {
                let mut raw = vec![0u8; sector];
                rng.fill_bytes(&mut raw);
                raw
            };
            lun.write_at(&image, geo.lock_offset(resource))
                .expect("write lock");
        }
        let s = status(lun.as_ref(), Some(Duration::ZERO)).expect("status");
        if round % 3 == 0 {
            assert!(
                s.slots.iter().all(|r| r.state == SlotState::Damaged),
                "{s:#?}"
            );
        }
        let query = LockQuery {
            all: true,
            watch: Some(Duration::ZERO),
            ..LockQuery::default()
        };
        let report = locks(lun.as_ref(), &query).expect("locks");
        if round % 2 == 1 {
            let damaged = report
                .locks
                .iter()
                .filter(|r| r.mode == RecordMode::Damaged && r.error.is_some())
                .count();
            assert_eq!(damaged, targets.len(), "{:#?}", report.locks);
        }
        let _ = render_status(&s);
        let _ = render_locks(&report);
        serde_json::to_string(&report).expect("json");
    }
}
