//! The model's weights in host memory, as the CPU backend computes with them.
//!
//! Every matrix is row-major `[out, in]`, as PyTorch stores a `Linear` weight, converted to f32 once
//! at load time (the files may hold bf16, f16 or f32).

/// A row-major f32 matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows (output features of a linear layer).
    pub rows: usize,
    /// Columns (input features of a linear layer).
    pub cols: usize,
    /// `rows * cols` values, row by row.
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix over `data`; `data.len()` must be `rows * cols`.
    ///
    /// # Panics
    /// If it is not. The loader builds matrices from tensors whose shapes it checked first
    /// ([`crate::model::checkpoint::TensorRef::expect_shape`]), so a file cannot reach the check.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Matrix { rows, cols, data }
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Bytes of the matrix as stored here (f32).
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// A linear layer with a bias (the router's layers).
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Matrix,
    /// `[out]`.
    pub bias: Vec<f32>,
}

/// One SwiGLU feed-forward block: `down(silu(gate x) * up x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[I, H]`.
    pub gate: Matrix,
    /// `[I, H]`.
    pub up: Matrix,
    /// `[H, I]`.
    pub down: Matrix,
}

impl ExpertWeights {
    /// The FFN's intermediate width.
    pub fn inter(&self) -> usize {
        self.gate.rows
    }

    /// Bytes of the three matrices as stored here.
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}

/// One decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[H]`.
    pub input_norm: Vec<f32>,
    /// `[nH*d, H]`.
    pub q: Matrix,
    /// `[nKV*d, H]`.
    pub k: Matrix,
    /// `[nKV*d, H]`.
    pub v: Matrix,
    /// `[H, nH*d]`.
    pub o: Matrix,
    /// RMSNorm before the experts, `[H]`.
    pub post_norm: Vec<f32>,
    /// The routed experts, `N_cluster` of them.
    pub experts: Vec<ExpertWeights>,
    /// The always-active shared part (Read-ME's residual layout, Qwen2-MoE's shared expert).
    pub shared: Option<ExpertWeights>,
    /// What the Hugging Face MoE families add (all absent for Read-ME).
    pub extra: LayerExtras,
}

/// A layer's tensors beyond Read-ME's: the attention extras, the in-model router, the shared
/// expert's gate and a dense layer's MLP.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerExtras {
    /// q, k and v biases `[nH*d]`, `[nKV*d]`, `[nKV*d]` (Qwen2-MoE).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// Query and key RMSNorm weights: `[d]` each (per head) or `[nH*d]` and `[nKV*d]` (full width).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    /// The layer's router `[N, H]` (an in-model gate).
    pub gate: Option<Matrix>,
    /// The layer's DSelect-k gate (in place of `gate`): a per-example one routes in the forward
    /// pass; a static one is taken out to make the pre-gate router.
    pub dselect: Option<crate::router::dselect::DSelectGate>,
    /// The shared expert's gate `[H]`: its output is scaled by `sigmoid(gate . x)`.
    pub shared_gate: Option<Vec<f32>>,
    /// A dense layer's MLP (then `experts` is empty).
    pub dense: Option<ExpertWeights>,
}

/// The pre-gating router's weights (`cluster_predictor.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouterWeights {
    /// `[V, D]`.
    pub embed: Matrix,
    /// `[D]`.
    pub input_norm: Vec<f32>,
    /// Attention projections, `[D, D]` with bias.
    pub q: Linear,
    /// See `q`.
    pub k: Linear,
    /// See `q`.
    pub v: Linear,
    /// See `q`.
    pub o: Linear,
    /// `[D]`.
    pub post_norm: Vec<f32>,
    /// `[F, D]`.
    pub proj_1: Linear,
    /// `[D, F]`.
    pub proj_2: Linear,
    /// `[D]`.
    pub out_norm: Vec<f32>,
    /// `[N, D]`.
    pub proj_out: Linear,
    /// The router's hyperparameters (heads, normalizer, context): they travel with its weights, so
    /// a router built from them needs nothing else of a Read-ME config.
    pub config: crate::config::ReadMeRouterConfig,
}

/// Which expert layout the checkpoint uses (see `plugin/docs/model-format.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// Split experts with the shared channels duplicated in each.
    Fused,
    /// Split experts plus a separate always-active shared part.
    Residual,
    /// The training layout: dense MLP plus channel masks (convert it first).
    Masked,
}

impl ExpertLayout {
    /// The layout's name as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpertLayout::Fused => "fused",
            ExpertLayout::Residual => "residual",
            ExpertLayout::Masked => "masked",
        }
    }

    /// Parses a layout name (`fused`, `residual`, `masked`).
    pub fn parse(name: &str) -> crate::Result<Self> {
        [
            ExpertLayout::Fused,
            ExpertLayout::Residual,
            ExpertLayout::Masked,
        ]
        .into_iter()
        .find(|l| l.as_str() == name)
        .ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "unknown layout `{name}`: expected fused, residual or masked"
            ))
        })
    }
}

/// All weights of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelWeights {
    /// `[V, H]`.
    pub embed: Matrix,
    /// The decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[H]`.
    pub norm: Vec<f32>,
    /// `[V, H]`; `None` when tied to `embed`.
    pub lm_head: Option<Matrix>,
    /// The pre-gating router.
    pub router: RouterWeights,
    /// The layout the experts were read from.
    pub layout: ExpertLayout,
}

impl ModelWeights {
    /// The output projection (lm_head, or the embedding when tied).
    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
