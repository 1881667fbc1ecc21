//! atsfs: a shared-disk cluster filesystem.
//!
//! Several hosts see one block device (a LUN) and mount one filesystem on it at the
//! same time. There is no network between them: every bit of coordination goes
//! through the disk, by atomic test-and-set (ATS) of single sectors.
//!
//! The layers, lowest first. Each is a module; imports only point down.
//!
//! ```text
//!  main.rs (cli)   fuse (fuser adapter: decode, call fs, map errors; no fs logic)
//!         \          /
//!          fs        transactions, inodes, directories, file data, allocator
//!           |
//!          journal   per-slot redo log: commit, checkpoint, replay
//!           |
//!          cluster   heartbeat slot, lease, lock records, recovery, storage fencing
//!           |        (SCSI-3 reservation keys), one ATS kind per volume; on a Disk
//!           |        Paxos volume the test-and-set token (`cluster::paxos::PaxosLun`,
//!           |        a `Lun` wrapper built at mount from the claimed slot and the clock)
//!           |
//!          format    on-disk structs, checksums, encode/decode/validate (no I/O)
//!           |
//!          lun       the shared device: read, write, compare_and_write, flush;
//!                    image files and block devices (emulated ATS), SCSI over SG_IO
//!                    and iSCSI (the storage's COMPARE AND WRITE, reservations),
//!                    `open_device` (a name to a LUN), the ATS self-test
//! ```
//!
//! The fs above `cluster` sees the LUN through `GuardedLun` (the host lease) and, on
//! a Disk Paxos volume, `PaxosLun` below it: its `compare_and_write` takes the
//! volume's token instead of the device's own (which a plain shared disk lacks).
//!
//! `mkfs` (lay out a fresh volume) and `fsck` (check one) sit beside `fs`: they use
//! `format` and `lun` directly. `inspect` (status, locks) reads like them; `sim` drives
//! many in-process hosts for tests; `units` and `progress` (a bar on a terminal only)
//! serve the tools. The binary adds the system's conventions around `fuse`: the
//! `mount.atsfs`, `umount.fuse.atsfs` and `fsck.atsfs` helpers (`helpers.rs`,
//! `umount.rs`) and the man pages and completions made from its command line
//! (`docs.rs`).

pub mod cluster;
pub mod format;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod inspect;
pub mod journal;
pub mod lun;
pub mod mkfs;
pub mod progress;
pub mod sim;
pub mod units;
