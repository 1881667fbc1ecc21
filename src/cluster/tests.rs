use super::*;
use crate::cluster::go_live;
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
fn a_live_twin_in_another_pid_namespace_is_not_taken_for_dead() {
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
    // The twin runs on this kernel, in a PID namespace of its own: its pid names no
    // process here, yet it is alive and heartbeating.
    let (mut raw, slot) = read_slot(lun.as_ref(), &geo, 0).expect("read");
    let mut slot = slot.expect("slot");
    slot.owner_pid = 0x7fff_fff0;
    slot.owner_pid_ns = 1;
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
    .expect_err("the same host id mounted twice");
    assert!(err.to_string().contains("already mounted"), "{err}");
}

#[test]
fn an_unreadable_or_zero_boot_id_is_an_error_not_zeros() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("boot_id");
    assert!(read_boot_id(&path).is_err(), "missing file");
    std::fs::write(&path, "not a uuid\n").expect("write");
    assert!(read_boot_id(&path).is_err(), "garbage");
    std::fs::write(&path, "00000000-0000-0000-0000-000000000000\n").expect("write");
    assert!(read_boot_id(&path).is_err(), "nil");
    std::fs::write(&path, "4f6a3a8e-3c1b-4b9e-9d8e-0a1b2c3d4e5f\n").expect("write");
    assert_eq!(
        read_boot_id(&path).expect("valid"),
        *uuid::Uuid::parse_str("4f6a3a8e-3c1b-4b9e-9d8e-0a1b2c3d4e5f")
            .expect("uuid")
            .as_bytes()
    );
    assert!(boot_id().is_ok(), "this kernel's boot id");
}

/// A clock that must not be slept on: a claim that takes it never watches a slot.
struct NoWatching;

impl Clock for NoWatching {
    fn now_ms(&self) -> u64 {
        0
    }
    fn sleep(&self, _: Duration) {
        panic!("the claim watched the slot");
    }
}

#[test]
fn a_crashed_daemon_of_this_pid_namespace_is_taken_back_at_once() {
    let (lun, geo) = volume();
    let a = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &NoWatching,
    )
    .expect("a");
    let (mut raw, slot) = read_slot(lun.as_ref(), &geo, 0).expect("read");
    let mut slot = slot.expect("slot");
    slot.owner_pid = 0x7fff_fff0; // gone
    slot.seal();
    raw[..512].copy_from_slice(bytemuck::bytes_of(&slot));
    lun.write_at(&raw, geo.slot_offset(0)).expect("write");
    let again = claim_slot(
        lun.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        &NoWatching,
    )
    .expect("taken back");
    assert_eq!((again.slot, again.after_crash), (a.slot, true));
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
    // Taken back for its own recovery first, with the old generation...
    assert_eq!(
        (again.slot, again.generation, again.after_crash),
        (a.slot, 1, true)
    );
    let (_, slot) = read_slot(lun.as_ref(), &geo, a.slot).expect("read");
    assert_eq!(slot.map(|s| s.state), Some(crate::format::SLOT_RECOVERING));
    // ...and live with a new one once the journal is replayed.
    let live = go_live(lun.as_ref(), &geo, again).expect("go live");
    assert_eq!(live.generation, 2);
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

#[test]
fn a_renewal_that_completes_after_the_lease_ran_out_does_not_bring_it_back() {
    // The renewer checked the lease, issued its renewal, and was held up (a paused
    // host: its read waited, its write went out on resume) until past the lease.
    // Nobody asked the lease meanwhile, so nothing fenced the host yet; the renewal,
    // issued while the lease ran, must not make the host valid again (the simulator's
    // Disk Paxos mode: a host paused past its lease answered a stat on resume).
    let clock = Arc::new(ManualClock::default());
    let lease = Lease::new(
        clock.clone(),
        Duration::from_secs(8),
        Duration::from_secs(1),
    );
    clock.advance(Duration::from_millis(6900));
    let issued = clock.now_ms();
    clock.advance(Duration::from_millis(200)); // past renewal + 7 s
    lease.renewed(issued);
    assert!(lease.check().is_err(), "the lease came back");
    assert!(lease.is_fenced());
}

#[test]
fn a_file_opener_is_judged_stale_only_from_what_the_view_proves() {
    use crate::format::{encode_padded, HeartbeatSlot, SLOT_LIVE};
    let (lun, geo) = volume();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let me = lock::Holder {
        uuid: HostUuid([1; 16]),
        slot: 0,
        generation: 1,
    };
    let node = Node::new(lun.clone(), geo, [0; 16], me, clock, INTERVAL, LEASE);
    let write = |state: u32, generation: u32| {
        let mut slot: HeartbeatSlot = bytemuck::Zeroable::zeroed();
        slot.magic = HeartbeatSlot::MAGIC;
        slot.slot = 2;
        slot.state = state;
        slot.host_uuid = [3; 16];
        slot.generation = generation;
        slot.seal();
        lun.write_at(&encode_padded(&slot, 512), geo.slot_offset(2))
            .expect("write slot");
    };
    // The view saw slot 2 freed at generation 5; its host has mounted again since
    // (generation 6) and opened a file, which the view does not know yet.
    write(SLOT_FREE, 5);
    node.refresh().expect("refresh");
    write(SLOT_LIVE, 6);
    assert!(
        !node.stale16(2, 6),
        "an opener newer than a free slot in the view"
    );
    assert!(node.stale16(2, 5), "an opener of the freed generation");
    assert!(node.stale16(2, 4));
    node.refresh().expect("refresh");
    assert!(!node.stale16(2, 6));
    assert!(!node.stale16(2, 7), "an opener newer than the view");
    assert!(node.stale16(2, 5), "an opener older than the view");
    // Only 16 bits are kept: generation 0x10000 follows 0xffff.
    write(SLOT_LIVE, 0xffff);
    node.refresh().expect("refresh");
    assert!(
        !node.stale16(2, 0),
        "generation 0x10000 is newer than 0xffff"
    );
    assert!(node.stale16(2, 0xfffe));
}

mod locks {
    use super::super::lock::*;
    use super::*;
    use crate::lun::{FaultConfig, FaultLun};

    fn holder(slot: u32, generation: u32) -> Holder {
        Holder {
            uuid: HostUuid([slot as u8 + 1; 16]),
            slot,
            generation,
        }
    }

    const RES: u64 = 2000;
    fn never_stale(_: u32, _: u32) -> bool {
        false
    }

    fn acquire(lun: &dyn Lun, geo: &Geometry, me: &Holder, mode: LockMode) -> Acquire {
        let mut state = read_lock(lun, geo, RES).expect("read");
        for _ in 0..10 {
            match try_acquire(lun, geo, &state, me, mode, &never_stale).expect("acquire") {
                Ok(outcome) => return outcome,
                Err(now) => state = now,
            }
        }
        panic!("no progress");
    }

    #[test]
    fn exclusive_excludes_and_release_frees() {
        let (lun, geo) = volume();
        let (a, b) = (holder(0, 1), holder(1, 1));
        let Acquire::Got(held) = acquire(lun.as_ref(), &geo, &a, LockMode::Exclusive) else {
            panic!("a should get a free lock")
        };
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &b, LockMode::Exclusive),
            Acquire::Held(_)
        ));
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &b, LockMode::Shared),
            Acquire::Held(_)
        ));
        let seq = held.record.change_seq;
        let freed = try_release(lun.as_ref(), &geo, &held, &a)
            .expect("release")
            .expect("ours");
        assert!(freed.is_free());
        assert_eq!(freed.record.change_seq, seq + 1);
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &b, LockMode::Exclusive),
            Acquire::Got(_)
        ));
    }

    #[test]
    fn shared_holders_coexist_and_block_writers() {
        let (lun, geo) = volume();
        let (a, b, c) = (holder(0, 1), holder(1, 1), holder(2, 1));
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &a, LockMode::Shared),
            Acquire::Got(_)
        ));
        let Acquire::Got(both) = acquire(lun.as_ref(), &geo, &b, LockMode::Shared) else {
            panic!("second reader")
        };
        assert_eq!(both.holders(), vec![(0, 1), (1, 1)]);
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &c, LockMode::Exclusive),
            Acquire::Held(_)
        ));
        let after_b = try_release(lun.as_ref(), &geo, &both, &b)
            .expect("release")
            .expect("ours");
        assert_eq!(after_b.holders(), vec![(0, 1)]);
        // The only reader upgrades.
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &a, LockMode::Exclusive),
            Acquire::Got(_)
        ));
    }

    #[test]
    fn a_stale_holder_is_ignored_only_when_the_caller_says_so() {
        let (lun, geo) = volume();
        let (a, b) = (holder(0, 1), holder(1, 1));
        assert!(matches!(
            acquire(lun.as_ref(), &geo, &a, LockMode::Exclusive),
            Acquire::Got(_)
        ));
        let state = read_lock(lun.as_ref(), &geo, RES).expect("read");
        let stale = |slot: u32, generation: u32| slot == 0 && generation == 1;
        let outcome =
            try_acquire(lun.as_ref(), &geo, &state, &b, LockMode::Exclusive, &stale).expect("io");
        assert!(matches!(outcome, Ok(Acquire::Got(ref s)) if s.holders() == vec![(1, 1)]));
    }

    #[test]
    fn racing_hosts_never_both_hold_an_exclusive_lock() {
        let (lun, geo) = volume();
        let wins = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|scope| {
            for slot in 0..4u32 {
                let (lun, geo, wins) = (lun.clone(), geo, &wins);
                scope.spawn(move || {
                    if let Acquire::Got(_) =
                        acquire(lun.as_ref(), &geo, &holder(slot, 1), LockMode::Exclusive)
                    {
                        wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(wins.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_lost_reply_is_recognised_as_our_own_write() {
        let (mem, geo) = volume();
        let config = FaultConfig {
            seed: 7,
            lost_reply_prob: 1.0,
            ..FaultConfig::default()
        };
        let lun = FaultLun::new(mem, config);
        let a = holder(0, 1);
        let state = read_lock(&lun, &geo, RES).expect("read");
        let outcome = try_acquire(&lun, &geo, &state, &a, LockMode::Exclusive, &never_stale)
            .expect("lost reply handled");
        assert!(matches!(outcome, Ok(Acquire::Got(_))));
        let now = read_lock(&lun, &geo, RES).expect("read");
        assert!(now.held_by(&a));
    }
}

/// The lease is measured on CLOCK_BOOTTIME, which keeps counting while the machine is
/// suspended (CLOCK_MONOTONIC stops, so a host waking up would believe its lease still
/// ran). A suspend cannot be staged in a test; this pins the choice.
#[test]
fn the_system_clock_counts_time_spent_suspended() {
    assert_eq!(SystemClock::CLOCK_ID, libc::CLOCK_BOOTTIME);
    let clock = SystemClock::default();
    let before = clock.now_ms();
    std::thread::sleep(Duration::from_millis(30));
    assert!(clock.now_ms() >= before + 30);
}

/// A LUN whose compare-and-write takes `delay` on a manual clock: a slow claim.
struct SlowCaw {
    inner: Arc<MemLun>,
    clock: Arc<ManualClock>,
    delay: Duration,
}

impl Lun for SlowCaw {
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
        // The write lands at once; only its reply is slow.
        let outcome = self.inner.compare_and_write(offset, expected, new);
        self.clock.advance(self.delay);
        outcome
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "slow compare-and-write".into()
    }
}

#[test]
fn a_lease_runs_from_when_its_claim_was_issued() {
    let (mem, geo) = volume();
    let clock = Arc::new(ManualClock::default());
    let lun = SlowCaw {
        inner: mem,
        clock: clock.clone(),
        delay: Duration::from_millis(150),
    };
    let claim = claim_slot(
        &lun,
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        clock.as_ref(),
    )
    .expect("claim");
    let lease = Lease::for_claim(clock.clone(), &claim, LEASE, INTERVAL);
    // The claim was issued 150 ms ago; the lease (200 - 20 ms) has 30 ms left.
    assert!(lease.check().is_ok());
    clock.advance(Duration::from_millis(30));
    assert!(
        lease.check().is_err(),
        "the lease ran from the claim's reply, not from its issue"
    );
}

/// A clock that stands still unless told (a paused VM's clock can resume as if no
/// time had passed) but whose sleeps take real time, so a heartbeat thread runs.
#[derive(Default)]
struct FrozenClock {
    now_ms: std::sync::atomic::AtomicU64,
}

impl Clock for FrozenClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

#[test]
fn a_late_renewal_makes_the_host_reread_its_slot_before_writing() {
    use crate::lun::{FaultConfig, FaultLun};
    let (mem, geo) = volume();
    let clock = Arc::new(FrozenClock::default());
    let claim = claim_slot(
        mem.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        clock.as_ref(),
    )
    .expect("claim");
    let lease = Arc::new(Lease::for_claim(clock.clone(), &claim, LEASE, INTERVAL));
    // The heartbeat's path to the LUN is down: no renewal lands.
    let dead_path: Arc<dyn Lun> = Arc::new(FaultLun::new(
        mem.clone(),
        FaultConfig {
            eio_write_prob: 1.0,
            ..FaultConfig::default()
        },
    ));
    let _member = Membership::start(dead_path, &geo, claim, lease.clone(), INTERVAL);
    let guarded = GuardedLun::new(mem.clone(), lease.clone());
    guarded
        .write_at(&[0u8; 512], 0)
        .expect("a fresh lease writes");
    // One interval without a renewal: the lease still runs by our clock, but another
    // host (whose clock did not stand still) declared us dead and took the slot.
    clock.now_ms.store(
        INTERVAL.as_millis() as u64 + 1,
        std::sync::atomic::Ordering::SeqCst,
    );
    let (raw, slot) = read_slot(mem.as_ref(), &geo, 0).expect("read");
    let mut slot = slot.expect("slot");
    slot.state = crate::format::SLOT_RECOVERING;
    slot.recoverer_uuid = [2; 16];
    slot.recoverer_slot = 1;
    slot.seal();
    let mut image = raw.clone();
    image[..512].copy_from_slice(bytemuck::bytes_of(&slot));
    mem.write_at(&image, geo.slot_offset(0)).expect("takeover");
    assert!(lease.check().is_ok(), "by its clock the lease still runs");
    assert!(matches!(
        guarded.write_at(&[0u8; 512], 0),
        Err(LunError::Fenced(_))
    ));
    assert!(matches!(guarded.flush(), Err(LunError::Fenced(_))));
}

#[test]
fn a_slot_release_whose_reply_is_lost_still_frees_the_slot() {
    use crate::lun::{FaultConfig, FaultLun};
    let (mem, geo) = volume();
    let lossy: Arc<dyn Lun> = Arc::new(FaultLun::new(
        mem.clone(),
        FaultConfig {
            seed: 3,
            lost_reply_prob: 1.0,
            ..FaultConfig::default()
        },
    ));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::default());
    let claim = claim_slot(
        lossy.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        clock.as_ref(),
    )
    .expect("a claim whose reply is lost");
    let lease = Arc::new(Lease::for_claim(clock, &claim, LEASE, INTERVAL));
    let member = Membership::start(lossy, &geo, claim, lease, INTERVAL);
    member.release().expect("a release whose reply is lost");
    let (_, slot) = read_slot(mem.as_ref(), &geo, 0).expect("read");
    assert_eq!(slot.map(|s| s.state), Some(SLOT_FREE));
}

/// A LUN whose storage refuses every write: our reservation key was removed.
struct Preempted {
    inner: Arc<MemLun>,
}

impl Lun for Preempted {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> LunResult<()> {
        Err(crate::lun::LunError::Fenced("RESERVATION CONFLICT".into()))
    }
    fn compare_and_write(&self, _offset: u64, _expected: &[u8], _new: &[u8]) -> LunResult<Caw> {
        Err(crate::lun::LunError::Fenced("RESERVATION CONFLICT".into()))
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "preempted initiator".into()
    }
}

#[test]
fn a_write_the_storage_refuses_as_a_reservation_conflict_fences_the_host() {
    let (mem, geo) = volume();
    let clock = Arc::new(ManualClock::default());
    let claim = claim_slot(
        mem.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        clock.as_ref(),
    )
    .expect("claim");
    let lease = Arc::new(Lease::for_claim(clock.clone(), &claim, LEASE, INTERVAL));
    let guarded = GuardedLun::new(Arc::new(Preempted { inner: mem.clone() }), lease.clone());
    let sector = vec![0u8; geo.ats_sector_size as usize];
    let offset = geo.ats_sector_size as u64 * 64;
    // Well inside the lease: only the storage says no.
    assert!(lease.check().is_ok());
    assert!(guarded.write_at(&sector, offset).is_err());
    assert!(
        lease.is_fenced(),
        "a host the storage fenced must stop writing, whatever its lease says"
    );
    // From now on it does not even reach the storage: the lease refuses.
    let healthy = GuardedLun::new(mem.clone(), lease.clone());
    assert!(matches!(
        healthy.write_at(&sector, offset),
        Err(crate::lun::LunError::Fenced(_))
    ));
}

/// A LUN whose next compare-and-write reports a miscompare that names the expected
/// image itself, and changes nothing (a device fault).
struct FalseMiscompare {
    inner: Arc<MemLun>,
    armed: std::sync::atomic::AtomicBool,
}

impl Lun for FalseMiscompare {
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
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(Caw::Miscompare(expected.to_vec()));
        }
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "false miscompare".into()
    }
}

#[test]
fn a_heartbeat_miscompare_that_names_our_own_image_is_retried_not_taken_for_death() {
    let (mem, geo) = volume();
    let clock = Arc::new(ManualClock::default());
    let claim = claim_slot(
        mem.as_ref(),
        &geo,
        HostUuid([1; 16]),
        INTERVAL,
        LEASE,
        clock.as_ref(),
    )
    .expect("claim");
    let offset = geo.slot_offset(claim.slot);
    let mut current = vec![0u8; geo.ats_sector_size as usize];
    mem.read_at(&mut current, offset).expect("read");
    let lun = FalseMiscompare {
        inner: mem.clone(),
        armed: std::sync::atomic::AtomicBool::new(true),
    };
    let first = super::heartbeat::renew_image(&lun, offset, geo.ats_sector_size, &current);
    assert!(
        first.is_err(),
        "a miscompare naming our own image was taken as our death"
    );
    match super::heartbeat::renew_image(&lun, offset, geo.ats_sector_size, &current) {
        Ok(super::heartbeat::Renewal::Renewed(_)) => {}
        _ => panic!("the retry did not renew"),
    }
}
