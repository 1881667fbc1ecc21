use super::*;
use crate::format::{Geometry, MkfsParams, OnDisk, SLOT_FREE};
use crate::lun::MemLun;

fn volume() -> (Arc<MemLun>, Geometry) {
    let params = MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: 512,
        max_hosts: 4,
        journal_blocks: Some(256),
    };
    let geo = Geometry::plan(&params).expect("plan");
    (Arc::new(MemLun::new(params.total_bytes, 512)), geo)
}

const INTERVAL: Duration = Duration::from_millis(20);
const LEASE: Duration = Duration::from_millis(200);

#[test]
fn hosts_get_distinct_slots_and_a_released_slot_comes_back_with_a_new_generation() {
    let (lun, geo) = volume();
    let clock = SystemClock::default();
    let a = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("a");
    let b = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([2; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("b");
    assert_eq!((a.slot, a.generation, a.after_crash), (0, 1, false));
    assert_eq!((b.slot, b.generation), (1, 1));
    let lease = Arc::new(Lease::new(
        Arc::new(SystemClock::default()),
        LEASE,
        INTERVAL,
    ));
    let member = Membership::start(lun.clone(), &geo, a, lease, INTERVAL);
    member.release().expect("release");
    let (_, slot) = read_slot(lun.as_ref(), &geo, 0).expect("read");
    assert_eq!(slot.map(|s| s.state), Some(SLOT_FREE));
    let again = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("again");
    assert_eq!(
        (again.slot, again.generation, again.after_crash),
        (0, 2, false)
    );
}

#[test]
fn a_live_host_uuid_cannot_mount_twice() {
    let (lun, geo) = volume();
    let clock = SystemClock::default();
    let a = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("a");
    // Pretend the owner runs on another kernel so the pid shortcut does not apply.
    let (mut raw, slot) = read_slot(lun.as_ref(), &geo, 0).expect("read");
    let mut slot = slot.expect("slot");
    slot.boot_id = [0xee; 16];
    slot.seal();
    raw[..512].copy_from_slice(bytemuck::bytes_of(&slot));
    lun.write_at(&raw, geo.slot_offset(0)).expect("write");
    let claim = SlotClaim { image: raw, ..a };
    let lease = Arc::new(Lease::new(
        Arc::new(SystemClock::default()),
        LEASE,
        INTERVAL,
    ));
    let _member = Membership::start(lun.clone(), &geo, claim, lease.clone(), INTERVAL);
    let err = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect_err("twice");
    assert!(err.to_string().contains("already mounted"), "{err}");
    assert!(!lease.is_fenced());
}

#[test]
fn a_crashed_hosts_slot_is_taken_back_after_the_lease() {
    let (lun, geo) = volume();
    let clock = SystemClock::default();
    let a = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("a");
    // The "crash": the slot stays live and nobody renews it. Same kernel, but the pid
    // is ours and alive, so the claim must watch the slot for the lease.
    let again = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("again");
    assert_eq!(
        (again.slot, again.generation, again.after_crash),
        (a.slot, 2, true)
    );
}

#[test]
fn a_host_whose_slot_was_taken_over_fences_itself() {
    let (lun, geo) = volume();
    let clock = SystemClock::default();
    let a = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &clock,
    )
    .expect("a");
    let lease = Arc::new(Lease::new(
        Arc::new(SystemClock::default()),
        LEASE,
        INTERVAL,
    ));
    let _member = Membership::start(lun.clone(), &geo, a, lease.clone(), INTERVAL);
    // Another host declares us dead and rewrites the slot.
    let (raw, slot) = read_slot(lun.as_ref(), &geo, 0).expect("read");
    let mut slot = slot.expect("slot");
    slot.generation += 7;
    slot.seal();
    let mut image = raw.clone();
    image[..512].copy_from_slice(bytemuck::bytes_of(&slot));
    lun.write_at(&image, geo.slot_offset(0)).expect("takeover");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !lease.is_fenced() && std::time::Instant::now() < deadline {
        std::thread::sleep(INTERVAL);
    }
    assert!(lease.is_fenced());
    let guarded = GuardedLun::new(lun.clone(), lease);
    assert!(matches!(
        guarded.write_at(&[0u8; 512], 0),
        Err(LunError::Fenced(_))
    ));
}

#[test]
fn the_lease_expires_by_the_hosts_own_clock() {
    let clock = Arc::new(ManualClock::default());
    let lease = Lease::new(
        clock.clone(),
        Duration::from_secs(8),
        Duration::from_secs(1),
    );
    assert!(lease.check().is_ok());
    clock.advance(Duration::from_millis(6999));
    assert!(lease.check().is_ok());
    lease.renewed(clock.now_ms());
    clock.advance(Duration::from_millis(6999));
    assert!(lease.check().is_ok());
    clock.advance(Duration::from_millis(1));
    assert!(lease.check().is_err());
    // Fenced for good: a later renewal does not bring the lease back.
    lease.renewed(clock.now_ms());
    assert!(lease.check().is_err());
}
