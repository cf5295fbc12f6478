//! `migrate --wait`: polls the destination until the migration completes
//! or fails, and shows how it goes.
//!
//! The destination may restart while we wait (an upgrade, a crash): its
//! migration resumes by itself, so a transient failure (no answer, or a
//! 5xx) is waited out with the crate's one [`Backoff`] for up to
//! `retry_for`, saying so on stderr, and the display picks up where it
//! was. Anything else (a 4xx, the wrong kind of server) ends the wait.
//!
//! Display, by where stderr goes:
//! * a terminal: an indicatif bar; at the end it is cleared and one final
//!   line is printed in its place, ending in a newline, so what follows
//!   starts on a line of its own;
//! * anything else (a log file, a pipe): one line per change of phase and
//!   at most one every 10 s, so logs show progress without a bar's
//!   carriage returns;
//! * `--json`: one status object per poll on stdout, notes as
//!   `{"warning": ...}` on stderr.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::output;
use crate::api::types::{MigrationStatus, Phase};
use crate::api_client::{is_transient, seg, Api};
use crate::retry::Backoff;

/// How the wait shows progress.
enum Display {
    Json,
    Bar(indicatif::ProgressBar),
    Lines { last: Option<(Phase, Instant)> },
}

impl Display {
    fn new(json: bool) -> Display {
        if json {
            return Display::Json;
        }
        if !std::io::stderr().is_terminal() {
            return Display::Lines { last: None };
        }
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
            )
            .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        Display::Bar(b)
    }

    fn update(&mut self, name: &str, s: &MigrationStatus) -> anyhow::Result<()> {
        match self {
            Display::Json => output::print_json_line(s)?,
            Display::Bar(b) => {
                b.set_length(s.regions_total.max(1));
                b.set_position(s.regions_present);
                b.set_message(output::status_brief(s));
            }
            Display::Lines { last } => {
                let due = match last {
                    None => true,
                    Some((phase, at)) => {
                        *phase != s.phase || at.elapsed() >= Duration::from_secs(10)
                    }
                };
                if due {
                    output::note(false, &format!("{name}: {}", output::status_brief(s)));
                    *last = Some((s.phase, Instant::now()));
                }
            }
        }
        Ok(())
    }

    fn note(&self, msg: &str) {
        match self {
            Display::Json => output::note(true, msg),
            Display::Bar(b) => b.suspend(|| output::note(false, msg)),
            Display::Lines { .. } => output::note(false, msg),
        }
    }

    /// Ends the display; `last` is the final word, printed as a line of
    /// its own in place of the bar.
    fn finish(&self, last: Option<&str>) {
        match self {
            Display::Json => {}
            Display::Bar(b) => {
                b.finish_and_clear();
                if let Some(l) = last {
                    output::note(false, l);
                }
            }
            // The last update already said complete or failed.
            Display::Lines { .. } => {}
        }
    }
}

/// Polls `api` (the destination) until the migration of `name` completes
/// or fails.
pub fn wait_for(api: &Api, name: &str, json: bool, retry_for: Duration) -> anyhow::Result<()> {
    let path = format!("/v1/migrations/{}", seg(name)?);
    let mut display = Display::new(json);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    // Since when the destination has not answered (or answered 5xx).
    let mut outage: Option<Instant> = None;
    let poll = Duration::from_millis(if json { 1000 } else { 200 });
    loop {
        let s: MigrationStatus = match api.get(&path) {
            Ok(s) => s,
            Err(e) if is_transient(&e) => {
                let since = match outage {
                    Some(t) => t,
                    None => {
                        display.note(&format!(
                            "{} does not answer ({e:#}); retrying for up to {} s",
                            api.addr(),
                            retry_for.as_secs()
                        ));
                        *outage.insert(Instant::now())
                    }
                };
                let left = retry_for.saturating_sub(since.elapsed());
                if left.is_zero() {
                    display.finish(None);
                    return Err(e.context(format!(
                        "gave up waiting for the migration of {name}: {} did not answer for {} s \
                         (the migration goes on without this command; `dlsm --api {} \
                         migration status {name}` shows it)",
                        api.addr(),
                        since.elapsed().as_secs(),
                        api.addr()
                    )));
                }
                std::thread::sleep(backoff.next_wait().min(left));
                continue;
            }
            Err(e) => {
                display.finish(None);
                return Err(e);
            }
        };
        if let Some(t) = outage.take() {
            display.note(&format!(
                "{} answers again after {} s; still waiting",
                api.addr(),
                t.elapsed().as_secs()
            ));
            backoff.reset();
        }
        display.update(name, &s)?;
        match s.phase {
            Phase::Complete => {
                display.finish(Some(&format!(
                    "{name}: complete, {}/{} regions",
                    s.regions_present, s.regions_total
                )));
                if !json {
                    output::write_text(&output::status_text(&s))?;
                }
                return Ok(());
            }
            Phase::Cancelled => {
                display.finish(Some(&format!("{name}: cancelled")));
                bail!(
                    "migration of {name} was cancelled{}",
                    s.ended.map(|e| format!(": {e}")).unwrap_or_default()
                )
            }
            Phase::Failed => {
                display.finish(Some(&format!("{name}: failed")));
                bail!(
                    "migration of {name} failed: {}",
                    s.last_error.unwrap_or_default()
                )
            }
            _ => std::thread::sleep(poll),
        }
    }
}
