"""train.logger: TensorBoard, Weights & Biases (offline, for real) or none, and the old
train.tensorboard switch."""

import json
import math
import sys
from pathlib import Path

import pytest

from pixeldiffusion.cli import main
from pixeldiffusion.config import load_config
from pixeldiffusion.errors import ConfigError
from pixeldiffusion.loggers import NullLogger, TensorBoardLogger, make_logger
from pixeldiffusion.train import train


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte ":W&B" header, then the LevelDB log
    format (32 KiB blocks of chunks: crc32, little-endian length, type 1 full / 2 first /
    3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, pieces = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_the_logged_loss_config_and_run_dir(tmp_path, tiny_args,
                                                                    monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    cfg = load_config(None, [*tiny_args, "--train.logger", "wandb",
                             "--train.wandb_project", "pd-test", "--train.warmup_steps", "0"])
    train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(path))
    history = [(r.history.step.num, {_key(i): json.loads(i.value_json) for i in r.history.item})
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [step for step, _ in history] == [2, 4]  # train.log_every 2, train.steps 4
    for _, scalars in history:
        assert math.isfinite(scalars["train/loss"]) and 0 < scalars["train/loss"] < 10
        assert scalars["train/lr"] == pytest.approx(cfg.train.lr)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "pd-test" and run.display_name == "run"
    config = {_key(u): json.loads(u.value_json) for u in run.config.update}
    assert config["train"] == cfg.to_dict()["train"] and config["model"]["channels"] == 8
    assert config["run_dir"] == str((tmp_path / "run").resolve())
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_missing_fails_at_startup_naming_pip_install(tmp_path, tiny_args, monkeypatch,
                                                            capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run = tmp_path / "run"
    assert main(["train", "-e", str(run), *tiny_args, "--train.logger", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixeldiffusion: error: config key 'train.logger' is wandb")
    assert "pip install wandb" in err and "Traceback" not in err
    assert not run.exists()  # nothing was built or written


def test_tensorboard_logger_writes_each_scalar_at_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = make_logger("tensorboard", tmp_path, config={})
    assert isinstance(logger, TensorBoardLogger)
    logger.log_scalars({"train/loss": 0.5, "train/lr": 1e-3}, 2)
    logger.log_scalars({"train/loss": 0.25}, 4)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(2, 0.5), (4, 0.25)]
    assert [e.step for e in events.Scalars("train/lr")] == [2]


def test_logger_none_writes_nothing(tmp_path, tiny_args):
    cfg = load_config(None, [*tiny_args, "--train.logger", "none"])
    assert isinstance(make_logger("none", tmp_path, config={}), NullLogger)
    train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml"]


def test_train_tensorboard_is_the_old_spelling_of_train_logger(tmp_path):
    assert load_config().train.logger == "tensorboard"  # the default
    assert load_config(None, ["--train.tensorboard", "false"]).train.logger == "none"
    assert load_config(None, ["--train.logger", "wandb", "--train.tensorboard", "true"]) \
        .train.logger == "tensorboard"
    old = tmp_path / "old.yaml"  # a config.yaml written before train.logger existed
    old.write_text("train:\n  tensorboard: false\n  steps: 7\n")
    cfg = load_config(old)
    assert cfg.train.logger == "none" and cfg.train.steps == 7
    assert "tensorboard" not in cfg.to_dict()["train"]
    with pytest.raises(ConfigError, match="'train.tensorboard' needs true or false"):
        load_config(None, ["--train.tensorboard", "maybe"])
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        load_config(None, ["--train.logger", "tensorbaord"])
