//! With the `cuda` feature: the project's CUDA kernels (`src/*.cu`, beside their CPU twins) as
//! PTX, compiled by nvcc (`$NVCC`, else `nvcc` on the PATH) for `compute_$CUDA_COMPUTE_CAP`
//! (default 80; the driver compiles PTX for newer GPUs when it loads it). Without the feature
//! nothing is compiled and no CUDA toolkit is needed.
//!
//! With the `cuda-emu` feature (tests): the same `.cu` files built for the host by the C++
//! compiler (`cc`) into the CUDA emulator (`src/cuda/emu/`), optimised whatever the profile, since
//! every emulated thread repeats its warp's tile products, with array indices bounds-checked.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["norm", "geglu", "attention"];

fn main() {
    println!("cargo::rerun-if-changed=src/cuda/common.cuh");
    for k in KERNELS {
        println!("cargo::rerun-if-changed=src/{k}.cu");
    }
    for f in ["emu.cpp", "runtime.h", "include/cuda_bf16.h", "include/cuda_fp16.h", "include/mma.h"] {
        println!("cargo::rerun-if-changed=src/cuda/emu/{f}");
    }
    println!("cargo::rerun-if-env-changed=NVCC");
    #[cfg(feature = "cuda-emu")]
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        .include("src")
        .include("src/cuda/emu/include")
        .file("src/cuda/emu/emu.cpp")
        .warnings(true)
        .extra_warnings(true)
        // An index past a fixed-size array (shared memory, fragments) stops the test at once
        // (an illegal instruction; no sanitizer runtime needed) instead of corrupting its neighbour.
        .flag("-fsanitize=bounds-strict")
        .flag("-fsanitize-undefined-trap-on-error")
        .compile("ipr_cuda_emu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-Isrc", "-o"])
            .arg(&ptx)
            .arg(format!("src/{k}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("running {nvcc} for src/{k}.cu: {e} (set NVCC, or see scripts/cuda/build.sh)"));
        assert!(status.success(), "{nvcc} failed on src/{k}.cu ({status})");
    }
}
