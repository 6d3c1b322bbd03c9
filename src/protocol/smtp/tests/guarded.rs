//! Guarded plaintext: local refusals, lock-step relay, DATA bodies and BDAT chunks streamed.

use super::*;

pub(super) const GUARDED_EHLO: &[u8] = b"250-backend.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n\
    250-AUTH PLAIN LOGIN\r\n250-auth=login\r\n250-XCLIENT NAME ADDR\r\n250-CHUNKING\r\n250 xforward name\r\n";

/// A plaintext session in front of `settings`'s backend, past the replayed EHLO (its
/// reply `replay_reply`), ready for the client's commands.
pub(super) fn plaintext_with(settings: &Settings, replay_reply: &[u8]) -> SmtpNegotiation {
    let mut neg = SmtpNegotiation::new(settings, Entry::Plaintext { replay: b"EHLO c\r\n".to_vec() });
    assert_eq!(neg.on_greeting(&mut buf(b"220 b ESMTP\r\n")), Some(Step::to_backend(b"EHLO c\r\n".to_vec())));
    assert_eq!(neg.on_backend(&mut buf(replay_reply)), Some(Step::to_client(Vec::new())), "guarded");
    assert_eq!(neg.phase, Phase::Idle);
    neg
}

/// Guarded: the backend offers AUTH (and CHUNKING, for BDAT).
pub(super) fn guarded() -> SmtpNegotiation {
    plaintext_with(&opportunistic(), GUARDED_EHLO)
}

/// Guarded, with `bare_newline = "reject"`.
pub(super) fn guarded_rejecting() -> SmtpNegotiation {
    plaintext_with(&Settings { bare_newline: BareNewline::Reject, ..opportunistic() }, GUARDED_EHLO)
}

/// Feeds `pieces` one at a time as they would arrive, collecting every step; the input
/// buffer is left as it ends.
pub(super) fn feed(neg: &mut SmtpNegotiation, input: &mut BytesMut, pieces: &[&[u8]]) -> Vec<Step> {
    let mut steps = Vec::new();
    for piece in pieces {
        input.extend_from_slice(piece);
        while let Some(step) = neg.on_client(input) {
            steps.push(step);
        }
    }
    steps
}

pub(super) fn sent_to_backend(steps: &[Step]) -> Vec<u8> {
    steps.iter().flat_map(|s| s.to_backend.iter().copied()).collect()
}

#[test]
fn plaintext_mode_choice_follows_backend_extensions() {
    // Opaque only when the backend is known and offers none of AUTH, XCLIENT, XFORWARD.
    let relay = |extensions: &[&str]| {
        let settings = Settings {
            require_tls: false,
            backend_extensions: Arc::from(extensions.iter().map(|e| e.to_string()).collect::<Vec<_>>()),
            ..settings()
        };
        let mut neg = SmtpNegotiation::new(&settings, Entry::Plaintext { replay: b"EHLO c\r\n".to_vec() });
        neg.on_greeting(&mut buf(b"220 b\r\n"));
        neg.on_backend(&mut buf(b"250 b\r\n")).map(|step| step.next)
    };
    assert_eq!(relay(&["SIZE 1", "8BITMIME", "STARTTLS", "CHUNKING"]), Some(Next::Relay));
    assert_eq!(relay(&["SIZE 1", "AUTHX"]), Some(Next::Relay), "not an AUTH keyword");
    for guarded in [
        &[][..],
        &["SIZE 1", "AUTH PLAIN"][..],
        &["auth=login"][..],
        &["AUTH"][..],
        &["8BITMIME", "xclient ADDR"][..],
        &["XFORWARD NAME"][..],
    ] {
        assert_eq!(relay(guarded), Some(Next::Negotiate), "{guarded:?}");
    }
}

#[test]
fn guarded_refuses_auth_starttls_xclient_locally() {
    let mut neg = guarded();
    for line in [&b"AUTH PLAIN AGxhdGVtYXJrZXIAc2VjcmV0\r\n"[..], b"auth login\n", b"AUTH\r\n"] {
        assert_eq!(client(&mut neg, line), Step::to_client(TLS_FIRST.to_vec()), "{line:?}");
    }
    assert_eq!(
        client(&mut neg, b"STARTTLS\r\n"),
        Step::to_client(b"454 4.7.0 TLS not available now\r\n".to_vec())
    );
    for line in [&b"XCLIENT ADDR=6.6.6.6\r\n"[..], b"xforward ADDR=6.6.6.6\r\n"] {
        assert_eq!(client(&mut neg, line), Step::to_client(NOT_AUTHORIZED.to_vec()));
    }
    assert_eq!(neg.errors, 6, "each refusal counts");
    assert_eq!(client(&mut neg, b"NOOP\r\n"), Step::to_backend(b"NOOP\r\n".to_vec()));
}

#[test]
fn guarded_auth_refusals_are_bounded() {
    let settings = Settings { max_errors: 2, ..opportunistic() };
    let mut neg = plaintext_with(&settings, GUARDED_EHLO);
    client(&mut neg, b"AUTH LOGIN\r\n");
    client(&mut neg, b"AUTH LOGIN\r\n");
    assert_eq!(client(&mut neg, b"AUTH LOGIN\r\n").next, Next::Close);
}

#[test]
fn guarded_ehlo_reply_loses_auth_starttls_and_proxy_extensions() {
    let mut neg = guarded();
    assert_eq!(client(&mut neg, b"EHLO again\r\n"), Step::to_backend(b"EHLO again\r\n".to_vec()));
    assert_eq!(
        backend(&mut neg, GUARDED_EHLO),
        Step::to_client(b"250-backend.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n".to_vec())
    );
    // The last line dropped: the marker moves; nothing left but the name.
    client(&mut neg, b"EHLO again\r\n");
    assert_eq!(
        backend(&mut neg, b"250-b\r\n250-AUTH=PLAIN\r\n250 AUTH PLAIN\r\n"),
        Step::to_client(b"250 b\r\n".to_vec())
    );
    // Unsolicited replies are filtered the same way.
    assert_eq!(backend(&mut neg, b"250-b\r\n250 AUTH X\r\n"), Step::to_client(b"250 b\r\n".to_vec()));
}

#[test]
fn guarded_never_relays_and_forwards_commands_lock_step() {
    let mut neg = guarded();
    let mut input = buf(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nAUTH PLAIN x\r\nRSET\r\n");
    let mail = neg.on_client(&mut input);
    assert_eq!(mail, Some(Step::to_backend(b"MAIL FROM:<a@b>\r\n".to_vec())), "no Next::Relay");
    assert_eq!(neg.on_client(&mut input), None, "RCPT waits for MAIL's reply");
    assert_eq!(backend(&mut neg, b"250 2.1.0 Ok\r\n"), Step::to_client(b"250 2.1.0 Ok\r\n".to_vec()));
    assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"RCPT TO:<c@d>\r\n".to_vec())));
    assert_eq!(neg.on_client(&mut input), None, "the AUTH refusal would overtake RCPT's reply");
    assert_eq!(backend(&mut neg, b"250 2.1.5 Ok\r\n").next, Next::Negotiate);
    assert_eq!(neg.on_client(&mut input), Some(Step::to_client(TLS_FIRST.to_vec())));
    assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"RSET\r\n".to_vec())));
    assert_eq!(backend(&mut neg, b"250 2.0.0 Ok\r\n").next, Next::Negotiate);
    for line in [&b"QUIT\r\n"[..], b"NOOP\r\n", b"VRFY a\r\n", b"HELP\r\n", b"BOGUS x\r\n"] {
        assert_eq!(client(&mut neg, line), Step::to_backend(line.to_vec()));
        assert_eq!(backend(&mut neg, b"250 ok\r\n"), Step::to_client(b"250 ok\r\n".to_vec()));
    }
}

#[test]
fn guarded_after_negative_replay_reply_still_guards() {
    let mut neg = plaintext_with(&opportunistic(), b"554 5.7.1 go away\r\n");
    assert_eq!(client(&mut neg, b"MAIL FROM:<a@b>\r\n").next, Next::Negotiate);
    assert_eq!(backend(&mut neg, b"503 5.5.1 no\r\n").next, Next::Negotiate);
    assert_eq!(client(&mut neg, b"AUTH PLAIN x\r\n").to_client, TLS_FIRST.to_vec());
}

/// DATA through to the 354, ready for the body.
pub(super) fn in_data(neg: &mut SmtpNegotiation) {
    assert_eq!(client(neg, b"DATA\r\n"), Step::to_backend(b"DATA\r\n".to_vec()));
    assert_eq!(backend(neg, b"354 go ahead\r\n"), Step::to_client(b"354 go ahead\r\n".to_vec()));
    assert_eq!(neg.phase, Phase::DataBody { answered: false });
}

#[test]
fn guarded_data_body_is_streamed_unexamined_up_to_the_marker() {
    let body: &[u8] = b"Subject: x\r\n\r\nAUTH PLAIN eHh4\r\nXCLIENT ADDR=6.6.6.6\r\n..\r\n.dot\r\n\
        STARTTLS\r\n.\r\n";
    let after: &[u8] = b"QUIT\r\n";
    let mut whole = body.to_vec();
    whole.extend_from_slice(after);
    // Every split of body+QUIT into two pieces, the marker's five octets included.
    for cut in 0..=whole.len() {
        let mut neg = guarded();
        in_data(&mut neg);
        let mut input = BytesMut::new();
        let steps = feed(&mut neg, &mut input, &[&whole[..cut], &whole[cut..]]);
        assert!(steps.iter().all(|s| s.to_client.is_empty() && s.next == Next::Negotiate), "cut {cut}");
        assert_eq!(sent_to_backend(&steps), body, "cut {cut}");
        assert_eq!(&input[..], after, "cut {cut}: QUIT waits for the reply to the body");
        assert_eq!(neg.phase, Phase::Awaiting(Pending::Other), "cut {cut}");
        assert_eq!(backend(&mut neg, b"250 queued\r\n"), Step::to_client(b"250 queued\r\n".to_vec()));
        assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(after.to_vec())), "cut {cut}");
    }
}

#[test]
fn guarded_data_body_streamed_octet_by_octet() {
    let body: &[u8] = b"a\r\n..\r\n\r\n.x\r\n.\r\n";
    let mut neg = guarded();
    in_data(&mut neg);
    let pieces: Vec<&[u8]> = body.chunks(1).chain([&b"NOOP\r\n"[..]]).collect();
    let mut input = BytesMut::new();
    let steps = feed(&mut neg, &mut input, &pieces);
    assert_eq!(steps.len(), body.len(), "one step per octet: nothing held back");
    assert_eq!(sent_to_backend(&steps), body);
    assert_eq!(&input[..], b"NOOP\r\n");
}

/// The smuggling forms, with what would follow as commands to a lenient backend.
pub(super) const SMUGGLES: [&[u8]; 6] = [
    b"x\n.\nAUTH PLAIN eHh4\r\n",
    b"x\r\n.\nAUTH PLAIN eHh4\r\n",
    b"x\n.\r\nAUTH PLAIN eHh4\r\n",
    b"x\r.\rAUTH PLAIN eHh4\r\n",
    b"x\r\n.\r\r\nAUTH PLAIN eHh4\r\n",
    b"\n.\r\nXCLIENT ADDR=1.2.3.4\r\n",
];

#[test]
fn guarded_data_with_bare_newline_is_normalized_and_stays_in_the_body() {
    for smuggle in SMUGGLES {
        for octet_by_octet in [false, true] {
            let mut neg = guarded();
            in_data(&mut neg);
            let mut input = BytesMut::new();
            let whole = [smuggle, b"\r\n.\r\nNOOP\r\n"].concat();
            let pieces: Vec<&[u8]> = if octet_by_octet { whole.chunks(1).collect() } else { vec![&whole] };
            let steps = feed(&mut neg, &mut input, &pieces);
            assert!(steps.iter().all(|s| s.to_client.is_empty() && s.next == Next::Negotiate), "{smuggle:?}");
            let sent = sent_to_backend(&steps);
            let bare = sent.windows(2).any(|w| (w[0] == b'\r') != (w[1] == b'\n'));
            assert!(!bare && !sent.starts_with(b"\n"), "{smuggle:?}: {:?}", String::from_utf8_lossy(&sent));
            assert!(sent.ends_with(b"\r\n.\r\n"), "{smuggle:?}");
            assert_eq!(&input[..], b"NOOP\r\n", "{smuggle:?}: the body ended only at CRLF.CRLF");
            assert_eq!(neg.phase, Phase::Awaiting(Pending::Other), "{smuggle:?}");
            assert_eq!(neg.take_finding().map(|f| f.action), Some(crate::protocol::Action::Normalized));
        }
    }
}

#[test]
fn guarded_data_with_bare_newline_closes_before_the_backend_could_end_the_message() {
    // Each of these is an end of data to some lenient server (SMTP smuggling); under
    // `reject` none may reach the backend with what follows it, in one piece or octet by octet.
    for smuggle in SMUGGLES {
        for octet_by_octet in [false, true] {
            let mut neg = guarded_rejecting();
            in_data(&mut neg);
            let mut input = BytesMut::new();
            let pieces: Vec<&[u8]> = if octet_by_octet { smuggle.chunks(1).collect() } else { vec![smuggle] };
            let steps = feed(&mut neg, &mut input, &pieces);
            let sent = sent_to_backend(&steps);
            let last = steps.last().expect("a closing step");
            assert_eq!(last.next, Next::Close, "{smuggle:?}");
            assert_eq!(last.to_client, crate::protocol::smtp_guard::BARE_NEWLINE, "{smuggle:?}");
            let text = String::from_utf8_lossy(&sent);
            assert!(!text.contains("AUTH") && !text.contains("XCLIENT"), "{smuggle:?} sent {text:?}");
            assert!(!sent.ends_with(b"\n"), "no line end after the bare octet: {smuggle:?} sent {text:?}");
            assert_eq!(neg.on_client(&mut buf(b"NOOP\r\n")), None, "nothing read after the close");
        }
    }
}

#[test]
fn guarded_data_marker_right_after_354_and_dot_stuffing() {
    // An empty body: the DATA line's CRLF begins the marker.
    let mut neg = guarded();
    in_data(&mut neg);
    let mut input = buf(b".\r\nAUTH PLAIN x\r\n");
    assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b".\r\n".to_vec())));
    assert_eq!(neg.on_client(&mut input), None);
    assert_eq!(backend(&mut neg, b"250 ok\r\n").next, Next::Negotiate);
    assert_eq!(neg.on_client(&mut input), Some(Step::to_client(TLS_FIRST.to_vec())));

    // "..": a dot-stuffed line, not the end; ".\r\n" split after the dot.
    let mut neg = guarded();
    in_data(&mut neg);
    let mut input = BytesMut::new();
    let steps = feed(&mut neg, &mut input, &[b"..\r\nAUTH PLAIN x\r\n", b"..", b"\r\n.", b"\r\n"]);
    assert_eq!(sent_to_backend(&steps), b"..\r\nAUTH PLAIN x\r\n..\r\n.\r\n");
    assert!(steps.iter().all(|s| s.to_client.is_empty()), "nothing in the body was answered");
    assert_eq!(neg.phase, Phase::Awaiting(Pending::Other));
}

#[test]
fn guarded_data_refused_by_backend_ends_the_command() {
    let mut neg = guarded();
    client(&mut neg, b"DATA\r\n");
    assert_eq!(backend(&mut neg, b"503 5.5.1 need RCPT\r\n").next, Next::Negotiate);
    assert_eq!(neg.phase, Phase::Idle);
    assert_eq!(client(&mut neg, b"AUTH PLAIN x\r\n").to_client, TLS_FIRST.to_vec());
}

#[test]
fn guarded_body_longer_than_any_line_bound_is_streamed() {
    let settings = Settings { max_line: 64, ..opportunistic() };
    let mut neg = plaintext_with(&settings, GUARDED_EHLO);
    in_data(&mut neg);
    let mut input = BytesMut::new();
    let long = vec![b'x'; 10_000];
    let steps = feed(&mut neg, &mut input, &[&long, &long, b"\r\n.\r\n"]);
    assert_eq!(sent_to_backend(&steps).len(), 20_005);
    assert!(input.is_empty());
    assert_eq!(neg.phase, Phase::Awaiting(Pending::Other));
}

#[test]
fn guarded_early_reply_inside_content_is_the_contents_reply() {
    let mut neg = guarded();
    in_data(&mut neg);
    let mut input = buf(b"part");
    neg.on_client(&mut input);
    assert_eq!(backend(&mut neg, b"554 5.6.0 no\r\n"), Step::to_client(b"554 5.6.0 no\r\n".to_vec()));
    input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"\r\n.\r\n".to_vec())));
    assert_eq!(neg.on_client(&mut input), Some(Step::to_backend(b"NOOP\r\n".to_vec())), "no reply owed");
}

#[test]
fn guarded_bdat_chunk_is_never_interpreted() {
    let chunk: &[u8] = b"Subject: x\r\n\r\n.\r\nAUTH PLAIN x\r\n";
    let line = format!("BDAT {} LAST\r\n", chunk.len());
    for cut in 0..=chunk.len() {
        let mut neg = guarded();
        let mut input = BytesMut::new();
        let mut first = line.as_bytes().to_vec();
        first.extend_from_slice(&chunk[..cut]);
        let mut second = chunk[cut..].to_vec();
        second.extend_from_slice(b"AUTH PLAIN y\r\n");
        let steps = feed(&mut neg, &mut input, &[&first, &second]);
        let mut expected = line.as_bytes().to_vec();
        expected.extend_from_slice(chunk);
        assert_eq!(sent_to_backend(&steps), expected, "cut {cut}");
        assert!(steps.iter().all(|s| s.to_client.is_empty()), "cut {cut}: nothing answered locally");
        assert_eq!(&input[..], b"AUTH PLAIN y\r\n", "cut {cut}: held until the chunk's reply");
        assert_eq!(backend(&mut neg, b"250 2.0.0 queued\r\n").next, Next::Negotiate);
        assert_eq!(neg.on_client(&mut input), Some(Step::to_client(TLS_FIRST.to_vec())), "cut {cut}");
    }
}

#[test]
fn guarded_bdat_sizes_and_syntax() {
    assert_eq!(bdat_size(Some(b"0")), Some(0));
    assert_eq!(bdat_size(Some(b"12 last")), Some(12));
    assert_eq!(bdat_size(Some(b"18446744073709551615")), Some(u64::MAX));
    for bad in
        [&b"18446744073709551616"[..], b"", b"-1", b"+1", b"1 LAST x", b"1  LAST", b"1 MORE", b" 1", b"0x10"]
    {
        assert_eq!(bdat_size(Some(bad)), None, "{bad:?}");
    }
    assert_eq!(bdat_size(None), None);

    let mut neg = guarded();
    assert_eq!(client(&mut neg, b"BDAT x\r\n"), Step::to_client(BDAT_SYNTAX.to_vec()));
    assert_eq!(client(&mut neg, b"BDAT 99999999999999999999\r\n"), Step::to_client(BDAT_SYNTAX.to_vec()));
    // An empty last chunk: the line alone, then its reply.
    assert_eq!(client(&mut neg, b"BDAT 0 LAST\r\n"), Step::to_backend(b"BDAT 0 LAST\r\n".to_vec()));
    assert_eq!(neg.phase, Phase::Awaiting(Pending::Other));
    // A huge chunk streams whatever comes, never buffered.
    backend(&mut neg, b"250 ok\r\n");
    client(&mut neg, b"BDAT 18446744073709551615\r\n");
    let mut input = buf(&[b'z'; 5000]);
    assert_eq!(neg.on_client(&mut input).map(|s| s.to_backend.len()), Some(5000));
    assert!(input.is_empty());
    assert_eq!(neg.phase, Phase::Chunk { remaining: u64::MAX - 5000, answered: false });
}

#[test]
fn guarded_bdat_only_when_the_backend_announced_chunking() {
    // Without CHUNKING the backend would read the chunk as commands: refused here.
    let mut neg = plaintext_with(&opportunistic(), b"250-b\r\n250 AUTH PLAIN\r\n");
    assert_eq!(client(&mut neg, b"BDAT 14 LAST\r\n"), Step::to_client(NOT_IMPLEMENTED.to_vec()));
    assert_eq!(client(&mut neg, b"AUTH PLAIN x\r\n"), Step::to_client(TLS_FIRST.to_vec()));
    // A later EHLO reply decides anew; HELO's announces nothing.
    client(&mut neg, b"EHLO c\r\n");
    backend(&mut neg, b"250-b\r\n250 CHUNKING\r\n");
    assert_eq!(client(&mut neg, b"BDAT 1\r\n").to_backend, b"BDAT 1\r\n".to_vec());
    assert_eq!(neg.on_client(&mut buf(b"x")).map(|s| s.to_backend), Some(b"x".to_vec()));
    backend(&mut neg, b"250 ok\r\n");
    client(&mut neg, b"HELO c\r\n");
    backend(&mut neg, b"250 b\r\n");
    assert_eq!(client(&mut neg, b"BDAT 1\r\n").to_client, NOT_IMPLEMENTED.to_vec());
}

#[test]
fn guarded_command_line_bound_still_applies() {
    let settings = Settings { max_line: 64, ..opportunistic() };
    let mut neg = plaintext_with(&settings, GUARDED_EHLO);
    let mut input = buf(&[b'A'; 100]);
    assert_eq!(neg.on_client(&mut input), Some(Step::to_client(LINE_TOO_LONG.to_vec()).then(Next::Close)));
}
