//! `moat install` on a real kube-apiserver: the real type checker, the real apply paths.
//!
//! Ignored in a plain `cargo test`: `scripts/test.sh` builds the control plane from its Go
//! modules (`scripts/build-kube.sh`), starts it on loopback (`scripts/start-test-kube.sh`) and
//! runs this file once per supported version with `KUBECONFIG`, `MOAT_KUBE_BIN` and
//! `MOAT_KUBE_VERSION` set. Missing, they fail the test: it never passes without a cluster.
//! The tests install cluster-scoped objects of one name, so they run one at a time
//! (`--test-threads=1`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The cluster `scripts/start-test-kube.sh` started, from its environment.
struct Cluster {
    kubectl: PathBuf,
    version: String,
}

impl Cluster {
    fn from_env() -> Self {
        let need = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run scripts/test.sh, which starts a real kube-apiserver")
            })
        };
        need("KUBECONFIG");
        let kubectl = PathBuf::from(need("MOAT_KUBE_BIN")).join("kubectl");
        let cluster = Self {
            kubectl,
            version: need("MOAT_KUBE_VERSION"),
        };
        let out = cluster.kubectl(&["version", "-o", "json"], None);
        let version: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            version["serverVersion"]["gitVersion"], cluster.version,
            "the API server is not the version under test"
        );
        cluster
    }

    /// Runs kubectl, feeding `input` on its standard input; fails the test on a non-zero exit.
    fn kubectl(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let out = self.try_kubectl(args, input);
        assert!(
            out.status.success(),
            "kubectl {} on {} exited {}:\n{}",
            args.join(" "),
            self.version,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn try_kubectl(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut child = Command::new(&self.kubectl)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kubectl.display()));
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.unwrap_or_default()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    }
}

/// `moat install` with `args`; its standard output.
fn install(args: &[&str]) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg("install")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moat install {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn example(name: &str) -> String {
    format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A pause image pinned by digest, which configurations with warm nodes need (never pulled:
/// no kubelet runs here).
const PAUSE: &str = "registry.example/pause@sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Every configuration a user starts from: the embedded default and each example's.
fn configurations() -> Vec<(String, Vec<String>)> {
    let mut all = vec![("the embedded default".to_owned(), Vec::new())];
    for file in ["ipp-compatible.yaml", "mixed-modes.yaml"] {
        let args = vec![
            "--config".to_owned(),
            example(file),
            "--pause-image".to_owned(),
            PAUSE.to_owned(),
            // The default form is a CapacityBuffer, a Cluster Autoscaler CRD this cluster
            // lacks; placeholder Deployments are core objects.
            "--warm-form".to_owned(),
            "placeholders".to_owned(),
        ];
        all.push((file.to_owned(), args));
    }
    all
}

#[test]
#[ignore = "needs a real kube-apiserver: scripts/test.sh builds and starts one"]
fn every_install_applies_client_side_server_side_and_dry_run_and_reapplies_unchanged() {
    let cluster = Cluster::from_env();
    for (name, args) in configurations() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let manifests = install(&args);
        // The order a new user meets them: a first apply, the same output again, then the
        // GitOps tools' server-side apply over it (no --force-conflicts: a conflict is a defect
        // of the output), then a server-side dry run.
        cluster.kubectl(&["apply", "-f", "-"], Some(&manifests));
        cluster.kubectl(&["apply", "-f", "-"], Some(&manifests));
        cluster.kubectl(&["apply", "--server-side", "-f", "-"], Some(&manifests));
        cluster.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&manifests));
        // Re-applied, the output changes no live object: kubectl diff exits 0 only then.
        let diff = cluster.try_kubectl(&["diff", "--server-side", "-f", "-"], Some(&manifests));
        assert!(
            diff.status.success(),
            "{name}: kubectl diff of the re-applied output on {} shows a change (exit {}):\n{}{}",
            cluster.version,
            diff.status,
            String::from_utf8_lossy(&diff.stdout),
            String::from_utf8_lossy(&diff.stderr)
        );
        // What moat's backstop is: every policy the output names was accepted by the real type
        // checker (a refused one would have failed the applies above) and exists.
        let out = cluster.kubectl(&["get", "validatingadmissionpolicies", "-o", "name"], None);
        let live = String::from_utf8(out.stdout).unwrap();
        for policy in ["moat-images", "moat-runtimeclass", "moat-isolation"] {
            assert!(
                live.contains(&format!("/{policy}\n")),
                "{name}: {policy} is not on the API server {}: {live}",
                cluster.version
            );
        }
        let warnings = type_warnings(&cluster);
        assert!(
            warnings.is_empty(),
            "{name}: the API server's type checker warns about moat's policies on {}:\n{}",
            cluster.version,
            warnings.join("\n")
        );
    }
}

/// What the API server's type checker (the policy status controller of
/// kube-controller-manager, with the resources' schemas) says about each live moat policy,
/// once it has checked their current generation.
fn type_warnings(cluster: &Cluster) -> Vec<String> {
    for _ in 0..240 {
        let out = cluster.kubectl(
            &[
                "get",
                "validatingadmissionpolicies",
                "-l",
                "app.kubernetes.io/name=moat",
                "-o",
                "json",
            ],
            None,
        );
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let items = list["items"].as_array().unwrap();
        let checked = items
            .iter()
            .all(|p| p["status"]["observedGeneration"] == p["metadata"]["generation"]);
        if checked {
            return items
                .iter()
                .flat_map(|p| {
                    let name = p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    p["status"]["typeChecking"]["expressionWarnings"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |w| format!("{name}: {}: {}", w["fieldRef"], w["warning"]))
                })
                .collect();
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!(
        "the policies' types were not checked within 60 s on {}",
        cluster.version
    );
}

#[test]
#[ignore = "needs a real kube-apiserver: scripts/test.sh builds and starts one"]
fn the_images_policy_passes_the_real_type_checker_on_its_own() {
    // The policy the real v1.34 refused ("expected type 'string' but found 'dyn'" in the map
    // literal of each image's entry), applied alone so its own error, not another object's, is
    // what fails.
    let cluster = Cluster::from_env();
    let manifests = String::from_utf8(install(&[])).unwrap();
    let images: Vec<&str> = manifests
        .split("\n---\n")
        .filter(|doc| {
            doc.contains("name: moat-images\n") && doc.contains("kind: ValidatingAdmissionPolicy\n")
        })
        .collect();
    assert_eq!(images.len(), 1, "one moat-images policy in the output");
    cluster.kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(images[0].as_bytes()),
    );
}

/// The user tenants act as: a namespace's `edit` role, bound to it alone (impersonated by the
/// admin, as `kubectl --as` does).
const TENANT: &str = "moat-test-tenant";

impl Cluster {
    /// Removes every object an earlier install left (they carry moat's name label), so the
    /// next install is the only one live.
    fn remove_moat(&self) {
        self.kubectl(
            &[
                "delete",
                "--ignore-not-found",
                "--wait=false",
                "-l",
                "app.kubernetes.io/name=moat",
                "validatingadmissionpolicies,validatingadmissionpolicybindings,mutatingwebhookconfigurations,validatingwebhookconfigurations",
            ],
            None,
        );
    }

    /// A new namespace in which [`TENANT`] holds the built-in `edit` role.
    fn tenant_namespace(&self, name: &str) -> String {
        self.try_kubectl(
            &[
                "delete",
                "namespace",
                name,
                "--ignore-not-found",
                "--wait=true",
            ],
            None,
        );
        self.kubectl(&["create", "namespace", name], None);
        self.kubectl(
            &[
                "create",
                "rolebinding",
                "tenant-edit",
                "--clusterrole=edit",
                "--user",
                TENANT,
                "-n",
                name,
            ],
            None,
        );
        // The built-in roles do not grant ephemeral containers (kubectl debug); operators who
        // let tenants debug grant this.
        self.kubectl(
            &[
                "create",
                "role",
                "debug",
                "--verb=get,patch,update",
                "--resource=pods/ephemeralcontainers",
                "-n",
                name,
            ],
            None,
        );
        self.kubectl(
            &[
                "create",
                "rolebinding",
                "tenant-debug",
                "--role=debug",
                "--user",
                TENANT,
                "-n",
                name,
            ],
            None,
        );
        // Pods need the namespace's default service account, which the controller manager makes.
        for _ in 0..120 {
            if self
                .try_kubectl(&["get", "serviceaccount", "default", "-n", name], None)
                .status
                .success()
            {
                return name.to_owned();
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        panic!("no default service account in {name} on {}", self.version);
    }

    /// kubectl as the tenant.
    fn as_tenant(&self, args: &[&str], input: Option<&[u8]>) -> Output {
        let mut all = vec!["--as", TENANT];
        all.extend_from_slice(args);
        self.try_kubectl(&all, input)
    }
}

/// What the outage table says the API server does with a request.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Admitted,
    /// Refused, by the policy named, with a message containing the text.
    Refused(&'static str, &'static str),
}

/// Checks one row: `out` is kubectl's answer to the request the row describes.
fn check_row(cluster: &Cluster, row: &str, expect: Expect, out: &Output) -> Option<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let fault = match expect {
        Expect::Admitted if out.status.success() => return None,
        Expect::Admitted => format!("refused: {stderr}"),
        Expect::Refused(policy, text) if !out.status.success() => {
            let by = format!("ValidatingAdmissionPolicy '{policy}'");
            if stderr.contains(&by) && stderr.contains(text) {
                return None;
            }
            format!("refused, but not by {policy} with \"{text}\": {stderr}")
        }
        Expect::Refused(policy, _) => format!("admitted, where {policy} should refuse it"),
    };
    Some(format!("{row} ({}): {fault}", cluster.version))
}

/// A pod of the tenant's: `spec` merged over one pinned container that runs in gVisor.
fn pod(name: &str, spec: serde_json::Value) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "runtimeClassName": "gvisor",
            "containers": [{"name": "app", "image": "registry.example/app:1.0"}],
        },
    });
    merge(&mut pod["spec"], spec);
    pod
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(&k);
                } else {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (a, b) => *a = b,
    }
}

/// `moat review -o json` of `object` in namespace `ns`: the object as moat's mutating webhook
/// would have written it (how an operator prepares a pod that needs none of moat's changes).
fn mutated_by_moat(object: &serde_json::Value, ns: &str) -> serde_json::Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args(["review", "-o", "json", "--namespace", ns, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(object.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let verdicts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdicts[0]["allowed"], true, "moat review: {verdicts}");
    verdicts[0]["object"].clone()
}

/// Waits until the backstop's policies are enforced (`enforced`) or gone: the API server loads
/// policies asynchronously, so the first requests after an apply or a delete may still meet
/// the old set. Probes a pod and a CronJob (its policies are written last) with mutable tags.
fn wait_for_backstop(cluster: &Cluster, ns: &str, enforced: bool) {
    let pod = pod(
        "backstop-probe",
        serde_json::json!({"containers": [{"name": "app", "image": "busybox"}]}),
    );
    let cronjob = serde_json::json!({
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "backstop-probe"},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never", "runtimeClassName": "gvisor",
            "containers": [{"name": "job", "image": "busybox"}],
        }}}}},
    });
    let refused = |probe: &serde_json::Value, policy: &str| {
        let out = cluster.try_kubectl(
            &["create", "--dry-run=server", "-n", ns, "-f", "-"],
            Some(probe.to_string().as_bytes()),
        );
        let by = String::from_utf8_lossy(&out.stderr).contains(&format!("'{policy}'"));
        !out.status.success() && by
    };
    for _ in 0..240 {
        let pod_refused = refused(&pod, "moat-images");
        let cronjob_refused = refused(&cronjob, "moat-images-cronjobs");
        if pod_refused == enforced && cronjob_refused == enforced {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!(
        "the backstop was not {} within 60 s on {}",
        if enforced { "enforced" } else { "removed" },
        cluster.version
    );
}

#[test]
#[ignore = "needs a real kube-apiserver: scripts/test.sh builds and starts one"]
fn while_moat_is_down_the_backstop_holds_the_outage_table_for_a_tenant() {
    use serde_json::json;
    let cluster = Cluster::from_env();
    // moat is down: the install's webhooks name the Service of a Deployment no kubelet runs, so
    // every call fails and, failing open, leaves the request to the backstop.
    cluster.remove_moat();
    cluster.kubectl(&["apply", "-f", "-"], Some(&install(&[])));
    // The reserved runtime exists, as on a node that has runc (else the RuntimeClass admission
    // plugin refuses its pods before any policy sees them).
    let runc = r#"{"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "runc"}, "handler": "runc"}"#;
    cluster.kubectl(&["apply", "-f", "-"], Some(runc.as_bytes()));
    let ns = cluster.tenant_namespace("moat-outage");
    wait_for_backstop(&cluster, &ns, true);
    let mut faults = Vec::new();
    let mut row = |name: &str, expect: Expect, out: Output| {
        if let Some(f) = check_row(&cluster, name, expect, &out) {
            faults.push(f);
        }
    };
    let create = |object: &serde_json::Value| {
        cluster.as_tenant(
            &["create", "-n", &ns, "-f", "-"],
            Some(object.to_string().as_bytes()),
        )
    };
    let retry = "if moat is unavailable, retry";

    // A pod that needs none of moat's changes: admitted.
    row(
        "a pinned pod in a permitted runtime",
        Expect::Admitted,
        create(&pod("pinned", json!({}))),
    );
    let mut placed = pod("placed", json!({"runtimeClassName": null}));
    placed["metadata"]["labels"] = json!({"moat.dev/class": "untrusted"});
    let placed = mutated_by_moat(&placed, &ns);
    row(
        "a pod of class untrusted with moat's placement written",
        Expect::Admitted,
        create(&placed),
    );

    // A pod that needs moat's changes: refused, with a message to retry.
    row(
        "a pod with no runtime (moat sets the fallback)",
        Expect::Refused("moat-runtimeclass", retry),
        create(&pod("no-runtime", json!({"runtimeClassName": null}))),
    );
    let mut unplaced = pod("unplaced", json!({}));
    unplaced["metadata"]["labels"] = json!({"moat.dev/class": "untrusted"});
    row(
        "a pod of class untrusted without its placement",
        Expect::Refused("moat-isolation", retry),
        create(&unplaced),
    );

    // A pod moat would refuse: refused.
    for (name, spec, text) in [
        (
            "untagged",
            json!({"containers": [{"name": "app", "image": "busybox"}]}),
            "has no tag",
        ),
        (
            "latest",
            json!({"containers": [{"name": "app", "image": "busybox:latest"}]}),
            "mutable tag",
        ),
        (
            "init-latest",
            json!({"initContainers": [{"name": "init", "image": "busybox:latest"}]}),
            "mutable tag",
        ),
        (
            "volume-latest",
            json!({"volumes": [{"name": "data", "image": {"reference": "registry.example/data:latest"}}]}),
            "mutable tag",
        ),
        (
            "bad-reference",
            json!({"containers": [{"name": "app", "image": "Registry.example/App:1.0"}]}),
            "not a valid reference",
        ),
    ] {
        row(
            &format!("a pod: {name}"),
            Expect::Refused("moat-images", text),
            create(&pod(name, spec)),
        );
    }
    row(
        "a pinned image volume",
        Expect::Admitted,
        create(&pod(
            "volume-pinned",
            json!({"volumes": [{"name": "data", "image": {"reference": "registry.example/data:1.0"}}]}),
        )),
    );
    row(
        "a pod in the reserved runtime runc",
        Expect::Refused("moat-runtimeclass", retry),
        create(&pod("runc", json!({"runtimeClassName": "runc"}))),
    );
    let mut undeclared = pod("undeclared", json!({}));
    undeclared["metadata"]["labels"] = json!({"moat.dev/class": "secret"});
    row(
        "a pod of an undeclared class",
        Expect::Refused("moat-isolation", "is not declared"),
        create(&undeclared),
    );
    row(
        "a pod that tolerates the isolation taint",
        Expect::Refused("moat-isolation", "tolerates moat's isolation taint"),
        create(&pod(
            "tolerates",
            json!({"tolerations": [{"key": "moat.dev/isolated", "operator": "Exists"}]}),
        )),
    );
    row(
        "a pod bound to a node by name",
        Expect::Refused("moat-isolation", "spec.nodeName"),
        create(&pod("by-name", json!({"nodeName": "node-1"}))),
    );

    // Pod UPDATEs: admitted unless they change what moat forbids.
    let label = |pod: &str, kv: &str| {
        cluster.as_tenant(&["label", "-n", &ns, "pod", pod, kv, "--overwrite"], None)
    };
    row(
        "a label added to a running pod",
        Expect::Admitted,
        label("pinned", "team=a"),
    );
    row(
        "the class label changed on a running pod",
        Expect::Refused("moat-isolation", "cannot change"),
        label("placed", "moat.dev/class=other"),
    );
    row(
        "a class label added to a running pod",
        Expect::Refused("moat-isolation", "cannot change"),
        label("pinned", "moat.dev/class=untrusted"),
    );
    row(
        "a toleration of the isolation taint added to a running pod",
        Expect::Refused("moat-isolation", "tolerates moat's isolation taint"),
        cluster.as_tenant(
            &["patch", "-n", &ns, "pod", "pinned", "--type=json", "-p",
              r#"[{"op":"add","path":"/spec/tolerations/-","value":{"key":"moat.dev/isolated","operator":"Exists","effect":"NoSchedule"}}]"#],
            None,
        ),
    );
    // The kubelet's status report (as the admin: tenants cannot write status).
    row(
        "a status report",
        Expect::Admitted,
        cluster.try_kubectl(
            &["patch", "-n", &ns, "pod", "pinned", "--subresource=status", "--type=merge", "-p",
              r#"{"status":{"conditions":[{"type":"PodScheduled","status":"False","reason":"Unschedulable"}]}}"#],
            None,
        ),
    );
    // Ephemeral containers, through their subresource, as `kubectl debug` adds them.
    let debug = |image: &str, name: &str| {
        cluster.as_tenant(
            &[
                "debug",
                "-n",
                &ns,
                "pinned",
                "--attach=false",
                "--image",
                image,
                "-c",
                name,
            ],
            None,
        )
    };
    row(
        "an ephemeral container with a pinned image",
        Expect::Admitted,
        debug("registry.example/debug:1.0", "debug-pinned"),
    );
    row(
        "an ephemeral container with a mutable tag",
        Expect::Refused("moat-images", "mutable tag"),
        debug("busybox:latest", "debug-latest"),
    );

    // Exempt namespaces are never sent to the backstop (the admin writes kube-system).
    row(
        "an unpinned pod in kube-system",
        Expect::Admitted,
        cluster.try_kubectl(
            &["create", "--dry-run=server", "-n", "kube-system", "-f", "-"],
            Some(pod("exempt", json!({"containers": [{"name": "app", "image": "busybox"}], "runtimeClassName": null})).to_string().as_bytes()),
        ),
    );

    // Workloads: their templates are checked as the webhook checks them.
    let deployment = |name: &str, spec: serde_json::Value| {
        let template = pod(name, spec);
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": template["spec"]},
            },
        })
    };
    row(
        "a pinned Deployment",
        Expect::Admitted,
        create(&deployment("pinned", json!({}))),
    );
    row(
        "a Deployment with a mutable init container",
        Expect::Refused("moat-images-workloads", "mutable tag"),
        create(&deployment(
            "init-latest",
            json!({"initContainers": [{"name": "init", "image": "busybox:latest"}]}),
        )),
    );
    // A reserved runtime with a fallback is moat's to rewrite in each pod, as the webhook
    // does; the pods are refused until moat is back.
    row(
        "a Deployment in the reserved runtime runc (moat rewrites its pods)",
        Expect::Admitted,
        create(&deployment("runc", json!({"runtimeClassName": "runc"}))),
    );
    row(
        "a Deployment of an undeclared class",
        Expect::Refused("moat-isolation-workloads", "is not declared"),
        create(&{
            let mut d = deployment("undeclared", json!({}));
            d["spec"]["template"]["metadata"]["labels"]["moat.dev/class"] = json!("secret");
            d
        }),
    );
    let cronjob = json!({
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never", "runtimeClassName": "gvisor",
            "containers": [{"name": "job", "image": "busybox:latest"}],
        }}}}},
    });
    row(
        "a CronJob with a mutable tag",
        Expect::Refused("moat-images-cronjobs", "mutable tag"),
        create(&cronjob),
    );
    row(
        "a pinned Deployment scaled",
        Expect::Admitted,
        cluster.as_tenant(
            &["scale", "-n", &ns, "deployment", "pinned", "--replicas=2"],
            None,
        ),
    );
    row(
        "a Deployment whose pods need moat's runtime",
        Expect::Admitted,
        create(&deployment("no-runtime", json!({"runtimeClassName": null}))),
    );
    cluster.kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
    assert!(
        faults.is_empty(),
        "the outage table does not hold:\n{}",
        faults.join("\n")
    );
}

/// The Pod and workload CREATEs the API servers sent (`shared/fixtures`, kept in the repository
/// beside the server's tests), each object with what the API server itself sets on creation
/// removed (names, uids, owners, status).
fn captured_objects() -> Vec<(String, serde_json::Value)> {
    let data = format!("{}/../moat-server/tests/data", env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = ["kube-apiserver-1.26", "kube-apiserver-1.34"]
        .iter()
        .flat_map(|v| {
            let dir = format!("{data}/{v}");
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"))
        })
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let review: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let request = &review["request"];
        if request["operation"] != "CREATE" || request["object"].is_null() {
            continue;
        }
        let mut object = request["object"].clone();
        let Some(meta) = object["metadata"].as_object_mut() else {
            continue;
        };
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
            "ownerReferences",
            "generateName",
            "namespace",
            "generation",
        ] {
            meta.remove(k);
        }
        meta.insert(
            "name".to_owned(),
            serde_json::json!(format!("f{}", out.len())),
        );
        if let Some(o) = object.as_object_mut() {
            o.remove("status");
        }
        out.push((
            file.file_name().unwrap().to_string_lossy().into_owned(),
            object,
        ));
    }
    out
}

/// A few hundred pods from a seeded generator over what tenants vary: images of every kind
/// and spelling, runtimes, class labels, tolerations, node names, schedulers; every third one
/// as moat's mutating webhook would have written it.
fn generated_pods(
    config: &moat_core::config::Config,
    ns: &str,
    n: usize,
    seed: u64,
) -> Vec<(String, serde_json::Value)> {
    use serde_json::json;
    let mut state = seed;
    let mut pick = |k: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % k
    };
    let images = [
        "registry.example/app:1.0",
        "registry.example/app@sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        "busybox",
        "busybox:latest",
        "docker.io/library/nginx:1.27",
        "REGISTRY.example/app:1.0",
        "registry.example:443/app:1.0",
        "registry.example/App:1.0",
        "ghcr.io/acme/tool:latest",
    ];
    let mut out = Vec::new();
    for i in 0..n {
        let mut spec =
            json!({"containers": [{"name": "app", "image": images[pick(images.len())]}]});
        match pick(3) {
            0 => {}
            1 => {
                spec["initContainers"] =
                    json!([{"name": "init", "image": images[pick(images.len())]}])
            }
            _ => {
                spec["volumes"] =
                    json!([{"name": "data", "image": {"reference": images[pick(images.len())]}}])
            }
        }
        match pick(4) {
            0 => {}
            1 | 2 => spec["runtimeClassName"] = json!("gvisor"),
            _ => spec["runtimeClassName"] = json!("runc"),
        }
        match pick(4) {
            0 => spec["tolerations"] = json!([{"key": "moat.dev/isolated", "operator": "Exists"}]),
            1 => spec["tolerations"] = json!([{"key": "other", "operator": "Exists"}]),
            _ => {}
        }
        if pick(8) == 0 {
            spec["nodeName"] = json!("node-1");
        }
        match pick(8) {
            0 => spec["schedulerName"] = json!("other-scheduler"),
            1 => spec["schedulerName"] = json!("default-scheduler"),
            _ => {}
        }
        let labels = match pick(5) {
            0 | 1 => json!({}),
            2 => json!({"moat.dev/class": "untrusted"}),
            3 => json!({"moat.dev/class": "secret"}),
            _ => json!({"moat.dev/class": "Bad_Name"}),
        };
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("g{i}"), "labels": labels}, "spec": spec});
        if pick(3) == 0 {
            let template = moat_core::subject::Template::from_value(&pod)
                .unwrap()
                .unwrap();
            let labels = std::collections::BTreeMap::new();
            let decision = moat_core::engine::decide(
                config,
                &request(&template, ns, &labels, moat_core::decision::Stage::Mutate),
            );
            if decision.allowed() {
                json_patch::patch(&mut pod, &decision.patch).unwrap();
            }
        }
        out.push((format!("generated {i}"), pod));
    }
    out
}

/// A dry-run CREATE as the admin (the identity of the test's kubeconfig).
fn request<'a>(
    template: &'a moat_core::subject::Template,
    ns: &'a str,
    labels: &'a std::collections::BTreeMap<String, String>,
    stage: moat_core::decision::Stage,
) -> moat_core::decision::Request<'a> {
    moat_core::decision::Request {
        operation: moat_core::decision::Operation::Create,
        stage,
        object: Some(template),
        old_object: None,
        namespace: ns,
        namespace_labels: Some(labels),
        dry_run: true,
        requester: Some(moat_core::decision::Requester {
            username: "moat-test-admin",
        }),
        placement_seed: "uid",
    }
}

/// POSTs `object` to its collection in `ns` as a server-side dry run: the object the API
/// server would store, or its refusal.
async fn dry_run_create(
    client: &kube::Client,
    ns: &str,
    object: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let api_version = object["apiVersion"].as_str().unwrap();
    let kind = object["kind"].as_str().unwrap();
    let base = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let plural = format!("{}s", kind.to_ascii_lowercase());
    let request = http::Request::post(format!("{base}/namespaces/{ns}/{plural}?dryRun=All"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(object).unwrap())
        .unwrap();
    match client.request::<serde_json::Value>(request).await {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(status)) => Err(format!("{status:?}")),
        Err(e) => panic!("the API server did not answer: {e}"),
    }
}

#[test]
#[ignore = "needs a real kube-apiserver: scripts/test.sh builds and starts one"]
fn the_real_api_server_under_the_backstop_decides_as_moats_validate_stage() {
    let cluster = Cluster::from_env();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(kube::Client::try_default()).unwrap();
    let ns = cluster.tenant_namespace("moat-equivalence");
    let labels: std::collections::BTreeMap<String, String> =
        [("kubernetes.io/metadata.name".to_owned(), ns.clone())].into();
    let runc = r#"{"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "runc"}, "handler": "runc"}"#;
    cluster.kubectl(&["apply", "-f", "-"], Some(runc.as_bytes()));
    let mut compared = 0;
    let mut refused = 0;
    let mut faults = Vec::new();
    let mut skipped = std::collections::BTreeMap::<String, usize>::new();
    for (name, args) in configurations() {
        let file = args
            .iter()
            .position(|a| a == "--config")
            .map(|i| args[i + 1].clone());
        let config = match &file {
            Some(f) => {
                moat_core::config::Config::from_yaml(&std::fs::read_to_string(f).unwrap()).unwrap()
            }
            None => moat_core::config::Config::embedded_default(),
        };
        let mut corpus = captured_objects();
        corpus.extend(generated_pods(&config, &ns, 150, 7 + compared as u64));
        // What the policies see: each object as the API server admits it with no policy (its
        // defaults and admission plugins applied).
        cluster.remove_moat();
        wait_for_backstop(&cluster, &ns, false);
        let seen: Vec<(String, Option<serde_json::Value>)> = runtime.block_on(async {
            let mut out = Vec::new();
            for (case, object) in &corpus {
                let admitted = dry_run_create(&client, &ns, object).await;
                if let Err(e) = &admitted {
                    let why: String = e.chars().take(200).collect();
                    *skipped.entry(why).or_insert(0) += 1;
                }
                out.push((case.clone(), admitted.ok()));
            }
            out
        });
        // The backstop alone: the install's policies and bindings, no webhooks.
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let manifests = String::from_utf8(install(&args)).unwrap();
        let policies: Vec<&str> = manifests
            .split("\n---\n")
            .filter(|d| {
                d.contains("kind: ValidatingAdmissionPolicy\n")
                    || d.contains("kind: ValidatingAdmissionPolicyBinding\n")
                    || d.contains("kind: RuntimeClass\n")
            })
            .collect();
        cluster.kubectl(
            &["apply", "-f", "-"],
            Some(policies.join("\n---\n").as_bytes()),
        );
        wait_for_backstop(&cluster, &ns, true);
        runtime.block_on(async {
            for ((case, object), (_, admitted)) in corpus.iter().zip(&seen) {
                // An object the API server refuses on its own is no test of the policies.
                let Some(admitted) = admitted else { continue };
                let template = moat_core::subject::Template::from_value(admitted)
                    .unwrap()
                    .unwrap();
                let decision = moat_core::engine::decide(
                    &config,
                    &request(
                        &template,
                        &ns,
                        &labels,
                        moat_core::decision::Stage::Validate,
                    ),
                );
                let moat: Vec<&str> = decision
                    .denials
                    .iter()
                    .map(|d| d.message.as_str())
                    .collect();
                let api = dry_run_create(&client, &ns, object).await;
                compared += 1;
                match (&api, moat.is_empty()) {
                    (Ok(_), true) => {}
                    (Err(e), false) if e.contains("ValidatingAdmissionPolicy 'moat-") => {
                        refused += 1
                    }
                    _ => faults.push(format!(
                        "{name}: {case}: the API server {}, moat {moat:?}\n  object: {admitted}",
                        match &api {
                            Ok(_) => "admits".to_owned(),
                            Err(e) => format!("refuses: {e}"),
                        }
                    )),
                }
            }
        });
    }
    cluster.remove_moat();
    cluster.kubectl(&["delete", "namespace", &ns, "--wait=false"], None);
    assert!(
        faults.is_empty(),
        "{} of {compared} verdicts differ on {}:\n{}",
        faults.len(),
        cluster.version,
        faults.join("\n")
    );
    assert!(
        compared > 400 && refused > 100 && compared - refused > 50,
        "{compared} compared, {refused} refused: the corpus exercises both verdicts"
    );
    eprintln!(
        "{compared} verdicts compared on {}, {refused} refusals; refused by the API server itself: {skipped:#?}",
        cluster.version
    );
}
