set -x
export MINISD35_COMMIT=7579acb
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
timeout 300 python bench/attention_gpu.py --shapes large_1024,medium_attn2_1024 --temps 1.0 --variants tma,tma-fma4,tma-fma2,ws,ws-fma4 --out $OUT/attention_run1.json > $OUT/attention_run1_log.txt 2>&1
tail -25 $OUT/attention_run1_log.txt
timeout 200 python -m pytest -q -m gpu tests/test_gpu.py -k "attention or speed_options" -p no:cacheprovider 2>&1 | tail -8
ls $OUT
