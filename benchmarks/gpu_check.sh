#!/usr/bin/env bash
# One GPU check, under 5 minutes, no network: benchmarks/compare.py's fine-tune and frozen modes on
# synthetic CIFAR-shaped data, at 32 px and 224 px, ours in fp32 and bf16-mixed (the reference loop
# is always fp32), random-init MobileNetV2. Needs torch, torchvision and lightning, not this repo's
# install:
#   bash benchmarks/gpu_check.sh
# A smoke run of the script itself on a CPU, with tiny data: DEVICE=cpu SMOKE=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

device=${DEVICE:-cuda}
if [ "${SMOKE:-0}" = 1 ]; then small=(500 100); large=(100 50); else small=(20000 2000); large=(5000 1000); fi
python -c "import torch, platform; print('device:', torch.cuda.get_device_name(0) if '$device' == 'cuda' else platform.processor() or 'cpu', '| torch', torch.__version__)"
printf '\n| size | precision (ours) | mode | reference images/s | ours images/s | images/s ratio | end-to-end ratio | ref acc | our acc |\n|---|---|---|---|---|---|---|---|---|\n'
for size in 32 224; do
  if [ "$size" = 32 ]; then data=(--synthetic-size "${small[@]}"); else data=(--synthetic-size "${large[@]}" --image-size 224); fi
  for precision in 32-true bf16-mixed; do
    python benchmarks/compare.py --synthetic "${data[@]}" --weights none --epochs 2 --device "$device" \
      --precision "$precision" 2>/dev/null | awk -v size="$size" -v precision="$precision" '
        /^(finetune|frozen):$/ { mode = substr($0, 1, length($0) - 1) }
        /^reference / { ref_ips = $2; ref_acc = $4 }
        /^ours / { our_ips = $2; our_acc = $4 }
        /^ratio / { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", size, precision, mode, ref_ips, our_ips, $3, $5, ref_acc, our_acc }'
  done
done
