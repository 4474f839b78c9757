#!/usr/bin/env bash
# The README's main job: the torchtitan llama3 debug model with DistMuon on 2 CPU ranks, end to end.
# Trains steps 1-10 and writes a checkpoint, then a second run resumes from it and trains to step 20.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DUMP_FOLDER:-./outputs/debug_cpu}
rm -rf "$out"
# One log stream (as torchtitan's run_train.sh): rank 0 on the console, every rank's full
# stdout/stderr in $out/logs/<run>/attempt_0/<local rank>/.
run() { torchrun --standalone --nproc_per_node 2 --log-dir "$out/logs" --tee 3 --local-ranks-filter 0 --role rank \
          -m launch.train --job.config_file configs/debug_cpu.toml --job.dump_folder "$out" "$@"; }
echo "== run 1: steps 1-10, checkpoint at step 10"
run --training.steps 10
echo "== run 2: resume from the step-10 checkpoint, train to step 20"
run --training.steps 20
ls "$out/checkpoint"
