//! `cargo xtask test`: the one test command of the README and of CI.
//!
//! 1. `cargo build --workspace`
//! 2. `cargo test --workspace --no-fail-fast` (unit, property and integration tests;
//!    the FUSE integration tests skip themselves without root and /dev/fuse)
//! 3. the cluster tests again on Disk Paxos volumes opened as plain disks
//!    (`ATSFS_ATS_EMULATION=off cargo test --test cluster`: two and three daemons,
//!    kill -9, SIGSTOP past the lease, create storms, with no compare-and-write at all)
//! 4. pjdfstest on a fresh mount (`cargo xtask pjdfstest`)
//!
//! A failed step does not stop the later ones (except a failed build), so one run
//! shows everything that is wrong. The output ends with a summary table and the line
//! `xtask test: PASSED` or `xtask test: FAILED (steps...)`.

use crate::pjdfstest::{self, PjdArgs};
use crate::sh::{self, Cmd};
use anyhow::Result;
use std::time::Instant;

/// How one step ended.
enum StepResult {
    Passed(String),
    Failed(String),
    Skipped(String),
}

struct Step {
    name: &'static str,
    result: StepResult,
    seconds: u64,
}

pub fn run() -> Result<bool> {
    let root = sh::workspace_root()?;
    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    let fuse_ok = sh::is_root() && std::path::Path::new("/dev/fuse").exists();
    let mut steps = Vec::new();

    sh::heading("Step 1/4: cargo build --workspace");
    let build = timed("cargo build --workspace", || {
        cargo_step(
            sh::cargo()
                .args(["build", "--workspace"])
                .current_dir(&root),
        )
    });
    let built = matches!(build.result, StepResult::Passed(_));
    steps.push(build);

    if built {
        sh::heading("Step 2/4: cargo test --workspace");
        if !fuse_ok {
            println!("(not root or no /dev/fuse: the FUSE integration tests will skip themselves)");
        }
        if sh::is_root() && !in_ci {
            // The iSCSI tests need the test bed; build it once (about 10 s, and the
            // packages it needs the first time). CI's .ci/run builds it before.
            if let Err(e) = crate::tgt::build(false) {
                println!(
                    "(the iSCSI tests will skip themselves: building the tgt test bed failed: \
                     {e:#})"
                );
            }
        }
        steps.push(timed("cargo test --workspace", || {
            cargo_step(
                sh::cargo()
                    .args(["test", "--workspace", "--no-fail-fast"])
                    .current_dir(&root),
            )
        }));

        sh::heading("Step 3/4: the cluster tests on Disk Paxos (no compare-and-write)");
        steps.push(timed("cluster tests on Disk Paxos", || {
            cargo_step(
                sh::cargo()
                    .args(["test", "-p", "atsfs", "--test", "cluster"])
                    .env("ATSFS_ATS_EMULATION", "off")
                    .current_dir(&root),
            )
        }));

        sh::heading("Step 4/4: pjdfstest");
        steps.push(timed("cargo xtask pjdfstest", || {
            pjdfstest_step(fuse_ok, in_ci)
        }));
    } else {
        for name in [
            "cargo test --workspace",
            "cluster tests on Disk Paxos",
            "cargo xtask pjdfstest",
        ] {
            steps.push(Step {
                name,
                result: StepResult::Skipped("not run: the build failed".into()),
                seconds: 0,
            });
        }
    }
    Ok(summarize(&steps))
}

fn timed(name: &'static str, f: impl FnOnce() -> StepResult) -> Step {
    let started = Instant::now();
    let result = f();
    Step {
        name,
        result,
        seconds: started.elapsed().as_secs(),
    }
}

fn cargo_step(cmd: Cmd) -> StepResult {
    match cmd.status() {
        Ok(status) if status.success() => StepResult::Passed(String::new()),
        Ok(status) => StepResult::Failed(format!("{status}")),
        Err(e) => StepResult::Failed(format!("{e:#}")),
    }
}

fn pjdfstest_step(fuse_ok: bool, in_ci: bool) -> StepResult {
    if !fuse_ok {
        let why = "needs root and /dev/fuse".to_string();
        println!("pjdfstest: skipped: {why}");
        // CI must run everything: a skip there would hide the whole suite.
        return if in_ci {
            StepResult::Failed(format!("{why} (CI=true)"))
        } else {
            StepResult::Skipped(why)
        };
    }
    match pjdfstest::run(&PjdArgs::default()) {
        Ok(outcome) if outcome.ok() => StepResult::Passed(outcome.line()),
        Ok(outcome) => StepResult::Failed(format!(
            "{}; not excluded: {}",
            outcome.line(),
            outcome.unexpected.join(", ")
        )),
        Err(e) => StepResult::Failed(format!("{e:#}")),
    }
}

/// Prints the table and the last line; true when nothing failed.
fn summarize(steps: &[Step]) -> bool {
    sh::heading("Summary");
    let mut failed = Vec::new();
    for step in steps {
        let (word, detail) = match &step.result {
            StepResult::Passed(d) => ("ok", d),
            StepResult::Failed(d) => {
                failed.push(step.name);
                ("FAILED", d)
            }
            StepResult::Skipped(d) => ("skipped", d),
        };
        println!(
            "  {:<26} {:<8} {:>4}s  {}",
            step.name, word, step.seconds, detail
        );
    }
    if failed.is_empty() {
        println!("xtask test: PASSED");
        true
    } else {
        println!("xtask test: FAILED ({})", failed.join(", "));
        false
    }
}
