"""GenLabelDataModule under a real two-process DDP Trainer (CPU, gloo): each rank's shard, device and len
come from the trainer, the loader's state goes into Lightning's checkpoints, and ``fit(ckpt_path=...)``
from a mid-epoch checkpoint trains on exactly the batches the uninterrupted run did."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

N, K, B = 22, 3, 2


class Memory(torch.utils.data.Dataset):
    def __init__(self):
        rng = np.random.default_rng(1)
        self.images = torch.from_numpy(rng.integers(0, 256, (N, 8, 8, 3), dtype=np.uint8))
        self.num_classes = K

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.images[i], i % K, i


def _run(rank, world, out, resume_from):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastgenlabel import soft_target_cross_entropy
    from fastgenlabel.lightning import GenLabelDataModule
    from fastgenlabel.loader import LoaderConfig

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))  # processes made outside

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, K)
            self.seen = []

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch  # the loader already put it on the trainer's device

        def training_step(self, batch, i):
            self.seen.append([self.current_epoch, i, batch.indices.tolist(), batch.pairs.perm.tolist(),
                              batch.targets.flatten().tolist()])
            images, targets = batch
            return soft_target_cross_entropy(self.fc(images.flatten(1)), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = GenLabelDataModule(LoaderConfig(backend="torch", batch_size=B, image_size=8, seed=4, alpha=1.0,
                                         lam_mode="sample", last_batch="partial", num_classes=K), dataset=Memory())
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1,
                           filename="{epoch}-{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=2, logger=False,
                         default_root_dir=out, enable_checkpointing=not resume_from,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt] if not resume_from
                         else [], num_sanity_val_steps=0)
    net = Net()
    trainer.fit(net, datamodule=dm, ckpt_path=resume_from)
    loader = dm.train_dataloader()
    info = {"seen": net.seen, "len": len(loader), "shard": loader.config.shard_id,
            "shards": loader.config.num_shards, "device": str(loader.device)}
    name = "resumed" if resume_from else "whole"
    (out / f"{name}{rank}.json").write_text(json.dumps(info))


def test_without_lightning_the_core_imports_and_the_module_says_what_to_install():
    code = ("import sys; sys.modules['lightning'] = None\n"  # as if not installed
            "import fastgenlabel, fastgenlabel.loader\n"
            "try:\n    import fastgenlabel.lightning\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fastgenlabel.lightning needs lightning: pip install" in out


@pytest.mark.slow
def test_two_process_ddp_trainer_resumes_mid_epoch_exactly(tmp_path):
    pytest.importorskip("lightning")
    from gloo import run_ranks

    run_ranks(_run, tmp_path, None, timeout=300.0)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    saved = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(saved) == 1 and (saved[0]["epoch"], saved[0]["batch"]) == (0, 4)
    run_ranks(_run, tmp_path, str(ckpt), timeout=300.0)
    per_shard = -(-N // 2)
    for rank in range(2):
        whole = json.loads((tmp_path / f"whole{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"resumed{rank}.json").read_text())
        assert whole["len"] == resumed["len"] == -(-per_shard // B)  # the trainer's world size shards it
        assert (whole["shard"], whole["shards"], whole["device"]) == (rank, 2, "cpu")
        assert len(whole["seen"]) == 2 * whole["len"]
        assert resumed["seen"] == whole["seen"][4:]  # epochs, batch indices, samples, pairs, targets
    a, b = (json.loads((tmp_path / f"whole{r}.json").read_text())["seen"] for r in range(2))
    assert [s[2] for s in a] != [s[2] for s in b]  # each rank its own shard
