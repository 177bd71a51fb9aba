use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // Before anything allocates much: see the function.
    orderflow::allocator::without_transparent_huge_pages();
    // Rust ignores SIGPIPE, so `orderflow ... | head` would panic on the closed pipe; the
    // default action ends the process quietly, as every Unix filter does. Sockets are not
    // affected: librdkafka and Rust's std send with MSG_NOSIGNAL.
    // SAFETY: runs before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("ORDERFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = orderflow::cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(orderflow::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
