//! The scenario the guests run, step by step, judged on the host.
//!
//! One `Variant` names how the guests share the disk and which test-and-set the
//! volume uses. Each step sends commands to guests (xtask/vm/steps.sh has the
//! functions they run) and checks what they print; the first failed step stops the
//! variant (the later steps build on it) and shows the guests' console and daemon
//! logs. Guest 1 ("vm1") makes the volume and is killed; guest 2 recovers it; every
//! guest mounts and creates.

use super::guest::{Disk, Guest, GuestImage, Reply};
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// Files each guest creates at once in one shared directory.
const CREATES_PER_GUEST: u32 = 50;
/// Files guest 1 writes and fsyncs just before it is killed.
const FSYNCED_BEFORE_KILL: u32 = 20;
/// How many times (one a second) guest 2 tries to open the killed guest's file for
/// writing: the lease (8 s) plus recovery, with room for slow TCG guests.
const TAKE_OVER_TRIES: u32 = 120;
/// Timeouts of one command: most, and the ones that wait for locks or run the
/// self-test under TCG.
const STEP_WAIT: Duration = Duration::from_secs(120);
const LONG_WAIT: Duration = Duration::from_secs(300);

/// How the guests reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// tgt's LUN by `scsi-block` over QEMU's iSCSI driver (SG_IO in the guest).
    IscsiPassthrough,
    /// One image file as a plain virtio disk with `share-rw=on`.
    SharedVirtio,
}

/// One run of the scenario.
pub struct Variant {
    pub name: &'static str,
    pub attachment: Attachment,
    /// `mkfs.atsfs --ats` value.
    pub ats: &'static str,
    /// What mkfs must print about the test-and-set it chose.
    pub mkfs_says: &'static [&'static str],
    /// Whether the survivor must fence the dead guest at the storage (persistent
    /// reservations reach tgt only through SCSI passthrough).
    pub fences: bool,
    /// What `atsfs status` in a guest must print: the backend the device name got
    /// ("SCSI device" is the SG_IO backend, docs/scsi.md), its test-and-set, fencing.
    pub status_says: &'static [&'static str],
}

/// Both variants of issue 15. The second needs Disk Paxos (issue 14):
/// `paxos_missing` says why it cannot run yet, or None once mkfs.atsfs offers
/// `--ats paxos`.
pub fn variants() -> [Variant; 2] {
    [
        Variant {
            name: "iscsi-scsi-block",
            attachment: Attachment::IscsiPassthrough,
            ats: "hardware",
            mkfs_says: &["ATS: hardware", "self-test passed"],
            fences: true,
            status_says: &[
                "on SCSI device /dev/sda",
                "this device: hardware ATS, matches",
                "fencing by the storage: reserved",
            ],
        },
        Variant {
            name: "shared-virtio-paxos",
            attachment: Attachment::SharedVirtio,
            ats: "paxos",
            mkfs_says: &["paxos"],
            fences: false,
            status_says: &["paxos"],
        },
    ]
}

/// How one step ended.
pub struct StepOutcome {
    pub name: &'static str,
    pub passed: bool,
    pub said: String,
    pub seconds: f64,
}

/// The guests of one run and what the steps found.
pub struct Run<'a> {
    pub variant: &'a Variant,
    pub guests: Vec<Guest>,
    pub steps: Vec<StepOutcome>,
    pub boot_seconds: f64,
    /// When vm1's QEMU was killed.
    killed_at: Option<Instant>,
}

/// How many steps a variant has.
pub const STEP_COUNT: usize = STEPS.len();

/// The steps, in order: (name, what it shows, the step).
type StepFn = fn(&mut Run<'_>) -> Result<String>;
const STEPS: [(&str, &str, StepFn); 9] = [
    ("disk", "every guest sees the shared disk", disk),
    ("mkfs", "mkfs.atsfs from vm1, after the ATS self-test", mkfs),
    (
        "mount",
        "every guest mounts the volume; all are live",
        mount,
    ),
    (
        "share",
        "a file written in one guest is read in the other",
        share,
    ),
    ("creates", "concurrent creates in one directory", creates),
    (
        "ebusy",
        "a file open for writing in vm1 is EBUSY for writing in vm2",
        ebusy,
    ),
    ("kill", "vm1 fsyncs files, then its QEMU gets kill -9", kill),
    (
        "recovery",
        "vm2 recovers vm1: journal replayed, locks broken",
        recovery,
    ),
    ("fsck", "the other guests unmount; fsck is clean", fsck),
];

/// Boots `count` guests on `disk`, then runs the steps until one fails.
pub fn run<'a>(
    variant: &'a Variant,
    image: &GuestImage,
    disk: &Disk,
    count: u32,
    work: &std::path::Path,
) -> Result<Run<'a>> {
    crate::sh::heading(&format!("{}: booting {count} guests", variant.name));
    let started = Instant::now();
    let mut guests = Vec::new();
    for index in 1..=count {
        guests.push(Guest::start(index, image, disk, work)?);
    }
    if let Err(e) = boot(&mut guests, started, disk.guest_device()) {
        for guest in &guests {
            println!(
                "--- {}: the console (tail of {})",
                guest.name,
                guest.console.display()
            );
            println!("{}", guest.console_tail(30));
        }
        return Err(e);
    }
    let mut run = Run {
        variant,
        guests,
        steps: Vec::new(),
        boot_seconds: started.elapsed().as_secs_f64(),
        killed_at: None,
    };
    for (number, (name, shows, step)) in (1..).zip(STEPS) {
        crate::sh::heading(&format!(
            "{} step {number}/{}: {name}: {shows}",
            variant.name,
            STEPS.len()
        ));
        let began = Instant::now();
        let result = step(&mut run);
        let seconds = began.elapsed().as_secs_f64();
        let (passed, said) = match result {
            Ok(said) => (true, said),
            Err(e) => (false, format!("{e:#}")),
        };
        println!(
            "{} {name}: {said} ({seconds:.1} s)",
            if passed { "ok" } else { "FAILED" }
        );
        run.steps.push(StepOutcome {
            name,
            passed,
            said,
            seconds,
        });
        if !passed {
            run.show_logs();
            break;
        }
    }
    let not_run: Vec<&str> = STEPS[run.steps.len()..].iter().map(|s| s.0).collect();
    if !not_run.is_empty() {
        println!(
            "not run (they build on the failed step): {}",
            not_run.join(", ")
        );
    }
    for guest in &mut run.guests {
        guest.power_off(Duration::from_secs(30));
    }
    Ok(run)
}

/// Waits until every guest's /init answers, and tells each its shared disk.
fn boot(guests: &mut [Guest], started: Instant, device: &str) -> Result<()> {
    for guest in guests {
        guest.wait_ready(started)?;
        let set = guest.run(&format!("DEV={device}"), STEP_WAIT)?;
        if !set.ok() {
            bail!("{}: setting DEV failed", guest.name);
        }
    }
    Ok(())
}

impl Run<'_> {
    fn guest(&mut self, index: u32) -> &mut Guest {
        &mut self.guests[index as usize - 1]
    }

    /// Runs `command` in guest `index`; fails unless it exits 0.
    fn must(&mut self, index: u32, command: &str, timeout: Duration) -> Result<Reply> {
        let guest = self.guest(index);
        let reply = guest.run(command, timeout)?;
        if !reply.ok() {
            bail!("{}: `{command}` exited {}", guest.name, reply.status);
        }
        Ok(reply)
    }

    /// The guests still running (all but the killed vm1 after the kill step).
    fn live_indexes(&self) -> Vec<u32> {
        let killed = self.steps.iter().any(|s| s.name == "kill" && s.passed);
        (1..=self.guests.len() as u32)
            .filter(|&i| !(killed && i == 1))
            .collect()
    }

    /// After a failure: each live guest's daemon log and console tail.
    fn show_logs(&mut self) {
        for index in self.live_indexes() {
            let guest = self.guest(index);
            println!("--- {}: the daemon's log (tail)", guest.name);
            let _ = guest.run("daemon_log 40", Duration::from_secs(30));
            println!(
                "--- {}: the console (tail of {})",
                guest.name,
                guest.console.display()
            );
            println!("{}", guest.console_tail(30));
        }
    }
}

fn disk(run: &mut Run<'_>) -> Result<String> {
    let mut seen = Vec::new();
    for index in run.live_indexes() {
        let reply = run.must(index, "disk_info", STEP_WAIT)?;
        let model = reply
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("model: "))
            .unwrap_or("virtio disk")
            .trim()
            .to_string();
        seen.push(format!("vm{index}: {model}"));
    }
    Ok(seen.join(", "))
}

fn mkfs(run: &mut Run<'_>) -> Result<String> {
    let variant = run.variant;
    let reply = run.must(1, &format!("make_volume {}", variant.ats), LONG_WAIT)?;
    let text = reply.text();
    for expected in variant.mkfs_says {
        if !text.contains(expected) {
            bail!("mkfs.atsfs did not say {expected:?}");
        }
    }
    let line = reply
        .lines
        .iter()
        .find(|l| l.starts_with("ATS:"))
        .cloned()
        .unwrap_or_default();
    Ok(format!(
        "vm1 made the volume with --ats {}: {line}",
        variant.ats
    ))
}

fn mount(run: &mut Run<'_>) -> Result<String> {
    let indexes = run.live_indexes();
    for &index in &indexes {
        run.must(index, "mount_volume", STEP_WAIT)?;
    }
    let status = run.must(1, "volume_status", STEP_WAIT)?.text();
    let live = status.lines().filter(|l| l.contains("live")).count();
    if live < indexes.len() {
        bail!(
            "atsfs status shows {live} live hosts, not {}",
            indexes.len()
        );
    }
    for expected in run.variant.status_says {
        if !status.contains(expected) {
            bail!("atsfs status on vm1 does not say {expected:?}");
        }
    }
    let keys = status
        .lines()
        .filter(|l| l.trim_start().starts_with("key 0x"))
        .count();
    if run.variant.fences && keys < indexes.len() {
        bail!("the storage holds {keys} reservation keys, not one per guest");
    }
    let device = status.lines().next().unwrap_or_default();
    Ok(format!(
        "{} guests mounted; atsfs status on vm1: {live} live hosts, {keys} reservation keys, {device:?}",
        indexes.len()
    ))
}

fn share(run: &mut Run<'_>) -> Result<String> {
    let mut said = Vec::new();
    for (writer, reader) in [(1, 2), (2, 1)] {
        let name = format!("from-vm{writer}");
        let text = format!("written by vm{writer}, read by vm{reader}");
        let wrote = run.must(writer, &format!("write_file {name} '{text}'"), STEP_WAIT)?;
        let read = run.must(reader, &format!("read_file {name}"), STEP_WAIT)?;
        let sum = |r: &Reply| {
            r.lines
                .first()
                .and_then(|l| l.split_whitespace().next())
                .map(str::to_string)
        };
        if sum(&wrote).is_none() || sum(&wrote) != sum(&read) || !read.text().contains(&text) {
            bail!("vm{reader} read other bytes than vm{writer} wrote");
        }
        said.push(format!("vm{reader} read vm{writer}'s file (same sha256)"));
    }
    Ok(said.join("; "))
}

fn creates(run: &mut Run<'_>) -> Result<String> {
    let indexes = run.live_indexes();
    for &index in &indexes {
        let command = format!("create_files shared vm{index}- {CREATES_PER_GUEST}");
        run.guest(index).send(&command)?;
    }
    for &index in &indexes {
        let reply = run.guest(index).reply(LONG_WAIT)?;
        if !reply.ok() {
            bail!("vm{index}: create_files exited {}", reply.status);
        }
    }
    let expected = CREATES_PER_GUEST * indexes.len() as u32;
    let mut listings = Vec::new();
    for &index in &indexes {
        listings.push(run.must(index, "list_dir shared", STEP_WAIT)?.text());
    }
    let wanted = format!("entries {expected} ");
    if listings.iter().any(|l| !l.starts_with(&wanted)) {
        bail!("the guests list the directory differently or miss files: {listings:?}");
    }
    if listings.windows(2).any(|w| w[0] != w[1]) {
        bail!("the guests list different names: {listings:?}");
    }
    let mut caws = Vec::new();
    for &index in &indexes {
        let reply = run.must(index, "ats_count", STEP_WAIT)?;
        let count: u64 = reply.text().trim().parse().unwrap_or(0);
        if count == 0 {
            bail!("vm{index}'s filesystem sent no ATS (atsfs stats)");
        }
        caws.push(format!("vm{index} {count}"));
    }
    Ok(format!(
        "{} guests created {CREATES_PER_GUEST} files each at once; every guest lists the same \
         {expected}; ATS sent since mount (atsfs stats): {}",
        indexes.len(),
        caws.join(", ")
    ))
}

fn ebusy(run: &mut Run<'_>) -> Result<String> {
    run.must(1, "hold_open held 'held by vm1'", STEP_WAIT)?;
    let reply = run.guest(2).run("open_for_writing held", STEP_WAIT)?;
    let text = reply.text();
    if reply.ok() || !text.to_lowercase().contains("busy") {
        bail!("vm2's open for writing did not fail with EBUSY: {text:?}");
    }
    Ok(format!("vm2: {}", text.trim()))
}

fn kill(run: &mut Run<'_>) -> Result<String> {
    run.must(
        1,
        &format!("fsynced_files fromvm1 {FSYNCED_BEFORE_KILL}"),
        LONG_WAIT,
    )?;
    run.guest(1).kill9()?;
    run.killed_at = Some(Instant::now());
    Ok(format!(
        "vm1 wrote and fsynced {FSYNCED_BEFORE_KILL} files, holding `held` open for writing; its QEMU was killed"
    ))
}

fn recovery(run: &mut Run<'_>) -> Result<String> {
    let took = run.must(
        2,
        &format!("take_over held 'taken over by vm2' {TAKE_OVER_TRIES}"),
        LONG_WAIT,
    )?;
    let after_kill = run.killed_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    if !took.text().contains("before: held by vm1") {
        bail!("vm2 did not find vm1's fsynced text in `held`");
    }
    run.must(
        2,
        &format!("check_files fromvm1 {FSYNCED_BEFORE_KILL} vm1"),
        STEP_WAIT,
    )?;
    let log = run.must(2, "recovery_log", STEP_WAIT)?.text();
    let mut wanted = vec!["replaying its journal", "journal replayed"];
    if run.variant.fences {
        wanted.push("fenced a dead host at the storage");
    }
    for w in &wanted {
        if !log.contains(w) {
            bail!("vm2's log does not say {w:?}");
        }
    }
    let replayed = log
        .lines()
        .find_map(|l| l.split("journal replayed ").nth(1))
        .unwrap_or_default()
        .trim()
        .to_string();
    let status = run.must(2, "volume_status", STEP_WAIT)?.text();
    if status
        .lines()
        .any(|l| l.contains(" vm1 ") && l.contains(" live "))
    {
        bail!("atsfs status on vm2 still shows vm1 live");
    }
    Ok(format!(
        "vm2 opened vm1's file for writing {after_kill:.1} s after the kill (lease 8 s) and \
         read all {FSYNCED_BEFORE_KILL} files vm1 had fsynced; its log: {} ({replayed})",
        wanted.join(", ")
    ))
}

fn fsck(run: &mut Run<'_>) -> Result<String> {
    let indexes = run.live_indexes();
    for &index in &indexes {
        run.must(index, "unmount_volume", LONG_WAIT)?;
    }
    let checker = indexes.last().copied().unwrap_or(2);
    let reply = run.must(checker, "check_volume", LONG_WAIT)?;
    let said = reply.lines.last().cloned().unwrap_or_default();
    Ok(format!(
        "{} guests unmounted; fsck on vm{checker}: {said}",
        indexes.len()
    ))
}
