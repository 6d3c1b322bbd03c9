//! Routed by recipient: mailtls's own answers before the first RCPT, the replay to the
//! chosen backend, deferred recipients, the end of a transaction, failures.

use super::*;

const BACKEND_EHLO: &[u8] = b"250-b1.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n";

fn routed_settings() -> Settings {
    Settings { client: Some("192.0.2.9:4000".parse().expect("address")), ..opportunistic() }
}

/// The plaintext path: the client's EHLO came before, to mailtls's pre-TLS dialogue.
fn routed() -> SmtpRouted {
    let mut neg = SmtpRouted::new(
        &routed_settings(),
        false,
        Some(
            b"EHLO early.test
"
            .to_vec(),
        ),
    );
    assert_eq!(neg.opening(), Some(Step::to_client(Vec::new())));
    neg
}

fn say(neg: &mut SmtpRouted, bytes: &[u8]) -> Step {
    neg.on_client(&mut buf(bytes)).expect("a whole line was sent")
}

fn hear(neg: &mut SmtpRouted, bytes: &[u8]) -> Step {
    neg.on_backend(&mut buf(bytes)).expect("a whole reply was sent")
}

/// EHLO, MAIL and the first RCPT, routed to a backend that accepts all of it: returns what
/// that backend received, byte for byte.
fn first_recipient(neg: &mut SmtpRouted, rcpt: &[u8]) -> Vec<u8> {
    say(neg, b"EHLO sender.test\r\n");
    assert_eq!(
        say(neg, b"MAIL FROM:<a@sender.test> SIZE=100\r\n"),
        Step::to_client(b"250 2.1.0 Ok\r\n".to_vec())
    );
    let step = say(neg, rcpt);
    assert!(matches!(step.next, Next::Recipient { .. }), "{step:?}");
    let mut sent = Vec::new();
    let greeting = neg.on_greeting(&mut buf(b"220 b1.test ESMTP\r\n")).expect("greeted");
    sent.extend(greeting.to_backend);
    assert!(greeting.to_client.is_empty());
    let after_ehlo = hear(neg, BACKEND_EHLO);
    assert!(after_ehlo.to_client.is_empty(), "the client had mailtls's EHLO reply");
    sent.extend(after_ehlo.to_backend);
    let after_mail = hear(neg, b"250 2.1.0 Ok\r\n");
    assert!(after_mail.to_client.is_empty(), "the client had mailtls's MAIL reply");
    sent.extend(after_mail.to_backend);
    assert_eq!(hear(neg, b"250 2.1.5 Ok\r\n"), Step::to_client(b"250 2.1.5 Ok\r\n".to_vec()));
    sent
}

#[test]
fn before_any_recipient_mailtls_answers_everything_itself() {
    let mut neg = routed();
    let ehlo = say(&mut neg, b"EHLO sender.test\r\n");
    let text = String::from_utf8_lossy(&ehlo.to_client).into_owned();
    assert!(
        text.starts_with("250-mx.test\r\n") && text.contains("PIPELINING") && text.contains("CHUNKING"),
        "{text}"
    );
    assert!(
        text.contains("SIZE 10240000") && text.contains("SMTPUTF8") && text.contains("8BITMIME"),
        "{text}"
    );
    for hidden in ["AUTH", "auth=", "STARTTLS", "XCLIENT", "xforward"] {
        assert!(!text.contains(hidden), "{hidden} offered: {text}");
    }
    for (line, reply) in [
        (&b"NOOP\r\n"[..], &b"250 2.0.0 OK\r\n"[..]),
        (b"MAIL FROM:<>\r\n", b"250 2.1.0 Ok\r\n"),
        (b"MAIL FROM:<x@y>\r\n", b"503 5.5.1 Error: nested MAIL command\r\n"),
        (b"DATA\r\n", b"503 5.5.1 Error: need RCPT command\r\n"),
        (b"RSET\r\n", b"250 2.0.0 OK\r\n"),
        (b"RCPT TO:<u@d>\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"AUTH PLAIN eHh4\r\n", b"530 5.7.0 Must issue a STARTTLS command first\r\n"),
        (b"XCLIENT ADDR=1.2.3.4\r\n", b"550 5.7.0 Error: not authorized\r\n"),
        (b"QUIT\r\n", b"221 2.0.0 Bye\r\n"),
    ] {
        let step = say(&mut neg, line);
        assert!(step.to_backend.is_empty(), "{line:?} reached a backend");
        assert_eq!(step.to_client, reply, "{line:?}");
    }
    assert_eq!(neg.stage, super::super::routed::Stage::Over);
}

#[test]
fn the_first_recipient_connects_and_replays_xclient_ehlo_mail_then_the_rcpt() {
    let mut neg = SmtpRouted::new(
        &Settings { xclient: true, ..routed_settings() },
        false,
        Some(b"EHLO x\r\n".to_vec()),
    );
    say(&mut neg, b"EHLO sender.test\r\n");
    say(&mut neg, b"MAIL FROM:<>\r\n");
    assert_eq!(
        say(&mut neg, b"RCPT TO:<Alice@One.test> NOTIFY=NEVER\r\n").next,
        Next::Recipient { address: "Alice@One.test".to_owned() }
    );
    // Nothing is read from the client while the recipient is being routed.
    assert_eq!(neg.on_client(&mut buf(b"RCPT TO:<b@two.test>\r\n")), None);
    let xclient = neg.on_greeting(&mut buf(b"220 b1.test ESMTP\r\n")).expect("greeted");
    assert_eq!(
        xclient.to_backend,
        b"XCLIENT ADDR=192.0.2.9 PORT=4000 NAME=[UNAVAILABLE] HELO=sender.test\r\n"
    );
    assert_eq!(hear(&mut neg, b"220 b1.test ESMTP\r\n").to_backend, b"EHLO sender.test\r\n");
    assert_eq!(hear(&mut neg, BACKEND_EHLO).to_backend, b"MAIL FROM:<>\r\n");
    assert_eq!(hear(&mut neg, b"250 2.1.0 Ok\r\n").to_backend, b"RCPT TO:<Alice@One.test> NOTIFY=NEVER\r\n");
    assert_eq!(hear(&mut neg, b"250 2.1.5 Ok\r\n"), Step::to_client(b"250 2.1.5 Ok\r\n".to_vec()));
}

#[test]
fn later_recipients_are_relayed_or_deferred_and_the_message_reaches_only_its_backend() {
    let mut neg = routed();
    let sent = first_recipient(&mut neg, b"RCPT TO:<a@one.test>\r\n");
    assert_eq!(sent, b"EHLO sender.test\r\nMAIL FROM:<a@sender.test> SIZE=100\r\nRCPT TO:<a@one.test>\r\n");
    // Same backend: relayed, its reply relayed.
    assert!(matches!(say(&mut neg, b"RCPT TO:<c@one.test>\r\n").next, Next::Recipient { .. }));
    assert_eq!(neg.on_recipient(Destination::Current).to_backend, b"RCPT TO:<c@one.test>\r\n");
    assert_eq!(hear(&mut neg, b"550 5.1.1 no such user\r\n").to_client, b"550 5.1.1 no such user\r\n");
    // Another backend: deferred to another transaction, never sent anywhere.
    assert!(matches!(say(&mut neg, b"RCPT TO:<b@two.test>\r\n").next, Next::Recipient { .. }));
    let deferred = neg.on_recipient(Destination::Other);
    assert!(deferred.to_backend.is_empty());
    assert!(deferred.to_client.starts_with(b"452 4.5.3 "), "{deferred:?}");
    // The message, to the one backend, then QUIT and the backend is let go.
    assert_eq!(say(&mut neg, b"DATA\r\n").to_backend, b"DATA\r\n");
    assert_eq!(hear(&mut neg, b"354 go ahead\r\n").to_client, b"354 go ahead\r\n");
    let body = neg.on_client(&mut buf(b"Subject: x\r\n\r\nbody\r\n.\r\n")).expect("body");
    assert_eq!(body.to_backend, b"Subject: x\r\n\r\nbody\r\n.\r\n");
    let end = hear(&mut neg, b"250 2.0.0 Ok: queued as 1\r\n");
    assert_eq!(
        end,
        Step {
            to_backend: b"QUIT\r\n".to_vec(),
            to_client: b"250 2.0.0 Ok: queued as 1\r\n".to_vec(),
            next: Next::Detach
        }
    );
    // The next transaction starts with mailtls answering alone again.
    assert_eq!(
        say(&mut neg, b"MAIL FROM:<a@sender.test>\r\n"),
        Step::to_client(b"250 2.1.0 Ok\r\n".to_vec())
    );
    assert!(matches!(say(&mut neg, b"RCPT TO:<b@two.test>\r\n").next, Next::Recipient { .. }));
    assert!(neg.on_greeting(&mut buf(b"220 b2.test ESMTP\r\n")).is_some());
}

#[test]
fn rset_and_ehlo_end_the_transaction_with_quit() {
    for line in [&b"RSET\r\n"[..], b"EHLO again.test\r\n"] {
        let mut neg = routed();
        first_recipient(&mut neg, b"RCPT TO:<a@one.test>\r\n");
        let step = say(&mut neg, line);
        assert_eq!(
            (step.to_backend.as_slice(), step.next.clone()),
            (&b"QUIT\r\n"[..], Next::Detach),
            "{line:?}"
        );
        assert!(step.to_client.starts_with(b"250"));
        assert_eq!(say(&mut neg, b"DATA\r\n").to_client, b"503 5.5.1 Error: need MAIL command\r\n");
    }
}

#[test]
fn a_refused_first_recipient_or_sender_releases_the_backend() {
    let mut neg = routed();
    say(&mut neg, b"EHLO s\r\n");
    say(&mut neg, b"MAIL FROM:<a@s>\r\n");
    say(&mut neg, b"RCPT TO:<x@one.test>\r\n");
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    hear(&mut neg, BACKEND_EHLO);
    hear(&mut neg, b"250 ok\r\n");
    let refused = hear(&mut neg, b"550 5.1.1 unknown\r\n");
    assert_eq!(
        refused,
        Step {
            to_backend: b"QUIT\r\n".to_vec(),
            to_client: b"550 5.1.1 unknown\r\n".to_vec(),
            next: Next::Detach
        }
    );
    // The next recipient is routed afresh: the sender refused there is this one's answer.
    say(&mut neg, b"RCPT TO:<y@two.test>\r\n");
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    hear(&mut neg, BACKEND_EHLO);
    let refused = hear(&mut neg, b"553 5.7.1 sender rejected\r\n");
    assert_eq!(refused.to_client, b"553 5.7.1 sender rejected\r\n");
    assert_eq!(refused.next, Next::Detach);
    assert_eq!(say(&mut neg, b"DATA\r\n").to_client, b"554 5.5.1 Error: no valid recipients\r\n");
}

#[test]
fn a_backend_that_is_down_fails_only_its_recipient() {
    let mut neg = routed();
    say(&mut neg, b"EHLO s\r\n");
    say(&mut neg, b"MAIL FROM:<a@s>\r\n");
    say(&mut neg, b"RCPT TO:<x@down.test>\r\n");
    assert!(neg.on_route_failed().to_client.starts_with(b"451 4.4.1 "));
    // A backend that greets and then breaks its protocol: the same answer, session goes on.
    say(&mut neg, b"RCPT TO:<y@odd.test>\r\n");
    neg.on_greeting(&mut buf(b"220 b\r\n"));
    let broken = hear(&mut neg, b"nonsense\r\n");
    assert!(broken.to_client.starts_with(b"451 4.4.1 ") && broken.next == Next::Detach, "{broken:?}");
    let step = say(&mut neg, b"RCPT TO:<z@one.test>\r\n");
    assert!(matches!(step.next, Next::Recipient { .. }));
}

#[test]
fn bdat_last_reply_ends_the_transaction_and_chunks_without_recipients_are_dropped() {
    let mut neg = routed();
    first_recipient(&mut neg, b"RCPT TO:<a@one.test>\r\n");
    assert_eq!(say(&mut neg, b"BDAT 5\r\n").to_backend, b"BDAT 5\r\n");
    assert_eq!(neg.on_client(&mut buf(b"ab\r\nc")).expect("chunk").to_backend, b"ab\r\nc");
    assert_eq!(hear(&mut neg, b"250 2.0.0 5 octets\r\n").next, Next::Negotiate);
    let mut last = buf(b"BDAT 3 LAST\r\nQUIT\r\n");
    assert_eq!(neg.on_client(&mut last).expect("line").to_backend, b"BDAT 3 LAST\r\n");
    assert_eq!(
        neg.on_client(&mut last).expect("chunk").to_backend,
        b"QUI",
        "chunk octets are never commands"
    );
    let end = hear(&mut neg, b"250 2.0.0 queued\r\n");
    assert_eq!((end.to_backend.as_slice(), end.next), (&b"QUIT\r\n"[..], Next::Detach));
    // No recipient: the chunk is read and dropped, then refused; what follows is a command.
    say(&mut neg, b"MAIL FROM:<a@s>\r\n");
    let mut input = buf(b"BDAT 4 LAST\r\nAUTHNOOP\r\n");
    assert_eq!(neg.on_client(&mut input).expect("line"), Step::to_client(Vec::new()));
    assert_eq!(
        neg.on_client(&mut input).expect("chunk").to_client,
        b"554 5.5.1 Error: no valid recipients\r\n"
    );
    assert_eq!(neg.on_client(&mut input).expect("command").to_client, b"250 2.0.0 OK\r\n");
}

#[test]
fn the_smuggling_guard_holds_on_the_routed_path() {
    let mut neg =
        SmtpRouted::new(&Settings { bare_newline: BareNewline::Reject, ..routed_settings() }, false, None);
    first_recipient(&mut neg, b"RCPT TO:<a@one.test>\r\n");
    say(&mut neg, b"DATA\r\n");
    hear(&mut neg, b"354 go\r\n");
    let step = neg.on_client(&mut buf(b"x\n.\nMAIL FROM:<evil@x>\r\n")).expect("body");
    assert_eq!(step.next, Next::Close);
    assert!(!step.to_backend.windows(2).any(|w| w == b"\n."), "{:?}", step.to_backend);
    let mut neg = routed();
    first_recipient(&mut neg, b"RCPT TO:<a@one.test>\r\n");
    say(&mut neg, b"DATA\r\n");
    hear(&mut neg, b"354 go\r\n");
    let step = neg.on_client(&mut buf(b"x\n.\nRCPT TO:<b@two.test>\r\n.\r\n")).expect("body");
    assert!(!step.to_backend.windows(2).any(|w| (w[0] == b'\r') != (w[1] == b'\n')), "{:?}", step.to_backend);
    assert_eq!(neg.take_finding().map(|f| f.action), Some(crate::protocol::Action::Normalized));
}

#[test]
fn inside_tls_auth_and_starttls_are_refused_and_implicit_greets() {
    let mut neg = SmtpRouted::new(&routed_settings(), true, None);
    assert_eq!(neg.opening(), Some(Step::to_client(b"220 mx.test ESMTP\r\n".to_vec())));
    say(&mut neg, b"EHLO s\r\n");
    assert_eq!(say(&mut neg, b"AUTH PLAIN eHh4\r\n").to_client, b"502 5.5.1 Command not implemented\r\n");
    assert_eq!(say(&mut neg, b"STARTTLS\r\n").to_client, b"503 5.5.1 Error: TLS already active\r\n");
}

#[test]
fn recipient_addresses_are_parsed_strictly() {
    use super::super::routed::recipient;
    assert_eq!(recipient(Some(b"TO:<a@b.test>")), Some("a@b.test".to_owned()));
    assert_eq!(recipient(Some(b"to: <A@B.test> NOTIFY=NEVER")), Some("A@B.test".to_owned()));
    assert_eq!(recipient(Some(b"TO:<@relay.test,@r2:u@d.test>")), Some("u@d.test".to_owned()));
    assert_eq!(recipient(Some(b"TO:<postmaster>")), Some("postmaster".to_owned()));
    for bad in [&b"TO:<>"[..], b"TO:a@b", b"FROM:<a@b>", b"TO:<a@b", b""] {
        assert_eq!(recipient(Some(bad)), None, "{bad:?}");
    }
    assert_eq!(recipient(None), None);
}

#[test]
fn accepted_recipients_whose_backend_broke_get_a_temporary_reply_to_data() {
    let mut neg = routed();
    first_recipient(&mut neg, b"RCPT TO:<a@one.test>\r\n");
    assert!(matches!(say(&mut neg, b"RCPT TO:<c@one.test>\r\n").next, Next::Recipient { .. }));
    neg.on_recipient(Destination::Current);
    let broken = hear(&mut neg, b"nonsense\r\n");
    assert!(broken.to_client.starts_with(b"451 4.4.1 ") && broken.next == Next::Detach, "{broken:?}");
    // No other backend may take the transaction over: its 250 would stand for a@ too.
    let later = say(&mut neg, b"RCPT TO:<d@two.test>\r\n");
    assert!(later.to_client.starts_with(b"451 4.4.1 ") && later.next == Next::Negotiate, "{later:?}");
    let data = say(&mut neg, b"DATA\r\n");
    assert!(data.to_client.starts_with(b"451 4.4.1 "), "a permanent reply would bounce a: {data:?}");
    assert!(data.to_backend.is_empty());
    // The next transaction is routed afresh.
    say(&mut neg, b"RSET\r\n");
    say(&mut neg, b"MAIL FROM:<>\r\n");
    assert!(matches!(say(&mut neg, b"RCPT TO:<d@two.test>\r\n").next, Next::Recipient { .. }));
}
