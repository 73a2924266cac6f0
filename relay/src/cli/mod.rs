//! Client subcommands of the `mailrelay` binary that talk to a running relay.

pub mod queue;
pub mod quota;

/// Runs `fut` on a small runtime: its output goes to stdout, its error to stderr
/// with exit code 1.
fn run_printing<E: std::fmt::Display>(
    fut: impl std::future::Future<Output = Result<String, E>>,
) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailrelay: starting the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mailrelay: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
