//! A registry that tries to make moat hold memory (issue #30): bearer tokens of 250 KB and of
//! the largest length moat takes, one per repository; challenges and headers larger than a
//! response head may be; manifests of 10 MiB without a length; bodies sent a byte at a time.
//! Reviews from many namespaces ask it for distinct repositories until every budget is full,
//! round after round, and the process's peak resident memory must stay within what
//! `moat_registry::limits::MAX_HELD_BYTES` says the client may hold (the figure `moat install`
//! adds to the memory limit). One test in its own binary, so no other test's memory counts.
//!
//! The registry runs in the same process (its answers are shared, never copied per request:
//! what it holds is its connections' TLS state), so the growth measured is an upper bound of
//! the client's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

mod loopback_tls;
use loopback_tls::tls;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moat_core::image::ImageRef;
use moat_core::trust::ImageTrust;
use moat_registry::limits::{MAX_HELD_BYTES, MAX_TOKEN_BYTES};
use moat_registry::{Image, Resolver};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MIB: usize = 1024 * 1024;

/// The hostile answers, made once and shared.
struct Answers {
    /// `{"token": <250 KB>}`.
    huge_token: Bytes,
    /// `{"token": <MAX_TOKEN_BYTES>}`, kept by moat for 300 s.
    largest_token: Bytes,
    /// 64 KiB of body, sent again and again.
    chunk: Bytes,
    /// A challenge header of 300 KB.
    huge_challenge: Bytes,
}

/// What the registry does, by the first component of the repository path.
async fn answer(
    tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    path: &str,
    own: &str,
    a: &Answers,
) -> std::io::Result<()> {
    let kind = path
        .strip_prefix("/v2/")
        .and_then(|p| p.split('/').next())
        .unwrap_or("");
    let head = |status: &str, extra: String| {
        format!("HTTP/1.1 {status}\r\nconnection: close\r\n{extra}\r\n").into_bytes()
    };
    if let Some(query) = path.strip_prefix("/token?") {
        let body = if query.contains("huge") {
            &a.huge_token
        } else {
            &a.largest_token
        };
        tls.write_all(&head(
            "200 OK",
            format!("content-length: {}\r\n", body.len()),
        ))
        .await?;
        return tls.write_all(body).await;
    }
    match kind {
        // Bearer: a token per repository (its scope), 250 KB or the largest moat takes.
        "hugetoken" | "token" => {
            let which = if kind == "hugetoken" { "huge" } else { "ok" };
            if path.contains("authorization") {
                unreachable!()
            }
            tls.write_all(&head(
                "401 Unauthorized",
                format!(
                    "www-authenticate: Bearer realm=\"https://{own}/token?{which}\",service=\"s\"\r\ncontent-length: 0\r\n"
                ),
            ))
            .await
        }
        "challenge" => {
            tls.write_all(
                b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"https://x/",
            )
            .await?;
            tls.write_all(&a.huge_challenge).await?;
            tls.write_all(b"\"\r\ncontent-length: 0\r\n\r\n").await
        }
        "headers" => {
            tls.write_all(b"HTTP/1.1 200 OK\r\n").await?;
            for i in 0..5000 {
                tls.write_all(format!("x-filler-{i}: {}\r\n", "f".repeat(60)).as_bytes())
                    .await?;
            }
            tls.write_all(b"content-length: 2\r\n\r\n{}").await
        }
        // 10 MiB with no length, chunk after chunk.
        "huge" => {
            tls.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await?;
            for _ in 0..160 {
                tls.write_all(&a.chunk).await?;
            }
            Ok(())
        }
        // 200 KiB announced, 1 KiB sent every 50 ms: the deadline comes first.
        _ => {
            tls.write_all(&head(
                "200 OK",
                format!("content-length: {}\r\n", 200 * 1024),
            ))
            .await?;
            for _ in 0..200 {
                tls.write_all(&a.chunk[..1024]).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
    }
}

async fn hostile() -> (String, String) {
    let (ca, acceptor) = tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own = listener.local_addr().unwrap().to_string();
    let answers = Arc::new(Answers {
        huge_token: Bytes::from(format!(
            r#"{{"token":"{}","expires_in":300}}"#,
            "t".repeat(250_000)
        )),
        largest_token: Bytes::from(format!(
            r#"{{"token":"{}","expires_in":300}}"#,
            "t".repeat(MAX_TOKEN_BYTES)
        )),
        chunk: Bytes::from(vec![b'{'; 64 * 1024]),
        huge_challenge: Bytes::from("c".repeat(300_000)),
    });
    let addr = own.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, answers, own) = (acceptor.clone(), answers.clone(), own.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let _ = answer(&mut tls, &path, &own, &answers).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca)
}

/// `(VmRSS, VmHWM)` of this process, bytes.
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_registry_cannot_grow_moat_past_its_memory_bound() {
    let (registry, ca) = hostile().await;
    let yaml = format!(
        "caCertificates: |\n{}unmatched: pin\n",
        ca.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let trust: ImageTrust = serde_yaml_ng::from_str(&yaml).unwrap();
    let resolver = Arc::new(Resolver::new(&trust, &mut Registry::default()).unwrap());
    let trust = Arc::new(trust);
    let kinds = ["hugetoken", "token", "challenge", "headers", "huge", "slow"];
    // Warm the runtime, TLS and allocator up, then measure from here.
    let warm = format!("{registry}/token/warm:1");
    let parsed: ImageRef = warm.parse().unwrap();
    let _ = resolver
        .check(
            &trust,
            "warm",
            &[Image {
                raw: &warm,
                parsed: &parsed,
            }],
            Instant::now() + Duration::from_secs(2),
        )
        .await;
    // Resets VmHWM to the current RSS (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (start, _) = rss();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..3 {
        let mut reviews = Vec::new();
        // 20 namespaces of 64 lookups: past the 1,024 moat lets wait at once.
        for ns in 0..20 {
            let (resolver, trust, registry) = (resolver.clone(), trust.clone(), registry.clone());
            reviews.push(tokio::spawn(async move {
                let images: Vec<(String, ImageRef)> = (0..64)
                    .map(|i| {
                        let kind = kinds[(ns + i) % kinds.len()];
                        let raw = format!("{registry}/{kind}/r{round}-n{ns}-i{i}:1");
                        let parsed = raw.parse().unwrap();
                        (raw, parsed)
                    })
                    .collect();
                let asked: Vec<Image<'_>> = images
                    .iter()
                    .map(|(raw, parsed)| Image { raw, parsed })
                    .collect();
                resolver
                    .check(
                        &trust,
                        &format!("ns{ns}"),
                        &asked,
                        Instant::now() + Duration::from_secs(2),
                    )
                    .await
            }));
        }
        for r in reviews {
            for answer in r.await.unwrap() {
                let why = answer.expect_err("nothing hostile is admitted");
                // The kind of denial, without the names in it.
                let kind = why
                    .split_whitespace()
                    .skip(2)
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ");
                *errors.entry(kind).or_default() += 1;
            }
        }
    }
    let (end, peak) = rss();
    let grew = peak.saturating_sub(start);
    eprintln!(
        "figure: RSS {} MiB at the start, peak {} MiB, {} MiB after; peak growth {:.1} MiB, \
         bound (MAX_HELD_BYTES) {:.1} MiB; cache {:?}; denials {errors:?}",
        start / MIB,
        peak / MIB,
        end / MIB,
        grew as f64 / MIB as f64,
        MAX_HELD_BYTES as f64 / MIB as f64,
        resolver.cache_size(),
    );
    assert!(
        grew < MAX_HELD_BYTES,
        "peak RSS grew {grew} bytes, more than the {MAX_HELD_BYTES} the limit accounts for"
    );
    // Every hostile behaviour was met (not all refused before a call).
    for kind in ["refused access", "sent more than", "unreachable"] {
        assert!(
            errors
                .keys()
                .any(|k| k.contains(kind.split(' ').next().unwrap())),
            "no '{kind}' denial: {errors:?}"
        );
    }
}
