//! Human output of `atsfs status` and `atsfs locks`: aligned columns. The JSON form
//! is the structs themselves (serde).

use super::locks::{LockReport, LockRow, Owner, ResourceKind};
use super::status::{SlotRow, Status};
use super::{Token, VolumeInfo};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Columns padded to their widest cell; numeric columns aligned right; the last
/// column is not padded.
struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            header: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn render(&self, out: &mut String, indent: &str) {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = indent.to_string();
            for (i, cell) in row.iter().enumerate() {
                let last = i + 1 == row.len();
                let width = widths.get(i).copied().unwrap_or(0);
                match (self.right.get(i).copied().unwrap_or(false), last) {
                    (true, _) => line += &format!("{cell:>width$}"),
                    (false, false) => line += &format!("{cell:<width$}"),
                    (false, true) => line += cell,
                }
                if !last {
                    line += "  ";
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

fn volume_lines(out: &mut String, v: &VolumeInfo, watched_ms: u64) {
    let _ = writeln!(
        out,
        "volume {} \"{}\" on {}",
        v.volume_uuid, v.label, v.device
    );
    let _ = writeln!(
        out,
        "ATS: {}, {}-byte sectors; this device: {}",
        ats_words(&v.ats_mode),
        v.ats_sector_size,
        opener_words(v)
    );
    if let Some(token) = &v.token {
        let _ = writeln!(out, "token: {}", token_words(token));
    }
    let _ = writeln!(
        out,
        "heartbeat every {} ms, lease {} ms, {} host slots; watched {} ms",
        v.heartbeat_interval_ms, v.lease_ms, v.max_hosts, watched_ms
    );
    let f = &v.fencing;
    let _ = writeln!(out, "fencing by the storage: {}", f.detail);
    for k in &f.keys {
        let holder = if k.holder {
            ", holds the reservation"
        } else {
            ""
        };
        let _ = writeln!(out, "  key {}  {}{holder}", k.key, k.owner);
    }
}

/// "instance 42, held by slot 1 (generation 3) ...", "never taken", ...
fn token_words(t: &Token) -> String {
    if let Some(e) = &t.error {
        return format!("the Disk Paxos region is unreadable: {e}; run `atsfs fsck`");
    }
    let mut words = match (t.owner_slot, t.released) {
        (None, _) => "never taken".to_string(),
        (Some(slot), true) => format!(
            "instance {}, free (given back by slot {slot}, generation {})",
            t.instance,
            t.owner_generation.unwrap_or(0)
        ),
        (Some(slot), false) => format!(
            "instance {}, held by slot {slot} (generation {}), or until its {} ms token \
             lease ran out",
            t.instance,
            t.owner_generation.unwrap_or(0),
            t.lease_ms
        ),
    };
    if !t.wanted_by.is_empty() {
        let slots: Vec<String> = t.wanted_by.iter().map(u32::to_string).collect();
        words += &format!("; wanted by slots {}", slots.join(", "));
    }
    words
}

fn ats_words(kind: &str) -> &'static str {
    match kind {
        "hardware" => "hardware (SCSI COMPARE AND WRITE)",
        "disk-paxos" => "Disk Paxos (a token over plain sector reads and writes)",
        _ => "emulated (one kernel only)",
    }
}

fn opener_words(v: &VolumeInfo) -> String {
    if v.opener_matches {
        format!("{} ATS, matches", v.opener_ats)
    } else {
        format!(
            "{} ATS, does NOT match: mount, recover and fsck --repair refuse through it",
            v.opener_ats
        )
    }
}

/// Time since the slot last changed; `>N ms` when it did not change during a watch of
/// N ms, `-` when there was no watch at all.
fn age(row: &SlotRow) -> String {
    match (row.changed, row.age_ms) {
        (true, ms) => format!("{ms} ms"),
        (false, 0) => "-".into(),
        (false, ms) => format!(">{ms} ms"),
    }
}

/// `atsfs status` for people.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    volume_lines(&mut out, &s.volume, s.watched_ms);
    out.push('\n');
    if s.slots.is_empty() {
        out.push_str("no host has used this volume yet\n");
        return out;
    }
    let mut table = Table::new(&[
        ("slot", true),
        ("host", false),
        ("name", false),
        ("gen", true),
        ("state", false),
        ("age", true),
        ("note", false),
    ]);
    for r in &s.slots {
        table.rows.push(vec![
            r.slot.to_string(),
            r.host_uuid.clone(),
            r.hostname.clone(),
            r.generation.to_string(),
            r.state.as_str().into(),
            age(r),
            r.note.clone().unwrap_or_default(),
        ]);
    }
    table.render(&mut out, "");
    out
}

/// `slot/gen state` of one holder.
fn holder(o: &Owner) -> String {
    format!("{}/{} {}", o.slot, o.generation, o.state.as_str())
}

fn open_cell(row: &LockRow) -> String {
    let mut parts = Vec::new();
    if let Some(w) = &row.open_writer {
        parts.push(format!("write {}", holder(w)));
    }
    if !row.open_readers.is_empty() {
        let readers: Vec<String> = row.open_readers.iter().map(holder).collect();
        parts.push(format!("read {}", readers.join(", ")));
    }
    parts.join("; ")
}

fn owners_cell(row: &LockRow) -> String {
    if let Some(e) = &row.error {
        return e.clone();
    }
    row.owners.iter().map(holder).collect::<Vec<_>>().join(", ")
}

fn waiters_cell(row: &LockRow) -> String {
    let waiting: Vec<String> = row
        .waiters
        .iter()
        .map(|w| format!("{} ({})", w.slot, w.mode.as_str()))
        .collect();
    waiting.join(", ")
}

/// `atsfs locks` for people: one row per record, then the hosts they name.
pub fn render_locks(report: &LockReport) -> String {
    let mut out = String::new();
    volume_lines(&mut out, &report.volume, report.watched_ms);
    out.push('\n');
    if report.locks.is_empty() {
        out.push_str("no lock records held\n");
        return out;
    }
    let waiting = report.locks.iter().any(|r| !r.waiters.is_empty());
    let mut columns = vec![
        ("resource", true),
        ("kind", false),
        ("mode", false),
        ("holders (slot/gen state)", false),
        ("open", false),
    ];
    if waiting {
        columns.push(("asked by", false));
    }
    columns.push(("path", false));
    let mut table = Table::new(&columns);
    for r in &report.locks {
        let kind = match r.kind {
            ResourceKind::Inode => "inode",
            ResourceKind::AllocationGroup => "group",
        };
        let mut cells = vec![
            r.resource.to_string(),
            kind.into(),
            r.mode.as_str().into(),
            owners_cell(r),
            open_cell(r),
        ];
        if waiting {
            cells.push(waiters_cell(r));
        }
        cells.push(r.path.clone().unwrap_or_default());
        table.rows.push(cells);
    }
    table.render(&mut out, "");
    hosts_legend(&mut out, report);
    out
}

/// The hosts the listed records name, once each.
fn hosts_legend(out: &mut String, report: &LockReport) {
    let mut hosts: BTreeMap<(u32, u32), &Owner> = BTreeMap::new();
    for r in &report.locks {
        let named = r.owners.iter().chain(&r.open_writer).chain(&r.open_readers);
        for o in named {
            hosts.entry((o.slot, o.generation)).or_insert(o);
        }
    }
    if hosts.is_empty() {
        return;
    }
    out.push_str("\nhosts named:\n");
    let mut table = Table::new(&[
        ("slot/gen", false),
        ("host", false),
        ("name", false),
        ("state", false),
    ]);
    for ((slot, generation), o) in hosts {
        table.rows.push(vec![
            format!("{slot}/{generation}"),
            o.host_uuid.clone().unwrap_or_else(|| "?".into()),
            o.hostname.clone().unwrap_or_default(),
            o.state.as_str().into(),
        ]);
    }
    table.render(out, "  ");
}
