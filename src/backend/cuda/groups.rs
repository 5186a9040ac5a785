//! GPU groups: which GPUs work together on one model, formed the way the reference does it.
//!
//! Each group runs one worker with the model's layers split across its GPUs. The rule:
//! walk the devices in the driver's order; at the first device not yet placed, take the
//! smallest of 1, 2, 4 or 8 consecutive devices whose total memory (in GiB, bytes / 1024^3)
//! reaches the minimum for the params; when no size does (or not enough devices remain for
//! the sizes that would), leave that one device out and start again at the next. No group at
//! all is the fatal [`NotEnoughGPUResources`] error.
//!
//! Pure code over the GPUs discovery reports ([`GpuInfo`]), tested with simulated ones.

use super::GpuInfo;
use crate::pow::params::Params;
use serde::Serialize;

/// Group sizes, tried smallest first.
pub const GROUP_SIZES: [usize; 4] = [1, 2, 4, 8];

/// Minimum total memory of a group for params exactly equal to PARAMS_V1, in GiB.
pub const MIN_GROUP_GIB_V1: f64 = 10.0;

/// Minimum total memory of a group for any other params (PARAMS_V2 included), in GiB.
pub const MIN_GROUP_GIB_DEFAULT: f64 = 38.0;

/// The minimum total memory of a group for `params`, in GiB.
///
/// "V1-shaped" means equal to PARAMS_V1 in every field: the reference compares the whole
/// params record with `==`, so dim 1024, 32 layers, 32 heads, 32 kv heads, vocab 8196,
/// ffn_dim_multiplier 10.0, multiple_of 2048, norm_eps 1e-5, rope_theta 10000,
/// use_scaled_rope false, seq_len 128 and use_fp8 false. Any difference, even one that does
/// not change the model's size (another seq_len, another rope_theta, fp8), gets the general
/// minimum.
pub fn min_group_gib(params: &Params) -> f64 {
    if *params == Params::v1() {
        MIN_GROUP_GIB_V1
    } else {
        MIN_GROUP_GIB_DEFAULT
    }
}

/// GPUs that run one model together; the first is the primary (inputs in, results out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuGroup {
    pub ordinals: Vec<usize>,
}

impl GpuGroup {
    pub fn primary(&self) -> usize {
        self.ordinals[0]
    }

    /// `cuda:0` for one GPU, `cuda:0+1` for a group of two, and so on.
    pub fn name(&self) -> String {
        let ids: Vec<String> = self.ordinals.iter().map(|o| o.to_string()).collect();
        format!("cuda:{}", ids.join("+"))
    }
}

/// The groups and the devices no group could use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grouping {
    pub groups: Vec<GpuGroup>,
    /// Ordinals of the devices that could not start a group, in order.
    pub left_out: Vec<usize>,
}

/// Not enough GPU memory for even one group (or no GPU at all): fatal for the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", describe_shortage(.required_gib, .devices))]
pub struct NotEnoughGPUResources {
    /// The minimum per group, in GiB.
    pub required_gib: f64,
    /// Every device seen, with its memory.
    pub devices: Vec<GpuInfo>,
}

impl NotEnoughGPUResources {
    /// The `error_type` of this error in a stream.
    pub const ERROR_TYPE: &'static str = "NotEnoughGPUResources";
}

fn describe_shortage(required_gib: &f64, devices: &[GpuInfo]) -> String {
    if devices.is_empty() {
        return "not enough GPU resources: no CUDA devices".into();
    }
    let seen: Vec<String> = devices
        .iter()
        .map(|d| format!("cuda:{} {:.1} GiB", d.ordinal, d.total_gib()))
        .collect();
    format!(
        "not enough GPU resources: a GPU group needs {required_gib:.1} GiB in all (groups of \
         1, 2, 4 or 8 consecutive GPUs), and none could be formed from [{}]",
        seen.join(", ")
    )
}

/// Form the groups of `devices` (in the driver's order) with `min_gib` GiB per group.
pub fn form_groups(devices: &[GpuInfo], min_gib: f64) -> Result<Grouping, NotEnoughGPUResources> {
    let mut groups = Vec::new();
    let mut left_out = Vec::new();
    let mut rest = devices;
    while let Some(first) = rest.first() {
        let size = GROUP_SIZES.into_iter().find(|&n| {
            // Added up one by one, left to right, in f64, as the reference sums them.
            n <= rest.len() && rest[..n].iter().map(GpuInfo::total_gib).sum::<f64>() >= min_gib
        });
        match size {
            Some(n) => {
                groups.push(GpuGroup {
                    ordinals: rest[..n].iter().map(|d| d.ordinal).collect(),
                });
                rest = &rest[n..];
            }
            None => {
                left_out.push(first.ordinal);
                rest = &rest[1..];
            }
        }
    }
    if groups.is_empty() {
        return Err(NotEnoughGPUResources {
            required_gib: min_gib,
            devices: devices.to_vec(),
        });
    }
    Ok(Grouping { groups, left_out })
}

/// [`form_groups`] with the minimum for `params`.
pub fn groups_for(params: &Params, devices: &[GpuInfo]) -> Result<Grouping, NotEnoughGPUResources> {
    form_groups(devices, min_group_gib(params))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Devices 0.. with these sizes in GiB.
    fn devs(gib: &[f64]) -> Vec<GpuInfo> {
        gib.iter()
            .enumerate()
            .map(|(i, &g)| GpuInfo {
                ordinal: i,
                name: "a simulated GPU".into(),
                compute_capability: (9, 0),
                total_bytes: (g * GIB as f64) as u64,
                free_bytes: (g * GIB as f64) as u64,
            })
            .collect()
    }

    fn ordinals(g: &Grouping) -> Vec<Vec<usize>> {
        g.groups.iter().map(|g| g.ordinals.clone()).collect()
    }

    #[test]
    fn grouping_table() {
        // H100 80GB reports 79.1 GiB, an A10 22.1, an RTX 4090 23.6, an L4 22.0,
        // an A100 40GB 39.4, a T4 14.6, an RTX 3080 9.8.
        type Case = (&'static str, Vec<f64>, f64, Vec<Vec<usize>>, Vec<usize>);
        let cases: Vec<Case> = vec![
            ("one H100", vec![79.1], 38.0, vec![vec![0]], vec![]),
            ("one A100 40GB", vec![39.4], 38.0, vec![vec![0]], vec![]),
            (
                "three H100s",
                vec![79.1; 3],
                38.0,
                vec![vec![0], vec![1], vec![2]],
                vec![],
            ),
            (
                "eight H100s",
                vec![79.1; 8],
                38.0,
                (0..8).map(|i| vec![i]).collect(),
                vec![],
            ),
            (
                "two 24 GiB GPUs pair up",
                vec![23.6, 23.6],
                38.0,
                vec![vec![0, 1]],
                vec![],
            ),
            (
                "five 24 GiB GPUs: two pairs, the fifth left out",
                vec![23.6; 5],
                38.0,
                vec![vec![0, 1], vec![2, 3]],
                vec![4],
            ),
            (
                "three 14.6 GiB: a pair is short, no four: all left out",
                vec![14.6; 3],
                38.0,
                vec![],
                vec![],
            ),
            (
                "five 14.6 GiB: a group of four, one left out",
                vec![14.6; 5],
                38.0,
                vec![vec![0, 1, 2, 3]],
                vec![4],
            ),
            (
                "eight 9.8 GiB: two groups of four",
                vec![9.8; 8],
                38.0,
                vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]],
                vec![],
            ),
            (
                "eight 9.8 GiB for V1-shaped params: pairs",
                vec![9.8; 8],
                10.0,
                vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]],
                vec![],
            ),
            (
                "mixed: small first device joins a pair, big ones alone",
                vec![16.0, 24.0, 79.1, 8.0, 79.1],
                38.0,
                vec![vec![0, 1], vec![2], vec![3, 4]],
                vec![],
            ),
            (
                "mixed: a small last device is left out",
                vec![79.1, 79.1, 8.0],
                38.0,
                vec![vec![0], vec![1]],
                vec![2],
            ),
            (
                "mixed: three small devices and a large one form a group of four",
                vec![8.0, 8.0, 8.0, 79.1],
                38.0,
                vec![vec![0, 1, 2, 3]],
                vec![],
            ),
            (
                "mixed: a device that cannot start a group is left out, the next one pairs up",
                vec![8.0, 8.0, 79.1],
                38.0,
                vec![vec![1, 2]],
                vec![0],
            ),
            (
                "exactly the minimum counts",
                vec![38.0],
                38.0,
                vec![vec![0]],
                vec![],
            ),
            ("V1 minimum", vec![10.0, 9.99], 10.0, vec![vec![0]], vec![1]),
        ];
        for (what, sizes, min, want, want_left_out) in cases {
            let d = devs(&sizes);
            match form_groups(&d, min) {
                Ok(g) => {
                    assert_eq!(ordinals(&g), want, "{what}");
                    assert_eq!(g.left_out, want_left_out, "{what}");
                }
                Err(e) => {
                    assert!(want.is_empty(), "{what}: {e}");
                    assert_eq!(e.devices, d, "{what}");
                }
            }
        }
    }

    #[test]
    fn all_too_small_is_fatal_and_says_why() {
        for n in [1, 3, 5, 8] {
            let d = devs(&vec![4.0; n]);
            let e = form_groups(&d, 38.0).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("38.0 GiB"), "{text}");
            assert!(text.contains(&format!("cuda:{} 4.0 GiB", n - 1)), "{text}");
            assert_eq!(NotEnoughGPUResources::ERROR_TYPE, "NotEnoughGPUResources");
        }
        let e = form_groups(&[], 10.0).unwrap_err();
        assert!(e.to_string().contains("no CUDA devices"));
    }

    #[test]
    fn minimum_depends_on_v1_equality() {
        assert_eq!(min_group_gib(&Params::v1()), 10.0);
        assert_eq!(min_group_gib(&Params::v2()), 38.0);
        assert_eq!(min_group_gib(&Params::default()), 38.0);
        let mut p = Params::v1();
        p.seq_len = 64;
        assert_eq!(min_group_gib(&p), 38.0);
        let mut p = Params::v1();
        p.use_fp8 = true;
        assert_eq!(min_group_gib(&p), 38.0);
        // Three 12 GiB GPUs: V1 runs one per GPU, V2 needs four.
        let d = devs(&[12.0; 3]);
        assert_eq!(groups_for(&Params::v1(), &d).unwrap().groups.len(), 3);
        assert!(groups_for(&Params::v2(), &d).is_err());
    }

    #[test]
    fn group_names() {
        let g = GpuGroup {
            ordinals: vec![2, 3],
        };
        assert_eq!(g.primary(), 2);
        assert_eq!(g.name(), "cuda:2+3");
    }
}
