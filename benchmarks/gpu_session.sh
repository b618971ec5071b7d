#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (this project's device tool), in two steps:
#
#   bash benchmarks/gpu_session.sh prepare   # here: .gpu/ in ../shared's layout with a real CIFAR-10 subset
#                                            # (13,000 train and 5,000 test PNGs, the first of each class in the
#                                            # official order), the real MobileNetV2 weights of ../shared and the
#                                            # wheels the GPU image lacks; ~64 MB, just under the 64 MiB carried
#   bash benchmarks/gpu_session.sh run       # there, with carry [".gpu"]: configs/recipes/finetune_gpu.yaml on
#                                            # that subset (the MobileNetV2 weights: ResNet18's cannot be fetched
#                                            # there), then benchmarks/gpu_check.sh; everything lands in $OUT
#   bash benchmarks/gpu_session.sh peers     # a second call, after run, if time is left: benchmarks/peers.py
#                                            # on the GPU (--accelerator cuda), if fastai is installed there
#
# .gpu/ is for the device tool only (add "/.gpu/" to .git/info/exclude); it is never committed.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  python3 - <<'PY' || exit 1
import shutil
from pathlib import Path
source, target = Path("../shared/data/cifar10"), Path(".gpu/data/cifar10")
for split, per_class in (("train", 1300), ("test", 500)):
    for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
        (target / split / folder.name).mkdir(parents=True, exist_ok=True)
        for file in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(file, target / split / folder.name / file.name)
PY
  mkdir -p .gpu/weights && cp ../shared/weights/mobilenet_v2_imagenet_features.pth .gpu/weights/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  du -sh .gpu ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python && export PATH=/tmp/bin:$PATH  # gpu_check.sh says python
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, torchvision, lightning, torchmetrics; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
  start=$(date +%s)
  timeout 270 python3 -m transfer_lightning fit --config configs/recipes/finetune_gpu.yaml \
    --config configs/overrides/shared_mobilenet_v2.yaml --model.weights .gpu/weights/mobilenet_v2_imagenet_features.pth \
    --data.data_dir .gpu/data/cifar10 --data.val_size 1000 --data.cache_dir /tmp/cache --interpretation.enabled false \
    > "$OUT/recipe.log" 2>&1
  echo "recipe exit $? in $(($(date +%s) - start)) s" | tee -a "$OUT/recipe.log"
  tail -40 "$OUT/recipe.log"
  python3 -m transfer_lightning report lightning_logs --plot "$OUT/recipe_curves.png" | tee "$OUT/report.md"
  start=$(date +%s)
  timeout 280 bash benchmarks/gpu_check.sh > "$OUT/gpu_check.log" 2>&1
  echo "gpu_check exit $? in $(($(date +%s) - start)) s" | tee -a "$OUT/gpu_check.log"
  cat "$OUT/gpu_check.log" ;;
peers)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  if python3 -c "import fastai" 2>/dev/null; then  # the bench extra; the GPU image may not have it
    timeout 300 python3 benchmarks/peers.py --accelerator cuda --shared .gpu --train-per-class 500 --test-per-class 200 \
      --epochs 3 --image-size 96 > "$OUT/peers.log" 2>&1
    echo "peers exit $?" | tee -a "$OUT/peers.log"
    grep -E "^\||^against|^peers" "$OUT/peers.log"
  else
    echo "fastai is not installed on this machine: benchmarks/peers.py skipped" | tee "$OUT/peers.log"
  fi ;;
*) echo "usage: bash benchmarks/gpu_session.sh prepare|run|peers" >&2; exit 2 ;;
esac
