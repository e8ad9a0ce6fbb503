//! Images: a tag other than `latest`, or a digest, for every container of every kind; optional
//! registry allow-list and required digests. With `images.trust`, the registry's verdict on
//! each image (found by the server before the decision): a refusal denies, and a pod's image is
//! pinned to the digest that was verified (workload templates are verified, not rewritten).

use crate::config::ImagePolicy;
use std::collections::HashSet;

use crate::fields::{ImageSlot, PodFields};
use crate::subject::{Kind, Template};
use crate::trust::{ImageVerdict, ImageVerdicts};

use crate::decision::Policy;
use crate::engine::{Context, Findings};
use crate::image::ImageRef;
use crate::subject::PodSpecView;

/// One container of any kind (or image volume), with where it is.
struct ContainerRef<'a> {
    slot: ImageSlot,
    name: &'a str,
    image: Option<&'a str>,
}

fn all_containers(spec: &PodSpecView) -> Vec<ContainerRef<'_>> {
    let mut out = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        out.push(ContainerRef {
            slot: ImageSlot::Container(i),
            name: &c.name,
            image: c.image.as_deref(),
        });
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        out.push(ContainerRef {
            slot: ImageSlot::InitContainer(i),
            name: &c.name,
            image: c.image.as_deref(),
        });
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        out.push(ContainerRef {
            slot: ImageSlot::EphemeralContainer(i),
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
            slot: ImageSlot::Volume(v.index),
            name: &v.name,
            image: v.reference.as_deref(),
        });
    }
    out
}

/// The images a review decides on, with where they are: every image of the template but those
/// an UPDATE leaves alone (an UPDATE that leaves an image alone is not a new decision about it).
/// The old pod's images are looked up, not scanned: linear in the pod's size.
fn reviewed<'a>(template: &'a Template, old: Option<&'a Template>) -> Vec<ContainerRef<'a>> {
    let unchanged: HashSet<(&str, &str)> = old
        .map(|old| {
            all_images(&old.spec)
                .into_iter()
                .filter_map(|c| Some((c.name, c.image?)))
                .collect()
        })
        .unwrap_or_default();
    all_images(&template.spec)
        .into_iter()
        .filter(|c| {
            c.image
                .filter(|i| !i.is_empty())
                .is_none_or(|raw| !unchanged.contains(&(c.name, raw)))
        })
        .collect()
}

/// The references the registry must be asked about for this review, each once. The caller
/// parses them (it needs the parts) and asks only about those that parse: the others are
/// denied as they are.
pub(crate) fn to_resolve<'a>(template: &'a Template, old: Option<&'a Template>) -> Vec<&'a str> {
    unique(
        reviewed(template, old)
            .into_iter()
            .filter_map(|c| c.image.filter(|i| !i.is_empty())),
    )
}

/// Past this many distinct references, [`unique`] keeps a set.
const SCANNED_REFERENCES: usize = 16;

/// Each non-empty reference once, in order. A pod names a handful of images, where a scan
/// beats a set; but the tenant writes the pod, and one of 60,000 containers (2.5 MB) took
/// 3.5 s of CPU to scan, so past [`SCANNED_REFERENCES`] a set takes over.
pub(crate) fn unique<'a>(references: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    let mut seen: Option<HashSet<&str>> = None;
    for raw in references.filter(|r| !r.is_empty()) {
        let new = match &mut seen {
            Some(set) => set.insert(raw),
            None => !out.contains(&raw),
        };
        if new {
            out.push(raw);
            if seen.is_none() && out.len() > SCANNED_REFERENCES {
                seen = Some(out.iter().copied().collect());
            }
        }
    }
    out
}

/// An image to pin: where, to what, and who it is for messages.
pub(crate) struct Pin {
    slot: ImageSlot,
    pinned: String,
    who: String,
}

pub(crate) fn check(ctx: &Context<'_>, out: &mut Findings) -> Vec<Pin> {
    let mut pins = Vec::new();
    for c in reviewed(ctx.template, ctx.old) {
        // Who, for messages: written only when one is.
        let who = || {
            let what = match c.slot {
                ImageSlot::Volume(_) => "image volume",
                _ => "container",
            };
            format!("{what} '{}' ({})", c.name, ctx.field(&c.slot.field()))
        };
        let Some(raw) = c.image.filter(|i| !i.is_empty()) else {
            out.deny(Policy::Images, format!("{} has no image", who()));
            continue;
        };
        let (parsed, problems) = judge(&ctx.config.images, raw, ctx.images);
        for problem in problems {
            out.deny(Policy::Images, format!("{}: {problem}", who()));
        }
        // A reference that does not parse was denied above and never sent to a registry.
        let Some(verdicts) = ctx.images.filter(|_| parsed) else {
            continue;
        };
        match verdicts.get(raw) {
            Some(ImageVerdict::Admitted { pinned }) => {
                // Workload templates are verified, not rewritten: their pods are pinned when
                // they are created (rewriting the template would roll the workload out and
                // fight whoever applies it).
                if pinned != raw && ctx.template.kind == Kind::Pod {
                    pins.push(Pin {
                        slot: c.slot,
                        pinned: pinned.clone(),
                        who: who(),
                    });
                }
            }
            Some(ImageVerdict::Refused(why)) => {
                out.deny(Policy::Images, format!("{}: image '{raw}': {why}", who()));
            }
            None => out.deny(
                Policy::Images,
                format!("{}: image '{raw}' was not checked at its registry", who()),
            ),
        }
    }
    pins
}

/// Pins each image to the digest that was verified.
pub(crate) fn mutate(pins: Vec<Pin>, pod: &mut PodFields, out: &mut Findings) {
    for Pin { slot, pinned, who } in pins {
        out.changed(
            Policy::Images,
            format!("pin the image of {who} to '{pinned}'"),
        );
        pod.image_pins.insert(slot, pinned);
    }
}

/// [`judge_parsed`], with the reference as the server parsed it when `verdicts` holds it.
pub(crate) fn judge(
    policy: &ImagePolicy,
    raw: &str,
    verdicts: Option<&ImageVerdicts>,
) -> (bool, Vec<String>) {
    match verdicts.and_then(|v| v.parsed(raw)) {
        Some(image) => (true, judge_image(policy, raw, image)),
        None => judge_parsed(policy, raw),
    }
}

/// Whether the reference parsed (only those are sent to a registry), and what is wrong with it
/// under `policy` (empty: nothing).
pub(crate) fn judge_parsed(policy: &ImagePolicy, raw: &str) -> (bool, Vec<String>) {
    let image: ImageRef = match raw.parse() {
        Ok(i) => i,
        Err(e) => {
            return (
                false,
                vec![format!("image '{raw}' is not a valid reference: {e}")],
            );
        }
    };
    (true, judge_image(policy, raw, &image))
}

fn judge_image(policy: &ImagePolicy, raw: &str, image: &ImageRef) -> Vec<String> {
    let mut problems = Vec::new();
    if !policy.allowed_registries.is_empty()
        && !policy.allowed_registries.iter().any(|r| r.contains(image))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_keeps_each_reference_once_in_order_below_and_above_the_scan() {
        let few = ["a:1", "b:1", "", "a:1", "c:1", "b:1"];
        assert_eq!(unique(few.into_iter()), ["a:1", "b:1", "c:1"]);
        // Across the switch to a set: duplicates of names seen before it and after it.
        let names: Vec<String> = (0..40).map(|i| format!("r.io/i{i}:1")).collect();
        let many: Vec<&str> = names
            .iter()
            .chain(names.iter().rev())
            .chain(names.iter().take(3))
            .map(String::as_str)
            .collect();
        let expected: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(unique(many.into_iter()), expected);
    }
}
