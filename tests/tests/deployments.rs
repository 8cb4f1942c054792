//! What ships under `deployments/` agrees with the agent: every configuration passes
//! `weightgrad config check`; every command line in the systemd unit, the Dockerfile, the
//! compose file and the Kubernetes manifests parses with the real CLI; ports, paths, users and
//! names agree across them and with the configurations; every YAML and JSON file parses; the
//! dashboard and the alerts use only catalogued metrics. The real tools (promtool, Prometheus,
//! kubectl's kustomize, kubernetes-validate, systemd-analyze) check the files too: those tests
//! skip when a tool is missing, unless `WEIGHTGRAD_REQUIRE_TOOLS=1` (set by `.ci/run`, which
//! installs them) makes a missing tool a failure.

use clap::Parser;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use weightgrad::cli::Cli;
use weightgrad::config::AgentConfig;
use weightgrad_tests::binary;
use weightgrad_tests::cluster::*;
use weightgrad_tests::weightgrad;
use yaml_rust2::{Yaml, YamlLoader};

/// Where every deployment puts things; the configurations' relative paths resolve against
/// the configuration's directory.
const CONFIG_FILE: &str = "/etc/weightgrad/agent.toml";
const SECRETS_DIR: &str = "/etc/weightgrad/secrets";
const STATE_DIR: &str = "/var/lib/weightgrad";

fn deployments() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deployments")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Files under `dir` (recursively) whose names end with one of `suffixes`, sorted.
fn files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                // Secrets an operator generated for an overlay are not shipped files.
                if name != "secrets" {
                    stack.push(path);
                }
            } else if suffixes.iter().any(|s| name.ends_with(s)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// A mapping with its `<<` merge keys applied (compose's `<<: *anchor`).
fn merged(y: &Yaml) -> Yaml {
    let Yaml::Hash(h) = y else { return y.clone() };
    let mut out = yaml_rust2::yaml::Hash::new();
    if let Some(Yaml::Hash(base)) = h.get(&Yaml::String("<<".into())) {
        for (k, v) in base {
            out.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in h {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), v.clone());
        }
    }
    Yaml::Hash(out)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| match s {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => panic!("not a string: {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Parses `args` (without the program name) with the agent's real command line.
fn parses(args: &[String], where_: &str) -> Cli {
    let argv = std::iter::once("weightgrad".to_string()).chain(args.iter().cloned());
    Cli::try_parse_from(argv).unwrap_or_else(|e| {
        panic!(
            "{where_}: `weightgrad {}` does not parse: {e}",
            args.join(" ")
        )
    })
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    &args[i + 1]
}

/// Every `weightgrad ...` command in a shell script, as arguments (shell words after the
/// program, up to the next operator; `$var` words become `x`).
fn invocations(script: &str) -> Vec<Vec<String>> {
    let words: Vec<String> = script
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '"' || c == '\'').to_string())
        .collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        // A command starts the script or follows an operator (or opens `$(...)`).
        let command_position = i == 0
            || w.starts_with("$(")
            || ["&&", "||", "|", ";", "do", "then", "{", "("].contains(&words[i - 1].as_str())
            || words[i - 1].ends_with(';');
        let program = w.trim_start_matches("$(");
        if command_position && (program == "weightgrad" || program.ends_with("/weightgrad")) {
            let mut args = Vec::new();
            for w in &words[i + 1..] {
                if ["&&", "||", "|", ";", ">", "}", ")"].contains(&w.as_str()) {
                    break;
                }
                let word = w
                    .trim_end_matches(';')
                    .trim_matches(|c| c == '"' || c == '\'');
                args.push(if word.starts_with('$') {
                    "x".to_string()
                } else {
                    word.to_string()
                });
                if w.ends_with(';') {
                    break;
                }
            }
            out.push(args);
        }
    }
    out
}

/// The shipped agent configurations, each loaded from a staging directory that has the
/// secrets the deployments mount next to it (a CA, the region's certificate and key, an admin
/// token), as `(shipped path, loaded config)`.
fn staged_configs() -> Vec<(PathBuf, AgentConfig, tempfile::TempDir)> {
    let shipped = files(&deployments(), &[".toml"]);
    assert!(
        shipped.len() >= 7,
        "expected every deployment's configs: {shipped:?}"
    );
    shipped
        .into_iter()
        .map(|path| {
            let text = read(&path);
            let region = AgentConfig::parse(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .region;
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("agent.toml"), &text).unwrap();
            let secrets = dir.path().join("secrets");
            certs(&secrets, &[region.as_str()]);
            std::fs::write(secrets.join("admin.token"), "a-token-of-twenty-four-c").unwrap();
            let cfg = AgentConfig::load(&dir.path().join("agent.toml")).unwrap();
            (path, cfg, dir)
        })
        .collect()
}

/// The path a deployment sees for a path the config resolved inside the staging `dir`.
fn deployed(path: &Path, dir: &Path) -> String {
    match path.strip_prefix(dir) {
        Ok(rel) => format!("/etc/weightgrad/{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

#[test]
fn every_shipped_config_passes_config_check_and_uses_the_shared_layout() {
    for (path, cfg, dir) in staged_configs() {
        let file = dir.path().join("agent.toml");
        let out = weightgrad(&["config", "check", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: config check failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // The layout every unit, image and manifest mounts.
        let region = &cfg.region;
        for (key, p, want) in [
            ("tls.ca", &cfg.tls.ca, format!("{SECRETS_DIR}/ca.pem")),
            (
                "tls.cert",
                &cfg.tls.cert,
                format!("{SECRETS_DIR}/{region}.pem"),
            ),
            (
                "tls.key",
                &cfg.tls.key,
                format!("{SECRETS_DIR}/{region}.key"),
            ),
        ] {
            assert_eq!(deployed(p, dir.path()), want, "{}: {key}", path.display());
        }
        let token = cfg.admin.token_file.as_deref().expect("a token file");
        assert_eq!(
            deployed(token, dir.path()),
            format!("{SECRETS_DIR}/admin.token"),
            "{}",
            path.display()
        );
        assert_eq!(
            cfg.checkpoint.dir,
            Path::new(STATE_DIR),
            "{}",
            path.display()
        );
        assert_eq!(cfg.wan.listen.port(), 4433, "{}", path.display());
        assert_eq!(cfg.admin.listen.port(), 9464, "{}", path.display());
    }
}

#[test]
fn a_config_with_a_mistake_fails_config_check() {
    // The check above can fail: the same staging with one bad key is refused by name.
    let (path, _, dir) = staged_configs().remove(0);
    let file = dir.path().join("agent.toml");
    let text = read(&path).replace("[policy]", "[policy]\nsoruce = \"weightgrad\"");
    std::fs::write(&file, text).unwrap();
    let out = weightgrad(&["config", "check", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soruce"));
}

#[test]
fn every_yaml_and_json_file_parses() {
    let yamls = files(&deployments(), &[".yml", ".yaml"]);
    assert!(yamls.len() >= 12, "{yamls:?}");
    for path in &yamls {
        assert!(!yaml(path).is_empty(), "{} is empty", path.display());
    }
    let jsons = files(&deployments(), &[".json"]);
    assert!(!jsons.is_empty());
    for path in &jsons {
        serde_json::from_str::<Value>(&read(path))
            .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    }
}

/// `Key=value` lines of a unit (or environment) file, in order.
fn unit(path: &Path) -> Vec<(String, String)> {
    read(path)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("bad unit line {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn the_systemd_unit_matches_the_cli_and_the_layout() {
    let dir = deployments().join("systemd");
    let service = unit(&dir.join("weightgrad.service"));
    let get = |k: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for key in ["ExecStartPre", "ExecStart"] {
        let line = get(key)[0];
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        assert_eq!(words[0], "/usr/local/bin/weightgrad", "{key}");
        parses(&words[1..], key);
    }
    let start: Vec<String> = get("ExecStart")[0]
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(flag(&start, "--config"), CONFIG_FILE);
    assert!(flag(&start, "--report").starts_with(STATE_DIR));
    assert!(get("ExecStartPre")[0].ends_with(&format!("config check {CONFIG_FILE}")));
    // systemd's directories are the layout's: /etc/<ConfigurationDirectory>, /var/lib/<StateDirectory>.
    assert_eq!(
        format!("/etc/{}", get("ConfigurationDirectory")[0]),
        "/etc/weightgrad"
    );
    assert_eq!(format!("/var/lib/{}", get("StateDirectory")[0]), STATE_DIR);
    assert_eq!(get("WorkingDirectory"), [STATE_DIR]);
    // Hardening and shutdown.
    let user = get("User")[0];
    assert!(user != "root" && !user.is_empty());
    assert!(read(&dir.join("weightgrad.sysusers")).contains(&format!("u {user} ")));
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(get(k), [v], "{k}");
    }
    let stop: u64 = get("TimeoutStopSec")[0].parse().unwrap();
    assert!(
        stop >= 120,
        "TimeoutStopSec {stop}: SIGTERM needs time to checkpoint"
    );
    assert!(
        get("MemoryDenyWriteExecute").is_empty(),
        "the policy sandbox compiles code"
    );
    // The environment file sets only variables the agent reads.
    for (k, _) in unit(&dir.join("weightgrad.env")) {
        assert_eq!(k, "WEIGHTGRAD_LOG");
    }
    // Its configuration keeps the admin API on loopback.
    let cfg = AgentConfig::parse(&read(&dir.join("agent.toml"))).unwrap();
    assert!(cfg.admin.listen.ip().is_loopback());
}

/// Dockerfile instructions, as `(INSTRUCTION, arguments)`, per stage.
fn stages(path: &Path) -> Vec<Vec<(String, String)>> {
    let text = read(path).replace("\\\n", " ");
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (ins, rest) = line.split_once(' ').unwrap_or((line, ""));
        if ins == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push((ins.to_string(), rest.trim().to_string()));
        }
    }
    stages
}

/// The final stage's instructions: what the image runs.
fn final_stage(path: &Path) -> Vec<(String, String)> {
    stages(path).pop().expect("a FROM")
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: not exec form: {e}"))
}

#[test]
fn the_dockerfile_matches_the_cli_and_the_layout() {
    let path = deployments().join("container/Dockerfile");
    let stage = final_stage(&path);
    let get = |k: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == k)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let entry = exec_form(get("ENTRYPOINT")[0]);
    assert_eq!(entry, ["weightgrad"]);
    let cmd = exec_form(get("CMD")[0]);
    parses(&cmd, "CMD");
    assert_eq!(flag(&cmd, "--config"), CONFIG_FILE);
    assert!(flag(&cmd, "--report").starts_with(STATE_DIR));
    let exposed: BTreeSet<&str> = get("EXPOSE")[0].split_whitespace().collect();
    assert_eq!(exposed, BTreeSet::from(["4433/udp", "9464/tcp"]));
    assert_eq!(get("VOLUME"), [format!("[\"{STATE_DIR}\"]").as_str()]);
    assert_eq!(
        get("USER"),
        ["10001:10001"],
        "non-root, the uid the manifests use"
    );
    assert_eq!(get("STOPSIGNAL"), ["SIGTERM"]);
    let setup = get("RUN").join(" ");
    // The state directory belongs to the image's user, private; the others exist.
    assert!(
        setup.contains(&format!(
            "install -d -o weightgrad -g weightgrad -m 0700 {STATE_DIR}"
        )),
        "{setup}"
    );
    let words: BTreeSet<&str> = setup.split_whitespace().collect();
    for dir in ["/etc/weightgrad", SECRETS_DIR] {
        assert!(words.contains(dir), "the image creates {dir}");
    }
    // The build stage's commands (policy list and export) parse too.
    let scripts: Vec<String> = stages(&path)
        .concat()
        .into_iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, script)| script)
        .collect();
    let calls = invocations(&scripts.join(" ; "));
    assert!(calls.len() >= 2, "{calls:?}");
    for args in &calls {
        parses(args, "Dockerfile RUN");
    }
    let ignore = read(&deployments().join("container/Dockerfile.dockerignore"));
    assert!(ignore.lines().any(|l| l == "target/"));
}

fn compose() -> BTreeMap<String, Yaml> {
    let doc = yaml(&deployments().join("compose/compose.yaml")).remove(0);
    doc["services"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), merged(v)))
        .collect()
}

/// `host:port` → (host, port).
fn host_port(s: &str) -> (&str, u16) {
    let (h, p) = s
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{s}: not host:port"));
    (h, p.parse().unwrap_or_else(|_| panic!("{s}: bad port")))
}

#[test]
fn compose_matches_the_configs_the_cli_and_the_monitoring() {
    let services = compose();
    let dir = deployments().join("compose");
    let configs: BTreeMap<String, AgentConfig> = files(&dir.join("config"), &[".toml"])
        .iter()
        .map(|p| {
            let cfg = AgentConfig::parse(&read(p)).unwrap();
            (cfg.region.clone(), cfg)
        })
        .collect();
    assert_eq!(configs.len(), 3);
    // One agent service per region, named after it, on its own network.
    for (region, cfg) in &configs {
        let s = &services[region];
        let cmd = strings(&s["command"]);
        parses(&cmd, region);
        assert_eq!(flag(&cmd, "--config"), CONFIG_FILE);
        let volumes = strings(&s["volumes"]);
        assert!(
            volumes.contains(&format!("./config/{region}.toml:{CONFIG_FILE}:ro")),
            "{region}: {volumes:?}"
        );
        assert!(
            volumes
                .iter()
                .any(|v| v.ends_with(&format!(":{SECRETS_DIR}:ro")))
        );
        assert!(
            volumes
                .iter()
                .any(|v| v.ends_with(&format!(":{}", cfg.checkpoint.dir.display())))
        );
        let ports = strings(&s["ports"]);
        assert_eq!(ports.len(), 1);
        assert_eq!(
            host_port(&ports[0]).1,
            cfg.admin.listen.port(),
            "{region} admin"
        );
        let networks = strings(&s["networks"]);
        assert!(networks.contains(&format!("region-{region}")));
        // Each peer is reached through a WAN emulator that relays to that peer's listener.
        for peer in &cfg.peers {
            let (relay, port) = host_port(&peer.address);
            let r = services.get(relay).unwrap_or_else(|| {
                panic!("{region}: peer address {} names no service", peer.address)
            });
            let args = strings(&r["command"]);
            parses(&args, relay);
            assert_eq!(args[0], "wan-emu");
            assert_eq!(
                flag(&args, "--listen")
                    .parse::<SocketAddr>()
                    .unwrap()
                    .port(),
                port
            );
            let (upstream, upstream_port) = host_port(flag(&args, "--upstream"));
            assert_eq!(
                upstream, peer.name,
                "{relay} relays to the peer it stands for"
            );
            assert_eq!(upstream_port, configs[&peer.name].wan.listen.port());
            let nets = strings(&r["networks"]);
            assert!(
                nets.contains(&format!("region-{region}"))
                    && nets.contains(&format!("region-{}", peer.name)),
                "{relay}: {nets:?}"
            );
        }
    }
    // The certificate service makes every region's files, owned by the image's user.
    let certs = &services["certs"];
    let script = strings(&certs["command"]).join(" ");
    let calls = invocations(&script);
    assert_eq!(calls.len(), 1, "{script}");
    parses(&calls[0], "certs");
    let regions: BTreeSet<&str> = flag(&calls[0], "--regions").split(',').collect();
    assert_eq!(regions, configs.keys().map(String::as_str).collect());
    assert!(script.contains("chown -R 10001:10001"), "{script}");
    assert!(script.contains("admin.token"));
    // Prometheus scrapes every agent's admin port with the shipped files.
    let prom = yaml(&deployments().join("prometheus/prometheus.yml")).remove(0);
    let targets: BTreeSet<String> =
        strings(&prom["scrape_configs"][0]["static_configs"][0]["targets"])
            .into_iter()
            .collect();
    let want: BTreeSet<String> = configs
        .iter()
        .map(|(r, c)| format!("{r}:{}", c.admin.listen.port()))
        .collect();
    assert_eq!(targets, want);
    assert_eq!(
        prom["scrape_configs"][0]["metrics_path"].as_str(),
        Some("/metrics")
    );
    let rule_files = strings(&prom["rule_files"]);
    let mounts = strings(&services["prometheus"]["volumes"]);
    for rule in &rule_files {
        assert!(
            mounts.iter().any(|m| m.contains(&format!(":{rule}"))),
            "{rule} is mounted"
        );
    }
    for service in ["prometheus", "grafana"] {
        for m in strings(&services[service]["volumes"]) {
            let host = m.split(':').next().unwrap();
            assert!(
                dir.join(host).exists(),
                "{service} mounts {host}, which does not exist"
            );
        }
    }
}

/// Renders nothing: reads the base manifests as YAML documents by kind.
fn base_manifests() -> BTreeMap<String, Vec<Yaml>> {
    let mut by_kind: BTreeMap<String, Vec<Yaml>> = BTreeMap::new();
    for path in files(&deployments().join("kubernetes/base"), &[".yaml"]) {
        for doc in yaml(&path) {
            if let Some(kind) = doc["kind"].as_str() {
                by_kind
                    .entry(kind.to_string())
                    .or_default()
                    .push(doc.clone());
            }
        }
    }
    by_kind
}

#[test]
fn kubernetes_matches_the_configs_the_cli_and_the_image() {
    let k8s = deployments().join("kubernetes");
    let base = base_manifests();
    let sts = &base["StatefulSet"][0];
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = strings(&container["args"]);
    parses(&args, "StatefulSet args");
    assert_eq!(flag(&args, "--config"), CONFIG_FILE);
    // Ports by name.
    let ports: BTreeMap<String, (u16, String)> = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                (
                    p["containerPort"].as_i64().unwrap() as u16,
                    p["protocol"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(ports["wan"].1, "UDP");
    assert_eq!(ports["admin"].1, "TCP");
    // Mounts: the configuration file, the secrets, the state volume.
    let mounts: BTreeMap<String, (String, Option<String>)> = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_string(),
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["subPath"].as_str().map(String::from),
                ),
            )
        })
        .collect();
    let volumes: BTreeMap<String, Yaml> = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect();
    let (config_volume, sub) = &mounts[CONFIG_FILE];
    assert_eq!(sub.as_deref(), Some("agent.toml"));
    let config_map = volumes[config_volume]["configMap"]["name"]
        .as_str()
        .unwrap();
    let secret = volumes[&mounts[SECRETS_DIR].0]["secret"]["secretName"]
        .as_str()
        .unwrap();
    let state = &mounts[STATE_DIR].0;
    let claims: Vec<&str> = sts["spec"]["volumeClaimTemplates"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        claims,
        [state.as_str()],
        "checkpoints on a persistent volume"
    );
    // The image's user, non-root; time to checkpoint on SIGTERM.
    assert_eq!(pod["securityContext"]["runAsUser"].as_i64(), Some(10001));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 120);
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"].as_str(),
            Some("admin"),
            "{probe}"
        );
    }
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    // Services target the container's named ports with their protocols, and keep not-ready
    // (still starting) pods reachable by peers.
    for svc in &base["Service"] {
        assert_eq!(
            svc["spec"]["publishNotReadyAddresses"].as_bool(),
            Some(true)
        );
        for p in svc["spec"]["ports"].as_vec().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert_eq!(p["protocol"].as_str().unwrap(), ports[target].1, "{target}");
            assert_eq!(
                p["port"].as_i64().unwrap() as u16,
                ports[target].0,
                "{target}"
            );
        }
    }
    assert!(base["Service"].iter().any(|s| {
        s["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|p| p["targetPort"].as_str() == Some("admin"))
    }));
    // The PodMonitor scrapes the admin port of exactly these pods.
    let monitor = &base["PodMonitor"][0];
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("admin"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    // Each overlay: its generators feed the names the StatefulSet mounts, its secret holds
    // exactly the files its configuration names, and its configuration uses the ports above.
    let overlays = std::fs::read_dir(k8s.join("overlays")).unwrap();
    let mut seen = 0;
    for overlay in overlays {
        let dir = overlay.unwrap().path();
        let kust = yaml(&dir.join("kustomization.yaml")).remove(0);
        let cfg = AgentConfig::load(&dir.join("agent.toml")).unwrap();
        let region = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(cfg.region, region);
        assert_eq!(
            kust["configMapGenerator"][0]["name"].as_str(),
            Some(config_map)
        );
        assert_eq!(
            strings(&kust["configMapGenerator"][0]["files"]),
            ["agent.toml"]
        );
        assert_eq!(kust["secretGenerator"][0]["name"].as_str(), Some(secret));
        let secret_files: BTreeSet<PathBuf> = strings(&kust["secretGenerator"][0]["files"])
            .iter()
            .map(|f| dir.join(f))
            .collect();
        let named: BTreeSet<PathBuf> = [
            cfg.tls.ca.clone(),
            cfg.tls.cert.clone(),
            cfg.tls.key.clone(),
            cfg.admin.token_file.clone().unwrap(),
        ]
        .into();
        assert_eq!(secret_files, named, "{region}");
        assert_eq!(cfg.wan.listen.port(), ports["wan"].0);
        assert_eq!(cfg.admin.listen.port(), ports["admin"].0);
        assert!(
            cfg.admin.listen.ip().is_unspecified(),
            "probes reach the admin port"
        );
        seen += 1;
    }
    assert_eq!(seen, 3);
    // The Dockerfile's user is the one the pod runs as.
    let docker = final_stage(&deployments().join("container/Dockerfile"));
    assert!(docker.contains(&("USER".into(), "10001:10001".into())));
}

/// Metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("weightgrad_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Asserts `name` is a catalogued metric (a histogram's `_bucket`, `_sum` and `_count` too).
fn assert_catalogued(name: &str, where_: &str) {
    use weightgrad::telemetry::{CATALOGUE, MetricKind};
    let found = CATALOGUE.iter().any(|m| {
        m.name == name
            || (m.kind == MetricKind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{}{s}", m.name)))
    });
    assert!(found, "{where_}: {name} is not in the metrics catalogue");
}

/// Every `"expr"` and templating `"query"` string in a JSON document.
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_and_the_alerts_use_catalogued_metrics() {
    let dash: Value =
        serde_json::from_str(&read(&deployments().join("grafana/weightgrad.json"))).unwrap();
    let mut exprs = Vec::new();
    queries(&dash, &mut exprs);
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            assert_catalogued(&name, "grafana/weightgrad.json");
            used.insert(name);
        }
    }
    // The panels the issue of record asks for, by the metric each needs.
    for needed in [
        "weightgrad_wan_bytes_sent_total",
        "weightgrad_significance_ratio",
        "weightgrad_bits_chosen_sum",
        "weightgrad_test_accuracy",
        "weightgrad_loss",
        "weightgrad_link_rtt_seconds",
        "weightgrad_link_goodput_bits_per_second",
        "weightgrad_policy_failures_total",
        "weightgrad_policy_swaps_total",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    let alerts = yaml(&deployments().join("prometheus/alerts.yml")).remove(0);
    let mut names = BTreeSet::new();
    for rule in alerts["groups"][0]["rules"].as_vec().unwrap() {
        for name in metric_names(rule["expr"].as_str().unwrap()) {
            assert_catalogued(&name, "prometheus/alerts.yml");
        }
        names.insert(rule["alert"].as_str().unwrap().to_string());
    }
    for alert in [
        "WeightGradPeerDown",
        "WeightGradPolicyFailures",
        "WeightGradPolicyRolledBack",
        "WeightGradStalenessOverBound",
        "WeightGradNoProgress",
    ] {
        assert!(names.contains(alert), "{alert}");
    }
    // Each alert has a promtool unit test.
    let tests = read(&deployments().join("prometheus/alerts.test.yml"));
    for alert in &names {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} is tested"
        );
    }
}

/// The path of `tool`, or `None` (the test then skips) unless `WEIGHTGRAD_REQUIRE_TOOLS=1`.
fn tool(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    weightgrad_tests::required(
        found,
        &format!("{tool} is not installed"),
        ".ci/run installs it",
    )
}

/// What a tool printed: its standard output, and both streams together.
struct Printed {
    stdout: String,
    all: String,
}

/// Runs a tool and fails the test with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> Printed {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{all}");
    Printed { stdout, all }
}

#[test]
fn promtool_accepts_the_scrape_config_the_rules_and_their_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let prom = deployments().join("prometheus");
    // The scrape config names the rules where the compose file mounts them; check it with
    // the rules beside it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(prom.join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
    let config =
        read(&prom.join("prometheus.yml")).replace("/etc/prometheus/alerts.yml", "alerts.yml");
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    run_ok(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")),
    );
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(prom.join("alerts.yml")),
    );
    run_ok(
        Command::new(&promtool)
            .current_dir(&prom)
            .args(["test", "rules", "alerts.test.yml"]),
    );
}

#[test]
fn every_kustomize_overlay_renders_and_validates() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let Some(validate) = tool("kubernetes-validate") else {
        return;
    };
    // A copy of the tree with the secrets an operator would generate.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("kubernetes");
    copy_tree(&deployments().join("kubernetes"), &root);
    let overlays: Vec<PathBuf> = std::fs::read_dir(root.join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(overlays.len(), 3);
    for overlay in overlays {
        let region = overlay.file_name().unwrap().to_str().unwrap().to_string();
        let secrets = overlay.join("secrets");
        certs(&secrets, &[region.as_str()]);
        std::fs::write(secrets.join("admin.token"), "a-token-of-twenty-four-c").unwrap();
        // Only standard output is the rendering (kustomize warns on standard error).
        let rendered = run_ok(Command::new(&kubectl).arg("kustomize").arg(&overlay)).stdout;
        for kind in [
            "StatefulSet",
            "Service",
            "ConfigMap",
            "Secret",
            "PodMonitor",
        ] {
            assert!(
                rendered.contains(&format!("kind: {kind}")),
                "{region}: {kind}"
            );
        }
        assert!(rendered.contains(&format!("weightgrad.io/region: {region}")));
        check_rendered(&region, &rendered);
        let file = dir.path().join(format!("{region}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let report = run_ok(Command::new(&validate).arg("--strict").arg(&file)).all;
        // Everything but the PodMonitor (a CRD without a bundled schema) is checked.
        let passed = report.matches(" passed for resource ").count();
        assert_eq!(passed, 6, "{region}:\n{report}");
        assert!(!report.contains("ERROR"), "{region}:\n{report}");
    }
}

/// What kustomize must have done: selectors that select the pod, generated names
/// rewritten where the StatefulSet mounts them, everything in the namespace.
fn check_rendered(region: &str, rendered: &str) {
    let docs = YamlLoader::load_from_str(rendered).unwrap();
    let of = |kind: &str| -> Vec<&Yaml> {
        let found: Vec<&Yaml> = docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect();
        assert!(!found.is_empty(), "{region}: no {kind} rendered");
        found
    };
    let labels = |y: &Yaml| -> BTreeMap<String, String> {
        y.as_hash()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        let text = |y: &Yaml| {
                            y.as_str()
                                .unwrap_or_else(|| panic!("{region}: label {y:?} is not a string"))
                                .to_string()
                        };
                        (text(k), text(v))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let selects = |selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>| {
        !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
    };
    let sts = of("StatefulSet")[0];
    let pod = labels(&sts["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(
        pod.get("weightgrad.io/region").map(String::as_str),
        Some(region)
    );
    // Selectors (immutable on a running StatefulSet) stay as in base: no region label.
    let mut selectors = vec![labels(&sts["spec"]["selector"]["matchLabels"])];
    for svc in of("Service") {
        selectors.push(labels(&svc["spec"]["selector"]));
    }
    selectors.push(labels(
        &of("PodMonitor")[0]["spec"]["selector"]["matchLabels"],
    ));
    for selector in &selectors {
        assert!(
            selects(selector, &pod),
            "{region}: {selector:?} misses the pod"
        );
        assert!(
            !selector.contains_key("weightgrad.io/region"),
            "{region}: {selector:?}"
        );
    }
    // Nor do the volume claim templates (immutable too).
    for claim in sts["spec"]["volumeClaimTemplates"].as_vec().unwrap() {
        assert!(
            !labels(&claim["metadata"]["labels"]).contains_key("weightgrad.io/region"),
            "{region}: {claim:?}"
        );
    }
    let volumes = sts["spec"]["template"]["spec"]["volumes"].as_vec().unwrap();
    let config_map = of("ConfigMap")[0]["metadata"]["name"].as_str().unwrap();
    let secret = of("Secret")[0]["metadata"]["name"].as_str().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"].as_str() == Some(config_map))
    );
    assert!(
        volumes
            .iter()
            .any(|v| v["secret"]["secretName"].as_str() == Some(secret))
    );
    for d in &docs {
        assert_eq!(
            d["metadata"]["namespace"].as_str(),
            Some("weightgrad"),
            "{d:?}"
        );
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            if path.file_name().unwrap() != "secrets" {
                copy_tree(&path, &target);
            }
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    // `verify` insists the command exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let unit = read(&deployments().join("systemd/weightgrad.service")).replace(
        "/usr/local/bin/weightgrad",
        binary().to_str().expect("a UTF-8 path"),
    );
    let path = dir.path().join("weightgrad.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values and only warns: any output is a failure.
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn a_real_prometheus_scrapes_running_agents() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let admin: Vec<SocketAddr> = REGIONS.iter().map(|_| free_port()).collect();
    let mut agents = loopback_regions(
        dir.path(),
        "",
        // Longer than the test: the agents are still serving when Prometheus scrapes.
        &|i| format!("epochs = 200\n[admin]\nlisten = \"{}\"", admin[i]),
        "",
    );
    agents.iter_mut().for_each(Agent::start);
    // The shipped configuration and alert rules, pointed at these agents and scraping every
    // second; everything else as shipped.
    let mut config = yaml(&deployments().join("prometheus/prometheus.yml")).remove(0);
    let rules = dir.path().join("alerts.yml");
    std::fs::copy(deployments().join("prometheus/alerts.yml"), &rules).unwrap();
    set(
        &mut config,
        &["global", "scrape_interval"],
        Yaml::String("1s".into()),
    );
    set(
        &mut config,
        &["global", "evaluation_interval"],
        Yaml::String("1s".into()),
    );
    set(
        &mut config,
        &["rule_files"],
        Yaml::Array(vec![Yaml::String(rules.display().to_string())]),
    );
    let Some(Yaml::Array(jobs)) =
        as_hash(&mut config).get_mut(&Yaml::String("scrape_configs".into()))
    else {
        panic!("prometheus.yml: scrape_configs is not a list");
    };
    set(
        &mut jobs[0],
        &["static_configs"],
        Yaml::Array(vec![Yaml::Hash(
            [(
                Yaml::String("targets".into()),
                Yaml::Array(admin.iter().map(|a| Yaml::String(a.to_string())).collect()),
            )]
            .into_iter()
            .collect(),
        )]),
    );
    let mut text = String::new();
    yaml_rust2::YamlEmitter::new(&mut text)
        .dump(&config)
        .unwrap();
    std::fs::write(dir.path().join("prometheus.yml"), text).unwrap();
    let web = free_port();
    let log = dir.path().join("prometheus.log");
    let mut server = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let query = format!("http://{web}/api/v1/query?query=weightgrad_wan_bytes_sent_total");
    let mut regions = BTreeSet::new();
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline && regions.len() < REGIONS.len() {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = server.try_wait().unwrap() {
            panic!(
                "Prometheus exited ({status}):\n{}",
                tail(&std::fs::read_to_string(&log).unwrap_or_default())
            );
        }
        let Ok(mut reply) = ureq::get(&query).call() else {
            continue;
        };
        let Ok(body) = reply.body_mut().read_json::<Value>() else {
            continue;
        };
        regions = body["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0))
            .map(|s| s["metric"]["region"].as_str().unwrap_or("").to_string())
            .collect();
        last = body;
    }
    // The shipped alert rules load and evaluate without error.
    let rules_of = |v: &Value| -> Vec<Value> {
        v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let shipped_rules = yaml(&deployments().join("prometheus/alerts.yml"))[0]["groups"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_vec().map_or(0, Vec::len))
        .sum::<usize>();
    let mut rules = Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        rules = ureq::get(format!("http://{web}/api/v1/rules"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok())
            .unwrap_or(Value::Null);
        let loaded = rules_of(&rules);
        if loaded.len() == shipped_rules && loaded.iter().all(|r| r["health"] == "ok") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = server.kill();
    let _ = server.wait();
    for a in &mut agents {
        a.kill();
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let want: BTreeSet<String> = REGIONS.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        regions,
        want,
        "WAN-bytes series from every agent; last answer: {last}\nPrometheus:\n{}",
        tail(&log)
    );
    let loaded = rules_of(&rules);
    let log = tail(&log);
    assert_eq!(loaded.len(), shipped_rules, "{rules}\n{log}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "{r}\n{log}");
    }
}

fn as_hash(y: &mut Yaml) -> &mut yaml_rust2::yaml::Hash {
    match y {
        Yaml::Hash(h) => h,
        other => panic!("not a mapping: {other:?}"),
    }
}

/// Sets `path` (mapping keys) in `y` to `value`.
fn set(y: &mut Yaml, path: &[&str], value: Yaml) {
    let (last, parents) = path.split_last().unwrap();
    let mut at = y;
    for key in parents {
        at = as_hash(at)
            .get_mut(&Yaml::String((*key).into()))
            .unwrap_or_else(|| panic!("{key} missing"));
    }
    as_hash(at).insert(Yaml::String((*last).into()), value);
}
