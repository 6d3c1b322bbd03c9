//! Per-user routing on IMAP and POP3 listeners (`routes = "PATH"`): every login form lands
//! on the backend the map names, credentials intact, and nothing reaches the other backends.
//!
//! Three recording backends: `home` (the map's default), `alice` (one address) and `corp`
//! (a domain). Map reloads, a broken map, and an unreachable routed backend are covered too.

mod common;

use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailtls::metrics::Metrics;
use mailtls::server::Control;

const TIMEOUTS: &str = "[timeouts]\nhandshake = 2\ndrain = 1\n";

/// The three backends and the map file that routes between them.
struct Site {
    home: Backend,
    alice: Backend,
    corp: Backend,
    dir: tempfile::TempDir,
}

impl Site {
    async fn start(script: Script) -> Site {
        let site = Site {
            home: Backend::start(script).await,
            alice: Backend::start(script).await,
            corp: Backend::start(script).await,
            dir: tempfile::tempdir().unwrap(),
        };
        site.write_map(site.alice.addr);
        site
    }

    fn map(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    /// alice@example.org to `alice_at`, @example.com to corp, everyone else home.
    fn write_map(&self, alice_at: SocketAddr) {
        let text = format!(
            "default = \"{}\"\n[routes]\n\"alice@example.org\" = \"{alice_at}\"\n\"@Example.COM\" = \"{}\"\n",
            self.home.addr, self.corp.addr
        );
        write_atomically(&self.map(), &text);
    }

    /// A proxy with one routed listener `name` (protocol and TLS mode as given).
    async fn proxy(&self, name: &'static str, protocol: &'static str, tls: &'static str) -> Proxy {
        let map = self.map().display().to_string();
        let placeholder = self.home.addr;
        Proxy::start_edited(&[Listener::new(name, protocol, tls, placeholder)], TIMEOUTS, |text| {
            text.replace(&format!("backend = \"{placeholder}\""), &format!("routes = {map:?}"))
        })
        .await
    }

    /// The backends that saw `needle` (the home backend's capability probes included).
    fn holders(&self, needle: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (name, b) in [("home", &self.home), ("alice", &self.alice), ("corp", &self.corp)] {
            if b.all_text().contains(needle) {
                out.push(name);
            }
        }
        out
    }
}

/// Replaces the file in one step, as editors and config management do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// Waits until the routed listener's greeting shows what the probe learned from `home`.
async fn imaps_ready(proxy: &Proxy) -> Conn<TlsClient> {
    for _ in 0..100 {
        let mut c = proxy.tls("imaps").await;
        let greeting = c.line().await;
        if greeting.contains("SASL-IR") {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the capability probe never reached the default backend");
}

#[tokio::test]
async fn imap_logins_of_every_form_land_on_the_backend_the_map_names() {
    let site = Site::start(Script::Imap).await;
    let proxy = site.proxy("imaps", "imap", "implicit").await;

    // Before login mailtls answers for the default backend: its list, filtered.
    let mut c = imaps_ready(&proxy).await;
    c.send("a CAPABILITY\r\n").await;
    assert_eq!(c.line().await, "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN IDLE\r\n");
    assert_eq!(c.line().await, "a OK CAPABILITY completed\r\n");
    c.send("b NOOP\r\nc ID NIL\r\n").await;
    assert_eq!(c.line().await, "b OK NOOP completed\r\n");
    assert_eq!(c.line().await, "* ID NIL\r\n");
    assert_eq!(c.line().await, "c OK ID completed\r\n");
    assert_eq!(site.alice.connections() + site.corp.connections(), 0, "no backend chosen yet");

    // By address, atom form.
    c.send("d LOGIN alice@example.org pw-atom\r\n").await;
    assert!(c.line().await.starts_with("d OK [CAPABILITY IMAP4rev1 IDLE] Logged in"));
    c.send("e NOOP\r\n").await;
    assert_eq!(c.line().await, "e OK NOOP completed\r\n", "relayed after login");
    assert_eq!(site.alice.seen(0).text(), "d LOGIN \"alice@example.org\" \"pw-atom\"\r\ne NOOP\r\n");
    assert_eq!(site.holders("pw-atom"), ["alice"]);

    // By domain (case-insensitive), quoted form with escapes.
    let mut c = proxy.tls("imaps").await;
    c.line().await;
    c.send("f LOGIN \"Carol@example.COM\" \"pw \\\"quoted\\\"\"\r\n").await;
    assert!(c.line().await.starts_with("f OK"));
    assert!(site.corp.all_text().contains("f LOGIN \"Carol@example.COM\" \"pw \\\"quoted\\\"\"\r\n"));
    assert_eq!(site.holders("quoted"), ["corp"]);

    // By default, synchronizing literals: mailtls itself sends the continuations.
    let mut c = proxy.tls("imaps").await;
    c.line().await;
    c.send("g LOGIN {14}\r\n").await;
    assert_eq!(c.line().await, "+ Ready for literal data\r\n");
    c.send("dave@other.net {10}\r\n").await;
    assert_eq!(c.line().await, "+ Ready for literal data\r\n");
    c.send("pw-literal\r\n").await;
    assert!(c.line().await.starts_with("g OK"));
    assert!(site.home.all_text().contains("g LOGIN \"dave@other.net\" \"pw-literal\"\r\n"));
    assert_eq!(site.holders("pw-literal"), ["home"]);

    // By address again, whatever its case, non-synchronizing literals (LITERAL+).
    let mut c = proxy.tls("imaps").await;
    c.line().await;
    c.send("h LOGIN {17+}\r\nALICE@Example.Org {8+}\r\npw-plus!\r\n").await;
    assert!(c.line().await.starts_with("h OK"));
    assert_eq!(site.holders("pw-plus!"), ["alice"]);

    // AUTHENTICATE PLAIN with SASL-IR, by domain.
    let bob = plain("bob@example.com", "pw-ir");
    let mut c = proxy.tls("imaps").await;
    c.line().await;
    c.send(format!("i AUTHENTICATE PLAIN {bob}\r\n")).await;
    assert_eq!(c.line().await, "i OK Logged in\r\n");
    assert!(site.corp.all_text().contains(&format!("i AUTHENTICATE PLAIN\r\n{bob}\r\n")));
    assert_eq!(site.holders(&bob), ["corp"]);

    // AUTHENTICATE PLAIN without SASL-IR: mailtls sends the `+ ` and reads the response.
    let alice = plain("alice@example.org", "pw-sasl");
    let mut c = proxy.tls("imaps").await;
    c.line().await;
    c.send("j AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ \r\n");
    c.send(format!("{alice}\r\n")).await;
    assert_eq!(c.line().await, "j OK Logged in\r\n");
    assert_eq!(c.silent_for(Duration::from_millis(200)).await, None, "the backend's `+` is swallowed");
    assert_eq!(site.holders(&alice), ["alice"]);

    let text = proxy.metrics.render();
    for (rule, n) in [("address", 3), ("domain", 2), ("default", 1)] {
        let line = format!("mailtls_routed_logins_total{{listener=\"imaps\",rule=\"{rule}\"}} {n}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn after_starttls_malformed_identifications_get_bad_and_a_login_routes() {
    let site = Site::start(Script::Imap).await;
    let proxy = site.proxy("imap", "imap", "starttls").await;
    let mut c = proxy.tcp("imap").await;
    c.line().await;
    c.send("a STARTTLS\r\n").await;
    assert_eq!(c.line().await, "a OK Begin TLS negotiation now\r\n");
    let mut c = c.upgrade(&proxy.certs).await;
    assert_eq!(c.silent_for(Duration::from_millis(200)).await, None, "no second greeting after STARTTLS");
    c.send("b LOGIN alice\r\n").await;
    assert_eq!(c.line().await, "b BAD Invalid arguments to LOGIN\r\n");
    c.send("c AUTHENTICATE PLAIN bm9wZQ==\r\n").await;
    assert_eq!(c.line().await, "c BAD Invalid SASL PLAIN response\r\n");
    c.send("d STARTTLS\r\n").await;
    assert_eq!(c.line().await, "d BAD TLS is already active\r\n");
    // (A refused login, routed afresh, is the real-Dovecot interop test's: this backend
    // accepts every password.)
    c.send("e LOGIN carol@example.com pw\r\n").await;
    assert!(c.line().await.starts_with("e OK"));
    assert_eq!(site.alice.connections(), 0);
    assert_eq!(site.corp.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn pop3_user_and_auth_plain_land_on_the_backend_the_map_names() {
    let site = Site::start(Script::Pop3).await;
    let proxy = site.proxy("pop3s", "pop3", "implicit").await;

    // CAPA answers for the default backend once the probe has run (a session takes what
    // was learned when it began).
    let mut capa = Vec::new();
    let mut c = proxy.tls("pop3s").await;
    for _ in 0..100 {
        c = proxy.tls("pop3s").await;
        assert_eq!(c.line().await, "+OK mx.test POP3 ready\r\n");
        c.send("CAPA\r\n").await;
        capa = c.lines_until(|l| l == ".\r\n").await;
        if capa.iter().any(|l| l == "TOP\r\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(capa.join(""), "+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nUSER\r\nSASL PLAIN\r\n.\r\n");

    // USER/PASS by address.
    c.send("USER alice@example.org\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    c.send("PASS pw-pop-user\r\n").await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    c.send("STAT\r\n").await;
    assert_eq!(c.line().await, "+OK 0 0\r\n");
    assert_eq!(site.alice.seen(0).text(), "USER alice@example.org\r\nPASS pw-pop-user\r\nSTAT\r\n");
    assert_eq!(site.holders("pw-pop-user"), ["alice"]);

    // AUTH PLAIN with an initial response, by domain.
    let bob = plain("bob@example.com", "pw-pop-ir");
    let mut c = proxy.tls("pop3s").await;
    c.line().await;
    c.send(format!("AUTH PLAIN {bob}\r\n")).await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    assert_eq!(site.corp.seen(0).text(), format!("AUTH PLAIN\r\n{bob}\r\n"));

    // AUTH PLAIN without one, by default.
    let dave = plain("dave", "pw-pop-sasl");
    let mut c = proxy.tls("pop3s").await;
    c.line().await;
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ \r\n");
    c.send(format!("{dave}\r\n")).await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    assert_eq!(site.holders(&dave), ["home"]);
    assert_eq!(site.holders(&bob), ["corp"]);
    proxy.stop().await;
}

#[tokio::test]
async fn pop3_after_stls_routes_without_a_second_greeting() {
    let site = Site::start(Script::Pop3).await;
    let proxy = site.proxy("pop3", "pop3", "starttls").await;
    let mut c = proxy.tcp("pop3").await;
    c.line().await;
    c.send("STLS\r\n").await;
    assert_eq!(c.line().await, "+OK Begin TLS negotiation\r\n");
    let mut c = c.upgrade(&proxy.certs).await;
    c.send("USER Erin@EXAMPLE.com\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n");
    c.send("PASS pw-stls\r\n").await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    assert_eq!(site.holders("pw-stls"), ["corp"]);
    proxy.stop().await;
}

#[tokio::test]
async fn a_map_change_moves_new_logins_and_a_broken_map_is_refused() {
    let site = Site::start(Script::Imap).await;
    let proxy = site.proxy("imaps", "imap", "implicit").await;

    // An open session of alice's, relaying (echo) on her backend.
    let mut open = proxy.tls("imaps").await;
    open.line().await;
    open.send("a LOGIN alice@example.org x\r\n").await;
    assert!(open.line().await.starts_with("a OK"));
    // The scripted backend echoes only for user "echo"; NOOP proves the relay instead.
    open.send("b NOOP\r\n").await;
    assert_eq!(open.line().await, "b OK NOOP completed\r\n");

    // Move alice to the corp backend: the watcher reloads the map by itself.
    site.write_map(site.corp.addr);
    assert!(eventually(|| Metrics::get(&proxy.metrics.route_reloads_ok) == 1).await, "no reload");
    let mut moved = proxy.tls("imaps").await;
    moved.line().await;
    moved.send("c LOGIN alice@example.org pw-moved\r\n").await;
    assert!(moved.line().await.starts_with("c OK"));
    assert_eq!(site.holders("pw-moved"), ["corp"]);

    // The open session is untouched: still on alice's backend.
    open.send("d NOOP\r\n").await;
    assert_eq!(open.line().await, "d OK NOOP completed\r\n");
    assert!(site.alice.seen(0).text().ends_with("d NOOP\r\n"));
    assert_eq!(site.alice.connections(), 1);

    // A broken map is refused, counted, and the last good one stays.
    write_atomically(&site.map(), "default = \"nowhere\"\n[routes]\n\"alice@example.org\" = 5\n");
    assert!(eventually(|| Metrics::get(&proxy.metrics.route_reloads_failed) == 1).await, "not refused");
    let mut still = proxy.tls("imaps").await;
    still.line().await;
    still.send("e LOGIN alice@example.org pw-kept\r\n").await;
    assert!(still.line().await.starts_with("e OK"));
    assert_eq!(site.holders("pw-kept"), ["corp"]);
    let text = proxy.metrics.render();
    assert!(text.contains("mailtls_route_reloads_total{outcome=\"ok\"} 1"), "{text}");
    assert!(text.contains("mailtls_route_reloads_total{outcome=\"failed\"} 1"), "{text}");
    proxy.stop().await;
}

/// A file rewritten every 100 ms beside the map must not hold back its reload: the moved
/// route is used within 5 s (the test's patience; the watcher's bound is 2 s).
#[tokio::test]
async fn a_map_change_lands_while_a_file_beside_it_is_rewritten_every_100ms() {
    let site = Site::start(Script::Imap).await;
    let busy = common::busy::BusyNeighbour::start(&site.dir.path().join("routes.log"));
    let proxy = site.proxy("imaps", "imap", "implicit").await;
    // Greeted once: the proxy (and its watcher) is running.
    imaps_ready(&proxy).await;
    site.write_map(site.corp.addr);
    assert!(eventually(|| Metrics::get(&proxy.metrics.route_reloads_ok) == 1).await, "no reload within 5 s");
    let writes = busy.stop();
    eprintln!("map reloaded beside a busy file ({writes} neighbour writes)");
    let mut moved = proxy.tls("imaps").await;
    moved.line().await;
    moved.send("a LOGIN alice@example.org pw-moved\r\n").await;
    assert!(moved.line().await.starts_with("a OK"));
    assert_eq!(site.holders("pw-moved"), ["corp"]);
    proxy.stop().await;
}

#[tokio::test]
async fn an_unreachable_routed_backend_answers_unavailable_and_a_retry_works_once_it_is_up() {
    let site = Site::start(Script::Imap).await;
    let down = Backend::unreachable().await;
    site.write_map(down);
    let proxy = site.proxy("imaps", "imap", "implicit").await;
    let mut c = proxy.tls("imaps").await;
    c.line().await;
    c.send("a LOGIN alice@example.org pw-down\r\n").await;
    assert_eq!(c.line().await, "a NO [UNAVAILABLE] Backend server unavailable, try again later\r\n");
    assert_eq!(Metrics::get(&proxy.metrics.backend_failures), 1);
    // The session stays in its pre-login state: other users and retries go on.
    c.send("b NOOP\r\n").await;
    assert_eq!(c.line().await, "b OK NOOP completed\r\n");
    let up = Backend::start_at(Script::Imap, down).await;
    c.send("c LOGIN alice@example.org pw-up\r\n").await;
    assert!(c.line().await.starts_with("c OK"));
    assert!(up.all_text().contains("c LOGIN \"alice@example.org\" \"pw-up\"\r\n"));
    assert!(site.holders("pw-down").is_empty() && site.holders("pw-up").is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn an_unreachable_routed_pop3_backend_answers_sys_temp() {
    let site = Site::start(Script::Pop3).await;
    let down = Backend::unreachable().await;
    site.write_map(down);
    let proxy = site.proxy("pop3s", "pop3", "implicit").await;
    let mut c = proxy.tls("pop3s").await;
    c.line().await;
    c.send("USER alice@example.org\r\n").await;
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] Backend server unavailable, try again later\r\n");
    c.send("USER carol@example.com\r\n").await;
    assert_eq!(c.line().await, "+OK\r\n", "another user, another backend, same session");
    c.send("PASS pw\r\n").await;
    assert_eq!(c.line().await, "+OK Logged in.\r\n");
    proxy.stop().await;
}

#[tokio::test]
async fn a_broken_map_stops_the_start_with_file_line_and_key() {
    let certs = certs();
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("routes.toml");
    std::fs::write(&map, "default = \"127.0.0.1:143\"\n[routes]\n\"@example.org\" = \"nope\"\n").unwrap();
    let placeholder: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let text = config_text(&certs, &[Listener::new("imaps", "imap", "implicit", placeholder)], "").replace(
        &format!("backend = \"{placeholder}\""),
        &format!("routes = {:?}", map.display().to_string()),
    );
    let config = mailtls::config::parse(&certs.dir.path().join("mailtls.toml"), &text).unwrap();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let e = match mailtls::server::Server::bind(config) {
        Ok(_) => panic!("a broken map must stop the start"),
        Err(e) => e.to_string(),
    };
    let expected = format!("{}:3: routes.\"@example.org\": \"nope\" is not host:port", map.display());
    assert!(e.contains("listeners[0].routes: ") && e.ends_with(&expected), "{e}");
}

// A configuration reload (SIGHUP, systemctl reload) takes a listener's new routes file:
// new logins follow the new map, while a session routed before stays where it was.
#[tokio::test]
async fn a_config_reload_takes_a_new_routes_file() {
    let site = Site::start(Script::Imap).await;
    let proxy = site.proxy("imaps", "imap", "implicit").await;
    let mut before = imaps_ready(&proxy).await;
    before.send("a LOGIN alice@example.org pw-before\r\n").await;
    assert!(before.line().await.starts_with("a OK"));
    assert_eq!(site.holders("pw-before"), ["alice"]);

    // A second map elsewhere sends alice to corp; only the config names it. The watcher
    // of the first map sees nothing change, so only the reload can move her.
    let second = site.dir.path().join("second.toml");
    let text = format!(
        "default = \"{}\"\n[routes]\n\"alice@example.org\" = \"{}\"\n",
        site.home.addr, site.corp.addr
    );
    write_atomically(&second, &text);
    let config = std::fs::read_to_string(proxy.config_path()).unwrap();
    let first = format!("routes = {:?}", site.map().display().to_string());
    assert!(config.contains(&first), "{config}");
    let edited = config.replace(&first, &format!("routes = {:?}", second.display().to_string()));
    std::fs::write(proxy.config_path(), edited).unwrap();
    proxy.control.send(Control::Reload).await.unwrap();

    let mut moved_to_corp = false;
    for attempt in 0..50 {
        let mut c = proxy.tls("imaps").await;
        c.line().await;
        let password = format!("pw-after-{attempt}");
        c.send(format!("b LOGIN alice@example.org {password}\r\n")).await;
        assert!(c.line().await.starts_with("b OK"));
        if site.holders(&password) == ["corp"] {
            moved_to_corp = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved_to_corp, "the reloaded config's routes file was never used");
    before.send("c NOOP\r\n").await;
    assert_eq!(before.line().await, "c OK NOOP completed\r\n");
    // Its first connection: logins racing the reload may have reached alice's backend too.
    assert!(site.alice.seen(0).text().ends_with("c NOOP\r\n"), "the open session stayed on alice's backend");
    proxy.stop().await;
}
