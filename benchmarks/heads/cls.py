# Dev check of the heads on phantoms (see benchmarks/results/heads_check.md for commands and figures).
import sys, time, logging, numpy as np, torch
torch.set_num_threads(2)
from pathlib import Path
from training.cli import read_records
from training.config import load_config
from training.finetune import finetune_classifier, roc_auc
from training.data import classification_dataset
from training.pretrain import preprocess_config
logging.basicConfig(level=logging.INFO, format="%(message)s")
cfgname, steps, ehr = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "ehr"
cfg = load_config(cfgname)
cfg = cfg.model_copy(update={"classify": cfg.classify.model_copy(update={"steps": steps, "val_fraction": 0.0})})
train = read_records(["phantom:" + sys.argv[-1] + "/train"]); test = read_records(["phantom:" + sys.argv[-1] + "/test"])
t=time.time()
res = finetune_classifier(cfg, train, ["sagittal","coronal","axial"], use_ehr=ehr, pretrained=None, from_scratch=True, progress=False)
print("train s", time.time()-t)
from torch.utils.data import DataLoader
from training.finetune import predict_classifier
for name, recs in (("train", train), ("test", test)):
    ds = classification_dataset(recs, ["sagittal","coronal","axial"], preprocess_config(cfg))
    p, y, _ = predict_classifier(res.model, DataLoader(ds, batch_size=4), ["sagittal","coronal","axial"], ehr, torch.device("cpu"))
    aucs = {k: roc_auc(y[:,i], p[:,i]) for i,k in enumerate(res.label_keys)}
    print(name, {k: None if v is None else round(v,2) for k,v in aucs.items()}, "pos", y.sum(0).astype(int).tolist())
