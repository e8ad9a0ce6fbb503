//! The backstop decides as moat's validate stage does: every compiled expression evaluated by
//! a Rust CEL implementation (the `cel` crate) against the same final objects moat's engine
//! decides, per policy, in both directions. The corpus: the API server's captured requests, a
//! table of tenant tricks crossed with the example configurations, and every pod moat's
//! mutating webhook produces from them (which the backstop must admit: no lockout).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cel::{Context, Program, Value as CelValue};
use moat_core::config::Config;
use moat_core::decision::{Operation, Policy, Request, Requester, Stage};
use moat_core::engine;
use moat_core::subject::Template;
use moat_objects::backstop::{self, Compiled};
use serde_json::{Value, json};

/// One admission request as the API server would evaluate it.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    operation: Operation,
    object: Value,
    old_object: Option<Value>,
    namespace: String,
    namespace_labels: BTreeMap<String, String>,
    username: String,
    dry_run: bool,
}

thread_local! {
    static PROGRAMS: std::cell::RefCell<HashMap<String, std::rc::Rc<Program>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// `expr` parsed by the crate, once per thread; a failure to parse fails the test.
fn compiled(expr: &str) -> std::rc::Rc<Program> {
    PROGRAMS.with(|p| {
        p.borrow_mut()
            .entry(expr.to_owned())
            .or_insert_with(|| {
                std::rc::Rc::new(
                    Program::compile(expr)
                        .unwrap_or_else(|e| panic!("the crate cannot parse {expr}: {e}")),
                )
            })
            .clone()
    })
}

fn cel_value(v: &Value) -> CelValue {
    cel::to_value(v).unwrap()
}

/// Evaluates one compiled policy: `None` when its match conditions leave the request out, else
/// the messages of the validations that failed.
fn evaluate(c: &Compiled, case: &Case) -> Option<Vec<String>> {
    let mut ctx = context(case);
    let run = |ctx: &Context, expr: &str| -> CelValue {
        compiled(expr)
            .execute(ctx)
            .unwrap_or_else(|e| panic!("{} on {}: {expr}: {e:?}", c.name, case.name))
    };
    for (name, expr) in &c.match_conditions {
        match run(&ctx, expr) {
            CelValue::Bool(true) => {}
            CelValue::Bool(false) => return None,
            other => panic!("{}: match condition {name} gave {other:?}", c.name),
        }
    }
    let mut variables: HashMap<String, CelValue> = HashMap::new();
    for (name, expr) in &c.variables {
        let v = run(&ctx, expr);
        variables.insert(name.clone(), v);
        ctx.add_variable_from_value("variables", variables.clone());
    }
    let mut failed = Vec::new();
    for (expr, message) in &c.validations {
        match run(&ctx, expr) {
            CelValue::Bool(true) => {}
            CelValue::Bool(false) => match run(&ctx, message) {
                CelValue::String(s) => failed.push(s.to_string()),
                other => panic!("{}: message {message} gave {other:?}", c.name),
            },
            other => panic!("{}: {expr} gave {other:?}", c.name),
        }
    }
    Some(failed)
}

/// What the API server binds for a pod request's expressions: `object`, `oldObject`,
/// `request` (a pod, no subresource) and `namespaceObject`.
fn context(case: &Case) -> Context<'static> {
    let mut ctx = Context::default();
    ctx.add_variable("object", cel_value(&case.object)).unwrap();
    ctx.add_variable(
        "oldObject",
        case.old_object.as_ref().map_or(CelValue::Null, cel_value),
    )
    .unwrap();
    let op = match case.operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        _ => "DELETE",
    };
    let request = json!({
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "subResource": "",
        "operation": op,
        "namespace": case.namespace,
        "userInfo": {"username": case.username},
        "dryRun": case.dry_run,
    });
    ctx.add_variable("request", cel_value(&request)).unwrap();
    let mut labels = case.namespace_labels.clone();
    labels.insert(
        "kubernetes.io/metadata.name".to_owned(),
        case.namespace.clone(),
    );
    ctx.add_variable(
        "namespaceObject",
        cel_value(&json!({"metadata": {"name": case.namespace, "labels": labels}})),
    )
    .unwrap();
    ctx
}

/// A webhook's match condition on `case`.
fn matches(expr: &str, case: &Case) -> bool {
    match compiled(expr).execute(&context(case)) {
        Ok(CelValue::Bool(b)) => b,
        other => panic!("{expr} on {}: {other:?}", case.name),
    }
}

/// The engine's view of `case` at `stage`.
fn request<'a>(
    case: &'a Case,
    stage: Stage,
    object: &'a Template,
    old: Option<&'a Template>,
) -> Request<'a> {
    Request {
        operation: case.operation,
        stage,
        object: Some(object),
        old_object: old,
        namespace: &case.namespace,
        namespace_labels: Some(&case.namespace_labels),
        dry_run: case.dry_run,
        requester: Some(Requester {
            username: &case.username,
        }),
        placement_seed: "uid",
    }
}

/// moat's validate stage: the policies that would deny (enforced or audited).
fn moat_denies(config: &Config, case: &Case) -> BTreeMap<Policy, Vec<String>> {
    let template = Template::from_value(&case.object).unwrap().unwrap();
    let old = case
        .old_object
        .as_ref()
        .map(|o| Template::from_value(o).unwrap().unwrap());
    let decision = engine::decide(
        config,
        &request(case, Stage::Validate, &template, old.as_ref()),
    );
    let mut out: BTreeMap<Policy, Vec<String>> = BTreeMap::new();
    for d in decision.denials.iter().chain(&decision.audited) {
        out.entry(d.policy).or_default().push(d.message.clone());
    }
    out
}

/// Whether the API server sends `case` to policy `c` (its resource rules).
fn sent_to(c: &Compiled, case: &Case) -> bool {
    let field = |k: &str| case.object[k].as_str().unwrap_or_default();
    c.subject.covers(field("apiVersion"), field("kind"))
}

fn backstop_denies(config: &Config, case: &Case) -> BTreeMap<Policy, Vec<String>> {
    let mut out = BTreeMap::new();
    for c in backstop::rules(config).iter().filter(|c| sent_to(c, case)) {
        if let Some(failed) = evaluate(c, case)
            && !failed.is_empty()
        {
            out.entry(c.policy).or_insert(failed);
        }
    }
    out
}

/// The final pod moat's mutating webhook makes of `case` (None when it denies).
fn mutated(config: &Config, case: &Case) -> Option<Value> {
    let template = Template::from_value(&case.object).unwrap().unwrap();
    let decision = engine::decide(config, &request(case, Stage::Mutate, &template, None));
    if !decision.allowed() {
        return None;
    }
    let mut object = case.object.clone();
    json_patch::patch(&mut object, &decision.patch).unwrap();
    Some(object)
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn config(path: &str) -> Config {
    Config::from_yaml(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

/// The configurations the corpus runs under: the embedded default, the shipped example, and
/// variants that turn on every rule the backstop compiles.
fn configs() -> Vec<(&'static str, Config)> {
    let default = Config::from_yaml(moat_core::config::DEFAULT_CONFIG_YAML).unwrap();
    let strict = Config::from_yaml(
        r#"
images: {allowedRegistries: [ghcr.io/acme, docker.io/library, localhost:5000], requireDigest: false}
runtimeClass: {reservedRuntimes: [runc], fallbackRuntime: null, defaultRuntimeReserved: true}
isolation:
  mode: class
  namespaceClassLabel: moat.dev/tenant-class
  isolateNamespaces: [ci-*]
  defaultClass: ci
  classes:
    - {name: ci, namespaces: ["ci-*"], runtimeClassName: gvisor}
    - {name: shop, namespaceSelector: {matchLabels: {team: shop}}}
    - {name: "*", namespaces: [open]}
identity: {serviceAccountAnnotation: moat.dev/service-account}
exemptions: {namespaces: [kube-system, moat-system, "*-infra"], ignoreAnnotation: moat.dev/ignore, pinnedPods: true, dryRun: true}
"#,
    )
    .unwrap();
    let mut pod_mode = default.clone();
    pod_mode.isolation.mode = moat_core::config::IsolationMode::Pod;
    pod_mode.images.require_digest = true;
    let dedicated = Config::from_yaml(
        r#"
isolation: {mode: dedicatedNode, classes: [{name: untrusted, namespaces: ["*"]}]}
enforcement: {images: audit, runtimeClass: enforce, isolation: enforce}
"#,
    )
    .unwrap();
    // Every mode in one cluster: classes of their own modes, the global one for `ci`, and a
    // `*` entry of its own mode for the names it covers.
    let mixed = Config::from_yaml(
        r#"
isolation:
  mode: pod
  classes:
    - {name: untrusted, mode: class, namespaces: ["*"]}
    - {name: shop, mode: dedicatedNode, namespaces: [shop, tenant-a]}
    - {name: ci, namespaces: ["ci-*"]}
    - {name: "*", mode: dedicatedNode, namespaces: [open]}
"#,
    )
    .unwrap();
    vec![
        ("default", default),
        ("mixed-modes", mixed),
        ("ipp-compatible", config("examples/ipp-compatible.yaml")),
        ("mixed-modes-example", config("examples/mixed-modes.yaml")),
        ("strict", strict),
        ("pod-mode", pod_mode),
        ("dedicated", dedicated),
    ]
}

fn pod(name: &str, spec: Value, labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": spec,
    })
}

/// Tenant tricks and ordinary pods, as CREATE requests in several namespaces.
fn tricks() -> Vec<Case> {
    let images = [
        "nginx",
        "nginx:latest",
        "nginx:1.27",
        "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "busybox:1@sha256:0123",
        "localhost:5000/redis",
        "localhost:5000/redis:7",
        "ghcr.io/acme/api:1.4",
        "ghcr.io/acmex/api:1.4",
        "ghcr.io/acme",
        "Foo/bar:1",
        "foo_bar.com/x:1",
        "docker.io/library/x:1",
        "docker.io/x:1",
        "index.docker.io/x:1",
        "library/x:2",
        "UPPER:1",
        "a:b/c:1",
        "quay.io/a/b:latest",
        // Other spellings of allowed registries: one registry to moat and to the backstop.
        "GHCR.io/acme/api:1.4",
        "ghcr.io:443/acme/api:1.4",
        "ghcr.io:0443/acme/api:1.4",
        "ghcr.io:8443/acme/api:1.4",
        "LocalHost:05000/redis:7",
        "localhost:5001/redis:7",
        "registry-1.docker.io/x:1",
        "Index.Docker.IO:443/library/x:1",
        "Docker.io/library/x:1",
        "docker.io:5000/library/x:1",
        "",
    ];
    let runtimes = [None, Some("runc"), Some("gvisor"), Some("kata")];
    let tolerations = [
        json!([]),
        json!([{"operator": "Exists"}]),
        json!([{"key": "moat.dev/isolated", "operator": "Exists"}]),
        json!([{"key": "moat.dev/isolated", "operator": "Equal", "value": "untrusted", "effect": "NoSchedule"}]),
        json!([{"key": "ipp", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]),
        json!([{"key": "other", "operator": "Exists"}]),
    ];
    let labels = [
        json!({}),
        json!({"moat.dev/class": "untrusted"}),
        json!({"moat.dev/class": "shop"}),
        json!({"moat.dev/class": "ci"}),
        json!({"moat.dev/class": "Bad_Class"}),
        json!({"ipp-class": "gold"}),
    ];
    let namespaces: [(&str, Value); 6] = [
        ("shop", json!({"team": "shop"})),
        ("gold", json!({"ipp-class": "gold"})),
        ("ci-7", json!({})),
        ("open", json!({})),
        ("tenant-a", json!({"moat.dev/tenant-class": "shop"})),
        ("team-infra", json!({})),
    ];
    let mut cases = Vec::new();
    let mut n = 0;
    // Not the full product: a diagonal walk that still meets every value of every axis with
    // every value of the next one.
    for (i, image) in images.iter().enumerate() {
        for (j, labels) in labels.iter().enumerate() {
            let runtime = runtimes[(i + j) % runtimes.len()];
            let tolerations = &tolerations[(i * 7 + j) % tolerations.len()];
            let (ns, ns_labels) = &namespaces[(i + 2 * j) % namespaces.len()];
            let mut spec = json!({
                "containers": [{"name": "app", "image": image}],
                "tolerations": tolerations,
            });
            if let Some(r) = runtime {
                spec["runtimeClassName"] = json!(r);
            }
            if i % 5 == 1 {
                spec["initContainers"] = json!([{"name": "init", "image": "busybox:1.36"}]);
            }
            if i % 6 == 2 {
                spec["volumes"] = json!([{"name": "data", "image": {"reference": "nginx"}}]);
            }
            if j == 2 && i % 4 == 0 {
                spec["nodeName"] = json!("node-1");
            }
            if j == 3 && i % 3 == 0 {
                spec["schedulerName"] = json!("my-scheduler");
            }
            if i % 4 == 3 {
                spec["serviceAccountName"] = json!("web");
                spec["nodeSelector"] = json!({"disk": "ssd"});
            }
            let annotations = match (i + j) % 4 {
                0 => json!({"moat.dev/service-account": "payments"}),
                1 => json!({"moat.dev/ignore": "true"}),
                _ => json!({}),
            };
            n += 1;
            // Every other pod the DaemonSet controller creates is its DaemonSet's own.
            let mut object = pod(&format!("p{n}"), spec, labels.clone(), annotations);
            if n % 18 == 0 {
                object["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "u", "controller": true}]);
            }
            cases.push(Case {
                name: format!("trick-{n}"),
                operation: Operation::Create,
                object,
                old_object: None,
                namespace: (*ns).to_owned(),
                namespace_labels: serde_json::from_value(ns_labels.clone()).unwrap(),
                username: if n % 9 == 0 {
                    "system:serviceaccount:kube-system:daemon-set-controller".to_owned()
                } else {
                    "alice".to_owned()
                },
                dry_run: n % 11 == 0,
            });
        }
    }
    cases
}

/// The API server's captured Pod requests.
fn captured() -> Vec<Case> {
    let mut cases = Vec::new();
    let dirs = [
        repo("crates/moat-server/tests/data"),
        // The real API servers' captures, kept in the repository beside the server's tests.
        repo("crates/moat-server/tests/data/kube-apiserver-1.26"),
        repo("crates/moat-server/tests/data/kube-apiserver-1.34"),
    ];
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("{} is missing", dir.display());
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(review) = serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap()) else {
                continue;
            };
            let request = &review["request"];
            if request["kind"]["kind"] != "Pod" || request["object"].is_null() {
                continue;
            }
            let operation = match request["operation"].as_str() {
                Some("CREATE") => Operation::Create,
                Some("UPDATE") => Operation::Update,
                _ => continue,
            };
            if Template::from_value(&request["object"]).is_err() {
                continue;
            }
            cases.push(Case {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                operation,
                object: request["object"].clone(),
                old_object: (!request["oldObject"].is_null()).then(|| request["oldObject"].clone()),
                namespace: request["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                namespace_labels: BTreeMap::new(),
                username: request["userInfo"]["username"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                dry_run: request["dryRun"].as_bool().unwrap_or(false),
            });
        }
    }
    assert!(cases.len() >= 10, "the captured pods are found");
    cases
}

/// A change made to a pod.
type Edit = Box<dyn Fn(&mut Value)>;

/// Writes another service account into moat's stamp.
fn restamp(p: &mut Value) {
    p["metadata"]["annotations"]["moat.dev/service-account"] = json!("admin");
}

/// Points the first container at the mutable tag `latest`.
fn tag_latest(p: &mut Value) {
    p["spec"]["containers"][0]["image"] = json!("nginx:latest");
}

/// A running pod's UPDATEs: class label changed, tolerations added, stamp changed, image
/// changed and unchanged.
fn updates(config: &Config, creates: &[Case]) -> Vec<Case> {
    let mut out = Vec::new();
    for case in creates {
        let Some(running) = mutated(config, case) else {
            continue;
        };
        let class_key = config.isolation.pod_class_label.to_string();
        let edits: [(&str, Edit); 5] = [
            (
                "relabel",
                Box::new(move |p| p["metadata"]["labels"][class_key.as_str()] = json!("other")),
            ),
            (
                "tolerate",
                Box::new(|p| {
                    let mut t = p["spec"]["tolerations"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    t.push(json!({"operator": "Exists"}));
                    p["spec"]["tolerations"] = json!(t);
                }),
            ),
            ("restamp", Box::new(restamp)),
            ("retag", Box::new(tag_latest)),
            (
                "status",
                Box::new(|p| p["status"] = json!({"phase": "Running"})),
            ),
        ];
        for (what, edit) in edits {
            let mut after = running.clone();
            edit(&mut after);
            out.push(Case {
                name: format!("{}-{what}", case.name),
                operation: Operation::Update,
                object: after,
                old_object: Some(running.clone()),
                ..case.clone()
            });
        }
    }
    out
}

/// Single faults in pods moat admitted: each breaks one rule, so each rule is seen alone.
fn faults(config: &Config, creates: &[Case]) -> Vec<Case> {
    let mut out = Vec::new();
    for case in creates {
        let Some(admitted) = mutated(config, case) else {
            continue;
        };
        let class_key = config.isolation.pod_class_label.to_string();
        let (k1, k2) = (class_key.clone(), class_key);
        let node_key = config.isolation.nodes.label_key.to_string();
        let edits: [(&str, Edit); 12] = [
            (
                "scheduler",
                Box::new(|p| p["spec"]["schedulerName"] = json!("my-scheduler")),
            ),
            (
                "node-name",
                Box::new(|p| p["spec"]["nodeName"] = json!("node-1")),
            ),
            (
                "no-tolerations",
                Box::new(|p| p["spec"]["tolerations"] = json!([])),
            ),
            (
                "tolerate-all",
                Box::new(|p| p["spec"]["tolerations"] = json!([{"operator": "Exists"}])),
            ),
            (
                "no-affinity",
                Box::new(|p| {
                    if let Some(spec) = p["spec"].as_object_mut() {
                        spec.remove("affinity");
                    }
                }),
            ),
            (
                "selector",
                Box::new(move |p| p["spec"]["nodeSelector"][node_key.as_str()] = json!("other")),
            ),
            (
                "runc",
                Box::new(|p| p["spec"]["runtimeClassName"] = json!("runc")),
            ),
            (
                "no-runtime",
                Box::new(|p| {
                    if let Some(spec) = p["spec"].as_object_mut() {
                        spec.remove("runtimeClassName");
                    }
                }),
            ),
            ("restamp", Box::new(restamp)),
            ("latest", Box::new(tag_latest)),
            (
                "bad-class",
                Box::new(move |p| p["metadata"]["labels"][k1.as_str()] = json!("Bad_Class")),
            ),
            (
                "undeclared-class",
                Box::new(move |p| p["metadata"]["labels"][k2.as_str()] = json!("zzz")),
            ),
        ];
        for (what, edit) in edits {
            let mut object = admitted.clone();
            edit(&mut object);
            out.push(Case {
                name: format!("{}-{what}", case.name),
                object,
                ..case.clone()
            });
        }
        // The same placed pod, as a DaemonSet's controller would create it: where the operator
        // forces a class it is refused even with every change moat makes.
        let mut object = admitted.clone();
        object["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "u", "controller": true}]);
        out.push(Case {
            name: format!("{}-daemonset-pod", case.name),
            object,
            username: "system:serviceaccount:kube-system:daemon-set-controller".to_owned(),
            ..case.clone()
        });
    }
    out
}

/// The pod spec of a pod or of a workload's template.
fn pod_spec(object: &Value) -> &Value {
    [
        "/spec/jobTemplate/spec/template/spec",
        "/spec/template/spec",
        "/spec",
    ]
    .iter()
    .find_map(|p| object.pointer(p))
    .unwrap_or(&Value::Null)
}

/// Each new pod as the template of a workload of each shape the backstop has a policy for
/// (a Deployment, a DaemonSet, whose template is exempt from isolation, and a CronJob, one
/// without template metadata when the pod has no labels or annotations), created; and a
/// Deployment's UPDATEs, one that changes its template to the pod's and one that only scales
/// it (which neither moat nor the backstop decides). Each fault in one of moat's pods, as a
/// Deployment's and a CronJob's template.
fn workloads(creates: &[Case], faults: &[Case]) -> Vec<Case> {
    let mut out = Vec::new();
    let pods = creates
        .iter()
        .map(|c| (c, true))
        .chain(faults.iter().map(|c| (c, false)));
    for (c, every_shape) in pods.filter(|(c, _)| c.object["kind"] == "Pod") {
        let mut metadata = serde_json::Map::new();
        for k in ["labels", "annotations"] {
            if let Some(v) = c.object["metadata"].get(k) {
                metadata.insert(k.to_owned(), v.clone());
            }
        }
        let template = json!({"metadata": metadata, "spec": c.object["spec"]});
        let bare = if metadata.is_empty() {
            json!({"spec": c.object["spec"]})
        } else {
            template.clone()
        };
        let selector = json!({"matchLabels": {"app": "x"}});
        let deployment = |replicas: u32, template: &Value| {
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                   "spec": {"replicas": replicas, "selector": selector, "template": template}})
        };
        let mut old_template = template.clone();
        old_template["spec"]["containers"] =
            json!([{"name": "old", "image": "registry.example/old:1"}]);
        let shapes = [
            (
                "deployment",
                Operation::Create,
                deployment(1, &template),
                None,
            ),
            (
                "daemonset",
                Operation::Create,
                json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
                       "spec": {"selector": selector, "template": template}}),
                None,
            ),
            (
                "cronjob",
                Operation::Create,
                json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "cj"},
                       "spec": {"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": bare}}}}),
                None,
            ),
            (
                "deployment-new-template",
                Operation::Update,
                deployment(1, &template),
                Some(deployment(1, &old_template)),
            ),
            (
                "deployment-scaled",
                Operation::Update,
                deployment(2, &template),
                Some(deployment(1, &template)),
            ),
        ];
        // Faults as created templates of the two layouts only: the corpus is evaluated once
        // per validation.
        let shapes = shapes
            .into_iter()
            .filter(|(shape, ..)| every_shape || ["deployment", "cronjob"].contains(shape));
        for (shape, operation, object, old_object) in shapes {
            out.push(Case {
                name: format!("{}-{shape}", c.name),
                operation,
                object,
                old_object,
                ..c.clone()
            });
        }
    }
    out
}

/// Where moat and the backstop may disagree, by design ([`backstop::GAPS`]).
fn known_gap(case: &Case) -> bool {
    // A reference over the length limit only after normalisation, or a bracketed IPv6 registry.
    let spec = pod_spec(&case.object);
    ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
        .filter_map(|c| c["image"].as_str())
        .any(|i| i.len() > 200 || i.starts_with('['))
}

#[test]
fn the_backstop_decides_as_the_validate_stage_does_on_every_policy() {
    let mut compared = 0;
    let mut denied = BTreeMap::<Policy, usize>::new();
    for (name, config) in configs() {
        let creates: Vec<Case> = tricks().into_iter().chain(captured()).collect();
        let finals: Vec<Case> = creates
            .iter()
            .filter_map(|c| {
                Some(Case {
                    name: format!("{}-mutated", c.name),
                    object: mutated(&config, c)?,
                    ..c.clone()
                })
            })
            .collect();
        assert!(!finals.is_empty(), "{name}: moat admits something");
        let updates = updates(&config, &creates);
        let faults = faults(&config, &creates);
        let workloads = workloads(&creates, &faults);
        for case in creates
            .iter()
            .chain(&finals)
            .chain(&updates)
            .chain(&faults)
            .chain(&workloads)
        {
            if known_gap(case) {
                continue;
            }
            let moat = moat_denies(&config, case);
            let backstop = backstop_denies(&config, case);
            for policy in [
                Policy::Images,
                Policy::RuntimeClass,
                Policy::Isolation,
                Policy::Identity,
            ] {
                let (m, b) = (moat.get(&policy), backstop.get(&policy));
                assert_eq!(
                    m.is_some(),
                    b.is_some(),
                    "{name}/{} {policy:?}: moat {m:?}, backstop {b:?}\nobject: {}",
                    case.name,
                    case.object
                );
                if m.is_some() {
                    *denied.entry(policy).or_default() += 1;
                }
            }
            compared += 1;
        }
        // What moat's own webhook made of a pod, the backstop admits: it never locks out a
        // cluster whose webhook works.
        for case in &finals {
            let enforced: Vec<Policy> = backstop::rules(&config)
                .iter()
                .filter(|c| c.actions == ["Deny"])
                .map(|c| c.policy)
                .collect();
            let mut b = backstop_denies(&config, case);
            b.retain(|p, _| enforced.contains(p));
            assert!(b.is_empty(), "{name}/{}: {b:?}\n{}", case.name, case.object);
        }
    }
    assert!(compared > 1000, "{compared} cases compared");
    for policy in [
        Policy::Images,
        Policy::RuntimeClass,
        Policy::Isolation,
        Policy::Identity,
    ] {
        assert!(
            denied.get(&policy).copied().unwrap_or(0) > 10,
            "the corpus exercises {policy:?}'s denials: {denied:?}"
        );
    }
}

#[test]
fn every_generated_expression_parses() {
    for (name, config) in configs() {
        let backstop = backstop::compile(&config, &["moat-system", "kube-system"]).unwrap();
        assert_eq!(backstop.policies.len(), backstop.bindings.len(), "{name}");
        for c in backstop::rules(&config) {
            let all = c
                .match_conditions
                .iter()
                .map(|(_, e)| e)
                .chain(c.variables.iter().map(|(_, e)| e))
                .chain(c.validations.iter().flat_map(|(e, m)| [e, m]));
            for expr in all {
                compiled(expr);
            }
        }
    }
}

/// Each validation matters: replaced by `true`, some case in the corpus that moat denies is
/// then admitted by the backstop (under at least one configuration where the rule can fail), so
/// the equivalence test would fail.
#[test]
fn changing_any_validation_breaks_the_equivalence() {
    let mut caught: BTreeMap<(String, String), bool> = BTreeMap::new();
    for (_, config) in configs() {
        let creates: Vec<Case> = tricks().into_iter().chain(captured()).collect();
        let updates = updates(&config, &creates);
        let faults = faults(&config, &creates);
        let workloads = workloads(&creates, &faults);
        let corpus: Vec<(Case, BTreeMap<Policy, Vec<String>>)> = creates
            .into_iter()
            .chain(updates)
            .chain(faults)
            .chain(workloads)
            .filter(|c| !known_gap(c))
            .map(|c| {
                let m = moat_denies(&config, &c);
                (c, m)
            })
            .collect();
        for original in backstop::rules(&config) {
            for k in 0..original.validations.len() {
                let key = (original.name.clone(), original.validations[k].1.clone());
                if caught.get(&key) == Some(&true) {
                    continue;
                }
                let mut changed = original.clone();
                changed.validations[k].0 = "true".to_owned();
                let found = corpus
                    .iter()
                    .filter(|(case, _)| sent_to(&changed, case))
                    .any(|(case, moat)| {
                        let denied = evaluate(&changed, case).is_some_and(|f| !f.is_empty());
                        moat.contains_key(&changed.policy) != denied
                    });
                caught.insert(key, found);
            }
        }
    }
    let missed: Vec<_> = caught
        .iter()
        .filter(|(_, c)| !**c)
        .map(|(k, _)| k)
        .collect();
    assert!(
        missed.is_empty(),
        "validations the corpus does not notice when removed: {missed:#?}"
    );
}

/// Image changes a tenant can make to a running pod beyond a retag: an added ephemeral
/// container, an image volume added or repointed, two containers' images swapped, and edits
/// that change no image (an annotation, a finalizer).
fn image_edits(running: &Value) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    let mut debug = running.clone();
    debug["spec"]["ephemeralContainers"] = json!([{"name": "debug", "image": "busybox:1.36"}]);
    out.push(("ephemeral", debug));
    let mut volume = running.clone();
    let mut volumes = volume["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    volumes.push(json!({"name": "models", "image": {"reference": "ghcr.io/acme/models:2"}}));
    volume["spec"]["volumes"] = json!(volumes);
    out.push(("image-volume", volume.clone()));
    let mut repointed = volume;
    let last = repointed["spec"]["volumes"].as_array().unwrap().len() - 1;
    repointed["spec"]["volumes"][last]["image"]["reference"] = json!("ghcr.io/acme/models:3");
    out.push(("image-volume-repointed", repointed));
    if running["spec"]["containers"].as_array().unwrap().len() > 1 {
        let mut swapped = running.clone();
        let (a, b) = (
            swapped["spec"]["containers"][0]["image"].clone(),
            swapped["spec"]["containers"][1]["image"].clone(),
        );
        swapped["spec"]["containers"][0]["image"] = b;
        swapped["spec"]["containers"][1]["image"] = a;
        out.push(("swapped", swapped));
    }
    let mut annotated = running.clone();
    annotated["metadata"]["annotations"]["team"] = json!("shop");
    out.push(("annotated", annotated));
    let mut finalized = running.clone();
    finalized["metadata"]["finalizers"] = json!(["example.com/hold"]);
    out.push(("finalized", finalized));
    out
}

/// With `images.trust`, `moat install` sends pod requests that change images to a webhook of
/// their own (`images.moat.dev`, failing closed) and everything else to `validate.moat.dev`.
/// The first's match condition must hold wherever moat would ask a registry (or an outage
/// would admit an unverified image): false only where the engine resolves nothing. It holds
/// for every new pod, and it is false for status reports and edits that change no image, so
/// an outage stops only what needs a registry. The second's condition is its complement.
#[test]
fn the_images_webhook_sees_every_request_that_needs_a_registry() {
    let changed = backstop::images_changed();
    let rest = backstop::not_an_image_change();
    let (mut needed, mut spared) = (0, 0);
    for (name, mut config) in configs() {
        config.images.trust = Some(serde_json::from_value(json!({"unmatched": "pin"})).unwrap());
        let creates: Vec<Case> = tricks().into_iter().chain(captured()).collect();
        let mut edits = Vec::new();
        for case in &creates {
            let Some(running) = mutated(&config, case) else {
                continue;
            };
            for (what, after) in image_edits(&running) {
                edits.push(Case {
                    name: format!("{}-{what}", case.name),
                    operation: Operation::Update,
                    object: after,
                    old_object: Some(running.clone()),
                    ..case.clone()
                });
            }
        }
        let updates = updates(&config, &creates);
        for case in creates.iter().chain(&updates).chain(&edits) {
            let object = Template::from_value(&case.object).unwrap().unwrap();
            let old = case
                .old_object
                .as_ref()
                .map(|o| Template::from_value(o).unwrap().unwrap());
            let request = request(case, Stage::Validate, &object, old.as_ref());
            let resolves = !engine::images_to_resolve(&config, &request).is_empty();
            let sent = matches(&changed, case);
            assert_ne!(
                sent,
                matches(&rest, case),
                "{name}/{}: one webhook",
                case.name
            );
            if resolves {
                assert!(
                    sent,
                    "{name}/{}: moat asks a registry, but the images webhook is not called\n{}",
                    case.name, case.object
                );
                needed += 1;
            }
            if case.operation == Operation::Create {
                assert!(sent, "{name}/{}: a new pod", case.name);
            } else if case.object["spec"] == case.old_object.as_ref().unwrap()["spec"] {
                assert!(!sent, "{name}/{}: no image changed", case.name);
                spared += 1;
            }
        }
    }
    assert!(
        needed > 1000 && spared > 500,
        "{needed} needed a registry, {spared} spared"
    );
}
