"""Why a low rank suffices: the LoRA paper's Tables 5, 6, 7, Figure 3/4 and adapter compression on E2E.

Every training run is `benchmarks/e2e.py --methods lora` (the E2E protocol: the paper's α = 32,
dropout 0.1, lr, batch 8, beam-10 decoding of the first `--eval-size` dev MRs) with the same steps,
seed and data, in its own process; a run whose `results.json` exists is reused, so an interrupted
experiment continues. Then the analyses run on the saved adapters with `lorakit.analysis`.

Experiments (`--experiments`, comma-separated):

- `table5`: one trainable-parameter budget (9,216 per block: q at r = 8), spent on q / k / v / o /
  q,k / q,v / q,k,v,o / all seven projections. SmolLM2's k and v are 576×192 (grouped-query
  attention), q and o 576×576, so ranks differ per matrix (`--rank-pattern`) to keep the budget
  equal; all seven at r = 1 is the smallest possible (10,176, +10%).
- `table6`: q,v at r = 1, 2, 4, 8, 64, for every seed in `--seeds` (the analyses use the first).
- `fig3`: φ between the r = 8 and r = 64 adapters of `table6` (q and v), and between two seeds at
  r = 64 (Figure 4's contrast; trains r = 64 with the second seed).
- `table7`: the amplification factor of the r = 4 and r = 64 adapters against the base weights.
- `compress`: the r = 64 adapter truncated to its 99%-energy ranks (`lorakit compress`), decoded
  and scored beside the full one: BLEU kept against size.

Usage:
    .venv/bin/python benchmarks/lowrank.py --experiments table6,fig3,table7,compress --steps 400
    .venv/bin/python benchmarks/lowrank.py --experiments table5 --seeds 110,111 --steps 400
    .venv/bin/python benchmarks/lowrank.py --experiments table6 --steps 50 --eval-size 20   # a smoke run

Results: `<out>/lowrank.json` and the tables on stdout (and `--results FILE` for a copy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _flags
import _report

HERE = Path(__file__).resolve().parent

# name -> (targets, r, rank_pattern); the budget per block is 9,216 parameters (q at r = 8).
TABLE5: dict[str, tuple[str, int, str]] = {
    "q": ("q_proj", 8, ""),
    "k": ("k_proj", 12, ""),
    "v": ("v_proj", 12, ""),
    "o": ("o_proj", 8, ""),
    "q,k": ("q_proj,k_proj", 4, "k_proj=6"),
    "q,v": ("q_proj,v_proj", 4, "v_proj=6"),
    "q,k,v,o": ("q_proj,k_proj,v_proj,o_proj", 2, "k_proj=3,v_proj=3"),
    "all seven": ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 1, ""),
}
TABLE6_RANKS = (1, 2, 4, 8, 64)
PAPER_TABLE6 = "GPT-3 WikiSQL/MNLI: q,v at r = 1 already matches r = 64 (Table 6)"


def run_e2e(args: argparse.Namespace, name: str, target: str, r: int, pattern: str, seed: int) -> dict[str, Any]:
    """One e2e.py LoRA run (reused when its results exist); returns its method record."""
    out = Path(args.out) / f"{name}-s{seed}"
    results = out / "results.json"
    if not results.is_file() or "lora" not in json.loads(results.read_text()).get("methods", {}):
        command = [sys.executable, str(HERE / "e2e.py"), "--methods", "lora", "--target", target, "-r", str(r)]
        command += ["--rank-pattern", pattern, "--max-steps", str(args.steps), "--eval-size", str(args.eval_size)]
        command += ["--seed", str(seed), "--lr", str(args.lr), "--threads", str(args.threads), "--out", str(out)]
        print(f"[{name} seed {seed}] {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"[{name} seed {seed}] done in {time.perf_counter() - started:.0f} s", flush=True)
    record = json.loads(results.read_text())["methods"]["lora"]
    record["adapter_dir"] = str(out / "lora" / "adapter")
    return record


def table5(args: argparse.Namespace) -> dict[str, Any]:
    rows = {}
    chosen = [n.strip() for n in args.table5.split(";")] if args.table5 else list(TABLE5)
    unknown = sorted(set(chosen) - set(TABLE5))
    if unknown:
        raise SystemExit(f"--table5: unknown {unknown}; choose from {list(TABLE5)}")
    for name in chosen:
        target, r, pattern = TABLE5[name]
        runs = [
            run_e2e(args, f"t5-{name.replace(',', '').replace(' ', '')}", target, r, pattern, s) for s in args.seeds
        ]
        rows[name] = {
            "targets": target,
            "r": r,
            "rank_pattern": pattern,
            "trainable": runs[0]["trainable_parameters"],
            "bleu": [x["scores"]["BLEU"] for x in runs],
            "scores": [x["scores"] for x in runs],
        }
    return rows


def table6(args: argparse.Namespace) -> dict[str, Any]:
    """q,v at each rank for every seed; `scores` and `adapter` are the first seed's (the analyses use them)."""
    out = {}
    for r in TABLE6_RANKS:
        runs = [run_e2e(args, f"t6-qv-r{r}", "q_proj,v_proj", r, "", seed) for seed in args.seeds]
        out[str(r)] = {
            "trainable": runs[0]["trainable_parameters"],
            "scores": runs[0]["scores"],
            "adapter": runs[0]["adapter_dir"],
            "bleu": [x["scores"]["BLEU"] for x in runs],
        }
    return out


def fig3(args: argparse.Namespace, t6: dict[str, Any]) -> dict[str, Any]:
    from lorakit.analysis import analyze

    def mean_phi(result: dict[str, Any], leaf: str, i: int, j: int) -> float:
        return statistics.fmean(
            e["phi"][i - 1][j - 1] for p, e in result["modules"].items() if p.endswith(leaf) and "phi" in e
        )

    out: dict[str, Any] = {}
    r8_vs_r64 = analyze(t6["8"]["adapter"], compare=t6["64"]["adapter"])
    other = run_e2e(args, "t6-qv-r64", "q_proj,v_proj", 64, "", args.seeds[-1] if len(args.seeds) > 1 else 111)
    seeds = analyze(t6["64"]["adapter"], compare=other["adapter_dir"])
    for leaf in ("q_proj", "v_proj"):
        out[leaf] = {
            "r8_vs_r64_phi_1_1": mean_phi(r8_vs_r64, leaf, 1, 1),
            "r8_vs_r64_phi_8_64": mean_phi(r8_vs_r64, leaf, 8, 64),
            "r8_vs_r64_phi_diag_mean": statistics.fmean(mean_phi(r8_vs_r64, leaf, i, i) for i in range(1, 9)),
            "seed_vs_seed_r64_phi_1_1": mean_phi(seeds, leaf, 1, 1),
            "seed_vs_seed_r64_phi_8_8": mean_phi(seeds, leaf, 8, 8),
            "seed_vs_seed_r64_phi_64_64": mean_phi(seeds, leaf, 64, 64),
        }
    from lorakit.analysis import write_analysis

    write_analysis(r8_vs_r64, Path(args.out) / "fig3-r8-vs-r64")
    write_analysis(seeds, Path(args.out) / "fig4-seed-vs-seed-r64")
    return out


def table7(args: argparse.Namespace, t6: dict[str, Any]) -> dict[str, Any]:
    from lorakit.analysis import analyze
    from lorakit.models import load_model

    base, _, _ = load_model(_flags.MODEL)
    out = {}
    for r in ("4", "64"):
        result = analyze(t6[r]["adapter"], base=base)
        out[r] = {leaf: result["layer_types"][leaf] for leaf in result["layer_types"]}
    return out


def compression(args: argparse.Namespace, t6: dict[str, Any]) -> dict[str, Any]:
    import e2e as E

    import lorakit
    from lorakit.analysis import compress
    from lorakit.models import load_model

    small = Path(args.out) / "t6-qv-r64-compressed-99"
    report_path = small.with_name(small.name + ".report.json")
    if not small.is_dir():
        _report.write_json(report_path, compress(t6["64"]["adapter"], small, energy=0.99))
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    scored = Path(args.out) / "t6-qv-r64-compressed-99.scores.json"
    if not scored.is_file():
        e_args = E.parse_args(["--eval-size", str(args.eval_size), "--threads", str(args.threads)])
        _, prompts, refs = E.load_eval(e_args)
        model, tokenizer, _ = load_model(_flags.MODEL)
        lorakit.load_adapter(model, small)
        predictions = E.decode(model.eval(), tokenizer, prompts, e_args)
        scores = E.e2e.e2e_metrics(predictions, refs)
        scored.write_text(json.dumps({"scores": scores, "report": report}, indent=1))
    data = json.loads(scored.read_text())
    return {
        "full_r64": {
            "scores": t6["64"]["scores"],
            "bytes": Path(t6["64"]["adapter"], "adapter_model.safetensors").stat().st_size,
        },
        "compressed": {
            "scores": data["scores"],
            "bytes": (small / "adapter_model.safetensors").stat().st_size,
            "report": data.get("report"),
        },
    }


def _over_seeds(bleu: list[float]) -> list[str]:
    """Two table cells: the mean (± the population spread when there are several seeds), each seed's."""
    spread = f" ± {statistics.pstdev(bleu):.2f}" if len(bleu) > 1 else ""
    return [f"{statistics.fmean(bleu):.1f}{spread}", ", ".join(f"{b:.1f}" for b in bleu)]


def report(results: dict[str, Any]) -> str:
    parts = []
    if "table5" in results:
        rows = []
        for name, row in results["table5"].items():
            rows.append([name, f"{row['trainable']:,}", *_over_seeds(row["bleu"])])
        parts.append(
            "Table 5 analogue (one budget)\n\n"
            + _report.markdown_table(["adapted", "trainable", "BLEU", "per seed"], rows)
        )
    if "table6" in results:
        rows = []
        for r, v in results["table6"].items():
            bleu = v.get("bleu", [v["scores"]["BLEU"]])  # a one-seed lowrank.json from before seeds
            rows.append([r, f"{v['trainable']:,}", *_over_seeds(bleu), f"{v['scores']['ROUGE_L']:.1f}"])
        parts.append(
            "Table 6 analogue (q,v)\n\n"
            + _report.markdown_table(["r", "trainable", "BLEU", "per seed", "ROUGE-L (first seed)"], rows)
        )
    if "fig3" in results:
        rows = [[leaf, *(f"{v:.2f}" for v in d.values())] for leaf, d in results["fig3"].items()]
        keys = list(next(iter(results["fig3"].values())))
        parts.append("Figure 3/4 analogue (mean over layers)\n\n" + _report.markdown_table(["module", *keys], rows))
    if "table7" in results:
        rows = []
        for r, types in results["table7"].items():
            for leaf, s in types.items():
                rows.append(
                    [
                        r,
                        leaf,
                        f"{s['mean_frobenius']:.3g}",
                        f"{s.get('mean_w_on_delta', 0):.3g}",
                        f"{s.get('mean_w_on_w', 0):.3g}",
                        f"{s.get('mean_w_on_random', 0):.3g}",
                        f"{s.get('mean_amplification', 0):.1f}",
                    ]
                )
        parts.append(
            "Table 7 analogue (mean over layers)\n\n"
            + _report.markdown_table(
                ["r", "module", "‖ΔW‖_F", "‖UᵀWV‖ ΔW's", "W's top-r", "random", "amplification"], rows
            )
        )
    if "compress" in results:
        c = results["compress"]
        rows = [
            ["r = 64", f"{c['full_r64']['bytes'] / 1e6:.2f} MB", f"{c['full_r64']['scores']['BLEU']:.1f}"],
            [
                "r = 64 → 99% energy",
                f"{c['compressed']['bytes'] / 1e6:.2f} MB",
                f"{c['compressed']['scores']['BLEU']:.1f}",
            ],
        ]
        parts.append("Compression\n\n" + _report.markdown_table(["adapter", "file", "BLEU"], rows))
    return "\n\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default="table6,fig3,table7,compress")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument(
        "--seeds", default="110", help="table5 and table6 run every seed; analyses use the first (fig3 also the last)"
    )
    p.add_argument("--table5", default="", help="a subset of table5's rows, ';'-separated (e.g. 'q;v;q,v')")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/lowrank")
    p.add_argument("--results", type=Path, help="also write the results JSON here")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [e.strip() for e in args.experiments.split(",") if e.strip()]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "lowrank.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["command"] = "python benchmarks/lowrank.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    if "table5" in wanted:
        results["table5"] = table5(args)
    if {"table6", "fig3", "table7", "compress"} & set(wanted):
        t6 = table6(args)
        results["table6"] = t6
        if "fig3" in wanted:
            results["fig3"] = fig3(args, t6)
        if "table7" in wanted:
            results["table7"] = table7(args, t6)
        if "compress" in wanted:
            results["compress"] = compression(args, t6)
    results["seconds"] = time.perf_counter() - started
    _report.write_json(path, results)
    if args.results:
        _report.write_json(args.results, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
