"""The paper's parameter and FLOP tables (1, 3, 4, 5, 6, 7) next to ours, as markdown.

Ours come from ``sasa_jax.summary`` on ``configs/imagenet.py`` (224x224, 1000 classes). FLOPs
use the paper's convention (``flops``); the "computed" column is what this code executes.

    python benchmarks/paper_tables.py            # markdown tables
    python benchmarks/paper_tables.py --json     # ... then one JSON object
"""

from __future__ import annotations

import argparse
import json
import pathlib

from sasa_jax.analysis.model_summary import summarize_config
from sasa_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSA = "variant=conv_stem_attention"
FULL = "variant=full_attention"

# (table, row label, config argument, paper GFLOPs, paper params in millions)
ROWS = [
    *[
        ("1", f"ResNet-{d} {label}", f"depth={d},variant={v}", flops, params)
        for d, rows in {
            26: [(4.7, 13.7), (4.5, 10.3), (4.7, 10.3)],
            38: [(6.5, 19.6), (5.7, 14.1), (6.0, 14.1)],
            50: [(8.2, 25.6), (7.0, 18.0), (7.2, 18.0)],
        }.items()
        for (label, v), (flops, params) in zip(
            [
                ("baseline", "baseline"),
                ("conv-stem + attention", "conv_stem_attention"),
                ("full attention", "full_attention"),
            ],
            rows,
            strict=True,
        )
    ],
    ("3", "conv – / attention 1,2,3,4", "depth=50,stages=1234", 7.0, 18.0),
    ("3", "conv 1 / attention 2,3,4", "depth=50,stages=234", 7.3, 18.1),
    ("3", "conv 1,2 / attention 3,4", "depth=50,stages=34", 7.5, 18.5),
    ("3", "conv 1,2,3 / attention 4", "depth=50,stages=4", 8.0, 20.8),
    ("3", "conv 1,2,3,4 / attention –", "depth=50,stages=none", 8.2, 25.6),
    ("3", "conv 2,3,4 / attention 1", "depth=50,stages=1", 7.9, 25.5),
    ("3", "conv 3,4 / attention 1,2", "depth=50,stages=12", 7.8, 25.0),
    ("3", "conv 4 / attention 1,2,3", "depth=50,stages=123", 7.2, 22.7),
    *[
        ("4", f"{k}×{k}", f"depth=50,{CSA},window={k}", flops, 18.0)
        for k, flops in [(3, 6.6), (5, 6.7), (7, 7.0), (9, 7.3), (11, 7.7)]
    ],
    ("5", "none", f"depth=50,{CSA},positional=none", 6.9, 18.0),
    ("5", "absolute (sinusoidal)", f"depth=50,{CSA},positional=absolute", 6.9, 18.0),
    ("5", "relative", f"depth=50,{CSA},positional=relative", 7.0, 18.0),
    ("6", "q·r only (no W_K)", f"depth=50,{CSA},logits=qr", 6.1, 16.7),
    ("6", "q·k + q·r", f"depth=50,{CSA},logits=qk+qr", 7.0, 18.0),
    ("7", "stand-alone", f"depth=50,{FULL},stem_values=stand_alone", 7.1, None),
    (
        "7",
        "spatial convolution for values",
        f"depth=50,{FULL},stem_values=spatial_conv_values",
        7.4,
        None,
    ),
    ("7", "spatially-aware values", f"depth=50,{FULL},stem_values=spatially_aware", 7.2, None),
]

TITLES = {
    "1": "Table 1: ResNets, 224×224",
    "3": "Table 3: ResNet-50 with a conv stem, convolution or attention per stage",
    "4": "Table 4: spatial extent k (conv-stem + attention ResNet-50)",
    "5": "Table 5: positional encoding (conv-stem + attention ResNet-50)",
    "6": "Table 6: logits (conv-stem + attention ResNet-50)",
    "7": "Table 7: attention stems (full-attention ResNet-50)",
}


def measure() -> list[dict]:
    rows = []
    for table, label, arg, paper_flops, paper_params in ROWS:
        result = summarize_config(config_lib.from_file(ROOT / "configs/imagenet.py", arg))
        rows.append(
            {
                "table": table,
                "row": label,
                "config": f"configs/imagenet.py:{arg}",
                "params": result["params"],
                "flops": result["flops"],
                "flops_computed": result["flops_computed"],
                "paper_params_m": paper_params,
                "paper_gflops": paper_flops,
                "flops_diff_pct": 100 * (result["flops"] / 1e9 - paper_flops) / paper_flops,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for table, title in TITLES.items():
        out += [
            f"**{title}**",
            "",
            "| row | params (M) | paper | GFLOPs | paper | Δ FLOPs | computed GFLOPs |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["table"] == table):
            paper_params = "–" if r["paper_params_m"] is None else f"{r['paper_params_m']:.1f}"
            out.append(
                f"| {r['row']} | {r['params'] / 1e6:.2f} | {paper_params} | "
                f"{r['flops'] / 1e9:.2f} | {r['paper_gflops']:.1f} | "
                f"{r['flops_diff_pct']:+.1f}% | {r['flops_computed'] / 1e9:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    rows = measure()
    print(markdown(rows))
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
