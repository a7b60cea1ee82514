"""Run under a launcher (torchrun or accelerate launch) by tests/test_distributed.py; not a test.

    distributed_worker.py OUT_DIR [--section.key value ...]

Each process trains the same config three ways through the real ``train()``: 6 steps straight
(OUT_DIR/a), then 3 steps and a resume to 6 (OUT_DIR/b). It records, per rank, what it could not
otherwise show from outside: its final in-memory raw and EMA weights, the sum of every batch it
trained on, and every file-writing call it made. Results go to OUT_DIR/rank<r>-*.
"""

import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixeldiffusion.config import load_config

train_module = importlib.import_module("pixeldiffusion.train")
run_module = importlib.import_module("pixeldiffusion.run")

out = Path(sys.argv[1])
cfg_args = sys.argv[2:]
seen: dict = {"writes": [], "batches": []}

formulations_module = importlib.import_module("pixeldiffusion.formulations")
real_ema_update, real_loss = train_module.ema_update, formulations_module.training_loss


def ema_update(ema, model, *args, **kwargs):
    real_ema_update(ema, model, *args, **kwargs)
    seen["ema"], seen["model"] = ema, model


def training_loss(model, x0, *args, **kwargs):
    seen["batches"].append(float(x0.double().sum()))
    return real_loss(model, x0, *args, **kwargs)


def spy(module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen["writes"].append(name)
        return real(*args, **kwargs)
    return wrapper


train_module.ema_update, formulations_module.training_loss = ema_update, training_loss
for module, name in ((train_module, "save_checkpoint"), (train_module, "save_config"),
                     (run_module, "save_grid")):
    setattr(module, name, spy(module, name))


def run(tag, steps, resume=None):
    seen["batches"] = []
    cfg = load_config(None, [*cfg_args, "--train.steps", str(steps)])
    run_module.train(cfg, out / tag[0], resume=resume, progress=False,
                     log=lambda message: seen["writes"].append("log"))
    rank = torch.distributed.get_rank()
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in seen["model"].state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous()
                for k, v in seen["ema"].state_dict().items()}
    save_file(tensors, out / f"rank{rank}-{tag}.safetensors")
    return seen["batches"]


batches = {"a": run("a", 6), "b3": run("b3", 3), "b6": run("b6", 6, resume="auto")}
rank = torch.distributed.get_rank()
(out / f"rank{rank}.json").write_text(json.dumps(
    {"world_size": torch.distributed.get_world_size(), "batches": batches,
     "writes": seen["writes"]}))
