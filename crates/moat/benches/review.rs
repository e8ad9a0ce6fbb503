//! `moat review` end to end over 10,000 generated pods: split, parse, decide, render JSON.
//!
//! `cargo bench -p moat --bench review`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat::review::{Input, Options, OutputFormat, review};
use moat_core::config::Config;

const PODS: usize = 10_000;

/// A multi-document stream of pods in a mix moat sees: tagged, untagged, reserved runtime,
/// labelled for isolation.
fn generate() -> String {
    let mut text = String::new();
    for i in 0..PODS {
        let image = match i % 4 {
            0 => format!("ghcr.io/acme/app{i}:1.{i}"),
            1 => format!("nginx:1.{}", i % 30),
            2 => format!("registry.example.com:5000/team/svc{i}"),
            _ => format!("busybox@sha256:{:064x}", i),
        };
        let runtime = if i % 3 == 0 {
            "runtimeClassName: runc\n  "
        } else {
            ""
        };
        let labels = if i % 2 == 0 {
            "labels: {moat.dev/class: untrusted, app: web}"
        } else {
            "labels: {app: web}"
        };
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: ns-{}\n  {labels}\nspec:\n  {runtime}containers:\n    - name: app\n      image: {image}\n      resources: {{requests: {{cpu: 100m, memory: 64Mi}}}}\n    - name: sidecar\n      image: envoyproxy/envoy:v1.31.2\n",
            i % 50
        ));
    }
    text
}

fn bench(c: &mut Criterion) {
    let config = Config::embedded_default();
    let inputs = vec![Input {
        name: "generated.yaml".to_owned(),
        text: generate(),
    }];
    let options = Options {
        default_namespace: "default".to_owned(),
        ..Options::default()
    };
    let mut group = c.benchmark_group("review");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PODS as u64));
    group.bench_function("10000 pods, json output", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(64 << 20);
            let mut errors = Vec::new();
            review(
                &config,
                &inputs,
                &options,
                OutputFormat::Json,
                &mut out,
                &mut errors,
            )
            .map(|s| s.allowed)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
