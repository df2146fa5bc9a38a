use std::process::ExitCode;

use clap::Parser;
use shardvisor::cli::{Cli, Command, LogFormat, RunArgs, SimArgs};
use shardvisor::config::{Config, Overrides};
use shardvisor::logging;
use shardvisor::run::{print_line, Service};
use shardvisor::sim::Simulator;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Exit status for a usage or configuration error (EX_USAGE of sysexits.h).
const EXIT_USAGE: u8 = 64;
/// A gateway, database or server the configuration names could not be reached (sysexits'
/// EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

/// Exit status for a run that did not come up cleanly.
const EXIT_UNSTABLE: u8 = 1;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version are not errors; everything else is a usage error.
            let usage = error.use_stderr();
            let _ = error.print();
            return if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Run(args) => run_service(args, cli.log_format).await,
        Command::Sim(args) => {
            let args = *args;
            logging::init(cli.log_format.unwrap_or(LogFormat::Human));
            run_simulator(args).await
        }
    }
}

/// Runs the service until a stop signal, or until the summary with `--exit-when-stable`.
async fn run_service(args: RunArgs, log_format: Option<LogFormat>) -> ExitCode {
    let mut stop = StopSignals::install();
    let overrides = Overrides {
        name: args.name.clone(),
        shards: args.shards,
        start: args.start,
        stop: args.stop,
    };
    // Without --config, a config.toml in the working directory overrides the built-in defaults.
    let local = std::path::Path::new("config.toml");
    let path = args
        .config
        .as_deref()
        .or_else(|| local.is_file().then_some(local));
    let config = match Config::load(path, &overrides) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("error: the configuration is invalid:\n{errors}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let format = log_format.unwrap_or(if config.json_logs {
        LogFormat::Json
    } else {
        LogFormat::Human
    });
    logging::init(format);

    let service = match Service::start(config).await {
        Ok(service) => service,
        Err(error) => {
            eprintln!("error: {error}");
            let code = if error.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_UNAVAILABLE
            };
            return ExitCode::from(code);
        }
    };
    // A stop signal during the start is honoured too: the sessions already made are saved.
    let summary = tokio::select! {
        summary = service.wait_until_stable() => Some(summary),
        () = stop.wait() => None,
    };
    let Some(summary) = summary else {
        eprintln!("stopping before every shard was steady; saving the sessions made so far");
        service.shutdown().await;
        return ExitCode::from(EXIT_UNSTABLE);
    };
    print_line(&summary.line());

    if !args.exit_when_stable {
        print_line("serving; press Ctrl-C to save every session and stop");
        stop.wait().await;
    }
    service.shutdown().await;
    if summary.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNSTABLE)
    }
}

/// Runs the simulator until Ctrl-C or SIGTERM, then prints the report.
async fn run_simulator(args: SimArgs) -> ExitCode {
    let mut stop = StopSignals::install();
    let config = match args.to_config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let guilds = config.world.guilds;
    let simulator = match Simulator::start(config).await {
        Ok(simulator) => simulator,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let config = simulator.config();
    eprintln!("simulator api={}/gateway/bot", simulator.api_url());
    eprintln!(
        "simulator gateway={}/?v=10&encoding=json[&compress=zlib-stream]",
        simulator.gateway_url()
    );
    eprintln!("simulator resume_gateway_url={}", simulator.resume_url());
    eprintln!(
        "simulator shards={} max_concurrency={} guilds={guilds} identify_window={:?} heartbeat_interval={:?}",
        config.shards, config.max_concurrency, config.identify_window, config.heartbeat_interval
    );
    eprintln!("simulator running; press Ctrl-C to stop and print the report");

    stop.wait().await;
    let report = simulator.shutdown().await;
    let json = serde_json::to_string_pretty(&report).expect("the report serializes");
    if let Some(path) = &args.report {
        if let Err(error) = std::fs::write(path, &json) {
            eprintln!(
                "error: failed to write the report to {}: {error}",
                path.display()
            );
        }
    }
    print_line(&json);
    ExitCode::SUCCESS
}

/// SIGINT and SIGTERM listeners, made once: tokio delivers a signal only to listeners that exist
/// when it arrives, so listeners made anew for each wait would lose a signal sent in between.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn install() -> Self {
        let listen = |kind| signal(kind).expect("installing a signal handler succeeds on Unix");
        Self {
            interrupt: listen(SignalKind::interrupt()),
            terminate: listen(SignalKind::terminate()),
        }
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
