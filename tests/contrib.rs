//! The operator's kit in contrib/: the Prometheus alert rules pass `promtool check rules`
//! and their own unit tests, and every metric and label the alerts and the Grafana
//! dashboard query is one a running mailtls really exposes after real traffic, so a
//! renamed metric breaks this test instead of a dashboard nobody looks at until 3 a.m.

mod common;

use common::process::*;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use tokio::net::TcpStream;

const ALERTS: &str = include_str!("../contrib/prometheus/mailtls-alerts.yml");
const DASHBOARD: &str = include_str!("../contrib/grafana/mailtls.json");

fn contrib(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("promtool").args(args).current_dir(contrib("prometheus")).output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some((ok, text)) = promtool(&["check", "rules", "mailtls-alerts.yml"]) else {
        eprintln!("SKIPPED: promtool not installed (Debian package prometheus)");
        return;
    };
    assert!(ok && text.contains("SUCCESS: 8 rules found"), "promtool check rules:\n{text}");
    let (ok, text) = promtool(&["test", "rules", "mailtls-alerts.test.yml"]).expect("promtool ran once");
    assert!(ok && text.contains("SUCCESS"), "promtool test rules:\n{text}");
}

#[test]
fn every_alert_has_a_firing_and_a_silent_unit_test() {
    let tests = std::fs::read_to_string(contrib("prometheus/mailtls-alerts.test.yml")).unwrap();
    for alert in ALERTS.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(cases.iter().any(|c| c.contains("exp_labels")), "{alert}: no test where it fires");
        assert!(cases.iter().any(|c| c.contains("exp_alerts: []")), "{alert}: no test where it stays silent");
    }
}

/// The PromQL expressions of the alert rules and of every dashboard panel.
fn queries() -> Vec<String> {
    let mut out: Vec<String> =
        ALERTS.lines().filter_map(|l| l.trim().strip_prefix("expr: ")).map(str::to_owned).collect();
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            out.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(out.len() > panels.len(), "too few queries found: {out:?}");
    out
}

/// `mailtls_*` metric names in a query.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("mailtls_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Label names a query groups by or matches on, other than the scrape's own.
fn label_names(query: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for (open, close) in [("by (", ')'), ("{", '}')] {
        for part in query.split(open).skip(1) {
            let inside = part.split(close).next().unwrap_or("");
            for item in inside.split(',') {
                let name = item.split(['=', '!', '~']).next().unwrap_or("").trim();
                if !name.is_empty() && !["instance", "job"].contains(&name) {
                    labels.insert(name.to_owned());
                }
            }
        }
    }
    labels
}

/// Sample lines of `metric` in a scrape: `name{labels} value` or `name value`.
fn samples<'a>(scrape: &'a str, metric: &str) -> Vec<&'a str> {
    scrape
        .lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboard_and_alerts_use_is_in_a_real_scrape() {
    let imap_backend = Backend::start(Script::Imap).await;
    let smtp_backend = Backend::start(Script::Smtp).await;
    let down = Backend::unreachable().await;
    let certs = certs();
    let routes = certs.dir.path().join("routes.toml");
    std::fs::write(&routes, format!("default = \"{}\"\n", imap_backend.addr)).unwrap();
    let listeners = [
        Listener::new("imaps", "imap", "implicit", imap_backend.addr),
        Listener::new("submission", "smtp", "starttls", smtp_backend.addr),
        Listener::new("pop3s", "pop3", "implicit", down),
        Listener::new("limited", "smtp", "starttls", smtp_backend.addr),
        Listener::new("routed", "imap", "implicit", down),
    ];
    let ports: Vec<u16> = listeners.iter().map(|_| free_port()).collect();
    let admin = local(free_port());
    let mut text = with_ports(&config_text(&certs, &listeners, ""), &ports);
    // "limited" takes one connection at a time; "routed" takes its backend from a routes file.
    let limited_at = text.find("name = \"limited\"").expect("limited listener");
    text.insert_str(limited_at, "max_connections = 1\n");
    let routed_backend = format!("backend = \"{down}\"\nproxy_protocol = \"v2\"\n");
    let routed_at = text.rfind(&routed_backend).expect("routed listener");
    text.replace_range(
        routed_at..routed_at + routed_backend.len(),
        &format!("routes = {:?}\nproxy_protocol = \"v2\"\n", routes.display().to_string()),
    );
    text.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n"));
    let config = certs.dir.path().join("mailtls.toml");
    std::fs::write(&config, &text).unwrap();
    let mut run = Running::mailtls(&config, &[]);
    run.wait_accepting(local(ports[0])).await;
    run.wait_accepting(admin).await;

    traffic::one_of_each(
        &traffic::Roles { imaps: ports[0], submission: ports[1], pop3s_down: ports[2] },
        &certs,
    )
    .await;
    // A listener limit: the second connection is refused while the first is open.
    let mut first = Conn::new(TcpStream::connect(local(ports[3])).await.unwrap());
    assert!(first.line().await.starts_with("220 "));
    let mut second = Conn::new(TcpStream::connect(local(ports[3])).await.unwrap());
    assert!(second.line().await.starts_with("421 "));
    // Reloads: the configuration on SIGHUP; then a broken routes file and a broken
    // certificate, renamed into place as certbot and editors do, which the watchers refuse
    // (the `outcome="failed"` series the alerts watch).
    run.signal("HUP");
    scrape_until(admin, "mailtls_config_reloads_total{outcome=\"ok\"}", 1.0).await;
    for file in [&routes, &certs.cert] {
        let fresh = file.with_extension("new");
        std::fs::write(&fresh, "not what it should be\n").unwrap();
        std::fs::rename(&fresh, file).unwrap();
    }
    scrape_until(admin, "mailtls_route_reloads_total{outcome=\"failed\"}", 1.0).await;
    let scrape = scrape_until(admin, "mailtls_certificate_reloads_total{outcome=\"failed\"}", 1.0).await;
    drop(first);

    let mut missing = Vec::new();
    for query in queries() {
        let names = metric_names(&query);
        let mut found: Vec<&str> = Vec::new();
        for name in &names {
            let lines = samples(&scrape, name);
            if lines.is_empty() {
                missing.push(format!("metric {name} (in `{query}`)"));
            }
            found.extend(lines);
        }
        for label in label_names(&query) {
            if !found.iter().any(|l| l.contains(&format!("{{{label}=")) || l.contains(&format!(",{label}=")))
            {
                missing.push(format!("label {label} (in `{query}`)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the scrape: {missing:#?}\n--- scrape ---\n{scrape}\n--- log ---\n{}",
        run.log()
    );
}
