#!/usr/bin/env bash
# The checks a lent GPU machine is for (README "GPU"), as one call:
#   bash bench/run_gpu.sh [build] [tests] [bench] [deploy] [suite] [mnist32]
#   (default: the first five)
# build   the extension with its CUDA kernels for this card (pip install -e, no downloads)
# tests   every CUDA test (and those that need a GPU to be meaningful), in parallel
# bench   the CUDA cases of the pytest benchmarks: tables bench/results/*_cuda.{md,json}
# deploy  bench/bench_deploy.py --device cuda: bench/results/deploy_cuda.{md,json}
# suite   the whole test suite, as far as the time left allows
# mnist32 issue 13's rows on the GPU: bench/reproduce_cifar.py --dataset mnist32 --device cuda for
#         MNIST32_MODELS (default resnet-56 vgg-d6) and MNIST32_SEEDS (default 0 1), one process
#         per model and seed side by side (or MNIST32_JOBS="resnet-56:0 vgg-d6:0,1": model:seeds),
#         MNIST32_METHODS (default all), each into $OUT/mnist32/<model>_s<seeds>/ (packed in
#         $OUT/mnist32_tables.tgz); MNIST's four IDX files in data/mnist (git-ignored: name it in
#         the run's carry), and dense networks of earlier runs in bench/results/cifar_cache (carry
#         it too, to skip their dense phase). A row is saved when it ends, so a stage cut short
#         keeps the finished ones.
# Logs and tables land in $OUT/results.tgz; end the call with bench/gpu_bundle.sh, which packs all of
# $OUT into one file the device tool can bring back. Each stage has a time limit, so that one hung kernel
# cannot spend the whole lease; GPU_BUDGET_S (default 420) is the time for all stages together.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
budget=${GPU_BUDGET_S:-420}
stages=${*:-build tests bench deploy suite}
all_stages="build tests bench deploy suite mnist32"
left() { echo $(( budget - ($(date +%s) - start) )); }
pack() { tar czf "$OUT/results${GPU_TAG:-}.tgz" bench/results/*_cuda.* bench/results/mnist32.* "$OUT"/*.log 2>/dev/null; }
trap pack EXIT
want() { [[ " $stages " == *" $1 "* ]]; }
for stage in $stages; do
  case $stage in build|tests|bench|deploy|suite|mnist32) ;;
    *) echo "run_gpu.sh: unknown stage '$stage' (stages: $all_stages)"; exit 2 ;;
  esac
done
if ! python3 -c "import torch" 2>/dev/null; then
  echo "run_gpu.sh: python3 cannot import torch here"; exit 1
elif ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run_gpu.sh: python3's torch sees no CUDA GPU here; this script is for a GPU machine"; exit 1
fi

if want build; then
  { nvidia-smi; nproc; git log --oneline -1 2>/dev/null
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  } > "$OUT/env.log" 2>&1
  cat "$OUT/env.log"
  cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  # The lent machines' image sets CC/CXX to a GCC that links libstdc++ statically, which
  # setup.py refuses (mackay_ext/_build_checks.py); the system GCC is the one torch was built with.
  export CC=${GPU_CC:-gcc} CXX=${GPU_CXX:-g++}
  echo "== build (sm_$cap, CC=$CC CXX=$CXX: $($CXX --version | head -1))"
  if ! TORCH_CUDA_ARCH_LIST="$cap" FORCE_CUDA=1 MAX_JOBS=$(nproc) timeout 300 \
      python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
    tail -80 "$OUT/build.log"; exit 1
  fi
  echo "built after $(( $(date +%s) - start )) s"
fi
(cd / && python3 -c "import mackay_ext; print('backends', mackay_ext.compiled_backends())") || exit 1
# The first GPU run crashed on every argument error (see mackay_ext/_build_checks.py): say at once
# whether an op's error reaches Python, and what the library loads.
(cd / && python3 - <<'PY'
import glob, os, torch, mackay_ext
from mackay_ext._build_checks import elf_needed
from mackay_ext.curvature import sq_gemm_accumulate_
print("_C loads:", elf_needed(glob.glob(os.path.join(os.path.dirname(mackay_ext.__file__), "_C*.so"))[0]))
for device in ("cpu", "cuda"):
    try:
        sq_gemm_accumulate_(torch.zeros(5, 4, device=device), torch.randn(6, 5, device=device),
                            torch.randn(5, 4, device=device))
    except RuntimeError as error:
        print(f"argument errors raise on {device}:", str(error).splitlines()[0][:80])
PY
) || echo "!! an argument error crashed the process (exit $?)"

if want tests; then
  echo "== CUDA tests (after $(( $(date +%s) - start )) s)"
  timeout $(( $(left) / 2 )) python3 -m pytest python_tests -q -rfEs -p no:cacheprovider -n 8 \
    --timeout 120 -k "cuda or CUDA or mixed_devices or gpu or graph" 2>&1 | tee "$OUT/tests_cuda.log" | tail -30
fi
if want bench; then
  echo "== CUDA benchmarks (after $(( $(date +%s) - start )) s)"
  timeout $(( $(left) / 2 )) python3 -m pytest bench -q -p no:cacheprovider --timeout 150 \
    -k cuda 2>&1 | tee "$OUT/bench_cuda.log" | grep -v "^test_" | tail -60
fi
if want deploy; then
  echo "== deployment forms on CUDA (after $(( $(date +%s) - start )) s)"
  timeout $(( $(left) / 2 )) python3 bench/bench_deploy.py --device cuda --budget 1 2>&1 \
    | tee "$OUT/deploy_cuda.log" | tail -40
fi
if want suite; then
  echo "== whole suite, as far as $(left) s allow"
  OMP_NUM_THREADS=1 timeout $(( $(left) - 15 )) python3 -m pytest python_tests -q -rfE \
    -p no:cacheprovider -n 12 --timeout 120 2>&1 | tee "$OUT/tests_all.log" | tail -40
fi
if want mnist32; then
  if [ ! -f data/mnist/train-images-idx3-ubyte.gz ] && [ ! -f data/mnist/train-images-idx3-ubyte ]; then
    echo "run_gpu.sh: mnist32 needs MNIST's IDX files in data/mnist (copy them there and carry data/mnist)"
  else
    # One process per job: these networks at batch 128 leave the GPU mostly idle waiting for
    # Python, so jobs side by side finish sooner than one after another. Each job writes its own
    # table under $OUT/mnist32/; merge them here with reproduce_cifar.py --merge.
    jobs=${MNIST32_JOBS:-}
    if [ -z "$jobs" ]; then
      for model in ${MNIST32_MODELS:-resnet-56 vgg-d6}; do
        for seed in ${MNIST32_SEEDS:-0 1}; do jobs="$jobs $model:$seed"; done
      done
    fi
    echo "== mnist32 rows on the GPU ($jobs ), as far as $(left) s allow"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 10 > "$OUT/gpu_util.log" 2>&1 &
    monitor=$!
    pids=""
    for job in $jobs; do
      model=${job%%:*}; seeds=${job#*:}; dir="$OUT/mnist32/${model}_s${seeds//,/-}"
      mkdir -p "$dir/cifar_cache"
      # dense networks trained before (bench/results/cifar_cache, git-ignored: carry it) are reused
      for seed in ${seeds//,/ }; do
        cp bench/results/cifar_cache/mnist32_${model}_width1_seed${seed}.pt "$dir/cifar_cache/" 2>/dev/null
      done
      OMP_NUM_THREADS=2 timeout $(( $(left) - 20 )) python3 bench/reproduce_cifar.py --dataset mnist32 \
        --data-dir data/mnist --device cuda --models "$model" --seeds ${seeds//,/ } --out "$dir" \
        ${MNIST32_METHODS:+--methods $MNIST32_METHODS} > "$OUT/mnist32_${model}_s${seeds//,/-}.log" 2>&1 &
      pids="$pids $!"
    done
    wait $pids
    kill $monitor 2>/dev/null
    grep -h -v "^  " "$OUT"/mnist32_*.log | tail -60
    # the tables and the ResNets' dense networks (a few MB; VGG-D6's 60 MB stay behind)
    tar czf "$OUT/mnist32_tables.tgz" -C "$OUT" --exclude "*vgg*seed*" mnist32 2>/dev/null
  fi
fi
echo "== done after $(( $(date +%s) - start )) s"
