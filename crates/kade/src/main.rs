//! `kade`: see `kade --help`.

use clap::Parser;

fn main() {
    let cli = kade::cli::Cli::parse();
    // Multi-thread runtime only: blocking work (parsing, fsync) runs beside the network tasks.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(kade::main(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
