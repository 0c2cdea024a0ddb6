python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
D=280
S() { python3 tools/recipe_sweep/sweep.py "$@" --deadline $D >> $OUT/all.log 2>&1 & }
S lr5e3_3k --steps 3000 --lr 5e-3
S lr3e3_midt_3k --steps 3000 --lr 3e-3 --tmode logitnormal
S lr5e3_midt_3k --steps 3000 --lr 5e-3 --tmode logitnormal
S lr3e3_2500 --steps 2500 --lr 3e-3
S lr1e2_3k --steps 3000 --lr 1e-2
S lr3e3_16_3k --latent 16 --ch 32,64,128 --steps 3000 --lr 3e-3
wait
cat $OUT/results.jsonl
