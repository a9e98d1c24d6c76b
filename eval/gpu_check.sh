#!/usr/bin/env bash
# The device check (issue 11): one prepared run on a fresh H100/H200 that holds only this repo.
#
#   OUT=/some/folder bash eval/gpu_check.sh        # the device tool sets $OUT itself
#
# There: PyTorch, transformers, Triton, safetensors, accelerate and tqdm are installed, nothing can be
# downloaded, so the repo runs from its checkout (PYTHONPATH=.). Budget: 8 minutes, autotuning and
# compilation included: every step has its own time limit (together 470 s) and the script goes on when
# one fails, so one broken piece does not hide the others' figures. Steps, in order of what they prove:
#   1. the CUDA tests (Triton kernels against the reference; CUDA-graph decoding);
#   2. the kernel benchmark: the 8B-Llama MLP block at M = 1, 16, 64, 256, 2048, every path vs bf16 cuBLAS;
#   3. the 8B-shaped random-weight model: prefill 2048, decode with CUDA graphs, weight bytes;
#   4. `quantkit run --device cuda` on a tiny from-config model: the command line end to end on the GPU.
# It writes at most 6 files under $OUT (the device tool returns 8): summary.txt (versions, GPU, each
# step's exit status and seconds), logs.txt (every step's output), tests.log, kernels.json,
# model_8b.json, run_tiny.json.
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export QUANTKIT_CACHE="$WORK/cache"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python - <<'PY' 2>&1
import platform, torch, transformers
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, triton {tv}")
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
} > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, record its status
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name: $*" >> "$OUT/logs.txt"
  timeout "$limit" "$@" >> "$OUT/logs.txt" 2>&1
  rc=$?
  echo "$name: exit $rc ($([ $rc = 124 ] && echo 'time limit' || echo done)), $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
}

step tests 120 python -m pytest -q -p no:cacheprovider -m gpu tests --junit-xml="$WORK/junit.xml" -o console_output_style=classic
[ -f "$WORK/junit.xml" ] && python - "$WORK/junit.xml" > "$OUT/tests.log" <<'PY'
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter("testcase"):
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    status = "FAIL" if bad is not None else "skip" if case.find("skipped") is not None else "ok"
    print(status, case.get("classname"), case.get("name"), (bad.get("message") or "")[:300] if bad is not None else "")
PY
step kernels 110 python eval/bench_kernels.py --m 1,16,64,256,2048 --out "$OUT/kernels.json"
step model_8b 130 python eval/bench_model_gpu.py --out "$OUT/model_8b.json"
step tiny_model 20 python eval/tiny_model.py --out "$WORK/tiny"
step run_tiny 90 python -m quantkit.cli run --model "$WORK/tiny" --out "$WORK/run" --windows 2 --device cuda -q
[ -f "$WORK/run/results.json" ] && cp "$WORK/run/results.json" "$OUT/run_tiny.json"
cat "$OUT/summary.txt"
rm -rf "$WORK"
