//! The `moat` command: offline review, configuration, the admission server, certificates, the
//! installer and the node identity agent, all on the same policy core.

pub mod capacity;
pub mod identity;
pub mod install;
pub mod review;
pub mod serve;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moat_core::config::{Config, DEFAULT_CONFIG_YAML};

use crate::review::{Input, MAX_INPUT_LEN_BYTES, Options, OutputFormat};

/// Exit status for usage, configuration and parse errors.
const EXIT_ERROR: u8 = 2;

/// Exit status of a command whose arguments were fine but that could not run (a port in use,
/// TLS files that do not load, a runtime that went away).
pub(crate) const EXIT_FAILED: u8 = 3;

/// Isolation for untrusted Kubernetes workloads.
#[derive(Debug, Parser)]
#[command(name = "moat", version, about)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Review manifests on disk as the admission webhook would (each object as a CREATE).
    ///
    /// Exit status: 0 all allowed, 1 any denied, 2 usage, configuration or parse error.
    Review(ReviewArgs),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the admission server (HTTPS reviews, plain-HTTP metrics).
    Serve(serve::ServeArgs),
    /// Write a CA and a serving certificate for the webhook's service DNS names.
    Certs(serve::CertsArgs),
    /// Print every manifest needed to run moat's admission webhooks (apply with kubectl).
    Install(install::InstallArgs),
    /// Run the node identity agent: a containerd NRI plugin that writes SPIFFE SVIDs for
    /// annotated containers before they start.
    IdentityAgent(identity::IdentityAgentArgs),
}

#[derive(Debug, clap::Args)]
struct ReviewArgs {
    /// Configuration file (YAML or JSON). Default: the embedded configuration.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Namespace for objects that name none.
    #[arg(long, default_value = "default", value_name = "NS")]
    namespace: String,
    /// A namespace label, as NAMESPACE:KEY=VALUE (repeatable). Namespace documents in the input
    /// are read too.
    #[arg(long = "namespace-label", value_name = "NS:KEY=VALUE", value_parser = parse_namespace_label)]
    namespace_labels: Vec<(String, String, String)>,
    /// Instead of verdicts, report how many nodes of which class the pods need in the class's
    /// isolation mode, and in each other mode (docs/capacity.md).
    #[arg(long)]
    capacity: bool,
    /// One node's allocatable CPU, for the class-mode packing estimate of `--capacity`.
    #[arg(long, value_name = "QUANTITY", requires = "capacity")]
    node_cpu: Option<moat_core::resources::Quantity>,
    /// One node's allocatable memory, for the class-mode packing estimate of `--capacity`.
    #[arg(long, value_name = "QUANTITY", requires = "capacity")]
    node_memory: Option<moat_core::resources::Quantity>,
    /// Manifest files (multi-document YAML or JSON); `-` reads standard input.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the embedded default configuration.
    Default,
    /// Check a configuration file and print it with every default filled in.
    ///
    /// Exit status: 0 valid (warnings on standard error), 2 invalid, or the cluster could not
    /// be read with --cluster.
    Check {
        /// Configuration file (YAML or JSON).
        file: PathBuf,
        /// Also look at the cluster (read-only): warn about each RuntimeClass the
        /// configuration sends pods to that does not exist there.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: the kubeconfig. Default: in-cluster, then $KUBECONFIG, then
        /// ~/.kube/config.
        #[arg(long, value_name = "FILE", requires = "cluster")]
        kubeconfig: Option<PathBuf>,
    },
}

fn parse_namespace_label(s: &str) -> Result<(String, String, String), String> {
    let (ns, kv) = s.split_once(':').ok_or("expected NAMESPACE:KEY=VALUE")?;
    let (k, v) = kv.split_once('=').ok_or("expected NAMESPACE:KEY=VALUE")?;
    if ns.is_empty() || k.is_empty() {
        return Err("namespace and key must not be empty".to_owned());
    }
    Ok((ns.to_owned(), k.to_owned(), v.to_owned()))
}

impl Args {
    /// Parses the command line and runs the command.
    pub fn parse_and_run() -> ExitCode {
        let args = Self::parse();
        // Verdicts stream out one by one: buffer them rather than write a line at a time.
        // Unlocked handles: `moat serve` logs to stderr from other threads, and a lock held here
        // for the whole run would block them forever.
        let mut stdout = std::io::BufWriter::new(std::io::stdout());
        let mut stderr = std::io::stderr();
        let code = args.run(&mut std::io::stdin().lock(), &mut stdout, &mut stderr);
        match stdout.flush() {
            Ok(()) => ExitCode::from(code),
            Err(e) => {
                let _ = writeln!(stderr, "moat: writing output: {e}");
                ExitCode::from(EXIT_ERROR)
            }
        }
    }

    /// Runs the command with the given streams; returns the exit status.
    pub fn run(self, stdin: &mut dyn Read, stdout: &mut dyn Write, stderr: &mut dyn Write) -> u8 {
        let Self { command } = self;
        let result = match command {
            Command::Review(args) => run_review(args, stdin, stdout, stderr),
            Command::Serve(args) => serve::run_serve(args),
            Command::Certs(args) => serve::run_certs(args, stdout),
            Command::Install(args) => install::run_install(args, stdout),
            Command::IdentityAgent(args) => identity::run_identity_agent(args),
            Command::Config(ConfigCommand::Default) => stdout
                .write_all(DEFAULT_CONFIG_YAML.as_bytes())
                .map(|()| 0)
                .map_err(|e| e.to_string()),
            Command::Config(ConfigCommand::Check {
                file,
                cluster,
                kubeconfig,
            }) => {
                load_config(Some(&file)).and_then(|c| {
                    let mut warnings = c.warnings();
                    if cluster {
                        warnings.extend(cluster_warnings(&c, kubeconfig.as_ref())?);
                    }
                    for warning in warnings {
                        // A failed write to stderr leaves nothing else to report to.
                        let _ = writeln!(stderr, "moat: warning: {warning}");
                    }
                    let text = serde_yaml_ng::to_string(&c).map_err(|e| e.to_string())?;
                    stdout
                        .write_all(text.as_bytes())
                        .map(|()| 0)
                        .map_err(|e| e.to_string())
                })
            }
        };
        result.unwrap_or_else(|message| {
            // A failed write to stderr leaves nothing else to report to.
            let _ = writeln!(stderr, "moat: {message}");
            EXIT_ERROR
        })
    }
}

/// What the cluster lacks for `config`: each RuntimeClass it sends pods to that does not exist.
fn cluster_warnings(
    config: &moat_core::config::Config,
    kubeconfig: Option<&PathBuf>,
) -> Result<Vec<String>, String> {
    use k8s_openapi::api::node::v1::RuntimeClass;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let existing = runtime.block_on(async {
        let client = moat_server::server::kube_client(kubeconfig)
            .await
            .map_err(|e| format!("--cluster: {e}"))?;
        kube::Api::<RuntimeClass>::all(client)
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| format!("--cluster: listing RuntimeClasses: {e}"))
    })?;
    let names: std::collections::BTreeSet<String> = existing
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    Ok(moat_objects::install::runtime_class_names(config)
        .into_iter()
        .filter(|name| !names.contains(*name))
        .map(|name| {
            format!(
                "RuntimeClass '{name}' does not exist in the cluster: the API server refuses every pod moat sends to it; `moat install` installs it (--runtime-handler {name}=HANDLER), or create it yourself"
            )
        })
        .collect())
}

fn read_limited(reader: &mut dyn Read, name: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    reader
        .take(MAX_INPUT_LEN_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() > MAX_INPUT_LEN_BYTES {
        return Err(format!("{name}: larger than {MAX_INPUT_LEN_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| format!("{name}: not UTF-8 text"))
}

pub(crate) fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    let Some(path) = path else {
        return Ok(Config::embedded_default());
    };
    let name = path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let text = read_limited(&mut file, &name)?;
    Config::from_yaml(&text).map_err(|e| format!("configuration {name}: {e}"))
}

fn run_review(
    args: ReviewArgs,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<u8, String> {
    let ReviewArgs {
        config,
        output,
        namespace,
        namespace_labels,
        capacity,
        node_cpu,
        node_memory,
        files,
    } = args;
    let config = load_config(config.as_ref())?;
    let mut options = Options {
        default_namespace: namespace,
        namespace_labels: BTreeMap::new(),
    };
    for (ns, k, v) in namespace_labels {
        options.namespace_labels.entry(ns).or_default().insert(k, v);
    }
    let mut inputs = Vec::new();
    let mut failed = false;
    let mut stdin_used = false;
    for path in files {
        let name = path.display().to_string();
        let text = if name == "-" {
            if std::mem::replace(&mut stdin_used, true) {
                return Err("standard input ('-') given twice".to_owned());
            }
            read_limited(stdin, "<stdin>")
        } else {
            std::fs::File::open(&path)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|mut f| read_limited(&mut f, &name))
        };
        match text {
            Ok(text) => inputs.push(Input {
                name: if name == "-" {
                    "<stdin>".to_owned()
                } else {
                    name
                },
                text,
            }),
            Err(e) => {
                failed = true;
                let _ = writeln!(stderr, "moat: {e}");
            }
        }
    }
    if capacity {
        let node = moat_objects::capacity::report::NodeSize {
            cpu: node_cpu,
            memory: node_memory,
        };
        let documents = review::documents(&inputs).map(|(file, number, doc)| {
            moat_objects::capacity::report::Document {
                file,
                number,
                objects: review::parse_document(doc),
            }
        });
        let (report, errors) = moat_objects::capacity::report::report(
            &config,
            documents,
            &review::namespace_labels(&inputs, &options),
            &options.default_namespace,
            &node,
        );
        errors
            .iter()
            .try_for_each(|e| writeln!(stderr, "moat: {e}"))
            .and_then(|()| capacity::render(&report, output, stdout))
            .map_err(|e| format!("writing output: {e}"))?;
        // As `moat review`: 2 for errors, 1 when any object was denied, 0 otherwise.
        return Ok(if failed || report.errors > 0 {
            EXIT_ERROR
        } else if report.denied_objects > 0 {
            1
        } else {
            0
        });
    }
    let summary = review::review(&config, &inputs, &options, output, stdout, stderr)
        .map_err(|e| format!("writing output: {e}"))?;
    Ok(if failed {
        EXIT_ERROR
    } else {
        summary.exit_code()
    })
}
