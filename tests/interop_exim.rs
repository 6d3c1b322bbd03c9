//! Interop: Exim 4.96 (Debian 12's exim4-daemon-heavy, in a container) behind mailtls's MX
//! and submission listeners, real clients in front (swaks, msmtp, raw BDAT, Python ssl).
//! Every cell is asserted from Exim's own mainlog and the mailbox file it delivered to.
//!
//! These need root and podman (tests/run.sh), so plain `cargo test` skips them. The
//! settings below are the ones docs/exim.md documents.

#[allow(unused_imports)]
mod common;

use common::mailservers::{run, SmtpLines, CLIENT_TIMEOUT};
use common::mta::{
    ehlo_with_sni, free_ports, long_name, smtp_listener, swaks, swaks_run, Site, CLIENT_IP, EXIM_IMAGE,
};
use common::podman::can_run;

/// Exim's whole configuration (/etc/exim4/exim4.conf, which Debian's exim4 reads before
/// its generated one). MX_PORT and SUB_PORT are the ports mailtls connects to; XCLIENT_PORT
/// takes no PROXY header.
const EXIM_CONF: &str = r#"keep_environment =
primary_hostname = exim.mail.test
daemon_smtp_ports = MX_PORT : SUB_PORT : XCLIENT_PORT
local_interfaces = 127.0.0.1
# mailtls's address: from it a PROXY header (v1 or v2) must open every connection; the
# test's third port takes none, to show what Exim 4.96 makes of XCLIENT.
hosts_proxy = ${if eq{$received_port}{XCLIENT_PORT}{}{127.0.0.1}}
# mailtls does TLS; Exim's own STARTTLS would only be stripped by mailtls.
tls_advertise_hosts =
# AUTH only on the submission port and only through mailtls, which relays AUTH only
# inside TLS (and refuses it before TLS itself).
auth_advertise_hosts = ${if and{{bool{$proxy_session}}{eq{$received_port}{SUB_PORT}}}{*}{}}
log_file_path = /data/log/%slog
log_selector = +pipelining +proxy +subject +incoming_port +smtp_connection +smtp_protocol_error +smtp_syntax_error
rfc1413_hosts =
domainlist local_domains = mail.test
acl_smtp_rcpt = acl_check_rcpt
never_users = root

begin acl
acl_check_rcpt:
  deny    condition = ${if eq{$received_port}{SUB_PORT}}
          !authenticated = *
          message = submission needs AUTH
  accept  authenticated = *
  accept  domains = +local_domains : relay.test
          local_parts = alice
  deny    message = relay not permitted

begin routers
# relay.test: Exim as a sending MTA through mailtls's MX, and back in on the MX port.
relayed:
  driver = accept
  domains = relay.test
  condition = ${if eq{$received_port}{MX_PORT}}
  local_parts = alice
  transport = relayed
outbound:
  driver = manualroute
  domains = relay.test
  route_list = * 127.0.0.1::MAILTLS_MX
  self = send
  transport = to_mailtls
mailbox:
  driver = accept
  domains = +local_domains
  local_parts = alice
  transport = mailbox

begin transports
relayed:
  driver = appendfile
  file = /data/mail/relayed
  user = Debian-exim
  group = Debian-exim
  mode = 0644
to_mailtls:
  driver = smtp
  interface = 127.0.0.2
  helo_data = sender.exim.test
  hosts_pipe_connect = *
  tls_verify_certificates = /data/ca.pem
mailbox:
  driver = appendfile
  file = /data/mail/$local_part_data
  user = Debian-exim
  group = Debian-exim
  mode = 0644

begin retry
*  *  F,1h,5m

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and{{!eq{$auth3}{}}{eq{$auth3}{${lookup{$auth2}lsearch{/data/passwd}}}}}}
  server_set_id = $auth2
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and{{!eq{$auth2}{}}{eq{$auth2}{${lookup{$auth1}lsearch{/data/passwd}}}}}}
  server_set_id = $auth1
"#;

/// Exim's fixed user list for the plaintext authenticator.
const PASSWD: &str = "alice@mail.test: secret\n";

/// Exim in its container on three ports (MX, submission, one without PROXY), sending mail
/// for relay.test to mailtls's MX listener on `mailtls_mx`; copies the config to where
/// Debian's exim4 reads it and runs the daemon in the foreground.
fn exim(mailtls_mx: u16) -> (Site, [u16; 3]) {
    let ports @ [mx, sub, xclient] = free_ports();
    let conf = EXIM_CONF
        .replace("MAILTLS_MX", &mailtls_mx.to_string())
        .replace("MX_PORT", &mx.to_string())
        .replace("SUB_PORT", &sub.to_string())
        .replace("XCLIENT_PORT", &xclient.to_string());
    let files = [("exim4.conf", conf), ("passwd", PASSWD.to_owned())];
    let script = "cp /data/exim4.conf /etc/exim4/exim4.conf && exec exim4 -bdf -q1m";
    let site = Site::start("exim", &EXIM_IMAGE, &files, script, &[], "log/mainlog");
    site.wait_for_log("daemon started", |l| l.contains("daemon started"));
    (site, ports)
}

/// Exim's `<=` line for the message whose Subject is `cell TAG`.
fn arrival<'a>(log: &'a str, tag: &str) -> Option<&'a str> {
    let subject = format!("T=\"cell {tag}\"");
    log.lines().find(|l| l.contains(" <= ") && l.contains(&subject))
}

#[test]
#[ignore = "needs root and podman: run tests/run.sh"]
fn exim_behind_the_mx_and_submission_roles_logs_every_client_with_its_own_address() {
    if !can_run("Exim behind mailtls") {
        return;
    }
    let [mx, mx_v1, mx_xclient, submission, submissions] = free_ports();
    let (mut site, [exim_mx, exim_sub, exim_plain]) = exim(mx);
    let listeners = [
        smtp_listener("mx", "starttls", mx, exim_mx, "v2", ""),
        smtp_listener("mx-v1", "starttls", mx_v1, exim_mx, "v1", ""),
        smtp_listener("mx-xclient", "starttls", mx_xclient, exim_plain, "none", "xclient = true\n"),
        smtp_listener("submission", "starttls", submission, exim_sub, "v2", ""),
        smtp_listener("submissions", "implicit", submissions, exim_sub, "v2", ""),
    ]
    .concat();
    site.start_mailtls(&listeners, &[mx, mx_v1, mx_xclient, submission, submissions]);
    // What mailtls offers before TLS is what Exim offers, STARTTLS added, AUTH never.
    let offered = site.wait_for_probe(mx);
    for extension in ["PIPELINING", "CHUNKING", "SIZE 52428800", "STARTTLS"] {
        assert!(offered.contains(extension), "{extension}: {offered}");
    }
    assert!(!offered.contains("AUTH"), "{offered}");
    site.wait_for_probe(mx_v1);

    let auth =
        |mechanism| ["--auth", mechanism, "--auth-user", "alice@mail.test", "--auth-password", "secret"];
    // The MX role: plaintext, STARTTLS, PIPELINING (v2), plaintext through a v1 header.
    let plain = swaks(&site, mx, "mx-plain", &[]);
    assert!(plain.contains("250 OK id="), "{plain}");
    let starttls = swaks(&site, mx, "mx-starttls", &["--tls"]);
    assert!(!starttls.contains("AUTH"), "Exim offered AUTH on the MX port: {starttls}");
    let pipelined = swaks(&site, mx, "mx-pipelined", &["--pipeline"]);
    assert!(pipelined.contains("PIPELINING") && pipelined.contains("250 OK id="), "{pipelined}");
    swaks(&site, mx_v1, "mx-v1", &[]);
    // The submission role: Exim's own SASL, inside mailtls's TLS on 587 and 465.
    let sub_plain = swaks(&site, submission, "587-plain", &[&["--tls"][..], &auth("PLAIN")].concat());
    assert!(sub_plain.contains("235 Authentication succeeded"), "{sub_plain}");
    let sub_login =
        swaks(&site, submissions, "465-login", &[&["--tls-on-connect"][..], &auth("LOGIN")].concat());
    assert!(sub_login.contains("235 Authentication succeeded"), "{sub_login}");
    msmtp(&site, submissions, "465-msmtp");

    // CHUNKING: two BDAT chunks on the plaintext MX, the second holding command-like lines.
    let mut c = SmtpLines::connect(mx, Some(CLIENT_IP)).expect("connect");
    assert!(c.reply().unwrap().starts_with("220 "));
    c.send("EHLO bdat.example").unwrap();
    assert!(c.reply().unwrap().contains("CHUNKING"));
    c.send("MAIL FROM:<carol@sender.test>").unwrap();
    assert!(c.reply().unwrap().starts_with("250 "));
    c.send("RCPT TO:<alice@mail.test>").unwrap();
    assert!(c.reply().unwrap().starts_with("250 "));
    let first = "Subject: cell mx-bdat\r\n\r\nmarker mx-bdat\r\n";
    let second = "QUIT\r\nRCPT TO:<postmaster@mail.test>\r\n";
    c.send(format!("BDAT {}\r\n{first}", first.len()).trim_end_matches("\r\n")).unwrap();
    assert!(c.reply().unwrap().starts_with("250 "));
    c.send(format!("BDAT {} LAST\r\n{second}", second.len()).trim_end_matches("\r\n")).unwrap();
    let last = c.reply().unwrap();
    assert!(last.contains("250 OK id="), "{last}");
    c.send("QUIT").unwrap();

    // XCLIENT: Exim 4.96 has none (4.98 brought it). mailtls will not let Exim log its own
    // address as the client's: the session ends with 421, and nothing is delivered.
    let xclient = swaks_run(&site, mx_xclient, "mx-xclient", &[]);
    assert!(!xclient.success() && xclient.stdout.contains("421 4.3.2"), "{}", xclient.stdout);

    // Exim's own log: every message from the client's address, mailtls as the proxy.
    let cells = [
        ("mx-plain", "P=esmtp "),
        ("mx-starttls", "P=esmtp "),
        ("mx-pipelined", "P=esmtp "),
        ("mx-v1", "P=esmtp "),
        ("587-plain", "P=esmtpa A=plain:alice@mail.test "),
        ("465-login", "P=esmtpa A=login:alice@mail.test "),
        ("465-msmtp", "P=esmtpa A=plain:alice@mail.test "),
        ("mx-bdat", "P=esmtp "),
    ];
    let log = site.wait_for_log("every message", |l| cells.iter().all(|(tag, _)| arrival(l, tag).is_some()));
    let mut report = Vec::new();
    for (tag, protocol) in cells {
        let line = arrival(&log, tag).unwrap_or_default();
        assert!(line.contains(&format!(" [{CLIENT_IP}]:")), "{tag}: not the client's address: {line}");
        assert!(line.contains(" PRX=127.0.0.1 "), "{tag}: not through mailtls: {line}");
        for field in protocol.split_whitespace() {
            assert!(line.contains(&format!(" {field} ")), "{tag}: {field}: {line}");
        }
        report.push(format!("{tag:>12}: {}", &line[line.find(" H=").unwrap_or(0)..]));
    }
    assert!(arrival(&log, "mx-bdat").is_some_and(|l| l.contains(" K ")), "BDAT not logged as CHUNKING");
    assert!(!log.contains("synchronization error"), "{log}");
    let refused = log.lines().find(|l| l.contains("\"XCLIENT ADDR=127.0.0.2 ")).unwrap_or_default();
    assert!(refused.contains("H=[127.0.0.1]:") && refused.contains("unrecognized command"), "{log}");
    assert!(arrival(&log, "mx-xclient").is_none(), "{log}");
    eprintln!("Exim's arrivals through mailtls:\n{}", report.join("\n"));

    // The mailbox Exim delivered to: every message once, the chunk's text as text.
    site.wait_for_log("every delivery", |l| {
        l.matches("=> alice <alice@mail.test> R=mailbox").count() >= cells.len()
    });
    let mbox = common::mailservers::read_lossy(&site.data().join("mail/alice"));
    for (tag, _) in cells {
        assert_eq!(mbox.matches(&format!("Subject: cell {tag}\n")).count(), 1, "{tag}:\n{mbox}");
        assert!(mbox.contains(&format!("marker {tag}\n")), "{tag}");
    }
    assert!(mbox.contains("\nQUIT\nRCPT TO:<postmaster@mail.test>\n"), "the chunk arrived whole");
    assert_eq!(mbox.matches(&format!("Received: from [{CLIENT_IP}] (port=")).count(), cells.len(), "{mbox}");

    // A real sending MTA: Exim's smtp transport (from CLIENT_IP) relays two messages for
    // relay.test through mailtls's MX, with STARTTLS, PIPELINING, CHUNKING and, on the
    // second connection (the first cached the EHLO reply), PIPECONNECT: its EHLO sent
    // before mailtls's greeting.
    for n in 1..=2 {
        let tag = format!("relay-{n}");
        swaks(
            &site,
            submission,
            &tag,
            &[&["--to", "alice@relay.test", "--tls"][..], &auth("PLAIN")].concat(),
        );
        let sent = format!("T=\"cell {tag}\"");
        site.wait_for_log("relayed through mailtls", |l| {
            l.lines().filter(|l| l.contains(" <= ") && l.contains(&sent)).count() == 2
                && l.matches("=> alice@relay.test R=outbound T=to_mailtls").count() == n
        });
    }
    let log = site.backend_log();
    let outbound: Vec<&str> = log.lines().filter(|l| l.contains("=> alice@relay.test R=outbound")).collect();
    eprintln!("Exim as the sending MTA through mailtls's MX:\n{}", outbound.join("\n"));
    for line in &outbound {
        assert!(line.contains(" X=TLS1.3:") && line.contains(" CV=yes "), "verified STARTTLS: {line}");
        assert!(line.contains(" K C=\"250-"), "BDAT: {line}");
    }
    assert!(outbound[0].contains(" L K "), "PIPELINING on the first: {}", outbound[0]);
    assert!(outbound[1].contains(" L* K "), "PIPECONNECT on the second: {}", outbound[1]);
    let inbound: Vec<&str> =
        log.lines().filter(|l| l.contains(" <= ") && l.contains("H=(sender.exim.test) ")).collect();
    assert_eq!(inbound.len(), 2, "{log}");
    for line in inbound {
        assert!(line.contains(&format!(" [{CLIENT_IP}]:")) && line.contains(" PRX=127.0.0.1 "), "{line}");
        assert!(line.contains(" K "), "{line}");
    }
    site.wait_for_log("both relayed delivered", |l| {
        l.matches("=> alice <alice@relay.test> R=relayed").count() == 2
    });
    let relayed = common::mailservers::read_lossy(&site.data().join("mail/relayed"));
    for n in 1..=2 {
        assert_eq!(relayed.matches(&format!("Subject: cell relay-{n}\n")).count(), 1, "{relayed}");
    }
}

#[test]
#[ignore = "needs root and podman: run tests/run.sh"]
fn no_login_reaches_exim_without_tls() {
    if !can_run("Exim behind mailtls") {
        return;
    }
    let [mx, submission] = free_ports();
    let (mut site, [exim_mx, exim_sub, _]) = exim(mx);
    let listeners = [
        smtp_listener("mx", "starttls", mx, exim_mx, "v2", ""),
        smtp_listener("submission", "starttls", submission, exim_sub, "v2", ""),
    ]
    .concat();
    site.start_mailtls(&listeners, &[mx, submission]);
    site.wait_for_probe(mx);
    let careless = "127.0.0.3";
    let plain = "AGFsaWNlQG1haWwudGVzdABzZWNyZXQ="; // \0alice@mail.test\0secret
    for port in [mx, submission] {
        let mut c = SmtpLines::connect(port, Some(careless)).unwrap();
        c.reply().unwrap();
        c.send("EHLO careless.example").unwrap();
        assert!(!c.reply().unwrap().contains("AUTH"), "port {port}");
        c.send(&format!("AUTH PLAIN {plain}")).unwrap();
        assert!(c.reply().unwrap().starts_with("530 5.7.0"), "port {port}");
        c.send("QUIT").unwrap();
    }
    // swaks told to authenticate without TLS gets no AUTH to use.
    let mut c = std::process::Command::new("swaks");
    c.args(["--server", &format!("127.0.0.1:{submission}"), "--local-interface", careless]);
    c.args(["--to", "alice@mail.test", "--auth", "PLAIN", "--auth-user", "alice@mail.test"]);
    c.args(["--auth-password", "secret"]).stdin(std::process::Stdio::null());
    let out = run(&mut c, CLIENT_TIMEOUT);
    assert!(!out.success() && !out.stdout.contains("235 "), "{}", out.stdout);
    // A control over TLS from the client address, so Exim's log is known to be written.
    swaks(
        &site,
        submission,
        "control",
        &["--tls", "--auth", "PLAIN", "--auth-user", "alice@mail.test", "--auth-password", "secret"],
    );
    let log = site.wait_for_log("the control", |l| arrival(l, "control").is_some());
    assert!(!log.contains(careless), "a plaintext attempt reached Exim:\n{log}");
    assert!(!log.contains("authenticator failed"), "{log}");
}

#[test]
#[ignore = "needs root and podman: run tests/run.sh"]
fn a_long_sni_overflows_exims_proxy_v2_buffer_unless_the_header_carries_no_tlvs() {
    if !can_run("Exim behind mailtls") {
        return;
    }
    let [with_tlvs, without_tlvs] = free_ports();
    let (mut site, [_, exim_sub, _]) = exim(0);
    let listeners = [
        smtp_listener("submissions", "implicit", with_tlvs, exim_sub, "v2", ""),
        smtp_listener("submissions-bare", "implicit", without_tlvs, exim_sub, "v2", "proxy_tlvs = []\n"),
    ]
    .concat();
    site.start_mailtls(&listeners, &[with_tlvs, without_tlvs]);
    let hello = format!("Hello sni.example [{CLIENT_IP}]");
    // Exim 4.96 reads a v2 header into 232 bytes: 16 + 12 (IPv4) + 43 (the SSL TLV with
    // TLS 1.3's 22-byte cipher name) + 3 + SNI. 158 bytes of SNI fit, 159 do not.
    let fits = long_name(158);
    let out = ehlo_with_sni(with_tlvs, "implicit", &fits);
    assert!(out.stdout.contains(&hello), "158 bytes: {}{}", out.stdout, out.stderr);
    let too_long = long_name(159);
    let out = ehlo_with_sni(with_tlvs, "implicit", &too_long);
    assert!(!out.stdout.contains("Hello"), "159 bytes: {}{}", out.stdout, out.stderr);
    let log = site.wait_for_log("the refused header", |l| l.contains(&too_long));
    // Exim gave up on the header, kept mailtls's address, and read the rest as a command.
    let misread = log.lines().find(|l| l.contains(&too_long)).unwrap_or_default();
    assert!(misread.contains("SMTP syntax error") && misread.contains("H=[127.0.0.1]"), "{misread}");
    // Without TLVs the header is 28 bytes whatever the client sends.
    for len in [159, 253] {
        let out = ehlo_with_sni(without_tlvs, "implicit", &long_name(len));
        assert!(out.stdout.contains(&hello), "{len} bytes, no TLVs: {}{}", out.stdout, out.stderr);
    }
}

fn msmtp(site: &Site, port: u16, tag: &str) {
    let rc = site.dir.path().join(format!("msmtprc-{tag}"));
    let text = format!(
        "account default\nhost localhost\nport {port}\nsource_ip {CLIENT_IP}\nfrom carol@sender.test\n\
         auth plain\nuser alice@mail.test\npassword secret\ntls on\ntls_starttls off\ntls_trust_file {}\n",
        site.ca().display()
    );
    std::fs::write(&rc, text).unwrap();
    std::fs::set_permissions(&rc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let message = format!("Subject: cell {tag}\r\nTo: alice@mail.test\r\n\r\nmarker {tag}\r\n");
    let data = site.dir.path().join(format!("{tag}.eml"));
    std::fs::write(&data, message).unwrap();
    let mut c = std::process::Command::new("msmtp");
    c.arg("-C").arg(&rc).arg("alice@mail.test").stdin(std::fs::File::open(&data).unwrap());
    let out = run(&mut c, CLIENT_TIMEOUT);
    assert!(out.success(), "msmtp {tag}: {:?}\n{}{}", out.status, out.stdout, out.stderr);
}
