#!/bin/bash
# temporary device probe (not committed)
export PATH=/opt/torch/.venv/bin:$PATH PYTHONUNBUFFERED=1
D="python3 bench/distributed.py --warmup 5 --steps 20 --timeout 150"
s() { python3 -c "
import json,sys
d=json.load(open(sys.argv[1]))
print(' | '.join(f\"{n} GPU {r['tokens_per_sec']:,.0f} tok/s {r['step_s']*1e3:.1f} ms peak {r['peak_memory_gb_rank0']:.1f} GB ops {r['graph_ops']}\" for n,r in d['runs'].items()), '| speedup %.2f' % d['runs']['2']['speedup'])" $1; }
for i in a b; do echo "== weak 32 $i $(date -u +%H%M)"; $D --gpus 1,2 --batch-per-gpu 32 --out $OUT/weak32-$i.json >/dev/null 2>&1; s $OUT/weak32-$i.json; done
echo "== strong 16 $(date -u +%H%M)"; $D --gpus 1,2 --batch 16 --out $OUT/strong16.json >/dev/null 2>&1; s $OUT/strong16.json
