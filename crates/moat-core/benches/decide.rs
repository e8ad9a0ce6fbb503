//! Decisions per second for a realistic 3-container Pod CREATE (the ~6 KB body the API server
//! sends, with defaults filled in), under the embedded default configuration.
//!
//! `cargo bench -p moat-core --bench decide`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_core::config::Config;
use moat_core::policy::{Operation, Request, Stage, decide};
use serde_json::Value;

const POD: &str = include_str!("data/pod-3-containers.json");

fn bench(c: &mut Criterion) {
    let config = Config::embedded_default();
    let pod: Value = serde_json::from_str(POD).unwrap_or_default();
    let request = |stage| Request {
        operation: Operation::Create,
        stage,
        object: &pod,
        old_object: None,
        namespace: "shop",
        namespace_labels: None,
        dry_run: false,
        placement_seed: "6f1c2d3e",
    };
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    group.bench_function("mutate/3-container pod", |b| {
        let req = request(Stage::Mutate);
        b.iter(|| decide(&config, &req).map(|d| d.patch.0.len()))
    });
    let mutated = decide(&config, &request(Stage::Mutate))
        .ok()
        .and_then(|d| d.patched(&pod).ok())
        .unwrap_or_default();
    group.bench_function("validate/3-container pod", |b| {
        let req = Request {
            object: &mutated,
            ..request(Stage::Validate)
        };
        b.iter(|| decide(&config, &req).map(|d| d.allowed()))
    });
    group.bench_function("parse+mutate/3-container pod", |b| {
        b.iter(|| {
            let pod: Value = serde_json::from_str(POD).unwrap_or_default();
            let req = Request {
                object: &pod,
                ..request(Stage::Mutate)
            };
            decide(&config, &req).map(|d| d.patch.0.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
