# The VDU-defaults sweep on a GPU machine: 8 workers side by side, each running its share of the
# settings in tools/vdu_sweep/configs.py (3 training seeds, 256 samples per cell, fp32 like the CPU).
# ROUND=2 runs the second round. DEADLINE (s) limits each concept's share of a worker, not the whole run.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv
OUT=${OUT:-out/vdu_sweep}; mkdir -p $OUT/cfg
python3 tools/vdu_sweep/configs.py 8 $OUT/cfg ${ROUND:-1} || exit 1
for w in 0 1 2 3 4 5 6 7; do
  (for concept in red circle; do
     mapfile -t runs < <(grep "^$concept	" $OUT/cfg/w$w.txt | cut -f2)
     [ ${#runs[@]} -gt 0 ] && timeout ${DEADLINE:-330} python3 -m benchmarks.sweep --device cuda --concept $concept \
        --seeds 3 --samples 256 --cache /tmp/vcache "${runs[@]}" 2>&1 | grep -v Loading | sed "s/^/$concept /"
   done > $OUT/w$w.log) &
done
wait
cat $OUT/w*.log
