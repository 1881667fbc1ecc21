//! Runs the cluster simulator: `cargo run --release --example sim -- HOSTS SEEDS STEPS SEED_START FAULTS [PAXOS]`
//! (PAXOS 1: a Disk Paxos volume, hosts on plain disks without compare-and-write).
//! `cargo xtask sim` is the friendly front end.

use atsfs::sim::{run, SimConfig, SimSummary};
use std::process::ExitCode;

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() -> ExitCode {
    // Quiet unless RUST_LOG asks (e.g. RUST_LOG=atsfs=debug to follow one seed).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hosts = arg(&args, 0, 4) as usize;
    let seeds = arg(&args, 1, 4);
    let steps = arg(&args, 2, 200) as usize;
    let seed_start = arg(&args, 3, 1);
    let faults = arg(&args, 4, 0) != 0;
    let disk_paxos = arg(&args, 5, 0) != 0;
    let started = std::time::Instant::now();
    let mut total = SimSummary::default();
    for seed in seed_start..seed_start + seeds {
        let cfg = SimConfig {
            hosts,
            seed,
            steps,
            faults,
            disk_paxos,
        };
        match run(&cfg) {
            Ok(s) => {
                total.ops += s.ops;
                total.ok += s.ok;
                total.clean_errors += s.clean_errors;
                total.crashes += s.crashes;
                total.restarts += s.restarts;
                total.locks_checked += s.locks_checked;
                total.pauses += s.pauses;
                total.fenced_checked += s.fenced_checked;
                total.pause_points += s.pause_points;
                total.pause_points_missed += s.pause_points_missed;
                total.lease_lapses += s.lease_lapses;
                total.unsynced_lost += s.unsynced_lost;
            }
            Err(e) => {
                println!("sim: FAILED {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "sim: {seeds} seeds x {hosts} hosts x {steps} steps: ok (ops {}, succeeded {}, clean errors {}, crashes {}, \
         restarts {}, lock beliefs checked {}, pauses {} (at a protocol point {}, missed {}), fenced answers checked {}, lease lapses retried {}, unsynced writes lost with their host {}) in {:.1} s",
        total.ops,
        total.ok,
        total.clean_errors,
        total.crashes,
        total.restarts,
        total.locks_checked,
        total.pauses,
        total.pause_points,
        total.pause_points_missed,
        total.fenced_checked,
        total.lease_lapses,
        total.unsynced_lost,
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
