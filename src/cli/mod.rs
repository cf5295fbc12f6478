//! The `dlsm` command line: `serve` runs a node; every other command but
//! `version`, `completions`, `man` and `demo` is a thin client of a node's
//! control API (`--api`, or `DLSM_API`).
//!
//! | file | owns |
//! |------|------|
//! | `mod.rs` | the clap [`Cli`], the global flags, dispatch, the exit status |
//! | [`args`] | value parsers shared by commands: `HOST:PORT`, node names |
//! | [`serve`] | `dlsm serve`: the node's flags, its signals (SIGHUP reloads TLS) |
//! | [`volume`] | `dlsm volume ...`, and uploading an image over NBD |
//! | [`migration`] | `dlsm migrate`, `dlsm migration ...`: start, steer, list; refusing a migration to the node the volume is on |
//! | [`wait`] | `migrate --wait`: polling the destination, riding out its restarts, the progress display |
//! | [`node`] | `dlsm node info`, `dlsm node list` (cluster mode) |
//! | [`about`] | `dlsm version`, `completions`, `man`: what the binary says about itself |
//! | [`output`] | everything printed: human text, `--json`, errors, a closed stdout |
//!
//! Output contract (also in `--help` and the man page): results go to
//! stdout, human text by default or JSON with `--json`; errors go to
//! stderr, one line (`error: ...`), or with `--json` one JSON object
//! `{"error": "...", "http_status": N}` (`http_status` only when the node
//! answered; `"usage": true` instead for a wrong command line). Exit
//! status: 0 on success, also when whoever reads stdout stops early
//! (`dlsm volume list | head -1`); 1 when the command failed; 2 when the
//! command line is wrong.

pub mod about;
pub mod args;
pub mod migration;
pub mod node;
pub mod output;
pub mod serve;
pub mod volume;
pub mod wait;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::api_client::{Api, ApiAuth};

#[derive(Parser, Debug)]
#[command(
    name = "dlsm",
    version,
    about = "Decoupled live storage migration: volumes served over NBD",
    long_about = "Decoupled live storage migration: volumes served over NBD.\n\n\
                  `dlsm serve` runs a node on every host; the other commands are clients \
                  of a node's control API (--api).",
    after_long_help = about::after_help()
)]
pub struct Cli {
    /// The node's control API address, HOST:PORT (for `serve`: where to
    /// listen).
    #[arg(
        long,
        global = true,
        env = "DLSM_API",
        default_value = "127.0.0.1:7450",
        value_parser = args::api_addr
    )]
    pub api: String,
    /// TLS directory (QEMU/libnbd x509 layout: ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem). For `serve`: NBD
    /// clients must use TLS and API clients must present a certificate.
    /// For other commands: how to reach a node that has TLS.
    #[arg(long, global = true, env = "DLSM_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// File holding the API token. For `serve`: every API request must carry
    /// it (and the node sends it to other nodes). For other commands: sent.
    #[arg(long, global = true, env = "DLSM_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Machine-readable output: results as JSON on stdout, errors as one
    /// JSON object `{"error": "..."}` on stderr. No effect on `serve`,
    /// `demo`, `completions` and `man`.
    #[arg(long, global = true)]
    pub json: bool,
    /// How the log (on stderr) is written: `text` for people, `json` for
    /// machines (one object per line; migration events carry `event`,
    /// `volume` and `migration`).
    #[arg(long, global = true, env = "DLSM_LOG_FORMAT", value_enum, default_value_t = args::LogFormat::Text)]
    pub log_format: args::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a storage node.
    Serve(serve::ServeArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Migrate a volume from this node (--api) to another, live.
    Migrate(migration::MigrateArgs),
    /// Inspect and steer migrations.
    #[command(subcommand)]
    Migration(migration::MigrationCmd),
    /// Ask a node about itself.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Print this program's version and build target.
    Version,
    /// Print a shell completion script (e.g. `dlsm completions bash >
    /// /etc/bash_completion.d/dlsm`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page in roff (`dlsm man | man -l -`).
    Man,
    /// Run the demonstration: a live migration between two nodes on loopback.
    Demo {
        /// Keep serving after the demo until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
}

/// What every client command needs: where the node is, how to prove who
/// it is, and how to print.
pub struct Ctx {
    /// `--api` as given.
    pub api: String,
    pub auth: ApiAuth,
    /// The TLS material, for the NBD connection of `volume create --from`.
    pub tls: Option<crate::tls::TlsConfig>,
    pub json: bool,
}

impl Ctx {
    /// A client of the `--api` node.
    pub fn api(&self) -> Api {
        Api::with_auth(&self.api, &self.auth).from_flag("--api")
    }

    /// A client of the node at `addr`, which came from `flag`.
    pub fn api_at(&self, addr: &str, flag: &'static str) -> Api {
        Api::with_auth(addr, &self.auth).from_flag(flag)
    }
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return output::usage_error(e),
    };
    // rustls warns about every gnutls client (QEMU, libnbd) that sends an
    // IP address as SNI; that is harmless and would flood the log.
    let default_log = if matches!(cli.command, Command::Serve { .. }) {
        "info,rustls=error"
    } else {
        "warn,rustls=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line: the event's fields (`event`,
        // `volume`, `migration`, ...) at the top level, for log shippers.
        args::LogFormat::Json => log
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        args::LogFormat::Text => log.init(),
    }
    let json = cli.json;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => output::failure(&e, json),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let token = match &cli.api_token_file {
        Some(p) => Some(ApiAuth::read_token(p)?),
        None => None,
    };
    let json = cli.json;
    let client = |tls_dir: &Option<PathBuf>| -> anyhow::Result<Ctx> {
        let tls = match tls_dir {
            Some(d) => Some(crate::tls::TlsConfig::load_client(d)?),
            None => None,
        };
        Ok(Ctx {
            api: cli.api.clone(),
            auth: ApiAuth {
                tls: tls.as_ref().map(|t| t.client.clone()),
                token: token.clone(),
            },
            tls,
            json,
        })
    };
    match cli.command {
        Command::Serve(args) => serve::run(args, &cli.api, cli.tls_dir.as_deref(), token.clone()),
        Command::Volume(cmd) => volume::run(&client(&cli.tls_dir)?, cmd),
        Command::Migrate(args) => migration::migrate(&client(&cli.tls_dir)?, args),
        Command::Migration(cmd) => migration::run(&client(&cli.tls_dir)?, cmd),
        Command::Node(cmd) => node::run(&client(&cli.tls_dir)?, cmd),
        Command::Version => about::version(json),
        Command::Completions { shell } => about::completions(shell),
        Command::Man => about::man(),
        Command::Demo { hold } => runtime()?.block_on(crate::demo::run(hold)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every argument, visible or hidden, says what
    /// it is for: `--help`, the completions and the man page are made from
    /// these texts.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "dlsm", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        // The walk saw the whole tree (a guard against walking nothing).
        assert!(cmd
            .find_subcommand("migration")
            .and_then(|m| m.find_subcommand("list"))
            .is_some());
    }

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_is_one_global_flag() {
        for argv in [
            &["dlsm", "--json", "volume", "list"][..],
            &["dlsm", "volume", "list", "--json"],
            &["dlsm", "migration", "--json", "status", "vm1"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert!(cli.json, "{argv:?}");
        }
        assert!(
            !Cli::try_parse_from(["dlsm", "volume", "list"])
                .unwrap()
                .json
        );
    }

    #[test]
    fn migrate_to_takes_an_address_or_a_node_name() {
        for to in ["hostb:7450", "10.0.0.2:7450", "hostb", "n-2.rack_1"] {
            let cli = Cli::try_parse_from(["dlsm", "migrate", "vm1", "--to", to]);
            assert!(cli.is_ok(), "{to:?} refused");
        }
        assert!(args::is_node_name("hostb"));
        assert!(!args::is_node_name("hostb:7450"));
        assert!(!args::is_node_name("10.0.0.2"), "an address without a port");
    }

    #[test]
    fn empty_addresses_and_names_are_refused() {
        for argv in [
            &["dlsm", "--api", "", "volume", "list"][..],
            &["dlsm", "migrate", "vm1", "--to", ""],
            &["dlsm", "migrate", "vm1", "--to", "hostb:"],
            &["dlsm", "migrate", "vm1", "--to", "host b"],
            &["dlsm", "serve", "--data-dir", "/d", "--node", ""],
            &["dlsm", "serve", "--data-dir", "/d", "--node", "a b"],
            &["dlsm", "serve", "--data-dir", "/d", "--listen", ""],
            &[
                "dlsm",
                "serve",
                "--data-dir",
                "/d",
                "--advertise-api",
                ":7450",
            ],
        ] {
            let e = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{argv:?}"
            );
        }
        Cli::try_parse_from(["dlsm", "--api", "https://[::1]:7450", "node", "info"]).unwrap();
    }
}
