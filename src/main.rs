use clap::Parser;

fn main() {
    codespot::alloc::tune();
    let cli = codespot::cli::Cli::parse();
    if let Err(e) = codespot::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
