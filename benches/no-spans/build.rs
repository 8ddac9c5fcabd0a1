//! Compiles the library without spans (see Cargo.toml).
fn main() {
    println!("cargo::rustc-cfg=duraflow_no_spans");
}
