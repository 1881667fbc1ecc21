//! Progress of long work (mkfs of a large LUN, fsck, offline recovery), one way for
//! every tool: a bar or a spinner on stderr when stderr is a terminal, nothing at
//! all otherwise (a log, a pipe, a CI run, systemd), so that what the tools print
//! for a reader or a script stays clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// True when progress is shown: stderr is a terminal.
pub fn shown() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar of `len` steps with an indicatif `template` (`{bar}`, `{pos}`, `{len}`,
/// `{msg}`), or a hidden bar when progress is not shown.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    if !shown() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// A spinner that turns by itself (for waits with no count: watching heartbeats,
/// replaying journals), or a hidden one when progress is not shown.
pub fn spinner(template: &str) -> ProgressBar {
    if !shown() {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template(template) {
        spinner.set_style(style);
    }
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}
