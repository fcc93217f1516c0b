use clap::Parser;

fn main() {
    // Printing into a closed pipe (`dorac analyze ... | head`) should end the process quietly, as
    // other command-line tools do, not panic: restore the default SIGPIPE action that Rust's
    // runtime turns off.
    #[cfg(unix)]
    // SAFETY: called first thing, before any other thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = dorac::cli::Cli::parse();
    if let Err(e) = dorac::cli::main(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
