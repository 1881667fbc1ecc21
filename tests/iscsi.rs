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

/// tgt's COMPARE AND WRITE is atomic among initiators in different namespaces: two
/// hosts race increments of one counter, and it goes up by exactly their successes.
/// (With tgtd's default 16 I/O threads it loses updates: docs/testing.md.)
#[test]
fn compare_and_write_is_atomic_across_hosts() {
    let bins = require_tgt!();
    let scratch = Scratch::new("iscsi_caw_race");
    let image = scratch.join("lun.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("making the image");
    let target = tgt::serve(&bins, &scratch, &image);
    tgt::hosts_up(2);
    let race = tgt::helper("caw-race");
    let increments = 500u64;
    let children: Vec<_> = (1..=2)
        .map(|host| {
            tgt::host_command(host, &race)
                .arg(target.url_for_hosts())
                .arg(format!("iqn.2026-12.org.atsfs:race-host{host}"))
                .arg(increments.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("starting caw-race")
        })
        .collect();
    let mut successes = 0;
    for child in children {
        let out = child.wait_with_output().expect("caw-race");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "caw-race failed ({}): {text}",
            out.status
        );
        successes += number_after(&text, "successes");
    }
    let out = std::process::Command::new(&race)
        .args([&target.url(), "iqn.2026-12.org.atsfs:race-reader", "0"])
        .output()
        .expect("reading the counter");
    let counter = number_after(&String::from_utf8_lossy(&out.stdout), "counter");
    assert_eq!(successes, 2 * increments);
    assert_eq!(counter, successes, "lost updates: CAW is not atomic");
}

/// A preempted initiator's COMPARE AND WRITE and WRITE get RESERVATION CONFLICT
/// under a Write Exclusive – Registrants Only reservation (xtask/tgt/pr_fence.c).
#[test]
fn a_preempted_initiator_is_fenced() {
    let bins = require_tgt!();
    let scratch = Scratch::new("iscsi_pr_fence");
    let image = scratch.join("lun.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("making the image");
    let target = tgt::serve(&bins, &scratch, &image);
    let out = std::process::Command::new(tgt::helper("pr-fence"))
        .arg(target.url())
        .output()
        .expect("running pr-fence");
    assert!(
        out.status.success(),
        "pr-fence failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The number after `word` in a helper's output ("successes 500 miscompares 3").
fn number_after(text: &str, word: &str) -> u64 {
    let mut words = text.split_whitespace();
    words.find(|w| *w == word);
    words
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {word:?} in {text:?}"))
}

/// A host run with `nsenter --net` (as `mount_on_host` does) mounts where the test
/// sees it: only the network namespace differs. On an image file, so it needs no
/// iSCSI backend.
#[test]
fn a_host_in_a_namespace_mounts_where_the_test_sees_it() {
    require_fuse!();
    let scratch = Scratch::new("iscsi_netns_mount");
    let image = scratch.image("vol.img", 64 << 20);
    tgt::hosts_up(1);
    let a = tgt::mount_on_host(&MountSpec::in_scratch(&scratch, &image, "a"), 1);
    assert!(
        common::is_mounted(a.path()),
        "the mount is not visible to the test"
    );
    let pid = a.daemon_pid().expect("the daemon's pid");
    // A namespace is known by its nsfs inode, through /proc and through /run/netns.
    let inode = |path: String| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .ino()
    };
    let daemon_net = inode(format!("/proc/{pid}/ns/net"));
    assert_eq!(
        daemon_net,
        inode(format!("/run/netns/{}", common::testbed::ns_name(1))),
        "the daemon does not run in host 1's network namespace"
    );
    assert_ne!(daemon_net, inode("/proc/self/ns/net".into()));
    std::fs::write(a.join("f"), b"x").expect("write through the mount");
    a.unmount();
    assert_fsck_clean(&image);
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
