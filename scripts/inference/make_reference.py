#!/usr/bin/env python3
"""Writes node/inference/tests/data/reference.json: texts, token ids and
sentence-transformers embeddings of all-MiniLM-L6-v2, made once from the same
model files the Rust engine loads (scripts/fetch-model.sh).

Usage: make_reference.py [MODEL_DIR] [OUT]
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "all-minilm-l6-v2")
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "node", "inference", "tests", "data", "reference.json")

LONG = " ".join(
    f"Sentence {i} of a long document about distributed consensus, replicated logs and vector search."
    for i in range(40)
)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "A Raft cluster elects a leader and replicates its log to followers.",
    "机器学习是人工智能的一个分支。",
    "東京は日本の首都です。",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم، هذه جملة باللغة العربية.",
    "Привет, мир! Это предложение на русском языке.",
    "Emoji test 🚀🔥👍🏽 and 🇫🇷 flags",
    "control\u0000chars\u0007in\u001b[31mtext\u0085\ttab\nnewline\r\n",
    "Ünïcödé àccents and ligatures ﬁ ﬂ",
    "",
    "   \t\n  ",
    LONG,
]


def main():
    torch.set_num_threads(2)
    model = SentenceTransformer(MODEL_DIR, device="cpu")
    if model.max_seq_length != 256:
        raise SystemExit(f"unexpected max_seq_length {model.max_seq_length}")
    features = model.tokenize(TEXTS)
    ids = features["input_ids"]
    mask = features["attention_mask"]
    token_ids = [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(ids.tolist(), mask.tolist())]
    emb = model.encode(TEXTS, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    out = {
        "model": "all-minilm-l6-v2",
        "generator": {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
        },
        "max_seq_length": model.max_seq_length,
        "cases": [
            {"text": t, "token_ids": tid, "embedding": [float(f"{x:.8g}") for x in e.tolist()]}
            for t, tid, e in zip(TEXTS, token_ids, emb)
        ],
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=None)
        f.write("\n")
    print(f"wrote {OUT}: {len(TEXTS)} cases, token counts {[len(t) for t in token_ids]}", file=sys.stderr)


if __name__ == "__main__":
    main()
