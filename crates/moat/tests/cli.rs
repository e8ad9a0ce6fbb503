//! `moat review` and `moat config` as a user runs them: the real binary, real files, exit codes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn moat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moat"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn run(args: &[&str]) -> Output {
    moat().args(args).output().expect("moat runs")
}

fn run_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = moat()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: ok, namespace: shop}\nspec: {runtimeClassName: gvisor, containers: [{name: c, image: 'nginx:1.27'}]}\n";

#[test]
fn demo_refuses_rewrites_and_isolates_with_no_cluster() {
    let o = run(&["review", repo("examples/demo.yaml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("DENY  Pod shop/untagged"), "{text}");
    assert!(text.contains("image 'nginx' has no tag"), "{text}");
    assert!(text.contains("ALLOW Pod shop/wants-runc"), "{text}");
    assert!(
        text.contains("set spec.runtimeClassName to 'gvisor' (runtime 'runc' is reserved)"),
        "{text}"
    );
    assert!(text.contains("ALLOW Pod shop/isolated"), "{text}");
    assert!(
        text.contains("keep pods of every class but 'untrusted' off this pod's node"),
        "{text}"
    );
    assert!(text.contains("DENY  Deployment shop/api"), "{text}");
    assert!(
        text.contains("5 objects: 3 allowed, 2 denied, 0 errors"),
        "{text}"
    );
}

#[test]
fn json_output_has_one_element_per_document() {
    let o = run(&[
        "review",
        "--output",
        "json",
        repo("examples/demo.yaml").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 5);
    for item in items {
        for key in [
            "kind",
            "namespace",
            "name",
            "allowed",
            "message",
            "warnings",
            "patch",
            "object",
        ] {
            assert!(item.get(key).is_some(), "missing {key} in {item}");
        }
    }
    let untagged = &items[1];
    assert_eq!(untagged["allowed"], false);
    assert!(untagged["message"].as_str().unwrap().contains("has no tag"));
    assert_eq!(untagged["patch"], serde_json::json!([]));
    let runc = &items[2];
    assert_eq!(runc["allowed"], true);
    assert_eq!(runc["message"], "");
    assert_eq!(
        runc["patch"],
        serde_json::json!([{"op": "replace", "path": "/spec/runtimeClassName", "value": "gvisor"}])
    );
    assert_eq!(runc["object"]["spec"]["runtimeClassName"], "gvisor");
    // The patch applied to the input is the printed object.
    let isolated = &items[3];
    assert!(
        isolated["object"]["spec"]["tolerations"]
            .as_array()
            .unwrap()
            .len()
            == 2
    );
}

#[test]
fn yaml_output_parses() {
    let o = run(&[
        "review",
        "-o",
        "yaml",
        repo("examples/demo.yaml").to_str().unwrap(),
    ]);
    let v: Vec<Value> = serde_yaml_ng::from_slice(&o.stdout).unwrap();
    assert_eq!(v.len(), 5);
}

#[test]
fn all_allowed_exits_zero_and_reads_stdin() {
    let o = run_stdin(&["review", "-"], GOOD_POD);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("ALLOW Pod shop/ok"));
}

#[test]
fn a_broken_document_is_reported_and_the_others_reviewed() {
    let text = format!("{GOOD_POD}---\nkind: [unclosed\n---\n- a list\n---\n{GOOD_POD}");
    let path = temp_file("broken.yaml", &text);
    let o = run(&["review", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("broken.yaml: document 2: does not parse as YAML or JSON"),
        "{err}"
    );
    assert!(
        err.contains("broken.yaml: document 3: is not an object"),
        "{err}"
    );
    assert_eq!(
        stdout(&o).matches("ALLOW Pod shop/ok").count(),
        2,
        "{}",
        stdout(&o)
    );
}

#[test]
fn malformed_pod_spec_is_a_parse_error_naming_the_document() {
    let path = temp_file(
        "malformed.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {template: {spec: {containers: 3}}}\n",
    );
    let o = run(&["review", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("malformed.yaml: document 1: Deployment default/d: Deployment 'spec.template.spec' does not parse"), "{}", stderr(&o));
}

#[test]
fn json_input_and_lists_are_read() {
    let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}, "spec": {"runtimeClassName": "kata", "containers": [{"name": "c", "image": "busybox:1"}]}}
    ]}"#;
    let path = temp_file("list.json", list);
    let o = run(&["review", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(
        text.contains("DENY  Pod default/a") && text.contains("ALLOW Pod default/b"),
        "{text}"
    );
}

#[test]
fn configuration_errors_exit_two_with_the_key_path() {
    let cfg = temp_file(
        "bad-config.yaml",
        "isolation:\n  mode: class\n  clases: []\n",
    );
    let o = run(&[
        "review",
        "--config",
        cfg.to_str().unwrap(),
        repo("examples/demo.yaml").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("at 'isolation.clases': unknown field `clases`"),
        "{}",
        stderr(&o)
    );
    let cfg = temp_file(
        "reserved-fallback.yaml",
        "runtimeClass: {reservedRuntimes: [runc], fallbackRuntime: runc}\n",
    );
    let o = run(&["config", "check", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("fallback runtime 'runc' is itself in reservedRuntimes"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn usage_errors_exit_two() {
    assert_eq!(run(&["review"]).status.code(), Some(2));
    assert_eq!(
        run(&["review", "--output", "xml", "x"]).status.code(),
        Some(2)
    );
    let o = run(&["review", "/nonexistent/moat.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/nonexistent/moat.yaml"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        run(&["review", "--namespace-label", "nocolon", "-"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn default_config_prints_and_round_trips() {
    let o = run(&["config", "default"]);
    assert_eq!(o.status.code(), Some(0));
    let printed = temp_file("default.yaml", &stdout(&o));
    let o = run(&["config", "check", printed.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn ipp_compatible_example_reproduces_class_mode_with_holes_closed() {
    let cfg = repo("examples/ipp-compatible.yaml");
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: team-a, labels: {ipp-class: blue}}\nspec: {containers: [{name: c, image: 'busybox:1.36'}]}\n\
                ---\napiVersion: v1\nkind: Pod\nmetadata: {name: sneaky, namespace: team-b}\nspec: {tolerations: [{key: ipp, operator: Exists}], containers: [{name: c, image: 'busybox:1.36'}]}\n\
                ---\napiVersion: v1\nkind: Pod\nmetadata: {name: joiner, namespace: team-b, labels: {ipp-class: blue}}\nspec: {containers: [{name: c, image: 'busybox:1.36'}]}\n\
                ---\napiVersion: v1\nkind: Pod\nmetadata: {name: stranger, namespace: team-c}\nspec: {containers: [{name: c, image: 'busybox:1.36'}]}\n";
    // The operator binds team-a to class blue; team-b is a known namespace with no class.
    let o = run_stdin(
        &[
            "review",
            "-o",
            "json",
            "--config",
            cfg.to_str().unwrap(),
            "--namespace-label",
            "team-a:ipp-class=blue",
            "--namespace-label",
            "team-b:tier=tenant",
            "-",
        ],
        pods,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let spec = &v[0]["object"]["spec"];
    assert_eq!(
        spec["tolerations"][0],
        serde_json::json!({"key": "ipp", "operator": "Equal", "value": "true", "effect": "NoSchedule"})
    );
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0],
        serde_json::json!({"key": "ipp", "operator": "In", "values": ["true"]})
    );
    let term =
        &spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(term["namespaceSelector"], serde_json::json!({}));
    assert_eq!(
        term["labelSelector"]["matchExpressions"][1],
        serde_json::json!({"key": "ipp-class", "operator": "NotIn", "values": ["blue"]})
    );
    assert_eq!(v[1]["allowed"], false);
    assert!(
        v[1]["message"]
            .as_str()
            .unwrap()
            .contains("tolerates moat's isolation taint 'ipp'")
    );
    // A pod of another namespace cannot join class blue by labelling itself.
    assert_eq!(v[2]["allowed"], false);
    assert!(
        v[2]["message"]
            .as_str()
            .unwrap()
            .contains("namespace 'team-b' may not use isolation class 'blue'"),
        "{}",
        v[2]["message"]
    );
    // A namespace moat knows nothing about is denied until it does.
    assert!(
        v[3]["message"]
            .as_str()
            .unwrap()
            .contains("namespace 'team-c' is not known to moat yet"),
        "{}",
        v[3]["message"]
    );
}

#[test]
fn namespace_labels_come_from_documents_and_flags() {
    let cfg = temp_file(
        "ns-binding.yaml",
        "isolation: {mode: class, classes: [{name: gold, namespaceSelector: {matchLabels: {tier: gold}}}]}\n",
    );
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: bank, labels: {moat.dev/class: gold}}\nspec: {containers: [{name: c, image: 'x:1'}]}\n";
    let o = run_stdin(&["review", "--config", cfg.to_str().unwrap(), "-"], pod);
    assert_eq!(
        o.status.code(),
        Some(1),
        "unlabelled namespace may not use the class"
    );
    let o = run_stdin(
        &[
            "review",
            "--config",
            cfg.to_str().unwrap(),
            "--namespace-label",
            "bank:tier=gold",
            "-",
        ],
        pod,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let with_ns = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: bank, labels: {{tier: gold}}}}\n---\n{pod}"
    );
    let o = run_stdin(
        &["review", "--config", cfg.to_str().unwrap(), "-"],
        &with_ns,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn empty_input_is_an_empty_array() {
    let o = run_stdin(&["review", "-o", "json", "-"], "# nothing here\n---\n");
    assert_eq!(o.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));
    let o = run_stdin(&["review", "-o", "yaml", "-"], "");
    let v: Vec<Value> = serde_yaml_ng::from_slice(&o.stdout).unwrap();
    assert!(v.is_empty());
}

#[test]
fn identity_agent_refuses_bad_flags_with_usage_errors() {
    for (args, want) in [
        (&["--plugin-index", "7"][..], "two digits"),
        (
            &["--spire-admin-socket", "admin.sock"][..],
            "--spire-admin-socket 'admin.sock' must be an absolute path",
        ),
        (
            &["--default-cert-dir", "certs"][..],
            "--default-cert-dir 'certs' must be an absolute path",
        ),
    ] {
        let out = moat()
            .arg("identity-agent")
            .args(args)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn identity_agent_without_a_runtime_exits_3_naming_the_socket() {
    let dir = std::env::temp_dir().join(format!("moat-cli-agent-{}", std::process::id()));
    let out = moat()
        .arg("identity-agent")
        .arg("--nri-socket")
        .arg(dir.join("missing.sock"))
        .arg("--artifact-dir")
        .arg(dir.join("artifacts"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("connecting to the NRI socket"), "{err}");
    assert!(err.contains("missing.sock"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deeply_nested_documents_are_refused_at_once_and_the_others_reviewed() {
    let deep = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: deep}}\nspec: {{containers: {}{}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: fine, namespace: t}}\nspec: {{runtimeClassName: gvisor, containers: [{{name: c, image: 'x:1'}}]}}\n",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let o = run_stdin(&["review", "-o", "json", "-"], &deep);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("levels deep"), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "fine");
}

#[test]
fn serve_with_a_port_in_use_is_a_runtime_failure_logged_without_colour() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let ca = temp_file("serve-ca.pem", "");
    let o = run(&[
        "serve",
        "--self-signed",
        "--ca-out",
        ca.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--metrics-addr",
        &addr,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(&format!("binding {addr}")), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no ANSI codes into a pipe: {err:?}"
    );
    assert!(!err.contains("Some("), "{err}");
}

/// An API server that answers every request with `body` (a RuntimeClass list), over plain HTTP,
/// and a kubeconfig naming it; `None` for the address of a server that is not there.
fn fake_cluster(body: Option<&'static str>) -> PathBuf {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    match body {
        Some(body) => {
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { return };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match std::io::Read::read(&mut stream, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
        None => drop(listener),
    }
    temp_file(
        &format!("kubeconfig-{}", addr.port()),
        &format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://{addr}'}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
}

#[test]
fn config_check_with_cluster_warns_about_a_missing_runtime_class() {
    let cfg = temp_file(
        "two-runtimes.yaml",
        "runtimeClass: {fallbackRuntime: gvisor}\nisolation: {mode: class, classes: [{name: a, namespaces: [a], runtimeClassName: kata}]}\n",
    );
    let kubeconfig = fake_cluster(Some(
        r#"{"apiVersion":"node.k8s.io/v1","kind":"RuntimeClassList","metadata":{"resourceVersion":"1"},"items":[{"apiVersion":"node.k8s.io/v1","kind":"RuntimeClass","metadata":{"name":"kata"},"handler":"kata"}]}"#,
    ));
    let o = run(&[
        "config",
        "check",
        cfg.to_str().unwrap(),
        "--cluster",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("RuntimeClass 'gvisor' does not exist in the cluster"),
        "{err}"
    );
    assert!(!err.contains("'kata' does not exist"), "{err}");
    // Without --cluster the cluster is not read.
    let o = run(&["config", "check", cfg.to_str().unwrap()]);
    assert!(!stderr(&o).contains("does not exist"), "{}", stderr(&o));
    // A cluster that cannot be read is an error, not a silent pass.
    let gone = fake_cluster(None);
    let o = run(&[
        "config",
        "check",
        cfg.to_str().unwrap(),
        "--cluster",
        "--kubeconfig",
        gone.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("listing RuntimeClasses"),
        "{}",
        stderr(&o)
    );
}
