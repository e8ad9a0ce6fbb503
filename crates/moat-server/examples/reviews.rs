//! The review path without the network: read an AdmissionReview from bytes, decide it at the
//! mutate stage, write the answer; N times. A driver for instruction counts, which are
//! repeatable on a shared machine where times are not:
//!
//! `valgrind --tool=callgrind target/release/examples/reviews 2000 REVIEW.json [reinvoked]`
//!
//! With `reinvoked`, the review is the API server's second call to the mutating webhook (after
//! the RuntimeClass admission plugin): the object as moat's first answer patched it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark driver, not product code"
)]

/// The same allocator as the `moat` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use moat_core::config::Config;
use moat_core::decision::{Request, Requester, Stage};
use moat_core::engine;
use moat_server::codec::{self, AdmissionIn};

fn decide_and_answer(
    config: &Config,
    body: &[u8],
) -> (bytes::Bytes, moat_core::decision::Decision) {
    let req = AdmissionIn::parse(body).unwrap();
    let decision = engine::decide(
        config,
        &Request {
            operation: req.operation,
            stage: Stage::Mutate,
            object: req.object.as_ref().or(req.old_object.as_ref()),
            old_object: req.old_object.as_ref(),
            namespace: &req.namespace,
            namespace_labels: None,
            dry_run: req.dry_run,
            requester: Some(Requester {
                username: &req.user_info.username,
            }),
            placement_seed: &req.uid,
        },
    );
    (codec::admission_answer(&req, &decision), decision)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().expect("N").parse().expect("N is a number");
    let path = args.next().expect("REVIEW.json");
    let reinvoked = args.next().as_deref() == Some("reinvoked");
    let config = Config::embedded_default();
    let mut body = std::fs::read(&path).unwrap();
    if reinvoked {
        let (_, decision) = decide_and_answer(&config, &body);
        let mut review: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let object = review["request"]["object"].take();
        review["request"]["object"] = decision.patched(&object).unwrap();
        body = serde_json::to_vec(&review).unwrap();
    }
    let mut answered = 0;
    for _ in 0..n {
        answered += decide_and_answer(&config, std::hint::black_box(&body))
            .0
            .len();
    }
    eprintln!(
        "{n} reviews of {} bytes, {answered} bytes answered",
        body.len()
    );
}
