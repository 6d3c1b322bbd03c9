//! After TLS: greeting handling, XCLIENT, EHLO filter, local refusals, AUTH, lock-step, bounds.

use std::net::SocketAddr;

use super::*;

#[test]
fn implicit_entry_relays_multiline_greeting_verbatim() {
    // Row 29.
    let mut neg = SmtpNegotiation::new(&settings(), Entry::Implicit);
    let greeting = b"220-backend.test ESMTP\r\n220 welcome\r\n";
    let mut input = buf(b"220-backend.test ESMTP\r\n");
    assert_eq!(neg.on_greeting(&mut input), None);
    input.extend_from_slice(b"220 welcome\r\nextra");
    assert_eq!(neg.on_greeting(&mut input), Some(Step::to_client(greeting.to_vec())));
    assert_eq!(&input[..], b"extra");
}

#[test]
fn after_starttls_greeting_is_swallowed() {
    // Row 25: nothing unsolicited.
    let mut neg = SmtpNegotiation::new(&settings(), Entry::AfterStartTls);
    let mut input = buf(b"220 backend.test ESMTP\r\n");
    assert_eq!(neg.on_greeting(&mut input), Some(Step::to_client(Vec::new())));
}

#[test]
fn negative_or_malformed_greeting_closes_with_421() {
    for greeting in [&b"554 go away\r\n"[..], b"hello\r\n", b"220-a\r\n250 b\r\n"] {
        let mut neg = SmtpNegotiation::new(&settings(), Entry::Implicit);
        assert_eq!(
            neg.on_greeting(&mut buf(greeting)),
            Some(Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable))
        );
    }
}

// --- XCLIENT -------------------------------------------------------------------------

#[test]
fn xtext_escapes_plus_equals_and_non_printables() {
    assert_eq!(xtext(b"client.example"), b"client.example");
    assert_eq!(xtext(b"[UNAVAILABLE]"), b"[UNAVAILABLE]");
    assert_eq!(xtext(b"a+b=c"), b"a+2Bb+3Dc");
    assert_eq!(xtext(b"x y\r\nXCLIENT"), b"x+20y+0D+0AXCLIENT");
    assert_eq!(xtext(b"\x7f\x00\xff~!"), b"+7F+00+FF~!");
    assert_eq!(xtext(b""), b"");
}

#[test]
fn xclient_command_names_address_port_and_helo() {
    let v4: SocketAddr = "192.0.2.7:50123".parse().unwrap();
    assert_eq!(
        xclient_command(v4, None),
        b"XCLIENT ADDR=192.0.2.7 PORT=50123 NAME=[UNAVAILABLE]\r\n".to_vec()
    );
    let mapped: SocketAddr = "[::ffff:192.0.2.7]:25".parse().unwrap();
    assert_eq!(
        xclient_command(mapped, None),
        b"XCLIENT ADDR=192.0.2.7 PORT=25 NAME=[UNAVAILABLE]\r\n".to_vec()
    );
    let v6: SocketAddr = "[2001:db8::1]:587".parse().unwrap();
    assert_eq!(
        xclient_command(v6, Some(b"h=x+y")),
        b"XCLIENT ADDR=IPV6:2001:db8::1 PORT=587 NAME=[UNAVAILABLE] HELO=h+3Dx+2By\r\n".to_vec()
    );
    assert_eq!(helo_name(b"EHLO client.example\r\n"), Some(&b"client.example"[..]));
    assert_eq!(helo_name(b"helo  [192.0.2.1] junk\r\n"), Some(&b"[192.0.2.1]"[..]));
    assert_eq!(helo_name(b"EHLO\r\n"), None);
}

pub(super) fn with_xclient(base: Settings) -> Settings {
    Settings { xclient: true, client: Some("192.0.2.7:4242".parse().unwrap()), ..base }
}

pub(super) const XCLIENT_LINE: &[u8] = b"XCLIENT ADDR=192.0.2.7 PORT=4242 NAME=[UNAVAILABLE]\r\n";

#[test]
fn implicit_xclient_then_220_relays_the_original_greeting() {
    let mut neg = SmtpNegotiation::new(&with_xclient(settings()), Entry::Implicit);
    let mut input = buf(b"220 backend.test ESMTP first\r\n");
    assert_eq!(neg.on_greeting(&mut input), Some(Step::to_backend(XCLIENT_LINE.to_vec())));
    // The client's early command waits until the backend has accepted XCLIENT.
    assert_eq!(neg.on_client(&mut buf(b"EHLO c\r\n")), None);
    let step = backend(&mut neg, b"220 backend.test ESMTP second\r\n");
    assert_eq!(step, Step::to_client(b"220 backend.test ESMTP first\r\n".to_vec()));
    assert_eq!(client(&mut neg, b"EHLO c\r\n"), Step::to_backend(b"EHLO c\r\n".to_vec()));
}

#[test]
fn after_starttls_xclient_reply_is_swallowed_like_the_greeting() {
    let mut neg = SmtpNegotiation::new(&with_xclient(settings()), Entry::AfterStartTls);
    assert_eq!(
        neg.on_greeting(&mut buf(b"220-backend.test\r\n220 ESMTP\r\n")),
        Some(Step::to_backend(XCLIENT_LINE.to_vec()))
    );
    assert_eq!(backend(&mut neg, b"220-again\r\n220 ESMTP\r\n"), Step::to_client(Vec::new()));
    assert_eq!(neg.phase, Phase::Idle);
}

#[test]
fn refused_xclient_ends_the_session_with_421() {
    for refusal in [&b"550 5.7.0 Error: insufficient authorization\r\n"[..], b"501 5.5.4 Bad attribute\r\n"] {
        let mut neg = SmtpNegotiation::new(&with_xclient(settings()), Entry::Implicit);
        neg.on_greeting(&mut buf(b"220 b\r\n"));
        assert_eq!(
            backend(&mut neg, refusal),
            Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
        );
        assert_eq!(neg.on_client(&mut buf(b"EHLO c\r\n")), None);
    }
}

#[test]
fn plaintext_xclient_carries_the_replayed_helo_then_replays_it() {
    let replay = b"EHLO client.example\r\n".to_vec();
    let mut neg =
        SmtpNegotiation::new(&with_xclient(safe_backend()), Entry::Plaintext { replay: replay.clone() });
    let xclient = b"XCLIENT ADDR=192.0.2.7 PORT=4242 NAME=[UNAVAILABLE] HELO=client.example\r\n";
    assert_eq!(neg.on_greeting(&mut buf(b"220 b\r\n")), Some(Step::to_backend(xclient.to_vec())));
    assert_eq!(backend(&mut neg, b"220 b\r\n"), Step::to_backend(replay));
    assert_eq!(backend(&mut neg, b"250-b\r\n250 SIZE 1\r\n"), Step::to_client(Vec::new()).then(Next::Relay));
}

#[test]
fn no_xclient_without_the_setting_or_the_address() {
    let no_address = Settings { client: None, ..with_xclient(settings()) };
    let not_enabled = Settings { xclient: false, ..with_xclient(settings()) };
    for s in [no_address, not_enabled] {
        let mut neg = SmtpNegotiation::new(&s, Entry::Implicit);
        assert_eq!(neg.on_greeting(&mut buf(b"220 b\r\n")), Some(Step::to_client(b"220 b\r\n".to_vec())));
    }
}

/// A backend the probe showed to offer no AUTH, XCLIENT or XFORWARD.
pub(super) fn safe_backend() -> Settings {
    Settings {
        require_tls: false,
        backend_extensions: Arc::from(vec!["PIPELINING".to_owned(), "SIZE 10240000".to_owned()]),
        ..settings()
    }
}

#[test]
fn plaintext_entry_replays_helo_swallows_reply_then_relays() {
    let replay = b"EHLO client.example\r\n".to_vec();
    let mut neg = SmtpNegotiation::new(&safe_backend(), Entry::Plaintext { replay: replay.clone() });
    let mut mail = buf(b"MAIL FROM:<a@b>\r\n");
    assert_eq!(neg.on_client(&mut mail), None, "nothing before the replay is answered");
    assert_eq!(neg.on_greeting(&mut buf(b"220 backend ESMTP\r\n")), Some(Step::to_backend(replay)));
    assert_eq!(neg.on_client(&mut mail), None);
    assert_eq!(neg.on_backend(&mut buf(EHLO_REPLY)), Some(Step::to_client(Vec::new()).then(Next::Relay)));
    assert_eq!(&mail[..], b"MAIL FROM:<a@b>\r\n", "left for the relay");
}

#[test]
fn plaintext_entry_relays_even_after_negative_replay_reply() {
    let mut neg = SmtpNegotiation::new(&safe_backend(), Entry::Plaintext { replay: b"HELO x\r\n".to_vec() });
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    assert_eq!(backend(&mut neg, b"501 no\r\n").next, Next::Relay);
}

#[test]
fn ehlo_reply_loses_starttls_and_proxy_extensions_keeps_auth() {
    // Rows 25, 47.
    let mut neg = negotiating(Entry::AfterStartTls);
    assert_eq!(client(&mut neg, b"EHLO post\r\n"), Step::to_backend(b"EHLO post\r\n".to_vec()));
    let step = backend(
        &mut neg,
        b"250-backend.test\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250-XCLIENT ADDR\r\n250-xforward name\r\n250 8BITMIME\r\n",
    );
    assert_eq!(step, Step::to_client(b"250-backend.test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n".to_vec()));
}

#[test]
fn ehlo_filter_moves_last_line_marker_when_last_line_dropped() {
    let mut neg = negotiating(Entry::Implicit);
    client(&mut neg, b"ehlo t\r\n");
    assert_eq!(
        backend(&mut neg, b"250-b\r\n250-SIZE 1\r\n250 STARTTLS\r\n"),
        Step::to_client(b"250-b\r\n250 SIZE 1\r\n".to_vec())
    );
    client(&mut neg, b"EHLO t\r\n");
    assert_eq!(backend(&mut neg, b"250-b\n250 STARTTLS\n"), Step::to_client(b"250 b\r\n".to_vec()));
}

#[test]
fn ehlo_reply_without_hidden_extensions_is_unchanged() {
    let mut neg = negotiating(Entry::Implicit);
    client(&mut neg, b"EHLO t\r\n");
    assert_eq!(backend(&mut neg, EHLO_REPLY), Step::to_client(EHLO_REPLY.to_vec()));
}

#[test]
fn starttls_after_tls_is_refused_locally() {
    // Row 30.
    let mut neg = negotiating(Entry::AfterStartTls);
    for line in [&b"STARTTLS\r\n"[..], b"starttls x\n"] {
        assert_eq!(
            client(&mut neg, line),
            Step::to_client(b"503 5.5.1 Error: TLS already active\r\n".to_vec())
        );
    }
    assert_eq!(client(&mut neg, b"NOOP\r\n"), Step::to_backend(b"NOOP\r\n".to_vec()));
}

#[test]
fn xclient_and_xforward_are_never_forwarded() {
    // Row 46.
    let mut neg = negotiating(Entry::Implicit);
    for line in [&b"XCLIENT ADDR=6.6.6.6\r\n"[..], b"xforward ADDR=6.6.6.6\r\n"] {
        assert_eq!(client(&mut neg, line), Step::to_client(b"550 5.7.0 Error: not authorized\r\n".to_vec()));
    }
}

#[test]
fn lock_step_holds_next_command_until_reply() {
    let mut neg = negotiating(Entry::AfterStartTls);
    let mut input = buf(b"NOOP\r\nSTARTTLS\r\n");
    assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"NOOP\r\n".to_vec())));
    assert_eq!(neg.on_client(&mut input), None, "STARTTLS refusal would overtake the 250");
    let mut reply = buf(b"250 2.0.0 Ok\r\n");
    assert_eq!(neg.on_backend(&mut reply), Some(Step::to_client(b"250 2.0.0 Ok\r\n".to_vec())));
    assert_eq!(neg.on_client(&mut input).map(|s| s.to_client), Some(TLS_ALREADY_ACTIVE.to_vec()));
}

#[test]
fn auth_exchange_forwards_sasl_responses_and_relays_on_235() {
    let mut neg = negotiating(Entry::AfterStartTls);
    assert_eq!(client(&mut neg, b"AUTH LOGIN\r\n"), Step::to_backend(b"AUTH LOGIN\r\n".to_vec()));
    assert_eq!(backend(&mut neg, b"334 VXNlcm5hbWU6\r\n"), Step::to_client(b"334 VXNlcm5hbWU6\r\n".to_vec()));
    // A response that looks like a command is still a SASL response.
    assert_eq!(client(&mut neg, b"STARTTLS\r\n"), Step::to_backend(b"STARTTLS\r\n".to_vec()));
    assert_eq!(backend(&mut neg, b"334 UGFzc3dvcmQ6\r\n").next, Next::Negotiate);
    assert_eq!(client(&mut neg, b"c2VjcmV0\n"), Step::to_backend(b"c2VjcmV0\r\n".to_vec()));
    assert_eq!(
        backend(&mut neg, b"235 2.7.0 Authentication successful\r\n"),
        Step::to_client(b"235 2.7.0 Authentication successful\r\n".to_vec()).then(Next::Relay)
    );
    assert_eq!(neg.on_client(&mut buf(b"MAIL FROM:<a@b>\r\n")), None, "the relay owns it now");
}

#[test]
fn auth_cancel_or_failure_returns_to_commands() {
    let mut neg = negotiating(Entry::AfterStartTls);
    client(&mut neg, b"AUTH PLAIN\r\n");
    backend(&mut neg, b"334 \r\n");
    assert_eq!(client(&mut neg, b"*\r\n"), Step::to_backend(b"*\r\n".to_vec()));
    assert_eq!(backend(&mut neg, b"501 5.7.0 Authentication aborted\r\n").next, Next::Negotiate);
    assert_eq!(client(&mut neg, b"STARTTLS\r\n").to_client, TLS_ALREADY_ACTIVE.to_vec());
    client(&mut neg, b"AUTH PLAIN AGEAYg==\r\n");
    assert_eq!(backend(&mut neg, b"535 5.7.8 bad\r\n").next, Next::Negotiate);
    assert_eq!(client(&mut neg, b"NOOP\r\n"), Step::to_backend(b"NOOP\r\n".to_vec()));
}

#[test]
fn rfc4954_long_auth_line_is_forwarded_intact() {
    // Row 33.
    let mut neg = negotiating(Entry::AfterStartTls);
    let mut line = b"AUTH PLAIN ".to_vec();
    line.extend(std::iter::repeat_n(b'Q', 12_000));
    line.extend_from_slice(b"\r\n");
    assert_eq!(client(&mut neg, &line), Step::to_backend(line.clone()));
}

#[test]
fn mail_ends_negotiation_at_once() {
    let mut neg = negotiating(Entry::Implicit);
    let mut input = buf(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    assert_eq!(
        neg.on_client(&mut input),
        Some(Step::to_backend(b"MAIL FROM:<a@b>\r\n".to_vec()).then(Next::Relay))
    );
    assert_eq!(&input[..], b"RCPT TO:<c@d>\r\n");
}

#[test]
fn negotiation_overlong_line_closes() {
    // Row 35 at the negotiation bound: never split into a STARTTLS.
    let mut neg = SmtpNegotiation::new(&Settings { max_line: 64, ..settings() }, Entry::AfterStartTls);
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    let mut input = buf(b"NOOP ");
    input.extend(std::iter::repeat_n(b'A', 64));
    input.extend_from_slice(b"STARTTLS\r\n");
    assert_eq!(neg.on_client(&mut input), Some(Step::to_client(LINE_TOO_LONG.to_vec()).then(Next::Close)));
}

#[test]
fn negotiation_too_many_errors_closes() {
    let mut neg = SmtpNegotiation::new(&Settings { max_errors: 1, ..settings() }, Entry::AfterStartTls);
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    assert_eq!(client(&mut neg, b"STARTTLS\r\n").next, Next::Negotiate);
    assert_eq!(
        client(&mut neg, b"XCLIENT ADDR=1.2.3.4\r\n"),
        Step::to_client(b"421 4.7.0 mx.test Error: too many errors\r\n".to_vec()).then(Next::Close)
    );
}

#[test]
fn malformed_or_overlong_backend_reply_closes() {
    let mut neg = negotiating(Entry::AfterStartTls);
    client(&mut neg, b"NOOP\r\n");
    assert_eq!(
        backend(&mut neg, b"2x0 what\r\n"),
        Step::to_client(farewell(Farewell::BackendUnavailable)).then(Next::Unavailable)
    );
    let mut neg = SmtpNegotiation::new(&Settings { max_line: 32, ..settings() }, Entry::Implicit);
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    let mut long = buf(b"250 ");
    long.extend(std::iter::repeat_n(b'x', 40));
    assert_eq!(neg.on_backend(&mut long).map(|s| s.next), Some(Next::Unavailable));
}

#[test]
fn multiline_reply_waits_until_complete() {
    let mut neg = negotiating(Entry::AfterStartTls);
    client(&mut neg, b"HELP\r\n");
    let mut input = buf(b"214-a\r\n214-b\r\n");
    assert_eq!(neg.on_backend(&mut input), None);
    assert_eq!(input.len(), 14, "nothing consumed");
    input.extend_from_slice(b"214\r\n");
    assert_eq!(neg.on_backend(&mut input).map(|s| s.to_client.len()), Some(19));
}

#[test]
fn unsolicited_backend_reply_is_relayed_filtered() {
    let mut neg = negotiating(Entry::AfterStartTls);
    assert_eq!(
        backend(&mut neg, b"421 4.4.2 timeout\r\n"),
        Step::to_client(b"421 4.4.2 timeout\r\n".to_vec())
    );
    assert_eq!(backend(&mut neg, b"250-x\r\n250 STARTTLS\r\n"), Step::to_client(b"250 x\r\n".to_vec()));
}

#[test]
fn farewells_are_421() {
    assert_eq!(
        farewell(Farewell::BackendUnavailable),
        b"421 4.3.2 Service not available, closing transmission channel\r\n"
    );
    assert_eq!(farewell(Farewell::Timeout), b"421 4.4.2 Error: timeout exceeded\r\n");
    assert_eq!(farewell(Farewell::ShuttingDown), b"421 4.3.2 Server shutting down\r\n");
}
