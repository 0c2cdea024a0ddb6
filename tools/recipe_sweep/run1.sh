set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__, torch.cuda.is_available())"
D=${DEADLINE:-400}
S() { python3 tools/recipe_sweep/sweep.py "$@" --deadline $D >> $OUT/all.log 2>&1 & }
S base2k --steps 2000
S lr3e3_3k --steps 3000 --lr 3e-3
S midt_3k --steps 3000 --tmode logitnormal
S vpred_3k --steps 3000 --pred v_prediction
S midt_lr2_3k --steps 3000 --lr 2e-3 --tmode logitnormal
S small8_12k --steps 12000 --ch 32,64 --lr 2e-3 --evals 3000,6000
S long8_24k --steps 24000 --evals 3000,6000,12000
S long16_24k --latent 16 --ch 32,64,128 --steps 24000 --evals 3000,6000,12000
wait
cat $OUT/results.jsonl
