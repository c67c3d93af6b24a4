//! The deployment files, checked offline (no container engine runs here): nothing anonymous,
//! no default secrets, nothing published beyond loopback unless asked, and the NATS users as
//! the code names them.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|error| panic!("read {path}: {error}"))
}

#[test]
fn the_brokers_fleetlog_ships_take_no_anonymous_clients() {
    let compose_broker = read("deploy/mosquitto/mosquitto.conf");
    let stack = read("deploy/local/stack.sh");
    for (name, config) in [("compose", &compose_broker), ("local stack", &stack)] {
        assert!(config.contains("allow_anonymous false"), "{name}");
        assert!(!config.contains("allow_anonymous true"), "{name}");
        assert!(config.contains("per_listener_settings false"), "{name}");
        assert!(config.contains("mosquitto_dynamic_security.so"), "{name}");
    }
    // The local stack listens on loopback only.
    for line in stack.lines().filter(|line| line.starts_with("listener ")) {
        assert!(line.ends_with(" 127.0.0.1"), "{line}");
    }
    assert!(stack.contains("listen: 127.0.0.1:$nats_port"));
}

#[test]
fn the_compose_stack_has_no_default_secret_and_publishes_on_loopback() {
    let compose = read("deploy/compose.yaml");
    let generator = read("deploy/compose-secrets.sh");
    let mut required = Vec::new();
    for (start, _) in compose.match_indices("${") {
        let rest = &compose[start + 2..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let operator = &rest[name.len()..name.len() + 2];
        if name.contains("PASSWORD") || name.contains("SECRET") || name.contains("KEY") {
            assert_eq!(operator, ":?", "{name} must be required, never defaulted");
            assert!(
                generator.contains(&name),
                "{name} is not made by compose-secrets.sh"
            );
            required.push(name);
        }
    }
    assert!(required.len() >= 14, "{required:?}");
    for line in compose.lines().map(str::trim) {
        if line.starts_with("- \"") && line.contains(':') && !line.contains("/") {
            assert!(
                line.contains("_PUBLISH:-127.0.0.1:"),
                "a port published beyond loopback by default: {line}"
            );
        }
        assert!(
            !line.starts_with("POSTGRES_PASSWORD: fleetlog"),
            "a default database password"
        );
    }
    assert!(read(".gitignore")
        .lines()
        .any(|line| line == "/deploy/.env"));
}

#[test]
fn the_nats_users_are_the_ones_the_roles_connect_as() {
    let accounts = read("deploy/nats/accounts.conf");
    let users: Vec<&str> = accounts
        .match_indices("user: \"")
        .map(|(start, _)| {
            let rest = &accounts[start + 7..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert_eq!(
        users,
        [
            fleetlog_nats::accounts::RELAY,
            fleetlog_nats::accounts::PROJECT,
            fleetlog_nats::accounts::INGEST,
            fleetlog_nats::accounts::DISPATCH,
            fleetlog_nats::accounts::SYNC,
            fleetlog_nats::accounts::API,
            fleetlog_nats::accounts::READER,
            fleetlog_nats::accounts::ADMIN,
        ]
    );
    // Each user's block: its password from the environment; only the relay's (and the
    // operators', which has every right) may publish events.
    let blocks: Vec<&str> = accounts.split("user: \"").skip(1).collect();
    for (user, block) in users.iter().zip(&blocks) {
        assert!(block.contains("password: $FLEETLOG_"), "{user}");
        let publishes_events = block
            .split("subscribe:")
            .next()
            .unwrap()
            .contains("\"fleetlog.events.>\"");
        assert_eq!(
            publishes_events,
            *user == fleetlog_nats::accounts::RELAY,
            "{user}"
        );
    }
    // Each role may use its own durable consumers, by the names the code gives them.
    let block_of = |user: &str| blocks[users.iter().position(|name| *name == user).unwrap()];
    let mut owned: Vec<(&str, &str)> = fleetlog_projections::PROJECTIONS
        .iter()
        .map(|name| (fleetlog_nats::accounts::PROJECT, *name))
        .collect();
    owned.extend([
        (
            fleetlog_nats::accounts::PROJECT,
            fleetlog_process::rollout_manager::ROLLOUT_CONSUMER,
        ),
        (
            fleetlog_nats::accounts::PROJECT,
            fleetlog_process::rollout_manager::DEVICE_CONSUMER,
        ),
        (
            fleetlog_nats::accounts::PROJECT,
            fleetlog_process::rollout_manager::FIRMWARE_CONSUMER,
        ),
        (
            fleetlog_nats::accounts::DISPATCH,
            fleetlog_dispatch::CONSUMER,
        ),
        (
            fleetlog_nats::accounts::SYNC,
            fleetlog_process::broker_sync::CONSUMER,
        ),
        (
            fleetlog_nats::accounts::SYNC,
            fleetlog_process::broker_sync::KEYS_CONSUMER,
        ),
    ]);
    for (user, consumer) in owned {
        assert!(
            block_of(user).contains(&format!(
                "\"$JS.API.CONSUMER.MSG.NEXT.FLEETLOG_EVENTS.{consumer}\""
            )),
            "{user} may not pull from its consumer {consumer}"
        );
        assert!(
            block_of(fleetlog_nats::accounts::API).contains(&format!(
                "\"$JS.API.CONSUMER.MSG.NEXT.FLEETLOG_EVENTS.{consumer}\""
            )),
            "the API is not kept from {consumer}"
        );
    }
    for (user, variable) in fleetlog_testkit::nats::USERS {
        assert!(accounts.contains(&format!("user: \"{user}\", password: ${variable}")));
    }
}

/// Every shell script parses (`bash -n`) and is executable: a typo in a script run rarely,
/// such as a benchmark or the fault matrix, shows here rather than at its next run.
#[test]
fn every_script_parses_and_is_executable() {
    use std::os::unix::fs::PermissionsExt;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = vec![root.join(".ci/run")];
    let mut folders = vec![root.join("deploy")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "sh") {
                scripts.push(path);
            }
        }
    }
    assert!(scripts.len() >= 6, "found {scripts:?}");
    for script in scripts {
        let output = std::process::Command::new("bash")
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let mode = std::fs::metadata(&script).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", script.display());
    }
}

/// Runs `promtool` (Prometheus's checker; `deploy/local/test.sh` unpacks it) with `args`.
fn promtool(args: &[&str]) -> std::process::Output {
    std::process::Command::new("promtool")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("promtool (the `prometheus` package; deploy/local/test.sh unpacks it)")
}

/// The metric names (`fleetlog_...`) `text` mentions.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("fleetlog_")
        .map(|(start, _)| {
            text[start..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect()
}

/// Fails unless fleetlog records every metric `source` names (a histogram by any of its
/// series' names).
fn assert_recorded(source: &str, names: &std::collections::BTreeSet<String>) {
    for name in names {
        let recorded = fleetlog::metrics::CATALOGUE.iter().any(|metric| {
            metric.name == name
                || (metric.kind == fleetlog::metrics::Kind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(metric.name)))
        });
        assert!(
            recorded,
            "{source} names {name}, which fleetlog does not record"
        );
    }
}

/// Every metric of the catalogue (what the dashboard and the rules are checked against) is one
/// the code records: its name appears in a `counter!`, `gauge!` or `histogram!` call (or the
/// gauge helper `set_counts`) of a crate's sources, so the catalogue cannot name a metric
/// nothing exports.
#[test]
fn the_catalogue_names_only_metrics_the_code_records() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = String::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if !["target", "tests", "bench", ".git", ".fleetlog"].contains(&name.as_str()) {
                    folders.push(path);
                }
            } else if name.ends_with(".rs") {
                sources.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    // The calls, with whatever whitespace rustfmt puts between the macro and the name.
    let compact: String = sources.split_whitespace().collect();
    for metric in fleetlog::metrics::CATALOGUE {
        // `set_counts` sets a gauge per label value (src/metrics.rs).
        let recorded = ["counter!(", "gauge!(", "histogram!(", "set_counts("]
            .iter()
            .any(|call| compact.contains(&format!("{call}\"{}\"", metric.name)));
        assert!(
            recorded,
            "the catalogue names {}, which no counter!, gauge! or histogram! records",
            metric.name
        );
    }
}

#[test]
fn the_dashboard_queries_only_recorded_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/fleetlog.json")).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut ids = std::collections::BTreeSet::new();
    let mut queried = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_i64().expect("a panel id")),
            "{panel}"
        );
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            queried.extend(names);
        }
    }
    assert_recorded("the dashboard", &queried);
}

#[test]
fn the_alert_rules_name_only_recorded_metrics_and_promtool_accepts_them() {
    let named = metric_names(&read("deploy/prometheus/alerts.yml"));
    assert!(named.len() >= 8, "{named:?}");
    assert_recorded("alerts.yml", &named);
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["check", "config", "deploy/prometheus/prometheus.yml"],
    ] {
        let output = promtool(&args);
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_image_build_context_leaves_out_build_output_and_secrets() {
    let ignored = read(".dockerignore");
    for path in ["/target", "/.fleetlog", "/deploy/.env", ".git"] {
        assert!(ignored.lines().any(|line| line == path), "{path}");
    }
}

/// `deploy/compose.yaml` as the Compose specification's JSON schema
/// (`tests/schemas/compose-spec.json`, from github.com/compose-spec/compose-spec, Apache-2.0)
/// defines it: what `docker compose config` would check first, with no container engine.
#[test]
fn the_compose_file_follows_the_compose_specification() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // YAML merge keys (`<<: *secrets`) applied first, as Compose loads the file.
    let mut yaml: serde_norway::Value =
        serde_norway::from_str(&read("deploy/compose.yaml")).expect("YAML");
    yaml.apply_merge().expect("merge keys");
    let compose = serde_json::to_value(yaml).expect("JSON");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.set_default_draft(boon::Draft::V7);
    let schema = compiler
        .compile(
            root.join("tests/schemas/compose-spec.json")
                .to_str()
                .unwrap(),
            &mut schemas,
        )
        .expect("the Compose schema compiles");
    if let Err(error) = schemas.validate(&compose, schema) {
        panic!("deploy/compose.yaml: {error:#}");
    }

    // Each role a service of its own, health-checked, after the migrations; only the API and
    // the device listener published.
    let services = compose["services"].as_object().unwrap();
    let roles = [
        ("api", "api"),
        ("relay-1", "relay"),
        ("relay-2", "relay"),
        ("project", "project"),
        ("ingest-1", "ingest"),
        ("ingest-2", "ingest"),
        ("dispatch", "dispatch"),
        ("broker-sync", "broker-sync"),
    ];
    let scraped = read("deploy/prometheus/prometheus.yml");
    for (service, role) in roles {
        let port = if role == "api" { 8080 } else { 9464 };
        assert!(
            scraped.contains(&format!("\"{service}:{port}\"")),
            "prometheus.yml does not scrape {service}"
        );
        let definition = &services[service];
        assert_eq!(definition["command"][0], role, "{service}");
        assert!(definition["healthcheck"]["test"].is_array(), "{service}");
        assert_eq!(
            definition["depends_on"]["migrate"]["condition"], "service_completed_successfully",
            "{service}"
        );
    }
    assert_eq!(services["migrate"]["command"][0], "migrate");
    let published: Vec<&str> = services
        .iter()
        .filter(|(_, definition)| definition.get("ports").is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(published, ["api", "mosquitto"]);
    // The ingest instances keep sessions of their own, under ids no device can have.
    let ids: Vec<&str> = ["ingest-1", "ingest-2"]
        .iter()
        .map(|service| {
            services[*service]["environment"]["FLEETLOG_INGEST_CLIENT_ID"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
    assert!(ids.iter().all(|id| id.contains('.')), "{ids:?}");
}

/// The Kubernetes manifests validate, strictly, against the Kubernetes schemas
/// (`kubernetes-validate`; `deploy/local/test.sh` installs it), and hold what a deployment
/// needs: each role a workload with probes on its own endpoint, the scalable ones an autoscaler,
/// the ones that must stay up a disruption budget, secrets only by reference.
#[test]
fn the_kubernetes_manifests_validate_and_run_every_role() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(root.join("deploy/k8s"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    files.sort();
    let output = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("kubernetes-validate (pip; deploy/local/test.sh installs it)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let mut documents = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).expect("YAML");
            documents.push(value);
        }
    }
    let find = |kind: &str, name: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let generated = read("deploy/compose-secrets.sh");
    for (kind, role, port) in [
        ("Deployment", "api", 8080),
        ("Deployment", "relay", 9464),
        ("Deployment", "project", 9464),
        ("StatefulSet", "ingest", 9464),
        ("Deployment", "dispatch", 9464),
        ("Deployment", "broker-sync", 9464),
    ] {
        let workload = find(kind, &format!("fleetlog-{role}"));
        let container = &workload["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["args"][0], role);
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(container[probe]["httpGet"]["port"], port, "{role} {probe}");
        }
        for variable in container["env"].as_array().unwrap() {
            if let Some(reference) = variable["valueFrom"]["secretKeyRef"].as_object() {
                let key = reference["key"].as_str().unwrap();
                assert!(
                    reference["name"] == "fleetlog-db-app" || generated.contains(key),
                    "{role}: {key} is not made by compose-secrets.sh"
                );
            }
            assert!(
                variable.get("value").is_none()
                    || !variable["name"].as_str().unwrap().contains("PASSWORD"),
                "{role}: a password in the manifest"
            );
        }
    }
    assert_eq!(
        find("Deployment", "fleetlog-relay")["spec"]["replicas"],
        2,
        "an active relay and a standby"
    );
    for role in ["api", "project", "ingest"] {
        find("HorizontalPodAutoscaler", &format!("fleetlog-{role}"));
    }
    for role in ["api", "relay", "project", "ingest"] {
        find("PodDisruptionBudget", &format!("fleetlog-{role}"));
    }
    assert!(
        documents.iter().all(|d| d["kind"] != "Secret"),
        "secrets are made, not shipped"
    );
    find("Job", "fleetlog-migrate");
    find("ConfigMap", "fleetlog-settings");
}
