#!/usr/bin/env bash
# The tests left out of `cargo test --workspace --all-targets`: they assert
# rates, latencies, memory (RSS) bounds or run tens of thousands of cycles,
# and so need a quiet machine, not a loaded CI runner. Each is marked
# `#[ignore = "stress: run by bench/stress.sh"]`.
#
#   bash bench/stress.sh            # every stress test (a few minutes)
#   bash bench/stress.sh churn      # only those whose name contains "churn"
#
# Release build: the figures the tests bound are the ones users get. The
# broker tests' redis-server is not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."

filter=("$@")
# One test at a time: each measures the machine, and two would measure
# each other.
cargo test --release --workspace -- --ignored --test-threads=1 "${filter[@]}"
