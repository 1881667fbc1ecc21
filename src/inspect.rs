//! `atsfs status` and `atsfs locks`: who uses a volume and who holds what, read from
//! the disk alone (read-only, no slot, no lease).
//!
//! Liveness needs no synchronised clocks: the tool watches the heartbeat region itself
//! for a while and calls a slot live when its sector changes during the watch, dead
//! when it does not change for lease + interval.

use crate::cluster::lock::{read_lock, LockState};
use crate::cluster::{read_slot, HostUuid};
use crate::format::{
    get_str, BlockNo, Geometry, HeartbeatSlot, Superblock, ATS_MODE_HARDWARE, LOCK_EXCLUSIVE,
    LOCK_FREE, LOCK_MULTI_WRITER, LOCK_SHARED, OPEN_WRITER, SLOT_FREE, SLOT_LIVE, SLOT_RECOVERING,
};
use crate::lun::Lun;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub device: String,
    pub label: String,
    pub volume_uuid: String,
    pub ats_mode: String,
    pub heartbeat_interval_ms: u32,
    pub lease_ms: u32,
    pub max_hosts: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct SlotRow {
    pub slot: u32,
    pub host_uuid: String,
    pub hostname: String,
    pub generation: u32,
    /// `live`, `live?` (not moving yet, dead only after the lease), `dead`, `free`,
    /// `recovering`.
    pub state: String,
    /// Milliseconds since the slot last changed, as seen by this tool (at least the
    /// watch time when it did not change).
    pub age_ms: u64,
    pub counter: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub volume: VolumeInfo,
    pub watched_ms: u64,
    pub slots: Vec<SlotRow>,
}

impl Status {
    /// True when `slot` is live with `generation`.
    pub fn live(&self, slot: u32, generation: u32) -> bool {
        self.slots.iter().any(|r| {
            r.slot == slot
                && r.generation == generation
                && (r.state == "live" || r.state == "live?")
        })
    }

    fn host_of(&self, slot: u32) -> String {
        self.slots
            .iter()
            .find(|r| r.slot == slot)
            .map(|r| r.host_uuid.clone())
            .unwrap_or_default()
    }
}

fn volume_info(lun: &dyn Lun, sb: &Superblock) -> VolumeInfo {
    VolumeInfo {
        device: lun.describe(),
        label: get_str(&sb.label),
        volume_uuid: uuid::Uuid::from_bytes(sb.volume_uuid).to_string(),
        ats_mode: if sb.ats_mode == ATS_MODE_HARDWARE {
            "hardware"
        } else {
            "emulated"
        }
        .into(),
        heartbeat_interval_ms: sb.heartbeat_interval_ms,
        lease_ms: sb.lease_ms,
        max_hosts: sb.max_hosts,
    }
}

/// The default watch: long enough to see every live host renew twice.
pub fn default_watch(sb: &Superblock) -> Duration {
    Duration::from_millis(2 * u64::from(sb.heartbeat_interval_ms) + 200)
}

/// Watches the heartbeat region for `watch` and reports every slot ever used.
pub fn status(lun: &dyn Lun, watch: Duration) -> Result<Status> {
    let sb = crate::fs::read_superblock(lun)?;
    let geo = Geometry::from_superblock(&sb);
    let read_all = || -> Result<Vec<(Vec<u8>, Option<HeartbeatSlot>)>> {
        (0..geo.max_hosts)
            .map(|slot| Ok(read_slot(lun, &geo, slot).unwrap_or_else(|_| (Vec::new(), None))))
            .collect()
    };
    let started = Instant::now();
    let first = read_all()?;
    let mut last = first.clone();
    let mut changed_at: Vec<Option<Instant>> = vec![None; first.len()];
    while started.elapsed() < watch {
        std::thread::sleep(Duration::from_millis(100).min(watch));
        let now = read_all()?;
        for (i, (raw, _)) in now.iter().enumerate() {
            if *raw != last[i].0 {
                changed_at[i] = Some(Instant::now());
            }
        }
        last = now;
    }
    let watched = started.elapsed();
    let dead_after = Duration::from_millis(u64::from(sb.lease_ms));
    let slots = last
        .iter()
        .enumerate()
        .filter_map(|(i, (_, image))| {
            // A free slot of generation 0 was never used.
            let image = (*image).filter(|i| i.generation != 0 || i.state != SLOT_FREE)?;
            let age = changed_at[i].map_or(watched, |t| t.elapsed());
            let moved = changed_at[i].is_some();
            let state = match image.state {
                SLOT_FREE => "free",
                SLOT_LIVE | SLOT_RECOVERING if moved => {
                    if image.state == SLOT_LIVE {
                        "live"
                    } else {
                        "recovering"
                    }
                }
                _ if age >= dead_after => "dead",
                SLOT_RECOVERING => "recovering",
                _ => "live?",
            };
            Some(SlotRow {
                slot: i as u32,
                host_uuid: HostUuid(image.host_uuid).to_string(),
                hostname: get_str(&image.hostname),
                generation: image.generation,
                state: state.into(),
                age_ms: age.as_millis() as u64,
                counter: image.counter,
            })
        })
        .collect();
    Ok(Status {
        volume: volume_info(lun, &sb),
        watched_ms: watched.as_millis() as u64,
        slots,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct Owner {
    pub slot: u32,
    pub generation: u32,
    pub host_uuid: String,
    pub live: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LockRow {
    pub resource: BlockNo,
    /// `inode` or `group N`.
    pub kind: String,
    pub path: Option<String>,
    /// `exclusive`, `shared`, `multi-writer`, or `free` (a record with only open state).
    pub mode: String,
    pub owners: Vec<Owner>,
    /// The host that has the file open for writing.
    pub open_writer: Option<Owner>,
    /// Slots that have the file open read-only (or multi-writer).
    pub open_readers: Vec<u32>,
}

fn mode_name(mode: u32) -> &'static str {
    match mode {
        LOCK_EXCLUSIVE => "exclusive",
        LOCK_SHARED => "shared",
        LOCK_MULTI_WRITER => "multi-writer",
        _ => "free",
    }
}

fn row(state: &LockState, kind: String, path: Option<String>, status: &Status) -> Option<LockRow> {
    let r = &state.record;
    let owners: Vec<Owner> = state
        .holders()
        .into_iter()
        .map(|(slot, generation)| Owner {
            slot,
            generation,
            host_uuid: if r.mode == LOCK_EXCLUSIVE {
                HostUuid(r.owner_uuid).to_string()
            } else {
                status.host_of(slot)
            },
            live: status.live(slot, generation),
        })
        .collect();
    let open_writer = (r.open_flags & OPEN_WRITER != 0).then(|| Owner {
        slot: r.open_writer_slot,
        generation: r.open_writer_gen,
        host_uuid: status.host_of(r.open_writer_slot),
        live: status.live(r.open_writer_slot, r.open_writer_gen),
    });
    let open_readers: Vec<u32> = (0..64)
        .filter(|s| r.open_readers & (1u64 << s) != 0)
        .collect();
    if r.mode == LOCK_FREE && open_writer.is_none() && open_readers.is_empty() {
        return None;
    }
    Some(LockRow {
        resource: r.resource,
        kind,
        path,
        mode: mode_name(r.mode).into(),
        owners,
        open_writer,
        open_readers,
    })
}

/// Every held lock record (or only `path`'s, a path inside the volume), with its
/// owners and whether they are live.
pub fn locks(lun: &dyn Lun, path: Option<&str>, watch: Duration) -> Result<(Status, Vec<LockRow>)> {
    let status = status(lun, watch)?;
    let sb = crate::fs::read_superblock(lun)?;
    let geo = Geometry::from_superblock(&sb);
    let report = crate::fsck::check(lun)?;
    let mut rows = Vec::new();
    let wanted = path.map(|p| {
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("/{p}")
        }
    });
    let wanted = wanted.map(|p| {
        if p.len() > 1 {
            p.trim_end_matches('/').to_string()
        } else {
            p
        }
    });
    if let Some(want) = &wanted {
        if !report.paths.values().any(|p| p == want) {
            bail!("{want}: no such path on the volume");
        }
    }
    for (&ino, p) in &report.paths {
        if wanted.as_ref().is_some_and(|w| w != p) {
            continue;
        }
        if let Ok(state) = read_lock(lun, &geo, ino) {
            rows.extend(row(&state, "inode".into(), Some(p.clone()), &status));
        }
    }
    if wanted.is_none() {
        for ag in 0..geo.ag_count {
            if let Ok(state) = read_lock(lun, &geo, geo.ag_header(ag)) {
                rows.extend(row(&state, format!("group {ag}"), None, &status));
            }
        }
    }
    Ok((status, rows))
}

/// Human output of `atsfs status`.
pub fn print_status(s: &Status) {
    let v = &s.volume;
    println!("volume {} \"{}\" on {}", v.volume_uuid, v.label, v.device);
    println!(
        "  ATS {}, heartbeat every {} ms, lease {} ms, {} host slots (watched {} ms)",
        v.ats_mode, v.heartbeat_interval_ms, v.lease_ms, v.max_hosts, s.watched_ms
    );
    if s.slots.is_empty() {
        println!("  no host has used this volume yet");
        return;
    }
    println!(
        "  {:>4}  {:<36}  {:<16} {:>5}  {:<10} {:>9}",
        "slot", "host", "name", "gen", "state", "age"
    );
    for r in &s.slots {
        println!(
            "  {:>4}  {:<36}  {:<16} {:>5}  {:<10} {:>7}ms",
            r.slot, r.host_uuid, r.hostname, r.generation, r.state, r.age_ms
        );
    }
}

/// Human output of `atsfs locks`.
pub fn print_locks(rows: &[LockRow]) {
    if rows.is_empty() {
        println!("no locks held");
        return;
    }
    println!(
        "{:>10}  {:<12} {:<12} {:<40} path",
        "resource", "kind", "mode", "owners (slot/gen, live)"
    );
    for r in rows {
        let mut owners: Vec<String> = r
            .owners
            .iter()
            .map(|o| {
                format!(
                    "{}/{}{}",
                    o.slot,
                    o.generation,
                    if o.live { "" } else { " DEAD" }
                )
            })
            .collect();
        if let Some(w) = &r.open_writer {
            owners.push(format!(
                "open-w {}/{}{}",
                w.slot,
                w.generation,
                if w.live { "" } else { " DEAD" }
            ));
        }
        if !r.open_readers.is_empty() {
            owners.push(format!("open-r {:?}", r.open_readers));
        }
        println!(
            "{:>10}  {:<12} {:<12} {:<40} {}",
            r.resource,
            r.kind,
            r.mode,
            owners.join(", "),
            r.path.as_deref().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::HostUuid;
    use crate::fs::{Fs, MountOptions};
    use crate::lun::MemLun;
    use crate::mkfs::{mkfs, MkfsOptions};
    use std::sync::Arc;

    fn volume() -> Arc<MemLun> {
        let lun = Arc::new(MemLun::new(64 << 20, 512));
        let opts = MkfsOptions {
            max_hosts: 4,
            heartbeat_interval: Duration::from_millis(100),
            lease: Duration::from_millis(1000),
            ..MkfsOptions::default()
        };
        mkfs(lun.as_ref(), &opts, &mut |_, _| {}).expect("mkfs");
        lun
    }

    #[test]
    fn status_and_locks_show_hosts_and_holders() {
        let lun = volume();
        let dynlun: Arc<dyn Lun> = lun.clone();
        let a = Fs::mount(dynlun.clone(), MountOptions::new(HostUuid([1; 16]))).expect("a");
        let b = Fs::mount(dynlun, MountOptions::new(HostUuid([2; 16]))).expect("b");
        let f = a
            .mknod(a.root(), b"held", libc::S_IFREG | 0o644, 0, 0, 0)
            .expect("create")
            .ino;
        a.open(f, true).expect("open");
        // The tools read what is committed.
        a.sync().expect("sync");
        let s = status(lun.as_ref(), Duration::from_millis(400)).expect("status");
        let states: Vec<&str> = s.slots.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, vec!["live", "live"]);
        let (_, rows) =
            locks(lun.as_ref(), Some("/held"), Duration::from_millis(300)).expect("locks");
        assert_eq!(rows.len(), 1);
        let w = rows[0].open_writer.as_ref().expect("writer");
        assert_eq!((w.slot, w.live), (0, true));
        assert!(locks(lun.as_ref(), Some("/nope"), Duration::ZERO).is_err());
        a.release(f, true).expect("close");
        a.unmount().expect("unmount");
        b.mknod(b.root(), b"from-b", libc::S_IFREG | 0o644, 0, 0, 0)
            .expect("b creates");
        b.sync().expect("sync");
        drop(b); // crash with its locks held
        let s = status(lun.as_ref(), Duration::from_millis(1300)).expect("status");
        let states: Vec<&str> = s.slots.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, vec!["free", "dead"]);
        let (_, rows) = locks(lun.as_ref(), None, Duration::from_millis(1300)).expect("locks");
        assert!(
            rows.iter()
                .all(|r| r.owners.iter().all(|o| o.slot == 1 && !o.live)),
            "{rows:?}"
        );
        assert!(
            !rows.is_empty(),
            "the crashed host's locks are still recorded"
        );
    }
}
