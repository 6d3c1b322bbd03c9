//! Property-based fuzzing of the protocol state machines through their public interface:
//! arbitrary byte streams, cut at arbitrary points, fed to the pre-TLS dialogue
//! (`PreTls::on_client`) and to the negotiation (`on_greeting`, `on_client`, `on_backend`)
//! of every protocol and every way in (implicit TLS, after STARTTLS, opportunistic
//! plaintext SMTP), with the real bounds and with small ones.
//!
//! Properties: no panic; every step makes progress (a machine that answers without
//! consuming would spin the session forever); what a machine leaves buffered stays within
//! the bound the session reads up to; a step's output is bounded by what it consumed plus
//! a constant; IMAP capability data reaching the client after TLS never lists STARTTLS or
//! LOGINDISABLED.
//!
//! The budget is `PROPTEST_CASES` cases per target (default 1500 here); benches/
//! reliability.sh runs a larger one. A failure prints the shrunk input; it then becomes a
//! regression test.

use std::sync::Arc;

use bytes::BytesMut;
use mailtls::protocol::smtp_guard::{first_bare_newline, SmtpGuard};
use mailtls::protocol::{self, BareNewline, Entry, Next, PreTlsStep, Protocol, Settings};
use mailtls::relay::{ClientFilter, Verdict};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1500);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Words that steer the machines into their interesting states.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\0",
    b"a ",
    b"* ",
    b"+ ",
    b"STARTTLS",
    b"STLS",
    b"LOGINDISABLED",
    b"CAPABILITY",
    b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN\r\n",
    b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
    b"* PREAUTH ok\r\n",
    b"* BYE no\r\n",
    b"a OK done\r\n",
    b"a NO no\r\n",
    b"a BAD bad\r\n",
    b"+ \r\n",
    b"+OK\r\n",
    b"-ERR no\r\n",
    b"+OK ready <1.2@x>\r\n",
    b"CAPA\r\n",
    b"+OK\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
    b".\r\n",
    b"220 ok\r\n",
    b"250-x\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250 SIZE 10\r\n",
    b"250 ok\r\n",
    b"235 ok\r\n",
    b"334 \r\n",
    b"354 go\r\n",
    b"421 bye\r\n",
    b"554 no\r\n",
    b"a LOGIN u p\r\n",
    b"a LOGIN {5}\r\n",
    b"{5+}\r\n",
    b"{4294967296}\r\n",
    b"{0}\r\n",
    b"{65536}\r\n",
    b"a AUTHENTICATE PLAIN\r\n",
    b"a AUTHENTICATE PLAIN AGEAYg==\r\n",
    b"a STARTTLS\r\n",
    b"a CAPABILITY\r\n",
    b"a NOOP\r\n",
    b"a ID NIL\r\n",
    b"a LOGOUT\r\n",
    b"a SELECT INBOX\r\n",
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGEAYg==\r\n",
    b"AUTH LOGIN\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<a@b>\r\n",
    b"DATA\r\n",
    b"\r\n.\r\n",
    b"BDAT 5\r\n",
    b"BDAT 0 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"VRFY x\r\n",
    b"XCLIENT ADDR=1.2.3.4\r\n",
    b"USER u\r\n",
    b"PASS p\r\n",
    b"APOP u d\r\n",
    b"AUTH\r\n",
    b"STLS\r\n",
    b"*\r\n",
    b"AGEAYg==\r\n",
];

/// A piece of a stream: a protocol word, a run of one byte, or random bytes.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(TOKENS).prop_map(|t| t.to_vec()),
        1 => (any::<u8>(), 0usize..1200).prop_map(|(b, n)| vec![b; n]),
        2 => prop::collection::vec(any::<u8>(), 0..48),
    ]
}

/// A stream cut into chunks, as the network might deliver it.
fn chunks(max: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(piece(), 0..6).prop_map(|p| p.concat()), 0..max)
}

/// The real bounds, or small ones (so that limits are reached often).
fn settings(small: bool, require_tls: bool, extensions: u8) -> Settings {
    let backend_extensions: &[&str] = match extensions % 3 {
        0 => &[],
        1 => &["SIZE 10240000", "PIPELINING", "CHUNKING"],
        _ => &["SIZE 1", "AUTH PLAIN", "XCLIENT ADDR"],
    };
    let base = Settings {
        require_tls,
        backend_extensions: Arc::from(backend_extensions.iter().map(|e| e.to_string()).collect::<Vec<_>>()),
        client: Some("192.0.2.9:1234".parse().expect("address")),
        ..Settings::default()
    };
    if small {
        Settings {
            max_pre_tls_line: 64,
            max_line: 128,
            max_literal: 100,
            max_pre_tls_commands: 12,
            max_errors: 4,
            ..base
        }
    } else {
        base
    }
}

fn protocol_of(n: u8) -> Protocol {
    match n % 3 {
        0 => Protocol::Smtp,
        1 => Protocol::Imap,
        _ => Protocol::Pop3,
    }
}

/// Replies a machine writes itself are short; relayed units are bounded by the line and
/// literal bounds. Anything larger than consumed bytes plus this is amplification.
const OWN_WORDS: usize = 4096;

fn check_pre_tls(protocol: Protocol, s: &Settings, stream: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut dialogue = protocol::pre_tls(protocol, s);
    prop_assert!(!dialogue.greeting().is_empty());
    let mut input = BytesMut::new();
    for chunk in stream {
        input.extend_from_slice(chunk);
        let start = input.len();
        let mut steps = 0;
        loop {
            let before = input.len();
            let Some(step) = dialogue.on_client(&mut input) else { break };
            steps += 1;
            prop_assert!(steps <= start + 1, "steps without progress");
            match step {
                PreTlsStep::Reply(r) => {
                    prop_assert!(input.len() < before, "a reply that consumed nothing");
                    prop_assert!(r.len() <= before - input.len() + OWN_WORDS, "reply of {} bytes", r.len());
                }
                // The session leaves the dialogue here.
                PreTlsStep::StartTls(_) | PreTlsStep::Close(_) | PreTlsStep::Plaintext { .. } => {
                    return Ok(())
                }
            }
        }
        // The session reads at most up to limits.max_line; an undecided line is below the
        // pre-TLS bound (it is reported as too long, never waited for, once it reaches it).
        prop_assert!(input.len() < s.max_pre_tls_line, "{} bytes left undecided", input.len());
    }
    Ok(())
}

/// Reads what an IMAP client would see and checks that capability data (an untagged
/// CAPABILITY or a [CAPABILITY ...] code at the start of a response line) sent after TLS
/// never offers STARTTLS or LOGINDISABLED. Literal data (`{n}` then n bytes) is message
/// content, relayed verbatim, and is skipped as a client's parser skips it.
#[derive(Default)]
struct CapabilityWatch {
    literal_left: usize,
    /// Bytes of the current line so far; `None` inside the continuation after a literal.
    line: Option<Vec<u8>>,
}

impl CapabilityWatch {
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.literal_left > 0 {
                let k = self.literal_left.min(bytes.len());
                self.literal_left -= k;
                bytes = &bytes[k..];
                continue;
            }
            let (part, lf) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = &bytes[part.len() + usize::from(lf)..];
            if let Some(line) = self.line.as_mut() {
                line.extend_from_slice(part);
            }
            if !lf {
                continue;
            }
            if let Some(line) = self.line.take() {
                check_capability_line(&line)?;
            }
            let whole = String::from_utf8_lossy(part).trim_end_matches('\r').to_owned();
            match literal_size(&whole) {
                Some(n) => self.literal_left = n,
                None => self.line = Some(Vec::new()),
            }
        }
        Ok(())
    }
}

/// `{n}` or `{n+}` at the end of a line.
fn literal_size(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?.rsplit_once('{')?.1;
    inner.trim_end_matches('+').parse().ok()
}

/// A response line in IMAP's grammar (`tag SP ...`, the tag never empty) that carries
/// capability data: `* CAPABILITY ...`, or a status response with a `[CAPABILITY ...]` code.
fn check_capability_line(line: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(line).trim_end_matches('\r').to_ascii_uppercase();
    let words: Vec<&str> = text.split(' ').collect();
    let caps: &[&str] = match words.as_slice() {
        [tag, "CAPABILITY", caps @ ..] if *tag == "*" => caps,
        [tag, "OK" | "NO" | "BAD" | "PREAUTH" | "BYE", code, rest @ ..]
            if !tag.is_empty() && code.starts_with("[CAPABILITY") =>
        {
            let end = rest.iter().position(|w| w.contains(']')).map_or(rest.len(), |i| i + 1);
            &rest[..end]
        }
        _ => &[],
    };
    if caps.iter().any(|w| matches!(w.trim_end_matches(']'), "STARTTLS" | "LOGINDISABLED")) {
        return Err(format!("capabilities after TLS: {text:?}"));
    }
    Ok(())
}

fn check_negotiation(
    protocol: Protocol,
    s: &Settings,
    entry: Entry,
    greeting: &[u8],
    stream: &[(bool, Vec<u8>)],
) -> Result<(), TestCaseError> {
    let after_tls = entry != (Entry::Plaintext { replay: b"EHLO x\r\n".to_vec() });
    let mut n = protocol::negotiation(protocol, s, entry);
    // What the session reads up to on either side before it stops reading that side.
    let bound = s.max_line + s.max_literal as usize;
    let reply_bound = s.max_line.saturating_mul(4).max(bound);
    let mut backend = BytesMut::from(greeting);
    let mut client = BytesMut::new();
    let mut greeted = false;
    let mut watch = CapabilityWatch { line: Some(Vec::new()), ..CapabilityWatch::default() };
    let mut check_step = |step: &protocol::Step, consumed: usize| -> Result<(), TestCaseError> {
        let out = step.to_client.len() + step.to_backend.len();
        prop_assert!(out <= consumed + OWN_WORDS, "{out} bytes out for {consumed} in");
        if protocol == Protocol::Imap && after_tls {
            if let Err(e) = watch.feed(&step.to_client) {
                return Err(TestCaseError::fail(e));
            }
        }
        Ok(())
    };
    for (from_client, chunk) in stream {
        // As the session does: a side whose buffer is past the bound is not read further
        // until the machine has drained it.
        if *from_client {
            if client.len() <= bound {
                client.extend_from_slice(chunk);
            }
        } else if backend.len() <= bound {
            backend.extend_from_slice(chunk);
        }
        if !greeted {
            let before = backend.len();
            match n.on_greeting(&mut backend) {
                None => {
                    prop_assert!(backend.len() <= reply_bound, "greeting buffer {}", backend.len());
                    continue;
                }
                Some(step) => {
                    check_step(&step, before - backend.len())?;
                    greeted = true;
                    if step.next != Next::Negotiate {
                        return Ok(());
                    }
                }
            }
        }
        // The session's loop: the backend first, then the client, until neither moves.
        let mut steps = 0;
        let available = backend.len() + client.len();
        loop {
            let (b, c) = (backend.len(), client.len());
            let step = match n.on_backend(&mut backend) {
                Some(step) => step,
                None => match n.on_client(&mut client) {
                    Some(step) => step,
                    None => break,
                },
            };
            steps += 1;
            prop_assert!(steps <= available + 2, "steps without progress");
            let consumed = (b - backend.len()) + (c - client.len());
            check_step(&step, consumed)?;
            if step.next != Next::Negotiate {
                return Ok(());
            }
        }
        // A response is decided (relayed, rewritten or refused) once it is complete or too
        // long; only its undecided tail stays buffered.
        prop_assert!(backend.len() <= reply_bound, "backend bytes left undecided: {}", backend.len());
    }
    Ok(())
}

fn entry_of(protocol: Protocol, n: u8) -> Entry {
    match (protocol, n % 3) {
        (_, 0) => Entry::Implicit,
        (Protocol::Smtp, 2) => Entry::Plaintext { replay: b"EHLO x\r\n".to_vec() },
        _ => Entry::AfterStartTls,
    }
}

/// A plausible greeting for the protocol, or arbitrary bytes.
fn greeting(protocol: Protocol, kind: u8) -> Vec<u8> {
    match (kind % 4, protocol) {
        (0, _) => Vec::new(),
        (1, Protocol::Smtp) => b"220 backend ESMTP\r\n".to_vec(),
        (1, Protocol::Imap) => {
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN] hi\r\n".to_vec()
        }
        (1, Protocol::Pop3) => b"+OK ready\r\n".to_vec(),
        (2, Protocol::Imap) => b"* OK hi\r\n".to_vec(),
        (2, _) => b"220-multi\r\n220 line\r\n".to_vec(),
        _ => b"\r\n".to_vec(),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pre_tls_smtp(stream in chunks(24), small in any::<bool>(), require in any::<bool>(), ext in any::<u8>()) {
        check_pre_tls(Protocol::Smtp, &settings(small, require, ext), &stream)?;
    }

    #[test]
    fn pre_tls_imap(stream in chunks(24), small in any::<bool>()) {
        check_pre_tls(Protocol::Imap, &settings(small, true, 0), &stream)?;
    }

    #[test]
    fn pre_tls_pop3(stream in chunks(24), small in any::<bool>()) {
        check_pre_tls(Protocol::Pop3, &settings(small, true, 0), &stream)?;
    }

    #[test]
    fn negotiation_smtp(
        stream in prop::collection::vec((any::<bool>(), chunks(4).prop_map(|c| c.concat())), 0..24),
        small in any::<bool>(), require in any::<bool>(), ext in any::<u8>(), entry in any::<u8>(), g in any::<u8>(),
    ) {
        let s = Settings { xclient: ext % 5 == 0, ..settings(small, require, ext) };
        check_negotiation(Protocol::Smtp, &s, entry_of(Protocol::Smtp, entry), &greeting(Protocol::Smtp, g), &stream)?;
    }

    #[test]
    fn negotiation_imap(
        stream in prop::collection::vec((any::<bool>(), chunks(4).prop_map(|c| c.concat())), 0..24),
        small in any::<bool>(), entry in any::<u8>(), g in any::<u8>(),
    ) {
        check_negotiation(Protocol::Imap, &settings(small, true, 0), entry_of(Protocol::Imap, entry), &greeting(Protocol::Imap, g), &stream)?;
    }

    #[test]
    fn negotiation_pop3(
        stream in prop::collection::vec((any::<bool>(), chunks(4).prop_map(|c| c.concat())), 0..24),
        small in any::<bool>(), entry in any::<u8>(), g in any::<u8>(),
    ) {
        check_negotiation(Protocol::Pop3, &settings(small, true, 0), entry_of(Protocol::Pop3, entry), &greeting(Protocol::Pop3, g), &stream)?;
    }

    /// Any protocol, any entry, any greeting bytes: the machines never panic.
    #[test]
    fn negotiation_any_greeting(
        p in any::<u8>(), entry in any::<u8>(), greeting in prop::collection::vec(any::<u8>(), 0..300),
        stream in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..200)), 0..12),
    ) {
        let protocol = protocol_of(p);
        check_negotiation(protocol, &settings(true, true, 1), entry_of(protocol, entry), &greeting, &stream)?;
    }
}

/// The checker itself: it sees a hidden capability where a client would, and not inside
/// literal data.
#[test]
fn capability_watch_sees_what_a_client_sees() {
    let mut w = CapabilityWatch { line: Some(Vec::new()), ..CapabilityWatch::default() };
    assert!(w.feed(b"* CAPABILITY IMAP4rev1 STARTTLS\r\n").is_err());
    let mut w = CapabilityWatch { line: Some(Vec::new()), ..CapabilityWatch::default() };
    assert!(w.feed(b"a OK [CAPABILITY IMAP4rev1 LOGINDISABLED] done\r\n").is_err());
    let mut w = CapabilityWatch { line: Some(Vec::new()), ..CapabilityWatch::default() };
    assert!(w.feed(b"* 1 FETCH (BODY[] {33}\r\n* CAPABILITY IMAP4rev1 STARTTLS)\r\n").is_ok());
    assert!(w.feed(b"* CAPABILITY IMAP4rev1 IDLE\r\n").is_ok());
    assert!(w.feed(b"* CAPABI").is_ok());
    assert!(w.feed(b"LITY STARTTLS\r\n").is_err(), "a line split across steps");
}

// ---- regressions found by the targets above ---------------------------------------------

/// Found by `negotiation_imap`: a local reply (here to a second STARTTLS) written while a
/// backend response was half-relayed, its literal still coming, landed inside the literal:
/// the client read the reply as literal data and the literal's tail as new lines (so a
/// crafted tail could show STARTTLS after TLS). Local replies now wait for the response
/// to end.
#[test]
fn imap_local_reply_never_lands_inside_a_backend_literal() {
    let mut n = protocol::negotiation(Protocol::Imap, &Settings::default(), Entry::Implicit);
    let mut backend = BytesMut::from(&b"* OK hi\r\n"[..]);
    let mut to_client = n.on_greeting(&mut backend).expect("greeting").to_client;
    let mut client = BytesMut::new();
    let mut run = |backend: &mut BytesMut, client: &mut BytesMut, out: &mut Vec<u8>| loop {
        let step = match n.on_backend(backend) {
            Some(step) => step,
            None => match n.on_client(client) {
                Some(step) => step,
                None => return,
            },
        };
        assert!(step.to_backend.is_empty(), "nothing is forwarded here");
        out.extend_from_slice(&step.to_client);
    };
    // An untagged response whose literal arrives in two segments, and between them a
    // command the proxy answers itself.
    backend.extend_from_slice(b"* ID (\"name\" {7}\r\nDov");
    client.extend_from_slice(b"b STARTTLS\r\n");
    run(&mut backend, &mut client, &mut to_client);
    backend.extend_from_slice(b"ecot)\r\n");
    run(&mut backend, &mut client, &mut to_client);
    assert_eq!(
        String::from_utf8_lossy(&to_client),
        "* OK hi\r\n* ID (\"name\" {7}\r\nDovecot)\r\nb BAD TLS is already active\r\n"
    );
}

// ---------------------------------------------------------------------------------------
// The SMTP smuggling guard (issue 17)

/// Words of an SMTP client stream that reach every state of the guard.
const SMTP_TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r.\r",
    b"DATA\r\n",
    b"data\n",
    b"MAIL FROM:<ceo@mail.test>\r\n",
    b"RCPT TO:<a@b>\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"HELO x\r\n",
    b"EHLO x\r\n",
    b" ",
    b"\t",
    b"text",
    b"\xc3\xa9\xe2\x82\xac\xff\x00",
];

fn smtp_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(SMTP_TOKENS).prop_map(|t| t.to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..24),
        ],
        0..64,
    )
    .prop_map(|pieces| pieces.concat())
}

/// `stream` cut at the (sorted, de-duplicated) offsets in `cuts`.
fn cut<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut pieces = Vec::new();
    let mut from = 0;
    for p in points.into_iter().chain([stream.len()]) {
        pieces.push(&stream[from..p]);
        from = p;
    }
    pieces
}

/// What the backend receives from a guard fed `pieces`; `true` when it was refused.
fn guarded(policy: BareNewline, chunking: bool, pieces: &[&[u8]]) -> (Vec<u8>, bool) {
    let mut guard = SmtpGuard::new(policy, chunking);
    let mut sent = Vec::new();
    for piece in pieces {
        let mut out = Vec::new();
        match guard.filter(piece, &mut out) {
            Verdict::Clean => sent.extend_from_slice(piece),
            Verdict::Changed => sent.extend_from_slice(&out),
            Verdict::Refuse(_) => {
                sent.extend_from_slice(&out);
                return (sent, true);
            }
        }
    }
    let mut out = Vec::new();
    let refused = matches!(guard.finish(&mut out), Verdict::Refuse(_));
    sent.extend_from_slice(&out);
    (sent, refused)
}

/// Where a strict backend (CRLF lines only) ends DATA bodies in `stream`, as offsets.
fn strict_ends_of_data(stream: &[u8]) -> usize {
    let (mut ends, mut in_body, mut rest) = (0, false, stream);
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = &rest[..end];
        rest = &rest[end + 2..];
        if in_body && line == b"." {
            in_body = false;
            ends += 1;
        } else if !in_body && line.eq_ignore_ascii_case(b"DATA") {
            in_body = true;
        }
    }
    ends
}

/// `body` with every real CRLF "." CRLF (the DATA line's CRLF counting as the first)
/// dot-stuffed, as a client would send it.
fn without_end_of_data(mut body: Vec<u8>) -> Vec<u8> {
    loop {
        let framed = [b"\r\n", &body[..]].concat();
        let Some(at) = framed.windows(5).position(|w| w == b"\r\n.\r\n") else { return body };
        // framed[at + 2] is the dot; in `body` it sits two octets earlier.
        body.insert(at, b'.');
    }
}

proptest! {
    #![proptest_config(config())]

    /// Whatever the client sends, cut wherever: the backend never sees a bare CR or LF
    /// (no BDAT window is open without CHUNKING), and the cuts change nothing.
    #[test]
    fn smtp_guard_output_never_holds_a_bare_newline(
        stream in smtp_stream(), cuts in prop::collection::vec(any::<usize>(), 0..8), reject in any::<bool>(),
    ) {
        let policy = if reject { BareNewline::Reject } else { BareNewline::Normalize };
        let (whole, whole_refused) = guarded(policy, false, &[&stream]);
        prop_assert_eq!(first_bare_newline(&whole), None, "{:?}", String::from_utf8_lossy(&whole));
        let (pieces, refused) = guarded(policy, false, &cut(&stream, &cuts));
        prop_assert_eq!(&pieces, &whole, "output depends on where reads were cut");
        prop_assert_eq!(refused, whole_refused);
    }

    /// CRLF-clean input (no bare CR/LF, no BDAT line) passes byte for byte, cut anywhere.
    #[test]
    fn smtp_guard_passes_crlf_clean_input_unchanged(
        lines in prop::collection::vec(smtp_stream(), 0..12), cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let clean: Vec<Vec<u8>> = lines
            .into_iter()
            .map(|l| l.into_iter().filter(|&b| b != b'\r' && b != b'\n').collect::<Vec<u8>>())
            .filter(|l| !l.trim_ascii_start().get(..4).is_some_and(|w| w.eq_ignore_ascii_case(b"BDAT")))
            .collect();
        let stream: Vec<u8> = clean.iter().flat_map(|l| l.iter().chain(b"\r\n")).copied().collect();
        for policy in [BareNewline::Normalize, BareNewline::Reject] {
            let (sent, refused) = guarded(policy, true, &cut(&stream, &cuts));
            prop_assert!(!refused);
            prop_assert_eq!(&sent, &stream);
        }
    }

    /// The smuggling property: a DATA body holding any mix of bare line endings and dot
    /// lines, but no real CRLF "." CRLF, ends at the client's real end of data only.
    #[test]
    fn smtp_guard_body_ends_only_at_the_clients_end_of_data(
        body in smtp_stream(), cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let body = without_end_of_data(body);
        let stream = [&b"MAIL FROM:<a@b>\r\nDATA\r\n"[..], &body, b"\r\n.\r\nQUIT\r\n"].concat();
        let (sent, refused) = guarded(BareNewline::Normalize, false, &cut(&stream, &cuts));
        prop_assert!(!refused);
        prop_assert_eq!(strict_ends_of_data(&sent), 1, "{:?}", String::from_utf8_lossy(&sent));
        prop_assert!(sent.ends_with(b"\r\n.\r\nQUIT\r\n"));
    }
}
