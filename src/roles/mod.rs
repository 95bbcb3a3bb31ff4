//! The functions each worker role serves, and the triggers it registers.
//! Roles never import each other; only [`crate::up`] wires several together.

pub mod chat;
pub mod inference;
pub mod math;

use std::sync::Arc;

use crate::engine::Generate;
use crate::worker::{Worker, WorkerOptions};

/// The caller role: validates HTTP requests, calls the infer functions, shapes responses.
pub fn caller(opts: WorkerOptions) -> Worker {
    let worker = Worker::new(opts)
        .function("math::add_two_numbers", math::add_two_numbers)
        .trigger(
            "POST",
            "/math/add-two-numbers",
            "math::add_two_numbers",
            &["math::add"],
        );
    chat::register(worker)
}

/// The infer role: the model's functions over a generator (the loaded engine), and `math::add`.
pub fn infer(opts: WorkerOptions, engine: Arc<dyn Generate>) -> Worker {
    let probe = Arc::clone(&engine);
    let worker = Worker::new(opts)
        .function("math::add", math::add)
        .progress(Arc::new(move || probe.progress()), engine.stall_limit());
    inference::register(worker, engine)
}
