//! What happened, counted: Prometheus families (prometheus-client) labelled by listener,
//! rendered as text for the admin endpoint, plus process-wide tallies for status lines.
//!
//! Sessions call one method per event; each method bumps the labelled family and, where
//! something in-process reads the number (tests, the systemd STATUS line), a plain tally.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::relay::Engine;
use crate::tls::LoadedCert;

/// A process-wide count, readable without going through the text format.
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: String,
    outcome: &'static str,
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    listener: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    listener: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabels {
    listener: String,
    engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    listener: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    listener: String,
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyHeaderLabels {
    listener: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    file: String,
    names: String,
}

/// How a TLS handshake ended, for the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Finished; carries the version ("TLSv1.3").
    Ok(&'static str),
    Failed,
    Timeout,
}

/// Which bound turned a connection away, for the `limit` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_connections`: every listener together.
    Total,
    /// `max_connections` of the listener.
    Listener,
    /// `limits.max_connections_per_address`.
    Address,
    /// `limits.max_new_connections_per_address_per_minute`.
    Rate,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Total => "total",
            Limit::Listener => "listener",
            Limit::Address => "address",
            Limit::Rate => "rate",
        }
    }
}

/// Every metric mailtls exposes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    accepted: Family<ListenerLabels, Counter>,
    open: Family<ListenerLabels, Gauge>,
    refused: Family<RefusalLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    upgrades: Family<ListenerLabels, Counter>,
    logins_refused: Family<ListenerLabels, Counter>,
    injections: Family<ListenerLabels, Counter>,
    bare_newlines: Family<ActionLabels, Counter>,
    backend_failed: Family<ListenerLabels, Counter>,
    probe_failed: Family<ListenerLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    engines: Family<EngineLabels, Counter>,
    proxy_headers: Family<ProxyHeaderLabels, Counter>,
    cert_reloads: Family<OutcomeLabels, Counter>,
    config_reloads: Family<OutcomeLabels, Counter>,
    route_reloads: Family<OutcomeLabels, Counter>,
    ticket_key_reloads: Family<OutcomeLabels, Counter>,
    ticket_keys: Gauge,
    routed: Family<RouteLabels, Counter>,
    routed_recipients: Family<RouteLabels, Counter>,
    deferred_recipients: Family<ListenerLabels, Counter>,
    not_after: Family<CertLabels, Gauge>,
    /// Connections accepted, every listener (refused ones included).
    pub connections_accepted: Tally,
    /// Connections being served now, every listener.
    pub connections_open: AtomicI64,
    pub connections_refused: Tally,
    pub handshakes_failed: Tally,
    pub starttls_upgrades: Tally,
    /// Plaintext bytes found behind a STARTTLS command (the command-injection class).
    pub starttls_injection_attempts: Tally,
    /// Bare CR/LF line endings (and unframeable BDAT lines) the SMTP guard handled.
    pub smtp_bare_newlines: Tally,
    pub plaintext_logins_refused: Tally,
    pub backend_failures: Tally,
    /// Capability probes that found the backend down or broken.
    pub probe_failures: Tally,
    /// Sessions that reached the bulk phase, by the relay engine that served them.
    pub relay_copy: Tally,
    pub relay_splice: Tally,
    pub relay_ktls: Tally,
    pub cert_reloads_ok: Tally,
    pub cert_reloads_failed: Tally,
    pub config_reloads_ok: Tally,
    pub config_reloads_failed: Tally,
    pub route_reloads_ok: Tally,
    pub route_reloads_failed: Tally,
    pub ticket_key_reloads_ok: Tally,
    pub ticket_key_reloads_failed: Tally,
    /// The soonest notAfter (Unix seconds) of the certificates in service; 0 before any.
    pub soonest_not_after: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("mailtls"),
            accepted: Family::default(),
            open: Family::default(),
            refused: Family::default(),
            handshakes: Family::default(),
            upgrades: Family::default(),
            logins_refused: Family::default(),
            injections: Family::default(),
            bare_newlines: Family::default(),
            backend_failed: Family::default(),
            probe_failed: Family::default(),
            bytes: Family::default(),
            engines: Family::default(),
            proxy_headers: Family::default(),
            cert_reloads: Family::default(),
            config_reloads: Family::default(),
            route_reloads: Family::default(),
            ticket_key_reloads: Family::default(),
            ticket_keys: Gauge::default(),
            routed: Family::default(),
            routed_recipients: Family::default(),
            deferred_recipients: Family::default(),
            not_after: Family::default(),
            connections_accepted: Tally::default(),
            connections_open: AtomicI64::new(0),
            connections_refused: Tally::default(),
            handshakes_failed: Tally::default(),
            starttls_upgrades: Tally::default(),
            starttls_injection_attempts: Tally::default(),
            smtp_bare_newlines: Tally::default(),
            plaintext_logins_refused: Tally::default(),
            backend_failures: Tally::default(),
            probe_failures: Tally::default(),
            relay_copy: Tally::default(),
            relay_splice: Tally::default(),
            relay_ktls: Tally::default(),
            cert_reloads_ok: Tally::default(),
            cert_reloads_failed: Tally::default(),
            config_reloads_ok: Tally::default(),
            config_reloads_failed: Tally::default(),
            route_reloads_ok: Tally::default(),
            route_reloads_failed: Tally::default(),
            ticket_key_reloads_ok: Tally::default(),
            ticket_key_reloads_failed: Tally::default(),
            soonest_not_after: AtomicI64::new(0),
        };
        m.register();
        m
    }

    /// Names follow Prometheus conventions: the text encoder adds `_total` to counters.
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register("connections_accepted", "TCP connections accepted", self.accepted.clone());
        r.register("connections_open", "Connections being served", self.open.clone());
        r.register("connections_refused", "Connections turned away by a limit", self.refused.clone());
        r.register("tls_handshakes", "TLS handshakes by outcome and version", self.handshakes.clone());
        r.register("starttls_upgrades", "STARTTLS/STLS commands accepted", self.upgrades.clone());
        r.register(
            "plaintext_logins_refused",
            "Login or AUTH attempts refused before TLS",
            self.logins_refused.clone(),
        );
        r.register(
            "starttls_injection_attempts",
            "Plaintext sent behind or after a STARTTLS command",
            self.injections.clone(),
        );
        r.register(
            "smtp_bare_newlines",
            "Bare CR or LF line endings from SMTP clients (the smuggling class), normalized or refused",
            self.bare_newlines.clone(),
        );
        r.register(
            "backend_failures",
            "Backends unreachable or greeting negatively",
            self.backend_failed.clone(),
        );
        r.register(
            "capability_probe_failures",
            "Capability probes of a backend that failed (backend down or broken)",
            self.probe_failed.clone(),
        );
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        r.register("sessions_by_engine", "Sessions that reached the relay, by engine", self.engines.clone());
        r.register("proxy_headers", "Inbound PROXY headers by outcome", self.proxy_headers.clone());
        r.register("certificate_reloads", "Certificate reloads by outcome", self.cert_reloads.clone());
        r.register("config_reloads", "Configuration reloads by outcome", self.config_reloads.clone());
        r.register("route_reloads", "Routes file reloads by outcome", self.route_reloads.clone());
        r.register(
            "ticket_key_reloads",
            "Session ticket key file reloads by outcome",
            self.ticket_key_reloads.clone(),
        );
        r.register(
            "ticket_keys",
            "Session ticket keys in service (shared key file)",
            self.ticket_keys.clone(),
        );
        r.register(
            "routed_logins",
            "Logins routed to a backend, by the map rule that chose it",
            self.routed.clone(),
        );
        r.register(
            "routed_recipients",
            "SMTP recipients relayed to a backend, by the map rule that chose it",
            self.routed_recipients.clone(),
        );
        r.register(
            "deferred_recipients",
            "SMTP recipients answered 452 4.5.3 because another backend holds the transaction",
            self.deferred_recipients.clone(),
        );
        r.register(
            "certificate_not_after_seconds",
            "notAfter of each certificate in service (Unix time)",
            self.not_after.clone(),
        );
    }

    /// Reads a tally (tests, status lines).
    pub fn get(tally: &Tally) -> u64 {
        tally.0.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    fn listener(name: &str) -> ListenerLabels {
        ListenerLabels { listener: name.to_owned() }
    }

    pub fn accepted(&self, listener: &str) {
        self.connections_accepted.bump();
        self.accepted.get_or_create(&Self::listener(listener)).inc();
    }

    pub fn opened(&self, listener: &str) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.open.get_or_create(&Self::listener(listener)).inc();
    }

    pub fn closed(&self, listener: &str) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
        self.open.get_or_create(&Self::listener(listener)).dec();
    }

    pub fn refused(&self, listener: &str, limit: Limit) {
        self.connections_refused.bump();
        self.refused
            .get_or_create(&RefusalLabels { listener: listener.to_owned(), limit: limit.name() })
            .inc();
    }

    pub fn handshake(&self, listener: &str, outcome: Handshake) {
        let (outcome, version) = match outcome {
            Handshake::Ok(version) => ("ok", version),
            Handshake::Failed => ("failed", "none"),
            Handshake::Timeout => ("timeout", "none"),
        };
        if outcome != "ok" {
            self.handshakes_failed.bump();
        }
        let labels = HandshakeLabels { listener: listener.to_owned(), outcome, version };
        self.handshakes.get_or_create(&labels).inc();
    }

    pub fn starttls_upgrade(&self, listener: &str) {
        self.starttls_upgrades.bump();
        self.upgrades.get_or_create(&Self::listener(listener)).inc();
    }

    pub fn plaintext_login_refused(&self, listener: &str) {
        self.plaintext_logins_refused.bump();
        self.logins_refused.get_or_create(&Self::listener(listener)).inc();
    }

    pub fn injection_attempt(&self, listener: &str) {
        self.starttls_injection_attempts.bump();
        self.injections.get_or_create(&Self::listener(listener)).inc();
    }

    /// The SMTP guard normalized (`normalized`) or refused (`refused`) `count` bare line
    /// endings from a client.
    pub fn client_guard(&self, listener: &str, action: &'static str, count: u64) {
        self.smtp_bare_newlines.0.fetch_add(count, Ordering::Relaxed);
        let labels = ActionLabels { listener: listener.to_owned(), action };
        self.bare_newlines.get_or_create(&labels).inc_by(count);
    }

    pub fn backend_failure(&self, listener: &str) {
        self.backend_failures.bump();
        self.backend_failed.get_or_create(&Self::listener(listener)).inc();
    }

    /// A capability probe of the listener's backend failed.
    pub fn probe_failed(&self, listener: &str) {
        self.probe_failures.bump();
        self.probe_failed.get_or_create(&Self::listener(listener)).inc();
    }

    /// Bytes a session moved: from the client to the backend and back.
    pub fn relayed(&self, listener: &str, to_backend: u64, to_client: u64) {
        for (direction, n) in [("to_backend", to_backend), ("to_client", to_client)] {
            let labels = DirectionLabels { listener: listener.to_owned(), direction };
            self.bytes.get_or_create(&labels).inc_by(n);
        }
    }

    /// A session reached the bulk phase on `engine` (counted when the engine is chosen, so
    /// a session cut off at shutdown still counts).
    pub fn engine(&self, listener: &str, engine: Engine) {
        let labels = EngineLabels { listener: listener.to_owned(), engine: engine.to_string() };
        self.engines.get_or_create(&labels).inc();
        match engine {
            Engine::Copy => self.relay_copy.bump(),
            Engine::Splice => self.relay_splice.bump(),
            Engine::Ktls => self.relay_ktls.bump(),
        }
    }

    /// An inbound PROXY header: `ok`, `malformed`, `missing` or `timeout`.
    pub fn proxy_header(&self, listener: &str, outcome: &'static str) {
        let labels = ProxyHeaderLabels { listener: listener.to_owned(), outcome };
        self.proxy_headers.get_or_create(&labels).inc();
    }

    pub fn cert_reload(&self, ok: bool) {
        if ok {
            self.cert_reloads_ok.bump();
        } else {
            self.cert_reloads_failed.bump();
        }
        self.cert_reloads.get_or_create(&OutcomeLabels { outcome: outcome(ok) }).inc();
    }

    pub fn config_reload(&self, ok: bool) {
        if ok {
            self.config_reloads_ok.bump();
        } else {
            self.config_reloads_failed.bump();
        }
        self.config_reloads.get_or_create(&OutcomeLabels { outcome: outcome(ok) }).inc();
    }

    pub fn route_reload(&self, ok: bool) {
        if ok {
            self.route_reloads_ok.bump();
        } else {
            self.route_reloads_failed.bump();
        }
        self.route_reloads.get_or_create(&OutcomeLabels { outcome: outcome(ok) }).inc();
    }

    pub fn ticket_key_reload(&self, ok: bool) {
        if ok {
            self.ticket_key_reloads_ok.bump();
        } else {
            self.ticket_key_reloads_failed.bump();
        }
        self.ticket_key_reloads.get_or_create(&OutcomeLabels { outcome: outcome(ok) }).inc();
    }

    /// How many keys the shared ticket key file in service holds.
    pub fn set_ticket_keys(&self, n: usize) {
        self.ticket_keys.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A login routed by the rule `rule` ("address", "domain", "default").
    pub fn routed(&self, listener: &str, rule: &'static str) {
        self.routed.get_or_create(&RouteLabels { listener: listener.to_owned(), rule }).inc();
    }

    /// An SMTP recipient relayed to the backend that the rule `rule` chose.
    pub fn recipient_routed(&self, listener: &str, rule: &'static str) {
        self.routed_recipients.get_or_create(&RouteLabels { listener: listener.to_owned(), rule }).inc();
    }

    /// An SMTP recipient deferred to a later transaction (its backend is not this one's).
    pub fn recipient_deferred(&self, listener: &str) {
        self.deferred_recipients.get_or_create(&ListenerLabels { listener: listener.to_owned() }).inc();
    }

    /// Replaces the per-certificate expiry gauges with the set now in service.
    pub fn set_certificates(&self, certs: &[LoadedCert]) {
        self.not_after.clear();
        for c in certs {
            let labels = CertLabels { file: c.source.clone(), names: c.names.join(",") };
            self.not_after.get_or_create(&labels).set(c.not_after);
        }
        let soonest = certs.iter().map(|c| c.not_after).min().unwrap_or(0);
        self.soonest_not_after.store(soonest, Ordering::Relaxed);
    }
}

fn outcome(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_listener_labels() {
        let m = Metrics::new();
        m.accepted("imaps");
        m.handshake("imaps", Handshake::Ok("TLSv1.3"));
        m.handshake("imaps", Handshake::Failed);
        m.refused("imaps", Limit::Address);
        m.relayed("imaps", 10, 20);
        let text = m.render();
        assert!(text.contains("mailtls_connections_accepted_total{listener=\"imaps\"} 1"), "{text}");
        assert!(
            text.contains(
                "mailtls_tls_handshakes_total{listener=\"imaps\",outcome=\"ok\",version=\"TLSv1.3\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("mailtls_connections_refused_total{listener=\"imaps\",limit=\"address\"} 1"));
        assert!(
            text.contains("mailtls_bytes_total{listener=\"imaps\",direction=\"to_client\"} 20"),
            "{text}"
        );
        assert_eq!(Metrics::get(&m.handshakes_failed), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
