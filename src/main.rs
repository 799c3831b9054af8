//! The `agentbus` binary: parse the command line, start logging, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime")
        .block_on(run())
}

/// Gives glibc's free memory back to the system every few seconds (`malloc_trim`), and caps
/// its arenas at two unless `MALLOC_ARENA_MAX` says otherwise. glibc returns memory only from
/// the top of a heap; what is freed below stays resident. The publish path frees as much as
/// it allocates (the idempotency store's commits copy every page they change), so the live
/// heap is ~15 MiB (valgrind's massif at 1 000 events/s) while RSS sat at 77 MiB in
/// `ops/bench.sh soak` (5 000 events/s); capping the arenas alone gave 46–77 MiB from run to
/// run, jemalloc 59–67 MiB, mimalloc 72 MiB; with the trim, 33–49 MiB over 10 minutes.
#[allow(unsafe_code)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets a parameter of glibc's allocator, and this runs first
            // in main, before any other thread exists to allocate.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
        let trimmer = std::thread::Builder::new()
            .name("malloc-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(TRIM_EVERY_SECS));
                    // SAFETY: malloc_trim takes the allocator's own locks; it releases free
                    // pages only, never memory in use.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            });
        if let Err(e) = trimmer {
            eprintln!("warning: not trimming the allocator's free memory: {e}");
        }
    }
}

/// How often free memory goes back to the system: often enough that RSS follows the live
/// heap, rarely enough that the trim's walk of the free lists (0.3–1.6 ms a trim measured at
/// 5 000 events/s) costs nothing measurable.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY_SECS: u64 = 5;

async fn run() -> std::process::ExitCode {
    let cli = agentbus::cli::Cli::parse();
    agentbus::telemetry::init_logging(&cli.log, cli.log_json);
    match agentbus::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
