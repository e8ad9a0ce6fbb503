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
    }
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
            doc.contains("name: moat-images") && doc.contains("kind: ValidatingAdmissionPolicy\n")
        })
        .collect();
    assert_eq!(images.len(), 1, "one moat-images policy in the output");
    cluster.kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(images[0].as_bytes()),
    );
}
