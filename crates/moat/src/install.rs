//! `moat install`: its arguments, the files it reads and writes, and what it prints; every
//! manifest is [`moat_objects::install`]'s.

use std::path::PathBuf;

use moat_identity::defaults as identity_defaults;
use moat_objects::install::{
    FailurePolicy, IdentityAgentOptions, InstallOptions, ServerFacts, ServingCertificate, Tls,
};

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
pub enum FailurePolicyArg {
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
    failure_policy: Option<FailurePolicyArg>,
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
    /// Let cert-manager issue the serving certificate and inject the CA, instead of moat.
    #[arg(long, conflicts_with = "static_certs")]
    cert_manager: bool,
    /// Generate the CA and serving certificate now and put them, private key included, in the
    /// output, with the caBundle; nothing renews them (a year). Needed by --image-policy-dir,
    /// whose kubeconfig on the API server's host nothing in the cluster can update. Without
    /// this or --cert-manager, moat creates its CA and serving certificate in the cluster when
    /// it first runs, renews them, and keeps the webhook configurations' caBundle: the output
    /// then holds no key and no bundle and can be applied again at will (docs/server.md,
    /// "Certificate lifecycle").
    #[arg(long)]
    static_certs: bool,
    /// Accepted for compatibility: moat renews its own certificates by default.
    #[arg(long, hide = true, conflicts_with_all = ["cert_manager", "static_certs"])]
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

impl From<FailurePolicyArg> for FailurePolicy {
    fn from(policy: FailurePolicyArg) -> Self {
        match policy {
            FailurePolicyArg::Fail => Self::Fail,
            FailurePolicyArg::Ignore => Self::Ignore,
        }
    }
}

/// Runs `moat install`: manifests to `out` as a YAML stream, API server files to disk.
pub fn run_install(args: InstallArgs, out: &mut dyn std::io::Write) -> Result<u8, String> {
    let InstallArgs {
        config,
        namespace,
        image,
        replicas,
        failure_policy,
        no_backstop,
        runtime_handlers,
        no_runtime_classes,
        cert_manager,
        static_certs,
        rotate_certs: _,
        image_policy_dir,
        image_policy_url,
        image_policy_fail_closed,
        apiserver_cidrs,
        metrics_namespaces,
        metrics_cidrs,
        apiserver_client_ca,
        identity_agent,
        identity_namespace,
        nri_socket,
        spire_admin_socket,
        runtime_request_timeout,
        runtime_bundle_dir,
        capacity,
    } = args;
    let config = crate::load_config(config.as_ref())?;
    let mut options = InstallOptions {
        namespace,
        image,
        replicas,
        failure_policy: failure_policy.map(FailurePolicy::from),
        backstop: !no_backstop,
        runtime_handlers,
        runtime_classes: !no_runtime_classes,
        image_policy_dir,
        image_policy_url,
        image_policy_fail_closed,
        apiserver_cidrs,
        metrics_namespaces,
        metrics_cidrs,
        apiserver_client_ca: None,
        identity_agent: identity_agent.then(|| IdentityAgentOptions {
            namespace: identity_namespace,
            nri_socket,
            spire_admin_socket,
            runtime_request_timeout: runtime_request_timeout.duration(),
            runtime_bundle_dir,
            artifact_dir: identity_defaults::ARTIFACT_DIR.to_owned(),
            metrics_port: identity_defaults::METRICS_PORT,
        }),
        capacity: capacity.into(),
        server: ServerFacts {
            webhook_timeout: moat_server::limits::WEBHOOK_TIMEOUT,
            termination_grace: moat_server::limits::TERMINATION_GRACE,
            memory_limit_bytes: moat_server::limits::memory_limit_bytes()
                + if config.images.trust.is_some() {
                    moat_server::limits::registry_memory_bytes()
                } else {
                    0
                },
            watches_namespaces: moat_server::namespaces::needed(&config),
        },
    };
    // Checked before a key is generated or a file read, in the order the errors always came.
    options.validate()?;
    let tls = if cert_manager {
        Tls::CertManager
    } else if !static_certs {
        Tls::Managed
    } else {
        let dns_names = moat_objects::install::service_dns_names(&options.namespace);
        let g = moat_server::certs::generate(&dns_names).map_err(|e| e.to_string())?;
        Tls::Static(ServingCertificate {
            ca_cert_pem: g.ca_cert_pem,
            ca_key_pem: g.ca_key_pem,
            cert_pem: g.cert_pem,
            key_pem: g.key_pem,
        })
    };
    if let Some(path) = &apiserver_client_ca {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| format!("--apiserver-client-ca {}: {e}", path.display()))?;
        moat_server::tls::client_verifier(path)
            .map_err(|e| format!("--apiserver-client-ca: {e}"))?;
        options.apiserver_client_ca = Some(pem);
    }
    let install = moat_objects::install::manifests(&config, &options, tls)?;
    if let Some(dir) = &options.image_policy_dir {
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
    // The manifests go to standard output (often straight into kubectl): say it beside them.
    for warning in &install.warnings {
        eprintln!("moat: {warning}");
    }
    Ok(0)
}
