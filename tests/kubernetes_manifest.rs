//! The Kubernetes sidecar example (deploy/kubernetes/mailtls-sidecar.yaml), checked without
//! a cluster: it parses as YAML (python3-yaml), and every path, port, user id, probe and
//! argument in it agrees with the Containerfile and config/mailtls.pod.toml.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The manifest's documents, through Python's YAML parser (Debian's python3-yaml).
fn manifest() -> Option<Vec<Value>> {
    let path = root().join("deploy/kubernetes/mailtls-sidecar.yaml");
    let script = "import sys, json, yaml\njson.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)";
    let out = Command::new("python3").args(["-c", script]).arg(&path).output();
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).expect("JSON from python3")),
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'yaml'") => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but python3-yaml is missing");
            // Straight to stderr: libtest hides eprintln! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIPPED: the Kubernetes manifest check needs python3-yaml");
            None
        }
        Ok(o) => panic!("the manifest does not parse: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("python3: {e}"),
    }
}

/// The JSON array after `instruction` in the Containerfile (`CMD [...]`, `CMD` of HEALTHCHECK).
fn containerfile_array(instruction: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join("Containerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let line =
        joined.lines().find(|l| l.starts_with(instruction)).unwrap_or_else(|| panic!("no {instruction}"));
    let array = &line[line.find("CMD [").expect("an exec-form CMD") + 4..];
    serde_json::from_str(array).expect("a JSON array")
}

fn containerfile_line(instruction: &str) -> String {
    let text = std::fs::read_to_string(root().join("Containerfile")).unwrap();
    let line =
        text.lines().find(|l| l.starts_with(instruction)).unwrap_or_else(|| panic!("no {instruction}"));
    line[instruction.len()..].trim().to_owned()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().expect("an array").iter().map(|s| s.as_str().expect("a string").to_owned()).collect()
}

#[test]
fn kubernetes_sidecar_manifest_matches_the_image_and_the_pod_config() {
    let Some(docs) = manifest() else { return };
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
    let service = docs.iter().find(|d| d["kind"] == "Service").expect("a Service");
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert!(containers.len() >= 2, "mailtls beside a mail server");
    let mailtls = containers.iter().find(|c| c["name"] == "mailtls").expect("a mailtls container");

    // Arguments and probes: the image's own CMD and HEALTHCHECK.
    let cmd = containerfile_array("CMD [");
    assert_eq!(strings(&mailtls["args"]), cmd);
    let healthcheck = containerfile_array("HEALTHCHECK");
    assert!(healthcheck.contains(&"--healthcheck".to_owned()));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(strings(&mailtls[probe]["exec"]["command"]), healthcheck, "{probe}");
    }
    let entrypoint: Vec<String> = serde_json::from_str(&containerfile_line("ENTRYPOINT")).unwrap();
    assert_eq!(healthcheck[0], entrypoint[0], "the probe runs the image's binary");

    // The user and the sandbox the image is made for.
    let user = containerfile_line("USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let sc = &mailtls["securityContext"];
    assert_eq!(sc["runAsUser"].to_string(), uid);
    assert_eq!(sc["runAsGroup"].to_string(), gid);
    assert_eq!(pod["securityContext"]["fsGroup"].to_string(), gid, "Secret files readable by the group");
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);

    // The config: mounted where --config points, with the key the ConfigMap is made with.
    let config_path = &cmd[cmd.iter().position(|a| a == "--config").unwrap() + 1];
    let mounts = mailtls["volumeMounts"].as_array().unwrap();
    let mount =
        |name: &str| mounts.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("mount {name}"));
    assert_eq!(mount("config")["mountPath"], config_path.as_str());
    assert_eq!(mount("config")["subPath"], "mailtls.toml");
    assert!(mounts.iter().all(|m| m["readOnly"] == true), "every mount read-only");
    let text = std::fs::read_to_string(root().join("config/mailtls.pod.toml")).unwrap();
    let config = mailtls::config::parse(Path::new(config_path), &text).expect("config/mailtls.pod.toml");

    // Certificates: the Secret's two files land where the config reads them.
    let certs_dir = mount("certs")["mountPath"].as_str().unwrap().to_owned();
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "certs").unwrap();
    let items: BTreeSet<(String, String)> = volume["secret"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["key"].as_str().unwrap().to_owned(), i["path"].as_str().unwrap().to_owned()))
        .collect();
    let pair = &config.tls.certificates[0];
    for (key, file) in [("tls.crt", &pair.cert), ("tls.key", &pair.key)] {
        assert_eq!(file.parent().unwrap(), Path::new(&certs_dir), "{}", file.display());
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(items.contains(&(key.to_owned(), name.clone())), "{key} -> {name}: {items:?}");
    }
    let config_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "config").unwrap();
    assert_eq!(config_volume["configMap"]["name"], "mailtls");

    // Ports: one per listener, each one the image exposes, each one the Service targets.
    let exposed: BTreeSet<u16> =
        containerfile_line("EXPOSE").split_whitespace().map(|p| p.parse().unwrap()).collect();
    let ports: BTreeSet<(String, u16)> = mailtls["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["containerPort"].as_u64().unwrap() as u16))
        .collect();
    let listeners: BTreeSet<(String, u16)> =
        config.listeners.iter().map(|l| (l.name.clone(), l.listen[0].port())).collect();
    assert_eq!(ports, listeners, "container ports = the config's listeners");
    assert!(ports.iter().all(|(_, p)| exposed.contains(p)), "{ports:?} within EXPOSE {exposed:?}");
    let targets: BTreeSet<String> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targetPort"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(targets, ports.iter().map(|(n, _)| n.clone()).collect());
    // The backends are the mail server in the same pod; the admin endpoint stays pod-local.
    assert!(config
        .listeners
        .iter()
        .all(|l| l.backend.as_deref().is_some_and(|b| b.starts_with("127.0.0.1:"))));
    assert!(config.admin.as_ref().is_some_and(|a| a.listen.ip().is_loopback()));

    // Stopping: the grace period outlasts the drain.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > config.timeouts.drain.as_secs(), "grace {grace} s <= drain {:?}", config.timeouts.drain);
}
