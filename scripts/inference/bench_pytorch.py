#!/usr/bin/env python3
"""PyTorch CPU baseline for `cell0 bench infer`:
sentence-transformers' encode() on 2 threads, embeddings/s for batch 1 and 32 of
texts that tokenize to exactly 12, 128 and 256 tokens (the same texts the Rust
bench uses: "hello" repeated). Prints JSON.

Usage: bench_pytorch.py [MODEL_DIR] [--min-seconds S]
"""
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    args = [a for a in sys.argv[1:]]
    min_seconds = 2.0
    if "--min-seconds" in args:
        i = args.index("--min-seconds")
        min_seconds = float(args[i + 1])
        del args[i : i + 2]
    model_dir = args[0] if args else os.path.join(ROOT, "models", "all-minilm-l6-v2")
    torch.set_num_threads(2)
    model = SentenceTransformer(model_dir, device="cpu")
    results = []
    for tokens in (12, 128, 256):
        text = " ".join(["hello"] * (tokens - 2))
        n = len(model.tokenizer(text)["input_ids"])
        if n != tokens:
            raise SystemExit(f"text tokenizes to {n} tokens, wanted {tokens}")
        for batch in (1, 32):
            texts = [text] * batch
            model.encode(texts, batch_size=32, normalize_embeddings=True)
            iters = 0
            start = time.perf_counter()
            while True:
                model.encode(texts, batch_size=32, normalize_embeddings=True)
                iters += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            eps = batch * iters / elapsed
            print(f"  pytorch batch {batch} x {tokens} tokens: {eps:.1f} embeddings/s", file=sys.stderr)
            results.append(
                {"batch": batch, "tokens": tokens, "iterations": iters, "seconds": elapsed, "embeddings_per_sec": eps}
            )
    print(
        json.dumps(
            {
                "backend": "pytorch-cpu",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "sentence_transformers": sentence_transformers.__version__,
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "embed": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
