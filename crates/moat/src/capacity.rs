//! The capacity arguments of `moat install` and the printing of `moat review --capacity`; what
//! they make is [`moat_objects::capacity`]'s.

use std::io::Write;

use moat_core::config::ClassMode;
use moat_objects::capacity::report::CapacityReport;
use moat_objects::capacity::{CapacityOptions, WarmForm, buffer};

use crate::review::OutputFormat;

/// How warm capacity is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WarmFormArg {
    /// A PodTemplate and a CapacityBuffer per class: the autoscaler simulates the placeholders
    /// (Cluster Autoscaler, Karpenter with CapacityBuffer support). Nothing runs on warm nodes.
    CapacityBuffer,
    /// A Deployment of placeholder pods per class with a negative-priority PriorityClass: real
    /// pods preempt them, and the autoscaler adds a node for each displaced one. For
    /// autoscalers without CapacityBuffer.
    Placeholders,
}

impl From<WarmFormArg> for WarmForm {
    fn from(form: WarmFormArg) -> Self {
        match form {
            WarmFormArg::CapacityBuffer => Self::CapacityBuffer,
            WarmFormArg::Placeholders => Self::Placeholders,
        }
    }
}

/// The CapacityBuffer API version an autoscaler serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BufferVersionArg {
    /// `autoscaling.x-k8s.io/v1beta1`: Karpenter's CapacityBuffer CRD (the only version it
    /// serves) and the Cluster Autoscaler from Kubernetes 1.35.
    V1beta1,
    /// `autoscaling.x-k8s.io/v1alpha1`: earlier Cluster Autoscalers only (Karpenter does not
    /// serve it).
    V1alpha1,
}

impl From<BufferVersionArg> for buffer::Version {
    fn from(version: BufferVersionArg) -> Self {
        match version {
            BufferVersionArg::V1beta1 => Self::V1beta1,
            BufferVersionArg::V1alpha1 => Self::V1alpha1,
        }
    }
}

/// The capacity arguments of `moat install`.
#[derive(Debug, Clone, clap::Args)]
pub struct CapacityArgs {
    /// Also print Karpenter v1 NodePools for the isolated nodes of each class.
    #[arg(long)]
    pub karpenter: bool,
    /// The Karpenter node class the pools launch from, as GROUP/KIND/NAME; CLASS=GROUP/KIND/NAME
    /// for one class's own pool (repeatable).
    #[arg(
        long = "node-class",
        value_name = "[CLASS=]GROUP/KIND/NAME",
        requires = "karpenter"
    )]
    pub node_classes: Vec<String>,
    /// How warm capacity (classes with warmNodes) is kept.
    #[arg(long, value_enum, default_value_t = WarmFormArg::CapacityBuffer)]
    pub warm_form: WarmFormArg,
    /// The CapacityBuffer API version the autoscaler serves.
    #[arg(long, value_enum, default_value_t = BufferVersionArg::V1beta1)]
    pub capacity_buffer_version: BufferVersionArg,
    /// The image warm placeholders run, pinned by digest (needed when a class sets warmNodes).
    #[arg(long, value_name = "IMAGE@sha256:…")]
    pub pause_image: Option<String>,
}

impl From<CapacityArgs> for CapacityOptions {
    fn from(args: CapacityArgs) -> Self {
        let CapacityArgs {
            karpenter,
            node_classes,
            warm_form,
            capacity_buffer_version,
            pause_image,
        } = args;
        Self {
            karpenter,
            node_classes,
            warm_form: warm_form.into(),
            capacity_buffer_version: capacity_buffer_version.into(),
            pause_image,
        }
    }
}

/// Writes the report as a table (text) or as one JSON/YAML document.
///
/// # Errors
/// Only the writer's.
pub(crate) fn render(
    report: &CapacityReport,
    format: OutputFormat,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, report).map_err(std::io::Error::other)?;
            writeln!(out)
        }
        OutputFormat::Yaml => {
            let text = serde_yaml_ng::to_string(report).map_err(std::io::Error::other)?;
            out.write_all(text.as_bytes())
        }
        OutputFormat::Text => render_text(report, out),
    }
}

fn render_text(r: &CapacityReport, out: &mut dyn Write) -> std::io::Result<()> {
    let default = if r.mode == "off" {
        "isolation is off; counted with classes without a mode of their own in class mode"
            .to_owned()
    } else {
        format!("classes without a mode of their own: {} mode", r.mode)
    };
    writeln!(
        out,
        "nodes for isolated pods in each class's mode, and in every mode ({default})"
    )?;
    let at_least = |n: Option<u64>| n.map_or_else(|| "≥1".to_owned(), |n| format!("≥{n}"));
    let rows: Vec<[String; 10]> = r
        .classes
        .iter()
        .map(|c| {
            [
                c.class.clone(),
                c.mode.as_str().to_owned(),
                match c.mode {
                    ClassMode::Class => at_least(c.needed),
                    ClassMode::Pod | ClassMode::DedicatedNode => {
                        c.needed.map_or_else(String::new, |n| n.to_string())
                    }
                },
                c.pods.to_string(),
                format!("{}m", c.cpu_millis),
                format!("{}Mi", c.memory_bytes.div_ceil(1 << 20)),
                at_least(c.nodes.class),
                c.nodes.pod.to_string(),
                c.nodes.dedicated_node.to_string(),
                format!("+{}", c.warm_nodes),
            ]
        })
        .collect();
    let header = [
        "CLASS",
        "MODE",
        "NODES",
        "PODS",
        "CPU",
        "MEMORY",
        "CLASS MODE",
        "POD MODE",
        "DEDICATED MODE",
        "WARM",
    ];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            s.push_str(cell);
            s.push_str(&" ".repeat(w - cell.chars().count() + 2));
        }
        s.trim_end().to_owned()
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }
    // A class-mode class with no node size given needs at least one node.
    let (pods, needed, warm) = r.classes.iter().fold((0, 0, 0), |(p, n, w), c| {
        (
            p + c.pods,
            n + c.needed.unwrap_or(u64::from(c.pods > 0)),
            w + u64::from(c.warm_nodes),
        )
    });
    let shared = r.classes.iter().any(|c| c.mode == ClassMode::Class);
    writeln!(
        out,
        "{pods} isolated pods need {}{needed} nodes in their classes' modes, and {warm} warm{}",
        if shared { "≥" } else { "" },
        if r.classes.iter().any(|c| c.nodes.class.is_none()) {
            " (give --node-cpu and --node-memory for a packing estimate of class mode)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "not isolated: {} pods; denied (not counted): {} objects; DaemonSets (a pod on every node): {}; errors: {}",
        r.unisolated_pods, r.denied_objects, r.daemon_sets, r.errors
    )
}
