//! The policy contract in plain Rust.
//!
//! Once per round the agent hands a policy a [`PolicyInput`] — the round's context, per-link
//! statistics and, for each link, statistics of every tensor's accumulated (not yet sent)
//! update — and the policy returns a [`PolicyOutput`]: for every link and tensor whether to
//! send, at which significance threshold τ and at how many bits, the LAN plan (gradient or
//! data mode, with its widths), and its new state blob. Policies are pure functions of their input (state travels in and out
//! explicitly), so the same code runs natively in tests and the simulator.

#![cfg_attr(not(target_arch = "wasm32"), forbid(unsafe_code))]

use serde::{Deserialize, Serialize};

#[cfg(target_arch = "wasm32")]
pub mod guest;

/// The WIT contract this SDK speaks (`sdk/wit/policy.wit`).
pub const WIT: &str = include_str!("../wit/policy.wit");

/// The WIT package and version policies must export.
pub const CONTRACT: &str = "weightgrad:policy@3.0.0";

/// The interface a policy component exports, as the component model names it.
pub const EXPORT: &str = "weightgrad:policy/policy@3.0.0";

/// What role a tensor plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TensorRole {
    /// Weight matrix or kernel.
    Weight,
    /// Bias vector.
    Bias,
    /// Lookup table (token or position embedding): a step changes only the rows it read,
    /// so its updates are sparse.
    Embedding,
    /// Attention projection (queries, keys and values, or the output).
    Attention,
    /// A normalization's gain or shift: a small vector the model is sensitive to.
    Norm,
}

impl TensorRole {
    /// True for the matrices (weights, embeddings, attention projections); false for the
    /// per-channel vectors (biases, norms), which are small and usually sent whole.
    pub fn is_matrix(self) -> bool {
        matches!(self, Self::Weight | Self::Embedding | Self::Attention)
    }

    /// The role's name as the contract spells it (`weight`, `bias`, `embedding`,
    /// `attention`, `norm`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Weight => "weight",
            Self::Bias => "bias",
            Self::Embedding => "embedding",
            Self::Attention => "attention",
            Self::Norm => "norm",
        }
    }
}

/// The round being planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundContext {
    /// Rounds completed by this region.
    pub round: u64,
    /// Current learning rate.
    pub lr: f32,
    /// Base learning rate (the schedule's start), so policies can decay with it.
    pub base_lr: f32,
    /// Latest training loss of this region.
    pub loss: f32,
    /// Number of regions in the run.
    pub regions: u32,
    /// This is the last round before the agent stops (end of the run, or shutdown): a
    /// policy that wants nothing left behind in the residuals flushes now.
    pub final_round: bool,
}

/// How a significance threshold τ0 decays over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TauSchedule {
    /// `τ0 · lr / base_lr` (Gaia's rule: the threshold falls with the learning rate, so
    /// late, small updates still cross).
    #[default]
    LearningRate,
    /// `τ0 / sqrt(round)`.
    InverseSqrt,
}

impl TauSchedule {
    /// τ for the round described by `ctx`.
    pub fn tau(&self, tau0: f32, ctx: &RoundContext) -> f32 {
        match self {
            Self::LearningRate if ctx.base_lr > 0.0 && ctx.lr.is_finite() => {
                tau0 * (ctx.lr / ctx.base_lr).clamp(0.0, 1.0)
            }
            Self::LearningRate => tau0,
            Self::InverseSqrt => tau0 / (ctx.round.max(1) as f32).sqrt(),
        }
    }
}

/// Measured or configured state of one WAN link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Peer region name.
    pub peer: String,
    /// Estimated bandwidth, bits per second.
    pub bandwidth_bps: f64,
    /// Round-trip time, seconds.
    pub rtt_s: f64,
    /// Fraction of packets lost.
    pub loss: f64,
    /// Bytes handed to the link and not yet acknowledged by the peer's agent (the
    /// acknowledgement comes back half a round trip after the last byte arrives).
    pub queued_bytes: u64,
}

/// Statistics of one tensor's accumulated update on one link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Elements in the tensor.
    pub numel: u64,
    /// Weight or bias.
    pub role: TensorRole,
    /// L2 norm of the accumulated update.
    pub update_l2: f32,
    /// L2 norm of the weights.
    pub weight_l2: f32,
    /// Largest `|A_i / w_i|` over elements with `w_i ≠ 0`.
    pub max_relative: f32,
    /// Fraction of elements significant at each of [`PolicyInput::thresholds`].
    pub significant_fraction: Vec<f32>,
    /// Rounds since anything of this tensor was sent on this link.
    pub rounds_since_sent: u32,
}

/// One link's view: its statistics and its tensors' statistics (manifest order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkInput {
    /// The link.
    pub link: LinkStats,
    /// One entry per tensor.
    pub tensors: Vec<TensorStats>,
}

/// The region's LAN as the cost model sees it: what one step moves in gradient mode and in
/// data mode (see [`LanInput::step_bits`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LanInput {
    /// Workers in the region.
    pub workers: u32,
    /// Samples per worker per step (B).
    pub batch_size: u32,
    /// Features per sample (d_x).
    pub sample_features: u64,
    /// Label classes (a label costs `ceil(log2(classes))` bits).
    pub classes: u32,
    /// Elements of each tensor of the model, manifest order (d is their sum).
    pub tensor_sizes: Vec<u64>,
    /// Whether data mode may be chosen: false when this region's LAN crosses a WAN and the
    /// operator has not set `allow_data_over_wan`.
    pub data_mode_allowed: bool,
}

impl LanInput {
    /// Model parameters (d).
    pub fn parameters(&self) -> u64 {
        self.tensor_sizes.iter().sum()
    }

    /// Bits one step of `plan` moves on the LAN, all workers together and both directions,
    /// leaving out frame headers: in gradient mode the weights ŵ out (`d·b_w`) and a gradient
    /// back (`d·b_g`) per worker; in data mode the batch (`B·d_x·b_x`, labels and one
    /// 64-bit range per feature or sample) per worker, plus, when refining, ŵ out and the
    /// correction back (`d·b_r`).
    pub fn step_bits(&self, plan: &LanPlan) -> u64 {
        let d = self.parameters();
        let weights = d * u64::from(plan.weight_bits);
        let per_worker = match plan.mode {
            LanMode::Gradient => {
                let gradient: u64 = self
                    .tensor_sizes
                    .iter()
                    .enumerate()
                    .map(|(t, n)| n * u64::from(plan.gradient_bits.get(t).copied().unwrap_or(32)))
                    .sum();
                weights + gradient
            }
            LanMode::Data(data) => {
                let b = u64::from(self.batch_size);
                let label_bits =
                    u64::from(32 - self.classes.max(2).saturating_sub(1).leading_zeros());
                let ranges = match data.scale {
                    DataScale::PerFeature => self.sample_features,
                    DataScale::PerSample => b,
                };
                let samples = b * self.sample_features * u64::from(data.feature_bits)
                    + b * label_bits
                    + 64 * ranges;
                let refinement = if data.refine_bits > 0 {
                    weights + d * u64::from(data.refine_bits)
                } else {
                    0
                };
                samples + refinement
            }
        };
        per_worker * u64::from(self.workers)
    }
}

/// Everything a policy sees for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInput {
    /// The round.
    pub context: RoundContext,
    /// Thresholds at which [`TensorStats::significant_fraction`] was measured.
    pub thresholds: Vec<f32>,
    /// One entry per peer link.
    pub links: Vec<LinkInput>,
    /// The region's LAN, for the LAN plan's cost model.
    pub lan: LanInput,
    /// The policy's state blob from its previous call (empty at first).
    pub state: Vec<u8>,
}

/// Bit-widths a plan may choose for WAN values: 1..=8 (stochastic uniform), 16 (bf16) or 32 (fp32).
pub const ALLOWED_BITS: [u8; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 16, 32];

/// What to do with one tensor on one link this round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TensorPlan {
    /// Send the significant part now, or hold everything in the residual.
    pub send: bool,
    /// Significance threshold τ on `|A_i / w_i|` (0 sends every non-zero element).
    pub tau: f32,
    /// Bits per value, one of [`ALLOWED_BITS`].
    pub bits: u8,
    /// Of the significant elements, send at most this fraction of the tensor, largest
    /// magnitudes first (top-k); the rest stay in the residual. In `(0, 1]`; 1 sends them all.
    pub top_fraction: f32,
}

impl TensorPlan {
    /// Keep everything in the residual.
    pub const HOLD: TensorPlan = TensorPlan {
        send: false,
        tau: 0.0,
        bits: 32,
        top_fraction: 1.0,
    };
}

/// Plans for one link, one per tensor in manifest order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkPlan {
    /// One plan per tensor.
    pub tensors: Vec<TensorPlan>,
}

/// How a data-mode batch's features are scaled before quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataScale {
    /// One `[min, max]` range per feature over the batch.
    PerFeature,
    /// One `[min, max]` range per sample.
    PerSample,
}

/// Data mode's widths: features at `feature_bits` bits (stochastic rounding within each
/// range, so `E[Q(x)] = x`), and optionally a correction `Q(g(ŵ; x) − g(ŵ; Q(x)))` at
/// `refine_bits` bits (0: none) that makes the aggregator's gradient estimate unbiased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPlan {
    /// Bits per feature value, 1..=8.
    pub feature_bits: u8,
    /// Range per feature or per sample.
    pub scale: DataScale,
    /// Bits per value of the refinement (1..=8), or 0 for no refinement.
    pub refine_bits: u8,
}

/// What workers send their aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LanMode {
    /// Quantized gradients, at [`LanPlan::gradient_bits`].
    #[default]
    Gradient,
    /// The quantized minibatch and its labels; the aggregator computes the gradient.
    /// Samples stay inside the region: a policy may choose this only where
    /// [`LanInput::data_mode_allowed`].
    Data(DataPlan),
}

/// How workers and their region's aggregator exchange a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LanPlan {
    /// Gradient mode: bits per gradient value per tensor: 2 means TernGrad, 1 and 3..=8
    /// stochastic uniform, 32 full precision. Empty means 32 for every tensor.
    pub gradient_bits: Vec<u8>,
    /// Bits of the loss-aware quantized weights ŵ that workers train on (2..=8; 2 is
    /// ternary), or 32 for full-precision weights. Biases always stay full precision.
    /// Unrefined data mode sends workers no weights.
    pub weight_bits: u8,
    /// Gradient or data mode.
    pub mode: LanMode,
}

impl LanPlan {
    /// Full-precision gradients and weights.
    pub const FULL_PRECISION: LanPlan = LanPlan {
        gradient_bits: Vec::new(),
        weight_bits: 32,
        mode: LanMode::Gradient,
    };
}

/// A policy's decisions for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyOutput {
    /// One plan per link, in input order.
    pub links: Vec<LinkPlan>,
    /// The LAN plan.
    pub lan: LanPlan,
    /// State to hand back next round.
    pub state: Vec<u8>,
}

impl PolicyOutput {
    /// The same plan for every tensor on every link, with `lan` and the state passed through.
    pub fn uniform(input: &PolicyInput, plan: TensorPlan, lan: LanPlan) -> Self {
        Self {
            links: input
                .links
                .iter()
                .map(|l| LinkPlan {
                    tensors: vec![plan; l.tensors.len()],
                })
                .collect(),
            lan,
            state: input.state.clone(),
        }
    }
}

/// A value per link read back from a state blob written by [`per_link_state`] (one
/// little-endian `f32` per link, in link order): `links` values, each the saved one, or
/// `default` where there is none or it is not finite, clamped to `[min, max]`. A blob from
/// another policy or version reads as values within the bounds, never as an error.
pub fn per_link_values(state: &[u8], links: usize, default: f32, min: f32, max: f32) -> Vec<f32> {
    let mut saved = state
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    (0..links)
        .map(|_| {
            saved
                .next()
                .filter(|v| v.is_finite())
                .unwrap_or(default)
                .clamp(min, max)
        })
        .collect()
}

/// The state blob that keeps `values`, one per link, for [`per_link_values`] next round.
pub fn per_link_state(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Name, version and one-line description of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// Short name, e.g. `weightgrad`.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// What it does.
    pub description: String,
}

/// A policy: a pure function from a round's input to its decisions.
pub trait Policy {
    /// Who this is.
    fn info(&self) -> PolicyInfo;
    /// The decisions for one round.
    fn decide(&self, input: &PolicyInput) -> PolicyOutput;
}

/// A fixed, representative input: two links, an MLP's four tensors. The agent self-tests
/// every policy on it before admitting it; policy authors can use it in their tests.
pub fn golden_input() -> PolicyInput {
    let tensor = |numel, role| TensorStats {
        numel,
        role,
        update_l2: 0.05,
        weight_l2: 3.0,
        max_relative: 0.2,
        significant_fraction: vec![0.6, 0.3, 0.05],
        rounds_since_sent: 1,
    };
    let link = |peer: &str| LinkInput {
        link: LinkStats {
            peer: peer.into(),
            bandwidth_bps: 100e6,
            rtt_s: 0.1,
            loss: 0.0,
            queued_bytes: 0,
        },
        tensors: vec![
            tensor(16384, TensorRole::Weight),
            tensor(256, TensorRole::Bias),
            tensor(2560, TensorRole::Weight),
            tensor(10, TensorRole::Bias),
        ],
    };
    PolicyInput {
        context: RoundContext {
            round: 8,
            lr: 1e-3,
            base_lr: 1e-3,
            loss: 0.5,
            regions: 3,
            final_round: false,
        },
        thresholds: vec![0.001, 0.01, 0.1],
        links: vec![link("eu-west"), link("ap-southeast")],
        lan: LanInput {
            workers: 2,
            batch_size: 64,
            sample_features: 64,
            classes: 10,
            tensor_sizes: vec![16384, 256, 2560, 10],
            data_mode_allowed: true,
        },
        state: Vec::new(),
    }
}

/// Checks an output against its input: one plan per link and tensor, bits allowed, τ finite
/// and non-negative, `top_fraction` in (0, 1], LAN widths allowed, data mode only where
/// allowed. Returns a description of the first problem.
pub fn validate_output(input: &PolicyInput, output: &PolicyOutput) -> Result<(), String> {
    if output.links.len() != input.links.len() {
        return Err(format!(
            "{} link plans for {} links",
            output.links.len(),
            input.links.len()
        ));
    }
    for (l, (plan, link)) in output.links.iter().zip(&input.links).enumerate() {
        if plan.tensors.len() != link.tensors.len() {
            return Err(format!(
                "link {l} ({}): {} tensor plans for {} tensors",
                link.link.peer,
                plan.tensors.len(),
                link.tensors.len()
            ));
        }
        for (t, p) in plan.tensors.iter().enumerate() {
            if !ALLOWED_BITS.contains(&p.bits) {
                return Err(format!(
                    "link {l}, tensor {t}: {} bits is not allowed",
                    p.bits
                ));
            }
            if !p.tau.is_finite() || p.tau < 0.0 {
                return Err(format!(
                    "link {l}, tensor {t}: tau {} is not finite and >= 0",
                    p.tau
                ));
            }
            // Written so that NaN fails too.
            if !(p.top_fraction > 0.0 && p.top_fraction <= 1.0) {
                return Err(format!(
                    "link {l}, tensor {t}: top_fraction {} is not in (0, 1]",
                    p.top_fraction
                ));
            }
        }
    }
    let tensors = input.links.first().map_or(0, |l| l.tensors.len());
    if !output.lan.gradient_bits.is_empty() && output.lan.gradient_bits.len() != tensors {
        return Err(format!(
            "LAN plan has {} gradient widths for {tensors} tensors",
            output.lan.gradient_bits.len()
        ));
    }
    if let Some(b) = output
        .lan
        .gradient_bits
        .iter()
        .find(|b| !matches!(b, 1..=8 | 32))
    {
        return Err(format!("LAN gradient width {b} is not allowed"));
    }
    if !matches!(output.lan.weight_bits, 2..=8 | 32) {
        return Err(format!(
            "LAN weight width {} is not allowed",
            output.lan.weight_bits
        ));
    }
    if let LanMode::Data(data) = output.lan.mode {
        if !input.lan.data_mode_allowed {
            return Err(
                "the LAN plan chooses data mode, but this region's LAN crosses a WAN \
                 and allow_data_over_wan is not set: samples never leave their region"
                    .into(),
            );
        }
        if !(1..=8).contains(&data.feature_bits) {
            return Err(format!(
                "data mode with {} bits per feature (1..=8 allowed)",
                data.feature_bits
            ));
        }
        if data.refine_bits > 8 {
            return Err(format!(
                "data mode with {} refinement bits (0..=8 allowed)",
                data.refine_bits
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_link_values_come_back_from_their_state_within_bounds() {
        let state = per_link_state(&[0.5, 7.0, f32::NAN]);
        assert_eq!(state.len(), 12);
        assert_eq!(
            per_link_values(&state, 4, 1.0, 0.25, 1.0),
            [0.5, 1.0, 1.0, 1.0],
            "clamped, not finite and missing values read as the default"
        );
        assert_eq!(
            per_link_values(&[1, 2, 3], 2, 0.01, 0.01, 0.5),
            [0.01, 0.01]
        );
        assert_eq!(per_link_values(&state, 1, 1.0, 0.25, 1.0), [0.5]);
    }

    #[test]
    fn the_contract_constants_name_the_wit_package() {
        assert!(WIT.contains(&format!("package {CONTRACT};")));
        let (package, version) = CONTRACT.split_once('@').unwrap();
        assert_eq!(EXPORT, format!("{package}/policy@{version}"));
    }

    fn input(links: usize, tensors: usize) -> PolicyInput {
        let t = TensorStats {
            numel: 10,
            role: TensorRole::Weight,
            update_l2: 0.0,
            weight_l2: 1.0,
            max_relative: 0.0,
            significant_fraction: vec![],
            rounds_since_sent: 0,
        };
        PolicyInput {
            context: RoundContext {
                round: 0,
                lr: 0.1,
                base_lr: 0.1,
                loss: 1.0,
                regions: 2,
                final_round: false,
            },
            thresholds: vec![],
            links: (0..links)
                .map(|i| LinkInput {
                    link: LinkStats {
                        peer: format!("p{i}"),
                        bandwidth_bps: 1e8,
                        rtt_s: 0.1,
                        loss: 0.0,
                        queued_bytes: 0,
                    },
                    tensors: vec![t.clone(); tensors],
                })
                .collect(),
            lan: LanInput {
                workers: 2,
                batch_size: 4,
                sample_features: 3,
                classes: 10,
                tensor_sizes: vec![10; tensors],
                data_mode_allowed: false,
            },
            state: vec![],
        }
    }

    fn output(links: usize, tensors: usize, plan: TensorPlan) -> PolicyOutput {
        PolicyOutput {
            links: vec![
                LinkPlan {
                    tensors: vec![plan; tensors]
                };
                links
            ],
            lan: LanPlan::FULL_PRECISION,
            state: vec![],
        }
    }

    #[test]
    fn tau_schedules_follow_their_formulas() {
        let mut ctx = input(1, 1).context;
        ctx.lr = 0.025;
        ctx.base_lr = 0.1;
        ctx.round = 16;
        assert_eq!(TauSchedule::LearningRate.tau(0.01, &ctx), 0.0025);
        assert_eq!(TauSchedule::InverseSqrt.tau(0.01, &ctx), 0.0025);
        ctx.round = 0;
        assert_eq!(TauSchedule::InverseSqrt.tau(0.01, &ctx), 0.01);
        ctx.base_lr = 0.0;
        assert_eq!(TauSchedule::LearningRate.tau(0.01, &ctx), 0.01);
    }

    /// Found by the `validate_output` fuzz target (sdk/fuzz): a plan with `top_fraction`
    /// -inf was accepted. NaN, zero, negative and above-one fractions are refused now.
    #[test]
    fn top_fraction_outside_zero_to_one_is_refused() {
        let plan = |top_fraction| TensorPlan {
            send: true,
            tau: 0.01,
            bits: 2,
            top_fraction,
        };
        for bad in [f32::NEG_INFINITY, f32::NAN, 0.0, -0.5, 1.5, f32::INFINITY] {
            let e = validate_output(&input(1, 2), &output(1, 2, plan(bad))).unwrap_err();
            assert!(e.contains("top_fraction"), "{bad}: {e}");
        }
        for good in [1.0, 0.5, 0.01, f32::MIN_POSITIVE] {
            assert!(validate_output(&input(1, 2), &output(1, 2, plan(good))).is_ok());
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = TensorPlan {
            send: true,
            tau: 0.01,
            bits: 2,
            top_fraction: 1.0,
        };
        assert!(validate_output(&input(2, 3), &output(2, 3, ok)).is_ok());
        assert!(
            validate_output(&input(2, 3), &output(1, 3, ok))
                .unwrap_err()
                .contains("1 link plans")
        );
        assert!(
            validate_output(&input(2, 3), &output(2, 2, ok))
                .unwrap_err()
                .contains("2 tensor plans")
        );
        let bad_bits = TensorPlan { bits: 77, ..ok };
        assert!(
            validate_output(&input(1, 1), &output(1, 1, bad_bits))
                .unwrap_err()
                .contains("77 bits")
        );
        let nan = TensorPlan {
            tau: f32::NAN,
            ..ok
        };
        assert!(
            validate_output(&input(1, 1), &output(1, 1, nan))
                .unwrap_err()
                .contains("tau")
        );
        let mut lan = output(1, 2, ok);
        lan.lan.gradient_bits = vec![2];
        assert!(
            validate_output(&input(1, 2), &lan)
                .unwrap_err()
                .contains("LAN plan")
        );
    }

    #[test]
    fn data_mode_needs_permission_and_sane_widths() {
        let ok = TensorPlan {
            send: true,
            tau: 0.01,
            bits: 2,
            top_fraction: 1.0,
        };
        let data = DataPlan {
            feature_bits: 4,
            scale: DataScale::PerFeature,
            refine_bits: 2,
        };
        let mut out = output(1, 2, ok);
        out.lan.mode = LanMode::Data(data);
        let mut inp = input(1, 2);
        assert!(
            validate_output(&inp, &out)
                .unwrap_err()
                .contains("allow_data_over_wan")
        );
        inp.lan.data_mode_allowed = true;
        assert!(validate_output(&inp, &out).is_ok());
        out.lan.mode = LanMode::Data(DataPlan {
            feature_bits: 0,
            ..data
        });
        assert!(validate_output(&inp, &out).unwrap_err().contains("0 bits"));
        out.lan.mode = LanMode::Data(DataPlan {
            refine_bits: 9,
            ..data
        });
        assert!(
            validate_output(&inp, &out)
                .unwrap_err()
                .contains("9 refinement")
        );
    }

    #[test]
    fn cost_model_counts_what_each_mode_moves() {
        let lan = LanInput {
            workers: 2,
            batch_size: 64,
            sample_features: 64,
            classes: 10,
            tensor_sizes: vec![16384, 256, 2560, 10],
            data_mode_allowed: true,
        };
        let d = 19210;
        let gradient = LanPlan {
            gradient_bits: vec![8; 4],
            weight_bits: 8,
            mode: LanMode::Gradient,
        };
        assert_eq!(lan.step_bits(&gradient), 2 * (d * 8 + d * 8));
        let unrefined = LanPlan {
            mode: LanMode::Data(DataPlan {
                feature_bits: 4,
                scale: DataScale::PerFeature,
                refine_bits: 0,
            }),
            ..gradient.clone()
        };
        // 64 samples of 64 four-bit features, 4-bit labels, 64 feature ranges.
        assert_eq!(
            lan.step_bits(&unrefined),
            2 * (64 * 64 * 4 + 64 * 4 + 64 * 64)
        );
        let refined = LanPlan {
            mode: LanMode::Data(DataPlan {
                feature_bits: 4,
                scale: DataScale::PerSample,
                refine_bits: 2,
            }),
            ..gradient
        };
        assert_eq!(
            lan.step_bits(&refined),
            2 * (64 * 64 * 4 + 64 * 4 + 64 * 64 + d * 8 + d * 2)
        );
    }
}
