//! Bulk transfer through the relay: 1 MiB each way intact on every port role, half-close
//! propagated, many concurrent sessions, and the idle timeouts before and after login.

mod common;

use common::roles::*;
use common::*;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Barrier};

/// A proxy with one listener for `role` in front of a fresh scripted backend.
async fn setup(role: Role, extra: &str) -> (Backend, Proxy) {
    let backend = Backend::start(role.script()).await;
    let proxy = Proxy::start_with(&[role.listener(&backend)], extra).await;
    (backend, proxy)
}

/// One role: log in as echo, 1 MiB through each way, the backend saw it all.
async fn one_mib_each_way(role: Role) {
    let (backend, proxy) = setup(role, "").await;
    let stream = open_echo(&proxy, role).await;
    let data = Arc::new(payload(MIB, role as u64 + 1));
    let got = echo_round_trip(stream, data.clone()).await;
    assert_same(&got, &data, &format!("{role:?} echo"));
    // The backend recorded all of it after the login dialogue (the MX listener's EHLO
    // probe may own another connection: look at the one that carried the session).
    let carried = (0..backend.connections()).map(|i| backend.seen(i).data).find(|d| d.len() >= MIB);
    let carried = carried.expect("a backend connection carried the payload");
    assert_same(&carried[carried.len() - MIB..], &data, &format!("{role:?} bytes at the backend"));
    proxy.stop().await;
}

#[tokio::test]
async fn submissions_465_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::Submissions).await;
}

#[tokio::test]
async fn submission_587_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::Submission).await;
}

#[tokio::test]
async fn mx_25_after_starttls_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::MxStarttls).await;
}

#[tokio::test]
async fn mx_25_plaintext_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::MxPlaintext).await;
}

#[tokio::test]
async fn imaps_993_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::Imaps).await;
}

#[tokio::test]
async fn imap_143_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::Imap).await;
}

#[tokio::test]
async fn pop3s_995_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::Pop3s).await;
}

#[tokio::test]
async fn pop3_110_relays_one_mib_each_way_intact() {
    one_mib_each_way(Role::Pop3).await;
}

// ---- half-close ---------------------------------------------------------------------------

/// The tail of the echo the reader leaves unread until the client has shut down its write
/// side: small enough to sit in socket buffers, so the writer can finish meanwhile.
const TAIL: usize = 48 * 1024;

/// Sends 1 MiB, then shuts down the write side (TLS close_notify + FIN) while the last
/// TAIL bytes of the echo are still unread; those must still arrive, followed by EOF.
async fn half_close_propagates(role: Role) {
    let (backend, proxy) = setup(role, "").await;
    let stream = open_echo(&proxy, role).await;
    let data = Arc::new(payload(MIB, 0x4A1F + role as u64));
    let (mut rx, mut tx) = tokio::io::split(stream);
    let (shut_tx, shut_rx) = oneshot::channel::<()>();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(6007) {
            tx.write_all(chunk).await?;
        }
        tx.shutdown().await?;
        let _ = shut_tx.send(());
        Ok::<_, std::io::Error>(tx)
    });
    let reading = async {
        let mut head = vec![0u8; MIB - TAIL];
        rx.read_exact(&mut head).await.expect("echo before the shutdown");
        shut_rx.await.expect("the writer shut down its side");
        // Everything from here on arrives after the client's own shutdown.
        let mut tail = Vec::new();
        rx.read_to_end(&mut tail).await.expect("echo after the shutdown, then a clean EOF");
        (head, tail)
    };
    let (head, tail) = tokio::time::timeout(BULK_PATIENCE, reading)
        .await
        .unwrap_or_else(|_| panic!("{role:?}: echo or EOF missing after the client's half-close"));
    let _tx = writer.await.expect("writer task").expect("writing and shutting down");
    assert_eq!(tail.len(), TAIL, "{role:?}: bytes received after the client's shutdown");
    let mut got = head;
    got.extend_from_slice(&tail);
    assert_same(&got, &data, &format!("{role:?} echo across the half-close"));
    assert!(
        (0..backend.connections()).any(|i| backend.seen(i).data.ends_with(&data)),
        "{role:?}: the backend did not receive the whole payload"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn submissions_465_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::Submissions).await;
}

#[tokio::test]
async fn submission_587_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::Submission).await;
}

#[tokio::test]
async fn mx_25_after_starttls_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::MxStarttls).await;
}

#[tokio::test]
async fn mx_25_plaintext_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::MxPlaintext).await;
}

#[tokio::test]
async fn imaps_993_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::Imaps).await;
}

#[tokio::test]
async fn imap_143_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::Imap).await;
}

#[tokio::test]
async fn pop3s_995_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::Pop3s).await;
}

#[tokio::test]
async fn pop3_110_half_close_still_delivers_echo_then_eof() {
    half_close_propagates(Role::Pop3).await;
}

// ---- many at once ---------------------------------------------------------------------------

/// Port 0 asks the kernel for a fresh port per socket: two listeners on "127.0.0.1:0" do
/// not collide, and the harness (and the 100-session test below) depends on it.
#[tokio::test]
async fn two_listeners_on_port_zero_both_bind() {
    let config = config_text(
        &certs(),
        &[
            Listener::new("imaps", "imap", "implicit", Backend::unreachable().await),
            Listener::new("submission", "smtp", "starttls", Backend::unreachable().await),
        ],
        "",
    );
    let parsed = mailtls::config::parse(std::path::Path::new("/tmp/mailtls.toml"), &config);
    let parsed = parsed.unwrap_or_else(|e| panic!("two port-0 listeners refused: {e}"));
    assert_eq!(parsed.listeners.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_sessions_each_log_in_and_echo_64k() {
    const SESSIONS: usize = 100;
    let imap_backend = Backend::start(Script::Imap).await;
    let smtp_backend = Backend::start(Script::Smtp).await;
    let proxy = Arc::new(
        Proxy::start(&[Role::Imaps.listener(&imap_backend), Role::Submission.listener(&smtp_backend)]).await,
    );
    // Every session logs in, then waits until all are logged in, so all 100 are open at once.
    let all_in = Arc::new(Barrier::new(SESSIONS));
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let (proxy, all_in) = (proxy.clone(), all_in.clone());
        let role = if i % 2 == 0 { Role::Imaps } else { Role::Submission };
        tasks.push(tokio::spawn(async move {
            let stream = open_echo(&proxy, role).await;
            tokio::time::timeout(BULK_PATIENCE, all_in.wait())
                .await
                .expect("all sessions logged in together");
            let data = Arc::new(payload(64 * 1024, 1000 + i as u64));
            let got = echo_round_trip(stream, data.clone()).await;
            assert_same(&got, &data, &format!("session {i} ({role:?})"));
        }));
    }
    let mut failed = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if let Err(e) = tokio::time::timeout(BULK_PATIENCE, task).await.expect("session finished in time") {
            failed.push(format!("session {i}: {e}"));
        }
    }
    assert!(failed.is_empty(), "{} of {SESSIONS} sessions failed: {failed:#?}", failed.len());
    assert_eq!(imap_backend.connections(), SESSIONS / 2);
    assert_eq!(smtp_backend.connections(), SESSIONS / 2);
    assert_eq!(imap_backend.connections() + smtp_backend.connections(), SESSIONS);
    Arc::try_unwrap(proxy).ok().expect("sessions are done with the proxy").stop().await;
}

// ---- idle timeouts ----------------------------------------------------------------------------

const SHORT_IDLE: &str = "[timeouts]\nidle = 1\ndrain = 1\n";

#[tokio::test]
async fn silent_echo_session_is_closed_by_idle_timeout() {
    let (_backend, proxy) = setup(Role::Imaps, SHORT_IDLE).await;
    let mut c = Conn::new(open_echo(&proxy, Role::Imaps).await);
    c.send("still here\r\n").await;
    assert_eq!(c.line().await, "still here\r\n");
    assert!(c.closed_within(Duration::from_secs(3)).await, "an idle relay outlived idle = 1 s by 2 s");
    proxy.stop().await;
}

#[tokio::test]
async fn echo_session_with_traffic_outlives_idle_timeout() {
    let (_backend, proxy) = setup(Role::Pop3s, SHORT_IDLE).await;
    let mut c = Conn::new(open_echo(&proxy, Role::Pop3s).await);
    // 2.4 s of traffic every 400 ms: longer than idle = 1 s in total, never silent that long.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let line = format!("tick {i}\r\n");
        c.send(&line).await;
        assert_eq!(c.line().await, line, "the session was cut although it was busy");
    }
    assert!(c.closed_within(Duration::from_secs(3)).await, "silent at last, it should be closed");
    proxy.stop().await;
}

const SHORT_PRE_AUTH: &str = "[timeouts]\npre_auth_idle = 1\ndrain = 1\n";

/// A silent client on a STARTTLS listener gets the protocol's farewell and is closed; the
/// backend is never contacted.
async fn pre_tls_silence_gets_farewell(role: Role, farewell: &str) {
    let (backend, proxy) = setup(role, SHORT_PRE_AUTH).await;
    let mut c = proxy.tcp(role.name()).await;
    c.line().await; // greeting
    let bye = c.try_line(Duration::from_secs(3)).await;
    let bye = bye.unwrap_or_else(|| panic!("{role:?}: no farewell within 3 s of silence"));
    assert!(bye.starts_with(farewell), "{role:?}: {bye:?}");
    assert!(c.closed_within(Duration::from_secs(1)).await, "{role:?}: not closed after the farewell");
    assert_eq!(backend.connections(), 0, "{role:?}: the backend was contacted");
    proxy.stop().await;
}

#[tokio::test]
async fn silent_pre_tls_smtp_gets_421_4_4_2_after_pre_auth_idle() {
    pre_tls_silence_gets_farewell(Role::Submission, "421 4.4.2").await;
}

#[tokio::test]
async fn silent_pre_tls_imap_gets_bye_after_pre_auth_idle() {
    pre_tls_silence_gets_farewell(Role::Imap, "* BYE").await;
}

#[tokio::test]
async fn silent_pre_tls_pop3_gets_err_after_pre_auth_idle() {
    pre_tls_silence_gets_farewell(Role::Pop3, "-ERR").await;
}

/// After TLS but before login (the negotiation phase) the same bound applies.
#[tokio::test]
async fn silent_imaps_before_login_gets_bye_after_pre_auth_idle() {
    let (backend, proxy) = setup(Role::Imaps, SHORT_PRE_AUTH).await;
    let mut c = proxy.tls("imaps").await;
    assert!(c.line().await.starts_with("* OK"));
    let bye = c.try_line(Duration::from_secs(3)).await.expect("a farewell within 3 s of silence");
    assert!(bye.starts_with("* BYE"), "{bye:?}");
    assert!(c.closed_within(Duration::from_secs(1)).await);
    assert_eq!(backend.seen(0).text(), "", "nothing was sent for the silent client");
    proxy.stop().await;
}

/// Sends one byte of an endless line every 300 ms until the connection closes; the time
/// it took. A slowloris client must not buy time byte by byte.
async fn drip_until_closed<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        if c.stream.write_all(b"A").await.is_err() || c.stream.flush().await.is_err() {
            return started.elapsed();
        }
        if c.closed_within(Duration::from_millis(300)).await {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(6), "a dripping client was kept for 6 s");
    }
}

#[tokio::test]
async fn dripping_bytes_before_tls_do_not_extend_pre_auth_idle() {
    let (backend, proxy) = setup(Role::Submission, SHORT_PRE_AUTH).await;
    let mut c = proxy.tcp("submission").await;
    assert!(c.line().await.starts_with("220 "));
    let held = drip_until_closed(&mut c).await;
    assert!(held < Duration::from_secs(4), "held {held:?} with pre_auth_idle = 1 s");
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn dripping_bytes_after_tls_do_not_extend_pre_auth_idle() {
    let (_backend, proxy) = setup(Role::Imaps, SHORT_PRE_AUTH).await;
    let mut c = proxy.tls("imaps").await;
    assert!(c.line().await.starts_with("* OK"));
    let held = drip_until_closed(&mut c).await;
    assert!(held < Duration::from_secs(4), "held {held:?} with pre_auth_idle = 1 s");
    proxy.stop().await;
}
