//! segctl: one library behind one binary that carries a pet-segmentation model through its
//! whole life: fetch and validate the data, train, evaluate, export, serve, predict.
//!
//! Data flows one way: [`config`] → [`data`] → model → train/evaluate → export → infer →
//! serve/predict. The `segctl` binary only parses flags and calls into these modules.

pub mod benchmark;
pub mod build_info;
pub(crate) mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod evaluate;
pub mod export;
pub mod infer;
pub mod loss;
pub(crate) mod metrics;
pub mod optim;
pub(crate) mod plot;
pub mod predict;
pub mod train;
pub mod model;
pub mod model_store;
pub mod progress;
pub(crate) mod tensorboard;
pub mod server;
pub mod storage;
pub mod util;
pub(crate) mod validation;

/// The library's result type.
pub type Result<T> = anyhow::Result<T>;
