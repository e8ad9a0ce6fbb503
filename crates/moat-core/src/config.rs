//! moat's configuration: one YAML or JSON document, camelCase, unknown keys rejected with their
//! path, cross-field rules checked by [`Config::validate`]. See `docs/configuration.md`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::image::RegistryPrefix;
use crate::names::{ClassName, LabelKey, LabelValue, NamespacePattern, RuntimeClassName};
use crate::resources::{IdleAfter, Quantity};

/// The embedded default configuration (`moat config default`), documented inline.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("default-config.yaml");

/// Most warm nodes one class may keep (`warmNodes`): each is a whole idle node paid for, so a
/// larger number is more likely a typo than a pool.
pub const MAX_WARM_NODES_PER_CLASS: u32 = 100;

/// How long an empty node of a class stays when the class sets no `idleAfter`: long enough
/// that a pod which restarts or a Job's next attempt finds its node, short enough that a node
/// per pod costs little after the pod is gone.
pub const DEFAULT_IDLE_AFTER: IdleAfter = IdleAfter::Seconds(60);

/// Largest configuration document accepted, in bytes: a config is a few KiB, so anything larger
/// is a mistake (a wrong file) rather than a policy.
pub const MAX_CONFIG_LEN_BYTES: usize = 1024 * 1024;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The document does not parse, or has an unknown key or a value of the wrong form.
    #[error("at '{path}': {message}")]
    Parse { path: String, message: String },
    /// The document is larger than [`MAX_CONFIG_LEN_BYTES`].
    #[error("configuration is {0} bytes, more than the {MAX_CONFIG_LEN_BYTES} allowed")]
    TooLarge(usize),
    /// A rule across fields does not hold.
    #[error("at '{path}': {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Image reference policy.
    #[serde(default)]
    pub images: ImagePolicy,
    /// RuntimeClass policy (Kubewarden pod-runtime-class-policy settings).
    #[serde(default)]
    pub runtime_class: RuntimeClassPolicy,
    /// Node isolation per class or per pod.
    #[serde(default)]
    pub isolation: IsolationPolicy,
    /// Facts moat stamps on pods for the node identity agent.
    #[serde(default)]
    pub identity: IdentityStamp,
    /// What the policies do not apply to.
    #[serde(default)]
    pub exemptions: Exemptions,
    /// Enforce or only audit each policy.
    #[serde(default)]
    pub enforcement: EnforcementModes,
}

/// Whether a policy's decisions take effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Enforcement {
    /// Denials deny and mutations are applied.
    #[default]
    Enforce,
    /// Allow: denials become warnings (and are counted), mutations are only described.
    Audit,
}

/// `enforcement`: a mode per policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnforcementModes {
    #[serde(default)]
    pub images: Enforcement,
    #[serde(default)]
    pub runtime_class: Enforcement,
    #[serde(default)]
    pub isolation: Enforcement,
}

/// The annotation `moat install --identity-agent` uses for [`IdentityStamp`] when the
/// configuration names none; the node agent reads the same key by default.
pub const DEFAULT_SERVICE_ACCOUNT_ANNOTATION: &str = "moat.dev/service-account";

/// `identity`: what moat writes on pods for the node identity agent, which sees a pod's
/// annotations but not its spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityStamp {
    /// An annotation moat sets to the pod's `spec.serviceAccountName` at creation, checks at
    /// validation and keeps immutable, so the agent can ask SPIRE by service account for pods in
    /// sandboxes. Null: off.
    #[serde(default)]
    pub service_account_annotation: Option<LabelKey>,
}

/// `images`: every container's image must carry a tag other than `latest`, or a digest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImagePolicy {
    /// When non-empty, images must come from one of these registries (or repository prefixes).
    #[serde(default)]
    pub allowed_registries: Vec<RegistryPrefix>,
    /// When true, every image must be pinned by digest.
    #[serde(default)]
    pub require_digest: bool,
    /// Resolve images to digests at their registry and verify their signatures
    /// (`crate::trust`). Absent: no registry is called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<crate::trust::ImageTrust>,
}

/// `runtimeClass`: exactly the three settings of the Kubewarden policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuntimeClassPolicy {
    /// RuntimeClass names pods may not ask for.
    #[serde(default)]
    pub reserved_runtimes: BTreeSet<RuntimeClassName>,
    /// Set on pods that ask for a reserved runtime or for none.
    #[serde(default)]
    pub fallback_runtime: Option<RuntimeClassName>,
    /// When true and there is no fallback, a pod without `runtimeClassName` is denied.
    #[serde(default)]
    pub default_runtime_reserved: bool,
}

/// How isolated pods are placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IsolationMode {
    /// No isolation: the isolation policy neither mutates nor denies.
    #[default]
    Off,
    /// Pods of one class share nodes of that class only.
    Class,
    /// Every isolated pod gets a node of its own (instance per pod).
    Pod,
    /// No affinity: each pod is pinned to a dedicated node the provisioner creates.
    DedicatedNode,
}

/// How the pods of one class are placed: [`IsolationMode`] without `off`, which switches
/// isolation off for every class and so is only global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClassMode {
    /// Pods of the class share nodes of that class only.
    Class,
    /// Every pod of the class gets a node of its own (instance per pod).
    Pod,
    /// No affinity: each pod is pinned to a dedicated node the provisioner creates.
    DedicatedNode,
}

impl ClassMode {
    /// The configuration's spelling, for messages and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Class => "class",
            Self::Pod => "pod",
            Self::DedicatedNode => "dedicatedNode",
        }
    }
}

impl IsolationMode {
    /// The mode of a class that declares none: `None` when isolation is off.
    pub fn class_default(self) -> Option<ClassMode> {
        match self {
            Self::Off => None,
            Self::Class => Some(ClassMode::Class),
            Self::Pod => Some(ClassMode::Pod),
            Self::DedicatedNode => Some(ClassMode::DedicatedNode),
        }
    }
}

/// `isolation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IsolationPolicy {
    /// `off` switches isolation off for every class; otherwise the placement mode of the classes
    /// that declare none of their own (`classes[].mode`).
    #[serde(default)]
    pub mode: IsolationMode,
    /// The pod label that names a pod's class.
    #[serde(default = "default_pod_class_label")]
    pub pod_class_label: LabelKey,
    /// When set, a namespace label that names the class of every pod in that namespace. Tenants
    /// cannot edit namespace labels, so this binds classes to namespaces by the operator's hand.
    #[serde(default)]
    pub namespace_class_label: Option<LabelKey>,
    /// Namespaces whose every pod is isolated, labelled or not.
    #[serde(default)]
    pub isolate_namespaces: Vec<NamespacePattern>,
    /// The class given to unlabelled pods of `isolateNamespaces`.
    #[serde(default)]
    pub default_class: Option<ClassName>,
    /// The classes, and which namespaces may use each.
    #[serde(default)]
    pub classes: Vec<ClassSpec>,
    /// How isolated nodes are marked.
    #[serde(default)]
    pub nodes: NodeMarking,
    /// Node label naming a dedicated node (dedicatedNode mode).
    #[serde(default = "default_dedicated_node_label")]
    pub dedicated_node_label: LabelKey,
    /// Allow non-exempt pods to set `spec.nodeName` on CREATE. Binding by name bypasses the
    /// scheduler and with it the NoSchedule taints that keep tenants off isolated nodes.
    #[serde(default)]
    pub allow_node_name: bool,
    /// Schedulers non-exempt pods may name in `spec.schedulerName` (unset means
    /// `default-scheduler`). Another scheduler may ignore the taints that keep pods off isolated
    /// nodes.
    #[serde(default = "default_scheduler_names")]
    pub scheduler_names: Vec<String>,
}

impl Default for IsolationPolicy {
    fn default() -> Self {
        Self {
            mode: IsolationMode::default(),
            pod_class_label: default_pod_class_label(),
            namespace_class_label: None,
            isolate_namespaces: Vec::new(),
            default_class: None,
            classes: Vec::new(),
            nodes: NodeMarking::default(),
            dedicated_node_label: default_dedicated_node_label(),
            allow_node_name: false,
            scheduler_names: default_scheduler_names(),
        }
    }
}

#[expect(clippy::expect_used, reason = "constant literal checked by tests")]
fn key(s: &str) -> LabelKey {
    s.parse().expect("built-in label key is valid")
}
/// The pod label that names a pod's class when the configuration names none (the node agent
/// reads the same key by default).
pub const DEFAULT_POD_CLASS_LABEL: &str = "moat.dev/class";

fn default_pod_class_label() -> LabelKey {
    key(DEFAULT_POD_CLASS_LABEL)
}
fn default_dedicated_node_label() -> LabelKey {
    key("node-restriction.kubernetes.io/moat-node")
}
fn default_node_label_key() -> LabelKey {
    key("node-restriction.kubernetes.io/moat-class")
}
fn default_topology_key() -> LabelKey {
    key("kubernetes.io/hostname")
}
fn default_scheduler_names() -> Vec<String> {
    vec!["default-scheduler".to_owned()]
}
fn default_daemon_set_controllers() -> Vec<String> {
    vec!["system:serviceaccount:kube-system:daemon-set-controller".to_owned()]
}
fn default_taint_key() -> LabelKey {
    key("moat.dev/isolated")
}

/// A class name in `classes`: a name, or `*` for any class name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassPattern {
    /// Any valid class name.
    Any,
    /// Exactly this class.
    Name(ClassName),
}

impl ClassPattern {
    fn matches(&self, class: &ClassName) -> bool {
        match self {
            Self::Any => true,
            Self::Name(n) => n == class,
        }
    }
}

impl Serialize for ClassPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Any => s.serialize_str("*"),
            Self::Name(n) => n.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ClassPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            Ok(Self::Any)
        } else {
            s.parse().map(Self::Name).map_err(serde::de::Error::custom)
        }
    }
}

/// One entry of `isolation.classes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClassSpec {
    /// The class, or `*` for any class name.
    pub name: ClassPattern,
    /// Namespaces (patterns) whose pods may use this class.
    #[serde(default)]
    pub namespaces: Vec<NamespacePattern>,
    /// Namespaces whose labels match this selector may also use this class.
    #[serde(default)]
    pub namespace_selector: Option<NamespaceSelector>,
    /// How this class's pods are placed; unset: the global `isolation.mode`. Read it through
    /// [`IsolationPolicy::mode_of`], which also knows whether isolation is on.
    #[serde(default)]
    pub mode: Option<ClassMode>,
    /// Pods of this class run with this RuntimeClass (set when unset; any other is denied).
    #[serde(default)]
    pub runtime_class_name: Option<RuntimeClassName>,
    /// How long an empty node of this class stays before the autoscaler removes it (Karpenter's
    /// `consolidateAfter`); unset: [`DEFAULT_IDLE_AFTER`].
    #[serde(default)]
    pub idle_after: Option<IdleAfter>,
    /// Most resources all nodes of this class may hold together (Karpenter's NodePool
    /// `limits`): resource name to quantity, e.g. `cpu: 64`, `memory: 256Gi`.
    #[serde(default)]
    pub limits: BTreeMap<LabelKey, Quantity>,
    /// Idle nodes of this class kept ready for its next pods (warm capacity), at most
    /// [`MAX_WARM_NODES_PER_CLASS`].
    #[serde(default)]
    pub warm_nodes: u32,
    /// Requests of one warm placeholder: size it as one node's worth of this class in class
    /// mode, so that a real pod displaces it and the autoscaler adds a node for it.
    #[serde(default)]
    pub warm_requests: BTreeMap<LabelKey, Quantity>,
}

impl ClassSpec {
    /// The idle time of this class's nodes, defaulted.
    pub fn idle_after(&self) -> IdleAfter {
        self.idle_after.unwrap_or(DEFAULT_IDLE_AFTER)
    }
}

/// A label selector over namespaces, as in Kubernetes (`matchLabels` and `matchExpressions`
/// ANDed; an empty selector matches every namespace).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<LabelKey, LabelValue>,
    #[serde(default)]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SelectorRequirement {
    pub key: LabelKey,
    pub operator: SelectorOperator,
    #[serde(default)]
    pub values: Vec<LabelValue>,
}

/// A label selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl NamespaceSelector {
    /// Whether a namespace with these labels matches.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k.as_str()).is_some_and(|l| l == v.as_str()))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(r.key.as_str());
                let in_values = got.is_some_and(|g| r.values.iter().any(|v| v.as_str() == g));
                match r.operator {
                    SelectorOperator::In => in_values,
                    SelectorOperator::NotIn => !in_values,
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }
}

/// A taint effect moat may place on isolated nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaintEffect {
    #[default]
    NoSchedule,
    NoExecute,
}

impl TaintEffect {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

/// `isolation.nodes`: the label and taint that isolated nodes carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeMarking {
    /// Node label key of isolated nodes. Use the `node-restriction.kubernetes.io/` prefix so a
    /// kubelet cannot put it on its own node.
    #[serde(default = "default_node_label_key")]
    pub label_key: LabelKey,
    /// Fixed label value (one shared pool, classes kept apart by anti-affinity), or unset for
    /// the class name (a pool per class).
    #[serde(default)]
    pub label_value: Option<LabelValue>,
    /// Taint key of isolated nodes.
    #[serde(default = "default_taint_key")]
    pub taint_key: LabelKey,
    /// Fixed taint value, or unset for the class name.
    #[serde(default)]
    pub taint_value: Option<LabelValue>,
    /// Taint effect.
    #[serde(default)]
    pub taint_effect: TaintEffect,
    /// The node label whose value tells nodes apart for the anti-affinity moat writes. Isolated
    /// pods also require the label to exist, since the scheduler ignores anti-affinity on nodes
    /// without it. A label under `node-restriction.kubernetes.io/` with a value per node, set by
    /// the provisioner, keeps even that out of a kubelet's hands.
    #[serde(default = "default_topology_key")]
    pub topology_key: LabelKey,
}

impl Default for NodeMarking {
    fn default() -> Self {
        Self {
            label_key: default_node_label_key(),
            label_value: None,
            taint_key: default_taint_key(),
            taint_value: None,
            taint_effect: TaintEffect::default(),
            topology_key: default_topology_key(),
        }
    }
}

/// `exemptions`: what the policies skip. Every exemption is reported in the decision so the
/// server can log and count it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Exemptions {
    /// Namespaces (patterns) where no policy applies.
    #[serde(default)]
    pub namespaces: Vec<NamespacePattern>,
    /// A pod annotation that, set to `"true"`, skips isolation for that pod. Unset: no
    /// annotation can skip isolation.
    #[serde(default)]
    pub ignore_annotation: Option<LabelKey>,
    /// Skip isolation for pods that pin their own placement (`nodeSelector`, required node
    /// affinity). When false, moat's constraints are added to theirs.
    #[serde(default)]
    pub pinned_pods: bool,
    /// Skip isolation for dry-run requests.
    #[serde(default)]
    pub dry_run: bool,
    /// Users (`request.userInfo.username`, written by the API server) whose DaemonSet pods skip
    /// isolation: the DaemonSet controller. A pod's own `ownerReferences` never suffice, since
    /// whoever creates the pod writes them.
    #[serde(default = "default_daemon_set_controllers")]
    pub daemon_set_controllers: Vec<String>,
}

impl Default for Exemptions {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            ignore_annotation: None,
            pinned_pods: false,
            dry_run: false,
            daemon_set_controllers: default_daemon_set_controllers(),
        }
    }
}

impl Config {
    /// Parses a YAML (or JSON) document and checks its cross-field rules.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] with the path of the offending key, [`ConfigError::TooLarge`], or
    /// [`ConfigError::Invalid`] from [`Config::validate`].
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.len() > MAX_CONFIG_LEN_BYTES {
            return Err(ConfigError::TooLarge(text.len()));
        }
        crate::nesting::check_depth(text).map_err(|e| ConfigError::Parse {
            path: ".".to_owned(),
            message: format!("the document {e}"),
        })?;
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Parse {
                path,
                message: yaml_message(&e.into_inner()),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The embedded default configuration.
    ///
    /// # Panics
    /// Never in a released build: a test checks that the embedded document is valid.
    #[expect(clippy::expect_used, reason = "embedded document is checked by a test")]
    pub fn embedded_default() -> Self {
        Self::from_yaml(DEFAULT_CONFIG_YAML).expect("embedded default configuration is valid")
    }

    /// Checks the rules that span fields.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field and the rule.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(trust) = &self.images.trust {
            trust
                .check("images.trust")
                .map_err(|(path, message)| ConfigError::invalid(path, message))?;
        }
        let rc = &self.runtime_class;
        if let Some(fallback) = &rc.fallback_runtime
            && rc.reserved_runtimes.contains(fallback)
        {
            return Err(ConfigError::invalid(
                "runtimeClass.fallbackRuntime",
                format!("fallback runtime '{fallback}' is itself in reservedRuntimes"),
            ));
        }
        let iso = &self.isolation;
        let mut seen = BTreeSet::new();
        for (i, class) in iso.classes.iter().enumerate() {
            let key = match &class.name {
                ClassPattern::Any => "*".to_owned(),
                ClassPattern::Name(n) => n.to_string(),
            };
            if !seen.insert(key.clone()) {
                return Err(ConfigError::invalid(
                    format!("isolation.classes[{i}].name"),
                    format!("class '{key}' is declared twice"),
                ));
            }
            if let Some(r) = &class.runtime_class_name
                && rc.reserved_runtimes.contains(r)
            {
                return Err(ConfigError::invalid(
                    format!("isolation.classes[{i}].runtimeClassName"),
                    format!("runtime '{r}' is in runtimeClass.reservedRuntimes"),
                ));
            }
            let mode = class.mode.or(iso.mode.class_default());
            check_capacity(i, &key, class, mode)?;
            if mode == Some(ClassMode::DedicatedNode)
                && iso.dedicated_node_label == iso.nodes.label_key
            {
                // The class's own setting is what to change when it declares one.
                let (path, whose) = if class.mode.is_some() {
                    (
                        format!("isolation.classes[{i}].mode"),
                        format!("class '{key}' is in dedicatedNode mode, so "),
                    )
                } else {
                    ("isolation.dedicatedNodeLabel".to_owned(), String::new())
                };
                return Err(ConfigError::invalid(
                    path,
                    format!(
                        "{whose}isolation.dedicatedNodeLabel must differ from isolation.nodes.labelKey"
                    ),
                ));
            }
            if class.namespaces.is_empty()
                && class.namespace_selector.is_none()
                && iso.namespace_class_label.is_none()
            {
                return Err(ConfigError::invalid(
                    format!("isolation.classes[{i}]"),
                    format!(
                        "class '{key}' names no namespaces and no namespaceSelector, so no pod could use it"
                    ),
                ));
            }
        }
        if let Some(default) = &iso.default_class
            && iso.class_spec(default).is_none()
        {
            return Err(ConfigError::invalid(
                "isolation.defaultClass",
                format!("class '{default}' is not declared in isolation.classes"),
            ));
        }
        if !iso.isolate_namespaces.is_empty()
            && iso.default_class.is_none()
            && iso.namespace_class_label.is_none()
        {
            return Err(ConfigError::invalid(
                "isolation.isolateNamespaces",
                "needs isolation.defaultClass or isolation.namespaceClassLabel to choose a class for unlabelled pods",
            ));
        }
        if iso.mode != IsolationMode::Off && iso.classes.is_empty() {
            return Err(ConfigError::invalid(
                "isolation.classes",
                "isolation is on but no class is declared",
            ));
        }
        Ok(())
    }
}

/// The per-class capacity rules of [`Config::validate`].
fn check_capacity(
    i: usize,
    name: &str,
    class: &ClassSpec,
    mode: Option<ClassMode>,
) -> Result<(), ConfigError> {
    let at = |field: &str| format!("isolation.classes[{i}].{field}");
    if class.warm_nodes > MAX_WARM_NODES_PER_CLASS {
        return Err(ConfigError::invalid(
            at("warmNodes"),
            format!(
                "{} is more than the {MAX_WARM_NODES_PER_CLASS} warm nodes a class may keep",
                class.warm_nodes
            ),
        ));
    }
    if class.warm_nodes > 0 && class.name == ClassPattern::Any {
        return Err(ConfigError::invalid(
            at("warmNodes"),
            "'*' covers class names not known in advance, so no warm node can be made for them; set warmNodes on a named class",
        ));
    }
    if class.warm_nodes > 0 && mode == Some(ClassMode::DedicatedNode) {
        return Err(ConfigError::invalid(
            at("warmNodes"),
            format!(
                "class '{name}': dedicatedNode mode pins each pod to a node id that exists only once the pod does, so no node can be warmed for it; use pod mode for warm capacity"
            ),
        ));
    }
    if class.warm_nodes == 0 && !class.warm_requests.is_empty() {
        return Err(ConfigError::invalid(
            at("warmRequests"),
            format!("class '{name}' sets warmRequests but no warmNodes"),
        ));
    }
    Ok(())
}

impl Config {
    /// What is valid but weakens isolation, in words an operator can act on (printed by
    /// `moat config check`, logged by `moat serve` at start).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, p) in self.exemptions.namespaces.iter().enumerate() {
            if p.is_glob() {
                out.push(format!(
                    "exemptions.namespaces[{i}]: '{p}' is a pattern: where tenants can create namespaces (HNC, Capsule, self-service), one named to match escapes every policy; list exact names"
                ));
            }
        }
        let iso = &self.isolation;
        for (i, c) in iso.classes.iter().enumerate() {
            let name = match &c.name {
                ClassPattern::Any => "every class".to_owned(),
                ClassPattern::Name(n) => format!("class '{n}'"),
            };
            if iso.mode == IsolationMode::Off
                && let Some(mode) = c.mode
            {
                out.push(format!(
                    "isolation.classes[{i}].mode: {name} declares {} mode, but isolation.mode is off (the default), which switches isolation off for every class; set isolation.mode to class, pod or dedicatedNode (the mode of classes that declare none)",
                    mode.as_str()
                ));
            }
            // Pod and dedicatedNode modes give each pod a node of its own; only class mode shares.
            if iso.mode_of(c) == Some(ClassMode::Class)
                && c.namespaces.iter().any(|p| p.as_str() == "*")
            {
                out.push(format!(
                    "isolation.classes[{i}]: {name} is open to every namespace, so pods of different tenants share its nodes in class mode; bind classes per namespace (namespaces, namespaceSelector or namespaceClassLabel) or give the class pod mode to keep tenants apart"
                ));
            }
        }
        out
    }
}

/// The YAML parser's message without its own path prefix (we print the full path) and with the
/// location written once, in words.
fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let mut text = e.to_string();
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = text.strip_suffix(&suffix) {
            text = format!("{stripped} (line {}, column {})", loc.line(), loc.column());
        }
    }
    match text.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(char::is_whitespace) && !prefix.contains('`') => {
            rest.to_owned()
        }
        _ => text,
    }
}

impl IsolationPolicy {
    /// Whether isolation is on (`mode` is not `off`).
    pub fn is_on(&self) -> bool {
        self.mode != IsolationMode::Off
    }

    /// The placement mode of a declared class: its own `mode`, else the global one; `None` when
    /// isolation is off.
    pub fn mode_of(&self, spec: &ClassSpec) -> Option<ClassMode> {
        let default = self.mode.class_default()?;
        Some(spec.mode.unwrap_or(default))
    }

    /// Whether some declared class is placed in `mode` (never, when isolation is off).
    pub fn uses(&self, mode: ClassMode) -> bool {
        self.classes.iter().any(|c| self.mode_of(c) == Some(mode))
    }

    /// The declaration that covers `class`: its own entry, else the `*` entry.
    pub fn class_spec(&self, class: &ClassName) -> Option<&ClassSpec> {
        self.classes
            .iter()
            .find(|c| c.name == ClassPattern::Name(class.clone()))
            .or_else(|| self.classes.iter().find(|c| c.name.matches(class)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(yaml: &str) -> String {
        Config::from_yaml(yaml).expect_err(yaml).to_string()
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.isolation.mode, IsolationMode::Class);
        c.validate().unwrap();
    }

    #[test]
    fn empty_mapping_is_all_defaults() {
        assert_eq!(Config::from_yaml("{}").unwrap(), Config::default());
    }

    #[test]
    fn rejects_unknown_keys_with_their_path() {
        let cases: &[(&str, &str)] = &[
            ("imagess: {}", "at 'imagess': unknown field `imagess`"),
            (
                "images: {allowRegistries: []}",
                "at 'images.allowRegistries': unknown field `allowRegistries`",
            ),
            (
                "runtimeClass: {reserved: [a]}",
                "at 'runtimeClass.reserved': unknown field `reserved`",
            ),
            (
                "isolation: {mode: class, classes: [{name: a, namespaces: [x], extra: 1}]}",
                "at 'isolation.classes[0].extra': unknown field `extra`",
            ),
            (
                "isolation: {nodes: {taint: x}}",
                "at 'isolation.nodes.taint': unknown field `taint`",
            ),
            (
                "exemptions: {namespace: []}",
                "at 'exemptions.namespace': unknown field `namespace`",
            ),
        ];
        for (yaml, want) in cases {
            let got = parse_err(yaml);
            let (path, message) = want.split_once(": ").unwrap();
            assert!(
                got.starts_with(path) && got.contains(message),
                "{yaml}: got {got}"
            );
        }
    }

    #[test]
    fn rejects_values_of_the_wrong_form() {
        let cases: &[(&str, &str)] = &[
            (
                "runtimeClass: {reservedRuntimes: [Bad]}",
                "at 'runtimeClass.reservedRuntimes[0]'",
            ),
            ("isolation: {mode: perPod}", "at 'isolation.mode'"),
            (
                "isolation: {podClassLabel: 'a b'}",
                "at 'isolation.podClassLabel'",
            ),
            (
                "images: {allowedRegistries: ['Bad Host']}",
                "at 'images.allowedRegistries[0]'",
            ),
            (
                "exemptions: {namespaces: ['Kube']}",
                "at 'exemptions.namespaces[0]'",
            ),
            (
                "isolation: {nodes: {taintEffect: PreferNoSchedule}}",
                "at 'isolation.nodes.taintEffect'",
            ),
            ("[1, 2]", "at '.'"),
        ];
        for (yaml, want) in cases {
            let got = parse_err(yaml);
            assert!(got.starts_with(want), "{yaml}: got {got}");
        }
    }

    #[test]
    fn checks_cross_field_rules() {
        let cases: &[(&str, &str)] = &[
            (
                "runtimeClass: {reservedRuntimes: [runc], fallbackRuntime: runc}",
                "at 'runtimeClass.fallbackRuntime': fallback runtime 'runc' is itself in reservedRuntimes",
            ),
            (
                "runtimeClass: {reservedRuntimes: [runc]}\nisolation: {classes: [{name: a, namespaces: ['*'], runtimeClassName: runc}]}",
                "at 'isolation.classes[0].runtimeClassName'",
            ),
            (
                "isolation: {classes: [{name: a, namespaces: [x]}, {name: a, namespaces: [y]}]}",
                "at 'isolation.classes[1].name': class 'a' is declared twice",
            ),
            (
                "isolation: {classes: [{name: a}]}",
                "at 'isolation.classes[0]'",
            ),
            (
                "isolation: {defaultClass: b, classes: [{name: a, namespaces: [x]}]}",
                "at 'isolation.defaultClass': class 'b' is not declared",
            ),
            (
                "isolation: {isolateNamespaces: [t]}",
                "at 'isolation.isolateNamespaces'",
            ),
            (
                "isolation: {mode: pod}",
                "at 'isolation.classes': isolation is on but no class",
            ),
            (
                "isolation: {mode: dedicatedNode, dedicatedNodeLabel: a, nodes: {labelKey: a}, classes: [{name: '*', namespaces: ['*']}]}",
                "at 'isolation.dedicatedNodeLabel'",
            ),
        ];
        for (yaml, want) in cases {
            let got = parse_err(yaml);
            assert!(got.starts_with(want), "{yaml}: got {got}");
        }
    }

    #[test]
    fn reads_per_class_capacity_settings() {
        let c = Config::from_yaml(
            "isolation: {mode: pod, classes: [{name: gold, namespaces: [bank], idleAfter: 5m, limits: {cpu: 64, memory: 256Gi}, warmNodes: 2, warmRequests: {cpu: 500m}}, {name: lead, namespaces: [shop]}]}",
        )
        .unwrap();
        let gold = &c.isolation.classes[0];
        assert_eq!(gold.idle_after(), IdleAfter::Seconds(300));
        assert_eq!(gold.limits.len(), 2);
        assert_eq!(gold.limits.values().next().unwrap().as_str(), "64");
        assert_eq!(gold.warm_nodes, 2);
        assert_eq!(c.isolation.classes[1].idle_after(), DEFAULT_IDLE_AFTER);
        assert_eq!(c.isolation.classes[1].warm_nodes, 0);
        // Printed and read again (`moat config check`), the settings are the same.
        let again = Config::from_yaml(&serde_yaml_ng::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn checks_capacity_rules() {
        let cases: &[(&str, &str)] = &[
            (
                "isolation: {classes: [{name: a, namespaces: [x], warmNodes: 101}]}",
                "at 'isolation.classes[0].warmNodes': 101 is more than the 100",
            ),
            (
                "isolation: {classes: [{name: '*', namespaces: [x], warmNodes: 1}]}",
                "at 'isolation.classes[0].warmNodes': '*' covers class names",
            ),
            (
                "isolation: {mode: dedicatedNode, classes: [{name: a, namespaces: [x], warmNodes: 1}]}",
                "at 'isolation.classes[0].warmNodes': class 'a': dedicatedNode mode pins",
            ),
            (
                "isolation: {classes: [{name: a, namespaces: [x], warmRequests: {cpu: 1}}]}",
                "at 'isolation.classes[0].warmRequests': class 'a' sets warmRequests but no warmNodes",
            ),
            (
                "isolation: {classes: [{name: a, namespaces: [x], idleAfter: 5}]}",
                "at 'isolation.classes[0].idleAfter': '5' is not an idle time",
            ),
            (
                "isolation: {classes: [{name: a, namespaces: [x], limits: {cpu: -1}}]}",
                "at 'isolation.classes[0].limits.cpu': '-1' is not a non-negative",
            ),
            (
                "isolation: {classes: [{name: a, namespaces: [x], limits: {'a b': 1}}]}",
                "at 'isolation.classes[0].limits",
            ),
            (
                "isolation: {classes: [{name: a, namespaces: [x], warmNodes: -1}]}",
                "at 'isolation.classes[0].warmNodes'",
            ),
        ];
        for (yaml, want) in cases {
            let got = parse_err(yaml);
            assert!(got.starts_with(want), "{yaml}: got {got}");
        }
    }

    #[test]
    fn wildcard_class_covers_undeclared_names() {
        let c = Config::from_yaml("isolation: {classes: [{name: '*', namespaces: ['*']}, {name: gold, namespaces: [bank]}]}").unwrap();
        let gold: ClassName = "gold".parse().unwrap();
        let other: ClassName = "other".parse().unwrap();
        assert_eq!(
            c.isolation.class_spec(&gold).unwrap().namespaces[0].as_str(),
            "bank"
        );
        assert_eq!(
            c.isolation.class_spec(&other).unwrap().name,
            ClassPattern::Any
        );
    }

    #[test]
    fn warns_about_what_weakens_isolation() {
        let c = Config::from_yaml(
            "isolation: {mode: class, classes: [{name: a, namespaces: ['*']}, {name: b, namespaces: [bank]}]}\nexemptions: {namespaces: [kube-system, '*-system']}",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("exemptions.namespaces[1]: '*-system' is a pattern"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("isolation.classes[0]: class 'a' is open to every namespace"),
            "{w:?}"
        );
        let bound = Config::from_yaml(
            "isolation: {mode: class, classes: [{name: a, namespaces: [shop]}]}\nexemptions: {namespaces: [kube-system]}",
        )
        .unwrap();
        assert!(bound.warnings().is_empty());
    }

    #[test]
    fn a_class_declares_its_mode_or_takes_the_global_one() {
        let c = Config::from_yaml(
            "isolation: {mode: class, classes: [{name: shared, namespaces: [a]}, {name: ci, mode: pod, namespaces: [b]}, {name: big, mode: dedicatedNode, namespaces: [c]}]}",
        )
        .unwrap();
        let modes: Vec<Option<ClassMode>> = c
            .isolation
            .classes
            .iter()
            .map(|s| c.isolation.mode_of(s))
            .collect();
        assert_eq!(
            modes,
            [
                Some(ClassMode::Class),
                Some(ClassMode::Pod),
                Some(ClassMode::DedicatedNode)
            ]
        );
        assert!(c.isolation.uses(ClassMode::Pod) && c.isolation.uses(ClassMode::DedicatedNode));
        // `off` is global: no class is placed, whatever it declares.
        let mut off = c.clone();
        off.isolation.mode = IsolationMode::Off;
        assert!(
            off.isolation
                .classes
                .iter()
                .all(|s| off.isolation.mode_of(s).is_none())
        );
        assert!(!off.isolation.uses(ClassMode::Pod));
        // Printed and read again (`moat config check`), the modes are the same; a class without
        // one prints `mode: null` (the global mode), as other unset keys print.
        let printed = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(Config::from_yaml(&printed).unwrap(), c);
        assert_eq!(printed.matches("mode: null").count(), 1, "{printed}");
    }

    #[test]
    fn checks_per_class_mode_rules_naming_the_class() {
        let cases: &[(&str, &str)] = &[
            // `off` switches isolation off for every class; a class cannot.
            (
                "isolation: {mode: class, classes: [{name: a, mode: off, namespaces: [x]}]}",
                "at 'isolation.classes[0].mode': unknown variant `off`",
            ),
            (
                "isolation: {mode: class, classes: [{name: a, mode: perPod, namespaces: [x]}]}",
                "at 'isolation.classes[0].mode'",
            ),
            (
                "isolation: {mode: pod, classes: [{name: a, namespaces: [x]}, {name: b, mode: dedicatedNode, namespaces: [y], warmNodes: 1}]}",
                "at 'isolation.classes[1].warmNodes': class 'b': dedicatedNode mode pins",
            ),
            (
                "isolation: {mode: class, dedicatedNodeLabel: a, nodes: {labelKey: a}, classes: [{name: x, namespaces: [x]}, {name: big, mode: dedicatedNode, namespaces: [y]}]}",
                "at 'isolation.classes[1].mode': class 'big' is in dedicatedNode mode, so isolation.dedicatedNodeLabel must differ",
            ),
            (
                "isolation: {mode: dedicatedNode, dedicatedNodeLabel: a, nodes: {labelKey: a}, classes: [{name: x, mode: pod, namespaces: [x]}, {name: y, namespaces: [y]}]}",
                "at 'isolation.dedicatedNodeLabel': isolation.dedicatedNodeLabel must differ",
            ),
        ];
        for (yaml, want) in cases {
            let got = parse_err(yaml);
            assert!(got.starts_with(want), "{yaml}: got {got}");
        }
        // What another mode refuses is fine in a class of a mode that allows it.
        for ok in [
            "isolation: {mode: dedicatedNode, classes: [{name: a, mode: pod, namespaces: [x], warmNodes: 1}]}",
            "isolation: {mode: pod, dedicatedNodeLabel: a, nodes: {labelKey: a}, classes: [{name: x, mode: class, namespaces: [x]}]}",
        ] {
            Config::from_yaml(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn warns_per_class_mode() {
        let cases: &[(&str, &[&str])] = &[
            // Only a class that shares nodes (class mode) and is open to every namespace.
            (
                "isolation: {mode: pod, classes: [{name: a, namespaces: ['*']}, {name: b, mode: class, namespaces: ['*']}]}",
                &["isolation.classes[1]: class 'b' is open to every namespace"],
            ),
            (
                "isolation: {mode: class, classes: [{name: a, mode: pod, namespaces: ['*']}, {name: b, mode: dedicatedNode, namespaces: ['*']}]}",
                &[],
            ),
            // A mode on a class while isolation is off (the default) is a likely mistake.
            (
                "isolation: {classes: [{name: a, mode: pod, namespaces: [x]}, {name: b, namespaces: [y]}]}",
                &[
                    "isolation.classes[0].mode: class 'a' declares pod mode, but isolation.mode is off",
                ],
            ),
        ];
        for (yaml, want) in cases {
            let got = Config::from_yaml(yaml).unwrap().warnings();
            assert_eq!(got.len(), want.len(), "{yaml}: {got:?}");
            for (g, w) in got.iter().zip(*want) {
                assert!(g.starts_with(w), "{yaml}: {g}");
            }
        }
    }

    #[test]
    fn rejects_oversized_documents() {
        let big = format!("# {}\n{{}}", "x".repeat(MAX_CONFIG_LEN_BYTES));
        assert!(matches!(
            Config::from_yaml(&big),
            Err(ConfigError::TooLarge(_))
        ));
    }

    #[test]
    fn namespace_selector_semantics() {
        let sel: NamespaceSelector = serde_yaml_ng::from_str(
            "{matchLabels: {tier: tenant}, matchExpressions: [{key: pci, operator: DoesNotExist}, {key: team, operator: In, values: [a, b]}]}",
        )
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(sel.matches(&labels(&[("tier", "tenant"), ("team", "a")])));
        assert!(!sel.matches(&labels(&[("tier", "tenant"), ("team", "c")])));
        assert!(!sel.matches(&labels(&[("tier", "tenant"), ("team", "a"), ("pci", "")])));
        assert!(!sel.matches(&labels(&[("team", "a")])));
        assert!(NamespaceSelector::default().matches(&labels(&[])));
    }
}
