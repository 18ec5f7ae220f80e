//! pregate's benchmarks: the `[[bench]]` targets of this package (`cargo bench -p pregate-benches
//! --bench NAME`), and `replay_experiments.sh`. The library itself is empty; a package needs one
//! target that is not a bench.
