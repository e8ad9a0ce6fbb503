//! Load driver for the identity agent (run by `scripts/bench-identity.sh`): starts the SPIRE
//! and NRI runtime doubles, spawns the `moat identity-agent` binary given as the first argument
//! as its own process, and drives containers through the NRI protocol. Prints the agent's
//! resident memory with 1, 100 and 1,000 tracked containers, and the latency of
//! CreateContainer and StartContainer as the runtime sees it. The SPIRE double signs each SVID
//! when a stream opens; that signing is timed on its own and reported beside StartContainer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark driver"
)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_identity::doubles::runtime::{RuntimeDouble, Style};
use moat_identity::doubles::spire::SpireDouble;
use moat_identity::proto::nri::{Container, PodSandbox};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn show(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} p50={:.0}us p90={:.0}us p99={:.0}us max={:.0}us",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.9).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.last().unwrap().as_secs_f64() * 1e6,
    );
}

/// One sidecar: subscribe for this process's own SVID and keep the files current.
async fn sidecar(socket: PathBuf, out: PathBuf) {
    use moat_identity::files::{Artifacts, publish};
    use moat_identity::spiffe::pem;
    use moat_identity::spire::{SpireAgent, select_svid};
    let agent = SpireAgent::connect(&socket, |_| {});
    let mut stream = agent
        .subscribe(&moat_identity::attest::Workload::Pid(
            i32::try_from(std::process::id()).unwrap(),
        ))
        .await
        .unwrap();
    let bundles = agent.bundles();
    while let Ok(Some(answer)) = stream.message().await {
        let Ok(Some(svid)) = select_svid(&answer, None) else {
            continue;
        };
        let roots: Vec<Vec<u8>> = bundles
            .borrow()
            .as_ref()
            .and_then(|b| b.by_trust_domain.values().next().cloned())
            .unwrap_or_default();
        let (c, k, b) = (svid.chain_pem(), svid.key_pem(), pem("CERTIFICATE", &roots));
        publish(
            &out,
            &Artifacts {
                svid: ("svid.pem", c.as_bytes()),
                key: ("svid_key.pem", k.as_bytes()),
                bundle: ("bundle.pem", b.as_bytes()),
                owner: None,
            },
        )
        .unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--sidecar") {
        // A sidecar is small: one thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(sidecar(PathBuf::from(&args[2]), PathBuf::from(&args[3])));
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(drive());
}

async fn drive() {
    let moat = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: identity_load MOAT_BINARY"),
    );
    let dir = std::env::temp_dir().join(format!("moat-identity-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The files live on tmpfs, as under the agent's default /run/moat/identity.
    let artifacts =
        PathBuf::from(std::env::var_os("MOAT_LOAD_ARTIFACTS").unwrap_or_else(|| {
            format!("/dev/shm/moat-identity-load-{}", std::process::id()).into()
        }));
    let spire = SpireDouble::start(&dir.join("spire.sock"), "example.org").unwrap();
    let runtime = RuntimeDouble::bind(&dir.join("nri.sock")).unwrap();
    // Every container's process is this driver: the double attests it, the agent reads its
    // owner; what is measured is the agent's per-container cost.
    let pid = std::process::id();
    spire.register_pid(pid, "spiffe://example.org/load");

    let mut agent = Command::new(&moat)
        .args(["identity-agent", "--nri-socket"])
        .arg(dir.join("nri.sock"))
        .arg("--spire-admin-socket")
        .arg(spire.socket())
        .arg("--artifact-dir")
        .arg(&artifacts)
        .args(["--metrics-addr", "127.0.0.1:0", "--log-level", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();
    let conn = runtime.accept().await.unwrap();
    conn.configure().await.unwrap();
    conn.synchronize(vec![], vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("agent RSS, 0 containers: {} KiB", rss_kib(agent_pid));

    let pod = PodSandbox {
        id: "pod".into(),
        name: "load".into(),
        namespace: "bench".into(),
        annotations: [(
            "identity.noderesource.dev/pod".to_owned(),
            "[{}]".to_owned(),
        )]
        .into(),
        ..Default::default()
    };
    let plain_pod = PodSandbox {
        annotations: Default::default(),
        ..pod.clone()
    };
    // The transport floor: a call the agent has nothing to do for.
    let mut floor = Vec::new();
    for i in 0..200 {
        let c = Container {
            id: format!("plain{i}"),
            name: "c".into(),
            pod_sandbox_id: "pod".into(),
            pid,
            ..Default::default()
        };
        let t = Instant::now();
        conn.create_container(&plain_pod, &c).await.unwrap();
        floor.push(t.elapsed());
    }
    show("CreateContainer, unannotated (transport floor)", floor);

    let mut create = Vec::new();
    let mut start = Vec::new();
    let mut tracked = 0;
    for target in [1usize, 100, 1000] {
        while tracked < target {
            let c = Container {
                id: format!("c{tracked:05}"),
                name: "app".into(),
                pod_sandbox_id: "pod".into(),
                pid,
                ..Default::default()
            };
            let t = Instant::now();
            conn.create_container(&pod, &c).await.unwrap();
            create.push(t.elapsed());
            let t = Instant::now();
            conn.start_container(&pod, &c, Style::StateChange)
                .await
                .unwrap();
            start.push(t.elapsed());
            tracked += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!(
            "agent RSS, {target} tracked containers (one open SVID stream each): {} KiB; SPIRE streams open: {}",
            rss_kib(agent_pid),
            spire.open_svid_streams()
        );
    }
    show("CreateContainer, annotated (directory + mount)", create);
    show(
        "StartContainer, annotated (subscribe, SVID, write 3 files)",
        start,
    );
    let (issued, mean) = spire.issued();
    println!(
        "SPIRE double's own share of a start: {:.0}us mean to generate a key and sign an SVID ({issued} issued)",
        mean.as_secs_f64() * 1e6
    );

    // The sidecar it replaces: one process per pod holding one SVID stream and writing the
    // files, built from the same library (so a lower bound: sidecars in Go hold more).
    let mut sidecars: Vec<std::process::Child> = Vec::new();
    for i in 0..10 {
        let out = dir.join(format!("sidecar{i}"));
        std::fs::create_dir_all(&out).unwrap();
        sidecars.push(
            Command::new(std::env::current_exe().unwrap())
                .arg("--sidecar")
                .arg(spire.socket())
                .arg(&out)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        spire.register_pid(sidecars[i].id(), "spiffe://example.org/load");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let total: u64 = sidecars.iter().map(|s| rss_kib(s.id())).sum();
    println!(
        "sidecar stand-in (one process per pod, one SVID stream): {} KiB RSS each, mean of {}",
        total / sidecars.len() as u64,
        sidecars.len()
    );
    for mut s in sidecars {
        s.kill().unwrap();
        s.wait().unwrap();
    }

    agent.kill().unwrap();
    agent.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&artifacts);
}
