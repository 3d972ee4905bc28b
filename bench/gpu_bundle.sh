#!/usr/bin/env bash
# Pack everything under $OUT into one file the device tool brings back, then leave only that file:
#   bash bench/gpu_bundle.sh      (last step of a GPU call, after every bench/run_gpu.sh in it)
# The tool returns at most 8 files of at most 16 MiB each, and nothing three folders down; a run
# of the mnist32 stage leaves more files than that, deeper, beside dense networks of up to 60 MB
# (VGG-D6). Session 13 lost a whole run's tables to an ad hoc tar that held those networks (68 MB).
# Dense networks are left out, VGG's first, until the bundle fits MAX_BUNDLE_MB (default 15).
set -u
OUT=${OUT:-/tmp/gpu_out}
limit_mb=${MAX_BUNDLE_MB:-15}
bundle=/tmp/gpu_bundle.$$.tgz
cd "$OUT" || exit 1
size_mb() { echo $(( $(stat -c %s "$1") / 1048576 )); }
tar czf "$bundle" . 2>/dev/null
if [ "$(size_mb "$bundle")" -ge "$limit_mb" ]; then
  echo "gpu_bundle.sh: over ${limit_mb} MB with every dense network: leaving VGG's out"
  tar czf "$bundle" --exclude "*vgg*.pt" . 2>/dev/null
fi
if [ "$(size_mb "$bundle")" -ge "$limit_mb" ]; then
  echo "gpu_bundle.sh: still over ${limit_mb} MB: leaving every .pt out"
  tar czf "$bundle" --exclude "*.pt" . 2>/dev/null
fi
find "$OUT" -mindepth 1 -delete
mv "$bundle" "$OUT/gpu_run.tgz"
echo "gpu_bundle.sh: $OUT/gpu_run.tgz, $(( $(stat -c %s "$OUT/gpu_run.tgz") / 1024 )) KB"
