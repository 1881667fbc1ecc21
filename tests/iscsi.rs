//! Hosts over a real iSCSI target: tgtd (built by `cargo xtask tgt build`, COMPARE
//! AND WRITE enabled, one I/O thread) serves the test's image as LUN 1, and each host
//! runs in its own network namespace, a separate initiator (docs/testing.md, "Real
//! iSCSI: the tgt test bed").
//!
//! Every test skips itself unless it runs as root with a tgt build; those that mount
//! `iscsi://` URLs also skip until atsfs has its iSCSI backend.

mod common;

use common::tgt;
use common::{assert_fsck_clean, short_lease_opts, MountSpec, Scratch};
use std::path::{Path, PathBuf};

/// True once `atsfs mount` and friends take `iscsi://` URLs.
fn iscsi_backend() -> bool {
    let url = Path::new("iscsi://127.0.0.1:3260/iqn.2026-12.org.atsfs:testbed/1");
    atsfs::lun::device_kind(url) != atsfs::lun::DeviceKind::File
}

/// The bed itself: tgtd serves the image as LUN 1 (rdwr backend) and every host
/// namespace reaches its portal over the bridge.
#[test]
fn the_test_bed_serves_hosts_in_namespaces() {
    let bins = require_tgt!();
    let scratch = Scratch::new("iscsi_bed");
    let image = scratch.join("lun.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("making the image");
    let target = tgt::serve(&bins, &scratch, &image);
    let shown = target
        .tgtadm(&bins, &["--mode", "target", "--op", "show"], false)
        .expect("tgtadm show");
    assert!(
        shown.contains(&format!("Backing store path: {}", image.display()))
            && shown.contains("Backing store type: rdwr"),
        "tgtadm does not show LUN 1 on the image:\n{shown}"
    );
    tgt::hosts_up(2);
    let port = target.spec.portal.port();
    for host in 1..=2 {
        let status = tgt::host_command(host, "timeout")
            .args(["5", "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{}/{port}",
                common::testbed::BRIDGE_ADDR
            ))
            .status()
            .expect("running nsenter");
        assert!(status.success(), "host {host} cannot reach tgtd's portal");
    }
    assert!(target.url_for_hosts().starts_with("iscsi://10.213.0.1:"));
}

/// Two hosts, each its own initiator in its own namespace, mount one volume over
/// iSCSI; what one writes the other reads; fsck is clean afterwards.
#[test]
fn two_hosts_share_a_volume_over_iscsi() {
    let bins = require_tgt!();
    if !iscsi_backend() {
        eprintln!("skipped: atsfs has no iSCSI backend yet");
        return;
    }
    let scratch = Scratch::new("iscsi_two_hosts");
    let image = scratch.image_with("vol.img", 256 << 20, &short_lease_opts());
    // Declared before the mounts: they drop first, while the LUN is still served.
    let target = tgt::serve(&bins, &scratch, &image);
    tgt::hosts_up(2);
    let url = PathBuf::from(target.url_for_hosts());
    let a = tgt::mount_on_host(&MountSpec::in_scratch(&scratch, &url, "a"), 1);
    let b = tgt::mount_on_host(&MountSpec::in_scratch(&scratch, &url, "b"), 2);
    std::fs::write(a.join("from-a"), b"written by host 1").expect("write on host 1");
    assert_eq!(
        std::fs::read(b.join("from-a")).expect("read on host 2"),
        b"written by host 1"
    );
    b.unmount();
    a.unmount();
    drop(target);
    assert_fsck_clean(&image);
}
