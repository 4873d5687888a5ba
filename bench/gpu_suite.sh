#!/usr/bin/env bash
# The checks only a GPU can make, in one run of at most 8 minutes on one card, with one summary file:
#   kernels    the Triton kernels against their PyTorch twins on CUDA (fp32, bf16)      bench/gpu_checks.py
#   probe      the CUDA-graph DVAR probe against the eager one, and its overhead         bench/bench_probe.py
#   optimizer  8-bit AdamW: ours against bitsandbytes and fp32 AdamW on the card          bench/bench_optim.py
#   peer       LoRA s/step and peak memory against the real train_dreambooth_lora.py,
#              SD 1.5-shaped at 512 px (only with --diffusers-examples and --peer-python)   bench/bench_peer.py
#   planner    the memory planner against torch.cuda.max_memory_allocated, SD 1.5-shaped at
#              512 px and SDXL-base-shaped at 1024 px, fp32 and bf16                      bench/gpu_checks.py
#   multiadapter  N = 1, 4, 16 LoRA adapters in one batch against diffusers' adapter swapping,
#              images/s, SD 1.5-shaped at 512 px (the 3x that a CPU cannot show)          bench/bench_multi_adapter.py
#
#   bash bench/gpu_suite.sh [--dry-run] [--out DIR] [--diffusers-examples DIR --peer-python PY]
#
# --dry-run runs every check on the CPU with tiny shapes (CI does, tests/test_gpu_suite.py). DIR/summary.json
# holds, per check, its exit status, seconds and the last lines it printed; the suite exits non-zero when a
# check failed (a skipped one does not count).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=""; out="gpu-suite"; examples=""; peer_python=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry="--dry-run" ;;
        --out) out="$2"; shift ;;
        --diffusers-examples) examples="$2"; shift ;;
        --peer-python) peer_python="$2"; shift ;;
        *) echo "error: unknown argument $1; see the head of $0" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out"
logs="$out/logs"; mkdir -p "$logs"
: > "$out/checks.tsv"

if [ -n "$dry" ]; then
    size=tiny; res=32; steps=12; reps=1; optim=(--cases lora_r8 --reps 1 --rounds 1); device=cpu; ns=(1 2)
else
    size=sd15; res=512; steps=24; reps=3; optim=(--reps 5 --rounds 3); device=cuda; ns=(1 4 16)
fi
# seconds each check may take (caps, not estimates: nothing here has been timed on a GPU, none has been lent;
# the suite is meant to finish in 8 minutes, well under the caps' sum)
declare -A limit=([model]=120 [kernels]=60 [probe]=90 [optimizer]=60 [peer]=90 [planner]=150 [multiadapter]=120)

check() {  # name, then the command; records status and seconds, never stops the suite
    local name="$1"; shift
    local start; start=$(date +%s)
    timeout "${limit[$name]}" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$out/checks.tsv"
    echo "$name: exit $rc ($(( $(date +%s) - start )) s)"
}

# the model the probe, peer and planner checks share, built once (random weights, cached)
check model python -c "import sys; sys.path.insert(0, 'bench'); from bench_train import model_dir; model_dir('$size')"
check kernels python bench/gpu_checks.py kernels --out "$out/kernels.json" $dry
check probe python bench/bench_probe.py --size "$size" --resolution "$res" --methods lora --steps "$steps" \
    --reps "$reps" --no-record --no-csv
check optimizer python bench/bench_optim.py "${optim[@]}" --no-csv
if [ -n "$examples" ] && [ -n "$peer_python" ]; then
    check peer python bench/bench_peer.py --diffusers-examples "$examples" --peer-python "$peer_python" \
        --parts step --methods lora --step-model "$size" --resolution "$res" --steps 5 --rounds 1 --no-csv
else
    printf 'peer\tskipped\t0\n' >> "$out/checks.tsv"
    echo "peer: skipped (give --diffusers-examples and --peer-python)" > "$logs/peer.log"
fi
check planner python bench/gpu_checks.py planner --out "$out/planner.json" $dry
model_path=$(python -c "import sys; sys.path.insert(0, 'bench'); from bench_train import model_dir; print(model_dir('$size'))")
check multiadapter python bench/bench_multi_adapter.py --model "$model_path" --device "$device" --ns "${ns[@]}" \
    --resolution "$res" --steps 10 --no-csv

python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
checks = {}
for line in (out / "checks.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    tail = (out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-20:]
    checks[name] = {"status": "skipped" if rc == "skipped" else ("ok" if rc == "0" else f"exit {rc}"),
                    "seconds": int(seconds), "tail": tail}
(out / "summary.json").write_text(json.dumps(checks, indent=1))
failed = [n for n, c in checks.items() if c["status"] not in ("ok", "skipped")]
print(f"summary: {out / 'summary.json'}" + (f"; failed: {', '.join(failed)}" if failed else "; no check failed"))
sys.exit(1 if failed else 0)
EOF
