"""Offline text for language modelling: a pinned, sorted list of Python standard-library source files.

Every machine with CPython has these files, so no download is needed. Files differ between Python versions,
so the record carries the list actually read and a SHA-256 of the bytes (`corpus_id`). `data.path` points
the workload at a user's own text file instead.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from membench.errors import ConfigError

# Long-lived modules present in CPython 3.8-3.14, sorted. Missing ones are skipped and recorded.
STDLIB_FILES = sorted(
    [
        "argparse.py",
        "ast.py",
        "base64.py",
        "bisect.py",
        "calendar.py",
        "cmd.py",
        "code.py",
        "codecs.py",
        "collections/__init__.py",
        "colorsys.py",
        "configparser.py",
        "contextlib.py",
        "copy.py",
        "csv.py",
        "dataclasses.py",
        "datetime.py",
        "decimal.py",
        "difflib.py",
        "dis.py",
        "enum.py",
        "fileinput.py",
        "fnmatch.py",
        "fractions.py",
        "ftplib.py",
        "functools.py",
        "getopt.py",
        "gettext.py",
        "glob.py",
        "gzip.py",
        "hashlib.py",
        "heapq.py",
        "hmac.py",
        "inspect.py",
        "ipaddress.py",
        "json/decoder.py",
        "json/encoder.py",
        "keyword.py",
        "linecache.py",
        "locale.py",
        "logging/__init__.py",
        "mailbox.py",
        "netrc.py",
        "numbers.py",
        "operator.py",
        "optparse.py",
        "pickle.py",
        "pickletools.py",
        "pprint.py",
        "queue.py",
        "quopri.py",
        "random.py",
        "reprlib.py",
        "sched.py",
        "secrets.py",
        "selectors.py",
        "shlex.py",
        "shutil.py",
        "smtplib.py",
        "socket.py",
        "statistics.py",
        "string.py",
        "struct.py",
        "subprocess.py",
        "tarfile.py",
        "tempfile.py",
        "textwrap.py",
        "threading.py",
        "timeit.py",
        "token.py",
        "tokenize.py",
        "trace.py",
        "traceback.py",
        "types.py",
        "typing.py",
        "uuid.py",
        "warnings.py",
        "wave.py",
        "weakref.py",
        "zipfile/__init__.py",
        "zipfile.py",
    ]
)


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    eval: torch.Tensor
    corpus_id: str
    source: str
    files: list[str]


def _stdlib_bytes(max_bytes: int) -> tuple[bytes, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, used, total = [], [], 0
    for rel in STDLIB_FILES:
        p = root / rel
        if not p.is_file():
            continue
        data = p.read_bytes()
        chunks.append(data)
        used.append(rel)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes], used


@dataclass
class CorpusTraining:
    """The corpus and optimiser fields every byte-corpus LM workload config shares (gpt, llama, hf), and their
    checks; each config extends it (dataclass inheritance: these fields first, all with defaults)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    lr_warmup_steps: int = 10  # linear LR warm-up, then constant
    batch_size: int = 8  # default run.batch_size for this preset
    max_corpus_bytes: int = 4_000_000
    eval_fraction: float = 0.1
    eval_batches: int = 8
    data_path: str | None = None  # a user's own text file instead of the stdlib corpus

    @staticmethod
    def check_inputs(node: dict) -> None:
        """Before any run starts (membench run/plan): the user's own data file must exist and hold data."""
        if node.get("data_path") is None:
            return
        path = str(node["data_path"])
        if not path.strip():
            raise ConfigError("workload.data_path='': empty; give a text file, or null for the built-in corpus")
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"workload.data_path={path}: no such file")
        if p.stat().st_size == 0:
            raise ConfigError(f"workload.data_path={path}: the file is empty")

    def check_corpus(self) -> None:
        for key in ("batch_size", "max_corpus_bytes", "eval_batches"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"workload.{key}={getattr(self, key)}: must be > 0")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"workload.eval_fraction={self.eval_fraction}: must be in (0, 0.5)")


def load_corpus(path: str | None, max_bytes: int, eval_fraction: float) -> Corpus:
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"workload.data_path={path!r}: no such file")
        raw, files, source = p.read_bytes()[:max_bytes], [str(p)], "file"
    else:
        raw, files = _stdlib_bytes(max_bytes)
        source = "python-stdlib"
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_eval = max(int(len(data) * eval_fraction), 1)
    return Corpus(
        train=data[:-n_eval].clone(),
        eval=data[-n_eval:].clone(),
        corpus_id="sha256:" + hashlib.sha256(raw).hexdigest()[:16],
        source=source,
        files=files,
    )
