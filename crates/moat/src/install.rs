//! `moat install`: every manifest an operator applies, from the same configuration the server
//! will run with.
//!
//! Each object is written as JSON and passed through its `k8s_openapi` type: a field the type
//! does not know would be dropped on the way, so [`typed`] refuses any object that does not come
//! back unchanged. The output is valid Kubernetes objects only.

use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use moat_core::config::Config;
use moat_identity::defaults as identity_defaults;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const NAME: &str = "moat";
const REVIEW_PORT: u16 = 8443;
const METRICS_PORT: u16 = 9090;
/// The webhook timeout the API server applies (`timeoutSeconds`), from the server's limits.
const WEBHOOK_TIMEOUT_SECONDS: i32 = moat_server::limits::WEBHOOK_TIMEOUT.as_secs() as i32;
/// An unprivileged uid/gid: the image's own `User` (scripts/build-image.py), with an account
/// named moat in its /etc/passwd.
const RUN_AS_ID: i64 = 65532;
/// The image `scripts/build-image.sh` builds and names, tagged with this crate's version.
///
/// Fully qualified on purpose: the CRI plugin of containerd (and so the kubelet) reads an
/// unqualified `moat:TAG` as an image of the Docker Hub library namespace, which an imported
/// archive named `moat:TAG` is not, so the node would try to pull it. `localhost/` names an
/// image that exists only where it was built or imported (podman names local builds so), and a
/// node without it fails to pull instead of fetching something else from the internet.
pub const DEFAULT_IMAGE: &str = concat!("localhost/moat:", env!("CARGO_PKG_VERSION"));

/// What the API server does when moat cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Refuse the request (fail closed). The default: an unavailable moat admits nothing it
    /// would have refused. Its own namespace and kube-system are never sent to it, so the
    /// cluster can always recover.
    Fail,
    /// Admit the request unreviewed (fail open).
    Ignore,
}

/// Arguments of `moat install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Configuration file (YAML or JSON) to install. Default: the embedded one.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Namespace moat runs in (exempt from its own webhooks).
    #[arg(long, default_value = "moat-system", value_name = "NS")]
    namespace: String,
    /// Container image of moat. The default is what scripts/build-image.sh builds.
    #[arg(long, default_value = DEFAULT_IMAGE, value_name = "IMAGE")]
    image: String,
    /// Server replicas (at least 2, so a node drain never leaves the webhook unanswered).
    #[arg(long, default_value_t = 2, value_name = "N")]
    replicas: i32,
    /// What the API server does when moat cannot answer. Default: `ignore` with the backstop
    /// (the API server's own policies refuse what moat would have refused, so an outage stops
    /// nothing else), `fail` without it.
    #[arg(long, value_enum)]
    failure_policy: Option<FailurePolicy>,
    /// Leave out the backstop: the ValidatingAdmissionPolicies (Kubernetes 1.30 or later)
    /// compiled from the same configuration, which the API server evaluates itself, so moat's
    /// rules hold while moat is down without failing every request. Only for clusters older than
    /// 1.30; the webhooks then fail closed by default.
    #[arg(long)]
    no_backstop: bool,
    /// The runtime handler (containerd's runtime name on the nodes) of a RuntimeClass the
    /// configuration names, as NAME=HANDLER. Repeatable. Default: `gvisor=runsc`, and a
    /// RuntimeClass's own name for any other.
    #[arg(long = "runtime-handler", value_name = "NAME=HANDLER")]
    runtime_handlers: Vec<String>,
    /// Do not install the RuntimeClasses the configuration names (the fallback runtime and the
    /// classes' runtimes): when the cluster already defines them. Without them, every pod moat
    /// sends to a RuntimeClass is refused by the API server.
    #[arg(long)]
    no_runtime_classes: bool,
    /// Let cert-manager issue the serving certificate and inject the CA, instead of a Secret
    /// generated now (which puts a private key in the output).
    #[arg(long)]
    cert_manager: bool,
    /// Let moat renew its own certificates (no cert-manager): the generated Secret then also
    /// holds the CA's private key, and moat gets RBAC to update that one Secret, a Lease, and
    /// the caBundle of its two webhook configurations. See docs/server.md, "Certificate
    /// lifecycle".
    #[arg(long, conflicts_with = "cert_manager")]
    rotate_certs: bool,
    /// Also write the API server's ImagePolicyWebhook admission configuration and kubeconfig
    /// into this directory.
    #[arg(long, value_name = "DIR")]
    image_policy_dir: Option<PathBuf>,
    /// The URL the API server calls for ImageReview (ImagePolicyWebhook runs in the API server,
    /// which often cannot resolve cluster DNS: give a Service IP or node address then).
    #[arg(long, value_name = "URL")]
    image_policy_url: Option<String>,
    /// Make the ImagePolicyWebhook fail closed (`defaultAllow: false`). Beware: the API server
    /// then refuses every pod in the cluster, kube-system and moat's own included, while moat
    /// is unreachable, so moat cannot even restart itself. By default it fails open: the
    /// admission webhooks, which skip moat's own and the exempt namespaces, already enforce the
    /// image rule fail-closed.
    #[arg(long, requires = "image_policy_dir")]
    image_policy_fail_closed: bool,
    /// Addresses (CIDRs) that may reach the review port: the API server's, as its connections
    /// to webhooks appear in the pod network (often the control-plane nodes' addresses). Given
    /// once or more, the installed NetworkPolicy admits only them, so tenant pods cannot reach
    /// moat at all; without it the review port stays open to every source. Add the nodes' CIDR
    /// too if your network plugin applies policies to the kubelet's probes.
    #[arg(long = "apiserver-cidr", value_name = "CIDR")]
    apiserver_cidrs: Vec<String>,
    /// A namespace whose pods may scrape the metrics ports of moat and of the identity agent
    /// (your Prometheus'), by its `kubernetes.io/metadata.name` label, which only the API
    /// server sets. Repeatable. With neither this nor `--metrics-cidr` the installed
    /// NetworkPolicies admit no scraper: the ports are bounded (few connections, short
    /// timeouts) but a tenant has no business reaching them.
    #[arg(long = "metrics-namespace", value_name = "NS")]
    metrics_namespaces: Vec<String>,
    /// Addresses (CIDRs) that may scrape the metrics ports (a scraper outside the cluster).
    /// Repeatable.
    #[arg(long = "metrics-cidr", value_name = "CIDR")]
    metrics_cidrs: Vec<String>,
    /// The CA (PEM file) that signs the API server's client certificate for webhooks (what its
    /// AdmissionConfiguration's kubeconfig presents): moat then reviews only for clients with
    /// that certificate. Installed as a ConfigMap and passed to `moat serve --client-ca`.
    #[arg(long, value_name = "FILE")]
    apiserver_client_ca: Option<PathBuf>,
    /// Also install the node identity agent (a DaemonSet on every node, in its own namespace).
    #[arg(long)]
    identity_agent: bool,
    /// Namespace of the identity agent (it needs host paths, so its namespace allows
    /// privileged pods; the admission webhooks skip it).
    #[arg(
        long,
        default_value = "moat-node",
        value_name = "NS",
        requires = "identity_agent"
    )]
    identity_namespace: String,
    /// The runtime's NRI socket on each node.
    #[arg(
        long,
        default_value = identity_defaults::NRI_SOCKET,
        value_name = "PATH",
        requires = "identity_agent"
    )]
    nri_socket: String,
    /// The SPIRE agent's admin socket on each node (its `admin_socket_path`).
    #[arg(
        long,
        default_value = identity_defaults::SPIRE_ADMIN_SOCKET,
        value_name = "PATH",
        requires = "identity_agent"
    )]
    spire_admin_socket: String,
    /// containerd's NRI `plugin_request_timeout` on the nodes (containerd 1.7 does not tell
    /// plugins; the agent answers within it so no annotated container starts without identity).
    #[arg(
        long,
        default_value = identity_defaults::RUNTIME_REQUEST_TIMEOUT_FLAG,
        value_name = "DURATION",
        requires = "identity_agent"
    )]
    runtime_request_timeout: moat_identity::plugin::RequestTimeout,
    /// containerd's bundle directory for Kubernetes containers on the nodes (the agent reads
    /// each container's user from its OCI spec there).
    #[arg(
        long,
        default_value = identity_defaults::RUNTIME_BUNDLE_DIR,
        value_name = "DIR",
        requires = "identity_agent"
    )]
    runtime_bundle_dir: String,
    /// Karpenter NodePools and warm capacity (docs/capacity.md).
    #[command(flatten)]
    capacity: crate::capacity::CapacityArgs,
}

/// Where the identity agent keeps per-container files on each node: the same path inside the
/// agent's container, because the runtime bind-mounts them by host path.
const IDENTITY_ARTIFACT_DIR: &str = identity_defaults::ARTIFACT_DIR;
const IDENTITY_NAME: &str = "moat-identity-agent";
const IDENTITY_METRICS_PORT: u16 = identity_defaults::METRICS_PORT;

/// Converts `v` through `T` and back; refuses it if anything changed (an unknown or misspelt
/// field, a wrong type).
pub(crate) fn typed<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, String> {
    let kind = v["kind"].as_str().unwrap_or_default().to_owned();
    let t: T = serde_json::from_value(v.clone()).map_err(|e| format!("{kind}: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{kind}: {e}"))?;
    if back != v {
        return Err(format!(
            "{kind}: object does not round-trip through its Kubernetes type"
        ));
    }
    Ok(back)
}

/// The manifests and, when asked, the API server files.
#[derive(Debug)]
pub struct Install {
    pub objects: Vec<Value>,
    /// (file name, contents) for `--image-policy-dir`.
    pub image_policy_files: Vec<(String, String)>,
}

/// Builds every manifest.
///
/// # Errors
/// A message naming what is wrong with the arguments or configuration.
pub fn manifests(args: &InstallArgs, config: &Config) -> Result<Install, String> {
    let InstallArgs {
        namespace: ns,
        image,
        replicas,
        failure_policy,
        cert_manager,
        rotate_certs,
        image_policy_url,
        identity_agent,
        identity_namespace,
        ..
    } = args;
    if *replicas < 2 {
        return Err(format!(
            "--replicas {replicas}: at least 2, so a drained node never leaves the webhook unanswered"
        ));
    }
    if ns.parse::<moat_core::names::NamespacePattern>().is_err() || ns.contains('*') {
        return Err(format!("--namespace '{ns}' is not a namespace name"));
    }
    let service_dns = [
        format!("{NAME}.{ns}.svc"),
        format!("{NAME}.{ns}.svc.cluster.local"),
        format!("{NAME}.{ns}"),
    ];
    let labels =
        json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "admission"});
    // The node agent asks SPIRE by service account for sandboxed pods, from the annotation moat
    // stamps: installing the agent turns the stamp on.
    let mut config = config.clone();
    if *identity_agent && config.identity.service_account_annotation.is_none() {
        config.identity.service_account_annotation = Some(
            moat_core::config::DEFAULT_SERVICE_ACCOUNT_ANNOTATION
                .parse()
                .map_err(|e| format!("{e}"))?,
        );
    }
    let config = &config;
    let config_yaml = serde_yaml_ng::to_string(config).map_err(|e| e.to_string())?;
    let watch_namespaces = moat_server::namespaces::needed(config);
    let secret_name = format!("{NAME}-tls");
    let api_access = watch_namespaces || *rotate_certs;

    let mut objects = vec![
        typed::<Namespace>(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }},
        }))?,
        typed::<ServiceAccount>(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": ns, "labels": labels},
            "automountServiceAccountToken": api_access,
        }))?,
    ];
    if watch_namespaces {
        // Least privilege: read namespace metadata, nothing else, and only when the
        // configuration binds classes by namespace label.
        objects.push(typed::<ClusterRole>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": format!("{NAME}-namespace-reader"), "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}],
        }))?);
        objects.push(typed::<ClusterRoleBinding>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{NAME}-namespace-reader"), "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{NAME}-namespace-reader")},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
        }))?);
    }
    if *rotate_certs {
        objects.extend(rotation_rbac(ns, &secret_name, &labels)?);
    }
    objects.push(typed::<ConfigMap>(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("{NAME}-config"), "namespace": ns, "labels": labels},
        "data": {"config.yaml": config_yaml},
    }))?);

    let (ca_pem, tls_objects) = if *cert_manager {
        let objects = vec![
            json!({
                "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
                "metadata": {"name": format!("{NAME}-selfsigned"), "namespace": ns, "labels": labels},
                "spec": {"selfSigned": {}},
            }),
            json!({
                "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                "metadata": {"name": format!("{NAME}-tls"), "namespace": ns, "labels": labels},
                "spec": {
                    "secretName": format!("{NAME}-tls"),
                    "dnsNames": service_dns,
                    "duration": "2160h", "renewBefore": "720h",
                    "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                    "issuerRef": {"name": format!("{NAME}-selfsigned"), "kind": "Issuer"},
                },
            }),
        ];
        (None, objects)
    } else {
        let g = moat_server::certs::generate(&service_dns).map_err(|e| e.to_string())?;
        let mut data =
            json!({"tls.crt": g.cert_pem, "tls.key": g.key_pem, "ca.crt": g.ca_cert_pem});
        if *rotate_certs {
            // The price of renewing without cert-manager: the CA's key lives in the Secret.
            data["ca.key"] = json!(g.ca_key_pem);
        }
        let secret = typed::<Secret>(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": secret_name, "namespace": ns, "labels": labels},
            "stringData": data,
        }))?;
        (Some(g.ca_cert_pem), vec![secret])
    };
    objects.extend(tls_objects);

    let rotation = rotate_certs.then_some(Rotation {
        secret: &secret_name,
        dns_names: &service_dns,
    });
    let mut moat = deployment(ns, image, *replicas, &labels, api_access, rotation);
    if let Some(path) = &args.apiserver_client_ca {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("--apiserver-client-ca {}: {e}", path.display()))?;
        moat_server::tls::client_verifier(path)
            .map_err(|e| format!("--apiserver-client-ca: {e}"))?;
        objects.push(typed::<ConfigMap>(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{NAME}-client-ca"), "namespace": ns, "labels": labels},
            "data": {"ca.crt": pem},
        }))?);
        require_client_certificates(&mut moat);
    }
    objects.push(typed::<Deployment>(moat)?);
    let scrapers = scrapers(&args.metrics_namespaces, &args.metrics_cidrs)?;
    objects.push(typed::<NetworkPolicy>(network_policy(
        ns,
        &labels,
        &args.apiserver_cidrs,
        &scrapers,
    )?)?);
    objects.push(typed::<PodDisruptionBudget>(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
    }))?);
    objects.push(typed::<Service>(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }))?);

    let agent_ns = identity_agent.then_some(identity_namespace.as_str());
    // With the backstop, the API server refuses on its own what moat would have refused, so the
    // webhooks can fail open: an outage then stops only pods that needed moat's changes (they
    // are refused with a message to retry), never anything else.
    let backstop = !args.no_backstop;
    let failure_policy = failure_policy.unwrap_or(if backstop {
        FailurePolicy::Ignore
    } else {
        FailurePolicy::Fail
    });
    // The backstop re-checks every final pod as the validating webhook would (tested for
    // equivalence), so with it the validating webhook reviews only workload templates: one call
    // per pod fewer on the API server's path. dedicatedNode mode keeps it for pods, since the
    // namespace binding of a dedicated node id is one rule the backstop cannot express.
    let pods_validated =
        !backstop || config.isolation.mode == moat_core::config::IsolationMode::DedicatedNode;
    let (mutating, validating) = webhooks(
        config,
        &WebhookOptions {
            ns,
            agent_ns,
            ca_pem: ca_pem.as_deref(),
            failure_policy,
            cert_manager: *cert_manager,
            labels: &labels,
            pods_validated,
        },
    );
    objects.push(typed::<MutatingWebhookConfiguration>(mutating)?);
    objects.push(typed::<ValidatingWebhookConfiguration>(validating)?);
    if !args.no_runtime_classes {
        objects.extend(runtime_classes(config, &args.runtime_handlers)?);
    }
    if backstop {
        let mut also_exempt = vec![ns.as_str(), "kube-system"];
        also_exempt.extend(agent_ns);
        let compiled = moat_objects::backstop::compile(config, &also_exempt)
            .map_err(|e| format!("compiling the backstop: {e}"))?;
        for policy in compiled.policies {
            objects.push(serde_json::to_value(policy).map_err(|e| e.to_string())?);
        }
        for binding in compiled.bindings {
            objects.push(serde_json::to_value(binding).map_err(|e| e.to_string())?);
        }
    }
    // After the webhook configurations that exempt its namespace: applied over an earlier
    // install, whose webhooks do not know that namespace yet, the agent's DaemonSet (which
    // tolerates every taint, isolation's included) would otherwise be refused by them.
    if *identity_agent {
        objects.extend(identity_agent_objects(args, image, &config_yaml)?);
    }
    // After the webhooks: the placeholders' pods are then reviewed like any other.
    objects.extend(
        moat_objects::capacity::objects(config, &args.capacity.clone().into())
            .map_err(|e| e.to_string())?,
    );

    let image_policy_files = match (&args.image_policy_dir, &ca_pem) {
        (None, _) => Vec::new(),
        (Some(_), None) => return Err(
            "--image-policy-dir needs the generated CA; it cannot be combined with --cert-manager"
                .to_owned(),
        ),
        (Some(dir), Some(ca)) => {
            let url = image_policy_url
                .clone()
                .unwrap_or_else(|| format!("https://{NAME}.{ns}.svc:443/imagereview"));
            image_policy(dir, &url, ca, args.image_policy_fail_closed)?
        }
    };
    Ok(Install {
        objects,
        image_policy_files,
    })
}

/// The NetworkPolicy peers that may scrape the metrics ports: `--metrics-namespace` and
/// `--metrics-cidr`. Empty: none may.
fn scrapers(namespaces: &[String], cidrs: &[String]) -> Result<Vec<Value>, String> {
    let mut peers = Vec::new();
    for ns in namespaces {
        // A namespace name is a DNS label: lower-case letters, digits and '-', at most 63.
        let label = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !label {
            return Err(format!(
                "--metrics-namespace '{ns}' is not a namespace name"
            ));
        }
        peers.push(
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}),
        );
    }
    for c in cidrs {
        valid_cidr(c)
            .ok_or_else(|| format!("--metrics-cidr '{c}' is not a CIDR (e.g. 10.0.0.0/24)"))?;
        peers.push(json!({"ipBlock": {"cidr": c}}));
    }
    Ok(peers)
}

/// The ingress rule for a metrics port: only from `scrapers`; none when there are none.
fn metrics_ingress(scrapers: &[Value]) -> Option<Value> {
    (!scrapers.is_empty())
        .then(|| json!({"ports": [{"port": "metrics", "protocol": "TCP"}], "from": scrapers}))
}

/// Ingress to moat's pods: the review port from the API server's CIDRs (from anywhere when none
/// are given), the metrics port from the scrapers only.
fn network_policy(
    ns: &str,
    labels: &Value,
    cidrs: &[String],
    scrapers: &[Value],
) -> Result<Value, String> {
    for c in cidrs {
        valid_cidr(c)
            .ok_or_else(|| format!("--apiserver-cidr '{c}' is not a CIDR (e.g. 10.0.0.0/24)"))?;
    }
    let mut review = json!({"ports": [{"port": "https", "protocol": "TCP"}]});
    if !cidrs.is_empty() {
        review["from"] = cidrs
            .iter()
            .map(|c| json!({"ipBlock": {"cidr": c}}))
            .collect();
    }
    Ok(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": labels},
            "policyTypes": ["Ingress"],
            "ingress": std::iter::once(review).chain(metrics_ingress(scrapers)).collect::<Vec<_>>(),
        },
    }))
}

/// `address/prefix` with a prefix that fits the address family.
fn valid_cidr(c: &str) -> Option<()> {
    let (addr, prefix) = c.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(())
}

/// What the Deployment needs to renew its own certificates.
#[derive(Debug, Clone, Copy)]
struct Rotation<'a> {
    secret: &'a str,
    dns_names: &'a [String],
}

/// A Role for the one Secret and the Lease, a ClusterRole for the two webhook configurations,
/// each by name, and their bindings to moat's service account.
fn rotation_rbac(ns: &str, secret: &str, labels: &Value) -> Result<Vec<Value>, String> {
    let role_name = format!("{NAME}-cert-rotation");
    let lease = moat_server::rotation::lease_name(secret);
    let subjects = json!([{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]);
    Ok(vec![
        typed::<Role>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": role_name, "namespace": ns, "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get", "update"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease], "verbs": ["get", "update"]},
                // RBAC cannot limit create by name (the name is not known until the request is
                // decoded); a create only makes a Lease in moat's own namespace.
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            ],
        }))?,
        typed::<RoleBinding>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": role_name, "namespace": ns, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
            "subjects": subjects,
        }))?,
        typed::<ClusterRole>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": role_name, "labels": labels},
            "rules": [{
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
                "resourceNames": [NAME],
                "verbs": ["get", "patch"],
            }],
        }))?,
        typed::<ClusterRoleBinding>(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": role_name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
            "subjects": subjects,
        }))?,
    ])
}

fn deployment(
    ns: &str,
    image: &str,
    replicas: i32,
    labels: &Value,
    api_access: bool,
    rotation: Option<Rotation<'_>>,
) -> Value {
    let probe = |path: &str, period: i32| json!({"httpGet": {"path": path, "port": "https", "scheme": "HTTPS"}, "periodSeconds": period, "timeoutSeconds": 2, "failureThreshold": 3});
    let mut deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": NAME,
                    "automountServiceAccountToken": api_access,
                    // Spread across nodes so one node's loss never takes every replica.
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"},
                    }]}},
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": labels},
                    }],
                    "securityContext": {
                        "runAsNonRoot": true, "runAsUser": RUN_AS_ID, "runAsGroup": RUN_AS_ID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    // Drain (readiness fails, reviews still answered), in-flight grace, Lease
                    // release: moat_server::limits::TERMINATION_GRACE.
                    "terminationGracePeriodSeconds": moat_server::limits::TERMINATION_GRACE.as_secs(),
                    "containers": [{
                        "name": NAME,
                        "image": image,
                        "args": [
                            "serve",
                            "--config", "/etc/moat/config/config.yaml",
                            "--tls-cert", "/etc/moat/tls/tls.crt",
                            "--tls-key", "/etc/moat/tls/tls.key",
                            "--addr", format!("0.0.0.0:{REVIEW_PORT}"),
                            "--metrics-addr", format!("0.0.0.0:{METRICS_PORT}"),
                            "--log-format", "json",
                        ],
                        "ports": [
                            {"name": "https", "containerPort": REVIEW_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                        ],
                        "readinessProbe": probe("/readyz", 5),
                        "livenessProbe": probe("/healthz", 10),
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "32Mi"},
                            // Derived from every bound a client can make the server hold
                            // (moat_server::limits, docs/server.md#budgets).
                            "limits": {"memory": format!("{}Mi", moat_server::limits::memory_limit_bytes() / (1024 * 1024))},
                        },
                        "securityContext": {
                            "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false,
                            "runAsNonRoot": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "tls", "mountPath": "/etc/moat/tls", "readOnly": true},
                            {"name": "config", "mountPath": "/etc/moat/config", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "tls", "secret": {"secretName": format!("{NAME}-tls")}},
                        {"name": "config", "configMap": {"name": format!("{NAME}-config")}},
                    ],
                },
            },
        },
    });
    if let Some(Rotation { secret, dns_names }) = rotation {
        let pod = &mut deployment["spec"]["template"]["spec"];
        let container = &mut pod["containers"][0];
        let mut args = vec![
            json!("--rotate-certs"),
            json!("--tls-secret"),
            json!(secret),
            // The kubelet expands $(POD_NAME) from the container's environment.
            json!("--pod-name"),
            json!("$(POD_NAME)"),
        ];
        for name in dns_names {
            args.extend([json!("--cert-dns"), json!(name)]);
        }
        if let Some(a) = container["args"].as_array_mut() {
            a.extend(args);
        }
        container["env"] = json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
        // The server reads the serving pair only; the CA's key stays out of the file system
        // (the controller reads it through the API).
        pod["volumes"][0]["secret"]["items"] = json!([
            {"key": "tls.crt", "path": "tls.crt"},
            {"key": "tls.key", "path": "tls.key"},
        ]);
    }
    deployment
}

/// Mounts the API server's client CA and makes the server require its certificate for reviews.
fn require_client_certificates(deployment: &mut Value) {
    let pod = &mut deployment["spec"]["template"]["spec"];
    if let Some(a) = pod["containers"][0]["args"].as_array_mut() {
        a.extend([json!("--client-ca"), json!("/etc/moat/client-ca/ca.crt")]);
    }
    if let Some(m) = pod["containers"][0]["volumeMounts"].as_array_mut() {
        m.push(json!({"name": "client-ca", "mountPath": "/etc/moat/client-ca", "readOnly": true}));
    }
    if let Some(v) = pod["volumes"].as_array_mut() {
        v.push(json!({"name": "client-ca", "configMap": {"name": format!("{NAME}-client-ca")}}));
    }
}

/// The identity agent's namespace, service account and DaemonSet.
fn identity_agent_objects(
    args: &InstallArgs,
    image: &str,
    config_yaml: &str,
) -> Result<Vec<Value>, String> {
    let ns = &args.identity_namespace;
    if ns.parse::<moat_core::names::NamespacePattern>().is_err() || ns.contains('*') {
        return Err(format!(
            "--identity-namespace '{ns}' is not a namespace name"
        ));
    }
    if *ns == args.namespace {
        return Err(
            "--identity-namespace must differ from --namespace: the agent needs host paths, the \
             webhook's namespace stays restricted"
                .to_owned(),
        );
    }
    let socket_dir = |flag: &str, path: &str| -> Result<(String, String), String> {
        let p = std::path::Path::new(path);
        match (p.is_absolute(), p.parent(), p.file_name()) {
            (true, Some(dir), Some(_)) if dir != std::path::Path::new("/") => {
                Ok((dir.display().to_string(), path.to_owned()))
            }
            _ => Err(format!(
                "{flag} '{path}' must be an absolute path to a socket in a directory"
            )),
        }
    };
    let (nri_dir, nri_socket) = socket_dir("--nri-socket", &args.nri_socket)?;
    let (spire_dir, spire_socket) = socket_dir("--spire-admin-socket", &args.spire_admin_socket)?;
    let bundles = &args.runtime_bundle_dir;
    if !std::path::Path::new(bundles).is_absolute() {
        return Err(format!(
            "--runtime-bundle-dir '{bundles}' must be an absolute path"
        ));
    }
    let timeout = format!("{}ms", args.runtime_request_timeout.duration().as_millis());
    let labels =
        json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "identity-agent"});
    Ok(vec![
        typed::<Namespace>(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {
                // hostPath volumes need the privileged level; nothing else here is privileged.
                // No `warn` label: a stricter warn level would print a warning on every apply
                // for the agent's DaemonSet, which needs what it asks for.
                "pod-security.kubernetes.io/enforce": "privileged",
            }},
        }))?,
        typed::<ServiceAccount>(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": IDENTITY_NAME, "namespace": ns, "labels": labels},
            "automountServiceAccountToken": false,
        }))?,
        // The webhook's configuration, byte for byte (a ConfigMap cannot be mounted across
        // namespaces): the agent trusts only the keys moat polices under it.
        typed::<ConfigMap>(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{IDENTITY_NAME}-config"), "namespace": ns, "labels": labels},
            "data": {"config.yaml": config_yaml},
        }))?,
        typed::<DaemonSet>(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": IDENTITY_NAME, "namespace": ns, "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": IDENTITY_NAME,
                        "automountServiceAccountToken": false,
                        // Container PIDs come from the runtime as host PIDs: without an OCI
                        // spec the agent reads /proc/<pid>/status of a runc container to give
                        // the key file to the workload's user.
                        "hostPID": true,
                        "priorityClassName": "system-node-critical",
                        // Every node, isolated and tainted ones included: that is where
                        // untrusted pods run.
                        "tolerations": [{"operator": "Exists"}],
                        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                        "terminationGracePeriodSeconds": 10,
                        "containers": [{
                            "name": "agent",
                            "image": image,
                            "args": [
                                "identity-agent",
                                "--nri-socket", nri_socket,
                                "--spire-admin-socket", spire_socket,
                                "--artifact-dir", IDENTITY_ARTIFACT_DIR,
                                // Must equal containerd's plugin_request_timeout (see
                                // docs/identity-agent.md): 1.7 does not report it.
                                "--runtime-request-timeout", timeout,
                                "--runtime-bundle-dir", bundles,
                                "--metrics-addr", format!("0.0.0.0:{IDENTITY_METRICS_PORT}"),
                                "--config", "/etc/moat/config.yaml",
                                "--log-format", "json",
                            ],
                            "ports": [{"name": "metrics", "containerPort": IDENTITY_METRICS_PORT, "protocol": "TCP"}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "16Mi"},
                                "limits": {"memory": "64Mi"},
                            },
                            // Root for the root-owned sockets and directories, but no other
                            // privilege: CHOWN only, to hand each key to its workload's user.
                            "securityContext": {
                                "runAsUser": 0,
                                "runAsNonRoot": false,
                                "readOnlyRootFilesystem": true,
                                "allowPrivilegeEscalation": false,
                                "privileged": false,
                                "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                            },
                            "volumeMounts": [
                                // Connecting to a socket works on a read-only mount.
                                {"name": "nri", "mountPath": nri_dir, "readOnly": true},
                                {"name": "spire-admin", "mountPath": spire_dir, "readOnly": true},
                                {"name": "artifacts", "mountPath": IDENTITY_ARTIFACT_DIR},
                                // Each container's OCI spec: whose the files are.
                                {"name": "bundles", "mountPath": bundles, "readOnly": true},
                                {"name": "config", "mountPath": "/etc/moat", "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "nri", "hostPath": {"path": nri_dir, "type": "Directory"}},
                            {"name": "spire-admin", "hostPath": {"path": spire_dir, "type": "DirectoryOrCreate"}},
                            {"name": "artifacts", "hostPath": {"path": IDENTITY_ARTIFACT_DIR, "type": "DirectoryOrCreate"}},
                            {"name": "bundles", "hostPath": {"path": bundles, "type": "DirectoryOrCreate"}},
                            {"name": "config", "configMap": {"name": format!("{IDENTITY_NAME}-config")}},
                        ],
                    },
                },
            },
        }))?,
        // The agent's metrics port, from the scrapers only: a flood of it would cost the node
        // its identity agent. The kubelet's liveness probe comes from the node, which the
        // common network plugins admit whatever the policy says.
        typed::<NetworkPolicy>(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": IDENTITY_NAME, "namespace": ns, "labels": labels},
            "spec": {
                "podSelector": {"matchLabels": labels},
                "policyTypes": ["Ingress"],
                "ingress": metrics_ingress(&scrapers(&args.metrics_namespaces, &args.metrics_cidrs)?).into_iter().collect::<Vec<_>>(),
            },
        }))?,
    ])
}

/// The RuntimeClasses the configuration sends pods to: the fallback runtime and every class's
/// runtime (reserved runtimes are the node's own and are not moat's to define).
fn runtime_classes(config: &Config, handlers: &[String]) -> Result<Vec<Value>, String> {
    let mut mapping: std::collections::BTreeMap<&str, &str> =
        std::collections::BTreeMap::from([("gvisor", "runsc")]);
    for h in handlers {
        let (name, handler) = h
            .split_once('=')
            .filter(|(n, h)| !n.is_empty() && !h.is_empty())
            .ok_or_else(|| format!("--runtime-handler '{h}': expected NAME=HANDLER"))?;
        // A handler is a DNS label (the API server refuses anything else).
        if !handler
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "--runtime-handler '{h}': '{handler}' is not a valid handler name"
            ));
        }
        mapping.insert(name, handler);
    }
    let names: std::collections::BTreeSet<&str> = config
        .runtime_class
        .fallback_runtime
        .iter()
        .chain(
            config
                .isolation
                .classes
                .iter()
                .filter_map(|c| c.runtime_class_name.as_ref()),
        )
        .map(|r| r.as_str())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let handler = mapping.get(name).copied().unwrap_or(name);
            typed::<k8s_openapi::api::node::v1::RuntimeClass>(json!({
                "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": NAME}},
                "handler": handler,
            }))
        })
        .collect()
}

/// How the webhook configurations are written.
struct WebhookOptions<'a> {
    ns: &'a str,
    agent_ns: Option<&'a str>,
    ca_pem: Option<&'a str>,
    failure_policy: FailurePolicy,
    cert_manager: bool,
    labels: &'a Value,
    /// Whether the validating webhook reviews pods (not when the backstop does).
    pods_validated: bool,
}

fn webhooks(config: &Config, options: &WebhookOptions<'_>) -> (Value, Value) {
    let &WebhookOptions {
        ns,
        agent_ns,
        ca_pem,
        failure_policy,
        cert_manager,
        labels,
        pods_validated,
    } = options;
    // Never send moat its own namespace or kube-system, so the cluster cannot lock itself out;
    // exact exempt names from the configuration are skipped here too (patterns are applied by
    // moat itself).
    let mut exempt: Vec<String> = vec![ns.to_owned(), "kube-system".to_owned()];
    // The node agent must run on every node as it is (no sandboxed runtime, no isolation).
    exempt.extend(agent_ns.map(str::to_owned));
    for p in &config.exemptions.namespaces {
        if !p.as_str().contains('*') && !exempt.iter().any(|e| e == p.as_str()) {
            exempt.push(p.to_string());
        }
    }
    let namespace_selector = json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": exempt}]});
    let client = |path: &str| {
        let mut c = json!({"service": {"name": NAME, "namespace": ns, "path": path, "port": 443}});
        if let Some(ca) = ca_pem {
            // ByteString: base64 on the wire.
            c["caBundle"] = json!(base64_encode(ca.as_bytes()));
        }
        c
    };
    let failure = match failure_policy {
        FailurePolicy::Fail => "Fail",
        FailurePolicy::Ignore => "Ignore",
    };
    let mut metadata = json!({"name": NAME, "labels": labels});
    if cert_manager {
        metadata["annotations"] =
            json!({"cert-manager.io/inject-ca-from": format!("{ns}/{NAME}-tls")});
    }
    let pods = json!({"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"], "scope": "Namespaced"});
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": [{
            "name": "mutate.moat.dev",
            "clientConfig": client("/mutate"),
            "rules": [pods],
            "namespaceSelector": namespace_selector,
            "failurePolicy": failure,
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": WEBHOOK_TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
            // Re-run after other webhooks changed the pod, so moat's additions survive them.
            "reinvocationPolicy": "IfNeeded",
        }],
    });
    let core: Vec<&str> = if pods_validated {
        vec![
            "pods",
            "pods/ephemeralcontainers",
            "pods/status",
            "replicationcontrollers",
        ]
    } else {
        vec!["replicationcontrollers"]
    };
    let validating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": [{
            "name": "validate.moat.dev",
            "clientConfig": client("/validate"),
            "rules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "resources": core, "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"},
                {"apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["deployments", "replicasets", "statefulsets", "daemonsets"], "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"},
                {"apiGroups": ["batch"], "apiVersions": ["v1"], "resources": ["jobs", "cronjobs"], "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"},
            ],
            "namespaceSelector": namespace_selector,
            "failurePolicy": failure,
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": WEBHOOK_TIMEOUT_SECONDS,
            "admissionReviewVersions": ["v1"],
        }],
    });
    (mutating, validating)
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The ImagePolicyWebhook admission configuration and the kubeconfig it names.
fn image_policy(
    dir: &std::path::Path,
    url: &str,
    ca_pem: &str,
    fail_closed: bool,
) -> Result<Vec<(String, String)>, String> {
    let kubeconfig_path = dir.join("imagepolicy-kubeconfig.yaml");
    let admission = json!({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AdmissionConfiguration",
        "plugins": [{
            "name": "ImagePolicyWebhook",
            "configuration": {"imagePolicy": {
                "kubeConfigFile": kubeconfig_path.display().to_string(),
                "allowTTL": 50,
                "denyTTL": 50,
                "retryBackoff": 500,
                // The plugin has no namespace selector: failing closed would stop every pod in
                // the cluster, moat's own included, whenever moat is down.
                "defaultAllow": !fail_closed,
            }},
        }],
    });
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": NAME, "cluster": {"server": url, "certificate-authority-data": base64_encode(ca_pem.as_bytes())}}],
        "users": [{"name": "kube-apiserver", "user": {}}],
        "contexts": [{"name": NAME, "context": {"cluster": NAME, "user": "kube-apiserver"}}],
        "current-context": NAME,
    });
    let yaml = |v: &Value| serde_yaml_ng::to_string(v).map_err(|e| e.to_string());
    Ok(vec![
        ("admission-config.yaml".to_owned(), yaml(&admission)?),
        ("imagepolicy-kubeconfig.yaml".to_owned(), yaml(&kubeconfig)?),
    ])
}

/// Runs `moat install`: manifests to `out` as a YAML stream, API server files to disk.
pub fn run_install(args: InstallArgs, out: &mut dyn std::io::Write) -> Result<u8, String> {
    let config = crate::load_config(args.config.as_ref())?;
    let install = manifests(&args, &config)?;
    if let Some(dir) = &args.image_policy_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (name, text) in &install.image_policy_files {
            let path = dir.join(name);
            moat_server::certs::write_atomic(&path, text.as_bytes(), 0o644)
                .map_err(|e| e.to_string())?;
        }
    }
    for object in &install.objects {
        let text = serde_yaml_ng::to_string(object).map_err(|e| e.to_string())?;
        write!(out, "---\n{text}").map_err(|e| format!("writing output: {e}"))?;
    }
    if args.apiserver_cidrs.is_empty() && args.apiserver_client_ca.is_none() {
        eprintln!(
            "moat: warning: the review port is open to every pod in the cluster (no --apiserver-cidr, \
             no --apiserver-client-ca). moat bounds what any client can make it hold (connections, \
             streams, bytes, time), but a tenant can still spend its CPU and add latency to every \
             pod creation; give --apiserver-cidr (the API server's addresses as webhooks see them) \
             or --apiserver-client-ca where your control plane allows it"
        );
    }
    if !args.no_backstop {
        let gaps: Vec<String> = moat_objects::backstop::GAPS
            .iter()
            .map(|g| format!("  - {} (covered by: {})", g.rule, g.covered_by))
            .collect();
        eprintln!(
            "moat: note: the backstop (ValidatingAdmissionPolicies, Kubernetes 1.30+) enforces moat's rules while moat is down, except:\n{}",
            gaps.join("\n")
        );
    }
    if args.metrics_namespaces.is_empty() && args.metrics_cidrs.is_empty() {
        eprintln!(
            "moat: note: no --metrics-namespace or --metrics-cidr: the NetworkPolicies admit no scraper to the metrics ports"
        );
    }
    if !args.cert_manager && !args.rotate_certs {
        // The manifests go to standard output (often straight into kubectl): say it beside them.
        eprintln!(
            "moat: warning: the generated CA and serving certificate are valid for a year and nothing renews them; \
             install with --rotate-certs (moat renews them itself) or --cert-manager"
        );
    }
    Ok(0)
}
