"""Offline text for language modelling: a pinned, sorted list of Python standard-library source files.

Every machine with CPython has these files, so no download is needed. Files differ between Python versions,
so the record carries the list actually read and a SHA-256 of the bytes (`corpus_id`). `data.path` points
the workload at a user's own text file instead.
"""

from __future__ import annotations

import hashlib
import math
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


TEXT_SAMPLE_BYTES = 1 << 20  # the head of a user's data file checked for looking like text
# A text file has no NUL byte; binary formats (archives, images, tensors, UTF-16) have one in ~256 bytes or more.
# Without NULs, bytes that are mostly not UTF-8 are binary: random high bytes are ~100% invalid, while a Latin-1
# or cp1252 text (one accented letter in 10, even in dense French) stays far under 30%, and passes.
MAX_INVALID_UTF8 = 0.3


def not_text(head: bytes) -> str | None:
    """Why these bytes do not look like text (None if they do): NUL bytes, or mostly invalid UTF-8."""
    nuls = head.count(0)
    if nuls:
        return f"{nuls} NUL byte(s) in its first {len(head)} bytes"
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - head.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_INVALID_UTF8 * len(head):
        return f"{bad / len(head):.0%} of its first {len(head)} bytes are not UTF-8"
    return None


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
        """Before any run starts (membench run/plan): the user's own data file must be a readable regular file that
        holds text (not a binary file the model would train on without a word) and at least one sequence (plus its
        next-byte target) in each of the train and eval splits the run reads."""
        if node.get("data_path") is None:
            return
        path = str(node["data_path"])
        key = f"workload.data_path={path}"
        if not path.strip():
            raise ConfigError("workload.data_path='': empty; give a text file, or null for the built-in corpus")
        p = Path(path).expanduser()
        if p.is_dir():
            raise ConfigError(f"{key}: a directory; allowed: a regular text file (or null for the built-in corpus)")
        if not p.exists():
            raise ConfigError(f"{key}: no such file; allowed: a regular text file (or null for the built-in corpus)")
        if not p.is_file():
            raise ConfigError(
                f"{key}: not a regular file; allowed: a regular text file (or null for the built-in corpus)"
            )
        if p.stat().st_size == 0:
            raise ConfigError(f"{key}: the file is empty")
        max_bytes = int(node.get("max_corpus_bytes") or p.stat().st_size)
        try:
            with p.open("rb") as f:
                head = f.read(min(max_bytes, TEXT_SAMPLE_BYTES))
        except OSError as e:
            raise ConfigError(f"{key}: cannot be read ({e.strerror}); allowed: a readable text file") from None
        why = not_text(head)
        if why:
            raise ConfigError(f"{key}: does not look like text ({why}); allowed: a UTF-8 text file")
        seq_len = node.get("seq_len")
        if seq_len:
            used = min(p.stat().st_size, max_bytes)
            n_eval = max(int(used * float(node.get("eval_fraction", 0.1))), 1)
            need = min(n_eval, used - n_eval)
            if need <= seq_len + 1:
                least = math.ceil((seq_len + 2) / min(float(node.get("eval_fraction", 0.1)), 0.5))
                raise ConfigError(
                    f"{key}: {used} bytes hold less than one sequence in its eval split "
                    f"(workload.seq_len={seq_len} + 1 target byte, eval_fraction={node.get('eval_fraction', 0.1)}); "
                    f"allowed: a file of at least ~{least} bytes, or a smaller workload.seq_len"
                )

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
