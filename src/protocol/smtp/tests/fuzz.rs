//! Hostile input: random bytes never panic and buffers stay bounded.

use super::*;

use crate::protocol::testing::XorShift;

impl XorShift {
    /// Mostly SMTP-shaped pieces, so the fuzzing reaches past the parsers.
    fn chunk(&mut self) -> Vec<u8> {
        const PIECES: [&[u8]; 25] = [
            b"EHLO x",
            b"HELO",
            b"STARTTLS",
            b"AUTH PLAIN",
            b"MAIL FROM:<>",
            b"RCPT",
            b"250-",
            b"250 ",
            b"334 ",
            b"235 ",
            b"220 ",
            b"220-",
            b"\r\n",
            b"\n",
            b"\r",
            b"\0",
            b" ",
            b"XCLIENT",
            b"*",
            b"\xff\xfe",
            b"DATA",
            b"BDAT 7",
            b"BDAT 3 LAST",
            b".",
            b"\r\n.\r\n",
        ];
        let mut out = Vec::new();
        for _ in 0..self.below(8) {
            if self.below(3) == 0 {
                out.extend((0..self.below(40)).map(|_| self.next() as u8));
            } else {
                out.extend_from_slice(PIECES[self.below(PIECES.len())]);
            }
        }
        out
    }
}

impl XorShift {
    /// Client bytes for the negotiation: sometimes whole commands, so the guarded
    /// session's DATA bodies and BDAT chunks are reached too.
    fn client_chunk(&mut self) -> Vec<u8> {
        const LINES: [&[u8]; 6] = [
            b"DATA\r\n",
            b"BDAT 7\r\n",
            b"BDAT 3 LAST\r\n",
            b"MAIL FROM:<>\r\n",
            b"x\r\n.\r\n",
            b"AUTH PLAIN eHh4\r\n",
        ];
        match self.below(3) {
            0 => LINES[self.below(LINES.len())].to_vec(),
            _ => self.chunk(),
        }
    }

    /// Backend bytes: mostly well-formed replies, so sessions live long enough to matter.
    fn backend_chunk(&mut self) -> Vec<u8> {
        const REPLIES: [&[u8]; 10] = [
            b"250-b\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n",
            b"250-b\r\n250 XCLIENT\r\n",
            b"250 ok\r\n",
            b"334 \r\n",
            b"334 VXNlcg==\n",
            b"235 2.7.0 ok\r\n",
            b"535 no\r\n",
            b"214-a\r\n",
            b"354 go ahead\r\n",
            b"250-b\r\n250-CHUNKING\r\n250 AUTH LOGIN\r\n",
        ];
        match self.below(4) {
            0 => self.chunk(),
            _ => REPLIES[self.below(REPLIES.len())].to_vec(),
        }
    }
}

pub(super) fn fuzz_settings(rng: &mut XorShift) -> Settings {
    // Guarded (AUTH offered, or nothing known) and opaque plaintext sessions alike.
    let backend_extensions: &[&str] = match rng.below(3) {
        0 => &["SIZE 1", "AUTH X"],
        1 => &["SIZE 1", "CHUNKING"],
        _ => &[],
    };
    Settings {
        require_tls: rng.below(2) == 0,
        max_pre_tls_line: 64,
        max_line: 96,
        max_pre_tls_commands: 20,
        max_errors: 5,
        backend_extensions: Arc::from(backend_extensions.iter().map(|e| e.to_string()).collect::<Vec<_>>()),
        client: Some("192.0.2.9:1".parse().expect("address")),
        ..settings()
    }
}

#[test]
fn random_bytes_never_panic_and_buffers_stay_bounded() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let (mut guarded_sessions, mut bodies, mut chunks) = (0, 0, 0);
    for iteration in 0..3000 {
        // Every fifth session also sends XCLIENT; decided apart from the generator, so
        // the byte sequences stay the ones the coverage bounds below were tuned on.
        let settings = Settings { xclient: iteration % 5 == 0, ..fuzz_settings(&mut rng) };

        let mut pre = SmtpPreTls::new(&settings);
        let mut input = BytesMut::new();
        for _ in 0..10 {
            input.extend_from_slice(&rng.chunk());
            while pre.on_client(&mut input).is_some() {}
            assert!(pre.finished || input.len() < settings.max_pre_tls_line);
        }

        let entry = match rng.below(3) {
            0 => Entry::Implicit,
            1 => Entry::AfterStartTls,
            _ => Entry::Plaintext { replay: b"EHLO x\r\n".to_vec() },
        };
        let mut neg = SmtpNegotiation::new(&settings, entry);
        let (mut from_client, mut from_backend) = (BytesMut::new(), BytesMut::new());
        let reply_bound = settings.max_line * 4;
        for round in 0..20 {
            if round == 0 && rng.below(4) != 0 {
                from_backend.extend_from_slice(b"220 ok\r\n");
            }
            from_backend.extend_from_slice(&rng.backend_chunk());
            from_client.extend_from_slice(&rng.client_chunk());
            while neg.on_greeting(&mut from_backend).is_some() {}
            while neg.on_backend(&mut from_backend).is_some() {}
            while neg.on_client(&mut from_client).is_some() {}
            guarded_sessions += usize::from(round == 0 && neg.mode == Mode::PlaintextGuarded);
            bodies += usize::from(matches!(neg.phase, Phase::DataBody { .. }));
            chunks += usize::from(matches!(neg.phase, Phase::Chunk { .. }));
            if neg.phase == Phase::Over {
                break;
            }
            assert!(from_backend.len() < reply_bound);
            if matches!(neg.phase, Phase::Idle | Phase::SaslResponse) {
                assert!(from_client.len() < settings.max_line);
            }
            if matches!(neg.phase, Phase::DataBody { .. } | Phase::Chunk { .. }) {
                assert!(from_client.is_empty(), "content is streamed, never held");
            }
        }

        let mut probe = Probe::new("p");
        let mut input = BytesMut::new();
        for _ in 0..10 {
            input.extend_from_slice(&rng.chunk());
            while probe.on_backend(&mut input).is_some() {}
        }
    }
    assert!(guarded_sessions > 100 && bodies > 5 && chunks > 5, "{guarded_sessions} {bodies} {chunks}");
}

#[test]
fn routed_sessions_survive_random_bytes_with_buffers_bounded() {
    use super::super::routed::Stage;
    const LINES: [&[u8]; 9] = [
        b"EHLO x\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<a@one.test>\r\n",
        b"RCPT TO:<b@two.test>\r\n",
        b"DATA\r\n",
        b"BDAT 5\r\n",
        b"BDAT 3 LAST\r\n",
        b"x\r\n.\r\n",
        b"RSET\r\n",
    ];
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let (mut routed, mut bodies) = (0, 0);
    for iteration in 0..2000 {
        let settings = Settings { xclient: iteration % 4 == 0, max_errors: 50, ..fuzz_settings(&mut rng) };
        let helo = (rng.below(2) == 0).then(|| b"EHLO early\r\n".to_vec());
        let mut neg = SmtpRouted::new(&settings, rng.below(2) == 0, helo);
        let _ = neg.opening();
        let (mut from_client, mut from_backend) = (BytesMut::new(), BytesMut::new());
        let mut attached = false;
        'session: for _ in 0..30 {
            match rng.below(3) {
                0 => from_client.extend_from_slice(&rng.client_chunk()),
                _ => from_client.extend_from_slice(LINES[rng.below(LINES.len())]),
            }
            if attached {
                // Mostly the replies a transaction needs, so sessions get far.
                let reply = match rng.below(4) {
                    0 => rng.backend_chunk(),
                    1 => b"354 go\r\n".to_vec(),
                    _ => b"250 ok\r\n".to_vec(),
                };
                from_backend.extend_from_slice(&reply);
            }
            loop {
                let step = match neg.on_backend(&mut from_backend) {
                    Some(step) => step,
                    None => match neg.on_client(&mut from_client) {
                        Some(step) => step,
                        None => break,
                    },
                };
                let mut next = step.next;
                // The session's side of routing, decided at random.
                while let Next::Recipient { .. } = next {
                    routed += 1;
                    next = match (attached, rng.below(3)) {
                        (true, 0) => neg.on_recipient(Destination::Other).next,
                        (true, _) => neg.on_recipient(Destination::Current).next,
                        (false, 0) => neg.on_route_failed().next,
                        (false, _) => {
                            from_backend.clear();
                            match neg.on_greeting(&mut BytesMut::from(&b"220 b\r\n"[..])) {
                                Some(s) if s.next == Next::Unavailable => neg.on_route_failed().next,
                                Some(s) => {
                                    attached = true;
                                    s.next
                                }
                                None => neg.on_route_failed().next,
                            }
                        }
                    };
                }
                match next {
                    Next::Detach => {
                        attached = false;
                        from_backend.clear();
                    }
                    Next::Close | Next::Unavailable | Next::Relay => break 'session,
                    _ => {}
                }
            }
            bodies += usize::from(matches!(neg.stage, Stage::Content { .. }));
            assert!(from_backend.len() < settings.max_line * 4 + 128);
            if neg.stage == Stage::Idle {
                assert!(from_client.len() < settings.max_line, "{:?}", neg.stage);
            }
        }
    }
    assert!(routed > 800 && bodies > 50, "{routed} {bodies}");
}
