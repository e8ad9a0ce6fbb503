//! Where the identity agent connects, writes and listens when nobody says otherwise.
//!
//! One place for every default path and port: the agent's annotation defaults, the
//! `moat identity-agent` flags and the DaemonSet `moat install --identity-agent` writes all read
//! these, so their defaults cannot drift apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The runtime's NRI socket (containerd's `[plugins."io.containerd.nri.v1.nri"] socket_path`).
pub const NRI_SOCKET: &str = "/var/run/nri/nri.sock";

/// The SPIRE agent's admin socket, which serves the Delegated Identity API (its
/// `admin_socket_path`). Used when an annotation names none.
pub const SPIRE_ADMIN_SOCKET: &str = "/run/spire/admin/admin.sock";

/// Where the files appear in a container when an annotation names no `cert_dir`.
pub const CERT_DIR: &str = "/var/run/secrets/spiffe.io";

/// File names in `cert_dir` when an annotation names none: certificate chain, private key,
/// trust bundle.
pub const SVID_FILE_NAME: &str = "svid.pem";
/// See [`SVID_FILE_NAME`].
pub const SVID_KEY_FILE_NAME: &str = "svid_key.pem";
/// See [`SVID_FILE_NAME`].
pub const SVID_BUNDLE_FILE_NAME: &str = "bundle.pem";

/// Host directory of the per-container SVID files. Under `/run`, which is tmpfs on the hosts
/// Kubernetes runs on, so private keys never reach a disk. The runtime bind-mounts from it by
/// host path, so the agent's container mounts it at the same path.
pub const ARTIFACT_DIR: &str = "/run/moat/identity";

/// The name the plugin registers with.
pub const PLUGIN_NAME: &str = "moat-identity";

/// The plugin's two-digit index (the runtime calls plugins in ascending order).
pub const PLUGIN_INDEX: &str = "10";

/// Port of the agent's metrics and liveness endpoint.
pub const METRICS_PORT: u16 = 9091;

/// Address of the metrics endpoint when run by hand: loopback only. The DaemonSet listens on
/// every address so the kubelet's liveness probe reaches it.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), METRICS_PORT);

/// Longest wait for a container's first SVID, in milliseconds (the flag's unit).
pub const SVID_WAIT_MS: u64 = 1500;

/// Longest wait for a container's first SVID.
pub const SVID_WAIT: Duration = Duration::from_millis(SVID_WAIT_MS);

/// The runtime's NRI request timeout when Configure does not say (containerd's default).
pub const RUNTIME_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// `--runtime-request-timeout` as written on the command line: containerd's default
/// `plugin_request_timeout`, in containerd's own syntax.
pub const RUNTIME_REQUEST_TIMEOUT_FLAG: &str = "2s";

/// Runtime handlers whose pods run in a sandbox (gVisor's `runsc`, every Kata handler): their
/// containers are named to SPIRE by selectors, not by PID. A trailing `*` is a prefix.
pub const SANDBOXED_RUNTIME_HANDLERS: [&str; 2] = ["runsc", "kata*"];

/// The pod label that holds a pod's isolation class (moat's `classLabel`; moat's admission checks
/// it against the namespace's binding and denies changing it).
pub const CLASS_LABEL: &str = moat_core::config::DEFAULT_POD_CLASS_LABEL;

/// The pod annotation in which moat's admission webhook stamps the pod's service account (and
/// denies any other value, or a change).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = moat_core::config::DEFAULT_SERVICE_ACCOUNT_ANNOTATION;

/// Where containerd (shim v2) keeps the bundles of Kubernetes containers: `<this>/<container
/// id>/config.json` is the OCI spec the runtime runs, with the container's user.
pub const RUNTIME_BUNDLE_DIR: &str = "/run/containerd/io.containerd.runtime.v2.task/k8s.io";
