//! How the agent names a container to the SPIRE agent.
//!
//! Under runc the host sees the container's own process, and SPIRE's workload attestors turn
//! its PID into selectors (the Kubernetes attestor finds the container by the PID's cgroup). In a
//! sandbox (gVisor's `runsc`, Kata's VM) the runtime reports the sandbox's PID for every
//! container of the pod, and all of the pod's host processes share the pod's cgroup: a PID names
//! the pod at best, never the container. For those containers the agent asks by selectors
//! instead, in SPIRE's Kubernetes vocabulary, built from facts no tenant can write (see
//! [`PodFacts`]); the SPIRE agent then issues every registration entry whose selectors are a
//! subset of them.
//!
//! Leaving a fact out can only narrow what matches; a false fact could widen it. So a fact
//! whose source is missing (a pod with no service-account stamp, no class label) is left out,
//! never guessed.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::agent::{ContainerInfo, Pod};

/// The selector type of the facts the Kubernetes workload attestor also produces.
pub const K8S: &str = "k8s";
/// The selector type of facts only moat's agent produces: `moat:runtime-handler:<handler>`.
pub const MOAT: &str = "moat";
/// Value prefix of the runtime handler selector (`moat:runtime-handler:runsc`).
pub const RUNTIME_HANDLER: &str = "runtime-handler";

/// One SPIRE selector: `type:value`, e.g. `k8s:ns:shop`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// The attestor's name (`k8s`, `moat`).
    pub kind: String,
    /// What it says (`ns:shop`).
    pub value: String,
}

impl Selector {
    fn new(kind: &str, value: String) -> Self {
        Self {
            kind: kind.to_owned(),
            value,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// How a container's workload is named to the SPIRE agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// By its process, which the SPIRE agent attests (runc).
    Pid(i32),
    /// By selectors (a sandboxed container).
    Selectors(Vec<Selector>),
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pid(pid) => write!(f, "PID {pid}"),
            Self::Selectors(s) => {
                let s: Vec<String> = s.iter().map(ToString::to_string).collect();
                write!(f, "selectors [{}]", s.join(", "))
            }
        }
    }
}

/// A runtime handler name, or a prefix of one (`kata*`), that marks a sandboxed runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerPattern {
    name: String,
    prefix: bool,
}

/// A handler pattern that is not a handler name with an optional trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a sandboxed runtime handler is a name of [a-z0-9._-], optionally ending in '*' (a prefix), \
     not '{0}'"
)]
pub struct HandlerPatternError(String);

impl FromStr for HandlerPattern {
    type Err = HandlerPatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, prefix) = match s.strip_suffix('*') {
            Some(name) => (name, true),
            None => (s, false),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if valid {
            Ok(Self {
                name: name.to_owned(),
                prefix,
            })
        } else {
            Err(HandlerPatternError(s.to_owned()))
        }
    }
}

impl fmt::Display for HandlerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.name, if self.prefix { "*" } else { "" })
    }
}

impl HandlerPattern {
    /// Whether `handler` is this one (or starts with it, for a prefix).
    #[must_use]
    pub fn matches(&self, handler: &str) -> bool {
        if self.prefix {
            handler.starts_with(&self.name)
        } else {
            handler == self.name
        }
    }
}

/// What marks a sandbox, and where the pod's vetted facts are: read from moat's configuration
/// ([`SandboxConfig::from_moat`]), the same one the webhook decides with, so the agent never
/// trusts a key the webhook does not police.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Runtime handlers that run pods in a sandbox.
    pub handlers: Vec<HandlerPattern>,
    /// The class label, when moat's admission polices it (isolation on and enforced): `None`
    /// otherwise, and then no class is ever sent to SPIRE.
    pub class: Option<PolicedClass>,
    /// The pod annotation moat stamps with the pod's service account (and checks and freezes);
    /// `None` when the stamp is off, and then no service account is sent to SPIRE.
    pub service_account_annotation: Option<String>,
}

/// The class label as moat polices it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicedClass {
    /// The pod label that holds the class.
    pub label: String,
    /// The classes moat declares: a pod moat exempts from isolation may carry an undeclared
    /// class name unchecked, so only declared ones are vouched for.
    pub declared: DeclaredClasses,
}

/// Which class names moat checks against a namespace binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeclaredClasses {
    /// A `*` class: every valid name.
    Any,
    /// These names only.
    Only(std::collections::BTreeSet<String>),
}

impl PolicedClass {
    fn vouches_for(&self, class: &str) -> bool {
        match &self.declared {
            DeclaredClasses::Any => true,
            DeclaredClasses::Only(names) => names.contains(class),
        }
    }
}

impl Default for SandboxConfig {
    /// moat's default keys, with every class declared and the stamp on: what
    /// `moat install --identity-agent` installs with the embedded configuration.
    fn default() -> Self {
        Self {
            handlers: crate::defaults::SANDBOXED_RUNTIME_HANDLERS
                .iter()
                .filter_map(|h| h.parse().ok())
                .collect(),
            class: Some(PolicedClass {
                label: crate::defaults::CLASS_LABEL.to_owned(),
                declared: DeclaredClasses::Any,
            }),
            service_account_annotation: Some(
                crate::defaults::SERVICE_ACCOUNT_ANNOTATION.to_owned(),
            ),
        }
    }
}

impl SandboxConfig {
    /// What moat's configuration `config` vouches for: the class label only when isolation is
    /// on and enforced (in audit mode or off, a tenant writes it freely), with the declared
    /// classes; the service-account annotation only when moat stamps it.
    #[must_use]
    pub fn from_moat(config: &moat_core::config::Config, handlers: Vec<HandlerPattern>) -> Self {
        use moat_core::config::{ClassPattern, Enforcement, IsolationMode};
        let iso = &config.isolation;
        let policed =
            iso.mode != IsolationMode::Off && config.enforcement.isolation == Enforcement::Enforce;
        let class = policed.then(|| PolicedClass {
            label: iso.pod_class_label.to_string(),
            declared: if iso.classes.iter().any(|c| c.name == ClassPattern::Any) {
                DeclaredClasses::Any
            } else {
                DeclaredClasses::Only(
                    iso.classes
                        .iter()
                        .filter_map(|c| match &c.name {
                            ClassPattern::Name(n) => Some(n.to_string()),
                            ClassPattern::Any => None,
                        })
                        .collect(),
                )
            },
        });
        Self {
            handlers,
            class,
            service_account_annotation: config
                .identity
                .service_account_annotation
                .as_ref()
                .map(ToString::to_string),
        }
    }
}

/// Why a container counts as sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandboxed {
    /// Its pod's runtime handler is in the configured list.
    Handler,
    /// The runtime reported the sandbox's own PID for it.
    SandboxPid,
}

impl SandboxConfig {
    /// Whether `container` of `pod` runs in a sandbox, and why.
    #[must_use]
    pub fn sandboxed(&self, pod: &Pod, container: &ContainerInfo) -> Option<Sandboxed> {
        if self
            .handlers
            .iter()
            .any(|h| h.matches(&pod.runtime_handler))
        {
            Some(Sandboxed::Handler)
        } else if pod.pid != 0 && container.pid == pod.pid {
            Some(Sandboxed::SandboxPid)
        } else {
            None
        }
    }

    /// The facts of `pod` the selectors may rest on.
    #[must_use]
    pub fn facts<'a>(&'a self, pod: &'a Pod) -> PodFacts<'a> {
        PodFacts {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &pod.uid,
            runtime_handler: &pod.runtime_handler,
            service_account: self
                .service_account_annotation
                .as_deref()
                .and_then(|key| vetted(&pod.annotations, key)),
            class: self.class.as_ref().and_then(|policed| {
                vetted(&pod.labels, &policed.label)
                    .filter(|class| policed.vouches_for(class))
                    .map(|class| (policed.label.as_str(), class))
            }),
        }
    }

    /// How to name `container` of `pod` to SPIRE.
    #[must_use]
    pub fn workload(&self, pod: &Pod, container: &ContainerInfo) -> Option<Workload> {
        if self.sandboxed(pod, container).is_some() {
            return Some(Workload::Selectors(
                self.facts(pod).selectors(&container.name),
            ));
        }
        i32::try_from(container.pid)
            .ok()
            .filter(|pid| *pid > 0)
            .map(Workload::Pid)
    }
}

fn vetted<'a>(map: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    map.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

/// The facts of a pod that no tenant can forge, and so may name its workloads to SPIRE.
///
/// | fact | written by |
/// |---|---|
/// | namespace, name, uid | the API server, passed on by the kubelet and the runtime |
/// | runtime handler | the runtime: what the pod actually runs in |
/// | service account | moat's mutating webhook copies `spec.serviceAccountName`; its validating webhook denies a pod where the two differ and any UPDATE that changes it. Pods in namespaces moat exempts are trusted. |
/// | isolation class | the pod label moat's admission checks against the namespace's binding at CREATE and denies changing |
///
/// Every other label and annotation of the pod is the tenant's and is never a selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodFacts<'a> {
    /// Kubernetes namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub name: &'a str,
    /// Pod UID.
    pub uid: &'a str,
    /// The runtime handler the pod runs under.
    pub runtime_handler: &'a str,
    /// The stamped service account, when there is one.
    pub service_account: Option<&'a str>,
    /// `(class label key, class)`, when the pod has a class.
    pub class: Option<(&'a str, &'a str)>,
}

impl PodFacts<'_> {
    /// The selectors for container `container` of the pod, sorted.
    #[must_use]
    pub fn selectors(&self, container: &str) -> Vec<Selector> {
        let mut out = Vec::with_capacity(7);
        let mut k8s = |what: &str, value: &str| {
            if !value.is_empty() {
                out.push(Selector::new(K8S, format!("{what}:{value}")));
            }
        };
        k8s("ns", self.namespace);
        k8s("pod-name", self.name);
        k8s("pod-uid", self.uid);
        k8s("container-name", container);
        if let Some(sa) = self.service_account {
            k8s("sa", sa);
        }
        if let Some((key, class)) = self.class {
            k8s("pod-label", &format!("{key}:{class}"));
        }
        if !self.runtime_handler.is_empty() {
            out.push(Selector::new(
                MOAT,
                format!("{RUNTIME_HANDLER}:{}", self.runtime_handler),
            ));
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(handler: &str, pid: u32) -> Pod {
        Pod {
            id: "sb".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "u-1".into(),
            runtime_handler: handler.into(),
            pid,
            labels: [
                ("moat.dev/class".to_owned(), "gold".to_owned()),
                ("team".to_owned(), "payments".to_owned()),
            ]
            .into(),
            annotations: [
                ("moat.dev/service-account".to_owned(), "web".to_owned()),
                ("other".to_owned(), "x".to_owned()),
            ]
            .into(),
        }
    }

    fn ctr(pid: u32) -> ContainerInfo {
        ContainerInfo {
            id: "c".into(),
            pod_id: "sb".into(),
            name: "app".into(),
            pid,
            running: false,
        }
    }

    fn strings(s: &[Selector]) -> Vec<String> {
        s.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn handler_patterns_are_names_or_prefixes() {
        let kata: HandlerPattern = "kata*".parse().unwrap();
        let runsc: HandlerPattern = "runsc".parse().unwrap();
        assert!(kata.matches("kata") && kata.matches("kata-qemu") && !kata.matches("runc"));
        assert!(runsc.matches("runsc") && !runsc.matches("runsc-kvm"));
        assert_eq!(kata.to_string(), "kata*");
        for bad in ["", "*", "Kata", "a b", "ka*ta", "x/y"] {
            assert!(bad.parse::<HandlerPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_listed_handler_or_the_sandbox_pid_marks_a_sandbox_and_runc_is_not_one() {
        let config = SandboxConfig::default();
        let cases = [
            (
                "runsc, its own pid",
                pod("runsc", 10),
                ctr(10),
                Some(Sandboxed::Handler),
            ),
            (
                "kata-qemu",
                pod("kata-qemu", 10),
                ctr(99),
                Some(Sandboxed::Handler),
            ),
            (
                "unlisted handler, sandbox pid",
                pod("gvisor-kvm", 10),
                ctr(10),
                Some(Sandboxed::SandboxPid),
            ),
            ("runc", pod("runc", 10), ctr(11), None),
            (
                "default handler, no sandbox pid reported",
                pod("", 0),
                ctr(0),
                None,
            ),
        ];
        for (name, p, c, want) in cases {
            assert_eq!(config.sandboxed(&p, &c), want, "{name}");
        }
    }

    #[test]
    fn sandboxed_selectors_carry_the_vetted_facts_class_and_handler_and_no_tenant_label() {
        let config = SandboxConfig::default();
        let p = pod("runsc", 10);
        let Some(Workload::Selectors(s)) = config.workload(&p, &ctr(10)) else {
            panic!("a selector request");
        };
        assert_eq!(
            strings(&s),
            [
                "k8s:container-name:app",
                "k8s:ns:shop",
                "k8s:pod-label:moat.dev/class:gold",
                "k8s:pod-name:web-0",
                "k8s:pod-uid:u-1",
                "k8s:sa:web",
                "moat:runtime-handler:runsc",
            ]
        );
    }

    #[test]
    fn a_missing_fact_is_left_out_never_guessed() {
        let config = SandboxConfig::default();
        let mut p = pod("kata-fc", 10);
        p.labels.clear();
        p.annotations.clear();
        let s = strings(&config.facts(&p).selectors("app"));
        assert!(
            !s.iter()
                .any(|s| s.starts_with("k8s:sa:") || s.contains("pod-label")),
            "{s:?}"
        );
        assert!(s.contains(&"moat:runtime-handler:kata-fc".to_owned()));
    }

    #[test]
    fn runc_containers_are_named_by_pid_and_no_pid_names_nothing() {
        let config = SandboxConfig::default();
        assert_eq!(
            config.workload(&pod("runc", 1), &ctr(42)),
            Some(Workload::Pid(42))
        );
        assert_eq!(config.workload(&pod("runc", 1), &ctr(0)), None);
    }

    #[test]
    fn the_class_label_key_is_configurable() {
        let config = SandboxConfig {
            class: Some(PolicedClass {
                label: "team".into(),
                declared: DeclaredClasses::Any,
            }),
            ..SandboxConfig::default()
        };
        let s = strings(&config.facts(&pod("runsc", 1)).selectors("app"));
        assert!(
            s.contains(&"k8s:pod-label:team:payments".to_owned()),
            "{s:?}"
        );
        assert!(!s.iter().any(|s| s.contains("moat.dev/class")));
    }

    fn config(yaml: &str) -> SandboxConfig {
        SandboxConfig::from_moat(
            &moat_core::config::Config::from_yaml(yaml).unwrap(),
            SandboxConfig::default().handlers,
        )
    }

    /// The pod of [`pod`], as a tenant may write it: its own class label and a service-account
    /// annotation under whatever keys it likes.
    fn forged(handler: &str) -> Pod {
        let mut p = pod(handler, 1);
        p.labels = [
            ("moat.dev/class".to_owned(), "gold".to_owned()),
            ("ipp-class".to_owned(), "gold".to_owned()),
        ]
        .into();
        p.annotations = [("moat.dev/service-account".to_owned(), "payments".to_owned())].into();
        p
    }

    #[test]
    fn only_keys_moat_polices_become_selectors() {
        struct Case {
            name: &'static str,
            yaml: &'static str,
            class: Option<(&'static str, &'static str)>,
            service_account: Option<&'static str>,
        }
        let cases = [
            Case {
                name: "ipp_compatible_polices_ipp_class_and_stamps_nothing",
                yaml: "isolation: {mode: class, podClassLabel: ipp-class, classes: [{name: '*', namespaces: ['*']}]}",
                class: Some(("ipp-class", "gold")),
                service_account: None,
            },
            Case {
                name: "a_non_default_stamp_key_is_the_only_one_read",
                yaml: "identity: {serviceAccountAnnotation: example.com/sa}\nisolation: {mode: off}",
                class: None,
                service_account: None,
            },
            Case {
                name: "the_default_stamp_key_when_configured",
                yaml: "identity: {serviceAccountAnnotation: moat.dev/service-account}\nisolation: {mode: class, classes: [{name: gold, namespaces: ['*']}]}",
                class: Some(("moat.dev/class", "gold")),
                service_account: Some("payments"),
            },
            Case {
                name: "isolation_off_polices_no_class",
                yaml: "isolation: {mode: off}",
                class: None,
                service_account: None,
            },
            Case {
                name: "isolation_in_audit_polices_no_class",
                yaml: "enforcement: {isolation: audit}\nisolation: {mode: class, classes: [{name: gold, namespaces: ['*']}]}",
                class: None,
                service_account: None,
            },
            Case {
                name: "an_undeclared_class_is_not_vouched_for",
                yaml: "isolation: {mode: class, classes: [{name: silver, namespaces: ['*']}]}",
                class: None,
                service_account: None,
            },
        ];
        for case in cases {
            let facts_config = config(case.yaml);
            let p = forged("runsc");
            let facts = facts_config.facts(&p);
            assert_eq!(facts.class, case.class, "{}", case.name);
            assert_eq!(facts.service_account, case.service_account, "{}", case.name);
        }
    }
}
