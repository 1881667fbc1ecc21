//! `mount.atsfs` and `fsck.atsfs`: the `atsfs` program under the names mount(8) and
//! fsck(8) run, with their conventions (arguments, exit codes).
//!
//! mount(8) runs `/sbin/mount.atsfs DEVICE DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`
//! for `mount -t atsfs` and fstab lines of type `atsfs`, and `/sbin/mount.fuse.atsfs`
//! for the type the kernel shows (`fuse.atsfs`: `mount -t fuse.atsfs`, a remount of a
//! live mount). fsck(8) runs `fsck.atsfs [-n|-y|-p|-a] [-f] [-V] DEVICE`.

use crate::{mount_background, MountRequest};
use atsfs::fsck::ProblemKind;
use clap::{ArgGroup, Parser};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// mount(8)'s helper exit codes.
const MOUNT_USAGE: u8 = 1;
const MOUNT_FAILED: u8 = 32;

/// fsck(8)'s exit codes.
const FSCK_UNCORRECTED: u8 = 4;
const FSCK_OPERATIONAL: u8 = 8;
const FSCK_USAGE: u8 = 16;

#[derive(Parser, Debug)]
#[command(
    name = "mount.atsfs",
    bin_name = "mount.atsfs",
    version,
    about = "Mount an atsfs volume: the helper mount(8) runs for `mount -t atsfs` and fstab",
    long_about = "Mount an atsfs volume: the helper mount(8) runs for `mount -t atsfs DEVICE DIR` \
                  and for /etc/fstab lines of type atsfs (also installed as mount.fuse.atsfs, \
                  the name mount(8) looks for when given the kernel's type fuse.atsfs). It \
                  starts the mount daemon (`atsfs mount`) and returns once the mount is live, \
                  so a boot's mount unit is done when the files are there.\n\n\
                  Options that belong to mount(8), fstab or systemd (defaults, auto, noauto, \
                  nofail, _netdev, user, nouser, users, owner, group, comment=, x-*) are \
                  dropped; host_id=UUID and log=PATH become `atsfs mount --host-id` and \
                  `--log`; every other option goes to `atsfs mount -o` unchanged.",
    after_long_help = "Example /etc/fstab line (the volume on shared storage, mounted once the \
                       network is up):\n\n    \
                       /dev/disk/by-id/wwn-0x600140512345  /mnt/shared  atsfs  _netdev  0  0\n\n\
                       Exit status (mount(8)'s): 0 mounted, 1 bad usage, 32 the mount failed \
                       (the reason is printed; the daemon's log is /var/log/atsfs.log unless \
                       log= says otherwise).\n\n\
                       See also: atsfs(8), atsfs-mount(8), fsck.atsfs(8), mkfs.atsfs(8), \
                       mount(8), fstab(5), systemd.mount(5)."
)]
pub(crate) struct MountHelper {
    /// The volume: a block device, an image file or an iscsi:// URL.
    device: PathBuf,
    /// The mount point, an existing directory.
    dir: PathBuf,
    /// Mount options, comma separated (see above; `atsfs mount -o` lists its own).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Sloppy (mount -s): accepted; atsfs still refuses options it does not know.
    #[arg(short = 's')]
    sloppy: bool,
    /// Fake (mount -f): do everything but mount.
    #[arg(short = 'f')]
    fake: bool,
    /// Do not write /etc/mtab (mount -n): accepted; there is none to write.
    #[arg(short = 'n')]
    no_mtab: bool,
    /// Verbose: print the mount command this runs.
    #[arg(short = 'v')]
    verbose: bool,
    /// The type mount(8) was given (atsfs or fuse.atsfs); anything else is refused.
    #[arg(short = 't', value_name = "TYPE")]
    fstype: Option<String>,
    /// Mount in another mount namespace (mount -N): not supported.
    #[arg(short = 'N', value_name = "NS")]
    namespace: Option<String>,
}

/// What mount.atsfs does with one mount option.
#[derive(Debug, PartialEq, Eq)]
enum MountOpt<'a> {
    /// mount(8)'s, fstab's or systemd's own: not for the filesystem.
    Drop,
    /// `host_id=UUID`: `atsfs mount --host-id`.
    HostId(&'a str),
    /// `log=PATH`: `atsfs mount --log`.
    Log(&'a str),
    /// For `atsfs mount -o`, unchanged.
    Pass(&'a str),
}

fn classify(option: &str) -> MountOpt<'_> {
    const DROPPED: [&str; 10] = [
        "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner",
        "group",
    ];
    if DROPPED.contains(&option)
        || option.starts_with("x-")
        || option.starts_with("comment=")
        || option.starts_with("user=")
        || option.starts_with("helper=")
    {
        return MountOpt::Drop;
    }
    if let Some(id) = option.strip_prefix("host_id=") {
        return MountOpt::HostId(id);
    }
    if let Some(path) = option.strip_prefix("log=") {
        return MountOpt::Log(path);
    }
    MountOpt::Pass(option)
}

/// The `atsfs mount` request for a mount(8) invocation.
fn mount_request(args: &MountHelper) -> Result<MountRequest, String> {
    let mut request = MountRequest {
        device: args.device.clone(),
        mountpoint: args.dir.clone(),
        host_id: None,
        options: Vec::new(),
        log: None,
    };
    let mut passed = Vec::new();
    for option in args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match classify(option) {
            MountOpt::Drop => {}
            MountOpt::HostId(id) => request.host_id = Some(id.to_string()),
            MountOpt::Log("") => {
                return Err("log= needs a path, like log=/var/log/atsfs-shared.log".into())
            }
            MountOpt::Log(path) => request.log = Some(PathBuf::from(path)),
            MountOpt::Pass(o) => passed.push(o),
        }
    }
    if !passed.is_empty() {
        request.options.push(passed.join(","));
    }
    Ok(request)
}

/// `mount.atsfs`: exit 0 mounted, 1 bad usage, 32 the mount failed.
pub(crate) fn mount_main() -> ExitCode {
    crate::init_tracing("warn");
    let args = match MountHelper::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { MOUNT_USAGE } else { 0 });
        }
    };
    if let Some(fstype) = &args.fstype {
        if fstype != "atsfs" && fstype != "fuse.atsfs" {
            eprintln!("mount.atsfs: type {fstype} is not atsfs");
            return ExitCode::from(MOUNT_USAGE);
        }
    }
    if args.namespace.is_some() {
        eprintln!("mount.atsfs: -N (mount in another namespace) is not supported");
        return ExitCode::from(MOUNT_USAGE);
    }
    // mount(8) runs mount.fuse.atsfs for `mount -o remount,... DIR` (the type in
    // mountinfo is fuse.atsfs), with the live mount's kernel options added
    // (user_id=, group_id=, ...). Starting a daemon for it would be wrong.
    if args
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|o| o == "remount")
    {
        eprintln!(
            "mount.atsfs: remount is not supported; unmount (umount {0}) and mount again \
             with the options wanted",
            args.dir.display()
        );
        return ExitCode::from(MOUNT_FAILED);
    }
    let request = match mount_request(&args) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("mount.atsfs: {e}");
            return ExitCode::from(MOUNT_USAGE);
        }
    };
    if args.verbose || args.fake {
        let shown: Vec<String> = request
            .daemon_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let log = request
            .log
            .as_ref()
            .map(|l| format!(" --log {}", l.display()))
            .unwrap_or_default();
        eprintln!(
            "mount.atsfs: {}atsfs {}{log}",
            if args.fake { "would run: " } else { "" },
            shown.join(" ")
        );
    }
    if args.fake {
        return ExitCode::SUCCESS;
    }
    match mount_background(&request) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount.atsfs: {e:#}");
            ExitCode::from(MOUNT_FAILED)
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "fsck.atsfs",
    bin_name = "fsck.atsfs",
    version,
    about = "Check and repair an atsfs volume: the checker fsck(8) runs for `fsck -t atsfs`",
    long_about = "Check and repair an atsfs volume: the checker fsck(8) runs for \
                  `fsck -t atsfs DEVICE` and for fstab lines of type atsfs with a non-zero \
                  pass field (systemd-fsck runs it with -a before the mount). The check is \
                  `atsfs fsck`, the repair `atsfs fsck --repair`.\n\n\
                  Without -n, -y or -p the volume is checked only, as with -n.",
    after_long_help = "Exit status (fsck(8)'s): 0 no errors, 1 errors corrected, 4 errors \
                       left uncorrected, 8 operational error (the device cannot be read, \
                       or a repair is refused because a host has the volume mounted), \
                       16 usage error.\n\n\
                       A volume is shared: another host may have it mounted while this one \
                       boots. -p then skips the volume (exit 0), as fsck -M skips a mounted \
                       filesystem; the hosts that mount it recover each other, and an offline \
                       check can be run with -n at any time.\n\n\
                       See also: atsfs(8), atsfs-fsck(8), mount.atsfs(8), fsck(8), fstab(5)."
)]
#[command(group(ArgGroup::new("mode").args(["no", "yes", "preen", "auto"]).multiple(false)))]
pub(crate) struct FsckHelper {
    /// Check only: open the volume read-only and change nothing.
    #[arg(short = 'n')]
    no: bool,
    /// Repair everything the check finds (as `atsfs fsck --repair`): watches the host
    /// slots for a lease first and refuses (exit 8) while a host is live.
    #[arg(short = 'y')]
    yes: bool,
    /// Preen, as at boot: skip the volume while a host has it mounted; else check it,
    /// and repair it when every problem is one that loses no data (leaked blocks, free
    /// counts, the backup superblock, damaged lock records, orphan tables). Any other
    /// problem: exit 4 without writing.
    #[arg(short = 'p')]
    preen: bool,
    /// The same as -p.
    #[arg(short = 'a')]
    auto: bool,
    /// Force a check: accepted; atsfs always checks the whole volume.
    #[arg(short = 'f')]
    force: bool,
    /// Verbose: accepted (the check always says what it found).
    #[arg(short = 'v')]
    verbose: bool,
    /// Progress to a file descriptor (e2fsck's -C FD): accepted; fsck.atsfs shows
    /// progress on a terminal only.
    #[arg(short = 'C', value_name = "FD")]
    progress_fd: Option<String>,
    /// The volume: a block device, an image file or an iscsi:// URL.
    device: PathBuf,
}

/// Problems that `-p` repairs on its own: repairing them frees or rewrites nothing a
/// file still needs.
const PREEN_SAFE: [ProblemKind; 5] = [
    ProblemKind::BackupSuperblock,
    ProblemKind::FreeCount,
    ProblemKind::LeakedBlocks,
    ProblemKind::LockRecord,
    ProblemKind::OrphanTable,
];

/// `fsck.atsfs`: fsck(8)'s exit codes.
pub(crate) fn fsck_main() -> ExitCode {
    crate::init_tracing("warn");
    let args = match FsckHelper::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { FSCK_USAGE } else { 0 });
        }
    };
    let code = if args.yes {
        crate::fsck_repair(&args.device, false, false)
    } else if args.preen || args.auto {
        preen(&args.device)
    } else {
        let code = crate::fsck(&args.device, false);
        if !args.no && code == FSCK_UNCORRECTED {
            println!(
                "fsck.atsfs: nothing was changed; `fsck.atsfs -y {}` repairs (when no host \
                 has the volume mounted)",
                args.device.display()
            );
        }
        code
    };
    ExitCode::from(code)
}

/// `-p`: 0 clean or skipped, 1 repaired, 4 left, 8 could not run.
fn preen(device: &Path) -> u8 {
    let name = atsfs::lun::display_name(device);
    let lun = match atsfs::lun::open_device(device, atsfs::lun::OpenMode::ReadOnly) {
        Ok(lun) => lun,
        Err(e) => {
            eprintln!("fsck.atsfs: cannot open {name}: {e}");
            return FSCK_OPERATIONAL;
        }
    };
    // Watch long enough to tell every slot in use live or dead (lease + interval at
    // most; the watch ends early once each has moved or is dead).
    let status = match atsfs::inspect::status(lun.as_ref(), Some(Duration::MAX)) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("fsck.atsfs: {name}: {e:#}");
            return FSCK_OPERATIONAL;
        }
    };
    let live: Vec<String> = status
        .slots
        .iter()
        .filter(|s| s.state.is_live())
        .map(|s| format!("slot {} ({})", s.slot, s.hostname))
        .collect();
    if !live.is_empty() {
        println!(
            "{name}: mounted by live hosts ({}): not checked (`fsck.atsfs -n {name}` checks \
             read-only)",
            live.join(", ")
        );
        return 0;
    }
    let report = match atsfs::fsck::check(lun.as_ref()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("fsck.atsfs: {name}: {e:#}");
            return FSCK_OPERATIONAL;
        }
    };
    if report.is_clean() {
        let c = &report.counts;
        println!(
            "{name}: clean, {} inodes, {}/{} blocks",
            c.inodes, c.blocks_used, c.blocks_total
        );
        return 0;
    }
    report.print();
    if report
        .problems
        .iter()
        .any(|p| !PREEN_SAFE.contains(&p.kind))
    {
        println!(
            "{name}: UNEXPECTED INCONSISTENCY; run `fsck.atsfs -y {name}` (atsfs fsck \
             --repair) by hand, when no host has the volume mounted"
        );
        return FSCK_UNCORRECTED;
    }
    drop(lun);
    println!("{name}: repairing what loses no data...");
    crate::fsck_repair(device, false, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn mount_options_of_mount8_are_dropped_and_ours_taken() {
        let args = MountHelper::try_parse_from([
            "mount.atsfs",
            "/dev/sdb",
            "/mnt/shared",
            "-o",
            "rw,_netdev,nofail,x-systemd.automount,defaults,host_id=abc,log=/tmp/l,attr_timeout=0,noauto",
        ])
        .unwrap();
        let request = mount_request(&args).unwrap();
        assert_eq!(request.options, vec!["rw,attr_timeout=0".to_string()]);
        assert_eq!(request.host_id.as_deref(), Some("abc"));
        assert_eq!(request.log.as_deref(), Some(Path::new("/tmp/l")));
        assert_eq!(request.device, Path::new("/dev/sdb"));
        assert_eq!(request.mountpoint, Path::new("/mnt/shared"));
    }

    #[test]
    fn mount_flags_of_mount8_parse() {
        // As mount(8) calls a helper: source, target, then flags.
        let args = MountHelper::try_parse_from([
            "mount.atsfs",
            "a.img",
            "/m",
            "-s",
            "-f",
            "-n",
            "-v",
            "-o",
            "ro",
            "-t",
            "fuse.atsfs",
        ])
        .unwrap();
        assert!(args.sloppy && args.fake && args.no_mtab && args.verbose);
        assert_eq!(args.fstype.as_deref(), Some("fuse.atsfs"));
        let request = mount_request(&args).unwrap();
        assert_eq!(request.options, vec!["ro".to_string()]);
        let none = mount_request(&MountHelper::try_parse_from(["m", "a", "/m"]).unwrap()).unwrap();
        assert!(none.options.is_empty());
    }

    #[test]
    fn fsck_modes_exclude_each_other() {
        assert!(FsckHelper::try_parse_from(["fsck.atsfs", "-n", "-y", "d"]).is_err());
        assert!(FsckHelper::try_parse_from(["fsck.atsfs", "-a", "-p", "d"]).is_err());
        let a = FsckHelper::try_parse_from(["fsck.atsfs", "-pf", "-C0", "d"]).unwrap();
        assert!(a.preen && a.force);
        let a = FsckHelper::try_parse_from(["fsck.atsfs", "-y", "-C", "3", "d"]).unwrap();
        assert!(a.yes && a.device == Path::new("d"));
        assert!(FsckHelper::try_parse_from(["fsck.atsfs"]).is_err());
        MountHelper::command().debug_assert();
        FsckHelper::command().debug_assert();
    }
}
