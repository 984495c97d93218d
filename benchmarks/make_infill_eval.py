"""Write the held-out infilling evaluation ``surelock_fx/assets/infill/eval.jsonl``.

    python benchmarks/make_infill_eval.py [--n 100] [--seed 0] [--tokenizer surelock_fx/assets/tiny-code]

``--n`` spans of each kind (line, lines, body; interleaved, so that the first m lines of the file are a
balanced subset) cut from the held-out standard-library modules (``code_corpus``), without repeats.
Spans whose answer does not fit the answer region (``infill.GEN_LENGTH`` tokens with its EOS, by the
tokenizer in ``--tokenizer``) are drawn again. The file is data: the evaluation does not depend on the
Python version of the machine that runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from surelock_fx import infill  # noqa: E402
from surelock_fx.text import load_tokenizer  # noqa: E402

import code_corpus  # noqa: E402


def infill_records(files: dict[str, str], n: int, seed: int, fits) -> list[dict]:
    """``n`` distinct records per kind, interleaved line, lines, body, line, ..."""
    sampler = code_corpus.InfillSampler(files, seed)
    seen, by_kind = set(), {kind: [] for kind in code_corpus.KINDS}
    for kind, records in by_kind.items():
        while len(records) < n:
            record = sampler(kind).record()
            key = (record["prompt"], record["answer"])
            if key not in seen and fits(record["answer"]):
                seen.add(key)
                records.append(record)
    return [records[i] for i in range(n) for records in by_kind.values()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="spans per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=infill.default_model_dir())
    ap.add_argument("--out", type=Path, default=infill.eval_file())
    args = ap.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    _, held_out = code_corpus.split(code_corpus.source_files())
    records = infill_records(held_out, args.n, args.seed,
                             lambda answer: len(tokenizer.encode(answer, add_special_tokens=False)) < infill.GEN_LENGTH)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} spans from {len(held_out)} held-out files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
