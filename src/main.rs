//! The `segctl` binary: parse flags, set up logging, run one subcommand, turn errors into a
//! one-line message and an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

// Training allocates and frees many large tensors per step; glibc's allocator returns them to
// the kernel each time (page faults and zeroing dominated CPU profiles).
/// `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys does not export it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[global_allocator]
static ALLOCATOR: segctl::util::alloc::CachingAllocator = segctl::util::alloc::CachingAllocator;

/// Keeps freed pages mapped for reuse instead of returning them to the kernel, which would
/// fault and zero them again on the next step (about half of a training step's CPU time).
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; no memory is touched.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // And large tensors go back to a step that asks for the same size (no fresh pages).
    segctl::util::alloc::set_cache_limit(segctl::util::alloc::training_cache_limit());
    // candle's element-wise thread pool spins 25 000 rounds after each of its ops, on a core
    // the training kernels' threads need: a short spin measured 7–9% faster steps (2 vCPUs).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
}

/// Returns freed pages to the kernel at once: a server's request stages run on pool threads
/// that may sit idle after a burst, and mimalloc purges a thread's delayed frees only when
/// that thread allocates again (measured: 150 -> 100 MB resident after a 64-connection burst).
fn return_freed_memory_at_once() {
    // SAFETY: as above.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // Only training needs it: the inference engine allocates nothing per call, and a server
    // should give memory back after a burst (mimalloc's default purge delay).
    if matches!(args.command, Some(cli::Command::Train(_))) {
        keep_freed_memory();
    }
    if matches!(args.command, Some(cli::Command::Serve(_))) {
        return_freed_memory_at_once();
    }
    cli::init_logging(&args.global);
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            let broken_pipe = err.chain().any(|cause| {
                cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
