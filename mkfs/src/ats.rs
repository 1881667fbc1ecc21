//! `--ats`: which test-and-set the volume records. Hardware ATS is recorded only
//! after the device passed the ATS self-test (`atsfs::lun::selftest`), run over
//! sessions of its own (`open_device` once per session). `auto` (the default) takes
//! hardware then, and Disk Paxos on every other device (image files, block devices
//! without SG_IO, SCSI disks without COMPARE AND WRITE, plain disks, and a device
//! that failed the self-test); the emulation (one kernel only) only when asked for.

use crate::{say, Args, Failure};
use atsfs::format::{ATS_MODE_DISK_PAXOS, ATS_MODE_EMULATED, ATS_MODE_HARDWARE};
use atsfs::lun::selftest::{self, SelftestError, SelftestOptions, SelftestReport, SessionFactory};
use atsfs::lun::{AtsKind, Lun, LunError};
use atsfs::mkfs::selftest_sector;

/// Increments per session of the ATS self-test mkfs runs before it trusts a device's
/// hardware ATS: the default of `atsfs ats-selftest`, not fewer. Measured on tgt with
/// 16 I/O threads per LUN (8 sessions of read-then-CAW increments on one machine,
/// 15 runs each): 8 x 100 saw lost updates in 3 runs, 8 x 500 in 12, 8 x 1,000 and
/// 8 x 2,000 in all 15 (the fewest lost were 1 and 9 of 16,000 in two other runs),
/// and 8 x 2,000 takes about 2 s there.
const SELFTEST_INCREMENTS: u64 = selftest::INCREMENTS_DEFAULT;

pub use crate::cli::AtsChoice;

/// Refuses an `--ats` the device cannot do, before anything else is looked at.
pub fn check_ats_request(lun: &dyn Lun, args: &Args) -> Result<(), Failure> {
    let device = lun.describe();
    match (args.ats, lun.ats_kind()) {
        (AtsChoice::Hardware, AtsKind::Emulated | AtsKind::Plain) => {
            Err(Failure::Refused(format!(
                "--ats hardware: {device} has no hardware ATS (SCSI COMPARE AND WRITE); image \
                 files, block devices without SG_IO and SCSI disks that refuse the command have \
                 none. Give the device by a name that reaches the storage's COMPARE AND WRITE \
                 (an iscsi:// URL, or a SCSI disk), or leave --ats out: mkfs.atsfs then makes \
                 a Disk Paxos volume, which needs no COMPARE AND WRITE"
            )))
        }
        (AtsChoice::Emulated, AtsKind::Hardware) => Err(Failure::Refused(format!(
            "--ats emulated: {device} does hardware ATS, and a host that opens an emulated \
             volume through it is refused (the two kinds are not atomic against each other). \
             Make the volume through the name the hosts will use (the image file or block \
             device), or leave --ats out (hardware, once the self-test passed)"
        ))),
        (AtsChoice::Emulated, AtsKind::Plain) => Err(Failure::Refused(format!(
            "--ats emulated: {device} has no compare-and-write at all (a plain disk), so no \
             host could use an emulated volume through it. Leave --ats out: mkfs.atsfs then \
             makes a Disk Paxos volume, which needs none"
        ))),
        _ => Ok(()),
    }
}

/// The volume's ATS mode (`--ats`), with the self-test's report when it ran. A
/// device with hardware ATS is trusted only once the self-test passed on it, run
/// over sessions from `open`. `auto` takes hardware then, and Disk Paxos on every
/// other device (no COMPARE AND WRITE, or one that failed the self-test); the
/// emulation only when asked for.
pub fn choose_ats(
    lun: &dyn Lun,
    args: &Args,
    open: &SessionFactory<'_>,
) -> Result<(u32, Option<SelftestReport>), Failure> {
    check_ats_request(lun, args)?;
    match (args.ats, lun.ats_kind()) {
        (AtsChoice::Paxos, _) => {
            say_paxos(args, "asked for with --ats paxos");
            Ok((ATS_MODE_DISK_PAXOS, None))
        }
        (AtsChoice::Emulated, _) => {
            say(
                args,
                "ATS: emulated (asked for with --ats emulated): test-and-set is a file lock of \
                 this kernel, so every host must run on this machine (one kernel)",
            );
            Ok((ATS_MODE_EMULATED, None))
        }
        (AtsChoice::Hardware, _) => {
            let report = run_selftest(lun, args, open)?.map_err(Failure::Refused)?;
            say_hardware(args, &report);
            Ok((ATS_MODE_HARDWARE, Some(report)))
        }
        (AtsChoice::Auto, AtsKind::Hardware) => match run_selftest(lun, args, open)? {
            Ok(report) => {
                say_hardware(args, &report);
                Ok((ATS_MODE_HARDWARE, Some(report)))
            }
            Err(why) => {
                // Disk Paxos uses nothing but the device's reads and writes: a broken
                // COMPARE AND WRITE does not matter to it.
                say_paxos(
                    args,
                    &format!("its COMPARE AND WRITE cannot be trusted: {why}"),
                );
                Ok((ATS_MODE_DISK_PAXOS, None))
            }
        },
        (AtsChoice::Auto, _) => {
            say_paxos(
                args,
                &format!(
                    "{} has no hardware COMPARE AND WRITE (image files and block devices \
                     without SG_IO have none; --ats emulated is faster, for hosts on this \
                     machine only)",
                    lun.describe()
                ),
            );
            Ok((ATS_MODE_DISK_PAXOS, None))
        }
    }
}

fn say_paxos(args: &Args, why: &str) {
    say(
        args,
        &format!(
            "ATS: Disk Paxos, because {why}: test-and-set takes the volume's token with plain \
             sector reads and writes (no COMPARE AND WRITE needed, hosts on any machine that \
             share the disk); a mount waits half a lease for its slot"
        ),
    );
}

fn say_hardware(args: &Args, report: &SelftestReport) {
    say(
        args,
        &format!(
            "ATS: hardware (SCSI COMPARE AND WRITE): the self-test passed ({} sessions x {} \
             increments, {:.0} CAW/s)",
            report.sessions, report.increments_per_session, report.caws_per_s
        ),
    );
}

/// The ATS self-test on the sector mkfs is about to overwrite: the report when the
/// device passed, `Ok(Err(why))` when it failed (or has no COMPARE AND WRITE after
/// all), `Err` when the test could not judge it.
fn run_selftest(
    lun: &dyn Lun,
    args: &Args,
    open: &SessionFactory<'_>,
) -> Result<Result<SelftestReport, String>, Failure> {
    let device = lun.describe();
    let opts = SelftestOptions {
        offset: selftest_sector(lun, true)?,
        sessions: selftest::SESSIONS_DEFAULT,
        increments: SELFTEST_INCREMENTS,
    };
    say(
        args,
        &format!(
            "testing that {device}'s COMPARE AND WRITE is atomic ({} sessions x {} increments)...",
            opts.sessions, opts.increments
        ),
    );
    let report = match selftest::run(open, &opts, &mut |_, _| {}) {
        Ok(report) => report,
        Err(e) if e.blames_device() || lacks_caw(&e) => {
            return Ok(Err(format!(
                "the ATS self-test of {device} could not finish: {e}"
            )))
        }
        Err(e) => {
            return Err(Failure::Io(format!(
                "the ATS self-test of {device} could not finish: {e}"
            )))
        }
    };
    if report.passed() {
        return Ok(Ok(report));
    }
    Ok(Err(format!(
        "{device} failed the ATS self-test, so mkfs.atsfs will not make a hardware-ATS volume \
         on it: {}. Fix the storage and run mkfs.atsfs again (`atsfs ats-selftest` repeats \
         the test), or leave --ats out: mkfs.atsfs then makes a Disk Paxos volume, which \
         needs no COMPARE AND WRITE",
        report.problems.join("; ")
    )))
}

/// True when the self-test stopped because the device refused COMPARE AND WRITE
/// (a SCSI disk that did not say so before the first one).
fn lacks_caw(e: &SelftestError) -> bool {
    matches!(
        e,
        SelftestError::Io(LunError::NoCompareAndWrite { .. })
            | SelftestError::Open(LunError::NoCompareAndWrite { .. })
    )
}

/// The summary line of a self-test mkfs ran.
pub fn print_selftest(report: &SelftestReport) {
    println!(
        "  ATS self-test      passed: {} sessions x {} increments, {:.0} CAW/s, {} miscompares",
        report.sessions, report.increments_per_session, report.caws_per_s, report.miscompares
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use atsfs::lun::{check_caw, Caw, LunResult, MemLun, PlainDisk};
    use clap::Parser;
    use std::sync::Arc;
    use std::time::Duration;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["mkfs.atsfs", "-q"];
        argv.extend_from_slice(extra);
        argv.push("/dev/null");
        Args::try_parse_from(argv).expect("arguments parse")
    }

    fn refusal(result: Result<impl std::fmt::Debug, Failure>) -> String {
        match result {
            Err(Failure::Refused(message)) => message,
            Err(Failure::Io(message)) => panic!("an I/O failure, not a refusal: {message}"),
            Ok(v) => panic!("not refused: {v:?}"),
        }
    }

    /// Says its compare-and-write is the storage's; `racy` makes it read, compare,
    /// sleep and write without a lock, as a target with several I/O threads per LUN.
    struct TestHardwareLun {
        inner: Arc<MemLun>,
        racy: bool,
    }

    impl Lun for TestHardwareLun {
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
            if !self.racy {
                return self.inner.compare_and_write(offset, expected, new);
            }
            check_caw(offset, expected, new, self.sector_size(), self.len_bytes())?;
            let mut actual = vec![0u8; expected.len()];
            self.inner.read_at(&mut actual, offset)?;
            if actual != expected {
                return Ok(Caw::Miscompare(actual));
            }
            std::thread::sleep(Duration::from_micros(50));
            self.inner.write_at(new, offset)?;
            Ok(Caw::Written)
        }
        fn flush(&self) -> LunResult<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "test LUN".into()
        }
        fn ats_kind(&self) -> AtsKind {
            AtsKind::Hardware
        }
    }

    fn hardware(mem: &Arc<MemLun>, racy: bool) -> Arc<dyn Lun> {
        Arc::new(TestHardwareLun {
            inner: mem.clone(),
            racy,
        })
    }

    #[test]
    fn auto_takes_disk_paxos_on_an_emulated_device_and_emulated_only_when_asked() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(mem.clone()) };
        let (mode, tested) = choose_ats(mem.as_ref(), &args(&[]), &open).expect("auto");
        assert_eq!((mode, tested.is_none()), (ATS_MODE_DISK_PAXOS, true));
        let (mode, _) =
            choose_ats(mem.as_ref(), &args(&["--ats", "emulated"]), &open).expect("emulated");
        assert_eq!(mode, ATS_MODE_EMULATED);
        let (mode, _) = choose_ats(mem.as_ref(), &args(&["--ats", "paxos"]), &open).expect("paxos");
        assert_eq!(mode, ATS_MODE_DISK_PAXOS);
        let text = refusal(choose_ats(
            mem.as_ref(),
            &args(&["--ats", "hardware"]),
            &open,
        ));
        assert!(text.contains("has no hardware ATS"), "{text}");
    }

    #[test]
    fn a_plain_disk_gets_disk_paxos_and_refuses_emulated_and_hardware() {
        let mem: Arc<dyn Lun> = Arc::new(MemLun::new(1 << 20, 512));
        let plain = PlainDisk(mem.clone());
        assert_eq!(plain.ats_kind(), AtsKind::Plain);
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(Arc::new(PlainDisk(mem.clone()))) };
        for choice in [&[][..], &["--ats", "auto"][..], &["--ats", "paxos"][..]] {
            let (mode, tested) = choose_ats(&plain, &args(choice), &open).expect("disk paxos");
            assert_eq!((mode, tested.is_none()), (ATS_MODE_DISK_PAXOS, true));
        }
        let text = refusal(choose_ats(&plain, &args(&["--ats", "emulated"]), &open));
        assert!(text.contains("no compare-and-write at all"), "{text}");
        let text = refusal(choose_ats(&plain, &args(&["--ats", "hardware"]), &open));
        assert!(text.contains("has no hardware ATS"), "{text}");
    }

    #[test]
    fn emulated_is_refused_on_a_hardware_device() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        let lun = hardware(&mem, false);
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(hardware(&mem, false)) };
        let text = refusal(choose_ats(
            lun.as_ref(),
            &args(&["--ats", "emulated"]),
            &open,
        ));
        assert!(text.contains("does hardware ATS"), "{text}");
    }

    #[test]
    fn hardware_needs_the_self_test_to_pass_and_auto_falls_back_to_disk_paxos() {
        let mem = Arc::new(MemLun::new(1 << 20, 512));
        let lun = hardware(&mem, false);
        let open = || -> LunResult<Arc<dyn Lun>> { Ok(hardware(&mem, false)) };
        for choice in [&[][..], &["--ats", "hardware"][..]] {
            let (mode, tested) = choose_ats(lun.as_ref(), &args(choice), &open).expect("atomic");
            assert_eq!(mode, ATS_MODE_HARDWARE);
            assert!(tested.is_some_and(|r| r.passed()));
        }
        let racy = || -> LunResult<Arc<dyn Lun>> { Ok(hardware(&mem, true)) };
        let text = refusal(choose_ats(
            lun.as_ref(),
            &args(&["--ats", "hardware"]),
            &racy,
        ));
        assert!(
            text.contains("failed the ATS self-test")
                && text.contains("COMPARE AND WRITE is not atomic on this device"),
            "{text}"
        );
        // `auto` does not trust the broken COMPARE AND WRITE, and needs none.
        let (mode, tested) = choose_ats(lun.as_ref(), &args(&[]), &racy).expect("auto");
        assert_eq!((mode, tested.is_none()), (ATS_MODE_DISK_PAXOS, true));
        // The borrowed sector got its content back.
        let mut sector = vec![1u8; 512];
        mem.read_at(&mut sector, 512).expect("read");
        assert_eq!(sector, vec![0u8; 512]);
    }
}
