//! Interop for SMTP routed by recipient: two real Postfix mailbox servers behind one mailtls
//! MX listener, a third real Postfix as the sending MTA (relayhost = mailtls), and swaks and
//! a raw BDAT client through the same listener.
//!
//! These need root and the Debian packages tests/run.sh installs, so plain `cargo test`
//! skips them; tests/run.sh runs them.

#[allow(unused_imports)]
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::mailservers::{run, RoutedMx, SmtpLines, CLIENT_TIMEOUT, MX_USERS};

const SENDER: &str = "carol@sender.test";

fn reply(c: &mut SmtpLines) -> String {
    c.reply().expect("reply")
}

/// The lines of `log` about `recipient` (Postfix writes `to=<recipient>` on each).
fn about<'a>(log: &'a str, recipient: &str) -> Vec<&'a str> {
    let needle = format!("to=<{recipient}>");
    log.lines().filter(|l| l.contains(&needle)).collect()
}

/// The `delay=` of a Postfix delivery line, in seconds.
fn delay(line: &str) -> Option<f64> {
    line.split(", ").find_map(|f| f.strip_prefix("delay=")).and_then(|d| d.parse().ok())
}

#[test]
#[ignore = "needs postfix: run tests/run.sh"]
fn a_real_sending_postfix_delivers_to_two_mailbox_servers_through_one_routed_mx() {
    let site = RoutedMx::start();
    let [alice, bob] = MX_USERS;
    let mut swaks = Command::new("swaks");
    swaks
        .args(["--server", &format!("127.0.0.1:{}", site.sender_smtpd)])
        .args(["--from", SENDER, "--to", &format!("{alice},{bob}")])
        .args(["--header", "Subject: one message, two mailbox servers"])
        .args(["--body", "routed by recipient\n.a dot line\n"])
        .stdin(Stdio::null());
    let out = run(&mut swaks, CLIENT_TIMEOUT);
    assert!(out.success(), "injecting into the sending Postfix: {}{}", out.stdout, out.stderr);

    let both = site.wait(Duration::from_secs(90), |s| s.delivered(0).len() == 1 && s.delivered(1).len() == 1);
    assert!(both, "not both delivered; sender log:\n{}", site.maillog(2));
    for i in 0..2 {
        let message = &site.delivered(i)[0];
        assert!(message.contains("Subject: one message, two mailbox servers"), "{message}");
        assert!(message.contains("routed by recipient\n.a dot line\n"), "{message}");
    }

    // Each mailbox server saw only its own recipient, from the sender's real address.
    for (i, (own, other)) in [(alice, bob), (bob, alice)].into_iter().enumerate() {
        let log = site.maillog(i);
        assert!(!about(&log, own).is_empty(), "server {i} never delivered {own}:\n{log}");
        assert!(!log.contains(other), "server {i} saw {other}:\n{log}");
        assert!(
            log.contains("connect from unknown[127.0.0.2]"),
            "server {i}: no real client address:\n{log}"
        );
        assert!(log.contains(&format!("from=<{SENDER}>")), "server {i}:\n{log}");
    }

    // The sender's log: alice sent at once, bob deferred by 452 4.5.3, then sent on retry.
    let sender = site.maillog(2);
    let first = about(&sender, alice);
    assert!(first.iter().any(|l| l.contains("status=sent")), "{sender}");
    let bob_lines = about(&sender, bob);
    let deferred = bob_lines.iter().find(|l| l.contains("452 4.5.3"));
    let sent = bob_lines.iter().find(|l| l.contains("status=sent")).expect("bob sent in the end");
    eprintln!("sending Postfix, the deferred recipient:\n{}", bob_lines.join("\n"));
    match deferred {
        Some(line) => assert!(line.contains("status=deferred"), "{line}"),
        // Postfix may also retry such a recipient at once, in a new transaction.
        None => eprintln!("no 452 line: Postfix retried bob within the same delivery"),
    }
    let waited = delay(sent).expect("delay= on the sent line");
    eprintln!(
        "ROUTED-MX RETRY: bob@two.test delivered {waited} s after the message was queued \
         (queue_run_delay = minimal_backoff_time = {})",
        RoutedMx::RETRY
    );
    let log = site.mailtls_log();
    assert!(log.contains("transaction routed"), "{log}");
}

#[test]
#[ignore = "needs postfix and swaks: run tests/run.sh"]
fn swaks_with_pipelining_and_a_raw_bdat_client_through_the_routed_mx() {
    let site = RoutedMx::start();
    let [alice, bob] = MX_USERS;
    // PIPELINING: one batch, a recipient on each server; bob's gets 452 and swaks goes on.
    let mut swaks = Command::new("swaks");
    swaks
        .args(["--server", &format!("127.0.0.1:{}", site.mx), "--pipeline"])
        .args(["--from", SENDER, "--to", &format!("{alice},{bob}")])
        .args(["--header", "Subject: swaks pipelined"])
        .stdin(Stdio::null());
    let out = run(&mut swaks, CLIENT_TIMEOUT);
    let transcript = format!("{}{}", out.stdout, out.stderr);
    assert!(transcript.contains("PIPELINING"), "{transcript}");
    assert!(transcript.contains("452 4.5.3"), "bob was not deferred: {transcript}");
    assert!(transcript.contains("250 2.0.0 Ok: queued"), "{transcript}");
    assert!(site.wait(Duration::from_secs(30), |s| s.delivered(0).len() == 1), "{}", site.maillog(0));
    assert!(site.delivered(1).is_empty(), "a deferred recipient was delivered");

    // CHUNKING: BDAT to bob, the chunk holding what would be commands on a line basis.
    let mut c = SmtpLines::connect(site.mx, Some("127.0.0.2")).expect("connect");
    assert!(reply(&mut c).starts_with("220 "));
    c.send("EHLO bdat.test").unwrap();
    assert!(reply(&mut c).contains("CHUNKING"), "CHUNKING not offered");
    c.send(&format!("MAIL FROM:<{SENDER}>")).unwrap();
    assert!(reply(&mut c).starts_with("250 "));
    c.send(&format!("RCPT TO:<{bob}>")).unwrap();
    assert!(reply(&mut c).starts_with("250 "));
    let chunk = "Subject: bdat\r\n\r\nQUIT\r\nRCPT TO:<alice@one.test>\r\n";
    // `send` ends the text with the chunk's own last CRLF.
    c.send(format!("BDAT {} LAST\r\n{chunk}", chunk.len()).trim_end_matches("\r\n")).unwrap();
    let last = reply(&mut c);
    assert!(last.starts_with("250 "), "{last}");
    c.send("QUIT").unwrap();
    assert!(site.wait(Duration::from_secs(30), |s| s.delivered(1).len() == 1), "{}", site.maillog(1));
    assert!(site.delivered(1)[0].contains("RCPT TO:<alice@one.test>"), "the chunk arrived whole");
    assert_eq!(site.delivered(0).len(), 1, "the chunk's text reached the other server");
}
