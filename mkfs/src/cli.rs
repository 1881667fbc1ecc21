//! The command line of mkfs.atsfs: its clap definition only, no behaviour.
//!
//! The `atsfs` binary includes this file too (`src/docs.rs`), to generate the man page
//! and shell completions of mkfs.atsfs from the very definition mkfs.atsfs parses.
//! So it may name only clap, std and the atsfs library.

use atsfs::units::{parse_duration, parse_size};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "mkfs.atsfs",
    bin_name = "mkfs.atsfs",
    version,
    about = "Make an atsfs shared-disk filesystem on a LUN or an image file",
    after_help = "Exit status: 0 done, 1 refused or bad input, 2 I/O error.\n\
                  mkfs.atsfs never formats a volume that hosts are using, not even with -f."
)]
pub(crate) struct Args {
    /// Volume label (at most 63 bytes).
    #[arg(short = 'L', long, default_value = "")]
    pub(crate) label: String,
    /// Most hosts that can mount the volume at once (1..=64).
    #[arg(short = 'N', long = "max-hosts", default_value_t = 32)]
    pub(crate) max_hosts: u32,
    /// Create the image file with this size if it is missing, or grow it (sparse) if
    /// it is smaller. Never shrinks. E.g. 10G.
    #[arg(long, value_parser = parse_size)]
    pub(crate) size: Option<u64>,
    /// Journal size per host, e.g. 64M (default: from the volume size, 1-64 MiB).
    #[arg(long = "journal-size", value_parser = parse_size)]
    pub(crate) journal_size: Option<u64>,
    /// How often each host renews its heartbeat, e.g. 1s or 500ms.
    #[arg(long = "heartbeat-interval", value_parser = parse_duration, default_value = "1s")]
    pub(crate) heartbeat_interval: Duration,
    /// How long a silent host keeps its locks before peers recover it (> 2 intervals).
    #[arg(long, value_parser = parse_duration, default_value = "8s")]
    pub(crate) lease: Duration,
    /// Which test-and-set the volume uses: `hardware` (the storage's SCSI COMPARE AND
    /// WRITE, hosts on any machine), `paxos` (Disk Paxos: a token taken with plain
    /// sector reads and writes, hosts on any machine, no COMPARE AND WRITE needed),
    /// `emulated` (file locks: every host on this machine; for tests) or `auto`
    /// (hardware when the device has it and passes the ATS self-test, else Disk
    /// Paxos).
    #[arg(long, value_enum, default_value_t = AtsChoice::Auto)]
    pub(crate) ats: AtsChoice,
    /// Overwrite an existing atsfs volume or another filesystem.
    #[arg(short, long)]
    pub(crate) force: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// The block device or image file.
    pub(crate) device: PathBuf,
}

/// `--ats`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtsChoice {
    Auto,
    Hardware,
    Emulated,
    /// Disk Paxos: a token over plain sector reads and writes, on any shared disk.
    Paxos,
}
