//! Access times: when a read updates an inode's atime, as on ext4.
//!
//! The kernel never updates a FUSE inode's atime itself (it marks them S_NOATIME),
//! so the daemon does, for the reads that reach it: file data reads and directory
//! listings. An update is one inode image in the running transaction, written by
//! the next periodic commit, never a journal transaction of its own.

use super::inode::{attr_of, from_system_time};
use super::{Core, FsResult, Ino};
use std::time::{Duration, SystemTime};

/// How reads update access times (`-o relatime`, `noatime`, `strictatime`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AtimeMode {
    /// Only when the atime is not newer than the mtime or the ctime, or is a day old.
    #[default]
    Relatime,
    /// Never.
    NoAtime,
    /// On every read that reaches the daemon.
    StrictAtime,
}

/// How old an atime relatime refreshes anyway (the kernel's rule: one day).
const RELATIME_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// The times a decision needs, and the inode's kind.
#[derive(Clone, Copy, Debug)]
pub struct Times {
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub is_dir: bool,
}

impl AtimeMode {
    /// True when a read at `now` must set the atime to `now` (the kernel's
    /// `atime_needs_update` and `relatime_need_update`): never when it already is
    /// `now`; for relatime, when the atime is not after the mtime or the ctime, or is
    /// at least a day old.
    pub fn due(self, times: &Times, nodiratime: bool, now: SystemTime) -> bool {
        if self == AtimeMode::NoAtime || (nodiratime && times.is_dir) || times.atime == now {
            return false;
        }
        match self {
            AtimeMode::NoAtime => false,
            AtimeMode::StrictAtime => true,
            AtimeMode::Relatime => {
                times.mtime >= times.atime
                    || times.ctime >= times.atime
                    || now
                        .duration_since(times.atime)
                        .is_ok_and(|age| age >= RELATIME_MAX_AGE)
            }
        }
    }
}

impl Core {
    /// True when a read of `ino` now must update its atime (`AtimeMode::due`).
    pub fn atime_due(&mut self, ino: Ino, mode: AtimeMode, nodiratime: bool) -> FsResult<bool> {
        if mode == AtimeMode::NoAtime {
            return Ok(false);
        }
        let attr = attr_of(&self.inode(ino)?);
        let times = Times {
            atime: attr.atime,
            mtime: attr.mtime,
            ctime: attr.ctime,
            is_dir: attr.is_dir(),
        };
        Ok(mode.due(&times, nodiratime, SystemTime::now()))
    }

    /// Sets `ino`'s atime to now if a read now must (checked again: another read may
    /// have done it since). Into the running transaction, with the inode's lock
    /// exclusive; the ctime stays. Best effort: when another host holds the inode's
    /// lock, the access time is left alone rather than the read waiting for that host
    /// (or asking it to let go of the lock).
    pub fn touch_atime(&mut self, ino: Ino, mode: AtimeMode, nodiratime: bool) -> FsResult<()> {
        if !self.atime_due(ino, mode, nodiratime)? {
            return Ok(());
        }
        let mut inode = self.inode(ino)?;
        if !self.meta.try_exclusive_without_asking(inode.blockno)? {
            return Ok(());
        }
        (inode.atime_s, inode.atime_ns) = from_system_time(SystemTime::now());
        self.put_inode(&inode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn times(atime: u64, mtime: u64, ctime: u64) -> Times {
        Times {
            atime: at(atime),
            mtime: at(mtime),
            ctime: at(ctime),
            is_dir: false,
        }
    }

    const DAY: u64 = 24 * 60 * 60;

    #[test]
    fn relatime_updates_after_a_change_or_a_day() {
        let now = at(10 * DAY);
        let mode = AtimeMode::Relatime;
        // Read since the last change, less than a day ago: no update.
        assert!(!mode.due(&times(now_secs(now) - 60, 100, 100), false, now));
        // Changed (mtime, ctime) at or after the last read: update.
        assert!(mode.due(&times(500, 500, 100), false, now));
        assert!(mode.due(&times(500, 100, 600), false, now));
        // A day old: update, a second less: not.
        assert!(mode.due(&times(9 * DAY, 100, 100), false, now));
        assert!(!mode.due(&times(9 * DAY + 1, 100, 100), false, now));
        // Already now: nothing to do.
        assert!(!mode.due(&times(10 * DAY, 10 * DAY, 10 * DAY), false, now));
    }

    #[test]
    fn strictatime_always_and_noatime_never() {
        let now = at(10 * DAY);
        let fresh = times(10 * DAY - 1, 100, 100);
        assert!(AtimeMode::StrictAtime.due(&fresh, false, now));
        assert!(!AtimeMode::NoAtime.due(&fresh, false, now));
        let changed = times(100, 200, 200);
        assert!(!AtimeMode::NoAtime.due(&changed, false, now));
        assert!(!AtimeMode::StrictAtime.due(&times(10 * DAY, 1, 1), false, now));
    }

    #[test]
    fn nodiratime_spares_directories_only() {
        let now = at(10 * DAY);
        let mut dir = times(100, 200, 200);
        dir.is_dir = true;
        assert!(AtimeMode::StrictAtime.due(&dir, false, now));
        assert!(!AtimeMode::StrictAtime.due(&dir, true, now));
        assert!(!AtimeMode::Relatime.due(&dir, true, now));
        assert!(AtimeMode::Relatime.due(&times(100, 200, 200), true, now));
    }

    fn now_secs(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}
