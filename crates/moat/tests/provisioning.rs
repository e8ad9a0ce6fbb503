//! A simulation of the documented provisioning rules over random arrivals and departures of
//! pods of several classes, with the NodePools and warm placeholders moat generates and every
//! pod placed by moat's own engine:
//! - the scheduler binds a pending pod to a ready node whose taints it tolerates, whose labels
//!   meet its nodeSelector and required node affinity, where anti-affinity (both ways) allows it
//!   and its CPU request fits; failing that, it preempts lower-priority pods (placeholders) on a
//!   node where their removal makes room;
//! - Karpenter launches a node for each pod still pending that no launching node can take, from
//!   the pool that accepts it (a node per unsatisfied class, id or anti-affinity), ready a few
//!   ticks later;
//! - a node empty for `consolidateAfter` goes (`WhenEmpty`); a Deployment keeps its
//!   placeholders, recreating displaced ones.
//!
//! Each class has a mode of its own or the global one, drawn at random, so clusters mix modes;
//! beside the launched nodes stand nodes of each class without the topology label (a kubelet
//! may drop `kubernetes.io/hostname`), where the scheduler ignores anti-affinity.
//!
//! After every tick: no node holds pods of two classes, or an isolated and an unisolated pod;
//! every pod runs on a node of its own class; no two pods of a pod or dedicatedNode class share
//! a node; no real pod waits while a node would take it but for placeholders. In the end every
//! pod runs, warm nodes are up, and idle nodes are gone.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test fails loudly on the first surprise"
)]

mod support;

use std::collections::BTreeSet;

use moat_core::config::Config;
use moat_core::decision::Request;
use moat_core::engine::decide;
use moat_core::resources::IdleAfter;
use moat_core::subject::Template;
use moat_objects::capacity::karpenter::{ConsolidationPolicy, NodePool};
use moat_objects::capacity::{self, CapacityOptions as CapacityArgs, WarmForm};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::Node;

const NODE_CPU_MILLIS: u64 = 4000;
const BOOT_TICKS: u64 = 3;
const TICK_SECONDS: u64 = 30;
const CLASSES: [(&str, &str); 3] = [("gold", "bank"), ("lead", "shop"), ("zinc", "lab")];
const LABEL_KEY: &str = "node-restriction.kubernetes.io/moat-class";
const CLASS_LABEL: &str = "moat.dev/class";
const PAUSE: &str = "pause@sha256:2222222222222222222222222222222222222222222222222222222222222222";

#[derive(Debug, Clone)]
struct SimPod {
    pod: Value,
    class: Option<String>,
    cpu: u64,
    priority: i64,
    placeholder: bool,
    node: Option<usize>,
}

#[derive(Debug, Clone)]
struct SimNode {
    node: Node,
    cpu: u64,
    ready_at: u64,
    empty_since: Option<u64>,
    consolidate_after: Option<u64>,
    /// The pool may remove the node while pods run on it (to repack them elsewhere).
    repacks: bool,
    general: bool,
    /// A node no pool launched (here: one without the topology label), never removed.
    standing: bool,
    alive: bool,
}

/// The mode of each class of [`CLASSES`]: its own, or (None) the global one.
#[derive(Debug, Clone, Copy)]
struct Modes {
    global: &'static str,
    classes: [Option<&'static str>; 3],
}

impl Modes {
    fn all(mode: &'static str) -> Self {
        Self {
            global: mode,
            classes: [None; 3],
        }
    }

    /// The mode of class `i`, worked out here rather than by moat's code.
    fn of(&self, i: usize) -> &'static str {
        self.classes[i].unwrap_or(self.global)
    }

    fn of_class(&self, class: &str) -> &'static str {
        self.of(CLASSES.iter().position(|(c, _)| *c == class).unwrap())
    }
}

struct World {
    config: Config,
    modes: Modes,
    pools: Vec<NodePool>,
    nodes: Vec<SimNode>,
    pods: Vec<SimPod>,
    now: u64,
    seeds: usize,
}

fn config(modes: Modes, nodes: &str, warm: u32) -> Config {
    // Class mode: a placeholder is a node's worth, so a real pod displaces it.
    let warm_requests = if modes.of(0) == "class" {
        format!(", warmRequests: {{cpu: '{}m'}}", NODE_CPU_MILLIS)
    } else {
        String::new()
    };
    let warm = if warm > 0 {
        format!(", warmNodes: {warm}{warm_requests}")
    } else {
        String::new()
    };
    let own = |i: usize| modes.classes[i].map_or(String::new(), |m| format!(", mode: {m}"));
    Config::from_yaml(&format!(
        "isolation:\n  mode: {}\n  {nodes}\n  classes: [{{name: gold, namespaces: [bank, moat-warm-gold], idleAfter: 1m{warm}{}}}, {{name: lead, namespaces: [shop]{}}}, {{name: zinc, namespaces: [lab]{}}}]\n",
        modes.global,
        own(0),
        own(1),
        own(2)
    ))
    .unwrap()
}

fn cpu_of(pod: &Value) -> u64 {
    pod.pointer("/spec/containers/0/resources/requests/cpu")
        .and_then(Value::as_str)
        .map_or(0, |q| {
            u64::try_from(q.parse::<moat_core::resources::Quantity>().unwrap().milli()).unwrap()
        })
}

impl World {
    fn new(modes: Modes, layout: &str, warm: u32) -> Self {
        let config = config(modes, layout, warm);
        let pools =
            capacity::node_pools(&config, &["example.dev/ExampleNodeClass/x".to_owned()]).unwrap();
        let general = SimNode {
            node: Node {
                labels: [(support::HOSTNAME.to_owned(), "general".to_owned())].into(),
                taints: Vec::new(),
            },
            cpu: u64::MAX,
            ready_at: 0,
            empty_since: None,
            consolidate_after: None,
            repacks: false,
            general: true,
            standing: false,
            alive: true,
        };
        // A node of each class (as its pool would label and taint it) that lost its topology
        // label: isolated pods of class and pod modes require the label, dedicatedNode pods
        // an id, so none may run there.
        let iso = &config.isolation;
        let standing = CLASSES.iter().map(|(class, _)| {
            let label = iso
                .nodes
                .label_value
                .as_ref()
                .map_or(*class, |v| v.as_str());
            let taint = iso
                .nodes
                .taint_value
                .as_ref()
                .map_or(*class, |v| v.as_str());
            SimNode {
                node: Node {
                    labels: [(LABEL_KEY.to_owned(), label.to_owned())].into(),
                    taints: vec![(
                        iso.nodes.taint_key.to_string(),
                        taint.to_owned(),
                        iso.nodes.taint_effect.as_str().to_owned(),
                    )],
                },
                cpu: NODE_CPU_MILLIS,
                ready_at: 0,
                empty_since: None,
                consolidate_after: None,
                repacks: false,
                general: false,
                standing: true,
                alive: true,
            }
        });
        let nodes = std::iter::once(general).chain(standing).collect();
        let mut world = Self {
            config,
            modes,
            pools,
            nodes,
            pods: Vec::new(),
            now: 0,
            seeds: 0,
        };
        // The classic form, as installed: its PriorityClass and its Deployment's pods.
        let args = CapacityArgs {
            warm_form: WarmForm::Placeholders,
            pause_image: Some(PAUSE.to_owned()),
            ..CapacityArgs::default()
        };
        let objects = capacity::warm_objects(&world.config, &args).unwrap();
        let priority = objects
            .iter()
            .find(|o| o["kind"] == "PriorityClass")
            .map(|p| p["value"].as_i64().unwrap());
        for d in objects.iter().filter(|o| o["kind"] == "Deployment") {
            let template = &d["spec"]["template"];
            for _ in 0..d["spec"]["replicas"].as_u64().unwrap() {
                let pod = json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": d["metadata"]["namespace"], "labels": template["metadata"]["labels"]},
                    "spec": template["spec"],
                });
                world.pods.push(SimPod {
                    class: Some(
                        template["metadata"]["labels"][CLASS_LABEL]
                            .as_str()
                            .unwrap()
                            .to_owned(),
                    ),
                    cpu: cpu_of(&pod),
                    pod,
                    priority: priority.unwrap(),
                    placeholder: true,
                    node: None,
                });
            }
        }
        world
    }

    /// A tenant pod of class `class` (index into CLASSES), or an unisolated one, admitted by
    /// moat's mutating webhook.
    fn arrive(&mut self, class: Option<usize>, cpu: u64) {
        let (namespace, labels) = match class {
            Some(i) => (CLASSES[i].1, json!({CLASS_LABEL: CLASSES[i].0})),
            None => ("plain", json!({})),
        };
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": namespace, "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "app:1.0", "resources": {"requests": {"cpu": format!("{cpu}m")}}}]},
        });
        self.seeds += 1;
        let seed = format!("uid-{}", self.seeds);
        let template = Template::from_value(&pod).unwrap().unwrap();
        let req = Request::offline_create(Some(&template), namespace, None, &seed);
        let d = decide(&self.config, &req);
        assert!(d.allowed(), "{}", d.message());
        self.pods.push(SimPod {
            pod: d.patched(&pod).unwrap(),
            class: class.map(|i| CLASSES[i].0.to_owned()),
            cpu,
            priority: 0,
            placeholder: false,
            node: None,
        });
    }

    fn depart(&mut self, pick: usize) {
        let real: Vec<usize> = (0..self.pods.len())
            .filter(|&i| !self.pods[i].placeholder)
            .collect();
        if !real.is_empty() {
            self.pods.remove(real[pick % real.len()]);
        }
    }

    fn on(&self, node: usize) -> impl Iterator<Item = &SimPod> {
        self.pods.iter().filter(move |p| p.node == Some(node))
    }

    fn ready(&self, n: usize) -> bool {
        self.nodes[n].alive && self.nodes[n].ready_at <= self.now
    }

    /// Whether `pod` fits node `n` next to `others` (anti-affinity and CPU).
    fn fits_with(&self, pod: &SimPod, n: usize, others: &[&SimPod]) -> bool {
        let node = &self.nodes[n];
        let used: u64 = others.iter().map(|p| p.cpu).sum();
        let values: Vec<&Value> = others.iter().map(|p| &p.pod).collect();
        // The scheduler ignores anti-affinity on a node without its topology label.
        let topology = node.node.labels.contains_key(support::HOSTNAME);
        support::node_fits(&pod.pod, &node.node)
            && (!topology || support::anti_affinity_allows(&pod.pod, &values))
            && node.cpu.saturating_sub(used) >= pod.cpu
    }

    fn pending(&self) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.pods.len())
            .filter(|&i| self.pods[i].node.is_none())
            .collect();
        p.sort_by_key(|&i| std::cmp::Reverse(self.pods[i].priority));
        p
    }

    fn schedule(&mut self) {
        for i in self.pending() {
            let nodes: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.ready(n)).collect();
            let pod = self.pods[i].clone();
            if let Some(&n) = nodes.iter().find(|&&n| {
                let others: Vec<&SimPod> = self.on(n).collect();
                self.fits_with(&pod, n, &others)
            }) {
                self.pods[i].node = Some(n);
                continue;
            }
            // Preemption: lower-priority pods of a node give way where that makes room.
            let victim_node = nodes.iter().copied().find(|&n| {
                let kept: Vec<&SimPod> =
                    self.on(n).filter(|p| p.priority >= pod.priority).collect();
                self.on(n).any(|p| p.priority < pod.priority) && self.fits_with(&pod, n, &kept)
            });
            if let Some(n) = victim_node {
                for p in &mut self.pods {
                    if p.node == Some(n) && p.priority < pod.priority {
                        p.node = None; // the Deployment recreates it, pending
                    }
                }
                self.pods[i].node = Some(n);
            }
        }
    }

    fn provision(&mut self) {
        let mut nominated: Vec<(usize, Vec<usize>)> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].alive && !self.ready(n))
            .map(|n| (n, Vec::new()))
            .collect();
        for i in self.pending() {
            let pod = self.pods[i].clone();
            if let Some(slot) = nominated.iter_mut().find(|(n, on)| {
                let others: Vec<&SimPod> = on.iter().map(|&j| &self.pods[j]).collect();
                self.fits_with(&pod, *n, &others)
            }) {
                slot.1.push(i);
                continue;
            }
            let host = format!("node-{}", self.nodes.len());
            let Some((node, pool)) = self
                .pools
                .iter()
                .find_map(|p| support::launch(p, &pod.pod, &host).map(|n| (n, p)))
            else {
                continue;
            };
            let repacks = pool.spec.disruption.as_ref().unwrap().consolidation_policy
                == Some(ConsolidationPolicy::WhenEmptyOrUnderutilized);
            let after = match pool
                .spec
                .disruption
                .as_ref()
                .unwrap()
                .consolidate_after
                .parse::<IdleAfter>()
                .unwrap()
            {
                IdleAfter::Seconds(s) => Some(s.div_ceil(TICK_SECONDS)),
                IdleAfter::Never => None,
            };
            self.nodes.push(SimNode {
                node,
                cpu: NODE_CPU_MILLIS,
                ready_at: self.now + BOOT_TICKS,
                empty_since: None,
                consolidate_after: after,
                repacks,
                general: false,
                standing: false,
                alive: true,
            });
            nominated.push((self.nodes.len() - 1, vec![i]));
        }
    }

    fn consolidate(&mut self) {
        for n in 0..self.nodes.len() {
            if !self.ready(n) || self.nodes[n].general || self.nodes[n].standing {
                continue;
            }
            let empty = self.on(n).next().is_none();
            let now = self.now;
            let node = &mut self.nodes[n];
            if !empty {
                node.empty_since = None;
                continue;
            }
            let since = *node.empty_since.get_or_insert(now);
            if node
                .consolidate_after
                .is_some_and(|after| now - since >= after)
            {
                node.alive = false;
            }
        }
    }

    fn tick(&mut self) {
        self.now += 1;
        self.schedule();
        self.provision();
        self.consolidate();
        self.check();
    }

    fn check(&self) {
        let iso = &self.config.isolation;
        for n in 0..self.nodes.len() {
            let node = &self.nodes[n];
            let pods: Vec<&SimPod> = self.on(n).collect();
            assert!(node.alive || pods.is_empty(), "pods on a removed node");
            let kinds: BTreeSet<Option<&str>> = pods.iter().map(|p| p.class.as_deref()).collect();
            assert!(kinds.len() <= 1, "node {n} holds {kinds:?} at once");
            for p in &pods {
                match &p.class {
                    None => assert!(node.general, "an unisolated pod on isolated node {n}"),
                    Some(class) => {
                        assert!(!node.general, "an isolated pod on the general node");
                        let want = iso
                            .nodes
                            .label_value
                            .as_ref()
                            .map_or(class.as_str(), |v| v.as_str());
                        assert_eq!(node.node.labels[LABEL_KEY], want, "node of its class");
                        if let Some(id) = p.pod["spec"]["nodeSelector"]
                            [iso.dedicated_node_label.as_str()]
                        .as_str()
                        {
                            assert_eq!(node.node.labels[iso.dedicated_node_label.as_str()], id);
                        }
                    }
                }
            }
            let own_node = pods
                .iter()
                .filter_map(|p| p.class.as_deref())
                .any(|c| self.modes.of_class(c) != "class");
            // A node of its own is never underused in a way moving its pod would fix: its pool
            // removes it only once empty.
            assert!(
                !(own_node && node.repacks),
                "{:?}: node {n} of a class with a node per pod would be repacked",
                self.modes
            );
            if own_node {
                assert!(
                    pods.len() <= 1,
                    "{:?}: {} isolated pods on node {n}, one of a class with a node per pod",
                    self.modes,
                    pods.len()
                );
            }
        }
        // Placeholders never block: a waiting real pod has no node that would take it if the
        // placeholders there were gone.
        for p in self
            .pods
            .iter()
            .filter(|p| p.node.is_none() && !p.placeholder)
        {
            for n in (0..self.nodes.len()).filter(|&n| self.ready(n)) {
                let real: Vec<&SimPod> = self.on(n).filter(|q| !q.placeholder).collect();
                assert!(
                    !self.fits_with(p, n, &real),
                    "a {:?} pod waits while node {n} would take it but for placeholders",
                    p.class
                );
            }
        }
    }

    /// Ticks until everything launched is ready and bound.
    fn settle(&mut self) {
        for _ in 0..(2 * BOOT_TICKS + 2) {
            self.tick();
        }
    }

    fn isolated_nodes(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.alive && !n.general && !n.standing)
            .count()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Arrive { class: Option<usize>, cpu: u64 },
    Depart(usize),
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop::option::weighted(0.85, 0..CLASSES.len()), 250..=2000u64)
            .prop_map(|(class, cpu)| Op::Arrive { class, cpu }),
        2 => any::<usize>().prop_map(Op::Depart),
        3 => Just(Op::Tick),
    ]
}

const MODES: &[&str] = &["class", "pod", "dedicatedNode"];

const LAYOUTS: [&str; 3] = [
    "",
    "nodes: {labelValue: isolated, taintValue: isolated}",
    "nodes: {taintValue: isolated}",
];

fn run(modes: Modes, layout: usize, warm: u32, ops: &[Op]) {
    let mode = format!("{modes:?}");
    let mut world = World::new(modes, LAYOUTS[layout], warm);
    for op in ops {
        match op {
            Op::Arrive { class, cpu } => world.arrive(*class, *cpu),
            Op::Depart(pick) => world.depart(*pick),
            Op::Tick => world.tick(),
        }
    }
    world.settle();
    for p in &world.pods {
        assert!(
            p.node.is_some(),
            "{mode}: a {:?} pod never got a node",
            p.class
        );
    }
    // Everyone leaves; once idle nodes have had their consolidateAfter, only warm ones remain,
    // one per placeholder (in class mode a placeholder fills its node).
    let placeholders = world.pods.iter().filter(|p| p.placeholder).count();
    world.pods.retain(|p| p.placeholder);
    for _ in 0..(60 / TICK_SECONDS + 2) {
        world.tick();
    }
    assert_eq!(
        world.isolated_nodes(),
        placeholders,
        "{mode}: idle nodes removed, warm nodes kept"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_pod_gets_a_node_of_its_class_and_no_node_mixes_classes(
        global in prop::sample::select(MODES),
        own in prop::array::uniform3(prop::option::of(prop::sample::select(MODES))),
        layout in 0..LAYOUTS.len(),
        warm in 0..3u32,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let modes = Modes { global, classes: own };
        // dedicatedNode mode refuses warm nodes (a node per id, known only once its pod is).
        let warm = if modes.of(0) == "dedicatedNode" { 0 } else { warm };
        run(modes, layout, warm, &ops);
    }
}

/// The case the warm pool exists for: a pod arrives and finds a node of its class ready.
#[test]
fn a_warm_node_takes_the_next_pod_at_once() {
    for mode in ["class", "pod"] {
        let mut world = World::new(Modes::all(mode), "", 1);
        world.settle();
        assert_eq!(world.isolated_nodes(), 1, "{mode}: one warm node");
        world.arrive(Some(0), 1000);
        world.tick();
        let pod = world.pods.iter().find(|p| !p.placeholder).unwrap();
        assert!(pod.node.is_some(), "{mode}: bound in the same tick");
        // The displaced placeholder gets a node of its own again.
        world.settle();
        assert!(world.pods.iter().all(|p| p.node.is_some()));
        assert_eq!(world.isolated_nodes(), 2, "{mode}");
        // A cold pod of another class waits for its node: warm gold capacity is not its.
        world.arrive(Some(1), 1000);
        world.tick();
        assert!(world.pods.last().unwrap().node.is_none(), "{mode}");
    }
}
