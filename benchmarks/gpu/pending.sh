#!/usr/bin/env bash
# Every GPU check the open and blocked issues still owe, in one command sized for a lent GPU's 15 minutes
# (one `run` call of at most 600 s; the machine's start is extra). Priority order: correctness of every Triton
# kernel at model shapes first, then the benchmarks of issue 8 (FFT conv, Hyena), 6 (W4Ax, KV4 attention) and
# 7 (GLA). Each step has its own time limit and a failure does not stop the next; results land in $OUT
# (JSON per benchmark, pytest's log, this script's log: at most 8 files come back).
#
# The GPU image holds torch, triton and einops but an older transformers and no fla; carry wheels (here, once):
#   echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 fla-core==0.6.0   # fla: the GLA comparison
# then run: carry [".whl"], command "bash benchmarks/gpu/pending.sh", timeout_s 600.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/pending.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} >> "$LOG" 2>&1
step 150 "pytest -m gpu (every kernel at model shapes)" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/kernels --junitxml="$OUT/pytest-gpu.xml"
step 110 "issue 8: FFT conv vs torch.fft" python3 benchmarks/gpu/fftconv.py --lengths 1024 2048 4096 8192 16384 65536 \
    --out "$OUT"
step 80 "issue 8: Hyena training step" python3 benchmarks/gpu/hyena_train.py --out "$OUT"
step 80 "issue 6: W4Ax GEMM" python3 benchmarks/gpu/w4ax_gemm.py --out "$OUT"
step 60 "issue 6: KV4 attention" python3 benchmarks/gpu/kv4_attention.py --out "$OUT"
step 80 "issue 7: GLA kernels" python3 benchmarks/gpu/gla.py --out "$OUT"
echo "== done after ${SECONDS}s" | tee -a "$LOG"
