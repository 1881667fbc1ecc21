#![allow(clippy::big_endian_bytes)]

use super::cdb::{self, OpcodeSupport, PrIn, PrOut};
use super::fake::{FakeConfig, FakeDisk, FakeTransport, Fault};
use super::sense::{self, Sense};
use super::*;
use crate::lun::{Caw, Lun, LunError, OpenMode, ReservationKey, ReservationType};
use std::sync::Arc;

fn open(disk: &Arc<FakeDisk>) -> ScsiLun<FakeTransport> {
    ScsiLun::open(disk.connect(), OpenMode::ReadWrite).unwrap()
}

fn disk() -> Arc<FakeDisk> {
    FakeDisk::new(FakeConfig::default())
}

// ---- CDB encoding ----

#[test]
fn cdbs_encode_per_sbc3_and_spc4() {
    assert_eq!(
        cdb::read16(0x0102030405060708, 0x0A0B0C0D),
        [0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0A, 0x0B, 0x0C, 0x0D, 0, 0]
    );
    assert_eq!(
        cdb::write16(8, 16),
        [0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0]
    );
    assert_eq!(
        cdb::compare_and_write(3, 8),
        [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 8, 0, 0]
    );
    assert_eq!(cdb::synchronize_cache16(), {
        let mut c = [0u8; 16];
        c[0] = 0x91;
        c
    });
    assert_eq!(
        cdb::synchronize_cache10(),
        [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        cdb::read_capacity16(),
        [0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
    );
    assert_eq!(cdb::inquiry_vpd(0xB0, 64), [0x12, 1, 0xB0, 0, 64, 0]);
    assert_eq!(
        cdb::report_supported_opcode(0x89, 64),
        [0xA3, 0x0C, 0x01, 0x89, 0, 0, 0, 0, 0, 64, 0, 0]
    );
    assert_eq!(
        cdb::pr_in(PrIn::ReadKeys, 0x0808),
        [0x5E, 0, 0, 0, 0, 0, 0, 0x08, 0x08, 0]
    );
    assert_eq!(cdb::pr_in(PrIn::ReadReservation, 24)[1], 0x01);
    assert_eq!(cdb::pr_in(PrIn::ReportCapabilities, 8)[1], 0x02);
    let kind = ReservationType::WriteExclusiveRegistrantsOnly;
    assert_eq!(
        cdb::pr_out(PrOut::Reserve, kind),
        [0x5F, 0x01, 0x05, 0, 0, 0, 0, 0, 24, 0]
    );
    for (action, code) in [
        (PrOut::Register, 0),
        (PrOut::Release, 2),
        (PrOut::Preempt, 4),
        (PrOut::PreemptAndAbort, 5),
        (PrOut::RegisterAndIgnoreExistingKey, 6),
    ] {
        assert_eq!(cdb::pr_out(action, kind)[1], code);
    }
    let params = cdb::pr_out_parameters(0x1122334455667788, 0x99);
    assert_eq!(
        params[..8],
        [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
    );
    assert_eq!(params[8..16], [0, 0, 0, 0, 0, 0, 0, 0x99]);
    assert!(
        params[16..].iter().all(|b| *b == 0),
        "no APTPL, no ALL_TG_PT"
    );
}

// ---- replies and sense ----

#[test]
fn read_capacity_gives_the_physical_block_exponent() {
    let mut r = [0u8; 32];
    r[0..8].copy_from_slice(&1023u64.to_be_bytes());
    r[8..12].copy_from_slice(&512u32.to_be_bytes());
    r[13] = 0x43; // P_I_EXPONENT 4 in the high nibble, LBPPBE 3
    let cap = cdb::parse_read_capacity16(&r).unwrap();
    assert_eq!(cap.last_lba, 1023);
    assert_eq!(cap.logical_block_bytes, 512);
    assert_eq!(cap.physical_exponent, 3);
    assert_eq!(cdb::parse_read_capacity16(&r[..12]), None);
}

#[test]
fn fixed_sense_parses_key_asc_and_information() {
    let mut s = [0u8; 18];
    s[0] = 0xF0; // VALID, current
    s[2] = 0x0E;
    s[3..7].copy_from_slice(&17u32.to_be_bytes());
    s[7] = 10;
    s[12] = 0x1D;
    let sense = Sense::parse(&s).unwrap();
    assert!(sense.is_miscompare());
    assert_eq!(sense.information, Some(17));
    assert!(!sense.deferred);
    // Without VALID the INFORMATION field means nothing.
    s[0] = 0x70;
    assert_eq!(Sense::parse(&s).unwrap().information, None);
    // Deferred, and a buffer cut short: parsed as far as it goes.
    s[0] = 0x71;
    let short = Sense::parse(&s[..8]).unwrap();
    assert!(short.deferred);
    assert_eq!((short.key, short.asc, short.ascq), (0x0E, 0, 0));
    assert_eq!(Sense::parse(&[]), None);
    assert_eq!(Sense::parse(&[0x00, 1, 2]), None);
}

#[test]
fn descriptor_sense_parses_the_information_descriptor() {
    let mut s = vec![0x72, 0x0E, 0x1D, 0x00, 0, 0, 0, 0];
    // A vendor descriptor first, then the information descriptor.
    s.extend_from_slice(&[0x80, 2, 0xAA, 0xBB]);
    s.extend_from_slice(&[0x00, 0x0A, 0x80, 0]);
    s.extend_from_slice(&300u64.to_be_bytes());
    s[7] = (s.len() - 8) as u8;
    let sense = Sense::parse(&s).unwrap();
    assert!(sense.is_miscompare());
    assert_eq!(sense.information, Some(300));
    // A descriptor whose length runs past the buffer is not read past it.
    let mut bad = vec![0x73, 0x06, 0x29, 0x00, 0, 0, 0, 200, 0x00, 0xFF, 0x80];
    bad.push(1);
    let sense = Sense::parse(&bad).unwrap();
    assert!(sense.deferred);
    assert_eq!(sense.key, sense::UNIT_ATTENTION);
    assert_eq!(sense.information, None);
    assert!(sense.to_string().contains("UNIT ATTENTION"), "{sense}");
}

#[test]
fn pr_in_replies_parse_and_lying_lengths_do_not_panic() {
    let mut r = vec![0, 0, 0, 9, 0, 0, 0, 16];
    r.extend_from_slice(&1u64.to_be_bytes());
    r.extend_from_slice(&2u64.to_be_bytes());
    let (keys, cut) = cdb::parse_read_keys(&r).unwrap();
    assert_eq!(keys, vec![ReservationKey(1), ReservationKey(2)]);
    assert!(!cut);
    // ADDITIONAL LENGTH says more than arrived.
    r[7] = 200;
    let (keys, cut) = cdb::parse_read_keys(&r).unwrap();
    assert_eq!(keys.len(), 2);
    assert!(cut);
    assert_eq!(cdb::parse_read_keys(&r[..5]), None);

    let none = [0u8, 0, 0, 1, 0, 0, 0, 0];
    assert_eq!(cdb::parse_read_reservation(&none), Some(None));
    let mut held = vec![0u8, 0, 0, 1, 0, 0, 0, 16];
    held.extend_from_slice(&7u64.to_be_bytes());
    held.extend_from_slice(&[0, 0, 0, 0, 0, 0x05, 0, 0]);
    let res = cdb::parse_read_reservation(&held).unwrap().unwrap();
    assert_eq!(res.key, ReservationKey(7));
    assert_eq!(res.kind, ReservationType::WriteExclusiveRegistrantsOnly);
    assert_eq!(cdb::parse_read_reservation(&held[..12]), None);

    let caps = cdb::parse_report_capabilities(&[0, 8, 0x11, 0x81, 0x20, 0x00, 0, 0]).unwrap();
    assert!(caps.compatible_reservation_handling && caps.ptpl_capable && caps.ptpl_active);
    assert!(caps.type_mask_valid && caps.write_exclusive_registrants_only);
    assert!(!caps.exclusive_access_all_registrants);
    assert_eq!(cdb::parse_opcode_support(&[0, 3]), OpcodeSupport::Supported);
    assert_eq!(
        cdb::parse_opcode_support(&[0, 1]),
        OpcodeSupport::NotSupported
    );
    assert_eq!(cdb::parse_opcode_support(&[0, 0]), OpcodeSupport::Unknown);
    assert_eq!(
        cdb::parse_max_caw_blocks(&[0, 0xB0, 0, 0x3C, 0, 1]),
        Some(1)
    );
    assert_eq!(cdb::parse_max_caw_blocks(&[0, 0x80, 0, 0x3C, 0, 1]), None);
}

// ---- ScsiLun against the fake disk ----

#[test]
fn the_ats_sector_is_the_physical_block() {
    let disk = FakeDisk::new(FakeConfig {
        physical_exponent: 3,
        ..FakeConfig::default()
    });
    let lun = open(&disk);
    assert_eq!(lun.sector_size(), 4096);
    assert_eq!(lun.logical_block_bytes(), 512);
    assert_eq!(lun.len_bytes(), 2048 * 512);
    assert_eq!(lun.ats_kind(), crate::lun::AtsKind::Hardware);
    assert_eq!(lun.caw_support(), CawSupport::Supported);
    let plain = open(&FakeDisk::new(FakeConfig::default()));
    assert_eq!(plain.sector_size(), 512);
    // A physical block larger than an ATS sector may be is refused, not shrunk.
    let huge = FakeDisk::new(FakeConfig {
        physical_exponent: 8,
        ..FakeConfig::default()
    });
    let err = ScsiLun::open(huge.connect(), OpenMode::ReadOnly)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("larger than an ATS sector"),
        "{err}"
    );
}

#[test]
fn reads_and_writes_round_trip_in_chunks_and_unaligned_reads_widen() {
    let disk = disk();
    let mut transport = disk.connect();
    transport.max_transfer_bytes = 4096;
    let lun = ScsiLun::open(transport, OpenMode::ReadWrite).unwrap();
    let data: Vec<u8> = (0..5 * 4096u32 + 512).map(|i| (i % 251) as u8).collect();
    lun.write_at(&data, 1024).unwrap();
    assert_eq!(disk.bytes(1024, data.len()), data);
    let mut back = vec![0u8; data.len()];
    lun.read_at(&mut back, 1024).unwrap();
    assert_eq!(back, data);
    let mut part = vec![0u8; 9000];
    lun.read_at(&mut part, 1024 + 100).unwrap();
    assert_eq!(part, data[100..9100]);
    lun.flush().unwrap();
    // Writes are whole logical blocks.
    let err = lun.write_at(&data[..100], 1024).unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    let err = lun.write_at(&data[..512], 1000).unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    let err = lun.read_at(&mut part, lun.len_bytes() - 10).unwrap_err();
    assert!(matches!(err, LunError::OutOfRange { .. }), "{err}");
}

#[test]
fn compare_and_write_writes_or_returns_the_actual_sector() {
    let disk = FakeDisk::new(FakeConfig {
        physical_exponent: 3,
        ..FakeConfig::default()
    });
    let lun = open(&disk);
    let zero = vec![0u8; 4096];
    let a = vec![0xAAu8; 4096];
    let b = vec![0xBBu8; 4096];
    assert_eq!(
        lun.compare_and_write(8192, &zero, &a).unwrap(),
        Caw::Written
    );
    assert_eq!(disk.bytes(8192, 4096), a);
    assert_eq!(
        lun.compare_and_write(8192, &zero, &b).unwrap(),
        Caw::Miscompare(a.clone())
    );
    assert_eq!(disk.bytes(8192, 4096), a);
    assert_eq!(disk.bytes(4096, 4096), zero);
    let err = lun.compare_and_write(512, &zero, &a).unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    // The CAW went out as one command of 8 blocks with expected ‖ new.
    assert!(disk.opcodes().contains(&cdb::COMPARE_AND_WRITE));
}

#[test]
fn caw_with_descriptor_sense_and_a_false_miscompare() {
    let disk = FakeDisk::new(FakeConfig {
        descriptor_sense: true,
        ..FakeConfig::default()
    });
    let lun = open(&disk);
    let zero = vec![0u8; 512];
    let a = vec![1u8; 512];
    lun.write_at(&a, 0).unwrap();
    assert_eq!(
        lun.compare_and_write(0, &zero, &a).unwrap(),
        Caw::Miscompare(a.clone())
    );
    // The device says MISCOMPARE but the sector reads back as expected: returned as
    // read, for the caller to re-verify.
    let miscompare = disk.sense(sense::MISCOMPARE, 0x1D, 0, Some(0));
    disk.inject(
        lun.transport().nexus,
        Fault::Reply(STATUS_CHECK_CONDITION, miscompare),
    );
    assert_eq!(
        lun.compare_and_write(0, &a, &zero).unwrap(),
        Caw::Miscompare(a.clone())
    );
}

#[test]
fn a_device_without_compare_and_write_gives_a_clear_error() {
    for rsoc in [true, false] {
        let disk = FakeDisk::new(FakeConfig {
            caw: false,
            rsoc,
            ..FakeConfig::default()
        });
        let lun = open(&disk);
        assert_eq!(lun.caw_support(), CawSupport::NotSupported, "rsoc {rsoc}");
        // A plain disk to mkfs (Disk Paxos) and to the volume's ATS check.
        assert_eq!(lun.ats_kind(), crate::lun::AtsKind::Plain, "rsoc {rsoc}");
        let zero = vec![0u8; 512];
        let err = lun.compare_and_write(0, &zero, &zero).unwrap_err();
        assert!(matches!(err, LunError::NoCompareAndWrite { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("COMPARE AND WRITE") && text.contains("Disk Paxos"),
            "{text}"
        );
        assert_eq!(err.errno(), libc::EOPNOTSUPP);
    }
    // Read-only, no RSOC: unknown until a CAW is tried; nothing was written to probe.
    let disk = FakeDisk::new(FakeConfig {
        caw: false,
        rsoc: false,
        ..FakeConfig::default()
    });
    let lun = ScsiLun::open(disk.connect(), OpenMode::ReadOnly).unwrap();
    assert_eq!(lun.caw_support(), CawSupport::Unknown);
    assert!(!disk.opcodes().contains(&cdb::COMPARE_AND_WRITE));
    let zero = vec![0u8; 512];
    assert!(lun.compare_and_write(0, &zero, &zero).is_err());
    assert!(lun.write_at(&zero, 0).is_err());
    let sent = disk.opcodes().len();
    lun.flush().unwrap();
    assert_eq!(
        disk.opcodes().len(),
        sent,
        "a read-only flush sends nothing"
    );
}

#[test]
fn a_caw_probe_changes_nothing() {
    let disk = FakeDisk::new(FakeConfig {
        rsoc: false,
        ..FakeConfig::default()
    });
    disk.connect();
    let first = disk.connect();
    let nexus = first.nexus;
    let writer = ScsiLun::open(first, OpenMode::ReadWrite).unwrap();
    writer.write_at(&[7u8; 512], 0).unwrap();
    let lun = open(&disk);
    assert_eq!(lun.caw_support(), CawSupport::Supported);
    assert_eq!(disk.bytes(0, 512), vec![7u8; 512]);
    let _ = nexus;
}

#[test]
fn a_caw_probe_changes_nothing_even_where_the_compare_is_broken() {
    let disk = FakeDisk::new(FakeConfig {
        rsoc: false,
        compare_broken: true,
        ..FakeConfig::default()
    });
    let writer = ScsiLun::open(disk.connect(), OpenMode::ReadWrite).unwrap();
    writer.write_at(&[7u8; 512], 0).unwrap();
    let _lun = open(&disk);
    assert_eq!(
        disk.bytes(0, 512),
        vec![7u8; 512],
        "the probe wrote into sector 0"
    );
}

#[test]
fn a_caw_limit_below_one_sector_is_no_caw() {
    let disk = FakeDisk::new(FakeConfig {
        physical_exponent: 3,
        max_caw_blocks: Some(1),
        ..FakeConfig::default()
    });
    let lun = open(&disk);
    assert_eq!(lun.caw_support(), CawSupport::NotSupported);
    let sector = vec![0u8; 4096];
    let err = lun.compare_and_write(0, &sector, &sector).unwrap_err();
    assert!(err.to_string().contains("at most 1 logical block"), "{err}");
}

#[test]
fn unit_attentions_and_busy_are_retried_a_bounded_number_of_times() {
    let disk = disk();
    let lun = open(&disk);
    let nexus = lun.transport().nexus;
    let ua = disk.sense(sense::UNIT_ATTENTION, 0x29, 0, None);
    disk.inject(nexus, Fault::Reply(STATUS_CHECK_CONDITION, ua.clone()));
    disk.inject(nexus, Fault::Reply(STATUS_BUSY, Vec::new()));
    lun.write_at(&[1u8; 512], 0).unwrap();
    assert_eq!(disk.bytes(0, 512), vec![1u8; 512]);
    for _ in 0..=RETRIES_MAX {
        disk.inject(nexus, Fault::Reply(STATUS_CHECK_CONDITION, ua.clone()));
    }
    let err = lun.write_at(&[2u8; 512], 0).unwrap_err();
    assert!(matches!(err, LunError::Scsi { .. }), "{err}");
    assert!(err.to_string().contains("power on, reset"), "{err}");
    assert_eq!(disk.bytes(0, 512), vec![1u8; 512]);
}

#[test]
fn medium_and_hardware_errors_are_scsi_errors_with_the_sense() {
    let disk = disk();
    let lun = open(&disk);
    let nexus = lun.transport().nexus;
    disk.inject(
        nexus,
        Fault::Reply(
            STATUS_CHECK_CONDITION,
            disk.sense(sense::MEDIUM_ERROR, 0x11, 0, None),
        ),
    );
    let mut buf = [0u8; 512];
    let err = lun.read_at(&mut buf, 0).unwrap_err();
    assert!(err.to_string().contains("MEDIUM ERROR"), "{err}");
    assert!(err.to_string().contains("unrecovered read error"), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    disk.inject(
        nexus,
        Fault::Reply(
            STATUS_CHECK_CONDITION,
            disk.sense(sense::DATA_PROTECT, 0x27, 0, None),
        ),
    );
    let err = lun.write_at(&buf, 0).unwrap_err();
    assert!(err.to_string().contains("write protected"), "{err}");
    disk.inject(nexus, Fault::Reply(STATUS_CHECK_CONDITION, vec![0x70]));
    assert!(lun.read_at(&mut buf, 0).is_err());
    disk.inject(nexus, Fault::Reply(STATUS_CHECK_CONDITION, Vec::new()));
    assert!(lun
        .read_at(&mut buf, 0)
        .unwrap_err()
        .to_string()
        .contains("without readable sense"));
}

#[test]
fn a_lost_connection_reconnects_once() {
    let disk = disk();
    let lun = open(&disk);
    let nexus = lun.transport().nexus;
    disk.inject(nexus, Fault::LostBefore);
    lun.write_at(&[3u8; 512], 512).unwrap();
    assert_eq!(
        lun.transport()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    disk.inject(nexus, Fault::LostBefore);
    disk.inject(nexus, Fault::LostBefore);
    let err = lun.write_at(&[4u8; 512], 512).unwrap_err();
    assert!(matches!(err, LunError::Transport { .. }), "{err}");
    assert!(
        err.to_string().contains("may or may not have landed"),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EIO);

    let mut failing = disk.connect();
    failing.fail_reconnect = true;
    let nexus = failing.nexus;
    let lun = ScsiLun::open(failing, OpenMode::ReadWrite).unwrap();
    disk.inject(nexus, Fault::LostBefore);
    let err = lun.flush().unwrap_err();
    assert!(err.to_string().contains("reconnecting failed"), "{err}");
}

#[test]
fn a_caw_whose_reply_was_lost_comes_back_as_our_own_image() {
    let disk = disk();
    let lun = open(&disk);
    let (zero, new) = (vec![0u8; 512], vec![9u8; 512]);
    disk.inject(lun.transport().nexus, Fault::LostAfter);
    // The CAW landed, the reply was lost, the re-sent CAW miscompares: the actual
    // sector is the caller's own new image, which it recognises as success.
    assert_eq!(
        lun.compare_and_write(1024, &zero, &new).unwrap(),
        Caw::Miscompare(new.clone())
    );
}

#[test]
fn preempting_a_key_fences_its_initiator() {
    let disk = disk();
    let survivor = open(&disk);
    let victim = open(&disk);
    let outsider = open(&disk);
    let (k1, k2) = (ReservationKey(0xA1), ReservationKey(0xB2));
    let pr1 = survivor.reservations().unwrap();
    let pr2 = victim.reservations().unwrap();
    pr1.register(k1).unwrap();
    pr2.register(k2).unwrap();
    pr1.reserve(k1).unwrap();
    // A second reserve by another registrant: the LUN is already type 5.
    pr2.reserve(k2).unwrap();
    assert_eq!(
        pr1.read_reservation().unwrap(),
        Some(Reservation {
            key: k1,
            kind: ReservationType::WriteExclusiveRegistrantsOnly
        })
    );
    let mut keys = pr1.read_keys().unwrap();
    keys.sort();
    assert_eq!(keys, vec![k1, k2]);
    // Registrants write; an unregistered initiator is refused.
    victim.write_at(&[5u8; 512], 0).unwrap();
    let err = outsider.write_at(&[6u8; 512], 0).unwrap_err();
    assert!(matches!(err, LunError::Fenced(_)), "{err}");
    // Reads stay allowed under Write Exclusive.
    let mut buf = [0u8; 512];
    outsider.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [5u8; 512]);

    pr1.preempt(k1, k2, true).unwrap();
    assert_eq!(pr1.read_keys().unwrap(), vec![k1]);
    let err = victim.write_at(&[7u8; 512], 0).unwrap_err();
    let LunError::Fenced(why) = &err else {
        panic!("expected fencing, got {err}");
    };
    assert!(why.contains("reservation key was removed"), "{why}");
    let zero = [0u8; 512];
    let err = victim.compare_and_write(0, &[5u8; 512], &zero).unwrap_err();
    assert!(matches!(err, LunError::Fenced(_)), "{err}");
    assert!(matches!(victim.flush().unwrap_err(), LunError::Fenced(_)));
    assert_eq!(disk.bytes(0, 512), vec![5u8; 512]);
    // Preempting a key that is gone already is fine; preempting with a key that is
    // not ours is not.
    pr1.preempt(k1, k2, false).unwrap();
    let err = pr2.preempt(k2, k1, false).unwrap_err();
    assert!(matches!(err, LunError::Fenced(_)), "{err}");
    survivor.write_at(&[8u8; 512], 0).unwrap();
    pr1.release(k1).unwrap();
    assert_eq!(pr1.read_reservation().unwrap(), None);
    pr1.unregister().unwrap();
    pr1.unregister().unwrap();
    assert!(pr1.read_keys().unwrap().is_empty());
    assert!(pr1.register(ReservationKey(0)).is_err());
    let caps = pr1.capabilities().unwrap();
    assert!(caps.write_exclusive_registrants_only);
}

#[test]
fn preempting_the_holder_takes_the_reservation_over() {
    let disk = disk();
    let a = open(&disk);
    let b = open(&disk);
    let (ka, kb) = (ReservationKey(1), ReservationKey(2));
    let (pa, pb) = (a.reservations().unwrap(), b.reservations().unwrap());
    pa.register(ka).unwrap();
    pb.register(kb).unwrap();
    pa.reserve(ka).unwrap();
    pb.preempt(kb, ka, false).unwrap();
    let res = pb.read_reservation().unwrap().unwrap();
    assert_eq!(res.key, kb);
    assert_eq!(res.kind, ReservationType::WriteExclusiveRegistrantsOnly);
    assert!(matches!(
        a.write_at(&[1u8; 512], 0).unwrap_err(),
        LunError::Fenced(_)
    ));
}

#[test]
fn sync_cache_falls_back_to_the_10_byte_form() {
    let disk = FakeDisk::new(FakeConfig {
        sync16: false,
        ..FakeConfig::default()
    });
    let lun = open(&disk);
    lun.flush().unwrap();
    assert!(disk.opcodes().contains(&cdb::SYNCHRONIZE_CACHE_10));
}

#[test]
fn wrappers_forward_reservations() {
    let disk = disk();
    let lun: Arc<dyn Lun> = Arc::new(open(&disk));
    assert!(lun.reservations().is_some());
    let fault = crate::lun::FaultLun::new(lun.clone(), crate::lun::FaultConfig::default());
    assert!(fault.reservations().is_some());
    let mem = crate::lun::MemLun::new(1 << 20, 512);
    assert!(mem.reservations().is_none());
}

#[test]
fn preempt_and_abort_falls_back_to_preempt_where_the_device_lacks_it() {
    let disk = FakeDisk::new(FakeConfig {
        preempt_abort: false,
        ..FakeConfig::default()
    });
    let (a, b) = (open(&disk), open(&disk));
    let (pa, pb) = (a.reservations().unwrap(), b.reservations().unwrap());
    pa.register(ReservationKey(1)).unwrap();
    pb.register(ReservationKey(2)).unwrap();
    pa.reserve(ReservationKey(1)).unwrap();
    pa.preempt(ReservationKey(1), ReservationKey(2), true)
        .unwrap();
    assert_eq!(pa.read_keys().unwrap(), vec![ReservationKey(1)]);
    assert!(matches!(
        b.write_at(&[0u8; 512], 0).unwrap_err(),
        LunError::Fenced(_)
    ));
}

#[test]
fn a_reservation_of_another_type_is_not_taken_for_ours() {
    let disk = disk();
    let (a, b) = (open(&disk), open(&disk));
    let (pa, pb) = (a.reservations().unwrap(), b.reservations().unwrap());
    pa.register(ReservationKey(1)).unwrap();
    pb.register(ReservationKey(2)).unwrap();
    // Another host reserves as Exclusive Access (type 3), outside atsfs.
    let cdb = cdb::pr_out(PrOut::Reserve, ReservationType::ExclusiveAccess);
    let params = cdb::pr_out_parameters(1, 0);
    let status = a.transport().execute(&cdb, DataDir::Out(&params)).unwrap();
    assert_eq!(status.status, STATUS_GOOD);
    let err = pb.reserve(ReservationKey(2)).unwrap_err();
    assert!(err.to_string().contains("not Write Exclusive"), "{err}");
}

/// Four threads add to one counter by compare-and-write through one `ScsiLun`.
#[test]
fn compare_and_write_counts_exactly_under_contention() {
    use std::thread;
    let disk = disk();
    let luns: Vec<_> = (0..2).map(|_| Arc::new(open(&disk))).collect();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let lun = luns[i % 2].clone();
            thread::spawn(move || {
                for _ in 0..200 {
                    let mut expected = vec![0u8; 512];
                    lun.read_at(&mut expected, 4096).unwrap();
                    loop {
                        let n = u64::from_le_bytes(expected[..8].try_into().unwrap());
                        let mut new = expected.clone();
                        new[..8].copy_from_slice(&(n + 1).to_le_bytes());
                        match lun.compare_and_write(4096, &expected, &new).unwrap() {
                            Caw::Written => break,
                            Caw::Miscompare(actual) => expected = actual,
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = u64::from_le_bytes(disk.bytes(4096, 8).try_into().unwrap());
    assert_eq!(n, 800);
}

#[test]
fn a_deferred_error_fences_the_host() {
    let disk = disk();
    let lun = open(&disk);
    let nexus = lun.transport().nexus;
    // A MEDIUM ERROR reported as deferred: an earlier, acknowledged write was lost.
    let mut deferred = disk.sense(sense::MEDIUM_ERROR, 0x0C, 0, None);
    deferred[0] = (deferred[0] & 0x80) | 0x71;
    disk.inject(nexus, Fault::Reply(STATUS_CHECK_CONDITION, deferred));
    let err = lun.write_at(&[1u8; 512], 0).unwrap_err();
    assert!(matches!(err, LunError::Fenced(_)), "{err}");
    assert!(err.to_string().contains("deferred"), "{err}");
}
