//! The one integration-test target (so the tests link once): each module drives the built
//! `segctl` binary end to end against real files, archives and loopback HTTP.

mod util;

/// `fetch-data`: downloads from a loopback server, resume, checksums, hostile archives.
mod fetch;
/// `validate`: every defect of the real archive, injected into a synthetic dataset.
mod validate;
/// Config loading errors as a user sees them.
mod config;
/// train → evaluate → export → predict, and resumption after an interruption.
mod pipeline;
/// `export` under concurrency and `kill -9`; damaged or unbounded versions refused on load.
mod export;
/// `serve` over real loopback HTTP: every endpoint, hostile input, batching, hot reload,
/// graceful shutdown.
mod serve;
/// The CLI as typed: predict with no model flag, completions, man pages, --version, serve --json.
mod cli;
/// `export --onnx`, checked by onnx.checker and onnxruntime (Python, installed by .ci/run).
mod onnx;
/// The Open Inference Protocol (KServe v2) in `serve`, checked with Triton's own client.
mod oip;
/// TensorBoard event files of `train`, read back by TensorBoard's own EventAccumulator.
mod tensorboard;
/// Training as a user relies on it: bit-exact resumption, unreadable batches, accumulation,
/// `evaluate --at-original-size` against `predict`'s masks.
mod train;
/// `predict --shard`: disjoint shares, resumption, Indexed Job indices, list files.
mod shard;
/// The lifecycle against a real S3 server on loopback (moto): fetch-data, train, resume,
/// evaluate, export, serve and sharded predict in a bucket; a store dying mid-export.
mod storage;
