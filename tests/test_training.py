import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covidscan.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from covidscan.config import load_config
from covidscan.training import train
from tests.conftest import SHARED_DATA, make_folder_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_training_lowers_loss_and_checkpoint_roundtrips(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=10, size=48)
    torch.manual_seed(0)
    result = train(tiny_config(train={"epochs": 6}), data, tmp_path / "run")
    losses = [h["train_loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < losses[0]  # a few batches per epoch at lr 1e-3: single epochs are noisy
    for name in ("config.yaml", "split.csv", "history.jsonl", "best.pt", "last.pt", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 6
    obj = load_checkpoint(result.best_checkpoint, task="xray")
    meta = obj["meta"]
    assert meta["class_names"] == ["covid", "pneumonia", "normal"]
    assert meta["preprocess"]["image_size"] == 64 and meta["weights_source"].startswith("none")
    assert meta["split_protocol"] == "grouped" and len(meta["data_fingerprint"]) == 64
    assert meta["epoch"] == result.best_epoch
    model, _ = model_from_checkpoint(obj)
    model2, _ = model_from_checkpoint(load_checkpoint(result.best_checkpoint))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    # the best epoch is chosen on validation loss
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]


def test_resume_equals_uninterrupted(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    cfg = tiny_config(train={"epochs": 3, "lr": 1e-3}, augment={"enabled": True})
    full = train(cfg, data, tmp_path / "full")
    part = train(cfg, data, tmp_path / "part", stop_after_epoch=1)
    assert len(part.history) == 1
    resumed = train(cfg, None, tmp_path / "part", resume=True)
    a = load_checkpoint(full.last_checkpoint)["state_dict"]
    b = load_checkpoint(resumed.last_checkpoint)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in full.history])


def test_weight_average_is_the_mean_of_the_steps_and_resumes(tmp_path, monkeypatch):
    from covidscan.training.keeper import CheckpointKeeper

    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    cfg = tiny_config(train={"epochs": 3, "lr": 1e-3, "swa_start": 2, "checkpoint_every": 1})
    seen = []  # the weights after every optimizer step, by epoch (step checkpoints are written every step)
    real = CheckpointKeeper.save_step

    def record(self, epoch, progress, model, optimizer):
        seen.append((epoch, {k: v.detach().clone() for k, v in model.named_parameters()}))
        return real(self, epoch, progress, model, optimizer)

    monkeypatch.setattr(CheckpointKeeper, "save_step", record)
    full = train(cfg, data, tmp_path / "full")
    best = load_checkpoint(full.best_checkpoint)
    steps = [w for e, w in seen if e >= 2]
    assert best["meta"]["val_metrics"]["averaged_steps"] == len(steps) > 2
    last = load_checkpoint(full.last_checkpoint)["state_dict"]
    for k in steps[0]:
        want = torch.stack([w[k] for w in steps]).mean(0)
        assert torch.allclose(best["state_dict"][k], want, atol=1e-6), k
    assert any(not torch.allclose(best["state_dict"][k], last[k]) for k in steps[0])  # not the last epoch's weights
    from covidscan.card import model_card

    assert f"average of the weights over the last {len(steps)} optimizer steps (from epoch 2 to 3)" in model_card(
        full.best_checkpoint
    )
    # BatchNorm statistics are re-estimated for the averaged weights, not those of any epoch
    stats = [k for k in last if k.endswith("running_mean")]
    assert all(not torch.allclose(best["state_dict"][k], last[k]) for k in stats[:3])
    # a run stopped after epoch 2 and resumed averages the same steps
    monkeypatch.setattr(CheckpointKeeper, "save_step", real)
    train(cfg, data, tmp_path / "part", stop_after_epoch=2)
    resumed = train(cfg, None, tmp_path / "part", resume=True)
    again = load_checkpoint(resumed.best_checkpoint)["state_dict"]
    for k in best["state_dict"]:
        assert torch.allclose(again[k], best["state_dict"][k], atol=1e-6), k


def test_early_stopping_and_frozen_backbone(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=6, size=40)
    cfg = tiny_config(train={"epochs": 20, "early_stopping": 1, "lr": 10.0}, model={"freeze_backbone": True})
    result = train(cfg, data, tmp_path / "run")
    assert len(result.history) < 20  # a huge learning rate cannot keep improving
    sd = load_checkpoint(result.last_checkpoint)["state_dict"]
    from covidscan.models import build_model

    torch.manual_seed(cfg.train.seed)
    ref, _ = build_model("efficientnet_lite0", "linear", 3, weights="none")
    key = "backbone.net._conv_stem.weight"
    assert torch.equal(sd[key], ref.state_dict()[key]), "frozen backbone weights changed"


def test_split_file_is_used(tmp_path):
    from covidscan.cli import main

    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    assert main(["split", str(data), "--out", str(tmp_path / "s.csv"), "--seed", "7"]) == 0
    result = train(tiny_config(train={"epochs": 1}), None, tmp_path / "run", split_file=tmp_path / "s.csv")
    assert (tmp_path / "run" / "split.csv").read_text() != ""
    assert result.best_epoch == 1


def test_bad_checkpoints(tmp_path, ct_dir):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a covidscan checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    result = train(tiny_config(train={"epochs": 1}, data={"task": "ct"}), ct_dir, tmp_path / "ct")
    data = result.best_checkpoint.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="task 'ct', not 'xray'"):
        load_checkpoint(result.best_checkpoint, task="xray")


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(1)}, {"task": "xray"})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": torch.zeros(1)}, {"task": "xray"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(
        REPO / "configs" / "xray_new_densenet.yaml",
        [
            "train.epochs=3",
            "model.backbone=densenet121",
            "model.head=paper",
            "model.weights=none",
            "data.image_size=128",
            "train.batch_size=16",
        ],
    )
    assert (cfg.train.epochs, cfg.model.head, cfg.data.image_size, cfg.train.lr) == (3, "paper", 128, 1e-4)
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["train.epochz=3"])
    with pytest.raises(ValueError, match="expected an integer"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ValueError, match="unknown backbone"):
        load_config(None, ["model.backbone=vgg"])
    with pytest.raises(ValueError, match="train.sampler=balanced"):
        load_config(None, ["train.strata=view"])
    with pytest.raises(ValueError, match="train.swa_start"):
        load_config(None, ["train.epochs=3", "train.swa_start=4"])
    with pytest.raises(ValueError, match="train.mixup"):
        load_config(None, ["train.mixup=-0.2"])


def test_mixup_blends_inputs_and_losses_with_one_weight_per_batch():
    import torch.nn.functional as F

    from covidscan.training.steps import train_one_epoch

    class Recorder(torch.nn.Linear):
        def forward(self, x):
            self.seen, out = x.detach().clone(), super().forward(x)
            self.out = out.detach().clone()
            return out

    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    net = Recorder(5, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the recorded logits are what the loss saw
    batch = [{"image": x, "label": y}]
    kw = dict(pre=None, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    plain = train_one_epoch(net, batch, opt, **kw)
    assert torch.equal(net.seen, x) and plain["train_loss"] == pytest.approx(F.cross_entropy(net.out, y).item())
    mixed = train_one_epoch(net, batch, opt, mixup=0.4, **kw)
    # every row is lam * x[i] + (1 - lam) * x[j] for one partner j and one lam shared by the batch
    lams, partners = [], []
    for i in range(8):
        fits = []
        for j in range(8):
            d = x[i] - x[j]
            a = 1.0 if j == i else float((net.seen[i] - x[j]) @ d / (d @ d))
            fits.append(((net.seen[i] - (a * x[i] + (1 - a) * x[j])).norm().item(), a, j))
        err, a, j = min(fits)
        assert err < 1e-5
        if j != i:
            lams.append(a)
        partners.append(j)
    assert sorted(partners) == list(range(8)) and lams  # a permutation, not the identity
    assert 0 < lams[0] < 1 and max(lams) - min(lams) < 1e-5
    lam, perm = lams[0], torch.tensor(partners)
    want = lam * F.cross_entropy(net.out, y) + (1 - lam) * F.cross_entropy(net.out, y[perm])
    assert mixed["train_loss"] == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_recipes_load(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    from covidscan.experiments.paper import PAPER_MODELS

    task, _, model = recipe.removesuffix(".yaml").partition("_")
    if task in ("xray", "ct") and model in PAPER_MODELS:
        assert (cfg.train.lr, cfg.train.epochs, cfg.data.image_size) == (1e-4, 50, 224)


def test_ledger_variants_name_loadable_recipes():
    """Every variant of the shipped ledger names a recipe that loads with its overrides (a typo'd key or a
    moved recipe fails here, not after hours of training)."""
    from covidscan.experiments.ledger import load_ledger

    variants, ensembles = load_ledger(REPO / "experiments" / "ledger.yaml")
    assert variants and ensembles
    for v in variants.values():
        load_config(REPO / v.config, v.set)


def test_cli_train_and_resume(tmp_path, capsys):
    from covidscan.cli import main

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=40)
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        "--set",
        "model.weights=none",
        "--set",
        "model.backbone=efficientnet_lite0",
        "--set",
        "data.image_size=48",
        "--set",
        "train.epochs=1",
    ]
    assert main(args) == 0
    assert "best epoch 1" in capsys.readouterr().out
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.image_size == 48
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "last.pt" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "xray").is_dir(), reason="../shared/data is not beside this checkout")
@pytest.mark.parametrize(
    "recipe", ["xray_densenet", "xray_inception_v3", "xray_new_densenet", "ct_densenet", "ct_inception_v3", "ct_new_densenet"]
)
def test_paper_recipes_one_epoch_on_shared_subset(recipe, tmp_path):
    """Each of the paper's six recipes trains one epoch on a real subset (small images, few batches)."""
    task = recipe.split("_")[0]
    cfg = load_config(
        REPO / "configs" / f"{recipe}.yaml",
        [
            "train.epochs=1",
            "train.max_batches=2",
            "train.batch_size=4",
            "data.image_size=96",
            "model.weights=none" if "densenet" in recipe else "model.weights=imagenet",
        ],
    )
    import csv

    rows = list(csv.DictReader(open(SHARED_DATA / task / "manifest.csv")))
    keep = [r for i, r in enumerate(rows) if i % 25 == 0]
    for r in keep:
        r["file"] = str(SHARED_DATA / task / r["file"])
    sub = tmp_path / "subset.csv"
    with open(sub, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    result = train(cfg, sub, tmp_path / "run")
    assert result.best_checkpoint.is_file() and result.history[0]["val_loss"] > 0
    meta = load_checkpoint(result.best_checkpoint, task=task)["meta"]
    assert meta["weights_source"].startswith("none" if "densenet" in recipe else "imagenet")


def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) trains and agrees with single-process training."""
    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    common = [
        "--data",
        str(data),
        "--quiet",
        "--set",
        "model.weights=none",
        "--set",
        "model.backbone=efficientnet_lite0",
        "--set",
        "data.image_size=48",
        "--set",
        "train.epochs=2",
        "--set",
        "augment.enabled=false",
        "--set",
        "train.batch_size=4",
        "--set",
        "data.cache_dir=",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "covidscan",
        "train",
        "--out",
        str(tmp_path / "ddp"),
        *common,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert main_single(tmp_path, common) == 0
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "history.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    assert len(ddp) == len(one) == 2
    # same data, same initialisation: validation loss after 2 epochs agrees within tolerance
    assert abs(ddp[-1]["val_loss"] - one[-1]["val_loss"]) < 0.35
    a = load_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]["head.fc.weight"]
    b = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]["head.fc.weight"]
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.5


def _finish_worker(rank: int, port: int, out: str) -> None:
    import time

    import torch.distributed as dist

    from covidscan.runtime import RunContext

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    times = {}
    for k in range(2):  # two runs in one process, as `loso` and `train-ensemble` do
        run = RunContext.from_env("cpu")
        if rank == 0:
            time.sleep(1.0)  # rank 0 writes the run's last files while rank 1 is already done
        times[f"ready{k}"] = time.time()
        run.finish()
        times[f"left{k}"] = time.time()
    Path(out, f"rank{rank}.json").write_text(json.dumps({**times, "initialized": dist.is_initialized()}))


def test_distributed_runs_end_with_every_process_waiting(tmp_path):
    """RunContext.finish: no process leaves a run before rank 0 is done with it (a gloo peer that exits
    early makes the others abort), and the process group carries over to the next run in the process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_finish_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for k in range(2):
        assert ranks[1][f"left{k}"] >= ranks[0][f"ready{k}"]  # rank 1 waited until rank 0 was done
    assert all(r["initialized"] for r in ranks)  # still there for the next run; ended at process exit


def test_ddp_train_ensemble_runs_several_trainings_in_one_torchrun_job(tmp_path):
    """Under torchrun, `train-ensemble` trains its members one after another in the same processes."""
    data = make_folder_dataset(tmp_path / "d", per_class=6, size=40)
    cfg = "data: {task: xray, image_size: 48}\naugment: {enabled: false}\nmodel: {backbone: efficientnet_lite0, weights: none}\ntrain: {epochs: 1, batch_size: 4}\n"
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(cfg)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "covidscan",
        "train-ensemble", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
        "--data", str(data), "--out", str(tmp_path / "ens"), "--quiet", "--set", "data.cache_dir=",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    meta = load_checkpoint(tmp_path / "ens" / "ensemble.pt")["meta"]
    assert len(meta["members"]) == 2


def main_single(tmp_path, common) -> int:
    from covidscan.cli import main

    # the single process sees the same effective batch (2 processes x 4 = 8)
    return main(
        ["train", "--out", str(tmp_path / "one"), *[c.replace("train.batch_size=4", "train.batch_size=8") for c in common]]
    )


def test_frozen_feature_cache_equals_full_loop(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    base = dict(model={"freeze_backbone": True, "head": "paper"}, train={"epochs": 2, "batch_size": 4})
    fast = train(tiny_config(**base), data, tmp_path / "fast")
    slow_cfg = tiny_config(model=base["model"], train={**base["train"], "feature_cache": False})
    slow = train(slow_cfg, data, tmp_path / "slow")
    a = load_checkpoint(fast.last_checkpoint)["state_dict"]
    b = load_checkpoint(slow.last_checkpoint)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k
    assert [h["val_loss"] for h in fast.history] == pytest.approx([h["val_loss"] for h in slow.history], abs=1e-4)


def test_tensorboard_event_files_hold_the_history(tmp_path, xray_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from covidscan.training import train
    from tests.conftest import tiny_config

    res = train(tiny_config(train={"epochs": 2, "log": "tensorboard"}), xray_dir, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    val_loss = [(e.step, e.value) for e in acc.Scalars("val/loss")]
    assert [s for s, _ in val_loss] == [1, 2]
    assert [v for _, v in val_loss] == pytest.approx([h["val_loss"] for h in res.history], rel=1e-6)
    assert "train/loss" in acc.Tags()["scalars"]
    steps = [e.step for e in acc.Scalars("step/lr")]  # per optimizer step, both epochs, with the learning rate
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("step/lr"))
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, once
    # curves.png: whole epochs on the axis and the kept epoch marked (its legend entry)
    import matplotlib.image as mpimg

    assert mpimg.imread(tmp_path / "run" / "curves.png").shape[1] > 600


def test_tensorboard_missing_is_one_error_before_anything_is_written(tmp_path, xray_dir, monkeypatch):
    import sys

    from covidscan.errors import ConfigError
    from covidscan.training import train
    from tests.conftest import tiny_config

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(tiny_config(train={"log": "tensorboard"}), xray_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_killed_mid_epoch_resumes_from_step_checkpoint_to_same_weights(tmp_path):
    """A run killed (SIGKILL) in the middle of an epoch resumes from step.pt and ends bit-identical."""
    import signal
    import time

    data = make_folder_dataset(tmp_path / "d", per_class=12, size=48)
    sets = [
        "model.weights=none", "model.backbone=efficientnet_lite0", "data.image_size=48", "train.epochs=2",
        "train.batch_size=2", "train.lr=1e-3", "augment.enabled=true", "train.checkpoint_every=2", "data.cache_dir=",
    ]  # fmt: skip
    args = ["--data", str(data), "--quiet", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread count for all three runs: same float sums
    cli = [sys.executable, "-m", "covidscan", "train"]
    subprocess.run([*cli, "--out", str(tmp_path / "full"), *args], env=env, check=True, timeout=600)
    assert not (tmp_path / "full" / "step.pt").exists()  # removed once its epoch is complete

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cli, "--out", str(out), *args], env=env)
    try:
        deadline = time.monotonic() + 300
        while not (out / "step.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = load_checkpoint(out / "step.pt")["train_state"]
    assert not (out / "last.pt").exists() and step["in_epoch"]["epoch"] == 1  # killed inside epoch 1
    assert step["in_epoch"]["progress"]["step"] % 2 == 0 and step["in_epoch"]["progress"]["step"] > 0

    subprocess.run([*cli, "--out", str(out), "--resume", "--quiet"], env=env, check=True, timeout=600)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(out / "last.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ha = [json.loads(x) for x in (tmp_path / "full" / "history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["train_loss"] for h in hb] == pytest.approx([h["train_loss"] for h in ha], rel=1e-6)


def test_processes_and_workers_share_an_epoch_without_overlap_or_loss():
    """Every training position is loaded exactly once per epoch across 3 processes x 2 workers, and
    batch k of all processes together is batch k of one process with 3x the batch size."""
    from torch.utils.data import DataLoader, Dataset

    from covidscan.training.data import rank_share

    class Positions(Dataset):
        def __len__(self):
            return 23

        def __getitem__(self, k):
            return k

    order = torch.randperm(23, generator=torch.Generator().manual_seed(5)).tolist()
    seen, first_batches = [], []
    for rank in range(3):
        share = rank_share(order, rank, 3)
        batches = list(DataLoader(Positions(), batch_size=2, sampler=share, num_workers=2))
        seen += [int(v) for b in batches for v in b]
        first_batches.append(batches[0].tolist())
    assert sorted(seen) == list(range(23))
    assert sorted(sum(first_batches, [])) == sorted(order[:6])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_torchrun_c10d_agree_with_one_process(tmp_path):
    """Two torchrun "nodes" of one process each (c10d rendezvous on localhost, gloo) train on a packed
    dataset and end with the weights of one process with twice the batch size."""
    from covidscan.cli import main

    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    assert main(["pack", str(data), "--out", str(tmp_path / "p"), "--size", "48", "--quiet"]) == 0
    sets = [
        "model.weights=none", "model.backbone=efficientnet_lite0", "data.image_size=48", "train.epochs=2",
        "model.freeze_backbone=true", "model.dropout=0", "augment.enabled=true", "train.lr=1e-2", "data.cache_dir=",
    ]  # fmt: skip
    args = ["--data", str(tmp_path / "p"), "--quiet", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    node = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=covidscan-test", "-m", "covidscan", "train",
        "--out", str(tmp_path / "two"), *args, "--set", "train.batch_size=4",
    ]  # fmt: skip
    nodes = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum("checkpoint:" in o for o, _ in outs) == 1  # two ranks: only rank 0 reports
    one = [sys.executable, "-m", "covidscan", "train", "--out", str(tmp_path / "one"), *args, "--set", "train.batch_size=8"]
    subprocess.run(one, env=env, check=True, capture_output=True, timeout=600)
    a = load_checkpoint(tmp_path / "two" / "last.pt")["state_dict"]["head.fc.weight"]
    b = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]["head.fc.weight"]
    torch.manual_seed(0)
    from covidscan.models import build_model

    init = build_model("efficientnet_lite0", "linear", 3, weights="none", dropout=0.0)[0].state_dict()["head.fc.weight"]
    assert (a - init).abs().max() > 1e-3  # it trained
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_resume_with_other_data_or_out_a_file_is_one_line(tmp_path, capsys):
    from covidscan.cli import main
    from tests.conftest import make_folder_dataset

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=32)
    other = make_folder_dataset(tmp_path / "o", per_class=7, size=32, seed=3)
    base = ["train", "--quiet", "--set", "model.weights=none", "--set", "model.backbone=efficientnet_lite0",
            "--set", "data.image_size=32", "--set", "train.epochs=1"]  # fmt: skip
    assert main([*base, "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main([*base, "--data", str(other), "--out", str(tmp_path / "run"), "--resume", "--set", "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other data than the run was made from" in err[0] and "added" in err[0]
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # nothing trained, nothing written
    (tmp_path / "afile").write_text("x")
    assert main([*base, "--data", str(data), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err


def test_ledger_run_one_seed(tmp_path, monkeypatch):
    """`covidscan ledger run NAME_seedS` trains that seed's run only; an unknown name is a one-line error."""
    import covidscan.experiments.loso as loso_mod
    from covidscan.cli import main

    ledger = tmp_path / "ledger.yaml"
    ledger.write_text(
        "yardsticks: {y: {data: [a, b], sources: []}}\n"
        f"variants: {{v: {{config: {REPO / 'configs' / 'ct_generalise_finetune.yaml'}, yardstick: y, seeds: [0, 1, 2]}}}}\n"
    )
    calls = []
    monkeypatch.setattr(loso_mod, "leave_one_source_out", lambda cfg, data, out, **kw: calls.append((cfg.train.seed, out.name)))
    opts = ["--ledger", str(ledger), "--data-root", str(tmp_path), "--out", str(tmp_path / "exp"), "--quiet"]
    assert main(["ledger", "run", "v_seed1", *opts]) == 0
    assert calls == [(1, "v_seed1")]
    calls.clear()
    assert main(["ledger", "run", "v", *opts]) == 0
    assert calls == [(0, "v_seed0"), (1, "v_seed1"), (2, "v_seed2")]
    assert main(["ledger", "run", "v_seed7", *opts]) == 2 and len(calls) == 3


def test_ledger_yardstick_field_holds_out_patients(tmp_path, monkeypatch):
    """A yardstick with ``field: patient_id`` (ct_patients) trains folds that hold out those patients; one without
    holds out sources."""
    import covidscan.experiments.loso as loso_mod
    from covidscan.cli import main

    ledger = tmp_path / "ledger.yaml"
    cfg = REPO / "configs" / "ct_generalise_finetune.yaml"
    ledger.write_text(
        "yardsticks: {p: {data: [a], sources: [p001, cap001], field: patient_id}, s: {data: [a], sources: []}}\n"
        f"variants: {{v: {{config: {cfg}, yardstick: p}}, w: {{config: {cfg}, yardstick: s}}}}\n"
    )
    calls = []
    monkeypatch.setattr(loso_mod, "leave_one_source_out", lambda cfg, data, out, **kw: calls.append((out.name, kw)))
    opts = ["--ledger", str(ledger), "--data-root", str(tmp_path), "--out", str(tmp_path / "exp"), "--quiet"]
    assert main(["ledger", "run", "v", "w", *opts]) == 0
    assert [(n, kw["field"], kw["sources"]) for n, kw in calls] == [
        ("v", "patient_id", ["p001", "cap001"]),
        ("w", "source", None),
    ]
