//! The `pyport` executable: see the crate docs (`src/lib.rs`) for the layout.

fn main() {
    std::process::exit(pyport::startup::main(std::env::args().skip(1).collect()));
}
