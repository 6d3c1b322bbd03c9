//! A tab where the protocols put a space: `STLS<TAB>` or `a STARTTLS<TAB>` inside TLS is
//! still the STARTTLS command, answered locally and never forwarded (it used to pass as an
//! unknown command and reach the backend), on every protocol.

mod common;

use common::*;

/// After TLS, each `command` is refused by mailtls (a reply containing `refusal`), the
/// session goes on with `then` (answered `expect`), and the backend saw only `then`.
async fn refused_locally(
    protocol: &'static str,
    script: Script,
    commands: &[&str],
    refusal: &str,
    then: &str,
    expect: &str,
) {
    let backend = Backend::start(script).await;
    let proxy = Proxy::start(&[Listener::new("implicit", protocol, "implicit", backend.addr)]).await;
    let mut t = proxy.tls("implicit").await;
    let greeting = t.line().await;
    assert!(!greeting.is_empty(), "no greeting");
    for command in commands {
        t.send(command).await;
        let reply = t.line().await;
        assert!(reply.contains(refusal), "{protocol}: {command:?} -> {reply:?}");
    }
    t.send(then).await;
    let reply = t.line().await;
    assert!(reply.starts_with(expect), "{protocol}: session did not continue: {reply:?}");
    assert_eq!(backend.seen(0).text(), then, "{protocol}: a STARTTLS reached the backend");
    proxy.stop().await;
}

#[tokio::test]
async fn pop3_stls_followed_by_a_tab_is_refused_locally_after_tls() {
    refused_locally("pop3", Script::Pop3, &["STLS\t\r\n", "stls\tnow\r\n"], "-ERR", "USER u\r\n", "+OK")
        .await;
}

#[tokio::test]
async fn imap_starttls_followed_by_a_tab_is_refused_locally_after_tls() {
    let commands = ["a STARTTLS\t\r\n", "b\tSTARTTLS\r\n"];
    refused_locally("imap", Script::Imap, &commands, " BAD ", "c NOOP\r\n", "c OK").await;
}

#[tokio::test]
async fn smtp_starttls_followed_by_a_tab_is_refused_locally_after_tls() {
    let backend = Backend::start(Script::Smtp).await;
    let proxy = Proxy::start(&[Listener::new("implicit", "smtp", "implicit", backend.addr)]).await;
    let mut t = proxy.tls("implicit").await;
    t.smtp_reply().await;
    t.send("EHLO t\r\n").await;
    t.smtp_reply().await;
    for command in ["STARTTLS\t\r\n", "starttls\tx\r\n"] {
        t.send(command).await;
        let reply = t.line().await;
        assert!(reply.starts_with('5'), "{command:?} -> {reply:?}");
    }
    t.send("NOOP\r\n").await;
    assert!(t.line().await.starts_with("250"), "session did not continue");
    assert_eq!(backend.seen(0).text(), "EHLO t\r\nNOOP\r\n", "STARTTLS was forwarded");
    proxy.stop().await;
}
