//! `moat install` output: valid Kubernetes objects only, with the properties an operator relies
//! on (replicas, hardening, webhook settings, lock-out protection, CA wiring).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::process::Command;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use serde_json::Value;

fn install(args: &[&str]) -> (i32, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("install")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    (
        out.status.code().unwrap(),
        docs,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// Each object parses as its Kubernetes type and comes back unchanged: no unknown fields.
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(
        &serde_json::to_value(&t).unwrap(),
        v,
        "{} does not round-trip",
        v["kind"]
    );
    t
}

#[test]
fn prints_every_manifest_as_valid_objects() {
    let (code, docs, err) = install(&[]);
    assert_eq!(code, 0, "{err}");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Secret",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration"
        ]
    );
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
            "{d}"
        );
    }

    let deployment: Deployment = round_trips(find(&docs, "Deployment"));
    let spec = deployment.spec;
    assert!(spec.replicas.unwrap() >= 2);
    let pod = spec.template.spec.unwrap();
    assert!(
        pod.affinity.unwrap().pod_anti_affinity.is_some(),
        "replicas spread across nodes"
    );
    let c = &pod.containers[0];
    assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
    assert!(c.resources.as_ref().unwrap().requests.is_some());
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );

    let secret: Secret = round_trips(find(&docs, "Secret"));
    let ca = secret.string_data.unwrap()["ca.crt"].clone();
    let mutating: MutatingWebhookConfiguration =
        round_trips(find(&docs, "MutatingWebhookConfiguration"));
    let validating: ValidatingWebhookConfiguration =
        round_trips(find(&docs, "ValidatingWebhookConfiguration"));
    let m = &mutating.webhooks.unwrap()[0];
    let v = &validating.webhooks.unwrap()[0];
    for (client, side_effects, timeout, versions, failure, selector) in [
        (
            &m.client_config,
            &m.side_effects,
            m.timeout_seconds,
            &m.admission_review_versions,
            &m.failure_policy,
            &m.namespace_selector,
        ),
        (
            &v.client_config,
            &v.side_effects,
            v.timeout_seconds,
            &v.admission_review_versions,
            &v.failure_policy,
            &v.namespace_selector,
        ),
    ] {
        assert_eq!(
            String::from_utf8(client.ca_bundle.as_ref().unwrap().0.clone()).unwrap(),
            ca,
            "caBundle is the CA that signed the Secret"
        );
        assert_eq!(side_effects, "None");
        assert!(timeout.is_some());
        assert_eq!(versions, &["v1".to_owned()]);
        assert_eq!(failure.as_deref(), Some("Fail"));
        let exempt = &selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap()[0];
        assert_eq!(exempt.key, "kubernetes.io/metadata.name");
        assert_eq!(exempt.operator, "NotIn");
        let values = exempt.values.as_ref().unwrap();
        assert!(
            values.contains(&"moat-system".to_owned())
                && values.contains(&"kube-system".to_owned()),
            "{values:?}"
        );
    }
    assert_eq!(m.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(
        m.client_config.service.as_ref().unwrap().path.as_deref(),
        Some("/mutate")
    );
    assert_eq!(
        v.client_config.service.as_ref().unwrap().path.as_deref(),
        Some("/validate")
    );
    let rules = v.rules.as_ref().unwrap();
    assert!(
        rules.iter().any(|r| r
            .resources
            .as_ref()
            .unwrap()
            .contains(&"deployments".to_owned())),
        "workloads are validated at once"
    );
}

#[test]
fn options_change_the_output() {
    let (code, docs, _) = install(&[
        "--namespace",
        "guard",
        "--replicas",
        "3",
        "--failure-policy",
        "ignore",
        "--image",
        "registry.example/moat:1.2.3",
    ]);
    assert_eq!(code, 0);
    let d = find(&docs, "Deployment");
    assert_eq!(d["metadata"]["namespace"], "guard");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/moat:1.2.3"
    );
    assert_eq!(
        find(&docs, "ValidatingWebhookConfiguration")["webhooks"][0]["failurePolicy"],
        "Ignore"
    );
    assert_eq!(
        find(&docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["service"]["namespace"],
        "guard"
    );

    let (code, _, err) = install(&["--replicas", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("at least 2"), "{err}");
    let (code, _, err) = install(&["--namespace", "Bad_NS"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a namespace name"), "{err}");
}

#[test]
fn cert_manager_replaces_the_generated_secret() {
    let (code, docs, _) = install(&["--cert-manager"]);
    assert_eq!(code, 0);
    assert!(
        !docs.iter().any(|d| d["kind"] == "Secret"),
        "no private key in the output"
    );
    assert_eq!(find(&docs, "Certificate")["spec"]["secretName"], "moat-tls");
    let m = find(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        m["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "moat-system/moat-tls"
    );
    assert!(m["webhooks"][0]["clientConfig"].get("caBundle").is_none());
}

#[test]
fn namespace_reader_rbac_only_when_the_configuration_needs_it() {
    let (_, docs, _) = install(&[]);
    assert!(!docs.iter().any(|d| d["kind"] == "ClusterRole"));
    let dir = std::env::temp_dir().join(format!("moat-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("ns-label.yaml");
    std::fs::write(&cfg, "isolation: {mode: class, namespaceClassLabel: moat.dev/class, classes: [{name: '*', namespaces: ['*']}]}\n").unwrap();
    let (code, docs, err) = install(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let role = find(&docs, "ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}])
    );
    assert_eq!(
        find(&docs, "ClusterRoleBinding")["subjects"][0]["name"],
        "moat"
    );
}

#[test]
fn writes_the_image_policy_webhook_files() {
    let dir = std::env::temp_dir().join(format!("moat-imagepolicy-{}", std::process::id()));
    let (code, docs, err) = install(&["--image-policy-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let admission: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("admission-config.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(admission["kind"], "AdmissionConfiguration");
    let policy = &admission["plugins"][0]["configuration"]["imagePolicy"];
    assert_eq!(policy["defaultAllow"], false);
    assert_eq!(
        policy["kubeConfigFile"],
        dir.join("imagepolicy-kubeconfig.yaml")
            .display()
            .to_string()
    );
    let kubeconfig: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("imagepolicy-kubeconfig.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["server"],
        "https://moat.moat-system.svc:443/imagereview"
    );
    let ca = base64::engine::general_purpose::STANDARD
        .decode(
            kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8(ca).unwrap(),
        find(&docs, "Secret")["stringData"]["ca.crt"]
            .as_str()
            .unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn identity_agent_is_a_least_privilege_daemonset_on_every_node_skipped_by_the_webhooks() {
    let (code, docs, err) = install(&["--identity-agent"]);
    assert_eq!(code, 0, "{err}");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let _: k8s_openapi::api::apps::v1::DaemonSet = round_trips(ds);
    assert_eq!(ds["metadata"]["namespace"], "moat-node");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["tolerations"][0]["operator"], "Exists");
    assert_eq!(spec["automountServiceAccountToken"], false);
    let c = &spec["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["CHOWN"])
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "identity-agent");
    assert!(
        args.windows(2)
            .any(|w| w == ["--nri-socket", "/var/run/nri/nri.sock"])
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--spire-admin-socket", "/run/spire/admin/admin.sock"])
    );
    // The artifact directory has the same path on the host and in the agent: the runtime
    // bind-mounts it by host path.
    let volumes = spec["volumes"].as_array().unwrap();
    let host: Vec<&str> = volumes
        .iter()
        .map(|v| v["hostPath"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        host,
        [
            "/var/run/nri",
            "/run/spire/admin",
            "/run/moat/identity",
            "/run/containerd/io.containerd.runtime.v2.task/k8s.io"
        ]
    );
    assert_eq!(mounts_read_only(c, "bundles"), Some(true));
    // The runtime's deadline is passed on (containerd 1.7 does not report it).
    assert!(
        args.windows(2)
            .any(|w| w == ["--runtime-request-timeout", "2000ms"])
    );
    let (_, docs, _) = install(&["--identity-agent", "--runtime-request-timeout", "1s"]);
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains(r#""--runtime-request-timeout","1000ms""#),
        "{args}"
    );
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert_eq!(mounts[2]["mountPath"], "/run/moat/identity");
    assert_eq!(mounts[0]["readOnly"], true);
    // Both webhooks skip the agent's namespace (it must never be sandboxed or isolated).
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let values =
            &find(&docs, kind)["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"];
        assert!(
            values.as_array().unwrap().iter().any(|v| v == "moat-node"),
            "{kind}"
        );
    }
    // The webhook's own namespace stays restricted.
    let restricted = docs
        .iter()
        .filter(|d| d["kind"] == "Namespace")
        .filter(|d| d["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted")
        .count();
    assert_eq!(restricted, 1);
}

fn mounts_read_only(container: &serde_json::Value, volume: &str) -> Option<bool> {
    container["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == volume)
        .and_then(|m| m["readOnly"].as_bool())
}

#[test]
fn identity_agent_options_are_checked() {
    let (code, _, err) = install(&["--identity-agent", "--runtime-request-timeout", "2"]);
    assert_eq!(code, 2);
    assert!(err.contains("as containerd writes it"), "{err}");
    let (code, _, err) = install(&["--identity-agent", "--identity-namespace", "moat-system"]);
    assert_eq!(code, 2);
    assert!(err.contains("must differ from --namespace"), "{err}");
    let (code, _, err) = install(&["--identity-agent", "--nri-socket", "nri.sock"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--nri-socket 'nri.sock' must be an absolute path"),
        "{err}"
    );
    let (code, _, err) = install(&["--identity-namespace", "x"]);
    assert_eq!(code, 2, "needs --identity-agent");
    assert!(err.contains("--identity-agent"), "{err}");
    // Without the flag, no DaemonSet.
    let (_, docs, _) = install(&[]);
    assert!(!docs.iter().any(|d| d["kind"] == "DaemonSet"));
}
