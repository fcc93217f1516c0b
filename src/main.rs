use clap::Parser;

fn main() {
    let cli = dorac::cli::Cli::parse();
    if let Err(e) = dorac::cli::main(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
