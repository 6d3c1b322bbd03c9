//! Before TLS: greeting, EHLO, refusals, STARTTLS framing, bounds.

use super::*;

#[test]
fn greeting_names_the_host() {
    assert_eq!(SmtpPreTls::new(&settings()).greeting(), b"220 mx.test ESMTP\r\n");
}

#[test]
fn required_tls_ehlo_offers_only_starttls() {
    // Row 13.
    let mut pre =
        SmtpPreTls::new(&Settings { backend_extensions: opportunistic().backend_extensions, ..settings() });
    assert_eq!(
        reply(&mut pre, b"EHLO t\r\n"),
        PreTlsStep::Reply(b"250-mx.test\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n".to_vec())
    );
}

#[test]
fn opportunistic_ehlo_mirrors_backend_without_auth_or_proxy_extensions() {
    let mut pre = SmtpPreTls::new(&opportunistic());
    assert_eq!(
        text(&reply(&mut pre, b"ehlo client.example\r\n")),
        "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n\
         250-SMTPUTF8\r\n250-CHUNKING\r\n250 STARTTLS\r\n"
    );
}

#[test]
fn opportunistic_ehlo_without_known_extensions_offers_starttls() {
    let mut pre = SmtpPreTls::new(&Settings { require_tls: false, ..settings() });
    assert_eq!(text(&reply(&mut pre, b"EHLO t\r\n")), "250-mx.test\r\n250 STARTTLS\r\n");
}

#[test]
fn helo_gets_a_single_line() {
    let mut pre = SmtpPreTls::new(&settings());
    assert_eq!(text(&reply(&mut pre, b"HELO t\n")), "250 mx.test\r\n");
}

#[test]
fn ehlo_and_helo_without_domain_get_501() {
    let mut pre = SmtpPreTls::new(&settings());
    assert_eq!(text(&reply(&mut pre, b"EHLO\r\n")), "501 5.5.4 Syntax: EHLO hostname\r\n");
    assert_eq!(text(&reply(&mut pre, b"EHLO  \r\n")), "501 5.5.4 Syntax: EHLO hostname\r\n");
    assert_eq!(text(&reply(&mut pre, b"helo\r\n")), "501 5.5.4 Syntax: HELO hostname\r\n");
    assert_eq!(pre.errors, 3);
}

#[test]
fn starttls_answers_220_and_stops_reading_lines() {
    // Rows 1, 2, 6: everything behind STARTTLS stays for rustls, byte for byte.
    let tail = b"EHLO inj\r\nAUTH PLAIN AGEAYg==\r\nMAIL FROM:<a@x>\r\nRCPT TO:<a@x>\r\nDATA\r\n";
    for settings in [settings(), opportunistic()] {
        let mut pre = SmtpPreTls::new(&settings);
        let mut input = buf(b"STARTTLS\r\n");
        input.extend_from_slice(tail);
        assert_eq!(
            pre.on_client(&mut input),
            Some(PreTlsStep::StartTls(b"220 2.0.0 Ready to start TLS\r\n".to_vec()))
        );
        assert_eq!(&input[..], &tail[..]);
        assert_eq!(pre.on_client(&mut input), None);
        assert_eq!(&input[..], &tail[..], "never looked at again");
    }
}

#[test]
fn bytes_arriving_after_starttls_are_never_read() {
    // Row 8: a second quick segment.
    let mut pre = SmtpPreTls::new(&settings());
    let mut input = buf(b"STARTTLS\r\n");
    assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
    input.extend_from_slice(b"EHLO inj\r\n");
    assert_eq!(pre.on_client(&mut input), None);
    assert_eq!(&input[..], b"EHLO inj\r\n");
}

#[test]
fn starttls_case_and_framing_variants_stop_reading_lines() {
    // Row 9.
    for first in [&b"starttls\r\n"[..], b"StartTLS\n", b"STARTTLS \r\n", b"sTaRtTlS\n"] {
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(first);
        input.extend_from_slice(b"ehlo inj\n");
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
        assert_eq!(&input[..], b"ehlo inj\n");
    }
}

#[test]
fn pipelined_ehlo_then_starttls_both_answered() {
    // Row 11.
    let mut pre = SmtpPreTls::new(&settings());
    let mut input = buf(b"EHLO t\r\nSTARTTLS\r\n");
    assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Reply(r)) if r.starts_with(b"250-")));
    assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::StartTls(_))));
    assert!(input.is_empty());
}

#[test]
fn starttls_with_argument_is_501() {
    // Row 24.
    let mut pre = SmtpPreTls::new(&settings());
    let mut input = buf(b"STARTTLS x\r\nNOOP\r\n");
    assert_eq!(
        pre.on_client(&mut input),
        Some(PreTlsStep::Reply(b"501 5.5.4 Syntax error (no parameters allowed)\r\n".to_vec()))
    );
    assert_eq!(pre.on_client(&mut input), Some(PreTlsStep::Reply(OK.to_vec())));
}

#[test]
fn auth_before_tls_is_refused_with_530() {
    // Rows 14 and 16: never 334, on either kind of listener.
    for settings in [settings(), opportunistic()] {
        let mut pre = SmtpPreTls::new(&settings);
        for auth in [&b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"[..], b"auth login\r\n", b"AUTH\r\n"] {
            assert_eq!(text(&reply(&mut pre, auth)), "530 5.7.0 Must issue a STARTTLS command first\r\n");
        }
    }
}

#[test]
fn required_tls_refuses_mail_transaction_commands_with_530() {
    // Row 15.
    let mut pre = SmtpPreTls::new(&settings());
    reply(&mut pre, b"EHLO t\r\n");
    for command in ["MAIL FROM:<a@b>", "RCPT TO:<a@b>", "DATA", "BDAT 10 LAST", "VRFY a", "EXPN a", "ETRN x"]
    {
        let step = reply(&mut pre, format!("{command}\r\n").as_bytes());
        assert_eq!(text(&step), "530 5.7.0 Must issue a STARTTLS command first\r\n", "{command}");
    }
    assert_eq!(reply(&mut pre, b"NOOP\r\n"), PreTlsStep::Reply(OK.to_vec()));
    assert_eq!(reply(&mut pre, b"QUIT\r\n"), PreTlsStep::Close(BYE.to_vec()));
}

#[test]
fn opportunistic_mail_needs_helo_first() {
    let mut pre = SmtpPreTls::new(&opportunistic());
    assert_eq!(text(&reply(&mut pre, b"MAIL FROM:<a@b>\r\n")), "503 5.5.1 Error: send HELO/EHLO first\r\n");
}

#[test]
fn opportunistic_mail_switches_to_plaintext_without_consuming_it() {
    // Row 16: AUTH refused, then MAIL accepted (by the backend, replayed EHLO first).
    let mut pre = SmtpPreTls::new(&opportunistic());
    reply(&mut pre, b"EHLO first\r\n");
    let mut input = buf(b"EHLO client.example\nAUTH LOGIN\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Reply(_))));
    assert!(text(&pre.on_client(&mut input).unwrap()).starts_with("530 "));
    assert_eq!(
        pre.on_client(&mut input),
        Some(PreTlsStep::Plaintext { replay: b"EHLO client.example\r\n".to_vec() })
    );
    assert_eq!(&input[..], b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    assert_eq!(pre.on_client(&mut input), None);
}

#[test]
fn opportunistic_mail_accepts_utf8_addresses() {
    let mut pre = SmtpPreTls::new(&opportunistic());
    reply(&mut pre, b"HELO t\r\n");
    let mail = "MAIL FROM:<jos\u{e9}@exampl\u{e9}.test> SMTPUTF8\r\n".as_bytes();
    assert_eq!(reply(&mut pre, mail), PreTlsStep::Plaintext { replay: b"HELO t\r\n".to_vec() });
}

#[test]
fn opportunistic_transaction_commands_before_mail_are_refused() {
    let mut pre = SmtpPreTls::new(&opportunistic());
    reply(&mut pre, b"EHLO t\r\n");
    for command in [&b"RCPT TO:<a@b>\r\n"[..], b"DATA\r\n", b"BDAT 1 LAST\r\n"] {
        assert_eq!(text(&reply(&mut pre, command)), "503 5.5.1 Error: need MAIL command\r\n");
    }
    assert_eq!(text(&reply(&mut pre, b"VRFY a\r\n")), "252 2.0.0 Cannot VRFY user\r\n");
    assert_eq!(text(&reply(&mut pre, b"EXPN a\r\n")), "502 5.5.1 Command not implemented\r\n");
}

#[test]
fn noop_rset_help_quit_answer_locally() {
    let mut pre = SmtpPreTls::new(&settings());
    assert_eq!(reply(&mut pre, b"noop\r\n"), PreTlsStep::Reply(OK.to_vec()));
    assert_eq!(reply(&mut pre, b"RSET\r\n"), PreTlsStep::Reply(OK.to_vec()));
    assert_eq!(text(&reply(&mut pre, b"HELP\r\n")), "214 2.0.0 See RFC 5321\r\n");
    assert_eq!(reply(&mut pre, b"quit\n"), PreTlsStep::Close(b"221 2.0.0 Bye\r\n".to_vec()));
    assert_eq!(pre.errors, 0);
}

#[test]
fn unknown_and_hostile_commands_get_500() {
    // Rows 42, 46: a PROXY line or XCLIENT is just a bad command here.
    let mut pre = SmtpPreTls::new(&Settings { max_errors: 100, ..settings() });
    for line in [
        &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
        b"XCLIENT ADDR=1.2.3.4\r\n",
        b"XFORWARD ADDR=1.2.3.4\r\n",
        b"GET / HTTP/1.1\r\n",
        b"\r\n",
        b"NO\0OP\r\n",
        b"NOOP\rSTARTTLS\r\n",
        "\u{e9}HLO t\r\n".as_bytes(),
        b"\x16\x03\x01\x00\xa5\n",
    ] {
        assert_eq!(text(&reply(&mut pre, line)), "500 5.5.2 Error: command not recognized\r\n");
    }
    assert_eq!(pre.errors, 9);
}

#[test]
fn overlong_line_closes_and_is_never_split() {
    // Rows 34, 35.
    for l in [512usize, 1000, 2048, 4096, 8192] {
        let mut pre = SmtpPreTls::new(&settings());
        let mut input = buf(b"NOOP ");
        input.extend(std::iter::repeat_n(b'A', l - 5));
        input.extend_from_slice(b"STARTTLS\r\n");
        assert_eq!(
            pre.on_client(&mut input),
            Some(PreTlsStep::Close(b"500 5.5.2 Error: line too long\r\n".to_vec()))
        );
        assert_eq!(pre.on_client(&mut input), None);
    }
    let mut pre = SmtpPreTls::new(&settings());
    let mut input = buf(&[b'x'; 10_000]);
    assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Close(_))));
}

#[test]
fn partial_line_waits_for_more() {
    let mut pre = SmtpPreTls::new(&settings());
    let mut input = buf(b"STARTT");
    assert_eq!(pre.on_client(&mut input), None);
    assert_eq!(&input[..], b"STARTT");
}

#[test]
fn too_many_errors_closes_with_421() {
    let mut pre = SmtpPreTls::new(&Settings { max_errors: 2, ..settings() });
    assert!(matches!(reply(&mut pre, b"BOGUS\r\n"), PreTlsStep::Reply(_)));
    assert!(matches!(reply(&mut pre, b"AUTH PLAIN\r\n"), PreTlsStep::Reply(_)));
    assert_eq!(
        reply(&mut pre, b"MAIL FROM:<>\r\n"),
        PreTlsStep::Close(b"421 4.7.0 mx.test Error: too many errors\r\n".to_vec())
    );
}

#[test]
fn too_many_commands_closes_with_421() {
    let mut pre = SmtpPreTls::new(&Settings { max_pre_tls_commands: 3, ..settings() });
    let mut input = buf(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n");
    for _ in 0..3 {
        assert!(matches!(pre.on_client(&mut input), Some(PreTlsStep::Reply(_))));
    }
    assert_eq!(
        pre.on_client(&mut input),
        Some(PreTlsStep::Close(b"421 4.7.0 mx.test Error: too many commands\r\n".to_vec()))
    );
    assert_eq!(pre.on_client(&mut input), None);
}
