//! Model directories: what a model is ([`family`]: its family, per-layer plan and tensor
//! inventory), reading checkpoints ([`checkpoint`]), loading host weights ([`load`]),
//! writing safetensors ([`writer`]) with [`progress`] reports, converting the training layout ([`convert`]) and making
//! random-weight models of preset shapes ([`presets`]). The format is `plugin/docs/model-format.md`.

pub mod checkpoint;
pub mod convert;
pub mod family;
pub mod inspect;
pub mod load;
pub mod names;
pub mod presets;
pub mod progress;
pub mod random;
pub mod weights;
pub mod writer;

pub use checkpoint::{Checkpoint, FloatDtype, TensorRef};
pub use family::{
    DSelectKind, FfnPlan, GatingRule, Inventory, LayerPlan, ModelFamily, ModelPlan, MoePlan,
    TensorRole,
};
pub use load::{detect_layout, ModelDir};
pub use presets::{ModelSpec, ParamCounts, Preset};
pub use progress::{NoProgress, Progress};
pub use random::{make_model, make_model_with_progress};
pub use weights::{
    ExpertLayout, ExpertWeights, LayerWeights, Linear, Matrix, ModelWeights, RouterWeights,
};
