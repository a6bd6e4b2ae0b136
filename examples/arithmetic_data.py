"""Write arithmetic prompts with their answers as jsonl, reproducibly from a seed (the step before
`tunelab train configs/arithmetic-smollm2-grpo.yaml`):

    python examples/arithmetic_data.py --out runs/data/arithmetic --train 2000 --validation 200 --seed 0

writes OUT/train.jsonl and OUT/validation.jsonl, records {"prompt", "answer", "problem", "kind"}
(tunelab.data.arithmetic); no validation problem is also a training one. `--kinds 2+1,1*2` chooses the kinds
(digit counts joined by + - *; default 2+1, 1*2, 2+2, in turn).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tunelab.data.arithmetic import DEFAULT_KINDS, arithmetic_problems


def write_jsonl(records: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (train.jsonl, validation.jsonl)")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--validation", type=int, default=200, help="validation problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated kinds, e.g. 2+1,1*2")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        train = arithmetic_problems(args.train, seed=args.seed, kinds=kinds)
        validation = arithmetic_problems(args.validation, seed=args.seed + 1, kinds=kinds,
                                         exclude={r["problem"] for r in train})
    except ValueError as error:
        parser.error(str(error))
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(validation, out / "validation.jsonl")
    print(f"wrote {out}/train.jsonl ({len(train)} problems) and {out}/validation.jsonl ({len(validation)}); "
          f"kinds {', '.join(kinds)}, seed {args.seed}")


if __name__ == "__main__":
    main()
