//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Kade: an open-source PACS. Receives studies over DICOM, keeps them in object storage
/// with a metadata index, and audits every access to patient data.
#[derive(Debug, Parser)]
#[command(name = "kade", version, propagate_version = true, after_help = EXAMPLES)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  kade serve                                  start a node with ./kade-data (SQLite + files)
  kade peer add CT1 --host 10.0.0.5 --allow echo,store
  kade stats --json                           archive totals as JSON
  kade verify                                 re-hash every stored blob
  kade --config /etc/kade/kade.toml serve     use a configuration file";

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct Global {
    /// Configuration file (TOML; see kade.example.toml). Env: KADE_CONFIG.
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "KADE_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Data directory (overrides the config file and KADE_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node: the DICOM listener (C-ECHO, C-STORE) until SIGINT or SIGTERM.
    #[command(
        after_help = "Examples:\n  kade serve\n  kade serve --port 104 --ae-title PACS\n  KADE_INDEX_URL=postgres://kade@localhost/kade kade serve"
    )]
    Serve(ServeArgs),
    /// Manage the DIMSE peers allowed to connect.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Print archive totals (patients, studies, series, instances, bytes).
    #[command(after_help = "Examples:\n  kade stats\n  kade stats --json")]
    Stats {
        /// Print JSON: {\"patients\":…,\"studies\":…,\"series\":…,\"instances\":…,\"bytes\":…}.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every stored blob and report any that is missing or changed.
    #[command(
        after_help = "Exit status is 1 when a blob is missing or differs from its recorded SHA-256.\n\nExamples:\n  kade verify\n  kade verify --json"
    )]
    Verify {
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Check storage against the index: blobs nobody refers to, rows whose blob is gone.
    #[command(
        after_help = "Orphaned blobs are left by a crash between storing a blob and indexing it;\n--repair deletes those older than --min-age. Missing blobs cannot be repaired\nhere: restore them from backup, then run kade verify.\n\nExamples:\n  kade fsck\n  kade fsck --repair"
    )]
    Fsck(FsckArgs),
    /// Inspect the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `kade serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// DICOM port (overrides the configuration; 0 picks a free port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Listen address (overrides the configuration).
    #[arg(long)]
    pub bind: Option<String>,
    /// Kade's AE title (overrides the configuration).
    #[arg(long)]
    pub ae_title: Option<String>,
}

/// `kade fsck` options.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Delete orphaned blobs.
    #[arg(long)]
    pub repair: bool,
    /// Only blobs at least this many seconds old count as orphans (younger ones may belong
    /// to a store still in progress).
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub min_age: u64,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

/// `kade peer …`.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Allow a peer (replaces an existing one with the same AE title).
    #[command(
        after_help = "Examples:\n  kade peer add CT1 --host 10.0.0.5 --allow echo,store\n  kade peer add WS1 --host 10.1.0.0/16 --port 104 --allow echo,find,move\n  kade peer add REMOTE --host 192.0.2.7 --allow echo,find --narrow-queries --max-matches 200"
    )]
    Add {
        /// The peer's AE title.
        ae_title: String,
        /// Address or CIDR network the peer connects from.
        #[arg(long, value_name = "ADDR[/CIDR]")]
        host: String,
        /// Port the peer listens on (needed for C-MOVE destinations).
        #[arg(long)]
        port: Option<u16>,
        /// Services the peer may use: echo, store, find, move, get, commit.
        #[arg(long, default_value = "echo,store", value_name = "LIST")]
        allow: String,
        /// Most matches one C-FIND returns to this peer (default 1000).
        #[arg(long, value_name = "N")]
        max_matches: Option<u32>,
        /// Answer only queries that name a patient, a study or a date range.
        #[arg(long)]
        narrow_queries: bool,
    },
    /// List peers (from the configuration file and from `kade peer add`).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a peer added with `kade peer add`.
    Remove {
        /// The peer's AE title.
        ae_title: String,
    },
}

/// `kade audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of the whole audit log.
    #[command(
        after_help = "Exit status is 1 when an entry was altered, removed or inserted.\n\nExample:\n  kade audit verify"
    )]
    Verify,
    /// Show the most recent entries.
    #[command(after_help = "Example:\n  kade audit tail -n 50")]
    Tail {
        /// Number of entries.
        #[arg(short, default_value_t = 20)]
        n: i64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}
