# NEXT SESSION, first call (~9 min): GPU tests, the gate-scan prototype alone, then the 1.3B b16
# train step committed vs the gate-scan variant (python -P so PYTHONPATH's copy wins over cwd).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
PYTHONPATH=/tmp/site:$PWD timeout 150 python .dev/gate/gpu_check.py > $OUT/gate.txt 2>$OUT/gate.err; echo "gate rc=$?"; grep "^|" $OUT/gate.txt; tail -2 $OUT/gate.err | cut -c1-300
one() { PYTHONPATH=/tmp/site:$1 timeout $4 python -P -m mmfree_jax.bench --one="$3" > $OUT/$2.txt 2>$OUT/$2.err
  echo "$2 rc=$? $(grep RESULT $OUT/$2.txt | cut -c1-330)"; tail -1 $OUT/$2.err | cut -c1-200; }
S='{"kind":"train","arch":"mmfree","size":"1.3B","batch":16,"unroll_layers":true}'
one $PWD base_b16 "$S" 190
one $PWD/.dev/gate/variant:$PWD gate_b16 "$S" 190
