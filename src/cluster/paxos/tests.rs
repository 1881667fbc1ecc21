//! Tests of the Disk Paxos token: ballots stepped one I/O at a time (paused,
//! interleaved, read a sector at a time), a seeded scheduler of racing proposers, and
//! `PaxosLun` hosts racing compare-and-write increments.

use super::*;
use crate::cluster::{ManualClock, SystemClock};
use crate::format::{MkfsParams, Superblock};
use crate::lun::{FaultConfig, FaultLun, MemLun};
use crate::mkfs::{mkfs, MkfsOptions};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

const SECTOR: u32 = 512;

/// A fresh Disk Paxos region for `hosts` slots on an in-memory LUN.
fn region(hosts: u32) -> (Arc<MemLun>, PaxosRegion) {
    let geo = Geometry::plan(&MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: SECTOR,
        max_hosts: hosts,
        journal_blocks: Some(256),
        disk_paxos: true,
    })
    .expect("plan");
    let lun = Arc::new(MemLun::new(64 << 20, SECTOR));
    let region = PaxosRegion::of(&geo).expect("region");
    let none = Owner {
        slot: PAXOS_NO_OWNER,
        generation: 0,
    };
    write_leader(
        lun.as_ref(),
        &region,
        0,
        none,
        PAXOS_LEADER_RELEASED,
        PAXOS_NO_OWNER,
    )
    .expect("leader");
    (lun, region)
}

fn owner(slot: u32) -> Owner {
    Owner {
        slot,
        generation: 1,
    }
}

fn proposer(lun: &dyn Lun, region: PaxosRegion, slot: u32) -> Proposer {
    let view = read_region(lun, &region).expect("view");
    Proposer::new(region, owner(slot), &view)
}

/// Steps `p` until it has done `steps` I/Os or ended.
fn steps(p: &mut Proposer, lun: &dyn Lun, steps: usize) -> Option<Outcome> {
    for _ in 0..steps {
        if let Some(outcome) = p.step(lun, 0).expect("step") {
            return Some(outcome);
        }
    }
    p.outcome()
}

fn finish(p: &mut Proposer, lun: &dyn Lun) -> Outcome {
    steps(p, lun, 100).expect("a ballot ends")
}

#[test]
fn mkfs_lays_out_a_region_that_reads_as_free() {
    let lun = MemLun::new(128 << 20, SECTOR);
    let opts = MkfsOptions {
        max_hosts: 64,
        journal_bytes: Some(1 << 20),
        ats_mode: crate::format::ATS_MODE_DISK_PAXOS,
        ..MkfsOptions::default()
    };
    let geo = mkfs(&lun, &opts, &mut |_, _| {}).expect("mkfs");
    let sb = Superblock::decode(&lun.snapshot()[..512], 0).expect("superblock");
    assert_eq!(sb.paxos_start, geo.paxos_start);
    assert_eq!(sb.paxos_token_ms, 2000);
    assert_eq!(geo.paxos_blocks(), 9);
    let region = PaxosRegion::of(&geo).expect("region");
    let view = read_region(&lun, &region).expect("view");
    assert_eq!(view.holder(), None);
    assert_eq!(view.leader.lver, 0);
    assert!(view.dblocks.iter().all(Option::is_none));
    assert_eq!(view.instance_to_decide(), 1);
}

#[test]
fn one_proposer_decides_itself_in_two_reads_and_three_writes_after_its_first_read() {
    let (mem, region) = region(4);
    let lun = FaultLun::new(mem.clone(), FaultConfig::default());
    let mut p = proposer(mem.as_ref(), region, 2);
    let outcome = finish(&mut p, &lun);
    assert_eq!(
        outcome,
        Outcome::Decided {
            lver: 1,
            owner: owner(2)
        }
    );
    let stats = lun.stats();
    assert_eq!((stats.reads, stats.writes), (2, 3), "{stats:?}");
    let view = read_region(mem.as_ref(), &region).expect("view");
    assert_eq!(view.holder(), Some(owner(2)));
    assert_eq!(view.leader.lver, 1);
    assert_eq!(view.instance_to_decide(), 2);
}

#[test]
fn a_later_ballot_adopts_the_value_already_decided() {
    // B read the region before A started, and is paused. A decides itself, but
    // pauses before it publishes the leader. B then runs: its phase 1 must find A's
    // accepted value and decide A again, never itself.
    let (lun, region) = region(3);
    let mut b = proposer(lun.as_ref(), region, 1);
    let mut a = proposer(lun.as_ref(), region, 0);
    assert_eq!(steps(&mut a, lun.as_ref(), 4), None); // up to phase 2's read
    assert_eq!(a.stage, Stage::Publish);
    let decided = finish(&mut b, lun.as_ref());
    assert_eq!(
        decided,
        Outcome::Decided {
            lver: 1,
            owner: owner(0)
        }
    );
    // A's own leader write, late, says the same.
    assert_eq!(finish(&mut a, lun.as_ref()), decided);
}

#[test]
fn a_proposer_paused_between_its_phases_loses_to_a_higher_ballot() {
    let (lun, region) = region(3);
    let mut a = proposer(lun.as_ref(), region, 0);
    assert_eq!(steps(&mut a, lun.as_ref(), 2), None); // phase 1 done
    assert_eq!(a.stage, Stage::Accept);
    // A is paused; B starts later (a higher ballot) and decides itself.
    let mut b = proposer(lun.as_ref(), region, 1);
    assert_eq!(
        finish(&mut b, lun.as_ref()),
        Outcome::Decided {
            lver: 1,
            owner: owner(1)
        }
    );
    // A wakes up: its phase 2 must see B's ballot and stop.
    assert_eq!(
        finish(&mut a, lun.as_ref()),
        Outcome::Aborted(Abort::HigherBallot)
    );
    let view = read_region(lun.as_ref(), &region).expect("view");
    assert_eq!(view.holder(), Some(owner(1)));
}

#[test]
fn a_dblock_of_a_later_instance_stops_an_old_ballot() {
    let (lun, region) = region(3);
    let mut stale = proposer(lun.as_ref(), region, 2);
    let mut a = proposer(lun.as_ref(), region, 0);
    finish(&mut a, lun.as_ref());
    let mut b = proposer(lun.as_ref(), region, 1);
    assert_eq!(b.lver(), 2);
    finish(&mut b, lun.as_ref());
    assert_eq!(stale.lver(), 1);
    assert_eq!(
        finish(&mut stale, lun.as_ref()),
        Outcome::Aborted(Abort::NewerInstance)
    );
}

#[test]
fn a_late_leader_write_does_not_undo_a_decision() {
    // A decided instance 1, B instance 2, A instance 3; then A's leader write for
    // instance 1 lands late, over the newest. The next taker must finish instance 3
    // (and learn A), not start instance 2 again from the stale leader (B's dblock
    // there would stop it for good: NewerInstance, forever).
    let (lun, region) = region(3);
    for slot in [0, 1, 0] {
        let mut p = proposer(lun.as_ref(), region, slot);
        finish(&mut p, lun.as_ref());
    }
    write_leader(lun.as_ref(), &region, 1, owner(0), 0, 0).expect("late write");
    let mut c = proposer(lun.as_ref(), region, 2);
    assert_eq!(c.lver(), 3);
    assert_eq!(
        finish(&mut c, lun.as_ref()),
        Outcome::Decided {
            lver: 3,
            owner: owner(0)
        }
    );
}

#[test]
fn a_region_that_does_not_decode_stops_the_ballot() {
    let (lun, region) = region(3);
    lun.write_at(&[0xa5u8; SECTOR as usize], region.dblock_offset(1))
        .expect("write");
    let err = read_region(lun.as_ref(), &region).unwrap_err();
    assert!(err.to_string().contains("dblock"), "{err}");
}

// ---------------------------------------------------------------------------------
// A seeded scheduler: proposers race one I/O at a time, reading the region a sector
// at a time; some stop for good mid-ballot (crashed or paused forever). Every
// instance must be decided for one owner only.
// ---------------------------------------------------------------------------------

struct Agent {
    slot: u32,
    proposer: Option<Proposer>,
    ballots_left: u32,
    /// I/Os this agent does before it stops for good (`u32::MAX`: never stops).
    ios_left: u32,
}

fn race(schedule: &[u8], agents: u32, stops: &[u32]) -> Result<(), String> {
    let (lun, region) = region(agents);
    let mut all: Vec<Agent> = (0..agents)
        .map(|slot| Agent {
            slot,
            proposer: None,
            ballots_left: 6,
            ios_left: stops.get(slot as usize).copied().unwrap_or(u32::MAX),
        })
        .collect();
    let mut decided: HashMap<u64, Owner> = HashMap::new();
    for &pick in schedule {
        let agent = &mut all[usize::from(pick) % agents as usize];
        if agent.ios_left == 0 || agent.ballots_left == 0 {
            continue;
        }
        agent.ios_left -= 1;
        let Some(p) = agent.proposer.as_mut() else {
            let view = read_region(lun.as_ref(), &region).map_err(|e| e.to_string())?;
            let p = Proposer::new(region, owner(agent.slot), &view).read_in_pieces(1);
            agent.proposer = Some(p);
            continue;
        };
        if let Some(outcome) = p.step(lun.as_ref(), 0).map_err(|e| e.to_string())? {
            agent.proposer = None;
            agent.ballots_left -= 1;
            if let Outcome::Decided { lver, owner } = outcome {
                let first = *decided.entry(lver).or_insert(owner);
                if first != owner {
                    return Err(format!(
                        "instance {lver} decided for slot {} and for slot {}",
                        first.slot, owner.slot
                    ));
                }
            }
        }
    }
    let view = read_region(lun.as_ref(), &region).map_err(|e| e.to_string())?;
    if let Some(&owner) = decided.get(&view.leader.lver) {
        if view.leader.owner_slot != owner.slot {
            return Err(format!(
                "the leader names another owner of {}",
                view.leader.lver
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn racing_proposers_never_decide_two_owners(
        schedule in prop::collection::vec(any::<u8>(), 50..400),
        agents in 2u32..=4,
        stops in prop::collection::vec(prop_oneof![Just(u32::MAX), 0u32..40], 4),
    ) {
        prop_assert_eq!(race(&schedule, agents, &stops), Ok(()));
    }
}

// ---------------------------------------------------------------------------------
// PaxosLun: hosts racing compare-and-write increments of one sector lose no update.
// ---------------------------------------------------------------------------------

const TARGET: u64 = 1 << 20;

fn counter_image(n: u64, writer: u32) -> Vec<u8> {
    let mut image = vec![0u8; SECTOR as usize];
    image[..8].copy_from_slice(&n.to_le_bytes());
    image[8..12].copy_from_slice(&writer.to_le_bytes());
    image[SECTOR as usize - 8..].copy_from_slice(&n.to_le_bytes());
    image
}

fn counter_of(image: &[u8]) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&image[..8]);
    u64::from_le_bytes(n)
}

/// One host's increments: read, then compare-and-write from what was read, and from
/// each miscompare's content until one succeeds (as the ATS self-test does).
fn increment(lun: &dyn Lun, slot: u32, times: u64) -> u64 {
    let mut done = 0;
    let mut current = vec![0u8; SECTOR as usize];
    for _ in 0..times {
        lun.read_at(&mut current, TARGET).expect("read");
        for _ in 0..10_000 {
            let new = counter_image(counter_of(&current) + 1, slot);
            match lun.compare_and_write(TARGET, &current, &new).expect("caw") {
                Caw::Written => {
                    done += 1;
                    break;
                }
                Caw::Miscompare(actual) => current = actual,
            }
        }
    }
    done
}

fn host(
    mem: &Arc<MemLun>,
    region: PaxosRegion,
    slot: u32,
    clock: Arc<dyn Clock>,
    latency_us: u64,
) -> PaxosLun {
    let faulty = FaultLun::new(
        mem.clone(),
        FaultConfig {
            seed: u64::from(slot),
            latency_max_us: latency_us,
            ..FaultConfig::default()
        },
    );
    PaxosLun::new(
        Arc::new(faulty),
        region,
        owner(slot),
        clock,
        TokenTiming::for_token(200),
    )
}

#[test]
fn hosts_racing_increments_through_the_token_lose_no_update() {
    let (mem, region) = region(4);
    mem.write_at(&counter_image(0, 99), TARGET).expect("init");
    let hosts: Vec<PaxosLun> = (0..4)
        .map(|slot| host(&mem, region, slot, Arc::new(SystemClock::default()), 200))
        .collect();
    let per_host = 25;
    let done: u64 = std::thread::scope(|scope| {
        let runs: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(slot, lun)| scope.spawn(move || increment(lun, slot as u32, per_host)))
            .collect();
        runs.into_iter().map(|r| r.join().expect("host")).sum()
    });
    let mut now = vec![0u8; SECTOR as usize];
    mem.read_at(&mut now, TARGET).expect("read");
    assert_eq!(done, 4 * per_host);
    assert_eq!(counter_of(&now), done, "lost updates");
    for lun in &hosts {
        let stats = lun.stats();
        assert!(stats.acquisitions >= 1 && stats.releases >= 1, "{stats:?}");
    }
}

#[test]
fn one_host_pays_nine_ios_for_a_lone_test_and_set() {
    let (mem, region) = region(4);
    let faulty = Arc::new(FaultLun::new(mem.clone(), FaultConfig::default()));
    let lun = PaxosLun::new(
        faulty.clone(),
        region,
        owner(0),
        Arc::new(ManualClock::default()),
        TokenTiming::for_token(200),
    );
    let zero = vec![0u8; SECTOR as usize];
    let result = lun.compare_and_write(TARGET, &zero, &counter_image(1, 0));
    assert_eq!(result.expect("caw"), Caw::Written);
    let stats = faulty.stats();
    // Region read, two phases (write + read each), leader, the sector's read and
    // write, the release.
    assert_eq!((stats.reads, stats.writes), (4, 5), "{stats:?}");
    assert_eq!(lun.ats_kind(), AtsKind::DiskPaxos);
}

/// A LUN that, once armed, runs `then` right after the next read of `TARGET`
/// completes: "this host pauses here while others work".
struct PauseAfterRead {
    inner: Arc<dyn Lun>,
    armed: AtomicBool,
    then: Box<dyn Fn() + Send + Sync>,
}

impl Lun for PauseAfterRead {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.inner.read_at(buf, offset)?;
        if offset == TARGET && self.armed.swap(false, Ordering::SeqCst) {
            (self.then)();
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "pause-after-read".into()
    }
}

#[test]
fn a_holder_paused_past_its_token_does_not_write() {
    // A takes the token and reads the sector, then stands still for two token
    // leases (its own clock jumps). Meanwhile B waits out A's token on its clock,
    // takes the token and increments. When A resumes, its token is gone: it must
    // not write its stale compare-and-write, but take the token again and report
    // the miscompare.
    let (mem, region) = region(2);
    mem.write_at(&counter_image(0, 99), TARGET).expect("init");
    let clock_a = Arc::new(ManualClock::default());
    let clock_b: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let b = Arc::new(host(&mem, region, 1, clock_b, 0));
    let pause = {
        let (clock_a, b) = (clock_a.clone(), b.clone());
        Box::new(move || {
            clock_a.advance(Duration::from_millis(400));
            assert_eq!(increment(b.as_ref(), 1, 1), 1);
        })
    };
    let paused = Arc::new(PauseAfterRead {
        inner: mem.clone(),
        armed: AtomicBool::new(true),
        then: pause,
    });
    let a = PaxosLun::new(
        paused,
        region,
        owner(0),
        clock_a,
        TokenTiming::for_token(200),
    );
    let result = a
        .compare_and_write(TARGET, &counter_image(0, 99), &counter_image(1, 0))
        .expect("caw");
    assert_eq!(result, Caw::Miscompare(counter_image(1, 1)));
    let mut now = vec![0u8; SECTOR as usize];
    mem.read_at(&mut now, TARGET).expect("read");
    assert_eq!(now, counter_image(1, 1), "A wrote over B's increment");
    assert_eq!(a.stats().acquisitions, 2);
}

#[test]
fn a_taker_waits_out_an_unreleased_token() {
    // A's token is decided but never released (A crashed holding it). B must not
    // start the next instance before the leader stood still for token + margin on
    // B's clock.
    let (mem, region) = region(2);
    let mut a = proposer(mem.as_ref(), region, 0);
    finish(&mut a, mem.as_ref());
    let clock_b = Arc::new(ManualClock::default());
    let b = host(&mem, region, 1, clock_b.clone(), 0);
    let zero = vec![0u8; SECTOR as usize];
    assert_eq!(
        b.compare_and_write(TARGET, &zero, &counter_image(1, 1))
            .expect("caw"),
        Caw::Written
    );
    assert!(
        clock_b.now_ms() >= 250,
        "B took the token after {} ms",
        clock_b.now_ms()
    );
}

/// A LUN that, once armed, runs `then` right after the next write of `offset`
/// lands: "a delta-lease claimer writes the slot while we settle".
struct AfterWriteOf {
    inner: Arc<MemLun>,
    offset: u64,
    armed: AtomicBool,
    then: Box<dyn Fn(&MemLun) + Send + Sync>,
}

impl Lun for AfterWriteOf {
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
        if offset == self.offset && self.armed.swap(false, Ordering::SeqCst) {
            (self.then)(&self.inner);
        }
        Ok(())
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "after-write".into()
    }
}

#[test]
fn a_caw_of_another_slots_heartbeat_is_confirmed_after_settling() {
    // A recoverer takes slot 1's heartbeat sector through the token; the slot's own
    // host, taking it back by a delta lease, writes after it. The recoverer must see
    // that when it reads again after settling, and not count its write as won. Our
    // own slot's sector and other sectors need no confirmation.
    let geo = Geometry::plan(&MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: SECTOR,
        max_hosts: 2,
        journal_blocks: Some(256),
        disk_paxos: true,
    })
    .expect("plan");
    let (mem, region) = region(2);
    let theirs = geo.slot_offset(1);
    let lun = Arc::new(AfterWriteOf {
        inner: mem.clone(),
        offset: theirs,
        armed: AtomicBool::new(true),
        then: Box::new(move |m| m.write_at(&counter_image(7, 1), theirs).expect("claim")),
    });
    let clock = Arc::new(ManualClock::default());
    let timing = DeltaTiming {
        fresh_ms: 25,
        settle_ms: 100,
        io_timeout_ms: 1000,
    };
    let a = PaxosLun::new(
        lun,
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    )
    .with_delta_sectors(DeltaSectors::heartbeats(&geo, 0, timing));
    let zero = vec![0u8; SECTOR as usize];
    let result = a.compare_and_write(theirs, &zero, &counter_image(1, 0));
    assert_eq!(result.expect("caw"), Caw::Miscompare(counter_image(7, 1)));
    assert!(clock.now_ms() >= 100, "did not settle");
    let before = clock.now_ms();
    let ours = geo.slot_offset(0);
    let acquisitions = a.stats().acquisitions;
    assert_eq!(
        a.compare_and_write(ours, &zero, &counter_image(1, 0))
            .expect("caw"),
        Caw::Written
    );
    // Our own heartbeat is renewed without the token.
    assert_eq!(a.stats().acquisitions, acquisitions);
    assert_eq!(
        a.compare_and_write(ours, &zero, &counter_image(2, 0))
            .expect("caw"),
        Caw::Miscompare(counter_image(1, 0))
    );
    assert_eq!(
        a.compare_and_write(geo.mailbox_offset(1), &zero, &counter_image(1, 0))
            .expect("caw"),
        Caw::Written
    );
    assert_eq!(
        clock.now_ms(),
        before,
        "settled for a sector no claim races"
    );
}

#[test]
fn a_busy_host_does_not_starve_a_waiting_one() {
    // B compare-and-writes without pause for a while, taking the token again right
    // after each release. A needs one compare-and-write (as its heartbeat does): it
    // must get the token within a few token leases, not after B stops.
    let (mem, region) = region(2);
    mem.write_at(&counter_image(0, 99), TARGET).expect("init");
    let other = TARGET + 4096;
    mem.write_at(&counter_image(0, 99), other).expect("init");
    let a = host(&mem, region, 0, Arc::new(SystemClock::default()), 100);
    let b = host(&mem, region, 1, Arc::new(SystemClock::default()), 100);
    let stop = AtomicBool::new(false);
    let waited = std::thread::scope(|scope| {
        let busy = scope.spawn(|| {
            let mut current = vec![0u8; SECTOR as usize];
            b.read_at(&mut current, other).expect("read");
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let new = counter_image(counter_of(&current) + 1, 1);
                if let Caw::Miscompare(actual) =
                    b.compare_and_write(other, &current, &new).expect("caw")
                {
                    current = actual;
                } else {
                    current = new;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert_eq!(increment(&a, 0, 1), 1);
        let waited = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        busy.join().expect("busy host");
        waited
    });
    // The token lease is 200 ms (+ 50 ms margin): a fair waiter gets it within about
    // one of them; allow two.
    assert!(waited < Duration::from_millis(500), "A waited {waited:?}");
}

#[test]
fn a_kept_token_costs_two_ios_a_test_and_set_and_goes_back_when_idle() {
    let (mem, region) = region(2);
    let faulty = Arc::new(FaultLun::new(mem.clone(), FaultConfig::default()));
    let clock = Arc::new(ManualClock::default());
    let lun = Arc::new(PaxosLun::new(
        faulty.clone(),
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    ));
    lun.start_releaser();
    let zero = vec![0u8; SECTOR as usize];
    let first = lun.compare_and_write(TARGET, &zero, &counter_image(1, 0));
    assert_eq!(first.expect("caw"), Caw::Written);
    let after_first = faulty.stats();
    assert_eq!((after_first.reads, after_first.writes), (4, 4));
    let second = lun.compare_and_write(TARGET, &counter_image(1, 0), &counter_image(2, 0));
    assert_eq!(second.expect("caw"), Caw::Written);
    let after_second = faulty.stats();
    assert_eq!(
        (
            after_second.reads - after_first.reads,
            after_second.writes - after_first.writes
        ),
        (1, 1),
        "a test-and-set under a kept token, within a millisecond of the last region \
         read: sector read, sector write"
    );
    assert_eq!(lun.stats().releases, 0);
    // Idle past the linger (our clock), the releaser gives the token back.
    clock.advance(Duration::from_millis(LINGER_MS + 1));
    for _ in 0..200 {
        if lun.stats().releases == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(lun.stats().releases, 1);
    assert_eq!(
        read_region(mem.as_ref(), &region).expect("view").holder(),
        None
    );
}

#[test]
fn a_host_that_keeps_the_token_gives_it_up_when_another_asks() {
    // A keeps the token between its back-to-back compare-and-writes (it is never
    // idle); B asks for it in its dblock and must get it within a token lease.
    let (mem, region) = region(2);
    let other = TARGET + 4096;
    mem.write_at(&counter_image(0, 99), TARGET).expect("init");
    mem.write_at(&counter_image(0, 99), other).expect("init");
    // A long token (kept for up to half of it: 1 s), so that only B's request can
    // make A give it up in time.
    let a = Arc::new(PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        Arc::new(SystemClock::default()),
        TokenTiming::for_token(2000),
    ));
    a.start_releaser();
    // Every host of a volume uses its one token lease (the superblock's).
    let b = PaxosLun::new(
        mem.clone(),
        region,
        owner(1),
        Arc::new(SystemClock::default()),
        TokenTiming::for_token(2000),
    );
    let stop = AtomicBool::new(false);
    let waited = std::thread::scope(|scope| {
        let busy = scope.spawn(|| {
            let mut current = counter_image(0, 99);
            while !stop.load(Ordering::SeqCst) {
                let new = counter_image(counter_of(&current) + 1, 0);
                current = match a.compare_and_write(other, &current, &new).expect("caw") {
                    Caw::Miscompare(actual) => actual,
                    Caw::Written => new,
                };
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert_eq!(increment(&b, 1, 1), 1);
        let waited = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        busy.join().expect("busy host");
        waited
    });
    assert!(waited < Duration::from_millis(500), "B waited {waited:?}");
}

/// Host `slot` says in its dblock that it wants the instance after the leader's (as
/// a waiter does).
fn ask_for_token(mem: &Arc<MemLun>, region: PaxosRegion, slot: u32) {
    let asker = PaxosLun::new(
        mem.clone(),
        region,
        owner(slot),
        Arc::new(ManualClock::default()),
        TokenTiming::for_token(200),
    );
    let view = read_region(mem.as_ref(), &region).expect("view");
    asker.request(&view, view.leader.lver + 1).expect("request");
}

/// Polls `done` for up to a second of real time.
fn eventually(done: impl Fn() -> bool) -> bool {
    for _ in 0..200 {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

#[test]
fn an_asked_for_token_serves_the_caw_in_progress_then_goes_back() {
    // A keeps the token between its compare-and-writes; B asks for it. A's next
    // compare-and-write (a millisecond later: A reads the region for requests at most
    // once a millisecond) still runs under the token it holds (no release and new
    // ballot first, which would make A step back and wait), and gives it back after.
    let (mem, region) = region(2);
    let clock = Arc::new(ManualClock::default());
    let a = Arc::new(PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    ));
    // Keeps its token as with a releaser, without the thread (which could give it
    // back first, once the clock moves).
    a.linger.store(true, Ordering::SeqCst);
    let zero = vec![0u8; SECTOR as usize];
    let first = a.compare_and_write(TARGET, &zero, &counter_image(1, 0));
    assert_eq!(first.expect("caw"), Caw::Written);
    assert_eq!((a.stats().acquisitions, a.stats().releases), (1, 0));
    ask_for_token(&mem, region, 1);
    clock.advance(Duration::from_millis(ASKED_CHECK_MS));
    let second = a.compare_and_write(TARGET, &counter_image(1, 0), &counter_image(2, 0));
    assert_eq!(second.expect("caw"), Caw::Written);
    let stats = a.stats();
    assert_eq!((stats.acquisitions, stats.releases), (1, 1), "{stats:?}");
    assert_eq!(
        read_region(mem.as_ref(), &region).expect("view").holder(),
        None
    );
}

#[test]
fn an_idle_kept_token_goes_back_within_a_tick_when_asked() {
    // Idle for one releaser tick but less than the linger: kept while nobody asks,
    // given back as soon as another host asks (not only once the linger is over).
    let (mem, region) = region(2);
    let clock = Arc::new(ManualClock::default());
    let a = Arc::new(PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    ));
    a.start_releaser();
    let zero = vec![0u8; SECTOR as usize];
    let first = a.compare_and_write(TARGET, &zero, &counter_image(1, 0));
    assert_eq!(first.expect("caw"), Caw::Written);
    clock.advance(Duration::from_millis(RELEASER_TICK_MS));
    const { assert!(RELEASER_TICK_MS < LINGER_MS) };
    std::thread::sleep(Duration::from_millis(20 * RELEASER_TICK_MS));
    assert_eq!(a.stats().releases, 0, "given back while nobody asked");
    ask_for_token(&mem, region, 1);
    assert!(eventually(|| a.stats().releases == 1), "{:?}", a.stats());
    assert_eq!(
        read_region(mem.as_ref(), &region).expect("view").holder(),
        None
    );
}

/// A LUN that counts reads at the Disk Paxos leader's offset: of the whole region,
/// and of the leader sector alone.
struct CountsRegionReads {
    inner: Arc<MemLun>,
    region: PaxosRegion,
    whole: std::sync::atomic::AtomicU32,
    leader: std::sync::atomic::AtomicU32,
}

impl Lun for CountsRegionReads {
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.inner.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        if offset == self.region.leader_offset {
            let count = if buf.len() == self.region.len() {
                &self.whole
            } else {
                &self.leader
            };
            count.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "counts-region-reads".into()
    }
}

#[test]
fn a_waiter_polls_the_leader_sector_alone_while_the_holder_keeps_the_token() {
    // A takes the token and keeps it (never gives it back). B waits it out on its
    // own clock, polling: each poll reads the leader sector alone (one sector, not
    // the whole region, which is 65 sectors at 64 hosts); B reads everybody again
    // only to decide (the wait is over), then takes the token.
    let (mem, region) = region(8);
    let a = PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        Arc::new(ManualClock::default()),
        TokenTiming::for_token(200),
    );
    a.linger.store(true, Ordering::SeqCst);
    let zero = vec![0u8; SECTOR as usize];
    let first = a.compare_and_write(TARGET, &zero, &counter_image(1, 0));
    assert_eq!(first.expect("caw"), Caw::Written);
    let counted = Arc::new(CountsRegionReads {
        inner: mem.clone(),
        region,
        whole: Default::default(),
        leader: Default::default(),
    });
    let b = PaxosLun::new(
        counted.clone(),
        region,
        owner(1),
        Arc::new(ManualClock::default()),
        TokenTiming::for_token(200),
    );
    let second = b.compare_and_write(TARGET, &counter_image(1, 0), &counter_image(2, 1));
    assert_eq!(second.expect("caw"), Caw::Written);
    let whole = counted.whole.load(Ordering::SeqCst);
    let leader = counted.leader.load(Ordering::SeqCst);
    // 250 ms of waiting: 50 polls of 1 ms, then 40 of 5 ms.
    assert!(leader >= 80, "{leader} polls of the leader sector");
    // The first read, the one after the wait, and the ballot's two.
    assert!(whole <= 5, "{whole} reads of the whole region");
    assert_eq!(a.stats().releases, 0);
}

/// A LUN that pauses its host past its lease (advances the host's clock) right after
/// the host's first write of its own dblock, and counts the dblock writes.
struct PausesAfterFirstDblockWrite {
    inner: Arc<MemLun>,
    dblock: u64,
    clock: Arc<ManualClock>,
    pause: Duration,
    dblock_writes: std::sync::atomic::AtomicU32,
}

impl Lun for PausesAfterFirstDblockWrite {
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
        if offset == self.dblock && self.dblock_writes.fetch_add(1, Ordering::SeqCst) == 0 {
            self.clock.advance(self.pause);
        }
        Ok(())
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "pauses after the first dblock write".into()
    }
}

#[test]
fn a_host_paused_past_its_lease_mid_ballot_writes_no_more_of_the_region() {
    let (mem, region) = region(4);
    let clock = Arc::new(ManualClock::default());
    let lease = Arc::new(Lease::new(
        clock.clone(),
        Duration::from_millis(8000),
        Duration::from_millis(1000),
    ));
    let lun = Arc::new(PausesAfterFirstDblockWrite {
        inner: mem.clone(),
        dblock: region.dblock_offset(0),
        clock: clock.clone(),
        pause: Duration::from_secs(60),
        dblock_writes: Default::default(),
    });
    let paxos = PaxosLun::new(
        lun.clone(),
        region,
        owner(0),
        clock,
        TokenTiming::for_token(200),
    )
    .with_lease(lease);
    let zero = vec![0u8; SECTOR as usize];
    // Its slot may have a new owner by now, whose dblock this one would overwrite.
    assert!(paxos
        .compare_and_write(TARGET, &zero, &counter_image(1, 0))
        .is_err());
    assert_eq!(
        lun.dblock_writes.load(Ordering::SeqCst),
        1,
        "the ballot went on writing after the host's lease ran out"
    );
}

/// Writes of one sector that land but whose reply is lost (an error comes back);
/// `wrote` is set once that sector was written.
struct LosesReplies(Arc<MemLun>, u64, Arc<AtomicBool>);

impl Lun for LosesReplies {
    fn sector_size(&self) -> u32 {
        self.0.sector_size()
    }
    fn len_bytes(&self) -> u64 {
        self.0.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> LunResult<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> LunResult<()> {
        self.0.write_at(buf, offset)?;
        if offset != self.1 {
            return Ok(());
        }
        self.2.store(true, Ordering::SeqCst);
        Err(LunError::Io {
            device: "x".into(),
            op: "write",
            offset,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "lost reply"),
        })
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.0.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "loses replies".into()
    }
}

/// A clock whose first sleep after `after` is set runs `during` (another host's
/// write landing meanwhile).
struct ClockWithEvent {
    inner: ManualClock,
    after: Arc<AtomicBool>,
    during: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Clock for ClockWithEvent {
    fn now_ms(&self) -> u64 {
        self.inner.now_ms()
    }
    fn sleep(&self, duration: Duration) {
        let event = self
            .after
            .load(Ordering::SeqCst)
            .then(|| self.during.lock().ok().and_then(|mut e| e.take()))
            .flatten();
        if let Some(event) = event {
            event();
        }
        self.inner.sleep(duration);
    }
}

#[test]
fn a_recoverers_takeover_whose_reply_is_lost_settles_before_it_wins() {
    let geo = Geometry::plan(&MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: SECTOR,
        max_hosts: 2,
        journal_blocks: Some(256),
        disk_paxos: true,
    })
    .expect("plan");
    let (mem, region) = region(2);
    let slot1 = geo.slot_offset(1);
    mem.write_at(&counter_image(5, 1), slot1).expect("init");
    let timing = DeltaTiming {
        fresh_ms: 25,
        settle_ms: 100,
        io_timeout_ms: 1000,
    };
    // Slot 1's host read its slot just before and takes it back by the delta rule:
    // its write lands while the recoverer settles.
    let claimer = {
        let mem = mem.clone();
        Box::new(move || {
            mem.write_at(&counter_image(6, 1), slot1).expect("claim");
        }) as Box<dyn FnOnce() + Send>
    };
    let wrote = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(ClockWithEvent {
        inner: ManualClock::default(),
        after: wrote.clone(),
        during: std::sync::Mutex::new(Some(claimer)),
    });
    let recoverer = PaxosLun::new(
        Arc::new(LosesReplies(mem.clone(), slot1, wrote)),
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    )
    .with_delta_sectors(DeltaSectors::heartbeats(&geo, 0, timing));
    let got = crate::cluster::heartbeat::caw_looked(
        &recoverer,
        slot1,
        &counter_image(5, 1),
        &counter_image(99, 0),
    );
    // Without a settle the claimer's write would land only now, after the recoverer
    // had counted the slot won.
    if let Ok(mut pending) = clock.during.lock() {
        if let Some(claim) = pending.take() {
            claim();
        }
    }
    let recoverer_won = matches!(&got, Ok(Caw::Written))
        || matches!(&got, Ok(Caw::Miscompare(x)) if *x == counter_image(99, 0));
    let mut after = vec![0u8; SECTOR as usize];
    mem.read_at(&mut after, slot1).expect("read");
    let claimer_won = after == counter_image(6, 1);
    assert!(
        !(recoverer_won && claimer_won),
        "the recoverer and the slot's own host both own slot 1"
    );
}

#[test]
fn a_late_leader_write_and_a_request_ahead_of_it_do_not_give_two_holders() {
    let (mem, region) = region(4);
    let clock = Arc::new(ManualClock::default());
    let timing = TokenTiming::for_token(200);
    // C (slot 1) decides itself for instance 1 and pauses before its Publish.
    let mut c = proposer(mem.as_ref(), region, 1);
    assert_eq!(steps(&mut c, mem.as_ref(), 4), None);
    // H2 (slot 2) finishes instance 1 for C, waits C's token out, takes instance 2.
    let h2 = PaxosLun::new(mem.clone(), region, owner(2), clock.clone(), timing);
    let held2 = {
        let mut st = h2.state.lock().expect("state");
        h2.ensure(&mut st).expect("h2")
    };
    assert_eq!(held2.lver, 2);
    // Y (slot 3) sees H2 hold it and asks for instance 3 (as acquire's wait does).
    let y = PaxosLun::new(mem.clone(), region, owner(3), clock.clone(), timing);
    let view = read_region(mem.as_ref(), &region).expect("read");
    assert_eq!(view.leader.lver, 2);
    y.request(&view, 3).expect("request");
    // C resumes: its paused leader write {1, C} lands over {2, H2}.
    assert!(steps(&mut c, mem.as_ref(), 1).is_some());
    // Y must not take the token while H2's may still be valid.
    let held_y = {
        let mut st = y.state.lock().expect("state");
        y.ensure(&mut st).expect("y")
    };
    assert!(
        !(h2.valid(&held2) && y.valid(&held_y)),
        "two hosts hold the token: {held2:?} {held_y:?}"
    );
}

#[test]
fn a_long_token_wait_is_followed_by_a_lease_confirm_before_the_write() {
    // B holds the token (crashed: never released). A's compare-and-write passes
    // GuardedLun's lease check (a fresh renewal: no re-read of A's slot), then waits
    // out B's token. Meanwhile A's renewal grew older than an interval and another
    // host declared A dead and took its slot: A must find that out before it writes,
    // as any write after a late renewal does.
    let geo = Geometry::plan(&MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: SECTOR,
        max_hosts: 2,
        journal_blocks: Some(256),
        disk_paxos: true,
    })
    .expect("plan");
    let (mem, region) = region(2);
    mem.write_at(&counter_image(0, 99), TARGET).expect("init");
    let mut b = proposer(mem.as_ref(), region, 1);
    finish(&mut b, mem.as_ref());
    let clock = Arc::new(ManualClock::default());
    let lease = Arc::new(Lease::new(
        clock.clone(),
        Duration::from_millis(8000),
        Duration::from_millis(100),
    ));
    let slot0 = geo.slot_offset(0);
    let mine = counter_image(5, 0);
    mem.write_at(&mine, slot0).expect("our slot");
    lease.watch_slot(crate::cluster::heartbeat::SlotWatch::new(
        mem.clone(),
        slot0,
        SECTOR,
        mine,
    ));
    // The takeover (not a heartbeat image: any other content counts as taken).
    mem.write_at(&counter_image(6, 1), slot0).expect("takeover");
    let paxos = Arc::new(
        PaxosLun::new(
            mem.clone(),
            region,
            owner(0),
            clock.clone(),
            TokenTiming::for_token(200),
        )
        .with_lease(lease.clone()),
    );
    let guarded = crate::cluster::GuardedLun::new(paxos, lease.clone());
    let result = guarded.compare_and_write(TARGET, &counter_image(0, 99), &counter_image(1, 0));
    assert!(clock.now_ms() > 100, "no token wait");
    assert!(
        matches!(result, Err(LunError::Fenced(_))),
        "{result:?} after waiting {} ms",
        clock.now_ms()
    );
    let mut now = vec![0u8; SECTOR as usize];
    mem.read_at(&mut now, TARGET).expect("read");
    assert_eq!(
        now,
        counter_image(0, 99),
        "written after the slot was taken"
    );
}

/// A LUN whose writes of `offset` take `ms` on a manual clock (a write that sits in
/// the I/O path).
struct SlowWritesOf {
    inner: Arc<MemLun>,
    offset: u64,
    clock: Arc<ManualClock>,
    ms: u64,
}

impl Lun for SlowWritesOf {
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
        if offset == self.offset {
            self.clock.advance(Duration::from_millis(self.ms));
        }
        self.inner.write_at(buf, offset)
    }
    fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> LunResult<Caw> {
        self.inner.compare_and_write(offset, expected, new)
    }
    fn flush(&self) -> LunResult<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "slow writes".into()
    }
}

#[test]
fn a_write_under_the_token_slower_than_io_timeout_is_not_trusted() {
    // The margin covers a write that takes up to io_timeout; a slower one may have
    // landed after our token ran out and another host wrote the sector: the host
    // fences itself rather than believe it won (and never releases that token).
    let (mem, region) = region(2);
    mem.write_at(&counter_image(0, 99), TARGET).expect("init");
    let clock = Arc::new(ManualClock::default());
    let lease = Arc::new(Lease::new(
        clock.clone(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    ));
    let timing = TokenTiming::for_token(200);
    let slow = Arc::new(SlowWritesOf {
        inner: mem.clone(),
        offset: TARGET,
        clock: clock.clone(),
        ms: timing.io_timeout_ms + 1,
    });
    let paxos =
        PaxosLun::new(slow, region, owner(0), clock.clone(), timing).with_lease(lease.clone());
    let result = paxos.compare_and_write(TARGET, &counter_image(0, 99), &counter_image(1, 0));
    assert!(matches!(result, Err(LunError::Fenced(_))), "{result:?}");
    assert!(lease.is_fenced());
    assert_eq!(paxos.stats().releases, 0);
}

#[test]
fn a_renewal_slower_than_io_timeout_is_not_trusted() {
    // Our own heartbeat, renewed without the token: a recoverer's takeover confirmed
    // itself `settle` after its write, which covers a renewal that lands within
    // io_timeout of its issue, not a slower one.
    let geo = Geometry::plan(&MkfsParams {
        total_bytes: 64 << 20,
        ats_sector_size: SECTOR,
        max_hosts: 2,
        journal_blocks: Some(256),
        disk_paxos: true,
    })
    .expect("plan");
    let (mem, region) = region(2);
    let ours = geo.slot_offset(0);
    mem.write_at(&counter_image(5, 0), ours).expect("init");
    let clock = Arc::new(ManualClock::default());
    let timing = DeltaTiming::for_volume(Duration::from_millis(100), Duration::from_millis(50));
    let slow = Arc::new(SlowWritesOf {
        inner: mem.clone(),
        offset: ours,
        clock: clock.clone(),
        ms: 51,
    });
    let paxos = PaxosLun::new(slow, region, owner(0), clock, TokenTiming::for_token(100))
        .with_delta_sectors(DeltaSectors::heartbeats(&geo, 0, timing));
    let result = paxos.compare_and_write(ours, &counter_image(5, 0), &counter_image(6, 0));
    assert!(matches!(result, Err(LunError::Fenced(_))), "{result:?}");
}

#[test]
fn the_token_and_the_delta_rule_derive_from_one_io_timeout() {
    let lun = MemLun::new(128 << 20, SECTOR);
    let opts = MkfsOptions {
        ats_mode: crate::format::ATS_MODE_DISK_PAXOS,
        ..MkfsOptions::default()
    };
    mkfs(&lun, &opts, &mut |_, _| {}).expect("mkfs");
    let sb = Superblock::decode(&lun.snapshot()[..512], 0).expect("superblock");
    let io = io_timeout_ms(&sb);
    // sanlock's host_dead_seconds is 8 io_timeouts: the lease is 8 s by default.
    assert_eq!((sb.lease_ms, sb.heartbeat_interval_ms), (8000, 1000));
    assert_eq!(io, 1000);
    let token = TokenTiming::for_token(u64::from(sb.paxos_token_ms));
    assert_eq!(
        (token.token_ms, token.margin_ms, token.io_timeout_ms),
        (2000, 1000, 1000)
    );
    let delta = delta_timing(&sb);
    assert_eq!(
        (delta.fresh_ms, delta.settle_ms, delta.io_timeout_ms),
        (250, 2250, 1000)
    );
    // A holder's last write is issued `margin` before its token ends and lands within
    // io_timeout; a taker starts `margin` after it ends: twice the room needed.
    assert!(2 * token.margin_ms >= 2 * io);
    // The delta rule holds while settle > fresh + io_max; io_max is twice io_timeout.
    assert!(delta.settle_ms > delta.fresh_ms + io);
    // A recoverer may write for lease - interval after its takeover's issue: the wait
    // for a dead holder's token, the settle and one renewal fit with room to spare.
    let budget = u64::from(sb.lease_ms - sb.heartbeat_interval_ms);
    let takeover = token.token_ms + token.margin_ms + delta.settle_ms;
    assert!(takeover + 100 < budget * 4 / 5, "{takeover} of {budget}");
}

#[test]
fn a_finisher_does_not_publish_over_a_leader_that_names_the_instance() {
    // F finishes instance 1 for C (C's value was accepted). By F's phase-2 read, C has
    // published, used and released its token: F's publish would re-arm it, and every
    // taker would wait a token + margin for nobody.
    let (mem, region) = region(3);
    let mut c = proposer(mem.as_ref(), region, 1);
    assert_eq!(steps(&mut c, mem.as_ref(), 4), None);
    let mut f = proposer(mem.as_ref(), region, 2);
    assert_eq!(f.lver(), 1);
    assert_eq!(steps(&mut f, mem.as_ref(), 2), None); // phase 1: adopts C
    assert!(steps(&mut c, mem.as_ref(), 1).is_some()); // C publishes
    write_leader(mem.as_ref(), &region, 1, owner(1), PAXOS_LEADER_RELEASED, 1).expect("release");
    assert_eq!(
        finish(&mut f, mem.as_ref()),
        Outcome::Decided {
            lver: 1,
            owner: owner(1)
        }
    );
    let view = read_region(mem.as_ref(), &region).expect("view");
    assert_eq!(view.holder(), None, "F re-armed C's released token");
}

#[test]
fn a_late_publish_does_not_re_arm_a_token_seen_released() {
    // F finished instance 1 for C before C published, and stalls before its own
    // publish. C publishes, uses and releases instance 1; Y takes and releases
    // instance 2. Then F's publish {1, C} lands. Y saw instance 2 released: an
    // unreleased leader of an instance up to 2 names nobody who holds the token.
    let (mem, region) = region(3);
    let mut c = proposer(mem.as_ref(), region, 1);
    assert_eq!(steps(&mut c, mem.as_ref(), 4), None);
    let mut f = proposer(mem.as_ref(), region, 2);
    assert_eq!(steps(&mut f, mem.as_ref(), 4), None); // decided C, publish pending
    assert!(steps(&mut c, mem.as_ref(), 1).is_some());
    write_leader(mem.as_ref(), &region, 1, owner(1), PAXOS_LEADER_RELEASED, 1).expect("release");
    let clock = Arc::new(ManualClock::default());
    let y = PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    );
    let zero = vec![0u8; SECTOR as usize];
    assert_eq!(
        y.compare_and_write(TARGET, &zero, &counter_image(1, 0))
            .expect("caw"),
        Caw::Written
    );
    assert!(finish(&mut f, mem.as_ref()) != Outcome::Aborted(Abort::HigherBallot));
    assert_eq!(
        read_region(mem.as_ref(), &region).expect("view").holder(),
        Some(owner(1)),
        "F's late publish"
    );
    let before = clock.now_ms();
    assert_eq!(
        y.compare_and_write(TARGET, &counter_image(1, 0), &counter_image(2, 0))
            .expect("caw"),
        Caw::Written
    );
    let waited = clock.now_ms() - before;
    assert!(waited < 200, "Y waited {waited} ms for a released token");
}

#[test]
fn retiring_gives_the_token_back_and_ends_the_releaser() {
    let (mem, region) = region(2);
    // A clock that never moves: the releaser never finds the token idle.
    let lun = Arc::new(PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        Arc::new(ManualClock::default()),
        TokenTiming::for_token(200),
    ));
    lun.start_releaser();
    let zero = vec![0u8; SECTOR as usize];
    assert_eq!(
        lun.compare_and_write(TARGET, &zero, &counter_image(1, 0))
            .expect("caw"),
        Caw::Written
    );
    assert_eq!(
        read_region(mem.as_ref(), &region).expect("view").holder(),
        Some(owner(0))
    );
    lun.retire().expect("retire");
    assert_eq!(
        read_region(mem.as_ref(), &region).expect("view").holder(),
        None
    );
    // The releaser thread holds the only weak reference; it lets go when it ends.
    for _ in 0..200 {
        if Arc::weak_count(&lun) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(Arc::weak_count(&lun), 0, "the releaser thread still runs");
}

#[test]
fn a_dead_hosts_request_costs_one_step_back_once() {
    // D asked for instance 2 and died. A host that takes instance 2 steps back for
    // it (YIELDS_MAX polls) once; the next instances are past D's request and cost
    // nothing. (Review finding 7 feared every host stepping back for ever.)
    let (mem, region) = region(3);
    let clock = Arc::new(ManualClock::default());
    let a = PaxosLun::new(
        mem.clone(),
        region,
        owner(0),
        clock.clone(),
        TokenTiming::for_token(200),
    );
    let zero = vec![0u8; SECTOR as usize];
    assert_eq!(
        a.compare_and_write(TARGET, &zero, &counter_image(1, 0))
            .expect("caw"),
        Caw::Written
    );
    let d = PaxosLun::new(
        mem.clone(),
        region,
        owner(2),
        clock.clone(),
        TokenTiming::for_token(200),
    );
    let view = read_region(mem.as_ref(), &region).expect("view");
    d.request(&view, 2).expect("request");
    drop(d);
    let mut current = counter_image(1, 0);
    let mut waits = Vec::new();
    for n in 2..6 {
        let before = clock.now_ms();
        let next = counter_image(n, 0);
        assert_eq!(
            a.compare_and_write(TARGET, &current, &next).expect("caw"),
            Caw::Written
        );
        current = next;
        waits.push(clock.now_ms() - before);
    }
    assert!(
        waits[0] <= u64::from(YIELDS_MAX) * WAIT_POLL_MS,
        "{waits:?}"
    );
    assert!(waits[1..].iter().all(|&w| w == 0), "{waits:?}");
}
