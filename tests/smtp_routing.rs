//! Inbound SMTP routed by recipient (`routes = "PATH"` on an MX listener): each recipient
//! reaches only its own mailbox server, recipients of another server are deferred with
//! `452 4.5.3` and reach nobody, bodies arrive intact, every backend connection carries a
//! PROXY header (with the TLS facts after STARTTLS).
//!
//! Three recording backends: `home` (the map's default), `one` (a domain) and `two` (one
//! address). What each received is asserted byte for byte.

mod common;

use common::backend::Seen;
use common::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mailtls::metrics::Metrics;

const TIMEOUTS: &str = "[timeouts]\nhandshake = 2\ndrain = 1\n";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const PP2_TYPE_SSL: u8 = 0x20;

struct Site {
    home: Backend,
    one: Backend,
    two: Backend,
    dir: tempfile::TempDir,
}

impl Site {
    async fn start() -> Site {
        let site = Site {
            home: Backend::start(Script::SmtpNoAuth).await,
            one: Backend::start(Script::SmtpNoAuth).await,
            two: Backend::start(Script::SmtpNoAuth).await,
            dir: tempfile::tempdir().unwrap(),
        };
        site.write_map(site.one.addr, "");
        site
    }

    fn map(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    /// @one.test to `one_at`, bob@two.test to two, everyone else home; `extra` lines too.
    fn write_map(&self, one_at: SocketAddr, extra: &str) {
        let text = format!(
            "default = \"{}\"\n[routes]\n\"@one.test\" = \"{one_at}\"\n\"Bob@Two.test\" = \"{}\"\n{extra}",
            self.home.addr, self.two.addr
        );
        let tmp = self.map().with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.map()).unwrap();
    }

    /// A proxy with one routed SMTP STARTTLS listener "mx" (opportunistic).
    async fn proxy(&self) -> Proxy {
        let map = self.map().display().to_string();
        let placeholder = self.home.addr;
        let mx = Listener::new("mx", "smtp", "starttls", placeholder).opportunistic();
        Proxy::start_edited(&[mx], TIMEOUTS, |text| {
            text.replace(&format!("backend = \"{placeholder}\""), &format!("routes = {map:?}"))
        })
        .await
    }
}

/// Connections that carried a client session (PROXY v2 command PROXY), leaving out the
/// probe's own connections (command LOCAL).
fn sessions(backend: &Backend) -> Vec<Seen> {
    (0..backend.connections())
        .map(|i| backend.seen(i))
        .filter(|s| s.header.starts_with(V2_SIGNATURE) && s.header.get(12) == Some(&0x21))
        .collect()
}

fn ssl_tlv(header: &[u8]) -> Option<Vec<u8>> {
    let header = ppp::v2::Header::try_from(header).expect("well-formed PROXY v2 header");
    header
        .tlvs()
        .map(|t| t.expect("well-formed TLV"))
        .find(|t| t.kind == PP2_TYPE_SSL)
        .map(|t| t.value.to_vec())
}

fn source(header: &[u8]) -> ppp::v2::Addresses {
    ppp::v2::Header::try_from(header).expect("well-formed PROXY v2 header").addresses
}

/// Connects and says EHLO until the reply shows what the probe learned from `home`.
async fn mx_ready(proxy: &Proxy) -> Conn<tokio::net::TcpStream> {
    for _ in 0..100 {
        let mut c = proxy.tcp("mx").await;
        assert!(c.line().await.starts_with("220 "));
        c.send("EHLO sender.test\r\n").await;
        let ehlo = c.smtp_reply().await;
        if ehlo.iter().any(|l| l.contains("SIZE 10240000")) {
            assert!(ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the capability probe never reached the default backend");
}

const BODY_ONE: &str = "Subject: for one\r\n\r\nfirst message\r\n..dot-stuffed line\r\n.\r\n";
const BODY_TWO: &str = "Subject: for two\r\n\r\nsecond message\r\n.\r\n";

#[tokio::test]
async fn each_recipient_reaches_only_its_own_server_and_the_others_are_deferred() {
    let site = Site::start().await;
    let proxy = site.proxy().await;
    let mut c = mx_ready(&proxy).await;
    let client = c.stream.local_addr().unwrap();

    // One pipelined batch, mixed destinations: replies in order.
    c.send(
        "MAIL FROM:<sender@sender.test> SIZE=200\r\nRCPT TO:<a@one.test>\r\nRCPT TO:<bob@two.test>\r\n\
         RCPT TO:<C@ONE.test>\r\nRCPT TO:<unknown@one.test>\r\nDATA\r\n",
    )
    .await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    assert!(c.line().await.starts_with("452 4.5.3 "), "bob is deferred");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    assert!(c.line().await.starts_with("550 5.1.1 "), "the server's refusal is relayed");
    assert!(c.line().await.starts_with("354 "));
    c.send(BODY_ONE).await;
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n");

    // The sending MTA's retry of the deferred recipient, in the same session.
    c.send("MAIL FROM:<sender@sender.test> SIZE=200\r\nRCPT TO:<bob@two.test>\r\nDATA\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    assert!(c.line().await.starts_with("354 "));
    c.send(BODY_TWO).await;
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n");
    c.send("QUIT\r\n").await;
    assert_eq!(c.line().await, "221 2.0.0 Bye\r\n");

    assert!(eventually(|| sessions(&site.two).first().is_some_and(|s| s.text().ends_with("QUIT\r\n"))).await);
    let one = sessions(&site.one);
    assert_eq!(one.len(), 1);
    assert_eq!(
        one[0].text(),
        format!(
            "EHLO sender.test\r\nMAIL FROM:<sender@sender.test> SIZE=200\r\nRCPT TO:<a@one.test>\r\n\
             RCPT TO:<C@ONE.test>\r\nRCPT TO:<unknown@one.test>\r\nDATA\r\n{BODY_ONE}QUIT\r\n"
        )
    );
    let two = sessions(&site.two);
    assert_eq!(two.len(), 1);
    assert_eq!(
        two[0].text(),
        format!(
            "EHLO sender.test\r\nMAIL FROM:<sender@sender.test> SIZE=200\r\nRCPT TO:<bob@two.test>\r\n\
             DATA\r\n{BODY_TWO}QUIT\r\n"
        )
    );
    assert!(sessions(&site.home).is_empty(), "nothing was for the default backend");
    for s in one.iter().chain(&two) {
        assert_eq!(source(&s.header), ppp::v2::Addresses::from((client, proxy.addr("mx"))));
        assert_eq!(ssl_tlv(&s.header), None, "a plaintext session claims TLS");
    }

    let text = proxy.metrics.render();
    assert!(text.contains("mailtls_routed_recipients_total{listener=\"mx\",rule=\"domain\"} 3"), "{text}");
    assert!(text.contains("mailtls_routed_recipients_total{listener=\"mx\",rule=\"address\"} 1"), "{text}");
    assert!(text.contains("mailtls_deferred_recipients_total{listener=\"mx\"} 1"), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn after_starttls_every_backend_connection_carries_the_tls_facts() {
    let site = Site::start().await;
    let proxy = site.proxy().await;
    let mut c = mx_ready(&proxy).await;
    c.send("STARTTLS\r\n").await;
    assert_eq!(c.line().await, "220 2.0.0 Ready to start TLS\r\n");
    let mut t = c.upgrade(&proxy.certs).await;
    t.send("EHLO sender.test\r\n").await;
    let ehlo = t.smtp_reply().await;
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS") || l.contains("AUTH")), "{ehlo:?}");
    for (rcpt, body) in [("x@one.test", BODY_ONE), ("bob@two.test", BODY_TWO), ("z@elsewhere.test", BODY_TWO)]
    {
        t.send(format!("MAIL FROM:<>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")).await;
        assert_eq!(t.line().await, "250 2.1.0 Ok\r\n");
        assert_eq!(t.line().await, "250 2.0.0 Ok\r\n", "{rcpt}");
        assert!(t.line().await.starts_with("354 "));
        t.send(body).await;
        assert_eq!(t.line().await, "250 2.0.0 Ok: queued as TEST\r\n");
    }
    t.send("QUIT\r\n").await;
    assert_eq!(t.line().await, "221 2.0.0 Bye\r\n");
    for (name, backend, rcpt) in [
        ("one", &site.one, "x@one.test"),
        ("two", &site.two, "bob@two.test"),
        ("home", &site.home, "z@elsewhere.test"),
    ] {
        assert!(eventually(|| sessions(backend).len() == 1).await, "{name}");
        let s = &sessions(backend)[0];
        assert!(
            s.text().starts_with(&format!("EHLO sender.test\r\nMAIL FROM:<>\r\nRCPT TO:<{rcpt}>\r\n")),
            "{name}"
        );
        let ssl = ssl_tlv(&s.header).unwrap_or_else(|| panic!("{name}: no PP2_TYPE_SSL after STARTTLS"));
        assert_eq!(ssl[0] & 0x01, 0x01, "{name}: PP2_CLIENT_SSL not set");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_server_that_is_down_fails_only_its_recipients_and_the_session_goes_on() {
    let site = Site::start().await;
    let down = Backend::unreachable().await;
    site.write_map(site.one.addr, &format!("\"@down.test\" = \"{down}\"\n"));
    let proxy = site.proxy().await;
    let mut c = mx_ready(&proxy).await;
    c.send("MAIL FROM:<s@sender.test>\r\nRCPT TO:<x@down.test>\r\nRCPT TO:<a@one.test>\r\nDATA\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    assert!(c.line().await.starts_with("451 4.4.1 "), "the down server's recipient is deferred");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    assert!(c.line().await.starts_with("354 "));
    c.send(BODY_ONE).await;
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n");
    assert_eq!(Metrics::get(&proxy.metrics.backend_failures), 1);
    assert!(eventually(|| sessions(&site.one).len() == 1).await);
    assert!(!sessions(&site.one)[0].text().contains("down.test"));
    proxy.stop().await;
}

#[tokio::test]
async fn the_map_a_transaction_started_with_stays_for_it_across_a_reload() {
    let site = Site::start().await;
    let proxy = site.proxy().await;
    let mut c = mx_ready(&proxy).await;
    c.send("MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@one.test>\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    // @one.test moves to two; the open transaction still routes it to one.
    site.write_map(site.two.addr, "");
    assert!(eventually(|| Metrics::get(&proxy.metrics.route_reloads_ok) == 1).await, "no reload");
    c.send("RCPT TO:<b@one.test>\r\nDATA\r\n").await;
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n", "the transaction's map moved under it");
    assert!(c.line().await.starts_with("354 "));
    c.send(BODY_ONE).await;
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n");
    // The next transaction takes the new map.
    c.send("MAIL FROM:<s@sender.test>\r\nRCPT TO:<c@one.test>\r\nQUIT\r\n").await;
    assert_eq!(c.line().await, "250 2.1.0 Ok\r\n");
    assert_eq!(c.line().await, "250 2.0.0 Ok\r\n");
    assert_eq!(c.line().await, "221 2.0.0 Bye\r\n");
    assert!(eventually(|| sessions(&site.two).len() == 1).await);
    assert!(sessions(&site.two)[0].text().contains("RCPT TO:<c@one.test>\r\n"));
    let one = sessions(&site.one);
    assert_eq!(one.len(), 1);
    assert!(one[0].text().contains("RCPT TO:<a@one.test>\r\nRCPT TO:<b@one.test>\r\n"));
    proxy.stop().await;
}

#[tokio::test]
async fn plaintext_auth_is_refused_and_bare_newlines_never_reach_a_routed_backend() {
    let site = Site::start().await;
    let proxy = site.proxy().await;
    let mut c = mx_ready(&proxy).await;
    c.send("AUTH PLAIN AGFAYg==\r\n").await;
    assert_eq!(c.line().await, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    c.send("MAIL FROM:<s@sender.test>\r\nRCPT TO:<a@one.test>\r\nDATA\r\n").await;
    for _ in 0..2 {
        assert!(c.line().await.starts_with("250 "));
    }
    assert!(c.line().await.starts_with("354 "));
    c.send("smuggled\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@one.test>\r\n.\r\n").await;
    assert_eq!(c.line().await, "250 2.0.0 Ok: queued as TEST\r\n");
    assert!(eventually(|| sessions(&site.one).first().is_some_and(|s| s.text().ends_with("QUIT\r\n"))).await);
    let text = sessions(&site.one)[0].text();
    assert!(!text.contains("AUTH"), "{text:?}");
    assert!(
        !text.as_bytes().windows(2).any(|w| (w[0] == b'\r') != (w[1] == b'\n')),
        "bare line ending: {text:?}"
    );
    assert_eq!(text.matches("MAIL FROM").count(), 2, "the smuggled MAIL stayed inside the body: {text:?}");
    proxy.stop().await;
}
