//! The CUDA kernels: their sources, embedded at build time from `kernels/*.cu` (one file
//! per kernel family, each preceded by `kernels/common.cuh`), compiled with NVRTC to CUBIN
//! for a device's exact architecture (`sm_XX` from its compute capability) and loaded into
//! its context. CUBIN rather than PTX: PTX from an NVRTC newer than the driver is refused by
//! the driver, a CUBIN for the real architecture is not.
//!
//! Compiling takes seconds, so it happens once per device when the device is brought up
//! ([`KernelCache::for_device`]), never while a request waits; a CUBIN is compiled once per
//! architecture and shared by the devices that have it.
//!
//! Kernels of storage-dtype data have one instantiation per dtype, named
//! `<base>_<dtype>` ([`kernel_name`]): `rmsnorm_f16`, `rmsnorm_bf16`, `rmsnorm_f32`.
//! [`Family::kernels`] lists every kernel a family defines; it is what the launchers call,
//! and the tests check each name against the sources.

use super::CudaLibrary;
use crate::pow::dtype::Dtype;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// Declarations every family uses (dtype traits, roundings), prepended to each source.
pub const COMMON_SOURCE: &str = include_str!("../../../kernels/common.cuh");

/// A kernel a launcher calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// The name, without the dtype suffix for per-dtype kernels.
    pub base: &'static str,
    /// One instantiation per model dtype (`<base>_f32`, `<base>_f16`, `<base>_bf16`), or a
    /// single kernel named `base`.
    pub per_dtype: bool,
}

const fn per_dtype(base: &'static str) -> Kernel {
    Kernel {
        base,
        per_dtype: true,
    }
}

const fn single(base: &'static str) -> Kernel {
    Kernel {
        base,
        per_dtype: false,
    }
}

/// A kernel family: one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Rmsnorm,
    Rope,
    Attention,
    /// SiLU times the up projection, residual add, conversions to and from f32.
    Elementwise,
    /// Filling the parameters from the pool.
    Weights,
    /// Gather by permutation, normalise, distance, r_target filter.
    Tail,
    /// Per-tensor E4M3 quantisation for the FP8 products.
    Fp8,
}

impl Family {
    pub const ALL: [Family; 7] = [
        Self::Rmsnorm,
        Self::Rope,
        Self::Attention,
        Self::Elementwise,
        Self::Weights,
        Self::Tail,
        Self::Fp8,
    ];

    /// The source file under `kernels/`.
    pub fn file(self) -> &'static str {
        match self {
            Self::Rmsnorm => "rmsnorm.cu",
            Self::Rope => "rope.cu",
            Self::Attention => "attention.cu",
            Self::Elementwise => "elementwise.cu",
            Self::Weights => "weights.cu",
            Self::Tail => "tail.cu",
            Self::Fp8 => "fp8.cu",
        }
    }

    /// The family's own source (without [`COMMON_SOURCE`]).
    pub fn source(self) -> &'static str {
        match self {
            Self::Rmsnorm => include_str!("../../../kernels/rmsnorm.cu"),
            Self::Rope => include_str!("../../../kernels/rope.cu"),
            Self::Attention => include_str!("../../../kernels/attention.cu"),
            Self::Elementwise => include_str!("../../../kernels/elementwise.cu"),
            Self::Weights => include_str!("../../../kernels/weights.cu"),
            Self::Tail => include_str!("../../../kernels/tail.cu"),
            Self::Fp8 => include_str!("../../../kernels/fp8.cu"),
        }
    }

    /// The kernels the family defines.
    pub fn kernels(self) -> &'static [Kernel] {
        const RMSNORM: &[Kernel] = &[per_dtype("rmsnorm")];
        const ROPE: &[Kernel] = &[per_dtype("rope")];
        const ATTENTION: &[Kernel] = &[per_dtype("attention"), per_dtype("attention_smem")];
        const ELEMENTWISE: &[Kernel] = &[
            per_dtype("silu_mul"),
            per_dtype("silu_mul_amax"),
            per_dtype("add"),
            per_dtype("from_f32"),
            per_dtype("to_f32"),
            per_dtype("gather_rows"),
        ];
        const WEIGHTS: &[Kernel] = &[per_dtype("fill_direct"), per_dtype("fill_tiled")];
        const TAIL: &[Kernel] = &[
            per_dtype("tail_gather"),
            single("tail_distance"),
            single("tail_filter"),
        ];
        const FP8: &[Kernel] = &[per_dtype("amax"), per_dtype("quantize_e4m3")];
        match self {
            Self::Rmsnorm => RMSNORM,
            Self::Rope => ROPE,
            Self::Attention => ATTENTION,
            Self::Elementwise => ELEMENTWISE,
            Self::Weights => WEIGHTS,
            Self::Tail => TAIL,
            Self::Fp8 => FP8,
        }
    }

    /// Every kernel name this family defines, dtype instantiations spelled out.
    pub fn kernel_names(self) -> Vec<String> {
        let mut names = Vec::new();
        for k in self.kernels() {
            if k.per_dtype {
                names.extend(Dtype::ALL.iter().map(|&d| kernel_name(k.base, d)));
            } else {
                names.push(k.base.to_string());
            }
        }
        names
    }

    /// What NVRTC compiles: the common declarations, then the family's source (with its
    /// line numbers, so that compiler messages point into the right file).
    pub fn full_source(self) -> String {
        format!(
            "{COMMON_SOURCE}\n#line 1 \"{}\"\n{}",
            self.file(),
            self.source()
        )
    }
}

/// The suffix of a dtype's kernels.
pub fn dtype_suffix(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::Bf16 => "bf16",
    }
}

/// The name of `base`'s instantiation for `dtype`, e.g. `rmsnorm_f16`.
pub fn kernel_name(base: &str, dtype: Dtype) -> String {
    format!("{base}_{}", dtype_suffix(dtype))
}

/// NVRTC's options for `arch` (`sm_90`): CUBIN for that architecture, C++17, and f32
/// arithmetic that rounds where the CPU backend's does (no fused multiply-add, IEEE
/// division and square root, denormals kept).
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ]
}

/// What can go wrong with the kernels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{} not found: the CUDA kernels cannot be compiled or loaded", .0.file_name())]
    LibraryMissing(CudaLibrary),
    #[error("NVRTC could not compile {file} for {arch} ({error}):\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        error: String,
        log: String,
    },
    #[error("NVRTC failed on {file}: {error}")]
    Nvrtc { file: &'static str, error: String },
    #[error("cuda:{ordinal}: the CUBIN of {file} could not be loaded: {error}")]
    Load {
        ordinal: usize,
        file: &'static str,
        error: String,
    },
    #[error("cuda:{ordinal}: kernel {name} is missing from {file}: {error}")]
    MissingFunction {
        ordinal: usize,
        name: String,
        file: &'static str,
        error: String,
    },
    #[error("no compiled kernel is named {0}")]
    Unknown(String),
}

/// An NVRTC program, destroyed when dropped.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 came from create_program and is destroyed only here, once.
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compile one family to a CUBIN for `arch` (e.g. `sm_90`).
pub fn compile_cubin(family: Family, arch: &str) -> Result<Vec<u8>, KernelError> {
    compile_with(family, arch, &[]).map(|(cubin, _log)| cubin)
}

/// [`compile_cubin`] with `extra` NVRTC options after [`compile_options`]; the CUBIN and
/// NVRTC's log (where `-Xptxas=-v` puts each kernel's registers and stack frame).
pub fn compile_with(
    family: Family,
    arch: &str,
    extra: &[&str],
) -> Result<(Vec<u8>, String), KernelError> {
    if !CudaLibrary::Nvrtc.is_present() {
        return Err(KernelError::LibraryMissing(CudaLibrary::Nvrtc));
    }
    let file = family.file();
    let nvrtc_err = |e: nvrtc_result::NvrtcError| KernelError::Nvrtc {
        file,
        error: e.to_string(),
    };
    let src = CString::new(family.full_source()).map_err(|e| KernelError::Nvrtc {
        file,
        error: e.to_string(),
    })?;
    let name = CString::new(file).expect("kernel file names have no NUL");
    let prog = Program(nvrtc_result::create_program(&src, Some(&name)).map_err(nvrtc_err)?);
    let mut options = compile_options(arch);
    options.extend(extra.iter().map(|o| o.to_string()));
    // SAFETY: prog.0 is a live program (destroyed only when `prog` drops, after its last
    // use below); `src` and `name`, which it may point into, outlive it.
    if let Err(e) = unsafe { nvrtc_result::compile_program(prog.0, &options) } {
        // SAFETY: as above; the log is read from the same live program.
        let log = unsafe { nvrtc_result::get_program_log(prog.0) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        return Err(KernelError::Compile {
            file,
            arch: arch.to_string(),
            error: e.to_string(),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: prog.0 is live and compiled; `size` is a valid place for the result.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(nvrtc_err)?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the `size` bytes NVRTC reported for this program's
    // CUBIN, which it copies there.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(nvrtc_err)?;
    if cubin.is_empty() {
        return Err(KernelError::Nvrtc {
            file,
            error: format!("no CUBIN for {arch} (is it a real architecture, sm_XX?)"),
        });
    }
    // SAFETY: as above; the log of the compiled program.
    let log = unsafe { nvrtc_result::get_program_log(prog.0) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    Ok((cubin, log))
}

/// NVRTC's version, when the library is present.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !CudaLibrary::Nvrtc.is_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid places for the results.
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    r.result().ok().map(|_| (major, minor))
}

/// Every kernel, loaded into one device's context.
#[derive(Debug)]
pub struct DeviceKernels {
    pub ordinal: usize,
    pub arch: String,
    functions: HashMap<String, CudaFunction>,
    /// Kept so that the modules outlive the functions (each function holds its module too).
    _modules: Vec<Arc<CudaModule>>,
}

impl DeviceKernels {
    /// Load CUBINs (one per family, in [`Family::ALL`] order) into `ctx`.
    pub fn load(
        ctx: &Arc<CudaContext>,
        arch: &str,
        cubins: &[(Family, Vec<u8>)],
    ) -> Result<Self, KernelError> {
        let ordinal = ctx.ordinal();
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        for (family, cubin) in cubins {
            let file = family.file();
            let module = ctx
                .load_module(Ptx::from_binary(cubin.clone()))
                .map_err(|e| KernelError::Load {
                    ordinal,
                    file,
                    error: e.to_string(),
                })?;
            for name in family.kernel_names() {
                let f = module
                    .load_function(&name)
                    .map_err(|e| KernelError::MissingFunction {
                        ordinal,
                        name: name.clone(),
                        file,
                        error: e.to_string(),
                    })?;
                functions.insert(name, f);
            }
            modules.push(module);
        }
        Ok(DeviceKernels {
            ordinal,
            arch: arch.to_string(),
            functions,
            _modules: modules,
        })
    }

    /// `base`'s instantiation for `dtype`.
    pub fn for_dtype(&self, base: &str, dtype: Dtype) -> Result<&CudaFunction, KernelError> {
        self.named(&kernel_name(base, dtype))
    }

    /// A kernel by its full name.
    pub fn named(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.functions
            .get(name)
            .ok_or_else(|| KernelError::Unknown(name.to_string()))
    }
}

/// Every family's CUBIN for one architecture, in [`Family::ALL`] order.
pub type Cubins = Arc<Vec<(Family, Vec<u8>)>>;

/// CUBINs per architecture and loaded kernels per device, for the whole process.
#[derive(Debug, Default)]
pub struct KernelCache {
    cubins: Mutex<HashMap<String, Cubins>>,
    devices: Mutex<HashMap<usize, Arc<DeviceKernels>>>,
}

impl KernelCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's cache.
    pub fn global() -> &'static KernelCache {
        static CACHE: OnceLock<KernelCache> = OnceLock::new();
        CACHE.get_or_init(KernelCache::new)
    }

    /// Every family compiled for `arch`, compiling on the first call for that architecture.
    pub fn cubins(&self, arch: &str) -> Result<Cubins, KernelError> {
        let mut cubins = self.cubins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cubins.get(arch) {
            return Ok(c.clone());
        }
        let compiled: Vec<(Family, Vec<u8>)> = Family::ALL
            .into_iter()
            .map(|f| compile_cubin(f, arch).map(|c| (f, c)))
            .collect::<Result<_, _>>()?;
        let compiled = Arc::new(compiled);
        cubins.insert(arch.to_string(), compiled.clone());
        Ok(compiled)
    }

    /// The kernels loaded on `ctx`'s device (compute capability read from the device),
    /// compiling and loading them on the first call for that device. Call when the device
    /// is brought up, not on a request.
    pub fn for_device(&self, ctx: &Arc<CudaContext>) -> Result<Arc<DeviceKernels>, KernelError> {
        if !CudaLibrary::Driver.is_present() {
            return Err(KernelError::LibraryMissing(CudaLibrary::Driver));
        }
        let ordinal = ctx.ordinal();
        if let Some(k) = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ordinal)
        {
            return Ok(k.clone());
        }
        let (major, minor) = ctx.compute_capability().map_err(|e| KernelError::Load {
            ordinal,
            file: "(all)",
            error: format!("compute capability unknown: {e}"),
        })?;
        let arch = format!("sm_{major}{minor}");
        let cubins = self.cubins(&arch)?;
        let kernels = Arc::new(DeviceKernels::load(ctx, &arch, &cubins)?);
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ordinal, kernels.clone());
        Ok(kernels)
    }
}

#[cfg(test)]
mod tests {
    //! Without a CUDA toolkit or GPU here, nothing is compiled: these check the sources and
    //! the names the launchers use against each other. Compiling and loading run on a GPU
    //! machine only.
    use super::*;

    /// The dtype trait of the common source for a dtype.
    fn trait_name(d: Dtype) -> &'static str {
        match d {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
        }
    }

    #[test]
    fn every_source_is_present() {
        assert!(COMMON_SOURCE.contains("struct F16"));
        assert!(COMMON_SOURCE.contains("struct BF16"));
        assert!(COMMON_SOURCE.contains("struct F32"));
        for f in Family::ALL {
            assert!(f.source().len() > 200, "{} is empty", f.file());
            assert!(f.full_source().starts_with(COMMON_SOURCE));
            // NVRTC runs with no include path: everything comes from the common source.
            assert!(!f.source().contains("#include"), "{}", f.file());
        }
        // Every .cu file under kernels/ is a family (none forgotten), and no family lacks one.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut families: Vec<String> = Family::ALL.iter().map(|f| f.file().to_string()).collect();
        families.sort();
        assert_eq!(on_disk, families);
    }

    #[test]
    fn every_kernel_name_is_defined_in_its_source() {
        let mut seen = std::collections::HashSet::new();
        for f in Family::ALL {
            let src = f.source();
            for k in f.kernels() {
                if k.per_dtype {
                    for d in Dtype::ALL {
                        let name = kernel_name(k.base, d);
                        // Instantiated by a macro call that spells out the name and the
                        // matching dtype trait: `RMSNORM_KERNEL(rmsnorm_f16, F16)`.
                        let call = format!("({name}, {})", trait_name(d));
                        assert!(src.contains(&call), "{}: no {call}", f.file());
                        assert!(seen.insert(name.clone()), "{name} defined twice");
                    }
                } else {
                    let def = format!("extern \"C\" __global__ void {}(", k.base);
                    assert!(src.contains(&def), "{}: no {def}", f.file());
                    assert!(seen.insert(k.base.to_string()), "{} defined twice", k.base);
                }
            }
            assert_eq!(
                f.kernel_names().len(),
                f.kernels()
                    .iter()
                    .map(|k| if k.per_dtype { 3 } else { 1 })
                    .sum::<usize>()
            );
        }
        // Nothing in the sources is instantiated that the table does not know about.
        for f in Family::ALL {
            for line in f.source().lines() {
                let line = line.trim();
                if let Some(open) = line.find("_KERNEL(") {
                    if line.starts_with('#') {
                        continue;
                    }
                    let name = line[open + "_KERNEL(".len()..]
                        .split(',')
                        .next()
                        .unwrap()
                        .trim();
                    assert!(
                        seen.contains(name),
                        "{}: {name} is not in the table",
                        f.file()
                    );
                }
            }
        }
        assert_eq!(kernel_name("rmsnorm", Dtype::Bf16), "rmsnorm_bf16");
    }

    #[test]
    fn sources_are_balanced() {
        for f in Family::ALL {
            let src = f.full_source();
            for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
                assert_eq!(
                    src.matches(open).count(),
                    src.matches(close).count(),
                    "{}: unbalanced {open}{close}",
                    f.file()
                );
            }
        }
    }

    #[test]
    fn options_target_the_exact_architecture_without_fma() {
        let o = compile_options("sm_90");
        assert!(o.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(o.contains(&"--fmad=false".to_string()));
        assert!(!o.iter().any(|x| x.contains("compute_")), "{o:?}");
    }

    #[test]
    fn compiling_without_nvrtc_is_an_error_not_a_panic() {
        if CudaLibrary::Nvrtc.is_present() {
            eprintln!("skipped: NVRTC is present on this machine");
            return;
        }
        let e = compile_cubin(Family::Rmsnorm, "sm_90").unwrap_err();
        assert_eq!(e, KernelError::LibraryMissing(CudaLibrary::Nvrtc));
        assert!(e.to_string().contains("libnvrtc.so.13"));
        assert!(KernelCache::new().cubins("sm_90").is_err());
        assert_eq!(nvrtc_version(), None);
    }
}

#[cfg(test)]
mod compile_tests {
    //! NVRTC needs no GPU: where the library is present, every family must compile for the
    //! architectures the server supports.
    use super::*;

    /// The stack frame ptxas reports for `kernel` in a `-Xptxas=-v` log, in bytes.
    fn stack_frame(log: &str, kernel: &str) -> Option<usize> {
        let mut lines = log.lines();
        lines.find(|l| l.ends_with(&format!("Function properties for {kernel}")))?;
        let props = lines.next()?;
        let bytes = props.split("bytes stack frame").next()?;
        bytes
            .trim()
            .trim_start_matches(['p', 't', 'x', 'a', 's', ' ', '.'])
            .trim()
            .parse()
            .ok()
    }

    #[test]
    fn the_distance_kernels_stack_frame_stays_small() {
        if !CudaLibrary::Nvrtc.is_present() {
            eprintln!("skipped: libnvrtc.so.13 is not on this machine's library path");
            return;
        }
        // One thread per nonce holds the pairwise sums' explicit stacks (f32 and f64): a
        // large frame costs local memory per resident thread.
        let (_, log) = compile_with(Family::Tail, "sm_90", &["-Xptxas=-v"]).unwrap();
        let frame = stack_frame(&log, "tail_distance")
            .unwrap_or_else(|| panic!("no stack frame for tail_distance in:\n{log}"));
        eprintln!("tail_distance on sm_90: {frame} bytes of stack frame");
        assert!(frame <= 512, "{frame} bytes");
        assert_eq!(
            stack_frame(
                "ptxas info : Function properties for k\nptxas . 440 bytes stack frame, 0",
                "k"
            ),
            Some(440)
        );
    }

    #[test]
    fn every_family_compiles_where_nvrtc_is_present() {
        if !CudaLibrary::Nvrtc.is_present() {
            eprintln!("skipped: libnvrtc.so.13 is not on this machine's library path");
            return;
        }
        for arch in ["sm_80", "sm_89", "sm_90", "sm_100"] {
            for f in Family::ALL {
                match compile_cubin(f, arch) {
                    Ok(cubin) => assert!(cubin.len() > 1000, "{} {arch}", f.file()),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}
