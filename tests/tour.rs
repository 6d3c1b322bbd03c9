//! The README's five-minute tour, run as it stands: the mailtls binary on
//! config/mailtls.example.toml (its ports moved to free ones, since tests run side by
//! side), each ```sh block of the tour run with bash in turn, each output block the README
//! shows found in what the block before it printed, and the log lines the tour's prose
//! quotes found in mailtls's log.
//!
//! `#[ignore]`: it needs openssl, swaks, python3 and curl, which tests/run.sh installs; it
//! prints SKIPPED where one is missing (and fails under CI=true).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::{free_port, local, Running};
use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};

const TOOLS: &[&str] = &["openssl", "swaks", "python3", "curl", "timeout"];

/// Phrases of the tour's prose (each must be in the README's tour) and where the run must
/// show them: in the output of the tour's commands, or in mailtls's log.
const SHOWN_BY_THE_COMMANDS: &[&str] = &[
    "CN = localhost, O = mailtls self-signed trial",
    "* BYE [UNAVAILABLE] Backend server unavailable",
    "Protocol version: TLSv1.3",
    "Ciphersuite: TLS_AES_256_GCM_SHA384",
    "421 4.3.2 Service not available, closing transmission channel",
];
const SHOWN_IN_THE_LOG: &[&str] = &[
    "created a SELF-SIGNED certificate",
    "serving a SELF-SIGNED trial certificate",
    "listening listener=",
    "backend down: capability probe failed: cannot connect to backend",
    "certificate reloaded file=",
    "key=ECDSA-256 not_after=",
];

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// The tour's code blocks in order: (info string, text).
fn tour_blocks(readme: &str) -> (String, Vec<(String, String)>) {
    let start = readme.find("## A five-minute tour").expect("the README's tour");
    let end = start + readme[start..].find("\n## Documentation").expect("the section after the tour");
    let tour = &readme[start..end];
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for event in Parser::new(tour) {
        match event {
            Event::Start(Tag::CodeBlock(CodeBlockKind::Fenced(info))) => {
                current = Some((info.into_string(), String::new()))
            }
            Event::Text(t) => {
                if let Some((_, text)) = current.as_mut() {
                    text.push_str(&t);
                }
            }
            Event::End(TagEnd::CodeBlock) => blocks.extend(current.take()),
            _ => {}
        }
    }
    (tour.to_owned(), blocks)
}

/// `text` with the example config's ports replaced by this run's.
fn moved(text: &str, ports: &BTreeMap<u16, u16>) -> String {
    let mut out = text.to_owned();
    for (old, new) in ports {
        for (from, to) in [
            (format!("127.0.0.1:{old}"), format!("127.0.0.1:{new}")),
            (format!("[::1]:{old}"), format!("[::1]:{new}")),
            (format!("\", {old})"), format!("\", {new})")),
            (format!("--port {old} "), format!("--port {new} ")),
        ] {
            out = out.replace(&from, &to);
        }
    }
    out
}

#[tokio::test]
#[ignore = "needs openssl, swaks, python3 and curl; tests/run.sh runs it"]
async fn the_readmes_tour_shows_what_it_says() {
    if let Some(missing) = TOOLS.iter().find(|t| !have(t)) {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, yet {missing} is missing");
        eprintln!("SKIPPED: the README's tour needs {missing} (apt-get install openssl swaks python3 curl)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let (tour, blocks) = tour_blocks(&readme);
    let prose = tour.split_whitespace().collect::<Vec<_>>().join(" ");
    for phrase in SHOWN_BY_THE_COMMANDS.iter().chain(SHOWN_IN_THE_LOG) {
        assert!(prose.contains(phrase), "the tour no longer says {phrase:?}: update this test with it");
    }

    // Every port of the example config (listeners, backends, admin) moved to a free one.
    let example = std::fs::read_to_string(root.join("config/mailtls.example.toml")).unwrap();
    let mut ports = BTreeMap::new();
    for part in example.split("127.0.0.1:").skip(1).chain(example.split("[::1]:").skip(1)) {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(port) = digits.parse::<u16>() {
            ports.entry(port).or_insert_with(free_port);
        }
    }
    assert!(ports.contains_key(&10993) && ports.contains_key(&9925), "{ports:?}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailtls.example.toml");
    std::fs::write(&config, moved(&example, &ports)).unwrap();
    let mut proxy = Running::mailtls(&config, &[]);
    proxy.wait_accepting(local(ports[&10993])).await;
    proxy.wait_accepting(local(ports[&9925])).await;

    let mut printed = String::new();
    let mut last = String::new();
    let mut checked_outputs = 0;
    for (info, text) in &blocks {
        if info == "sh" {
            let script =
                moved(text, &ports).replace("cd config\n", &format!("cd {}\n", dir.path().display()));
            let out = Command::new("timeout")
                .args(["60", "bash", "-e", "-c", &script])
                .current_dir(root)
                .output()
                .expect("bash");
            last =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "the tour's block failed:\n{script}\n{last}");
            printed.push_str(&last);
        } else if info.is_empty() {
            // An output block: each of its lines printed by the block before it (the EHLO
            // name is the machine's own).
            for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
                let found = match line.strip_prefix(" -> EHLO ") {
                    Some(_) => last.contains(" -> EHLO "),
                    None => last.lines().any(|l| l.trim_end() == line),
                };
                assert!(found, "the tour shows {line:?}, the command printed:\n{last}");
            }
            checked_outputs += 1;
        }
    }
    assert!(checked_outputs >= 3, "{checked_outputs} output blocks checked");
    for phrase in SHOWN_BY_THE_COMMANDS {
        assert!(printed.contains(phrase), "the tour says {phrase:?}; the commands printed:\n{printed}");
    }
    for phrase in SHOWN_IN_THE_LOG {
        assert!(proxy.log_shows(phrase, 1).await, "the tour says the log shows {phrase:?}:\n{}", proxy.log());
    }
    // Step 5: the handshake after the reload showed the certificate the tour wrote, not the
    // trial certificate mailtls made at start.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(dir.path().join("dev-cert.pem"))
        .output()
        .unwrap();
    let written = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(written.starts_with("notAfter="), "{written}");
    assert!(last.lines().any(|l| l.trim() == written), "wrote {written}, was shown:\n{last}");
    let not_after = |event: &str| {
        let log = proxy.log();
        let line = log.lines().find(|l| l.contains(event)).map(str::to_owned).unwrap_or_default();
        line.split_whitespace().find(|w| w.starts_with("not_after=")).map(str::to_owned)
    };
    let (loaded, reloaded) = (not_after("certificate loaded"), not_after("certificate reloaded"));
    assert!(loaded.is_some() && reloaded.is_some() && loaded != reloaded, "{loaded:?} {reloaded:?}");

    // The prose's `kill -HUP $(pidof mailtls)` and Ctrl-C.
    assert!(prose.contains("kill -HUP $(pidof mailtls)"), "{prose}");
    assert!(prose.contains("`configuration reloaded: new sessions use it`"), "{prose}");
    proxy.signal("HUP");
    assert!(proxy.log_shows("configuration reloaded: new sessions use it", 1).await, "{}", proxy.log());
    assert!(
        prose.contains("`stopping: no new connections`") && prose.contains("then `stopped`, exit status 0")
    );
    proxy.signal("INT");
    let status = proxy.exit_within(Duration::from_secs(40)).await.expect("mailtls stops");
    assert!(status.success(), "{status:?}: {}", proxy.log());
    for phrase in ["stopping: no new connections", "stopped"] {
        assert!(proxy.log().contains(phrase), "{}", proxy.log());
    }
}
