//! Interop: real Postfix and Dovecot behind the mailtls binary, real mail clients in front
//! (swaks, msmtp, curl, mbsync, fetchmail, openssl, sslscan, Python imaplib/poplib).
//!
//! These need the Debian packages tests/run.sh installs, and root (Postfix and Dovecot run
//! from private directories), so plain `cargo test` skips them; tests/run.sh runs them.

// The shared harness re-exports the scripted backends, which these tests do not use.
#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::mailservers::{
    run, Interop, Output, Parts, RoutedPair, SmtpLines, CLIENT_TIMEOUT, OTHER_USER, PASSWORD, USER,
};

/// The address real clients bind to where they can: not mailtls's own 127.0.0.1, so the
/// backends' logs prove the PROXY header / XCLIENT carried it.
const CLIENT_IP: &str = "127.0.0.2";

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.stdin(Stdio::null());
    c
}

fn must(what: &str, out: Output) -> Output {
    assert!(out.success(), "{what} failed ({:?}):\n{}\n{}", out.status, out.stdout, out.stderr);
    out
}

/// A message whose body has lines that need dot-stuffing both ways (SMTP and POP3) and
/// trailing blanks, tagged so every copy can be found again.
fn message(tag: &str) -> String {
    format!(
        "From: {USER}\r\nTo: {USER}\r\nSubject: interop {tag}\r\nMessage-ID: <{tag}@mail.test>\r\n\r\n\
         marker {tag}\r\n.a line that starts with a dot\r\n..and one with two\r\ntrailing blanks   \r\n\
         8<----\r\n"
    )
}

/// Line ends as stored on disk (LF), and without the header mbsync adds to its copies.
fn normalized(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    text.split_inclusive('\n').filter(|l| !l.starts_with("X-TUID: ")).collect::<String>().into_bytes()
}

fn tag_of(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let start = text.find("Message-ID: <")? + "Message-ID: <".len();
    let end = text[start..].find('@')? + start;
    Some(text[start..end].to_owned())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

// ---- sending --------------------------------------------------------------------------

fn swaks(it: &Interop, port: u16, tls: &str, auth: bool, tag: &str) -> Output {
    let data = it.path().join(format!("{tag}.eml"));
    fs::write(&data, message(tag)).unwrap();
    let mut c = tool("swaks");
    c.args([
        "--server",
        &format!("127.0.0.1:{port}"),
        "--local-interface",
        CLIENT_IP,
        "--ehlo",
        "client.example",
    ]);
    c.args(["--from", USER, "--to", USER, "--data"]).arg(&data);
    match tls {
        "starttls" => c.arg("--tls"),
        "implicit" => c.arg("--tls-on-connect"),
        _ => &mut c,
    };
    if tls != "none" {
        c.args(["--tls-verify", "--tls-sni", "localhost", "--tls-ca-path"]).arg(it.ca());
    }
    if auth {
        c.args(["--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD]);
    }
    must(&format!("swaks {tls} port {port}"), run(&mut c, CLIENT_TIMEOUT))
}

fn msmtp(it: &Interop, port: u16, starttls: bool, tag: &str) -> Output {
    let rc = it.path().join(format!("msmtprc-{tag}"));
    let text = format!(
        "account default\nhost localhost\nport {port}\nsource_ip {CLIENT_IP}\nfrom {USER}\nauth plain\n\
         user {USER}\npassword {PASSWORD}\ntls on\ntls_starttls {}\ntls_trust_file {}\n",
        if starttls { "on" } else { "off" },
        it.ca().display()
    );
    fs::write(&rc, text).unwrap();
    fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let data = it.path().join(format!("{tag}.eml"));
    fs::write(&data, message(tag)).unwrap();
    let mut c = tool("msmtp");
    c.arg("-C").arg(&rc).arg(USER).stdin(fs::File::open(&data).unwrap());
    must(&format!("msmtp port {port}"), run(&mut c, CLIENT_TIMEOUT))
}

// ---- fetching ---------------------------------------------------------------------------

/// Every message of the mailbox as `client` fetched it through mailtls's `port`.
fn fetch(
    it: &Interop,
    client: &str,
    port: u16,
    implicit: bool,
    count: usize,
) -> Result<Vec<Vec<u8>>, String> {
    let protocol = if port == it.ports.imap || port == it.ports.imaps { "imap" } else { "pop3" };
    let out_dir = it.path().join(format!("fetched-{client}-{port}"));
    fs::create_dir_all(&out_dir).unwrap();
    let ca = it.ca();
    let output = match client {
        "curl" => {
            let mut messages = Vec::new();
            for n in 1..=count {
                let scheme = if implicit { format!("{protocol}s") } else { protocol.to_owned() };
                let path = if protocol == "imap" { format!("INBOX;UID={n}") } else { n.to_string() };
                let mut c = tool("curl");
                c.args(["-sS", "--interface", CLIENT_IP, "--cacert"]).arg(&ca);
                if !implicit {
                    c.arg("--ssl-reqd");
                }
                c.args(["-u", &format!("{USER}:{PASSWORD}"), &format!("{scheme}://127.0.0.1:{port}/{path}")]);
                let out = run(&mut c, CLIENT_TIMEOUT);
                if !out.success() {
                    return Err(format!("curl {scheme} {n}: {:?} {}", out.status, out.stderr));
                }
                messages.push(out.stdout.into_bytes());
            }
            return Ok(messages);
        }
        "python" => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/fetch.py");
            let mode = if implicit { "implicit" } else { "starttls" };
            let mut c = tool("python3");
            c.arg(script).args([protocol, mode, &port.to_string()]).arg(&ca);
            c.args([CLIENT_IP, USER, PASSWORD]).arg(&out_dir);
            run(&mut c, CLIENT_TIMEOUT)
        }
        "mbsync" => {
            let rc = out_dir.join("mbsyncrc");
            let text = format!(
                "IMAPAccount a\nHost localhost\nPort {port}\nUser {USER}\nPass {PASSWORD}\nSSLType {}\n\
                 CertificateFile {}\n\nIMAPStore remote\nAccount a\n\nMaildirStore local\nPath {d}/\nInbox {d}/INBOX\n\n\
                 Channel c\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Near\nSync Pull\nSyncState *\n",
                if implicit { "IMAPS" } else { "STARTTLS" },
                ca.display(),
                d = out_dir.display()
            );
            fs::write(&rc, text).unwrap();
            let mut c = tool("mbsync");
            c.arg("-c").arg(&rc).arg("-a");
            run(&mut c, CLIENT_TIMEOUT)
        }
        "fetchmail" => {
            // `invisible`: no Received header of fetchmail's own, so copies compare byte for byte.
            let rc = out_dir.join("fetchmailrc");
            let text = format!(
                "set no syslog\nset invisible\npoll localhost service {port} protocol pop3 auth password\n  user \"{USER}\" password \"{PASSWORD}\" is \"root\" here\n  {}sslproto \"tls1.2+\" sslcertck sslcertfile \"{}\"\n  keep fetchall mda \"/bin/sh -c 'cat > {}/msg.$$'\"\n",
                if implicit { "ssl " } else { "" },
                ca.display(),
                out_dir.display()
            );
            fs::write(&rc, text).unwrap();
            fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            let mut c = tool("fetchmail");
            c.env("FETCHMAILHOME", &out_dir).arg("-f").arg(&rc).arg("-i").arg(out_dir.join("ids"));
            c.arg("--nodetach");
            run(&mut c, CLIENT_TIMEOUT)
        }
        other => panic!("no client {other}"),
    };
    if !output.success() {
        return Err(format!("{client}: {:?} {}{}", output.status, output.stdout, output.stderr));
    }
    let skip = |p: &Path| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.starts_with('.') || name.contains("rc") || name == "ids" || !p.starts_with(&out_dir)
    };
    Ok(files_under(&out_dir).into_iter().filter(|p| !skip(p)).filter_map(|p| fs::read(p).ok()).collect())
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn real_clients_send_through_every_smtp_port_and_fetch_through_every_imap_pop3_port() {
    let it = Interop::start(Parts::Everything);
    let p = it.ports;
    it.wait_for_mx_probe(p.mx);

    // Sending: submission with STARTTLS and implicit TLS (swaks, msmtp), MX in plaintext and
    // with STARTTLS (swaks), every one from CLIENT_IP.
    let sent = [
        ("swaks-587", swaks(&it, p.submission, "starttls", true, "swaks-587")),
        ("swaks-465", swaks(&it, p.submissions, "implicit", true, "swaks-465")),
        ("msmtp-587", msmtp(&it, p.submission, true, "msmtp-587")),
        ("msmtp-465", msmtp(&it, p.submissions, false, "msmtp-465")),
        ("swaks-25-plain", swaks(&it, p.mx, "none", false, "swaks-25-plain")),
        ("swaks-25-starttls", swaks(&it, p.mx, "starttls", false, "swaks-25-starttls")),
    ];
    // The plaintext MX dialogue: STARTTLS offered with Postfix's own extensions, no AUTH.
    let plain = &sent[4].1.stdout;
    assert!(plain.contains("<-  250-STARTTLS") || plain.contains("<-  250 STARTTLS"), "{plain}");
    assert!(plain.contains("<-  250-SIZE 10240000"), "extensions learned from Postfix: {plain}");
    assert!(!plain.contains("AUTH"), "no AUTH in plaintext: {plain}");
    for (what, out) in &sent {
        assert!(out.stdout.contains("queued as") || what.starts_with("msmtp"), "{what}: {}", out.stdout);
    }

    // What Dovecot stored is the reference every fetched copy is compared with.
    let stored = it.wait_for_messages(sent.len());
    let mut truth = BTreeMap::new();
    for m in &stored {
        let tag = tag_of(m).expect("a tagged message");
        let text = String::from_utf8_lossy(m);
        // Postfix's Received header: the client's own address, from the PROXY header.
        assert!(text.contains(&format!("(unknown [{CLIENT_IP}])")), "{tag}: {text}");
        truth.insert(tag, normalized(m));
    }
    assert_eq!(truth.len(), sent.len(), "every message arrived once: {:?}", truth.keys());

    // Fetching: 3 clients on each of 143, 993, 110 and 995.
    let matrix = [
        ("curl", p.imap, false),
        ("mbsync", p.imap, false),
        ("python", p.imap, false),
        ("curl", p.imaps, true),
        ("mbsync", p.imaps, true),
        ("python", p.imaps, true),
        ("fetchmail", p.pop3, false),
        ("curl", p.pop3, false),
        ("python", p.pop3, false),
        ("fetchmail", p.pop3s, true),
        ("curl", p.pop3s, true),
        ("python", p.pop3s, true),
    ];
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (client, port, implicit) in matrix {
        let role = [(p.imap, "143"), (p.imaps, "993"), (p.pop3, "110"), (p.pop3s, "995")]
            .iter()
            .find(|(q, _)| *q == port)
            .map(|(_, r)| *r)
            .unwrap_or("?");
        let result = fetch(&it, client, port, implicit, sent.len()).and_then(|messages| {
            let mut same = 0;
            for m in &messages {
                let tag = tag_of(m).ok_or("a fetched message without its Message-ID")?;
                match truth.get(&tag) {
                    Some(t) if *t == normalized(m) => same += 1,
                    Some(t) => {
                        return Err(format!(
                            "{tag} differs:\n--- stored\n{}\n--- fetched\n{}",
                            String::from_utf8_lossy(t),
                            String::from_utf8_lossy(&normalized(m))
                        ))
                    }
                    None => return Err(format!("unknown message {tag}")),
                }
            }
            if same == truth.len() {
                Ok(same)
            } else {
                Err(format!("{same} of {} messages", truth.len()))
            }
        });
        match result {
            Ok(n) => report.push(format!("{client:>9} x {role}: {n} messages byte-identical")),
            Err(e) => {
                report.push(format!("{client:>9} x {role}: FAILED"));
                failures.push(format!("{client} x {role}: {e}"));
            }
        }
    }
    eprintln!("client x port matrix:\n{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // What the backends saw. Postfix: the client's address on every message, SASL on the four
    // submissions. Dovecot: every login marked secured (the PROXY v2 SSL TLV), with the
    // bound clients' address (curl 6 x 4 ports, Python 4).
    let maillog = it.maillog();
    let queued_from_client = maillog.matches(&format!(": client=unknown[{CLIENT_IP}]")).count();
    assert_eq!(queued_from_client, 6, "{maillog}");
    assert_eq!(maillog.matches("sasl_username=alice@mail.test").count(), 4, "{maillog}");
    let dovecot = it.dovecot_log();
    let logins: Vec<&str> = dovecot.lines().filter(|l| l.contains("-login: Info: Login: ")).collect();
    assert!(logins.len() >= 6 * 4 + 4 + 4, "{dovecot}");
    assert!(logins.iter().all(|l| l.contains(", secured,")), "{dovecot}");
    let from_client = logins.iter().filter(|l| l.contains(&format!("rip={CLIENT_IP},"))).count();
    assert!(from_client >= 6 * 4 + 4, "{from_client} logins from {CLIENT_IP}:\n{dovecot}");
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn plaintext_logins_through_mailtls_never_reach_postfix_or_dovecot() {
    let it = Interop::start(Parts::Everything);
    let p = it.ports;
    it.wait_for_mx_probe(p.mx);
    let source = "127.0.0.3";
    let plain = "AGFsaWNlQG1haWwudGVzdABzZWNyZXQ="; // \0alice@mail.test\0secret

    // Raw dialogues: what a careless client sends, and what mailtls itself answers.
    let mut imap = SmtpLines::connect(p.imap, Some(source)).unwrap();
    assert!(imap.line().unwrap().contains("LOGINDISABLED"));
    imap.send(&format!("a LOGIN {USER} {PASSWORD}")).unwrap();
    assert!(imap.line().unwrap().starts_with("a NO [PRIVACYREQUIRED]"));
    imap.send(&format!("b AUTHENTICATE PLAIN {plain}")).unwrap();
    let l = imap.line().unwrap();
    assert!(l.starts_with("b NO") || l.starts_with("b BAD"), "{l}");

    let mut pop3 = SmtpLines::connect(p.pop3, Some(source)).unwrap();
    assert!(pop3.line().unwrap().starts_with("+OK"));
    for command in [format!("USER {USER}"), format!("PASS {PASSWORD}"), format!("AUTH PLAIN {plain}")] {
        pop3.send(&command).unwrap();
        assert!(pop3.line().unwrap().starts_with("-ERR"), "{command}");
    }

    for port in [p.submission, p.mx] {
        let mut smtp = SmtpLines::connect(port, Some(source)).unwrap();
        smtp.reply().unwrap();
        smtp.send("EHLO careless.example").unwrap();
        assert!(!smtp.reply().unwrap().contains("AUTH"));
        smtp.send(&format!("AUTH PLAIN {plain}")).unwrap();
        assert!(smtp.reply().unwrap().starts_with("530 5.7.0"), "port {port}");
    }

    // Real clients told to use no TLS: curl may not send LOGIN (LOGINDISABLED), swaks may not AUTH.
    let mut c = tool("curl");
    c.args(["-sS", "--interface", source, "-u", &format!("{USER}:{PASSWORD}")]);
    c.arg(format!("imap://127.0.0.1:{}/INBOX", p.imap));
    assert!(!run(&mut c, CLIENT_TIMEOUT).success(), "curl logged in without TLS");
    let mut c = tool("curl");
    c.args(["-sS", "--interface", source, "-u", &format!("{USER}:{PASSWORD}")]);
    c.arg(format!("pop3://127.0.0.1:{}/", p.pop3));
    assert!(!run(&mut c, CLIENT_TIMEOUT).success(), "curl logged in to POP3 without TLS");
    let mut c = tool("swaks");
    c.args(["--server", &format!("127.0.0.1:{}", p.submission), "--local-interface", source]);
    c.args([
        "--from",
        USER,
        "--to",
        USER,
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    ]);
    let out = run(&mut c, CLIENT_TIMEOUT);
    assert!(!out.success() && !out.stdout.contains("235 "), "{}", out.stdout);

    // A control from another address over TLS, so the logs are known to be written.
    let control = "127.0.0.4";
    let mut c = tool("curl");
    c.args(["-sS", "--interface", control, "--ssl-reqd", "--cacert"]).arg(it.ca());
    c.args(["-u", &format!("{USER}:{PASSWORD}"), &format!("imap://127.0.0.1:{}/", p.imap)]);
    must("curl over STARTTLS", run(&mut c, CLIENT_TIMEOUT));
    let deadline = std::time::Instant::now() + common::mailservers::STARTUP;
    while !it.dovecot_log().contains(&format!("rip={control}, lip=127.0.0.1, mpid=")) {
        assert!(std::time::Instant::now() < deadline, "control login not logged:\n{}", it.dovecot_log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dovecot = it.dovecot_log();
    let maillog = it.maillog();
    assert!(!dovecot.contains(source), "a plaintext attempt reached Dovecot:\n{dovecot}");
    assert!(!maillog.contains(source), "a plaintext attempt reached Postfix:\n{maillog}");
    assert!(!maillog.contains("sasl_method") && !maillog.contains("authentication failed"), "{maillog}");
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn openssl_s_client_sees_the_whole_chain_on_every_port() {
    let it = Interop::start(Parts::Everything);
    let p = it.ports;
    let ports = [
        (p.submission, Some("smtp")),
        (p.mx, Some("smtp")),
        (p.imap, Some("imap")),
        (p.pop3, Some("pop3")),
        (p.submissions, None),
        (p.imaps, None),
        (p.pop3s, None),
    ];
    for (port, starttls) in ports {
        let mut c = tool("openssl");
        c.args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"]);
        c.args(["-verify_hostname", "localhost", "-verify_return_error", "-showcerts", "-CAfile"])
            .arg(it.ca());
        if let Some(protocol) = starttls {
            c.args(["-starttls", protocol]);
        }
        let out = must(&format!("s_client port {port}"), run(&mut c, CLIENT_TIMEOUT));
        let text = out.stdout;
        assert!(text.contains("Verify return code: 0 (ok)"), "{port}: {text}");
        assert!(text.contains(" 0 s:CN = localhost"), "{port}: {text}");
        assert!(text.contains(" 1 s:CN = mailtls interop intermediate"), "{port}: {text}");
        assert!(text.contains("i:CN = mailtls interop root"), "{port}: {text}");
        assert_eq!(text.matches("-----BEGIN CERTIFICATE-----").count(), 2, "{port}: leaf and intermediate");
    }
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn xclient_tells_postfix_the_client_address_without_a_proxy_header() {
    let it = Interop::start(Parts::Everything);
    let p = it.ports;
    it.wait_for_mx_probe(p.mx_xclient);
    // Plaintext port-25 path (HELO known and sent in XCLIENT), then implicit TLS.
    let plain = "127.0.0.5";
    let mut c = tool("swaks");
    c.args(["--server", &format!("127.0.0.1:{}", p.mx_xclient), "--local-interface", plain]);
    c.args(["--ehlo", "plain.client.example", "--from", "bob@example.org", "--to", USER]);
    c.args(["--header", "Message-ID: <xclient-plain@mail.test>"]);
    must("swaks through the XCLIENT MX listener", run(&mut c, CLIENT_TIMEOUT));
    let tls = "127.0.0.6";
    let mut c = tool("swaks");
    c.args(["--server", &format!("127.0.0.1:{}", p.submissions_xclient), "--local-interface", tls]);
    c.args(["--tls-on-connect", "--tls-verify", "--tls-sni", "localhost", "--tls-ca-path"]).arg(it.ca());
    c.args(["--ehlo", "tls.client.example", "--from", "bob@example.org", "--to", USER]);
    c.args(["--header", "Message-ID: <xclient-tls@mail.test>"]);
    must("swaks through the XCLIENT implicit listener", run(&mut c, CLIENT_TIMEOUT));

    let stored = it.wait_for_messages(2);
    let maillog = it.maillog();
    for ip in [plain, tls] {
        assert!(maillog.contains(&format!(": client=unknown[{ip}]")), "{ip}:\n{maillog}");
    }
    let find = |tag: &str| {
        stored.iter().map(|m| String::from_utf8_lossy(m).into_owned()).find(|m| m.contains(tag)).unwrap()
    };
    assert!(find("xclient-plain").contains(&format!("from plain.client.example (unknown [{plain}])")));
    assert!(find("xclient-tls").contains(&format!("from tls.client.example (unknown [{tls}])")));
    // mailtls connected from 127.0.0.1 with no PROXY header; nothing was refused.
    assert!(!maillog.contains("warning"), "{maillog}");
}

/// One finding of MEDIUM or higher severity in sslscan's XML, or `None`.
fn sslscan_finding(line: &str) -> Option<String> {
    let attr = |name: &str| {
        let key = format!(" {name}=\"");
        let start = line.find(&key)? + key.len();
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_owned())
    };
    let line_t = line.trim_start();
    if line_t.starts_with("<protocol ") && attr("enabled").as_deref() == Some("1") {
        let version = format!("{} {}", attr("type")?, attr("version")?);
        if !matches!(version.as_str(), "tls 1.2" | "tls 1.3") {
            return Some(format!("old protocol enabled: {version}"));
        }
    }
    if line_t.starts_with("<cipher ") {
        let name = attr("cipher")?;
        let bits: u32 = attr("bits")?.parse().ok()?;
        let version = attr("sslversion")?;
        let strength = attr("strength").unwrap_or_default();
        let weak_name =
            ["RC4", "DES", "NULL", "EXP", "anon", "ADH", "AECDH", "MD5"].iter().any(|w| name.contains(w));
        let no_forward_secrecy =
            version == "TLSv1.2" && !(name.starts_with("ECDHE-") || name.starts_with("DHE-"));
        if bits < 128
            || weak_name
            || no_forward_secrecy
            || !matches!(strength.as_str(), "strong" | "acceptable")
        {
            return Some(format!("weak cipher: {version} {name} {bits} bits ({strength})"));
        }
    }
    if line_t.starts_with("<heartbleed ") && attr("vulnerable").as_deref() == Some("1") {
        return Some(format!("heartbleed: {line_t}"));
    }
    if line_t.starts_with("<compression ") && attr("supported").as_deref() == Some("1") {
        return Some("TLS compression (CRIME)".to_owned());
    }
    if line_t.starts_with("<renegotiation ")
        && attr("supported").as_deref() == Some("1")
        && attr("secure").as_deref() != Some("1")
    {
        return Some("insecure renegotiation".to_owned());
    }
    None
}

#[test]
fn sslscan_parser_flags_what_it_should() {
    for bad in [
        r#"<protocol type="tls" version="1.0" enabled="1" />"#,
        r#"<protocol type="ssl" version="3" enabled="1" />"#,
        r#"<cipher status="accepted" sslversion="TLSv1.2" bits="112" cipher="DES-CBC3-SHA" strength="medium" />"#,
        r#"<cipher status="accepted" sslversion="TLSv1.2" bits="128" cipher="AES128-GCM-SHA256" strength="strong" />"#,
        r#"<cipher status="accepted" sslversion="TLSv1.2" bits="128" cipher="ECDHE-RSA-RC4-SHA" strength="medium" />"#,
        r#"<heartbleed sslversion="TLSv1.2" vulnerable="1" />"#,
        r#"<compression supported="1" />"#,
        r#"<renegotiation supported="1" secure="0" />"#,
    ] {
        assert!(sslscan_finding(bad).is_some(), "{bad}");
    }
    for good in [
        r#"<protocol type="tls" version="1.0" enabled="0" />"#,
        r#"<protocol type="tls" version="1.3" enabled="1" />"#,
        r#"<cipher status="preferred" sslversion="TLSv1.3" bits="128" cipher="TLS_AES_128_GCM_SHA256" id="0x1301" strength="acceptable" />"#,
        r#"<cipher status="accepted" sslversion="TLSv1.2" bits="256" cipher="ECDHE-ECDSA-AES256-GCM-SHA384" strength="strong" />"#,
        r#"<renegotiation supported="0" secure="0" />"#,
    ] {
        assert_eq!(sslscan_finding(good), None, "{good}");
    }
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn sslscan_finds_nothing_of_medium_severity_or_above() {
    let it = Interop::start(Parts::ProxyOnly);
    let p = it.ports;
    let targets = [
        (p.submissions, None),
        (p.submission, Some("--starttls-smtp")),
        (p.imaps, None),
        (p.imap, Some("--starttls-imap")),
        (p.pop3s, None),
        (p.pop3, Some("--starttls-pop3")),
    ];
    // sslscan waits out timeouts of its own (about 10 s a scan): all six at once.
    let scans: Vec<_> = targets
        .iter()
        .map(|&(port, starttls)| {
            std::thread::spawn(move || {
                let mut c = tool("sslscan");
                c.args(["--no-colour", "--xml=-"]);
                if let Some(flag) = starttls {
                    c.arg(flag);
                }
                c.arg(format!("127.0.0.1:{port}"));
                (port, run(&mut c, CLIENT_TIMEOUT))
            })
        })
        .collect();
    let mut findings = Vec::new();
    for scan in scans {
        let (port, out) = scan.join().unwrap();
        let out = must(&format!("sslscan {port}"), out);
        let modern = out.stdout.lines().filter(|l| l.trim_start().starts_with("<cipher ")).count();
        assert!(modern >= 4, "port {port}: sslscan saw no ciphers, so it proved nothing:\n{}", out.stdout);
        findings.extend(out.stdout.lines().filter_map(sslscan_finding).map(|f| format!("port {port}: {f}")));
    }
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}

/// Two Dovecots, each holding one user's mailbox, reached through one mailtls port per
/// protocol: every login form reaches the right mailbox, a refused login is routed afresh.
#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn two_dovecots_behind_one_routed_port_each_user_reaches_their_own_mailbox() {
    let pair = RoutedPair::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/routed.py");
    let (alice, bob) = (format!("Subject: for {USER}"), format!("Subject: for {OTHER_USER}"));
    for (protocol, port) in [("imap", pair.imaps), ("pop3", pair.pop3s)] {
        let mut c = tool("python3");
        c.arg(&script).args([protocol, &port.to_string()]).arg(pair.ca()).args([USER, OTHER_USER, PASSWORD]);
        let out = run(&mut c, CLIENT_TIMEOUT);
        assert!(out.success(), "{protocol}: {:?}\n{}{}", out.status, out.stdout, out.stderr);
        let expected = match protocol {
            "imap" => format!(
                "login {USER}: {alice}\nlogin {OTHER_USER}: {bob}\nauthenticate {OTHER_USER}: {bob}\n\
                 login refused\nretry {OTHER_USER}: {bob}\n"
            ),
            _ => format!("user {USER}: {alice}\nuser {OTHER_USER}: {bob}\nauth {USER}: {alice}\n"),
        };
        assert_eq!(out.stdout, expected, "{protocol}");
    }
    // Each Dovecot saw only its own user log in.
    let (first, second) = (pair.dovecot_log(0), pair.dovecot_log(1));
    assert!(
        first.contains(&format!("user=<{USER}>")) && !first.contains(&format!("user=<{OTHER_USER}>")),
        "{first}"
    );
    assert!(
        second.contains(&format!("user=<{OTHER_USER}>")) && !second.contains(&format!("user=<{USER}>")),
        "{second}"
    );
}

// ---- SMTP smuggling (issue 17) -------------------------------------------------------------

/// The non-standard ends of data of CVE-2023-51764 and its cousins, and the CR forms,
/// named for the tags of the messages that carry them.
const SMUGGLING: [(&str, &[u8]); 6] = [
    ("lf-dot-crlf", b"\n.\r\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("lf-dot-lf", b"\n.\n"),
    ("cr-dot-cr", b"\r.\r"),
    ("cr-dot-crlf", b"\r.\r\n"),
    ("crlf-dot-cr", b"\r\n.\r"),
];

/// A first message whose text hides `variant` and, behind it, a whole forged transaction
/// (MAIL, RCPT, DATA, a message from the CEO), then the real end of data.
fn smuggling_body(tag: &str, variant: &[u8]) -> Vec<u8> {
    let first = format!(
        "From: legit@sender.test\r\nTo: {USER}\r\nSubject: first {tag}\r\nMessage-ID: <{tag}@mail.test>\r\n\r\nfirst part"
    );
    let forged = format!(
        "MAIL FROM:<ceo@mail.test>\r\nRCPT TO:<{USER}>\r\nDATA\r\nFrom: ceo@mail.test\r\nTo: {USER}\r\n\
         Subject: forged {tag}\r\nMessage-ID: <forged-{tag}@mail.test>\r\n\r\nforged\r\n.\r\n"
    );
    [first.as_bytes(), variant, forged.as_bytes()].concat()
}

/// What the client saw after the body: every reply, and whether the server hung up.
#[derive(Debug)]
struct Attempt {
    replies: Vec<(u64, String)>,
    closed: bool,
}

/// One smuggling attempt with Python's smtplib (tests/interop/smuggle.py), from CLIENT_IP.
fn smuggle(it: &Interop, mode: &str, port: u16, auth: bool, body: &[u8]) -> Attempt {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/smuggle.py");
    let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
    let credentials = if auth { format!("{USER}:{PASSWORD}") } else { "-".to_owned() };
    let mut c = tool("python3");
    c.arg(script).args([mode, &port.to_string()]).arg(it.ca()).args([CLIENT_IP, &credentials, &hex]);
    let out = must(&format!("smuggle.py {mode} port {port}"), run(&mut c, CLIENT_TIMEOUT));
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("smuggle.py prints JSON");
    let replies = json["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|r| (r[0].as_u64().unwrap_or(0), r[1].as_str().unwrap_or("").to_owned()))
        .collect();
    Attempt { replies, closed: json["closed"].as_bool().unwrap_or(false) }
}

/// The header section of a stored message (LF line ends on disk).
fn headers(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    text.split("\n\n").next().unwrap_or("").to_owned()
}

/// Waits until `count` messages are stored, then a little longer, and returns what is there:
/// a forged message delivered late must not slip past the count.
fn settled_messages(it: &Interop, count: usize) -> Vec<Vec<u8>> {
    it.wait_for_messages(count);
    std::thread::sleep(std::time::Duration::from_secs(3));
    it.wait_for_messages(0)
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn smuggled_end_of_data_never_delivers_a_forged_message_through_mx_or_submission() {
    let it = Interop::start(Parts::Everything);
    let p = it.ports;
    it.wait_for_mx_probe(p.mx);
    let paths = [
        ("mx-plain", "plain", p.mx, false),
        ("mx-starttls", "starttls", p.mx, false),
        ("submission", "starttls", p.submission, true),
    ];
    let mut tags = Vec::new();
    for (path, mode, port, auth) in paths {
        for (name, variant) in SMUGGLING {
            let tag = format!("{path}-{name}");
            let attempt = smuggle(&it, mode, port, auth, &smuggling_body(&tag, variant));
            // One transaction, one reply: the forged MAIL, RCPT and DATA were message text.
            assert_eq!(attempt.replies.len(), 1, "{tag}: {attempt:?}");
            assert_eq!(attempt.replies[0].0, 250, "{tag}: {attempt:?}");
            assert!(attempt.replies[0].1.contains("queued as"), "{tag}: {attempt:?}");
            tags.push(tag);
        }
    }
    let stored = settled_messages(&it, tags.len());
    assert_eq!(stored.len(), tags.len(), "one message per attempt, none forged:\n{}", it.maillog());
    for m in &stored {
        let tag = tag_of(m).expect("a tagged message");
        let head = headers(m);
        assert!(tags.contains(&tag) && head.contains("Subject: first "), "delivered: {head}");
        assert!(!head.contains("forged"), "a forged message was delivered: {head}");
        // Normalized: the smuggled lines are text of the first message, dot included, and
        // no bare CR survived anywhere (Postfix stores LF line ends).
        let text = String::from_utf8_lossy(m);
        assert!(!m.contains(&b'\r'), "{tag}: a bare CR reached Postfix: {text:?}");
        assert!(text.contains("first part\n.\nMAIL FROM:<ceo@mail.test>\n"), "{tag}: {text}");
    }
    let log = it.mailtls_log();
    assert!(
        log.contains("SMTP smuggling defence: client input (non-standard end of data) normalized"),
        "{log}"
    );
}

#[test]
#[ignore = "needs postfix and dovecot: run tests/run.sh"]
fn smuggled_end_of_data_under_reject_delivers_nothing_and_closes() {
    let it = Interop::start(Parts::Everything);
    let p = it.ports;
    let table = |name: &str, tls: &str, require: bool, backend: u16| {
        format!(
            "name = \"{name}\"\nprotocol = \"smtp\"\ntls = \"{tls}\"\nrequire_tls = {require}\nbare_newline = \"reject\"\n\
             listen = [\"127.0.0.1:PORT\"]\nbackend = \"127.0.0.1:{backend}\"\nproxy_protocol = \"v2\""
        )
    };
    let extra = it.extra_mailtls(
        "mailtls-reject",
        &[
            table("mx-reject", "starttls", false, p.postfix_mx),
            table("submission-reject", "starttls", true, p.postfix_submission),
        ],
    );
    let (mx, submission) = (extra.ports[0], extra.ports[1]);
    it.wait_for_mx_probe(mx);
    let paths = [
        ("mx-plain", "plain", mx, false),
        ("mx-starttls", "starttls", mx, false),
        ("submission", "starttls", submission, true),
    ];
    for (path, mode, port, auth) in paths {
        for (name, variant) in SMUGGLING {
            let tag = format!("reject-{path}-{name}");
            let attempt = smuggle(&it, mode, port, auth, &smuggling_body(&tag, variant));
            assert_eq!(attempt.replies.len(), 1, "{tag}: {attempt:?}");
            assert_eq!(attempt.replies[0].0, 521, "{tag}: {attempt:?}");
            assert!(attempt.closed, "{tag}: the session ends: {attempt:?}");
        }
    }
    // A clean message through the same listener afterwards: when it has arrived, anything
    // the refused sessions had queued would have too.
    swaks(&it, mx, "none", false, "reject-sentinel");
    let stored = settled_messages(&it, 1);
    let tags: Vec<Option<String>> = stored.iter().map(|m| tag_of(m)).collect();
    assert_eq!(tags, [Some("reject-sentinel".to_owned())], "only the clean message:\n{}", it.maillog());
    assert!(
        extra.log().contains("SMTP smuggling defence: client input (non-standard end of data) refused"),
        "{}",
        extra.log()
    );
}
