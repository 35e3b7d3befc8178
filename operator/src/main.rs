//! `clip-operator run | crd | render -f FILE`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use clap::{Parser, Subcommand, ValueEnum};
use clip_operator::class::ClipProcessorClass;
use clip_operator::crd::ClipProcessor;
use clip_operator::metrics::Metrics;
use clip_operator::reconcile::scope::Namespaces;
use clip_operator::reconcile::{self, Context, validate::OperatorSettings};
use clip_operator::scaler::sqs::QueueReader;
use kube::CustomResourceExt;

#[derive(Parser)]
#[command(
    name = "clip-operator",
    version,
    about = "Kubernetes operator for ClipProcessor"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum CrdKind {
    Processor,
    Class,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (with leader election).
    Run(RunArgs),
    /// Print a CRD: the ClipProcessor's (default) or the ClipProcessorClass's.
    Crd {
        #[arg(value_enum, default_value_t = CrdKind::Processor)]
        kind: CrdKind,
    },
    /// Print every object the operator would apply for the ClipProcessors in FILE.
    Render {
        /// A YAML file with one or more ClipProcessors ('-' for stdin).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
    },
}

#[derive(clap::Args)]
struct SettingsArgs {
    /// Worker image for processors that do not set worker.image.
    #[arg(long, env = "WORKER_IMAGE")]
    worker_image: Option<String>,
    /// Image pull policy for workers and cache-warm Jobs.
    #[arg(long, env = "WORKER_IMAGE_PULL_POLICY")]
    worker_image_pull_policy: Option<String>,
    /// AWS_ENDPOINT_URL handed to the workers (emulators, private endpoints).
    #[arg(long, env = "WORKER_AWS_ENDPOINT_URL")]
    worker_aws_endpoint_url: Option<String>,
    /// Pull secrets (names, comma-separated) every worker and cache-warm pod gets, looked up in
    /// the processor's namespace, before the processor's own worker.imagePullSecrets.
    #[arg(long, env = "WORKER_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    worker_image_pull_secrets: Vec<String>,
    /// Serve only processors of a ClipProcessorClass (named, or the default class); others are
    /// Degraded with the reason ClassRequired. For shared clusters.
    #[arg(long, env = "REQUIRE_CLASS")]
    require_class: bool,
}

impl SettingsArgs {
    fn settings(&self) -> OperatorSettings {
        let d = OperatorSettings::default();
        OperatorSettings {
            worker_image: self.worker_image.clone().unwrap_or(d.worker_image),
            image_pull_policy: self.worker_image_pull_policy.clone(),
            aws_endpoint_url: self.worker_aws_endpoint_url.clone(),
            image_pull_secrets: self
                .worker_image_pull_secrets
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            require_class: self.require_class,
            ..d
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Port of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_PORT", default_value_t = 8080)]
    metrics_port: u16,
    /// Name of the leader-election Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "clip-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: the pod name, else random).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, env = "LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_seconds: u64,
    /// How often each processor is reconciled when nothing changed (children nobody watches
    /// are put back then).
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=86400))]
    resync_seconds: u64,
    /// Serve the processors of these namespaces only (comma-separated); the operator then needs
    /// rights in those namespaces only, besides the cluster-scoped NodePools, PersistentVolumes
    /// and ClipProcessorClasses. Empty: every namespace.
    #[arg(long, env = "WATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `kubectl logs`, `docker logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    let result = match cli.command {
        Command::Crd { kind } => match kind {
            CrdKind::Processor => serde_yaml_ng::to_string(&ClipProcessor::crd()),
            CrdKind::Class => serde_yaml_ng::to_string(&ClipProcessorClass::crd()),
        }
        .map(|y| print!("{y}"))
        .map_err(anyhow::Error::from),
        Command::Render { file, settings } => render(&file, &settings.settings()),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// SIGTERM (what Kubernetes sends) or SIGINT. The leader's controller handles both itself
/// (`shutdown_on_signal`); this is for a standby replica.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn render(file: &PathBuf, settings: &OperatorSettings) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    let out = clip_operator::render::render(&text, settings)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    print!("{out}");
    Ok(())
}

#[derive(Clone)]
struct Probe {
    metrics: Arc<Metrics>,
    started: Arc<AtomicBool>,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let started = Arc::new(AtomicBool::new(false));
    let probe = Probe {
        metrics: metrics.clone(),
        started: started.clone(),
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(p): State<Probe>| async move {
                (
                    [(header::CONTENT_TYPE, clip_contract::metrics::CONTENT_TYPE)],
                    p.metrics.encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(p): State<Probe>| async move {
                if p.started.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }),
        )
        .with_state(probe);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", args.metrics_port))
        .await
        .with_context(|| format!("cannot listen on port {}", args.metrics_port))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });

    // Only the lease holder reconciles; the others wait, ready to take over.
    let namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("clip-operator-{}", std::process::id()));
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&namespace)
        .with_identity(&identity)
        .with_duration(args.lease_seconds)
        .with_grace(args.lease_seconds.div_ceil(3).max(1))
        .build()
        .await
        .context("cannot set up leader election")?;
    let (mut leader, lease_task) = manager.watch().await;
    started.store(true, Ordering::Relaxed);
    tracing::info!(identity = %identity, lease = %format!("{namespace}/{}", args.lease_name), "waiting for the leader lease");
    let settings = OperatorSettings {
        resync: std::time::Duration::from_secs(args.resync_seconds),
        namespaces: Namespaces::from_list(&args.namespaces),
        ..args.settings.settings()
    };
    let ctx = Context::new(
        client,
        settings,
        metrics.clone(),
        Some(identity),
        QueueReader::new(None),
    );
    loop {
        while !*leader.borrow_and_update() {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { anyhow::bail!("leader election stopped") },
                _ = terminated() => return Ok(()),
            }
        }
        tracing::info!("leader: starting the controller");
        metrics.leader.set(1);
        let controller = reconcile::run(ctx.clone());
        tokio::pin!(controller);
        let lost = loop {
            tokio::select! {
                _ = &mut controller => break false,
                changed = leader.changed() => {
                    if changed.is_err() || !*leader.borrow_and_update() { break true; }
                }
            }
        };
        metrics.leader.set(0);
        if !lost {
            tracing::info!("controller stopped (shutdown)");
            drop(leader);
            let _ = lease_task.await;
            return Ok(());
        }
        tracing::warn!("lost the leader lease: stopping the controller");
    }
}
