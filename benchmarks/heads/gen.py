# Dev check of the heads on phantoms (see benchmarks/results/heads_check.md for commands and figures).
import sys, time
from pathlib import Path
from training.demo import make_phantom_set, training_sites, HELD_OUT_SITE
t=time.time()
make_phantom_set(Path(sys.argv[1] + '/train'), 'knee', range(64), training_sites(), 0, 64, 2)
print('train', time.time()-t, flush=True)
make_phantom_set(Path(sys.argv[1] + '/test'), 'knee', range(1000,1040), [HELD_OUT_SITE], 0, 64, 2)
print('test', time.time()-t, flush=True)
