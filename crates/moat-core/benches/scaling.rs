//! Decision time against the size of the pod: CREATE and UPDATE of pods with 10 to 10,000
//! containers (each with its own image and a toleration per container), under the embedded
//! default configuration. Linear work shows as a constant time per container.
//!
//! `cargo bench -p moat-core --bench scaling`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moat_core::config::Config;
use moat_core::decision::{Operation, Request, Stage};
use moat_core::engine::decide;
use moat_core::subject::Template;
use serde_json::{Value, json};

fn pod(containers: usize) -> Value {
    let cs: Vec<Value> = (0..containers)
        .map(|i| json!({"name": format!("c{i}"), "image": format!("ghcr.io/acme/app-{i}:1.{i}")}))
        .collect();
    let tolerations: Vec<Value> = (0..containers)
        .map(|i| json!({"key": format!("example.com/t{i}"), "operator": "Exists"}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "big", "namespace": "shop", "labels": {"moat.dev/class": "untrusted"}},
        "spec": {"containers": cs, "tolerations": tolerations}})
}

fn bench(c: &mut Criterion) {
    let config = Config::embedded_default();
    let mut group = c.benchmark_group("scaling");
    for n in [10, 100, 1_000, 10_000] {
        let object = pod(n);
        let Ok(Some(template)) = Template::from_value(&object) else {
            return;
        };
        group.throughput(Throughput::Elements(n as u64));
        let request = |operation, old| Request {
            operation,
            stage: Stage::Mutate,
            object: Some(&template),
            old_object: old,
            namespace: "shop",
            namespace_labels: None,
            dry_run: false,
            requester: None,
            placement_seed: "6f1c2d3e",
        };
        group.bench_with_input(BenchmarkId::new("create", n), &n, |b, _| {
            let req = request(Operation::Create, None);
            b.iter(|| decide(&config, &req).allowed())
        });
        group.bench_with_input(BenchmarkId::new("update", n), &n, |b, _| {
            let req = request(Operation::Update, Some(&template));
            b.iter(|| decide(&config, &req).allowed())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
