//! The TOML configuration: schema, defaults, and validation whose every error names the
//! key and the line it sits on, so an administrator can fix the file without guessing.
//!
//! Relative file paths (certificates, routes) are resolved against the directory of the
//! config file, so an example config can travel with its files.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::protocol::{BareNewline, Protocol};

/// A configuration error, located at a key and a line of the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid { path: PathBuf, line: usize, key: String, message: String },
}

/// Where a value came from in the file, for error messages raised after parsing (for
/// example when a certificate named by the key turns out to be unreadable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub path: PathBuf,
    pub line: usize,
    pub key: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.key)
    }
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub hostname: String,
    pub tls: TlsConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log_format: LogFormat,
    /// A tracing filter ("info", "mailtls=debug"); `RUST_LOG` overrides it.
    pub log_level: String,
    /// The admin endpoint (/metrics, /healthz); off when `None`.
    pub admin: Option<AdminConfig>,
    /// Which relay engines may be used after negotiation.
    pub relay: RelayMode,
    pub listeners: Vec<ListenerConfig>,
}

/// `[admin]`: where Prometheus and health checks reach mailtls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// `relay = "auto" | "copy"`: `auto` uses splice and kernel TLS where the connection and
/// kernel allow (falling back to copy), `copy` always relays in user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RelayMode {
    #[default]
    Auto,
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub min_version: TlsVersion,
    pub certificates: Vec<CertificateConfig>,
    /// Stateless TLS 1.3 session tickets (and TLS 1.2 tickets) for resumption.
    pub session_tickets: bool,
    /// Entries of the server-side session cache (TLS 1.2 session IDs); 0 disables it.
    pub session_cache: usize,
    /// rustls names of the cipher suites to offer (`None`: rustls' safe defaults).
    pub cipher_suites: Option<Vec<String>>,
    /// Names of the key-exchange groups to offer, in preference order (`None`: defaults,
    /// which put the post-quantum hybrid X25519MLKEM768 first).
    pub kx_groups: Option<Vec<String>>,
    /// ALPN protocol names to accept; empty (the default) means no ALPN.
    pub alpn: Vec<Vec<u8>>,
    /// Watch the certificate directories and reload on change (default); SIGHUP always works.
    pub watch: bool,
    /// `ticket_keys = "PATH"`: session ticket keys shared by a fleet (see `tls/tickets.rs`);
    /// `None`: each process makes its own keys, as before.
    pub ticket_keys: Option<TicketKeysConfig>,
}

/// `[tls] ticket_keys = "PATH"`: the file, and where the key sits (for load errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketKeysConfig {
    pub path: PathBuf,
    pub origin: Origin,
}

/// Default size of the TLS 1.2 session cache: a few MB at most.
pub const DEFAULT_SESSION_CACHE: usize = 10_000;

/// One `[[tls.certificates]]` entry.
#[derive(Clone, Debug)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_origin: Origin,
    pub key_origin: Origin,
    /// A DER OCSP response to staple, re-read with the certificate on every reload.
    pub ocsp: Option<PathBuf>,
    pub ocsp_origin: Option<Origin>,
    /// Create a self-signed pair at `cert`/`key` when both are missing. For local trials
    /// only: it is off unless the config asks, and creation is logged as a warning.
    pub self_signed: bool,
}

/// Timeouts; each has a default and may be set under `[timeouts]` in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept (or the STARTTLS go-ahead) to a finished TLS handshake.
    pub handshake: Duration,
    /// Silence allowed from a client before authentication (pre-TLS and negotiation).
    pub pre_auth_idle: Duration,
    /// Silence allowed in both directions after authentication (IMAP IDLE sits here).
    pub idle: Duration,
    /// Connecting to the backend and receiving its greeting.
    pub backend_connect: Duration,
    /// How long open sessions may finish after SIGTERM/SIGINT before they are cut.
    pub drain: Duration,
    /// After SIGTERM/SIGINT, how long to keep accepting while /healthz answers 503, so a
    /// load balancer's health check takes the replica out before its ports close (0, the
    /// default: stop accepting at once). Set it to the balancer's time to mark a server down.
    pub health_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            pre_auth_idle: Duration::from_secs(60),
            idle: Duration::from_secs(30 * 60),
            backend_connect: Duration::from_secs(10),
            drain: Duration::from_secs(30),
            health_grace: Duration::ZERO,
        }
    }
}

/// Bounds on what one client may send; going over ends that session only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_pre_tls_commands: u32,
    pub max_errors: u32,
    /// Longest line after TLS until authentication (RFC 4954 allows 12,288-octet AUTH lines).
    pub max_line: usize,
    /// Largest IMAP literal before authentication.
    pub max_literal: u64,
    /// Connections open at once, every listener together.
    pub max_connections: u32,
    /// Connections open at once from one client address.
    pub max_connections_per_address: u32,
    /// New connections one client address may open per minute; `None`: no rate limit.
    pub max_new_connections_per_address_per_minute: Option<u32>,
}

/// Default total: two descriptors per session, well inside the unit's LimitNOFILE=65536.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 20_000;
/// Default per address: room for several devices of a household or office behind one NAT,
/// each with a few IMAP connections, but not for one host to take the whole server.
pub const DEFAULT_MAX_PER_ADDRESS: u32 = 100;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pre_tls_commands: 100,
            max_errors: 10,
            max_line: 16 * 1024,
            max_literal: 64 * 1024,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_PER_ADDRESS,
            max_new_connections_per_address_per_minute: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// One TLV a PROXY v2 header may carry (`listeners[].proxy_tlvs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyTlv {
    /// PP2_TYPE_AUTHORITY: the SNI the client sent.
    Authority,
    /// PP2_TYPE_SSL: the client-SSL flag, TLS version and cipher.
    Ssl,
}

/// The TLVs a listener's v2 headers carry. Some receivers read a v2 header into a fixed
/// buffer (Exim 4.96: 232 bytes in all, so an SNI over 158 bytes overflows it and the
/// session fails), and those that ignore TLVs lose nothing without them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyTlvs {
    pub authority: bool,
    pub ssl: bool,
}

impl Default for ProxyTlvs {
    fn default() -> Self {
        ProxyTlvs { authority: true, ssl: true }
    }
}

/// One `[[listeners]]` entry.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub tls: TlsMode,
    pub require_tls: bool,
    pub listen: Vec<SocketAddr>,
    /// The one backend; `None` on a routed listener, whose backends the routes file names.
    pub backend: Option<String>,
    /// The routes file choosing a backend per user (IMAP/POP3) or per recipient (SMTP);
    /// see `routes.rs`.
    pub routes: Option<RoutesConfig>,
    pub proxy_protocol: ProxyProtocol,
    /// Which TLVs the v2 header carries (both unless the config says otherwise).
    pub proxy_tlvs: ProxyTlvs,
    /// Connections open at once on this listener; `None`: only the total bound applies.
    pub max_connections: Option<u32>,
    /// Sources that must open with a PROXY header (a load balancer); empty: none may.
    pub accept_proxy_protocol: Vec<IpNet>,
    /// Name the client to a backend that takes no PROXY header, with the command it trusts
    /// mailtls for: XCLIENT (Postfix smtpd; Dovecot pop3-login) or, on IMAP, Dovecot's ID
    /// fields `x-originating-ip`/`x-originating-port`.
    pub xclient: bool,
    /// SMTP only: what the smuggling guard does with a bare CR or LF from the client.
    pub bare_newline: BareNewline,
}

/// `routes = "PATH"` of a listener: the file, and where the key sits (for load errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutesConfig {
    pub path: PathBuf,
    pub origin: Origin,
}

/// Checks a backend address: `host:port`, the host a name (resolved at connect time), an
/// IPv4 address, or an IPv6 address in brackets. The message says what is wrong.
pub fn check_backend(text: &str) -> Result<(), String> {
    let bad = || format!("{text:?} is not host:port");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 backend goes in brackets: \"[::1]:143\"".to_owned());
    }
    Ok(())
}

/// A v4 client on a dual-stack socket appears as `::ffff:a.b.c.d`; rules are written in v4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

// ---- the file as written -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Spanned<String>,
    tls: RawTls,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    log_format: LogFormat,
    log_level: Option<Spanned<String>>,
    admin: Option<RawAdmin>,
    relay: Option<Spanned<String>>,
    listeners: Spanned<Vec<Spanned<RawListener>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default = "default_min_version")]
    min_version: TlsVersion,
    certificates: Spanned<Vec<RawCertificate>>,
    #[serde(default = "yes")]
    session_tickets: bool,
    session_cache: Option<usize>,
    cipher_suites: Option<Spanned<Vec<Spanned<String>>>>,
    kx_groups: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    alpn: Vec<Spanned<String>>,
    #[serde(default = "yes")]
    watch: bool,
    ticket_keys: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

fn default_min_version() -> TlsVersion {
    TlsVersion::Tls12
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<String>,
    key: Spanned<String>,
    ocsp: Option<Spanned<String>>,
    #[serde(default)]
    self_signed: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    handshake: Option<Spanned<u64>>,
    pre_auth_idle: Option<Spanned<u64>>,
    idle: Option<Spanned<u64>>,
    backend_connect: Option<Spanned<u64>>,
    drain: Option<Spanned<u64>>,
    health_grace: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_pre_tls_commands: Option<Spanned<u32>>,
    max_errors: Option<Spanned<u32>>,
    max_line: Option<Spanned<usize>>,
    max_literal: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u32>>,
    max_connections_per_address: Option<Spanned<u32>>,
    max_new_connections_per_address_per_minute: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    protocol: Protocol,
    tls: TlsMode,
    listen: Spanned<Vec<Spanned<String>>>,
    backend: Option<Spanned<String>>,
    routes: Option<Spanned<String>>,
    #[serde(default)]
    proxy_protocol: ProxyProtocol,
    proxy_tlvs: Option<Spanned<Vec<ProxyTlv>>>,
    require_tls: Option<Spanned<bool>>,
    max_connections: Option<Spanned<u32>>,
    #[serde(default)]
    accept_proxy_protocol: Vec<Spanned<String>>,
    xclient: Option<Spanned<bool>>,
    bare_newline: Option<Spanned<BareNewline>>,
}

// ---- loading and validation ----------------------------------------------------------

/// Reads, parses and validates the config file at `path`. File contents named by the
/// config (certificates) are checked by the TLS module, not here.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(path, &text)
}

/// Parses and validates config text; `path` is used for messages and relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start);
        let line = offset.map(|o| line_of(text, o)).unwrap_or(0);
        let mut message = e.message().to_owned();
        let missing = offset.and_then(|o| missing_key(text, o, &message));
        if missing.is_some() {
            message = "missing: required, and it has no default".to_owned();
        }
        match missing.or_else(|| offset.and_then(|o| key_at(text, o))) {
            Some(key) => ConfigError::Invalid { path: path.to_owned(), line, key, message },
            None => ConfigError::Syntax { path: path.to_owned(), line, message },
        }
    })?;
    Validator { path, text }.config(raw)
}

/// The dotted key (`listeners[2].proxy_protocol`) whose `key = value` line holds byte
/// `offset`, for serde's errors about a value (an unknown enum variant, a wrong type),
/// which carry a span but no key. Reads the text itself: the toml crate does not expose
/// the key path of a deserialisation error. `None` where the line is no `key = value`.
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let (key, _) = text[start..end].split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    Some(match table_above(&text[..start]) {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// The key a "missing field `name`" error is about: serde's message names the field and
/// its span is the table's, so the key is that table (the header on or above the span's
/// line; the top level when there is none) and the field.
fn missing_key(text: &str, offset: usize, message: &str) -> Option<String> {
    let field = message.strip_prefix("missing field `")?.split('`').next()?;
    let offset = offset.min(text.len());
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    Some(match table_above(&text[..end]) {
        Some(table) => format!("{table}.{field}"),
        None => field.to_owned(),
    })
}

/// The table `text`'s last line belongs to: the nearest header; `[[name]]` headers are
/// numbered by how many of that name came before, as the validator's messages number them.
fn table_above(text: &str) -> Option<String> {
    let mut table: Option<String> = None;
    let mut counts: Vec<(String, usize)> = Vec::new();
    for header in text.lines().map(str::trim) {
        if let Some(name) = header.strip_prefix("[[").and_then(|h| h.split("]]").next()) {
            let name = name.trim().to_owned();
            let index = match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    counts.push((name.clone(), 1));
                    0
                }
            };
            table = Some(format!("{name}[{index}]"));
        } else if let Some(name) = header.strip_prefix('[').and_then(|h| h.split(']').next()) {
            table = Some(name.trim().to_owned());
        }
    }
    table
}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn origin(&self, key: impl Into<String>, span: Range<usize>) -> Origin {
        Origin { path: self.path.to_owned(), line: line_of(self.text, span.start), key: key.into() }
    }

    fn invalid(&self, key: impl Into<String>, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let origin = self.origin(key, span);
        ConfigError::Invalid {
            path: origin.path,
            line: origin.line,
            key: origin.key,
            message: message.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let hostname = self.hostname(&raw.hostname)?;
        let tls = self.tls(raw.tls)?;
        let timeouts = self.timeouts(&raw.timeouts)?;
        let limits = self.limits(&raw.limits)?;
        let relay = self.relay(raw.relay.as_ref())?;
        let listeners = self.listeners(raw.listeners)?;
        let log_level = self.log_level(raw.log_level.as_ref())?;
        let admin = raw.admin.as_ref().map(|a| self.admin(a)).transpose()?;
        Ok(Config {
            path: self.path.to_owned(),
            hostname,
            tls,
            timeouts,
            limits,
            log_format: raw.log_format,
            log_level,
            admin,
            relay,
            listeners,
        })
    }

    fn log_level(&self, raw: Option<&Spanned<String>>) -> Result<String, ConfigError> {
        let Some(raw) = raw else { return Ok("info".to_owned()) };
        tracing_subscriber::EnvFilter::try_new(raw.get_ref()).map_err(|e| {
            self.invalid(
                "log_level",
                raw.span(),
                format!("not a log filter like \"info\" or \"mailtls=debug\": {e}"),
            )
        })?;
        Ok(raw.get_ref().clone())
    }

    fn admin(&self, raw: &RawAdmin) -> Result<AdminConfig, ConfigError> {
        let listen = raw.listen.get_ref().parse().map_err(|_| {
            self.invalid(
                "admin.listen",
                raw.listen.span(),
                format!("{:?} is not an address:port like \"127.0.0.1:9925\"", raw.listen.get_ref()),
            )
        })?;
        Ok(AdminConfig { listen })
    }

    fn relay(&self, raw: Option<&Spanned<String>>) -> Result<RelayMode, ConfigError> {
        match raw.map(|r| (r.get_ref().as_str(), r.span())) {
            None | Some(("auto", _)) => Ok(RelayMode::Auto),
            Some(("copy", _)) => Ok(RelayMode::Copy),
            Some((other, span)) => Err(self.invalid(
                "relay",
                span,
                format!("{other:?} is not a relay mode; use \"auto\" or \"copy\""),
            )),
        }
    }

    fn hostname(&self, raw: &Spanned<String>) -> Result<String, ConfigError> {
        let name = raw.get_ref();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid {
            return Err(self.invalid(
                "hostname",
                raw.span(),
                format!("{name:?} is not a host name (letters, digits, '-' and '.' only)"),
            ));
        }
        Ok(name.clone())
    }

    fn tls(&self, raw: RawTls) -> Result<TlsConfig, ConfigError> {
        let certs_span = raw.certificates.span();
        let entries = raw.certificates.into_inner();
        if entries.is_empty() {
            return Err(self.invalid("tls.certificates", certs_span, "at least one certificate is needed"));
        }
        let certificates = entries
            .into_iter()
            .enumerate()
            .map(|(i, c)| self.certificate(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let cipher_suites = match &raw.cipher_suites {
            None => None,
            Some(list) => Some(self.cipher_suites(list, raw.min_version)?),
        };
        let kx_groups = match &raw.kx_groups {
            None => None,
            Some(list) => Some(self.kx_groups(list)?),
        };
        let mut alpn = Vec::new();
        for (i, name) in raw.alpn.iter().enumerate() {
            let n = name.get_ref();
            if n.is_empty() || n.len() > 255 {
                return Err(self.invalid(format!("tls.alpn[{i}]"), name.span(), "must be 1 to 255 bytes"));
            }
            alpn.push(n.as_bytes().to_vec());
        }
        let ticket_keys = self.ticket_keys(raw.ticket_keys.as_ref(), raw.session_tickets)?;
        Ok(TlsConfig {
            min_version: raw.min_version,
            certificates,
            session_tickets: raw.session_tickets,
            session_cache: raw.session_cache.unwrap_or(DEFAULT_SESSION_CACHE),
            cipher_suites,
            kx_groups,
            alpn,
            watch: raw.watch,
            ticket_keys,
        })
    }

    /// A shared key file only makes sense with tickets on; the file itself is read by
    /// `tls::tickets` (at start, `--check` and reload), which names its own lines.
    fn ticket_keys(
        &self,
        raw: Option<&Spanned<String>>,
        session_tickets: bool,
    ) -> Result<Option<TicketKeysConfig>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        if raw.get_ref().trim().is_empty() {
            return Err(self.invalid("tls.ticket_keys", raw.span(), "needs the path of a ticket key file"));
        }
        if !session_tickets {
            return Err(self.invalid(
                "tls.ticket_keys",
                raw.span(),
                "shared ticket keys need session_tickets = true (remove one of the two)",
            ));
        }
        let origin = self.origin("tls.ticket_keys", raw.span());
        Ok(Some(TicketKeysConfig { path: self.resolve(raw.get_ref()), origin }))
    }

    /// Only suites of the provider's own list are accepted: all of them are AEAD with
    /// forward secrecy, so no configuration can weaken TLS below rustls' safe set.
    fn cipher_suites(
        &self,
        list: &Spanned<Vec<Spanned<String>>>,
        min: TlsVersion,
    ) -> Result<Vec<String>, ConfigError> {
        let known: Vec<&str> =
            rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES.iter().filter_map(|s| s.suite().as_str()).collect();
        let mut out = Vec::new();
        for (i, name) in list.get_ref().iter().enumerate() {
            // Accept the IANA spelling of TLS 1.3 suites too ("TLS_AES_128_GCM_SHA256").
            let wanted = name.get_ref().trim();
            let canonical = known.iter().find(|k| {
                k.eq_ignore_ascii_case(wanted)
                    || k.strip_prefix("TLS13_").is_some_and(|rest| {
                        wanted.len() > 4
                            && wanted[..4].eq_ignore_ascii_case("TLS_")
                            && rest.eq_ignore_ascii_case(&wanted[4..])
                    })
            });
            match canonical {
                Some(k) => out.push((*k).to_owned()),
                None => {
                    return Err(self.invalid(
                        format!("tls.cipher_suites[{i}]"),
                        name.span(),
                        format!(
                            "unknown or unsafe cipher suite {wanted:?}; choose from {}",
                            known.join(", ")
                        ),
                    ))
                }
            }
        }
        let has_tls13 = out.iter().any(|s| s.starts_with("TLS13_"));
        let has_tls12 = out.iter().any(|s| !s.starts_with("TLS13_"));
        if out.is_empty() || (min == TlsVersion::Tls13 && !has_tls13) || !(has_tls13 || has_tls12) {
            return Err(self.invalid(
                "tls.cipher_suites",
                list.span(),
                "leaves no cipher suite for the allowed TLS versions",
            ));
        }
        Ok(out)
    }

    fn kx_groups(&self, list: &Spanned<Vec<Spanned<String>>>) -> Result<Vec<String>, ConfigError> {
        let known: Vec<&str> =
            rustls::crypto::aws_lc_rs::ALL_KX_GROUPS.iter().filter_map(|g| g.name().as_str()).collect();
        let mut out = Vec::new();
        for (i, name) in list.get_ref().iter().enumerate() {
            let wanted = name.get_ref().trim();
            match known.iter().find(|k| k.eq_ignore_ascii_case(wanted)) {
                Some(k) => out.push((*k).to_owned()),
                None => {
                    return Err(self.invalid(
                        format!("tls.kx_groups[{i}]"),
                        name.span(),
                        format!("unknown key-exchange group {wanted:?}; choose from {}", known.join(", ")),
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err(self.invalid("tls.kx_groups", list.span(), "needs at least one group"));
        }
        Ok(out)
    }

    fn certificate(&self, index: usize, raw: RawCertificate) -> Result<CertificateConfig, ConfigError> {
        let cert_key = format!("tls.certificates[{index}].cert");
        let key_key = format!("tls.certificates[{index}].key");
        for (key, value) in [(&cert_key, &raw.cert), (&key_key, &raw.key)] {
            if value.get_ref().is_empty() {
                return Err(self.invalid(key.as_str(), value.span(), "must name a PEM file"));
            }
        }
        Ok(CertificateConfig {
            cert: self.resolve(raw.cert.get_ref()),
            key: self.resolve(raw.key.get_ref()),
            cert_origin: self.origin(cert_key, raw.cert.span()),
            key_origin: self.origin(key_key, raw.key.span()),
            ocsp: raw.ocsp.as_ref().map(|o| self.resolve(o.get_ref())),
            ocsp_origin: raw
                .ocsp
                .as_ref()
                .map(|o| self.origin(format!("tls.certificates[{index}].ocsp"), o.span())),
            self_signed: raw.self_signed,
        })
    }

    /// Relative paths are taken from the config file's directory.
    fn resolve(&self, file: &str) -> PathBuf {
        let file = Path::new(file);
        if file.is_absolute() {
            return file.to_owned();
        }
        self.path.parent().map(|dir| dir.join(file)).unwrap_or_else(|| file.to_owned())
    }

    fn timeouts(&self, raw: &RawTimeouts) -> Result<Timeouts, ConfigError> {
        let d = Timeouts::default();
        let secs = |key: &str, v: &Option<Spanned<u64>>, default: Duration| match v {
            None => Ok(default),
            Some(s) if *s.get_ref() == 0 => {
                Err(self.invalid(format!("timeouts.{key}"), s.span(), "must be at least 1 second"))
            }
            Some(s) => Ok(Duration::from_secs(*s.get_ref())),
        };
        Ok(Timeouts {
            handshake: secs("handshake", &raw.handshake, d.handshake)?,
            pre_auth_idle: secs("pre_auth_idle", &raw.pre_auth_idle, d.pre_auth_idle)?,
            idle: secs("idle", &raw.idle, d.idle)?,
            backend_connect: secs("backend_connect", &raw.backend_connect, d.backend_connect)?,
            drain: secs("drain", &raw.drain, d.drain)?,
            // 0 is meaningful here (no grace), unlike the timeouts above.
            health_grace: raw.health_grace.map_or(d.health_grace, Duration::from_secs),
        })
    }

    fn limits(&self, raw: &RawLimits) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let at_least = |key: &str, span: Range<usize>, ok: bool, min: &str| {
            if ok {
                Ok(())
            } else {
                Err(self.invalid(format!("limits.{key}"), span, format!("must be at least {min}")))
            }
        };
        if let Some(v) = &raw.max_line {
            at_least("max_line", v.span(), *v.get_ref() >= 1024, "1024")?;
        }
        if let Some(v) = &raw.max_pre_tls_commands {
            at_least("max_pre_tls_commands", v.span(), *v.get_ref() >= 1, "1")?;
        }
        if let Some(v) = &raw.max_errors {
            at_least("max_errors", v.span(), *v.get_ref() >= 1, "1")?;
        }
        for (key, v) in [
            ("max_connections", &raw.max_connections),
            ("max_connections_per_address", &raw.max_connections_per_address),
            ("max_new_connections_per_address_per_minute", &raw.max_new_connections_per_address_per_minute),
        ] {
            if let Some(v) = v {
                at_least(key, v.span(), *v.get_ref() >= 1, "1")?;
            }
        }
        Ok(Limits {
            max_pre_tls_commands: raw
                .max_pre_tls_commands
                .as_ref()
                .map_or(d.max_pre_tls_commands, |v| *v.get_ref()),
            max_errors: raw.max_errors.as_ref().map_or(d.max_errors, |v| *v.get_ref()),
            max_line: raw.max_line.as_ref().map_or(d.max_line, |v| *v.get_ref()),
            max_literal: raw.max_literal.as_ref().map_or(d.max_literal, |v| *v.get_ref()),
            max_connections: raw.max_connections.as_ref().map_or(d.max_connections, |v| *v.get_ref()),
            max_connections_per_address: raw
                .max_connections_per_address
                .as_ref()
                .map_or(d.max_connections_per_address, |v| *v.get_ref()),
            max_new_connections_per_address_per_minute: raw
                .max_new_connections_per_address_per_minute
                .as_ref()
                .map(|v| *v.get_ref()),
        })
    }

    fn listeners(&self, raw: Spanned<Vec<Spanned<RawListener>>>) -> Result<Vec<ListenerConfig>, ConfigError> {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.is_empty() {
            return Err(self.invalid("listeners", span, "at least one [[listeners]] entry is needed"));
        }
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, entry) in raw.into_iter().enumerate() {
            let listener = self.listener(i, entry.into_inner(), &mut names, &mut addresses)?;
            out.push(listener);
        }
        Ok(out)
    }

    fn listener(
        &self,
        i: usize,
        raw: RawListener,
        names: &mut HashSet<String>,
        addresses: &mut HashSet<SocketAddr>,
    ) -> Result<ListenerConfig, ConfigError> {
        let key = |k: &str| format!("listeners[{i}].{k}");
        let name = raw.name.get_ref().clone();
        let name_ok = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !name_ok {
            return Err(self.invalid(key("name"), raw.name.span(), "use letters, digits, '-', '_' and '.'"));
        }
        if !names.insert(name.clone()) {
            return Err(self.invalid(
                key("name"),
                raw.name.span(),
                format!("{name:?} is used by another listener"),
            ));
        }
        let listen = self.listen_addresses(&key("listen"), raw.listen, addresses)?;
        let (backend, routes) =
            self.backends(&key, raw.name.span(), raw.backend.as_ref(), raw.routes.as_ref())?;
        let require_tls = self.require_tls(&key("require_tls"), raw.protocol, raw.tls, &raw.require_tls)?;
        if let Some(v) = raw.max_connections.as_ref().filter(|v| *v.get_ref() == 0) {
            return Err(self.invalid(key("max_connections"), v.span(), "must be at least 1"));
        }
        let accept_proxy_protocol =
            self.networks(&key("accept_proxy_protocol"), &raw.accept_proxy_protocol)?;
        let xclient = self.xclient(&key("xclient"), raw.protocol, raw.proxy_protocol, &raw.xclient)?;
        let proxy_tlvs = self.proxy_tlvs(&key("proxy_tlvs"), raw.proxy_protocol, &raw.proxy_tlvs)?;
        let bare_newline = self.bare_newline(&key("bare_newline"), raw.protocol, &raw.bare_newline)?;
        Ok(ListenerConfig {
            name,
            protocol: raw.protocol,
            tls: raw.tls,
            require_tls,
            listen,
            backend,
            routes,
            proxy_protocol: raw.proxy_protocol,
            proxy_tlvs,
            max_connections: raw.max_connections.map(|v| v.into_inner()),
            accept_proxy_protocol,
            xclient,
            bare_newline,
        })
    }

    /// TLVs exist only in v2 headers: a list on another listener is a mistake worth naming.
    fn proxy_tlvs(
        &self,
        key: &str,
        proxy_protocol: ProxyProtocol,
        raw: &Option<Spanned<Vec<ProxyTlv>>>,
    ) -> Result<ProxyTlvs, ConfigError> {
        match raw {
            None => Ok(ProxyTlvs::default()),
            Some(v) if proxy_protocol != ProxyProtocol::V2 => Err(self.invalid(
                key,
                v.span(),
                "only a v2 PROXY header carries TLVs: set proxy_protocol = \"v2\"",
            )),
            Some(v) => Ok(ProxyTlvs {
                authority: v.get_ref().contains(&ProxyTlv::Authority),
                ssl: v.get_ref().contains(&ProxyTlv::Ssl),
            }),
        }
    }

    /// The smuggling guard exists for SMTP's DATA; IMAP and POP3 have no such framing.
    fn bare_newline(
        &self,
        key: &str,
        protocol: Protocol,
        raw: &Option<Spanned<BareNewline>>,
    ) -> Result<BareNewline, ConfigError> {
        match raw {
            Some(v) if protocol != Protocol::Smtp => Err(self.invalid(
                key,
                v.span(),
                "bare_newline guards SMTP message data: only an smtp listener can set it",
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(BareNewline::default()),
        }
    }

    /// CIDR networks ("10.0.0.0/8"); a bare address means that host alone.
    fn networks(&self, key: &str, raw: &[Spanned<String>]) -> Result<Vec<IpNet>, ConfigError> {
        raw.iter()
            .enumerate()
            .map(|(j, text)| {
                let t = text.get_ref().trim();
                t.parse::<IpNet>().or_else(|_| t.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
                    self.invalid(
                        format!("{key}[{j}]"),
                        text.span(),
                        format!("{t:?} is not a network like \"10.0.0.0/8\" or an address"),
                    )
                })
            })
            .collect()
    }

    /// Dovecot's login processes judge trust by the PROXY header's client address when one
    /// is sent, so on IMAP and POP3 a header and a naming command exclude each other: with
    /// both, Dovecot would ignore mailtls's XCLIENT/ID and every session would fail.
    fn xclient(
        &self,
        key: &str,
        protocol: Protocol,
        proxy_protocol: ProxyProtocol,
        raw: &Option<Spanned<bool>>,
    ) -> Result<bool, ConfigError> {
        match raw {
            Some(v)
                if *v.get_ref() && protocol != Protocol::Smtp && proxy_protocol != ProxyProtocol::None =>
            {
                Err(self.invalid(
                    key,
                    v.span(),
                    "on imap and pop3 listeners xclient needs proxy_protocol = \"none\" (the PROXY header \
                     already names the client, and Dovecot then ignores XCLIENT and ID from mailtls)",
                ))
            }
            Some(v) => Ok(*v.get_ref()),
            None => Ok(false),
        }
    }

    fn listen_addresses(
        &self,
        key: &str,
        raw: Spanned<Vec<Spanned<String>>>,
        seen: &mut HashSet<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        if raw.get_ref().is_empty() {
            return Err(self.invalid(key, raw.span(), "needs at least one address, like \"0.0.0.0:993\""));
        }
        let mut out = Vec::new();
        for (j, text) in raw.into_inner().into_iter().enumerate() {
            let addr: SocketAddr = text.get_ref().parse().map_err(|_| {
                self.invalid(
                    format!("{key}[{j}]"),
                    text.span(),
                    format!(
                        "{:?} is not an address:port (IPv6 goes in brackets: \"[::]:993\")",
                        text.get_ref()
                    ),
                )
            })?;
            // Port 0 asks the kernel for any free port, so repeats never clash.
            if addr.port() != 0 && !seen.insert(addr) {
                return Err(self.invalid(
                    format!("{key}[{j}]"),
                    text.span(),
                    format!("{addr} is listed twice"),
                ));
            }
            out.push(addr);
        }
        Ok(out)
    }

    /// Exactly one of `backend` (one server) and `routes` (a server per user on IMAP and
    /// POP3, per recipient on SMTP).
    fn backends(
        &self,
        key: &dyn Fn(&str) -> String,
        entry: Range<usize>,
        backend: Option<&Spanned<String>>,
        routes: Option<&Spanned<String>>,
    ) -> Result<(Option<String>, Option<RoutesConfig>), ConfigError> {
        match (backend, routes) {
            (Some(b), None) => {
                let text = b.get_ref();
                check_backend(text).map_err(|message| self.invalid(key("backend"), b.span(), message))?;
                Ok((Some(text.clone()), None))
            }
            (Some(_), Some(r)) => Err(self.invalid(
                key("routes"),
                r.span(),
                "a routed listener takes its backends from the routes file (its `default`): remove `backend`",
            )),
            (None, Some(r)) => {
                if r.get_ref().trim().is_empty() {
                    return Err(self.invalid(key("routes"), r.span(), "needs the path of a routes file"));
                }
                let origin = self.origin(key("routes"), r.span());
                Ok((None, Some(RoutesConfig { path: self.resolve(r.get_ref()), origin })))
            }
            // Named at the listener's `name`: a missing key has no line of its own.
            (None, None) => Err(self.invalid(
                key("backend"),
                entry,
                "missing: every listener needs `backend = \"host:port\"` (or `routes = \"PATH\"`)",
            )),
        }
    }

    fn require_tls(
        &self,
        key: &str,
        protocol: Protocol,
        mode: TlsMode,
        raw: &Option<Spanned<bool>>,
    ) -> Result<bool, ConfigError> {
        let Some(v) = raw else { return Ok(true) };
        if *v.get_ref() {
            return Ok(true);
        }
        if mode == TlsMode::Implicit {
            return Err(self.invalid(key, v.span(), "only a STARTTLS listener can allow plaintext"));
        }
        if protocol != Protocol::Smtp {
            return Err(self.invalid(
                key,
                v.span(),
                "only SMTP may run without TLS (an opportunistic MX on port 25); IMAP and POP3 always require it",
            ));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
hostname = "mail.example.org"

[tls]
min_version = "1.2"
[[tls.certificates]]
cert = "cert.pem"
key  = "key.pem"

[[listeners]]
name = "imaps"
protocol = "imap"
tls = "implicit"
listen = ["127.0.0.1:10993", "[::1]:10993"]
backend = "127.0.0.1:143"
proxy_protocol = "v2"

[[listeners]]
name = "mx"
protocol = "smtp"
tls = "starttls"
require_tls = false
listen = ["127.0.0.1:10025"]
backend = "127.0.0.1:2525"
"#;

    fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/mailtls/mailtls.toml"), text)
    }

    fn error_of(text: &str) -> String {
        match parse_text(text) {
            Ok(_) => panic!("config should have been refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn example_parses_with_defaults() {
        let c = parse_text(GOOD).expect("valid config");
        assert_eq!(c.hostname, "mail.example.org");
        assert_eq!(c.tls.certificates[0].cert, Path::new("/etc/mailtls/cert.pem"));
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.listeners.len(), 2);
        assert!(c.listeners[0].require_tls);
        assert!(!c.listeners[1].require_tls);
        assert_eq!(c.listeners[1].proxy_protocol, ProxyProtocol::None);
        assert_eq!(c.listeners[0].listen[1], "[::1]:10993".parse().unwrap());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocl = \"v2\"");
        let e = error_of(&text);
        assert!(e.contains(":16:"), "{e}");
        assert!(e.contains("proxy_protocl"), "{e}");
    }

    /// `[[tls.certificates]]` with no `[tls]` header above it is valid TOML (the header
    /// makes the table): it once failed with serde's "expected a borrowed string".
    #[test]
    fn tls_table_made_by_its_certificates_header_alone_parses() {
        let c = parse_text(&GOOD.replace("[tls]\nmin_version = \"1.2\"\n", "")).expect("valid config");
        assert_eq!(c.tls.certificates.len(), 1);
        // And a dotted key for it.
        let dotted = GOOD.replace("[tls]\nmin_version = \"1.2\"\n", "").replace(
            "hostname = \"mail.example.org\"",
            "hostname = \"mail.example.org\"\ntls.min_version = \"1.3\"",
        );
        let c = parse_text(&dotted).expect("valid config");
        assert_eq!(c.tls.min_version, TlsVersion::Tls13);
    }

    #[test]
    fn a_missing_required_key_is_named_with_its_table() {
        let no_key = GOOD.replace("key  = \"key.pem\"\n", "");
        let e = error_of(&no_key);
        assert!(e.contains(":6: tls.certificates[0].key: missing"), "{e}");
        let no_tls = GOOD.replace(
            "[tls]\nmin_version = \"1.2\"\n[[tls.certificates]]\ncert = \"cert.pem\"\nkey  = \"key.pem\"\n",
            "",
        );
        let e = error_of(&no_tls);
        assert!(e.contains(": tls: missing"), "{e}");
        assert!(!e.contains("hostname"), "the first line's key is not the one missing: {e}");
    }

    #[test]
    fn bad_listen_address_names_key_and_line() {
        let text = GOOD.replace("\"127.0.0.1:10025\"", "\"127.0.0.1\"");
        let e = error_of(&text);
        assert!(e.contains(":23: listeners[1].listen[0]"), "{e}");
    }

    #[test]
    fn duplicate_listener_name_is_refused() {
        let e = error_of(&GOOD.replace("name = \"mx\"", "name = \"imaps\""));
        assert!(e.contains("listeners[1].name") && e.contains("used by another listener"), "{e}");
    }

    #[test]
    fn plaintext_imap_is_refused() {
        let text = GOOD.replace("protocol = \"smtp\"", "protocol = \"imap\"");
        let e = error_of(&text);
        assert!(e.contains(":22: listeners[1].require_tls"), "{e}");
    }

    #[test]
    fn bad_backend_and_version_and_timeout_are_named() {
        let e = error_of(&GOOD.replace("\"127.0.0.1:2525\"", "\"127.0.0.1\""));
        assert!(e.contains("listeners[1].backend"), "{e}");
        let e = error_of(&GOOD.replace("\"1.2\"", "\"1.1\""));
        assert!(e.contains(":5:"), "{e}");
        let e = error_of(&format!("{GOOD}\n[timeouts]\nhandshake = 0\n"));
        assert!(e.contains("timeouts.handshake"), "{e}");
    }

    #[test]
    fn tls_policy_knobs_accept_only_the_safe_sets() {
        let with =
            |extra: &str| GOOD.replace("min_version = \"1.2\"", &format!("min_version = \"1.2\"\n{extra}"));
        let c = parse_text(&with("cipher_suites = [\"TLS_AES_128_GCM_SHA256\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\nkx_groups = [\"X25519MLKEM768\", \"x25519\"]\nalpn = [\"imap\"]")).expect("valid");
        assert_eq!(
            c.tls.cipher_suites.as_deref(),
            Some(
                &[
                    "TLS13_AES_128_GCM_SHA256".to_owned(),
                    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".to_owned()
                ][..]
            )
        );
        assert_eq!(c.tls.kx_groups.as_deref(), Some(&["X25519MLKEM768".to_owned(), "X25519".to_owned()][..]));
        assert!(c.tls.session_tickets);
        let e = error_of(&with("cipher_suites = [\"TLS_RSA_WITH_RC4_128_SHA\"]"));
        assert!(e.contains(":6: tls.cipher_suites[0]") && e.contains("unknown or unsafe"), "{e}");
        let e = error_of(&with("kx_groups = [\"ffdhe2048\"]"));
        assert!(e.contains("tls.kx_groups[0]"), "{e}");
        let only12 = GOOD.replace(
            "min_version = \"1.2\"",
            "min_version = \"1.3\"\ncipher_suites = [\"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\"]",
        );
        assert!(error_of(&only12).contains("leaves no cipher suite"));
    }

    #[test]
    fn operations_keys_parse_and_bad_values_are_named() {
        let text = GOOD.replace(
            "proxy_protocol = \"v2\"",
            "proxy_protocol = \"v2\"\nmax_connections = 5\naccept_proxy_protocol = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]",
        ) + "\nlog_level = \"mailtls=debug\"\n[admin]\nlisten = \"127.0.0.1:9925\"\n[limits]\nmax_connections_per_address = 3\nmax_new_connections_per_address_per_minute = 60\n";
        let text = text.replacen("\nlog_level = \"mailtls=debug\"\n", "\n", 1);
        let text = format!("log_level = \"mailtls=debug\"\n{text}");
        let c = parse_text(&text).expect("valid");
        assert_eq!(c.admin, Some(AdminConfig { listen: "127.0.0.1:9925".parse().unwrap() }));
        assert_eq!(c.log_level, "mailtls=debug");
        assert_eq!(c.limits.max_connections_per_address, 3);
        assert_eq!(c.limits.max_new_connections_per_address_per_minute, Some(60));
        assert_eq!(c.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        let l = &c.listeners[0];
        assert_eq!(l.max_connections, Some(5));
        assert_eq!(l.accept_proxy_protocol.len(), 3);
        assert!(l.accept_proxy_protocol[1].contains(&"192.0.2.7".parse::<IpAddr>().unwrap()));
        assert!(c.listeners[1].accept_proxy_protocol.is_empty());

        let e = error_of(&text.replace("\"192.0.2.7\"", "\"192.0.2.300\""));
        assert!(e.contains("listeners[0].accept_proxy_protocol[1]"), "{e}");
        let e = error_of(&text.replace("127.0.0.1:9925", "localhost"));
        assert!(e.contains("admin.listen"), "{e}");
        let e = error_of(&text.replace("max_connections_per_address = 3", "max_connections_per_address = 0"));
        assert!(e.contains("limits.max_connections_per_address"), "{e}");
        let e = error_of(&text.replace("max_connections = 5", "max_connections = 0"));
        assert!(e.contains("listeners[0].max_connections"), "{e}");
        let e = error_of(&text.replace("mailtls=debug", "mailtls=loud"));
        assert!(e.contains("log_level") && e.contains(":1:"), "{e}");
    }

    #[test]
    fn container_example_parses() {
        let text = include_str!("../config/mailtls.container.toml");
        let c = parse_text(text).expect("the container example is valid");
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.admin.is_some());
    }

    #[test]
    fn xclient_on_imap_and_pop3_needs_proxy_protocol_none() {
        let c =
            parse_text(&GOOD.replace("require_tls = false", "require_tls = false\nxclient = true")).unwrap();
        assert!(!c.listeners[0].xclient);
        assert!(c.listeners[1].xclient);
        let e = error_of(&GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v2\"\nxclient = true"));
        assert!(e.contains(":17: listeners[0].xclient") && e.contains("proxy_protocol = \"none\""), "{e}");
        for protocol in ["imap", "pop3"] {
            let text = GOOD
                .replace("proxy_protocol = \"v2\"", "proxy_protocol = \"none\"\nxclient = true")
                .replace("protocol = \"imap\"", &format!("protocol = \"{protocol}\""));
            assert!(parse_text(&text).expect("valid").listeners[0].xclient, "{protocol}");
        }
    }

    #[test]
    fn proxy_tlvs_default_to_both_and_need_a_v2_header() {
        let c = parse_text(GOOD).unwrap();
        assert_eq!(c.listeners[0].proxy_tlvs, ProxyTlvs { authority: true, ssl: true });
        let c =
            parse_text(&GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v2\"\nproxy_tlvs = []"))
                .unwrap();
        assert_eq!(c.listeners[0].proxy_tlvs, ProxyTlvs { authority: false, ssl: false });
        let text = GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v2\"\nproxy_tlvs = [\"ssl\"]");
        assert_eq!(
            parse_text(&text).unwrap().listeners[0].proxy_tlvs,
            ProxyTlvs { authority: false, ssl: true }
        );
        let e =
            error_of(&GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v1\"\nproxy_tlvs = []"));
        assert!(e.contains(":17: listeners[0].proxy_tlvs") && e.contains("proxy_protocol = \"v2\""), "{e}");
        let e = error_of(
            &GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v2\"\nproxy_tlvs = [\"alpn\"]"),
        );
        assert!(e.contains(":17: listeners[0].proxy_tlvs") && e.contains("unknown variant `alpn`"), "{e}");
    }

    #[test]
    fn a_bad_enum_or_type_names_its_key_and_line() {
        let e = error_of(&GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v3\""));
        assert!(e.contains(":16: listeners[0].proxy_protocol: unknown variant `v3`"), "{e}");
        let e = error_of(&GOOD.replace("require_tls = false", "require_tls = \"no\""));
        assert!(e.contains(":22: listeners[1].require_tls: "), "{e}");
        let e = error_of(&GOOD.replace("min_version = \"1.2\"", "min_version = 1.2"));
        assert!(e.contains(":5: tls.min_version: "), "{e}");
    }

    #[test]
    fn relay_mode_defaults_to_auto_and_bad_values_name_key_and_line() {
        assert_eq!(parse_text(GOOD).expect("valid").relay, RelayMode::Auto);
        let copy = GOOD.replacen("hostname", "relay = \"copy\"\nhostname", 1);
        assert_eq!(parse_text(&copy).expect("valid").relay, RelayMode::Copy);
        let e = error_of(&GOOD.replacen("hostname", "relay = \"splice\"\nhostname", 1));
        assert!(e.contains(":2: relay: \"splice\" is not a relay mode"), "{e}");
    }

    #[test]
    fn health_grace_defaults_to_none_and_may_be_zero() {
        assert_eq!(parse_text(GOOD).unwrap().timeouts.health_grace, Duration::ZERO);
        let c = parse_text(&format!("{GOOD}\n[timeouts]\nhealth_grace = 3\n")).unwrap();
        assert_eq!(c.timeouts.health_grace, Duration::from_secs(3));
        let c = parse_text(&format!("{GOOD}\n[timeouts]\nhealth_grace = 0\n")).unwrap();
        assert_eq!(c.timeouts.health_grace, Duration::ZERO);
    }

    #[test]
    fn ticket_keys_resolve_beside_the_config_and_need_tickets() {
        let with =
            GOOD.replace("min_version = \"1.2\"", "min_version = \"1.2\"\nticket_keys = \"ticket.keys\"");
        let c = parse_text(&with).unwrap();
        let keys = c.tls.ticket_keys.expect("ticket_keys set");
        assert_eq!(keys.path, Path::new("/etc/mailtls/ticket.keys"));
        assert_eq!(keys.origin.to_string(), "/etc/mailtls/mailtls.toml:6: tls.ticket_keys");
        assert!(parse_text(GOOD).unwrap().tls.ticket_keys.is_none());
        let e = error_of(&with.replace(
            "ticket_keys = \"ticket.keys\"",
            "ticket_keys = \"ticket.keys\"\nsession_tickets = false",
        ));
        assert!(e.contains(":6: tls.ticket_keys: shared ticket keys need session_tickets = true"), "{e}");
        let e = error_of(&with.replace("\"ticket.keys\"", "\"\""));
        assert!(e.contains(":6: tls.ticket_keys: needs the path"), "{e}");
    }

    #[test]
    fn routes_on_any_protocol_and_never_with_backend() {
        let routed = GOOD.replace("backend = \"127.0.0.1:143\"", "routes = \"routes/imap.toml\"");
        let c = parse_text(&routed).expect("valid");
        let routes = c.listeners[0].routes.as_ref().expect("routed");
        assert_eq!(routes.path, Path::new("/etc/mailtls/routes/imap.toml"));
        assert_eq!(routes.origin.to_string(), "/etc/mailtls/mailtls.toml:15: listeners[0].routes");
        assert_eq!(c.listeners[0].backend, None);
        assert_eq!(c.listeners[1].backend.as_deref(), Some("127.0.0.1:2525"));

        // SMTP routes per recipient (the MX listener of GOOD is opportunistic).
        let c =
            parse_text(&GOOD.replace("backend = \"127.0.0.1:2525\"", "routes = \"r.toml\"")).expect("valid");
        assert_eq!(
            c.listeners[1].routes.as_ref().map(|r| r.path.clone()),
            Some(PathBuf::from("/etc/mailtls/r.toml"))
        );
        assert_eq!(c.listeners[1].backend, None);
        let e =
            error_of(&GOOD.replace("backend = \"127.0.0.1:143\"", "backend = \"h:1\"\nroutes = \"r.toml\""));
        assert!(
            e.contains(":16: listeners[0].routes: a routed listener") && e.contains("remove `backend`"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("backend = \"127.0.0.1:143\"", "routes = \" \""));
        assert!(e.contains(":15: listeners[0].routes: needs the path"), "{e}");
    }

    #[test]
    fn bare_newline_defaults_to_normalize_and_only_smtp_may_set_it() {
        let c = parse_text(GOOD).expect("valid");
        assert_eq!(c.listeners[1].bare_newline, BareNewline::Normalize);
        let reject = GOOD.replace("require_tls = false", "require_tls = false\nbare_newline = \"reject\"");
        assert_eq!(parse_text(&reject).expect("valid").listeners[1].bare_newline, BareNewline::Reject);
        let e = error_of(
            &GOOD.replace("proxy_protocol = \"v2\"", "proxy_protocol = \"v2\"\nbare_newline = \"reject\""),
        );
        assert!(e.contains(":17: listeners[0].bare_newline") && e.contains("only an smtp listener"), "{e}");
        let e =
            error_of(&GOOD.replace("require_tls = false", "require_tls = false\nbare_newline = \"strip\""));
        assert!(e.contains(":23:") && e.contains("normalize") && e.contains("reject"), "{e}");
    }

    #[test]
    fn missing_key_is_reported() {
        let e = error_of(&GOOD.replace("backend = \"127.0.0.1:143\"\n", ""));
        assert!(e.contains(":11: listeners[0].backend: missing"), "{e}");
    }
}

#[cfg(test)]
mod documented;
