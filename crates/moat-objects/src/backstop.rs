//! The backstop: moat's validate stage compiled to ValidatingAdmissionPolicies, which the API
//! server evaluates itself (`admissionregistration.k8s.io/v1`, Kubernetes 1.30 and later), so
//! the rules hold while moat's webhook is down, slow or flooded.
//!
//! One policy per moat policy (images, runtimeClass, isolation, identity), each with one binding
//! whose `validationActions` follow that policy's enforcement (`[Deny]`, or `[Warn, Audit]` in
//! audit mode). Every policy sees Pods on CREATE and UPDATE and the subresources moat reviews
//! (`pods/ephemeralcontainers`, and `pods/status`, through which labels and annotations can
//! change). Exempt namespaces are left out twice: by the binding's `namespaceSelector` (exact
//! names, by the `kubernetes.io/metadata.name` label only the API server sets) and by the
//! policy's `matchConditions` (globs).
//!
//! The validate stage denies a final pod that breaks a rule or that lacks a change moat's
//! mutating webhook would have made; the backstop does the same, on the facts the API server
//! gives it: the object, the old object, the namespace's labels (`namespaceObject`) and the
//! request (`userInfo`, `dryRun`). What it cannot express is listed in [`GAPS`], with what
//! still covers it. Messages read like moat's own and, where the likely cause is a pod moat did
//! not mutate, say so.

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use moat_core::config::{ClassMode, ClassPattern, ClassSpec, Config, SelectorOperator};
use moat_core::decision::Policy;
use moat_core::engine::enforcement;
use moat_core::subject::Kind;
use serde_json::{Value, json};

use crate::cel::{HAS_DOMAIN, TAG, glob_regex, list, lit, reference_regex, regex_escape};

/// Added to messages whose likely cause is a pod moat's mutating webhook never saw.
pub const NOT_MUTATED: &str = " (if moat is unavailable, retry: moat did not mutate this pod)";

/// The label the API server sets on every namespace to its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A rule of moat's that the backstop does not express, and what still enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The rule.
    pub rule: &'static str,
    /// What covers it while the backstop cannot.
    pub covered_by: &'static str,
}

/// Everything moat's validate stage checks that the backstop does not.
pub const GAPS: &[Gap] = &[
    Gap {
        rule: "image references: the 255-character limit on the normalised repository name, and bracketed IPv6 registry addresses, are checked loosely",
        covered_by: "the kubelet and the runtime refuse references they cannot parse",
    },
    Gap {
        rule: "dedicatedNode mode: the namespace binding of a dedicated node id (a SHA-256 prefix; CEL has no hash) is not verified, only its class and form",
        covered_by: "moat's webhook; a pod naming another namespace's id of its own class can land only on a node of that class",
    },
    Gap {
        rule: "the required pod anti-affinity moat adds is checked for its topology key and class selector, not term by term",
        covered_by: "the scheduler applies existing pods' anti-affinity symmetrically: a pod moat placed keeps others off its node",
    },
    Gap {
        rule: "a namespace moat's cache has not seen yet is denied by moat; the backstop reads the namespace's labels from the API server directly",
        covered_by: "nothing needed: the API server's view is authoritative",
    },
];

/// One compiled policy, as plain strings: what the objects carry and what the tests evaluate.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The moat policy it enforces.
    pub policy: Policy,
    /// What it reads the pod from: a Pod request, or a workload's pod template.
    pub subject: Subject,
    /// Object name (`moat-images`, ...).
    pub name: String,
    /// Conditions under which the policy applies at all (exemptions); all must hold.
    pub match_conditions: Vec<(String, String)>,
    /// Named expressions, in order.
    pub variables: Vec<(String, String)>,
    /// Each validation: expression and message expression.
    pub validations: Vec<(String, String)>,
    /// The binding's actions: `Deny`, or `Warn` and `Audit`.
    pub actions: Vec<&'static str>,
}

/// Where a policy reads the pod it checks, and so which requests it sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// Pods, their ephemeral containers and status: `object` and `oldObject`.
    Pod,
    /// The pod template of a Deployment, ReplicaSet, StatefulSet, DaemonSet, Job or
    /// ReplicationController (`spec.template`).
    Workload,
    /// A CronJob's pod template (`spec.jobTemplate.spec.template`).
    CronJob,
}

impl Subject {
    /// Every subject, in the order the policies are written.
    pub const ALL: [Self; 3] = [Self::Pod, Self::Workload, Self::CronJob];

    /// The subject whose policies see an object of `kind` (the resource rules).
    pub fn of(kind: Kind) -> Self {
        match kind {
            Kind::Pod => Self::Pod,
            Kind::CronJob => Self::CronJob,
            Kind::Deployment
            | Kind::ReplicaSet
            | Kind::StatefulSet
            | Kind::DaemonSet
            | Kind::Job
            | Kind::ReplicationController => Self::Workload,
        }
    }

    /// Whether the policy sees requests for `api_version` and `kind` (the resource rules).
    pub fn covers(self, api_version: &str, kind: &str) -> bool {
        Kind::from_type(api_version, kind).is_some_and(|k| Self::of(k) == self)
    }

    /// The CEL of the pod (an object with `metadata` and `spec`) the rules read.
    fn pod(self) -> &'static str {
        match self {
            Self::Pod => "object",
            Self::Workload | Self::CronJob => "variables.template",
        }
    }

    /// The template inside `o`, a workload of this subject.
    fn template_of(self, o: &str) -> String {
        match self {
            Self::Pod => o.to_owned(),
            Self::Workload => format!("{o}.spec.template"),
            Self::CronJob => format!("{o}.spec.jobTemplate.spec.template"),
        }
    }

    /// `rule`, where a new pod's rules apply: on a pod's CREATE; on a template, on every
    /// request the policy sees (a changed template rolls out new pods).
    fn when_new(self, rule: String) -> String {
        match self {
            Self::Pod => format!("!({CREATE}) || {rule}"),
            Self::Workload | Self::CronJob => rule,
        }
    }

    /// Whether a missing mutation is a denial: on a pod, yes (moat's mutating webhook would
    /// have made it); on a template, no (moat mutates its pods when they are created).
    fn needs_mutation(self) -> bool {
        self == Self::Pod
    }

    /// The policy's name suffix.
    fn suffix(self) -> &'static str {
        match self {
            Self::Pod => "",
            Self::Workload => "-workloads",
            Self::CronJob => "-cronjobs",
        }
    }

    /// The resource rules of `matchConstraints`, with the API server's defaults.
    fn resource_rules(self) -> Value {
        let rule = |group: &str, resources: &[&str]| {
            json!({
                "apiGroups": [group],
                "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": resources,
                "scope": "*",
            })
        };
        match self {
            Self::Pod => json!([rule(
                "",
                &["pods", "pods/ephemeralcontainers", "pods/status"]
            )]),
            Self::Workload => json!([
                rule(
                    "apps",
                    &["deployments", "replicasets", "statefulsets", "daemonsets"]
                ),
                rule("batch", &["jobs"]),
                rule("", &["replicationcontrollers"]),
            ]),
            Self::CronJob => json!([rule("batch", &["cronjobs"])]),
        }
    }
}

/// The backstop's objects.
#[derive(Debug, Clone)]
pub struct Backstop {
    pub policies: Vec<ValidatingAdmissionPolicy>,
    pub bindings: Vec<ValidatingAdmissionPolicyBinding>,
}

/// Compiles `config` into the backstop's policies and bindings. `also_exempt` names the
/// namespaces the installation exempts beyond the configuration's (moat's own, the node agent's,
/// `kube-system`), as its webhooks do.
///
/// # Errors
/// Only if an object does not fit the Kubernetes types (a bug: tested for every example
/// configuration).
pub fn compile(config: &Config, also_exempt: &[&str]) -> Result<Backstop, serde_json::Error> {
    let mut policies = Vec::new();
    let mut bindings = Vec::new();
    for mut c in rules(config) {
        if !also_exempt.is_empty() {
            c.match_conditions.push((
                "not-moat-namespace".to_owned(),
                format!(
                    "!(request.namespace in {})",
                    list(also_exempt.iter().copied())
                ),
            ));
        }
        let (policy, binding) = objects(config, &c, also_exempt);
        policies.push(serde_json::from_value(policy)?);
        bindings.push(serde_json::from_value(binding)?);
    }
    Ok(Backstop { policies, bindings })
}

/// The compiled rules of `config`, one per moat policy that has something to check.
///
/// Each moat policy has one for pods and one for each shape of workload template, so that
/// a workload whose pods could never be admitted is refused when it is written, as moat's
/// webhook refuses it, not later, out of its author's sight. A template policy holds the
/// rules for a new pod without those that ask for moat's mutations (moat makes them on each
/// pod); one with nothing left to check is not written.
pub fn rules(config: &Config) -> Vec<Compiled> {
    let mut out = Vec::new();
    for s in Subject::ALL {
        out.push(images(config, s));
        out.push(runtime(config, s));
        if config.isolation.is_on() {
            out.push(isolation(config, s));
        }
        if config.identity.service_account_annotation.is_some() {
            out.push(identity(config, s));
        }
    }
    for c in &mut out {
        if !c.subject.needs_mutation() {
            c.validations
                .retain(|(_, message)| !message.contains(NOT_MUTATED));
        }
    }
    out.retain(|c| !c.validations.is_empty());
    out
}

fn objects(config: &Config, c: &Compiled, also_exempt: &[&str]) -> (Value, Value) {
    let labels =
        json!({"app.kubernetes.io/name": "moat", "app.kubernetes.io/component": "backstop"});
    let mut exact: Vec<&str> = also_exempt.to_vec();
    for p in config.exemptions.namespaces.iter().filter(|p| !p.is_glob()) {
        if !exact.contains(&p.as_str()) {
            exact.push(p.as_str());
        }
    }
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": c.name, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            // Written whole, with the API server's defaults: `matchConstraints` is atomic, so a
            // server-side apply over a client-side one would otherwise conflict with the
            // defaulted live value (found on a real kube-apiserver).
            "matchConstraints": {
                "matchPolicy": "Equivalent",
                "namespaceSelector": {},
                "objectSelector": {},
                "resourceRules": c.subject.resource_rules(),
            },
            "matchConditions": c.match_conditions.iter().map(|(name, expression)| json!({"name": name, "expression": expression})).collect::<Vec<_>>(),
            "variables": c.variables.iter().map(|(name, expression)| json!({"name": name, "expression": expression})).collect::<Vec<_>>(),
            "validations": c.validations.iter().map(|(expression, message)| json!({
                "expression": expression,
                "messageExpression": message,
                "reason": "Forbidden",
            })).collect::<Vec<_>>(),
        },
    });
    let mut binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": c.name, "labels": labels},
        "spec": {
            "policyName": c.name,
            "validationActions": c.actions,
        },
    });
    if !exact.is_empty() {
        // Atomic too: written with the defaults the API server fills in.
        binding["spec"]["matchResources"] = json!({
            "matchPolicy": "Equivalent",
            "namespaceSelector": {"matchExpressions": [
                {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": exact},
            ]},
            "objectSelector": {},
        });
    }
    (policy, binding)
}

/// What every policy shares: its name, the exempt namespaces as match conditions, enforcement;
/// for a template, the template as `variables.template`, and a match condition that leaves
/// out updates that keep it (scaling, labels, finalizers), as moat's webhook does.
fn base(config: &Config, policy: Policy, subject: Subject) -> Compiled {
    let mut match_conditions = Vec::new();
    let mut variables = Vec::new();
    if subject != Subject::Pod {
        match_conditions.push((
            "template-changed".to_owned(),
            format!(
                "oldObject == null || {} != {}",
                subject.template_of("object"),
                subject.template_of("oldObject")
            ),
        ));
        variables.push(("template".to_owned(), subject.template_of("object")));
    }
    let patterns = &config.exemptions.namespaces;
    if !patterns.is_empty() {
        let exact: Vec<&str> = patterns
            .iter()
            .filter(|p| !p.is_glob())
            .map(|p| p.as_str())
            .collect();
        let mut parts = vec![format!("!(request.namespace in {})", list(exact))];
        for glob in patterns.iter().filter(|p| p.is_glob()) {
            parts.push(format!(
                "!request.namespace.matches({})",
                lit(&glob_regex(glob.as_str()))
            ));
        }
        match_conditions.push(("not-exempt-namespace".to_owned(), parts.join(" && ")));
    }
    let actions = match enforcement(&config.enforcement, policy) {
        moat_core::config::Enforcement::Enforce => vec!["Deny"],
        moat_core::config::Enforcement::Audit => vec!["Warn", "Audit"],
    };
    Compiled {
        policy,
        subject,
        name: format!(
            "moat-{}{}",
            policy.as_str().to_ascii_lowercase(),
            subject.suffix()
        ),
        match_conditions,
        variables,
        validations: Vec::new(),
        actions,
    }
}

/// `true` on CREATE: the rules that apply to a new pod spec.
const CREATE: &str = "request.operation == 'CREATE'";

/// Every image a pod pulls, as `name/image` keys (container and volume names hold no `/`).
fn image_keys(o: &str) -> String {
    let img = "(has(c.image) ? c.image : '')";
    format!(
        "{o}.spec.containers.map(c, c.name + '/' + {img}) + \
         (has({o}.spec.initContainers) ? {o}.spec.initContainers.map(c, c.name + '/' + {img}) : []) + \
         (has({o}.spec.ephemeralContainers) ? {o}.spec.ephemeralContainers.map(c, c.name + '/' + {img}) : []) + \
         (has({o}.spec.volumes) ? {o}.spec.volumes.filter(v, has(v.image)).map(v, v.name + '/' + (has(v.image.reference) ? v.image.reference : '')) : [])"
    )
}

/// The match condition of a pod webhook that must see every request in which moat would ask a
/// registry about an image (`images.trust`): a new pod, or an update that changes what one of
/// its containers or image volumes pulls (an added ephemeral container included). Status
/// reports and label, annotation or finalizer changes leave it false. Sound by construction:
/// where it is false, every `name/image` key of the pod was already the old pod's, and moat
/// resolves only images whose key is new (tested against the engine in `tests/equivalence.rs`).
pub fn images_changed() -> String {
    format!(
        "oldObject == null || ({}) != ({})",
        image_keys("object"),
        image_keys("oldObject")
    )
}

/// The match condition of a webhook that reviews pods beside one matched by [`images_changed`]
/// (with the same path): every request the other leaves out, so each is reviewed once.
pub fn not_an_image_change() -> String {
    format!(
        "request.resource.resource != 'pods' || request.subResource == 'status' || !({})",
        images_changed()
    )
}

/// Every image a pod pulls, with its key.
fn image_entries(o: &str) -> String {
    let entry =
        // `string(...)`: the API server's type checker reads a conditional as `dyn` inside a map
        // literal and refuses a map whose values are `string` and `dyn` ("expected type
        // 'string' but found 'dyn'"); the conversion states the type it cannot infer.
        |name: &str, image: &str| format!("{{'key': {name} + '/' + {image}, 'image': string({image})}}");
    let c = entry("c.name", "(has(c.image) ? c.image : '')");
    let v = entry(
        "v.name",
        "(has(v.image.reference) ? v.image.reference : '')",
    );
    format!(
        "{o}.spec.containers.map(c, {c}) + \
         (has({o}.spec.initContainers) ? {o}.spec.initContainers.map(c, {c}) : []) + \
         (has({o}.spec.ephemeralContainers) ? {o}.spec.ephemeralContainers.map(c, {c}) : []) + \
         (has({o}.spec.volumes) ? {o}.spec.volumes.filter(v, has(v.image)).map(v, {v}) : [])"
    )
}

/// Whether image reference `i` parses by moat's grammar.
fn valid_reference(i: &str) -> String {
    let strict = [("sha256", 64), ("sha384", 96), ("sha512", 128)]
        .iter()
        .map(|(alg, len)| {
            format!(
                "(!{i}.contains('@{alg}:') || {i}.matches({}))",
                lit(&format!("@{alg}:[0-9a-f]{{{len}}}$"))
            )
        })
        .collect::<Vec<_>>()
        .join(" && ");
    format!(
        "{i}.matches({}) && (!{i}.matches({}) || {i}.matches({})) && {strict}",
        lit(&reference_regex()),
        lit(HAS_DOMAIN),
        lit(&format!("^{}/", crate::cel::domain_regex())),
    )
}

/// Whether (valid) reference `i` has a digest or a tag other than `latest`.
fn pinned(i: &str) -> String {
    format!(
        "({i}.contains('@') || ({i}.matches({}) && !{i}.matches(':latest$')))",
        lit(&format!(":{TAG}$"))
    )
}

/// Whether (valid) reference `i`, normalised as Docker does, lives under `prefix`
/// (`registry[/path]`, matched on whole path components).
fn under_prefix(i: &str, prefix: &str) -> String {
    let (domain, path) = match prefix.split_once('/') {
        Some((d, p)) => (d, Some(p)),
        None => (prefix, None),
    };
    // After a path prefix: another component, the tag, the digest, or the end.
    let after = "(?:[/:@]|$)";
    if domain != moat_core::image::DEFAULT_DOMAIN {
        let domain = registry_regex(domain);
        let re = match path {
            Some(p) => format!("^{domain}/{}{after}", regex_escape(p)),
            None => format!("^{domain}/"),
        };
        return format!("{i}.matches({})", lit(&re));
    }
    let explicit = format!(
        "(?i:docker\\.io|index\\.docker\\.io|registry-1\\.docker\\.io){}/",
        port_regex(None)
    );
    let explicit = explicit.as_str();
    let implicit = format!("!{i}.matches({})", lit(HAS_DOMAIN));
    let Some(p) = path else {
        // Any reference Docker reads as docker.io's.
        return format!(
            "({i}.matches({}) || {implicit})",
            lit(&format!("^{explicit}"))
        );
    };
    // docker.io/x and a bare x are docker.io/library/x.
    let mut alternatives = vec![
        // Written with the registry, two or more components.
        format!(
            "{i}.matches({})",
            lit(&format!("^{explicit}{}{after}", regex_escape(p)))
        ),
        // Without it, two or more components: the path as written.
        format!(
            "({implicit} && {i}.matches({}))",
            lit(&format!("^{}/", "[^/]+"))
        ) + &format!(
            " && {i}.matches({})",
            lit(&format!("^{}{after}", regex_escape(p)))
        ),
    ];
    let single = match p.strip_prefix("library") {
        Some("") => Some("[^/:@]+".to_owned()),
        Some(rest) => rest
            .strip_prefix('/')
            .filter(|r| !r.contains('/'))
            .map(regex_escape),
        None => None,
    };
    if let Some(single) = single {
        alternatives.push(format!(
            "{i}.matches({})",
            lit(&format!("^{explicit}{single}(?:[:@]|$)"))
        ));
        alternatives.push(format!(
            "(!{i}.contains('/') && {i}.matches({}))",
            lit(&format!("^{single}(?:[:@]|$)"))
        ));
    }
    format!("({})", alternatives.join(" || "))
}

/// Every spelling of canonical registry `domain` ([`moat_core::image::canonical_registry`]):
/// any letter case (RE2's `(?i:…)`), and the port as [`port_regex`] writes it.
fn registry_regex(domain: &str) -> String {
    let host_end = domain.rfind(']').map_or(0, |i| i + 1);
    let (host, port) = match domain[host_end..].rfind(':') {
        Some(at) => (&domain[..host_end + at], Some(&domain[host_end + at + 1..])),
        None => (domain, None),
    };
    format!("(?i:{}){}", regex_escape(host), port_regex(port))
}

/// A canonical port with any leading zeros; no port, also `:443` (what `https://host` reaches).
fn port_regex(port: Option<&str>) -> String {
    match port {
        Some(p) => format!(":0*{}", regex_escape(p)),
        None => "(?::0*443)?".to_owned(),
    }
}

fn images(config: &Config, s: Subject) -> Compiled {
    let mut c = base(config, Policy::Images, s);
    let policy = &config.images;
    // On a pod's UPDATE, only new images are checked; a template is checked whole.
    let unchanged = match s {
        Subject::Pod => format!("oldObject == null ? [] : {}", image_keys("oldObject")),
        Subject::Workload | Subject::CronJob => "[]".to_owned(),
    };
    c.variables.extend([
        ("unchanged".to_owned(), unchanged),
        ("entries".to_owned(), image_entries(s.pod())),
        (
            "checked".to_owned(),
            "variables.entries.filter(e, !(e.key in variables.unchanged)).map(e, e.image)"
                .to_owned(),
        ),
        (
            "invalid".to_owned(),
            format!(
                "variables.checked.filter(i, i != '' && !({}))",
                valid_reference("i")
            ),
        ),
        (
            "valid".to_owned(),
            format!(
                "variables.checked.filter(i, i != '' && {})",
                valid_reference("i")
            ),
        ),
    ]);
    c.validations.push((
        "variables.entries.all(e, e.image != '')".to_owned(),
        lit("a container or image volume has no image"),
    ));
    c.validations.push((
        "size(variables.invalid) == 0".to_owned(),
        "'image \\'' + variables.invalid[0] + '\\' is not a valid reference'".to_owned(),
    ));
    if !policy.allowed_registries.is_empty() {
        let allowed: Vec<String> = policy
            .allowed_registries
            .iter()
            .map(|r| under_prefix("i", &r.to_string()))
            .collect();
        let names: Vec<String> = policy
            .allowed_registries
            .iter()
            .map(ToString::to_string)
            .collect();
        c.variables.push((
            "disallowed".to_owned(),
            format!("variables.valid.filter(i, !({}))", allowed.join(" || ")),
        ));
        c.validations.push((
            "size(variables.disallowed) == 0".to_owned(),
            format!(
                "'image \\'' + variables.disallowed[0] + '\\' is not from an allowed registry ({})'",
                names.join(", ").replace('\'', "")
            ),
        ));
    }
    if policy.require_digest {
        c.variables.push((
            "unpinned".to_owned(),
            "variables.valid.filter(i, !i.contains('@'))".to_owned(),
        ));
        c.validations.push((
            "size(variables.unpinned) == 0".to_owned(),
            "'image \\'' + variables.unpinned[0] + '\\' must be pinned by digest (@sha256:…)'"
                .to_owned(),
        ));
    } else {
        c.variables.push((
            "unpinned".to_owned(),
            format!("variables.valid.filter(i, !{})", pinned("i")),
        ));
        c.validations.push((
            "size(variables.unpinned) == 0".to_owned(),
            "'image \\'' + variables.unpinned[0] + '\\' has no tag or uses the mutable tag \\'latest\\'; pin a version tag or a digest'".to_owned(),
        ));
    }
    c
}

/// Variables that decide a pod's isolation class, as moat's isolation check does: the
/// namespace's class label (operator-written), else the pod's own label, else the namespace's
/// default; and whether the pod is isolated (a class, and no exemption a tenant may trigger).
fn class_variables(config: &Config, s: Subject) -> Vec<(String, String)> {
    let iso = &config.isolation;
    let ex = &config.exemptions;
    let pod_key = lit(iso.pod_class_label.as_str());
    let p = s.pod();
    let mut v = vec![
        (
            "labels".to_owned(),
            format!("has({p}.metadata) && has({p}.metadata.labels) ? {p}.metadata.labels : {{}}"),
        ),
        (
            "annotations".to_owned(),
            format!(
                "has({p}.metadata) && has({p}.metadata.annotations) ? {p}.metadata.annotations : {{}}"
            ),
        ),
        (
            "podClass".to_owned(),
            format!("{pod_key} in variables.labels ? variables.labels[{pod_key}] : ''"),
        ),
    ];
    let ns_class = match &iso.namespace_class_label {
        Some(k) => {
            let k = lit(k.as_str());
            format!(
                "namespaceObject != null && has(namespaceObject.metadata.labels) && {k} in namespaceObject.metadata.labels ? namespaceObject.metadata.labels[{k}] : ''"
            )
        }
        None => "''".to_owned(),
    };
    v.push(("nsClass".to_owned(), ns_class));
    let isolate_ns = if iso.isolate_namespaces.is_empty() {
        "false".to_owned()
    } else {
        iso.isolate_namespaces
            .iter()
            .map(|p| {
                format!(
                    "request.namespace.matches({})",
                    lit(&glob_regex(p.as_str()))
                )
            })
            .collect::<Vec<_>>()
            .join(" || ")
    };
    v.push(("isolateNamespace".to_owned(), isolate_ns));
    let default_class = iso.default_class.as_ref().map_or("", |c| c.as_str());
    v.push((
        "class".to_owned(),
        format!(
            "variables.nsClass != '' ? variables.nsClass : (variables.podClass != '' ? variables.podClass : (variables.isolateNamespace ? {} : ''))",
            lit(default_class)
        ),
    ));
    v.push((
        "forced".to_owned(),
        "variables.nsClass != '' || variables.isolateNamespace".to_owned(),
    ));
    // A DaemonSet's template, or a pod the DaemonSet controller creates (`userInfo`, which
    // only the API server writes).
    let daemon_set_pod = match s {
        Subject::Pod if ex.daemon_set_controllers.is_empty() => "false".to_owned(),
        Subject::Pod => format!(
            "request.userInfo.username in {} && has({p}.metadata.ownerReferences) && {p}.metadata.ownerReferences.exists(r, has(r.controller) && r.controller == true && r.kind == 'DaemonSet' && r.apiVersion.startsWith('apps/'))",
            list(ex.daemon_set_controllers.iter().map(String::as_str))
        ),
        Subject::Workload => "object.kind == 'DaemonSet'".to_owned(),
        Subject::CronJob => "false".to_owned(),
    };
    v.push(("daemonSetPod".to_owned(), daemon_set_pod));
    let mut exemptions = Vec::new();
    if !ex.daemon_set_controllers.is_empty() || s == Subject::Workload {
        exemptions.push("variables.daemonSetPod".to_owned());
    }
    if let Some(a) = &ex.ignore_annotation {
        let a = lit(a.as_str());
        exemptions.push(format!(
            "({a} in variables.annotations && variables.annotations[{a}] == 'true')"
        ));
    }
    if ex.pinned_pods {
        let ours = list([
            iso.nodes.label_key.as_str(),
            iso.dedicated_node_label.as_str(),
            iso.nodes.topology_key.as_str(),
        ]);
        exemptions.push(format!(
            "((has({p}.spec.nodeSelector) && {p}.spec.nodeSelector.exists(k, !(k in {ours}))) || \
             (has({p}.spec.affinity) && has({p}.spec.affinity.nodeAffinity) && has({p}.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution) && \
              {p}.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms.exists(t, \
                (has(t.matchFields) && size(t.matchFields) > 0) || (has(t.matchExpressions) && t.matchExpressions.exists(e, !(e.key in {ours}))))))"
        ));
    }
    if ex.dry_run {
        exemptions.push("(has(request.dryRun) && request.dryRun == true)".to_owned());
    }
    let exempt = if exemptions.is_empty() {
        "false".to_owned()
    } else {
        format!("!variables.forced && ({})", exemptions.join(" || "))
    };
    v.push(("exempt".to_owned(), exempt));
    v.push((
        "isolated".to_owned(),
        "variables.class != '' && !variables.exempt".to_owned(),
    ));
    // Isolated, and the class one moat places: a valid, declared class the namespace may use
    // (a class the namespace's label forces needs no binding), not contradicted by the pod,
    // and not a DaemonSet's (refused where a class is forced, exempt elsewhere).
    v.push((
        "placed".to_owned(),
        format!(
            "variables.isolated && !variables.daemonSetPod && variables.class.matches({CLASS_NAME_RE}) && {} && (variables.nsClass != '' ? (variables.podClass == '' || variables.podClass == variables.nsClass) : {})",
            declared(config, "variables.class"),
            bound(config, "variables.class")
        ),
    ));
    v
}

/// A valid class name: a lower-case DNS label of at most 40 characters.
const CLASS_NAME_RE: &str = "'^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$'";

/// Whether `class` (a CEL string) names a declared class bound to the request's namespace.
fn bound(config: &Config, class: &str) -> String {
    let spec_binding = |spec: &ClassSpec| {
        let mut any = Vec::new();
        for p in &spec.namespaces {
            any.push(format!(
                "request.namespace.matches({})",
                lit(&glob_regex(p.as_str()))
            ));
        }
        if let Some(sel) = &spec.namespace_selector {
            let labels = "(namespaceObject != null && has(namespaceObject.metadata.labels) ? namespaceObject.metadata.labels : {})";
            let mut all = Vec::new();
            for (k, v) in &sel.match_labels {
                let k = lit(k.as_str());
                all.push(format!(
                    "({k} in {labels} && {labels}[{k}] == {})",
                    lit(v.as_str())
                ));
            }
            for r in &sel.match_expressions {
                let k = lit(r.key.as_str());
                let values = list(r.values.iter().map(|v| v.as_str()));
                let has_in = format!("({k} in {labels} && {labels}[{k}] in {values})");
                all.push(match r.operator {
                    SelectorOperator::In => has_in,
                    SelectorOperator::NotIn => format!("!{has_in}"),
                    SelectorOperator::Exists => format!("({k} in {labels})"),
                    SelectorOperator::DoesNotExist => format!("!({k} in {labels})"),
                });
            }
            any.push(if all.is_empty() {
                "true".to_owned()
            } else {
                format!("({})", all.join(" && "))
            });
        }
        if any.is_empty() {
            "false".to_owned()
        } else {
            format!("({})", any.join(" || "))
        }
    };
    let classes = &config.isolation.classes;
    let mut expr = classes
        .iter()
        .find(|c| c.name == ClassPattern::Any)
        .map_or("false".to_owned(), spec_binding);
    for spec in classes.iter().rev() {
        if let ClassPattern::Name(n) = &spec.name {
            expr = format!(
                "({class} == {} ? {} : {expr})",
                lit(n.as_str()),
                spec_binding(spec)
            );
        }
    }
    expr
}

/// Whether `class` (a CEL string) is declared.
fn declared(config: &Config, class: &str) -> String {
    if config
        .isolation
        .classes
        .iter()
        .any(|c| c.name == ClassPattern::Any)
    {
        return "true".to_owned();
    }
    let names: Vec<&str> = config
        .isolation
        .classes
        .iter()
        .filter_map(|c| match &c.name {
            ClassPattern::Name(n) => Some(n.as_str()),
            ClassPattern::Any => None,
        })
        .collect();
    format!("{class} in {}", list(names))
}

/// The predicate of moat's toleration guard: tolerates the isolation taint.
fn tolerates_isolation(config: &Config, t: &str) -> String {
    let nodes = &config.isolation.nodes;
    let effect = lit(nodes.taint_effect.as_str());
    let value = match &nodes.taint_value {
        Some(v) => format!(
            "((has({t}.operator) && {t}.operator == 'Exists') || (has({t}.value) ? {t}.value : '') == {})",
            lit(v.as_str())
        ),
        None => "true".to_owned(),
    };
    format!(
        "((!has({t}.effect) || {t}.effect == '' || {t}.effect == {effect}) && \
          (((!has({t}.key) || {t}.key == '') && has({t}.operator) && {t}.operator == 'Exists') || (has({t}.key) && {t}.key == {})) && {value})",
        lit(nodes.taint_key.as_str())
    )
}

fn isolation(config: &Config, s: Subject) -> Compiled {
    let iso = &config.isolation;
    let mut c = base(config, Policy::Isolation, s);
    let p = s.pod();
    c.variables.extend(class_variables(config, s));
    c.variables.push((
        "tolerations".to_owned(),
        format!("has({p}.spec.tolerations) ? {p}.spec.tolerations : []"),
    ));
    let pod_key = lit(iso.pod_class_label.as_str());
    let class_re = CLASS_NAME_RE;
    let guard = tolerates_isolation(config, "t");

    if s == Subject::Pod {
        // A running pod: the class label cannot change, new tolerations are guarded.
        c.variables.push((
            "oldLabels".to_owned(),
            "oldObject != null && has(oldObject.metadata.labels) ? oldObject.metadata.labels : {}"
                .to_owned(),
        ));
        c.variables.push((
            "oldTolerations".to_owned(),
            "oldObject != null && has(oldObject.spec.tolerations) ? oldObject.spec.tolerations : []"
                .to_owned(),
        ));
        let update = "request.operation == 'UPDATE'";
        c.validations.push((
            format!(
                "!({update}) || oldObject == null || (({pod_key} in variables.oldLabels ? variables.oldLabels[{pod_key}] : '') == variables.podClass)"
            ),
            format!(
                "'metadata.labels[\\'{}\\']: the isolation class of a running pod cannot change'",
                iso.pod_class_label
            ),
        ));
        c.validations.push((
            format!(
                "!({update}) || variables.tolerations.all(t, t in variables.oldTolerations || !{guard})"
            ),
            format!(
                "'spec.tolerations: tolerates moat\\'s isolation taint \\'{}\\', which only pods that moat isolates may do'",
                iso.nodes.taint_key
            ),
        ));
    }

    if !iso.allow_node_name {
        c.validations.push((
            s.when_new(format!("!has({p}.spec.nodeName) || {p}.spec.nodeName == ''")),
            lit("spec.nodeName: binding a pod to a node by name skips the scheduler and the isolation taints; use a nodeSelector"),
        ));
    }
    c.validations.push((
        s.when_new(format!(
            "(has({p}.spec.schedulerName) && {p}.spec.schedulerName != '' ? {p}.spec.schedulerName : 'default-scheduler') in {}",
            list(iso.scheduler_names.iter().map(String::as_str))
        )),
        format!(
            "'spec.schedulerName: scheduler \\'' + {p}.spec.schedulerName + '\\' is not allowed (allowed: {}); another scheduler may ignore the isolation taints'",
            iso.scheduler_names.join(", ").replace('\'', "")
        ),
    ));
    if iso.namespace_class_label.is_some() {
        c.validations.push((
            s.when_new(format!(
                "variables.nsClass == '' || (variables.nsClass.matches({class_re}) && (variables.podClass == '' || variables.podClass == variables.nsClass))"
            )),
            "'the pod asks for isolation class \\'' + variables.podClass + '\\', but its namespace is bound to class \\'' + variables.nsClass + '\\''".to_owned(),
        ));
    }
    c.validations.push((
        s.when_new(format!(
            "variables.nsClass != '' || variables.podClass == '' || variables.podClass.matches({class_re})"
        )),
        "'metadata.labels: \\'' + variables.podClass + '\\' is not a valid isolation class name'"
            .to_owned(),
    ));
    c.validations.push((
        s.when_new(format!(
            "!variables.isolated || !variables.class.matches({class_re}) || {}",
            declared(config, "variables.class")
        )),
        "'isolation class \\'' + variables.class + '\\' is not declared'".to_owned(),
    ));
    // A class the pod chose (its own label) must be one its namespace may use, also when the
    // pod is exempt: other pods' anti-affinity reads the label.
    c.validations.push((
        s.when_new(format!(
            "variables.nsClass != '' || variables.podClass == '' || !variables.podClass.matches({class_re}) || !({}) || {}",
            declared(config, "variables.podClass"),
            bound(config, "variables.podClass")
        )),
        "'namespace \\'' + request.namespace + '\\' may not use isolation class \\'' + variables.podClass + '\\''".to_owned(),
    ));
    // A DaemonSet's pod where the operator forces a class could never run: refused (a
    // CronJob's template is never a DaemonSet's).
    if s != Subject::CronJob {
        c.validations.push((
        s.when_new("!variables.forced || !variables.daemonSetPod".to_owned()),
        "'namespace \\'' + request.namespace + '\\' runs every pod in isolation class \\'' + variables.class + '\\', so a DaemonSet\\'s pods could never run there: its controller makes one for each node without moat\\'s taint, and moat pins each to nodes of the class; run node agents in an exempt namespace'".to_owned(),
    ));
    }
    // Not isolated: keep off isolated nodes.
    c.validations.push((
        s.when_new(format!("variables.isolated || variables.tolerations.all(t, !{guard})")),
        format!(
            "'spec.tolerations: tolerates moat\\'s isolation taint \\'{}\\', which only pods that moat isolates may do'",
            iso.nodes.taint_key
        ),
    ));
    // Isolated: everything moat adds is there.
    let label_key = lit(iso.nodes.label_key.as_str());
    let node_value = match &iso.nodes.label_value {
        Some(v) => lit(v.as_str()),
        None => "variables.class".to_owned(),
    };
    let taint_value = match &iso.nodes.taint_value {
        Some(v) => lit(v.as_str()),
        None => "variables.class".to_owned(),
    };
    let selector = format!("(has({p}.spec.nodeSelector) ? {p}.spec.nodeSelector : {{}})");
    c.validations.push((
        s.when_new(format!(
            "!variables.placed || (variables.podClass == variables.class && variables.tolerations.exists(t, has(t.key) && t.key == {} && has(t.operator) && t.operator == 'Equal' && has(t.value) && t.value == {taint_value} && has(t.effect) && t.effect == {}))",
            lit(iso.nodes.taint_key.as_str()),
            lit(iso.nodes.taint_effect.as_str())
        )),
        format!("'moat\\'s isolation (class label and toleration of class \\'' + variables.class + '\\') is missing from the pod{NOT_MUTATED}'"),
    ));
    c.validations.push((
        s.when_new(format!(
            "!variables.placed || !({label_key} in {selector}) || {selector}[{label_key}] == {node_value}"
        )),
        format!(
            "'spec.nodeSelector[\\'{}\\'] is not the node label of class \\'' + variables.class + '\\'; moat sets this key'",
            iso.nodes.label_key
        ),
    ));
    // Each class's placement follows its mode: with one mode for every class the expression
    // is that mode's alone; with several, `variables.mode` (the class's mode) chooses.
    let modes = class_modes(config);
    let uniform = match modes.as_slice() {
        [(_, only)] => Some(*only),
        _ => None,
    };
    if uniform.is_none() {
        c.variables.push(("mode".to_owned(), mode_variable(&modes)));
    }
    let is_mode = |mode: ClassMode| match uniform {
        Some(only) => (if only == mode { "true" } else { "false" }).to_owned(),
        None => format!("variables.mode == {}", lit(mode.as_str())),
    };
    let dedicated = {
        let key = lit(iso.dedicated_node_label.as_str());
        format!(
            "{label_key} in {selector} && {key} in {selector} && {selector}[{key}].matches('^' + variables.class + '-[0-9a-f]{{22}}$')"
        )
    };
    let affinity = {
        let topology = lit(iso.nodes.topology_key.as_str());
        let class_key = lit(iso.pod_class_label.as_str());
        let other = match uniform {
            Some(ClassMode::Pod) => String::new(),
            Some(_) => format!(
                " && t.labelSelector.matchExpressions.exists(e, e.key == {class_key} && e.operator == 'NotIn' && has(e.values) && e.values == [variables.class])"
            ),
            None => format!(
                " && ({} || t.labelSelector.matchExpressions.exists(e, e.key == {class_key} && e.operator == 'NotIn' && has(e.values) && e.values == [variables.class]))",
                is_mode(ClassMode::Pod)
            ),
        };
        format!(
            "has({p}.spec.affinity) && has({p}.spec.affinity.nodeAffinity) && has({p}.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution) && \
                 {p}.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms.all(t, has(t.matchExpressions) && \
                   t.matchExpressions.exists(e, e.key == {label_key} && e.operator == 'In' && has(e.values) && e.values == [{node_value}]) && \
                   t.matchExpressions.exists(e, e.key == {topology} && e.operator == 'Exists')) && \
                 has({p}.spec.affinity.podAntiAffinity) && has({p}.spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution) && \
                 {p}.spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution.exists(t, t.topologyKey == {topology} && has(t.namespaceSelector) && has(t.labelSelector) && has(t.labelSelector.matchExpressions) && \
                   t.labelSelector.matchExpressions.exists(e, e.key == {class_key} && e.operator == 'Exists'){other})"
        )
    };
    let placed = match uniform {
        Some(ClassMode::DedicatedNode) => dedicated,
        Some(_) => affinity,
        None => format!(
            "{} ? ({dedicated}) : ({affinity})",
            is_mode(ClassMode::DedicatedNode)
        ),
    };
    c.validations.push((
        s.when_new(format!("!variables.placed || ({placed})")),
        format!("'moat\\'s placement on the nodes of class \\'' + variables.class + '\\' is missing from the pod{NOT_MUTATED}'"),
    ));
    c
}

/// The placement mode of each declaration (`*` as the name of the `*` entry), in order; a
/// mode shared by every class is one entry.
fn class_modes(config: &Config) -> Vec<(String, ClassMode)> {
    let iso = &config.isolation;
    let all: Vec<(String, ClassMode)> = iso
        .classes
        .iter()
        .filter_map(|s| {
            let name = match &s.name {
                ClassPattern::Any => "*".to_owned(),
                ClassPattern::Name(n) => n.to_string(),
            };
            Some((name, iso.mode_of(s)?))
        })
        .collect();
    match all.first() {
        Some((_, first)) if all.iter().all(|(_, m)| m == first) => vec![("*".to_owned(), *first)],
        _ => all,
    }
}

/// `variables.mode`: the mode of `variables.class`, as moat's `class_spec` finds it (its own
/// entry, else `*`'s); `''` for a class nothing declares (never placed).
fn mode_variable(modes: &[(String, ClassMode)]) -> String {
    let mut expr = modes
        .iter()
        .find(|(n, _)| n == "*")
        .map_or("''".to_owned(), |(_, m)| lit(m.as_str()));
    for (name, mode) in modes.iter().rev().filter(|(n, _)| n != "*") {
        expr = format!(
            "(variables.class == {} ? {} : {expr})",
            lit(name),
            lit(mode.as_str())
        );
    }
    expr
}

fn runtime(config: &Config, s: Subject) -> Compiled {
    let rc = &config.runtime_class;
    let mut c = base(config, Policy::RuntimeClass, s);
    let p = s.pod();
    c.variables.push((
        "runtime".to_owned(),
        format!("has({p}.spec.runtimeClassName) ? {p}.spec.runtimeClassName : ''"),
    ));
    let reserved = list(rc.reserved_runtimes.iter().map(|r| r.as_str()));
    c.validations.push((
        s.when_new(format!("!(variables.runtime in {reserved})")),
        // With a fallback, moat rewrites a reserved runtime: a final pod that still names one
        // was not mutated (and a template is left for moat to rewrite in each pod).
        format!(
            "'spec.runtimeClassName: runtime \\'' + variables.runtime + '\\' is reserved{}'",
            if rc.fallback_runtime.is_some() {
                NOT_MUTATED
            } else {
                ""
            }
        ),
    ));
    // A class tied to a RuntimeClass: its isolated pods run with it.
    let tied: Vec<(String, &str)> = config
        .isolation
        .classes
        .iter()
        .filter_map(|spec| {
            let name = match &spec.name {
                ClassPattern::Any => "*".to_owned(),
                ClassPattern::Name(n) => n.to_string(),
            };
            Some((name, spec.runtime_class_name.as_ref()?.as_str()))
        })
        .collect();
    let tied_on = config.isolation.is_on() && !tied.is_empty();
    // An unset runtime: what moat sets, or refuses without a fallback (retrying cannot help),
    // unless, in a template, the pod's class will choose it.
    if rc.fallback_runtime.is_some() || rc.default_runtime_reserved {
        let class_chooses = if tied_on && s != Subject::Pod {
            " || (variables.placed && variables.classRuntime != '')"
        } else {
            ""
        };
        c.validations.push((
            s.when_new(format!("variables.runtime != ''{class_chooses}")),
            match &rc.fallback_runtime {
                Some(f) => format!(
                    "'spec.runtimeClassName: unset, and moat sets it to \\'{f}\\'{NOT_MUTATED}'"
                ),
                None => lit("spec.runtimeClassName: usage of the default runtime is reserved"),
            },
        ));
    }
    if tied_on {
        c.variables.extend(class_variables(config, s));
        let any = tied.iter().find(|(n, _)| n == "*").map(|(_, r)| *r);
        let mut expected = any.map_or("''".to_owned(), lit);
        for (name, runtime) in tied.iter().rev().filter(|(n, _)| n != "*") {
            expected = format!(
                "(variables.class == {} ? {} : {expected})",
                lit(name),
                lit(runtime)
            );
        }
        // A named class without a runtime does not fall back to `*`'s.
        let named: Vec<String> = config
            .isolation
            .classes
            .iter()
            .filter_map(|s| match &s.name {
                ClassPattern::Name(n) if s.runtime_class_name.is_none() => Some(n.to_string()),
                _ => None,
            })
            .collect();
        if !named.is_empty() {
            expected = format!(
                "(variables.class in {} ? '' : {expected})",
                list(named.iter().map(String::as_str))
            );
        }
        c.variables.push(("classRuntime".to_owned(), expected));
        // A final pod runs the class's runtime. In a template, the runtime the pod asks for
        // (after the fallback's rewrite) must be the class's; an unset one is the class's to set.
        let rule = match (s, &rc.fallback_runtime) {
            (Subject::Pod, _) => "variables.runtime == variables.classRuntime".to_owned(),
            (_, None) => {
                "variables.runtime == '' || variables.runtime == variables.classRuntime".to_owned()
            }
            (_, Some(f)) => format!(
                "variables.runtime == '' || (variables.runtime in {reserved} ? {} : variables.runtime) == variables.classRuntime",
                lit(f.as_str())
            ),
        };
        let retry = if s == Subject::Pod { NOT_MUTATED } else { "" };
        c.validations.push((
            s.when_new(format!(
                "!variables.placed || variables.classRuntime == '' || {rule}"
            )),
            format!("'spec.runtimeClassName: isolation class \\'' + variables.class + '\\' runs with RuntimeClass \\'' + variables.classRuntime + '\\', but the pod asks for \\'' + variables.runtime + '\\'{retry}'"),
        ));
    }
    c
}

fn identity(config: &Config, s: Subject) -> Compiled {
    let mut c = base(config, Policy::Identity, s);
    // A template carries no stamp to check: moat stamps each of its pods.
    let Some(key) = &config
        .identity
        .service_account_annotation
        .as_ref()
        .filter(|_| s == Subject::Pod)
    else {
        return c;
    };
    let k = lit(key.as_str());
    c.variables = vec![
        (
            "stamp".to_owned(),
            format!(
                "has(object.metadata.annotations) && {k} in object.metadata.annotations ? object.metadata.annotations[{k}] : ''"
            ),
        ),
        (
            "oldStamp".to_owned(),
            format!(
                "oldObject != null && has(oldObject.metadata.annotations) && {k} in oldObject.metadata.annotations ? oldObject.metadata.annotations[{k}] : ''"
            ),
        ),
        (
            "account".to_owned(),
            "has(object.spec.serviceAccountName) && object.spec.serviceAccountName != '' ? object.spec.serviceAccountName : 'default'".to_owned(),
        ),
    ];
    c.validations.push((
        format!("!({CREATE}) || variables.stamp == variables.account"),
        format!("'metadata.annotations[\\'{key}\\'] must name the pod\\'s service account \\'' + variables.account + '\\'{NOT_MUTATED}'"),
    ));
    c.validations.push((
        format!("{CREATE} || oldObject == null || variables.stamp == variables.oldStamp"),
        format!("'metadata.annotations[\\'{key}\\']: set by moat from the pod\\'s service account; it cannot change on a running pod'"),
    ));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modes(yaml: &str) -> Vec<(String, ClassMode)> {
        class_modes(&Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn each_kind_moat_reviews_is_in_the_resource_rules_of_its_subject_alone() {
        let kinds = [
            ("v1", "Pod", "", "pods"),
            ("v1", "ReplicationController", "", "replicationcontrollers"),
            ("apps/v1", "Deployment", "apps", "deployments"),
            ("apps/v1", "ReplicaSet", "apps", "replicasets"),
            ("apps/v1", "StatefulSet", "apps", "statefulsets"),
            ("apps/v1", "DaemonSet", "apps", "daemonsets"),
            ("batch/v1", "Job", "batch", "jobs"),
            ("batch/v1", "CronJob", "batch", "cronjobs"),
        ];
        for (api_version, kind, group, resource) in kinds {
            for s in Subject::ALL {
                let listed = s.resource_rules().as_array().unwrap().iter().any(|r| {
                    r["apiGroups"][0] == group
                        && r["resources"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|x| x == resource)
                });
                assert_eq!(listed, s.covers(api_version, kind), "{kind} in {s:?}");
            }
            assert_eq!(
                Subject::ALL
                    .iter()
                    .filter(|s| s.covers(api_version, kind))
                    .count(),
                1,
                "{kind}"
            );
        }
    }

    #[test]
    fn one_mode_for_every_class_compiles_to_that_modes_check_alone() {
        use ClassMode::{Class, DedicatedNode, Pod};
        let cases: &[(&str, &[(&str, ClassMode)])] = &[
            (
                "isolation: {mode: pod, classes: [{name: a, namespaces: [x]}, {name: b, mode: pod, namespaces: [y]}]}",
                &[("*", Pod)],
            ),
            (
                "isolation: {mode: class, classes: [{name: a, namespaces: [x]}, {name: b, mode: dedicatedNode, namespaces: [y]}, {name: '*', mode: pod, namespaces: [z]}]}",
                &[("a", Class), ("b", DedicatedNode), ("*", Pod)],
            ),
            (
                "isolation: {mode: off, classes: [{name: a, mode: pod, namespaces: [x]}]}",
                &[],
            ),
        ];
        for (yaml, want) in cases {
            let want: Vec<(String, ClassMode)> =
                want.iter().map(|(n, m)| ((*n).to_owned(), *m)).collect();
            assert_eq!(modes(yaml), want, "{yaml}");
        }
    }

    #[test]
    fn the_mode_variable_finds_a_class_as_class_spec_does() {
        let m = modes(
            "isolation: {mode: class, classes: [{name: a, namespaces: [x]}, {name: b, mode: dedicatedNode, namespaces: [y]}, {name: '*', mode: pod, namespaces: [z]}]}",
        );
        assert_eq!(
            mode_variable(&m),
            "(variables.class == 'a' ? 'class' : (variables.class == 'b' ? 'dedicatedNode' : 'pod'))"
        );
        // No `*`: an undeclared class has no mode (moat never places it).
        let m = modes(
            "isolation: {mode: class, classes: [{name: a, namespaces: [x]}, {name: b, mode: pod, namespaces: [y]}]}",
        );
        assert_eq!(
            mode_variable(&m),
            "(variables.class == 'a' ? 'class' : (variables.class == 'b' ? 'pod' : ''))"
        );
    }
}
