//! The command line, defined once: `main.rs` parses it, and the man page mailtls(8) and
//! the shell completions are generated from the same definitions, so flags never drift.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

const LONG_ABOUT: &str = "mailtls listens on the mail ports, speaks TLS to clients and hands \
cleartext to the mail server behind it (with a PROXY header naming the client). It serves \
SMTP, IMAP and POP3 with implicit TLS or STARTTLS, answering the pre-TLS dialogue itself. \
It runs in the foreground and logs to stderr; under systemd it takes its sockets from the \
socket units. The configuration file is described in mailtls.toml(5).";

/// A TLS front door for mail servers (SMTP, IMAP, POP3).
#[derive(Parser, Debug)]
#[command(version, about, long_about = LONG_ABOUT)]
pub struct Args {
    /// The TOML configuration file.
    #[arg(long, value_name = "PATH")]
    pub config: PathBuf,
    /// Validate the configuration (files readable, keys match certificates, addresses
    /// parse) and exit: 0 when fine, 1 with a message naming the key and line otherwise.
    #[arg(long)]
    pub check: bool,
    /// Log format; overrides `log_format` in the config.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// Where logs go. Containers conventionally collect stdout.
    #[arg(long, value_enum, default_value = "stderr")]
    pub log_target: LogTarget,
    /// Ask the running instance's admin endpoint (`[admin] listen`) for /healthz and exit
    /// 0 when it is serving, 1 otherwise: a HEALTHCHECK that needs no curl in the image.
    #[arg(long, conflicts_with = "check")]
    pub healthcheck: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogTarget {
    Stderr,
    Stdout,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}
