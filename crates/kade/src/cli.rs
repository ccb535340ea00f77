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
  kade user add alice --role reader           a DICOMweb user
  kade token create --user alice              an API token for her (shown once)
  kade stats --json                           archive totals as JSON
  kade verify                                 re-hash every stored blob
  kade exchange send --study 1.2.3 --to 07654321 --reason \"Referral\"
  kade route add to-hospb --called-ae HOSPB --to-org HOSPB --reason \"Referral\"
  kade jobs list --state failed
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
    /// Run the node: the DICOM listener and the HTTPS listener (DICOMweb, viewer) until
    /// SIGINT or SIGTERM.
    #[command(
        after_help = "On first start Kade generates a TLS certificate (unless http.tls_cert is set) and\nprints its fingerprint, and creates the user admin with an API token printed once.\n\nExamples:\n  kade serve\n  kade serve --port 104 --ae-title PACS --http-port 443\n  KADE_INDEX_URL=postgres://kade@localhost/kade kade serve"
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
    /// Manage the local users of DICOMweb and the viewer.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens and study share tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Install the OHIF viewer that Kade serves at /viewer/.
    #[command(subcommand)]
    Viewer(ViewerCommand),
    /// Send studies to, and receive them from, other hospitals through an encrypted mailbox.
    #[command(subcommand)]
    Exchange(ExchangeCommand),
    /// Run the exchange mailbox: a relay that holds only ciphertext between hospitals.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Gateway mode: rules that forward what arrives to a DIMSE peer or another hospital.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Gateway mode: the queue of forwards and sends (list, show, retry, cancel, add).
    #[command(subcommand)]
    Jobs(JobsCommand),
}

/// `kade route …`.
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Add a routing rule, or replace the one with the same name. What arrives and matches
    /// every criterion given is collected per study and forwarded by a job once no instance
    /// arrived for --quiet-secs.
    #[command(
        after_help = "A route with --called-ae makes Kade answer to that AE title too: in the hospital\nPACS, add a DICOM node with that AE title and Kade's address and port, and \"send\nto\" it. Imports from the exchange are matched only by routes with --from-exchange.\n\nExamples:\n  kade route add to-hospb --called-ae HOSPB --to-org HOSPB --reason \"Referral\"\n  kade route add inbound --from-exchange '*' --to-peer MAINPACS\n  kade route add ct-copy --modality CT --to-peer RESEARCH --quiet-secs 0"
    )]
    Add {
        /// The route's name.
        name: String,
        /// Forward by C-STORE to this DIMSE peer (see kade peer add; it needs --port).
        #[arg(long, value_name = "AE")]
        to_peer: Option<String>,
        /// Send through the exchange to this organisation.
        #[arg(long, value_name = "ORG")]
        to_org: Option<String>,
        /// Match what senders store to this AE title (Kade then answers to it).
        #[arg(long, value_name = "AE")]
        called_ae: Option<String>,
        /// Match what this AE title sends.
        #[arg(long, value_name = "AE")]
        calling_ae: Option<String>,
        /// Match series of this modality (CT, MR…).
        #[arg(long)]
        modality: Option<String>,
        /// Match instances of this SOP Class UID.
        #[arg(long, value_name = "UID")]
        sop_class: Option<String>,
        /// Match studies imported from the exchange: from this organisation, or '*' for any.
        #[arg(long, value_name = "ORG")]
        from_exchange: Option<String>,
        /// Seconds without a matching arrival after which a study counts as complete
        /// (default 30 for --to-org, 0 for --to-peer).
        #[arg(long, value_name = "SECS")]
        quiet_secs: Option<u32>,
        /// --to-org: the reason for referral sent with each study.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// List the routing rules.
    #[command(after_help = "Examples:\n  kade route list\n  kade route list --json")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a routing rule (its jobs stay).
    #[command(after_help = "Example:\n  kade route remove to-hospb")]
    Remove {
        /// The route's name.
        name: String,
    },
}

/// `kade jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    #[command(
        after_help = "States: collecting (a route still gathers the study), queued, running, done,\nfailed (stopped for good, with the reason: see kade jobs show), cancelled.\n\nExamples:\n  kade jobs list\n  kade jobs list --state failed\n  kade jobs list --json"
    )]
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        /// Most jobs listed.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one job, with the instances the destination refused and why.
    #[command(after_help = "Example:\n  kade jobs show 12")]
    Show {
        /// Job id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue a failed or cancelled job again (refused instances included).
    #[command(after_help = "Example:\n  kade jobs retry 12")]
    Retry {
        /// Job id.
        id: i64,
    },
    /// Cancel a job that has not ended; a running one stops after its current instance.
    #[command(after_help = "Example:\n  kade jobs cancel 12")]
    Cancel {
        /// Job id.
        id: i64,
    },
    /// Queue a send of a stored study to a DIMSE peer or an exchange organisation.
    #[command(
        after_help = "Examples:\n  kade jobs add --study 1.2.840.113619.2.55.3 --to-peer MAINPACS\n  kade jobs add --study 1.2.3 --to-org HOSPB --reason \"Second opinion\""
    )]
    Add {
        /// Study Instance UID.
        #[arg(long, value_name = "UID")]
        study: String,
        /// To this DIMSE peer.
        #[arg(long, value_name = "AE")]
        to_peer: Option<String>,
        /// To this exchange organisation.
        #[arg(long, value_name = "ORG")]
        to_org: Option<String>,
        /// --to-org: reason for referral.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

/// `kade exchange …`.
#[derive(Debug, Subcommand)]
pub enum ExchangeCommand {
    /// Create this node's exchange identity (signing and encryption keys, TLS client key) and
    /// the enrolment request for the mailbox operator.
    #[command(
        after_help = "Writes DATA_DIR/exchange/request.json (public keys and a certificate signing\nrequest; nothing secret). The mailbox operator answers it with kade mailbox enroll.\n\nExample:\n  kade exchange init --org 01234567 --name \"Hospital A\" --mailbox https://mailbox.example.org:9443"
    )]
    Init {
        /// This organisation's id (URA number or OID): letters, digits, '.', '-', '_'.
        #[arg(long, value_name = "ORG")]
        org: String,
        /// Display name in the directory.
        #[arg(long)]
        name: String,
        /// The mailbox URL.
        #[arg(long, value_name = "URL")]
        mailbox: String,
    },
    /// Install the enrolment the mailbox operator made (client certificate, mailbox CA,
    /// directory authority key).
    #[command(after_help = "Example:\n  kade exchange join 01234567.enrolment.json")]
    Join {
        /// The file from kade mailbox enroll.
        enrolment: PathBuf,
    },
    /// Package, encrypt, sign and upload a study for another organisation.
    #[command(
        after_help = "Shows a summary first; sends larger than exchange.confirm_above_bytes ask for\nconfirmation (or --yes). A dropped connection is resumed: only chunks the mailbox\ndoes not hold are sent again.\n\nExamples:\n  kade exchange send --study 1.2.840.113619.2.55.3 --to 07654321 --reason \"Second opinion, suspected PE\"\n  kade exchange send --study 1.2.3 --to 07654321 --reason \"Referral\"
  kade route add to-hospb --called-ae HOSPB --to-org HOSPB --reason \"Referral\"
  kade jobs list --state failed --for \"Dr. J. de Vries\" --yes"
    )]
    Send {
        /// Study Instance UID.
        #[arg(long, value_name = "UID")]
        study: String,
        /// Recipient organisation id.
        #[arg(long, value_name = "ORG")]
        to: String,
        /// Reason for referral (travels encrypted in the manifest).
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// The clinician the study is meant for.
        #[arg(long = "for", value_name = "CLINICIAN")]
        for_clinician: Option<String>,
        /// The responsible user, for both audit logs (default: cli:$USER).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Do not ask for confirmation of a large send.
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Validity of the bundle at the mailbox, e.g. 7d, 12h (default exchange.bundle_lifetime_days).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// Fetch, verify, decrypt, reconcile and import what waits at the mailbox (kade serve does
    /// this by itself as soon as the mailbox notifies it of a sealed bundle).
    #[command(
        after_help = "Exit status is 1 when a bundle was refused.\n\nExamples:\n  kade exchange receive\n  kade exchange receive --json"
    )]
    Receive {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List received bundles: imported, refused, and those waiting for reconciliation.
    #[command(after_help = "Examples:\n  kade exchange inbox\n  kade exchange inbox --json")]
    Inbox {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import a bundle waiting for reconciliation as a local patient chosen by a person.
    #[command(
        after_help = "Example:\n  kade exchange reconcile 3f9c0a7d12e4b8563f9c0a7d12e4b856 --patient MRN00123"
    )]
    Reconcile {
        /// Bundle id (from kade exchange inbox).
        bundle: String,
        /// The local Patient ID to import as.
        #[arg(long, value_name = "LOCALID")]
        patient: String,
        /// The local Issuer of Patient ID, when the Patient ID is not unique.
        #[arg(long)]
        issuer: Option<String>,
        /// The responsible user (default: cli:$USER).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Show each sent bundle: uploading, sealed, delivered, imported, failed, expired, recalled.
    #[command(after_help = "Examples:\n  kade exchange status\n  kade exchange status --json")]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recall a sent bundle the recipient has not fetched yet; the mailbox deletes it.
    #[command(after_help = "Example:\n  kade exchange recall 3f9c0a7d12e4b8563f9c0a7d12e4b856")]
    Recall {
        /// Bundle id.
        bundle: String,
        /// The responsible user (default: cli:$USER).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
}

/// `kade mailbox …`.
#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    /// Create the mailbox's CA, server certificate and directory authority key in
    /// DATA_DIR/mailbox.
    #[command(
        after_help = "Examples:\n  kade --data-dir /srv/mailbox mailbox init\n  kade --data-dir /srv/mailbox mailbox init --name mailbox.example.org"
    )]
    Init {
        /// Extra host names or addresses for the server certificate (besides localhost,
        /// 127.0.0.1, ::1 and this machine's host name).
        #[arg(long = "name", value_name = "HOST")]
        names: Vec<String>,
    },
    /// Enrol a hospital: sign its directory entry and issue its client certificate.
    #[command(
        after_help = "Example:\n  kade --data-dir /srv/mailbox mailbox enroll --request request.json --out 01234567.enrolment.json"
    )]
    Enroll {
        /// The request.json that kade exchange init wrote.
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        /// Where to write the enrolment for the hospital.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Validity of the certificate and directory entry in days.
        #[arg(long, default_value_t = 365, value_name = "DAYS")]
        valid_days: u64,
    },
    /// Revoke a hospital: take its entry out of the directory. At once the mailbox refuses
    /// its client certificate and the other nodes refuse its bundles (sender not in the
    /// directory) and stop sending to it; enrolling it again lets it back in, with a new
    /// certificate.
    #[command(
        after_help = "Example:\n  kade --data-dir /srv/mailbox mailbox revoke 01234567 --reason \"key stolen with a laptop\""
    )]
    Revoke {
        /// The organisation id to revoke.
        org: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
    /// Serve the mailbox (HTTPS, client certificates required) until SIGINT or SIGTERM.
    #[command(
        after_help = "Examples:\n  kade --data-dir /srv/mailbox mailbox serve\n  kade --data-dir /srv/mailbox mailbox serve --port 9443"
    )]
    Serve {
        /// TCP port (overrides mailbox.port; 0 picks a free port).
        #[arg(long)]
        port: Option<u16>,
        /// Listen address (overrides mailbox.bind).
        #[arg(long)]
        bind: Option<String>,
    },
}

/// `kade viewer …`.
#[derive(Debug, Subcommand)]
pub enum ViewerCommand {
    /// Fetch the OHIF viewer (@ohif/app) from the npm registry and install it into the data
    /// directory; a running node serves it at once.
    #[command(
        after_help = "Needs npm, unless --from names a package already downloaded with
`npm pack @ohif/app@VERSION`. Radiologists then open https://HOST:8443/viewer/ and
sign in with an API token (or follow a link https://HOST:8443/viewer/#token=TOKEN).

Examples:
  kade viewer install
  kade viewer install --ohif-version 3.13.2
  kade viewer install --from ohif-app-3.13.2.tgz"
    )]
    Install {
        /// The @ohif/app release to fetch.
        #[arg(long, value_name = "VERSION", default_value = crate::viewer::DEFAULT_VERSION)]
        ohif_version: String,
        /// Install from this package file instead of fetching it.
        #[arg(long, value_name = "TARBALL")]
        from: Option<PathBuf>,
    },
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
    /// HTTPS port for DICOMweb and the viewer (overrides the configuration; 0 picks a free port).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// DICOM TLS port (overrides dicom.tls.port; 0 picks a free port).
    #[arg(long)]
    pub dicom_tls_port: Option<u16>,
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
        after_help = "Examples:\n  kade peer add CT1 --host 10.0.0.5 --allow echo,store\n  kade peer add WS1 --host 10.1.0.0/16 --port 104 --allow echo,find,move\n  kade peer add REMOTE --host 192.0.2.7 --allow echo,find --narrow-queries --max-matches 200\n  kade peer add MODALITY --host 10.0.0.9 --allow echo,store --tls-cert-sha256 3F:A2:…\n  kade peer add REMOTEPACS --host 192.0.2.8 --port 2762 --allow echo --tls"
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
        /// Bind the AE title to a TLS client certificate (its SHA-256 fingerprint): the peer
        /// may then associate only over DICOM TLS with that certificate.
        #[arg(long, value_name = "FINGERPRINT")]
        tls_cert_sha256: Option<String>,
        /// As a C-MOVE destination, reach this peer over DICOM TLS (its certificate must be
        /// issued by a CA in dicom.tls.peer_ca).
        #[arg(long)]
        tls: bool,
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

/// `kade user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user. Users sign in with API tokens: make one with `kade token create --user`.
    #[command(
        after_help = "Roles:\n  admin     everything, including managing users and tokens\n  reader    search and view studies (QIDO-RS, WADO-RS, the viewer)\n  uploader  send studies (STOW-RS)\n\nExamples:\n  kade user add alice --role reader\n  kade user add ct-gateway --role uploader\n  kade user add j.devries@hospital.example --role admin"
    )]
    Add {
        /// User name: 1 to 64 letters, digits, '.', '_', '-' or '@'.
        name: String,
        /// Role: admin, reader or uploader.
        #[arg(long, value_name = "ROLE")]
        role: String,
    },
    /// List users.
    #[command(after_help = "Examples:\n  kade user list\n  kade user list --json")]
    List {
        /// Print JSON: [{\"name\":…,\"role\":…,\"created_at\":…}].
        #[arg(long)]
        json: bool,
    },
}

/// `kade token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for a user, or a read-only share token for one study.
    ///
    /// The token is printed once, alone on the first line of standard output; only a hash of
    /// it is kept. Send it as `Authorization: Bearer <token>`.
    #[command(
        after_help = "User tokens do not expire unless --expires is given; share tokens expire after\n24 hours by default. Durations: 30d, 24h, 90m, 3600s.\n\nExamples:\n  kade token create --user alice\n  kade token create --user ct-gateway --expires 90d\n  kade token create --study 1.2.840.113619.2.55.3 --expires 7d\n  TOKEN=$(kade token create --user alice 2>/dev/null)"
    )]
    #[command(group(clap::ArgGroup::new("for").required(true).args(["user", "study"])))]
    Create {
        /// The user the token acts as.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Share one study read-only (Study Instance UID).
        #[arg(long, value_name = "UID")]
        study: Option<String>,
        /// Lifetime, e.g. 30d, 24h, 90m, 3600s (default: none for user tokens, 24h for
        /// share tokens).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (ids, owners, expiry; never the secrets).
    #[command(after_help = "Examples:\n  kade token list\n  kade token list --json")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: every node refuses it from the next request on.
    #[command(
        after_help = "The id is the 16 hex digits after kade_ in the token, as shown by kade token list.\n\nExample:\n  kade token revoke 3f9c0a7d12e4b856"
    )]
    Revoke {
        /// Token id (or the whole token).
        id: String,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
