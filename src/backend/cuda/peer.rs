//! The link between two consecutive GPUs of a group, over which the residual of each
//! micro-batch moves from one stage to the next.
//!
//! Where the pair supports it (NVLink, or PCIe peer-to-peer), peer access is enabled in both
//! directions: for each context towards the other, and for each device's memory pool towards
//! the other device, since the buffers are stream-ordered allocations from that pool (a
//! context's peer access does not extend to them). `cuMemcpyPeerAsync` then copies directly.
//! Where it does not, the same copy is staged by the driver through host memory: slower, but
//! the same bytes, so a pair without peer access computes the same results.

use super::gpu::Gpu;
use cudarc::driver::result as driver;
use cudarc::driver::sys::{self, CUresult};
use std::fmt;

/// How the residual crosses from one GPU to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerLink {
    /// Peer access is on in both directions: direct copies.
    Direct,
    /// Copies staged through host memory, and why.
    Staged(String),
}

impl fmt::Display for PeerLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerLink::Direct => f.write_str("peer-to-peer"),
            PeerLink::Staged(why) => write!(f, "staged through host memory ({why})"),
        }
    }
}

/// Enable peer access between `a` and `b` where the pair supports it; what the link is.
/// Never fails: whatever goes wrong leaves the staged copies, and says why.
pub fn link(a: &Gpu, b: &Gpu) -> PeerLink {
    match try_link(a, b) {
        Ok(true) => PeerLink::Direct,
        Ok(false) => PeerLink::Staged(format!(
            "the driver says {} and {} cannot access each other's memory",
            a.info.device_name(),
            b.info.device_name()
        )),
        Err(why) => PeerLink::Staged(why),
    }
}

fn try_link(a: &Gpu, b: &Gpu) -> Result<bool, String> {
    let (da, db) = (a.ctx.cu_device(), b.ctx.cu_device());
    for (x, y) in [(da, db), (db, da)] {
        let mut can = 0;
        // SAFETY: both are devices of initialised contexts (the GPUs were brought up), and
        // `can` is a valid place for the answer.
        unsafe { sys::cuDeviceCanAccessPeer(&mut can, x, y) }
            .result()
            .map_err(|e| format!("cuDeviceCanAccessPeer: {e}"))?;
        if can == 0 {
            return Ok(false);
        }
    }
    for (from, to) in [(a, b), (b, a)] {
        from.ctx
            .bind_to_thread()
            .map_err(|e| format!("{}: bind: {e}", from.info.device_name()))?;
        // SAFETY: `from`'s context is current and `to`'s is a live context of another device
        // that `from`'s device can access (checked above); flags must be 0.
        let enabled = unsafe { sys::cuCtxEnablePeerAccess(to.ctx.cu_ctx(), 0) };
        if enabled != CUresult::CUDA_SUCCESS
            && enabled != CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
        {
            return Err(format!(
                "{} -> {}: cuCtxEnablePeerAccess: {enabled:?}",
                from.info.device_name(),
                to.info.device_name()
            ));
        }
        // The buffers come from the owning device's current memory pool: give the other
        // device access to it.
        // SAFETY: `to`'s device handle comes from its live context.
        let pool = unsafe { driver::device::get_mem_pool(to.ctx.cu_device()) }
            .map_err(|e| format!("{}: cuDeviceGetMemPool: {e}", to.info.device_name()))?;
        let access = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: from.ctx.cu_device(),
            },
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: `pool` is the live pool of `to`'s device, `access` one valid descriptor
        // naming `from`'s device, read during the call.
        unsafe { sys::cuMemPoolSetAccess(pool, &access, 1) }
            .result()
            .map_err(|e| {
                format!(
                    "{} -> {}: cuMemPoolSetAccess: {e}",
                    from.info.device_name(),
                    to.info.device_name()
                )
            })?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_say_how_the_residual_travels() {
        assert_eq!(PeerLink::Direct.to_string(), "peer-to-peer");
        let staged = PeerLink::Staged("the driver says no".into());
        assert_eq!(
            staged.to_string(),
            "staged through host memory (the driver says no)"
        );
    }
}
