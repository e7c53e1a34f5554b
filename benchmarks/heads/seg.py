# Dev check of the heads on phantoms (see benchmarks/results/heads_check.md for commands and figures).
import sys, time, logging, numpy as np, torch
torch.set_num_threads(2)
from training.cli import read_records
from training.config import load_config
from training.finetune import finetune_segmenter
from inference.preprocess import segment_series
from inference.labels import KNEE_STRUCTURES
logging.basicConfig(level=logging.INFO, format="%(message)s")
cfgname, steps, head, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cfg = load_config(cfgname)
cfg = cfg.model_copy(update={"segment": cfg.segment.model_copy(update={"steps": steps, "val_fraction": 0.0}),
    "model": cfg.model.model_copy(update={"fields": {**cfg.model.fields, "seg_head": head}})})
train = read_records(["phantom:" + sys.argv[-1] + "/train"])[:n]; test = read_records(["phantom:" + sys.argv[-1] + "/test"])[:12]
t=time.time()
res = finetune_segmenter(cfg, train, plane="sagittal", pretrained=None, from_scratch=True, progress=False)
print("train s", time.time()-t, flush=True)
m = res.model.eval()
pp = __import__("training.pretrain", fromlist=["x"]).preprocess_config(cfg)
for name, recs in (("train", train[:8]), ("test", test)):
    d = np.zeros((len(recs), 11))
    for i, r in enumerate(recs):
        src = r.planes["sagittal"]; vol = src.load(); mask = src.load_mask()
        with torch.no_grad():
            pred = segment_series(lambda x: m(torch.from_numpy(x)[None])[0], vol, pp)
        for s in KNEE_STRUCTURES:
            a = pred == s.index; b = mask == s.index
            d[i, s.index-1] = 2*(a&b).sum()/max(1,(a.sum()+b.sum()))
    print(name, "mean", round(d.mean(),3), {s.key: round(d[:, s.index-1].mean(),2) for s in KNEE_STRUCTURES}, flush=True)
