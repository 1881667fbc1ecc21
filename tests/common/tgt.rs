//! The real-iSCSI test bed for integration tests: a tgtd per test serving the test's
//! image as LUN 1, and hosts in network namespaces, each a separate initiator.
//!
//! It runs the tgtd that `cargo xtask tgt build` made (TARGET/tgt/bin, or the
//! directory `ATSFS_TGT_DIR` names) through `testbed`, the same code as `cargo xtask
//! tgt start`. A test starts with `let bins = require_tgt!();`, which skips it
//! ("skipped: needs root and a tgt build") unless both are there.
//!
//! ```ignore
//! let bins = require_tgt!();
//! let scratch = Scratch::new("iscsi_two_hosts");
//! let image = scratch.image("vol.img", 1 << 30);
//! let target = tgt::serve(&bins, &scratch, &image);       // stops on drop
//! tgt::hosts_up(2);
//! let spec = MountSpec::in_scratch(&scratch, Path::new(&target.url_for_hosts()), "a");
//! let a = tgt::mount_on_host(&spec, 1);                   // atsfs mount in atsfs-h1
//! ```
//!
//! Caller's duties: drop the mounts before the `Target` (declare the target first),
//! so that no daemon loses its LUN while it unmounts.

use super::testbed::{self, Target, TargetSpec, TgtBinaries};
use super::{Mount, MountSpec, Scratch};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Skips the calling test (returns from it) unless we are root and tgt is built;
/// otherwise evaluates to the `TgtBinaries`.
#[macro_export]
macro_rules! require_tgt {
    () => {
        match $crate::common::tgt::binaries_or_skip() {
            Some(bins) => bins,
            None => return,
        }
    };
}

/// The tgt build, or None after printing why the test skips. Under CI a missing build
/// is a failure: CI builds the bed (.ci/run), so a skip there would hide the tests.
pub fn binaries_or_skip() -> Option<TgtBinaries> {
    if let Some(bins) = binaries() {
        return Some(bins);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but there is no tgt build: .ci/run runs `cargo xtask tgt build`"
    );
    eprintln!("skipped: needs root and a tgt build (run `cargo xtask tgt build` as root)");
    None
}

/// The built tgtd and tgtadm, when we are root and they exist.
pub fn binaries() -> Option<TgtBinaries> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let bins = TgtBinaries::in_cache(&cache_dir());
    bins.exist().then_some(bins)
}

/// `ATSFS_TGT_DIR`, or TARGET/tgt as `cargo xtask tgt build` makes it.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ATSFS_TGT_DIR") {
        return PathBuf::from(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    target.join("tgt")
}

/// A libiscsi helper that `cargo xtask tgt build` made beside tgtd: `caw-race`
/// (COMPARE AND WRITE increments of a counter in LBA 0) or `pr-fence` (fencing by
/// PREEMPT); see xtask/tgt/*.c.
pub fn helper(name: &str) -> PathBuf {
    let path = cache_dir().join("bin").join(name);
    assert!(
        path.is_file(),
        "no {} (an older tgt build?): run `cargo xtask tgt build` as root",
        path.display()
    );
    path
}

/// Serves `image` as LUN 1 on a free port of all addresses, with one I/O thread (so
/// COMPARE AND WRITE is atomic). tgtd's run directory (socket, log) is
/// SCRATCH/tgt-PORT. The target is stopped when the returned `Target` drops.
pub fn serve(bins: &TgtBinaries, scratch: &Scratch, image: &std::path::Path) -> Target {
    serve_with_threads(bins, scratch, image, 1)
}

/// `serve` with `threads` I/O threads per LUN (tgtd's `-t`): more than one makes
/// tgt's COMPARE AND WRITE lose updates.
pub fn serve_with_threads(
    bins: &TgtBinaries,
    scratch: &Scratch,
    image: &std::path::Path,
    threads: u32,
) -> Target {
    let port = testbed::free_port().expect("a free port for tgtd");
    let spec = TargetSpec {
        image: image.to_path_buf(),
        portal: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        threads,
        run_dir: scratch.join(&format!("tgt-{port}")),
        allowed: testbed::allowed_default(),
    };
    Target::start(bins, &spec, false).unwrap_or_else(|e| panic!("starting tgtd: {e}"))
}

/// Makes the namespaces of hosts 1..=n (shared by all tests; left up, removed by
/// `cargo xtask tgt netns-down`). Safe to call from parallel tests of one binary.
pub fn hosts_up(n: u32) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    testbed::netns_up(n, false).unwrap_or_else(|e| panic!("host namespaces: {e}"));
}

/// `nsenter --net=/run/netns/atsfs-hK PROGRAM`: a command of host `host`.
pub fn host_command(host: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    testbed::host_command(host, program)
}

/// Mounts `spec` (its image is the URL, e.g. `target.url_for_hosts()`) as host
/// `host`: `atsfs mount` runs in that host's network namespace, and so does its
/// daemon, while the mount itself is visible to the test.
pub fn mount_on_host(spec: &MountSpec, host: u32) -> Mount {
    let plain = spec.command();
    let mut command = host_command(host, plain.get_program());
    command.args(plain.get_args());
    spec.mount_command(command)
}
