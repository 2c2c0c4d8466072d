//! Embeds an rpath to the libpython that pyo3 links against, so `priv/pyport` runs
//! without `LD_LIBRARY_PATH`, and records that Python's executable for `sys.executable`.
//! A Python carried beside the binary (`python-home/lib`, a release built with
//! `PYPORT_BUNDLE_PYTHON=1`) comes first in the rpath.
fn main() {
    let config = pyo3_build_config::get();
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/python-home/lib");
    if let Some(dir) = config.lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    if let Some(exe) = config.executable() {
        println!("cargo:rustc-env=PYPORT_BUILD_PYTHON={exe}");
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    pyo3_build_config::use_pyo3_cfgs();
}
