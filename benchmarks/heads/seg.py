# Dev check of the segmenter on phantoms (see benchmarks/results/heads_check.md for commands and figures).
#   python benchmarks/heads/seg.py PRESET STEPS HEAD N_TRAIN LR PHANTOM_DIR   (PHANTOM_DIR/train, PHANTOM_DIR/test)
# Trains from scratch on every window of the sagittal series and scores 12 unseen cases through
# ModelBundle.segment, the node's sliding windows.
import sys, time, logging, numpy as np, torch
torch.set_num_threads(2)
from training.cli import read_records
from training.config import load_config
from training.finetune import finetune_segmenter, make_bundle
from inference.labels import KNEE_STRUCTURES
logging.basicConfig(level=logging.WARNING, format="%(message)s")
cfgname, steps, head, n, lr, ph = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
cfg = load_config(cfgname).with_overrides(model={"seg_head": head},
                                          segment={"steps": steps, "val_fraction": 0.0, "lr": lr, "batch_size": 2})
train = read_records([f"phantom:{ph}/train"])[:n]; test = read_records([f"phantom:{ph}/test"])[:12]
torch.manual_seed(0)
t = time.time()
res = finetune_segmenter(cfg, train, plane="sagittal", pretrained=None, from_scratch=True, progress=False)
print("train s", round(time.time() - t), flush=True)
bundle = make_bundle(cfg, segmenter=res, name="heads-check", version="1")
for name, recs in (("train", train[:4]), ("test", test)):
    d = np.zeros((len(recs), 11))
    for i, r in enumerate(recs):
        src = r.planes["sagittal"]; pred = bundle.segment(src.load()); mask = src.load_mask()
        for s in KNEE_STRUCTURES:
            a, b = pred == s.index, mask == s.index
            d[i, s.index - 1] = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
    print(name, "mean", round(d.mean(), 3), {s.key: round(float(d[:, s.index - 1].mean()), 2) for s in KNEE_STRUCTURES}, flush=True)
