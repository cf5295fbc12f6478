//! What the binary says about itself: `dlsm version`, `dlsm completions
//! SHELL` (clap_complete) and `dlsm man` (roff, from the same clap tree as
//! `--help`, so the three never disagree), and the conventions `--help`
//! and the man page both state (output, exit status, environment).

use clap::CommandFactory;
use clap_mangen::roff::{bold, italic, roman, Roff};

use super::output::{self, outln};
use super::Cli;

/// The output contract, as `--help` and the man page state it.
const OUTPUT: &str = "Results go to stdout: human text, or JSON with --json. Errors go to \
    stderr: one line `error: ...`, or with --json one JSON object {\"error\": \"...\", \
    \"http_status\": N} (http_status only when a node answered; \"usage\": true instead when \
    the command line is wrong). Notes while a command runs (migrate --wait losing its node) go \
    to stderr, as {\"warning\": \"...\"} with --json.";

/// Exit statuses.
const EXIT_STATUS: &[(&str, &str)] = &[
    (
        "0",
        "success; also when the reader of stdout stops early (dlsm volume list | head -1)",
    ),
    ("1", "the command failed"),
    ("2", "the command line is wrong"),
];

/// Environment variables the CLI reads.
const ENVIRONMENT: &[(&str, &str)] = &[
    ("DLSM_API", "the node's API address, as --api"),
    ("DLSM_TLS_DIR", "the TLS directory, as --tls-dir"),
    (
        "DLSM_API_TOKEN_FILE",
        "the API token file, as --api-token-file",
    ),
    (
        "RUST_LOG",
        "log filter (default: info for serve, warn otherwise; e.g. debug)",
    ),
];

/// The text after `dlsm --help`'s options.
pub fn after_help() -> String {
    let mut s = String::from("Output:\n");
    let mut line = String::from(" ");
    for word in OUTPUT.split_whitespace() {
        if line.len() + 1 + word.len() > 78 {
            s.push_str(&line);
            s.push('\n');
            line = String::from(" ");
        }
        line.push(' ');
        line.push_str(word);
    }
    s.push_str(&line);
    s.push_str("\n\nExit status:\n");
    for (code, what) in EXIT_STATUS {
        s.push_str(&format!("  {code}  {what}\n"));
    }
    s.push_str("\nEnvironment:\n");
    for (var, what) in ENVIRONMENT {
        s.push_str(&format!("  {var:<20} {what}\n"));
    }
    s
}

/// `dlsm version`: the version, the target it was built for, and the
/// commit when the build set `DLSM_GIT_COMMIT`.
pub fn version(json: bool) -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let target = env!("DLSM_TARGET");
    let commit = option_env!("DLSM_GIT_COMMIT").filter(|c| !c.is_empty());
    if json {
        return output::print_json(&serde_json::json!({
            "version": version,
            "target": target,
            "commit": commit,
        }));
    }
    match commit {
        Some(c) => outln!("dlsm {version} ({target}, commit {c})"),
        None => outln!("dlsm {version} ({target})"),
    }
}

/// `dlsm completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    // Generated into memory first: clap_complete panics on a failed write,
    // and a closed stdout must exit quietly instead.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "dlsm", &mut buf);
    output::write_text(&String::from_utf8(buf)?)
}

/// `dlsm man`.
pub fn man() -> anyhow::Result<()> {
    output::write_text(&String::from_utf8(man_page()?)?)
}

/// The manual page: clap_mangen's title, name, synopsis, description and
/// global options, then every command with its own synopsis and
/// arguments (clap_mangen alone lists only the commands' names), then
/// the output contract, exit status and environment.
pub fn man_page() -> anyhow::Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands() {
        command_section(&mut roff, sub);
    }
    roff.control("SH", ["OUTPUT"]);
    roff.text([roman(OUTPUT)]);
    roff.control("SH", ["EXIT STATUS"]);
    for (code, what) in EXIT_STATUS {
        roff.control("TP", []);
        roff.text([bold(*code)]);
        roff.text([roman(*what)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (var, what) in ENVIRONMENT {
        roff.control("TP", []);
        roff.text([bold(*var)]);
        roff.text([roman(*what)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(
        "qemu-img(1), nbdinfo(1), nbdcopy(1); docs/OPERATIONS.md in the dlsm sources.",
    )]);
    roff.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// One command of the COMMANDS section, and its subcommands after it.
fn command_section(roff: &mut Roff, cmd: &clap::Command) {
    if cmd.is_hide_set() || cmd.get_name() == "help" {
        return;
    }
    if cmd.has_subcommands() {
        for sub in cmd.get_subcommands() {
            command_section(roff, sub);
        }
        return;
    }
    let name = cmd
        .get_bin_name()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("dlsm {}", cmd.get_name()));
    roff.control("SS", [name.as_str()]);
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage:").trim();
    roff.text([bold(usage)]);
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        roff.control("PP", []);
        roff.text([roman(about.to_string())]);
    }
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() || arg.is_global_set() || arg.get_id() == "help" {
            continue;
        }
        roff.control("TP", []);
        let values: Vec<String> = arg
            .get_value_names()
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .unwrap_or_else(|| vec![arg.get_id().as_str().to_uppercase()]);
        match arg.get_long() {
            Some(long) => {
                let mut head = vec![bold(format!("--{long}"))];
                if arg.get_action().takes_values() {
                    for v in values {
                        head.push(roman(" "));
                        head.push(italic(v));
                    }
                }
                roff.text(head);
            }
            None => {
                roff.text([italic(values.join(" "))]);
            }
        }
        let mut help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        if !defaults.is_empty() && arg.get_action().takes_values() {
            help.push_str(&format!(" [default: {}]", defaults.join(", ")));
        }
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|p| !p.is_hide_set())
            .map(|p| p.get_name().to_owned())
            .collect();
        if !possible.is_empty() {
            help.push_str(&format!(" [one of: {}]", possible.join(", ")));
        }
        roff.text([roman(help)]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_page_documents_every_command() {
        let page = String::from_utf8(super::man_page().unwrap()).unwrap();
        for c in [
            "dlsm serve",
            "dlsm volume create",
            "dlsm migrate",
            "dlsm migration list",
            "dlsm node info",
            "dlsm completions",
            "EXIT STATUS",
            "DLSM_API",
        ] {
            assert!(page.contains(c), "{c} missing from the man page");
        }
    }
}
