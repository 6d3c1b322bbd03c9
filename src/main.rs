//! The `mailtls` command: parses the command line, sets up logging and signals, and runs
//! the server from the library. Errors end here as one readable message and exit 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use mailtls::config::{self, LogFormat};
use mailtls::server::{Control, Server};
use mailtls::tls;

/// A TLS front door for mail servers (SMTP, IMAP, POP3).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The TOML configuration file.
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
    /// Validate the configuration (files readable, keys match certificates, addresses
    /// parse) and exit: 0 when fine, 1 with a message naming the key and line otherwise.
    #[arg(long)]
    check: bool,
    /// Log format on stderr; overrides `log_format` in the config.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailtls: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let format = match args.log_format {
        Some(LogFormatArg::Text) => LogFormat::Text,
        Some(LogFormatArg::Json) => LogFormat::Json,
        None => config.log_format,
    };
    init_logging(format);
    // Explicitly aws-lc-rs, whatever other provider a dependency might compile in.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if args.check {
        return check(&config);
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(serve(config))
}

/// `--check`: everything a start would load, loaded; a report of each certificate.
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
    let pending = config.tls.certificates.len() - certs.len();
    if pending > 0 {
        println!("{pending} self-signed trial certificate(s) will be created at start (self_signed = true)");
    }
    println!(
        "{}: OK ({} listeners, {} certificates)",
        config.path.display(),
        config.listeners.len(),
        certs.len()
    );
    Ok(())
}

async fn serve(config: config::Config) -> anyhow::Result<()> {
    // Handlers first: once a port accepts, a SIGHUP (certbot hook, systemctl reload) must
    // reload, and SIGHUP's default action would kill the process.
    let signals = Signals::install().context("installing signal handlers")?;
    let server = Server::bind(config)?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(signals.forward(tx));
    server.run(rx).await;
    Ok(())
}

/// SIGHUP reloads certificates; SIGTERM and SIGINT stop (a second one is not needed:
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
