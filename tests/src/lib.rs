//! atoll's end-to-end tests (in `tests/tests/`) and benchmarks (`src/bin/bench.rs`, run by
//! `cargo xtask bench`).
