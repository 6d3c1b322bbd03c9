//! Interop: OpenSMTPD 6.8 (Debian 12's opensmtpd, in a container) behind mailtls's MX
//! listener, swaks and Python's ssl in front. Every cell is asserted from OpenSMTPD's own
//! log and the Maildir it delivered to.
//!
//! OpenSMTPD 6.8 reads PROXY v2 on a `listen on ... proxy-v2` listener (an experimental
//! feature of 6.8) and no other version. These need root and podman (tests/run.sh), so
//! plain `cargo test` skips them. The settings below are the ones docs/opensmtpd.md
//! documents.

#[allow(unused_imports)]
mod common;

use std::fs;
use std::path::Path;

use common::mailservers::SmtpLines;
use common::mta::{
    ehlo_with_sni, free_ports, long_name, smtp_listener, swaks, swaks_run, Site, CLIENT_IP, OPENSMTPD_IMAGE,
};
use common::podman::can_run;

/// smtpd.conf: one listener behind mailtls reading PROXY v2, one without (what OpenSMTPD
/// logs when nothing names the client), alice's mail to a Maildir.
const SMTPD_CONF: &str = r#"listen on 127.0.0.1 port PROXY_PORT proxy-v2 hostname smtpd.mail.test
listen on 127.0.0.1 port PLAIN_PORT hostname smtpd.mail.test
action "local" maildir "/data/alice/Maildir"
match from any for domain "mail.test" rcpt-to "alice@mail.test" action "local"
"#;

/// alice is a system user in the container (OpenSMTPD delivers as the recipient); smtpd
/// runs in the foreground and logs to /data/log/smtpd.log.
const START: &str = "useradd -M -d /data/alice alice && mkdir -p /data/alice && chown alice /data/alice \
                     && exec smtpd -d -f /data/smtpd.conf > /data/log/smtpd.log 2>&1";

/// The Maildir messages whose Subject is `cell TAG`.
fn delivered(site: &Site, tag: &str) -> Vec<String> {
    let dir = site.data().join("alice/Maildir/new");
    let subject = format!("Subject: cell {tag}\n");
    fs::read_dir(&dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .iter()
        .map(|p: &std::path::PathBuf| common::mailservers::read_lossy(Path::new(p)))
        .filter(|m| m.contains(&subject))
        .collect()
}

/// OpenSMTPD's session id of the message whose envelope is from `sender`, and its
/// `smtp connected` line.
fn connected_line<'a>(log: &'a str, sender: &str) -> Option<&'a str> {
    let envelope =
        log.lines().find(|l| l.contains("smtp envelope") && l.contains(&format!("from=<{sender}>")))?;
    let session = envelope.split_whitespace().next()?;
    log.lines().find(|l| l.starts_with(session) && l.contains("smtp connected"))
}

#[test]
#[ignore = "needs root and podman: run tests/run.sh"]
fn opensmtpd_behind_the_mx_role_delivers_and_learns_the_client_from_proxy_v2_only() {
    if !can_run("OpenSMTPD behind mailtls") {
        return;
    }
    let [proxy_port, plain_port] = free_ports();
    let conf = SMTPD_CONF
        .replace("PROXY_PORT", &proxy_port.to_string())
        .replace("PLAIN_PORT", &plain_port.to_string());
    let mut site = Site::start(
        "opensmtpd",
        &OPENSMTPD_IMAGE,
        &[("smtpd.conf", conf)],
        START,
        &[proxy_port, plain_port],
        "log/smtpd.log",
    );
    let [mx, mx_v1, mx_none] = free_ports();
    let listeners = [
        smtp_listener("mx", "starttls", mx, proxy_port, "v2", ""),
        smtp_listener("mx-v1", "starttls", mx_v1, proxy_port, "v1", ""),
        smtp_listener("mx-none", "starttls", mx_none, plain_port, "none", ""),
    ]
    .concat();
    site.start_mailtls(&listeners, &[mx, mx_v1, mx_none]);
    // Before TLS mailtls offers what OpenSMTPD offers: 6.8 has neither PIPELINING nor
    // CHUNKING, so neither is promised to the client.
    let offered = site.wait_for_probe(mx);
    assert!(offered.contains("SIZE 36700160") && offered.contains("STARTTLS"), "{offered}");
    assert!(!offered.contains("PIPELINING") && !offered.contains("CHUNKING"), "{offered}");
    assert!(!offered.contains("AUTH"), "{offered}");
    site.wait_for_probe(mx_none);

    // Each cell's sender names it in OpenSMTPD's log (`from=<...>`).
    let send = |port, tag: &str, args: &[&str]| {
        let from = format!("{tag}@sender.test");
        swaks_run(&site, port, tag, &[&["--from", &from][..], args].concat())
    };
    for (port, tag, args) in
        [(mx, "plain", &[][..]), (mx, "starttls", &["--tls"][..]), (mx_none, "no-header", &[][..])]
    {
        let out = send(port, tag, args);
        assert!(
            out.success() && out.stdout.contains("Message accepted for delivery"),
            "{tag}: {}",
            out.stdout
        );
    }
    // A v1 header: OpenSMTPD drops the connection, and mailtls answers MAIL with 421.
    let v1 = send(mx_v1, "v1", &[]);
    assert!(v1.stdout.contains("421 4.3.2"), "{}", v1.stdout);
    // A long SNI makes a long v2 header: OpenSMTPD skips TLVs of any length.
    let sni = ehlo_with_sni(mx, "starttls", &long_name(253));
    assert!(sni.stdout.contains(&format!("Hello sni.example [{CLIENT_IP}]")), "{}{}", sni.stdout, sni.stderr);

    let log = site.wait_for_log("three deliveries", |l| l.matches("result=Ok stat=Delivered").count() >= 3);
    let mut report = Vec::new();
    for (tag, address) in [("plain", CLIENT_IP), ("starttls", CLIENT_IP), ("no-header", "127.0.0.1")] {
        let line = connected_line(&log, &format!("{tag}@sender.test")).unwrap_or_default();
        assert!(line.contains(&format!("smtp connected address={address} ")), "{tag}: {line}\n{log}");
        let messages = delivered(&site, tag);
        assert_eq!(messages.len(), 1, "{tag}: {messages:?}");
        assert!(messages[0].contains(&format!("marker {tag}\n")), "{}", messages[0]);
        assert!(messages[0].contains(&format!("[{address}])\n\tby smtpd.mail.test")), "{}", messages[0]);
        report.push(format!("{tag:>9}: {}", line.split_once(' ').map(|(_, l)| l).unwrap_or(line)));
    }
    assert!(log.contains("reason=\"protocol error (invalid signature)\""), "v1 was not refused:\n{log}");
    assert!(!log.contains("v1@sender.test"), "{log}");
    assert!(delivered(&site, "v1").is_empty());
    eprintln!("OpenSMTPD's sessions through mailtls:\n{}", report.join("\n"));

    // No AUTH through the MX role before TLS: mailtls refuses it, OpenSMTPD never hears it.
    let mut c = SmtpLines::connect(mx, Some("127.0.0.3")).unwrap();
    c.reply().unwrap();
    c.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==").unwrap();
    assert!(c.reply().unwrap().starts_with("530 5.7.0"));
    c.send("QUIT").unwrap();
    swaks(&site, mx, "control", &[]);
    let log = site.wait_for_log("the control", |l| l.matches("result=Ok stat=Delivered").count() >= 4);
    assert!(!log.contains("127.0.0.3"), "{log}");
}
