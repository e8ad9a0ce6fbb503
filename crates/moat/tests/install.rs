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
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
            "RuntimeClass",
        ]
        .into_iter()
        // The backstop: images, runtime and isolation for pods; images and isolation for
        // workload templates and for CronJobs' (the default's runtime rules are all mutations).
        .chain(["ValidatingAdmissionPolicy"; 7])
        .chain(["ValidatingAdmissionPolicyBinding"; 7])
        .collect::<Vec<_>>()
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

    assert!(
        !docs.iter().any(|d| d["kind"] == "Secret"),
        "moat creates its Secret itself: no key in the output"
    );
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
        assert!(
            client.ca_bundle.is_none(),
            "moat keeps the caBundle: an apply must not own it"
        );
        assert_eq!(side_effects, "None");
        assert!(timeout.is_some());
        assert_eq!(versions, &["v1".to_owned()]);
        // The backstop is installed: the webhooks fail open, the API server's policies refuse.
        assert_eq!(failure.as_deref(), Some("Ignore"));
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
fn the_backstop_is_installed_by_default_and_without_it_the_webhooks_fail_closed() {
    let (code, docs, err) = install(&["--identity-agent"]);
    assert_eq!(code, 0, "{err}");
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .collect();
    let names: Vec<&str> = policies
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    // The agent turns the service-account stamp on, so the identity policy is compiled too.
    assert_eq!(
        names,
        [
            "moat-images",
            "moat-runtimeclass",
            "moat-isolation",
            "moat-identity",
            // A template carries no stamp: moat stamps its pods, so identity has no template
            // policy.
            "moat-images-workloads",
            "moat-isolation-workloads",
            "moat-images-cronjobs",
            "moat-isolation-cronjobs",
        ]
    );
    for p in &policies {
        let _: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy =
            round_trips(p);
    }
    for b in docs
        .iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
    {
        let _: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding =
            round_trips(b);
        assert_eq!(b["spec"]["validationActions"], serde_json::json!(["Deny"]));
        let exempt = &b["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0];
        for ns in ["moat-system", "kube-system", "moat-node"] {
            assert!(
                exempt["values"].as_array().unwrap().iter().any(|v| v == ns),
                "{ns} is exempt from the backstop as from the webhooks: {exempt}"
            );
        }
    }
    assert!(
        err.contains("the backstop"),
        "install lists what it cannot express: {err}"
    );
    for gap in moat_objects::backstop::GAPS {
        assert!(err.contains(gap.rule), "{err}");
    }

    let (code, docs, _) = install(&["--no-backstop"]);
    assert_eq!(code, 0);
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ValidatingAdmissionPolicy")
    );
    assert_eq!(
        find(&docs, "MutatingWebhookConfiguration")["webhooks"][0]["failurePolicy"],
        "Fail"
    );
}

#[test]
fn the_runtime_classes_the_configuration_names_are_installed() {
    let (code, docs, err) = install(&[]);
    assert_eq!(code, 0, "{err}");
    let rc = find(&docs, "RuntimeClass");
    let _: k8s_openapi::api::node::v1::RuntimeClass = round_trips(rc);
    assert_eq!(rc["metadata"]["name"], "gvisor", "the default's fallback");
    assert_eq!(rc["handler"], "runsc", "gVisor's containerd handler");
    let (_, docs, _) = install(&["--runtime-handler", "gvisor=runsc-kvm"]);
    assert_eq!(find(&docs, "RuntimeClass")["handler"], "runsc-kvm");
    let (_, docs, _) = install(&["--no-runtime-classes"]);
    assert!(!docs.iter().any(|d| d["kind"] == "RuntimeClass"));
    for bad in ["gvisor", "=x", "gvisor=Bad_Handler"] {
        let (code, _, err) = install(&["--runtime-handler", bad]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--runtime-handler"), "{err}");
    }
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
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "moat-namespace-reader")
    );
    let dir = std::env::temp_dir().join(format!("moat-install-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("ns-label.yaml");
    std::fs::write(&cfg, "isolation: {mode: class, namespaceClassLabel: moat.dev/class, classes: [{name: '*', namespaces: ['*']}]}\n").unwrap();
    let (code, docs, err) = install(&["--config", cfg.to_str().unwrap(), "--static-certs"]);
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
fn image_trust_mounts_the_registry_credentials_and_grants_nothing_more() {
    let dir = std::env::temp_dir().join(format!("moat-install-trust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("trust.yaml");
    std::fs::write(
        &cfg,
        "images: {trust: {unmatched: pin, credentialsFile: /etc/moat/registry/.dockerconfigjson}}\n",
    )
    .unwrap();
    let (code, docs, err) = install(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // Reading a mounted Secret needs no RBAC: the same roles as without trust.
    let rbac = |docs: &[Value]| -> Vec<Value> {
        docs.iter()
            .filter(|d| {
                d["kind"]
                    .as_str()
                    .is_some_and(|k| k.ends_with("Role") || k.ends_with("RoleBinding"))
            })
            .cloned()
            .collect()
    };
    let without = dir.join("without.yaml");
    std::fs::write(&without, "images: {}\n").unwrap();
    let (_, plain, _) = install(&["--config", without.to_str().unwrap()]);
    assert_eq!(rbac(&docs), rbac(&plain));
    let pod = &find(&docs, "Deployment")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "registry-credentials")
        .unwrap();
    assert_eq!(
        volume["secret"],
        serde_json::json!({"secretName": "moat-registry-credentials",
            "items": [{"key": ".dockerconfigjson", "path": ".dockerconfigjson"}]})
    );
    assert_eq!(
        mounts_read_only(&pod["containers"][0], "registry-credentials"),
        Some(true)
    );
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "registry-credentials")
        .unwrap();
    assert_eq!(mount["mountPath"], "/etc/moat/registry");
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees the Secret change"
    );
    // The configuration the server reads carries the section.
    let config = find(&docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap();
    assert!(
        config.contains("credentialsFile: /etc/moat/registry/.dockerconfigjson"),
        "{config}"
    );
    let limit = &pod["containers"][0]["resources"]["limits"]["memory"];
    assert_eq!(
        limit,
        &serde_json::json!(format!(
            "{}Mi",
            (moat_server::limits::memory_limit_bytes()
                + moat_server::limits::registry_memory_bytes())
                / (1024 * 1024)
        ))
    );

    std::fs::write(
        &cfg,
        "images: {trust: {unmatched: pin, credentialsFile: /etc/moat/config/creds.json}}\n",
    )
    .unwrap();
    let (code, _, err) = install(&["--config", cfg.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is in or above a directory moat mounts"),
        "{err}"
    );
}

#[test]
fn writes_the_image_policy_webhook_files() {
    let dir = std::env::temp_dir().join(format!("moat-imagepolicy-{}", std::process::id()));
    // The kubeconfig is a file on the API server's host: a CA that moat rotates cannot be in it.
    let (code, _, err) = install(&["--image-policy-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--static-certs"), "{err}");
    let (code, docs, err) = install(&[
        "--image-policy-dir",
        dir.to_str().unwrap(),
        "--static-certs",
    ]);
    assert_eq!(code, 0, "{err}");
    let admission: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.join("admission-config.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(admission["kind"], "AdmissionConfiguration");
    let policy = &admission["plugins"][0]["configuration"]["imagePolicy"];
    assert_eq!(
        policy["defaultAllow"], true,
        "fails open: the admission webhooks enforce"
    );
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
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(find(&docs, "Secret")["data"]["ca.crt"].as_str().unwrap())
                .unwrap()
        )
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
    // The webhook stamps the service account the agent asks SPIRE by.
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the configuration");
    assert!(
        config["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .contains("serviceAccountAnnotation: moat.dev/service-account"),
        "{config}"
    );
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["tolerations"][0]["operator"], "Exists");
    assert_eq!(spec["automountServiceAccountToken"], false);
    let c = &spec["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["CHOWN", "KILL"])
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
        .filter_map(|v| v["hostPath"]["path"].as_str())
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
    // One configuration: the agent reads the webhook's, byte for byte, from a copy in its own
    // namespace, and takes every key it trusts from it.
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/moat/config.yaml"])
    );
    assert_eq!(mounts_read_only(c, "config"), Some(true));
    let agent_config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["namespace"] == "moat-node")
        .expect("the agent's copy of the configuration");
    assert_eq!(agent_config["data"], config["data"]);
    assert!(
        !args.contains(&"--class-label"),
        "no key of its own that could differ from the webhook's"
    );
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

/// Whether the API server, with moat unreachable, admits a pod CREATE in `namespace`: every
/// webhook whose namespaceSelector and rules match is called and fails, and its failurePolicy
/// decides; the ImagePolicyWebhook (no selector) falls back to its `defaultAllow`.
fn admitted_while_moat_is_down(
    docs: &[Value],
    image_policy: Option<&Value>,
    namespace: &str,
) -> bool {
    let labels = serde_json::json!({"kubernetes.io/metadata.name": namespace});
    let selects = |selector: &Value| {
        selector["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| {
                let got = labels[e["key"].as_str().unwrap()].as_str();
                let values: Vec<&str> = e["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                match e["operator"].as_str().unwrap() {
                    "In" => got.is_some_and(|g| values.contains(&g)),
                    "NotIn" => got.is_none_or(|g| !values.contains(&g)),
                    "Exists" => got.is_some(),
                    "DoesNotExist" => got.is_none(),
                    other => panic!("{other}"),
                }
            })
    };
    for config in docs.iter().filter(|d| {
        d["kind"] == "MutatingWebhookConfiguration" || d["kind"] == "ValidatingWebhookConfiguration"
    }) {
        for webhook in config["webhooks"].as_array().unwrap() {
            let covers_pods = webhook["rules"].as_array().unwrap().iter().any(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == "pods")
                    && r["operations"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|o| o == "CREATE")
            });
            if covers_pods
                && selects(&webhook["namespaceSelector"])
                && webhook["failurePolicy"] == "Fail"
            {
                return false;
            }
        }
    }
    // The backstop: the API server's own policies review the pod (its bindings select by the
    // same namespace label), so it is not admitted unreviewed.
    let backstop = docs.iter().any(|d| {
        d["kind"] == "ValidatingAdmissionPolicyBinding"
            && d["spec"]["validationActions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "Deny"))
            && selects(&d["spec"]["matchResources"]["namespaceSelector"])
    });
    !backstop && image_policy.is_none_or(|p| p["defaultAllow"] == true)
}

#[test]
fn no_lockout_while_moat_is_down_for_every_installed_configuration() {
    let dir = std::env::temp_dir().join(format!("moat-lockout-{}", std::process::id()));
    let dir_arg = dir.to_str().unwrap().to_owned();
    let variants: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--identity-agent"],
        vec!["--cert-manager"],
        vec!["--rotate-certs"],
        vec!["--static-certs"],
        vec!["--image-policy-dir", &dir_arg, "--static-certs"],
        vec![
            "--identity-agent",
            "--image-policy-dir",
            &dir_arg,
            "--static-certs",
        ],
    ];
    for args in variants {
        let _ = std::fs::remove_dir_all(&dir);
        let (code, docs, err) = install(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let policy: Option<Value> = std::fs::read_to_string(dir.join("admission-config.yaml"))
            .ok()
            .map(|t| serde_yaml_ng::from_str::<Value>(&t).unwrap()["plugins"][0]["configuration"]["imagePolicy"].clone());
        let mut trusted = vec!["moat-system", "kube-system"];
        if args.contains(&"--identity-agent") {
            trusted.push("moat-node");
        }
        for ns in trusted {
            assert!(
                admitted_while_moat_is_down(&docs, policy.as_ref(), ns),
                "{args:?}: pods in {ns} are refused while moat is down"
            );
        }
        assert!(
            !admitted_while_moat_is_down(&docs, policy.as_ref(), "shop"),
            "{args:?}: tenant pods are not admitted unreviewed"
        );
    }
    // The explicit fail-closed flag does lock every namespace out, as its help says.
    let _ = std::fs::remove_dir_all(&dir);
    let (code, docs, err) = install(&[
        "--image-policy-dir",
        &dir_arg,
        "--image-policy-fail-closed",
        "--static-certs",
    ]);
    assert_eq!(code, 0, "{err}");
    let policy: Value = serde_yaml_ng::from_str::<Value>(
        &std::fs::read_to_string(dir.join("admission-config.yaml")).unwrap(),
    )
    .unwrap()["plugins"][0]["configuration"]["imagePolicy"]
        .clone();
    assert!(!admitted_while_moat_is_down(
        &docs,
        Some(&policy),
        "kube-system"
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An API server's admission path, enough for `kubectl apply`: each object in order; a pod
/// template in a namespace the validating webhooks in force select is decided by moat's engine
/// with the installed configuration (moat is running); webhook configurations replace their
/// predecessors as they are applied.
fn apply(webhooks: &mut Vec<Value>, docs: &[Value]) -> Result<(), String> {
    use moat_core::decision::{Operation, Request, Stage};
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap();
        if kind == "ValidatingWebhookConfiguration" || kind == "MutatingWebhookConfiguration" {
            webhooks.retain(|w| {
                w["kind"] != doc["kind"] || w["metadata"]["name"] != doc["metadata"]["name"]
            });
            webhooks.push(doc.clone());
            continue;
        }
        let Ok(Some(template)) = moat_core::subject::Template::from_value(doc) else {
            continue;
        };
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or_default();
        if admitted_while_moat_is_down(webhooks, None, ns) {
            continue; // not selected by any webhook
        }
        let installed = docs
            .iter()
            .chain(webhooks.iter())
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "moat-config");
        let config = installed.map_or_else(moat_core::config::Config::embedded_default, |c| {
            moat_core::config::Config::from_yaml(c["data"]["config.yaml"].as_str().unwrap())
                .unwrap()
        });
        let labels = std::collections::BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            ns.to_owned(),
        )]);
        let d = moat_core::engine::decide(
            &config,
            &Request {
                operation: Operation::Create,
                stage: Stage::Validate,
                object: Some(&template),
                old_object: None,
                namespace: ns,
                namespace_labels: Some(&labels),
                dry_run: false,
                requester: None,
                placement_seed: "u",
            },
        );
        if !d.allowed() {
            return Err(format!(
                "{kind} {ns}/{}: {}",
                doc["metadata"]["name"],
                d.message()
            ));
        }
    }
    Ok(())
}

#[test]
fn any_output_applies_in_one_go_over_an_earlier_one() {
    let (_, old, _) = install(&[]);
    let mut webhooks = Vec::new();
    apply(&mut webhooks, &old).unwrap();
    for args in [
        &["--identity-agent"][..],
        &["--identity-agent", "--identity-namespace", "spiffe-node"],
        &["--rotate-certs"],
    ] {
        let mut state = webhooks.clone();
        let (code, new, err) = install(args);
        assert_eq!(code, 0, "{err}");
        apply(&mut state, &new).unwrap_or_else(|e| panic!("{args:?}: refused: {e}"));
        // And again over itself.
        apply(&mut state, &new).unwrap();
    }
}

#[test]
fn the_validating_webhook_sees_label_changes_through_every_pod_subresource() {
    // Without the backstop, the validating webhook is what re-checks pods.
    let (_, docs, _) = install(&["--no-backstop"]);
    let rules = &find(&docs, "ValidatingWebhookConfiguration")["webhooks"][0]["rules"];
    let resources: Vec<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap())
        .map(|r| r.as_str().unwrap())
        .collect();
    for r in ["pods", "pods/status", "pods/ephemeralcontainers"] {
        assert!(resources.contains(&r), "{r} in {resources:?}");
    }
}

/// The webhooks the API server calls for one pod CREATE in a tenant namespace.
fn calls_per_pod_create(docs: &[Value]) -> usize {
    docs.iter()
        .filter(|d| {
            d["kind"] == "MutatingWebhookConfiguration"
                || d["kind"] == "ValidatingWebhookConfiguration"
        })
        .flat_map(|d| d["webhooks"].as_array().unwrap())
        .filter(|w| {
            w["rules"].as_array().unwrap().iter().any(|r| {
                r["apiGroups"][0] == ""
                    && r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == "pods")
                    && r["operations"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|o| o == "CREATE")
            })
        })
        .count()
}

#[test]
fn with_the_backstop_a_pod_costs_one_webhook_call_fewer() {
    let (_, with, _) = install(&[]);
    let (_, without, _) = install(&["--no-backstop"]);
    assert_eq!(
        calls_per_pod_create(&with),
        1,
        "mutate only: the backstop validates"
    );
    assert_eq!(calls_per_pod_create(&without), 2, "mutate and validate");
    // dedicatedNode mode keeps the validating webhook for pods: the backstop cannot check a
    // dedicated node id's namespace binding.
    let dir = std::env::temp_dir().join(format!("moat-dedicated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "isolation: {mode: dedicatedNode, classes: [{name: untrusted, namespaces: [\"*\"]}]}\n",
    )
    .unwrap();
    let (code, dedicated, err) = install(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(calls_per_pod_create(&dedicated), 2);
    // So does one dedicatedNode class among others; classes of the affinity modes alone do not.
    for (classes, calls) in [
        (
            "[{name: a, namespaces: [x]}, {name: big, mode: dedicatedNode, namespaces: [y]}]",
            2,
        ),
        (
            "[{name: a, namespaces: [x]}, {name: ci, mode: pod, namespaces: [y]}]",
            1,
        ),
    ] {
        std::fs::write(
            &config,
            format!("isolation: {{mode: class, classes: {classes}}}\n"),
        )
        .unwrap();
        let (code, docs, err) = install(&["--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(calls_per_pod_create(&docs), calls, "{classes}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_installed_timeout_outlasts_every_answer_moat_gives() {
    use moat_server::limits::{BODY_READ_TIMEOUT, QUEUE_TIMEOUT, WEBHOOK_TIMEOUT};
    let (_, docs, _) = install(&[]);
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        let seconds = find(&docs, kind)["webhooks"][0]["timeoutSeconds"]
            .as_u64()
            .unwrap();
        assert_eq!(seconds, WEBHOOK_TIMEOUT.as_secs(), "{kind}");
        assert!(
            (1..=30).contains(&seconds),
            "the API server accepts 1 to 30"
        );
        assert!(
            QUEUE_TIMEOUT + BODY_READ_TIMEOUT < WEBHOOK_TIMEOUT,
            "moat answers (503, 408) before the API server gives up"
        );
    }
}

#[test]
fn a_network_policy_admits_only_the_api_server_to_the_review_port() {
    let (code, docs, err) = install(&[
        "--apiserver-cidr",
        "10.0.0.0/24",
        "--apiserver-cidr",
        "fd00::/64",
    ]);
    assert_eq!(code, 0, "{err}");
    let np = find(&docs, "NetworkPolicy");
    let _: k8s_openapi::api::networking::v1::NetworkPolicy = round_trips(np);
    let ingress = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress[0]["ports"][0]["port"], "https");
    assert_eq!(
        ingress[0]["from"],
        serde_json::json!([{"ipBlock": {"cidr": "10.0.0.0/24"}}, {"ipBlock": {"cidr": "fd00::/64"}}])
    );
    assert_eq!(
        ingress.len(),
        1,
        "no scraper named: the metrics port is closed"
    );
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        find(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    );
    let (_, docs, err) = install(&[]);
    assert!(
        find(&docs, "NetworkPolicy")["spec"]["ingress"][0]
            .get("from")
            .is_none()
    );
    assert!(
        err.contains("the review port is open to every pod in the cluster"),
        "without a CIDR or a client CA, install says what stays open: {err}"
    );
    assert!(err.contains("admit no scraper"), "{err}");
    for bad in ["10.0.0.0", "10.0.0.0/33", "x/8"] {
        let (code, _, err) = install(&["--apiserver-cidr", bad]);
        assert_eq!(code, 2, "{bad}");
        assert!(err.contains("is not a CIDR"), "{err}");
    }
}

#[test]
fn the_metrics_ports_admit_only_the_named_scrapers() {
    let (code, docs, err) = install(&[
        "--identity-agent",
        "--metrics-namespace",
        "monitoring",
        "--metrics-cidr",
        "192.168.0.0/16",
    ]);
    assert_eq!(code, 0, "{err}");
    let scrapers = serde_json::json!([
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"ipBlock": {"cidr": "192.168.0.0/16"}},
    ]);
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 2, "moat's and the identity agent's");
    for np in policies {
        let _: k8s_openapi::api::networking::v1::NetworkPolicy = round_trips(np);
        let metrics = np["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ports"][0]["port"] == "metrics")
            .expect("a metrics rule");
        assert_eq!(metrics["from"], scrapers);
    }
    for (flag, bad) in [
        ("--metrics-namespace", "Not_A_Name"),
        ("--metrics-cidr", "x/8"),
    ] {
        let (code, _, err) = install(&[flag, bad]);
        assert_eq!(code, 2, "{bad}");
        assert!(err.contains(bad), "{err}");
    }
}

#[test]
fn the_memory_limit_is_derived_from_the_budgets() {
    let (_, docs, _) = install(&[]);
    let limit = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]
        ["limits"]["memory"];
    assert_eq!(
        limit,
        &serde_json::json!(format!(
            "{}Mi",
            moat_server::limits::memory_limit_bytes() / (1024 * 1024)
        ))
    );
}

#[test]
fn managed_certificates_leave_no_key_in_the_output_and_grant_only_what_rotation_writes() {
    // --static-certs: the old way, a Secret in the output (as `data`, so an unchanged apply is
    // a no-op), without the CA's key since nothing renews it, and no API access.
    let (code, docs, err) = install(&["--static-certs"]);
    assert_eq!(code, 0, "{err}");
    let secret = find(&docs, "Secret");
    assert!(secret.get("stringData").is_none());
    let keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    assert!(!docs.iter().any(|d| d["kind"] == "Role"));
    assert!(
        find(&docs, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]
            .is_string()
    );

    // The default, and --rotate-certs (kept for compatibility): moat creates the Secret.
    let (_, default_docs, _) = install(&[]);
    let (code, docs, err) = install(&["--rotate-certs"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(docs, default_docs);
    assert!(!docs.iter().any(|d| d["kind"] == "Secret"));
    let role = find(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "moat-system");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["moat-tls"], "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "create", "update"]},
        ])
    );
    let cluster_role = find(&docs, "ClusterRole");
    assert_eq!(
        cluster_role["rules"],
        serde_json::json!([{
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
            "resourceNames": ["moat"],
            "verbs": ["get", "patch"],
        }])
    );
    for (binding, role_kind) in [
        ("RoleBinding", "Role"),
        ("ClusterRoleBinding", "ClusterRole"),
    ] {
        let b = find(&docs, binding);
        assert_eq!(b["roleRef"]["kind"], role_kind);
        assert_eq!(b["roleRef"]["name"], "moat-cert-rotation");
        assert_eq!(
            b["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "moat", "namespace": "moat-system"}])
        );
    }
    // The webhook configurations the ClusterRole names are the installed ones.
    assert_eq!(
        find(&docs, "MutatingWebhookConfiguration")["metadata"]["name"],
        "moat"
    );
    assert_eq!(
        find(&docs, "ValidatingWebhookConfiguration")["metadata"]["name"],
        "moat"
    );
    assert_eq!(
        find(&docs, "ServiceAccount")["automountServiceAccountToken"],
        true
    );

    let deployment = round_trips::<Deployment>(find(&docs, "Deployment"));
    let pod = deployment.spec.template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(true));
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap();
    let after = |flag: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    };
    assert!(args.iter().any(|a| a == "--rotate-certs"));
    assert_eq!(after("--tls-secret"), ["moat-tls"]);
    assert_eq!(after("--pod-name"), ["$(POD_NAME)"]);
    assert_eq!(
        after("--cert-dns"),
        [
            "moat.moat-system.svc",
            "moat.moat-system.svc.cluster.local",
            "moat.moat-system"
        ]
    );
    let env = container.env.clone().unwrap();
    assert_eq!(env[0].name, "POD_NAME");
    assert_eq!(
        env[0]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.name"
    );
    // The CA key is not projected into the pod's file system.
    let tls = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "tls")
        .unwrap()
        .secret
        .unwrap();
    let items: Vec<String> = tls.items.unwrap().into_iter().map(|i| i.key).collect();
    assert_eq!(items, ["tls.crt", "tls.key"]);
    assert_eq!(
        tls.optional,
        Some(true),
        "the pods start before the Secret they create exists"
    );

    for clash in [
        &["--rotate-certs", "--cert-manager"][..],
        &["--static-certs", "--cert-manager"],
        &["--static-certs", "--rotate-certs"],
    ] {
        let (code, _, err) = install(clash);
        assert_eq!(code, 2, "{clash:?}: {err}");
    }
}

#[test]
fn the_installed_serve_arguments_with_rotation_are_accepted_by_moat_serve() {
    let (_, docs, _) = install(&["--rotate-certs"]);
    let dir = std::env::temp_dir().join(format!("moat-install-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([
            "certs",
            "--dns",
            "localhost",
            "--out",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let config = dir.join("config.yaml");
    std::fs::write(&config, "{}\n").unwrap();
    let args: Vec<String> = find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a {
                "/etc/moat/config/config.yaml" => config.display().to_string(),
                "/etc/moat/tls/tls.crt" => dir.join("tls.crt").display().to_string(),
                "/etc/moat/tls/tls.key" => dir.join("tls.key").display().to_string(),
                "$(POD_NAME)" => "moat-0".to_owned(),
                other => other.to_owned(),
            }
        })
        .collect();
    // Outside a cluster: the arguments parse, the certificates load, and the server stops at
    // the API connection rotation needs, a runtime failure (3), not a usage error (2).
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(&args)
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("Kubernetes API"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_apiserver_client_ca_makes_reviews_need_its_certificate() {
    let dir = std::env::temp_dir().join(format!("moat-client-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["certs", "--dns", "kube-apiserver", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let ca = dir.join("ca.crt");
    let (code, docs, err) = install(&["--apiserver-client-ca", ca.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "moat-client-ca")
        .expect("the client CA's ConfigMap");
    assert_eq!(cm["data"]["ca.crt"], std::fs::read_to_string(&ca).unwrap());
    let deployment = find(&docs, "Deployment");
    let _: Deployment = round_trips(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--client-ca", "/etc/moat/client-ca/ca.crt"])
    );
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["configMap"]["name"] == "moat-client-ca")
    );
    let not_pem = dir.join("tls.key.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let (code, _, err) = install(&["--apiserver-client-ca", not_pem.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("--apiserver-client-ca"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_install_that_nothing_renews_says_so() {
    let (_, _, err) = install(&["--static-certs"]);
    assert!(err.contains("nothing to renew them"), "{err}");
    for args in [&[][..], &["--cert-manager"]] {
        let (code, _, err) = install(args);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("nothing to renew them"), "{args:?}: {err}");
    }
}
