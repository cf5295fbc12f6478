//! Everything the CLI prints, and how it fails.
//!
//! * Results go to stdout through [`write_line`] (the [`outln!`] macro): a
//!   reader that closes the pipe early (`dlsm volume list | head -1`) is
//!   not an error of dlsm. The write fails with `EPIPE` (Rust ignores
//!   SIGPIPE), [`write_line`] turns that into [`StdoutClosed`], and
//!   [`failure`] exits 0 without a word: the reader got what it wanted,
//!   and a pipeline under `set -o pipefail` does not fail for it.
//! * Errors go to stderr: `error: ...` on one line, or with `--json` one
//!   JSON object `{"error": "...", "http_status": N}` (`http_status` when
//!   a node answered); exit status 1. A wrong command line exits 2, as
//!   clap does, and with `--json` is `{"error": "...", "usage": true}`.
//! * Notes while a command runs (`migrate --wait` losing its node) go to
//!   stderr too, as text or, with `--json`, `{"warning": "..."}`.
//! * The human formats (volume and migration tables, status, node info)
//!   are pure functions returning text, tested below on hand-built values.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use serde::Serialize;

use crate::api::types::{ClusterNode, ClusterVolume, NodeInfo, VolumeInfo};
use crate::api::types::{MigrationStatus, Phase};
use crate::node::store::TargetSpec;
use crate::size::format_size;

/// Stdout was closed by its reader.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed by its reader")]
pub struct StdoutClosed;

/// Writes `args` and a newline to stdout.
pub fn write_line(args: std::fmt::Arguments) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let r = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => Ok(r?),
    }
}

/// `println!` for results: see the module doc.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Prints text that already ends in a newline (or is empty).
pub fn write_text(text: &str) -> anyhow::Result<()> {
    match text.strip_suffix('\n') {
        Some(t) => write_line(format_args!("{t}")),
        None if text.is_empty() => Ok(()),
        None => write_line(format_args!("{text}")),
    }
}

/// A value as pretty JSON on stdout.
pub fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    write_line(format_args!("{}", serde_json::to_string_pretty(v)?))
}

/// A value as one line of JSON on stdout (for streams of them).
pub fn print_json_line(v: &impl Serialize) -> anyhow::Result<()> {
    write_line(format_args!("{}", serde_json::to_string(v)?))
}

/// A note on stderr while a command goes on. Never fails: a closed stderr
/// must not stop the command.
pub fn note(json: bool, msg: &str) {
    let line = if json {
        serde_json::json!({ "warning": msg }).to_string()
    } else {
        format!("dlsm: {msg}")
    };
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Reports a failed command and gives the exit status (see the module doc).
pub fn failure(e: &anyhow::Error, json: bool) -> ExitCode {
    if e.downcast_ref::<StdoutClosed>().is_some() {
        return ExitCode::SUCCESS;
    }
    let line = if json {
        let mut v = serde_json::json!({ "error": format!("{e:#}") });
        if let Some(s) = crate::api_client::status_of(e) {
            v["http_status"] = s.into();
        }
        v.to_string()
    } else {
        format!("error: {e:#}")
    };
    let _ = writeln!(std::io::stderr(), "{line}");
    ExitCode::FAILURE
}

/// A command line clap refused. Help and version requests print as clap
/// prints them; with `--json` anywhere on the command line a real error
/// is one JSON object on stderr, like every other error.
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if !json
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        e.exit()
    }
    let text = e.render().to_string();
    // clap's text is the error ("error: ...", maybe over a few lines),
    // then a blank line and the usage or a hint: keep the error, as one line.
    let error = text.split("\n\n").next().unwrap_or_default();
    let error = error.strip_prefix("error: ").unwrap_or(error);
    let msg = error.split_whitespace().collect::<Vec<_>>().join(" ");
    let _ = writeln!(
        std::io::stderr(),
        "{}",
        serde_json::json!({ "error": msg, "usage": true })
    );
    ExitCode::from(2)
}

/// Columns of text, each as wide as its widest cell; the last column is
/// not padded. `right[i]`: column `i` is right-aligned (numbers).
pub fn table(headers: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let last = i + 1 == r.len();
            let pad = width[i] - c.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                if !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Cuts `s` to at most `max` characters, marking the cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Seconds as a short duration: `45 s`, `3 min 20 s`, `1 h 02 min`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// Regions present as a percentage, one decimal (`-` when there are none).
fn percent(s: &MigrationStatus) -> String {
    if s.regions_total == 0 {
        return "-".into();
    }
    format!(
        "{:.1}%",
        100.0 * s.regions_present as f64 / s.regions_total as f64
    )
}

/// Whether the background copy is running, so a rate and an ETA mean
/// something: hydrating, and neither paused by an operator nor stalled.
fn copying(s: &MigrationStatus) -> bool {
    s.phase == Phase::Hydrating && !s.paused && s.stalled.is_none()
}

/// The phase as the docs spell it, with `(paused)` when an operator
/// paused the copy.
fn phase(s: &MigrationStatus) -> String {
    if s.paused && !matches!(s.phase, Phase::Complete | Phase::Failed) {
        format!("{} (paused)", s.phase)
    } else {
        s.phase.to_string()
    }
}

/// The measured copy rate (`-` when nothing is being copied).
fn rate(s: &MigrationStatus) -> String {
    if copying(s) {
        format!("{}/s", format_size(s.rate))
    } else {
        "-".into()
    }
}

/// The time left (`-` when paused, stalled or unknown).
fn eta(s: &MigrationStatus) -> String {
    match s.eta_seconds {
        Some(e) if copying(s) => duration(e),
        _ => "-".into(),
    }
}

/// `migration status`: one migration, as either node sees it.
pub fn status_text(s: &MigrationStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "volume:      {} ({} of the migration, peer {})",
        s.volume, s.role, s.peer
    );
    if !s.id.is_empty() {
        let _ = writeln!(o, "migration:   {}", s.id);
    }
    let _ = writeln!(o, "phase:       {}", phase(s));
    if let Some(of) = &s.rollback_of {
        let _ = writeln!(
            o,
            "rollback of: {of} (only what was written there crosses back)"
        );
    }
    if let Some(how) = &s.ended {
        let _ = writeln!(o, "ended:       {how}");
    }
    if let Some(why) = &s.stalled {
        let _ = writeln!(o, "stalled:     {why}");
    }
    // A status with no regions is one whose destination could not say
    // (its last error says why): no "0/0 regions" then.
    if s.regions_total > 0 {
        let _ = writeln!(
            o,
            "regions:     {}/{} present ({}), {} each",
            s.regions_present,
            s.regions_total,
            percent(s),
            format_size(s.region_size)
        );
    }
    let _ = writeln!(
        o,
        "bytes:       on demand {}, background {}, skipped (zero) {}",
        format_size(s.bytes_on_demand),
        format_size(s.bytes_background),
        format_size(s.bytes_skipped)
    );
    let limit = if s.rate_limit == 0 {
        "unlimited".to_string()
    } else {
        format!("{}/s", format_size(s.rate_limit))
    };
    let now = if s.paused {
        "paused".to_string()
    } else {
        rate(s)
    };
    let _ = writeln!(o, "rate:        {now} (limit {limit})");
    if copying(s) {
        if let Some(e) = s.eta_seconds {
            let _ = writeln!(o, "eta:         {}", duration(e));
        }
    }
    if let Some(t) = s.handoff_after_seconds {
        let _ = writeln!(o, "handoff:     {} after prepare", duration(t));
    }
    if let Some(t) = s.hydrate_seconds {
        let _ = writeln!(o, "hydrated in: {}", duration(t));
    }
    if let Some(e) = &s.last_error {
        let _ = writeln!(o, "last error:  {e}");
    }
    o
}

/// One line about a migration in progress, for `migrate --wait`.
pub fn status_brief(s: &MigrationStatus) -> String {
    let mut o = format!(
        "{} {}/{} regions ({})",
        phase(s),
        s.regions_present,
        s.regions_total,
        percent(s)
    );
    if copying(s) {
        let _ = write!(o, ", {}", rate(s));
        if s.eta_seconds.is_some() {
            let _ = write!(o, ", eta {}", eta(s));
        }
    }
    if let Some(why) = &s.stalled {
        let _ = write!(o, ", stalled: {why}");
    }
    if let Some(e) = &s.last_error {
        let _ = write!(o, " ({})", truncate(e, 60));
    }
    o
}

/// `migration list`: one row per migration.
pub fn migration_table(list: &[MigrationStatus]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.volume.clone(),
                s.role.clone(),
                s.peer.clone(),
                phase(s),
                percent(s),
                rate(s),
                eta(s),
                s.last_error
                    .as_deref()
                    .map(|e| truncate(e, 40))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "VOLUME",
            "ROLE",
            "PEER",
            "PHASE",
            "PROGRESS",
            "RATE",
            "ETA",
            "LAST ERROR",
        ],
        &rows,
        &[false, false, false, false, true, true, true, false],
    )
}

/// A volume's table in a few words: `local`, `clone`, `remote`.
pub fn table_kind(t: &TargetSpec) -> &'static str {
    match t {
        TargetSpec::Local { .. } => "local",
        TargetSpec::Remote { .. } => "remote",
        TargetSpec::Clone { .. } => "clone",
    }
}

/// A volume's table in a sentence.
pub fn table_text(t: &TargetSpec) -> String {
    match t {
        TargetSpec::Local { file } => format!("local (file {file})"),
        TargetSpec::Remote { nbd, export, api } => {
            format!("remote (export {export} at {nbd}, node API {api})")
        }
        TargetSpec::Clone {
            origin,
            region_size,
            handed_off,
            source_unfenced,
            migration,
            ..
        } => {
            let from = match origin.as_ref() {
                TargetSpec::Remote { api, .. } => format!("migrating in from {api}"),
                other => format!("over {}", table_kind(other)),
            };
            let state = match (handed_off, source_unfenced) {
                (false, _) => "before handoff",
                (true, false) => "handed off",
                (true, true) => "handed off by force, source not fenced yet",
            };
            let id = if migration.is_empty() {
                String::new()
            } else {
                format!(", migration {migration}")
            };
            format!(
                "clone ({from}, {state}, regions of {}{id})",
                format_size(*region_size)
            )
        }
    }
}

/// `volume list`.
pub fn volume_table(vols: &[VolumeInfo]) -> String {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            let mut table = table_kind(&v.table).to_string();
            if v.fenced_to.is_some() {
                table.push_str(", fenced");
            }
            vec![
                v.name.clone(),
                format_size(v.size),
                format_size(v.allocated_bytes),
                v.connections.to_string(),
                table,
                v.uri.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "ALLOCATED", "CONNS", "TABLE", "URI"],
        &rows,
        &[false, true, true, true, false, false],
    )
}

/// `volume list` in cluster mode: every volume of the cluster.
pub fn cluster_volume_table(vols: &[ClusterVolume]) -> String {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format_size(v.size),
                v.node.clone(),
                v.generation.to_string(),
                v.state.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "NODE", "GEN", "STATE"],
        &rows,
        &[false, true, false, true, false],
    )
}

/// `node list`: every member of the cluster.
pub fn node_table(nodes: &[ClusterNode]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.state.clone(),
                n.nbd.clone().unwrap_or_else(|| "-".into()),
                n.api.clone(),
                n.volumes.to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "NBD", "API", "VOLUMES"],
        &rows,
        &[false, false, false, false, true],
    )
}

/// `volume show`.
pub fn volume_text(v: &VolumeInfo) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "name:        {}", v.name);
    if let Some(node) = &v.node {
        let gen = v.generation.map_or("-".into(), |g| g.to_string());
        let _ = writeln!(o, "node:        {node} (generation {gen})");
    }
    let _ = writeln!(
        o,
        "size:        {} ({} bytes), {} allocated here",
        format_size(v.size),
        v.size,
        format_size(v.allocated_bytes)
    );
    let _ = writeln!(o, "table:       {}", table_text(&v.table));
    match &v.fenced_to {
        Some(to) => {
            let _ = writeln!(
                o,
                "fenced:      handed off to {to}; writes are refused here"
            );
        }
        None => {
            let _ = writeln!(o, "fenced:      no");
        }
    }
    let _ = writeln!(o, "connections: {}", v.connections);
    let _ = writeln!(o, "uri:         {}", v.uri.as_deref().unwrap_or("-"));
    if let Some(p) = &v.vhost_user_socket {
        let _ = writeln!(o, "vhost-user:  {p}");
    }
    o
}

/// `node info`.
pub fn node_text(api: &str, n: &NodeInfo) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "node:        {}", n.name);
    let _ = writeln!(o, "version:     {}", n.version);
    let _ = writeln!(o, "api:         {api}");
    let _ = writeln!(o, "nbd:         {}", n.nbd.as_deref().unwrap_or("-"));
    let _ = writeln!(o, "nbd unix:    {}", n.nbd_unix.as_deref().unwrap_or("-"));
    if let Some(d) = &n.vhost_user_dir {
        let _ = writeln!(o, "vhost-user:  {d}/NAME");
    }
    if let Some(c) = &n.cluster {
        let state = if c.lease_valid {
            "valid"
        } else {
            "NOT confirmed: writes to cluster volumes are refused"
        };
        let _ = writeln!(o, "cluster:     {}", c.id);
        let _ = writeln!(o, "etcd:        {}", c.etcd);
        let _ = writeln!(
            o,
            "lease:       {:x} (TTL {} s), {state}",
            c.lease, c.lease_ttl_seconds
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(volume: &str, phase: Phase) -> MigrationStatus {
        MigrationStatus {
            phase,
            role: "destination".into(),
            peer: "10.0.0.1:7450".into(),
            region_size: 64 << 10,
            regions_total: 16384,
            regions_present: 4096,
            bytes_on_demand: 1 << 20,
            bytes_background: 255 << 20,
            rate: 100 << 20,
            eta_seconds: Some(7.5),
            handoff_after_seconds: Some(1.0),
            ..MigrationStatus::unknown(volume, "00112233aabbccdd")
        }
    }

    #[test]
    fn migration_table_has_a_row_per_migration() {
        let mut paused = status("vm2", Phase::Hydrating);
        paused.paused = true;
        paused.role = "source".into();
        let mut failed = status("vm3", Phase::Failed);
        failed.last_error =
            Some("the source refused for good: migration 00112233aabbccdd is unknown there".into());
        let mut empty = status("vm4", Phase::Passthrough);
        empty.regions_total = 0;
        let list = vec![status("vm1", Phase::Hydrating), paused, failed, empty];
        let t = migration_table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].starts_with("VOLUME"), "{t}");
        for h in [
            "ROLE",
            "PEER",
            "PHASE",
            "PROGRESS",
            "RATE",
            "ETA",
            "LAST ERROR",
        ] {
            assert!(lines[0].contains(h), "{h} missing: {t}");
        }
        // Hydrating: progress, rate and ETA.
        assert!(lines[1].contains("destination"), "{t}");
        assert!(lines[1].contains("10.0.0.1:7450"), "{t}");
        assert!(lines[1].contains("hydrating"), "{t}");
        assert!(lines[1].contains("25.0%"), "{t}");
        assert!(lines[1].contains("100.0 MiB/s"), "{t}");
        assert!(lines[1].contains("8 s"), "{t}");
        // Paused: no rate, no ETA.
        assert!(lines[2].contains("hydrating (paused)"), "{t}");
        assert!(
            !lines[2].contains("MiB/s") && !lines[2].contains(" s "),
            "{t}"
        );
        // Failed: the error, cut short.
        assert!(lines[3].contains("failed"), "{t}");
        assert!(lines[3].contains("the source refused for good"), "{t}");
        assert!(lines[3].ends_with('…'), "{t}");
        assert!(!lines[3].contains("unknown there"), "{t}");
        // No regions yet: no percentage to make up.
        assert!(lines[4].contains("passthrough"), "{t}");
        // Columns line up: every row has the phase where the header has it.
        let at = lines[0].find("PHASE").unwrap();
        for l in &lines[1..] {
            assert!(
                ["hydrating", "failed", "passthrough"]
                    .iter()
                    .any(|p| l[at..].starts_with(p)),
                "{l:?} in {t}"
            );
        }
        // Nothing spelled as Rust's Debug would.
        assert!(
            !t.contains("Hydrating") && !t.contains("Passthrough"),
            "{t}"
        );
        assert_eq!(migration_table(&[]).lines().count(), 1);
    }

    #[test]
    fn paused_status_shows_no_rate_or_eta() {
        let mut s = status("vm1", Phase::Hydrating);
        let running = status_text(&s);
        assert!(running.contains("phase:       hydrating\n"), "{running}");
        assert!(running.contains("rate:        100.0 MiB/s"), "{running}");
        assert!(running.contains("eta:         8 s"), "{running}");
        assert!(status_brief(&s).contains("eta 8 s"));
        s.paused = true;
        let paused = status_text(&s);
        assert!(
            paused.contains("phase:       hydrating (paused)"),
            "{paused}"
        );
        assert!(
            paused.contains("rate:        paused (limit unlimited)"),
            "{paused}"
        );
        assert!(!paused.contains("eta"), "{paused}");
        assert!(!paused.contains("MiB/s"), "{paused}");
        let brief = status_brief(&s);
        assert!(!brief.contains("eta") && !brief.contains("/s"), "{brief}");
        s.paused = false;
        s.stalled = Some("destination disk full".into());
        assert!(!status_text(&s).contains("eta"));
    }

    #[test]
    fn tables_align_and_trim() {
        let t = table(
            &["A", "NUM", "LAST"],
            &[
                vec!["long-name".into(), "1".into(), "x".into()],
                vec!["b".into(), "1000".into(), String::new()],
            ],
            &[false, true, false],
        );
        assert_eq!(
            t,
            "A           NUM  LAST\nlong-name     1  x\nb          1000\n"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(0.4), "0 s");
        assert_eq!(duration(45.0), "45 s");
        assert_eq!(duration(200.0), "3 min 20 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
    }

    #[test]
    fn volume_show_names_the_table_and_the_fence() {
        let v: VolumeInfo = serde_json::from_value(serde_json::json!({
            "name": "vm1", "size": 1u64 << 40, "allocated_bytes": 0, "connections": 0,
            "uri": null, "fenced_to": "10.0.0.2:7450",
            "table": {"kind": "clone",
                      "origin": {"kind": "remote", "nbd": "10.0.0.1:10809",
                                 "export": "vm1@x", "api": "10.0.0.1:7450"},
                      "local": {"kind": "local", "file": "data.raw"},
                      "map": "regions", "region_size": 65536, "handed_off": true,
                      "migration": "00112233aabbccdd"}
        }))
        .unwrap();
        let t = volume_text(&v);
        assert!(t.contains("1.0 TiB"), "{t}");
        assert!(
            t.contains("table:       clone (migrating in from 10.0.0.1:7450, handed off"),
            "{t}"
        );
        assert!(t.contains("handed off to 10.0.0.2:7450"), "{t}");
        let list = volume_table(&[v]);
        assert!(list.contains("clone, fenced"), "{list}");
    }
}
