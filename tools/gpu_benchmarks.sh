#!/usr/bin/env bash
# One GPU visit: check the kernels in bf16/fp16, then time kernels, training and data parallelism.
# Usage: bash tools/gpu_benchmarks.sh OUT_DIR [kernels|norms|train|parallel|mfu|docmask|longctx ...]
#   (default: the first four; "kernels" checks and times attention, SwiGLU/RoPE and cross-entropy,
#   "norms" checks every launch setting of the norm kernels and times them, printing each
#   candidate's time; "mfu" trains llama-1b and gpt2-1.3b at seq 2048 in bf16 on one GPU at the
#   largest micro-batch the memory planner fits, across recompute, compile and kernel backends,
#   in under 8 minutes)
# Where one command may only run for minutes, run one part per command (the kernel sweep with
# the norms took about 8 minutes on an H100).
# Writes logs, Markdown and plots under OUT_DIR; copy the sections you want into docs/benchmarks.md.
# The machine needs torch (CUDA) and triton. The package is installed without its other
# dependencies (a GPU box without network access cannot fetch them and these runs don't use them).
set -euo pipefail
out="$(realpath -m "${1:?usage: bash tools/gpu_benchmarks.sh OUT_DIR}")"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Use the checkout in place: an editable install needs a build backend the GPU image may lack,
# so point Python at the checkout and expose kernels/ as megatron_lite.kernels.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import megatron_lite.kernels" 2>/dev/null || ln -sfn ../kernels megatron_lite/kernels
set +e
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

parts="${*:2}"
parts="${parts:-kernels norms train parallel}"
wants() { [[ " $parts " == *" $1 "* ]]; }

wants kernels && python3 tools/bench_kernels.py --check --only attention,elementwise,cross_entropy --out-dir "$out" \
    2>&1 | tee "$out/kernels.log"
wants norms && python3 tools/bench_kernels.py --check --only norms --out-dir "$out/norms" 2>&1 | tee "$out/norms.log"
# One GPU: tp=pp=1, and a global batch of a few micro-batches so a timed step is short.
one_gpu="parallel.tp=1 parallel.pp=1 parallel.sequence_parallel=false model.vocab_size=50257 train.precision=bf16"
wants train && for run in "configs/gpt2-124m.yaml train.micro_batch_size=16 train.global_batch_size=64" \
           "configs/llama-1b.yaml train.micro_batch_size=4 train.global_batch_size=16"; do
    for backends in "model.attention_backend=torch model.norm_backend=torch model.loss_backend=torch model.elementwise_backend=torch" \
                    "model.attention_backend=triton model.norm_backend=triton model.loss_backend=triton model.elementwise_backend=triton"; do
        # shellcheck disable=SC2086
        python3 tools/bench_train.py --synthetic --docs "$out/train.md" --config $run $one_gpu $backends \
            2>&1 | tee -a "$out/train.log"
    done
done
wants parallel && python3 tools/bench_parallel.py --device cuda --micro-batches 4 2>&1 | tee "$out/parallel.log"

# Issue 16: tokens/s, TFLOP/s, MFU and peak memory beside the planner's prediction, one GPU, seq 2048, bf16.
# Each axis is varied against the same baseline (Triton kernels, recompute none, compile off); the whole
# 2 x 3 x 2 x 2 matrix does not fit the 8 minutes. Runs go in order of interest; each gets at most
# MFU_RUN_TIMEOUT_S seconds and no more than what is left of MFU_BUDGET_S for the whole part.
if wants mfu; then
    budget="${MFU_BUDGET_S:-450}"
    run_timeout="${MFU_RUN_TIMEOUT_S:-150}"
    # 90% of the GPU for the planner: the allocator's fragmentation and the CUDA context take the rest
    fit_gib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{printf "%.0f", $1 / 1024 * 0.9}')"
    seq2048="parallel.tp=1 parallel.pp=1 parallel.sequence_parallel=false train.precision=bf16 model.seq_length=2048"
    triton="model.attention_backend=triton model.norm_backend=triton model.loss_backend=triton model.elementwise_backend=triton"
    eager="model.attention_backend=torch model.norm_backend=torch model.loss_backend=torch model.elementwise_backend=torch"
    variants=("$triton train.recompute=none train.compile=false"
              "$eager train.recompute=none train.compile=false"
              "$triton train.recompute=selective train.compile=false"
              "$triton train.recompute=full train.compile=false"
              "$triton train.recompute=none train.compile=true"
              "$eager train.recompute=none train.compile=true")
    start=$SECONDS
    for variant in "${variants[@]}"; do
        for model in "configs/llama-1b.yaml model.vocab_size=128256" "configs/gpt2-1.3b.yaml model.vocab_size=50257"; do
            left=$(( budget - (SECONDS - start) ))
            if (( left < 30 )); then
                echo "mfu: the ${budget}s budget is spent; skipped: $model $variant" | tee -a "$out/mfu.log"
                continue
            fi
            # shellcheck disable=SC2086
            timeout "$(( left < run_timeout ? left : run_timeout ))" python3 tools/bench_train.py --synthetic \
                --steps 5 --warmup 2 --fit-micro-batch "$fit_gib" --jsonl "$out/mfu.jsonl" --docs "$out/mfu.md" \
                --config $model $seq2048 $variant 2>&1 | tee -a "$out/mfu.log"
        done
    done
fi

# docmask (run by naming it): the document-masked Triton attention next to the torch backend, SDPA with a
# block mask and flex-attention, at S = 8k and 32k on ragged documents (TFLOP/s on visible pairs only).
wants docmask && python3 tools/bench_docmask.py kernels --out-dir "$out/docmask" 2>&1 | tee "$out/docmask.log"

# longctx (run by naming it): the 32k recipe (configs/llama-1b-32k.yaml) on one GPU at cp=1, all 16 layers,
# one 32768-token sequence per step, under selective and full recomputation: tokens/s, MFU, peak memory
# beside the planner's figure. Random tokens hold no end-of-document token, so document masks are off
# here (docmask times the masked kernel). Each run gets at most LONGCTX_RUN_TIMEOUT_S seconds.
if wants longctx; then
    run_timeout="${LONGCTX_RUN_TIMEOUT_S:-210}"
    for recompute in selective full; do
        timeout "$run_timeout" python3 tools/bench_train.py --synthetic --steps 3 --warmup 2 \
            --jsonl "$out/longctx.jsonl" --docs "$out/longctx.md" --config configs/llama-1b-32k.yaml \
            model.vocab_size=128256 parallel.cp=1 train.global_batch_size=1 data.document_mask=false \
            "train.recompute=$recompute" 2>&1 | tee -a "$out/longctx.log"
    done
fi
