//! The iSCSI LUN backend against a real target: each test starts tgtd from the test
//! bed (`cargo xtask tgt build`: COMPARE AND WRITE enabled, one I/O thread per LUN)
//! on a fresh image of its own, on a free port, and stops it at the end. Without a tgt
//! build the tests skip with a message, except under CI, where that is a failure.
//! Needs libiscsi7 and root (tgtd).

mod common;

use atsfs::lun::{
    open_device, AtsKind, Caw, IscsiTransport, Lun, LunError, OpenMode, ReservationKey,
    ReservationType, ScsiLun,
};
use common::tgt;
use common::Scratch;
use std::path::Path;
use std::sync::Arc;

/// A target of one test: tgtd serving a 16 MiB image as LUN 1.
struct Bed {
    url: String,
    bins: common::testbed::TgtBinaries,
    target: common::testbed::Target,
    _scratch: Scratch,
}

/// Starts a target for `test`, or None (after `require_tgt!`'s message) without a
/// tgt build.
fn bed(test: &str) -> Option<Bed> {
    let bins = tgt::binaries_or_skip()?;
    let scratch = Scratch::new(test);
    let image = scratch.join("lun.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("making the image");
    let target = tgt::serve(&bins, &scratch, &image);
    Some(Bed {
        url: target.url(),
        bins,
        target,
        _scratch: scratch,
    })
}

fn open(url: &str) -> Arc<dyn Lun> {
    open_device(Path::new(url), OpenMode::ReadWrite).expect("opening the iSCSI LUN")
}

/// Leaves the LUN without registrations or reservation (an earlier run may have
/// stopped half way).
fn clear_reservations(lun: &dyn Lun) {
    let pr = lun.reservations().expect("an iSCSI LUN has reservations");
    let own = ReservationKey(0xC1EA);
    pr.register(own).unwrap();
    for key in pr.read_keys().unwrap() {
        if key != own {
            pr.preempt(own, key, false).unwrap();
        }
    }
    pr.unregister().unwrap();
    assert!(pr.read_keys().unwrap().is_empty());
    assert_eq!(pr.read_reservation().unwrap(), None);
}

#[test]
fn reads_and_writes_round_trip() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    let lun = open(&url);
    clear_reservations(&*lun);
    assert!(
        lun.describe().starts_with("iSCSI LUN iscsi://"),
        "{}",
        lun.describe()
    );
    assert!(lun.len_bytes() >= 4 * 1024 * 1024);
    let sector = lun.sector_size() as usize;
    eprintln!(
        "{}: sector {sector}, {} bytes",
        lun.describe(),
        lun.len_bytes()
    );
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 4096u32)
        .map(|i| (i % 249) as u8)
        .collect();
    lun.write_at(&data, 1024 * 1024).unwrap();
    lun.flush().unwrap();
    let other = open(&url);
    let mut back = vec![0u8; data.len()];
    other.read_at(&mut back, 1024 * 1024).unwrap();
    assert_eq!(back, data);
    let mut part = vec![0u8; 777];
    other.read_at(&mut part, 1024 * 1024 + 3).unwrap();
    assert_eq!(part, data[3..780]);
    let err = lun.write_at(&data[..100], 0).unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    let ro = open_device(Path::new(&url), OpenMode::ReadOnly).unwrap();
    assert!(ro.write_at(&data[..512], 0).is_err());
}

#[test]
fn compare_and_write_or_a_clear_error() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    let lun = open(&url);
    clear_reservations(&*lun);
    assert_eq!(lun.ats_kind(), AtsKind::Hardware);
    let sector = lun.sector_size() as usize;
    let offset = 64 * 1024;
    let old = vec![0x11u8; sector];
    let new = vec![0x22u8; sector];
    lun.write_at(&old, offset).unwrap();
    match lun.compare_and_write(offset, &old, &new) {
        Ok(Caw::Written) => {
            let mut back = vec![0u8; sector];
            lun.read_at(&mut back, offset).unwrap();
            assert_eq!(back, new);
            // A stale expected image: nothing changes, the actual sector comes back.
            let other = open(&url);
            assert_eq!(
                other.compare_and_write(offset, &old, &old).unwrap(),
                Caw::Miscompare(new.clone())
            );
            let mut mixed = new.clone();
            mixed[sector / 2] = 0;
            assert_eq!(
                other.compare_and_write(offset, &mixed, &old).unwrap(),
                Caw::Miscompare(new.clone())
            );
            eprintln!("hardware COMPARE AND WRITE works");
        }
        Err(err @ LunError::NoCompareAndWrite { .. }) => {
            let text = err.to_string();
            assert!(text.contains("COMPARE AND WRITE"), "{text}");
            assert!(text.contains("Disk Paxos"), "{text}");
            eprintln!("the target has no COMPARE AND WRITE: {text}");
        }
        other => panic!("compare-and-write: {other:?}"),
    }
}

#[test]
fn preempting_a_host_fences_its_writes() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    let survivor = open(&url);
    let victim = open(&url);
    clear_reservations(&*survivor);
    let (ks, kv) = (ReservationKey(0x5151), ReservationKey(0x7171));
    let (ps, pv) = (
        survivor.reservations().unwrap(),
        victim.reservations().unwrap(),
    );
    let caps = ps.capabilities().unwrap();
    eprintln!("reservation capabilities: {caps:?}");
    ps.register(ks).unwrap();
    pv.register(kv).unwrap();
    ps.reserve(ks).unwrap();
    pv.reserve(kv).unwrap();
    let res = ps.read_reservation().unwrap().unwrap();
    assert_eq!(res.kind, ReservationType::WriteExclusiveRegistrantsOnly);
    assert_eq!(res.key, ks);
    let block = vec![0x33u8; survivor.sector_size() as usize];
    victim.write_at(&block, 0).unwrap();
    victim.flush().unwrap();

    ps.preempt(ks, kv, true).unwrap();
    assert_eq!(ps.read_keys().unwrap(), vec![ks]);
    let err = victim.write_at(&block, 0).unwrap_err();
    let LunError::Fenced(why) = &err else {
        panic!("expected Fenced, got {err}");
    };
    assert!(why.contains("reservation key was removed"), "{why}");
    let sector = victim.sector_size() as usize;
    let caw = victim.compare_and_write(0, &block[..sector], &vec![0u8; sector]);
    assert!(
        matches!(
            caw,
            Err(LunError::Fenced(_)) | Err(LunError::NoCompareAndWrite { .. })
        ),
        "{caw:?}"
    );
    // Reads stay allowed; the survivor still writes.
    let mut back = vec![0u8; block.len()];
    victim.read_at(&mut back, 0).unwrap();
    survivor.write_at(&block, 0).unwrap();
    // Preempting again is a no-op; the fenced host cannot preempt back.
    ps.preempt(ks, kv, false).unwrap();
    assert!(matches!(
        pv.preempt(kv, ks, false).unwrap_err(),
        LunError::Fenced(_)
    ));
    ps.release(ks).unwrap();
    assert_eq!(ps.read_reservation().unwrap(), None);
    ps.unregister().unwrap();
    assert!(ps.read_keys().unwrap().is_empty());
}

#[test]
fn two_opens_are_two_initiators() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    let a = open(&url);
    let b = open(&url);
    clear_reservations(&*a);
    let (pa, pb) = (a.reservations().unwrap(), b.reservations().unwrap());
    pa.register(ReservationKey(1)).unwrap();
    pb.register(ReservationKey(2)).unwrap();
    let mut keys = pa.read_keys().unwrap();
    keys.sort();
    assert_eq!(keys, vec![ReservationKey(1), ReservationKey(2)]);
    // One initiator re-registering replaces only its own key.
    pa.register(ReservationKey(3)).unwrap();
    let mut keys = pb.read_keys().unwrap();
    keys.sort();
    assert_eq!(keys, vec![ReservationKey(2), ReservationKey(3)]);
    pa.unregister().unwrap();
    pb.unregister().unwrap();
    assert!(pa.read_keys().unwrap().is_empty());
}

#[test]
fn a_bad_url_or_target_gives_a_clear_error() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    let err = open_device(
        Path::new("iscsi://127.0.0.1:1/iqn.x:y/1"),
        OpenMode::ReadOnly,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("login to iqn.x:y LUN 1"), "{err}");
    let err = open_device(Path::new("iscsi://nohost"), OpenMode::ReadOnly)
        .err()
        .unwrap();
    assert!(err.to_string().contains("iscsi://"), "{err}");
    let _ = url;
}

/// Adds one to the counter in the first 8 bytes of the sector at `offset`, by read
/// and compare-and-write until one succeeds. False when the LUN has no CAW.
fn increment(lun: &dyn Lun, offset: u64) -> bool {
    let sector = lun.sector_size() as usize;
    let mut expected = vec![0u8; sector];
    lun.read_at(&mut expected, offset).unwrap();
    for _ in 0..100_000 {
        let count = u64::from_le_bytes(expected[..8].try_into().unwrap());
        let mut new = expected.clone();
        new[..8].copy_from_slice(&(count + 1).to_le_bytes());
        match lun.compare_and_write(offset, &expected, &new) {
            Ok(Caw::Written) => return true,
            Ok(Caw::Miscompare(actual)) => expected = actual,
            Err(LunError::NoCompareAndWrite { .. }) => return false,
            Err(e) => panic!("compare-and-write: {e}"),
        }
    }
    panic!("no increment within the retry bound");
}

#[test]
fn compare_and_write_is_atomic_between_initiators() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    const THREADS: usize = 4;
    const INCREMENTS: u64 = 100;
    let first = open(&url);
    clear_reservations(&*first);
    let offset = 128 * 1024;
    first
        .write_at(&vec![0u8; first.sector_size() as usize], offset)
        .unwrap();
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let lun = open(&url);
            std::thread::spawn(move || (0..INCREMENTS).all(|_| increment(&*lun, offset)))
        })
        .collect();
    let all: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    if all.iter().any(|ok| !ok) {
        eprintln!("skipped: the target has no COMPARE AND WRITE");
        return;
    }
    let mut back = vec![0u8; first.sector_size() as usize];
    first.read_at(&mut back, offset).unwrap();
    let count = u64::from_le_bytes(back[..8].try_into().unwrap());
    assert_eq!(count, THREADS as u64 * INCREMENTS);
}

/// The I_T nexus (tgt's session id) of `initiator`, from `tgtadm --op show`.
fn tgt_session_of(bed: &Bed, initiator: &str) -> Option<String> {
    let text = bed
        .target
        .tgtadm(&bed.bins, &["--op", "show", "--mode", "target"], false)
        .ok()?;
    let mut nexus = None;
    for line in text.lines().map(str::trim) {
        if let Some(id) = line.strip_prefix("I_T nexus: ") {
            nexus = Some(id.to_string());
        }
        if line
            .strip_prefix("Initiator: ")
            .is_some_and(|l| l.starts_with(initiator))
        {
            return nexus;
        }
    }
    None
}

/// Drops this open's connection on the target (tgtadm) and checks that the next
/// command reconnects.
#[test]
fn a_dropped_connection_is_reconnected() {
    let Some(bed) = bed(module_path!()) else {
        return;
    };
    let url = bed.url.clone();
    let lun = ScsiLun::open(IscsiTransport::connect(&url).unwrap(), OpenMode::ReadWrite).unwrap();
    clear_reservations(&lun);
    let pr = lun.reservations().unwrap();
    pr.register(ReservationKey(0xD0)).unwrap();
    let block = vec![0x44u8; lun.sector_size() as usize];
    lun.write_at(&block, 0).unwrap();
    let initiator = lun.transport().initiator();
    let sid = tgt_session_of(&bed, &initiator).expect("our session on the target");
    bed.target
        .tgtadm(
            &bed.bins,
            &[
                "--op", "delete", "--mode", "conn", "--tid", "1", "--sid", &sid, "--cid", "0",
            ],
            false,
        )
        .expect("dropping our connection with tgtadm");
    // The next command finds the connection gone, logs in again, and runs.
    let block2 = vec![0x45u8; lun.sector_size() as usize];
    lun.write_at(&block2, 0).unwrap();
    let mut back = vec![0u8; block2.len()];
    lun.read_at(&mut back, 0).unwrap();
    assert_eq!(back, block2);
    let after = tgt_session_of(&bed, &initiator).expect("our new session");
    assert_ne!(sid, after);
    // With the same initiator name and ISID a compliant target sees the same
    // initiator port, and the registration is still this session's. tgt makes a new
    // I_T nexus per session: the key stays listed (the dead nexus's), but this
    // session is not registered, so a reservation would now refuse its writes:
    // fenced, which is the safe side.
    assert_eq!(pr.read_keys().unwrap(), vec![ReservationKey(0xD0)]);
    match pr.reserve(ReservationKey(0xD0)) {
        Ok(()) => eprintln!("the registration survived the reconnect"),
        Err(LunError::Fenced(why)) => eprintln!("the reconnect lost the registration: {why}"),
        Err(other) => panic!("reserve after the reconnect: {other}"),
    }
    pr.unregister().unwrap();
    clear_reservations(&lun);
}
