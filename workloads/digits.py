"""ResNet-style CNN on scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download).

The train/test split is stratified and fixed by seed; quality = test accuracy. `image_size` > 8 upsamples
the images (bilinear) to make GPU-scale presets heavier without new data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from membench.errors import ConfigError
from membench.workloads.base import Quality, Workload


@dataclass
class DigitsConfig:
    preset: str = "digits_cnn"
    width: int = 32
    num_blocks: int = 4  # residual blocks; the second half runs at 2x width, half resolution
    image_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    lr_warmup_steps: int = 10  # linear LR warm-up, then constant
    batch_size: int = 64
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        for key in ("width", "num_blocks", "image_size", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"workload.{key}={getattr(self, key)}: must be > 0")
        if self.image_size < 8:
            raise ConfigError(f"workload.image_size={self.image_size}: must be >= 8 (native digits are 8x8)")
        if not 0.0 < self.test_fraction < 0.9:
            raise ConfigError(f"workload.test_fraction={self.test_fraction}: must be in (0, 0.9)")

    def build(self, seed: int) -> DigitsWorkload:
        return DigitsWorkload(self, seed)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class DigitsNet(nn.Module):
    def __init__(self, c: DigitsConfig):
        super().__init__()
        w = c.width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, c_in = [], w
        for i in range(c.num_blocks):
            down = i == c.num_blocks // 2
            c_out = 2 * w if i >= c.num_blocks // 2 else w
            blocks.append(ResBlock(c_in, c_out, 2 if down else 1))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c_in, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


class DigitsWorkload(Workload):
    name = "digits_cnn"

    def __init__(self, c: DigitsConfig, seed: int):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        self.c, self.preset, self.seed = c, c.preset, seed
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - 0.5) / 0.5
        if c.image_size != 8:
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", align_corners=False)
        y = torch.tensor(d.target, dtype=torch.long)
        tr, te = train_test_split(range(len(y)), test_size=c.test_fraction, random_state=seed, stratify=d.target)
        self.x_train, self.y_train = x[tr], y[tr]
        self.x_test, self.y_test = x[te], y[te]
        torch.manual_seed(seed)
        self.model = DigitsNet(c)

    def batch(self, step: int, batch_size: int, device: torch.device):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(len(self.y_train), (batch_size,), generator=g)
        return self.x_train[idx].to(device), self.y_train[idx].to(device)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> Quality:
        was_training = model.training
        model.eval()
        correct, loss = 0, 0.0
        for xb, yb in zip(self.x_test.split(256), self.y_test.split(256), strict=True):
            logits = model(xb.to(device)).float()
            correct += (logits.argmax(-1).cpu() == yb).sum().item()
            loss += F.cross_entropy(logits, yb.to(device), reduction="sum").item()
        model.train(was_training)
        n = len(self.y_test)
        return Quality("test_accuracy", correct / n, True, {"test_loss": loss / n})

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.c.lr, weight_decay=self.c.weight_decay)

    def activation_model(self, batch_size: int, elem_bytes: int, checkpoint=None, autocast: bool = False):
        """Bytes saved for backward. Per block: its input (conv1 and skip conv), conv1 out (bn1), relu1 out
        (conv2), conv2 out (bn2), and on the down-sampling block the skip conv out (skip BN); the block's
        final ReLU output is the next block's input. BN's fp32 mean/invstd per channel are negligible.
        Channel counts are read from the modules, so structurally pruned channels are followed."""
        b, e, s = batch_size, elem_bytes, self.c.image_size
        stem_conv = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        stem = (b * 1 * s * s + b * stem_conv.out_channels * s * s) * e  # conv in, bn in
        mode, k = checkpoint if checkpoint else ("none", 1)
        blocks = [m for m in self.model.modules() if isinstance(m, ResBlock)]
        total_layers, s_in, c_last, last_ckpt = 0.0, s, stem_conv.out_channels, False
        for i, blk in enumerate(blocks):
            so = (s_in - 1) // blk.conv1.stride[0] + 1
            inp = b * blk.conv1.in_channels * s_in * s_in * e
            mid = b * blk.conv1.out_channels * so * so * e  # conv1 out (bn1 in) = relu1 out size
            out = b * blk.conv2.out_channels * so * so * e
            convs = mid + out + (out if isinstance(blk.skip, nn.Sequential) else 0)  # + skip conv out
            last_ckpt = mode in ("full", "selective") or (mode == "every_k" and i % k == 0)
            if mode == "selective":  # conv outputs kept, relu recomputed
                total_layers += inp + convs
            elif last_ckpt:
                total_layers += inp
            else:
                total_layers += inp + convs + mid
            s_in, c_last = so, blk.conv2.out_channels
        last_out = 0 if last_ckpt else b * c_last * s_in * s_in * e  # final ReLU output, saved by that ReLU
        head = last_out + b * c_last * e + b * 10 * 4  # + linear input + fp32 log-softmax
        return {"layers": total_layers, "stem_and_head": stem + head, "total": total_layers + stem + head}

    def model_flops(self, batch_size: int) -> float:
        """3x the forward multiply-accumulates x2 of every conv and linear layer."""
        macs = 0
        hooks = []

        def count(m, inp, out):
            nonlocal macs
            if isinstance(m, nn.Conv2d):
                macs += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                macs += out.numel() * m.in_features

        for m in self.model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(count))
        was_training = self.model.training
        self.model.eval()  # no BN running-stat update from this probe
        with torch.no_grad():
            dev = next(self.model.parameters()).device
            self.model(torch.zeros(batch_size, 1, self.c.image_size, self.c.image_size, device=dev))
        self.model.train(was_training)
        for h in hooks:
            h.remove()
        return 6.0 * macs

    def info(self):
        return {"train_samples": len(self.y_train), "test_samples": len(self.y_test)}
