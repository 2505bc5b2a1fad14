//! `eventbus-bench`: runs the seed's pressure scenario through the bus and prints what it
//! measured. Today it drives the embedded memory backend; broker backends join as they land.
//!
//! ```text
//! cargo run --release -p eventbus-benches --bin eventbus-bench -- --level extreme
//! cargo run --release -p eventbus-benches --bin eventbus-bench -- --level all
//! ```

mod scenario;

use std::process::ExitCode;

use scenario::{Level, RunOptions};

const USAGE: &str =
    "usage: eventbus-bench [--level low|medium|high|extreme|scale-100k|scale-1m|all]
                      [--payload-bytes N] [--compression none|lz4] [--publishers N]
                      [--keyed-workers N] [--batch-size N] [--window N]";

fn parse(args: &[String]) -> Result<(Vec<Level>, RunOptions), String> {
    let mut levels = vec![Level::Extreme];
    let mut opts = RunOptions::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--level" => {
                let v = value()?;
                levels = if v == "all" {
                    Level::ALL.to_vec()
                } else {
                    vec![Level::parse(&v).ok_or(format!("unknown level {v:?}"))?]
                };
            }
            "--payload-bytes" => opts.payload_bytes = num(&value()?)?,
            "--publishers" => opts.publishers = num(&value()?)?,
            "--keyed-workers" => opts.keyed_workers = Some(num(&value()?)?),
            "--batch-size" => opts.batch_size = Some(num(&value()?)?),
            "--window" => opts.window = Some(num(&value()?)?),
            "--compression" => {
                opts.compression = match value()?.as_str() {
                    "none" => eventbus::Compression::None,
                    "lz4" => eventbus::Compression::Lz4,
                    other => return Err(format!("unknown compression {other:?}")),
                }
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((levels, opts))
}

fn num(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (levels, opts) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", scenario::Report::header());
    let mut failed = false;
    for level in levels {
        match runtime.block_on(scenario::run(level, &opts)) {
            Ok(report) => {
                println!("{}", report.row());
                failed |= report.ordering_violations > 0 || report.lost > 0;
            }
            Err(e) => {
                eprintln!("error: {} failed: {e}", level.name());
                failed = true;
            }
        }
    }
    println!("backend: memory (embedded); tasks = peak tokio tasks alive, bus and publishers");
    if failed {
        eprintln!("error: losses or ordering violations (see the table)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
