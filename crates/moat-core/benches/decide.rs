//! Decisions per second for a realistic 3-container Pod CREATE (the ~6 KB body the API server
//! sends, with defaults filled in), under the embedded default configuration.
//!
//! `cargo bench -p moat-core --bench decide`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use moat_core::config::Config;
use moat_core::decision::{Operation, Request, Stage};
use moat_core::engine::decide;
use moat_core::subject::Template;
use serde_json::Value;

const POD: &str = include_str!("data/pod-3-containers.json");

fn request(stage: Stage, object: Option<&Template>) -> Request<'_> {
    Request {
        operation: Operation::Create,
        stage,
        object,
        old_object: None,
        namespace: "shop",
        namespace_labels: None,
        dry_run: false,
        requester: None,
        placement_seed: "6f1c2d3e",
    }
}

fn bench(c: &mut Criterion) {
    let config = Config::embedded_default();
    let pod: Value = serde_json::from_str(POD).unwrap_or_default();
    let template = Template::from_json(POD.as_bytes()).ok().flatten();
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    group.bench_function("mutate/3-container pod", |b| {
        let req = request(Stage::Mutate, template.as_ref());
        b.iter(|| decide(&config, &req).patch.0.len())
    });
    let mutated = decide(&config, &request(Stage::Mutate, template.as_ref()))
        .patched(&pod)
        .unwrap_or_default();
    let mutated = Template::from_value(&mutated).ok().flatten();
    group.bench_function("validate/3-container pod", |b| {
        let req = request(Stage::Validate, mutated.as_ref());
        b.iter(|| decide(&config, &req).allowed())
    });
    group.bench_function("read+mutate/3-container pod", |b| {
        b.iter(|| {
            let template = Template::from_json(POD.as_bytes()).ok().flatten();
            decide(&config, &request(Stage::Mutate, template.as_ref()))
                .patch
                .0
                .len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
