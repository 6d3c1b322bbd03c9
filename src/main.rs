//! The `mailtls` command: parses the command line, sets up logging and signals, and runs
//! the server from the library. Errors end here as one readable message and exit 1.
//!
//! systemd's sockets are taken here, before the runtime starts any thread: adopting them
//! clears LISTEN_FDS, which is only sound while the process is single-threaded.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use mailtls::cli::{Args, LogFormatArg, LogTarget};
use mailtls::config::{self, LogFormat};
use mailtls::server::{Control, Server};
use mailtls::systemd::Inherited;
use mailtls::{admin, routes, tls};

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One write for the whole message: eprintln! on unbuffered stderr writes each
            // piece of the error chain apart, which interleaves with other writers of a
            // shared log file and costs a system call per piece.
            let message = format!("mailtls: {}\n", error_chain(&e));
            let _ = std::io::stderr().write_all(message.as_bytes());
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once. The library's errors already end their message
/// with their source's (they are logged with Display alone), so a cause whose text the
/// message so far ends with is not repeated, as anyhow's `{:#}` would.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.ends_with(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    if args.healthcheck {
        return healthcheck(&config);
    }
    let format = match args.log_format {
        Some(LogFormatArg::Text) => LogFormat::Text,
        Some(LogFormatArg::Json) => LogFormat::Json,
        None => config.log_format,
    };
    init_logging(format, args.log_target, &config.log_level);
    // Explicitly aws-lc-rs, whatever other provider a dependency might compile in.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if args.check {
        return check(&config);
    }
    let inherited = Inherited::from_env().context("taking the sockets systemd passed")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(serve(config, inherited))
}

fn healthcheck(config: &config::Config) -> anyhow::Result<()> {
    let admin = config.admin.as_ref().context("--healthcheck needs [admin] listen in the config")?;
    admin::check_health(admin.listen, Duration::from_secs(3))?;
    Ok(())
}

/// `--check`: everything a start would load, loaded; a report of each certificate and
/// routes file.
fn check(config: &config::Config) -> anyhow::Result<()> {
    let certs = tls::load_certificates(config, tls::SelfSigned::DryRun)?;
    let now = tls::load::now();
    for cert in &certs {
        let days = cert.days_left(now);
        println!(
            "certificate {}: names {}; key {}; expires {} ({days} days){}{}",
            cert.source,
            cert.names.join(", "),
            cert.key_type,
            cert.not_after_date,
            if cert.certified.ocsp.is_some() { "; OCSP stapled" } else { "" },
            if days < tls::EXPIRY_WARNING_DAYS { " -- WARNING: renew soon" } else { "" },
        );
    }
    for l in &config.listeners {
        let Some(r) = &l.routes else { continue };
        let map = routes::load(&r.path).map_err(|e| anyhow::anyhow!("{}: {e}", r.origin))?;
        let (addresses, domains) = map.size();
        println!(
            "routes {} (listener {}): default {}; {addresses} addresses, {domains} domains",
            r.path.display(),
            l.name,
            map.default
        );
    }
    if let Some(k) = &config.tls.ticket_keys {
        let keys = tls::tickets::load(&k.path).map_err(|e| anyhow::anyhow!("{}: {e}", k.origin))?;
        println!(
            "ticket keys {}: {} (the first seals new tickets)",
            k.path.display(),
            keys.names().join(", ")
        );
    }
    let pending = config.tls.certificates.len() - certs.len();
    if pending > 0 {
        println!("{pending} self-signed trial certificate(s) will be created or renewed at start (self_signed = true)");
    }
    println!(
        "{}: OK ({}, {})",
        config.path.display(),
        counted(config.listeners.len(), "listener"),
        counted(certs.len(), "certificate")
    );
    Ok(())
}

/// "1 listener", "7 listeners".
fn counted(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

async fn serve(config: config::Config, inherited: Inherited) -> anyhow::Result<()> {
    // Handlers first: once a port accepts, a SIGHUP (certbot hook, systemctl reload) must
    // reload, and SIGHUP's default action would kill the process.
    let signals = Signals::install().context("installing signal handlers")?;
    let server = Server::bind_with(config, inherited)?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(signals.forward(tx));
    server.run(rx).await;
    Ok(())
}

/// SIGHUP reloads the config (certificates included); SIGTERM and SIGINT stop (a second one is not needed:
/// the drain time bounds the stop).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn forward(self, tx: mpsc::Sender<Control>) {
        let Signals { mut term, mut int, mut hup } = self;
        loop {
            let control = tokio::select! {
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(control).await.is_err() {
                return;
            }
        }
    }
}

/// RUST_LOG, when set, overrides the config's `log_level`.
fn init_logging(format: LogFormat, target: LogTarget, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (writer, terminal) = match target {
        LogTarget::Stderr => (BoxMakeWriter::new(std::io::stderr), std::io::stderr().is_terminal()),
        LogTarget::Stdout => (BoxMakeWriter::new(std::io::stdout), std::io::stdout().is_terminal()),
    };
    // Colour codes only for a person at a terminal: journald, files and container log
    // collectors would store them as escape-sequence noise.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(terminal);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
