//! `cargo xtask pjdfstest`: the POSIX suite on a fresh atsfs mount.
//!
//! Makes an image (`mkfs.atsfs` defaults: Disk Paxos on an image file, as a user
//! gets it; `--ats` to choose), mounts it in background mode, writes pjdfstest's
//! configuration, runs `pjdfstest -c CONF -p MOUNTPOINT`, and reads its per-test lines
//! (`NAME <spaces> ok|FAILED|skipped`). A failure counts unless
//! `docs/pjdfstest-exclusions.txt` lists the test with a reason. The full output is
//! kept in TARGET/pjdfstest.log.
//!
//! pjdfstest switches to two unprivileged users; the configuration names
//! `nobody`/`nogroup` and `tests`/`tests`, and `tests` is created when missing.

use crate::mount::Host;
use crate::sh::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The version `cargo install` fetches when pjdfstest is missing; the exclusion
/// list names tests of this version.
const PJDFSTEST_VERSION: &str = "0.2.2";
/// The exclusion list, relative to the workspace root.
const EXCLUSIONS: &str = "docs/pjdfstest-exclusions.txt";

#[derive(clap::Args, Clone)]
pub struct PjdArgs {
    /// Size of the test volume (as mkfs.atsfs --size takes it).
    #[arg(long, default_value = "1G")]
    image_size: String,
    /// Use release builds of atsfs and mkfs-atsfs (default: debug, as `cargo test`).
    #[arg(long)]
    release: bool,
    /// Stop pjdfstest after this many seconds (a hung filesystem must not hang CI).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Keep the temporary directory (image, configuration, daemon log).
    #[arg(long)]
    keep: bool,
    /// The volume's test-and-set, as `mkfs.atsfs --ats` takes it. The default is
    /// what a user gets on an image file: Disk Paxos (`auto`).
    #[arg(long, default_value = "auto")]
    ats: String,
    /// Only tests whose names contain one of these (pjdfstest's own filter).
    patterns: Vec<String>,
}

impl Default for PjdArgs {
    fn default() -> Self {
        PjdArgs {
            image_size: "1G".into(),
            release: false,
            timeout_secs: 600,
            keep: false,
            ats: "auto".into(),
            patterns: Vec::new(),
        }
    }
}

/// What one run found.
pub struct Outcome {
    pub passed: usize,
    pub skipped: usize,
    /// Failed tests not in the exclusion list: these fail the run.
    pub unexpected: Vec<String>,
    /// Failed tests the list excuses.
    pub excused: Vec<String>,
}

impl Outcome {
    pub fn failed(&self) -> usize {
        self.unexpected.len() + self.excused.len()
    }

    pub fn ok(&self) -> bool {
        self.unexpected.is_empty()
    }

    /// The one-line result, e.g. "384 passed, 0 failed, 14 skipped".
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} passed, {} failed, {} skipped",
            self.passed,
            self.failed(),
            self.skipped
        );
        if !self.excused.is_empty() {
            line.push_str(&format!(
                " ({} of the failures excluded)",
                self.excused.len()
            ));
        }
        line
    }
}

/// The `pjdfstest` task: runs and prints the verdict line.
pub fn run_task(args: &PjdArgs) -> Result<bool> {
    let outcome = run(args)?;
    let verdict = if outcome.ok() { "PASSED" } else { "FAILED" };
    println!("\npjdfstest: {verdict}: {}", outcome.line());
    Ok(outcome.ok())
}

/// Runs the suite; `Err` only when it could not run at all.
pub fn run(args: &PjdArgs) -> Result<Outcome> {
    crate::require_root_and_fuse("pjdfstest")?;
    let root = sh::workspace_root()?;
    let exclusions = read_exclusions(&root.join(EXCLUSIONS))?;
    sh::heading("Preparing pjdfstest");
    let users = ensure_users()?;
    let pjdfstest = ensure_pjdfstest()?;
    let bin = build(args.release)?;

    let temp = tempfile::Builder::new()
        .prefix("atsfs-pjdfstest-")
        .tempdir()
        .context("making a temporary directory")?;
    let dir = temp.path();
    let image = dir.join("volume.img");
    Cmd::new(bin.join("mkfs-atsfs"))
        .args(["-q", "--size", &args.image_size, "--ats", &args.ats])
        .arg(&image)
        .run()?;
    let host = Host::new("A", &random_uuid()?, dir);
    let config = dir.join("pjdfstest.toml");
    write_config(&config, &users)?;
    let secondary = dir.join("secondary");
    std::fs::create_dir(&secondary).context("making the secondary directory")?;

    let log = sh::target_dir()?.join("pjdfstest.log");
    let results = {
        let mount = host.mount(&bin.join("atsfs"), &image)?;
        sh::heading("Running pjdfstest");
        let results = run_suite(&pjdfstest, args, &config, mount.path(), &secondary, &log);
        mount.unmount()?;
        results?
    };
    if args.keep {
        println!("(kept {})", temp.keep().display());
    }
    println!("full output: {}", log.display());
    Ok(judge(&results, &exclusions))
}

/// Builds atsfs and mkfs-atsfs; returns their directory.
fn build(release: bool) -> Result<PathBuf> {
    let mut cargo = sh::cargo().arg("build");
    if release {
        cargo = cargo.arg("--release");
    }
    cargo
        .args(["-p", "atsfs", "-p", "mkfs-atsfs"])
        .current_dir(&sh::workspace_root()?)
        .run()?;
    let profile = if release { "release" } else { "debug" };
    Ok(sh::target_dir()?.join(profile))
}

/// A fresh host UUID from the kernel.
fn random_uuid() -> Result<String> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?;
    Ok(text.trim().to_string())
}

/// The two (user, group) pairs pjdfstest switches to.
struct Users {
    nobody_group: String,
}

/// Makes sure the users exist: `tests` is created (with its group) when missing;
/// nobody's group is `nogroup` on Debian and `nobody` elsewhere.
fn ensure_users() -> Result<Users> {
    let exists = |db: &str, name: &str| -> Result<bool> {
        Ok(Cmd::new("getent")
            .args([db, name])
            .quiet()
            .output()?
            .status
            .success())
    };
    if !exists("passwd", "nobody")? {
        bail!("pjdfstest needs the user `nobody`, and this system has none");
    }
    if !exists("passwd", "tests")? {
        let entry = "tests:x:::pjdfstest:/:/usr/sbin/nologin\n";
        println!("$ echo '{}' | newusers", entry.trim());
        let mut child = std::process::Command::new("newusers")
            .stdin(Stdio::piped())
            .spawn()
            .context("running newusers (from the passwd package) to create the user tests")?;
        child
            .stdin
            .take()
            .context("newusers' stdin")?
            .write_all(entry.as_bytes())
            .context("writing to newusers")?;
        let status = child.wait().context("waiting for newusers")?;
        if !status.success() {
            bail!("newusers failed ({status}) creating the user tests");
        }
    }
    let nobody_group = if exists("group", "nogroup")? {
        "nogroup"
    } else {
        "nobody"
    };
    Ok(Users {
        nobody_group: nobody_group.into(),
    })
}

/// Finds pjdfstest in PATH or cargo's bin directory; installs it when missing.
fn ensure_pjdfstest() -> Result<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join("pjdfstest"));
    let found = sh::which("pjdfstest").or_else(|| cargo_bin.clone().filter(|p| p.is_file()));
    if let Some(path) = found {
        return Ok(path);
    }
    println!("pjdfstest is not installed; installing it (a few minutes)");
    sh::cargo()
        .args([
            "install",
            "--locked",
            "pjdfstest",
            "--version",
            PJDFSTEST_VERSION,
        ])
        .run()
        .context("installing pjdfstest")?;
    sh::which("pjdfstest")
        .or_else(|| cargo_bin.filter(|p| p.is_file()))
        .context("pjdfstest was installed but is neither in PATH nor in ~/.cargo/bin")
}

fn write_config(path: &Path, users: &Users) -> Result<()> {
    let text = format!(
        r#"# pjdfstest configuration written by `cargo xtask pjdfstest`.
[features]
# Syscalls atsfs supports beyond the base set.
posix_fallocate = {{}}
utimensat = {{}}
utime_now = {{}}
# atsfs updates a file's ctime when it is renamed, as ext4 and xfs do.
rename_ctime = {{}}

[settings]
# atsfs keeps nanosecond timestamps; 10 ms also covers the kernel's coarse clock.
naptime = 0.01
# The EROFS tests remount read-only; atsfs mounts are not remounted.
allow_remount = false

[dummy_auth]
entries = [["nobody", "{nobody_group}"], ["tests", "tests"]]
"#,
        nobody_group = users.nobody_group
    );
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("configuration {}:\n{text}", path.display());
    Ok(())
}

/// How one test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    Failed,
    Skipped,
}

/// Runs pjdfstest, streaming failures to the terminal and everything to `log`.
fn run_suite(
    pjdfstest: &Path,
    args: &PjdArgs,
    config: &Path,
    mountpoint: &Path,
    secondary: &Path,
    log: &Path,
) -> Result<BTreeMap<String, Verdict>> {
    let mut command = Cmd::new(pjdfstest)
        .arg("-c")
        .arg(config)
        .arg("-p")
        .arg(mountpoint)
        .arg("-s")
        .arg(secondary)
        .args(&args.patterns)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .into_command();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pjdfstest")?;
    let stdout = child.stdout.take().context("pjdfstest's stdout")?;
    let mut stderr = child.stderr.take().context("pjdfstest's stderr")?;
    let mut log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let reader = std::thread::spawn(move || -> Result<(Vec<String>, Vec<u8>)> {
        let lines = stream_lines(stdout, &mut log_file)?;
        let mut err = Vec::new();
        stderr
            .read_to_end(&mut err)
            .context("reading pjdfstest's stderr")?;
        log_file.write_all(&err).context("writing the log")?;
        Ok((lines, err))
    });

    let started = Instant::now();
    let limit = Duration::from_secs(args.timeout_secs);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for pjdfstest")? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "pjdfstest ran longer than {limit:?} and was killed (a hung filesystem?); \
                 output so far: {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (lines, stderr) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the output reader thread panicked"))??;
    println!("pjdfstest finished in {:.0?} ({status})", started.elapsed());
    if !lines.iter().any(|l| l.starts_with("Summary:")) {
        bail!(
            "pjdfstest stopped without its summary ({status}); stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(parse_results(&lines))
}

/// Copies pjdfstest's stdout to the log, echoes failures and the summary, and
/// returns the lines.
fn stream_lines(stdout: impl Read, log: &mut std::fs::File) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let mut echo_details = false;
    for line in BufReader::new(stdout).lines() {
        let line = strip_ansi(&line.context("reading pjdfstest's output")?);
        writeln!(log, "{line}").context("writing the log")?;
        let verdict = parse_line(&line).map(|(_, v)| v);
        if verdict.is_some() {
            echo_details = verdict == Some(Verdict::Failed);
        }
        if echo_details || line.starts_with("Summary:") {
            println!("{line}");
        }
        lines.push(line);
    }
    Ok(lines)
}

/// Removes terminal colour sequences (`ESC [ ... m`), in case colours are forced.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads one result line: `NAME`, spaces, then `ok`, `FAILED` or `skipped` (also
/// `failed as expected` and `PASSED UNEXPECTEDLY`, which need pjdfstest's own
/// expected-failure list; we do not give it one).
fn parse_line(line: &str) -> Option<(&str, Verdict)> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    let (name, rest) = line.split_once(char::is_whitespace)?;
    let verdict = match rest.trim() {
        "ok" | "failed as expected" => Verdict::Passed,
        "FAILED" | "PASSED UNEXPECTEDLY" => Verdict::Failed,
        "skipped" => Verdict::Skipped,
        _ => return None,
    };
    name.contains("::").then_some((name, verdict))
}

fn parse_results(lines: &[String]) -> BTreeMap<String, Verdict> {
    lines
        .iter()
        .filter_map(|l| parse_line(l))
        .map(|(name, verdict)| (name.to_string(), verdict))
        .collect()
}

/// Reads the exclusion list: `test::name  # reason`, one a line; blank lines and
/// lines starting with `#` are comments. Every entry needs a reason.
fn read_exclusions(path: &Path) -> Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, reason) = line.split_once('#').unwrap_or((line, ""));
        let (name, reason) = (name.trim(), reason.trim());
        if reason.is_empty() || name.contains(char::is_whitespace) {
            bail!(
                "{}:{}: write `test::name  # reason` (every exclusion needs a reason)",
                path.display(),
                number + 1
            );
        }
        out.insert(name.to_string(), reason.to_string());
    }
    Ok(out)
}

/// Compares the results with the exclusion list and prints the verdict's details.
fn judge(results: &BTreeMap<String, Verdict>, exclusions: &BTreeMap<String, String>) -> Outcome {
    let count = |v: Verdict| results.values().filter(|&&r| r == v).count();
    let mut outcome = Outcome {
        passed: count(Verdict::Passed),
        skipped: count(Verdict::Skipped),
        unexpected: Vec::new(),
        excused: Vec::new(),
    };
    for (name, _) in results.iter().filter(|(_, &v)| v == Verdict::Failed) {
        match exclusions.get(name) {
            Some(reason) => {
                println!("excluded failure: {name} ({reason})");
                outcome.excused.push(name.clone());
            }
            None => outcome.unexpected.push(name.clone()),
        }
    }
    for (name, reason) in exclusions {
        if results.get(name) == Some(&Verdict::Passed) {
            println!("note: {name} passes now; remove it from {EXCLUSIONS} ({reason})");
        }
    }
    if !outcome.unexpected.is_empty() {
        println!("failures not in {EXCLUSIONS}:");
        for name in &outcome.unexpected {
            println!("  {name}");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let ok = "chmod::eperm_not_owner                                               ok";
        assert_eq!(
            parse_line(ok),
            Some(("chmod::eperm_not_owner", Verdict::Passed))
        );
        let failed = "open::changed_time_fields_success                        FAILED";
        assert_eq!(
            parse_line(failed),
            Some(("open::changed_time_fields_success", Verdict::Failed))
        );
        let skipped = "link::exdev_target                              skipped";
        assert_eq!(
            parse_line(skipped),
            Some(("link::exdev_target", Verdict::Skipped))
        );
        assert_eq!(parse_line("\tTimestamps did not change as expected"), None);
        assert_eq!(parse_line("Backtrace:"), None);
        assert_eq!(
            parse_line("Summary: 0 failed, 14 skipped, 384 passed, 0 expected failures"),
            None
        );
        assert_eq!(strip_ansi("\u{1b}[34mx::y\u{1b}[0m ok"), "x::y ok");
    }

    #[test]
    fn only_unlisted_failures_count() {
        let results: BTreeMap<String, Verdict> = [
            ("a::passes", Verdict::Passed),
            ("a::listed_fails", Verdict::Failed),
            ("a::unlisted_fails", Verdict::Failed),
            ("a::skipped", Verdict::Skipped),
            ("a::listed_passes", Verdict::Passed),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        let exclusions: BTreeMap<String, String> = [
            ("a::listed_fails", "reason one"),
            ("a::listed_passes", "reason two"),
        ]
        .into_iter()
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect();
        let outcome = judge(&results, &exclusions);
        assert_eq!(outcome.passed, 2);
        assert_eq!(outcome.skipped, 1);
        assert_eq!(outcome.failed(), 2);
        assert_eq!(outcome.unexpected, ["a::unlisted_fails"]);
        assert_eq!(outcome.excused, ["a::listed_fails"]);
        assert!(!outcome.ok());
        assert_eq!(
            outcome.line(),
            "2 passed, 2 failed, 1 skipped (1 of the failures excluded)"
        );
    }

    #[test]
    fn exclusions_need_reasons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.txt");
        std::fs::write(&path, "# header\n\nchmod::a  # FUSE cannot\n").expect("write");
        let list = read_exclusions(&path).expect("valid list");
        assert_eq!(
            list.get("chmod::a").map(String::as_str),
            Some("FUSE cannot")
        );
        std::fs::write(&path, "chmod::a\n").expect("write");
        assert!(read_exclusions(&path).is_err());
    }
}
