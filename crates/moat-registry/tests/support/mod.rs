//! Helpers shared by the real-registry tests (moat-registry's and moat-server's): the
//! registries `scripts/start-test-registry.sh` started, images pushed with skopeo from OCI
//! layouts written here, cosign key pairs and signatures.
#![allow(dead_code, reason = "each test crate uses some of the helpers")]

use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) const COSIGN_PASSWORD: &str = "moat-test";

pub(crate) struct Env {
    pub(crate) registry: String,
    pub(crate) auth_registry: String,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) ca: String,
    pub(crate) cert_dir: String,
}

pub(crate) fn env() -> Env {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: run scripts/start-test-registry.sh and source its env file")
        })
    };
    Env {
        registry: var("MOAT_TEST_REGISTRY"),
        auth_registry: var("MOAT_TEST_REGISTRY_AUTH"),
        user: var("MOAT_TEST_REGISTRY_USER"),
        password: var("MOAT_TEST_REGISTRY_PASSWORD"),
        ca: std::fs::read_to_string(var("MOAT_TEST_REGISTRY_CA")).unwrap(),
        cert_dir: var("MOAT_TEST_REGISTRY_CERT_DIR"),
    }
}

/// A directory of the test's own, removed at the end.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moat-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub(crate) fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    moat_registry::Digest::of(bytes).hex().to_owned()
}

/// An OCI layout at `dir` holding one image tagged `v`, distinct per `variant` (a label in its
/// configuration), with one empty layer.
pub(crate) fn write_layout(dir: &Path, variant: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    // 1,024 zero bytes: an empty tar archive.
    let (layer, layer_len) = put(&[0u8; 1024]);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
        "config": {"Labels": {"moat.test/variant": variant}},
    });
    let (config, config_len) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_len}],
    });
    let (manifest, manifest_len) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
                       "size": manifest_len, "annotations": {"org.opencontainers.image.ref.name": "v"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The skopeo command that pushes `variant` to `dest` (`host:port/repo:tag`); its digest lands
/// in `digest_file`.
pub(crate) fn push_command(
    env: &Env,
    scratch: &Scratch,
    variant: &str,
    dest: &str,
    login: Option<(&str, &str)>,
) -> (Command, PathBuf) {
    let layout = scratch.path(&format!("layout-{variant}"));
    write_layout(&layout, variant);
    let digest_file = scratch.path(&format!("digest-{variant}"));
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--quiet",
        "--dest-cert-dir",
        &env.cert_dir,
        "--digestfile",
    ])
    .arg(&digest_file);
    if let Some((u, p)) = login {
        cmd.args(["--dest-creds", &format!("{u}:{p}")]);
    }
    cmd.arg(format!("oci:{}:v", layout.display()))
        .arg(format!("docker://{dest}"));
    (cmd, digest_file)
}

/// Pushes `variant` to `dest`; the digest the registry serves for it.
pub(crate) fn push(env: &Env, scratch: &Scratch, variant: &str, dest: &str) -> String {
    push_with(env, scratch, variant, dest, None)
}

pub(crate) fn push_with(
    env: &Env,
    scratch: &Scratch,
    variant: &str,
    dest: &str,
    login: Option<(&str, &str)>,
) -> String {
    let (mut cmd, digest_file) = push_command(env, scratch, variant, dest, login);
    run(&mut cmd);
    std::fs::read_to_string(digest_file)
        .unwrap()
        .trim()
        .to_owned()
}

/// `cosign generate-key-pair` in `dir/name`: the private key's path and the public key's PEM.
pub(crate) fn key_pair(scratch: &Scratch, name: &str) -> (PathBuf, String) {
    let dir = scratch.path(&format!("key-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    run(Command::new("cosign")
        .arg("generate-key-pair")
        .current_dir(&dir)
        .env("COSIGN_PASSWORD", COSIGN_PASSWORD));
    let public = std::fs::read_to_string(dir.join("cosign.pub")).unwrap();
    (dir.join("cosign.key"), public)
}

/// `cosign sign --key` without a transparency log upload (nothing outside is reachable).
pub(crate) fn sign(env: &Env, scratch: &Scratch, key: &Path, reference: &str) {
    let ca = scratch.path("ca.pem");
    std::fs::write(&ca, &env.ca).unwrap();
    let docker_config = scratch.path("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let auth = base64_encode(format!("{}:{}", env.user, env.password).as_bytes());
    std::fs::write(
        docker_config.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            env.auth_registry
        ),
    )
    .unwrap();
    run(Command::new("cosign")
        .args(["sign", "--tlog-upload=false", "--yes", "--key"])
        .arg(key)
        .arg(reference)
        .env("COSIGN_PASSWORD", COSIGN_PASSWORD)
        .env("SSL_CERT_FILE", &ca)
        .env("DOCKER_CONFIG", &docker_config));
}

pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn indent(pem: &str, by: usize) -> String {
    pem.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(by)))
        .collect()
}
