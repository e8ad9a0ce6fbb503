//! Images: a tag other than `latest`, or a digest, for every container of every kind; optional
//! registry allow-list and required digests. Never mutates.

use crate::config::ImagePolicy;
use std::collections::HashSet;

use crate::decision::Policy;
use crate::engine::{Context, Findings};
use crate::image::ImageRef;
use crate::subject::PodSpecView;

/// One container of any kind, with its field path.
struct ContainerRef<'a> {
    field: String,
    name: &'a str,
    image: Option<&'a str>,
}

fn all_containers(spec: &PodSpecView) -> Vec<ContainerRef<'_>> {
    let mut out = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        out.push(ContainerRef {
            field: format!("spec.containers[{i}]"),
            name: &c.name,
            image: c.image.as_deref(),
        });
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        out.push(ContainerRef {
            field: format!("spec.initContainers[{i}]"),
            name: &c.name,
            image: c.image.as_deref(),
        });
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        out.push(ContainerRef {
            field: format!("spec.ephemeralContainers[{i}]"),
            name: &c.name,
            image: c.image.as_deref(),
        });
    }
    out
}

/// Every image the kubelet pulls for a pod: containers of every kind and image volumes.
fn all_images(spec: &PodSpecView) -> Vec<ContainerRef<'_>> {
    let mut out = all_containers(spec);
    for v in &spec.image_volumes {
        out.push(ContainerRef {
            field: format!("spec.volumes[{}].image.reference", v.index),
            name: &v.name,
            image: v.reference.as_deref(),
        });
    }
    out
}

pub(crate) fn check(ctx: &Context<'_>, out: &mut Findings) {
    // An UPDATE that leaves an image alone is not a new decision about it. The old pod's images
    // are looked up, not scanned: linear in the pod's size.
    let unchanged: HashSet<(&str, &str)> = ctx
        .old
        .map(|old| {
            all_images(&old.spec)
                .into_iter()
                .filter_map(|c| Some((c.name, c.image?)))
                .collect()
        })
        .unwrap_or_default();
    for c in all_images(&ctx.template.spec) {
        let what = if c.field.starts_with("spec.volumes") {
            "image volume"
        } else {
            "container"
        };
        let who = format!("{what} '{}' ({})", c.name, ctx.field(&c.field));
        let Some(raw) = c.image.filter(|i| !i.is_empty()) else {
            out.deny(Policy::Images, format!("{who} has no image"));
            continue;
        };
        if unchanged.contains(&(c.name, raw)) {
            continue;
        }
        for problem in judge(&ctx.config.images, raw) {
            out.deny(Policy::Images, format!("{who}: {problem}"));
        }
    }
}

/// What is wrong with one image reference under `policy` (empty: nothing).
pub(crate) fn judge(policy: &ImagePolicy, raw: &str) -> Vec<String> {
    let image: ImageRef = match raw.parse() {
        Ok(i) => i,
        Err(e) => return vec![format!("image '{raw}' is not a valid reference: {e}")],
    };
    let mut problems = Vec::new();
    if !policy.allowed_registries.is_empty()
        && !policy.allowed_registries.iter().any(|r| r.contains(&image))
    {
        let allowed: Vec<String> = policy
            .allowed_registries
            .iter()
            .map(ToString::to_string)
            .collect();
        problems.push(format!(
            "image '{raw}' is from '{}', which is not an allowed registry ({})",
            image.repository(),
            allowed.join(", ")
        ));
    }
    if image.digest().is_some() {
        return problems;
    }
    if policy.require_digest {
        problems.push(format!(
            "image '{raw}' must be pinned by digest (@sha256:…)"
        ));
        return problems;
    }
    match image.tag() {
        None => problems.push(format!(
            "image '{raw}' has no tag, which means 'latest'; pin a version tag or a digest"
        )),
        Some("latest") => problems.push(format!(
            "image '{raw}' uses the mutable tag 'latest'; pin a version tag or a digest"
        )),
        Some(_) => {}
    }
    problems
}
